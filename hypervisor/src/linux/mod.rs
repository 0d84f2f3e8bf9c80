//! Booting a Linux kernel as a guest: where the kernel, initrd and DTB go in guest RAM,
//! and the device tree the guest sees. See docs/linux-guest.md.

pub mod guest_dt;
pub mod image;
pub mod layout;

use alloc::vec::Vec;

use guest_dt::{build_guest_dt, GuestDtConfig, GuestDtError};
use layout::{plan, LayoutError, DTB_AREA};

/// A Linux guest as its VM description gives it.
#[derive(Clone, Copy, Debug)]
pub struct LinuxGuest<'a> {
    /// Guest RAM start (IPA).
    pub ram_base: u64,
    /// Guest RAM bytes.
    pub ram_size: u64,
    /// MPIDRs of the physical CPUs of the guest's vCPUs, in vCPU order.
    pub cpus: &'a [u64],
    /// The first bytes of the kernel file (at least the 64-byte header when it is longer).
    pub kernel_head: &'a [u8],
    /// Length of the kernel file.
    pub kernel_len: u64,
    /// IPA the description loads the kernel at.
    pub kernel_ipa: u64,
    /// IPA and length of the initrd, if any.
    pub initrd: Option<(u64, u64)>,
    /// Kernel command line.
    pub bootargs: &'a str,
    /// Host DT paths of the guest's pass-through devices.
    pub devices: &'a [&'a str],
}

/// How to start a Linux guest: vCPU 0 enters `entry` with x0 = `dtb_ipa`, where the
/// hypervisor has written `dtb`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinuxBoot {
    /// Entry point (the kernel's first byte).
    pub entry: u64,
    /// IPA of the DTB.
    pub dtb_ipa: u64,
    /// The guest DTB.
    pub dtb: Vec<u8>,
}

/// Why a Linux guest cannot be started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinuxBootError {
    /// The pieces do not fit in the guest's RAM.
    Layout(LayoutError),
    /// The description loads the kernel elsewhere than its header requires.
    KernelIpa {
        /// Where the kernel has to go.
        expected: u64,
        /// Where the description put it.
        given: u64,
    },
    /// The guest DT could not be made.
    Dt(GuestDtError),
    /// The guest DT is larger than the 2 MiB the boot protocol allows.
    DtbTooLarge,
}

/// Plans the boot of `guest` and writes its DTB from the host DTB `host_dtb`.
///
/// # Errors
/// [`LinuxBootError`] when the layout, the kernel's load address or the DT is wrong.
pub fn prepare(host_dtb: &[u8], guest: &LinuxGuest<'_>) -> Result<LinuxBoot, LinuxBootError> {
    let initrd = match guest.initrd {
        Some((ipa, len)) => Some((
            ipa,
            ipa.checked_add(len)
                .ok_or(LinuxBootError::Layout(LayoutError::InitrdOverlap))?,
        )),
        None => None,
    };
    let layout = plan(
        guest.ram_base,
        guest.ram_size,
        guest.kernel_head,
        guest.kernel_len,
        initrd,
    )
    .map_err(LinuxBootError::Layout)?;
    if layout.kernel.load != guest.kernel_ipa {
        return Err(LinuxBootError::KernelIpa {
            expected: layout.kernel.load,
            given: guest.kernel_ipa,
        });
    }
    let dtb = build_guest_dt(
        host_dtb,
        &GuestDtConfig {
            ram_base: guest.ram_base,
            ram_size: guest.ram_size,
            cpus: guest.cpus,
            bootargs: guest.bootargs,
            initrd,
            devices: guest.devices,
        },
    )
    .map_err(LinuxBootError::Dt)?;
    if dtb.len() as u64 > DTB_AREA {
        return Err(LinuxBootError::DtbTooLarge);
    }
    Ok(LinuxBoot {
        entry: layout.kernel.load,
        dtb_ipa: layout.dtb,
        dtb,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &[u8] = include_bytes!("../../testdata/qemu-virt-gicv3-2cpu.dtb");
    const MIB: u64 = 1024 * 1024;

    fn header() -> [u8; 64] {
        let mut h = [0u8; 64];
        h[16..24].copy_from_slice(&(33 * MIB).to_le_bytes());
        h[24] = 0b1010;
        h[56..60].copy_from_slice(b"ARM\x64");
        h
    }

    fn guest<'a>(head: &'a [u8], kernel_ipa: u64) -> LinuxGuest<'a> {
        LinuxGuest {
            ram_base: 0x5000_0000,
            ram_size: 256 * MIB,
            cpus: &[0, 1],
            kernel_head: head,
            kernel_len: 32 * MIB,
            kernel_ipa,
            initrd: Some((0x5fc0_0000, 0x1c_34f8)),
            bootargs: "console=ttyAMA0",
            devices: &["/pl011@9000000", "/intc@8000000", "/timer"],
        }
    }

    #[test]
    fn entry_dtb_and_initrd_agree_with_the_layout() {
        let h = header();
        let boot = prepare(HOST, &guest(&h, 0x5000_0000)).unwrap();
        assert_eq!(boot.entry, 0x5000_0000);
        assert_eq!(boot.dtb_ipa, 0x5fe0_0000);
        let fdt = fdt::Fdt::new(&boot.dtb).unwrap();
        let start = fdt.find_node("/chosen").unwrap();
        let end = start.property("linux,initrd-end").unwrap().value;
        assert_eq!(end, (0x5fc0_0000u64 + 0x1c_34f8).to_be_bytes());
    }

    #[test]
    fn kernel_at_the_wrong_ipa_is_refused() {
        let h = header();
        assert_eq!(
            prepare(HOST, &guest(&h, 0x5008_0000)),
            Err(LinuxBootError::KernelIpa {
                expected: 0x5000_0000,
                given: 0x5008_0000
            })
        );
        // The same file without a header is a raw binary: 0x8_0000 up.
        let raw = [0u8; 64];
        assert_eq!(
            prepare(HOST, &guest(&raw, 0x5008_0000)).map(|b| b.entry),
            Ok(0x5008_0000)
        );
    }

    #[test]
    fn initrd_over_the_dtb_is_refused() {
        let h = header();
        let mut g = guest(&h, 0x5000_0000);
        g.initrd = Some((0x5fd0_0000, 2 * MIB));
        assert_eq!(
            prepare(HOST, &g),
            Err(LinuxBootError::Layout(LayoutError::InitrdOverlap))
        );
        g.initrd = Some((u64::MAX - 10, 20));
        assert_eq!(
            prepare(HOST, &g),
            Err(LinuxBootError::Layout(LayoutError::InitrdOverlap))
        );
    }
}

//! Booting a Linux kernel as a guest: where the kernel, initrd and DTB go in guest RAM,
//! and the device tree the guest sees. See docs/linux-guest.md.

use core::fmt;

mod guest_dt;
pub mod image;
mod layout;

use alloc::vec::Vec;

use crate::config::{HostDt, Image, ImageSource, VmDesc};
use crate::mem::{Ipa, IpaRange, PhysAddr, PhysRange};

use guest_dt::{build_guest_dt, GuestDtConfig, GuestDtError};
use layout::{plan, GuestLayoutError, DTB_AREA};

/// A Linux guest as its VM description gives it.
#[derive(Clone, Copy, Debug)]
pub struct LinuxGuest<'a> {
    /// Guest RAM start.
    pub ram_base: Ipa,
    /// Guest RAM bytes.
    pub ram_size: u64,
    /// MPIDRs of the physical CPUs of the guest's vCPUs, in vCPU order.
    pub cpus: &'a [u64],
    /// The first bytes of the kernel file (at least the 64-byte header when it is longer).
    pub kernel_head: &'a [u8],
    /// Length of the kernel file.
    pub kernel_len: u64,
    /// IPA the description loads the kernel at.
    pub kernel_ipa: Ipa,
    /// Where the initrd is, if there is one.
    pub initrd: Option<IpaRange>,
    /// Kernel command line.
    pub bootargs: &'a str,
    /// Host DT paths of the guest's pass-through devices.
    pub devices: &'a [&'a str],
    /// Where the VM's virtual GIC is.
    pub gic: crate::config::GicIpa,
    /// IPA of the VM's virtual PL011, if any.
    pub vuart: Option<Ipa>,
}

/// How to start a Linux guest: vCPU 0 enters `entry` with x0 = `dtb_ipa`, where the
/// hypervisor has written `dtb`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinuxBoot {
    /// Entry point (the kernel's first byte).
    pub entry: Ipa,
    /// IPA of the DTB.
    pub dtb_ipa: Ipa,
    /// The guest DTB.
    pub dtb: Vec<u8>,
}

/// Why a Linux guest cannot be started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinuxBootError {
    /// The pieces do not fit in the guest's RAM.
    Layout(GuestLayoutError),
    /// The description loads the kernel elsewhere than its header requires.
    KernelIpa {
        /// Where the kernel has to go.
        expected: Ipa,
        /// Where the description put it.
        given: Ipa,
    },
    /// The guest DT could not be made.
    Dt(GuestDtError),
    /// The guest DT is larger than the 2 MiB the boot protocol allows.
    DtbTooLarge,
    /// A Linux guest has exactly one RAM region.
    RamRegions,
    /// No room for the DTB after the staged images.
    NoStagingRoom,
}

impl core::error::Error for LinuxBootError {}

impl fmt::Display for LinuxBootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Layout(e) => write!(f, "layout: {e}"),
            Self::KernelIpa { expected, given } => write!(
                f,
                "the kernel must be loaded at IPA {expected:#x}, not {given:#x}"
            ),
            Self::Dt(e) => write!(f, "device tree: {e}"),
            Self::DtbTooLarge => f.write_str("the guest device tree is larger than 2 MiB"),
            Self::RamRegions => f.write_str("a Linux guest has exactly one RAM region"),
            Self::NoStagingRoom => f.write_str("no room in the staging area for the DTB"),
        }
    }
}

/// Plans the boot of `guest` and writes its DTB from the host device tree `host`.
///
/// # Errors
/// [`LinuxBootError`] when the layout, the kernel's load address or the DT is wrong.
pub fn prepare(host: &HostDt<'_>, guest: &LinuxGuest<'_>) -> Result<LinuxBoot, LinuxBootError> {
    // The layout and the guest DT are plain arithmetic and cells in the guest's IPA
    // space: raw values from here on.
    let initrd = match guest.initrd {
        Some(r) => Some((
            r.base.get(),
            r.base
                .checked_add(r.size)
                .ok_or(LinuxBootError::Layout(GuestLayoutError::InitrdOverlap))?
                .get(),
        )),
        None => None,
    };
    let layout = plan(
        guest.ram_base.get(),
        guest.ram_size,
        guest.kernel_head,
        guest.kernel_len,
        initrd,
    )
    .map_err(LinuxBootError::Layout)?;
    if layout.kernel.load != guest.kernel_ipa.get() {
        return Err(LinuxBootError::KernelIpa {
            expected: Ipa::new(layout.kernel.load),
            given: guest.kernel_ipa,
        });
    }
    let dtb = build_guest_dt(
        host,
        &GuestDtConfig {
            ram_base: guest.ram_base.get(),
            ram_size: guest.ram_size,
            cpus: guest.cpus,
            bootargs: guest.bootargs,
            initrd,
            devices: guest.devices,
            gic: guest.gic,
            vuart: guest.vuart.map(Ipa::get),
        },
    )
    .map_err(LinuxBootError::Dt)?;
    if dtb.len() as u64 > DTB_AREA {
        return Err(LinuxBootError::DtbTooLarge);
    }
    Ok(LinuxBoot {
        entry: Ipa::new(layout.kernel.load),
        dtb_ipa: Ipa::new(layout.dtb),
        dtb,
    })
}

/// Completes the description of a VM that boots Linux (one with `bootargs` and no `dtb`):
/// checks the layout, sets the entry point, builds the guest DTB and adds it as a staged
/// image right after the last staged one of this VM, inside `staging` (and not below its
/// start: a caller staging several VMs' DTBs passes the part still free). Returns where
/// the caller must write the DTB bytes before the VM is created; `None` for other VMs.
///
/// `kernel_head` is the start of the staged kernel (its first 64 bytes suffice).
///
/// # Errors
/// [`LinuxBootError`] when the VM cannot boot Linux as described.
pub fn complete_desc(
    desc: &mut VmDesc,
    host: &HostDt<'_>,
    kernel_head: &[u8],
    staging: PhysRange,
) -> Result<Option<(PhysAddr, Vec<u8>)>, LinuxBootError> {
    let (Some(bootargs), None) = (&desc.bootargs, desc.dtb) else {
        return Ok(None);
    };
    let [ram] = desc.memory[..] else {
        return Err(LinuxBootError::RamRegions);
    };
    // The physical CPUs the vCPUs run on (their host cpu nodes give the properties);
    // vCPU i has virtual MPIDR Aff0 = i (crate::vm::psci).
    let mpidrs: Vec<u64> = desc.cpus.iter().map(|&c| u64::from(c)).collect();
    let devices: Vec<&str> = desc
        .devices
        .iter()
        .map(alloc::string::String::as_str)
        .collect();
    let boot = prepare(
        host,
        &LinuxGuest {
            ram_base: ram.ipa,
            ram_size: ram.size,
            cpus: &mpidrs,
            kernel_head,
            kernel_len: desc.kernel.size,
            kernel_ipa: desc.kernel.ipa,
            initrd: desc.initrd.map(|i| i.ipa_range()),
            bootargs,
            devices: &devices,
            gic: desc.gic,
            vuart: desc.vuart,
        },
    )?;
    let staged_end = [Some(desc.kernel), desc.initrd]
        .into_iter()
        .flatten()
        .filter_map(|i| i.staged_range())
        .map(|r| r.end())
        .max()
        .unwrap_or(staging.base);
    let pa = staged_end
        .max(staging.base)
        .checked_align_up(crate::mem::PAGE_SIZE)
        .ok_or(LinuxBootError::NoStagingRoom)?;
    let size = boot.dtb.len() as u64;
    if !staging.contains(&PhysRange::new(pa, size)) {
        return Err(LinuxBootError::NoStagingRoom);
    }
    desc.entry = boot.entry;
    desc.dtb = Some(Image {
        src: ImageSource::Staged(pa),
        size,
        ipa: boot.dtb_ipa,
    });
    Ok(Some((pa, boot.dtb)))
}

#[cfg(test)]
// The tests read trees they built (or the hypervisor wrote) with the crate's own lookups.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    use crate::config::dtb::qemu_virt;
    const MIB: u64 = 1024 * 1024;

    fn header() -> [u8; 64] {
        let mut h = [0u8; 64];
        h[16..24].copy_from_slice(&(33 * MIB).to_le_bytes());
        h[24] = 0b1010;
        h[56..60].copy_from_slice(b"ARM\x64");
        h
    }

    fn guest<'a>(head: &'a [u8], kernel_ipa: u64) -> LinuxGuest<'a> {
        let kernel_ipa = Ipa::new(kernel_ipa);
        LinuxGuest {
            ram_base: Ipa::new(0x5000_0000),
            ram_size: 256 * MIB,
            cpus: &[0, 1],
            kernel_head: head,
            kernel_len: 32 * MIB,
            kernel_ipa,
            initrd: Some(IpaRange::new(Ipa::new(0x5fc0_0000), 0x1c_34f8)),
            bootargs: "console=ttyAMA0",
            devices: &["/timer"],
            gic: crate::config::GicIpa::QEMU_VIRT,
            vuart: Some(Ipa::new(0x0900_0000)),
        }
    }

    #[test]
    fn entry_dtb_and_initrd_agree_with_the_layout() {
        let h = header();
        let boot = prepare(&qemu_virt(), &guest(&h, 0x5000_0000)).unwrap();
        assert_eq!(boot.entry, Ipa::new(0x5000_0000));
        assert_eq!(boot.dtb_ipa, Ipa::new(0x5fe0_0000));
        let fdt = fdt::Fdt::new(&boot.dtb).unwrap();
        let start = fdt.find_node("/chosen").unwrap();
        let end = start.property("linux,initrd-end").unwrap().value;
        assert_eq!(end, (0x5fc0_0000u64 + 0x1c_34f8).to_be_bytes());
    }

    #[test]
    fn kernel_at_the_wrong_ipa_is_refused() {
        let h = header();
        assert_eq!(
            prepare(&qemu_virt(), &guest(&h, 0x5008_0000)),
            Err(LinuxBootError::KernelIpa {
                expected: Ipa::new(0x5000_0000),
                given: Ipa::new(0x5008_0000)
            })
        );
        // The same file without a header is a raw binary: 0x8_0000 up.
        let raw = [0u8; 64];
        assert_eq!(
            prepare(&qemu_virt(), &guest(&raw, 0x5008_0000)).map(|b| b.entry),
            Ok(Ipa::new(0x5008_0000))
        );
    }

    fn linux_desc() -> VmDesc {
        use crate::config::{AbortPolicy, GuestRegion};
        VmDesc {
            name: "linux".into(),
            cpus: vec![0, 1],
            memory: vec![GuestRegion {
                ipa: Ipa::new(0x5000_0000),
                pa: PhysAddr::new(0x5000_0000),
                size: 256 * MIB,
            }],
            kernel: Image {
                src: ImageSource::Staged(PhysAddr::new(0x7000_0000)),
                size: 32 * MIB,
                ipa: Ipa::new(0x5000_0000),
            },
            entry: Ipa::new(0x5000_0000),
            initrd: Some(Image {
                src: ImageSource::Staged(PhysAddr::new(0x7200_0000)),
                size: 0x1c_34f8,
                ipa: Ipa::new(0x5fc0_0000),
            }),
            dtb: None,
            bootargs: Some("console=ttyAMA0".into()),
            arg: 0,
            abort: AbortPolicy::Stop,
            sharing: crate::config::SharingLimits::default(),
            stage2: crate::config::Stage2Mappings::Pages,
            vuart: Some(Ipa::new(0x0900_0000)),
            console_input: false,
            gic: crate::config::GicIpa::QEMU_VIRT,
            passthrough: vec![],
            devices: vec![],
            spis: vec![],
        }
    }

    /// [`complete_desc`] of `d` on QEMU virt with [`header`], staging from `staging`.
    fn complete_in(
        d: &mut VmDesc,
        staging: PhysRange,
    ) -> Result<Option<(PhysAddr, Vec<u8>)>, LinuxBootError> {
        complete_desc(d, &qemu_virt(), &header(), staging)
    }

    /// [`complete_in`] the 256 MiB from 0x7000_0000.
    fn complete(d: &mut VmDesc) -> Result<Option<(PhysAddr, Vec<u8>)>, LinuxBootError> {
        complete_in(d, PhysRange::new(PhysAddr::new(0x7000_0000), 256 * MIB))
    }

    #[test]
    fn a_linux_description_gets_its_dtb_staged_after_the_initrd() {
        let mut d = linux_desc();
        let (pa, dtb) = complete(&mut d).unwrap().unwrap();
        assert_eq!(
            pa,
            PhysAddr::new(0x721c_4000),
            "the page after the initrd's last byte"
        );
        assert_eq!(
            d.dtb,
            Some(Image {
                src: ImageSource::Staged(pa),
                size: dtb.len() as u64,
                ipa: Ipa::new(0x5fe0_0000)
            })
        );
        assert_eq!(d.boot_x0(), 0x5fe0_0000);
        assert_eq!(d.entry, Ipa::new(0x5000_0000));
        let fdt = fdt::Fdt::new(&dtb).unwrap();
        assert_eq!(fdt.cpus().count(), 2);
        assert!(fdt.find_node("/pl011@9000000").is_some());
        assert_eq!(fdt.chosen().bootargs(), Some("console=ttyAMA0"));
    }

    #[test]
    fn other_descriptions_are_left_alone_and_bad_ones_refused() {
        let mut d = linux_desc();
        d.bootargs = None;
        let before = d.clone();
        assert_eq!(complete(&mut d), Ok(None));
        assert_eq!(d, before);

        // A vCPU on another physical CPU than its index: vCPU 0 is still cpu@0.
        let mut d = linux_desc();
        d.cpus = vec![1];
        let (_, dtb) = complete(&mut d).unwrap().unwrap();
        let fdt = fdt::Fdt::new(&dtb).unwrap();
        let ids: Vec<usize> = fdt.cpus().map(|c| c.ids().first()).collect();
        assert_eq!(ids, [0]);
        let mut d = linux_desc();
        d.memory.push(d.memory[0]);
        assert_eq!(complete(&mut d), Err(LinuxBootError::RamRegions));
        let mut d = linux_desc();
        assert_eq!(
            complete_in(
                &mut d,
                PhysRange::new(PhysAddr::new(0x7000_0000), 0x21c_4000)
            ),
            Err(LinuxBootError::NoStagingRoom)
        );
        assert_eq!(d.dtb, None, "a refused description is unchanged");
    }

    #[test]
    fn initrd_over_the_dtb_is_refused() {
        let h = header();
        let mut g = guest(&h, 0x5000_0000);
        g.initrd = Some(IpaRange::new(Ipa::new(0x5fd0_0000), 2 * MIB));
        assert_eq!(
            prepare(&qemu_virt(), &g),
            Err(LinuxBootError::Layout(GuestLayoutError::InitrdOverlap))
        );
        g.initrd = Some(IpaRange::new(Ipa::new(u64::MAX - 10), 20));
        assert_eq!(
            prepare(&qemu_virt(), &g),
            Err(LinuxBootError::Layout(GuestLayoutError::InitrdOverlap))
        );
    }
}

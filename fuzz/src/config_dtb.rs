//! `config_dtb`: the host device tree as the hypervisor reads it at start-up, from
//! arbitrary bytes or from a valid QEMU `virt` tree with a few bytes changed.
//!
//! Input: byte 0 chooses the mode. Even: the rest of the input is the blob. Odd: byte 1
//! picks one of the [`FIXTURES`] and the rest are [`EDIT_LEN`]-byte edits to it (offset,
//! then a byte, a big-endian 32-bit value or a cut), so the header and most of the
//! structure stay valid and the parsers behind the first checks are reached.
//!
//! The tree goes through what start-up does with it: [`HostDt::new`], the hardware
//! ([`Hardware::parse`]), the VM descriptions ([`config::parse`]) and, for a VM with
//! `bootargs`, the Linux guest's device tree ([`linux::complete_desc`]). Nothing may
//! panic, and an accepted description must keep the rules `docs/vms.md` states, which
//! VM creation relies on without checking them again.

use hypervisor::config::fw_cfg::FwCfgFile;
use hypervisor::config::{self, Hardware, HostDt, HostRanges, ImageSource, VmDesc};
use hypervisor::linux;
use hypervisor::mem::layout::STAGING;
use hypervisor::mem::{PhysAddr, PhysRange, PAGE_SIZE};

use crate::input::Bytes;

/// Bytes of one edit: offset (3 bytes, little-endian, taken modulo the blob's length),
/// kind, value (4 bytes).
pub const EDIT_LEN: usize = 8;

/// Valid host device trees: QEMU 7.2 `virt` (GICv3) with 4 Cortex-A57s and 2 GiB, with
/// one `max` CPU and 512 MiB, with VM nodes under `/chosen`, with 2 CPUs, and the tree
/// `cargo xtask run --linux` writes (a Linux VM whose kernel and initrd are fw-cfg files).
pub const FIXTURES: [&[u8]; 5] = [
    include_bytes!("../../hypervisor/tests/fixtures/virt-gicv3-a57-smp4-2g.dtb"),
    include_bytes!("../../hypervisor/tests/fixtures/virt-gicv3-max-smp1-512m.dtb"),
    include_bytes!("../../hypervisor/tests/fixtures/virt-gicv3-with-vm-in-chosen.dtb"),
    include_bytes!("../../hypervisor/testdata/qemu-virt-gicv3-2cpu.dtb"),
    include_bytes!("../../hypervisor/tests/fixtures/virt-gicv3-linux-vm-fw-cfg.dtb"),
];

/// A 64-byte arm64 Image header (little endian, 4 KiB pages, anywhere in RAM, 32 MiB).
pub const IMAGE_HEADER: [u8; 64] = {
    let mut h = [0u8; 64];
    h[19] = 0x02; // image_size = 0x0200_0000
    h[24] = 0b1010;
    h[56] = b'A';
    h[57] = b'R';
    h[58] = b'M';
    h[59] = 0x64;
    h
};

/// Runs one input.
///
/// # Panics
///
/// When a parser panics or accepts a description that breaks its rules.
pub fn run(data: &[u8]) {
    check_tree(&mut blob(data));
}

/// The device tree an input stands for (to turn a crash into a regression test).
#[must_use]
pub fn blob(data: &[u8]) -> Vec<u8> {
    let mut b = Bytes::new(data);
    if b.u8().is_multiple_of(2) {
        return b.rest().to_vec();
    }
    let base = FIXTURES[usize::from(b.u8()) % FIXTURES.len()];
    let mut blob = base.to_vec();
    while let Some(e) = b.record::<EDIT_LEN>() {
        edit(&mut blob, e);
    }
    blob
}

/// Applies one edit to `blob`.
fn edit(blob: &mut Vec<u8>, e: [u8; EDIT_LEN]) {
    if blob.is_empty() {
        return;
    }
    let at = (usize::from(e[0]) | usize::from(e[1]) << 8 | usize::from(e[2]) << 16) % blob.len();
    let value = [e[4], e[5], e[6], e[7]];
    match e[3] % 4 {
        0 => blob[at] = e[4],
        // A small big-endian number: lengths, offsets, cell counts, phandles.
        1 => {
            let small = u32::from(e[4]).to_be_bytes();
            let end = (at + 4).min(blob.len());
            blob[at..end].copy_from_slice(&small[..end - at]);
        }
        2 => {
            let end = (at + 4).min(blob.len());
            blob[at..end].copy_from_slice(&value[..end - at]);
        }
        _ => blob.truncate(at.max(1)),
    }
}

/// What QEMU's fw-cfg directory holds when the xtask gives a kernel and an initrd by
/// name.
fn fw_cfg_files() -> [FwCfgFile; 2] {
    [
        FwCfgFile {
            name: "opt/twostage/kernel".into(),
            select: 0x20,
            size: 0x3000,
        },
        FwCfgFile {
            name: "opt/twostage/initrd".into(),
            select: 0x21,
            size: 0x1000,
        },
    ]
}

/// What start-up does with a host tree; panics on a broken rule.
pub fn check_tree(blob: &mut [u8]) {
    let Ok(dt) = HostDt::new(blob) else {
        return;
    };
    let ram: Vec<PhysRange> = match Hardware::parse(&dt) {
        Ok(hw) => {
            check_hardware(&hw);
            hw.memory().to_vec()
        }
        Err(_) => vec![PhysRange::new(PhysAddr::new(0x4000_0000), 0x8000_0000)],
    };
    let files = fw_cfg_files();
    let ranges = HostRanges {
        ram: &ram,
        staging: STAGING,
        console: Some(PhysRange::new(PhysAddr::new(0x0900_0000), 0x1000)),
        files: &files,
    };
    let Ok(mut vms) = config::parse(&dt, &ranges) else {
        return;
    };
    check_descs(&vms, &ranges);
    for vm in &mut vms {
        let before = vm.clone();
        match linux::complete_desc(vm, &dt, &IMAGE_HEADER, STAGING) {
            Ok(Some((pa, dtb))) => {
                let placed = vm.dtb.map(|d| (d.src, d.size));
                assert_eq!(
                    placed,
                    Some((ImageSource::Staged(pa), dtb.len() as u64)),
                    "the DTB image of {}",
                    vm.name
                );
                assert!(STAGING.contains(&PhysRange::new(pa, dtb.len() as u64)));
                assert!(
                    fdt::Fdt::new(&dtb).is_ok(),
                    "the guest DTB of {} parses",
                    vm.name
                );
                let in_ram = vm
                    .dtb
                    .is_some_and(|d| vm.ram_region(d.ipa, d.size).is_some());
                assert!(in_ram, "the guest DTB of {} lies in its RAM", vm.name);
            }
            Ok(None) | Err(_) => assert_eq!(*vm, before, "a refused Linux VM is unchanged"),
        }
    }
}

fn check_hardware(hw: &Hardware) {
    for r in hw.memory() {
        assert!(
            r.size > 0 && r.base.get().checked_add(r.size).is_some(),
            "RAM range {r:?}"
        );
    }
}

fn overlaps(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
    a < b.saturating_add(b_len) && b < a.saturating_add(a_len)
}

/// The rules of docs/vms.md that VM creation relies on.
fn check_descs(vms: &[VmDesc], ranges: &HostRanges<'_>) {
    for (i, vm) in vms.iter().enumerate() {
        let name = &vm.name;
        // docs/vms.md: 1 to 32 characters.
        assert!(!name.is_empty() && name.len() <= 32, "name {name:?}");
        assert!(!vm.cpus.is_empty(), "{name}: no CPU");
        assert!(!vm.memory.is_empty(), "{name}: no RAM");
        let aligned = |v: u64| v.is_multiple_of(PAGE_SIZE);
        // The oracle's own arithmetic on raw values, independent of the ranges the
        // checks under test use.
        for (j, r) in vm.memory.iter().enumerate() {
            let (r_ipa, r_pa) = (r.ipa.get(), r.pa.get());
            assert!(
                r.size > 0 && aligned(r_ipa | r_pa | r.size),
                "{name}: RAM {r:?}"
            );
            assert!(r_ipa.checked_add(r.size).is_some() && r_pa.checked_add(r.size).is_some());
            for o in &vm.memory[j + 1..] {
                assert!(
                    !overlaps(r_ipa, r.size, o.ipa.get(), o.size),
                    "{name}: RAM IPAs overlap"
                );
                assert!(
                    !overlaps(r_pa, r.size, o.pa.get(), o.size),
                    "{name}: RAM PAs overlap"
                );
            }
            for o in vms[i + 1..].iter().flat_map(|v| &v.memory) {
                assert!(
                    !overlaps(r_pa, r.size, o.pa.get(), o.size),
                    "{name}: RAM of two VMs"
                );
            }
        }
        for p in &vm.passthrough {
            assert!(
                p.size > 0 && aligned(p.ipa.get() | p.pa.get() | p.size),
                "{name}: pass-through {p:?}"
            );
            for r in &vm.memory {
                assert!(
                    !overlaps(p.ipa.get(), p.size, r.ipa.get(), r.size),
                    "{name}: device over RAM"
                );
            }
            for h in ranges.ram {
                assert!(
                    !overlaps(p.pa.get(), p.size, h.base.get(), h.size),
                    "{name}: device over host RAM"
                );
            }
        }
        for img in [Some(vm.kernel), vm.initrd, vm.dtb].into_iter().flatten() {
            assert!(
                vm.ram_region(img.ipa, img.size).is_some(),
                "{name}: image outside RAM"
            );
            assert!(
                img.staged_range()
                    .is_none_or(|r| ranges.staging.contains(&r)),
                "{name}: image outside staging"
            );
            if let ImageSource::FwCfg(select) = img.src {
                assert!(
                    ranges
                        .files
                        .iter()
                        .any(|f| f.select == select && u64::from(f.size) == img.size),
                    "{name}: an fw-cfg image that is not a file of the directory"
                );
            }
        }
        assert!(
            vm.ram_region(vm.entry, 4).is_some(),
            "{name}: entry outside RAM"
        );
        if let Some(u) = vm.vuart {
            let u = u.get();
            assert!(aligned(u), "{name}: vuart {u:#x}");
            for r in &vm.memory {
                assert!(
                    !overlaps(u, PAGE_SIZE, r.ipa.get(), r.size),
                    "{name}: vuart over RAM"
                );
            }
        }
        for o in &vms[i + 1..] {
            assert_ne!(&o.name, name, "two VMs named {name}");
            assert!(
                !o.cpus.iter().any(|c| vm.cpus.contains(c)),
                "a CPU of two VMs"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Linux fixture reaches the checks with both images taken from the directory,
    /// so the fuzzer's edits of it exercise images given by fw-cfg name.
    #[test]
    fn the_linux_fixture_names_its_images_by_fw_cfg_file() {
        let mut blob = FIXTURES[4].to_vec();
        let dt = HostDt::new(&mut blob).expect("a device tree");
        let files = fw_cfg_files();
        let ranges = HostRanges {
            ram: &[PhysRange::new(PhysAddr::new(0x4000_0000), 0x8000_0000)],
            staging: STAGING,
            console: None,
            files: &files,
        };
        let vms = config::parse(&dt, &ranges).expect("valid");
        let [vm] = &vms[..] else { panic!("{vms:?}") };
        assert_eq!(vm.kernel.src, ImageSource::FwCfg(0x20));
        assert_eq!(vm.kernel.size, 0x3000);
        assert_eq!(vm.initrd.map(|i| i.src), Some(ImageSource::FwCfg(0x21)));
    }
}

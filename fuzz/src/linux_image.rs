//! `linux_image`: the arm64 Image header, the kernel's placement and the Linux guest's
//! boot layout and device tree (`hypervisor::linux`), for a kernel file and a guest whose
//! every number comes from the input, over a valid QEMU `virt` host tree.
//!
//! Input: a [`HEADER_LEN`]-byte guest record (below), the 64-byte kernel head, then the
//! command line (the rest, at most 256 bytes).
//!
//! Checked: [`place_kernel`] puts the kernel inside RAM (2 MiB aligned base plus
//! `text_offset` for an Image with a size), and refuses what does not fit; a prepared
//! boot has its entry at the kernel, its DTB area inside RAM clear of the kernel and the
//! initrd, and a DTB of at most 2 MiB that parses and says what was asked (RAM, CPUs,
//! command line, initrd, devices). Nothing panics.

use hypervisor::config::HostDt;
use hypervisor::linux::image::{place_kernel, ImageHeader, KernelKind, IMAGE_BASE_ALIGN};
use hypervisor::linux::{self, LinuxGuest};
use hypervisor::mem::{Ipa, IpaRange};

use crate::config_dtb::FIXTURES;
use crate::input::{pick, Bytes};

/// Bytes of the guest record: fixture, RAM base (9 bytes), RAM size (9), vCPUs, kernel
/// length (9), kernel IPA, initrd (kind + 2 values of 9), devices (mask + 9-byte path
/// choice).
pub const HEADER_LEN: usize = 64;

/// Bytes of the DTB area (booting.rst: at most 2 MiB).
const DTB_AREA: u64 = 2 << 20;
const MIB: u64 = 1 << 20;

const RAM_BASES: [u64; 6] = [
    0x4000_0000,
    0x5000_0000,
    0x4000_1000,
    0,
    0xffff_ffff_ffe0_0000,
    0x1_0000_0000,
];
const RAM_SIZES: [u64; 6] = [256 * MIB, 64 * MIB, 4 * MIB, 2 * MIB, 0x1000, 0];
const KERNEL_LENS: [u64; 5] = [32 * MIB, 0x1000, 0, 2 * MIB + 1, 255 * MIB];

/// The guest record of a seed: fixture, then the option index (0xff: raw value) and raw
/// value of RAM base, RAM size, vCPUs, kernel length, kernel IPA choice (0 to 2: where
/// the kernel goes), initrd kind (0 none, 1 below the DTB, 2 and 3 raw), the raw initrd
/// start and length, device mask and extra-path choice.
#[must_use]
pub fn record(
    fields: [(u8, u64); 6],
    ipa: u8,
    initrd: (u8, u64, u64),
    devices: (u8, u8),
) -> Vec<u8> {
    let mut r = vec![fields[0].0];
    for &(sel, raw) in &fields[1..3] {
        r.push(sel);
        r.extend_from_slice(&raw.to_le_bytes());
    }
    r.push(fields[3].0);
    r.push(fields[4].0);
    r.extend_from_slice(&fields[4].1.to_le_bytes());
    r.push(ipa);
    r.push(initrd.0);
    r.extend_from_slice(&initrd.1.to_le_bytes());
    r.extend_from_slice(&initrd.2.to_le_bytes());
    r.push(devices.0);
    r.push(devices.1);
    r.resize(HEADER_LEN, 0);
    r
}

/// A value chosen from `options` by the first byte, or the next 8 bytes raw when that
/// byte is 0xff.
fn value(b: &mut Bytes<'_>, options: &[u64]) -> u64 {
    let sel = b.u8();
    let raw = b.u64();
    if sel == 0xff {
        raw
    } else {
        pick(options, sel)
    }
}

/// Runs one input.
///
/// # Panics
///
/// When a layout or device-tree rule breaks, or something panics.
pub fn run(data: &[u8]) {
    let mut b = Bytes::new(data);
    let Some(head) = b.record::<HEADER_LEN>() else {
        return;
    };
    let kernel_head = b.record::<64>().unwrap_or([0; 64]);
    let rest = b.rest();
    let bootargs = String::from_utf8_lossy(&rest[..rest.len().min(256)]).into_owned();
    let mut h = Bytes::new(&head);
    let fixture = FIXTURES[usize::from(h.u8()) % FIXTURES.len()];
    let ram_base = value(&mut h, &RAM_BASES);
    let ram_size = value(&mut h, &RAM_SIZES);
    let ncpus = usize::from(h.u8() % 6);
    let kernel_len = value(&mut h, &KERNEL_LENS);
    let ipa_sel = h.u8();
    let initrd_kind = h.u8();
    let (i0, i1) = (h.u64(), h.u64());
    let device_mask = h.u8();
    let odd_path = h.u8();

    check_placement(&kernel_head, kernel_len, ram_base, ram_size);

    let mut blob = fixture.to_vec();
    let Ok(host) = HostDt::new(&mut blob) else {
        panic!("a committed fixture is a valid device tree");
    };
    let placed = place_kernel(&kernel_head, kernel_len, ram_base, ram_size);
    // Mostly where the kernel has to go, sometimes elsewhere.
    let kernel_ipa = match (ipa_sel % 4, placed) {
        (0..=2, Ok(p)) => p.load,
        _ => ram_base.wrapping_add(u64::from(ipa_sel) * 0x1000),
    };
    let ram_end = ram_base.wrapping_add(ram_size);
    let initrd = match initrd_kind % 4 {
        0 => None,
        // Just below the DTB area, where the scripts put it.
        1 => Some((
            (ram_end & !(DTB_AREA - 1)).wrapping_sub(DTB_AREA + MIB),
            MIB,
        )),
        2 => Some((i0, i1 & 0xfff_ffff)),
        _ => Some((i0, i1)),
    };
    let cpus: Vec<u64> = (0..ncpus as u64).collect();
    let names = top_level_nodes(&host);
    let mut devices: Vec<&str> = names
        .iter()
        .enumerate()
        .filter(|(i, _)| device_mask & (1 << (i % 8)) != 0 && i % 3 == usize::from(odd_path % 3))
        .map(|(_, n)| n.as_str())
        .collect();
    match odd_path % 8 {
        5 => devices.push("/chosen"),
        6 => devices.push("/no-such-node"),
        7 => devices.push(""),
        _ => {}
    }
    let guest = LinuxGuest {
        ram_base: Ipa::new(ram_base),
        ram_size,
        cpus: &cpus,
        kernel_head: &kernel_head,
        kernel_len,
        kernel_ipa: Ipa::new(kernel_ipa),
        initrd: initrd.map(|(start, len)| IpaRange::new(Ipa::new(start), len)),
        bootargs: &bootargs,
        devices: &devices,
        gic: hypervisor::config::GicIpa::QEMU_VIRT,
        vuart: odd_path.is_multiple_of(2).then_some(Ipa::new(0x0900_0000)),
    };
    if let Ok(boot) = linux::prepare(&host, &guest) {
        check_boot(&guest, &boot);
    }
}

/// `/name@addr` of every top-level node of the host tree.
fn top_level_nodes(host: &HostDt<'_>) -> Vec<String> {
    let Some(root) = host.fdt().all_nodes().next() else {
        return Vec::new();
    };
    root.children().map(|n| format!("/{}", n.name)).collect()
}

fn check_placement(head: &[u8], len: u64, ram_base: u64, ram_size: u64) {
    let parsed = ImageHeader::parse(head);
    assert_eq!(
        parsed.is_some(),
        head.len() >= 64 && head[56..60] == *b"ARM\x64",
        "an Image is recognised by its magic"
    );
    let Ok(p) = place_kernel(head, len, ram_base, ram_size) else {
        return;
    };
    let ram_end = ram_base
        .checked_add(ram_size)
        .expect("placed in a RAM range that fits");
    assert!(len > 0, "an empty kernel is placed");
    assert!(
        p.load >= ram_base && p.load < p.end && p.end <= ram_end,
        "{p:x?} outside RAM"
    );
    match p.kind {
        KernelKind::Image(h) if h.image_size != 0 => {
            assert!(!h.big_endian(), "a big-endian kernel is placed");
            assert_eq!(
                (p.load - h.text_offset) % IMAGE_BASE_ALIGN,
                0,
                "{p:x?}: base"
            );
            assert_eq!(p.end - p.load, h.image_size.max(len), "{p:x?}: size");
        }
        _ => assert_eq!(p.end - p.load, len, "{p:x?}: a raw kernel's size"),
    }
}

fn check_boot(guest: &LinuxGuest<'_>, boot: &linux::LinuxBoot) {
    // The oracle's own arithmetic, on raw IPAs.
    let ram_base = guest.ram_base.get();
    let dtb_ipa = boot.dtb_ipa.get();
    let ram_end = ram_base + guest.ram_size;
    assert_eq!(boot.entry, guest.kernel_ipa, "entry at the kernel");
    let Ok(p) = place_kernel(
        guest.kernel_head,
        guest.kernel_len,
        ram_base,
        guest.ram_size,
    ) else {
        panic!("a prepared boot has a placed kernel");
    };
    assert!(dtb_ipa >= p.end, "the DTB area overlaps the kernel");
    assert!(dtb_ipa + DTB_AREA <= ram_end, "the DTB area leaves RAM");
    assert!(
        boot.dtb.len() as u64 <= DTB_AREA,
        "the DTB is larger than its area"
    );
    if let Some((start, len)) = guest.initrd.map(|r| (r.base.get(), r.size)) {
        let end = start + len;
        assert!(
            start >= ram_base && end <= ram_end && len > 0,
            "initrd outside RAM"
        );
        assert!(end <= p.load || start >= p.end, "initrd over the kernel");
        assert!(
            end <= dtb_ipa || start >= dtb_ipa + DTB_AREA,
            "initrd over the DTB"
        );
    }
    let Ok(dt) = fdt::Fdt::new(&boot.dtb) else {
        panic!("the guest DTB does not parse");
    };
    let nodes: Vec<_> = dt.all_nodes().collect();
    let cpus = nodes.iter().filter(|n| n.name.starts_with("cpu@")).count();
    assert_eq!(cpus, guest.cpus.len(), "one cpu node per vCPU");
    let chosen = nodes.iter().find(|n| n.name == "chosen");
    let args = chosen
        .and_then(|c| c.property("bootargs"))
        .map(|p| p.value.split(|&b| b == 0).next().unwrap_or(&[]).to_vec());
    assert_eq!(args.as_deref(), Some(guest.bootargs.as_bytes()), "bootargs");
    let memory = nodes
        .iter()
        .filter(|n| n.name.starts_with("memory"))
        .count();
    assert_eq!(memory, 1, "one memory node");
    for d in guest.devices {
        let name = d.trim_start_matches('/');
        assert!(
            nodes.iter().any(|n| n.name == name),
            "device {d} in the guest DTB"
        );
    }
}

//! The hypervisor's own stage-1 (EL2) address space, as a list of identity mappings with
//! their permissions. Building the list is plain logic (tested here); the start-up code
//! hands each entry to the `mmu` crate.
//!
//! Policy: text is read+execute, rodata read-only, everything writable is execute-never,
//! devices are Device-nGnRE and execute-never, and no mapping is writable and executable.

use alloc::vec::Vec;
use core::fmt;

use boot::ImageLayout;

use crate::mem::layout::{self, HypMemory};
use crate::mem::window;
use crate::mem::{PhysAddr, PhysRange, VirtAddr, PAGE_SIZE};

/// Access permissions of a hypervisor mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)] // the names are the permissions
pub enum Access {
    /// Read and execute (code).
    ReadExecute,
    /// Read only, execute-never.
    ReadOnly,
    /// Read and write, execute-never.
    ReadWrite,
}

/// Memory type of a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Memory {
    /// Normal memory, inner and outer write-back cacheable, inner shareable.
    Normal,
    /// Device-nGnRE.
    Device,
}

/// One identity mapping of the hypervisor's address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// What it is, for the log.
    pub name: &'static str,
    /// The physical (= virtual) range, page aligned.
    pub region: PhysRange,
    /// Permissions.
    pub access: Access,
    /// Memory type.
    pub memory: Memory,
}

impl Mapping {
    /// Permissions and memory type as the log writes them.
    fn kind(&self) -> (&'static str, &'static str) {
        let perms = match self.access {
            Access::ReadExecute => "R-X",
            Access::ReadOnly => "R--",
            Access::ReadWrite => "RW-",
        };
        let mem = match self.memory {
            Memory::Normal => "normal",
            Memory::Device => "device-nGnRE",
        };
        (perms, mem)
    }
}

impl fmt::Display for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (perms, mem) = self.kind();
        write!(f, "{:<10} {} {perms} {mem}", self.name, self.region)
    }
}

/// Mappings as the start-up log shows them: one line for a run of mappings of one name,
/// size and kind with unmapped gaps between them (the per-CPU stacks and their guard
/// pages), the rest one line each.
pub fn log_lines(maps: &[Mapping]) -> impl Iterator<Item = LogLine<'_>> {
    maps.chunk_by(|a, b| {
        a.name == b.name
            && a.region.size == b.region.size
            && a.access == b.access
            && a.memory == b.memory
            && b.region.base > a.region.end()
    })
    .map(LogLine)
}

/// One line of [`log_lines`].
pub struct LogLine<'a>(&'a [Mapping]);

impl fmt::Display for LogLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            [first, .., last] => {
                let (perms, mem) = first.kind();
                write!(
                    f,
                    "{:<10} [{:#010x}, {:#010x}) {} × {} KiB with unmapped gaps between, {perms} {mem}",
                    first.name,
                    first.region.base,
                    last.region.end(),
                    self.0.len(),
                    first.region.size / 1024
                )
            }
            [one] => write!(f, "{one}"),
            [] => Ok(()),
        }
    }
}

/// Why the mapping list is inconsistent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanError {
    /// A region is not page aligned.
    Misaligned(&'static str),
    /// Two regions overlap.
    Overlap(&'static str, &'static str),
}

impl core::error::Error for PlanError {}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Misaligned(n) => write!(f, "mapping {n} is not page aligned"),
            Self::Overlap(a, b) => write!(f, "mappings {a} and {b} overlap"),
        }
    }
}

const STACK: u64 = boot::STACK_SIZE as u64;

/// If `addr` lies in the unmapped guard page below a CPU's stack (the stacks start at
/// `image.data_end`), that CPU's index: the fault was a stack overflow.
#[must_use]
pub fn stack_guard_owner(image: &ImageLayout, addr: VirtAddr) -> Option<usize> {
    // The stage 1 is an identity map: the image's physical addresses are its virtual ones.
    let addr = addr.get();
    if addr >= image.image_end {
        return None;
    }
    let offset = addr.checked_sub(image.data_end)?;
    (offset % STACK < PAGE_SIZE).then_some((offset / STACK) as usize)
}

/// Virtual address bits of the hypervisor's stage 1 (`TCR_EL2.T0SZ` = 25): a 3-level
/// walk from level 1 that identity-maps the first 512 GiB of physical addresses.
pub const VA_BITS: u8 = 39;

/// `SCTLR_EL2` (E2H = 0) with the MMU on: M (bit 0), C (bit 2), SA (bit 3), I (bit 12) and
/// WXN (bit 19), plus the RES1 bits \[29:28\], \[23:22\], 18, 16, 11 and \[5:4\] (DDI 0487,
/// register description "SCTLR_EL2, System Control Register (EL2)"). EE = 0: little
/// endian. With WXN, any writable page is also execute-never, whatever its descriptor says.
pub const SCTLR_EL2_MMU_ON: u64 =
    0x30c5_0830 | (1 << 0) | (1 << 2) | (1 << 3) | (1 << 12) | (1 << 19);

/// `SCTLR_EL2.ATA` (bit 43, E2H = 0): allocation tag access at EL2 is not trapped
/// (FEAT_MTE2; DDI 0487, "SCTLR_EL2"). Set on CPUs with FEAT_MTE2, so that the scrub of
/// guest RAM can clear its tags; `TCF` (bits \[41:40\]) stays 0: EL2's own accesses are
/// never tag checked.
pub const SCTLR_EL2_ATA: u64 = 1 << 43;

/// `SCTLR_EL2` with the MMU on: [`SCTLR_EL2_MMU_ON`], with [`SCTLR_EL2_ATA`] on a CPU
/// with FEAT_MTE2 (`mte2`).
#[must_use]
pub const fn sctlr_el2(mte2: bool) -> u64 {
    if mte2 {
        SCTLR_EL2_MMU_ON | SCTLR_EL2_ATA
    } else {
        SCTLR_EL2_MMU_ON
    }
}

/// `MAIR_EL2`: `mmu`'s value, whose attribute 4 ([`mmu::MemoryType::NormalTagged`]) is
/// Tagged Normal memory (`0xF0`) on a CPU with FEAT_MTE2 (`mte2`) and plain write-back
/// Normal memory elsewhere, where `0xF0` is not defined.
#[must_use]
pub const fn mair_el2(mte2: bool) -> u64 {
    if mte2 {
        mmu::MAIR_VALUE_TAGGED
    } else {
        mmu::MAIR_VALUE
    }
}

/// The output address size for `TCR_EL2.PS` from `ID_AA64MMFR0_EL1.PARange` (bits
/// \[3:0\]): 32, 36, 40, 42, 44 or 48 bits; larger ranges are used as 48 bits.
#[must_use]
pub const fn pa_bits(id_aa64mmfr0: u64) -> u8 {
    match id_aa64mmfr0 & 0xf {
        0 => 32,
        1 => 36,
        2 => 40,
        3 => 42,
        4 => 44,
        _ => 48,
    }
}

/// The `mmu` attributes of a mapping.
#[must_use]
pub fn attributes(m: &Mapping) -> mmu::Attributes {
    use mmu::{MemoryType, Permissions};
    let perms = match m.access {
        Access::ReadExecute => Permissions::READ | Permissions::EXEC_EL2,
        Access::ReadOnly => Permissions::RO,
        Access::ReadWrite => Permissions::RW,
    };
    let memory = match m.memory {
        Memory::Normal => MemoryType::Normal,
        Memory::Device => MemoryType::DeviceNGnRE,
    };
    mmu::Attributes::new(perms, memory)
}

/// Enters every mapping into `table` (identity: VA = PA), refusing writable+executable
/// attributes (`MapFlags::WXN`), then makes every 1 GiB region that holds mappings but
/// no executable one execute-never as a whole (XNTable, `XN_TABLE_SPAN`): whatever is
/// mapped there later cannot run at EL2 either.
///
/// # Errors
///
/// The first `mmu` error (out of frames, overlap, ...), with the mapping it concerns
/// (`xn-table` for a region's table attribute); earlier mappings stay.
pub fn build<A: mmu::FrameAllocator, T: mmu::TlbMaintenance>(
    table: &mut mmu::PageTable<mmu::El2, A, T>,
    maps: &[Mapping],
) -> Result<(), (Mapping, mmu::Error)> {
    // The `mmu` boundary: identity, each mapping's VA is its PA.
    for m in maps {
        table
            .map(
                m.region.base.get(),
                m.region.base.get(),
                m.region.size,
                attributes(m),
                mmu::MapFlags::WXN,
            )
            .map_err(|e| (*m, e))?;
    }
    for region in execute_never_regions(maps) {
        table
            .set_table_attrs(region.base.get(), region.size, mmu::TableAttrs::NO_EXEC_EL2)
            .map_err(|e| {
                let m = Mapping {
                    name: "xn-table",
                    region,
                    access: Access::ReadWrite,
                    memory: Memory::Normal,
                };
                (m, e)
            })?;
    }
    Ok(())
}

/// Span of the regions [`build`] makes execute-never with a table attribute: one level-1
/// entry of the 39-bit table.
pub const XN_TABLE_SPAN: u64 = 1 << 30;

/// The [`XN_TABLE_SPAN`]-aligned regions that hold some mapping but no executable one,
/// in ascending order.
#[must_use]
pub fn execute_never_regions(maps: &[Mapping]) -> Vec<PhysRange> {
    let mut regions: Vec<u64> = Vec::new();
    for m in maps.iter().filter(|m| m.region.size > 0) {
        let first = m.region.base.get() / XN_TABLE_SPAN;
        // `size > 0`: the region's last byte is `end - 1`.
        let last = m.region.end().get().saturating_sub(1) / XN_TABLE_SPAN;
        regions.extend(first..=last);
    }
    regions.sort_unstable();
    regions.dedup();
    regions
        .into_iter()
        // `r` is an address divided by the span: the product is exact.
        .map(|r| {
            PhysRange::new(
                PhysAddr::new(r.saturating_mul(XN_TABLE_SPAN)),
                XN_TABLE_SPAN,
            )
        })
        .filter(|r| {
            !maps
                .iter()
                .any(|m| m.access == Access::ReadExecute && m.region.overlaps(r))
        })
        .collect()
}

/// The whole pages covering `[base, end)`: its end rounded up to a page, or to the last
/// page boundary below 2^64 for a range that reaches into the last page.
const fn page_range(base: PhysAddr, end: PhysAddr) -> PhysRange {
    let base = base.align_down(PAGE_SIZE);
    let end = match end.checked_align_up(PAGE_SIZE) {
        Some(end) => end,
        None => PhysAddr::new(!(PAGE_SIZE - 1)),
    };
    PhysRange::from_to(base, end)
}

/// What the hypervisor maps besides its own memory: the device tree, the staging range
/// (the part of it in RAM), and the devices it drives.
#[derive(Clone, Copy, Debug)]
pub struct Machine<'a> {
    /// Where the device tree lies.
    pub dtb: PhysRange,
    /// The RAM banks.
    pub ram: &'a [PhysRange],
    /// The devices it drives (name for the log, MMIO range), mapped Device-nGnRE.
    pub devices: &'a [(&'static str, PhysRange)],
}

/// The hypervisor's mappings: its image by section, heap, page-table frames, the device
/// tree, the staging range (read-write, execute-never: the images it copies into VMs) and
/// the devices it drives (UART, GIC). Nothing of the guest RAM pool
/// ([`layout::guest_ram`]) is mapped; [`window_base`] places the window through which
/// EL2 reaches it.
///
/// # Errors
///
/// [`PlanError`] if two mappings overlap or one is not page aligned.
pub fn plan(
    image: &ImageLayout,
    mem: &HypMemory,
    machine: &Machine<'_>,
) -> Result<Vec<Mapping>, PlanError> {
    let mut maps = Vec::new();
    // `boot`'s image layout is raw linker addresses: physical ones.
    let pa = PhysAddr::new;
    let mut add = |name, region: PhysRange, access, memory| {
        if region.size > 0 {
            maps.push(Mapping {
                name,
                region,
                access,
                memory,
            });
        }
    };
    add(
        "text",
        PhysRange::from_to(pa(image.text_start), pa(image.text_end)),
        Access::ReadExecute,
        Memory::Normal,
    );
    add(
        "rodata",
        PhysRange::from_to(pa(image.text_end), pa(image.rodata_end)),
        Access::ReadOnly,
        Memory::Normal,
    );
    add(
        "data+bss",
        PhysRange::from_to(pa(image.rodata_end), pa(image.data_end)),
        Access::ReadWrite,
        Memory::Normal,
    );
    // One stack per CPU from `data_end`, each with its lowest page left unmapped as a
    // guard: an overflow faults instead of running into the neighbouring stack.
    let mut base = image.data_end;
    for _ in 0..boot::MAX_CPUS {
        let Some(end) = base
            .checked_add(STACK)
            .filter(|&end| end <= image.image_end)
        else {
            break;
        };
        add(
            "stack",
            PhysRange::from_to(pa(base.saturating_add(PAGE_SIZE)), pa(end)),
            Access::ReadWrite,
            Memory::Normal,
        );
        base = end;
    }
    add("heap", mem.heap, Access::ReadWrite, Memory::Normal);
    add("pt-frames", mem.frames, Access::ReadWrite, Memory::Normal);
    let dtb = page_range(machine.dtb.base, machine.dtb.end());
    add("dtb", dtb, Access::ReadOnly, Memory::Normal);
    // Of the RAM above its own, the hypervisor maps only the staging range (read-write:
    // it stages the device trees it generates there). Guest RAM is not mapped: EL2
    // reaches it through the window (`crate::mem::window`), a chunk at a time.
    for r in layout::staging_ram(machine.ram, mem, machine.dtb) {
        add("staging", r, Access::ReadWrite, Memory::Normal);
    }
    for &(name, range) in machine.devices {
        add(
            name,
            page_range(range.base, range.end()),
            Access::ReadWrite,
            Memory::Device,
        );
    }
    check(&maps)?;
    Ok(maps)
}

/// Checks the policy on a list of mappings.
///
/// # Errors
///
/// The first violation found.
pub fn check(maps: &[Mapping]) -> Result<(), PlanError> {
    let mut rest = maps;
    while let Some((m, later)) = rest.split_first() {
        if !m.region.base.is_aligned(PAGE_SIZE) || m.region.size % PAGE_SIZE != 0 {
            return Err(PlanError::Misaligned(m.name));
        }
        if let Some(o) = later.iter().find(|o| o.region.overlaps(&m.region)) {
            return Err(PlanError::Overlap(m.name, o.name));
        }
        rest = later;
    }
    Ok(())
}

/// The start of the guest-RAM window's region ([`window::SPAN`] bytes, aligned): the
/// highest such region of the [`VA_BITS`] address space that holds none of `maps` and
/// no RAM of `ram` (so that no physical address of RAM, guest RAM included, is ever a
/// valid EL2 virtual address outside the window). `None` if there is none.
#[must_use]
pub fn window_base(maps: &[Mapping], ram: &[PhysRange]) -> Option<u64> {
    let regions = (1u64 << VA_BITS) / window::SPAN;
    (0..regions)
        .rev()
        .map(|i| i.saturating_mul(window::SPAN))
        .find(|&base| {
            // Identity map: the region's VAs are the PAs a mapping or RAM would have.
            let r = PhysRange::new(PhysAddr::new(base), window::SPAN);
            !maps.iter().any(|m| m.region.overlaps(&r)) && !ram.iter().any(|b| b.overlaps(&r))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::layout;

    const fn pr(base: u64, size: u64) -> PhysRange {
        PhysRange::new(PhysAddr::new(base), size)
    }

    fn guard(image: &ImageLayout, addr: u64) -> Option<usize> {
        stack_guard_owner(image, VirtAddr::new(addr))
    }

    /// Size of QEMU's device tree for `virt` with 4 CPUs.
    const SMP4: &[u8] = include_bytes!("../../tests/fixtures/virt-gicv3-a57-smp4-2g.dtb");

    fn image() -> ImageLayout {
        ImageLayout {
            text_start: 0x4020_0000,
            text_end: 0x4021_3000,
            rodata_end: 0x4021_8000,
            data_end: 0x4022_0000,
            image_end: 0x4022_0000 + boot::MAX_CPUS as u64 * STACK,
        }
    }

    /// QEMU's RAM (2 GiB at 0x4000_0000), UART and GICv3, with the device tree at `base`.
    fn platform_with_dtb_at(base: u64) -> Machine<'static> {
        const RAM: &[PhysRange] = &[pr(0x4000_0000, 2 << 30)];
        const DEVICES: &[(&str, PhysRange)] = &[
            ("uart", pr(0x0900_0000, 0x1000)),
            ("gicd", pr(0x0800_0000, 0x1_0000)),
            ("gicr", pr(0x080a_0000, 0xf6_0000)),
        ];
        Machine {
            dtb: pr(base, SMP4.len() as u64),
            ram: RAM,
            devices: DEVICES,
        }
    }

    fn mem(p: &Machine<'_>) -> HypMemory {
        let img = image();
        layout::plan(
            pr(img.text_start, img.image_end - img.text_start),
            p.ram,
            p.dtb,
        )
        .unwrap()
    }

    #[test]
    fn sections_get_their_permissions() {
        let p = platform_with_dtb_at(layout::HYP_RAM_END.get());
        let maps = plan(&image(), &mem(&p), &p).unwrap();
        let find = |name| maps.iter().find(|m| m.name == name).copied().unwrap();
        assert_eq!(find("text").access, Access::ReadExecute);
        assert_eq!(find("text").region, pr(0x4020_0000, 0x13000));
        assert_eq!(find("rodata").access, Access::ReadOnly);
        assert_eq!(find("data+bss").access, Access::ReadWrite);
        let stacks: Vec<_> = maps.iter().filter(|m| m.name == "stack").collect();
        assert_eq!(stacks.len(), boot::MAX_CPUS);
        // Each stack leaves its lowest page unmapped.
        assert_eq!(stacks[0].region, pr(0x4022_1000, STACK - PAGE_SIZE));
        assert_eq!(stacks[1].region.base.get(), 0x4022_0000 + STACK + PAGE_SIZE);
        assert!(stacks.iter().all(|m| m.access == Access::ReadWrite));
        assert_eq!(find("dtb").access, Access::ReadOnly);
        assert_eq!(find("uart").memory, Memory::Device);
        assert_eq!(find("gicd").memory, Memory::Device);
        assert_eq!(find("gicr").region, pr(0x080a_0000, 0xf6_0000));
        // Exactly one executable mapping, and it is the text.
        let exec: Vec<_> = maps
            .iter()
            .filter(|m| m.access == Access::ReadExecute)
            .collect();
        assert_eq!(exec.len(), 1);
        assert_eq!(exec[0].name, "text");
    }

    #[test]
    fn the_log_shows_the_stacks_on_one_line_and_every_other_mapping_on_its_own() {
        let p = platform_with_dtb_at(layout::HYP_RAM_END.get());
        let maps = plan(&image(), &mem(&p), &p).unwrap();
        let lines: Vec<String> = log_lines(&maps).map(|l| l.to_string()).collect();
        let stacks: Vec<&Mapping> = maps.iter().filter(|m| m.name == "stack").collect();
        assert!(stacks.len() > 1);
        let stack_lines: Vec<&String> = lines.iter().filter(|l| l.starts_with("stack ")).collect();
        assert_eq!(
            stack_lines,
            [&format!(
                "stack      [{:#010x}, {:#010x}) {} × {} KiB with unmapped gaps between, RW- normal",
                stacks[0].region.base,
                stacks[stacks.len() - 1].region.end(),
                stacks.len(),
                stacks[0].region.size / 1024
            )]
        );
        assert_eq!(lines.len(), maps.len() - stacks.len() + 1);
        for m in maps.iter().filter(|m| m.name != "stack") {
            assert!(lines.contains(&m.to_string()), "{m}");
        }
        // Two mappings of one kind with no gap between them stay two lines.
        let two = [
            maps[0],
            Mapping {
                region: PhysRange::new(maps[0].region.end(), 0x1000),
                ..maps[0]
            },
        ];
        assert_eq!(log_lines(&two).count(), 2);
    }

    #[test]
    fn only_staging_of_the_ram_above_the_hypervisor_is_mapped() {
        let p = platform_with_dtb_at(layout::HYP_RAM_END.get());
        let maps = plan(&image(), &mem(&p), &p).unwrap();
        let above: Vec<_> = maps
            .iter()
            .filter(|m| m.region.base >= layout::HYP_RAM_END)
            .map(|m| (m.name, m.region))
            .collect();
        // The DTB QEMU puts right after the hypervisor's RAM, then the staging range;
        // nothing else of the RAM up to its end at 3 GiB.
        assert_eq!(
            above,
            [
                ("dtb", PhysRange::new(layout::HYP_RAM_END, 0x2000)),
                ("staging", layout::STAGING),
            ]
        );
        let staging = maps.iter().find(|m| m.name == "staging").unwrap();
        assert_eq!(staging.access, Access::ReadWrite);
        // A DTB inside the staging range is cut out of it.
        let in_staging = platform_with_dtb_at(0x7800_0000);
        let maps = plan(&image(), &mem(&in_staging), &in_staging).unwrap();
        let staging: Vec<_> = maps
            .iter()
            .filter(|m| m.name == "staging")
            .map(|m| m.region)
            .collect();
        assert_eq!(
            staging,
            [
                pr(0x7000_0000, 0x0800_0000),
                pr(0x7800_2000, 0x0800_0000 - 0x2000)
            ]
        );
    }

    #[test]
    fn built_table_enforces_the_policy() {
        use mmu::testing::{HeapFrames, RecordingTlb};
        use mmu::{El2, MemoryType, PageTable, Permissions};
        let p = platform_with_dtb_at(layout::HYP_RAM_END.get());
        let maps = plan(&image(), &mem(&p), &p).unwrap();
        let mut table = PageTable::new(
            El2::new(VA_BITS).with_pa_bits(44),
            HeapFrames::new(),
            RecordingTlb::new(),
        )
        .unwrap();
        build(&mut table, &maps).unwrap();
        let at = |va| {
            table
                .translate(va)
                .unwrap_or_else(|| panic!("{va:#x} not mapped"))
        };
        let text = at(0x4020_0040);
        assert_eq!(text.output, 0x4020_0040, "identity");
        assert!(text.attrs.perms.contains(Permissions::EXEC_EL2));
        assert!(!text.attrs.perms.contains(Permissions::WRITE));
        let rodata = at(0x4021_3000);
        assert_eq!(rodata.attrs.perms, Permissions::RO);
        let data = at(0x4021_8000);
        assert_eq!(
            data.attrs.perms,
            Permissions::RW,
            "writable, not executable"
        );
        assert_eq!(at(0x0900_0000).attrs.mem_type, MemoryType::DeviceNGnRE);
        // Nothing mapped in the hypervisor's address space is writable and executable.
        table
            .walk(0, 1 << VA_BITS, |m| {
                let p = m.attrs.perms;
                assert!(
                    !(p.contains(Permissions::WRITE) && p.contains(Permissions::EXEC_EL2)),
                    "{m:?}"
                );
            })
            .unwrap();
        // Holes stay unmapped: below RAM and between the devices.
        assert!(table.translate(0x3000_0000).is_none());
        assert!(table.translate(0x0).is_none());
        // Guest RAM is not mapped (here: the RAM after the DTB up to staging, and
        // everything after staging).
        assert!(table
            .translate(layout::HYP_RAM_END.get() + 0x2000)
            .is_none());
        assert!(table.translate(0x6fff_f000).is_none());
        assert!(table.translate(0x8000_0000).is_none());
        assert!(table.translate(0xbfff_f000).is_none());
        assert_eq!(
            table.translate(0x7000_0000).unwrap().attrs.perms,
            Permissions::RW
        );
        // The devices' GiB is execute-never as a whole subtree; the GiB holding the
        // text is not.
        use mmu::TableAttrs;
        assert_eq!(table.table_attrs(0x0900_0000), TableAttrs::NO_EXEC_EL2);
        assert_eq!(table.table_attrs(0x3000_0000), TableAttrs::NO_EXEC_EL2);
        assert_eq!(table.table_attrs(0x4020_0040), TableAttrs::empty());
        assert_eq!(execute_never_regions(&maps), [pr(0, 1 << 30)]);
        // Later mappings there stay execute-never (the table attribute is held).
        assert_eq!(
            table
                .table_attrs(0x0a00_0000)
                .limit(Permissions::READ | Permissions::EXEC_EL2),
            Permissions::READ
        );
    }

    #[test]
    fn guard_pages() {
        let img = image();
        assert_eq!(guard(&img, 0x4022_0000), Some(0));
        assert_eq!(guard(&img, 0x4022_0fff), Some(0));
        assert_eq!(guard(&img, 0x4022_1000), None, "cpu0's stack proper");
        assert_eq!(guard(&img, 0x4022_0000 + 3 * STACK + 8), Some(3));
        assert_eq!(guard(&img, 0x4021_ffff), None, "data");
        assert_eq!(guard(&img, img.image_end), None, "past the stacks");
    }

    #[test]
    fn page_ranges_round_outwards_and_stop_below_2_64() {
        assert_eq!(
            page_range(PhysAddr::new(0x4000_1234), PhysAddr::new(0x4000_5678)),
            pr(0x4000_1000, 0x5000)
        );
        assert_eq!(
            page_range(PhysAddr::new(0x4000_0000), PhysAddr::new(0x4000_1000)),
            pr(0x4000_0000, 0x1000)
        );
        // A range reaching into the last page below 2^64 (a device tree or device at
        // an address no PA size has) ends at the last page boundary, without wrapping.
        assert_eq!(
            page_range(PhysAddr::new(u64::MAX - 0x1800), PhysAddr::new(u64::MAX)),
            pr(0xffff_ffff_ffff_e000, 0x1000)
        );
        assert_eq!(
            page_range(PhysAddr::new(u64::MAX - 0x10), PhysAddr::new(u64::MAX)).size,
            0
        );
    }

    #[test]
    fn sctlr_and_parange() {
        assert_eq!(SCTLR_EL2_MMU_ON & 0b1101, 0b1101, "M, C, SA");
        assert_ne!(SCTLR_EL2_MMU_ON & (1 << 19), 0, "WXN");
        assert_eq!(SCTLR_EL2_MMU_ON & (1 << 25), 0, "little endian");
        assert_eq!(sctlr_el2(false), SCTLR_EL2_MMU_ON);
        assert_eq!(sctlr_el2(true) ^ SCTLR_EL2_MMU_ON, 1 << 43, "ATA only");
        assert_eq!(
            sctlr_el2(true) & (0b11 << 40),
            0,
            "TCF: no tag checks at EL2"
        );
        assert_eq!(
            mair_el2(false) >> 32 & 0xff,
            0xff,
            "attr 4 untagged write-back"
        );
        assert_eq!(mair_el2(true) >> 32 & 0xff, 0xf0, "attr 4 Tagged Normal");
        assert_eq!(mair_el2(true) & 0xffff_ffff, mair_el2(false) & 0xffff_ffff);
        assert_eq!(pa_bits(4), 44);
        assert_eq!(pa_bits(5), 48);
        assert_eq!(pa_bits(6), 48);
        assert_eq!(pa_bits(0x1100), 32);
    }

    #[test]
    fn policy_violations_are_reported() {
        let m = |name, base, access| Mapping {
            name,
            region: pr(base, PAGE_SIZE),
            access,
            memory: Memory::Normal,
        };
        assert_eq!(
            check(&[
                m("a", 0x1000, Access::ReadOnly),
                m("b", 0x1000, Access::ReadOnly)
            ]),
            Err(PlanError::Overlap("a", "b"))
        );
        assert_eq!(
            check(&[m("a", 0x1800, Access::ReadOnly)]),
            Err(PlanError::Misaligned("a"))
        );
        assert!(check(&[
            m("a", 0x1000, Access::ReadExecute),
            m("b", 0x2000, Access::ReadWrite)
        ])
        .is_ok());
    }

    /// A RAM layout: a first bank at 1 GiB holding the image (at least 64 MiB), up to
    /// three more banks above it (adjacent or not), and the DTB either where QEMU puts
    /// it or anywhere in a bank clear of the hypervisor's image and heap.
    fn ram_layout() -> impl proptest::strategy::Strategy<Value = (Vec<PhysRange>, PhysRange)> {
        use proptest::prelude::*;
        const GIB: u64 = 1 << 30;
        let pages =
            |lo: u64, hi: u64| (lo / PAGE_SIZE..=hi / PAGE_SIZE).prop_map(|p| p * PAGE_SIZE);
        (
            pages(64 << 20, 8 * GIB),
            proptest::collection::vec((pages(0, 4 * GIB), pages(2 << 20, 4 * GIB)), 0..4),
            any::<prop::sample::Index>(),
            any::<u64>(),
            any::<bool>(),
        )
            .prop_map(|(size0, more, bank, offset, at_qemu_place)| {
                let mut ram = vec![pr(0x4000_0000, size0)];
                for (gap, size) in more {
                    let base = ram.last().unwrap().end().get() + gap;
                    ram.push(pr(base, size));
                }
                let dtb_size = 0x1800;
                let dtb = if at_qemu_place && size0 >= 256 << 20 {
                    PhysRange::new(layout::HYP_RAM_END, dtb_size)
                } else {
                    let b = ram[bank.index(ram.len())];
                    // Clear of the image and the heap in the first bank.
                    let lo = if b.base.get() == 0x4000_0000 {
                        0x4200_0000
                    } else {
                        b.base.get()
                    };
                    let span = b.end().get() - lo - 0x2000;
                    pr(lo + (offset % span) / 8 * 8, dtb_size)
                };
                (ram, dtb)
            })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

        /// Whatever the RAM banks and wherever the DTB: the plan, and the table built
        /// from it with the window installed, map nothing of the guest RAM pool, at
        /// its physical address or any other; the window's region holds no RAM and no
        /// other mapping; and every RAM page is guest RAM or the hypervisor's own.
        #[test]
        fn nothing_of_the_guest_ram_pool_is_mapped((ram, dtb) in ram_layout(), probe: u64) {
            use mmu::testing::{HeapFrames, RecordingTlb};
            use mmu::{El2, PageTable};
            const DEVICES: &[(&str, PhysRange)] = &[("uart", pr(0x0900_0000, 0x1000))];
            let machine = Machine { dtb, ram: &ram, devices: DEVICES };
            let img = image();
            let hyp = mem(&machine);
            let maps = plan(&img, &hyp, &machine).unwrap();
            let pool = layout::guest_ram(&ram, &hyp, dtb);
            for m in &maps {
                for g in &pool {
                    proptest::prop_assert!(!m.region.overlaps(g), "{m} maps guest RAM {g}");
                }
                if m.name == "staging" {
                    proptest::prop_assert!(layout::STAGING.contains(&m.region));
                    proptest::prop_assert!(ram.iter().any(|b| b.contains(&m.region)));
                }
            }
            let base = window_base(&maps, &ram).unwrap();
            let region = pr(base, window::SPAN);
            proptest::prop_assert!(maps.iter().all(|m| !m.region.overlaps(&region)));
            proptest::prop_assert!(ram.iter().all(|b| !b.overlaps(&region)));

            let mut table = PageTable::new(
                El2::new(VA_BITS).with_pa_bits(40),
                HeapFrames::new(),
                RecordingTlb::new(),
            )
            .unwrap();
            build(&mut table, &maps).unwrap();
            let w = window::Window::new(base, boot::MAX_CPUS, &pool).unwrap();
            w.install(&mut table, img.text_end).unwrap();
            table
                .walk(0, 1 << VA_BITS, |leaf| {
                    let va = pr(leaf.va, leaf.size);
                    let out = pr(leaf.output, leaf.size);
                    for g in &pool {
                        assert!(!va.overlaps(g) && !out.overlaps(g), "{leaf:?} and {g}");
                    }
                })
                .unwrap();

            // Not vacuous: a RAM page that is not mapped and not the hypervisor's own
            // is in the pool.
            let total: u64 = ram.iter().map(|b| b.size).sum();
            let mut at = (probe % total) & !(PAGE_SIZE - 1);
            let page = ram
                .iter()
                .find_map(|b| {
                    if at < b.size {
                        Some(pr(b.base.get() + at, PAGE_SIZE))
                    } else {
                        at -= b.size;
                        None
                    }
                })
                .unwrap();
            let own = pr(0x4000_0000, layout::HYP_RAM_END.max(hyp.frames.end()).get() - 0x4000_0000);
            let dtb_pages = page_range(dtb.base, dtb.end());
            if !maps.iter().any(|m| m.region.overlaps(&page))
                && !own.overlaps(&page)
                && !dtb_pages.overlaps(&page)
                && !layout::STAGING.overlaps(&page)
            {
                proptest::prop_assert!(pool.iter().any(|g| g.contains(&page)), "{page} lost");
            }
        }
    }
}

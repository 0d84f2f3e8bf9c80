//! One test per defect found in review: each fails on the code before its fix.

use mmu::testing::{HeapFrames, RecordingTlb};
use mmu::{Attributes, El2, MapFlags, PageTable, Permissions, Stage2};

const PAGE: u64 = 4096;

fn rw() -> Attributes {
    Attributes::normal(Permissions::RW)
}

/// An output address below the input's offset inside its 2 MiB region made the
/// level-3 fill loop add to an address that had already wrapped (debug builds panic).
#[test]
fn output_below_input_offset() {
    let mut t = PageTable::new(El2::new(39), HeapFrames::new(), RecordingTlb::new()).unwrap();
    t.map(0x1000, 0x0, 2 * PAGE, rw(), MapFlags::empty())
        .unwrap();
    assert_eq!(t.translate(0x1000).unwrap().output, 0);
    assert_eq!(t.translate(0x2abc).unwrap().output, 0x1abc);

    // The top of a 40-bit IPA space, mapped to the bottom of the PA space.
    let top = 1u64 << 40;
    let ram = Attributes::new(
        Permissions::RW | Permissions::EXEC_EL1 | Permissions::EXEC_EL0,
        mmu::MemoryType::Normal,
    );
    let mut s2 =
        PageTable::new(Stage2::new(1, 40), HeapFrames::new(), RecordingTlb::new()).unwrap();
    s2.map(top - 3 * PAGE, PAGE, 3 * PAGE, ram, MapFlags::empty())
        .unwrap();
    assert_eq!(s2.translate(top - 1).unwrap().output, 4 * PAGE - 1);
    assert_eq!(s2.translate(top - 3 * PAGE).unwrap().output, PAGE);
}

/// The VMID size is configuration: a VMID above 255 needs 16-bit VMIDs selected
/// explicitly (before, `Stage2::new` switched VS on for that one table, so a TLBI for
/// VMID 0x105 under another table's VS = 0 hit VMID 0x05). Every stage-2 sequence
/// carries the table's VTCR_EL2 with its VTTBR_EL2.
#[test]
fn vmid_and_asid_width_are_configuration() {
    let s2 = PageTable::new(
        Stage2::new(0x105, 40),
        HeapFrames::new(),
        RecordingTlb::new(),
    );
    assert_eq!(s2.err(), Some(mmu::Error::InvalidConfig));
    let el1 = PageTable::new(
        mmu::El1::new(0x105, 39),
        HeapFrames::new(),
        RecordingTlb::new(),
    );
    assert_eq!(el1.err(), Some(mmu::Error::InvalidConfig));
    // Small VMIDs under a 16-bit configuration keep VS set.
    let r = Stage2::new(5, 40).with_vmid16(true);
    let mut t = PageTable::new(r, HeapFrames::new(), RecordingTlb::new()).unwrap();
    assert_eq!(t.vtcr_el2() >> 19 & 1, 1);
    let ram = Attributes::new(
        Permissions::RW | Permissions::EXEC_EL1 | Permissions::EXEC_EL0,
        mmu::MemoryType::Normal,
    );
    t.map(0, 0x8000_0000, 2 * PAGE, ram, MapFlags::empty())
        .unwrap();
    t.unmap(0, PAGE).unwrap();
    let ctx = *t.tlb().contexts().last().unwrap();
    assert_eq!(
        ctx,
        mmu::TlbContext::Stage2 {
            vttbr: t.vttbr_el2(),
            vtcr: t.vtcr_el2()
        }
    );
}

/// FEAT_TLBIRANGE is ID_AA64ISAR0_EL1.TLB >= 0b0010, not == 0b0010.
#[test]
fn tlbi_range_detection_uses_the_id_scheme() {
    assert!(!mmu::tlbi_range_supported(0));
    assert!(!mmu::tlbi_range_supported(0b0001 << 56));
    assert!(mmu::tlbi_range_supported(0b0010 << 56));
    assert!(mmu::tlbi_range_supported(0b0011 << 56));
    assert!(!mmu::tlbi_range_supported(0xF << 52));
}

/// Frames from `HeapFrames` (whose physical addresses lie below 2^35), handed out with
/// `offset` added to their address: a frame source that can be told to give frames
/// the table cannot use.
struct Shifted {
    inner: HeapFrames,
    offset: std::cell::Cell<u64>,
}

impl Shifted {
    fn new(offset: u64) -> Self {
        Shifted {
            inner: HeapFrames::new(),
            offset: std::cell::Cell::new(offset),
        }
    }
    fn real(pa: u64) -> u64 {
        pa & ((1 << 36) - 1)
    }
}

// SAFETY: the frames are `HeapFrames` ones, reached through their real address.
unsafe impl mmu::PhysToVirt for Shifted {
    fn phys_to_virt(&self, pa: u64) -> *mut u64 {
        mmu::testing::frame_ptr(Self::real(pa))
    }
}

// SAFETY: forwards to `HeapFrames`, shifting the addresses.
unsafe impl mmu::FrameAllocator for Shifted {
    fn alloc_frame(&mut self) -> Option<u64> {
        self.inner.alloc_frame().map(|pa| pa + self.offset.get())
    }
    fn free_frame(&mut self, pa: u64) {
        self.inner.free_frame(Self::real(pa));
    }
}

/// Table frames must lie below the output address size: at or above 2^48 a table
/// descriptor would silently drop the upper bits; above the configured PA size the
/// walk would take an address-size fault.
#[test]
fn table_frames_are_checked_against_the_output_size() {
    for (offset, pa_bits) in [(1u64 << 48, 48), (1 << 40, 40), (1 << 36, 36)] {
        let r = El2::new(39).with_pa_bits(pa_bits);
        let e = PageTable::new(r, Shifted::new(offset), RecordingTlb::new()).err();
        assert!(matches!(e, Some(mmu::Error::InvalidFrame { .. })), "{e:?}");

        // A good root, then bad table frames: the operation fails and changes nothing.
        let mut t = PageTable::new(r, Shifted::new(0), RecordingTlb::new()).unwrap();
        t.map(0, 0, PAGE, rw(), MapFlags::empty()).unwrap();
        t.map(2 << 20, 2 << 20, 2 << 20, rw(), MapFlags::empty())
            .unwrap();
        let dump = t.to_string();
        let held = t.allocator().inner.in_use();
        t.allocator().offset.set(offset);
        // One page (the single-page path), pages, and a page splitting a block.
        for (va, size) in [
            (1 << 30, PAGE),
            (1 << 31, 3 << 20),
            ((2 << 20) + PAGE, PAGE),
        ] {
            let e = t.map(va, 0x10_0000, size, rw(), MapFlags::REPLACE).err();
            assert!(matches!(e, Some(mmu::Error::InvalidFrame { .. })), "{e:?}");
            assert_eq!(t.to_string(), dump);
            assert_eq!(t.allocator().inner.in_use(), held, "frames given back");
        }
    }
}

/// `coalesce` merged tables its range only touched, including NO_BLOCKS regions
/// (a break-before-make over the whole 2 MiB the docs tell users to keep code and
/// stacks in).
#[test]
fn coalesce_merges_only_covered_tables_and_never_no_blocks_ones() {
    const MIB2: u64 = 2 << 20;
    let base = 0x4000_0000;
    let mut t = PageTable::new(El2::new(39), HeapFrames::new(), RecordingTlb::new()).unwrap();
    t.map(base, base, MIB2, rw(), MapFlags::NO_BLOCKS).unwrap();
    t.coalesce(base + MIB2 - PAGE, PAGE).unwrap();
    assert_eq!(t.translate(base).unwrap().level, 3);
    t.coalesce(base, MIB2).unwrap();
    assert_eq!(
        t.translate(base).unwrap().level,
        3,
        "NO_BLOCKS region merged"
    );
    // Mapping over it again without NO_BLOCKS does not merge it either.
    t.map(base, base, PAGE, rw(), MapFlags::REPLACE).unwrap();
    assert_eq!(t.translate(base).unwrap().level, 3);
    assert!(t.tlb().invalidations().is_empty(), "no break-before-make");

    // A block split by `protect` and made uniform again: merged only by a coalesce
    // that covers its whole table.
    let b = base + MIB2;
    t.map(b, b, MIB2, rw(), MapFlags::empty()).unwrap();
    t.protect(b, PAGE, Attributes::normal(Permissions::RO))
        .unwrap();
    t.protect(b, PAGE, rw()).unwrap();
    assert_eq!(t.translate(b).unwrap().level, 3);
    t.coalesce(b + MIB2 - PAGE, PAGE).unwrap();
    assert_eq!(
        t.translate(b).unwrap().level,
        3,
        "merged by a range touching it"
    );
    t.coalesce(b - PAGE, MIB2 + PAGE).unwrap();
    assert_eq!(t.translate(b).unwrap().level, 2);
    assert_eq!(t.translate(base).unwrap().level, 3);
}

/// A block-sized map over a table holding pages reports the first mapped page, not
/// the start of the range.
#[test]
fn block_sized_map_over_pages_reports_the_first_mapped_page() {
    let mut t = PageTable::new(El2::new(39), HeapFrames::new(), RecordingTlb::new()).unwrap();
    t.map(0x20_1000, 0x20_1000, PAGE, rw(), MapFlags::empty())
        .unwrap();
    let e = t.map(0x20_0000, 0x40_0000, 2 << 20, rw(), MapFlags::empty());
    assert_eq!(e, Err(mmu::Error::AlreadyMapped { va: 0x20_1000 }));
    assert!(t.translate(0x20_0000).is_none());
}

/// REPLACE of a block-aligned range over a table replaces the table by the block in
/// one break-before-make step. Before, the crate rewrote the table's 512 leaves with
/// break-before-make (one batch of invalidations), then merged the now uniform table
/// (a second batch).
#[test]
fn replace_over_a_table_is_one_step() {
    let frames = HeapFrames::new();
    let mut t = PageTable::new(El2::new(39), &frames, RecordingTlb::new()).unwrap();
    let base = 0x4000_0000;
    // A 2 MiB table of pages (mixed attributes so it is no block), and a 1 GiB
    // region holding a level-2 table with level-3 tables below it.
    t.map(base, 0x1_0000_0000, 0x20_0000, rw(), MapFlags::NO_BLOCKS)
        .unwrap();
    t.map(
        0x8000_0000,
        0x8000_0000,
        0x40_0000,
        rw(),
        MapFlags::NO_BLOCKS,
    )
    .unwrap();
    t.map(0x8040_0000, 0x8040_0000, 0x20_0000, rw(), MapFlags::empty())
        .unwrap();
    let before = t.frames_in_use();
    t.tlb_mut().clear();
    t.map(base, 0x2_0000_0000, 0x20_0000, rw(), MapFlags::REPLACE)
        .unwrap();
    let tr = t.translate(base + 0x1234).unwrap();
    assert_eq!((tr.level, tr.output), (2, 0x2_0000_1234));
    let batches = t
        .tlb()
        .sequences()
        .iter()
        .filter(|s| s.iter().any(|op| !op.is_barrier()))
        .count();
    assert_eq!(batches, 1, "{:?}", t.tlb().sequences());
    assert_eq!(t.frames_in_use(), before - 1, "the level-3 table is freed");

    // 1 GiB over a level-2 table with two level-3 tables and a block below it.
    t.tlb_mut().clear();
    t.map(
        0x8000_0000,
        0x3_0000_0000,
        0x4000_0000,
        rw(),
        MapFlags::REPLACE,
    )
    .unwrap();
    let tr = t.translate(0x8040_1000).unwrap();
    assert_eq!((tr.level, tr.output), (1, 0x3_0040_1000));
    let inv = t.tlb().invalidations();
    assert_eq!(inv, [mmu::TlbOp::El2All], "every page below went: {inv:?}");
    assert_eq!(t.frames_in_use(), before - 4);
    assert_eq!(frames.in_use(), t.frames_in_use());
}

/// With range invalidation the threshold counts range instructions, not runs:
/// unmapping 8 TiB was one run that took 1,024 range instructions (8 GiB each) and the
/// `TLBI VMALLE1IS` after them, with interrupts masked in `arch::ArmTlb`; now it is
/// one whole-VMID invalidation.
#[test]
fn huge_range_unmap_invalidates_the_whole_vmid() {
    let ram = Attributes::new(Permissions::RW, mmu::MemoryType::Normal);
    let mut s2 =
        PageTable::new(Stage2::new(5, 48), HeapFrames::new(), RecordingTlb::new()).unwrap();
    s2.set_tlbi_range(true);
    let tib = 1u64 << 40;
    s2.map(0, 0, 8 * tib, ram, MapFlags::empty()).unwrap();
    s2.tlb_mut().clear();
    s2.unmap(0, 8 * tib).unwrap();
    assert_eq!(
        s2.tlb().invalidations(),
        [mmu::TlbOp::Stage2All { vmid: 5 }]
    );
    assert_eq!(mmu::range_steps((8 * tib) >> 12), 1024);

    // 8 GiB (eight 1 GiB blocks, their emptied table freed: non-leaf) is still one
    // range instruction.
    s2.map(0, 0, 8 << 30, ram, MapFlags::empty()).unwrap();
    s2.tlb_mut().clear();
    s2.unmap(0, 8 << 30).unwrap();
    let inv = s2.tlb().invalidations();
    assert!(
        matches!(
            inv[..],
            [
                mmu::TlbOp::Stage2Range {
                    pages: 2_097_152,
                    leaf: false,
                    ..
                },
                mmu::TlbOp::Stage2Stage1All { .. }
            ]
        ),
        "{inv:?}"
    );
    assert_eq!(mmu::range_steps(2_097_152), 1);
}

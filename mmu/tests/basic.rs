//! Basic map / unmap / translate behaviour of the three regimes.

use mmu::testing::{HeapFrames, RecordingTlb};
use mmu::{
    Attributes, El1, El2, Error, MapFlags, MemoryType, PageTable, Permissions, Stage2, SwBits,
    TlbOp,
};

const GIB: u64 = 1 << 30;
const MIB2: u64 = 2 << 20;
const PAGE: u64 = 4096;

fn rw() -> Attributes {
    Attributes::normal(Permissions::RW)
}

#[test]
fn el2_map_translate_unmap_pages_and_blocks() {
    let mut t = PageTable::new(El2::new(48), HeapFrames::new(), RecordingTlb::new()).unwrap();
    assert_eq!(t.frames_in_use(), 1);
    // 2 MiB + 1 page, 2 MiB aligned: one L2 block and one L3 page.
    t.map(
        0x4000_0000,
        0x8000_0000,
        MIB2 + PAGE,
        rw(),
        MapFlags::empty(),
    )
    .unwrap();
    let b = t.translate(0x4010_0008).unwrap();
    assert_eq!((b.output, b.level), (0x8010_0008, 2));
    let p = t.translate(0x4020_0010).unwrap();
    assert_eq!((p.output, p.level), (0x8020_0010, 3));
    assert_eq!(p.attrs, rw());
    assert!(t.translate(0x4020_1000).is_none());
    // L0, L1, L2 and one L3 table beyond the root.
    assert_eq!(t.frames_in_use(), 4);
    assert_eq!(t.allocator().in_use(), 4);
    assert!(
        t.tlb().invalidations().is_empty(),
        "mapping invalid entries needs no TLBI"
    );

    t.unmap(0x4000_0000, MIB2 + PAGE).unwrap();
    assert!(t.translate(0x4000_0000).is_none());
    assert!(t.translate(0x4020_0000).is_none());
    assert_eq!(t.frames_in_use(), 1, "empty tables freed");
    assert_eq!(t.allocator().in_use(), 1);
    // Exactly two TLBIs: the block (leaf), and the page with walk caches (non-leaf),
    // which also covers the three table entries (levels 0-2) that went away.
    assert_eq!(
        t.tlb().invalidations(),
        vec![
            TlbOp::El2Va {
                va: 0x4000_0000,
                leaf: true
            },
            TlbOp::El2Va {
                va: 0x4020_0000,
                leaf: false
            },
        ]
    );
}

#[test]
fn already_mapped_is_an_error_and_changes_nothing() {
    let mut t = PageTable::new(El2::new(39), HeapFrames::new(), RecordingTlb::new()).unwrap();
    t.map(0x20_0000, 0x20_0000, PAGE, rw(), MapFlags::empty())
        .unwrap();
    let frames = t.allocator().live();
    let err = t.map(0x1F_F000, 0x1F_F000, 3 * PAGE, rw(), MapFlags::empty());
    assert_eq!(err, Err(Error::AlreadyMapped { va: 0x20_0000 }));
    assert!(t.translate(0x1F_F000).is_none());
    assert_eq!(t.allocator().live(), frames);
    // REPLACE remaps, with break-before-make.
    t.map(0x20_0000, 0x30_0000, PAGE, rw(), MapFlags::REPLACE)
        .unwrap();
    assert_eq!(t.translate(0x20_0000).unwrap().output, 0x30_0000);
    assert!(t.tlb().invalidations().contains(&TlbOp::El2Va {
        va: 0x20_0000,
        leaf: true
    }));
}

#[test]
fn stage2_block_split_and_vmid_tagged_tlbi() {
    let mut t = PageTable::new(Stage2::new(9, 40), HeapFrames::new(), RecordingTlb::new()).unwrap();
    assert_eq!(t.frames_in_use(), 2);
    let a = Attributes::new(
        Permissions::RW | Permissions::EXEC_EL1 | Permissions::EXEC_EL0,
        MemoryType::Normal,
    );
    t.map(0, 0x1_0000_0000, GIB, a, MapFlags::empty()).unwrap();
    assert_eq!(t.translate(0x1234_5678).unwrap().level, 1);
    t.unmap(0x1000_0000, PAGE).unwrap();
    assert!(t.translate(0x1000_0000).is_none());
    assert_eq!(t.translate(0x1000_1000).unwrap().output, 0x1_1000_1000);
    assert_eq!(t.translate(0x1000_1000).unwrap().level, 3);
    assert_eq!(t.translate(0x1020_0000).unwrap().level, 2);
    for op in t.tlb().invalidations() {
        match op {
            TlbOp::Stage2Ipa { vmid, .. }
            | TlbOp::Stage2Stage1All { vmid }
            | TlbOp::Stage2All { vmid } => assert_eq!(vmid, 9),
            other => panic!("unexpected {other:?}"),
        }
    }
    let own = mmu::TlbContext::Stage2 {
        vttbr: t.vttbr_el2(),
        vtcr: t.vtcr_el2(),
    };
    let tlb = t.tlb();
    for (seq, ctx) in tlb.sequences().iter().zip(tlb.contexts()) {
        if seq.iter().any(|op| !op.is_barrier()) {
            assert_eq!(*ctx, own, "{seq:?}");
        }
    }
}

#[test]
fn el1_user_pages_and_sw_bits() {
    let mut t = PageTable::new(El1::new(3, 39), HeapFrames::new(), RecordingTlb::new()).unwrap();
    let a = Attributes::new(
        Permissions::READ | Permissions::USER | Permissions::EXEC_EL0,
        MemoryType::Normal,
    )
    .with_sw(SwBits::new(5).unwrap());
    t.map(0x40_0000, 0x9000_0000, 4 * PAGE, a, MapFlags::NO_BLOCKS)
        .unwrap();
    let tr = t.translate(0x40_2abc).unwrap();
    assert_eq!(tr.output, 0x9000_2abc);
    assert_eq!(tr.attrs, a);
    assert_eq!(tr.sw_bits.bits(), 5);
    t.set_sw_bits(0x40_1000, PAGE, SwBits::new(9).unwrap())
        .unwrap();
    assert_eq!(t.translate(0x40_1000).unwrap().sw_bits.bits(), 9);
    assert_eq!(t.translate(0x40_2000).unwrap().sw_bits.bits(), 5);
    assert!(t.tlb().invalidations().is_empty(), "sw bits need no TLBI");
    let bad = Attributes::new(
        Permissions::RW | Permissions::USER | Permissions::EXEC_EL1,
        MemoryType::Normal,
    );
    assert_eq!(
        t.map(0x80_0000, 0, PAGE, bad, MapFlags::empty()),
        Err(Error::UnsupportedAttributes)
    );
}

#[test]
fn dump_lists_runs_of_leaves() {
    let mut t = PageTable::new(Stage2::new(4, 40), HeapFrames::new(), RecordingTlb::new()).unwrap();
    let ram = Attributes::normal(Permissions::RW | Permissions::EXEC_EL1 | Permissions::EXEC_EL0);
    t.map(0x4000_0000, 0x4000_0000, 4 * MIB2, ram, MapFlags::empty())
        .unwrap();
    t.map(
        0x900_0000,
        0x900_0000,
        PAGE,
        Attributes::device(),
        MapFlags::empty(),
    )
    .unwrap();
    t.map(
        0x4080_0000,
        0x9000_0000,
        3 * PAGE,
        ram.with_sw(SwBits::new(2).unwrap()),
        MapFlags::empty(),
    )
    .unwrap();
    let dump = t.to_string();
    let lines: Vec<&str> = dump.lines().collect();
    assert_eq!(lines.len(), 4, "{dump}");
    assert!(lines[0].starts_with("stage 2 table root"), "{dump}");
    assert!(
        lines[0].contains("40-bit input, start level 1, 2 root table(s)"),
        "{dump}"
    );
    assert!(
        lines[1].starts_with("0x0000000009000000-0x0000000009001000 -> 0x000009000000"),
        "{dump}"
    );
    assert!(
        lines[1].contains("1 x 4K L3 rw---- DeviceNGnRE sw=0x0"),
        "{dump}"
    );
    assert!(
        lines[2].starts_with("0x0000000040000000-0x0000000040800000 -> 0x000040000000"),
        "{dump}"
    );
    assert!(
        lines[2].contains("4 x 2M L2 rw-10- Normal sw=0x0"),
        "{dump}"
    );
    assert!(
        lines[3].contains("3 x 4K L3 rw-10- Normal sw=0x2"),
        "{dump}"
    );
}

#[test]
fn walk_reports_leaves_in_range_in_order() {
    let mut t = PageTable::new(El2::new(48), HeapFrames::new(), RecordingTlb::new()).unwrap();
    t.map(GIB, GIB, GIB, rw(), MapFlags::empty()).unwrap();
    t.map(0x20_0000, 0x20_0000, 2 * PAGE, rw(), MapFlags::empty())
        .unwrap();
    let mut seen = Vec::new();
    t.walk(0x20_1000, GIB, |m| seen.push((m.va, m.size, m.level)))
        .unwrap();
    assert_eq!(seen, vec![(0x20_1000, PAGE, 3), (GIB, GIB, 1)]);
    assert_eq!(t.walk(1, PAGE, |_| {}), Err(Error::Misaligned));
    assert_eq!(t.walk(1 << 48, PAGE, |_| {}), Err(Error::OutOfRange));
}

#[test]
fn drop_invalidates_then_frees_everything() {
    let frames = HeapFrames::new();
    {
        let mut t = PageTable::new(Stage2::new(6, 40), &frames, RecordingTlb::new()).unwrap();
        t.map(0, 0, 3 * MIB2 + PAGE, rw(), MapFlags::NO_BLOCKS)
            .unwrap();
        assert_eq!(frames.in_use(), 2 + 1 + 4);
    }
    assert_eq!(frames.in_use(), 0);
    assert_eq!(frames.total_allocated(), frames.total_freed());
}

#[test]
fn bad_ranges_are_errors() {
    let mut t = PageTable::new(El2::new(39), HeapFrames::new(), RecordingTlb::new()).unwrap();
    let a = rw();
    assert_eq!(
        t.map(0x1001, 0, PAGE, a, MapFlags::empty()),
        Err(Error::Misaligned)
    );
    assert_eq!(
        t.map(0, 0x10, PAGE, a, MapFlags::empty()),
        Err(Error::Misaligned)
    );
    assert_eq!(
        t.map(0, 0, 100, a, MapFlags::empty()),
        Err(Error::Misaligned)
    );
    assert_eq!(
        t.map((1 << 39) - PAGE, 0, 2 * PAGE, a, MapFlags::empty()),
        Err(Error::OutOfRange)
    );
    assert_eq!(
        t.map(0, (1 << 48) - PAGE, 2 * PAGE, a, MapFlags::empty()),
        Err(Error::OutOfRange)
    );
    assert_eq!(t.unmap(u64::MAX - 0xFFF, PAGE), Err(Error::OutOfRange));
    let wx = Attributes::normal(Permissions::RW | Permissions::EXEC_EL2);
    assert_eq!(
        t.map(0, 0, PAGE, wx, MapFlags::WXN),
        Err(Error::UnsupportedAttributes)
    );
    t.map(0, 0, PAGE, wx, MapFlags::empty()).unwrap();
    assert_eq!(t.map(0, 0, 0, a, MapFlags::empty()), Ok(()));
    assert_eq!(t.frames_in_use(), 3);
    assert!(t.tlb().invalidations().is_empty());
}

#[test]
fn protect_splits_and_coalesce_merges_back() {
    let mut t = PageTable::new(Stage2::new(2, 40), HeapFrames::new(), RecordingTlb::new()).unwrap();
    let ram = Attributes::normal(Permissions::RW);
    t.map(0x4000_0000, 0x8000_0000, MIB2, ram, MapFlags::empty())
        .unwrap();
    let frames = t.frames_in_use();
    t.protect(0x4000_3000, PAGE, Attributes::normal(Permissions::RO))
        .unwrap();
    assert_eq!(
        t.translate(0x4000_3000).unwrap().attrs.perms,
        Permissions::RO
    );
    assert_eq!(t.translate(0x4000_4000).unwrap().level, 3);
    assert_eq!(t.frames_in_use(), frames + 1);
    t.protect(0x4000_3000, PAGE, ram).unwrap();
    assert_eq!(
        t.translate(0x4000_0000).unwrap().level,
        3,
        "protect never merges"
    );
    t.tlb_mut().clear();
    t.coalesce(0, 1 << 40).unwrap();
    let tr = t.translate(0x4000_3abc).unwrap();
    assert_eq!((tr.level, tr.output, tr.attrs), (2, 0x8000_3abc, ram));
    assert_eq!(t.frames_in_use(), frames);
    assert_eq!(t.allocator().in_use(), frames);
    assert!(t
        .tlb()
        .invalidations()
        .iter()
        .any(|o| matches!(o, TlbOp::Stage2All { vmid: 2, .. })));
    // Nothing left to merge: no maintenance at all.
    t.tlb_mut().clear();
    t.coalesce(0, 1 << 40).unwrap();
    assert!(t.tlb().sequences().is_empty());
}

/// A regime defined outside the crate, whose encoding sets bits outside the attributes.
#[derive(Clone, Copy)]
struct Custom {
    junk: u64,
}

// SAFETY: El2's encoding (plus bits the crate masks off) and invalidations; the
// geometry is a validated one.
unsafe impl mmu::Regime for Custom {
    const NAME: &'static str = "custom";
    fn geometry(&self) -> Result<mmu::Geometry, Error> {
        mmu::Geometry::stage1(39)
    }
    fn output_bits(&self) -> u8 {
        48
    }
    fn encode(&self, a: &Attributes) -> Result<u64, Error> {
        El2::new(48).encode(a).map(|b| b | self.junk)
    }
    fn decode(&self, d: u64) -> Attributes {
        El2::new(48).decode(d)
    }
    fn tlbi_entry(&self, va: u64, leaf: bool) -> TlbOp {
        TlbOp::El2Va { va, leaf }
    }
    fn tlbi_all(&self) -> TlbOp {
        TlbOp::El2All
    }
}

#[test]
fn geometries_are_validated() {
    use mmu::Geometry;
    let bad = [
        (48, 3, 1),
        (48, 1, 1),
        (40, 1, 3),
        (49, 0, 1),
        (20, 2, 1),
        (64, 0, 1),
    ];
    for (bits, level, roots) in bad {
        assert_eq!(
            Geometry::new(bits, level, roots),
            Err(Error::InvalidConfig),
            "{bits} {level} {roots}"
        );
    }
    // Concatenation only where one table would not do, and never at level 0.
    assert!(Geometry::new(39, 1, 2).is_err());
    assert!(Geometry::new(48, 0, 2).is_err());
    assert!(Geometry::new(40, 1, 4).is_err());
    let g = Geometry::new(40, 1, 2).unwrap();
    assert_eq!((g.root_entries(), g.input_size()), (1024, 1 << 40));
    assert_eq!(Geometry::new(48, 0, 1).unwrap().root_entries(), 512);
    // Every constructor agrees with `new`.
    for bits in 25..=48 {
        for g in [Geometry::stage1(bits), Geometry::stage2(bits)] {
            let g = g.unwrap();
            assert_eq!(
                Geometry::new(g.input_bits(), g.start_level(), g.root_tables()),
                Ok(g)
            );
            assert_eq!(g.input_size(), 1 << bits);
        }
    }
}

#[test]
fn regimes_from_outside_have_their_encoding_masked() {
    // Bits an encoding sets outside the attribute fields are ignored.
    let r = Custom {
        junk: 0x0000_FFFF_FFFF_F003,
    };
    let mut t = PageTable::new(r, HeapFrames::new(), RecordingTlb::new()).unwrap();
    t.map(0x1000, 0x5000, PAGE, rw(), MapFlags::empty())
        .unwrap();
    assert_eq!(t.translate(0x1000).unwrap().output, 0x5000);
}

/// Notes how many frames are in use each time maintenance runs.
struct InUseAtSync<'a> {
    frames: &'a HeapFrames,
    seen: Vec<usize>,
}

impl mmu::TlbMaintenance for InUseAtSync<'_> {
    fn execute(&mut self, _seq: &mmu::TlbSequence<'_>) {
        self.seen.push(self.frames.in_use());
    }
}

#[test]
fn unmap_frees_hundreds_of_tables_only_after_the_final_sync() {
    // 1 GiB + 2 MiB of pages below one level-1 table: more emptied tables than one
    // operation keeps on the stack, so the spilled ones are freed too.
    {
        let frames = HeapFrames::new();
        let tlb = InUseAtSync {
            frames: &frames,
            seen: Vec::new(),
        };
        let mut t = PageTable::new(El2::new(48), &frames, tlb).unwrap();
        let (va, size) = (GIB - MIB2, GIB + 2 * MIB2);
        t.map(va, 0x8000_0000, size, rw(), MapFlags::NO_BLOCKS)
            .unwrap();
        let used = frames.in_use();
        // Root, one level-1, three level-2 and 1 + 512 + 1 level-3 tables.
        assert_eq!(used, 1 + 1 + 3 + 514);
        t.tlb_mut().seen.clear();
        t.unmap(va, size).unwrap();
        assert!(!t.tlb().seen.is_empty());
        assert!(
            t.tlb().seen.iter().all(|&n| n == used),
            "a table was freed before its invalidation ran"
        );
        assert_eq!(frames.in_use(), 1);
        assert_eq!(t.frames_in_use(), 1);
        assert!(t.translate(GIB).is_none());
        drop(t);
        assert_eq!(frames.total_allocated(), frames.total_freed());
    }
}

#[test]
fn range_invalidation_covers_contiguous_changes_with_one_operation() {
    // Stage 2: unmapping 1 GiB of pages is one RIPAS2E1IS over all of it (the level-3
    // tables go without visiting their leaves), then VMALLE1IS, not VMALLS12E1IS.
    let mut t = PageTable::new(Stage2::new(4, 40), HeapFrames::new(), RecordingTlb::new()).unwrap();
    t.set_tlbi_range(true);
    let roots = t.frames_in_use();
    t.map(
        GIB,
        GIB,
        GIB,
        Attributes::normal(Permissions::RW),
        MapFlags::NO_BLOCKS,
    )
    .unwrap();
    t.tlb_mut().clear();
    t.unmap(GIB, GIB).unwrap();
    assert_eq!(
        t.tlb().invalidations(),
        vec![
            TlbOp::Stage2Range {
                vmid: 4,
                ipa: GIB,
                pages: GIB / PAGE,
                leaf: false
            },
            TlbOp::Stage2Stage1All { vmid: 4 },
        ]
    );
    assert_eq!(t.frames_in_use(), roots, "only the root is left");

    // EL2: changing the permissions of 100 pages is one leaf range; two runs that do
    // not touch are two operations; a 2 MiB block is covered as a whole.
    let mut t = PageTable::new(El2::new(39), HeapFrames::new(), RecordingTlb::new()).unwrap();
    t.set_tlbi_range(true);
    t.map(0x4000_0000, 0x4000_0000, MIB2, rw(), MapFlags::empty())
        .unwrap();
    t.map(
        0x4100_0000,
        0x4100_0000,
        300 * PAGE,
        rw(),
        // Without the contiguous hint, whose removal from the group the protect
        // ends in would be a batch of its own.
        MapFlags::NO_BLOCKS | MapFlags::NO_CONTIGUOUS,
    )
    .unwrap();
    t.tlb_mut().clear();
    t.protect(0x4100_0000, 100 * PAGE, Attributes::normal(Permissions::RO))
        .unwrap();
    assert_eq!(
        t.tlb().invalidations(),
        vec![TlbOp::El2Range {
            va: 0x4100_0000,
            pages: 100,
            leaf: true
        }]
    );
    t.tlb_mut().clear();
    t.unmap(0x4000_0000, MIB2).unwrap();
    t.unmap(0x4100_0000 + 200 * PAGE, PAGE).unwrap();
    assert_eq!(
        t.tlb().invalidations(),
        vec![
            TlbOp::El2Range {
                va: 0x4000_0000,
                pages: MIB2 / PAGE,
                leaf: true
            },
            TlbOp::El2Va {
                va: 0x4100_0000 + 200 * PAGE,
                leaf: true
            },
        ]
    );
}

/// A 1 GiB range mapped 2 MiB at a time merges into one 1 GiB block when its last block
/// fills the level-2 table, unless `NO_MERGE`: then each 2 MiB block can be protected
/// alone later without a split, so without a frame.
#[test]
fn no_merge_keeps_blocks_mapped_one_at_a_time() {
    for merge in [true, false] {
        let mut t =
            PageTable::new(Stage2::new(1, 40), HeapFrames::new(), RecordingTlb::new()).unwrap();
        let flags = if merge {
            MapFlags::empty()
        } else {
            MapFlags::NO_MERGE
        };
        for i in 0..512 {
            t.map(GIB + i * MIB2, 2 * GIB + i * MIB2, MIB2, rw(), flags)
                .unwrap();
        }
        let mut levels = Vec::new();
        t.walk(GIB, GIB, |m| levels.push(m.level)).unwrap();
        if merge {
            assert_eq!(levels, [1], "merged into one 1 GiB block");
        } else {
            assert_eq!(levels, [2; 512], "512 blocks of 2 MiB");
            let frames = t.frames_in_use();
            let ro = Attributes::normal(Permissions::READ);
            t.protect(GIB + 7 * MIB2, MIB2, ro).unwrap();
            assert_eq!(t.frames_in_use(), frames, "no split, no frame");
            assert_eq!(t.translate(GIB + 7 * MIB2).unwrap().attrs, ro);
        }
    }
}

/// `relax` writes a permission relaxation in place with no TLB invalidation (pages and
/// a block alike); `protect` of the same change back invalidates, and so do a `relax`
/// that takes a permission away and one that changes the memory type
/// (break-before-make).
#[test]
fn relax_adds_access_without_invalidation() {
    let none = Attributes::normal(Permissions::empty());
    for (size, flags) in [(0x8000, MapFlags::NO_BLOCKS), (MIB2, MapFlags::empty())] {
        let mut t =
            PageTable::new(Stage2::new(1, 40), HeapFrames::new(), RecordingTlb::new()).unwrap();
        t.map(GIB, 2 * GIB, size, none, flags).unwrap();
        let before = t.tlb().invalidations().len();
        t.relax(GIB, size, rw()).unwrap();
        assert_eq!(t.tlb().invalidations().len(), before, "no TLBI");
        assert_eq!(t.translate(GIB + size - 8).unwrap().attrs, rw());
        t.protect(GIB, size, none).unwrap();
        let after_protect = t.tlb().invalidations().len();
        assert!(after_protect > before, "taking access away invalidates");
        t.relax(GIB, size, rw()).unwrap();
        let after_relax = t.tlb().invalidations().len();
        assert_eq!(after_relax, after_protect);
        t.relax(GIB, size, Attributes::normal(Permissions::READ))
            .unwrap();
        assert!(
            t.tlb().invalidations().len() > after_relax,
            "a relax that takes write away is invalidated all the same"
        );
        let after_narrow = t.tlb().invalidations().len();
        t.relax(GIB, size, Attributes::device()).unwrap();
        assert!(
            t.tlb().invalidations().len() > after_narrow,
            "a memory-type change is break-before-make"
        );
        assert_eq!(t.translate(GIB).unwrap().attrs, Attributes::device());
    }
}

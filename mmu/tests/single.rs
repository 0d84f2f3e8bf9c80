//! The single-page and single-block paths of `map` and `unmap` against the general
//! walker: the same errors in the same order, nothing changed after an error, exact
//! frame counts.

use mmu::testing::{HeapFrames, RecordingTlb};
use mmu::{Attributes, El2, Error, MapFlags, PageTable, Permissions, Stage2};

const PAGE: u64 = 4096;

fn rw() -> Attributes {
    Attributes::normal(Permissions::RW)
}

#[test]
fn single_page_checks_match_the_range_checks() {
    let mut t = PageTable::new(El2::new(39), HeapFrames::new(), RecordingTlb::new()).unwrap();
    let top = 1u64 << 39;
    let pa_top = 1u64 << 48;
    let f = MapFlags::empty();
    // The same call as one page and as a two-page range fails the same way (the
    // range's second page never decides the error here).
    for (va, pa, want) in [
        (top - PAGE, 0x1000, None),
        (top, 0x1000, Some(Error::OutOfRange)),
        (!0xFFF, 0x1000, Some(Error::OutOfRange)),
        (0x123, 0x1000, Some(Error::Misaligned)),
        // A misaligned output for an input out of range: the input is checked first.
        (top, 0x1001, Some(Error::OutOfRange)),
        (0x2000, 0x1001, Some(Error::Misaligned)),
        (0x2000, pa_top, Some(Error::OutOfRange)),
        (0x3000, pa_top - PAGE, None),
    ] {
        let got = t.map(va, pa, PAGE, rw(), f).err();
        assert_eq!(got, want, "map({va:#x}, {pa:#x}, one page)");
    }
    assert_eq!(t.translate(top - PAGE).unwrap().output, 0x1000);
    assert_eq!(t.translate(0x3000).unwrap().output, pa_top - PAGE);
    // W^X on the page path too.
    let wx = Attributes::normal(Permissions::RW | Permissions::EXEC_EL2);
    assert_eq!(
        t.map(0x5000, 0x5000, PAGE, wx, MapFlags::WXN),
        Err(Error::UnsupportedAttributes)
    );
    // An attribute the regime cannot encode on the page path (the cache misses).
    let wo = Attributes::normal(Permissions::WRITE);
    assert_eq!(
        t.map(0x6000, 0x6000, PAGE, wo, f),
        Err(Error::UnsupportedAttributes)
    );
    assert!(t.translate(0x5000).is_none() && t.translate(0x6000).is_none());

    assert_eq!(t.unmap(top, PAGE), Err(Error::OutOfRange));
    assert_eq!(t.unmap(0x800, PAGE), Err(Error::Misaligned));
    t.unmap(top - PAGE, PAGE).unwrap();
    assert!(t.translate(top - PAGE).is_none());
}

/// A page into an empty 48-bit table needs three new tables; when the allocator runs
/// out after one or two, the frames taken are given back and nothing is mapped.
#[test]
fn single_page_out_of_frames_midway_changes_nothing() {
    for budget in 0..3 {
        let frames = HeapFrames::new();
        let mut t = PageTable::new(El2::new(48), &frames, RecordingTlb::new()).unwrap();
        frames.fail_after(Some(budget));
        assert_eq!(
            t.map(0x40_0000_1000, 0x1000, PAGE, rw(), MapFlags::empty()),
            Err(Error::OutOfFrames)
        );
        assert_eq!(frames.in_use(), 1, "budget {budget}: only the root");
        assert_eq!(t.frames_in_use(), 1);
        assert!(t.translate(0x40_0000_1000).is_none());
        frames.fail_after(None);
        t.map(0x40_0000_1000, 0x1000, PAGE, rw(), MapFlags::empty())
            .unwrap();
        assert_eq!((frames.in_use(), t.frames_in_use()), (4, 4));
        // Unmapping the only page frees the three tables again.
        t.unmap(0x40_0000_1000, PAGE).unwrap();
        assert_eq!((frames.in_use(), t.frames_in_use()), (1, 1));
    }
}

/// Single-page unmaps keep the entry counts exact: tables go exactly when their last
/// entry does, at every level, and a hole or a page under a block takes the other
/// paths.
#[test]
fn single_page_unmap_frees_tables_exactly_when_empty() {
    let frames = HeapFrames::new();
    let ram = Attributes::new(
        Permissions::RW | Permissions::EXEC_EL1 | Permissions::EXEC_EL0,
        mmu::MemoryType::Normal,
    );
    let mut t = PageTable::new(Stage2::new(3, 48), &frames, RecordingTlb::new()).unwrap();
    // Two pages in one level-3 table, one in another level-3 table of the same
    // level-2 table.
    for va in [0x8000_0000u64, 0x8000_1000, 0x8020_0000] {
        t.map(va, va, PAGE, ram, MapFlags::empty()).unwrap();
    }
    // Root (stage 2 at 48 bits: level 0) + L1 + L2 + two L3.
    assert_eq!(t.frames_in_use(), 5);
    t.unmap(0x8000_0000, PAGE).unwrap();
    assert_eq!(t.frames_in_use(), 5);
    t.unmap(0x8000_0000, PAGE).unwrap(); // a hole now
    t.unmap(0x8000_1000, PAGE).unwrap();
    assert_eq!(t.frames_in_use(), 4);
    t.unmap(0x8020_0000, PAGE).unwrap();
    assert_eq!(t.frames_in_use(), 1);
    assert_eq!(frames.in_use(), 1);
    // A page inside a block: split by the general walker.
    t.map(0x4000_0000, 0x4000_0000, 0x20_0000, ram, MapFlags::empty())
        .unwrap();
    t.unmap(0x4000_0000, PAGE).unwrap();
    assert!(t.translate(0x4000_0000).is_none());
    assert_eq!(t.translate(0x4000_1000).unwrap().level, 3);
}

/// The TTL level of each leaf-only invalidation is the level of the leaf removed; a
/// non-leaf invalidation (a table went) and ranges carry none.
#[test]
fn leaf_levels_for_ttl_hints() {
    let mut t = PageTable::new(El2::new(39), HeapFrames::new(), RecordingTlb::new()).unwrap();
    let levels_of =
        |t: &PageTable<El2, HeapFrames, RecordingTlb>| -> Vec<(mmu::TlbOp, Option<u8>)> {
            let tlb = t.tlb();
            tlb.sequences()
                .iter()
                .zip(tlb.leaf_levels())
                .flat_map(|(s, l)| s.iter().copied().zip(l.iter().copied()))
                .filter(|(op, _)| !op.is_barrier())
                .collect()
        };
    let gib = 1u64 << 30;
    t.map(gib, gib, gib, rw(), MapFlags::empty()).unwrap();
    t.map(0x4000_0000 + gib, 0, 0x40_0000, rw(), MapFlags::empty())
        .unwrap();
    t.map(3 * gib, 0, 2 * PAGE, rw(), MapFlags::empty())
        .unwrap();
    t.tlb_mut().clear();
    // A page (the table keeps the other one): level 3.
    t.unmap(3 * gib, PAGE).unwrap();
    assert_eq!(
        levels_of(&t),
        [(
            mmu::TlbOp::El2Va {
                va: 3 * gib,
                leaf: true
            },
            Some(3)
        )]
    );
    // The last page: its table goes, a non-leaf invalidation without a level.
    t.tlb_mut().clear();
    t.unmap(3 * gib + PAGE, PAGE).unwrap();
    assert_eq!(
        levels_of(&t),
        [(
            mmu::TlbOp::El2Va {
                va: 3 * gib + PAGE,
                leaf: false
            },
            None
        )]
    );
    // A 2 MiB block: level 2; a 1 GiB block: level 1.
    t.tlb_mut().clear();
    t.unmap(0x4000_0000 + gib, 0x20_0000).unwrap();
    t.unmap(gib, gib).unwrap();
    assert_eq!(
        levels_of(&t),
        [
            (
                mmu::TlbOp::El2Va {
                    va: 0x4000_0000 + gib,
                    leaf: true
                },
                Some(2)
            ),
            (
                mmu::TlbOp::El2Va {
                    va: gib,
                    leaf: true
                },
                Some(1)
            ),
        ]
    );
}

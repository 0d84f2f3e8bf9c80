//! The contiguous hint (descriptor bit 52): set on whole aligned groups of 16 that a
//! map fills, removed with break-before-make before part of a group changes.

mod common;

use mmu::testing::{HeapFrames, RecordingTlb};
use mmu::{Attributes, El2, MapFlags, PageTable, Permissions, Stage2, TlbOp};

use common::{raw_lookup, GIB, MIB2, PAGE};

const CONT: u64 = 1 << 52;

fn rw() -> Attributes {
    Attributes::normal(Permissions::RW)
}

fn hinted<R: mmu::Regime, A: mmu::FrameAllocator, T: mmu::TlbMaintenance>(
    t: &PageTable<R, A, T>,
    va: u64,
    n: u64,
    step: u64,
) -> Vec<bool> {
    (0..n)
        .map(|k| raw_lookup(t, va + k * step).0 & CONT != 0)
        .collect()
}

#[test]
fn set_on_whole_aligned_groups_only() {
    let mut t = PageTable::new(El2::new(39), HeapFrames::new(), RecordingTlb::new()).unwrap();
    let base = GIB;
    // 40 pages from page 8: the group of pages 16..32 and 32..48 are whole.
    t.map(
        base + 8 * PAGE,
        base + 8 * PAGE,
        40 * PAGE,
        rw(),
        MapFlags::NO_BLOCKS,
    )
    .unwrap();
    let h = hinted(&t, base + 8 * PAGE, 40, PAGE);
    assert_eq!(h.iter().filter(|&&x| x).count(), 32, "{h:?}");
    assert!(h[8..40].iter().all(|&x| x) && h[..8].iter().all(|&x| !x));
    // An output not aligned to 64 KiB like the input: no hint.
    t.map(
        base + MIB2,
        2 * GIB + PAGE,
        32 * PAGE,
        rw(),
        MapFlags::empty(),
    )
    .unwrap();
    assert!(hinted(&t, base + MIB2, 32, PAGE).iter().all(|&x| !x));
    // Forbidden.
    t.map(
        base + 2 * MIB2,
        base,
        32 * PAGE,
        rw(),
        MapFlags::NO_CONTIGUOUS,
    )
    .unwrap();
    assert!(hinted(&t, base + 2 * MIB2, 32, PAGE).iter().all(|&x| !x));
    // Page by page: never.
    for k in 0..16 {
        t.map(
            base + 3 * MIB2 + k * PAGE,
            k * PAGE,
            PAGE,
            rw(),
            MapFlags::empty(),
        )
        .unwrap();
    }
    assert!(hinted(&t, base + 3 * MIB2, 16, PAGE).iter().all(|&x| !x));
    // 2 MiB blocks: 16 of them (32 MiB) aligned.
    t.map(2 * GIB, 3 * GIB, 34 * MIB2, rw(), MapFlags::empty())
        .unwrap();
    let h = hinted(&t, 2 * GIB, 34, MIB2);
    assert_eq!(raw_lookup(&t, 2 * GIB).1, 2);
    assert!(h[..32].iter().all(|&x| x) && !h[32] && !h[33], "{h:?}");
    // The translation itself is unchanged by the hint.
    assert_eq!(
        t.translate(2 * GIB + 5 * MIB2 + 7).unwrap().output,
        3 * GIB + 5 * MIB2 + 7
    );
}

#[test]
fn partial_change_removes_the_hint_from_the_group_first() {
    let mut t = PageTable::new(Stage2::new(4, 40), HeapFrames::new(), RecordingTlb::new()).unwrap();
    let ram = Attributes::normal(Permissions::RW | Permissions::EXEC_EL1 | Permissions::EXEC_EL0);
    t.map(GIB, GIB, 32 * PAGE, ram, MapFlags::NO_BLOCKS)
        .unwrap();
    assert!(hinted(&t, GIB, 32, PAGE).iter().all(|&x| x));
    t.tlb_mut().clear();
    t.unmap(GIB + 3 * PAGE, PAGE).unwrap();
    let h = hinted(&t, GIB, 32, PAGE);
    assert!(
        h[..16].iter().all(|&x| !x),
        "the touched group lost it: {h:?}"
    );
    assert!(h[16..].iter().all(|&x| x), "the other group keeps it");
    assert!(t.translate(GIB + 3 * PAGE).is_none());
    assert_eq!(t.translate(GIB + 4 * PAGE).unwrap().output, GIB + 4 * PAGE);
    // The first batch invalidates the 16 pages of the group (break-before-make),
    // before the page is unmapped and invalidated itself.
    let seqs = t.tlb().sequences();
    let first: Vec<_> = seqs[0]
        .iter()
        .filter(|o| matches!(o, TlbOp::Stage2Ipa { .. }))
        .collect();
    assert_eq!(first.len(), 16, "{seqs:?}");

    // Protecting a whole group keeps the hint; part of one removes it.
    t.tlb_mut().clear();
    t.protect(
        GIB + 16 * PAGE,
        16 * PAGE,
        Attributes::normal(Permissions::RO),
    )
    .unwrap();
    assert!(hinted(&t, GIB + 16 * PAGE, 16, PAGE).iter().all(|&x| x));
    assert_eq!(
        t.tlb().invalidations().len(),
        16 + 1,
        "16 pages + VMALLE1IS"
    );
    t.protect(GIB + 16 * PAGE, PAGE, ram).unwrap();
    assert!(hinted(&t, GIB + 16 * PAGE, 16, PAGE).iter().all(|&x| !x));
    // Unmapping whole groups needs no unfolding.
    t.map(2 * GIB, 2 * GIB, 16 * PAGE, ram, MapFlags::NO_BLOCKS)
        .unwrap();
    t.tlb_mut().clear();
    t.unmap(2 * GIB, 16 * PAGE).unwrap();
    assert_eq!(t.tlb().sequences().len(), 1);
}

#[test]
fn splits_and_merges_drop_the_hint() {
    let mut t = PageTable::new(El2::new(39), HeapFrames::new(), RecordingTlb::new()).unwrap();
    // 16 blocks of 2 MiB with the hint; a page inside one is unmapped: the blocks
    // lose the hint, the split block's pages never had it.
    t.map(GIB, GIB, 16 * MIB2, rw(), MapFlags::empty()).unwrap();
    assert!(hinted(&t, GIB, 16, MIB2).iter().all(|&x| x));
    t.unmap(GIB + 5 * MIB2 + PAGE, PAGE).unwrap();
    let h = hinted(&t, GIB, 16, MIB2);
    assert!(h.iter().all(|&x| !x), "{h:?}");
    assert_eq!(raw_lookup(&t, GIB + 5 * MIB2).1, 3);
    assert!(hinted(&t, GIB + 5 * MIB2, 512, PAGE).iter().all(|&x| !x));
    // Mapping the page back makes the table uniform: merged into a block without
    // the hint.
    t.map(
        GIB + 5 * MIB2 + PAGE,
        GIB + 5 * MIB2 + PAGE,
        PAGE,
        rw(),
        MapFlags::empty(),
    )
    .unwrap();
    let (d, level) = raw_lookup(&t, GIB + 5 * MIB2);
    assert_eq!((level, d & CONT), (2, 0));
    // A table of hinted pages merges too (the hint inside does not matter).
    t.map(GIB + 20 * MIB2, GIB, 256 * PAGE, rw(), MapFlags::empty())
        .unwrap();
    t.map(
        GIB + 20 * MIB2 + 256 * PAGE,
        GIB + 256 * PAGE,
        256 * PAGE,
        rw(),
        MapFlags::empty(),
    )
    .unwrap();
    let (d, level) = raw_lookup(&t, GIB + 20 * MIB2);
    assert_eq!((level, d & CONT), (2, 0));
    // A REPLACE of the same mapping changes nothing, hint included.
    t.map(GIB + 40 * MIB2, GIB, 64 * PAGE, rw(), MapFlags::NO_BLOCKS)
        .unwrap();
    t.tlb_mut().clear();
    t.map(
        GIB + 40 * MIB2,
        GIB,
        64 * PAGE,
        rw(),
        MapFlags::NO_BLOCKS | MapFlags::REPLACE,
    )
    .unwrap();
    assert!(t.tlb().invalidations().is_empty());
    assert!(hinted(&t, GIB + 40 * MIB2, 64, PAGE).iter().all(|&x| x));
}

#[test]
fn replacing_part_of_a_hinted_block_with_the_same_mapping_changes_nothing() {
    // 32 MiB of 2 MiB blocks: one group of 16 with the hint. Mapping one page (or 1 MiB)
    // inside it again, as it is, neither splits the block nor unfolds the group.
    let mut t = PageTable::new(Stage2::new(3, 40), HeapFrames::new(), RecordingTlb::new()).unwrap();
    let (ipa, pa) = (GIB, 8 * GIB);
    t.map(ipa, pa, 16 * MIB2, rw(), MapFlags::empty()).unwrap();
    assert!(hinted(&t, ipa, 16, MIB2).iter().all(|&h| h));
    let frames = t.frames_in_use();
    t.tlb_mut().clear();
    let at = ipa + 5 * MIB2 + 7 * PAGE;
    t.map(at, pa + (at - ipa), PAGE, rw(), MapFlags::REPLACE)
        .unwrap();
    t.map(at, pa + (at - ipa), MIB2 / 2, rw(), MapFlags::REPLACE)
        .unwrap();
    assert_eq!(t.tlb().invalidations(), Vec::<TlbOp>::new());
    assert_eq!(t.frames_in_use(), frames);
    assert!(hinted(&t, ipa, 16, MIB2).iter().all(|&h| h));
    // A different output does change it: split, with the group unfolded first.
    t.map(at, 0x10 * GIB, PAGE, rw(), MapFlags::REPLACE)
        .unwrap();
    assert!(!t.tlb().invalidations().is_empty());
    assert!(!hinted(&t, ipa, 16, MIB2).iter().all(|&h| h));
}

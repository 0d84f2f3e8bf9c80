//! Break-before-make on live tables, observed from inside the TLB maintenance, and
//! fault injection (allocator failing at the Nth frame).

mod common;

use mmu::testing::{HeapFrames, RecordingTlb};
use mmu::{
    Attributes, El2, Error, MapFlags, MemoryType, PageTable, Permissions, Regime, Stage2,
    TlbMaintenance, TlbOp, TlbSequence,
};
use proptest::prelude::*;

const PAGE: u64 = 4096;
const MIB2: u64 = 2 << 20;
const GIB: u64 = 1 << 30;

/// One maintenance sequence and the (descriptor, level) seen at each watched address.
type Seen = (Vec<TlbOp>, Vec<(u64, u8)>);

/// Records each maintenance sequence together with what a table walker would see at
/// the watched addresses at that moment.
#[derive(Default)]
struct SnoopTlb {
    root: u64,
    start_level: u8,
    watch: Vec<u64>,
    seen: Vec<Seen>,
}

impl TlbMaintenance for SnoopTlb {
    fn execute(&mut self, seq: &TlbSequence<'_>) {
        let seen = self
            .watch
            .iter()
            .map(|&va| common::raw_lookup_at(self.root, self.start_level, va))
            .collect();
        self.seen.push((seq.ops().to_vec(), seen));
    }
}

fn snooped<R: Regime>(regime: R, watch: &[u64]) -> PageTable<R, HeapFrames, SnoopTlb> {
    let mut t = PageTable::new(regime, HeapFrames::new(), SnoopTlb::default()).unwrap();
    let (root, start_level) = (t.root_address(), t.geometry().start_level());
    let tlb = t.tlb_mut();
    tlb.root = root;
    tlb.start_level = start_level;
    tlb.watch = watch.to_vec();
    t
}

fn invalidations(seq: &[TlbOp]) -> usize {
    seq.iter().filter(|o| !o.is_barrier()).count()
}

#[test]
fn remap_output_is_break_before_make() {
    let va = 0x1234_5000;
    let mut t = snooped(El2::new(39), &[va]);
    let rw = Attributes::normal(Permissions::RW);
    t.map(va, 0x8000_0000, PAGE, rw, MapFlags::empty()).unwrap();
    // New mapping: barriers only, and the entry was already valid when they ran.
    let (seq, seen) = t.tlb().seen.last().unwrap();
    assert_eq!(seq, &vec![TlbOp::DsbIshSt, TlbOp::Isb]);
    assert_eq!(seen[0].0 & 1, 1);
    t.tlb_mut().seen.clear();

    t.map(va, 0x9000_0000, PAGE, rw, MapFlags::REPLACE).unwrap();
    let tlbis: Vec<_> = t
        .tlb()
        .seen
        .iter()
        .filter(|(s, _)| invalidations(s) > 0)
        .collect();
    assert_eq!(tlbis.len(), 1);
    let (seq, seen) = tlbis[0];
    assert!(seq.contains(&TlbOp::El2Va { va, leaf: true }));
    assert_eq!(
        seen[0].0 & 1,
        0,
        "entry must be invalid while the TLBI runs"
    );
    assert_eq!(t.translate(va).unwrap().output, 0x9000_0000);
}

#[test]
fn memory_type_change_is_bbm_permission_change_is_not() {
    let ipa = 0x4000_0000;
    let mut t = snooped(Stage2::new(5, 40), &[ipa]);
    let rw = Attributes::normal(Permissions::RW);
    t.map(ipa, 0x8000_0000, PAGE, rw, MapFlags::empty())
        .unwrap();
    t.tlb_mut().seen.clear();
    t.protect(
        ipa,
        PAGE,
        Attributes::new(Permissions::RW, MemoryType::DeviceNGnRE),
    )
    .unwrap();
    let (seq, seen) = t
        .tlb()
        .seen
        .iter()
        .find(|(s, _)| invalidations(s) > 0)
        .unwrap();
    assert_eq!(seen[0].0 & 1, 0, "memory type change: invalid during TLBI");
    assert!(matches!(
        seq[1],
        TlbOp::Stage2Ipa {
            vmid: 5,
            ipa: 0x4000_0000,
            ..
        }
    ));
    assert_eq!(
        t.translate(ipa).unwrap().attrs.mem_type,
        MemoryType::DeviceNGnRE
    );

    t.tlb_mut().seen.clear();
    t.protect(
        ipa,
        PAGE,
        Attributes::new(Permissions::RO, MemoryType::DeviceNGnRE),
    )
    .unwrap();
    assert_eq!(
        t.tlb().seen.len(),
        1,
        "permission change: one sequence, no BBM"
    );
    let (seq, seen) = &t.tlb().seen[0];
    assert_eq!(seen[0].0 & 1, 1, "permission change writes in place");
    assert_eq!(
        seen[0].0 >> 7 & 1,
        0,
        "already read-only when the TLBI runs"
    );
    // DSB ISHST; IPAS2LE1IS; DSB ISH; VMALLE1IS; DSB ISH; ISB
    assert_eq!(seq.len(), 6);
    assert!(matches!(seq[3], TlbOp::Stage2Stage1All { vmid: 5, .. }));
}

#[test]
fn block_split_and_merge_are_break_before_make() {
    let base = 0x4000_0000;
    let mut t = snooped(El2::new(39), &[base]);
    let rw = Attributes::normal(Permissions::RW);
    t.map(base, 0x8000_0000, MIB2, rw, MapFlags::empty())
        .unwrap();
    assert_eq!(t.translate(base).unwrap().level, 2);
    t.tlb_mut().seen.clear();
    // Split: the 2 MiB block is invalid while its TLBI runs, then becomes a table.
    t.unmap(base + 5 * PAGE, PAGE).unwrap();
    let (_, seen) = t
        .tlb()
        .seen
        .iter()
        .find(|(s, _)| {
            s.contains(&TlbOp::El2Va {
                va: base,
                leaf: true,
            })
        })
        .unwrap();
    assert_eq!(seen[0], (seen[0].0, 2));
    assert_eq!(seen[0].0 & 1, 0);
    assert_eq!(t.translate(base).unwrap().level, 3);
    // Root (level 1), one level-2 and one level-3 table.
    assert_eq!(t.frames_in_use(), 3);
    // Mapping the hole back makes the table uniform: merged into a block, BBM again,
    // and the table is freed.
    t.tlb_mut().seen.clear();
    t.map(base + 5 * PAGE, 0x8000_5000, PAGE, rw, MapFlags::empty())
        .unwrap();
    let (seq, seen) = t
        .tlb()
        .seen
        .iter()
        .find(|(s, _)| invalidations(s) > 0)
        .unwrap();
    assert_eq!(
        seen[0].0 & 1,
        0,
        "level-2 entry invalid during the merge TLBI"
    );
    assert!(
        seq.contains(&TlbOp::El2All),
        "512 leaves + walk cache: whole-regime TLBI"
    );
    let tr = t.translate(base + 0x1234).unwrap();
    assert_eq!((tr.level, tr.output), (2, 0x8000_1234));
    assert_eq!(t.frames_in_use(), 2);
    assert_eq!(t.allocator().in_use(), 2);
}

#[test]
fn threshold_switches_to_whole_vm_invalidation() {
    let mut t = PageTable::new(Stage2::new(8, 40), HeapFrames::new(), RecordingTlb::new()).unwrap();
    t.set_tlbi_threshold(4);
    let rw = Attributes::normal(Permissions::RW);
    // No contiguous hint: removing it from the group would be 16 invalidations.
    t.map(
        0,
        0x8000_0000,
        16 * PAGE,
        rw,
        MapFlags::NO_BLOCKS | MapFlags::NO_CONTIGUOUS,
    )
    .unwrap();
    t.unmap(0, 4 * PAGE).unwrap();
    let inv = t.tlb().invalidations();
    assert_eq!(
        inv.iter()
            .filter(|o| matches!(o, TlbOp::Stage2Ipa { .. }))
            .count(),
        4
    );
    assert!(!inv.iter().any(|o| matches!(o, TlbOp::Stage2All { .. })));
    t.tlb_mut().clear();
    t.unmap(4 * PAGE, 5 * PAGE).unwrap();
    let inv = t.tlb().invalidations();
    assert_eq!(inv.len(), 1);
    assert!(matches!(inv[0], TlbOp::Stage2All { vmid: 8, .. }));
}

#[test]
fn unmap_in_a_gib_block_fails_cleanly_for_each_missing_frame() {
    let mut t = PageTable::new(El2::new(39), HeapFrames::new(), RecordingTlb::new()).unwrap();
    t.map(
        GIB,
        GIB,
        GIB,
        Attributes::normal(Permissions::RW),
        MapFlags::empty(),
    )
    .unwrap();
    let live = t.allocator().live();
    t.tlb_mut().clear();
    // Splitting the 1 GiB block down to one page needs two tables.
    for n in 0..2 {
        t.allocator().fail_after(Some(n));
        assert_eq!(t.unmap(GIB + 0x20_3000, PAGE), Err(Error::OutOfFrames));
        assert_eq!(t.allocator().live(), live);
        assert_eq!(t.translate(GIB + 0x20_3000).unwrap().level, 1);
        assert!(t.tlb().sequences().is_empty());
    }
    t.allocator().fail_after(Some(2));
    t.unmap(GIB + 0x20_3000, PAGE).unwrap();
    assert!(t.translate(GIB + 0x20_3000).is_none());
    assert_eq!(t.allocator().in_use(), live.len() + 2);
}

#[derive(Clone, Debug)]
enum Op {
    Map(u64, u64, u64, bool),
    Unmap(u64, u64),
    Protect(u64, u64),
}

fn addr() -> impl Strategy<Value = u64> {
    (
        0..3u64,
        prop::sample::select(vec![0u64, 1, 511]),
        prop::sample::select(vec![0u64, 1, 511]),
    )
        .prop_map(|(g, m, p)| g * GIB + m * MIB2 + p * PAGE)
}

/// Operations; `big` adds 1 GiB sizes (which may need 513 frames).
fn op(big: bool) -> impl Strategy<Value = Op> {
    let mut sizes = vec![PAGE, 3 * PAGE, MIB2, MIB2 + PAGE, 3 * MIB2 + 5 * PAGE];
    if big {
        sizes.push(GIB);
    }
    let size = prop::sample::select(sizes);
    prop_oneof![
        (
            addr(),
            size.clone(),
            prop::sample::select(vec![0u64, GIB, PAGE]),
            any::<bool>()
        )
            .prop_map(|(va, s, d, nb)| Op::Map(va, va + d, s, nb)),
        (addr(), size.clone()).prop_map(|(va, s)| Op::Unmap(va, s)),
        (addr(), size).prop_map(|(va, s)| Op::Protect(va, s)),
    ]
}

fn apply<R: Regime>(t: &mut PageTable<R, &HeapFrames, RecordingTlb>, op: &Op) -> Result<(), Error> {
    match *op {
        Op::Map(va, pa, s, nb) => {
            let f = if nb {
                MapFlags::NO_BLOCKS | MapFlags::REPLACE
            } else {
                MapFlags::REPLACE
            };
            t.map(va, pa, s, Attributes::normal(Permissions::RW), f)
        }
        Op::Unmap(va, s) => t.unmap(va, s),
        Op::Protect(va, s) => t.protect(va, s, Attributes::normal(Permissions::RO)),
    }
}

fn snapshot<R: Regime>(t: &PageTable<R, &HeapFrames, RecordingTlb>) -> Vec<mmu::Mapping> {
    let mut v = Vec::new();
    t.walk(0, t.geometry().input_size(), |m| v.push(*m))
        .unwrap();
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// For every N: an operation whose allocator fails at the Nth frame returns
    /// `OutOfFrames`, leaves every translation and the allocator exactly as before and
    /// issues no TLB maintenance; with enough frames it succeeds.
    #[test]
    fn failing_allocator_leaves_everything_unchanged(setup in prop::collection::vec(op(true), 0..6), last in op(false)) {
        let frames = HeapFrames::new();
        let mut t = PageTable::new(Stage2::new(2, 40), &frames, RecordingTlb::new()).unwrap();
        for o in &setup {
            let _ = apply(&mut t, o);
        }
        let before = snapshot(&t);
        let live = frames.live();
        let counted = t.frames_in_use();
        let mut n = 0;
        loop {
            frames.fail_after(Some(n));
            t.tlb_mut().clear();
            match apply(&mut t, &last) {
                Err(Error::OutOfFrames) => {
                    prop_assert_eq!(&snapshot(&t), &before);
                    prop_assert_eq!(&frames.live(), &live);
                    prop_assert_eq!(t.frames_in_use(), counted);
                    prop_assert!(t.tlb().sequences().is_empty());
                    n += 1;
                    prop_assert!(n < 64, "operation never succeeds");
                }
                Ok(()) => break,
                Err(e) => panic!("unexpected {e:?}"),
            }
        }
        frames.fail_after(None);
        prop_assert_eq!(t.frames_in_use(), frames.in_use());
    }
}

/// Descriptor bits whose change needs break-before-make: output address, type
/// (block size), memory type, shareability, nG, contiguous (Arm ARM D8.17.1).
const BBM_BITS: u64 =
    0x0000_FFFF_FFFF_F000 | 0b11 | (0xF << 2) | (0b11 << 8) | (1 << 11) | (1 << 52);

fn attrs_of(i: usize) -> Attributes {
    [
        Attributes::normal(Permissions::RW),
        Attributes::normal(Permissions::RO),
        Attributes::device(),
    ][i]
}

#[derive(Clone, Debug)]
enum BbmOp {
    Map(u64, u64, u64, usize, bool),
    Protect(u64, u64, usize),
    Unmap(u64, u64),
}

fn bbm_op() -> impl Strategy<Value = BbmOp> {
    let size = prop::sample::select(vec![PAGE, 3 * PAGE, MIB2, MIB2 + PAGE, 2 * MIB2]);
    let delta = prop::sample::select(vec![0u64, GIB, 2 * MIB2, PAGE]);
    prop_oneof![
        3 => (addr(), delta, size.clone(), 0..3usize, any::<bool>())
            .prop_map(|(va, d, s, a, nb)| BbmOp::Map(va, va + d, s, a, nb)),
        2 => (addr(), size.clone(), 0..3usize).prop_map(|(va, s, a)| BbmOp::Protect(va, s, a)),
        1 => (addr(), size).prop_map(|(va, s)| BbmOp::Unmap(va, s)),
    ]
}

fn bbm_apply<R: Regime>(t: &mut PageTable<R, HeapFrames, SnoopTlb>, op: &BbmOp) {
    let r = match *op {
        BbmOp::Map(va, pa, s, a, nb) => {
            let f = if nb {
                MapFlags::REPLACE | MapFlags::NO_BLOCKS
            } else {
                MapFlags::REPLACE
            };
            t.map(va, pa, s, attrs_of(a), f)
        }
        BbmOp::Protect(va, s, a) => t.protect(va, s, attrs_of(a)),
        BbmOp::Unmap(va, s) => t.unmap(va, s),
    };
    assert_eq!(r, Ok(()), "{op:?}");
}

/// Output address and BBM-relevant bits of the leaf translating `va`, with its level.
fn leaf_key(d: u64, level: u8, va: u64) -> Option<(u64, u64, u8)> {
    if d & 1 == 0 {
        return None;
    }
    let size = 1u64 << common::shift(level);
    Some((
        (d & 0x0000_FFFF_FFFF_F000 & !(size - 1)) + (va & (size - 1)),
        d & BBM_BITS & !0x0000_FFFF_FFFF_F000,
        level,
    ))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Whenever a valid translation changes in a way that needs break-before-make, the
    /// first maintenance sequence that invalidates it runs while the entry is invalid,
    /// and no earlier sequence ever sees the new entry.
    #[test]
    fn live_changes_are_break_before_make(setup in prop::collection::vec(bbm_op(), 1..6), last in bbm_op()) {
        let mut watch = Vec::new();
        for g in 0..3u64 {
            for m in [0u64, 1, 511] {
                for p in [0u64, 1, 2, 511] {
                    watch.push(g * GIB + m * MIB2 + p * PAGE);
                }
            }
        }
        let mut t = snooped(Stage2::new(11, 40), &watch);
        for o in &setup {
            bbm_apply(&mut t, o);
        }
        let old: Vec<(u64, u8)> = watch.iter().map(|&w| common::raw_lookup(&t, w)).collect();
        t.tlb_mut().seen.clear();
        bbm_apply(&mut t, &last);
        let seen = std::mem::take(&mut t.tlb_mut().seen);
        for (k, &w) in watch.iter().enumerate() {
            let (od, ol) = old[k];
            let (nd, nl) = common::raw_lookup(&t, w);
            let (Some(before), Some(after)) = (leaf_key(od, ol, w), leaf_key(nd, nl, w)) else {
                continue;
            };
            if before == after {
                continue;
            }
            let size = 1u64 << common::shift(ol);
            let leaf_va = w & !(size - 1);
            // The first sequence that sees the entry changed (invalid or new).
            let Some(changed) = seen.iter().position(|(_, snap)| leaf_key(snap[k].0, snap[k].1, w) != Some(before)) else {
                panic!("{w:#x}: {before:x?} -> {after:x?} by {last:?} with no maintenance after the change");
            };
            // From then on, the first sequence invalidating the old leaf.
            let first = (changed..seen.len()).find(|&i| {
                seen[i].0.iter().any(|o| match *o {
                    TlbOp::Stage2All { .. } => true,
                    TlbOp::Stage2Ipa { ipa, .. } => ipa >= leaf_va && ipa < leaf_va + size,
                    _ => false,
                })
            });
            let Some(first) = first else {
                panic!("{w:#x}: {before:x?} -> {after:x?} by {last:?} without TLBI");
            };
            prop_assert_eq!(seen[first].1[k].0 & 1, 0, "{:#x} valid during its TLBI ({:?})", w, last);
            for (_, snap) in &seen[changed..first] {
                let (d, l) = snap[k];
                prop_assert!(leaf_key(d, l, w) != Some(after), "{:#x}: new entry visible before its TLBI", w);
            }
        }
    }
}

//! Property tests: random operation sequences on each regime against a simple model.
//!
//! After every operation: the table's translations equal the model's; every leaf or
//! table entry that changed was covered by a TLB invalidation (for the right regime,
//! VMID or ASID) recorded before the call returned, in correctly shaped sequences;
//! frames allocated minus frames freed equals the reachable tables; a failed
//! operation changed nothing and issued no maintenance. At the end, unmapping
//! everything leaves only the root.

mod common;

use std::collections::HashMap;

use mmu::testing::model::{runs_of, Model};
use mmu::testing::{HeapFrames, RecordingTlb};
use mmu::{
    Attributes, El1, El2, Error, MapFlags, PageTable, Regime, Stage2, SwBits, TableAttrs,
    TlbContext, TlbOp,
};
use proptest::prelude::*;

use common::{el1_attrs, el2_attrs, op, s2_attrs, s2_xnx_attrs, Op, PAGE};

/// The leaves of the table as (va, level, output, attrs).
fn leaves<R: Regime>(t: &PageTable<R, HeapFrames, RecordingTlb>) -> Vec<mmu::Mapping> {
    let mut v = Vec::new();
    t.walk(0, t.geometry().input_size(), |m| v.push(*m))
        .unwrap();
    v
}

/// Which TLB operations belong to this table, and whether `op` covers `[va, va+size)`
/// (leaf: last-level entries only; otherwise walk caches too).
trait Tag: Regime {
    fn ours(&self, op: &TlbOp) -> bool;
    /// The table attributes the regime accepts.
    fn table_attrs(&self) -> TableAttrs {
        TableAttrs::empty()
    }
    /// The context every sequence of the table rooted at `root` must run in.
    fn context(&self, root: u64) -> TlbContext {
        let _ = root;
        TlbContext::Current
    }
}
impl Tag for El2 {
    fn table_attrs(&self) -> TableAttrs {
        TableAttrs::NO_WRITE | TableAttrs::NO_EXEC_EL2
    }
    fn ours(&self, op: &TlbOp) -> bool {
        matches!(
            op,
            TlbOp::El2Va { .. } | TlbOp::El2Range { .. } | TlbOp::El2All
        )
    }
}
impl Tag for Stage2 {
    fn ours(&self, op: &TlbOp) -> bool {
        match *op {
            TlbOp::Stage2Ipa { vmid, .. }
            | TlbOp::Stage2Range { vmid, .. }
            | TlbOp::Stage2All { vmid }
            | TlbOp::Stage2Stage1All { vmid } => vmid == self.vmid(),
            _ => false,
        }
    }
    fn context(&self, root: u64) -> TlbContext {
        TlbContext::Stage2 {
            vttbr: self.vttbr(root),
            vtcr: self.vtcr().unwrap(),
        }
    }
}
impl Tag for El1 {
    fn table_attrs(&self) -> TableAttrs {
        TableAttrs::all() - TableAttrs::NO_EXEC_EL2
    }
    fn ours(&self, op: &TlbOp) -> bool {
        match *op {
            TlbOp::El1Va { asid, .. } | TlbOp::El1Range { asid, .. } | TlbOp::El1Asid { asid } => {
                asid == self.asid()
            }
            _ => false,
        }
    }
}

/// Whether `op` invalidates an entry that translates `[va, va + size)`: an address
/// operation must name an address in it; a range operation must overlap it (an entry
/// used to translate any address of the range is invalidated, Arm ARM D8.16).
fn covers(op: &TlbOp, va: u64, size: u64, need_nonleaf: bool) -> bool {
    let hit = |a: u64, leaf: bool| a >= va && a < va + size && (!need_nonleaf || !leaf);
    let overlap = |a: u64, pages: u64, leaf: bool| {
        a < va + size && va < a + pages * PAGE && (!need_nonleaf || !leaf)
    };
    match *op {
        TlbOp::El2All | TlbOp::Stage2All { .. } | TlbOp::El1Asid { .. } => true,
        TlbOp::El2Va { va: a, leaf } | TlbOp::El1Va { va: a, leaf, .. } => hit(a, leaf),
        TlbOp::Stage2Ipa { ipa, leaf, .. } => hit(ipa, leaf),
        TlbOp::El2Range { va: a, pages, leaf }
        | TlbOp::El1Range {
            va: a, pages, leaf, ..
        }
        | TlbOp::Stage2Range {
            ipa: a,
            pages,
            leaf,
            ..
        } => overlap(a, pages, leaf),
        _ => false,
    }
}

/// Checks the shape of one maintenance sequence: DSB ISHST first, ISB last, every
/// group of TLBIs followed by DSB ISH, and per-IPA stage-2 TLBIs followed by VMALLE1IS.
fn check_sequence(seq: &[TlbOp]) {
    assert_eq!(seq.first(), Some(&TlbOp::DsbIshSt), "{seq:?}");
    assert_eq!(seq.last(), Some(&TlbOp::Isb), "{seq:?}");
    let mut pending_tlbi = false;
    let mut pending_ipa = false;
    for op in seq {
        match op {
            TlbOp::DsbIsh => pending_tlbi = false,
            TlbOp::DsbIshSt | TlbOp::Isb => assert!(!pending_tlbi, "TLBI not completed: {seq:?}"),
            TlbOp::Stage2Ipa { .. } | TlbOp::Stage2Range { .. } => {
                pending_tlbi = true;
                pending_ipa = true;
            }
            TlbOp::Stage2Stage1All { .. } | TlbOp::Stage2All { .. } => {
                pending_tlbi = true;
                pending_ipa = false;
            }
            _ => pending_tlbi = true,
        }
    }
    assert!(!pending_ipa, "IPAS2E1IS without VMALLE1IS: {seq:?}");
}

fn run<R: Tag + Copy>(regime: R, attrs: &[Attributes], ops: &[Op], threshold: usize, ranges: bool) {
    let mut t = PageTable::new(regime, HeapFrames::new(), RecordingTlb::new()).unwrap();
    t.set_tlbi_threshold(threshold);
    t.set_tlbi_range(ranges);
    let roots = t.frames_in_use();
    let mut model = Model::default();
    // Ranges given table attributes, cleared again at the end.
    let mut attributed = Vec::new();
    for op in ops {
        let before = leaves(&t);
        let raw_before = common::raw_leaves(&t);
        let tables_before = common::table_entries(&t);
        let live_before = t.allocator().live();
        t.tlb_mut().clear();
        let (result, expect_conflict) = match *op {
            Op::Map {
                va,
                pages,
                out,
                attrs: ai,
                flags,
            } => {
                let end = va + pages * PAGE;
                let conflict = if flags.contains(MapFlags::REPLACE) {
                    None
                } else {
                    model.first_mapped(va, end)
                };
                let r = t.map(va, out, pages * PAGE, attrs[ai], flags);
                if r.is_ok() {
                    model.insert(va, end, out, attrs[ai]);
                }
                (r, conflict)
            }
            Op::Unmap { va, pages } => {
                let r = t.unmap(va, pages * PAGE);
                if r.is_ok() {
                    model.remove(va, va + pages * PAGE);
                }
                (r, None)
            }
            Op::Protect {
                va,
                pages,
                attrs: ai,
            } => {
                let r = t.protect(va, pages * PAGE, attrs[ai]);
                if r.is_ok() {
                    model.update(va, va + pages * PAGE, |_| attrs[ai]);
                }
                (r, None)
            }
            Op::Coalesce { .. } => (Ok(()), None),
            Op::TableAttrs { va, size, attrs } => {
                let a = TableAttrs::from_bits_truncate(attrs);
                let r = t.set_table_attrs(va, size, a);
                if r.is_ok() {
                    attributed.push((va, size));
                    // The limits reach every address of the range.
                    for probe in [va, va + size / 2, va + size - PAGE] {
                        assert!(t.table_attrs(probe).contains(a), "{op:?} at {probe:#x}");
                    }
                }
                if t.regime().table_attrs().contains(a) {
                    (r, None)
                } else {
                    assert_eq!(r, Err(Error::UnsupportedAttributes), "{op:?}");
                    (Ok(()), None)
                }
            }
            Op::SetSw { va, pages, sw } => {
                let sw = SwBits::new(sw).unwrap();
                let r = t.set_sw_bits(va, pages * PAGE, sw);
                if r.is_ok() {
                    model.update(va, va + pages * PAGE, |a| a.with_sw(sw));
                }
                (r, None)
            }
        };
        let result = match *op {
            Op::Coalesce { va, pages } => {
                let tables = common::reachable_tables(&t);
                let r = t.coalesce(va, pages * PAGE);
                assert!(common::reachable_tables(&t) <= tables);
                r
            }
            _ => result,
        };
        match (result, expect_conflict) {
            (Ok(()), None) => {}
            (Err(Error::AlreadyMapped { va }), Some(first)) => assert_eq!(va, first, "{op:?}"),
            (r, c) => panic!("{op:?}: result {r:?}, model conflict {c:?}"),
        }
        let after = leaves(&t);
        assert_eq!(
            runs_of(&after),
            model.canonical(),
            "translations after {op:?}"
        );
        // Spot-check translate against walk.
        for m in after.iter().step_by(97).take(50) {
            let tr = t.translate(m.va + m.size / 2).unwrap();
            assert_eq!(tr.output, m.output + m.size / 2);
            assert_eq!((tr.attrs, tr.level), (m.attrs, m.level));
        }
        // Frame accounting.
        common::check_counts(&t);
        let reachable = common::reachable_tables(&t);
        assert_eq!(
            t.allocator().in_use(),
            roots + reachable,
            "frames after {op:?}"
        );
        assert_eq!(t.frames_in_use(), roots + reachable);

        let seqs = t.tlb().sequences().to_vec();
        if result.is_err() {
            assert_eq!(after, before, "failed {op:?} changed the table");
            assert_eq!(
                t.allocator().live(),
                live_before,
                "failed {op:?} leaked or freed frames"
            );
            assert!(seqs.is_empty(), "failed {op:?} issued maintenance");
            continue;
        }
        for seq in &seqs {
            check_sequence(seq);
        }
        let ops: Vec<TlbOp> = seqs
            .iter()
            .flatten()
            .copied()
            .filter(|o| !o.is_barrier())
            .collect();
        for o in &ops {
            assert!(t.regime().ours(o), "foreign TLB op {o:?} after {op:?}");
        }
        let want = t.regime().context(t.root_address());
        for (seq, ctx) in seqs.iter().zip(t.tlb().contexts()) {
            if seq.iter().any(|o| !o.is_barrier()) {
                assert_eq!(*ctx, want, "context of {seq:?} after {op:?}");
            }
        }
        // Every leaf that is not still present unchanged (ignoring software bits) was invalidated.
        let now: HashMap<(u64, u8), (u64, Attributes)> = after
            .iter()
            .map(|m| ((m.va, m.level), (m.output, m.attrs.with_sw(SwBits::NONE))))
            .collect();
        for m in &before {
            let same =
                now.get(&(m.va, m.level)) == Some(&(m.output, m.attrs.with_sw(SwBits::NONE)));
            if !same {
                assert!(
                    ops.iter().any(|o| covers(o, m.va, m.size, false)),
                    "leaf {m:x?} changed by {op:?} without TLBI: {ops:x?}"
                );
            }
        }
        // Leaves whose descriptor changed other than in software bits (the contiguous
        // hint included: removing it from a group is a change of all 16).
        let raw_now = common::raw_leaves(&t);
        let changed_leaves = raw_before
            .iter()
            .filter(|(k, d)| {
                raw_now
                    .get(k)
                    .is_none_or(|n| (*n ^ **d) & !(0xF << 55) != 0)
            })
            .count();
        // Entries that lost the contiguous hint: removing it is a batch of its own
        // (break-before-make of the group), so an entry the operation then changes is
        // invalidated once more.
        let unfolded = raw_before
            .iter()
            .filter(|(k, d)| {
                **d & (1 << 52) != 0 && raw_now.get(k).is_none_or(|n| n & (1 << 52) == 0)
            })
            .count();
        // Every table entry that went away was invalidated with a non-leaf TLBI.
        let tables_now: std::collections::HashSet<_> =
            common::table_entries(&t).into_iter().collect();
        for e in &tables_before {
            if !tables_now.contains(e) {
                let size = 1u64 << common::shift(e.0);
                assert!(
                    ops.iter().any(|o| covers(o, e.1, size, true)),
                    "table entry {e:x?} removed by {op:?} without non-leaf TLBI: {ops:x?}"
                );
            }
        }
        // Minimal: without a whole-regime invalidation, at most one TLBI per changed
        // leaf or removed table entry.
        let removed_tables = tables_before
            .iter()
            .filter(|e| !tables_now.contains(e))
            .count();
        let full = ops.iter().any(|o| {
            matches!(
                o,
                TlbOp::El2All | TlbOp::Stage2All { .. } | TlbOp::El1Asid { .. }
            )
        });
        let by_address = ops
            .iter()
            .filter(|o| {
                matches!(
                    o,
                    TlbOp::El2Va { .. }
                        | TlbOp::Stage2Ipa { .. }
                        | TlbOp::El1Va { .. }
                        | TlbOp::El2Range { .. }
                        | TlbOp::Stage2Range { .. }
                        | TlbOp::El1Range { .. }
                )
            })
            .count();
        // Table attributes change no leaf, yet invalidate what lies below them.
        let table_op = matches!(op, Op::TableAttrs { .. });
        if !full && !table_op {
            assert!(
                by_address <= changed_leaves + removed_tables + unfolded,
                "{op:?}: {by_address} TLBIs for {changed_leaves} leaves and {removed_tables} tables: {ops:x?}"
            );
        }
        // Only new mappings: no TLBI at all.
        if before.iter().all(|m| {
            now.get(&(m.va, m.level))
                .is_some_and(|x| x.0 == m.output && x.1 == m.attrs.with_sw(SwBits::NONE))
        }) && tables_before.iter().all(|e| tables_now.contains(e))
            && !table_op
        {
            assert!(
                ops.is_empty(),
                "{op:?} invalidated although nothing valid changed: {ops:x?}"
            );
        }
    }
    t.unmap(0, t.geometry().input_size()).unwrap();
    assert!(leaves(&t).is_empty());
    // Held tables stay until their attributes are cleared.
    for &(va, size) in attributed.iter().rev() {
        t.set_table_attrs(va, size, TableAttrs::empty()).unwrap();
    }
    assert_eq!(
        t.allocator().in_use(),
        roots,
        "unmapping everything leaves only the root"
    );
    assert_eq!(t.frames_in_use(), roots);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn el2_matches_model(ops in prop::collection::vec(op(5), 1..14), threshold in 1usize..40, ranges: bool) {
        run(El2::new(39), &el2_attrs(), &ops, threshold, ranges);
    }

    #[test]
    fn stage2_matches_model(ops in prop::collection::vec(op(5), 1..14), vmid in 1u16..300, threshold in 1usize..64, ranges: bool) {
        run(Stage2::new(vmid, 40).with_vmid16(true), &s2_attrs(), &ops, threshold, ranges);
    }

    #[test]
    fn stage2_xnx_fwb_matches_model(ops in prop::collection::vec(op(5), 1..14)) {
        run(Stage2::new(9, 36).with_xnx(true).with_fwb(true), &s2_xnx_attrs(), &ops, 16, false);
    }

    #[test]
    fn stage2_concatenated_l2_root_matches_model(ops in prop::collection::vec(op(5), 1..14)) {
        // 34-bit IPA: 16 concatenated level-2 root tables.
        run(Stage2::new(3, 34), &s2_attrs(), &ops, 64, true);
    }

    #[test]
    fn el1_matches_model(ops in prop::collection::vec(op(5), 1..14), asid in 0u16..256, ranges: bool) {
        run(El1::new(asid, 48).with_asid16(true), &el1_attrs(), &ops, 8, ranges);
    }
}

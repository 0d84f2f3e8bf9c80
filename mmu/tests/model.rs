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
use mmu::testing::ops::{
    check_tables, covers, el1_attrs, el2_attrs, leaves, s2_attrs, s2_xnx_attrs, Op, Ours,
};
use mmu::testing::{HeapFrames, RecordingTlb};
use mmu::{Attributes, El1, El2, Error, PageTable, Stage2, SwBits, TableAttrs, TlbContext, TlbOp};
use proptest::prelude::*;

use common::{op, PAGE};

/// What a table of this regime must do besides its TLB operations being its own.
trait Tag: Ours {
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
}
impl Tag for Stage2 {
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

fn run<R: Tag>(regime: R, attrs: &[Attributes], ops: &[Op], threshold: usize, ranges: bool) {
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
        let expect_conflict = op.conflict(&model);
        let mut result = op.run(&mut t, attrs);
        if result.is_ok() {
            op.apply(&mut model, attrs);
        }
        if let Op::TableAttrs { va, size, attrs } = *op {
            let a = TableAttrs::from_bits_truncate(attrs);
            if result.is_ok() {
                attributed.push((va, size));
                // The limits reach every address of the range.
                for probe in [va, va + size / 2, va + size - PAGE] {
                    assert!(t.table_attrs(probe).contains(a), "{op:?} at {probe:#x}");
                }
            }
            if !t.regime().table_attrs().contains(a) {
                assert_eq!(result, Err(Error::UnsupportedAttributes), "{op:?}");
                result = Ok(());
            }
        }
        if let Op::Coalesce { .. } = op {
            assert!(common::reachable_tables(&t) <= tables_before.len());
        }
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
        let reachable = check_tables(&t);
        assert_eq!(reachable, common::reachable_tables(&t));
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

//! `mmu_ops`: sequences of map, unmap, protect, set-software-bits and coalesce on each
//! translation regime (EL2, stage 2 in three geometries, EL1&0), checked against a model
//! after every operation, with frame-allocation failures injected.
//!
//! Input: a 3-byte header (regime, TLBI threshold, range TLBIs), then [`OP_LEN`]-byte
//! records, one per operation (at most [`MAX_OPS`]).
//!
//! After each operation: the table's leaves equal the model's mappings; `translate`
//! agrees with the walk; the descriptor counts in table entries are exact and frames in
//! use equal the reachable tables; a failed operation changed nothing, leaked or freed
//! no frame and issued no TLB maintenance, and failed only for a reason the model
//! predicts; every leaf that changed was covered by an invalidation of this table's
//! regime (and VMID or ASID). At the end, unmapping everything leaves only the root.

use std::collections::HashMap;

use mmu::testing::model::{runs_of, Model};
pub use mmu::testing::ops::Op;
use mmu::testing::ops::{
    check_tables, covers, el1_attrs, el2_attrs, leaves, s2_attrs, s2_xnx_attrs, Ours,
};
use mmu::testing::{HeapFrames, RecordingTlb};
use mmu::{Attributes, El1, El2, Error, MapFlags, PageTable, Stage2, SwBits, TlbOp};

use crate::input::{pick, Bytes};

const PAGE: u64 = 4096;
const MIB2: u64 = 2 << 20;
const GIB: u64 = 1 << 30;

/// Bytes of one operation record.
pub const OP_LEN: usize = 8;
/// Most operations read from one input (more are ignored): keeps one run short.
pub const MAX_OPS: usize = 24;

/// 2 MiB slots and pages inside them where blocks, splits and merges happen.
const MIB_SLOTS: [u64; 8] = [0, 1, 2, 3, 64, 255, 510, 511];
const PAGE_SLOTS: [u64; 8] = [0, 1, 2, 3, 255, 256, 510, 511];
const PAGES: [u64; 8] = [1, 2, 5, 511, 512, 513, 1024, 1536];
const OUT_DELTAS: [u64; 5] = [0, GIB, 3 * GIB + 2 * MIB2, 5 * PAGE, 7 * GIB];
const FLAGS: [MapFlags; 4] = [
    MapFlags::empty(),
    MapFlags::REPLACE,
    MapFlags::NO_BLOCKS,
    MapFlags::REPLACE.union(MapFlags::NO_BLOCKS),
];

/// The operation of a record, and the frame budget it runs with (`None`: unlimited).
///
/// Record bytes: 0 kind, 1 GiB, 2 2-MiB slot, 3 page slot, 4 size (bit 7: whole GiBs),
/// 5 attributes (high nibble: frame budget), 6 flags and output offset, 7 software bits
/// (0xf0 and above: run with the frame budget).
#[must_use]
pub fn decode(r: [u8; OP_LEN]) -> (Op, Option<usize>) {
    let gib = u64::from(r[1] % 4) * GIB;
    let whole = r[4] & 0x80 != 0;
    let va = if whole {
        gib
    } else {
        gib + pick(&MIB_SLOTS, r[2]) * MIB2 + pick(&PAGE_SLOTS, r[3]) * PAGE
    };
    let pages = if whole {
        (1 + u64::from(r[4] & 1)) * (GIB / PAGE)
    } else {
        pick(&PAGES, r[4])
    };
    let attrs = usize::from(r[5] & 0xf) % 5;
    let budget = (r[7] >= 0xf0).then_some(usize::from(r[5] >> 4));
    let op = match r[0] % 8 {
        0..=2 => {
            let mut flags = pick(&FLAGS, r[6]);
            let mut delta = pick(&OUT_DELTAS, r[6] >> 2);
            if whole {
                // A GiB in pages is 262,144 leaves: too slow for a fuzz run (the mmu
                // tests cover it), so whole GiBs are mapped with blocks.
                flags.remove(MapFlags::NO_BLOCKS);
                delta &= !(GIB - 1);
            }
            Op::Map {
                va,
                pages,
                out: va + delta,
                attrs,
                flags,
            }
        }
        3 | 4 => Op::Unmap { va, pages },
        5 => Op::Protect { va, pages, attrs },
        6 => Op::SetSw {
            va,
            pages,
            sw: r[7] & 0xf,
        },
        _ => Op::Coalesce {
            va: va & !(MIB2 - 1),
            pages: if whole {
                pages
            } else {
                512 * (1 + u64::from(r[4] % 3))
            },
        },
    };
    (op, budget)
}

/// The record [`decode`] reads as `op` (for seeds); `out` must be `va` plus one of the
/// output offsets and addresses one of the slots.
///
/// # Panics
///
/// `op` sets table attributes, which no record does.
#[must_use]
pub fn encode(op: Op, budget: Option<u8>) -> [u8; OP_LEN] {
    fn slot(slots: &[u64], v: u64) -> u8 {
        slots.iter().position(|&s| s == v).unwrap_or(0) as u8
    }
    let split = |va: u64| {
        (
            (va / GIB) as u8,
            slot(&MIB_SLOTS, (va % GIB) / MIB2),
            slot(&PAGE_SLOTS, (va % MIB2) / PAGE),
        )
    };
    let size = |pages: u64| {
        if pages.is_multiple_of(GIB / PAGE) {
            0x80 | (pages / (GIB / PAGE) - 1) as u8
        } else {
            slot(&PAGES, pages)
        }
    };
    let mut r = [0u8; OP_LEN];
    let (kind, va, pages) = match op {
        Op::Map {
            va,
            pages,
            out,
            attrs,
            flags,
        } => {
            r[5] = attrs as u8;
            let f = FLAGS.iter().position(|&f| f == flags).unwrap_or(0) as u8;
            r[6] = f | (slot(&OUT_DELTAS, out - va) << 2);
            (0, va, pages)
        }
        Op::Unmap { va, pages } => (3, va, pages),
        Op::Protect { va, pages, attrs } => {
            r[5] = attrs as u8;
            (5, va, pages)
        }
        Op::SetSw { va, pages, sw } => {
            r[7] = sw & 0xf;
            (6, va, pages)
        }
        Op::Coalesce { va, pages } => (7, va, pages),
        Op::TableAttrs { .. } => panic!("no record sets table attributes: {op:?}"),
    };
    let (g, m, p) = split(va);
    r[0] = kind;
    r[1] = g;
    r[2] = m;
    r[3] = p;
    r[4] = match op {
        Op::Coalesce { .. } if !pages.is_multiple_of(GIB / PAGE) => (pages / 512 - 1) as u8,
        _ => size(pages),
    };
    if let Some(b) = budget {
        r[5] |= b << 4;
        r[7] |= 0xf0;
    }
    r
}

/// Runs one input.
///
/// # Panics
///
/// When the table and the model disagree, or an invariant above breaks.
pub fn run(data: &[u8]) {
    let mut b = Bytes::new(data);
    let (regime, threshold, ranges) = (b.u8(), usize::from(b.u8() % 64) + 1, b.u8() & 1 != 0);
    let mut ops = Vec::new();
    while let Some(r) = b.record::<OP_LEN>() {
        if ops.len() == MAX_OPS {
            break;
        }
        ops.push(decode(r));
    }
    let cfg = (threshold, ranges);
    match regime % 5 {
        0 => check(El2::new(39), &el2_attrs(), &ops, cfg),
        1 => {
            let vmid = 1 + u16::from(regime >> 3);
            check(
                Stage2::new(vmid, 40).with_vmid16(true),
                &s2_attrs(),
                &ops,
                cfg,
            );
        }
        2 => check(
            Stage2::new(9, 36).with_xnx(true).with_fwb(true),
            &s2_xnx_attrs(),
            &ops,
            cfg,
        ),
        // 34-bit IPA: 16 concatenated level-2 root tables.
        3 => check(Stage2::new(3, 34), &s2_attrs(), &ops, cfg),
        _ => check(
            El1::new(u16::from(regime >> 3), 48).with_asid16(true),
            &el1_attrs(),
            &ops,
            cfg,
        ),
    }
}

fn check<R: Ours>(
    regime: R,
    attrs: &[Attributes],
    ops: &[(Op, Option<usize>)],
    cfg: (usize, bool),
) {
    let frames = HeapFrames::new();
    let Ok(mut t) = PageTable::new(regime, &frames, RecordingTlb::new()) else {
        panic!("a new table");
    };
    t.set_tlbi_threshold(cfg.0);
    t.set_tlbi_range(cfg.1);
    let roots = t.frames_in_use();
    let mut model = Model::default();
    for &(op, budget) in ops {
        let before = leaves(&t);
        let live_before = frames.live();
        t.tlb_mut().clear();
        frames.fail_after(budget);
        let conflict = op.conflict(&model);
        let result = op.run(&mut t, attrs);
        frames.fail_after(None);
        match (result, conflict) {
            (Ok(()), None) => op.apply(&mut model, attrs),
            (Err(Error::AlreadyMapped { va }), Some(first)) => {
                assert_eq!(va, first, "{op:?}: first mapped address");
            }
            (Err(Error::OutOfFrames), _) if budget.is_some() => {}
            (r, c) => panic!("{op:?} (budget {budget:?}): {r:?}, model conflict {c:?}"),
        }
        let after = leaves(&t);
        assert_eq!(
            runs_of(&after),
            model.canonical(),
            "translations after {op:?}"
        );
        for m in after.iter().step_by(61).take(40) {
            let tr = t
                .translate(m.va + m.size / 2)
                .map(|tr| (tr.output, tr.attrs, tr.level));
            assert_eq!(
                tr,
                Some((m.output + m.size / 2, m.attrs, m.level)),
                "{op:?}"
            );
        }
        let reachable = check_tables(&t);
        assert_eq!(frames.in_use(), roots + reachable, "frames after {op:?}");
        assert_eq!(t.frames_in_use(), roots + reachable, "frames after {op:?}");
        if result.is_err() {
            assert_eq!(after, before, "failed {op:?} changed the table");
            assert_eq!(
                frames.live(),
                live_before,
                "failed {op:?} leaked or freed frames"
            );
            assert!(
                t.tlb().sequences().is_empty(),
                "failed {op:?} issued maintenance"
            );
            continue;
        }
        let done: Vec<TlbOp> = t.tlb().invalidations();
        for o in &done {
            assert!(
                t.regime().ours(o),
                "foreign TLB operation {o:?} after {op:?}"
            );
        }
        // Every leaf not still present unchanged (software bits aside) was invalidated.
        let now: HashMap<(u64, u8), (u64, Attributes)> = after
            .iter()
            .map(|m| ((m.va, m.level), (m.output, m.attrs.with_sw(SwBits::NONE))))
            .collect();
        for m in &before {
            if now.get(&(m.va, m.level)) != Some(&(m.output, m.attrs.with_sw(SwBits::NONE))) {
                assert!(
                    done.iter().any(|o| covers(o, m.va, m.size, false)),
                    "leaf {m:x?} changed by {op:?} without a TLBI"
                );
            }
        }
    }
    let size = t.geometry().input_size();
    assert_eq!(t.unmap(0, size), Ok(()), "unmapping everything");
    assert!(leaves(&t).is_empty());
    assert_eq!(
        frames.in_use(),
        roots,
        "unmapping everything leaves only the root"
    );
}

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
use mmu::testing::{HeapFrames, RecordingTlb};
use mmu::{
    Attributes, El1, El2, Error, MapFlags, MemoryType, PageTable, Permissions, Regime, Stage2,
    SwBits, TlbOp,
};

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

/// One operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `map(va, out, pages, attrs[attrs], flags)`.
    Map {
        /// Input address.
        va: u64,
        /// 4 KiB pages.
        pages: u64,
        /// Output address.
        out: u64,
        /// Index into the regime's attribute table.
        attrs: usize,
        /// Map flags.
        flags: MapFlags,
    },
    /// `unmap(va, pages)`.
    Unmap {
        /// Input address.
        va: u64,
        /// 4 KiB pages.
        pages: u64,
    },
    /// `protect(va, pages, attrs[attrs])`.
    Protect {
        /// Input address.
        va: u64,
        /// 4 KiB pages.
        pages: u64,
        /// Index into the regime's attribute table.
        attrs: usize,
    },
    /// `set_sw_bits(va, pages, sw)`.
    SetSw {
        /// Input address.
        va: u64,
        /// 4 KiB pages.
        pages: u64,
        /// Software bits.
        sw: u8,
    },
    /// `coalesce(va, pages)`.
    Coalesce {
        /// Input address.
        va: u64,
        /// 4 KiB pages.
        pages: u64,
    },
}

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

/// The regime of header byte 0, with its attribute table.
fn attrs_el2() -> [Attributes; 5] {
    [
        Attributes::normal(Permissions::RW),
        Attributes::normal(Permissions::READ.union(Permissions::EXEC_EL2)),
        Attributes::normal(Permissions::RO),
        Attributes::device(),
        Attributes::normal(Permissions::RW).with_sw(SwBits::truncate(3)),
    ]
}

fn attrs_s2() -> [Attributes; 5] {
    let x = Permissions::EXEC_EL1.union(Permissions::EXEC_EL0);
    [
        Attributes::normal(Permissions::RW.union(x)),
        Attributes::normal(Permissions::RO),
        Attributes::new(Permissions::RW, MemoryType::NormalNonCacheable),
        Attributes::device(),
        Attributes::normal(Permissions::empty()).with_sw(SwBits::truncate(1)),
    ]
}

fn attrs_s2_xnx() -> [Attributes; 5] {
    [
        Attributes::normal(Permissions::RW.union(Permissions::EXEC_EL1)),
        Attributes::normal(Permissions::READ.union(Permissions::EXEC_EL0)),
        Attributes::new(Permissions::RW, MemoryType::NormalNonCacheable),
        Attributes::new(Permissions::WRITE, MemoryType::DeviceNGnRnE),
        Attributes::normal(
            Permissions::RW
                .union(Permissions::EXEC_EL1)
                .union(Permissions::EXEC_EL0),
        ),
    ]
}

fn attrs_el1() -> [Attributes; 5] {
    [
        Attributes::normal(Permissions::RW),
        Attributes::normal(Permissions::READ.union(Permissions::EXEC_EL1)),
        Attributes::normal(Permissions::RW.union(Permissions::USER)),
        Attributes::normal(
            Permissions::READ
                .union(Permissions::USER)
                .union(Permissions::EXEC_EL0),
        ),
        Attributes::new(Permissions::RW, MemoryType::DeviceNGnRnE),
    ]
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
        0 => check(El2::new(39), &attrs_el2(), &ops, cfg),
        1 => {
            let vmid = 1 + u16::from(regime >> 3);
            check(
                Stage2::new(vmid, 40).with_vmid16(true),
                &attrs_s2(),
                &ops,
                cfg,
            );
        }
        2 => check(
            Stage2::new(9, 36).with_xnx(true).with_fwb(true),
            &attrs_s2_xnx(),
            &ops,
            cfg,
        ),
        // 34-bit IPA: 16 concatenated level-2 root tables.
        3 => check(Stage2::new(3, 34), &attrs_s2(), &ops, cfg),
        _ => check(
            El1::new(u16::from(regime >> 3), 48).with_asid16(true),
            &attrs_el1(),
            &ops,
            cfg,
        ),
    }
}

/// Which TLB operations are this table's.
trait Tag: Regime + Copy {
    fn ours(&self, op: &TlbOp) -> bool;
}

impl Tag for El2 {
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
}

impl Tag for El1 {
    fn ours(&self, op: &TlbOp) -> bool {
        match *op {
            TlbOp::El1Va { asid, .. } | TlbOp::El1Range { asid, .. } | TlbOp::El1Asid { asid } => {
                asid == self.asid()
            }
            _ => false,
        }
    }
}

/// Whether `op` invalidates the translation of some address of `[va, va + size)`.
fn covers(op: &TlbOp, va: u64, size: u64) -> bool {
    let hit = |a: u64| a >= va && a < va + size;
    let overlap = |a: u64, pages: u64| a < va + size && va < a.saturating_add(pages * PAGE);
    match *op {
        TlbOp::El2All | TlbOp::Stage2All { .. } | TlbOp::El1Asid { .. } => true,
        TlbOp::El2Va { va: a, .. } | TlbOp::El1Va { va: a, .. } => hit(a),
        TlbOp::Stage2Ipa { ipa, .. } => hit(ipa),
        TlbOp::El2Range { va: a, pages, .. }
        | TlbOp::El1Range { va: a, pages, .. }
        | TlbOp::Stage2Range { ipa: a, pages, .. } => overlap(a, pages),
        _ => false,
    }
}

type Table<'f, R> = PageTable<R, &'f HeapFrames, RecordingTlb>;

/// The table's leaves, in order.
fn leaves<R: Regime>(t: &Table<'_, R>) -> Vec<mmu::Mapping> {
    let mut v = Vec::new();
    let walked = t.walk(0, t.geometry().input_size(), |m| v.push(*m));
    assert_eq!(walked, Ok(()), "walking the whole input space");
    v
}

/// Reads descriptor `i` of the table frame at `pa`.
fn read(pa: u64, i: usize) -> u64 {
    let p = mmu::testing::frame_ptr(pa);
    assert!(
        !p.is_null(),
        "table frame {pa:#x} is not a HeapFrames frame"
    );
    assert!(i < 512 * 16, "descriptor index {i}");
    // SAFETY: `p` is the host address of a simulated frame (or concatenated root) of
    // the pool, which outlives the table, and `i` indexes inside it.
    unsafe { p.add(i).read_volatile() }
}

/// Checks the descriptor counts in table entries (bits \[11:2\] count the non-zero
/// entries of the next-level table) and returns the number of non-root tables.
fn check_tables<R: Regime>(t: &Table<'_, R>) -> usize {
    fn rec(pa: u64, level: u8, entries: usize) -> usize {
        let mut tables = 0;
        for i in 0..entries {
            let d = read(pa, i);
            if level < 3 && d & 3 == 3 {
                let next = d & 0x0000_ffff_ffff_f000;
                let live = (0..512).filter(|&j| read(next, j) != 0).count() as u64;
                assert_eq!((d >> 2) & 0x3ff, live, "count of table {next:#x}");
                assert_ne!(live, 0, "empty table {next:#x} left behind");
                tables += 1 + rec(next, level + 1, 512);
            }
        }
        tables
    }
    let g = t.geometry();
    rec(t.root_address(), g.start_level(), g.root_entries())
}

fn check<R: Tag>(regime: R, attrs: &[Attributes], ops: &[(Op, Option<usize>)], cfg: (usize, bool)) {
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
        let (result, conflict) = match op {
            Op::Map {
                va,
                pages,
                out,
                attrs: a,
                flags,
            } => {
                let conflict = if flags.contains(MapFlags::REPLACE) {
                    None
                } else {
                    model.first_mapped(va, va + pages * PAGE)
                };
                (t.map(va, out, pages * PAGE, attrs[a], flags), conflict)
            }
            Op::Unmap { va, pages } => (t.unmap(va, pages * PAGE), None),
            Op::Protect {
                va,
                pages,
                attrs: a,
            } => (t.protect(va, pages * PAGE, attrs[a]), None),
            Op::SetSw { va, pages, sw } => {
                (t.set_sw_bits(va, pages * PAGE, SwBits::truncate(sw)), None)
            }
            Op::Coalesce { va, pages } => (t.coalesce(va, pages * PAGE), None),
        };
        frames.fail_after(None);
        match (result, conflict) {
            (Ok(()), None) => apply(&mut model, op, attrs),
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
                    done.iter().any(|o| covers(o, m.va, m.size)),
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

/// What a successful `op` does to the model.
fn apply(model: &mut Model, op: Op, attrs: &[Attributes]) {
    match op {
        Op::Map {
            va,
            pages,
            out,
            attrs: a,
            ..
        } => model.insert(va, va + pages * PAGE, out, attrs[a]),
        Op::Unmap { va, pages } => model.remove(va, va + pages * PAGE),
        Op::Protect {
            va,
            pages,
            attrs: a,
        } => model.update(va, va + pages * PAGE, |_| attrs[a]),
        Op::SetSw { va, pages, sw } => {
            let sw = SwBits::truncate(sw);
            model.update(va, va + pages * PAGE, |a| a.with_sw(sw));
        }
        Op::Coalesce { .. } => {}
    }
}

//! A walk-cache TLB simulator driven by random operation sequences.
//!
//! The simulated PE caches, as aggressively as the architecture allows, every leaf
//! (last-level entry) and every table descriptor (walk cache) it can reach: before each
//! operation and again at each maintenance sequence the crate runs, just before that
//! sequence's invalidations apply. Each sequence removes what its TLBIs cover (by
//! address, leaf-only or with walk caches, by range, or everything). Checked:
//!
//! - break-before-make: when a sequence runs, no cached leaf or table entry is still
//!   held while memory already holds a different valid entry for it that would need
//!   break-before-make (output address, size, memory type, shareability, table ↔
//!   block);
//! - no stale entry survives an operation: afterwards every cached leaf and walk-cache
//!   entry matches memory (software bits aside, which need no invalidation);
//! - no cached walk-cache entry points into a frame when the table frees it;
//! - the contiguous hint (bit 52): a group of 16 entries with it is consistent
//!   whenever the crate runs maintenance and after every operation (all valid, hinted,
//!   one contiguous output range, the same attributes), and the TLB, which may hold
//!   one entry for the whole group, holds none that memory no longer agrees with.

mod common;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use mmu::testing::HeapFrames;
use mmu::{
    Attributes, El1, El2, FrameAllocator, PageTable, PhysToVirt, Regime, Stage2, TlbMaintenance,
    TlbOp, TlbSequence,
};
use proptest::prelude::*;

use common::{op, PAGE};
use mmu::testing::ops::{el1_attrs, el2_attrs, read, s2_attrs, Op};

const OA: u64 = 0x0000_FFFF_FFFF_F000;
/// Leaf bits whose change needs break-before-make: output address, type, memory
/// type, shareability, nG, contiguous (Arm ARM D8.17.1).
const BBM: u64 = OA | 0b11 | (0xF << 2) | (0b11 << 8) | (1 << 11) | (1 << 52);
/// Software bits: a change of only these needs no invalidation.
const SW: u64 = 0xF << 55;
/// Table attributes (APTable, XNTable/UXNTable, PXNTable), bits [62:59].
const TABLE_ATTRS: u64 = 0xF << 59;
/// Table-descriptor bits the hardware uses: next-table address, type and attributes.
const TABLE_BITS: u64 = OA | 0b11 | TABLE_ATTRS;

fn level_size(level: u8) -> u64 {
    1 << common::shift(level)
}

/// The contiguous hint.
const CONT: u64 = 1 << 52;

/// The group of 16 that leaf `d` at `va` belongs to: its first input address and the
/// descriptor its first entry has when the group is consistent.
fn group_of(va: u64, level: u8, d: u64) -> (u64, u64) {
    let gva = va & !(16 * level_size(level) - 1);
    (gva, d - (va - gva))
}

/// Leaves by (input address, level) and table descriptors by (level, input address).
type Entries = (BTreeMap<(u64, u8), u64>, BTreeMap<(u8, u64), u64>);

#[derive(Default)]
struct State {
    root: u64,
    start_level: u8,
    root_entries: usize,
    /// Cached leaves: (input address, level) -> descriptor.
    leaves: BTreeMap<(u64, u8), u64>,
    /// Cached table descriptors: (level of the entry, input address) -> descriptor.
    walks: BTreeMap<(u8, u64), u64>,
    /// Cached contiguous-hint entries, one for a group of 16 leaves: (first input
    /// address of the group, level) -> the descriptor its first entry would have.
    conts: BTreeMap<(u64, u8), u64>,
    errors: Vec<String>,
}

impl State {
    /// Every valid entry reachable in memory: leaves and table descriptors. A TLB
    /// entry for a leaf combines the limits of every table on its path (Arm ARM
    /// D8.4.2): the leaves here carry the union of the path's table attributes in
    /// bits [62:59], which leaf descriptors of this crate never use.
    fn memory(&self) -> Entries {
        let (mut leaves, mut walks) = (BTreeMap::new(), BTreeMap::new());
        fn rec(
            pa: u64,
            level: u8,
            base: u64,
            n: usize,
            path: u64,
            leaves: &mut BTreeMap<(u64, u8), u64>,
            walks: &mut BTreeMap<(u8, u64), u64>,
        ) {
            for i in 0..n {
                let d = read(pa, i);
                if d & 1 == 0 {
                    continue;
                }
                let va = base + ((i as u64) << common::shift(level));
                if level < 3 && d & 2 != 0 {
                    walks.insert((level, va), d);
                    rec(
                        d & OA,
                        level + 1,
                        va,
                        512,
                        path | (d & TABLE_ATTRS),
                        leaves,
                        walks,
                    );
                } else {
                    assert_eq!(d & TABLE_ATTRS, 0, "leaf {d:#x} uses bits [62:59]");
                    leaves.insert((va, level), d | path);
                }
            }
        }
        if self.root != 0 {
            rec(
                self.root,
                self.start_level,
                0,
                self.root_entries,
                0,
                &mut leaves,
                &mut walks,
            );
        }
        (leaves, walks)
    }

    /// The walker caches everything it can reach now. An entry already cached stays
    /// as it is (a TLB may keep the old translation until it is invalidated), so a
    /// change that is not invalidated shows as a stale entry.
    fn fill(&mut self) {
        let (leaves, walks) = self.memory();
        for (&(va, level), &d) in &leaves {
            if d & CONT != 0 {
                let (gva, gd) = group_of(va, level, d);
                self.conts.entry((gva, level)).or_insert(gd);
            }
        }
        for (k, d) in leaves {
            self.leaves.entry(k).or_insert(d);
        }
        for (k, d) in walks {
            self.walks.entry(k).or_insert(d);
        }
    }

    /// Groups of 16 leaves in memory that carry the contiguous hint on some entry but
    /// are not all valid, hinted, contiguous and alike (Arm ARM D8.7.1: misprogramming
    /// of the Contiguous bit).
    fn misprogrammed(&self) -> Vec<String> {
        let (leaves, _) = self.memory();
        let mut out = Vec::new();
        for (&(va, level), &d) in &leaves {
            if d & CONT == 0 {
                continue;
            }
            let (gva, gd) = group_of(va, level, d);
            for k in 0..16u64 {
                let want = gd + k * level_size(level);
                let m = leaves.get(&(gva + k * level_size(level), level));
                if m.is_none_or(|&m| (m ^ want) & !SW != 0) {
                    out.push(format!(
                        "group L{level} {gva:#x}: entry {k} is {m:x?}, {want:#x} expected"
                    ));
                    break;
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Cached entries that memory no longer agrees with; `bbm_only`: only those whose
    /// memory entry is valid and differs in a way that needs break-before-make.
    fn disagreements(&self, bbm_only: bool) -> Vec<String> {
        let (leaves, walks) = self.memory();
        let mut out = Vec::new();
        for (&(va, level), &d) in &self.leaves {
            let m = leaves.get(&(va, level)).copied();
            let same = m.is_some_and(|m| (m ^ d) & if bbm_only { BBM } else { !SW } == 0);
            // Memory maps something valid in the cached leaf's span: a leaf covering
            // its address at some level, or leaves inside it.
            let valid_now = (1..=3u8).any(|l| leaves.contains_key(&(va & !(level_size(l) - 1), l)))
                || leaves
                    .range((va, 0)..(va + level_size(level), 0))
                    .next()
                    .is_some();
            if !same && (!bbm_only || valid_now) {
                out.push(format!("leaf L{level} {va:#x} {d:#x} vs memory {m:x?}"));
            }
        }
        for (&(gva, level), &gd) in &self.conts {
            let size = level_size(level);
            for k in 0..16u64 {
                let a = gva + k * size;
                let want = gd + k * size;
                let m = leaves.get(&(a, level)).copied();
                let mask = if bbm_only { BBM } else { !SW };
                let same = m.is_some_and(|m| (m ^ want) & mask == 0);
                let valid_now = (1..=3u8)
                    .any(|l| leaves.contains_key(&(a & !(level_size(l) - 1), l)))
                    || leaves.range((a, 0)..(a + size, 0)).next().is_some();
                if !same && (!bbm_only || valid_now) {
                    out.push(format!(
                        "contiguous L{level} {gva:#x} (entry {k}) {want:#x} vs memory {m:x?}"
                    ));
                }
            }
        }
        for (&(level, va), &d) in &self.walks {
            let m = walks.get(&(level, va)).copied();
            // A change of table attributes alone needs invalidation, not
            // break-before-make.
            let mask = if bbm_only { OA | 0b11 } else { TABLE_BITS };
            let same = m.is_some_and(|m| (m ^ d) & mask == 0);
            let valid_now = m.is_some() || leaves.contains_key(&(va, level));
            if !same && (!bbm_only || valid_now) {
                out.push(format!("walk L{level} {va:#x} {d:#x} vs memory {m:x?}"));
            }
        }
        out
    }

    /// Removes what one operation invalidates. With a TTL hint (`level`), like a CPU
    /// with FEAT_TTL, only leaves cached from that level: a wrong hint leaves a stale
    /// entry behind.
    fn invalidate(&mut self, op: &TlbOp, level: Option<u8>) {
        let (addr, pages, leaf) = match *op {
            TlbOp::El2All | TlbOp::Stage2All { .. } | TlbOp::El1Asid { .. } => {
                self.leaves.clear();
                self.walks.clear();
                self.conts.clear();
                return;
            }
            TlbOp::El2Va { va, leaf } | TlbOp::El1Va { va, leaf, .. } => (va, 1, leaf),
            TlbOp::Stage2Ipa { ipa, leaf, .. } => (ipa, 1, leaf),
            TlbOp::El2Range { va, pages, leaf }
            | TlbOp::El1Range {
                va, pages, leaf, ..
            } => (va, pages, leaf),
            TlbOp::Stage2Range {
                ipa, pages, leaf, ..
            } => (ipa, pages, leaf),
            _ => return,
        };
        let (lo, hi) = (addr, addr + pages * PAGE);
        let hinted = |l: u8| level.is_none_or(|h| h == l);
        self.leaves
            .retain(|&(va, l), _| !(va < hi && lo < va + level_size(l) && hinted(l)));
        // An entry for a contiguous group translates every address of the group.
        self.conts
            .retain(|&(va, l), _| !(va < hi && lo < va + 16 * level_size(l) && hinted(l)));
        if !leaf {
            self.walks
                .retain(|&(l, va), _| !(va < hi && lo < va + level_size(l)));
        }
    }
}

struct SimTlb(Rc<RefCell<State>>);

impl TlbMaintenance for SimTlb {
    fn execute(&mut self, seq: &TlbSequence<'_>) {
        let mut s = self.0.borrow_mut();
        for e in s.disagreements(true) {
            s.errors
                .push(format!("break-before-make: {e} at {:?}", seq.ops()));
        }
        for e in s.misprogrammed() {
            s.errors
                .push(format!("contiguous hint: {e} at {:?}", seq.ops()));
        }
        s.fill();
        for (i, op) in seq.ops().iter().enumerate() {
            s.invalidate(op, seq.leaf_level(i));
        }
    }
}

struct SimFrames {
    inner: HeapFrames,
    state: Rc<RefCell<State>>,
}

// SAFETY: forwards to `HeapFrames`.
unsafe impl PhysToVirt for SimFrames {
    fn phys_to_virt(&self, pa: u64) -> *mut u64 {
        self.inner.phys_to_virt(pa)
    }
}

// SAFETY: forwards to `HeapFrames`.
unsafe impl FrameAllocator for SimFrames {
    fn alloc_frame(&mut self) -> Option<u64> {
        self.inner.alloc_frame()
    }
    fn alloc_contiguous(&mut self, count: usize) -> Option<u64> {
        self.inner.alloc_contiguous(count)
    }
    fn free_contiguous(&mut self, pa: u64, count: usize) {
        self.inner.free_contiguous(pa, count);
    }
    fn free_frame(&mut self, pa: u64) {
        let mut s = self.state.borrow_mut();
        let cached: Vec<_> = s
            .walks
            .iter()
            .filter(|(_, &d)| d & OA == pa)
            .map(|(k, _)| *k)
            .collect();
        if !cached.is_empty() {
            s.errors
                .push(format!("frame {pa:#x} freed while cached by {cached:x?}"));
        }
        drop(s);
        self.inner.free_frame(pa);
    }
}

fn run<R: Regime>(regime: R, attrs: &[Attributes], ops: &[Op], threshold: usize, ranges: bool) {
    let state = Rc::new(RefCell::new(State::default()));
    let frames = SimFrames {
        inner: HeapFrames::new(),
        state: state.clone(),
    };
    let mut t = PageTable::new(regime, frames, SimTlb(state.clone())).unwrap();
    t.set_tlbi_threshold(threshold);
    t.set_tlbi_range(ranges);
    {
        let g = t.geometry();
        let mut s = state.borrow_mut();
        s.root = t.root_address();
        s.start_level = g.start_level();
        s.root_entries = g.root_entries();
    }
    for op in ops {
        state.borrow_mut().fill();
        let _ = op.run(&mut t, attrs);
        let mut s = state.borrow_mut();
        for e in s.disagreements(false) {
            s.errors.push(format!("stale after the operation: {e}"));
        }
        for e in s.misprogrammed() {
            s.errors
                .push(format!("contiguous hint after the operation: {e}"));
        }
        assert!(
            s.errors.is_empty(),
            "after {op:?}:\n{}",
            s.errors.join("\n")
        );
    }
    // Dropping the table invalidates everything before freeing its frames.
    drop(t);
    assert!(
        state.borrow().errors.is_empty(),
        "{:?}",
        state.borrow().errors
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn el2_no_stale_entries(ops in prop::collection::vec(op(el2_attrs().len()), 1..24), threshold in 1usize..64, ranges: bool) {
        run(El2::new(39), &el2_attrs(), &ops, threshold, ranges);
    }

    #[test]
    fn stage2_no_stale_entries(ops in prop::collection::vec(op(s2_attrs().len()), 1..24), threshold in 1usize..64, ranges: bool) {
        run(Stage2::new(7, 40), &s2_attrs(), &ops, threshold, ranges);
    }

    #[test]
    fn el1_no_stale_entries(ops in prop::collection::vec(op(el1_attrs().len()), 1..24), threshold in 1usize..64, ranges: bool) {
        run(El1::new(3, 48), &el1_attrs(), &ops, threshold, ranges);
    }
}

/// Table attributes over mapped pages: every cached leaf below must go (its TLB entry
/// holds the combined permissions), whatever the threshold.
#[test]
fn table_attrs_over_mapped_pages() {
    use common::GIB;
    use mmu::MapFlags;
    for ranges in [false, true] {
        for threshold in [1, 8, 63] {
            for (va, size) in [(GIB, GIB), (GIB, 2 << 20), (0, 4 * GIB)] {
                let ops = [
                    Op::Map {
                        va: GIB,
                        pages: 1024,
                        out: 3 * GIB,
                        attrs: 0,
                        flags: MapFlags::NO_BLOCKS,
                    },
                    Op::Map {
                        va: GIB + (4 << 20),
                        pages: 512,
                        out: 5 * GIB,
                        attrs: 1,
                        flags: MapFlags::empty(),
                    },
                    Op::TableAttrs { va, size, attrs: 1 },
                    Op::TableAttrs { va, size, attrs: 0 },
                ];
                run(El2::new(39), &el2_attrs(), &ops, threshold, ranges);
                run(El1::new(3, 48), &el1_attrs(), &ops, threshold, ranges);
            }
        }
    }
}

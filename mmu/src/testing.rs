//! Host-side implementations for tests, benchmarks and offline table building
//! (feature `std`).

extern crate std;

use core::cell::RefCell;
use core::ptr;
use core::sync::atomic::{AtomicPtr, Ordering};
use std::alloc::{alloc_zeroed, Layout};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::vec::Vec;

use crate::frame::{FrameAllocator, PhysToVirt, FRAME_SIZE};
use crate::tlb::{TlbContext, TlbMaintenance, TlbOp, TlbSequence};

/// First "physical" address of the simulated physical memory [`HeapFrames`] hands out.
pub const PHYS_BASE: u64 = 0x4000_0000;
/// Simulated physical memory grows in chunks of this many bytes (2 MiB).
const CHUNK: u64 = 2 << 20;
/// At most this many chunks: PAs stay below `PHYS_BASE + 8 GiB` (35 bits).
const CHUNKS: usize = 4096;

/// Host memory of each chunk of simulated physical memory, allocated on first use and
/// never returned (frames are recycled through [`PHYS`]'s free list).
static CHUNK_MEM: [AtomicPtr<u8>; CHUNKS] = [const { AtomicPtr::new(ptr::null_mut()) }; CHUNKS];

/// Frames of the simulated physical memory that are not allocated.
struct Phys {
    /// Single free frames below `bump`.
    free: Vec<u64>,
    /// Everything from here on is untouched.
    bump: u64,
}

static PHYS: Mutex<Phys> = Mutex::new(Phys {
    free: Vec::new(),
    bump: PHYS_BASE,
});

/// The host pointer of simulated physical address `pa` handed out by a [`HeapFrames`]
/// pool, or null if `pa` lies outside the simulated physical memory in use.
#[must_use]
pub fn frame_ptr(pa: u64) -> *mut u64 {
    let Some(off) = pa.checked_sub(PHYS_BASE) else {
        return ptr::null_mut();
    };
    let Some(chunk) = CHUNK_MEM.get((off / CHUNK) as usize) else {
        return ptr::null_mut();
    };
    let base = chunk.load(Ordering::Acquire);
    if base.is_null() {
        return ptr::null_mut();
    }
    // SAFETY: the chunk is `CHUNK` bytes long and `off % CHUNK` lies inside it.
    unsafe { base.add((off % CHUNK) as usize).cast() }
}

impl Phys {
    /// Makes sure the chunk holding `pa` has host memory.
    fn back(pa: u64) -> Option<()> {
        let slot = CHUNK_MEM.get(((pa - PHYS_BASE) / CHUNK) as usize)?;
        if slot.load(Ordering::Acquire).is_null() {
            let layout = Layout::from_size_align(CHUNK as usize, FRAME_SIZE as usize).ok()?;
            // SAFETY: `layout` has a non-zero size.
            let p = unsafe { alloc_zeroed(layout) };
            if p.is_null() {
                return None;
            }
            slot.store(p, Ordering::Release);
        }
        Some(())
    }

    /// `count` contiguous zeroed frames aligned to `count` frames.
    fn alloc(&mut self, count: usize) -> Option<u64> {
        if count == 1 {
            if let Some(pa) = self.free.pop() {
                // SAFETY: `pa` is a free frame of a backed chunk: nobody else uses it.
                unsafe { ptr::write_bytes(frame_ptr(pa).cast::<u8>(), 0, FRAME_SIZE as usize) };
                return Some(pa);
            }
        }
        let size = count as u64 * FRAME_SIZE;
        let mut pa = self.bump.next_multiple_of(size);
        if (pa - PHYS_BASE) / CHUNK != (pa + size - 1 - PHYS_BASE) / CHUNK {
            pa = pa.next_multiple_of(CHUNK);
        }
        Self::back(pa)?;
        // Frames skipped for the alignment are untouched, hence zero, and free.
        self.free
            .extend((self.bump..pa).step_by(FRAME_SIZE as usize));
        self.bump = pa + size;
        Some(pa)
    }
}

#[derive(Default)]
struct Inner {
    /// Live allocations: address -> number of frames.
    live: BTreeMap<u64, usize>,
    in_use: usize,
    allocated: usize,
    freed: usize,
    /// Successful allocations left before every allocation fails.
    budget: Option<usize>,
}

/// Frames of a simulated physical memory kept on the host heap.
///
/// Physical addresses are compact, from [`PHYS_BASE`] (1 GiB) up, so tables with any
/// output size from 32 bits up can use them; [`frame_ptr`] gives the host pointer of
/// one. Counts frames and can be told to fail (fault injection). `&HeapFrames` is also
/// a [`FrameAllocator`], so several tables can share one pool. Frames still allocated
/// when the pool is dropped become free again.
#[derive(Default)]
pub struct HeapFrames {
    inner: RefCell<Inner>,
}

impl HeapFrames {
    /// An empty pool with no failure budget.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Frames currently allocated.
    pub fn in_use(&self) -> usize {
        self.inner.borrow().in_use
    }

    /// Frames allocated since creation.
    pub fn total_allocated(&self) -> usize {
        self.inner.borrow().allocated
    }

    /// Frames freed since creation.
    pub fn total_freed(&self) -> usize {
        self.inner.borrow().freed
    }

    /// Lets the next `n` frame allocations succeed and every later one fail
    /// (`None`: never fail).
    pub fn fail_after(&self, n: Option<usize>) {
        self.inner.borrow_mut().budget = n;
    }

    /// Start addresses of the live allocations, ascending.
    pub fn live(&self) -> Vec<u64> {
        self.inner.borrow().live.keys().copied().collect()
    }

    fn alloc_n(&self, count: usize) -> Option<u64> {
        let mut inner = self.inner.borrow_mut();
        if let Some(b) = inner.budget.as_mut() {
            if *b < count {
                return None;
            }
            *b -= count;
        }
        let pa = PHYS.lock().ok()?.alloc(count)?;
        inner.live.insert(pa, count);
        inner.in_use += count;
        inner.allocated += count;
        Some(pa)
    }

    fn free_n(&self, pa: u64, count: usize) {
        let mut inner = self.inner.borrow_mut();
        match inner.live.remove(&pa) {
            Some(n) if n == count => {
                inner.in_use -= count;
                inner.freed += count;
                release(pa, count);
            }
            other => panic!("HeapFrames: bad free of {pa:#x} x{count} (live: {other:?})"),
        }
    }
}

/// Gives `count` frames from `pa` back to the simulated physical memory.
fn release(pa: u64, count: usize) {
    if let Ok(mut phys) = PHYS.lock() {
        phys.free
            .extend((0..count as u64).map(|k| pa + k * FRAME_SIZE));
    }
}

impl Drop for HeapFrames {
    fn drop(&mut self) {
        for (pa, count) in core::mem::take(&mut self.inner.get_mut().live) {
            release(pa, count);
        }
    }
}

// SAFETY: `frame_ptr` reaches the host memory backing each simulated frame, which
// stays allocated for the life of the process; chunks are contiguous host memory,
// and contiguous runs never cross a chunk.
unsafe impl PhysToVirt for HeapFrames {
    #[inline(always)]
    fn phys_to_virt(&self, pa: u64) -> *mut u64 {
        frame_ptr(pa)
    }
}

// SAFETY: frames come zeroed and aligned from the process-wide simulated physical
// memory, which hands each out once until it is released.
unsafe impl FrameAllocator for HeapFrames {
    fn alloc_frame(&mut self) -> Option<u64> {
        self.alloc_n(1)
    }
    fn alloc_contiguous(&mut self, count: usize) -> Option<u64> {
        self.alloc_n(count)
    }
    fn free_frame(&mut self, pa: u64) {
        self.free_n(pa, 1);
    }
    fn free_contiguous(&mut self, pa: u64, count: usize) {
        self.free_n(pa, count);
    }
}

// SAFETY: as for `HeapFrames`.
unsafe impl PhysToVirt for &HeapFrames {
    #[inline(always)]
    fn phys_to_virt(&self, pa: u64) -> *mut u64 {
        frame_ptr(pa)
    }
}

// SAFETY: as for `HeapFrames`.
unsafe impl FrameAllocator for &HeapFrames {
    fn alloc_frame(&mut self) -> Option<u64> {
        self.alloc_n(1)
    }
    fn alloc_contiguous(&mut self, count: usize) -> Option<u64> {
        self.alloc_n(count)
    }
    fn free_frame(&mut self, pa: u64) {
        self.free_n(pa, 1);
    }
    fn free_contiguous(&mut self, pa: u64, count: usize) {
        self.free_n(pa, count);
    }
}

/// Records every TLB-maintenance sequence instead of executing it.
#[derive(Default, Debug, Clone)]
pub struct RecordingTlb {
    sequences: Vec<Vec<TlbOp>>,
    contexts: Vec<TlbContext>,
    levels: Vec<Vec<Option<u8>>>,
}

impl RecordingTlb {
    /// An empty recording.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The recorded sequences, one per [`TlbMaintenance::execute`] call.
    pub fn sequences(&self) -> &[Vec<TlbOp>] {
        &self.sequences
    }

    /// The context of each recorded sequence (same order as
    /// [`sequences`](Self::sequences)).
    pub fn contexts(&self) -> &[TlbContext] {
        &self.contexts
    }

    /// The TTL level of each recorded operation ([`TlbSequence::leaf_level`]), same
    /// shape as [`sequences`](Self::sequences).
    pub fn leaf_levels(&self) -> &[Vec<Option<u8>>] {
        &self.levels
    }

    /// All recorded operations, flattened.
    pub fn ops(&self) -> impl Iterator<Item = &TlbOp> {
        self.sequences.iter().flatten()
    }

    /// Only the invalidations (no barriers), flattened.
    pub fn invalidations(&self) -> Vec<TlbOp> {
        self.ops().filter(|op| !op.is_barrier()).copied().collect()
    }

    /// Forgets everything recorded so far.
    pub fn clear(&mut self) {
        self.sequences.clear();
        self.contexts.clear();
        self.levels.clear();
    }
}

impl TlbMaintenance for RecordingTlb {
    fn execute(&mut self, seq: &TlbSequence<'_>) {
        self.sequences.push(seq.ops().to_vec());
        self.contexts.push(seq.context());
        self.levels
            .push((0..seq.ops().len()).map(|i| seq.leaf_level(i)).collect());
    }
}

/// What a table should translate, for tests that check a table against a model:
/// disjoint runs of input addresses, each with the output of its first byte and its
/// attributes. Compare [`Model::canonical`](model::Model::canonical) with
/// [`runs_of`](model::runs_of) the table's leaves.
pub mod model {
    use super::{BTreeMap, Vec};
    use crate::{Attributes, Mapping};

    /// A maximal run: end of its input range, output of its first byte, attributes.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Seg {
        /// First input address after the run.
        pub end: u64,
        /// Output address of the run's first byte.
        pub out: u64,
        /// Attributes of every page of the run.
        pub attrs: Attributes,
    }

    /// Disjoint runs keyed by their first input address.
    #[derive(Clone, Debug, Default)]
    pub struct Model {
        segs: BTreeMap<u64, Seg>,
    }

    impl Model {
        /// Splits the run across `at`, if any, so that `at` is a boundary.
        fn split(&mut self, at: u64) {
            let found = self.segs.range(..at).next_back().map(|(&s, &g)| (s, g));
            if let Some((start, seg)) = found {
                if seg.end > at {
                    self.segs.insert(start, Seg { end: at, ..seg });
                    let out = seg.out + (at - start);
                    self.segs.insert(at, Seg { out, ..seg });
                }
            }
        }

        fn starts_in(&self, va: u64, end: u64) -> Vec<u64> {
            self.segs.range(va..end).map(|(&s, _)| s).collect()
        }

        /// Unmaps `[va, end)`.
        pub fn remove(&mut self, va: u64, end: u64) {
            self.split(va);
            self.split(end);
            for s in self.starts_in(va, end) {
                self.segs.remove(&s);
            }
        }

        /// Maps `[va, end)` to `out` with `attrs`, replacing what was there.
        pub fn insert(&mut self, va: u64, end: u64, out: u64, attrs: Attributes) {
            self.remove(va, end);
            self.segs.insert(va, Seg { end, out, attrs });
        }

        /// Changes the attributes of what is mapped in `[va, end)` with `f`.
        pub fn update(&mut self, va: u64, end: u64, f: impl Fn(Attributes) -> Attributes) {
            self.split(va);
            self.split(end);
            for s in self.starts_in(va, end) {
                if let Some(seg) = self.segs.get_mut(&s) {
                    seg.attrs = f(seg.attrs);
                }
            }
        }

        /// The first mapped input address in `[va, end)`.
        #[must_use]
        pub fn first_mapped(&self, va: u64, end: u64) -> Option<u64> {
            if let Some((_, seg)) = self.segs.range(..=va).next_back() {
                if seg.end > va {
                    return Some(va);
                }
            }
            self.segs.range(va..end).next().map(|(&s, _)| s)
        }

        /// Canonical form: adjacent runs merged where contiguous with equal attributes.
        #[must_use]
        pub fn canonical(&self) -> Vec<(u64, Seg)> {
            canonical(self.segs.iter().map(|(&s, &g)| (s, g)))
        }
    }

    /// `runs` (in input order) with adjacent ones merged where contiguous with equal
    /// attributes.
    pub fn canonical(runs: impl Iterator<Item = (u64, Seg)>) -> Vec<(u64, Seg)> {
        let mut v: Vec<(u64, Seg)> = Vec::new();
        for (s, g) in runs {
            if let Some((ps, pg)) = v.last_mut() {
                if pg.end == s && pg.attrs == g.attrs && pg.out + (s - *ps) == g.out {
                    pg.end = g.end;
                    continue;
                }
            }
            v.push((s, g));
        }
        v
    }

    /// A table's leaves (in input order) in canonical form, to compare with
    /// [`Model::canonical`].
    #[must_use]
    pub fn runs_of(leaves: &[Mapping]) -> Vec<(u64, Seg)> {
        canonical(leaves.iter().map(|m| {
            let seg = Seg {
                end: m.va + m.size,
                out: m.output,
                attrs: m.attrs,
            };
            (m.va, seg)
        }))
    }
}

/// Operation sequences checked against a [`model::Model`], shared by the property
/// tests and the `mmu_ops` fuzz target: the operations, what each does to a table and
/// to the model, the attribute table of each regime they index, and the inspection of
/// the table and of its TLB maintenance after each one.
pub mod ops {
    use super::model::Model;
    use super::{frame_ptr, Vec};
    use crate::{
        Attributes, El1, El2, Error, FrameAllocator, MapFlags, Mapping, MemoryType, PageTable,
        Permissions, Regime, Stage2, SwBits, TableAttrs, TlbMaintenance, TlbOp,
    };

    const PAGE: u64 = 4096;
    /// Bits of a table descriptor holding the next-level table's address.
    const NEXT_TABLE: u64 = 0x0000_ffff_ffff_f000;

    /// One operation on 4 KiB pages; `attrs` of `Map` and `Protect` index the
    /// regime's attribute table ([`el2_attrs`] and the like).
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
        /// `coalesce(va, pages)`.
        Coalesce {
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
        /// `set_sw_bits(va, pages, SwBits::truncate(sw))`.
        SetSw {
            /// Input address.
            va: u64,
            /// 4 KiB pages.
            pages: u64,
            /// Software bits (the low four count).
            sw: u8,
        },
        /// `set_table_attrs(va, size, TableAttrs::from_bits_truncate(attrs))`.
        TableAttrs {
            /// Input address (2 MiB aligned).
            va: u64,
            /// Bytes (a multiple of 2 MiB or 1 GiB).
            size: u64,
            /// Table attribute bits.
            attrs: u8,
        },
    }

    impl Op {
        /// Runs the operation on `t`, with `attrs` the attribute table.
        ///
        /// # Errors
        /// The table's error.
        ///
        /// # Panics
        /// An attribute index outside `attrs`.
        pub fn run<R: Regime, A: FrameAllocator, T: TlbMaintenance>(
            self,
            t: &mut PageTable<R, A, T>,
            attrs: &[Attributes],
        ) -> Result<(), Error> {
            match self {
                Op::Map {
                    va,
                    pages,
                    out,
                    attrs: a,
                    flags,
                } => t.map(va, out, pages * PAGE, attrs[a], flags),
                Op::Unmap { va, pages } => t.unmap(va, pages * PAGE),
                Op::Coalesce { va, pages } => t.coalesce(va, pages * PAGE),
                Op::Protect {
                    va,
                    pages,
                    attrs: a,
                } => t.protect(va, pages * PAGE, attrs[a]),
                Op::SetSw { va, pages, sw } => {
                    t.set_sw_bits(va, pages * PAGE, SwBits::truncate(sw))
                }
                Op::TableAttrs { va, size, attrs } => {
                    t.set_table_attrs(va, size, TableAttrs::from_bits_truncate(attrs))
                }
            }
        }

        /// The first address a `Map` without [`MapFlags::REPLACE`] must report as
        /// already mapped, by the model (`None` for every other operation).
        #[must_use]
        pub fn conflict(self, model: &Model) -> Option<u64> {
            match self {
                Op::Map {
                    va, pages, flags, ..
                } if !flags.contains(MapFlags::REPLACE) => {
                    model.first_mapped(va, va + pages * PAGE)
                }
                _ => None,
            }
        }

        /// What the operation does to the translations of `model` when it succeeds
        /// (coalescing and table attributes change none).
        ///
        /// # Panics
        /// An attribute index outside `attrs`.
        pub fn apply(self, model: &mut Model, attrs: &[Attributes]) {
            match self {
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
                Op::Coalesce { .. } | Op::TableAttrs { .. } => {}
            }
        }
    }

    /// Attributes for EL2 tables: writable, executable, read-only, device, and with
    /// software bits.
    #[must_use]
    pub fn el2_attrs() -> [Attributes; 5] {
        [
            Attributes::normal(Permissions::RW),
            Attributes::normal(Permissions::READ.union(Permissions::EXEC_EL2)),
            Attributes::normal(Permissions::RO),
            Attributes::device(),
            Attributes::normal(Permissions::RW).with_sw(SwBits::truncate(3)),
        ]
    }

    /// Attributes for stage-2 tables without FEAT_XNX.
    #[must_use]
    pub fn s2_attrs() -> [Attributes; 5] {
        let x = Permissions::EXEC_EL1.union(Permissions::EXEC_EL0);
        [
            Attributes::normal(Permissions::RW.union(x)),
            Attributes::normal(Permissions::RO),
            Attributes::new(Permissions::RW, MemoryType::NormalNonCacheable),
            Attributes::device(),
            Attributes::normal(Permissions::empty()).with_sw(SwBits::truncate(1)),
        ]
    }

    /// Attributes for stage-2 tables with FEAT_XNX (execute at EL1 and EL0 apart).
    #[must_use]
    pub fn s2_xnx_attrs() -> [Attributes; 5] {
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

    /// Attributes for EL1&0 tables: kernel and user, executable at each.
    #[must_use]
    pub fn el1_attrs() -> [Attributes; 5] {
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

    /// Which TLB operations belong to a table of this regime (its VMID or ASID).
    pub trait Ours: Regime + Copy {
        /// Whether `op` is one of this table's.
        fn ours(&self, op: &TlbOp) -> bool;
    }

    impl Ours for El2 {
        fn ours(&self, op: &TlbOp) -> bool {
            matches!(
                op,
                TlbOp::El2Va { .. } | TlbOp::El2Range { .. } | TlbOp::El2All
            )
        }
    }

    impl Ours for Stage2 {
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

    impl Ours for El1 {
        fn ours(&self, op: &TlbOp) -> bool {
            match *op {
                TlbOp::El1Va { asid, .. }
                | TlbOp::El1Range { asid, .. }
                | TlbOp::El1Asid { asid } => asid == self.asid(),
                _ => false,
            }
        }
    }

    /// Whether `op` invalidates an entry that translates some address of
    /// `[va, va + size)` (with `need_nonleaf`, walk caches too): an address operation
    /// must name an address in it; a range operation must overlap it (an entry used to
    /// translate any address of the range is invalidated, Arm ARM D8.16).
    #[must_use]
    pub fn covers(op: &TlbOp, va: u64, size: u64, need_nonleaf: bool) -> bool {
        let hit = |a: u64, leaf: bool| a >= va && a < va + size && (!need_nonleaf || !leaf);
        let overlap = |a: u64, pages: u64, leaf: bool| {
            a < va + size && va < a.saturating_add(pages * PAGE) && (!need_nonleaf || !leaf)
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

    /// The table's leaves over its whole input space, in order.
    ///
    /// # Panics
    /// The walk fails.
    pub fn leaves<R: Regime, A: FrameAllocator, T: TlbMaintenance>(
        t: &PageTable<R, A, T>,
    ) -> Vec<Mapping> {
        let mut v = Vec::new();
        let walked = t.walk(0, t.geometry().input_size(), |m| v.push(*m));
        assert_eq!(walked, Ok(()), "walking the whole input space");
        v
    }

    /// Reads descriptor `i` of the table frame at `pa`, a [`HeapFrames`](super::HeapFrames)
    /// frame (or concatenated root).
    ///
    /// # Panics
    /// `pa` is not such a frame, or `i` lies beyond 16 concatenated tables.
    #[must_use]
    pub fn read(pa: u64, i: usize) -> u64 {
        let p = frame_ptr(pa);
        assert!(!p.is_null(), "{pa:#x} is not a HeapFrames frame");
        assert!(i < 512 * 16, "descriptor index {i}");
        // SAFETY: `p` is the host address of the simulated frame (or concatenated root)
        // at `pa`, which stays allocated for the life of the process, and a root is
        // at most 16 concatenated tables.
        unsafe { p.add(i).read_volatile() }
    }

    /// Checks the crate's bookkeeping in table descriptors (bits \[11:2\] count the
    /// non-zero entries of the next-level table, exactly; a table left empty is freed
    /// unless it holds table attributes, bit 56) and returns the number of non-root
    /// tables reachable from the root.
    ///
    /// # Panics
    /// A count is wrong or an empty table was left behind.
    pub fn check_tables<R: Regime, A: FrameAllocator, T: TlbMaintenance>(
        t: &PageTable<R, A, T>,
    ) -> usize {
        fn rec(pa: u64, level: u8, entries: usize) -> usize {
            let mut tables = 0;
            for i in 0..entries {
                let d = read(pa, i);
                if level < 3 && d & 3 == 3 {
                    let next = d & NEXT_TABLE;
                    let live = (0..512).filter(|&j| read(next, j) != 0).count() as u64;
                    assert_eq!(
                        (d >> 2) & 0x3ff,
                        live,
                        "count of table {next:#x} (L{})",
                        level + 1
                    );
                    if d & (1 << 56) == 0 {
                        assert_ne!(live, 0, "empty table {next:#x} left behind");
                    }
                    tables += 1 + rec(next, level + 1, 512);
                }
            }
            tables
        }
        let g = t.geometry();
        rec(t.root_address(), g.start_level(), g.root_entries())
    }
}

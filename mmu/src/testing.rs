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
/// attributes. Compare [`Model::canonical`] with [`runs_of`] the table's leaves.
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

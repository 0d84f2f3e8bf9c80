//! Host-side implementations for tests, benchmarks and offline table building
//! (feature `std`).

extern crate std;

use core::cell::RefCell;
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::collections::BTreeMap;
use std::vec::Vec;

use crate::frame::{FrameAllocator, PhysToVirt, FRAME_SIZE};
use crate::tlb::{TlbMaintenance, TlbOp};

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

/// Frames from the Rust heap; the "physical" address of a frame is its heap address.
///
/// Counts frames and can be told to fail (fault injection). `&HeapFrames` is also a
/// [`FrameAllocator`], so several tables can share one pool. Frames still allocated
/// when the pool is dropped are returned to the heap.
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

    fn layout(count: usize) -> Option<Layout> {
        let size = FRAME_SIZE as usize * count;
        Layout::from_size_align(size, size).ok()
    }

    fn alloc_n(&self, count: usize) -> Option<u64> {
        let mut inner = self.inner.borrow_mut();
        if let Some(b) = inner.budget.as_mut() {
            if *b < count {
                return None;
            }
            *b -= count;
        }
        let layout = Self::layout(count)?;
        // SAFETY: `layout` has a non-zero size.
        let p = unsafe { alloc_zeroed(layout) };
        if p.is_null() {
            return None;
        }
        let pa = p as u64;
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
                if let Some(layout) = Self::layout(count) {
                    // SAFETY: `pa` came from `alloc_zeroed` with this layout.
                    unsafe { dealloc(pa as *mut u8, layout) };
                }
            }
            other => panic!("HeapFrames: bad free of {pa:#x} x{count} (live: {other:?})"),
        }
    }
}

impl Drop for HeapFrames {
    fn drop(&mut self) {
        let live = core::mem::take(&mut self.inner.get_mut().live);
        for (pa, count) in live {
            if let Some(layout) = Self::layout(count) {
                // SAFETY: every live entry came from `alloc_zeroed` with this layout.
                unsafe { dealloc(pa as *mut u8, layout) };
            }
        }
    }
}

impl PhysToVirt for HeapFrames {
    #[inline(always)]
    fn phys_to_virt(&self, pa: u64) -> *mut u64 {
        pa as *mut u64
    }
}

impl FrameAllocator for HeapFrames {
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

impl PhysToVirt for &HeapFrames {
    #[inline(always)]
    fn phys_to_virt(&self, pa: u64) -> *mut u64 {
        pa as *mut u64
    }
}

impl FrameAllocator for &HeapFrames {
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
    }
}

impl TlbMaintenance for RecordingTlb {
    fn execute(&mut self, ops: &[TlbOp]) {
        self.sequences.push(ops.to_vec());
    }
}

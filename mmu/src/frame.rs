//! Where table frames come from, and how the crate reaches them.

/// Size of a translation-table frame (4 KiB granule).
pub const FRAME_SIZE: u64 = 4096;

/// Turns the physical address of a table frame into a pointer the crate can use.
///
/// In a hypervisor with an identity-mapped EL2 address space this is the identity;
/// on the host (tests, offline table building) frames come from the heap and their
/// "physical" address is the heap address.
pub trait PhysToVirt {
    /// Returns a pointer through which the 4 KiB frame at physical address `pa`
    /// can be read and written as 512 `u64` descriptors.
    ///
    /// The crate only calls this for frames it obtained from the allocator (or the
    /// root), so implementations need not validate `pa`.
    fn phys_to_virt(&self, pa: u64) -> *mut u64;
}

/// Source of zeroed 4 KiB table frames.
///
/// A [`PageTable`](crate::PageTable) owns its allocator value; to share one pool
/// between several tables (one stage 2 per VM plus the hypervisor's own stage 1),
/// implement this trait for a cheap handle (e.g. a reference to a lock-protected pool).
pub trait FrameAllocator: PhysToVirt {
    /// Allocates one zeroed, 4 KiB-aligned frame and returns its physical address,
    /// or `None` if none is available.
    fn alloc_frame(&mut self) -> Option<u64>;

    /// Allocates `count` physically contiguous zeroed frames aligned to
    /// `count * 4 KiB` (`count` is a power of two, at most 16). Used only for the
    /// concatenated root tables of stage 2. The default supports `count == 1` only.
    fn alloc_contiguous(&mut self, count: usize) -> Option<u64> {
        if count == 1 {
            self.alloc_frame()
        } else {
            None
        }
    }

    /// Returns a frame obtained from [`alloc_frame`](Self::alloc_frame).
    ///
    /// The frame's contents are arbitrary when it is returned; the allocator must
    /// zero frames when it hands them out again.
    fn free_frame(&mut self, pa: u64);

    /// Returns frames obtained from [`alloc_contiguous`](Self::alloc_contiguous).
    /// The default frees them one by one.
    fn free_contiguous(&mut self, pa: u64, count: usize) {
        for i in 0..count as u64 {
            self.free_frame(pa + i * FRAME_SIZE);
        }
    }
}

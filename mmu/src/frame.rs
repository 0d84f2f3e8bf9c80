//! Where table frames come from, and how the crate reaches them.

/// Size of a translation-table frame (4 KiB granule).
pub const FRAME_SIZE: u64 = 4096;

/// Turns the physical address of a table frame into a pointer the crate can use.
///
/// In a hypervisor with an identity-mapped EL2 address space this is the identity;
/// on the host (tests, offline table building) it is whatever the frame source uses.
///
/// # Safety
///
/// The crate reads and writes table frames through the returned pointers without any
/// further check, and the hardware walks the same frames by physical address, so an
/// implementation must guarantee, for every frame `pa` that its
/// [`FrameAllocator`] handed out and has not taken back:
///
/// - `phys_to_virt(pa)` is non-null, 8-byte aligned and valid for reads and writes of
///   [`FRAME_SIZE`] bytes (for a run from
///   [`alloc_contiguous`](FrameAllocator::alloc_contiguous), of the whole run, with
///   `phys_to_virt(pa + k * FRAME_SIZE) == phys_to_virt(pa) + k * FRAME_SIZE`);
/// - the pointer reaches the memory at physical address `pa` (the memory a table
///   walker reads when the table is installed), and the same `pa` always gives the
///   same pointer;
/// - nothing else accesses that memory while the frame belongs to a table.
pub unsafe trait PhysToVirt {
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
///
/// The crate checks that every frame it receives is 4 KiB aligned (or aligned to its
/// run, for concatenated roots) and lies below the table's output address size, and
/// fails with [`Error::InvalidFrame`](crate::Error::InvalidFrame) otherwise.
///
/// # Safety
///
/// The crate writes descriptors into the frames it is given and the hardware walks
/// them, so an implementation must guarantee:
///
/// - a frame returned by [`alloc_frame`](Self::alloc_frame) (a run returned by
///   [`alloc_contiguous`](Self::alloc_contiguous)) is real memory, reachable through
///   [`PhysToVirt::phys_to_virt`] as that trait requires, filled with zeros, and
///   exclusively the caller's until it is given back by
///   [`free_frame`](Self::free_frame) ([`free_contiguous`](Self::free_contiguous));
/// - all handles sharing one pool hand out each frame once.
///
/// Returning `None` is always allowed; the operation then fails with
/// [`Error::OutOfFrames`](crate::Error::OutOfFrames) and changes nothing.
///
/// # Example
///
/// Implementing the trait is `unsafe`: the crate relies on the contract above.
///
/// ```compile_fail
/// struct Bogus;
/// impl mmu::PhysToVirt for Bogus {
///     fn phys_to_virt(&self, pa: u64) -> *mut u64 {
///         pa as *mut u64
///     }
/// }
/// ```
pub unsafe trait FrameAllocator: PhysToVirt {
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

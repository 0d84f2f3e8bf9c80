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

/// A pool of physical 4 KiB frames, by address only: what [`IdMap`] and [`LinearMap`]
/// turn into a [`FrameAllocator`] (they reach and zero the frames themselves).
///
/// The trait itself promises nothing; whoever wraps a source in [`IdMap::new`] or
/// [`LinearMap::new`] (both `unsafe`) vouches for the frames it hands out.
pub trait FrameSource {
    /// One 4 KiB-aligned frame, or `None`.
    fn alloc(&mut self) -> Option<u64>;

    /// `count` contiguous frames aligned to `count * 4 KiB` (`count` a power of two,
    /// at most 16), or `None`. The default supports `count == 1` only.
    fn alloc_contiguous(&mut self, count: usize) -> Option<u64> {
        if count == 1 {
            self.alloc()
        } else {
            None
        }
    }

    /// Takes back a frame from [`alloc`](Self::alloc).
    fn free(&mut self, pa: u64);

    /// Takes back frames from [`alloc_contiguous`](Self::alloc_contiguous); the default
    /// frees them one by one.
    fn free_contiguous(&mut self, pa: u64, count: usize) {
        for i in 0..count as u64 {
            self.free(pa + i * FRAME_SIZE);
        }
    }
}

/// Frames reached at their physical address (virtual = physical): an identity-mapped
/// hypervisor or firmware. Zeroes each frame it hands out.
///
/// # Example
///
/// ```
/// use mmu::{El2, FrameSource, IdMap, NoTlbMaintenance, PageTable};
///
/// #[repr(C, align(4096))]
/// struct Frames([[u64; 512]; 4]);
///
/// /// Hands out the frames of one buffer; its addresses stand for physical ones
/// /// (the host process plays an identity-mapped machine).
/// struct Pool { base: u64, used: [bool; 4] }
///
/// impl FrameSource for Pool {
///     fn alloc(&mut self) -> Option<u64> {
///         let i = self.used.iter().position(|u| !u)?;
///         self.used[i] = true;
///         Some(self.base + i as u64 * 4096)
///     }
///     fn free(&mut self, pa: u64) {
///         self.used[((pa - self.base) / 4096) as usize] = false;
///     }
/// }
///
/// let frames = Box::leak(Box::new(Frames([[0; 512]; 4])));
/// let pool = Pool { base: frames.0.as_mut_ptr() as u64, used: [false; 4] };
/// // SAFETY: the pool's frames are memory of this process at "physical" = virtual
/// // addresses, used by nothing else, each handed out once until freed.
/// let frames = unsafe { IdMap::new(pool) };
/// let mut t = PageTable::new(El2::new(39), frames, NoTlbMaintenance)?;
/// t.map(0x4000_0000, 0x4000_0000, 0x1000, mmu::Attributes::device(), mmu::MapFlags::empty())?;
/// assert_eq!(t.frames_in_use(), 3);
/// # Ok::<(), mmu::Error>(())
/// ```
#[derive(Debug)]
pub struct IdMap<S: FrameSource> {
    source: S,
}

impl<S: FrameSource> IdMap<S> {
    /// Wraps `source`.
    ///
    /// # Safety
    ///
    /// For every frame (run) `source` hands out until it is freed: the memory at
    /// virtual address `pa` is that frame (the same memory a table walker reads at
    /// physical address `pa`), is readable and writable as normal memory for its whole
    /// size, and nothing else uses it; `source` hands out each frame once.
    pub const unsafe fn new(source: S) -> Self {
        IdMap { source }
    }

    /// The frame source.
    pub fn source(&self) -> &S {
        &self.source
    }
}

/// Frames reached at a fixed offset from their physical address (virtual = physical +
/// `offset`, wrapping): a linear map of physical memory. Zeroes each frame it hands
/// out.
///
/// # Example
///
/// ```
/// use mmu::{El2, FrameSource, LinearMap, NoTlbMaintenance, PageTable};
///
/// #[repr(C, align(4096))]
/// struct Frames([[u64; 512]; 4]);
///
/// /// Frames at physical 0x8000_0000.. (a buffer of this process stands for them).
/// struct Pool { next: u64, end: u64 }
///
/// impl FrameSource for Pool {
///     fn alloc(&mut self) -> Option<u64> {
///         (self.next < self.end).then(|| { self.next += 4096; self.next - 4096 })
///     }
///     fn free(&mut self, _pa: u64) {}
/// }
///
/// let buf = Box::leak(Box::new(Frames([[0; 512]; 4])));
/// let offset = (buf.0.as_mut_ptr() as u64).wrapping_sub(0x8000_0000);
/// // SAFETY: physical frame 0x8000_0000 + k * 4096 is `buf.0[k]`, reached at that
/// // address plus `offset`, used by nothing else; the pool hands each out once.
/// let frames = unsafe { LinearMap::new(Pool { next: 0x8000_0000, end: 0x8000_4000 }, offset) };
/// let t = PageTable::new(El2::new(39), frames, NoTlbMaintenance)?;
/// assert_eq!(t.root_address(), 0x8000_0000);
/// # Ok::<(), mmu::Error>(())
/// ```
#[derive(Debug)]
pub struct LinearMap<S: FrameSource> {
    source: S,
    offset: u64,
}

impl<S: FrameSource> LinearMap<S> {
    /// Wraps `source`, whose frames are reached at `pa.wrapping_add(offset)`.
    ///
    /// # Safety
    ///
    /// For every frame (run) `source` hands out until it is freed: the memory at
    /// virtual address `pa.wrapping_add(offset)` is that frame (the same memory a table
    /// walker reads at physical address `pa`), is readable and writable as normal
    /// memory for its whole size, and nothing else uses it; `source` hands out each
    /// frame once.
    pub const unsafe fn new(source: S, offset: u64) -> Self {
        LinearMap { source, offset }
    }

    /// The frame source.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// The offset from physical to virtual addresses.
    pub const fn offset(&self) -> u64 {
        self.offset
    }
}

/// Zeroes `count` frames at `p`.
///
/// # Safety
/// `p` is valid for writes of `count` frames.
unsafe fn zero(p: *mut u64, count: usize) {
    // SAFETY: the caller's guarantee.
    unsafe { core::ptr::write_bytes(p, 0, count * 512) };
}

macro_rules! mapped_allocator {
    ($ty:ident, $self_:ident, $pa:ident => $virt:expr) => {
        // SAFETY: `new`'s contract: every frame the source hands out is reached at
        // this address, readable, writable and exclusively the table's.
        unsafe impl<S: FrameSource> PhysToVirt for $ty<S> {
            #[inline(always)]
            fn phys_to_virt(&$self_, $pa: u64) -> *mut u64 {
                $virt
            }
        }

        // SAFETY: as above; frames are zeroed here before they are handed out, and the
        // source hands out each once.
        unsafe impl<S: FrameSource> FrameAllocator for $ty<S> {
            fn alloc_frame(&mut self) -> Option<u64> {
                let pa = self.source.alloc()?;
                // SAFETY: a frame of the source, reached as `new` guarantees.
                unsafe { zero(self.phys_to_virt(pa), 1) };
                Some(pa)
            }

            fn alloc_contiguous(&mut self, count: usize) -> Option<u64> {
                let pa = self.source.alloc_contiguous(count)?;
                // SAFETY: a run of the source, reached as `new` guarantees.
                unsafe { zero(self.phys_to_virt(pa), count) };
                Some(pa)
            }

            fn free_frame(&mut self, pa: u64) {
                self.source.free(pa);
            }

            fn free_contiguous(&mut self, pa: u64, count: usize) {
                self.source.free_contiguous(pa, count);
            }
        }
    };
}

mapped_allocator!(IdMap, self, pa => pa as *mut u64);
mapped_allocator!(LinearMap, self, pa => pa.wrapping_add(self.offset) as *mut u64);

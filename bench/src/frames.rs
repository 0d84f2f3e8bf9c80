//! The one frame source behind every adapter: zeroed, 4 KiB-aligned blocks from the host
//! heap, identity "physical" addresses (the frame's host address), and a live count.

use std::alloc::{alloc, alloc_zeroed, dealloc, handle_alloc_error, Layout};
use std::cell::Cell;
use std::ptr::NonNull;

const FRAME: Layout = match Layout::from_size_align(4096, 4096) {
    Ok(layout) => layout,
    Err(_) => panic!("4 KiB frame layout"),
};

/// Allocates one zeroed 4 KiB frame; its host address doubles as its physical address.
#[must_use]
pub fn alloc_frame() -> NonNull<u8> {
    // SAFETY: `FRAME` has a non-zero size.
    let ptr = unsafe { alloc_zeroed(FRAME) };
    NonNull::new(ptr).unwrap_or_else(|| handle_alloc_error(FRAME))
}

/// Allocates one 4 KiB frame without zeroing it, for a crate that zeroes its new tables
/// itself (so the frame is not zeroed twice).
#[must_use]
pub fn alloc_frame_uninit() -> NonNull<u8> {
    // SAFETY: `FRAME` has a non-zero size.
    let ptr = unsafe { alloc(FRAME) };
    NonNull::new(ptr).unwrap_or_else(|| handle_alloc_error(FRAME))
}

/// Frees a frame returned by [`alloc_frame`] or [`alloc_frame_uninit`].
///
/// # Safety
///
/// `frame` must come from [`alloc_frame`] or [`alloc_frame_uninit`] and must not be used or freed again.
pub unsafe fn free_frame(frame: NonNull<u8>) {
    // SAFETY: the caller guarantees `frame` was allocated with `FRAME` and is not reused.
    unsafe { dealloc(frame.as_ptr(), FRAME) }
}

/// A live-frame counter for allocators that carry state (one per table).
#[derive(Debug, Default)]
pub struct FrameCount(Cell<usize>);

impl FrameCount {
    /// Records one allocation.
    pub fn up(&self) {
        self.0.set(self.0.get() + 1);
    }

    /// Records one release.
    pub fn down(&self) {
        self.0.set(self.0.get() - 1);
    }

    /// Frames allocated and not yet freed.
    #[must_use]
    pub fn get(&self) -> usize {
        self.0.get()
    }
}

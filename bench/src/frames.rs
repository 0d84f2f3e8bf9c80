//! The one frame source behind every adapter: a per-thread pool of 4 KiB frames carved
//! from 2 MiB chunks of the host heap, identity "physical" addresses (the frame's host
//! address), and a live count per table.
//!
//! A pool rather than one heap allocation per frame: the heap's cost and behaviour
//! (returning memory to the kernel when a large table is dropped, page faults and
//! already-zero pages when it is allocated again) would otherwise dominate and randomise
//! the times of the workloads that allocate or free hundreds of tables, and would not be
//! the same for every crate. A pool is also what a hypervisor hands a table crate. Frames
//! are reused last-freed-first; chunks are only returned to the heap when the thread ends.

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::cell::{Cell, RefCell};
use std::ptr::NonNull;

const FRAME_SIZE: usize = 4096;
const CHUNK_FRAMES: usize = 512;
const CHUNK: Layout = match Layout::from_size_align(CHUNK_FRAMES * FRAME_SIZE, FRAME_SIZE) {
    Ok(layout) => layout,
    Err(_) => panic!("frame chunk layout"),
};

/// Free frames and the chunks they come from, for one thread.
struct Pool {
    free: Vec<NonNull<u8>>,
    chunks: Vec<NonNull<u8>>,
}

impl Pool {
    fn take(&mut self) -> NonNull<u8> {
        if let Some(frame) = self.free.pop() {
            return frame;
        }
        // SAFETY: `CHUNK` has a non-zero size.
        let chunk =
            NonNull::new(unsafe { alloc(CHUNK) }).unwrap_or_else(|| handle_alloc_error(CHUNK));
        self.chunks.push(chunk);
        // Hand frames out in address order: push the highest first.
        for i in (1..CHUNK_FRAMES).rev() {
            // SAFETY: `i * FRAME_SIZE` is within the chunk just allocated.
            self.free.push(unsafe { chunk.add(i * FRAME_SIZE) });
        }
        chunk
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for chunk in self.chunks.drain(..) {
            // SAFETY: every chunk was allocated with `CHUNK` by `take` and is freed once;
            // the thread that used its frames is ending.
            unsafe { dealloc(chunk.as_ptr(), CHUNK) };
        }
    }
}

thread_local! {
    static POOL: RefCell<Pool> = const {
        RefCell::new(Pool { free: Vec::new(), chunks: Vec::new() })
    };
}

/// Takes one zeroed 4 KiB frame; its host address doubles as its physical address.
#[must_use]
pub fn alloc_frame() -> NonNull<u8> {
    let frame = alloc_frame_uninit();
    // SAFETY: `frame` is a 4 KiB frame owned by the caller from now on.
    unsafe { frame.as_ptr().write_bytes(0, FRAME_SIZE) };
    frame
}

/// Takes one 4 KiB frame without zeroing it, for a crate that zeroes its new tables
/// itself (so the frame is not zeroed twice).
#[must_use]
pub fn alloc_frame_uninit() -> NonNull<u8> {
    POOL.with(|pool| pool.borrow_mut().take())
}

/// Returns a frame taken by [`alloc_frame`] or [`alloc_frame_uninit`].
///
/// # Safety
///
/// `frame` must come from [`alloc_frame`] or [`alloc_frame_uninit`] on this thread and must
/// not be used or freed again.
pub unsafe fn free_frame(frame: NonNull<u8>) {
    POOL.with(|pool| pool.borrow_mut().free.push(frame));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_aligned_zeroed_distinct_and_reused() {
        let a = alloc_frame();
        // SAFETY: `a` is a frame we own; dirty it before returning it.
        unsafe { a.as_ptr().write_bytes(0xAB, FRAME_SIZE) };
        let b = alloc_frame();
        assert_ne!(a, b);
        assert_eq!(a.as_ptr() as usize % FRAME_SIZE, 0);
        assert_eq!(b.as_ptr() as usize % FRAME_SIZE, 0);
        // SAFETY: `a` came from `alloc_frame` on this thread and is not used again.
        unsafe { free_frame(a) };
        let c = alloc_frame();
        assert_eq!(c, a, "last freed, first reused");
        // SAFETY: `c` is a live 4 KiB frame.
        let bytes = unsafe { std::slice::from_raw_parts(c.as_ptr(), FRAME_SIZE) };
        assert!(
            bytes.iter().all(|&x| x == 0),
            "reused frames are zeroed again"
        );
        // More than one chunk's worth stays distinct.
        let many: std::collections::BTreeSet<usize> = (0..CHUNK_FRAMES + 3)
            .map(|_| alloc_frame().as_ptr() as usize)
            .collect();
        assert_eq!(many.len(), CHUNK_FRAMES + 3);
        assert!(!many.contains(&(b.as_ptr() as usize)));
    }
}

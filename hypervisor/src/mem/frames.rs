//! The pool of 4 KiB frames the hypervisor's page tables (its own stage 1 and every
//! guest's stage 2) are built from.
//!
//! The pool only does bookkeeping (a bitmap on the heap); it never touches the frames, so
//! it is tested on the host with made-up addresses.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use crate::mem::{PhysAddr, PhysRange, PAGE_SIZE};

/// Why a frame could not be returned to the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The address is not page aligned.
    Misaligned(u64),
    /// The address is outside the pool.
    NotInPool(u64),
    /// The frame is already free.
    DoubleFree(u64),
}

impl core::error::Error for FrameError {}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Misaligned(a) => write!(f, "frame address {a:#x} is not page aligned"),
            Self::NotInPool(a) => write!(f, "frame {a:#x} is not in the pool"),
            Self::DoubleFree(a) => write!(f, "frame {a:#x} is already free"),
        }
    }
}

/// A bitmap allocator of page frames over one physical range.
#[derive(Debug)]
pub struct FramePool {
    base: u64,
    frames: usize,
    used: Vec<u64>,
    in_use: usize,
    peak: usize,
    next: usize,
}

impl FramePool {
    /// A pool over the whole pages inside `region`.
    #[must_use]
    pub fn new(region: PhysRange) -> Self {
        // A base that cannot be rounded up to a page leaves no whole page.
        let base = region
            .base
            .checked_align_up(PAGE_SIZE)
            .map_or(u64::MAX, PhysAddr::get);
        let frames = (region.end().get().saturating_sub(base) / PAGE_SIZE) as usize;
        Self {
            base,
            frames,
            used: vec![0; frames.div_ceil(64)],
            in_use: 0,
            peak: 0,
            next: 0,
        }
    }

    /// The range the pool hands out.
    #[must_use]
    pub fn region(&self) -> PhysRange {
        // `frames` whole pages fit between `base` and the region's end: exact.
        PhysRange::new(
            PhysAddr::new(self.base),
            (self.frames as u64).saturating_mul(PAGE_SIZE),
        )
    }

    /// Total frames.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.frames
    }

    /// Frames currently allocated.
    #[must_use]
    pub fn in_use(&self) -> usize {
        self.in_use
    }

    /// Most frames ever allocated at once.
    #[must_use]
    pub fn peak(&self) -> usize {
        self.peak
    }

    /// The address of frame `idx` (below `frames`: the sum stays inside the region).
    fn address(&self, idx: usize) -> u64 {
        self.base
            .saturating_add((idx as u64).saturating_mul(PAGE_SIZE))
    }

    /// The frame number of `pa`, if it is a page-aligned address of the pool.
    fn index(&self, pa: u64) -> Option<usize> {
        if pa % PAGE_SIZE != 0 {
            return None;
        }
        let idx = usize::try_from(pa.checked_sub(self.base)? / PAGE_SIZE).ok()?;
        (idx < self.frames).then_some(idx)
    }

    /// Whether frame `idx` is allocated (one past the bitmap counts as allocated: it is
    /// never handed out).
    fn is_used(&self, idx: usize) -> bool {
        self.used
            .get(idx / 64)
            .is_none_or(|word| word & (1 << (idx % 64)) != 0)
    }

    /// Marks frame `idx` allocated or free.
    fn mark(&mut self, idx: usize, used: bool) {
        if let Some(word) = self.used.get_mut(idx / 64) {
            if used {
                *word |= 1 << (idx % 64);
            } else {
                *word &= !(1 << (idx % 64));
            }
        }
    }

    /// Counts `count` more frames in use (never more than `frames`: the sum is exact).
    fn took(&mut self, count: usize) {
        self.in_use = self.in_use.saturating_add(count);
        self.peak = self.peak.max(self.in_use);
    }

    /// Takes a free frame and returns its physical address (contents not cleared).
    pub fn alloc(&mut self) -> Option<u64> {
        if self.in_use >= self.frames {
            return None;
        }
        // From the word of the last frame handed out to the end, then from the start.
        let start = self.next / 64;
        let words = self.used.len();
        let idx = (start..words).chain(0..start).find_map(|w| {
            let free = !self.used.get(w)?;
            // `w < words`, so the frame number fits (`words * 64` frames do).
            let idx = w
                .saturating_mul(64)
                .saturating_add(free.trailing_zeros() as usize);
            (free != 0 && idx < self.frames).then_some(idx)
        })?;
        self.mark(idx, true);
        self.took(1);
        self.next = idx;
        Some(self.address(idx))
    }

    /// Takes `count` physically contiguous free frames whose first address is aligned to
    /// `count` frames (for concatenated stage-2 root tables); `count` must be a power of
    /// two. Returns the first frame's address.
    pub fn alloc_contiguous(&mut self, count: usize) -> Option<u64> {
        if count == 0 || !count.is_power_of_two() || count > self.frames {
            return None;
        }
        if count == 1 {
            return self.alloc();
        }
        let align = (count as u64).checked_mul(PAGE_SIZE)?;
        let first = self
            .base
            .checked_next_multiple_of(align)?
            .checked_sub(self.base)?
            / PAGE_SIZE;
        let mut idx = usize::try_from(first).ok()?;
        while let Some(end) = idx.checked_add(count).filter(|&end| end <= self.frames) {
            if (idx..end).all(|i| !self.is_used(i)) {
                for i in idx..end {
                    self.mark(i, true);
                }
                self.took(count);
                return Some(self.address(idx));
            }
            idx = end;
        }
        None
    }

    /// Returns a frame to the pool.
    ///
    /// # Errors
    ///
    /// [`FrameError`] if `pa` is misaligned, outside the pool or already free; the pool
    /// is unchanged then.
    pub fn free(&mut self, pa: u64) -> Result<(), FrameError> {
        if pa % PAGE_SIZE != 0 {
            return Err(FrameError::Misaligned(pa));
        }
        let idx = self.index(pa).ok_or(FrameError::NotInPool(pa))?;
        if !self.is_used(idx) {
            return Err(FrameError::DoubleFree(pa));
        }
        self.mark(idx, false);
        self.in_use = self.in_use.saturating_sub(1);
        Ok(())
    }

    /// Whether `pa` is an allocated frame of this pool.
    #[must_use]
    pub fn is_allocated(&self, pa: u64) -> bool {
        self.index(pa).is_some_and(|idx| self.is_used(idx))
    }
}

/// A handle to the shared frame pool for `mmu` page tables, on an identity-mapped
/// hypervisor (table frame PA = VA). Frames are zeroed when handed out.
#[derive(Clone, Copy, Debug)]
pub struct SharedFrames {
    pool: &'static spin::Mutex<FramePool>,
}

impl SharedFrames {
    /// A handle on `pool`.
    ///
    /// # Safety
    ///
    /// Every frame of the pool must be identity mapped (or the MMU off), writable, and
    /// used for nothing but the page tables built through such handles.
    #[must_use]
    pub const unsafe fn new(pool: &'static spin::Mutex<FramePool>) -> Self {
        Self { pool }
    }

    /// The pool.
    #[must_use]
    pub fn pool(&self) -> &'static spin::Mutex<FramePool> {
        self.pool
    }
}

/// Zeroes `bytes` bytes of frames at `pa`.
fn zero_frames(pa: u64, bytes: usize) {
    // SAFETY: `SharedFrames::new`'s contract: the frames are identity mapped, writable and
    // owned by the caller (just allocated from the pool, `bytes` of them).
    unsafe { core::ptr::write_bytes(pa as *mut u8, 0, bytes) };
}

// SAFETY: `SharedFrames::new`'s contract: the pool's frames are identity mapped and
// writable.
unsafe impl mmu::PhysToVirt for SharedFrames {
    fn phys_to_virt(&self, pa: u64) -> *mut u64 {
        pa as *mut u64
    }
}

// SAFETY: the pool hands out each frame (run) once until it is freed, zeroed here.
unsafe impl mmu::FrameAllocator for SharedFrames {
    fn alloc_frame(&mut self) -> Option<u64> {
        let pa = self.pool.lock().alloc()?;
        zero_frames(pa, PAGE_SIZE as usize);
        Some(pa)
    }

    fn alloc_contiguous(&mut self, count: usize) -> Option<u64> {
        // The run's size is known to fit before any frame is taken.
        let bytes = count.checked_mul(PAGE_SIZE as usize)?;
        let pa = self.pool.lock().alloc_contiguous(count)?;
        zero_frames(pa, bytes);
        Some(pa)
    }

    fn free_frame(&mut self, pa: u64) {
        // The tables only return frames they got from this pool; a failure here is a
        // bookkeeping bug worth a log line, not a crash.
        if let Err(e) = self.pool.lock().free(pa) {
            log::error!("page-table frame pool: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn hands_out_every_frame_once() {
        // 130 frames: the last bitmap word is partial.
        let mut pool = FramePool::new(PhysRange::new(PhysAddr::new(0x4100_0000), 130 * PAGE_SIZE));
        let mut seen = BTreeSet::new();
        while let Some(pa) = pool.alloc() {
            assert_eq!(pa % PAGE_SIZE, 0);
            assert!(pool
                .region()
                .contains(&PhysRange::new(PhysAddr::new(pa), PAGE_SIZE)));
            assert!(seen.insert(pa), "frame {pa:#x} handed out twice");
        }
        assert_eq!(seen.len(), 130);
        assert_eq!(pool.in_use(), 130);
        assert_eq!(pool.alloc(), None);
    }

    #[test]
    fn free_and_reuse() {
        let mut pool = FramePool::new(PhysRange::new(PhysAddr::new(0x4100_0000), 4 * PAGE_SIZE));
        let a = pool.alloc().unwrap();
        let b = pool.alloc().unwrap();
        assert!(pool.is_allocated(a));
        pool.free(a).unwrap();
        assert!(!pool.is_allocated(a));
        assert_eq!(pool.in_use(), 1);
        assert_eq!(pool.peak(), 2);
        assert_eq!(pool.free(a), Err(FrameError::DoubleFree(a)));
        assert_eq!(pool.free(b + 1), Err(FrameError::Misaligned(b + 1)));
        assert_eq!(
            pool.free(0x4000_0000),
            Err(FrameError::NotInPool(0x4000_0000))
        );
        assert_eq!(
            pool.free(0x4100_0000 + 4 * PAGE_SIZE),
            Err(FrameError::NotInPool(0x4100_4000))
        );
        assert_eq!(pool.in_use(), 1, "failed frees change nothing");
        // Everything but b can be allocated again.
        let again: BTreeSet<_> = core::iter::from_fn(|| pool.alloc()).collect();
        assert_eq!(again.len(), 3);
        assert!(!again.contains(&b));
    }

    #[test]
    fn contiguous_runs_are_aligned_and_exclusive() {
        // Base deliberately not 16 KiB aligned.
        let mut pool = FramePool::new(PhysRange::new(PhysAddr::new(0x4100_1000), 32 * PAGE_SIZE));
        let single = pool.alloc().unwrap();
        let run = pool.alloc_contiguous(4).unwrap();
        assert_eq!(run % (4 * PAGE_SIZE), 0);
        assert!(!(run..run + 4 * PAGE_SIZE).contains(&single));
        for i in 0..4 {
            assert!(pool.is_allocated(run + i * PAGE_SIZE));
        }
        assert_eq!(pool.in_use(), 5);
        assert_eq!(pool.alloc_contiguous(3), None, "not a power of two");
        assert_eq!(pool.alloc_contiguous(64), None, "larger than the pool");
        // Exhaust the 16-frame runs: 32 frames from 0x4100_1000 hold one aligned run of
        // 16 (0x4101_0000..0x4102_0000) at most.
        assert_eq!(pool.alloc_contiguous(16), Some(0x4101_0000));
        assert_eq!(pool.alloc_contiguous(16), None);
        for i in 0..4 {
            pool.free(run + i * PAGE_SIZE).unwrap();
        }
        assert_eq!(pool.in_use(), 17);
    }

    #[test]
    fn unaligned_region_is_trimmed_to_whole_pages() {
        let pool = FramePool::new(PhysRange::new(PhysAddr::new(0x4100_0800), 3 * PAGE_SIZE));
        assert_eq!(
            pool.region(),
            PhysRange::new(PhysAddr::new(0x4100_1000), 2 * PAGE_SIZE)
        );
        assert_eq!(
            FramePool::new(PhysRange::new(PhysAddr::new(0x4100_0800), 0x100)).capacity(),
            0
        );
    }

    #[test]
    fn a_pool_at_the_top_of_the_address_space_neither_wraps_nor_panics() {
        // A base in the last page cannot be rounded up: no frames.
        let mut none = FramePool::new(PhysRange::new(PhysAddr::new(u64::MAX - 0x800), 0x800));
        assert_eq!(none.capacity(), 0);
        assert_eq!(none.alloc(), None);
        assert_eq!(none.alloc_contiguous(2), None);
        assert_eq!(none.free(!0xfff), Err(FrameError::NotInPool(!0xfff)));
        // Fourteen frames below the last page: a run aligned to 8 frames would start
        // at 2^64, so there is none; single frames are all there.
        let base = 0xffff_ffff_ffff_1000;
        let mut top = FramePool::new(PhysRange::new(PhysAddr::new(base), 0xe000));
        assert_eq!(top.capacity(), 14);
        assert_eq!(top.alloc_contiguous(8), None);
        let all: Vec<u64> = core::iter::from_fn(|| top.alloc()).collect();
        assert_eq!(all.len(), 14);
        assert_eq!(all.last(), Some(&(base + 13 * PAGE_SIZE)));
        assert!(top.is_allocated(base));
        assert!(!top.is_allocated(base - PAGE_SIZE));
        assert_eq!(
            top.free(base - PAGE_SIZE),
            Err(FrameError::NotInPool(base - PAGE_SIZE))
        );
        top.free(base).expect("free");
        assert_eq!(top.free(base), Err(FrameError::DoubleFree(base)));
    }
}

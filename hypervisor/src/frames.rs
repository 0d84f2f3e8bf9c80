//! The pool of 4 KiB frames the hypervisor's page tables (its own stage 1 and every
//! guest's stage 2) are built from.
//!
//! The pool only does bookkeeping (a bitmap on the heap); it never touches the frames, so
//! it is tested on the host with made-up addresses.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use crate::layout::PAGE_SIZE;
use crate::platform::Region;

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
    pub fn new(region: Region) -> Self {
        let base = (region.base + PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
        let frames = (region.end().saturating_sub(base) / PAGE_SIZE) as usize;
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
    pub fn region(&self) -> Region {
        Region::new(self.base, self.frames as u64 * PAGE_SIZE)
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

    /// Takes a free frame and returns its physical address (contents not cleared).
    pub fn alloc(&mut self) -> Option<u64> {
        if self.in_use == self.frames {
            return None;
        }
        let words = self.used.len();
        for step in 0..words {
            let w = (self.next / 64 + step) % words;
            let free = !self.used[w];
            if free == 0 {
                continue;
            }
            let idx = w * 64 + free.trailing_zeros() as usize;
            if idx >= self.frames {
                continue;
            }
            self.used[w] |= 1 << (idx % 64);
            self.in_use += 1;
            self.peak = self.peak.max(self.in_use);
            self.next = idx;
            return Some(self.base + idx as u64 * PAGE_SIZE);
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
        if pa < self.base || pa >= self.region().end() {
            return Err(FrameError::NotInPool(pa));
        }
        let idx = ((pa - self.base) / PAGE_SIZE) as usize;
        let bit = 1u64 << (idx % 64);
        if self.used[idx / 64] & bit == 0 {
            return Err(FrameError::DoubleFree(pa));
        }
        self.used[idx / 64] &= !bit;
        self.in_use -= 1;
        Ok(())
    }

    /// Whether `pa` is an allocated frame of this pool.
    #[must_use]
    pub fn is_allocated(&self, pa: u64) -> bool {
        if pa % PAGE_SIZE != 0 || pa < self.base || pa >= self.region().end() {
            return false;
        }
        let idx = ((pa - self.base) / PAGE_SIZE) as usize;
        self.used[idx / 64] & (1 << (idx % 64)) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn hands_out_every_frame_once() {
        // 130 frames: the last bitmap word is partial.
        let mut pool = FramePool::new(Region::new(0x4100_0000, 130 * PAGE_SIZE));
        let mut seen = BTreeSet::new();
        while let Some(pa) = pool.alloc() {
            assert_eq!(pa % PAGE_SIZE, 0);
            assert!(pool.region().contains(&Region::new(pa, PAGE_SIZE)));
            assert!(seen.insert(pa), "frame {pa:#x} handed out twice");
        }
        assert_eq!(seen.len(), 130);
        assert_eq!(pool.in_use(), 130);
        assert_eq!(pool.alloc(), None);
    }

    #[test]
    fn free_and_reuse() {
        let mut pool = FramePool::new(Region::new(0x4100_0000, 4 * PAGE_SIZE));
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
    fn unaligned_region_is_trimmed_to_whole_pages() {
        let pool = FramePool::new(Region::new(0x4100_0800, 3 * PAGE_SIZE));
        assert_eq!(pool.region(), Region::new(0x4100_1000, 2 * PAGE_SIZE));
        assert_eq!(
            FramePool::new(Region::new(0x4100_0800, 0x100)).capacity(),
            0
        );
    }
}

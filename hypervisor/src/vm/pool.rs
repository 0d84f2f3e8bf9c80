//! Ownership of guest RAM: which pages of the host RAM guests may have belong to which VM.
//!
//! VM descriptions name the physical pages of each VM's RAM; the pool makes sure a page is
//! given to at most one VM at a time and that every page comes back on destroy.

use core::fmt;

use alloc::vec::Vec;

use crate::mem::PhysRange;

/// Why a claim or release failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolError {
    /// The range is not inside the guest-memory range or not page-aligned.
    OutOfRange,
    /// Some page of the range already belongs to a VM.
    InUse,
    /// Release of a range that was not claimed exactly like that.
    NotClaimed,
}

impl core::error::Error for PoolError {}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::OutOfRange => "outside guest memory or not page aligned",
            Self::InUse => "already another VM's",
            Self::NotClaimed => "not claimed",
        })
    }
}

/// The guest-memory ranges and the claimed parts of them.
#[derive(Debug)]
pub struct PagePool {
    /// Sorted, disjoint, adjacent ones merged.
    ranges: Vec<PhysRange>,
    claimed: Vec<(u64, u64)>,
}

impl PagePool {
    /// A pool over `ranges` (in any order; overlapping or adjacent ones are merged), all
    /// free.
    #[must_use]
    pub fn new(ranges: &[PhysRange]) -> Self {
        let mut sorted: Vec<PhysRange> = ranges.iter().copied().filter(|r| r.size > 0).collect();
        sorted.sort_by_key(|r| r.base);
        let mut merged: Vec<PhysRange> = Vec::new();
        for r in sorted {
            match merged.last_mut() {
                Some(last) if r.base <= last.end() => {
                    // `end` is at least `last.base`: the subtraction cannot wrap.
                    let end = last.end().max(r.end());
                    last.size = end.saturating_sub(last.base);
                }
                _ => merged.push(r),
            }
        }
        Self {
            ranges: merged,
            claimed: Vec::new(),
        }
    }

    /// True when `[pa, pa + size)` lies inside one pool range.
    #[must_use]
    pub fn covers(&self, pa: u64, size: u64) -> bool {
        self.ranges.iter().any(|r| {
            pa.checked_sub(r.base)
                .zip(r.size.checked_sub(size))
                .is_some_and(|(offset, room)| offset <= room)
        })
    }

    /// The pool's ranges (sorted, merged).
    #[cfg(test)]
    #[must_use]
    pub fn ranges(&self) -> &[PhysRange] {
        &self.ranges
    }

    /// Claims `[pa, pa + size)` for one VM.
    ///
    /// # Errors
    ///
    /// [`PoolError::OutOfRange`] or [`PoolError::InUse`]; nothing changes then.
    pub fn claim(&mut self, pa: u64, size: u64) -> Result<(), PoolError> {
        if size == 0 || (pa | size) % crate::mem::PAGE_SIZE != 0 || !self.covers(pa, size) {
            return Err(PoolError::OutOfRange);
        }
        let range = PhysRange::new(pa, size);
        if self
            .claimed
            .iter()
            .any(|&(b, s)| range.overlaps(&PhysRange::new(b, s)))
        {
            return Err(PoolError::InUse);
        }
        self.claimed.push((pa, size));
        Ok(())
    }

    /// Returns a range claimed with the same `pa` and `size`.
    ///
    /// # Errors
    ///
    /// [`PoolError::NotClaimed`].
    pub fn release(&mut self, pa: u64, size: u64) -> Result<(), PoolError> {
        let i = self
            .claimed
            .iter()
            .position(|&c| c == (pa, size))
            .ok_or(PoolError::NotClaimed)?;
        self.claimed.swap_remove(i);
        Ok(())
    }

    /// Bytes not claimed by any VM.
    #[must_use]
    pub fn free_bytes(&self) -> u64 {
        // Claims are disjoint parts of the ranges: never more than the total.
        self.total_bytes()
            .saturating_sub(self.claimed.iter().map(|c| c.1).sum::<u64>())
    }

    /// Bytes in the pool.
    #[must_use]
    pub fn total_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.size).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_and_release() {
        let mut p = PagePool::new(&[PhysRange::new(0x5000_0000, 0x10_0000)]);
        p.claim(0x5000_0000, 0x8000).expect("claim");
        assert_eq!(p.claim(0x5000_7000, 0x2000), Err(PoolError::InUse));
        assert_eq!(p.claim(0x4fff_f000, 0x2000), Err(PoolError::OutOfRange));
        assert_eq!(p.claim(0x500f_f000, 0x2000), Err(PoolError::OutOfRange));
        assert_eq!(p.claim(0x5001_0800, 0x1000), Err(PoolError::OutOfRange));
        p.claim(0x5000_8000, 0x1000).expect("adjacent");
        assert_eq!(p.free_bytes(), 0x10_0000 - 0x9000);
        assert_eq!(p.release(0x5000_0000, 0x1000), Err(PoolError::NotClaimed));
        p.release(0x5000_0000, 0x8000).expect("release");
        p.release(0x5000_8000, 0x1000).expect("release");
        assert_eq!(p.free_bytes(), p.total_bytes());
    }

    #[test]
    fn several_ranges_merge_where_adjacent_and_a_claim_stays_inside_one() {
        let mut p = PagePool::new(&[
            PhysRange::new(0x8000_0000, 0x10_0000),
            PhysRange::new(0x5000_0000, 0x10_0000),
            PhysRange::new(0x5010_0000, 0x10_0000),
        ]);
        assert_eq!(
            p.ranges(),
            [
                PhysRange::new(0x5000_0000, 0x20_0000),
                PhysRange::new(0x8000_0000, 0x10_0000)
            ]
        );
        assert_eq!(p.total_bytes(), 0x30_0000);
        p.claim(0x500f_f000, 0x2000)
            .expect("across the merged boundary");
        assert_eq!(p.claim(0x501f_f000, 0x2000), Err(PoolError::OutOfRange));
        p.claim(0x8000_0000, 0x10_0000).expect("the second range");
        assert_eq!(p.free_bytes(), 0x30_0000 - 0x10_2000);
    }

    #[test]
    fn claims_at_the_top_of_the_address_space_neither_wrap_nor_panic() {
        let base = 0u64.wrapping_sub(0x10_0000);
        let mut p = PagePool::new(&[PhysRange::new(base, 0x10_0000)]);
        p.claim(base, 0xf_f000).expect("all but the last page");
        p.claim(base + 0xf_f000, 0x1000).expect("the last page");
        assert_eq!(p.claim(base + 0xf_f000, 0x1000), Err(PoolError::InUse));
        // Ranges whose end wraps past 2^64 are outside the pool.
        assert_eq!(p.claim(base + 0xf_f000, 0x2000), Err(PoolError::OutOfRange));
        assert_eq!(p.claim(0x1000, !0xfff), Err(PoolError::OutOfRange));
        assert_eq!(p.free_bytes(), 0);
        p.release(base, 0xf_f000).expect("release");
        assert_eq!(p.free_bytes(), 0xf_f000);
    }
}

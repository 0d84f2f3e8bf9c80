//! Ownership of guest RAM: which pages of the host RAM guests may have belong to which VM.
//!
//! VM descriptions name the physical pages of each VM's RAM; the pool makes sure a page is
//! given to at most one VM at a time and that every page comes back on destroy.

use core::fmt;

use alloc::vec::Vec;

use crate::mem::{PhysRange, PAGE_SIZE};

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
    claimed: Vec<PhysRange>,
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
                    // Sorted: `r` starts at or above `last`. Exact up to 2^64.
                    let reach = r
                        .base
                        .checked_offset_from(last.base)
                        .and_then(|offset| offset.checked_add(r.size))
                        .unwrap_or(u64::MAX);
                    last.size = last.size.max(reach);
                }
                _ => merged.push(r),
            }
        }
        Self {
            ranges: merged,
            claimed: Vec::new(),
        }
    }

    /// True when `range` lies inside one pool range.
    #[must_use]
    pub fn covers(&self, range: &PhysRange) -> bool {
        self.ranges.iter().any(|r| r.contains(range))
    }

    /// The pool's ranges (sorted, merged).
    #[cfg(test)]
    #[must_use]
    pub fn ranges(&self) -> &[PhysRange] {
        &self.ranges
    }

    /// Claims `range` for one VM.
    ///
    /// # Errors
    ///
    /// [`PoolError::OutOfRange`] or [`PoolError::InUse`]; nothing changes then.
    pub fn claim(&mut self, range: PhysRange) -> Result<(), PoolError> {
        if range.is_empty()
            || !range.base.is_aligned(PAGE_SIZE)
            || range.size % PAGE_SIZE != 0
            || !self.covers(&range)
        {
            return Err(PoolError::OutOfRange);
        }
        if self.claimed.iter().any(|c| range.overlaps(c)) {
            return Err(PoolError::InUse);
        }
        self.claimed.push(range);
        Ok(())
    }

    /// Returns a range claimed exactly like `range`.
    ///
    /// # Errors
    ///
    /// [`PoolError::NotClaimed`].
    pub fn release(&mut self, range: PhysRange) -> Result<(), PoolError> {
        let i = self
            .claimed
            .iter()
            .position(|&c| c == range)
            .ok_or(PoolError::NotClaimed)?;
        self.claimed.swap_remove(i);
        Ok(())
    }

    /// Bytes not claimed by any VM.
    #[must_use]
    pub fn free_bytes(&self) -> u64 {
        // Claims are disjoint parts of the ranges: never more than the total.
        self.total_bytes()
            .saturating_sub(self.claimed.iter().map(|c| c.size).sum::<u64>())
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
    use crate::mem::PhysAddr;

    const fn pr(base: u64, size: u64) -> PhysRange {
        PhysRange::new(PhysAddr::new(base), size)
    }

    #[test]
    fn claim_and_release() {
        let mut p = PagePool::new(&[pr(0x5000_0000, 0x10_0000)]);
        p.claim(pr(0x5000_0000, 0x8000)).expect("claim");
        assert_eq!(p.claim(pr(0x5000_7000, 0x2000)), Err(PoolError::InUse));
        assert_eq!(p.claim(pr(0x4fff_f000, 0x2000)), Err(PoolError::OutOfRange));
        assert_eq!(p.claim(pr(0x500f_f000, 0x2000)), Err(PoolError::OutOfRange));
        assert_eq!(p.claim(pr(0x5001_0800, 0x1000)), Err(PoolError::OutOfRange));
        p.claim(pr(0x5000_8000, 0x1000)).expect("adjacent");
        assert_eq!(p.free_bytes(), 0x10_0000 - 0x9000);
        assert_eq!(
            p.release(pr(0x5000_0000, 0x1000)),
            Err(PoolError::NotClaimed)
        );
        p.release(pr(0x5000_0000, 0x8000)).expect("release");
        p.release(pr(0x5000_8000, 0x1000)).expect("release");
        assert_eq!(p.free_bytes(), p.total_bytes());
    }

    #[test]
    fn several_ranges_merge_where_adjacent_and_a_claim_stays_inside_one() {
        let mut p = PagePool::new(&[
            pr(0x8000_0000, 0x10_0000),
            pr(0x5000_0000, 0x10_0000),
            pr(0x5010_0000, 0x10_0000),
        ]);
        assert_eq!(
            p.ranges(),
            [pr(0x5000_0000, 0x20_0000), pr(0x8000_0000, 0x10_0000)]
        );
        assert_eq!(p.total_bytes(), 0x30_0000);
        p.claim(pr(0x500f_f000, 0x2000))
            .expect("across the merged boundary");
        assert_eq!(p.claim(pr(0x501f_f000, 0x2000)), Err(PoolError::OutOfRange));
        p.claim(pr(0x8000_0000, 0x10_0000))
            .expect("the second range");
        assert_eq!(p.free_bytes(), 0x30_0000 - 0x10_2000);
    }

    #[test]
    fn claims_at_the_top_of_the_address_space_neither_wrap_nor_panic() {
        let base = 0u64.wrapping_sub(0x10_0000);
        let mut p = PagePool::new(&[pr(base, 0x10_0000)]);
        p.claim(pr(base, 0xf_f000)).expect("all but the last page");
        p.claim(pr(base + 0xf_f000, 0x1000)).expect("the last page");
        assert_eq!(p.claim(pr(base + 0xf_f000, 0x1000)), Err(PoolError::InUse));
        // Ranges whose end wraps past 2^64 are outside the pool.
        assert_eq!(
            p.claim(pr(base + 0xf_f000, 0x2000)),
            Err(PoolError::OutOfRange)
        );
        assert_eq!(p.claim(pr(0x1000, !0xfff)), Err(PoolError::OutOfRange));
        assert_eq!(p.free_bytes(), 0);
        p.release(pr(base, 0xf_f000)).expect("release");
        assert_eq!(p.free_bytes(), 0xf_f000);
    }
}

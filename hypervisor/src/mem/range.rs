//! Physical address ranges: one type, one `overlaps`.

use core::fmt;

/// A physical address range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PhysRange {
    /// First byte.
    pub base: u64,
    /// Length in bytes.
    pub size: u64,
}

impl PhysRange {
    /// A region from base and size.
    #[must_use]
    pub const fn new(base: u64, size: u64) -> Self {
        Self { base, size }
    }

    /// The range from `base` up to `end` (exclusive); empty if `end` is not above
    /// `base`.
    #[must_use]
    pub const fn from_to(base: u64, end: u64) -> Self {
        Self::new(base, end.saturating_sub(base))
    }

    /// One past the last byte (saturating).
    #[must_use]
    pub const fn end(&self) -> u64 {
        self.base.saturating_add(self.size)
    }

    /// Whether `other` lies entirely inside `self`.
    #[must_use]
    pub const fn contains(&self, other: &PhysRange) -> bool {
        other.base >= self.base && other.end() <= self.end()
    }

    /// Whether the two regions share at least one byte.
    #[must_use]
    pub const fn overlaps(&self, other: &PhysRange) -> bool {
        self.base < other.end() && other.base < self.end()
    }
}

impl fmt::Display for PhysRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{:#010x}, {:#010x}) {:>7} KiB",
            self.base,
            self.end(),
            self.size / 1024
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_arithmetic() {
        let a = PhysRange::new(0x1000, 0x2000);
        assert_eq!(a.end(), 0x3000);
        assert!(a.contains(&PhysRange::new(0x1000, 0x2000)));
        assert!(!a.contains(&PhysRange::new(0x2000, 0x2000)));
        assert!(a.overlaps(&PhysRange::new(0x2fff, 1)));
        assert!(!a.overlaps(&PhysRange::new(0x3000, 1)));
        assert_eq!(PhysRange::new(u64::MAX - 1, 10).end(), u64::MAX);
        assert_eq!(PhysRange::from_to(0x1000, 0x3000), a);
        assert_eq!(
            PhysRange::from_to(0x3000, 0x1000).size,
            0,
            "inverted: empty"
        );
    }
}

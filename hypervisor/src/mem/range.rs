//! Address ranges: one type for every address kind, one `overlaps`, one `contains`.

use core::fmt;

use super::addr::{Ipa, PhysAddr, VirtAddr};

/// `size` bytes from `base`, in the address space of `A` ([`PhysAddr`], [`Ipa`] or
/// [`VirtAddr`]). [`end`](AddrRange::end) saturates at `u64::MAX`, but `contains`,
/// `contains_addr` and `overlaps` compare exact ends: a range passing 2^64 never wraps to
/// low addresses, nor fits inside one that ends at 2^64. An empty range (`size` 0) holds
/// no byte and overlaps nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct AddrRange<A> {
    /// First byte.
    pub base: A,
    /// Length in bytes.
    pub size: u64,
}

/// A range of host physical addresses.
pub type PhysRange = AddrRange<PhysAddr>;
/// A range of guest intermediate physical addresses.
pub type IpaRange = AddrRange<Ipa>;
/// A range of virtual addresses.
pub type VirtRange = AddrRange<VirtAddr>;

macro_rules! range_of {
    ($a:ident) => {
        impl AddrRange<$a> {
            /// A range from base and size.
            #[must_use]
            pub const fn new(base: $a, size: u64) -> Self {
                Self { base, size }
            }

            /// The range from `base` up to `end` (exclusive); empty if `end` is not above
            /// `base`.
            #[must_use]
            pub const fn from_to(base: $a, end: $a) -> Self {
                Self::new(base, end.get().saturating_sub(base.get()))
            }

            /// One past the last byte (saturating at `u64::MAX`).
            #[must_use]
            pub const fn end(&self) -> $a {
                self.base.saturating_add(self.size)
            }

            /// Whether the range holds no byte.
            #[must_use]
            pub const fn is_empty(&self) -> bool {
                self.size == 0
            }

            /// The exact end, up to 2^64 + 2^64 - 2: what the comparisons use, so that a
            /// range passing 2^64 is neither clamped nor wrapped.
            const fn wide_end(&self) -> u128 {
                (self.base.get() as u128).saturating_add(self.size as u128)
            }

            /// Whether `other` lies entirely inside `self` (an empty `other` does when its
            /// base is in `[base, end]`).
            #[must_use]
            pub const fn contains(&self, other: &Self) -> bool {
                other.base.get() >= self.base.get() && other.wide_end() <= self.wide_end()
            }

            /// Whether the byte at `addr` lies inside the range.
            #[must_use]
            pub const fn contains_addr(&self, addr: $a) -> bool {
                addr.get() >= self.base.get() && (addr.get() as u128) < self.wide_end()
            }

            /// Whether the two ranges share at least one byte (ranges that touch do not,
            /// nor does an empty range).
            #[must_use]
            pub const fn overlaps(&self, other: &Self) -> bool {
                self.size != 0
                    && other.size != 0
                    && (self.base.get() as u128) < other.wide_end()
                    && (other.base.get() as u128) < self.wide_end()
            }

            /// Whether the range ends at or below 2^64: its last byte is addressable.
            #[must_use]
            pub const fn fits(&self) -> bool {
                self.wide_end() <= 1 << 64
            }
        }

        impl fmt::Display for AddrRange<$a> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(
                    f,
                    "[{:#010x}, {:#010x}) {:>7} KiB",
                    self.base.get(),
                    self.end().get(),
                    self.size / 1024
                )
            }
        }
    };
}

range_of!(PhysAddr);
range_of!(Ipa);
range_of!(VirtAddr);

#[cfg(test)]
mod tests {
    use super::*;

    const fn pr(base: u64, size: u64) -> PhysRange {
        PhysRange::new(PhysAddr::new(base), size)
    }

    #[test]
    fn region_arithmetic() {
        let a = pr(0x1000, 0x2000);
        assert_eq!(a.end(), PhysAddr::new(0x3000));
        assert!(a.contains(&pr(0x1000, 0x2000)));
        assert!(!a.contains(&pr(0x2000, 0x2000)));
        assert!(a.overlaps(&pr(0x2fff, 1)));
        assert!(!a.overlaps(&pr(0x3000, 1)));
        assert_eq!(pr(u64::MAX - 1, 10).end(), PhysAddr::new(u64::MAX));
        assert_eq!(
            PhysRange::from_to(PhysAddr::new(0x1000), PhysAddr::new(0x3000)),
            a
        );
    }

    #[test]
    fn from_to_inverted_is_empty() {
        let r = IpaRange::from_to(Ipa::new(0x3000), Ipa::new(0x1000));
        assert_eq!(r.size, 0);
        assert!(r.is_empty());
        assert_eq!(r.base, Ipa::new(0x3000));
        assert!(IpaRange::from_to(Ipa::new(0x3000), Ipa::new(0x3000)).is_empty());
    }

    #[test]
    fn touching_ranges_do_not_overlap() {
        let a = IpaRange::new(Ipa::new(0x1000), 0x1000);
        let b = IpaRange::new(Ipa::new(0x2000), 0x1000);
        assert!(!a.overlaps(&b));
        assert!(!b.overlaps(&a));
        assert!(!a.contains(&b));
        assert!(!a.contains_addr(Ipa::new(0x2000)), "end is exclusive");
        assert!(a.contains_addr(Ipa::new(0x1fff)));
        assert!(a.contains_addr(Ipa::new(0x1000)));
        assert!(!a.contains_addr(Ipa::new(0xfff)));
        // One byte more and they do.
        assert!(IpaRange::new(Ipa::new(0x1000), 0x1001).overlaps(&b));
    }

    #[test]
    fn empty_ranges_overlap_nothing_and_hold_no_byte() {
        let e = pr(0x2000, 0);
        let a = pr(0x1000, 0x2000);
        assert!(!e.overlaps(&a));
        assert!(!a.overlaps(&e));
        assert!(!e.overlaps(&e));
        assert!(!e.contains_addr(PhysAddr::new(0x2000)));
        assert!(a.contains(&e), "an empty range inside is contained");
        assert!(!pr(0x4000, 0).contains_addr(PhysAddr::new(0x4000)));
    }

    #[test]
    fn the_top_of_the_address_space() {
        // A range reaching 2^64 exactly: its end saturates but it fits, and its last
        // byte is in it.
        let top = pr(u64::MAX - 0xfff, 0x1000);
        assert_eq!(top.end(), PhysAddr::new(u64::MAX));
        assert!(top.fits());
        assert!(top.contains_addr(PhysAddr::new(u64::MAX - 1)));
        assert!(top.contains_addr(PhysAddr::new(u64::MAX)));
        assert!(top.overlaps(&pr(u64::MAX, 1)));
        // One past 2^64: the end is clamped for display, never wrapped to a low address,
        // and the range is not inside one that ends at 2^64.
        let over = pr(u64::MAX - 0xf, 0x100);
        assert!(!over.fits());
        assert_eq!(over.end(), PhysAddr::new(u64::MAX));
        assert!(!over.overlaps(&pr(0, 0x100)), "no wrap to address 0");
        assert!(over.overlaps(&top));
        assert!(!top.contains(&over), "passes 2^64: not inside");
        assert!(top.contains(&pr(u64::MAX - 0xf, 0x10)));
        assert!(!pr(0, 0x100).contains(&over));
        assert!(pr(0, 0).fits() && pr(0, 0).is_empty());
        assert!(pr(u64::MAX, 1).fits());
        assert!(!pr(u64::MAX, 2).fits());
    }

    #[test]
    fn contains_is_inclusive_of_both_ends() {
        let a = pr(0x1000, 0x3000);
        assert!(a.contains(&pr(0x1000, 0x1000)));
        assert!(a.contains(&pr(0x3000, 0x1000)));
        assert!(!a.contains(&pr(0x3000, 0x1001)));
        assert!(!a.contains(&pr(0xfff, 2)));
    }

    #[test]
    fn displays_base_end_and_size() {
        extern crate std;
        assert_eq!(
            std::format!("{}", pr(0x4000_0000, 0x2000)),
            "[0x40000000, 0x40002000)       8 KiB"
        );
    }
}

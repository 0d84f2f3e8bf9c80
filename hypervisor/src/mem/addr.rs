//! The three kinds of address the hypervisor handles, as distinct types.
//!
//! - [`PhysAddr`]: a host physical address (what stage 2 and the EL2 stage 1 map *to*,
//!   what the frame pool and the host device tree speak of);
//! - [`Ipa`]: a guest intermediate physical address (what a guest's stage 2 maps *from*,
//!   what a guest passes in hypercalls and faults on);
//! - [`VirtAddr`]: a virtual address (the guest's `FAR_EL2`, the EL2 stage 1's input).
//!
//! Each is a `#[repr(transparent)]` `u64` with no implicit conversion into another: going
//! from one kind to another is an explicit [`get`](PhysAddr::get) then `new`, written
//! where a translation is known to hold (a stage-2 mapping, an identity map). Adding two
//! addresses is meaningless and not offered; an address plus a byte count is checked
//! ([`checked_add`](PhysAddr::checked_add)) and never wraps silently.
//!
//! ```
//! use hypervisor::mem::{Ipa, PhysAddr};
//! fn backing(pa: PhysAddr) -> u64 {
//!     pa.get()
//! }
//! assert_eq!(backing(PhysAddr::new(0x4000_0000)), 0x4000_0000);
//! ```
//!
//! An IPA is not accepted where a physical address is expected:
//!
//! ```compile_fail
//! use hypervisor::mem::{Ipa, PhysAddr};
//! fn backing(pa: PhysAddr) -> u64 {
//!     pa.get()
//! }
//! backing(Ipa::new(0x4000_0000));
//! ```
//!
//! nor are two addresses added:
//!
//! ```compile_fail
//! use hypervisor::mem::PhysAddr;
//! let _ = PhysAddr::new(0x1000) + PhysAddr::new(0x2000);
//! ```

use core::fmt;

macro_rules! address {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(u64);

        impl $name {
            /// Address zero.
            pub const ZERO: Self = Self(0);

            /// The address whose value is `raw`.
            #[must_use]
            pub const fn new(raw: u64) -> Self {
                Self(raw)
            }

            /// The raw value.
            #[must_use]
            pub const fn get(self) -> u64 {
                self.0
            }

            /// `self + bytes`, or `None` past `u64::MAX`.
            #[must_use]
            pub const fn checked_add(self, bytes: u64) -> Option<Self> {
                match self.0.checked_add(bytes) {
                    Some(a) => Some(Self(a)),
                    None => None,
                }
            }

            /// `self - bytes`, or `None` below zero.
            #[must_use]
            pub const fn checked_sub(self, bytes: u64) -> Option<Self> {
                match self.0.checked_sub(bytes) {
                    Some(a) => Some(Self(a)),
                    None => None,
                }
            }

            /// `self + bytes`, clamped at `u64::MAX` (the end of a range at the very top).
            #[must_use]
            pub const fn saturating_add(self, bytes: u64) -> Self {
                Self(self.0.saturating_add(bytes))
            }

            /// Bytes from `base` up to `self`, or `None` when `self` is below `base`.
            #[must_use]
            pub const fn checked_offset_from(self, base: Self) -> Option<u64> {
                self.0.checked_sub(base.0)
            }

            /// Rounded down to a multiple of `align` (a power of two; any other value
            /// leaves the address unchanged).
            #[must_use]
            pub const fn align_down(self, align: u64) -> Self {
                if align.is_power_of_two() {
                    // A power of two is at least 1: no wrap.
                    Self(self.0 & !align.wrapping_sub(1))
                } else {
                    self
                }
            }

            /// Rounded up to a multiple of `align` (a power of two), or `None` past
            /// `u64::MAX` or for any other `align`.
            #[must_use]
            pub const fn checked_align_up(self, align: u64) -> Option<Self> {
                if !align.is_power_of_two() {
                    return None;
                }
                // A power of two is at least 1: no wrap.
                let mask = align.wrapping_sub(1);
                match self.0.checked_add(mask) {
                    Some(a) => Some(Self(a & !mask)),
                    None => None,
                }
            }

            /// Whether the address is a multiple of `align` (false for `align` 0).
            #[must_use]
            pub const fn is_aligned(self, align: u64) -> bool {
                matches!(self.0.checked_rem(align), Some(0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }

        /// As the raw value: `{:#x}` prints `0x...`, widths and padding apply.
        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}

address! {
    /// A host physical address.
    PhysAddr
}

address! {
    /// A guest intermediate physical address: the input of the guest's stage 2.
    Ipa
}

address! {
    /// A virtual address: a guest's (`FAR_EL2`) or the EL2 stage 1's input.
    VirtAddr
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::PAGE_SIZE;

    #[test]
    fn arithmetic_is_checked_at_the_top_and_bottom() {
        let top = PhysAddr::new(u64::MAX);
        assert_eq!(top.checked_add(0), Some(top));
        assert_eq!(top.checked_add(1), None);
        assert_eq!(PhysAddr::new(u64::MAX - 1).checked_add(1), Some(top));
        assert_eq!(top.saturating_add(5), top);
        assert_eq!(Ipa::ZERO.checked_sub(1), None);
        assert_eq!(Ipa::new(0x1000).checked_sub(0x1000), Some(Ipa::ZERO));
    }

    #[test]
    fn offset_from_base() {
        let base = Ipa::new(0x4000_0000);
        assert_eq!(
            Ipa::new(0x4000_1234).checked_offset_from(base),
            Some(0x1234)
        );
        assert_eq!(base.checked_offset_from(base), Some(0));
        assert_eq!(Ipa::new(0x3fff_ffff).checked_offset_from(base), None);
        assert_eq!(
            VirtAddr::new(u64::MAX).checked_offset_from(VirtAddr::ZERO),
            Some(u64::MAX)
        );
    }

    #[test]
    fn alignment() {
        let a = PhysAddr::new(0x4000_1234);
        assert_eq!(a.align_down(PAGE_SIZE), PhysAddr::new(0x4000_1000));
        assert_eq!(
            a.checked_align_up(PAGE_SIZE),
            Some(PhysAddr::new(0x4000_2000))
        );
        assert!(!a.is_aligned(PAGE_SIZE));
        assert!(PhysAddr::new(0x4000_1000).is_aligned(PAGE_SIZE));
        assert!(PhysAddr::ZERO.is_aligned(PAGE_SIZE));
        assert!(!PhysAddr::ZERO.is_aligned(0), "alignment 0 aligns nothing");
        assert_eq!(
            PhysAddr::new(u64::MAX).checked_align_up(PAGE_SIZE),
            None,
            "no wrap to 0"
        );
        assert_eq!(
            PhysAddr::new(u64::MAX).align_down(PAGE_SIZE).get(),
            !(PAGE_SIZE - 1)
        );
        assert_eq!(a.align_down(3), a, "not a power of two: unchanged");
        assert_eq!(a.checked_align_up(3), None);
    }

    #[test]
    fn formats_as_hex() {
        extern crate std;
        use std::format;
        let ipa = Ipa::new(0x800_0000);
        assert_eq!(format!("{ipa}"), "0x8000000");
        assert_eq!(format!("{ipa:#x}"), "0x8000000");
        assert_eq!(format!("{ipa:#012x}"), "0x0008000000");
        assert_eq!(format!("{ipa:?}"), "Ipa(0x8000000)");
        assert_eq!(format!("{:?}", PhysAddr::new(1)), "PhysAddr(0x1)");
    }

    #[test]
    fn page_size_is_4_kib() {
        assert_eq!(PAGE_SIZE, 4096);
    }
}

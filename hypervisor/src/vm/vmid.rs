//! VMID allocation.
//!
//! Every VM gets a VMID that tags its stage-1 and stage-2 TLB entries (VTTBR_EL2.VMID).
//! The width comes from `ID_AA64MMFR1_EL1.VMIDBits` (Arm ARM D19.2, 0b0000 = 8 bits,
//! 0b0010 = 16 bits); with 16 bits `VTCR_EL2.VS` (bit 19) must be set to match, which
//! the stage-2 regime of `mmu` does (`mmu::Stage2::with_vmid16`, set by
//! `crate::vm::Stage2Config`).
//!
//! Policy: VMID 0 is never handed to a guest (it stays the hypervisor's "no guest" value),
//! exhaustion is an error ([`VmidError::Exhausted`]) rather than a generation rollover,
//! and a released VMID is flushed with `TLBI VMALLS12E1IS` (through [`VmidFlush`]) before
//! it goes back to the free set, so a later VM can never hit a stale translation.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

/// A VM identifier as written into `VTTBR_EL2.VMID`. Never 0 for a guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Vmid(u16);

impl Vmid {
    /// The raw value.
    #[must_use]
    pub const fn get(self) -> u16 {
        self.0
    }
}

impl fmt::Display for Vmid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Number of VMID bits the CPU implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmidBits {
    /// 8-bit VMIDs (`VTTBR_EL2[55:48]`).
    Eight,
    /// 16-bit VMIDs (`VTTBR_EL2[63:48]`, needs `VTCR_EL2.VS = 1`).
    Sixteen,
}

impl VmidBits {
    /// Decodes `ID_AA64MMFR1_EL1`: VMIDBits is bits \[7:4\]; 0b0010 means 16 bits,
    /// every other value (0b0000, reserved ones) is treated as 8 bits.
    #[must_use]
    pub const fn from_id_aa64mmfr1(value: u64) -> Self {
        if (value >> 4) & 0xf == 0b0010 {
            Self::Sixteen
        } else {
            Self::Eight
        }
    }

    /// How many VMIDs exist, including VMID 0.
    #[must_use]
    pub const fn count(self) -> usize {
        match self {
            Self::Eight => 1 << 8,
            Self::Sixteen => 1 << 16,
        }
    }
}

/// Invalidates every stage-1 and stage-2 TLB entry tagged with one VMID
/// (`TLBI VMALLS12E1IS` with that VMID in `VTTBR_EL2`, then `DSB ISH`).
pub trait VmidFlush {
    /// Flushes all TLB entries of `vmid` on every CPU of the inner-shareable domain.
    fn flush_vmid(&mut self, vmid: Vmid);
}

/// Errors of [`VmidAllocator`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmidError {
    /// Every VMID but 0 is in use.
    Exhausted,
    /// The VMID was not allocated (double free or foreign value).
    NotAllocated(Vmid),
}

impl core::error::Error for VmidError {}

impl fmt::Display for VmidError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exhausted => write!(f, "all VMIDs are in use"),
            Self::NotAllocated(v) => write!(f, "VMID {v} is not allocated"),
        }
    }
}

/// Hands out VMIDs 1..2^bits, round robin so that a just-freed VMID is reused last.
#[derive(Debug)]
pub struct VmidAllocator {
    bits: VmidBits,
    used: Vec<u64>,
    in_use: usize,
    next: usize,
}

impl VmidAllocator {
    /// An allocator for `bits`-wide VMIDs with only VMID 0 reserved.
    #[must_use]
    pub fn new(bits: VmidBits) -> Self {
        let mut used = vec![0u64; bits.count() / 64];
        if let Some(first) = used.first_mut() {
            *first = 1; // VMID 0 is never given to a guest.
        }
        Self {
            bits,
            used,
            in_use: 0,
            next: 1,
        }
    }

    /// Number of VMIDs currently given out.
    #[must_use]
    pub const fn in_use(&self) -> usize {
        self.in_use
    }

    /// Whether VMID `id` is taken (one that does not exist is never free).
    fn is_used(&self, id: usize) -> bool {
        self.used
            .get(id / 64)
            .is_none_or(|word| word & (1 << (id % 64)) != 0)
    }

    /// Marks VMID `id` used or free (nothing for one that does not exist).
    fn mark(&mut self, id: usize, used: bool) {
        if let Some(word) = self.used.get_mut(id / 64) {
            if used {
                *word |= 1 << (id % 64);
            } else {
                *word &= !(1 << (id % 64));
            }
        }
    }

    /// Allocates a VMID.
    ///
    /// # Errors
    ///
    /// [`VmidError::Exhausted`] when all `2^bits - 1` guest VMIDs are in use.
    pub fn allocate(&mut self) -> Result<Vmid, VmidError> {
        let count = self.bits.count();
        if self.in_use >= count.saturating_sub(1) {
            return Err(VmidError::Exhausted);
        }
        // From `next` to the end, then from 1 back up to it: each guest VMID once.
        let id = (self.next..count)
            .chain(1..self.next)
            .find(|&id| id != 0 && !self.is_used(id))
            .ok_or(VmidError::Exhausted)?;
        // `id < count <= 1 << 16`: it fits.
        let vmid = u16::try_from(id).map_err(|_| VmidError::Exhausted)?;
        self.mark(id, true);
        // Below `count` (checked above): the sums are exact. A `next` of `count`
        // starts the next search at 1.
        self.in_use = self.in_use.saturating_add(1);
        self.next = id.saturating_add(1);
        Ok(Vmid(vmid))
    }

    /// Returns `vmid` to the free set after flushing its TLB entries through `tlb`.
    ///
    /// # Errors
    ///
    /// [`VmidError::NotAllocated`] when `vmid` is 0, out of range or not allocated;
    /// nothing is flushed then.
    pub fn release(&mut self, vmid: Vmid, tlb: &mut impl VmidFlush) -> Result<(), VmidError> {
        let id = usize::from(vmid.0);
        if id == 0 || id >= self.bits.count() || !self.is_used(id) {
            return Err(VmidError::NotAllocated(vmid));
        }
        tlb.flush_vmid(vmid);
        self.mark(id, false);
        self.in_use = self.in_use.saturating_sub(1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[derive(Default)]
    struct Recorder(Vec<Vmid>);
    impl VmidFlush for Recorder {
        fn flush_vmid(&mut self, vmid: Vmid) {
            self.0.push(vmid);
        }
    }

    #[test]
    fn width_from_id_register() {
        assert_eq!(VmidBits::from_id_aa64mmfr1(0x0000), VmidBits::Eight);
        assert_eq!(VmidBits::from_id_aa64mmfr1(0x0020), VmidBits::Sixteen);
        assert_eq!(VmidBits::from_id_aa64mmfr1(0x1f2f), VmidBits::Sixteen);
        assert_eq!(VmidBits::from_id_aa64mmfr1(0x0010), VmidBits::Eight);
        assert_eq!(VmidBits::Eight.count(), 256);
        assert_eq!(VmidBits::Sixteen.count(), 65536);
    }

    fn exhaust(bits: VmidBits) {
        let mut a = VmidAllocator::new(bits);
        let mut seen = HashSet::new();
        for _ in 0..bits.count() - 1 {
            let v = a.allocate().expect("a free VMID");
            assert_ne!(v.get(), 0, "VMID 0 must never be given out");
            assert!(seen.insert(v), "VMID {v} handed out twice");
        }
        assert_eq!(a.allocate(), Err(VmidError::Exhausted));
        assert_eq!(a.in_use(), bits.count() - 1);
        let mut tlb = Recorder::default();
        let victim = *seen.iter().next().expect("non-empty");
        a.release(victim, &mut tlb).expect("release");
        assert_eq!(tlb.0, vec![victim]);
        assert_eq!(a.allocate(), Ok(victim));
        assert_eq!(a.allocate(), Err(VmidError::Exhausted));
    }

    #[test]
    fn exhaustion_8_bit() {
        exhaust(VmidBits::Eight);
    }

    #[test]
    fn exhaustion_16_bit() {
        exhaust(VmidBits::Sixteen);
    }

    #[test]
    fn after_the_last_vmid_the_search_starts_again_at_1() {
        let mut a = VmidAllocator::new(VmidBits::Eight);
        let mut tlb = Recorder::default();
        let all: Vec<Vmid> = (1..256).map(|_| a.allocate().expect("vmid")).collect();
        assert_eq!(all.last().map(|v| v.get()), Some(255));
        for v in [5, 3, 200] {
            a.release(Vmid(v), &mut tlb).expect("release");
        }
        // Next after 255 is 0, never given out, then 1, 2, 3.
        assert_eq!(a.allocate(), Ok(Vmid(3)));
        assert_eq!(a.allocate(), Ok(Vmid(5)));
        assert_eq!(a.allocate(), Ok(Vmid(200)));
        assert_eq!(a.allocate(), Err(VmidError::Exhausted));
    }

    #[test]
    fn reuse_only_after_flush_and_last() {
        let mut a = VmidAllocator::new(VmidBits::Eight);
        let mut tlb = Recorder::default();
        let first = a.allocate().expect("vmid");
        let second = a.allocate().expect("vmid");
        assert_ne!(first, second);
        a.release(first, &mut tlb).expect("release");
        assert_eq!(tlb.0, vec![first], "a released VMID is flushed");
        // Round robin: the freed VMID is not the next one handed out.
        let third = a.allocate().expect("vmid");
        assert_ne!(third, first);
        assert_eq!(a.in_use(), 2);
    }

    #[test]
    fn bad_release_is_an_error_and_flushes_nothing() {
        let mut a = VmidAllocator::new(VmidBits::Eight);
        let mut tlb = Recorder::default();
        let v = a.allocate().expect("vmid");
        assert_eq!(
            a.release(Vmid(0), &mut tlb),
            Err(VmidError::NotAllocated(Vmid(0)))
        );
        assert_eq!(
            a.release(Vmid(300), &mut tlb),
            Err(VmidError::NotAllocated(Vmid(300)))
        );
        a.release(v, &mut tlb).expect("release");
        assert_eq!(a.release(v, &mut tlb), Err(VmidError::NotAllocated(v)));
        assert_eq!(tlb.0, vec![v]);
    }
}

//! A VM's stage-2 translation table as the VM code uses it: the [`Stage2Table`] trait
//! (real `mmu` tables on the machine and in most tests, a recording fake in others) and
//! how RAM and pass-through devices are mapped.

use super::vmid::Vmid;
use crate::config::Stage2Mappings;
use crate::mem::{Ipa, PhysAddr};

/// How a stage-2 range is mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum S2Kind {
    /// Guest RAM: Normal write-back, read/write/execute.
    Ram,
    /// Guest RAM not scrubbed yet (`super::ram`): Normal write-back, no access at all,
    /// software bits `PageState::NotReady`.
    NotReady,
    /// Pass-through device: Device-nGnRE, read/write, never executable.
    Device,
    /// A page of emulated registers the guest reads without a trap (`super::uart_page`):
    /// Normal write-back, read-only, never executable.
    RegisterPage,
}

impl S2Kind {
    /// The `mmu` attributes of this kind of stage-2 mapping.
    #[must_use]
    pub const fn attributes(self) -> mmu::Attributes {
        use mmu::Permissions as P;
        match self {
            Self::Ram => mmu::Attributes::normal(P::RW.union(P::EXEC_EL1).union(P::EXEC_EL0)),
            Self::Device => mmu::Attributes::device(),
            Self::RegisterPage => mmu::Attributes::normal(P::READ),
            Self::NotReady => {
                mmu::Attributes::normal(P::empty()).with_sw(super::share::PageState::NotReady.sw())
            }
        }
    }

    /// The `mmu` map flags of a VM's stage 2 with these `mappings`.
    #[must_use]
    pub const fn map_flags(mappings: Stage2Mappings) -> mmu::MapFlags {
        match mappings {
            Stage2Mappings::Blocks => mmu::MapFlags::empty(),
            Stage2Mappings::Pages => mmu::MapFlags::NO_BLOCKS,
        }
    }
}

/// IPA size of every guest (39 bits: a single level-1 root table, 512 GiB).
pub const IPA_BITS: u8 = 39;

/// One VM's stage-2 translation table. Every operation is transactional (`mmu`): on
/// error the table is unchanged and no frame leaked.
pub trait Stage2Table {
    /// Maps `[ipa, ipa + size)` to `[pa, pa + size)` as `kind`, with blocks where the
    /// VM's description allows them.
    ///
    /// # Errors
    ///
    /// The `mmu` error (out of frames, already mapped, out of range).
    fn map(&mut self, ipa: Ipa, pa: PhysAddr, size: u64, kind: S2Kind) -> Result<(), mmu::Error>;
    /// Makes every mapping in `[ipa, ipa + size)` `kind` (same output); holes are
    /// skipped. Needs no frame where the range covers whole blocks.
    ///
    /// # Errors
    ///
    /// The `mmu` error (out of frames to split a block the range cuts, out of range).
    fn protect(&mut self, ipa: Ipa, size: u64, kind: S2Kind) -> Result<(), mmu::Error>;

    /// Like [`Self::protect`], for a change that only adds access (a chunk of RAM opened
    /// on first touch, `NotReady` to `Ram`): no TLB invalidation is broadcast, and a CPU
    /// that still holds the old entry faults again and drops it itself
    /// (`crate::vcpu::GuestEl1::invalidate_local`; `mmu::PageTable::relax`). Provided:
    /// [`Self::protect`].
    ///
    /// # Errors
    ///
    /// As [`Self::protect`].
    fn relax(&mut self, ipa: Ipa, size: u64, kind: S2Kind) -> Result<(), mmu::Error> {
        self.protect(ipa, size, kind)
    }
    /// Maps `[ipa, ipa + size)` to `[pa, pa + size)` with `attrs` (software bits
    /// included) in 4 KiB pages only, so that unmapping any part of it later needs no
    /// frame.
    ///
    /// # Errors
    ///
    /// As [`Stage2Table::map`].
    fn map_pages(
        &mut self,
        ipa: Ipa,
        pa: PhysAddr,
        size: u64,
        attrs: mmu::Attributes,
    ) -> Result<(), mmu::Error>;
    /// Unmaps `[ipa, ipa + size)` (with the TLB maintenance the change needs, for this
    /// table's VMID).
    ///
    /// # Errors
    ///
    /// The `mmu` error: out of frames when a block must be split.
    fn unmap(&mut self, ipa: Ipa, size: u64) -> Result<(), mmu::Error>;
    /// Sets the software bits \[58:55\] of every mapping in `[ipa, ipa + size)`.
    ///
    /// # Errors
    ///
    /// The `mmu` error: out of frames when a block must be split.
    fn set_sw(&mut self, ipa: Ipa, size: u64, sw: mmu::SwBits) -> Result<(), mmu::Error>;
    /// Merges the tables in `[ipa, ipa + size)` that became uniform again back into
    /// blocks, where the VM's description allows blocks (nothing otherwise). Needs no
    /// frame.
    ///
    /// # Errors
    ///
    /// The `mmu` error for a misaligned or out-of-range request.
    fn coalesce(&mut self, ipa: Ipa, size: u64) -> Result<(), mmu::Error>;
    /// Calls `f` for every leaf mapping that intersects `[ipa, ipa + size)`, in order
    /// (`mmu`'s mappings: their `input` is an IPA, their `output` a PA).
    ///
    /// # Errors
    ///
    /// The `mmu` error for a misaligned or out-of-range request.
    fn walk(&self, ipa: Ipa, size: u64, f: &mut dyn FnMut(&mmu::Mapping))
        -> Result<(), mmu::Error>;
    /// `VTTBR_EL2` for this table (root address and VMID).
    fn vttbr(&self) -> u64;
}

/// A stage 2 built with `mmu` (frames from `A`, TLB maintenance by `T`) and the flags of
/// the mappings its VM's description asks for. On the machine `A` is the frame pool and `T`
/// `mmu::arch::ArmTlb`, which loads this table's own `VTTBR_EL2` for each stage-2
/// invalidation and restores the previous value (`mmu/src/arch.rs`, `switch_vttbr`): a
/// change made while another VM is current (memory sharing edits the other party's
/// table) invalidates the right VMID.
pub struct MmuStage2<A: mmu::FrameAllocator, T: mmu::TlbMaintenance>(
    /// The table.
    pub mmu::PageTable<mmu::Stage2, A, T>,
    mmu::MapFlags,
);

impl<A: mmu::FrameAllocator, T: mmu::TlbMaintenance> MmuStage2<A, T> {
    /// A new, empty table for `regime` whose VM-wide mappings follow `mappings`.
    ///
    /// # Errors
    ///
    /// No frame for the root.
    pub fn new(
        regime: mmu::Stage2,
        alloc: A,
        tlb: T,
        mappings: Stage2Mappings,
    ) -> Result<Self, mmu::Error> {
        mmu::PageTable::new(regime, alloc, tlb).map(|t| Self(t, S2Kind::map_flags(mappings)))
    }
}

// The `mmu` boundary: its stage-2 API takes raw values, input IPA and output PA.
impl<A: mmu::FrameAllocator, T: mmu::TlbMaintenance> Stage2Table for MmuStage2<A, T> {
    fn map(&mut self, ipa: Ipa, pa: PhysAddr, size: u64, kind: S2Kind) -> Result<(), mmu::Error> {
        // Never merged into a larger block: RAM is mapped a 2 MiB chunk at a time and
        // each chunk's access is changed alone later (`super::ram`), which must not need
        // a frame to split a 1 GiB block. `coalesce` still merges on request.
        let flags = self.1 | mmu::MapFlags::NO_MERGE;
        self.0
            .map(ipa.get(), pa.get(), size, kind.attributes(), flags)
    }

    fn protect(&mut self, ipa: Ipa, size: u64, kind: S2Kind) -> Result<(), mmu::Error> {
        self.0.protect(ipa.get(), size, kind.attributes())
    }

    fn relax(&mut self, ipa: Ipa, size: u64, kind: S2Kind) -> Result<(), mmu::Error> {
        self.0.relax(ipa.get(), size, kind.attributes())
    }

    fn map_pages(
        &mut self,
        ipa: Ipa,
        pa: PhysAddr,
        size: u64,
        attrs: mmu::Attributes,
    ) -> Result<(), mmu::Error> {
        self.0
            .map(ipa.get(), pa.get(), size, attrs, mmu::MapFlags::NO_BLOCKS)
    }

    fn unmap(&mut self, ipa: Ipa, size: u64) -> Result<(), mmu::Error> {
        self.0.unmap(ipa.get(), size)
    }

    fn set_sw(&mut self, ipa: Ipa, size: u64, sw: mmu::SwBits) -> Result<(), mmu::Error> {
        self.0.set_sw_bits(ipa.get(), size, sw)
    }

    fn coalesce(&mut self, ipa: Ipa, size: u64) -> Result<(), mmu::Error> {
        let ipa = ipa.get();
        if self.1.contains(mmu::MapFlags::NO_BLOCKS) {
            return Ok(());
        }
        // `mmu` merges only tables the range covers whole: widen it to the 2 MiB
        // blocks it touches (a table merges only where all of it is uniform).
        const BLOCK: u64 = 2 << 20;
        // Clamped to the IPA space (the end of a range at its very top cannot be rounded
        // up), so a range past it is empty rather than wrapped.
        let top = 1u64
            .checked_shl(u32::from(self.0.geometry().input_bits()))
            .unwrap_or(u64::MAX);
        let lo = ipa & !(BLOCK - 1);
        let hi = ipa
            .saturating_add(size)
            .checked_next_multiple_of(BLOCK)
            .unwrap_or(u64::MAX)
            .min(top);
        self.0.coalesce(lo, hi.saturating_sub(lo))
    }

    fn walk(
        &self,
        ipa: Ipa,
        size: u64,
        f: &mut dyn FnMut(&mmu::Mapping),
    ) -> Result<(), mmu::Error> {
        self.0.walk(ipa.get(), size, f)
    }

    fn vttbr(&self) -> u64 {
        self.0.vttbr_el2()
    }
}

/// The shape of every VM's stage 2 on one machine: IPA and PA sizes, VMID width and
/// whether the CPUs invalidate ranges of pages with one TLBI (FEAT_TLBIRANGE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stage2Config {
    /// Input (IPA) size in bits; 40 to 43 bits need a concatenated root (2 to 16 tables).
    pub ipa_bits: u8,
    /// Output (PA) size in bits (`ID_AA64MMFR0_EL1.PARange`).
    pub pa_bits: u8,
    /// 16-bit VMIDs (`VTCR_EL2.VS`).
    pub vmid16: bool,
    /// Range TLBI (`mmu::PageTable::set_tlbi_range`).
    pub tlbi_range: bool,
}

impl Stage2Config {
    /// The `mmu` regime of the stage 2 tagged with `vmid` (its `VTCR_EL2` included).
    #[must_use]
    pub fn regime(&self, vmid: Vmid) -> mmu::Stage2 {
        mmu::Stage2::new(vmid.get(), self.ipa_bits)
            .with_pa_bits(self.pa_bits)
            .with_vmid16(self.vmid16)
    }

    /// A new, empty stage 2 for `vmid` with frames from `alloc` and TLB maintenance by
    /// `tlb`, whose mappings follow `mappings`.
    ///
    /// # Errors
    ///
    /// No frame (or no aligned run of frames for a concatenated root) for the root.
    pub fn new_table<A: mmu::FrameAllocator, T: mmu::TlbMaintenance>(
        &self,
        vmid: Vmid,
        alloc: A,
        tlb: T,
        mappings: Stage2Mappings,
    ) -> Result<MmuStage2<A, T>, mmu::Error> {
        let mut s2 = MmuStage2::new(self.regime(vmid), alloc, tlb, mappings)?;
        s2.0.set_tlbi_range(self.tlbi_range);
        Ok(s2)
    }
}

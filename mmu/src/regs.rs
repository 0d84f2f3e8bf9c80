//! Control-register values of a table, per regime.

use crate::attrs::MAIR_VALUE;
use crate::frame::FrameAllocator;
use crate::regime::{El1, El2, Stage2};
use crate::table::PageTable;
use crate::tlb::TlbMaintenance;

impl<A: FrameAllocator, T: TlbMaintenance> PageTable<El2, A, T> {
    /// `TCR_EL2` for this table (see [`El2::tcr`]).
    pub fn tcr_el2(&self) -> u64 {
        // `new` validated the configuration, so `tcr` cannot fail here.
        self.regime().tcr().unwrap_or_default()
    }

    /// `TTBR0_EL2` for this table: the root address (CnP = 0).
    pub fn ttbr0_el2(&self) -> u64 {
        self.root_address()
    }

    /// `MAIR_EL2` matching the attribute indices this table uses.
    pub fn mair_el2(&self) -> u64 {
        MAIR_VALUE
    }
}

impl<A: FrameAllocator, T: TlbMaintenance> PageTable<Stage2, A, T> {
    /// `VTCR_EL2` for this table (see [`Stage2::vtcr`]).
    pub fn vtcr_el2(&self) -> u64 {
        // `new` validated the configuration, so `vtcr` cannot fail here.
        self.regime().vtcr().unwrap_or_default()
    }

    /// `VTTBR_EL2` for this table: root (aligned to the concatenated root size) |
    /// VMID\[63:48\].
    pub fn vttbr_el2(&self) -> u64 {
        self.regime().vttbr(self.root_address())
    }
}

impl<A: FrameAllocator, T: TlbMaintenance> PageTable<El1, A, T> {
    /// `TCR_EL1` for this table (see [`El1::tcr`]).
    pub fn tcr_el1(&self) -> u64 {
        // `new` validated the configuration, so `tcr` cannot fail here.
        self.regime().tcr().unwrap_or_default()
    }

    /// `TTBR0_EL1` for this table: root | ASID\[63:48\].
    pub fn ttbr0_el1(&self) -> u64 {
        self.regime().ttbr0(self.root_address())
    }

    /// `MAIR_EL1` matching the attribute indices this table uses.
    pub fn mair_el1(&self) -> u64 {
        MAIR_VALUE
    }
}

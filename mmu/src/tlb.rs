//! TLB maintenance: the typed operations the crate asks for, and the trait that runs them.

use core::mem::MaybeUninit;

/// One step of a TLB-maintenance sequence.
///
/// The crate builds complete sequences (barriers included, in the order the Arm ARM
/// requires) and hands each one to [`TlbMaintenance::execute`]. Addresses are full
/// input addresses (not shifted); the implementation encodes the TLBI operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TlbOp {
    /// `DSB ISHST`: make preceding descriptor writes visible to all table walkers.
    DsbIshSt,
    /// `DSB ISH`: wait for preceding TLB invalidations to complete.
    DsbIsh,
    /// `ISB`: resynchronise this PE's context.
    Isb,
    /// EL2 stage 1, one address: `TLBI VALE2IS` if `leaf` (only last-level entries
    /// changed), else `TLBI VAE2IS` (a table entry changed: walk caches too).
    El2Va {
        /// Input (virtual) address.
        va: u64,
        /// Only leaf entries need invalidating.
        leaf: bool,
    },
    /// EL2 stage 1, everything: `TLBI ALLE2IS`.
    El2All,
    /// Stage 2, one IPA: `TLBI IPAS2LE1IS` if `leaf`, else `TLBI IPAS2E1IS`.
    /// Must run with `vttbr` loaded in `VTTBR_EL2` (TLBI by IPA only hits the current VMID).
    Stage2Ipa {
        /// VMID of the table (also in `vttbr` bits \[63:48\]).
        vmid: u16,
        /// The table's full `VTTBR_EL2` value.
        vttbr: u64,
        /// Intermediate physical address.
        ipa: u64,
        /// Only leaf entries need invalidating.
        leaf: bool,
    },
    /// Stage 1 of the VM (combined stage 1+2 entries): `TLBI VMALLE1IS` with `vttbr` current.
    /// Follows [`TlbOp::Stage2Ipa`] operations, which do not touch combined entries.
    Stage2Stage1All {
        /// VMID of the table.
        vmid: u16,
        /// The table's full `VTTBR_EL2` value.
        vttbr: u64,
    },
    /// Everything of one VM, stage 1 and stage 2: `TLBI VMALLS12E1IS` with `vttbr` current.
    Stage2All {
        /// VMID of the table.
        vmid: u16,
        /// The table's full `VTTBR_EL2` value.
        vttbr: u64,
    },
    /// EL1&0 stage 1, one address of one ASID: `TLBI VALE1IS` if `leaf`, else `TLBI VAE1IS`.
    El1Va {
        /// ASID of the table.
        asid: u16,
        /// Input (virtual) address.
        va: u64,
        /// Only leaf entries need invalidating.
        leaf: bool,
    },
    /// EL1&0 stage 1, a whole ASID: `TLBI ASIDE1IS`.
    El1Asid {
        /// ASID of the table.
        asid: u16,
    },
}

impl TlbOp {
    /// Whether this is a barrier rather than an invalidation.
    #[must_use]
    pub const fn is_barrier(&self) -> bool {
        matches!(self, TlbOp::DsbIshSt | TlbOp::DsbIsh | TlbOp::Isb)
    }
}

/// Runs TLB-maintenance sequences.
///
/// With the `arm-el2` feature on aarch64, `arch::ArmTlb` executes
/// them with `TLBI`/`DSB`/`ISB`. On the host, `testing::RecordingTlb`
/// records them. [`NoTlbMaintenance`] discards them, which is correct only for tables
/// that no PE uses yet.
pub trait TlbMaintenance {
    /// Executes `ops` in order. The crate calls this before a table operation returns
    /// (and in the middle of one, for break-before-make), so when `execute` returns,
    /// the maintenance must be complete.
    fn execute(&mut self, ops: &[TlbOp]);
}

/// Discards all TLB maintenance: for tables built offline that no PE walks yet.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoTlbMaintenance;

impl TlbMaintenance for NoTlbMaintenance {
    fn execute(&mut self, _ops: &[TlbOp]) {}
}

impl<T: TlbMaintenance + ?Sized> TlbMaintenance for &mut T {
    fn execute(&mut self, ops: &[TlbOp]) {
        (**self).execute(ops);
    }
}

/// Largest number of per-address invalidations batched before the crate switches to
/// invalidating the whole regime / VM instead.
pub const MAX_TLBI_BATCH: usize = 64;

/// Default threshold, see [`PageTable::set_tlbi_threshold`](crate::PageTable::set_tlbi_threshold).
pub const DEFAULT_TLBI_THRESHOLD: usize = 32;

/// Per-operation record of what must be invalidated.
pub(crate) struct TlbBatch {
    /// Page-aligned addresses; bit 0 set for leaf-only invalidation. Only `..len`
    /// is initialised.
    addrs: [MaybeUninit<u64>; MAX_TLBI_BATCH],
    len: usize,
    threshold: usize,
    /// More entries changed than `threshold`: invalidate everything.
    all: bool,
    /// Some descriptor was written (needs at least DSB ISHST; ISB).
    written: bool,
}

impl TlbBatch {
    pub(crate) fn new(threshold: usize) -> Self {
        TlbBatch {
            addrs: [MaybeUninit::uninit(); MAX_TLBI_BATCH],
            len: 0,
            threshold,
            all: false,
            written: false,
        }
    }

    /// A descriptor was written that needs no invalidation (invalid -> valid).
    #[inline]
    pub(crate) fn wrote(&mut self) {
        self.written = true;
    }

    /// A valid entry covering `addr` changed or was removed.
    #[inline]
    pub(crate) fn note(&mut self, addr: u64, leaf: bool) {
        self.written = true;
        if self.all {
            return;
        }
        if self.len >= self.threshold {
            self.all = true;
            return;
        }
        self.addrs[self.len] = MaybeUninit::new((addr & !0xFFF) | u64::from(leaf));
        self.len += 1;
    }

    /// A table entry covering `addr .. addr + size` was removed: walk caches may hold
    /// it. A non-leaf invalidation of any address it covers removes it, so if the
    /// last noted address lies in that range it is upgraded instead of adding one.
    #[inline]
    pub(crate) fn note_table(&mut self, addr: u64, size: u64) {
        self.written = true;
        if self.all {
            return;
        }
        if let Some(last) = self.len.checked_sub(1) {
            // SAFETY: entries below `len` were written by `note`.
            let a = unsafe { self.addrs[last].assume_init() };
            let last_addr = a & !0xFFF;
            if last_addr >= addr && last_addr - addr < size {
                self.addrs[last] = MaybeUninit::new(last_addr);
                return;
            }
        }
        self.note(addr, false);
    }

    /// `count` entries need invalidating (e.g. all leaves of a table being replaced).
    pub(crate) fn note_many(&mut self, addr: u64, step: u64, count: usize, leaf: bool) {
        if self.all || self.len + count > self.threshold {
            self.written = true;
            self.all = true;
            return;
        }
        for i in 0..count as u64 {
            self.note(addr + i * step, leaf);
        }
    }

    /// Whether everything will be invalidated anyway.
    #[inline]
    pub(crate) fn all(&self) -> bool {
        self.all
    }

    /// Everything must be invalidated.
    pub(crate) fn invalidate_all(&mut self) {
        self.written = true;
        self.all = true;
    }

    /// Emits the maintenance for everything noted so far and resets.
    pub(crate) fn sync<R: crate::Regime, T: TlbMaintenance>(
        &mut self,
        regime: &R,
        root: u64,
        tlb: &mut T,
    ) {
        if !self.written {
            return;
        }
        if !self.all && self.len == 0 {
            // Only invalid -> valid changes: make them visible to walkers, no TLBI.
            tlb.execute(&[TlbOp::DsbIshSt, TlbOp::Isb]);
            self.written = false;
            return;
        }
        let mut ops = [TlbOp::Isb; MAX_TLBI_BATCH + 6];
        let mut n = 0;
        let mut push = |op: TlbOp| {
            ops[n] = op;
            n += 1;
        };
        // Arm ARM D8.17 (break-before-make) and the TLB maintenance examples in
        // D8.16: the descriptor writes must be complete (DSB ISHST) before the TLBI,
        // and the TLBI must be complete (DSB ISH) before relying on the new state.
        push(TlbOp::DsbIshSt);
        if self.all {
            push(regime.tlbi_all(root));
            push(TlbOp::DsbIsh);
        } else if self.len > 0 {
            for a in &self.addrs[..self.len] {
                // SAFETY: entries below `len` were written by `note`.
                let a = unsafe { a.assume_init() };
                let (addr, leaf) = (a & !0xFFF, a & 1 != 0);
                push(regime.tlbi_entry(root, addr, leaf));
            }
            push(TlbOp::DsbIsh);
            if let Some(op) = regime.tlbi_after_entries(root) {
                push(op);
                push(TlbOp::DsbIsh);
            }
        }
        push(TlbOp::Isb);
        tlb.execute(&ops[..n]);
        self.len = 0;
        self.all = false;
        self.written = false;
    }
}

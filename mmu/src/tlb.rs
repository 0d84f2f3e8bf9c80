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
    /// Runs in the table's [`TlbContext::Stage2`] (TLBI by IPA only hits the current VMID).
    Stage2Ipa {
        /// VMID of the table.
        vmid: u16,
        /// Intermediate physical address.
        ipa: u64,
        /// Only leaf entries need invalidating.
        leaf: bool,
    },
    /// Stage 1 of the VM (combined stage 1+2 entries): `TLBI VMALLE1IS` in the table's context.
    /// Follows [`TlbOp::Stage2Ipa`] operations, which do not touch combined entries.
    Stage2Stage1All {
        /// VMID of the table.
        vmid: u16,
    },
    /// Everything of one VM, stage 1 and stage 2: `TLBI VMALLS12E1IS` in the table's context.
    Stage2All {
        /// VMID of the table.
        vmid: u16,
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
    /// EL2 stage 1, `pages` 4 KiB pages from `va` (FEAT_TLBIRANGE): `TLBI RVALE2IS` if
    /// `leaf`, else `TLBI RVAE2IS`, as many as [`range_operands`] needs.
    El2Range {
        /// First input (virtual) address, page aligned.
        va: u64,
        /// Number of 4 KiB pages (at least 2).
        pages: u64,
        /// Only leaf entries need invalidating.
        leaf: bool,
    },
    /// Stage 2, `pages` 4 KiB pages of IPA from `ipa` (FEAT_TLBIRANGE):
    /// `TLBI RIPAS2LE1IS` if `leaf`, else `TLBI RIPAS2E1IS`. Like
    /// [`TlbOp::Stage2Ipa`], runs in the table's context and is followed by
    /// [`TlbOp::Stage2Stage1All`].
    Stage2Range {
        /// VMID of the table.
        vmid: u16,
        /// First intermediate physical address, page aligned.
        ipa: u64,
        /// Number of 4 KiB pages (at least 2).
        pages: u64,
        /// Only leaf entries need invalidating.
        leaf: bool,
    },
    /// EL1&0 stage 1, `pages` 4 KiB pages from `va` of one ASID (FEAT_TLBIRANGE):
    /// `TLBI RVALE1IS` if `leaf`, else `TLBI RVAE1IS`.
    El1Range {
        /// ASID of the table.
        asid: u16,
        /// First input (virtual) address, page aligned.
        va: u64,
        /// Number of 4 KiB pages (at least 2).
        pages: u64,
        /// Only leaf entries need invalidating.
        leaf: bool,
    },
}

impl TlbOp {
    /// Whether this is a barrier rather than an invalidation.
    #[must_use]
    pub const fn is_barrier(&self) -> bool {
        matches!(self, TlbOp::DsbIshSt | TlbOp::DsbIsh | TlbOp::Isb)
    }
}

/// One instruction of a range invalidation, see [`range_operands`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RangeStep {
    /// A single page: the by-address instruction (`TLBI VA(L)E2IS`, `IPAS2(L)E1IS`,
    /// `VA(L)E1IS`) for this address.
    Page(u64),
    /// A range instruction (`TLBI RVA(L)E2IS`, `RIPAS2(L)E1IS`, `RVA(L)E1IS`) with this
    /// operand; the caller ORs in the ASID (bits \[63:48\]) where the instruction has one.
    Range(u64),
}

/// Pages one range instruction covers at most: NUM = 31, SCALE = 3.
pub const MAX_RANGE_PAGES: u64 = 32 << (5 * 3 + 1);

/// The operand of a range TLBI with a 4 KiB granule (Arm ARM DDI 0487, C5.5 "TLBI
/// RVAE2IS" and friends, and D8.16 "TLB maintenance instructions by range"):
/// TG\[47:46\] = 0b01 (4 KiB), SCALE\[45:44\], NUM\[43:39\], TTL\[38:37\] = 0 (no
/// level hint), BaseADDR\[36:0\] = address\[48:12\]. It covers
/// `(NUM + 1) << (5 * SCALE + 1)` pages from BaseADDR.
#[must_use]
pub const fn range_operand(addr: u64, scale: u64, num: u64) -> u64 {
    (1 << 46) | (scale << 44) | (num << 39) | ((addr >> 12) & ((1 << 37) - 1))
}

/// The instructions that invalidate exactly the `pages` 4 KiB pages from `addr`: range
/// instructions cover an even number of pages (at least 2), so an odd count starts with
/// one by-address instruction; the rest is cut into chunks of growing SCALE, at most one
/// per SCALE, then whole [`MAX_RANGE_PAGES`] chunks. At most `4 + pages /
/// MAX_RANGE_PAGES + 1` steps.
pub fn range_operands(addr: u64, pages: u64) -> impl Iterator<Item = RangeStep> {
    let mut addr = addr & !0xFFF;
    let mut left = pages;
    // SCALE of the next chunk; from 4 on, whole MAX_RANGE_PAGES chunks at SCALE 3.
    let mut scale = 0u64;
    core::iter::from_fn(move || loop {
        if left == 0 {
            return None;
        }
        if left % 2 == 1 {
            let a = addr;
            addr += 1 << 12;
            left -= 1;
            return Some(RangeStep::Page(a));
        }
        let (s, take) = if scale < 4 {
            // What this SCALE must take so the rest is a multiple of the next SCALE's
            // unit (32 of this one's): a multiple of this unit, at most 32 of them.
            let unit = 1u64 << (5 * scale + 1);
            (scale, left % (unit << 5))
        } else {
            (3, MAX_RANGE_PAGES)
        };
        scale = (scale + 1).min(4);
        if take == 0 {
            continue;
        }
        let op = range_operand(addr, s, take / (1 << (5 * s + 1)) - 1);
        addr += take << 12;
        left -= take;
        return Some(RangeStep::Range(op));
    })
}

/// How many instructions [`range_operands`] emits for `pages` pages (the same
/// arithmetic, without building them).
#[must_use]
pub const fn range_steps(pages: u64) -> u64 {
    let mut left = pages;
    let mut n = 0;
    if left % 2 == 1 {
        n += 1;
        left -= 1;
    }
    let mut scale = 0;
    while scale < 4 {
        let take = left % (1u64 << (5 * scale + 6));
        if take != 0 {
            n += 1;
            left -= take;
        }
        scale += 1;
    }
    n + left / MAX_RANGE_PAGES
}

/// The translation context a [`TlbSequence`] must run in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TlbContext {
    /// Whatever context is current (EL2 stage 1; EL1&0 operations run by EL1 code).
    Current,
    /// A stage-2 table's: TLBI by VMID or IPA only affects the VMID in `VTTBR_EL2`,
    /// interpreted with the VMID size of `VTCR_EL2.VS` (with VS = 0 the upper 8 bits
    /// are treated as zero, Arm ARM D8.14 "VMID"), so both registers must hold the
    /// table's values while the sequence runs.
    Stage2 {
        /// The table's `VTTBR_EL2` (root and VMID).
        vttbr: u64,
        /// The table's `VTCR_EL2`.
        vtcr: u64,
    },
}

/// A complete TLB-maintenance sequence (barriers included) built by a
/// [`PageTable`](crate::PageTable) for its own table.
///
/// Only the crate can build one, so a [`TlbMaintenance`] implementation that loads
/// translation registers for it (as `arch::ArmTlb` does for stage 2) only ever loads
/// the values of a real table:
///
/// ```compile_fail
/// let seq = mmu::TlbSequence { ops: &[], context: mmu::TlbContext::Current };
/// ```
#[derive(Debug)]
pub struct TlbSequence<'a> {
    ops: &'a [TlbOp],
    /// Per operation: the level of the leaves it invalidates (1..=3), 0 if unknown.
    /// Empty: none known.
    levels: &'a [u8],
    context: TlbContext,
}

impl<'a> TlbSequence<'a> {
    pub(crate) const fn new(ops: &'a [TlbOp], context: TlbContext) -> Self {
        TlbSequence {
            ops,
            levels: &[],
            context,
        }
    }

    pub(crate) const fn with_levels(
        ops: &'a [TlbOp],
        levels: &'a [u8],
        context: TlbContext,
    ) -> Self {
        TlbSequence {
            ops,
            levels,
            context,
        }
    }

    /// For the by-address, leaf-only operation at `index` of [`ops`](Self::ops)
    /// (`TLBI VALE2IS`, `IPAS2LE1IS`, `VALE1IS`): the level (1..=3) of the leaf entry
    /// it removes, which the table knows; `None` for every other operation. A TLB
    /// implementation on a CPU with FEAT_TTL may pass it as the TTL hint
    /// ([`tlbi_operand`]); the hint is exact (every entry the operation must remove
    /// was cached from a leaf at that level).
    #[must_use]
    pub fn leaf_level(&self, index: usize) -> Option<u8> {
        match self.levels.get(index) {
            Some(&l) if (1..=3).contains(&l) => Some(l),
            _ => None,
        }
    }

    /// The operations, to run in order.
    #[must_use]
    pub const fn ops(&self) -> &'a [TlbOp] {
        self.ops
    }

    /// The context to run them in.
    #[must_use]
    pub const fn context(&self) -> TlbContext {
        self.context
    }
}

/// Runs TLB-maintenance sequences.
///
/// With the `arm-el2` feature on aarch64, `arch::ArmTlb` executes
/// them with `TLBI`/`DSB`/`ISB`. On the host, `testing::RecordingTlb`
/// records them. [`NoTlbMaintenance`] discards them, which is correct only for tables
/// that no PE uses yet: installing a table in a translation register is `unsafe`
/// (`activate`), and its contract requires a `TlbMaintenance` that really runs the
/// maintenance.
pub trait TlbMaintenance {
    /// Executes the operations of `seq` in order, in its context. The crate calls this
    /// before a table operation returns (and in the middle of one, for
    /// break-before-make), so when `execute` returns, the maintenance must be complete.
    fn execute(&mut self, seq: &TlbSequence<'_>);
}

/// Discards all TLB maintenance: for tables built offline that no PE walks yet.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoTlbMaintenance;

impl TlbMaintenance for NoTlbMaintenance {
    #[inline(always)]
    fn execute(&mut self, _seq: &TlbSequence<'_>) {}
}

impl<T: TlbMaintenance + ?Sized> TlbMaintenance for &mut T {
    fn execute(&mut self, seq: &TlbSequence<'_>) {
        (**self).execute(seq);
    }
}

/// Largest number of per-address invalidations batched before the crate switches to
/// invalidating the whole regime / VM instead.
pub const MAX_TLBI_BATCH: usize = 64;

/// Default threshold, see [`PageTable::set_tlbi_threshold`](crate::PageTable::set_tlbi_threshold).
pub const DEFAULT_TLBI_THRESHOLD: usize = 32;

/// Whether `ID_AA64ISAR0_EL1` value `isar0` reports FEAT_TLBIRANGE: its TLB field
/// (bits \[59:56\]) is 0b0010 or more (0b0001 is FEAT_TLBIOS alone).
#[must_use]
pub const fn tlbi_range_supported(isar0: u64) -> bool {
    (isar0 >> 56) & 0xF >= 0b0010
}

/// Whether `ID_AA64MMFR2_EL1` value `mmfr2` reports FEAT_TTL (TTL hints in TLBI
/// operands): its TTL field (bits \[51:48\]) is 0b0001 or more.
#[must_use]
pub const fn ttl_supported(mmfr2: u64) -> bool {
    (mmfr2 >> 48) & 0xF >= 0b0001
}

/// The operand of a by-address TLBI (`TLBI VA(L)E2IS`, `VA(L)E1IS`, `IPAS2(L)E1IS`)
/// for `addr` with a 4 KiB granule, with the TTL hint for a leaf at `level` when given
/// (FEAT_TTL; Arm ARM C5.5, e.g. "TLBI VALE2IS": bits \[43:0\] = address\[55:12\]
/// (for an IPA, bits \[35:0\] = IPA\[47:12\]), TTL\[47:44\] = 0b01 (4 KiB granule) in
/// \[3:2\] and the level in \[1:0\]; TTL = 0 means no hint). The caller ORs in the
/// ASID (bits \[63:48\]) where the instruction has one. A level outside 1..=3 gives
/// no hint.
///
/// ```
/// // TLBI VALE2IS for a page at 0x4020_3000, leaf at level 3.
/// assert_eq!(mmu::tlbi_operand(0x4020_3000, Some(3)), (0b0111 << 44) | 0x40203);
/// assert_eq!(mmu::tlbi_operand(0x4020_3000, None), 0x40203);
/// // FEAT_TTL is ID_AA64MMFR2_EL1.TTL (bits [51:48]) >= 1.
/// assert!(mmu::ttl_supported(1 << 48));
/// ```
#[must_use]
pub const fn tlbi_operand(addr: u64, level: Option<u8>) -> u64 {
    let ttl = match level {
        Some(l @ 1..=3) => 0b0100 | l as u64,
        _ => 0,
    };
    ((addr >> 12) & ((1 << 44) - 1)) | (ttl << 44)
}

/// Makes descriptor writes that turned invalid entries valid visible to table walkers:
/// `DSB ISHST; ISB`, no invalidation (no TLB can hold an invalid entry).
#[inline]
pub(crate) fn publish<T: TlbMaintenance>(tlb: &mut T) {
    tlb.execute(&TlbSequence::new(
        &[TlbOp::DsbIshSt, TlbOp::Isb],
        TlbContext::Current,
    ));
}

/// Per-operation record of what must be invalidated.
///
/// Without range invalidation every entry is one page (one by-address TLBI). With it
/// (FEAT_TLBIRANGE, [`TlbBatch::new`]'s `ranges`), an entry is a run of pages that
/// grows while the changes are contiguous, and a change covering a block or a whole
/// table is noted as the span it covers; the threshold then counts the range
/// instructions the runs take ([`range_steps`]).
pub(crate) struct TlbBatch {
    /// Page-aligned first addresses; bit 0 set for leaf-only invalidation. Only `..len`
    /// is initialised.
    addrs: [MaybeUninit<u64>; MAX_TLBI_BATCH],
    /// Pages of each entry (always 1 without `ranges`).
    pages: [MaybeUninit<u64>; MAX_TLBI_BATCH],
    len: usize,
    /// With ranges: the instructions the runs noted so far take ([`range_steps`]).
    cost: u64,
    threshold: usize,
    /// Range instructions may be used.
    ranges: bool,
    /// More entries changed than `threshold`: invalidate everything.
    all: bool,
    /// Some descriptor was written (needs at least DSB ISHST; ISB).
    written: bool,
}

impl TlbBatch {
    pub(crate) fn new(threshold: usize, ranges: bool) -> Self {
        TlbBatch {
            addrs: [MaybeUninit::uninit(); MAX_TLBI_BATCH],
            pages: [MaybeUninit::uninit(); MAX_TLBI_BATCH],
            len: 0,
            cost: 0,
            threshold,
            ranges,
            all: false,
            written: false,
        }
    }

    /// A descriptor was written that needs no invalidation (invalid -> valid).
    #[inline]
    pub(crate) fn wrote(&mut self) {
        self.written = true;
    }

    /// A valid leaf at `level` mapping `addr` changed or was removed (`leaf`: only
    /// last-level entries need invalidating). The level only matters with ranges (the
    /// run then covers the whole block); it is passed rather than a size so that the
    /// common path computes nothing for it.
    #[inline(always)]
    pub(crate) fn note(&mut self, addr: u64, level: u8, leaf: bool) {
        self.written = true;
        if self.all {
            return;
        }
        if self.ranges {
            self.note_span(addr, crate::desc::level_size(level), leaf);
            return;
        }
        if self.len >= self.threshold {
            self.all = true;
            return;
        }
        // Bits [2:1]: the level of the leaf, for the TTL hint (leaf-only entries).
        let level = if leaf { u64::from(level & 3) << 1 } else { 0 };
        self.addrs[self.len] = MaybeUninit::new((addr & !0xFFF) | level | u64::from(leaf));
        self.pages[self.len] = MaybeUninit::new(1);
        self.len += 1;
    }

    /// With range invalidation: adds `[addr, addr + size)` to the last run when it
    /// continues it, else starts a run. Out of line (`cold` for the layout of the
    /// callers): it keeps [`note`](Self::note) small where it is inlined into the table
    /// walks' loops, which measurably costs tables without ranges otherwise.
    #[cold]
    fn note_span(&mut self, addr: u64, size: u64, leaf: bool) {
        let addr = addr & !0xFFF;
        let pages = size.div_ceil(1 << 12).max(1);
        if let Some(last) = self.len.checked_sub(1) {
            // SAFETY: entries below `len` were written by this function.
            let (a, n) = unsafe {
                (
                    self.addrs[last].assume_init(),
                    self.pages[last].assume_init(),
                )
            };
            if (a & !0xFFF) + (n << 12) == addr {
                // A non-leaf run invalidates leaves too: the run stays leaf-only only
                // if both parts are.
                self.cost = self.cost - range_steps(n) + range_steps(n + pages);
                if self.cost > self.threshold as u64 {
                    // A run too long for range instructions (8 TiB takes 1,025).
                    self.all = true;
                    return;
                }
                self.addrs[last] = MaybeUninit::new(a & (!0xFFF | u64::from(leaf)));
                self.pages[last] = MaybeUninit::new(n + pages);
                return;
            }
        }
        let cost = self.cost + range_steps(pages);
        if self.len >= self.threshold || cost > self.threshold as u64 {
            self.all = true;
            return;
        }
        self.cost = cost;
        self.addrs[self.len] = MaybeUninit::new(addr | u64::from(leaf));
        self.pages[self.len] = MaybeUninit::new(pages);
        self.len += 1;
    }

    /// A table entry covering `addr .. addr + size` was removed: walk caches may hold
    /// it. A non-leaf invalidation of any address it covers removes it, so if the
    /// last noted run reaches into that range it is upgraded instead of adding one.
    #[inline]
    pub(crate) fn note_table(&mut self, addr: u64, size: u64) {
        self.written = true;
        if self.all {
            return;
        }
        if let Some(last) = self.len.checked_sub(1) {
            // SAFETY: entries below `len` were written by `note`/`note_span`.
            let a = unsafe { self.addrs[last].assume_init() };
            // SAFETY: as above.
            let pages = unsafe { self.pages[last].assume_init() };
            let last_page = (a & !0xFFF) + ((pages - 1) << 12);
            if last_page >= addr && last_page - addr < size {
                self.addrs[last] = MaybeUninit::new(a & !0xFFF);
                return;
            }
        }
        self.note(addr, 3, false);
    }

    /// With range invalidation, notes everything below a table entry covering
    /// `[addr, addr + size)` that goes away (its walk-cache entry and every leaf under
    /// it) as one span and returns `true`: the caller need not visit the leaves. Without
    /// it, returns `false` and notes nothing.
    #[inline]
    pub(crate) fn note_subtree(&mut self, addr: u64, size: u64) -> bool {
        if !self.ranges {
            return false;
        }
        self.written = true;
        if !self.all {
            self.note_span(addr, size, false);
        }
        true
    }

    /// `count` entries of `step` bytes from `addr` need invalidating (e.g. all leaves of
    /// a table being replaced).
    pub(crate) fn note_many(&mut self, addr: u64, level: u8, count: usize, leaf: bool) {
        let step = crate::desc::level_size(level);
        if self.ranges {
            self.written = true;
            if !self.all {
                self.note_span(addr, step * count as u64, leaf);
            }
            return;
        }
        if self.all || self.len + count > self.threshold {
            self.written = true;
            self.all = true;
            return;
        }
        for i in 0..count as u64 {
            self.note(addr + i * step, level, leaf);
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
        context: TlbContext,
        tlb: &mut T,
    ) {
        if !self.written {
            return;
        }
        if !self.all && self.len == 0 {
            // Only invalid -> valid changes: make them visible to walkers, no TLBI.
            publish(tlb);
            self.written = false;
            return;
        }
        // Not initialised up front: most batches use a handful of the slots.
        let mut ops = [MaybeUninit::<TlbOp>::uninit(); MAX_TLBI_BATCH + 6];
        // The leaf level of each operation, 0 when not known or not one.
        let mut levels = [0u8; MAX_TLBI_BATCH + 6];
        let mut n = 0;
        let mut push = |op: TlbOp, level: u8| {
            ops[n] = MaybeUninit::new(op);
            levels[n] = level;
            n += 1;
        };
        // Arm ARM D8.17 (break-before-make) and the TLB maintenance examples in
        // D8.16: the descriptor writes must be complete (DSB ISHST) before the TLBI,
        // and the TLBI must be complete (DSB ISH) before relying on the new state.
        push(TlbOp::DsbIshSt, 0);
        if self.all {
            push(regime.tlbi_all(), 0);
            push(TlbOp::DsbIsh, 0);
        } else if self.len > 0 {
            for k in 0..self.len {
                // SAFETY: entries below `len` were written by `note`/`note_span`.
                let a = unsafe { self.addrs[k].assume_init() };
                let (addr, leaf) = (a & !0xFFF, a & 1 != 0);
                // SAFETY: as above.
                let pages = unsafe { self.pages[k].assume_init() };
                if pages == 1 {
                    push(regime.tlbi_entry(addr, leaf), ((a >> 1) & 3) as u8);
                } else {
                    push(regime.tlbi_range(addr, pages, leaf), 0);
                }
            }
            push(TlbOp::DsbIsh, 0);
            if let Some(op) = regime.tlbi_after_entries() {
                push(op, 0);
                push(TlbOp::DsbIsh, 0);
            }
        }
        push(TlbOp::Isb, 0);
        // SAFETY: `push` initialised the first `n` slots; `MaybeUninit<TlbOp>` has the
        // layout of `TlbOp`.
        let ops = unsafe { core::slice::from_raw_parts(ops.as_ptr().cast::<TlbOp>(), n) };
        tlb.execute(&TlbSequence::with_levels(ops, &levels[..n], context));
        self.len = 0;
        self.cost = 0;
        self.all = false;
        self.written = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    extern crate std;
    use std::vec::Vec;

    /// (first page, pages) of a range operand, decoded field by field as the Arm ARM
    /// defines them; also checks TG = 4 KiB and TTL = 0.
    fn decode(op: u64) -> (u64, u64) {
        assert_eq!((op >> 46) & 0b11, 0b01, "TG: 4 KiB granule in {op:#x}");
        assert_eq!((op >> 37) & 0b11, 0, "TTL: no level hint in {op:#x}");
        assert_eq!(op >> 48, 0, "no ASID bits from the encoder in {op:#x}");
        let scale = (op >> 44) & 0b11;
        let num = (op >> 39) & 0b1_1111;
        (op & ((1 << 37) - 1), (num + 1) << (5 * scale + 1))
    }

    /// The pages the steps cover, in order, as (first page, pages).
    fn spans(addr: u64, pages: u64) -> Vec<(u64, u64)> {
        range_operands(addr, pages)
            .map(|s| match s {
                RangeStep::Page(a) => (a >> 12, 1),
                RangeStep::Range(op) => decode(op),
            })
            .collect()
    }

    #[test]
    fn small_and_boundary_counts() {
        let base = 0x4000_0000;
        assert_eq!(
            range_operands(base, 1).collect::<Vec<_>>(),
            [RangeStep::Page(base)]
        );
        // Two pages: SCALE 0, NUM 0.
        assert_eq!(
            range_operands(base, 2).collect::<Vec<_>>(),
            [RangeStep::Range((1 << 46) | (base >> 12))]
        );
        // 64 pages: SCALE 0, NUM 31, one instruction.
        assert_eq!(spans(base, 64), [(base >> 12, 64)]);
        // 66 = 2 (SCALE 0) + 64 (SCALE 1).
        assert_eq!(spans(base, 66), [(base >> 12, 2), ((base >> 12) + 2, 64)]);
        // 3 = 1 page + 2.
        assert_eq!(spans(base, 3), [(base >> 12, 1), ((base >> 12) + 1, 2)]);
        // A whole chunk, and 1 GiB of pages: one instruction each.
        assert_eq!(spans(0, MAX_RANGE_PAGES), [(0, MAX_RANGE_PAGES)]);
        assert_eq!(spans(base, 1 << 18), [(base >> 12, 1 << 18)]);
        assert_eq!(range_operands(base, 0).count(), 0);
    }

    /// TTL hints (FEAT_TTL): TTL\[47:44\] = 0b01 (4 KiB granule) : level, field by
    /// field; no hint for `None` or levels that cannot hold a 4 KiB-granule leaf.
    #[test]
    fn ttl_operands() {
        let va = 0x0000_7F12_3456_7000u64;
        let base = (va >> 12) & ((1 << 44) - 1);
        assert_eq!(tlbi_operand(va, None), base);
        for level in 1..=3u8 {
            let x = tlbi_operand(va, Some(level));
            assert_eq!(x & ((1 << 44) - 1), base, "address bits kept");
            assert_eq!((x >> 46) & 0b11, 0b01, "TTL[3:2]: 4 KiB granule");
            assert_eq!((x >> 44) & 0b11, u64::from(level), "TTL[1:0]: level");
            assert_eq!(x >> 48, 0, "no ASID bits from the encoder");
        }
        assert_eq!(tlbi_operand(va, Some(0)), base);
        assert_eq!(tlbi_operand(va, Some(4)), base);
        // An IPA operand: IPA[47:12] in [35:0].
        assert_eq!(
            tlbi_operand(0xFFFF_FFFF_F000, Some(3)),
            0xF_FFFF_FFFF | (0b0111 << 44)
        );
        // Page-offset bits never reach the operand.
        assert_eq!(tlbi_operand(0x1FFF, Some(2)), 1 | (0b0110 << 44));

        assert!(!ttl_supported(0));
        assert!(ttl_supported(1 << 48));
        assert!(
            ttl_supported(0b0010 << 48),
            "the ID scheme: higher values include it"
        );
        assert!(!ttl_supported(0xF << 52 | 0xFFFF_FFFF_FFFF));
    }

    proptest! {
        #[test]
        fn steps_cover_exactly_the_range(page in 0u64..(1 << 36), pages in 1u64..(3 * MAX_RANGE_PAGES)) {
            let addr = page << 12;
            let s = spans(addr, pages);
            let mut next = page;
            for &(first, n) in &s {
                prop_assert_eq!(first, next, "contiguous, in order: {:?}", s);
                next += n;
            }
            prop_assert_eq!(next, page + pages, "exactly the range: {:?}", s);
            prop_assert!(s.len() as u64 <= 5 + pages / MAX_RANGE_PAGES, "{} steps", s.len());
            prop_assert!(s.iter().filter(|x| x.1 == 1).count() <= 1);
            prop_assert_eq!(range_steps(pages), s.len() as u64);
        }
    }
}

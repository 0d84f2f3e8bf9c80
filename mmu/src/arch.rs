//! The only code that touches system registers: TLB maintenance instructions and
//! table activation at EL2 (feature `arm-el2`, aarch64 only).

use core::arch::asm;

use crate::frame::FrameAllocator;
use crate::regime::{El2, Stage2};
use crate::table::PageTable;
use core::sync::atomic::{AtomicU8, Ordering};

use crate::tlb::{
    range_operands, tlbi_operand, RangeStep, TlbContext, TlbMaintenance, TlbOp, TlbSequence,
};

/// Executes TLB maintenance with real `TLBI`/`DSB`/`ISB` instructions. Must run at EL2.
///
/// Stage-2 sequences run in their table's context ([`TlbContext::Stage2`]): if
/// `VTTBR_EL2` or `VTCR_EL2` differ from the table's, both are switched for the
/// sequence and restored afterwards. The full `VTTBR_EL2` is loaded, not just the
/// VMID, so speculative walks under that VMID can only use the VM's own tables, and
/// `VTCR_EL2` with it so that the VMID is interpreted with the table's VMID size
/// (`VTCR_EL2.VS`; with VS = 0 a TLBI for VMID 0x105 would hit VMID 0x05). Run it
/// with interrupts masked, or make sure no handler that could run in between
/// depends on `VTTBR_EL2`/`VTCR_EL2`.
///
/// Sequences only come from [`PageTable`]s ([`TlbSequence`] cannot be built outside
/// the crate), so the registers are only ever loaded with a real table's values.
///
/// Only the instructions of the operations it is given are executed, so tables of the
/// [`El1`](crate::El1) regime used by code running at EL1 work too (their operations
/// are `TLBI VALE1IS`/`VAE1IS`/`ASIDE1IS` and barriers).
#[derive(Clone, Copy, Debug, Default)]
pub struct ArmTlb;

/// `TLBI` operand of a VA-based EL2/EL1 operation: VA\[55:12\] in bits \[43:0\].
const fn va_operand(va: u64) -> u64 {
    (va >> 12) & ((1 << 44) - 1)
}

/// Whether this CPU implements FEAT_TTL (`ID_AA64MMFR2_EL1.TTL`, bits \[51:48\], at
/// least 0b0001), i.e. takes the TTL level hint in the operands of by-address TLBIs.
/// [`ArmTlb`] passes the hint (from [`TlbSequence::leaf_level`]) by itself where the
/// CPU has it.
#[must_use]
pub fn has_ttl() -> bool {
    let mmfr2: u64;
    // SAFETY: reading an ID register has no side effects.
    unsafe { asm!("mrs {}, id_aa64mmfr2_el1", out(reg) mmfr2, options(nomem, nostack)) };
    crate::tlb::ttl_supported(mmfr2)
}

/// [`has_ttl`], read once: 0 not known yet, 1 no, 2 yes. The PEs of a system share
/// their features, so one answer serves all.
static TTL: AtomicU8 = AtomicU8::new(0);

fn ttl() -> bool {
    match TTL.load(Ordering::Relaxed) {
        0 => {
            let yes = has_ttl();
            TTL.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
            yes
        }
        v => v == 2,
    }
}

/// Whether this PE implements the range TLBI instructions (FEAT_TLBIRANGE):
/// `ID_AA64ISAR0_EL1.TLB` (bits \[59:56\]) >= 0b0010 (Arm ARM D19.2; ID fields of
/// this kind only grow with added features, D19.1.3 "The ID scheme"). Readable at
/// EL1 and EL2. See [`PageTable::set_tlbi_range`](crate::PageTable::set_tlbi_range).
#[must_use]
pub fn has_tlbi_range() -> bool {
    let isar0: u64;
    // SAFETY: reading an ID register has no side effects.
    unsafe { asm!("mrs {}, id_aa64isar0_el1", out(reg) isar0, options(nomem, nostack)) };
    crate::tlb::tlbi_range_supported(isar0)
}

/// Runs one range invalidation: `page` for the odd page a range instruction cannot
/// cover, `range` for each range operand, with `tag` (the ASID, or 0) in bits \[63:48\].
fn for_range(addr: u64, pages: u64, tag: u64, page: impl Fn(u64), range: impl Fn(u64)) {
    for step in range_operands(addr, pages) {
        match step {
            RangeStep::Page(a) => page(a),
            RangeStep::Range(op) => range(tag | op),
        }
    }
}

/// Makes `vtcr`/`vttbr` current; returns the previous values if it had to change them.
fn switch_stage2(vtcr: u64, vttbr: u64) -> Option<(u64, u64)> {
    let (cur_vtcr, cur_vttbr): (u64, u64);
    // SAFETY: reading VTCR_EL2/VTTBR_EL2 at EL2 has no side effects.
    unsafe {
        asm!(
            "mrs {}, vtcr_el2",
            "mrs {}, vttbr_el2",
            out(reg) cur_vtcr,
            out(reg) cur_vttbr,
            options(nomem, nostack),
        )
    };
    if (cur_vtcr, cur_vttbr) == (vtcr, vttbr) {
        return None;
    }
    // SAFETY: at EL2 non-VHE, VTCR_EL2/VTTBR_EL2 only affect the EL1&0 regime, which
    // does not run before the caller restores the previous values. The values are a
    // live table's (`TlbSequence` is only built by the crate), so any speculative
    // walk under this VMID uses that VM's own tables.
    unsafe { load_vtcr_vttbr(vtcr, vttbr) };
    Some((cur_vtcr, cur_vttbr))
}

/// `MSR VTCR_EL2; MSR VTTBR_EL2; ISB`, as KVM's `__load_stage2` orders them: the ISB
/// makes both take effect before any following TLBI (Arm ARM D8.14, the VMID of
/// TLBI operations is the current VMID, sized by the current VS).
///
/// # Safety
/// Must run at EL2; `vttbr` must name tables valid for its VMID (or all-invalid ones),
/// and nothing that runs before the previous values are restored may rely on them.
unsafe fn load_vtcr_vttbr(vtcr: u64, vttbr: u64) {
    // SAFETY: the caller upholds the contract above.
    unsafe {
        asm!(
            "msr vtcr_el2, {vtcr}",
            "msr vttbr_el2, {vttbr}",
            "isb",
            vtcr = in(reg) vtcr,
            vttbr = in(reg) vttbr,
            options(nostack),
        )
    };
}

/// Invalidates every stage-1 and stage-2 TLB entry of the VMID in `vttbr`
/// (`TLBI VMALLS12E1IS`, then `DSB ISH; ISB`), running with `vtcr`/`vttbr` loaded and
/// restoring the previous values afterwards. For a VMID that has no table any more
/// (e.g. before it is reused).
///
/// # Safety
/// Must run at EL2 (non-VHE) with interrupts masked or no handler relying on
/// `VTTBR_EL2`/`VTCR_EL2`; `vttbr`'s BADDR must be a valid stage-2 root for `vtcr`
/// (an all-invalid one will do) that stays valid during the call.
pub unsafe fn invalidate_vmid(vtcr: u64, vttbr: u64) {
    let saved = switch_stage2(vtcr, vttbr);
    // SAFETY: barriers and TLB maintenance only; D8.14: DSB ISHST before, DSB ISH; ISB
    // after the invalidation.
    unsafe {
        asm!(
            "dsb ishst",
            "tlbi vmalls12e1is",
            "dsb ish",
            "isb",
            options(nostack)
        )
    };
    if let Some((vtcr, vttbr)) = saved {
        // SAFETY: restores the values read by `switch_stage2`.
        unsafe { load_vtcr_vttbr(vtcr, vttbr) };
    }
}

impl ArmTlb {
    /// Executes one operation; a stage-2 one with its `vttbr` already current.
    /// `level`: the TTL hint of a by-address leaf invalidation (FEAT_TTL only).
    fn single(op: TlbOp, level: Option<u8>) {
        // SAFETY: TLB maintenance and barriers have no memory-safety effect beyond
        // making the translation tables' current contents take effect.
        unsafe {
            match op {
                TlbOp::DsbIshSt => asm!("dsb ishst", options(nostack)),
                TlbOp::DsbIsh => asm!("dsb ish", options(nostack)),
                TlbOp::Isb => asm!("isb", options(nostack)),
                TlbOp::El2Va { va, leaf: true } => {
                    let x = tlbi_operand(va, level);
                    asm!("tlbi vale2is, {}", in(reg) x, options(nostack))
                }
                TlbOp::El2Va { va, leaf: false } => {
                    asm!("tlbi vae2is, {}", in(reg) va_operand(va), options(nostack))
                }
                TlbOp::El2All => asm!("tlbi alle2is", options(nostack)),
                // IPAS2(L)E1IS operand: IPA[47:12] in bits [35:0] (Arm ARM C5.5).
                TlbOp::Stage2Ipa {
                    ipa, leaf: true, ..
                } => {
                    // IPA < 2^48: IPA[47:12] in [35:0], TTL in [47:44].
                    let x = tlbi_operand(ipa, level);
                    asm!("tlbi ipas2le1is, {}", in(reg) x, options(nostack))
                }
                TlbOp::Stage2Ipa {
                    ipa, leaf: false, ..
                } => {
                    let x = (ipa >> 12) & ((1 << 36) - 1);
                    asm!("tlbi ipas2e1is, {}", in(reg) x, options(nostack))
                }
                TlbOp::Stage2Stage1All { .. } => asm!("tlbi vmalle1is", options(nostack)),
                TlbOp::Stage2All { .. } => asm!("tlbi vmalls12e1is", options(nostack)),
                TlbOp::El1Va {
                    asid,
                    va,
                    leaf: true,
                } => {
                    let x = ((asid as u64) << 48) | tlbi_operand(va, level);
                    asm!("tlbi vale1is, {}", in(reg) x, options(nostack))
                }
                TlbOp::El1Va {
                    asid,
                    va,
                    leaf: false,
                } => {
                    let x = ((asid as u64) << 48) | va_operand(va);
                    asm!("tlbi vae1is, {}", in(reg) x, options(nostack))
                }
                TlbOp::El1Asid { asid } => {
                    let x = (asid as u64) << 48;
                    asm!("tlbi aside1is, {}", in(reg) x, options(nostack))
                }
                // The range instructions are written as the SYS instructions they
                // alias (Arm ARM C5.5: TLBI <op>, Xt = SYS #op1, C8, Cm, #op2, Xt),
                // so that the base target, which lacks FEAT_TLBIRANGE, assembles
                // them. They run only where `has_tlbi_range` said yes.
                TlbOp::El2Range { va, pages, leaf } => for_range(
                    va,
                    pages,
                    0,
                    |a| Self::single(TlbOp::El2Va { va: a, leaf }, None),
                    |x| {
                        if leaf {
                            // TLBI RVALE2IS, Xt
                            asm!("sys #4, c8, c2, #5, {}", in(reg) x, options(nostack))
                        } else {
                            // TLBI RVAE2IS, Xt
                            asm!("sys #4, c8, c2, #1, {}", in(reg) x, options(nostack))
                        }
                    },
                ),
                TlbOp::Stage2Range {
                    vmid,
                    ipa,
                    pages,
                    leaf,
                } => for_range(
                    ipa,
                    pages,
                    0,
                    |a| Self::single(TlbOp::Stage2Ipa { vmid, ipa: a, leaf }, None),
                    |x| {
                        if leaf {
                            // TLBI RIPAS2LE1IS, Xt
                            asm!("sys #4, c8, c0, #6, {}", in(reg) x, options(nostack))
                        } else {
                            // TLBI RIPAS2E1IS, Xt
                            asm!("sys #4, c8, c0, #2, {}", in(reg) x, options(nostack))
                        }
                    },
                ),
                TlbOp::El1Range {
                    asid,
                    va,
                    pages,
                    leaf,
                } => for_range(
                    va,
                    pages,
                    (asid as u64) << 48,
                    |a| Self::single(TlbOp::El1Va { asid, va: a, leaf }, None),
                    |x| {
                        if leaf {
                            // TLBI RVALE1IS, Xt
                            asm!("sys #0, c8, c2, #5, {}", in(reg) x, options(nostack))
                        } else {
                            // TLBI RVAE1IS, Xt
                            asm!("sys #0, c8, c2, #1, {}", in(reg) x, options(nostack))
                        }
                    },
                ),
            }
        }
    }
}

impl TlbMaintenance for ArmTlb {
    fn execute(&mut self, seq: &TlbSequence<'_>) {
        let saved = match seq.context() {
            TlbContext::Stage2 { vttbr, vtcr } => switch_stage2(vtcr, vttbr),
            TlbContext::Current => None,
        };
        let ttl = ttl();
        for (i, op) in seq.ops().iter().enumerate() {
            Self::single(*op, if ttl { seq.leaf_level(i) } else { None });
        }
        if let Some((vtcr, vttbr)) = saved {
            // SAFETY: restores the values read by `switch_stage2`.
            unsafe { load_vtcr_vttbr(vtcr, vttbr) };
        }
    }
}

/// Loads `MAIR_EL2`, `TCR_EL2` and `TTBR0_EL2`, then `ISB`. Does not touch `SCTLR_EL2`.
///
/// # Safety
/// Must run at EL2 (non-VHE). If the EL2 MMU is on, the new tables must map the code
/// executing this function, its stack and all memory used afterwards with compatible
/// attributes; the caller handles any TLB invalidation needed for stale entries of
/// the previous tables.
pub unsafe fn load_el2(mair: u64, tcr: u64, ttbr0: u64) {
    // SAFETY: the caller upholds the contract above.
    unsafe {
        asm!(
            "msr mair_el2, {mair}",
            "msr tcr_el2, {tcr}",
            "msr ttbr0_el2, {ttbr}",
            "isb",
            mair = in(reg) mair,
            tcr = in(reg) tcr,
            ttbr = in(reg) ttbr0,
            options(nostack),
        );
    }
}

/// Loads `VTCR_EL2` and `VTTBR_EL2`, then `ISB`.
///
/// # Safety
/// Must run at EL2. The tables at `vttbr`'s BADDR must stay valid while the VMID may
/// run, and must map what the VM may access; the VMID must not be shared with
/// another VM's tables without a TLB invalidation of that VMID in between.
pub unsafe fn load_stage2(vtcr: u64, vttbr: u64) {
    // SAFETY: the caller upholds the contract above.
    unsafe { load_vtcr_vttbr(vtcr, vttbr) };
}

impl<A: FrameAllocator, T: TlbMaintenance> PageTable<El2, A, T> {
    /// Installs this table as the EL2 stage-1 table (`MAIR_EL2`, `TCR_EL2`,
    /// `TTBR0_EL2`). Turning the MMU on (`SCTLR_EL2.M`) is the caller's business.
    ///
    /// # Safety
    /// As [`load_el2`]. Once installed the hardware walks the table, and the table's
    /// safe operations rely on that being harmless, so for as long as it stays
    /// installed on any PE the caller must also guarantee that:
    ///
    /// - `T` really performs the maintenance it is given on this machine (e.g.
    ///   [`ArmTlb`], not `NoTlbMaintenance`): frames are freed once it returned;
    /// - the allocator's [`PhysToVirt`](crate::PhysToVirt) reaches the frames at the
    ///   physical addresses the walker uses;
    /// - the table is not dropped (dropping it invalidates and frees its frames),
    ///   and no operation on it (including ones it makes by itself, such as splitting a
    ///   block with break-before-make) removes or changes the mapping of memory the
    ///   running code relies on: its code, stacks, the table frames themselves and
    ///   everything accessed through Rust references (map such memory with
    ///   [`MapFlags::NO_BLOCKS`](crate::MapFlags::NO_BLOCKS) and do not unmap or
    ///   protect it).
    pub unsafe fn activate(&self) {
        // SAFETY: forwarded to the caller.
        unsafe { load_el2(self.mair_el2(), self.tcr_el2(), self.ttbr0_el2()) };
    }
}

impl<A: FrameAllocator, T: TlbMaintenance> PageTable<Stage2, A, T> {
    /// Installs this table as the current stage 2 (`VTCR_EL2`, `VTTBR_EL2` with the VMID).
    ///
    /// # Safety
    /// As [`load_stage2`]. For as long as the table is installed on any PE (or its
    /// VMID may run), the caller must also guarantee that `T` really performs the
    /// maintenance it is given on this machine (e.g. [`ArmTlb`]), that the allocator's
    /// [`PhysToVirt`](crate::PhysToVirt) reaches the frames at the physical addresses
    /// the walker uses, and that the table is not dropped while installed. What the
    /// VM can reach is then exactly what the table maps at each point in time.
    pub unsafe fn activate(&self) {
        // SAFETY: forwarded to the caller.
        unsafe { load_stage2(self.vtcr_el2(), self.vttbr_el2()) };
    }
}

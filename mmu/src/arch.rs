//! The only code that touches system registers: TLB maintenance instructions and
//! table activation at EL2 (feature `arm-el2`, aarch64 only).

use core::arch::asm;

use crate::frame::FrameAllocator;
use crate::regime::{El2, Stage2};
use crate::table::PageTable;
use crate::tlb::{range_operands, RangeStep, TlbMaintenance, TlbOp};

/// Executes TLB maintenance with real `TLBI`/`DSB`/`ISB` instructions. Must run at EL2.
///
/// Stage-2 operations need the target VM's VMID current: if `VTTBR_EL2` differs from
/// the operation's `vttbr`, it is switched for the sequence and restored afterwards
/// (the full value is loaded, not just the VMID, so speculative walks under that VMID
/// can only use the VM's own tables). Run it with interrupts masked, or make sure no
/// handler that could run in between depends on `VTTBR_EL2`.
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

/// Whether this PE implements the range TLBI instructions (FEAT_TLBIRANGE):
/// `ID_AA64ISAR0_EL1.TLB` (bits \[59:56\]) = 0b0010 (Arm ARM D19.2). Readable at EL1
/// and EL2. See [`PageTable::set_tlbi_range`](crate::PageTable::set_tlbi_range).
#[must_use]
pub fn has_tlbi_range() -> bool {
    let isar0: u64;
    // SAFETY: reading an ID register has no side effects.
    unsafe { asm!("mrs {}, id_aa64isar0_el1", out(reg) isar0, options(nomem, nostack)) };
    (isar0 >> 56) & 0xF == 0b0010
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

/// Makes `vttbr` current; returns the previous value if it had to change it.
fn switch_vttbr(vttbr: u64) -> Option<u64> {
    let cur: u64;
    // SAFETY: reading VTTBR_EL2 at EL2 has no side effects.
    unsafe { asm!("mrs {}, vttbr_el2", out(reg) cur, options(nomem, nostack)) };
    if cur == vttbr {
        return None;
    }
    // SAFETY: at EL2 non-VHE, VTTBR_EL2 only affects the EL1&0 regime, which does
    // not run before the caller restores the previous value. The full value (BADDR
    // and VMID) is loaded so any speculative walk under this VMID uses its own tables.
    unsafe { asm!("msr vttbr_el2, {}", "isb", in(reg) vttbr, options(nostack)) };
    Some(cur)
}

impl ArmTlb {
    /// Executes one operation; a stage-2 one with its `vttbr` already current.
    fn single(op: TlbOp) {
        // SAFETY: TLB maintenance and barriers have no memory-safety effect beyond
        // making the translation tables' current contents take effect.
        unsafe {
            match op {
                TlbOp::DsbIshSt => asm!("dsb ishst", options(nostack)),
                TlbOp::DsbIsh => asm!("dsb ish", options(nostack)),
                TlbOp::Isb => asm!("isb", options(nostack)),
                TlbOp::El2Va { va, leaf: true } => {
                    asm!("tlbi vale2is, {}", in(reg) va_operand(va), options(nostack))
                }
                TlbOp::El2Va { va, leaf: false } => {
                    asm!("tlbi vae2is, {}", in(reg) va_operand(va), options(nostack))
                }
                TlbOp::El2All => asm!("tlbi alle2is", options(nostack)),
                // IPAS2(L)E1IS operand: IPA[47:12] in bits [35:0] (Arm ARM C5.5).
                TlbOp::Stage2Ipa {
                    ipa, leaf: true, ..
                } => {
                    let x = (ipa >> 12) & ((1 << 36) - 1);
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
                    let x = ((asid as u64) << 48) | va_operand(va);
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
                    |a| Self::single(TlbOp::El2Va { va: a, leaf }),
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
                    vttbr,
                    ipa,
                    pages,
                    leaf,
                } => for_range(
                    ipa,
                    pages,
                    0,
                    |a| {
                        Self::single(TlbOp::Stage2Ipa {
                            vmid,
                            vttbr,
                            ipa: a,
                            leaf,
                        })
                    },
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
                    |a| Self::single(TlbOp::El1Va { asid, va: a, leaf }),
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
    fn execute(&mut self, ops: &[TlbOp]) {
        // `Some(previous)` once VTTBR_EL2 was switched for this sequence.
        let mut saved: Option<u64> = None;
        let mut checked = false;
        for op in ops {
            if let TlbOp::Stage2Ipa { vttbr, .. }
            | TlbOp::Stage2Range { vttbr, .. }
            | TlbOp::Stage2Stage1All { vttbr, .. }
            | TlbOp::Stage2All { vttbr, .. } = *op
            {
                if !checked {
                    checked = true;
                    saved = switch_vttbr(vttbr);
                }
            }
            Self::single(*op);
        }
        if let Some(old) = saved {
            // SAFETY: restores the VTTBR_EL2 value read above.
            unsafe { asm!("msr vttbr_el2, {}", "isb", in(reg) old, options(nostack)) };
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
    unsafe {
        asm!(
            "msr vtcr_el2, {vtcr}",
            "msr vttbr_el2, {vttbr}",
            "isb",
            vtcr = in(reg) vtcr,
            vttbr = in(reg) vttbr,
            options(nostack),
        );
    }
}

impl<A: FrameAllocator, T: TlbMaintenance> PageTable<El2, A, T> {
    /// Installs this table as the EL2 stage-1 table (`MAIR_EL2`, `TCR_EL2`,
    /// `TTBR0_EL2`). Turning the MMU on (`SCTLR_EL2.M`) is the caller's business.
    ///
    /// # Safety
    /// As [`load_el2`]; additionally the table must outlive its use by the hardware.
    pub unsafe fn activate(&self) {
        // SAFETY: forwarded to the caller.
        unsafe { load_el2(self.mair_el2(), self.tcr_el2(), self.ttbr0_el2()) };
    }
}

impl<A: FrameAllocator, T: TlbMaintenance> PageTable<Stage2, A, T> {
    /// Installs this table as the current stage 2 (`VTCR_EL2`, `VTTBR_EL2` with the VMID).
    ///
    /// # Safety
    /// As [`load_stage2`]; additionally the table must outlive its use by the hardware.
    pub unsafe fn activate(&self) {
        // SAFETY: forwarded to the caller.
        unsafe { load_stage2(self.vtcr_el2(), self.vttbr_el2()) };
    }
}

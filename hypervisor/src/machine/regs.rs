//! The EL2 and EL1 system-register values and accesses for running a guest.
//!
//! Single registers are read and written with `aarch64-cpu`'s accessors. Raw `asm!` is
//! left for what that crate does not cover: `ZCR_EL2`, and the vCPU reset in
//! [`enter_guest_context`], one sequence that also writes `VPIDR_EL2`, `VMPIDR_EL2`,
//! `AMAIR_EL1` and `CONTEXTIDR_EL1` and must end with an `ISB` and a local TLBI.
//!
//! Register layouts: Arm ARM (DDI 0487) D19.2 (AArch64 system registers) and D19.11
//! (generic timer registers).

use core::arch::asm;

use aarch64_cpu::registers::{
    Readable, Writeable, ELR_EL1, ESR_EL1, FAR_EL1, ID_AA64MMFR0_EL1, ID_AA64MMFR1_EL1,
    ID_AA64PFR0_EL1, MIDR_EL1, SPSR_EL1, VBAR_EL1,
};

use crate::vm::vmid::VmidBits;

/// `HCR_EL2` for an AArch64 EL1 guest (D19.2.49):
/// VM (0) stage 2 on, SWIO (1) set/way invalidation as clean+invalidate, FMO (3),
/// IMO (4), AMO (5): physical FIQs, IRQs and SErrors are taken to EL2 and EL1 sees the
/// virtual ones (the guest's `ICC_*_EL1` accesses reach the virtual CPU interface, its
/// `ICC_SGI*R_EL1` writes trap), TSC (19) trap SMC (it is a PSCI/SMCCC conduit), RW (31)
/// EL1 is AArch64, APK (40) / API (41) do not trap pointer-authentication keys and
/// instructions (`-cpu max` has FEAT_PAuth). TWI/TWE stay 0: a guest's WFI waits on its
/// own CPU until a virtual interrupt is pending in the list registers or a physical
/// interrupt (a kick, a timer, a maintenance interrupt) brings it to EL2.
pub const HCR_GUEST: u64 = (1 << 0)
    | (1 << 1)
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 19)
    | (1 << 31)
    | (1 << 40)
    | (1 << 41);
/// `HCR_EL2` while no guest runs (also from start-up on): only RW, EL1 is AArch64, stage 2
/// off, no VHE.
pub const HCR_IDLE: u64 = 1 << 31;
/// `CNTHCTL_EL2` (non-VHE, D19.11.4): EL1PCTEN (0) and EL1PCEN (1): the guest may read
/// the physical counter and use the physical timer.
pub const CNTHCTL_GUEST: u64 = 0b11;
/// `SCTLR_EL1` at vCPU reset: the RES1 bits of Armv8.0 (29, 28, 23, 22, 20, 11), MMU and
/// caches off, little-endian (D19.2.118).
pub const SCTLR_EL1_RESET: u64 = 0x30d0_0800;

/// Output-address size of this CPU (`ID_AA64MMFR0_EL1.PARange`, decoded by
/// [`crate::mem::stage1::pa_bits`]).
pub fn pa_bits() -> u8 {
    crate::mem::stage1::pa_bits(ID_AA64MMFR0_EL1.get())
}

/// VMID width from `ID_AA64MMFR1_EL1.VMIDBits`.
pub fn vmid_bits() -> VmidBits {
    VmidBits::from_id_aa64mmfr1(ID_AA64MMFR1_EL1.get())
}

/// `CPTR_EL2.TZ` (bit 8, E2H = 0): SVE instructions and registers trap to EL2 when set
/// (Arm ARM D19.2.30); the boot code sets it.
const CPTR_EL2_TZ: u64 = 1 << 8;

/// On a CPU with SVE (`ID_AA64PFR0_EL1.SVE`, bits \[35:32\]), lets the guest use it with
/// the smallest vector length: `CPTR_EL2.TZ` = 0 and `ZCR_EL2.LEN` = 0 (128-bit vectors).
/// The Z registers are then exactly the V registers the exit path saves and restores, and
/// the predicate registers are never touched by the hypervisor's own code (it is built
/// without SVE), so the guest's SVE state survives every exit; vCPUs never share a CPU.
/// A Linux guest probes SVE at boot, which would otherwise stop it. SME stays trapped.
fn allow_el1_sve_128() {
    if (ID_AA64PFR0_EL1.get() >> 32) & 0xf == 0 {
        return;
    }
    // SAFETY: with FEAT_SVE, clearing TZ only stops SVE accesses from trapping, and
    // ZCR_EL2 (accessible once TZ is 0) only caps the vector length of EL1/EL0.
    unsafe {
        asm!(
            "mrs {t}, cptr_el2",
            "bic {t}, {t}, {tz}",
            "msr cptr_el2, {t}",
            "isb",
            "msr S3_4_C1_C2_0, xzr", // ZCR_EL2
            "isb",
            t = out(reg) _,
            tz = in(reg) CPTR_EL2_TZ,
            options(nostack),
        );
    }
}

/// Configures this CPU to run vCPU `index` of the VM with `vttbr`/`vtcr`, and resets the
/// guest's EL1 state (the vCPU starts as after a PSCI `CPU_ON`: MMU off). `CPTR_EL2`
/// (FP/SIMD not trapped, SVE and SME trapped) is set once per CPU by the boot code; SVE is
/// then allowed at 128-bit vectors where the CPU has it.
pub fn enter_guest_context(vttbr: u64, vtcr: u64, index: u64) {
    let midr = MIDR_EL1.get();
    let vmpidr = (1 << 31) | (index & 0xff);
    allow_el1_sve_128();
    // SAFETY: these registers only affect the EL1&0 regime, which does not run until
    // `enter_guest`; the local TLBI VMALLS12E1 drops whatever this CPU cached for the
    // VMID before (the VMID is also flushed inner-shareable when it is freed).
    unsafe {
        asm!(
            "msr vtcr_el2, {vtcr}",
            "msr vttbr_el2, {vttbr}",
            "msr hcr_el2, {hcr}",
            "msr cnthctl_el2, {cnthctl}",
            "msr cntvoff_el2, xzr",
            "msr vpidr_el2, {midr}",
            "msr vmpidr_el2, {vmpidr}",
            "msr sctlr_el1, {sctlr}",
            "msr cpacr_el1, xzr",
            "msr vbar_el1, xzr",
            "msr tcr_el1, xzr",
            "msr ttbr0_el1, xzr",
            "msr ttbr1_el1, xzr",
            "msr mair_el1, xzr",
            "msr amair_el1, xzr",
            "msr contextidr_el1, xzr",
            "msr tpidr_el1, xzr",
            "msr tpidr_el0, xzr",
            "msr tpidrro_el0, xzr",
            "msr sp_el0, xzr",
            "msr sp_el1, xzr",
            "msr esr_el1, xzr",
            "msr far_el1, xzr",
            "msr cntkctl_el1, xzr",
            "msr cntv_ctl_el0, xzr",
            "msr cntp_ctl_el0, xzr",
            "isb",
            "tlbi vmalls12e1",
            "dsb nsh",
            "isb",
            vtcr = in(reg) vtcr,
            vttbr = in(reg) vttbr,
            hcr = in(reg) HCR_GUEST,
            cnthctl = in(reg) CNTHCTL_GUEST,
            midr = in(reg) midr,
            vmpidr = in(reg) vmpidr,
            sctlr = in(reg) SCTLR_EL1_RESET,
            options(nostack),
        );
    }
}

/// Turns stage 2 off and clears `VTTBR_EL2` while this CPU runs no guest (at start-up and
/// after each guest run), so no table of a VM that may be destroyed stays reachable from it.
pub fn leave_guest_context() {
    // SAFETY: at EL2 these only affect the EL1&0 regime, which does not run now.
    unsafe {
        asm!(
            "msr hcr_el2, {hcr}",
            "isb",
            "msr vttbr_el2, xzr",
            "isb",
            hcr = in(reg) HCR_IDLE,
            options(nostack),
        );
    }
}

/// The guest's `VBAR_EL1`.
pub fn vbar_el1() -> u64 {
    VBAR_EL1.get()
}

/// Writes the guest's `ESR_EL1`, `FAR_EL1`, `ELR_EL1`, `SPSR_EL1` (abort injection).
pub fn set_el1_exception(esr: u64, far: u64, elr: u64, spsr: u64) {
    // The guest's EL1 exception registers, owned by the vCPU this CPU runs; they do not
    // affect EL2.
    ESR_EL1.set(esr);
    FAR_EL1.set(far);
    ELR_EL1.set(elr);
    SPSR_EL1.set(spsr);
}

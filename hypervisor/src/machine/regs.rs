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
    ID_AA64PFR0_EL1, MIDR_EL1, SCTLR_EL1, SPSR_EL1, VBAR_EL1,
};

use crate::vcpu::cpu_state::{El2Controls, IdRegs, PmuPolicy};
use crate::vm::vmid::VmidBits;

/// `HCR_EL2` for an AArch64 EL1 guest (D19.2.49):
/// VM (0) stage 2 on, SWIO (1) set/way invalidation as clean+invalidate, FMO (3),
/// IMO (4), AMO (5): physical FIQs, IRQs and SErrors are taken to EL2 and EL1 sees the
/// virtual ones (the guest's `ICC_*_EL1` accesses reach the virtual CPU interface, its
/// `ICC_SGI*R_EL1` writes trap; docs/interrupts.md), TSC (19) trap SMC (it is a
/// PSCI/SMCCC conduit), RW (31) EL1 is AArch64, APK (40) / API (41) do not trap
/// pointer-authentication keys and instructions (`-cpu max` has FEAT_PAuth). TWI/TWE
/// stay 0: a guest's WFI waits on its own CPU until a virtual interrupt is pending in the
/// list registers or a physical one (a kick, a timer, a maintenance interrupt) brings it
/// to EL2.
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

/// The ID register fields [`El2Controls::for_cpu`] depends on, read on this CPU.
pub fn id_regs() -> IdRegs {
    let (pfr1, dfr0): (u64, u64);
    // SAFETY: reading ID registers has no side effects (ID_AA64PFR1_EL1, ID_AA64DFR0_EL1
    // by encoding: every Armv8.0 CPU has them, RAZ where a field is not implemented).
    unsafe {
        asm!(
            "mrs {p}, S3_0_C0_C4_1",
            "mrs {d}, S3_0_C0_C5_0",
            p = out(reg) pfr1,
            d = out(reg) dfr0,
            options(nomem, nostack, preserves_flags),
        );
    }
    let mut id = IdRegs {
        pfr0: ID_AA64PFR0_EL1.get(),
        pfr1,
        dfr0,
        mmfr1: ID_AA64MMFR1_EL1.get(),
        pmu_counters: 0,
        midr: MIDR_EL1.get(),
        // The firmware's SMCCC_ARCH_WORKAROUND_1 is not probed or called (QEMU has no
        // firmware behind SMC besides PSCI): docs/cpu-state.md.
        firmware_wa1: false,
    };
    if id.pmu_version() != 0 {
        // PMCR_EL0.N [15:11]: the event counters the CPU implements.
        id.pmu_counters = ((pmcr() >> 11) & 0x1f) as u8;
    }
    id
}

/// The EL2 controls for guests on this CPU (`docs/cpu-state.md`).
pub fn el2_controls() -> El2Controls {
    El2Controls::for_cpu(&id_regs())
}

/// `PMCR_EL0`. Only where the CPU has a PMU (`ID_AA64DFR0_EL1.PMUVer`).
pub fn pmcr() -> u64 {
    let v: u64;
    // SAFETY: at EL2 PMCR_EL0 reads without trapping; no side effects.
    unsafe { asm!("mrs {}, S3_3_C9_C12_0", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// `PAR_EL1` bits \[51:12\]: the output address of a successful `AT` (D19.2, `PAR_EL1`).
const PAR_PA: u64 = 0x000f_ffff_ffff_f000;

/// The IPA the running guest's stage 1 maps `va` to for an EL1 read (`AT S1E1R`: stage 1
/// of the EL1&0 regime, whose registers are the guest's while its vCPU is loaded), or
/// `None` if the translation faults. `PAR_EL1` is the guest's and is put back.
pub fn stage1_ipa(va: u64) -> Option<u64> {
    let par: u64;
    // SAFETY: AT only translates (a fault is reported in PAR_EL1, not taken: Arm ARM
    // C5.5 "AT"); the ISB makes PAR_EL1 hold its result before it is read, and the
    // guest's PAR_EL1 is restored before returning.
    unsafe {
        asm!(
            "mrs {saved}, par_el1",
            "at s1e1r, {va}",
            "isb",
            "mrs {par}, par_el1",
            "msr par_el1, {saved}",
            saved = out(reg) _,
            par = out(reg) par,
            va = in(reg) va,
            options(nostack, preserves_flags),
        );
    }
    (par & 1 == 0).then_some((par & PAR_PA) | (va & 0xfff))
}

/// Drops this CPU's TLB entries for IPA `ipa` of the VM it runs (its VMID is in
/// `VTTBR_EL2`): `TLBI IPAS2E1` for the stage-2 entry, then `TLBI VMALLE1` for the
/// combined stage-1-and-2 entries built from it, which no by-IPA operation reaches; with
/// no IPA, `TLBI VMALLS12E1`, everything of the VM. All non-shareable, each completed by
/// a `DSB NSH` (Arm ARM D8.16, "TLB maintenance instructions"; KVM's local stage-2
/// invalidation after relaxing permissions is the same sequence). The `DSB ISHST` first
/// makes the descriptor write that opened the page visible to this CPU's walks. The
/// IPA operand is IPA\[47:12\]: stage-2 tables here have at most 48-bit IPAs.
pub fn invalidate_local(ipa: Option<u64>) {
    // SAFETY: TLB maintenance for the running VM's own VMID changes no memory.
    unsafe {
        match ipa {
            Some(ipa) => asm!(
                "dsb ishst",
                "tlbi ipas2e1, {page}",
                "dsb nsh",
                "tlbi vmalle1",
                "dsb nsh",
                "isb",
                page = in(reg) (ipa >> 12) & ((1 << 36) - 1),
                options(nostack, preserves_flags),
            ),
            None => asm!(
                "dsb ishst",
                "tlbi vmalls12e1",
                "dsb nsh",
                "isb",
                options(nostack, preserves_flags),
            ),
        }
    }
}

/// Writes `PMCR_EL0` (for the vCPU this CPU runs: the PMU belongs to its guest).
pub fn set_pmcr(value: u64) {
    // SAFETY: the PMU is the running guest's (static partitioning); EL2 counting is
    // prohibited by MDCR_EL2 whatever PMCR_EL0 says, and the caller sets DP where needed.
    unsafe {
        asm!("msr S3_3_C9_C12_0, {}", "isb", in(reg) value, options(nostack, preserves_flags))
    };
}

/// Makes a virtual SError pending for the guest: `VSESR_EL2` (FEAT_RAS) then
/// `HCR_EL2.VSE`. The CPU clears VSE when the guest takes it (Arm ARM D1.3.5 "Virtual
/// SError exceptions"); it is taken only while `HCR_EL2.AMO` routes SErrors to EL2.
pub fn inject_serror(vsesr: Option<u64>) {
    if let Some(v) = vsesr {
        // SAFETY: VSESR_EL2 (FEAT_RAS, which the caller checked) only holds the syndrome
        // of the next virtual SError.
        unsafe { asm!("msr S3_4_C5_C2_3, {}", in(reg) v, options(nostack, preserves_flags)) };
    }
    // SAFETY: setting VSE only makes a virtual SError pending for EL1; the other HCR_EL2
    // bits are written back unchanged.
    unsafe {
        asm!(
            "mrs {t}, hcr_el2",
            "orr {t}, {t}, {vse}",
            "msr hcr_el2, {t}",
            "isb",
            t = out(reg) _,
            vse = in(reg) crate::vcpu::cpu_state::hcr::VSE,
            options(nostack),
        );
    }
}

/// Writes the EL2 controls for a guest (`docs/cpu-state.md`): `MDCR_EL2`, `CPTR_EL2`,
/// `HSTR_EL2`, `ACTLR_EL2`, and `ZCR_EL2.LEN` = 0 where SVE is allowed (128-bit vectors:
/// the Z registers are then exactly the V registers the exit path saves and restores, and
/// the hypervisor, built without SVE, never touches the predicate registers; vCPUs never
/// share a CPU). `HCR_EL2` is written by the caller with the trap bits included.
fn write_controls(c: &El2Controls) {
    // SAFETY: these registers only decide what EL1/EL0 may do and what traps to EL2; EL2's
    // own FP/SIMD stays untrapped (CPTR_EL2.TFP is 0 in every value). ZCR_EL2 is
    // accessible once CPTR_EL2.TZ is 0, which `c.sve` implies.
    unsafe {
        asm!(
            "msr mdcr_el2, {mdcr}",
            "msr cptr_el2, {cptr}",
            "msr hstr_el2, {hstr}",
            "msr actlr_el2, {actlr}",
            "isb",
            mdcr = in(reg) c.mdcr,
            cptr = in(reg) c.cptr,
            hstr = in(reg) c.hstr,
            actlr = in(reg) c.actlr,
            options(nostack),
        );
        if c.sve {
            asm!("msr S3_4_C1_C2_0, xzr", "isb", options(nostack)); // ZCR_EL2
        }
    }
}

/// Resets the guest-owned PMU and self-hosted debug state at vCPU start: counters
/// disabled (`PMCR_EL0.E` = 0, DP set), every counter, interrupt and overflow cleared, no
/// EL0 access; `MDSCR_EL1` = 0 (no breakpoints, watchpoints or single step).
fn reset_guest_pmu_and_debug(c: &El2Controls) {
    // SAFETY: MDSCR_EL1 only controls debug events of EL1/EL0.
    unsafe { asm!("msr mdscr_el1, xzr", options(nostack, preserves_flags)) };
    if matches!(c.pmu, PmuPolicy::Absent | PmuPolicy::Hidden) {
        return;
    }
    // SAFETY: the PMU is this vCPU's (static partitioning) and this is its reset state.
    unsafe {
        asm!(
            "msr S3_3_C9_C12_0, {dp}",  // PMCR_EL0 = DP
            "msr S3_3_C9_C12_2, {all}", // PMCNTENCLR_EL0
            "msr S3_0_C9_C14_2, {all}", // PMINTENCLR_EL1
            "msr S3_3_C9_C12_3, {all}", // PMOVSCLR_EL0
            "msr S3_3_C9_C14_0, xzr",   // PMUSERENR_EL0
            "msr S3_3_C9_C12_5, xzr",   // PMSELR_EL0
            "isb",
            dp = in(reg) crate::vcpu::cpu_state::sysreg::PMCR_DP,
            all = in(reg) u64::MAX,
            options(nostack),
        );
    }
}

/// Configures this CPU to run vCPU `index` of the VM with `vttbr`/`vtcr`, and resets the
/// guest's EL1 state (the vCPU starts as after a PSCI `CPU_ON`: MMU off). Every EL2
/// control register a guest's behaviour depends on is written here, from `controls`
/// ([`el2_controls`] of this CPU, `docs/cpu-state.md`); EL2 does not change them while
/// the vCPU runs (only `HCR_EL2.VSE`, by [`inject_serror`]).
pub fn enter_guest_context(vttbr: u64, vtcr: u64, index: u64, controls: &El2Controls) {
    let midr = MIDR_EL1.get();
    let vmpidr = (1 << 31) | (index & 0xff);
    write_controls(controls);
    boot::set_bhb_loop(u32::from(controls.spectre.bhb_loop));
    reset_guest_pmu_and_debug(controls);
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
            hcr = in(reg) HCR_GUEST | controls.hcr_traps,
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

/// The guest's `SCTLR_EL1`.
pub fn sctlr_el1() -> u64 {
    SCTLR_EL1.get()
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

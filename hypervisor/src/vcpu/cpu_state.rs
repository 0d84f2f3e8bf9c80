//! The CPU state a guest shares with EL2, and what EL2 lets it do with it: the trap and
//! control registers written for every vCPU entry (`HCR_EL2`'s trap bits, `MDCR_EL2`,
//! `CPTR_EL2`, `HSTR_EL2`, `ACTLR_EL2`), computed from the CPU's ID registers
//! ([`El2Controls::for_cpu`]); the emulation of the system registers those traps catch
//! ([`sysreg`]); and what happens to an SError taken from a guest ([`serror`]).
//!
//! `docs/cpu-state.md` explains every register and bit and the policy behind it. Register
//! layouts: Arm ARM (DDI 0487) D19.2 (HCR_EL2 D19.2.49, MDCR_EL2 D19.3.17, CPTR_EL2
//! D19.2.30, HSTR_EL2 D19.2.52, ID_AA64DFR0_EL1 D19.2.59, ID_AA64PFR0_EL1 D19.2.67,
//! ID_AA64PFR1_EL1 D19.2.68, ID_AA64MMFR1_EL1 D19.2.65).

/// The ID register fields the controls depend on, as read on the CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdRegs {
    /// `ID_AA64PFR0_EL1`: RAS \[31:28\], SVE \[35:32\], AMU \[47:44\].
    pub pfr0: u64,
    /// `ID_AA64PFR1_EL1`: MTE \[11:8\].
    pub pfr1: u64,
    /// `ID_AA64DFR0_EL1`: PMUVer \[11:8\], PMSVer \[35:32\], TraceFilt \[43:40\],
    /// TraceBuffer \[47:44\].
    pub dfr0: u64,
    /// `ID_AA64MMFR1_EL1`: LO \[19:16\].
    pub mmfr1: u64,
    /// `PMCR_EL0.N` \[15:11\]: event counters implemented (0 without a PMU).
    pub pmu_counters: u8,
    /// `MIDR_EL1`.
    pub midr: u64,
    /// The firmware implements `SMCCC_ARCH_WORKAROUND_1` (SMCCC 1.1 discovery).
    pub firmware_wa1: bool,
}

const fn field(reg: u64, lsb: u32) -> u64 {
    (reg >> lsb) & 0xf
}

impl IdRegs {
    /// `ID_AA64DFR0_EL1.PMUVer`, with 0xf (IMPLEMENTATION DEFINED PMU) read as none.
    #[must_use]
    pub const fn pmu_version(&self) -> u64 {
        match field(self.dfr0, 8) {
            0xf => 0,
            v => v,
        }
    }
    /// FEAT_RAS (`ID_AA64PFR0_EL1.RAS` >= 1).
    #[must_use]
    pub const fn has_ras(&self) -> bool {
        field(self.pfr0, 28) >= 1
    }
    /// FEAT_SVE.
    #[must_use]
    pub const fn has_sve(&self) -> bool {
        field(self.pfr0, 32) >= 1
    }
    /// FEAT_AMUv1.
    #[must_use]
    pub const fn has_amu(&self) -> bool {
        field(self.pfr0, 44) >= 1
    }
    /// FEAT_MTE2: allocation tags in memory (`ID_AA64PFR1_EL1.MTE` >= 2). With only
    /// FEAT_MTE (1) there are no tag registers to give a guest.
    #[must_use]
    pub const fn has_mte2(&self) -> bool {
        field(self.pfr1, 8) >= 2
    }
    /// FEAT_LOR (`ID_AA64MMFR1_EL1.LO`).
    #[must_use]
    pub const fn has_lor(&self) -> bool {
        field(self.mmfr1, 16) >= 1
    }
    /// FEAT_SPE (`ID_AA64DFR0_EL1.PMSVer`).
    #[must_use]
    pub const fn has_spe(&self) -> bool {
        field(self.dfr0, 32) >= 1
    }
    /// FEAT_TRF (`ID_AA64DFR0_EL1.TraceFilt`).
    #[must_use]
    pub const fn has_trf(&self) -> bool {
        field(self.dfr0, 40) >= 1
    }
    /// FEAT_TRBE (`ID_AA64DFR0_EL1.TraceBuffer`).
    #[must_use]
    pub const fn has_trbe(&self) -> bool {
        field(self.dfr0, 44) >= 1
    }
}

/// How the guest gets the PMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PmuPolicy {
    /// No PMU on this CPU: nothing to give or to trap.
    Absent,
    /// FEAT_PMUv3p5: every counter is the guest's; `MDCR_EL2.HPMD` stops the event
    /// counters and `MDCR_EL2.HCCD` the cycle counter at EL2. Nothing traps.
    Direct,
    /// FEAT_PMUv3p1 to v3p4: as `Direct` for the event counters (`HPMD`), but the cycle
    /// counter stops at EL2 only while `PMCR_EL0.DP` is 1, so `PMCR_EL0` traps
    /// (`MDCR_EL2.TPMCR`) and every write is made with DP set.
    ForceDp,
    /// PMUv3 (Armv8.0): nothing stops counting at EL2 but the guest's own filters
    /// (`PMEVTYPER<n>_EL0.NSH`, `PMCCFILTR_EL0.NSH`), so the PMU is not given: every PMU
    /// register traps (`MDCR_EL2.TPM`) and reads as zero (`PMCR_EL0.N` = 0: no event
    /// counters), writes are ignored.
    Hidden,
}

/// The EL2 control registers for a guest on this CPU (`docs/cpu-state.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct El2Controls {
    /// Trap bits ORed into the guest's `HCR_EL2` (the stage-2, conduit and interrupt bits
    /// are the machine layer's `HCR_GUEST`).
    pub hcr_traps: u64,
    /// `MDCR_EL2`.
    pub mdcr: u64,
    /// `CPTR_EL2` (E2H = 0).
    pub cptr: u64,
    /// `HSTR_EL2`.
    pub hstr: u64,
    /// `ACTLR_EL2`.
    pub actlr: u64,
    /// The PMU policy `mdcr` implements (for the trapped-register emulation).
    pub pmu: PmuPolicy,
    /// SVE allowed at EL1 (then `ZCR_EL2.LEN` = 0 must be written: 128-bit vectors).
    pub sve: bool,
    /// Branch-predictor hardening of EL2 and the SMCCC workaround answers.
    pub spectre: spectre::Mitigations,
}

/// `HCR_EL2` bits (D19.2.49).
pub mod hcr {
    /// Trap implementation-defined system registers (and, for AArch32, the CP15 IMPDEF
    /// encodings) at EL1.
    pub const TIDCP: u64 = 1 << 20;
    /// Trap `ACTLR_EL1` (implementation-defined controls of the shared CPU).
    pub const TACR: u64 = 1 << 21;
    /// Trap data cache maintenance by set/way.
    pub const TSW: u64 = 1 << 22;
    /// Trap the LORegion registers (FEAT_LOR).
    pub const TLOR: u64 = 1 << 35;
    /// Trap the RAS error record registers (FEAT_RAS).
    pub const TERR: u64 = 1 << 36;
    /// Route synchronous external aborts taken at EL0/EL1 to EL2 (FEAT_RAS).
    pub const TEA: u64 = 1 << 37;
    /// Error-record fault injection allowed at EL1 (FEAT_RASv1p1); kept 0 (trapped).
    pub const FIEN: u64 = 1 << 47;
    /// Allocation-tag access at EL1/EL0 without trapping (FEAT_MTE2).
    pub const ATA: u64 = 1 << 56;
    /// Virtual SError pending.
    pub const VSE: u64 = 1 << 8;
}

/// `MDCR_EL2` bits (D19.3.17).
pub mod mdcr {
    /// Mask of HPMN \[4:0\]: event counters `0..HPMN` belong to EL1/EL0.
    pub const HPMN_MASK: u64 = 0x1f;
    /// Trap `PMCR_EL0` at EL1/EL0.
    pub const TPMCR: u64 = 1 << 5;
    /// Trap every PMU register at EL1/EL0.
    pub const TPM: u64 = 1 << 6;
    /// Route debug exceptions to EL2 (and trap all debug registers).
    pub const TDE: u64 = 1 << 8;
    /// Trap debug register accesses.
    pub const TDA: u64 = 1 << 9;
    /// Trap the OS-lock, double-lock and power-control debug registers.
    pub const TDOSA: u64 = 1 << 10;
    /// Trap the debug ROM address register (`MDRAR_EL1`).
    pub const TDRA: u64 = 1 << 11;
    /// E2PB \[13:12\] = 0b00: the profiling buffer is EL2's, EL1 accesses trap (FEAT_SPE).
    pub const E2PB_MASK: u64 = 0b11 << 12;
    /// Trap the statistical profiling control registers (FEAT_SPE).
    pub const TPMS: u64 = 1 << 14;
    /// No event counting at EL2 (FEAT_PMUv3p1).
    pub const HPMD: u64 = 1 << 17;
    /// Trap `TRFCR_EL1` (FEAT_TRF).
    pub const TTRF: u64 = 1 << 19;
    /// No cycle counting at EL2 (FEAT_PMUv3p5).
    pub const HCCD: u64 = 1 << 23;
    /// E2TB \[25:24\] = 0b00: the trace buffer is EL2's, EL1 accesses trap (FEAT_TRBE).
    pub const E2TB_MASK: u64 = 0b11 << 24;
}

/// `CPTR_EL2` bits with `HCR_EL2.E2H` = 0 (D19.2.30).
pub mod cptr {
    /// RES1 bits \[13\], \[12\] (TSM: SME traps), \[9\], \[8\] (TZ: SVE traps), \[7:0\].
    pub const RES1: u64 = 0x33ff;
    /// Trap SVE (RES1 without FEAT_SVE).
    pub const TZ: u64 = 1 << 8;
    /// Trap trace register accesses.
    pub const TTA: u64 = 1 << 20;
    /// Trap activity monitor accesses (FEAT_AMUv1).
    pub const TAM: u64 = 1 << 30;
}

impl El2Controls {
    /// The controls for a guest on a CPU with ID registers `id` (`docs/cpu-state.md`).
    #[must_use]
    pub fn for_cpu(id: &IdRegs) -> Self {
        let mut hcr_traps = hcr::TIDCP | hcr::TACR | hcr::TSW;
        if id.has_lor() {
            hcr_traps |= hcr::TLOR;
        }
        if id.has_ras() {
            hcr_traps |= hcr::TERR | hcr::TEA;
        }
        if id.has_mte2() {
            hcr_traps |= hcr::ATA;
        }
        // FIEN stays 0: fault injection into the error records traps (FEAT_RASv1p1).
        hcr_traps &= !hcr::FIEN;

        let pmu = match id.pmu_version() {
            0 => PmuPolicy::Absent,
            1 => PmuPolicy::Hidden,
            2..=5 => PmuPolicy::ForceDp,
            _ => PmuPolicy::Direct,
        };
        // Debug: self-hosted breakpoints and watchpoints are the guest's (TDE, TDA and
        // TDOSA clear: they never fire at EL2 while TDE and HCR_EL2.TGE are 0); the debug
        // ROM address names host hardware and traps (TDRA).
        let mut mdcr = mdcr::TDRA;
        mdcr &= !(mdcr::TDE | mdcr::TDA | mdcr::TDOSA);
        // HPMN = N: every event counter is the guest's, none is reserved for EL2 (HPME 0).
        let hpmn = u64::from(id.pmu_counters) & mdcr::HPMN_MASK;
        match pmu {
            PmuPolicy::Absent => {}
            PmuPolicy::Hidden => mdcr |= mdcr::TPM | hpmn,
            PmuPolicy::ForceDp => mdcr |= mdcr::HPMD | mdcr::TPMCR | hpmn,
            PmuPolicy::Direct => mdcr |= mdcr::HPMD | mdcr::HCCD | hpmn,
        }
        // Statistical profiling and the trace buffer stay EL2's (E2PB = E2TB = 0b00, so
        // their registers trap) and EL2 never enables them.
        if id.has_spe() {
            mdcr = (mdcr & !mdcr::E2PB_MASK) | mdcr::TPMS;
        }
        if id.has_trbe() {
            mdcr &= !mdcr::E2TB_MASK;
        }
        if id.has_trf() {
            mdcr |= mdcr::TTRF;
        }

        let mut cptr = cptr::RES1 | cptr::TTA;
        if id.has_amu() {
            cptr |= cptr::TAM;
        }
        let sve = id.has_sve();
        if sve {
            cptr &= !cptr::TZ;
        }
        Self {
            hcr_traps,
            mdcr,
            cptr,
            hstr: 0,
            actlr: 0,
            pmu,
            sve,
            spectre: spectre::Mitigations::for_cpu(
                id.midr,
                id.pfr0,
                id.pfr1,
                id.mmfr1,
                id.firmware_wa1,
            ),
        }
    }
}

pub mod serror;
pub mod spectre;
pub mod sysreg;

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU 7.2's `cortex-a57`: PMUv3 with 6 counters, no RAS, SVE, MTE, LOR, SPE.
    pub(crate) fn a57() -> IdRegs {
        IdRegs {
            pfr0: 0x0000_0000_0000_2222,
            pfr1: 0,
            dfr0: 0x0000_0000_1030_5106,
            mmfr1: 0,
            pmu_counters: 6,
            midr: 0x411f_d070,
            firmware_wa1: false,
        }
    }

    /// A `max`-like CPU: PMUv3p5, RAS, SVE, AMU, MTE3, LOR, SPE, TRF, TRBE.
    pub(crate) fn max() -> IdRegs {
        IdRegs {
            pfr0: (1 << 44) | (1 << 32) | (1 << 28) | 0x1111,
            pfr1: 3 << 8,
            dfr0: (1 << 44) | (1 << 40) | (1 << 32) | (6 << 8) | 0x6,
            mmfr1: 1 << 16,
            pmu_counters: 31,
            midr: 0x000f_0510,
            firmware_wa1: false,
        }
    }

    #[test]
    fn cortex_a57_hides_the_pmu_and_sets_only_architected_bits() {
        let c = El2Controls::for_cpu(&a57());
        assert_eq!(c.pmu, PmuPolicy::Hidden);
        assert_eq!(c.hcr_traps, hcr::TIDCP | hcr::TACR | hcr::TSW);
        // TPM, HPMN = N, TDRA; no HPMD/HCCD (RES0 before PMUv3p1/p5), no SPE/TRF bits.
        assert_eq!(c.mdcr, mdcr::TPM | mdcr::TDRA | 6);
        assert_eq!(c.cptr, 0x33ff | cptr::TTA);
        assert!(!c.sve);
        assert_eq!((c.hstr, c.actlr), (0, 0));
    }

    #[test]
    fn max_gives_the_pmu_and_mte_and_traps_ras_lor_amu_spe_trace() {
        let c = El2Controls::for_cpu(&max());
        assert_eq!(c.pmu, PmuPolicy::Direct);
        assert_eq!(
            c.hcr_traps,
            hcr::TIDCP | hcr::TACR | hcr::TSW | hcr::TLOR | hcr::TERR | hcr::TEA | hcr::ATA
        );
        assert_eq!(c.hcr_traps & hcr::FIEN, 0, "error injection stays trapped");
        assert_eq!(
            c.mdcr,
            mdcr::HPMD | mdcr::HCCD | mdcr::TDRA | mdcr::TPMS | mdcr::TTRF | 31
        );
        assert_eq!(c.mdcr & (mdcr::TPM | mdcr::TPMCR | mdcr::TDE), 0);
        assert_eq!(c.mdcr & (mdcr::E2PB_MASK | mdcr::E2TB_MASK), 0);
        assert_eq!(c.cptr, (0x33ff & !cptr::TZ) | cptr::TTA | cptr::TAM);
        assert!(c.sve);
    }

    #[test]
    fn pmu_policy_follows_the_pmu_version() {
        let with = |v: u64| {
            El2Controls::for_cpu(&IdRegs {
                dfr0: v << 8,
                pmu_counters: 4,
                ..IdRegs::default()
            })
        };
        assert_eq!(with(0).pmu, PmuPolicy::Absent);
        assert_eq!(with(0).mdcr, mdcr::TDRA);
        assert_eq!(
            with(0xf).pmu,
            PmuPolicy::Absent,
            "IMPLEMENTATION DEFINED PMU"
        );
        assert_eq!(with(1).pmu, PmuPolicy::Hidden);
        for v in 4..=5 {
            let c = with(v);
            assert_eq!(c.pmu, PmuPolicy::ForceDp);
            assert_eq!(c.mdcr, mdcr::HPMD | mdcr::TPMCR | mdcr::TDRA | 4);
        }
        for v in 6..=8 {
            assert_eq!(with(v).pmu, PmuPolicy::Direct);
        }
    }

    #[test]
    fn mte_needs_mte2() {
        let mte1 = IdRegs {
            pfr1: 1 << 8,
            ..IdRegs::default()
        };
        assert_eq!(El2Controls::for_cpu(&mte1).hcr_traps & hcr::ATA, 0);
        let mte2 = IdRegs {
            pfr1: 2 << 8,
            ..IdRegs::default()
        };
        assert_ne!(El2Controls::for_cpu(&mte2).hcr_traps & hcr::ATA, 0);
    }
}

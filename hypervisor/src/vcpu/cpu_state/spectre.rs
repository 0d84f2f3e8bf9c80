//! Branch-predictor attacks on EL2 from a guest (Spectre-v2, CVE-2017-5715; Spectre-BHB,
//! CVE-2022-23960) and speculative store bypass (Spectre-v4, CVE-2018-3639): whether this
//! CPU is affected, what EL2 does on every entry from a guest, and what the SMCCC
//! discovery calls answer (Arm DEN 0028, "SMCCC_ARCH_WORKAROUND_1/2/3";
//! `docs/cpu-state.md`, "Branch-predictor hardening").

/// How exposed this CPU is to one attack, with what EL2 does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// The CPU is not affected (an ID register says so, or the model is known safe).
    Unaffected,
    /// Affected, and EL2 runs a mitigation on every entry from a guest.
    Mitigated,
    /// Affected or unknown, and no mitigation is available.
    Vulnerable,
}

/// What this CPU needs and gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mitigations {
    /// Spectre-v2: branch target injection into EL2.
    pub v2: State,
    /// Spectre-BHB: branch history injection into EL2.
    pub bhb: State,
    /// Spectre-v4 (SSB): the guest's own (`PSTATE.SSBS` where the CPU has FEAT_SSBS).
    pub v4: State,
    /// Taken branches EL2 runs at each entry from a guest to overwrite the branch history
    /// (then `DSB NSH; ISB`), 0 for none.
    pub bhb_loop: u8,
    /// EL2 calls the firmware's `SMCCC_ARCH_WORKAROUND_1` at each entry from a guest
    /// (branch predictor invalidation where only EL3 can do it).
    pub firmware_wa1: bool,
}

const ARM: u64 = 0x41;

/// Arm part numbers (`MIDR_EL1.PartNum` \[15:4\] with implementer 0x41).
mod part {
    pub const A35: u64 = 0xd04;
    pub const A53: u64 = 0xd03;
    pub const A55: u64 = 0xd05;
    pub const A57: u64 = 0xd07;
    pub const A72: u64 = 0xd08;
    pub const A73: u64 = 0xd09;
    pub const A75: u64 = 0xd0a;
    pub const A76: u64 = 0xd0b;
    pub const N1: u64 = 0xd0c;
    pub const A77: u64 = 0xd0d;
    pub const V1: u64 = 0xd40;
    pub const A78: u64 = 0xd41;
    pub const A78AE: u64 = 0xd42;
    pub const X1: u64 = 0xd44;
    pub const A710: u64 = 0xd47;
    pub const X2: u64 = 0xd48;
    pub const N2: u64 = 0xd49;
    pub const A78C: u64 = 0xd4b;
}

/// The Arm part number of `midr`, or `None` for another implementer.
fn arm_part(midr: u64) -> Option<u64> {
    ((midr >> 24) & 0xff == ARM).then_some((midr >> 4) & 0xfff)
}

/// In-order Arm cores: no branch target or history speculation to inject into, no
/// speculative store bypass (Arm's Speculative Processor Vulnerability list).
fn in_order(part: u64) -> bool {
    matches!(part, part::A35 | part::A53 | part::A55)
}

/// Branches of the history-overwriting loop for the Arm cores that need it (Arm's
/// Spectre-BHB guidance gives the count per core).
fn bhb_loop_count(part: u64) -> u8 {
    match part {
        part::A57 | part::A72 => 8,
        part::A76 | part::A77 | part::N1 => 24,
        part::A78
        | part::A78AE
        | part::A78C
        | part::X1
        | part::A710
        | part::X2
        | part::N2
        | part::V1 => 32,
        _ => 0,
    }
}

/// Cores whose branch predictor only EL3 can invalidate (through the firmware's
/// `SMCCC_ARCH_WORKAROUND_1`).
fn needs_firmware_bp_invalidation(part: u64) -> bool {
    matches!(part, part::A57 | part::A72 | part::A73 | part::A75)
}

impl Mitigations {
    /// The mitigations for a CPU with `midr`, `ID_AA64PFR0_EL1` = `pfr0` (CSV2
    /// \[59:56\]), `ID_AA64PFR1_EL1` = `pfr1` (SSBS \[7:4\]), `ID_AA64MMFR1_EL1` = `mmfr1`
    /// (ECBHB \[63:60\]), where the firmware implements `SMCCC_ARCH_WORKAROUND_1` if
    /// `firmware_wa1`.
    #[must_use]
    pub fn for_cpu(midr: u64, pfr0: u64, pfr1: u64, mmfr1: u64, firmware_wa1: bool) -> Self {
        let part = arm_part(midr);
        let safe_core = part.is_some_and(in_order);
        let csv2 = (pfr0 >> 56) & 0xf;
        let ecbhb = (mmfr1 >> 60) & 0xf != 0;
        let ssbs = (pfr1 >> 4) & 0xf != 0;

        let mut firmware = false;
        let v2 = if csv2 >= 1 || safe_core {
            State::Unaffected
        } else if part.is_some_and(needs_firmware_bp_invalidation) && firmware_wa1 {
            firmware = true;
            State::Mitigated
        } else {
            State::Vulnerable
        };
        let bhb_loop = part.map_or(0, bhb_loop_count);
        let bhb = if csv2 >= 3 || ecbhb || safe_core {
            State::Unaffected
        } else if bhb_loop > 0 {
            State::Mitigated
        } else {
            State::Vulnerable
        };
        let v4 = if safe_core {
            State::Unaffected
        } else if ssbs {
            // The guest sets PSTATE.SSBS itself; nothing for EL2 or firmware to do.
            State::Mitigated
        } else {
            State::Vulnerable
        };
        Self {
            v2,
            bhb,
            v4,
            bhb_loop: if bhb == State::Mitigated { bhb_loop } else { 0 },
            firmware_wa1: firmware,
        }
    }
}

/// SMCCC return values of the workaround discovery (DEN 0028).
pub mod ret {
    /// The workaround is implemented and this PE needs it.
    pub const SUCCESS: u64 = 0;
    /// `SMCCC_ARCH_WORKAROUND_1/3`: not needed on this PE.
    pub const UNAFFECTED: u64 = 1;
    /// Not implemented (or the PE's state is unknown).
    pub const NOT_SUPPORTED: u64 = -1i64 as u64;
    /// `SMCCC_ARCH_WORKAROUND_2`: not required (PE unaffected or mitigation permanent).
    pub const NOT_REQUIRED: u64 = -2i64 as u64;
}

/// `SMCCC_ARCH_FEATURES(SMCCC_ARCH_WORKAROUND_1)`: the guest calls it to have its branch
/// predictor state made harmless; every HVC enters EL2 through the mitigation.
#[must_use]
pub fn features_wa1(m: &Mitigations) -> u64 {
    match m.v2 {
        State::Unaffected => ret::UNAFFECTED,
        State::Mitigated => ret::SUCCESS,
        State::Vulnerable => ret::NOT_SUPPORTED,
    }
}

/// `SMCCC_ARCH_FEATURES(SMCCC_ARCH_WORKAROUND_2)`: dynamic SSB control is not offered
/// (the guest uses `PSTATE.SSBS` where the CPU has it); in-order cores need nothing.
#[must_use]
pub fn features_wa2(m: &Mitigations) -> u64 {
    match m.v4 {
        State::Unaffected => ret::NOT_REQUIRED,
        State::Mitigated | State::Vulnerable => ret::NOT_SUPPORTED,
    }
}

/// `SMCCC_ARCH_FEATURES(SMCCC_ARCH_WORKAROUND_3)`: covers Spectre-v2 and Spectre-BHB
/// together, so it is offered only when both are unaffected or mitigated at EL2 entry.
#[must_use]
pub fn features_wa3(m: &Mitigations) -> u64 {
    match (m.v2, m.bhb) {
        (State::Unaffected, State::Unaffected) => ret::UNAFFECTED,
        (State::Vulnerable, _) | (_, State::Vulnerable) => ret::NOT_SUPPORTED,
        _ => ret::SUCCESS,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A57: u64 = 0x411f_d070;
    const A53: u64 = 0x410f_d034;
    const A76: u64 = 0x414f_d0b1;
    /// QEMU's `max` (implementer 0) with CSV2 = 2.
    const MAX: u64 = 0x000f_0510;

    #[test]
    fn cortex_a57_needs_firmware_for_v2_and_a_loop_of_8_for_bhb() {
        let with_fw = Mitigations::for_cpu(A57, 0x2222, 0, 0, true);
        assert_eq!(with_fw.v2, State::Mitigated);
        assert!(with_fw.firmware_wa1);
        assert_eq!((with_fw.bhb, with_fw.bhb_loop), (State::Mitigated, 8));
        assert_eq!(features_wa1(&with_fw), ret::SUCCESS);
        assert_eq!(features_wa3(&with_fw), ret::SUCCESS);
        assert_eq!(features_wa2(&with_fw), ret::NOT_SUPPORTED);
        // QEMU has no firmware behind SMC: v2 cannot be mitigated, so neither WA_1 nor
        // WA_3 may be offered (the loop still runs for BHB).
        let qemu = Mitigations::for_cpu(A57, 0x2222, 0, 0, false);
        assert_eq!((qemu.v2, qemu.firmware_wa1), (State::Vulnerable, false));
        assert_eq!(qemu.bhb_loop, 8);
        assert_eq!(features_wa1(&qemu), ret::NOT_SUPPORTED);
        assert_eq!(features_wa3(&qemu), ret::NOT_SUPPORTED);
    }

    #[test]
    fn csv2_makes_v2_unaffected_and_csv2_3_or_ecbhb_bhb() {
        let m = Mitigations::for_cpu(MAX, 2 << 56, 1 << 4, 0, false);
        assert_eq!((m.v2, m.bhb), (State::Unaffected, State::Vulnerable));
        assert_eq!(features_wa1(&m), ret::UNAFFECTED);
        assert_eq!(features_wa3(&m), ret::NOT_SUPPORTED);
        assert_eq!((m.bhb_loop, m.firmware_wa1), (0, false));
        let m = Mitigations::for_cpu(MAX, 3 << 56, 0, 0, false);
        assert_eq!(features_wa3(&m), ret::UNAFFECTED);
        let m = Mitigations::for_cpu(MAX, 1 << 56, 0, 1 << 60, false);
        assert_eq!(features_wa3(&m), ret::UNAFFECTED);
        // A76 has CSV2 but needs the 24-branch loop: WA_3 is then a success.
        let m = Mitigations::for_cpu(A76, 1 << 56, 1 << 4, 0, false);
        assert_eq!(
            (m.v2, m.bhb, m.bhb_loop),
            (State::Unaffected, State::Mitigated, 24)
        );
        assert_eq!(features_wa3(&m), ret::SUCCESS);
        assert_eq!(features_wa2(&m), ret::NOT_SUPPORTED, "the guest uses SSBS");
    }

    #[test]
    fn in_order_cores_need_nothing() {
        let m = Mitigations::for_cpu(A53, 0, 0, 0, false);
        assert_eq!(
            (m.v2, m.bhb, m.v4),
            (State::Unaffected, State::Unaffected, State::Unaffected)
        );
        assert_eq!(features_wa1(&m), ret::UNAFFECTED);
        assert_eq!(features_wa2(&m), ret::NOT_REQUIRED);
        assert_eq!(features_wa3(&m), ret::UNAFFECTED);
        assert_eq!((m.bhb_loop, m.firmware_wa1), (0, false));
    }

    #[test]
    fn other_implementers_are_not_matched_by_part_number() {
        // Part 0xd07 of implementer 0x51 is not a Cortex-A57.
        let m = Mitigations::for_cpu(0x510f_d070, 0, 0, 0, true);
        assert_eq!(
            (m.v2, m.bhb, m.bhb_loop),
            (State::Vulnerable, State::Vulnerable, 0)
        );
        assert!(!m.firmware_wa1);
    }
}

//! What EL2 does with a system-register access that [`super::El2Controls`] made trap
//! (EC 0x18, Arm ARM D24.2.40 "ISS encoding for an exception from MSR, MRS, or System
//! instruction execution").

use boot::esr::SysRegAccess;

use super::{El2Controls, PmuPolicy};

/// `PMCR_EL0.DP` (bit 5): the cycle counter stops where event counting is prohibited.
pub const PMCR_DP: u64 = 1 << 5;

/// The emulation of one trapped access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Reads as zero, writes are ignored: a register the guest may see but not use.
    RazWi,
    /// `PMCR_EL0` read: the real value.
    PmcrRead,
    /// `PMCR_EL0` write: the guest's value with DP set.
    PmcrWrite,
    /// `DC ISW`/`CSW`/`CISW`: done by VA over the VM's RAM when `sweep_start` (the
    /// set/way operand is 0 at some level: every full sweep of a level has it once).
    SetWay {
        /// The operand is set 0, way 0 (of any level).
        sweep_start: bool,
    },
    /// Not an access the controls trap on purpose: handled as an unknown exit.
    Unhandled,
}

/// Whether `a` is the register `(op0, op1, crn, crm, op2)`.
fn is(a: &SysRegAccess, op0: u8, op1: u8, crn: u8, crm: u8, op2: u8) -> bool {
    (a.op0, a.op1, a.crn, a.crm, a.op2) == (op0, op1, crn, crm, op2)
}

/// Decides how to emulate the trapped access `a` (its operand is `value` for a write or
/// a DC instruction) under the controls `c`.
#[must_use]
pub fn decide(a: &SysRegAccess, value: u64, c: &El2Controls) -> Action {
    use super::{hcr, mdcr};
    // DC ISW (CRm 6), DC CSW (10), DC CISW (14): op0 1, op1 0, CRn 7, op2 2.
    if a.op0 == 1 && a.op1 == 0 && a.crn == 7 && matches!(a.crm, 6 | 10 | 14) && a.op2 == 2 {
        if c.hcr_traps & hcr::TSW == 0 {
            return Action::Unhandled;
        }
        // Operand: SetWay [31:4], Level [3:1].
        return Action::SetWay {
            sweep_start: (value >> 4) & 0x0fff_ffff == 0,
        };
    }
    if a.op0 == 3 && a.op1 == 0 && a.crn == 1 && a.crm == 0 && a.op2 == 1 {
        // ACTLR_EL1 (TACR): its bits are IMPLEMENTATION DEFINED controls of the CPU.
        return if c.hcr_traps & hcr::TACR != 0 {
            Action::RazWi
        } else {
            Action::Unhandled
        };
    }
    if c.hcr_traps & hcr::TERR != 0 && a.op0 == 3 && a.op1 == 0 && a.crn == 5 {
        // ERRIDR_EL1 (CRm 3, op2 0) reads 0: no error records; ERRSELR_EL1 and the ERX*
        // record registers (CRm 3-5) then have nothing to select.
        if matches!(a.crm, 3..=5) {
            return Action::RazWi;
        }
    }
    if c.hcr_traps & hcr::TLOR != 0
        && a.op0 == 3
        && a.op1 == 0
        && a.crn == 10
        && a.crm == 4
        && matches!(a.op2, 0..=3 | 7)
    {
        // LORSA/LOREA/LORN/LORC_EL1 and LORID_EL1 = 0: no LORegions.
        return Action::RazWi;
    }
    if c.mdcr & mdcr::TDRA != 0 && is(a, 2, 0, 1, 0, 0) {
        // MDRAR_EL1 = 0: "ROM table address not valid".
        return Action::RazWi;
    }
    let pmu_register = a.op0 == 3
        && ((a.op1 == 3 && a.crn == 9 && matches!(a.crm, 12..=14))
            || (a.op1 == 0 && a.crn == 9 && a.crm == 14)
            || (a.op1 == 3 && a.crn == 14 && a.crm >= 8));
    match c.pmu {
        PmuPolicy::Hidden if pmu_register => Action::RazWi,
        PmuPolicy::ForceDp if is(a, 3, 3, 9, 12, 0) => {
            if a.read {
                Action::PmcrRead
            } else {
                Action::PmcrWrite
            }
        }
        _ => Action::Unhandled,
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{a57, max};
    use super::super::{El2Controls, IdRegs};
    use super::*;

    fn acc(op0: u8, op1: u8, crn: u8, crm: u8, op2: u8, read: bool) -> SysRegAccess {
        SysRegAccess {
            op0,
            op1,
            crn,
            crm,
            op2,
            rt: 1,
            read,
        }
    }

    #[test]
    fn actlr_ras_lor_and_rom_table_read_as_zero() {
        let c = El2Controls::for_cpu(&max());
        for (op0, op1, crn, crm, op2) in [
            (3, 0, 1, 0, 1),  // ACTLR_EL1
            (3, 0, 5, 3, 0),  // ERRIDR_EL1
            (3, 0, 5, 3, 1),  // ERRSELR_EL1
            (3, 0, 5, 4, 2),  // ERXSTATUS_EL1
            (3, 0, 5, 4, 5),  // ERXPFGCTL_EL1 (fault injection)
            (3, 0, 5, 5, 0),  // ERXMISC0_EL1
            (3, 0, 10, 4, 0), // LORSA_EL1
            (3, 0, 10, 4, 7), // LORID_EL1
            (2, 0, 1, 0, 0),  // MDRAR_EL1
        ] {
            for read in [true, false] {
                assert_eq!(
                    decide(&acc(op0, op1, crn, crm, op2, read), 0, &c),
                    Action::RazWi,
                    "S{op0}_{op1}_C{crn}_C{crm}_{op2}"
                );
            }
        }
        // Without FEAT_RAS/LOR the registers do not trap: such an exit is unknown.
        let a57 = El2Controls::for_cpu(&a57());
        assert_eq!(
            decide(&acc(3, 0, 5, 3, 0, true), 0, &a57),
            Action::Unhandled
        );
        assert_eq!(
            decide(&acc(3, 0, 10, 4, 7, true), 0, &a57),
            Action::Unhandled
        );
        // IMPLEMENTATION DEFINED registers (TIDCP) are not emulated.
        assert_eq!(decide(&acc(3, 1, 15, 2, 0, true), 0, &c), Action::Unhandled);
    }

    #[test]
    fn a_hidden_pmu_reads_as_zero_everywhere() {
        let c = El2Controls::for_cpu(&a57());
        for (op1, crn, crm, op2) in [
            (3, 9, 12, 0),  // PMCR_EL0
            (3, 9, 13, 0),  // PMCCNTR_EL0
            (3, 9, 14, 0),  // PMUSERENR_EL0
            (3, 14, 15, 7), // PMCCFILTR_EL0
            (3, 14, 12, 0), // PMEVTYPER0_EL0
            (3, 14, 8, 0),  // PMEVCNTR0_EL0
            (0, 9, 14, 1),  // PMINTENSET_EL1
        ] {
            assert_eq!(
                decide(&acc(3, op1, crn, crm, op2, false), 0, &c),
                Action::RazWi
            );
        }
        // A given PMU is not emulated at all.
        let max = El2Controls::for_cpu(&max());
        assert_eq!(
            decide(&acc(3, 3, 9, 12, 0, true), 0, &max),
            Action::Unhandled
        );
    }

    #[test]
    fn pmcr_is_emulated_where_dp_must_be_forced() {
        let c = El2Controls::for_cpu(&IdRegs {
            dfr0: 4 << 8,
            pmu_counters: 6,
            ..IdRegs::default()
        });
        assert_eq!(decide(&acc(3, 3, 9, 12, 0, true), 0, &c), Action::PmcrRead);
        assert_eq!(
            decide(&acc(3, 3, 9, 12, 0, false), 0, &c),
            Action::PmcrWrite
        );
        assert_eq!(decide(&acc(3, 3, 9, 13, 0, true), 0, &c), Action::Unhandled);
    }

    #[test]
    fn set_way_sweeps_start_at_set_0_way_0() {
        let c = El2Controls::for_cpu(&a57());
        for crm in [6, 10, 14] {
            let a = acc(1, 0, 7, crm, 2, false);
            assert_eq!(
                decide(&a, 0b010, &c),
                Action::SetWay { sweep_start: true },
                "level 2, set 0, way 0"
            );
            assert_eq!(
                decide(&a, (3 << 30) | (5 << 6), &c),
                Action::SetWay { sweep_start: false }
            );
        }
        // DC CVAC (by VA) does not trap: not a set/way operation.
        assert_eq!(
            decide(&acc(1, 3, 7, 10, 1, false), 0, &c),
            Action::Unhandled
        );
    }
}

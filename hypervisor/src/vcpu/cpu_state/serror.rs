//! What happens to an SError taken from a guest (`ESR_EL2` EC 0x2F), by its severity and
//! the VM's abort policy (`docs/cpu-state.md`, "SErrors").
//!
//! ISS (Arm ARM D24.2.40, "ISS encoding for an SError interrupt"): IDS \[24\] (the rest is
//! IMPLEMENTATION DEFINED when set), AET \[12:10\] (error type, FEAT_RAS), EA \[9\], DFSC
//! \[5:0\] (0b010001: asynchronous SError; 0: uncategorized).

use crate::config::AbortPolicy;

/// `AET` values (severity of a RAS error).
pub mod aet {
    /// Uncontainable: it may have corrupted any state, EL2's or another VM's included.
    pub const UC: u64 = 0b000;
    /// Unrecoverable: contained, but the interrupted context cannot continue.
    pub const UEU: u64 = 0b001;
    /// Restartable: not consumed yet.
    pub const UEO: u64 = 0b010;
    /// Recoverable by software.
    pub const UER: u64 = 0b011;
    /// Corrected.
    pub const CE: u64 = 0b110;
}

const IDS: u64 = 1 << 24;
const DFSC_ASYNC: u64 = 0b01_0001;

/// What EL2 does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// A corrected error: logged, the guest goes on.
    Resume,
    /// A virtual SError for the guest (`HCR_EL2.VSE`), with this `VSESR_EL2` syndrome
    /// where the CPU has FEAT_RAS (`None` without it: the syndrome is then
    /// IMPLEMENTATION DEFINED).
    Inject {
        /// `VSESR_EL2`.
        vsesr: Option<u64>,
    },
    /// The VM stops, whatever its policy.
    StopVm,
    /// The error is not contained to this VM: the hypervisor stops the whole run.
    Fatal,
}

/// The error severity of SError syndrome `iss`, or `None` when the syndrome does not tell
/// (no FEAT_RAS, an IMPLEMENTATION DEFINED syndrome, or an uncategorized one).
#[must_use]
pub fn severity(iss: u64, has_ras: bool) -> Option<u64> {
    (has_ras && iss & IDS == 0 && iss & 0x3f == DFSC_ASYNC).then_some((iss >> 10) & 0b111)
}

/// Decides what to do with an SError of syndrome `iss` taken while a vCPU of a VM with
/// `policy` ran.
///
/// - corrected (CE): resume;
/// - restartable or recoverable (UEO, UER), or of unknown severity: the VM's abort policy
///   (inject a virtual SError with the same severity, or stop the VM);
/// - unrecoverable (UEU): stop the VM (it cannot go on from where it was);
/// - uncontainable (UC) or a reserved type: fatal for the machine.
#[must_use]
pub fn decide(iss: u64, has_ras: bool, policy: AbortPolicy) -> Action {
    let by_policy = |vsesr: Option<u64>| match policy {
        AbortPolicy::Stop => Action::StopVm,
        AbortPolicy::Inject => Action::Inject { vsesr },
    };
    match severity(iss, has_ras) {
        // No severity: the guest gets an uncategorized error, as the hardware reported.
        None => by_policy(has_ras.then_some(0)),
        Some(aet::CE) => Action::Resume,
        Some(t @ (aet::UEO | aet::UER)) => by_policy(Some((t << 10) | DFSC_ASYNC)),
        Some(aet::UEU) => Action::StopVm,
        // UC, or a reserved error type: treated as uncontainable.
        Some(aet::UC | _) => Action::Fatal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ras(t: u64) -> u64 {
        (t << 10) | (1 << 9) | DFSC_ASYNC
    }

    #[test]
    fn severity_needs_a_ras_syndrome() {
        assert_eq!(severity(ras(aet::UER), true), Some(aet::UER));
        assert_eq!(severity(ras(aet::UER), false), None, "no FEAT_RAS");
        assert_eq!(severity(ras(aet::UER) | IDS, true), None, "IMPDEF syndrome");
        assert_eq!(severity(aet::UER << 10, true), None, "uncategorized");
    }

    #[test]
    fn decisions_by_severity_and_policy() {
        use AbortPolicy::{Inject, Stop};
        assert_eq!(decide(ras(aet::CE), true, Stop), Action::Resume);
        assert_eq!(decide(ras(aet::CE), true, Inject), Action::Resume);
        for t in [aet::UEO, aet::UER] {
            assert_eq!(decide(ras(t), true, Stop), Action::StopVm);
            assert_eq!(
                decide(ras(t), true, Inject),
                Action::Inject {
                    vsesr: Some((t << 10) | DFSC_ASYNC)
                }
            );
        }
        assert_eq!(decide(ras(aet::UEU), true, Inject), Action::StopVm);
        assert_eq!(decide(ras(aet::UC), true, Inject), Action::Fatal);
        assert_eq!(decide(ras(0b111), true, Stop), Action::Fatal, "reserved");
        // Unknown severity: the policy, with an uncategorized syndrome where VSESR exists.
        assert_eq!(decide(IDS | 0x1234, true, Stop), Action::StopVm);
        assert_eq!(
            decide(IDS | 0x1234, true, Inject),
            Action::Inject { vsesr: Some(0) }
        );
        assert_eq!(decide(0, false, Inject), Action::Inject { vsesr: None });
    }
}

//! PSCI power state of a VM's vCPUs (the guest-facing emulation, not the firmware calls
//! the hypervisor itself makes).
//!
//! Each vCPU is `Off`, `OnPending` (a `CPU_ON` was accepted, its physical CPU has not
//! picked it up yet) or `On`. To the guest a pending vCPU is already on, as KVM answers:
//! of several `CPU_ON` calls racing for one target exactly one gets `SUCCESS` and the
//! others `ALREADY_ON`, and `AFFINITY_INFO` says `ON` from the successful call on (a
//! guest that polls for `ON` after its `CPU_ON`, like Linux's CPU bring-up, never sees
//! `ON_PENDING`, which the PSCI specification allows but does not require). vCPU *i* has virtual MPIDR Aff0 = *i* (all other affinity
//! fields 0), which is what `VMPIDR_EL2` is set to and what the guest DTB names.
//! Return values follow the PSCI specification (Arm DEN 0022) and use the `smccc` crate's
//! error codes.

use core::fmt;

use crate::mem::Ipa;
use alloc::vec;
use alloc::vec::Vec;
use smccc::psci::error as psci_err;

/// Power state of one vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerState {
    /// Not running; may be started with `CPU_ON`.
    Off,
    /// Started by `CPU_ON`; its physical CPU will enter it at `entry` with x0 = `context`.
    OnPending {
        /// Entry point IPA.
        entry: Ipa,
        /// Value for x0.
        context: u64,
    },
    /// Running (or runnable) on its physical CPU.
    On,
}

/// A PSCI error, convertible to the value returned in x0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PsciError {
    /// `INVALID_PARAMETERS` (-2): e.g. an MPIDR that names no vCPU of this VM.
    InvalidParameters,
    /// `ALREADY_ON` (-4): the target is on, or its start is pending.
    AlreadyOn,
    /// `INVALID_ADDRESS` (-9): entry point outside the VM's memory, or not 4-byte
    /// aligned (an AArch64 instruction address).
    InvalidAddress,
    /// `DENIED` (-3): e.g. `CPU_OFF` of a vCPU that is not on.
    Denied,
}

impl core::error::Error for PsciError {}

impl fmt::Display for PsciError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::InvalidParameters => "INVALID_PARAMETERS",
            Self::AlreadyOn => "ALREADY_ON",
            Self::InvalidAddress => "INVALID_ADDRESS",
            Self::Denied => "DENIED",
        })
    }
}

impl PsciError {
    /// The PSCI return code.
    #[must_use]
    pub const fn code(self) -> i32 {
        match self {
            Self::InvalidParameters => psci_err::INVALID_PARAMETERS,
            Self::AlreadyOn => psci_err::ALREADY_ON,
            Self::InvalidAddress => psci_err::INVALID_ADDRESS,
            Self::Denied => psci_err::DENIED,
        }
    }
}

/// `AFFINITY_INFO` results (PSCI 5.1.6). `ON_PENDING` (2) is never reported: a vCPU
/// whose start is pending is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AffinityInfo {
    /// 0: at least one core of the affinity instance is on.
    On = 0,
    /// 1: off.
    Off = 1,
}

/// The vCPU power states of one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PsciVm {
    vcpus: Vec<PowerState>,
}

impl PsciVm {
    /// `count` vCPUs, all off.
    #[must_use]
    pub fn new(count: usize) -> Self {
        Self {
            vcpus: vec![PowerState::Off; count],
        }
    }

    /// State of vCPU `index`, `None` if there is no such vCPU.
    #[must_use]
    pub fn state(&self, index: usize) -> Option<PowerState> {
        self.vcpus.get(index).copied()
    }

    /// Number of vCPUs that are not `Off`.
    #[cfg(test)]
    #[must_use]
    pub fn running(&self) -> usize {
        self.vcpus.iter().filter(|s| **s != PowerState::Off).count()
    }

    /// Maps a guest MPIDR to a vCPU index: Aff0 only, Aff1-3 must be zero.
    #[must_use]
    pub fn vcpu_of_mpidr(&self, mpidr: u64) -> Option<usize> {
        // The affinity fields only; other bits ignored.
        let aff = mpidr & super::vgic::AFFINITY_MASK;
        if aff > 0xff {
            return None;
        }
        let index = usize::try_from(aff).ok()?;
        (index < self.vcpus.len()).then_some(index)
    }

    /// Boot-time start of a vCPU (the VM's first vCPU at its description's entry point).
    /// Same rules as [`Self::cpu_on`] without the address check.
    ///
    /// # Errors
    ///
    /// As [`Self::cpu_on`].
    pub fn power_on(&mut self, index: usize, entry: Ipa, context: u64) -> Result<(), PsciError> {
        let state = self
            .vcpus
            .get_mut(index)
            .ok_or(PsciError::InvalidParameters)?;
        match *state {
            PowerState::On | PowerState::OnPending { .. } => Err(PsciError::AlreadyOn),
            PowerState::Off => {
                *state = PowerState::OnPending { entry, context };
                Ok(())
            }
        }
    }

    /// `CPU_ON(target_mpidr, entry, context)`; `entry_ok` says whether the entry IPA lies
    /// in the VM's memory.
    ///
    /// # Errors
    ///
    /// `INVALID_PARAMETERS` for an unknown MPIDR, `ALREADY_ON` when the target is on or
    /// its start pending, `INVALID_ADDRESS` for an entry outside the VM's memory or not
    /// 4-byte aligned. The state is unchanged on error.
    pub fn cpu_on(
        &mut self,
        target_mpidr: u64,
        entry: Ipa,
        context: u64,
        entry_ok: bool,
    ) -> Result<(), PsciError> {
        let index = self
            .vcpu_of_mpidr(target_mpidr)
            .ok_or(PsciError::InvalidParameters)?;
        if self.vcpus.get(index) != Some(&PowerState::Off) {
            return Err(PsciError::AlreadyOn);
        }
        // The target starts in AArch64 (HCR_EL2.RW): its PC must be 4-byte aligned, or
        // its first fetch takes a PC alignment fault (Arm ARM D1.3.5).
        if !entry_ok || !entry.is_aligned(4) {
            return Err(PsciError::InvalidAddress);
        }
        self.power_on(index, entry, context)
    }

    /// `CPU_OFF` by vCPU `index` (on success the call does not return to the guest).
    ///
    /// # Errors
    ///
    /// `DENIED` when that vCPU is not on.
    pub fn cpu_off(&mut self, index: usize) -> Result<(), PsciError> {
        match self.vcpus.get_mut(index) {
            Some(state @ PowerState::On) => {
                *state = PowerState::Off;
                Ok(())
            }
            _ => Err(PsciError::Denied),
        }
    }

    /// `AFFINITY_INFO(target_mpidr, lowest_level)`; only level 0 (a single vCPU) exists.
    ///
    /// # Errors
    ///
    /// `INVALID_PARAMETERS` for an unknown MPIDR or a level other than 0.
    pub fn affinity_info(&self, target_mpidr: u64, level: u64) -> Result<AffinityInfo, PsciError> {
        if level != 0 {
            return Err(PsciError::InvalidParameters);
        }
        let index = self
            .vcpu_of_mpidr(target_mpidr)
            .ok_or(PsciError::InvalidParameters)?;
        Ok(match self.vcpus.get(index) {
            Some(PowerState::On | PowerState::OnPending { .. }) => AffinityInfo::On,
            _ => AffinityInfo::Off,
        })
    }

    /// Called by vCPU `index`'s physical CPU: if a start is pending, marks it `On` and
    /// returns `(entry, context)`.
    pub fn take_pending(&mut self, index: usize) -> Option<(Ipa, u64)> {
        let state = self.vcpus.get_mut(index)?;
        if let PowerState::OnPending { entry, context } = *state {
            *state = PowerState::On;
            Some((entry, context))
        } else {
            None
        }
    }

    /// Turns every vCPU off (VM power-off, reset or stop).
    pub fn all_off(&mut self) {
        self.vcpus.iter_mut().for_each(|s| *s = PowerState::Off);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_on_off_cycle() {
        let mut p = PsciVm::new(2);
        p.power_on(0, Ipa::new(0x4000_0000), 7).expect("boot vcpu");
        assert_eq!(p.take_pending(0), Some((Ipa::new(0x4000_0000), 7)));
        assert_eq!(p.state(0), Some(PowerState::On));
        assert_eq!(p.affinity_info(1, 0), Ok(AffinityInfo::Off));
        p.cpu_on(1, Ipa::new(0x4000_1000), 42, true)
            .expect("cpu_on");
        assert_eq!(
            p.affinity_info(1, 0),
            Ok(AffinityInfo::On),
            "on from the successful CPU_ON on"
        );
        assert_eq!(
            p.cpu_on(1, Ipa::new(0x4000_1000), 42, true),
            Err(PsciError::AlreadyOn)
        );
        assert_eq!(p.take_pending(1), Some((Ipa::new(0x4000_1000), 42)));
        assert_eq!(p.take_pending(1), None);
        assert_eq!(p.affinity_info(1, 0), Ok(AffinityInfo::On));
        assert_eq!(
            p.cpu_on(1, Ipa::new(0x4000_1000), 42, true),
            Err(PsciError::AlreadyOn)
        );
        assert_eq!(p.running(), 2);
        p.cpu_off(1).expect("cpu_off");
        assert_eq!(p.cpu_off(1), Err(PsciError::Denied));
        assert_eq!(p.affinity_info(1, 0), Ok(AffinityInfo::Off));
        assert_eq!(p.running(), 1);
    }

    #[test]
    fn bad_parameters_change_nothing() {
        let mut p = PsciVm::new(2);
        let before = p.clone();
        assert_eq!(
            p.cpu_on(2, Ipa::new(0), 0, true),
            Err(PsciError::InvalidParameters)
        );
        assert_eq!(
            p.cpu_on(0x100, Ipa::new(0), 0, true),
            Err(PsciError::InvalidParameters)
        );
        assert_eq!(
            p.cpu_on(0x1_0000_0000, Ipa::new(0), 0, true),
            Err(PsciError::InvalidParameters)
        );
        assert_eq!(
            p.cpu_on(1, Ipa::new(0xdead), 0, false),
            Err(PsciError::InvalidAddress)
        );
        for unaligned in [0x4000_0001, 0x4000_0002, 0x4000_0003] {
            assert_eq!(
                p.cpu_on(1, Ipa::new(unaligned), 0, true),
                Err(PsciError::InvalidAddress),
                "entry {unaligned:#x}"
            );
        }
        assert_eq!(p.affinity_info(0, 1), Err(PsciError::InvalidParameters));
        assert_eq!(p.cpu_off(5), Err(PsciError::Denied));
        assert_eq!(p, before);
        // MPIDR bit 31 (RES1) and MT/U bits are ignored.
        assert_eq!(p.vcpu_of_mpidr(0x8000_0001), Some(1));
    }

    #[test]
    fn error_codes() {
        assert_eq!(PsciError::InvalidParameters.code(), -2);
        assert_eq!(PsciError::Denied.code(), -3);
        assert_eq!(PsciError::AlreadyOn.code(), -4);
        assert_eq!(PsciError::InvalidAddress.code(), -9);
    }

    #[test]
    fn all_off() {
        let mut p = PsciVm::new(3);
        p.power_on(0, Ipa::new(1), 2).expect("on");
        p.power_on(2, Ipa::new(1), 2).expect("on");
        p.all_off();
        assert_eq!(p.running(), 0);
    }

    /// Several vCPUs race `CPU_ON` to one target, in every order the lock can serialise
    /// them: exactly one succeeds, every other gets `ALREADY_ON`, and from the success on
    /// `AFFINITY_INFO` says `ON`, whether or not the target's CPU took its start yet.
    #[test]
    fn racing_cpu_on_one_success_others_already_on() {
        for taken_after in 0..5 {
            let mut p = PsciVm::new(4);
            let mut results = Vec::new();
            for caller in 0..5 {
                if caller == taken_after {
                    p.take_pending(3);
                }
                results.push(p.cpu_on(3, Ipa::new(0x4000_0000 + caller * 4), caller, true));
                assert_eq!(p.affinity_info(3, 0), Ok(AffinityInfo::On));
            }
            assert_eq!(results[0], Ok(()));
            assert!(
                results[1..].iter().all(|r| *r == Err(PsciError::AlreadyOn)),
                "{results:?}"
            );
        }
    }
}

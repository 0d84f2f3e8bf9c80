//! What a physical CPU does when it runs no guest code: whether it has a vCPU to start,
//! which parked CPUs a guest's `CPU_ON` made runnable, when a vCPU starts, and when the
//! run is over. The machine's run loop (`crate::machine::run`) asks and acts (parks,
//! wakes, enters the guest, powers off); the decisions are made and tested here.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::mem::{Ipa, PhysAddr};
use crate::vm::psci::PowerState;
use crate::vm::{Backend, Leave, Vm, VmError, VmManager, VmStatus};

fn start_pending<S>(vm: &Vm<S>, index: usize) -> bool {
    matches!(
        vm.state.lock().psci.state(index),
        Some(PowerState::OnPending { .. })
    )
}

/// Whether the physical CPU with MPIDR `cpu` has a vCPU waiting to start: its VM
/// exists, runs, and has a start pending for it.
pub fn has_work<B: Backend>(manager: &VmManager<B>, cpu: u32) -> bool {
    manager
        .vm_on_cpu(cpu)
        .is_some_and(|(vm, index)| vm.status() == VmStatus::Running && start_pending(&vm, index))
}

/// Whether the physical CPU with MPIDR `cpu`, parked, may help scrub or load guest RAM
/// at `pa` (`crate::mem::bulk`): if no VM uses it, or its VM owns that RAM. One VM's
/// reset thus never takes a CPU of another VM.
pub fn may_help<B: Backend>(manager: &VmManager<B>, cpu: u32, pa: PhysAddr) -> bool {
    manager.vm_on_cpu(cpu).is_none_or(|(vm, _)| {
        vm.desc
            .memory
            .iter()
            .any(|r| r.pa_range().contains_addr(pa))
    })
}

/// The physical CPUs (MPIDRs, as the description names them) of `vm`'s vCPUs that have a
/// start pending, e.g. after a `CPU_ON` or a reset: the CPUs to wake.
pub fn pending_starts<S>(vm: &Vm<S>) -> impl Iterator<Item = u32> + '_ {
    vm.desc
        .cpus
        .iter()
        .enumerate()
        .filter(|(index, _)| start_pending(vm, *index))
        .map(|(_, cpu)| *cpu)
}

/// What a CPU does with a vCPU that is not running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// Enter the guest at `entry` with x0 = `context`: the start is taken and the vCPU
    /// counted loaded (the CPU must call [`vcpu_left`] once it has left the guest).
    Enter {
        /// Entry IPA.
        entry: Ipa,
        /// x0.
        context: u64,
    },
    /// Nothing yet: wait for a `CPU_ON`, or for a reset to finish.
    Wait,
    /// The VM is powered off or stopped: the vCPU never runs again.
    Done,
}

/// Whether vCPU `index` of `vm` starts now. Decided under the VM's lock in one step with
/// counting the vCPU loaded ([`crate::vm::VmState::take_start`]): a VM powered off, reset
/// or destroyed by another CPU a moment before gives `Done` or `Wait`, never `Enter`.
///
/// A CPU that waits calls this in a loop: it only takes the lock when it is free and
/// otherwise answers `Wait` (the caller asks again). Queueing on the fair lock would let
/// a waiting CPU that is itself descheduled (a vCPU thread of an oversubscribed QEMU host)
/// hold up the running vCPUs of the VM behind its ticket.
pub fn next_start<S>(vm: &Vm<S>, index: usize) -> Start {
    let Some(mut st) = vm.state.try_lock() else {
        return Start::Wait;
    };
    if st.status.finished() {
        return Start::Done;
    }
    match st.take_start(index) {
        Some((entry, context)) => Start::Enter { entry, context },
        None => Start::Wait,
    }
}

/// Whether a parked CPU of vCPU `index` of `vm` has something to do: a start to take,
/// or its VM finished (it stops for good).
pub fn should_wake<S>(vm: &Vm<S>, index: usize) -> bool {
    let st = vm.state.lock();
    st.status.finished()
        || (st.status == VmStatus::Running
            && matches!(st.psci.state(index), Some(PowerState::OnPending { .. })))
}

/// Called once a vCPU of `vm` stopped and its CPU left the guest: if it was the last
/// loaded vCPU of a finished VM, destroys it; of a VM whose reset was asked, resets it
/// (vCPU 0 then has a start pending: the caller wakes [`pending_starts`]). Returns the
/// outcome of the run if it is over (`Some(true)` when no VM failed, see
/// [`VmManager::outcome`]).
pub fn vcpu_left<B: Backend>(manager: &VmManager<B>, vm: &Vm<B::S2>) -> Option<bool> {
    let result = match vm.leave() {
        Leave::Nothing => Ok(()),
        Leave::Destroy => manager.destroy(vm.id),
        Leave::Reset => manager.reset(vm.id),
    };
    match result {
        // Another CPU destroyed it first, or is resetting or destroying it.
        Ok(()) | Err(VmError::NoSuchVm(_) | VmError::Busy(_)) => {}
        Err(e) => log::error!("VM {}: {e}", vm.desc.name),
    }
    manager.outcome()
}

/// Several CPUs may see the last VM finish: the first to [`claim`](RunEnd::claim) the end
/// reports and ends the run.
#[derive(Debug, Default)]
pub struct RunEnd(AtomicBool);

impl RunEnd {
    /// Nobody has ended the run.
    #[must_use]
    pub const fn new() -> Self {
        Self(AtomicBool::new(false))
    }

    /// True for the first caller only.
    pub fn claim(&self) -> bool {
        !self.0.swap(true, Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vcpu::Next;
    use crate::vm::tests::{desc, manager};
    use alloc::sync::Arc;

    #[test]
    fn a_cpu_has_work_while_its_vcpu_waits_to_start() {
        let m = manager();
        assert!(!has_work(&m, 1), "no VM yet");
        let vm = m.create(desc(0x5000_0000, 1)).expect("vm");
        assert!(has_work(&m, 1), "vCPU 0 starts after create");
        assert!(!has_work(&m, 2), "no vCPU on CPU 2");
        assert_eq!(
            next_start(&vm, 0),
            Start::Enter {
                entry: Ipa::new(0x4000_0000),
                context: 0
            }
        );
        assert!(!has_work(&m, 1), "the start was taken");
        assert_eq!(next_start(&vm, 0), Start::Wait);
        vm.state.lock().psci.cpu_off(0).expect("off");
        vm.state
            .lock()
            .psci
            .power_on(0, Ipa::new(0x4000_1000), 7)
            .expect("on");
        vm.state.lock().status = VmStatus::Failed;
        assert!(!has_work(&m, 1), "a VM that does not run gives no work");
        assert_eq!(next_start(&vm, 0), Start::Done);
    }

    #[test]
    fn cpus_to_wake_are_those_with_a_start_pending() {
        let m = manager();
        let mut d = desc(0x5000_0000, 1);
        d.cpus = vec![1, 3, 2];
        let vm = m.create(d).expect("vm");
        assert_eq!(pending_starts(&vm).collect::<Vec<_>>(), [1]);
        vm.state.lock().psci.take_pending(0);
        assert_eq!(pending_starts(&vm).count(), 0);
        // vCPU 0 starts vCPU 2 (MPIDR Aff0 = 2), which runs on physical CPU 2.
        vm.state
            .lock()
            .psci
            .cpu_on(2, Ipa::new(0x4000_2000), 0, true)
            .expect("CPU_ON");
        assert_eq!(pending_starts(&vm).collect::<Vec<_>>(), [2]);
    }

    #[test]
    fn the_last_vcpu_out_destroys_the_vm_and_ends_the_run() {
        let m = manager();
        let a = m.create(desc(0x5000_0000, 1)).expect("a");
        let b = m.create(desc(0x5010_0000, 2)).expect("b");
        a.enter();
        b.enter();
        assert_eq!(vcpu_left(&m, &a), None, "a still runs");
        assert_eq!(m.vms().len(), 2);
        a.enter();
        a.state.lock().status = VmStatus::Off;
        assert_eq!(vcpu_left(&m, &a), None, "b still runs");
        assert_eq!(m.vms().len(), 1, "a is destroyed");
        b.state.lock().status = VmStatus::Failed;
        assert_eq!(vcpu_left(&m, &b), Some(false), "b failed");
        assert!(m.vms().is_empty());
        // A CPU that comes late to a VM another CPU destroyed.
        a.enter();
        assert_eq!(vcpu_left(&m, &a), Some(false));
    }

    #[test]
    fn only_idle_cpus_and_the_owners_cpus_help_with_its_ram() {
        let m = manager();
        let a = m.create(desc(0x5000_0000, 1)).expect("a");
        let _b = m.create(desc(0x5010_0000, 2)).expect("b");
        let (in_a, in_b) = (PhysAddr::new(0x5000_1000), PhysAddr::new(0x5010_0000));
        assert!(may_help(&m, 1, in_a), "A's own CPU");
        assert!(!may_help(&m, 2, in_a), "B's CPU never works for A");
        assert!(may_help(&m, 2, in_b));
        assert!(!may_help(&m, 1, in_b));
        assert!(
            may_help(&m, 3, in_a) && may_help(&m, 3, in_b),
            "no VM on CPU 3"
        );
        // Once A is gone, its CPU has no VM.
        a.enter();
        a.state.lock().status = VmStatus::Off;
        assert_eq!(vcpu_left(&m, &a), None);
        assert!(may_help(&m, 1, in_b));
    }

    #[test]
    fn one_cpu_ends_the_run() {
        let end = RunEnd::new();
        assert!(end.claim());
        assert!(!end.claim());
        assert!(!end.claim());
    }

    /// What a guest's HVC with x0.. = `regs` on vCPU `index` of `vm` does: the run
    /// loop's next step and x0.
    fn hvc<S: crate::vm::Stage2Table>(vm: &Vm<S>, index: usize, regs: &[u64]) -> (Next, u64) {
        use crate::vcpu::fakes::{NoHost, HVC_EXIT};
        let (mut x, mut pc, mut pstate) = ([0u64; 31], 0x4000_0000, 0x3c5);
        x[..regs.len()].copy_from_slice(regs);
        let mut ctx = crate::vcpu::VcpuCtx {
            x: &mut x,
            pc: &mut pc,
            pstate: &mut pstate,
        };
        let mut kicks = crate::vm::vgic::VcpuMask::EMPTY;
        let next = crate::vcpu::handle_exit(
            vm,
            index,
            &mut ctx,
            HVC_EXIT,
            &mut NoHost,
            &mut |_| ([u64::MAX; 4], crate::vm::share::Note::None),
            &mut kicks,
        );
        (next, x[0])
    }

    const CPU_ON: u64 = 0xC400_0003;
    const CPU_OFF: u64 = 0x8400_0002;
    const AFFINITY_INFO: u64 = 0xC400_0004;
    const SYSTEM_OFF: u64 = 0x8400_0008;
    const SYSTEM_RESET: u64 = 0x8400_0009;

    fn two_vcpus(m: &VmManager<crate::vm::tests::Fake>) -> Arc<Vm<crate::vm::tests::FakeS2>> {
        let mut d = desc(0x5000_0000, 1);
        d.cpus.push(2);
        m.create(d).expect("vm")
    }

    fn enter<S>(vm: &Vm<S>, index: usize) {
        assert!(
            matches!(next_start(vm, index), Start::Enter { .. }),
            "vCPU {index} starts"
        );
    }

    /// [`two_vcpus`] with vCPU 0 started, and vCPU 1 started by its `CPU_ON`.
    fn both_running(m: &VmManager<crate::vm::tests::Fake>) -> Arc<Vm<crate::vm::tests::FakeS2>> {
        let vm = two_vcpus(m);
        enter(&vm, 0);
        assert_eq!(hvc(&vm, 0, &[CPU_ON, 1, 0x4000_1000, 0]), (Next::Resume, 0));
        enter(&vm, 1);
        vm
    }

    /// vCPU 0 starts vCPU 1, sees it ON and powers the VM off while vCPU 1's CPU has
    /// taken its start but not entered yet: the VM stays alive (stage 2, VMID) until
    /// that CPU has backed out, and is destroyed then, by it.
    #[test]
    fn a_vcpu_between_its_start_and_its_entry_keeps_the_vm_alive() {
        let m = manager();
        let vm = two_vcpus(&m);
        enter(&vm, 0);
        assert_eq!(hvc(&vm, 0, &[CPU_ON, 1, 0x4000_1000, 0]), (Next::Resume, 0));
        assert_eq!(hvc(&vm, 0, &[AFFINITY_INFO, 1, 0]).1, 0, "ON");
        // vCPU 1's CPU takes its start ...
        enter(&vm, 1);
        // ... and before it enters, vCPU 0 powers the VM off and its CPU leaves.
        assert_eq!(hvc(&vm, 0, &[SYSTEM_OFF]).0, Next::Stop);
        // (The run may end here: a finished VM whose vCPU never leaves does not hold it
        // up. But nothing of the VM is freed.)
        let _ = vcpu_left(&m, &vm);
        assert_eq!(m.vms().len(), 1, "not destroyed under a loaded vCPU");
        assert!(vm.stage2.lock().is_some(), "its stage 2 is not freed");
        assert_eq!(m.destroy(vm.id), Err(VmError::Busy(vm.id)));
        assert_eq!(m.reset(vm.id), Err(VmError::Finished(vm.id)));
        // vCPU 1's CPU re-checks before it enters, backs out, and tears the VM down.
        assert!(!vm.runs(1));
        assert_eq!(vcpu_left(&m, &vm), Some(true));
        assert!(m.vms().is_empty());
        assert!(vm.stage2.lock().is_none());
        assert_eq!(m.accounting().2, 0, "every table frame back");
        // Nothing starts on a destroyed VM.
        assert_eq!(next_start(&vm, 1), Start::Done);
    }

    /// The same race the other way: the VM is powered off before vCPU 1's CPU takes its
    /// start; that CPU finds it finished and never enters.
    #[test]
    fn a_start_taken_after_power_off_is_refused() {
        let m = manager();
        let vm = two_vcpus(&m);
        enter(&vm, 0);
        hvc(&vm, 0, &[CPU_ON, 1, 0x4000_1000, 0]);
        assert_eq!(hvc(&vm, 0, &[SYSTEM_OFF]).0, Next::Stop);
        assert_eq!(vcpu_left(&m, &vm), Some(true), "destroyed, the run is over");
        assert!(!should_wake(&vm, 1) || vm.status().finished());
        assert_eq!(next_start(&vm, 1), Start::Done);
    }

    /// vCPU 1 resets the VM while vCPU 0 is off: vCPU 0's CPU is the one to wake once
    /// the reset is done, and it starts at the entry point of a fresh boot.
    #[test]
    fn a_reset_from_vcpu_1_with_vcpu_0_off_starts_vcpu_0() {
        let m = manager();
        let vm = both_running(&m);
        assert_eq!(hvc(&vm, 0, &[CPU_OFF]).0, Next::Stop);
        assert_eq!(vcpu_left(&m, &vm), None);
        assert_eq!(hvc(&vm, 1, &[SYSTEM_RESET]).0, Next::Stop);
        assert_eq!(vcpu_left(&m, &vm), None, "the VM runs again");
        assert_eq!(vm.boots.load(Ordering::SeqCst), 2, "reset done");
        assert_eq!(pending_starts(&vm).collect::<Vec<_>>(), [1], "wake CPU 1");
        assert!(should_wake(&vm, 0));
        assert!(!should_wake(&vm, 1));
        assert_eq!(
            next_start(&vm, 0),
            Start::Enter {
                entry: Ipa::new(0x4000_0000),
                context: 0
            }
        );
    }

    /// A reset asked while another vCPU is still in the guest waits for it: RAM is
    /// scrubbed only once no vCPU of the VM is loaded, by the last CPU out, and no
    /// vCPU starts in between.
    #[test]
    fn a_reset_waits_for_the_last_loaded_vcpu() {
        let m = manager();
        let vm = both_running(&m);
        let zeroed = m.with_backend(|p| p.zeroed());
        assert_eq!(hvc(&vm, 0, &[SYSTEM_RESET]).0, Next::Stop);
        assert_eq!(vcpu_left(&m, &vm), None);
        assert_eq!(vm.status(), VmStatus::Resetting);
        assert_eq!(m.with_backend(|p| p.zeroed()), zeroed, "no scrub yet");
        assert_eq!(next_start(&vm, 0), Start::Wait, "nothing starts meanwhile");
        assert_eq!(m.reset(vm.id), Err(VmError::Busy(vm.id)));
        assert_eq!(m.destroy(vm.id), Err(VmError::Busy(vm.id)));
        // vCPU 1 traps: it is off now, and its CPU does the reset.
        assert_eq!(hvc(&vm, 1, &[0xC600_0001]).0, Next::Stop);
        assert_eq!(vcpu_left(&m, &vm), None);
        assert_eq!(vm.status(), VmStatus::Running);
        assert!(m.with_backend(|p| p.zeroed()) > zeroed, "scrubbed");
        assert_eq!(vm.boots.load(Ordering::SeqCst), 2);
        enter(&vm, 0);
    }

    /// Two vCPUs race `SYSTEM_OFF` against `SYSTEM_RESET`: whichever wins, the loser's
    /// call does nothing, and the VM ends up either destroyed or running again.
    #[test]
    fn system_off_and_reset_racing() {
        for off_first in [true, false] {
            let m = manager();
            let vm = both_running(&m);
            let (first, second) = if off_first {
                (SYSTEM_OFF, SYSTEM_RESET)
            } else {
                (SYSTEM_RESET, SYSTEM_OFF)
            };
            assert_eq!(hvc(&vm, 0, &[first]).0, Next::Stop);
            assert_eq!(hvc(&vm, 1, &[second]).0, Next::Stop, "already stopped");
            let _ = vcpu_left(&m, &vm);
            assert_eq!(m.vms().len(), 1, "vCPU 1 is still loaded");
            let end = vcpu_left(&m, &vm);
            if off_first {
                assert_eq!(end, Some(true));
                assert!(m.vms().is_empty());
            } else {
                assert_eq!(end, None);
                assert_eq!(vm.status(), VmStatus::Running);
                assert_eq!(vm.boots.load(Ordering::SeqCst), 2);
            }
        }
    }

    /// Physical CPUs on threads run the schedule against one two-vCPU VM whose guest
    /// starts, stops, resets and powers off at random. Whenever a CPU is between a taken
    /// start and its leave, the VM must be alive (listed, stage 2 present); at the end
    /// every frame is back.
    #[test]
    fn threads_never_run_a_vcpu_of_a_torn_down_vm() {
        use std::sync::atomic::AtomicUsize;
        for round in 0..40u64 {
            let m = manager();
            let vm = two_vcpus(&m);
            let entries = AtomicUsize::new(0);
            std::thread::scope(|s| {
                for index in 0..2usize {
                    let (m, vm, entries) = (&m, &vm, &entries);
                    s.spawn(move || {
                        let mut seed = round * 7 + index as u64 + 1;
                        let mut rnd = move || {
                            seed ^= seed << 13;
                            seed ^= seed >> 7;
                            seed ^= seed << 17;
                            seed
                        };
                        for _ in 0..20_000 {
                            match next_start(vm, index) {
                                Start::Done => return,
                                Start::Wait => {
                                    std::thread::yield_now();
                                    continue;
                                }
                                Start::Enter { .. } => {}
                            }
                            entries.fetch_add(1, Ordering::SeqCst);
                            assert!(vm.stage2.lock().is_some(), "entered a torn-down VM");
                            while vm.runs(index) {
                                assert!(vm.stage2.lock().is_some(), "ran a torn-down VM");
                                let call = match rnd() % 16 {
                                    0 => [SYSTEM_OFF, 0, 0],
                                    1 | 2 => [SYSTEM_RESET, 0, 0],
                                    3 | 4 => [CPU_OFF, 0, 0],
                                    5..=9 => [CPU_ON, 1 - index as u64, 0x4000_1000],
                                    _ => [AFFINITY_INFO, 1 - index as u64, 0],
                                };
                                if hvc(vm, index, &call).0 == Next::Stop {
                                    break;
                                }
                            }
                            if vcpu_left(m, vm).is_some() {
                                return;
                            }
                        }
                    });
                }
            });
            assert!(entries.load(Ordering::SeqCst) > 0);
            // Whatever happened, the VM is either destroyed with nothing left, or alive.
            if m.vms().is_empty() {
                assert_eq!(m.accounting().2, 0, "round {round}: frames back");
                assert!(vm.stage2.lock().is_none());
            }
        }
    }
}

//! What a physical CPU does when it runs no guest code: whether it has a vCPU to start,
//! which parked CPUs a guest's `CPU_ON` made runnable, when a vCPU starts, and when the
//! run is over. The machine's run loop (`crate::machine::run`) asks and acts (parks,
//! wakes, enters the guest, powers off); the decisions are made and tested here.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::vm::psci::PowerState;
use crate::vm::{Backend, Vm, VmError, VmManager, VmStatus};

fn start_pending<S>(vm: &Vm<S>, index: usize) -> bool {
    matches!(
        vm.psci.lock().state(index),
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

/// The physical CPUs (MPIDRs, as the description names them) of `vm`'s vCPUs that have a
/// start pending, e.g. after a `CPU_ON`: the CPUs to wake.
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
    /// Enter the guest at `entry` with x0 = `context` (the start is now taken).
    Enter {
        /// Entry IPA.
        entry: u64,
        /// x0.
        context: u64,
    },
    /// Nothing yet: wait for a `CPU_ON`.
    Wait,
    /// The VM is powered off or stopped: the vCPU never runs again.
    Done,
}

/// Whether vCPU `index` of `vm` starts now.
pub fn next_start<S>(vm: &Vm<S>, index: usize) -> Start {
    if vm.status() != VmStatus::Running {
        return Start::Done;
    }
    match vm.psci.lock().take_pending(index) {
        Some((entry, context)) => Start::Enter { entry, context },
        None => Start::Wait,
    }
}

/// Called once a vCPU of `vm` stopped and its CPU left the guest: destroys the VM if it is
/// finished and no vCPU of it runs any more, and returns the outcome of the run if it is
/// over (`Some(true)` when no VM failed, see [`VmManager::outcome`]).
pub fn vcpu_left<B: Backend>(manager: &VmManager<B>, vm: &Vm<B::S2>) -> Option<bool> {
    if vm.leave() {
        match manager.destroy(vm.id) {
            // Another CPU destroyed it first.
            Ok(()) | Err(VmError::NoSuchVm(_)) => {}
            Err(e) => log::error!("VM {}: destroy failed: {e}", vm.desc.name),
        }
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
    use crate::vm::tests::{desc, manager};

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
                entry: 0x4000_0000,
                context: 0
            }
        );
        assert!(!has_work(&m, 1), "the start was taken");
        assert_eq!(next_start(&vm, 0), Start::Wait);
        vm.psci.lock().cpu_off(0).expect("off");
        vm.psci.lock().power_on(0, 0x4000_1000, 7).expect("on");
        *vm.status.lock() = VmStatus::Failed;
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
        vm.psci.lock().take_pending(0);
        assert_eq!(pending_starts(&vm).count(), 0);
        // vCPU 0 starts vCPU 2 (MPIDR Aff0 = 2), which runs on physical CPU 2.
        vm.psci
            .lock()
            .cpu_on(2, 0x4000_2000, 0, true)
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
        *a.status.lock() = VmStatus::Off;
        assert_eq!(vcpu_left(&m, &a), None, "b still runs");
        assert_eq!(m.vms().len(), 1, "a is destroyed");
        *b.status.lock() = VmStatus::Failed;
        assert_eq!(vcpu_left(&m, &b), Some(false), "b failed");
        assert!(m.vms().is_empty());
        // A CPU that comes late to a VM another CPU destroyed.
        a.enter();
        assert_eq!(vcpu_left(&m, &a), Some(false));
    }

    #[test]
    fn one_cpu_ends_the_run() {
        let end = RunEnd::new();
        assert!(end.claim());
        assert!(!end.claim());
        assert!(!end.claim());
    }
}

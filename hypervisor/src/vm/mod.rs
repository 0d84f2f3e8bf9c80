//! Virtual machines: the [`Vm`] a physical CPU runs, the [`VmManager`] that creates,
//! resets and destroys them, and what each VM owns: a VMID, a stage-2 table, guest RAM
//! from the page pool, vCPU power states (PSCI), a virtual UART, a virtual GICv3, and its part in
//! memory-sharing transactions.
//!
//! Nothing here touches hardware: the manager reaches it through [`Backend`], which the
//! machine implements and the tests fake.

mod manager;
pub mod pool;
pub mod psci;
pub mod share;
mod stage2;
// Parts of the model's API (queries such as `highest_pending`, register offsets) are
// used by the host tests only.
#[allow(dead_code)]
pub mod vgic;
pub mod vmid;
pub mod vuart;

#[cfg(test)]
pub(crate) mod tests;

pub use manager::{Backend, VmError, VmManager};
pub use stage2::{MmuStage2, S2Kind, Stage2Config, Stage2Table, IPA_BITS};

use core::fmt;
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use spin::Mutex;

use crate::config::VmDesc;
use psci::PsciVm;
use vmid::Vmid;
use vuart::VUart;

/// Lifecycle of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmStatus {
    /// Created; its vCPUs run.
    Running,
    /// Powered off by the guest (`SYSTEM_OFF`).
    Off,
    /// Stopped by the hypervisor because of a fault it could not handle.
    Failed,
}

/// A live VM. Shared by the manager and the physical CPUs running its vCPUs.
pub struct Vm<S> {
    /// VM id: its index in the description.
    pub id: u32,
    /// The description it was made from.
    pub desc: VmDesc,
    /// Its VMID.
    pub vmid: Vmid,
    /// `VTTBR_EL2` value.
    pub vttbr: u64,
    /// Its stage-2 table (`None` once the VM is destroyed).
    pub stage2: Mutex<Option<S>>,
    /// vCPU power states.
    pub psci: Mutex<PsciVm>,
    /// Lifecycle.
    pub status: Mutex<VmStatus>,
    /// Virtual UART line buffer.
    pub uart: Mutex<VUart>,
    /// The virtual GICv3. A leaf lock: nothing else is locked while it is held.
    pub vgic: Mutex<vgic::Vgic>,
    /// How many times vCPU 0 was started: 1 after create, +1 per reset.
    pub boots: AtomicU32,
    /// Number of this VM's vCPUs currently executing guest code (see
    /// [`Vm::enter`], [`Vm::leave`]); the VM may only be destroyed at 0.
    pub in_guest: AtomicUsize,
}

impl<S> fmt::Debug for Vm<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vm")
            .field("id", &self.id)
            .field("name", &self.desc.name)
            .field("vmid", &self.vmid)
            .finish_non_exhaustive()
    }
}

impl<S> Vm<S> {
    /// True when `[ipa, ipa + len)` is RAM of this VM.
    #[must_use]
    pub fn is_ram(&self, ipa: u64, len: u64) -> bool {
        self.desc.ram_region(ipa, len).is_some()
    }

    /// Current status.
    #[must_use]
    pub fn status(&self) -> VmStatus {
        *self.status.lock()
    }

    /// Called before a physical CPU enters one of the VM's vCPUs.
    pub fn enter(&self) {
        self.in_guest.fetch_add(1, Ordering::SeqCst);
    }

    /// Called after a vCPU of the VM exited to the hypervisor and will not be entered
    /// again now. Returns true when the VM is finished (powered off or stopped) and no
    /// vCPU of it runs any more: the caller then destroys it. (Both sides order their
    /// writes before their reads, so of a CPU finishing the VM and the last CPU leaving
    /// it, at least one sees the other's write.)
    #[must_use]
    pub fn leave(&self) -> bool {
        self.in_guest.fetch_sub(1, Ordering::SeqCst);
        self.finished_and_idle()
    }

    /// True when the VM is powered off or stopped and none of its vCPUs runs.
    #[must_use]
    pub fn finished_and_idle(&self) -> bool {
        self.status() != VmStatus::Running && self.in_guest.load(Ordering::SeqCst) == 0
    }
}

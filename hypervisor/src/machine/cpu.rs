//! The physical CPUs: which one runs this code, their MPIDRs, and the firmware calls
//! (PSCI through SMC or HVC) that start, park, wake and power them off.

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use aarch64_cpu::registers::{Readable, TPIDR_EL2};
use log::{error, info};
use smccc::{psci, Hvc, Smc};
use spin::Once;

use super::fatal::fatal;
use crate::config::PsciConduit;

/// MPIDR_EL1 affinity fields Aff3 \[39:32\] and Aff2..Aff0 \[23:0\] (what PSCI and the
/// device tree's CPU `reg` use).
pub(super) const MPIDR_AFFINITY_MASK: u64 = 0xff_00ff_ffff;

pub(super) static PSCI_CONDUIT: Once<PsciConduit> = Once::new();
pub(super) static CPUS_ONLINE: AtomicUsize = AtomicUsize::new(0);
pub(super) static CPU_MPIDR: [AtomicU64; boot::MAX_CPUS] =
    [const { AtomicU64::new(u64::MAX) }; boot::MAX_CPUS];

/// The calling CPU's index (0 = the primary), as the boot code stored it in `TPIDR_EL2`.
#[must_use]
pub fn cpu_index() -> usize {
    TPIDR_EL2.get() as usize
}

/// The MPIDR affinity of the CPU with index `cpu`, once it is known.
#[must_use]
pub fn cpu_mpidr(cpu: usize) -> Option<u64> {
    CPU_MPIDR
        .get(cpu)
        .map(|m| m.load(Ordering::Acquire))
        .filter(|&m| m != u64::MAX)
}

pub(super) fn psci_cpu_on(mpidr: u64, entry: u64, context: u64) -> Result<(), psci::error::Error> {
    match PSCI_CONDUIT.get() {
        Some(PsciConduit::Hvc) => psci::cpu_on::<Hvc>(mpidr, entry, context),
        _ => psci::cpu_on::<Smc>(mpidr, entry, context),
    }
}

/// CPUs (by index) that gave themselves back to the firmware with [`park_off`] and have
/// not been asked back by [`wake`] since.
static PARKED: [AtomicBool; boot::MAX_CPUS] = [const { AtomicBool::new(false) }; boot::MAX_CPUS];

/// Turns this secondary CPU off through the firmware (PSCI `CPU_OFF`) unless `has_work`,
/// re-checked after the CPU is marked parked, says there is something to run; returns only
/// in that case. A parked CPU costs nothing (under QEMU its thread sleeps, where a `WFE`
/// loop would spin); [`wake`] brings it back through the secondary entry point, which
/// runs [`secondary`] and the secondary hook again.
pub fn park_off(cpu: usize, has_work: impl Fn() -> bool) {
    let Some(flag) = PARKED.get(cpu) else { return };
    if cpu == 0 {
        return;
    }
    flag.store(true, Ordering::SeqCst);
    // A waker that made work for us before seeing the flag is caught here.
    if has_work() && flag.swap(false, Ordering::SeqCst) {
        return;
    }
    // Either nothing to do, or a waker already took the flag and retries CPU_ON until we
    // are off: go off in both cases.
    let result = match PSCI_CONDUIT.get() {
        Some(PsciConduit::Hvc) => psci::cpu_off::<Hvc>(),
        _ => psci::cpu_off::<Smc>(),
    };
    fatal(format_args!("cpu{cpu}: PSCI CPU_OFF returned {result:?}"));
}

/// Brings CPU `cpu` back if it is parked by [`park_off`] (PSCI `CPU_ON` at the secondary
/// entry point, retried while the firmware still sees it on). Does nothing for a CPU that
/// is not parked.
pub fn wake(cpu: usize) {
    let Some(flag) = PARKED.get(cpu) else { return };
    if !flag.swap(false, Ordering::SeqCst) {
        return;
    }
    let Some(mpidr) = cpu_mpidr(cpu) else { return };
    let entry = boot::secondary_entry_address();
    loop {
        match psci_cpu_on(mpidr, entry, cpu as u64) {
            Ok(()) => return,
            // It has not reached its CPU_OFF yet.
            Err(psci::error::Error::AlreadyOn | psci::error::Error::OnPending) => {
                core::hint::spin_loop();
            }
            Err(e) => {
                error!("cpu{cpu}: CPU_ON to wake it failed: {e:?}");
                // Still off: a later wake tries again.
                flag.store(true, Ordering::SeqCst);
                return;
            }
        }
    }
}

/// Parks the calling CPU (until the VM code gives it work).
pub fn park() -> ! {
    loop {
        aarch64_cpu::asm::wfe();
    }
}

/// Powers the machine off with PSCI SYSTEM_OFF (QEMU exits with status 0).
pub fn power_off() -> ! {
    info!("powering off");
    super::console::drain();
    let result = match PSCI_CONDUIT.get() {
        Some(PsciConduit::Hvc) => psci::system_off::<Hvc>(),
        _ => psci::system_off::<Smc>(),
    };
    fatal(format_args!("PSCI SYSTEM_OFF returned {result:?}"))
}

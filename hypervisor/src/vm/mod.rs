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
pub mod ram;
pub mod share;
mod stage2;
pub mod uart_page;
// Parts of the model's API (queries such as `highest_pending`, register offsets) are
// used by the host tests only.
#[allow(dead_code)]
pub mod vgic;
pub mod vmid;
pub mod vuart;

#[cfg(test)]
pub(crate) mod tests;

pub use manager::{Backend, GuestMemory, VmError, VmManager};
pub use stage2::{MmuStage2, S2Kind, Stage2Config, Stage2Table, IPA_BITS};

use core::fmt;
use core::sync::atomic::AtomicU32;

use crate::config::VmDesc;
use crate::console::limit::{Admit, VmConsole};
use crate::mem::Ipa;
use crate::Lock;
use psci::{PowerState, PsciVm};
use vmid::Vmid;
use vuart::VUart;

/// Lifecycle of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmStatus {
    /// Created; its vCPUs run.
    Running,
    /// A `SYSTEM_RESET` was asked: no vCPU starts until the last loaded one has left and
    /// the reset is done (then it is `Running` again, with vCPU 0 starting).
    Resetting,
    /// Powered off by the guest (`SYSTEM_OFF`).
    Off,
    /// Stopped by the hypervisor because of a fault it could not handle.
    Failed,
}

impl VmStatus {
    /// Powered off or stopped: its vCPUs never run again.
    #[must_use]
    pub const fn finished(self) -> bool {
        matches!(self, Self::Off | Self::Failed)
    }
}

/// What [`Vm::first_touch`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Touch {
    /// The IPA is not RAM of the VM.
    NotRam,
    /// The chunk was ready already (another vCPU made it so meanwhile, or the fault is
    /// of another kind: a page lent away, say), or the VM is destroyed.
    Ready,
    /// This call scrubbed the chunk and gave the guest access: the access that faulted
    /// can run again.
    MadeReady,
}

/// What a CPU whose vCPU just left the guest must do for the VM (from [`Vm::leave`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leave {
    /// Nothing: other vCPUs are loaded, or the VM runs.
    Nothing,
    /// The VM is finished and no vCPU is loaded: destroy it.
    Destroy,
    /// A reset was asked and no vCPU is loaded: reset it.
    Reset,
}

/// What a VM's lock guards: its lifecycle, its vCPUs' power states and which of them are
/// loaded on a physical CPU. Decisions that must not race (a vCPU starts; the VM is reset
/// or destroyed) are taken under it, each as one step.
///
/// It is a leaf lock: nothing else is locked while it is held.
#[derive(Debug)]
pub struct VmState {
    /// Lifecycle.
    pub status: VmStatus,
    /// vCPU power states.
    pub psci: PsciVm,
    /// vCPUs loaded: their physical CPU took a start and has not left the guest since.
    loaded: usize,
    /// A CPU is resetting or destroying the VM (claimed by the manager).
    claimed: bool,
}

impl VmState {
    /// A running VM with `vcpus` vCPUs, all off.
    #[must_use]
    pub fn new(vcpus: usize) -> Self {
        Self {
            status: VmStatus::Running,
            psci: PsciVm::new(vcpus),
            loaded: 0,
            claimed: false,
        }
    }

    /// vCPUs loaded on a physical CPU.
    #[must_use]
    pub const fn loaded(&self) -> usize {
        self.loaded
    }

    /// Whether vCPU `index` may run guest code now: the VM runs and the vCPU is on.
    #[must_use]
    pub fn runs(&self, index: usize) -> bool {
        self.status == VmStatus::Running && self.psci.state(index) == Some(PowerState::On)
    }

    /// Takes vCPU `index`'s pending start, if the VM runs and one is pending, and counts
    /// the vCPU loaded in the same step: from here on the VM cannot be reset or destroyed
    /// until the CPU calls [`Vm::leave`].
    pub fn take_start(&mut self, index: usize) -> Option<(Ipa, u64)> {
        if self.status != VmStatus::Running || self.claimed {
            return None;
        }
        // At most one vCPU per physical CPU is loaded: the count cannot reach
        // `usize::MAX`, and if it could the start would wait rather than wrap.
        let loaded = self.loaded.checked_add(1)?;
        let start = self.psci.take_pending(index)?;
        self.loaded = loaded;
        Some(start)
    }

    /// Asks for a reset (`SYSTEM_RESET`): every vCPU off, no vCPU starts, and the last
    /// CPU to leave resets the VM. Returns false (and changes nothing) if the VM does
    /// not run.
    pub fn request_reset(&mut self) -> bool {
        if self.status != VmStatus::Running {
            return false;
        }
        self.status = VmStatus::Resetting;
        self.psci.all_off();
        true
    }

    /// Ends the VM with `status` (`Off` or `Failed`): every vCPU off. A VM that is already
    /// finished keeps its first status.
    pub fn finish(&mut self, status: VmStatus) {
        if !self.status.finished() {
            self.status = status;
        }
        self.psci.all_off();
    }

    /// Claims the VM for a reset (`reset`) or destroy: refused while a vCPU is loaded or
    /// another CPU holds the claim. A claimed VM starts no vCPU.
    pub(crate) fn claim(&mut self) -> bool {
        if self.loaded > 0 || self.claimed {
            return false;
        }
        self.claimed = true;
        true
    }

    /// Gives up the claim (the reset is done).
    pub(crate) fn release_claim(&mut self) {
        self.claimed = false;
    }
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
    pub stage2: Lock<Option<S>>,
    /// Which chunks of its RAM are scrubbed and mapped ([`ram`]). Taken before `stage2`
    /// and held while a chunk is scrubbed, so two vCPUs touching one chunk scrub it once.
    pub ram: Lock<ram::RamChunks>,
    /// Lifecycle, vCPU power states and loaded vCPUs (a leaf lock).
    pub state: Lock<VmState>,
    /// Virtual UART (taken before `stage2` and the virtual GIC's lock).
    pub uart: Lock<VUart>,
    /// The virtual UART's register page, for a VM with a virtual UART
    /// ([`uart_page`]; mapped while `uart.page_mapped`).
    pub uart_page: Option<uart_page::UartPage>,
    /// Console rate limits of the guest's lines and of the lines about the VM.
    pub console: Lock<VmConsole>,
    /// The virtual GICv3. A leaf lock: nothing else is locked while it is held.
    pub vgic: vgic::SharedVgic,
    /// How many times vCPU 0 was started: 1 after create, +1 per reset.
    pub boots: AtomicU32,
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

impl<S: Stage2Table> Vm<S> {
    /// Makes the RAM chunk holding `ipa` ready if it is not yet ([`ram`]): scrubs it
    /// through `mem`, then gives the guest access to it at stage 2 (its mappings exist
    /// since the VM was created, without any access).
    ///
    /// # Errors
    ///
    /// The stage-2 change failed (it needs no frame: chunks are never part of a larger
    /// block): the chunk stays not ready.
    pub fn first_touch(
        &self,
        ipa: Ipa,
        mem: &(impl GuestMemory + ?Sized),
    ) -> Result<Touch, mmu::Error> {
        let Some((i, chunk)) = ram::chunk_of(&self.desc, ipa) else {
            return Ok(Touch::NotRam);
        };
        let mut ram = self.ram.lock();
        if ram.is_ready(i) {
            return Ok(Touch::Ready);
        }
        // The guest has no access to the chunk yet: no vCPU can see it while it is
        // scrubbed (the `ram` lock keeps a second vCPU from scrubbing it too).
        mem.zero(chunk.pa, chunk.size);
        let mut s2 = self.stage2.lock();
        let Some(s2) = s2.as_mut() else {
            return Ok(Touch::Ready);
        };
        // Only access is added: no broadcast invalidation (`Stage2Table::relax`); a vCPU
        // that still holds the old entry faults and drops it (`crate::vcpu`).
        s2.relax(chunk.ipa, chunk.size, S2Kind::Ram)?;
        ram.set_ready(i);
        Ok(Touch::MadeReady)
    }

    /// Brings the virtual UART's register page in line with `uart` (this VM's UART,
    /// locked) after a change: rewrites and maps it while no read can change the UART's
    /// state, unmaps it otherwise ([`uart_page`]). A page that cannot be mapped leaves
    /// every access trapped, which is always right.
    pub fn publish_uart(&self, uart: &mut VUart, mem: &(impl GuestMemory + ?Sized)) {
        let Some(page) = &self.uart_page else {
            return;
        };
        let want = !uart.reads_change_state();
        if want {
            page.write(uart);
            // All of it when it is about to be mapped (the reset values and zeros written
            // when it was made), then what a rewrite changes.
            let len = if uart.page_mapped {
                uart_page::UartPage::state_len()
            } else {
                crate::mem::PAGE_SIZE
            };
            mem.clean_to_poc(page.va(), len);
        }
        self.map_uart_page(uart, want);
    }

    /// Takes the virtual UART's register page (its UART locked) away from the guest:
    /// before input arrives (the first byte received makes reads of `UARTDR` change
    /// state) and before the VM is destroyed. False if the page stays mapped (then no byte
    /// may go in).
    pub fn unpublish_uart(&self, uart: &mut VUart) -> bool {
        self.map_uart_page(uart, false);
        !uart.page_mapped
    }

    /// Maps the register page at the UART's IPA (read-only) or unmaps it, unless it is so
    /// already; `uart.page_mapped` follows what the stage 2 now has.
    fn map_uart_page(&self, uart: &mut VUart, map: bool) {
        let (Some(page), Some(ipa)) = (&self.uart_page, self.desc.vuart) else {
            return;
        };
        if map == uart.page_mapped {
            return;
        }
        if let Some(s2) = self.stage2.lock().as_mut() {
            let done = if map {
                s2.map(ipa, page.pa(), crate::mem::PAGE_SIZE, S2Kind::RegisterPage)
            } else {
                s2.unmap(ipa, crate::mem::PAGE_SIZE)
            };
            if done.is_ok() {
                uart.page_mapped = map;
            }
        }
    }

    /// [`Self::first_touch`] for every chunk of `[ipa, ipa + size)` that is RAM.
    ///
    /// # Errors
    ///
    /// As [`Self::first_touch`], for the first chunk that failed.
    pub fn make_ready(
        &self,
        ipa: Ipa,
        size: u64,
        mem: &(impl GuestMemory + ?Sized),
    ) -> Result<(), mmu::Error> {
        for (_, c) in ram::chunks_in(&self.desc, ipa, size) {
            self.first_touch(c.ipa, mem)?;
        }
        Ok(())
    }
}

impl<S> Vm<S> {
    /// True when `[ipa, ipa + len)` is RAM of this VM.
    #[must_use]
    pub fn is_ram(&self, ipa: Ipa, len: u64) -> bool {
        self.desc.ram_region(ipa, len).is_some()
    }

    /// Current status.
    #[must_use]
    pub fn status(&self) -> VmStatus {
        self.state.lock().status
    }

    /// Whether vCPU `index` may run guest code now ([`VmState::runs`]).
    #[must_use]
    pub fn runs(&self, index: usize) -> bool {
        self.state.lock().runs(index)
    }

    /// Called by a CPU whose vCPU (counted loaded by [`VmState::take_start`]) left the
    /// guest and will not enter it again now. Says whether this CPU, the last one out,
    /// must now destroy or reset the VM.
    #[must_use]
    pub fn leave(&self) -> Leave {
        let mut st = self.state.lock();
        st.loaded = st.loaded.saturating_sub(1);
        if st.loaded > 0 || st.claimed {
            Leave::Nothing
        } else if st.status.finished() {
            Leave::Destroy
        } else if st.status == VmStatus::Resetting {
            Leave::Reset
        } else {
            Leave::Nothing
        }
    }

    /// Logs a line about the VM at `level` through `sink`, within the VM's budget of such
    /// lines (`crate::console::limit`); a line that does not fit is counted, and the count
    /// is printed before the next one that does.
    pub fn log(
        &self,
        sink: &mut impl vuart::LineSink,
        level: log::Level,
        args: fmt::Arguments<'_>,
    ) {
        let admit = self.console.lock().events.admit(sink.micros());
        if self.admitted(admit, sink, "line(s) about it") {
            sink.event(level, args);
        }
    }

    /// Prints line `text` of the guest through `sink`, within the guest's budget.
    pub fn guest_line(&self, text: &str, sink: &mut impl vuart::LineSink) {
        let admit = self.console.lock().guest.admit(sink.micros());
        if self.admitted(admit, sink, "guest line(s)") {
            sink.line(&self.desc.name, text);
        }
    }

    /// Whether a line a rate limit decided on (`admit`) is printed; first reports the
    /// `what` it held back before it, if any.
    fn admitted(&self, admit: Admit, sink: &mut impl vuart::LineSink, what: &str) -> bool {
        let Admit::Emit { dropped_before } = admit else {
            return false;
        };
        if dropped_before > 0 {
            sink.event(
                log::Level::Warn,
                format_args!(
                    "VM {}: {dropped_before} {what} not printed (console rate limit)",
                    self.desc.name
                ),
            );
        }
        true
    }

    /// Prints the guest's partial line and how many lines of and about the VM the rate
    /// limits held back since the last report (as the VM ends or resets).
    pub fn flush_console(&self, sink: &mut impl vuart::LineSink) {
        let partial = self.uart.lock().take_line();
        if let Some(line) = partial {
            self.guest_line(line.as_str(), sink);
        }
        let (guest, events) = {
            let mut c = self.console.lock();
            (c.guest.take_dropped(), c.events.take_dropped())
        };
        if guest > 0 || events > 0 {
            sink.event(
                log::Level::Warn,
                format_args!(
                    "VM {}: {guest} guest line(s) and {events} line(s) about it not printed \
                     (console rate limit)",
                    self.desc.name
                ),
            );
        }
    }

    /// Counts a vCPU loaded without a start (tests that play a CPU already in the guest).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn enter(&self) {
        let mut st = self.state.lock();
        st.loaded = st.loaded.saturating_add(1);
    }

    /// True when the VM is powered off or stopped and none of its vCPUs is loaded.
    #[cfg(test)]
    #[must_use]
    pub fn finished_and_idle(&self) -> bool {
        let st = self.state.lock();
        st.status.finished() && st.loaded == 0
    }
}

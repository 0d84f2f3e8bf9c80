//! The VM manager: creates VMs from their descriptions, looks them up, resets and destroys
//! them, and accounts for every guest page and stage-2 table frame.
//!
//! Everything that touches hardware or memory goes through [`Backend`] (stage-2 tables,
//! copying and scrubbing physical memory, VMID TLB flushes), so this module is tested on
//! the host with a recording fake.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use super::pool::{PagePool, PoolError};
use super::ram;
use super::share;
use super::stage2::Stage2Table;
use super::vgic::{self, PhysAction, PhysGic, Vgic};
use super::vmid::{Vmid, VmidAllocator, VmidBits, VmidError, VmidFlush};
use super::vuart::VUart;
use super::{S2Kind, Vm, VmState, VmStatus};
use crate::config::fw_cfg::FwCfgError;
use crate::config::{GuestRegion, ImageSource, Stage2Mappings, VmDesc};
use crate::console::limit::VmConsole;
use crate::mem::{Ipa, PhysAddr, PhysRange};
use crate::Lock;

/// Host physical memory as the manager scrubs and fills guest RAM: used without the
/// manager's lock, on RAM that no VM can reach at the time (claimed and not yet mapped
/// into a running vCPU, of a VM being reset or destroyed with no vCPU loaded, or a
/// chunk the guest has no access to yet, [`super::ram`]).
pub trait GuestMemory {
    /// Zeroes host physical memory.
    fn zero(&self, pa: PhysAddr, len: u64);
    /// Writes the `len` bytes of an image from `src` to host physical memory at `dst`
    /// (a staged image does not overlap `dst`).
    ///
    /// # Errors
    ///
    /// The fw-cfg device failed a transfer; `[dst, dst + len)` holds anything.
    fn load(&self, dst: PhysAddr, src: ImageSource, len: u64) -> Result<(), FwCfgError>;
    /// Cleans `[va, va + len)` of the hypervisor's own memory that a guest reads (a
    /// register page, [`super::uart_page`]) to the point of coherency: the guest may read
    /// it without the cache.
    fn clean_to_poc(&self, va: u64, len: u64);
}

/// What the manager needs from the machine.
pub trait Backend: VmidFlush {
    /// The stage-2 table type.
    type S2: Stage2Table;
    /// Guest RAM access, kept outside the manager's lock.
    type Mem: GuestMemory + Send + Sync;
    /// The memory accessor the manager keeps (taken once, when it is made).
    fn memory(&self) -> Self::Mem;
    /// A new, empty stage-2 table tagged with `vmid` (its root frames are taken now) whose
    /// every mapping uses the entries `mappings` allows.
    ///
    /// # Errors
    ///
    /// Out of table frames.
    fn new_stage2(&mut self, vmid: Vmid, mappings: Stage2Mappings) -> Result<Self::S2, mmu::Error>;
    /// Frees an empty stage-2 table and all its frames.
    fn free_stage2(&mut self, s2: Self::S2);
    /// Table frames currently allocated to stage-2 tables.
    fn table_frames(&self) -> usize;
    /// `ICH_VTR_EL2` of the machine (list registers, priority bits of the virtual CPU
    /// interface), for each VM's virtual GIC.
    fn ich_vtr(&self) -> u64;
    /// Applies a virtual GIC's change to the physical GIC (an interrupt the VM owns).
    fn apply_gic(&mut self, action: PhysAction);
}

/// The physical GIC as a VM's virtual GIC drives it, through the backend.
struct BackendGic<'a, P>(&'a mut P);

impl<P: Backend> PhysGic for BackendGic<'_, P> {
    fn apply(&mut self, action: PhysAction) {
        self.0.apply_gic(action);
    }
}

/// Why a VM could not be created or destroyed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmError {
    /// No VMID left.
    Vmid(VmidError),
    /// A RAM region is outside guest memory or already another VM's.
    Ram(GuestRegion, PoolError),
    /// The stage-2 table could not be built.
    Stage2(mmu::Error),
    /// No VM with that id.
    NoSuchVm(u32),
    /// The virtual GIC refused the VM's vCPUs or interrupts.
    Vgic(vgic::ConfigError),
    /// The VM has a vCPU loaded on a physical CPU, or another CPU is already resetting
    /// or destroying it: nothing was done.
    Busy(u32),
    /// The VM is powered off or stopped: it cannot be reset.
    Finished(u32),
    /// An image could not be fetched from the fw-cfg device.
    Load(FwCfgError),
    /// An image at this IPA does not lie inside one RAM region (a description
    /// `crate::config::parse` did not check).
    ImageOutsideRam(Ipa),
}

impl core::error::Error for VmError {}

impl fmt::Display for VmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Vmid(e) => write!(f, "{e}"),
            Self::Ram(r, e) => write!(f, "RAM at PA {:#x} size {:#x}: {e}", r.pa, r.size),
            Self::Stage2(e) => write!(f, "stage 2: {e}"),
            Self::NoSuchVm(id) => write!(f, "no VM {id}"),
            Self::Vgic(e) => write!(f, "{e}"),
            Self::Busy(id) => write!(
                f,
                "VM {id} has a vCPU loaded or is already being reset or destroyed"
            ),
            Self::Finished(id) => write!(f, "VM {id} is powered off or stopped"),
            Self::Load(e) => write!(f, "loading its images from fw-cfg: {e}"),
            Self::ImageOutsideRam(ipa) => write!(f, "its image at IPA {ipa:#x} is not in its RAM"),
        }
    }
}

struct Inner<P: Backend> {
    platform: P,
    vmids: VmidAllocator,
    pool: PagePool,
    vms: Vec<Arc<Vm<P::S2>>>,
    next_id: u32,
    /// Destroyed VMs that had been stopped by the hypervisor (for [`VmManager::outcome`]).
    destroyed_failed: usize,
}

/// All VMs, behind one lock, and the memory-sharing transactions between them, behind
/// another.
///
/// Lock order: `inner`, then `shares`, then one VM's `stage2` at a time. A VM's `ram`
/// (its ready chunks, [`ram`]) comes before its `stage2` and is never taken under
/// `inner` or `shares`; it alone is held while a chunk is scrubbed on first touch. A
/// VM's `state` is a leaf lock (taken under any of these, never the other way round).
/// No other lock is held while guest RAM is scrubbed or filled, and nothing is logged
/// under a lock.
pub struct VmManager<P: Backend> {
    inner: Lock<Inner<P>>,
    shares: Lock<share::Ledger>,
    mem: P::Mem,
    /// VMs taken off the list whose teardown (scrub, log line) is not finished: the run
    /// is not over while one is ([`Self::outcome`]).
    dying: AtomicUsize,
}

impl<P: Backend> VmManager<P> {
    /// A manager with no VMs.
    /// Guest RAM is taken from `guest_ram`.
    pub fn new(platform: P, vmid_bits: VmidBits, guest_ram: &[PhysRange]) -> Self {
        Self {
            mem: platform.memory(),
            dying: AtomicUsize::new(0),
            inner: Lock::new(Inner {
                platform,
                vmids: VmidAllocator::new(vmid_bits),
                pool: PagePool::new(guest_ram),
                vms: Vec::new(),
                next_id: 0,
                destroyed_failed: 0,
            }),
            shares: Lock::new(share::Ledger::new()),
        }
    }

    /// Creates a VM: VMID, stage 2, RAM claimed and mapped, the chunks its images land in
    /// scrubbed and opened (all of its RAM for a VM with pass-through MMIO; the rest is
    /// opened on first touch, [`super::ram`]), images written in (copied from staging or
    /// fetched from fw-cfg), vCPU 0 powered on at the entry point. VM ids count up from 0
    /// in creation order. `desc` was checked by `crate::config::parse` (its images inside
    /// its RAM, its pass-through ranges clear of host RAM, its CPUs no other VM's); what
    /// can still fail is claiming its RAM, building its stage 2 and fetching an image.
    ///
    /// # Errors
    ///
    /// [`VmError`]; a failed create leaves nothing allocated.
    pub fn create(&self, desc: VmDesc) -> Result<Arc<Vm<P::S2>>, VmError> {
        let ich_vtr = self.inner.lock().platform.ich_vtr();
        let mut vgic = new_vgic(&desc, ich_vtr).map_err(VmError::Vgic)?;
        let (s2, vmid) = self.claim_and_map(&desc)?;
        // The RAM is claimed (no other VM can get it) and the VM is not listed yet (no
        // CPU can run it): scrub and load without the lock.
        for r in &ram::start_ranges(&desc) {
            scrub_around_images(&self.mem, &desc, r);
        }
        if let Err(e) = load_images(&self.mem, &desc) {
            let mut inner = self.inner.lock();
            // Everything was claimed and mapped; the RAM goes back holding part of an
            // image, and whoever claims it next scrubs it.
            undo_claim(&mut inner, &desc, s2, vmid, Done::ALL);
            return Err(e);
        }
        let chunks = ram::RamChunks::at_start(&desc);
        let mut state = VmState::new(desc.cpus.len());
        // vCPU 0 of a new VM is off, so this cannot fail.
        let _ = state.psci.power_on(0, desc.entry, desc.boot_x0());
        let uart_page = desc.vuart.map(|_| super::uart_page::UartPage::new());
        let mut inner = self.inner.lock();
        // Its hardware SPIs start disabled and inactive, routed to its first CPU.
        vgic.reset(&mut BackendGic(&mut inner.platform));
        let vm = Arc::new(Vm {
            id: inner.next_id,
            vttbr: s2.vttbr(),
            vmid,
            desc,
            stage2: Lock::new(Some(s2)),
            ram: Lock::new(chunks),
            state: Lock::new(state),
            uart: Lock::new(VUart::new()),
            uart_page,
            console: Lock::new(VmConsole::new()),
            vgic: vgic::SharedVgic::new(vgic),
            boots: AtomicU32::new(1),
        });
        // One VM is created per description, at start-up: never near `u32::MAX`, and
        // the id of a last one would be reused rather than wrap to 0.
        inner.next_id = inner.next_id.saturating_add(1);
        self.shares.lock().add_party(vm.id, vm.desc.sharing);
        inner.vms.push(Arc::clone(&vm));
        drop(inner);
        // No vCPU of it has started: map its UART's register page.
        vm.publish_uart(&mut vm.uart.lock(), &self.mem);
        Ok(vm)
    }

    /// The first part of [`Self::create`], under the lock: a VMID, a stage 2, the RAM
    /// claimed and mapped (chunks not ready yet without access), the pass-through ranges
    /// mapped; undone whole on failure.
    fn claim_and_map(&self, desc: &VmDesc) -> Result<(P::S2, Vmid), VmError> {
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        let vmid = inner.vmids.allocate().map_err(VmError::Vmid)?;
        let mut s2 = match inner.platform.new_stage2(vmid, desc.stage2) {
            Ok(s2) => s2,
            Err(e) => {
                // A VMID that never reached VTTBR_EL2 has no TLB entries, but the
                // allocator flushes anyway: keep one rule.
                let _ = inner.vmids.release(vmid, &mut inner.platform);
                return Err(VmError::Stage2(e));
            }
        };
        // How many of each list are done; at most the list's length, so the sums are
        // exact.
        let mut claimed = 0usize;
        let mut mapped_ram = 0usize;
        let mut mapped_dev = 0usize;
        let result = (|| {
            for r in &desc.memory {
                inner
                    .pool
                    .claim(r.pa_range())
                    .map_err(|e| VmError::Ram(*r, e))?;
                claimed = claimed.saturating_add(1);
            }
            // All of the RAM's table frames are taken now, so a first touch needs none.
            for (c, kind) in ram::start_mappings(desc) {
                s2.map(c.ipa, c.pa, c.size, kind).map_err(VmError::Stage2)?;
                mapped_ram = mapped_ram.saturating_add(1);
            }
            for p in &desc.passthrough {
                s2.map(p.ipa, p.pa, p.size, S2Kind::Device)
                    .map_err(VmError::Stage2)?;
                mapped_dev = mapped_dev.saturating_add(1);
            }
            Ok(())
        })();
        if let Err(e) = result {
            // Nothing was written to the claimed pages yet (the scrub comes after):
            // they go back as they were, and whoever claims them next scrubs them.
            let done = Done {
                claimed,
                mapped_ram,
                mapped_dev,
            };
            undo_claim(inner, desc, s2, vmid, done);
            return Err(e);
        }
        Ok((s2, vmid))
    }

    /// Reboots a VM in place: every vCPU off, its memory-sharing transactions ended, its
    /// RAM taken back and started again as at creation (the images' chunks scrubbed,
    /// loaded and opened, the rest opened on first touch, [`super::ram`]), vCPU 0 on at
    /// the entry point. The VMID and stage 2 stay. The RAM work runs without any lock but
    /// the VM's own: the VM is marked resetting (no vCPU starts) and no vCPU of it is
    /// loaded, which the claim checks. A reset that cannot take the RAM back or load the
    /// images again stops and destroys the VM, with a log line.
    ///
    /// # Errors
    ///
    /// [`VmError::NoSuchVm`]; [`VmError::Busy`] while a vCPU of the VM is loaded or
    /// another CPU resets or destroys it; [`VmError::Finished`] for a VM powered off or
    /// stopped. Nothing is done then.
    pub fn reset(&self, id: u32) -> Result<(), VmError> {
        let (vm, ended) = {
            let mut inner = self.inner.lock();
            let vm = inner
                .vms
                .iter()
                .find(|v| v.id == id)
                .cloned()
                .ok_or(VmError::NoSuchVm(id))?;
            {
                let mut st = vm.state.lock();
                if st.status.finished() {
                    return Err(VmError::Finished(id));
                }
                if !st.claim() {
                    return Err(VmError::Busy(id));
                }
                st.status = VmStatus::Resetting;
                st.psci.all_off();
            }
            // Its interrupt controller and UART back to their reset state (its hardware
            // interrupts disabled and deactivated).
            vm.vgic.lock().reset(&mut BackendGic(&mut inner.platform));
            vm.uart.lock().reset();
            // Its pages leave every other VM before they are scrubbed.
            let ended = self.shares.lock().end_all(&inner.vms, &vm);
            (vm, ended)
        };
        ended.log(&vm.desc.name);
        if ended.failed > 0 {
            // Pages of it may still be another VM's, or missing from its stage 2.
            return self.stop_and_destroy(
                &vm,
                format_args!(
                    "{} of its memory-sharing transactions could not be ended at the reset",
                    ended.failed
                ),
            );
        }
        let remapped = {
            let mut chunks = vm.ram.lock();
            let mut s2 = vm.stage2.lock();
            let remapped = s2.as_mut().map(|s2| {
                ram::start_mappings(&vm.desc)
                    .try_for_each(|(c, kind)| s2.protect(c.ipa, c.size, kind))
            });
            // Whatever happened, no chunk counts as ready but the start chunks.
            *chunks = match remapped {
                Some(Ok(())) => ram::RamChunks::at_start(&vm.desc),
                _ => ram::RamChunks::new(&vm.desc),
            };
            remapped
        };
        if let Some(Err(e)) = remapped {
            // It cannot happen (each chunk is a block or pages of its own, changed whole),
            // but a VM whose RAM is half taken back must not run.
            return self.stop_and_destroy(
                &vm,
                format_args!("its RAM could not be taken back at the reset: {e}"),
            );
        }
        for r in &ram::start_ranges(&vm.desc) {
            scrub_around_images(&self.mem, &vm.desc, r);
        }
        if let Err(e) = load_images(&self.mem, &vm.desc) {
            return self.stop_and_destroy(
                &vm,
                format_args!("its images could not be loaded at the reset: {e}"),
            );
        }
        vm.publish_uart(&mut vm.uart.lock(), &self.mem);
        vm.boots.fetch_add(1, Ordering::SeqCst);
        let mut st = vm.state.lock();
        // vCPU 0 is off (all were turned off above, and none starts while resetting).
        let _ = st.psci.power_on(0, vm.desc.entry, vm.desc.boot_x0());
        st.status = VmStatus::Running;
        st.release_claim();
        Ok(())
    }

    /// Ends a reset that cannot finish: logs `why`, marks the VM (claimed by the reset)
    /// stopped, gives up the claim and destroys it.
    fn stop_and_destroy(&self, vm: &Vm<P::S2>, why: fmt::Arguments<'_>) -> Result<(), VmError> {
        log::error!("VM {} stopped: {why}", vm.desc.name);
        {
            let mut st = vm.state.lock();
            st.finish(VmStatus::Failed);
            st.release_claim();
        }
        self.destroy(vm.id)
    }

    /// Destroys a VM none of whose vCPUs is loaded: ends its memory-sharing transactions,
    /// unmaps and frees its stage 2, scrubs and returns its RAM, flushes and frees its
    /// VMID, and logs what came back. A VM that still runs is marked powered off first
    /// (no vCPU of it starts again). The scrub runs without any lock: the VM is off the
    /// list and its RAM still claimed.
    ///
    /// # Errors
    ///
    /// [`VmError::NoSuchVm`]; [`VmError::Busy`] while a vCPU of the VM is loaded or
    /// another CPU resets it. Nothing is done then.
    pub fn destroy(&self, id: u32) -> Result<(), VmError> {
        let (vm, ended) = {
            let mut inner = self.inner.lock();
            let inner = &mut *inner;
            let i = inner
                .vms
                .iter()
                .position(|v| v.id == id)
                .ok_or(VmError::NoSuchVm(id))?;
            {
                let vm = inner.vms.get(i).ok_or(VmError::NoSuchVm(id))?;
                let mut st = vm.state.lock();
                if !st.claim() {
                    return Err(VmError::Busy(id));
                }
                st.finish(VmStatus::Off);
                if st.status == VmStatus::Failed {
                    // At most one per VM ever created: the sum is exact.
                    inner.destroyed_failed = inner.destroyed_failed.saturating_add(1);
                }
            }
            let vm = inner.vms.swap_remove(i);
            // Its hardware interrupts go back to disabled and inactive.
            vm.vgic.lock().reset(&mut BackendGic(&mut inner.platform));
            // Counted before the lock is released: `outcome` sees the VM listed or dying.
            self.dying.fetch_add(1, Ordering::SeqCst);
            // Its pages leave every other VM before they are scrubbed, and pages it
            // borrowed go back to pending.
            let mut shares = self.shares.lock();
            let ended = shares.end_all(&inner.vms, &vm);
            shares.remove_party(vm.id);
            drop(shares);
            (vm, ended)
        };
        ended.log(&vm.desc.name);
        // Its UART's register page goes before the VM (which holds it) can be dropped.
        vm.unpublish_uart(&mut vm.uart.lock());
        if let Some(s2) = vm.stage2.lock().as_mut() {
            for p in &vm.desc.passthrough {
                let _ = s2.unmap(p.ipa, p.size);
            }
            for r in &vm.desc.memory {
                let _ = s2.unmap(r.ipa, r.size);
            }
        }
        // The RAM goes back to the pool as it is: RAM is scrubbed before a VM gets access
        // to it (`create`, `reset`, first touch), and nothing maps the pool in between.
        let (free, total, frames, vmids) = {
            let mut inner = self.inner.lock();
            let inner = &mut *inner;
            for r in &vm.desc.memory {
                let _ = inner.pool.release(r.pa_range());
            }
            // The flush runs before the VMID can be handed out again.
            let _ = inner.vmids.release(vm.vmid, &mut inner.platform);
            if let Some(s2) = vm.stage2.lock().take() {
                inner.platform.free_stage2(s2);
            }
            (
                inner.pool.free_bytes(),
                inner.pool.total_bytes(),
                inner.platform.table_frames(),
                inner.vmids.in_use(),
            )
        };
        log::info!(
            "VM {} destroyed: {} KiB RAM returned, VMID {} released; guest RAM \
             free {} of {} KiB, page-table frames in use {frames}, VMIDs in use {vmids}",
            vm.desc.name,
            vm.desc.ram_size() / 1024,
            vm.vmid,
            free / 1024,
            total / 1024,
        );
        // Only now may a CPU see the run over (and end it): the line above is out.
        self.dying.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }

    /// Runs memory-sharing call `req` made by vCPU `vcpu` of `caller` and returns
    /// x0..x3 (`docs/hypercalls.md`, "Memory sharing between VMs"). A vCPU that is no
    /// longer on (another vCPU powered the VM off, reset or stopped it) gets `DENIED`.
    /// The calling vCPU is loaded, so its VM cannot be reset or destroyed during the call.
    ///
    /// The manager lock is held for the whole call: the VMs it sees are the live ones,
    /// and no list of them is copied (a call allocates nothing). What the call did is
    /// returned for the caller to log ([`share::Note::log`]) once every lock is released.
    pub fn share_call(
        &self,
        caller: &Vm<P::S2>,
        vcpu: usize,
        req: share::Request,
    ) -> ([u64; 4], share::Note) {
        if let share::Request::Give { ipa, pages, .. } = req {
            // What is given must be scrubbed RAM the owner owns: the caller's chunks in
            // the range are made ready first, outside the manager's locks (the caller's
            // vCPU is loaded, so the VM cannot be reset meanwhile and they stay ready).
            // Only for a range the call could take (at most `MAX_PAGES` of the caller's
            // RAM); the call itself then decides, with its own errors.
            if let Ok(size) = share::given_range(&caller.desc, ipa, pages) {
                if let Err(e) = caller.make_ready(ipa, size, &self.mem) {
                    log::warn!(
                        "VM {}: RAM for a sharing call not made ready: {e}",
                        caller.desc.name
                    );
                    return (
                        share::result_regs(Err(share::Error::NoMemory)),
                        share::Note::None,
                    );
                }
            }
        }
        let (r, note) = {
            let inner = self.inner.lock();
            if caller.runs(vcpu) {
                self.shares.lock().call(&inner.vms, caller, req)
            } else {
                (Err(share::Error::Denied), share::Note::None)
            }
        };
        (share::result_regs(r), note)
    }

    /// Runs `f` with the memory-sharing transactions.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn with_shares<R>(&self, f: impl FnOnce(&share::Ledger) -> R) -> R {
        f(&self.shares.lock())
    }

    /// The VM with id `id`.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn get(&self, id: u32) -> Option<Arc<Vm<P::S2>>> {
        self.inner.lock().vms.iter().find(|v| v.id == id).cloned()
    }

    /// The first live VM whose description satisfies `f`.
    pub fn vms_with(&self, f: impl Fn(&VmDesc) -> bool) -> Option<Arc<Vm<P::S2>>> {
        self.inner.lock().vms.iter().find(|v| f(&v.desc)).cloned()
    }

    /// The VM whose vCPU runs on physical CPU `cpu`, with that vCPU's index.
    pub fn vm_on_cpu(&self, cpu: u32) -> Option<(Arc<Vm<P::S2>>, usize)> {
        let inner = self.inner.lock();
        inner.vms.iter().find_map(|v| {
            v.desc
                .cpus
                .iter()
                .position(|c| *c == cpu)
                .map(|i| (Arc::clone(v), i))
        })
    }

    /// All live VMs.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn vms(&self) -> Vec<Arc<Vm<P::S2>>> {
        self.inner.lock().vms.clone()
    }

    /// `None` while some VM runs or resets, a finished VM waits to be destroyed (no vCPU
    /// of it is loaded) or is being destroyed; otherwise `Some(true)` if no VM, live or
    /// destroyed, was stopped by the hypervisor. A finished VM whose vCPU never exits
    /// again does not hold the run up.
    pub fn outcome(&self) -> Option<bool> {
        let inner = self.inner.lock();
        if self.dying.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let mut ok = inner.destroyed_failed == 0;
        for vm in &inner.vms {
            let st = vm.state.lock();
            match st.status {
                VmStatus::Running | VmStatus::Resetting => return None,
                _ if st.loaded() == 0 => return None,
                VmStatus::Failed => ok = false,
                VmStatus::Off => {}
            }
        }
        Some(ok)
    }

    /// (free guest RAM bytes, total guest RAM bytes, stage-2 table frames, VMIDs in use).
    pub fn accounting(&self) -> (u64, u64, usize, usize) {
        let inner = self.inner.lock();
        (
            inner.pool.free_bytes(),
            inner.pool.total_bytes(),
            inner.platform.table_frames(),
            inner.vmids.in_use(),
        )
    }

    /// Runs `f` with the backend (e.g. to inspect a fake in tests).
    pub fn with_backend<R>(&self, f: impl FnOnce(&mut P) -> R) -> R {
        f(&mut self.inner.lock().platform)
    }
}

/// The virtual GIC of a VM described by `desc`: vCPU *i* has virtual affinity Aff0 = *i*
/// (as PSCI sees it, `crate::vm::psci`) and runs on physical CPU `desc.cpus[i]`; the
/// EL1 timers are hardware PPIs; the SPIs of its devices are hardware SPIs at their own
/// INTIDs; the virtual UART's SPI is emulated.
fn new_vgic(desc: &VmDesc, ich_vtr: u64) -> Result<Vgic, vgic::ConfigError> {
    let vcpus: Vec<vgic::VcpuDesc> = desc
        .cpus
        .iter()
        .enumerate()
        .map(|(i, &cpu)| vgic::VcpuDesc {
            mpidr: i as u64,
            pcpu_mpidr: u64::from(cpu),
        })
        .collect();
    // A device's SPIs keep their INTIDs: the guest DT copies the device node as it is.
    let mut spis: Vec<vgic::SpiDesc> = desc
        .spis
        .iter()
        .map(|&intid| vgic::SpiDesc {
            intid,
            source: vgic::SpiSource::Hardware { pintid: intid },
        })
        .collect();
    if desc.vuart.is_some() {
        spis.push(vgic::SpiDesc {
            intid: crate::config::VUART_INTID,
            source: vgic::SpiSource::Virtual,
        });
    }
    let mut vgic = Vgic::new(&vgic::VgicConfig {
        vcpus: &vcpus,
        spis: &spis,
        ich_vtr,
    })?;
    for ppi in [vgic::PPI_VTIMER, vgic::PPI_PTIMER] {
        // Both are PPIs: this cannot fail.
        let _ = vgic.set_hw_ppi(ppi);
    }
    Ok(vgic)
}

/// Zeroes RAM region `r` of `desc` except the bytes its images are copied over right
/// after ([`load_images`]): every byte ends up either zero or image, as with a full
/// scrub, without clearing (for a Linux kernel, 32 MiB) what is overwritten anyway.
fn scrub_around_images(mem: &impl GuestMemory, desc: &VmDesc, r: &GuestRegion) {
    let mut covered: Vec<(PhysAddr, PhysAddr)> = [Some(desc.kernel), desc.initrd, desc.dtb]
        .into_iter()
        .flatten()
        .filter_map(|img| {
            let pa = r.pa_of(img.ipa, img.size)?;
            Some((pa, pa.checked_add(img.size)?))
        })
        .collect();
    covered.sort_unstable();
    let mut at = r.pa;
    for (start, end) in covered {
        if let Some(gap) = start.checked_offset_from(at).filter(|&gap| gap > 0) {
            mem.zero(at, gap);
        }
        at = at.max(end);
    }
    // The description's checks refuse a region whose PA range wraps.
    let end = r.pa.saturating_add(r.size);
    if let Some(rest) = end.checked_offset_from(at).filter(|&rest| rest > 0) {
        mem.zero(at, rest);
    }
}

fn load_images(mem: &impl GuestMemory, desc: &VmDesc) -> Result<(), VmError> {
    for img in [Some(desc.kernel), desc.initrd, desc.dtb]
        .into_iter()
        .flatten()
    {
        let pa = desc
            .memory
            .iter()
            .find_map(|r| r.pa_of(img.ipa, img.size))
            .ok_or(VmError::ImageOutsideRam(img.ipa))?;
        mem.load(pa, img.src, img.size).map_err(VmError::Load)?;
    }
    Ok(())
}

/// How much of [`VmManager::claim_and_map`]'s work was done: RAM regions claimed, RAM
/// chunks and pass-through ranges mapped.
#[derive(Clone, Copy)]
struct Done {
    claimed: usize,
    mapped_ram: usize,
    mapped_dev: usize,
}

impl Done {
    /// All of it.
    const ALL: Self = Self {
        claimed: usize::MAX,
        mapped_ram: usize::MAX,
        mapped_dev: usize::MAX,
    };
}

/// Undoes `done` of [`VmManager::claim_and_map`]'s work for `desc`: unmaps, gives the RAM
/// back, frees the stage 2 and the VMID.
fn undo_claim<P: Backend>(
    inner: &mut Inner<P>,
    desc: &VmDesc,
    mut s2: P::S2,
    vmid: Vmid,
    done: Done,
) {
    for p in desc.passthrough.iter().take(done.mapped_dev) {
        let _ = s2.unmap(p.ipa, p.size);
    }
    for (c, _) in ram::start_mappings(desc).take(done.mapped_ram) {
        let _ = s2.unmap(c.ipa, c.size);
    }
    for r in desc.memory.iter().take(done.claimed) {
        let _ = inner.pool.release(r.pa_range());
    }
    inner.platform.free_stage2(s2);
    let _ = inner.vmids.release(vmid, &mut inner.platform);
}

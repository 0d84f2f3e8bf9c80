//! The VM manager: creates VMs from their descriptions, looks them up, resets and destroys
//! them, and accounts for every guest page and stage-2 table frame.
//!
//! Everything that touches hardware or memory goes through [`Platform`] (stage-2 tables,
//! copying and scrubbing physical memory, VMID TLB flushes), so this module is tested on
//! the host with a recording fake.

#[cfg(all(target_arch = "aarch64", target_os = "none"))]
pub mod hw;
pub mod pool;

use crate::psci::{PowerState, PsciVm};
use crate::share;
use crate::vdesc::{Image, Region, Stage2Mappings, VmDesc};
use crate::vmid::{Vmid, VmidAllocator, VmidBits, VmidError, VmidFlush};
use crate::vuart::VUart;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use pool::{PagePool, PoolError};
use spin::Mutex;

/// Host physical range guest RAM is taken from (`docs/memory-map.md`).
pub const GUEST_RAM: (u64, u64) = (0x5000_0000, 0x2000_0000);
/// Host physical range where QEMU's `-device loader` stages guest images
/// (`docs/memory-map.md`); never mapped into a guest.
pub const STAGING: (u64, u64) = (0x7000_0000, 0x1000_0000);

/// How a stage-2 range is mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum S2Kind {
    /// Guest RAM: Normal write-back, read/write/execute.
    Ram,
    /// Pass-through device: Device-nGnRE, read/write, never executable.
    Device,
}

impl S2Kind {
    /// The `mmu` attributes of this kind of stage-2 mapping.
    #[must_use]
    pub const fn attributes(self) -> mmu::Attributes {
        use mmu::Permissions as P;
        match self {
            Self::Ram => mmu::Attributes::normal(P::RW.union(P::EXEC_EL1).union(P::EXEC_EL0)),
            Self::Device => mmu::Attributes::device(),
        }
    }

    /// The `mmu` map flags of a VM's stage 2 with these `mappings`.
    #[must_use]
    pub const fn map_flags(mappings: Stage2Mappings) -> mmu::MapFlags {
        match mappings {
            Stage2Mappings::Blocks => mmu::MapFlags::empty(),
            Stage2Mappings::Pages => mmu::MapFlags::NO_BLOCKS,
        }
    }
}

/// IPA size of every guest (39 bits: a single level-1 root table, 512 GiB).
pub const IPA_BITS: u8 = 39;

/// One VM's stage-2 translation table. Every operation is transactional (`mmu`): on
/// error the table is unchanged and no frame leaked.
pub trait Stage2 {
    /// Maps `[ipa, ipa + size)` to `[pa, pa + size)` as `kind`, with blocks where the
    /// VM's description allows them.
    ///
    /// # Errors
    ///
    /// The `mmu` error (out of frames, already mapped, out of range).
    fn map(&mut self, ipa: u64, pa: u64, size: u64, kind: S2Kind) -> Result<(), mmu::Error>;
    /// Maps `[ipa, ipa + size)` to `[pa, pa + size)` with `attrs` (software bits
    /// included) in 4 KiB pages only, so that unmapping any part of it later needs no
    /// frame.
    ///
    /// # Errors
    ///
    /// As [`Stage2::map`].
    fn map_pages(
        &mut self,
        ipa: u64,
        pa: u64,
        size: u64,
        attrs: mmu::Attributes,
    ) -> Result<(), mmu::Error>;
    /// Unmaps `[ipa, ipa + size)` (with the TLB maintenance the change needs, for this
    /// table's VMID).
    ///
    /// # Errors
    ///
    /// The `mmu` error: out of frames when a block must be split.
    fn unmap(&mut self, ipa: u64, size: u64) -> Result<(), mmu::Error>;
    /// Sets the software bits \[58:55\] of every mapping in `[ipa, ipa + size)`.
    ///
    /// # Errors
    ///
    /// The `mmu` error: out of frames when a block must be split.
    fn set_sw(&mut self, ipa: u64, size: u64, sw: mmu::SwBits) -> Result<(), mmu::Error>;
    /// Merges the tables in `[ipa, ipa + size)` that became uniform again back into
    /// blocks, where the VM's description allows blocks (nothing otherwise). Needs no
    /// frame.
    ///
    /// # Errors
    ///
    /// The `mmu` error for a misaligned or out-of-range request.
    fn coalesce(&mut self, ipa: u64, size: u64) -> Result<(), mmu::Error>;
    /// Calls `f` for every leaf mapping that intersects `[ipa, ipa + size)`, in order.
    ///
    /// # Errors
    ///
    /// The `mmu` error for a misaligned or out-of-range request.
    fn walk(&self, ipa: u64, size: u64, f: &mut dyn FnMut(&mmu::Mapping))
        -> Result<(), mmu::Error>;
    /// `VTTBR_EL2` for this table (root address and VMID).
    fn vttbr(&self) -> u64;
}

/// A stage 2 built with `mmu` (frames from `A`, TLB maintenance by `T`) and the flags of
/// the mappings its VM's description asks for. On the machine `A` is the frame pool and `T`
/// `mmu::arch::ArmTlb`, which loads this table's own `VTTBR_EL2` for each stage-2
/// invalidation and restores the previous value (`mmu/src/arch.rs`, `switch_vttbr`): a
/// change made while another VM is current (memory sharing edits the other party's
/// table) invalidates the right VMID.
pub struct MmuStage2<A: mmu::FrameAllocator, T: mmu::TlbMaintenance>(
    /// The table.
    pub mmu::PageTable<mmu::Stage2, A, T>,
    mmu::MapFlags,
);

impl<A: mmu::FrameAllocator, T: mmu::TlbMaintenance> MmuStage2<A, T> {
    /// A new, empty table for `regime` whose VM-wide mappings follow `mappings`.
    ///
    /// # Errors
    ///
    /// No frame for the root.
    pub fn new(
        regime: mmu::Stage2,
        alloc: A,
        tlb: T,
        mappings: Stage2Mappings,
    ) -> Result<Self, mmu::Error> {
        mmu::PageTable::new(regime, alloc, tlb).map(|t| Self(t, S2Kind::map_flags(mappings)))
    }
}

impl<A: mmu::FrameAllocator, T: mmu::TlbMaintenance> Stage2 for MmuStage2<A, T> {
    fn map(&mut self, ipa: u64, pa: u64, size: u64, kind: S2Kind) -> Result<(), mmu::Error> {
        self.0.map(ipa, pa, size, kind.attributes(), self.1)
    }

    fn map_pages(
        &mut self,
        ipa: u64,
        pa: u64,
        size: u64,
        attrs: mmu::Attributes,
    ) -> Result<(), mmu::Error> {
        self.0.map(ipa, pa, size, attrs, mmu::MapFlags::NO_BLOCKS)
    }

    fn unmap(&mut self, ipa: u64, size: u64) -> Result<(), mmu::Error> {
        self.0.unmap(ipa, size)
    }

    fn set_sw(&mut self, ipa: u64, size: u64, sw: mmu::SwBits) -> Result<(), mmu::Error> {
        self.0.set_sw_bits(ipa, size, sw)
    }

    fn coalesce(&mut self, ipa: u64, size: u64) -> Result<(), mmu::Error> {
        if self.1.contains(mmu::MapFlags::NO_BLOCKS) {
            return Ok(());
        }
        // `mmu` merges only tables the range covers whole: widen it to the 2 MiB
        // blocks it touches (all of them this VM's own memory).
        const BLOCK: u64 = 2 << 20;
        let lo = ipa & !(BLOCK - 1);
        let hi = ipa
            .saturating_add(size)
            .next_multiple_of(BLOCK)
            .min(1 << IPA_BITS);
        self.0.coalesce(lo, hi - lo)
    }

    fn walk(
        &self,
        ipa: u64,
        size: u64,
        f: &mut dyn FnMut(&mmu::Mapping),
    ) -> Result<(), mmu::Error> {
        self.0.walk(ipa, size, f)
    }

    fn vttbr(&self) -> u64 {
        self.0.vttbr_el2()
    }
}

/// What the manager needs from the machine.
pub trait Platform: VmidFlush {
    /// The stage-2 table type.
    type S2: Stage2;
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
    /// Zeroes host physical memory.
    fn zero(&mut self, pa: u64, len: u64);
    /// Copies host physical memory (`src` and `dst` do not overlap).
    fn copy(&mut self, dst: u64, src: u64, len: u64);
}

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

/// Why a VM could not be created or destroyed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmError {
    /// No VMID left.
    Vmid(VmidError),
    /// A RAM region is outside guest memory or already another VM's.
    Ram(Region, PoolError),
    /// A pass-through range covers host RAM.
    PassthroughOverRam(Region),
    /// An image's staging range is not inside the staging area.
    ImageNotStaged(Image),
    /// The stage-2 table could not be built.
    Stage2(mmu::Error),
    /// No VM with that id.
    NoSuchVm(u32),
    /// A physical CPU of the description is already running another VM.
    CpuBusy(u32),
}

impl fmt::Display for VmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Vmid(e) => write!(f, "{e}"),
            Self::Ram(r, e) => write!(f, "RAM at PA {:#x} size {:#x}: {e:?}", r.pa, r.size),
            Self::PassthroughOverRam(r) => {
                write!(
                    f,
                    "pass-through PA {:#x} size {:#x} covers RAM",
                    r.pa, r.size
                )
            }
            Self::ImageNotStaged(i) => {
                write!(
                    f,
                    "image at PA {:#x} size {:#x} is outside the staging area",
                    i.pa, i.size
                )
            }
            Self::Stage2(e) => write!(f, "stage 2: {e}"),
            Self::NoSuchVm(id) => write!(f, "no VM {id}"),
            Self::CpuBusy(c) => write!(f, "physical CPU {c} already runs a VM"),
        }
    }
}

/// Fixed physical ranges the manager checks descriptions against.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    /// All host RAM (pass-through ranges may not touch it).
    pub host_ram: (u64, u64),
    /// Where guest RAM may be (the page pool).
    pub guest_ram: (u64, u64),
    /// Where QEMU stages guest images.
    pub staging: (u64, u64),
}

struct Inner<P: Platform> {
    platform: P,
    vmids: VmidAllocator,
    pool: PagePool,
    layout: Layout,
    vms: Vec<Arc<Vm<P::S2>>>,
    next_id: u32,
    /// Destroyed VMs that had been stopped by the hypervisor (for [`VmManager::outcome`]).
    destroyed_failed: usize,
}

/// All VMs, behind one lock, and the memory-sharing transactions between them, behind
/// another.
///
/// Lock order: `inner`, then a VM's `psci`, then `shares`, then one VM's `stage2` at a
/// time.
pub struct VmManager<P: Platform> {
    inner: Mutex<Inner<P>>,
    shares: Mutex<share::Table>,
}

fn within(range: (u64, u64), pa: u64, size: u64) -> bool {
    pa >= range.0 && size <= range.1 && pa - range.0 <= range.1 - size
}

fn overlaps(range: (u64, u64), pa: u64, size: u64) -> bool {
    pa < range.0.saturating_add(range.1) && range.0 < pa.saturating_add(size)
}

impl<P: Platform> VmManager<P> {
    /// A manager with no VMs.
    pub fn new(platform: P, vmid_bits: VmidBits, layout: Layout) -> Self {
        Self {
            inner: Mutex::new(Inner {
                platform,
                vmids: VmidAllocator::new(vmid_bits),
                pool: PagePool::new(layout.guest_ram.0, layout.guest_ram.1),
                layout,
                vms: Vec::new(),
                next_id: 0,
                destroyed_failed: 0,
            }),
            shares: Mutex::new(share::Table::new()),
        }
    }

    /// Creates a VM: VMID, stage 2, RAM claimed and scrubbed, images copied in, vCPU 0
    /// powered on at the entry point. VM ids count up from 0 in creation order.
    ///
    /// # Errors
    ///
    /// [`VmError`]; a failed create leaves nothing allocated.
    pub fn create(&self, desc: VmDesc) -> Result<Arc<Vm<P::S2>>, VmError> {
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        for vm in &inner.vms {
            if let Some(c) = vm.desc.cpus.iter().find(|c| desc.cpus.contains(c)) {
                return Err(VmError::CpuBusy(*c));
            }
        }
        for p in &desc.passthrough {
            if overlaps(inner.layout.host_ram, p.pa, p.size) {
                return Err(VmError::PassthroughOverRam(*p));
            }
        }
        for img in [Some(desc.kernel), desc.initrd, desc.dtb]
            .into_iter()
            .flatten()
        {
            if !within(inner.layout.staging, img.pa, img.size) {
                return Err(VmError::ImageNotStaged(img));
            }
        }
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
        let mut claimed = 0;
        let mut mapped_ram = 0;
        let mut mapped_dev = 0;
        let result = (|| {
            for r in &desc.memory {
                inner
                    .pool
                    .claim(r.pa, r.size)
                    .map_err(|e| VmError::Ram(*r, e))?;
                claimed += 1;
                scrub_around_images(&mut inner.platform, &desc, r);
                s2.map(r.ipa, r.pa, r.size, S2Kind::Ram)
                    .map_err(VmError::Stage2)?;
                mapped_ram += 1;
            }
            for p in &desc.passthrough {
                s2.map(p.ipa, p.pa, p.size, S2Kind::Device)
                    .map_err(VmError::Stage2)?;
                mapped_dev += 1;
            }
            Ok(())
        })();
        if let Err(e) = result {
            for p in &desc.passthrough[..mapped_dev] {
                let _ = s2.unmap(p.ipa, p.size);
            }
            for r in &desc.memory[..mapped_ram] {
                let _ = s2.unmap(r.ipa, r.size);
            }
            for r in &desc.memory[..claimed] {
                inner.platform.zero(r.pa, r.size);
                let _ = inner.pool.release(r.pa, r.size);
            }
            inner.platform.free_stage2(s2);
            let _ = inner.vmids.release(vmid, &mut inner.platform);
            return Err(e);
        }
        load_images(&mut inner.platform, &desc);
        let mut psci = PsciVm::new(desc.cpus.len());
        // vCPU 0 of a new VM is off, so this cannot fail.
        let _ = psci.power_on(0, desc.entry, desc.boot_x0());
        let vm = Arc::new(Vm {
            id: inner.next_id,
            vttbr: s2.vttbr(),
            desc,
            vmid,
            stage2: Mutex::new(Some(s2)),
            psci: Mutex::new(psci),
            status: Mutex::new(VmStatus::Running),
            uart: Mutex::new(VUart::new()),
            in_guest: AtomicUsize::new(0),
            boots: AtomicU32::new(1),
        });
        inner.next_id += 1;
        inner.vms.push(Arc::clone(&vm));
        Ok(vm)
    }

    /// Reboots a VM in place: every vCPU off, RAM scrubbed, images copied in again, vCPU 0
    /// on at the entry point. The VMID and stage 2 stay.
    ///
    /// # Errors
    ///
    /// [`VmError::NoSuchVm`].
    pub fn reset(&self, id: u32) -> Result<(), VmError> {
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        let vm = inner
            .vms
            .iter()
            .find(|v| v.id == id)
            .ok_or(VmError::NoSuchVm(id))?;
        let mut psci = vm.psci.lock();
        psci.all_off();
        // Its pages leave every other VM before they are scrubbed.
        self.shares.lock().end_all(&inner.vms, vm);
        for r in &vm.desc.memory {
            scrub_around_images(&mut inner.platform, &vm.desc, r);
        }
        load_images(&mut inner.platform, &vm.desc);
        let _ = psci.power_on(0, vm.desc.entry, vm.desc.boot_x0());
        vm.boots.fetch_add(1, Ordering::SeqCst);
        *vm.status.lock() = VmStatus::Running;
        Ok(())
    }

    /// Destroys a VM whose vCPUs no longer run: unmaps and frees its stage 2, scrubs and
    /// returns its RAM, flushes and frees its VMID, and logs what came back.
    ///
    /// # Errors
    ///
    /// [`VmError::NoSuchVm`].
    pub fn destroy(&self, id: u32) -> Result<(), VmError> {
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        let i = inner
            .vms
            .iter()
            .position(|v| v.id == id)
            .ok_or(VmError::NoSuchVm(id))?;
        let vm = inner.vms.swap_remove(i);
        if vm.status() == VmStatus::Failed {
            inner.destroyed_failed += 1;
        }
        vm.psci.lock().all_off();
        // Its pages leave every other VM before they are scrubbed, and pages it borrowed
        // go back to pending.
        self.shares.lock().end_all(&inner.vms, &vm);
        {
            let mut s2 = vm.stage2.lock();
            if let Some(s2) = s2.as_mut() {
                for p in &vm.desc.passthrough {
                    let _ = s2.unmap(p.ipa, p.size);
                }
                for r in &vm.desc.memory {
                    let _ = s2.unmap(r.ipa, r.size);
                }
            }
        }
        for r in &vm.desc.memory {
            inner.platform.zero(r.pa, r.size);
            let _ = inner.pool.release(r.pa, r.size);
        }
        // The flush runs before the VMID can be handed out again.
        let _ = inner.vmids.release(vm.vmid, &mut inner.platform);
        if let Some(s2) = vm.stage2.lock().take() {
            inner.platform.free_stage2(s2);
        }
        // Logged under the lock, so that no CPU can see the run finished (and end it)
        // before this line is out.
        log::info!(
            "VM {} destroyed: {} KiB RAM scrubbed and returned, VMID {} released; guest RAM \
             free {} of {} KiB, page-table frames in use {}, VMIDs in use {}",
            vm.desc.name,
            vm.desc.ram_size() / 1024,
            vm.vmid,
            inner.pool.free_bytes() / 1024,
            inner.pool.total_bytes() / 1024,
            inner.platform.table_frames(),
            inner.vmids.in_use()
        );
        Ok(())
    }

    /// Runs memory-sharing call `req` made by vCPU `vcpu` of `caller` and returns
    /// x0..x3 (`docs/hypercalls.md`, "Memory sharing between VMs"). A vCPU that is no
    /// longer on (its VM is being reset or stopped) gets `DENIED`.
    ///
    /// The manager lock is held for the whole call: the VMs it sees are the live ones,
    /// and no list of them is copied (a call allocates nothing).
    pub fn share_call(&self, caller: &Vm<P::S2>, vcpu: usize, req: share::Request) -> [u64; 4] {
        let inner = self.inner.lock();
        let psci = caller.psci.lock();
        let r = if psci.state(vcpu) == Some(PowerState::On) {
            self.shares.lock().call(&inner.vms, caller, req)
        } else {
            Err(share::Error::Denied)
        };
        drop(psci);
        drop(inner);
        share::result_regs(r)
    }

    /// Runs `f` with the memory-sharing transactions.
    pub fn with_shares<R>(&self, f: impl FnOnce(&share::Table) -> R) -> R {
        f(&self.shares.lock())
    }

    /// The VM with id `id`.
    pub fn get(&self, id: u32) -> Option<Arc<Vm<P::S2>>> {
        self.inner.lock().vms.iter().find(|v| v.id == id).cloned()
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
    pub fn vms(&self) -> Vec<Arc<Vm<P::S2>>> {
        self.inner.lock().vms.clone()
    }

    /// `None` while some VM runs or a finished VM waits to be destroyed (no vCPU runs
    /// it); otherwise `Some(true)` if no VM, live or destroyed, was stopped by the
    /// hypervisor. A finished VM whose vCPU never exits again does not hold the run up.
    pub fn outcome(&self) -> Option<bool> {
        let inner = self.inner.lock();
        let mut ok = inner.destroyed_failed == 0;
        for vm in &inner.vms {
            if vm.finished_and_idle() {
                return None;
            }
            match vm.status() {
                VmStatus::Running => return None,
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

    /// Runs `f` with the platform (e.g. to inspect a fake in tests).
    pub fn with_platform<R>(&self, f: impl FnOnce(&mut P) -> R) -> R {
        f(&mut self.inner.lock().platform)
    }
}

/// Zeroes RAM region `r` of `desc` except the bytes its images are copied over right
/// after ([`load_images`]): every byte ends up either zero or image, as with a full
/// scrub, without clearing (for a Linux kernel, 32 MiB) what is overwritten anyway.
fn scrub_around_images<P: Platform>(platform: &mut P, desc: &VmDesc, r: &Region) {
    let mut covered: Vec<(u64, u64)> = [Some(desc.kernel), desc.initrd, desc.dtb]
        .into_iter()
        .flatten()
        .filter(|img| r.contains_ipa(img.ipa, img.size))
        .map(|img| {
            let pa = r.pa + (img.ipa - r.ipa);
            (pa, pa + img.size)
        })
        .collect();
    covered.sort_unstable();
    let mut at = r.pa;
    for (start, end) in covered {
        if start > at {
            platform.zero(at, start - at);
        }
        at = at.max(end);
    }
    let end = r.pa + r.size;
    if end > at {
        platform.zero(at, end - at);
    }
}

fn load_images<P: Platform>(platform: &mut P, desc: &VmDesc) {
    for img in [Some(desc.kernel), desc.initrd, desc.dtb]
        .into_iter()
        .flatten()
    {
        // The description was checked: the image lies inside one RAM region.
        if let Some(r) = desc.ram_region(img.ipa, img.size) {
            platform.copy(r.pa + (img.ipa - r.ipa), img.pa, img.size);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::vdesc::tests as dt;
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Fake host memory (sparse: absent bytes are zero) and stage-2 tables that take one
    /// root frame plus one frame per 2 MiB of IPA space they map, from a shared counter.
    #[derive(Default)]
    pub(crate) struct Fake {
        pub mem: BTreeMap<u64, u8>,
        pub frames: Arc<AtomicUsize>,
        pub flushed: Vec<Vmid>,
        pub fail_map_at: Option<u64>,
        pub zeroed: u64,
    }

    pub(crate) struct FakeS2 {
        pub maps: BTreeMap<u64, (u64, S2Kind)>,
        /// Attributes (software bits included) of each page in `maps`.
        pub attrs: BTreeMap<u64, mmu::Attributes>,
        vmid: Vmid,
        held: usize,
        counter: Arc<AtomicUsize>,
        fail_at: Option<u64>,
    }

    impl FakeS2 {
        fn recount(&mut self) {
            let now = 1 + self
                .maps
                .keys()
                .map(|k| k >> 21)
                .collect::<BTreeSet<_>>()
                .len();
            self.counter.fetch_add(now, Ordering::SeqCst);
            self.counter.fetch_sub(self.held, Ordering::SeqCst);
            self.held = now;
        }

        fn insert(
            &mut self,
            ipa: u64,
            pa: u64,
            size: u64,
            kind: S2Kind,
            attrs: mmu::Attributes,
        ) -> Result<(), mmu::Error> {
            if self.fail_at.is_some_and(|f| ipa <= f && f < ipa + size) {
                return Err(mmu::Error::OutOfFrames);
            }
            if let Some((&va, _)) = self.maps.range(ipa..ipa + size).next() {
                return Err(mmu::Error::AlreadyMapped { va });
            }
            for off in (0..size).step_by(4096) {
                self.maps.insert(ipa + off, (pa + off, kind));
                self.attrs.insert(ipa + off, attrs);
            }
            self.recount();
            Ok(())
        }
    }

    impl Stage2 for FakeS2 {
        fn map(&mut self, ipa: u64, pa: u64, size: u64, kind: S2Kind) -> Result<(), mmu::Error> {
            self.insert(ipa, pa, size, kind, kind.attributes())
        }
        fn map_pages(
            &mut self,
            ipa: u64,
            pa: u64,
            size: u64,
            attrs: mmu::Attributes,
        ) -> Result<(), mmu::Error> {
            self.insert(ipa, pa, size, S2Kind::Ram, attrs)
        }
        fn unmap(&mut self, ipa: u64, size: u64) -> Result<(), mmu::Error> {
            for off in (0..size).step_by(4096) {
                self.maps.remove(&(ipa + off));
                self.attrs.remove(&(ipa + off));
            }
            self.recount();
            Ok(())
        }
        fn set_sw(&mut self, ipa: u64, size: u64, sw: mmu::SwBits) -> Result<(), mmu::Error> {
            for (_, a) in self.attrs.range_mut(ipa..ipa + size) {
                *a = a.with_sw(sw);
            }
            Ok(())
        }
        fn coalesce(&mut self, _ipa: u64, _size: u64) -> Result<(), mmu::Error> {
            // Pages only: nothing to merge.
            Ok(())
        }
        fn walk(
            &self,
            ipa: u64,
            size: u64,
            f: &mut dyn FnMut(&mmu::Mapping),
        ) -> Result<(), mmu::Error> {
            for (&va, &(output, _)) in self.maps.range(ipa..ipa + size) {
                f(&mmu::Mapping {
                    va,
                    size: 4096,
                    output,
                    attrs: self.attrs[&va],
                    level: 3,
                });
            }
            Ok(())
        }
        fn vttbr(&self) -> u64 {
            (u64::from(self.vmid.get()) << 48) | 0x4400_0000
        }
    }

    impl VmidFlush for Fake {
        fn flush_vmid(&mut self, vmid: Vmid) {
            self.flushed.push(vmid);
        }
    }

    impl Platform for Fake {
        type S2 = FakeS2;
        fn new_stage2(
            &mut self,
            vmid: Vmid,
            _mappings: Stage2Mappings,
        ) -> Result<FakeS2, mmu::Error> {
            self.frames.fetch_add(1, Ordering::SeqCst);
            Ok(FakeS2 {
                vmid,
                maps: BTreeMap::new(),
                attrs: BTreeMap::new(),
                held: 1,
                counter: Arc::clone(&self.frames),
                fail_at: self.fail_map_at,
            })
        }
        fn free_stage2(&mut self, s2: FakeS2) {
            assert!(
                s2.maps.is_empty(),
                "stage 2 freed while it still maps pages"
            );
            self.frames.fetch_sub(s2.held, Ordering::SeqCst);
        }
        fn table_frames(&self) -> usize {
            self.frames.load(Ordering::SeqCst)
        }
        fn zero(&mut self, pa: u64, len: u64) {
            self.zeroed += len;
            let keys: Vec<u64> = self.mem.range(pa..pa + len).map(|(k, _)| *k).collect();
            for k in keys {
                self.mem.remove(&k);
            }
        }
        fn copy(&mut self, dst: u64, src: u64, len: u64) {
            let keys: Vec<u64> = self.mem.range(dst..dst + len).map(|(k, _)| *k).collect();
            for k in keys {
                self.mem.remove(&k);
            }
            let src_bytes: Vec<(u64, u8)> = self
                .mem
                .range(src..src + len)
                .map(|(k, v)| (*k, *v))
                .collect();
            for (k, v) in src_bytes {
                self.mem.insert(k - src + dst, v);
            }
        }
    }

    /// The fake memory of [`Fake`] with real `mmu` stage-2 tables whose frames come from
    /// the heap (`mmu::testing::HeapFrames`, which counts them).
    pub(crate) struct MmuFake {
        pub fake: Fake,
        pub frames: &'static mmu::testing::HeapFrames,
    }

    pub(crate) type MmuS2 =
        MmuStage2<&'static mmu::testing::HeapFrames, mmu::testing::RecordingTlb>;

    impl VmidFlush for MmuFake {
        fn flush_vmid(&mut self, vmid: Vmid) {
            self.fake.flush_vmid(vmid);
        }
    }

    impl Platform for MmuFake {
        type S2 = MmuS2;
        fn new_stage2(
            &mut self,
            vmid: Vmid,
            mappings: Stage2Mappings,
        ) -> Result<MmuS2, mmu::Error> {
            // The VMID size is the machine's; 16 bits covers every VMID the manager
            // hands out under either setting.
            let regime = mmu::Stage2::new(vmid.get(), IPA_BITS)
                .with_pa_bits(40)
                .with_vmid16(true);
            MmuStage2::new(
                regime,
                self.frames,
                mmu::testing::RecordingTlb::new(),
                mappings,
            )
        }
        fn free_stage2(&mut self, s2: MmuS2) {
            drop(s2);
        }
        fn table_frames(&self) -> usize {
            self.frames.in_use()
        }
        fn zero(&mut self, pa: u64, len: u64) {
            self.fake.zero(pa, len);
        }
        fn copy(&mut self, dst: u64, src: u64, len: u64) {
            self.fake.copy(dst, src, len);
        }
    }

    pub(crate) const LAYOUT: Layout = Layout {
        host_ram: (0x4000_0000, 0x8000_0000),
        guest_ram: (0x5000_0000, 0x40_0000),
        staging: (0x7000_0000, 0x10_0000),
    };

    pub(crate) fn desc(pa: u64, cpu: u32) -> VmDesc {
        let blob = dt::dtb(&[("vm", dt::vm_props(pa, cpu))]);
        crate::vdesc::parse(&blob)
            .expect("valid description")
            .remove(0)
    }

    pub(crate) fn manager() -> VmManager<Fake> {
        let mut fake = Fake::default();
        // A recognisable staged kernel image: 0x2000 bytes at 0x7000_0000.
        for i in (0..0x2000u64).step_by(61) {
            fake.mem.insert(0x7000_0000 + i, (i % 251) as u8 + 1);
        }
        fake.mem.insert(0x7000_1fff, 0xee);
        VmManager::new(fake, VmidBits::Eight, LAYOUT)
    }

    #[test]
    fn create_maps_ram_loads_image_and_starts_vcpu0() {
        let m = manager();
        let vm = m.create(desc(0x5000_0000, 1)).expect("create");
        assert_eq!(vm.id, 0);
        assert_ne!(vm.vmid.get(), 0);
        assert_eq!(vm.vttbr >> 48, u64::from(vm.vmid.get()));
        {
            let s2 = vm.stage2.lock();
            let s2 = s2.as_ref().expect("live");
            assert_eq!(s2.maps.len(), 256, "1 MiB of RAM in 4 KiB pages");
            assert_eq!(s2.maps.get(&0x4000_0000), Some(&(0x5000_0000, S2Kind::Ram)));
            assert_eq!(
                s2.maps.get(&0x0900_0000),
                None,
                "the virtual UART stays unmapped"
            );
        }
        m.with_platform(|p| {
            assert_eq!(p.mem.get(&0x5000_0000), Some(&1));
            assert_eq!(p.mem.get(&0x5000_1fff), Some(&0xee));
            assert_eq!(
                p.mem.get(&(0x5000_0000 + 61 * 7)),
                Some(&((61 * 7 % 251) as u8 + 1))
            );
            assert_eq!(p.mem.get(&0x5000_2000), None);
        });
        assert_eq!(vm.psci.lock().take_pending(0), Some((0x4000_0000, 0)));
        assert!(vm.is_ram(0x400f_f000, 0x1000));
        assert!(!vm.is_ram(0x400f_f000, 0x1001));
        assert_eq!(m.outcome(), None);
    }

    #[test]
    fn two_vms_same_ipa_distinct_ram_and_vmids() {
        let m = manager();
        let a = m.create(desc(0x5000_0000, 1)).expect("a");
        let b = m.create(desc(0x5010_0000, 2)).expect("b");
        assert_ne!(a.vmid, b.vmid);
        assert_eq!(b.id, 1);
        let pa = |vm: &Arc<Vm<FakeS2>>| {
            vm.stage2
                .lock()
                .as_ref()
                .and_then(|s| s.maps.get(&0x4000_0000))
                .map(|m| m.0)
        };
        assert_eq!(pa(&a), Some(0x5000_0000));
        assert_eq!(pa(&b), Some(0x5010_0000));
        assert_eq!(m.vm_on_cpu(2).map(|(v, i)| (v.id, i)), Some((1, 0)));
        assert!(m.vm_on_cpu(0).is_none());
        // Same RAM or same CPU again: refused, nothing leaks.
        let before = m.accounting();
        assert!(matches!(
            m.create(desc(0x5000_0000, 3)),
            Err(VmError::Ram(_, PoolError::InUse))
        ));
        assert_eq!(
            m.create(desc(0x5020_0000, 1)).map(|_| ()),
            Err(VmError::CpuBusy(1))
        );
        assert_eq!(m.accounting(), before);
    }

    #[test]
    fn failed_create_leaks_nothing() {
        let m = manager();
        m.with_platform(|p| p.fail_map_at = Some(0x4008_0000));
        let before = m.accounting();
        assert_eq!(
            m.create(desc(0x5000_0000, 1)).map(|_| ()),
            Err(VmError::Stage2(mmu::Error::OutOfFrames))
        );
        assert_eq!(m.accounting(), before);
        assert!(m.vms().is_empty());
        // Outside guest RAM, and a kernel that is not in the staging area.
        m.with_platform(|p| p.fail_map_at = None);
        assert!(matches!(
            m.create(desc(0x6000_0000, 1)),
            Err(VmError::Ram(_, PoolError::OutOfRange))
        ));
        let mut d = desc(0x5000_0000, 1);
        d.kernel.pa = 0x5030_0000;
        assert!(matches!(m.create(d), Err(VmError::ImageNotStaged(_))));
        let mut d = desc(0x5000_0000, 1);
        d.passthrough.push(Region {
            ipa: 0x0a00_0000,
            pa: 0x4800_0000,
            size: 0x1000,
        });
        assert!(matches!(m.create(d), Err(VmError::PassthroughOverRam(_))));
        assert_eq!(m.accounting(), before);
    }

    #[test]
    fn thousand_create_destroy_cycles_leak_nothing() {
        let m = manager();
        let (free0, total, frames0, vmids0) = m.accounting();
        assert_eq!(free0, total);
        assert_eq!((frames0, vmids0), (0, 0));
        let mut vmids = BTreeSet::new();
        for i in 0..1000u64 {
            let pa = 0x5000_0000 + (i % 4) * 0x10_0000;
            let a = m.create(desc(pa, 1)).expect("create a");
            let b = m
                .create(desc(0x5000_0000 + ((i + 1) % 4) * 0x10_0000, 2))
                .expect("create b");
            vmids.insert(a.vmid);
            let (free, _, frames, used) = m.accounting();
            assert_eq!(free, total - 0x20_0000);
            assert_eq!(frames, 4, "root + one leaf table per VM");
            assert_eq!(used, 2);
            // The guest dirties its RAM.
            m.with_platform(|p| {
                p.mem.insert(pa + 0xf_f000, 0xaa);
            });
            let (ida, idb) = (a.id, b.id);
            // `a` is still referenced (as a CPU would): destroy must not depend on that.
            drop(b);
            m.destroy(ida).expect("destroy a");
            m.destroy(idb).expect("destroy b");
            m.with_platform(|p| {
                assert_eq!(
                    p.mem.range(0x5000_0000..0x5040_0000).count(),
                    0,
                    "RAM scrubbed"
                );
            });
            assert_eq!(m.accounting(), (total, total, 0, 0), "cycle {i}");
            assert!(a.stage2.lock().is_none());
        }
        assert!(vmids.len() > 100, "VMIDs rotate instead of reusing one");
        m.with_platform(|p| assert_eq!(p.flushed.len(), 2000, "every freed VMID was flushed"));
        assert_eq!(m.destroy(0), Err(VmError::NoSuchVm(0)));
    }

    /// A manager over real `mmu` stage-2 tables, and the heap frames they come from.
    fn mmu_manager(bits: VmidBits) -> (VmManager<MmuFake>, &'static mmu::testing::HeapFrames) {
        let frames: &'static mmu::testing::HeapFrames =
            Box::leak(Box::new(mmu::testing::HeapFrames::new()));
        let fake = MmuFake {
            fake: Fake::default(),
            frames,
        };
        (VmManager::new(fake, bits, LAYOUT), frames)
    }

    #[test]
    fn thousand_cycles_with_real_mmu_tables_leak_no_frame() {
        let (m, frames) = mmu_manager(VmidBits::Sixteen);
        for i in 0..1000u64 {
            let mut d = desc(0x5000_0000 + (i % 2) * 0x20_0000, 1);
            // A 2 MiB-aligned region (a block mapping) plus a device page.
            d.memory[0].size = 0x20_0000;
            d.passthrough.push(Region {
                ipa: 0x0a00_0000,
                pa: 0x0a00_0000,
                size: 0x1000,
            });
            let vm = m.create(d).expect("create");
            let (_, _, in_use, _) = m.accounting();
            assert!(in_use >= 3, "root and tables for RAM and device: {in_use}");
            {
                let s2 = vm.stage2.lock();
                let t = s2
                    .as_ref()
                    .expect("live")
                    .0
                    .translate(0x4000_1234)
                    .expect("mapped");
                assert_eq!(t.output, 0x5000_1234 + (i % 2) * 0x20_0000);
                assert_eq!(
                    s2.as_ref().expect("live").0.vttbr_el2() >> 48,
                    u64::from(vm.vmid.get())
                );
            }
            m.destroy(vm.id).expect("destroy");
            let (free, total, in_use, vmids) = m.accounting();
            assert_eq!((free, in_use, vmids), (total, 0, 0), "cycle {i}");
        }
        assert_eq!(frames.in_use(), 0);
        assert!(frames.total_allocated() >= 3000);
        assert_eq!(frames.total_allocated(), frames.total_freed());
    }

    #[test]
    fn stage2_mappings_of_the_description_reach_the_table() {
        let (m, frames) = mmu_manager(VmidBits::Eight);
        for (mappings, level, tables) in [
            (Stage2Mappings::Blocks, 2, 2),
            (Stage2Mappings::Pages, 3, 3),
        ] {
            let mut d = desc(0x5000_0000, 1);
            d.memory[0].size = 0x20_0000;
            d.stage2 = mappings;
            let vm = m.create(d).expect("create");
            let s2 = vm.stage2.lock();
            let t = s2.as_ref().expect("live").0.translate(0x4010_0000);
            assert_eq!(t.map(|t| t.level), Some(level), "{mappings:?}");
            assert_eq!(
                frames.in_use(),
                tables,
                "{mappings:?}: root, L2 and L3 tables"
            );
            drop(s2);
            m.destroy(vm.id).expect("destroy");
        }
    }

    #[test]
    fn reset_reloads_and_outcome() {
        let m = manager();
        let a = m.create(desc(0x5000_0000, 1)).expect("a");
        let b = m.create(desc(0x5010_0000, 2)).expect("b");
        a.psci.lock().take_pending(0);
        m.with_platform(|p| {
            p.mem.insert(0x5000_0000, 0x55);
            p.mem.insert(0x5008_0000, 0x66);
        });
        assert_eq!(a.boots.load(Ordering::SeqCst), 1);
        m.reset(a.id).expect("reset");
        assert_eq!(a.boots.load(Ordering::SeqCst), 2);
        m.with_platform(|p| {
            assert_eq!(p.mem.get(&0x5000_0000), Some(&1), "image copied again");
            assert_eq!(p.mem.get(&0x5008_0000), None, "RAM scrubbed");
        });
        assert_eq!(a.psci.lock().take_pending(0), Some((0x4000_0000, 0)));
        // Both VMs have a vCPU that never leaves the guest.
        a.enter();
        b.enter();
        *a.status.lock() = VmStatus::Off;
        assert_eq!(m.outcome(), None);
        *b.status.lock() = VmStatus::Failed;
        assert_eq!(m.outcome(), Some(false));
        *b.status.lock() = VmStatus::Off;
        assert_eq!(m.outcome(), Some(true));
        assert_eq!(m.reset(9), Err(VmError::NoSuchVm(9)));
    }

    #[test]
    fn finished_vms_are_destroyed_only_when_idle_and_remembered() {
        let m = manager();
        let a = m.create(desc(0x5000_0000, 1)).expect("a");
        let b = m.create(desc(0x5010_0000, 2)).expect("b");
        a.enter();
        assert!(!a.leave(), "a running VM is not finished");
        a.enter();
        *a.status.lock() = VmStatus::Failed;
        assert!(!a.finished_and_idle(), "a vCPU still runs it");
        assert!(a.leave(), "the last vCPU out finds it finished");
        assert_eq!(m.outcome(), None, "a waits to be destroyed");
        m.destroy(a.id).expect("destroy a");
        assert_eq!(m.outcome(), None, "b still runs");
        *b.status.lock() = VmStatus::Off;
        assert!(b.finished_and_idle());
        assert_eq!(m.outcome(), None, "b waits to be destroyed");
        m.destroy(b.id).expect("destroy b");
        assert!(m.vms().is_empty());
        assert_eq!(
            m.outcome(),
            Some(false),
            "a destroyed VM that failed still counts"
        );
        let (free, total, frames, vmids) = m.accounting();
        assert_eq!((free, frames, vmids), (total, 0, 0));
    }

    #[test]
    fn create_scrubs_every_byte_the_images_do_not_cover() {
        let m = manager();
        // Stale data in the RAM the VM will get: inside and outside the image's range.
        m.with_platform(|p| {
            p.mem.insert(0x5000_0010, 0x55);
            p.mem.insert(0x5000_3000, 0x66);
            p.mem.insert(0x500f_ffff, 0x77);
        });
        let vm = m.create(desc(0x5000_0000, 1)).expect("create");
        let ram = vm.desc.ram_size();
        m.with_platform(|p| {
            // The 0x2000-byte image replaced what was under it; the rest is zero.
            assert_eq!(p.zeroed, ram - 0x2000, "only the bytes no image covers");
            assert_eq!(p.mem.get(&0x5000_0010), None, "image bytes there are zero");
            assert_eq!(p.mem.get(&0x5000_1fff), Some(&0xee));
            assert_eq!(p.mem.get(&0x5000_3000), None);
            assert_eq!(p.mem.get(&0x500f_ffff), None);
        });
    }
}

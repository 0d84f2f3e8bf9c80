//! Running VMs on the machine: the [`Platform`] of the VM manager over the real frame pool
//! and `mmu` stage-2 tables, the per-CPU vCPU run loop, and the few system-register
//! writes that configure EL2 for a guest (`regs`).
//!
//! Static partitioning: each physical CPU runs at most one vCPU, so the guest's EL1
//! system registers stay in the CPU and are never saved or switched; they are reset when
//! the vCPU (re)starts.

mod regs;

use alloc::sync::Arc;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use mmu::arch::ArmTlb;
use mmu::{FrameAllocator, PhysToVirt};
use spin::Once;

use super::{
    Layout, MmuStage2, Platform, Vm, VmError, VmManager, VmStatus, GUEST_RAM, IPA_BITS, STAGING,
};
use crate::start::{self, Machine, FRAMES};
use crate::vcpu::{self, ExitReason, GuestEl1, Next, VcpuCtx};
use crate::vdesc;
use crate::vmid::{Vmid, VmidBits, VmidFlush};
use crate::vuart::LineSink;

static MANAGER: Once<VmManager<Hw>> = Once::new();
/// Set by the CPU that ends the run.
static FINISHING: AtomicBool = AtomicBool::new(false);
/// Page-table frames in use right before the first VM was created.
static FRAMES_BEFORE_VMS: AtomicUsize = AtomicUsize::new(0);

/// Table frames from the hypervisor's frame pool, zeroed on allocation; the EL2 stage 1
/// maps the pool identity (VA = PA).
#[derive(Clone, Copy, Debug, Default)]
pub struct HwFrames;

// SAFETY: the frame pool is identity mapped read/write in the hypervisor's stage 1.
unsafe impl PhysToVirt for HwFrames {
    fn phys_to_virt(&self, pa: u64) -> *mut u64 {
        pa as *mut u64
    }
}

// SAFETY: the pool hands out each 4 KiB frame once until it is freed; it is zeroed
// before it is returned.
unsafe impl FrameAllocator for HwFrames {
    fn alloc_frame(&mut self) -> Option<u64> {
        let pa = FRAMES.get()?.lock().alloc()?;
        // SAFETY: the pool just handed out this 4 KiB frame to us alone; it is
        // identity-mapped read/write in the hypervisor's stage 1.
        unsafe { core::ptr::write_bytes(pa as *mut u8, 0, 4096) };
        Some(pa)
    }

    fn free_frame(&mut self, pa: u64) {
        if let Some(pool) = FRAMES.get() {
            if let Err(e) = pool.lock().free(pa) {
                log::error!("stage 2: {e}");
            }
        }
    }
}

/// One VM's stage 2 on the machine.
pub type HwStage2 = MmuStage2<HwFrames, ArmTlb>;

/// The machine side of the VM manager.
pub struct Hw {
    vmid_bits: VmidBits,
    /// The CPUs implement FEAT_TLBIRANGE: stage-2 tables invalidate runs of pages with
    /// one instruction (`mmu::PageTable::set_tlbi_range`).
    tlbi_range: bool,
    /// An all-invalid stage-2 root, loaded while flushing a VMID that has no table.
    empty_root: u64,
}

impl Hw {
    fn stage2_regime(&self, vmid: Vmid) -> mmu::Stage2 {
        mmu::Stage2::new(vmid.get(), IPA_BITS)
            .with_pa_bits(regs::pa_bits())
            .with_vmid16(self.vmid_bits == VmidBits::Sixteen)
    }
}

impl VmidFlush for Hw {
    fn flush_vmid(&mut self, vmid: Vmid) {
        let regime = self.stage2_regime(vmid);
        match regime.vtcr() {
            // SAFETY: at EL2 with no vCPU of this VMID running; `empty_root` is an
            // all-invalid stage-2 root (one table: IPA_BITS starts at level 1) that lives
            // as long as `Hw`. TLBI VMALLS12E1IS with the VMID and its VTCR_EL2 current.
            Ok(vtcr) => unsafe { mmu::arch::invalidate_vmid(vtcr, regime.vttbr(self.empty_root)) },
            Err(e) => log::error!("VMID {}: {e}", vmid.get()),
        }
    }
}

impl Platform for Hw {
    type S2 = HwStage2;

    fn new_stage2(
        &mut self,
        vmid: Vmid,
        mappings: vdesc::Stage2Mappings,
    ) -> Result<HwStage2, mmu::Error> {
        MmuStage2::new(self.stage2_regime(vmid), HwFrames, ArmTlb, mappings).map(|mut s2| {
            s2.0.set_tlbi_range(self.tlbi_range);
            s2
        })
    }

    fn free_stage2(&mut self, s2: HwStage2) {
        // Dropping the table returns its remaining frames (the root) to the pool.
        drop(s2);
    }

    fn table_frames(&self) -> usize {
        FRAMES.get().map_or(0, |p| p.lock().in_use())
    }

    fn zero(&mut self, pa: u64, len: u64) {
        // SAFETY: the manager only passes guest RAM it owns (checked against GUEST_RAM),
        // which the hypervisor's stage 1 maps read/write; no vCPU of the VM runs.
        unsafe { boot::zero_and_clean(pa, len) };
    }

    fn copy(&mut self, dst: u64, src: u64, len: u64) {
        // SAFETY: `src` is in the staging range and `dst` in the VM's RAM (checked by the
        // manager); both are mapped, and they do not overlap.
        unsafe { boot::copy_and_clean(dst, src, len) };
    }
}

/// Prints the virtual UART's lines through the logger: `[name] text`.
struct ConsoleLines;

impl LineSink for ConsoleLines {
    fn line(&mut self, name: &str, text: &str) {
        log::info!("[{name}] {text}");
    }
}

/// The running guest's EL1 exception registers.
struct HwEl1;

impl GuestEl1 for HwEl1 {
    fn vbar(&self) -> u64 {
        regs::vbar_el1()
    }

    fn set_exception(&mut self, esr: u64, far: u64, elr: u64, spsr: u64) {
        regs::set_el1_exception(esr, far, elr, spsr);
    }
}

/// Primary-CPU hook: creates every VM the device tree describes, publishes them to the
/// other CPUs, then runs this CPU's vCPU, if any. Never returns: the machine stops when
/// the last VM is done (`docs/vms.md`, "When the run ends").
pub fn run_vms(machine: &Machine) -> ! {
    let dtb = machine.platform.dtb;
    // SAFETY: the device tree QEMU passed stays mapped read-only and unchanged for the
    // whole run (the layout reserves its pages).
    let blob = unsafe { core::slice::from_raw_parts(dtb.base as *const u8, dtb.size as usize) };
    let descs = match vdesc::parse(blob) {
        Ok(d) => d,
        Err(e) => start::fatal(format_args!("VM description: {e}")),
    };
    log::info!(
        "hypervisor ready: {} CPUs online, {} VMs described",
        machine.cpus_online,
        descs.len()
    );
    if descs.is_empty() {
        log::info!("no VMs described under /chosen: nothing to run");
        start::power_off();
    }
    let vmid_bits = regs::vmid_bits();
    let empty_root = HwFrames
        .alloc_frame()
        .unwrap_or_else(|| start::fatal(format_args!("no frame for the empty stage-2 root")));
    let host_ram = machine
        .platform
        .memory()
        .iter()
        .fold((u64::MAX, 0u64), |(lo, hi), r| {
            (lo.min(r.base), hi.max(r.end()))
        });
    let layout = Layout {
        host_ram: (host_ram.0, host_ram.1.saturating_sub(host_ram.0)),
        guest_ram: GUEST_RAM,
        staging: STAGING,
    };
    FRAMES_BEFORE_VMS.store(
        FRAMES.get().map_or(0, |p| p.lock().in_use()),
        Ordering::SeqCst,
    );
    // Read on this CPU; the machines we run on have one kind of CPU.
    let tlbi_range = mmu::arch::has_tlbi_range();
    let hw = Hw {
        vmid_bits,
        tlbi_range,
        empty_root,
    };
    let manager = VmManager::new(hw, vmid_bits, layout);
    log::info!(
        "VMs: {} described, {}-bit VMIDs, {IPA_BITS}-bit IPA, {}-bit PA, range TLBI {}",
        descs.len(),
        if vmid_bits == VmidBits::Sixteen {
            16
        } else {
            8
        },
        regs::pa_bits(),
        if tlbi_range { "yes" } else { "no" }
    );
    for mut desc in descs {
        let name = desc.name.clone();
        stage_linux_dtb(&mut desc, blob);
        for &cpu in &desc.cpus {
            if cpu_index_of(u64::from(cpu)).is_none() {
                start::fatal(format_args!("VM {name}: CPU {cpu:#x} is not an online CPU"));
            }
        }
        match manager.create(desc) {
            Ok(vm) => {
                log::info!(
                    "VM {} created: id {}, VMID {}, {} vCPU(s) on CPUs {:?}, {} KiB RAM, entry {:#x}",
                    vm.desc.name,
                    vm.id,
                    vm.vmid,
                    vm.desc.cpus.len(),
                    vm.desc.cpus,
                    vm.desc.ram_size() / 1024,
                    vm.desc.entry
                );
                log_stage2_layout(&vm.desc);
            }
            Err(e) => start::fatal(format_args!("VM {name}: {e}")),
        }
    }
    MANAGER.call_once(|| manager);
    aarch64_cpu::asm::sev();
    for cpu in 1..boot::MAX_CPUS {
        start::wake(cpu);
    }
    run_cpu(0)
}

/// One log line per stage-2 range of a new VM: what the guest can reach, and how.
fn log_stage2_layout(desc: &vdesc::VmDesc) {
    for r in &desc.memory {
        log::info!(
            "VM {} stage 2: IPA [{:#x}, {:#x}) -> PA {:#x}: RAM, normal write-back, RWX, {}",
            desc.name,
            r.ipa,
            r.ipa + r.size,
            r.pa,
            match desc.stage2 {
                vdesc::Stage2Mappings::Blocks => "blocks where aligned",
                vdesc::Stage2Mappings::Pages => "4 KiB pages",
            }
        );
    }
    for r in &desc.passthrough {
        log::info!(
            "VM {} stage 2: IPA [{:#x}, {:#x}) -> PA {:#x}: pass-through, device-nGnRE, RW",
            desc.name,
            r.ipa,
            r.ipa + r.size,
            r.pa
        );
    }
    if let Some(u) = desc.vuart {
        log::info!(
            "VM {} stage 2: IPA [{u:#x}, {:#x}): virtual UART, unmapped (emulated)",
            desc.name,
            u + vdesc::PAGE_SIZE
        );
    }
}

/// For a VM that boots Linux (`bootargs` and no `dtb`), builds its DTB and stages it after
/// its images (`crate::linux::complete_desc`); stops the run if the VM cannot boot.
fn stage_linux_dtb(desc: &mut vdesc::VmDesc, host_dtb: &[u8]) {
    let kernel = desc.kernel;
    if !super::within(STAGING, kernel.pa, kernel.size) {
        // Left for VmManager::create to refuse with its own message.
        return;
    }
    let head_len = kernel.size.min(crate::linux::image::HEADER_LEN as u64) as usize;
    // SAFETY: the kernel's staged bytes lie in the staging range (checked above), which the
    // hypervisor's stage 1 maps and QEMU filled before any CPU ran; nothing writes it now.
    let head = unsafe { core::slice::from_raw_parts(kernel.pa as *const u8, head_len) };
    match crate::linux::complete_desc(desc, host_dtb, head, STAGING) {
        Ok(None) => {}
        Ok(Some((pa, dtb))) => {
            // SAFETY: complete_desc placed `[pa, pa + len)` inside the staging range, after
            // every staged image of this VM; the range is mapped read/write and no CPU
            // runs a guest yet.
            unsafe { core::ptr::copy_nonoverlapping(dtb.as_ptr(), pa as *mut u8, dtb.len()) };
            log::info!(
                "VM {}: Linux boot: kernel {:#x}, DTB ({} bytes) at {:#x}, initrd {:x?}",
                desc.name,
                desc.entry,
                dtb.len(),
                desc.boot_x0(),
                desc.initrd.map(|i| (i.ipa, i.ipa + i.size))
            );
        }
        Err(e) => start::fatal(format_args!("VM {}: cannot boot Linux: {e:?}", desc.name)),
    }
}

/// Secondary-CPU hook: waits for the VMs to exist, then runs this CPU's vCPU, if any.
pub fn secondary_idle(cpu: usize) -> ! {
    // Off until there is a vCPU to run here: the primary wakes every CPU once the VMs
    // exist, and a guest's CPU_ON wakes the CPU of the vCPU it starts.
    start::park_off(cpu, || has_work(cpu));
    while MANAGER.get().is_none() {
        aarch64_cpu::asm::wfe();
    }
    run_cpu(cpu)
}

fn cpu_index_of(mpidr: u64) -> Option<usize> {
    (0..boot::MAX_CPUS).find(|&i| start::cpu_mpidr(i) == Some(mpidr))
}

/// Whether CPU `cpu` has a vCPU waiting to start (its VM exists, runs, and has a start
/// pending for it).
fn has_work(cpu: usize) -> bool {
    let Some(manager) = MANAGER.get() else {
        return false;
    };
    let Some(mpidr) = start::cpu_mpidr(cpu).and_then(|m| u32::try_from(m).ok()) else {
        return false;
    };
    manager.vm_on_cpu(mpidr).is_some_and(|(vm, index)| {
        vm.status() == VmStatus::Running
            && matches!(
                vm.psci.lock().state(index),
                Some(crate::psci::PowerState::OnPending { .. })
            )
    })
}

/// Wakes the parked CPUs of `vm`'s vCPUs that have a start pending (after a `CPU_ON`).
fn wake_pending(vm: &Vm<HwStage2>) {
    for (index, &cpu) in vm.desc.cpus.iter().enumerate() {
        let pending = matches!(
            vm.psci.lock().state(index),
            Some(crate::psci::PowerState::OnPending { .. })
        );
        if pending {
            if let Some(i) = cpu_index_of(u64::from(cpu)) {
                start::wake(i);
            }
        }
    }
}

/// A CPU with nothing (more) to run: off through the firmware, or, for CPU 0, which
/// cannot be, a `WFE` loop.
fn idle_forever(cpu: usize) -> ! {
    start::park_off(cpu, || false);
    start::park()
}

fn run_cpu(cpu: usize) -> ! {
    let Some(manager) = MANAGER.get() else {
        idle_forever(cpu)
    };
    let Some(mpidr) = start::cpu_mpidr(cpu) else {
        idle_forever(cpu)
    };
    let Ok(mpidr32) = u32::try_from(mpidr) else {
        idle_forever(cpu)
    };
    let Some((vm, index)) = manager.vm_on_cpu(mpidr32) else {
        idle_forever(cpu)
    };
    loop {
        // Off until a CPU_ON starts this vCPU (or the VM ends).
        start::park_off(cpu, || has_work(cpu) || vm.status() != VmStatus::Running);
        let Some((entry, context)) = wait_for_start(&vm, index) else {
            break;
        };
        log::info!("VM {}: vCPU {index} starts at {entry:#x}", vm.desc.name);
        vm.enter();
        run_vcpu(manager, &vm, index, entry, context);
        regs::leave_guest_context();
        if vm.leave() {
            destroy(manager, &vm);
        }
        if let Some(ok) = manager.outcome() {
            finish(ok);
        }
    }
    // The VM is finished; this CPU has nothing left to run.
    idle_forever(cpu)
}

/// Waits until vCPU `index` is started (returns its entry and x0), or `None` once the VM
/// is powered off or stopped.
fn wait_for_start(vm: &Vm<HwStage2>, index: usize) -> Option<(u64, u64)> {
    loop {
        if vm.status() != VmStatus::Running {
            return None;
        }
        if let Some(start) = vm.psci.lock().take_pending(index) {
            return Some(start);
        }
        aarch64_cpu::asm::wfe();
    }
}

/// Destroys a finished VM no CPU runs any more (the manager logs what came back).
fn destroy(manager: &VmManager<Hw>, vm: &Vm<HwStage2>) {
    match manager.destroy(vm.id) {
        // Another CPU destroyed it first.
        Ok(()) | Err(VmError::NoSuchVm(_)) => {}
        Err(e) => log::error!("VM {}: destroy failed: {e}", vm.desc.name),
    }
}

fn run_vcpu(manager: &VmManager<Hw>, vm: &Arc<Vm<HwStage2>>, index: usize, entry: u64, ctx: u64) {
    let vtcr = manager
        .with_platform(|hw| hw.stage2_regime(vm.vmid).vtcr())
        .unwrap_or(0);
    regs::enter_guest_context(vm.vttbr, vtcr, index as u64);
    let mut regs = boot::GuestRegs::new(entry, ctx);
    loop {
        // SAFETY: HCR_EL2, VTCR_EL2 and VTTBR_EL2 were just set up for this VM, whose
        // stage 2 maps only its own RAM and pass-through devices; its EL1 registers are
        // reset; interrupts are masked at EL2.
        let exit = unsafe { boot::enter_guest(&mut regs) };
        let reason = match exit {
            boot::Exit::Sync { esr, far, hpfar } => ExitReason::Sync {
                esr: esr.bits(),
                far,
                hpfar,
            },
            boot::Exit::Irq | boot::Exit::Fiq => ExitReason::Interrupt,
            boot::Exit::SError { esr } => ExitReason::SError { esr: esr.bits() },
        };
        let mut ctx = VcpuCtx {
            x: &mut regs.x,
            pc: &mut regs.pc,
            pstate: &mut regs.pstate,
        };
        let next = vcpu::handle_exit(
            vm,
            index,
            &mut ctx,
            reason,
            &mut HwEl1,
            &mut ConsoleLines,
            &mut |req| manager.share_call(vm, index, req),
        );
        // A CPU_ON may have made another vCPU runnable.
        aarch64_cpu::asm::sev();
        wake_pending(vm);
        match next {
            Next::Resume => {}
            Next::Stop => return,
            Next::Reset => {
                if let Err(e) = manager.reset(vm.id) {
                    log::error!("VM {}: reset failed: {e}", vm.desc.name);
                }
                return;
            }
        }
    }
}

fn finish(ok: bool) -> ! {
    // Several CPUs may see the last VM finish; one reports and ends the run.
    if FINISHING.swap(true, Ordering::SeqCst) {
        start::park();
    }
    let frames = FRAMES.get().map_or(0, |p| p.lock().in_use());
    log::info!(
        "page-table frames in use: {frames} ({} before the VMs were created)",
        FRAMES_BEFORE_VMS.load(Ordering::SeqCst)
    );
    if ok {
        log::info!("twostage: all VMs done: success");
        start::power_off()
    } else {
        log::error!("twostage: all VMs done: failure");
        boot::semihosting_exit(boot::exit_status::VM_FAILED)
    }
}

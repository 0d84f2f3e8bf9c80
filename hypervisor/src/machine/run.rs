//! Running VMs on the machine: the [`Backend`] of the VM manager over the frame pool and
//! `mmu` stage-2 tables, and the per-CPU run loop that enters vCPUs and acts on what
//! `crate::vcpu` decides (handle an exit, park, wake, end the run).
//!
//! Static partitioning: each physical CPU runs at most one vCPU, so the guest's EL1
//! system registers stay in the CPU and are never saved or switched; they are reset when
//! the vCPU (re)starts.

use alloc::sync::Arc;
use core::sync::atomic::{AtomicUsize, Ordering};

use mmu::arch::ArmTlb;
use mmu::FrameAllocator;
use spin::Once;

use super::cpu::{cpu_mpidr, park, park_off, power_off, wake};
use super::fatal::fatal;
use super::fw_cfg;
use super::gic;
use super::guest_ram::{self, MachineMemory};
use super::pl011::Pl011;
use super::regs;
use super::{with_guest_ram, Machine, FRAMES};
use crate::config;
use crate::config::fw_cfg::FwCfgError;
use crate::config::ImageSource;
use crate::mem::bulk::cpu_bit;
use crate::mem::frames::SharedFrames;
use crate::mem::layout::STAGING;
use crate::mem::window::Access;
use crate::mem::{Ipa, PhysAddr, PhysRange};
use crate::vcpu::cpu_state::El2Controls;
use crate::vcpu::irq::Taken;
use crate::vcpu::schedule::{self, RunEnd, Start};
use crate::vcpu::{self, GuestEl1, Next, VcpuCtx};
use crate::vm::vgic::{lr::MAX_LIST_REGS, Flush, PhysAction, PhysGic, VcpuMask};
use crate::vm::vmid::{Vmid, VmidBits, VmidFlush};
use crate::vm::vuart::LineSink;
use crate::vm::{Backend, GuestMemory, MmuStage2, Stage2Config, Vm, VmManager, IPA_BITS};

static MANAGER: Once<VmManager<MachineBackend>> = Once::new();
/// The CPU that ends the run.
static RUN_END: RunEnd = RunEnd::new();
/// Page-table frames in use right before the first VM was created.
static FRAMES_BEFORE_VMS: AtomicUsize = AtomicUsize::new(0);
/// CPUs taking a vCPU start or between a taken one and the end of
/// [`schedule::vcpu_left`] (which destroys a finished VM whose last vCPU that was): what
/// the end of the run waits for, without a lock.
static LOADED: AtomicUsize = AtomicUsize::new(0);

/// One VM's stage 2 on the machine: frames from the pool, TLB maintenance by `asm!`.
type MachineStage2 = MmuStage2<SharedFrames, ArmTlb>;

/// The machine side of the VM manager.
struct MachineBackend {
    /// The frame pool, for stage-2 tables.
    frames: SharedFrames,
    /// The shape of every stage 2.
    stage2: Stage2Config,
    /// An all-invalid stage-2 root, loaded while flushing a VMID that has no table.
    empty_root: u64,
}

impl VmidFlush for MachineBackend {
    fn flush_vmid(&mut self, vmid: Vmid) {
        let regime = self.stage2.regime(vmid);
        match regime.vtcr() {
            // SAFETY: at EL2 with no vCPU of this VMID running; `empty_root` is an
            // all-invalid stage-2 root that lives as long as the backend. TLBI
            // VMALLS12E1IS with the VMID and its VTCR_EL2 current.
            Ok(vtcr) => unsafe { mmu::arch::invalidate_vmid(vtcr, regime.vttbr(self.empty_root)) },
            Err(e) => log::error!("VMID {}: {e}", vmid.get()),
        }
    }
}

impl Backend for MachineBackend {
    type S2 = MachineStage2;
    type Mem = MachineMemory;

    fn memory(&self) -> MachineMemory {
        MachineMemory
    }

    fn new_stage2(
        &mut self,
        vmid: Vmid,
        mappings: config::Stage2Mappings,
    ) -> Result<MachineStage2, mmu::Error> {
        self.stage2.new_table(vmid, self.frames, ArmTlb, mappings)
    }

    fn free_stage2(&mut self, s2: MachineStage2) {
        // Dropping the table returns its remaining frames (the root) to the pool.
        drop(s2);
    }

    fn table_frames(&self) -> usize {
        self.frames.pool().lock().in_use()
    }

    fn ich_vtr(&self) -> u64 {
        gic::ich_vtr()
    }

    fn apply_gic(&mut self, action: PhysAction) {
        gic::Physical.apply(action);
    }
}

/// Prints the virtual UART's lines through the logger: `[name] text`.
struct ConsoleLines;

impl LineSink for ConsoleLines {
    fn line(&mut self, name: &str, text: &str) {
        super::console::LOGGER.guest_line(name, text);
    }

    fn event(&mut self, level: log::Level, args: core::fmt::Arguments<'_>) {
        log::log!(level, "{args}");
    }

    fn micros(&self) -> u64 {
        super::console::micros()
    }

    fn input_wanted(&mut self, _name: &str) {
        // Only the input VM calls this (its description says so). Bytes the physical
        // FIFO still holds raise its interrupt again, on that VM's CPU.
        if let Some(input) = CONSOLE_INPUT.get() {
            input.uart.set_rx_interrupt(true);
        }
    }
}

/// What an exit of the running guest reaches on this CPU: its EL1 exception registers,
/// the console, the physical GIC; and what the CPU is, read once when the vCPU starts
/// (not on every exit that asks).
struct MachineHost {
    /// The EL2 controls the vCPU runs with.
    controls: El2Controls,
    /// The CPU has FEAT_RAS.
    ras: bool,
}

impl MachineHost {
    /// Reads this CPU's ID registers.
    fn new() -> Self {
        let id = regs::id_regs();
        Self {
            controls: El2Controls::for_cpu(&id),
            ras: id.has_ras(),
        }
    }
}

impl GuestEl1 for MachineHost {
    fn vbar(&self) -> u64 {
        regs::vbar_el1()
    }

    fn stage1_ipa(&mut self, va: u64) -> Option<u64> {
        regs::stage1_ipa(va)
    }

    fn invalidate_local(&mut self, ipa: Option<Ipa>) {
        regs::invalidate_local(ipa.map(Ipa::get));
    }

    fn sctlr(&self) -> u64 {
        regs::sctlr_el1()
    }

    fn set_exception(&mut self, esr: u64, far: u64, elr: u64, spsr: u64) {
        regs::set_el1_exception(esr, far, elr, spsr);
    }

    fn controls(&self) -> El2Controls {
        self.controls
    }

    fn has_ras(&self) -> bool {
        self.ras
    }

    fn pmcr(&self) -> u64 {
        regs::pmcr()
    }

    fn set_pmcr(&mut self, value: u64) {
        regs::set_pmcr(value);
    }

    fn inject_serror(&mut self, vsesr: Option<u64>) {
        regs::inject_serror(vsesr.filter(|_| self.has_ras()));
    }

    fn clean_invalidate(&mut self, pa: PhysAddr, len: u64) {
        // `[pa, pa + len)` is RAM of the running VM (from its description, inside its pool
        // of guest RAM), mapped read-only, normal memory, by the window a chunk at a time
        // (`DC CIVAC` needs read permission only).
        with_guest_ram(
            pa.get(),
            len,
            Access::Read,
            boot::clean_invalidate_dcache_range,
        );
    }
}

/// A first touch scrubs one chunk of the running VM's RAM (`crate::vm::ram`), on this
/// CPU: 2 MiB is below what parked CPUs are woken for.
impl GuestMemory for MachineHost {
    fn zero(&self, pa: PhysAddr, len: u64) {
        MachineMemory.zero(pa, len);
    }

    fn load(&self, dst: PhysAddr, src: ImageSource, len: u64) -> Result<(), FwCfgError> {
        MachineMemory.load(dst, src, len)
    }

    fn clean_to_poc(&self, va: u64, len: u64) {
        MachineMemory.clean_to_poc(va, len);
    }
}

impl LineSink for MachineHost {
    fn line(&mut self, name: &str, text: &str) {
        ConsoleLines.line(name, text);
    }

    fn event(&mut self, level: log::Level, args: core::fmt::Arguments<'_>) {
        ConsoleLines.event(level, args);
    }

    fn micros(&self) -> u64 {
        ConsoleLines.micros()
    }

    fn input_wanted(&mut self, name: &str) {
        ConsoleLines.input_wanted(name);
    }
}

impl PhysGic for MachineHost {
    fn apply(&mut self, action: PhysAction) {
        gic::Physical.apply(action);
    }
}

/// Where the console's input goes: the physical PL011's interrupt, the VM that gets it.
struct ConsoleInput {
    intid: u32,
    vm: u32,
    uart: Pl011,
}

// SAFETY: the PL011 value is an MMIO address; its receive side is used only through
// `read_byte`/`set_rx_interrupt`, which touch the receive registers alone, each access
// a single volatile load or store.
unsafe impl Sync for ConsoleInput {}

static CONSOLE_INPUT: Once<ConsoleInput> = Once::new();

/// Sends the console's input to the VM whose description has `console-input`: its
/// physical interrupt routed (level-sensitive) to that VM's vCPU 0's CPU and enabled, the
/// PL011's receive interrupts unmasked. Without such a VM the input is not read.
fn route_console_input(machine: &Machine) {
    let Some(manager) = MANAGER.get() else { return };
    let (Some(intid), Some(base)) = (machine.platform.uart_intid, machine.platform.uart) else {
        return;
    };
    let Some(vm) = manager.vms_with(|d| d.console_input) else {
        return;
    };
    let Some(&cpu) = vm.desc.cpus.first() else {
        return;
    };
    // SAFETY: the PL011 the device tree names, mapped by the stage 1 ("uart"); this value
    // only uses its receive registers (see `ConsoleInput`).
    let uart = unsafe { Pl011::new(base.base.get() as usize) };
    let input = CONSOLE_INPUT.call_once(|| ConsoleInput {
        intid,
        vm: vm.id,
        uart,
    });
    let mut phys = gic::Physical;
    phys.apply(PhysAction::Trigger {
        pintid: intid,
        level: true,
    });
    phys.apply(PhysAction::Route {
        pintid: intid,
        mpidr: u64::from(cpu),
    });
    phys.apply(PhysAction::Enable {
        pintid: intid,
        enable: true,
    });
    input.uart.set_rx_interrupt(true);
    log::info!(
        "console input goes to VM {} (INTID {intid} on CPU {cpu:#x})",
        vm.desc.name
    );
}

/// The console's receive interrupt, taken on the input VM's CPU: moves as many bytes as
/// its UART's receive FIFO takes; if more wait, masks the physical receive interrupt until
/// the guest reads (`LineSink::input_wanted`), so a guest that does not read cannot keep
/// its CPU in EL2.
fn console_input(input: &ConsoleInput, vm: &Vm<MachineStage2>, kicks: &mut VcpuMask) {
    if vm.id != input.vm {
        // The VM is gone and another runs here now: the input has nowhere to go.
        input.uart.set_rx_interrupt(false);
        return;
    }
    let mut uart = vm.uart.lock();
    // The register page goes before the first byte: a read of UARTDR must take it.
    if !vm.unpublish_uart(&mut uart) {
        input.uart.set_rx_interrupt(false);
        return;
    }
    while uart.input_room() > 0 {
        match input.uart.read_byte() {
            Some(b) => {
                uart.push_input(&[b]);
            }
            None => break,
        }
    }
    if uart.input_room() == 0 {
        input.uart.set_rx_interrupt(false);
    }
    // Back if nothing came after all.
    vm.publish_uart(&mut uart, &MachineMemory);
    // Under the UART's lock, as every change of its line (`vcpu::uart_line`).
    if let Some(level) = uart.irq_change() {
        vcpu::uart_line(vm, level, kicks);
    }
}

/// Primary-CPU hook: creates every VM the device tree describes, publishes them to the
/// other CPUs, then runs this CPU's vCPU, if any. Never returns: the machine stops when
/// the last VM is done (`docs/vms.md`, "When the run ends").
pub fn run_vms(machine: &Machine) -> ! {
    let ranges = config::HostRanges {
        ram: machine.platform.memory(),
        staging: STAGING,
        console: machine.platform.uart,
        files: &machine.fw_cfg_files,
    };
    let descs = match config::parse(&machine.dt, &ranges) {
        Ok(d) => d,
        Err(e) => fatal(format_args!("VM description: {e}")),
    };
    log::info!(
        "hypervisor ready: {} CPUs online, {} VMs described",
        machine.cpus_online,
        descs.len()
    );
    if descs.is_empty() {
        log::info!("no VMs described under /chosen: nothing to run");
        power_off();
    }
    if !gic::present() {
        fatal(format_args!(
            "VMs need a GICv3: EL2 owns interrupts and gives each VM a virtual GICv3 \
             through the GIC's virtual CPU interface"
        ));
    }
    let Some(pool) = FRAMES.get() else {
        fatal(format_args!("no page-table frame pool"))
    };
    // SAFETY: the frame pool lies in RAM that only page tables use, identity mapped
    // read-write by the hypervisor's stage 1 ("pt-frames").
    let mut frames = unsafe { SharedFrames::new(pool) };
    let vmid_bits = regs::vmid_bits();
    let empty_root = frames
        .alloc_frame()
        .unwrap_or_else(|| fatal(format_args!("no frame for the empty stage-2 root")));
    FRAMES_BEFORE_VMS.store(pool.lock().in_use(), Ordering::SeqCst);
    let stage2 = Stage2Config {
        ipa_bits: IPA_BITS,
        pa_bits: regs::pa_bits(),
        vmid16: vmid_bits == VmidBits::Sixteen,
        // Read on this CPU; the machines we run on have one kind of CPU.
        tlbi_range: mmu::arch::has_tlbi_range(),
    };
    let backend = MachineBackend {
        frames,
        stage2,
        empty_root,
    };
    for r in &machine.guest_ram {
        log::info!("guest RAM pool: {r}");
    }
    let manager = VmManager::new(backend, vmid_bits, &machine.guest_ram);
    log::info!(
        "VMs: {} described, {}-bit VMIDs, {IPA_BITS}-bit IPA, {}-bit PA, range TLBI {}",
        descs.len(),
        if vmid_bits == VmidBits::Sixteen {
            16
        } else {
            8
        },
        stage2.pa_bits,
        if stage2.tlbi_range { "yes" } else { "no" }
    );
    // Each VM's generated DTB is staged after everything staged so far (every VM's
    // images and the DTBs before it), so that a reset reloads its own.
    let mut staged_end = descs
        .iter()
        .flat_map(|d| [Some(d.kernel), d.initrd, d.dtb])
        .flatten()
        .filter_map(|i| i.staged_range())
        .map(|r| r.end())
        .max()
        .unwrap_or(STAGING.base);
    for mut desc in descs {
        let name = desc.name.clone();
        stage_linux_dtb(&mut desc, &machine.dt, &mut staged_end);
        for &cpu in &desc.cpus {
            if cpu_index_of(u64::from(cpu)).is_none() {
                fatal(format_args!("VM {name}: CPU {cpu:#x} is not an online CPU"));
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
            Err(e) => fatal(format_args!("VM {name}: {e}")),
        }
    }
    #[cfg(feature = "fault-read-guest-ram")]
    fault_read_guest_ram(&manager, machine);
    MANAGER.call_once(|| manager);
    route_console_input(machine);
    aarch64_cpu::asm::sev();
    for cpu in 1..boot::MAX_CPUS {
        wake(cpu);
    }
    run_cpu(0)
}

/// Isolation proof: read, at EL2, the first byte of the first VM's RAM (just scrubbed
/// and loaded through the window), or of the guest RAM pool without a VM. The
/// hypervisor's stage 1 does not map it, so this must fault.
#[cfg(feature = "fault-read-guest-ram")]
fn fault_read_guest_ram(manager: &VmManager<MachineBackend>, machine: &Machine) {
    let vm_ram = manager
        .vms_with(|_| true)
        .and_then(|vm| vm.desc.memory.first().map(|r| r.pa));
    let Some(pa) = vm_ram.or(machine.guest_ram.first().map(|r| r.base)) else {
        fatal(format_args!("fault-read-guest-ram: no guest RAM"))
    };
    log::warn!("fault-read-guest-ram: reading guest RAM at {pa:#x}");
    // SAFETY: deliberately unsound: this build exists to show that guest RAM is not
    // mapped at EL2 outside the window, which ends the run with the EL2 fault report.
    let v = unsafe { (pa.get() as *const u64).read_volatile() };
    fatal(format_args!(
        "fault-read-guest-ram: the read of guest RAM did not fault ({v:#x})"
    ));
}

/// One log line per stage-2 range of a new VM: what the guest can reach, and how.
fn log_stage2_layout(desc: &config::VmDesc) {
    let mapped = |r: &config::GuestRegion, what: &str| {
        log::info!(
            "VM {} stage 2: IPA [{:#x}, {:#x}) -> PA {:#x}: {what}",
            desc.name,
            r.ipa,
            r.ipa.saturating_add(r.size),
            r.pa
        );
    };
    let ram = match desc.stage2 {
        config::Stage2Mappings::Blocks => "RAM, normal write-back, RWX, blocks where aligned",
        config::Stage2Mappings::Pages => "RAM, normal write-back, RWX, 4 KiB pages",
    };
    for r in &desc.memory {
        mapped(r, ram);
    }
    for r in &desc.passthrough {
        mapped(r, "pass-through, device-nGnRE, RW");
    }
    if !desc.spis.is_empty() {
        log::info!(
            "VM {}: interrupts of its devices: SPIs {:?} (hardware, this VM's only)",
            desc.name,
            desc.spis
        );
    }
    let gic = desc.gic;
    log::info!(
        "VM {} stage 2: IPA [{:#x}, {:#x}): virtual GIC distributor, unmapped (emulated)",
        desc.name,
        gic.dist,
        gic.dist.saturating_add(config::GicIpa::DIST_SIZE)
    );
    log::info!(
        "VM {} stage 2: IPA [{:#x}, {:#x}): virtual GIC redistributors, unmapped (emulated)",
        desc.name,
        gic.redist,
        gic.redist
            .saturating_add(config::GicIpa::redist_size(desc.cpus.len()))
    );
    if let Some(u) = desc.vuart {
        log::info!(
            "VM {} stage 2: IPA [{u:#x}, {:#x}): virtual UART (emulated), its register page \
             mapped read-only while no input waits",
            desc.name,
            u.saturating_add(crate::mem::PAGE_SIZE)
        );
    }
}

/// For a VM that boots Linux (`bootargs` and no `dtb`), builds its DTB and stages it after
/// its images (`crate::linux::complete_desc`); stops the run if the VM cannot boot.
fn stage_linux_dtb(
    desc: &mut config::VmDesc,
    host: &config::HostDt<'_>,
    staged_end: &mut PhysAddr,
) {
    if desc.bootargs.is_none() || desc.dtb.is_some() {
        // Not a Linux boot (`complete_desc` leaves it as it is).
        return;
    }
    let kernel = desc.kernel;
    let mut head = [0u8; crate::linux::image::HEADER_LEN];
    // At most HEADER_LEN.
    let head_len = kernel.size.min(head.len() as u64) as usize;
    let head = head.get_mut(..head_len).unwrap_or_default();
    match kernel.src {
        ImageSource::Staged(pa) => {
            // SAFETY: the kernel's staged bytes lie in the staging range (`config::parse`
            // checked every image against it), which the hypervisor's stage 1 maps and
            // QEMU filled before any CPU ran; nothing writes it now.
            let staged = unsafe { core::slice::from_raw_parts(pa.get() as *const u8, head_len) };
            head.copy_from_slice(staged);
        }
        ImageSource::FwCfg(select) => {
            if let Err(e) = fw_cfg::read_into(select, head) {
                fatal(format_args!(
                    "VM {}: reading its kernel from fw-cfg: {e}",
                    desc.name
                ));
            }
        }
    }
    let free = PhysRange::from_to(*staged_end, STAGING.end());
    match crate::linux::complete_desc(desc, host, head, free) {
        Ok(None) => {}
        Ok(Some((pa, dtb))) => {
            // SAFETY: complete_desc placed `[pa, pa + len)` inside the staging range, after
            // every staged image of this VM; the range is mapped read/write and no CPU
            // runs a guest yet.
            unsafe { core::ptr::copy_nonoverlapping(dtb.as_ptr(), pa.get() as *mut u8, dtb.len()) };
            // Inside the staging range (see above): the sum is exact.
            *staged_end = pa.saturating_add(dtb.len() as u64);
            log::info!(
                "VM {}: Linux boot: kernel {:#x}, DTB ({} bytes) at {:#x}, initrd {:x?}",
                desc.name,
                desc.entry,
                dtb.len(),
                desc.boot_x0(),
                desc.initrd
                    .map(|i| (i.ipa.get(), i.ipa_range().end().get()))
            );
        }
        Err(e) => fatal(format_args!("VM {}: cannot boot Linux: {e}", desc.name)),
    }
}

/// Secondary-CPU hook: waits for the VMs to exist, then runs this CPU's vCPU, if any;
/// helps with guest RAM work while it waits.
pub fn secondary_idle(cpu: usize) -> ! {
    // Off until there is a vCPU to run here: the primary wakes every CPU once the VMs
    // exist, and a guest's CPU_ON wakes the CPU of the vCPU it starts. Meanwhile, a CPU
    // that scrubs or loads guest RAM wakes parked CPUs to help (`guest_ram`).
    loop {
        // Its own vCPU first: a helper leaves the work between two 2 MiB pieces.
        guest_ram::help(cpu, || !has_work(cpu));
        park_off(cpu, || has_work(cpu) || guest_ram::has_work(cpu));
        // Back (not off): there is a vCPU to run, or guest RAM work to help with.
        if has_work(cpu) {
            run_cpu(cpu)
        }
    }
}

/// The CPUs (bit `n` for CPU `n`) that may help scrub or load guest RAM at `pa`
/// (`guest_ram`): every CPU while the VMs are being created (no guest runs yet); after
/// that, as `schedule::may_help` decides.
pub(super) fn helpers_for(pa: PhysAddr) -> u64 {
    let Some(manager) = MANAGER.get() else {
        return u64::MAX;
    };
    (0..boot::MAX_CPUS)
        .filter(|&cpu| described_cpu(cpu).is_some_and(|m| schedule::may_help(manager, m, pa)))
        .fold(0, |mask, cpu| mask | cpu_bit(cpu))
}

/// The index of the online CPU with MPIDR `mpidr`.
fn cpu_index_of(mpidr: u64) -> Option<usize> {
    (0..boot::MAX_CPUS).find(|&i| cpu_mpidr(i) == Some(mpidr))
}

/// The MPIDR of CPU `cpu` as VM descriptions name physical CPUs.
fn described_cpu(cpu: usize) -> Option<u32> {
    cpu_mpidr(cpu).and_then(|m| u32::try_from(m).ok())
}

/// Whether CPU `cpu` has a vCPU waiting to start.
fn has_work(cpu: usize) -> bool {
    match (MANAGER.get(), described_cpu(cpu)) {
        (Some(manager), Some(mpidr)) => schedule::has_work(manager, mpidr),
        _ => false,
    }
}

/// A CPU with nothing (more) to run: off through the firmware, or, for CPU 0, which
/// cannot be, a `WFE` loop.
fn idle_forever(cpu: usize) -> ! {
    park_off(cpu, || false);
    park()
}

fn run_cpu(cpu: usize) -> ! {
    let Some(manager) = MANAGER.get() else {
        idle_forever(cpu)
    };
    let Some(mpidr) = described_cpu(cpu) else {
        idle_forever(cpu)
    };
    let Some((vm, index)) = manager.vm_on_cpu(mpidr) else {
        idle_forever(cpu)
    };
    loop {
        // Off until a CPU_ON or a reset starts this vCPU (or the VM ends).
        park_off(cpu, || schedule::should_wake(&vm, index));
        // Counted before the start is taken, so the end of the run cannot miss a CPU that
        // has taken one.
        LOADED.fetch_add(1, Ordering::SeqCst);
        let start = schedule::next_start(&vm, index);
        let Start::Enter { entry, context } = start else {
            LOADED.fetch_sub(1, Ordering::SeqCst);
            match start {
                // The VM is finished; this CPU has nothing left to run.
                Start::Done => idle_forever(cpu),
                // CPU 0 cannot go off: it waits for an event (every exit of a vCPU and
                // every reset sends one).
                _ => {
                    aarch64_cpu::asm::wfe();
                    continue;
                }
            }
        };
        // A guest may start and stop vCPUs in a loop: within the VM's budget of lines.
        vm.log(
            &mut ConsoleLines,
            log::Level::Info,
            format_args!("VM {}: vCPU {index} starts at {entry:#x}", vm.desc.name),
        );
        run_vcpu(manager, &vm, index, entry, context);
        regs::leave_guest_context();
        let outcome = schedule::vcpu_left(manager, &vm);
        LOADED.fetch_sub(1, Ordering::SeqCst);
        // A CPU_ON or the reset this CPU just made may have made vCPUs runnable.
        wake_pending(&vm);
        if let Some(ok) = outcome {
            finish(ok);
        }
    }
}

/// Wakes the CPUs of `vm`'s vCPUs that have a start pending (parked ones by PSCI, CPU 0
/// by an event, sent only then: a CPU waiting in `WFE` wakes for a start, not for every
/// exit of every vCPU).
fn wake_pending(vm: &Vm<MachineStage2>) {
    let mut any = false;
    for cpu in schedule::pending_starts(vm) {
        any = true;
        if let Some(i) = cpu_index_of(u64::from(cpu)) {
            wake(i);
        }
    }
    if any {
        // The start was published under the VM's lock before this; the woken CPU takes
        // the same lock to read it.
        aarch64_cpu::asm::sev();
    }
}

/// Most physical interrupts taken in one exit before the guest runs again (the rest
/// stay pending and bring it back at once).
const MAX_IRQS_PER_EXIT: usize = 16;

/// Runs vCPU `index` (counted loaded by its start) until it stops.
fn run_vcpu(
    manager: &VmManager<MachineBackend>,
    vm: &Arc<Vm<MachineStage2>>,
    index: usize,
    entry: Ipa,
    ctx: u64,
) {
    // The VM's table was built with this regime, so its VTCR_EL2 value exists.
    let vtcr = manager
        .with_backend(|b| b.stage2.regime(vm.vmid).vtcr())
        .unwrap_or(0);
    let mut host = MachineHost::new();
    if index == 0 && vm.desc.console_input {
        // A (re)started input VM reads input again: its receive interrupt may have been
        // masked while its FIFO was full before a reset, and reads of UARTDR from the
        // register page do not trap to turn it back on (`console_input`).
        host.input_wanted(&vm.desc.name);
    }
    regs::enter_guest_context(vm.vttbr, vtcr, index as u64, &host.controls);
    let nr_lrs = vm.vgic.lock().list_registers();
    gic::vcpu_start(nr_lrs);
    // The guest starts with its MMU off: its PC is the entry IPA.
    let mut regs = boot::GuestRegs::new(entry.get(), ctx);
    let mut lrs = [0u64; MAX_LIST_REGS];
    // List registers that may hold an interrupt (the first ones): none after `vcpu_start`.
    let mut live = 0;
    // The flush in the list registers while it is still the model's (the guest left it
    // as it was), with the virtual GIC's lock count right after it was made; and the
    // `ICH_VMCR_EL2` the model has.
    let mut kept: Option<(Flush, u64)> = None;
    let mut vmcr_synced = None;
    // Checked before every entry, the first one too: another vCPU may have powered the
    // VM off, reset or stopped it since the start was taken (the VM itself cannot be
    // torn down while this vCPU is loaded); the CPU then backs out without entering.
    while vm.runs(index) {
        // Nobody took the virtual GIC's lock since the kept flush was made (this CPU's
        // exit handling included), so a flush now would be the same: the list registers
        // already hold it (`SharedVgic`). Most exits (a UART or hypercall access) skip
        // both the flush and the sync this way.
        // Borrowed: copying the flush (a value for each list register) on every exit
        // cost about a hundred instructions.
        let flush = match &kept {
            Some((flush, takes)) if vm.vgic.takes() == *takes => flush,
            _ => {
                let mut g = vm.vgic.lock();
                let flush = g.flush(index);
                // Counted with the lock still held: a take after it must show.
                let takes = vm.vgic.takes();
                drop(g);
                live = gic::load(&flush, live);
                &kept.insert((flush, takes)).0
            }
        };
        // SAFETY: HCR_EL2, VTCR_EL2 and VTTBR_EL2 were just set up for this VM, whose
        // stage 2 maps only its own RAM and pass-through devices and stays alive while
        // this vCPU is loaded; its EL1 registers are reset; interrupts are masked at EL2;
        // the virtual CPU interface holds this vCPU's list registers.
        let exit = unsafe { boot::enter_guest(&mut regs) };
        let vmcr = gic::save(&mut lrs, live, flush.hcr() != 0);
        let read_back = lrs.get(..live).unwrap_or(&[]);
        if vmcr_synced != Some(vmcr) || !flush.unchanged(read_back) {
            kept = None;
            let mut g = vm.vgic.lock();
            g.sync(index, read_back);
            g.set_vmcr(index, vmcr);
            vmcr_synced = Some(vmcr);
        }
        let mut kicks = VcpuMask::EMPTY;
        if matches!(exit, boot::Exit::Irq | boot::Exit::Fiq) {
            take_interrupts(vm, index, &mut kicks);
        }
        // Only a PSCI call (CPU_ON, SYSTEM_RESET) makes a start pending while the VM runs.
        let call = vcpu::exit::is_call(&exit);
        let mut ctx = VcpuCtx {
            x: &mut regs.x,
            pc: &mut regs.pc,
            pstate: &mut regs.pstate,
        };
        let next = vcpu::handle_exit(
            vm,
            index,
            &mut ctx,
            exit,
            &mut host,
            &mut |req| manager.share_call(vm, index, req),
            &mut kicks,
        );
        kick_others(vm, index, kicks);
        if call {
            // A CPU_ON may have made another vCPU runnable.
            wake_pending(vm);
        }
        match next {
            Next::Resume => {}
            Next::Stop => break,
            Next::Fatal => fatal(format_args!(
                "VM {}: an error that may reach beyond the VM",
                vm.desc.name
            )),
        }
    }
    gic::vcpu_stop(nr_lrs);
}

/// Takes the physical interrupts pending at EL2 after an IRQ exit: acknowledges each,
/// drops its priority, and either hands it to the guest (`vcpu::irq::physical`, the
/// guest's deactivation of its HW list register deactivates it) or deactivates it.
fn take_interrupts(vm: &Vm<MachineStage2>, index: usize, kicks: &mut VcpuMask) {
    for _ in 0..MAX_IRQS_PER_EXIT {
        let intid = gic::acknowledge();
        if intid >= 1020 {
            break;
        }
        gic::priority_drop(intid);
        if let Some(input) = CONSOLE_INPUT.get().filter(|i| i.intid == intid) {
            console_input(input, vm, kicks);
            gic::deactivate(intid);
            continue;
        }
        if vcpu::irq::physical(vm, index, intid, kicks) == Taken::Deactivate {
            gic::deactivate(intid);
        }
    }
}

/// Signals the physical CPUs of the vCPUs in `kicks` (other than `index`, which enters
/// next with its list registers refilled) so that they exit and pick up their new
/// interrupts.
fn kick_others(vm: &Vm<MachineStage2>, index: usize, kicks: VcpuMask) {
    for j in kicks.iter().filter(|&j| j != index) {
        if let Some(&cpu) = vm.desc.cpus.get(j) {
            gic::kick(u64::from(cpu));
        }
    }
}

/// Ends the run once every VM is done (`ok`: none failed); a CPU that sees this after
/// another one parks.
fn finish(ok: bool) -> ! {
    if !RUN_END.claim() {
        park();
    }
    // A finished VM's last vCPU may be leaving on another CPU at this moment, about to
    // destroy the VM: give that up to a second, so that the lines below account for it
    // (a vCPU that never exits again does not hold the run up longer). This CPU left its
    // own vCPU before it got here.
    let deadline = super::console::micros().saturating_add(1_000_000);
    while LOADED.load(Ordering::SeqCst) > 0 && super::console::micros() < deadline {
        core::hint::spin_loop();
    }
    let frames = FRAMES.get().map_or(0, |p| p.lock().in_use());
    let dropped = super::console::dropped_bytes();
    if dropped > 0 {
        log::warn!("console: {dropped} byte(s) dropped (the UART did not take them in time)");
    }
    log::info!(
        "page-table frames in use: {frames} ({} before the VMs were created)",
        FRAMES_BEFORE_VMS.load(Ordering::SeqCst)
    );
    if let Some(m) = MANAGER.get() {
        let (free, total, _, vmids) = m.accounting();
        log::info!(
            "guest RAM free: {} of {} KiB; VMIDs in use: {vmids}",
            free / 1024,
            total / 1024
        );
    }
    if ok {
        log::info!("twostage: all VMs done: success");
        power_off()
    } else {
        log::error!("twostage: all VMs done: failure");
        super::fatal::exit(boot::exit_status::VM_FAILED)
    }
}

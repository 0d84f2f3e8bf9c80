//! Start-up of the hypervisor on the bare-metal target: console and logger, device tree,
//! heap, page-table frames, the hypervisor's own stage 1, secondary CPUs, and the fatal
//! paths (unexpected EL2 exception, panic) that stop the machine with a failing status.

use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use aarch64_cpu::registers::{
    CurrentEL, Readable, Writeable, CNTFRQ_EL0, CNTPCT_EL0, HCR_EL2, ID_AA64MMFR0_EL1, MIDR_EL1,
    MPIDR_EL1, SCTLR_EL2, TPIDR_EL2,
};
use buddy_system_allocator::LockedHeap;
use log::{error, info, warn, LevelFilter};
use smccc::{psci, Hvc, Smc};
use spin::{Mutex, Once};

use boot::{exit_status, ExceptionFrame, ExceptionKind, ExceptionSource, MmuConfig};
use mmu::arch::ArmTlb;
use mmu::{El2, PageTable};

use crate::config::{Platform, PsciConduit};
use crate::console::logger::{self, Logger};
use crate::console::report;
use crate::mem::frames::{FramePool, SharedFrames};
use crate::mem::layout::{self, HypMemory};
use crate::mem::{stage1, PhysRange};
use pl011::Pl011;

mod pl011;
mod regs;
pub mod run;
#[cfg(feature = "selftest-guest-entry")]
mod selftest;

/// How long the primary CPU waits for all secondaries to report online.
const SECONDARY_TIMEOUT_MS: u64 = 2000;

/// MPIDR_EL1 affinity fields Aff3 \[39:32\] and Aff2..Aff0 \[23:0\] (what PSCI and the
/// device tree's CPU `reg` use).
const MPIDR_AFFINITY_MASK: u64 = 0xff_00ff_ffff;

#[global_allocator]
static HEAP: LockedHeap<32> = LockedHeap::empty();

/// The hardware side of the logger: CPU index from `TPIDR_EL2` (set by the boot code),
/// time from the generic timer.
pub struct Hw;

static BOOT_TICKS: AtomicU64 = AtomicU64::new(0);

impl logger::Platform for Hw {
    type Console = Pl011;

    fn cpu(&self) -> usize {
        cpu_index()
    }

    fn micros(&self) -> u64 {
        let ticks = CNTPCT_EL0
            .get()
            .wrapping_sub(BOOT_TICKS.load(Ordering::Relaxed));
        let freq = CNTFRQ_EL0.get().max(1);
        (u128::from(ticks) * 1_000_000 / u128::from(freq)) as u64
    }
}

static LOGGER: Logger<Hw> = Logger::new(Hw, LevelFilter::Info);

/// The page-table frame pool, shared by the hypervisor's stage 1 and the guests' stage 2.
pub static FRAMES: Once<Mutex<FramePool>> = Once::new();

static PSCI_CONDUIT: Once<PsciConduit> = Once::new();
static CPUS_ONLINE: AtomicUsize = AtomicUsize::new(0);
static CPU_MPIDR: [AtomicU64; boot::MAX_CPUS] =
    [const { AtomicU64::new(u64::MAX) }; boot::MAX_CPUS];
static IN_FATAL: [AtomicBool; boot::MAX_CPUS] = [const { AtomicBool::new(false) }; boot::MAX_CPUS];

/// What start-up established, handed to the code that creates and runs VMs.
#[derive(Debug)]
pub struct Machine {
    /// The parsed device tree.
    pub platform: Platform,
    /// The hypervisor's own memory.
    pub memory: HypMemory,
    /// Number of CPUs online (including the primary).
    pub cpus_online: usize,
}

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

/// Brings the primary CPU from the boot code to the point where VMs can be created:
/// everything is logged, every CPU is online.
pub fn primary(dtb: usize) -> Machine {
    BOOT_TICKS.store(CNTPCT_EL0.get(), Ordering::Relaxed);
    // Not a VHE host: plain EL2 with an AArch64 EL1 below (the VM code adds its own bits).
    HCR_EL2.write(HCR_EL2::RW::EL1IsAarch64);

    // SAFETY: QEMU passes the physical address of a device tree in x0, in RAM nothing else
    // uses yet; its header gives its size. Checking the blob and removing the FDT_NOP
    // tokens QEMU leaves in a `-dtb` blob lets the parser see every node without
    // panicking on a malformed one (see `crate::dtb`).
    unsafe {
        let header = core::slice::from_raw_parts(dtb as *const u8, crate::config::dtb::HEADER_SIZE);
        let Some(total) = crate::config::dtb::total_size(header) else {
            early_failure(c"twostage: no device tree in x0\n");
        };
        let blob = core::slice::from_raw_parts_mut(dtb as *mut u8, total);
        if crate::config::dtb::strip_nops(blob).is_err() {
            early_failure(c"twostage: malformed device tree in x0\n");
        }
    }
    // SAFETY: QEMU passes the physical address of a device tree in x0 and the MMU is off,
    // so the address is directly usable; nothing writes the blob.
    let platform = match unsafe { Platform::parse_at(dtb as u64) } {
        Ok(p) => p,
        Err(_) => early_failure(c"twostage: unusable device tree in x0\n"),
    };
    let Some(uart) = platform.uart else {
        early_failure(c"twostage: no PL011 in the device tree\n");
    };
    // SAFETY: the device tree names this PL011; the MMU is off (device accesses) and the
    // stage-1 tables map it Device-nGnRE before the MMU goes on.
    LOGGER.attach(unsafe { Pl011::new(uart.base as usize) });
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(LOGGER.level());
    }

    let el = CurrentEL.read(CurrentEL::EL);
    let mpidr = MPIDR_EL1.get() & MPIDR_AFFINITY_MASK;
    info!("twostage hypervisor starting");
    info!(
        "running at EL{el}, MPIDR {mpidr:#x}, MIDR {:#x}",
        MIDR_EL1.get()
    );
    info!(
        "device tree at {:#x}, {} bytes",
        platform.dtb.base, platform.dtb.size
    );
    for r in platform.memory() {
        info!("memory: {r}");
    }
    info!(
        "cpus: {} found, MPIDRs {:x?}",
        platform.cpus().len(),
        platform.cpus()
    );
    if platform.cpus_ignored > 0 {
        warn!(
            "cpus: {} beyond the first {} are not used",
            platform.cpus_ignored,
            boot::MAX_CPUS
        );
    }
    info!("uart: pl011 {uart}");
    match platform.gic {
        Some(g) => info!(
            "gic: v{} distributor {} second {}",
            g.version, g.distributor, g.second
        ),
        None => warn!("gic: none in the device tree"),
    }
    let Some(psci) = platform.psci else {
        fatal(format_args!("no usable PSCI node"))
    };
    info!(
        "psci: conduit {:?}, 0.2 or later: {}",
        psci.conduit, psci.v0_2_or_later
    );
    PSCI_CONDUIT.call_once(|| psci.conduit);

    let image = boot::image_layout();
    let image_region = PhysRange::new(image.text_start, image.image_end - image.text_start);
    let memory = layout::plan(image_region, platform.memory(), platform.dtb)
        .unwrap_or_else(|e| fatal(format_args!("memory layout: {e}")));
    info!("hypervisor image: {}", memory.image);
    // SAFETY: the heap range lies in RAM after the image, is used by nothing else, and
    // stays reserved for the heap for the whole run.
    unsafe {
        HEAP.lock()
            .init(memory.heap.base as usize, memory.heap.size as usize)
    };
    info!("heap: {}", memory.heap);
    let pool = FRAMES.call_once(|| Mutex::new(FramePool::new(memory.frames)));
    info!(
        "page-table frames: {} ({} frames)",
        memory.frames,
        pool.lock().capacity()
    );

    let maps = stage1::plan(&image, &memory, &platform)
        .unwrap_or_else(|e| fatal(format_args!("stage 1 plan: {e}")));
    for m in &maps {
        info!("stage 1: {m}");
    }
    enable_stage1(pool, &maps);
    #[cfg(feature = "fault-write-text")]
    fault_write_text(image.text_start);
    #[cfg(feature = "fault-exec-data")]
    fault_exec_data();
    #[cfg(feature = "selftest-guest-entry")]
    selftest::run();

    CPU_MPIDR[0].store(mpidr, Ordering::Release);
    CPUS_ONLINE.store(1, Ordering::Release);
    info!("cpu0 online: MPIDR {mpidr:#x}, MMU {}", mmu_state());
    let cpus_online = start_secondaries(&platform, mpidr);
    Machine {
        platform,
        memory,
        cpus_online,
    }
}

/// The hypervisor's own stage-1 table (identity map), for code that maps or unmaps
/// memory at run time (e.g. guest memory it must scrub).
pub static STAGE1: Once<Mutex<PageTable<El2, SharedFrames, ArmTlb>>> = Once::new();

/// Builds the stage-1 table from the plan, turns the MMU and caches on, and publishes the
/// register values for the secondary CPUs.
fn enable_stage1(pool: &'static Mutex<FramePool>, maps: &[stage1::Mapping]) {
    let pa_bits = stage1::pa_bits(ID_AA64MMFR0_EL1.get());
    // SAFETY: the frame pool lies in RAM that only page tables use, and it is identity
    // mapped read-write (the "pt-frames" mapping) once the MMU is on.
    let frames = unsafe { SharedFrames::new(pool) };
    let mut table = PageTable::new(
        El2::new(stage1::VA_BITS).with_pa_bits(pa_bits),
        frames,
        ArmTlb,
    )
    .unwrap_or_else(|e| fatal(format_args!("stage 1: {e:?}")));
    table.set_tlbi_range(mmu::arch::has_tlbi_range());
    if let Err((m, e)) = stage1::build(&mut table, maps) {
        fatal(format_args!("stage 1: mapping {} failed: {e:?}", m.name));
    }
    let cfg = MmuConfig {
        mair: table.mair_el2(),
        tcr: table.tcr_el2(),
        ttbr0: table.ttbr0_el2(),
        sctlr: stage1::SCTLR_EL2_MMU_ON,
    };
    // SAFETY: the table identity-maps the image (text executable, data and stacks
    // writable), the heap, the frame pool and the UART with the attributes MAIR_EL2
    // describes, so execution continues unchanged after SCTLR_EL2.M is set.
    unsafe { boot::enable_mmu(&cfg) };
    // SAFETY: no secondary CPU is running yet; the same tables map the secondary entry
    // path, stacks and data.
    unsafe { boot::publish_secondary_mmu(&cfg) };
    info!(
        "stage 1: {} table frames, {pa_bits}-bit PA, TCR_EL2 {:#x}, SCTLR_EL2 {:#x}: MMU {}",
        table.frames_in_use(),
        cfg.tcr,
        SCTLR_EL2.get(),
        mmu_state()
    );
    STAGE1.call_once(|| Mutex::new(table));
}

/// W^X proof: write to the hypervisor's own text with the MMU on. Must fault.
#[cfg(feature = "fault-write-text")]
fn fault_write_text(text_start: u64) {
    let target = text_start + 0x40;
    warn!("fault-write-text: writing to the hypervisor text at {target:#x}");
    // SAFETY: deliberately unsound: this build exists to show the write is stopped by the
    // MMU (the page is mapped read-only), which ends the run with the EL2 fault report.
    unsafe { (target as *mut u32).write_volatile(0xd503_201f) };
    fatal(format_args!(
        "fault-write-text: the write to text did not fault"
    ));
}

/// W^X proof: execute an instruction stored in the hypervisor's data with the MMU on.
/// Must fault.
#[cfg(feature = "fault-exec-data")]
fn fault_exec_data() {
    /// A `RET` instruction in writable data (`.data`).
    static mut CODE: [u32; 2] = [0xd65f_03c0, 0];
    let target = (&raw const CODE) as u64;
    warn!("fault-exec-data: jumping to the hypervisor data at {target:#x}");
    // SAFETY: deliberately unsound: this build exists to show that instruction fetch from
    // data is stopped by the MMU (XN and WXN), which ends the run with the fault report.
    unsafe {
        let f: extern "C" fn() = core::mem::transmute(target as usize);
        f();
    }
    fatal(format_args!(
        "fault-exec-data: executing data did not fault"
    ));
}

fn mmu_state() -> &'static str {
    if SCTLR_EL2.is_set(SCTLR_EL2::M) {
        "on"
    } else {
        "off"
    }
}

/// Starts every other CPU with PSCI CPU_ON and waits until all are online.
fn start_secondaries(platform: &Platform, boot_mpidr: u64) -> usize {
    let entry = boot::secondary_entry_address();
    let mut expected = 1;
    let others = platform.cpus().iter().copied().filter(|&m| m != boot_mpidr);
    for (index, mpidr) in (1..).zip(others) {
        CPU_MPIDR[index].store(mpidr, Ordering::Release);
        match psci_cpu_on(mpidr, entry, index as u64) {
            Ok(()) => expected += 1,
            Err(e) => error!("cpu{index} (MPIDR {mpidr:#x}): CPU_ON failed: {e:?}"),
        }
    }
    let freq = CNTFRQ_EL0.get();
    let deadline = CNTPCT_EL0.get() + freq * SECONDARY_TIMEOUT_MS / 1000;
    while CPUS_ONLINE.load(Ordering::Acquire) < expected && CNTPCT_EL0.get() < deadline {
        core::hint::spin_loop();
    }
    let online = CPUS_ONLINE.load(Ordering::Acquire);
    if online != platform.cpus().len() {
        fatal(format_args!(
            "only {online} of {} CPUs came online within {SECONDARY_TIMEOUT_MS} ms",
            platform.cpus().len()
        ));
    }
    info!("all {online} CPUs online");
    online
}

fn psci_cpu_on(mpidr: u64, entry: u64, context: u64) -> Result<(), psci::error::Error> {
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
                return;
            }
        }
    }
}

/// Runs on each secondary CPU after the boot code set up its stack (and MMU, once the
/// primary publishes its tables).
pub fn secondary(cpu: usize) {
    let mpidr = MPIDR_EL1.get() & MPIDR_AFFINITY_MASK;
    HCR_EL2.write(HCR_EL2::RW::EL1IsAarch64);
    info!("cpu{cpu} online: MPIDR {mpidr:#x}, MMU {}", mmu_state());
    #[cfg(feature = "fault-stack-overflow")]
    if cpu == 1 {
        warn!("fault-stack-overflow: recursing without bound on cpu{cpu}");
        recurse(0);
    }
    #[cfg(feature = "fault-panic")]
    if cpu == 1 {
        panic!("fault-panic: deliberate panic on cpu{cpu}");
    }
    CPUS_ONLINE.fetch_add(1, Ordering::AcqRel);
}

/// Recursion that overflows the stack (the `fault-stack-overflow` build).
#[cfg(feature = "fault-stack-overflow")]
#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    let frame = core::hint::black_box([depth; 64]);
    recurse(depth + 1) + frame[(depth % 64) as usize]
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
    let result = match PSCI_CONDUIT.get() {
        Some(PsciConduit::Hvc) => psci::system_off::<Hvc>(),
        _ => psci::system_off::<Smc>(),
    };
    fatal(format_args!("PSCI SYSTEM_OFF returned {result:?}"))
}

/// Logs a start-up error and stops the machine with a failing status.
pub fn fatal(args: core::fmt::Arguments<'_>) -> ! {
    error!("fatal: {args}");
    boot::semihosting_exit(exit_status::STARTUP)
}

fn early_failure(msg: &core::ffi::CStr) -> ! {
    boot::semihosting_write0(msg);
    boot::semihosting_exit(exit_status::STARTUP)
}

/// Marks the calling CPU as in a fatal path; if it already was (a fault while reporting
/// a fault, e.g. semihosting not enabled), halts it instead of recursing.
fn enter_fatal(cpu: usize) {
    let nested = IN_FATAL
        .get(cpu)
        .is_none_or(|f| f.swap(true, Ordering::AcqRel));
    if nested {
        park();
    }
}

/// The handler for exceptions EL2 takes from itself: none is expected, so it prints the
/// report and stops the machine with a failing status.
pub fn el2_exception(frame: &mut ExceptionFrame, source: ExceptionSource, kind: ExceptionKind) {
    let cpu = cpu_index();
    enter_fatal(cpu);
    if LOGGER.has_console() {
        LOGGER.with_console_forced(|c, _, cpu| {
            let _ = report::write_exception(c, cpu, frame, source, kind);
            if let Some(owner) = stage1::stack_guard_owner(&boot::image_layout(), frame.far) {
                let _ = writeln!(
                    c,
                    "    FAR is in the guard page below cpu{owner}'s stack: stack overflow"
                );
            }
            let _ = writeln!(
                c,
                "*** stopping the machine (exit status {})",
                exit_status::EL2_EXCEPTION
            );
        });
    } else {
        boot::semihosting_write0(c"twostage: unexpected EL2 exception before the console was up\n");
    }
    boot::semihosting_exit(exit_status::EL2_EXCEPTION)
}

/// The panic path: report, then stop the machine with a failing status.
pub fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let cpu = cpu_index();
    enter_fatal(cpu);
    if LOGGER.has_console() {
        LOGGER.with_console_forced(|c, _, cpu| {
            let _ = report::write_panic(c, cpu, info);
            let _ = writeln!(
                c,
                "*** stopping the machine (exit status {})",
                exit_status::PANIC
            );
        });
    } else {
        boot::semihosting_write0(c"twostage: panic before the console was up\n");
    }
    boot::semihosting_exit(exit_status::PANIC)
}

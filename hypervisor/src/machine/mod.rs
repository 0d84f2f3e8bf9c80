//! The machine: everything that runs only on the bare-metal target. Every static, every
//! `asm!` and every system-register write of the hypervisor is in this folder:
//! start-up (console, device tree, heap, page-table frames, the hypervisor's own stage 1,
//! secondary CPUs), the physical CPUs and the firmware calls that start and park them
//! (`cpu`), the run loop (`run`), guest RAM scrubs and image copies shared with parked
//! CPUs (`guest_ram`), the EL2 register values for a guest (`regs`), the PL011, the
//! guest-entry self-test and the fatal paths. The decisions it acts on are made by
//! host-tested code (`crate::vcpu::schedule`, `crate::vm`).

use core::sync::atomic::{AtomicBool, Ordering};

use aarch64_cpu::registers::{
    CurrentEL, Readable, CNTFRQ_EL0, CNTPCT_EL0, MIDR_EL1, MPIDR_EL1, SCTLR_EL2,
};
use buddy_system_allocator::LockedHeap;
use log::{error, info, warn};
use spin::{Mutex, Once};

use boot::MmuConfig;
use mmu::arch::ArmTlb;
use mmu::{El2, PageTable};

use crate::config::{Hardware, HostDt};
use crate::mem::frames::{FramePool, SharedFrames};
use crate::mem::layout::{self, HypMemory};
use crate::mem::window::{self, Window};
use crate::mem::{stage1, PhysAddr, PhysRange};
use cpu::{cpu_index, psci_cpu_on, CPUS_ONLINE, CPU_MPIDR, MPIDR_AFFINITY_MASK, PSCI_CONDUIT};
use fatal::{early_failure, fatal};
use pl011::Pl011;

mod console;
mod cpu;
mod fatal;
pub mod fw_cfg;
mod gic;
mod guest_ram;
mod pl011;
mod regs;
pub mod run;
#[cfg(feature = "selftest-guest-entry")]
mod selftest;

pub use fatal::{el2_exception, panic};

/// How long the primary CPU waits for all secondaries to report online.
const SECONDARY_TIMEOUT_MS: u64 = 2000;

#[global_allocator]
static HEAP: LockedHeap<32> = LockedHeap::empty();

/// The page-table frame pool, shared by the hypervisor's stage 1 and the guests' stage 2.
pub static FRAMES: Once<Mutex<FramePool>> = Once::new();

/// What start-up established, handed to the code that creates and runs VMs.
#[derive(Debug)]
pub struct Machine {
    /// The host device tree.
    pub dt: HostDt<'static>,
    /// The hardware it describes.
    pub platform: Hardware,
    /// The hypervisor's own memory.
    pub memory: HypMemory,
    /// The RAM guests may have (`layout::guest_ram`): not mapped at EL2 but through the
    /// window ([`with_guest_ram`]).
    pub guest_ram: alloc::vec::Vec<PhysRange>,
    /// Number of CPUs online (including the primary).
    pub cpus_online: usize,
    /// The files of QEMU's fw-cfg device (empty without a usable one).
    pub fw_cfg_files: alloc::vec::Vec<crate::config::fw_cfg::FwCfgFile>,
}
/// Brings the primary CPU from the boot code to the point where VMs can be created:
/// everything is logged, every CPU is online.
pub fn primary(dtb: usize) -> Machine {
    console::start_clock();
    // Not a VHE host: plain EL2 with an AArch64 EL1 below (the VM code adds its own bits).
    regs::leave_guest_context();

    // SAFETY: QEMU passes the physical address of a device tree in x0, in RAM nothing else
    // uses (the memory layout keeps its pages out of every other use); the MMU is off, so
    // the address is directly usable. Checking the blob and removing the FDT_NOP tokens
    // QEMU leaves in a `-dtb` blob lets the parser see every node without panicking on a
    // malformed one (see `crate::config::dtb`).
    let Ok(dt) = (unsafe { HostDt::at(dtb as u64) }) else {
        early_failure(c"twostage: no well-formed device tree in x0\n");
    };
    let Ok(platform) = Hardware::parse(&dt) else {
        early_failure(c"twostage: unusable device tree in x0\n");
    };
    let Some(uart) = platform.uart else {
        early_failure(c"twostage: no PL011 in the device tree\n");
    };
    // SAFETY: the device tree names this PL011; the MMU is off (device accesses) and the
    // stage-1 tables map it Device-nGnRE before the MMU goes on.
    console::attach(unsafe { Pl011::new(uart.base.get() as usize) });

    let el = CurrentEL.read(CurrentEL::EL);
    let mpidr = MPIDR_EL1.get() & MPIDR_AFFINITY_MASK;
    info!("twostage hypervisor starting");
    info!(
        "running at EL{el}, MPIDR {mpidr:#x}, MIDR {:#x}",
        MIDR_EL1.get()
    );
    let spectre = regs::el2_controls().spectre;
    info!(
        "branch-predictor hardening: Spectre-v2 {:?}, Spectre-BHB {:?} ({} branches at EL2 \
         entry), SSB {:?} (docs/cpu-state.md)",
        spectre.v2, spectre.bhb, spectre.bhb_loop, spectre.v4
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
    let image_region = PhysRange::from_to(
        PhysAddr::new(image.text_start),
        PhysAddr::new(image.image_end),
    );
    let memory = layout::plan(image_region, platform.memory(), platform.dtb)
        .unwrap_or_else(|e| fatal(format_args!("memory layout: {e}")));
    info!("hypervisor image: {}", memory.image);
    // SAFETY: the heap range lies in RAM after the image, is used by nothing else, and
    // stays reserved for the heap for the whole run.
    unsafe {
        HEAP.lock()
            .init(memory.heap.base.get() as usize, memory.heap.size as usize)
    };
    info!("heap: {}", memory.heap);
    let pool = FRAMES.call_once(|| Mutex::new(FramePool::new(memory.frames)));
    info!(
        "page-table frames: {} ({} frames)",
        memory.frames,
        pool.lock().capacity()
    );

    let devices = driven_devices(&platform);
    let maps = stage1::plan(
        &image,
        &memory,
        &stage1::Machine {
            dtb: platform.dtb,
            ram: platform.memory(),
            devices: &devices,
        },
    )
    .unwrap_or_else(|e| fatal(format_args!("stage 1 plan: {e}")));
    for line in stage1::log_lines(&maps) {
        info!("stage 1: {line}");
    }
    let guest_ram = layout::guest_ram(platform.memory(), &memory, platform.dtb);
    let Some(window_base) = stage1::window_base(&maps, platform.memory()) else {
        fatal(format_args!(
            "stage 1: no free {} MiB region for the guest RAM window",
            window::SPAN >> 20
        ))
    };
    let window = Window::new(window_base, boot::MAX_CPUS, &guest_ram)
        .unwrap_or_else(|e| fatal(format_args!("stage 1: {e}")));
    info!(
        "stage 1: guest RAM not mapped: EL2 reaches it through the window at {:#x}, \
         at most {} MiB per CPU at a time, never executable",
        window.region().base,
        window::CHUNK >> 20
    );
    enable_stage1(pool, &maps, window);
    #[cfg(feature = "fault-write-text")]
    fault_write_text(image.text_start);
    #[cfg(feature = "fault-exec-data")]
    fault_exec_data();
    #[cfg(feature = "selftest-guest-entry")]
    selftest::run();

    match platform.gic {
        Some(g) if g.version == 3 => {
            gic::init_distributor(g.distributor.base.get(), g.second.base.get(), g.second.size);
            if !gic::init_cpu() {
                fatal(format_args!("gic: no redistributor for cpu0"));
            }
            info!(
                "gic: EL2 owns the GICv3: virtual CPU interface with {} list registers (ICH_VTR_EL2 {:#x})",
                gic::list_registers(),
                gic::ich_vtr()
            );
        }
        _ => warn!(
            "gic: not a GICv3: no VM can run (EL2 owns interrupts through the GICv3 virtual CPU interface)"
        ),
    }

    let fw_cfg_files = match platform.fw_cfg {
        Some(dev) => match fw_cfg::probe(dev) {
            Ok(files) => {
                info!(
                    "fw-cfg: at {:#x}, {} files, DMA",
                    dev.regs.base,
                    files.len()
                );
                files
            }
            Err(e) => {
                warn!("fw-cfg: at {:#x}, not used: {e}", dev.regs.base);
                alloc::vec::Vec::new()
            }
        },
        None => alloc::vec::Vec::new(),
    };

    CPU_MPIDR[0].store(mpidr, Ordering::Release);
    CPUS_ONLINE.store(1, Ordering::Release);
    info!("cpu0 online: MPIDR {mpidr:#x}, MMU {}", mmu_state());
    let cpus_online = start_secondaries(&platform, mpidr);
    Machine {
        dt,
        platform,
        memory,
        guest_ram,
        cpus_online,
        fw_cfg_files,
    }
}

/// The devices the hypervisor drives (its console, the GIC, QEMU's fw-cfg), named as its stage-1 log
/// names them.
fn driven_devices(platform: &Hardware) -> alloc::vec::Vec<(&'static str, PhysRange)> {
    let mut devices = alloc::vec::Vec::new();
    if let Some(uart) = platform.uart {
        devices.push(("uart", uart));
    }
    if let Some(gic) = platform.gic {
        devices.push(("gicd", gic.distributor));
        devices.push((if gic.version == 3 { "gicr" } else { "gicc" }, gic.second));
    }
    if let Some(fw_cfg) = platform.fw_cfg {
        devices.push(("fw-cfg", fw_cfg.regs));
    }
    devices
}

/// The hypervisor's own stage-1 table (identity map), kept for the whole run: dropping it
/// would give its live table frames back to the pool.
static STAGE1: Once<Mutex<PageTable<El2, SharedFrames, ArmTlb>>> = Once::new();

/// The window through which EL2 reaches guest RAM ([`with_guest_ram`]), installed in
/// [`STAGE1`].
static WINDOW: Once<Window> = Once::new();

/// Whether the CPUs have FEAT_MTE2 and EL2 was set up to store allocation tags
/// (`SCTLR_EL2.ATA`, `MAIR_EL2` attribute 4 Tagged): guest RAM is then scrubbed of its
/// tags too ([`scrubs_tags`]). Written once, before any VM exists.
static TAGS: AtomicBool = AtomicBool::new(false);

/// Whether scrubbing and loading guest RAM must also clear its allocation tags: the
/// CPUs have FEAT_MTE2, so a VM may have left tags in its RAM (`HCR_EL2.ATA`).
pub fn scrubs_tags() -> bool {
    TAGS.load(Ordering::Relaxed)
}

/// The page every CPU's window anchor maps (read-only): zeros, nothing secret.
#[repr(C, align(4096))]
struct AnchorPage([u8; 4096]);
static WINDOW_ANCHOR: AnchorPage = AnchorPage([0; 4096]);

/// Runs `work(va, len)` over guest RAM `[pa, pa + len)`, a chunk of at most 2 MiB at a
/// time, each mapped at `va` in this CPU's window slot with `access` while `work` runs
/// (`crate::mem::window`). The stage-1 lock is held only to map and unmap each chunk.
///
/// A range outside the guest RAM pool, or a window that cannot map, is a hypervisor bug
/// (the callers pass RAM of a VM description, claimed from the pool): the machine stops
/// with the reason rather than touch memory it should not.
pub fn with_guest_ram(pa: u64, len: u64, access: window::Access, work: impl FnMut(u64, u64)) {
    let (Some(w), Some(table)) = (WINDOW.get(), STAGE1.get()) else {
        fatal(format_args!("guest RAM window used before start-up"))
    };
    if let Err(e) = w.for_each_chunk(table, cpu_index(), pa, len, access, work) {
        fatal(format_args!("guest RAM window on cpu{}: {e}", cpu_index()));
    }
}

/// Stops the machine unless `[pa, pa + len)` lies in the guest RAM pool: what
/// [`with_guest_ram`] checks, for a write that does not go through the window (a DMA the
/// hypervisor asks a device for).
pub fn check_guest_ram(pa: u64, len: u64) {
    let Some(w) = WINDOW.get() else {
        fatal(format_args!("guest RAM checked before start-up"))
    };
    if let Err(e) = w.check(pa, len) {
        fatal(format_args!("guest RAM check on cpu{}: {e}", cpu_index()));
    }
}

/// Builds the stage-1 table from the plan and installs the guest RAM window, turns the
/// MMU and caches on, and publishes the register values for the secondary CPUs.
fn enable_stage1(pool: &'static Mutex<FramePool>, maps: &[stage1::Mapping], window: Window) {
    let pa_bits = regs::pa_bits();
    // SAFETY: the frame pool lies in RAM that only page tables use, and it is identity
    // mapped read-write (the "pt-frames" mapping) once the MMU is on.
    let frames = unsafe { SharedFrames::new(pool) };
    let mut table = PageTable::new(
        El2::new(stage1::VA_BITS).with_pa_bits(pa_bits),
        frames,
        ArmTlb,
    )
    .unwrap_or_else(|e| fatal(format_args!("stage 1: {e}")));
    table.set_tlbi_range(mmu::arch::has_tlbi_range());
    if let Err((m, e)) = stage1::build(&mut table, maps) {
        fatal(format_args!("stage 1: mapping {} failed: {e}", m.name));
    }
    let anchor = (&raw const WINDOW_ANCHOR) as u64;
    if let Err(e) = window.install(&mut table, anchor) {
        fatal(format_args!("stage 1: guest RAM window: {e}"));
    }
    // With FEAT_MTE2, EL2 may store allocation tags (SCTLR_EL2.ATA) into memory it maps
    // Tagged (MAIR attribute 4): the scrub of guest RAM clears them (`MachineMemory`).
    let mte2 = regs::id_regs().has_mte2();
    TAGS.store(mte2, Ordering::Relaxed);
    let cfg = MmuConfig {
        mair: stage1::mair_el2(mte2),
        tcr: table.tcr_el2(),
        ttbr0: table.ttbr0_el2(),
        sctlr: stage1::sctlr_el2(mte2),
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
    WINDOW.call_once(|| window);
}

/// W^X proof: write to the hypervisor's own text with the MMU on. Must fault.
#[cfg(feature = "fault-write-text")]
fn fault_write_text(text_start: u64) {
    let target = text_start.wrapping_add(0x40);
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
fn start_secondaries(platform: &Hardware, boot_mpidr: u64) -> usize {
    // Then the others are at most `MAX_CPUS - 1`: each gets an index, a stack and a slot.
    if !platform.cpus().contains(&boot_mpidr) {
        fatal(format_args!(
            "the boot CPU (MPIDR {boot_mpidr:#x}) is not among the CPUs the device tree \
             describes (the first {} are used: {:x?})",
            boot::MAX_CPUS,
            platform.cpus()
        ));
    }
    let entry = boot::secondary_entry_address();
    let mut expected = 1usize;
    let others = platform.cpus().iter().copied().filter(|&m| m != boot_mpidr);
    for (index, mpidr) in (1..).zip(others) {
        let Some(slot) = CPU_MPIDR.get(index) else {
            break;
        };
        slot.store(mpidr, Ordering::Release);
        match psci_cpu_on(mpidr, entry, index as u64) {
            // One per CPU slot: the sum is exact.
            Ok(()) => expected = expected.saturating_add(1),
            Err(e) => error!("cpu{index} (MPIDR {mpidr:#x}): CPU_ON failed: {e:?}"),
        }
    }
    let freq = CNTFRQ_EL0.get();
    // Saturating: a counter or frequency near the top waits until the counter's end
    // rather than not at all.
    let deadline = CNTPCT_EL0
        .get()
        .saturating_add(freq.saturating_mul(SECONDARY_TIMEOUT_MS) / 1000);
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

/// The secondary CPUs that have come online once.
static STARTED: [AtomicBool; boot::MAX_CPUS] = [const { AtomicBool::new(false) }; boot::MAX_CPUS];

/// Runs on each secondary CPU after the boot code set up its stack (and MMU, once the
/// primary publishes its tables).
pub fn secondary(cpu: usize) {
    let mpidr = MPIDR_EL1.get() & MPIDR_AFFINITY_MASK;
    regs::leave_guest_context();
    if gic::present() && !gic::init_cpu() {
        fatal(format_args!("gic: no redistributor for cpu{cpu}"));
    }
    // Said once: a parked CPU comes back through here each time it is woken.
    let first = STARTED
        .get(cpu)
        .is_some_and(|s| !s.swap(true, Ordering::Relaxed));
    if first {
        info!("cpu{cpu} online: MPIDR {mpidr:#x}, MMU {}", mmu_state());
    } else {
        log::debug!("cpu{cpu} back from parking");
    }
    #[cfg(feature = "fault-stack-overflow")]
    if cpu == 1 {
        warn!("fault-stack-overflow: recursing without bound on cpu{cpu}");
        recurse(0);
    }
    #[cfg(feature = "fault-panic")]
    #[allow(clippy::panic)] // The fault-panic build panics here on purpose.
    if cpu == 1 {
        panic!("fault-panic: deliberate panic on cpu{cpu}");
    }
    if first {
        CPUS_ONLINE.fetch_add(1, Ordering::AcqRel);
    }
}

/// Recursion that overflows the stack (the `fault-stack-overflow` build).
#[cfg(feature = "fault-stack-overflow")]
#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    let frame = core::hint::black_box([depth; 64]);
    // The frame is used after the call: no tail call.
    recurse(depth.wrapping_add(1)) ^ frame.iter().fold(0, |a, b| a ^ b)
}

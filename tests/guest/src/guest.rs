//! Everything that runs in the guest.

use core::arch::{asm, global_asm};
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU64, Ordering};

use mmu::arch::ArmTlb;
use mmu::{Attributes, El1, FrameAllocator, MapFlags, MemoryType, PageTable};
use mmu::{Permissions, PhysToVirt};

/// IPA of the virtual UART page (the VM description's `vuart`).
const UART: u64 = 0x0900_0000;
/// Start and size of the guest's RAM (the VM description's `memory`).
const RAM: (u64, u64) = (0x4000_0000, 0x20_0000);
/// The default probe address of the abort check: an IPA no VM description of the tests
/// maps. Stage 1 maps the probe page so that the access reaches stage 2.
pub const UNMAPPED_IPA: u64 = 0x7000_0000;

/// The page the abort check reads: `arg[63:12]` if nonzero, else [`UNMAPPED_IPA`].
static PROBE: AtomicU64 = AtomicU64::new(UNMAPPED_IPA);

use crate::arg::{
    ARG_ABORT, ARG_BIG_RAM, ARG_BYSTANDER, ARG_HOSTILE, ARG_IRQ, ARG_IRQ_LISTEN, ARG_LATENCY,
    ARG_LINGER, ARG_MTE, ARG_OFF_RESET, ARG_PMU, ARG_RACE, ARG_RESET, ARG_SECOND_VCPU,
    ARG_SGI_ATTACK, ARG_SHARING, ARG_SPLIT_MERGE,
};
/// How long `ARG_LINGER` keeps the guest running.
const LINGER_SECONDS: u64 = 3;

const STACK_SIZE: usize = 16 * 1024;

#[repr(C, align(16))]
struct Stacks([[u8; STACK_SIZE]; 2]);

#[no_mangle]
static mut GUEST_STACKS: Stacks = Stacks([[0; STACK_SIZE]; 2]);

// Entry of both vCPUs: x0 = description arg (vCPU 0) or CPU_ON context = vCPU index 1.
// `bare_start` is the ELF entry point (linker/test-guest.ld), where QEMU's ELF loader
// starts the guest on bare QEMU: it runs the latency measurement (x0 = ARG_LATENCY). The
// hypervisor enters the raw image at its first byte, `_start`.
// FP/SIMD is enabled first (CPACR_EL1.FPEN = 0b11, Arm ARM D19.2 CPACR_EL1) because
// compiled Rust may use SIMD registers anywhere.
global_asm!(
    r#"
// Every register a Rust handler may clobber (AAPCS64 caller-saved), in the first 160
// bytes of the frame the vector made.
.macro SAVE_CALLER_SAVED
    stp     x0, x1, [sp]
    stp     x2, x3, [sp, #16]
    stp     x4, x5, [sp, #32]
    stp     x6, x7, [sp, #48]
    stp     x8, x9, [sp, #64]
    stp     x10, x11, [sp, #80]
    stp     x12, x13, [sp, #96]
    stp     x14, x15, [sp, #112]
    stp     x16, x17, [sp, #128]
    stp     x18, x30, [sp, #144]
.endm
.macro RESTORE_CALLER_SAVED
    ldp     x0, x1, [sp]
    ldp     x2, x3, [sp, #16]
    ldp     x4, x5, [sp, #32]
    ldp     x6, x7, [sp, #48]
    ldp     x8, x9, [sp, #64]
    ldp     x10, x11, [sp, #80]
    ldp     x12, x13, [sp, #96]
    ldp     x14, x15, [sp, #112]
    ldp     x16, x17, [sp, #128]
    ldp     x18, x30, [sp, #144]
.endm

.section .text.entry, "ax"
.global _start
_start:
    mov     x19, x0
    mov     x20, #0
    adr     x1, __bss_start
    adr     x2, __bss_end
1:  cmp     x1, x2
    b.hs    2f
    str     xzr, [x1], #8
    b       1b
2:  b       common_start

.global bare_start
bare_start:
    mov     x0, #{latency}
    b       _start

.global secondary_start
secondary_start:
    mov     x19, x0
    mov     x20, #1
common_start:
    mov     x1, #(3 << 20)
    msr     cpacr_el1, x1
    isb
    adr     x1, vectors
    msr     vbar_el1, x1
    ldr     x1, =GUEST_STACKS
    add     x2, x20, #1
    mov     x3, #{stack}
    madd    x1, x2, x3, x1
    mov     sp, x1
    mov     x0, x19
    mov     x1, x20
    bl      guest_main
3:  wfe
    b       3b

// EL1 vectors: only the synchronous one from the current EL with SP_ELx is expected.
.balign 2048
// Entry 4 (offset 0x200) is "synchronous, current EL with SP_ELx" (Arm ARM D1.10.2).
vectors:
    .rept 4
    .balign 128
    b       unexpected
    .endr
    .balign 128
    b       sync_el1h
    .balign 128
    b       irq_el1h
    .rept 10
    .balign 128
    b       unexpected
    .endr

// IRQ, current EL with SP_ELx (offset 0x280): the interrupt checks (guest::irq).
irq_el1h:
    sub     sp, sp, #176
    SAVE_CALLER_SAVED
    mrs     x0, elr_el1
    mrs     x1, spsr_el1
    stp     x0, x1, [sp, #160]
    bl      guest_irq
    ldp     x0, x1, [sp, #160]
    msr     elr_el1, x0
    msr     spsr_el1, x1
    RESTORE_CALLER_SAVED
    add     sp, sp, #176
    eret

sync_el1h:
    // Save every register the Rust handler may clobber (AAPCS64 caller-saved).
    sub     sp, sp, #160
    SAVE_CALLER_SAVED
    mrs     x0, esr_el1
    mrs     x1, far_el1
    mrs     x2, elr_el1
    bl      guest_sync_exception
    // Returns the address to resume at.
    msr     elr_el1, x0
    RESTORE_CALLER_SAVED
    add     sp, sp, #160
    eret

unexpected:
    mrs     x0, esr_el1
    mrs     x1, elr_el1
    bl      guest_unexpected_exception
"#,
    stack = const STACK_SIZE,
    latency = const ARG_LATENCY,
);

/// Writes to the virtual UART.
struct Uart;

impl Write for Uart {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            // SAFETY: UART is the virtual UART page, mapped as device memory; a 32-bit
            // store to UARTDR is one single-register access the hypervisor emulates.
            unsafe { core::ptr::write_volatile(UART as *mut u32, u32::from(b)) };
        }
        Ok(())
    }
}

macro_rules! println {
    ($($arg:tt)*) => {{
        let _ = writeln!(Uart, $($arg)*);
    }};
}

mod big_ram;
mod hostile;
mod irq;
mod latency;
mod mte;
mod pmu;
mod sharing;
mod split_merge;

fn hvc(fid: u32, args: &[u64]) -> [u64; 4] {
    let mut a = [0u64; 17];
    a[..args.len()].copy_from_slice(args);
    let r = smccc::hvc64(fid, a);
    [r[0], r[1], r[2], r[3]]
}

const PSCI_VERSION: u32 = smccc::psci::PSCI_VERSION;
const PSCI_CPU_ON: u32 = smccc::psci::PSCI_CPU_ON_64;
const PSCI_CPU_OFF: u32 = smccc::psci::PSCI_CPU_OFF;
const PSCI_AFFINITY_INFO: u32 = smccc::psci::PSCI_AFFINITY_INFO_64;
const PSCI_SYSTEM_OFF: u32 = smccc::psci::PSCI_SYSTEM_OFF;
const SMCCC_VERSION: u32 = smccc::arch::SMCCC_VERSION;
const VM_INFO: u32 = 0xC600_0001;
const VM_NAME: u32 = 0xC600_0002;
const VM_BOOTS: u32 = 0xC600_0003;
const PSCI_SYSTEM_RESET: u32 = smccc::psci::PSCI_SYSTEM_RESET;
const NOT_SUPPORTED: u64 = u64::MAX;

static PASSED: AtomicU64 = AtomicU64::new(0);
static FAILED: AtomicU64 = AtomicU64::new(0);

fn check(name: &str, ok: bool, detail: fmt::Arguments<'_>) {
    if ok {
        PASSED.fetch_add(1, Ordering::SeqCst);
        println!("PASS {name}");
    } else {
        FAILED.fetch_add(1, Ordering::SeqCst);
        println!("FAIL {name}: {detail}");
    }
}

/// Page-table frames for the guest's own stage 1 (identity mapped, so PA = VA).
#[repr(C, align(4096))]
struct Frames([[u64; 512]; 8]);

static mut FRAMES: Frames = Frames([[0; 512]; 8]);

struct StaticFrames {
    next: usize,
}

// SAFETY: the guest runs identity mapped; frames are the static `FRAMES`.
unsafe impl PhysToVirt for StaticFrames {
    fn phys_to_virt(&self, pa: u64) -> *mut u64 {
        pa as *mut u64
    }
}

// SAFETY: each of the static frames is handed out once (zero: .bss) and never reused.
unsafe impl FrameAllocator for StaticFrames {
    fn alloc_frame(&mut self) -> Option<u64> {
        if self.next >= 8 {
            return None;
        }
        // Frames are handed out once (the guest never frees them) and are zero (.bss).
        let base = core::ptr::addr_of_mut!(FRAMES) as u64;
        let pa = base + self.next as u64 * 4096;
        self.next += 1;
        Some(pa)
    }

    fn free_frame(&mut self, _pa: u64) {}
}

/// The guest's stage-1 table, live once the MMU is on.
type Table = PageTable<El1, StaticFrames, ArmTlb>;

/// `TTBR0_EL1`, `TCR_EL1`, `MAIR_EL1` of the tables vCPU 0 built (for vCPU 1), and the
/// bits `mmu_on` sets in `SCTLR_EL1` besides M, C and I.
static MMU_REGS: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

/// `SCTLR_EL1.ATA` (bit 43): allocation tag access at EL1 (FEAT_MTE2).
const SCTLR_ATA: u64 = 1 << 43;

/// Builds the stage-1 tables: RAM, the UART, the probe page, for the sharing scenario
/// (`sharing`) the window where it retrieves another VM's pages, and for the MTE check
/// (`mte`, on a CPU with FEAT_MTE2) the Tagged alias of two RAM pages (`mte::ALIAS`),
/// with `MAIR_EL1` attribute 4 Tagged and tag access on.
fn build_tables(sharing: bool, gic: bool, mte: bool, big_ram: bool) -> Result<Table, mmu::Error> {
    let regime = El1::new(1, 39);
    let mut pt = PageTable::new(regime, StaticFrames { next: 0 }, ArmTlb)?;
    let rwx = Permissions::RW | Permissions::EXEC_EL1;
    pt.map(
        RAM.0,
        RAM.0,
        RAM.1,
        Attributes::normal(rwx),
        MapFlags::empty(),
    )?;
    pt.map(UART, UART, 4096, Attributes::device(), MapFlags::empty())?;
    if gic {
        let (start, size) = irq::GIC_WINDOW;
        pt.map(start, start, size, Attributes::device(), MapFlags::empty())?;
    }
    let probe = PROBE.load(Ordering::SeqCst);
    pt.map(
        probe,
        probe,
        4096,
        Attributes::new(Permissions::RW, MemoryType::Normal),
        MapFlags::empty(),
    )?;
    if big_ram {
        pt.map(
            big_ram::ALIAS,
            RAM.0 + RAM.1,
            big_ram::ALIAS_SIZE,
            Attributes::new(Permissions::RW, MemoryType::Normal),
            MapFlags::empty(),
        )?;
    }
    if sharing {
        let (start, size) = sharing::WINDOW;
        pt.map(
            start,
            start,
            size,
            Attributes::new(Permissions::RW, MemoryType::Normal),
            MapFlags::empty(),
        )?;
    }
    let mut mair = pt.mair_el1();
    if mte && mte::has_mte2() {
        for (i, pa) in mte::PAGES.into_iter().enumerate() {
            pt.map(
                mte::ALIAS + i as u64 * 4096,
                pa,
                4096,
                Attributes::new(Permissions::RW, MemoryType::NormalTagged),
                MapFlags::empty(),
            )?;
        }
        mair = mmu::MAIR_VALUE_TAGGED;
        MMU_REGS[3].store(SCTLR_ATA, Ordering::SeqCst);
    }
    MMU_REGS[0].store(pt.ttbr0_el1(), Ordering::SeqCst);
    MMU_REGS[1].store(pt.tcr_el1(), Ordering::SeqCst);
    MMU_REGS[2].store(mair, Ordering::SeqCst);
    Ok(pt)
}

/// Turns on the EL1&0 MMU with the tables of [`build_tables`]: MAIR, TCR, TTBR0, then
/// SCTLR_EL1.M | C | I (Arm ARM D8.2; the ISBs order the register writes).
fn mmu_on() {
    let ttbr = MMU_REGS[0].load(Ordering::SeqCst);
    let tcr = MMU_REGS[1].load(Ordering::SeqCst);
    let mair = MMU_REGS[2].load(Ordering::SeqCst);
    let extra = MMU_REGS[3].load(Ordering::SeqCst);
    // SAFETY: the tables identity-map all RAM the guest uses (code, data, stacks), so
    // execution continues at the same addresses with the MMU on; `extra` is 0 or
    // SCTLR_EL1.ATA, set only with FEAT_MTE2.
    unsafe {
        asm!(
            "dsb ish",
            "msr mair_el1, {mair}",
            "msr tcr_el1, {tcr}",
            "msr ttbr0_el1, {ttbr}",
            "isb",
            "tlbi vmalle1",
            "dsb nsh",
            "isb",
            "mrs {tmp}, sctlr_el1",
            "orr {tmp}, {tmp}, #(1 << 0)",
            "orr {tmp}, {tmp}, #(1 << 2)",
            "orr {tmp}, {tmp}, #(1 << 12)",
            "orr {tmp}, {tmp}, {extra}",
            "msr sctlr_el1, {tmp}",
            "isb",
            extra = in(reg) extra,
            mair = in(reg) mair,
            tcr = in(reg) tcr,
            ttbr = in(reg) ttbr,
            tmp = out(reg) _,
            options(nostack),
        );
    }
}

fn sctlr() -> u64 {
    let v: u64;
    // SAFETY: reading SCTLR_EL1 at EL1 has no side effects.
    unsafe { asm!("mrs {}, sctlr_el1", out(reg) v, options(nomem, nostack)) };
    v
}

/// Set while the guest deliberately touches the probe page; the exception handler
/// records the abort in [`ABORT_ESR`] and skips the instruction.
static EXPECT_ABORT: AtomicU64 = AtomicU64::new(0);
static ABORT_ESR: AtomicU64 = AtomicU64::new(0);
static ABORT_FAR: AtomicU64 = AtomicU64::new(0);

#[no_mangle]
extern "C" fn guest_sync_exception(esr: u64, far: u64, elr: u64) -> u64 {
    if EXPECT_ABORT.swap(0, Ordering::SeqCst) == 1 {
        ABORT_ESR.store(esr, Ordering::SeqCst);
        ABORT_FAR.store(far, Ordering::SeqCst);
        return elr + 4;
    }
    guest_unexpected_exception(esr, elr)
}

#[no_mangle]
extern "C" fn guest_unexpected_exception(esr: u64, elr: u64) -> ! {
    println!("FAIL unexpected exception: ESR {esr:#x} ELR {elr:#x}");
    power_off()
}

fn power_off() -> ! {
    hvc(PSCI_SYSTEM_OFF, &[]);
    loop {
        core::hint::spin_loop();
    }
}

/// Written by vCPU 1 when it runs: its VM_INFO vCPU index + 1.
static SECOND_SEEN: AtomicU64 = AtomicU64::new(0);
/// Set by vCPU 0 when vCPU 1 may turn itself off.
static RELEASE_SECOND: AtomicU64 = AtomicU64::new(0);

#[no_mangle]
extern "C" fn guest_main(arg: u64, vcpu: u64) -> ! {
    if vcpu == 1 {
        mmu_on();
        if arg == split_merge::LOAD_CONTEXT {
            split_merge::load();
        } else if arg == hostile::RACE_CONTEXT {
            hostile::race_second();
        } else if arg == hostile::OFF_RESET_CONTEXT {
            hostile::off_reset_second();
        } else if arg == irq::IRQ_CONTEXT {
            irq::secondary();
        } else if arg == latency::LATENCY_CONTEXT {
            latency::secondary();
        } else {
            let info = hvc(VM_INFO, &[]);
            SECOND_SEEN.store(info[3] + 1, Ordering::SeqCst);
            // Stay on until vCPU 0 has checked that a second CPU_ON is refused.
            while RELEASE_SECOND.load(Ordering::SeqCst) == 0 {
                core::hint::spin_loop();
            }
        }
        hvc(PSCI_CPU_OFF, &[]);
        println!("FAIL cpu-off returned");
        loop {
            core::hint::spin_loop();
        }
    }
    if arg >> 12 != 0 {
        PROBE.store(arg & !0xfff, Ordering::SeqCst);
    }
    // The tables live in static frames for the rest of the run (this never returns).
    let gic = arg & (ARG_IRQ | ARG_SGI_ATTACK | ARG_LATENCY) != 0;
    let mut table = match build_tables(
        arg & ARG_SHARING != 0,
        gic,
        arg & ARG_MTE != 0,
        arg & ARG_BIG_RAM != 0,
    ) {
        Ok(t) => t,
        Err(e) => {
            println!("FAIL stage-1 tables: {e:?}");
            power_off();
        }
    };
    mmu_on();
    // Only the measurement, which makes no hypervisor call (it also runs on bare QEMU).
    if arg & ARG_LATENCY != 0 {
        latency::latency();
        done();
    }
    // The lifecycle races run on every boot, without the base checks.
    if arg & ARG_RACE != 0 {
        hostile::race();
    }
    if arg & ARG_OFF_RESET != 0 {
        hostile::off_reset();
    }
    let s = sctlr();
    check("mmu-on", s & 1 == 1, format_args!("SCTLR_EL1 {s:#x}"));

    let info = hvc(VM_INFO, &[]);
    println!("vm-info id={} vmid={} vcpu={}", info[1], info[2], info[3]);
    check(
        "hypercall-vm-info",
        info[0] == 0 && info[2] != 0 && info[3] == 0,
        format_args!("{info:x?}"),
    );
    let name = hvc(VM_NAME, &[]);
    let mut bytes = [0u8; 24];
    for (i, w) in name[1..].iter().enumerate() {
        bytes[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    let len = (name[0] as usize).min(24);
    let name_str = core::str::from_utf8(&bytes[..len]).unwrap_or("?");
    check("hypercall-vm-name", len > 0, format_args!("{name:x?}"));
    println!("vm-name {name_str}");

    let v = hvc(SMCCC_VERSION, &[])[0];
    check("smccc-version", v == 0x1_0001, format_args!("{v:#x}"));
    let v = hvc(PSCI_VERSION, &[])[0];
    check("psci-version", v == 0x1_0001, format_args!("{v:#x}"));
    let unknown = [0xC600_00FF, 0x8600_FF02, 0xC400_0001, 0x0];
    let bad = unknown.iter().find(|f| hvc(**f, &[])[0] != NOT_SUPPORTED);
    check(
        "unknown-id-not-supported",
        bad.is_none(),
        format_args!("{bad:x?}"),
    );

    workaround_check();
    hypercall_timing();
    memory_check();
    set_way_check();
    fp_check();
    tlb_check(&mut table);

    if arg & ARG_SECOND_VCPU != 0 {
        second_vcpu_check();
    }
    if arg & ARG_ABORT != 0 {
        abort_check();
    }
    if arg & ARG_LINGER != 0 {
        linger();
    }
    if arg & ARG_BIG_RAM != 0 {
        big_ram::big_ram_check();
    }
    if arg & ARG_RESET != 0 {
        reset_check();
    }
    if arg & ARG_SHARING != 0 {
        sharing::sharing_check();
    }
    if arg & ARG_SPLIT_MERGE != 0 {
        split_merge::split_merge_check();
    }
    if arg & ARG_PMU != 0 {
        pmu::pmu_check();
    }
    if arg & ARG_HOSTILE != 0 {
        hostile::hostile();
    }
    if arg & ARG_BYSTANDER != 0 {
        hostile::bystander();
    }
    if arg & ARG_IRQ != 0 {
        irq::irq_check(arg & ARG_IRQ_LISTEN != 0);
    }
    if arg & ARG_SGI_ATTACK != 0 {
        irq::attack();
    }
    if arg & ARG_MTE != 0 {
        mte::mte_check();
    }
    done()
}

/// Prints the final report and powers the VM off.
fn done() -> ! {
    println!(
        "DONE pass={} fail={}",
        PASSED.load(Ordering::SeqCst),
        FAILED.load(Ordering::SeqCst)
    );
    power_off()
}

/// Writes a pattern over 256 KiB of RAM (above the image), reads it back, and checks
/// that RAM the image does not cover was zero (scrubbed) when the VM started.
fn memory_check() {
    let start = RAM.0 + 0x10_0000;
    let words = 0x4_0000 / 8;
    let p = start as *mut u64;
    let mut was_zero = true;
    for i in 0..words {
        // SAFETY: [start, start + 256 KiB) is guest RAM nothing else uses (the image,
        // bss and stacks lie in the first MiB).
        unsafe {
            was_zero &= p.add(i).read_volatile() == 0;
            p.add(i)
                .write_volatile((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        }
    }
    let mut bad = None;
    for i in 0..words {
        // SAFETY: as above.
        let v = unsafe { p.add(i).read_volatile() };
        if v != (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) {
            bad = Some(i);
            break;
        }
    }
    check(
        "memory-scrubbed",
        was_zero,
        format_args!("nonzero RAM at start"),
    );
    check(
        "memory-rw",
        bad.is_none(),
        format_args!("mismatch at word {bad:?}"),
    );
}

/// A clean and invalidate by set/way that starts a sweep (set 0, way 0, level 1) traps
/// to EL2, which cleans and invalidates all of the VM's RAM by VA instead, reaching it
/// through its guest-RAM window (`docs/cpu-state.md`, TSW). What this checks is that
/// the guest resumes after the instruction with its RAM (the pattern [`memory_check`]
/// wrote) unchanged: QEMU models no caches, so it cannot tell a clean from none.
fn set_way_check() {
    let p = (RAM.0 + 0x10_0000) as *const u64;
    let expected = |i: usize| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    // SAFETY: a data-cache maintenance instruction: at EL1 under HCR_EL2.TSW it traps,
    // and the hypervisor's emulation changes no memory contents.
    unsafe { asm!("dc cisw, {}", in(reg) 0u64, options(nostack, preserves_flags)) };
    let bad = [1usize, 2, 0x4000, 0x7fff].into_iter().find(|&i| {
        // SAFETY: the words [`memory_check`] wrote, in RAM nothing else uses.
        unsafe { p.add(i).read_volatile() != expected(i) }
    });
    check(
        "set-way-clean",
        bad.is_none(),
        format_args!("word {bad:?} changed"),
    );
}

fn fp_check() {
    let mut acc = core::hint::black_box(1.0f64);
    for i in 1..=20 {
        acc = acc * core::hint::black_box(1.5) + f64::from(i) / 8.0;
    }
    let d: u64;
    // SAFETY: moving a value through a SIMD/FP register: no memory access.
    unsafe {
        asm!("fmov d0, {x}", "fmov {y}, d0", x = in(reg) acc.to_bits(), y = out(reg) d,
             out("v0") _, options(nomem, nostack));
    }
    let expected = {
        let mut e = 1.0f64;
        for i in 1..=20 {
            e = e * 1.5 + f64::from(i) / 8.0;
        }
        e
    };
    check(
        "fp-simd",
        f64::from_bits(d) == expected && expected > 3000.0,
        format_args!("{acc} vs {expected}"),
    );
}

fn second_vcpu_check() {
    extern "C" {
        fn secondary_start();
    }
    let entry = secondary_start as *const () as u64;
    let r = hvc(PSCI_CPU_ON, &[1, entry, 1])[0];
    check("psci-cpu-on", r == 0, format_args!("returned {r:#x}"));
    let mut seen = 0;
    for _ in 0..50_000_000u64 {
        seen = SECOND_SEEN.load(Ordering::SeqCst);
        if seen != 0 {
            break;
        }
        core::hint::spin_loop();
    }
    check(
        "second-vcpu-ran",
        seen == 2,
        format_args!("vCPU 1 reported {seen}"),
    );
    // vCPU 1 is on and waits for RELEASE_SECOND: a second CPU_ON must be refused.
    let again = hvc(PSCI_CPU_ON, &[1, entry, 1])[0] as i64;
    check(
        "psci-cpu-on-again",
        again == -4,
        format_args!("returned {again}"),
    );
    let state = hvc(PSCI_AFFINITY_INFO, &[1, 0])[0];
    check(
        "psci-affinity-on",
        state == 0,
        format_args!("AFFINITY_INFO {state}"),
    );
    RELEASE_SECOND.store(1, Ordering::SeqCst);
    let mut state = u64::MAX;
    for _ in 0..50_000_000u64 {
        state = hvc(PSCI_AFFINITY_INFO, &[1, 0])[0];
        if state == 1 {
            break;
        }
    }
    check(
        "psci-cpu-off",
        state == 1,
        format_args!("AFFINITY_INFO {state}"),
    );
}

/// The generic timer's frequency (at least 1) and the physical counter.
fn counter() -> (u64, u64) {
    let (freq, now): (u64, u64);
    // SAFETY: reading the counter frequency and the physical counter (CNTHCTL_EL2 lets
    // EL1 read it) has no side effects.
    unsafe {
        asm!("mrs {}, cntfrq_el0", out(reg) freq, options(nomem, nostack));
        asm!("isb", "mrs {}, cntpct_el0", out(reg) now, options(nomem, nostack));
    }
    (freq.max(1), now)
}

/// The mean time of `calls` runs of `f` in nanoseconds, measured with the generic timer.
fn mean_ns(calls: u64, mut f: impl FnMut()) -> u128 {
    let (freq, start) = counter();
    for _ in 0..calls {
        f();
    }
    let end = counter().1;
    u128::from(end.wrapping_sub(start)) * 1_000_000_000 / (u128::from(freq) * u128::from(calls))
}

/// Prints the mean time of a `TWOSTAGE_VM_INFO` round trip over 1000 calls (information,
/// not a check).
fn hypercall_timing() {
    const CALLS: u64 = 1000;
    let ns = mean_ns(CALLS, || {
        core::hint::black_box(hvc(VM_INFO, &[]));
    });
    println!("hypercall round trip: {ns} ns (mean of {CALLS} VM_INFO calls)");
}

/// `SMCCC_ARCH_FEATURES` of `SMCCC_ARCH_WORKAROUND_1/2/3` as the hypervisor documents
/// them for the two CPUs the tests use (docs/cpu-state.md): QEMU's `cortex-a57` needs a
/// firmware call EL2 cannot make under QEMU (all -1); `max` has CSV2 (workaround 1 not
/// needed: 1) and no statement on branch history (workaround 3: -1).
fn workaround_check() {
    let midr: u64;
    // SAFETY: reading MIDR_EL1 (VPIDR_EL2's value) has no side effects.
    unsafe { asm!("mrs {}, midr_el1", out(reg) midr, options(nomem, nostack)) };
    let ask = |fid: u64| hvc(0x8000_0001, &[fid])[0] as i64;
    let got = (ask(0x8000_8000), ask(0x8000_7fff), ask(0x8000_3fff));
    let expected = match (midr >> 24, (midr >> 4) & 0xfff) {
        (0x41, 0xd07) => Some((-1, -1, -1)),
        (0, _) => Some((1, -1, -1)),
        _ => None,
    };
    println!("smccc workarounds (1, 2, 3): {got:?} on MIDR {midr:#x}");
    if let Some(e) = expected {
        check(
            "smccc-arch-workarounds",
            got == e,
            format_args!("{got:?}, expected {e:?}"),
        );
    }
}

/// On the first boot, resets the VM with PSCI `SYSTEM_RESET`; on the second, checks
/// that the hypervisor counted the restart (the RAM check above already showed that
/// the RAM written before the reset was scrubbed).
fn reset_check() {
    let boots = hvc(VM_BOOTS, &[]);
    if boots[0] == 0 && boots[1] == 1 {
        println!("resetting");
        hvc(PSCI_SYSTEM_RESET, &[]);
        println!("FAIL system-reset returned");
        return;
    }
    check(
        "system-reset",
        boots == [0, 2, 0, 0],
        format_args!("{boots:x?}"),
    );
}

/// Keeps running for [`LINGER_SECONDS`] of the generic timer (so that a test can see this VM
/// carry on after another VM was stopped), then reports.
fn linger() {
    let (freq, start) = counter();
    while counter().1.wrapping_sub(start) < freq * LINGER_SECONDS {}
    let info = hvc(VM_INFO, &[]);
    check(
        "alive-after-linger",
        info[0] == 0,
        format_args!("{info:x?}"),
    );
}

/// Where [`tlb_check`] maps its pages: free VA space whose page numbers modulo the size
/// of QEMU's direct-mapped TLB (64 entries and up) differ from those of the image,
/// stack and tables the unmap code touches (pages 0x4000_0-0x4002_f), so that only a
/// TLB invalidation evicts the test pages from QEMU's TLB.
const TLB_TEST_VA: u64 = 0x404B_0000;
/// An odd count, so that with range invalidation both kinds of instruction run (one
/// page by address, the rest as one range).
const TLB_TEST_PAGES: u64 = 7;

/// Checks that `mmu`'s TLB maintenance at EL1 really invalidates: maps pages (aliases
/// of the image, read-only), reads each one so the TLB holds it, unmaps them and reads
/// again, which must now take a translation fault on every page. One more page stays
/// mapped behind them, so their level-3 table stays and only the pages are invalidated.
///
/// Without FEAT_TLBIRANGE the table invalidates with one `TLBI VALE1IS` per page, and a
/// wrong operand leaves a stale entry in QEMU's TLB, so the read succeeds and the check
/// fails, in a VM whose stage 2 maps pages. (With stage-2 blocks QEMU turns each
/// invalidation by address into a full flush, `docs/linux-guest.md`.) With
/// FEAT_TLBIRANGE it is one `VALE1IS` for the odd page and one `RVALE1IS`; QEMU 7.2
/// flushes its whole TLB for any range longer than a few entries, so there the check
/// shows that the range instruction executes and takes effect, and the operand
/// encoding is checked by `mmu`'s own tests.
fn tlb_check(table: &mut Table) {
    let ranges = mmu::arch::has_tlbi_range();
    table.set_tlbi_range(ranges);
    let size = TLB_TEST_PAGES * 4096;
    let ro = Attributes::normal(Permissions::READ);
    if let Err(e) = table.map(TLB_TEST_VA, RAM.0, size + 4096, ro, MapFlags::NO_BLOCKS) {
        check("tlb-unmap", false, format_args!("map: {e:?}"));
        return;
    }
    let read = |va: u64| {
        // SAFETY: `va` is one of the test pages: mapped read-only, or unmapped and read
        // under EXPECT_ABORT so that the vector skips the load.
        unsafe { core::ptr::read_volatile(va as *const u64) }
    };
    let mut before = 0;
    for p in 0..TLB_TEST_PAGES {
        before ^= read(TLB_TEST_VA + p * 4096);
    }
    core::hint::black_box(before);
    if let Err(e) = table.unmap(TLB_TEST_VA, size) {
        check("tlb-unmap", false, format_args!("unmap: {e:?}"));
        return;
    }
    let mut faulted = 0;
    for p in 0..TLB_TEST_PAGES {
        let va = TLB_TEST_VA + p * 4096;
        ABORT_ESR.store(0, Ordering::SeqCst);
        EXPECT_ABORT.store(1, Ordering::SeqCst);
        let _ = read(va);
        let esr = ABORT_ESR.load(Ordering::SeqCst);
        let far = ABORT_FAR.load(Ordering::SeqCst);
        // A data abort taken at EL1 (EC 0x25) for a translation fault (DFSC 0b0001xx).
        if esr >> 26 == 0x25 && esr & 0x3c == 0x04 && far == va {
            faulted += 1;
        }
    }
    EXPECT_ABORT.store(0, Ordering::SeqCst);
    let how = if ranges { "range" } else { "by-address" };
    println!("tlb-unmap: {how} invalidation");
    check(
        "tlb-unmap",
        faulted == TLB_TEST_PAGES,
        format_args!("{faulted} of {TLB_TEST_PAGES} unmapped pages faulted"),
    );
}

fn abort_check() {
    let probe = PROBE.load(Ordering::SeqCst);
    println!("reading unmapped IPA {probe:#x}");
    EXPECT_ABORT.store(1, Ordering::SeqCst);
    // SAFETY: a deliberate access to an IPA no stage 2 maps: either the hypervisor
    // injects an abort (handled by the vector, which skips this load) or stops the VM.
    let v = unsafe { core::ptr::read_volatile(probe as *const u64) };
    let esr = ABORT_ESR.load(Ordering::SeqCst);
    let far = ABORT_FAR.load(Ordering::SeqCst);
    check(
        "injected-abort",
        esr >> 26 == 0x25 && esr & 0x3f == 0x10 && far == probe,
        format_args!("ESR_EL1 {esr:#x} FAR_EL1 {far:#x} value {v:#x}"),
    );
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("FAIL panic: {info}");
    power_off()
}

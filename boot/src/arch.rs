//! The assembly of the boot path (aarch64 bare metal only): Image header and primary
//! entry, secondary-CPU entry, the EL2 vector table, guest entry/exit, and the few
//! instructions (cache maintenance, MMU enable, semihosting) that need `asm!`.

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::mem::{offset_of, size_of};

use crate::frame::{ExceptionFrame, FpRegs, GuestRegs, RawExit};
use crate::{exit_status, Exit, ImageLayout, MmuConfig, MAX_CPUS, STACK_SIZE, TEXT_OFFSET};

/// One page-aligned stack per CPU, in the NOLOAD `.stacks` section (not part of BSS, so
/// the primary CPU's BSS clearing never touches the stack it runs on).
#[repr(C, align(4096))]
struct Stacks(UnsafeCell<[[u8; STACK_SIZE]; MAX_CPUS]>);

// SAFETY: the stacks are only touched through SP by the CPU that owns each one.
unsafe impl Sync for Stacks {}

/// Branches of the branch-history overwriting loop run on every exit from a guest (0: none);
/// raised by [`set_bhb_loop`] before each vCPU start, never lowered.
#[no_mangle]
static TWOSTAGE_BHB_LOOP: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);

/// Makes every exit from a guest run `branches` taken branches then `DSB NSH; ISB` before
/// any indirect branch at EL2 (the Spectre-BHB loop; the count depends on the CPU model).
/// Keeps the largest count asked for, so CPUs of different models all get enough.
pub fn set_bhb_loop(branches: u32) {
    TWOSTAGE_BHB_LOOP.fetch_max(branches, core::sync::atomic::Ordering::SeqCst);
}

#[link_section = ".stacks"]
#[no_mangle]
static TWOSTAGE_STACKS: Stacks = Stacks(UnsafeCell::new([[0; STACK_SIZE]; MAX_CPUS]));

/// MMU register values the secondary CPUs load before they touch memory through the
/// cache. Written by [`publish_secondary_mmu`], read by `twostage_secondary_entry` with
/// the MMU off (hence cleaned to the point of coherency after every write).
#[repr(C, align(64))]
struct SecondaryMmu(UnsafeCell<MmuConfig>);

// SAFETY: written only by the primary CPU before any CPU_ON; read-only afterwards.
unsafe impl Sync for SecondaryMmu {}

#[no_mangle]
static TWOSTAGE_SECONDARY_MMU: SecondaryMmu = SecondaryMmu(UnsafeCell::new(MmuConfig {
    mair: 0,
    tcr: 0,
    ttbr0: 0,
    sctlr: 0,
}));

/// Image header flags (booting.rst): bit 0 = 0 little endian, bits \[2:1\] = 1 for 4 KiB
/// pages, bit 3 = 0 "the 2 MiB aligned base should be as close as possible to the base of
/// DRAM": the image runs only at its link address, RAM base + `text_offset`.
const IMAGE_FLAGS: u64 = 1 << 1;

/// `CPTR_EL2` (E2H = 0) for the hypervisor and its guests: RES1 bits \[13:12\], \[9\] and
/// \[7:0\]; TZ (bit 8) set so SVE traps; TFP (bit 10), TTA, TAM and TCPAC clear so SIMD/FP
/// works at EL2 and EL1. Written before any Rust code runs, since compiled code may use
/// SIMD registers.
const CPTR_EL2_VALUE: u64 = 0x33ff;

/// Saved hypervisor state in `twostage_enter_guest`: x19-x30, the GuestRegs and RawExit
/// pointers, d8-d15 and the hypervisor's FPCR.
const HOST_FRAME: usize = 12 * 8 + 2 * 8 + 8 * 8 + 16;

// Primary entry. QEMU (hw/arm/boot.c) jumps to the first instruction of the image with
// x0 = DTB, MMU and D-cache off, at the highest EL (EL2 with virtualization=on).
global_asm!(
    r#"
.section .text.head, "ax"
.global _start
_start:
    b       1f                      // code0: branch over the header
    .long   0                       // code1
    .quad   {text_offset}           // text_offset
    .quad   __image_size            // image_size, from the linker script
    .quad   {flags}                 // flags
    .quad   0                       // res2
    .quad   0                       // res3
    .quad   0                       // res4
    .ascii  "ARM\x64"               // magic
    .long   0                       // res5
1:
    mov     x19, x0                 // keep the DTB address
    mrs     x1, CurrentEL
    cmp     x1, #(2 << 2)
    b.ne    .Lnot_el2
    adr     x1, _start              // where we run
    ldr     x2, =_start             // where we are linked
    cmp     x1, x2
    b.ne    .Lwrong_address
    msr     spsel, #1

    // Clear BSS (16-byte aligned by the linker script).
    ldr     x1, =__bss_start
    ldr     x2, =__bss_end
2:  cmp     x1, x2
    b.hs    3f
    stp     xzr, xzr, [x1], #16
    b       2b
3:
    // Discard any stale cache lines over BSS and the stacks, which were written with the
    // MMU (and so the D-cache) off.
    ldr     x0, =__bss_start
    ldr     x1, =__image_end
    bl      twostage_invalidate_dcache_range

    ldr     x1, =twostage_vectors
    msr     vbar_el2, x1
    msr     tpidr_el2, xzr          // CPU index 0
    ldr     x1, ={cptr}
    msr     cptr_el2, x1
    isb
    ldr     x1, ={stacks}
    mov     x2, #{stack_size}
    add     sp, x1, x2
    mov     x0, x19
    bl      twostage_primary_main
    b       twostage_halt

.Lnot_el2:
    adr     x1, .Lmsg_not_el2
    mov     x2, #{exit_not_el2}
    b       .Lfail
.Lwrong_address:
    adr     x1, .Lmsg_wrong_address
    mov     x2, #{exit_wrong_address}
.Lfail:
    // Semihosting SYS_WRITE0 (0x04) then SYS_EXIT (0x18) with ADP_Stopped_ApplicationExit
    // (0x20026) and a nonzero status (Arm semihosting specification, AArch64: HLT #0xF000).
    mov     x0, #0x04
    hlt     #0xf000
    adr     x1, .Lexit_block
    str     x2, [x1, #8]
    mov     x0, #0x18
    hlt     #0xf000
    b       twostage_halt

.balign 8
.Lexit_block:
    .quad   0x20026
    .quad   0
.Lmsg_not_el2:
    .asciz  "twostage: not entered at EL2 (QEMU needs -machine virtualization=on)\n"
.Lmsg_wrong_address:
    .asciz  "twostage: not running at the address it is linked at (0x40200000)\n"
.balign 4
.ltorg

.section .text, "ax"
// Stops this CPU for good.
.global twostage_halt
twostage_halt:
    msr     daifset, #0xf
1:  wfe
    b       1b

// Invalidates the data cache to the point of coherency over [x0, x1).
// Clobbers x0-x3. CTR_EL0.DminLine gives the smallest line size.
twostage_invalidate_dcache_range:
    mrs     x3, ctr_el0
    ubfx    x3, x3, #16, #4
    mov     x2, #4
    lsl     x2, x2, x3              // line size in bytes
    sub     x3, x2, #1
    bic     x0, x0, x3
1:  cmp     x0, x1
    b.hs    2f
    dc      ivac, x0
    add     x0, x0, x2
    b       1b
2:  dsb     sy
    ret

// Secondary entry: the PSCI CPU_ON entry point, with x0 = context id = CPU index.
// The CPU starts at EL2 (the caller's EL) with the MMU off.
.global twostage_secondary_entry
twostage_secondary_entry:
    msr     spsel, #1
    cmp     x0, #{max_cpus}
    b.hs    twostage_halt
    mov     x19, x0
    ldr     x1, =twostage_vectors
    msr     vbar_el2, x1
    msr     tpidr_el2, x19
    ldr     x1, ={cptr}
    msr     cptr_el2, x1
    // Turn the MMU on with the primary's tables before using the stack, so that every
    // access to normal memory from here on is cacheable and coherent.
    ldr     x1, =TWOSTAGE_SECONDARY_MMU
    ldp     x2, x3, [x1]            // MAIR_EL2, TCR_EL2
    ldp     x4, x5, [x1, #16]       // TTBR0_EL2, SCTLR_EL2
    cbz     x5, 1f                  // no MMU configuration published: stay MMU-off
    msr     mair_el2, x2
    msr     tcr_el2, x3
    msr     ttbr0_el2, x4
    isb
    tlbi    alle2
    dsb     nsh
    ic      iallu
    dsb     nsh
    isb
    msr     sctlr_el2, x5
    isb
1:
    ldr     x1, ={stacks}
    mov     x2, #{stack_size}
    add     x3, x19, #1
    madd    x1, x3, x2, x1
    mov     sp, x1
    mov     x0, x19
    bl      twostage_secondary_main
    b       twostage_halt
.ltorg
"#,
    text_offset = const TEXT_OFFSET,
    flags = const IMAGE_FLAGS,
    stacks = sym TWOSTAGE_STACKS,
    stack_size = const STACK_SIZE,
    max_cpus = const MAX_CPUS,
    exit_not_el2 = const exit_status::NOT_EL2,
    exit_wrong_address = const exit_status::WRONG_LOAD_ADDRESS,
    cptr = const CPTR_EL2_VALUE,
);

// The EL2 vector table (VBAR_EL2): 16 entries of 0x80 bytes, 2 KiB aligned.
// Exceptions from EL2 itself save an ExceptionFrame and call twostage_el2_exception(frame,
// info) with info = source << 2 | kind; if it returns, the frame is restored and execution
// resumes at frame.elr. Exceptions from a lower EL (AArch64 or AArch32) are guest exits:
// they return from twostage_enter_guest.
global_asm!(
    r#"
.macro HYP_VECTOR info
    .balign 0x80
    sub     sp, sp, #{frame_size}
    stp     x0, x1, [sp]
    mov     x1, #\info
    b       twostage_el2_trap
.endm

.macro GUEST_VECTOR kind
    .balign 0x80
    stp     x0, x1, [sp, #-16]!
    mov     x1, #\kind
    b       twostage_guest_exit
.endm

.section .text, "ax"
.balign 0x800
.global twostage_vectors
twostage_vectors:
    HYP_VECTOR 0                    // current EL, SP_EL0: sync
    HYP_VECTOR 1                    // irq
    HYP_VECTOR 2                    // fiq
    HYP_VECTOR 3                    // serror
    HYP_VECTOR 4                    // current EL, SP_EL2: sync
    HYP_VECTOR 5                    // irq
    HYP_VECTOR 6                    // fiq
    HYP_VECTOR 7                    // serror
    GUEST_VECTOR 0                  // lower EL, AArch64: sync
    GUEST_VECTOR 1                  // irq
    GUEST_VECTOR 2                  // fiq
    GUEST_VECTOR 3                  // serror
    GUEST_VECTOR 0                  // lower EL, AArch32: sync
    GUEST_VECTOR 1                  // irq
    GUEST_VECTOR 2                  // fiq
    GUEST_VECTOR 3                  // serror

twostage_el2_trap:
    stp     x2, x3, [sp, #16]
    stp     x4, x5, [sp, #32]
    stp     x6, x7, [sp, #48]
    stp     x8, x9, [sp, #64]
    stp     x10, x11, [sp, #80]
    stp     x12, x13, [sp, #96]
    stp     x14, x15, [sp, #112]
    stp     x16, x17, [sp, #128]
    stp     x18, x19, [sp, #144]
    stp     x20, x21, [sp, #160]
    stp     x22, x23, [sp, #176]
    stp     x24, x25, [sp, #192]
    stp     x26, x27, [sp, #208]
    stp     x28, x29, [sp, #224]
    add     x2, sp, #{frame_size}
    stp     x30, x2, [sp, #{frame_x30}]
    mrs     x2, elr_el2
    mrs     x3, spsr_el2
    stp     x2, x3, [sp, #{frame_elr}]
    mrs     x2, esr_el2
    mrs     x3, far_el2
    stp     x2, x3, [sp, #{frame_esr}]
    mov     x0, sp
    bl      twostage_el2_exception
    ldp     x2, x3, [sp, #{frame_elr}]
    msr     elr_el2, x2
    msr     spsr_el2, x3
    ldp     x0, x1, [sp]
    ldp     x2, x3, [sp, #16]
    ldp     x4, x5, [sp, #32]
    ldp     x6, x7, [sp, #48]
    ldp     x8, x9, [sp, #64]
    ldp     x10, x11, [sp, #80]
    ldp     x12, x13, [sp, #96]
    ldp     x14, x15, [sp, #112]
    ldp     x16, x17, [sp, #128]
    ldp     x18, x19, [sp, #144]
    ldp     x20, x21, [sp, #160]
    ldp     x22, x23, [sp, #176]
    ldp     x24, x25, [sp, #192]
    ldp     x26, x27, [sp, #208]
    ldp     x28, x29, [sp, #224]
    ldr     x30, [sp, #{frame_x30}]
    add     sp, sp, #{frame_size}
    eret
    dsb     nsh                     // no speculation past ERET
    isb

// twostage_enter_guest(regs: *mut GuestRegs /* x0 */, exit: *mut RawExit /* x1 */)
.global twostage_enter_guest
twostage_enter_guest:
    sub     sp, sp, #{host_frame}
    stp     x19, x20, [sp, #0]
    stp     x21, x22, [sp, #16]
    stp     x23, x24, [sp, #32]
    stp     x25, x26, [sp, #48]
    stp     x27, x28, [sp, #64]
    stp     x29, x30, [sp, #80]
    stp     x0, x1, [sp, #96]
    stp     d8, d9, [sp, #112]
    stp     d10, d11, [sp, #128]
    stp     d12, d13, [sp, #144]
    stp     d14, d15, [sp, #160]
    mrs     x2, fpcr
    str     x2, [sp, #176]

    add     x2, x0, #{guest_fp}
    ldp     q0, q1, [x2, #0]
    ldp     q2, q3, [x2, #32]
    ldp     q4, q5, [x2, #64]
    ldp     q6, q7, [x2, #96]
    ldp     q8, q9, [x2, #128]
    ldp     q10, q11, [x2, #160]
    ldp     q12, q13, [x2, #192]
    ldp     q14, q15, [x2, #224]
    ldp     q16, q17, [x2, #256]
    ldp     q18, q19, [x2, #288]
    ldp     q20, q21, [x2, #320]
    ldp     q22, q23, [x2, #352]
    ldp     q24, q25, [x2, #384]
    ldp     q26, q27, [x2, #416]
    ldp     q28, q29, [x2, #448]
    ldp     q30, q31, [x2, #480]
    add     x2, x2, #{fp_fpsr}
    ldp     x3, x4, [x2]
    msr     fpsr, x3
    msr     fpcr, x4

    ldp     x2, x3, [x0, #{guest_pc}]
    msr     elr_el2, x2
    msr     spsr_el2, x3
    ldp     x2, x3, [x0, #16]
    ldp     x4, x5, [x0, #32]
    ldp     x6, x7, [x0, #48]
    ldp     x8, x9, [x0, #64]
    ldp     x10, x11, [x0, #80]
    ldp     x12, x13, [x0, #96]
    ldp     x14, x15, [x0, #112]
    ldp     x16, x17, [x0, #128]
    ldp     x18, x19, [x0, #144]
    ldp     x20, x21, [x0, #160]
    ldp     x22, x23, [x0, #176]
    ldp     x24, x25, [x0, #192]
    ldp     x26, x27, [x0, #208]
    ldp     x28, x29, [x0, #224]
    ldr     x30, [x0, #240]
    ldp     x0, x1, [x0]
    eret
    dsb     nsh                     // no speculation past ERET
    isb

// Reached from GUEST_VECTOR with the guest's x0/x1 pushed on the hypervisor stack (the
// stack twostage_enter_guest ran on) and x1 = exit kind.
twostage_guest_exit:
    // Branch-history hardening before the first indirect branch or return at EL2
    // (Spectre-BHB, docs/cpu-state.md): TWOSTAGE_BHB_LOOP taken branches overwrite the
    // history the guest left, then DSB NSH; ISB. 0 = the CPU needs none.
    adrp    x0, TWOSTAGE_BHB_LOOP
    ldr     w0, [x0, :lo12:TWOSTAGE_BHB_LOOP]
    cbz     w0, 83f
81: b       82f
82: subs    w0, w0, #1
    b.ne    81b
    dsb     nsh
    isb
83: ldr     x0, [sp, #(16 + 96)]    // GuestRegs pointer from the host frame
    stp     x2, x3, [x0, #16]
    stp     x4, x5, [x0, #32]
    stp     x6, x7, [x0, #48]
    stp     x8, x9, [x0, #64]
    stp     x10, x11, [x0, #80]
    stp     x12, x13, [x0, #96]
    stp     x14, x15, [x0, #112]
    stp     x16, x17, [x0, #128]
    stp     x18, x19, [x0, #144]
    stp     x20, x21, [x0, #160]
    stp     x22, x23, [x0, #176]
    stp     x24, x25, [x0, #192]
    stp     x26, x27, [x0, #208]
    stp     x28, x29, [x0, #224]
    str     x30, [x0, #240]
    ldp     x2, x3, [sp], #16       // the guest's x0 and x1
    stp     x2, x3, [x0]
    mrs     x2, elr_el2
    mrs     x3, spsr_el2
    stp     x2, x3, [x0, #{guest_pc}]

    add     x2, x0, #{guest_fp}
    stp     q0, q1, [x2, #0]
    stp     q2, q3, [x2, #32]
    stp     q4, q5, [x2, #64]
    stp     q6, q7, [x2, #96]
    stp     q8, q9, [x2, #128]
    stp     q10, q11, [x2, #160]
    stp     q12, q13, [x2, #192]
    stp     q14, q15, [x2, #224]
    stp     q16, q17, [x2, #256]
    stp     q18, q19, [x2, #288]
    stp     q20, q21, [x2, #320]
    stp     q22, q23, [x2, #352]
    stp     q24, q25, [x2, #384]
    stp     q26, q27, [x2, #416]
    stp     q28, q29, [x2, #448]
    stp     q30, q31, [x2, #480]
    mrs     x3, fpsr
    mrs     x4, fpcr
    add     x2, x2, #{fp_fpsr}
    stp     x3, x4, [x2]

    ldr     x2, [sp, #104]          // RawExit pointer
    mrs     x3, esr_el2
    mrs     x4, far_el2
    mrs     x5, hpfar_el2
    stp     x1, x3, [x2]
    stp     x4, x5, [x2, #16]

    ldr     x2, [sp, #176]
    msr     fpcr, x2
    ldp     d8, d9, [sp, #112]
    ldp     d10, d11, [sp, #128]
    ldp     d12, d13, [sp, #144]
    ldp     d14, d15, [sp, #160]
    ldp     x19, x20, [sp, #0]
    ldp     x21, x22, [sp, #16]
    ldp     x23, x24, [sp, #32]
    ldp     x25, x26, [sp, #48]
    ldp     x27, x28, [sp, #64]
    ldp     x29, x30, [sp, #80]
    add     sp, sp, #{host_frame}
    ret
"#,
    frame_size = const size_of::<ExceptionFrame>(),
    frame_x30 = const offset_of!(ExceptionFrame, x) + 30 * 8,
    frame_elr = const offset_of!(ExceptionFrame, elr),
    frame_esr = const offset_of!(ExceptionFrame, esr),
    host_frame = const HOST_FRAME,
    guest_pc = const offset_of!(GuestRegs, pc),
    guest_fp = const offset_of!(GuestRegs, fp),
    fp_fpsr = const offset_of!(FpRegs, fpsr),
);

// The pairs stored with one STP must be adjacent in the structures.
// Compile-time layout checks: an overflow here is a build error, not a run-time one.
#[allow(clippy::arithmetic_side_effects)]
const _: () = {
    assert!(offset_of!(ExceptionFrame, sp) == offset_of!(ExceptionFrame, x) + 31 * 8);
    assert!(offset_of!(ExceptionFrame, spsr) == offset_of!(ExceptionFrame, elr) + 8);
    assert!(offset_of!(ExceptionFrame, far) == offset_of!(ExceptionFrame, esr) + 8);
    assert!(size_of::<ExceptionFrame>() % 16 == 0);
    assert!(offset_of!(GuestRegs, pstate) == offset_of!(GuestRegs, pc) + 8);
    assert!(offset_of!(GuestRegs, x) == 0);
    assert!(offset_of!(FpRegs, fpcr) == offset_of!(FpRegs, fpsr) + 8);
    assert!(offset_of!(FpRegs, q) == 0);
    assert!(offset_of!(RawExit, esr) == 8);
    assert!(offset_of!(RawExit, far) == 16);
    assert!(offset_of!(RawExit, hpfar) == 24);
    assert!(HOST_FRAME % 16 == 0 && HOST_FRAME >= 184);
};

extern "C" {
    fn twostage_enter_guest(regs: *mut GuestRegs, exit: *mut RawExit);
    fn twostage_secondary_entry();
    static __text_start: u8;
    static __text_end: u8;
    static __rodata_end: u8;
    static __data_end: u8;
    static __image_end: u8;
}

/// Runs the vCPU described by `regs` at EL1 until it takes an exception to EL2, and
/// returns why it stopped. On return `regs` holds the guest's x0-x30, PC (`ELR_EL2`),
/// PSTATE (`SPSR_EL2`) and SIMD/FP registers at the time of the exit.
///
/// # Safety
///
/// The caller must have set up everything the guest runs with: `HCR_EL2` (with
/// `HCR_EL2.RW` so EL1 is AArch64), a valid stage 2 (`VTTBR_EL2`/`VTCR_EL2`) that maps
/// only the guest's memory, and the guest's EL1 system registers. `regs.pstate` must
/// describe EL1 or EL0 in AArch64 state. Interrupts must be masked at EL2 (they are,
/// in the hypervisor).
pub unsafe fn enter_guest(regs: &mut GuestRegs) -> Exit {
    let mut raw = RawExit::default();
    // SAFETY: the caller guarantees the guest context is set up; the assembly saves and
    // restores every callee-saved register (x19-x30, d8-d15, SP, FPCR) around the guest
    // run and only writes through the two pointers, which are valid for the call.
    unsafe { twostage_enter_guest(regs, &mut raw) };
    Exit::from_raw(&raw)
}

/// The physical address of the secondary-CPU entry point, for PSCI `CPU_ON` (the
/// context id must be the CPU index, below [`MAX_CPUS`]).
#[must_use]
pub fn secondary_entry_address() -> u64 {
    twostage_secondary_entry as *const () as u64
}

/// The section boundaries of the running image (identity mapped: VA = PA).
#[must_use]
pub fn image_layout() -> ImageLayout {
    // Only the addresses of the linker-script symbols are taken, never their contents.
    ImageLayout {
        text_start: &raw const __text_start as u64,
        text_end: &raw const __text_end as u64,
        rodata_end: &raw const __rodata_end as u64,
        data_end: &raw const __data_end as u64,
        image_end: &raw const __image_end as u64,
    }
}

/// The `[bottom, top)` address range of a CPU's stack, or `None` for an index at or above
/// [`MAX_CPUS`].
#[must_use]
pub fn stack_range(cpu: usize) -> Option<(u64, u64)> {
    if cpu >= MAX_CPUS {
        return None;
    }
    let base = TWOSTAGE_STACKS.0.get() as u64;
    // `cpu < MAX_CPUS`: inside the linked stack area, no overflow.
    let bottom = base.checked_add(u64::try_from(cpu.checked_mul(STACK_SIZE)?).ok()?)?;
    Some((bottom, bottom.checked_add(STACK_SIZE as u64)?))
}

/// Defines a data-cache maintenance function by VA to the point of coherency over
/// `[start, start + len)`: `DC <op>` on every line (the line size from `CTR_EL0.DminLine`),
/// then `DSB SY`.
macro_rules! dcache_by_va {
    ($(#[$doc:meta])* $name:ident, $op:literal) => {
        $(#[$doc])*
        pub fn $name(start: u64, len: u64) {
            let ctr: u64;
            // SAFETY: reading CTR_EL0 has no side effects.
            unsafe {
                asm!("mrs {}, ctr_el0", out(reg) ctr, options(nomem, nostack, preserves_flags))
            };
            // CTR_EL0.DminLine [19:16]: log2 of the line size in words, so `line` is a
            // power of two from 4 bytes to 128 KiB and the products below are small.
            let line = 4u64 << ((ctr >> 16) & 0xf);
            let mut addr = start & !line.wrapping_sub(1);
            let end = start.saturating_add(len);
            // Four lines per step while they fit (fewer loop iterations), then one at a time.
            while end.saturating_sub(addr) >= line.saturating_mul(4) {
                // SAFETY: the operation writes back (and may drop) a line without changing
                // memory contents; the four lines from `addr` start below `end`, in the
                // mapped memory the callers pass.
                unsafe {
                    asm!(
                        concat!("dc ", $op, ", {a}"),
                        "add {a}, {a}, {l}",
                        concat!("dc ", $op, ", {a}"),
                        "add {a}, {a}, {l}",
                        concat!("dc ", $op, ", {a}"),
                        "add {a}, {a}, {l}",
                        concat!("dc ", $op, ", {a}"),
                        "add {a}, {a}, {l}",
                        a = inout(reg) addr,
                        l = in(reg) line,
                        options(nostack, preserves_flags)
                    );
                }
            }
            while addr < end {
                // SAFETY: as above; it faults only for unmapped addresses, and the callers
                // pass mapped memory.
                unsafe {
                    asm!(concat!("dc ", $op, ", {}"), in(reg) addr, options(nostack, preserves_flags))
                };
                // Saturating: a range ending at the top of the address space ends the loop.
                addr = addr.saturating_add(line);
            }
            // SAFETY: a barrier has no memory-safety effects.
            unsafe { asm!("dsb sy", options(nostack, preserves_flags)) };
        }
    };
}

dcache_by_va!(
    /// Cleans the data cache to the point of coherency over `[start, start + len)`, so that
    /// a CPU running with its MMU off sees what this CPU wrote through the cache.
    clean_dcache_range,
    "cvac"
);

dcache_by_va!(
    /// Cleans and invalidates the data cache to the point of coherency over
    /// `[start, start + len)` (`DC CIVAC`): the data reaches memory and no line of the range
    /// stays in this CPU's caches.
    clean_invalidate_dcache_range,
    "civac"
);

/// Invalidates every instruction cache of the Inner Shareable domain to the point of
/// unification (`IC IALLUIS`), unless `CTR_EL0.DIC` (bit 29) says instruction caches need
/// no invalidation for coherence with data: after guest RAM was scrubbed or an image
/// copied in (and cleaned), no CPU may still fetch what that memory held before (the
/// data was cleaned to the point of coherency, which lies beyond the point of
/// unification; Arm ARM, "Cache maintenance instructions" and `CTR_EL0`).
pub fn invalidate_icache_after_write() {
    let ctr: u64;
    // SAFETY: reading CTR_EL0 has no side effects.
    unsafe { asm!("mrs {}, ctr_el0", out(reg) ctr, options(nomem, nostack, preserves_flags)) };
    if ctr & (1 << 29) != 0 {
        return;
    }
    // SAFETY: invalidating instruction caches changes no data; the barriers complete it
    // before anything that follows.
    unsafe {
        asm!(
            "dsb ish",
            "ic ialluis",
            "dsb ish",
            "isb",
            options(nostack, preserves_flags)
        );
    }
}

/// Makes `[start, start + len)` all zero, writing only the 128-byte blocks that are not
/// zero already, then cleans the range to the point of coherency (guest RAM scrubbing:
/// the guest first reads it with its MMU off).
///
/// The end state is that of a plain zeroing; reading first pays off under QEMU, where RAM
/// nobody wrote since power-on reads as zero without the host allocating it, so a first
/// scrub of fresh guest RAM writes (and makes QEMU allocate) nothing. Zeroing every block
/// with `DC ZVA` instead was measured slower and far more variable there, as it makes the
/// host allocate the whole range. The check uses general-purpose registers: QEMU's TCG
/// runs it markedly faster than the same check through vector registers.
///
/// The range is cleaned and invalidated first, so that the check reads memory: a guest
/// that wrote with its MMU off (around the cache) may have left a stale clean copy of a
/// line in the cache, and a check that read zero there would leave the guest's data in
/// memory, where the next guest with its MMU off would read it.
///
/// # Safety
///
/// The range must be normal memory, mapped writable, that nothing else uses meanwhile;
/// `start` must be 16-byte aligned.
pub unsafe fn zero_and_clean(start: u64, len: u64) {
    clean_invalidate_dcache_range(start, len);
    let bulk = len & !127;
    if bulk > 0 {
        // SAFETY: every access is inside `[start, start + bulk)`, which the caller owns;
        // the temporaries are declared clobbered.
        unsafe {
            asm!(
                "2:",
                "ldp {a}, {b}, [{p}]",
                "ldp {c}, {d}, [{p}, #16]",
                "orr {a}, {a}, {b}",
                "orr {c}, {c}, {d}",
                "ldp {b}, {d}, [{p}, #32]",
                "orr {a}, {a}, {c}",
                "orr {b}, {b}, {d}",
                "ldp {c}, {d}, [{p}, #48]",
                "orr {a}, {a}, {b}",
                "orr {c}, {c}, {d}",
                "ldp {b}, {d}, [{p}, #64]",
                "orr {a}, {a}, {c}",
                "orr {b}, {b}, {d}",
                "ldp {c}, {d}, [{p}, #80]",
                "orr {a}, {a}, {b}",
                "orr {c}, {c}, {d}",
                "ldp {b}, {d}, [{p}, #96]",
                "orr {a}, {a}, {c}",
                "orr {b}, {b}, {d}",
                "ldp {c}, {d}, [{p}, #112]",
                "orr {a}, {a}, {b}",
                "orr {c}, {c}, {d}",
                "orr {a}, {a}, {c}",
                "cbz {a}, 3f",
                "stp xzr, xzr, [{p}]",
                "stp xzr, xzr, [{p}, #16]",
                "stp xzr, xzr, [{p}, #32]",
                "stp xzr, xzr, [{p}, #48]",
                "stp xzr, xzr, [{p}, #64]",
                "stp xzr, xzr, [{p}, #80]",
                "stp xzr, xzr, [{p}, #96]",
                "stp xzr, xzr, [{p}, #112]",
                "3:",
                "add {p}, {p}, #128",
                "cmp {p}, {end}",
                "b.lo 2b",
                p = inout(reg) start => _,
                // The caller's range does not wrap (it is mapped memory).
                end = in(reg) start.wrapping_add(bulk),
                a = out(reg) _,
                b = out(reg) _,
                c = out(reg) _,
                d = out(reg) _,
                options(nostack)
            );
        }
    }
    // SAFETY: the tail lies in the caller's range.
    unsafe { core::ptr::write_bytes(start.wrapping_add(bulk) as *mut u8, 0, (len & 127) as usize) };
    clean_dcache_range(start, len);
}

/// Makes `[start, start + len)` all zero with `DC ZVA` a block at a time (plain stores
/// for a part of a block at either end, or everywhere if `DCZID_EL0.DZP` prohibits it),
/// then cleans the range to the point of coherency (the guest first reads it with its
/// MMU off). For RAM about to be used: it writes every byte, where [`zero_and_clean`]
/// reads first. `DC ZVA` zeroes the line in the cache or in memory, so a stale copy of a
/// line left by a guest that wrote around the cache cannot survive it, and the clean
/// then puts the zeros in memory (Arm ARM C5.3, "DC ZVA"; D7.5.1 `DCZID_EL0`); the lines
/// the plain stores touch are cleaned and invalidated first, for the same reason.
///
/// # Safety
///
/// The range must be Normal memory, mapped writable, that nothing else uses meanwhile.
pub unsafe fn zero_blocks_and_clean(start: u64, len: u64) {
    let dczid: u64;
    // SAFETY: reading an ID register has no side effects.
    unsafe { asm!("mrs {}, dczid_el0", out(reg) dczid, options(nomem, nostack, preserves_flags)) };
    // DCZID_EL0.BS, bits [3:0]: log2 of the block size in words (at most 9: 2 KiB);
    // DZP, bit 4: DC ZVA is prohibited.
    let block = 4u64 << (dczid & 0xf).min(9);
    let mask = block.wrapping_sub(1);
    // The caller's range is mapped memory: `start + len` does not wrap, and neither do
    // the block boundaries inside it (`first <= last` is checked before any use).
    let end = start.wrapping_add(len);
    let first = start.wrapping_add(mask) & !mask;
    let last = end & !mask;
    let zero = |from: u64, to: u64| {
        // SAFETY: the callers below pass parts of the caller's range.
        unsafe { core::ptr::write_bytes(from as *mut u8, 0, to.wrapping_sub(from) as usize) };
    };
    // Bytes written with plain stores may share a line with bytes outside the range: a
    // stale clean copy of such a line (a guest that wrote around the cache) must not be
    // written back over memory by the final clean, so those lines go first.
    let ragged = |from: u64, to: u64| {
        if to > from {
            clean_invalidate_dcache_range(from, to.wrapping_sub(from));
        }
    };
    if dczid & (1 << 4) != 0 || first < start || first >= last {
        ragged(start, end);
        zero(start, end);
    } else {
        ragged(start, first);
        ragged(last, end);
        zero(start, first);
        let mut at = first;
        while at < last {
            // SAFETY: the whole block at `at` lies in the caller's range.
            unsafe { asm!("dc zva, {}", in(reg) at, options(nostack, preserves_flags)) };
            at = at.wrapping_add(block);
        }
        zero(last, end);
    }
    clean_dcache_range(start, len);
}

/// Sets the allocation tags of every 16-byte granule that `[start, start + len)` touches to
/// 0 (FEAT_MTE2): `STG` granule by granule up to a block boundary, then `STGM` a block
/// at a time (`GMID_EL1.BS`: 16 to 256 bytes of tags per instruction), then `STG` for
/// the rest (Arm ARM D10, "Memory Tagging Extension"; C6 `STG`, `STGM`). The data is not
/// touched. `STG` takes the tag from its source register's bits \[59:56\]: the granule's
/// own untagged address, tag 0; `STGM` from `XZR`, all zero.
///
/// The tags are written through the cache, like the data of [`zero_and_clean`]; a guest
/// reads tags only through cacheable Tagged mappings, which are coherent with it.
///
/// # Safety
///
/// The CPU must have FEAT_MTE2, `SCTLR_EL2.ATA` must be set (otherwise the tag stores
/// do nothing), and the range must be mapped writable as Tagged Normal memory (`MAIR`
/// attribute `0xF0`; on any other memory the tag stores are ignored), with nothing else
/// using its tags meanwhile.
#[target_feature(enable = "mte")]
pub unsafe fn clear_tags(start: u64, len: u64) {
    const GRANULE: u64 = 16;
    let gmid: u64;
    // SAFETY: reading an ID register has no side effects (FEAT_MTE2: the caller's).
    unsafe { asm!("mrs {}, gmid_el1", out(reg) gmid, options(nomem, nostack, preserves_flags)) };
    // GMID_EL1.BS, bits [3:0]: log2 of the block size in words, 2 (16 bytes) to 6.
    let block = 4u64 << (gmid & 0xf).clamp(2, 6);
    let mut at = start & !(GRANULE - 1);
    let end = start.saturating_add(len).saturating_add(GRANULE - 1) & !(GRANULE - 1);
    // `block` is a power of two; `at < end` wherever `end - at` is taken, and `end` is at
    // most the last granule below 2^64, so the steps neither wrap nor saturate early.
    let misaligned = |at: u64| at & block.wrapping_sub(1) != 0;
    while at < end && (misaligned(at) || end.saturating_sub(at) < block) {
        // SAFETY: a tag store to a granule of the caller's range; no data changes.
        unsafe { asm!("stg {a}, [{a}]", a = in(reg) at, options(nostack, preserves_flags)) };
        at = at.saturating_add(GRANULE);
    }
    while end.saturating_sub(at) >= block {
        // SAFETY: as above, for the aligned block at `at`, inside the range.
        unsafe { asm!("stgm xzr, [{a}]", a = in(reg) at, options(nostack, preserves_flags)) };
        at = at.saturating_add(block);
    }
    while at < end {
        // SAFETY: as above.
        unsafe { asm!("stg {a}, [{a}]", a = in(reg) at, options(nostack, preserves_flags)) };
        at = at.saturating_add(GRANULE);
    }
}

/// Copies `len` bytes from `src` to `dst` and cleans the destination to the point of
/// coherency (images copied into a guest that starts with its MMU off). 64 bytes per step
/// with paired 128-bit loads and stores; the tail with an ordinary copy.
///
/// # Safety
///
/// Both ranges must be normal memory, mapped (the destination writable), not overlapping,
/// and unused by anything else meanwhile.
pub unsafe fn copy_and_clean(dst: u64, src: u64, len: u64) {
    let bulk = len & !63;
    // Offsets into the caller's ranges, which are mapped memory: the sums do not wrap.
    let mut off = 0u64;
    while off < bulk {
        // SAFETY: `[src + off, +64)` and `[dst + off, +64)` lie in the caller's ranges;
        // v0-v3 are declared clobbered.
        unsafe {
            asm!(
                "ldp q0, q1, [{s}]",
                "ldp q2, q3, [{s}, #32]",
                "stp q0, q1, [{d}]",
                "stp q2, q3, [{d}, #32]",
                s = in(reg) src.wrapping_add(off),
                d = in(reg) dst.wrapping_add(off),
                out("v0") _, out("v1") _, out("v2") _, out("v3") _,
                options(nostack, preserves_flags)
            );
        }
        off = off.wrapping_add(64);
    }
    // SAFETY: the tail lies in the caller's ranges, which do not overlap.
    unsafe {
        core::ptr::copy_nonoverlapping(
            src.wrapping_add(bulk) as *const u8,
            dst.wrapping_add(bulk) as *mut u8,
            (len & 63) as usize,
        );
    }
    clean_dcache_range(dst, len);
}

/// Makes `cfg` the MMU configuration that secondary CPUs load in their entry code, and
/// cleans it to the point of coherency (they read it with the MMU off).
///
/// # Safety
///
/// Must not race with a secondary CPU that is starting up; `cfg` must describe tables
/// that map the secondary entry path, the stacks and the data it uses, identity mapped.
pub unsafe fn publish_secondary_mmu(cfg: &MmuConfig) {
    let slot = TWOSTAGE_SECONDARY_MMU.0.get();
    // SAFETY: the caller guarantees nobody reads the slot concurrently.
    unsafe { slot.write_volatile(*cfg) };
    clean_dcache_range(slot as u64, size_of::<MmuConfig>() as u64);
}

/// Loads the EL2 translation registers and turns the MMU and caches on.
///
/// # Safety
///
/// The tables at `cfg.ttbr0` must identity-map the code executing this function, the
/// current stack and all memory used afterwards, with attributes matching `cfg.mair`.
pub unsafe fn enable_mmu(cfg: &MmuConfig) {
    // SAFETY: the caller guarantees the tables are valid. The sequence follows DDI 0487
    // D8 ("Enabling the MMU"): program the registers, ISB so they are visible to the walk,
    // invalidate stale EL2 TLB entries and the I-cache, then set SCTLR_EL2 and ISB.
    unsafe {
        asm!(
            "msr mair_el2, {mair}",
            "msr tcr_el2, {tcr}",
            "msr ttbr0_el2, {ttbr0}",
            "isb",
            "tlbi alle2",
            "dsb nsh",
            "ic iallu",
            "dsb nsh",
            "isb",
            "msr sctlr_el2, {sctlr}",
            "isb",
            mair = in(reg) cfg.mair,
            tcr = in(reg) cfg.tcr,
            ttbr0 = in(reg) cfg.ttbr0,
            sctlr = in(reg) cfg.sctlr,
            options(nostack, preserves_flags),
        );
    }
}

/// Writes a NUL-terminated message to the semihosting console (SYS_WRITE0).
///
/// Semihosting must be enabled (QEMU `-semihosting`); otherwise the `HLT` is an undefined
/// instruction.
pub fn semihosting_write0(msg: &core::ffi::CStr) {
    // SAFETY: SYS_WRITE0 only reads the NUL-terminated string x1 points to.
    unsafe {
        asm!("hlt #0xf000", inout("x0") 0x04u64 => _, in("x1") msg.as_ptr(), options(nostack, readonly));
    }
}

/// Ends the QEMU run with exit status `code` through semihosting SYS_EXIT
/// (ADP_Stopped_ApplicationExit with a subcode, AArch64 form), then halts the CPU if the
/// call returns (semihosting not enabled).
pub fn semihosting_exit(code: u32) -> ! {
    let block: [u64; 2] = [0x20026, u64::from(code)];
    // SAFETY: SYS_EXIT only reads the two-word parameter block x1 points to.
    unsafe {
        asm!("hlt #0xf000", inout("x0") 0x18u64 => _, in("x1") block.as_ptr(), options(nostack, readonly));
    }
    loop {
        // SAFETY: masking interrupts and waiting has no memory effects.
        unsafe { asm!("msr daifset, #0xf", "wfe", options(nomem, nostack)) };
    }
}

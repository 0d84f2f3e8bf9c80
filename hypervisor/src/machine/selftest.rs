//! Boot-time self-test of the guest entry/exit path (`boot::enter_guest`), built only
//! with the `selftest-guest-entry` feature: runs a tiny EL1 program with stage 2 off and
//! checks that registers, PC, PSTATE and SIMD state survive the world switches and that
//! HVC and trapped SMC exits decode as expected; then that both ways of scrubbing guest
//! RAM (`boot::zero_blocks_and_clean`, `boot::zero_and_clean`) zero exactly their range,
//! whatever its alignment.

use core::arch::global_asm;
use core::num::NonZeroU128;

use aarch64_cpu::registers::{
    Readable, Writeable, CNTFRQ_EL0, CNTPCT_EL0, CPACR_EL1, HCR_EL2, SCTLR_EL1,
};
use boot::esr::Syndrome;
use boot::{enter_guest, Exit, GuestRegs};
use log::info;

use crate::machine::fatal;

// The EL1 program (MMU off at EL1, stage 2 off: it runs on physical addresses).
global_asm!(
    r#"
.section .text, "ax"
.balign 4
.global twostage_selftest_guest
twostage_selftest_guest:
    add     x2, x0, x1              // x2 = x0 + x1
    fmov    d0, x2                  // SIMD state the hypervisor must preserve
    hvc     #0x4711                 // exit 1: HVC, returns to the next instruction
    add     x5, x4, #1              // x4 was set by the hypervisor during exit 1
    fmov    x6, d0
    fmov    x7, d1                  // q1 was loaded by the hypervisor before entry
.global twostage_selftest_guest_smc
twostage_selftest_guest_smc:
    smc     #0x22                   // exit 2: trapped SMC (HCR_EL2.TSC), ELR = this SMC
.global twostage_selftest_guest_loop
twostage_selftest_guest_loop:
    hvc     #0x1                    // exits 3..: round trips
    b       twostage_selftest_guest_loop
"#
);

extern "C" {
    fn twostage_selftest_guest();
    fn twostage_selftest_guest_smc();
    fn twostage_selftest_guest_loop();
}

const ROUND_TRIPS: u64 = 1000;

fn expect(cond: bool, what: &str, regs: &GuestRegs, exit: &Exit) {
    if !cond {
        fatal(format_args!(
            "guest entry self-test: {what}: exit {exit:?}, regs {regs:x?}"
        ));
    }
}

/// Runs the self-test on the calling CPU; stops the machine on any mismatch.
pub fn run() {
    // EL1 AArch64, trap SMC; no stage 2. EL1 MMU off, SIMD/FP not trapped at EL1
    // (CPACR_EL1.FPEN = 0b11).
    HCR_EL2.write(HCR_EL2::RW::EL1IsAarch64 + HCR_EL2::TSC::EnableTrapEl1SmcToEl2);
    SCTLR_EL1.set(0x30d0_0800);
    CPACR_EL1.write(CPACR_EL1::FPEN::TrapNothing);

    let entry = twostage_selftest_guest as *const () as u64;
    let mut regs = GuestRegs::new(entry, 0x1111);
    regs.x[1] = 0x2222;
    regs.x[30] = 0x3030;
    regs.fp.q[1] = (0xfeed_u128 << 64) | 0x5151;

    // SAFETY: HCR_EL2 runs the guest at EL1 without stage 2 on this CPU's physical
    // memory; the program above touches no memory and only traps back with HVC/SMC.
    let exit = unsafe { enter_guest(&mut regs) };
    let hvc =
        matches!(exit, Exit::Sync { esr, .. } if esr.decode() == Syndrome::Hvc64 { imm: 0x4711 });
    expect(hvc, "first exit is not HVC #0x4711", &regs, &exit);
    expect(
        regs.pc == entry.wrapping_add(12),
        "HVC exit PC is not the next instruction",
        &regs,
        &exit,
    );
    expect(
        regs.x[2] == 0x3333 && regs.x[30] == 0x3030,
        "general registers",
        &regs,
        &exit,
    );
    expect(
        regs.fp.q[0] as u64 == 0x3333,
        "SIMD register d0 not saved",
        &regs,
        &exit,
    );
    expect(
        regs.pstate & 0xf == 0b0101,
        "PSTATE is not EL1h",
        &regs,
        &exit,
    );

    regs.x[4] = 0x99;
    // SAFETY: as above; the guest continues after its HVC.
    let exit = unsafe { enter_guest(&mut regs) };
    let smc =
        matches!(exit, Exit::Sync { esr, .. } if esr.decode() == Syndrome::Smc64 { imm: 0x22 });
    expect(smc, "second exit is not a trapped SMC #0x22", &regs, &exit);
    let smc_pc = twostage_selftest_guest_smc as *const () as u64;
    expect(
        regs.pc == smc_pc,
        "trapped SMC PC is not the SMC itself",
        &regs,
        &exit,
    );
    expect(
        regs.x[5] == 0x9a,
        "register written between exits not seen",
        &regs,
        &exit,
    );
    expect(
        regs.x[6] == 0x3333 && regs.x[7] == 0x5151,
        "SIMD state not restored",
        &regs,
        &exit,
    );
    expect(
        regs.fp.q[1] == (0xfeed_u128 << 64) | 0x5151,
        "q1 upper half lost",
        &regs,
        &exit,
    );

    regs.pc = twostage_selftest_guest_loop as *const () as u64;
    let start = CNTPCT_EL0.get();
    for _ in 0..ROUND_TRIPS {
        // SAFETY: as above; the loop only issues HVCs.
        let exit = unsafe { enter_guest(&mut regs) };
        let ok =
            matches!(exit, Exit::Sync { esr, .. } if esr.decode() == Syndrome::Hvc64 { imm: 1 });
        expect(ok, "loop exit is not HVC #1", &regs, &exit);
    }
    // The counter counts up; a frequency of 0 counts as 1 Hz.
    let ticks = CNTPCT_EL0.get().wrapping_sub(start);
    let freq = NonZeroU128::new(u128::from(CNTFRQ_EL0.get())).unwrap_or(NonZeroU128::MIN);
    let ns = (u128::from(ticks).saturating_mul(1_000_000_000) / freq)
        .checked_div(u128::from(ROUND_TRIPS))
        .unwrap_or(0);
    info!("guest entry self-test: HVC and SMC exits, registers, PC, PSTATE and SIMD state: ok");
    info!("guest entry self-test: {ROUND_TRIPS} HVC round trips, {ns} ns each");
    super::regs::leave_guest_context();
    check_zeroing();
}

/// Zeroes ranges of a heap buffer (Normal memory, like guest RAM through the window)
/// with both scrub primitives, starting and ending inside and on `DC ZVA` blocks, and
/// checks every byte: zero inside the range, untouched outside.
fn check_zeroing() {
    const FILL: u8 = 0xa5;
    #[repr(C, align(4096))]
    struct Page([u8; 4096]);
    let mut page = alloc::boxed::Box::new(Page([FILL; 4096]));
    let base = page.0.as_mut_ptr() as u64;
    type Scrub = unsafe fn(u64, u64);
    let scrubs: [(Scrub, &str); 2] = [
        (boot::zero_blocks_and_clean, "DC ZVA"),
        (boot::zero_and_clean, "checked"),
    ];
    // [start, end) offsets: whole blocks, a part of one block, ragged ends around
    // several, and nothing at all. The checked scrub needs a 16-byte aligned start.
    for (zero, name) in scrubs {
        for (start, end) in [
            (0u64, 1024u64),
            (16, 48),
            (48, 2048),
            (1024, 4096),
            (2064, 3064),
            (512, 512),
            (2000, 2000),
        ] {
            page.0.fill(FILL);
            // SAFETY: `[base + start, base + end)` lies inside `page`, which nothing else
            // uses; the heap is Normal write-back memory, mapped writable.
            unsafe { zero(base.wrapping_add(start), end.wrapping_sub(start)) };
            let bad = page
                .0
                .iter()
                .zip(0u64..)
                .position(|(&b, i)| b != if (start..end).contains(&i) { 0 } else { FILL });
            if let Some(i) = bad {
                fatal(format_args!(
                    "scrub self-test: {name} zeroing of [{start}, {end}) left byte {i} wrong"
                ));
            }
        }
    }
    info!("scrub self-test: DC ZVA and checked zeroing clear exactly their ranges: ok");
}

//! The PMU as a guest sees it: its own cycles are counted, the hypervisor's never are
//! (`docs/cpu-state.md`). The guest programs the cycle counter and event counter 0
//! (`CPU_CYCLES`) with filters for EL1/EL0, EL1/EL0 + EL2, and EL2 only
//! (`PMCCFILTR_EL0` / `PMEVTYPER0_EL0`: P \[31\] no EL1, U \[30\] no EL0, NSH \[27\]
//! count EL2; Arm ARM D19.5), and measures 1000 hypercalls with each.

use core::arch::asm;

use core::fmt::Write;

use super::{check, hvc, Uart, VM_INFO};

const CALLS: u64 = 1000;
const P: u64 = 1 << 31;
const U: u64 = 1 << 30;
const NSH: u64 = 1 << 27;
const CPU_CYCLES: u64 = 0x11;

/// PMCR_EL0: E \[0\] enable, P \[1\] reset event counters, C \[2\] reset the cycle counter,
/// LC \[6\] 64-bit cycle counter.
const PMCR_RUN: u64 = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 6);

fn pmcr() -> u64 {
    let v: u64;
    // SAFETY: a PMU register read at EL1 (trapped and emulated where the PMU is hidden).
    unsafe { asm!("mrs {}, pmcr_el0", out(reg) v, options(nomem, nostack)) };
    v
}

/// Counts cycles with the cycle counter and event counter 0 over [`CALLS`] hypercalls,
/// both filtered by `filter`; returns (cycle counter, event counter 0).
fn measure(filter: u64) -> (u64, u64) {
    let (ccnt, evcnt): (u64, u64);
    // SAFETY: the PMU is the guest's (or emulated): these only program and read it.
    unsafe {
        asm!(
            "msr pmcntenclr_el0, {all}",
            "msr pmccfiltr_el0, {filter}",
            "msr pmselr_el0, xzr",
            "msr pmxevtyper_el0, {evfilter}",
            "msr pmcr_el0, {run}",
            "isb",
            "msr pmcntenset_el0, {enable}",
            "isb",
            all = in(reg) u64::MAX,
            filter = in(reg) filter,
            evfilter = in(reg) filter | CPU_CYCLES,
            run = in(reg) PMCR_RUN,
            enable = in(reg) (1u64 << 31) | 1,
            options(nostack),
        );
    }
    for _ in 0..CALLS {
        core::hint::black_box(hvc(VM_INFO, &[]));
    }
    // SAFETY: as above.
    unsafe {
        asm!(
            "isb",
            "msr pmcntenclr_el0, {all}",
            "isb",
            "mrs {c}, pmccntr_el0",
            "msr pmselr_el0, xzr",
            "isb",
            "mrs {e}, pmxevcntr_el0",
            all = in(reg) u64::MAX,
            c = out(reg) ccnt,
            e = out(reg) evcnt,
            options(nostack),
        );
    }
    (ccnt, evcnt)
}

pub fn pmu_check() {
    let dfr0: u64;
    // SAFETY: reading an ID register at EL1 has no side effects.
    unsafe { asm!("mrs {}, id_aa64dfr0_el1", out(reg) dfr0, options(nomem, nostack)) };
    let version = (dfr0 >> 8) & 0xf;
    let counters = (pmcr() >> 11) & 0x1f;
    // QEMU's TCG derives the cycle counter from its virtual clock (host time at 1 GHz),
    // so a count varies with the load of the host: the smallest of a few runs is kept.
    // (EL2's share of a hypercall is large: if it were counted, EL1+EL2 would be several
    // times EL1 alone.)
    let (mut el1, mut both) = ((u64::MAX, u64::MAX), (u64::MAX, u64::MAX));
    for _ in 0..5 {
        let a = measure(0);
        let b = measure(NSH);
        el1 = (el1.0.min(a.0), el1.1.min(a.1));
        both = (both.0.min(b.0), both.1.min(b.1));
    }
    let el2 = measure(P | U | NSH);
    println!("pmu version={version} counters={counters} el1={el1:?} el1+el2={both:?} el2={el2:?}");
    check(
        "pmu-no-el2-cycles",
        el2 == (0, 0),
        format_args!("EL2-only counts {el2:?}"),
    );
    if counters == 0 {
        // The PMU is not given to the guest (PMUv3 without EL2 filtering): all zero.
        check(
            "pmu-hidden-reads-zero",
            el1 == (0, 0) && both == (0, 0),
            format_args!("{el1:?} {both:?}"),
        );
    } else {
        check(
            "pmu-guest-cycles-counted",
            el1.0 > 0 && el1.1 > 0,
            format_args!("EL1 counts {el1:?}"),
        );
        check(
            "pmu-nsh-adds-no-el2-cycles",
            both.0 < 2 * el1.0 && both.1 < 2 * el1.1,
            format_args!("EL1 {el1:?}, EL1+EL2 {both:?}"),
        );
    }
}

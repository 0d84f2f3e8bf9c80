//! The interrupt-latency measurement (`arg` bit 14): the same code on bare QEMU and in a
//! VM, so that the two can be compared.
//!
//! It uses only what both settings have at the same addresses: the PL011 at
//! `0x0900_0000` (`super::UART`), a GICv3 with the distributor at `0x0800_0000` and one
//! redistributor per CPU from `0x080A_0000` (constants matching QEMU `virt`,
//! `super::irq::GICD`/`GICR`; the device tree is not read), the GIC CPU interface system
//! registers, the EL1 virtual timer (`CNTV_*`, PPI 27) and PSCI `CPU_ON` and
//! `SYSTEM_OFF` through `HVC`. On bare QEMU (`virtualization=off`) QEMU answers PSCI
//! itself and the GIC is QEMU's model; in a VM the hypervisor answers PSCI and emulates
//! the GIC. No hypervisor call is made.
//!
//! How it gets here: the hypervisor enters the raw image at its first byte (`_start`) with
//! x0 = the VM description's `arg`; QEMU's ELF loader enters `out/test-guest.elf` at its
//! ELF entry point, `bare_start`, which sets x0 = [`crate::arg::ARG_LATENCY`] and
//! continues at `_start` (`linker/test-guest.ld`).
//!
//! Every time is read from the virtual counter (`CNTVCT_EL0`) and printed in
//! nanoseconds, with `CNTFRQ_EL0`, as `key=value` pairs on two lines (the
//! hypervisor's console passes guest lines of up to 160 bytes whole; a reader takes the
//! pairs of every `latency:` line):
//!
//! ```text
//! latency: cntfrq=62500000 timer=M/A/N timer-wfi=M/A/N ipi-wfi=M/A/N ipi-spin=M/A/N
//! latency: sgi-self=M/A/N gicd=M/A/N
//! ```
//!
//! where `M/A/N` are the median, mean and minimum over the samples:
//! - `timer`: [`SAMPLES`] virtual timer interrupts, each due [`TIMER_DELAY_US`] after it
//!   is set (`CNTV_CVAL_EL0` = now + delay); latency = counter at handler entry -
//!   `CNTV_CVAL_EL0`, with vCPU 0 spinning (IRQs unmasked);
//! - `timer-wfi`: the same with vCPU 0 waiting in WFI (IRQs masked across the WFI, unmasked
//!   after it, so no wake-up is lost);
//! - `ipi-wfi`: [`SAMPLES`] SGIs from vCPU 0 to vCPU 1 by target list, latency = counter
//!   at vCPU 1's handler entry - counter read by vCPU 0 just before its `ICC_SGI1R_EL1`
//!   write, with vCPU 1 waiting in WFI; vCPU 0 sleeps in WFI after the send
//!   ([`ipi_taken`]);
//! - `ipi-spin`: the same with vCPU 1 spinning with IRQs unmasked;
//! - `sgi-self`: [`SAMPLES`] SGIs from vCPU 0 to itself, from before the write to the
//!   handler;
//! - `gicd`: one `GICD_TYPER` read, [`GICD_BATCHES`] batches of [`GICD_BATCH`] reads
//!   each (a batch's time divided by its reads).
//!
//! A `PASS latency` line follows when every sample arrived (each wait is bounded), then
//! `DONE pass=N fail=M`, and PSCI `SYSTEM_OFF`.

use core::arch::asm;
use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering};

use super::irq::{
    count, distributor_on, init_cpu, irqs, last_irq_at, r32, send_sgi, sgi_to, vcount, vtimer, w32,
    GICD, PPI_VTIMER,
};
use super::{check, counter, hvc, Uart, PSCI_CPU_ON};

/// The `CPU_ON` context that makes vCPU 1 run [`secondary`].
pub const LATENCY_CONTEXT: u64 = 6;
/// Samples of each interrupt latency.
pub const SAMPLES: usize = 200;
/// How far ahead each timer sample sets its deadline.
pub const TIMER_DELAY_US: u64 = 200;
/// Batches of distributor reads.
pub const GICD_BATCHES: usize = 100;
/// Distributor reads per batch.
pub const GICD_BATCH: u64 = 10;
/// How long vCPU 0 waits after vCPU 1 said it is waiting, so that it is in WFI (or its
/// spin loop) when the SGI comes.
const SETTLE_US: u64 = 100;
/// The longest wait for any one interrupt before the sample counts as lost.
const LOST_MS: u64 = 500;

/// The SGI vCPU 0 sends itself.
const SGI_SELF: u32 = 1;
/// The SGI vCPU 0 sends vCPU 1.
const SGI_IPI: u32 = 2;

/// How vCPU 1 waits for [`SGI_IPI`]: [`WAIT_WFI`], [`WAIT_SPIN`], or [`WAIT_EXIT`] to
/// leave [`secondary`].
static VCPU1_MODE: AtomicU64 = AtomicU64::new(WAIT_WFI);
const WAIT_WFI: u64 = 0;
const WAIT_SPIN: u64 = 1;
const WAIT_EXIT: u64 = 2;
/// Written by vCPU 1 before it waits: `(mode << 32) | (IPIs taken so far + 1)`.
static VCPU1_ARMED: AtomicU64 = AtomicU64::new(0);
/// Samples lost (an interrupt that did not come within [`LOST_MS`]).
static LOST: AtomicU64 = AtomicU64::new(0);

/// `ICC_SGI1R_EL1` after a `DSB ISH`, so that vCPU 1, once it takes the SGI, sees every
/// store vCPU 0 made before it: a system-register write is not ordered after earlier
/// stores by their release semantics, only by a DSB (IHI 0069, the note on SGI
/// generation and memory ordering under `ICC_SGI1R_EL1`).
fn send_sgi_ordered(value: u64) {
    // SAFETY: a barrier; no memory is changed.
    unsafe { asm!("dsb ish", options(nostack)) };
    send_sgi(value);
}

/// Waits until `done` or `us` microseconds have passed; whether `done`.
///
/// The counter is read once every [`POLL_SPINS`] checks only: under QEMU a counter read
/// takes QEMU's global lock, which the CPU that takes the interrupt needs too (for its
/// GIC registers and to take the interrupt), so reading it in a tight loop would slow
/// down the very thing measured.
fn poll(us: u64, done: impl Fn() -> bool) -> bool {
    let (freq, start) = counter();
    let ticks = freq * us / 1_000_000;
    loop {
        for _ in 0..POLL_SPINS {
            if done() {
                return true;
            }
            core::hint::spin_loop();
        }
        if counter().1.wrapping_sub(start) >= ticks {
            return done();
        }
    }
}

/// Memory checks between two counter reads in [`poll`].
const POLL_SPINS: u32 = 256;

fn wait_us(us: u64) {
    poll(us, || false);
}

/// Waits (bounded) until `vcpu` has taken interrupt `intid` more than `before` times;
/// counts the sample lost if it never does.
fn taken(vcpu: usize, intid: u32, before: u32) -> bool {
    let ok = poll(LOST_MS * 1000, || count(vcpu, intid) != before);
    if !ok {
        LOST.fetch_add(1, Ordering::SeqCst);
    }
    ok
}

/// vCPU 1: sets up its GIC and waits for SGIs as [`VCPU1_MODE`] says until told to
/// leave.
pub fn secondary() {
    init_cpu(1, 1 << SGI_IPI);
    irqs(false);
    loop {
        let seen = count(1, SGI_IPI);
        let mode = VCPU1_MODE.load(Ordering::SeqCst);
        if mode == WAIT_EXIT {
            break;
        }
        VCPU1_ARMED.store((mode << 32) | (u64::from(seen) + 1), Ordering::SeqCst);
        if mode == WAIT_WFI {
            // IRQs stay masked around the check and the WFI: an SGI arriving between them
            // is pending and ends the WFI at once (an interrupt masked by PSTATE.I is
            // still a WFI wake-up event, Arm ARM DDI 0487, "Wait for Interrupt"), and is
            // taken when unmasked after it.
            while count(1, SGI_IPI) == seen {
                // SAFETY: waiting for an interrupt.
                unsafe { asm!("wfi", options(nomem, nostack)) };
                irqs(true);
                irqs(false);
            }
        } else {
            irqs(true);
            while count(1, SGI_IPI) == seen {
                core::hint::spin_loop();
            }
            irqs(false);
        }
    }
}

/// Waits until vCPU 1 has taken [`SGI_IPI`] more than `before` times (bounded; counts the
/// sample lost if it never does), in WFI, woken by the virtual timer every
/// [`LOOK_US`] to look. Sleeping rather than spinning leaves the host CPU to the
/// receiver's thread: under QEMU each CPU is a host thread, and a host with fewer free
/// CPUs than spinning threads would otherwise show its scheduler's time slices.
fn ipi_taken(before: u32) -> bool {
    let (freq, start) = counter();
    loop {
        if count(1, SGI_IPI) != before {
            return true;
        }
        if counter().1.wrapping_sub(start) >= freq * LOST_MS / 1000 {
            LOST.fetch_add(1, Ordering::SeqCst);
            return false;
        }
        irqs(false);
        vtimer(vcount() + freq * LOOK_US / 1_000_000, 1);
        if count(1, SGI_IPI) == before {
            // SAFETY: waiting for an interrupt (the timer at the latest).
            unsafe { asm!("wfi", options(nomem, nostack)) };
        }
        irqs(true);
        vtimer(u64::MAX, 0);
    }
}

/// How often [`ipi_taken`] looks.
const LOOK_US: u64 = 50;

/// Starts vCPU 1 in [`secondary`]; whether it came up.
fn start_vcpu1() -> bool {
    extern "C" {
        fn secondary_start();
    }
    let entry = secondary_start as *const () as u64;
    let r = hvc(PSCI_CPU_ON, &[1, entry, LATENCY_CONTEXT])[0];
    r == 0 && poll(2_000_000, || VCPU1_ARMED.load(Ordering::SeqCst) != 0)
}

/// One IPI sample with vCPU 1 waiting in `mode`: ticks from the send to vCPU 1's
/// handler.
fn ipi_sample(mode: u64) -> Option<u64> {
    let before = count(1, SGI_IPI);
    let armed = (mode << 32) | (u64::from(before) + 1);
    if !poll(LOST_MS * 1000, || {
        VCPU1_ARMED.load(Ordering::SeqCst) == armed
    }) {
        LOST.fetch_add(1, Ordering::SeqCst);
        return None;
    }
    wait_us(SETTLE_US);
    let t0 = vcount();
    send_sgi(sgi_to(u64::from(SGI_IPI), 0b10));
    ipi_taken(before).then(|| last_irq_at(1).saturating_sub(t0))
}

/// Switches vCPU 1 to `mode`: the store, then an (unmeasured) SGI that makes it look.
fn switch_vcpu1(mode: u64) {
    VCPU1_MODE.store(mode, Ordering::SeqCst);
    let before = count(1, SGI_IPI);
    send_sgi_ordered(sgi_to(u64::from(SGI_IPI), 0b10));
    taken(1, SGI_IPI, before);
}

/// One timer sample: ticks from the deadline to the handler, vCPU 0 spinning or in WFI.
fn timer_sample(freq: u64, wfi: bool) -> Option<u64> {
    let before = count(0, PPI_VTIMER);
    let deadline = vcount() + freq * TIMER_DELAY_US / 1_000_000;
    if wfi {
        irqs(false);
        vtimer(deadline, 1);
        let (_, start) = counter();
        // Bounded, though the timer fires whatever happens and ends the WFI; the counter
        // is read once per wake-up only (see `poll`).
        while count(0, PPI_VTIMER) == before
            && counter().1.wrapping_sub(start) < freq * LOST_MS / 1000
        {
            // SAFETY: waiting for an interrupt; see `secondary` for the masking.
            unsafe { asm!("wfi", options(nomem, nostack)) };
            irqs(true);
            irqs(false);
        }
        irqs(true);
    } else {
        vtimer(deadline, 1);
    }
    taken(0, PPI_VTIMER, before).then(|| last_irq_at(0).saturating_sub(deadline))
}

/// Median, mean and minimum of `ticks / per` in nanoseconds.
fn stats(ticks: &mut [u64], freq: u64, per: u64) -> [u128; 3] {
    let ns = |t: u128| t * 1_000_000_000 / (u128::from(freq) * u128::from(per.max(1)));
    if ticks.is_empty() {
        return [0; 3];
    }
    ticks.sort_unstable();
    let n = ticks.len();
    let median = if n % 2 == 1 {
        u128::from(ticks[n / 2])
    } else {
        (u128::from(ticks[n / 2 - 1]) + u128::from(ticks[n / 2])) / 2
    };
    let sum: u128 = ticks.iter().map(|&t| u128::from(t)).sum();
    [ns(median), ns(sum / n as u128), ns(u128::from(ticks[0]))]
}

/// Fills up to [`SAMPLES`] values from `f`, stopping at the first lost one (the rest
/// would most likely be lost too, each after [`LOST_MS`]); returns how many.
fn collect(out: &mut [u64; SAMPLES], mut f: impl FnMut() -> Option<u64>) -> usize {
    for (n, slot) in out.iter_mut().enumerate() {
        match f() {
            Some(t) => *slot = t,
            None => return n,
        }
    }
    SAMPLES
}

/// The measurement on vCPU 0 (see the module documentation).
pub fn latency() {
    // UARTCR: UARTEN | TXE | RXE (QEMU's PL011 transmits without it; hardware would not).
    w32(super::UART + 0x30, 0x301);
    let (freq, _) = counter();
    distributor_on();
    init_cpu(0, (1 << SGI_SELF) | (1 << PPI_VTIMER));
    irqs(true);
    let mut buf = [0u64; SAMPLES];
    // Per metric: its name, median/mean/min in ns, and whether every sample came.
    let mut results = [("", [0u128; 3], false); 6];
    let mut measure =
        |slot: &mut (&str, [u128; 3], bool), name, sample: &mut dyn FnMut() -> Option<u64>| {
            let n = collect(&mut buf, sample);
            *slot = (name, stats(&mut buf[..n], freq, 1), n == SAMPLES);
        };
    let [timer, timer_wfi, ipi_wfi, ipi_spin, sgi_self, gicd] = &mut results;
    measure(timer, "timer", &mut || timer_sample(freq, false));
    measure(timer_wfi, "timer-wfi", &mut || timer_sample(freq, true));
    if start_vcpu1() {
        measure(ipi_wfi, "ipi-wfi", &mut || ipi_sample(WAIT_WFI));
        switch_vcpu1(WAIT_SPIN);
        measure(ipi_spin, "ipi-spin", &mut || ipi_sample(WAIT_SPIN));
        switch_vcpu1(WAIT_EXIT);
    } else {
        let _ = writeln!(Uart, "FAIL latency-vcpu1: vCPU 1 did not start");
        ipi_wfi.0 = "ipi-wfi";
        ipi_spin.0 = "ipi-spin";
    }
    measure(sgi_self, "sgi-self", &mut || {
        let before = count(0, SGI_SELF);
        let t0 = vcount();
        send_sgi(sgi_to(u64::from(SGI_SELF), 1));
        taken(0, SGI_SELF, before).then(|| last_irq_at(0).saturating_sub(t0))
    });
    for slot in buf.iter_mut().take(GICD_BATCHES) {
        let t0 = vcount();
        for _ in 0..GICD_BATCH {
            core::hint::black_box(r32(GICD + 0x4));
        }
        *slot = vcount().wrapping_sub(t0);
    }
    *gicd = (
        "gicd",
        stats(&mut buf[..GICD_BATCHES], freq, GICD_BATCH),
        true,
    );
    irqs(false);

    // Two lines: the hypervisor's console passes a guest's lines of up to 160 bytes whole.
    let _ = write!(Uart, "latency: cntfrq={freq}");
    for (i, (name, [median, mean, min], _)) in results.iter().enumerate() {
        if i == 4 {
            let _ = write!(Uart, "\nlatency:");
        }
        let _ = write!(Uart, " {name}={median}/{mean}/{min}");
    }
    let _ = writeln!(Uart);
    let lost = LOST.load(Ordering::SeqCst);
    let short = results.iter().find(|r| !r.2).map(|r| r.0);
    check(
        "latency",
        lost == 0 && short.is_none(),
        format_args!("{lost} samples lost, first short metric {short:?}"),
    );
}

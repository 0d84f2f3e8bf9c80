//! The hypervisor's console: the `log` backend over the PL011, with the CPU index and
//! time since boot on every line.

use core::num::NonZeroU128;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use aarch64_cpu::registers::{Readable, CNTFRQ_EL0, CNTPCT_EL0};
use log::LevelFilter;

use super::cpu::cpu_index;
use super::pl011::Pl011;
use crate::console::logger::{self, Logger};
use crate::console::tx::BoundedTx;

/// The hardware side of the logger: CPU index from `TPIDR_EL2` (set by the boot code),
/// time from the generic timer.
pub(super) struct LogClock;

static BOOT_TICKS: AtomicU64 = AtomicU64::new(0);

/// The console PL011's registers (0 before [`attach`]), for spare drivers.
static UART_BASE: AtomicUsize = AtomicUsize::new(0);

impl logger::LogContext for LogClock {
    type Console = BoundedTx<Pl011>;

    fn cpu(&self) -> usize {
        cpu_index()
    }

    fn micros(&self) -> u64 {
        let ticks = CNTPCT_EL0
            .get()
            .wrapping_sub(BOOT_TICKS.load(Ordering::Relaxed));
        // A frequency of 0 (firmware that did not set CNTFRQ_EL0) counts as 1 Hz. The
        // product of a u64 and a million fits in a u128.
        let freq = NonZeroU128::new(u128::from(CNTFRQ_EL0.get())).unwrap_or(NonZeroU128::MIN);
        (u128::from(ticks).saturating_mul(1_000_000) / freq) as u64
    }

    /// A second driver for the console PL011, in character mode (one byte per look at
    /// the flags, right whether or not the FIFOs are on).
    fn spare_console(&self) -> Option<BoundedTx<Pl011>> {
        let base = UART_BASE.load(Ordering::Acquire);
        // SAFETY: `base` is the PL011 [`attach`] was given, mapped Device-nGnRE for the
        // whole run. The spare only writes UARTDR and reads UARTFR, as the shared driver
        // does: running beside it can interleave or drop bytes, nothing more.
        (base != 0).then(|| BoundedTx::new(unsafe { Pl011::new(base) }))
    }
}

pub(super) static LOGGER: Logger<LogClock> = Logger::new(LogClock, LevelFilter::Info);

/// Microseconds since boot (the log's time stamps).
pub(super) fn micros() -> u64 {
    logger::LogContext::micros(&LogClock)
}

/// Bytes the console dropped because the UART did not take them in time.
pub(super) fn dropped_bytes() -> u64 {
    LOGGER.with_console(|c| c.dropped()).unwrap_or(0)
}

/// Waits (bounded) until the UART has sent every byte of the log: before the machine
/// powers off or exits, which would cut what is still in its FIFO.
pub(super) fn drain() {
    LOGGER.with_console_forced(|c, _, _| c.drain());
}

/// Starts the time stamps of the log (the generic timer's count now is time 0).
pub(super) fn start_clock() {
    BOOT_TICKS.store(CNTPCT_EL0.get(), Ordering::Relaxed);
}

/// Sends the log to `uart` from now on.
pub(super) fn attach(mut uart: Pl011) {
    uart.enable_fifos();
    UART_BASE.store(uart.base(), Ordering::Release);
    LOGGER.attach(BoundedTx::new(uart));
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(LOGGER.level());
    }
}

//! The `log` backend: one line per record, `[seconds LEVEL cpuN] message`, written to the
//! console under a lock (a fair one: CPUs print in the order they asked) so lines from
//! different CPUs never mix. A guest's lines go through the same lock as `[name] text`
//! ([`Logger::guest_line`]).

use core::fmt::{self, Write};

use log::{Level, LevelFilter, Log, Metadata, Record};

use crate::Lock as Mutex;

/// What the logger needs from the platform.
pub trait LogContext: Sync + Send {
    /// The console line sink.
    type Console: Write + Send;
    /// The index of the calling CPU.
    fn cpu(&self) -> usize;
    /// Time since boot in microseconds.
    fn micros(&self) -> u64;
    /// A console value of its own on the same device, for a writer that cannot get the
    /// shared one ([`Logger::with_console_forced`]): its bytes may interleave with the
    /// holder's on the wire, but the two share nothing in memory. `None` without a
    /// console.
    fn spare_console(&self) -> Option<Self::Console>;
}

/// Writes one log line (without taking any lock).
///
/// # Errors
///
/// Whatever the writer returns.
pub fn write_line(
    out: &mut impl Write,
    micros: u64,
    level: Level,
    cpu: usize,
    args: fmt::Arguments<'_>,
) -> fmt::Result {
    writeln!(
        out,
        "[{:>4}.{:06} {:<5} cpu{}] {}",
        micros / 1_000_000,
        micros % 1_000_000,
        level,
        cpu,
        args
    )
}

/// A `log::Log` over a locked console.
pub struct Logger<P: LogContext> {
    platform: P,
    console: Mutex<Option<P::Console>>,
    level: LevelFilter,
}

impl<P: LogContext> Logger<P> {
    /// A logger that drops records until [`Logger::attach`] gives it a console.
    pub const fn new(platform: P, level: LevelFilter) -> Self {
        Self {
            platform,
            console: Mutex::new(None),
            level,
        }
    }

    /// Gives the logger its console.
    pub fn attach(&self, console: P::Console) {
        *self.console.lock() = Some(console);
    }

    /// Prints line `text` of guest `name` as `[name] text`, in order with the log's lines.
    /// Without the log's prefix: the VM's name tells its lines from the hypervisor's, a
    /// guest such as Linux stamps its lines itself, and every byte costs a UART write
    /// (the Linux boot of docs/BENCHMARKS.md prints 215 lines).
    pub fn guest_line(&self, name: &str, text: &str) {
        if let Some(c) = self.console.lock().as_mut() {
            // A console write error has nowhere to be reported.
            let _ = writeln!(c, "[{name}] {text}");
        }
    }

    /// Runs `f` on the console, if one is attached.
    pub fn with_console<R>(&self, f: impl FnOnce(&mut P::Console) -> R) -> Option<R> {
        self.console.lock().as_mut().map(f)
    }

    /// Whether a console is attached.
    pub fn has_console(&self) -> bool {
        self.console.try_lock().is_none_or(|c| c.is_some())
    }

    /// The maximum level this logger prints.
    pub fn level(&self) -> LevelFilter {
        self.level
    }

    /// Runs `f` on the console for a multi-line message (a fault report) that must not
    /// be interleaved with other CPUs' lines. If the lock is held (the fault happened
    /// while printing, or another CPU holds it), waits a bounded number of attempts and
    /// then writes through a spare console on the same device
    /// ([`LogContext::spare_console`]): a report must never be lost to a deadlock, and
    /// the holder's console is left alone (the lock stays its).
    pub fn with_console_forced(&self, f: impl FnOnce(&mut P::Console, u64, usize)) {
        for _ in 0..1_000_000 {
            if let Some(mut guard) = self.console.try_lock() {
                if let Some(c) = guard.as_mut() {
                    f(c, self.platform.micros(), self.platform.cpu());
                }
                return;
            }
            core::hint::spin_loop();
        }
        // The holder is stuck (a fault on this CPU while printing) or far slower than a
        // million spins: a garbled line beats a hang.
        if let Some(mut spare) = self.platform.spare_console() {
            f(&mut spare, self.platform.micros(), self.platform.cpu());
        }
    }
}

impl<P: LogContext> Log for Logger<P> {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let cpu = self.platform.cpu();
        let mut console = self.console.lock();
        // Time is taken under the lock so the log's timestamps never go backwards.
        let micros = self.platform.micros();
        if let Some(c) = console.as_mut() {
            // A console write error has nowhere to be reported.
            let _ = write_line(c, micros, record.level(), cpu, *record.args());
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;
    use std::sync::{Arc, Mutex as StdMutex};

    #[test]
    fn line_format() {
        let mut s = String::new();
        write_line(
            &mut s,
            3_000_042,
            Level::Info,
            2,
            format_args!("online, MPIDR {:#x}", 2),
        )
        .unwrap();
        assert_eq!(s, "[   3.000042 INFO  cpu2] online, MPIDR 0x2\n");
        s.clear();
        write_line(&mut s, 0, Level::Error, 0, format_args!("x")).unwrap();
        assert_eq!(s, "[   0.000000 ERROR cpu0] x\n");
    }

    #[derive(Clone, Default)]
    struct Shared(Arc<StdMutex<String>>);

    impl Write for Shared {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            self.0.lock().unwrap().push_str(s);
            Ok(())
        }
    }

    /// Its spare console writes to the same text as the console the tests attach.
    #[derive(Default)]
    struct Fake(Shared);

    impl LogContext for Fake {
        type Console = Shared;
        fn cpu(&self) -> usize {
            1
        }
        fn micros(&self) -> u64 {
            1_500_000
        }
        fn spare_console(&self) -> Option<Shared> {
            Some(self.0.clone())
        }
    }

    #[test]
    fn logger_filters_by_level_and_tags_the_cpu() {
        let out = Shared::default();
        let logger = Logger::new(Fake::default(), LevelFilter::Info);
        // Before a console is attached, records are dropped, not buffered or panicking.
        logger.log(
            &Record::builder()
                .level(Level::Info)
                .args(format_args!("early"))
                .build(),
        );
        logger.attach(out.clone());
        logger.log(
            &Record::builder()
                .level(Level::Debug)
                .args(format_args!("hidden"))
                .build(),
        );
        logger.log(
            &Record::builder()
                .level(Level::Warn)
                .args(format_args!("shown"))
                .build(),
        );
        assert_eq!(*out.0.lock().unwrap(), "[   1.500000 WARN  cpu1] shown\n");
    }

    #[test]
    fn guest_lines_carry_the_vm_name_only() {
        let out = Shared::default();
        let logger = Logger::new(Fake::default(), LevelFilter::Info);
        logger.guest_line("vm", "dropped: no console yet");
        logger.attach(out.clone());
        logger.guest_line("linux", "[    0.000000] Booting Linux");
        logger.log(
            &Record::builder()
                .level(Level::Info)
                .args(format_args!("VM linux powered off"))
                .build(),
        );
        assert_eq!(
            *out.0.lock().unwrap(),
            "[linux] [    0.000000] Booting Linux\n[   1.500000 INFO  cpu1] VM linux powered off\n"
        );
    }

    #[test]
    fn forced_console_works_even_when_locked() {
        let out = Shared::default();
        let logger = Logger::new(Fake(out.clone()), LevelFilter::Info);
        logger.attach(out.clone());
        // Free: the shared console.
        logger.with_console_forced(|c, _, _| {
            let _ = write!(c, "a ");
        });
        let guard = logger.console.lock();
        core::mem::forget(guard); // a CPU died while printing
        logger.with_console_forced(|c, _, cpu| {
            let _ = write!(c, "report from cpu{cpu}");
        });
        assert_eq!(*out.0.lock().unwrap(), "a report from cpu1");
        // Through the spare: the holder's lock was not taken from it.
        assert!(logger.console.try_lock().is_none());
    }
}

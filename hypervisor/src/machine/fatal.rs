//! The fatal paths: a start-up error, an exception EL2 takes from itself, a panic. Each
//! prints what happened and stops the machine with a failing status (`boot::exit_status`).

use core::fmt::Write;
use core::sync::atomic::{AtomicBool, Ordering};

use boot::{exit_status, ExceptionFrame, ExceptionKind, ExceptionSource};
use log::error;

use super::console::LOGGER;
use super::cpu::{cpu_index, park};
use crate::console::report;
use crate::mem::{stage1, VirtAddr};

static IN_FATAL: [AtomicBool; boot::MAX_CPUS] = [const { AtomicBool::new(false) }; boot::MAX_CPUS];

/// Logs a start-up error and stops the machine with a failing status.
pub fn fatal(args: core::fmt::Arguments<'_>) -> ! {
    error!("fatal: {args}");
    exit(exit_status::STARTUP)
}

/// Stops the machine with `status` (semihosting) once the console has sent what it holds
/// (bounded): up to a FIFO's worth of the last line may still be queued.
pub fn exit(status: u32) -> ! {
    super::console::drain();
    boot::semihosting_exit(status)
}

pub(super) fn early_failure(msg: &core::ffi::CStr) -> ! {
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
            if let Some(owner) =
                stage1::stack_guard_owner(&boot::image_layout(), VirtAddr::new(frame.far))
            {
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
    exit(exit_status::EL2_EXCEPTION)
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
    exit(exit_status::PANIC)
}

//! The report printed when the hypervisor takes an exception it does not expect, or
//! panics, just before it stops the machine with a failing status.

use core::fmt::{self, Write};

use boot::{ExceptionFrame, ExceptionKind, ExceptionSource};

/// Writes the multi-line report of an unexpected EL2 exception.
///
/// # Errors
///
/// Whatever the writer returns.
pub fn write_exception(
    out: &mut impl Write,
    cpu: usize,
    frame: &ExceptionFrame,
    source: ExceptionSource,
    kind: ExceptionKind,
) -> fmt::Result {
    let esr = frame.esr();
    let what = match kind {
        ExceptionKind::Sync => "synchronous exception",
        ExceptionKind::Irq => "IRQ",
        ExceptionKind::Fiq => "FIQ",
        ExceptionKind::SError => "SError",
    };
    let from = match source {
        ExceptionSource::CurrentElSp0 => "EL2 on SP_EL0",
        ExceptionSource::CurrentElSpx => "EL2",
    };
    writeln!(out, "*** unexpected {what} taken from {from} on cpu{cpu}")?;
    writeln!(out, "    ESR_EL2  {:#018x}  {}", frame.esr, esr.class())?;
    if kind == ExceptionKind::Sync {
        writeln!(out, "    cause    {}", esr.decode())?;
    }
    writeln!(
        out,
        "    ELR_EL2  {:#018x}  FAR_EL2 {:#018x}",
        frame.elr, frame.far
    )?;
    writeln!(
        out,
        "    SPSR_EL2 {:#018x}  SP      {:#018x}",
        frame.spsr, frame.sp
    )?;
    // x0-x30, four to a row.
    for (row, regs) in frame.x.chunks(4).enumerate() {
        write!(out, "   ")?;
        for (col, value) in regs.iter().enumerate() {
            let r = row.saturating_mul(4).saturating_add(col);
            write!(out, " x{r:<2} {value:#018x}")?;
        }
        writeln!(out)?;
    }
    Ok(())
}

/// Writes the report of a panic.
///
/// # Errors
///
/// Whatever the writer returns.
pub fn write_panic(
    out: &mut impl Write,
    cpu: usize,
    info: &core::panic::PanicInfo<'_>,
) -> fmt::Result {
    write!(out, "*** panic on cpu{cpu}")?;
    if let Some(loc) = info.location() {
        write!(out, " at {}:{}", loc.file(), loc.line())?;
    }
    writeln!(out, ": {}", info.message())
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;

    #[test]
    fn exception_report_decodes_the_class_and_shows_registers() {
        // Data abort at EL2, write, permission fault level 3.
        let mut frame = ExceptionFrame {
            esr: (0x25 << 26) | (1 << 25) | (1 << 6) | 0b00_1111,
            elr: 0x4020_1234,
            far: 0x4020_0000,
            spsr: 0x3c9,
            sp: 0x4030_0000,
            ..ExceptionFrame::default()
        };
        for (i, x) in frame.x.iter_mut().enumerate() {
            *x = 0x1000 + i as u64;
        }
        let mut s = String::new();
        write_exception(
            &mut s,
            3,
            &frame,
            ExceptionSource::CurrentElSpx,
            ExceptionKind::Sync,
        )
        .unwrap();
        assert!(
            s.starts_with("*** unexpected synchronous exception taken from EL2 on cpu3\n"),
            "{s}"
        );
        assert!(s.contains("EC 0x25: data abort at EL2"), "{s}");
        assert!(
            s.contains("cause    data abort at EL2 on write: permission fault, level 3"),
            "{s}"
        );
        assert!(s.contains("ELR_EL2  0x0000000040201234"), "{s}");
        assert!(s.contains("FAR_EL2 0x0000000040200000"), "{s}");
        assert!(s.contains("x0  0x0000000000001000"), "{s}");
        assert!(s.contains("x30 0x000000000000101e"), "{s}");
        assert!(!s.contains("x31"), "{s}");
    }

    #[test]
    fn asynchronous_exceptions_have_no_cause_line() {
        let frame = ExceptionFrame::default();
        let mut s = String::new();
        write_exception(
            &mut s,
            0,
            &frame,
            ExceptionSource::CurrentElSp0,
            ExceptionKind::Irq,
        )
        .unwrap();
        assert!(
            s.starts_with("*** unexpected IRQ taken from EL2 on SP_EL0 on cpu0"),
            "{s}"
        );
        assert!(!s.contains("cause"), "{s}");
    }
}

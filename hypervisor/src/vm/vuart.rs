//! The virtual UART: a write-only subset of the PL011 register map, emulated on stage-2
//! data aborts, that turns a guest's bytes into whole console lines prefixed with the VM
//! name (`[name] text`).
//!
//! Registers (offsets as in the PL011 TRM, Arm DDI 0183): `UARTDR` (0x000) — a write
//! sends the low byte, a read returns 0 (no input); `UARTFR` (0x018) — reads TXFE | RXFE
//! (transmit FIFO empty, receive FIFO empty), so a driver polling "TX full" never waits.
//! Every other register reads as 0 and ignores writes.

use crate::console::line::{Line, LineBuffer};

/// Data register offset.
pub const UARTDR: u64 = 0x000;
/// Flag register offset.
pub const UARTFR: u64 = 0x018;
/// `UARTFR` value: TXFE (bit 7) | RXFE (bit 4).
pub const FR_IDLE: u64 = (1 << 7) | (1 << 4);

/// Where the console lines of and about a VM go, and the clock their rate limits read
/// ([`crate::vm::Vm::guest_line`], [`crate::vm::Vm::log`]).
pub trait LineSink {
    /// Emits one line (without its newline) that VM `name`'s guest printed.
    fn line(&mut self, name: &str, text: &str);
    /// Emits one hypervisor log line about a VM.
    fn event(&mut self, level: log::Level, args: core::fmt::Arguments<'_>);
    /// Microseconds since boot.
    fn micros(&self) -> u64;
}

/// The per-VM UART: a line buffer (`crate::console::line`). Completed lines are handed
/// back to the caller, which prints them once the UART's lock is released.
#[derive(Debug, Default)]
pub struct VUart {
    line: LineBuffer,
}

impl VUart {
    /// An empty UART.
    #[must_use]
    pub const fn new() -> Self {
        Self {
            line: LineBuffer::new(),
        }
    }

    /// Emulates a read of `offset`; returns the value for the guest register.
    #[must_use]
    pub fn read(&self, offset: u64) -> u64 {
        if offset == UARTFR {
            FR_IDLE
        } else {
            0
        }
    }

    /// Emulates a write of `value` to `offset`; returns the line it completed, if any.
    pub fn write(&mut self, offset: u64, value: u64) -> Option<Line> {
        if offset != UARTDR {
            return None;
        }
        self.line.push(value as u8)
    }

    /// The pending partial line, if any.
    pub fn flush(&mut self) -> Option<Line> {
        self.line.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_collected_from_uartdr_only() {
        let mut u = VUart::new();
        let mut out = Vec::new();
        for b in b"hello\r\nworld\x01\n" {
            out.extend(u.write(UARTDR, u64::from(*b) | 0xff00));
        }
        assert_eq!(u.write(0x24, u64::from(b'\n')), None, "not UARTDR: ignored");
        let out: Vec<&str> = out.iter().map(Line::as_str).collect();
        assert_eq!(out, ["hello", "world?"]);
        u.write(UARTDR, u64::from(b'x'));
        assert_eq!(u.flush().map(|l| l.as_str().to_string()), Some("x".into()));
    }

    #[test]
    fn registers_read() {
        let u = VUart::new();
        assert_eq!(u.read(UARTFR), 0x90);
        assert_eq!(u.read(UARTDR), 0);
        assert_eq!(u.read(0x30), 0);
    }
}

//! The virtual UART: a write-only subset of the PL011 register map, emulated on stage-2
//! data aborts, that turns a guest's bytes into whole console lines prefixed with the VM
//! name (`[name] text`).
//!
//! Registers (offsets as in the PL011 TRM, Arm DDI 0183): `UARTDR` (0x000) — a write
//! sends the low byte, a read returns 0 (no input); `UARTFR` (0x018) — reads TXFE | RXFE
//! (transmit FIFO empty, receive FIFO empty), so a driver polling "TX full" never waits.
//! Every other register reads as 0 and ignores writes.

use alloc::string::String;

/// Data register offset.
pub const UARTDR: u64 = 0x000;
/// Flag register offset.
pub const UARTFR: u64 = 0x018;
/// `UARTFR` value: TXFE (bit 7) | RXFE (bit 4).
pub const FR_IDLE: u64 = (1 << 7) | (1 << 4);
/// A line longer than this is emitted in pieces.
pub const MAX_LINE: usize = 160;

/// Receives the finished lines.
pub trait LineSink {
    /// Emits one line (without its newline) of VM `name`.
    fn line(&mut self, name: &str, text: &str);
}

/// The per-VM line buffer.
#[derive(Debug, Default)]
pub struct VUart {
    line: String,
}

impl VUart {
    /// An empty UART.
    #[must_use]
    pub const fn new() -> Self {
        Self {
            line: String::new(),
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

    /// Emulates a write of `value` to `offset`.
    pub fn write(&mut self, offset: u64, value: u64, name: &str, sink: &mut impl LineSink) {
        if offset != UARTDR {
            return;
        }
        match value as u8 {
            b'\n' => self.flush(name, sink),
            b'\r' => {}
            b => {
                // Control bytes and non-ASCII become '?' so the host console stays sane.
                let c = if b.is_ascii_graphic() || b == b' ' || b == b'\t' {
                    b as char
                } else {
                    '?'
                };
                self.line.push(c);
                if self.line.len() >= MAX_LINE {
                    self.flush(name, sink);
                }
            }
        }
    }

    /// Emits a pending partial line, if any.
    pub fn flush(&mut self, name: &str, sink: &mut impl LineSink) {
        if !self.line.is_empty() {
            sink.line(name, &self.line);
            self.line.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Lines(Vec<String>);
    impl LineSink for Lines {
        fn line(&mut self, name: &str, text: &str) {
            self.0.push(format!("[{name}] {text}"));
        }
    }

    #[test]
    fn lines_are_prefixed_and_split() {
        let mut u = VUart::new();
        let mut out = Lines::default();
        for b in b"hello\r\nworld\x01\n\n" {
            u.write(UARTDR, u64::from(*b) | 0xff00, "vm1", &mut out);
        }
        u.write(0x24, u64::from(b'x'), "vm1", &mut out); // not UARTDR: ignored
        assert_eq!(
            out.0,
            vec!["[vm1] hello".to_string(), "[vm1] world?".to_string()]
        );
        for _ in 0..MAX_LINE + 3 {
            u.write(UARTDR, u64::from(b'a'), "v", &mut out);
        }
        assert_eq!(out.0.len(), 3);
        u.flush("v", &mut out);
        assert_eq!(out.0[3], "[v] aaa");
    }

    #[test]
    fn registers_read() {
        let u = VUart::new();
        assert_eq!(u.read(UARTFR), 0x90);
        assert_eq!(u.read(UARTDR), 0);
        assert_eq!(u.read(0x30), 0);
    }
}

//! The virtual UART: an emulated Arm PL011 (PrimeCell UART, Arm DDI 0183) on one 4 KiB
//! page, emulated on stage-2 data aborts, complete enough for Linux's `amba-pl011`
//! driver and for polling bare-metal code. Transmitted bytes become whole console lines
//! prefixed with the VM name (`[name] text`) on the hypervisor's own console; received
//! bytes come from [`VUart::push_input`].
//!
//! The model (register offsets and bits from DDI 0183, chapter 3):
//!
//! - the transmit FIFO drains at once: `UARTFR` always shows TXFE and never TXFF or BUSY,
//!   and every write to `UARTDR` raises the transmit interrupt (TXRIS), as the FIFO
//!   passes its trigger level on its way back to empty; `UARTICR` clears it;
//! - the receive FIFO holds up to [`RX_FIFO`] bytes; RXRIS is raised while it holds any
//!   (and RTRIS, the receive timeout, with it); RXFE/RXFF show its state;
//! - `UARTRIS` is the raw status, `UARTMIS` = RIS & IMSC, and the interrupt line
//!   ([`VUart::irq_level`]) is MIS != 0, level-sensitive, wired to the VM's virtual GIC
//!   as SPI [`crate::config::VUART_INTID`];
//! - `UARTIBRD`, `UARTFBRD`, `UARTLCR_H`, `UARTCR`, `UARTIFLS`, `UARTDMACR` and `UARTILPR`
//!   hold what is written (there is no baud rate to honour); `UARTRSR`/`UARTECR` read 0;
//! - the peripheral and PrimeCell ID registers (0xFE0-0xFFC) read as a PL011 r1p5:
//!   `UARTPeriphID0-3` = 0x11, 0x10, 0x34, 0x00 and `UARTPCellID0-3` = 0x0D, 0xF0, 0x05,
//!   0xB1, which is what the AMBA bus matches the driver by.
//!
//! Everything else reads as 0 and ignores writes.
//!
//! Only a read of `UARTDR` with bytes waiting changes the model's state. While none
//! wait, every read can therefore be served from a read-only page of register values
//! ([`super::uart_page`]) without a trap; [`VUart::page_mapped`] says whether it is.

use crate::console::line::{Line, LineBuffer};

/// Data register.
pub const UARTDR: u64 = 0x000;
/// Receive status / error clear.
pub const UARTRSR: u64 = 0x004;
/// Flag register.
pub const UARTFR: u64 = 0x018;
/// IrDA low-power counter.
pub const UARTILPR: u64 = 0x020;
/// Integer baud rate divisor.
pub const UARTIBRD: u64 = 0x024;
/// Fractional baud rate divisor.
pub const UARTFBRD: u64 = 0x028;
/// Line control.
pub const UARTLCR_H: u64 = 0x02c;
/// Control.
pub const UARTCR: u64 = 0x030;
/// Interrupt FIFO level select.
pub const UARTIFLS: u64 = 0x034;
/// Interrupt mask set/clear.
pub const UARTIMSC: u64 = 0x038;
/// Raw interrupt status.
pub const UARTRIS: u64 = 0x03c;
/// Masked interrupt status.
pub const UARTMIS: u64 = 0x040;
/// Interrupt clear.
pub const UARTICR: u64 = 0x044;
/// DMA control.
pub const UARTDMACR: u64 = 0x048;
/// First of the eight ID registers (`UARTPeriphID0`).
pub const UARTPERIPHID0: u64 = 0xfe0;

/// `UARTFR.RXFE`: receive FIFO empty.
pub const FR_RXFE: u64 = 1 << 4;
/// `UARTFR.RXFF`: receive FIFO full.
pub const FR_RXFF: u64 = 1 << 6;
/// `UARTFR.TXFE`: transmit FIFO empty.
pub const FR_TXFE: u64 = 1 << 7;
/// `UARTFR` with nothing received: TXFE | RXFE.
pub const FR_IDLE: u64 = FR_TXFE | FR_RXFE;

/// Receive interrupt (RXRIS/RXIM/RXIC), bit 4.
pub const INT_RX: u32 = 1 << 4;
/// Transmit interrupt (TXRIS/TXIM/TXIC), bit 5.
pub const INT_TX: u32 = 1 << 5;
/// Receive timeout interrupt (RTRIS/RTIM/RTIC), bit 6.
pub const INT_RT: u32 = 1 << 6;
/// Every interrupt bit of RIS/IMSC/ICR (bits 10:0).
const INT_ALL: u32 = 0x7ff;

/// `UARTCR` at reset: TXE and RXE set, UART disabled (DDI 0183, 3.3.8).
const CR_RESET: u32 = 0x300;
/// `UARTIFLS` at reset: both FIFOs at half.
const IFLS_RESET: u32 = 0x12;

/// The ID registers, `UARTPeriphID0`..3 then `UARTPCellID0`..3.
const ID: [u8; 8] = [0x11, 0x10, 0x34, 0x00, 0x0d, 0xf0, 0x05, 0xb1];

/// Every register offset below the ID registers that reads as something other than 0
/// ([`VUart::peek`]); the ID registers are the eight words from [`UARTPERIPHID0`].
pub const STATE_REGS: [u64; 11] = [
    UARTFR, UARTILPR, UARTIBRD, UARTFBRD, UARTLCR_H, UARTCR, UARTIFLS, UARTIMSC, UARTRIS, UARTMIS,
    UARTDMACR,
];

/// Depth of the receive FIFO (the PL011's).
pub const RX_FIFO: usize = 32;

/// Where the console lines of and about a VM go, and the clock their rate limits read
/// ([`crate::vm::Vm::guest_line`], [`crate::vm::Vm::log`]).
pub trait LineSink {
    /// Emits one line (without its newline) that VM `name`'s guest printed.
    fn line(&mut self, name: &str, text: &str);
    /// Emits one hypervisor log line about a VM.
    fn event(&mut self, level: log::Level, args: core::fmt::Arguments<'_>);
    /// Microseconds since boot.
    fn micros(&self) -> u64;
    /// VM `name`, which gets the console's input, read its receive FIFO: there may be
    /// room for more. (Nothing by default.)
    fn input_wanted(&mut self, _name: &str) {}
}

/// The receive FIFO: a fixed ring (nothing is allocated). `head < RX_FIFO` and
/// `len <= RX_FIFO` always.
#[derive(Clone, Copy, Debug, Default)]
struct RxFifo {
    bytes: [u8; RX_FIFO],
    head: usize,
    len: usize,
}

impl RxFifo {
    const fn new() -> Self {
        Self {
            bytes: [0; RX_FIFO],
            head: 0,
            len: 0,
        }
    }

    const fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn push(&mut self, b: u8) -> bool {
        if self.len >= RX_FIFO {
            return false;
        }
        // Ring positions are taken modulo `RX_FIFO`, which divides 2^64: a wrapping sum
        // has the same residue (and with the invariant it never wraps).
        if let Some(slot) = self
            .bytes
            .get_mut(self.head.wrapping_add(self.len) % RX_FIFO)
        {
            *slot = b;
            self.len = self.len.saturating_add(1);
        }
        true
    }

    fn pop(&mut self) -> Option<u8> {
        if self.len == 0 {
            return None;
        }
        let b = self.bytes.get(self.head).copied();
        self.head = self.head.wrapping_add(1) % RX_FIFO;
        self.len = self.len.saturating_sub(1);
        b
    }
}

/// What a write to the UART did ([`VUart::write`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Written {
    /// A register the guest reads may have changed: the register page must be rewritten.
    pub visible: bool,
    /// A line of output is complete: [`VUart::take_line`] takes it.
    pub line: bool,
}

/// One VM's PL011. Completed lines are taken by the caller, which prints them once the
/// UART's lock is released.
#[derive(Debug)]
pub struct VUart {
    line: LineBuffer,
    rx: RxFifo,
    ris: u32,
    imsc: u32,
    cr: u32,
    lcr_h: u32,
    ibrd: u32,
    fbrd: u32,
    ifls: u32,
    dmacr: u32,
    ilpr: u32,
    /// The interrupt output as last handed to the virtual GIC ([`VUart::irq_change`]).
    reported: bool,
    /// Whether the VM's stage 2 maps the register page ([`super::uart_page`]) at the
    /// UART's IPA. Kept here so that it changes under the UART's lock together with the
    /// receive FIFO it depends on.
    pub page_mapped: bool,
}

impl Default for VUart {
    fn default() -> Self {
        Self::new()
    }
}

impl VUart {
    /// A PL011 in its reset state.
    #[must_use]
    pub const fn new() -> Self {
        Self {
            line: LineBuffer::new(),
            rx: RxFifo::new(),
            ris: 0,
            imsc: 0,
            cr: CR_RESET,
            lcr_h: 0,
            ibrd: 0,
            fbrd: 0,
            ifls: IFLS_RESET,
            dmacr: 0,
            ilpr: 0,
            reported: false,
            page_mapped: false,
        }
    }

    /// Back to the reset state, but for [`Self::page_mapped`]: the register page stays
    /// mapped or not, as the stage 2 has it, until the caller brings it in line
    /// (`crate::vm::Vm::publish_uart`).
    pub fn reset(&mut self) {
        *self = Self {
            page_mapped: self.page_mapped,
            ..Self::new()
        };
    }

    /// Emulates a read of `offset`; returns the value for the guest register.
    pub fn read(&mut self, offset: u64) -> u64 {
        if offset == UARTDR {
            let byte = self.rx.pop().unwrap_or(0);
            self.update_rx();
            return u64::from(byte);
        }
        u64::from(self.peek(offset))
    }

    /// Whether a read may change the model's state: bytes wait in the receive FIFO, so a
    /// read of `UARTDR` takes one.
    #[must_use]
    pub const fn reads_change_state(&self) -> bool {
        !self.rx.is_empty()
    }

    /// The value a read of `offset` returns, without taking a received byte (`UARTDR`
    /// reads as 0 here; with bytes waiting, reads must go through [`Self::read`]).
    #[must_use]
    pub fn peek(&self, offset: u64) -> u32 {
        match offset {
            UARTFR => {
                // TXFF (bit 5) and BUSY (bit 3) are never set: the FIFO drains at once.
                let mut fr = if self.rx.is_empty() { FR_IDLE } else { FR_TXFE };
                if self.rx.len >= RX_FIFO {
                    fr |= FR_RXFF;
                }
                fr as u32
            }
            // No receive errors are ever recorded.
            UARTRSR => 0,
            UARTILPR => self.ilpr,
            UARTIBRD => self.ibrd,
            UARTFBRD => self.fbrd,
            UARTLCR_H => self.lcr_h,
            UARTCR => self.cr,
            UARTIFLS => self.ifls,
            UARTIMSC => self.imsc,
            UARTRIS => self.ris,
            UARTMIS => self.ris & self.imsc,
            UARTDMACR => self.dmacr,
            // The eight ID registers, one byte in each word from `UARTPERIPHID0`.
            o if o % 4 == 0 => o
                .checked_sub(UARTPERIPHID0)
                .and_then(|i| usize::try_from(i / 4).ok())
                .and_then(|i| ID.get(i))
                .map_or(0, |&b| u32::from(b)),
            _ => 0,
        }
    }

    /// Emulates a write of `value` to `offset`. A byte written to `UARTDR` changes what
    /// the guest reads only if it raises the transmit interrupt (a console writes many
    /// bytes before it clears it); any other write counts as a change.
    pub fn write(&mut self, offset: u64, value: u64) -> Written {
        let v = value as u32;
        match offset {
            UARTDR => {
                let visible = self.ris & INT_TX == 0;
                self.ris |= INT_TX;
                return Written {
                    visible,
                    line: self.line.push(value as u8),
                };
            }
            UARTILPR => self.ilpr = v & 0xff,
            UARTIBRD => self.ibrd = v & 0xffff,
            UARTFBRD => self.fbrd = v & 0x3f,
            UARTLCR_H => self.lcr_h = v & 0xff,
            UARTCR => self.cr = v & 0xff87,
            UARTIFLS => self.ifls = v & 0x3f,
            UARTIMSC => self.imsc = v & INT_ALL,
            UARTICR => {
                self.ris &= !(v & INT_ALL);
                // Bytes still waiting keep the receive interrupts raised.
                self.update_rx();
            }
            UARTDMACR => self.dmacr = v & 0x7,
            _ => {}
        }
        Written {
            visible: true,
            line: false,
        }
    }

    /// The interrupt output: any unmasked raw interrupt.
    #[must_use]
    pub const fn irq_level(&self) -> bool {
        self.ris & self.imsc != 0
    }

    /// The interrupt output if it changed since the last call (at reset it is low, as
    /// the virtual GIC's line is): the caller hands only changes to the virtual GIC, so
    /// that the many accesses that leave the line as it was (each transmitted byte, each
    /// flag read) do not take the GIC's lock.
    pub fn irq_change(&mut self) -> Option<bool> {
        let level = self.irq_level();
        (level != self.reported).then(|| {
            self.reported = level;
            level
        })
    }

    /// Receives `bytes` from the console; what does not fit in the receive FIFO is
    /// dropped (as a PL011 does, with an overrun). Returns how many were taken.
    pub fn push_input(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.iter().take_while(|&&b| self.rx.push(b)).count();
        self.update_rx();
        n
    }

    /// Free places in the receive FIFO.
    #[must_use]
    pub fn input_room(&self) -> usize {
        RX_FIFO.saturating_sub(self.rx.len)
    }

    fn update_rx(&mut self) {
        if self.rx.is_empty() {
            self.ris &= !(INT_RX | INT_RT);
        } else {
            self.ris |= INT_RX | INT_RT;
        }
    }

    /// The line written so far, complete (after a [`Written::line`]) or partial (before
    /// the VM powers off), if it is not empty.
    pub fn take_line(&mut self) -> Option<Line> {
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
            if u.write(UARTDR, u64::from(*b) | 0xff00).line {
                out.extend(u.take_line());
            }
        }
        assert!(!u.write(0x24, u64::from(b'\n')).line, "not UARTDR: ignored");
        let out: Vec<&str> = out.iter().map(Line::as_str).collect();
        assert_eq!(out, ["hello", "world?"]);
        u.write(UARTDR, u64::from(b'x'));
        assert_eq!(
            u.take_line().map(|l| l.as_str().to_string()),
            Some("x".into())
        );
    }

    #[test]
    fn flags_and_primecell_ids() {
        let mut u = VUart::new();
        assert_eq!(u.read(UARTFR), 0x90);
        assert_eq!(u.read(UARTDR), 0);
        assert_eq!(u.read(UARTCR), 0x300);
        let ids: Vec<u64> = (0..8).map(|i| u.read(UARTPERIPHID0 + 4 * i)).collect();
        assert_eq!(ids, [0x11, 0x10, 0x34, 0x00, 0x0d, 0xf0, 0x05, 0xb1]);
        assert_eq!(u.read(UARTPERIPHID0 + 1), 0, "only word offsets");
        assert_eq!(u.read(0x800), 0);
    }

    #[test]
    fn control_registers_hold_what_is_written() {
        let mut u = VUart::new();
        for (off, val) in [
            (UARTIBRD, 0x1_0027),
            (UARTFBRD, 0xff),
            (UARTLCR_H, 0x170),
            (UARTCR, 0x1_0301),
            (UARTIFLS, 0x3f),
            (UARTDMACR, 0xf),
        ] {
            u.write(off, val);
        }
        assert_eq!(u.read(UARTIBRD), 0x27);
        assert_eq!(u.read(UARTFBRD), 0x3f);
        assert_eq!(u.read(UARTLCR_H), 0x70);
        assert_eq!(u.read(UARTCR), 0x301);
        assert_eq!(u.read(UARTIFLS), 0x3f);
        assert_eq!(u.read(UARTDMACR), 0x7);
        assert!(!u.write(UARTRIS, 0xff).line);
        assert_eq!(u.read(UARTRIS), 0, "RIS is read-only");
    }

    #[test]
    fn transmit_interrupt_is_raised_by_a_write_masked_and_cleared() {
        let mut u = VUart::new();
        assert!(u.write(UARTDR, u64::from(b'a')).visible, "raises TXRIS");
        assert!(
            !u.write(UARTDR, u64::from(b'a')).visible,
            "TXRIS already raised"
        );
        assert_eq!(u.read(UARTRIS), u64::from(INT_TX));
        assert_eq!(u.read(UARTMIS), 0);
        assert!(!u.irq_level(), "masked");
        u.write(UARTIMSC, u64::from(INT_TX));
        assert!(u.irq_level());
        assert_eq!(u.read(UARTMIS), u64::from(INT_TX));
        u.write(UARTICR, u64::from(INT_TX));
        assert!(!u.irq_level());
        assert_eq!(u.read(UARTRIS), 0);
        assert!(u.write(UARTDR, u64::from(b'b')).visible);
        assert!(u.irq_level(), "the next byte raises it again");
        u.write(UARTIMSC, 0);
        assert!(!u.irq_level());
    }

    #[test]
    fn only_changes_of_the_interrupt_output_are_reported() {
        let mut u = VUart::new();
        assert_eq!(u.irq_change(), None, "low at reset, as the GIC's line");
        u.write(UARTIMSC, u64::from(INT_TX));
        assert_eq!(u.irq_change(), None, "nothing raw yet");
        u.write(UARTDR, u64::from(b'a'));
        assert_eq!(u.irq_change(), Some(true));
        u.write(UARTDR, u64::from(b'b'));
        assert_eq!(u.irq_change(), None, "still high");
        u.write(UARTICR, u64::from(INT_TX));
        assert_eq!(u.irq_change(), Some(false));
        assert_eq!(u.irq_change(), None);
    }

    #[test]
    fn received_bytes_are_read_in_order_with_their_interrupt() {
        let mut u = VUart::new();
        u.write(UARTIMSC, u64::from(INT_RX | INT_RT));
        assert!(!u.irq_level());
        assert_eq!(u.push_input(b"hi"), 2);
        assert!(u.irq_level());
        assert_eq!(u.read(UARTFR) & FR_RXFE, 0);
        // ICR does not clear a receive interrupt while bytes wait.
        u.write(UARTICR, u64::from(INT_RX | INT_RT));
        assert!(u.irq_level());
        assert_eq!(u.read(UARTDR), u64::from(b'h'));
        assert_eq!(u.read(UARTDR), u64::from(b'i'));
        assert!(!u.irq_level());
        assert_eq!(u.read(UARTFR), FR_IDLE);
        let big = [b'x'; RX_FIFO + 5];
        assert_eq!(u.push_input(&big), RX_FIFO);
        assert_ne!(u.read(UARTFR) & FR_RXFF, 0);
        assert_eq!(u.push_input(b"y"), 0, "a full FIFO takes nothing");
        assert_eq!(u.input_room(), 0);
        u.read(UARTDR);
        assert_eq!(u.input_room(), 1);
    }
}

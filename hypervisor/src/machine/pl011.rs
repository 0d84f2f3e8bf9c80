//! Minimal PL011 UART driver (ARM PrimeCell UART PL011 TRM, DDI 0183: UARTDR at 0x000,
//! UARTFR at 0x018 with BUSY = bit 3, RXFE = bit 4, TXFF = bit 5 and TXFE = bit 7,
//! UARTLCR_H at 0x02C with FEN = bit 4, UARTCR at 0x030 with UARTEN = bit 0, UARTIMSC at
//! 0x038 with RXIM = bit 4 and RTIM = bit 6). The baud rate and line settings are left as
//! the firmware (QEMU) set them; the FIFOs are turned on ([`Pl011::enable_fifos`]) so
//! that one look at the flags lets a whole FIFO's worth of bytes go out. The waiting
//! (bounded) is `crate::console::tx`'s. Transmit is the logger's; receive (console input)
//! is the run loop's: the two touch different registers (reading `UARTDR` only pops the
//! receive FIFO).

use crate::console::tx::TxFifo;

const DR: usize = 0x000;
const FR: usize = 0x018;
const FR_BUSY: u32 = 1 << 3;
const FR_RXFE: u32 = 1 << 4;
const FR_TXFF: u32 = 1 << 5;
const FR_TXFE: u32 = 1 << 7;
const LCR_H: usize = 0x02c;
const LCR_H_FEN: u32 = 1 << 4;
const CR: usize = 0x030;
const CR_UARTEN: u32 = 1 << 0;
/// Depth of the transmit FIFO: 16 bytes up to revision r1p4, 32 from r1p5 (TRM, "Revision
/// history"); the smaller is assumed, so a burst never overruns either.
const TX_FIFO_DEPTH: u32 = 16;
/// Polls of `BUSY` before the FIFOs are switched on (the firmware's last byte leaving
/// the shift register); a UART that stays busy is left in character mode.
const IDLE_POLLS: u32 = 100_000;
const IMSC: usize = 0x038;
/// RXIM | RTIM: receive and receive-timeout interrupts.
const IMSC_RX: u32 = (1 << 4) | (1 << 6);

/// A PL011 at a fixed MMIO address.
#[derive(Debug)]
pub struct Pl011 {
    base: usize,
    /// Bytes the transmitter holds when `TXFE` says it is empty: the FIFO's depth, or 1
    /// in character mode (FIFOs off).
    tx_depth: u32,
}

impl Pl011 {
    /// A driver for the UART whose registers are mapped at `base`.
    ///
    /// # Safety
    ///
    /// `base` must be the (identity-)mapped address of a PL011 register block, with
    /// Device memory attributes (or the MMU off), for as long as the driver is used, and
    /// nothing else may program the UART concurrently ([`Self::enable_fifos`] changes its
    /// settings; another driver that only sends and receives bytes beside this one can
    /// interleave or drop bytes, nothing more).
    #[must_use]
    pub const unsafe fn new(base: usize) -> Self {
        Self { base, tx_depth: 1 }
    }

    /// The address of its registers.
    #[must_use]
    pub const fn base(&self) -> usize {
        self.base
    }

    /// Turns the FIFOs on if the firmware left them off, in the order the TRM gives for
    /// changing the line control register: disable the UART, wait (bounded) for the
    /// character in flight, set `UARTLCR_H.FEN`, restore `UARTCR`. Bursts of
    /// [`TX_FIFO_DEPTH`] bytes are used only if `FEN` then reads back set (a UART that
    /// ignores it stays in character mode, one byte per look). Call it before the first
    /// byte goes out; the receive side keeps working (`read_byte` asks `RXFE`, and the
    /// receive-timeout interrupt covers a FIFO below its trigger level).
    pub fn enable_fifos(&mut self) {
        // SAFETY: `new`'s contract makes these valid device registers of a UART nobody
        // else programs.
        unsafe {
            let lcr_h = self.reg(LCR_H) as *mut u32;
            if lcr_h.read_volatile() & LCR_H_FEN == 0 {
                let (cr, fr) = (self.reg(CR) as *mut u32, self.reg(FR) as *const u32);
                let enabled = cr.read_volatile();
                cr.write_volatile(enabled & !CR_UARTEN);
                if (0..IDLE_POLLS).any(|_| fr.read_volatile() & FR_BUSY == 0) {
                    lcr_h.write_volatile(lcr_h.read_volatile() | LCR_H_FEN);
                }
                cr.write_volatile(enabled);
            }
            if lcr_h.read_volatile() & LCR_H_FEN != 0 {
                self.tx_depth = TX_FIFO_DEPTH;
            }
        }
    }
}

impl Pl011 {
    /// The address of register `off` (inside the 4 KiB block at `base`: no wrap).
    const fn reg(&self, off: usize) -> usize {
        self.base.wrapping_add(off)
    }

    /// The next received byte, if any.
    pub fn read_byte(&self) -> Option<u8> {
        // SAFETY: `new`'s contract makes base + FR and base + DR valid device registers;
        // reading DR pops the receive FIFO only, which nothing else reads.
        unsafe {
            if (self.reg(FR) as *const u32).read_volatile() & FR_RXFE != 0 {
                return None;
            }
            Some((self.reg(DR) as *const u32).read_volatile() as u8)
        }
    }

    /// Unmasks (or masks) the receive interrupts.
    pub fn set_rx_interrupt(&self, on: bool) {
        // SAFETY: as `read_byte`; the transmit side never uses interrupts, so IMSC is
        // the receiver's alone.
        unsafe {
            (self.reg(IMSC) as *mut u32).write_volatile(if on { IMSC_RX } else { 0 });
        }
    }
}

impl TxFifo for Pl011 {
    fn room(&self) -> u32 {
        // SAFETY: `new`'s contract makes base + FR a valid device register.
        let fr = unsafe { (self.reg(FR) as *const u32).read_volatile() };
        if fr & FR_TXFE != 0 {
            self.tx_depth
        } else if fr & FR_TXFF != 0 {
            0
        } else {
            1
        }
    }

    fn put(&mut self, byte: u8) {
        // SAFETY: `new`'s contract makes base + DR a valid device register.
        unsafe { (self.reg(DR) as *mut u32).write_volatile(u32::from(byte)) };
    }

    fn idle(&self) -> bool {
        // SAFETY: `new`'s contract makes base + FR a valid device register.
        let fr = unsafe { (self.reg(FR) as *const u32).read_volatile() };
        fr & (FR_TXFE | FR_BUSY) == FR_TXFE
    }
}

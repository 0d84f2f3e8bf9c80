//! Minimal PL011 UART driver (ARM PrimeCell UART PL011 TRM, DDI 0183: UARTDR at 0x000,
//! UARTFR at 0x018 with TXFF = bit 5 and RXFE = bit 4, UARTIMSC at 0x038 with RXIM = bit 4
//! and RTIM = bit 6). The baud rate and line settings are left as the firmware (QEMU) set
//! them. The waiting (bounded) is `crate::console::tx`'s. Transmit is the logger's;
//! receive (console input) is the run loop's: the two touch different registers (reading
//! `UARTDR` only pops the receive FIFO).

use crate::console::tx::TxFifo;

const DR: usize = 0x000;
const FR: usize = 0x018;
const FR_TXFF: u32 = 1 << 5;
const FR_RXFE: u32 = 1 << 4;
const IMSC: usize = 0x038;
/// RXIM | RTIM: receive and receive-timeout interrupts.
const IMSC_RX: u32 = (1 << 4) | (1 << 6);

/// A PL011 at a fixed MMIO address.
#[derive(Debug)]
pub struct Pl011 {
    base: usize,
}

impl Pl011 {
    /// A driver for the UART whose registers are mapped at `base`.
    ///
    /// # Safety
    ///
    /// `base` must be the (identity-)mapped address of a PL011 register block, with
    /// Device memory attributes (or the MMU off), for as long as the driver is used, and
    /// nothing else may program the UART concurrently.
    #[must_use]
    pub const unsafe fn new(base: usize) -> Self {
        Self { base }
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
    fn full(&self) -> bool {
        // SAFETY: `new`'s contract makes base + FR a valid device register.
        unsafe { (self.reg(FR) as *const u32).read_volatile() & FR_TXFF != 0 }
    }

    fn put(&mut self, byte: u8) {
        // SAFETY: `new`'s contract makes base + DR a valid device register.
        unsafe { (self.reg(DR) as *mut u32).write_volatile(u32::from(byte)) };
    }
}

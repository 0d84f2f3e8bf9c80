//! Minimal PL011 UART transmitter (ARM PrimeCell UART PL011 TRM, DDI 0183: UARTDR at
//! 0x000, UARTFR at 0x018 with TXFF = bit 5). The baud rate and line settings are left as
//! the firmware (QEMU) set them. The waiting (bounded) is `crate::console::tx`'s.

use crate::console::tx::TxFifo;

const DR: usize = 0x000;
const FR: usize = 0x018;
const FR_TXFF: u32 = 1 << 5;

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

impl TxFifo for Pl011 {
    fn full(&self) -> bool {
        // SAFETY: `new`'s contract makes base + FR a valid device register.
        unsafe { ((self.base + FR) as *const u32).read_volatile() & FR_TXFF != 0 }
    }

    fn put(&mut self, byte: u8) {
        // SAFETY: `new`'s contract makes base + DR a valid device register.
        unsafe { ((self.base + DR) as *mut u32).write_volatile(u32::from(byte)) };
    }
}

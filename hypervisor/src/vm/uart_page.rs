//! The virtual UART's register page: a read-only page of register values mapped at the
//! UART's IPA while no read can change the UART's state, so the guest's reads (above
//! all the flag register, polled before every byte a console writes) cost no trap.
//!
//! A trapped access to an emulated device costs a stage-2 fault, an exit and a return;
//! a Linux console prints each character with a poll of `UARTFR` and a write of
//! `UARTDR`, so half of a booting kernel's exits were flag reads. Now:
//! - writes always trap (the page is mapped read-only) and are emulated as before; after
//!   each, the page is rewritten with the model's register values ([`VUart::peek`]);
//! - while bytes wait in the receive FIFO a read of `UARTDR` must take one, so the page
//!   is unmapped before the first byte goes in and every access traps; it is mapped
//!   again, rewritten, once a trapped read has emptied the FIFO ([`super::Vm::publish_uart`]);
//! - the page holds nothing but this VM's UART registers (zero elsewhere, as the model
//!   reads): a page of the hypervisor's heap of its own, mapped never executable.
//!
//! The guest's stage 1 normally maps a device page as Device memory, which reads
//! memory without the cache, while EL2 writes the page through its cacheable mapping:
//! each rewrite is cleaned to the point of coherency (`GuestMemory::clean_to_poc`).

use alloc::boxed::Box;
use core::sync::atomic::{AtomicU32, Ordering};

use super::vuart::{VUart, STATE_REGS, UARTPERIPHID0};
use crate::mem::{PhysAddr, PAGE_SIZE};

/// Words in the page.
const WORDS: usize = (PAGE_SIZE / 4) as usize;

/// One page, page-aligned, so that nothing else shares it.
#[repr(C, align(4096))]
struct Words([AtomicU32; WORDS]);

/// A VM's register page (its own heap page).
pub struct UartPage {
    words: Box<Words>,
}

impl core::fmt::Debug for UartPage {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("UartPage").field("va", &self.va()).finish()
    }
}

impl UartPage {
    /// A page with the values of a UART in its reset state.
    #[must_use]
    pub fn new() -> Self {
        let page = Self {
            words: Box::new(Words([const { AtomicU32::new(0) }; WORDS])),
        };
        let reset = VUart::new();
        for offset in (UARTPERIPHID0..PAGE_SIZE).step_by(4) {
            page.set(&reset, offset);
        }
        page.write(&reset);
        page
    }

    fn set(&self, uart: &VUart, offset: u64) {
        if let Some(w) = usize::try_from(offset / 4)
            .ok()
            .and_then(|i| self.words.0.get(i))
        {
            w.store(uart.peek(offset), Ordering::Relaxed);
        }
    }

    /// Rewrites the registers that change with the UART's state from `uart`.
    pub fn write(&self, uart: &VUart) {
        for offset in STATE_REGS {
            self.set(uart, offset);
        }
    }

    /// The page's address at EL2.
    #[must_use]
    pub fn va(&self) -> u64 {
        core::ptr::from_ref::<Words>(&self.words) as u64
    }

    /// The page's physical address: EL2's stage 1 maps the heap at its physical address
    /// (docs/memory-map.md).
    #[must_use]
    pub fn pa(&self) -> PhysAddr {
        PhysAddr::new(self.va())
    }

    /// Bytes from the start of the page that [`Self::write`] changes (to clean them).
    #[must_use]
    pub fn state_len() -> u64 {
        STATE_REGS.iter().max().map_or(0, |&o| o.saturating_add(4))
    }

    /// The word at `offset` (tests: what the guest reads there).
    #[cfg(test)]
    #[must_use]
    pub fn word(&self, offset: u64) -> u32 {
        usize::try_from(offset / 4)
            .ok()
            .and_then(|i| self.words.0.get(i))
            .map_or(0, |w| w.load(Ordering::Relaxed))
    }
}

impl Default for UartPage {
    fn default() -> Self {
        Self::new()
    }
}

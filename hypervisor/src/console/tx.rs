//! A UART transmitter that never hangs the hypervisor: each byte waits a bounded number
//! of polls for room in the transmit FIFO, and once a wait has run out the rest of that
//! write is dropped and counted (a stuck or flow-controlled UART must not stall the CPU
//! that logs, nor every CPU queued behind the console lock). After a timeout the next
//! writes poll only briefly until a byte gets through again.

use core::fmt;

/// A UART's transmit side.
pub trait TxFifo {
    /// The transmit FIFO is full.
    fn full(&self) -> bool;
    /// Puts a byte into the FIFO (only after `full` said there is room).
    fn put(&mut self, byte: u8);
}

/// Polls of a FIFO that is full before a byte is dropped (about 10 ms to 100 ms on the
/// machines we run on: a PL011 at 115200 baud frees a byte every 87 us).
pub const WAIT_POLLS: u32 = 1_000_000;
/// Polls once a wait has timed out, until a byte gets through again.
pub const STALLED_POLLS: u32 = 1_000;

/// [`TxFifo`] with bounded waits, as a `fmt::Write` (`\n` sent as `\r\n`).
#[derive(Debug)]
pub struct BoundedTx<T> {
    fifo: T,
    stalled: bool,
    dropped: u64,
}

impl<T: TxFifo> BoundedTx<T> {
    /// Writes through `fifo`.
    pub const fn new(fifo: T) -> Self {
        Self {
            fifo,
            stalled: false,
            dropped: 0,
        }
    }

    /// Bytes dropped so far.
    #[must_use]
    pub const fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Sends `byte` if the FIFO has room within the poll budget.
    fn send(&mut self, byte: u8) -> bool {
        let polls = if self.stalled {
            STALLED_POLLS
        } else {
            WAIT_POLLS
        };
        for _ in 0..polls {
            if !self.fifo.full() {
                self.fifo.put(byte);
                self.stalled = false;
                return true;
            }
            core::hint::spin_loop();
        }
        self.stalled = true;
        false
    }
}

impl<T: TxFifo> fmt::Write for BoundedTx<T> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let bytes = s.as_bytes();
        for (i, &b) in bytes.iter().enumerate() {
            let sent = (b != b'\n' || self.send(b'\r')) && self.send(b);
            if !sent {
                // The rest of this write is dropped; the caller's line goes on (a log
                // line must not fail the code that logs it).
                let left = bytes.len().saturating_sub(i);
                self.dropped = self.dropped.saturating_add(left as u64);
                return Ok(());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::fmt::Write;

    /// A FIFO that is full for `busy` polls, then takes bytes (or is stuck for good).
    struct Fifo {
        busy: u32,
        stuck: bool,
        polls: core::cell::Cell<u64>,
        out: Vec<u8>,
    }

    impl TxFifo for Fifo {
        fn full(&self) -> bool {
            self.polls.set(self.polls.get() + 1);
            self.stuck || self.polls.get() <= u64::from(self.busy)
        }
        fn put(&mut self, byte: u8) {
            self.out.push(byte);
        }
    }

    fn fifo(busy: u32, stuck: bool) -> BoundedTx<Fifo> {
        BoundedTx::new(Fifo {
            busy,
            stuck,
            polls: core::cell::Cell::new(0),
            out: Vec::new(),
        })
    }

    #[test]
    fn a_slow_fifo_gets_every_byte() {
        let mut tx = fifo(1000, false);
        write!(tx, "a\nb").unwrap();
        assert_eq!(tx.fifo.out, b"a\r\nb");
        assert_eq!(tx.dropped(), 0);
    }

    /// A stuck FIFO costs one full wait, then short ones, and every byte is counted.
    #[test]
    fn a_stuck_fifo_drops_and_counts_instead_of_hanging() {
        let mut tx = fifo(0, true);
        writeln!(tx, "hello").unwrap();
        assert_eq!(tx.dropped(), 6);
        assert_eq!(tx.fifo.polls.get(), u64::from(WAIT_POLLS));
        for _ in 0..100 {
            writeln!(tx, "next line").unwrap();
        }
        assert_eq!(tx.dropped(), 6 + 100 * 10);
        assert_eq!(
            tx.fifo.polls.get(),
            u64::from(WAIT_POLLS) + 100 * u64::from(STALLED_POLLS)
        );
        // It comes back: bytes flow and the full wait applies again.
        tx.fifo.stuck = false;
        write!(tx, "ok").unwrap();
        assert_eq!(tx.fifo.out, b"ok");
        assert!(!tx.stalled);
    }
}

//! A UART transmitter that never hangs the hypervisor: a byte waits a bounded number of
//! polls for room in the transmit FIFO, and once a wait has run out the rest of that
//! write is dropped and counted (a stuck or flow-controlled UART must not stall the CPU
//! that logs, nor every CPU queued behind the console lock). After a timeout the next
//! writes poll only briefly until a byte gets through again. One poll that finds room
//! for several bytes lets that many go without asking again: an empty FIFO takes a whole
//! FIFO's worth (each poll is a device register read; under QEMU, a trap into its
//! device model).

use core::fmt;

/// A UART's transmit side.
pub trait TxFifo {
    /// How many bytes the FIFO takes now without another look: 0 while it is full.
    fn room(&self) -> u32;
    /// Puts a byte into the FIFO (only while the last `room` left some).
    fn put(&mut self, byte: u8);
    /// Whether everything put has left the transmitter. Provided: true.
    fn idle(&self) -> bool {
        true
    }
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
    /// Bytes that may still go before the FIFO is asked again.
    room: u32,
    stalled: bool,
    dropped: u64,
}

impl<T: TxFifo> BoundedTx<T> {
    /// Writes through `fifo`.
    pub const fn new(fifo: T) -> Self {
        Self {
            fifo,
            room: 0,
            stalled: false,
            dropped: 0,
        }
    }

    /// Bytes dropped so far.
    #[must_use]
    pub const fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Waits, a bounded number of polls, until everything put has left the transmitter:
    /// before the machine powers off or exits, so that its last line is not cut.
    pub fn drain(&self) {
        for _ in 0..WAIT_POLLS {
            if self.fifo.idle() {
                return;
            }
            core::hint::spin_loop();
        }
    }

    /// The room the FIFO has, asked up to `polls` times: 0 if it stayed full.
    fn poll(&self, polls: u32) -> u32 {
        for _ in 0..polls {
            let room = self.fifo.room();
            if room > 0 {
                return room;
            }
            core::hint::spin_loop();
        }
        0
    }

    /// Sends `byte` if the FIFO has room within the poll budget.
    fn send(&mut self, byte: u8) -> bool {
        let polls = if self.stalled {
            STALLED_POLLS
        } else {
            WAIT_POLLS
        };
        if self.room == 0 {
            self.room = self.poll(polls);
            if self.room == 0 {
                self.stalled = true;
                return false;
            }
        }
        self.fifo.put(byte);
        self.room = self.room.saturating_sub(1);
        self.stalled = false;
        true
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

    /// A FIFO that is full for `busy` polls, then has room for `depth` bytes at each
    /// poll (or is stuck for good). It panics on a byte put beyond the room it last gave.
    struct Fifo {
        busy: u32,
        depth: u32,
        stuck: bool,
        polls: core::cell::Cell<u64>,
        /// Room left from the last poll.
        left: core::cell::Cell<u32>,
        out: Vec<u8>,
    }

    impl TxFifo for Fifo {
        fn room(&self) -> u32 {
            self.polls.set(self.polls.get() + 1);
            let full = self.stuck || self.polls.get() <= u64::from(self.busy);
            self.left.set(if full { 0 } else { self.depth });
            self.left.get()
        }
        fn put(&mut self, byte: u8) {
            let left = self.left.get().checked_sub(1).expect("FIFO overrun");
            self.left.set(left);
            self.out.push(byte);
        }
    }

    fn fifo_of(depth: u32, busy: u32, stuck: bool) -> BoundedTx<Fifo> {
        BoundedTx::new(Fifo {
            busy,
            depth,
            stuck,
            polls: core::cell::Cell::new(0),
            left: core::cell::Cell::new(0),
            out: Vec::new(),
        })
    }

    fn fifo(busy: u32, stuck: bool) -> BoundedTx<Fifo> {
        fifo_of(1, busy, stuck)
    }

    /// A FIFO found empty takes its depth in bytes before it is asked again, and never
    /// more.
    #[test]
    fn one_poll_sends_a_fifo_worth() {
        let mut tx = fifo_of(16, 0, false);
        let line = "0123456789".repeat(4);
        write!(tx, "{line}").unwrap();
        assert_eq!(tx.fifo.out, line.as_bytes());
        assert_eq!(tx.fifo.polls.get(), 3);
        // A FIFO that only ever has room for one byte is asked before each.
        let mut tx = fifo_of(1, 0, false);
        write!(tx, "{line}").unwrap();
        assert_eq!(tx.fifo.polls.get(), 40);
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

//! Rate limits for console lines: a token bucket per source, so that one VM (its guest
//! printing in a loop, or the hypervisor's lines about the calls it makes) cannot flood
//! the console or stall the CPUs that write it. What is refused is counted and reported
//! with the next line let through (and when the VM ends).
//!
//! Time is passed in (microseconds since boot), so this is tested on the host; the
//! machine supplies the generic timer's count.

/// A token bucket: holds up to `burst` tokens, gains `per_second` tokens a second, and
/// each admitted line costs one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    burst: u32,
    per_second: u32,
    /// Tokens, in millionths (a token per second is one millionth per microsecond).
    micro_tokens: u64,
    /// Time of the last refill; `None` before the first call.
    last_us: Option<u64>,
}

const ONE: u64 = 1_000_000;

impl TokenBucket {
    /// A full bucket of `burst` tokens, refilled at `per_second`.
    #[must_use]
    pub const fn new(burst: u32, per_second: u32) -> Self {
        Self {
            burst,
            per_second,
            // A u32 count of millionths fits in a u64: the product is exact.
            micro_tokens: (burst as u64).saturating_mul(ONE),
            last_us: None,
        }
    }

    /// Takes a token at time `now_us` if there is one. Time that goes backwards (another
    /// CPU's earlier stamp) refills nothing.
    pub fn take(&mut self, now_us: u64) -> bool {
        let elapsed = self.last_us.map_or(0, |last| now_us.saturating_sub(last));
        if self.last_us.is_none_or(|last| now_us > last) {
            self.last_us = Some(now_us);
        }
        let cap = u64::from(self.burst).saturating_mul(ONE);
        self.micro_tokens = self
            .micro_tokens
            .saturating_add(elapsed.saturating_mul(u64::from(self.per_second)))
            .min(cap);
        match self.micro_tokens.checked_sub(ONE) {
            Some(left) => {
                self.micro_tokens = left;
                true
            }
            None => false,
        }
    }
}

/// Whether a line may be printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Print it; `dropped_before` lines were refused since the last one printed (say so
    /// first).
    Emit {
        /// Lines refused before this one.
        dropped_before: u64,
    },
    /// Refused (counted).
    Drop,
}

/// A token bucket with the count of the lines it refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LineLimiter {
    bucket: TokenBucket,
    dropped: u64,
}

impl LineLimiter {
    /// Up to `burst` lines at once, `per_second` lines a second after that.
    #[must_use]
    pub const fn new(burst: u32, per_second: u32) -> Self {
        Self {
            bucket: TokenBucket::new(burst, per_second),
            dropped: 0,
        }
    }

    /// Decides about one line at time `now_us`.
    pub fn admit(&mut self, now_us: u64) -> Admit {
        if self.bucket.take(now_us) {
            let dropped_before = core::mem::take(&mut self.dropped);
            Admit::Emit { dropped_before }
        } else {
            self.dropped = self.dropped.saturating_add(1);
            Admit::Drop
        }
    }

    /// Lines refused since the last one printed, now counted as reported.
    pub fn take_dropped(&mut self) -> u64 {
        core::mem::take(&mut self.dropped)
    }
}

/// The console budget of one VM: what its guest prints (a virtual UART's lines) and what
/// the hypervisor prints about it (memory-sharing calls, injected aborts, vCPU starts,
/// resets) are limited separately, so a flood of one does not silence the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmConsole {
    /// The guest's own lines.
    pub guest: LineLimiter,
    /// The hypervisor's lines about the VM.
    pub events: LineLimiter,
}

impl VmConsole {
    /// Guest lines: a burst of 200, then 50 a second.
    pub const GUEST: (u32, u32) = (200, 50);
    /// Lines about the VM: a burst of 64, then 16 a second.
    pub const EVENTS: (u32, u32) = (64, 16);

    /// Both budgets full.
    #[must_use]
    pub const fn new() -> Self {
        Self {
            guest: LineLimiter::new(Self::GUEST.0, Self::GUEST.1),
            events: LineLimiter::new(Self::EVENTS.0, Self::EVENTS.1),
        }
    }
}

impl Default for VmConsole {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_refill_rate() {
        let mut l = LineLimiter::new(3, 2);
        let t0 = 5_000_000;
        for _ in 0..3 {
            assert_eq!(l.admit(t0), Admit::Emit { dropped_before: 0 });
        }
        assert_eq!(l.admit(t0), Admit::Drop);
        assert_eq!(l.admit(t0 + 100_000), Admit::Drop, "0.2 tokens");
        // Half a second after t0: one token (2 a second).
        assert_eq!(l.admit(t0 + 500_000), Admit::Emit { dropped_before: 2 });
        assert_eq!(l.admit(t0 + 500_001), Admit::Drop);
        // Long idle refills to the burst, not beyond.
        for _ in 0..3 {
            assert!(matches!(l.admit(t0 + 100_000_000), Admit::Emit { .. }));
        }
        assert_eq!(l.admit(t0 + 100_000_000), Admit::Drop);
        assert_eq!(l.take_dropped(), 1);
        assert_eq!(l.take_dropped(), 0);
    }

    #[test]
    fn time_going_backwards_refills_nothing() {
        let mut b = TokenBucket::new(1, 1_000);
        assert!(b.take(10_000_000));
        assert!(!b.take(9_000_000));
        assert!(!b.take(10_000_000));
        assert!(b.take(10_001_000), "1 ms at 1000 a second");
        // Extremes saturate instead of overflowing.
        let mut b = TokenBucket::new(u32::MAX, u32::MAX);
        assert!(b.take(0));
        assert!(b.take(u64::MAX));
    }

    /// 1000 SHARE + RECLAIM pairs in one second print at most the burst and the refill
    /// of that second; every other line is counted.
    #[test]
    fn a_thousand_pairs_in_a_second() {
        let mut c = VmConsole::new();
        let mut shown = 0u64;
        let mut reported = 0u64;
        for i in 0..2000u64 {
            if let Admit::Emit { dropped_before } = c.events.admit(i * 500) {
                shown += 1;
                reported += dropped_before;
            }
        }
        reported += c.events.take_dropped();
        let (burst, rate) = VmConsole::EVENTS;
        assert!(shown <= u64::from(burst + rate), "{shown} lines printed");
        assert_eq!(shown + reported, 2000, "every line printed or counted");
        assert_eq!(
            c.guest,
            VmConsole::new().guest,
            "the guest's budget untouched"
        );
    }
}

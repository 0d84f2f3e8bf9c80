//! Bulk writes of guest RAM (scrubbing a VM's RAM, copying its images in) shared between
//! the CPU that needs them done and CPUs that have nothing else to run.
//!
//! A [`BulkJob`] cuts the range into the window's chunks ([`crate::mem::window::chunks`]:
//! at most 2 MiB, split at 2 MiB boundaries, so each is one window mapping) and hands
//! them out one at a time, only to the CPUs the opener named. The CPU that opens the job
//! calls its helpers, works through chunks itself, then waits until every chunk a helper
//! took is finished; only then does it close the job and return, so when
//! [`BulkJob::run`] returns the whole range is done, whoever did each part. A helper
//! takes chunks only while its own `keep_going` says so, so it can leave between two
//! chunks (for its own vCPU, say); helpers that arrive late find nothing left to take
//! and leave; a helper never has to arrive at all.
//!
//! Only one job is open at a time. A CPU that needs a bulk write while another CPU's job
//! is open does its own alone rather than wait.

use core::sync::atomic::{AtomicU64, Ordering};

use spin::Mutex;

use super::window::chunks;
use super::PhysAddr;

/// One chunk of a job: `[pa, pa + len)`, `offset` bytes from the job's start, to be
/// written as `fill` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece<F> {
    /// What to write (the same for every piece of a job).
    pub fill: F,
    /// First byte.
    pub pa: PhysAddr,
    /// Bytes (at least one).
    pub len: u64,
    /// Bytes from the start of the job to `pa` (for a copy: where in the source).
    pub offset: u64,
}

/// The open job: what is left to hand out, and to whom.
struct Open<F> {
    fill: F,
    /// CPUs (by index, bit `n` for CPU `n`) that may take pieces.
    helpers: u64,
    start: PhysAddr,
    /// Next byte to hand out.
    at: u64,
    /// End of the range (exclusive).
    end: u64,
}

/// A bulk write of guest RAM that several CPUs can work on at once (see the module
/// documentation).
pub struct BulkJob<F> {
    open: Mutex<Option<Open<F>>>,
    /// Bytes of the open job's pieces that are finished.
    done: AtomicU64,
}

impl<F: Copy> Default for BulkJob<F> {
    fn default() -> Self {
        Self::new()
    }
}

impl<F: Copy> BulkJob<F> {
    /// No job open.
    #[must_use]
    pub const fn new() -> Self {
        Self {
            open: Mutex::new(None),
            done: AtomicU64::new(0),
        }
    }

    /// Whether the open job has pieces left that CPU `cpu` may take.
    pub fn has_pieces_for(&self, cpu: usize) -> bool {
        self.open
            .lock()
            .as_ref()
            .is_some_and(|job| job.at < job.end && named(job.helpers, cpu))
    }

    /// Takes the open job's next piece, if any is left for `cpu`.
    fn take(&self, cpu: usize) -> Option<Piece<F>> {
        let mut open = self.open.lock();
        let job = open.as_mut().filter(|job| named(job.helpers, cpu))?;
        let chunk = chunks(job.at, job.end.saturating_sub(job.at)).next()?;
        job.at = job.at.saturating_add(chunk.len);
        Some(Piece {
            fill: job.fill,
            pa: PhysAddr::new(chunk.pa),
            len: chunk.len,
            offset: chunk.pa.saturating_sub(job.start.get()),
        })
    }

    /// A helper's part, on CPU `cpu`: runs `work` on pieces of the open job while
    /// `keep_going` says so (asked before each piece) and pieces are left for `cpu`.
    /// Returns at once if no job is open or `cpu` is not one of its helpers.
    pub fn help(&self, cpu: usize, keep_going: impl Fn() -> bool, mut work: impl FnMut(Piece<F>)) {
        while keep_going() {
            let Some(piece) = self.take(cpu) else { return };
            work(piece);
            // Release: the opener, which reads `done` with Acquire, sees the piece's
            // writes once it sees it counted.
            self.done.fetch_add(piece.len, Ordering::Release);
        }
    }

    /// Writes `[dst, dst + len)` as `fill` says on CPU `cpu`: opens a job over it that
    /// the CPUs in `helpers` (bit `n` for CPU `n`) may take pieces of, calls
    /// `call_helpers` (which should bring them to [`Self::help`]), works on pieces with
    /// `work` itself, and returns once every piece is done, by this CPU or a helper.
    ///
    /// If another job is open, this CPU does the whole range alone with one call of
    /// `work` (and does not call `call_helpers`). `dst + len` must not pass 2^64 (the
    /// range is memory).
    pub fn run(
        &self,
        cpu: usize,
        fill: F,
        (dst, len): (PhysAddr, u64),
        helpers: u64,
        call_helpers: impl FnOnce(),
        mut work: impl FnMut(Piece<F>),
    ) {
        {
            let mut open = self.open.lock();
            if open.is_some() {
                drop(open);
                work(Piece {
                    fill,
                    pa: dst,
                    len,
                    offset: 0,
                });
                return;
            }
            // No piece of an earlier job is outstanding: it was closed only once all its
            // pieces were counted.
            self.done.store(0, Ordering::Relaxed);
            *open = Some(Open {
                fill,
                helpers: helpers | cpu_bit(cpu),
                start: dst,
                at: dst.get(),
                end: dst.get().saturating_add(len),
            });
        }
        call_helpers();
        self.help(cpu, || true, &mut work);
        // Every piece is taken; wait for the helpers' last ones.
        while self.done.load(Ordering::Acquire) < len {
            core::hint::spin_loop();
        }
        *self.open.lock() = None;
    }
}

/// Bit `cpu` of a CPU mask (none for an index past 63).
#[must_use]
pub fn cpu_bit(cpu: usize) -> u64 {
    u32::try_from(cpu)
        .ok()
        .and_then(|c| 1u64.checked_shl(c))
        .unwrap_or(0)
}

/// Whether `mask` names CPU `cpu`.
fn named(mask: u64, cpu: usize) -> bool {
    mask & cpu_bit(cpu) != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::window::CHUNK;
    use core::cell::Cell;
    use std::sync::atomic::AtomicBool;
    use std::sync::{Arc, Barrier, Mutex as StdMutex};
    use std::vec::Vec;

    fn pieces_of(job: &BulkJob<u8>, cpu: usize) -> Vec<Piece<u8>> {
        let mut v = Vec::new();
        job.help(cpu, || true, |p| v.push(p));
        v
    }

    #[test]
    fn pieces_are_window_chunks_that_cover_the_range_once() {
        let job = BulkJob::new();
        let start = PhysAddr::new(0x4810_0800);
        let len = 3 * CHUNK + 0x1234;
        let mut seen = Vec::new();
        job.run(0, 7u8, (start, len), 0, || {}, |p| seen.push(p));
        assert!(!job.has_pieces_for(0));
        let mut at = start.get();
        for p in &seen {
            assert_eq!(p.fill, 7);
            assert_eq!(p.pa.get(), at, "no gap, no overlap");
            assert_eq!(p.offset, at - start.get());
            let chunk_end = (at | (CHUNK - 1)) + 1;
            assert!(
                p.pa.get() + p.len <= chunk_end,
                "{p:?} crosses a 2 MiB boundary"
            );
            at += p.len;
        }
        assert_eq!(at, start.get() + len);
        assert_eq!(seen.len(), 4);
    }

    /// Only the CPUs the opener names take pieces, each only while it wants to; the
    /// opener does the rest.
    #[test]
    fn only_named_helpers_take_pieces_and_stop_when_told() {
        let job = BulkJob::new();
        let by_helper = Cell::new(0);
        let mut by_opener = 0;
        job.run(
            0,
            1u8,
            (PhysAddr::new(0x8000_0000), 6 * CHUNK),
            cpu_bit(1) | cpu_bit(2),
            || {
                assert!(job.has_pieces_for(1) && job.has_pieces_for(2));
                assert!(!job.has_pieces_for(3), "CPU 3 is not named");
                assert!(pieces_of(&job, 3).is_empty(), "CPU 3 is not named");
                // CPU 1 leaves after two pieces (its own vCPU has work, say).
                job.help(
                    1,
                    || by_helper.get() < 2,
                    |_| by_helper.set(by_helper.get() + 1),
                );
            },
            |_| by_opener += 1,
        );
        assert_eq!((by_helper.get(), by_opener), (2, 4));
        assert!(!job.has_pieces_for(1), "closed");
    }

    #[test]
    fn a_second_opener_does_its_range_alone_in_one_piece() {
        let job = Arc::new(BulkJob::new());
        let inner = Arc::clone(&job);
        let mut outer_pieces = 0;
        let mut nested = Vec::new();
        job.run(
            0,
            1u8,
            (PhysAddr::new(0x8000_0000), 2 * CHUNK),
            cpu_bit(1),
            || {
                // While the first job is open, a second run neither waits nor shares.
                inner.run(
                    1,
                    2u8,
                    (PhysAddr::new(0x9000_0000), 5 * CHUNK),
                    u64::MAX,
                    || panic!("helpers called for a job that is not open"),
                    |p| nested.push(p),
                );
            },
            |_| outer_pieces += 1,
        );
        assert_eq!(
            nested,
            [Piece {
                fill: 2,
                pa: PhysAddr::new(0x9000_0000),
                len: 5 * CHUNK,
                offset: 0
            }]
        );
        assert_eq!(outer_pieces, 2);
        assert!(
            pieces_of(&job, 1).is_empty(),
            "closed: nothing left to help with"
        );
    }

    #[test]
    fn without_a_job_helping_does_nothing() {
        let job = BulkJob::<u8>::new();
        assert!(!job.has_pieces_for(1));
        assert!(pieces_of(&job, 1).is_empty());
        assert_eq!(cpu_bit(64), 0, "no CPU past 63 is ever named");
    }

    /// Helpers on other threads write bytes of a shared buffer; `run` must return only
    /// when every byte is written, each exactly once, however the pieces were shared,
    /// and a thread whose CPU is not named never takes a piece.
    #[test]
    fn run_returns_only_when_every_helper_piece_is_done() {
        const HELPERS: usize = 3;
        const OUTSIDER: usize = 7;
        // Small pieces: a range of many 2 MiB chunks, each stood for by one counter.
        let chunks = 64u64;
        let written: Arc<Vec<AtomicU64>> =
            Arc::new((0..chunks).map(|_| AtomicU64::new(0)).collect());
        let by_helpers = Arc::new(StdMutex::new(0u64));
        let named = (1..=HELPERS).fold(0, |m, cpu| m | cpu_bit(cpu));
        for round in 0..20u64 {
            let job = Arc::new(BulkJob::new());
            let start = Arc::new(Barrier::new(HELPERS + 2));
            let stop = Arc::new(AtomicBool::new(false));
            let threads: Vec<_> = (1..=HELPERS)
                .chain([OUTSIDER])
                .map(|cpu| {
                    let (job, start, stop, written, by_helpers) = (
                        Arc::clone(&job),
                        Arc::clone(&start),
                        Arc::clone(&stop),
                        Arc::clone(&written),
                        Arc::clone(&by_helpers),
                    );
                    std::thread::spawn(move || {
                        start.wait();
                        while !stop.load(Ordering::Acquire) {
                            job.help(
                                cpu,
                                || true,
                                |p: Piece<u64>| {
                                    assert_ne!(cpu, OUTSIDER, "a CPU not named took {p:?}");
                                    // A slow helper: the opener must wait for it.
                                    std::thread::sleep(std::time::Duration::from_micros(200));
                                    let i = p.offset / CHUNK;
                                    written[i as usize].fetch_add(p.fill, Ordering::Relaxed);
                                    *by_helpers.lock().unwrap() += 1;
                                },
                            );
                            std::thread::yield_now();
                        }
                    })
                })
                .collect();
            let fill = round + 1;
            job.run(
                0,
                fill,
                (PhysAddr::new(0x4000_0000), chunks * CHUNK),
                named,
                || {
                    start.wait();
                },
                |p| {
                    std::thread::sleep(std::time::Duration::from_micros(50));
                    let i = p.offset / CHUNK;
                    written[i as usize].fetch_add(fill, Ordering::Relaxed);
                },
            );
            // Checked before the helpers stop: nothing may still be in flight.
            let expected: u64 = (1..=fill).sum();
            for (i, w) in written.iter().enumerate() {
                assert_eq!(
                    w.load(Ordering::Relaxed),
                    expected,
                    "round {round}, chunk {i}"
                );
            }
            stop.store(true, Ordering::Release);
            for t in threads {
                t.join().unwrap();
            }
            assert!(!job.has_pieces_for(1));
        }
        // The waiting above was tested only if helpers took part.
        assert!(
            *by_helpers.lock().unwrap() > 0,
            "no helper ever took a piece"
        );
    }
}

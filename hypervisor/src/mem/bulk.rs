//! Bulk writes of guest RAM (scrubbing a VM's RAM, copying its images in) shared between
//! the CPU that needs them done and CPUs that have nothing else to run.
//!
//! A [`BulkJob`] cuts the range into the window's chunks ([`crate::mem::window::chunks`]:
//! at most 2 MiB, split at 2 MiB boundaries, so each is one window mapping) and hands
//! them out one at a time. The CPU that opens the job calls its helpers, works through
//! chunks itself, then waits until every chunk a helper took is finished; only then does
//! it close the job and return, so when [`BulkJob::run`] returns the whole range is done,
//! whoever did each part. Helpers that arrive late find nothing to take (or no job) and
//! leave; a helper never has to arrive at all.
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

/// The open job: what is left to hand out.
struct Open<F> {
    fill: F,
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

    /// Whether a job is open (it may have nothing left to hand out).
    pub fn is_open(&self) -> bool {
        self.open.lock().is_some()
    }

    /// Takes the open job's next piece, if any is left.
    fn take(&self) -> Option<Piece<F>> {
        let mut open = self.open.lock();
        let job = open.as_mut()?;
        let chunk = chunks(job.at, job.end.saturating_sub(job.at)).next()?;
        job.at = job.at.saturating_add(chunk.len);
        Some(Piece {
            fill: job.fill,
            pa: PhysAddr::new(chunk.pa),
            len: chunk.len,
            offset: chunk.pa.saturating_sub(job.start.get()),
        })
    }

    /// A helper's part: runs `work` on pieces of the open job until none is left. Returns
    /// at once if no job is open.
    pub fn help(&self, mut work: impl FnMut(Piece<F>)) {
        while let Some(piece) = self.take() {
            work(piece);
            // Release: the opener, which reads `done` with Acquire, sees the piece's
            // writes once it sees it counted.
            self.done.fetch_add(piece.len, Ordering::Release);
        }
    }

    /// Writes `[dst, dst + len)` as `fill` says: opens a job over it, calls
    /// `call_helpers` (which should bring CPUs to [`Self::help`]), works on pieces with
    /// `work` itself, and returns once every piece is done, by this CPU or a helper.
    ///
    /// If another job is open, this CPU does the whole range alone with one call of
    /// `work` (and does not call `call_helpers`). `dst + len` must not pass 2^64 (the
    /// range is memory).
    pub fn run(
        &self,
        fill: F,
        dst: PhysAddr,
        len: u64,
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
                start: dst,
                at: dst.get(),
                end: dst.get().saturating_add(len),
            });
        }
        call_helpers();
        self.help(&mut work);
        // Every piece is taken; wait for the helpers' last ones.
        while self.done.load(Ordering::Acquire) < len {
            core::hint::spin_loop();
        }
        *self.open.lock() = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::window::CHUNK;
    use std::sync::atomic::AtomicBool;
    use std::sync::{Arc, Barrier, Mutex as StdMutex};
    use std::vec::Vec;

    fn pieces_of(job: &BulkJob<u8>) -> Vec<Piece<u8>> {
        let mut v = Vec::new();
        job.help(|p| v.push(p));
        v
    }

    #[test]
    fn pieces_are_window_chunks_that_cover_the_range_once() {
        let job = BulkJob::new();
        let start = PhysAddr::new(0x4810_0800);
        let len = 3 * CHUNK + 0x1234;
        let mut seen = Vec::new();
        job.run(7u8, start, len, || {}, |p| seen.push(p));
        assert!(!job.is_open());
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

    #[test]
    fn a_second_opener_does_its_range_alone_in_one_piece() {
        let job = Arc::new(BulkJob::new());
        let inner = Arc::clone(&job);
        let mut outer_pieces = 0;
        let mut nested = Vec::new();
        job.run(
            1u8,
            PhysAddr::new(0x8000_0000),
            2 * CHUNK,
            || {
                // While the first job is open, a second run neither waits nor shares.
                inner.run(
                    2u8,
                    PhysAddr::new(0x9000_0000),
                    5 * CHUNK,
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
            pieces_of(&job).is_empty(),
            "closed: nothing left to help with"
        );
    }

    #[test]
    fn without_a_job_helping_does_nothing() {
        let job = BulkJob::<u8>::new();
        assert!(!job.is_open());
        assert!(pieces_of(&job).is_empty());
    }

    /// Helpers on other threads write bytes of a shared buffer; `run` must return only
    /// when every byte is written, each exactly once, however the pieces were shared.
    #[test]
    fn run_returns_only_when_every_helper_piece_is_done() {
        const HELPERS: usize = 3;
        // Small pieces: a range of many 2 MiB chunks, each stood for by one counter.
        let chunks = 64u64;
        let written: Arc<Vec<AtomicU64>> =
            Arc::new((0..chunks).map(|_| AtomicU64::new(0)).collect());
        let by_helpers = Arc::new(StdMutex::new(0u64));
        for round in 0..20u64 {
            let job = Arc::new(BulkJob::new());
            let start = Arc::new(Barrier::new(HELPERS + 1));
            let stop = Arc::new(AtomicBool::new(false));
            let threads: Vec<_> = (0..HELPERS)
                .map(|_| {
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
                            job.help(|p: Piece<u64>| {
                                // A slow helper: the opener must wait for it.
                                std::thread::sleep(std::time::Duration::from_micros(200));
                                let i = p.offset / CHUNK;
                                written[i as usize].fetch_add(p.fill, Ordering::Relaxed);
                                *by_helpers.lock().unwrap() += 1;
                            });
                            std::thread::yield_now();
                        }
                    })
                })
                .collect();
            let fill = round + 1;
            job.run(
                fill,
                PhysAddr::new(0x4000_0000),
                chunks * CHUNK,
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
            assert!(!job.is_open());
        }
        // The waiting above was tested only if helpers took part.
        assert!(
            *by_helpers.lock().unwrap() > 0,
            "no helper ever took a piece"
        );
    }
}

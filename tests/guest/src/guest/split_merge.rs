//! The split/merge-under-load check (`arg` bit 5): VM 0's vCPU 0 `SHARE`s one page of
//! its RAM with VM 1 and `RECLAIM`s it, [`ITERATIONS`] times, while its vCPU 1 keeps
//! writing and reading back words all over [`BUFFER`], in the same 2 MiB RAM block.
//!
//! With the VM's stage 2 in blocks (`stage2-mappings = "blocks"`, `docs/vms.md`) each
//! `SHARE` splits the block and each `RECLAIM` merges it back, both with
//! break-before-make on the live stage 2: vCPU 1 can take a stage-2 translation fault in
//! the window, which the hypervisor must retry, not treat as an abort (the VM description
//! uses `abort-policy = "stop"`, so a mishandled fault stops the VM). vCPU 1 checks every
//! word it reads: a wrong value is a `FAIL`. VM 1 only has to run (a `SHARE` needs a
//! receiver): it waits until the owner shares two pages, which marks the end, retrieves
//! them, which tells the owner it may end, and waits until the owner has ended (the
//! hypervisor revokes the pages and ends the handle as the owner ends).

use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering};

use super::sharing::{query, reclaim, retrieve, share, wait_for, ShareError, State};
use super::sharing::{PAGE, READ, WAIT_SECONDS, WINDOW, WRITE};
use super::{check, counter, hvc, Uart, PSCI_AFFINITY_INFO, PSCI_CPU_ON, RAM, VM_INFO};

/// The `CPU_ON` context that makes vCPU 1 run [`load`] (x0 of its entry).
pub const LOAD_CONTEXT: u64 = 2;
/// How many `SHARE`/`RECLAIM` pairs vCPU 0 makes.
const ITERATIONS: u64 = 250;
/// The page vCPU 0 shares: the second-to-last page of its RAM (`docs/memory-map.md`).
const SHARED: u64 = RAM.0 + RAM.1 - 2 * PAGE;
/// What vCPU 1 writes and reads: the upper half of RAM up to [`SHARED`], which no other
/// part of this check uses (the image, `.bss` and the stacks lie in the first MiB).
const BUFFER: (u64, u64) = (RAM.0 + 0x10_0000, SHARED - (RAM.0 + 0x10_0000));
/// Distance between the words vCPU 1 uses: 8 per page, on every page of [`BUFFER`].
const STRIDE: u64 = 512;
const SLOTS: u64 = BUFFER.1 / STRIDE;
/// How often (in words) vCPU 1 publishes its count and looks at the stop flag.
const PUBLISH_EVERY: u64 = 64;
/// After each pair, vCPU 0 waits up to 1/this of a second for vCPU 1 to publish progress.
const PROGRESS_WAIT_DIVISOR: u64 = 20;

/// Set by vCPU 0 when vCPU 1 must stop.
static STOP: AtomicU64 = AtomicU64::new(0);
/// Set by vCPU 1 once it has stopped and published its results.
static STOPPED: AtomicU64 = AtomicU64::new(0);
/// vCPU 1's accesses (loads and stores) and complete passes over [`BUFFER`].
static ACCESSES: AtomicU64 = AtomicU64::new(0);
static ROUNDS: AtomicU64 = AtomicU64::new(0);
/// The first wrong word vCPU 1 read: address (0: none), value, expected value.
static BAD: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];

/// What vCPU 1 writes into slot `slot` in pass `round`.
fn value(round: u64, slot: u64) -> u64 {
    0x4c4f_4144_0000_0000 ^ (slot << 32) ^ round
}

/// vCPU 1's work: in each pass, for each slot, checks the word still holds what the last
/// pass wrote (from the second pass on), writes this pass's value and reads it back.
/// Stops at the first wrong value or when vCPU 0 sets [`STOP`].
pub fn load() {
    let mut accesses = 0u64;
    let mut round = 0u64;
    'passes: loop {
        for slot in 0..SLOTS {
            let p = (BUFFER.0 + slot * STRIDE) as *mut u64;
            // SAFETY: `p` is an aligned word of BUFFER: RAM that the stage 1 maps read/write,
            // that the owner never shares, and that only this vCPU uses during the check.
            let old = unsafe { p.read_volatile() };
            let mut bad = (round > 0 && old != value(round - 1, slot))
                .then_some((old, value(round.wrapping_sub(1), slot)));
            if bad.is_none() {
                // SAFETY: as above.
                let back = unsafe {
                    p.write_volatile(value(round, slot));
                    p.read_volatile()
                };
                bad = (back != value(round, slot)).then_some((back, value(round, slot)));
            }
            if let Some((got, want)) = bad {
                BAD[1].store(got, Ordering::Relaxed);
                BAD[2].store(want, Ordering::Relaxed);
                BAD[0].store(p as u64, Ordering::Relaxed);
                break 'passes;
            }
            accesses += 3;
            if slot % PUBLISH_EVERY == 0 {
                ACCESSES.store(accesses, Ordering::Relaxed);
                if STOP.load(Ordering::Acquire) != 0 {
                    break 'passes;
                }
            }
        }
        round += 1;
        ROUNDS.store(round, Ordering::Relaxed);
    }
    ACCESSES.store(accesses, Ordering::Relaxed);
    STOPPED.store(1, Ordering::Release);
}

/// Runs the role of this VM: VM 0 splits and merges under load, VM 1 receives.
pub fn split_merge_check() {
    match hvc(VM_INFO, &[])[1] {
        0 => owner(),
        1 => receiver(),
        id => check(
            "split-merge-role",
            false,
            format_args!("VM id {id} has no role"),
        ),
    }
}

fn owner() {
    extern "C" {
        fn secondary_start();
    }
    let entry = secondary_start as *const () as u64;
    let r = hvc(PSCI_CPU_ON, &[1, entry, LOAD_CONTEXT])[0];
    check(
        "split-merge-cpu-on",
        r == 0,
        format_args!("returned {r:#x}"),
    );
    if r != 0 {
        return;
    }
    // One whole pass first, so that vCPU 1 is running and every slot holds a value.
    let started = wait_for(|| (ROUNDS.load(Ordering::Relaxed) > 0).then_some(())).is_some();
    check(
        "split-merge-load-started",
        started,
        format_args!("vCPU 1 made no pass in {WAIT_SECONDS} s"),
    );
    if !started {
        return;
    }
    let before = ACCESSES.load(Ordering::Relaxed);
    let (freq, t0) = counter();
    let mut failed: Option<(u64, &str, ShareError)> = None;
    let mut pairs = 0;
    for i in 0..ITERATIONS {
        let h = match share(SHARED, 1, 1, READ | WRITE) {
            Ok(h) => h,
            Err(e) => {
                failed = Some((i, "SHARE", e));
                break;
            }
        };
        if let Err(e) = reclaim(h) {
            failed = Some((i, "RECLAIM", e));
            break;
        }
        pairs += 1;
        // Let vCPU 1 publish progress before the next pair, so that the pairs interleave
        // with its accesses even when the host runs its thread rarely (a loaded machine);
        // a vCPU 1 that never runs still fails the concurrency check below.
        let seen = ACCESSES.load(Ordering::Relaxed);
        let (freq, t) = counter();
        while ACCESSES.load(Ordering::Relaxed) == seen
            && counter().1.wrapping_sub(t) < freq / PROGRESS_WAIT_DIVISOR
        {
            core::hint::spin_loop();
        }
    }
    let ms = (counter().1 - t0) * 1000 / freq;
    let during = ACCESSES.load(Ordering::Relaxed) - before;
    STOP.store(1, Ordering::Release);
    let stopped = wait_for(|| (STOPPED.load(Ordering::Acquire) != 0).then_some(())).is_some();
    check(
        "split-merge-share-reclaim",
        pairs == ITERATIONS,
        format_args!("{pairs} of {ITERATIONS} pairs, then {failed:x?}"),
    );
    check(
        "split-merge-load-stopped",
        stopped,
        format_args!("vCPU 1 did not stop in {WAIT_SECONDS} s"),
    );
    let bad = [0, 1, 2].map(|i| BAD[i].load(Ordering::Relaxed));
    check(
        "split-merge-load-values",
        stopped && bad[0] == 0,
        format_args!(
            "word at {:#x} read {:#x}, expected {:#x}",
            bad[0], bad[1], bad[2]
        ),
    );
    // vCPU 1 ran during the pairs: at least one access per pair on average.
    check(
        "split-merge-load-concurrent",
        during >= ITERATIONS,
        format_args!("{during} accesses during {ITERATIONS} pairs"),
    );
    println!(
        "split-merge: {pairs} SHARE/RECLAIM pairs in {ms} ms; vCPU 1: {} accesses in {} passes, {during} during the pairs",
        ACCESSES.load(Ordering::Relaxed),
        ROUNDS.load(Ordering::Relaxed)
    );
    // vCPU 1 turns itself off after `load` (guest_main).
    let off = wait_for(|| (hvc(PSCI_AFFINITY_INFO, &[1, 0])[0] == 1).then_some(())).is_some();
    check(
        "split-merge-load-off",
        off,
        format_args!("vCPU 1 still on after {WAIT_SECONDS} s"),
    );
    // The end mark for VM 1: a two-page share, left in place (revoked as this VM ends).
    let mark = share(SHARED, 2, 1, READ | WRITE);
    check(
        "split-merge-end-mark",
        mark.is_ok(),
        format_args!("{mark:x?}"),
    );
    let Ok(mark) = mark else {
        return;
    };
    let retrieved = wait_for(|| {
        query(mark)
            .is_ok_and(|t| t.state == State::Retrieved)
            .then_some(())
    });
    check(
        "split-merge-end-retrieved",
        retrieved.is_some(),
        format_args!("not retrieved in {WAIT_SECONDS} s: {:x?}", query(mark)),
    );
}

/// Waits (polling `QUERY` once a millisecond) for the owner's two-page end mark and
/// retrieves it (it never touches the pages: its stage 1 does not map them).
fn receiver() {
    let seen = wait_for(|| {
        let (freq, t0) = counter();
        while counter().1.wrapping_sub(t0) < freq / 1000 {}
        query(0).ok().filter(|t| t.pages == 2)
    });
    check(
        "split-merge-end-seen",
        seen.is_some(),
        format_args!("no two-page share in {WAIT_SECONDS} s"),
    );
    let Some(t) = seen else {
        return;
    };
    let r = retrieve(t.handle, WINDOW.0, READ);
    check(
        "split-merge-end-retrieve",
        r.is_ok(),
        format_args!("{r:x?}"),
    );
    // Stays until the owner has seen the retrieve and ended (which ends the handle), so
    // that the owner finds it retrieved rather than pending again as this VM ends.
    let ended = wait_for(|| (query(t.handle) == Err(ShareError::InvalidParameters)).then_some(()));
    check(
        "split-merge-owner-ended",
        ended.is_some(),
        format_args!("QUERY {:x?}", query(t.handle)),
    );
}

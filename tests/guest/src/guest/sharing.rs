//! The two-VM memory-sharing scenario (`arg` bit 4): typed wrappers of the sharing
//! hypercalls of `docs/hypercalls.md` ("Memory sharing between VMs") and the two roles.
//!
//! VM 0 (the owner) shares page [`P1`] read/write and lends page [`P2`] read-only to
//! VM 1 (the receiver), which retrieves them at [`WINDOW`]. The two VMs run at the same
//! time on two CPUs and take turns through flag words in `P1` (release/acquire) and the
//! `QUERY` state of each handle; every wait is bounded by [`WAIT_SECONDS`] and reports a
//! `FAIL` line when it runs out, so a broken hypervisor cannot make the guest hang.
//!
//! Turns, after the owner's bad-input checks:
//! 1. owner: `SHARE` `P1`, `LEND` `P2`; checks the lent page aborts for itself;
//! 2. receiver: finds both with `QUERY(0)`, `RETRIEVE`s them, reads both patterns,
//!    writes its reply into `P1` and sets [`FLAG_ACK`];
//! 3. owner: sees both retrieved, `RECLAIM` is refused, sets [`FLAG_GO`];
//! 4. receiver: `RELINQUISH`es both; the old IPAs abort; waits for both handles to end;
//! 5. owner: sees both pending again, `RECLAIM`s them, finds the reply, then `SHARE`s
//!    `P1`..`P2` together (2 pages);
//! 6. receiver: retrieves the pair, reads it, sets [`FLAG_BYE`], relinquishes;
//! 7. owner: reclaims the pair, shares `P1` once more;
//! 8. receiver: retrieves it, reads it, sets [`FLAG_HELD`];
//! 9. owner: powers off without reclaiming it, so the hypervisor revokes it as the owner
//!    ends; the receiver sees the handle end and its next access to the page abort.

use core::arch::asm;
use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering};

use super::{
    check, counter, hvc, mean_ns, Uart, ABORT_ESR, ABORT_FAR, EXPECT_ABORT, NOT_SUPPORTED, RAM,
    VM_INFO,
};

const MEM_SHARE: u32 = 0xC600_0010;
const MEM_LEND: u32 = 0xC600_0011;
const MEM_RETRIEVE: u32 = 0xC600_0012;
const MEM_RELINQUISH: u32 = 0xC600_0013;
const MEM_RECLAIM: u32 = 0xC600_0014;
const MEM_QUERY: u32 = 0xC600_0015;
/// Reserved for FF-A's `DONATE`, which the hypervisor does not offer.
const MEM_DONATE: u32 = 0xC600_0016;
/// The first function number after the sharing calls: unassigned.
const MEM_UNASSIGNED: u32 = 0xC600_0017;
/// Function ID bit 30: the SMC64 calling convention (SMCCC 1.1, 2.5).
const SMC64: u32 = 1 << 30;
/// Vendor-specific hypervisor service call count.
const CALL_COUNT: u32 = 0x8600_FF00;
/// Vendor calls of `docs/hypercalls.md` (three VM queries and six sharing calls).
const VENDOR_CALLS: u64 = 9;

pub(super) const PAGE: u64 = 4096;
/// The owner's shared page: the second-to-last page of its RAM (above everything else
/// the guest writes, `docs/memory-map.md`).
const P1: u64 = RAM.0 + RAM.1 - 2 * PAGE;
/// The owner's lent page, right after [`P1`].
const P2: u64 = P1 + PAGE;
/// Where the receiver retrieves the pages: two free IPAs outside its RAM that its own
/// stage 1 maps (`docs/memory-map.md`).
pub const WINDOW: (u64, u64) = (0x6000_0000, 2 * PAGE);

/// Permission bits of the sharing calls.
pub(super) const READ: u64 = 1 << 0;
pub(super) const WRITE: u64 = 1 << 1;
const EXEC: u64 = 1 << 2;

/// Words of `P1` the owner fills with its pattern, and those the receiver replies in.
const OWNER_WORDS: core::ops::Range<usize> = 0..256;
const REPLY_WORDS: core::ops::Range<usize> = 256..384;
/// Flag words of `P1`: set by the receiver once it has retrieved and read both pages,
/// by the owner once it has checked that it cannot reclaim them, and by the receiver once
/// it has read the two-page share.
const FLAG_ACK: usize = 508;
const FLAG_GO: usize = 509;
const FLAG_BYE: usize = 510;
/// Set by the receiver once it holds the page the owner leaves shared when it ends.
const FLAG_HELD: usize = 511;
const ACK: u64 = 0x4143_4b21_0000_0001;
const GO: u64 = 0x474f_2121_0000_0002;
const BYE: u64 = 0x4259_4521_0000_0003;
const HELD: u64 = 0x4845_4c44_0000_0004;

/// How many `QUERY` calls the owner times (information, not a check), while the
/// receiver waits for [`FLAG_GO`].
const QUERY_CALLS: u64 = 1000;
/// Upper bound of every wait for the other VM.
pub(super) const WAIT_SECONDS: u64 = 30;

fn owner_word(i: usize) -> u64 {
    0x5348_4152_0000_0000 | i as u64
}

fn reply_word(i: usize) -> u64 {
    0x5245_504c_0000_0000 | i as u64
}

fn lent_word(i: usize) -> u64 {
    0x4c45_4e44_0000_0000 | i as u64
}

/// An error a sharing call returned (`docs/hypercalls.md`, "Errors").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ShareError {
    NotSupported,
    InvalidParameters,
    NoMemory,
    Busy,
    Denied,
    NoData,
    /// Any other negative x0.
    Other(i64),
    /// Registers the ABI does not allow: an error code with x1-x3 not all zero, or a
    /// `QUERY` answer with an undefined kind or state.
    Malformed([u64; 4]),
}

impl ShareError {
    fn from_regs(r: [u64; 4]) -> Self {
        if r[1..] != [0, 0, 0] {
            return Self::Malformed(r);
        }
        match r[0] as i64 {
            -1 => Self::NotSupported,
            -2 => Self::InvalidParameters,
            -3 => Self::NoMemory,
            -4 => Self::Busy,
            -6 => Self::Denied,
            -9 => Self::NoData,
            e => Self::Other(e),
        }
    }
}

pub(super) type ShareResult<T> = Result<T, ShareError>;

/// Kind of a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Share,
    Lend,
}

/// State of a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum State {
    Pending,
    Retrieved,
}

/// What `QUERY` reports about a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Transaction {
    pub(super) handle: u64,
    owner: u64,
    receiver: u64,
    perms: u64,
    kind: Kind,
    pub(super) state: State,
    pub(super) pages: u64,
}

/// What `QUERY` says about the owner's share of `P1` (handle 0: any) before it is
/// retrieved.
const SHARE_P1: Transaction = Transaction {
    handle: 0,
    owner: 0,
    receiver: 1,
    perms: READ | WRITE,
    kind: Kind::Share,
    state: State::Pending,
    pages: 1,
};

/// Calls `fid`: x0 = 0 gives `Ok` with the registers, a negative x0 an error.
fn call(fid: u32, args: &[u64]) -> ShareResult<[u64; 4]> {
    let r = hvc(fid, args);
    if r[0] == 0 {
        Ok(r)
    } else {
        Err(ShareError::from_regs(r))
    }
}

/// `SHARE` (`lend` false) or `LEND`: the handle.
fn give(lend: bool, ipa: u64, pages: u64, receiver: u64, perms: u64) -> ShareResult<u64> {
    let fid = if lend { MEM_LEND } else { MEM_SHARE };
    call(fid, &[ipa, pages, receiver, perms]).map(|r| r[1])
}

pub(super) fn share(ipa: u64, pages: u64, receiver: u64, perms: u64) -> ShareResult<u64> {
    give(false, ipa, pages, receiver, perms)
}

fn lend(ipa: u64, pages: u64, receiver: u64, perms: u64) -> ShareResult<u64> {
    give(true, ipa, pages, receiver, perms)
}

pub(super) fn retrieve(handle: u64, ipa: u64, perms: u64) -> ShareResult<()> {
    call(MEM_RETRIEVE, &[handle, ipa, perms]).map(|_| ())
}

fn relinquish(handle: u64) -> ShareResult<()> {
    call(MEM_RELINQUISH, &[handle]).map(|_| ())
}

pub(super) fn reclaim(handle: u64) -> ShareResult<()> {
    call(MEM_RECLAIM, &[handle]).map(|_| ())
}

/// VM id of the owner in the two-VM scenarios (`TWOSTAGE_VM_INFO`: VM 0 owns).
pub(super) const OWNER_VM: u64 = 0;

/// `QUERY`: `handle` 0 asks for the oldest pending transaction addressed to the caller by
/// [`OWNER_VM`].
pub(super) fn query(handle: u64) -> ShareResult<Transaction> {
    query_from(handle, OWNER_VM)
}

/// `QUERY` with x2 = `owner` (what handle 0 looks for).
pub(super) fn query_from(handle: u64, owner: u64) -> ShareResult<Transaction> {
    let r = call(MEM_QUERY, &[handle, owner])?;
    let kind = match (r[2] >> 40) & 0xff {
        0 => Kind::Share,
        1 => Kind::Lend,
        _ => return Err(ShareError::Malformed(r)),
    };
    let state = match (r[2] >> 48) & 0xff {
        0 => State::Pending,
        1 => State::Retrieved,
        _ => return Err(ShareError::Malformed(r)),
    };
    if r[2] >> 56 != 0 {
        return Err(ShareError::Malformed(r));
    }
    Ok(Transaction {
        handle: r[1],
        owner: r[2] & 0xffff,
        receiver: (r[2] >> 16) & 0xffff,
        perms: (r[2] >> 32) & 0xff,
        kind,
        state,
        pages: r[3],
    })
}

/// Calls `f` until it returns `Some`, for at most [`WAIT_SECONDS`]; `None` on timeout.
pub(super) fn wait_for<T>(mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let (freq, start) = counter();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if counter().1.wrapping_sub(start) > freq * WAIT_SECONDS {
            return None;
        }
        core::hint::spin_loop();
    }
}

/// Word `i` of the page at `page`, as an atomic (the flag words are shared between CPUs).
///
/// # Safety
///
/// `page` must be mapped, writable if the word is stored to, and stay so while the
/// reference is used; `i` < 512.
unsafe fn word<'a>(page: u64, i: usize) -> &'a AtomicU64 {
    // SAFETY: the caller guarantees the page is mapped; AtomicU64 has the alignment and
    // size of u64 and the word is 8-byte aligned inside a page.
    unsafe { &*((page + 8 * i as u64) as *const AtomicU64) }
}

/// The first word `i` in `range` of `page` that does not hold `expected(i)`, if any.
///
/// # Safety
///
/// As for [`word`].
unsafe fn mismatch(
    page: u64,
    range: core::ops::Range<usize>,
    expected: fn(usize) -> u64,
) -> Option<(usize, u64)> {
    range
        .map(|i| {
            // SAFETY: delegated to the caller.
            (i, unsafe { word(page, i) }.load(Ordering::Acquire))
        })
        .find(|&(i, v)| v != expected(i))
}

/// Fills `range` of `page` with `value(i)`.
///
/// # Safety
///
/// As for [`word`], writable.
unsafe fn fill(page: u64, range: core::ops::Range<usize>, value: fn(usize) -> u64) {
    for i in range {
        // SAFETY: delegated to the caller.
        unsafe { word(page, i) }.store(value(i), Ordering::Relaxed);
    }
}

/// Waits until flag word `flag` of `page` holds `value`, and checks that it came in
/// time; whether it did.
fn check_flag(name: &str, page: u64, flag: usize, value: u64) -> bool {
    // SAFETY: `page` is mapped for the duration of the wait (P1 for the owner, the
    // retrieved window for the receiver, checked by the callers).
    let set =
        wait_for(|| (unsafe { word(page, flag) }.load(Ordering::Acquire) == value).then_some(()))
            .is_some();
    check(
        name,
        set,
        format_args!("flag word {flag} not {value:#x} within {WAIT_SECONDS} s"),
    );
    set
}

/// Sets flag word `flag` of `page` (after every earlier store of this CPU).
///
/// # Safety
///
/// As for [`word`], writable.
unsafe fn set_flag(page: u64, flag: usize, value: u64) {
    // SAFETY: delegated to the caller.
    unsafe { word(page, flag) }.store(value, Ordering::Release);
}

/// The abort one load (`write` false) or store at `va` took, as (ESR_EL1, FAR_EL1), or
/// `None` if the access completed.
fn access_aborts(va: u64, write: bool) -> Option<(u64, u64)> {
    ABORT_ESR.store(0, Ordering::SeqCst);
    ABORT_FAR.store(0, Ordering::SeqCst);
    EXPECT_ABORT.store(1, Ordering::SeqCst);
    // SAFETY: one deliberate access to a page the guest's stage 1 maps and its stage 2
    // may not (or not writable): it either completes, or the hypervisor injects an abort
    // that the vector records and skips (the faulting instruction is exactly this one
    // load or store, 4 bytes long). A store only writes a page the scenario owns or
    // borrowed read-only.
    unsafe {
        if write {
            asm!("str {v}, [{a}]", a = in(reg) va, v = in(reg) 0x5752_4954_4500_0000u64,
                 options(nostack));
        } else {
            asm!("ldr {v}, [{a}]", a = in(reg) va, v = out(reg) _, options(nostack));
        }
    }
    let aborted = EXPECT_ABORT.swap(0, Ordering::SeqCst) == 0;
    aborted.then(|| {
        (
            ABORT_ESR.load(Ordering::SeqCst),
            ABORT_FAR.load(Ordering::SeqCst),
        )
    })
}

/// Checks that an access at `va` takes the injected data abort (EC 0x25, DFSC 0x10, WnR
/// as the access, `FAR_EL1` = `va`).
fn check_aborts(name: &str, va: u64, write: bool) {
    let got = access_aborts(va, write);
    let ok = got.is_some_and(|(esr, far)| {
        esr >> 26 == 0x25 && esr & 0x3f == 0x10 && (esr >> 6) & 1 == u64::from(write) && far == va
    });
    check(name, ok, format_args!("abort (ESR_EL1, FAR_EL1) {got:x?}"));
}

/// Checks that a call failed with exactly `expected` (and x1-x3 zero).
fn check_err<T: core::fmt::Debug>(name: &str, got: ShareResult<T>, expected: ShareError) {
    check(
        name,
        matches!(got, Err(e) if e == expected),
        format_args!("returned {got:x?}, expected {expected:?}"),
    );
}

/// Runs the role of this VM: VM 0 owns, VM 1 receives; other VMs only report.
pub fn sharing_check() {
    let info = hvc(VM_INFO, &[]);
    println!("sharing: vm {}", info[1]);
    match info[1] {
        0 => owner(),
        1 => receiver(),
        id => check(
            "sharing-role",
            false,
            format_args!("VM id {id} has no role"),
        ),
    }
}

/// The owner's checks of input the calls must refuse: each with its documented error,
/// x1-x3 zero. `P1` stays owned: the scenario shares it afterwards.
fn bad_input() {
    use ShareError::{Denied, InvalidParameters, NoData};
    let count = hvc(CALL_COUNT, &[])[0];
    check(
        "share-call-count",
        count == VENDOR_CALLS,
        format_args!("{count}"),
    );
    let rw = READ | WRITE;
    check_err(
        "share-unaligned",
        share(P1 + 8, 1, 1, rw),
        InvalidParameters,
    );
    check_err(
        "lend-unaligned",
        lend(P1 + PAGE / 2, 1, 1, READ),
        InvalidParameters,
    );
    check_err("share-count-zero", share(P1, 0, 1, rw), InvalidParameters);
    check_err(
        "share-count-huge",
        share(P1, 65_537, 1, rw),
        InvalidParameters,
    );
    // 65,536 pages is a valid count; most of them are not this VM's RAM.
    check_err(
        "share-count-max-not-owned",
        share(P1, 65_536, 1, rw),
        Denied,
    );
    check_err("share-outside-ram", share(WINDOW.0, 1, 1, rw), Denied);
    check_err("share-vuart", share(super::UART, 1, 1, rw), Denied);
    check_err("share-below-ram", share(RAM.0 - PAGE, 2, 1, rw), Denied);
    check_err(
        "share-ipa-overflow",
        share(!(PAGE - 1), 2, 1, rw),
        InvalidParameters,
    );
    check_err(
        "share-beyond-ipa-space",
        share((1 << 39) - PAGE, 2, 1, rw),
        InvalidParameters,
    );
    check_err("share-to-itself", share(P1, 1, 0, rw), InvalidParameters);
    check_err("share-unknown-vm", share(P1, 1, 2, rw), InvalidParameters);
    check_err(
        "lend-unknown-vm",
        lend(P1, 1, 1 << 16, READ),
        InvalidParameters,
    );
    check_err(
        "share-undefined-perm",
        share(P1, 1, 1, READ | 1 << 3),
        InvalidParameters,
    );
    check_err(
        "share-perm-bit-63",
        share(P1, 1, 1, READ | 1 << 63),
        InvalidParameters,
    );
    check_err(
        "share-write-only",
        share(P1, 1, 1, WRITE),
        InvalidParameters,
    );
    check_err("share-no-perms", share(P1, 1, 1, 0), InvalidParameters);
    let unknown = 0x7e57_0000_0000_0001;
    check_err(
        "reclaim-unknown-handle",
        reclaim(unknown),
        InvalidParameters,
    );
    check_err("query-unknown-handle", query(unknown), InvalidParameters);
    check_err(
        "retrieve-unknown-handle",
        retrieve(unknown, WINDOW.0, READ),
        InvalidParameters,
    );
    check_err(
        "relinquish-unknown-handle",
        relinquish(unknown),
        InvalidParameters,
    );
    check_err("query-nothing-pending", query(0), NoData);
    for (name, fid) in [
        ("donate-not-supported", MEM_DONATE),
        ("unassigned-not-supported", MEM_UNASSIGNED),
        // The calls are SMC64 only: the SMC32 form of SHARE is not a call.
        ("share-smc32-not-supported", MEM_SHARE & !SMC64),
    ] {
        let r = hvc(fid, &[P1, 1, 1, READ]);
        check(name, r[0] == NOT_SUPPORTED, format_args!("{r:x?}"));
    }
    // SMC is a conduit just like HVC.
    let r = smccc::smc64(MEM_QUERY, [0; 17]);
    let r = ShareError::from_regs([r[0], r[1], r[2], r[3]]);
    check(
        "query-through-smc",
        r == NoData,
        format_args!("{r:x?}, expected {NoData:?}"),
    );
}

/// Checks that `SHARE` or `LEND` gave a handle, non-zero and not among `used` (handles
/// are never reused); the handle.
fn new_handle(name: &str, r: ShareResult<u64>, used: &[u64]) -> Option<u64> {
    check(
        name,
        r.is_ok_and(|h| h != 0 && !used.contains(&h)),
        format_args!("{r:x?}, handles before: {used:?}"),
    );
    r.ok()
}

/// Waits until `QUERY(handle)` reports `state`; the last answer, `Err(None)` on timeout.
fn wait_state(handle: u64, state: State) -> Result<Transaction, Option<ShareError>> {
    let mut last = None;
    wait_for(|| match query(handle) {
        Ok(t) if t.state == state => Some(t),
        Ok(_) => None,
        Err(e) => {
            last = Some(e);
            None
        }
    })
    .ok_or(last)
}

fn owner() {
    bad_input();

    // SAFETY: P1 and P2 are this VM's RAM, mapped read/write by its stage 1 and 2, used
    // by nothing else of the guest.
    unsafe {
        fill(P1, OWNER_WORDS, owner_word);
        fill(P1, 256..512, |_| 0);
        fill(P2, 0..512, lent_word);
    }
    let h1 = new_handle("share-p1", share(P1, 1, 1, READ | WRITE), &[]);
    let h2 = new_handle("lend-p2", lend(P2, 1, 1, READ), &[h1.unwrap_or(0)]);
    let (Some(h1), Some(h2)) = (h1, h2) else {
        return;
    };
    println!("sharing: handles {h1} {h2}");
    let q = query(h1);
    let want = Transaction {
        handle: h1,
        ..SHARE_P1
    };
    // The receiver may have retrieved it already.
    check(
        "query-own-share",
        q.is_ok_and(|t| {
            t == want
                || t == Transaction {
                    state: State::Retrieved,
                    ..want
                }
        }),
        format_args!("{q:x?}"),
    );
    check_err("share-p1-again", share(P1, 1, 1, READ), ShareError::Denied);
    check_err("lend-shared-p1", lend(P1, 1, 1, READ), ShareError::Denied);
    check_err("share-lent-p2", share(P2, 1, 1, READ), ShareError::Denied);
    check_err(
        "share-range-with-lent",
        share(P1 - PAGE, 3, 1, READ),
        ShareError::Denied,
    );
    // The owner keeps its access to a shared page, and loses it to a lent one.
    check(
        "owner-reads-shared",
        access_aborts(P1, false).is_none(),
        format_args!("aborted"),
    );
    check_aborts("owner-lent-read-aborts", P2, false);
    check_aborts("owner-lent-write-aborts", P2, true);

    // Turn 3: the receiver has retrieved both pages and replied.
    if !check_flag("receiver-acked", P1, FLAG_ACK, ACK) {
        return;
    }
    let q1 = query(h1);
    let q2 = query(h2);
    check(
        "query-retrieved",
        q1.is_ok_and(|t| t.state == State::Retrieved)
            && q2.is_ok_and(|t| t.state == State::Retrieved),
        format_args!("{q1:x?} {q2:x?}"),
    );
    check_err("reclaim-retrieved-share", reclaim(h1), ShareError::Denied);
    check_err("reclaim-retrieved-lend", reclaim(h2), ShareError::Denied);
    // SAFETY: P1 is this VM's RAM, still mapped read/write (shared).
    let reply = unsafe { mismatch(P1, REPLY_WORDS, reply_word) };
    check(
        "owner-sees-reply",
        reply.is_none(),
        format_args!("first wrong word (index, value) {reply:x?}"),
    );
    // Timed while the receiver waits for the flag (it makes no call meanwhile).
    let ns = mean_ns(QUERY_CALLS, || {
        core::hint::black_box(query(h1)).ok();
    });
    println!("sharing: QUERY round trip: {ns} ns (mean of {QUERY_CALLS} calls)");
    // SAFETY: as above.
    unsafe { set_flag(P1, FLAG_GO, GO) };

    // Turn 5: both relinquished.
    let r1 = wait_state(h1, State::Pending);
    let r2 = wait_state(h2, State::Pending);
    check(
        "receiver-relinquished",
        r1.is_ok() && r2.is_ok(),
        format_args!("{r1:x?} {r2:x?}"),
    );
    if r1.is_err() || r2.is_err() {
        return;
    }
    check(
        "reclaim-share",
        reclaim(h1) == Ok(()),
        format_args!("{h1:#x}"),
    );
    check(
        "reclaim-lend",
        reclaim(h2) == Ok(()),
        format_args!("{h2:#x}"),
    );
    check_err("query-reclaimed", query(h1), ShareError::InvalidParameters);
    check_err("reclaim-twice", reclaim(h2), ShareError::InvalidParameters);
    check(
        "owner-reads-reclaimed",
        access_aborts(P2, false).is_none(),
        format_args!("aborted"),
    );
    // SAFETY: P2 is mapped again (reclaimed).
    let lent = unsafe { mismatch(P2, 0..512, lent_word) };
    check(
        "lent-page-intact",
        lent.is_none(),
        format_args!("first wrong word (index, value) {lent:x?}"),
    );

    // Turn 5 (end): both pages, owned again, shared together.
    let Some(h3) = new_handle("share-pair", share(P1, 2, 1, READ | WRITE), &[h1, h2]) else {
        return;
    };
    println!("sharing: pair handle {h3}");
    if !check_flag("receiver-read-pair", P1, FLAG_BYE, BYE) {
        return;
    }
    let r3 = wait_state(h3, State::Pending);
    check("pair-relinquished", r3.is_ok(), format_args!("{r3:x?}"));
    check(
        "reclaim-pair",
        reclaim(h3) == Ok(()),
        format_args!("{h3:#x}"),
    );
    check_err("nothing-pending-at-end", query(0), ShareError::NoData);

    // Turn 7: a share the owner leaves in place when it powers off.
    let used = [h1, h2, h3];
    let Some(h4) = new_handle("share-left-behind", share(P1, 1, 1, READ | WRITE), &used) else {
        return;
    };
    println!("sharing: last handle {h4}");
    check_flag("receiver-holds-last", P1, FLAG_HELD, HELD);
}

/// Waits until `QUERY(0)` names a pending transaction other than `not`; `None` (and a
/// line with the last answer) on timeout.
fn wait_pending(not: u64) -> Option<Transaction> {
    let mut last = query(0);
    let found = wait_for(|| {
        last = query(0);
        last.ok().filter(|t| t.handle != not)
    });
    if found.is_none() {
        println!("sharing: no new pending transaction in {WAIT_SECONDS} s, QUERY(0) {last:x?}");
    }
    found
}

/// The receiver's wait for the next pending transaction (other than `not`): checks it is
/// `want` under some new handle and returns that handle.
fn expect_pending(name: &str, not: u64, want: Transaction) -> Option<u64> {
    let t = wait_pending(not);
    check(
        name,
        t.is_some_and(|t| {
            t == Transaction {
                handle: t.handle,
                ..want
            } && t.handle != 0
        }),
        format_args!("{t:x?}, expected {want:x?} with a new handle"),
    );
    t.map(|t| t.handle)
}

/// Checks that a call that must succeed did; whether it did.
fn check_ok(name: &str, r: ShareResult<()>) -> bool {
    check(name, r.is_ok(), format_args!("{r:x?}"));
    r.is_ok()
}

fn receiver() {
    use ShareError::{Denied, InvalidParameters};
    let (w1, w2) = (WINDOW.0, WINDOW.0 + PAGE);

    // Turn 2: the owner's share comes first, then its lend.
    let Some(h1) = expect_pending("query-pending-share", 0, SHARE_P1) else {
        return;
    };
    check_err(
        "retrieve-into-own-ram",
        retrieve(h1, P1, READ),
        InvalidParameters,
    );
    check_err(
        "retrieve-onto-vuart",
        retrieve(h1, super::UART, READ),
        InvalidParameters,
    );
    check_err(
        "retrieve-unaligned",
        retrieve(h1, w1 + 64, READ),
        InvalidParameters,
    );
    check_err(
        "retrieve-more-than-granted",
        retrieve(h1, w1, READ | WRITE | EXEC),
        Denied,
    );
    check_err(
        "retrieve-write-only",
        retrieve(h1, w1, WRITE),
        InvalidParameters,
    );
    check_err("relinquish-not-retrieved", relinquish(h1), Denied);
    check_err("receiver-reclaim", reclaim(h1), Denied);
    if !check_ok("retrieve-share", retrieve(h1, w1, READ | WRITE)) {
        return;
    }
    check_err("retrieve-twice", retrieve(h1, w2, READ), Denied);
    check_err("share-borrowed-onward", share(w1, 1, 0, READ), Denied);
    check_err("lend-borrowed-onward", lend(w1, 1, 0, READ), Denied);

    let lend_p2 = Transaction {
        perms: READ,
        kind: Kind::Lend,
        ..SHARE_P1
    };
    let Some(h2) = expect_pending("query-pending-lend", h1, lend_p2) else {
        return;
    };
    check_err(
        "retrieve-onto-mapped",
        retrieve(h2, w1, READ),
        InvalidParameters,
    );
    check_err(
        "retrieve-lend-writable",
        retrieve(h2, w2, READ | WRITE),
        Denied,
    );
    if !check_ok("retrieve-lend", retrieve(h2, w2, READ)) {
        return;
    }
    check_err("nothing-else-pending", query(0), ShareError::NoData);
    let q = query(h1);
    check(
        "query-retrieved-share",
        q == Ok(Transaction {
            handle: h1,
            state: State::Retrieved,
            ..SHARE_P1
        }),
        format_args!("{q:x?}"),
    );

    // SAFETY: w1 and w2 are mapped by this VM's stage 1 (WINDOW) and now by its stage 2
    // (retrieved: w1 read/write, w2 read-only; only w1 is written).
    let (p1, p2) = unsafe {
        (
            mismatch(w1, OWNER_WORDS, owner_word),
            mismatch(w2, 0..512, lent_word),
        )
    };
    check(
        "receiver-reads-share",
        p1.is_none(),
        format_args!("first wrong word {p1:x?}"),
    );
    check(
        "receiver-reads-lend",
        p2.is_none(),
        format_args!("first wrong word {p2:x?}"),
    );
    check_aborts("receiver-write-read-only-aborts", w2, true);
    // SAFETY: as above, w1 is writable.
    unsafe {
        fill(w1, REPLY_WORDS, reply_word);
        set_flag(w1, FLAG_ACK, ACK);
    }

    // Turn 4: the owner has checked it cannot reclaim them.
    if !check_flag("owner-said-go", w1, FLAG_GO, GO) {
        return;
    }
    // The second RELINQUISH of h1 comes while h2 is still retrieved, so the owner (which
    // reclaims only once both are pending) cannot have ended h1 yet.
    let r1 = relinquish(h1);
    check_err("relinquish-twice", relinquish(h1), Denied);
    let r2 = relinquish(h2);
    check(
        "relinquish-both",
        r1.is_ok() && r2.is_ok(),
        format_args!("{r1:x?} {r2:x?}"),
    );
    check_aborts("relinquished-share-read-aborts", w1, false);
    check_aborts("relinquished-lend-read-aborts", w2, false);
    // The owner reclaims both: the handles end.
    let ended = wait_for(|| {
        (query(h1) == Err(InvalidParameters) && query(h2) == Err(InvalidParameters)).then_some(())
    });
    check(
        "handles-end",
        ended.is_some(),
        format_args!("{:x?} {:x?}", query(h1), query(h2)),
    );

    // Turn 6: the pair (its handle is new: h1 and h2 have ended).
    let pair = Transaction {
        pages: 2,
        ..SHARE_P1
    };
    let Some(h3) = expect_pending("query-pending-pair", 0, pair) else {
        return;
    };
    if !check_ok("retrieve-pair", retrieve(h3, w1, READ | WRITE)) {
        return;
    }
    // SAFETY: both pages of the window are mapped read/write again (retrieved).
    let (p1, reply, p2) = unsafe {
        (
            mismatch(w1, OWNER_WORDS, owner_word),
            mismatch(w1, REPLY_WORDS, reply_word),
            mismatch(w2, 0..512, lent_word),
        )
    };
    check(
        "pair-contents",
        p1.is_none() && reply.is_none() && p2.is_none() && h3 != h1 && h3 != h2,
        format_args!("first wrong words {p1:x?} {reply:x?} {p2:x?}, handles {h1} {h2} {h3}"),
    );
    // SAFETY: as above.
    unsafe { set_flag(w1, FLAG_BYE, BYE) };
    check_ok("relinquish-pair", relinquish(h3));

    // Turn 8: the share the owner leaves behind; read once, so that the TLB holds it.
    let Some(h4) = expect_pending("query-pending-last", h3, SHARE_P1) else {
        return;
    };
    if !check_ok("retrieve-last", retrieve(h4, w1, READ | WRITE)) {
        return;
    }
    // SAFETY: w1 is mapped read/write (retrieved) until the receiver sets the flag; after
    // that it is touched only through `check_aborts`.
    unsafe {
        let p1 = mismatch(w1, OWNER_WORDS, owner_word);
        check(
            "last-contents",
            p1.is_none(),
            format_args!("first wrong word {p1:x?}"),
        );
        set_flag(w1, FLAG_HELD, HELD);
    }
    // Turn 9: the owner ends; the hypervisor revokes the page and ends the handle.
    let ended = wait_for(|| (query(h4) == Err(InvalidParameters)).then_some(()));
    check(
        "revoked-when-owner-ends",
        ended.is_some(),
        format_args!("QUERY {:x?}", query(h4)),
    );
    check_aborts("revoked-share-read-aborts", w1, false);
    check_err("relinquish-revoked", relinquish(h4), InvalidParameters);
}

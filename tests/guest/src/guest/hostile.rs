//! Adversarial scenarios: a guest that does what a hostile or broken guest would, to check
//! that the hypervisor neither crashes nor lets it hurt the other VMs (`docs/vms.md`,
//! "The test guest", `arg` bits 7 to 10).
//!
//! - [`race`] (bit 7): vCPU 0 starts vCPU 1, sees it ON, and resets the VM at once, many
//!   boots in a row, then powers it off the same way: each time vCPU 1's CPU may have
//!   taken its start but not entered yet. Checks PSCI's answers to racing `CPU_ON`s.
//! - [`off_reset`] (bit 8): vCPU 1 resets the VM while vCPU 0 is off; vCPU 0 must come
//!   back on the new boot.
//! - [`hostile`] (bit 9, VM 0 of its description): fills its memory-sharing quota, signals
//!   VM 2, storms hypercalls, sends bad PSCI arguments, calls every unused SMCCC range
//!   with random registers, and takes aborts in a loop.
//! - [`bystander`] (bit 10, VMs 1 and 2): stays until VM 0 has ended (so that VM 0's
//!   calls always find it running) and checks it is unharmed; VM 2 first waits until
//!   VM 0 has filled its quota and shares a page with VM 1, which must still work.

use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering};

use super::sharing::{query_from, reclaim, share, ShareError};
use super::{check, counter, hvc, power_off, Uart};
use super::{
    ABORT_ESR, EXPECT_ABORT, PSCI_AFFINITY_INFO, PSCI_CPU_OFF, PSCI_CPU_ON, PSCI_SYSTEM_RESET,
    VM_BOOTS, VM_INFO,
};

/// CPU_ON context of vCPU 1 in [`race`].
pub const RACE_CONTEXT: u64 = 3;
/// CPU_ON context of vCPU 1 in [`off_reset`].
pub const OFF_RESET_CONTEXT: u64 = 4;
/// Boots of [`race`]: all but the last end with `SYSTEM_RESET`, the last `SYSTEM_OFF`.
pub const RACE_BOOTS: u64 = 20;

const ON: u64 = 0;
const OFF: u64 = 1;
const INVALID_PARAMETERS: i64 = -2;
const ALREADY_ON: i64 = -4;
const INVALID_ADDRESS: i64 = -9;
const NOT_SUPPORTED: u64 = u64::MAX;

fn secondary_entry() -> u64 {
    extern "C" {
        fn secondary_start();
    }
    secondary_start as *const () as u64
}

fn boots() -> u64 {
    hvc(VM_BOOTS, &[])[1]
}

/// Polls `AFFINITY_INFO(mpidr)` until it says `state`; true if it did within about
/// five seconds.
fn wait_affinity(mpidr: u64, state: u64) -> bool {
    let (freq, start) = counter();
    while counter().1.wrapping_sub(start) < 5 * freq {
        if hvc(PSCI_AFFINITY_INFO, &[mpidr, 0])[0] == state {
            return true;
        }
    }
    false
}

/// vCPU 1 of [`race`]: calls the hypervisor in a loop (so it traps, and is stopped when
/// the VM resets or powers off), each time also racing a `CPU_ON` of itself, which must
/// be `ALREADY_ON`. A wrong answer is printed (the VM may end before any report).
pub fn race_second() -> ! {
    loop {
        let r = hvc(PSCI_CPU_ON, &[1, secondary_entry(), RACE_CONTEXT])[0] as i64;
        if r != ALREADY_ON {
            println!("FAIL race-self-cpu-on: {r}");
        }
        core::hint::black_box(hvc(VM_INFO, &[]));
    }
}

/// vCPU 0 of [`race`], on every boot.
pub fn race() -> ! {
    let boot = boots();
    let entry = secondary_entry();
    let first = hvc(PSCI_CPU_ON, &[1, entry, RACE_CONTEXT])[0] as i64;
    // Racing the target's own start: whether or not its CPU took it yet, the vCPU is on.
    let again = hvc(PSCI_CPU_ON, &[1, entry, RACE_CONTEXT])[0] as i64;
    let state = hvc(PSCI_AFFINITY_INFO, &[1, 0])[0];
    let on = wait_affinity(1, ON);
    let last = boot >= RACE_BOOTS;
    if last {
        check("race-cpu-on", first == 0, format_args!("{first}"));
        check(
            "race-cpu-on-again",
            again == ALREADY_ON,
            format_args!("{again}"),
        );
        check(
            "race-affinity-on-at-once",
            state == ON,
            format_args!("{state}"),
        );
        check("race-vcpu-1-on", on, format_args!("not ON in 5 s"));
        check(
            "race-boots",
            boot == RACE_BOOTS,
            format_args!("boot {boot}"),
        );
        println!("race: {boot} boots, each ended while vCPU 1 was starting");
        super::done();
    }
    if first != 0 || again != ALREADY_ON || state != ON || !on {
        println!(
            "FAIL race-boot-{boot}: CPU_ON {first}, again {again}, AFFINITY_INFO {state}, on {on}"
        );
    }
    hvc(PSCI_SYSTEM_RESET, &[]);
    println!("FAIL race-reset-returned");
    power_off()
}

/// vCPU 1 of [`off_reset`]: waits until vCPU 0 is off, then resets the VM.
pub fn off_reset_second() -> ! {
    let off = wait_affinity(0, OFF);
    if !off {
        println!("FAIL off-reset-vcpu-0-off: not OFF in 5 s");
    }
    println!("vCPU 1 resets the VM with vCPU 0 off");
    hvc(PSCI_SYSTEM_RESET, &[]);
    println!("FAIL off-reset-returned");
    power_off()
}

/// vCPU 0 of [`off_reset`]: on the first boot starts vCPU 1 and turns itself off; on
/// the second reports.
pub fn off_reset() -> ! {
    let boot = boots();
    if boot == 1 {
        let r = hvc(PSCI_CPU_ON, &[1, secondary_entry(), OFF_RESET_CONTEXT])[0];
        if r != 0 {
            println!("FAIL off-reset-cpu-on: {r:#x}");
            power_off();
        }
        println!("vCPU 0 turns itself off");
        hvc(PSCI_CPU_OFF, &[]);
        println!("FAIL off-reset-cpu-off-returned");
        power_off();
    }
    check(
        "off-reset-vcpu-0-back",
        boot == 2,
        format_args!("boot {boot}"),
    );
    let state = hvc(PSCI_AFFINITY_INFO, &[1, 0])[0];
    check(
        "off-reset-vcpu-1-off",
        state == OFF,
        format_args!("{state}"),
    );
    super::done()
}

/// Pages of its RAM [`hostile`] shares (above what the base checks use, below the
/// stacks' end of RAM).
const SHARE_BASE: u64 = 0x4018_0000;
/// VM ids in the hostile description: the hostile VM, the witness, the third VM.
const WITNESS: u64 = 1;
const THIRD: u64 = 2;
const HOSTILE: u64 = 0;

/// How long a [`bystander`] waits for the hostile VM to end.
const BYSTANDER_SECONDS: u64 = 90;

/// A xorshift generator (the registers of the calls; no secret).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Counters the final line of [`hostile`] prints.
static CALLS: AtomicU64 = AtomicU64::new(0);

fn call(fid: u32, args: &[u64]) -> [u64; 4] {
    CALLS.fetch_add(1, Ordering::Relaxed);
    hvc(fid, args)
}

/// Whether `fid` is a function the hypervisor implements or that another part of the
/// SMCCC space reserves for it (left out of the "unused" sweep).
fn implemented(fid: u32) -> bool {
    let entity = (fid >> 24) & 0x3f;
    let number = fid & 0xffff;
    let fast = fid >> 31 == 1;
    let high = fid & 0x00ff_0000 != 0;
    if !fast || high {
        return false;
    }
    match entity {
        // Arm architecture calls: version, features, SOC_ID, the workarounds.
        0 => matches!(number, 0..=2 | 0x3fff | 0x7fff | 0x8000),
        // PSCI.
        4 => number <= 0x1f,
        // The vendor hypervisor service: ours.
        6 => matches!(number, 0x1..=0x3 | 0x10..=0x16 | 0xff00..=0xff03),
        _ => false,
    }
}

/// Every owning entity, fast and yielding, SMC32 and SMC64, with random function numbers
/// (some with the reserved bits \[23:16\] set) and random x1-x17: each must return
/// `NOT_SUPPORTED` in x0, zero x1-x3 and leave x4-x17 as they were. Returns the calls
/// made.
fn unused_ranges(rng: &mut Rng) -> u64 {
    let mut calls = 0;
    let mut bad = None;
    for entity in 0..64u32 {
        for kind in 0..4u32 {
            let fast = kind & 1;
            let sixty_four = kind >> 1;
            for i in 0..16u32 {
                let reserved = if i == 15 {
                    (rng.next() as u32 & 0xff) << 16
                } else {
                    0
                };
                let fid = (fast << 31)
                    | (sixty_four << 30)
                    | (entity << 24)
                    | reserved
                    | (rng.next() as u32 & 0xffff);
                if implemented(fid) {
                    continue;
                }
                let mut args = [0u64; 17];
                for a in &mut args {
                    *a = rng.next();
                }
                CALLS.fetch_add(1, Ordering::Relaxed);
                calls += 1;
                let r = smccc::hvc64(fid, args);
                let kept = r[4..] == args[3..];
                if r[0] != NOT_SUPPORTED || r[1..4] != [0, 0, 0] || !kept {
                    bad = Some((fid, r[0]));
                }
            }
        }
    }
    check(
        "unused-smccc-ranges-not-supported",
        bad.is_none(),
        format_args!("{bad:x?}"),
    );
    calls
}

/// Bad PSCI arguments (the VM has two vCPUs, vCPU 1 off): each gets its error, and
/// vCPU 1 stays off.
fn bad_psci() {
    let entry = secondary_entry();
    let cases: [(&str, u32, [u64; 3], i64); 9] = [
        (
            "psci-no-such-mpidr",
            PSCI_CPU_ON,
            [2, entry, 0],
            INVALID_PARAMETERS,
        ),
        (
            "psci-aff1-mpidr",
            PSCI_CPU_ON,
            [0x100, entry, 0],
            INVALID_PARAMETERS,
        ),
        (
            "psci-aff3-mpidr",
            PSCI_CPU_ON,
            [1 << 32 | 1, entry, 0],
            INVALID_PARAMETERS,
        ),
        (
            "psci-self-already-on",
            PSCI_CPU_ON,
            [0, entry, 0],
            ALREADY_ON,
        ),
        (
            "psci-unaligned-entry",
            PSCI_CPU_ON,
            [1, entry + 2, 0],
            INVALID_ADDRESS,
        ),
        (
            "psci-entry-outside-ram",
            PSCI_CPU_ON,
            [1, 0x7000_0000, 0],
            INVALID_ADDRESS,
        ),
        ("psci-entry-zero", PSCI_CPU_ON, [1, 0, 0], INVALID_ADDRESS),
        (
            "psci-affinity-level-1",
            PSCI_AFFINITY_INFO,
            [1, 1, 0],
            INVALID_PARAMETERS,
        ),
        (
            "psci-affinity-no-mpidr",
            PSCI_AFFINITY_INFO,
            [9, 0, 0],
            INVALID_PARAMETERS,
        ),
    ];
    for (name, fid, args, want) in cases {
        let r = call(fid, &args)[0] as i64;
        check(name, r == want, format_args!("{r}, not {want}"));
    }
    // SMC32 CPU_ON: the upper halves are ignored, so this is CPU_ON(1) with an
    // unaligned entry.
    let r = call(
        0x8400_0003,
        &[
            0xffff_ffff_0000_0001,
            (entry + 1) | 0xffff_0000_0000_0000,
            0,
        ],
    )[0] as i64;
    check(
        "psci-cpu-on-32-truncates",
        r == INVALID_ADDRESS,
        format_args!("{r}"),
    );
    let state = call(PSCI_AFFINITY_INFO, &[1, 0])[0];
    check(
        "psci-vcpu-1-still-off",
        state == OFF,
        format_args!("{state}"),
    );
}

/// Shares single pages with the witness until refused: the owner's quota must run out
/// (`NO_MEMORY`) at its default, 16. Then gives one back and shares a page with the
/// third VM, its signal that the quota is full. Returns the witness handles.
fn fill_quota(handles: &mut [u64; 64]) -> usize {
    let mut n = 0;
    let mut refusal = None;
    while n < handles.len() {
        match share(SHARE_BASE + n as u64 * 4096, 1, WITNESS, 1) {
            Ok(h) => {
                handles[n] = h;
                n += 1;
            }
            Err(e) => {
                refusal = Some(e);
                break;
            }
        }
    }
    CALLS.fetch_add(n as u64 + 1, Ordering::Relaxed);
    check(
        "quota-no-memory-at-16",
        n == 16 && refusal == Some(ShareError::NoMemory),
        format_args!("{n} shares, then {refusal:?}"),
    );
    println!("hostile: sharing quota full after {n} shares ({refusal:?})");
    // Room for the signal to the third VM.
    if n > 0 {
        n -= 1;
        let r = reclaim(handles[n]);
        check("quota-reclaim", r.is_ok(), format_args!("{r:?}"));
    }
    let signal = share(SHARE_BASE + 63 * 4096, 1, THIRD, 1);
    check(
        "quota-signal-third",
        signal.is_ok(),
        format_args!("{signal:?}"),
    );
    n
}

/// The hostile VM (VM 0, two vCPUs, `abort-policy = "inject"`).
pub fn hostile() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ counter().1);
    let canary = 0x4019_f000 as *mut u64;
    // SAFETY: a word of guest RAM nothing else uses (below the shared pages' end).
    unsafe { canary.write_volatile(0x6361_6e61_7279) };
    let boots_before = boots();

    let mut handles = [0u64; 64];
    let held = fill_quota(&mut handles);

    // A storm of calls: the cheapest one, unknown IDs, then SHARE + RECLAIM pairs with
    // the witness (whose console lines the rate limit holds back).
    let (freq, t0) = counter();
    for _ in 0..20_000 {
        core::hint::black_box(call(VM_INFO, &[]));
    }
    for _ in 0..5_000 {
        core::hint::black_box(call(0xC600_00FF, &[rng.next(), rng.next()]));
    }
    for h in &handles[..held] {
        let _ = reclaim(*h);
    }
    let mut pairs = 0;
    for _ in 0..1000 {
        if let Ok(h) = share(SHARE_BASE, 1, WITNESS, 1) {
            if reclaim(h).is_ok() {
                pairs += 1;
            }
        }
    }
    CALLS.fetch_add(2 * 1000 + held as u64, Ordering::Relaxed);
    let ms = counter().1.wrapping_sub(t0) * 1000 / freq;
    check(
        "storm-share-reclaim",
        pairs == 1000,
        format_args!("{pairs} of 1000 pairs"),
    );
    println!("hostile: storm of 25000 calls and {pairs} SHARE/RECLAIM pairs in {ms} ms");

    bad_psci();
    let swept = unused_ranges(&mut rng);

    // Aborts in a loop: reads of an IPA no stage 2 maps, each injected and survived.
    let probe = super::PROBE.load(Ordering::SeqCst);
    let mut survived = 0u64;
    for _ in 0..200 {
        ABORT_ESR.store(0, Ordering::SeqCst);
        EXPECT_ABORT.store(1, Ordering::SeqCst);
        // SAFETY: a deliberate access to an unmapped IPA: the hypervisor injects an
        // abort, which the vector handles by skipping this load.
        let _ = unsafe { core::ptr::read_volatile(probe as *const u64) };
        let esr = ABORT_ESR.load(Ordering::SeqCst);
        if esr >> 26 == 0x25 && esr & 0x3f == 0x10 {
            survived += 1;
        }
    }
    EXPECT_ABORT.store(0, Ordering::SeqCst);
    check(
        "aborts-survived",
        survived == 200,
        format_args!("{survived} of 200"),
    );

    // Nothing of all that changed the VM: same boot, canary intact, vCPU 1 off.
    // SAFETY: as above.
    let word = unsafe { canary.read_volatile() };
    let vcpu1 = call(PSCI_AFFINITY_INFO, &[1, 0])[0];
    check(
        "hostile-state-unchanged",
        boots() == boots_before && word == 0x6361_6e61_7279 && vcpu1 == OFF,
        format_args!("boot {}, canary {word:#x}, vCPU 1 {vcpu1}", boots()),
    );
    println!(
        "hostile: {} calls made, {swept} in unused SMCCC ranges, {survived} faults survived",
        CALLS.load(Ordering::Relaxed)
    );
}

/// A bystander (VM 1 or 2 of the hostile description). VM 2 waits for the hostile VM's
/// signal (a share addressed to it once the hostile VM's quota is full), then shares a
/// page with VM 1 and reclaims it. Both then stay until the hostile VM has ended: they
/// share a page with it every 50 ms, which succeeds (and is reclaimed) while it runs and
/// is refused once it is off (`DENIED`) or destroyed (`INVALID_PARAMETERS`).
pub fn bystander() {
    let me = hvc(VM_INFO, &[])[1];
    if me == THIRD {
        let signal = super::sharing::wait_for(|| query_from(0, HOSTILE).ok());
        check(
            "third-saw-quota-full",
            signal.is_some(),
            format_args!("no signal in {} s", super::sharing::WAIT_SECONDS),
        );
        let r = share(SHARE_BASE, 1, WITNESS, 1);
        check(
            "third-shares-despite-hostile",
            r.is_ok(),
            format_args!("{r:?}"),
        );
        if let Ok(h) = r {
            let back = reclaim(h);
            check("third-reclaims", back.is_ok(), format_args!("{back:?}"));
        }
    }
    // Bounded (the hostile VM's storms take seconds under a loaded QEMU host).
    let (freq, start) = counter();
    let mut ended = None;
    while ended.is_none() && counter().1.wrapping_sub(start) < BYSTANDER_SECONDS * freq {
        let t0 = counter().1;
        while counter().1.wrapping_sub(t0) < freq / 20 {}
        match share(SHARE_BASE + 4096, 1, HOSTILE, 1) {
            Ok(h) => {
                let _ = reclaim(h);
            }
            Err(e) => ended = Some(e),
        }
    }
    check(
        "outlived-hostile",
        matches!(
            ended,
            Some(ShareError::Denied | ShareError::InvalidParameters)
        ),
        format_args!("{ended:?}"),
    );
}

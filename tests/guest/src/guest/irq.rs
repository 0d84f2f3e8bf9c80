//! The interrupt checks (`arg` bit 11), against the VM's virtual GICv3 at QEMU virt's
//! addresses: the distributor at [`GICD`], one redistributor per vCPU from [`GICR`].
//! The guest uses the GIC CPU interface system registers (`ICC_*_EL1`; with
//! `HCR_EL2.IMO` set they are the virtual interface), Group 1, EOImode 0.
//!
//! - `gic-spi-not-owned`: the VM owns only its UART's SPI (INTID 33): every other SPI
//!   reads as zero and ignores enables, pending writes and routing;
//! - `sgi-self`: an SGI sent to itself by target list arrives;
//! - `gic-priority-order` and `gic-active-state`: two SGIs raised while IRQs are
//!   masked arrive higher priority first; while its handler runs an SGI is active in
//!   `GICR_ISACTIVER0`, and inactive once handled;
//! - `gic-more-pending-than-list-registers`: nine SGIs raised at once while IRQs are
//!   masked all arrive (QEMU has four list registers: the rest come through the
//!   maintenance interrupt's refills);
//! - `sgi-target-list` and `sgi-broadcast`: with vCPU 1 waiting in WFI on another
//!   physical CPU, an SGI by target list and one with IRM = 1 (every other vCPU) wake
//!   it; vCPU 0 does not get the broadcast;
//! - `vtimer-wakes-wfi`: the EL1 virtual timer interrupt (PPI 27) wakes the vCPU from
//!   WFI;
//! - `vtimer-pending-while-disabled`: with PPI 27 disabled at the redistributor a firing
//!   timer shows pending in `GICR_ISPENDR0` and is not taken; cleared with
//!   `GICR_ICPENDR0`, the timer fires again once enabled (`vtimer-after-clear`);
//! - with `arg` bit 12 (`sgi-isolation`), it then waits [`ISOLATION_SECONDS`] with SGIs 8
//!   and 9 enabled on both vCPUs, and checks that none arrived: another VM of the run
//!   ([`attack`], `arg` bit 13) broadcasts them meanwhile.
//!
//! The GIC set-up and the handler also serve the latency measurement
//! (`super::latency`), which runs on QEMU's own GICv3 as well: nothing here relies on
//! what only the virtual GIC does (interrupts are made Group 1 explicitly, the
//! redistributor is woken and waited for).

use core::arch::asm;
use core::fmt::Write;
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::{check, counter, hvc, Uart, PSCI_AFFINITY_INFO, PSCI_CPU_ON};

/// IPA of the virtual distributor.
pub const GICD: u64 = 0x0800_0000;
/// IPA of the virtual redistributors (128 KiB per vCPU).
pub const GICR: u64 = 0x080A_0000;
/// Bytes of the GIC window the guest maps: distributor up to two redistributors.
pub const GIC_WINDOW: (u64, u64) = (GICD, GICR + 0x4_0000 - GICD);
/// The `CPU_ON` context that makes vCPU 1 run [`secondary`].
pub const IRQ_CONTEXT: u64 = 5;
/// How long the isolation check listens for another VM's SGIs.
const ISOLATION_SECONDS: u64 = 2;
/// How long the attacker keeps sending.
const ATTACK_SECONDS: u64 = 3;

/// INTID of the EL1 virtual timer (PPI 27 on QEMU virt, Arm BSA).
pub const PPI_VTIMER: u32 = 27;

/// Interrupts taken, per vCPU and INTID (0-31).
static COUNTS: [[AtomicU32; 32]; 2] = [const { [const { AtomicU32::new(0) }; 32] }; 2];
/// The order in which vCPU 0 took SGIs 4 and 5.
static ORDER: [AtomicU32; 4] = [const { AtomicU32::new(0) }; 4];
static ORDER_LEN: AtomicU64 = AtomicU64::new(0);
/// `GICR_ISACTIVER0` as read inside the handler of SGI 4 and of SGI 5.
static ACTIVE_SEEN: [AtomicU32; 2] = [const { AtomicU32::new(0) }; 2];
/// Per vCPU, the virtual counter at the handler's entry when it last took an interrupt
/// (written before the interrupt is counted in [`COUNTS`]).
static LAST_IRQ_AT: [AtomicU64; 2] = [const { AtomicU64::new(0) }; 2];
/// Set by vCPU 1 once its GIC is set up; cleared by vCPU 0 to let it go.
static SECOND_READY: AtomicU64 = AtomicU64::new(0);
static RELEASE: AtomicU64 = AtomicU64::new(0);

pub(super) fn r32(addr: u64) -> u32 {
    // SAFETY: `addr` lies in the GIC window the guest's stage 1 maps as device memory;
    // a 32-bit access to a GIC register is one the hypervisor emulates.
    unsafe { read_volatile(addr as *const u32) }
}

pub(super) fn w32(addr: u64, v: u32) {
    // SAFETY: as `r32`.
    unsafe { write_volatile(addr as *mut u32, v) }
}

fn w8(addr: u64, v: u8) {
    // SAFETY: as `r32`; IPRIORITYR takes byte accesses.
    unsafe { write_volatile(addr as *mut u8, v) }
}

fn r64(addr: u64) -> u64 {
    // SAFETY: as `r32`; GICD_IROUTER takes 64-bit accesses.
    unsafe { read_volatile(addr as *const u64) }
}

fn w64(addr: u64, v: u64) {
    // SAFETY: as `r64`.
    unsafe { write_volatile(addr as *mut u64, v) }
}

/// `SGI_base` of vCPU `i`'s redistributor.
const fn sgi_base(i: u64) -> u64 {
    GICR + i * 0x2_0000 + 0x1_0000
}

fn vcpu_index() -> usize {
    let mpidr: u64;
    // SAFETY: reading MPIDR_EL1 (the vCPU's virtual MPIDR, Aff0 = index).
    unsafe { asm!("mrs {}, mpidr_el1", out(reg) mpidr, options(nomem, nostack)) };
    (mpidr & 0xff) as usize
}

/// Turns the distributor on: `GICD_CTLR` = EnableGrp1 | ARE (IHI 0069 `GICD_CTLR`, one
/// Security state: bit 1 EnableGrp1, bit 4 ARE), then waits for `RWP` (bit 31) to clear.
/// The virtual GIC keeps ARE set whatever is written; QEMU's GICv3 wants it written.
pub(super) fn distributor_on() {
    w32(GICD, (1 << 4) | (1 << 1));
    wait_ms(100, || r32(GICD) & (1 << 31) == 0);
}

/// Wakes vCPU `i`'s redistributor and waits until it is awake, makes its SGIs and PPIs
/// Group 1 (`GICR_IGROUPR0`: QEMU's GICv3 resets them to Group 0, which with one Security
/// state would be signalled as FIQ), enables the SGIs and PPIs of `enable`, and sets up
/// its CPU interface: system registers, priority mask 0xff, binary point 0, Group 1 on.
pub(super) fn init_cpu(i: u64, enable: u32) {
    let rd = GICR + i * 0x2_0000;
    w32(rd + 0x14, 0); // GICR_WAKER: ProcessorSleep = 0
    wait_ms(100, || r32(rd + 0x14) & (1 << 2) == 0); // ChildrenAsleep
    w32(sgi_base(i) + 0x080, u32::MAX); // GICR_IGROUPR0: all Group 1
    w32(sgi_base(i) + 0x100, enable); // GICR_ISENABLER0
                                      // SAFETY: the GIC CPU interface registers at EL1 (the virtual interface under the
                                      // hypervisor); they only affect this CPU's interrupt handling.
    unsafe {
        asm!(
            "mov {t}, #7",
            "msr S3_0_C12_C12_5, {t}", // ICC_SRE_EL1
            "isb",
            "mov {t}, #0xff",
            "msr S3_0_C4_C6_0, {t}",   // ICC_PMR_EL1
            "msr S3_0_C12_C12_3, xzr", // ICC_BPR1_EL1
            "mov {t}, #1",
            "msr S3_0_C12_C12_7, {t}", // ICC_IGRPEN1_EL1
            "isb",
            t = out(reg) _,
            options(nostack),
        );
    }
}

/// SGIs 1-9, the ones the interrupt checks use.
const CHECK_SGIS: u32 = 0x3fe;

pub(super) fn irqs(on: bool) {
    // SAFETY: changing PSTATE.I of this vCPU.
    unsafe {
        if on {
            asm!("msr daifclr, #2", "isb", options(nostack));
        } else {
            asm!("msr daifset, #2", "isb", options(nostack));
        }
    }
}

/// Writes `ICC_SGI1R_EL1` (the hypervisor traps and emulates it).
pub(super) fn send_sgi(value: u64) {
    // SAFETY: an SGI request; the hypervisor delivers it within this VM only.
    unsafe { asm!("msr S3_0_C12_C11_5, {}", "isb", in(reg) value, options(nostack)) };
}

/// `ICC_SGI1R_EL1` for SGI `intid` to the vCPUs of Aff1 = 0 in `targets`.
pub(super) const fn sgi_to(intid: u64, targets: u64) -> u64 {
    (intid << 24) | (targets & 0xffff)
}

/// `ICC_SGI1R_EL1` for SGI `intid` to every vCPU but the sender (IRM = 1).
const fn sgi_broadcast(intid: u64) -> u64 {
    (intid << 24) | (1 << 40)
}

pub(super) fn count(vcpu: usize, intid: u32) -> u32 {
    COUNTS[vcpu][intid as usize].load(Ordering::SeqCst)
}

/// The virtual counter at the entry of the handler that last took an interrupt on
/// `vcpu`.
pub(super) fn last_irq_at(vcpu: usize) -> u64 {
    LAST_IRQ_AT[vcpu].load(Ordering::SeqCst)
}

/// Waits up to `ms` milliseconds for `done`.
fn wait_ms(ms: u64, done: impl Fn() -> bool) -> bool {
    let (freq, start) = counter();
    while counter().1.wrapping_sub(start) < freq * ms / 1000 {
        if done() {
            return true;
        }
        core::hint::spin_loop();
    }
    done()
}

pub(super) fn vcount() -> u64 {
    let v: u64;
    // SAFETY: reading the virtual counter.
    unsafe { asm!("isb", "mrs {}, cntvct_el0", out(reg) v, options(nomem, nostack)) };
    v
}

pub(super) fn vtimer(cval: u64, ctl: u64) {
    // SAFETY: programming this vCPU's EL1 virtual timer.
    unsafe {
        asm!(
            "msr cntv_cval_el0, {c}",
            "msr cntv_ctl_el0, {t}",
            "isb",
            c = in(reg) cval,
            t = in(reg) ctl,
            options(nostack)
        );
    }
}

/// The IRQ handler (vector offset 0x280): acknowledges and ends every pending
/// interrupt, counting them.
#[no_mangle]
extern "C" fn guest_irq() {
    let at = vcount();
    let me = vcpu_index().min(1);
    LAST_IRQ_AT[me].store(at, Ordering::SeqCst);
    loop {
        let iar: u64;
        // SAFETY: acknowledging the highest-priority pending interrupt (ICC_IAR1_EL1).
        unsafe { asm!("mrs {}, S3_0_C12_C12_0", out(reg) iar, options(nostack)) };
        let intid = (iar & 0xff_ffff) as u32;
        if intid >= 1020 {
            return;
        }
        if let Some(c) = COUNTS[me].get(intid as usize) {
            c.fetch_add(1, Ordering::SeqCst);
        }
        if intid == PPI_VTIMER {
            // The timer's output stays high until it is reprogrammed or disabled.
            vtimer(u64::MAX, 0);
        }
        if me == 0 && (intid == 4 || intid == 5) {
            let n = ORDER_LEN.fetch_add(1, Ordering::SeqCst) as usize;
            if let Some(slot) = ORDER.get(n) {
                slot.store(intid, Ordering::SeqCst);
            }
            ACTIVE_SEEN[(intid - 4) as usize].store(r32(sgi_base(0) + 0x300), Ordering::SeqCst);
        }
        // SAFETY: ending the interrupt just acknowledged (ICC_EOIR1_EL1, EOImode 0:
        // priority drop and deactivation).
        unsafe { asm!("msr S3_0_C12_C12_1, {}", "isb", in(reg) iar, options(nostack)) };
    }
}

/// vCPU 1 of the interrupt check: sets up its GIC, then waits in WFI with IRQs on until
/// released.
pub fn secondary() {
    init_cpu(1, CHECK_SGIS);
    irqs(true);
    SECOND_READY.store(1, Ordering::SeqCst);
    while RELEASE.load(Ordering::SeqCst) == 0 {
        // SAFETY: waiting for an interrupt.
        unsafe { asm!("wfi", options(nomem, nostack)) };
    }
    irqs(false);
}

fn spi_ownership() {
    let typer = r32(GICD + 0x4);
    w32(GICD + 0x104, u32::MAX); // ISENABLER1: INTIDs 32-63
    let enabled = r32(GICD + 0x104);
    w32(GICD + 0x184, u32::MAX); // ICENABLER1
    let after = r32(GICD + 0x104);
    w32(GICD + 0x204, 1 << 16); // ISPENDR1: INTID 48
    let pending = r32(GICD + 0x204);
    w64(GICD + 0x6000 + 8 * 48, 1); // IROUTER48
    let route = r64(GICD + 0x6000 + 8 * 48);
    w32(GICD + 0x100 + 4 * 31, u32::MAX); // INTIDs 992-1023
    let far = r32(GICD + 0x100 + 4 * 31);
    check(
        "gic-spi-not-owned",
        typer & 0x1f == 1
            && enabled == 0b10
            && after == 0
            && pending == 0
            && route == 0
            && far == 0,
        format_args!(
            "TYPER {typer:#x} ISENABLER1 {enabled:#x}/{after:#x} ISPENDR1 {pending:#x} \
             IROUTER48 {route:#x} ISENABLER31 {far:#x}"
        ),
    );
}

fn priorities_and_active() {
    irqs(false);
    w8(sgi_base(0) + 0x400 + 4, 0xa0);
    w8(sgi_base(0) + 0x400 + 5, 0x40);
    send_sgi(sgi_to(4, 1));
    send_sgi(sgi_to(5, 1));
    irqs(true);
    let both = wait_ms(500, || count(0, 4) >= 1 && count(0, 5) >= 1);
    let order = [
        ORDER[0].load(Ordering::SeqCst),
        ORDER[1].load(Ordering::SeqCst),
    ];
    check(
        "gic-priority-order",
        both && order == [5, 4],
        format_args!("taken {both}, order {order:?}"),
    );
    let seen = [
        ACTIVE_SEEN[0].load(Ordering::SeqCst),
        ACTIVE_SEEN[1].load(Ordering::SeqCst),
    ];
    let after = r32(sgi_base(0) + 0x300);
    check(
        "gic-active-state",
        seen[0] & (1 << 4) != 0 && seen[1] & (1 << 5) != 0 && after & 0x30 == 0,
        format_args!("ISACTIVER0 in handlers {seen:#x?}, after {after:#x}"),
    );
}

fn many_pending() {
    irqs(false);
    let before: [u32; 10] = core::array::from_fn(|i| count(0, i as u32));
    for intid in 1..=9 {
        send_sgi(sgi_to(intid, 1));
    }
    irqs(true);
    let all = wait_ms(1000, || (1..=9).all(|i| count(0, i) > before[i as usize]));
    let got: [u32; 9] = core::array::from_fn(|i| count(0, i as u32 + 1) - before[i + 1]);
    check(
        "gic-more-pending-than-list-registers",
        all && got == [1; 9],
        format_args!("SGIs 1-9 taken {got:?} times"),
    );
}

fn sgis_to_vcpu1() {
    extern "C" {
        fn secondary_start();
    }
    let entry = secondary_start as *const () as u64;
    let r = hvc(PSCI_CPU_ON, &[1, entry, IRQ_CONTEXT])[0];
    let ready = r == 0 && wait_ms(2000, || SECOND_READY.load(Ordering::SeqCst) == 1);
    if !ready {
        check(
            "sgi-target-list",
            false,
            format_args!("vCPU 1 not up: {r:#x}"),
        );
        return;
    }
    // Give vCPU 1 time to reach WFI.
    wait_ms(20, || false);
    // vCPU 0 took SGIs of its own before: only what changes now counts.
    let own = count(0, 2);
    send_sgi(sgi_to(2, 0b10));
    let got = wait_ms(1000, || count(1, 2) >= 1);
    check(
        "sgi-target-list",
        got && count(0, 2) == own,
        format_args!(
            "vCPU 1 got {} vCPU 0 got {}",
            count(1, 2),
            count(0, 2) - own
        ),
    );
    wait_ms(20, || false);
    let own = count(0, 3);
    send_sgi(sgi_broadcast(3));
    let got = wait_ms(1000, || count(1, 3) >= 1);
    wait_ms(20, || false);
    check(
        "sgi-broadcast",
        got && count(0, 3) == own,
        format_args!(
            "vCPU 1 got {} vCPU 0 got {}",
            count(1, 3),
            count(0, 3) - own
        ),
    );
}

fn release_vcpu1() {
    RELEASE.store(1, Ordering::SeqCst);
    // vCPU 1 may be in WFI: an SGI wakes it to see the release.
    send_sgi(sgi_to(1, 0b10));
    let off = wait_ms(2000, || hvc(PSCI_AFFINITY_INFO, &[1, 0])[0] == 1);
    if !off {
        let _ = writeln!(Uart, "FAIL vcpu1-off: still on");
    }
}

fn isolation() {
    let before = [count(0, 8), count(0, 9), count(1, 8), count(1, 9)];
    let _ = writeln!(Uart, "listening for SGIs 8 and 9 for {ISOLATION_SECONDS} s");
    wait_ms(ISOLATION_SECONDS * 1000, || false);
    let after = [count(0, 8), count(0, 9), count(1, 8), count(1, 9)];
    let got: [u32; 4] = core::array::from_fn(|i| after[i] - before[i]);
    check(
        "sgi-isolation",
        got == [0; 4],
        format_args!("SGIs 8/9 on vCPU 0 and 1: {got:?}"),
    );
}

fn vtimer_checks() {
    let (freq, _) = counter();
    w32(sgi_base(0) + 0x100, 1 << PPI_VTIMER);
    let start = vcount();
    vtimer(start + freq / 100, 1);
    let mut woke = false;
    for _ in 0..1000 {
        // SAFETY: waiting for an interrupt with IRQs unmasked.
        unsafe { asm!("wfi", options(nomem, nostack)) };
        if count(0, PPI_VTIMER) >= 1 {
            woke = true;
            break;
        }
    }
    let waited = vcount().wrapping_sub(start);
    check(
        "vtimer-wakes-wfi",
        woke && waited >= freq / 100,
        format_args!("taken {woke} after {waited} ticks ({freq} Hz)"),
    );

    // Disabled at the redistributor: pending shows, nothing is taken.
    w32(sgi_base(0) + 0x180, 1 << PPI_VTIMER);
    let before = count(0, PPI_VTIMER);
    vtimer(0, 1);
    let pending = wait_ms(200, || r32(sgi_base(0) + 0x200) & (1 << PPI_VTIMER) != 0);
    wait_ms(20, || false);
    let taken = count(0, PPI_VTIMER) - before;
    check(
        "vtimer-pending-while-disabled",
        pending && taken == 0,
        format_args!("ISPENDR0 bit 27 {pending}, taken {taken}"),
    );
    vtimer(u64::MAX, 0);
    w32(sgi_base(0) + 0x280, 1 << PPI_VTIMER);
    let cleared = r32(sgi_base(0) + 0x200) & (1 << PPI_VTIMER) == 0;
    w32(sgi_base(0) + 0x100, 1 << PPI_VTIMER);
    vtimer(vcount() + freq / 200, 1);
    let again = wait_ms(1000, || count(0, PPI_VTIMER) > before);
    check(
        "vtimer-after-clear",
        cleared && again,
        format_args!("cleared {cleared}, fired again {again}"),
    );
    vtimer(u64::MAX, 0);
}

/// The interrupt checks on vCPU 0 (see the module documentation).
pub fn irq_check(listen: bool) {
    distributor_on();
    init_cpu(0, CHECK_SGIS);
    spi_ownership();
    irqs(true);
    send_sgi(sgi_to(1, 0b1));
    let got = wait_ms(500, || count(0, 1) >= 1);
    check(
        "sgi-self",
        got,
        format_args!("SGI 1 taken {} times", count(0, 1)),
    );
    priorities_and_active();
    many_pending();
    sgis_to_vcpu1();
    if listen {
        isolation();
    }
    release_vcpu1();
    vtimer_checks();
    irqs(false);
}

/// The attacker (`arg` bit 13): a VM with one vCPU that, for [`ATTACK_SECONDS`], sends
/// SGI 8 to every other vCPU (IRM = 1) and SGI 9 to every Aff0 of Aff1 = 0, then checks
/// that only its own SGI 9 reached it (nothing else exists in its VM).
pub fn attack() {
    distributor_on();
    init_cpu(0, CHECK_SGIS);
    irqs(true);
    let (freq, start) = counter();
    let mut sent = 0u64;
    while counter().1.wrapping_sub(start) < freq * ATTACK_SECONDS {
        send_sgi(sgi_broadcast(8));
        send_sgi(sgi_to(9, 0xffff));
        sent += 2;
        wait_ms(1, || false);
    }
    irqs(false);
    let _ = writeln!(Uart, "sgi-attack: sent {sent} SGIs");
    check(
        "sgi-attack-stays-home",
        count(0, 8) == 0 && count(0, 9) >= 1,
        format_args!("own SGI 8 {} SGI 9 {}", count(0, 8), count(0, 9)),
    );
}

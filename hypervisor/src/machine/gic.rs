//! The physical GICv3, owned by EL2: the distributor and this CPU's redistributor set up
//! at start-up, the physical CPU interface (`ICC_*`) used at EL2 to acknowledge, drop the
//! priority of and deactivate interrupts and to send the hypervisor's own SGIs, and the
//! virtual CPU interface (`ICH_*_EL2`: list registers, `ICH_HCR_EL2`, `ICH_VMCR_EL2`)
//! through which guests receive interrupts. The decisions are the virtual GIC's
//! (`crate::vm::vgic`) and the vCPU's (`crate::vcpu::irq`); this file only does them.
//!
//! References: Arm GICv3/v4 architecture specification (IHI 0069 H): chapter 12 for the
//! GICD_*/GICR_* registers, 12.7-12.11 for ICC_*/ICH_*; Arm ARM (DDI 0487) for the system
//! register encodings (op0 3, op1 0 for ICC_*_EL1, op1 4 for ICH_*_EL2 and ICC_SRE_EL2).
//!
//! Settings (IHI 0069 chapter 4 "Physical interrupt handling and prioritization"):
//! - every interrupt is Group 1 (with one Security state, `GICD_CTLR.DS` = 1 on QEMU
//!   virt without EL3, Group 1 is signalled as IRQ), priority [`PRIORITY`];
//! - affinity routing on (`GICD_CTLR.ARE`); SPIs start disabled and are enabled and
//!   routed (`GICD_IROUTER`, never 1-of-N) only for the VM that owns them;
//! - at EL2: `ICC_SRE_EL2` = SRE | Enable (system registers; EL1's `ICC_SRE_EL1` does
//!   not trap, and with `HCR_EL2.{IMO,FMO}` set EL1's `ICC_*` accesses reach the
//!   virtual interface), `ICC_PMR_EL1` = 0xff, `ICC_CTLR_EL1.EOImode` = 1 (an
//!   `ICC_EOIR1_EL1` write only drops the priority; `ICC_DIR_EL1` deactivates, so an
//!   interrupt handed to a guest stays active until the guest's deactivation of its
//!   HW-bit list register deactivates it), `ICC_IGRPEN1_EL1` = 1;
//! - per CPU: the redistributor woken (`GICR_WAKER.ProcessorSleep` = 0, then wait for
//!   `ChildrenAsleep` = 0), its SGIs and PPIs Group 1, the hypervisor's SGI
//!   ([`crate::vcpu::irq::KICK_SGI`]), the maintenance interrupt and the EL1 timers'
//!   PPIs enabled, nothing active or pending.

use core::arch::asm;
use core::ptr::{read_volatile, write_volatile};

use aarch64_cpu::asm::barrier;
use aarch64_cpu::registers::{Readable, MPIDR_EL1};
use spin::Once;

use super::cpu::MPIDR_AFFINITY_MASK;
use crate::vcpu::irq::{KICK_SGI, MAINTENANCE_PPI};
use crate::vm::vgic::lr::{ICH_HCR_EN, MAX_LIST_REGS};
use crate::vm::vgic::{Flush, PhysAction, PhysGic, PPI_PTIMER, PPI_VTIMER};

/// Priority of every physical interrupt (all equal: EL2 takes them with IRQs masked,
/// one after the other).
pub const PRIORITY: u8 = 0xa0;

const GICD_CTLR: usize = 0x0000;
const GICD_TYPER: usize = 0x0004;
const GICD_IGROUPR: usize = 0x0080;
const GICD_ISENABLER: usize = 0x0100;
const GICD_ICENABLER: usize = 0x0180;
const GICD_ISPENDR: usize = 0x0200;
const GICD_ICPENDR: usize = 0x0280;
const GICD_ISACTIVER: usize = 0x0300;
const GICD_ICACTIVER: usize = 0x0380;
const GICD_IPRIORITYR: usize = 0x0400;
const GICD_ICFGR: usize = 0x0c00;
const GICD_IROUTER: usize = 0x6000;
/// `GICD_CTLR`: EnableGrp1 (bit 1 with DS = 1; EnableGrp1NS otherwise), ARE (bit 4 with
/// DS = 1; ARE_NS bit 4 otherwise), RWP (bit 31).
const CTLR_ENABLE_GRP1: u32 = 1 << 1;
const CTLR_ARE: u32 = 1 << 4;
const CTLR_RWP: u32 = 1 << 31;

const GICR_TYPER: usize = 0x0008;
const GICR_WAKER: usize = 0x0014;
const GICR_TYPER_LAST: u64 = 1 << 4;
const GICR_TYPER_VLPIS: u64 = 1 << 1;
const WAKER_PROCESSOR_SLEEP: u32 = 1 << 1;
const WAKER_CHILDREN_ASLEEP: u32 = 1 << 2;
/// `SGI_base` = `RD_base` + 64 KiB.
const SGI_BASE: usize = 0x1_0000;
const GICR_IGROUPR0: usize = SGI_BASE + 0x0080;
const GICR_ISENABLER0: usize = SGI_BASE + 0x0100;
const GICR_ICENABLER0: usize = SGI_BASE + 0x0180;
const GICR_ICPENDR0: usize = SGI_BASE + 0x0280;
const GICR_ICACTIVER0: usize = SGI_BASE + 0x0380;
const GICR_IPRIORITYR: usize = SGI_BASE + 0x0400;

/// The physical GIC's register frames.
#[derive(Clone, Copy, Debug)]
struct Frames {
    dist: usize,
    redist: usize,
    redist_size: usize,
}

static GIC: Once<Frames> = Once::new();

/// The address of the register `off` bytes into the frame at `base`. The frames come
/// from the checked device tree and every offset used lies inside its frame: the
/// address arithmetic (modulo 2^64, as the CPU's) does not wrap.
const fn at(base: usize, off: usize) -> usize {
    base.wrapping_add(off)
}

/// Offset of element `n` of a register array of `stride`-byte elements at `off` (`n`
/// is an INTID below 1024 or a block of them: the products are small).
const fn nth(off: usize, n: usize, stride: usize) -> usize {
    off.wrapping_add(n.wrapping_mul(stride))
}

fn read32(addr: usize) -> u32 {
    // SAFETY: every address passed here lies in the GIC's distributor or redistributor
    // frames, which the stage-1 table maps Device-nGnRE for the whole run ("gicd" and
    // "gicr"); 32-bit accesses are what these registers take (IHI 0069 12.1.3).
    unsafe { read_volatile(addr as *const u32) }
}

fn write32(addr: usize, value: u32) {
    // SAFETY: as `read32`.
    unsafe { write_volatile(addr as *mut u32, value) }
}

fn read64(addr: usize) -> u64 {
    // SAFETY: as `read32`; GICR_TYPER and GICD_IROUTER<n> take 64-bit accesses.
    unsafe { read_volatile(addr as *const u64) }
}

fn write64(addr: usize, value: u64) {
    // SAFETY: as `read64`.
    unsafe { write_volatile(addr as *mut u64, value) }
}

/// Waits for `GICD_CTLR.RWP` to clear (a distributor write took effect), at most a
/// bounded number of reads.
fn wait_rwp(dist: usize) {
    for _ in 0..1_000_000 {
        if read32(at(dist, GICD_CTLR)) & CTLR_RWP == 0 {
            return;
        }
        core::hint::spin_loop();
    }
    log::warn!("gic: GICD_CTLR.RWP did not clear");
}

/// Sets the distributor up for EL2 (primary CPU, once): disabled while every SPI is made
/// Group 1, priority [`PRIORITY`], disabled, inactive, not pending, level-sensitive and
/// routed to this CPU; then enabled with affinity routing and Group 1.
pub fn init_distributor(dist: u64, redist: u64, redist_size: u64) {
    let frames = GIC.call_once(|| Frames {
        dist: dist as usize,
        redist: redist as usize,
        redist_size: redist_size as usize,
    });
    let d = frames.dist;
    write32(at(d, GICD_CTLR), 0);
    wait_rwp(d);
    // GICD_TYPER.ITLinesNumber [4:0]: 32 × (N + 1) INTIDs, at most 1020 usable.
    let blocks = (read32(at(d, GICD_TYPER)) & 0x1f) as usize;
    let lines = ((blocks << 5) | 0x1f).min(1019).saturating_add(1);
    let me = MPIDR_EL1.get() & MPIDR_AFFINITY_MASK;
    for block in 1..=blocks {
        for reg in [GICD_ICENABLER, GICD_ICPENDR, GICD_ICACTIVER, GICD_IGROUPR] {
            write32(at(d, nth(reg, block, 4)), u32::MAX);
        }
    }
    let prio = u32::from_ne_bytes([PRIORITY; 4]);
    for intid in (32..lines).step_by(4) {
        write32(at(d, nth(GICD_IPRIORITYR, intid, 1)), prio);
    }
    for intid in (32..lines).step_by(16) {
        write32(at(d, nth(GICD_ICFGR, intid / 16, 4)), 0);
    }
    for intid in 32..lines {
        write64(at(d, nth(GICD_IROUTER, intid, 8)), route(me));
    }
    wait_rwp(d);
    write32(at(d, GICD_CTLR), CTLR_ARE | CTLR_ENABLE_GRP1);
    wait_rwp(d);
    log::info!(
        "gic: distributor at {dist:#x}: {lines} interrupt lines, SPIs off until a VM owns them"
    );
}

/// Whether the hypervisor drives a GICv3 ([`init_distributor`] ran).
pub fn present() -> bool {
    GIC.get().is_some()
}

/// `GICD_IROUTER` value for a CPU's MPIDR affinity (Aff3 at \[39:32\] in both).
const fn route(mpidr: u64) -> u64 {
    mpidr & 0xff_00ff_ffff
}

/// The `RD_base` of the redistributor of the CPU with affinity `mpidr`, found by
/// `GICR_TYPER.Affinity_Value` in the redistributor region.
fn redistributor(mpidr: u64) -> Option<usize> {
    let f = GIC.get()?;
    let aff = mpidr & MPIDR_AFFINITY_MASK;
    // GICR_TYPER[63:32] is Aff3.Aff2.Aff1.Aff0.
    let want = (aff & 0xff_ffff) | ((aff >> 32) << 24);
    // Offsets into the region, whose size the device tree gave: a redistributor is
    // read only where its two frames lie inside.
    let mut offset = 0usize;
    while offset
        .checked_add(2 * SGI_BASE)
        .is_some_and(|end| end <= f.redist_size)
    {
        let rd = at(f.redist, offset);
        let typer = read64(at(rd, GICR_TYPER));
        if typer >> 32 == want {
            return Some(rd);
        }
        if typer & GICR_TYPER_LAST != 0 {
            return None;
        }
        // Two 64 KiB frames, four with virtual LPIs (IHI 0069 12.10).
        let stride = if typer & GICR_TYPER_VLPIS != 0 {
            4 * SGI_BASE
        } else {
            2 * SGI_BASE
        };
        offset = offset.checked_add(stride)?;
    }
    None
}

/// Sets up this CPU's redistributor and physical CPU interface for EL2 (every CPU, each
/// time it comes up). Returns false if this CPU has no redistributor.
pub fn init_cpu() -> bool {
    let me = MPIDR_EL1.get() & MPIDR_AFFINITY_MASK;
    let Some(rd) = redistributor(me) else {
        return false;
    };
    let waker = read32(at(rd, GICR_WAKER));
    write32(at(rd, GICR_WAKER), waker & !WAKER_PROCESSOR_SLEEP);
    for _ in 0..1_000_000 {
        if read32(at(rd, GICR_WAKER)) & WAKER_CHILDREN_ASLEEP == 0 {
            break;
        }
        core::hint::spin_loop();
    }
    write32(at(rd, GICR_ICENABLER0), u32::MAX);
    write32(at(rd, GICR_ICPENDR0), u32::MAX);
    write32(at(rd, GICR_ICACTIVER0), u32::MAX);
    write32(at(rd, GICR_IGROUPR0), u32::MAX);
    let prio = u32::from_ne_bytes([PRIORITY; 4]);
    for intid in (0..32).step_by(4) {
        write32(at(rd, nth(GICR_IPRIORITYR, intid, 1)), prio);
    }
    write32(
        at(rd, GICR_ISENABLER0),
        (1 << KICK_SGI) | (1 << MAINTENANCE_PPI) | (1 << PPI_VTIMER) | (1 << PPI_PTIMER),
    );
    // SAFETY: the GIC system registers exist (the device tree names a GICv3 and its
    // redistributor answered). At EL2, ICC_*_EL1 are the physical CPU interface. SRE and
    // Enable in ICC_SRE_EL2: system-register interface at EL2, and EL1's ICC_SRE_EL1
    // does not trap. EOImode (ICC_CTLR_EL1 bit 1) = 1 splits priority drop and
    // deactivation. The ISBs make each write visible to the next access
    // (IHI 0069 12.1.6).
    unsafe {
        asm!(
            "mrs {t}, S3_4_C12_C9_5",  // ICC_SRE_EL2
            "orr {t}, {t}, #0x8",      // Enable
            "orr {t}, {t}, #0x1",      // SRE
            "msr S3_4_C12_C9_5, {t}",
            "isb",
            "mov {t}, #0xff",
            "msr S3_0_C4_C6_0, {t}",   // ICC_PMR_EL1
            "msr S3_0_C12_C12_3, xzr", // ICC_BPR1_EL1
            "mov {t}, #2",
            "msr S3_0_C12_C12_4, {t}", // ICC_CTLR_EL1: EOImode = 1
            "mov {t}, #1",
            "msr S3_0_C12_C12_7, {t}", // ICC_IGRPEN1_EL1
            "isb",
            t = out(reg) _,
            options(nostack),
        );
    }
    true
}

/// `ICH_VTR_EL2`.
pub fn ich_vtr() -> u64 {
    let v: u64;
    // SAFETY: reads an ID-like EL2 register of the GIC virtual interface.
    unsafe { asm!("mrs {}, S3_4_C12_C11_1", out(reg) v, options(nomem, nostack)) };
    v
}

/// Number of list registers (`ICH_VTR_EL2.ListRegs` + 1).
pub fn list_registers() -> usize {
    crate::vm::vgic::lr::list_regs_from_vtr(ich_vtr())
}

/// Acknowledges the highest-priority pending Group 1 interrupt (`ICC_IAR1_EL1`); 1020-1023
/// mean none.
pub fn acknowledge() -> u32 {
    let v: u64;
    // SAFETY: at EL2 ICC_IAR1_EL1 is the physical CPU interface, set up by `init_cpu`.
    unsafe { asm!("mrs {}, S3_0_C12_C12_0", out(reg) v, options(nostack)) };
    (v & 0xff_ffff) as u32
}

/// Drops the running priority of `intid` (`ICC_EOIR1_EL1`; with EOImode = 1 it stays
/// active).
pub fn priority_drop(intid: u32) {
    // SAFETY: as `acknowledge`; `intid` was acknowledged on this CPU.
    unsafe { asm!("msr S3_0_C12_C12_1, {}", "isb", in(reg) u64::from(intid), options(nostack)) };
}

/// Deactivates `intid` (`ICC_DIR_EL1`).
pub fn deactivate(intid: u32) {
    // SAFETY: as `priority_drop`.
    unsafe { asm!("msr S3_0_C12_C11_1, {}", "isb", in(reg) u64::from(intid), options(nostack)) };
}

/// Sends the hypervisor's SGI [`KICK_SGI`] to the CPU with affinity `mpidr`
/// (`ICC_SGI1R_EL1` at EL2: Aff3 \[55:48\], Aff2 \[39:32\], INTID \[27:24\], Aff1
/// \[23:16\], RS \[47:44\] = Aff0 / 16, TargetList bit Aff0 % 16).
pub fn kick(mpidr: u64) {
    let aff0 = mpidr & 0xff;
    let value = (((mpidr >> 32) & 0xff) << 48)
        | (((mpidr >> 16) & 0xff) << 32)
        | ((aff0 >> 4) << 44)
        | (u64::from(KICK_SGI) << 24)
        | (((mpidr >> 8) & 0xff) << 16)
        | (1 << (aff0 & 0xf));
    // SAFETY: at EL2 this writes the physical CPU interface: an SGI of the hypervisor's
    // own to one CPU. The DSB orders the caller's memory writes (the virtual GIC state
    // the kicked CPU reads) before the SGI (IHI 0069 12.11).
    unsafe {
        asm!("dsb ishst", "msr S3_0_C12_C11_5, {}", "isb", in(reg) value, options(nostack));
    }
}

macro_rules! lr_access {
    ($($n:literal => $reg:literal),* $(,)?) => {
        /// Reads `ICH_LR<n>_EL2`.
        fn read_lr(n: usize) -> u64 {
            let v: u64;
            match n {
                // SAFETY: EL2 reads of the list registers; `n` is below ListRegs + 1.
                $($n => unsafe { asm!(concat!("mrs {}, ", $reg), out(reg) v, options(nomem, nostack)) },)*
                _ => v = 0,
            }
            v
        }

        /// Writes `ICH_LR<n>_EL2`.
        fn write_lr(n: usize, v: u64) {
            match n {
                // SAFETY: EL2 writes of the list registers; `n` is below ListRegs + 1.
                $($n => unsafe { asm!(concat!("msr ", $reg, ", {}"), in(reg) v, options(nomem, nostack)) },)*
                _ => {}
            }
        }
    };
}

lr_access! {
    0 => "S3_4_C12_C12_0", 1 => "S3_4_C12_C12_1", 2 => "S3_4_C12_C12_2", 3 => "S3_4_C12_C12_3",
    4 => "S3_4_C12_C12_4", 5 => "S3_4_C12_C12_5", 6 => "S3_4_C12_C12_6", 7 => "S3_4_C12_C12_7",
    8 => "S3_4_C12_C13_0", 9 => "S3_4_C12_C13_1", 10 => "S3_4_C12_C13_2", 11 => "S3_4_C12_C13_3",
    12 => "S3_4_C12_C13_4", 13 => "S3_4_C12_C13_5", 14 => "S3_4_C12_C13_6", 15 => "S3_4_C12_C13_7",
}

fn write_ich_hcr(v: u64) {
    // SAFETY: ICH_HCR_EL2 only configures the virtual CPU interface EL1 sees.
    unsafe { asm!("msr S3_4_C12_C11_0, {}", "isb", in(reg) v, options(nostack)) };
}

/// Resets the virtual CPU interface for a vCPU that starts on this CPU: every list
/// register empty, no active priorities (`ICH_AP0R<n>_EL2`, `ICH_AP1R<n>_EL2`; how many
/// exist follows `ICH_VTR_EL2.PREbits`), `ICH_VMCR_EL2` = 0 (both groups off, priority
/// mask 0: the guest sets its own), and the interface enabled (`ICH_HCR_EL2.En`).
pub fn vcpu_start(lrs: usize) {
    for n in 0..lrs {
        write_lr(n, 0);
    }
    // ICH_VTR_EL2.PREbits [28:26] is the number of preemption bits - 1: 7 bits need
    // four active-priority registers of each group, 6 bits two, 5 bits one.
    let aprs = match (ich_vtr() >> 26) & 0x7 {
        6 => 4,
        5 => 2,
        _ => 1,
    };
    // SAFETY: EL2 writes of the virtual interface's active-priority and control
    // registers; only the registers PREbits says exist are written.
    unsafe {
        asm!(
            "msr S3_4_C12_C8_0, xzr",
            "msr S3_4_C12_C9_0, xzr",
            options(nostack)
        );
        if aprs >= 2 {
            asm!(
                "msr S3_4_C12_C8_1, xzr",
                "msr S3_4_C12_C9_1, xzr",
                options(nostack)
            );
        }
        if aprs >= 4 {
            asm!(
                "msr S3_4_C12_C8_2, xzr",
                "msr S3_4_C12_C9_2, xzr",
                "msr S3_4_C12_C8_3, xzr",
                "msr S3_4_C12_C9_3, xzr",
                options(nostack)
            );
        }
        asm!("msr S3_4_C12_C11_7, xzr", options(nostack)); // ICH_VMCR_EL2
    }
    write_ich_hcr(ICH_HCR_EN);
}

/// Loads a flush of the virtual GIC before a VM entry and returns how many list registers
/// hold an interrupt now (the first ones). Only the list registers that hold one now or
/// may still hold one from the last entry (the first `live`) are written: the guest
/// cannot make a list register valid, so the others are still invalid. `ICH_HCR_EL2` is
/// written only when the flush asks for maintenance; otherwise it is already `En` alone
/// ([`vcpu_start`], [`save`]), and `ERET` synchronizes the list register writes.
pub fn load(flush: &Flush, live: usize) -> usize {
    for (n, lr) in flush.lrs().iter().enumerate().take(flush.used().max(live)) {
        write_lr(n, lr.0);
    }
    if flush.hcr() != 0 {
        write_ich_hcr(ICH_HCR_EN | flush.hcr());
    }
    flush.used()
}

/// Reads the first `used` list registers back after an exit into `out` (the others held
/// no interrupt and the guest cannot have changed that), and `ICH_VMCR_EL2`; then, if the
/// entry asked for `maintenance`, turns the requests off so the maintenance interrupt is
/// not raised again while EL2 runs.
pub fn save(out: &mut [u64; MAX_LIST_REGS], used: usize, maintenance: bool) -> u64 {
    for (n, slot) in out.iter_mut().enumerate().take(used) {
        *slot = read_lr(n);
    }
    let vmcr: u64;
    // SAFETY: EL2 read of ICH_VMCR_EL2.
    unsafe { asm!("mrs {}, S3_4_C12_C11_7", out(reg) vmcr, options(nomem, nostack)) };
    if maintenance {
        write_ich_hcr(ICH_HCR_EN);
    }
    vmcr
}

/// Turns the virtual CPU interface off (no vCPU runs here): list registers emptied,
/// `ICH_HCR_EL2` = 0.
pub fn vcpu_stop(lrs: usize) {
    for n in 0..lrs {
        write_lr(n, 0);
    }
    write_ich_hcr(0);
    barrier::isb(barrier::SY);
}

/// Applies the virtual GICs' changes to the physical GIC.
#[derive(Clone, Copy, Debug, Default)]
pub struct Physical;

/// Sets (`set` register) or clears (`clear` register) bit `intid` of a 1-bit-per-
/// interrupt distributor register pair.
fn dist_bit(dist: usize, set: usize, clear: usize, intid: u32, on: bool) {
    let reg = if on { set } else { clear };
    write32(
        at(dist, nth(reg, intid as usize / 32, 4)),
        1 << (intid % 32),
    );
}

impl PhysGic for Physical {
    fn apply(&mut self, action: PhysAction) {
        let Some(f) = GIC.get() else { return };
        let d = f.dist;
        match action {
            PhysAction::Enable { pintid, enable } => {
                dist_bit(d, GICD_ISENABLER, GICD_ICENABLER, pintid, enable);
                if !enable {
                    wait_rwp(d);
                }
            }
            // The physical priority stays EL2's; the guest's priority is the virtual one
            // (in the list register).
            PhysAction::Priority { .. } => {}
            PhysAction::Trigger { pintid, level } => {
                // Int_config[1] of INTID n is bit 2(n % 16) + 1 of GICD_ICFGR<n / 16>.
                let reg = at(d, nth(GICD_ICFGR, pintid as usize / 16, 4));
                let shift = ((pintid % 16) << 1) | 1;
                let v = read32(reg);
                let v = if level {
                    v & !(1 << shift)
                } else {
                    v | (1 << shift)
                };
                write32(reg, v);
            }
            PhysAction::Route { pintid, mpidr } => {
                write64(at(d, nth(GICD_IROUTER, pintid as usize, 8)), route(mpidr));
            }
            PhysAction::Pending { pintid, pending } => {
                dist_bit(d, GICD_ISPENDR, GICD_ICPENDR, pintid, pending);
            }
            PhysAction::Active { pintid, active } => {
                dist_bit(d, GICD_ISACTIVER, GICD_ICACTIVER, pintid, active);
            }
            PhysAction::DeactivatePrivate { mpidr, pintid } => {
                if let Some(rd) = redistributor(mpidr) {
                    write32(at(rd, GICR_ICACTIVER0), 1 << (pintid % 32));
                    write32(at(rd, GICR_ICPENDR0), 1 << (pintid % 32));
                }
            }
        }
    }
}

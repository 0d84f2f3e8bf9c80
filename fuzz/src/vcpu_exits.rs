//! `vcpu_exits`: guest exits as a hostile guest makes them, on the four vCPUs of three
//! VMs, through the host-testable exit handler (`hypervisor::vcpu::handle_exit`) and the
//! run loop's decisions (`hypervisor::vcpu::schedule`), with the manager over real
//! stage-2 tables: random syndromes (the exception class from a list, the ISS raw),
//! FAR and HPFAR, register values, hypercall function IDs (PSCI, SMCCC, vendor, memory
//! sharing, unknown), PSTATE, from vCPUs that are on, off or being started.
//!
//! Input: [`OP_LEN`]-byte records, one exit each (at most [`MAX_OPS`]).
//!
//! Modelled run loop, per physical CPU: a parked CPU takes a pending start
//! (`schedule::next_start`) and enters; an exit is handled; on `Stop` the CPU leaves
//! (`schedule::vcpu_left`, which destroys a finished VM), on `Reset` it resets the VM
//! first. A destroyed VM is made again from its description the next time a record
//! names it.
//!
//! After every exit: the world invariants ([`World::check`]); no other VM changed state;
//! only an SError may end the machine's run (`Next::Fatal`, which ends the input);
//! a VM that is not running is never resumed; after a hypercall x4..x30 are as they
//! were; an injected abort enters the guest at `VBAR_EL1` plus the vector of the state
//! it came from, with PSTATE EL1h and D, A, I, F masked, and `ESR_EL1`, `ELR_EL1` and
//! `SPSR_EL1` as the architecture sets them.

use hypervisor::mem::PhysAddr;
use hypervisor::vcpu::schedule::{self, Start};
use hypervisor::vcpu::{handle_exit, GuestEl1, Next, VcpuCtx};
use hypervisor::vm::share::fid;
use hypervisor::vm::vgic::{PhysAction, PhysGic, VcpuMask};
use hypervisor::vm::vuart::LineSink;
use hypervisor::vm::{GuestMemory, VmStatus};

use crate::input::{pick, Bytes};
use crate::world::{World, DEVICE, FREE, RAM, RAM2, VUART};

/// Bytes of one exit record.
pub const OP_LEN: usize = 24;
/// Most exits read from one input.
pub const MAX_OPS: usize = 48;

/// Exception classes (ESR_EL2.EC, Arm ARM D24.2.40): HVC64, SMC64, HVC32, SMC32, WFx,
/// data and instruction aborts from a lower EL, MSR/MRS, unknown, SVE, FP, BRK, SError's
/// class, and a raw one.
const CLASSES: [u64; 14] = [
    0x16, 0x17, 0x12, 0x13, 0x01, 0x24, 0x20, 0x18, 0x00, 0x19, 0x07, 0x3c, 0x2f, 0xff,
];

/// IPAs of an abort: the virtual UART, RAM, the second RAM region, the pass-through
/// page, where borrowed pages go, nothing, the top of the IPA space and above it.
const IPAS: [u64; 10] = [
    VUART,
    // The virtual GIC's distributor and redistributors (every VM's, QEMU virt's IPAs).
    0x0800_0000,
    0x080a_0000,
    RAM,
    RAM2,
    DEVICE,
    FREE,
    0x7000_0000,
    (1 << 39) - 0x1000,
    1 << 48,
];

/// Function IDs: PSCI (VERSION, CPU_SUSPEND, CPU_OFF, CPU_ON, AFFINITY_INFO,
/// MIGRATE_INFO_TYPE, SYSTEM_OFF, SYSTEM_RESET, FEATURES, 32-bit CPU_ON), SMCCC
/// (VERSION, ARCH_FEATURES, ARCH_WORKAROUND_1..3), the vendor calls and memory sharing
/// (docs/hypercalls.md), and unknown ones.
const FIDS: [u64; 26] = [
    0x8400_0000,
    0xC400_0001,
    0x8400_0002,
    0xC400_0003,
    0xC400_0004,
    0x8400_0006,
    0x8400_0008,
    0x8400_0009,
    0x8400_000A,
    0x8400_0003,
    0x8000_0000,
    0x8000_0001,
    0x8000_8000,
    0x8000_7FFF,
    0x8000_3FFF,
    0x8600_FF00,
    0x8600_FF01,
    0x8600_FF03,
    0xC600_0001,
    0xC600_0002,
    0xC600_0003,
    fid::SHARE as u64,
    fid::LEND as u64,
    fid::RETRIEVE as u64,
    0xC600_00FF,
    0xFFFF_FFFF_C400_0003,
];

/// Arguments: small numbers and vCPU indices, MPIDRs, entry points in and out of RAM,
/// unaligned, a borrowed-page IPA, the all-ones value.
const ARGS: [u64; 12] = [
    0,
    1,
    2,
    0x100,
    RAM + 0x1000,
    RAM + 0x1002,
    0x7000_0000,
    FREE,
    0x8000_0000_0000_0001,
    3,
    7,
    u64::MAX,
];

/// PSTATE: EL1h, EL1t, EL0 (AArch64), AArch32 user and supervisor, EL2h (impossible from
/// a guest), raw.
const PSTATES: [u64; 7] = [0x3c5, 0x3c4, 0x0, 0x10, 0x13, 0x3c9, 0xff];

/// The guest's EL1 exception registers.
struct El1 {
    vbar: u64,
    injected: Option<(u64, u64, u64, u64)>,
}

impl GuestEl1 for El1 {
    fn vbar(&self) -> u64 {
        self.vbar
    }
    fn set_exception(&mut self, esr: u64, far: u64, elr: u64, spsr: u64) {
        self.injected = Some((esr, far, elr, spsr));
    }
    /// The guest's stage 1 maps every address to itself (the MMU off): a permission
    /// fault's IPA is its `FAR_EL2`, which the input chooses.
    fn stage1_ipa(&mut self, va: u64) -> Option<u64> {
        Some(va)
    }
}

/// Console lines, counted and dropped.
struct Lines(usize);

impl LineSink for Lines {
    fn line(&mut self, _name: &str, _text: &str) {
        self.0 += 1;
    }

    fn event(&mut self, _level: log::Level, _args: core::fmt::Arguments<'_>) {
        self.0 += 1;
    }

    fn micros(&self) -> u64 {
        // Time stands still: every VM's console budget runs out, as in a flood.
        0
    }
}

/// What one exit reaches: the EL1 registers, the console, the physical GIC (whose
/// changes are checked to be for the VM's own interrupts: it owns none here).
struct Host<'a> {
    el1: &'a mut El1,
    lines: &'a mut Lines,
}

impl GuestEl1 for Host<'_> {
    fn vbar(&self) -> u64 {
        self.el1.vbar()
    }
    fn set_exception(&mut self, esr: u64, far: u64, elr: u64, spsr: u64) {
        self.el1.set_exception(esr, far, elr, spsr);
    }
    fn stage1_ipa(&mut self, va: u64) -> Option<u64> {
        self.el1.stage1_ipa(va)
    }
}

impl LineSink for Host<'_> {
    fn line(&mut self, name: &str, text: &str) {
        self.lines.line(name, text);
    }
    fn event(&mut self, level: log::Level, args: core::fmt::Arguments<'_>) {
        self.lines.event(level, args);
    }
    fn micros(&self) -> u64 {
        self.lines.micros()
    }
}

/// Guest RAM is not modelled here (`NoMemory`): a first touch's scrub changes nothing.
impl GuestMemory for Host<'_> {
    fn zero(&self, _: PhysAddr, _: u64) {}
    fn load(
        &self,
        _: PhysAddr,
        _: hypervisor::config::ImageSource,
        _: u64,
    ) -> Result<(), hypervisor::config::fw_cfg::FwCfgError> {
        Ok(())
    }
    fn clean_to_poc(&self, _: u64, _: u64) {}
}

impl PhysGic for Host<'_> {
    fn apply(&mut self, action: PhysAction) {
        // No VM of the description owns a hardware interrupt: nothing a guest does may
        // change the physical GIC.
        panic!("a guest's exit changed the physical GIC: {action:?}");
    }
}

/// The registers of a vCPU in the guest.
#[derive(Clone)]
struct Regs {
    x: [u64; 31],
    pc: u64,
    pstate: u64,
}

/// A physical CPU: parked (`None`), or running its vCPU.
type Cpu = Option<Regs>;

/// The registers at a vCPU's start.
fn start(entry: u64, context: u64) -> Cpu {
    let mut x = [0u64; 31];
    x[0] = context;
    Some(Regs {
        x,
        pc: entry,
        pstate: 0x3c5,
    })
}

/// (slot, vCPU) of every physical CPU: vm0's, vm1's two, vm2's.
const CPUS: [(usize, usize); 4] = [(0, 0), (1, 0), (1, 1), (2, 0)];

/// The CPUs of a VM just made by [`World::create`] (vCPU 0 started): its vCPU 0 enters.
fn created(w: &World<'_>, slot: usize, cpus: &mut [Cpu]) {
    let vm = &w.vms[slot];
    for (k, &(s, index)) in CPUS.iter().enumerate() {
        if s == slot {
            cpus[k] = if index == 0 {
                vm.enter();
                start(vm.desc.entry.get(), vm.desc.boot_x0())
            } else {
                None
            };
        }
    }
}

/// The exception registers of an abort injected for `exit` taken at `(pc, pstate)`:
/// `ELR_EL1` = the faulting instruction, `SPSR_EL1` = its PSTATE, `ESR_EL1` a synchronous
/// external abort (DFSC/IFSC 0x10) of the same kind, from the same EL (EC 0x25/0x21) or a
/// lower one (0x24/0x20), with IL as the trapped instruction's (always 1 for an
/// instruction abort) (Arm ARM D24.2.40).
fn check_injection(exit: &boot::Exit, (pc, pstate): (u64, u64), (esr, elr, spsr): (u64, u64, u64)) {
    let boot::Exit::Sync { esr: trapped, .. } = exit else {
        panic!("an abort injected for {exit:x?}");
    };
    assert_eq!((elr, spsr), (pc, pstate), "ELR_EL1 and SPSR_EL1");
    let trapped = trapped.bits();
    let instruction = trapped >> 26 == 0x20;
    assert_eq!(esr & 0x3f, 0x10, "a synchronous external abort");
    let il = instruction || trapped & (1 << 25) != 0;
    assert_eq!(
        esr & (1 << 25) != 0,
        il,
        "ESR_EL1.IL of {esr:#x} for {trapped:#x}"
    );
    // EL1t/EL1h, or EL0 (AArch64 EL0t, or AArch32: EL1 is always AArch64 here); a guest
    // never runs in the other modes.
    let from_el1 = match (pstate & 0x10 != 0, pstate & 0xf) {
        (false, 0b0100 | 0b0101) => true,
        (false, 0b0000) | (true, _) => false,
        _ => return,
    };
    let ec = match (instruction, from_el1) {
        (false, true) => 0x25,
        (false, false) => 0x24,
        (true, true) => 0x21,
        (true, false) => 0x20,
    };
    assert_eq!(
        esr >> 26,
        ec,
        "ESR_EL1.EC of {esr:#x} from PSTATE {pstate:#x}"
    );
}

/// The exit of record `r`; `raw` is its last 8 bytes.
fn exit_of(r: &[u8; OP_LEN], raw: u64) -> boot::Exit {
    let class = match pick(&CLASSES, r[2]) {
        0xff => u64::from(r[3] & 0x3f),
        ec => ec,
    };
    let iss =
        u64::from(r[3]) | u64::from(r[4]) << 8 | u64::from(r[5]) << 16 | u64::from(r[6] & 1) << 24;
    let il = u64::from(r[6] >> 7);
    let esr = boot::esr::Esr::from_bits(class << 26 | il << 25 | iss);
    let ipa = pick(&IPAS, r[7]) + u64::from(r[8]) * 0x1000 + u64::from(r[9] & 0xf8);
    let (far, hpfar) = if r[1] & 0x40 != 0 {
        (raw, raw.rotate_left(17))
    } else {
        (0xffff_0000_0000_0000 | (ipa & 0xfff), (ipa >> 12) << 4)
    };
    match r[0] % 16 {
        0 => boot::Exit::Irq,
        1 => boot::Exit::Fiq,
        2 => boot::Exit::SError { esr },
        _ => boot::Exit::Sync { esr, far, hpfar },
    }
}

/// Runs one input.
///
/// # Panics
///
/// When an invariant breaks.
pub fn run(data: &[u8]) {
    let frames = mmu::testing::HeapFrames::new();
    let mut w = World::new(&frames);
    let mut cpus = vec![None; CPUS.len()];
    for slot in 0..3 {
        created(&w, slot, &mut cpus);
    }
    let mut lines = Lines(0);
    let mut b = Bytes::new(data);
    for _ in 0..MAX_OPS {
        let Some(r) = b.record::<OP_LEN>() else {
            break;
        };
        let raw = u64::from_le_bytes(core::array::from_fn(|i| r[16 + i]));
        let c = usize::from(r[1] & 3);
        let (slot, index) = CPUS[c];
        if w.vms[slot].stage2.lock().is_none() {
            // Destroyed when its last vCPU left: the VM comes back.
            w.vms[slot] = w.create(slot);
            created(&w, slot, &mut cpus);
        }
        let vm = std::sync::Arc::clone(&w.vms[slot]);
        if cpus[c].is_none() {
            match schedule::next_start(&vm, index) {
                // Taking the start counted the vCPU loaded.
                Start::Enter { entry, context } => {
                    cpus[c] = start(entry.get(), context);
                }
                Start::Wait | Start::Done => {
                    w.check();
                    continue;
                }
            }
        }
        let Some(Regs { x, pc, pstate }) = &mut cpus[c] else {
            continue;
        };
        // What the guest put in its registers before it trapped.
        x[0] = match r[10] {
            0xff => raw,
            0xfe => raw & 0xffff_ffff,
            s => pick(&FIDS, s),
        };
        for (k, &s) in r[11..14].iter().enumerate() {
            x[k + 1] = if s == 0xff {
                raw.rotate_left(8 * k as u32)
            } else {
                pick(&ARGS, s)
            };
        }
        x[usize::from(r[9] & 7) + 4] = raw;
        *pstate = match pick(&PSTATES, r[14]) {
            0xff => raw & 0xffff_ffff,
            p => p,
        };
        let exit = exit_of(&r, raw);
        let (before_x, before_pc, before_pstate) = (*x, *pc, *pstate);
        let others: Vec<VmStatus> = w
            .vms
            .iter()
            .filter(|v| v.id != vm.id)
            .map(|v| v.status())
            .collect();
        let mut el1 = El1 {
            vbar: RAM + u64::from(r[15]) * 0x800,
            injected: None,
        };
        let m = &w.m;
        let next = {
            let mut ctx = VcpuCtx { x, pc, pstate };
            let mut host = Host {
                el1: &mut el1,
                lines: &mut lines,
            };
            let mut kicks = VcpuMask::EMPTY;
            let next = handle_exit(
                &vm,
                index,
                &mut ctx,
                exit,
                &mut host,
                &mut |req| m.share_call(&vm, index, req),
                &mut kicks,
            );
            assert!(
                kicks.iter().all(|k| k < vm.desc.cpus.len()),
                "{} kicked a vCPU it does not have: {kicks:?}",
                vm.desc.name
            );
            next
        };
        let after: Vec<VmStatus> = w
            .vms
            .iter()
            .filter(|v| v.id != vm.id)
            .map(|v| v.status())
            .collect();
        assert_eq!(
            after, others,
            "an exit of {} changed another VM",
            vm.desc.name
        );
        if next == Next::Resume {
            assert_eq!(
                vm.status(),
                VmStatus::Running,
                "{} resumed while not running",
                vm.desc.name
            );
        }
        let is_call =
            matches!(exit, boot::Exit::Sync { esr, .. } if matches!(esr.bits() >> 26, 0x16 | 0x17));
        if is_call && next == Next::Resume {
            assert_eq!(x[4..], before_x[4..], "a hypercall changed x4..x30");
        }
        if let Some((esr, _far, elr, spsr)) = el1.injected {
            check_injection(&exit, (before_pc, before_pstate), (esr, elr, spsr));
            let offset = pc.wrapping_sub(el1.vbar);
            // The vector of the state the abort came from (Arm ARM D1.10.2): EL1 with
            // SP_EL0 +0x000, with SP_EL1 +0x200, EL0 in AArch64 +0x400, AArch32 +0x600.
            let expected = if before_pstate & 0x10 != 0 {
                Some(0x600)
            } else {
                match before_pstate & 0xf {
                    0b0100 => Some(0x000),
                    0b0101 => Some(0x200),
                    0b0000 => Some(0x400),
                    // EL2 and EL3 modes: a guest never runs in them.
                    _ => None,
                }
            };
            if let Some(e) = expected {
                assert_eq!(offset, e, "vector offset from PSTATE {before_pstate:#x}");
            }
            // EL1h, AArch64, D, A, I, F masked; only N, Z, C, V, DIT, PAN and SSBS may be
            // carried over (Arm ARM D1.10.4).
            let kept = 0xf000_0000 | 1 << 24 | 1 << 22 | 1 << 12;
            assert_eq!(*pstate & !kept, 0x3c5, "PSTATE after an injected abort");
        }
        match next {
            Next::Resume => {}
            Next::Fatal => {
                // Only the hardware's word (an uncontainable SError) ends the machine's
                // run; nothing else a guest does may.
                assert!(
                    matches!(exit, boot::Exit::SError { .. }),
                    "{exit:x?} of {} ended the run",
                    vm.desc.name
                );
                w.check();
                break;
            }
            // The last CPU out of a VM whose reset was asked resets it.
            Next::Stop => {
                cpus[c] = None;
                let _ = schedule::vcpu_left(m, &vm);
            }
        }
        w.check();
    }
    // The CPUs still in a guest leave it; every VM is destroyed.
    for (k, cpu) in cpus.iter().enumerate() {
        if cpu.is_some() {
            let vm = &w.vms[CPUS[k].0];
            if vm.stage2.lock().is_some() {
                let _ = vm.leave();
            }
        }
    }
    w.finish();
}

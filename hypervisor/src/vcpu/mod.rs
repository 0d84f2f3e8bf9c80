//! What a physical CPU does with one exit of the vCPU it runs: decode, then emulate the
//! virtual UART, answer a hypercall, inject an abort, or stop the vCPU or the VM.
//!
//! Register state is passed in as plain values and the guest's EL1 exception registers
//! behind [`GuestEl1`], so this is tested on the host; the machine's run loop
//! (`crate::machine::run`) supplies the real ones.

pub mod cpu_state;
pub mod exit;
pub mod hypercall;
pub mod irq;
pub mod schedule;

use crate::config::{AbortPolicy, EmulatedDevice, VUART_INTID};
use crate::mem::{Ipa, PhysAddr, PAGE_SIZE};
use crate::vm::share::PageState;
use crate::vm::share::{Note, Request};
use crate::vm::vgic::{sgi::SgiRegister, MmioError, PhysGic, VcpuMask};
use crate::vm::vuart::{LineSink, Written};
use crate::vm::{GuestMemory, Stage2Table, Touch, Vm, VmStatus};
use boot::esr::FaultStatus;
use boot::esr::{DataAccess, Esr, SysRegAccess};
use core::sync::atomic::Ordering;
use exit::{Abort, Exit};
use hypercall::{Caller, Outcome};

/// The general-purpose state of a vCPU at an exit.
#[derive(Debug)]
pub struct VcpuCtx<'a> {
    /// x0..x30.
    pub x: &'a mut [u64; 31],
    /// PC (`ELR_EL2`).
    pub pc: &'a mut u64,
    /// PSTATE (`SPSR_EL2`).
    pub pstate: &'a mut u64,
}

impl VcpuCtx<'_> {
    /// General-purpose register `n` as a register-transfer instruction reads it: `n` is
    /// the syndrome's 5-bit Rt/SRT field, where 31 names XZR (Arm ARM DDI 0487,
    /// C1.2.5), which reads as zero, as does any larger number.
    #[must_use]
    pub fn reg(&self, n: u8) -> u64 {
        self.x.get(usize::from(n)).copied().unwrap_or(0)
    }

    /// Writes general-purpose register `n` (31, XZR, and larger numbers discard it).
    pub fn set_reg(&mut self, n: u8, value: u64) {
        if let Some(r) = self.x.get_mut(usize::from(n)) {
            *r = value;
        }
    }
}

/// The guest's EL1 registers an abort injection needs, and the CPU state it shares with
/// EL2 (`cpu_state`).
pub trait GuestEl1 {
    /// `VBAR_EL1`.
    fn vbar(&self) -> u64;
    /// Writes `ESR_EL1`, `FAR_EL1`, `ELR_EL1` and `SPSR_EL1`.
    fn set_exception(&mut self, esr: u64, far: u64, elr: u64, spsr: u64);
    /// The IPA the guest's stage 1 maps `va` to now (`AT S1E1R`, `PAR_EL1` kept as the
    /// guest left it), or `None` if it maps nothing there: the IPA of a stage-2
    /// permission fault, for which `HPFAR_EL2` is not valid ([`exit::Abort::ipa_valid`]).
    fn stage1_ipa(&mut self, va: u64) -> Option<u64>;
    /// `SCTLR_EL1` (its SPAN and DSSBS bits shape PSTATE on exception entry). Provided:
    /// SPAN set, DSSBS clear, as on a CPU without FEAT_PAN and FEAT_SSBS.
    fn sctlr(&self) -> u64 {
        SCTLR_SPAN
    }
    /// The EL2 controls this CPU runs guests with.
    ///
    /// The provided methods describe a CPU without PMU, RAS or any other optional
    /// feature, on which nothing is emulated (for tests that do not need them); the
    /// machine layer implements every method.
    fn controls(&self) -> cpu_state::El2Controls {
        cpu_state::El2Controls::for_cpu(&cpu_state::IdRegs::default())
    }
    /// Whether the CPU has FEAT_RAS (SError syndromes carry a severity).
    fn has_ras(&self) -> bool {
        false
    }
    /// `PMCR_EL0`.
    fn pmcr(&self) -> u64 {
        0
    }
    /// Writes `PMCR_EL0`.
    fn set_pmcr(&mut self, _value: u64) {}
    /// Makes a virtual SError pending for the guest (`HCR_EL2.VSE`, `VSESR_EL2`).
    fn inject_serror(&mut self, _vsesr: Option<u64>) {}
    /// Cleans and invalidates the data cache to the point of coherency over the host
    /// physical range `[pa, pa + len)` of the VM's RAM.
    fn clean_invalidate(&mut self, _pa: PhysAddr, _len: u64) {}
    /// Drops what this CPU's TLB holds for the running VM at IPA `ipa` (the stage-2 entry
    /// and the combined stage-1-and-2 entries), or everything it holds for the VM if the
    /// IPA is not known: a local, non-shareable invalidation. A chunk opened on first
    /// touch is opened without a broadcast invalidation (`Stage2Table::relax`), so this
    /// CPU may still hold the entry it faulted on.
    fn invalidate_local(&mut self, _ipa: Option<Ipa>) {}
}

/// Handles a trapped system-register access or set/way instruction (`cpu_state::sysreg`);
/// `None` when it is not one the controls trap on purpose.
fn sysreg<S>(
    vm: &Vm<S>,
    ctx: &mut VcpuCtx<'_>,
    access: &boot::esr::SysRegAccess,
    el1: &mut impl GuestEl1,
) -> Option<Next> {
    use cpu_state::sysreg::{decide, Action, PMCR_DP};
    let operand = ctx.reg(access.rt);
    let read = |ctx: &mut VcpuCtx<'_>, value: u64| ctx.set_reg(access.rt, value);
    match decide(access, operand, &el1.controls()) {
        Action::Unhandled => return None,
        Action::RazWi if access.read => read(ctx, 0),
        Action::RazWi => {}
        Action::PmcrRead => read(ctx, el1.pmcr()),
        Action::PmcrWrite => el1.set_pmcr(operand | PMCR_DP),
        Action::SetWay { sweep_start } => {
            // One sweep of a level by set/way is one clean+invalidate by VA of the VM's
            // RAM: the guest's intent (its data at the point of coherency) without
            // touching lines of other VMs in shared caches.
            if sweep_start {
                for r in &vm.desc.memory {
                    el1.clean_invalidate(r.pa, r.size);
                }
            }
        }
    }
    *ctx.pc = ctx.pc.wrapping_add(4);
    Some(Next::Resume)
}

/// Handles an SError taken from the guest (`cpu_state::serror`).
fn serror<S>(vm: &Vm<S>, esr: Esr, host: &mut impl Host) -> Next {
    use cpu_state::serror::{decide, Action};
    let iss = esr.bits() & 0x1ff_ffff;
    match decide(iss, host.has_ras(), vm.desc.abort) {
        // A guest may cause these in a loop: within the VM's budget of lines.
        Action::Resume => {
            vm.log(
                host,
                log::Level::Warn,
                format_args!(
                    "VM {}: corrected error (SError, ESR {:#x})",
                    vm.desc.name,
                    esr.bits()
                ),
            );
            Next::Resume
        }
        Action::Inject { vsesr } => {
            vm.log(
                host,
                log::Level::Warn,
                format_args!(
                    "VM {}: SError (ESR {:#x}) injected as a virtual SError",
                    vm.desc.name,
                    esr.bits()
                ),
            );
            host.inject_serror(vsesr);
            Next::Resume
        }
        Action::StopVm => stop_vm_flushed(vm, host, format_args!("SError (ESR {:#x})", esr.bits())),
        Action::Fatal => {
            log::error!(
                "VM {}: uncontainable SError (ESR {:#x}): the machine stops",
                vm.desc.name,
                esr.bits()
            );
            Next::Fatal
        }
    }
}

/// What an exit needs from the machine: the guest's EL1 exception registers, the
/// console the virtual UART prints on, and the physical GIC a virtual GIC drives.
pub trait Host: GuestEl1 + LineSink + PhysGic + GuestMemory {}

impl<T: GuestEl1 + LineSink + PhysGic + GuestMemory> Host for T {}

/// What the physical CPU does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Enter the guest again.
    Resume,
    /// This vCPU is off (CPU_OFF, VM powered off, reset or stopped): leave the guest
    /// ([`crate::vm::Vm::leave`] says whether this CPU now destroys or resets the VM)
    /// and wait for a start.
    Stop,
    /// An error that may reach beyond this VM (an uncontainable SError): end the run.
    Fatal,
}

/// PSTATE for an exception taken to EL1h with D, A, I, F masked (SPSR M\[3:0\] = 0b0101).
pub const PSTATE_EL1H_MASKED: u64 = 0x3c5;

/// AArch64 SPSR/PSTATE bits (Arm ARM C5.2.18, SPSR_EL2 for an exception from AArch64).
mod spsr64 {
    /// N, Z, C, V \[31:28\].
    pub const NZCV: u64 = 0xf << 28;
    /// DIT \[24\].
    pub const DIT: u64 = 1 << 24;
    /// PAN \[22\].
    pub const PAN: u64 = 1 << 22;
    /// SSBS \[12\].
    pub const SSBS: u64 = 1 << 12;
    /// M\[4\] (nRW): the exception came from AArch32.
    pub const NRW: u64 = 1 << 4;
}

/// AArch32 SPSR bits that hold the same PSTATE fields at other places (Arm ARM C5.2.18,
/// SPSR_EL2 for an exception from AArch32): DIT \[21\]; PAN \[22\] and NZCV \[31:28\]
/// are where AArch64 has them.
const SPSR32_DIT: u64 = 1 << 21;

/// `SCTLR_EL1.SPAN` \[23\]: 0 sets PSTATE.PAN on an exception to EL1 (RES1 without
/// FEAT_PAN, so nothing changes on such a CPU).
const SCTLR_SPAN: u64 = 1 << 23;
/// `SCTLR_EL1.DSSBS` \[44\]: the PSTATE.SSBS value on an exception to EL1.
const SCTLR_DSSBS: u64 = 1 << 44;

/// Where an exception from the guest state `spsr` (as `SPSR_EL2` holds it) enters
/// `VBAR_EL1`, and whether it comes from EL0 (Arm ARM D1.10.2, "Exception vectors"):
/// current EL with SP_EL0 0x000, current EL with SP_ELx 0x200, lower EL in AArch64
/// 0x400, lower EL in AArch32 0x600 (+0 for a synchronous exception).
#[must_use]
pub const fn vector_offset(spsr: u64) -> (u64, bool) {
    if spsr & spsr64::NRW != 0 {
        // AArch32 state is only possible at EL0 (HCR_EL2.RW makes EL1 AArch64).
        return (0x600, true);
    }
    match spsr & 0xf {
        0b0100 => (0x000, false), // EL1t
        0b0101 => (0x200, false), // EL1h
        _ => (0x400, true),       // EL0t
    }
}

/// PSTATE on taking an exception to EL1h from guest state `spsr` (Arm ARM D1.10.4,
/// "PSTATE on exception entry", `AArch64.TakeException`): AArch64, EL1 with SP_EL1,
/// D, A, I, F masked; N, Z, C, V and DIT kept (DIT read from bit 21 when the exception
/// came from AArch32); PAN kept, and set if `SCTLR_EL1.SPAN` is 0; SSBS =
/// `SCTLR_EL1.DSSBS`; SS, IL, UAO, BTYPE and everything else 0.
#[must_use]
pub const fn exception_pstate(spsr: u64, sctlr: u64) -> u64 {
    let aarch32 = spsr & spsr64::NRW != 0;
    let mut new = PSTATE_EL1H_MASKED | (spsr & (spsr64::NZCV | spsr64::PAN));
    let dit = if aarch32 { SPSR32_DIT } else { spsr64::DIT };
    if spsr & dit != 0 {
        new |= spsr64::DIT;
    }
    if sctlr & SCTLR_SPAN == 0 {
        new |= spsr64::PAN;
    }
    if sctlr & SCTLR_DSSBS != 0 {
        new |= spsr64::SSBS;
    }
    new
}

fn access_name(a: &Abort) -> &'static str {
    if a.instruction {
        "instruction fetch"
    } else if a.write {
        "write"
    } else {
        "read"
    }
}

/// Marks `vm` failed and every vCPU off, then logs one line naming it, what happened and
/// the ESR.
pub fn stop_vm<S>(vm: &Vm<S>, what: core::fmt::Arguments<'_>) -> Next {
    vm.state.lock().finish(VmStatus::Failed);
    log::error!("VM {} stopped: {}", vm.desc.name, what);
    Next::Stop
}

/// [`stop_vm`], after printing what the VM's console still holds.
fn stop_vm_flushed<S>(
    vm: &Vm<S>,
    sink: &mut impl LineSink,
    what: core::fmt::Arguments<'_>,
) -> Next {
    vm.flush_console(sink);
    stop_vm(vm, what)
}

/// Runs a memory-sharing call for the calling vCPU and returns x0..x3 and what to log
/// (`crate::vm::VmManager::share_call`).
pub type ShareCall<'a> = dyn FnMut(Request) -> ([u64; 4], Note) + 'a;

/// Handles one exit of vCPU `vcpu` of `vm` (a physical interrupt was already taken by
/// the caller, [`irq::physical`]); memory-sharing calls go to `share`. Adds to `kicks`
/// the vCPUs of `vm` that may now have an interrupt to take (the caller signals those
/// running on other CPUs).
pub fn handle_exit<S: Stage2Table>(
    vm: &Vm<S>,
    vcpu: usize,
    ctx: &mut VcpuCtx<'_>,
    exit: boot::Exit,
    host: &mut impl Host,
    share: &mut ShareCall<'_>,
    kicks: &mut VcpuMask,
) -> Next {
    // Another vCPU may have powered the VM off, reset or stopped it meanwhile.
    if !vm.runs(vcpu) {
        return Next::Stop;
    }
    let next = match Exit::from(exit) {
        Exit::Interrupt => Next::Resume,
        Exit::SError { esr } => serror(vm, esr, host),
        Exit::Hvc { .. } => hypercall(vm, vcpu, ctx, host, share),
        Exit::Smc { .. } => {
            // A trapped SMC returns to the SMC itself (preferred return address).
            *ctx.pc = ctx.pc.wrapping_add(4);
            hypercall(vm, vcpu, ctx, host, share)
        }
        Exit::Wfx { .. } => {
            *ctx.pc = ctx.pc.wrapping_add(4);
            Next::Resume
        }
        Exit::SysReg { access, esr } => match sgi_register(&access) {
            Some(reg) if !access.read => {
                let sent = vm.vgic.lock().sgi_write(vcpu, reg, ctx.reg(access.rt));
                kicks.0 |= sent.0;
                *ctx.pc = ctx.pc.wrapping_add(4);
                Next::Resume
            }
            _ => {
                sysreg(vm, ctx, &access, host).unwrap_or_else(|| unhandled(vm, host, esr, *ctx.pc))
            }
        },
        Exit::Abort(abort) => stage2_abort(vm, ctx, &abort, host, kicks),
        Exit::Other { esr } => unhandled(vm, host, esr, *ctx.pc),
    };
    if next == Next::Stop && vm.status() != VmStatus::Running {
        // This exit powered the VM off, reset or stopped it: its other vCPUs must leave
        // the guest too (the last one out resets or destroys the VM), and one that sits
        // in WFI with interrupts masked (Linux parks its other CPUs so before it powers
        // off or reboots) would not exit on its own.
        for i in 0..vm.desc.cpus.len() {
            kicks.insert(i);
        }
    }
    next
}

/// Stops the VM for an exit the hypervisor does not handle.
fn unhandled<S>(vm: &Vm<S>, host: &mut impl Host, esr: Esr, pc: u64) -> Next {
    stop_vm_flushed(
        vm,
        host,
        format_args!(
            "unhandled exit, EC {:#x}: {} (ESR {:#x}, PC {pc:#x})",
            esr.class().ec(),
            esr.decode(),
            esr.bits(),
        ),
    )
}

fn hypercall<S>(
    vm: &Vm<S>,
    vcpu: usize,
    ctx: &mut VcpuCtx<'_>,
    host: &mut impl Host,
    share: &mut ShareCall<'_>,
) -> Next {
    // SMCCC passes arguments in x0..x7 (ARM DEN 0028, 2.6).
    let [x0, x1, x2, x3, x4, x5, x6, x7, ..] = *ctx.x;
    let x = [x0, x1, x2, x3, x4, x5, x6, x7];
    let caller = Caller {
        vm_id: vm.id,
        vmid: vm.vmid.get(),
        vcpu,
        name: &vm.desc.name,
        boots: vm.boots.load(Ordering::SeqCst),
        spectre: host.controls().spectre,
    };
    let outcome = {
        let mut st = vm.state.lock();
        if !st.runs(vcpu) {
            // Powered off, reset or stopped by another vCPU since the exit was taken.
            return Next::Stop;
        }
        let outcome = hypercall::dispatch(&x, &caller, &mut st.psci, |ipa| vm.is_ram(ipa, 4));
        // The VM-wide calls change the VM's state in the same step as the check above:
        // of two vCPUs racing SYSTEM_OFF and SYSTEM_RESET, one wins whole.
        match outcome {
            Outcome::SystemOff => st.finish(VmStatus::Off),
            Outcome::SystemReset => {
                st.request_reset();
            }
            _ => {}
        }
        outcome
    };
    match outcome {
        Outcome::Return(r) => {
            ctx.x[..4].copy_from_slice(&r);
            Next::Resume
        }
        Outcome::Share(req) => {
            // The VM's state lock is released: the call takes the manager's lock, then
            // the transaction table's. Its log line is printed once both are released.
            let (regs, note) = share(req);
            ctx.x[..4].copy_from_slice(&regs);
            note.log(vm, host, &req, regs[0]);
            Next::Resume
        }
        Outcome::CpuOff => Next::Stop,
        Outcome::SystemOff => {
            vm.flush_console(host);
            log::info!("VM {} powered off", vm.desc.name);
            Next::Stop
        }
        Outcome::SystemReset => {
            vm.flush_console(host);
            // A guest may reset in a loop: within the VM's budget.
            vm.log(
                host,
                log::Level::Info,
                format_args!("VM {} reset", vm.desc.name),
            );
            Next::Stop
        }
    }
}

/// The SGI-generation register a trapped system-register access names, if any:
/// `ICC_SGI1R_EL1` (op0 3, op1 0, CRn 12, CRm 11, op2 5), `ICC_ASGI1R_EL1` (op1 1,
/// op2 6) and `ICC_SGI0R_EL1` (op1 2, op2 7). With `HCR_EL2.IMO` or `HCR_EL2.FMO` set, an
/// EL1 write to any of them traps to EL2 with EC 0x18 (Arm ARM DDI 0487, the
/// `ICC_SGI1R_EL1`/`ICC_ASGI1R_EL1`/`ICC_SGI0R_EL1` accessibility pseudocode:
/// `EL2Enabled() && (HCR_EL2.IMO == '1' || HCR_EL2.FMO == '1')` takes
/// `AArch64.SystemAccessTrap(EL2, 0x18)`; IHI 0069 12.11, "Traps and enables").
#[must_use]
pub fn sgi_register(a: &SysRegAccess) -> Option<SgiRegister> {
    if (a.op0, a.crn, a.crm) != (3, 12, 11) {
        return None;
    }
    match (a.op1, a.op2) {
        (0, 5) => Some(SgiRegister::Sgi1r),
        (1, 6) => Some(SgiRegister::Asgi1r),
        (2, 7) => Some(SgiRegister::Sgi0r),
        _ => None,
    }
}

/// Emulates one MMIO access with syndrome `syn` through `access`, which gets
/// `Some(value)` for a write (the source register truncated to the access size) and
/// `None` for a read, whose result goes into the target register truncated,
/// sign-extended as the syndrome asks, and cut to 32 bits for a W register. XZR as
/// target discards the value (the read still happens, as it may have effects). On
/// success the guest PC moves past the access.
fn emulate_mmio<E>(
    ctx: &mut VcpuCtx<'_>,
    syn: &DataAccess,
    is_write: bool,
    access: impl FnOnce(Option<u64>) -> Result<u64, E>,
) -> Result<(), E> {
    // The low `size` bytes: SAS gives 1, 2, 4 or 8 (a larger size is all 64 bits, and
    // size 0 an empty mask rather than a shift out of range).
    let bits = u32::from(syn.size).saturating_mul(8);
    let mask = u64::MAX
        .checked_shr(64u32.saturating_sub(bits))
        .unwrap_or(0);
    // The top bit of the access, which SSE copies upwards (none for a 64-bit access).
    let sign = mask & !(mask >> 1);
    if is_write {
        access(Some(ctx.reg(syn.reg) & mask))?;
    } else {
        let mut value = access(None)? & mask;
        if syn.sign_extend && value & sign != 0 {
            value |= !mask;
        }
        if !syn.sixty_four {
            value &= 0xffff_ffff;
        }
        ctx.set_reg(syn.reg, value);
    }
    *ctx.pc = ctx.pc.wrapping_add(4);
    Ok(())
}

/// The emulated device an IPA of `vm` belongs to, and the offset into it.
fn emulated_at<S>(vm: &Vm<S>, ipa: Ipa) -> Option<(EmulatedDevice, u64)> {
    vm.desc.emulated_ranges().find_map(|(device, range)| {
        range
            .contains_addr(ipa)
            .then(|| ipa.checked_offset_from(range.base))
            .flatten()
            .map(|offset| (device, offset))
    })
}

/// Raises or lowers the virtual UART's interrupt line to `level` (a change reported by
/// `VUart::irq_change`, with the UART's lock held: the UART's lock is taken before the
/// GIC's).
pub fn uart_line<S>(vm: &Vm<S>, level: bool, kicks: &mut VcpuMask) {
    if let Ok(Some(target)) = vm.vgic.lock().set_spi_level(VUART_INTID, level) {
        kicks.insert(target);
    }
}

/// Emulates an access to the virtual UART or GIC; `None` if `abort` is not one.
fn emulate<S: Stage2Table>(
    vm: &Vm<S>,
    ctx: &mut VcpuCtx<'_>,
    abort: &Abort,
    host: &mut impl Host,
    kicks: &mut VcpuMask,
) -> Option<Result<(), MmioError>> {
    let syn = abort.syndrome?;
    // A fault on the guest's own stage-1 table walk (S1PTW) at a device's IPA is not an
    // access to the device: the abort policy handles it.
    if abort.instruction || abort.s1ptw {
        return None;
    }
    let size = syn.size;
    Some(match emulated_at(vm, abort.ipa)? {
        (EmulatedDevice::Uart, offset) => {
            let mut uart = vm.uart.lock();
            // A trapped read is one the register page could not serve (bytes wait, or
            // the page is not mapped): it may change what the page must show.
            let mut written = Written {
                visible: !abort.write,
                line: false,
            };
            let _ = emulate_mmio::<MmioError>(ctx, &syn, abort.write, |w| {
                Ok(match w {
                    Some(v) => {
                        written = uart.write(offset, v);
                        0
                    }
                    None => uart.read(offset),
                })
            });
            // The register page shows the change (or goes while bytes wait); then the
            // line, under the UART's lock, so that changes reach the GIC in the order they
            // happened.
            if written.visible {
                vm.publish_uart(&mut uart, &*host);
            }
            let line = if written.line { uart.take_line() } else { None };
            if let Some(level) = uart.irq_change() {
                uart_line(vm, level, kicks);
            }
            drop(uart);
            // The line is printed after the UART's lock is released.
            if let Some(line) = line {
                vm.guest_line(line.as_str(), host);
            }
            if vm.desc.console_input && !abort.write && offset == crate::vm::vuart::UARTDR {
                host.input_wanted(&vm.desc.name);
            }
            Ok(())
        }
        (EmulatedDevice::Dist, offset) => {
            let mut g = vm.vgic.lock();
            emulate_mmio(ctx, &syn, abort.write, |w| match w {
                Some(v) => g.dist_write(offset, size, v, host).map(|k| {
                    kicks.0 |= k.0;
                    0
                }),
                None => g.dist_read(offset, size),
            })
        }
        (EmulatedDevice::Redist, offset) => {
            let mut g = vm.vgic.lock();
            emulate_mmio(ctx, &syn, abort.write, |w| match w {
                Some(v) => g.redist_write(offset, size, v, host).map(|k| {
                    kicks.0 |= k.0;
                    0
                }),
                None => g.redist_read(offset, size),
            })
        }
    })
}

fn stage2_abort<S: Stage2Table>(
    vm: &Vm<S>,
    ctx: &mut VcpuCtx<'_>,
    abort: &Abort,
    host: &mut impl Host,
    kicks: &mut VcpuMask,
) -> Next {
    let resolved;
    let abort = if abort.ipa_valid() {
        abort
    } else {
        match host.stage1_ipa(abort.far.get()) {
            Some(ipa) => {
                resolved = Abort {
                    ipa: Ipa::new(ipa),
                    ..*abort
                };
                &resolved
            }
            // The guest's stage 1 no longer maps the address (another of its vCPUs
            // changed it meanwhile): the access runs again and faults anew. What this
            // CPU still holds for the VM goes first: a stale entry (a chunk opened
            // without a broadcast, or the guest's own) must not fault forever.
            None => {
                host.invalidate_local(None);
                return Next::Resume;
            }
        }
    };
    match emulate(vm, ctx, abort, host, kicks) {
        Some(Ok(())) => return Next::Resume,
        Some(Err(e)) => {
            // An access the GIC architecture does not allow (size, alignment): the
            // guest's own mistake, handled by its abort policy like an unmapped access.
            log::warn!(
                "VM {}: {e} at IPA {:#x} (ESR {:#x})",
                vm.desc.name,
                abort.ipa,
                abort.esr.bits()
            );
            return abort_policy(vm, ctx, abort, host);
        }
        None => {}
    }
    let permission = matches!(abort.status, FaultStatus::Permission(_));
    if permission || abort.unmapped() {
        // The guest's first access to a chunk of its RAM, mapped without any access until
        // then (`crate::vm::ram`): scrub it, give access, run the access again.
        let touch = vm.first_touch(abort.ipa, &*host);
        // The chunk was opened without a broadcast invalidation: this CPU may still hold
        // the entry that made the access fault (every other CPU fixes its own the same
        // way when it faults).
        if matches!(touch, Ok(Touch::MadeReady | Touch::Ready)) {
            host.invalidate_local(Some(abort.ipa));
        }
        match touch {
            Ok(Touch::MadeReady) => return Next::Resume,
            // Another vCPU made the chunk ready after this access faulted: a page of the
            // VM's own RAM that is mapped and owned has every access, so it runs again.
            Ok(Touch::Ready) if permission && owned_now(vm, abort.ipa) => return Next::Resume,
            Ok(_) => {}
            Err(e) => {
                return stop_vm_flushed(
                    vm,
                    host,
                    format_args!("RAM at IPA {:#x} could not be made ready: {e}", abort.ipa),
                )
            }
        }
    }
    if abort.unmapped() && mapped_now(vm, abort.ipa).is_some() {
        // The page was invalid only during a break-before-make on the live stage 2
        // (`mmu` splitting or merging a block for a memory-sharing call made by another
        // vCPU, `crate::share`); the change is complete (its lock is free again) and the
        // page is mapped: run the access again.
        return Next::Resume;
    }
    abort_policy(vm, ctx, abort, host)
}

/// Stops the VM or injects an abort, as its description says.
fn abort_policy<S>(vm: &Vm<S>, ctx: &mut VcpuCtx<'_>, abort: &Abort, host: &mut impl Host) -> Next {
    let what = access_name(abort);
    // A translation fault: nothing mapped there (or a page this VM lent away). A
    // permission fault: mapped without that access (e.g. a write to a page borrowed
    // read-only). The fault status says which (ESR_EL2.ISS.DFSC/IFSC, Arm ARM D24.2.41).
    let unmapped = if abort.unmapped() { "unmapped " } else { "" };
    match vm.desc.abort {
        AbortPolicy::Stop => stop_vm_flushed(
            vm,
            host,
            format_args!(
                "{what} of {unmapped}IPA {:#x} (ESR {:#x}, {})",
                abort.ipa,
                abort.esr.bits(),
                abort.status
            ),
        ),
        AbortPolicy::Inject => {
            // A guest may fault in a loop: within the VM's budget of lines.
            vm.log(
                host,
                log::Level::Warn,
                format_args!(
                    "VM {}: injected abort for {what} of {unmapped}IPA {:#x} (ESR {:#x}, {})",
                    vm.desc.name,
                    abort.ipa,
                    abort.esr.bits(),
                    abort.status
                ),
            );
            inject_abort(ctx, abort, host);
            Next::Resume
        }
    }
}

/// The attributes the VM's stage 2 maps the page of `ipa` with, if it maps it (waits
/// for a change in progress).
fn mapped_now<S: Stage2Table>(vm: &Vm<S>, ipa: Ipa) -> Option<mmu::Attributes> {
    let page = ipa.align_down(PAGE_SIZE);
    let mut mapped = None;
    if let Some(s2) = vm.stage2.lock().as_ref() {
        if s2
            .walk(page, PAGE_SIZE, &mut |m| mapped = Some(m.attrs))
            .is_err()
        {
            return None;
        }
    }
    mapped
}

/// Whether the page of `ipa` is mapped now as the VM's own RAM page, owned or shared by
/// it (read, write and execute).
fn owned_now<S: Stage2Table>(vm: &Vm<S>, ipa: Ipa) -> bool {
    mapped_now(vm, ipa).is_some_and(|a| {
        matches!(
            PageState::from_sw(a.sw),
            Some(PageState::Owned | PageState::SharedOwned)
        )
    })
}

/// Makes the vCPU take a synchronous external abort at EL1 for `abort`: the EL1 exception
/// registers as the architecture would set them (Arm ARM D1.10 "Exception entry":
/// `ESR_EL1`, `FAR_EL1`, `ELR_EL1` = the faulting instruction, `SPSR_EL1` = the state it
/// ran in), PSTATE per [`exception_pstate`], and the PC at the vector
/// [`vector_offset`] picks: EL1 with SP_EL0 or SP_EL1, or EL0 in AArch64 or AArch32.
pub fn inject_abort(ctx: &mut VcpuCtx<'_>, abort: &Abort, el1: &mut impl GuestEl1) {
    let (offset, from_el0) = vector_offset(*ctx.pstate);
    let esr = exit::injected_abort_esr(abort, from_el0);
    el1.set_exception(esr, abort.far.get(), *ctx.pc, *ctx.pstate);
    *ctx.pc = el1.vbar().wrapping_add(offset);
    *ctx.pstate = exception_pstate(*ctx.pstate, el1.sctlr());
}

/// Fakes of what the machine gives [`handle_exit`], for tests that need none of it.
#[cfg(test)]
pub(crate) mod fakes {
    /// A guest whose EL1 registers read 0 and ignore writes.
    pub struct NoEl1;

    impl super::GuestEl1 for NoEl1 {
        fn vbar(&self) -> u64 {
            0
        }
        fn sctlr(&self) -> u64 {
            0
        }
        fn set_exception(&mut self, _: u64, _: u64, _: u64, _: u64) {}
        fn stage1_ipa(&mut self, _: u64) -> Option<u64> {
            None
        }
    }

    /// A console that drops every line, at time 0.
    pub struct NoLines;

    impl super::LineSink for NoLines {
        fn line(&mut self, _: &str, _: &str) {}
        fn event(&mut self, _: log::Level, _: core::fmt::Arguments<'_>) {}
        fn micros(&self) -> u64 {
            0
        }
    }

    /// [`NoEl1`] and [`NoLines`] in one, with a physical GIC that ignores every change.
    pub struct NoHost;

    impl super::GuestEl1 for NoHost {
        fn vbar(&self) -> u64 {
            0
        }
        fn sctlr(&self) -> u64 {
            0
        }
        fn set_exception(&mut self, _: u64, _: u64, _: u64, _: u64) {}
        fn stage1_ipa(&mut self, _: u64) -> Option<u64> {
            None
        }
    }

    impl super::LineSink for NoHost {
        fn line(&mut self, _: &str, _: &str) {}
        fn event(&mut self, _: log::Level, _: core::fmt::Arguments<'_>) {}
        fn micros(&self) -> u64 {
            0
        }
    }

    impl crate::vm::vgic::PhysGic for NoHost {
        fn apply(&mut self, _: crate::vm::vgic::PhysAction) {}
    }

    impl crate::vm::GuestMemory for NoHost {
        fn zero(&self, _: crate::mem::PhysAddr, _: u64) {}
        fn load(
            &self,
            _: crate::mem::PhysAddr,
            _: crate::config::ImageSource,
            _: u64,
        ) -> Result<(), crate::config::fw_cfg::FwCfgError> {
            Ok(())
        }
        fn clean_to_poc(&self, _: u64, _: u64) {}
    }

    /// The exit of an `HVC #0` from AArch64.
    pub const HVC_EXIT: boot::Exit = boot::Exit::Sync {
        esr: boot::esr::Esr::from_bits((0x16 << 26) | (1 << 25)),
        far: 0,
        hpfar: 0,
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::tests::{desc, manager};
    use alloc::string::String;
    use alloc::vec::Vec;

    #[derive(Default)]
    struct El1 {
        vbar: u64,
        sctlr: u64,
        set: Option<(u64, u64, u64, u64)>,
        /// The CPU's ID registers (default: none of the optional features).
        id: cpu_state::IdRegs,
        pmcr: u64,
        vse: Option<Option<u64>>,
        flushed: Vec<(u64, u64)>,
        /// RAM scrubbed on first touch: (PA, length).
        scrubbed: core::cell::RefCell<Vec<(u64, u64)>>,
        /// The one page the guest's stage 1 maps: (VA page, IPA page) (`stage1_ipa`).
        stage1: Option<(u64, u64)>,
        /// IPAs invalidated in this CPU's TLB (`invalidate_local`; `None`: all of the VM's).
        invalidated: Vec<Option<u64>>,
    }
    impl GuestEl1 for El1 {
        fn vbar(&self) -> u64 {
            self.vbar
        }
        fn sctlr(&self) -> u64 {
            self.sctlr
        }
        fn set_exception(&mut self, esr: u64, far: u64, elr: u64, spsr: u64) {
            self.set = Some((esr, far, elr, spsr));
        }
        fn stage1_ipa(&mut self, va: u64) -> Option<u64> {
            let (page, ipa) = self.stage1?;
            (va & !0xfff == page).then_some(ipa | (va & 0xfff))
        }
        fn controls(&self) -> cpu_state::El2Controls {
            cpu_state::El2Controls::for_cpu(&self.id)
        }
        fn has_ras(&self) -> bool {
            self.id.has_ras()
        }
        fn pmcr(&self) -> u64 {
            self.pmcr
        }
        fn set_pmcr(&mut self, value: u64) {
            self.pmcr = value;
        }
        fn inject_serror(&mut self, vsesr: Option<u64>) {
            self.vse = Some(vsesr);
        }
        fn clean_invalidate(&mut self, pa: PhysAddr, len: u64) {
            self.flushed.push((pa.get(), len));
        }
        fn invalidate_local(&mut self, ipa: Option<Ipa>) {
            self.invalidated.push(ipa.map(Ipa::get));
        }
    }

    /// The guest lines printed, the time (microseconds) the sink reports, and the lines
    /// about VMs printed.
    #[derive(Default)]
    struct Lines(Vec<String>, u64, Vec<String>);
    impl LineSink for Lines {
        fn line(&mut self, name: &str, text: &str) {
            self.0.push(format!("[{name}] {text}"));
        }
        fn event(&mut self, _: log::Level, args: core::fmt::Arguments<'_>) {
            self.2.push(args.to_string());
        }
        fn micros(&self) -> u64 {
            self.1
        }
    }

    /// The machine as one exit sees it, over the tests' pieces.
    struct TestHost<'a> {
        el1: &'a mut El1,
        out: &'a mut Lines,
    }
    impl GuestEl1 for TestHost<'_> {
        fn vbar(&self) -> u64 {
            self.el1.vbar()
        }
        fn sctlr(&self) -> u64 {
            self.el1.sctlr()
        }
        fn set_exception(&mut self, esr: u64, far: u64, elr: u64, spsr: u64) {
            self.el1.set_exception(esr, far, elr, spsr);
        }
        fn stage1_ipa(&mut self, va: u64) -> Option<u64> {
            self.el1.stage1_ipa(va)
        }
        fn controls(&self) -> cpu_state::El2Controls {
            self.el1.controls()
        }
        fn has_ras(&self) -> bool {
            self.el1.has_ras()
        }
        fn pmcr(&self) -> u64 {
            self.el1.pmcr()
        }
        fn set_pmcr(&mut self, value: u64) {
            self.el1.set_pmcr(value);
        }
        fn inject_serror(&mut self, vsesr: Option<u64>) {
            self.el1.inject_serror(vsesr);
        }
        fn clean_invalidate(&mut self, pa: PhysAddr, len: u64) {
            self.el1.clean_invalidate(pa, len);
        }
        fn invalidate_local(&mut self, ipa: Option<Ipa>) {
            self.el1.invalidate_local(ipa);
        }
    }
    impl LineSink for TestHost<'_> {
        fn line(&mut self, name: &str, text: &str) {
            self.out.line(name, text);
        }
        fn event(&mut self, level: log::Level, args: core::fmt::Arguments<'_>) {
            self.out.event(level, args);
        }
        fn micros(&self) -> u64 {
            self.out.micros()
        }
    }
    impl PhysGic for TestHost<'_> {
        fn apply(&mut self, _action: crate::vm::vgic::PhysAction) {}
    }
    impl GuestMemory for TestHost<'_> {
        fn zero(&self, pa: PhysAddr, len: u64) {
            self.el1.scrubbed.borrow_mut().push((pa.get(), len));
        }
        fn load(
            &self,
            _: PhysAddr,
            _: crate::config::ImageSource,
            _: u64,
        ) -> Result<(), crate::config::fw_cfg::FwCfgError> {
            Ok(())
        }
        fn clean_to_poc(&self, _: u64, _: u64) {}
    }

    /// A vCPU at its exits, with the guest's EL1 registers and the console it reaches.
    struct Cpu {
        kicks: VcpuMask,
        x: [u64; 31],
        pc: u64,
        pstate: u64,
        el1: El1,
        out: Lines,
    }

    impl Cpu {
        fn new() -> Self {
            Self {
                kicks: VcpuMask::EMPTY,
                x: [0; 31],
                pc: 0x4000_1000,
                pstate: 0x3c5,
                el1: El1::default(),
                out: Lines::default(),
            }
        }

        /// Handles exit `e` of vCPU `vcpu` of `vm`, with memory-sharing calls failing.
        fn exit<S: Stage2Table>(&mut self, vm: &Vm<S>, vcpu: usize, e: boot::Exit) -> Next {
            self.exit_sharing(vm, vcpu, e, &mut |_| ([u64::MAX; 4], Note::None))
        }

        /// Handles exit `e` of vCPU `vcpu` of `vm`, with memory-sharing calls to `share`.
        fn exit_sharing<S: Stage2Table>(
            &mut self,
            vm: &Vm<S>,
            vcpu: usize,
            e: boot::Exit,
            share: &mut ShareCall<'_>,
        ) -> Next {
            let mut ctx = VcpuCtx {
                x: &mut self.x,
                pc: &mut self.pc,
                pstate: &mut self.pstate,
            };
            let mut host = TestHost {
                el1: &mut self.el1,
                out: &mut self.out,
            };
            handle_exit(vm, vcpu, &mut ctx, e, &mut host, share, &mut self.kicks)
        }
    }

    /// A VM created from `d` whose vCPU 0 has taken its boot start (it runs).
    fn running(
        m: &crate::vm::VmManager<crate::vm::tests::Fake>,
        d: crate::config::VmDesc,
    ) -> alloc::sync::Arc<Vm<crate::vm::tests::FakeS2>> {
        let vm = m.create(d).expect("vm");
        vm.state.lock().psci.take_pending(0);
        vm
    }

    /// A running one-vCPU VM whose abort policy is to inject.
    fn injecting(
        m: &crate::vm::VmManager<crate::vm::tests::Fake>,
    ) -> alloc::sync::Arc<Vm<crate::vm::tests::FakeS2>> {
        let mut d = desc(0x5000_0000, 1);
        d.abort = AbortPolicy::Inject;
        running(m, d)
    }

    const HVC: u64 = (0x16 << 26) | (1 << 25);
    const SMC: u64 = (0x17 << 26) | (1 << 25);

    fn dabt(write: bool, reg: u64, size: u64) -> u64 {
        (0x24 << 26)
            | (1 << 25)
            | (1 << 24)
            | (size << 22)
            | (reg << 16)
            | (u64::from(write) << 6)
            | 0x07
    }

    /// The page of the VA every exit of [`sync`] faults at.
    const VA_PAGE: u64 = 0xffff_0000_0000_0000;

    fn sync(esr: u64, ipa: u64) -> boot::Exit {
        boot::Exit::Sync {
            esr: boot::esr::Esr::from_bits(esr),
            far: VA_PAGE | (ipa & 0xfff),
            hpfar: (ipa >> 12) << 4,
        }
    }

    #[test]
    fn vuart_write_and_flag_read() {
        let m = manager();
        let vm = running(&m, desc(0x5000_0000, 1));
        let mut cpu = Cpu::new();
        for b in b"ok\n" {
            cpu.x[5] = u64::from(*b) | 0x100;
            let n = cpu.exit(&vm, 0, sync(dabt(true, 5, 0), 0x0900_0000));
            assert_eq!(n, Next::Resume);
        }
        assert_eq!(cpu.out.0, vec!["[vm] ok".to_string()]);
        assert_eq!(cpu.pc, 0x4000_100c);
        cpu.x[7] = 0xdead;
        cpu.exit(&vm, 0, sync(dabt(false, 7, 2), 0x0900_0018));
        assert_eq!(cpu.x[7], 0x90);
    }

    #[test]
    fn hvc_and_smc_calls() {
        let m = manager();
        let vm = running(&m, desc(0x5000_0000, 1));
        vm.enter();
        let mut cpu = Cpu::new();
        cpu.x[0] = 0xC600_0001;
        assert_eq!(cpu.exit(&vm, 0, sync(HVC, 0)), Next::Resume);
        assert_eq!(&cpu.x[..4], &[0, 0, u64::from(vm.vmid.get()), 0]);
        assert_eq!(cpu.pc, 0x4000_1000, "HVC returns past itself already");
        cpu.x[0] = 0x1234;
        assert_eq!(cpu.exit(&vm, 0, sync(SMC, 0)), Next::Resume);
        assert_eq!(cpu.x[0], u64::MAX, "NOT_SUPPORTED");
        assert_eq!(cpu.pc, 0x4000_1004, "SMC is stepped over");
        cpu.x[0] = 0x8400_0008;
        assert_eq!(cpu.exit(&vm, 0, sync(HVC, 0)), Next::Stop);
        assert_eq!(vm.status(), VmStatus::Off);
        // A VM that is off does not run again.
        assert_eq!(cpu.exit(&vm, 0, boot::Exit::Irq), Next::Stop);
        assert_eq!(vm.leave(), crate::vm::Leave::Destroy);
        assert_eq!(m.outcome(), None, "idle but not destroyed yet");
        m.destroy(vm.id).expect("destroy");
        assert_eq!(m.outcome(), Some(true));
    }

    #[test]
    fn unmapped_read_stops_only_that_vm() {
        let m = manager();
        let a = running(&m, desc(0x5000_0000, 1));
        let b = running(&m, desc(0x5010_0000, 2));
        let mut cpu = Cpu::new();
        let n = cpu.exit(&a, 0, sync(dabt(false, 1, 3), 0x7000_0000));
        assert_eq!(n, Next::Stop);
        assert_eq!(a.status(), VmStatus::Failed);
        assert_eq!(a.state.lock().psci.running(), 0);
        assert_eq!(b.status(), VmStatus::Running);
        assert_eq!(cpu.el1.set, None);
        m.destroy(a.id).expect("destroy a");
        assert_eq!(m.outcome(), None, "the other VM still runs");
        b.state.lock().status = VmStatus::Off;
        m.destroy(b.id).expect("destroy b");
        assert_eq!(
            m.outcome(),
            Some(false),
            "a destroyed failed VM still counts"
        );
    }

    #[test]
    fn unmapped_read_injects_when_asked() {
        let m = manager();
        let vm = injecting(&m);
        let mut cpu = Cpu::new();
        cpu.el1 = El1 {
            vbar: 0x4000_8000,
            sctlr: SCTLR_SPAN,
            ..El1::default()
        };
        cpu.pstate = 0x345; // EL1h, I and F masked, some flags
        let n = cpu.exit(&vm, 0, sync(dabt(false, 1, 3), 0x7000_0010));
        assert_eq!(n, Next::Resume);
        let (esr, far, elr, spsr) = cpu.el1.set.expect("exception registers written");
        assert_eq!(esr >> 26, 0x25);
        assert_eq!(esr & 0x3f, 0x10);
        assert_eq!(far, 0xffff_0000_0000_0010);
        assert_eq!((elr, spsr), (0x4000_1000, 0x345));
        assert_eq!(cpu.pc, 0x4000_8200);
        assert_eq!(cpu.pstate, 0x3c5);
        // From EL0 the lower-EL vector is used.
        cpu.pstate = 0;
        cpu.exit(&vm, 0, sync(dabt(true, 1, 3), 0x7000_0010));
        assert_eq!(cpu.pc, 0x4000_8400);
        assert_eq!(cpu.el1.set.map(|s| s.0 >> 26), Some(0x24));
        assert_eq!(vm.status(), VmStatus::Running);
    }

    #[test]
    fn cpu_on_off_and_reset_between_vcpus() {
        let m = manager();
        let mut d = desc(0x5000_0000, 1);
        d.cpus.push(2);
        let vm = running(&m, d);
        let (mut c0, mut c1) = (Cpu::new(), Cpu::new());
        c0.x[..4].copy_from_slice(&[0xC400_0003, 1, 0x4000_2000, 9]);
        assert_eq!(c0.exit(&vm, 0, sync(HVC, 0)), Next::Resume);
        assert_eq!(c0.x[0], 0);
        assert_eq!(
            vm.state.lock().psci.take_pending(1),
            Some((Ipa::new(0x4000_2000), 9))
        );
        c1.x[0] = 0xC600_0001;
        c1.exit(&vm, 1, sync(HVC, 0));
        assert_eq!(c1.x[3], 1, "vCPU index");
        c1.x[0] = 0x8400_0002;
        assert_eq!(c1.exit(&vm, 1, sync(HVC, 0)), Next::Stop);
        assert_eq!(
            vm.state.lock().psci.state(1),
            Some(crate::vm::psci::PowerState::Off)
        );
        c0.x[0] = 0x8400_0009;
        assert_eq!(c0.exit(&vm, 0, sync(HVC, 0)), Next::Stop);
    }

    #[test]
    fn ending_the_vm_kicks_its_other_vcpus_and_cpu_off_does_not() {
        // 0x8400_0002 CPU_OFF, 0x8400_0008 SYSTEM_OFF, 0x8400_0009 SYSTEM_RESET.
        for (call, kicked) in [
            (0x8400_0002, false),
            (0x8400_0008, true),
            (0x8400_0009, true),
        ] {
            let m = manager();
            let mut d = desc(0x5000_0000, 1);
            d.cpus.push(2);
            d.cpus.push(3);
            let vm = running(&m, d);
            let mut c0 = Cpu::new();
            c0.x[0] = call;
            assert_eq!(c0.exit(&vm, 0, sync(HVC, 0)), Next::Stop, "{call:#x}");
            let others = [1, 2].into_iter().all(|i| c0.kicks.contains(i));
            assert_eq!(others, kicked, "{call:#x}: vCPUs 1 and 2 kicked");
        }
        // A VM stopped by the hypervisor (an unmapped access under the stop policy).
        let m = manager();
        let mut d = desc(0x5000_0000, 1);
        d.cpus.push(2);
        d.abort = crate::config::AbortPolicy::Stop;
        let vm = running(&m, d);
        let mut c0 = Cpu::new();
        assert_eq!(c0.exit(&vm, 0, sync(dabt(false, 1, 2), 0x1000)), Next::Stop);
        assert!(c0.kicks.contains(1));
    }

    #[test]
    fn translation_fault_on_a_mapped_page_is_retried() {
        // A break-before-make on the VM's live stage 2 (another vCPU sharing or lending
        // part of a block, or reclaiming it) leaves the range invalid for a moment: an
        // access that faulted then finds the page mapped again and runs once more.
        let m = manager();
        let vm = running(&m, desc(0x5000_0000, 1));
        let mut cpu = Cpu::new();
        let n = cpu.exit(&vm, 0, sync(dabt(false, 1, 3), 0x4000_2008));
        assert_eq!(n, Next::Resume);
        assert_eq!(cpu.pc, 0x4000_1000, "the faulting instruction runs again");
        assert_eq!(vm.status(), VmStatus::Running);
        assert_eq!(cpu.el1.set, None, "no abort injected");
        // A permission fault on a page of its own RAM that is mapped and owned: the access
        // met the page before another vCPU's first touch opened its chunk
        // (`crate::vm::ram`), and runs again too.
        // `HPFAR_EL2` is not valid for a permission fault: the IPA is the guest's stage-1
        // translation of the VA, whatever the exit's `HPFAR_EL2` says.
        let perm = (dabt(true, 1, 3) & !0x3f) | 0x0f;
        cpu.el1.stage1 = Some((VA_PAGE, 0x4000_2000));
        assert_eq!(cpu.exit(&vm, 0, sync(perm, 0x0badf008)), Next::Resume);
        assert_eq!(cpu.el1.set, None, "no abort injected");
        assert_eq!(
            cpu.el1.invalidated.last(),
            Some(&Some(0x4000_2008)),
            "this CPU drops the entry it may still hold"
        );
        // A VA the guest's stage 1 no longer maps (another vCPU changed it): run again,
        // after this CPU dropped all it held for the VM (no IPA to aim at).
        cpu.el1.stage1 = None;
        assert_eq!(cpu.exit(&vm, 0, sync(perm, 0x4010_0000)), Next::Resume);
        assert_eq!(vm.status(), VmStatus::Running);
        assert_eq!(cpu.el1.invalidated.last(), Some(&None));
        // Past the end of its RAM neither fault is retried: the policy holds.
        cpu.el1.stage1 = Some((VA_PAGE, 0x4010_0000));
        assert_eq!(cpu.exit(&vm, 0, sync(perm, 0x4000_2008)), Next::Stop);
        assert_eq!(vm.status(), VmStatus::Failed);
    }

    #[test]
    fn unexpected_exits_stop_the_vm() {
        let m = manager();
        let vm = running(&m, desc(0x5000_0000, 1));
        let mut cpu = Cpu::new();
        assert_eq!(cpu.exit(&vm, 0, boot::Exit::Irq), Next::Resume);
        assert_eq!(cpu.exit(&vm, 0, sync(0, 0)), Next::Stop);
        assert_eq!(vm.status(), VmStatus::Failed);
        // Even the UART needs a valid syndrome: without ISV it is an abort. (A write: the
        // register page is mapped read-only, so a permission fault.)
        let vm2 = running(&m, desc(0x5010_0000, 2));
        let no_isv = (0x24 << 26) | (1 << 25) | (1 << 6) | 0x0f;
        cpu.el1.stage1 = Some((VA_PAGE, 0x0900_0000));
        assert_eq!(cpu.exit(&vm2, 0, sync(no_isv, 0x0900_0000)), Next::Stop);
        assert!(cpu.out.0.is_empty());
    }

    /// Every guest state an abort can come from lands at its own vector with the
    /// syndrome of its EL, and PSTATE as the architecture sets it.
    #[test]
    fn injection_from_each_el_and_execution_state() {
        let m = manager();
        let vm = injecting(&m);
        // (SPSR_EL2 of the guest, vector offset, ESR_EL1.EC of a data abort)
        let nzcv = 0xa000_0000;
        for (spsr, offset, ec) in [
            (nzcv | 0x3c5, 0x200, 0x25), // EL1h
            (nzcv | 0x3c4, 0x000, 0x25), // EL1t
            (nzcv, 0x400, 0x24),         // EL0t, AArch64
            (nzcv | 0x10, 0x600, 0x24),  // User mode, AArch32 (A32)
            (nzcv | 0x30, 0x600, 0x24),  // User mode, AArch32, T32 (T bit 5)
        ] {
            let mut cpu = Cpu::new();
            cpu.el1 = El1 {
                vbar: 0x4000_8000,
                sctlr: SCTLR_SPAN,
                ..El1::default()
            };
            cpu.pstate = spsr;
            let n = cpu.exit(&vm, 0, sync(dabt(true, 1, 2), 0x7000_0010));
            assert_eq!(n, Next::Resume);
            assert_eq!(cpu.pc, 0x4000_8000 + offset, "SPSR {spsr:#x}");
            let (esr, _, elr, saved) = cpu.el1.set.expect("injected");
            assert_eq!(esr >> 26, ec, "SPSR {spsr:#x}");
            assert_eq!((elr, saved), (0x4000_1000, spsr));
            assert_eq!(cpu.pstate, nzcv | 0x3c5, "NZCV kept, EL1h, DAIF masked");
        }
    }

    #[test]
    fn pstate_on_exception_entry() {
        // PAN kept if SPAN = 1, set if SPAN = 0.
        assert_eq!(exception_pstate(1 << 22, SCTLR_SPAN), 0x3c5 | 1 << 22);
        assert_eq!(exception_pstate(0, 0), 0x3c5 | 1 << 22);
        assert_eq!(exception_pstate(0, SCTLR_SPAN), 0x3c5);
        // DIT from bit 24 (AArch64) or bit 21 (AArch32).
        assert_eq!(exception_pstate(1 << 24, SCTLR_SPAN), 0x3c5 | 1 << 24);
        assert_eq!(
            exception_pstate(0x10 | 1 << 21, SCTLR_SPAN),
            0x3c5 | 1 << 24
        );
        assert_eq!(exception_pstate(1 << 21, SCTLR_SPAN), 0x3c5, "bit 21 is SS");
        // SSBS from SCTLR_EL1.DSSBS; SS (21), IL (20), BTYPE, UAO and the mode cleared.
        assert_eq!(
            exception_pstate(1 << 12 | 1 << 20 | 0xc00 | 1 << 23, SCTLR_SPAN),
            0x3c5
        );
        assert_eq!(
            exception_pstate(0, SCTLR_SPAN | SCTLR_DSSBS),
            0x3c5 | 1 << 12
        );
    }

    /// The UART's register page is mapped read-only with the model's values while no
    /// byte waits, follows every trapped write, goes before input arrives and comes back
    /// once the guest has read the last byte.
    #[test]
    fn the_uart_register_page_serves_reads_while_nothing_waits() {
        use crate::vm::vuart::{
            FR_IDLE, FR_RXFE, INT_RX, INT_TX, UARTFR, UARTIMSC, UARTMIS, UARTPERIPHID0,
        };
        use crate::vm::S2Kind;
        let m = manager();
        let vm = running(&m, desc(0x5000_0000, 1));
        let page = vm.uart_page.as_ref().expect("a register page");
        let mapped = || {
            vm.stage2
                .lock()
                .as_ref()
                .expect("live")
                .maps
                .get(&0x0900_0000)
                .copied()
        };
        let published = Some((page.pa().get(), S2Kind::RegisterPage));
        assert_eq!(mapped(), published);
        assert_eq!(page.word(UARTFR), FR_IDLE as u32);
        assert_eq!(page.word(UARTPERIPHID0 + 4 * 7), 0xb1, "UARTPCellID3");
        let mut cpu = Cpu::new();
        cpu.x[5] = u64::from(INT_RX | INT_TX);
        assert_eq!(
            cpu.exit(&vm, 0, sync(dabt(true, 5, 2), 0x0900_0038)),
            Next::Resume
        );
        assert_eq!(
            page.word(UARTIMSC),
            INT_RX | INT_TX,
            "a trapped write shows"
        );
        cpu.x[5] = u64::from(b'x');
        cpu.exit(&vm, 0, sync(dabt(true, 5, 0), 0x0900_0000));
        assert_eq!(
            page.word(UARTMIS),
            INT_TX,
            "the transmit interrupt it raised"
        );
        // Clearing it shows, and so does the next byte raising it again.
        cpu.x[5] = u64::from(INT_TX);
        cpu.exit(&vm, 0, sync(dabt(true, 5, 2), 0x0900_0044));
        assert_eq!(page.word(UARTMIS), 0, "cleared by UARTICR");
        cpu.x[5] = u64::from(b'y');
        cpu.exit(&vm, 0, sync(dabt(true, 5, 0), 0x0900_0000));
        assert_eq!(page.word(UARTMIS), INT_TX, "raised again");
        // A byte arrives: the page goes first, so that a read of UARTDR traps.
        let mem = m.with_backend(|p| p.memory.clone());
        {
            let mut uart = vm.uart.lock();
            assert!(vm.unpublish_uart(&mut uart));
            assert_eq!(uart.push_input(b"a"), 1);
            vm.publish_uart(&mut uart, &mem);
        }
        assert_eq!(mapped(), None, "every access traps while a byte waits");
        cpu.exit(&vm, 0, sync(dabt(false, 7, 2), 0x0900_0018));
        assert_eq!(cpu.x[7] & FR_RXFE, 0, "the trapped flag read sees the byte");
        cpu.exit(&vm, 0, sync(dabt(false, 7, 2), 0x0900_0000));
        assert_eq!(cpu.x[7], u64::from(b'a'));
        assert_eq!(mapped(), published, "back once the FIFO is empty");
        assert_eq!(page.word(UARTFR), FR_IDLE as u32);
        // A reset keeps the page mapped, with the reset values.
        m.reset(vm.id).expect("reset");
        assert_eq!(mapped(), published);
        assert_eq!(page.word(UARTIMSC), 0);
    }

    /// A fault on RAM the guest never touched makes its chunk ready; on anything else
    /// the abort policy applies.
    #[test]
    fn a_first_touch_of_ram_scrubs_its_chunk_and_runs_the_access_again() {
        let m = manager();
        let mut d = desc(0x5000_0000, 1);
        // Two chunks; the image's is ready, the second waits for its first touch.
        d.memory[0].size = 0x40_0000;
        d.abort = AbortPolicy::Stop;
        let vm = running(&m, d);
        let mut cpu = Cpu::new();
        // A load from the second chunk: translation fault, level 3.
        let n = cpu.exit(&vm, 0, sync(dabt(false, 3, 3), 0x4030_0010));
        assert_eq!(n, Next::Resume);
        assert_eq!(cpu.pc, 0x4000_1000, "the access runs again");
        assert_eq!(*cpu.el1.scrubbed.borrow(), [(0x5020_0000, 0x20_0000)]);
        assert_eq!(
            cpu.el1.invalidated,
            [Some(0x4030_0010)],
            "opened without a broadcast: this CPU drops its own entry"
        );
        assert!(cpu.el1.set.is_none(), "no abort injected");
        // An instruction fetch from it now: mapped, so the fault was a race; no scrub.
        let iabt = (0x20 << 26) | (1 << 25) | 0x07;
        assert_eq!(cpu.exit(&vm, 0, sync(iabt, 0x4020_0000)), Next::Resume);
        assert_eq!(cpu.el1.scrubbed.borrow().len(), 1, "scrubbed once");
        // Past the end of RAM: no first touch, the abort policy stops the VM.
        let n = cpu.exit(&vm, 0, sync(dabt(false, 3, 3), 0x4040_0000));
        assert_eq!(n, Next::Stop);
        assert_eq!(vm.status(), VmStatus::Failed);
        assert_eq!(cpu.el1.scrubbed.borrow().len(), 1);
    }

    /// A stage-1 table walk that faults on the virtual UART's page is the guest's page
    /// tables pointing at the device, not an access to it: never emulated.
    #[test]
    fn a_stage_1_walk_fault_on_the_uart_is_an_abort() {
        let m = manager();
        for policy in [AbortPolicy::Stop, AbortPolicy::Inject] {
            let mut d = desc(
                0x5000_0000 + u64::from(policy == AbortPolicy::Inject) * 0x10_0000,
                1,
            );
            d.abort = policy;
            let vm = running(&m, d);
            let mut cpu = Cpu::new();
            cpu.x[5] = u64::from(b'x');
            // A write with a valid syndrome, S1PTW = 1: the walk's update of a descriptor
            // in the read-only register page, a permission fault.
            let esr = (dabt(true, 5, 0) & !0x3f) | 0x0f | 1 << 7;
            let n = cpu.exit(&vm, 0, sync(esr, 0x0900_0000));
            vm.flush_console(&mut cpu.out);
            assert!(cpu.out.0.is_empty(), "nothing printed: {:?}", cpu.out.0);
            match policy {
                AbortPolicy::Stop => {
                    assert_eq!(n, Next::Stop);
                    assert_eq!(vm.status(), VmStatus::Failed);
                }
                AbortPolicy::Inject => {
                    assert_eq!(n, Next::Resume);
                    assert!(cpu.el1.set.is_some(), "abort injected");
                    assert_eq!(cpu.pc, 0x200, "VBAR_EL1 0 + current EL SPx");
                }
            }
        }
    }

    /// The lines the rate-limit reports say were not printed.
    fn dropped_reported(events: &[String]) -> u64 {
        events
            .iter()
            .filter(|l| l.ends_with("not printed (console rate limit)"))
            .flat_map(|l| {
                // "VM x: N line(s) ..." or "VM x: G guest line(s) and E line(s) ...".
                let words: Vec<&str> = l.split(' ').collect();
                words
                    .windows(2)
                    .filter(|w| w[1] == "line(s)" || w[1] == "guest")
                    .filter_map(|w| w[0].parse::<u64>().ok())
                    .collect::<Vec<_>>()
            })
            .sum()
    }

    /// A guest printing 1000 lines in 0.1 s gets its burst printed and the rest counted;
    /// the count is printed with the next line let through.
    #[test]
    fn a_flooding_guest_is_rate_limited() {
        let m = manager();
        let vm = running(&m, desc(0x5000_0000, 1));
        let mut cpu = Cpu::new();
        for i in 0..1000u64 {
            cpu.out.1 = 1_000_000 + i * 100;
            for b in b"spam\n" {
                cpu.x[5] = u64::from(*b);
                cpu.exit(&vm, 0, sync(dabt(true, 5, 0), 0x0900_0000));
            }
        }
        let (burst, rate) = crate::console::limit::VmConsole::GUEST;
        let printed = cpu.out.0.len() as u64;
        assert!(
            printed >= u64::from(burst) && printed <= u64::from(burst + rate / 10 + 1),
            "{printed} lines printed"
        );
        vm.flush_console(&mut cpu.out);
        assert_eq!(
            printed + dropped_reported(&cpu.out.2),
            1000,
            "every line printed or counted: {:?}",
            cpu.out.2
        );
    }

    /// 1000 SHARE + RECLAIM pairs through the exit path: the lines about them are held
    /// to the VM's budget, not 2000 console lines.
    #[test]
    fn a_thousand_share_reclaim_pairs_are_rate_limited() {
        let m = manager();
        let a = running(&m, desc(0x5000_0000, 1));
        let b = running(&m, desc(0x5010_0000, 2));
        let mut cpu = Cpu::new();
        let hvc = |cpu: &mut Cpu, regs: &[u64]| {
            cpu.x[..regs.len()].copy_from_slice(regs);
            cpu.exit_sharing(&a, 0, sync(HVC, 0), &mut |req| m.share_call(&a, 0, req));
            cpu.x[..2].try_into().map_or([0, 0], |r: [u64; 2]| r)
        };
        for i in 0..1000u64 {
            cpu.out.1 = 1_000_000 + i * 1000;
            let [r, handle] = hvc(&mut cpu, &[0xC600_0010, 0x4000_0000, 1, 1, 1]);
            assert_eq!(r, 0, "SHARE {i}");
            let [r, _] = hvc(&mut cpu, &[0xC600_0014, handle]);
            assert_eq!(r, 0, "RECLAIM {i}");
        }
        let (burst, rate) = crate::console::limit::VmConsole::EVENTS;
        // 1 s of calls: at most the burst and one second's refill were printed.
        let printed = cpu.out.2.iter().filter(|l| l.contains(" handle ")).count() as u64;
        assert!(
            printed <= u64::from(burst + rate + 1),
            "{printed} lines printed"
        );
        a.flush_console(&mut cpu.out);
        assert_eq!(
            printed + dropped_reported(&cpu.out.2),
            2000,
            "{:?}",
            cpu.out.2
        );
        assert_eq!(
            b.console.lock().events.take_dropped(),
            0,
            "b's budget is its own"
        );
    }

    fn serror(iss: u64) -> boot::Exit {
        boot::Exit::SError {
            esr: boot::esr::Esr::from_bits((0x2f << 26) | (1 << 25) | iss),
        }
    }

    /// A RAS SError syndrome of error type `aet`.
    fn ras(aet: u64) -> u64 {
        (aet << 10) | 0x11
    }

    fn ras_cpu() -> El1 {
        El1 {
            id: cpu_state::IdRegs {
                pfr0: 1 << 28,
                ..cpu_state::IdRegs::default()
            },
            ..El1::default()
        }
    }

    #[test]
    fn serror_follows_severity_and_the_abort_policy() {
        use cpu_state::serror::aet;
        let m = manager();
        let mut cpu = Cpu::new();
        // Policy inject: a recoverable error becomes a virtual SError of that severity.
        let vm = injecting(&m);
        cpu.el1 = ras_cpu();
        assert_eq!(cpu.exit(&vm, 0, serror(ras(aet::UER))), Next::Resume);
        assert_eq!(cpu.el1.vse, Some(Some(ras(aet::UER))));
        // Corrected: nothing injected, the guest goes on.
        cpu.el1 = ras_cpu();
        assert_eq!(cpu.exit(&vm, 0, serror(ras(aet::CE))), Next::Resume);
        assert_eq!(cpu.el1.vse, None);
        // No FEAT_RAS: injected with no syndrome register.
        cpu.el1 = El1::default();
        cpu.exit(&vm, 0, serror(ras(aet::UC)));
        assert_eq!(cpu.el1.vse, Some(None));
        // Uncontainable on a RAS CPU: the machine stops, whatever the policy.
        cpu.el1 = ras_cpu();
        assert_eq!(cpu.exit(&vm, 0, serror(ras(aet::UC))), Next::Fatal);
        assert_eq!(cpu.el1.vse, None);
        // Unrecoverable: this VM stops, even with policy inject.
        cpu.el1 = ras_cpu();
        assert_eq!(cpu.exit(&vm, 0, serror(ras(aet::UEU))), Next::Stop);
        assert_eq!(vm.status(), VmStatus::Failed);

        // Policy stop: a recoverable error stops the VM, nothing is injected.
        let vm = running(&m, desc(0x5010_0000, 2));
        cpu.el1 = ras_cpu();
        assert_eq!(cpu.exit(&vm, 0, serror(ras(aet::UEO))), Next::Stop);
        assert_eq!((cpu.el1.vse, vm.status()), (None, VmStatus::Failed));
    }

    /// ESR of a trapped MSR/MRS (EC 0x18) of `(op0, op1, crn, crm, op2)` with `rt`.
    fn msr(reg: (u64, u64, u64, u64, u64), rt: u64, read: bool) -> u64 {
        let (op0, op1, crn, crm, op2) = reg;
        (0x18 << 26)
            | (1 << 25)
            | (op0 << 20)
            | (op2 << 17)
            | (op1 << 14)
            | (crn << 10)
            | (rt << 5)
            | (crm << 1)
            | u64::from(read)
    }

    #[test]
    fn trapped_registers_are_emulated_and_others_stop_the_vm() {
        let m = manager();
        let vm = running(&m, desc(0x5000_0000, 1));
        let mut cpu = Cpu::new();
        cpu.el1 = El1::default();
        // ACTLR_EL1 reads as zero; the PC steps over the MRS.
        cpu.x[3] = 0xdead;
        let pc = cpu.pc;
        let n = cpu.exit(&vm, 0, sync(msr((3, 0, 1, 0, 1), 3, true), 0));
        assert_eq!((n, cpu.x[3], cpu.pc), (Next::Resume, 0, pc + 4));
        // A PMCR_EL0 write where DP must be forced (PMUv3p1).
        cpu.el1.id.dfr0 = 4 << 8;
        cpu.x[2] = 0b1;
        cpu.exit(&vm, 0, sync(msr((3, 3, 9, 12, 0), 2, false), 0));
        assert_eq!(cpu.el1.pmcr, 0b1 | cpu_state::sysreg::PMCR_DP);
        // A set/way sweep start cleans the VM's RAM by VA, once; the rest of it does not.
        cpu.x[0] = 0b010;
        cpu.exit(&vm, 0, sync(msr((1, 0, 7, 14, 2), 0, false), 0));
        cpu.x[0] = (1 << 30) | 0b010;
        cpu.exit(&vm, 0, sync(msr((1, 0, 7, 14, 2), 0, false), 0));
        let ram: Vec<_> = vm
            .desc
            .memory
            .iter()
            .map(|r| (r.pa.get(), r.size))
            .collect();
        assert_eq!(cpu.el1.flushed, ram);
        // An IMPLEMENTATION DEFINED register: an unknown exit, the VM stops.
        let n = cpu.exit(&vm, 0, sync(msr((3, 1, 15, 2, 0), 1, true), 0));
        assert_eq!((n, vm.status()), (Next::Stop, VmStatus::Failed));
    }

    /// `MSR ICC_SGI1R_EL1, x<rt>` trapped (EC 0x18).
    fn sgi1r_write(rt: u64) -> u64 {
        (0x18 << 26) | (1 << 25) | (3 << 20) | (5 << 17) | (12 << 10) | (rt << 5) | (11 << 1)
    }

    #[test]
    fn trapped_sgi_writes_reach_only_the_vms_own_vcpus() {
        let m = manager();
        let mut d = desc(0x5000_0000, 1);
        d.cpus.push(2);
        let vm = running(&m, d);
        let other = m.create(desc(0x5010_0000, 3)).expect("other vm");
        let mut cpu = Cpu::new();
        // GICD_CTLR.EnableGrp1, then SGI 3 enabled on vCPU 1 (GICR_ISENABLER0).
        cpu.x[1] = 2;
        cpu.exit(&vm, 0, sync(dabt(true, 1, 2), 0x0800_0000));
        cpu.x[1] = 1 << 3;
        cpu.exit(
            &vm,
            0,
            sync(dabt(true, 1, 2), 0x080c_0000 + 0x1_0000 + 0x100),
        );
        cpu.kicks = VcpuMask::EMPTY;
        // Broadcast (IRM) SGI 3 from vCPU 0: vCPU 1 of this VM, nobody else.
        cpu.x[4] = (3 << 24) | (1 << 40);
        let pc = cpu.pc;
        assert_eq!(cpu.exit(&vm, 0, sync(sgi1r_write(4), 0)), Next::Resume);
        assert_eq!(cpu.pc, pc + 4, "the MSR is stepped over");
        assert_eq!(cpu.kicks, VcpuMask(0b10));
        let pend = vm
            .vgic
            .lock()
            .redist_read(0x2_0000 + 0x1_0000 + 0x200, 4)
            .expect("read");
        assert_eq!(pend, 1 << 3);
        let p = other
            .vgic
            .lock()
            .redist_read(0x1_0000 + 0x200, 4)
            .expect("read");
        assert_eq!(p, 0, "the other VM got nothing");
        // A read of the distributor's GICD_TYPER through the abort path.
        cpu.x[7] = 0xdead;
        cpu.exit(&vm, 0, sync(dabt(false, 7, 2), 0x0800_0004));
        assert_eq!(cpu.x[7], u64::from(vm.vgic.lock().gicd_typer()));
        // Any other trapped system register stops the VM.
        let other_sysreg = (0x18 << 26) | (1 << 25) | (3 << 20) | (1 << 10) | 1;
        assert_eq!(cpu.exit(&vm, 0, sync(other_sysreg, 0)), Next::Stop);
        assert_eq!(vm.status(), VmStatus::Failed);
    }

    #[test]
    fn a_gic_access_of_a_bad_size_follows_the_abort_policy() {
        let m = manager();
        let vm = injecting(&m);
        let mut cpu = Cpu::new();
        cpu.el1 = El1 {
            vbar: 0x4000_8000,
            ..El1::default()
        };
        // A byte read of GICD_CTLR is not allowed (IHI 0069 12.1.3): abort injected.
        cpu.exit(&vm, 0, sync(dabt(false, 3, 0), 0x0800_0000));
        assert!(cpu.el1.set.is_some());
        assert_eq!(cpu.pc, 0x4000_8200);
        assert_eq!(vm.status(), VmStatus::Running);
    }

    #[test]
    fn the_uart_transmit_interrupt_goes_through_the_virtual_gic() {
        let m = manager();
        let vm = running(&m, desc(0x5000_0000, 1));
        let mut cpu = Cpu::new();
        let w = |cpu: &mut Cpu, ipa: u64, v: u64| {
            cpu.x[2] = v;
            cpu.exit(&vm, 0, sync(dabt(true, 2, 2), ipa));
        };
        // GICD_CTLR, SPI 33 enabled (GICD_ISENABLER1 bit 1), UART TX interrupt unmasked.
        w(&mut cpu, 0x0800_0000, 2);
        w(&mut cpu, 0x0800_0104, 2);
        w(&mut cpu, 0x0900_0038, 1 << 5);
        cpu.kicks = VcpuMask::EMPTY;
        w(&mut cpu, 0x0900_0000, u64::from(b'x'));
        assert_eq!(cpu.kicks, VcpuMask(1), "SPI 33 is deliverable to vCPU 0");
        let pend = vm.vgic.lock().dist_read(0x204, 4).expect("read");
        assert_eq!(pend, 2, "GICD_ISPENDR1 shows INTID 33");
        // UARTICR lowers the line: no longer pending.
        w(&mut cpu, 0x0900_0044, 1 << 5);
        assert_eq!(vm.vgic.lock().dist_read(0x204, 4), Ok(0));
    }

    /// A load of `raw` through `emulate_mmio` with the syndrome's size, SSE and SF into
    /// x5: what the register holds afterwards.
    fn load(raw: u64, size: u8, sign_extend: bool, sixty_four: bool) -> u64 {
        let mut x = [0xdead_beef; 31];
        let (mut pc, mut pstate) = (0x1000, 0);
        let mut ctx = VcpuCtx {
            x: &mut x,
            pc: &mut pc,
            pstate: &mut pstate,
        };
        let syn = DataAccess {
            size,
            sign_extend,
            reg: 5,
            sixty_four,
            acquire_release: false,
        };
        let done: Result<(), ()> = emulate_mmio(&mut ctx, &syn, false, |w| {
            assert_eq!(w, None, "a load reads");
            Ok(raw)
        });
        assert_eq!(done, Ok(()));
        assert_eq!(pc, 0x1004, "the PC moves past the load");
        x[5]
    }

    #[test]
    fn mmio_loads_truncate_sign_extend_and_cut_to_w_registers() {
        // LDRB/LDRH/LDR W/LDR X (zero-extended), LDRSB/LDRSH/LDRSW into X, and into W
        // (the upper half zero): Arm ARM DDI 0487, ISS of a data abort, SAS/SSE/SF.
        let cases = [
            (0x1234_5678_9abc_def0, 1, false, true, 0xf0),
            (0x1234_5678_9abc_def0, 2, false, true, 0xdef0),
            (0x1234_5678_9abc_def0, 4, false, false, 0x9abc_def0),
            (0x1234_5678_9abc_def0, 8, false, true, 0x1234_5678_9abc_def0),
            (0x80, 1, true, true, 0xffff_ffff_ffff_ff80),
            (0x80, 1, true, false, 0xffff_ff80),
            (0x7f, 1, true, true, 0x7f),
            (0x8000, 2, true, true, 0xffff_ffff_ffff_8000),
            (0x8000_0000, 4, true, true, 0xffff_ffff_8000_0000),
            (0x7fff_ffff, 4, true, true, 0x7fff_ffff),
            (u64::MAX, 8, true, true, u64::MAX),
            (u64::MAX, 8, true, false, 0xffff_ffff),
        ];
        for (raw, size, sse, sf, want) in cases {
            assert_eq!(
                load(raw, size, sse, sf),
                want,
                "{raw:#x} size {size} SSE {sse} SF {sf}"
            );
        }
    }

    #[test]
    fn mmio_sizes_no_syndrome_encodes_neither_panic_nor_leak() {
        // SAS encodes 1, 2, 4 or 8 only; a size of 0 (an empty access) reads nothing
        // and one above 8 reads all 64 bits, signed or not.
        for sse in [false, true] {
            assert_eq!(load(u64::MAX, 0, sse, true), 0, "size 0, SSE {sse}");
            for size in [9, 16, 128, 255] {
                let raw = 0x8000_0000_0000_0001;
                assert_eq!(load(raw, size, sse, true), raw, "size {size}, SSE {sse}");
            }
        }
    }

    #[test]
    fn register_numbers_31_and_above_read_zero_and_discard_writes() {
        let mut x: [u64; 31] = core::array::from_fn(|i| i as u64 + 100);
        let (mut pc, mut pstate) = (0, 0);
        let mut ctx = VcpuCtx {
            x: &mut x,
            pc: &mut pc,
            pstate: &mut pstate,
        };
        assert_eq!(ctx.reg(0), 100);
        assert_eq!(ctx.reg(30), 130);
        for n in [31, 32, 200, u8::MAX] {
            assert_eq!(ctx.reg(n), 0, "register {n} reads as XZR");
            ctx.set_reg(n, 7);
        }
        ctx.set_reg(30, 7);
        let want: [u64; 31] = core::array::from_fn(|i| if i == 30 { 7 } else { i as u64 + 100 });
        assert_eq!(x, want, "only x30 was written");
    }
}

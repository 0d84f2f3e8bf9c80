//! Register frames shared between the assembly entry points and Rust.
//!
//! The layouts are `#[repr(C)]` and the assembly uses the offsets computed here with
//! `core::mem::offset_of!` (passed as `const` operands), so the two cannot drift apart.

use crate::esr::{fault_ipa, Esr};

/// Why an exception vector was entered: the vector slot within its group of four.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum ExceptionKind {
    /// Synchronous exception (offset 0x000 in the group).
    Sync = 0,
    /// IRQ (offset 0x080).
    Irq = 1,
    /// FIQ (offset 0x100).
    Fiq = 2,
    /// SError (offset 0x180).
    SError = 3,
}

impl ExceptionKind {
    /// Maps the value the vectors pass in a register back to the kind.
    #[must_use]
    pub const fn from_raw(raw: u64) -> Self {
        match raw & 3 {
            0 => Self::Sync,
            1 => Self::Irq,
            2 => Self::Fiq,
            _ => Self::SError,
        }
    }
}

/// Where the exception came from, as seen by the EL2 vector table (VBAR_EL2 layout,
/// DDI 0487, "Exception vectors" in the AArch64 exception model).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum ExceptionSource {
    /// EL2 while using SP_EL0 (never expected: EL2 always runs on SP_EL2).
    CurrentElSp0 = 0,
    /// EL2 on SP_EL2: a fault or interrupt in the hypervisor itself.
    CurrentElSpx = 1,
}

/// The full register state saved when EL2 takes an exception from EL2 itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct ExceptionFrame {
    /// x0..x30 at the time of the exception.
    pub x: [u64; 31],
    /// The stack pointer at the time of the exception.
    pub sp: u64,
    /// `ELR_EL2`: the address of the faulting (or next) instruction.
    pub elr: u64,
    /// `SPSR_EL2`: the interrupted PSTATE.
    pub spsr: u64,
    /// `ESR_EL2`.
    pub esr: u64,
    /// `FAR_EL2`.
    pub far: u64,
}

impl ExceptionFrame {
    /// The typed syndrome.
    #[must_use]
    pub const fn esr(&self) -> Esr {
        Esr::from_bits(self.esr)
    }
}

/// The guest's SIMD/FP register file, switched eagerly on every guest entry and exit
/// (the hypervisor's own Rust code may use SIMD registers).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, align(16))]
pub struct FpRegs {
    /// q0..q31.
    pub q: [u128; 32],
    /// `FPSR`.
    pub fpsr: u64,
    /// `FPCR`.
    pub fpcr: u64,
}

/// A vCPU's general-purpose state as seen by `enter_guest`.
///
/// The EL1 system registers (SCTLR_EL1, TTBR*_EL1, VBAR_EL1, SP_EL1, SP_EL0, ...) are
/// not part of this structure: the VM code saves and restores them around the call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, align(16))]
pub struct GuestRegs {
    /// x0..x30.
    pub x: [u64; 31],
    /// The guest PC: loaded into `ELR_EL2` on entry, read back from it on exit.
    pub pc: u64,
    /// The guest PSTATE: loaded into `SPSR_EL2` on entry, read back on exit.
    pub pstate: u64,
    /// SIMD/FP registers.
    pub fp: FpRegs,
}

impl GuestRegs {
    /// PSTATE for a guest entered at EL1h with D, A, I and F masked, as the Linux arm64
    /// boot protocol requires (SPSR_EL2.M\[3:0\] = 0b0101, DAIF = 0b1111).
    pub const PSTATE_EL1H_DAIF_MASKED: u64 = 0x3c5;

    /// A vCPU that starts at `pc` in EL1h with interrupts masked and `x0 = arg0`.
    #[must_use]
    pub const fn new(pc: u64, arg0: u64) -> Self {
        let mut x = [0; 31];
        x[0] = arg0;
        Self {
            x,
            pc,
            pstate: Self::PSTATE_EL1H_DAIF_MASKED,
            fp: FpRegs {
                q: [0; 32],
                fpsr: 0,
                fpcr: 0,
            },
        }
    }
}

/// Why the guest stopped running (what `enter_guest` returns).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// A synchronous exception from the guest (HVC, SMC, trapped instruction, stage-2
    /// abort, ...). `far` and `hpfar` are only meaningful for the classes that set them.
    Sync {
        /// `ESR_EL2`.
        esr: Esr,
        /// `FAR_EL2`.
        far: u64,
        /// `HPFAR_EL2`.
        hpfar: u64,
    },
    /// A physical IRQ arrived while the guest ran (needs HCR_EL2.IMO).
    Irq,
    /// A physical FIQ arrived while the guest ran (needs HCR_EL2.FMO).
    Fiq,
    /// An SError was taken from the guest (needs HCR_EL2.AMO).
    SError {
        /// `ESR_EL2`.
        esr: Esr,
    },
}

impl Exit {
    /// Builds the exit from the raw values the assembly collected.
    #[must_use]
    // Only the guest-exit code of the bare-metal target (and the tests) builds one.
    #[cfg_attr(
        not(all(target_arch = "aarch64", target_os = "none")),
        allow(dead_code)
    )]
    pub(crate) const fn from_raw(raw: &RawExit) -> Self {
        match ExceptionKind::from_raw(raw.kind) {
            ExceptionKind::Sync => Self::Sync {
                esr: Esr::from_bits(raw.esr),
                far: raw.far,
                hpfar: raw.hpfar,
            },
            ExceptionKind::Irq => Self::Irq,
            ExceptionKind::Fiq => Self::Fiq,
            ExceptionKind::SError => Self::SError {
                esr: Esr::from_bits(raw.esr),
            },
        }
    }

    /// For a stage-2 abort: the faulting IPA (see [`fault_ipa`]).
    #[must_use]
    pub const fn fault_ipa(&self) -> Option<u64> {
        match self {
            Self::Sync { far, hpfar, .. } => Some(fault_ipa(*hpfar, *far)),
            _ => None,
        }
    }
}

/// Exit information as the guest-exit assembly writes it (turned into an [`Exit`] before
/// `enter_guest` returns).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
#[cfg_attr(
    not(all(target_arch = "aarch64", target_os = "none")),
    allow(dead_code)
)]
pub(crate) struct RawExit {
    /// An [`ExceptionKind`] value.
    pub kind: u64,
    /// `ESR_EL2`.
    pub esr: u64,
    /// `FAR_EL2`.
    pub far: u64,
    /// `HPFAR_EL2`.
    pub hpfar: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn layouts_the_assembly_relies_on() {
        // The vectors store pairs with STP, so offsets must be 8-aligned and the frame a
        // multiple of 16 (SP alignment).
        assert_eq!(offset_of!(ExceptionFrame, sp), 31 * 8);
        assert_eq!(size_of::<ExceptionFrame>() % 16, 0);
        assert_eq!(offset_of!(GuestRegs, pc), 31 * 8);
        assert_eq!(offset_of!(GuestRegs, pstate), 32 * 8);
        // LDP/STP of q registers need 16-byte aligned offsets for the scaled form.
        assert_eq!(offset_of!(GuestRegs, fp) % 16, 0);
        assert_eq!(offset_of!(FpRegs, fpsr), 32 * 16);
    }

    #[test]
    fn exit_from_raw() {
        let raw = RawExit {
            kind: 0,
            esr: 0x5a00_0000,
            far: 0x1234,
            hpfar: 0x50_0000,
        };
        let exit = Exit::from_raw(&raw);
        assert_eq!(
            exit,
            Exit::Sync {
                esr: Esr::from_bits(0x5a00_0000),
                far: 0x1234,
                hpfar: 0x50_0000
            }
        );
        assert_eq!(exit.fault_ipa(), Some(0x5000_0234));
        assert_eq!(Exit::from_raw(&RawExit { kind: 1, ..raw }), Exit::Irq);
        assert_eq!(Exit::from_raw(&RawExit { kind: 2, ..raw }), Exit::Fiq);
        assert_eq!(
            Exit::from_raw(&RawExit { kind: 3, ..raw }),
            Exit::SError {
                esr: Esr::from_bits(0x5a00_0000)
            }
        );
        assert_eq!(Exit::Irq.fault_ipa(), None);
    }

    #[test]
    fn new_guest_starts_at_el1h_masked() {
        let g = GuestRegs::new(0x5008_0000, 0x5000_0000);
        assert_eq!(g.pc, 0x5008_0000);
        assert_eq!(g.x[0], 0x5000_0000);
        assert!(g.x[1..].iter().all(|&r| r == 0));
        assert_eq!(g.pstate & 0xf, 0b0101, "EL1h");
        assert_eq!(g.pstate & 0x3c0, 0x3c0, "DAIF masked");
    }
}

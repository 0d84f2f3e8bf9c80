//! What a guest exit means: the [`boot::Exit`] that `boot::enter_guest` returns, decoded
//! once into the one [`Exit`] the handlers match on (the syndrome decoded by `boot::esr`,
//! narrowed to the cases the vCPU handles, with the faulting IPA of a stage-2 abort put
//! together from `HPFAR_EL2` and `FAR_EL2`).
//!
//! Also builds the `ESR_EL1` value of an abort the hypervisor injects into a guest.

use crate::mem::{Ipa, VirtAddr};
use boot::esr::{DataAccess, Esr, ExceptionClass, FaultStatus, Syndrome, SysRegAccess, WfxKind};

/// A stage-2 (or stage-1 walk) abort taken from the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Abort {
    /// Instruction fetch (true) or data access (false).
    pub instruction: bool,
    /// A write. False for instruction aborts and for cache maintenance (CM = 1), whose
    /// WnR reads as 1 without any write.
    pub write: bool,
    /// Faulting IPA (page from `HPFAR_EL2`, offset from `FAR_EL2`).
    pub ipa: Ipa,
    /// Faulting virtual address (`FAR_EL2`).
    pub far: VirtAddr,
    /// Fault status code.
    pub status: FaultStatus,
    /// How to emulate the access, when the hardware provided a syndrome (`ISV` = 1).
    pub syndrome: Option<DataAccess>,
    /// The fault happened on a stage-1 table walk (`S1PTW`).
    pub s1ptw: bool,
    /// `ESR_EL2`.
    pub esr: Esr,
}

impl Abort {
    /// Whether `ipa` (from `HPFAR_EL2`) is the faulting IPA. `HPFAR_EL2` is written for
    /// stage-2 translation, access flag and address size faults and for any fault on a
    /// stage-1 table walk, but is UNKNOWN for a stage-2 permission fault on the access
    /// itself (Arm ARM D24.2, `HPFAR_EL2`; KVM's `__hpfar_valid` makes the same test):
    /// the IPA of such a fault is found by translating `far` through the guest's stage 1
    /// (`GuestEl1::stage1_ipa`).
    #[must_use]
    pub const fn ipa_valid(&self) -> bool {
        self.s1ptw || !matches!(self.status, FaultStatus::Permission(_))
    }

    /// Whether the IPA has no stage-2 mapping at all (a translation fault).
    #[must_use]
    pub const fn unmapped(&self) -> bool {
        matches!(self.status, FaultStatus::Translation(_))
    }
}

/// Why the guest stopped running, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// `HVC #imm` from AArch64 (EC 0x16). The guest PC already points past it.
    Hvc {
        /// The immediate.
        imm: u16,
    },
    /// `SMC #imm` from AArch64 trapped by `HCR_EL2.TSC` (EC 0x17). The preferred
    /// return address is the SMC itself, so the caller must step over it.
    Smc {
        /// The immediate.
        imm: u16,
    },
    /// `WFI`/`WFE` (and the FEAT_WFxT forms) trapped (EC 0x01).
    Wfx {
        /// True for WFE/WFET.
        wfe: bool,
    },
    /// A trapped `MSR`/`MRS` (EC 0x18), e.g. a write to `ICC_SGI1R_EL1`.
    SysReg {
        /// The decoded access.
        access: SysRegAccess,
        /// `ESR_EL2`.
        esr: Esr,
    },
    /// Data or instruction abort from the guest (EC 0x24 / 0x20).
    Abort(Abort),
    /// A physical IRQ or FIQ.
    Interrupt,
    /// An SError.
    SError {
        /// `ESR_EL2`.
        esr: Esr,
    },
    /// Any other synchronous exception.
    Other {
        /// `ESR_EL2`.
        esr: Esr,
    },
}

impl From<boot::Exit> for Exit {
    fn from(exit: boot::Exit) -> Self {
        let (esr, far, hpfar) = match exit {
            boot::Exit::Irq | boot::Exit::Fiq => return Self::Interrupt,
            boot::Exit::SError { esr } => return Self::SError { esr },
            boot::Exit::Sync { esr, far, hpfar } => (esr, far, hpfar),
        };
        let abort = |a: boot::esr::Abort, instruction: bool| {
            Self::Abort(Abort {
                instruction,
                write: a.write && !a.cache_maintenance,
                ipa: Ipa::new(boot::esr::fault_ipa(hpfar, far)),
                far: VirtAddr::new(far),
                status: a.status,
                syndrome: a.access,
                s1ptw: a.s1ptw,
                esr,
            })
        };
        match esr.decode() {
            Syndrome::Hvc64 { imm } => Self::Hvc { imm },
            Syndrome::Smc64 { imm } => Self::Smc { imm },
            Syndrome::Wfx { kind } => Self::Wfx {
                wfe: matches!(kind, WfxKind::Wfe | WfxKind::Wfet),
            },
            Syndrome::SysReg(access) => Self::SysReg { access, esr },
            Syndrome::DataAbort(a) if a.from_lower_el => abort(a, false),
            Syndrome::InstructionAbort(a) if a.from_lower_el => abort(a, true),
            _ => Self::Other { esr },
        }
    }
}

/// Whether `exit` is an `HVC` or a trapped `SMC` from AArch64: a hypervisor call, PSCI
/// included (the only exits that can make another vCPU's start pending).
#[must_use]
pub fn is_call(exit: &boot::Exit) -> bool {
    matches!(
        exit,
        boot::Exit::Sync { esr, .. }
            if matches!(esr.class(), ExceptionClass::Hvc64 | ExceptionClass::Smc64)
    )
}

/// Builds the `ESR_EL1` value for a synchronous external abort injected into the guest as
/// if its own access had failed: EC 0x25/0x24 (data abort, same/lower EL) or 0x21/0x20
/// (instruction abort), DFSC/IFSC = 0b010000 (synchronous external abort, not on a table
/// walk), WnR copied for data aborts (Arm ARM D24.2.40, ESR_EL1). IL is the trapped
/// instruction's (`ESR_EL2.IL`): 0 for a 16-bit T32 load or store at AArch32 EL0, 1
/// otherwise (instruction aborts always report 1). An abort from EL0, AArch64 or AArch32,
/// is a lower-EL abort to EL1.
#[must_use]
pub fn injected_abort_esr(abort: &Abort, from_el0: bool) -> u64 {
    let class = match (abort.instruction, from_el0) {
        (false, false) => ExceptionClass::DataAbortSame,
        (false, true) => ExceptionClass::DataAbortLower,
        (true, false) => ExceptionClass::InstructionAbortSame,
        (true, true) => ExceptionClass::InstructionAbortLower,
    };
    let wnr = if abort.write { 1 << 6 } else { 0 };
    let il = if abort.instruction || abort.esr.il() {
        1 << 25
    } else {
        0
    };
    (u64::from(class.ec()) << 26) | il | wnr | 0x10
}

#[cfg(test)]
mod tests {
    use super::*;

    fn esr(ec: u8, iss: u32) -> u64 {
        (u64::from(ec) << 26) | (1 << 25) | u64::from(iss)
    }

    #[test]
    fn only_hvc_and_smc_are_calls() {
        let sync = |ec| boot::Exit::Sync {
            esr: Esr::from_bits(esr(ec, 0)),
            far: 0,
            hpfar: 0,
        };
        assert!(is_call(&sync(0x16)), "HVC");
        assert!(is_call(&sync(0x17)), "SMC");
        for ec in [0x01, 0x18, 0x20, 0x24, 0x13, 0x15] {
            assert!(!is_call(&sync(ec)), "EC {ec:#x}");
        }
        assert!(!is_call(&boot::Exit::Irq));
    }

    fn decode(esr: u64, far: u64, hpfar: u64) -> Exit {
        Exit::from(boot::Exit::Sync {
            esr: Esr::from_bits(esr),
            far,
            hpfar,
        })
    }

    #[test]
    fn hvc_smc_wfx() {
        assert_eq!(decode(esr(0x16, 0x1234), 0, 0), Exit::Hvc { imm: 0x1234 });
        assert_eq!(decode(esr(0x17, 0), 0, 0), Exit::Smc { imm: 0 });
        assert_eq!(decode(esr(0x01, 0), 0, 0), Exit::Wfx { wfe: false });
        assert_eq!(decode(esr(0x01, 1), 0, 0), Exit::Wfx { wfe: true });
        assert_eq!(
            decode(esr(0x07, 0), 0, 0),
            Exit::Other {
                esr: Esr::from_bits(esr(7, 0))
            }
        );
        // MSR ICC_SGI1R_EL1, x3: Op0 3, Op2 5, Op1 0, CRn 12, Rt 3, CRm 11, write.
        let iss = (3 << 20) | (5 << 17) | (12 << 10) | (3 << 5) | (11 << 1);
        let Exit::SysReg { access, .. } = decode(esr(0x18, iss), 0, 0) else {
            panic!("not a system register trap")
        };
        assert_eq!(
            (access.op0, access.op1, access.crn, access.crm, access.op2),
            (3, 0, 12, 11, 5)
        );
        assert_eq!((access.rt, access.read), (3, false));
    }

    #[test]
    fn asynchronous_exits() {
        assert_eq!(Exit::from(boot::Exit::Irq), Exit::Interrupt);
        assert_eq!(Exit::from(boot::Exit::Fiq), Exit::Interrupt);
        let esr = Esr::from_bits(esr(0x2f, 0));
        assert_eq!(Exit::from(boot::Exit::SError { esr }), Exit::SError { esr });
    }

    #[test]
    fn data_abort_with_syndrome() {
        // ISV, SAS=word, SRT=x3, SF=0, WnR=1, DFSC=translation fault level 3.
        let iss = (1 << 24) | (2 << 22) | (3 << 16) | (1 << 6) | 0x07;
        let t = decode(esr(0x24, iss), 0x1234_5678, 0x9000 << 4);
        let Exit::Abort(a) = t else {
            panic!("not an abort: {t:?}")
        };
        assert!(!a.instruction);
        assert!(a.write);
        assert!(a.unmapped());
        assert_eq!(a.ipa, Ipa::new(0x0900_0678));
        assert_eq!(a.far, VirtAddr::new(0x1234_5678));
        assert_eq!(a.status, FaultStatus::Translation(3));
        let s = a.syndrome.expect("syndrome");
        assert_eq!(
            (s.size, s.reg, s.sign_extend, s.sixty_four),
            (4, 3, false, false)
        );
    }

    #[test]
    fn data_abort_without_syndrome_and_wide_ipa() {
        // No ISV (e.g. LDP), read; permission fault.
        let iss = (3 << 22) | (31 << 16) | (1 << 15) | 0x0f;
        let hpfar = 0xf_ffff_ffff_u64 << 4; // IPA[47:12] all ones
        let Exit::Abort(a) = decode(esr(0x24, iss), 0xabc, hpfar) else {
            panic!()
        };
        assert_eq!(a.syndrome, None);
        assert!(!a.write);
        assert!(!a.unmapped());
        assert_eq!(a.ipa, Ipa::new(0xffff_ffff_fabc));
    }

    #[test]
    fn instruction_abort_cache_maintenance_and_own_aborts() {
        let Exit::Abort(a) = decode(esr(0x20, (1 << 6) | 0x05), 0x10, 0x10 << 4) else {
            panic!()
        };
        assert!(a.instruction && !a.write && a.syndrome.is_none());
        assert_eq!(a.ipa, Ipa::new(0x10010));
        // CM=1 with WnR=1 is not a write.
        let Exit::Abort(b) = decode(esr(0x24, (1 << 8) | (1 << 6) | 0x05), 0, 0) else {
            panic!()
        };
        assert!(!b.write);
        // An abort taken at EL2 itself (EC 0x25) is not a guest abort.
        assert!(matches!(
            decode(esr(0x25, 0x07), 0, 0),
            Exit::Other { esr } if esr.class().ec() == 0x25
        ));
    }

    #[test]
    fn injected_esr() {
        let Exit::Abort(a) = decode(esr(0x24, (1 << 6) | 0x07), 0, 0) else {
            panic!()
        };
        let e = injected_abort_esr(&a, false);
        assert_eq!(e >> 26, 0x25);
        assert_eq!(e & 0x3f, 0x10);
        assert_ne!(e & (1 << 6), 0);
        assert_ne!(e & (1 << 25), 0);
        assert_eq!(injected_abort_esr(&a, true) >> 26, 0x24);
        let Exit::Abort(i) = decode(esr(0x20, 0x07), 0, 0) else {
            panic!()
        };
        assert_eq!(injected_abort_esr(&i, false) >> 26, 0x21);
        assert_eq!(injected_abort_esr(&i, false) & (1 << 6), 0);
        // A 16-bit T32 store at AArch32 EL0 (ESR_EL2.IL = 0): IL = 0 in ESR_EL1 too.
        let Exit::Abort(t16) = decode((0x24 << 26) | (1 << 6) | 0x07, 0, 0) else {
            panic!()
        };
        let e = injected_abort_esr(&t16, true);
        assert_eq!(e & (1 << 25), 0, "IL from the trapped instruction: {e:#x}");
        assert_eq!(e >> 26, 0x24);
        // An instruction abort reports IL = 1 whatever.
        let Exit::Abort(ia) = decode(0x20 << 26 | 0x07, 0, 0) else {
            panic!()
        };
        assert_ne!(injected_abort_esr(&ia, true) & (1 << 25), 0);
    }
}

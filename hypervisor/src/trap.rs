//! Decoding of guest exits: `ESR_EL2` (with `FAR_EL2`/`HPFAR_EL2`) into a typed value.
//!
//! Encodings: Arm ARM (DDI 0487) D24.2.43 "ESR_EL2" — EC in bits \[31:26\], IL bit 25, ISS
//! in \[24:0\]; data-abort ISS D24.2.43.x "ISS encoding for an exception from a Data Abort";
//! `HPFAR_EL2.FIPA` (bits \[43:4\]) holds IPA\[51:12\] of a stage-2 fault.

/// Access size of a data abort with a valid syndrome (`ISS.SAS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessSize {
    /// 8 bits.
    Byte,
    /// 16 bits.
    Half,
    /// 32 bits.
    Word,
    /// 64 bits.
    Double,
}

impl AccessSize {
    /// Size in bytes.
    #[must_use]
    pub const fn bytes(self) -> u64 {
        match self {
            Self::Byte => 1,
            Self::Half => 2,
            Self::Word => 4,
            Self::Double => 8,
        }
    }
}

/// The instruction syndrome of a data abort (valid when `ISS.ISV` = 1): enough to emulate
/// the load or store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioSyndrome {
    /// Access size.
    pub size: AccessSize,
    /// Sign-extend a load (`SSE`).
    pub sign_extend: bool,
    /// Transfer register number (`SRT`); 31 means XZR/WZR.
    pub reg: u8,
    /// 64-bit register (`SF`).
    pub sixty_four: bool,
}

/// A stage-2 (or stage-1 walk) abort taken from the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Abort {
    /// Instruction fetch (true) or data access (false).
    pub instruction: bool,
    /// Write (`WnR`); always false for instruction aborts and cache maintenance.
    pub write: bool,
    /// Faulting IPA (page from `HPFAR_EL2`, offset from `FAR_EL2`).
    pub ipa: u64,
    /// Faulting virtual address (`FAR_EL2`).
    pub far: u64,
    /// Fault status code (`DFSC`/`IFSC`, ISS\[5:0\]).
    pub fault_status: u8,
    /// Syndrome for emulation, when the hardware provided one (`ISV` = 1).
    pub syndrome: Option<MmioSyndrome>,
    /// The fault happened on a stage-1 table walk (`S1PTW`).
    pub s1ptw: bool,
    /// Raw `ESR_EL2`.
    pub esr: u64,
}

/// What a synchronous exit from the guest was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrapKind {
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
    /// `WFI` or `WFE` trapped (EC 0x01).
    Wfx {
        /// True for WFE.
        wfe: bool,
    },
    /// Stage-2 data or instruction abort from EL1/EL0 (EC 0x24 / 0x20).
    Abort(Abort),
    /// Trapped `MSR`/`MRS`/system instruction (EC 0x18).
    SysReg {
        /// Raw ISS.
        iss: u32,
    },
    /// Anything else: the exception class and the raw ESR.
    Other {
        /// Exception class, `ESR_EL2[31:26]`.
        ec: u8,
        /// Raw `ESR_EL2`.
        esr: u64,
    },
}

/// Exception class values used here (D24.2.43, table "EC encoding").
pub mod ec {
    /// WFI/WFE.
    pub const WFX: u8 = 0x01;
    /// HVC from AArch64.
    pub const HVC64: u8 = 0x16;
    /// SMC from AArch64.
    pub const SMC64: u8 = 0x17;
    /// MSR/MRS/system instruction.
    pub const SYS64: u8 = 0x18;
    /// Instruction abort from a lower EL.
    pub const IABT_LOWER: u8 = 0x20;
    /// Instruction abort taken without a change of EL.
    pub const IABT_CUR: u8 = 0x21;
    /// Data abort from a lower EL.
    pub const DABT_LOWER: u8 = 0x24;
    /// Data abort taken without a change of EL.
    pub const DABT_CUR: u8 = 0x25;
}

/// Decodes one synchronous exit. `far` is `FAR_EL2`, `hpfar` is `HPFAR_EL2`.
#[must_use]
pub fn decode(esr: u64, far: u64, hpfar: u64) -> TrapKind {
    let ec = ((esr >> 26) & 0x3f) as u8;
    let iss = (esr & 0x01ff_ffff) as u32;
    match ec {
        ec::HVC64 => TrapKind::Hvc {
            imm: (iss & 0xffff) as u16,
        },
        ec::SMC64 => TrapKind::Smc {
            imm: (iss & 0xffff) as u16,
        },
        ec::WFX => TrapKind::Wfx { wfe: iss & 1 != 0 },
        ec::SYS64 => TrapKind::SysReg { iss },
        ec::DABT_LOWER | ec::IABT_LOWER => {
            let instruction = ec == ec::IABT_LOWER;
            // FIPA is HPFAR_EL2[43:4] = IPA[51:12].
            let page = ((hpfar >> 4) & ((1 << 40) - 1)) << 12;
            let ipa = page | (far & 0xfff);
            let isv = !instruction && iss & (1 << 24) != 0;
            let syndrome = isv.then_some(MmioSyndrome {
                size: match (iss >> 22) & 3 {
                    0 => AccessSize::Byte,
                    1 => AccessSize::Half,
                    2 => AccessSize::Word,
                    _ => AccessSize::Double,
                },
                sign_extend: iss & (1 << 21) != 0,
                reg: ((iss >> 16) & 0x1f) as u8,
                sixty_four: iss & (1 << 15) != 0,
            });
            // WnR (bit 6) is meaningless for instruction aborts; for cache maintenance
            // (CM, bit 8) it reads as 1 but no write happens.
            let write = !instruction && iss & (1 << 6) != 0 && iss & (1 << 8) == 0;
            TrapKind::Abort(Abort {
                instruction,
                write,
                ipa,
                far,
                fault_status: (iss & 0x3f) as u8,
                syndrome,
                s1ptw: iss & (1 << 7) != 0,
                esr,
            })
        }
        _ => TrapKind::Other { ec, esr },
    }
}

/// Human-readable name of a fault status code (DFSC/IFSC), for log lines.
#[must_use]
pub fn fault_status_name(fsc: u8) -> &'static str {
    match fsc {
        0x04..=0x07 => "translation fault",
        0x08..=0x0b => "access flag fault",
        0x0c..=0x0f => "permission fault",
        0x00..=0x03 => "address size fault",
        0x10 => "synchronous external abort",
        0x21 => "alignment fault",
        _ => "other fault",
    }
}

/// Builds the `ESR_EL1` value for a synchronous external abort injected into the guest as
/// if its own access had failed: EC 0x25/0x24 (data abort, same/lower EL) or 0x21/0x20
/// (instruction abort), IL = 1, DFSC/IFSC = 0b010000 (synchronous external abort, not on
/// a table walk), WnR copied for data aborts.
#[must_use]
pub fn injected_abort_esr(abort: &Abort, from_el0: bool) -> u64 {
    let ec = match (abort.instruction, from_el0) {
        (false, false) => ec::DABT_CUR,
        (false, true) => ec::DABT_LOWER,
        (true, false) => ec::IABT_CUR,
        (true, true) => ec::IABT_LOWER,
    };
    let wnr = if abort.write { 1 << 6 } else { 0 };
    (u64::from(ec) << 26) | (1 << 25) | wnr | 0x10
}

#[cfg(test)]
mod tests {
    use super::*;

    fn esr(ec: u8, iss: u32) -> u64 {
        (u64::from(ec) << 26) | (1 << 25) | u64::from(iss)
    }

    #[test]
    fn hvc_smc_wfx() {
        assert_eq!(
            decode(esr(0x16, 0x1234), 0, 0),
            TrapKind::Hvc { imm: 0x1234 }
        );
        assert_eq!(decode(esr(0x17, 0), 0, 0), TrapKind::Smc { imm: 0 });
        assert_eq!(decode(esr(0x01, 0), 0, 0), TrapKind::Wfx { wfe: false });
        assert_eq!(decode(esr(0x01, 1), 0, 0), TrapKind::Wfx { wfe: true });
        assert_eq!(
            decode(esr(0x07, 0), 0, 0),
            TrapKind::Other {
                ec: 7,
                esr: esr(7, 0)
            }
        );
    }

    #[test]
    fn data_abort_with_syndrome() {
        // ISV, SAS=word, SRT=x3, SF=0, WnR=1, DFSC=translation fault level 3.
        let iss = (1 << 24) | (2 << 22) | (3 << 16) | (1 << 6) | 0x07;
        let t = decode(esr(0x24, iss), 0x1234_5678, 0x9000 << 4);
        let TrapKind::Abort(a) = t else {
            panic!("not an abort: {t:?}")
        };
        assert!(!a.instruction);
        assert!(a.write);
        assert_eq!(a.ipa, 0x0900_0678);
        assert_eq!(a.far, 0x1234_5678);
        assert_eq!(a.fault_status, 0x07);
        assert_eq!(
            a.syndrome,
            Some(MmioSyndrome {
                size: AccessSize::Word,
                sign_extend: false,
                reg: 3,
                sixty_four: false
            })
        );
    }

    #[test]
    fn data_abort_without_syndrome_and_wide_ipa() {
        // No ISV (e.g. LDP), read, 64-bit register bits set but meaningless.
        let iss = (3 << 22) | (31 << 16) | (1 << 15) | 0x06;
        let hpfar = 0xf_ffff_ffff_u64 << 4; // IPA[47:12] all ones
        let TrapKind::Abort(a) = decode(esr(0x24, iss), 0xabc, hpfar) else {
            panic!()
        };
        assert_eq!(a.syndrome, None);
        assert!(!a.write);
        assert_eq!(a.ipa, 0xffff_ffff_fabc);
    }

    #[test]
    fn instruction_abort_and_cache_maintenance() {
        let TrapKind::Abort(a) = decode(esr(0x20, (1 << 6) | 0x05), 0x10, 0x10 << 4) else {
            panic!()
        };
        assert!(a.instruction && !a.write && a.syndrome.is_none());
        assert_eq!(a.ipa, 0x10010);
        // CM=1 with WnR=1 is not a write.
        let TrapKind::Abort(b) = decode(esr(0x24, (1 << 8) | (1 << 6) | 0x05), 0, 0) else {
            panic!()
        };
        assert!(!b.write);
    }

    #[test]
    fn injected_esr() {
        let TrapKind::Abort(a) = decode(esr(0x24, (1 << 6) | 0x07), 0, 0) else {
            panic!()
        };
        let e = injected_abort_esr(&a, false);
        assert_eq!(e >> 26, 0x25);
        assert_eq!(e & 0x3f, 0x10);
        assert_ne!(e & (1 << 6), 0);
        assert_ne!(e & (1 << 25), 0);
        assert_eq!(fault_status_name(0x07), "translation fault");
    }
}

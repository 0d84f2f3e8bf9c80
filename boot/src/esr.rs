//! Typed decoding of the Exception Syndrome Register (`ESR_EL2`).
//!
//! Field positions follow the Arm ARM (DDI 0487), register description "ESR_EL2, Exception
//! Syndrome Register (EL2)": EC is bits \[31:26\], IL bit 25, ISS bits \[24:0\] (ISS2 in \[55:32\] is
//! kept in the raw value but not decoded). The per-class ISS layouts are in the same section
//! ("ISS encoding for an exception from a Data Abort", "... an Instruction Abort",
//! "... an HVC or SVC instruction execution", "... MSR, MRS, or System instruction
//! execution", "... a WF* instruction").
//!
//! Decoding never fails: unknown classes and fault codes keep their raw value.

use core::fmt;

/// A raw `ESR_EL2` value with accessors for its architectural fields.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Esr(u64);

impl Esr {
    /// Wraps a raw `ESR_EL2` value.
    #[must_use]
    pub const fn from_bits(bits: u64) -> Self {
        Self(bits)
    }

    /// The raw register value.
    #[must_use]
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// The exception class, EC \[31:26\].
    #[must_use]
    pub const fn class(self) -> ExceptionClass {
        ExceptionClass::from_ec(((self.0 >> 26) & 0x3f) as u8)
    }

    /// IL (bit 25): the trapped instruction was 32 bits long.
    #[must_use]
    pub const fn il(self) -> bool {
        self.0 & (1 << 25) != 0
    }

    /// The instruction-specific syndrome, ISS \[24:0\].
    #[must_use]
    pub const fn iss(self) -> u32 {
        (self.0 & 0x1ff_ffff) as u32
    }

    /// Decodes the syndrome into a typed value.
    #[must_use]
    pub fn decode(self) -> Syndrome {
        let iss = self.iss();
        match self.class() {
            ExceptionClass::Unknown => Syndrome::Unknown,
            ExceptionClass::WfxTrap => Syndrome::Wfx {
                kind: match iss & 0b11 {
                    0 => WfxKind::Wfi,
                    1 => WfxKind::Wfe,
                    2 => WfxKind::Wfit,
                    _ => WfxKind::Wfet,
                },
            },
            ExceptionClass::FpAccess => Syndrome::FpAccess,
            ExceptionClass::SveAccess => Syndrome::SveAccess,
            ExceptionClass::IllegalState => Syndrome::IllegalState,
            ExceptionClass::Svc64 => Syndrome::Svc64 { imm: iss as u16 },
            ExceptionClass::Hvc64 => Syndrome::Hvc64 { imm: iss as u16 },
            ExceptionClass::Smc64 => Syndrome::Smc64 { imm: iss as u16 },
            ExceptionClass::SysReg => Syndrome::SysReg(SysRegAccess::from_iss(iss)),
            ExceptionClass::InstructionAbortLower | ExceptionClass::InstructionAbortSame => {
                Syndrome::InstructionAbort(Abort::from_iss(iss, self.class(), false))
            }
            ExceptionClass::DataAbortLower | ExceptionClass::DataAbortSame => {
                Syndrome::DataAbort(Abort::from_iss(iss, self.class(), true))
            }
            ExceptionClass::PcAlignment => Syndrome::PcAlignment,
            ExceptionClass::SpAlignment => Syndrome::SpAlignment,
            ExceptionClass::SError => Syndrome::SError { iss },
            ExceptionClass::Brk64 => Syndrome::Brk64 { imm: iss as u16 },
            class => Syndrome::Other { class, iss },
        }
    }
}

impl fmt::Debug for Esr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Esr({:#x}: {})", self.0, self.class())
    }
}

macro_rules! exception_classes {
    ($($(#[$doc:meta])* $name:ident = $ec:literal, $text:literal;)*) => {
        /// The exception class (ESR_EL2.EC).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum ExceptionClass {
            $($(#[$doc])* $name,)*
            /// An EC value this crate does not name (reserved or not used at EL2).
            Other(u8),
        }

        impl ExceptionClass {
            /// Maps a 6-bit EC value to its class.
            #[must_use]
            pub const fn from_ec(ec: u8) -> Self {
                match ec & 0x3f {
                    $($ec => Self::$name,)*
                    other => Self::Other(other),
                }
            }

            /// The 6-bit EC value.
            #[must_use]
            pub const fn ec(self) -> u8 {
                match self {
                    $(Self::$name => $ec,)*
                    Self::Other(ec) => ec,
                }
            }

            /// A short human-readable description.
            #[must_use]
            pub const fn description(self) -> &'static str {
                match self {
                    $(Self::$name => $text,)*
                    Self::Other(_) => "unnamed exception class",
                }
            }
        }
    };
}

exception_classes! {
    /// Unknown reason (e.g. an undefined instruction).
    Unknown = 0x00, "unknown reason (undefined instruction)";
    /// WFI/WFE/WFIT/WFET trapped.
    WfxTrap = 0x01, "WFI/WFE trapped";
    /// AArch32 MCR/MRC access to CP15.
    Cp15Mcr = 0x03, "AArch32 MCR/MRC CP15 access";
    /// AArch32 MCRR/MRRC access to CP15.
    Cp15Mcrr = 0x04, "AArch32 MCRR/MRRC CP15 access";
    /// AArch32 MCR/MRC access to CP14.
    Cp14Mcr = 0x05, "AArch32 MCR/MRC CP14 access";
    /// AArch32 LDC/STC access to CP14.
    Cp14Ldc = 0x06, "AArch32 LDC/STC CP14 access";
    /// SVE, Advanced SIMD or floating-point access trapped (CPTR_EL2).
    FpAccess = 0x07, "SIMD/FP access trapped";
    /// AArch32 MRRC access to CP14.
    Cp14Mrrc = 0x0c, "AArch32 MRRC CP14 access";
    /// Branch target exception.
    BranchTarget = 0x0d, "branch target exception";
    /// Illegal execution state.
    IllegalState = 0x0e, "illegal execution state";
    /// SVC in AArch32.
    Svc32 = 0x11, "SVC (AArch32)";
    /// HVC in AArch32.
    Hvc32 = 0x12, "HVC (AArch32)";
    /// SMC in AArch32.
    Smc32 = 0x13, "SMC (AArch32)";
    /// SVC in AArch64.
    Svc64 = 0x15, "SVC (AArch64)";
    /// HVC in AArch64.
    Hvc64 = 0x16, "HVC (AArch64)";
    /// SMC in AArch64 (trapped by HCR_EL2.TSC when from EL1).
    Smc64 = 0x17, "SMC (AArch64)";
    /// MSR, MRS or system instruction trapped.
    SysReg = 0x18, "MSR/MRS/system instruction trapped";
    /// SVE access trapped.
    SveAccess = 0x19, "SVE access trapped";
    /// Pointer authentication failure.
    PacFail = 0x1c, "pointer authentication failure";
    /// Instruction abort from a lower exception level.
    InstructionAbortLower = 0x20, "instruction abort from a lower EL";
    /// Instruction abort taken without a change in exception level.
    InstructionAbortSame = 0x21, "instruction abort at EL2";
    /// PC alignment fault.
    PcAlignment = 0x22, "PC alignment fault";
    /// Data abort from a lower exception level.
    DataAbortLower = 0x24, "data abort from a lower EL";
    /// Data abort taken without a change in exception level.
    DataAbortSame = 0x25, "data abort at EL2";
    /// SP alignment fault.
    SpAlignment = 0x26, "SP alignment fault";
    /// Trapped floating-point exception (AArch32).
    Fp32 = 0x28, "floating-point exception (AArch32)";
    /// Trapped floating-point exception (AArch64).
    Fp64 = 0x2c, "floating-point exception (AArch64)";
    /// SError interrupt.
    SError = 0x2f, "SError";
    /// Breakpoint from a lower exception level.
    BreakpointLower = 0x30, "breakpoint from a lower EL";
    /// Breakpoint at the current exception level.
    BreakpointSame = 0x31, "breakpoint at EL2";
    /// Software step from a lower exception level.
    SoftwareStepLower = 0x32, "software step from a lower EL";
    /// Software step at the current exception level.
    SoftwareStepSame = 0x33, "software step at EL2";
    /// Watchpoint from a lower exception level.
    WatchpointLower = 0x34, "watchpoint from a lower EL";
    /// Watchpoint at the current exception level.
    WatchpointSame = 0x35, "watchpoint at EL2";
    /// BKPT in AArch32.
    Bkpt32 = 0x38, "BKPT (AArch32)";
    /// BRK in AArch64.
    Brk64 = 0x3c, "BRK (AArch64)";
}

impl fmt::Display for ExceptionClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EC {:#04x}: {}", self.ec(), self.description())
    }
}

/// Which wait instruction was trapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WfxKind {
    /// WFI.
    Wfi,
    /// WFE.
    Wfe,
    /// WFIT (FEAT_WFxT).
    Wfit,
    /// WFET (FEAT_WFxT).
    Wfet,
}

/// A trapped `MSR`/`MRS`/system instruction (EC 0x18).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SysRegAccess {
    /// Op0 \[21:20\].
    pub op0: u8,
    /// Op1 \[16:14\].
    pub op1: u8,
    /// CRn \[13:10\].
    pub crn: u8,
    /// CRm \[4:1\].
    pub crm: u8,
    /// Op2 \[19:17\].
    pub op2: u8,
    /// The general-purpose register transferred, Rt \[9:5\] (31 = XZR).
    pub rt: u8,
    /// Direction \[0\]: true for a read (`MRS`), false for a write (`MSR`).
    pub read: bool,
}

impl SysRegAccess {
    const fn from_iss(iss: u32) -> Self {
        Self {
            op0: ((iss >> 20) & 0b11) as u8,
            op2: ((iss >> 17) & 0b111) as u8,
            op1: ((iss >> 14) & 0b111) as u8,
            crn: ((iss >> 10) & 0b1111) as u8,
            rt: ((iss >> 5) & 0b1_1111) as u8,
            crm: ((iss >> 1) & 0b1111) as u8,
            read: iss & 1 != 0,
        }
    }
}

/// The fault status code of an abort (DFSC/IFSC, ISS \[5:0\]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultStatus {
    /// Address size fault at the given lookup level.
    AddressSize(u8),
    /// Translation fault at the given lookup level.
    Translation(u8),
    /// Access flag fault at the given lookup level.
    AccessFlag(u8),
    /// Permission fault at the given lookup level.
    Permission(u8),
    /// Synchronous external abort, not on a table walk.
    SyncExternal,
    /// Synchronous external abort on a table walk at the given level.
    SyncExternalOnWalk(u8),
    /// Alignment fault.
    Alignment,
    /// TLB conflict abort.
    TlbConflict,
    /// Any other code (kept raw).
    Other(u8),
}

impl FaultStatus {
    /// Decodes a 6-bit DFSC/IFSC value.
    #[must_use]
    pub const fn from_code(code: u8) -> Self {
        let level = code & 0b11;
        match code & 0x3f {
            0b00_0000..=0b00_0011 => Self::AddressSize(level),
            0b00_0100..=0b00_0111 => Self::Translation(level),
            0b00_1000..=0b00_1011 => Self::AccessFlag(level),
            0b00_1100..=0b00_1111 => Self::Permission(level),
            0b01_0000 => Self::SyncExternal,
            0b01_0100..=0b01_0111 => Self::SyncExternalOnWalk(level),
            0b10_0001 => Self::Alignment,
            0b11_0000 => Self::TlbConflict,
            other => Self::Other(other),
        }
    }
}

impl fmt::Display for FaultStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AddressSize(l) => write!(f, "address size fault, level {l}"),
            Self::Translation(l) => write!(f, "translation fault, level {l}"),
            Self::AccessFlag(l) => write!(f, "access flag fault, level {l}"),
            Self::Permission(l) => write!(f, "permission fault, level {l}"),
            Self::SyncExternal => f.write_str("synchronous external abort"),
            Self::SyncExternalOnWalk(l) => {
                write!(f, "synchronous external abort on table walk, level {l}")
            }
            Self::Alignment => f.write_str("alignment fault"),
            Self::TlbConflict => f.write_str("TLB conflict abort"),
            Self::Other(c) => write!(f, "fault status {c:#04x}"),
        }
    }
}

/// Register transfer details of a data abort with a valid instruction syndrome (ISV = 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataAccess {
    /// Access size in bytes (1, 2, 4 or 8), from SAS \[23:22\].
    pub size: u8,
    /// SSE \[21\]: the load sign-extends.
    pub sign_extend: bool,
    /// SRT \[20:16\]: the transfer register (31 = XZR/WZR).
    pub reg: u8,
    /// SF \[15\]: the register is 64 bits wide.
    pub sixty_four: bool,
    /// AR \[14\]: acquire/release semantics.
    pub acquire_release: bool,
}

/// An instruction or data abort.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Abort {
    /// Taken from a lower exception level (a guest) rather than EL2 itself.
    pub from_lower_el: bool,
    /// Fault status code.
    pub status: FaultStatus,
    /// WnR \[6\] (data aborts only): the access was a write.
    pub write: bool,
    /// S1PTW \[7\]: the fault happened on a stage-2 walk done for a stage-1 table walk.
    pub s1ptw: bool,
    /// CM \[8\] (data aborts only): raised by a cache maintenance or address translation instruction.
    pub cache_maintenance: bool,
    /// EA \[9\]: external abort type (implementation defined).
    pub external: bool,
    /// FnV \[10\]: FAR is not valid.
    pub far_not_valid: bool,
    /// Present when ISV \[24\] is set (data aborts only): how to emulate the access.
    pub access: Option<DataAccess>,
}

impl Abort {
    const fn from_iss(iss: u32, class: ExceptionClass, data: bool) -> Self {
        let access = if data && iss & (1 << 24) != 0 {
            Some(DataAccess {
                size: 1 << ((iss >> 22) & 0b11),
                sign_extend: iss & (1 << 21) != 0,
                reg: ((iss >> 16) & 0b1_1111) as u8,
                sixty_four: iss & (1 << 15) != 0,
                acquire_release: iss & (1 << 14) != 0,
            })
        } else {
            None
        };
        Self {
            from_lower_el: matches!(
                class,
                ExceptionClass::InstructionAbortLower | ExceptionClass::DataAbortLower
            ),
            status: FaultStatus::from_code((iss & 0x3f) as u8),
            write: data && iss & (1 << 6) != 0,
            s1ptw: iss & (1 << 7) != 0,
            cache_maintenance: data && iss & (1 << 8) != 0,
            external: iss & (1 << 9) != 0,
            far_not_valid: iss & (1 << 10) != 0,
            access,
        }
    }
}

/// A decoded `ESR_EL2`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Syndrome {
    /// EC 0x00: unknown reason, typically an undefined instruction.
    Unknown,
    /// EC 0x01: a trapped wait instruction.
    Wfx {
        /// Which instruction.
        kind: WfxKind,
    },
    /// EC 0x07: SIMD/FP access trapped.
    FpAccess,
    /// EC 0x19: SVE access trapped.
    SveAccess,
    /// EC 0x0E: illegal execution state.
    IllegalState,
    /// EC 0x15: SVC with its immediate.
    Svc64 {
        /// The 16-bit immediate.
        imm: u16,
    },
    /// EC 0x16: HVC with its immediate.
    Hvc64 {
        /// The 16-bit immediate.
        imm: u16,
    },
    /// EC 0x17: SMC with its immediate.
    Smc64 {
        /// The 16-bit immediate.
        imm: u16,
    },
    /// EC 0x18: a trapped system register access.
    SysReg(SysRegAccess),
    /// EC 0x20/0x21: instruction abort.
    InstructionAbort(Abort),
    /// EC 0x24/0x25: data abort.
    DataAbort(Abort),
    /// EC 0x22: PC alignment fault.
    PcAlignment,
    /// EC 0x26: SP alignment fault.
    SpAlignment,
    /// EC 0x2F: SError with its raw ISS.
    SError {
        /// The raw ISS.
        iss: u32,
    },
    /// EC 0x3C: BRK with its immediate.
    Brk64 {
        /// The 16-bit immediate.
        imm: u16,
    },
    /// Any other class, with its raw ISS.
    Other {
        /// The class.
        class: ExceptionClass,
        /// The raw ISS.
        iss: u32,
    },
}

impl fmt::Display for Syndrome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unknown => f.write_str("unknown reason (undefined instruction)"),
            Self::Wfx { kind } => write!(f, "{kind:?} trapped"),
            Self::FpAccess => f.write_str("SIMD/FP access trapped"),
            Self::SveAccess => f.write_str("SVE access trapped"),
            Self::IllegalState => f.write_str("illegal execution state"),
            Self::Svc64 { imm } => write!(f, "SVC #{imm:#x}"),
            Self::Hvc64 { imm } => write!(f, "HVC #{imm:#x}"),
            Self::Smc64 { imm } => write!(f, "SMC #{imm:#x}"),
            Self::SysReg(a) => write!(
                f,
                "{} S{}_{}_C{}_C{}_{} (x{})",
                if a.read { "MRS" } else { "MSR" },
                a.op0,
                a.op1,
                a.crn,
                a.crm,
                a.op2,
                a.rt
            ),
            Self::InstructionAbort(a) => write!(
                f,
                "instruction abort{}: {}",
                if a.from_lower_el {
                    " from a lower EL"
                } else {
                    " at EL2"
                },
                a.status
            ),
            Self::DataAbort(a) => write!(
                f,
                "data abort{} on {}: {}",
                if a.from_lower_el {
                    " from a lower EL"
                } else {
                    " at EL2"
                },
                if a.write { "write" } else { "read" },
                a.status
            ),
            Self::PcAlignment => f.write_str("PC alignment fault"),
            Self::SpAlignment => f.write_str("SP alignment fault"),
            Self::SError { iss } => write!(f, "SError (ISS {iss:#x})"),
            Self::Brk64 { imm } => write!(f, "BRK #{imm:#x}"),
            Self::Other { class, iss } => write!(f, "{class} (ISS {iss:#x})"),
        }
    }
}

/// The faulting intermediate physical address of a stage-2 abort.
///
/// `HPFAR_EL2.FIPA` (bits \[47:4\]) holds IPA bits \[55:12\] (DDI 0487, register description
/// "HPFAR_EL2, Hypervisor IPA Fault Address Register"); the page offset comes
/// from `FAR_EL2`. `HPFAR_EL2` is only valid for stage-2 translation, access flag and
/// address size faults and for stage-1 table walks that fault at stage 2 (`S1PTW`); for
/// a stage-2 permission fault on the access itself it is UNKNOWN (the hypervisor then
/// translates `FAR_EL2`, `vcpu::exit::Abort::ipa_valid`).
#[must_use]
pub const fn fault_ipa(hpfar: u64, far: u64) -> u64 {
    (((hpfar >> 4) & ((1 << 44) - 1)) << 12) | (far & 0xfff)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn esr(ec: u64, il: bool, iss: u64) -> Esr {
        Esr::from_bits((ec << 26) | (u64::from(il) << 25) | iss)
    }

    #[test]
    fn fields() {
        let e = esr(0x24, true, 0x1234);
        assert_eq!(e.class(), ExceptionClass::DataAbortLower);
        assert!(e.il());
        assert_eq!(e.iss(), 0x1234);
        assert!(!esr(0x24, false, 0).il());
        // ISS2 bits above 31 must not leak into EC or ISS.
        let high = Esr::from_bits((0xffff_u64 << 32) | (0x16 << 26) | 7);
        assert_eq!(high.class(), ExceptionClass::Hvc64);
        assert_eq!(high.iss(), 7);
    }

    #[test]
    fn every_ec_round_trips() {
        for ec in 0..64u8 {
            assert_eq!(ExceptionClass::from_ec(ec).ec(), ec);
        }
        assert_eq!(ExceptionClass::from_ec(0x3f), ExceptionClass::Other(0x3f));
    }

    #[test]
    fn hvc_smc_svc_immediates() {
        assert_eq!(
            esr(0x16, true, 0x4711).decode(),
            Syndrome::Hvc64 { imm: 0x4711 }
        );
        assert_eq!(esr(0x17, true, 0).decode(), Syndrome::Smc64 { imm: 0 });
        assert_eq!(
            esr(0x15, true, 0xffff).decode(),
            Syndrome::Svc64 { imm: 0xffff }
        );
        assert_eq!(
            esr(0x3c, true, 0xf00).decode(),
            Syndrome::Brk64 { imm: 0xf00 }
        );
    }

    #[test]
    fn data_abort_with_valid_syndrome() {
        // ISV=1, SAS=0b10 (word), SSE=0, SRT=5, SF=0, AR=1, WnR=1, DFSC=translation L3.
        let iss = (1 << 24) | (0b10 << 22) | (5 << 16) | (1 << 14) | (1 << 6) | 0b00_0111;
        let Syndrome::DataAbort(a) = esr(0x24, true, iss).decode() else {
            panic!("not a data abort");
        };
        assert!(a.from_lower_el);
        assert!(a.write);
        assert!(!a.s1ptw);
        assert_eq!(a.status, FaultStatus::Translation(3));
        assert_eq!(
            a.access,
            Some(DataAccess {
                size: 4,
                sign_extend: false,
                reg: 5,
                sixty_four: false,
                acquire_release: true
            })
        );
    }

    #[test]
    fn data_abort_without_valid_syndrome() {
        // ISV=0 but bits [23:14] set: must not produce an access description.
        let iss = (0b11 << 22) | (31 << 16) | (1 << 15) | (1 << 10) | (1 << 7) | 0b00_1111;
        let Syndrome::DataAbort(a) = esr(0x25, true, iss).decode() else {
            panic!("not a data abort");
        };
        assert!(!a.from_lower_el);
        assert!(!a.write);
        assert!(a.s1ptw);
        assert!(a.far_not_valid);
        assert_eq!(a.access, None);
        assert_eq!(a.status, FaultStatus::Permission(3));
    }

    #[test]
    fn instruction_abort_ignores_data_only_bits() {
        // WnR and CM are RES0 for instruction aborts; set them and check they are ignored.
        let iss = (1 << 8) | (1 << 6) | 0b00_1110;
        let Syndrome::InstructionAbort(a) = esr(0x21, true, iss).decode() else {
            panic!("not an instruction abort");
        };
        assert!(!a.write);
        assert!(!a.cache_maintenance);
        assert_eq!(a.status, FaultStatus::Permission(2));
    }

    #[test]
    fn fault_status_codes() {
        assert_eq!(
            FaultStatus::from_code(0b00_0001),
            FaultStatus::AddressSize(1)
        );
        assert_eq!(
            FaultStatus::from_code(0b00_0100),
            FaultStatus::Translation(0)
        );
        assert_eq!(
            FaultStatus::from_code(0b00_1010),
            FaultStatus::AccessFlag(2)
        );
        assert_eq!(FaultStatus::from_code(0b01_0000), FaultStatus::SyncExternal);
        assert_eq!(
            FaultStatus::from_code(0b01_0101),
            FaultStatus::SyncExternalOnWalk(1)
        );
        assert_eq!(FaultStatus::from_code(0b10_0001), FaultStatus::Alignment);
        assert_eq!(FaultStatus::from_code(0b11_0000), FaultStatus::TlbConflict);
        assert_eq!(
            FaultStatus::from_code(0b11_0101),
            FaultStatus::Other(0b11_0101)
        );
    }

    #[test]
    fn sysreg_trap() {
        // MRS x3, CNTPCT_EL0 = S3_3_C14_C0_1: op0=3 op1=3 CRn=14 CRm=0 op2=1, read.
        let iss = (3 << 20) | (1 << 17) | (3 << 14) | (14 << 10) | (3 << 5) | 1;
        assert_eq!(
            esr(0x18, true, iss).decode(),
            Syndrome::SysReg(SysRegAccess {
                op0: 3,
                op1: 3,
                crn: 14,
                crm: 0,
                op2: 1,
                rt: 3,
                read: true
            })
        );
    }

    #[test]
    fn wfx_kinds() {
        assert_eq!(
            esr(0x01, true, 0).decode(),
            Syndrome::Wfx { kind: WfxKind::Wfi }
        );
        assert_eq!(
            esr(0x01, true, 1).decode(),
            Syndrome::Wfx { kind: WfxKind::Wfe }
        );
    }

    #[test]
    fn unnamed_class_keeps_raw_iss() {
        assert_eq!(
            esr(0x3f, false, 0x1ff_ffff).decode(),
            Syndrome::Other {
                class: ExceptionClass::Other(0x3f),
                iss: 0x1ff_ffff
            }
        );
    }

    #[test]
    fn display_names_the_class() {
        extern crate std;
        use std::string::ToString;
        assert_eq!(
            ExceptionClass::DataAbortSame.to_string(),
            "EC 0x25: data abort at EL2"
        );
        let s = esr(0x25, true, (1 << 6) | 0b00_1111).decode().to_string();
        assert_eq!(s, "data abort at EL2 on write: permission fault, level 3");
    }

    #[test]
    fn ipa_from_hpfar_and_far() {
        // IPA 0x8_1234_5678: FIPA = IPA >> 12 in HPFAR[47:4].
        let hpfar = (0x8_1234_5678_u64 >> 12) << 4;
        assert_eq!(fault_ipa(hpfar, 0xffff_0000_dead_b678), 0x8_1234_5678);
    }
}

//! The emulated distributor: the `GICD_*` registers of one 64 KiB frame at the VM's
//! distributor IPA (IHI 0069 chapter 12, the distributor register map and descriptions).
//!
//! With affinity routing always on, the registers for INTIDs 0-31 are in the
//! redistributors and read as zero here, `GICD_ITARGETSR`, `GICD_SGIR`, `GICD_CPENDSGIR`
//! and `GICD_SPENDSGIR` read as zero and ignore writes (IHI 0069 chapter 12, each register's
//! description with affinity routing enabled), and so do `GICD_IGRPMODR` and `GICD_NSACR` with one Security state.

use super::regs::{self, BitReg, Sizes};
use super::{
    MmioError, PhysAction, PhysGic, Spi, SpiSource, VcpuMask, Vgic, CTLR_ARE, CTLR_DS,
    CTLR_ENABLE_GRP0, CTLR_ENABLE_GRP1,
};

/// Size of the distributor frame.
pub const DIST_SIZE: u64 = 0x1_0000;
/// `GICD_CTLR`.
pub const GICD_CTLR: u64 = 0x0000;
/// `GICD_TYPER`.
pub const GICD_TYPER: u64 = 0x0004;
/// `GICD_IIDR`.
pub const GICD_IIDR: u64 = 0x0008;
/// `GICD_IGROUPR<n>`.
pub const GICD_IGROUPR: u64 = 0x0080;
/// `GICD_ISENABLER<n>`.
pub const GICD_ISENABLER: u64 = 0x0100;
/// `GICD_ICENABLER<n>`.
pub const GICD_ICENABLER: u64 = 0x0180;
/// `GICD_ISPENDR<n>`.
pub const GICD_ISPENDR: u64 = 0x0200;
/// `GICD_ICPENDR<n>`.
pub const GICD_ICPENDR: u64 = 0x0280;
/// `GICD_ISACTIVER<n>`.
pub const GICD_ISACTIVER: u64 = 0x0300;
/// `GICD_ICACTIVER<n>`.
pub const GICD_ICACTIVER: u64 = 0x0380;
/// `GICD_IPRIORITYR<n>` (byte-accessible).
pub const GICD_IPRIORITYR: u64 = 0x0400;
/// `GICD_ITARGETSR<n>` (byte-accessible; RAZ/WI with affinity routing).
pub const GICD_ITARGETSR: u64 = 0x0800;
/// `GICD_ICFGR<n>`.
pub const GICD_ICFGR: u64 = 0x0c00;
/// `GICD_IGRPMODR<n>` (RAZ/WI with one Security state).
pub const GICD_IGRPMODR: u64 = 0x0d00;
/// `GICD_SGIR` (WI with affinity routing).
pub const GICD_SGIR: u64 = 0x0f00;
/// `GICD_CPENDSGIR<n>` (byte-accessible; RAZ/WI with affinity routing).
pub const GICD_CPENDSGIR: u64 = 0x0f10;
/// `GICD_SPENDSGIR<n>` (byte-accessible; RAZ/WI with affinity routing).
pub const GICD_SPENDSGIR: u64 = 0x0f20;
/// `GICD_IROUTER<n>`: at `GICD_IROUTER + 8 * n` for SPI `n` (64-bit).
pub const GICD_IROUTER: u64 = 0x6000;
/// `GICD_PIDR2`.
pub const GICD_PIDR2: u64 = 0xffe8;

/// `GICD_TYPER.IDbits` \[23:19\]: INTIDs have 10 bits (no LPIs), encoded as 10 - 1.
pub const TYPER_IDBITS: u32 = 9 << 19;
/// `GICD_TYPER.A3V`, bit 24: Aff3 is supported in routing and SGIs.
pub const TYPER_A3V: u32 = 1 << 24;
/// `GICD_TYPER.RSS`, bit 26: SGI targets with Aff0 up to 255 (the `RS` field).
pub const TYPER_RSS: u32 = 1 << 26;

/// One decoded distributor register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reg {
    Ctlr,
    Typer,
    Iidr,
    /// A bitmap register for INTIDs `first..first + 32`.
    Bits(BitReg, u32),
    /// Priority bytes from this INTID on.
    Priority(u32),
    /// `ICFGR` for INTIDs `first..first + 16`.
    Cfg(u32),
    /// `IROUTER` of this INTID, upper word or the whole register.
    Router {
        intid: u32,
        high: bool,
    },
    /// An identification register.
    Id(u32),
    /// Byte-accessible, RAZ/WI.
    ByteRaz,
    /// RAZ/WI.
    Raz,
}

impl Reg {
    fn decode(offset: u64) -> Self {
        match offset {
            GICD_CTLR => Self::Ctlr,
            GICD_TYPER => Self::Typer,
            GICD_IIDR => Self::Iidr,
            // Within each arm the offset from the block's base is the low bits of
            // `offset` (every base is aligned to its block's size), so the INTIDs are
            // masks and shifts of it: 32 per word of a bitmap, one per byte of
            // IPRIORITYR, 16 per word of ICFGR, one per 8 bytes of IROUTER.
            0x0080..=0x03ff => match BitReg::from_block(offset & !0x7f) {
                Some(r) => Self::Bits(r, ((offset & 0x7c) << 3) as u32),
                None => Self::Raz,
            },
            0x0400..=0x07ff => Self::Priority((offset & 0x3ff) as u32),
            0x0800..=0x0bff | 0x0f10..=0x0f2f => Self::ByteRaz,
            0x0c00..=0x0cff => Self::Cfg(((offset & 0xfc) << 2) as u32),
            0x6000..=0x7fff => Self::Router {
                intid: ((offset & 0x1fff) >> 3) as u32,
                high: offset % 8 == 4,
            },
            _ => regs::id_register(offset).map_or(Self::Raz, Self::Id),
        }
    }

    const fn sizes(self) -> Sizes {
        match self {
            Self::Priority(_) | Self::ByteRaz => Sizes::WordOrByte,
            Self::Router { .. } => Sizes::DoubleOrWord,
            _ => Sizes::Word,
        }
    }
}

impl Vgic {
    /// `GICD_CTLR` as the guest reads it: its group enables, ARE and DS always set, RWP
    /// (bit 31) always 0 as writes take effect at once.
    #[must_use]
    pub fn gicd_ctlr(&self) -> u32 {
        self.ctlr | CTLR_ARE | CTLR_DS
    }

    /// `GICD_TYPER`: ITLinesNumber \[4:0\] for the VM's own SPIs, CPUNumber \[7:5\]
    /// (vCPUs - 1, at most 7), no LPIs, no MBIS, no Security extension, IDbits = 9, A3V
    /// and RSS (IHI 0069, `GICD_TYPER`).
    #[must_use]
    pub fn gicd_typer(&self) -> u32 {
        let lines = (self.intid_limit() / 32).saturating_sub(1) & 0x1f;
        let cpus = (self.vcpus.len().clamp(1, 8).saturating_sub(1)) as u32;
        lines | (cpus << 5) | TYPER_IDBITS | TYPER_A3V | TYPER_RSS
    }

    /// Emulates a guest read of `size` bytes at `offset` in the distributor frame.
    /// Unimplemented registers and interrupts the VM does not own read as zero.
    ///
    /// # Errors
    ///
    /// [`MmioError`] for an offset past 64 KiB, a size the register does not accept
    /// (bytes only for `IPRIORITYR`, `ITARGETSR`, `C/SPENDSGIR`; 64-bit only for
    /// `IROUTER`; 32-bit everywhere) or a misaligned offset.
    pub fn dist_read(&self, offset: u64, size: u8) -> Result<u64, MmioError> {
        let reg = Reg::decode(offset);
        regs::check(offset, size, DIST_SIZE, reg.sizes())?;
        Ok(match reg {
            Reg::Ctlr => u64::from(self.gicd_ctlr()),
            Reg::Typer => u64::from(self.gicd_typer()),
            Reg::Iidr => u64::from(regs::IIDR),
            Reg::Bits(r, first) => (0..32u32).fold(0, |acc, b| {
                let set = self
                    .owned_spi(first.saturating_add(b))
                    .is_some_and(|s| r.read(&s.irq));
                acc | (u64::from(set) << b)
            }),
            Reg::Priority(first) => regs::read_priorities(first, size, |intid| {
                self.owned_spi(intid).map_or(0, |s| s.irq.priority)
            }),
            // Two bits per INTID: interrupt `k` of the word at bit `shift = 2k`.
            Reg::Cfg(first) => (0..32u32)
                .step_by(2)
                .zip(0u32..)
                .fold(0, |acc, (shift, k)| {
                    let bits = self
                        .owned_spi(first.saturating_add(k))
                        .map_or(0, |s| regs::cfg_bits(&s.irq));
                    acc | (u64::from(bits) << shift)
                }),
            Reg::Router { intid, high } => {
                let route = self.owned_spi(intid).map_or(0, |s| s.route);
                match (size, high) {
                    (8, _) => route,
                    (_, true) => route >> 32,
                    _ => route & 0xffff_ffff,
                }
            }
            Reg::Id(v) => u64::from(v),
            Reg::ByteRaz | Reg::Raz => 0,
        })
    }

    /// Emulates a guest write of the low `size` bytes of `value` at `offset` in the
    /// distributor frame. Writes to unimplemented registers and to interrupts the VM
    /// does not own are ignored; changes to owned hardware SPIs are passed to `phys`.
    /// Returns the vCPUs that may have a newly deliverable interrupt.
    ///
    /// # Errors
    ///
    /// As [`Vgic::dist_read`]; nothing changes.
    pub fn dist_write(
        &mut self,
        offset: u64,
        size: u8,
        value: u64,
        phys: &mut impl PhysGic,
    ) -> Result<VcpuMask, MmioError> {
        let reg = Reg::decode(offset);
        regs::check(offset, size, DIST_SIZE, reg.sizes())?;
        let mut kicks = VcpuMask::EMPTY;
        match reg {
            Reg::Ctlr => {
                let old = self.ctlr;
                self.ctlr = (value as u32) & (CTLR_ENABLE_GRP0 | CTLR_ENABLE_GRP1);
                if self.ctlr & !old != 0 {
                    for i in 0..self.vcpus.len() {
                        kicks.insert(i);
                    }
                }
            }
            Reg::Bits(r, first) => {
                for b in 0..32u32 {
                    let bit = (value >> b) & 1 != 0;
                    self.with_spi(
                        first.saturating_add(b),
                        phys,
                        &mut kicks,
                        |spi, hw, phys| {
                            r.write(&mut spi.irq, bit, hw, phys);
                        },
                    );
                }
            }
            Reg::Priority(first) => {
                let mask = self.priority_mask;
                // Byte `i` of the access is the priority of INTID `first + i`.
                for (i, byte) in (0..u32::from(size)).zip(value.to_le_bytes()) {
                    let prio = byte & mask;
                    self.with_spi(
                        first.saturating_add(i),
                        phys,
                        &mut kicks,
                        |spi, hw, phys| {
                            if spi.irq.priority != prio {
                                spi.irq.priority = prio;
                                if let Some(pintid) = hw {
                                    phys.apply(PhysAction::Priority {
                                        pintid,
                                        priority: prio,
                                    });
                                }
                            }
                        },
                    );
                }
            }
            Reg::Cfg(first) => {
                // Int_config[1] of interrupt `k` is bit `2k + 1`: 0 is level-sensitive.
                for (bit, k) in (1..32u32).step_by(2).zip(0u32..) {
                    let level = (value >> bit) & 1 == 0;
                    self.with_spi(
                        first.saturating_add(k),
                        phys,
                        &mut kicks,
                        |spi, hw, phys| {
                            if spi.irq.level != level {
                                spi.irq.level = level;
                                if let Some(pintid) = hw {
                                    phys.apply(PhysAction::Trigger { pintid, level });
                                }
                            }
                        },
                    );
                }
            }
            Reg::Router { intid, high } => {
                self.with_spi(intid, phys, &mut kicks, |spi, _, _| {
                    let new = match (size, high) {
                        (8, _) => value,
                        (_, true) => (spi.route & 0xffff_ffff) | ((value & 0xffff_ffff) << 32),
                        _ => (spi.route & !0xffff_ffff) | (value & 0xffff_ffff),
                    };
                    spi.route = new & regs::IROUTER_MASK;
                });
            }
            Reg::Typer | Reg::Iidr | Reg::Id(_) | Reg::ByteRaz | Reg::Raz => {}
        }
        Ok(kicks)
    }

    /// The owned SPI `intid`, if any.
    fn owned_spi(&self, intid: u32) -> Option<&Spi> {
        self.spis
            .get(super::spi_index(intid)?)
            .filter(|s| s.source.is_some())
    }

    /// Whether an SPI can be taken (enabled, pending, group enabled), and its target.
    fn spi_candidate(&self, spi: &Spi) -> (bool, Option<usize>) {
        (
            spi.irq.enabled && spi.irq.pending() && self.group_enabled(&spi.irq),
            self.spi_target(spi.route),
        )
    }

    /// Applies `f` to the owned SPI `intid` (nothing if not owned), with its physical
    /// INTID for a hardware SPI. Passes a routing change of a hardware SPI on to the
    /// physical distributor, and adds the SPI's target to `kicks` if it became takeable
    /// there.
    fn with_spi<P: PhysGic>(
        &mut self,
        intid: u32,
        phys: &mut P,
        kicks: &mut VcpuMask,
        f: impl FnOnce(&mut Spi, Option<u32>, &mut P),
    ) {
        let Some(before) = self.owned_spi(intid).copied() else {
            return;
        };
        let Some(spi) = super::spi_index(intid).and_then(|idx| self.spis.get_mut(idx)) else {
            return;
        };
        let hw = match spi.source {
            Some(SpiSource::Hardware { pintid }) => Some(pintid),
            _ => None,
        };
        f(spi, hw, phys);
        let after = *spi;
        let (was, old_target) = self.spi_candidate(&before);
        let (is, target) = self.spi_candidate(&after);
        if let (true, Some(t)) = (is, target) {
            if !was || old_target != target {
                kicks.insert(t);
            }
        }
        if let Some(pintid) = hw {
            if before.route != after.route {
                let mpidr = self.route_pcpu(target.unwrap_or(0));
                phys.apply(PhysAction::Route { pintid, mpidr });
            }
        }
    }
}

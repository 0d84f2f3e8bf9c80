//! The emulated redistributors: per vCPU an `RD_base` frame (control, identification,
//! `GICR_WAKER`) and an `SGI_base` frame (the SGI and PPI registers), 64 KiB each, one
//! vCPU after the other in the VM's redistributor region (IHI 0069 chapter 12, redistributor map and descriptions).
//! There are no LPIs and no virtual LPI frames.

use super::regs::{self, BitReg, Sizes};
use super::{
    MmioError, NoPhys, PhysAction, PhysGic, VcpuMask, Vgic, AFFINITY_MASK, PRIVATE_COUNT, SGI_COUNT,
};

/// Size of one redistributor frame.
pub const FRAME_SIZE: u64 = 0x1_0000;
/// Distance between two vCPUs' redistributors (`RD_base` + `SGI_base`).
pub const REDIST_STRIDE: u64 = 2 * FRAME_SIZE;

/// `GICR_CTLR` (`RD_base`).
pub const GICR_CTLR: u64 = 0x0000;
/// `GICR_IIDR` (`RD_base`).
pub const GICR_IIDR: u64 = 0x0004;
/// `GICR_TYPER` (`RD_base`, 64-bit).
pub const GICR_TYPER: u64 = 0x0008;
/// `GICR_WAKER` (`RD_base`).
pub const GICR_WAKER: u64 = 0x0014;
/// `GICR_PROPBASER` (`RD_base`, 64-bit; RAZ/WI without LPIs).
pub const GICR_PROPBASER: u64 = 0x0070;
/// `GICR_PENDBASER` (`RD_base`, 64-bit; RAZ/WI without LPIs).
pub const GICR_PENDBASER: u64 = 0x0078;
/// `GICR_PIDR2` (`RD_base`).
pub const GICR_PIDR2: u64 = 0xffe8;
/// `GICR_IGROUPR0` (`SGI_base`).
pub const GICR_IGROUPR0: u64 = 0x0080;
/// `GICR_ISENABLER0` (`SGI_base`).
pub const GICR_ISENABLER0: u64 = 0x0100;
/// `GICR_ICENABLER0` (`SGI_base`).
pub const GICR_ICENABLER0: u64 = 0x0180;
/// `GICR_ISPENDR0` (`SGI_base`).
pub const GICR_ISPENDR0: u64 = 0x0200;
/// `GICR_ICPENDR0` (`SGI_base`).
pub const GICR_ICPENDR0: u64 = 0x0280;
/// `GICR_ISACTIVER0` (`SGI_base`).
pub const GICR_ISACTIVER0: u64 = 0x0300;
/// `GICR_ICACTIVER0` (`SGI_base`).
pub const GICR_ICACTIVER0: u64 = 0x0380;
/// `GICR_IPRIORITYR0..7` (`SGI_base`, byte-accessible).
pub const GICR_IPRIORITYR: u64 = 0x0400;
/// `GICR_ICFGR0` (`SGI_base`; SGIs, always edge-triggered).
pub const GICR_ICFGR0: u64 = 0x0c00;
/// `GICR_ICFGR1` (`SGI_base`; PPIs).
pub const GICR_ICFGR1: u64 = 0x0c04;

/// `GICR_TYPER.Last`, bit 4: the last redistributor of the region.
pub const TYPER_LAST: u64 = 1 << 4;
/// `GICR_TYPER.Processor_Number`, bits \[23:8\].
pub const TYPER_PROCESSOR_NUMBER_SHIFT: u32 = 8;
/// `GICR_TYPER.Affinity_Value`, bits \[63:32\] (Aff3.Aff2.Aff1.Aff0).
pub const TYPER_AFFINITY_SHIFT: u32 = 32;
/// `GICR_WAKER.ProcessorSleep`, bit 1.
pub const WAKER_PROCESSOR_SLEEP: u64 = 1 << 1;
/// `GICR_WAKER.ChildrenAsleep`, bit 2.
pub const WAKER_CHILDREN_ASLEEP: u64 = 1 << 2;

/// Which of a redistributor's two frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame {
    /// `RD_base`: control and identification.
    RdBase,
    /// `SGI_base`: the SGI and PPI registers.
    SgiBase,
}

/// An offset in the redistributor region, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RedistAddr {
    /// The vCPU whose redistributor it is (may be past the VM's last vCPU).
    pub vcpu: u64,
    /// The frame.
    pub frame: Frame,
    /// The offset in the frame.
    pub offset: u64,
}

impl RedistAddr {
    /// Decodes `offset` from the start of the VM's redistributor region.
    #[must_use]
    pub const fn decode(offset: u64) -> Self {
        let within = offset % REDIST_STRIDE;
        Self {
            vcpu: offset / REDIST_STRIDE,
            frame: if within < FRAME_SIZE {
                Frame::RdBase
            } else {
                Frame::SgiBase
            },
            offset: within % FRAME_SIZE,
        }
    }
}

/// One decoded redistributor register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reg {
    Iidr,
    /// `GICR_TYPER`, upper word or the whole register.
    Typer {
        high: bool,
    },
    Waker,
    /// A 64-bit RAZ/WI register (LPI configuration).
    Raz64,
    Id(u32),
    Bits(BitReg),
    /// Priority bytes from this INTID on.
    Priority(u32),
    Cfg0,
    Cfg1,
    Raz,
}

impl Reg {
    fn decode(frame: Frame, offset: u64) -> Self {
        match frame {
            Frame::RdBase => match offset {
                GICR_IIDR => Self::Iidr,
                0x0008 | 0x000c => Self::Typer {
                    high: offset == 0x000c,
                },
                GICR_WAKER => Self::Waker,
                // PROPBASER, PENDBASER, INVLPIR, INVALLR (IHI 0069 chapter 12).
                0x0070..=0x007f | 0x00a0..=0x00a7 | 0x00b0..=0x00b7 => Self::Raz64,
                _ => regs::id_register(offset).map_or(Self::Raz, Self::Id),
            },
            Frame::SgiBase => match offset {
                GICR_ICFGR0 => Self::Cfg0,
                GICR_ICFGR1 => Self::Cfg1,
                // One byte per INTID from `GICR_IPRIORITYR` (0x400): the low bits.
                0x0400..=0x041f => Self::Priority((offset & 0x1f) as u32),
                _ => BitReg::from_block(offset).map_or(Self::Raz, Self::Bits),
            },
        }
    }

    const fn sizes(self) -> Sizes {
        match self {
            Self::Typer { .. } | Self::Raz64 => Sizes::DoubleOrWord,
            Self::Priority(_) => Sizes::WordOrByte,
            _ => Sizes::Word,
        }
    }
}

impl Vgic {
    /// Size of the VM's redistributor region: one [`REDIST_STRIDE`] per vCPU. An access
    /// past it is [`MmioError::OutOfRange`].
    #[must_use]
    pub fn redist_region_size(&self) -> u64 {
        // At most `MAX_VCPUS` vCPUs: the product is exact.
        (self.vcpus.len() as u64).saturating_mul(REDIST_STRIDE)
    }

    /// `GICR_TYPER` of `vcpu`'s redistributor: its virtual affinity, Processor_Number =
    /// its index, Last on the VM's last vCPU, no physical or virtual LPIs, 16 PPIs
    /// (IHI 0069, `GICR_TYPER`). 0 for a vCPU that does not exist.
    #[must_use]
    pub fn gicr_typer(&self, vcpu: usize) -> u64 {
        let Some(v) = self.vcpus.get(vcpu) else {
            return 0;
        };
        let m = v.desc.mpidr & AFFINITY_MASK;
        // Aff3 sits at [39:32] of MPIDR_EL1 and at [31:24] of the affinity value.
        let aff = (m & 0xff_ffff) | ((m >> 32) << 24);
        let last = if self.vcpus.len().checked_sub(1) == Some(vcpu) {
            TYPER_LAST
        } else {
            0
        };
        (aff << TYPER_AFFINITY_SHIFT)
            | (((vcpu as u64) & 0xffff) << TYPER_PROCESSOR_NUMBER_SHIFT)
            | last
    }

    /// Emulates a guest read of `size` bytes at `offset` in the VM's redistributor
    /// region (vCPU `offset / 128 KiB`).
    ///
    /// # Errors
    ///
    /// [`MmioError::OutOfRange`] for a vCPU the VM does not have; otherwise as
    /// [`Vgic::dist_read`] (64-bit only for `GICR_TYPER` and the LPI registers, bytes for
    /// `GICR_IPRIORITYR`).
    pub fn redist_read(&self, offset: u64, size: u8) -> Result<u64, MmioError> {
        let addr = RedistAddr::decode(offset);
        let reg = Reg::decode(addr.frame, addr.offset);
        regs::check(addr.offset, size, FRAME_SIZE, reg.sizes())?;
        let vcpu = usize::try_from(addr.vcpu).map_err(|_| MmioError::OutOfRange)?;
        let v = self.vcpus.get(vcpu).ok_or(MmioError::OutOfRange)?;
        Ok(match reg {
            Reg::Iidr => u64::from(regs::IIDR),
            Reg::Typer { high } => {
                let t = self.gicr_typer(vcpu);
                match (size, high) {
                    (8, _) => t,
                    (_, true) => t >> 32,
                    _ => t & 0xffff_ffff,
                }
            }
            Reg::Waker => {
                if v.sleep {
                    WAKER_PROCESSOR_SLEEP | WAKER_CHILDREN_ASLEEP
                } else {
                    0
                }
            }
            Reg::Id(x) => u64::from(x),
            Reg::Bits(r) => v
                .private
                .iter()
                .enumerate()
                .fold(0, |acc, (i, irq)| acc | (u64::from(r.read(irq)) << i)),
            Reg::Priority(first) => regs::read_priorities(first, size, |intid| {
                v.private.get(intid as usize).map_or(0, |irq| irq.priority)
            }),
            Reg::Cfg0 => u64::from(regs::ICFGR_ALL_EDGE),
            // Two bits per PPI: INTID `16 + k` at bit `2k`.
            Reg::Cfg1 => (SGI_COUNT..PRIVATE_COUNT).zip((0..32u32).step_by(2)).fold(
                0,
                |acc, (intid, shift)| {
                    let bits = v.private.get(intid as usize).map_or(0, regs::cfg_bits);
                    acc | (u64::from(bits) << shift)
                },
            ),
            Reg::Raz64 | Reg::Raz => 0,
        })
    }

    /// Emulates a guest write of the low `size` bytes of `value` at `offset` in the VM's
    /// redistributor region. `GICR_WAKER` completes the sleep handshake at once
    /// (ChildrenAsleep follows ProcessorSleep). Returns the vCPUs that may have a newly
    /// deliverable interrupt (the redistributor's own vCPU, if any).
    ///
    /// # Errors
    ///
    /// As [`Vgic::redist_read`]; nothing changes.
    pub fn redist_write(
        &mut self,
        offset: u64,
        size: u8,
        value: u64,
        phys: &mut impl PhysGic,
    ) -> Result<VcpuMask, MmioError> {
        let addr = RedistAddr::decode(offset);
        let reg = Reg::decode(addr.frame, addr.offset);
        regs::check(addr.offset, size, FRAME_SIZE, reg.sizes())?;
        let vcpu = usize::try_from(addr.vcpu).map_err(|_| MmioError::OutOfRange)?;
        let ctlr = self.gicd_ctlr();
        let mask = self.priority_mask;
        let v = self.vcpus.get_mut(vcpu).ok_or(MmioError::OutOfRange)?;
        let takeable = |irq: &super::irq::Irq| {
            let grp = if irq.group1 {
                super::CTLR_ENABLE_GRP1
            } else {
                super::CTLR_ENABLE_GRP0
            };
            irq.enabled && irq.pending() && ctlr & grp != 0
        };
        let before = v.private.map(|irq| takeable(&irq));
        match reg {
            Reg::Waker => v.sleep = value & WAKER_PROCESSOR_SLEEP != 0,
            Reg::Bits(r) => {
                let mpidr = v.desc.pcpu_mpidr & AFFINITY_MASK;
                let mut held = v.hw_held;
                for (i, irq) in v.private.iter_mut().enumerate() {
                    // Nothing a guest writes here reaches the physical GIC directly.
                    r.write(irq, (value >> i) & 1 != 0, None, &mut NoPhys);
                    let bit = 1u32 << i;
                    let cleared = matches!(r, BitReg::ClearPending | BitReg::ClearActive);
                    // A hardware PPI whose pending or active state the guest cleared
                    // before deactivating it: drop the physical activation it held.
                    if cleared && held & bit != 0 && !irq.pending() && !irq.active {
                        held &= !bit;
                        phys.apply(PhysAction::DeactivatePrivate {
                            mpidr,
                            pintid: i as u32,
                        });
                    }
                }
                v.hw_held = held;
            }
            Reg::Priority(first) => {
                // Byte `i` of the access is the priority of INTID `first + i`.
                for (i, byte) in (0..u32::from(size)).zip(value.to_le_bytes()) {
                    let intid = first.saturating_add(i) as usize;
                    if let Some(irq) = v.private.get_mut(intid) {
                        irq.priority = byte & mask;
                    }
                }
            }
            Reg::Cfg1 => {
                // Int_config[1] of INTID `16 + k` is bit `2k + 1`: 0 is level-sensitive.
                for (intid, shift) in (SGI_COUNT..PRIVATE_COUNT).zip((1..32u32).step_by(2)) {
                    if let Some(irq) = v.private.get_mut(intid as usize) {
                        irq.level = (value >> shift) & 1 == 0;
                    }
                }
            }
            Reg::Iidr | Reg::Typer { .. } | Reg::Raz64 | Reg::Id(_) | Reg::Cfg0 | Reg::Raz => {}
        }
        let mut kicks = VcpuMask::EMPTY;
        if v.private
            .iter()
            .zip(before)
            .any(|(irq, was)| takeable(irq) && !was)
        {
            kicks.insert(vcpu);
        }
        Ok(kicks)
    }
}

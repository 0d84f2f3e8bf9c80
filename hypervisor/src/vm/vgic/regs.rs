//! What the distributor and the redistributors share: access-size checks, the bitmap
//! registers (IGROUPR, IS/ICENABLER, IS/ICPENDR, IS/ICACTIVER), priorities, ICFGR and the
//! ID registers.

use super::irq::Irq;
use super::{MmioError, PhysAction, PhysGic, AFFINITY_MASK};

/// `GICD_IROUTER<n>.Interrupt_Routing_Mode`, bit 31 (IHI 0069, `GICD_IROUTER<n>`).
pub(super) const IROUTER_IRM: u64 = 1 << 31;
/// The writable bits of `GICD_IROUTER<n>`: Aff3..Aff0 and IRM.
pub(super) const IROUTER_MASK: u64 = AFFINITY_MASK | IROUTER_IRM;

/// `GICD_ICFGR`/`GICR_ICFGR1` value of sixteen edge-triggered interrupts (every odd bit,
/// Int_config\[1\] = 1; IHI 0069 `GICD_ICFGR<n>`); `GICR_ICFGR0` always reads this (SGIs).
pub(super) const ICFGR_ALL_EDGE: u32 = 0xaaaa_aaaa;

/// Which access sizes a register accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Sizes {
    /// 32-bit only.
    Word,
    /// 32-bit or byte (IPRIORITYR, ITARGETSR, CPENDSGIR, SPENDSGIR).
    WordOrByte,
    /// 64-bit, or 32-bit to either half (IROUTER, GICR_TYPER).
    DoubleOrWord,
}

/// Checks an access of `size` bytes at `offset` of a frame of `frame` bytes.
///
/// # Errors
///
/// [`MmioError::OutOfRange`] past the frame, [`MmioError::BadSize`] for a size the
/// register does not take, [`MmioError::Misaligned`] for an offset that is not a
/// multiple of the size.
pub(super) fn check(offset: u64, size: u8, frame: u64, sizes: Sizes) -> Result<(), MmioError> {
    if offset >= frame {
        return Err(MmioError::OutOfRange);
    }
    let ok = match size {
        4 => true,
        1 => sizes == Sizes::WordOrByte,
        8 => sizes == Sizes::DoubleOrWord,
        _ => false,
    };
    if !ok {
        return Err(MmioError::BadSize);
    }
    if offset.checked_rem(u64::from(size)) != Some(0) {
        return Err(MmioError::Misaligned);
    }
    Ok(())
}

/// A one-bit-per-interrupt register, by the offset of its block of 32 registers
/// (the same offsets in `GICD_*` and in the `SGI_base` frame, IHI 0069 chapter 12).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum BitReg {
    /// `IGROUPR`: read/write, 1 = Group 1.
    Group,
    /// `ISENABLER`: write 1 to enable.
    SetEnable,
    /// `ICENABLER`: write 1 to disable.
    ClearEnable,
    /// `ISPENDR`: write 1 to make pending.
    SetPending,
    /// `ICPENDR`: write 1 to clear the pending latch.
    ClearPending,
    /// `ISACTIVER`: write 1 to activate.
    SetActive,
    /// `ICACTIVER`: write 1 to deactivate.
    ClearActive,
}

impl BitReg {
    /// The register whose block of 32 registers starts at `base`, if any.
    pub(super) const fn from_block(base: u64) -> Option<Self> {
        Some(match base {
            0x080 => Self::Group,
            0x100 => Self::SetEnable,
            0x180 => Self::ClearEnable,
            0x200 => Self::SetPending,
            0x280 => Self::ClearPending,
            0x300 => Self::SetActive,
            0x380 => Self::ClearActive,
            _ => return None,
        })
    }

    /// The bit this register shows for `irq` (the set and clear registers read alike).
    pub(super) const fn read(self, irq: &Irq) -> bool {
        match self {
            Self::Group => irq.group1,
            Self::SetEnable | Self::ClearEnable => irq.enabled,
            Self::SetPending | Self::ClearPending => irq.pending_visible(),
            Self::SetActive | Self::ClearActive => irq.active,
        }
    }

    /// Applies bit value `bit` of a write to `irq`. `hw` is the physical INTID of an
    /// owned hardware SPI: the change is passed on to the physical distributor. For
    /// such an SPI the virtual pending state only ever comes from the physical
    /// interrupt being taken at EL2, so `ISPENDR` sets the physical pending state and
    /// the interrupt comes back through [`super::Vgic::inject_hw`]; `ICPENDR` of a
    /// pending one drops the physical activation it holds.
    pub(super) fn write(self, irq: &mut Irq, bit: bool, hw: Option<u32>, phys: &mut impl PhysGic) {
        if self == Self::Group {
            irq.group1 = bit;
            return;
        }
        if !bit {
            return;
        }
        match self {
            Self::Group => {}
            Self::SetEnable | Self::ClearEnable => {
                let enable = self == Self::SetEnable;
                if irq.enabled != enable {
                    irq.enabled = enable;
                    if let Some(pintid) = hw {
                        phys.apply(PhysAction::Enable { pintid, enable });
                    }
                }
            }
            Self::SetPending => match hw {
                Some(pintid) => phys.apply(PhysAction::Pending {
                    pintid,
                    pending: true,
                }),
                None => irq.latch = true,
            },
            Self::ClearPending => {
                let held = irq.latch;
                irq.latch = false;
                if let Some(pintid) = hw {
                    phys.apply(PhysAction::Pending {
                        pintid,
                        pending: false,
                    });
                    if held && !irq.active {
                        phys.apply(PhysAction::Active {
                            pintid,
                            active: false,
                        });
                    }
                }
            }
            Self::SetActive | Self::ClearActive => {
                let active = self == Self::SetActive;
                if irq.active != active {
                    irq.active = active;
                    if let Some(pintid) = hw {
                        phys.apply(PhysAction::Active { pintid, active });
                    }
                }
            }
        }
    }
}

/// The two `ICFGR` bits of `irq` (Int_config\[1\] = 1 for edge-triggered).
pub(super) const fn cfg_bits(irq: &Irq) -> u32 {
    if irq.level {
        0
    } else {
        0b10
    }
}

/// Identification registers at the top of each 64 KiB frame (IHI 0069 chapter 12,
/// `GICD_PIDR2`): Arm's JEP106 code (0x43B: continuation 4, identity 0x3B),
/// ArchRev = 3 (GICv3), and the CoreSight component IDs.
pub(super) const fn id_register(offset: u64) -> Option<u32> {
    Some(match offset {
        0xffd0 => 0x04,              // PIDR4: DES_2 = 4 (JEP106 continuation code)
        0xffe0 => 0x00,              // PIDR0: part number [7:0]
        0xffe4 => 0xb0,              // PIDR1: DES_0 = 0xB (JEP106 identity [3:0])
        0xffe8 => (3 << 4) | 0b1011, // PIDR2: ArchRev = 3, JEDEC = 1, DES_1 = 3
        0xffec => 0x00,              // PIDR3
        0xfff0 => 0x0d,              // CIDR0
        0xfff4 => 0xf0,              // CIDR1
        0xfff8 => 0x05,              // CIDR2
        0xfffc => 0xb1,              // CIDR3
        _ => return None,
    })
}

/// `GICD_IIDR`/`GICR_IIDR`: ProductID \[31:24\] = 0x54 ('T'), Variant and Revision 0,
/// Implementer \[11:0\] = 0x43B (Arm's JEP106 code, as KVM reports for its own model).
/// No product ID that Linux matches for an erratum.
pub(super) const IIDR: u32 = 0x5400_043b;

/// Reads `size` (1 or 4) priority bytes starting at INTID `first`, through `get`.
pub(super) fn read_priorities(first: u32, size: u8, get: impl Fn(u32) -> u8) -> u64 {
    // Byte `i` of the value is the priority of INTID `first + i` (at most 1023 + 3:
    // the sum is exact).
    let mut bytes = [0u8; 8];
    for (i, b) in (0..u32::from(size)).zip(bytes.iter_mut()) {
        *b = get(first.saturating_add(i));
    }
    u64::from_le_bytes(bytes)
}

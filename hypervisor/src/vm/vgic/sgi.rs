//! SGIs: decoding a trapped `ICC_SGI1R_EL1`, `ICC_SGI0R_EL1` or `ICC_ASGI1R_EL1` write and
//! making the SGI pending on the targeted vCPUs of the same VM.
//!
//! With `HCR_EL2.IMO`/`FMO` set, EL1 writes of these registers trap to EL2 (DDI 0487,
//! `ICC_SGI1R_EL1` accessibility; IHI 0069 for the SGI generation rules). A guest can
//! only ever reach its own vCPUs: targets are looked up among this VM's virtual
//! affinities, and a target list naming affinities the VM does not have is ignored.

use super::{VcpuMask, Vgic, AFFINITY_MASK, SGI_COUNT};

/// `ICC_SGI1R_EL1.TargetList`, bits \[15:0\].
pub const SGIR_TARGET_LIST_MASK: u64 = 0xffff;
/// `ICC_SGI1R_EL1.Aff1`, bits \[23:16\].
pub const SGIR_AFF1_SHIFT: u32 = 16;
/// `ICC_SGI1R_EL1.INTID`, bits \[27:24\].
pub const SGIR_INTID_SHIFT: u32 = 24;
/// `ICC_SGI1R_EL1.Aff2`, bits \[39:32\].
pub const SGIR_AFF2_SHIFT: u32 = 32;
/// `ICC_SGI1R_EL1.IRM`, bit 40: to every PE but the sender.
pub const SGIR_IRM: u64 = 1 << 40;
/// `ICC_SGI1R_EL1.RS`, bits \[47:44\]: TargetList bit `n` is Aff0 = RS × 16 + n.
pub const SGIR_RS_SHIFT: u32 = 44;
/// `ICC_SGI1R_EL1.Aff3`, bits \[55:48\].
pub const SGIR_AFF3_SHIFT: u32 = 48;

/// Which SGI register the guest wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SgiRegister {
    /// `ICC_SGI0R_EL1`: Group 0 SGIs only.
    Sgi0r,
    /// `ICC_SGI1R_EL1`: with one Security state, an SGI of either group, as the
    /// target's `GICR_IGROUPR0` configures it.
    Sgi1r,
    /// `ICC_ASGI1R_EL1`: with one Security state there is no other group 1, so it acts
    /// as `ICC_SGI0R_EL1`.
    Asgi1r,
}

/// A decoded SGI register value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SgiTarget {
    /// The SGI (0..=15).
    pub intid: u32,
    /// Every PE but the sender (`IRM` = 1); the affinity fields are then ignored.
    pub broadcast: bool,
    /// Aff3.Aff2.Aff1 of the targets, laid out as in `MPIDR_EL1` (Aff0 zero).
    pub affinity: u64,
    /// `RS`: the block of 16 Aff0 values the target list refers to.
    pub range: u8,
    /// `TargetList`.
    pub target_list: u16,
}

impl SgiTarget {
    /// Decodes a value written to `ICC_SGI0R_EL1`, `ICC_SGI1R_EL1` or `ICC_ASGI1R_EL1`
    /// (they share one layout). Every bit pattern decodes; RES0 bits are ignored.
    #[must_use]
    pub const fn decode(value: u64) -> Self {
        let aff1 = (value >> SGIR_AFF1_SHIFT) & 0xff;
        let aff2 = (value >> SGIR_AFF2_SHIFT) & 0xff;
        let aff3 = (value >> SGIR_AFF3_SHIFT) & 0xff;
        Self {
            intid: ((value >> SGIR_INTID_SHIFT) & 0xf) as u32,
            broadcast: value & SGIR_IRM != 0,
            affinity: (aff3 << 32) | (aff2 << 16) | (aff1 << 8),
            range: ((value >> SGIR_RS_SHIFT) & 0xf) as u8,
            target_list: (value & SGIR_TARGET_LIST_MASK) as u16,
        }
    }

    /// Whether a PE with affinity `mpidr` is named by this value, sent from a PE with
    /// affinity `sender` (the sender is never a broadcast target).
    #[must_use]
    pub const fn targets(&self, mpidr: u64, sender: u64) -> bool {
        let mpidr = mpidr & AFFINITY_MASK;
        if self.broadcast {
            return mpidr != sender & AFFINITY_MASK;
        }
        if mpidr & !0xff != self.affinity {
            return false;
        }
        // TargetList bit `n` names Aff0 = RS × 16 + n: the Aff0's high nibble is the
        // block, its low nibble the bit.
        let aff0 = mpidr & 0xff;
        aff0 >> 4 == self.range as u64 && self.target_list & (1 << (aff0 & 0xf)) != 0
    }
}

impl Vgic {
    /// Emulates a trapped write of `value` to the SGI register `reg` by vCPU `sender`:
    /// the SGI becomes pending on every targeted vCPU of this VM (for `Sgi0r`/`Asgi1r`
    /// only where it is configured as Group 0). Targets the VM does not have are
    /// ignored; an unknown sender sends nothing. Returns the vCPUs whose SGI became
    /// pending, to wake or kick.
    pub fn sgi_write(&mut self, sender: usize, reg: SgiRegister, value: u64) -> VcpuMask {
        let Some(from) = self.vcpus.get(sender).map(|v| v.desc.mpidr) else {
            return VcpuMask::EMPTY;
        };
        let sgi = SgiTarget::decode(value);
        let mut sent = VcpuMask::EMPTY;
        if sgi.intid >= SGI_COUNT {
            return sent;
        }
        for (i, v) in self.vcpus.iter_mut().enumerate() {
            if !sgi.targets(v.desc.mpidr, from) || (sgi.broadcast && i == sender) {
                continue;
            }
            let Some(irq) = v.private.get_mut(sgi.intid as usize) else {
                continue;
            };
            if reg != SgiRegister::Sgi1r && irq.group1 {
                continue;
            }
            irq.latch = true;
            sent.insert(i);
        }
        sent
    }
}

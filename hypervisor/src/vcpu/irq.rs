//! What a physical interrupt taken at EL2 while a vCPU ran becomes. EL2 owns the
//! physical GIC (`HCR_EL2.{IMO,FMO}`): the run loop acknowledges each interrupt and
//! drops its priority (`ICC_CTLR_EL1.EOImode` = 1 at EL2, so deactivation is a separate
//! step), then asks [`physical`] whether the interrupt now belongs to the guest, which
//! deactivates it through a list register with the HW bit, or whether the hypervisor
//! deactivates it at once.

use crate::vm::vgic::{VcpuMask, MAX_SPI_INTID, PPI_PTIMER, PPI_VTIMER, PRIVATE_COUNT};
use crate::vm::Vm;

/// The SGI the hypervisor sends to a CPU to make its vCPU exit and pick up a new
/// virtual interrupt. Physical SGIs are EL2's own: a guest's SGIs never reach the
/// physical GIC.
pub const KICK_SGI: u32 = 0;
/// The GIC maintenance interrupt (PPI 25 on QEMU virt and the Arm BSA).
pub const MAINTENANCE_PPI: u32 = 25;

/// Who deactivates a physical interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Taken {
    /// The hypervisor, now (`ICC_DIR_EL1`): a kick, the maintenance interrupt, or an
    /// interrupt no VM owns.
    Deactivate,
    /// The guest, through the HW bit of the list register that delivers it.
    Forwarded,
}

/// Forwards physical interrupt `intid`, taken while vCPU `vcpu` of `vm` ran, to the
/// guest if the VM owns it: the EL1 timers of this CPU become that vCPU's hardware PPIs
/// and an SPI given to the VM its SPI (the vCPU it is routed to is added to `kicks`).
/// Everything else is the hypervisor's to deactivate; the list registers are refilled
/// before the next entry in any case (which is all the maintenance interrupt asks for).
pub fn physical<S>(vm: &Vm<S>, vcpu: usize, intid: u32, kicks: &mut VcpuMask) -> Taken {
    let mut g = vm.vgic.lock();
    if intid == PPI_VTIMER || intid == PPI_PTIMER {
        return match g.inject_hw_ppi(vcpu, intid) {
            Ok(_) => Taken::Forwarded,
            Err(_) => Taken::Deactivate,
        };
    }
    if (PRIVATE_COUNT..=MAX_SPI_INTID).contains(&intid) {
        return match g.inject_hw(intid) {
            Ok(target) => {
                if let Some(t) = target {
                    kicks.insert(t);
                }
                Taken::Forwarded
            }
            Err(_) => Taken::Deactivate,
        };
    }
    Taken::Deactivate
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::tests::{desc, manager};
    use crate::vm::vgic::redist::{FRAME_SIZE, GICR_ISPENDR0};
    use crate::vm::vgic::NoPhys;

    #[test]
    fn timers_are_forwarded_to_the_running_vcpu_and_the_rest_deactivated() {
        let m = manager();
        let mut d = desc(0x5000_0000, 1);
        d.cpus.push(2);
        let vm = m.create(d).expect("vm");
        let mut kicks = VcpuMask::EMPTY;
        assert_eq!(physical(&vm, 1, PPI_VTIMER, &mut kicks), Taken::Forwarded);
        assert_eq!(physical(&vm, 0, PPI_PTIMER, &mut kicks), Taken::Forwarded);
        let g = vm.vgic.lock();
        let rd = |vcpu: u64| vcpu * 2 * FRAME_SIZE + FRAME_SIZE + GICR_ISPENDR0;
        assert_eq!(g.redist_read(rd(1), 4), Ok(1 << PPI_VTIMER));
        assert_eq!(g.redist_read(rd(0), 4), Ok(1 << PPI_PTIMER));
        drop(g);
        for other in [KICK_SGI, MAINTENANCE_PPI, 26, 33, 100, 1023] {
            assert_eq!(
                physical(&vm, 0, other, &mut kicks),
                Taken::Deactivate,
                "INTID {other}"
            );
        }
        assert!(kicks.is_empty(), "{kicks:?}");
        // The guest's writes never make a timer PPI pending on the physical side.
        let mut g = vm.vgic.lock();
        let _ = g.redist_write(FRAME_SIZE + GICR_ISPENDR0, 4, u64::MAX, &mut NoPhys);
    }
}

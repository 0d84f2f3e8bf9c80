//! What the host device tree says, read once at start-up ([`HostDt`]): the hardware
//! ([`Hardware`]: RAM, CPUs, console, GIC, PSCI) and the VMs to create ([`VmDesc`],
//! `docs/vms.md`), with the host devices each VM is given (`devices`).

mod desc;
pub mod devices;
pub mod dtb;
mod hardware;

pub use desc::{
    parse, AbortPolicy, EmulatedDevice, GicIpa, GuestRegion, HostRanges, Image, SharingLimits,
    Stage2Mappings, VmDesc, VUART_INTID,
};
pub use dtb::HostDt;
pub use hardware::{find_path, Hardware, PsciConduit};

#[cfg(test)]
pub(crate) use desc::tests;

//! What the host device tree says, read once at start-up ([`HostDt`]): the hardware
//! ([`Hardware`]: RAM, CPUs, console, GIC, PSCI, fw-cfg) and the VMs to create ([`VmDesc`],
//! `docs/vms.md`), with the host devices each VM is given (`devices`).

mod desc;
pub mod devices;
pub mod dtb;
pub mod fw_cfg;
mod hardware;

pub use desc::{
    parse, AbortPolicy, EmulatedDevice, GicIpa, GuestRegion, HostRanges, Image, ImageSource,
    SharingLimits, Stage2Mappings, VmDesc, VUART_INTID,
};
pub use dtb::HostDt;
pub use hardware::{find_path, FwCfgDevice, Hardware, PsciConduit};

#[cfg(test)]
pub(crate) use desc::tests;

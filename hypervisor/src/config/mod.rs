//! What the host device tree says: the hardware (RAM, CPUs, console, GIC, PSCI) and the
//! VMs to create (`docs/vms.md`).

mod desc;
pub mod dtb;
mod hardware;

pub use desc::*;
pub use hardware::*;

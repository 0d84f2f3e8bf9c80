//! Booting a Linux kernel as a guest: where the kernel, initrd and DTB go in guest RAM,
//! and the device tree the guest sees. See docs/linux-guest.md.

pub mod guest_dt;
pub mod image;
pub mod layout;

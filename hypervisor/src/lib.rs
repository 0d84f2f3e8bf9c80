//! The twostage hypervisor: host-testable logic, plus (on `aarch64-unknown-none`) the
//! start-up code that runs it on QEMU `virt`.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

extern crate alloc;

pub mod dtb;
pub mod frames;
pub mod hypercall;
pub mod layout;
pub mod linux;
pub mod logger;
pub mod pl011;
pub mod platform;
pub mod psci;
pub mod report;
pub mod share;
pub mod stage1;
pub mod trap;
pub mod vcpu;
pub mod vdesc;
pub mod vm;
pub mod vmid;
pub mod vuart;

#[cfg(all(
    target_arch = "aarch64",
    target_os = "none",
    feature = "selftest-guest-entry"
))]
mod selftest;
#[cfg(all(target_arch = "aarch64", target_os = "none"))]
pub mod start;

//! Host-testable logic of the twostage hypervisor.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

extern crate alloc;

pub mod hypercall;
pub mod linux;
pub mod psci;
pub mod trap;
pub mod vdesc;
pub mod vm;
pub mod vmid;
pub mod vuart;

//! The twostage hypervisor: host-testable logic, plus (on `aarch64-unknown-none`) the
//! machine layer that runs it on QEMU `virt`.
//!
//! `docs/architecture.md` has the map of the folders. Dependencies point one way:
//! `machine` -> `vcpu` -> `vm` -> `config`, with `linux` (guest kernels), `mem` (the
//! hypervisor's own memory) and `console` (log lines and fault reports) beside them.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

extern crate alloc;

pub mod config;
pub mod console;
pub mod linux;
pub mod mem;
pub mod vcpu;
pub mod vm;

#[cfg(all(target_arch = "aarch64", target_os = "none"))]
pub mod machine;

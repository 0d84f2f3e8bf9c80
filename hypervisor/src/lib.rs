//! The twostage hypervisor: host-testable logic, plus (on `aarch64-unknown-none`) the
//! machine layer that runs it on QEMU `virt`.
//!
//! `docs/architecture.md` has the map of the folders. Dependencies point one way:
//! `machine` -> `vcpu` -> `vm` -> `config`, with `linux` (guest kernels), `mem` (the
//! hypervisor's own memory) and `console` (log lines and fault reports) beside them.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
// Every module reads guest or host input (guest registers, syndromes, MMIO accesses,
// hypercall arguments, the host device tree): no panics, no unchecked indexing or
// arithmetic (docs/decisions.md, "Guest and host input cannot panic the hypervisor").
// Tests may unwrap.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects,
        clippy::panic
    )
)]
// Public: what the build tools use (`config` to check the VM descriptions they write,
// `mem::layout` for the memory map, `linux::image`) and the machine layer. On the host the
// machine layer is not built, so what only it uses looks unused there: dead code is found
// by the bare-metal build.
#![cfg_attr(not(target_os = "none"), allow(dead_code, unused_imports))]

extern crate alloc;

/// The lock of state that several CPUs contend for (the VM manager, each VM, the
/// memory-sharing ledger): a ticket lock, so CPUs get it in the order they asked and none
/// starves while others take it in a loop (`docs/decisions.md`).
pub(crate) type Lock<T> = spin::mutex::TicketMutex<T>;

pub mod config;
mod console;
pub mod linux;
pub mod mem;
// The coverage-guided fuzz targets (`fuzz/`, docs/fuzzing.md) drive the exit handler and
// the VM manager directly: with the `fuzzing` feature these two modules are public.
#[cfg(feature = "fuzzing")]
pub mod vcpu;
#[cfg(not(feature = "fuzzing"))]
mod vcpu;
#[cfg(feature = "fuzzing")]
pub mod vm;
#[cfg(not(feature = "fuzzing"))]
mod vm;

#[cfg(all(target_arch = "aarch64", target_os = "none"))]
pub mod machine;

//! The hypervisor's own memory: where it lies, its stage-1 address space, and the pool
//! of page-table frames.

pub mod frames;
pub mod layout;
mod range;
pub mod stage1;

pub use range::PhysRange;

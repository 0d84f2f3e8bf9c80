//! The hypervisor's own memory: where it lies, its stage-1 address space, and the pool
//! of page-table frames.

pub mod frames;
pub mod layout;
mod range;
pub mod stage1;
pub mod window;

pub use range::PhysRange;

/// The page (and translation granule) size: `mmu`'s frame size, 4 KiB.
pub use mmu::FRAME_SIZE as PAGE_SIZE;

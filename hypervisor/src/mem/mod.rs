//! The hypervisor's own memory: where it lies, its stage-1 address space, and the pool
//! of page-table frames; and the address and range types every module uses.

mod addr;
pub mod bulk;
pub mod frames;
pub mod layout;
mod range;
pub mod stage1;
pub mod window;

pub use addr::{Ipa, PhysAddr, VirtAddr};
pub use range::{AddrRange, IpaRange, PhysRange, VirtRange};

/// The page (and translation granule) size: `mmu`'s frame size, 4 KiB.
pub use mmu::FRAME_SIZE as PAGE_SIZE;

//! Adapter for `page_table_multiarch`'s AArch64 table (`A64PageTable`, four levels, 48-bit
//! input addresses: the crate has no shorter configuration), with `page_table_entry`'s
//! `arm-el2` descriptor format. Only built for `target_arch = "aarch64"`, the only place the
//! crate compiles its AArch64 module. On a hosted target its TLB flushes are compiled out
//! (they only exist for `target_os = "none"`), so like the other adapters it does no TLB
//! maintenance here.
//!
//! - map: `map_region` (its range API; `allow_huge` for blocks); one page is `map`, all
//!   through one cursor.
//! - translate: `query`.
//! - unmap: `unmap_region` (a range call that unmaps entry by entry; it never frees
//!   tables before the whole table is dropped).
//! - protect: `protect_region` with read-only flags.

use std::cell::Cell;
use std::ptr::NonNull;

use memory_addr::{PhysAddr, VirtAddr};
use page_table_multiarch::aarch64::A64PageTable;
use page_table_multiarch::{MappingFlags, PageSize, PagingHandler};

use crate::frames::{alloc_frame_uninit, free_frame};
use crate::Adapter;

thread_local! {
    /// Live frames of the tables of this thread (the crate's handler has no `self`).
    static FRAMES: Cell<usize> = const { Cell::new(0) };
}

/// [`PagingHandler`] that takes frames from [`crate::frames`] and counts them.
pub struct CountingHandler;

impl PagingHandler for CountingHandler {
    fn alloc_frames(num: usize, align: usize) -> Option<PhysAddr> {
        // Tables are single 4 KiB frames; anything else is not a table request.
        if num != 1 || align > 4096 {
            return None;
        }
        FRAMES.with(|f| f.set(f.get() + 1));
        // The crate zeroes every table it allocates, so the frame is handed out as is.
        Some(PhysAddr::from(alloc_frame_uninit().as_ptr() as usize))
    }

    fn dealloc_frames(paddr: PhysAddr, num: usize) {
        debug_assert_eq!(num, 1);
        FRAMES.with(|f| f.set(f.get() - 1));
        if let Some(frame) = NonNull::new(paddr.as_usize() as *mut u8) {
            // SAFETY: the crate frees only frames it got from `alloc_frames`, once each.
            unsafe { free_frame(frame) }
        }
    }

    fn phys_to_virt(paddr: PhysAddr) -> VirtAddr {
        VirtAddr::from(paddr.as_usize())
    }
}

/// `page_table_multiarch` under test.
pub struct Multiarch {
    table: A64PageTable<CountingHandler>,
    /// Frames live when this table was created, so several tables on one thread count apart.
    base: usize,
}

const RW: MappingFlags = MappingFlags::READ.union(MappingFlags::WRITE);

impl Adapter for Multiarch {
    const NAME: &'static str = "page_table_multiarch";

    fn new() -> Self {
        let base = FRAMES.with(Cell::get);
        Self {
            table: A64PageTable::try_new().expect("page_table_multiarch root"),
            base,
        }
    }

    fn map_range(&mut self, va: u64, pa: u64, size: u64, blocks: bool) {
        let offset = pa.wrapping_sub(va) as usize;
        self.table
            .cursor()
            .map_region(
                VirtAddr::from(va as usize),
                |v| PhysAddr::from(v.as_usize().wrapping_add(offset)),
                size as usize,
                RW,
                blocks,
            )
            .expect("page_table_multiarch map_region");
    }

    fn map_page(&mut self, va: u64, pa: u64) {
        self.table
            .cursor()
            .map(
                VirtAddr::from(va as usize),
                PhysAddr::from(pa as usize),
                PageSize::Size4K,
                RW,
            )
            .expect("page_table_multiarch map");
    }

    fn translate(&self, va: u64) -> Option<(u64, bool)> {
        self.table
            .query(VirtAddr::from(va as usize))
            .ok()
            .map(|(pa, flags, _)| (pa.as_usize() as u64, flags.contains(MappingFlags::WRITE)))
    }

    fn unmap_range(&mut self, va: u64, size: u64) {
        self.table
            .cursor()
            .unmap_region(VirtAddr::from(va as usize), size as usize)
            .expect("page_table_multiarch unmap_region");
    }

    fn protect_read_only(&mut self, va: u64, size: u64) {
        self.table
            .cursor()
            .protect_region(
                VirtAddr::from(va as usize),
                size as usize,
                MappingFlags::READ,
            )
            .expect("page_table_multiarch protect_region");
    }

    fn frames_in_use(&self) -> usize {
        FRAMES.with(Cell::get) - self.base
    }
}

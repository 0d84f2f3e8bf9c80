//! Adapter for `aarch64-paging`: a [`Mapping`] for the non-secure EL2 regime with a root at
//! level 1 (512 GiB of input address space), driven through its range API while inactive
//! (offline table building, so it performs no TLB maintenance and no break-before-make
//! checks, its fastest correct path).
//!
//! - map: [`Mapping::map_range`] with `NO_CONTIGUOUS_HINT` (and `NO_BLOCK_MAPPINGS` when
//!   blocks are forbidden); one page is a one-page range.
//! - translate: the crate has no point lookup, so [`Mapping::walk_range`] over a one-byte
//!   range, reading the leaf descriptor it visits.
//! - unmap: [`Mapping::map_range`] of the whole range with flags lacking `VALID`, the
//!   crate's documented range unmap. It leaves emptied subtables in place (freeing them
//!   needs a separate [`Mapping::compact_subtables`] pass).
//! - protect: [`Mapping::modify_range`] setting `READ_ONLY` on valid leaves.

use std::ptr::NonNull;

use aarch64_paging::descriptor::{El23Attributes, PhysicalAddress};
use aarch64_paging::paging::{Constraints, El2, MemoryRegion, PageTable, Translation, LEAF_LEVEL};
use aarch64_paging::Mapping;

use crate::frames::{alloc_frame, free_frame, FrameCount};
use crate::Adapter;

/// Normal memory (MAIR index 1), inner shareable, accessed, read-write, AP[1] RES1.
const NORMAL_RW: El23Attributes = El23Attributes::VALID
    .union(El23Attributes::ATTRIBUTE_INDEX_1)
    .union(El23Attributes::INNER_SHAREABLE)
    .union(El23Attributes::ACCESSED)
    .union(El23Attributes::USER_RES1);

/// [`Translation`] that takes frames from [`crate::frames`] and counts them.
#[derive(Debug, Default)]
pub struct CountingTranslation {
    frames: FrameCount,
}

impl Translation<El23Attributes> for CountingTranslation {
    fn allocate_table(&mut self) -> (NonNull<PageTable<El23Attributes>>, PhysicalAddress) {
        let frame = alloc_frame();
        self.frames.up();
        (frame.cast(), PhysicalAddress(frame.as_ptr() as usize))
    }

    unsafe fn deallocate_table(&mut self, page_table: NonNull<PageTable<El23Attributes>>) {
        self.frames.down();
        // SAFETY: the crate only hands back tables it got from `allocate_table`, once.
        unsafe { free_frame(page_table.cast()) }
    }

    fn physical_to_virtual(&self, pa: PhysicalAddress) -> NonNull<PageTable<El23Attributes>> {
        NonNull::new(pa.0 as *mut PageTable<El23Attributes>)
            .expect("table physical addresses are non-null host addresses")
    }
}

/// `aarch64-paging` under test.
pub struct Paging {
    map: Mapping<CountingTranslation, El2>,
}

fn region(va: u64, size: u64) -> MemoryRegion {
    MemoryRegion::new(va as usize, (va + size) as usize)
}

impl Adapter for Paging {
    const NAME: &'static str = "aarch64-paging";

    fn new() -> Self {
        Self {
            map: Mapping::new(CountingTranslation::default(), 1, El2),
        }
    }

    fn map_range(&mut self, va: u64, pa: u64, size: u64, blocks: bool) {
        let constraints = if blocks {
            Constraints::NO_CONTIGUOUS_HINT
        } else {
            Constraints::NO_CONTIGUOUS_HINT | Constraints::NO_BLOCK_MAPPINGS
        };
        self.map
            .map_range(
                &region(va, size),
                PhysicalAddress(pa as usize),
                NORMAL_RW,
                constraints,
            )
            .expect("aarch64-paging map_range");
    }

    fn map_page(&mut self, va: u64, pa: u64) {
        self.map_range(va, pa, crate::PAGE, false);
    }

    fn translate(&self, va: u64) -> Option<(u64, bool)> {
        let mut found = None;
        self.map
            .walk_range(&region(va, 1), &mut |_, desc, level| {
                if desc.is_valid() {
                    let granule = (crate::PAGE as usize) << (9 * (LEAF_LEVEL - level));
                    let pa = desc.output_address().0 + (va as usize & (granule - 1));
                    let writable = !desc.flags().contains(El23Attributes::READ_ONLY);
                    found = Some((pa as u64, writable));
                }
                Ok(())
            })
            .expect("aarch64-paging walk_range");
        found
    }

    fn unmap_range(&mut self, va: u64, size: u64) {
        self.map
            .map_range(
                &region(va, size),
                PhysicalAddress(0),
                NORMAL_RW.difference(El23Attributes::VALID),
                Constraints::NO_CONTIGUOUS_HINT,
            )
            .expect("aarch64-paging unmap");
    }

    fn protect_read_only(&mut self, va: u64, size: u64) {
        self.map
            .modify_range(&region(va, size), &|_, desc| {
                if desc.flags().contains(El23Attributes::VALID) {
                    desc.modify_flags(El23Attributes::READ_ONLY, El23Attributes::empty())
                } else {
                    Ok(())
                }
            })
            .expect("aarch64-paging modify_range");
    }

    fn frames_in_use(&self) -> usize {
        self.map.translation().frames.get()
    }
}

impl Paging {
    /// Frees emptied subtables (the crate's separate compaction pass).
    pub fn compact(&mut self) {
        self.map.compact_subtables();
    }
}

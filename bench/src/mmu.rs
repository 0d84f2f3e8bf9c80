//! Adapter for this project's `mmu` crate: a [`PageTable`] with 39-bit input addresses
//! (root at level 1, 512 GiB, like the `aarch64-paging` adapter), frames from
//! [`crate::frames`] counted by the same hook as the peers, and [`NoTlbMaintenance`]
//! (an offline table: the crate still runs its break-before-make and invalidation logic,
//! the maintenance operations themselves are discarded, like the peers' compiled-out TLBIs).
//!
//! - map: [`PageTable::map`] over the range (`NO_BLOCKS` when blocks are forbidden), with
//!   `NO_CONTIGUOUS` like `aarch64-paging`'s `NO_CONTIGUOUS_HINT` (no peer sets the
//!   hint); `mmu-hint` is the same table with the crate's default, the contiguous hint
//!   on whole groups of 16.
//! - translate: [`PageTable::translate`].
//! - unmap: [`PageTable::unmap`] over the range (frees emptied tables).
//! - protect: [`PageTable::protect`] over the range with read-only attributes.

use std::ptr::NonNull;

use mmu::{
    Attributes, El2, FrameAllocator, MapFlags, NoTlbMaintenance, PageTable, Permissions,
    PhysToVirt, Regime, Stage2,
};

use crate::frames::{alloc_frame, free_frame, FrameCount};
use crate::Adapter;

/// Input address bits of the tables here unless told otherwise: 512 GiB.
const INPUT_BITS: u8 = 39;

/// [`FrameAllocator`] that takes frames from [`crate::frames`] and counts them.
#[derive(Debug, Default)]
pub struct CountingFrames {
    frames: FrameCount,
}

// SAFETY: frames are heap allocations addressed by their host address.
unsafe impl PhysToVirt for CountingFrames {
    fn phys_to_virt(&self, pa: u64) -> *mut u64 {
        pa as *mut u64
    }
}

// SAFETY: `alloc_frame` hands out fresh zeroed, aligned heap frames, each once.
unsafe impl FrameAllocator for CountingFrames {
    fn alloc_frame(&mut self) -> Option<u64> {
        self.frames.up();
        Some(alloc_frame().as_ptr() as u64)
    }

    fn free_frame(&mut self, pa: u64) {
        self.frames.down();
        if let Some(frame) = NonNull::new(pa as *mut u8) {
            // SAFETY: the crate returns only frames it got from `alloc_frame`, once each.
            unsafe { free_frame(frame) }
        }
    }
}

/// The regimes benchmarked, with their report names.
pub trait BenchRegime: Regime + Sized {
    /// Name in benchmark ids and tables (39-bit input).
    const BENCH_NAME: &'static str;
    /// Name with 48-bit input (four levels, like `page_table_multiarch`).
    const BENCH_NAME_48: &'static str;
    /// The regime with `bits` of input address.
    fn make(bits: u8) -> Self;
}

impl BenchRegime for El2 {
    const BENCH_NAME: &'static str = "mmu";
    const BENCH_NAME_48: &'static str = "mmu-48";
    fn make(bits: u8) -> Self {
        El2::new(bits)
    }
}

impl BenchRegime for Stage2 {
    const BENCH_NAME: &'static str = "mmu-stage2";
    const BENCH_NAME_48: &'static str = "mmu-stage2-48";
    fn make(bits: u8) -> Self {
        Stage2::new(1, bits)
    }
}

/// `mmu` under test, for regime `R` with `BITS` of input address (39 or 48), with the
/// contiguous hint if `HINT`.
pub struct Mmu<R: BenchRegime, const BITS: u8 = INPUT_BITS, const HINT: bool = false> {
    table: PageTable<R, CountingFrames, NoTlbMaintenance>,
}

const RW: Attributes = Attributes::normal(Permissions::RW);
const RO: Attributes = Attributes::normal(Permissions::RO);

impl<R: BenchRegime, const BITS: u8, const HINT: bool> Adapter for Mmu<R, BITS, HINT> {
    const NAME: &'static str = if HINT {
        "mmu-hint"
    } else if BITS == 48 {
        R::BENCH_NAME_48
    } else {
        R::BENCH_NAME
    };

    fn new() -> Self {
        Self {
            table: PageTable::new(R::make(BITS), CountingFrames::default(), NoTlbMaintenance)
                .expect("mmu table"),
        }
    }

    fn map_range(&mut self, va: u64, pa: u64, size: u64, blocks: bool) {
        let mut flags = if blocks {
            MapFlags::empty()
        } else {
            MapFlags::NO_BLOCKS
        };
        if !HINT {
            flags |= MapFlags::NO_CONTIGUOUS;
        }
        self.table.map(va, pa, size, RW, flags).expect("mmu map");
    }

    fn map_page(&mut self, va: u64, pa: u64) {
        self.table
            .map(va, pa, crate::PAGE, RW, MapFlags::empty())
            .expect("mmu map page");
    }

    fn translate(&self, va: u64) -> Option<(u64, bool)> {
        self.table
            .translate(va)
            .map(|t| (t.output, t.attrs.perms.contains(Permissions::WRITE)))
    }

    fn unmap_range(&mut self, va: u64, size: u64) {
        self.table.unmap(va, size).expect("mmu unmap");
    }

    fn protect_read_only(&mut self, va: u64, size: u64) {
        self.table.protect(va, size, RO).expect("mmu protect");
    }

    fn frames_in_use(&self) -> usize {
        self.table.allocator().frames.get()
    }
}

impl<R: BenchRegime> Mmu<R> {
    /// Changes `[va, va + size)` back to read-write (e.g. to merge a split block again).
    pub fn protect_read_write(&mut self, va: u64, size: u64) {
        self.table.protect(va, size, RW).expect("mmu protect");
    }

    /// The crate's own count of its table frames (must equal [`Adapter::frames_in_use`]).
    #[must_use]
    pub fn own_frame_count(&self) -> usize {
        self.table.frames_in_use()
    }
}

/// Input address of the 2 MiB block of the split/merge workloads.
pub const SPLIT_BLOCK: u64 = crate::workload::BASE;
/// The page inside it whose permissions split the block.
pub const SPLIT_PAGE: u64 = SPLIT_BLOCK + (1 << 20);

/// Starting state of the split workload: one 2 MiB block mapped read-write.
#[must_use]
pub fn block_mapped<R: BenchRegime>() -> Mmu<R> {
    let mut t = Mmu::<R>::new();
    t.map_range(
        SPLIT_BLOCK,
        SPLIT_BLOCK + crate::workload::PA_OFFSET,
        crate::workload::MIB2,
        true,
    );
    t
}

/// Split: make one page inside the block read-only, which replaces the block by a table
/// of 512 pages (break-before-make on the block descriptor).
pub fn split<R: BenchRegime>(t: &mut Mmu<R>) {
    t.protect_read_only(SPLIT_PAGE, crate::PAGE);
}

/// Starting state of the merge workload: the block split by [`split`].
#[must_use]
pub fn block_split<R: BenchRegime>() -> Mmu<R> {
    let mut t = block_mapped::<R>();
    split(&mut t);
    t
}

/// Merge: map the page read-write again (replacing it); the table is then uniform and
/// the crate folds it back into one block descriptor and frees it.
pub fn merge<R: BenchRegime>(t: &mut Mmu<R>) {
    t.table
        .map(
            SPLIT_PAGE,
            SPLIT_PAGE + crate::workload::PA_OFFSET,
            crate::PAGE,
            RW,
            MapFlags::REPLACE,
        )
        .expect("mmu remap page");
}

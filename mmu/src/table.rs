//! The translation table type and its single range walker.

use core::fmt;
use core::marker::PhantomData;
use core::mem::MaybeUninit;
use core::ptr;
use core::sync::atomic::{fence, Ordering};

use crate::attrs::{Attributes, MapFlags, Permissions, SwBits, TableAttrs};
use crate::desc::{self, is_table, level_shift, level_size};
use crate::error::Error;
use crate::frame::{FrameAllocator, FRAME_SIZE};
use crate::regime::{Geometry, Regime};
use crate::tlb::{
    publish, TlbBatch, TlbContext, TlbMaintenance, TlbOp, TlbSequence, DEFAULT_TLBI_THRESHOLD,
    MAX_TLBI_BATCH,
};

const ENTRIES: usize = 512;
/// Bytes of a level-2 block.
const L2_BLOCK: u64 = level_size(2);
/// Bytes of a level-1 block.
const L1_BLOCK: u64 = level_size(1);

/// Table addresses [`Ctx`] keeps on the stack before spilling them into a freed frame.
const FREE_CHUNK: usize = 64;

/// Result of [`PageTable::translate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Translation {
    /// Output address (a PA in all three regimes) of the translated input address.
    pub output: u64,
    /// Attributes of the leaf (including its software bits).
    pub attrs: Attributes,
    /// Level of the leaf: 1 (1 GiB block), 2 (2 MiB block) or 3 (4 KiB page).
    pub level: u8,
    /// Software bits of the leaf (same as `attrs.sw`).
    pub sw_bits: SwBits,
}

/// One leaf reported by [`PageTable::walk`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mapping {
    /// First input address the leaf maps (aligned to `size`).
    pub va: u64,
    /// Bytes the leaf maps: 4 KiB, 2 MiB or 1 GiB.
    pub size: u64,
    /// Output address of `va`.
    pub output: u64,
    /// Attributes, including software bits.
    pub attrs: Attributes,
    /// Level of the leaf (1..=3).
    pub level: u8,
}

#[derive(Clone, Copy)]
enum Op {
    Map {
        delta: u64,
        bits: u64,
        blocks: bool,
        replace: bool,
        /// Set the contiguous hint on groups filled from empty.
        contiguous: bool,
        /// Merge a table the mapping makes uniform into a block.
        merge: bool,
    },
    Unmap,
    Protect {
        bits: u64,
        /// The change only adds access: permission changes are written in place without
        /// TLB maintenance ([`PageTable::relax`]).
        relax: bool,
    },
    SetSw {
        sw: u64,
    },
    Coalesce,
    /// Set the table attributes of the table entries at `level` to `bits` (and mark
    /// them held, unless `bits` is 0).
    TableAttrs {
        bits: u64,
        level: u8,
    },
}

/// What the walker sees as the contents of a table. Apply passes only use `Real`;
/// the dry pass also walks tables that do not exist yet.
#[derive(Clone, Copy)]
enum View {
    Real(*mut u64),
    Empty,
    /// The table a block descriptor `desc` would be split into (entries at `level`).
    Split {
        desc: u64,
        level: u8,
    },
}

impl View {
    #[inline(always)]
    fn read(self, i: usize) -> u64 {
        match self {
            // SAFETY: `p` points to a live table frame of at least `i + 1` entries
            // (the walker only indexes within the table's entry count).
            View::Real(p) => unsafe { p.add(i).read() },
            View::Empty => 0,
            View::Split { desc, level } => split_entry(desc, level, i),
        }
    }
}

/// `attrs` packed into one word (never `u32::MAX`), for the encoding cache.
#[inline(always)]
fn attrs_key(attrs: &Attributes) -> u32 {
    u32::from(attrs.perms.bits()) | (attrs.mem_type as u32) << 8 | u32::from(attrs.sw.bits()) << 16
}

/// Entries of a group of 16 with the contiguous hint (Arm ARM D8.7.1, "The
/// Contiguous bit": 16 adjacent entries of a 4 KiB-granule table, aligned to 16).
const GROUP: usize = 16;

/// The entries `a..b` (whole aligned groups of 16) among `first..=last` that a map
/// with output offset `delta` fills at `level` and may give the contiguous hint: the
/// output must be aligned to the group like the input. `a == b` when none.
#[inline(always)]
fn hint_groups(
    first: usize,
    last: usize,
    delta: u64,
    level: u8,
    contiguous: bool,
) -> (usize, usize) {
    let span = (GROUP as u64) << level_shift(level);
    if !contiguous || delta & (span - 1) != 0 {
        return (first, first);
    }
    let a = (first + GROUP - 1) & !(GROUP - 1);
    let b = (last + 1) & !(GROUP - 1);
    if a < b {
        (a, b)
    } else {
        (first, first)
    }
}

/// The W^X policy of [`MapFlags::WXN`].
#[inline(always)]
fn check_wxn(attrs: &Attributes, flags: MapFlags) -> Result<(), Error> {
    if flags.contains(MapFlags::WXN)
        && attrs.perms.contains(Permissions::WRITE)
        && attrs
            .perms
            .intersects(Permissions::EXEC_EL2 | Permissions::EXEC_EL1 | Permissions::EXEC_EL0)
    {
        return Err(Error::UnsupportedAttributes);
    }
    Ok(())
}

/// Checks a table frame (run of `len` bytes) from the allocator: aligned to `len`
/// (a power of two) and entirely below `1 << out_bits`, so that a table descriptor
/// holds its address (bits \[47:12\]) and a walk of it takes no address-size fault
/// (Arm ARM D8.2, "Output address size").
#[inline(always)]
fn check_frame(pa: u64, len: u64, out_bits: u8) -> Result<(), Error> {
    let beyond = pa
        .checked_add(len - 1)
        .is_none_or(|last| last >> out_bits != 0);
    if pa & (len - 1) != 0 || beyond {
        return Err(Error::InvalidFrame { pa });
    }
    Ok(())
}

/// The entries `lo..hi` among `first..=last` of a table whose entry 0 starts at `base`
/// (each entry spans `1 << shift` bytes) that lie entirely inside `[va, end)`: only the
/// first and the last entry can be partly covered.
#[inline(always)]
fn whole_entries(
    va: u64,
    end: u64,
    base: u64,
    shift: u32,
    first: usize,
    last: usize,
) -> (usize, usize) {
    let lo = first + usize::from(va != base + ((first as u64) << shift));
    let hi = last + 1 - usize::from(end != base + ((last as u64 + 1) << shift));
    (lo, hi)
}

/// Entry `i` of the table that replaces block `block` with entries at `level`.
#[inline(always)]
fn split_entry(block: u64, level: u8, i: usize) -> u64 {
    let ty = if level == 3 {
        desc::TABLE_OR_PAGE
    } else {
        desc::BLOCK
    };
    (block & !(desc::OA_MASK | 0b11 | desc::CONTIGUOUS))
        | ((block & desc::OA_MASK) + ((i as u64) << level_shift(level)))
        | ty
}

#[inline(always)]
fn leaf_desc(level: u8, out: u64, bits: u64) -> u64 {
    out | bits
        | if level == 3 {
            desc::TABLE_OR_PAGE
        } else {
            desc::BLOCK
        }
}

/// State of one operation.
struct Ctx {
    op: Op,
    /// Dry pass: frames the apply pass will take.
    frames_needed: usize,
    /// Apply pass: reserved frames, chained through their first word.
    reserve: u64,
    /// Tables to free once the TLB maintenance is done: the latest `nfree` here, so a
    /// detached frame is not touched (it is usually cold by then), ...
    free: [MaybeUninit<u64>; FREE_CHUNK],
    nfree: usize,
    /// ... and the older ones in full chunks, each stored in one of the frames to free:
    /// word 0 links to the previous chunk (0 ends), words `1..=FREE_CHUNK` are addresses.
    free_chunks: u64,
    taken: usize,
    freed: usize,
    batch: TlbBatch,
    /// [`PageTable::relax`]: the last pair of leaf attribute bits (output address
    /// masked off) judged, and whether it only widened permissions. The leaves of one
    /// range usually change alike, so one decode serves them all.
    widened: Option<(u64, u64, bool)>,
}

/// A translation table for regime `R`, with frames from `A` and TLB maintenance by `T`.
///
/// See the [crate documentation](crate) for the guarantees of each operation.
pub struct PageTable<R: Regime, A: FrameAllocator, T: TlbMaintenance> {
    regime: R,
    alloc: A,
    tlb: T,
    geo: Geometry,
    /// `level_shift(geo.start_level())`, kept for the lookup path.
    root_shift: u32,
    /// `geo.input_size()` and `1 << regime.output_bits()`, kept for the single-entry
    /// paths' checks.
    input_size: u64,
    output_size: u64,
    /// `regime.tlb_context(root)`, fixed for the table's life.
    context: TlbContext,
    /// The last attributes encoded ([`attrs_key`], `u32::MAX` for none) and their
    /// descriptor bits.
    encoded_key: u32,
    encoded_bits: u64,
    root: u64,
    frames: usize,
    tlbi_threshold: usize,
    tlbi_range: bool,
    _not_sync: PhantomData<*mut u64>,
}

// SAFETY: the table exclusively owns its frames; moving it to another thread moves
// that ownership. Requires the allocator and TLB handles to be `Send`.
unsafe impl<R: Regime + Send, A: FrameAllocator + Send, T: TlbMaintenance + Send> Send
    for PageTable<R, A, T>
{
}

impl<R: Regime, A: FrameAllocator, T: TlbMaintenance> PageTable<R, A, T> {
    /// Creates an empty table: allocates the (possibly concatenated) root.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if `regime` is misconfigured, [`Error::OutOfFrames`]
    /// if the root cannot be allocated.
    pub fn new(regime: R, mut alloc: A, tlb: T) -> Result<Self, Error> {
        let geo = regime.geometry()?;
        let out_bits = regime.output_bits();
        if !(32..=48).contains(&out_bits) {
            return Err(Error::InvalidConfig);
        }
        let n = usize::from(geo.root_tables());
        let root = alloc.alloc_contiguous(n).ok_or(Error::OutOfFrames)?;
        if let Err(e) = check_frame(root, n as u64 * FRAME_SIZE, out_bits) {
            alloc.free_contiguous(root, n);
            return Err(e);
        }
        let context = regime.tlb_context(root);
        Ok(PageTable {
            regime,
            alloc,
            tlb,
            geo,
            root_shift: level_shift(geo.start_level()),
            input_size: geo.input_size(),
            output_size: 1 << out_bits,
            context,
            encoded_key: u32::MAX,
            encoded_bits: 0,
            root,
            frames: n,
            tlbi_threshold: DEFAULT_TLBI_THRESHOLD,
            tlbi_range: false,
            _not_sync: PhantomData,
        })
    }

    /// The regime configuration.
    pub fn regime(&self) -> &R {
        &self.regime
    }

    /// Table geometry (input size, start level, root tables).
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// Physical address of the root table (the first of the concatenated ones).
    pub fn root_address(&self) -> u64 {
        self.root
    }

    /// Number of table frames this table owns, root frames included.
    pub fn frames_in_use(&self) -> usize {
        self.frames
    }

    /// The frame allocator.
    pub fn allocator(&self) -> &A {
        &self.alloc
    }

    /// The TLB-maintenance implementation.
    pub fn tlb(&self) -> &T {
        &self.tlb
    }

    /// The TLB-maintenance implementation, mutably (e.g. to clear a recording).
    pub fn tlb_mut(&mut self) -> &mut T {
        &mut self.tlb
    }

    /// Sets how many per-address TLB invalidations one batch (see the
    /// [crate documentation](crate): the end of an operation, or one table's
    /// break-before-make changes) may issue before it invalidates the whole regime (EL2: `TLBI ALLE2IS`; stage 2: `TLBI VMALLS12E1IS`
    /// for the VMID; EL1&0: `TLBI ASIDE1IS`) instead. Clamped to 1..=[`MAX_TLBI_BATCH`].
    pub fn set_tlbi_threshold(&mut self, n: usize) {
        self.tlbi_threshold = n.clamp(1, MAX_TLBI_BATCH);
    }

    /// Lets the table invalidate contiguous changes with range instructions
    /// (FEAT_TLBIRANGE: [`TlbOp::El2Range`], [`TlbOp::Stage2Range`],
    /// [`TlbOp::El1Range`]): an unmap or change of many pages then costs one
    /// instruction per contiguous run (a few for a very large one) instead of one per
    /// page or a whole-regime invalidation, and the threshold of
    /// [`set_tlbi_threshold`](Self::set_tlbi_threshold) counts the range instructions
    /// (see [`range_steps`](crate::range_steps); a run beyond 8 GiB takes several, so
    /// a huge one becomes a whole-regime invalidation). Only turn it on
    /// when every PE that may use the table implements FEAT_TLBIRANGE
    /// (`ID_AA64ISAR0_EL1.TLB` >= 0b0010, see [`tlbi_range_supported`](crate::tlbi_range_supported); `arch::has_tlbi_range` (feature `arm-el2`) reads it).
    pub fn set_tlbi_range(&mut self, on: bool) {
        self.tlbi_range = on;
    }

    /// The regime's encoding of `attrs`, restricted to attribute bits.
    #[inline(always)]
    fn attr_bits(&mut self, attrs: &Attributes) -> Result<u64, Error> {
        if attrs_key(attrs) == self.encoded_key {
            return Ok(self.encoded_bits);
        }
        self.encode_attrs(attrs)
    }

    /// [`attr_bits`](Self::attr_bits) when the cache misses.
    #[inline(never)]
    fn encode_attrs(&mut self, attrs: &Attributes) -> Result<u64, Error> {
        let bits = self.regime.encode(attrs)? & !(desc::OA_MASK | 0b11);
        self.encoded_key = attrs_key(attrs);
        self.encoded_bits = bits;
        Ok(bits)
    }

    fn check_range(&self, va: u64, size: u64) -> Result<u64, Error> {
        if va % FRAME_SIZE != 0 || size % FRAME_SIZE != 0 {
            return Err(Error::Misaligned);
        }
        let end = va.checked_add(size).ok_or(Error::OutOfRange)?;
        if end > self.geo.input_size() {
            return Err(Error::OutOfRange);
        }
        Ok(end)
    }

    /// Maps `size` bytes at input address `va` to output address `pa` with `attrs`.
    ///
    /// 1 GiB and 2 MiB blocks are used wherever `va` and `pa` are both aligned and the
    /// range covers the block, unless `flags` contains [`MapFlags::NO_BLOCKS`]; a table
    /// that the mapping makes uniform is merged into a block (break-before-make).
    /// Existing mappings are an error unless `flags` contains [`MapFlags::REPLACE`].
    /// Mapping previously invalid entries issues no TLB invalidation.
    ///
    /// # Errors
    /// [`Error::Misaligned`], [`Error::OutOfRange`], [`Error::AlreadyMapped`],
    /// [`Error::UnsupportedAttributes`], [`Error::OutOfFrames`]. On error nothing changed.
    #[inline]
    pub fn map(
        &mut self,
        va: u64,
        pa: u64,
        size: u64,
        attrs: Attributes,
        flags: MapFlags,
    ) -> Result<(), Error> {
        if size == FRAME_SIZE {
            return self.map_page(va, pa, attrs, flags);
        }
        self.map_range(va, pa, size, attrs, flags)
    }

    /// `map` of one page: the checks of [`map_range`](Self::map_range) in their order,
    /// reduced to one page (both sizes are powers of two, so an aligned page lies below
    /// them whole exactly when its address does). Calls nothing but in tail position
    /// on its common path, so it needs no stack frame there.
    #[inline(never)]
    fn map_page(
        &mut self,
        va: u64,
        pa: u64,
        attrs: Attributes,
        flags: MapFlags,
    ) -> Result<(), Error> {
        if va % FRAME_SIZE != 0 {
            return Err(Error::Misaligned);
        }
        if va >= self.input_size {
            return Err(Error::OutOfRange);
        }
        if pa % FRAME_SIZE != 0 {
            return Err(Error::Misaligned);
        }
        if pa >= self.output_size {
            return Err(Error::OutOfRange);
        }
        check_wxn(&attrs, flags)?;
        if attrs_key(&attrs) != self.encoded_key {
            return self.map_page_encode(va, pa, attrs, flags);
        }
        let bits = self.encoded_bits;
        let blocks = !flags.contains(MapFlags::NO_BLOCKS);
        let replace = flags.contains(MapFlags::REPLACE);
        let merge = !flags.contains(MapFlags::NO_MERGE);
        match self.map_entry::<3>(va, pa, bits, blocks, replace, merge) {
            Some(result) => result,
            // One page never fills a group of 16: no contiguous hint.
            None => self.map_run(va, pa, va + FRAME_SIZE, bits, blocks, replace, false, merge),
        }
    }

    /// [`map_page`](Self::map_page) when `attrs` are not the cached ones.
    #[cold]
    #[inline(never)]
    fn map_page_encode(
        &mut self,
        va: u64,
        pa: u64,
        attrs: Attributes,
        flags: MapFlags,
    ) -> Result<(), Error> {
        self.encode_attrs(&attrs)?;
        self.map_page(va, pa, attrs, flags)
    }

    /// `map` of anything but a single page.
    fn map_range(
        &mut self,
        va: u64,
        pa: u64,
        size: u64,
        attrs: Attributes,
        flags: MapFlags,
    ) -> Result<(), Error> {
        let end = self.check_range(va, size)?;
        if pa % FRAME_SIZE != 0 {
            return Err(Error::Misaligned);
        }
        let pa_end = pa.checked_add(size).ok_or(Error::OutOfRange)?;
        if pa_end > self.output_size {
            return Err(Error::OutOfRange);
        }
        check_wxn(&attrs, flags)?;
        let bits = self.attr_bits(&attrs)?;
        if size == 0 {
            return Ok(());
        }
        let blocks = !flags.contains(MapFlags::NO_BLOCKS);
        let replace = flags.contains(MapFlags::REPLACE);
        let merge = !flags.contains(MapFlags::NO_MERGE);
        // One entry: a block where blocks are allowed and fit.
        let single = match size {
            L2_BLOCK if blocks && (va | pa) % L2_BLOCK == 0 => {
                self.map_entry::<2>(va, pa, bits, blocks, replace, merge)
            }
            L1_BLOCK if blocks && (va | pa) % L1_BLOCK == 0 && self.root_shift >= 30 => {
                self.map_entry::<1>(va, pa, bits, blocks, replace, merge)
            }
            _ => None,
        };
        match single {
            Some(result) => result,
            None => self.map_run(
                va,
                pa,
                end,
                bits,
                blocks,
                replace,
                !flags.contains(MapFlags::NO_CONTIGUOUS),
                merge,
            ),
        }
    }

    /// `map` by the general walker.
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    fn map_run(
        &mut self,
        va: u64,
        pa: u64,
        end: u64,
        bits: u64,
        blocks: bool,
        replace: bool,
        contiguous: bool,
        merge: bool,
    ) -> Result<(), Error> {
        let op = Op::Map {
            delta: pa.wrapping_sub(va),
            bits,
            blocks,
            replace,
            contiguous,
            merge,
        };
        self.run(op, va, end)
    }

    /// Removes all mappings in `va .. va + size`; holes are skipped. Blocks that
    /// straddle the range boundary are split; tables left empty are freed after the
    /// TLB invalidation that makes it safe.
    ///
    /// # Errors
    /// [`Error::Misaligned`], [`Error::OutOfRange`], [`Error::OutOfFrames`] (splitting
    /// a block needs frames). On error nothing changed.
    #[inline]
    pub fn unmap(&mut self, va: u64, size: u64) -> Result<(), Error> {
        if size == FRAME_SIZE {
            // `check_range` for one page (the input size is a power of two).
            if va % FRAME_SIZE != 0 {
                return Err(Error::Misaligned);
            }
            if va >= self.input_size {
                return Err(Error::OutOfRange);
            }
            if self.unmap_page(va) {
                return Ok(());
            }
            return self.unmap_run(va, va + FRAME_SIZE);
        }
        let end = self.check_range(va, size)?;
        if size == 0 {
            return Ok(());
        }
        self.unmap_run(va, end)
    }

    /// `unmap` by the general walker.
    #[inline(never)]
    fn unmap_run(&mut self, va: u64, end: u64) -> Result<(), Error> {
        self.run(Op::Unmap, va, end)
    }

    /// Unmaps the page at `va` when it is a level-3 page or a hole: one walk down,
    /// then back up along the path, counting entries off and detaching tables that
    /// became empty; `false` (nothing done) when a block must be split.
    #[inline]
    fn unmap_page(&mut self, va: u64) -> bool {
        // Entry pointers of the walk, from the root's down to the page's. Only
        // `..=depth` is written; `& 3` keeps the indices provably in bounds.
        let mut path = [MaybeUninit::<*mut u64>::uninit(); 4];
        let mut shift = self.root_shift;
        // SAFETY: the root holds `input size >> root_shift` entries; `va` is below the
        // input size.
        let mut p = unsafe { self.ptr(self.root).add((va >> shift) as usize) };
        let mut depth = 0;
        loop {
            // SAFETY: `p` is an entry of a table frame of this table.
            let e = unsafe { p.read() };
            if e & desc::VALID == 0 {
                // A hole: nothing to do.
                return true;
            }
            path[depth & 3] = MaybeUninit::new(p);
            if shift == 12 {
                if e & desc::CONTIGUOUS != 0 {
                    // Part of a group with the contiguous hint, whose 15 other pages
                    // keep the table (and its parents) in place: one entry fewer.
                    self.unmap_hinted_page(va, p);
                    // SAFETY: `path[depth - 1]` (depth >= 1: the root is never at
                    // level 3) is the entry pointing to the page's table.
                    unsafe {
                        let q = path[(depth - 1) & 3].assume_init();
                        q.write_volatile(q.read() - (1 << desc::COUNT_SHIFT));
                    }
                    return true;
                }
                break;
            }
            if e & 0b10 == 0 {
                return false;
            }
            depth += 1;
            shift -= 9;
            // SAFETY: a table descriptor of this table points to one of its frames;
            // the index is below 512.
            p = unsafe {
                self.ptr(e & desc::OA_MASK)
                    .add(((va >> shift) & 511) as usize)
            };
        }
        // SAFETY: `p` is the page's entry.
        unsafe { p.write_volatile(0) };
        // The page's table keeps other entries (the common case), or is held: one
        // fewer.
        // SAFETY: `path[..=depth]` was written on the way down and `depth >= 1` (the
        // root is never at level 3); `path[depth - 1]` points to the page's table.
        let q = unsafe { path[(depth - 1) & 3].assume_init() };
        // SAFETY: as above.
        let e = unsafe { q.read() };
        if desc::count(e) > 1 || e & desc::KEEP != 0 {
            // SAFETY: as above; only the count (ignored by the hardware) changes.
            unsafe { q.write_volatile(e - (1 << desc::COUNT_SHIFT)) };
            self.sync_one(va, true);
            return true;
        }
        self.unmap_page_detach(va, &path, depth);
        true
    }

    /// Unmaps the page at `va` (entry `p`) of a group of 16 with the contiguous hint:
    /// the whole group goes invalid, is invalidated, and the 15 other pages come back
    /// without the hint (break-before-make, as [`unfold`](Self::unfold) does); the page
    /// stays invalid. The caller counts it off its table, which keeps the 15.
    #[cold]
    #[inline(never)]
    fn unmap_hinted_page(&mut self, va: u64, p: *mut u64) {
        // The group's first entry, from the page's index in its table (the pointer's
        // own alignment is whatever `PhysToVirt` gives: only 8 bytes are promised).
        let g = p.wrapping_sub(((va >> 12) as usize) % GROUP);
        let gva = va & !((GROUP as u64 * FRAME_SIZE) - 1);
        let mut batch = TlbBatch::new(self.tlbi_threshold, self.tlbi_range);
        for k in 0..GROUP {
            // SAFETY: `g..g + GROUP` is the group of `p` in the same table frame.
            unsafe {
                let q = g.add(k);
                let e = q.read();
                if e & desc::VALID != 0 {
                    q.write_volatile(e & !(desc::CONTIGUOUS | desc::VALID));
                    batch.note(gva + k as u64 * FRAME_SIZE, 3, true);
                }
            }
        }
        batch.sync(&self.regime, self.context, &mut self.tlb);
        for k in 0..GROUP {
            // SAFETY: as above.
            unsafe {
                let q = g.add(k);
                let e = q.read();
                if q == p {
                    q.write_volatile(0);
                } else if e != 0 {
                    q.write_volatile(e | desc::VALID);
                }
            }
        }
        publish(&mut self.tlb);
    }

    /// The rest of [`unmap_page`](Self::unmap_page) when the page was the last entry
    /// of its table: up the `path` (entries `..depth` are the table entries leading
    /// to the page), detaching the tables that became empty, then the invalidation,
    /// then the frees.
    #[cold]
    #[inline(never)]
    fn unmap_page_detach(&mut self, va: u64, path: &[MaybeUninit<*mut u64>; 4], mut depth: usize) {
        let mut freed = [0u64; 3];
        let mut nfreed = 0;
        while depth > 0 {
            depth -= 1;
            // SAFETY: the caller wrote `path[..depth]`; each is the entry pointing to
            // the table below it.
            let p = unsafe { path[depth & 3].assume_init() };
            // SAFETY: as above.
            let e = unsafe { p.read() };
            if desc::count(e) > 1 || e & desc::KEEP != 0 {
                // SAFETY: as above; only the count (ignored by the hardware) changes.
                // A held table stays, even empty.
                unsafe { p.write_volatile(e - (1 << desc::COUNT_SHIFT)) };
                break;
            }
            // The table became empty: detach it.
            // SAFETY: as above.
            unsafe { p.write_volatile(0) };
            freed[nfreed.min(2)] = e & desc::OA_MASK;
            nfreed += 1;
        }
        // One invalidation of `va`, the whole batch, with walk caches: a non-leaf TLBI
        // of an address removes the walk-cache entries of every table on its path.
        self.sync_one(va, false);
        // Only now, after the synchronisation, are the detached tables unreachable.
        for &pa in &freed[..nfreed.min(3)] {
            self.alloc.free_frame(pa);
        }
        self.frames -= nfreed;
    }

    /// Sets the attributes (permissions, memory type and software bits) of every
    /// mapping in `va .. va + size`; holes are skipped. Memory-type changes use
    /// break-before-make; permission changes are written in place and invalidated.
    ///
    /// # Errors
    /// [`Error::Misaligned`], [`Error::OutOfRange`], [`Error::UnsupportedAttributes`],
    /// [`Error::OutOfFrames`]. On error nothing changed.
    pub fn protect(&mut self, va: u64, size: u64, attrs: Attributes) -> Result<(), Error> {
        self.set_attrs(va, size, attrs, false)
    }

    /// Like [`Self::protect`], for a change that only adds access (for example from no
    /// access to read-write, same memory type): the entries are written in place and no
    /// TLB invalidation is issued for them. A CPU may still hold an old, more restrictive
    /// entry; an access it makes then takes a permission fault, and its handler must
    /// invalidate that CPU's own TLB for the address (a local, non-shareable `TLBI`)
    /// before running the access again. This spares every other CPU a broadcast
    /// invalidation for a change that cannot let any access through that the new entry
    /// would not (a change of permissions alone needs no break-before-make, Arm ARM
    /// D8.17). A change of memory type, or a block split at the range's ends, still uses
    /// break-before-make with its invalidation.
    ///
    /// Only a leaf whose permissions the change widens is spared the invalidation: a
    /// leaf that would lose any permission is invalidated as [`Self::protect`] does, so
    /// no CPU keeps access that was taken away.
    ///
    /// # Errors
    /// As [`Self::protect`]. On error nothing changed.
    pub fn relax(&mut self, va: u64, size: u64, attrs: Attributes) -> Result<(), Error> {
        self.set_attrs(va, size, attrs, true)
    }

    /// [`Self::protect`] or, with `relax`, [`Self::relax`].
    fn set_attrs(
        &mut self,
        va: u64,
        size: u64,
        attrs: Attributes,
        relax: bool,
    ) -> Result<(), Error> {
        let end = self.check_range(va, size)?;
        let bits = self.attr_bits(&attrs)?;
        if size == 0 {
            return Ok(());
        }
        self.run(Op::Protect { bits, relax }, va, end)
    }

    /// Sets the software bits of every mapping in `va .. va + size`; holes are
    /// skipped. Changing only software bits needs no TLB invalidation (the hardware
    /// ignores them), but a block straddling the range boundary is split first, with
    /// break-before-make and its invalidation.
    ///
    /// # Errors
    /// [`Error::Misaligned`], [`Error::OutOfRange`], [`Error::OutOfFrames`] (a block
    /// straddling the range boundary is split). On error nothing changed.
    pub fn set_sw_bits(&mut self, va: u64, size: u64, sw: SwBits) -> Result<(), Error> {
        let end = self.check_range(va, size)?;
        if size == 0 {
            return Ok(());
        }
        self.run(Op::SetSw { sw: sw.to_desc() }, va, end)
    }

    /// Sets the table attributes of the table entries covering `va .. va + size`, so
    /// that everything mapped below them, now and later, is limited by `attrs` (e.g.
    /// a whole region made non-executable or read-only, whatever its leaves say).
    ///
    /// The entries are those of the largest table-entry span (512 GiB, 1 GiB or
    /// 2 MiB) that `va` and `size` are both multiples of; each becomes a table if it is
    /// not one yet (an empty table for a hole, a split for a block, with
    /// break-before-make). A table with attributes is *held*: no other operation
    /// merges, replaces or frees it (unmapping everything below it empties it but
    /// keeps it and its attributes), until they are cleared with
    /// `TableAttrs::empty()`, which also frees it if it is empty. Changing the
    /// attributes of a live table invalidates everything below it.
    ///
    /// [`translate`](Self::translate) and [`walk`](Self::walk) report the leaves' own
    /// attributes; [`table_attrs`](Self::table_attrs) gives the limits on an address.
    ///
    /// # Errors
    /// [`Error::Misaligned`] (not a multiple of 2 MiB), [`Error::OutOfRange`],
    /// [`Error::UnsupportedAttributes`] (see [`TableAttrs`]: stage 2 has none),
    /// [`Error::OutOfFrames`]. On error nothing changed.
    ///
    /// # Example
    ///
    /// ```
    /// use mmu::testing::{HeapFrames, RecordingTlb};
    /// use mmu::{Attributes, El2, MapFlags, PageTable, Permissions, TableAttrs};
    ///
    /// let mut hyp = PageTable::new(El2::new(39), HeapFrames::new(), RecordingTlb::new())?;
    /// // The first GiB holds only devices: nothing in it may ever execute at EL2.
    /// hyp.map(0x0900_0000, 0x0900_0000, 0x1000, Attributes::device(), MapFlags::empty())?;
    /// hyp.set_table_attrs(0, 1 << 30, TableAttrs::NO_EXEC_EL2)?;
    /// // A later executable mapping there is still execute-never.
    /// let code = Attributes::normal(Permissions::READ | Permissions::EXEC_EL2);
    /// hyp.map(0x0a00_0000, 0x0a00_0000, 0x1000, code, MapFlags::empty())?;
    /// assert!(hyp.table_attrs(0x0a00_0000).contains(TableAttrs::NO_EXEC_EL2));
    /// let perms = hyp.table_attrs(0x0a00_0000).limit(hyp.translate(0x0a00_0000).unwrap().attrs.perms);
    /// assert_eq!(perms, Permissions::READ);
    /// # Ok::<(), mmu::Error>(())
    /// ```
    pub fn set_table_attrs(&mut self, va: u64, size: u64, attrs: TableAttrs) -> Result<(), Error> {
        let end = self.check_range(va, size)?;
        let bits = self.regime.encode_table(attrs)? & desc::TABLE_ATTRS;
        if size == 0 {
            return Ok(());
        }
        let level = (self.geo.start_level()..=2)
            .find(|&l| (va | size) % level_size(l) == 0)
            .ok_or(Error::Misaligned)?;
        self.run(Op::TableAttrs { bits, level }, va, end)
    }

    /// The table attributes on the walk to `va`: the union of those of every table
    /// entry on its path (empty outside the input range).
    #[must_use]
    pub fn table_attrs(&self, va: u64) -> TableAttrs {
        let mut out = TableAttrs::empty();
        if va >> self.geo.input_bits() != 0 {
            return out;
        }
        let mut shift = self.root_shift;
        // SAFETY: as in `translate`.
        let mut e = unsafe { self.ptr(self.root).add((va >> shift) as usize).read() };
        while e & 0b11 == 0b11 && shift > 12 {
            out |= self.regime.decode_table(e);
            shift -= 9;
            let next = self.ptr(e & desc::OA_MASK);
            // SAFETY: `next` is a table frame of this table; the index is below 512.
            e = unsafe { next.add(((va >> shift) & 511) as usize).read() };
        }
        out
    }

    /// Maps one leaf at level `LEAF` (3: a page, 2 or 1: a block) when that only
    /// means filling an invalid entry, creating the missing tables above it; `None`
    /// when the general walker is needed (an existing leaf on the path, or an entry
    /// that would complete a table that could then be merged into a block).
    #[inline(always)]
    fn map_entry<const LEAF: u32>(
        &mut self,
        va: u64,
        pa: u64,
        bits: u64,
        blocks: bool,
        replace: bool,
        merge: bool,
    ) -> Option<Result<(), Error>> {
        let leaf_shift = level_shift(LEAF as u8);
        let mut shift = self.root_shift;
        // SAFETY: the root frame(s) hold `input size >> root_shift` entries and `va` is
        // below the input size (checked by the caller).
        let mut p = unsafe { self.ptr(self.root).add((va >> shift) as usize) };
        // The entry pointing to the table of `p` (null for the root, whose count is
        // not kept).
        let mut parent: *mut u64 = ptr::null_mut();
        loop {
            // SAFETY: `p` is an entry of a table frame of this table.
            let e = unsafe { p.read() };
            if e == 0 {
                break;
            }
            if shift == leaf_shift || e & desc::VALID == 0 {
                // A leaf maps `va` itself; a table (a block's place holding pages)
                // is the general walker's: it finds the first mapped address.
                return if replace || is_table(e, LEAF as u8) {
                    None
                } else {
                    Some(Err(Error::AlreadyMapped { va }))
                };
            }
            if e & 0b10 == 0 {
                // A block on the way: the general walker handles conflicts and splits.
                return None;
            }
            parent = p;
            shift -= 9;
            // SAFETY: a table descriptor of this table points to one of its frames;
            // the index is below 512.
            p = unsafe {
                self.ptr(e & desc::OA_MASK)
                    .add(((va >> shift) & 511) as usize)
            };
        }
        let new_leaf = leaf_desc(LEAF as u8, pa, bits);
        // NO_BLOCKS pages pin their level-3 table (never merged).
        let pin = if blocks || LEAF != 3 { 0 } else { desc::PINNED };
        if shift != leaf_shift {
            // Out of line: the allocator calls need a stack frame the rest does not.
            return Some(self.attach_path::<LEAF>(va, p, parent, shift, new_leaf, pin));
        }
        if !parent.is_null() {
            // SAFETY: `parent` is the entry of this table that points to `p`'s table.
            let c = unsafe { parent.read() };
            if blocks && merge && desc::count(c) == ENTRIES as u32 - 1 {
                // This leaf fills the table: the general walker may merge it.
                return None;
            }
            // SAFETY: `p` is the invalid entry found above.
            unsafe { p.write_volatile(new_leaf) };
            // One more non-zero entry in `p`'s table (and its pin, for a page written
            // into an existing level-3 table): bits the hardware ignores.
            // SAFETY: as above.
            unsafe { parent.write_volatile((c + (1 << desc::COUNT_SHIFT)) | pin) };
        } else {
            // SAFETY: `p` is the invalid entry found above.
            unsafe { p.write_volatile(new_leaf) };
        }
        publish(&mut self.tlb);
        Some(Ok(()))
    }

    /// The rest of [`map_entry`](Self::map_entry) when tables are missing: builds
    /// them below the invalid entry `p` (of a table whose entries span `1 << shift`
    /// bytes, which `parent` points to, or the root if null) and publishes them.
    #[inline(never)]
    fn attach_path<const LEAF: u32>(
        &mut self,
        va: u64,
        p: *mut u64,
        parent: *mut u64,
        shift: u32,
        new_leaf: u64,
        pin: u64,
    ) -> Result<(), Error> {
        let leaf_shift = level_shift(LEAF as u8);
        let d = if shift == leaf_shift + 9 {
            // One table, the common case: kept short (few values live across the
            // allocator call).
            let off = ((va >> leaf_shift) & 511) as usize;
            let tdesc = pin | (1 << desc::COUNT_SHIFT) | desc::TABLE_OR_PAGE;
            let t = self.new_frame()?;
            // SAFETY: `t` is a fresh zeroed frame nobody walks yet; `off` is below 512.
            unsafe { self.ptr(t).add(off).write(new_leaf) };
            self.frames += 1;
            t | tdesc
        } else {
            let level = 3 - (shift - 12) / 9;
            self.build_path(va, level + 1, LEAF, new_leaf, pin)?
        };
        // Publish the new tables' contents before the pointer to them.
        fence(Ordering::Release);
        // SAFETY: `p` is an invalid entry of this table (the caller's walk).
        unsafe { p.write_volatile(d) };
        if !parent.is_null() {
            // One more non-zero entry in `p`'s table: bits the hardware ignores.
            // SAFETY: `parent` is the entry of this table that points to `p`'s table.
            unsafe { parent.write_volatile(parent.read() + (1 << desc::COUNT_SHIFT)) };
        }
        publish(&mut self.tlb);
        Ok(())
    }

    /// Builds, off-line, the chain of tables at levels `from..=leaf` that lead to
    /// `new_leaf` (the leaf of `va` at level `leaf`), one entry each, and returns the
    /// table descriptor to publish (the caller orders the tables' contents before
    /// it). On error every frame taken is given back.
    #[inline(never)]
    fn build_path(
        &mut self,
        va: u64,
        from: u32,
        leaf: u32,
        new_leaf: u64,
        pin: u64,
    ) -> Result<u64, Error> {
        let top = self.new_frame()?;
        let mut cur = top;
        let mut level = from;
        while level < leaf {
            let next = match self.new_frame() {
                Ok(f) => f,
                Err(e) => {
                    self.free_path(top, from, level, va);
                    return Err(e);
                }
            };
            let pinned = if level + 1 == leaf { pin } else { 0 };
            // SAFETY: `cur` is a fresh zeroed frame nobody walks yet.
            unsafe {
                self.ptr(cur)
                    .add(((va >> level_shift(level as u8)) & 511) as usize)
                    .write(next | pinned | (1 << desc::COUNT_SHIFT) | desc::TABLE_OR_PAGE);
            }
            cur = next;
            level += 1;
        }
        // SAFETY: as above.
        unsafe {
            self.ptr(cur)
                .add(((va >> level_shift(leaf as u8)) & 511) as usize)
                .write(new_leaf);
        }
        self.frames += (leaf + 1 - from) as usize;
        let pinned = if from == leaf { pin } else { 0 };
        Ok(top | pinned | (1 << desc::COUNT_SHIFT) | desc::TABLE_OR_PAGE)
    }

    /// Gives back the chain of fresh tables `build_path` linked from `top` (at level
    /// `from`) down to the one at level `last`.
    #[cold]
    fn free_path(&mut self, top: u64, from: u32, last: u32, va: u64) {
        let mut cur = top;
        for level in from..=last {
            let next = if level < last {
                // SAFETY: `cur` is a fresh frame of the chain; its entry for `va` links on.
                unsafe {
                    self.ptr(cur)
                        .add(((va >> level_shift(level as u8)) & 511) as usize)
                        .read()
                        & desc::OA_MASK
                }
            } else {
                0
            };
            self.alloc.free_frame(cur);
            cur = next;
        }
    }

    /// Merges every table whose whole span lies in `va .. va + size` and that maps one
    /// aligned, contiguous range with identical attributes into a block (1 GiB /
    /// 2 MiB), with break-before-make, and frees the merged tables. Tables holding
    /// pages mapped with [`MapFlags::NO_BLOCKS`] are never merged. `map` does this by itself; `protect` and
    /// `set_sw_bits` never do, so call this after they made a range uniform again.
    ///
    /// # Errors
    /// [`Error::Misaligned`], [`Error::OutOfRange`]. Needs no frames.
    pub fn coalesce(&mut self, va: u64, size: u64) -> Result<(), Error> {
        let end = self.check_range(va, size)?;
        if size == 0 {
            return Ok(());
        }
        self.run(Op::Coalesce, va, end)
    }

    /// The maintenance for one changed entry at `va` (Arm ARM D8.17, D8.16: DSB ISHST
    /// before the TLBI, DSB ISH after it, ISB): what a [`TlbBatch`] with one note
    /// emits, without its bookkeeping.
    #[inline]
    fn sync_one(&mut self, va: u64, leaf: bool) {
        let entry = self.regime.tlbi_entry(va, leaf);
        let mut ops = [
            TlbOp::DsbIshSt,
            entry,
            TlbOp::DsbIsh,
            TlbOp::Isb,
            TlbOp::DsbIsh,
            TlbOp::Isb,
        ];
        let n = match self.regime.tlbi_after_entries() {
            Some(after) => {
                ops[3] = after;
                6
            }
            None => 4,
        };
        // A leaf-only invalidation here is always of a page (level 3): the TTL hint.
        let levels = [0, if leaf { 3 } else { 0 }, 0, 0, 0, 0];
        let seq = TlbSequence::with_levels(&ops[..n], &levels[..n], self.context);
        self.tlb.execute(&seq);
    }

    /// Dry pass, frame reservation, apply pass, TLB maintenance, frees.
    fn run(&mut self, op: Op, va: u64, end: u64) -> Result<(), Error> {
        let mut cx = Ctx {
            op,
            frames_needed: 0,
            reserve: 0,
            free: [MaybeUninit::uninit(); FREE_CHUNK],
            nfree: 0,
            free_chunks: 0,
            taken: 0,
            freed: 0,
            batch: TlbBatch::new(self.tlbi_threshold, self.tlbi_range),
            widened: None,
        };
        let root = View::Real(self.ptr(self.root));
        let start = self.geo.start_level();
        self.visit::<true>(&mut cx, root, start, 0, va, end, true)?;
        for _ in 0..cx.frames_needed {
            match self.new_frame() {
                Ok(pa) => self.push(&mut cx.reserve, pa),
                Err(e) => {
                    while cx.reserve != 0 {
                        let pa = self.pop(&mut cx.reserve);
                        self.alloc.free_frame(pa);
                    }
                    return Err(e);
                }
            }
        }
        // The root's count is not kept (it has no parent descriptor).
        let result = self
            .visit::<false>(&mut cx, root, start, 0, va, end, true)
            .map(|_| ());
        debug_assert!(
            result.is_ok(),
            "apply pass failed after a successful dry pass"
        );
        cx.batch.sync(&self.regime, self.context, &mut self.tlb);
        // Only now, after the synchronisation above, are the detached tables unreachable.
        for a in &cx.free[..cx.nfree] {
            // SAFETY: `queue_free` initialised the first `nfree` slots.
            self.alloc.free_frame(unsafe { a.assume_init() });
        }
        while cx.free_chunks != 0 {
            let pa = cx.free_chunks;
            let p = self.ptr(pa);
            // SAFETY: `pa` holds a chunk written by `queue_free`: a link and
            // `FREE_CHUNK` addresses; the frame goes back to the allocator as it is
            // after being read (its contents do not matter any more).
            unsafe {
                cx.free_chunks = p.read();
                for k in 1..=FREE_CHUNK {
                    self.alloc.free_frame(p.add(k).read());
                }
            }
            self.alloc.free_frame(pa);
        }
        while cx.reserve != 0 {
            let pa = self.pop(&mut cx.reserve);
            self.alloc.free_frame(pa);
        }
        self.frames = self.frames + cx.taken - cx.freed;
        result
    }

    /// One frame from the allocator, checked by [`check_frame`] (and given back if
    /// unusable).
    #[inline(always)]
    fn new_frame(&mut self) -> Result<u64, Error> {
        let pa = self.alloc.alloc_frame().ok_or(Error::OutOfFrames)?;
        // `check_frame` for one frame: aligned, and below the output size (a power of
        // two, so the whole frame is when its address is).
        if pa % FRAME_SIZE != 0 || pa >= self.output_size {
            self.alloc.free_frame(pa);
            return Err(Error::InvalidFrame { pa });
        }
        Ok(pa)
    }

    #[inline(always)]
    fn ptr(&self, pa: u64) -> *mut u64 {
        self.alloc.phys_to_virt(pa)
    }

    /// Pushes frame `pa` on an intrusive list (the link is a page-aligned address,
    /// so the first word stays an invalid descriptor).
    fn push(&self, head: &mut u64, pa: u64) {
        // SAFETY: `pa` is a frame this table owns and no longer uses (or has not
        // used yet); its first word is free for the link.
        unsafe { self.ptr(pa).write(*head) };
        *head = pa;
    }

    /// Queues the detached table at `pa` to be freed after the operation's final TLB
    /// synchronisation, and counts it. The caller reads nothing of the frame any more.
    #[inline(always)]
    fn queue_free(&self, cx: &mut Ctx, pa: u64) {
        cx.freed += 1;
        if cx.nfree < FREE_CHUNK {
            cx.free[cx.nfree] = MaybeUninit::new(pa);
            cx.nfree += 1;
            return;
        }
        // The stack part is full: spill it into `pa`, which is itself freed with it.
        // Every word written is a page-aligned address, so a walker still reaching
        // the frame through a stale walk-cache entry reads invalid descriptors, as
        // it could during break-before-make.
        let p = self.ptr(pa);
        // SAFETY: `pa` is a table frame this table owns and no longer uses; a frame
        // holds 512 words, more than the link and `FREE_CHUNK` addresses. The slots
        // read are initialised since `nfree == FREE_CHUNK`.
        unsafe {
            p.write(cx.free_chunks);
            ptr::copy_nonoverlapping(cx.free.as_ptr().cast::<u64>(), p.add(1), FREE_CHUNK);
        }
        cx.free_chunks = pa;
        cx.nfree = 0;
    }

    fn pop(&self, head: &mut u64) -> u64 {
        let pa = *head;
        // SAFETY: `pa` was pushed by `push`; restore the zero the allocator gave us.
        unsafe {
            let p = self.ptr(pa);
            *head = p.read();
            p.write(0);
        }
        pa
    }

    fn take_frame(&mut self, cx: &mut Ctx) -> Option<u64> {
        cx.taken += 1;
        if cx.reserve != 0 {
            Some(self.pop(&mut cx.reserve))
        } else {
            // The dry pass counts exactly what the apply pass takes; this is a fallback.
            debug_assert!(false, "frame reservation too small");
            let pa = self.alloc.alloc_frame();
            if pa.is_none() {
                cx.taken -= 1;
            }
            pa
        }
    }

    /// The walker: visits entries of the table `view` at `level` (whose entry 0 maps
    /// input address `base`) that intersect `va .. end`. With `DRY` it only counts
    /// frames and detects errors; otherwise it applies the operation. `live` says
    /// whether hardware may be walking this table (it is reachable from the root).
    #[allow(clippy::too_many_arguments)]
    fn visit<const DRY: bool>(
        &mut self,
        cx: &mut Ctx,
        view: View,
        level: u8,
        base: u64,
        va: u64,
        end: u64,
        live: bool,
    ) -> Result<i32, Error> {
        let shift = level_shift(level);
        let size = level_size(level);
        let first = ((va - base) >> shift) as usize;
        let last = ((end - 1 - base) >> shift) as usize;
        let tbl = match view {
            View::Real(p) => p,
            _ => ptr::null_mut(),
        };
        let mut bbm = false;
        // Net change of the number of non-zero entries of this table.
        let mut filled = 0i32;

        // A new level-3 table needs no frames and cannot conflict.
        if DRY && level == 3 && matches!(view, View::Empty) {
            return Ok(0);
        }

        if !DRY && level >= 1 {
            self.unfold_partial(cx, tbl, level, base, va, end, first, last, live);
        }

        // Fast path: filling a run of level-3 entries of a table nobody walks yet.
        if !DRY && level == 3 && !live {
            if let Op::Map {
                delta,
                bits,
                contiguous,
                ..
            } = cx.op
            {
                // The output may lie below the input: only the sum wraps back into range.
                let out = (base + ((first as u64) << 12)).wrapping_add(delta);
                let mut d = leaf_desc(3, out, bits);
                // Whole groups of 16 (all written here) get the contiguous hint.
                let (a, b) = hint_groups(first, last, delta, 3, contiguous);
                for i in first..a {
                    // SAFETY: `tbl` is a fresh level-3 table frame of 512 entries.
                    unsafe { tbl.add(i).write(d) };
                    d += FRAME_SIZE;
                }
                d |= desc::CONTIGUOUS;
                for i in a..b {
                    // SAFETY: as above.
                    unsafe { tbl.add(i).write(d) };
                    d += FRAME_SIZE;
                }
                d &= !desc::CONTIGUOUS;
                for i in b..=last {
                    // SAFETY: as above.
                    unsafe { tbl.add(i).write(d) };
                    d += FRAME_SIZE;
                }
                // Entries filled in an empty table (`descend` knows a split table
                // stays full under `map`).
                return Ok((last + 1 - first) as i32);
            }
        }

        // Entry `i`: its input address, descriptor, the part of the range it holds, and
        // whether the range covers it entirely.
        macro_rules! entry {
            ($i:expr) => {{
                let eva = base + (($i as u64) << shift);
                let e = if DRY {
                    view.read($i)
                } else {
                    // SAFETY: apply passes walk real table frames; `$i` is within them.
                    unsafe { tbl.add($i).read() }
                };
                let s = va.max(eva);
                let t = end.min(eva + size);
                (eva, e, s, t, s == eva && t == eva + size)
            }};
        }

        match cx.op {
            Op::Map {
                delta,
                bits,
                blocks,
                replace,
                contiguous,
                merge: _,
            } => {
                // Whether a covered entry of this table becomes a leaf (page or block):
                // blocks need the output aligned like the input, i.e. `delta` aligned.
                let leaves_here = level == 3 || (blocks && level >= 1 && delta & (size - 1) == 0);
                let ty = if level == 3 {
                    desc::TABLE_OR_PAGE
                } else {
                    desc::BLOCK
                };
                // Any entry, the general way.
                macro_rules! general {
                    ($i:expr) => {{
                        let i = $i;
                        let (eva, e, s, t, covered) = entry!(i);
                        if is_table(e, level)
                            && replace
                            && leaves_here
                            && covered
                            && e & desc::KEEP == 0
                        {
                            // The whole table gives way to one block, in one step:
                            // nothing below it is rewritten first.
                            if !DRY {
                                let new = eva.wrapping_add(delta) | bits | ty;
                                self.detach(cx, tbl, i, e, level, eva, live, new, &mut bbm);
                            }
                        } else if is_table(e, level) {
                            filled += self
                                .descend::<DRY>(cx, view, i, e, level, eva, s, t, live, &mut bbm)?;
                        } else if e != 0 && !replace {
                            return Err(Error::AlreadyMapped { va: s });
                        } else if !covered
                            && e & desc::VALID != 0
                            && (e ^ (eva.wrapping_add(delta) | bits | ty)) & !desc::CONTIGUOUS == 0
                        {
                            // A block that already maps the part asked for as asked,
                            // software bits included, stays: a split would rewrite the
                            // same translation (and unfold its group, `unfold_partial`).
                        } else if leaves_here && covered {
                            let mut new = eva.wrapping_add(delta) | bits | ty;
                            // The same mapping, software bits aside, keeps its
                            // contiguous hint (the hardware ignores software bits).
                            if (e ^ new) & !(desc::CONTIGUOUS | desc::SW_MASK) == 0 {
                                new |= e & desc::CONTIGUOUS;
                            }
                            if !DRY {
                                filled +=
                                    self.change(cx, tbl, i, e, new, level, eva, live, &mut bbm);
                            }
                        } else {
                            filled += self
                                .descend::<DRY>(cx, view, i, e, level, eva, s, t, live, &mut bbm)?;
                        }
                    }};
                }
                // Entries entirely inside the range: `lo..hi`.
                let (lo, hi) = whole_entries(va, end, base, shift, first, last);
                if !leaves_here || lo >= hi {
                    for i in first..=last {
                        if DRY && !leaves_here && level == 2 && matches!(view, View::Empty) {
                            // New level-3 tables under a new level-2 table: one frame each.
                            cx.frames_needed += last + 1 - first;
                            break;
                        }
                        general!(i);
                    }
                } else {
                    for i in first..lo {
                        general!(i);
                    }
                    // The hot loop: invalid entries become leaves, in order.
                    if !(DRY && matches!(view, View::Empty)) {
                        let mut d = (base + ((lo as u64) << shift)).wrapping_add(delta) | bits | ty;
                        // Whole groups of 16 that are empty get the contiguous hint:
                        // `ga..gb` (empty when none).
                        let (ga, gb) = if DRY {
                            (lo, lo)
                        } else {
                            hint_groups(lo, hi - 1, delta, level, contiguous)
                        };
                        // One entry the ordinary way: an invalid one becomes a leaf.
                        macro_rules! one {
                            ($i:expr) => {{
                                let i = $i;
                                let e = if DRY {
                                    view.read(i)
                                } else {
                                    // SAFETY: apply passes walk real table frames; `i`
                                    // is within them.
                                    unsafe { tbl.add(i).read() }
                                };
                                if e != 0 {
                                    general!(i);
                                } else if !DRY {
                                    // SAFETY: `tbl` is this table's frame, `i` within it.
                                    unsafe {
                                        if live {
                                            tbl.add(i).write_volatile(d);
                                        } else {
                                            tbl.add(i).write(d);
                                        }
                                    }
                                    filled += 1;
                                }
                                d = d.wrapping_add(size);
                            }};
                        }
                        for i in lo..ga {
                            one!(i);
                        }
                        let mut g = ga;
                        while g < gb {
                            let group = g..g + GROUP;
                            // SAFETY: `tbl` is this table's frame and the group lies
                            // within `lo..hi`.
                            let read = |k: usize| unsafe { tbl.add(k).read() };
                            let step = |k: usize| ((k - g) as u64) << shift;
                            if group
                                .clone()
                                .all(|k| read(k) == d.wrapping_add(step(k)) | desc::CONTIGUOUS)
                            {
                                // Already mapped so (REPLACE with the same mapping).
                                d = d.wrapping_add((GROUP as u64) << shift);
                            } else if group.clone().all(|k| read(k) == 0) {
                                for k in group {
                                    let h = d | desc::CONTIGUOUS;
                                    // SAFETY: as above.
                                    unsafe {
                                        if live {
                                            tbl.add(k).write_volatile(h);
                                        } else {
                                            tbl.add(k).write(h);
                                        }
                                    }
                                    d = d.wrapping_add(size);
                                }
                                filled += GROUP as i32;
                            } else {
                                for k in group {
                                    one!(k);
                                }
                            }
                            g += GROUP;
                        }
                        for i in gb.max(ga)..hi {
                            one!(i);
                        }
                    }
                    for i in hi..=last {
                        general!(i);
                    }
                }
                if !DRY && live {
                    cx.batch.wrote();
                }
            }
            Op::Unmap => {
                macro_rules! general {
                    ($i:expr) => {{
                        let i = $i;
                        let (eva, e, s, t, covered) = entry!(i);
                        if e & desc::VALID == 0 {
                        } else if is_table(e, level) && covered && e & desc::KEEP == 0 {
                            if !DRY {
                                self.detach(cx, tbl, i, e, level, eva, live, 0, &mut bbm);
                                filled -= 1;
                            }
                        } else if covered && !is_table(e, level) {
                            if !DRY {
                                filled += self.change(cx, tbl, i, e, 0, level, eva, live, &mut bbm);
                            }
                        } else {
                            filled += self
                                .descend::<DRY>(cx, view, i, e, level, eva, s, t, live, &mut bbm)?;
                        }
                    }};
                }
                if DRY {
                    // Only the end entries can be partly covered; the others need no frames.
                    general!(first);
                    if last != first {
                        general!(last);
                    }
                } else {
                    let (lo, hi) = whole_entries(va, end, base, shift, first, last);
                    for i in first..lo.min(last + 1) {
                        general!(i);
                    }
                    // Entries entirely inside the range.
                    for i in lo..hi {
                        if level == 2 && cx.batch.all() {
                            // Everything is invalidated at the end anyway: clear the
                            // entries and queue the level-3 tables, nothing to note.
                            cx.batch.wrote();
                            // Counters in locals: `cx` may not be kept in registers
                            // across the descriptor writes otherwise.
                            let (mut removed, mut queued) = (0, 0);
                            for j in i..hi {
                                // SAFETY: as below.
                                let e = unsafe { tbl.add(j).read() };
                                if e & desc::VALID == 0 {
                                    continue;
                                }
                                if e & desc::KEEP != 0 && e & 0b10 != 0 {
                                    // A held table stays: emptied, not removed.
                                    general!(j);
                                    continue;
                                }
                                // SAFETY: `tbl` is this table's frame, `j` within it.
                                unsafe { tbl.add(j).write_volatile(0) };
                                removed += 1;
                                if e & 0b10 != 0 {
                                    let n = cx.nfree + queued;
                                    if n < FREE_CHUNK {
                                        cx.free[n] = MaybeUninit::new(e & desc::OA_MASK);
                                        queued += 1;
                                    } else {
                                        // `queue_free` spills the chunk and counts.
                                        cx.nfree = n;
                                        cx.freed += queued;
                                        queued = 0;
                                        self.queue_free(cx, e & desc::OA_MASK);
                                    }
                                }
                            }
                            cx.nfree += queued;
                            cx.freed += queued;
                            filled -= removed;
                            break;
                        }
                        // SAFETY: apply passes walk real table frames; `i` is within.
                        let e = unsafe { tbl.add(i).read() };
                        if e & desc::VALID == 0 {
                            continue;
                        }
                        let eva = base + ((i as u64) << shift);
                        if is_table(e, level) && e & desc::KEEP != 0 {
                            general!(i);
                        } else if is_table(e, level) {
                            self.detach(cx, tbl, i, e, level, eva, live, 0, &mut bbm);
                            filled -= 1;
                        } else {
                            filled += self.change(cx, tbl, i, e, 0, level, eva, live, &mut bbm);
                        }
                    }
                    for i in hi.max(lo.min(last + 1))..=last {
                        general!(i);
                    }
                }
            }
            Op::Coalesce => {
                if DRY {
                    return Ok(0);
                }
                for i in first..=last {
                    let (eva, e, s, t, _) = entry!(i);
                    if is_table(e, level) {
                        filled +=
                            self.descend::<DRY>(cx, view, i, e, level, eva, s, t, live, &mut bbm)?;
                    }
                }
            }
            Op::TableAttrs { bits, level: at } => {
                if level > at {
                    // Below the entries that get the attributes: nothing to do (a new
                    // or split table is left as it is).
                    return Ok(0);
                }
                for i in first..=last {
                    let (eva, e, s, t, _) = entry!(i);
                    if bits == 0 && !is_table(e, level) {
                        // Clearing: no table here, so no attributes to clear.
                        continue;
                    }
                    if level < at || !is_table(e, level) {
                        // Down to the entries at `at`, creating the tables on the way
                        // (or splitting blocks: the leaves stay as they are).
                        filled +=
                            self.descend::<DRY>(cx, view, i, e, level, eva, s, t, live, &mut bbm)?;
                        continue;
                    }
                    if DRY {
                        continue;
                    }
                    let held = if bits != 0 { desc::HELD } else { 0 };
                    let new = (e & !(desc::TABLE_ATTRS | desc::HELD)) | bits | held;
                    if new == e {
                        continue;
                    }
                    if bits == 0 && desc::count(e) == 0 && e & desc::HELD_BELOW == 0 {
                        // An empty table whose attributes are cleared goes.
                        self.detach(cx, tbl, i, e, level, eva, live, 0, &mut bbm);
                        filled -= 1;
                        continue;
                    }
                    // SAFETY: `tbl` is this table's frame, `i` within it.
                    unsafe { tbl.add(i).write_volatile(new) };
                    if live && (e ^ new) & desc::TABLE_ATTRS != 0 {
                        // TLB entries combine the permissions of every table on their
                        // path, and walk caches hold this descriptor: invalidate
                        // everything below it (no break-before-make needed, as for a
                        // permission change of a leaf).
                        let span = level_size(level);
                        if !cx.batch.note_subtree(eva, span) {
                            if desc::count(e) == 0 {
                                cx.batch.note_table(eva, span);
                            } else {
                                cx.batch.invalidate_all();
                            }
                        }
                    } else if live {
                        cx.batch.wrote();
                    }
                }
            }
            Op::Protect { bits: new_bits, .. } | Op::SetSw { sw: new_bits } => {
                // Protect replaces every attribute bit; SetSw only the software bits.
                // A whole group keeps its contiguous hint (partly covered groups lost
                // it above): its 16 entries change alike.
                let keep = match cx.op {
                    Op::Protect { .. } => desc::OA_MASK | 0b11 | desc::CONTIGUOUS,
                    _ => !desc::SW_MASK,
                };
                macro_rules! general {
                    ($i:expr) => {{
                        let i = $i;
                        let (eva, e, s, t, covered) = entry!(i);
                        let new = (e & keep) | new_bits;
                        if e & desc::VALID == 0 {
                        } else if is_table(e, level) {
                            if !(DRY && covered) {
                                filled += self.descend::<DRY>(
                                    cx, view, i, e, level, eva, s, t, live, &mut bbm,
                                )?;
                            }
                        } else if new == e {
                        } else if covered {
                            if !DRY {
                                filled +=
                                    self.change(cx, tbl, i, e, new, level, eva, live, &mut bbm);
                            }
                        } else {
                            filled += self
                                .descend::<DRY>(cx, view, i, e, level, eva, s, t, live, &mut bbm)?;
                        }
                    }};
                }
                if DRY {
                    // Only the end entries can be partly covered; the others need no frames.
                    general!(first);
                    if last != first {
                        general!(last);
                    }
                } else {
                    let (lo, hi) = whole_entries(va, end, base, shift, first, last);
                    for i in first..lo.min(last + 1) {
                        general!(i);
                    }
                    // Leaves entirely inside the range: rewrite in place.
                    for i in lo..hi {
                        // SAFETY: apply passes walk real table frames; `i` is within.
                        let e = unsafe { tbl.add(i).read() };
                        if e & desc::VALID == 0 {
                            continue;
                        }
                        let new = (e & keep) | new_bits;
                        if is_table(e, level) || !live || (e ^ new) & desc::BBM_MASK != 0 {
                            general!(i);
                            continue;
                        }
                        if new == e {
                            continue;
                        }
                        // SAFETY: as above.
                        unsafe { tbl.add(i).write_volatile(new) };
                        if (e ^ new) & !desc::SW_MASK != 0 && !self.relaxes(cx, e, new) {
                            cx.batch.note(base + ((i as u64) << shift), level, true);
                        } else {
                            cx.batch.wrote();
                        }
                    }
                    for i in hi.max(lo.min(last + 1))..=last {
                        general!(i);
                    }
                }
            }
        }

        if !DRY && bbm {
            // Break-before-make, second half: the entries marked invalid in this run are
            // now out of every TLB; write their new values (Arm ARM D8.17.1).
            cx.batch.sync(&self.regime, self.context, &mut self.tlb);
            for i in first..=last {
                // SAFETY: `tbl` is this table's frame; `i` is within it.
                unsafe {
                    let p = tbl.add(i);
                    let d = p.read();
                    if d != 0 && d & desc::VALID == 0 {
                        p.write_volatile(d | desc::VALID);
                    }
                }
            }
            cx.batch.wrote();
        }
        Ok(filled)
    }

    /// Before an operation changes entries of the table `tbl` at `level` (entry 0 at
    /// `base`) in `va .. end` (entries `first..=last`): removes the contiguous hint
    /// from every group of 16 the change reaches only in part (only the groups of
    /// `first` and `last` can be), or, for table attributes at this level, from every
    /// group it reaches (its blocks become tables one by one). Under the hint a TLB
    /// may hold one entry for the 16, so a group must never mix old and new entries.
    /// Groups whose entries the operation leaves as they are keep the hint.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn unfold_partial(
        &mut self,
        cx: &mut Ctx,
        tbl: *mut u64,
        level: u8,
        base: u64,
        va: u64,
        end: u64,
        first: usize,
        last: usize,
        live: bool,
    ) {
        let all = match cx.op {
            // Without REPLACE nothing valid changes (a hinted group is valid
            // throughout, so any overlap with it is an error).
            Op::Map { replace, .. } if !replace => return,
            Op::Coalesce => return,
            // Software bits need no unfolding, only the split of a block does.
            Op::SetSw { .. } if level == 3 => return,
            Op::TableAttrs { level: at, .. } => at == level,
            _ => false,
        };
        let shift = level_shift(level);
        let size = level_size(level);
        let op = cx.op;
        // Whether the operation changes entry `k` (descriptor `e`) other than in its
        // software bits or as a whole group.
        let changes = |k: usize, e: u64| -> bool {
            if e & desc::VALID == 0 || is_table(e, level) {
                return false;
            }
            let eva = base + ((k as u64) << shift);
            let partial = va > eva || end < eva + size;
            match op {
                Op::Map { delta, bits, .. } => {
                    let ty = if level == 3 {
                        desc::TABLE_OR_PAGE
                    } else {
                        desc::BLOCK
                    };
                    let new = eva.wrapping_add(delta) | bits | ty;
                    // A partly covered block that already maps that part as asked,
                    // software bits included, is left as it is (`visit`).
                    let mask = if partial {
                        !desc::CONTIGUOUS
                    } else {
                        !(desc::CONTIGUOUS | desc::SW_MASK)
                    };
                    (e ^ new) & mask != 0
                }
                Op::Protect { bits, .. } => {
                    let new = (e & (desc::OA_MASK | 0b11 | desc::CONTIGUOUS)) | bits;
                    // A partly covered block is split (if it changes at all).
                    let mask = if partial { !0 } else { !desc::SW_MASK };
                    (e ^ new) & mask != 0
                }
                Op::SetSw { sw } => partial && (e & !desc::SW_MASK) | sw != e,
                _ => true,
            }
        };
        let (g0, g1) = (first & !(GROUP - 1), last & !(GROUP - 1));
        let mut g = g0;
        while g <= g1 {
            let gstart = base + ((g as u64) << shift);
            let gend = gstart + ((GROUP as u64) << shift);
            if all || va > gstart || end < gend {
                let (lo, hi) = (g.max(first), (g + GROUP).min(last + 1));
                // SAFETY: `tbl` is a table frame of this table; `k` is within
                // `first..=last`.
                if (lo..hi).any(|k| changes(k, unsafe { tbl.add(k).read() })) {
                    self.unfold(cx, tbl, g, level, gstart, live);
                }
            }
            g = if all || g == g1 { g + GROUP } else { g1 };
        }
    }

    /// Removes the contiguous hint from the group of 16 entries from `g` (at `level`,
    /// entry `g` at input address `gva`), with break-before-make: all of it invalid,
    /// invalidated, then written back without the hint (Arm ARM D8.17.1 lists the
    /// Contiguous bit among the changes that need it).
    #[cold]
    #[inline(never)]
    fn unfold(&mut self, cx: &mut Ctx, tbl: *mut u64, g: usize, level: u8, gva: u64, live: bool) {
        // The group `g..g + GROUP` lies within the table frame `tbl` of this table
        // (groups are aligned and tables hold a multiple of 16 entries).
        // SAFETY: as just said.
        let entry = |k: usize| unsafe { tbl.add(k) };
        // SAFETY: `entry(k)` is an entry of a table frame of this table.
        if !(g..g + GROUP).any(|k| unsafe { entry(k).read() } & desc::CONTIGUOUS != 0) {
            return;
        }
        for k in g..g + GROUP {
            let p = entry(k);
            // SAFETY: as above.
            let e = unsafe { p.read() };
            if !live {
                // SAFETY: as above; nobody walks this table yet.
                unsafe { p.write(e & !desc::CONTIGUOUS) };
            } else if e & desc::VALID != 0 {
                // SAFETY: as above.
                unsafe { p.write_volatile(e & !(desc::CONTIGUOUS | desc::VALID)) };
                let va = gva + (((k - g) as u64) << level_shift(level));
                cx.batch.note(va, level, true);
            }
        }
        if !live {
            return;
        }
        cx.batch.sync(&self.regime, self.context, &mut self.tlb);
        for k in g..g + GROUP {
            let p = entry(k);
            // SAFETY: as above.
            let e = unsafe { p.read() };
            if e != 0 && e & desc::VALID == 0 {
                // SAFETY: as above.
                unsafe { p.write_volatile(e | desc::VALID) };
            }
        }
        cx.batch.wrote();
    }

    /// Handles entry `i` (descriptor `e`) of a table at `level` by working in the
    /// next-level table: the existing one, a new empty one, or one split from a block.
    /// Afterwards decides the entry's new value: the table, a merged block, or
    /// nothing (the table became empty).
    #[allow(clippy::too_many_arguments)]
    fn descend<const DRY: bool>(
        &mut self,
        cx: &mut Ctx,
        view: View,
        i: usize,
        e: u64,
        level: u8,
        eva: u64,
        s: u64,
        t: u64,
        live: bool,
        bbm: &mut bool,
    ) -> Result<i32, Error> {
        let cl = level + 1;
        if DRY {
            let child = if is_table(e, level) {
                View::Real(self.ptr(e & desc::OA_MASK))
            } else {
                cx.frames_needed += 1;
                if e == 0 {
                    View::Empty
                } else {
                    View::Split { desc: e, level: cl }
                }
            };
            self.visit::<true>(cx, child, cl, eva, s, t, false)?;
            return Ok(0);
        }
        let tbl = match view {
            View::Real(p) => p,
            _ => return Ok(0),
        };
        let was_table = is_table(e, level);
        let (child_pa, child_live) = if was_table {
            (e & desc::OA_MASK, live)
        } else {
            let Some(pa) = self.take_frame(cx) else {
                return Err(Error::OutOfFrames);
            };
            if e != 0 {
                let p = self.ptr(pa);
                for j in 0..ENTRIES {
                    // SAFETY: `p` is the fresh frame just taken, 512 entries.
                    unsafe { p.add(j).write(split_entry(e, cl, j)) };
                }
            }
            (pa, false)
        };
        let cp = self.ptr(child_pa);
        let filled = self.visit::<false>(cx, View::Real(cp), cl, eva, s, t, child_live)?;

        // The child's count of non-zero entries: kept in the descriptor, so no
        // operation scans a table to learn whether it became empty or full. A block
        // split under `map` stays full (its entries are only replaced).
        let count = if was_table {
            desc::count(e) as i32 + filled
        } else if e == 0 {
            filled
        } else if matches!(cx.op, Op::Map { .. }) {
            ENTRIES as i32
        } else {
            ENTRIES as i32 + filled
        };
        debug_assert!((0..=ENTRIES as i32).contains(&count), "entry count {count}");
        // Marks and table attributes stay with the table.
        let mut keep = if was_table { e & desc::TABLE_KEEP } else { 0 };
        if cl == 3 && matches!(cx.op, Op::Map { blocks: false, .. }) {
            keep |= desc::PINNED;
        }
        if let Op::TableAttrs { bits, level: at } = cx.op {
            if level == at {
                // A table created or split to carry the attributes.
                keep |= bits | if bits != 0 { desc::HELD } else { 0 };
            } else {
                // Whether a held table is left below this one.
                keep &= !desc::HELD_BELOW;
                if (0..ENTRIES).any(|j| {
                    // SAFETY: `cp` is the child table's frame, 512 entries.
                    let d = unsafe { cp.add(j).read() };
                    is_table(d, cl) && d & desc::KEEP != 0
                }) {
                    keep |= desc::HELD_BELOW;
                }
            }
        }
        let table_desc =
            child_pa | keep | ((count as u64) << desc::COUNT_SHIFT) | desc::TABLE_OR_PAGE;
        let mut new = table_desc;
        match cx.op {
            Op::Unmap | Op::TableAttrs { .. } if count == 0 && keep & desc::KEEP == 0 => {
                new = 0;
            }
            Op::Map {
                blocks: true,
                merge: true,
                ..
            }
            | Op::Coalesce
                if level >= 1
                    && keep & (desc::PINNED | desc::KEEP) == 0
                    && count == ENTRIES as i32 =>
            {
                // `coalesce` merges only tables its range covers whole.
                let whole = s == eva && t == eva + level_size(level);
                if matches!(cx.op, Op::Map { .. }) || whole {
                    if let Some(block) = uniform(cp, cl) {
                        new = block;
                    }
                }
            }
            _ => {}
        }
        if was_table && new == table_desc {
            // The same table: at most its count or marks changed, bits the hardware
            // ignores (no maintenance, Arm ARM D8.3.1); its table attributes are kept.
            if new != e {
                // SAFETY: `tbl` is this table's frame, `i` within it.
                unsafe { tbl.add(i).write_volatile(new) };
            }
            return Ok(0);
        }
        // `change` learns from the old descriptor's count whether the table being
        // replaced still holds leaves: give it the count after this operation.
        let old = if was_table { table_desc } else { e };
        let filled = self.change(cx, tbl, i, old, new, level, eva, live, bbm);
        if new != table_desc {
            // The child is unreachable once the maintenance for this change is done;
            // it is freed after the operation's final TLB synchronisation.
            self.queue_free(cx, child_pa);
        }
        Ok(filled)
    }

    /// Removes the table below entry `i` (table descriptor `e`) and puts `new` in its
    /// place (0 to unmap, or a block): notes the invalidation of every leaf and table
    /// entry below it and queues the subtree's frames for freeing. A block is written
    /// with break-before-make (an invalid marker now, made valid once the run's
    /// invalidations are complete, see `bbm`).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn detach(
        &mut self,
        cx: &mut Ctx,
        tbl: *mut u64,
        i: usize,
        e: u64,
        level: u8,
        eva: u64,
        live: bool,
        new: u64,
        bbm: &mut bool,
    ) {
        // SAFETY: `tbl` is a table frame owned by this table, `i` within it.
        let p = unsafe { tbl.add(i) };
        if live {
            // SAFETY: as above.
            unsafe { p.write_volatile(new & !desc::VALID) };
            if new != 0 {
                *bbm = true;
            }
        } else {
            // SAFETY: as above; nobody walks this table yet.
            unsafe { p.write(new) };
        }
        let child = e & desc::OA_MASK;
        // With range invalidation the whole span goes in one note: no leaf to visit.
        let spanned = live && cx.batch.note_subtree(eva, level_size(level));
        let live = live && !spanned;
        if level == 2 && (!live || cx.batch.all()) {
            // A level-3 table whose leaves need no individual invalidation.
            self.queue_free(cx, child);
        } else {
            self.detach_table(cx, child, level + 1, eva, live);
        }
        if live {
            cx.batch.note_table(eva, level_size(level));
        }
    }

    /// Notes the leaves of the detached table at `pa` (entries at `level`, entry 0 at
    /// `base`) for invalidation and queues it and its subtables for freeing.
    fn detach_table(&mut self, cx: &mut Ctx, pa: u64, level: u8, base: u64, live: bool) {
        let p = self.ptr(pa);
        if level < 3 || (live && !cx.batch.all()) {
            let shift = level_shift(level);
            for j in 0..ENTRIES {
                // SAFETY: `p` is a table frame of 512 entries.
                let d = unsafe { p.add(j).read() };
                if d & desc::VALID == 0 {
                    continue;
                }
                let va = base + ((j as u64) << shift);
                if is_table(d, level) {
                    self.detach_table(cx, d & desc::OA_MASK, level + 1, va, live);
                    // Walk caches may hold this entry for any address it covers; a
                    // non-leaf invalidation of one of them removes it.
                    if live {
                        cx.batch.note_table(va, level_size(level));
                    }
                } else if live {
                    cx.batch.note(va, level, true);
                    if level == 3 && cx.batch.all() {
                        // Everything is invalidated anyway; no subtables at level 3.
                        break;
                    }
                }
            }
        }
        self.queue_free(cx, pa);
    }

    /// Replaces descriptor `old` at entry `i` of `tbl` with `new`, doing what the
    /// architecture requires for a table that may be live.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn change(
        &mut self,
        cx: &mut Ctx,
        tbl: *mut u64,
        i: usize,
        old: u64,
        new: u64,
        level: u8,
        eva: u64,
        live: bool,
        bbm: &mut bool,
    ) -> i32 {
        if old == new {
            return 0;
        }
        let filled = i32::from(new != 0) - i32::from(old != 0);
        // SAFETY: `tbl` is a table frame owned by this table, `i` within it.
        let p = unsafe { tbl.add(i) };
        if !live {
            // SAFETY: as above; nobody walks this table yet.
            unsafe { p.write(new) };
            return filled;
        }
        if is_table(new, level) {
            // Publish the next-level table's contents before the pointer to it.
            fence(Ordering::Release);
        }
        if old & desc::VALID == 0 {
            // Invalid -> valid needs no invalidation (no TLB can hold an invalid entry).
            // SAFETY: as above.
            unsafe { p.write_volatile(new) };
            cx.batch.wrote();
            return filled;
        }
        let old_leaf = !is_table(old, level);
        if !old_leaf {
            // A table goes away: its walk-cache entry and every leaf below it.
            let cl = level + 1;
            // Only a merge replaces a table that still has leaves (`unmap` removes
            // tables once they are empty).
            let has_leaves = new != 0 && desc::count(old) != 0;
            if has_leaves {
                cx.batch.note_many(eva, cl, ENTRIES, true);
            }
            cx.batch.note_table(eva, level_size(level));
        }
        if new == 0 {
            // SAFETY: as above.
            unsafe { p.write_volatile(0) };
            if old_leaf {
                cx.batch.note(eva, level, true);
            }
        } else if (old ^ new) & desc::BBM_MASK != 0 {
            // Break-before-make, first half: invalid marker that keeps the new value;
            // the caller synchronises the TLBs, then sets the valid bit.
            // SAFETY: as above.
            unsafe { p.write_volatile(new & !desc::VALID) };
            if old_leaf {
                cx.batch.note(eva, level, true);
            }
            *bbm = true;
        } else {
            // SAFETY: as above.
            unsafe { p.write_volatile(new) };
            if (old ^ new) & !desc::SW_MASK != 0 && !(old_leaf && self.relaxes(cx, old, new)) {
                cx.batch.note(eva, level, true);
            } else {
                cx.batch.wrote();
            }
        }
        filled
    }

    /// Whether `cx` is a [`Self::relax`] and changing leaf `old` to `new` (same memory
    /// type: the caller checked `BBM_MASK`) only adds access, so that no CPU needs the
    /// old entry invalidated. A change that takes any permission away is invalidated as
    /// [`Self::protect`] would, whatever the caller said.
    fn relaxes(&self, cx: &mut Ctx, old: u64, new: u64) -> bool {
        if !matches!(cx.op, Op::Protect { relax: true, .. }) {
            return false;
        }
        let (o, n) = (old & !desc::OA_MASK, new & !desc::OA_MASK);
        if let Some((po, pn, widens)) = cx.widened {
            if (po, pn) == (o, n) {
                return widens;
            }
        }
        let widens = self
            .regime
            .decode(new)
            .perms
            .contains(self.regime.decode(old).perms);
        cx.widened = Some((o, n, widens));
        widens
    }

    /// Looks up `va`.
    #[must_use]
    #[inline]
    pub fn translate(&self, va: u64) -> Option<Translation> {
        if va >> self.geo.input_bits() != 0 {
            return None;
        }
        let mut shift = self.root_shift;
        // SAFETY: the root has `input size >> shift` entries and `va` is below the
        // input size.
        let mut e = unsafe { self.ptr(self.root).add((va >> shift) as usize).read() };
        // Table descriptors above level 3: go down. Outside an operation every entry is
        // either 0 or valid, so bit 1 alone identifies a table.
        while e & 0b10 != 0 && shift > 12 {
            shift -= 9;
            let next = self.ptr(e & desc::OA_MASK);
            // SAFETY: `next` is a table frame of this table; the index is below 512.
            e = unsafe { next.add(((va >> shift) & 511) as usize).read() };
        }
        if e & desc::VALID == 0 {
            return None;
        }
        let attrs = self.regime.decode(e);
        Some(Translation {
            output: (e & desc::OA_MASK & (u64::MAX << shift)) | (va & ((1 << shift) - 1)),
            attrs,
            level: (3 - (shift - 12) / 9) as u8,
            sw_bits: attrs.sw,
        })
    }

    /// Calls `f` for every leaf intersecting `va .. va + size`, in address order.
    ///
    /// # Errors
    /// [`Error::Misaligned`], [`Error::OutOfRange`].
    pub fn walk<F: FnMut(&Mapping)>(&self, va: u64, size: u64, mut f: F) -> Result<(), Error> {
        let end = self.check_range(va, size)?;
        if size > 0 {
            self.walk_table(
                self.ptr(self.root),
                self.geo.start_level(),
                0,
                va,
                end,
                &mut f,
            );
        }
        Ok(())
    }

    fn walk_table<F: FnMut(&Mapping)>(
        &self,
        tbl: *mut u64,
        level: u8,
        base: u64,
        va: u64,
        end: u64,
        f: &mut F,
    ) {
        let shift = level_shift(level);
        let first = ((va - base) >> shift) as usize;
        let last = ((end - 1 - base) >> shift) as usize;
        for i in first..=last {
            // SAFETY: `tbl` is a table frame of this table, `i` within its entries.
            let e = unsafe { tbl.add(i).read() };
            let eva = base + ((i as u64) << shift);
            if e & desc::VALID == 0 {
                continue;
            }
            if is_table(e, level) {
                let size = level_size(level);
                self.walk_table(
                    self.ptr(e & desc::OA_MASK),
                    level + 1,
                    eva,
                    va.max(eva),
                    end.min(eva + size),
                    f,
                );
            } else {
                f(&Mapping {
                    va: eva,
                    size: level_size(level),
                    output: e & desc::OA_MASK,
                    attrs: self.regime.decode(e),
                    level,
                });
            }
        }
    }

    fn free_subtree(&mut self, pa: u64, level: u8) {
        if level < 3 {
            let p = self.ptr(pa);
            for j in 0..ENTRIES {
                // SAFETY: `p` is a table frame of this table.
                let e = unsafe { p.add(j).read() };
                if is_table(e, level) {
                    self.free_subtree(e & desc::OA_MASK, level + 1);
                }
            }
        }
        self.alloc.free_frame(pa);
        self.frames -= 1;
    }
}

/// If the table at `cp` (entries at `level`) maps one contiguous, aligned range with
/// identical attributes, the block descriptor (one level up) that replaces it.
fn uniform(cp: *mut u64, level: u8) -> Option<u64> {
    // SAFETY: `cp` is a table frame of 512 entries.
    let first = unsafe { cp.read() };
    let ty = if level == 3 {
        desc::TABLE_OR_PAGE
    } else {
        desc::BLOCK
    };
    if first & 0b11 != ty || first & desc::OA_MASK & (level_size(level - 1) - 1) != 0 {
        return None;
    }
    let step = level_size(level);
    let mut want = first & !desc::CONTIGUOUS;
    for j in 1..ENTRIES {
        want += step;
        // SAFETY: as above. The contiguous hint of groups inside does not matter.
        if unsafe { cp.add(j).read() } & !desc::CONTIGUOUS != want {
            return None;
        }
    }
    Some((first & !(0b11 | desc::CONTIGUOUS)) | desc::BLOCK)
}

impl<R: Regime, A: FrameAllocator, T: TlbMaintenance> Drop for PageTable<R, A, T> {
    /// Invalidates everything the table may have in the TLBs, then frees all frames.
    /// The table must no longer be installed in any translation register.
    fn drop(&mut self) {
        let mut batch = TlbBatch::new(1, false);
        batch.invalidate_all();
        batch.sync(&self.regime, self.context, &mut self.tlb);
        let root = self.ptr(self.root);
        let level = self.geo.start_level();
        for j in 0..self.geo.root_entries() {
            // SAFETY: `root` is the root frame(s), `j` below the root entry count.
            let e = unsafe { root.add(j).read() };
            if is_table(e, level) {
                self.free_subtree(e & desc::OA_MASK, level + 1);
            }
        }
        let n = usize::from(self.geo.root_tables());
        self.alloc.free_contiguous(self.root, n);
        self.frames -= n;
    }
}

fn perms_str(p: Permissions) -> [u8; 6] {
    let f = |flag, c| if p.contains(flag) { c } else { b'-' };
    [
        f(Permissions::READ, b'r'),
        f(Permissions::WRITE, b'w'),
        f(Permissions::EXEC_EL2, b'2'),
        f(Permissions::EXEC_EL1, b'1'),
        f(Permissions::EXEC_EL0, b'0'),
        f(Permissions::USER, b'u'),
    ]
}

/// A ptdump-like listing: one line per run of leaves with the same level and
/// attributes mapping contiguous input to contiguous output.
impl<R: Regime, A: FrameAllocator, T: TlbMaintenance> fmt::Display for PageTable<R, A, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} table root {:#x}: {}-bit input, start level {}, {} root table(s), {} frame(s)",
            R::NAME,
            self.root,
            self.geo.input_bits(),
            self.geo.start_level(),
            self.geo.root_tables(),
            self.frames
        )?;
        let mut run: Option<(Mapping, u64)> = None;
        let mut res = Ok(());
        let emit = |m: &Mapping, count: u64, f: &mut fmt::Formatter<'_>| -> fmt::Result {
            let size = m.size * count;
            let unit = match m.level {
                1 => "1G",
                2 => "2M",
                _ => "4K",
            };
            let p = perms_str(m.attrs.perms);
            writeln!(
                f,
                "{:#018x}-{:#018x} -> {:#014x} {:>5} x {} L{} {} {:?} sw={:#x}",
                m.va,
                m.va + size,
                m.output,
                count,
                unit,
                m.level,
                core::str::from_utf8(&p).unwrap_or("?"),
                m.attrs.mem_type,
                m.attrs.sw.bits()
            )
        };
        let _ = self.walk(0, self.geo.input_size(), |m| {
            if res.is_err() {
                return;
            }
            if let Some((r, n)) = &mut run {
                if r.level == m.level
                    && r.attrs == m.attrs
                    && r.va + r.size * *n == m.va
                    && r.output + r.size * *n == m.output
                {
                    *n += 1;
                    return;
                }
                let (r, n) = (*r, *n);
                res = emit(&r, n, f);
            }
            run = Some((*m, 1));
        });
        res?;
        if let Some((r, n)) = run {
            emit(&r, n, f)?;
        }
        Ok(())
    }
}

impl<R: Regime, A: FrameAllocator, T: TlbMaintenance> fmt::Debug for PageTable<R, A, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageTable")
            .field("regime", &R::NAME)
            .field("root", &self.root)
            .field("geometry", &self.geo)
            .field("frames", &self.frames)
            .finish()
    }
}

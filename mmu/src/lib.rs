//! VMSAv8-64 translation tables (4 KiB granule) for three regimes behind one API:
//!
//! | regime type | tables for | registers | tagged by |
//! |---|---|---|---|
//! | [`El2`] | the hypervisor's own address space (EL2 stage 1, non-VHE) | `TTBR0_EL2`, `TCR_EL2`, `MAIR_EL2` | — |
//! | [`Stage2`] | a guest's IPA → PA translation | `VTTBR_EL2`, `VTCR_EL2` | VMID |
//! | [`El1`] | an EL1&0 stage 1 (`TTBR0_EL1`) | `TTBR0_EL1`, `TCR_EL1`, `MAIR_EL1` | ASID |
//!
//! A [`PageTable<R, A, T>`](PageTable) is generic over the regime `R`, the source of
//! table frames `A` ([`FrameAllocator`] + [`PhysToVirt`]) and the TLB maintenance `T`
//! ([`TlbMaintenance`]). The crate is `no_std` and allocates nothing itself.
//!
//! # Example
//!
//! ```
//! use mmu::testing::{HeapFrames, RecordingTlb};
//! use mmu::{Attributes, MapFlags, MemoryType, PageTable, Permissions, Stage2, TlbOp};
//!
//! // Stage 2 for VMID 7 with a 40-bit IPA space: 2 concatenated level-1 root tables.
//! let mut s2 = PageTable::new(Stage2::new(7, 40), HeapFrames::new(), RecordingTlb::new())?;
//! assert_eq!(s2.geometry().root_tables(), 2);
//!
//! // 4 MiB of guest RAM at IPA 0x4000_0000 -> PA 0x8000_0000: two 2 MiB blocks.
//! let ram = Attributes::new(
//!     Permissions::RW | Permissions::EXEC_EL1 | Permissions::EXEC_EL0,
//!     MemoryType::Normal,
//! );
//! s2.map(0x4000_0000, 0x8000_0000, 0x40_0000, ram, MapFlags::empty())?;
//! let t = s2.translate(0x4030_1234).unwrap();
//! assert_eq!((t.output, t.level), (0x8030_1234, 2));
//! // Mapping invalid entries needs no TLB invalidation.
//! assert!(s2.tlb().invalidations().is_empty());
//!
//! // Unmapping one page splits its block (break-before-make) and invalidates that
//! // IPA for VMID 7 only.
//! s2.unmap(0x4020_0000, 0x1000)?;
//! assert!(s2.translate(0x4020_0000).is_none());
//! assert_eq!(s2.translate(0x4020_1000).unwrap().level, 3);
//! assert!(s2.tlb().invalidations().iter().all(|op| matches!(op,
//!     TlbOp::Stage2Ipa { vmid: 7, .. } | TlbOp::Stage2Stage1All { vmid: 7, .. })));
//!
//! // Register values for the hypervisor to load (VMID in VTTBR_EL2[63:48]).
//! assert_eq!(s2.vttbr_el2() >> 48, 7);
//! # Ok::<(), mmu::Error>(())
//! ```
//!
//! The hypervisor's own EL2 table, with a dump and a walk:
//!
//! ```
//! use mmu::testing::{HeapFrames, RecordingTlb};
//! use mmu::{Attributes, El2, MapFlags, PageTable, Permissions, SwBits};
//!
//! let mut hyp = PageTable::new(El2::new(39), HeapFrames::new(), RecordingTlb::new())?;
//! let text = Attributes::normal(Permissions::READ | Permissions::EXEC_EL2);
//! let data = Attributes::normal(Permissions::RW).with_sw(SwBits::new(1).unwrap());
//! // W^X checked by the crate; pages only for memory the hypervisor runs from.
//! hyp.map(0x4020_0000, 0x4020_0000, 0x4000, text, MapFlags::WXN | MapFlags::NO_BLOCKS)?;
//! hyp.map(0x4020_4000, 0x4020_4000, 0x2000, data, MapFlags::WXN | MapFlags::NO_BLOCKS)?;
//! hyp.map(0x0900_0000, 0x0900_0000, 0x1000, Attributes::device(), MapFlags::empty())?;
//!
//! let mut pages = 0;
//! hyp.walk(0x4020_0000, 0x6000, |m| {
//!     assert_eq!(m.level, 3);
//!     pages += 1;
//! })?;
//! assert_eq!(pages, 6);
//! // One line per run: input range, output, count x size, level, permissions
//! // (r w, execute at EL2/EL1/EL0, u = EL0 access), memory type, software bits.
//! let dump = hyp.to_string();
//! assert!(dump.contains("0x0000000040200000-0x0000000040204000 -> 0x000040200000     4 x 4K L3 r-2--- Normal sw=0x0"));
//! assert!(dump.contains("2 x 4K L3 rw---- Normal sw=0x1"));
//! // Values for TCR_EL2 / TTBR0_EL2 / MAIR_EL2 (`activate()` with `arm-el2`).
//! assert_eq!(hyp.tcr_el2() & 0x3F, 64 - 39);
//! # Ok::<(), mmu::Error>(())
//! ```
//!
//! # Attributes
//!
//! [`Attributes`] are regime-neutral: [`Permissions`] (read, write, execute at
//! EL2/EL1/EL0, EL0 access), a [`MemoryType`] and four software bits ([`SwBits`],
//! descriptor bits \[58:55\], ignored by the hardware and returned by
//! [`PageTable::translate`] and [`PageTable::walk`]). Each regime encodes them in its own
//! descriptor format; a combination the regime cannot express (write-only in a
//! stage-1 regime, separate EL1/EL0 execute permission on stage 2 without FEAT_XNX,
//! EL0-writable and EL1-executable at EL1&0, ...) is rejected with
//! [`Error::UnsupportedAttributes`], never silently changed. The stage-1 regimes
//! use [`MAIR_VALUE`] for `MAIR_ELx` ([`MAIR_VALUE_TAGGED`] on a CPU with FEAT_MTE2,
//! for [`MemoryType::NormalTagged`] mappings to hold allocation tags).
//!
//! # Operations and their guarantees
//!
//! [`map`](PageTable::map), [`unmap`](PageTable::unmap), [`protect`](PageTable::protect),
//! [`set_sw_bits`](PageTable::set_sw_bits) and [`coalesce`](PageTable::coalesce) work on 4 KiB-aligned ranges and are
//! **transactional**: each first walks the range without changing anything, checking
//! for errors and counting the table frames it will need, then reserves those frames
//! from the allocator; only then does it change the table. A failing operation
//! returns an [`Error`] and leaves both the table and the allocator as they were.
//!
//! - Blocks (1 GiB at level 1, 2 MiB at level 2) are used when input and output are
//!   aligned and the range covers them, unless [`MapFlags::NO_BLOCKS`]. A table that
//!   `map` makes uniform (one aligned contiguous range, identical attributes) is
//!   merged back into a block.
//! - The contiguous hint (bit 52, Arm ARM D8.7.1) is set on every aligned group of 16
//!   entries (64 KiB of pages, 32 MiB of 2 MiB blocks) that one `map` call fills from
//!   empty with one contiguous, equally aligned output range, unless
//!   [`MapFlags::NO_CONTIGUOUS`]. A TLB may then hold one entry for the 16, so before
//!   any operation changes part of such a group (unmap, protect, a REPLACE, a split)
//!   the hint is removed from all 16 with break-before-make; an operation that
//!   changes the whole group alike (protect, unmap) keeps it or removes the group.
//! - Unmapping or protecting part of a block splits it. Tables left empty by `unmap`
//!   are freed — after the TLB invalidation that guarantees no walker still uses them.
//! - Stage 2 uses concatenated root tables (up to 16) to save a level where possible,
//!   never at level 0; see [`Geometry::stage2`].
//!
//! # Live tables, break-before-make and TLB obligations
//!
//! Every table is treated as live (possibly in use by hardware on any PE). When a
//! valid entry changes in a way the architecture requires break-before-make for
//! (output address, memory type, shareability, block ↔ table; Arm ARM D8.17), the
//! crate writes an invalid entry, issues `DSB ISHST`, the TLB invalidation and
//! `DSB ISH`, then writes the new entry. During that window the affected range
//! faults: on stage 2 the guest takes a stage-2 fault the hypervisor should simply
//! retry; on a live EL2 table the hypervisor must not touch the range (don't split
//! blocks holding the running code, stack or the tables themselves — map those with
//! [`MapFlags::NO_BLOCKS`]).
//!
//! Before any operation returns, all TLB maintenance it needs has been executed via
//! [`TlbMaintenance::execute`], as complete sequences (barriers included):
//!
//! - entries that were invalid and became valid: `DSB ISHST; ISB` only, no TLBI;
//! - entries whose permissions [`PageTable::relax`] widened in place: no TLBI either; a
//!   PE that still holds the narrower entry faults, and its handler invalidates its own
//!   TLB (non-shareable) before it runs the access again;
//! - EL2: `TLBI VALE2IS` per changed leaf, `VAE2IS` where a table entry was removed
//!   (one non-leaf invalidation of the last changed address below a removed table
//!   covers both the leaf and the walk-cache entry, so none is issued twice);
//! - stage 2: `TLBI IPAS2LE1IS`/`IPAS2E1IS` per changed entry, then `DSB ISH;
//!   TLBI VMALLE1IS`, with the table's `VTTBR_EL2` (VMID) and `VTCR_EL2` (VMID size)
//!   current: each sequence carries them ([`TlbContext`]) and `arch::ArmTlb` switches
//!   both registers temporarily when needed;
//! - EL1&0: `TLBI VALE1IS`/`VAE1IS` with the ASID;
//! - more than the threshold ([`PageTable::set_tlbi_threshold`], default
//!   [`DEFAULT_TLBI_THRESHOLD`]) per-entry invalidations in one *batch* are replaced
//!   by one whole-regime invalidation (`ALLE2IS`, `VMALLS12E1IS`, `ASIDE1IS`). A batch
//!   is the maintenance that runs together: the end of the operation, and before it
//!   each run of entries of one table that needs break-before-make (their
//!   invalidation must complete before the new entries are written). An operation
//!   that changes many tables with break-before-make (e.g. `protect` changing the
//!   memory type of blocks under 40 tables) therefore issues up to one batch per
//!   table, each with its own threshold. Each
//!   broadcast TLBI costs a round of DVM messages to every PE, while a whole-VM
//!   invalidation costs the VM its TLB contents; 32 keeps page-sized changes precise
//!   and turns anything of megabyte size into one invalidation. It is a per-table
//!   setting because the right value depends on the machine;
//! - with range invalidation ([`PageTable::set_tlbi_range`], for CPUs with
//!   FEAT_TLBIRANGE; `arch::has_tlbi_range` (feature `arm-el2`) tells), contiguous changes
//!   are one run each, invalidated by `TLBI RVALE2IS`/`RVAE2IS`, `RIPAS2LE1IS`/
//!   `RIPAS2E1IS` or `RVALE1IS`/`RVAE1IS` ([`range_operands`] encodes them), and the
//!   threshold counts the instructions the runs take ([`range_steps`]: one for a run of
//!   up to 8 GiB, more for longer ones): unmapping a gigabyte of pages is one range
//!   instruction (the removed tables' leaves are not even visited) instead of a
//!   whole-regime invalidation, and unmapping terabytes, which would take hundreds of
//!   range instructions, is one whole-regime
//!   invalidation. A block is always covered as a whole;
//! - software-bit-only changes need no invalidation (but splitting a block to change
//!   part of it is a break-before-make change and is invalidated).
//!
//! Dropping a table invalidates its whole regime/VMID/ASID, then frees its frames; it
//! must not be installed in a translation register any more. After a [`Stage2`] table
//! is dropped its VMID holds no stale entries and can be given to another VM.
//!
//! `protect` and `set_sw_bits` skip holes and never merge tables into blocks (only
//! `map` merges; [`coalesce`](PageTable::coalesce) merges on request). EL1&0 entries
//! are always non-global (tagged with the table's ASID).
//! The `El1Va`/`El1Asid` operations are meant for code running at EL1 (executed at
//! EL2 they would apply to the current VMID).
//!
//! # Frames and sharing
//!
//! Table frames come from a [`FrameAllocator`] (zeroed 4 KiB frames; contiguous,
//! aligned runs for concatenated stage-2 roots) and are reached through
//! [`PhysToVirt`] (the identity in an identity-mapped hypervisor, a simulated
//! physical memory on the host). Both traits are `unsafe` to implement: the crate
//! writes through the pointers they give without further checks, so their contracts
//! are what keeps its safe API sound. Every frame is checked against the table's
//! output address size ([`Error::InvalidFrame`]). A table owns its allocator *value*: to give one pool to many tables
//! (the EL2 table and one stage 2 per VM) implement the traits for a cheap handle,
//! as `&testing::HeapFrames` does. [`PageTable::frames_in_use`] counts the frames
//! a table owns, root included.
//!
//! # Performance
//!
//! Each operation walks its range once per pass, descending only where needed and
//! filling runs of entries of one table in a tight loop (no per-page allocation,
//! no dynamic dispatch: the regime, allocator and TLB types are generic parameters);
//! TLB maintenance is decided once per operation. Single-page maps of invalid entries
//! take a shorter path (one walk, missing tables built off-line and published with
//! one write). `translate` is one loop over at most four levels.
//!
//! # Features
//!
//! - `std`: the `testing` module (heap frame allocator, recording TLB).
//! - `arm-el2` (aarch64 only): the `arch` module with `asm!` TLB maintenance and
//!   `activate` functions writing `TTBR0_EL2`/`TCR_EL2`/`MAIR_EL2` and
//!   `VTTBR_EL2`/`VTCR_EL2`. Everything else builds and is tested without it.
#![no_std]
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

mod attrs;
mod desc;
mod error;
mod frame;
mod regime;
mod regs;
mod table;
mod tlb;

#[cfg(all(feature = "arm-el2", target_arch = "aarch64"))]
pub mod arch;
#[cfg(feature = "std")]
pub mod testing;

pub use attrs::{
    Attributes, MapFlags, MemoryType, Permissions, SwBits, TableAttrs, MAIR_VALUE,
    MAIR_VALUE_TAGGED,
};
pub use error::Error;
pub use frame::{FrameAllocator, FrameSource, IdMap, LinearMap, PhysToVirt, FRAME_SIZE};
pub use regime::{El1, El2, Geometry, Regime, Stage2};
pub use table::{Mapping, PageTable, Translation};
pub use tlb::{
    range_operand, range_operands, range_steps, tlbi_operand, tlbi_range_supported, ttl_supported,
    NoTlbMaintenance, RangeStep, TlbContext, TlbMaintenance, TlbOp, TlbSequence,
    DEFAULT_TLBI_THRESHOLD, MAX_RANGE_PAGES, MAX_TLBI_BATCH,
};

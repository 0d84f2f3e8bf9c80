//! The window through which EL2 reaches guest RAM.
//!
//! The hypervisor's stage 1 does not map the guest RAM pool ([`crate::mem::stage1::plan`]):
//! a bug or a speculative gadget at EL2 cannot reach a VM's memory through it. The few
//! places that must touch guest RAM (scrubbing it, copying images into it, cleaning it to
//! the point of coherency for a guest's set/way maintenance) do so through this window,
//! one chunk at a time: the chunk is mapped at EL2, the work done, the chunk unmapped
//! again (with its TLB invalidation) before the next one is mapped.
//!
//! Layout: the window owns one 1 GiB-aligned, otherwise unused region of the EL2 virtual
//! address space ([`SPAN`], chosen by [`crate::mem::stage1::window_base`]), made
//! execute-never as a whole (XNTable). Each CPU has a slot of two 2 MiB halves:
//!
//! - the *block* half takes a chunk that is a whole, aligned 2 MiB of guest RAM as one
//!   level-2 block (mapped with one descriptor, invalidated with one `TLBI VALE2IS`);
//! - the *page* half takes any other chunk (at most 511 pages) as 4 KiB pages from its
//!   start. Its last page is the CPU's *anchor*: a read-only mapping of a harmless page
//!   made at start-up ([`Window::install`]) and never removed, which keeps the half's
//!   level-3 table (and, with it, the window's level-2 table) alive.
//!
//! So after start-up the window never allocates or frees a table frame: mapping a chunk
//! fills invalid entries of existing tables (`DSB ISHST; ISB`, no TLBI) and unmapping it
//! invalidates exactly its entries (`DSB ISHST; TLBI VALE2IS ...; DSB ISH; ISB`, Arm ARM
//! D8.16/D8.17, done by `mmu`), so it cannot fail for want of frames. Each CPU uses only
//! its own slot, so CPUs never wait for each other's work; only the table updates are
//! serialised, by the lock of the (shared) EL2 table, which is not held while the chunk
//! is worked on.

use alloc::vec::Vec;
use core::fmt;

use mmu::{Attributes, El2, MapFlags, MemoryType, PageTable, Permissions, TableAttrs};

use crate::mem::{PhysAddr, PhysRange, VirtAddr, VirtRange, PAGE_SIZE};

/// Most bytes one chunk covers: a level-2 block.
pub const CHUNK: u64 = 2 << 20;

/// Virtual address space of one CPU's slot: a block half and a page half.
pub const SLOT: u64 = 2 * CHUNK;

/// Size and alignment of the window's region: one level-1 entry of the EL2 table, so
/// that its table attributes (XNTable) apply to the window alone.
pub const SPAN: u64 = 1 << 30;

/// How a chunk is mapped while it is worked on: never executable, and only writable
/// when the work writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Read only (cache maintenance: `DC CIVAC` is checked as a read, Arm ARM D8.4.4).
    Read,
    /// Read and write (scrubbing, copying in).
    ReadWrite,
    /// Read and write as Tagged Normal memory, so that the allocation tags can be
    /// cleared too (scrubbing and copying in on a CPU with FEAT_MTE2, whose `MAIR_EL2`
    /// is then `mmu::MAIR_VALUE_TAGGED`).
    ReadWriteTagged,
}

impl Access {
    /// The `mmu` attributes of a chunk mapped for this access.
    #[must_use]
    pub const fn attributes(self) -> Attributes {
        match self {
            Self::Read => Attributes::normal(Permissions::RO),
            Self::ReadWrite => Attributes::normal(Permissions::RW),
            Self::ReadWriteTagged => Attributes::new(Permissions::RW, MemoryType::NormalTagged),
        }
    }
}

/// Why the window refused or failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowError {
    /// The range is not entirely inside one range of the guest RAM pool (or wraps).
    NotGuestRam {
        /// Start of the range.
        pa: u64,
        /// Its length.
        len: u64,
    },
    /// The window has no slot for this CPU index.
    NoSlot(usize),
    /// The window's base is not [`SPAN`]-aligned, or its slots do not fit in [`SPAN`].
    BadLayout,
    /// The EL2 table refused a window mapping (e.g. the slot was still in use).
    Table(mmu::Error),
}

impl core::error::Error for WindowError {}

impl fmt::Display for WindowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotGuestRam { pa, len } => write!(
                f,
                "[{pa:#x}, +{len:#x}) is not inside one range of the guest RAM pool"
            ),
            Self::NoSlot(cpu) => write!(f, "no window slot for cpu{cpu}"),
            Self::BadLayout => f.write_str("window region misaligned or too small"),
            Self::Table(e) => write!(f, "window mapping: {e}"),
        }
    }
}

impl From<mmu::Error> for WindowError {
    fn from(e: mmu::Error) -> Self {
        Self::Table(e)
    }
}

/// A part of a range that lies inside one [`CHUNK`]-aligned 2 MiB of physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// First byte.
    pub pa: u64,
    /// Bytes (at least one).
    pub len: u64,
}

impl Chunk {
    /// The whole pages holding the chunk: what is mapped for it.
    #[must_use]
    pub const fn pages(&self) -> PhysRange {
        // A chunk comes from `chunks`, which never passes the end of the address space.
        let base = self.pa & !(PAGE_SIZE - 1);
        let end = self
            .pa
            .saturating_add(self.len)
            .saturating_add(PAGE_SIZE - 1)
            & !(PAGE_SIZE - 1);
        PhysRange::new(PhysAddr::new(base), end.saturating_sub(base))
    }

    /// Whether its pages are a whole aligned 2 MiB: mapped as one block.
    #[must_use]
    pub const fn is_block(&self) -> bool {
        self.pages().size == CHUNK
    }
}

/// The chunks of `[pa, pa + len)`, in order: split at every 2 MiB boundary. Empty for
/// `len == 0`; the caller checks that the range does not wrap ([`Window::check`]).
pub fn chunks(pa: u64, len: u64) -> impl Iterator<Item = Chunk> {
    let end = pa.saturating_add(len);
    let mut at = pa;
    core::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        // The next 2 MiB boundary (`at < end`, so below 2^64 or saturated to `end`).
        let next = (at | (CHUNK - 1)).saturating_add(1).min(end);
        let c = Chunk {
            pa: at,
            len: next.saturating_sub(at),
        };
        at = next;
        Some(c)
    })
}

/// The window: where its slots are, and which physical memory it may map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    base: u64,
    cpus: usize,
    guest_ram: Vec<PhysRange>,
}

impl Window {
    /// A window at `base` (the start of an unused, [`SPAN`]-aligned region of the EL2
    /// address space) with a slot for each of `cpus` CPUs, that maps only memory inside
    /// `guest_ram`.
    ///
    /// # Errors
    ///
    /// [`WindowError::BadLayout`] if `base` is not [`SPAN`]-aligned or the slots do not
    /// fit in [`SPAN`].
    pub fn new(base: u64, cpus: usize, guest_ram: &[PhysRange]) -> Result<Self, WindowError> {
        let fits = (cpus as u64).checked_mul(SLOT).is_some_and(|s| s <= SPAN);
        if base % SPAN != 0 || !fits {
            return Err(WindowError::BadLayout);
        }
        Ok(Self {
            base,
            cpus,
            guest_ram: guest_ram.to_vec(),
        })
    }

    /// The virtual address range the window owns.
    #[must_use]
    pub const fn region(&self) -> VirtRange {
        VirtRange::new(VirtAddr::new(self.base), SPAN)
    }

    /// Where CPU `cpu`'s block half starts.
    fn block_slot(&self, cpu: usize) -> Result<u64, WindowError> {
        if cpu >= self.cpus {
            return Err(WindowError::NoSlot(cpu));
        }
        // `cpu < cpus` and `cpus * SLOT <= SPAN` (checked by `new`).
        Ok(self.base.saturating_add((cpu as u64).saturating_mul(SLOT)))
    }

    /// Where CPU `cpu`'s page half starts.
    fn page_slot(&self, cpu: usize) -> Result<u64, WindowError> {
        Ok(self.block_slot(cpu)?.saturating_add(CHUNK))
    }

    /// CPU `cpu`'s anchor page: the last page of its page half.
    ///
    /// # Errors
    ///
    /// [`WindowError::NoSlot`].
    pub fn anchor(&self, cpu: usize) -> Result<u64, WindowError> {
        Ok(self.page_slot(cpu)?.saturating_add(CHUNK - PAGE_SIZE))
    }

    /// Checks that `[pa, pa + len)` lies inside one range of the guest RAM pool.
    ///
    /// # Errors
    ///
    /// [`WindowError::NotGuestRam`].
    pub fn check(&self, pa: u64, len: u64) -> Result<(), WindowError> {
        let range = PhysRange::new(PhysAddr::new(pa), len);
        if self.guest_ram.iter().any(|r| r.contains(&range)) {
            Ok(())
        } else {
            Err(WindowError::NotGuestRam { pa, len })
        }
    }

    /// Start-up: maps every CPU's anchor (read-only, execute-never, to the page at
    /// `anchor_pa`, which must hold nothing secret) and makes the window's region
    /// execute-never as a whole (XNTable). Takes the window's table frames: one level-2
    /// table and one level-3 table per CPU.
    ///
    /// # Errors
    ///
    /// The first `mmu` error; the anchors mapped before it stay.
    pub fn install<A: mmu::FrameAllocator, T: mmu::TlbMaintenance>(
        &self,
        table: &mut PageTable<El2, A, T>,
        anchor_pa: u64,
    ) -> Result<(), WindowError> {
        let flags = MapFlags::WXN | MapFlags::NO_BLOCKS | MapFlags::NO_CONTIGUOUS;
        for cpu in 0..self.cpus {
            table.map(
                self.anchor(cpu)?,
                anchor_pa,
                PAGE_SIZE,
                Access::Read.attributes(),
                flags,
            )?;
        }
        table.set_table_attrs(self.base, SPAN, TableAttrs::NO_EXEC_EL2)?;
        Ok(())
    }

    /// Where `chunk` is (to be) mapped in CPU `cpu`'s slot: the virtual address of its
    /// first page, and whether it is a block.
    fn place(&self, cpu: usize, chunk: &Chunk) -> Result<(u64, bool), WindowError> {
        if chunk.is_block() {
            Ok((self.block_slot(cpu)?, true))
        } else {
            Ok((self.page_slot(cpu)?, false))
        }
    }

    /// Maps `chunk` (part of guest RAM: [`Self::check`]) into CPU `cpu`'s slot with
    /// `access` and returns the virtual address of its first byte.
    ///
    /// # Errors
    ///
    /// [`WindowError`]: not guest RAM, no slot, the slot still mapped.
    pub fn map<A: mmu::FrameAllocator, T: mmu::TlbMaintenance>(
        &self,
        table: &mut PageTable<El2, A, T>,
        cpu: usize,
        chunk: &Chunk,
        access: Access,
    ) -> Result<u64, WindowError> {
        self.check(chunk.pa, chunk.len)?;
        let pages = chunk.pages();
        let last = pages.end().get().saturating_sub(1);
        if pages.size > CHUNK || pages.base.get() & !(CHUNK - 1) != last & !(CHUNK - 1) {
            // Not one chunk of `chunks`: it would not fit the slot.
            return Err(WindowError::NotGuestRam {
                pa: chunk.pa,
                len: chunk.len,
            });
        }
        let (va, block) = self.place(cpu, chunk)?;
        let flags = if block {
            MapFlags::WXN | MapFlags::NO_CONTIGUOUS
        } else {
            MapFlags::WXN | MapFlags::NO_BLOCKS | MapFlags::NO_CONTIGUOUS
        };
        table.map(va, pages.base.get(), pages.size, access.attributes(), flags)?;
        // The chunk starts in its first page, which `va` maps.
        Ok(va.saturating_add(chunk.pa & (PAGE_SIZE - 1)))
    }

    /// Unmaps `chunk` from CPU `cpu`'s slot (after [`Self::map`] of the same chunk).
    ///
    /// # Errors
    ///
    /// [`WindowError::NoSlot`], or an `mmu` error (none for a chunk `map` mapped).
    pub fn unmap<A: mmu::FrameAllocator, T: mmu::TlbMaintenance>(
        &self,
        table: &mut PageTable<El2, A, T>,
        cpu: usize,
        chunk: &Chunk,
    ) -> Result<(), WindowError> {
        let (va, _) = self.place(cpu, chunk)?;
        table.unmap(va, chunk.pages().size)?;
        Ok(())
    }

    /// Runs `work(va, len)` over `[pa, pa + len)` of guest RAM, chunk by chunk: each
    /// chunk is mapped in CPU `cpu`'s slot with `access`, worked on at `va`, and
    /// unmapped before the next. `table`'s lock is held only for the map and the unmap.
    ///
    /// `cpu` must be the calling CPU's index and the window must not be in use on it
    /// (the work does not use the window itself).
    ///
    /// # Errors
    ///
    /// [`WindowError`] before anything is mapped if the range is not guest RAM; an
    /// error of a map stops the walk (the chunks before it were done and unmapped).
    pub fn for_each_chunk<A: mmu::FrameAllocator, T: mmu::TlbMaintenance>(
        &self,
        table: &spin::Mutex<PageTable<El2, A, T>>,
        cpu: usize,
        pa: u64,
        len: u64,
        access: Access,
        mut work: impl FnMut(u64, u64),
    ) -> Result<(), WindowError> {
        self.check(pa, len)?;
        for chunk in chunks(pa, len) {
            let va = self.map(&mut table.lock(), cpu, &chunk, access)?;
            work(va, chunk.len);
            self.unmap(&mut table.lock(), cpu, &chunk)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mmu::testing::{HeapFrames, RecordingTlb};
    use mmu::TlbOp;

    const BASE: u64 = 0x7f_c000_0000;
    const ANCHOR: u64 = 0x4021_3000;
    const POOL: [PhysRange; 2] = [
        pr(0x4800_2000, 0x2800_0000 - 0x2000),
        pr(0x8000_0000, 0x4000_0000),
    ];

    const fn pr(base: u64, size: u64) -> PhysRange {
        PhysRange::new(PhysAddr::new(base), size)
    }

    type Table = PageTable<El2, HeapFrames, RecordingTlb>;

    fn table() -> Table {
        PageTable::new(
            El2::new(39).with_pa_bits(40),
            HeapFrames::new(),
            RecordingTlb::new(),
        )
        .unwrap()
    }

    fn installed(cpus: usize) -> (Window, spin::Mutex<Table>) {
        let w = Window::new(BASE, cpus, &POOL).unwrap();
        let mut t = table();
        w.install(&mut t, ANCHOR).unwrap();
        t.tlb_mut().clear();
        (w, spin::Mutex::new(t))
    }

    /// Every leaf in the window's region: (va, pa, size).
    fn window_leaves(w: &Window, t: &Table) -> Vec<(u64, u64, u64)> {
        let mut out = Vec::new();
        t.walk(w.region().base.get(), SPAN, |m| {
            out.push((m.va, m.output, m.size))
        })
        .unwrap();
        out
    }

    fn anchors(w: &Window, cpus: usize) -> Vec<(u64, u64, u64)> {
        (0..cpus)
            .map(|c| (w.anchor(c).unwrap(), ANCHOR, PAGE_SIZE))
            .collect()
    }

    #[test]
    fn chunks_split_at_2mib_boundaries() {
        let c: Vec<_> = chunks(0x4810_0800, 0x40_0000).collect();
        assert_eq!(
            c,
            [
                Chunk {
                    pa: 0x4810_0800,
                    len: 0x10_0000 - 0x800
                },
                Chunk {
                    pa: 0x4820_0000,
                    len: CHUNK
                },
                Chunk {
                    pa: 0x4840_0000,
                    len: 0x10_0800
                },
            ]
        );
        assert!(!c[0].is_block() && c[1].is_block() && !c[2].is_block());
        assert_eq!(c[0].pages(), pr(0x4810_0000, 0x10_0000));
        assert_eq!(c[2].pages(), pr(0x4840_0000, 0x10_1000));
        assert_eq!(chunks(0x4800_0000, 0).count(), 0);
        // A byte range whose pages make a whole 2 MiB is a block.
        let c: Vec<_> = chunks(0x4820_0010, CHUNK - 0x20).collect();
        assert_eq!(c.len(), 1);
        assert!(c[0].is_block());
        // Near the top of the address space: no overflow, stops at the end.
        assert_eq!(chunks(u64::MAX - 0xfff, 0x1000).count(), 1);
    }

    #[test]
    fn install_maps_only_the_anchors_and_makes_the_region_execute_never() {
        let (w, t) = installed(4);
        let t = t.lock();
        assert_eq!(window_leaves(&w, &t), anchors(&w, 4));
        let a = t.translate(w.anchor(3).unwrap()).unwrap();
        assert_eq!(a.attrs.perms, Permissions::RO);
        assert_eq!(a.level, 3);
        assert_eq!(t.table_attrs(BASE), TableAttrs::NO_EXEC_EL2);
        assert_eq!(
            t.table_attrs(BASE + SPAN - PAGE_SIZE),
            TableAttrs::NO_EXEC_EL2
        );
        // One level-2 table for the region and one level-3 table per CPU, plus the root.
        assert_eq!(t.frames_in_use(), 1 + 1 + 4);
    }

    #[test]
    fn layout_and_range_checks() {
        assert_eq!(
            Window::new(BASE + CHUNK, 1, &POOL),
            Err(WindowError::BadLayout)
        );
        assert_eq!(
            Window::new(BASE, (SPAN / SLOT) as usize + 1, &POOL),
            Err(WindowError::BadLayout)
        );
        let w = Window::new(BASE, 2, &POOL).unwrap();
        assert!(w.check(POOL[0].base.get(), POOL[0].size).is_ok());
        // Across two pool ranges, before the pool, wrapping, the hypervisor's own RAM.
        for (pa, len) in [
            (POOL[0].end().get() - 0x1000, 0x4000_0000),
            (POOL[0].base.get() - 0x1000, 0x2000),
            (u64::MAX - 0xfff, 0x2000),
            (0x4020_0000, 0x1000),
        ] {
            assert_eq!(w.check(pa, len), Err(WindowError::NotGuestRam { pa, len }));
        }
        let mut t = table();
        w.install(&mut t, ANCHOR).unwrap();
        let frames = t.frames_in_use();
        let c = Chunk {
            pa: 0x4020_0000,
            len: 0x1000,
        };
        assert!(matches!(
            w.map(&mut t, 0, &c, Access::Read),
            Err(WindowError::NotGuestRam { .. })
        ));
        let c = Chunk {
            pa: 0x8000_0000,
            len: 0x1000,
        };
        assert_eq!(
            w.map(&mut t, 2, &c, Access::Read),
            Err(WindowError::NoSlot(2))
        );
        // A chunk that is not one of `chunks` (crosses 2 MiB) is refused, not mapped.
        let c = Chunk {
            pa: 0x801f_f000,
            len: 0x2000,
        };
        assert!(w.map(&mut t, 0, &c, Access::Read).is_err());
        // Mapping the same slot twice fails, and leaves the first mapping alone.
        let c = Chunk {
            pa: 0x8000_0000,
            len: 0x3000,
        };
        let va = w.map(&mut t, 1, &c, Access::ReadWrite).unwrap();
        assert!(matches!(
            w.map(&mut t, 1, &c, Access::ReadWrite),
            Err(WindowError::Table(mmu::Error::AlreadyMapped { .. }))
        ));
        assert_eq!(t.translate(va).unwrap().output, 0x8000_0000);
        w.unmap(&mut t, 1, &c).unwrap();
        assert_eq!(t.frames_in_use(), frames, "no table frame taken or freed");
    }

    /// The window maps each chunk where the work sees it, with the access asked for and
    /// never executable, and unmaps exactly that chunk with one TLBI per page or block
    /// before the next chunk is mapped; afterwards only the anchors are left, and no
    /// table frame was taken or freed.
    #[test]
    fn maps_and_unmaps_exactly_each_chunk() {
        let (w, t) = installed(2);
        let frames = t.lock().frames_in_use();
        // A partial chunk (3 pages and a bit), a whole block, a partial chunk of 5 pages.
        let pa = 0x8020_0000 - 0x3000 + 0x10;
        let len = 0x3000 - 0x10 + CHUNK + 0x4800;
        let mut seen = Vec::new();
        w.for_each_chunk(&t, 1, pa, len, Access::ReadWrite, |va, n| {
            let t = t.lock();
            let tr = t.translate(va).unwrap();
            let last = t.translate(va + n - 1).unwrap();
            assert_eq!(tr.attrs.perms, Permissions::RW);
            assert_eq!(t.table_attrs(va).limit(tr.attrs.perms), Permissions::RW);
            // Only this chunk (and the anchors) is mapped while it is worked on.
            let leaves: usize = window_leaves(&w, &t)
                .iter()
                .filter(|l| l.1 != ANCHOR)
                .map(|l| (l.2 / PAGE_SIZE) as usize)
                .sum();
            seen.push((tr.output, last.output - tr.output + 1, tr.level, leaves));
        })
        .unwrap();
        assert_eq!(
            seen,
            [
                (pa, 0x3000 - 0x10, 3, 3),
                (0x8020_0000, CHUNK, 2, 512),
                (0x8040_0000, 0x4800, 3, 5),
            ]
        );
        let t = t.lock();
        assert_eq!(window_leaves(&w, &t), anchors(&w, 2));
        assert_eq!(t.frames_in_use(), frames);
        // TLB maintenance: maps only publish (no TLBI); each unmap invalidates each of
        // its leaves in CPU 1's slot by VA, then completes.
        let page_slot = BASE + SLOT + CHUNK;
        let block_slot = BASE + SLOT;
        let leaf = |va| TlbOp::El2Va { va, leaf: true };
        let seqs = t.tlb().sequences();
        assert_eq!(seqs.len(), 6, "{seqs:?}");
        for map in [&seqs[0], &seqs[2], &seqs[4]] {
            assert_eq!(map, &[TlbOp::DsbIshSt, TlbOp::Isb]);
        }
        let unmap = |vas: Vec<u64>| {
            let mut ops = vec![TlbOp::DsbIshSt];
            ops.extend(vas.into_iter().map(leaf));
            ops.extend([TlbOp::DsbIsh, TlbOp::Isb]);
            ops
        };
        let pages = |n: u64| (0..n).map(|i| page_slot + i * PAGE_SIZE).collect();
        assert_eq!(seqs[1], unmap(pages(3)));
        assert_eq!(seqs[3], unmap(vec![block_slot]));
        assert_eq!(seqs[5], unmap(pages(5)));
    }

    #[test]
    fn each_access_gets_its_attributes() {
        let (w, t) = installed(1);
        for (access, perms, mem) in [
            (Access::Read, Permissions::RO, MemoryType::Normal),
            (Access::ReadWrite, Permissions::RW, MemoryType::Normal),
            (
                Access::ReadWriteTagged,
                Permissions::RW,
                MemoryType::NormalTagged,
            ),
        ] {
            w.for_each_chunk(&t, 0, 0x8000_0000, 0x1000, access, |va, _| {
                let a = t.lock().translate(va).unwrap().attrs;
                assert_eq!((a.perms, a.mem_type), (perms, mem), "{access:?}");
            })
            .unwrap();
        }
        // Nothing is mapped for a range outside the pool.
        let mut called = false;
        let r = w.for_each_chunk(&t, 0, 0x4020_0000, 0x1000, Access::Read, |_, _| {
            called = true;
        });
        assert!(r.is_err() && !called);
    }

    /// Two CPUs' windows over the same pages do not disturb each other: each has its
    /// own slot.
    #[test]
    fn cpus_have_their_own_slots() {
        let (w, t) = installed(2);
        let c = Chunk {
            pa: 0x8000_0000,
            len: CHUNK,
        };
        let va0 = w.map(&mut t.lock(), 0, &c, Access::Read).unwrap();
        let va1 = w.map(&mut t.lock(), 1, &c, Access::Read).unwrap();
        assert_ne!(va0, va1);
        w.unmap(&mut t.lock(), 0, &c).unwrap();
        assert_eq!(t.lock().translate(va1).unwrap().output, 0x8000_0000);
        assert!(t.lock().translate(va0).is_none());
    }
}

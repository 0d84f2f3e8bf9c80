//! Regime-neutral memory attributes: permissions, memory type and software bits.

use bitflags::bitflags;

bitflags! {
    /// Access permissions, independent of the translation regime.
    ///
    /// Each regime accepts only the combinations it can encode; anything else makes
    /// the operation fail with [`Error::UnsupportedAttributes`](crate::Error::UnsupportedAttributes):
    ///
    /// | regime | accepted |
    /// |---|---|
    /// | [`El2`](crate::El2) | `READ` (required), `WRITE`, `EXEC_EL2` |
    /// | [`Stage2`](crate::Stage2) | any of `READ`, `WRITE`; `EXEC_EL1`/`EXEC_EL0` (must be equal without FEAT_XNX) |
    /// | [`El1`](crate::El1) | `READ` (required), `WRITE`, `USER`, `EXEC_EL1`, `EXEC_EL0`; not `USER\|WRITE\|EXEC_EL1` |
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct Permissions: u8 {
        /// Data reads are permitted (at every exception level the regime serves; for
        /// [`El1`](crate::El1) at EL0 only together with `USER`).
        const READ = 1 << 0;
        /// Data writes are permitted.
        const WRITE = 1 << 1;
        /// Instruction fetch at EL2 ([`El2`](crate::El2) regime only).
        const EXEC_EL2 = 1 << 2;
        /// Instruction fetch at EL1 ([`Stage2`](crate::Stage2) and [`El1`](crate::El1)).
        const EXEC_EL1 = 1 << 3;
        /// Instruction fetch at EL0 ([`Stage2`](crate::Stage2) and [`El1`](crate::El1)).
        const EXEC_EL0 = 1 << 4;
        /// Data access from EL0 ([`El1`](crate::El1) regime only: AP\[1\]).
        const USER = 1 << 5;
    }
}

impl Permissions {
    /// Read and write, no execution.
    pub const RW: Self = Self::READ.union(Self::WRITE);
    /// Read only, no execution.
    pub const RO: Self = Self::READ;
}

/// Memory type of a mapping.
///
/// For the stage-1 regimes this selects a `MAIR_ELx` index (see [`MAIR_VALUE`]); for
/// stage 2 it selects a `MemAttr` encoding (with or without FEAT_S2FWB).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum MemoryType {
    /// Normal memory, inner and outer write-back (read/write-allocate), inner shareable.
    #[default]
    Normal,
    /// Normal memory, inner and outer non-cacheable.
    NormalNonCacheable,
    /// Device-nGnRE (typical MMIO).
    DeviceNGnRE,
    /// Device-nGnRnE (strongly ordered).
    DeviceNGnRnE,
    /// Tagged Normal memory (FEAT_MTE2): inner and outer write-back like
    /// [`Normal`](Self::Normal), with Allocation Tags: the tag instructions (`STG`,
    /// `STGM`, `DC GZVA`, ...) read and write the tags of memory mapped so. Stage-1
    /// regimes only (stage 2 has no such type: [`Stage2`](crate::Stage2) rejects it).
    /// It is tagged only with [`MAIR_VALUE_TAGGED`] in `MAIR_ELx` (on a CPU with
    /// FEAT_MTE2); with [`MAIR_VALUE`] it is plain write-back Normal memory.
    NormalTagged,
}

impl MemoryType {
    /// Index into `MAIR_ELx` used by the stage-1 regimes for this type.
    #[must_use]
    pub const fn mair_index(self) -> u64 {
        match self {
            MemoryType::Normal => 0,
            MemoryType::DeviceNGnRnE => 1,
            MemoryType::DeviceNGnRE => 2,
            MemoryType::NormalNonCacheable => 3,
            MemoryType::NormalTagged => 4,
        }
    }

    /// Inverse of [`mair_index`](Self::mair_index).
    #[must_use]
    pub const fn from_mair_index(index: u64) -> Option<Self> {
        match index {
            0 => Some(MemoryType::Normal),
            1 => Some(MemoryType::DeviceNGnRnE),
            2 => Some(MemoryType::DeviceNGnRE),
            3 => Some(MemoryType::NormalNonCacheable),
            4 => Some(MemoryType::NormalTagged),
            _ => None,
        }
    }

    /// Whether this is a Device type.
    #[must_use]
    pub const fn is_device(self) -> bool {
        matches!(self, MemoryType::DeviceNGnRE | MemoryType::DeviceNGnRnE)
    }
}

/// The `MAIR_EL2` / `MAIR_EL1` value matching [`MemoryType::mair_index`].
///
/// Attr0 = `0xFF` Normal inner/outer write-back non-transient read/write-allocate,
/// Attr1 = `0x00` Device-nGnRnE, Attr2 = `0x04` Device-nGnRE,
/// Attr3 = `0x44` Normal inner/outer non-cacheable (Arm ARM D19, `MAIR_ELx.Attr<n>`),
/// Attr4 = `0xFF` like Attr0: [`MemoryType::NormalTagged`] without tags, for any CPU
/// (`0xF0` is only defined with FEAT_MTE2: [`MAIR_VALUE_TAGGED`]).
#[allow(clippy::identity_op)]
pub const MAIR_VALUE: u64 = 0xFF | (0x00 << 8) | (0x04 << 16) | (0x44 << 24) | (0xFF << 32);

/// [`MAIR_VALUE`] with Attr4 = `0xF0`, Tagged Normal memory (inner/outer write-back
/// non-transient read/write-allocate, with Allocation Tags; FEAT_MTE2, Arm ARM D10
/// "The Memory Tagging Extension" and `MAIR_ELx.Attr<n>`): for a CPU with FEAT_MTE2
/// (`ID_AA64PFR1_EL1.MTE` >= 2) whose [`MemoryType::NormalTagged`] mappings are to
/// hold tags.
pub const MAIR_VALUE_TAGGED: u64 = (MAIR_VALUE & !(0xFF << 32)) | (0xF0 << 32);

/// Four software-defined bits stored in descriptor bits \[58:55\].
///
/// The hardware ignores them; the crate keeps them with each leaf and returns them
/// from [`translate`](crate::PageTable::translate) and [`walk`](crate::PageTable::walk).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct SwBits(u8);

impl SwBits {
    /// No software bits set.
    pub const NONE: Self = SwBits(0);

    /// Builds software bits from the low four bits of `bits`.
    ///
    /// Returns `None` if `bits` has anything set above bit 3.
    #[must_use]
    pub const fn new(bits: u8) -> Option<Self> {
        if bits > 0xF {
            None
        } else {
            Some(SwBits(bits))
        }
    }

    /// Builds software bits from the low four bits of `bits`, dropping the rest.
    #[must_use]
    pub const fn truncate(bits: u8) -> Self {
        SwBits(bits & 0xF)
    }

    /// The four bits as a number 0..=15.
    #[must_use]
    pub const fn bits(self) -> u8 {
        self.0
    }

    pub(crate) const fn to_desc(self) -> u64 {
        (self.0 as u64) << 55
    }

    pub(crate) const fn from_desc(desc: u64) -> Self {
        SwBits(((desc >> 55) & 0xF) as u8)
    }
}

/// Regime-neutral attributes of a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Attributes {
    /// Access permissions.
    pub perms: Permissions,
    /// Memory type.
    pub mem_type: MemoryType,
    /// Software bits \[58:55\].
    pub sw: SwBits,
}

impl Attributes {
    /// Attributes with the given permissions and memory type and no software bits.
    #[must_use]
    pub const fn new(perms: Permissions, mem_type: MemoryType) -> Self {
        Attributes {
            perms,
            mem_type,
            sw: SwBits::NONE,
        }
    }

    /// Normal write-back memory with `perms`.
    #[must_use]
    pub const fn normal(perms: Permissions) -> Self {
        Self::new(perms, MemoryType::Normal)
    }

    /// Device-nGnRE memory, read/write, never executable.
    #[must_use]
    pub const fn device() -> Self {
        Self::new(Permissions::RW, MemoryType::DeviceNGnRE)
    }

    /// Same attributes with software bits `sw`.
    #[must_use]
    pub const fn with_sw(mut self, sw: SwBits) -> Self {
        self.sw = sw;
        self
    }
}

bitflags! {
    /// Options for [`PageTable::map`](crate::PageTable::map).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct MapFlags: u8 {
        /// Use only 4 KiB pages: never create 2 MiB / 1 GiB blocks (neither directly
        /// nor by merging a table that became uniform). The level-3 tables holding such
        /// pages are marked, and no later `map` or
        /// [`coalesce`](crate::PageTable::coalesce) merges them until they are freed:
        /// memory mapped this way never goes through break-before-make by a merge.
        const NO_BLOCKS = 1 << 0;
        /// Allow replacing existing mappings in the range (with break-before-make where
        /// the architecture requires it). Without it, mapping over an existing valid
        /// entry fails with [`Error::AlreadyMapped`](crate::Error::AlreadyMapped).
        const REPLACE = 1 << 1;
        /// Reject attributes that are both writable and executable at some level
        /// (a W^X policy) with [`Error::UnsupportedAttributes`](crate::Error::UnsupportedAttributes).
        const WXN = 1 << 2;
        /// Never set the contiguous hint (descriptor bit 52). Without this flag, `map`
        /// sets it on every aligned group of 16 entries (64 KiB of pages, 32 MiB of
        /// 2 MiB blocks, 16 GiB of 1 GiB blocks) that the call fills from empty with
        /// one contiguous, equally aligned output range: a TLB may then hold one
        /// entry for the 16. Any later change to part of such a group first removes
        /// the hint from all 16 with break-before-make.
        ///
        /// ```
        /// use mmu::testing::{HeapFrames, RecordingTlb};
        /// use mmu::{Attributes, El2, MapFlags, PageTable, Permissions, TlbOp};
        ///
        /// let mut t = PageTable::new(El2::new(39), HeapFrames::new(), RecordingTlb::new())?;
        /// let rw = Attributes::normal(Permissions::RW);
        /// // 64 KiB of pages: one group of 16 with the hint.
        /// t.map(0x4000_0000, 0x4000_0000, 0x1_0000, rw, MapFlags::NO_BLOCKS)?;
        /// // Unmapping one page first takes the hint off the whole group (16 TLBIs).
        /// t.unmap(0x4000_3000, 0x1000)?;
        /// let by_va = |t: &PageTable<El2, HeapFrames, RecordingTlb>| {
        ///     t.tlb().invalidations().iter().filter(|o| matches!(o, TlbOp::El2Va { .. })).count()
        /// };
        /// assert_eq!(by_va(&t), 16);
        /// // Without the hint, the same unmap is one TLBI.
        /// t.tlb_mut().clear();
        /// let flags = MapFlags::NO_BLOCKS | MapFlags::NO_CONTIGUOUS;
        /// t.map(0x5000_0000, 0x5000_0000, 0x1_0000, rw, flags)?;
        /// t.unmap(0x5000_3000, 0x1000)?;
        /// assert_eq!(by_va(&t), 1);
        /// # Ok::<(), mmu::Error>(())
        /// ```
        const NO_CONTIGUOUS = 1 << 3;
        /// Never merge a table that the mapping makes uniform into a block: a mapping
        /// built a block at a time (2 MiB, say) stays in blocks of that size, so changing
        /// one of them later (`protect`, `unmap`) never splits a larger block and needs
        /// no frame. Blocks are still used where a single call's range covers them, and
        /// [`coalesce`](crate::PageTable::coalesce) still merges on request.
        const NO_MERGE = 1 << 4;
    }
}

bitflags! {
    /// Table attributes: limits a table descriptor puts on everything mapped below it
    /// (hierarchical permissions, Arm ARM D8.4.2), set with
    /// [`PageTable::set_table_attrs`](crate::PageTable::set_table_attrs). A leaf's
    /// effective permissions are its own [`Permissions`] less what the tables on its
    /// path remove ([`limit`](Self::limit)).
    ///
    /// | regime | accepted | descriptor bits |
    /// |---|---|---|
    /// | [`El2`](crate::El2) | `NO_WRITE`, `NO_EXEC_EL2` | APTable\[1\], XNTable |
    /// | [`El1`](crate::El1) | `NO_WRITE`, `NO_USER`, `NO_EXEC_EL1`, `NO_EXEC_EL0` | APTable\[1\], APTable\[0\], PXNTable, UXNTable |
    /// | [`Stage2`](crate::Stage2) | none (stage-2 table descriptors have no attributes) | — |
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct TableAttrs: u8 {
        /// No data writes below (APTable\[1\] = 1).
        const NO_WRITE = 1 << 0;
        /// No data access from EL0 below (APTable\[0\] = 1; [`El1`](crate::El1) only).
        const NO_USER = 1 << 1;
        /// No instruction fetch at EL2 below (XNTable; [`El2`](crate::El2) only).
        const NO_EXEC_EL2 = 1 << 2;
        /// No instruction fetch at EL1 below (PXNTable; [`El1`](crate::El1) only).
        const NO_EXEC_EL1 = 1 << 3;
        /// No instruction fetch at EL0 below (UXNTable; [`El1`](crate::El1) only).
        const NO_EXEC_EL0 = 1 << 4;
    }
}

impl TableAttrs {
    /// The permissions left of `perms` under these table attributes.
    #[must_use]
    pub const fn limit(self, perms: Permissions) -> Permissions {
        let mut p = perms;
        if self.contains(Self::NO_WRITE) {
            p = p.difference(Permissions::WRITE);
        }
        if self.contains(Self::NO_USER) {
            p = p.difference(Permissions::USER);
        }
        if self.contains(Self::NO_EXEC_EL2) {
            p = p.difference(Permissions::EXEC_EL2);
        }
        if self.contains(Self::NO_EXEC_EL1) {
            p = p.difference(Permissions::EXEC_EL1);
        }
        if self.contains(Self::NO_EXEC_EL0) {
            p = p.difference(Permissions::EXEC_EL0);
        }
        p
    }
}

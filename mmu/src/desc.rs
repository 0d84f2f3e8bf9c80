//! Descriptor bit positions shared by all regimes (Arm ARM D8.3, 4 KiB granule).

/// Bit 0: descriptor is valid.
pub(crate) const VALID: u64 = 1 << 0;
/// Bits \[1:0\] of a table descriptor (levels 0-2) or a page descriptor (level 3).
pub(crate) const TABLE_OR_PAGE: u64 = 0b11;
/// Bits \[1:0\] of a block descriptor (levels 1-2).
pub(crate) const BLOCK: u64 = 0b01;
/// Output address / next-level table address bits \[47:12\].
pub(crate) const OA_MASK: u64 = 0x0000_FFFF_FFFF_F000;
/// Stage 1 AP\[1\] (EL0 access; RES1 in the EL2 regime).
pub(crate) const AP1: u64 = 1 << 6;
/// Stage 1 AP\[2\]: read-only.
pub(crate) const AP2_RO: u64 = 1 << 7;
/// Stage 2 S2AP\[0\]: read.
pub(crate) const S2AP_R: u64 = 1 << 6;
/// Stage 2 S2AP\[1\]: write.
pub(crate) const S2AP_W: u64 = 1 << 7;
/// SH\[9:8\] = 0b11: inner shareable.
pub(crate) const SH_INNER: u64 = 0b11 << 8;
/// Access flag.
pub(crate) const AF: u64 = 1 << 10;
/// Not global (stage 1 EL1&0: ASID-tagged).
pub(crate) const NG: u64 = 1 << 11;
/// Contiguous hint.
pub(crate) const CONTIGUOUS: u64 = 1 << 52;
/// Stage 1 EL1&0 PXN.
pub(crate) const PXN: u64 = 1 << 53;
/// Stage 1 UXN (EL1&0) / XN (EL2).
pub(crate) const UXN: u64 = 1 << 54;
/// Stage 1 XN of the EL2 regime.
pub(crate) const XN: u64 = 1 << 54;
/// Software bits \[58:55\].
pub(crate) const SW_MASK: u64 = 0xF << 55;
/// Bits a change of which requires break-before-make (Arm ARM D8.17.1): output
/// address, descriptor type (block size), memory type (AttrIndx / MemAttr \[5:2\]),
/// shareability, nG, contiguous.
pub(crate) const BBM_MASK: u64 = OA_MASK | 0b11 | (0xF << 2) | (0b11 << 8) | NG | CONTIGUOUS;

/// Table descriptors: bits \[11:2\] hold the number of non-zero entries of the
/// next-level table (0..=512). The hardware ignores these bits in table descriptors
/// of every regime (Arm ARM D8.3.1, "Table descriptor": bits \[11:2\] IGNORED, as
/// long as FEAT_HAFT is not enabled and TCR_ELx.DS = 0, which the crate never sets),
/// so changing them needs neither break-before-make nor TLB maintenance.
pub(crate) const COUNT_SHIFT: u32 = 2;
/// Mask of the entry count in a table descriptor.
pub(crate) const COUNT_MASK: u64 = 0x3FF << COUNT_SHIFT;
/// Table descriptors: bit 55 (in the IGNORED bits \[58:51\]) marks a level-3 table
/// holding pages mapped with `MapFlags::NO_BLOCKS`; such a table is never merged
/// into a block.
pub(crate) const PINNED: u64 = 1 << 55;

/// Table descriptors: bit 56 (IGNORED) marks a table that carries table attributes
/// (`PageTable::set_table_attrs`): it is never merged, freed or replaced as a side
/// effect of another operation, so its restriction lasts until it is cleared.
pub(crate) const HELD: u64 = 1 << 56;
/// Table descriptors: bit 57 (IGNORED) marks a table with a `HELD` table somewhere
/// below it, which is kept for the same reason.
pub(crate) const HELD_BELOW: u64 = 1 << 57;
/// Either mark: the table stays.
pub(crate) const KEEP: u64 = HELD | HELD_BELOW;
/// Table descriptors, stage 1 (Arm ARM D8.3.1, "Table descriptor", and D8.4.2
/// "Hierarchical control of data access permissions"): APTable\[1\] (bit 62, no
/// write below), APTable\[0\] (bit 61, no EL0 access below; RES0 in the EL2
/// regime), UXNTable / XNTable (bit 60), PXNTable (bit 59; RES0 in the EL2 regime).
/// Stage 2 table descriptors have none of them (RES0).
pub(crate) const AP_TABLE_NO_WRITE: u64 = 1 << 62;
/// APTable\[0\].
pub(crate) const AP_TABLE_NO_EL0: u64 = 1 << 61;
/// UXNTable (EL1&0) / XNTable (EL2).
pub(crate) const XN_TABLE: u64 = 1 << 60;
/// PXNTable (EL1&0).
pub(crate) const PXN_TABLE: u64 = 1 << 59;
/// All table-attribute bits.
pub(crate) const TABLE_ATTRS: u64 = AP_TABLE_NO_WRITE | AP_TABLE_NO_EL0 | XN_TABLE | PXN_TABLE;
/// Table-descriptor bits the crate keeps when it rewrites a descriptor for a table
/// that stays (new count): its marks and its table attributes.
pub(crate) const TABLE_KEEP: u64 = PINNED | KEEP | TABLE_ATTRS;

/// Entry count stored in table descriptor `d`.
#[inline(always)]
pub(crate) const fn count(d: u64) -> u32 {
    ((d & COUNT_MASK) >> COUNT_SHIFT) as u32
}

/// Shift of the input address bits resolved at `level`.
pub(crate) const fn level_shift(level: u8) -> u32 {
    12 + 9 * (3 - level as u32)
}

/// Bytes mapped by one entry at `level`.
pub(crate) const fn level_size(level: u8) -> u64 {
    1 << level_shift(level)
}

/// Whether `d` is a table descriptor at `level` (only meaningful for levels 0-2).
#[inline]
pub(crate) const fn is_table(d: u64, level: u8) -> bool {
    level < 3 && d & 0b11 == TABLE_OR_PAGE
}

//! Table attributes (APTable, XNTable / PXNTable / UXNTable): encoding per regime,
//! held tables, maintenance when they change.

mod common;

use mmu::testing::ops::{check_tables, read};
use mmu::testing::{HeapFrames, RecordingTlb};
use mmu::{
    Attributes, El1, El2, Error, MapFlags, MemoryType, PageTable, Permissions, Stage2, TableAttrs,
    TlbOp,
};

const PAGE: u64 = 4096;
const MIB2: u64 = 2 << 20;
const GIB: u64 = 1 << 30;

fn rw() -> Attributes {
    Attributes::normal(Permissions::RW)
}

#[test]
fn encodings_per_regime() {
    let mut t = PageTable::new(El2::new(39), HeapFrames::new(), RecordingTlb::new()).unwrap();
    t.set_table_attrs(0, GIB, TableAttrs::NO_WRITE | TableAttrs::NO_EXEC_EL2)
        .unwrap();
    let (d, level) = common::raw_lookup_at(t.root_address(), 1, 0);
    assert_eq!(level, 2, "an empty table was created below the root entry");
    let root = read(t.root_address(), 0);
    assert_eq!(
        root & (0xF << 59),
        (1 << 62) | (1 << 60),
        "APTable[1], XNTable"
    );
    assert_eq!(d, 0);
    for bad in [
        TableAttrs::NO_USER,
        TableAttrs::NO_EXEC_EL1,
        TableAttrs::NO_EXEC_EL0,
    ] {
        assert_eq!(
            t.set_table_attrs(GIB, GIB, bad),
            Err(Error::UnsupportedAttributes),
            "{bad:?} at EL2"
        );
    }

    let mut t = PageTable::new(El1::new(1, 39), HeapFrames::new(), RecordingTlb::new()).unwrap();
    t.set_table_attrs(0, MIB2, TableAttrs::all() - TableAttrs::NO_EXEC_EL2)
        .unwrap();
    let l1 = read(t.root_address(), 0);
    let l2 = read(l1 & 0xFFFF_FFFF_F000, 0);
    assert_eq!(l1 & (0xF << 59), 0, "only the 2 MiB entry gets them");
    assert_eq!(
        l2 & (0xF << 59),
        0xF << 59,
        "APTable[1:0], UXNTable, PXNTable"
    );
    assert_eq!(
        t.table_attrs(0x1000),
        TableAttrs::all() - TableAttrs::NO_EXEC_EL2
    );
    assert_eq!(t.table_attrs(MIB2), TableAttrs::empty());
    assert_eq!(
        t.set_table_attrs(0, MIB2, TableAttrs::NO_EXEC_EL2),
        Err(Error::UnsupportedAttributes)
    );

    let mut s2 =
        PageTable::new(Stage2::new(1, 40), HeapFrames::new(), RecordingTlb::new()).unwrap();
    assert_eq!(
        s2.set_table_attrs(0, GIB, TableAttrs::NO_WRITE),
        Err(Error::UnsupportedAttributes)
    );
    // Clearing is accepted (and changes nothing).
    s2.set_table_attrs(0, GIB, TableAttrs::empty()).unwrap();
    assert_eq!(s2.frames_in_use(), 2);
    assert_eq!(
        t.set_table_attrs(0x1000, MIB2, TableAttrs::NO_WRITE),
        Err(Error::Misaligned)
    );
}

#[test]
fn limit_removes_what_tables_forbid() {
    let all = Permissions::all();
    assert_eq!(TableAttrs::NO_WRITE.limit(all), all - Permissions::WRITE,);
    assert_eq!(
        (TableAttrs::NO_EXEC_EL1 | TableAttrs::NO_EXEC_EL0 | TableAttrs::NO_USER).limit(all),
        Permissions::READ | Permissions::WRITE | Permissions::EXEC_EL2
    );
    assert_eq!(TableAttrs::empty().limit(all), all);
}

/// A table with attributes is held: map does not merge it into a block, REPLACE does
/// not swap it for one, coalesce leaves it, unmapping empties it but keeps it; clearing
/// the attributes lets it go.
#[test]
fn held_tables_stay_until_cleared() {
    let frames = HeapFrames::new();
    let mut t = PageTable::new(El2::new(39), &frames, RecordingTlb::new()).unwrap();
    let base = 4 * GIB;
    t.set_table_attrs(base, MIB2, TableAttrs::NO_EXEC_EL2)
        .unwrap();
    assert_eq!(t.frames_in_use(), 3);
    // A whole 2 MiB block's worth of pages: would be a block without the attributes.
    t.map(base, base, MIB2, rw(), MapFlags::empty()).unwrap();
    assert_eq!(t.translate(base).unwrap().level, 3);
    t.map(base, 0, MIB2, rw(), MapFlags::REPLACE).unwrap();
    assert_eq!(t.translate(base + PAGE).unwrap().level, 3);
    assert_eq!(t.translate(base + PAGE).unwrap().output, PAGE);
    t.coalesce(base, GIB).unwrap();
    assert_eq!(t.translate(base).unwrap().level, 3);
    // The 1 GiB above it is held too: REPLACE of the whole GiB keeps the structure.
    t.map(base, 0, GIB, rw(), MapFlags::REPLACE).unwrap();
    assert_eq!(t.translate(base).unwrap().level, 3);
    assert_eq!(t.translate(base + MIB2).unwrap().level, 2);
    assert_eq!(t.table_attrs(base + 5 * PAGE), TableAttrs::NO_EXEC_EL2);
    // Unmapping everything: page by page for the first pages, then the whole range.
    for k in 0..4 {
        t.unmap(base + k * PAGE, PAGE).unwrap();
    }
    t.unmap(base, GIB).unwrap();
    assert!(t.translate(base).is_none());
    assert_eq!(
        t.frames_in_use(),
        3,
        "root, level-2 and the held level-3 table"
    );
    assert_eq!(t.table_attrs(base), TableAttrs::NO_EXEC_EL2);
    // Page by page down to empty keeps it too.
    t.map(base, base, PAGE, rw(), MapFlags::empty()).unwrap();
    t.unmap(base, PAGE).unwrap();
    assert_eq!(t.frames_in_use(), 3);
    check_tables(&t);
    // Cleared: the empty table and its parent go.
    t.set_table_attrs(base, MIB2, TableAttrs::empty()).unwrap();
    assert_eq!(t.frames_in_use(), 1);
    assert_eq!(frames.in_use(), 1);
}

/// Setting attributes over a block splits it (break-before-make); changing those of
/// a live table with leaves invalidates everything below it; of an empty one, its
/// walk-cache entry.
#[test]
fn maintenance_when_attributes_change() {
    let mut t = PageTable::new(El2::new(39), HeapFrames::new(), RecordingTlb::new()).unwrap();
    t.map(GIB, GIB, GIB, rw(), MapFlags::empty()).unwrap();
    t.tlb_mut().clear();
    t.set_table_attrs(GIB, GIB, TableAttrs::NO_EXEC_EL2)
        .unwrap();
    let tr = t.translate(GIB + 0x1234).unwrap();
    assert_eq!(
        (tr.level, tr.output),
        (2, GIB + 0x1234),
        "split into 2 MiB blocks"
    );
    assert!(
        t.tlb().invalidations().contains(&TlbOp::El2Va {
            va: GIB,
            leaf: true
        }),
        "the block was invalidated: {:?}",
        t.tlb().invalidations()
    );
    t.tlb_mut().clear();
    t.set_table_attrs(GIB, GIB, TableAttrs::NO_WRITE).unwrap();
    assert_eq!(t.tlb().invalidations(), [TlbOp::El2All]);
    // With range invalidation: one non-leaf range over the GiB.
    t.set_tlbi_range(true);
    t.tlb_mut().clear();
    t.set_table_attrs(GIB, GIB, TableAttrs::empty()).unwrap();
    assert_eq!(
        t.tlb().invalidations(),
        [TlbOp::El2Range {
            va: GIB,
            pages: GIB / PAGE,
            leaf: false
        }]
    );
    // An empty table: only its walk-cache entry.
    t.set_tlbi_range(false);
    t.set_table_attrs(8 * GIB, GIB, TableAttrs::NO_WRITE)
        .unwrap();
    t.tlb_mut().clear();
    t.set_table_attrs(8 * GIB, GIB, TableAttrs::NO_EXEC_EL2)
        .unwrap();
    assert_eq!(
        t.tlb().invalidations(),
        [TlbOp::El2Va {
            va: 8 * GIB,
            leaf: false
        }]
    );
    // Unchanged: nothing.
    t.tlb_mut().clear();
    t.set_table_attrs(8 * GIB, GIB, TableAttrs::NO_EXEC_EL2)
        .unwrap();
    assert!(t.tlb().invalidations().is_empty());
}

#[test]
fn out_of_frames_changes_nothing() {
    let frames = HeapFrames::new();
    let mut t = PageTable::new(El1::new(2, 48), &frames, RecordingTlb::new()).unwrap();
    let ram = Attributes::new(Permissions::RW, MemoryType::Normal);
    t.map(0x40_0000_0000, 0, GIB, ram, MapFlags::empty())
        .unwrap();
    let before = t.to_string();
    // Two tables are needed (level 1 exists): one splits the block, one is new.
    frames.fail_after(Some(1));
    assert_eq!(
        t.set_table_attrs(0x40_0000_0000, MIB2, TableAttrs::NO_USER),
        Err(Error::OutOfFrames)
    );
    assert_eq!(t.to_string(), before);
    assert_eq!(frames.in_use(), t.frames_in_use());
    frames.fail_after(None);
    t.set_table_attrs(0x40_0000_0000, MIB2, TableAttrs::NO_USER)
        .unwrap();
    assert_eq!(t.table_attrs(0x40_0000_0000), TableAttrs::NO_USER);
    assert_eq!(t.translate(0x40_0000_0000).unwrap().level, 3);
    assert_eq!(t.translate(0x40_0020_0000).unwrap().level, 2);
}

//! One test per defect found in review: each fails on the code before its fix.

use mmu::testing::{HeapFrames, RecordingTlb};
use mmu::{Attributes, El2, MapFlags, PageTable, Permissions, Stage2};

const PAGE: u64 = 4096;

fn rw() -> Attributes {
    Attributes::normal(Permissions::RW)
}

/// An output address below the input's offset inside its 2 MiB region made the
/// level-3 fill loop add to an address that had already wrapped (debug builds panic).
#[test]
fn output_below_input_offset() {
    let mut t = PageTable::new(El2::new(39), HeapFrames::new(), RecordingTlb::new()).unwrap();
    t.map(0x1000, 0x0, 2 * PAGE, rw(), MapFlags::empty())
        .unwrap();
    assert_eq!(t.translate(0x1000).unwrap().output, 0);
    assert_eq!(t.translate(0x2abc).unwrap().output, 0x1abc);

    // The top of a 40-bit IPA space, mapped to the bottom of the PA space.
    let top = 1u64 << 40;
    let ram = Attributes::new(
        Permissions::RW | Permissions::EXEC_EL1 | Permissions::EXEC_EL0,
        mmu::MemoryType::Normal,
    );
    let mut s2 =
        PageTable::new(Stage2::new(1, 40), HeapFrames::new(), RecordingTlb::new()).unwrap();
    s2.map(top - 3 * PAGE, PAGE, 3 * PAGE, ram, MapFlags::empty())
        .unwrap();
    assert_eq!(s2.translate(top - 1).unwrap().output, 4 * PAGE - 1);
    assert_eq!(s2.translate(top - 3 * PAGE).unwrap().output, PAGE);
}

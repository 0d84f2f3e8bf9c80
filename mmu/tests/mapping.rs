//! `IdMap` and `LinearMap`: frame allocators over a `FrameSource`.

use std::cell::RefCell;
use std::rc::Rc;

use mmu::{
    Attributes, El2, FrameAllocator, FrameSource, LinearMap, MapFlags, NoTlbMaintenance, PageTable,
    Permissions, PhysToVirt,
};

#[repr(C, align(4096))]
struct Frame([u64; 512]);

/// A pool over a host buffer whose frames pretend to live at physical addresses from
/// `PA_BASE`; freed frames are recorded. Frames are handed out dirty.
struct Pool {
    free: Vec<u64>,
    freed: Rc<RefCell<Vec<u64>>>,
}

const PA_BASE: u64 = 0x8000_0000;

impl FrameSource for Pool {
    fn alloc(&mut self) -> Option<u64> {
        self.free.pop()
    }
    fn free(&mut self, pa: u64) {
        self.freed.borrow_mut().push(pa);
        self.free.push(pa);
    }
}

#[test]
fn linear_map_reaches_zeroes_and_returns_frames() {
    // Declared before the table, so it outlives it.
    let mut buf: Vec<Frame> = (0..8).map(|_| Frame([0xDEAD_BEEF; 512])).collect();
    let host = buf.as_mut_ptr() as u64;
    let freed = Rc::new(RefCell::new(Vec::new()));
    let pool = Pool {
        free: (0..8).rev().map(|i| PA_BASE + i * 4096).collect(),
        freed: freed.clone(),
    };
    let offset = host.wrapping_sub(PA_BASE);
    // SAFETY: frame `PA_BASE + k * 4096` is `buf[k]`, which outlives the allocator, used
    // by nothing else, handed out once by the pool.
    let mut frames = unsafe { LinearMap::new(pool, offset) };
    assert_eq!(frames.offset(), offset);
    assert_eq!(frames.phys_to_virt(PA_BASE + 4096) as u64, host + 4096);
    let pa = frames.alloc_frame().unwrap();
    assert_eq!(pa, PA_BASE);
    // SAFETY: `pa` is `buf[0]`, just handed out.
    let zeroed = unsafe { std::slice::from_raw_parts(frames.phys_to_virt(pa), 512) };
    assert!(zeroed.iter().all(|&w| w == 0), "handed out zeroed");
    frames.free_frame(pa);

    let mut t = PageTable::new(El2::new(39), frames, NoTlbMaintenance).unwrap();
    assert_eq!(t.root_address(), PA_BASE);
    let rw = Attributes::normal(Permissions::RW);
    t.map(0x4000_0000, 0x4000_0000, 4096, rw, MapFlags::empty())
        .unwrap();
    // The root's entry holds a table address in the pool's physical range.
    // SAFETY: `buf[0]` is the root frame.
    let root_entry = unsafe { buf.as_ptr().cast::<u64>().add(1).read() };
    let next = root_entry & 0xFFFF_FFFF_F000;
    assert!(
        (PA_BASE..PA_BASE + 8 * 4096).contains(&next),
        "{root_entry:#x}"
    );
    assert_eq!(t.translate(0x4000_0123).unwrap().output, 0x4000_0123);
    t.unmap(0x4000_0000, 4096).unwrap();
    assert_eq!(t.frames_in_use(), 1);
    drop(t);
    assert_eq!(
        freed.borrow().len(),
        4,
        "one test frame, two tables, the root"
    );
}

/// Frames reached at an address that is 8-byte but not 4 KiB aligned (all `PhysToVirt`
/// promises): a page unmapped from a group with the contiguous hint finds its group by
/// its index, not by the pointer's alignment.
#[test]
fn unaligned_frame_pointers_keep_contiguous_groups_right() {
    // 8 frames of 512 words after one word: every frame starts 8 bytes past a 4 KiB
    // boundary of the buffer (which itself is only 8-byte aligned).
    // Declared before the table, so it outlives it.
    let mut words = vec![0u64; 9 * 512];
    let host = words.as_mut_ptr() as u64 + 8;
    let pool = Pool {
        free: (0..8).rev().map(|i| PA_BASE + i * 4096).collect(),
        freed: Rc::new(RefCell::new(Vec::new())),
    };
    // SAFETY: frame `PA_BASE + k * 4096` is words `1 + 512 k ..` of `words`, which
    // outlives the allocator, used by nothing else, handed out once.
    let frames = unsafe { LinearMap::new(pool, host.wrapping_sub(PA_BASE)) };
    let mut t = PageTable::new(El2::new(39), frames, NoTlbMaintenance).unwrap();
    let rw = Attributes::normal(Permissions::RW);
    // Pages 16..48 of a level-3 table: two groups with the hint.
    let base = 0x4000_0000 + 16 * 4096;
    t.map(base, 0x9000_0000, 32 * 4096, rw, MapFlags::NO_BLOCKS)
        .unwrap();
    t.unmap(base + 3 * 4096, 4096).unwrap();
    // Raw entry `i` of the frame at `pa`, through the same offset.
    let raw = |pa: u64, i: usize| {
        // SAFETY: `words` outlives the table; reading a word the table wrote (no
        // operation runs concurrently).
        unsafe {
            (host as *const u64)
                .add(((pa - PA_BASE) / 8) as usize + i)
                .read()
        }
    };
    // Root entry 1 (GiB 1) -> level-2 table, its entry 0 -> the level-3 table.
    let l2 = raw(t.root_address(), 1) & 0xFFFF_FFFF_F000;
    let l3pa = raw(l2, 0) & 0xFFFF_FFFF_F000;
    let l3 = |i: usize| raw(l3pa, i);
    const CONT: u64 = 1 << 52;
    assert!(
        (16..32).all(|i| l3(i) & CONT == 0),
        "the page's group lost the hint: {:x?}",
        (16..32).map(l3).collect::<Vec<_>>()
    );
    assert_eq!(l3(19), 0);
    assert!(
        (32..48).all(|i| l3(i) & CONT != 0),
        "the other group kept it"
    );
    for k in 0..32u64 {
        let tr = t.translate(base + k * 4096);
        if k == 3 {
            assert!(tr.is_none(), "page 3 unmapped");
        } else {
            assert_eq!(
                tr.map(|t| t.output),
                Some(0x9000_0000 + k * 4096),
                "page {k}"
            );
        }
    }
    // Unmapping the rest page by page empties and frees the tables.
    for k in (0..32u64).filter(|&k| k != 3) {
        t.unmap(base + k * 4096, 4096).unwrap();
    }
    assert_eq!(t.frames_in_use(), 1);
}

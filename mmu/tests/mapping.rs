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
    let buf: &'static mut [Frame] = Box::leak(
        (0..8)
            .map(|_| Frame([0xDEAD_BEEF; 512]))
            .collect::<Vec<_>>()
            .into_boxed_slice(),
    );
    let host = buf.as_mut_ptr() as u64;
    let freed = Rc::new(RefCell::new(Vec::new()));
    let pool = Pool {
        free: (0..8).rev().map(|i| PA_BASE + i * 4096).collect(),
        freed: freed.clone(),
    };
    let offset = host.wrapping_sub(PA_BASE);
    // SAFETY: frame `PA_BASE + k * 4096` is `buf[k]`, leaked, used by nothing else,
    // handed out once by the pool.
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

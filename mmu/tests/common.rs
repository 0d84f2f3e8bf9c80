//! Helpers shared by the integration tests: raw table inspection.
#![allow(dead_code)]

use mmu::testing::HeapFrames;
use mmu::{
    Attributes, FrameAllocator, MapFlags, MemoryType, PageTable, Permissions, Regime, SwBits,
    TlbMaintenance,
};
use proptest::prelude::*;

pub const PAGE: u64 = 4096;
pub const MIB2: u64 = 2 << 20;
pub const GIB: u64 = 1 << 30;

/// Bits of the input address resolved at `level`.
pub fn shift(level: u8) -> u32 {
    12 + 9 * (3 - u32::from(level))
}

/// Reads descriptor `i` of the table frame at `pa` (a `HeapFrames` frame).
pub fn read(pa: u64, i: usize) -> u64 {
    let p = mmu::testing::frame_ptr(pa);
    assert!(!p.is_null(), "{pa:#x} is not a HeapFrames frame");
    // SAFETY: `p` is the host address of the simulated frame (or concatenated root)
    // at `pa`, which outlives the table, and `i` is in range.
    unsafe { p.add(i).read_volatile() }
}

/// Raw walk of `va`: the descriptor that ends the walk and its level.
pub fn raw_lookup<R: Regime, A: FrameAllocator, T: TlbMaintenance>(
    t: &PageTable<R, A, T>,
    va: u64,
) -> (u64, u8) {
    raw_lookup_at(t.root_address(), t.geometry().start_level(), va)
}

/// Raw walk of `va` from a root at `root` starting at `level`.
pub fn raw_lookup_at(root: u64, mut level: u8, va: u64) -> (u64, u8) {
    let mut table = root;
    let mut idx = (va >> shift(level)) as usize;
    loop {
        let d = read(table, idx);
        if d & 1 == 0 || level == 3 || d & 2 == 0 {
            return (d, level);
        }
        table = d & 0x0000_FFFF_FFFF_F000;
        level += 1;
        idx = ((va >> shift(level)) & 511) as usize;
    }
}

/// Calls `f(level, input address, descriptor)` for every valid entry reachable from
/// the root, tables before the entries below them.
pub fn for_each_entry<R: Regime, A: FrameAllocator, T: TlbMaintenance>(
    t: &PageTable<R, A, T>,
    mut f: impl FnMut(u8, u64, u64),
) {
    fn rec(pa: u64, level: u8, base: u64, entries: usize, f: &mut dyn FnMut(u8, u64, u64)) {
        for i in 0..entries {
            let d = read(pa, i);
            if d & 1 == 0 {
                continue;
            }
            let va = base + ((i as u64) << shift(level));
            f(level, va, d);
            if level < 3 && d & 2 != 0 {
                rec(d & 0x0000_FFFF_FFFF_F000, level + 1, va, 512, f);
            }
        }
    }
    let g = t.geometry();
    rec(
        t.root_address(),
        g.start_level(),
        0,
        g.root_entries(),
        &mut f,
    );
}

/// Every table entry reachable from the root: (level of the entry, input address it
/// covers, address of the next-level table).
pub fn table_entries<R: Regime, A: FrameAllocator, T: TlbMaintenance>(
    t: &PageTable<R, A, T>,
) -> Vec<(u8, u64, u64)> {
    let mut out = Vec::new();
    for_each_entry(t, |level, va, d| {
        if level < 3 && d & 3 == 3 {
            out.push((level, va, d & 0x0000_FFFF_FFFF_F000));
        }
    });
    out
}

/// Every valid leaf reachable from the root: (input address, level) -> descriptor.
pub fn raw_leaves<R: Regime, A: FrameAllocator, T: TlbMaintenance>(
    t: &PageTable<R, A, T>,
) -> std::collections::HashMap<(u64, u8), u64> {
    let mut out = std::collections::HashMap::new();
    for_each_entry(t, |level, va, d| {
        if level == 3 || d & 2 == 0 {
            out.insert((va, level), d);
        }
    });
    out
}

/// Number of non-root table frames reachable from the root.
pub fn reachable_tables<R: Regime, T: TlbMaintenance>(t: &PageTable<R, HeapFrames, T>) -> usize {
    table_entries(t).len()
}

/// Checks the crate's bookkeeping in table descriptors: bits [11:2] count the
/// non-zero entries of the next-level table, exactly.
pub fn check_counts<R: Regime, A: FrameAllocator, T: TlbMaintenance>(t: &PageTable<R, A, T>) {
    let g = t.geometry();
    fn rec(pa: u64, level: u8, entries: usize) {
        for i in 0..entries {
            let d = read(pa, i);
            if level < 3 && d & 3 == 3 {
                let next = d & 0x0000_FFFF_FFFF_F000;
                let live = (0..512).filter(|&j| read(next, j) != 0).count() as u64;
                assert_eq!(
                    (d >> 2) & 0x3FF,
                    live,
                    "count of table {next:#x} (L{})",
                    level + 1
                );
                // Tables with table attributes (held, bit 56) stay even when empty.
                if d & (1 << 56) == 0 {
                    assert_ne!(live, 0, "empty table {next:#x} left behind");
                }
                rec(next, level + 1, 512);
            }
        }
    }
    rec(t.root_address(), g.start_level(), g.root_entries());
}

/// A random operation of the property tests.
#[derive(Clone, Debug)]
pub enum Op {
    Map {
        va: u64,
        pages: u64,
        out: u64,
        attrs: usize,
        flags: MapFlags,
    },
    Unmap {
        va: u64,
        pages: u64,
    },
    Coalesce {
        va: u64,
        pages: u64,
    },
    Protect {
        va: u64,
        pages: u64,
        attrs: usize,
    },
    SetSw {
        va: u64,
        pages: u64,
        sw: u8,
    },
    /// `set_table_attrs` over `va .. va + size` (2 MiB or 1 GiB multiples) with
    /// `TableAttrs::from_bits_truncate(attrs)`.
    TableAttrs {
        va: u64,
        size: u64,
        attrs: u8,
    },
}

/// Input addresses that make blocks, splits and merges likely, inside 4 GiB.
pub fn addr() -> impl Strategy<Value = u64> {
    (
        0..4u64,
        prop::sample::select(vec![0u64, 1, 2, 511]),
        prop::sample::select(vec![0u64, 1, 3, 510]),
    )
        .prop_map(|(g, m, p)| g * GIB + m * MIB2 + p * PAGE)
}

pub fn pages() -> impl Strategy<Value = u64> {
    prop::sample::select(vec![1u64, 2, 5, 511, 512, 513, 1024, 1536])
}

pub fn op(n_attrs: usize) -> impl Strategy<Value = Op> {
    let flags = prop::sample::select(vec![
        MapFlags::empty(),
        MapFlags::REPLACE,
        MapFlags::NO_BLOCKS,
        MapFlags::REPLACE | MapFlags::NO_BLOCKS,
    ]);
    let out_delta = prop::sample::select(vec![0u64, GIB, 3 * GIB + 2 * MIB2, 5 * PAGE, 7 * GIB]);
    prop_oneof![
        4 => (addr(), pages(), out_delta, 0..n_attrs, flags)
            .prop_map(|(va, pages, d, attrs, flags)| Op::Map { va, pages, out: va + d, attrs, flags }),
        1 => (0..4u64).prop_map(|g| Op::Map { va: g * GIB, pages: GIB / PAGE, out: 8 * GIB, attrs: 0, flags: MapFlags::REPLACE }),
        3 => (addr(), pages()).prop_map(|(va, pages)| Op::Unmap { va, pages }),
        1 => (0..4u64, 1..3u64).prop_map(|(g, n)| Op::Unmap { va: g * GIB, pages: n * GIB / PAGE }),
        2 => (addr(), pages(), 0..n_attrs).prop_map(|(va, pages, attrs)| Op::Protect { va, pages, attrs }),
        1 => (addr(), pages(), 0..16u8).prop_map(|(va, pages, sw)| Op::SetSw { va, pages, sw }),
        1 => (0..4u64, 1..3u64).prop_map(|(g, n)| Op::Coalesce { va: g * GIB, pages: n * GIB / PAGE }),
        1 => (0..4u64, prop::sample::select(vec![0u64, 1, 511]), prop::bool::ANY, 0..32u8)
            .prop_map(|(g, m, gib, attrs)| if gib {
                Op::TableAttrs { va: g * GIB, size: GIB, attrs }
            } else {
                Op::TableAttrs { va: g * GIB + m * MIB2, size: MIB2, attrs }
            }),
    ]
}

pub fn el2_attrs() -> Vec<Attributes> {
    vec![
        Attributes::normal(Permissions::RW),
        Attributes::normal(Permissions::READ | Permissions::EXEC_EL2),
        Attributes::normal(Permissions::RO),
        Attributes::device(),
        Attributes::normal(Permissions::RW).with_sw(SwBits::new(3).unwrap()),
    ]
}

pub fn s2_attrs() -> Vec<Attributes> {
    let x = Permissions::EXEC_EL1 | Permissions::EXEC_EL0;
    vec![
        Attributes::normal(Permissions::RW | x),
        Attributes::normal(Permissions::RO),
        Attributes::new(Permissions::RW, MemoryType::NormalNonCacheable),
        Attributes::device(),
        Attributes::normal(Permissions::empty()).with_sw(SwBits::new(1).unwrap()),
    ]
}

pub fn s2_xnx_attrs() -> Vec<Attributes> {
    vec![
        Attributes::normal(Permissions::RW | Permissions::EXEC_EL1),
        Attributes::normal(Permissions::READ | Permissions::EXEC_EL0),
        Attributes::new(Permissions::RW, MemoryType::NormalNonCacheable),
        Attributes::new(Permissions::WRITE, MemoryType::DeviceNGnRnE),
        Attributes::normal(Permissions::RW | Permissions::EXEC_EL1 | Permissions::EXEC_EL0),
    ]
}

pub fn el1_attrs() -> Vec<Attributes> {
    vec![
        Attributes::normal(Permissions::RW),
        Attributes::normal(Permissions::READ | Permissions::EXEC_EL1),
        Attributes::normal(Permissions::RW | Permissions::USER),
        Attributes::normal(Permissions::READ | Permissions::USER | Permissions::EXEC_EL0),
        Attributes::new(Permissions::RW, MemoryType::DeviceNGnRnE),
    ]
}

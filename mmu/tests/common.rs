//! Helpers shared by the integration tests: raw table inspection.
#![allow(dead_code)]

use mmu::testing::ops::{read, Op};
use mmu::testing::HeapFrames;
use mmu::{FrameAllocator, MapFlags, PageTable, Regime, TlbMaintenance};
use proptest::prelude::*;

pub const PAGE: u64 = 4096;
pub const MIB2: u64 = 2 << 20;
pub const GIB: u64 = 1 << 30;

/// Bits of the input address resolved at `level`.
pub fn shift(level: u8) -> u32 {
    12 + 9 * (3 - u32::from(level))
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

/// A random operation, with attribute indices below `n_attrs`.
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

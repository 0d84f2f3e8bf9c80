//! The workloads, each one generic function over [`Adapter`], and their fixed inputs.
//!
//! Layout: the 1 GiB region of W1/W2 starts at [`BASE`] = 1 GiB + 2 MiB, so it is 2 MiB but
//! not 1 GiB aligned: with blocks allowed it takes 512 blocks of 2 MiB under two level-2
//! tables (a 1 GiB-aligned region would be a single level-1 descriptor and measure nothing).
//! Output addresses are the input address plus [`PA_OFFSET`] (not an identity map).
//! Random inputs come from a fixed-seed SplitMix64, so every crate and every run gets the
//! same addresses in the same order.

use crate::{Adapter, PAGE};

/// 1 GiB.
pub const GIB: u64 = 1 << 30;
/// 2 MiB.
pub const MIB2: u64 = 2 << 20;
/// Start of the W1/W2 region.
pub const BASE: u64 = GIB + MIB2;
/// Size of the W1/W2 region.
pub const SIZE: u64 = GIB;
/// Output address minus input address for every mapping.
pub const PA_OFFSET: u64 = 512 * GIB;
/// The input address space of W3: `[0, 512 GiB)`.
pub const SPACE: u64 = 512 * GIB;
/// Number of pages of W3.
pub const W3_PAGES: usize = 65_536;
/// Number of lookups of W4.
pub const W4_LOOKUPS: usize = 1_000_000;
/// Start of W6's read-only range (256 MiB into the W1 region).
pub const W6_START: u64 = BASE + 256 * (1 << 20);
/// Size of W6's read-only range.
pub const W6_SIZE: u64 = 64 << 20;
/// Seed of every random input.
pub const SEED: u64 = 0x7477_6f73_7461_6765;

/// SplitMix64: small, fast, and the same sequence everywhere.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator starting from `seed`.
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// `count` distinct random page-aligned addresses below `space`, in generation order.
#[must_use]
pub fn random_pages(count: usize, space: u64, seed: u64) -> Vec<u64> {
    let mut rng = SplitMix64::new(seed);
    let mut seen = std::collections::BTreeSet::new();
    let mut pages = Vec::with_capacity(count);
    while pages.len() < count {
        let va = (rng.next_u64() % (space / PAGE)) * PAGE;
        if seen.insert(va) {
            pages.push(va);
        }
    }
    pages
}

/// W3's input: [`W3_PAGES`] distinct random pages in [`SPACE`].
#[must_use]
pub fn w3_pages() -> Vec<u64> {
    random_pages(W3_PAGES, SPACE, SEED)
}

/// `count` random addresses (not aligned): even draws inside the W1 region, odd draws in the
/// unmapped gigabyte right after it, so half hit and half miss.
#[must_use]
pub fn lookups(count: usize, seed: u64) -> Vec<u64> {
    let mut rng = SplitMix64::new(seed);
    (0..count)
        .map(|i| {
            let offset = rng.next_u64() % SIZE;
            if i % 2 == 0 {
                BASE + offset
            } else {
                BASE + SIZE + offset
            }
        })
        .collect()
}

/// W4's input: [`W4_LOOKUPS`] addresses.
#[must_use]
pub fn w4_lookups() -> Vec<u64> {
    lookups(W4_LOOKUPS, SEED ^ 4)
}

/// W1: map the region with 4 KiB pages only.
pub fn w1<A: Adapter>(table: &mut A) {
    table.map_range(BASE, BASE + PA_OFFSET, SIZE, false);
}

/// W2: map the region with blocks allowed.
pub fn w2<A: Adapter>(table: &mut A) {
    table.map_range(BASE, BASE + PA_OFFSET, SIZE, true);
}

/// W3: map each page of `pages`, one call per page, output frames consecutive.
pub fn w3<A: Adapter>(table: &mut A, pages: &[u64]) {
    for (i, &va) in pages.iter().enumerate() {
        table.map_page(va, PA_OFFSET + i as u64 * PAGE);
    }
}

/// W4: translate every address of `addrs` (over a W1 table); returns a checksum of the
/// results so the lookups cannot be optimised away.
pub fn w4<A: Adapter>(table: &A, addrs: &[u64]) -> u64 {
    let mut sum = 0u64;
    for &va in addrs {
        match table.translate(va) {
            Some((pa, writable)) => sum = sum.wrapping_add(pa ^ u64::from(writable)),
            None => sum = sum.rotate_left(1),
        }
    }
    sum
}

/// W5: unmap the whole W1 region.
pub fn w5<A: Adapter>(table: &mut A) {
    table.unmap_range(BASE, SIZE);
}

/// W6: make a 64 MiB range inside the W1 region read-only.
pub fn w6<A: Adapter>(table: &mut A) {
    table.protect_read_only(W6_START, W6_SIZE);
}

/// W8's blocks: one per GiB from here to the end of the 512 GiB input space.
pub const W8_FIRST: u64 = 256 * GIB;
/// Number of W8's calls.
pub const W8_BLOCKS: u64 = 256;

/// W7: unmap the W1 region page by page, one call per page (262,144 calls).
pub fn w7<A: Adapter>(table: &mut A) {
    let mut va = BASE;
    while va < BASE + SIZE {
        table.unmap_range(va, PAGE);
        va += PAGE;
    }
}

/// W8: map 256 separate 1 GiB blocks (input and output 1 GiB aligned), one call each,
/// each into an empty slot of the table: the fixed cost of one map call, repeated so
/// that it stands out of the measurement's noise.
pub fn w8<A: Adapter>(table: &mut A) {
    for k in 0..W8_BLOCKS {
        let va = W8_FIRST + k * GIB;
        table.map_range(va, va + PA_OFFSET, GIB, true);
    }
}

/// A table after W1, the starting state of W4, W5, W6 and W7.
#[must_use]
pub fn after_w1<A: Adapter>() -> A {
    let mut table = A::new();
    w1(&mut table);
    table
}

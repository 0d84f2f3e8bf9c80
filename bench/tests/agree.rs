//! All adapters must produce the same translations as a simple model on a small workload
//! that exercises every operation the benchmarks time (pages, blocks, single pages,
//! read-only ranges, unmapped ranges), and must free or keep frames consistently.

use mmu::{El2, Stage2};
use mmu_bench::mmu::Mmu;
use mmu_bench::paging::Paging;
use mmu_bench::workload::{lookups, random_pages, BASE, MIB2, PA_OFFSET, SPACE};
use mmu_bench::{Adapter, PAGE};

/// A small cousin of W1-W6: 8 MiB of pages, 8 MiB with blocks, 256 random pages, a
/// read-only hole and an unmapped hole. Returns the translation of every probe address.
fn run<A: Adapter>(probes: &[u64]) -> Vec<Option<(u64, bool)>> {
    let mut t = A::new();
    let pages_region = BASE;
    let blocks_region = BASE + 8 * MIB2;
    t.map_range(pages_region, pages_region + PA_OFFSET, 4 * MIB2, false);
    t.map_range(blocks_region, blocks_region + PA_OFFSET, 4 * MIB2, true);
    for (i, &va) in random_pages(256, SPACE, 99).iter().enumerate() {
        // Keep the random pages clear of the two regions.
        if !(BASE..BASE + 128 * MIB2).contains(&va) {
            t.map_page(va, PA_OFFSET + i as u64 * PAGE);
        }
    }
    t.protect_read_only(pages_region + MIB2, MIB2);
    t.unmap_range(pages_region + 2 * MIB2, MIB2);
    probes.iter().map(|&va| t.translate(va)).collect()
}

fn probes() -> Vec<u64> {
    let mut p = lookups(2000, 1)
        .into_iter()
        .map(|va| BASE + (va - BASE) % (16 * MIB2))
        .collect::<Vec<_>>();
    p.extend(random_pages(256, SPACE, 99).iter().map(|va| va + 0x123));
    p
}

/// What every crate must answer.
fn model(va: u64) -> Option<(u64, bool)> {
    let pages = BASE..BASE + 4 * MIB2;
    let blocks = BASE + 8 * MIB2..BASE + 12 * MIB2;
    if pages.contains(&va) {
        let off = va - BASE;
        if (2 * MIB2..3 * MIB2).contains(&off) {
            return None;
        }
        let writable = !(MIB2..2 * MIB2).contains(&off);
        return Some((va + PA_OFFSET, writable));
    }
    if blocks.contains(&va) {
        return Some((va + PA_OFFSET, true));
    }
    let page = va & !(PAGE - 1);
    random_pages(256, SPACE, 99)
        .iter()
        .position(|&p| p == page && !(BASE..BASE + 128 * MIB2).contains(&p))
        .map(|i| (PA_OFFSET + i as u64 * PAGE + (va & (PAGE - 1)), true))
}

fn check<A: Adapter>() {
    let probes = probes();
    let got = run::<A>(&probes);
    let mut mapped = 0;
    for (&va, got) in probes.iter().zip(&got) {
        assert_eq!(*got, model(va), "{} at {va:#x}", A::NAME);
        mapped += usize::from(got.is_some());
    }
    // The probes must exercise both outcomes.
    assert!(
        mapped > 500 && mapped < probes.len() - 500,
        "{mapped} mapped"
    );
}

#[test]
fn mmu_matches_model() {
    check::<Mmu<El2>>();
}

#[test]
fn mmu_with_contiguous_hint_matches_model() {
    check::<Mmu<El2, 39, true>>();
}

/// The 48-bit, four-level table the benchmarks report as `mmu-48`.
#[test]
fn mmu_48_matches_model() {
    check::<Mmu<El2, 48>>();
}

#[test]
fn mmu_stage2_matches_model() {
    check::<Mmu<Stage2>>();
}

#[test]
fn aarch64_paging_matches_model() {
    check::<Paging>();
}

#[cfg(target_arch = "aarch64")]
#[test]
fn page_table_multiarch_matches_model() {
    check::<mmu_bench::multiarch::Multiarch>();
}

/// After mapping and unmapping the same range, the table frames a crate keeps are the
/// ones the benchmark reports; counting must at least see the root and the subtables.
fn frames_counted<A: Adapter>() {
    let mut t = A::new();
    let root_only = t.frames_in_use();
    assert!(root_only >= 1);
    t.map_range(BASE, BASE + PA_OFFSET, 4 * MIB2, false);
    // Four level-3 tables at least, plus a level-2 table.
    assert!(t.frames_in_use() >= root_only + 5, "{}", A::NAME);
    drop(t);
}

#[test]
fn mmu_frames_counted() {
    frames_counted::<Mmu<El2>>();
    frames_counted::<Mmu<Stage2>>();
}

#[test]
fn aarch64_paging_frames_counted() {
    frames_counted::<Paging>();
}

#[cfg(target_arch = "aarch64")]
#[test]
fn page_table_multiarch_frames_counted() {
    frames_counted::<mmu_bench::multiarch::Multiarch>();
}

/// The split/merge workloads do what their names say, on both regimes, and `mmu`'s own
/// frame count agrees with the benchmark's allocator hook.
fn split_merge<R: mmu_bench::mmu::BenchRegime>() {
    use mmu_bench::mmu::{block_mapped, merge, split, SPLIT_PAGE};
    let mut t = block_mapped::<R>();
    let block = t.frames_in_use();
    assert_eq!(block, t.own_frame_count());
    split(&mut t);
    assert_eq!(
        t.frames_in_use(),
        block + 1,
        "split takes one level-3 table"
    );
    assert_eq!(
        t.translate(SPLIT_PAGE),
        Some((SPLIT_PAGE + PA_OFFSET, false))
    );
    assert_eq!(
        t.translate(SPLIT_PAGE + PAGE),
        Some((SPLIT_PAGE + PAGE + PA_OFFSET, true))
    );
    merge(&mut t);
    assert_eq!(t.frames_in_use(), block, "merge frees the level-3 table");
    assert_eq!(t.own_frame_count(), block);
    assert_eq!(
        t.translate(SPLIT_PAGE),
        Some((SPLIT_PAGE + PA_OFFSET, true))
    );
}

#[test]
fn mmu_split_and_merge() {
    split_merge::<El2>();
    split_merge::<Stage2>();
}

/// `mmu` frees every table but the root when a whole mapping is unmapped.
#[test]
fn mmu_unmap_frees_tables() {
    let mut t = Mmu::<El2>::new();
    let root = t.frames_in_use();
    t.map_range(BASE, BASE + PA_OFFSET, 4 * MIB2, false);
    t.unmap_range(BASE, 4 * MIB2);
    assert_eq!(t.frames_in_use(), root);
    assert_eq!(t.own_frame_count(), root);
}

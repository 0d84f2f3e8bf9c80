//! Side-by-side benchmarks of `mmu` against `aarch64-paging` and `page_table_multiarch`.
//!
//! Every crate is driven through one small trait, [`Adapter`], so each workload
//! (W1-W8, see [`workload`]) is a single generic function and all crates do exactly the
//! same work. Each adapter allocates its table frames through a counting hook backed by the
//! same host allocator ([`frames`]), so frame counts are comparable and allocation costs
//! the same for everybody.
//!
//! `page_table_multiarch` only builds its AArch64 table for `target_arch = "aarch64"`; its
//! adapter exists on that architecture only, and the benchmarks that include it run as an
//! `aarch64-unknown-linux-gnu` build under `qemu-aarch64` (see `docs/BENCHMARKS.md`).
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

pub mod frames;
pub mod mmu;
#[cfg(target_arch = "aarch64")]
pub mod multiarch;
pub mod paging;
pub mod report;
pub mod workload;

/// A page-table crate under test, reduced to what the workloads need.
///
/// Addresses are plain `u64`s: input (virtual or intermediate-physical) addresses in,
/// output addresses out. Every mapping is normal, cacheable, read-write memory unless
/// [`Adapter::protect_read_only`] changed it. Errors are bugs of the benchmark setup,
/// not measured behaviour, so adapters panic on them.
pub trait Adapter {
    /// Short name used in benchmark ids and tables.
    const NAME: &'static str;

    /// Creates an empty table able to hold input addresses below 512 GiB.
    fn new() -> Self;

    /// Maps `[va, va + size)` to `[pa, pa + size)`; `blocks` allows block descriptors
    /// (2 MiB, 1 GiB) where alignment permits, otherwise only 4 KiB pages are written.
    fn map_range(&mut self, va: u64, pa: u64, size: u64, blocks: bool);

    /// Maps one 4 KiB page.
    fn map_page(&mut self, va: u64, pa: u64);

    /// Translates one address: `Some((output address, writable))` when mapped.
    fn translate(&self, va: u64) -> Option<(u64, bool)>;

    /// Unmaps `[va, va + size)`.
    fn unmap_range(&mut self, va: u64, size: u64);

    /// Makes `[va, va + size)` read-only, keeping the output addresses.
    fn protect_read_only(&mut self, va: u64, size: u64);

    /// Table frames (4 KiB) currently allocated by this table, the root included.
    fn frames_in_use(&self) -> usize;
}

/// 4 KiB, the translation granule every crate uses here.
pub const PAGE: u64 = 4096;

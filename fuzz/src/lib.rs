//! Coverage-guided fuzz targets for twostage (docs/fuzzing.md). Each module is one target:
//! `run(data)` reads the input, drives the crate's own entry points and panics when an
//! invariant breaks; `fuzz_targets/<name>.rs` hands libFuzzer's input to it, and
//! [`seeds`] writes the committed seed corpus.

pub mod config_dtb;
pub mod input;
pub mod linux_image;
pub mod mmu_ops;
pub mod seeds;
pub mod share_calls;
pub mod vcpu_exits;
pub mod world;

/// Runs `data` through target `name` (the corpus replay of the tests); unknown names
/// panic.
///
/// # Panics
///
/// When the target finds a fault, or `name` is no target.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "mmu_ops" => mmu_ops::run(data),
        "config_dtb" => config_dtb::run(data),
        "linux_image" => linux_image::run(data),
        "share_calls" => share_calls::run(data),
        "vcpu_exits" => vcpu_exits::run(data),
        _ => panic!("no fuzz target {name}"),
    }
}

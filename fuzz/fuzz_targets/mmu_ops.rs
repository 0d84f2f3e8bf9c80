//! libFuzzer entry of the `mmu_ops` target: `twostage_fuzz::mmu_ops`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| twostage_fuzz::mmu_ops::run(data));

//! libFuzzer entry of the `vcpu_exits` target: `twostage_fuzz::vcpu_exits`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| twostage_fuzz::vcpu_exits::run(data));

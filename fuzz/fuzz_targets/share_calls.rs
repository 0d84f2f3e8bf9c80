//! libFuzzer entry of the `share_calls` target: `twostage_fuzz::share_calls`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| twostage_fuzz::share_calls::run(data));

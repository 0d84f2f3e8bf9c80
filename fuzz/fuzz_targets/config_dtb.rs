//! libFuzzer entry of the `config_dtb` target: `twostage_fuzz::config_dtb`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| twostage_fuzz::config_dtb::run(data));

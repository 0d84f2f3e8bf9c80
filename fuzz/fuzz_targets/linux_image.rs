//! libFuzzer entry of the `linux_image` target: `twostage_fuzz::linux_image`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| twostage_fuzz::linux_image::run(data));

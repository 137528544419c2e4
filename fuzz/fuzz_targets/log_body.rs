//! A log chunk body as capture decodes it. See `pgrelay::fuzz::log_body`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgrelay::fuzz::log_body(data));

//! A REST request line, query string and body. See `pgrelay::fuzz::rest_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgrelay::fuzz::rest_request(data));

//! Filter, select and events keys, evaluated on rows. See `pgrelay::fuzz::filter`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgrelay::fuzz::filter(data));

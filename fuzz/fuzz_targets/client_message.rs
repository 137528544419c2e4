//! A WebSocket text message from a client. See `pgrelay::fuzz::client_message`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgrelay::fuzz::client_message(data));

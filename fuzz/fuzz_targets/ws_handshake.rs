//! A WebSocket opening handshake and its query string. See `pgrelay::fuzz::ws_handshake`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgrelay::fuzz::ws_handshake(data));

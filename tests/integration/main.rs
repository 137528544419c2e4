//! Integration tests: a real PostgreSQL (each test on its own database), the relay in
//! process, real WebSocket clients. See `scripts/test.sh` for how PostgreSQL is found.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod auth;
mod bench;
mod browser;
mod clients;
mod demo;
mod filters;
mod install;
mod limits;
mod long;
mod model;
mod partitions;
mod poll;
mod protocol;
mod realtime;
mod recovery;
mod regressions;
mod replicas;
mod rest;
mod resume;
mod review;
mod rfc6455;
mod schema;
mod security;
mod shutdown;
mod slow;
mod snapshot;
mod soak;
mod sse;
mod stream;
mod support;
mod tls;
mod values;
mod wake;

//! Integration tests: a real PostgreSQL (each test on its own database), the relay in
//! process, real WebSocket clients. See `scripts/test.sh` for how PostgreSQL is found.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod filters;
mod install;
mod protocol;
mod recovery;
mod rest;
mod resume;
mod shutdown;
mod slow;
mod snapshot;
mod stream;
mod support;

//! Command-line tools that are clients of the library, one file per command.

pub mod demo;

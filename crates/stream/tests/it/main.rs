//! Integration tests of the dataflow engine (one test binary).

// A failed unwrap is a failed test (clippy.toml allows it in #[test] fns only).
#![allow(clippy::unwrap_used)]

mod async_io;
mod checkpoints;
mod dataflow;
mod global_windows;
mod joins;
mod library;
mod process;
mod windows;

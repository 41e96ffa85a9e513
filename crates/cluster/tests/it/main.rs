//! Integration tests of sluice-cluster: one binary, one module per concern.

// A failed unwrap is a failed test (clippy.toml allows it in #[test] fns only).
#![allow(clippy::unwrap_used)]

mod cluster;
mod crash;
mod framing;
mod liveness;
mod router;
mod storage;
mod support;

//! Integration tests of sluice-cluster: one binary, one module per concern.

mod cluster;
mod crash;
mod framing;
mod liveness;
mod router;
mod storage;
mod support;

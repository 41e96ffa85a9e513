//! Integration tests of the Kafka front end: an in-process single node (a
//! cluster of one voter, `sluice-testkit`) on 127.0.0.1:0 in a temporary
//! directory, driven with raw TCP and kafka-protocol messages, and with
//! rdkafka as a real client.

// A failed unwrap is a failed test (clippy.toml allows it in #[test] fns only).
#![allow(clippy::unwrap_used)]

mod bad_input;
mod client;
mod data;
mod fuzz;
mod harness;
mod lifecycle;
mod protocol;

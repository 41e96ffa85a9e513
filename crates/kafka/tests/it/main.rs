//! Integration tests of the Kafka front end: an in-process server on
//! 127.0.0.1:0 over a Store in a temporary directory, driven with raw TCP
//! and kafka-protocol messages, and with rdkafka as a real client.

mod bad_input;
mod client;
mod data;
mod fuzz;
mod harness;
mod lifecycle;
mod protocol;

//! `sluice-vocab`: Kafka's terms, spelled once for every Sluice crate.
//!
//! - [`ErrorCode`]: every Kafka error code with its wire number, retriable flag and
//!   name. Crates answer `Result<_, ErrorCode>` (or an error type that names one, see
//!   [`KafkaError`]) and only the wire front end turns it into the `i16` of a response.
//! - [`TopicName`]: the one topic-name rule.
//! - [`TopicConfig`]: topic configs with typed values, one parser and one set of
//!   limits, used by the storage engine, the metadata quorum (which validates inside
//!   `apply`) and the replication layer (`min.insync.replicas`).
//! - [`internal`]: which topics are the broker's own, and how they are configured.
//! - [`now_ms`]: the wall clock in Kafka's unit.
//!
//! *Architecture invariant:* this crate is a leaf. It knows no wire format, no storage
//! and no consensus, so every other crate may depend on it.

mod clock;
mod config;
mod error_code;
mod error_code_table;
pub mod internal;
mod partitioner;
mod topic;

pub use clock::now_ms;
pub use config::{CompressionType, ConfigError, ConfigType, Ratio, TimestampType, TopicConfig};
pub use error_code::{KafkaError, Refused};
pub use error_code_table::ErrorCode;
pub use partitioner::partition_for_key;
pub use topic::{InvalidTopicName, TopicName, MAX_TOPIC_NAME_LEN};

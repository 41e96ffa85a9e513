//! Sluice's storage engine.
//!
//! A [`Store`] owns a data directory of topics; a topic has partitions; a
//! [`Partition`] is a sequence of segments (log file + sparse offset index +
//! time index). Records are kept exactly as Kafka RecordBatch v2 bytes: they
//! are validated once on append (length, magic, CRC-32C, record count), the
//! base offset and partition leader epoch are stamped in, and reads hand the
//! stored bytes back without decoding records.
//!
//! On-disk layout, per partition directory `<data_dir>/<topic>-<partition>/`:
//! `<base offset, 20 digits>.log` (stored batches), `.index` (sparse: relative
//! offset u32 + position u32 every `index.interval.bytes`), `.timeindex`
//! (max timestamp i64 + relative offset u32), `log-start-offset` and
//! `leader-epoch-checkpoint`. Topic metadata, the cluster id and the
//! producer-id block live in `<data_dir>/meta/`.
//!
//! Replication (cluster mode) sits on top: a partition's high watermark
//! is the durable end in local mode and moves only by
//! [`Partition::advance_high_watermark`] once [`Partition::set_replicated`]
//! hands it to the replication layer; followers store the leader's batches
//! unchanged with [`Partition::append_replica`] and cut divergent suffixes
//! with [`Partition::truncate_to`]; [`Store::ensure_topic`] makes a topic
//! match the metadata quorum. See the crate README.
//!
//! API CONTRACT — other crates are written against the public signatures;
//! do not change one without telling the lead.

mod batch;
mod cleaner;
mod config;
mod descriptors;
mod epoch;
mod error;
mod fsutil;
mod index;
mod metrics;
mod partition;
mod producer;
mod records;
mod segment;
mod store;
mod txn;

use std::collections::BTreeMap;

use bytes::Bytes;

pub use batch::{count_records, validate_batches, BatchHeader};
pub use config::{CleanerConfig, FlushPolicy, StoreConfig, TopicConfig};
pub use descriptors::{segment_file_stats, set_segment_file_budget, DescriptorStats};
pub use error::LogError;
pub use fsutil::{disk_space, DiskSpace};
pub use index::set_index_page_entries;
pub use metrics::{hot_path_metrics, log_metrics, set_hot_path_metrics, LogMetrics};
pub use partition::{CleanStats, Partition};
pub use producer::ActiveProducer;
pub use records::{BatchBuilder, PlainRecords, RecordsError, StoredRecord};
pub use store::Store;
pub use txn::{AbortedTxn, Marker};

/// A topic's description.
#[derive(Clone, Debug)]
pub struct TopicInfo {
    pub name: String,
    /// Random, stable across restarts (Kafka's topic id).
    pub id: [u8; 16],
    pub partitions: u32,
    /// Effective config (defaults + overrides).
    pub config: TopicConfig,
    /// Keys set explicitly on this topic.
    pub overrides: BTreeMap<String, String>,
    /// Internal topics start with "__" (e.g. `__consumer_offsets`).
    pub internal: bool,
}

/// Where reads stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadLimit {
    /// Consumers: up to the high watermark.
    HighWatermark,
    /// `read_committed` consumers: up to the last stable offset.
    LastStable,
    /// Replicas: up to the log end offset.
    LogEnd,
}

/// Result of a successful [`Partition::append`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendResult {
    /// Offset given to the first record.
    pub base_offset: i64,
    /// One past the last record's offset: wait for this with [`Partition::wait_durable`].
    pub end_offset: i64,
    pub log_start_offset: i64,
    /// True when the batch was an idempotent producer's retry of a batch
    /// already in the log; offsets then describe the original.
    pub duplicate: bool,
    /// The broker time the batches were stamped with on a LogAppendTime
    /// topic; -1 on a CreateTime one (Kafka's `log_append_time_ms`).
    pub log_append_time_ms: i64,
}

/// Result of [`Partition::read`].
#[derive(Clone, Debug)]
pub struct ReadResult {
    /// Whole stored record batches, starting with the batch that holds the
    /// requested offset.
    pub records: Bytes,
    /// The offset after the last record returned (the requested offset
    /// when none is).
    pub next_offset: i64,
    pub high_watermark: i64,
    pub log_start_offset: i64,
    pub log_end_offset: i64,
}

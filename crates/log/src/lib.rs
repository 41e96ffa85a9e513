//! Sluice's storage engine.
//!
//! A [`Store`] owns a data directory of topics; a topic has partitions; a
//! [`Partition`] is a sequence of segments (log file + sparse offset index +
//! time index). Records are kept exactly as Kafka RecordBatch v2 bytes: they
//! are validated once on append (length, magic, CRC-32C, record count), the
//! base offset and partition leader epoch are stamped in, and reads hand the
//! stored bytes back without decoding records.
//!
//! API CONTRACT — other crates are written against the signatures below.
//! Bodies marked `unimplemented!` are being filled in; do not change a
//! signature without telling the lead.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;

/// Errors of the storage engine. Each maps to one Kafka error code in the
/// front end (noted per variant).
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// CORRUPT_MESSAGE (2): bad CRC, bad length, bad magic, record count mismatch.
    #[error("corrupt record batch: {0}")]
    CorruptBatch(String),
    /// INVALID_RECORD (87): structurally valid but not acceptable (e.g. non-zero base offset rules).
    #[error("invalid record: {0}")]
    InvalidRecord(String),
    /// MESSAGE_TOO_LARGE (10): a batch above the topic's max.message.bytes.
    #[error("record batch of {size} bytes exceeds max.message.bytes {max}")]
    MessageTooLarge { size: usize, max: usize },
    /// OUT_OF_ORDER_SEQUENCE_NUMBER (45)
    #[error("out of order sequence for producer {producer_id}: expected {expected}, got {got}")]
    OutOfOrderSequence { producer_id: i64, expected: i32, got: i32 },
    /// INVALID_PRODUCER_EPOCH (47) / PRODUCER_FENCED (90)
    #[error("producer {producer_id} epoch {got} is older than current epoch {current}")]
    InvalidProducerEpoch { producer_id: i64, current: i16, got: i16 },
    /// OFFSET_OUT_OF_RANGE (1)
    #[error("offset {offset} out of range [{log_start}, {log_end}]")]
    OffsetOutOfRange { offset: i64, log_start: i64, log_end: i64 },
    /// UNKNOWN_TOPIC_OR_PARTITION (3)
    #[error("unknown topic or partition {0}")]
    UnknownTopicOrPartition(String),
    /// TOPIC_ALREADY_EXISTS (36)
    #[error("topic {0} already exists")]
    TopicAlreadyExists(String),
    /// INVALID_TOPIC_EXCEPTION (17)
    #[error("invalid topic name {0:?}: {1}")]
    InvalidTopic(String, &'static str),
    /// INVALID_PARTITIONS (37)
    #[error("invalid partitions: {0}")]
    InvalidPartitions(String),
    /// INVALID_CONFIG (40)
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    /// KAFKA_STORAGE_ERROR (56): the disk failed us; the partition is unusable.
    #[error("storage error: {0}")]
    Io(#[from] std::io::Error),
}

/// When appended bytes are forced to disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushPolicy {
    /// fdatasync before an append is acknowledged. Concurrent appends share
    /// one fsync (group commit). The default.
    Always,
    /// fsync in the background once `ms` milliseconds or `bytes` bytes have
    /// accumulated since the last one; acknowledgements do not wait.
    Interval { ms: u64, bytes: u64 },
    /// Never fsync explicitly; for deployments that rely on replication.
    Never,
}

/// Per-topic configuration, with Kafka's names and defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicConfig {
    /// `segment.bytes` (default 1 GiB)
    pub segment_bytes: u64,
    /// `segment.ms` (default 7 days)
    pub segment_ms: u64,
    /// `retention.ms` (default 7 days, -1 = forever)
    pub retention_ms: i64,
    /// `retention.bytes` (default -1 = unlimited), per partition
    pub retention_bytes: i64,
    /// `max.message.bytes` (default 1048588): largest batch accepted
    pub max_message_bytes: u32,
    /// `cleanup.policy` ("delete" or "compact"; stored and reported)
    pub cleanup_policy: String,
    /// `index.interval.bytes` (default 4096): bytes between sparse index entries
    pub index_interval_bytes: u32,
}

impl Default for TopicConfig {
    fn default() -> Self {
        unimplemented!()
    }
}

impl TopicConfig {
    /// Every key this config understands, in the order DescribeConfigs lists them.
    pub const KEYS: &'static [&'static str] = &[
        "cleanup.policy",
        "index.interval.bytes",
        "max.message.bytes",
        "retention.bytes",
        "retention.ms",
        "segment.bytes",
        "segment.ms",
    ];

    /// Sets one key from its string form; InvalidConfig on unknown key or bad value.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), LogError> {
        let _ = (key, value);
        unimplemented!()
    }

    /// The string form of one key, None for an unknown key.
    pub fn get(&self, key: &str) -> Option<String> {
        let _ = key;
        unimplemented!()
    }
}

/// Configuration of a [`Store`].
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub data_dir: PathBuf,
    /// Broker-wide topic defaults; topics override single keys.
    pub defaults: TopicConfig,
    pub flush: FlushPolicy,
}

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

/// One entry of a DescribeConfigs answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigEntry {
    pub name: String,
    pub value: String,
    /// True when the value comes from the broker default, not a topic override.
    pub is_default: bool,
}

/// One change of an IncrementalAlterConfigs request.
#[derive(Clone, Debug)]
pub enum ConfigChange {
    Set { key: String, value: String },
    /// Back to the broker default.
    Delete { key: String },
}

/// Where reads stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadLimit {
    /// Consumers: up to the high watermark.
    HighWatermark,
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
}

/// Result of [`Partition::read`].
#[derive(Clone, Debug)]
pub struct ReadResult {
    /// Whole stored record batches, starting with the batch that holds the
    /// requested offset.
    pub records: Bytes,
    pub high_watermark: i64,
    pub log_start_offset: i64,
    pub log_end_offset: i64,
}

/// The owner of a data directory: topics, their partitions, their configs.
pub struct Store {
    _private: (),
}

impl Store {
    /// Opens (creating if needed) the data directory and recovers every
    /// partition: validates segment tails, truncates torn writes, rebuilds
    /// indexes, rebuilds producer state. Must be called inside a Tokio runtime
    /// (background flushers are spawned on it).
    pub fn open(config: StoreConfig) -> Result<Arc<Store>, LogError> {
        let _ = config;
        unimplemented!()
    }

    /// Creates a topic. `validate_only` checks everything without creating.
    pub fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        overrides: &BTreeMap<String, String>,
        validate_only: bool,
    ) -> Result<TopicInfo, LogError> {
        let _ = (name, partitions, overrides, validate_only);
        unimplemented!()
    }

    /// Deletes a topic and its files.
    pub fn delete_topic(&self, name: &str) -> Result<(), LogError> {
        let _ = name;
        unimplemented!()
    }

    /// Grows a topic to `total` partitions (never shrinks: InvalidPartitions).
    pub fn create_partitions(
        &self,
        name: &str,
        total: u32,
        validate_only: bool,
    ) -> Result<(), LogError> {
        let _ = (name, total, validate_only);
        unimplemented!()
    }

    /// All topics, sorted by name.
    pub fn topics(&self) -> Vec<TopicInfo> {
        unimplemented!()
    }

    pub fn topic(&self, name: &str) -> Option<TopicInfo> {
        let _ = name;
        unimplemented!()
    }

    pub fn partition(&self, topic: &str, partition: i32) -> Option<Arc<Partition>> {
        let _ = (topic, partition);
        unimplemented!()
    }

    /// Applies config changes atomically (all or none), persisting them.
    pub fn alter_topic_config(
        &self,
        name: &str,
        changes: &[ConfigChange],
        validate_only: bool,
    ) -> Result<(), LogError> {
        let _ = (name, changes, validate_only);
        unimplemented!()
    }

    /// Every key of [`TopicConfig::KEYS`] with its effective value.
    pub fn describe_topic_config(&self, name: &str) -> Result<Vec<ConfigEntry>, LogError> {
        let _ = name;
        unimplemented!()
    }

    /// Rolls segments past `segment.ms` and deletes whole segments past
    /// `retention.ms` / `retention.bytes`. Returns the number of segments
    /// deleted. The server calls this periodically.
    pub fn enforce_retention(&self) -> Result<usize, LogError> {
        unimplemented!()
    }

    /// Allocates a producer id that is never handed out again, also across
    /// restarts (InitProducerId).
    pub fn next_producer_id(&self) -> Result<i64, LogError> {
        unimplemented!()
    }

    /// A random id made when the data directory is first created (Kafka's cluster id).
    pub fn cluster_id(&self) -> String {
        unimplemented!()
    }

    /// Flushes everything; called on clean shutdown.
    pub fn flush_all(&self) -> Result<(), LogError> {
        unimplemented!()
    }
}

/// One partition's log.
pub struct Partition {
    _private: (),
}

impl Partition {
    /// Validates `records` (one or more RecordBatch v2, as sent by a
    /// producer), checks idempotent-producer sequences, assigns offsets,
    /// stamps `leader_epoch` and writes them. Returns once the bytes are
    /// written to the OS, before they are durable: call
    /// [`Partition::wait_durable`] before acknowledging.
    pub fn append(&self, records: &[u8], leader_epoch: i32) -> Result<AppendResult, LogError> {
        let _ = (records, leader_epoch);
        unimplemented!()
    }

    /// Resolves once every offset below `end_offset` is durable under the
    /// flush policy (at once for `Interval` and `Never`). Concurrent waiters
    /// share one fsync.
    pub async fn wait_durable(&self, end_offset: i64) -> Result<(), LogError> {
        let _ = end_offset;
        unimplemented!()
    }

    /// Reads whole batches starting with the one that contains `offset`, at
    /// most `max_bytes` unless `min_one_batch` and the first batch is larger.
    /// `offset` equal to the limit gives empty records; outside
    /// [log start, log end] gives OffsetOutOfRange.
    pub fn read(
        &self,
        offset: i64,
        max_bytes: usize,
        min_one_batch: bool,
        limit: ReadLimit,
    ) -> Result<ReadResult, LogError> {
        let _ = (offset, max_bytes, min_one_batch, limit);
        unimplemented!()
    }

    /// Changes whenever the high watermark moves (long-polling fetches wait on it).
    pub fn watch_high_watermark(&self) -> tokio::sync::watch::Receiver<i64> {
        unimplemented!()
    }

    pub fn log_start_offset(&self) -> i64 {
        unimplemented!()
    }

    pub fn log_end_offset(&self) -> i64 {
        unimplemented!()
    }

    /// Offsets below it are durable (single node) and visible to consumers.
    pub fn high_watermark(&self) -> i64 {
        unimplemented!()
    }

    /// The first offset whose batch max timestamp is >= `timestamp`, with
    /// that record's timestamp, via the time index; None when no such record.
    pub fn offset_for_timestamp(&self, timestamp: i64) -> Result<Option<(i64, i64)>, LogError> {
        let _ = timestamp;
        unimplemented!()
    }

    /// Moves the log start offset to `offset` (DeleteRecords); -1 means the
    /// high watermark. Whole segments below it are deleted. Returns the new
    /// log start offset. OffsetOutOfRange above the high watermark.
    pub fn delete_records_before(&self, offset: i64) -> Result<i64, LogError> {
        let _ = offset;
        unimplemented!()
    }

    /// Kafka's OffsetForLeaderEpoch: the largest epoch <= `epoch` and the end
    /// offset of that epoch; (-1, -1) when unknown.
    pub fn end_offset_for_epoch(&self, epoch: i32) -> (i32, i64) {
        let _ = epoch;
        unimplemented!()
    }

    /// The latest leader epoch appended, -1 when none.
    pub fn latest_epoch(&self) -> i32 {
        unimplemented!()
    }

    /// Removes every record at or above `offset` (replica truncation).
    pub fn truncate_to(&self, offset: i64) -> Result<(), LogError> {
        let _ = offset;
        unimplemented!()
    }

    /// Total bytes of this partition's segments.
    pub fn size_bytes(&self) -> u64 {
        unimplemented!()
    }
}

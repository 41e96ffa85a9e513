//! Store configuration. Topic configs are Kafka's vocabulary ([`TopicConfig`]).

use std::path::PathBuf;

pub use sluice_vocab::TopicConfig;

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

/// Configuration of a [`Store`](crate::Store).
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub data_dir: PathBuf,
    /// Broker-wide topic defaults; topics override single keys.
    pub defaults: TopicConfig,
    pub flush: FlushPolicy,
    pub cleaner: CleanerConfig,
}

/// The log cleaner (compaction of `cleanup.policy=compact` topics).
#[derive(Clone, Debug)]
pub struct CleanerConfig {
    /// Memory for one round's key → offset map (Kafka's
    /// `log.cleaner.dedupe.buffer.size`, 128 MiB); a dirty section with
    /// more keys is compacted over several rounds.
    pub dedupe_buffer_bytes: usize,
    /// Bytes per second the cleaner may read plus write (Kafka's
    /// `log.cleaner.io.max.bytes.per.second`); None: unlimited.
    pub io_bytes_per_second: Option<u64>,
}

impl Default for CleanerConfig {
    fn default() -> Self {
        CleanerConfig {
            dedupe_buffer_bytes: 128 << 20,
            io_bytes_per_second: None,
        }
    }
}

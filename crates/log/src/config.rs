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
}

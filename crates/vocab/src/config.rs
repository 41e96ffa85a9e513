//! Topic configs with Kafka's names, defaults and limits: one parser for every crate.

use std::collections::BTreeMap;

use crate::{ErrorCode, KafkaError};

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
    /// `cleanup.policy` ("delete", "compact" or both, normalised; stored and reported)
    pub cleanup_policy: String,
    /// `index.interval.bytes` (default 4096): bytes between sparse index entries
    pub index_interval_bytes: u32,
    /// `min.insync.replicas` (default 1): in-sync replicas an acks=all write needs,
    /// capped at the replica count (so a single node always has enough). Enforced by
    /// the replication layer.
    pub min_insync_replicas: i32,
    /// `delete.retention.ms` (default 1 day): how long a compacted topic keeps
    /// a tombstone (and a finished transaction's marker) once the records
    /// before it are clean, so a reader that started earlier still sees it.
    pub delete_retention_ms: i64,
    /// `min.cleanable.dirty.ratio` (default 0.5): compact once the dirty part
    /// (not yet compacted) is at least this share of the cleanable log.
    pub min_cleanable_dirty_ratio: Ratio,
    /// `min.compaction.lag.ms` (default 0): a record stays uncompacted at
    /// least this long.
    pub min_compaction_lag_ms: i64,
    /// `max.compaction.lag.ms` (default forever): a record is compacted
    /// within about this long whatever the dirty ratio.
    pub max_compaction_lag_ms: i64,
    /// `compression.type`: the codec batches are stored with; `producer`
    /// (default) keeps the producer's, any other recompresses on the way in.
    pub compression_type: CompressionType,
    /// `compression.gzip.level` (-1 = the codec's default, or 1-9).
    pub compression_gzip_level: i32,
    /// `compression.lz4.level` (1-17, default 9).
    pub compression_lz4_level: i32,
    /// `compression.zstd.level` (-131072..22, default 3).
    pub compression_zstd_level: i32,
    /// `message.timestamp.type`: the producer's time (CreateTime, default)
    /// or the broker's at append (LogAppendTime).
    pub message_timestamp_type: TimestampType,
    /// `message.timestamp.before.max.ms` (default forever): a CreateTime
    /// record older than this is refused (INVALID_TIMESTAMP).
    pub message_timestamp_before_max_ms: i64,
    /// `message.timestamp.after.max.ms` (default forever): a CreateTime
    /// record further ahead of the broker's clock is refused.
    pub message_timestamp_after_max_ms: i64,
    /// `message.timestamp.difference.max.ms` (deprecated by the two above,
    /// still accepted): both bounds at once, the tighter of each applies.
    pub message_timestamp_difference_max_ms: i64,
    /// Keys Kafka accepts that change nothing here, validated with Kafka's
    /// types and ranges and reported back as set: see [`ACCEPTED`].
    pub accepted: BTreeMap<&'static str, String>,
}

/// Where a topic's record timestamps come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestampType {
    CreateTime,
    LogAppendTime,
}

/// A config value's type, as Kafka declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigType {
    Boolean,
    String,
    Int,
    Long,
    Double,
    List,
}

/// A topic's `compression.type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionType {
    /// Batches are stored as the producer compressed them.
    Producer,
    Uncompressed,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl CompressionType {
    const NAMES: [(&'static str, CompressionType); 6] = [
        ("producer", CompressionType::Producer),
        ("uncompressed", CompressionType::Uncompressed),
        ("gzip", CompressionType::Gzip),
        ("snappy", CompressionType::Snappy),
        ("lz4", CompressionType::Lz4),
        ("zstd", CompressionType::Zstd),
    ];

    fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, t)| *t == self)
            .map_or("producer", |(n, _)| n)
    }
}

/// How a value of an accepted-only key is checked.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// A long in the range.
    Long(i64, i64),
    Bool,
    /// Kafka's throttled-replica list: empty, `*`, or `partition:broker` pairs.
    ReplicaList,
    /// One of a fixed set of strings.
    OneOf(&'static [&'static str]),
    /// A boolean that must stay false: Sluice does not do what true asks.
    FalseOnly(&'static str),
}

/// Kafka topic configs Sluice accepts and reports but that change nothing,
/// each with its default and why: what they tune does not exist here or
/// Sluice is stricter already.
/// - `flush.messages`, `flush.ms`: Sluice makes every write durable before
///   acknowledging it (the broker's flush policy decides, not the topic).
/// - `file.delete.delay.ms`, `preallocate`, `segment.index.bytes`,
///   `segment.jitter.ms`: segment file management of Kafka's own layout.
/// - `follower.replication.throttled.replicas`,
///   `leader.replication.throttled.replicas`: replication is not throttled.
/// - `local.retention.*`, `remote.storage.enable`,
///   `remote.log.*`: tiered storage, which Sluice does not have (refused
///   when turned on).
/// - `message.downconversion.enable`, `message.format.version`: deprecated
///   (Sluice stores RecordBatch v2 only and never down-converts).
/// - `unclean.leader.election.enable`: refused when true; a leader is
///   always an in-sync replica.
const ACCEPTED: &[(&str, &str, Kind)] = &[
    ("file.delete.delay.ms", "60000", Kind::Long(0, i64::MAX)),
    (
        "flush.messages",
        "9223372036854775807",
        Kind::Long(1, i64::MAX),
    ),
    ("flush.ms", "9223372036854775807", Kind::Long(0, i64::MAX)),
    (
        "follower.replication.throttled.replicas",
        "",
        Kind::ReplicaList,
    ),
    (
        "leader.replication.throttled.replicas",
        "",
        Kind::ReplicaList,
    ),
    ("local.retention.bytes", "-2", Kind::Long(-2, i64::MAX)),
    ("local.retention.ms", "-2", Kind::Long(-2, i64::MAX)),
    ("message.downconversion.enable", "true", Kind::Bool),
    (
        "message.format.version",
        "3.0-IV1",
        Kind::OneOf(&[
            "0.8.0",
            "0.8.1",
            "0.8.2",
            "0.9.0",
            "0.10.0",
            "0.10.0-IV0",
            "0.10.0-IV1",
            "0.10.1",
            "0.10.1-IV0",
            "0.10.1-IV1",
            "0.10.1-IV2",
            "0.10.2",
            "0.10.2-IV0",
            "0.11.0",
            "0.11.0-IV0",
            "0.11.0-IV1",
            "0.11.0-IV2",
            "1.0",
            "1.0-IV0",
            "1.1",
            "1.1-IV0",
            "2.0",
            "2.0-IV0",
            "2.0-IV1",
            "2.1",
            "2.1-IV0",
            "2.1-IV1",
            "2.1-IV2",
            "2.2",
            "2.2-IV0",
            "2.2-IV1",
            "2.3",
            "2.3-IV0",
            "2.3-IV1",
            "2.4",
            "2.4-IV0",
            "2.4-IV1",
            "2.5",
            "2.5-IV0",
            "2.6",
            "2.6-IV0",
            "2.7",
            "2.7-IV0",
            "2.7-IV1",
            "2.7-IV2",
            "2.8",
            "2.8-IV0",
            "2.8-IV1",
            "3.0",
            "3.0-IV0",
            "3.0-IV1",
        ]),
    ),
    ("preallocate", "false", Kind::Bool),
    (
        "remote.log.copy.disable",
        "false",
        Kind::FalseOnly("Sluice has no tiered storage"),
    ),
    (
        "remote.log.delete.on.disable",
        "false",
        Kind::FalseOnly("Sluice has no tiered storage"),
    ),
    (
        "remote.storage.enable",
        "false",
        Kind::FalseOnly("Sluice has no tiered storage"),
    ),
    (
        "segment.index.bytes",
        "10485760",
        Kind::Long(4, i32::MAX as i64),
    ),
    ("segment.jitter.ms", "0", Kind::Long(0, i64::MAX)),
    (
        "unclean.leader.election.enable",
        "false",
        Kind::FalseOnly("a leader is always an in-sync replica: Sluice never elects another"),
    ),
];

fn check_accepted(key: &str, value: &str, kind: Kind) -> Result<String, ConfigError> {
    let v = value.trim();
    match kind {
        Kind::Long(lo, hi) => {
            number(key, value, lo..=hi, "is out of range")?;
        }
        Kind::Bool => {
            if !v.eq_ignore_ascii_case("true") && !v.eq_ignore_ascii_case("false") {
                return Err(invalid(key, value, "must be true or false"));
            }
            return Ok(v.to_ascii_lowercase());
        }
        Kind::FalseOnly(why) => {
            if v.eq_ignore_ascii_case("true") {
                return Err(invalid(key, value, why));
            }
            if !v.eq_ignore_ascii_case("false") {
                return Err(invalid(key, value, "must be true or false"));
            }
            return Ok("false".to_owned());
        }
        Kind::ReplicaList => {
            let ok = v.is_empty()
                || v == "*"
                || v.split(',').all(|pair| {
                    pair.trim().split_once(':').is_some_and(|(p, b)| {
                        p.trim().parse::<u32>().is_ok() && b.trim().parse::<u32>().is_ok()
                    })
                });
            if !ok {
                return Err(invalid(
                    key,
                    value,
                    "must be empty, * or a list of partition:broker",
                ));
            }
        }
        Kind::OneOf(allowed) => {
            if !allowed.contains(&v) {
                return Err(invalid(key, value, "is not a known version"));
            }
        }
    }
    Ok(v.to_owned())
}

/// A ratio in [0, 1] (`min.cleanable.dirty.ratio`), compared by value.
#[derive(Clone, Copy, Debug)]
pub struct Ratio(pub f64);

impl PartialEq for Ratio {
    fn eq(&self, other: &Ratio) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}

impl Eq for Ratio {}

impl Default for TopicConfig {
    fn default() -> Self {
        TopicConfig {
            segment_bytes: 1_073_741_824,
            segment_ms: 604_800_000,
            retention_ms: 604_800_000,
            retention_bytes: -1,
            max_message_bytes: 1_048_588,
            cleanup_policy: "delete".to_string(),
            index_interval_bytes: 4096,
            min_insync_replicas: 1,
            delete_retention_ms: 86_400_000,
            min_cleanable_dirty_ratio: Ratio(0.5),
            min_compaction_lag_ms: 0,
            max_compaction_lag_ms: i64::MAX,
            compression_type: CompressionType::Producer,
            compression_gzip_level: -1,
            compression_lz4_level: 9,
            compression_zstd_level: 3,
            message_timestamp_type: TimestampType::CreateTime,
            message_timestamp_before_max_ms: i64::MAX,
            message_timestamp_after_max_ms: i64::MAX,
            message_timestamp_difference_max_ms: i64::MAX,
            accepted: ACCEPTED
                .iter()
                .map(|(k, default, _)| (*k, (*default).to_owned()))
                .collect(),
        }
    }
}

/// A config key or value Kafka would refuse. INVALID_CONFIG.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown topic config key {0:?}")]
    UnknownKey(String),
    #[error("{key}: {value:?} {rule}")]
    Invalid {
        key: String,
        value: String,
        rule: &'static str,
    },
}

impl KafkaError for ConfigError {
    fn error_code(&self) -> ErrorCode {
        ErrorCode::InvalidConfig
    }
}

/// Kafka's lower bound for `segment.bytes` is 14 bytes (a log overhead);
/// anything smaller could not hold a batch header.
const MIN_SEGMENT_BYTES: i64 = 14;
/// Segment positions are stored as u32 in the offset index.
const MAX_SEGMENT_BYTES: i64 = i32::MAX as i64;

fn invalid(key: &str, value: &str, rule: &'static str) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        value: value.to_owned(),
        rule,
    }
}

/// A number in `range`, or the error naming `rule`.
fn number(
    key: &str,
    value: &str,
    range: std::ops::RangeInclusive<i64>,
    rule: &'static str,
) -> Result<i64, ConfigError> {
    let v: i64 = value
        .trim()
        .parse()
        .map_err(|_| invalid(key, value, "is not a valid number"))?;
    if range.contains(&v) {
        Ok(v)
    } else {
        Err(invalid(key, value, rule))
    }
}

/// Narrows a number already checked against the target type's range.
fn narrow<T: TryFrom<i64>>(v: i64, key: &str, value: &str) -> Result<T, ConfigError> {
    T::try_from(v).map_err(|_| invalid(key, value, "is out of range"))
}

impl TopicConfig {
    /// Every key this config understands, in the order DescribeConfigs lists them.
    pub const KEYS: &'static [&'static str] = &[
        "cleanup.policy",
        "compression.gzip.level",
        "compression.lz4.level",
        "compression.type",
        "compression.zstd.level",
        "delete.retention.ms",
        "file.delete.delay.ms",
        "flush.messages",
        "flush.ms",
        "follower.replication.throttled.replicas",
        "index.interval.bytes",
        "leader.replication.throttled.replicas",
        "local.retention.bytes",
        "local.retention.ms",
        "max.compaction.lag.ms",
        "max.message.bytes",
        "message.downconversion.enable",
        "message.format.version",
        "message.timestamp.after.max.ms",
        "message.timestamp.before.max.ms",
        "message.timestamp.difference.max.ms",
        "message.timestamp.type",
        "min.cleanable.dirty.ratio",
        "min.compaction.lag.ms",
        "min.insync.replicas",
        "preallocate",
        "remote.log.copy.disable",
        "remote.log.delete.on.disable",
        "remote.storage.enable",
        "retention.bytes",
        "retention.ms",
        "segment.bytes",
        "segment.index.bytes",
        "segment.jitter.ms",
        "segment.ms",
        "unclean.leader.election.enable",
    ];

    /// The type Kafka declares for `key` (DescribeConfigs v3+ reports it;
    /// IncrementalAlterConfigs may APPEND to and SUBTRACT from a list); None
    /// for a key that is not a topic config.
    pub fn key_type(key: &str) -> Option<ConfigType> {
        use ConfigType::*;
        Some(match key {
            "cleanup.policy"
            | "follower.replication.throttled.replicas"
            | "leader.replication.throttled.replicas" => List,
            "compression.type" | "message.format.version" | "message.timestamp.type" => String,
            "compression.gzip.level"
            | "compression.lz4.level"
            | "compression.zstd.level"
            | "index.interval.bytes"
            | "max.message.bytes"
            | "min.insync.replicas"
            | "segment.bytes"
            | "segment.index.bytes" => Int,
            "delete.retention.ms"
            | "file.delete.delay.ms"
            | "flush.messages"
            | "flush.ms"
            | "local.retention.bytes"
            | "local.retention.ms"
            | "max.compaction.lag.ms"
            | "message.timestamp.after.max.ms"
            | "message.timestamp.before.max.ms"
            | "message.timestamp.difference.max.ms"
            | "min.compaction.lag.ms"
            | "retention.bytes"
            | "retention.ms"
            | "segment.jitter.ms"
            | "segment.ms" => Long,
            "min.cleanable.dirty.ratio" => Double,
            "message.downconversion.enable"
            | "preallocate"
            | "remote.log.copy.disable"
            | "remote.log.delete.on.disable"
            | "remote.storage.enable"
            | "unclean.leader.election.enable" => Boolean,
            _ => return None,
        })
    }

    /// The broker config that gives `key` its default, as Kafka names it
    /// (`retention.ms` is `log.retention.ms`); None where Kafka has none.
    pub fn broker_key(key: &str) -> Option<&'static str> {
        Some(match key {
            "cleanup.policy" => "log.cleanup.policy",
            "compression.type" => "compression.type",
            "compression.gzip.level" => "compression.gzip.level",
            "compression.lz4.level" => "compression.lz4.level",
            "compression.zstd.level" => "compression.zstd.level",
            "delete.retention.ms" => "log.cleaner.delete.retention.ms",
            "file.delete.delay.ms" => "log.segment.delete.delay.ms",
            "flush.messages" => "log.flush.interval.messages",
            "flush.ms" => "log.flush.interval.ms",
            "index.interval.bytes" => "log.index.interval.bytes",
            "local.retention.bytes" => "log.local.retention.bytes",
            "local.retention.ms" => "log.local.retention.ms",
            "max.compaction.lag.ms" => "log.cleaner.max.compaction.lag.ms",
            "max.message.bytes" => "message.max.bytes",
            "message.downconversion.enable" => "log.message.downconversion.enable",
            "message.format.version" => "log.message.format.version",
            "message.timestamp.after.max.ms" => "log.message.timestamp.after.max.ms",
            "message.timestamp.before.max.ms" => "log.message.timestamp.before.max.ms",
            "message.timestamp.difference.max.ms" => "log.message.timestamp.difference.max.ms",
            "message.timestamp.type" => "log.message.timestamp.type",
            "min.cleanable.dirty.ratio" => "log.cleaner.min.cleanable.ratio",
            "min.compaction.lag.ms" => "log.cleaner.min.compaction.lag.ms",
            "min.insync.replicas" => "min.insync.replicas",
            "preallocate" => "log.preallocate",
            "retention.bytes" => "log.retention.bytes",
            "retention.ms" => "log.retention.ms",
            "segment.bytes" => "log.segment.bytes",
            "segment.index.bytes" => "log.index.size.max.bytes",
            "segment.jitter.ms" => "log.roll.jitter.ms",
            "segment.ms" => "log.roll.ms",
            "unclean.leader.election.enable" => "unclean.leader.election.enable",
            _ => return None,
        })
    }

    /// `defaults` with `overrides` applied, each checked.
    pub fn with_overrides(
        defaults: &TopicConfig,
        overrides: &BTreeMap<String, String>,
    ) -> Result<TopicConfig, ConfigError> {
        let mut config = defaults.clone();
        for (k, v) in overrides {
            config.set(k, v)?;
        }
        Ok(config)
    }

    /// Checks overrides (keys known, values within limits) without keeping them.
    pub fn validate(overrides: &BTreeMap<String, String>) -> Result<(), ConfigError> {
        TopicConfig::with_overrides(&TopicConfig::default(), overrides).map(|_| ())
    }

    /// Sets one key from its string form.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        const I32: std::ops::RangeInclusive<i64> = 0..=i32::MAX as i64;
        match key {
            "cleanup.policy" => {
                let mut parts: Vec<&str> = value.trim().split(',').map(str::trim).collect();
                parts.sort_unstable();
                parts.dedup();
                let ok =
                    !parts.is_empty() && parts.iter().all(|p| *p == "delete" || *p == "compact");
                if !ok {
                    return Err(invalid(key, value, "must be delete, compact or both"));
                }
                // Normalised so that "delete,compact" and "compact,delete" compare equal.
                self.cleanup_policy = parts.join(",");
            }
            "compression.type" => {
                let v = value.trim();
                self.compression_type = CompressionType::NAMES
                    .iter()
                    .find(|(n, _)| *n == v)
                    .map(|(_, t)| *t)
                    .ok_or_else(|| {
                        invalid(
                            key,
                            value,
                            "must be producer, uncompressed, gzip, snappy, lz4 or zstd",
                        )
                    })?;
            }
            "compression.gzip.level" => {
                let v = number(key, value, -1..=9, "must be -1 or in [1, 9]")?;
                if v == 0 {
                    return Err(invalid(key, value, "must be -1 or in [1, 9]"));
                }
                self.compression_gzip_level = narrow(v, key, value)?;
            }
            "compression.lz4.level" => {
                let v = number(key, value, 1..=17, "must be in [1, 17]")?;
                self.compression_lz4_level = narrow(v, key, value)?;
            }
            "compression.zstd.level" => {
                let v = number(key, value, -131_072..=22, "must be in [-131072, 22]")?;
                self.compression_zstd_level = narrow(v, key, value)?;
            }
            "delete.retention.ms" => {
                self.delete_retention_ms = number(key, value, 0..=i64::MAX, "must be at least 0")?;
            }
            "index.interval.bytes" => {
                let v = number(key, value, I32, "must be in [0, 2147483647]")?;
                self.index_interval_bytes = narrow(v, key, value)?;
            }
            "max.compaction.lag.ms" => {
                self.max_compaction_lag_ms =
                    number(key, value, 1..=i64::MAX, "must be at least 1")?;
            }
            "min.cleanable.dirty.ratio" => {
                let v: f64 = value
                    .trim()
                    .parse()
                    .map_err(|_| invalid(key, value, "is not a valid number"))?;
                if !(0.0..=1.0).contains(&v) {
                    return Err(invalid(key, value, "must be in [0, 1]"));
                }
                self.min_cleanable_dirty_ratio = Ratio(v);
            }
            "min.compaction.lag.ms" => {
                self.min_compaction_lag_ms =
                    number(key, value, 0..=i64::MAX, "must be at least 0")?;
            }
            "max.message.bytes" => {
                let v = number(key, value, I32, "must be in [0, 2147483647]")?;
                self.max_message_bytes = narrow(v, key, value)?;
            }
            "min.insync.replicas" => {
                let v = number(key, value, 1..=i32::MAX as i64, "must be at least 1")?;
                self.min_insync_replicas = narrow(v, key, value)?;
            }
            "retention.bytes" => {
                self.retention_bytes =
                    number(key, value, -1..=i64::MAX, "must be -1 or at least 0")?;
            }
            "retention.ms" => {
                self.retention_ms = number(key, value, -1..=i64::MAX, "must be -1 or at least 0")?;
            }
            "segment.bytes" => {
                let v = number(
                    key,
                    value,
                    MIN_SEGMENT_BYTES..=MAX_SEGMENT_BYTES,
                    "must be in [14, 2147483647]",
                )?;
                self.segment_bytes = narrow(v, key, value)?;
            }
            "segment.ms" => {
                let v = number(key, value, 1..=i64::MAX, "must be at least 1")?;
                self.segment_ms = narrow(v, key, value)?;
            }
            "message.timestamp.type" => {
                self.message_timestamp_type = match value.trim() {
                    "CreateTime" => TimestampType::CreateTime,
                    "LogAppendTime" => TimestampType::LogAppendTime,
                    _ => return Err(invalid(key, value, "must be CreateTime or LogAppendTime")),
                };
            }
            "message.timestamp.before.max.ms" => {
                self.message_timestamp_before_max_ms =
                    number(key, value, 0..=i64::MAX, "must be at least 0")?;
            }
            "message.timestamp.after.max.ms" => {
                self.message_timestamp_after_max_ms =
                    number(key, value, 0..=i64::MAX, "must be at least 0")?;
            }
            "message.timestamp.difference.max.ms" => {
                self.message_timestamp_difference_max_ms =
                    number(key, value, 0..=i64::MAX, "must be at least 0")?;
            }
            _ => {
                let Some((name, _, kind)) = ACCEPTED.iter().find(|(k, _, _)| *k == key) else {
                    return Err(ConfigError::UnknownKey(key.to_owned()));
                };
                let v = check_accepted(key, value, *kind)?;
                self.accepted.insert(name, v);
            }
        }
        Ok(())
    }

    /// The window a CreateTime record's timestamp must fall in at broker
    /// time `now_ms` (milliseconds since the epoch), when the topic bounds
    /// it; None for LogAppendTime topics (the broker's time replaces it)
    /// and for unbounded ones.
    pub fn timestamp_window(&self, now_ms: i64) -> Option<(i64, i64)> {
        if self.message_timestamp_type == TimestampType::LogAppendTime {
            return None;
        }
        let before = self
            .message_timestamp_before_max_ms
            .min(self.message_timestamp_difference_max_ms);
        let after = self
            .message_timestamp_after_max_ms
            .min(self.message_timestamp_difference_max_ms);
        if before == i64::MAX && after == i64::MAX {
            return None;
        }
        Some((now_ms.saturating_sub(before), now_ms.saturating_add(after)))
    }

    /// `cleanup.policy` includes `compact`: the log cleaner keeps the latest
    /// record per key.
    pub fn compacts(&self) -> bool {
        self.cleanup_policy.split(',').any(|p| p == "compact")
    }

    /// `cleanup.policy` includes `delete`: retention deletes old segments.
    pub fn deletes(&self) -> bool {
        self.cleanup_policy.split(',').any(|p| p == "delete")
    }

    /// The string form of one key, None for an unknown key.
    pub fn get(&self, key: &str) -> Option<String> {
        Some(match key {
            "cleanup.policy" => self.cleanup_policy.clone(),
            "compression.type" => self.compression_type.name().to_owned(),
            "compression.gzip.level" => self.compression_gzip_level.to_string(),
            "compression.lz4.level" => self.compression_lz4_level.to_string(),
            "compression.zstd.level" => self.compression_zstd_level.to_string(),
            "delete.retention.ms" => self.delete_retention_ms.to_string(),
            "index.interval.bytes" => self.index_interval_bytes.to_string(),
            "max.compaction.lag.ms" => self.max_compaction_lag_ms.to_string(),
            "min.cleanable.dirty.ratio" => self.min_cleanable_dirty_ratio.0.to_string(),
            "min.compaction.lag.ms" => self.min_compaction_lag_ms.to_string(),
            "max.message.bytes" => self.max_message_bytes.to_string(),
            "min.insync.replicas" => self.min_insync_replicas.to_string(),
            "retention.bytes" => self.retention_bytes.to_string(),
            "retention.ms" => self.retention_ms.to_string(),
            "segment.bytes" => self.segment_bytes.to_string(),
            "segment.ms" => self.segment_ms.to_string(),
            "message.timestamp.type" => match self.message_timestamp_type {
                TimestampType::CreateTime => "CreateTime".to_owned(),
                TimestampType::LogAppendTime => "LogAppendTime".to_owned(),
            },
            "message.timestamp.before.max.ms" => self.message_timestamp_before_max_ms.to_string(),
            "message.timestamp.after.max.ms" => self.message_timestamp_after_max_ms.to_string(),
            "message.timestamp.difference.max.ms" => {
                self.message_timestamp_difference_max_ms.to_string()
            }
            _ => return self.accepted.get(key).cloned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_kafkas() {
        let c = TopicConfig::default();
        assert_eq!(c.get("segment.bytes").as_deref(), Some("1073741824"));
        assert_eq!(c.get("retention.ms").as_deref(), Some("604800000"));
        assert_eq!(c.get("retention.bytes").as_deref(), Some("-1"));
        assert_eq!(c.get("max.message.bytes").as_deref(), Some("1048588"));
        assert_eq!(c.get("cleanup.policy").as_deref(), Some("delete"));
        assert_eq!(c.get("index.interval.bytes").as_deref(), Some("4096"));
        assert_eq!(c.get("segment.ms").as_deref(), Some("604800000"));
        assert_eq!(c.get("min.insync.replicas").as_deref(), Some("1"));
        assert_eq!(c.get("nope"), None);
        for k in TopicConfig::KEYS {
            assert!(c.get(k).is_some(), "{k}");
        }
    }

    #[test]
    fn set_validates() {
        let mut c = TopicConfig::default();
        c.set("retention.ms", "-1").unwrap();
        assert_eq!(c.retention_ms, -1);
        c.set("cleanup.policy", "delete,compact").unwrap();
        assert_eq!(c.cleanup_policy, "compact,delete");
        for (k, v) in [
            ("cleanup.policy", "shred"),
            ("retention.ms", "-2"),
            ("retention.bytes", "ten"),
            ("segment.bytes", "3"),
            ("segment.ms", "0"),
            ("max.message.bytes", "99999999999"),
            ("min.insync.replicas", "0"),
            ("min.insync.replicas", "two"),
        ] {
            let e = c.set(k, v).unwrap_err();
            assert_eq!(e.error_code(), ErrorCode::InvalidConfig, "{k}={v}");
        }
        assert_eq!(
            c.set("unknown.key", "1"),
            Err(ConfigError::UnknownKey("unknown.key".into()))
        );
        c.set("segment.bytes", "1024").unwrap();
        assert_eq!(c.segment_bytes, 1024);
        c.set("min.insync.replicas", " 2 ").unwrap();
        assert_eq!(c.min_insync_replicas, 2);
    }

    #[test]
    fn overrides_apply_over_defaults_or_fail_whole() {
        let defaults = TopicConfig {
            min_insync_replicas: 2,
            ..TopicConfig::default()
        };
        let ok = BTreeMap::from([("retention.ms".to_string(), "1000".to_string())]);
        let c = TopicConfig::with_overrides(&defaults, &ok).unwrap();
        assert_eq!((c.retention_ms, c.min_insync_replicas), (1000, 2));
        let bad = BTreeMap::from([("segment.ms".to_string(), "0".to_string())]);
        assert!(TopicConfig::validate(&bad).is_err());
        assert!(TopicConfig::validate(&ok).is_ok());
    }

    #[test]
    fn every_kafka_topic_key_is_accepted_with_kafkas_limits() {
        let mut c = TopicConfig::default();
        for (k, v) in [
            ("flush.messages", "1"),
            ("flush.ms", "1000"),
            ("file.delete.delay.ms", "0"),
            ("preallocate", "TRUE"),
            ("segment.index.bytes", "4096"),
            ("segment.jitter.ms", "10"),
            ("local.retention.ms", "-2"),
            ("message.downconversion.enable", "false"),
            ("message.format.version", "2.8"),
            ("follower.replication.throttled.replicas", "0:1,1:2"),
            ("leader.replication.throttled.replicas", "*"),
            ("unclean.leader.election.enable", "false"),
            ("remote.storage.enable", "false"),
            ("message.timestamp.type", "LogAppendTime"),
            ("message.timestamp.before.max.ms", "1000"),
            ("compression.type", "zstd"),
            ("compression.gzip.level", "9"),
            ("compression.lz4.level", "17"),
            ("compression.zstd.level", "-131072"),
        ] {
            c.set(k, v).unwrap_or_else(|e| panic!("{k}={v}: {e}"));
        }
        assert_eq!(c.get("preallocate").as_deref(), Some("true"));
        assert_eq!(c.get("message.format.version").as_deref(), Some("2.8"));
        assert_eq!(c.message_timestamp_type, TimestampType::LogAppendTime);
        assert_eq!(c.compression_type, CompressionType::Zstd);
        assert_eq!(c.get("compression.type").as_deref(), Some("zstd"));
        assert_eq!(c.get("compression.zstd.level").as_deref(), Some("-131072"));
        for (k, v) in [
            ("flush.messages", "0"),
            ("segment.index.bytes", "3"),
            ("local.retention.bytes", "-3"),
            ("preallocate", "yes"),
            ("message.format.version", "9.9"),
            ("follower.replication.throttled.replicas", "0-1"),
            ("unclean.leader.election.enable", "true"),
            ("remote.storage.enable", "true"),
            ("message.timestamp.type", "BrokerTime"),
            ("message.timestamp.after.max.ms", "-1"),
            ("compression.type", "brotli"),
            ("compression.gzip.level", "0"),
            ("compression.gzip.level", "10"),
            ("compression.lz4.level", "0"),
            ("compression.zstd.level", "23"),
        ] {
            let e = c.set(k, v).unwrap_err();
            assert_eq!(e.error_code(), ErrorCode::InvalidConfig, "{k}={v}");
        }
        let d = TopicConfig::default();
        assert_eq!(d.get("flush.ms").as_deref(), Some("9223372036854775807"));
        assert_eq!(
            d.get("message.timestamp.type").as_deref(),
            Some("CreateTime")
        );
        assert_eq!(
            d.get("unclean.leader.election.enable").as_deref(),
            Some("false")
        );
        assert_eq!(d.get("compression.type").as_deref(), Some("producer"));
        assert_eq!(d.get("compression.lz4.level").as_deref(), Some("9"));
    }

    #[test]
    fn every_key_has_a_type_and_every_broker_synonym_is_one_key() {
        let mut synonyms = std::collections::BTreeSet::new();
        for k in TopicConfig::KEYS {
            assert!(TopicConfig::key_type(k).is_some(), "{k} has no type");
            if let Some(b) = TopicConfig::broker_key(k) {
                assert!(synonyms.insert(b), "{b} twice");
            }
        }
        assert_eq!(TopicConfig::key_type("log.retention.ms"), None);
        assert_eq!(
            TopicConfig::broker_key("retention.ms"),
            Some("log.retention.ms")
        );
    }

    #[test]
    fn the_timestamp_window_takes_the_tighter_bound() {
        let mut c = TopicConfig::default();
        assert_eq!(c.timestamp_window(1_000_000), None);
        c.set("message.timestamp.before.max.ms", "5000").unwrap();
        assert_eq!(c.timestamp_window(1_000_000), Some((995_000, i64::MAX)));
        c.set("message.timestamp.difference.max.ms", "2000")
            .unwrap();
        assert_eq!(c.timestamp_window(1_000_000), Some((998_000, 1_002_000)));
        c.set("message.timestamp.type", "LogAppendTime").unwrap();
        assert_eq!(
            c.timestamp_window(1_000_000),
            None,
            "the broker's time replaces it"
        );
    }
}

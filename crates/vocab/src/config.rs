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
        "delete.retention.ms",
        "index.interval.bytes",
        "max.compaction.lag.ms",
        "max.message.bytes",
        "min.cleanable.dirty.ratio",
        "min.compaction.lag.ms",
        "min.insync.replicas",
        "retention.bytes",
        "retention.ms",
        "segment.bytes",
        "segment.ms",
    ];

    /// Keys whose value is a comma-separated list (IncrementalAlterConfigs may
    /// APPEND to and SUBTRACT from them).
    pub const LIST_KEYS: &'static [&'static str] = &["cleanup.policy"];

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
            _ => return Err(ConfigError::UnknownKey(key.to_owned())),
        }
        Ok(())
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
            _ => return None,
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
}

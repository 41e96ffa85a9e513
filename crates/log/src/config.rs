//! Store and topic configuration, with Kafka's names, defaults and rules.

use std::path::PathBuf;

use crate::LogError;

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
    /// `min.insync.replicas` (default 1): in-sync replicas an acks=all write
    /// needs. Stored here with the other topic configs; enforced by the
    /// replication layer (capped at the replica count, so a single node
    /// always has enough).
    pub min_insync_replicas: i32,
}

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
        }
    }
}

/// Kafka's lower bound for `segment.bytes` is 14 bytes (a log overhead);
/// anything smaller could not hold a batch header.
const MIN_SEGMENT_BYTES: u64 = 14;
/// Segment positions are stored as u32 in the offset index.
const MAX_SEGMENT_BYTES: u64 = i32::MAX as u64;

fn parse<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, LogError> {
    value
        .trim()
        .parse::<T>()
        .map_err(|_| LogError::InvalidConfig(format!("{key}: {value:?} is not a valid number")))
}

fn out_of_range(key: &str, value: &str, rule: &str) -> LogError {
    LogError::InvalidConfig(format!("{key}: {value:?} {rule}"))
}

impl TopicConfig {
    /// Every key this config understands, in the order DescribeConfigs lists them.
    pub const KEYS: &'static [&'static str] = &[
        "cleanup.policy",
        "index.interval.bytes",
        "max.message.bytes",
        "min.insync.replicas",
        "retention.bytes",
        "retention.ms",
        "segment.bytes",
        "segment.ms",
    ];

    /// Sets one key from its string form; InvalidConfig on unknown key or bad value.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), LogError> {
        match key {
            "cleanup.policy" => {
                let v = value.trim();
                let mut parts: Vec<&str> = v.split(',').map(str::trim).collect();
                parts.sort_unstable();
                parts.dedup();
                let ok =
                    !parts.is_empty() && parts.iter().all(|p| *p == "delete" || *p == "compact");
                if !ok {
                    return Err(out_of_range(key, value, "must be delete, compact or both"));
                }
                // Normalised so that "delete,compact" and "compact,delete" compare equal.
                self.cleanup_policy = parts.join(",");
            }
            "index.interval.bytes" => {
                let v: i64 = parse(key, value)?;
                if !(0..=i64::from(i32::MAX)).contains(&v) {
                    return Err(out_of_range(key, value, "must be in [0, 2147483647]"));
                }
                self.index_interval_bytes = v as u32;
            }
            "max.message.bytes" => {
                let v: i64 = parse(key, value)?;
                if !(0..=i64::from(i32::MAX)).contains(&v) {
                    return Err(out_of_range(key, value, "must be in [0, 2147483647]"));
                }
                self.max_message_bytes = v as u32;
            }
            "min.insync.replicas" => {
                let v: i64 = parse(key, value)?;
                if !(1..=i64::from(i32::MAX)).contains(&v) {
                    return Err(out_of_range(key, value, "must be at least 1"));
                }
                self.min_insync_replicas = v as i32;
            }
            "retention.bytes" => {
                let v: i64 = parse(key, value)?;
                if v < -1 {
                    return Err(out_of_range(key, value, "must be -1 or at least 0"));
                }
                self.retention_bytes = v;
            }
            "retention.ms" => {
                let v: i64 = parse(key, value)?;
                if v < -1 {
                    return Err(out_of_range(key, value, "must be -1 or at least 0"));
                }
                self.retention_ms = v;
            }
            "segment.bytes" => {
                let v: i64 = parse(key, value)?;
                if v < MIN_SEGMENT_BYTES as i64 || v > MAX_SEGMENT_BYTES as i64 {
                    return Err(out_of_range(key, value, "must be in [14, 2147483647]"));
                }
                self.segment_bytes = v as u64;
            }
            "segment.ms" => {
                let v: i64 = parse(key, value)?;
                if v < 1 {
                    return Err(out_of_range(key, value, "must be at least 1"));
                }
                self.segment_ms = v as u64;
            }
            _ => {
                return Err(LogError::InvalidConfig(format!(
                    "unknown topic config key {key:?}"
                )))
            }
        }
        Ok(())
    }

    /// The string form of one key, None for an unknown key.
    pub fn get(&self, key: &str) -> Option<String> {
        Some(match key {
            "cleanup.policy" => self.cleanup_policy.clone(),
            "index.interval.bytes" => self.index_interval_bytes.to_string(),
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

/// Configuration of a [`Store`](crate::Store).
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub data_dir: PathBuf,
    /// Broker-wide topic defaults; topics override single keys.
    pub defaults: TopicConfig,
    pub flush: FlushPolicy,
}

/// Kafka's topic name rules: 1..=249 characters of `[a-zA-Z0-9._-]`, not
/// "." or "..".
pub fn validate_topic_name(name: &str) -> Result<(), LogError> {
    if name.is_empty() {
        return Err(LogError::InvalidTopic(name.into(), "name is empty"));
    }
    if name == "." || name == ".." {
        return Err(LogError::InvalidTopic(
            name.into(),
            "name cannot be . or ..",
        ));
    }
    if name.len() > 249 {
        return Err(LogError::InvalidTopic(
            name.into(),
            "name is longer than 249 characters",
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        return Err(LogError::InvalidTopic(
            name.into(),
            "name may only contain ASCII letters, digits, '.', '_' and '-'",
        ));
    }
    Ok(())
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
        assert!(c.set("cleanup.policy", "shred").is_err());
        assert!(c.set("retention.ms", "-2").is_err());
        assert!(c.set("retention.bytes", "ten").is_err());
        assert!(c.set("segment.bytes", "3").is_err());
        assert!(c.set("segment.ms", "0").is_err());
        assert!(c.set("max.message.bytes", "99999999999").is_err());
        assert!(c.set("unknown.key", "1").is_err());
        c.set("segment.bytes", "1024").unwrap();
        assert_eq!(c.segment_bytes, 1024);
    }

    #[test]
    fn topic_names() {
        assert!(validate_topic_name("orders.v1_x-y").is_ok());
        assert!(validate_topic_name("").is_err());
        assert!(validate_topic_name(".").is_err());
        assert!(validate_topic_name("..").is_err());
        assert!(validate_topic_name("a/b").is_err());
        assert!(validate_topic_name(&"a".repeat(249)).is_ok());
        assert!(validate_topic_name(&"a".repeat(250)).is_err());
    }
}

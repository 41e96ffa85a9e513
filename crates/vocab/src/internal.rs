//! The broker's own topics: which they are and how they are configured.

use std::collections::BTreeMap;

/// The topic that holds consumer groups' committed offsets.
pub const OFFSETS_TOPIC: &str = "__consumer_offsets";

/// Partitions of [`OFFSETS_TOPIC`]: its leader coordinates every group.
pub const OFFSETS_TOPIC_PARTITIONS: i32 = 1;

/// The topic that holds the transaction coordinator's state (one record per
/// transition of a transactional id).
pub const TRANSACTION_STATE_TOPIC: &str = "__transaction_state";

/// Partitions of [`TRANSACTION_STATE_TOPIC`]: its leader coordinates every
/// transaction.
pub const TRANSACTION_STATE_TOPIC_PARTITIONS: i32 = 1;

/// Whether the broker owns a topic: names starting with `__` are written by the
/// broker only (a client's bytes there could break its replay); clients may read
/// them.
pub fn is_internal(name: &str) -> bool {
    name.starts_with("__")
}

/// The overrides [`OFFSETS_TOPIC`] is created with: a compacted topic, as
/// Kafka's, so its size tracks the live commits, not their history. Replay
/// is the only copy of the offsets after a restart, so nothing ages out.
/// Segments are small (Kafka's `offsets.topic.segment.bytes` is 100 MiB):
/// only rolled segments are compacted, so the log stays within a few MiB
/// of what is live however many commits go through it.
pub fn offsets_topic_configs() -> BTreeMap<String, String> {
    [
        ("cleanup.policy", "compact"),
        ("retention.ms", "-1"),
        ("retention.bytes", "-1"),
        ("segment.bytes", "1048576"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// The overrides [`TRANSACTION_STATE_TOPIC`] is created with: as the offsets
/// topic's, replay is the only copy of the coordinator's state.
pub fn transaction_state_topic_configs() -> BTreeMap<String, String> {
    offsets_topic_configs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offsets_topic_is_internal_and_its_configs_are_valid() {
        assert!(is_internal(OFFSETS_TOPIC));
        assert!(!is_internal("orders"));
        let mut config = crate::TopicConfig::default();
        for (k, v) in offsets_topic_configs() {
            config.set(&k, &v).unwrap();
        }
        assert_eq!(config.retention_ms, -1);
    }
}

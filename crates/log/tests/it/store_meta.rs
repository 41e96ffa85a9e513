//! Topic metadata, configs, producer ids and the cluster id, across restarts.

use std::collections::BTreeMap;

use sluice_log::{FlushPolicy, LogError, TopicConfig};

use crate::{batch, no_overrides, open, Spec};

#[tokio::test]
async fn topics_persist_with_ids_partitions_and_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let (id, cluster) = {
        let store = open(dir.path(), FlushPolicy::Always, TopicConfig::default());
        let mut o = BTreeMap::new();
        o.insert("retention.ms".to_string(), "1000".to_string());
        let info = store.create_topic("orders", 3, &o, false).unwrap();
        assert_eq!(info.config.retention_ms, 1000);
        assert!(!info.internal);
        assert!(
            store
                .create_topic("__consumer_offsets", 1, &no_overrides(), false)
                .unwrap()
                .internal
        );
        assert!(matches!(
            store.create_topic("orders", 1, &no_overrides(), false),
            Err(LogError::TopicAlreadyExists(_))
        ));
        assert!(matches!(
            store.create_topic("bad/name", 1, &no_overrides(), false),
            Err(LogError::InvalidTopic(..))
        ));
        assert!(matches!(
            store.create_topic("zero", 0, &no_overrides(), false),
            Err(LogError::InvalidPartitions(_))
        ));
        let mut bad = BTreeMap::new();
        bad.insert("cleanup.policy".to_string(), "burn".to_string());
        assert!(matches!(
            store.create_topic("x", 1, &bad, false),
            Err(LogError::InvalidConfig(_))
        ));
        // validate_only creates nothing.
        store.create_topic("dry", 2, &no_overrides(), true).unwrap();
        assert!(store.topic("dry").is_none());
        assert!(!dir.path().join("dry-0").exists());

        // The metadata quorum's record of the topic: more partitions.
        let orders = store.topic("orders").unwrap();
        store
            .ensure_topic("orders", orders.id, 5, &orders.overrides)
            .unwrap();
        assert_eq!(store.topic("orders").unwrap().partitions, 5);
        store
            .partition("orders", 4)
            .unwrap()
            .append(&batch(&Spec::plain(1, 1)), 0)
            .unwrap();
        assert!(store.partition("orders", 5).is_none());
        assert!(store.partition("orders", -1).is_none());
        let names: Vec<String> = store.topics().into_iter().map(|t| t.name).collect();
        assert_eq!(names, vec!["__consumer_offsets", "orders"]);
        assert_eq!(
            store.reserved_producer_ids(),
            0,
            "a new data directory handed none out"
        );
        (store.topic("orders").unwrap().id, store.cluster_id())
    };
    assert_eq!(cluster.len(), 22);
    let store = open(dir.path(), FlushPolicy::Always, TopicConfig::default());
    let t = store.topic("orders").unwrap();
    assert_eq!((t.id, t.partitions), (id, 5));
    assert_eq!(
        t.overrides.get("retention.ms").map(String::as_str),
        Some("1000")
    );
    assert_eq!(store.cluster_id(), cluster);
    assert_eq!(store.partition("orders", 4).unwrap().log_end_offset(), 1);

    store.delete_topic("orders").unwrap();
    assert!(store.topic("orders").is_none());
    assert!(!dir.path().join("orders-0").exists());
    assert!(matches!(
        store.delete_topic("orders"),
        Err(LogError::UnknownTopicOrPartition(_))
    ));
    drop(store);
    let store = open(dir.path(), FlushPolicy::Always, TopicConfig::default());
    assert!(store.topic("orders").is_none());
    // The name can be reused and starts empty.
    store
        .create_topic("orders", 1, &no_overrides(), false)
        .unwrap();
    assert_eq!(store.partition("orders", 0).unwrap().log_end_offset(), 0);
}

#[tokio::test]
async fn producer_ids_an_earlier_release_handed_out_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("meta")).unwrap();
    std::fs::write(dir.path().join("meta/producer-id-block"), b"3000").unwrap();
    let store = open(dir.path(), FlushPolicy::Always, TopicConfig::default());
    assert_eq!(store.reserved_producer_ids(), 3000);
}

#[tokio::test]
async fn config_changes_from_the_quorum_are_all_or_nothing_and_apply_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), FlushPolicy::Never, TopicConfig::default());
    let id = store
        .create_topic("c", 1, &no_overrides(), false)
        .unwrap()
        .id;
    let configs = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let bad = configs(&[("retention.ms", "5"), ("segment.bytes", "many")]);
    assert!(matches!(
        store.ensure_topic("c", id, 1, &bad),
        Err(LogError::InvalidConfig(_))
    ));
    assert_eq!(store.topic("c").unwrap().config.retention_ms, 604_800_000);
    let good = configs(&[("retention.ms", "5"), ("max.message.bytes", "100")]);
    store.ensure_topic("c", id, 1, &good).unwrap();
    let t = store.topic("c").unwrap();
    assert_eq!(
        (t.config.retention_ms, t.config.segment_bytes),
        (5, 1_073_741_824)
    );
    assert_eq!(t.overrides, good);
    // The new max.message.bytes applies to appends at once.
    let p = store.partition("c", 0).unwrap();
    assert!(matches!(
        p.append(&batch(&Spec::plain(1, 100)), 0),
        Err(LogError::MessageTooLarge {
            size: 161,
            max: 100
        })
    ));
    store
        .ensure_topic("c", id, 1, &configs(&[("retention.ms", "5")]))
        .unwrap();
    p.append(&batch(&Spec::plain(1, 100)), 0).unwrap();
    drop(p);
    drop(store);
    let store = open(dir.path(), FlushPolicy::Never, TopicConfig::default());
    let t = store.topic("c").unwrap();
    assert_eq!(t.config.retention_ms, 5);
    assert_eq!(t.config.max_message_bytes, 1_048_588);
}

#[tokio::test]
async fn bad_appends_are_rejected_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), FlushPolicy::Never, TopicConfig::default());
    store.create_topic("b", 1, &no_overrides(), false).unwrap();
    let p = store.partition("b", 0).unwrap();
    let good = batch(&Spec::plain(2, 10));
    let mut corrupt = batch(&Spec::plain(2, 10));
    let n = corrupt.len();
    corrupt[n - 1] ^= 1;
    let mut call = good.clone();
    call.extend_from_slice(&corrupt);
    assert!(matches!(p.append(&call, 0), Err(LogError::CorruptBatch(_))));
    let transactional = batch(&Spec {
        attributes: 1 << 4,
        ..Spec::plain(1, 1)
    });
    assert!(matches!(
        p.append(&transactional, 0),
        Err(LogError::InvalidRecord(_))
    ));
    let control = batch(&Spec {
        attributes: 1 << 5,
        ..Spec::plain(1, 1)
    });
    assert!(matches!(
        p.append(&control, 0),
        Err(LogError::InvalidRecord(_))
    ));
    assert!(matches!(p.append(&[], 0), Err(LogError::CorruptBatch(_))));
    let mut old_magic = good.clone();
    old_magic[16] = 1;
    assert!(matches!(
        p.append(&old_magic, 0),
        Err(LogError::CorruptBatch(_))
    ));
    assert_eq!(p.log_end_offset(), 0);
    assert_eq!(p.size_bytes(), 0);
    // Compressed batches (attributes bits 0-2) are stored as sent.
    let gzip = batch(&Spec {
        attributes: 1,
        ..Spec::plain(4, 40)
    });
    assert_eq!(p.append(&gzip, 0).unwrap().end_offset, 4);
}

#[tokio::test]
async fn orphan_partition_directories_are_removed_on_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), FlushPolicy::Never, TopicConfig::default());
        store
            .create_topic("kept", 1, &no_overrides(), false)
            .unwrap();
    }
    // A crash between creating directories and writing the metadata.
    std::fs::create_dir_all(dir.path().join("ghost-0")).unwrap();
    std::fs::create_dir_all(dir.path().join("kept-1")).unwrap();
    std::fs::create_dir_all(dir.path().join("not a partition")).unwrap();
    let store = open(dir.path(), FlushPolicy::Never, TopicConfig::default());
    assert!(!dir.path().join("ghost-0").exists());
    assert!(!dir.path().join("kept-1").exists());
    assert!(dir.path().join("kept-0").exists());
    assert!(dir.path().join("not a partition").exists());
    assert_eq!(store.topics().len(), 1);
}

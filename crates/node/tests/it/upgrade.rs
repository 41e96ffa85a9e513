//! A data directory written by the single-node release before the metadata quorum
//! (commit b284ec8, `tests/fixtures/single-node-b284ec8`, made by
//! `tests/fixtures/make-single-node-fixture.py`) opens and serves its topics,
//! committed offsets and idempotent producer state unchanged.

use std::path::Path;

use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
use kafka_protocol::messages::{GroupId, OffsetFetchRequest, TopicName};
use kafka_protocol::protocol::StrBytes;
use sluice_group::{Coordination, GroupConfig};
use sluice_log::LogError;
use sluice_topology::AppendError;
use sluice_vocab::internal::OFFSETS_TOPIC;

use super::*;

const FIXTURE: &str = "tests/fixtures/single-node-b284ec8";

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read fixture") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_previous_releases_single_node_data_directory_is_adopted_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURE),
        dir.path(),
    );
    let (ids, cluster_id) = {
        let store = open_store(dir.path());
        let ids: Vec<(String, [u8; 16])> =
            store.topics().into_iter().map(|t| (t.name, t.id)).collect();
        (ids, store.cluster_id())
    };
    assert_eq!(ids.len(), 3, "{ids:?}");

    let node = start_single(dir.path()).await;
    image_where(
        &node,
        "the adopted topics led here, the cluster id set",
        |img| {
            img.local_state_adopted
                && !img.cluster_id.is_empty()
                && ["orders", "events", OFFSETS_TOPIC].iter().all(|t| {
                    img.topics
                        .get(*t)
                        .is_some_and(|t| t.partitions.iter().all(|p| p.leader == 0))
                })
        },
    )
    .await;
    let image = node.image();
    assert_eq!(
        image.cluster_id, cluster_id,
        "the cluster id is the data directory's"
    );
    for (name, id) in &ids {
        assert_eq!(&image.topics[name].topic_id, id, "{name} keeps its id");
    }
    assert_eq!(image.topics["orders"].partitions.len(), 2);
    assert_eq!(
        image.topics["events"]
            .configs
            .get("cleanup.policy")
            .map(String::as_str),
        Some("compact"),
        "overrides are adopted"
    );
    assert_eq!(
        image.topics[OFFSETS_TOPIC].partitions[0].replicas,
        vec![0],
        "a single node's internal topics keep one replica"
    );

    // Every record.
    let leads = |topic: &'static str, partition: i32| {
        let node = node.clone();
        async move {
            loop {
                if node.lead_for_read(topic, partition, -1).is_ok() {
                    return read_all(&node, topic, partition);
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
    };
    for p in 0..2 {
        let got = leads("orders", p).await;
        let want: Vec<(i64, String, String)> = (0..10)
            .map(|i| {
                let n = i * 2 + p;
                (i64::from(i), format!("k{n}"), format!("order-{n}"))
            })
            .collect();
        assert_eq!(got, want, "orders-{p}");
    }
    let events = leads("events", 0).await;
    assert_eq!(
        events.iter().map(|r| r.2.clone()).collect::<Vec<_>>(),
        (0..5).map(|i| format!("event-{i}")).collect::<Vec<_>>()
    );

    // Every committed offset.
    let groups = Coordination::start(node.clone(), GroupConfig::default());
    let coordinator = loop {
        match groups.groups() {
            Ok(g) => break g,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
        }
    };
    let mut fetch = OffsetFetchRequest::default();
    fetch.group_id = GroupId(StrBytes::from_static_str("billing"));
    let mut topic = OffsetFetchRequestTopic::default();
    topic.name = TopicName(StrBytes::from_static_str("orders"));
    topic.partition_indexes = vec![0, 1];
    fetch.topics = Some(vec![topic]);
    let committed = coordinator.offset_fetch(fetch, 5).await;
    let offsets: Vec<(i32, i64)> = committed.topics[0]
        .partitions
        .iter()
        .map(|p| (p.partition_index, p.committed_offset))
        .collect();
    assert_eq!(offsets, vec![(0, 3), (1, 7)]);

    // The idempotent producer's state: producer 0 wrote sequences 0-9 to orders-0.
    let lead = node
        .lead_for_produce("orders", 0, true)
        .expect("leads orders-0");
    let retry = lead
        .append(&idempotent(&["k18"], 0, 9))
        .expect("a retry of the last batch is accepted");
    assert!(retry.duplicate, "and recognised as a duplicate");
    assert_eq!(retry.base_offset, 9);
    let next = lead
        .append(&idempotent(&["k20"], 0, 10))
        .expect("next sequence");
    assert_eq!((next.base_offset, next.duplicate), (10, false));
    assert!(matches!(
        lead.append(&idempotent(&["gap"], 0, 12)),
        Err(AppendError::Log(LogError::OutOfOrderSequence { .. }))
    ));
    lead.wait_committed(next.end_offset, Some(WAIT))
        .await
        .expect("committed");
    // Producer ids below the old data directory's reservation are never handed out.
    assert!(node.next_producer_id().await.expect("id") >= 1000);

    groups.shutdown().await;
    node.shutdown().await;
}

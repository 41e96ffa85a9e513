//! A single node: its own controller at once, the offsets topic, produce through its
//! leadership, and a restart.

use std::collections::BTreeMap;

use sluice_topology::{Command, CommandOutput, Topology};
use sluice_vocab::internal::OFFSETS_TOPIC;
use sluice_vocab::ErrorCode;

use super::*;

fn create(name: &str, partitions: i32) -> Command {
    Command::CreateTopic {
        name: name.to_string(),
        partitions,
        replication_factor: 1,
        configs: BTreeMap::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_leads_at_once_and_keeps_its_data_across_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = start_single(dir.path()).await;
    assert_eq!(node.controller_id(), Some(0), "its own controller");
    assert!(node.stale_view().is_none());
    image_where(&node, "the offsets topic with one replica", |img| {
        img.partition(OFFSETS_TOPIC, 0)
            .is_some_and(|p| p.replicas == vec![0] && p.leader == 0)
    })
    .await;
    assert_eq!(
        node.image().cluster_id,
        node.store().cluster_id(),
        "the store's cluster id is the cluster's"
    );

    let created = node.propose(create("orders", 2)).await.expect("created");
    assert!(matches!(created, CommandOutput::TopicCreated { .. }));
    image_where(&node, "orders led here", |img| {
        img.partition("orders", 1).is_some_and(|p| p.leader == 0)
    })
    .await;
    let lead = loop {
        match node.lead_for_produce("orders", 1, true) {
            Ok(lead) => break lead,
            Err(ErrorCode::NotLeaderOrFollower) => {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await
            }
            Err(e) => panic!("{e}"),
        }
    };
    let appended = lead
        .append(&encode(&records(&["a", "b"], 5)))
        .expect("append");
    lead.wait_committed(appended.end_offset, Some(WAIT))
        .await
        .expect("acks=all on one node: committed once durable");
    assert_eq!(
        node.lead_for_read("orders", 1, lead.epoch() + 1)
            .unwrap_err(),
        ErrorCode::UnknownLeaderEpoch
    );
    assert_eq!(
        node.lead_for_produce("nope", 0, false).unwrap_err(),
        ErrorCode::UnknownTopicOrPartition
    );
    let first_id = node.next_producer_id().await.expect("producer id");
    assert_eq!(node.next_producer_id().await, Ok(first_id + 1));

    node.shutdown().await;
    node.store().flush_all().expect("flush");
    drop(node);

    let node = start_single(dir.path()).await;
    image_where(&node, "orders led again", |img| {
        img.partition("orders", 1).is_some_and(|p| p.leader == 0)
    })
    .await;
    let got = loop {
        match node.lead_for_read("orders", 1, -1) {
            Ok(_) => break read_all(&node, "orders", 1),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
        }
    };
    assert_eq!(
        got,
        vec![
            (0, "a".to_string(), "v-a".to_string()),
            (1, "b".to_string(), "v-b".to_string())
        ]
    );
    let next = node.next_producer_id().await.expect("producer id");
    assert!(
        next > first_id + 1,
        "producer ids are never handed out twice"
    );
    node.shutdown().await;
}

//! Offsets committed inside a transaction: pending until the transaction's
//! marker, unstable to a fetch that requires stability, and replayed the
//! same way after a restart.

use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
use kafka_protocol::messages::txn_offset_commit_request::{
    TxnOffsetCommitRequestPartition, TxnOffsetCommitRequestTopic,
};
use kafka_protocol::messages::{
    OffsetFetchRequest, ProducerId, TopicName, TransactionalId, TxnOffsetCommitRequest,
};
use sluice_group::GroupCoordinator;
use sluice_log::Marker;
use sluice_vocab::internal::OFFSETS_TOPIC;
use sluice_vocab::ErrorCode;

use crate::*;

async fn txn_commit(
    c: &Arc<GroupCoordinator>,
    group: &str,
    producer_id: i64,
    offset: i64,
) -> Vec<i16> {
    let req = TxnOffsetCommitRequest::default()
        .with_transactional_id(TransactionalId(s("tid")))
        .with_group_id(gid(group))
        .with_producer_id(ProducerId(producer_id))
        .with_producer_epoch(0)
        .with_generation_id(-1)
        .with_topics(vec![TxnOffsetCommitRequestTopic::default()
            .with_name(TopicName(s(TOPIC)))
            .with_partitions(vec![TxnOffsetCommitRequestPartition::default()
                .with_partition_index(0)
                .with_committed_offset(offset)
                .with_committed_leader_epoch(-1)])]);
    c.txn_offset_commit(req)
        .await
        .topics
        .iter()
        .flat_map(|t| t.partitions.iter().map(|p| p.error_code))
        .collect()
}

/// (error, offset) of partition 0 of TOPIC for `group`, requiring stable
/// offsets (v7).
async fn fetch_stable(c: &Arc<GroupCoordinator>, group: &str) -> (i16, i64) {
    let req = OffsetFetchRequest::default()
        .with_group_id(gid(group))
        .with_require_stable(true)
        .with_topics(Some(vec![OffsetFetchRequestTopic::default()
            .with_name(TopicName(s(TOPIC)))
            .with_partition_indexes(vec![0])]));
    let resp = c.offset_fetch(req, 7).await;
    let p = &resp.topics[0].partitions[0];
    (p.error_code, p.committed_offset)
}

/// Writes the transaction's marker into the offsets log, as the transaction
/// coordinator does, and tells the group coordinator.
async fn end(
    store: &Arc<sluice_log::Store>,
    c: &Arc<GroupCoordinator>,
    producer_id: i64,
    commit: bool,
) {
    let p = store.partition(OFFSETS_TOPIC, 0).unwrap();
    let marker = Marker {
        commit,
        coordinator_epoch: 0,
    };
    let end = p
        .append_marker(producer_id, 0, marker, 0)
        .unwrap()
        .end_offset;
    p.wait_durable(end).await.unwrap();
    c.complete_transaction(producer_id, commit);
}

#[tokio::test]
async fn transactional_offsets_wait_for_the_outcome_and_replay_alike() {
    let env = env(0).await;
    let dir = env.dir;
    {
        let c = &env.coord;
        assert_eq!(txn_commit(c, "committed", 7, 40).await, vec![0]);
        assert_eq!(txn_commit(c, "aborted", 8, 50).await, vec![0]);
        assert_eq!(txn_commit(c, "open", 9, 60).await, vec![0]);
        // Until the outcome: unstable to whoever requires stability.
        assert_eq!(
            fetch_stable(c, "committed").await,
            (ErrorCode::UnstableOffsetCommit.code(), -1)
        );
        end(&env.store, c, 7, true).await;
        end(&env.store, c, 8, false).await;
        assert_eq!(fetch_stable(c, "committed").await, (0, 40));
        assert_eq!(fetch_stable(c, "aborted").await, (0, -1));
        assert_eq!(
            fetch_stable(c, "open").await.0,
            ErrorCode::UnstableOffsetCommit.code()
        );
    }
    drop(env.coord);
    drop(env.store);

    // Replay: the committed transaction's offset, not the aborted one's;
    // the open one is pending again and settles when its marker comes.
    let store = open_store(dir.path());
    let c = open_coordinator(&store, config(0)).await;
    assert_eq!(fetch_stable(&c, "committed").await, (0, 40));
    assert_eq!(fetch_stable(&c, "aborted").await, (0, -1));
    assert_eq!(
        fetch_stable(&c, "open").await.0,
        ErrorCode::UnstableOffsetCommit.code()
    );
    end(&store, &c, 9, true).await;
    assert_eq!(fetch_stable(&c, "open").await, (0, 60));
}

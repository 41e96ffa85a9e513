//! OffsetCommit / OffsetFetch, durability and replay.

use std::sync::Arc;

use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::offset_fetch_request::{
    OffsetFetchRequestGroup, OffsetFetchRequestTopics,
};
use kafka_protocol::messages::{
    DeleteGroupsRequest, ListGroupsRequest, OffsetCommitRequest, OffsetFetchRequest,
};
use sluice_group::GroupCoordinator;
use sluice_vocab::internal::OFFSETS_TOPIC;
use sluice_vocab::ErrorCode;

use crate::*;

#[tokio::test]
async fn commit_and_fetch_round_trip_metadata() {
    let env = env(0).await;
    let c = &env.coord;
    assert!(env
        .store
        .topic(OFFSETS_TOPIC)
        .is_some_and(|t| t.internal && t.partitions == 1));

    // A consumer without group management commits with generation -1.
    let resp = commit(
        c,
        "solo",
        -1,
        "",
        TOPIC,
        &[
            (0, 42, 5, Some("hello, ü")),
            (1, 7, -1, None),
            (2, 0, -1, Some("")),
            (99, 1, -1, None),
        ],
    )
    .await;
    assert_eq!(
        commit_errors(&resp),
        vec![0, 0, 0, code(ErrorCode::UnknownTopicOrPartition)]
    );
    let resp = commit(c, "solo", -1, "", "no-such-topic", &[(0, 1, -1, None)]).await;
    assert_eq!(
        commit_errors(&resp),
        vec![code(ErrorCode::UnknownTopicOrPartition)]
    );
    let big = "m".repeat(5000);
    let resp = commit(
        c,
        "solo",
        -1,
        "",
        TOPIC,
        &[(3, 9, -1, Some(&big)), (2, 1, -1, None)],
    )
    .await;
    assert_eq!(
        commit_errors(&resp),
        vec![code(ErrorCode::OffsetMetadataTooLarge), 0]
    );

    let got = fetched(&fetch(c, "solo", TOPIC, Some(&[0, 1, 3])).await);
    assert_eq!(
        got,
        vec![
            (TOPIC.to_owned(), 0, 42, 5, "hello, ü".to_owned(), 0),
            (TOPIC.to_owned(), 1, 7, -1, String::new(), 0),
            (TOPIC.to_owned(), 3, -1, -1, String::new(), 0),
        ]
    );
    // topics = null: every committed partition.
    let all = fetched(&fetch(c, "solo", TOPIC, None).await);
    let offsets: Vec<(i32, i64)> = all.iter().map(|r| (r.1, r.2)).collect();
    assert_eq!(offsets, vec![(0, 42), (1, 7), (2, 1)]);

    // An unknown group: -1 without error.
    let none = fetched(&fetch(c, "nobody", TOPIC, Some(&[0])).await);
    assert_eq!(none, vec![(TOPIC.to_owned(), 0, -1, -1, String::new(), 0)]);
    assert!(fetch(c, "nobody", TOPIC, None).await.topics.is_empty());

    // v8+: several groups in one request.
    let mut req = OffsetFetchRequest::default();
    let mut one = OffsetFetchRequestGroup::default();
    one.group_id = gid("solo");
    let mut t = OffsetFetchRequestTopics::default();
    t.name = TopicName(s(TOPIC));
    t.partition_indexes = vec![0];
    one.topics = Some(vec![t]);
    let mut two = OffsetFetchRequestGroup::default();
    two.group_id = gid("nobody");
    two.topics = None;
    req.groups = vec![one, two];
    req.require_stable = true;
    let resp = c.offset_fetch(req, 9).await;
    assert_eq!(resp.groups.len(), 2);
    let p = &resp.groups[0].topics[0].partitions[0];
    assert_eq!((p.committed_offset, p.committed_leader_epoch), (42, 5));
    assert_eq!(p.metadata.as_deref(), Some("hello, ü"));
    assert!(resp.groups[1].topics.is_empty());
    assert_eq!(resp.groups[1].error_code, 0);

    // v1: no leader epoch in the answer.
    let mut req = OffsetFetchRequest::default();
    req.group_id = gid("solo");
    let mut t = kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic::default();
    t.name = TopicName(s(TOPIC));
    t.partition_indexes = vec![0];
    req.topics = Some(vec![t]);
    let resp = c.offset_fetch(req, 1).await;
    let p = &resp.topics[0].partitions[0];
    assert_eq!((p.committed_offset, p.committed_leader_epoch), (42, -1));
}

/// One member, one generation, synced. Returns (member id, generation).
async fn stable_single(c: &Arc<GroupCoordinator>, group: &str) -> (String, i32) {
    let j = join_new(c, group, "solo", 10_000, 1_000).await;
    assert_eq!(j.error_code, 0);
    let me = j.member_id.to_string();
    let r = sync(c, group, j.generation_id, &me, None, &[(&me, b"all")]).await;
    assert_eq!(r.error_code, 0);
    (me, j.generation_id)
}

#[tokio::test]
async fn commits_need_a_current_member_and_generation() {
    let env = env(0).await;
    let c = &env.coord;

    // No group and a real generation: a stale member, ILLEGAL_GENERATION.
    let r = commit(c, "g", 3, "someone", TOPIC, &[(0, 1, -1, None)]).await;
    assert_eq!(commit_errors(&r), vec![code(ErrorCode::IllegalGeneration)]);

    // Joined but not yet synced (CompletingRebalance): REBALANCE_IN_PROGRESS.
    let j = join_new(c, "g", "solo", 10_000, 1_000).await;
    let me = j.member_id.to_string();
    let r = commit(c, "g", j.generation_id, &me, TOPIC, &[(0, 1, -1, None)]).await;
    assert_eq!(
        commit_errors(&r),
        vec![code(ErrorCode::RebalanceInProgress)]
    );
    let s1 = sync(c, "g", j.generation_id, &me, None, &[(&me, b"all")]).await;
    assert_eq!(s1.error_code, 0);
    let generation = j.generation_id;

    let r = commit(c, "g", generation + 1, &me, TOPIC, &[(0, 1, -1, None)]).await;
    assert_eq!(commit_errors(&r), vec![code(ErrorCode::IllegalGeneration)]);
    let r = commit(c, "g", generation, "intruder", TOPIC, &[(0, 1, -1, None)]).await;
    assert_eq!(commit_errors(&r), vec![code(ErrorCode::UnknownMemberId)]);
    // The admin-style commit is refused while the group has members.
    let r = commit(c, "g", -1, "", TOPIC, &[(0, 1, -1, None)]).await;
    assert_eq!(commit_errors(&r), vec![code(ErrorCode::UnknownMemberId)]);
    assert_eq!(
        fetched(&fetch(c, "g", TOPIC, Some(&[0])).await)[0].2,
        -1,
        "nothing was stored"
    );

    let r = commit(c, "g", generation, &me, TOPIC, &[(0, 11, 2, Some("m"))]).await;
    assert_eq!(commit_errors(&r), vec![0]);
    assert_eq!(
        fetched(&fetch(c, "g", TOPIC, Some(&[0])).await),
        vec![(TOPIC.to_owned(), 0, 11, 2, "m".to_owned(), 0)]
    );

    // A static member's commit with someone else's instance id is fenced.
    let (other, other_gen) = stable_single(c, "g2").await;
    let mut req = OffsetCommitRequest::default();
    req.group_id = gid("g2");
    req.generation_id_or_member_epoch = other_gen;
    req.member_id = s(&other);
    req.group_instance_id = Some(s("not-mine"));
    let mut t = OffsetCommitRequestTopic::default();
    t.name = TopicName(s(TOPIC));
    let mut p = OffsetCommitRequestPartition::default();
    p.partition_index = 1;
    p.committed_offset = 5;
    t.partitions = vec![p];
    req.topics = vec![t];
    // The instance id is unknown to the group, so Kafka checks the member id
    // alone — which is valid here.
    assert_eq!(commit_errors(&c.offset_commit(req, 7).await), vec![0]);
}

#[tokio::test]
async fn offsets_survive_reopening_store_and_coordinator() {
    let env = env(0).await;
    let dir = env.dir;
    {
        let c = &env.coord;
        let (me, generation) = stable_single(c, "members").await;
        for offset in [5, 6, 7] {
            let r = commit(
                c,
                "members",
                generation,
                &me,
                TOPIC,
                &[(0, offset, 1, Some("meta"))],
            )
            .await;
            assert_eq!(commit_errors(&r), vec![0]);
        }
        let r = commit(
            c,
            "admin",
            -1,
            "",
            TOPIC,
            &[(1, 100, -1, Some("reset")), (2, 200, -1, None)],
        )
        .await;
        assert_eq!(commit_errors(&r), vec![0, 0]);
        let r = commit(c, "doomed", -1, "", TOPIC, &[(3, 3, -1, None)]).await;
        assert_eq!(commit_errors(&r), vec![0]);
        let mut del = DeleteGroupsRequest::default();
        del.groups_names = vec![gid("doomed")];
        assert_eq!(c.delete_groups(del, 2).await.results[0].error_code, 0);
    }
    drop(env.coord);
    drop(env.store);

    let store = open_store(dir.path());
    let c = open_coordinator(&store, config(0)).await;
    assert_eq!(
        fetched(&fetch(&c, "members", TOPIC, None).await),
        vec![(TOPIC.to_owned(), 0, 7, 1, "meta".to_owned(), 0)],
        "the last commit wins"
    );
    assert_eq!(
        fetched(&fetch(&c, "admin", TOPIC, None).await),
        vec![
            (TOPIC.to_owned(), 1, 100, -1, "reset".to_owned(), 0),
            (TOPIC.to_owned(), 2, 200, -1, String::new(), 0),
        ]
    );
    assert!(
        fetch(&c, "doomed", TOPIC, None).await.topics.is_empty(),
        "a deleted group's offsets stay deleted"
    );
    // Groups come back Empty, with no members, and are listed.
    assert_eq!(state_of(&c, "members"), ("Empty".to_owned(), Vec::new()));
    let listed: Vec<String> = c
        .list_groups(ListGroupsRequest::default(), 4)
        .groups
        .iter()
        .map(|g| g.group_id.to_string())
        .collect();
    assert_eq!(listed, vec!["admin".to_owned(), "members".to_owned()]);

    // The group works as before: a new member starts from generation 1 and
    // commits on top of what was replayed.
    let (me, generation) = stable_single(&c, "members").await;
    assert_eq!(generation, 1);
    let r = commit(&c, "members", generation, &me, TOPIC, &[(0, 8, 1, None)]).await;
    assert_eq!(commit_errors(&r), vec![0]);
    drop(c);
    drop(store);

    let store = open_store(dir.path());
    let c = open_coordinator(&store, config(0)).await;
    assert_eq!(
        fetched(&fetch(&c, "members", TOPIC, Some(&[0])).await)[0].2,
        8
    );
}

/// Every record of the offsets log: (offset, key present, value present).
fn offsets_log(store: &sluice_log::Store) -> Vec<(i64, bool)> {
    use kafka_protocol::records::RecordBatchDecoder;
    let p = store
        .partition(OFFSETS_TOPIC, 0)
        .expect("offsets partition");
    let mut out = Vec::new();
    let mut pos = p.log_start_offset();
    while pos < p.high_watermark() {
        let read = p
            .read(pos, 1 << 20, true, sluice_log::ReadLimit::HighWatermark)
            .expect("read");
        let mut buf = read.records;
        for set in RecordBatchDecoder::decode_all(&mut buf).expect("decode") {
            for r in set.records {
                if r.offset >= pos {
                    out.push((r.offset, r.value.is_some()));
                }
            }
        }
        pos = out.last().map_or(pos, |(o, _)| o + 1);
    }
    out
}

#[tokio::test]
async fn compaction_keeps_latest_offsets_and_truncates_the_log() {
    let env = env(0).await;
    let dir = env.dir;
    let c = &env.coord;
    for offset in 1..=20 {
        let r = commit(c, "a", -1, "", TOPIC, &[(0, offset, 2, Some("a-meta"))]).await;
        assert_eq!(commit_errors(&r), vec![0]);
    }
    let r = commit(
        c,
        "b",
        -1,
        "",
        TOPIC,
        &[(1, 500, -1, None), (2, 600, -1, None)],
    )
    .await;
    assert_eq!(commit_errors(&r), vec![0, 0]);
    let r = commit(c, "gone", -1, "", TOPIC, &[(3, 1, -1, None)]).await;
    assert_eq!(commit_errors(&r), vec![0]);
    let mut del = DeleteGroupsRequest::default();
    del.groups_names = vec![gid("gone")];
    assert_eq!(c.delete_groups(del, 2).await.results[0].error_code, 0);
    let before = offsets_log(&env.store);
    assert_eq!(before.len(), 20 + 2 + 1 + 1);

    let snapshot = c.compact_offsets().await.expect("compact");
    assert_eq!(snapshot, 3, "a-0, b-1, b-2");
    let p = env.store.partition(OFFSETS_TOPIC, 0).unwrap();
    assert_eq!(
        p.log_start_offset(),
        24,
        "the log now starts at the snapshot"
    );
    let after = offsets_log(&env.store);
    assert_eq!(
        after.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![24, 25, 26]
    );
    assert_eq!(
        fetched(&fetch(c, "a", TOPIC, None).await),
        vec![(TOPIC.to_owned(), 0, 20, 2, "a-meta".to_owned(), 0)]
    );

    // Commits after the snapshot, then a restart: replay = snapshot + tail.
    let r = commit(c, "b", -1, "", TOPIC, &[(2, 601, -1, Some("after"))]).await;
    assert_eq!(commit_errors(&r), vec![0]);
    drop(env.coord);
    drop(env.store);
    let store = open_store(dir.path());
    let c = open_coordinator(&store, config(0)).await;
    assert_eq!(fetched(&fetch(&c, "a", TOPIC, None).await)[0].2, 20);
    assert_eq!(
        fetched(&fetch(&c, "b", TOPIC, None).await),
        vec![
            (TOPIC.to_owned(), 1, 500, -1, String::new(), 0),
            (TOPIC.to_owned(), 2, 601, -1, "after".to_owned(), 0),
        ]
    );
    assert!(fetch(&c, "gone", TOPIC, None).await.topics.is_empty());

    // The threshold triggers compaction by itself.
    c.set_offsets_compaction_threshold(10);
    for offset in 21..=40 {
        let r = commit(&c, "a", -1, "", TOPIC, &[(0, offset, 2, None)]).await;
        assert_eq!(commit_errors(&r), vec![0]);
    }
    let p = store.partition(OFFSETS_TOPIC, 0).unwrap();
    assert!(
        eventually(std::time::Duration::from_secs(5), || p.log_start_offset()
            > 24)
        .await,
        "automatic compaction moved the log start"
    );
    assert!(offsets_log(&store).len() < 20);
    assert_eq!(fetched(&fetch(&c, "a", TOPIC, None).await)[0].2, 40);
}

/// Concurrent commits of one partition: whatever the interleaving, memory
/// and the replayed log agree on the winner (the last one appended).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commits_agree_with_replay() {
    let env = env(0).await;
    let dir = env.dir;
    let mut tasks = Vec::new();
    for t in 0..8i64 {
        let c = env.coord.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..25i64 {
                let offset = t * 1000 + i;
                let r = commit(
                    &c,
                    "race",
                    -1,
                    "",
                    TOPIC,
                    &[(0, offset, -1, None), (1, offset, -1, None)],
                )
                .await;
                assert_eq!(commit_errors(&r), vec![0, 0]);
            }
        }));
    }
    for t in tasks {
        t.await.expect("committer");
    }
    let live = fetched(&fetch(&env.coord, "race", TOPIC, None).await);
    assert_eq!(live.len(), 2);
    assert_eq!(
        live[0].2, live[1].2,
        "both partitions were committed together"
    );
    drop(env.coord);
    drop(env.store);
    let store = open_store(dir.path());
    let c = open_coordinator(&store, config(0)).await;
    assert_eq!(fetched(&fetch(&c, "race", TOPIC, None).await), live);
}

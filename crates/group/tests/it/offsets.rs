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

    // No group and a real generation: OffsetCommit v9 (KIP-848) says the
    // group is not found; before v9, a stale member, ILLEGAL_GENERATION.
    let r = commit(c, "g", 3, "someone", TOPIC, &[(0, 1, -1, None)]).await;
    assert_eq!(commit_errors(&r), vec![code(ErrorCode::GroupIdNotFound)]);
    let v8 = commit_request("g", 3, "someone", TOPIC, &[(0, 1, -1, None)]);
    let r = c.offset_commit(v8, 8).await;
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
        // Batches say where the next read starts: compacted ones may hold
        // fewer records than offsets, or none.
        let mut next = pos;
        let mut rest = &read.records[..];
        while let Some(h) = sluice_log::BatchHeader::parse(rest) {
            next = next.max(h.next_offset());
            rest = &rest[h.size()..];
        }
        let mut buf = read.records;
        for set in RecordBatchDecoder::decode_all(&mut buf).expect("decode") {
            for r in set.records {
                if r.offset >= pos && !r.control {
                    out.push((r.offset, r.value.is_some()));
                }
            }
        }
        assert!(next > pos, "the read moved on");
        pos = next;
    }
    out
}

/// The offsets log is a compacted topic: the log cleaner keeps each key's
/// latest commit and a deleted group's tombstones, and replay after a
/// restart reads exactly the live offsets from what it left.
#[tokio::test]
async fn the_cleaner_keeps_the_latest_offsets_and_replay_reads_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_store(dir.path());
    store
        .create_topic(TOPIC, PARTITIONS, &BTreeMap::new(), false)
        .expect("create topic");
    // Small segments, so that most of the commits below are compactable.
    let mut configs = sluice_vocab::internal::offsets_topic_configs();
    configs.insert("segment.bytes".into(), "600".into());
    store
        .create_topic(OFFSETS_TOPIC, 1, &configs, false)
        .expect("offsets topic");
    let c = open_coordinator(&store, config(0)).await;
    for offset in 1..=20 {
        let r = commit(&c, "a", -1, "", TOPIC, &[(0, offset, 2, Some("a-meta"))]).await;
        assert_eq!(commit_errors(&r), vec![0]);
    }
    let r = commit(
        &c,
        "b",
        -1,
        "",
        TOPIC,
        &[(1, 500, -1, None), (2, 600, -1, None)],
    )
    .await;
    assert_eq!(commit_errors(&r), vec![0, 0]);
    let r = commit(&c, "gone", -1, "", TOPIC, &[(3, 1, -1, None)]).await;
    assert_eq!(commit_errors(&r), vec![0]);
    let mut del = DeleteGroupsRequest::default();
    del.groups_names = vec![gid("gone")];
    assert_eq!(c.delete_groups(del, 2).await.results[0].error_code, 0);
    // More commits of "a", so what came before lies in rolled segments.
    for offset in 21..=40 {
        let r = commit(&c, "a", -1, "", TOPIC, &[(0, offset, 2, Some("a-meta"))]).await;
        assert_eq!(commit_errors(&r), vec![0]);
    }
    let before = offsets_log(&store);
    assert_eq!(before.len(), 40 + 2 + 1 + 1);

    let p = store.partition(OFFSETS_TOPIC, 0).unwrap();
    let stats = p
        .compact(&sluice_log::CleanerConfig::default(), true)
        .expect("compact")
        .expect("a round ran");
    let after = offsets_log(&store);
    assert!(stats.records_removed > 20, "{stats:?}");
    assert_eq!(
        after.len() as u64,
        before.len() as u64 - stats.records_removed
    );
    // b's two commits and gone's commit and tombstone are each the latest
    // of their key; of a's 40 commits only the latest in the cleaned part
    // and those in the active segment stay.
    let cleaned: Vec<_> = after.iter().filter(|r| r.0 < stats.cleaned_to).collect();
    assert!(cleaned.len() <= 1 + 2 + 1, "{cleaned:?}");
    assert_eq!(
        fetched(&fetch(&c, "a", TOPIC, None).await),
        vec![(TOPIC.to_owned(), 0, 40, 2, "a-meta".to_owned(), 0)]
    );

    // A restart replays the compacted log.
    let r = commit(&c, "b", -1, "", TOPIC, &[(2, 601, -1, Some("after"))]).await;
    assert_eq!(commit_errors(&r), vec![0]);
    drop(c);
    drop(p);
    drop(store);
    let store = open_store(dir.path());
    let c = open_coordinator(&store, config(0)).await;
    assert_eq!(
        fetched(&fetch(&c, "a", TOPIC, None).await),
        vec![(TOPIC.to_owned(), 0, 40, 2, "a-meta".to_owned(), 0)]
    );
    assert_eq!(
        fetched(&fetch(&c, "b", TOPIC, None).await),
        vec![
            (TOPIC.to_owned(), 1, 500, -1, String::new(), 0),
            (TOPIC.to_owned(), 2, 601, -1, "after".to_owned(), 0),
        ]
    );
    assert!(fetch(&c, "gone", TOPIC, None).await.topics.is_empty());
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

/// A million commits of 100 groups through a compacted offsets log: with
/// the log cleaner running as the node runs it, the log stays a few MiB
/// (what is live, plus at most a few segments), and a restart replays the
/// latest offsets.
#[tokio::test]
async fn a_million_commits_keep_the_offsets_log_small() {
    const COMMITS: i64 = 1_000_000;
    const GROUPS: i64 = 100;
    let dir = tempfile::tempdir().expect("tempdir");
    let open = |dir: &std::path::Path| {
        Store::open(StoreConfig {
            data_dir: dir.to_path_buf(),
            defaults: TopicConfig::default(),
            // The bound is about bytes, not fsyncs.
            flush: FlushPolicy::Never,
            cleaner: Default::default(),
        })
        .expect("open store")
    };
    let store = open(dir.path());
    store
        .create_topic(TOPIC, PARTITIONS, &BTreeMap::new(), false)
        .expect("create topic");
    let c = open_coordinator(&store, config(0)).await;
    let p = store.partition(OFFSETS_TOPIC, 0).unwrap();
    let cleaner = sluice_log::CleanerConfig::default();
    let mut largest = 0u64;
    for i in 0..COMMITS {
        let group = format!("group-{}", i % GROUPS);
        let partition = ((i / GROUPS) % i64::from(PARTITIONS)) as i32;
        let r = commit(&c, &group, -1, "", TOPIC, &[(partition, i, -1, None)]).await;
        assert_eq!(commit_errors(&r), vec![0]);
        if i % 20_000 == 0 {
            // The node's cleaner duty: a round when the dirty ratio says so.
            p.compact(&cleaner, false).expect("compact");
            largest = largest.max(p.size_bytes());
        }
    }
    p.compact(&cleaner, false).expect("compact");
    largest = largest.max(p.size_bytes());
    assert!(largest < 4 << 20, "the offsets log reached {largest} bytes");
    let live = fetched(&fetch(&c, "group-7", TOPIC, None).await);
    drop(c);
    drop(p);
    drop(store);
    let store = open(dir.path());
    let c = open_coordinator(&store, config(0)).await;
    assert_eq!(fetched(&fetch(&c, "group-7", TOPIC, None).await), live);
    assert_eq!(live.len(), PARTITIONS as usize);
    // The last commit of group-7's partition 0 is the latest i with
    // i % 100 == 7 and (i / 100) % PARTITIONS == 0.
    let last = (0..COMMITS)
        .rev()
        .find(|i| i % GROUPS == 7 && (i / GROUPS) % i64::from(PARTITIONS) == 0)
        .unwrap();
    assert_eq!(live[0].2, last);
}

//! ListGroups / DescribeGroups / DeleteGroups.

use kafka_protocol::messages::{DeleteGroupsRequest, LeaveGroupRequest, ListGroupsRequest};
use sluice_vocab::ErrorCode;

use crate::*;

fn list(
    c: &std::sync::Arc<sluice_group::GroupCoordinator>,
    states: &[&str],
    types: &[&str],
    version: i16,
) -> Vec<(String, String, String)> {
    let mut req = ListGroupsRequest::default();
    if version >= 4 {
        req.states_filter = states.iter().map(|x| s(x)).collect();
    }
    if version >= 5 {
        req.types_filter = types.iter().map(|x| s(x)).collect();
    }
    let resp = c.list_groups(req, version);
    assert_eq!(resp.error_code, 0);
    resp.groups
        .iter()
        .map(|g| {
            (
                g.group_id.to_string(),
                g.protocol_type.to_string(),
                g.group_state.to_string(),
            )
        })
        .collect()
}

fn delete(
    c: &std::sync::Arc<sluice_group::GroupCoordinator>,
    groups: &[&str],
) -> impl std::future::Future<Output = Vec<(String, i16)>> {
    let c = c.clone();
    let mut req = DeleteGroupsRequest::default();
    req.groups_names = groups.iter().map(|g| gid(g)).collect();
    async move {
        c.delete_groups(req, 2)
            .await
            .results
            .iter()
            .map(|r| (r.group_id.to_string(), r.error_code))
            .collect()
    }
}

#[tokio::test]
async fn delete_groups_refuses_non_empty_groups() {
    let env = env(0).await;
    let c = &env.coord;
    let j = join_new(c, "busy", "m", 10_000, 1_000).await;
    let me = j.member_id.to_string();
    assert_eq!(
        sync(c, "busy", j.generation_id, &me, None, &[(&me, b"x")])
            .await
            .error_code,
        0
    );
    let r = commit(c, "busy", j.generation_id, &me, TOPIC, &[(0, 10, -1, None)]).await;
    assert_eq!(commit_errors(&r), vec![0]);

    assert_eq!(
        delete(c, &["busy", "unknown"]).await,
        vec![
            ("busy".to_owned(), code(ErrorCode::NonEmptyGroup)),
            ("unknown".to_owned(), code(ErrorCode::GroupIdNotFound)),
        ]
    );
    assert_eq!(fetched(&fetch(c, "busy", TOPIC, Some(&[0])).await)[0].2, 10);

    // Once the member leaves, the group is Empty and can go.
    let mut leave = LeaveGroupRequest::default();
    leave.group_id = gid("busy");
    leave.member_id = s(&me);
    assert_eq!(c.leave_group(leave, 0).await.error_code, 0);
    assert_eq!(state_of(c, "busy").0, "Empty");
    assert_eq!(delete(c, &["busy"]).await, vec![("busy".to_owned(), 0)]);
    assert_eq!(state_of(c, "busy"), ("Dead".to_owned(), Vec::new()));
    assert_eq!(fetched(&fetch(c, "busy", TOPIC, Some(&[0])).await)[0].2, -1);
    assert!(list(c, &[], &[], 3).is_empty());
    assert_eq!(
        delete(c, &["busy"]).await,
        vec![("busy".to_owned(), code(ErrorCode::GroupIdNotFound))]
    );
}

#[tokio::test]
async fn list_groups_filters_by_state_and_type() {
    let env = env(0).await;
    let c = &env.coord;
    let j = join_new(c, "stable", "m", 10_000, 1_000).await;
    let me = j.member_id.to_string();
    assert_eq!(
        sync(c, "stable", j.generation_id, &me, None, &[(&me, b"x")])
            .await
            .error_code,
        0
    );
    let r = commit(c, "offsets-only", -1, "", TOPIC, &[(0, 1, -1, None)]).await;
    assert_eq!(commit_errors(&r), vec![0]);

    let both = vec![
        ("offsets-only".to_owned(), String::new(), "Empty".to_owned()),
        (
            "stable".to_owned(),
            "consumer".to_owned(),
            "Stable".to_owned(),
        ),
    ];
    assert_eq!(list(c, &[], &[], 5), both);
    assert_eq!(list(c, &["Stable"], &[], 4), vec![both[1].clone()]);
    assert_eq!(
        list(c, &["empty"], &[], 4),
        vec![both[0].clone()],
        "states match case-insensitively"
    );
    assert_eq!(list(c, &["Dead"], &[], 4), Vec::new());
    assert_eq!(list(c, &[], &["classic"], 5), both);
    assert_eq!(list(c, &[], &["consumer"], 5), Vec::new());
    // Before v4 there is no state in the answer.
    let old: Vec<String> = list(c, &[], &[], 3).into_iter().map(|g| g.2).collect();
    assert_eq!(old, vec![String::new(), String::new()]);
}

#[tokio::test]
async fn describe_groups_as_kafka() {
    let env = env(0).await;
    let c = &env.coord;

    // Unknown: Dead without error before v6, GROUP_ID_NOT_FOUND from v6.
    let old = describe(c, "ghost", 5);
    assert_eq!(old.groups[0].error_code, 0);
    assert_eq!(old.groups[0].group_state.as_str(), "Dead");
    let new = describe(c, "ghost", 6);
    assert_eq!(new.groups[0].error_code, code(ErrorCode::GroupIdNotFound));
    assert!(new.groups[0].error_message.is_some());

    // CompletingRebalance: members without metadata or assignment.
    let j = join_new(c, "g", "client-x", 10_000, 1_000).await;
    let me = j.member_id.to_string();
    let d = describe(c, "g", 5);
    let g = &d.groups[0];
    assert_eq!(g.group_state.as_str(), "CompletingRebalance");
    assert_eq!(g.protocol_type.as_str(), "consumer");
    assert_eq!(g.protocol_data.as_str(), "");
    assert_eq!(g.members.len(), 1);
    assert!(g.members[0].member_metadata.is_empty());

    // Stable: protocol, metadata and assignment.
    assert_eq!(
        sync(c, "g", j.generation_id, &me, None, &[(&me, b"parts")])
            .await
            .error_code,
        0
    );
    let d = describe(c, "g", 5);
    let g = &d.groups[0];
    assert_eq!(g.group_state.as_str(), "Stable");
    assert_eq!(g.protocol_data.as_str(), "range");
    let m = &g.members[0];
    assert_eq!(m.member_id.as_str(), me);
    assert_eq!(m.client_id.as_str(), "client-x");
    assert_eq!(m.client_host.as_str(), "/127.0.0.1");
    assert_eq!(m.member_metadata.as_ref(), b"client-x");
    assert_eq!(m.member_assignment.as_ref(), b"parts");
}

/// OffsetDelete of `(topic, partitions)` in `group`: the top-level code and
/// (topic, partition, code) per partition.
async fn offset_delete(
    c: &std::sync::Arc<sluice_group::GroupCoordinator>,
    group: &str,
    topics: &[(&str, &[i32])],
    known: &[&str],
) -> (i16, Vec<(String, i32, i16)>) {
    use kafka_protocol::messages::offset_delete_request::{
        OffsetDeleteRequestPartition, OffsetDeleteRequestTopic,
    };
    let mut req = kafka_protocol::messages::OffsetDeleteRequest::default();
    req.group_id = gid(group);
    req.topics = topics
        .iter()
        .map(|(t, ps)| {
            let mut topic = OffsetDeleteRequestTopic::default();
            topic.name = kafka_protocol::messages::TopicName(s(t));
            topic.partitions = ps
                .iter()
                .map(|p| OffsetDeleteRequestPartition::default().with_partition_index(*p))
                .collect();
            topic
        })
        .collect();
    let exists = |t: &str, p: i32| known.contains(&t) && (0..PARTITIONS as i32).contains(&p);
    let resp = c.offset_delete(req, exists).await;
    let rows = resp
        .topics
        .iter()
        .flat_map(|t| {
            t.partitions
                .iter()
                .map(move |p| (t.name.to_string(), p.partition_index, p.error_code))
        })
        .collect();
    (resp.error_code, rows)
}

/// A consumer's JoinGroup metadata: ConsumerProtocolSubscription v1 of `topics`.
fn subscription(topics: &[&str]) -> Vec<u8> {
    use kafka_protocol::protocol::Encodable;
    let mut sub = kafka_protocol::messages::ConsumerProtocolSubscription::default();
    sub.topics = topics.iter().map(|t| s(t)).collect();
    let mut buf = bytes::BytesMut::new();
    buf.extend_from_slice(&1i16.to_be_bytes());
    sub.encode(&mut buf, 1).expect("encode subscription");
    buf.to_vec()
}

#[tokio::test]
async fn offset_delete_forgets_partitions_an_empty_group_committed() {
    let env = env(0).await;
    let dir = env.dir.path().to_path_buf();
    {
        let c = &env.coord;
        let r = commit(
            c,
            "idle",
            -1,
            "",
            TOPIC,
            &[(0, 10, -1, None), (1, 11, -1, None)],
        )
        .await;
        assert_eq!(commit_errors(&r), vec![0, 0]);
        let (top, rows) =
            offset_delete(c, "idle", &[(TOPIC, &[0, 9]), ("gone", &[0])], &[TOPIC]).await;
        assert_eq!(top, 0);
        assert_eq!(
            rows,
            vec![
                (TOPIC.to_owned(), 0, 0),
                (
                    TOPIC.to_owned(),
                    9,
                    code(ErrorCode::UnknownTopicOrPartition)
                ),
                (
                    "gone".to_owned(),
                    0,
                    code(ErrorCode::UnknownTopicOrPartition)
                ),
            ]
        );
        let left: Vec<(i32, i64)> = fetched(&fetch(c, "idle", TOPIC, Some(&[0, 1])).await)
            .into_iter()
            .map(|r| (r.1, r.2))
            .collect();
        assert_eq!(left, vec![(0, -1), (1, 11)]);
        assert_eq!(state_of(c, "idle").0, "Empty");
        assert_eq!(
            offset_delete(c, "nobody", &[(TOPIC, &[0])], &[TOPIC])
                .await
                .0,
            code(ErrorCode::GroupIdNotFound)
        );
    }
    drop(env.coord);
    drop(env.store);
    // The deletion is in the offsets log: a new coordinator replays it.
    let store = open_store(&dir);
    let c = open_coordinator(&store, config(0)).await;
    let left: Vec<(i32, i64)> = fetched(&fetch(&c, "idle", TOPIC, None).await)
        .into_iter()
        .map(|r| (r.1, r.2))
        .collect();
    assert_eq!(left, vec![(1, 11)]);
    // Its last offset deleted, the Empty group is gone, as on Kafka.
    let (top, rows) = offset_delete(&c, "idle", &[(TOPIC, &[1])], &[TOPIC]).await;
    assert_eq!((top, rows), (0, vec![(TOPIC.to_owned(), 1, 0)]));
    assert_eq!(state_of(&c, "idle"), ("Dead".to_owned(), Vec::new()));
    assert!(list(&c, &[], &[], 3).is_empty());
    assert_eq!(
        offset_delete(&c, "idle", &[(TOPIC, &[1])], &[TOPIC])
            .await
            .0,
        code(ErrorCode::GroupIdNotFound)
    );
}

#[tokio::test]
async fn offset_delete_keeps_the_topics_a_live_consumer_group_subscribes_to() {
    let env = env(0).await;
    let c = &env.coord;
    env.store
        .create_topic(
            "other",
            PARTITIONS,
            &std::collections::BTreeMap::new(),
            false,
        )
        .expect("create topic");
    let first = c
        .join_group(
            join_request("live", "", None, 10_000, 1_000, &subscription(&[TOPIC])),
            JOIN_V,
        )
        .await;
    let me = first.member_id.to_string();
    let j = c
        .join_group(
            join_request("live", &me, None, 10_000, 1_000, &subscription(&[TOPIC])),
            JOIN_V,
        )
        .await;
    assert_eq!(j.error_code, 0);
    let synced = sync(c, "live", j.generation_id, &me, None, &[(&me, b"x")]).await;
    assert_eq!(synced.error_code, 0);
    for topic in [TOPIC, "other"] {
        let r = commit(c, "live", j.generation_id, &me, topic, &[(0, 5, -1, None)]).await;
        assert_eq!(commit_errors(&r), vec![0]);
    }
    let (top, rows) = offset_delete(
        c,
        "live",
        &[(TOPIC, &[0]), ("other", &[0])],
        &[TOPIC, "other"],
    )
    .await;
    assert_eq!(top, 0);
    assert_eq!(
        rows,
        vec![
            (TOPIC.to_owned(), 0, code(ErrorCode::GroupSubscribedToTopic)),
            ("other".to_owned(), 0, 0),
        ]
    );
    assert_eq!(fetched(&fetch(c, "live", TOPIC, Some(&[0])).await)[0].2, 5);
    assert_eq!(
        fetched(&fetch(c, "live", "other", Some(&[0])).await)[0].2,
        -1
    );
}

#[tokio::test]
async fn offset_delete_assumes_any_topic_when_a_subscription_cannot_be_read() {
    let env = env(0).await;
    let c = &env.coord;
    // join_new joins with metadata that is no subscription.
    let j = join_new(c, "opaque", "m", 10_000, 1_000).await;
    let me = j.member_id.to_string();
    assert_eq!(
        sync(c, "opaque", j.generation_id, &me, None, &[(&me, b"x")])
            .await
            .error_code,
        0
    );
    let (top, rows) = offset_delete(c, "opaque", &[(TOPIC, &[1])], &[TOPIC]).await;
    assert_eq!(top, 0);
    assert_eq!(
        rows,
        vec![(TOPIC.to_owned(), 1, code(ErrorCode::GroupSubscribedToTopic))]
    );
}

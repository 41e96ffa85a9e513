//! ConsumerGroupHeartbeat / ConsumerGroupDescribe (KIP-848) through the
//! coordinator, and how a consumer-protocol group meets the classic APIs:
//! commits carry the member epoch, ListGroups v5 types it, DescribeGroups
//! does not describe it, DeleteGroups keeps it while it has members, and
//! one group never mixes the two protocols.

use std::time::Duration;

use kafka_protocol::messages::consumer_group_heartbeat_request::TopicPartitions;
use kafka_protocol::messages::{
    ConsumerGroupDescribeRequest, ConsumerGroupHeartbeatRequest, ConsumerGroupHeartbeatResponse,
    DeleteGroupsRequest, ListGroupsRequest, TopicName,
};
use sluice_group::GroupConfig;
use sluice_vocab::ErrorCode;
use uuid::Uuid;

use crate::*;

const HB_V: i16 = 1;

fn join_req(group: &str, member: &str) -> ConsumerGroupHeartbeatRequest {
    ConsumerGroupHeartbeatRequest::default()
        .with_group_id(gid(group))
        .with_member_id(s(member))
        .with_member_epoch(0)
        .with_rebalance_timeout_ms(5_000)
        .with_subscribed_topic_names(Some(vec![TopicName(s(TOPIC))]))
        .with_topic_partitions(Some(Vec::new()))
}

fn beat_req(
    group: &str,
    member: &str,
    epoch: i32,
    owned: &ConsumerGroupHeartbeatResponse,
) -> ConsumerGroupHeartbeatRequest {
    let owned = owned.assignment.as_ref().map(|a| {
        a.topic_partitions
            .iter()
            .map(|tp| {
                TopicPartitions::default()
                    .with_topic_id(tp.topic_id)
                    .with_partitions(tp.partitions.clone())
            })
            .collect()
    });
    ConsumerGroupHeartbeatRequest::default()
        .with_group_id(gid(group))
        .with_member_id(s(member))
        .with_member_epoch(epoch)
        .with_rebalance_timeout_ms(-1)
        .with_topic_partitions(owned)
}

fn partitions(r: &ConsumerGroupHeartbeatResponse) -> usize {
    r.assignment.as_ref().map_or(0, |a| {
        a.topic_partitions.iter().map(|t| t.partitions.len()).sum()
    })
}

#[tokio::test]
async fn a_member_joins_gets_every_partition_and_commits_with_its_epoch() {
    let env = env(0).await;
    let c = &env.coord;
    let r = c.consumer_group_heartbeat(join_req("g", "m1"), HB_V, "client", "/127.0.0.1");
    assert_eq!(r.error_code, 0, "{:?}", r.error_message);
    assert_eq!(
        r.member_id.as_ref().map(ToString::to_string).as_deref(),
        Some("m1")
    );
    assert!(r.member_epoch > 0);
    assert_eq!(partitions(&r), PARTITIONS as usize);
    let topic_id = env.store.topic(TOPIC).expect("topic").id;
    assert_eq!(
        r.assignment.as_ref().expect("assignment").topic_partitions[0].topic_id,
        Uuid::from_bytes(topic_id)
    );
    let epoch = r.member_epoch;
    // An OffsetCommit v9 carries the member epoch; another one is stale.
    let ok = commit(c, "g", epoch, "m1", TOPIC, &[(0, 5, -1, None)]).await;
    assert_eq!(commit_errors(&ok), vec![0]);
    let stale = commit(c, "g", epoch - 1, "m1", TOPIC, &[(0, 6, -1, None)]).await;
    assert_eq!(
        commit_errors(&stale),
        vec![code(ErrorCode::StaleMemberEpoch)]
    );
    let outsider = commit(c, "g", -1, "", TOPIC, &[(0, 7, -1, None)]).await;
    assert_eq!(
        commit_errors(&outsider),
        vec![code(ErrorCode::UnknownMemberId)]
    );
    // A heartbeat with the same epoch and what it owns changes nothing.
    let again = c.consumer_group_heartbeat(beat_req("g", "m1", epoch, &r), HB_V, "client", "/h");
    assert_eq!((again.error_code, again.member_epoch), (0, epoch));
    assert!(again.assignment.is_none(), "unchanged: no assignment sent");
}

#[tokio::test]
async fn requests_are_checked_as_kafka_checks_them() {
    let env = env(0).await;
    let c = &env.coord;
    let refused = |req: ConsumerGroupHeartbeatRequest, v: i16| {
        let r = c.consumer_group_heartbeat(req, v, "client", "/h");
        (
            r.error_code,
            r.error_message.map(|m| m.to_string()).unwrap_or_default(),
        )
    };
    let (e, m) = refused(join_req("", "m"), HB_V);
    assert_eq!(
        (e, m.as_str()),
        (code(ErrorCode::InvalidRequest), "GroupId can't be empty.")
    );
    let (e, _) = refused(join_req("g", ""), 1);
    assert_eq!(
        e,
        code(ErrorCode::InvalidRequest),
        "v1 members name themselves"
    );
    let (e, _) = refused(join_req("g", "m").with_rebalance_timeout_ms(-1), HB_V);
    assert_eq!(e, code(ErrorCode::InvalidRequest));
    let (e, _) = refused(join_req("g", "m").with_topic_partitions(None), HB_V);
    assert_eq!(e, code(ErrorCode::InvalidRequest));
    let (e, _) = refused(join_req("g", "m").with_member_epoch(-3), HB_V);
    assert_eq!(e, code(ErrorCode::InvalidRequest));
    let (e, _) = refused(
        join_req("g", "m").with_server_assignor(Some(s("sticky"))),
        HB_V,
    );
    assert_eq!(e, code(ErrorCode::UnsupportedAssignor));
    let (e, _) = refused(
        join_req("g", "m")
            .with_subscribed_topic_names(None)
            .with_subscribed_topic_regex(Some(s("[unclosed"))),
        HB_V,
    );
    assert_eq!(e, code(ErrorCode::InvalidRegularExpression));
    // v0: the coordinator names a member that joins without an id.
    let r = c.consumer_group_heartbeat(join_req("g0", ""), 0, "cid", "/h");
    assert_eq!(r.error_code, 0);
    assert!(r.member_id.expect("named").as_str().starts_with("cid-"));
}

#[tokio::test]
async fn one_group_never_mixes_the_classic_and_the_consumer_protocol() {
    let env = env(0).await;
    let c = &env.coord;
    // A classic group with a member refuses a consumer-protocol member.
    let joined = join_new(c, "classic", "k", 10_000, 10_000).await;
    assert_eq!(joined.error_code, 0);
    let r = c.consumer_group_heartbeat(join_req("classic", "m"), HB_V, "client", "/h");
    assert_eq!(r.error_code, code(ErrorCode::GroupIdNotFound));
    // A consumer-protocol group with a member refuses a classic member.
    let r = c.consumer_group_heartbeat(join_req("new", "m"), HB_V, "client", "/h");
    assert_eq!(r.error_code, 0);
    let classic = c
        .join_group_with_client(
            join_request("new", "", None, 10_000, 10_000, b"k"),
            JOIN_V,
            "k",
            "/h",
        )
        .await;
    assert_eq!(
        classic.error_code,
        code(ErrorCode::InconsistentGroupProtocol)
    );
    // It cannot be deleted while it has members, and DescribeGroups does
    // not describe it; ConsumerGroupDescribe does.
    let mut del = DeleteGroupsRequest::default();
    del.groups_names = vec![gid("new")];
    let d = c.delete_groups(del, 2).await;
    assert_eq!(d.results[0].error_code, code(ErrorCode::NonEmptyGroup));
    let described = describe(c, "new", 6);
    assert_eq!(
        described.groups[0].error_code,
        code(ErrorCode::GroupIdNotFound)
    );
    let cg = c.consumer_group_describe(
        ConsumerGroupDescribeRequest::default().with_group_ids(vec![gid("new"), gid("classic")]),
        1,
    );
    assert_eq!(cg.groups[0].error_code, 0);
    assert_eq!(cg.groups[0].group_state.as_str(), "Stable");
    assert_eq!(cg.groups[0].assignor_name.as_str(), "uniform");
    assert_eq!(cg.groups[0].members.len(), 1);
    assert_eq!(cg.groups[0].members[0].member_type, 1);
    assert_eq!(cg.groups[1].error_code, code(ErrorCode::GroupIdNotFound));
    // ListGroups v5 tells the two apart.
    let mut req = ListGroupsRequest::default();
    req.types_filter = vec![s("consumer")];
    let listed = c.list_groups(req, 5);
    let names: Vec<(String, String)> = listed
        .groups
        .iter()
        .map(|g| (g.group_id.to_string(), g.group_type.to_string()))
        .collect();
    assert_eq!(names, vec![("new".to_owned(), "consumer".to_owned())]);
    // Once its last member leaves, a classic member may take the group over.
    let r = c.consumer_group_heartbeat(
        ConsumerGroupHeartbeatRequest::default()
            .with_group_id(gid("new"))
            .with_member_id(s("m"))
            .with_member_epoch(-1),
        HB_V,
        "client",
        "/h",
    );
    assert_eq!((r.error_code, r.member_epoch), (0, -1));
    let classic = join_new(c, "new", "k", 10_000, 10_000).await;
    assert_eq!(classic.error_code, 0);
}

#[tokio::test]
async fn a_refused_first_member_leaves_a_classic_group_classic() {
    let env = env(0).await;
    let c = &env.coord;
    let r = commit(c, "kept", -1, "", TOPIC, &[(0, 9, -1, None)]).await;
    assert_eq!(commit_errors(&r), vec![0]);
    let refused = c.consumer_group_heartbeat(
        join_req("kept", "m").with_server_assignor(Some(s("sticky"))),
        HB_V,
        "client",
        "/h",
    );
    assert_eq!(refused.error_code, code(ErrorCode::UnsupportedAssignor));
    let described = describe(c, "kept", 6);
    assert_eq!(described.groups[0].error_code, 0, "still a classic group");
    assert_eq!(described.groups[0].group_state.as_str(), "Empty");
}

#[tokio::test]
async fn a_silent_member_is_removed_when_its_session_ends() {
    let env = env_with(GroupConfig {
        consumer_session_timeout_ms: 300,
        consumer_heartbeat_interval_ms: 100,
        ..config(0)
    })
    .await;
    let c = &env.coord;
    let a = c.consumer_group_heartbeat(join_req("g", "a"), HB_V, "client", "/h");
    assert_eq!(a.heartbeat_interval_ms, 100);
    let b = c.consumer_group_heartbeat(join_req("g", "b"), HB_V, "client", "/h");
    assert_eq!(b.error_code, 0);
    // b keeps heartbeating; a says nothing and is removed by the timer.
    let mut last = b;
    let mut epoch = last.member_epoch;
    let start = std::time::Instant::now();
    let mut owned_all = false;
    while start.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let r = c.consumer_group_heartbeat(beat_req("g", "b", epoch, &last), HB_V, "client", "/h");
        assert_eq!(r.error_code, 0, "{:?}", r.error_message);
        epoch = r.member_epoch;
        if r.assignment.is_some() {
            last = r;
        }
        if partitions(&last) == PARTITIONS as usize {
            owned_all = true;
            break;
        }
    }
    assert!(owned_all, "b never got a's partitions");
    assert!(
        start.elapsed() >= Duration::from_millis(250),
        "moved before a's session ended"
    );
    let gone =
        c.consumer_group_heartbeat(beat_req("g", "a", a.member_epoch, &a), HB_V, "client", "/h");
    assert_eq!(gone.error_code, code(ErrorCode::UnknownMemberId));
}

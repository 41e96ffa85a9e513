//! Every response the coordinator builds must encode at every version it
//! claims (`SUPPORTED_VERSIONS`): a field set outside its versions makes
//! kafka-protocol refuse to encode, which would cost the client its connection.

use bytes::BytesMut;
use kafka_protocol::messages::leave_group_request::MemberIdentity;
use kafka_protocol::messages::offset_fetch_request::{
    OffsetFetchRequestGroup, OffsetFetchRequestTopic, OffsetFetchRequestTopics,
};
use kafka_protocol::messages::{
    DeleteGroupsRequest, DescribeGroupsRequest, HeartbeatRequest, LeaveGroupRequest,
    ListGroupsRequest, OffsetFetchRequest, SyncGroupRequest,
};
use kafka_protocol::protocol::Encodable;
use sluice_group::SUPPORTED_VERSIONS;
use sluice_vocab::ErrorCode;

use crate::*;

fn encodes<T: Encodable + std::fmt::Debug>(what: &str, resp: &T, version: i16) {
    let mut buf = BytesMut::new();
    if let Err(e) = resp.encode(&mut buf, version) {
        panic!("{what} v{version} does not encode: {e}: {resp:?}");
    }
}

fn versions(key: i16) -> std::ops::RangeInclusive<i16> {
    let (_, min, max) = SUPPORTED_VERSIONS
        .iter()
        .find(|(k, _, _)| *k == key)
        .copied()
        .expect("api listed");
    min..=max
}

#[tokio::test]
async fn responses_encode_at_every_supported_version() {
    let env = env(0).await;
    let c = &env.coord;

    for v in versions(11) {
        let group = format!("join-v{v}");
        // Static membership exists from v5; exercise it there.
        let instance = (v >= 5).then(|| format!("inst-{v}"));
        let mut req = join_request(&group, "", instance.as_deref(), 1_000, 1_000, b"m");
        let mut resp = c
            .join_group_with_client(req.clone(), v, "cl", "/127.0.0.1")
            .await;
        encodes("JoinGroup", &resp, v);
        if resp.error_code == code(ErrorCode::MemberIdRequired) {
            req.member_id = resp.member_id.clone();
            resp = c.join_group_with_client(req, v, "cl", "/127.0.0.1").await;
            encodes("JoinGroup", &resp, v);
        }
        assert_eq!(resp.error_code, 0, "JoinGroup v{v}");
        // An error answer too (no protocol name, no generation).
        let bad = c
            .join_group(join_request(&group, "", None, 1, 1_000, b""), v)
            .await;
        assert_eq!(bad.error_code, code(ErrorCode::InvalidSessionTimeout));
        encodes("JoinGroup", &bad, v);

        let member = resp.member_id.to_string();
        for sv in versions(14) {
            let mut req = SyncGroupRequest::default();
            req.group_id = gid(&group);
            req.generation_id = resp.generation_id;
            req.member_id = s(&member);
            if sv >= 3 {
                req.group_instance_id = instance.as_deref().map(s);
            }
            let r = c.sync_group(req, sv).await;
            assert_eq!(r.error_code, 0, "SyncGroup v{sv}");
            encodes("SyncGroup", &r, sv);
        }
        for hv in versions(12) {
            let mut req = HeartbeatRequest::default();
            req.group_id = gid(&group);
            req.generation_id = resp.generation_id;
            req.member_id = s(&member);
            if hv >= 3 {
                req.group_instance_id = instance.as_deref().map(s);
            }
            let r = c.heartbeat(req, hv).await;
            assert_eq!(r.error_code, 0, "Heartbeat v{hv}");
            encodes("Heartbeat", &r, hv);
        }
        for dv in versions(15) {
            let mut req = DescribeGroupsRequest::default();
            req.groups = vec![gid(&group), gid("ghost")];
            req.include_authorized_operations = dv >= 3;
            encodes("DescribeGroups", &c.describe_groups(req, dv), dv);
        }
    }

    for v in versions(8) {
        let r = commit(
            c,
            "commits",
            -1,
            "",
            TOPIC,
            &[(0, i64::from(v), 1, Some("x"))],
        )
        .await;
        assert_eq!(commit_errors(&r), vec![0]);
        encodes("OffsetCommit", &r, v);
    }
    for v in versions(9) {
        let mut req = OffsetFetchRequest::default();
        if v >= 8 {
            let mut g = OffsetFetchRequestGroup::default();
            g.group_id = gid("commits");
            let mut t = OffsetFetchRequestTopics::default();
            t.name = TopicName(s(TOPIC));
            t.partition_indexes = vec![0, 1];
            g.topics = Some(vec![t]);
            req.groups = vec![g];
        } else {
            req.group_id = gid("commits");
            let mut t = OffsetFetchRequestTopic::default();
            t.name = TopicName(s(TOPIC));
            t.partition_indexes = vec![0, 1];
            req.topics = Some(vec![t]);
        }
        encodes("OffsetFetch", &c.offset_fetch(req, v).await, v);
    }
    for v in versions(16) {
        let r = c.list_groups(ListGroupsRequest::default(), v);
        assert!(r.groups.len() >= 2);
        encodes("ListGroups", &r, v);
    }
    for v in versions(13) {
        let mut req = LeaveGroupRequest::default();
        req.group_id = gid("join-v0");
        if v < 3 {
            req.member_id = s("ghost");
        } else {
            let mut m = MemberIdentity::default();
            m.member_id = s("ghost");
            req.members = vec![m];
        }
        encodes("LeaveGroup", &c.leave_group(req, v).await, v);
    }
    for v in versions(42) {
        let mut req = DeleteGroupsRequest::default();
        req.groups_names = vec![gid("join-v1"), gid("ghost")];
        encodes("DeleteGroups", &c.delete_groups(req, v).await, v);
    }
}

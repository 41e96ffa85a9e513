//! JoinGroup / SyncGroup / Heartbeat / LeaveGroup and the rebalance state machine.

use std::sync::Arc;
use std::time::Duration;

use kafka_protocol::messages::leave_group_request::MemberIdentity;
use kafka_protocol::messages::{JoinGroupResponse, LeaveGroupRequest};
use sluice_group::GroupCoordinator;
use sluice_vocab::ErrorCode;

use crate::*;

const GROUP: &str = "g";

/// Heartbeats until the coordinator says a rebalance is on (or gives up).
async fn until_rebalance(c: &Arc<GroupCoordinator>, generation: i32, member: &str) -> i16 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let err = heartbeat(c, GROUP, generation, member, None).await;
        if err != 0 || tokio::time::Instant::now() > deadline {
            return err;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn spawn_rejoin(
    c: &Arc<GroupCoordinator>,
    member: &str,
    session_ms: i32,
    rebalance_ms: i32,
) -> tokio::task::JoinHandle<JoinGroupResponse> {
    let c = c.clone();
    let member = member.to_owned();
    tokio::spawn(async move { rejoin(&c, GROUP, &member, b"meta", session_ms, rebalance_ms).await })
}

fn spawn_join_new(
    c: &Arc<GroupCoordinator>,
    client: &str,
    session_ms: i32,
    rebalance_ms: i32,
) -> tokio::task::JoinHandle<JoinGroupResponse> {
    let c = c.clone();
    let client = client.to_owned();
    tokio::spawn(async move { join_new(&c, GROUP, &client, session_ms, rebalance_ms).await })
}

/// Joins and syncs one generation; the leader gives every member its own id
/// as its assignment. Returns (generation, leader, members).
async fn sync_all(
    c: &Arc<GroupCoordinator>,
    joins: &[JoinGroupResponse],
) -> (i32, String, Vec<String>) {
    for j in joins {
        assert_eq!(j.error_code, 0, "join failed: {j:?}");
    }
    let generation = joins[0].generation_id;
    let leader = joins[0].leader.to_string();
    assert!(joins.iter().all(|j| j.generation_id == generation));
    assert!(joins.iter().all(|j| j.leader.as_str() == leader));
    let members: Vec<String> = joins.iter().map(|j| j.member_id.to_string()).collect();
    let leader_join = joins
        .iter()
        .find(|j| j.member_id.as_str() == leader)
        .expect("leader is a member");
    let mut listed: Vec<String> = leader_join
        .members
        .iter()
        .map(|m| m.member_id.to_string())
        .collect();
    listed.sort();
    let mut expected = members.clone();
    expected.sort();
    assert_eq!(listed, expected, "the leader sees every member");
    for j in joins.iter().filter(|j| j.member_id.as_str() != leader) {
        assert!(j.members.is_empty(), "followers get no member list");
    }

    let assignments: Vec<(String, Vec<u8>)> = members
        .iter()
        .map(|m| (m.clone(), format!("assigned:{m}").into_bytes()))
        .collect();
    // Followers first: they must wait for the leader's assignment.
    let followers: Vec<_> = members
        .iter()
        .filter(|m| **m != leader)
        .map(|m| {
            let c = c.clone();
            let m = m.clone();
            tokio::spawn(async move {
                let r = sync(&c, GROUP, generation, &m, None, &[]).await;
                (m, r)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    for f in &followers {
        assert!(
            !f.is_finished(),
            "a follower's SyncGroup waits for the leader"
        );
    }
    let refs: Vec<(&str, &[u8])> = assignments
        .iter()
        .map(|(m, a)| (m.as_str(), a.as_slice()))
        .collect();
    let l = sync(c, GROUP, generation, &leader, None, &refs).await;
    assert_eq!(l.error_code, 0);
    assert_eq!(
        l.assignment.as_ref(),
        format!("assigned:{leader}").as_bytes()
    );
    assert_eq!(l.protocol_type.as_deref(), Some("consumer"));
    assert_eq!(l.protocol_name.as_deref(), Some("range"));
    for f in followers {
        let (m, r) = f.await.expect("sync task");
        assert_eq!(r.error_code, 0);
        assert_eq!(r.assignment.as_ref(), format!("assigned:{m}").as_bytes());
    }
    assert_eq!(state_of(c, GROUP).0, "Stable");
    (generation, leader, members)
}

#[tokio::test]
async fn two_members_split_then_third_joins_and_one_leaves() {
    let env = env(300).await;
    let c = &env.coord;

    // Both join within the initial delay, so one rebalance takes both.
    let (a, b) = tokio::join!(
        join_new(c, GROUP, "a", 10_000, 2_000),
        join_new(c, GROUP, "b", 10_000, 2_000)
    );
    assert_eq!(a.generation_id, 1);
    assert_eq!(a.protocol_name.as_deref(), Some("range"));
    assert_eq!(a.protocol_type.as_deref(), Some("consumer"));
    let leader_join = if a.leader == a.member_id { &a } else { &b };
    let mut metadata: Vec<Vec<u8>> = leader_join
        .members
        .iter()
        .map(|m| m.metadata.to_vec())
        .collect();
    metadata.sort();
    assert_eq!(
        metadata,
        vec![b"a".to_vec(), b"b".to_vec()],
        "the leader gets each member's metadata"
    );
    let (g1, leader, members) = sync_all(c, &[a, b]).await;
    assert_eq!(g1, 1);

    let described = describe(c, GROUP, DESCRIBE_V);
    let group = &described.groups[0];
    assert_eq!(group.protocol_data.as_str(), "range");
    assert_eq!(group.members.len(), 2);
    for m in &group.members {
        assert!(m.client_id.as_str() == "a" || m.client_id.as_str() == "b");
        assert_eq!(m.client_host.as_str(), "/127.0.0.1");
        assert_eq!(
            m.member_assignment.as_ref(),
            format!("assigned:{}", m.member_id.as_str()).as_bytes()
        );
        assert_eq!(m.member_metadata.as_ref(), m.client_id.as_bytes());
    }

    // A third member joins: the others learn of the rebalance by heartbeat.
    let third = spawn_join_new(c, "c", 10_000, 2_000);
    for m in &members {
        assert_eq!(
            until_rebalance(c, g1, m).await,
            code(ErrorCode::RebalanceInProgress)
        );
    }
    assert_eq!(state_of(c, GROUP).0, "PreparingRebalance");
    let rejoins: Vec<_> = members
        .iter()
        .map(|m| spawn_rejoin(c, m, 10_000, 2_000))
        .collect();
    let mut joins = vec![third.await.unwrap()];
    for r in rejoins {
        joins.push(r.await.unwrap());
    }
    let (g2, leader2, members2) = sync_all(c, &joins).await;
    assert_eq!(g2, g1 + 1, "one rebalance, one generation");
    assert_eq!(leader2, leader, "the leader keeps its role when it rejoins");
    assert_eq!(members2.len(), 3);

    // The oldest follower leaves.
    let leaving = members.iter().find(|m| **m != leader).unwrap().clone();
    let mut req = LeaveGroupRequest::default();
    req.group_id = gid(GROUP);
    let mut who = MemberIdentity::default();
    who.member_id = s(&leaving);
    req.members = vec![who];
    let resp = c.leave_group(req, LEAVE_V).await;
    assert_eq!(resp.error_code, 0);
    assert_eq!(resp.members[0].error_code, 0);
    assert_eq!(
        heartbeat(c, GROUP, g2, &leaving, None).await,
        code(ErrorCode::UnknownMemberId)
    );
    let rest: Vec<String> = members2.into_iter().filter(|m| *m != leaving).collect();
    for m in &rest {
        assert_eq!(
            until_rebalance(c, g2, m).await,
            code(ErrorCode::RebalanceInProgress)
        );
    }
    let rejoins: Vec<_> = rest
        .iter()
        .map(|m| spawn_rejoin(c, m, 10_000, 2_000))
        .collect();
    let mut joins = Vec::new();
    for r in rejoins {
        joins.push(r.await.unwrap());
    }
    let (g3, _, members3) = sync_all(c, &joins).await;
    assert_eq!(g3, g2 + 1);
    assert_eq!(members3.len(), 2);
    assert_eq!(state_of(c, GROUP).1.len(), 2);
}

#[tokio::test]
async fn members_that_do_not_rejoin_are_dropped_after_the_rebalance_timeout() {
    let env = env(100).await;
    let c = &env.coord;
    let (a, b) = tokio::join!(
        join_new(c, GROUP, "a", 10_000, 800),
        join_new(c, GROUP, "b", 10_000, 800)
    );
    let (g1, leader, members) = sync_all(c, &[a, b]).await;
    let silent = members.iter().find(|m| **m != leader).unwrap().clone();

    // A new member forces a rebalance; only the leader rejoins.
    let third = spawn_join_new(c, "c", 10_000, 800);
    assert_eq!(
        until_rebalance(c, g1, &leader).await,
        code(ErrorCode::RebalanceInProgress)
    );
    let started = tokio::time::Instant::now();
    let leader_join = rejoin(c, GROUP, &leader, b"meta", 10_000, 800).await;
    let third = third.await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "the join phase waited for the silent member"
    );
    assert_eq!(leader_join.error_code, 0);
    assert_eq!(leader_join.generation_id, g1 + 1);
    assert_eq!(
        leader_join.members.len(),
        2,
        "the silent member was dropped"
    );
    assert!(leader_join
        .members
        .iter()
        .all(|m| m.member_id.as_str() != silent));
    sync_all(c, &[leader_join, third]).await;
    assert_eq!(
        heartbeat(c, GROUP, g1, &silent, None).await,
        code(ErrorCode::UnknownMemberId)
    );
}

#[tokio::test]
async fn session_expiry_evicts_a_silent_member() {
    let env = env(100).await;
    let c = &env.coord;
    let (a, b) = tokio::join!(
        join_new(c, GROUP, "a", 600, 1_000),
        join_new(c, GROUP, "b", 600, 1_000)
    );
    let (g1, leader, members) = sync_all(c, &[a, b]).await;
    let silent = members.iter().find(|m| **m != leader).unwrap().clone();

    // Only the leader heartbeats; the follower's session (600 ms) runs out.
    let started = tokio::time::Instant::now();
    assert_eq!(
        until_rebalance(c, g1, &leader).await,
        code(ErrorCode::RebalanceInProgress)
    );
    assert!(started.elapsed() >= Duration::from_millis(400));
    let (_, left) = state_of(c, GROUP);
    assert_eq!(left, vec![leader.clone()], "the silent member was evicted");

    let j = rejoin(c, GROUP, &leader, b"meta", 600, 1_000).await;
    assert_eq!(j.generation_id, g1 + 1);
    let (_, _, members) = sync_all(c, &[j]).await;
    assert_eq!(members, vec![leader]);
    assert_eq!(
        heartbeat(c, GROUP, g1, &silent, None).await,
        code(ErrorCode::UnknownMemberId)
    );

    // With nobody heartbeating, the group ends up Empty.
    assert!(
        eventually(Duration::from_secs(3), || state_of(c, GROUP).0 == "Empty").await,
        "a group whose last member expires is Empty"
    );
}

#[tokio::test]
async fn static_member_rejoins_without_rebalance_and_old_id_is_fenced() {
    let env = env(200).await;
    let c = &env.coord;
    let static_join = |instance: &'static str, member: String, version: i16| {
        let c = c.clone();
        async move {
            c.join_group_with_client(
                join_request(
                    GROUP,
                    &member,
                    Some(instance),
                    10_000,
                    2_000,
                    instance.as_bytes(),
                ),
                version,
                "client",
                "/10.0.0.1",
            )
            .await
        }
    };
    // Static members get no MEMBER_ID_REQUIRED.
    let (a, b) = tokio::join!(
        static_join("ia", String::new(), JOIN_V),
        static_join("ib", String::new(), JOIN_V)
    );
    assert!(
        a.member_id.as_str().starts_with("ia-"),
        "ids start with the instance id"
    );
    assert_eq!(
        a.members
            .iter()
            .filter(|m| m.group_instance_id.is_some())
            .count(),
        a.members.len()
    );
    let (g1, leader, _) = sync_all(c, &[a.clone(), b.clone()]).await;
    let (follower_join, follower_instance) = if a.member_id.as_str() == leader {
        (&b, "ib")
    } else {
        (&a, "ia")
    };
    let old_id = follower_join.member_id.to_string();
    let leader_instance = if follower_instance == "ia" {
        "ib"
    } else {
        "ia"
    };

    // The follower restarts: same instance id, no member id.
    let again = static_join(follower_instance, String::new(), JOIN_V).await;
    assert_eq!(again.error_code, 0);
    assert_eq!(again.generation_id, g1, "no new generation");
    assert_ne!(again.member_id.to_string(), old_id);
    assert_eq!(again.leader.as_str(), leader);
    assert!(!again.skip_assignment);
    assert!(again.members.is_empty());
    let (state, members) = state_of(c, GROUP);
    assert_eq!(state, "Stable", "no rebalance");
    assert!(members.contains(&again.member_id.to_string()) && !members.contains(&old_id));
    assert_eq!(heartbeat(c, GROUP, g1, &leader, None).await, 0);
    let synced = sync(
        c,
        GROUP,
        g1,
        again.member_id.as_str(),
        Some(follower_instance),
        &[],
    )
    .await;
    assert_eq!(synced.error_code, 0);
    assert_eq!(
        synced.assignment.as_ref(),
        format!("assigned:{old_id}").as_bytes(),
        "the replacement keeps the old assignment"
    );

    // The old incarnation is fenced.
    assert_eq!(
        heartbeat(c, GROUP, g1, &old_id, Some(follower_instance)).await,
        code(ErrorCode::FencedInstanceId)
    );
    let zombie = static_join(follower_instance, old_id.clone(), JOIN_V).await;
    assert_eq!(zombie.error_code, code(ErrorCode::FencedInstanceId));

    // A static leader restarting with v9 is told it leads but must skip assignment.
    let new_leader = static_join(leader_instance, String::new(), JOIN_V).await;
    assert_eq!(new_leader.error_code, 0);
    assert_eq!(new_leader.leader, new_leader.member_id);
    assert!(new_leader.skip_assignment);
    assert_eq!(new_leader.members.len(), 2);
    assert_eq!(state_of(c, GROUP).0, "Stable");

    // Before v9 a restarting static follower is told the current leader.
    let old_leader_id = new_leader.member_id.to_string();
    let v8 = static_join(follower_instance, String::new(), 8).await;
    assert_eq!(v8.error_code, 0);
    assert_eq!(v8.leader.as_str(), old_leader_id);
    assert_eq!(state_of(c, GROUP).0, "Stable");
}

#[tokio::test]
async fn join_errors_match_kafka() {
    let env = env(0).await;
    let c = &env.coord;
    let join_v = |req, v| {
        let c = c.clone();
        async move { c.join_group(req, v).await }
    };

    // Session timeout outside [min, max].
    let r = join_v(join_request(GROUP, "", None, 5, 1_000, b""), JOIN_V).await;
    assert_eq!(r.error_code, code(ErrorCode::InvalidSessionTimeout));
    let r = join_v(join_request(GROUP, "", None, 70_000, 1_000, b""), JOIN_V).await;
    assert_eq!(r.error_code, code(ErrorCode::InvalidSessionTimeout));
    // Empty group id.
    let r = join_v(join_request("", "", None, 1_000, 1_000, b""), JOIN_V).await;
    assert_eq!(r.error_code, code(ErrorCode::InvalidGroupId));
    // A member id the coordinator never handed out.
    let r = join_v(
        join_request(GROUP, "nobody", None, 1_000, 1_000, b""),
        JOIN_V,
    )
    .await;
    assert_eq!(r.error_code, code(ErrorCode::UnknownMemberId));
    assert_eq!(
        heartbeat(c, "nope", 1, "nobody", None).await,
        code(ErrorCode::UnknownMemberId)
    );
    assert_eq!(
        sync(c, "nope", 1, "nobody", None, &[]).await.error_code,
        code(ErrorCode::UnknownMemberId)
    );

    // v3 has no MEMBER_ID_REQUIRED: the first join is the real one.
    let first = join_v(join_request(GROUP, "", None, 1_000, 1_000, b"x"), 3).await;
    assert_eq!(first.error_code, 0);
    assert_eq!(first.generation_id, 1);
    assert_eq!(first.leader, first.member_id);
    let me = first.member_id.to_string();

    // Another protocol type cannot join this group.
    let mut other = join_request(GROUP, "", None, 1_000, 1_000, b"");
    other.protocol_type = s("connect");
    let r = join_v(other, 3).await;
    assert_eq!(r.error_code, code(ErrorCode::InconsistentGroupProtocol));
    // v0-v6 never send a null protocol name.
    let mut none = join_request(GROUP, "", None, 1_000, 1_000, b"");
    none.protocols.clear();
    let r = join_v(none, 0).await;
    assert_eq!(r.error_code, code(ErrorCode::InconsistentGroupProtocol));
    assert_eq!(r.protocol_name.as_deref(), Some(""));

    // Commits and heartbeats need the right generation.
    assert_eq!(
        heartbeat(c, GROUP, 7, &me, None).await,
        code(ErrorCode::IllegalGeneration)
    );
    assert_eq!(
        sync(c, GROUP, 7, &me, None, &[]).await.error_code,
        code(ErrorCode::IllegalGeneration)
    );
    // Heartbeats in CompletingRebalance are fine (Kafka resets the session).
    assert_eq!(heartbeat(c, GROUP, 1, &me, None).await, 0);
}

#[tokio::test]
async fn leave_group_batch_reports_per_member_errors() {
    let env = env(100).await;
    let c = &env.coord;
    let (a, b) = tokio::join!(
        join_new(c, GROUP, "a", 10_000, 1_000),
        join_new(c, GROUP, "b", 10_000, 1_000)
    );
    let (_, _, members) = sync_all(c, &[a, b]).await;

    let identity = |member: &str, instance: Option<&str>| {
        let mut m = MemberIdentity::default();
        m.member_id = s(member);
        m.group_instance_id = instance.map(s);
        m
    };
    let mut req = LeaveGroupRequest::default();
    req.group_id = gid(GROUP);
    req.members = vec![
        identity(&members[0], None),
        identity("ghost", None),
        identity("", Some("no-such-instance")),
    ];
    let resp = c.leave_group(req, LEAVE_V).await;
    assert_eq!(resp.error_code, 0);
    let errors: Vec<i16> = resp.members.iter().map(|m| m.error_code).collect();
    assert_eq!(
        errors,
        vec![
            0,
            code(ErrorCode::UnknownMemberId),
            code(ErrorCode::UnknownMemberId)
        ]
    );
    assert_eq!(state_of(c, GROUP).1, vec![members[1].clone()]);
    assert_eq!(state_of(c, GROUP).0, "PreparingRebalance");

    // v0-v2: one member, its error is the response's error.
    let mut old = LeaveGroupRequest::default();
    old.group_id = gid(GROUP);
    old.member_id = s("ghost");
    assert_eq!(
        c.leave_group(old, 1).await.error_code,
        code(ErrorCode::UnknownMemberId)
    );
    let mut old = LeaveGroupRequest::default();
    old.group_id = gid(GROUP);
    old.member_id = s(&members[1]);
    assert_eq!(c.leave_group(old, 2).await.error_code, 0);
    assert!(eventually(Duration::from_secs(2), || state_of(c, GROUP).0 == "Empty").await);
}

#[tokio::test]
async fn a_leader_that_never_syncs_is_removed_and_followers_rejoin() {
    let env = env(100).await;
    let c = &env.coord;
    let (a, b) = tokio::join!(
        join_new(c, GROUP, "a", 10_000, 500),
        join_new(c, GROUP, "b", 10_000, 500)
    );
    assert_eq!(a.generation_id, b.generation_id);
    let generation = a.generation_id;
    let leader = a.leader.to_string();
    let follower = if a.member_id.as_str() == leader {
        b.member_id.to_string()
    } else {
        a.member_id.to_string()
    };

    // The follower waits for an assignment that never comes; once the
    // rebalance timeout passes, the silent leader is removed and the
    // follower is told to rejoin.
    let started = tokio::time::Instant::now();
    let r = sync(c, GROUP, generation, &follower, None, &[]).await;
    assert_eq!(r.error_code, code(ErrorCode::RebalanceInProgress));
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        heartbeat(c, GROUP, generation, &leader, None).await,
        code(ErrorCode::UnknownMemberId)
    );
    let j = rejoin(c, GROUP, &follower, b"meta", 10_000, 500).await;
    assert_eq!(j.generation_id, generation + 1);
    assert_eq!(j.leader, j.member_id, "the follower leads now");
    let (_, _, members) = sync_all(c, &[j]).await;
    assert_eq!(members, vec![follower]);
}

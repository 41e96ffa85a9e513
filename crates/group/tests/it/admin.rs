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

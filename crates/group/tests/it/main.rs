//! Integration tests of the group coordinator: requests go straight to
//! [`GroupCoordinator`] as kafka-protocol structs, on a real [`Store`] in a
//! temporary directory. Timeouts are small (tens to hundreds of ms) so the
//! tests run in real time quickly.

// A failed unwrap is a failed test (clippy.toml allows it in #[test] fns only).
#![allow(clippy::unwrap_used)]

mod admin;
mod consumer_protocol;
mod membership;
mod offsets;
mod replicated;
mod transactions;
mod wire;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
use kafka_protocol::messages::{
    DescribeGroupsRequest, DescribeGroupsResponse, GroupId, HeartbeatRequest, JoinGroupRequest,
    JoinGroupResponse, OffsetCommitRequest, OffsetCommitResponse, OffsetFetchRequest,
    OffsetFetchResponse, SyncGroupRequest, SyncGroupResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use sluice_group::{GroupConfig, GroupCoordinator, OffsetsLog};
use sluice_log::{FlushPolicy, Store, StoreConfig, TopicConfig};
use sluice_topology::{Leadership, Term};
use sluice_vocab::internal::{offsets_topic_configs, OFFSETS_TOPIC};
use sluice_vocab::ErrorCode;
use tempfile::TempDir;

pub const TOPIC: &str = "events";
pub const PARTITIONS: u32 = 4;

/// JoinGroup v9 and the newest versions of the other APIs unless a test says otherwise.
pub const JOIN_V: i16 = 9;
pub const SYNC_V: i16 = 5;
pub const HEARTBEAT_V: i16 = 4;
pub const LEAVE_V: i16 = 5;
pub const COMMIT_V: i16 = 9;
pub const FETCH_V: i16 = 7;
pub const DESCRIBE_V: i16 = 5;

pub fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_owned())
}

pub fn gid(v: &str) -> GroupId {
    GroupId(s(v))
}

pub fn code(err: ErrorCode) -> i16 {
    err.code()
}

/// Small timeouts so that tests run quickly.
pub fn config(initial_delay_ms: u64) -> GroupConfig {
    GroupConfig {
        min_session_timeout_ms: 10,
        max_session_timeout_ms: 60_000,
        initial_rebalance_delay_ms: initial_delay_ms,
        ..GroupConfig::default()
    }
}

/// The store's topics as the consumer protocol's catalog.
pub struct StoreCatalog(pub Arc<Store>);

impl sluice_group::TopicCatalog for StoreCatalog {
    fn version(&self) -> u64 {
        // The store has no version: resolve every time.
        self.0
            .topics()
            .iter()
            .map(|t| u64::from(t.partitions))
            .sum::<u64>()
            + self.0.topics().len() as u64
    }

    fn topic(&self, name: &str) -> Option<sluice_group::TopicInfo> {
        self.0.topic(name).map(|t| sluice_group::TopicInfo {
            id: t.id,
            partitions: t.partitions as i32,
        })
    }

    fn names(&self) -> Vec<String> {
        self.0
            .topics()
            .into_iter()
            .map(|t| t.name)
            .filter(|n| !sluice_vocab::internal::is_internal(n))
            .collect()
    }
}

pub struct Env {
    pub dir: TempDir,
    pub store: Arc<Store>,
    pub coord: Arc<GroupCoordinator>,
}

pub fn open_store(dir: &Path) -> Arc<Store> {
    Store::open(StoreConfig {
        data_dir: dir.to_path_buf(),
        defaults: TopicConfig::default(),
        flush: FlushPolicy::Always,
        cleaner: Default::default(),
    })
    .expect("open store")
}

pub async fn env(initial_delay_ms: u64) -> Env {
    env_with(config(initial_delay_ms)).await
}

/// An [`Env`] whose coordinator runs with `config`.
pub async fn env_with(config: GroupConfig) -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_store(dir.path());
    store
        .create_topic(TOPIC, PARTITIONS, &BTreeMap::new(), false)
        .expect("create topic");
    let coord = open_coordinator(&store, config).await;
    Env { dir, store, coord }
}

/// The local `__consumer_offsets-0` (created if missing) as the coordinator's
/// leadership. The partition stays in local mode, where the high watermark
/// is the durable end, so commits are committed once on disk.
pub fn offsets_leadership(store: &Arc<Store>, epoch: i32) -> (Leadership, Arc<Term>) {
    if store.topic(OFFSETS_TOPIC).is_none() {
        store
            .create_topic(OFFSETS_TOPIC, 1, &offsets_topic_configs(), false)
            .expect("offsets topic");
    }
    let partition = store
        .partition(OFFSETS_TOPIC, 0)
        .expect("offsets partition");
    let term = Term::new();
    (Leadership::new(partition, epoch, term.clone()), term)
}

/// A coordinator on `store`'s offsets partition; topic existence from `store`.
pub async fn open_coordinator(store: &Arc<Store>, config: GroupConfig) -> Arc<GroupCoordinator> {
    let (leadership, _) = offsets_leadership(store, 0);
    let topics = store.clone();
    let offsets = OffsetsLog {
        leadership,
        partition_exists: Arc::new(move |topic, partition| {
            topics.partition(topic, partition).is_some()
        }),
        catalog: Arc::new(StoreCatalog(store.clone())),
    };
    GroupCoordinator::open(config, offsets).await.expect("open")
}

/// A JoinGroup of a "consumer" with one "range" protocol.
pub fn join_request(
    group: &str,
    member_id: &str,
    instance: Option<&str>,
    session_ms: i32,
    rebalance_ms: i32,
    metadata: &[u8],
) -> JoinGroupRequest {
    let mut protocol = JoinGroupRequestProtocol::default();
    protocol.name = s("range");
    protocol.metadata = Bytes::copy_from_slice(metadata);
    let mut req = JoinGroupRequest::default();
    req.group_id = gid(group);
    req.member_id = s(member_id);
    req.group_instance_id = instance.map(s);
    req.session_timeout_ms = session_ms;
    req.rebalance_timeout_ms = rebalance_ms;
    req.protocol_type = s("consumer");
    req.protocols = vec![protocol];
    req
}

/// A new dynamic member's full join: MEMBER_ID_REQUIRED, then the real join.
pub async fn join_new(
    coord: &Arc<GroupCoordinator>,
    group: &str,
    client_id: &str,
    session_ms: i32,
    rebalance_ms: i32,
) -> JoinGroupResponse {
    let first = coord
        .join_group_with_client(
            join_request(
                group,
                "",
                None,
                session_ms,
                rebalance_ms,
                client_id.as_bytes(),
            ),
            JOIN_V,
            client_id,
            "/127.0.0.1",
        )
        .await;
    assert_eq!(first.error_code, code(ErrorCode::MemberIdRequired));
    assert!(
        first
            .member_id
            .as_str()
            .starts_with(&format!("{client_id}-")),
        "member id {:?} should start with the client id",
        first.member_id
    );
    coord
        .join_group_with_client(
            join_request(
                group,
                first.member_id.as_str(),
                None,
                session_ms,
                rebalance_ms,
                client_id.as_bytes(),
            ),
            JOIN_V,
            client_id,
            "/127.0.0.1",
        )
        .await
}

/// A known member's rejoin.
pub async fn rejoin(
    coord: &Arc<GroupCoordinator>,
    group: &str,
    member_id: &str,
    metadata: &[u8],
    session_ms: i32,
    rebalance_ms: i32,
) -> JoinGroupResponse {
    coord
        .join_group_with_client(
            join_request(group, member_id, None, session_ms, rebalance_ms, metadata),
            JOIN_V,
            "client",
            "/127.0.0.1",
        )
        .await
}

pub async fn sync(
    coord: &Arc<GroupCoordinator>,
    group: &str,
    generation: i32,
    member_id: &str,
    instance: Option<&str>,
    assignments: &[(&str, &[u8])],
) -> SyncGroupResponse {
    let mut req = SyncGroupRequest::default();
    req.group_id = gid(group);
    req.generation_id = generation;
    req.member_id = s(member_id);
    req.group_instance_id = instance.map(s);
    req.protocol_type = Some(s("consumer"));
    req.protocol_name = Some(s("range"));
    req.assignments = assignments
        .iter()
        .map(|(m, a)| {
            let mut x = SyncGroupRequestAssignment::default();
            x.member_id = s(m);
            x.assignment = Bytes::copy_from_slice(a);
            x
        })
        .collect();
    coord.sync_group(req, SYNC_V).await
}

pub async fn heartbeat(
    coord: &Arc<GroupCoordinator>,
    group: &str,
    generation: i32,
    member_id: &str,
    instance: Option<&str>,
) -> i16 {
    let mut req = HeartbeatRequest::default();
    req.group_id = gid(group);
    req.generation_id = generation;
    req.member_id = s(member_id);
    req.group_instance_id = instance.map(s);
    coord.heartbeat(req, HEARTBEAT_V).await.error_code
}

pub fn describe(
    coord: &Arc<GroupCoordinator>,
    group: &str,
    version: i16,
) -> DescribeGroupsResponse {
    let mut req = DescribeGroupsRequest::default();
    req.groups = vec![gid(group)];
    coord.describe_groups(req, version)
}

/// (state, member ids) of one group.
pub fn state_of(coord: &Arc<GroupCoordinator>, group: &str) -> (String, Vec<String>) {
    let resp = describe(coord, group, DESCRIBE_V);
    let g = resp.groups.first().expect("one group");
    (
        g.group_state.to_string(),
        g.members.iter().map(|m| m.member_id.to_string()).collect(),
    )
}

/// (partition, offset, leader epoch, metadata)
pub type Commit<'a> = (i32, i64, i32, Option<&'a str>);

pub async fn commit(
    coord: &Arc<GroupCoordinator>,
    group: &str,
    generation: i32,
    member_id: &str,
    topic: &str,
    partitions: &[Commit<'_>],
) -> OffsetCommitResponse {
    let req = commit_request(group, generation, member_id, topic, partitions);
    coord.offset_commit(req, COMMIT_V).await
}

pub fn commit_request(
    group: &str,
    generation: i32,
    member_id: &str,
    topic: &str,
    partitions: &[Commit<'_>],
) -> OffsetCommitRequest {
    let mut req = OffsetCommitRequest::default();
    req.group_id = gid(group);
    req.generation_id_or_member_epoch = generation;
    req.member_id = s(member_id);
    let mut t = OffsetCommitRequestTopic::default();
    t.name = TopicName(s(topic));
    t.partitions = partitions
        .iter()
        .map(|(p, offset, epoch, metadata)| {
            let mut x = OffsetCommitRequestPartition::default();
            x.partition_index = *p;
            x.committed_offset = *offset;
            x.committed_leader_epoch = *epoch;
            x.committed_metadata = metadata.map(s);
            x
        })
        .collect();
    req.topics = vec![t];
    req
}

pub fn commit_errors(resp: &OffsetCommitResponse) -> Vec<i16> {
    resp.topics
        .iter()
        .flat_map(|t| t.partitions.iter().map(|p| p.error_code))
        .collect()
}

/// OffsetFetch v7 of one group; `partitions` None asks for everything.
pub async fn fetch(
    coord: &Arc<GroupCoordinator>,
    group: &str,
    topic: &str,
    partitions: Option<&[i32]>,
) -> OffsetFetchResponse {
    let mut req = OffsetFetchRequest::default();
    req.group_id = gid(group);
    req.topics = partitions.map(|ps| {
        let mut t = OffsetFetchRequestTopic::default();
        t.name = TopicName(s(topic));
        t.partition_indexes = ps.to_vec();
        vec![t]
    });
    coord.offset_fetch(req, FETCH_V).await
}

/// (topic, partition, offset, leader epoch, metadata, error) rows of a v7 fetch.
pub fn fetched(resp: &OffsetFetchResponse) -> Vec<(String, i32, i64, i32, String, i16)> {
    resp.topics
        .iter()
        .flat_map(|t| {
            t.partitions.iter().map(move |p| {
                (
                    t.name.to_string(),
                    p.partition_index,
                    p.committed_offset,
                    p.committed_leader_epoch,
                    p.metadata.as_deref().unwrap_or("<null>").to_owned(),
                    p.error_code,
                )
            })
        })
        .collect()
}

/// Polls `f` every 10 ms until it is true or `within` passes.
pub async fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f()
}

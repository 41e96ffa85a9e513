//! Kafka's consumer groups: the classic protocol's membership and
//! rebalances, the consumer protocol of KIP-848 (`consumer`: the broker
//! assigns, members reconcile towards it heartbeat by heartbeat), and
//! committed offsets, the latter kept in the replicated `__consumer_offsets`
//! topic and replayed when a node takes over its leadership.
//!
//! Structure:
//! - every group is a `group::Group` state machine behind its own mutex
//!   (Kafka's `GroupMetadata` plus the per-group logic of its
//!   `GroupCoordinator`); a JoinGroup or SyncGroup that must wait holds a
//!   oneshot receiver whose sender sits in the member;
//! - every group has one timer task that sleeps until the group's next
//!   deadline (join phase, initial delay, member sessions, pending member
//!   ids, sync deadline) and fires what is due;
//! - committed offsets are records of the offsets topic (`record` documents
//!   the format); a commit is appended under the group's mutex (so appends of
//!   one group are in log order) and answered once committed (the high
//!   watermark passed it: on every in-sync replica), without holding any lock
//!   across the wait;
//! - the offsets log is a compacted topic: the log cleaner keeps each
//!   key's latest commit (and a deleted group's tombstones for
//!   `delete.retention.ms`), so replay reads what is live.
//!
//! Placement ([`Coordination`]): every group is coordinated by the leader of
//! `__consumer_offsets-0` (the controller creates that topic). A node opens a
//! coordinator ([`GroupCoordinator::open`]) when it takes that leadership —
//! once everything its replica holds is committed — and closes it
//! ([`GroupCoordinator::close`]) when the leadership goes: no more writes,
//! waiters answered NOT_COORDINATOR. Every batch it writes goes through the
//! [`Leadership`] (stamped with its epoch, refused once it ended). The same
//! code runs on a single node, which is a cluster of one. [`refuse`] builds
//! the answers of a broker that is not the coordinator.
//!
//! Protocol versions handled (see [`SUPPORTED_VERSIONS`]):
//!
//! | API            | key | versions |
//! |----------------|-----|----------|
//! | OffsetCommit   |   8 | 2-9      |
//! | OffsetFetch    |   9 | 1-9      |
//! | JoinGroup      |  11 | 0-9      |
//! | Heartbeat      |  12 | 0-4      |
//! | LeaveGroup     |  13 | 0-5      |
//! | SyncGroup      |  14 | 0-5      |
//! | DescribeGroups |  15 | 0-6      |
//! | ListGroups     |  16 | 0-5      |
//! | DeleteGroups   |  42 | 0-2      |
//! | ConsumerGroupHeartbeat | 68 | 0-1 |
//! | ConsumerGroupDescribe  | 69 | 0-1 |
//!
//! Where Sluice differs from Kafka's classic coordinator:
//! - membership is not persisted: after a restart every group comes back
//!   Empty with its committed offsets, and members (static ones too) rejoin
//!   after an UNKNOWN_MEMBER_ID;
//! - committed offsets never expire (`offsets.retention.minutes` and the
//!   commit's `retention_time_ms` are ignored), and offsets of deleted
//!   topics are kept;
//! - `group.max.size` is not enforced;
//! - a tie in the protocol vote goes to the leader's preference order
//!   (Kafka picks arbitrarily);
//! - DeleteGroups answers after its tombstones are durable (Kafka does not wait);
//! - a group uses one protocol at a time: Kafka 4's online migration of a
//!   group with members between the classic and the consumer protocol is
//!   not implemented (a member of the other protocol is refused).

mod assignor;
mod consumer;
mod consumer_api;
mod coordination;
mod group;
mod record;
mod txn_offsets;

pub use coordination::Coordination;

/// The server-side assignors of consumer-protocol groups, by name.
pub const SERVER_ASSIGNORS: [&str; 2] = assignor::ASSIGNORS;

/// A group's committed offset of one partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommittedOffset {
    pub group: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use bytes::Bytes;
use kafka_protocol::messages::delete_groups_response::DeletableGroupResult;
use kafka_protocol::messages::describe_groups_response::{DescribedGroup, DescribedGroupMember};
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::list_groups_response::ListedGroup;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_delete_response::{
    OffsetDeleteResponsePartition, OffsetDeleteResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponseGroup, OffsetFetchResponsePartition, OffsetFetchResponsePartitions,
    OffsetFetchResponseTopic, OffsetFetchResponseTopics,
};
use kafka_protocol::messages::{
    DeleteGroupsRequest, DeleteGroupsResponse, DescribeGroupsRequest, DescribeGroupsResponse,
    GroupId, HeartbeatRequest, HeartbeatResponse, JoinGroupRequest, JoinGroupResponse,
    LeaveGroupRequest, LeaveGroupResponse, ListGroupsRequest, ListGroupsResponse,
    OffsetCommitRequest, OffsetCommitResponse, OffsetDeleteRequest, OffsetDeleteResponse,
    OffsetFetchRequest, OffsetFetchResponse, SyncGroupRequest, SyncGroupResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{Record, RecordBatchDecoder};
use parking_lot::Mutex;
use sluice_log::{BatchBuilder, BatchHeader, LogError, Partition, ReadLimit};
use sluice_topology::{AppendError, Leadership};
use sluice_vocab::{now_ms, ErrorCode};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::group::{
    CommitApi, Committed, Group, GroupKind, GroupState, JoinParams, JoinResult, Outcome, SyncResult,
};
use crate::record::{OffsetKey, OffsetValue};

/// Kafka's `offset.metadata.max.bytes`: longer commit metadata is refused
/// with OFFSET_METADATA_TOO_LARGE.
pub const OFFSET_METADATA_MAX_BYTES: usize = 4096;

/// Version ranges this coordinator implements, as (API key, min, max), for
/// the front end's ApiVersions table.
pub const SUPPORTED_VERSIONS: &[(i16, i16, i16)] = &[
    (8, 2, 9),  // OffsetCommit
    (9, 1, 9),  // OffsetFetch
    (11, 0, 9), // JoinGroup
    (12, 0, 4), // Heartbeat
    (13, 0, 5), // LeaveGroup
    (14, 0, 5), // SyncGroup
    (15, 0, 6), // DescribeGroups
    (16, 0, 5), // ListGroups
    (42, 0, 2), // DeleteGroups
    (68, 0, 1), // ConsumerGroupHeartbeat
    (69, 0, 1), // ConsumerGroupDescribe
];

/// Group coordinator settings, with Kafka's names and defaults.
#[derive(Clone, Debug)]
pub struct GroupConfig {
    /// `group.min.session.timeout.ms` (6000)
    pub min_session_timeout_ms: i32,
    /// `group.max.session.timeout.ms` (1800000)
    pub max_session_timeout_ms: i32,
    /// `group.initial.rebalance.delay.ms` (3000): how long the first join of
    /// an empty group waits for more members.
    pub initial_rebalance_delay_ms: u64,
    /// `group.consumer.session.timeout.ms` (45000): a consumer-protocol
    /// member not heard from for this long is removed.
    pub consumer_session_timeout_ms: u64,
    /// `group.consumer.heartbeat.interval.ms` (5000): how often such a
    /// member is told to heartbeat.
    pub consumer_heartbeat_interval_ms: u64,
    /// `group.consumer.assignors` (uniform, range): the server-side
    /// assignors in preference order; the first is the default.
    pub consumer_assignors: Vec<String>,
}

impl GroupConfig {
    pub(crate) fn consumer_default_assignor(&self) -> &str {
        self.consumer_assignors
            .first()
            .map_or(assignor::UNIFORM, String::as_str)
    }
}

/// What the consumer protocol's server-side assignment knows of a topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TopicInfo {
    pub id: [u8; 16],
    pub partitions: i32,
}

/// The topics a consumer group may subscribe to: the cluster's metadata.
pub trait TopicCatalog: Send + Sync {
    /// Changes whenever any topic does (a group re-reads its topics then).
    fn version(&self) -> u64;
    fn topic(&self, name: &str) -> Option<TopicInfo>;
    /// Every topic a regex subscription may match (internal ones excluded).
    fn names(&self) -> Vec<String>;
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            min_session_timeout_ms: 6_000,
            max_session_timeout_ms: 1_800_000,
            initial_rebalance_delay_ms: 3_000,
            consumer_session_timeout_ms: 45_000,
            consumer_heartbeat_interval_ms: 5_000,
            consumer_assignors: assignor::ASSIGNORS
                .iter()
                .map(|a| (*a).to_owned())
                .collect(),
        }
    }
}

/// Tells whether a topic partition exists (the metadata image knows; the
/// coordinator's node need not host every topic).
pub type PartitionExists = Arc<dyn Fn(&str, i32) -> bool + Send + Sync>;

/// The offsets log a coordinator writes: `__consumer_offsets-0` as this node
/// leads it.
pub struct OffsetsLog {
    /// The leadership of `__consumer_offsets-0`: every batch is appended
    /// through it, so a coordinator not yet closed never writes into a log it
    /// no longer leads.
    pub leadership: Leadership,
    /// Whether a commit's topic partition exists.
    pub partition_exists: PartitionExists,
    /// The topics consumer-protocol groups subscribe to.
    pub catalog: Arc<dyn TopicCatalog>,
}

/// Why an offsets-log write failed because the coordinator was closed
/// (mapped to NOT_COORDINATOR like every storage error of a commit).
const CLOSED: &str = "this broker is no longer the group coordinator";

fn closed_error() -> LogError {
    LogError::Io(std::io::Error::other(CLOSED))
}

#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("corrupt offsets log entry at offset {0}: {1}")]
    CorruptEntry(i64, String),
}

/// One group's state and the wake-up of its timer task.
struct GroupHandle {
    id: String,
    state: Mutex<Group>,
    /// Poked whenever a request may have moved a deadline earlier.
    wake: Notify,
}

/// Coordinates every group of this broker.
pub struct GroupCoordinator {
    config: GroupConfig,
    /// How the offsets log is led: batches are appended and committed through it.
    leadership: Leadership,
    partition_exists: PartitionExists,
    catalog: Arc<dyn TopicCatalog>,
    /// Never lock a group while holding this map's lock.
    groups: Mutex<HashMap<String, Arc<GroupHandle>>>,
    /// Dropped with the coordinator, which ends every timer task.
    shutdown: watch::Sender<()>,
    id_seq: AtomicU64,
    id_hasher: RandomState,
    /// Set by [`GroupCoordinator::close`]: nothing more is written.
    closed: AtomicBool,
    /// Offsets committed inside transactions that have not ended.
    pending_txn: Mutex<txn_offsets::PendingTxnOffsets>,
}

fn str_bytes(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_owned())
}

/// One partition's offset commit as the offsets log holds it, or why it is
/// refused (the one home of the commit rules shared by OffsetCommit and
/// TxnOffsetCommit).
fn offset_entry(
    group: &str,
    topic: &str,
    partition: i32,
    offset: i64,
    leader_epoch: i32,
    metadata: Option<&str>,
    commit_timestamp: i64,
) -> Result<(OffsetKey, OffsetValue), ErrorCode> {
    let metadata = metadata.unwrap_or("");
    if metadata.len() > OFFSET_METADATA_MAX_BYTES {
        return Err(ErrorCode::OffsetMetadataTooLarge);
    }
    Ok((
        OffsetKey {
            group: group.to_owned(),
            topic: topic.to_owned(),
            partition,
        },
        OffsetValue {
            offset,
            leader_epoch,
            metadata: metadata.to_owned(),
            commit_timestamp,
        },
    ))
}

fn committed(v: &OffsetValue, log_offset: i64) -> Committed {
    Committed {
        offset: v.offset,
        leader_epoch: v.leader_epoch,
        metadata: v.metadata.clone(),
        log_offset,
    }
}

/// Kafka's mapping of an offsets-log write failure to a commit error.
fn commit_error(err: &LogError) -> ErrorCode {
    match err {
        LogError::MessageTooLarge { .. } => ErrorCode::InvalidCommitOffsetSize,
        LogError::Io(_) => ErrorCode::NotCoordinator,
        LogError::UnknownTopicOrPartition(_) => ErrorCode::CoordinatorNotAvailable,
        _ => ErrorCode::UnknownServerError,
    }
}

/// Most records per batch when writing tombstones, to stay well below the
/// offsets topic's max.message.bytes.
const TOMBSTONES_PER_BATCH: usize = 1000;

/// ACL operations a classic group supports (READ, DELETE, DESCRIBE), as the
/// bitfield DescribeGroups v3+ reports; Sluice has no ACLs, so all of them.
const GROUP_AUTHORIZED_OPERATIONS: i32 = (1 << 3) | (1 << 6) | (1 << 8);

impl GroupCoordinator {
    /// The coordinator of a node that has just become leader of
    /// `__consumer_offsets-0`. Waits until everything in the local log is
    /// committed (the high watermark reaches the log end seen on entry: the
    /// previous leader's commits this node replicated), then replays up to the
    /// high watermark. The wait ends with the high watermark, the end of the
    /// leadership (NOT_COORDINATOR) or an error; the caller may also drop it.
    /// Must be called inside a Tokio runtime (session timers are spawned on
    /// it). Call [`GroupCoordinator::close`] when this node stops leading.
    pub async fn open(config: GroupConfig, offsets: OffsetsLog) -> Result<Arc<Self>, GroupError> {
        let partition = offsets.leadership.partition().clone();
        let end = partition.log_end_offset();
        offsets
            .leadership
            .wait_committed(end, None)
            .await
            .map_err(|_| closed_error())?;
        let (replayed, pending_txn) = replay(&partition)?;
        let (shutdown, _) = watch::channel(());
        let coordinator = Arc::new(GroupCoordinator {
            config,
            leadership: offsets.leadership,
            partition_exists: offsets.partition_exists,
            catalog: offsets.catalog,
            groups: Mutex::new(HashMap::new()),
            shutdown,
            id_seq: AtomicU64::new(0),
            id_hasher: RandomState::new(),
            closed: AtomicBool::new(false),
            pending_txn: Mutex::new(pending_txn),
        });
        let now = Instant::now();
        let count = replayed.len();
        for (id, offsets) in replayed {
            let mut group = Group::new(id.clone(), now);
            group.offsets = offsets;
            coordinator.insert_group(id, group);
        }
        tracing::info!(groups = count, "consumer group offsets restored");
        Ok(coordinator)
    }

    /// When this node stops leading the offsets partition:
    /// nothing more is written, waiting JoinGroup/SyncGroup requests and
    /// commits waiting to be committed are answered NOT_COORDINATOR, and the
    /// session timers stop. Idempotent.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for handle in self.handles() {
            handle.state.lock().fail_waiters(ErrorCode::NotCoordinator);
        }
        self.shutdown.send_replace(());
        tracing::info!("group coordinator closed");
    }

    /// Whether [`GroupCoordinator::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// What makes a write of the offsets log safe to answer, as a future
    /// that owns what it needs (a commit completes in a task of its own).
    fn settle(&self, end_offset: i64) -> impl std::future::Future<Output = Result<(), LogError>> {
        let leadership = self.leadership.clone();
        let mut closed = self.shutdown.subscribe();
        let already_closed = self.is_closed();
        async move {
            if already_closed {
                return Err(closed_error());
            }
            tokio::select! {
                r = leadership.wait_committed(end_offset, None) => r.map_err(|_| closed_error()),
                _ = closed.changed() => Err(closed_error()),
            }
        }
    }

    /// Whether a commit's topic partition exists.
    fn partition_exists(&self, topic: &str, partition: i32) -> bool {
        (self.partition_exists)(topic, partition)
    }

    // ---- group registry --------------------------------------------------

    fn insert_group(self: &Arc<Self>, id: String, group: Group) -> Arc<GroupHandle> {
        let handle = Arc::new(GroupHandle {
            id: id.clone(),
            state: Mutex::new(group),
            wake: Notify::new(),
        });
        self.groups.lock().insert(id, handle.clone());
        self.spawn_timer(&handle);
        handle
    }

    fn get_group(&self, id: &str) -> Option<Arc<GroupHandle>> {
        self.groups.lock().get(id).cloned()
    }

    fn get_or_create_group(self: &Arc<Self>, id: &str) -> Arc<GroupHandle> {
        let handle = {
            let mut groups = self.groups.lock();
            if let Some(h) = groups.get(id) {
                return h.clone();
            }
            let handle = Arc::new(GroupHandle {
                id: id.to_owned(),
                state: Mutex::new(Group::new(id.to_owned(), Instant::now())),
                wake: Notify::new(),
            });
            groups.insert(id.to_owned(), handle.clone());
            handle
        };
        self.spawn_timer(&handle);
        handle
    }

    /// A live (not Dead) group, created when missing. A group found Dead was
    /// deleted or forgotten an instant ago; look again to get its successor.
    fn live_group(self: &Arc<Self>, id: &str) -> Arc<GroupHandle> {
        for _ in 0..3 {
            let handle = self.get_or_create_group(id);
            if handle.state.lock().state != GroupState::Dead {
                return handle;
            }
            self.forget(&handle);
        }
        self.get_or_create_group(id)
    }

    /// Drops a Dead group from the registry (if it is still the registered one).
    fn forget(&self, handle: &Arc<GroupHandle>) {
        let mut groups = self.groups.lock();
        if groups
            .get(&handle.id)
            .is_some_and(|h| Arc::ptr_eq(h, handle))
        {
            groups.remove(&handle.id);
        }
    }

    fn spawn_timer(self: &Arc<Self>, handle: &Arc<GroupHandle>) {
        tokio::spawn(run_timers(
            handle.clone(),
            Arc::downgrade(self),
            self.config.clone(),
            self.shutdown.subscribe(),
        ));
    }

    /// A fresh member id: `<client id or group instance id>-<uuid>`, as Kafka.
    fn new_member_id(&self, prefix: &str) -> String {
        let n = self.id_seq.fetch_add(1, Ordering::Relaxed);
        let a = self.id_hasher.hash_one((n, 0u8));
        let b = self.id_hasher.hash_one((n, 1u8));
        format!(
            "{prefix}-{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            (b >> 48) & 0x3fff | 0x8000,
            b & 0xffff_ffff_ffff
        )
    }

    // ---- JoinGroup -------------------------------------------------------

    /// Resolves when the join phase of the rebalance completes (or at once for errors).
    /// Members get an empty client id and host; prefer
    /// [`GroupCoordinator::join_group_with_client`].
    pub async fn join_group(
        self: &Arc<Self>,
        req: JoinGroupRequest,
        version: i16,
    ) -> JoinGroupResponse {
        self.join_group_with_client(req, version, "", "").await
    }

    /// JoinGroup with the request header's client id and the peer's host
    /// (Kafka reports it as `/<ip>`), both shown by DescribeGroups; the
    /// client id also prefixes generated member ids.
    pub async fn join_group_with_client(
        self: &Arc<Self>,
        req: JoinGroupRequest,
        version: i16,
        client_id: &str,
        client_host: &str,
    ) -> JoinGroupResponse {
        let member_id = req.member_id.to_string();
        let result = match self.join_outcome(req, version, client_id, client_host) {
            Outcome::Now(r) => r,
            Outcome::Wait(rx) => rx.await.unwrap_or_else(|_| {
                // The wait was superseded or the coordinator is going away;
                // the client rediscovers the coordinator and rejoins.
                JoinResult::error(&member_id, ErrorCode::CoordinatorNotAvailable)
            }),
        };
        join_response(result, version)
    }

    fn join_outcome(
        self: &Arc<Self>,
        req: JoinGroupRequest,
        version: i16,
        client_id: &str,
        client_host: &str,
    ) -> Outcome<JoinResult> {
        let member_id = req.member_id.to_string();
        let group_id = req.group_id.as_str();
        if group_id.is_empty() {
            return Outcome::Now(JoinResult::error(&member_id, ErrorCode::InvalidGroupId));
        }
        let session = req.session_timeout_ms;
        if session < self.config.min_session_timeout_ms
            || session > self.config.max_session_timeout_ms
        {
            return Outcome::Now(JoinResult::error(
                &member_id,
                ErrorCode::InvalidSessionTimeout,
            ));
        }
        let params = JoinParams {
            member_id: member_id.clone(),
            instance_id: req.group_instance_id.as_ref().map(|s| s.to_string()),
            client_id: client_id.to_owned(),
            client_host: client_host.to_owned(),
            // v0 has no rebalance timeout: Kafka uses the session timeout.
            rebalance_timeout_ms: if version == 0 {
                session
            } else {
                req.rebalance_timeout_ms
            },
            session_timeout_ms: session,
            protocol_type: req.protocol_type.to_string(),
            protocols: req
                .protocols
                .into_iter()
                .map(|p| (p.name.to_string(), p.metadata))
                .collect(),
            require_known_member_id: version >= 4,
            support_skip_assignment: version >= 9,
        };
        let handle = if member_id.is_empty() {
            self.live_group(group_id)
        } else {
            match self.get_group(group_id) {
                Some(h) => h,
                None => {
                    return Outcome::Now(JoinResult::error(&member_id, ErrorCode::UnknownMemberId))
                }
            }
        };
        let outcome = {
            let mut g = handle.state.lock();
            // Checked under the group's lock: `close` fails the waiters of
            // every group after setting the flag, so none is left behind.
            if self.is_closed() {
                return Outcome::Now(JoinResult::error(&member_id, ErrorCode::NotCoordinator));
            }
            g.join(
                params,
                |prefix| self.new_member_id(prefix),
                Instant::now(),
                &self.config,
            )
        };
        handle.wake.notify_one();
        outcome
    }

    // ---- SyncGroup, Heartbeat, LeaveGroup -------------------------------

    /// Followers wait here until the leader's SyncGroup delivers assignments.
    pub async fn sync_group(
        self: &Arc<Self>,
        req: SyncGroupRequest,
        version: i16,
    ) -> SyncGroupResponse {
        let result = match self.sync_outcome(req) {
            Outcome::Now(r) => r,
            Outcome::Wait(rx) => rx
                .await
                .unwrap_or_else(|_| SyncResult::error(ErrorCode::RebalanceInProgress)),
        };
        sync_response(result, version)
    }

    fn sync_outcome(&self, req: SyncGroupRequest) -> Outcome<SyncResult> {
        let group_id = req.group_id.as_str();
        if group_id.is_empty() {
            return Outcome::Now(SyncResult::error(ErrorCode::InvalidGroupId));
        }
        let Some(handle) = self.get_group(group_id) else {
            return Outcome::Now(SyncResult::error(ErrorCode::UnknownMemberId));
        };
        let assignments = req
            .assignments
            .into_iter()
            .map(|a| (a.member_id.to_string(), a.assignment))
            .collect();
        let mut g = handle.state.lock();
        if self.is_closed() {
            return Outcome::Now(SyncResult::error(ErrorCode::NotCoordinator));
        }
        let outcome = g.sync(
            req.generation_id,
            req.member_id.as_str(),
            req.group_instance_id.as_deref(),
            req.protocol_type.as_deref(),
            req.protocol_name.as_deref(),
            assignments,
            Instant::now(),
        );
        drop(g);
        handle.wake.notify_one();
        outcome
    }

    pub async fn heartbeat(
        self: &Arc<Self>,
        req: HeartbeatRequest,
        version: i16,
    ) -> HeartbeatResponse {
        let _ = version;
        let mut resp = HeartbeatResponse::default();
        let group_id = req.group_id.as_str();
        let result = if group_id.is_empty() {
            Err(ErrorCode::InvalidGroupId)
        } else {
            match self.get_group(group_id) {
                None => Err(ErrorCode::UnknownMemberId),
                Some(handle) => {
                    let r = handle.state.lock().heartbeat(
                        req.generation_id,
                        req.member_id.as_str(),
                        req.group_instance_id.as_deref(),
                        Instant::now(),
                    );
                    handle.wake.notify_one();
                    r
                }
            }
        };
        resp.error_code = result.err().map_or(0, |e| e.code());
        resp
    }

    pub async fn leave_group(
        self: &Arc<Self>,
        req: LeaveGroupRequest,
        version: i16,
    ) -> LeaveGroupResponse {
        let mut resp = LeaveGroupResponse::default();
        let leaving: Vec<(StrBytes, Option<StrBytes>)> = if version < 3 {
            vec![(req.member_id.clone(), None)]
        } else {
            req.members
                .iter()
                .map(|m| (m.member_id.clone(), m.group_instance_id.clone()))
                .collect()
        };
        let group_id = req.group_id.as_str();
        let (top, per_member): (Option<ErrorCode>, Vec<Option<ErrorCode>>) = if group_id.is_empty()
        {
            (Some(ErrorCode::InvalidGroupId), Vec::new())
        } else {
            match self.get_group(group_id) {
                None => (
                    None,
                    leaving
                        .iter()
                        .map(|_| Some(ErrorCode::UnknownMemberId))
                        .collect(),
                ),
                Some(handle) => {
                    let mut g = handle.state.lock();
                    if g.state == GroupState::Dead {
                        (Some(ErrorCode::CoordinatorNotAvailable), Vec::new())
                    } else {
                        let now = Instant::now();
                        let errors = leaving
                            .iter()
                            .map(|(member, instance)| {
                                g.leave(member.as_str(), instance.as_deref(), now, &self.config)
                                    .err()
                            })
                            .collect();
                        drop(g);
                        handle.wake.notify_one();
                        (None, errors)
                    }
                }
            }
        };
        if version < 3 {
            // One member: its error is the response's error, as in Kafka.
            resp.error_code = top
                .or_else(|| per_member.iter().flatten().next().copied())
                .map_or(0, |e| e.code());
        } else {
            resp.error_code = top.map_or(0, |e| e.code());
            resp.members = leaving
                .into_iter()
                .zip(per_member)
                .map(|((member_id, instance), err)| {
                    let mut m = MemberResponse::default();
                    m.member_id = member_id;
                    m.group_instance_id = instance;
                    m.error_code = err.map_or(0, |e| e.code());
                    m
                })
                .collect();
        }
        resp
    }

    // ---- offsets ---------------------------------------------------------

    /// Answers after the commit is durable in the offsets topic.
    pub async fn offset_commit(
        self: &Arc<Self>,
        req: OffsetCommitRequest,
        version: i16,
    ) -> OffsetCommitResponse {
        let mut resp = OffsetCommitResponse::default();
        resp.topics = req
            .topics
            .iter()
            .map(|t| {
                let mut topic = OffsetCommitResponseTopic::default();
                topic.name = t.name.clone();
                topic.partitions = t
                    .partitions
                    .iter()
                    .map(|p| {
                        let mut part = OffsetCommitResponsePartition::default();
                        part.partition_index = p.partition_index;
                        part
                    })
                    .collect();
                topic
            })
            .collect();
        let set = |resp: &mut OffsetCommitResponse, ti: usize, pi: usize, err: ErrorCode| {
            if let Some(p) = resp
                .topics
                .get_mut(ti)
                .and_then(|t| t.partitions.get_mut(pi))
            {
                p.error_code = err.code();
            }
        };

        // Partitions of topics that exist; the rest are refused up front,
        // as Kafka's KafkaApis does before asking the coordinator.
        let mut valid: Vec<(usize, usize)> = Vec::new();
        for (ti, t) in req.topics.iter().enumerate() {
            for (pi, p) in t.partitions.iter().enumerate() {
                if self.partition_exists(t.name.as_str(), p.partition_index) {
                    valid.push((ti, pi));
                } else {
                    set(&mut resp, ti, pi, ErrorCode::UnknownTopicOrPartition);
                }
            }
        }
        if valid.is_empty() {
            return resp;
        }
        let group_id = req.group_id.as_str();
        let fail_all = |resp: &mut OffsetCommitResponse, err: ErrorCode| {
            for &(ti, pi) in &valid {
                set(resp, ti, pi, err);
            }
        };
        if group_id.len() > record::MAX_STRING {
            fail_all(&mut resp, ErrorCode::InvalidGroupId);
            return resp;
        }
        let generation = req.generation_id_or_member_epoch;
        let member_id = req.member_id.as_str();
        let instance_id = req.group_instance_id.as_deref();
        let handle = match self.get_group(group_id) {
            Some(h) => h,
            // A consumer that manages partitions itself (assign()) or an
            // admin tool commits with generation -1 and no member id.
            None if generation < 0 => self.live_group(group_id),
            None => {
                // v9 (KIP-848) tells a missing group apart.
                let err = if version >= 9 {
                    ErrorCode::GroupIdNotFound
                } else {
                    ErrorCode::IllegalGeneration
                };
                fail_all(&mut resp, err);
                return resp;
            }
        };

        let commit_ts = now_ms();
        let written = {
            let mut g = handle.state.lock();
            if let Err(e) = g.validate_offset_commit(
                generation,
                member_id,
                instance_id,
                CommitApi::OffsetCommit(version),
            ) {
                fail_all(&mut resp, e);
                return resp;
            }
            g.commit_heartbeat(member_id, Instant::now());
            let mut entries: Vec<(usize, usize, OffsetKey, OffsetValue)> = Vec::new();
            for &(ti, pi) in &valid {
                let Some((t, p)) = req
                    .topics
                    .get(ti)
                    .and_then(|t| t.partitions.get(pi).map(|p| (t, p)))
                else {
                    continue;
                };
                match offset_entry(
                    group_id,
                    t.name.as_str(),
                    p.partition_index,
                    p.committed_offset,
                    p.committed_leader_epoch,
                    p.committed_metadata.as_deref(),
                    commit_ts,
                ) {
                    Ok((key, value)) => entries.push((ti, pi, key, value)),
                    Err(e) => set(&mut resp, ti, pi, e),
                }
            }
            if entries.is_empty() {
                return resp;
            }
            let records: Vec<(Bytes, Option<Bytes>)> = entries
                .iter()
                .map(|(_, _, k, v)| (record::encode_key(k), Some(record::encode_value(v))))
                .collect();
            match self.append(&records) {
                Ok((base_offset, end_offset)) => {
                    for (log_offset, (_, _, k, v)) in (base_offset..).zip(&entries) {
                        g.commit_appended((k.topic.clone(), k.partition), committed(v, log_offset));
                    }
                    (entries, base_offset, end_offset)
                }
                Err(e) => {
                    tracing::warn!(group = group_id, error = %e, "offset commit append failed");
                    let err = commit_error(&e);
                    for (ti, pi, _, _) in &entries {
                        set(&mut resp, *ti, *pi, err);
                    }
                    return resp;
                }
            }
        };
        handle.wake.notify_one();

        // Finish in a task of its own so that the in-memory view follows the
        // log even if this request is dropped while waiting for the disk.
        let (entries, base_offset, end_offset) = written;
        let settle = self.settle(end_offset);
        let task = tokio::spawn(async move {
            let durable = settle.await;
            let mut g = handle.state.lock();
            let mut outcome = Vec::with_capacity(entries.len());
            for (log_offset, (ti, pi, key, value)) in (base_offset..).zip(entries) {
                let tp = (key.topic, key.partition);
                match &durable {
                    Ok(()) => {
                        g.commit_settled(tp, Some(committed(&value, log_offset)));
                        outcome.push((ti, pi, None));
                    }
                    Err(e) => {
                        g.commit_settled(tp, None);
                        outcome.push((ti, pi, Some(commit_error(e))));
                    }
                }
            }
            if let Err(e) = &durable {
                tracing::warn!(group = %g.id, error = %e, "offset commit not durable");
            }
            outcome
        });
        match task.await {
            Ok(outcome) => {
                for (ti, pi, err) in outcome {
                    if let Some(err) = err {
                        set(&mut resp, ti, pi, err);
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "offset commit completion failed");
                fail_all(&mut resp, ErrorCode::UnknownServerError);
            }
        }
        resp
    }

    /// Appends records as one batch to the offsets log; returns the offset
    /// of the first record and one past the last.
    fn append(&self, records: &[(Bytes, Option<Bytes>)]) -> Result<(i64, i64), LogError> {
        let timestamp = now_ms();
        let size = records
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Bytes::len) + 16)
            .sum();
        let mut batch = BatchBuilder::new(size, timestamp);
        for (key, value) in records {
            batch.push(timestamp, Some(key), value.as_deref(), &[]);
        }
        let buf = batch
            .finish()
            .ok_or_else(|| LogError::InvalidRecord("no offsets to append".into()))?;
        if self.is_closed() {
            return Err(closed_error());
        }
        let result = self.leadership.append(&buf).map_err(|e| match e {
            AppendError::NotLeader => closed_error(),
            AppendError::Log(e) => e,
        })?;
        Ok((result.base_offset, result.end_offset))
    }

    pub async fn offset_fetch(
        self: &Arc<Self>,
        req: OffsetFetchRequest,
        version: i16,
    ) -> OffsetFetchResponse {
        let mut resp = OffsetFetchResponse::default();
        // Only durable commits are ever visible; with require_stable (v7+),
        // a partition whose offset waits for a transaction's outcome is
        // UNSTABLE_OFFSET_COMMIT (the consumer asks again).
        let unstable = |group: &str, topic: &str, partition: i32| {
            version >= 7
                && req.require_stable
                && self
                    .pending_txn
                    .lock()
                    .is_pending(group, &(topic.to_owned(), partition))
        };
        if version >= 8 {
            resp.groups = req
                .groups
                .iter()
                .map(|g| {
                    let wanted = g.topics.as_ref().map(|topics| {
                        topics
                            .iter()
                            .map(|t| (t.name.to_string(), t.partition_indexes.clone()))
                            .collect()
                    });
                    let mut out = OffsetFetchResponseGroup::default();
                    out.group_id = g.group_id.clone();
                    if version >= 9 {
                        let member = g.member_id.as_ref().map(|m| m.as_str());
                        if let Err(e) =
                            self.validate_fetch(g.group_id.as_str(), member, g.member_epoch)
                        {
                            out.error_code = e.code();
                            return out;
                        }
                    }
                    out.topics = self
                        .committed(g.group_id.as_str(), wanted)
                        .into_iter()
                        .map(|(name, parts)| {
                            let mut t = OffsetFetchResponseTopics::default();
                            t.name = TopicName(str_bytes(&name));
                            t.partitions = parts
                                .into_iter()
                                .map(|(index, c)| {
                                    let mut p = OffsetFetchResponsePartitions::default();
                                    p.partition_index = index;
                                    p.committed_offset = c.as_ref().map_or(-1, |c| c.offset);
                                    p.committed_leader_epoch =
                                        c.as_ref().map_or(-1, |c| c.leader_epoch);
                                    p.metadata =
                                        Some(c.as_ref().map_or_else(StrBytes::new, |c| {
                                            str_bytes(&c.metadata)
                                        }));
                                    if unstable(g.group_id.as_str(), &name, index) {
                                        p.committed_offset = -1;
                                        p.error_code = ErrorCode::UnstableOffsetCommit.code();
                                    }
                                    p
                                })
                                .collect();
                            t
                        })
                        .collect();
                    out
                })
                .collect();
        } else {
            let wanted = req.topics.as_ref().map(|topics| {
                topics
                    .iter()
                    .map(|t| (t.name.to_string(), t.partition_indexes.clone()))
                    .collect()
            });
            resp.topics = self
                .committed(req.group_id.as_str(), wanted)
                .into_iter()
                .map(|(name, parts)| {
                    let mut t = OffsetFetchResponseTopic::default();
                    t.name = TopicName(str_bytes(&name));
                    t.partitions = parts
                        .into_iter()
                        .map(|(index, c)| {
                            let mut p = OffsetFetchResponsePartition::default();
                            p.partition_index = index;
                            p.committed_offset = c.as_ref().map_or(-1, |c| c.offset);
                            if version >= 5 {
                                p.committed_leader_epoch =
                                    c.as_ref().map_or(-1, |c| c.leader_epoch);
                            }
                            p.metadata = Some(
                                c.as_ref()
                                    .map_or_else(StrBytes::new, |c| str_bytes(&c.metadata)),
                            );
                            if unstable(req.group_id.as_str(), &name, index) {
                                p.committed_offset = -1;
                                p.error_code = ErrorCode::UnstableOffsetCommit.code();
                            }
                            p
                        })
                        .collect();
                    t
                })
                .collect();
        }
        resp
    }

    /// OffsetFetch v9 from a member of a consumer-protocol group must carry
    /// its current epoch (Kafka's `validateOffsetFetch`); other fetches
    /// (admin tools, classic groups) are not checked.
    fn validate_fetch(
        &self,
        group: &str,
        member: Option<&str>,
        epoch: i32,
    ) -> Result<(), ErrorCode> {
        if member.is_none() && epoch < 0 {
            return Ok(());
        }
        let Some(handle) = self.get_group(group) else {
            return Ok(());
        };
        let g = handle.state.lock();
        if g.kind != GroupKind::Consumer || g.state == GroupState::Dead {
            return Ok(());
        }
        g.consumer.validate_fetch(member.unwrap_or_default(), epoch)
    }

    /// Committed offsets of a group: the requested partitions (unknown ones
    /// as None), or with `wanted` None every committed partition.
    #[allow(clippy::type_complexity)]
    fn committed(
        &self,
        group_id: &str,
        wanted: Option<Vec<(String, Vec<i32>)>>,
    ) -> Vec<(String, Vec<(i32, Option<Committed>)>)> {
        let handle = self.get_group(group_id);
        let guard = handle.as_ref().map(|h| h.state.lock());
        let offsets = guard
            .as_ref()
            .filter(|g| g.state != GroupState::Dead)
            .map(|g| &g.offsets);
        match wanted {
            Some(wanted) => wanted
                .into_iter()
                .map(|(topic, partitions)| {
                    let parts = partitions
                        .into_iter()
                        .map(|p| {
                            let c = offsets.and_then(|o| o.get(&(topic.clone(), p))).cloned();
                            (p, c)
                        })
                        .collect();
                    (topic, parts)
                })
                .collect(),
            None => {
                let mut out: Vec<(String, Vec<(i32, Option<Committed>)>)> = Vec::new();
                for ((topic, partition), c) in offsets.into_iter().flatten() {
                    match out.last_mut() {
                        Some((t, parts)) if t == topic => parts.push((*partition, Some(c.clone()))),
                        _ => out.push((topic.clone(), vec![(*partition, Some(c.clone()))])),
                    }
                }
                out
            }
        }
    }

    // ---- admin -----------------------------------------------------------

    /// Every committed offset of the groups this node coordinates, by group,
    /// topic and partition (for the broker's lag metrics).
    pub fn committed_offsets(&self) -> Vec<CommittedOffset> {
        let mut out = Vec::new();
        for handle in self.handles() {
            let g = handle.state.lock();
            if g.state == GroupState::Dead {
                continue;
            }
            for ((topic, partition), c) in &g.offsets {
                out.push(CommittedOffset {
                    group: g.id.clone(),
                    topic: topic.clone(),
                    partition: *partition,
                    offset: c.offset,
                });
            }
        }
        out
    }

    fn handles(&self) -> Vec<Arc<GroupHandle>> {
        let mut handles: Vec<Arc<GroupHandle>> = self.groups.lock().values().cloned().collect();
        handles.sort_by(|a, b| a.id.cmp(&b.id));
        handles
    }

    pub fn list_groups(
        self: &Arc<Self>,
        req: ListGroupsRequest,
        version: i16,
    ) -> ListGroupsResponse {
        let mut resp = ListGroupsResponse::default();
        let states: Vec<String> = if version >= 4 {
            req.states_filter
                .iter()
                .map(|s| s.as_str().to_ascii_lowercase())
                .collect()
        } else {
            Vec::new()
        };
        let types: Vec<String> = if version >= 5 {
            req.types_filter
                .iter()
                .map(|s| s.as_str().to_ascii_lowercase())
                .collect()
        } else {
            Vec::new()
        };
        for handle in self.handles() {
            let g = handle.state.lock();
            if g.state == GroupState::Dead {
                continue;
            }
            let kind = match g.kind {
                GroupKind::Classic => "classic",
                GroupKind::Consumer => "consumer",
            };
            if !types.is_empty() && !types.iter().any(|t| t == kind) {
                continue;
            }
            let state = g.state_name();
            if !states.is_empty() && !states.contains(&state.to_ascii_lowercase()) {
                continue;
            }
            let mut listed = ListedGroup::default();
            listed.group_id = GroupId(str_bytes(&g.id));
            listed.protocol_type = match g.kind {
                GroupKind::Classic => str_bytes(g.protocol_type.as_deref().unwrap_or_default()),
                GroupKind::Consumer => StrBytes::from_static_str("consumer"),
            };
            if version >= 4 {
                listed.group_state = str_bytes(state);
            }
            if version >= 5 {
                listed.group_type = StrBytes::from_static_str(kind);
            }
            resp.groups.push(listed);
        }
        resp
    }

    pub fn describe_groups(
        self: &Arc<Self>,
        req: DescribeGroupsRequest,
        version: i16,
    ) -> DescribeGroupsResponse {
        let mut resp = DescribeGroupsResponse::default();
        for group_id in &req.groups {
            let mut out = DescribedGroup::default();
            out.group_id = group_id.clone();
            if version >= 3 && req.include_authorized_operations {
                out.authorized_operations = GROUP_AUTHORIZED_OPERATIONS;
            }
            let handle = self.get_group(group_id.as_str());
            let guard = handle.as_ref().map(|h| h.state.lock());
            let consumer_group = guard
                .as_ref()
                .is_some_and(|g| g.state != GroupState::Dead && g.kind == GroupKind::Consumer);
            match guard
                .as_ref()
                .filter(|g| g.state != GroupState::Dead && g.kind == GroupKind::Classic)
            {
                None if consumer_group => {
                    // Kafka describes only classic groups here; clients ask
                    // ConsumerGroupDescribe for the others.
                    out.group_state = StrBytes::from_static_str(GroupState::Dead.as_str());
                    if version >= 6 {
                        out.error_code = ErrorCode::GroupIdNotFound.code();
                        out.error_message = Some(StrBytes::from_string(format!(
                            "Group {} is not a classic group.",
                            group_id.as_str()
                        )));
                    }
                }
                None => {
                    out.group_state = StrBytes::from_static_str(GroupState::Dead.as_str());
                    // Before v6 Kafka answers an unknown group as Dead with
                    // no error; v6 (KIP-1043) says GROUP_ID_NOT_FOUND.
                    if version >= 6 {
                        out.error_code = ErrorCode::GroupIdNotFound.code();
                        out.error_message = Some(StrBytes::from_string(format!(
                            "Group {} not found.",
                            group_id.as_str()
                        )));
                    }
                }
                Some(g) => {
                    out.group_state = str_bytes(g.state.as_str());
                    out.protocol_type = str_bytes(g.protocol_type.as_deref().unwrap_or_default());
                    // Kafka shows the protocol, member metadata and
                    // assignments only for a Stable group.
                    let stable = g.state == GroupState::Stable;
                    let protocol = if stable {
                        g.protocol_name.clone().unwrap_or_default()
                    } else {
                        String::new()
                    };
                    out.protocol_data = str_bytes(&protocol);
                    out.members = g
                        .members
                        .values()
                        .map(|m| {
                            let mut d = DescribedGroupMember::default();
                            d.member_id = str_bytes(&m.id);
                            if version >= 4 {
                                d.group_instance_id = m.instance_id.as_deref().map(str_bytes);
                            }
                            d.client_id = str_bytes(&m.client_id);
                            d.client_host = str_bytes(&m.client_host);
                            if stable {
                                d.member_metadata = m.metadata(&protocol);
                                d.member_assignment = m.assignment.clone();
                            }
                            d
                        })
                        .collect();
                }
            }
            resp.groups.push(out);
        }
        resp
    }

    pub async fn delete_groups(
        self: &Arc<Self>,
        req: DeleteGroupsRequest,
        version: i16,
    ) -> DeleteGroupsResponse {
        let _ = version;
        let mut resp = DeleteGroupsResponse::default();
        let mut waits: Vec<(usize, i64)> = Vec::new();
        for group_id in &req.groups_names {
            let index = resp.results.len();
            let mut result = DeletableGroupResult::default();
            result.group_id = group_id.clone();
            let outcome = match self.get_group(group_id.as_str()) {
                None => Err(ErrorCode::GroupIdNotFound),
                Some(handle) => {
                    let r = self.delete_group(&handle);
                    if r.is_ok() {
                        self.forget(&handle);
                        handle.wake.notify_one();
                    }
                    r
                }
            };
            match outcome {
                Ok(Some(end_offset)) => waits.push((index, end_offset)),
                Ok(None) => {}
                Err(e) => result.error_code = e.code(),
            }
            resp.results.push(result);
        }
        for (index, end_offset) in waits {
            if let Err(e) = self.settle(end_offset).await {
                tracing::warn!(error = %e, "group deletion not durable");
                if let Some(r) = resp.results.get_mut(index) {
                    r.error_code = commit_error(&e).code();
                }
            }
        }
        resp
    }

    /// Kafka's DeleteGroups for one group: only an Empty group goes; its
    /// offsets get tombstones. Returns the end offset to wait for, if any.
    fn delete_group(self: &Arc<Self>, handle: &GroupHandle) -> Result<Option<i64>, ErrorCode> {
        let mut g = handle.state.lock();
        match g.state {
            GroupState::Dead => return Err(ErrorCode::GroupIdNotFound),
            GroupState::Stable
            | GroupState::PreparingRebalance
            | GroupState::CompletingRebalance => return Err(ErrorCode::NonEmptyGroup),
            GroupState::Empty if !g.consumer.is_empty() => return Err(ErrorCode::NonEmptyGroup),
            GroupState::Empty => {}
        }
        // Tombstones for every committed partition and for commits still on
        // their way to disk, so none of them comes back on replay.
        let mut keys: Vec<(String, i32)> = g.offsets.keys().cloned().collect();
        keys.extend(g.inflight.keys().cloned());
        keys.sort();
        keys.dedup();
        let end = self.write_tombstones(&g.id, &keys)?;
        tracing::info!(group = %g.id, partitions = keys.len(), "group deleted");
        g.state = GroupState::Dead;
        g.offsets.clear();
        Ok(end)
    }

    /// Tombstones in the offsets log for `group`'s committed offsets of
    /// `keys`; the end offset to wait for, None when there were none.
    fn write_tombstones(
        &self,
        group: &str,
        keys: &[(String, i32)],
    ) -> Result<Option<i64>, ErrorCode> {
        let mut end = None;
        for chunk in keys.chunks(TOMBSTONES_PER_BATCH) {
            let records: Vec<(Bytes, Option<Bytes>)> = chunk
                .iter()
                .map(|(topic, partition)| {
                    let key = OffsetKey {
                        group: group.to_owned(),
                        topic: topic.clone(),
                        partition: *partition,
                    };
                    (record::encode_key(&key), None)
                })
                .collect();
            let (_, end_offset) = self.append(&records).map_err(|e| {
                tracing::warn!(group, error = %e, "writing offset tombstones failed");
                commit_error(&e)
            })?;
            end = Some(end_offset);
        }
        Ok(end)
    }

    /// Kafka's OffsetDelete: forgets a group's committed offsets of some
    /// partitions. An Empty group loses all of them; a consumer group with
    /// members keeps those of topics a member subscribes to
    /// (GROUP_SUBSCRIBED_TO_TOPIC); another group with members refuses
    /// (NON_EMPTY_GROUP). `exists` tells a partition of a topic that
    /// exists (others: UNKNOWN_TOPIC_OR_PARTITION).
    pub async fn offset_delete(
        self: &Arc<Self>,
        req: OffsetDeleteRequest,
        exists: impl Fn(&str, i32) -> bool,
    ) -> OffsetDeleteResponse {
        let resp = OffsetDeleteResponse::default();
        let Some(handle) = self.get_group(req.group_id.as_str()) else {
            return resp.with_error_code(ErrorCode::GroupIdNotFound.code());
        };
        // Per partition asked for: its error, None when deleted (or had none).
        let mut codes: Vec<(String, i32, Option<ErrorCode>)> = Vec::new();
        // Offsets an open transaction committed count as the group's: the
        // group stays (and keeps what it knows of deletions) until it ends.
        let transacting = self.pending_txn.lock().has_group(req.group_id.as_str());
        let (end, gone) = {
            let mut g = handle.state.lock();
            let subscribed = match g.state {
                GroupState::Dead => return resp.with_error_code(ErrorCode::GroupIdNotFound.code()),
                GroupState::Empty if !g.consumer.is_empty() => Some(g.consumer.subscribed_topics()),
                GroupState::Empty => Some(Default::default()),
                _ if g.protocol_type.as_deref() == Some("consumer") => g.subscribed_topics(),
                _ => return resp.with_error_code(ErrorCode::NonEmptyGroup.code()),
            };
            let mut doomed = Vec::new();
            for topic in &req.topics {
                let name = topic.name.0.as_str();
                for p in &topic.partitions {
                    let i = p.partition_index;
                    let code = if !exists(name, i) {
                        Some(ErrorCode::UnknownTopicOrPartition)
                    } else if subscribed.as_ref().is_none_or(|s| s.contains(name)) {
                        Some(ErrorCode::GroupSubscribedToTopic)
                    } else {
                        let key = (name.to_owned(), i);
                        if g.offsets.contains_key(&key) || g.inflight.contains_key(&key) {
                            doomed.push(key);
                        }
                        None
                    };
                    codes.push((name.to_owned(), i, code));
                }
            }
            let end = match self.write_tombstones(&g.id, &doomed) {
                Ok(end) => end,
                Err(code) => return resp.with_error_code(code.code()),
            };
            if let Some(end) = end {
                g.forget_offsets(&doomed, end);
            }
            if !doomed.is_empty() {
                tracing::info!(group = %g.id, partitions = doomed.len(), "committed offsets deleted");
            }
            // An Empty group left with no offsets is gone, as on Kafka.
            let gone = !g.has_members()
                && !doomed.is_empty()
                && !transacting
                && g.offsets.is_empty()
                && g.inflight.is_empty();
            if gone {
                g.state = GroupState::Dead;
                tracing::info!(group = %g.id, "group removed: empty, with no offsets left");
            }
            (end, gone)
        };
        if gone {
            self.forget(&handle);
            handle.wake.notify_one();
        }
        if let Some(end) = end {
            if let Err(e) = self.settle(end).await {
                tracing::warn!(error = %e, "offset deletion not durable");
                return resp.with_error_code(commit_error(&e).code());
            }
        }
        let mut topics: Vec<OffsetDeleteResponseTopic> = Vec::new();
        for (name, index, code) in codes {
            let partition = OffsetDeleteResponsePartition::default()
                .with_partition_index(index)
                .with_error_code(code.map_or(0, ErrorCode::code));
            match topics.last_mut() {
                Some(t) if t.name.0.as_str() == name => t.partitions.push(partition),
                _ => topics.push(
                    OffsetDeleteResponseTopic::default()
                        .with_name(TopicName(StrBytes::from_string(name)))
                        .with_partitions(vec![partition]),
                ),
            }
        }
        resp.with_topics(topics)
    }
}

/// Answers of a broker that cannot serve a group request: it is not (or
/// not yet) the coordinator (cluster mode: NOT_COORDINATOR, or
/// COORDINATOR_LOAD_IN_PROGRESS while the offsets are replayed). Each one
/// encodes at every version the coordinator serves.
pub mod refuse {
    use kafka_protocol::messages::consumer_group_describe_response;
    use kafka_protocol::messages::delete_groups_response::DeletableGroupResult;
    use kafka_protocol::messages::describe_groups_response::DescribedGroup;
    use kafka_protocol::messages::offset_commit_response::{
        OffsetCommitResponsePartition, OffsetCommitResponseTopic,
    };
    use kafka_protocol::messages::offset_fetch_response::{
        OffsetFetchResponseGroup, OffsetFetchResponsePartition, OffsetFetchResponseTopic,
    };
    use kafka_protocol::messages::{
        ConsumerGroupDescribeRequest, ConsumerGroupDescribeResponse,
        ConsumerGroupHeartbeatResponse, DeleteGroupsRequest, DeleteGroupsResponse,
        DescribeGroupsRequest, DescribeGroupsResponse, HeartbeatResponse, JoinGroupRequest,
        JoinGroupResponse, LeaveGroupResponse, ListGroupsResponse, OffsetCommitRequest,
        OffsetCommitResponse, OffsetDeleteResponse, OffsetFetchRequest, OffsetFetchResponse,
        SyncGroupResponse,
    };
    use sluice_vocab::ErrorCode;

    use crate::group::{JoinResult, SyncResult};

    pub fn join_group(req: &JoinGroupRequest, version: i16, err: ErrorCode) -> JoinGroupResponse {
        super::join_response(JoinResult::error(req.member_id.as_str(), err), version)
    }

    pub fn sync_group(version: i16, err: ErrorCode) -> SyncGroupResponse {
        super::sync_response(SyncResult::error(err), version)
    }

    pub fn heartbeat(err: ErrorCode) -> HeartbeatResponse {
        HeartbeatResponse::default().with_error_code(err.code())
    }

    pub fn consumer_group_heartbeat(err: ErrorCode) -> ConsumerGroupHeartbeatResponse {
        ConsumerGroupHeartbeatResponse::default().with_error_code(err.code())
    }

    pub fn consumer_group_describe(
        req: &ConsumerGroupDescribeRequest,
        err: ErrorCode,
    ) -> ConsumerGroupDescribeResponse {
        ConsumerGroupDescribeResponse::default().with_groups(
            req.group_ids
                .iter()
                .map(|id| {
                    consumer_group_describe_response::DescribedGroup::default()
                        .with_group_id(id.clone())
                        .with_error_code(err.code())
                })
                .collect(),
        )
    }

    pub fn leave_group(err: ErrorCode) -> LeaveGroupResponse {
        LeaveGroupResponse::default().with_error_code(err.code())
    }

    pub fn list_groups(err: ErrorCode) -> ListGroupsResponse {
        ListGroupsResponse::default().with_error_code(err.code())
    }

    pub fn offset_commit(req: &OffsetCommitRequest, err: ErrorCode) -> OffsetCommitResponse {
        let topics = req
            .topics
            .iter()
            .map(|t| {
                let partitions = t
                    .partitions
                    .iter()
                    .map(|p| {
                        OffsetCommitResponsePartition::default()
                            .with_partition_index(p.partition_index)
                            .with_error_code(err.code())
                    })
                    .collect();
                OffsetCommitResponseTopic::default()
                    .with_name(t.name.clone())
                    .with_partitions(partitions)
            })
            .collect();
        OffsetCommitResponse::default().with_topics(topics)
    }

    pub fn offset_fetch(
        req: &OffsetFetchRequest,
        version: i16,
        err: ErrorCode,
    ) -> OffsetFetchResponse {
        if version >= 8 {
            let groups = req
                .groups
                .iter()
                .map(|g| {
                    OffsetFetchResponseGroup::default()
                        .with_group_id(g.group_id.clone())
                        .with_error_code(err.code())
                })
                .collect();
            return OffsetFetchResponse::default().with_groups(groups);
        }
        // v1 has no top-level error: every requested partition carries it.
        let topics = req
            .topics
            .iter()
            .flatten()
            .map(|t| {
                let partitions = t
                    .partition_indexes
                    .iter()
                    .map(|&p| {
                        OffsetFetchResponsePartition::default()
                            .with_partition_index(p)
                            .with_committed_offset(-1)
                            .with_metadata(Some(super::str_bytes("")))
                            .with_error_code(err.code())
                    })
                    .collect();
                OffsetFetchResponseTopic::default()
                    .with_name(t.name.clone())
                    .with_partitions(partitions)
            })
            .collect();
        let mut resp = OffsetFetchResponse::default().with_topics(topics);
        if version >= 2 {
            resp.error_code = err.code();
        }
        resp
    }

    pub fn describe_groups(req: &DescribeGroupsRequest, err: ErrorCode) -> DescribeGroupsResponse {
        let groups = req
            .groups
            .iter()
            .map(|g| {
                DescribedGroup::default()
                    .with_group_id(g.clone())
                    .with_error_code(err.code())
            })
            .collect();
        DescribeGroupsResponse::default().with_groups(groups)
    }

    pub fn offset_delete(err: ErrorCode) -> OffsetDeleteResponse {
        OffsetDeleteResponse::default().with_error_code(err.code())
    }

    pub fn delete_groups(req: &DeleteGroupsRequest, err: ErrorCode) -> DeleteGroupsResponse {
        let results = req
            .groups_names
            .iter()
            .map(|g| {
                DeletableGroupResult::default()
                    .with_group_id(g.clone())
                    .with_error_code(err.code())
            })
            .collect();
        DeleteGroupsResponse::default().with_results(results)
    }
}

/// Shapes a join outcome for one JoinGroup version.
fn join_response(r: JoinResult, version: i16) -> JoinGroupResponse {
    let mut resp = JoinGroupResponse::default();
    resp.error_code = r.error;
    resp.generation_id = r.generation_id;
    if version >= 7 {
        resp.protocol_type = r.protocol_type.as_deref().map(str_bytes);
        resp.protocol_name = r.protocol_name.as_deref().map(str_bytes);
    } else {
        // Not nullable before v7: Kafka sends "" for no protocol.
        resp.protocol_name = Some(str_bytes(r.protocol_name.as_deref().unwrap_or_default()));
    }
    resp.leader = str_bytes(&r.leader);
    resp.skip_assignment = version >= 9 && r.skip_assignment;
    resp.member_id = str_bytes(&r.member_id);
    resp.members = r
        .members
        .into_iter()
        .map(|(id, instance, metadata)| {
            let mut m = JoinGroupResponseMember::default();
            m.member_id = str_bytes(&id);
            if version >= 5 {
                m.group_instance_id = instance.as_deref().map(str_bytes);
            }
            m.metadata = metadata;
            m
        })
        .collect();
    resp
}

/// SyncGroup's answer at `version`: protocol type and name exist from v5.
fn sync_response(r: SyncResult, version: i16) -> SyncGroupResponse {
    let mut resp = SyncGroupResponse::default();
    resp.error_code = r.error;
    resp.assignment = r.assignment;
    if version >= 5 {
        resp.protocol_type = r.protocol_type.as_deref().map(str_bytes);
        resp.protocol_name = r.protocol_name.as_deref().map(str_bytes);
    }
    resp
}

/// A group's timer task: sleeps until the group's next deadline, fires what
/// is due, and ends when the group dies or the coordinator is dropped.
async fn run_timers(
    handle: Arc<GroupHandle>,
    coordinator: Weak<GroupCoordinator>,
    config: GroupConfig,
    mut shutdown: watch::Receiver<()>,
) {
    loop {
        let next = {
            let g = handle.state.lock();
            if g.state == GroupState::Dead {
                return;
            }
            g.next_deadline()
        };
        let sleep = async {
            match next {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sleep => {}
            _ = handle.wake.notified() => continue,
            _ = shutdown.changed() => return,
        }
        let forget = {
            let mut g = handle.state.lock();
            let idle = g.fire_timers(Instant::now(), &config);
            if idle {
                tracing::debug!(group = %g.id, "forgetting idle empty group");
                g.state = GroupState::Dead;
            }
            idle
        };
        if forget {
            if let Some(c) = coordinator.upgrade() {
                c.forget(&handle);
            }
            return;
        }
    }
}

/// Committed offsets by group, then by (topic, partition).
type OffsetsByGroup = HashMap<String, BTreeMap<(String, i32), Committed>>;

/// Rebuilds every group's committed offsets from the offsets log.
fn replay(
    partition: &Partition,
) -> Result<(OffsetsByGroup, txn_offsets::PendingTxnOffsets), GroupError> {
    const READ_BYTES: usize = 1 << 20;
    let mut groups = OffsetsByGroup::new();
    let mut pending = txn_offsets::PendingTxnOffsets::default();
    let mut position = partition.log_start_offset();
    let high_watermark = partition.high_watermark();
    let mut records = 0usize;
    while position < high_watermark {
        let read = partition.read(position, READ_BYTES, true, ReadLimit::HighWatermark)?;
        if read.records.is_empty() {
            break;
        }
        // Batches, not records, say where the next read starts: compaction
        // leaves batches with fewer records than offsets, or none.
        let mut next = position;
        let mut rest = &read.records[..];
        while let Some(h) = BatchHeader::parse(rest) {
            next = next.max(h.next_offset());
            rest = rest.get(h.size()..).unwrap_or_default();
        }
        let mut buf = read.records;
        let sets = RecordBatchDecoder::decode_all(&mut buf)
            .map_err(|e| GroupError::CorruptEntry(position, e.to_string()))?;
        for set in sets {
            for rec in set.records {
                if rec.offset < position {
                    // The head of a batch that starts before where we are.
                    continue;
                }
                if txn_offsets::replay_in_transaction(&rec, &mut groups, &mut pending)? {
                    continue;
                }
                if rec.control {
                    continue;
                }
                records += 1;
                apply_record(&mut groups, &rec)?;
            }
        }
        if next <= position {
            return Err(GroupError::CorruptEntry(
                position,
                "read made no progress".to_owned(),
            ));
        }
        position = next;
    }
    groups.retain(|_, offsets| !offsets.is_empty());
    tracing::debug!(records, groups = groups.len(), "offsets log replayed");
    Ok((groups, pending))
}

fn apply_record(groups: &mut OffsetsByGroup, rec: &Record) -> Result<(), GroupError> {
    let corrupt = |msg: String| GroupError::CorruptEntry(rec.offset, msg);
    let key = rec
        .key
        .as_ref()
        .ok_or_else(|| corrupt("record without a key".to_owned()))?;
    let Some(key) = record::decode_key(key).map_err(|e| corrupt(e.to_string()))? else {
        return Ok(());
    };
    let tp = (key.topic, key.partition);
    match &rec.value {
        None => {
            if let Some(offsets) = groups.get_mut(&key.group) {
                offsets.remove(&tp);
            }
        }
        Some(value) => {
            let v = record::decode_value(value).map_err(|e| corrupt(e.to_string()))?;
            groups
                .entry(key.group)
                .or_default()
                .insert(tp, committed(&v, rec.offset));
        }
    }
    Ok(())
}

#[cfg(test)]
mod response_encoding_tests {
    //! Every JoinGroup/SyncGroup answer the coordinator can build must encode
    //! at every version it serves: a field set outside its versions makes
    //! the codec refuse the response and the connection is closed.
    use super::*;
    use kafka_protocol::messages::ApiKey;
    use kafka_protocol::protocol::Encodable;

    fn join_results() -> Vec<JoinResult> {
        let leader = |skip: bool, ptype: Option<&str>, pname: Option<&str>| JoinResult {
            error: 0,
            member_id: "m-1".into(),
            generation_id: 3,
            protocol_type: ptype.map(str::to_owned),
            protocol_name: pname.map(str::to_owned),
            leader: "m-1".into(),
            skip_assignment: skip,
            members: vec![
                (
                    "m-1".into(),
                    Some("static-1".into()),
                    Bytes::from_static(b"meta"),
                ),
                ("m-2".into(), None, Bytes::new()),
            ],
        };
        let mut all = vec![
            leader(false, Some("consumer"), Some("range")),
            // A static leader rejoining with an unchanged protocol (v9+ skips assignment).
            leader(true, Some("consumer"), Some("range")),
            leader(false, None, None),
        ];
        for err in [
            ErrorCode::InvalidGroupId,
            ErrorCode::InvalidSessionTimeout,
            ErrorCode::UnknownMemberId,
            ErrorCode::MemberIdRequired,
            ErrorCode::CoordinatorNotAvailable,
            ErrorCode::InconsistentGroupProtocol,
            ErrorCode::FencedInstanceId,
            ErrorCode::RebalanceInProgress,
        ] {
            all.push(JoinResult::error("m-1", err));
        }
        all
    }

    #[test]
    fn join_responses_encode_at_every_version() {
        let served = ApiKey::JoinGroup.valid_versions();
        for version in served.min..=served.max {
            for r in join_results() {
                let what = format!("{r:?}");
                let resp = join_response(r, version);
                let mut buf = bytes::BytesMut::new();
                resp.encode(&mut buf, version)
                    .unwrap_or_else(|e| panic!("JoinGroup v{version} {what}: {e}"));
                if version < 9 {
                    assert!(!resp.skip_assignment, "v{version} {what}");
                }
                if version < 7 {
                    assert!(resp.protocol_name.is_some(), "not nullable before v7");
                }
            }
        }
    }

    #[test]
    fn sync_responses_encode_at_every_version() {
        let served = ApiKey::SyncGroup.valid_versions();
        let ok = || SyncResult {
            error: 0,
            protocol_type: Some("consumer".into()),
            protocol_name: Some("range".into()),
            assignment: Bytes::from_static(b"assignment"),
        };
        for version in served.min..=served.max {
            let results = [
                ok(),
                SyncResult::error(ErrorCode::RebalanceInProgress),
                SyncResult::error(ErrorCode::UnknownMemberId),
                SyncResult::error(ErrorCode::IllegalGeneration),
                SyncResult::error(ErrorCode::InconsistentGroupProtocol),
            ];
            for r in results {
                let resp = sync_response(r, version);
                let mut buf = bytes::BytesMut::new();
                resp.encode(&mut buf, version)
                    .unwrap_or_else(|e| panic!("SyncGroup v{version}: {e}"));
                if version < 5 {
                    assert!(resp.protocol_type.is_none() && resp.protocol_name.is_none());
                }
            }
        }
    }
}

#[cfg(test)]
mod refuse_tests {
    //! Refusals must encode at every version served, or the front end would
    //! close the connection instead of answering NOT_COORDINATOR.
    use super::*;
    use kafka_protocol::messages::offset_fetch_request::{
        OffsetFetchRequestGroup, OffsetFetchRequestTopic, OffsetFetchRequestTopics,
    };
    use kafka_protocol::messages::ApiKey;
    use kafka_protocol::protocol::Encodable;

    fn encodes<R: Encodable>(resp: &R, api: ApiKey, version: i16) {
        let mut buf = bytes::BytesMut::new();
        resp.encode(&mut buf, version)
            .unwrap_or_else(|e| panic!("{api:?} v{version}: {e}"));
    }

    fn range(api: ApiKey) -> std::ops::RangeInclusive<i16> {
        let (_, min, max) = SUPPORTED_VERSIONS
            .iter()
            .copied()
            .find(|(k, _, _)| *k == api as i16)
            .expect("served api");
        min..=max
    }

    #[test]
    fn refusals_encode_at_every_version() {
        let err = ErrorCode::NotCoordinator;
        let join = JoinGroupRequest::default().with_member_id(str_bytes("m-1"));
        for v in range(ApiKey::JoinGroup) {
            let resp = refuse::join_group(&join, v, err);
            assert_eq!(resp.error_code, err.code());
            encodes(&resp, ApiKey::JoinGroup, v);
        }
        for v in range(ApiKey::SyncGroup) {
            encodes(&refuse::sync_group(v, err), ApiKey::SyncGroup, v);
        }
        for v in range(ApiKey::Heartbeat) {
            encodes(&refuse::heartbeat(err), ApiKey::Heartbeat, v);
        }
        for v in range(ApiKey::LeaveGroup) {
            encodes(&refuse::leave_group(err), ApiKey::LeaveGroup, v);
        }
        for v in range(ApiKey::ListGroups) {
            encodes(&refuse::list_groups(err), ApiKey::ListGroups, v);
        }
        let commit = OffsetCommitRequest::default().with_topics(vec![
            kafka_protocol::messages::offset_commit_request::OffsetCommitRequestTopic::default()
                .with_name(TopicName(str_bytes("t")))
                .with_partitions(vec![Default::default()]),
        ]);
        for v in range(ApiKey::OffsetCommit) {
            encodes(
                &refuse::offset_commit(&commit, err),
                ApiKey::OffsetCommit,
                v,
            );
        }
        let fetch = OffsetFetchRequest::default()
            .with_topics(Some(vec![OffsetFetchRequestTopic::default()
                .with_name(TopicName(str_bytes("t")))
                .with_partition_indexes(vec![0, 1])]))
            .with_groups(vec![OffsetFetchRequestGroup::default()
                .with_group_id(GroupId(str_bytes("g")))
                .with_topics(Some(vec![OffsetFetchRequestTopics::default()]))]);
        for v in range(ApiKey::OffsetFetch) {
            let resp = refuse::offset_fetch(&fetch, v, err);
            encodes(&resp, ApiKey::OffsetFetch, v);
            if v >= 8 {
                assert_eq!(resp.groups[0].error_code, err.code());
            } else {
                assert_eq!(resp.topics[0].partitions[1].error_code, err.code());
            }
        }
        let describe = DescribeGroupsRequest::default().with_groups(vec![GroupId(str_bytes("g"))]);
        for v in range(ApiKey::DescribeGroups) {
            encodes(
                &refuse::describe_groups(&describe, err),
                ApiKey::DescribeGroups,
                v,
            );
        }
        let delete =
            DeleteGroupsRequest::default().with_groups_names(vec![GroupId(str_bytes("g"))]);
        for v in range(ApiKey::DeleteGroups) {
            encodes(
                &refuse::delete_groups(&delete, err),
                ApiKey::DeleteGroups,
                v,
            );
        }
    }
}

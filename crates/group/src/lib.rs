//! Kafka's classic consumer-group protocol: membership, rebalances and
//! committed offsets, the latter kept durably in the `__consumer_offsets`
//! topic of a Sluice [`Store`] and replayed on start.
//!
//! API CONTRACT — the Kafka front end is written against the signatures
//! below. Bodies marked `unimplemented!` are being filled in.

use std::sync::Arc;

use kafka_protocol::messages::{
    DeleteGroupsRequest, DeleteGroupsResponse, DescribeGroupsRequest, DescribeGroupsResponse,
    HeartbeatRequest, HeartbeatResponse, JoinGroupRequest, JoinGroupResponse, LeaveGroupRequest,
    LeaveGroupResponse, ListGroupsRequest, ListGroupsResponse, OffsetCommitRequest,
    OffsetCommitResponse, OffsetFetchRequest, OffsetFetchResponse, SyncGroupRequest,
    SyncGroupResponse,
};
use sluice_log::{LogError, Store};

/// Name of the internal topic that holds committed offsets.
pub const OFFSETS_TOPIC: &str = "__consumer_offsets";

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
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            min_session_timeout_ms: 6_000,
            max_session_timeout_ms: 1_800_000,
            initial_rebalance_delay_ms: 3_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("corrupt offsets log entry at offset {0}: {1}")]
    CorruptEntry(i64, String),
}

/// Coordinates every group of this broker.
pub struct GroupCoordinator {
    _private: (),
}

impl GroupCoordinator {
    /// Creates the offsets topic if missing and replays it.
    /// Must be called inside a Tokio runtime (session timers are spawned on it).
    pub fn open(store: Arc<Store>, config: GroupConfig) -> Result<Arc<Self>, GroupError> {
        let _ = (store, config);
        unimplemented!()
    }

    /// Resolves when the join phase of the rebalance completes (or at once for errors).
    pub async fn join_group(self: &Arc<Self>, req: JoinGroupRequest, version: i16) -> JoinGroupResponse {
        let _ = (req, version);
        unimplemented!()
    }

    /// Followers wait here until the leader's SyncGroup delivers assignments.
    pub async fn sync_group(self: &Arc<Self>, req: SyncGroupRequest, version: i16) -> SyncGroupResponse {
        let _ = (req, version);
        unimplemented!()
    }

    pub async fn heartbeat(self: &Arc<Self>, req: HeartbeatRequest, version: i16) -> HeartbeatResponse {
        let _ = (req, version);
        unimplemented!()
    }

    pub async fn leave_group(self: &Arc<Self>, req: LeaveGroupRequest, version: i16) -> LeaveGroupResponse {
        let _ = (req, version);
        unimplemented!()
    }

    /// Answers after the commit is durable in the offsets topic.
    pub async fn offset_commit(self: &Arc<Self>, req: OffsetCommitRequest, version: i16) -> OffsetCommitResponse {
        let _ = (req, version);
        unimplemented!()
    }

    pub async fn offset_fetch(self: &Arc<Self>, req: OffsetFetchRequest, version: i16) -> OffsetFetchResponse {
        let _ = (req, version);
        unimplemented!()
    }

    pub fn list_groups(self: &Arc<Self>, req: ListGroupsRequest, version: i16) -> ListGroupsResponse {
        let _ = (req, version);
        unimplemented!()
    }

    pub fn describe_groups(self: &Arc<Self>, req: DescribeGroupsRequest, version: i16) -> DescribeGroupsResponse {
        let _ = (req, version);
        unimplemented!()
    }

    pub async fn delete_groups(self: &Arc<Self>, req: DeleteGroupsRequest, version: i16) -> DeleteGroupsResponse {
        let _ = (req, version);
        unimplemented!()
    }
}

//! `sluice-topology`: the one seam between the protocol front ends (the Kafka
//! listener; later AMQP, transactions, stream jobs) and the shape of the deployment.
//!
//! A front end is written once against [`Topology`]: the metadata image it answers
//! Metadata from, proposals to the metadata quorum, the [`Leadership`] of a
//! partition it may append to or read from, and the leader side of replication. The
//! shape — one node or many — is chosen once, when the node starts
//! (`sluice-node`): a single node *is* a cluster of one voter, so there is no second
//! implementation and no mode to branch on.
//!
//! *Architecture invariant:* this crate does not depend on its implementation (the
//! replication layer, the node); front ends depend on this crate only.
//!
//! *Architecture invariant:* a [`Leadership`] appends only while its term lasts, stamps
//! every batch with its leader epoch, and answers a commit wait with success only while
//! its term lasts: a write acknowledged through it is covered by the high watermark the
//! replication layer raised during that leadership.

mod leadership;
mod replication;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use sluice_log::Store;
use sluice_vocab::{ErrorCode, Refused};
use tokio::sync::watch;
use tokio::time::Instant;

pub use leadership::{AppendError, Leadership, Term};
pub use replication::{EpochAnswer, FetchAnswer, FetchArgs};
pub use sluice_cluster::{access, amqp, quotas};
pub use sluice_cluster::{
    BrokerId, BrokerState, Command, CommandOutput, MetadataImage, PartitionState, StaleView,
    TopicState, NO_LEADER,
};

/// What a front end needs from the node it runs on. Errors are Kafka codes
/// ([`ErrorCode`]) or refusals with a message ([`Refused`]).
pub trait Topology: Send + Sync + 'static {
    /// This node's broker id.
    fn node_id(&self) -> BrokerId;

    /// The local storage engine (topic config defaults, local replicas).
    fn store(&self) -> &Arc<Store>;

    /// The latest metadata image this node has acted on: its local replicas of the
    /// image's partitions exist and play the roles the image gives them.
    fn image(&self) -> Arc<MetadataImage>;

    /// Changes whenever [`Topology::image`] does.
    fn watch_image(&self) -> watch::Receiver<Arc<MetadataImage>>;

    /// The controller (the metadata quorum's leader), if known.
    fn controller_id(&self) -> Option<BrokerId>;

    /// Why this node's view may be stale, if it may (see
    /// `sluice_cluster::ClusterNode::stale_view`). Such a node leads nothing.
    fn stale_view(&self) -> Option<StaleView>;

    /// Waits (bounded) until the local image holds every change the controller had
    /// committed when called, and returns that read index; `None` when the controller
    /// could not be asked in time.
    fn catch_up(&self) -> BoxFuture<'_, Option<u64>>;

    /// Proposes a metadata change and waits until it is committed and applied.
    fn propose(&self, cmd: Command) -> BoxFuture<'_, Result<CommandOutput, Refused>>;

    /// A fresh producer id (idempotent producers), from blocks the quorum hands out.
    fn next_producer_id(&self) -> BoxFuture<'_, Result<i64, Refused>>;

    /// The leadership a produce appends under: this node leads the partition and its
    /// view is current; with `acks_all`, the ISR also holds `min.insync.replicas`
    /// (NOT_ENOUGH_REPLICAS before anything is appended).
    fn lead_for_produce(
        &self,
        topic: &str,
        partition: i32,
        acks_all: bool,
    ) -> Result<Leadership, ErrorCode>;

    /// The leadership a leader-only read (consumer fetch, ListOffsets,
    /// OffsetForLeaderEpoch, DeleteRecords) goes through; a `current_leader_epoch` of
    /// 0 or more must be the leader's (FENCED_LEADER_EPOCH when older,
    /// UNKNOWN_LEADER_EPOCH when newer).
    fn lead_for_read(
        &self,
        topic: &str,
        partition: i32,
        current_leader_epoch: i32,
    ) -> Result<Leadership, ErrorCode>;

    /// The leadership this node holds of a partition right now, if any (what a
    /// coordinator placed on a partition's leader follows).
    fn leadership(&self, topic: &str, partition: i32) -> Option<Leadership>;

    /// Fires whenever this node's partition roles change.
    fn watch_roles(&self) -> watch::Receiver<u64>;

    /// Kafka's low watermark of a partition this node leads: the smallest log start
    /// offset among the leader and its in-sync followers.
    fn low_watermark(&self, topic: &str, partition: i32) -> Result<i64, ErrorCode>;

    /// The leader side of a follower's fetch (the one implementation every transport
    /// reaches): records the follower's progress, holds the request up to
    /// `args.max_wait` while there is nothing new, then reads up to the log end.
    fn follower_fetch<'a>(
        &'a self,
        replica_id: BrokerId,
        args: &'a FetchArgs,
    ) -> BoxFuture<'a, FetchAnswer>;

    /// The leader side of OffsetForLeaderEpoch: the end offset of `leader_epoch` (or
    /// of the largest smaller epoch) on this leader.
    fn end_offset_for_epoch(
        &self,
        topic: &str,
        partition: i32,
        current_leader_epoch: i32,
        leader_epoch: i32,
    ) -> EpochAnswer;
}

/// Waits until `done` holds for `topology`'s image, at most `limit`; whether it held.
/// A front end calls this after a proposal, so that a client acting on the answer
/// finds the change on this node.
pub async fn wait_image(
    topology: &dyn Topology,
    limit: Duration,
    done: impl Fn(&MetadataImage) -> bool,
) -> bool {
    let deadline = Instant::now() + limit;
    let mut changes = topology.watch_image();
    loop {
        if done(&topology.image()) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        let _ = tokio::time::timeout_at(deadline, changes.changed()).await;
    }
}

//! `sluice-replica`: partition replication for cluster mode — Kafka's ISR protocol, driven
//! by the Raft metadata image of `sluice-cluster`.
//!
//! The metadata quorum ([`ClusterNode`]) decides *who* leads each partition, with which
//! `leader_epoch`, and which replicas are in sync (ISR). This crate does the data side:
//! a [`ReplicaManager`] per broker watches the image, opens the local logs of the
//! partitions this broker replicates, and plays the role the image gives it — leader,
//! follower, or nothing (offline partition).
//!
//! # Roles
//!
//! - **Image watcher.** On every applied image, for each partition whose replicas include
//!   this node: `Store::ensure_topic` (exact topic id, partition count, configs),
//!   `Partition::set_replicated(true)`, then the role: `Leader{epoch}` when the image
//!   names this node leader, `Follower{leader, epoch}` when another broker leads, none
//!   when the partition is offline. Local topics absent from the image are deleted once
//!   the image is trustworthy (this broker registered and unfenced in it). Every role
//!   change bumps [`ReplicaManager::watch_roles`]. A role is always *stopped* (leader
//!   state deactivated, follower fetcher aborted and joined) before the next one starts,
//!   so a partition never has a follower fetcher and a leader at the same time.
//! - **Leader.** Keeps, per follower, its fetch offset and the last time it was caught
//!   up; raises the high watermark; shrinks and expands the ISR through
//!   `Command::AlterPartition` (one proposal in flight per partition; a rejection or an
//!   unknown outcome is resolved by re-reading the image).
//! - **Follower.** One fetcher task per partition: resolve the leader's replica address
//!   from the image, truncate by OffsetForLeaderEpoch, then loop Fetch → `append_replica`
//!   → `wait_durable` → `advance_high_watermark`. Reconnects with backoff; stops on a
//!   role change. The network side is the [`LeaderConnector`] / [`LeaderTransport`]
//!   traits: [`TcpConnector`] speaks the Kafka protocol to the leader's Kafka listener
//!   (production), [`InProcessConnector`] calls the leader's [`ReplicaManager`] directly
//!   (tests, and any in-process use).
//!
//! # Invariants
//!
//! - *Follower fetch offset = durable end.* A follower appends what it fetched, waits
//!   until it is durable (fsync under `FlushPolicy::Always`), and only then sends the
//!   next fetch, whose offset is its log end. So the offset a leader records for a
//!   follower is data that survives the follower's crash.
//! - *HW rule.* On the leader, `HW = min(own durable end, fetch offset of every member
//!   of the maximal ISR other than itself)`. A member that has not fetched since this
//!   leadership began holds the HW where it is (until it is shrunk out). With ISR =
//!   {leader} the HW follows the durable end (the leader watches `watch_durable_end`).
//!   The HW never moves backwards (`advance_high_watermark`). On a follower,
//!   `HW = min(leader's HW, own durable end)`.
//! - *Maximal ISR (KIP-497).* The ISR used for the HW is the image's ISR plus the
//!   members of an in-flight expansion. A shrink counts only once committed (the
//!   shrunk-out replica keeps holding the HW until then), so the HW never covers data
//!   some member of the committed ISR lacks — any replica the controller may elect has
//!   every record below the HW.
//! - *ISR changes.* A member whose last caught-up time (fetch offset ≥ the leader's log
//!   end at that fetch or at its previous fetch, as in Kafka) is older than
//!   `replica_lag_max` is shrunk out. A replica is added back once its fetch offset is
//!   ≥ the HW and ≥ the start offset of the leader's current epoch (it holds everything
//!   the leader had when it was elected). Proposals carry the leader epoch and partition
//!   epoch the leader knows; the state machine rejects stale ones.
//! - *Fencing by epoch.* Produce and consumer reads are accepted only while this
//!   node's *current image* says it leads with the epoch of its leader state
//!   ([`ReplicaManager::leader_for_produce`]). Followers send their image's
//!   `current_leader_epoch`; a leader answers FENCED_LEADER_EPOCH when the
//!   follower's epoch is older and UNKNOWN_LEADER_EPOCH when newer, so a paused
//!   (zombie) old leader gets no fetches from the new ISR, never raises its HW past what
//!   the committed ISR has, and never answers acks=all. [`ReplicaManager::wait_replicated`]
//!   answers success only while the leader state it was issued under is still active.
//! - *Truncation.* A new follower asks the leader for the end of its latest epoch; if
//!   the leader answers an older epoch it uses its own end of that epoch; it truncates
//!   to the minimum of that and its log end. A fetch answered OFFSET_OUT_OF_RANGE below
//!   the leader's log start empties the log and restarts at the leader's log start.
//!
//! # Errors
//!
//! The API the Kafka front end calls answers Kafka error codes
//! ([`sluice_vocab::ErrorCode`]).

mod follower;
mod leader;
mod manager;
mod metrics;
mod tcp;
mod transport;

pub use manager::ReplicaManager;
pub use metrics::{replica_metrics, ReplicaMetrics};
pub use tcp::TcpConnector;
pub use transport::{
    EpochAnswer, FetchAnswer, FetchArgs, InProcessConnector, LeaderConnector, LeaderTransport,
    TransportError,
};

use std::time::Duration;

use sluice_cluster::BrokerId;

#[doc(no_inline)]
pub use sluice_cluster::ClusterNode;

/// Settings of a [`ReplicaManager`]. [`ReplicaConfig::new`] fills Kafka's defaults.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// This broker's id (the cluster node id).
    pub node_id: BrokerId,
    /// `replica.lag.time.max.ms`: an ISR member not caught up for longer is shrunk out.
    pub replica_lag_max: Duration,
    /// `replica.fetch.wait.max.ms`: how long a leader may hold a follower's fetch.
    pub fetch_max_wait: Duration,
    /// `replica.fetch.max.bytes`: bytes asked for per partition and fetch.
    pub fetch_max_bytes: usize,
}

impl ReplicaConfig {
    /// Kafka's defaults: lag 5 s, fetch wait 500 ms, 1 MiB per fetch.
    pub fn new(node_id: BrokerId) -> ReplicaConfig {
        ReplicaConfig {
            node_id,
            replica_lag_max: Duration::from_secs(5),
            fetch_max_wait: Duration::from_millis(500),
            fetch_max_bytes: 1 << 20,
        }
    }
}

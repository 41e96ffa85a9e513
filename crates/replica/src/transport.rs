//! How a follower talks to its leader: [`LeaderConnector`] opens a [`LeaderTransport`]
//! (one per fetcher session), whose calls mirror the two Kafka requests a follower
//! needs (Fetch and OffsetForLeaderEpoch) plus ListOffsets(earliest).
//!
//! [`crate::TcpConnector`] is the production implementation; [`InProcessConnector`]
//! calls the leader's [`ReplicaManager`] in the same process.

use futures::future::BoxFuture;
use parking_lot::RwLock;
use sluice_cluster::BrokerId;
use sluice_vocab::ErrorCode;
use std::collections::HashMap;
use std::sync::{Arc, Weak};

use crate::ReplicaManager;

pub use sluice_topology::{EpochAnswer, FetchAnswer, FetchArgs};

/// Failures below the Kafka protocol (connect, I/O, framing, decoding).
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The leader could not be reached.
    #[error("cannot reach leader {leader} at {addr}: {reason}")]
    Connect {
        leader: BrokerId,
        addr: String,
        reason: String,
    },
    /// The connection failed or timed out.
    #[error("connection to the leader failed: {0}")]
    Io(String),
    /// The leader answered something this client cannot use.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// Opens sessions to partition leaders.
pub trait LeaderConnector: Send + Sync + 'static {
    /// Connects to broker `leader`, reachable at `addr` (its replica address from the
    /// image).
    fn connect<'a>(
        &'a self,
        leader: BrokerId,
        addr: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn LeaderTransport>, TransportError>>;
}

/// One follower's session with its leader.
pub trait LeaderTransport: Send {
    /// Kafka Fetch (replica_id = the follower's id) for one partition.
    fn fetch<'a>(
        &'a mut self,
        args: &'a FetchArgs,
    ) -> BoxFuture<'a, Result<FetchAnswer, TransportError>>;

    /// Kafka OffsetForLeaderEpoch for one partition: the end offset of `leader_epoch`
    /// (or of the largest smaller epoch) on the leader.
    fn end_offset_for_epoch<'a>(
        &'a mut self,
        topic: &'a str,
        partition: i32,
        current_leader_epoch: i32,
        leader_epoch: i32,
    ) -> BoxFuture<'a, Result<EpochAnswer, TransportError>>;

    /// Kafka ListOffsets(earliest): the leader's log start offset, or why it refused.
    fn log_start_offset<'a>(
        &'a mut self,
        topic: &'a str,
        partition: i32,
        current_leader_epoch: i32,
    ) -> BoxFuture<'a, Result<Result<i64, ErrorCode>, TransportError>>;
}

/// Connects followers to [`ReplicaManager`]s of the same process, by broker id. The
/// leader side runs exactly the code the Kafka front end runs for a follower fetch
/// ([`ReplicaManager::answer_follower_fetch`],
/// [`ReplicaManager::answer_end_offset_for_epoch`]).
#[derive(Default)]
pub struct InProcessConnector {
    managers: RwLock<HashMap<BrokerId, Weak<ReplicaManager>>>,
    /// Brokers whose sessions fail as if unreachable (tests: a partitioned follower).
    cut: RwLock<Vec<BrokerId>>,
}

impl InProcessConnector {
    pub fn new() -> Arc<InProcessConnector> {
        Arc::new(InProcessConnector::default())
    }

    /// Makes `manager` reachable under its broker id (replacing an earlier one).
    pub fn register(&self, manager: &Arc<ReplicaManager>) {
        self.managers
            .write()
            .insert(manager.node_id(), Arc::downgrade(manager));
    }

    /// Cuts (`true`) or heals the link of broker `id` in both directions: its fetches
    /// fail and fetches to it fail.
    pub fn set_cut(&self, id: BrokerId, cut: bool) {
        let mut c = self.cut.write();
        c.retain(|b| *b != id);
        if cut {
            c.push(id);
        }
    }

    /// The connector broker `id`'s fetchers use (pass it to
    /// [`ReplicaManager::start_with`]).
    pub fn for_node(self: &Arc<Self>, id: BrokerId) -> Arc<dyn LeaderConnector> {
        Arc::new(InProcessHandle {
            connector: self.clone(),
            from: id,
        })
    }

    fn is_cut(&self, a: BrokerId, b: BrokerId) -> bool {
        let c = self.cut.read();
        c.contains(&a) || c.contains(&b)
    }

    fn resolve(&self, leader: BrokerId) -> Option<Arc<ReplicaManager>> {
        self.managers.read().get(&leader).and_then(Weak::upgrade)
    }
}

/// A session created by [`InProcessConnector`]: `from` fetches from `leader`.
struct InProcessTransport {
    connector: Arc<InProcessConnector>,
    from: BrokerId,
    leader: BrokerId,
}

impl InProcessTransport {
    fn target(&self) -> Result<Arc<ReplicaManager>, TransportError> {
        if self.connector.is_cut(self.from, self.leader) {
            return Err(TransportError::Io(format!(
                "link {} -> {} is cut",
                self.from, self.leader
            )));
        }
        self.connector
            .resolve(self.leader)
            .filter(|m| !m.is_stopped())
            .ok_or_else(|| TransportError::Io(format!("broker {} is gone", self.leader)))
    }
}

/// [`InProcessConnector`] as seen by one follower broker.
struct InProcessHandle {
    connector: Arc<InProcessConnector>,
    from: BrokerId,
}

impl LeaderConnector for InProcessHandle {
    fn connect<'a>(
        &'a self,
        leader: BrokerId,
        addr: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn LeaderTransport>, TransportError>> {
        Box::pin(async move {
            let t = InProcessTransport {
                connector: self.connector.clone(),
                from: self.from,
                leader,
            };
            t.target().map_err(|e| TransportError::Connect {
                leader,
                addr: addr.to_string(),
                reason: e.to_string(),
            })?;
            Ok(Box::new(t) as Box<dyn LeaderTransport>)
        })
    }
}

impl LeaderTransport for InProcessTransport {
    fn fetch<'a>(
        &'a mut self,
        args: &'a FetchArgs,
    ) -> BoxFuture<'a, Result<FetchAnswer, TransportError>> {
        Box::pin(async move {
            let m = self.target()?;
            let answer = m.answer_follower_fetch(self.from, args).await;
            // A link cut while the request was held loses the answer.
            self.target()?;
            Ok(answer)
        })
    }

    fn end_offset_for_epoch<'a>(
        &'a mut self,
        topic: &'a str,
        partition: i32,
        current_leader_epoch: i32,
        leader_epoch: i32,
    ) -> BoxFuture<'a, Result<EpochAnswer, TransportError>> {
        Box::pin(async move {
            let m = self.target()?;
            Ok(m.answer_end_offset_for_epoch(topic, partition, current_leader_epoch, leader_epoch))
        })
    }

    fn log_start_offset<'a>(
        &'a mut self,
        topic: &'a str,
        partition: i32,
        current_leader_epoch: i32,
    ) -> BoxFuture<'a, Result<Result<i64, ErrorCode>, TransportError>> {
        Box::pin(async move {
            let m = self.target()?;
            Ok(m.leader_for_read(topic, partition, current_leader_epoch)
                .map(|lead| lead.partition().log_start_offset()))
        })
    }
}

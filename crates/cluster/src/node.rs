//! [`ClusterNode`]: one member of the metadata quorum, with its Raft server, the broker
//! heartbeat sender and the controller duties it performs while it is the Raft leader.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, ChangeMembers, Raft, ServerState, SnapshotPolicy};
use sluice_vocab::{ErrorCode, KafkaError};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::image::{
    AdoptedTopic, BrokerId, Command, CommandResult, InternalTopic, InternalTopicPlan, MetadataImage,
};
use crate::network::{
    read_frame, write_frame, BrokerHeartbeat, ClusterIdentity, Envelope, ForwardError,
    HeartbeatReply, LogThrottle, Request, Response, RpcClient, RpcError, TcpNetwork,
    DEFAULT_MAX_FRAME,
};
use crate::store::{self, StateMachineStore};
use crate::{NodeId, TypeConfig};

/// Everything a node needs to start. [`ClusterConfig::new`] fills the defaults.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Kafka broker id, also the Raft node id. A node listed in `peers` is a voter of
    /// the metadata quorum; any other node is a broker that joins the running cluster
    /// as a non-voting member (a Raft learner, KRaft's "broker-only" node) and needs
    /// `raft_advertised`.
    pub node_id: BrokerId,
    /// Address the Raft/inter-node listener binds (default port 9093); `None` for a
    /// node that is the only voter and talks to nobody (a single node).
    pub raft_listen: Option<SocketAddr>,
    /// Address peers reach this node at; defaults to this node's entry in `peers`
    /// (required for a node that is not one of them).
    pub raft_advertised: Option<String>,
    /// Advertised Kafka host.
    pub kafka_host: String,
    /// Advertised Kafka port.
    pub kafka_port: u16,
    /// Where peers reach this node's Kafka listener to replicate; defaults to the
    /// host of this node's Raft address with `kafka_port`.
    pub replica_addr: Option<String>,
    /// Named protocol endpoints other nodes reach this node at (name → `host:port`),
    /// registered in the image as [`crate::BrokerState::endpoints`]. The names are
    /// free-form; `"amqp"` is the AMQP listener other nodes forward queue operations
    /// to. Empty by default.
    pub endpoints: BTreeMap<String, String>,
    /// The voters of the metadata quorum: `(node id, raft address)`. Fixed for the
    /// life of the cluster; brokers beyond them join as learners.
    pub peers: Vec<(BrokerId, String)>,
    /// The node's data directory; Raft state lives in `data_dir/raft/`.
    pub data_dir: PathBuf,
    /// How often this broker heartbeats the controller.
    pub heartbeat_interval: Duration,
    /// Silence after which the controller fences a broker.
    pub session_timeout: Duration,
    /// Raft leader heartbeat (AppendEntries) interval.
    pub raft_heartbeat_interval: Duration,
    /// Raft election timeout range (a follower that hears no leader for a random time in
    /// this range becomes a candidate).
    pub election_timeout_min: Duration,
    pub election_timeout_max: Duration,
    /// A snapshot is taken every this many applied entries, and older log is purged.
    pub snapshot_every: u64,
    /// Entries kept below a snapshot, so a briefly lagging follower needs no snapshot.
    pub keep_below_snapshot: u64,
    /// How long `propose` keeps looking for a controller.
    pub propose_timeout: Duration,
    /// Largest inter-node frame accepted.
    pub max_frame: u32,
    /// Topics the controller creates and keeps at `internal_replication_factor`
    /// replicas per partition (see [`MetadataImage::internal_topic_plan`]).
    pub internal_topics: Vec<InternalTopic>,
    /// Replicas of each internal topic partition: default min(3, voters).
    pub internal_replication_factor: usize,
    /// The cluster's id (Kafka's `cluster.id`), the same on every node: the first
    /// controller sets it, and this node's inter-node requests carry it from the
    /// first one on (see [`crate::network::Envelope`]). `None`: the first controller
    /// sets `initial_cluster_id`, and the node identifies with the id once it has
    /// learnt it from the metadata log.
    pub cluster_id: Option<String>,
    /// The id the first controller sets when `cluster_id` is unset (a single node
    /// passes its data directory's, which it keeps); `None`: a random one.
    pub initial_cluster_id: Option<String>,
    /// A single node's local state from before its metadata lived in the quorum:
    /// adopted once by this node's first leadership, before anything else is created
    /// (see [`Command::AdoptLocalState`]).
    pub adopt_local_state: Option<LocalState>,
}

/// What [`Command::AdoptLocalState`] adopts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalState {
    pub topics: Vec<AdoptedTopic>,
    /// Producer ids below this were handed out already.
    pub producer_ids_from: i64,
}

impl ClusterConfig {
    /// A config with the defaults: heartbeats every 500 ms, session timeout 6 s, Raft
    /// heartbeat 150 ms, election timeout 1–2 s.
    pub fn new(
        node_id: BrokerId,
        data_dir: impl Into<PathBuf>,
        peers: Vec<(BrokerId, String)>,
    ) -> Self {
        ClusterConfig {
            node_id,
            raft_listen: Some(SocketAddr::from(([0, 0, 0, 0], 9093))),
            raft_advertised: None,
            kafka_host: "localhost".to_string(),
            kafka_port: 9092,
            replica_addr: None,
            endpoints: BTreeMap::new(),
            data_dir: data_dir.into(),
            heartbeat_interval: Duration::from_millis(500),
            session_timeout: Duration::from_secs(6),
            raft_heartbeat_interval: Duration::from_millis(150),
            election_timeout_min: Duration::from_millis(1000),
            election_timeout_max: Duration::from_millis(2000),
            snapshot_every: 1000,
            keep_below_snapshot: 200,
            propose_timeout: Duration::from_secs(10),
            max_frame: DEFAULT_MAX_FRAME,
            internal_replication_factor: peers.len().clamp(1, 3),
            internal_topics: Vec::new(),
            cluster_id: None,
            initial_cluster_id: None,
            adopt_local_state: None,
            peers,
        }
    }

    /// The openraft configuration this node runs with.
    pub fn raft_config(&self) -> Result<openraft::Config, ClusterError> {
        let ms = |d: Duration| d.as_millis().max(1) as u64;
        let cfg = openraft::Config {
            cluster_name: "sluice".to_string(),
            heartbeat_interval: ms(self.raft_heartbeat_interval),
            election_timeout_min: ms(self.election_timeout_min),
            election_timeout_max: ms(self.election_timeout_max),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every.max(1)),
            max_in_snapshot_log_to_keep: self.keep_below_snapshot,
            ..Default::default()
        };
        cfg.validate()
            .map_err(|e| ClusterError::Config(e.to_string()))
    }
}

/// Failures of the node API. Each is one Kafka error code ([`KafkaError::error_code`]).
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No Raft leader could be found or reached in time. NOT_CONTROLLER (41), retriable.
    #[error("no controller available within {0:?}")]
    NoController(Duration),
    /// The proposal reached a controller but its outcome is unknown (the connection or
    /// the leadership was lost). REQUEST_TIMED_OUT (7): the caller may check the image.
    #[error("proposal outcome unknown: {0}")]
    Indeterminate(String),
    /// The node is shut down or its Raft core stopped. BROKER_NOT_AVAILABLE (8).
    #[error("cluster node stopped: {0}")]
    Stopped(String),
    /// Invalid configuration. INVALID_CONFIG (40).
    #[error("invalid cluster config: {0}")]
    Config(String),
    /// Storage failure at start. KAFKA_STORAGE_ERROR (56).
    #[error("cluster storage: {0}")]
    Io(#[from] std::io::Error),
}

impl KafkaError for ClusterError {
    fn error_code(&self) -> ErrorCode {
        match self {
            ClusterError::NoController(_) => ErrorCode::NotController,
            ClusterError::Indeterminate(_) => ErrorCode::RequestTimedOut,
            ClusterError::Stopped(_) => ErrorCode::BrokerNotAvailable,
            ClusterError::Config(_) => ErrorCode::InvalidConfig,
            ClusterError::Io(_) => ErrorCode::KafkaStorageError,
        }
    }
}

/// How often the controller repeats that an internal topic waits for brokers.
const INTERNAL_WAIT_LOG_EVERY: Duration = Duration::from_secs(10);

/// Why a node's view of the metadata may be stale ([`ClusterNode::stale_view`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleView {
    /// No controller has answered a heartbeat of this process yet.
    NotYetHeard,
    /// The controller answered, but holds this broker fenced.
    Fenced,
    /// The last heartbeat a controller answered was sent this long ago, more than
    /// a session: the node is cut off or was paused, or it is a controller that
    /// cannot reach a majority.
    Silent(Duration),
}

impl std::fmt::Display for StaleView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StaleView::NotYetHeard => f.write_str("no controller has answered this node yet"),
            StaleView::Fenced => f.write_str("fenced by the controller"),
            StaleView::Silent(age) => write!(
                f,
                "no contact with a controller backed by a quorum for {:.1} s; the metadata view may be stale",
                age.as_secs_f64()
            ),
        }
    }
}

/// Liveness as the controller sees it. Reset whenever this node starts a new term as
/// leader: a new controller trusts no earlier observation (its own clock starts now).
#[derive(Default)]
struct ControllerState {
    /// The term this state belongs to; `None` while not leader.
    term: Option<u64>,
    /// When this node became leader in `term` (the grace period starts here).
    since: Option<Instant>,
    last_seen: HashMap<BrokerId, Instant>,
    /// When the controller last logged that an internal topic waits for brokers.
    internal_wait_logged: Option<Instant>,
}

/// Raft membership: who votes on metadata and who only follows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Members {
    pub voters: Vec<BrokerId>,
    pub learners: Vec<BrokerId>,
}

/// The broker side of liveness: the last heartbeat the controller answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatAck {
    /// When that heartbeat was sent. The controller noted the broker alive at some
    /// instant between this and `acked_at`, so a controller that keeps its term fences
    /// the broker no earlier than `sent_at + session_timeout`.
    pub sent_at: Instant,
    /// When the answer came back.
    pub acked_at: Instant,
    /// The controller that answered.
    pub controller: BrokerId,
    /// The broker epoch the controller reported (`None`: not registered yet).
    pub broker_epoch: Option<u64>,
    /// Whether the controller held this broker fenced when it answered.
    pub fenced: bool,
}

struct Inner {
    id: NodeId,
    config: ClusterConfig,
    raft: Raft<TypeConfig>,
    sm: StateMachineStore,
    client: RpcClient,
    identity: ClusterIdentity,
    /// Requests from other clusters, logged once in a while per foreign cluster id.
    foreign: LogThrottle,
    peers: BTreeMap<NodeId, String>,
    incarnation: u64,
    raft_addr: String,
    controller: Mutex<ControllerState>,
    last_ack: Mutex<Option<HeartbeatAck>>,
    /// Times this node saw the quorum's leader change (see [`follow_leader`]).
    leader_changes: AtomicU64,
}

/// The metadata quorum's Raft state as this node sees it, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RaftFigures {
    /// The current Raft term.
    pub term: u64,
    /// Index of the last entry in this node's Raft log (`None`: empty).
    pub last_log_index: Option<u64>,
    /// Index of the last entry applied to this node's metadata image.
    pub last_applied_index: Option<u64>,
    /// Times this node saw the leader change since it started, the first
    /// leader it learnt of included.
    pub leader_changes: u64,
    /// Whether this node leads the quorum (is the controller).
    pub is_leader: bool,
}

/// One member of the metadata quorum. See the crate docs.
pub struct ClusterNode {
    inner: Arc<Inner>,
    local_addr: Option<SocketAddr>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// The broker heartbeat sender, stopped first by a controlled shutdown.
    heartbeats: Mutex<Option<JoinHandle<()>>>,
}

fn node_id_of(id: BrokerId) -> Result<NodeId, ClusterError> {
    u64::try_from(id).map_err(|_| ClusterError::Config(format!("node id {id} is negative")))
}

impl ClusterNode {
    /// Binds `config.raft_listen` (when set) and starts the node.
    pub async fn start(config: ClusterConfig) -> Result<ClusterNode, ClusterError> {
        let listener = match config.raft_listen {
            Some(addr) => Some(TcpListener::bind(addr).await?),
            None => None,
        };
        ClusterNode::start_with(config, listener).await
    }

    /// Starts the node on an already bound listener (tests bind port 0 first so that
    /// every node knows its peers' addresses).
    pub async fn start_on(
        config: ClusterConfig,
        listener: TcpListener,
    ) -> Result<ClusterNode, ClusterError> {
        ClusterNode::start_with(config, Some(listener)).await
    }

    async fn start_with(
        config: ClusterConfig,
        listener: Option<TcpListener>,
    ) -> Result<ClusterNode, ClusterError> {
        let id = node_id_of(config.node_id)?;
        let mut peers = BTreeMap::new();
        for (pid, addr) in &config.peers {
            peers.insert(node_id_of(*pid)?, addr.clone());
        }
        if listener.is_none() && (peers.len() != 1 || !peers.contains_key(&id)) {
            return Err(ClusterError::Config(
                "only a node that is the one voter of its quorum runs without a Raft listener"
                    .to_string(),
            ));
        }
        let raft_addr = match (&config.raft_advertised, peers.get(&id)) {
            (Some(a), _) => a.clone(),
            (None, Some(a)) => a.clone(),
            (None, None) => {
                return Err(ClusterError::Config(format!(
                    "node {id} is not among the voters, so it joins as a broker and needs \
                     the address the others reach its Raft listener at (raft_advertised)"
                )))
            }
        };
        if peers.is_empty() {
            return Err(ClusterError::Config("no voters configured".to_string()));
        }
        let raft_config = Arc::new(config.raft_config()?);
        let (log, sm) = store::open(&config.data_dir.join("raft"))?;
        let identity = ClusterIdentity::new(config.cluster_id.clone(), sm.subscribe());
        let client = RpcClient::new(config.max_frame, identity.clone());
        let raft = Raft::new(
            id,
            raft_config,
            TcpNetwork::new(client.clone()),
            log,
            sm.clone(),
        )
        .await
        .map_err(|e| ClusterError::Stopped(e.to_string()))?;
        let local_addr = match &listener {
            Some(l) => Some(l.local_addr()?),
            None => None,
        };
        let inner = Arc::new(Inner {
            id,
            config,
            raft,
            sm,
            client,
            identity,
            foreign: LogThrottle::default(),
            peers,
            incarnation: rand::random(),
            raft_addr,
            controller: Mutex::new(ControllerState::default()),
            last_ack: Mutex::new(None),
            leader_changes: AtomicU64::new(0),
        });
        let mut tasks = vec![
            tokio::spawn(bootstrap(inner.clone())),
            tokio::spawn(controller_loop(inner.clone())),
            tokio::spawn(follow_leader(inner.clone())),
        ];
        if let Some(listener) = listener {
            tasks.push(tokio::spawn(accept_loop(inner.clone(), listener)));
        }
        let heartbeats = tokio::spawn(heartbeat_loop(inner.clone()));
        tracing::info!(node = id, raft = ?local_addr, "cluster node started");
        Ok(ClusterNode {
            inner,
            local_addr,
            tasks: Mutex::new(tasks),
            heartbeats: Mutex::new(Some(heartbeats)),
        })
    }

    /// This node's id.
    /// This process's registration: a restart registers a new one.
    pub fn incarnation(&self) -> u64 {
        self.inner.incarnation
    }

    pub fn node_id(&self) -> BrokerId {
        self.inner.config.node_id
    }

    /// Where peers reach this node's Kafka listener to replicate (`host:port`): the
    /// configured `replica_addr`, else the host of this node's Raft address with
    /// `kafka_port`. Registered in the image as [`crate::BrokerState::replica_addr`].
    pub fn replica_addr(&self) -> String {
        self.inner.replica_addr()
    }

    /// The named protocol endpoints this node registers (name → `host:port`), from
    /// [`ClusterConfig::endpoints`]; see [`crate::BrokerState::endpoints`].
    pub fn endpoints(&self) -> &BTreeMap<String, String> {
        &self.inner.config.endpoints
    }

    /// The address the Raft listener is bound to (`None`: a single node without one).
    pub fn local_raft_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// The locally applied metadata (every node serves Kafka Metadata from it).
    pub fn image(&self) -> watch::Receiver<Arc<MetadataImage>> {
        self.inner.sm.subscribe()
    }

    /// The current controller (Raft leader) as this node knows it.
    pub fn controller_id(&self) -> Option<BrokerId> {
        let m = self.inner.raft.metrics();
        let leader = m.borrow().current_leader;
        leader.and_then(|l| BrokerId::try_from(l).ok())
    }

    /// The quorum's Raft state as this node sees it (term, log indexes, leader
    /// changes), read from openraft's metrics.
    pub fn raft_figures(&self) -> RaftFigures {
        let m = self.inner.raft.metrics();
        let m = m.borrow();
        RaftFigures {
            term: m.current_term,
            last_log_index: m.last_log_index,
            last_applied_index: m.last_applied.map(|id| id.index),
            leader_changes: self.inner.leader_changes.load(Ordering::Relaxed),
            is_leader: m.state == ServerState::Leader,
        }
    }

    /// The last heartbeat of this broker that a controller answered, if any: whether
    /// the quorum has it registered and unfenced, and how fresh that news is.
    pub fn last_heartbeat_ack(&self) -> Option<HeartbeatAck> {
        *self
            .inner
            .last_ack
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this node's metadata view may be stale, and why; `None` while a
    /// controller confirmed by a quorum answered a heartbeat of this process within
    /// the session timeout and holds it unfenced. A node whose view is stale leads no
    /// partition (its leadership may have moved) and reports itself unhealthy.
    pub fn stale_view(&self) -> Option<StaleView> {
        match self.last_heartbeat_ack() {
            None => Some(StaleView::NotYetHeard),
            Some(ack) if ack.fenced => Some(StaleView::Fenced),
            Some(ack) => {
                let age = ack.sent_at.elapsed();
                (age > self.inner.config.session_timeout).then_some(StaleView::Silent(age))
            }
        }
    }

    /// The voters of the metadata quorum and the non-voting members (brokers that
    /// joined later), as the Raft membership this node knows says.
    pub fn members(&self) -> Members {
        let m = self.inner.raft.metrics();
        let m = m.borrow();
        let membership = m.membership_config.membership();
        let voters: Vec<BrokerId> = membership
            .voter_ids()
            .filter_map(|v| BrokerId::try_from(v).ok())
            .collect();
        let learners = membership
            .learner_ids()
            .filter_map(|v| BrokerId::try_from(v).ok())
            .collect();
        Members { voters, learners }
    }

    /// The underlying openraft handle (metrics, diagnostics).
    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.inner.raft
    }

    /// Proposes `cmd` and waits until it is committed and applied. Forwarded to the
    /// controller when this node is not it. `Ok(Err(_))` is a deterministic rejection
    /// by the state machine; `Err(_)` means the quorum could not be used.
    pub async fn propose(&self, cmd: Command) -> Result<CommandResult, ClusterError> {
        propose(&self.inner, cmd).await
    }

    /// Waits, at most `limit`, until this node has applied everything the controller
    /// had committed when asked (a Raft read index, §6.4 of the thesis): a read of the
    /// local image afterwards sees every metadata change acknowledged before the call,
    /// such as a topic another node just created. Returns that read index (the
    /// image's `applied_index` is at least it).
    pub async fn catch_up(&self, limit: Duration) -> Result<u64, ClusterError> {
        let inner = &self.inner;
        let deadline = Instant::now() + limit;
        let index = match inner.read_index_local(limit).await {
            Ok(i) => i,
            Err(ForwardError::NotController { leader }) => {
                let addr = leader
                    .filter(|l| *l != inner.id)
                    .and_then(|l| inner.addr_of(l))
                    .ok_or(ClusterError::NoController(limit))?;
                let left = deadline.saturating_duration_since(Instant::now());
                match inner
                    .client
                    .call(
                        &addr,
                        Request::ReadIndex,
                        left.max(Duration::from_millis(1)),
                    )
                    .await
                {
                    Ok(Response::ReadIndex(Ok(i))) => i,
                    Ok(Response::ReadIndex(Err(ForwardError::NotController { .. }))) => {
                        return Err(ClusterError::NoController(limit))
                    }
                    Ok(Response::ReadIndex(Err(ForwardError::Failed(e)))) => {
                        return Err(ClusterError::Indeterminate(e))
                    }
                    Ok(_) => {
                        return Err(ClusterError::Indeterminate(format!(
                            "unexpected reply from {addr}"
                        )))
                    }
                    Err(e) => return Err(ClusterError::Indeterminate(e.to_string())),
                }
            }
            Err(ForwardError::Failed(e)) => return Err(ClusterError::Indeterminate(e)),
        };
        let left = deadline.saturating_duration_since(Instant::now());
        inner
            .raft
            .wait(Some(left))
            .applied_index_at_least(Some(index), "catch up with the controller")
            .await
            .map(|_| index)
            .map_err(|e| ClusterError::Indeterminate(e.to_string()))
    }

    /// Kafka's controlled shutdown, before a clean stop: stops heartbeating (so the
    /// controller does not unfence it again) and fences this broker through the
    /// quorum, which moves every partition it leads to another in-sync replica and
    /// takes it out of the ISRs at once, instead of after a session timeout. The node
    /// keeps serving meanwhile; clients follow NOT_LEADER_OR_FOLLOWER to the new
    /// leaders. A restart registers the broker again.
    pub async fn controlled_shutdown(&self, limit: Duration) -> Result<(), ClusterError> {
        let heartbeats = self
            .heartbeats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(h) = heartbeats {
            h.abort();
            let _ = h.await;
        }
        let cmd = Command::FenceBroker {
            node_id: self.inner.config.node_id,
        };
        match tokio::time::timeout(limit, propose(&self.inner, cmd)).await {
            Ok(Ok(Ok(_))) => Ok(()),
            Ok(Ok(Err(rejected))) => Err(ClusterError::Indeterminate(rejected.to_string())),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ClusterError::Indeterminate(format!(
                "not fenced within {limit:?}"
            ))),
        }
    }

    /// Stops serving and shuts the Raft core down. Idempotent.
    pub async fn shutdown(&self) {
        let mut tasks: Vec<_> = self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        tasks.extend(
            self.heartbeats
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(node = self.inner.id, error = %e, "raft shutdown");
        }
        tracing::info!(node = self.inner.id, "cluster node stopped");
    }
}

impl Drop for ClusterNode {
    /// Dropping without [`ClusterNode::shutdown`] stops serving at once and shuts the
    /// Raft core down in the background (when a runtime is still there to run it).
    fn drop(&mut self) {
        if let Some(h) = self
            .heartbeats
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            h.abort();
        }
        let tasks = self.tasks.get_mut().unwrap_or_else(|e| e.into_inner());
        if tasks.is_empty() {
            return;
        }
        for t in tasks.drain(..) {
            t.abort();
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let raft = self.inner.raft.clone();
            handle.spawn(async move {
                let _ = raft.shutdown().await;
            });
        }
    }
}

impl Inner {
    fn ctrl(&self) -> std::sync::MutexGuard<'_, ControllerState> {
        self.controller.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Raft address of `id`: from the membership config, else from the static peers.
    fn addr_of(&self, id: NodeId) -> Option<String> {
        let m = self.raft.metrics();
        let from_membership = m
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone());
        from_membership.or_else(|| self.peers.get(&id).cloned())
    }

    /// The read index when this node leads (confirmed by a quorum), applied locally.
    async fn read_index_local(&self, limit: Duration) -> Result<u64, ForwardError> {
        if !self.is_leader() {
            let leader = self.raft.metrics().borrow().current_leader;
            return Err(ForwardError::NotController { leader });
        }
        match tokio::time::timeout(limit, self.raft.ensure_linearizable()).await {
            Ok(Ok(read)) => Ok(read.map_or(0, |l| l.index)),
            Ok(Err(e)) => {
                let leader = self.raft.metrics().borrow().current_leader;
                match leader {
                    Some(l) if l != self.id => Err(ForwardError::NotController { leader }),
                    _ => Err(ForwardError::Failed(e.to_string())),
                }
            }
            Err(_) => Err(ForwardError::Failed(format!(
                "leadership not confirmed within {limit:?}"
            ))),
        }
    }

    /// Whether this node is the Raft leader now.
    fn is_leader(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.state == ServerState::Leader && m.current_leader == Some(self.id)
    }

    /// [`Inner::write_local`] bounded by `limit`. A leader cut off from its quorum
    /// (a zombie) would otherwise wait until it hears of the new term. On timeout the
    /// entry may still commit later, so the outcome is unknown.
    async fn write_local_within(
        &self,
        cmd: Command,
        limit: Duration,
    ) -> Result<CommandResult, ForwardError> {
        match tokio::time::timeout(limit, self.write_local(cmd)).await {
            Ok(r) => r,
            Err(_) => Err(ForwardError::Failed(format!(
                "not committed within {limit:?} (controller cut off from its quorum?)"
            ))),
        }
    }

    /// Appends `cmd` through the local Raft core only (no forwarding). openraft answers
    /// `ForwardToLeader` only for entries it never appended or that were truncated, so
    /// that error always means "not applied".
    async fn write_local(&self, cmd: Command) -> Result<CommandResult, ForwardError> {
        match self.raft.client_write(cmd).await {
            Ok(resp) => Ok(resp.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(ForwardError::NotController {
                    leader: f.leader_id,
                })
            }
            Err(e) => Err(ForwardError::Failed(e.to_string())),
        }
    }

    fn heartbeat(&self) -> BrokerHeartbeat {
        BrokerHeartbeat {
            node_id: self.config.node_id,
            incarnation: self.incarnation,
            kafka_host: self.config.kafka_host.clone(),
            kafka_port: self.config.kafka_port,
            raft_addr: self.raft_addr.clone(),
            replica_addr: self.replica_addr(),
            endpoints: self.config.endpoints.clone(),
        }
    }

    /// Makes a heartbeating broker a member of the Raft group, so that it receives
    /// the metadata log: a broker that is not a voter joins as a learner (or has its
    /// address updated after it moved). Voters' addresses come from their config.
    async fn ensure_member(&self, hb: &BrokerHeartbeat) -> Result<(), ForwardError> {
        let id = node_id_of(hb.node_id).map_err(|e| ForwardError::Failed(e.to_string()))?;
        let (known, voter) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            (
                membership.get_node(&id).map(|n| n.addr.clone()),
                membership.voter_ids().any(|v| v == id),
            )
        };
        let node = BasicNode {
            addr: hb.raft_addr.clone(),
        };
        let limit = self.config.heartbeat_interval * 2;
        let change = match known {
            Some(addr) if addr == hb.raft_addr => return Ok(()),
            Some(addr) if voter => {
                tracing::warn!(broker = hb.node_id, configured = %addr, announced = %hb.raft_addr,
                    "a voter announces another Raft address than the configured one; keeping the configured one");
                return Ok(());
            }
            Some(_) => {
                tracing::info!(broker = hb.node_id, addr = %hb.raft_addr, "broker moved; updating its Raft address");
                let set = BTreeMap::from([(id, node)]);
                tokio::time::timeout(
                    limit,
                    self.raft
                        .change_membership(ChangeMembers::SetNodes(set), true),
                )
                .await
            }
            None => {
                tracing::info!(broker = hb.node_id, addr = %hb.raft_addr, "a new broker joins the metadata log as a learner");
                tokio::time::timeout(limit, self.raft.add_learner(id, node, false)).await
            }
        };
        match change {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(ForwardError::Failed(format!(
                "cannot add broker {id} to the Raft membership: {e}"
            ))),
            Err(_) => Err(ForwardError::Failed(format!(
                "adding broker {id} to the Raft membership took longer than {limit:?}"
            ))),
        }
    }

    /// Drops learners that are no longer registered brokers (removed with
    /// `UnregisterBroker`) and have been silent for a session, so the leader stops
    /// replicating the metadata log to them. A broker that comes back joins anew.
    async fn remove_departed_learners(&self, image: &MetadataImage, since: Instant) {
        let learners: Vec<NodeId> = {
            let m = self.raft.metrics();
            let m = m.borrow();
            m.membership_config.membership().learner_ids().collect()
        };
        let now = Instant::now();
        let departed: BTreeSet<NodeId> = {
            let c = self.ctrl();
            learners
                .into_iter()
                .filter(|id| BrokerId::try_from(*id).is_ok_and(|b| !image.brokers.contains_key(&b)))
                .filter(|id| {
                    let last = BrokerId::try_from(*id)
                        .ok()
                        .and_then(|b| c.last_seen.get(&b).copied())
                        .unwrap_or(since);
                    now.saturating_duration_since(last) > self.config.session_timeout
                })
                .collect()
        };
        if departed.is_empty() {
            return;
        }
        tracing::info!(
            ?departed,
            "removing unregistered brokers from the Raft membership"
        );
        let limit = self.config.session_timeout;
        match tokio::time::timeout(
            limit,
            self.raft
                .change_membership(ChangeMembers::RemoveNodes(departed), true),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot remove departed learners"),
            Err(_) => tracing::warn!("removing departed learners did not commit in time"),
        }
    }

    /// Controller duty: every internal topic exists with the internal replication
    /// factor ([`MetadataImage::internal_topic_plan`]). Waiting for brokers is normal
    /// while a cluster starts; it is logged as a warning only once this controller has
    /// led for a session, and then at most every 10 s.
    async fn maintain_internal_topics(&self, image: &MetadataImage, since: Instant) {
        let rf = self.config.internal_replication_factor;
        for spec in &self.config.internal_topics {
            match image.internal_topic_plan(spec, rf) {
                InternalTopicPlan::Ready => {}
                InternalTopicPlan::Waiting { placeable, needed } => {
                    let warn = since.elapsed() > self.config.session_timeout && {
                        let mut c = self.ctrl();
                        let due = c
                            .internal_wait_logged
                            .is_none_or(|t| t.elapsed() >= INTERNAL_WAIT_LOG_EVERY);
                        if due {
                            c.internal_wait_logged = Some(Instant::now());
                        }
                        due
                    };
                    if warn {
                        tracing::warn!(topic = %spec.name, placeable, needed,
                            "internal topic waits for enough live brokers to hold its replicas");
                    }
                }
                InternalTopicPlan::Propose(cmds) => {
                    for cmd in cmds {
                        tracing::info!(topic = %spec.name, ?cmd, "internal topic below its replication factor; proposing");
                        match self
                            .write_local_within(cmd, self.config.session_timeout)
                            .await
                        {
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) => {
                                tracing::warn!(topic = %spec.name, error = %e, "internal topic change rejected")
                            }
                            Err(e) => {
                                tracing::debug!(topic = %spec.name, error = %e, "internal topic change not proposed")
                            }
                        }
                    }
                }
            }
        }
    }

    fn replica_addr(&self) -> String {
        if let Some(a) = &self.config.replica_addr {
            return a.clone();
        }
        let host = match self.raft_addr.rsplit_once(':') {
            Some((h, _)) => h,
            None => self.raft_addr.as_str(),
        };
        format!("{host}:{}", self.config.kafka_port)
    }

    /// The controller side of a broker heartbeat: note the broker alive, and register or
    /// unfence it through the log when the image says otherwise.
    async fn on_heartbeat(&self, hb: BrokerHeartbeat) -> Result<HeartbeatReply, ForwardError> {
        if !self.is_leader() {
            let leader = self.raft.metrics().borrow().current_leader;
            return Err(ForwardError::NotController { leader });
        }
        self.ctrl().last_seen.insert(hb.node_id, Instant::now());
        self.ensure_member(&hb).await?;
        let image = self.sm.image();
        let cmd = match image.brokers.get(&hb.node_id) {
            Some(b)
                if b.incarnation == hb.incarnation
                    && b.kafka_host == hb.kafka_host
                    && b.kafka_port == hb.kafka_port
                    && b.raft_addr == hb.raft_addr
                    && b.replica_addr == hb.replica_addr
                    && b.endpoints == hb.endpoints =>
            {
                if !b.fenced {
                    return Ok(HeartbeatReply {
                        broker_epoch: Some(b.epoch),
                        fenced: false,
                    });
                }
                tracing::info!(broker = hb.node_id, "heartbeats resumed; unfencing");
                Command::UnfenceBroker {
                    node_id: hb.node_id,
                }
            }
            _ => {
                tracing::info!(
                    broker = hb.node_id,
                    incarnation = hb.incarnation,
                    "registering broker"
                );
                Command::RegisterBroker {
                    node_id: hb.node_id,
                    kafka_host: hb.kafka_host.clone(),
                    kafka_port: hb.kafka_port,
                    raft_addr: hb.raft_addr.clone(),
                    incarnation: hb.incarnation,
                    replica_addr: hb.replica_addr.clone(),
                    endpoints: hb.endpoints.clone(),
                }
            }
        };
        let limit = self.config.heartbeat_interval * 2;
        match self.write_local_within(cmd, limit).await? {
            Ok(_) => {}
            Err(e) => tracing::warn!(broker = hb.node_id, error = %e, "heartbeat command rejected"),
        }
        let image = self.sm.image();
        let b = image.brokers.get(&hb.node_id);
        Ok(HeartbeatReply {
            broker_epoch: b.map(|b| b.epoch),
            fenced: b.is_none_or(|b| b.fenced),
        })
    }
}

async fn propose(inner: &Arc<Inner>, cmd: Command) -> Result<CommandResult, ClusterError> {
    let timeout = inner.config.propose_timeout;
    let deadline = Instant::now() + timeout;
    let mut backoff = Duration::from_millis(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let leader = match tokio::time::timeout(left, inner.write_local(cmd.clone())).await {
            Ok(Ok(r)) => return Ok(r),
            Ok(Err(ForwardError::NotController { leader })) => leader,
            Ok(Err(ForwardError::Failed(e))) => return Err(ClusterError::Stopped(e)),
            Err(_) => {
                return Err(ClusterError::Indeterminate(format!(
                    "not committed within {timeout:?}"
                )))
            }
        };
        if let Some(addr) = leader
            .filter(|l| *l != inner.id)
            .and_then(|l| inner.addr_of(l))
        {
            let left = deadline.saturating_duration_since(Instant::now());
            match inner
                .client
                .call(
                    &addr,
                    Request::Propose(cmd.clone()),
                    left.max(Duration::from_millis(1)),
                )
                .await
            {
                Ok(Response::Propose(Ok(r))) => return Ok(r),
                // Leadership moved on: look again.
                Ok(Response::Propose(Err(ForwardError::NotController { .. }))) => {}
                Ok(Response::Propose(Err(ForwardError::Failed(e)))) => {
                    return Err(ClusterError::Indeterminate(e))
                }
                Ok(_) => {
                    return Err(ClusterError::Indeterminate(format!(
                        "unexpected reply from {addr}"
                    )))
                }
                // Never connected, or refused as another cluster's: nothing was
                // applied, so retrying is safe.
                Err(RpcError::Unreachable { .. } | RpcError::WrongCluster { .. }) => {}
                Err(e) => return Err(ClusterError::Indeterminate(e.to_string())),
            }
        }
        if Instant::now() + backoff >= deadline {
            return Err(ClusterError::NoController(timeout));
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(200));
    }
}

async fn accept_loop(inner: Arc<Inner>, listener: TcpListener) {
    // Connection tasks live in this set, so aborting this task closes them all.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    conns.spawn(serve_conn(inner.clone(), stream, peer));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "raft listener accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve_conn(inner: Arc<Inner>, mut stream: TcpStream, peer: SocketAddr) {
    loop {
        let bytes = match read_frame(&mut stream, inner.config.max_frame).await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "closing inter-node connection");
                return;
            }
        };
        let envelope: Envelope = match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "malformed inter-node frame; closing connection");
                return;
            }
        };
        if let Some(ours) = inner.identity.refuses(envelope.cluster_id.as_deref()) {
            let theirs = envelope.cluster_id.unwrap_or_default();
            if inner.foreign.allow(&theirs) {
                tracing::warn!(%peer, %theirs, %ours,
                    "refusing a node of another cluster; closing its connection");
            }
            if let Ok(payload) = serde_json::to_vec(&Response::WrongCluster { cluster_id: ours }) {
                let _ = write_frame(&mut stream, &payload).await;
            }
            return;
        }
        let resp = dispatch(&inner, envelope.request).await;
        let payload = match serde_json::to_vec(&resp) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "cannot encode reply; closing connection");
                return;
            }
        };
        if let Err(e) = write_frame(&mut stream, &payload).await {
            tracing::debug!(%peer, error = %e, "inter-node reply not delivered");
            return;
        }
    }
}

async fn dispatch(inner: &Arc<Inner>, req: Request) -> Response {
    match req {
        Request::AppendEntries(r) => Response::AppendEntries(inner.raft.append_entries(r).await),
        Request::Vote(r) => Response::Vote(inner.raft.vote(r).await),
        Request::InstallSnapshot(r) => {
            Response::InstallSnapshot(inner.raft.install_snapshot(r).await)
        }
        Request::Propose(cmd) => Response::Propose(
            inner
                .write_local_within(cmd, inner.config.propose_timeout)
                .await,
        ),
        Request::Heartbeat(hb) => Response::Heartbeat(inner.on_heartbeat(hb).await),
        Request::ReadIndex => {
            Response::ReadIndex(inner.read_index_local(inner.config.propose_timeout).await)
        }
        Request::Probe => Response::Probe {
            node_id: inner.id,
            initialized: inner.raft.is_initialized().await.unwrap_or(false),
        },
    }
}

/// Forms the cluster once: only the lowest peer id initializes, only when it has never
/// been initialized itself, no reachable peer has been either, and a majority (itself
/// included) answers. Everyone else waits to be contacted by the leader.
async fn bootstrap(inner: Arc<Inner>) {
    let lowest = inner.peers.keys().next().copied();
    if lowest != Some(inner.id) {
        return;
    }
    let majority = inner.peers.len() / 2 + 1;
    loop {
        match inner.raft.is_initialized().await {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "raft core stopped before bootstrap");
                return;
            }
        }
        let mut reachable = 1usize;
        let mut formed_elsewhere = false;
        for (pid, addr) in &inner.peers {
            if *pid == inner.id {
                continue;
            }
            if let Ok(Response::Probe { initialized, .. }) = inner
                .client
                .call(addr, Request::Probe, Duration::from_millis(500))
                .await
            {
                reachable += 1;
                formed_elsewhere |= initialized;
            }
        }
        if formed_elsewhere {
            tracing::info!("the cluster is already formed; waiting to be replicated to");
            return;
        }
        if reachable >= majority {
            let members: BTreeMap<NodeId, BasicNode> = inner
                .peers
                .iter()
                .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
                .collect();
            match inner.raft.initialize(members).await {
                Ok(()) => tracing::info!(
                    voters = inner.peers.len(),
                    "initialized the metadata quorum"
                ),
                Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                Err(e) => tracing::warn!(error = %e, "raft initialize failed"),
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every node is a broker: heartbeat the controller (locally when it is this node).
/// Heartbeats start at a fixed rate (not `interval` after the previous answer), so a
/// slow answer does not stretch the silence the controller sees.
async fn heartbeat_loop(inner: Arc<Inner>) {
    let interval = inner.config.heartbeat_interval;
    // The first heartbeat goes out at once: a node is registered (and may lead)
    // only after the controller has heard from it.
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let voters: Vec<NodeId> = inner.peers.keys().copied().collect();
    // Where to look when Raft names no leader: a broker that has not joined the
    // membership yet hears from nobody, so it asks the voters in turn and follows
    // the leader a voter names.
    let mut hint: Option<NodeId> = None;
    let mut next_voter = 0usize;
    loop {
        ticks.tick().await;
        let known = inner.raft.metrics().borrow().current_leader;
        let leader = match known.or(hint.take()) {
            Some(l) => l,
            None => {
                next_voter = next_voter.wrapping_add(1);
                voters[next_voter % voters.len()]
            }
        };
        let hb = inner.heartbeat();
        let sent_at = Instant::now();
        let result = if leader == inner.id {
            // The controller's own heartbeat counts only once a quorum confirms it
            // still leads: a controller cut off from its peers then sees its lease run
            // out like any broker (it stops leading partitions and reports unhealthy)
            // instead of answering itself forever.
            match inner.read_index_local(interval * 2).await {
                Ok(_) => inner.on_heartbeat(hb).await,
                Err(e) => Err(e),
            }
        } else {
            let Some(addr) = inner.addr_of(leader) else {
                continue;
            };
            match inner
                .client
                .call(&addr, Request::Heartbeat(hb), interval * 2)
                .await
            {
                Ok(Response::Heartbeat(r)) => r,
                Ok(_) => Err(ForwardError::Failed("unexpected reply".to_string())),
                Err(e) => Err(ForwardError::Failed(e.to_string())),
            }
        };
        match result {
            Ok(reply) => {
                let ack = HeartbeatAck {
                    sent_at,
                    acked_at: Instant::now(),
                    controller: BrokerId::try_from(leader).unwrap_or(-1),
                    broker_epoch: reply.broker_epoch,
                    fenced: reply.fenced,
                };
                *inner.last_ack.lock().unwrap_or_else(|e| e.into_inner()) = Some(ack);
            }
            Err(ForwardError::NotController { leader: Some(l) }) if l != leader => hint = Some(l),
            Err(e) => tracing::debug!(node = inner.id, error = %e, "heartbeat not delivered"),
        }
        let never_heard = inner
            .last_ack
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none();
        if never_heard {
            // A node leads and serves nothing before its first acknowledged
            // heartbeat: while starting, try again soon rather than a whole
            // interval later (a single node elects itself within milliseconds).
            ticks.reset_after(STARTUP_HEARTBEAT_RETRY.min(interval));
        }
    }
}

/// How soon a node that has never been answered heartbeats again.
const STARTUP_HEARTBEAT_RETRY: Duration = Duration::from_millis(10);

/// While leader: set the cluster id once, fence brokers silent for longer than the
/// session timeout (counting from the start of this leadership for brokers not heard
/// from yet, so a new controller gives everyone a full session of grace), and keep the
/// internal topics at their replication factor.
/// Counts the leader changes this node sees, following openraft's metrics
/// (they change on every append too, so only the leader is compared). An
/// election's leaderless interval is not a change; the leader after it is,
/// when it is another node than before, and so is the first one learnt of.
async fn follow_leader(inner: Arc<Inner>) {
    let mut metrics = inner.raft.metrics();
    let mut last: Option<NodeId> = None;
    loop {
        let leader = metrics.borrow_and_update().current_leader;
        if leader.is_some() && leader != last {
            inner.leader_changes.fetch_add(1, Ordering::Relaxed);
            last = leader;
        }
        // The sender goes with the Raft core: the node stopped.
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

async fn controller_loop(inner: Arc<Inner>) {
    let tick = (inner.config.heartbeat_interval / 2).max(Duration::from_millis(10));
    let session = inner.config.session_timeout;
    let mut ticks = tokio::time::interval(tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_tick = Instant::now();
    // A new image (a broker registered, a topic appeared) may need the controller at
    // once: the internal topics of a fresh node, say, should not wait for a tick.
    let mut images = inner.sm.subscribe();
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            changed = images.changed() => if changed.is_err() {
                return;
            },
        }
        let now = Instant::now();
        // Time this loop did not run (the process was paused or starved) was not
        // observed: heartbeats could not have been heard either, so it must not count
        // as silence. Every broker's clock moves on by the unobserved stretch.
        let unobserved = now
            .saturating_duration_since(last_tick)
            .saturating_sub(tick * 4);
        last_tick = now;
        if !unobserved.is_zero() {
            let mut c = inner.ctrl();
            tracing::info!(gap = ?unobserved, "controller loop did not run for a while; not counting that time as broker silence");
            for seen in c.last_seen.values_mut() {
                *seen += unobserved;
            }
            if let Some(since) = c.since.as_mut() {
                *since += unobserved;
            }
        }
        let (is_leader, term) = {
            let m = inner.raft.metrics();
            let m = m.borrow();
            (
                m.state == ServerState::Leader && m.current_leader == Some(inner.id),
                m.current_term,
            )
        };
        let since = {
            let mut c = inner.ctrl();
            if !is_leader {
                c.term = None;
                continue;
            }
            if c.term != Some(term) {
                tracing::info!(node = inner.id, term, "became controller");
                c.term = Some(term);
                c.since = Some(now);
                c.last_seen.clear();
            }
            c.since.unwrap_or(now)
        };
        let image = inner.sm.image();
        if let Some(local) = &inner.config.adopt_local_state {
            if !image.local_state_adopted {
                // First of all: topics must not be created (or deleted as absent) before
                // the node's own are in the image.
                let cmd = Command::AdoptLocalState {
                    broker: inner.config.node_id,
                    topics: local.topics.clone(),
                    producer_ids_from: local.producer_ids_from,
                };
                match inner.write_local_within(cmd, session).await {
                    Ok(Ok(_)) => tracing::info!(
                        topics = local.topics.len(),
                        "adopted the data directory's topics into the metadata quorum"
                    ),
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "cannot adopt the data directory's topics")
                    }
                    Err(e) => tracing::debug!(error = %e, "adopting local topics not proposed"),
                }
                continue;
            }
        }
        if image.cluster_id.is_empty() {
            let cluster_id = inner
                .config
                .cluster_id
                .clone()
                .or_else(|| inner.config.initial_cluster_id.clone())
                .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()));
            if let Err(e) = inner
                .write_local_within(Command::InitCluster { cluster_id }, session)
                .await
            {
                tracing::debug!(error = %e, "init cluster id");
            }
        }
        inner.remove_departed_learners(&image, since).await;
        let silent: Vec<BrokerId> = {
            let c = inner.ctrl();
            image
                .brokers
                .iter()
                .filter(|(_, b)| !b.fenced)
                .filter(|(id, _)| {
                    let last = c.last_seen.get(id).copied().unwrap_or(since);
                    now.saturating_duration_since(last) > inner.config.session_timeout
                })
                .map(|(id, _)| *id)
                .collect()
        };
        for id in silent {
            tracing::warn!(broker = id, "session timed out; fencing");
            match inner
                .write_local_within(Command::FenceBroker { node_id: id }, session)
                .await
            {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(broker = id, error = %e, "fence rejected"),
                Err(e) => tracing::debug!(broker = id, error = %e, "fence not proposed"),
            }
        }
        let image = inner.sm.image();
        inner.maintain_internal_topics(&image, since).await;
    }
}

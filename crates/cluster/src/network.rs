//! The inter-node transport: length-prefixed JSON frames over TCP, a pool of idle
//! connections per peer, and openraft's [`RaftNetwork`] on top of it.
//!
//! Frame: `[len u32 BE][JSON]`. The length is checked against the limit before anything
//! is allocated; a frame that is too long or does not decode closes that connection.
//! One request is in flight per connection; the reply comes back on the same one.
//!
//! Every request travels in an [`Envelope`] naming the sender's cluster id, as KRaft's
//! RPCs carry `ClusterId`: a node of another cluster that reaches this one (an address
//! reused by a new process, a misconfigured peer list) is answered
//! [`Response::WrongCluster`] and the connection is closed, so its votes, log entries
//! and heartbeats never touch this cluster's state.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, RaftNetwork, RaftNetworkFactory};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::image::{BrokerId, Command, CommandResult, MetadataImage};
use crate::{NodeId, TypeConfig};

/// Default largest frame: above the largest snapshot chunk openraft sends (3 MiB by
/// default) with room for JSON overhead.
pub const DEFAULT_MAX_FRAME: u32 = 32 * 1024 * 1024;

/// Idle connections kept per peer.
const MAX_IDLE_PER_PEER: usize = 4;

/// A broker's liveness signal to the controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerHeartbeat {
    pub node_id: BrokerId,
    pub incarnation: u64,
    pub kafka_host: String,
    pub kafka_port: u16,
    pub raft_addr: String,
    #[serde(default)]
    pub replica_addr: String,
    /// Named protocol endpoints (name → `host:port`) to register, see
    /// [`crate::BrokerState::endpoints`]; absent from older brokers' heartbeats.
    #[serde(default)]
    pub endpoints: BTreeMap<String, String>,
}

/// The controller's answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    /// The broker's epoch, once registered.
    pub broker_epoch: Option<u64>,
    /// Whether the controller currently holds the broker fenced.
    pub fenced: bool,
}

/// Why a forwarded request was not served by the receiving node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ForwardError {
    /// The receiver is not the Raft leader; `leader` is who it believes is.
    #[error("not the controller (leader hint {leader:?})")]
    NotController { leader: Option<NodeId> },
    /// The receiver failed for another reason (shutting down, storage error).
    #[error("{0}")]
    Failed(String),
}

/// Every request a node serves on its Raft port.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A command forwarded to the node believed to be the Raft leader.
    Propose(Command),
    /// A broker heartbeat, sent to the node believed to be the Raft leader.
    Heartbeat(BrokerHeartbeat),
    /// Bootstrap probe: who are you and is your Raft state initialized?
    Probe,
    /// Read index: the log index the Raft leader has committed, once it has confirmed
    /// it still leads. A node that has applied up to it has seen every change
    /// acknowledged before the request.
    ReadIndex,
}

/// A request as it travels: with the cluster id its sender belongs to, once the
/// sender knows it (a node that has neither been configured with one nor learnt it
/// from the metadata log sends `None`, and is served).
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope {
    pub cluster_id: Option<String>,
    pub request: Request,
}

/// The answer to each [`Request`], same variant.
#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    Propose(Result<CommandResult, ForwardError>),
    Heartbeat(Result<HeartbeatReply, ForwardError>),
    Probe {
        node_id: NodeId,
        initialized: bool,
    },
    ReadIndex(Result<u64, ForwardError>),
    /// The request came from another cluster than the receiver's, named here; the
    /// receiver closes the connection after this answer.
    WrongCluster {
        cluster_id: String,
    },
}

/// Which cluster this node belongs to: the id the metadata log holds, else the one it
/// was configured with, else none yet.
#[derive(Clone)]
pub struct ClusterIdentity {
    configured: Option<String>,
    image: watch::Receiver<Arc<MetadataImage>>,
}

impl ClusterIdentity {
    pub fn new(
        configured: Option<String>,
        image: watch::Receiver<Arc<MetadataImage>>,
    ) -> ClusterIdentity {
        ClusterIdentity { configured, image }
    }

    pub fn current(&self) -> Option<String> {
        let image = self.image.borrow();
        if image.cluster_id.is_empty() {
            self.configured.clone()
        } else {
            Some(image.cluster_id.clone())
        }
    }

    /// `Some(ours)` when a peer claiming `theirs` is of another cluster. A side that
    /// does not know its id yet cannot tell, and is let through.
    pub fn refuses(&self, theirs: Option<&str>) -> Option<String> {
        let ours = self.current()?;
        (theirs.is_some_and(|t| t != ours)).then_some(ours)
    }
}

/// How often the same foreign cluster is logged, per side.
const WRONG_CLUSTER_LOG_EVERY: Duration = Duration::from_secs(30);

/// Remembers when each key was last logged, so a peer that retries every few
/// milliseconds is reported once in a while, not on every attempt.
#[derive(Default)]
pub struct LogThrottle {
    last: Mutex<HashMap<String, Instant>>,
}

impl LogThrottle {
    /// Whether `key` may be logged now (and notes that it was).
    pub fn allow(&self, key: &str) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if last
            .get(key)
            .is_some_and(|t| now.duration_since(*t) < WRONG_CLUSTER_LOG_EVERY)
        {
            return false;
        }
        // Keys come from peers: forget them all rather than grow without bound.
        if last.len() >= 1024 {
            last.clear();
        }
        last.insert(key.to_string(), now);
        true
    }
}

/// Transport failures.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// Could not connect: the peer is down or unreachable.
    #[error("cannot connect to {addr}: {source}")]
    Unreachable {
        addr: String,
        source: std::io::Error,
    },
    /// Connected, but the exchange failed (reset, bad frame, wrong reply).
    #[error("rpc to {addr} failed: {source}")]
    Network {
        addr: String,
        source: std::io::Error,
    },
    /// No reply within the deadline.
    #[error("rpc to {addr} timed out")]
    Timeout { addr: String },
    /// The peer at `addr` belongs to cluster `theirs`, not to this node's.
    #[error("{addr} belongs to another cluster ({theirs})")]
    WrongCluster { addr: String, theirs: String },
}

fn invalid(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

/// Reads one frame, refusing a length above `max` before allocating.
pub async fn read_frame(stream: &mut TcpStream, max: u32) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len);
    if len > max {
        return Err(invalid(format!(
            "frame of {len} bytes exceeds the limit of {max}"
        )));
    }
    let mut buf = vec![0u8; len as usize];
    stream.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Writes one frame.
pub async fn write_frame(stream: &mut TcpStream, payload: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(payload.len()).map_err(|_| invalid("frame too large"))?;
    let mut buf = Vec::with_capacity(payload.len() + 4);
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(payload);
    stream.write_all(&buf).await?;
    stream.flush().await
}

/// A pooled RPC client shared by everything that talks to peers.
#[derive(Clone)]
pub struct RpcClient {
    idle: Arc<Mutex<HashMap<String, Vec<TcpStream>>>>,
    max_frame: u32,
    identity: ClusterIdentity,
    refusals: Arc<LogThrottle>,
}

impl RpcClient {
    pub fn new(max_frame: u32, identity: ClusterIdentity) -> RpcClient {
        RpcClient {
            idle: Arc::default(),
            max_frame,
            identity,
            refusals: Arc::default(),
        }
    }

    fn take_idle(&self, addr: &str) -> Option<TcpStream> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.get_mut(addr).and_then(Vec::pop)
    }

    fn put_idle(&self, addr: &str, stream: TcpStream) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let conns = idle.entry(addr.to_string()).or_default();
        if conns.len() < MAX_IDLE_PER_PEER {
            conns.push(stream);
        }
    }

    /// Sends `req` to `addr` and waits for the reply, within `timeout` in total.
    pub async fn call(
        &self,
        addr: &str,
        req: Request,
        timeout: Duration,
    ) -> Result<Response, RpcError> {
        let is_proposal = matches!(req, Request::Propose(_));
        let envelope = Envelope {
            cluster_id: self.identity.current(),
            request: req,
        };
        let payload = serde_json::to_vec(&envelope).map_err(|e| RpcError::Network {
            addr: addr.to_string(),
            source: std::io::Error::other(e),
        })?;
        // A forwarded proposal is not idempotent, so it cannot be resent after a pooled
        // connection turns out stale (was it delivered?): it always dials afresh, and
        // a failure after connecting is reported as such. Raft RPCs are idempotent and
        // reuse idle connections, with one fresh retry when a pooled one is stale.
        let pooled = if is_proposal {
            None
        } else {
            self.take_idle(addr)
        };
        let fut = async {
            if let Some(stream) = pooled {
                if let Ok(resp) = self.exchange(stream, addr, &payload).await {
                    return Ok(resp);
                }
                // The peer restarted or dropped the idle connection: dial afresh.
            }
            let stream =
                TcpStream::connect(addr)
                    .await
                    .map_err(|source| RpcError::Unreachable {
                        addr: addr.to_string(),
                        source,
                    })?;
            let _ = stream.set_nodelay(true);
            self.exchange(stream, addr, &payload).await
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(Response::WrongCluster { cluster_id })) => {
                if self.refusals.allow(addr) {
                    tracing::warn!(%addr, theirs = %cluster_id, ours = ?self.identity.current(),
                        "a configured peer address answers for another cluster; check the peer list");
                }
                Err(RpcError::WrongCluster {
                    addr: addr.to_string(),
                    theirs: cluster_id,
                })
            }
            Ok(r) => r,
            Err(_) => Err(RpcError::Timeout {
                addr: addr.to_string(),
            }),
        }
    }

    async fn exchange(
        &self,
        mut stream: TcpStream,
        addr: &str,
        payload: &[u8],
    ) -> Result<Response, RpcError> {
        let net = |source| RpcError::Network {
            addr: addr.to_string(),
            source,
        };
        write_frame(&mut stream, payload).await.map_err(net)?;
        let bytes = read_frame(&mut stream, self.max_frame).await.map_err(net)?;
        let resp: Response =
            serde_json::from_slice(&bytes).map_err(|e| net(invalid(e.to_string())))?;
        // The peer closes after refusing us: nothing to pool.
        if !matches!(resp, Response::WrongCluster { .. }) {
            self.put_idle(addr, stream);
        }
        Ok(resp)
    }
}

/// openraft's network factory over [`RpcClient`].
#[derive(Clone)]
pub struct TcpNetwork {
    client: RpcClient,
}

impl TcpNetwork {
    pub fn new(client: RpcClient) -> TcpNetwork {
        TcpNetwork { client }
    }
}

/// One peer as seen by openraft's replication and election tasks.
pub struct TcpPeer {
    target: NodeId,
    addr: String,
    client: RpcClient,
}

impl RaftNetworkFactory<TypeConfig> for TcpNetwork {
    type Network = TcpPeer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> TcpPeer {
        TcpPeer {
            target,
            addr: node.addr.clone(),
            client: self.client.clone(),
        }
    }
}

fn to_rpc_error<E: std::error::Error>(e: RpcError) -> RPCError<NodeId, BasicNode, E> {
    match e {
        // Another cluster's node is as good as no node: openraft backs off from it.
        RpcError::Unreachable { .. } | RpcError::WrongCluster { .. } => {
            RPCError::Unreachable(Unreachable::new(&e))
        }
        _ => RPCError::Network(NetworkError::new(&e)),
    }
}

fn unexpected<E: std::error::Error>(addr: &str) -> RPCError<NodeId, BasicNode, E> {
    RPCError::Network(NetworkError::new(&invalid(format!(
        "unexpected response variant from {addr}"
    ))))
}

impl RaftNetwork<TypeConfig> for TcpPeer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self
            .client
            .call(&self.addr, Request::AppendEntries(rpc), option.hard_ttl())
            .await
        {
            Ok(Response::AppendEntries(r)) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(_) => Err(unexpected(&self.addr)),
            Err(e) => Err(to_rpc_error(e)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        match self
            .client
            .call(&self.addr, Request::InstallSnapshot(rpc), option.hard_ttl())
            .await
        {
            Ok(Response::InstallSnapshot(r)) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(_) => Err(unexpected(&self.addr)),
            Err(e) => Err(to_rpc_error(e)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self
            .client
            .call(&self.addr, Request::Vote(rpc), option.hard_ttl())
            .await
        {
            Ok(Response::Vote(r)) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(_) => Err(unexpected(&self.addr)),
            Err(e) => Err(to_rpc_error(e)),
        }
    }
}

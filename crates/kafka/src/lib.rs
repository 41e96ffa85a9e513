//! Sluice's Kafka wire-protocol front end: framing, request dispatch and the
//! handlers that turn Kafka requests into storage and group operations.
//! This is the only crate (with `sluice-group`) that knows the wire format;
//! messages are encoded and decoded with the `kafka-protocol` crate.
//!
//! API CONTRACT — the binary is written against the signatures below.
//!
//! How a connection works (see `connection.rs`): frames are size-prefixed;
//! a size below 0 or above [`ServerConfig::max_request_bytes`] closes the
//! connection before anything is allocated, as do an unknown API key, an
//! unparsable header or body, and an API Sluice does not serve (one
//! `warn` line each). The synchronous part of each request runs in arrival
//! order; waits (durability for acks=1/-1, long-poll fetches) run
//! concurrently, and responses are written in request order, at most 64
//! outstanding per connection. Produce hands the request's record bytes to
//! `Partition::append` untouched and Fetch returns `Partition::read` bytes:
//! records are never decoded on that path.
//!
//! Versions: [`SUPPORTED_APIS`] is what ApiVersions advertises. An
//! ApiVersions request of a version outside it gets UNSUPPORTED_VERSION and
//! the table, encoded at v0. Other APIs at a version above ours that the
//! codec still parses get a response whose error fields all say
//! UNSUPPORTED_VERSION; a version the codec cannot parse closes the
//! connection. Produce v0-v2 are advertised (old librdkafka releases only
//! compress when the Produce range includes v0) but answered with
//! UNSUPPORTED_VERSION per partition, as Kafka 4 does.
//!
//! Two modes. [`KafkaListener::serve`] is the single node: every topic is
//! local, this broker leads everything in epoch 0, the group coordinator
//! owns a local `__consumer_offsets`, and acknowledgements wait for
//! durability. [`KafkaListener::serve_cluster`] is cluster mode
//! (`cluster.rs`, `handlers/cluster_*.rs`, `replica.rs`):
//!
//! - Metadata, DescribeCluster and FindCoordinator come from the quorum's
//!   image: brokers are the registered, unfenced ones with their advertised
//!   Kafka endpoint; partitions carry leader, leader epoch, replicas, ISR
//!   and offline replicas, and a partition without a live leader says
//!   LEADER_NOT_AVAILABLE. The group coordinator is the leader of
//!   `__consumer_offsets-0` (COORDINATOR_NOT_AVAILABLE while it has none).
//! - CreateTopics, DeleteTopics, CreatePartitions, AlterConfigs,
//!   IncrementalAlterConfigs and auto-creation are validated here (names,
//!   counts, config values) and proposed to the quorum; the answer waits
//!   (at most 10 s, or the request's timeout) until the local image shows
//!   the change. Replication factor -1 is min(3, live brokers); manual
//!   replica assignments are refused (INVALID_REPLICA_ASSIGNMENT).
//!   InitProducerId hands out ids from blocks of 1000 allocated by the quorum.
//! - Produce goes to the partition's leader only (NOT_LEADER_OR_FOLLOWER
//!   elsewhere), is appended stamped with the leader's epoch, and is
//!   acknowledged once durable (acks=1) or once the high watermark passes it
//!   (acks=all; NOT_ENOUGH_REPLICAS before appending when the ISR is below
//!   `min.insync.replicas`, REQUEST_TIMED_OUT after the request's timeout).
//! - Fetch with a replica id (v<15 `replica_id`, v15+ `replica_state`) is a
//!   follower's: it records the follower's fetch offset (which may move the
//!   high watermark), reads up to the log end and long-polls on the log end
//!   and the high watermark. Consumer fetches, ListOffsets,
//!   OffsetForLeaderEpoch (followers' too) and DeleteRecords are served by
//!   the leader only, with FENCED_LEADER_EPOCH / UNKNOWN_LEADER_EPOCH on a
//!   stale or future `current_leader_epoch`; consumers read up to the high
//!   watermark (an offset between it and the log end reads empty).
//! - Group requests are served only while this node leads
//!   `__consumer_offsets-0`: the coordinator is opened (after the partition
//!   is committed up to its log end and replayed: COORDINATOR_LOAD_IN_PROGRESS
//!   meanwhile) when the node takes that leadership and closed when it loses
//!   it (NOT_COORDINATOR; ListGroups answers an empty list). The controller
//!   creates `__consumer_offsets` (1 partition, the cluster's internal
//!   replication factor, compacted) and keeps it at that factor.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice_group::GroupConfig;
use sluice_log::Store;

mod api_versions;
mod cluster;
mod connection;
mod dispatch;
mod handlers;
mod replica;
mod server;

pub use api_versions::SUPPORTED_APIS;

/// Decodes one request frame (without its size prefix) the way the server
/// does, without acting on it. For the fuzz target and tests; not an API.
#[doc(hidden)]
pub fn decode_request_frame(frame: &[u8]) -> Result<(), String> {
    dispatch::decode_only(bytes::Bytes::copy_from_slice(frame))
}

/// Front-end settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Where to listen (default 127.0.0.1:9092).
    pub listen: SocketAddr,
    /// Host and port given to clients in Metadata, FindCoordinator and
    /// DescribeCluster; defaults to the bound address (`listen` with the
    /// actual port when it was 0; a wildcard address is advertised as
    /// loopback, so set this when clients connect from elsewhere).
    pub advertised: Option<(String, u16)>,
    /// This broker's node id (0 for a single node).
    pub node_id: i32,
    /// Create a topic on Metadata/Produce for an unknown name (`auto.create.topics.enable`, default true).
    pub auto_create_topics: bool,
    /// Partitions of an auto-created topic (`num.partitions`, default 1).
    pub default_partitions: u32,
    /// Largest request frame accepted, checked before allocating (`socket.request.max.bytes`, default 100 MiB).
    pub max_request_bytes: usize,
    /// Connections served at once; further ones are closed at accept (default 10,000).
    pub max_connections: usize,
    /// How often retention and segment.ms rolls are enforced (default 30 s).
    pub retention_check_interval: Duration,
    pub group: GroupConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9092)),
            advertised: None,
            node_id: 0,
            auto_create_topics: true,
            default_partitions: 1,
            max_request_bytes: 100 * 1024 * 1024,
            max_connections: 10_000,
            retention_check_interval: Duration::from_secs(30),
            group: GroupConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Group(#[from] sluice_group::GroupError),
}

/// A bound Kafka listener, not yet serving. Binding first lets the binary
/// report a taken port before anything else starts.
pub struct KafkaListener {
    listener: tokio::net::TcpListener,
    local_addr: SocketAddr,
    config: ServerConfig,
}

impl KafkaListener {
    pub async fn bind(config: ServerConfig) -> std::io::Result<KafkaListener> {
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        let local_addr = listener.local_addr()?;
        Ok(KafkaListener {
            listener,
            local_addr,
            config,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight
    /// requests finish and returns.
    pub async fn serve(
        self,
        store: Arc<Store>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServeError> {
        server::serve(
            self.listener,
            self.local_addr,
            self.config,
            store,
            None,
            shutdown,
        )
        .await
    }

    /// Cluster mode: serves until `shutdown` resolves, with metadata from
    /// the quorum's image, partitions through `replicas` (leaders take
    /// produce and consumer reads, followers fetch from here) and the group
    /// coordinator on the leader of `__consumer_offsets-0`. Creates that
    /// topic through the quorum if it is missing. Does not shut `replicas`
    /// down.
    pub async fn serve_cluster(
        self,
        store: Arc<Store>,
        replicas: Arc<sluice_replica::ReplicaManager>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServeError> {
        server::serve(
            self.listener,
            self.local_addr,
            self.config,
            store,
            Some(Arc::new(replica::Live(replicas))),
            shutdown,
        )
        .await
    }
}

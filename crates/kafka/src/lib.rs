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
//! One path. The handlers are written once against
//! [`sluice_topology::Topology`] (metadata, proposals, partition leadership)
//! and [`sluice_group::Coordination`] (the group coordinator on the leader of
//! `__consumer_offsets-0`); a single node is a cluster of one voter, so there
//! is no mode to branch on. *Architecture invariant:* this crate depends on
//! the topology seam, never on the replication layer or the quorum behind it.
//!
//! - Metadata, DescribeCluster and FindCoordinator come from the image:
//!   brokers are the registered, unfenced ones with their advertised Kafka
//!   endpoint; partitions carry leader, leader epoch, replicas, ISR and
//!   offline replicas, and a partition without a live leader says
//!   LEADER_NOT_AVAILABLE. A node whose view may be stale names no leaders.
//!   A topic this node does not know is looked up again after the
//!   controller's read index (at most 2 s) before it is called unknown or
//!   auto-created. The group coordinator is the leader of
//!   `__consumer_offsets-0` (COORDINATOR_NOT_AVAILABLE while it has none).
//! - CreateTopics, DeleteTopics, CreatePartitions, AlterConfigs,
//!   IncrementalAlterConfigs and auto-creation are proposed to the quorum,
//!   which validates them; the answer waits (at most 10 s, or the request's
//!   timeout) until the local image shows the change. Replication factor -1
//!   is min(3, live brokers); manual replica assignments are refused
//!   (INVALID_REPLICA_ASSIGNMENT; `sluice partition reassign` moves
//!   replicas). Auto-creation on Metadata waits up to 3 s for the topic; on
//!   Produce it runs in the background and the produce is answered
//!   UNKNOWN_TOPIC_OR_PARTITION (retriable).
//! - InitProducerId hands out ids from blocks of 1000 allocated by the quorum.
//! - Produce goes to the partition's leader only (NOT_LEADER_OR_FOLLOWER
//!   elsewhere), is appended through its [`sluice_topology::Leadership`]
//!   (stamped with the leader epoch), and is acknowledged once durable
//!   (acks=1) or once the high watermark passes it (acks=all;
//!   NOT_ENOUGH_REPLICAS before appending when the ISR is below
//!   `min.insync.replicas`, REQUEST_TIMED_OUT after the request's timeout).
//! - Fetch with a replica id (v<15 `replica_id`, v15+ `replica_state`) is a
//!   follower's and goes to the topology's leader side of replication, per
//!   partition. Consumer fetches, ListOffsets, OffsetForLeaderEpoch and
//!   DeleteRecords are served by the leader only, with FENCED_LEADER_EPOCH /
//!   UNKNOWN_LEADER_EPOCH on a stale or future `current_leader_epoch`;
//!   consumers read up to the high watermark. DeleteRecords answers once the
//!   low watermark (the in-sync followers' log starts) reaches the new start.
//! - Group requests are served only while this node leads
//!   `__consumer_offsets-0` (NOT_COORDINATOR otherwise,
//!   COORDINATOR_LOAD_IN_PROGRESS while the coordinator replays the log;
//!   ListGroups answers an empty list on a node that coordinates nothing).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use sluice_group::Coordination;
use sluice_topology::Topology;

mod api_versions;
mod connection;
mod dispatch;
mod error_counts;
mod fetch_sessions;
mod handlers;
mod metrics;
mod quotas;
mod records;
mod server;

pub use api_versions::SUPPORTED_APIS;
pub use metrics::KafkaMetrics;

/// Decodes one request frame (without its size prefix) the way the server
/// does, without acting on it. For the fuzz target and tests; not an API.
#[doc(hidden)]
pub fn decode_request_frame(frame: &[u8]) -> Result<(), String> {
    dispatch::decode_only(bytes::Bytes::copy_from_slice(frame))
}

/// Checks the records of a producer's batches the way Produce does before
/// appending; the error is what the client is told. For the fuzz target and
/// tests; not an API.
#[doc(hidden)]
pub fn validate_records(batches: &[u8], max_decompressed: usize) -> Result<(), String> {
    records::validate(
        batches,
        records::RecordLimits {
            max_decompressed,
            keys_required: false,
            timestamp_window: None,
        },
    )
    .map_err(|fault| fault.message)
}

/// Front-end settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Where to listen (default 127.0.0.1:9092).
    pub listen: SocketAddr,
    /// Host and port clients are told to connect to for this node (see
    /// [`KafkaListener::advertised`]); set it when clients connect from elsewhere.
    pub advertised: Option<(String, u16)>,
    /// Create a topic on Metadata/Produce for an unknown name (`auto.create.topics.enable`, default true).
    pub auto_create_topics: bool,
    /// Partitions of an auto-created topic (`num.partitions`, default 1).
    pub default_partitions: u32,
    /// Largest request frame accepted, checked before allocating (`socket.request.max.bytes`, default 100 MiB).
    pub max_request_bytes: usize,
    /// Connections served at once; further ones are closed at accept (default 10,000).
    pub max_connections: usize,
    /// Connections served at once from one client address (`max.connections.per.ip`;
    /// default: no limit below `max_connections`).
    pub max_connections_per_ip: usize,
    /// A connection with no request read and no response written for this long
    /// is closed (`connections.max.idle.ms`, default 10 minutes).
    pub connections_max_idle: std::time::Duration,
    /// Most record bytes in one Fetch response, whatever the client asks
    /// (`fetch.max.bytes`, default 55 MiB); also each partition's share of a
    /// follower's fetch. The first batch of a response may exceed it (KIP-74).
    pub fetch_max_bytes: usize,
    /// Incremental fetch sessions (KIP-227) kept at once
    /// (`max.incremental.fetch.session.cache.slots`, default 1000); 0 turns
    /// them off, and clients send full fetch requests.
    pub fetch_session_slots: usize,
    /// The reader of a connection stops taking requests while the responses
    /// built for it and not yet written exceed this many bytes (default 64 MiB).
    pub max_unsent_response_bytes: usize,
    /// Most bytes the records of one compressed batch may take once
    /// decompressed; a batch beyond it is refused with CORRUPT_MESSAGE
    /// after at most that much decompression work (default 64 MiB).
    pub max_decompressed_batch_bytes: usize,
    /// Broker-wide budget of request bytes being handled and of response
    /// bytes not yet written (default 512 MiB): no reader starts a new
    /// request while requests exceed it, Fetch answers are cut to what is
    /// left of it, and connections holding unsent answers are muted while
    /// answers exceed it.
    pub max_in_flight_bytes: usize,
    /// Longest `transaction.timeout.ms` a transactional producer may ask
    /// for (`transaction.max.timeout.ms`, default 15 minutes); a longer one
    /// is refused with INVALID_TRANSACTION_TIMEOUT.
    pub transaction_max_timeout_ms: i32,
    /// Broker settings other layers own (storage, cluster), under Kafka's
    /// names, that DescribeConfigs reports read-only with the front end's.
    pub other_broker_configs: Vec<(&'static str, String, sluice_vocab::ConfigType)>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9092)),
            advertised: None,
            auto_create_topics: true,
            default_partitions: 1,
            max_request_bytes: 100 * 1024 * 1024,
            max_connections: 10_000,
            max_connections_per_ip: usize::MAX,
            connections_max_idle: std::time::Duration::from_secs(600),
            fetch_max_bytes: 55 * 1024 * 1024,
            fetch_session_slots: 1000,
            max_unsent_response_bytes: 64 * 1024 * 1024,
            max_decompressed_batch_bytes: 64 * 1024 * 1024,
            max_in_flight_bytes: 512 * 1024 * 1024,
            transaction_max_timeout_ms: 900_000,
            other_broker_configs: Vec::new(),
        }
    }
}

/// A bound Kafka listener, not yet serving. Binding first lets the binary
/// report a taken port before anything else starts.
pub struct KafkaListener {
    listener: tokio::net::TcpListener,
    local_addr: SocketAddr,
    config: ServerConfig,
    disk_low: tokio::sync::watch::Receiver<bool>,
    metrics: Arc<KafkaMetrics>,
}

impl KafkaListener {
    pub async fn bind(config: ServerConfig) -> std::io::Result<KafkaListener> {
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        let local_addr = listener.local_addr()?;
        Ok(KafkaListener {
            listener,
            local_addr,
            config,
            // Never raised unless a monitor is attached.
            disk_low: tokio::sync::watch::channel(false).1,
            metrics: Arc::default(),
        })
    }

    /// Refuses produce requests with KAFKA_STORAGE_ERROR (retriable) while
    /// `disk_low` holds true: the node's free-space floor.
    pub fn with_disk_alarm(
        mut self,
        disk_low: tokio::sync::watch::Receiver<bool>,
    ) -> KafkaListener {
        self.disk_low = disk_low;
        self
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The listener's request figures, for the node's /metrics.
    pub fn metrics(&self) -> Arc<KafkaMetrics> {
        self.metrics.clone()
    }

    /// The host and port clients are told to connect to for this node:
    /// [`ServerConfig::advertised`], else the bound address (a wildcard one as
    /// loopback). The node registers it in the metadata, where every node's
    /// Metadata answers find it.
    pub fn advertised(&self) -> (String, u16) {
        match &self.config.advertised {
            Some((host, port)) => (host.clone(), *port),
            None => (
                server::advertised_ip(self.local_addr.ip()).to_string(),
                self.local_addr.port(),
            ),
        }
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight
    /// requests finish and returns: metadata and partitions through
    /// `topology`, groups through `groups`.
    pub async fn serve(
        self,
        topology: Arc<dyn Topology>,
        groups: Arc<Coordination>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        server::serve(
            self.listener,
            self.config,
            topology,
            groups,
            self.disk_low,
            self.metrics,
            shutdown,
        )
        .await
    }
}

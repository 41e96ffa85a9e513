//! `sluice serve` configuration: command-line flags, `SLUICE_*` environment
//! variables and a TOML file, merged with the precedence
//! flag > environment > file > built-in default.
//!
//! Flags and environment variables are one layer here because clap reads
//! both into the same `Option` (a flag wins over its variable); the file is
//! the layer below, and [`Defaults`] the last.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args, ValueEnum};
use serde::Deserialize;
use sluice_amqp::AmqpConfig;
use sluice_group::GroupConfig;
use sluice_log::{CleanerConfig, FlushPolicy, TopicConfig};

/// Built-in defaults (documented in `sluice.example.toml`; keep both in step).
pub struct Defaults;

impl Defaults {
    pub const DATA_DIR: &'static str = "./data";
    pub const KAFKA_ADDR: &'static str = "127.0.0.1:9092";
    pub const HTTP_ADDR: &'static str = "127.0.0.1:8080";
    pub const AMQP_ADDR: &'static str = "127.0.0.1:5672";
    pub const NODE_ID: i32 = 0;
    pub const FLUSH: FlushMode = FlushMode::Always;
    pub const FLUSH_INTERVAL_MS: u64 = 1_000;
    pub const FLUSH_BYTES: u64 = 8 * 1024 * 1024;
    pub const RETENTION_CHECK_INTERVAL_MS: u64 = 300_000;
    /// Kafka's `log.cleaner.backoff.ms`.
    pub const CLEANER_CHECK_INTERVAL_MS: u64 = 15_000;
    pub const AUTO_CREATE_TOPICS: bool = true;
    pub const NUM_PARTITIONS: u32 = 1;
    pub const MAX_REQUEST_BYTES: usize = 100 * 1024 * 1024;
    pub const MAX_CONNECTIONS: usize = 10_000;
    /// Kafka's fetch.max.bytes.
    pub const FETCH_MAX_BYTES: usize = 55 * 1024 * 1024;
    pub const FETCH_SESSION_SLOTS: usize = 1000;
    pub const MAX_UNSENT_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
    pub const MAX_DECOMPRESSED_BATCH_BYTES: usize = 64 * 1024 * 1024;
    pub const MAX_IN_FLIGHT_BYTES: usize = 512 * 1024 * 1024;
    /// Kafka's `transaction.max.timeout.ms`.
    pub const TRANSACTION_MAX_TIMEOUT_MS: i32 = 900_000;
    /// Kafka's connections.max.idle.ms.
    pub const CONNECTIONS_MAX_IDLE_MS: u64 = 600_000;
    pub const RAFT_ADDR: &'static str = "0.0.0.0:9093";
    /// acks=all needs this many in-sync replicas (Kafka's default is 1; two of
    /// three keeps every acknowledged write through the loss of any one node).
    pub const MIN_INSYNC_REPLICAS: i32 = 2;
    pub const REPLICA_LAG_TIME_MAX_MS: u64 = 5_000;
    pub const SESSION_TIMEOUT_MS: u64 = 6_000;
}

/// The `--flush` policy names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlushMode {
    /// fsync before acknowledging (group commit shares one fsync).
    Always,
    /// fsync in the background every flush_interval_ms / flush_bytes.
    Interval,
    /// never fsync explicitly (rely on replication).
    Never,
}

/// Flags of `sluice serve`; every one also reads a `SLUICE_*` variable.
#[derive(Args, Debug, Default, Clone)]
pub struct ServeArgs {
    /// TOML configuration file (see sluice.example.toml).
    #[arg(long, env = "SLUICE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory holding topics, offsets and producer state [default: ./data].
    #[arg(long, env = "SLUICE_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Kafka listener; port 0 picks a free port [default: 127.0.0.1:9092].
    #[arg(long, env = "SLUICE_KAFKA_ADDR", value_name = "HOST:PORT")]
    pub kafka_addr: Option<String>,
    /// AMQP 0-9-1 listener (RabbitMQ clients); port 0 picks a free port
    /// [default: 127.0.0.1:5672].
    #[arg(long, env = "SLUICE_AMQP_ADDR", value_name = "HOST:PORT")]
    pub amqp_addr: Option<String>,
    /// Whether the AMQP user `guest` may only connect from loopback, as in
    /// RabbitMQ [default: true].
    #[arg(long, env = "SLUICE_AMQP_GUEST_LOOPBACK_ONLY", value_name = "BOOL",
          action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub amqp_guest_loopback_only: Option<bool>,
    /// The AMQP user created when the cluster first starts, with all permissions
    /// on the vhost `/` (RabbitMQ's default_user) [default: guest].
    #[arg(long, env = "SLUICE_AMQP_DEFAULT_USER", value_name = "NAME")]
    pub amqp_default_user: Option<String>,
    /// That user's password (RabbitMQ's default_pass) [default: guest]. Only
    /// its salted hash is stored.
    #[arg(
        long,
        env = "SLUICE_AMQP_DEFAULT_PASS",
        value_name = "PASSWORD",
        hide_env_values = true
    )]
    pub amqp_default_pass: Option<String>,
    /// Largest AMQP message body accepted, in bytes [default: 16777216].
    #[arg(long, env = "SLUICE_AMQP_MAX_MESSAGE_BYTES", value_name = "N")]
    pub amqp_max_message_bytes: Option<u64>,
    /// Free bytes on the data directory's disk below which AMQP publishers are
    /// blocked (RabbitMQ's disk_free_limit) and Kafka produce requests are
    /// refused with KAFKA_STORAGE_ERROR, a retriable error [default: 50000000].
    #[arg(long, env = "SLUICE_AMQP_DISK_FREE_LIMIT_BYTES", value_name = "N")]
    pub amqp_disk_free_limit_bytes: Option<u64>,
    /// Resident memory above which AMQP publishers are blocked (RabbitMQ's
    /// vm_memory_high_watermark) [default: 40% of the machine's memory].
    #[arg(
        long,
        env = "SLUICE_AMQP_MEMORY_HIGH_WATERMARK_BYTES",
        value_name = "N"
    )]
    pub amqp_memory_high_watermark_bytes: Option<u64>,
    /// HTTP listener (/healthz, /metrics, /api/v1) [default: 127.0.0.1:8080].
    #[arg(long, env = "SLUICE_HTTP_ADDR", value_name = "HOST:PORT")]
    pub http_addr: Option<String>,
    /// The web console on the HTTP port shows but cannot delete or reset
    /// anything [default: false].
    #[arg(long, env = "SLUICE_CONSOLE_READ_ONLY", value_name = "BOOL",
          action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub console_read_only: Option<bool>,
    /// Per-partition series in /metrics (off for nodes with very many
    /// partitions; per-topic series stay) [default: true].
    #[arg(long, env = "SLUICE_PARTITION_METRICS", value_name = "BOOL",
          action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub partition_metrics: Option<bool>,
    /// Figures the data path keeps for /metrics: request times and error
    /// codes, records and bytes produced and fetched, flush rounds. Off,
    /// requests and flushes touch none of them and /metrics shows what costs
    /// nothing (process, cluster, offsets) [default: true].
    #[arg(long, env = "SLUICE_METRICS", value_name = "BOOL",
          action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub metrics: Option<bool>,
    /// Address given to Kafka clients in Metadata [default: the Kafka listener].
    #[arg(
        long,
        visible_alias = "advertised-kafka",
        env = "SLUICE_ADVERTISED_KAFKA_ADDR",
        value_name = "HOST:PORT"
    )]
    pub advertised_kafka_addr: Option<String>,
    /// This broker's id; in a cluster, its entry in --cluster-peers, or a new id
    /// for a broker joining a running cluster [default: 0].
    #[arg(long, env = "SLUICE_NODE_ID", value_name = "N")]
    pub node_id: Option<i32>,
    /// Cluster mode: every voter of the metadata quorum as ID@HOST:PORT (their
    /// Raft addresses), comma-separated. A node whose --node-id is not listed
    /// joins the running cluster as a broker (give it --raft-advertised).
    /// Absent: one node.
    #[arg(long, env = "SLUICE_CLUSTER_PEERS", value_name = "ID@HOST:PORT,...")]
    pub cluster_peers: Option<String>,
    /// Cluster mode: the Raft (inter-node) listener [default: 0.0.0.0:9093].
    #[arg(long, env = "SLUICE_RAFT_LISTEN", value_name = "HOST:PORT")]
    pub raft_listen: Option<String>,
    /// Cluster mode: where the other nodes reach this node's Raft listener
    /// [default: this node's entry in --cluster-peers; required for a broker
    /// that is not one of them].
    #[arg(long, env = "SLUICE_RAFT_ADVERTISED", value_name = "HOST:PORT")]
    pub raft_advertised: Option<String>,
    /// Cluster mode: where the other nodes reach this node's Kafka listener to
    /// replicate [default: this node's host in --cluster-peers with the Kafka port].
    #[arg(long, env = "SLUICE_REPLICA_ADDR", value_name = "HOST:PORT")]
    pub replica_addr: Option<String>,
    /// Cluster mode: in-sync replicas acks=all needs, unless a topic sets
    /// min.insync.replicas [default: 2].
    #[arg(long, env = "SLUICE_MIN_INSYNC_REPLICAS", value_name = "N")]
    pub min_insync_replicas: Option<i32>,
    /// Cluster mode: replicas of each internal topic partition (consumer offsets)
    /// [default: min(3, voters in --cluster-peers)].
    #[arg(long, env = "SLUICE_INTERNAL_REPLICATION_FACTOR", value_name = "N")]
    pub internal_replication_factor: Option<usize>,
    /// Cluster mode: the cluster id (Kafka's cluster.id), the same on every node;
    /// nodes refuse inter-node requests from another cluster [default: a random id
    /// the first controller picks].
    #[arg(long, env = "SLUICE_CLUSTER_ID", value_name = "ID")]
    pub cluster_id: Option<String>,
    /// When appended records are fsynced [default: always].
    #[arg(long, env = "SLUICE_FLUSH", value_enum)]
    pub flush: Option<FlushMode>,
    /// With --flush interval: fsync at least this often [default: 1000].
    #[arg(long, env = "SLUICE_FLUSH_INTERVAL_MS", value_name = "N")]
    pub flush_interval_ms: Option<u64>,
    /// With --flush interval: fsync once this many bytes are unsynced [default: 8388608].
    #[arg(long, env = "SLUICE_FLUSH_BYTES", value_name = "N")]
    pub flush_bytes: Option<u64>,
    /// How long the first join of an empty group waits for more members [default: 3000].
    #[arg(
        long,
        env = "SLUICE_GROUP_INITIAL_REBALANCE_DELAY_MS",
        value_name = "N"
    )]
    pub group_initial_rebalance_delay_ms: Option<u64>,
    /// Create unknown topics on Metadata/Produce [default: true].
    #[arg(long, env = "SLUICE_AUTO_CREATE_TOPICS", value_name = "BOOL",
          action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub auto_create_topics: Option<bool>,
    /// Partitions of an auto-created topic [default: 1].
    #[arg(long, env = "SLUICE_NUM_PARTITIONS", value_name = "N")]
    pub num_partitions: Option<u32>,
    /// Largest request frame accepted, in bytes [default: 104857600].
    #[arg(long, env = "SLUICE_MAX_REQUEST_BYTES", value_name = "N")]
    pub max_request_bytes: Option<usize>,
    /// Kafka connections served at once [default: 10000].
    #[arg(long, env = "SLUICE_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,
    /// Most record bytes in one Fetch response, whatever the client asks for
    /// [default: 57671680].
    #[arg(long, env = "SLUICE_FETCH_MAX_BYTES", value_name = "N")]
    pub fetch_max_bytes: Option<usize>,
    /// Incremental fetch sessions (KIP-227) kept at once; 0 turns them off
    /// [default: 1000].
    #[arg(long, env = "SLUICE_FETCH_SESSION_SLOTS", value_name = "N")]
    pub fetch_session_slots: Option<usize>,
    /// Kafka connections served at once from one client address
    /// [default: no limit of its own].
    #[arg(long, env = "SLUICE_MAX_CONNECTIONS_PER_IP", value_name = "N")]
    pub max_connections_per_ip: Option<usize>,
    /// Close a connection that sent no request and got no response for this
    /// long [default: 600000].
    #[arg(long, env = "SLUICE_CONNECTIONS_MAX_IDLE_MS", value_name = "MS")]
    pub connections_max_idle_ms: Option<u64>,
    /// Stop reading a connection's requests while its built, unsent responses
    /// exceed this many bytes [default: 67108864].
    #[arg(long, env = "SLUICE_MAX_UNSENT_RESPONSE_BYTES", value_name = "N")]
    pub max_unsent_response_bytes: Option<usize>,
    /// Refuse a compressed batch whose records take more than this many
    /// bytes decompressed [default: 67108864].
    #[arg(long, env = "SLUICE_MAX_DECOMPRESSED_BATCH_BYTES", value_name = "N")]
    pub max_decompressed_batch_bytes: Option<usize>,
    /// Broker-wide budget for requests being handled and answers not yet
    /// written; beyond it readers wait and Fetch answers shrink [default: 536870912].
    #[arg(long, env = "SLUICE_MAX_IN_FLIGHT_BYTES", value_name = "N")]
    pub max_in_flight_bytes: Option<usize>,
    /// Longest transaction timeout a transactional producer may ask for;
    /// a longer one is refused (`transaction.max.timeout.ms`) [default: 900000].
    #[arg(long, env = "SLUICE_TRANSACTION_MAX_TIMEOUT_MS", value_name = "MS")]
    pub transaction_max_timeout_ms: Option<i32>,
}

/// The TOML file. Unknown keys are errors so that a typo is not silently ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub server: ServerSection,
    pub storage: StorageSection,
    pub kafka: KafkaSection,
    pub amqp: AmqpSection,
    pub group: GroupSection,
    pub cluster: ClusterSection,
    /// Broker-wide topic defaults with Kafka's names (`retention.ms = 86400000`).
    pub defaults: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSection {
    pub kafka_addr: Option<String>,
    pub amqp_addr: Option<String>,
    pub http_addr: Option<String>,
    pub console_read_only: Option<bool>,
    pub partition_metrics: Option<bool>,
    pub metrics: Option<bool>,
    pub advertised_kafka_addr: Option<String>,
    pub node_id: Option<i32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpSection {
    pub frame_max: Option<u32>,
    pub channel_max: Option<u16>,
    pub heartbeat_secs: Option<u16>,
    pub max_message_bytes: Option<u64>,
    pub guest_loopback_only: Option<bool>,
    pub default_user: Option<String>,
    pub default_pass: Option<String>,
    pub disk_free_limit_bytes: Option<u64>,
    pub memory_high_watermark_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSection {
    pub data_dir: Option<PathBuf>,
    pub flush: Option<FlushMode>,
    pub flush_interval_ms: Option<u64>,
    pub flush_bytes: Option<u64>,
    pub retention_check_interval_ms: Option<u64>,
    pub cleaner_check_interval_ms: Option<u64>,
    pub cleaner_io_max_bytes_per_second: Option<u64>,
    pub cleaner_dedupe_buffer_bytes: Option<usize>,
    pub max_open_segment_files: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSection {
    pub auto_create_topics: Option<bool>,
    pub num_partitions: Option<u32>,
    pub max_request_bytes: Option<usize>,
    pub max_connections: Option<usize>,
    pub fetch_max_bytes: Option<usize>,
    pub fetch_session_slots: Option<usize>,
    pub max_connections_per_ip: Option<usize>,
    pub connections_max_idle_ms: Option<u64>,
    pub max_unsent_response_bytes: Option<usize>,
    pub max_decompressed_batch_bytes: Option<usize>,
    pub max_in_flight_bytes: Option<usize>,
    pub transaction_max_timeout_ms: Option<i32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    /// `["1@host1:9093", "2@host2:9093", "3@host3:9093"]` or one comma-separated string.
    pub peers: Option<PeersValue>,
    pub raft_listen: Option<String>,
    pub raft_advertised: Option<String>,
    pub replica_addr: Option<String>,
    pub min_insync_replicas: Option<i32>,
    pub internal_replication_factor: Option<usize>,
    pub cluster_id: Option<String>,
    pub replica_lag_time_max_ms: Option<u64>,
    pub session_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PeersValue {
    List(Vec<String>),
    Text(String),
}

/// Cluster mode settings (present when peers are configured).
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    /// The voters of the metadata quorum.
    pub peers: Vec<(i32, String)>,
    pub raft_listen: SocketAddr,
    /// This node's Raft address as the others reach it: its entry in `peers`,
    /// or the configured one for a broker that is not a voter.
    pub raft_advertised: String,
    pub replica_addr: Option<String>,
    pub min_insync_replicas: i32,
    /// Replicas of each internal topic partition.
    pub internal_replication_factor: usize,
    /// The configured cluster id, if any.
    pub cluster_id: Option<String>,
    pub replica_lag_time_max: Duration,
    pub session_timeout: Duration,
}

/// Parses `1@host:9093,2@host:9093`.
pub fn parse_peers(text: &str) -> Result<Vec<(i32, String)>> {
    let mut peers = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((id, addr)) = part.split_once('@') else {
            bail!("cluster peer {part:?} is not ID@HOST:PORT");
        };
        let id: i32 = id
            .trim()
            .parse()
            .with_context(|| format!("cluster peer {part:?}: {id:?} is not a node id"))?;
        if id < 0 {
            bail!("cluster peer {part:?}: node ids are not negative");
        }
        split_host_port(addr.trim()).with_context(|| format!("cluster peer {part:?}"))?;
        if peers.iter().any(|(p, _)| *p == id) {
            bail!("node id {id} appears twice in the cluster peers");
        }
        peers.push((id, addr.trim().to_string()));
    }
    if peers.is_empty() {
        bail!("the cluster peer list is empty");
    }
    Ok(peers)
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GroupSection {
    pub initial_rebalance_delay_ms: Option<u64>,
    pub min_session_timeout_ms: Option<i32>,
    pub max_session_timeout_ms: Option<i32>,
    pub consumer_session_timeout_ms: Option<u64>,
    pub consumer_heartbeat_interval_ms: Option<u64>,
    pub consumer_assignors: Option<Vec<String>>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        FileConfig::parse(&text).with_context(|| format!("invalid config file {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<FileConfig> {
        Ok(toml::from_str(text)?)
    }
}

/// Resource alarms: below this much free disk or above this much resident
/// memory, AMQP publishers are blocked until it passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResourceLimits {
    pub disk_free_bytes: u64,
    /// `None`: 40% of the machine's memory, as RabbitMQ's default watermark.
    pub memory_bytes: Option<u64>,
}

impl ResourceLimits {
    /// RabbitMQ's default `disk_free_limit`.
    pub const DEFAULT_DISK_FREE_BYTES: u64 = 50_000_000;
}

/// The merged configuration `serve` runs with.
#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    pub kafka_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// The web console refuses destructive actions.
    pub console_read_only: bool,
    /// Per-partition series in /metrics.
    pub partition_metrics: bool,
    /// The data path keeps its figures for /metrics.
    pub metrics: bool,
    pub amqp: AmqpConfig,
    /// When AMQP publishers are blocked.
    pub resource_limits: ResourceLimits,
    pub advertised: Option<(String, u16)>,
    pub node_id: i32,
    pub flush: FlushPolicy,
    pub retention_check_interval: Duration,
    /// How often compacted topics are checked for a compaction round.
    pub cleaner_check_interval: Duration,
    pub cleaner: CleanerConfig,
    /// Segment log files kept open at most (0: half the descriptor limit).
    pub max_open_segment_files: usize,
    pub auto_create_topics: bool,
    pub num_partitions: u32,
    pub max_request_bytes: usize,
    pub max_connections: usize,
    pub fetch_max_bytes: usize,
    pub fetch_session_slots: usize,
    pub max_connections_per_ip: usize,
    pub connections_max_idle: Duration,
    pub max_unsent_response_bytes: usize,
    pub max_decompressed_batch_bytes: usize,
    pub max_in_flight_bytes: usize,
    pub transaction_max_timeout_ms: i32,
    pub group: GroupConfig,
    /// Cluster mode, when peers are configured.
    pub cluster: Option<ClusterSettings>,
    /// `[defaults]`, as strings for [`TopicConfig::set`].
    pub topic_defaults: BTreeMap<String, String>,
}

impl Config {
    /// Reads the file named by `--config`/`SLUICE_CONFIG` (if any) and merges.
    pub fn load(args: &ServeArgs) -> Result<Config> {
        let file = match &args.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        Config::merge(args, file)
    }

    /// Merges the flag/env layer over the file layer over the defaults.
    pub fn merge(args: &ServeArgs, file: FileConfig) -> Result<Config> {
        let data_dir = args
            .data_dir
            .clone()
            .or(file.storage.data_dir)
            .unwrap_or_else(|| PathBuf::from(Defaults::DATA_DIR));
        let kafka_addr = pick(
            &args.kafka_addr,
            file.server.kafka_addr,
            Defaults::KAFKA_ADDR,
        );
        let http_addr = pick(&args.http_addr, file.server.http_addr, Defaults::HTTP_ADDR);
        let amqp_addr = pick(&args.amqp_addr, file.server.amqp_addr, Defaults::AMQP_ADDR);
        let mut amqp = AmqpConfig::new(resolve(&amqp_addr).context("invalid AMQP listen address")?);
        if let Some(f) = file.amqp.frame_max {
            if f < 4096 {
                bail!("[amqp] frame_max must be at least 4096");
            }
            amqp.frame_max = f;
        }
        if let Some(c) = file.amqp.channel_max {
            amqp.channel_max = c.max(1);
        }
        if let Some(h) = file.amqp.heartbeat_secs {
            amqp.heartbeat_secs = h;
        }
        if let Some(m) = args.amqp_max_message_bytes.or(file.amqp.max_message_bytes) {
            // RabbitMQ's own ceiling for max_message_size.
            if m > 512 * 1024 * 1024 {
                bail!("amqp max_message_bytes must be at most 536870912 (512 MiB)");
            }
            amqp.max_message_bytes = m;
        }
        if let Some(g) = args
            .amqp_guest_loopback_only
            .or(file.amqp.guest_loopback_only)
        {
            amqp.guest_loopback_only = g;
        }
        if let Some(u) = args
            .amqp_default_user
            .clone()
            .or(file.amqp.default_user.clone())
        {
            if let Err(e) = sluice_topology::access::validate_name("user", &u) {
                bail!("amqp default_user: {e}");
            }
            amqp.default_user = u;
        }
        if let Some(p) = args
            .amqp_default_pass
            .clone()
            .or(file.amqp.default_pass.clone())
        {
            amqp.default_pass = p;
        }
        let resource_limits = ResourceLimits {
            disk_free_bytes: args
                .amqp_disk_free_limit_bytes
                .or(file.amqp.disk_free_limit_bytes)
                .unwrap_or(ResourceLimits::DEFAULT_DISK_FREE_BYTES),
            memory_bytes: args
                .amqp_memory_high_watermark_bytes
                .or(file.amqp.memory_high_watermark_bytes),
        };
        let advertised = args
            .advertised_kafka_addr
            .clone()
            .or(file.server.advertised_kafka_addr)
            .map(|a| split_host_port(&a).context("invalid advertised Kafka address"))
            .transpose()?;

        let flush_mode = args.flush.or(file.storage.flush).unwrap_or(Defaults::FLUSH);
        let flush = match flush_mode {
            FlushMode::Always => FlushPolicy::Always,
            FlushMode::Never => FlushPolicy::Never,
            FlushMode::Interval => {
                let ms = args
                    .flush_interval_ms
                    .or(file.storage.flush_interval_ms)
                    .unwrap_or(Defaults::FLUSH_INTERVAL_MS);
                let bytes = args
                    .flush_bytes
                    .or(file.storage.flush_bytes)
                    .unwrap_or(Defaults::FLUSH_BYTES);
                if ms == 0 {
                    bail!("flush interval must be at least 1 ms (use --flush always to fsync every write)");
                }
                FlushPolicy::Interval { ms, bytes }
            }
        };

        let defaults = GroupConfig::default();
        let group = GroupConfig {
            initial_rebalance_delay_ms: args
                .group_initial_rebalance_delay_ms
                .or(file.group.initial_rebalance_delay_ms)
                .unwrap_or(defaults.initial_rebalance_delay_ms),
            min_session_timeout_ms: file
                .group
                .min_session_timeout_ms
                .unwrap_or(defaults.min_session_timeout_ms),
            max_session_timeout_ms: file
                .group
                .max_session_timeout_ms
                .unwrap_or(defaults.max_session_timeout_ms),
            consumer_session_timeout_ms: file
                .group
                .consumer_session_timeout_ms
                .unwrap_or(defaults.consumer_session_timeout_ms),
            consumer_heartbeat_interval_ms: file
                .group
                .consumer_heartbeat_interval_ms
                .unwrap_or(defaults.consumer_heartbeat_interval_ms),
            consumer_assignors: file
                .group
                .consumer_assignors
                .clone()
                .unwrap_or_else(|| defaults.consumer_assignors.clone()),
        };
        if group.consumer_heartbeat_interval_ms == 0
            || group.consumer_heartbeat_interval_ms >= group.consumer_session_timeout_ms
        {
            bail!(
                "[group] consumer_heartbeat_interval_ms ({}) must be at least 1 and below consumer_session_timeout_ms ({})",
                group.consumer_heartbeat_interval_ms,
                group.consumer_session_timeout_ms
            );
        }
        if group.consumer_assignors.is_empty()
            || group
                .consumer_assignors
                .iter()
                .any(|a| !sluice_group::SERVER_ASSIGNORS.contains(&a.as_str()))
        {
            bail!(
                "[group] consumer_assignors must name some of {:?}",
                sluice_group::SERVER_ASSIGNORS
            );
        }
        if group.min_session_timeout_ms > group.max_session_timeout_ms {
            bail!(
                "[group] min_session_timeout_ms ({}) is above max_session_timeout_ms ({})",
                group.min_session_timeout_ms,
                group.max_session_timeout_ms
            );
        }

        let transaction_max_timeout_ms = args
            .transaction_max_timeout_ms
            .or(file.kafka.transaction_max_timeout_ms)
            .unwrap_or(Defaults::TRANSACTION_MAX_TIMEOUT_MS);
        if transaction_max_timeout_ms < 1 {
            bail!("transaction_max_timeout_ms must be at least 1");
        }

        let num_partitions = args
            .num_partitions
            .or(file.kafka.num_partitions)
            .unwrap_or(Defaults::NUM_PARTITIONS);
        if num_partitions == 0 {
            bail!("num_partitions must be at least 1");
        }

        let mut topic_defaults = BTreeMap::new();
        for (key, value) in file.defaults {
            if !TopicConfig::KEYS.contains(&key.as_str()) {
                bail!(
                    "[defaults] has unknown topic config {key:?}; known: {}",
                    TopicConfig::KEYS.join(", ")
                );
            }
            let value = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => bail!("[defaults] {key} must be a string or an integer, not {other}"),
            };
            topic_defaults.insert(key, value);
        }

        let node_id = args
            .node_id
            .or(file.server.node_id)
            .unwrap_or(Defaults::NODE_ID);
        let peers_text = args.cluster_peers.clone().or(match file.cluster.peers {
            Some(PeersValue::List(l)) => Some(l.join(",")),
            Some(PeersValue::Text(t)) => Some(t),
            None => None,
        });
        let cluster = match peers_text {
            None => None,
            Some(text) => {
                let peers = parse_peers(&text)?;
                let configured = args
                    .raft_advertised
                    .clone()
                    .or(file.cluster.raft_advertised);
                let listed = peers.iter().find(|(id, _)| *id == node_id);
                let raft_advertised = match (configured, listed) {
                    (Some(a), Some((_, p))) if a != *p => bail!(
                        "--raft-advertised {a} differs from node {node_id}'s entry {p} in the cluster peers"
                    ),
                    (Some(a), _) => a,
                    (None, Some((_, p))) => p.clone(),
                    (None, None) => bail!(
                        "node id {node_id} is not among the cluster peers ({text}): set --node-id \
                         to a voter's id, or give --raft-advertised to join the cluster as a new broker"
                    ),
                };
                split_host_port(&raft_advertised).context("invalid Raft advertised address")?;
                let raft_listen = pick(
                    &args.raft_listen,
                    file.cluster.raft_listen,
                    Defaults::RAFT_ADDR,
                );
                let replica_addr = args.replica_addr.clone().or(file.cluster.replica_addr);
                if let Some(a) = &replica_addr {
                    split_host_port(a).context("invalid replica address")?;
                }
                let min_insync_replicas = args
                    .min_insync_replicas
                    .or(file.cluster.min_insync_replicas)
                    .unwrap_or(Defaults::MIN_INSYNC_REPLICAS);
                if min_insync_replicas < 1 {
                    bail!("min_insync_replicas must be at least 1");
                }
                let internal_replication_factor = args
                    .internal_replication_factor
                    .or(file.cluster.internal_replication_factor)
                    .unwrap_or_else(|| peers.len().clamp(1, 3));
                if internal_replication_factor < 1 {
                    bail!("internal_replication_factor must be at least 1");
                }
                let cluster_id = args.cluster_id.clone().or(file.cluster.cluster_id);
                if let Some(id) = &cluster_id {
                    if id.is_empty()
                        || id.len() > 64
                        || !id
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                    {
                        bail!("cluster_id {id:?} must be 1 to 64 letters, digits, '-' or '_'");
                    }
                }
                Some(ClusterSettings {
                    peers,
                    raft_advertised,
                    raft_listen: resolve(&raft_listen).context("invalid Raft listen address")?,
                    replica_addr,
                    min_insync_replicas,
                    internal_replication_factor,
                    cluster_id,
                    replica_lag_time_max: Duration::from_millis(
                        file.cluster
                            .replica_lag_time_max_ms
                            .unwrap_or(Defaults::REPLICA_LAG_TIME_MAX_MS)
                            .max(100),
                    ),
                    session_timeout: Duration::from_millis(
                        file.cluster
                            .session_timeout_ms
                            .unwrap_or(Defaults::SESSION_TIMEOUT_MS)
                            .max(1_000),
                    ),
                })
            }
        };

        Ok(Config {
            data_dir,
            kafka_addr: resolve(&kafka_addr).context("invalid Kafka listen address")?,
            http_addr: resolve(&http_addr).context("invalid HTTP listen address")?,
            console_read_only: args
                .console_read_only
                .or(file.server.console_read_only)
                .unwrap_or(false),
            partition_metrics: args
                .partition_metrics
                .or(file.server.partition_metrics)
                .unwrap_or(true),
            metrics: args.metrics.or(file.server.metrics).unwrap_or(true),
            amqp,
            resource_limits,
            advertised,
            node_id,
            flush,
            retention_check_interval: Duration::from_millis(
                file.storage
                    .retention_check_interval_ms
                    .unwrap_or(Defaults::RETENTION_CHECK_INTERVAL_MS)
                    .max(1),
            ),
            cleaner_check_interval: Duration::from_millis(
                file.storage
                    .cleaner_check_interval_ms
                    .unwrap_or(Defaults::CLEANER_CHECK_INTERVAL_MS)
                    .max(1),
            ),
            cleaner: CleanerConfig {
                dedupe_buffer_bytes: file
                    .storage
                    .cleaner_dedupe_buffer_bytes
                    .unwrap_or(CleanerConfig::default().dedupe_buffer_bytes),
                io_bytes_per_second: file.storage.cleaner_io_max_bytes_per_second,
            },
            max_open_segment_files: file.storage.max_open_segment_files.unwrap_or(0),
            auto_create_topics: args
                .auto_create_topics
                .or(file.kafka.auto_create_topics)
                .unwrap_or(Defaults::AUTO_CREATE_TOPICS),
            num_partitions,
            max_request_bytes: args
                .max_request_bytes
                .or(file.kafka.max_request_bytes)
                .unwrap_or(Defaults::MAX_REQUEST_BYTES),
            max_connections: args
                .max_connections
                .or(file.kafka.max_connections)
                .unwrap_or(Defaults::MAX_CONNECTIONS),
            fetch_max_bytes: args
                .fetch_max_bytes
                .or(file.kafka.fetch_max_bytes)
                .unwrap_or(Defaults::FETCH_MAX_BYTES),
            fetch_session_slots: args
                .fetch_session_slots
                .or(file.kafka.fetch_session_slots)
                .unwrap_or(Defaults::FETCH_SESSION_SLOTS),
            max_connections_per_ip: args
                .max_connections_per_ip
                .or(file.kafka.max_connections_per_ip)
                .unwrap_or(usize::MAX),
            connections_max_idle: Duration::from_millis(
                args.connections_max_idle_ms
                    .or(file.kafka.connections_max_idle_ms)
                    .unwrap_or(Defaults::CONNECTIONS_MAX_IDLE_MS),
            ),
            max_unsent_response_bytes: args
                .max_unsent_response_bytes
                .or(file.kafka.max_unsent_response_bytes)
                .unwrap_or(Defaults::MAX_UNSENT_RESPONSE_BYTES),
            max_decompressed_batch_bytes: args
                .max_decompressed_batch_bytes
                .or(file.kafka.max_decompressed_batch_bytes)
                .unwrap_or(Defaults::MAX_DECOMPRESSED_BATCH_BYTES),
            max_in_flight_bytes: args
                .max_in_flight_bytes
                .or(file.kafka.max_in_flight_bytes)
                .unwrap_or(Defaults::MAX_IN_FLIGHT_BYTES),
            transaction_max_timeout_ms,
            group,
            cluster,
            topic_defaults,
        })
    }

    /// The broker-wide topic defaults: Kafka's defaults overridden by `[defaults]`.
    pub fn topic_config(&self) -> Result<TopicConfig> {
        let mut config = TopicConfig::default();
        for (key, value) in &self.topic_defaults {
            config
                .set(key, value)
                .with_context(|| format!("[defaults] {key} = {value:?}"))?;
        }
        Ok(config)
    }
}

fn pick(flag: &Option<String>, file: Option<String>, default: &str) -> String {
    flag.clone().or(file).unwrap_or_else(|| default.to_string())
}

/// `HOST:PORT` (or `[v6]:PORT`) to a socket address; names are resolved once here.
pub fn resolve(addr: &str) -> Result<SocketAddr> {
    let (host, port) = split_host_port(addr)?;
    let mut addrs = (host.as_str(), port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {addr:?}"))?;
    addrs
        .next()
        .with_context(|| format!("{addr:?} resolves to no address"))
}

/// Splits `HOST:PORT`; brackets around an IPv6 host are removed.
pub fn split_host_port(addr: &str) -> Result<(String, u16)> {
    let Some((host, port)) = addr.rsplit_once(':') else {
        bail!("{addr:?} is not HOST:PORT");
    };
    let port: u16 = port
        .parse()
        .with_context(|| format!("{addr:?}: port {port:?} is not a number from 0 to 65535"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        bail!("{addr:?} has no host");
    }
    Ok((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> FileConfig {
        match FileConfig::parse(text) {
            Ok(f) => f,
            Err(e) => panic!("parse failed: {e:#}"),
        }
    }

    #[test]
    fn defaults_apply_without_flags_or_file() {
        let c = Config::merge(&ServeArgs::default(), FileConfig::default()).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert_eq!(c.kafka_addr, "127.0.0.1:9092".parse().unwrap());
        assert_eq!(c.http_addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.flush, FlushPolicy::Always);
        assert!(c.auto_create_topics);
        assert_eq!(c.num_partitions, 1);
        assert_eq!(c.group.initial_rebalance_delay_ms, 3000);
        assert_eq!(c.advertised, None);
    }

    #[test]
    fn file_overrides_defaults_and_flags_override_file() {
        let f = || {
            file(
                r#"
                [server]
                kafka_addr = "127.0.0.1:19092"
                advertised_kafka_addr = "broker.example:9092"
                [storage]
                data_dir = "/from/file"
                flush = "interval"
                flush_interval_ms = 250
                [kafka]
                num_partitions = 3
                auto_create_topics = false
                [group]
                initial_rebalance_delay_ms = 0
                [defaults]
                "retention.ms" = 60000
                "cleanup.policy" = "delete"
                "#,
            )
        };
        let c = Config::merge(&ServeArgs::default(), f()).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/from/file"));
        assert_eq!(c.kafka_addr, "127.0.0.1:19092".parse().unwrap());
        assert_eq!(c.advertised, Some(("broker.example".to_string(), 9092)));
        assert_eq!(
            c.flush,
            FlushPolicy::Interval {
                ms: 250,
                bytes: Defaults::FLUSH_BYTES
            }
        );
        assert_eq!(c.num_partitions, 3);
        assert!(!c.auto_create_topics);
        assert_eq!(c.group.initial_rebalance_delay_ms, 0);
        assert_eq!(
            c.topic_defaults.get("retention.ms").map(String::as_str),
            Some("60000")
        );
        assert_eq!(
            c.topic_defaults.get("cleanup.policy").map(String::as_str),
            Some("delete")
        );

        let args = ServeArgs {
            data_dir: Some(PathBuf::from("/from/flag")),
            kafka_addr: Some("127.0.0.1:0".into()),
            flush: Some(FlushMode::Never),
            num_partitions: Some(5),
            auto_create_topics: Some(true),
            group_initial_rebalance_delay_ms: Some(10),
            ..ServeArgs::default()
        };
        let c = Config::merge(&args, f()).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/from/flag"));
        assert_eq!(c.kafka_addr, "127.0.0.1:0".parse().unwrap());
        assert_eq!(c.flush, FlushPolicy::Never);
        assert_eq!(c.num_partitions, 5);
        assert!(c.auto_create_topics);
        assert_eq!(c.group.initial_rebalance_delay_ms, 10);
    }

    #[test]
    fn the_metrics_switch_is_on_by_default_and_set_by_file_or_flag() {
        let c = Config::merge(&ServeArgs::default(), FileConfig::default()).unwrap();
        assert!(c.metrics);
        let off = || file("[server]\nmetrics = false\n");
        assert!(!Config::merge(&ServeArgs::default(), off()).unwrap().metrics);
        let on = ServeArgs {
            metrics: Some(true),
            ..ServeArgs::default()
        };
        assert!(Config::merge(&on, off()).unwrap().metrics);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_rejected() {
        assert!(FileConfig::parse("[storage]\ndatadir = \"x\"\n").is_err());
        assert!(FileConfig::parse("[nope]\n").is_err());
        assert!(FileConfig::parse("[storage]\nflush = \"sometimes\"\n").is_err());
        let bad_default = file("[defaults]\n\"retention.mss\" = 1\n");
        assert!(Config::merge(&ServeArgs::default(), bad_default).is_err());
        let bad_addr = ServeArgs {
            kafka_addr: Some("localhost".into()),
            ..ServeArgs::default()
        };
        assert!(Config::merge(&bad_addr, FileConfig::default()).is_err());
        let zero_interval = ServeArgs {
            flush: Some(FlushMode::Interval),
            flush_interval_ms: Some(0),
            ..ServeArgs::default()
        };
        assert!(Config::merge(&zero_interval, FileConfig::default()).is_err());
    }

    #[test]
    fn example_file_parses_and_matches_defaults() {
        let text = include_str!("../sluice.example.toml");
        let c = Config::merge(&ServeArgs::default(), file(text)).unwrap();
        let d = Config::merge(&ServeArgs::default(), FileConfig::default()).unwrap();
        assert_eq!(c.data_dir, d.data_dir);
        assert_eq!(c.kafka_addr, d.kafka_addr);
        assert_eq!(c.http_addr, d.http_addr);
        assert_eq!(c.console_read_only, d.console_read_only);
        assert_eq!(c.partition_metrics, d.partition_metrics);
        assert_eq!(c.metrics, d.metrics);
        assert_eq!(c.amqp.listen, d.amqp.listen);
        assert_eq!(c.amqp.frame_max, d.amqp.frame_max);
        assert_eq!(c.amqp.channel_max, d.amqp.channel_max);
        assert_eq!(c.amqp.heartbeat_secs, d.amqp.heartbeat_secs);
        assert_eq!(c.amqp.max_message_bytes, d.amqp.max_message_bytes);
        assert_eq!(c.amqp.guest_loopback_only, d.amqp.guest_loopback_only);
        assert_eq!(c.flush, d.flush);
        assert_eq!(c.auto_create_topics, d.auto_create_topics);
        assert_eq!(c.num_partitions, d.num_partitions);
        assert_eq!(c.max_request_bytes, d.max_request_bytes);
        assert_eq!(c.max_connections, d.max_connections);
        assert_eq!(c.fetch_max_bytes, d.fetch_max_bytes);
        assert_eq!(c.fetch_session_slots, d.fetch_session_slots);
        assert_eq!(c.connections_max_idle, d.connections_max_idle);
        assert_eq!(c.max_unsent_response_bytes, d.max_unsent_response_bytes);
        assert_eq!(
            c.max_decompressed_batch_bytes,
            d.max_decompressed_batch_bytes
        );
        assert_eq!(c.max_in_flight_bytes, d.max_in_flight_bytes);
        assert_eq!(c.transaction_max_timeout_ms, d.transaction_max_timeout_ms);
        assert_eq!(c.retention_check_interval, d.retention_check_interval);
        assert_eq!(
            c.group.initial_rebalance_delay_ms,
            d.group.initial_rebalance_delay_ms
        );
        assert_eq!(
            c.group.min_session_timeout_ms,
            d.group.min_session_timeout_ms
        );
        assert_eq!(
            c.group.max_session_timeout_ms,
            d.group.max_session_timeout_ms
        );
        assert_eq!(c.node_id, d.node_id);
        assert!(c.cluster.is_none(), "the example runs a single node");

        // With its peers line uncommented, the [cluster] values are the defaults.
        let peers = "# peers = [\"1@sluice1:9093\", \"2@sluice2:9093\", \"3@sluice3:9093\"]";
        assert!(text.contains(peers));
        let with_peers = text
            .replace(peers, &peers[2..])
            .replace("node_id = 0", "node_id = 1");
        let c = Config::merge(&ServeArgs::default(), file(&with_peers)).unwrap();
        let d = Config::merge(
            &ServeArgs {
                node_id: Some(1),
                cluster_peers: Some("1@sluice1:9093,2@sluice2:9093,3@sluice3:9093".into()),
                ..ServeArgs::default()
            },
            FileConfig::default(),
        )
        .unwrap();
        let (c, d) = (c.cluster.unwrap(), d.cluster.unwrap());
        assert_eq!(c.peers, d.peers);
        assert_eq!(c.raft_listen, d.raft_listen);
        assert_eq!(c.replica_addr, d.replica_addr);
        assert_eq!(c.min_insync_replicas, d.min_insync_replicas);
        assert_eq!(c.replica_lag_time_max, d.replica_lag_time_max);
        assert_eq!(c.session_timeout, d.session_timeout);
    }

    #[test]
    fn cluster_mode_from_flags_and_file() {
        let single = Config::merge(&ServeArgs::default(), FileConfig::default()).unwrap();
        assert!(single.cluster.is_none(), "no peers: single node");

        let args = ServeArgs {
            node_id: Some(2),
            cluster_peers: Some("1@a:9093, 2@b:9093,3@c:9093".into()),
            ..ServeArgs::default()
        };
        let c = Config::merge(&args, FileConfig::default()).unwrap();
        assert_eq!(c.node_id, 2);
        let cl = c.cluster.expect("cluster mode");
        assert_eq!(cl.cluster_id, None, "picked by the first controller");
        assert_eq!(
            cl.peers,
            vec![
                (1, "a:9093".to_string()),
                (2, "b:9093".to_string()),
                (3, "c:9093".to_string())
            ]
        );
        assert_eq!(cl.raft_listen, "0.0.0.0:9093".parse().unwrap());
        assert_eq!(cl.raft_advertised, "b:9093", "a voter's own peer entry");
        assert_eq!(cl.replica_addr, None);
        assert_eq!(cl.min_insync_replicas, 2);
        assert_eq!(cl.replica_lag_time_max, Duration::from_secs(5));
        assert_eq!(cl.session_timeout, Duration::from_secs(6));

        let f = || {
            file(
                r#"
                [server]
                node_id = 3
                advertised_kafka_addr = "127.0.0.1:19094"
                [cluster]
                peers = ["1@a:9093", "2@b:9093", "3@c:9093"]
                raft_listen = "127.0.0.1:19193"
                replica_addr = "c:9092"
                min_insync_replicas = 1
                replica_lag_time_max_ms = 2000
                session_timeout_ms = 3000
                cluster_id = "orders-prod"
                "#,
            )
        };
        let c = Config::merge(&ServeArgs::default(), f()).unwrap();
        assert_eq!(c.node_id, 3);
        assert_eq!(c.advertised, Some(("127.0.0.1".to_string(), 19094)));
        let cl = c.cluster.expect("cluster mode");
        assert_eq!(cl.peers.len(), 3);
        assert_eq!(cl.raft_listen, "127.0.0.1:19193".parse().unwrap());
        assert_eq!(cl.replica_addr.as_deref(), Some("c:9092"));
        assert_eq!(cl.min_insync_replicas, 1);
        assert_eq!(cl.replica_lag_time_max, Duration::from_secs(2));
        assert_eq!(cl.session_timeout, Duration::from_secs(3));
        assert_eq!(cl.cluster_id.as_deref(), Some("orders-prod"));

        // Flags win over the file; peers may also be one string.
        let args = ServeArgs {
            node_id: Some(1),
            raft_listen: Some("127.0.0.1:0".into()),
            replica_addr: Some("a:19092".into()),
            cluster_id: Some("orders-test".into()),
            ..ServeArgs::default()
        };
        let c = Config::merge(&args, f()).unwrap();
        let cl = c.cluster.expect("cluster mode");
        assert_eq!(cl.cluster_id.as_deref(), Some("orders-test"));
        assert_eq!(c.node_id, 1);
        for bad in ["", "has space", "dots.are.out", &"x".repeat(65)] {
            let args = ServeArgs {
                node_id: Some(1),
                cluster_id: Some(bad.to_string()),
                ..ServeArgs::default()
            };
            let e = Config::merge(&args, f()).unwrap_err().to_string();
            assert!(e.contains("cluster_id"), "{bad:?}: {e}");
        }
        assert_eq!(cl.raft_listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!(cl.replica_addr.as_deref(), Some("a:19092"));
        let text = file("[server]\nnode_id = 1\n[cluster]\npeers = \"1@a:9093,2@b:9093\"\n");
        let c = Config::merge(&ServeArgs::default(), text).unwrap();
        assert_eq!(c.cluster.expect("cluster mode").peers.len(), 2);

        // A broker joining a running cluster: not a voter, so it names its own address.
        let text = file("[server]\nnode_id = 4\n[cluster]\npeers = \"1@a:9093\"\nraft_advertised = \"d:9093\"\n");
        let c = Config::merge(&ServeArgs::default(), text).unwrap();
        let cl = c.cluster.expect("cluster mode");
        assert_eq!((c.node_id, cl.raft_advertised.as_str()), (4, "d:9093"));
        assert_eq!(cl.peers, vec![(1, "a:9093".to_string())]);
    }

    #[test]
    fn bad_cluster_settings_are_rejected() {
        let with = |node_id: i32, peers: &str| ServeArgs {
            node_id: Some(node_id),
            cluster_peers: Some(peers.into()),
            ..ServeArgs::default()
        };
        let err = |args: ServeArgs| match Config::merge(&args, FileConfig::default()) {
            Ok(c) => panic!("accepted: {:?}", c.cluster),
            Err(e) => format!("{e:#}"),
        };
        assert!(err(with(4, "1@a:9093,2@b:9093")).contains("not among the cluster peers"));
        let mut moved = with(1, "1@a:9093");
        moved.raft_advertised = Some("z:9093".into());
        assert!(err(moved).contains("differs from node 1's entry"));
        let mut joiner = with(4, "1@a:9093");
        joiner.raft_advertised = Some("nohost".into());
        assert!(err(joiner).contains("invalid Raft advertised address"));
        assert!(err(with(1, "1@a:9093,1@b:9093")).contains("appears twice"));
        assert!(err(with(1, "1:a:9093")).contains("not ID@HOST:PORT"));
        assert!(err(with(1, "x@a:9093")).contains("not a node id"));
        assert!(err(with(1, "1@a")).contains("cluster peer"));
        assert!(err(with(1, " , ")).contains("empty"));
        let mut bad_replica = with(1, "1@a:9093");
        bad_replica.replica_addr = Some("nohost".into());
        assert!(err(bad_replica).contains("invalid replica address"));
        let mut bad_isr = with(1, "1@a:9093");
        bad_isr.min_insync_replicas = Some(0);
        assert!(err(bad_isr).contains("min_insync_replicas"));
        assert!(FileConfig::parse("[cluster]\npeerz = []\n").is_err());
    }

    #[test]
    fn host_port_splitting() {
        assert_eq!(split_host_port("h:1").unwrap(), ("h".to_string(), 1));
        assert_eq!(
            split_host_port("[::1]:9092").unwrap(),
            ("::1".to_string(), 9092)
        );
        assert!(split_host_port(":9092").is_err());
        assert!(split_host_port("h:99999").is_err());
        assert_eq!(resolve("[::1]:0").unwrap(), "[::1]:0".parse().unwrap());
    }
}

//! `sluice serve`: validate the data directory, bind the Kafka and HTTP
//! listeners, open the store, announce readiness on stdout, serve until
//! SIGINT/SIGTERM, then shut down cleanly and flush.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use sluice_amqp::AmqpListener;
use sluice_cluster::{ClusterConfig, ClusterError};
use sluice_group::Coordination;
use sluice_kafka::{KafkaListener, ServerConfig};
use sluice_log::{Store, StoreConfig};
use sluice_node::{Node, NodeConfig, NodeError};
use sluice_replica::ReplicaConfig;
use sluice_topology::Topology;
use sluice_vocab::ConfigType;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::{ClusterSettings, Config, ServeArgs};
use crate::http;

/// How long a clean stop waits for the quorum to move this node's leadership.
const CONTROLLED_SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// How long in-flight work may take to finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// How long a single node may take to become its own controller before it serves.
const SINGLE_NODE_READY_WAIT: Duration = Duration::from_secs(10);

pub async fn run(args: ServeArgs) -> Result<()> {
    let config = Config::load(&args)?;
    crate::resources::raise_descriptor_limit();
    // Topic defaults are checked before anything is bound so a bad config
    // file fails fast with nothing half-started.
    let mut topic_defaults = config.topic_config()?;
    // In a cluster the broker-wide min.insync.replicas is the cluster
    // setting (default 2) unless [defaults] names one; DescribeConfigs and
    // the replication layer then agree on it.
    if let Some(settings) = &config.cluster {
        if !config.topic_defaults.contains_key("min.insync.replicas") {
            topic_defaults.min_insync_replicas = settings.min_insync_replicas;
        }
    }
    let data_dir = prepare_data_dir(&config.data_dir)?;

    let server_config = ServerConfig {
        listen: config.kafka_addr,
        advertised: config.advertised.clone(),
        auto_create_topics: config.auto_create_topics,
        default_partitions: config.num_partitions,
        max_request_bytes: config.max_request_bytes,
        max_connections: config.max_connections,
        fetch_max_bytes: config.fetch_max_bytes,
        fetch_session_slots: config.fetch_session_slots,
        max_connections_per_ip: config.max_connections_per_ip,
        connections_max_idle: config.connections_max_idle,
        max_unsent_response_bytes: config.max_unsent_response_bytes,
        max_decompressed_batch_bytes: config.max_decompressed_batch_bytes,
        max_in_flight_bytes: config.max_in_flight_bytes,
        transaction_max_timeout_ms: config.transaction_max_timeout_ms,
        other_broker_configs: broker_configs(&config),
    };
    let kafka = KafkaListener::bind(server_config)
        .await
        .map_err(|e| bind_error("Kafka", config.kafka_addr, e))?;
    let kafka_addr = kafka.local_addr();

    let http_listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .map_err(|e| bind_error("HTTP", config.http_addr, e))?;
    let http_addr = http_listener
        .local_addr()
        .context("cannot read the HTTP listener's address")?;

    let alarms = crate::resources::watch(data_dir.clone(), config.resource_limits);
    let kafka = kafka.with_disk_alarm(alarms.disk_low);
    let amqp = AmqpListener::bind(config.amqp.clone())
        .await
        .map_err(|e| bind_error("AMQP", config.amqp.listen, e))?
        .with_resource_alarm(alarms.publishers);
    let amqp_addr = amqp.local_addr();

    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    // HTTP serves from here on so that /healthz can say "starting" (503)
    // while a large store recovers.
    let http_state = http::State::default();
    http_state.set_partition_metrics(config.partition_metrics);
    // Before any listener serves: the data path reads the switch on each use.
    sluice_log::set_hot_path_metrics(config.metrics);
    // The console is a Kafka client of this node's own listener.
    let console_bootstrap = if kafka_addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], kafka_addr.port()))
    } else {
        kafka_addr
    };
    http_state.set_console(crate::console::Console::new(
        console_bootstrap.to_string(),
        config.console_read_only,
    )?);
    let http_task = tokio::spawn(http::serve(
        http_listener,
        http_state.clone(),
        wait_for(shutdown_rx.clone()),
    ));

    // After the descriptor limit was raised: the default budget is half of it.
    sluice_log::set_segment_file_budget(config.max_open_segment_files);
    let store_config = StoreConfig {
        data_dir: data_dir.clone(),
        defaults: topic_defaults,
        flush: config.flush,
        cleaner: config.cleaner.clone(),
    };
    // Recovery reads and may truncate every partition: keep it off the
    // async workers. Store::open needs the runtime context, which blocking
    // threads of the runtime have.
    let store = tokio::task::spawn_blocking(move || Store::open(store_config))
        .await
        .context("store recovery panicked")?
        .with_context(|| format!("cannot open the store in {}", data_dir.display()))?;
    http_state.set_store(store.clone());

    // One node or many: decided here, once. A single node is a cluster of one
    // voter; everything from here on is the same code.
    let advertised = kafka.advertised();
    let replica_addr = match &config.cluster {
        // What NodeConfig::single registers.
        None => format!("{}:{}", advertised.0, advertised.1),
        Some(settings) => settings
            .replica_addr
            .clone()
            .unwrap_or_else(|| default_replica_addr(settings, kafka_addr)),
    };
    // Other nodes forward AMQP queue operations to the queue leader's node here.
    let endpoints = BTreeMap::from([(
        sluice_amqp::AMQP_ENDPOINT.to_string(),
        amqp_endpoint(amqp_addr, &replica_addr),
    )]);
    let mut node_config = match &config.cluster {
        None => NodeConfig::single(config.node_id, &data_dir, advertised),
        Some(settings) => {
            cluster_node_config(&config, settings, &data_dir, advertised, replica_addr)
        }
    }
    .with_endpoints(endpoints);
    node_config.retention_check_interval = config.retention_check_interval;
    node_config.cleaner_check_interval = config.cleaner_check_interval;
    let node =
        Node::start(store.clone(), node_config)
            .await
            .map_err(|e| match (e, &config.cluster) {
                (NodeError::Cluster(ClusterError::Io(io)), Some(settings)) => {
                    bind_error("Raft", settings.raft_listen, io)
                }
                (e, _) => anyhow!(e).context("cannot start the node"),
            })?;
    http_state.set_node(node.clone());
    match &config.cluster {
        None => {
            // Alone, the node is its own controller within milliseconds: announce
            // once it can serve, so the first request finds it leading.
            if !node.wait_ready(SINGLE_NODE_READY_WAIT).await {
                warn!("the node did not become ready within {SINGLE_NODE_READY_WAIT:?}; serving anyway");
            }
        }
        Some(settings) => {
            let voter = settings.peers.iter().any(|(id, _)| *id == config.node_id);
            info!(
                node = config.node_id,
                role = %if voter { "voter" } else { "broker" },
                raft = ?node.cluster().local_raft_addr(),
                advertised = %settings.raft_advertised,
                peers = settings.peers.len(),
                "cluster mode"
            );
        }
    }
    let topology: Arc<dyn Topology> = node.clone();
    let groups = Coordination::start(topology.clone(), config.group.clone());
    if config.cluster.is_none() && !groups.wait_coordinating(SINGLE_NODE_READY_WAIT).await {
        warn!(
            "the node does not coordinate groups after {SINGLE_NODE_READY_WAIT:?}; serving anyway"
        );
    }

    announce(kafka_addr, http_addr, amqp_addr, &data_dir)?;
    info!(
        kafka = %kafka_addr,
        amqp = %amqp_addr,
        http = %http_addr,
        data = %data_dir.display(),
        flush = ?config.flush,
        "sluice is ready"
    );

    http_state.set_amqp(amqp.admin(topology.clone()));
    http_state.set_groups(groups.clone());
    http_state.set_kafka_metrics(kafka.metrics());
    let amqp_task = tokio::spawn(amqp.serve(topology.clone(), wait_for(shutdown_rx.clone())));
    let mut kafka_task =
        tokio::spawn(kafka.serve(topology, groups.clone(), wait_for(shutdown_rx.clone())));
    let early_exit = tokio::select! {
        signal = shutdown_signal() => {
            info!("received {signal}, shutting down");
            None
        }
        res = &mut kafka_task => Some(res),
    };
    if early_exit.is_none() {
        // Hand leadership over while still serving, so clients move to the new
        // leaders now rather than after the controller's session timeout.
        match node.controlled_shutdown(CONTROLLED_SHUTDOWN_WAIT).await {
            Ok(()) => info!("controlled shutdown: partition leadership moved off this node"),
            Err(e) => warn!("controlled shutdown did not complete ({e}); the controller will fence this node after its session timeout"),
        }
    }
    let _ = shutdown_tx.send(true);
    let stopped_by_signal = early_exit.is_none();

    // A second signal during the grace period ends the process at once.
    tokio::spawn(async {
        let signal = shutdown_signal().await;
        warn!("received {signal} again, exiting without a clean shutdown");
        std::process::exit(130);
    });

    let kafka_result = match early_exit {
        Some(res) => res,
        None => match tokio::time::timeout(SHUTDOWN_GRACE, &mut kafka_task).await {
            Ok(res) => res,
            Err(_) => {
                warn!("Kafka listener did not stop within {SHUTDOWN_GRACE:?}");
                kafka_task.abort();
                Ok(Ok(()))
            }
        },
    };
    if tokio::time::timeout(SHUTDOWN_GRACE, amqp_task)
        .await
        .is_err()
    {
        warn!("AMQP listener did not stop within {SHUTDOWN_GRACE:?}");
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, http_task)
        .await
        .is_err()
    {
        warn!("HTTP server did not stop within {SHUTDOWN_GRACE:?}");
    }

    groups.shutdown().await;
    node.shutdown().await;

    let flushed = store.close();
    if let Err(e) = &flushed {
        error!("flushing the store failed: {e}");
    }
    match kafka_result {
        Ok(Ok(())) if stopped_by_signal => {}
        Ok(Ok(())) => bail!("the Kafka listener stopped unexpectedly"),
        Ok(Err(e)) => return Err(anyhow!(e).context("the Kafka listener failed")),
        Err(e) => return Err(anyhow!(e).context("the Kafka listener panicked")),
    }
    flushed.context("cannot flush the store")?;
    info!("shut down cleanly");
    Ok(())
}

/// The node of a cluster: a voter of `--cluster-peers`, or a broker that joins it.
fn cluster_node_config(
    config: &Config,
    settings: &ClusterSettings,
    data_dir: &Path,
    (kafka_host, kafka_port): (String, u16),
    replica_addr: String,
) -> NodeConfig {
    let mut cc = ClusterConfig::new(config.node_id, data_dir, settings.peers.clone());
    cc.raft_listen = Some(settings.raft_listen);
    cc.raft_advertised = Some(settings.raft_advertised.clone());
    cc.kafka_host = kafka_host;
    cc.kafka_port = kafka_port;
    cc.replica_addr = Some(replica_addr);
    cc.session_timeout = settings.session_timeout;
    cc.internal_replication_factor = settings.internal_replication_factor;
    cc.cluster_id = settings.cluster_id.clone();
    let mut rc = ReplicaConfig::new(config.node_id);
    rc.replica_lag_max = settings.replica_lag_time_max;
    NodeConfig::cluster(cc, rc)
}

/// Where peers replicate from when --replica-addr is not set: the host of this
/// node's Raft address with the port the Kafka listener is bound to (not the
/// advertised port, which may be a published port only clients see).
fn default_replica_addr(settings: &ClusterSettings, kafka: SocketAddr) -> String {
    let host = match crate::config::split_host_port(&settings.raft_advertised) {
        Ok((h, _)) if h.contains(':') => format!("[{h}]"),
        Ok((h, _)) => h,
        Err(_) => advertised_host(kafka.ip()),
    };
    format!("{host}:{}", kafka.port())
}

/// Where other nodes reach the AMQP listener bound at `amqp` (its actual address,
/// so a port 0 listen is resolved): a wildcard IP is replaced by the host of this
/// node's replica address (`host:port`), which other nodes already reach.
fn amqp_endpoint(amqp: SocketAddr, replica_addr: &str) -> String {
    if !amqp.ip().is_unspecified() {
        return amqp.to_string();
    }
    let host = match replica_addr.rsplit_once(':') {
        Some((h, _)) if !h.is_empty() => h.to_string(),
        _ => advertised_host(amqp.ip()),
    };
    format!("{host}:{}", amqp.port())
}

/// A wildcard listen address is advertised as loopback (set
/// --advertised-kafka when clients connect from elsewhere).
fn advertised_host(ip: std::net::IpAddr) -> String {
    if ip.is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        ip.to_string()
    }
}

/// The one stdout line tooling waits for. Flushed at once: stdout is a pipe
/// (block buffered) when a test or supervisor reads it.
fn announce(kafka: SocketAddr, http: SocketAddr, amqp: SocketAddr, data_dir: &Path) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "sluice listening kafka={kafka} http={http} amqp={amqp} data={}",
        data_dir.display()
    )
    .and_then(|()| out.flush())
    .context("cannot write to stdout")
}

/// Creates the data directory if needed and proves it is a writable
/// directory, so that a bad path fails at start and not at the first write.
/// Returns the absolute path.
pub fn prepare_data_dir(dir: &Path) -> Result<PathBuf> {
    if dir.exists() && !dir.is_dir() {
        bail!(
            "data directory {} is unusable: it exists and is not a directory",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).map_err(|e| {
        anyhow!(
            "data directory {} is unusable: cannot create it: {e}",
            dir.display()
        )
    })?;
    let probe = dir.join(".sluice-write-probe");
    let written = std::fs::File::create(&probe)
        .and_then(|mut f| f.write_all(b"probe").and_then(|()| f.sync_all()));
    let _ = std::fs::remove_file(&probe);
    written.map_err(|e| {
        anyhow!(
            "data directory {} is unusable: cannot write in it: {e}",
            dir.display()
        )
    })?;
    dir.canonicalize()
        .with_context(|| format!("data directory {} is unusable", dir.display()))
}

fn bind_error(what: &str, addr: SocketAddr, e: std::io::Error) -> anyhow::Error {
    match e.kind() {
        ErrorKind::AddrInUse => {
            anyhow!("{what} address {addr} is already in use (is another broker running?)")
        }
        ErrorKind::AddrNotAvailable => {
            anyhow!("{what} address {addr} is not an address of this machine: {e}")
        }
        ErrorKind::PermissionDenied => {
            anyhow!("no permission to listen on {what} address {addr}: {e}")
        }
        _ => anyhow!("cannot listen on {what} address {addr}: {e}"),
    }
}

/// Resolves once `true` is sent on the shutdown channel (or its sender is gone).
async fn wait_for(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Waits for SIGINT or SIGTERM and names the one that came.
async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            },
            Err(e) => {
                warn!("cannot listen for SIGTERM: {e}");
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}

/// Settings of the storage layer that Kafka tools read as broker configs
/// (DescribeConfigs on the broker), under Kafka's names.
fn broker_configs(config: &Config) -> Vec<(&'static str, String, ConfigType)> {
    let millis = |d: std::time::Duration| d.as_millis().to_string();
    vec![
        (
            "log.dirs",
            config.data_dir.display().to_string(),
            ConfigType::String,
        ),
        (
            "log.retention.check.interval.ms",
            millis(config.retention_check_interval),
            ConfigType::Long,
        ),
        (
            "log.cleaner.backoff.ms",
            millis(config.cleaner_check_interval),
            ConfigType::Long,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_dir_is_created_and_made_absolute() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        let got = prepare_data_dir(&dir).unwrap();
        assert!(got.is_absolute());
        assert!(dir.is_dir());
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "probe left behind"
        );
    }

    #[test]
    fn a_file_is_not_a_data_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let err = prepare_data_dir(&file).unwrap_err().to_string();
        assert!(err.contains("is not a directory"), "{err}");
        let below = file.join("sub");
        let err = prepare_data_dir(&below).unwrap_err().to_string();
        assert!(err.contains("cannot create it"), "{err}");
    }

    #[test]
    fn replica_address_defaults_to_the_raft_host_and_the_kafka_listen_port() {
        let settings = |raft: &str| ClusterSettings {
            peers: vec![(1, "a:9093".into()), (2, "[::1]:9093".into())],
            raft_listen: "0.0.0.0:9093".parse().unwrap(),
            raft_advertised: raft.into(),
            replica_addr: None,
            min_insync_replicas: 2,
            internal_replication_factor: 2,
            cluster_id: None,
            replica_lag_time_max: Duration::from_secs(5),
            session_timeout: Duration::from_secs(6),
        };
        let kafka: SocketAddr = "0.0.0.0:9092".parse().unwrap();
        assert_eq!(default_replica_addr(&settings("a:9093"), kafka), "a:9092");
        assert_eq!(
            default_replica_addr(&settings("[::1]:9093"), kafka),
            "[::1]:9092"
        );
    }

    #[test]
    fn amqp_endpoint_replaces_a_wildcard_ip_with_the_replica_host() {
        let at = |a: &str| a.parse::<SocketAddr>().unwrap();
        assert_eq!(amqp_endpoint(at("0.0.0.0:5672"), "b1:9092"), "b1:5672");
        assert_eq!(amqp_endpoint(at("[::]:5673"), "[::1]:9092"), "[::1]:5673");
        assert_eq!(
            amqp_endpoint(at("10.0.0.2:5672"), "b1:9092"),
            "10.0.0.2:5672"
        );
        assert_eq!(amqp_endpoint(at("[::1]:5672"), "b1:9092"), "[::1]:5672");
        assert_eq!(
            amqp_endpoint(at("0.0.0.0:5672"), "nohost"),
            "127.0.0.1:5672"
        );
    }

    #[test]
    fn address_in_use_message() {
        let e = std::io::Error::from(ErrorKind::AddrInUse);
        let msg = bind_error("Kafka", "127.0.0.1:9092".parse().unwrap(), e).to_string();
        assert_eq!(
            msg,
            "Kafka address 127.0.0.1:9092 is already in use (is another broker running?)"
        );
    }
}

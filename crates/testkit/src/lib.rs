//! `sluice-testkit`: a whole single-node Sluice broker in the test's own process —
//! store, node (a cluster of one voter), group coordination and Kafka listener on
//! 127.0.0.1:0, composed exactly as `sluice serve` composes them, and the AMQP
//! listener beside it — for the tests of crates that need a broker to talk to (the
//! Kafka and AMQP front ends, the load generator).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice_amqp::{AmqpConfig, AmqpListener, ResourceAlarm};
use sluice_group::{Coordination, GroupConfig};
use sluice_kafka::{KafkaListener, ServerConfig};
use sluice_log::{FlushPolicy, Store, StoreConfig, TopicConfig};
use sluice_node::{Node, NodeConfig};
use sluice_topology::{Command, Topology};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Start-up, topic creation and leadership take milliseconds on one node; this
/// bounds them on a loaded machine.
pub const WAIT: Duration = Duration::from_secs(20);

/// What a test may change before the broker starts.
pub struct Setup {
    pub server: ServerConfig,
    pub amqp: AmqpConfig,
    /// The resource alarm the AMQP listener obeys (none raised when unset).
    pub amqp_alarm: Option<ResourceAlarm>,
    pub group: GroupConfig,
    pub retention_check_interval: Duration,
}

/// A running broker; its data directory is removed when it is dropped.
pub struct Broker {
    pub addr: SocketAddr,
    /// The AMQP listener.
    pub amqp_addr: SocketAddr,
    pub store: Arc<Store>,
    pub node: Arc<Node>,
    groups: Arc<Coordination>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
    _dir: tempfile::TempDir,
}

/// Logs to the test's output, filtered by `SLUICE_LOG` (default: warnings).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
                .unwrap_or_else(|_| "warn,openraft=off".into()),
        )
        .with_test_writer()
        .try_init();
}

impl Broker {
    /// A broker with the defaults, except that a new group rebalances at once.
    pub async fn start() -> Broker {
        Broker::start_with(|_| {}).await
    }

    /// A broker after `tweak` changed its settings. Returns once it leads and
    /// coordinates groups, as `sluice serve` does before it announces itself.
    ///
    /// # Panics
    ///
    /// When the broker cannot start: a test has nothing to test then.
    pub async fn start_with(tweak: impl FnOnce(&mut Setup)) -> Broker {
        init_tracing();
        let dir = tempfile::tempdir().expect("a temporary data directory");
        let store = Store::open(StoreConfig {
            data_dir: dir.path().to_path_buf(),
            defaults: TopicConfig::default(),
            flush: FlushPolicy::Always,
            cleaner: Default::default(),
        })
        .expect("the store opens");
        let mut setup = Setup {
            server: ServerConfig {
                listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                ..ServerConfig::default()
            },
            amqp: AmqpConfig::new(std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
            amqp_alarm: None,
            group: GroupConfig {
                initial_rebalance_delay_ms: 0,
                ..GroupConfig::default()
            },
            retention_check_interval: Duration::from_secs(300),
        };
        tweak(&mut setup);
        let listener = KafkaListener::bind(setup.server)
            .await
            .expect("the Kafka listener binds");
        let addr = listener.local_addr();
        let mut amqp = AmqpListener::bind(setup.amqp)
            .await
            .expect("the AMQP listener binds");
        if let Some(alarm) = setup.amqp_alarm {
            amqp = amqp.with_resource_alarm(alarm);
        }
        let amqp_addr = amqp.local_addr();
        let mut config = NodeConfig::single(0, dir.path(), listener.advertised());
        config.retention_check_interval = setup.retention_check_interval;
        let node = Node::start(store.clone(), config)
            .await
            .expect("the node starts");
        assert!(
            node.wait_ready(WAIT).await,
            "the node leads within {WAIT:?}"
        );
        let topology: Arc<dyn Topology> = node.clone();
        let groups = Coordination::start(topology.clone(), setup.group);
        assert!(
            groups.wait_coordinating(WAIT).await,
            "the node coordinates groups within {WAIT:?}"
        );
        let (tx, rx) = oneshot::channel::<()>();
        let (amqp_tx, amqp_rx) = oneshot::channel::<()>();
        tokio::spawn(amqp.serve(topology.clone(), async move {
            let _ = amqp_rx.await;
        }));
        let task = tokio::spawn(listener.serve(topology, groups.clone(), async move {
            let _ = rx.await;
            let _ = amqp_tx.send(());
        }));
        Broker {
            addr,
            amqp_addr,
            store,
            node,
            groups,
            shutdown: Some(tx),
            task: Some(task),
            _dir: dir,
        }
    }

    /// Resolves the listener's shutdown future (connections drain, it stops
    /// accepting); [`Broker::stop`] waits for it.
    pub fn signal_stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Stops the listener (waiting for it), the group coordination and the node.
    ///
    /// # Panics
    ///
    /// When the listener does not stop cleanly within 20 s.
    pub async fn stop(mut self) {
        self.signal_stop();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("the listener stops after shutdown")
                .expect("the listener task did not panic")
                .expect("the listener stopped cleanly");
        }
        self.groups.shutdown().await;
        self.node.shutdown().await;
    }

    /// Creates a topic (one replica, `configs` as overrides) through the metadata
    /// quorum and waits until this broker leads every partition of it.
    ///
    /// # Panics
    ///
    /// When the quorum refuses the topic or it is not led within [`WAIT`].
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        configs: BTreeMap<String, String>,
    ) {
        let count = i32::try_from(partitions).expect("a partition count below 2^31");
        self.node
            .propose(Command::CreateTopic {
                name: name.to_owned(),
                partitions: count,
                replication_factor: 1,
                configs,
            })
            .await
            .expect("the topic is created");
        let deadline = tokio::time::Instant::now() + WAIT;
        while (0..count).any(|p| self.node.lead_for_read(name, p, -1).is_err()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} led within {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

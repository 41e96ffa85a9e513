//! `sluice-node`: one Sluice node — its member of the metadata quorum
//! (`sluice-cluster`) and the replicas of its partitions (`sluice-replica`) — and the
//! one implementation of [`Topology`].
//!
//! The deployment shape is decided here, once: [`NodeConfig::single`] is a cluster of
//! one voter (KRaft's combined mode; no inter-node listener), [`NodeConfig::cluster`]
//! one node of many. Everything above — the Kafka front end, the group coordinator —
//! runs the same code in both.
//!
//! # Start, in order
//!
//! 1. The quorum member starts. A node that is the only voter hands the controller the
//!    topics and producer ids its data directory holds
//!    ([`sluice_cluster::LocalState`]): the first leadership adopts them into the
//!    image once (`AdoptLocalState`) before it creates anything, so a data directory
//!    of an earlier single-node release serves its topics, committed offsets and
//!    producer state unchanged. The store's cluster id becomes the cluster's.
//! 2. The replica manager takes the roles the image gives this node.
//! 3. Storage duties start: retention and segment.ms rolls, compaction, and high-watermark
//!    checkpoints.
//!
//! [`Node::wait_ready`] resolves once the controller has registered this node and a
//! quorum stands behind it (a single node: within milliseconds).

mod topology;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use sluice_cluster::{
    AdoptedTopic, ClusterConfig, ClusterError, ClusterNode, InternalTopic, LocalState,
};
use sluice_log::Store;
use sluice_replica::{ReplicaConfig, ReplicaManager};
use sluice_vocab::internal::{
    offsets_topic_configs, transaction_state_topic_configs, OFFSETS_TOPIC,
    OFFSETS_TOPIC_PARTITIONS, TRANSACTION_STATE_TOPIC, TRANSACTION_STATE_TOPIC_PARTITIONS,
};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How often replicated partitions write their high watermark down (Kafka's
/// replica.high.watermark.checkpoint.interval.ms).
const HW_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);

/// Producer ids requested from the quorum at a time (as Kafka).
const PRODUCER_ID_BLOCK: i64 = 1000;

/// How long a front end waits for the controller's read index on a metadata miss.
const CATCH_UP_WAIT: Duration = Duration::from_secs(2);

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The quorum member.
    pub cluster: ClusterConfig,
    /// Partition replication.
    pub replica: ReplicaConfig,
    /// How often retention and idle segments' segment.ms rolls are enforced
    /// (Kafka's `log.retention.check.interval.ms`, default 5 minutes).
    pub retention_check_interval: Duration,
    /// How often compacted topics are checked for a compaction round
    /// (Kafka's `log.cleaner.backoff.ms`, default 15 s).
    pub cleaner_check_interval: Duration,
}

impl NodeConfig {
    /// A single node: the only voter of its quorum, with no inter-node listener. Its
    /// Kafka listener is `kafka` (advertised as `kafka_host:kafka_port`).
    pub fn single(
        node_id: i32,
        data_dir: impl Into<std::path::PathBuf>,
        (kafka_host, kafka_port): (String, u16),
    ) -> NodeConfig {
        let mut cluster = ClusterConfig::new(node_id, data_dir, vec![(node_id, String::new())]);
        cluster.raft_listen = None;
        cluster.replica_addr = Some(format!("{kafka_host}:{kafka_port}"));
        cluster.kafka_host = kafka_host;
        cluster.kafka_port = kafka_port;
        NodeConfig::cluster(cluster, ReplicaConfig::new(node_id))
    }

    /// One node of a cluster.
    pub fn cluster(cluster: ClusterConfig, replica: ReplicaConfig) -> NodeConfig {
        NodeConfig {
            cluster,
            replica,
            retention_check_interval: Duration::from_secs(300),
            cleaner_check_interval: Duration::from_secs(15),
        }
    }

    /// Sets the named protocol endpoints (name → `host:port`) this node registers in
    /// the metadata image, for a single node and a cluster node alike; stored in
    /// [`ClusterConfig::endpoints`]. The names are free-form; `"amqp"` is the AMQP
    /// listener other nodes forward queue operations to.
    pub fn with_endpoints(mut self, endpoints: BTreeMap<String, String>) -> NodeConfig {
        self.cluster.endpoints = endpoints;
        self
    }

    /// Whether this node is its quorum's only voter.
    fn is_single(&self) -> bool {
        matches!(self.cluster.peers.as_slice(), [(id, _)] if *id == self.cluster.node_id)
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// One running node. See the crate docs.
pub struct Node {
    store: Arc<Store>,
    cluster: Arc<ClusterNode>,
    replicas: Arc<ReplicaManager>,
    /// Producer ids handed out from the current block: (next, end).
    producer_ids: tokio::sync::Mutex<(i64, i64)>,
    stop: watch::Sender<bool>,
    duties: Mutex<Vec<JoinHandle<()>>>,
}

impl Node {
    /// Starts the node on `store` (opened and recovered by the caller). Must be called
    /// inside a Tokio runtime.
    pub async fn start(store: Arc<Store>, mut config: NodeConfig) -> Result<Arc<Node>, NodeError> {
        config.cluster.initial_cluster_id = Some(store.cluster_id());
        config.cluster.internal_topics = vec![
            InternalTopic {
                name: OFFSETS_TOPIC.to_owned(),
                partitions: OFFSETS_TOPIC_PARTITIONS,
                configs: offsets_topic_configs(),
            },
            InternalTopic {
                name: TRANSACTION_STATE_TOPIC.to_owned(),
                partitions: TRANSACTION_STATE_TOPIC_PARTITIONS,
                configs: transaction_state_topic_configs(),
            },
        ];
        if config.is_single() {
            config.cluster.adopt_local_state = Some(local_state(&store));
        }
        let cluster = Arc::new(ClusterNode::start(config.cluster.clone()).await?);
        let replicas = ReplicaManager::start(store.clone(), cluster.clone(), config.replica);
        let (stop, _) = watch::channel(false);
        let duties = vec![
            tokio::spawn(every_blocking(
                config.retention_check_interval,
                stop.subscribe(),
                {
                    let store = store.clone();
                    move || match store.enforce_retention() {
                        Ok(0) => {}
                        Ok(deleted) => tracing::info!(deleted, "retention deleted segments"),
                        Err(err) => tracing::error!(error = %err, "retention enforcement failed"),
                    }
                },
            )),
            tokio::spawn(compact_every(
                config.cleaner_check_interval,
                stop.subscribe(),
                store.clone(),
            )),
            tokio::spawn(every_blocking(HW_CHECKPOINT_INTERVAL, stop.subscribe(), {
                let store = store.clone();
                move || {
                    if let Err(err) = store.checkpoint_high_watermarks() {
                        tracing::error!(error = %err, "high watermark checkpoint failed");
                    }
                }
            })),
        ];
        Ok(Arc::new(Node {
            store,
            cluster,
            replicas,
            producer_ids: tokio::sync::Mutex::new((0, 0)),
            stop,
            duties: Mutex::new(duties),
        }))
    }

    /// The quorum member (operations: cluster status, reassignments, draining).
    pub fn cluster(&self) -> &Arc<ClusterNode> {
        &self.cluster
    }

    /// The replica manager (operations: which partitions this node follows).
    pub fn replicas(&self) -> &Arc<ReplicaManager> {
        &self.replicas
    }

    /// Waits, at most `limit`, until the controller has registered this node unfenced
    /// and a quorum stands behind it, so it may lead; whether it did.
    pub async fn wait_ready(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut images = self.cluster.image();
        loop {
            let me = self.cluster.node_id();
            let registered = images
                .borrow_and_update()
                .brokers
                .get(&me)
                .is_some_and(|b| !b.fenced);
            if registered && self.cluster.stale_view().is_none() {
                return true;
            }
            let tick = deadline.min(Instant::now() + Duration::from_millis(5));
            if Instant::now() >= deadline {
                return false;
            }
            let _ = tokio::time::timeout_at(tick, images.changed()).await;
        }
    }

    /// Kafka's controlled shutdown: the quorum moves this node's leadership away
    /// while it still serves (see [`ClusterNode::controlled_shutdown`]). Without another
    /// live broker there is nobody to hand over to, and nothing is done.
    pub async fn controlled_shutdown(&self, limit: Duration) -> Result<(), ClusterError> {
        let me = self.cluster.node_id();
        let others_live = self
            .replicas
            .image()
            .brokers
            .iter()
            .any(|(id, b)| *id != me && !b.fenced);
        if !others_live {
            return Ok(());
        }
        self.cluster.controlled_shutdown(limit).await
    }

    /// Stops the storage duties, the partition roles and the quorum member, in that
    /// order (no fetcher or ISR change is left waiting on a stopped Raft core). The
    /// caller flushes the store. Idempotent.
    pub async fn shutdown(&self) {
        self.stop.send_replace(true);
        let duties: Vec<JoinHandle<()>> = self.duties.lock().drain(..).collect();
        for duty in duties {
            let _ = duty.await;
        }
        self.replicas.shutdown().await;
        self.cluster.shutdown().await;
    }
}

/// What a single node's data directory holds that the quorum must adopt.
fn local_state(store: &Store) -> LocalState {
    LocalState {
        topics: store
            .topics()
            .into_iter()
            .map(|t| AdoptedTopic {
                partitions: i32::try_from(t.partitions).unwrap_or(i32::MAX),
                name: t.name,
                topic_id: t.id,
                configs: t.overrides,
            })
            .collect(),
        producer_ids_from: store.reserved_producer_ids(),
    }
}

/// Nice value of the cleaner's thread. Compaction is catch-up work: under a
/// saturating load it yields the cores to appends, fetches and group commit
/// (at nice 0 one cleaner thread took a whole core of two and produce fell to
/// 61% of a plain topic's), and it still runs when they leave CPU time, which
/// they always do between bursts. 10 gives it a tenth of a busy core's time.
const CLEANER_NICE: i32 = 10;

/// Runs a compaction round every `period` (after the previous one ended) on
/// a thread of its own at a lower scheduling priority ([`CLEANER_NICE`]), until
/// `stop` turns true. Not the blocking pool: a nice value set there would stay
/// on a pool thread that later syncs a partition for a producer.
async fn compact_every(period: Duration, stop: watch::Receiver<bool>, store: Arc<Store>) {
    // One round at a time: the channel holds the reply slot of the round asked for.
    let (rounds, asked) = std::sync::mpsc::sync_channel::<oneshot::Sender<()>>(1);
    let spawned = std::thread::Builder::new()
        .name("sluice-cleaner".into())
        .spawn(move || {
            // On Linux a nice value is per thread; `None` names the calling one.
            if let Err(err) = rustix::process::setpriority_process(None, CLEANER_NICE) {
                tracing::warn!(error = %err, "could not lower the cleaner thread's priority");
            }
            while let Ok(done) = asked.recv() {
                store.compact();
                let _ = done.send(());
            }
        });
    if let Err(err) = spawned {
        tracing::error!(error = %err, "could not start the cleaner thread; no compaction");
        return;
    }
    every(period, stop, move || {
        let (done, round) = oneshot::channel();
        let asked = rounds.try_send(done).is_ok();
        async move {
            if !asked {
                tracing::error!("the cleaner thread ended; no more compaction");
                return false;
            }
            // A round in progress finishes before shutdown goes on (the
            // store is flushed and closed after the duties end).
            let _ = round.await;
            true
        }
    })
    .await;
}

/// Runs `work` on the blocking pool (it touches the disk; keep it off the async
/// workers) every `period`, until `stop` turns true.
async fn every_blocking<F>(period: Duration, stop: watch::Receiver<bool>, work: F)
where
    F: Fn() + Clone + Send + 'static,
{
    every(period, stop, move || {
        let work = work.clone();
        async move {
            if let Err(err) = tokio::task::spawn_blocking(work).await {
                tracing::error!(error = %err, "periodic storage task failed");
            }
            true
        }
    })
    .await;
}

/// Awaits `run()` every `period` (measured from the end of the previous
/// run), skipping the immediate first tick so start-up is not slowed down,
/// until `stop` turns true or a run returns false.
async fn every<F, R>(period: Duration, mut stop: watch::Receiver<bool>, mut run: F)
where
    F: FnMut() -> R,
    R: std::future::Future<Output = bool>,
{
    let mut ticker = tokio::time::interval(period.max(Duration::from_millis(10)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if !run().await {
            return;
        }
    }
}

//! An in-process three-broker cluster: real ClusterNodes over TCP on 127.0.0.1
//! ephemeral ports, one Store per broker in a temp dir, ReplicaManagers whose followers
//! reach leaders through an [`InProcessConnector`].

use sluice_vocab::ErrorCode;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sluice_cluster::{BrokerId, ClusterConfig, ClusterNode, Command, CommandOutput, MetadataImage};
use sluice_log::{FlushPolicy, Partition, ReadLimit, Store, StoreConfig, TopicConfig};
use sluice_replica::{InProcessConnector, ReplicaConfig, ReplicaManager};
use tempfile::TempDir;
use tokio::net::TcpListener;

pub const WAIT: Duration = Duration::from_secs(20);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,openraft=off")),
        )
        .with_test_writer()
        .try_init();
}

fn cluster_config(id: BrokerId, base: &Path, peers: &[(BrokerId, String)]) -> ClusterConfig {
    let mut c = ClusterConfig::new(id, base.join(format!("raft-{id}")), peers.to_vec());
    c.kafka_host = "127.0.0.1".to_string();
    c.kafka_port = 19000 + id as u16;
    c.heartbeat_interval = Duration::from_millis(100);
    c.session_timeout = Duration::from_millis(1500);
    c.raft_heartbeat_interval = Duration::from_millis(50);
    c.election_timeout_min = Duration::from_millis(300);
    c.election_timeout_max = Duration::from_millis(600);
    c.propose_timeout = Duration::from_secs(5);
    // Each test's cluster its own id: a node of a cluster another test process
    // stopped frees its port, and that cluster's survivors keep calling it.
    c.cluster_id = Some(
        base.file_name()
            .map(|n| n.to_string_lossy().replace('.', ""))
            .unwrap_or_default(),
    );
    c
}

pub fn replica_config(id: BrokerId, lag: Duration, fetch_max_wait: Duration) -> ReplicaConfig {
    let mut c = ReplicaConfig::new(id);
    c.replica_lag_max = lag;
    c.fetch_max_wait = fetch_max_wait;
    c
}

pub struct Node {
    pub cluster: Arc<ClusterNode>,
    pub store: Arc<Store>,
    pub mgr: Arc<ReplicaManager>,
}

pub struct Cluster {
    pub dir: TempDir,
    pub peers: Vec<(BrokerId, String)>,
    pub connector: Arc<InProcessConnector>,
    pub nodes: BTreeMap<BrokerId, Node>,
    /// replica.lag.time.max of every broker.
    pub lag: Duration,
    /// How long a leader holds a follower's fetch that has nothing new.
    pub fetch_max_wait: Duration,
}

impl Cluster {
    pub async fn start(n: i32) -> Cluster {
        Cluster::start_with_lag(n, Duration::from_millis(1000)).await
    }

    pub async fn start_with_lag(n: i32, lag: Duration) -> Cluster {
        Cluster::start_with(n, lag, Duration::from_millis(100)).await
    }

    pub async fn start_with(n: i32, lag: Duration, fetch_max_wait: Duration) -> Cluster {
        init_tracing();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut listeners = Vec::new();
        for id in 1..=n {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = l.local_addr().expect("addr").to_string();
            listeners.push((id, addr, l));
        }
        let peers: Vec<(BrokerId, String)> = listeners
            .iter()
            .map(|(id, a, _)| (*id, a.clone()))
            .collect();
        let mut c = Cluster {
            dir,
            peers,
            connector: InProcessConnector::new(),
            nodes: BTreeMap::new(),
            lag,
            fetch_max_wait,
        };
        for (id, _, l) in listeners {
            c.launch(id, l).await;
        }
        c
    }

    fn data_dir(&self, id: BrokerId) -> PathBuf {
        self.dir.path().join(format!("data-{id}"))
    }

    async fn launch(&mut self, id: BrokerId, listener: TcpListener) {
        let cfg = cluster_config(id, self.dir.path(), &self.peers);
        let cluster = Arc::new(
            ClusterNode::start_on(cfg, listener)
                .await
                .expect("start cluster node"),
        );
        let store = Store::open(StoreConfig {
            data_dir: self.data_dir(id),
            // As a cluster node runs: acks=all needs two in-sync replicas.
            defaults: TopicConfig {
                min_insync_replicas: 2,
                ..TopicConfig::default()
            },
            flush: FlushPolicy::Always,
            cleaner: Default::default(),
        })
        .expect("open store");
        let mgr = ReplicaManager::start_with(
            store.clone(),
            cluster.clone(),
            replica_config(id, self.lag, self.fetch_max_wait),
            self.connector.for_node(id),
        );
        self.connector.register(&mgr);
        self.nodes.insert(
            id,
            Node {
                cluster,
                store,
                mgr,
            },
        );
    }

    pub fn node(&self, id: BrokerId) -> &Node {
        self.nodes.get(&id).expect("node is running")
    }

    pub fn mgr(&self, id: BrokerId) -> &Arc<ReplicaManager> {
        &self.node(id).mgr
    }

    /// Any running node's image (they converge).
    pub fn any(&self) -> &Node {
        self.nodes.values().next().expect("a running node")
    }

    /// Stops a broker: replica manager, then its cluster node (data stays).
    pub async fn stop(&mut self, id: BrokerId) {
        if let Some(n) = self.nodes.remove(&id) {
            n.mgr.shutdown().await;
            n.cluster.shutdown().await;
            n.store.flush_all().expect("flush");
        }
    }

    /// Restarts a stopped broker from its data dirs on its old Raft port.
    pub async fn restart(&mut self, id: BrokerId) {
        let addr = self
            .peers
            .iter()
            .find(|(p, _)| *p == id)
            .expect("peer")
            .1
            .clone();
        let mut tries = 0;
        let l = loop {
            match TcpListener::bind(&addr).await {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    tracing::debug!(error = %e, "rebind");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot rebind {addr}: {e}"),
            }
        };
        self.launch(id, l).await;
    }

    /// Creates a topic through the quorum and waits until every running broker took its
    /// role for every partition.
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: i32,
        rf: i16,
        configs: &[(&str, &str)],
    ) {
        let configs: BTreeMap<String, String> = configs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        eventually(WAIT, "all brokers registered", || async {
            (self.any().mgr.image().live_brokers().len() == self.nodes.len()).then_some(())
        })
        .await;
        let r = self
            .any()
            .cluster
            .propose(Command::CreateTopic {
                name: name.to_string(),
                partitions,
                replication_factor: rf,
                configs,
            })
            .await
            .expect("propose");
        assert!(
            matches!(r, Ok(CommandOutput::TopicCreated { .. })),
            "create topic: {r:?}"
        );
        for p in 0..partitions {
            self.settled(name, p).await;
        }
    }

    /// Waits until the partition has a leader that leads it in the image's epoch and
    /// every other running replica follows it in that epoch; returns the leader.
    pub async fn settled(&self, topic: &str, partition: i32) -> BrokerId {
        eventually(WAIT, "leader and followers in their roles", || async {
            let image = self.any().mgr.image();
            let p = image.partition(topic, partition)?;
            if !self.nodes.contains_key(&p.leader) {
                return None;
            }
            for (id, n) in &self.nodes {
                if !p.replicas.contains(id) {
                    continue;
                }
                let img = n.mgr.image();
                let mine = img.partition(topic, partition)?;
                if mine.leader_epoch != p.leader_epoch {
                    return None;
                }
                if *id == p.leader {
                    if n.mgr.leader_epoch_of(topic, partition) != Some(p.leader_epoch) {
                        return None;
                    }
                } else if n.mgr.following(topic, partition) != Some((p.leader, p.leader_epoch)) {
                    return None;
                }
            }
            Some(p.leader)
        })
        .await
    }

    pub fn image(&self) -> Arc<MetadataImage> {
        self.any().mgr.image()
    }

    pub fn partition(&self, id: BrokerId, topic: &str, p: i32) -> Arc<Partition> {
        self.node(id)
            .store
            .partition(topic, p)
            .expect("local partition")
    }

    pub async fn shutdown(mut self) {
        let ids: Vec<BrokerId> = self.nodes.keys().copied().collect();
        for id in ids {
            self.stop(id).await;
        }
    }
}

/// Polls `f` every 20 ms until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A RecordBatch v2 of `count` opaque records (base offset 0, valid CRC-32C); `tag`
/// makes batches distinguishable.
pub fn batch(count: i32, tag: u8) -> Vec<u8> {
    let payload = 16;
    let ts: i64 = 1_700_000_000_000;
    let mut b = Vec::with_capacity(61 + payload);
    b.extend_from_slice(&0i64.to_be_bytes());
    b.extend_from_slice(&((49 + payload) as i32).to_be_bytes());
    b.extend_from_slice(&(-1i32).to_be_bytes());
    b.push(2);
    b.extend_from_slice(&0u32.to_be_bytes());
    b.extend_from_slice(&0i16.to_be_bytes());
    b.extend_from_slice(&(count - 1).to_be_bytes());
    b.extend_from_slice(&ts.to_be_bytes());
    b.extend_from_slice(&ts.to_be_bytes());
    b.extend_from_slice(&(-1i64).to_be_bytes());
    b.extend_from_slice(&(-1i16).to_be_bytes());
    b.extend_from_slice(&(-1i32).to_be_bytes());
    b.extend_from_slice(&count.to_be_bytes());
    for i in 0..payload {
        b.push(tag.wrapping_add(i as u8));
    }
    let crc = crc32c::crc32c(&b[21..]);
    b[17..21].copy_from_slice(&crc.to_be_bytes());
    b
}

/// Produces one batch with acks=all on broker `id`; returns its end offset.
pub async fn produce_all(
    c: &Cluster,
    id: BrokerId,
    topic: &str,
    tag: u8,
) -> Result<i64, ErrorCode> {
    let mgr = c.mgr(id);
    let h = mgr.leader_for_produce(topic, 0, true)?;
    let r = h
        .append(&batch(2, tag))
        .map_err(|_| ErrorCode::NotLeaderOrFollower)?;
    h.wait_committed(r.end_offset, Some(Duration::from_secs(10)))
        .await?;
    Ok(r.end_offset)
}

/// Every stored batch of the partition, up to its log end: (base offset, bytes).
pub fn log_contents(p: &Partition) -> Vec<u8> {
    let start = p.log_start_offset();
    let end = p.log_end_offset();
    if start >= end {
        return Vec::new();
    }
    p.read(start, 64 << 20, true, ReadLimit::LogEnd)
        .expect("read")
        .records
        .to_vec()
}

/// Waits until every running replica's log equals `leader`'s, and returns it.
pub async fn logs_converge(c: &Cluster, leader: BrokerId, topic: &str) -> Vec<u8> {
    eventually(WAIT, "replica logs equal to the leader's", || async {
        let want = log_contents(&c.partition(leader, topic, 0));
        for id in c.nodes.keys() {
            if log_contents(&c.partition(*id, topic, 0)) != want {
                return None;
            }
        }
        Some(want)
    })
    .await
}

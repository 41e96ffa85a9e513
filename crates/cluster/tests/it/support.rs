//! Shared helpers: an in-process cluster over real TCP on 127.0.0.1 ephemeral ports.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sluice_cluster::{BrokerId, ClusterConfig, ClusterNode, MetadataImage};
use tempfile::TempDir;
use tokio::net::TcpListener;

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,openraft=off")),
        )
        .with_test_writer()
        .try_init();
}

/// Timings small enough for tests, large enough for a loaded 2-core machine.
pub fn fast_config(id: BrokerId, base: &Path, peers: &[(BrokerId, String)]) -> ClusterConfig {
    let mut c = ClusterConfig::new(id, base.join(format!("node-{id}")), peers.to_vec());
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

pub struct TestCluster {
    pub dir: TempDir,
    /// Applied to every node's config, at start and restart.
    pub tweak: fn(&mut ClusterConfig),
    pub peers: Vec<(BrokerId, String)>,
    pub nodes: BTreeMap<BrokerId, ClusterNode>,
}

impl TestCluster {
    /// Binds one listener per node first, so every node knows its peers' ports.
    pub async fn start(n: i32) -> TestCluster {
        TestCluster::start_with(n, |_| {}).await
    }

    /// Like [`TestCluster::start`], with `tweak` applied to every node's config.
    pub async fn start_with(n: i32, tweak: fn(&mut ClusterConfig)) -> TestCluster {
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
        let mut nodes = BTreeMap::new();
        for (id, _, l) in listeners {
            let mut cfg = fast_config(id, dir.path(), &peers);
            tweak(&mut cfg);
            let node = ClusterNode::start_on(cfg, l).await.expect("start node");
            nodes.insert(id, node);
        }
        TestCluster {
            dir,
            tweak,
            peers,
            nodes,
        }
    }

    pub fn node(&self, id: BrokerId) -> &ClusterNode {
        self.nodes.get(&id).expect("node is running")
    }

    /// Shuts a node down (its data dir stays).
    pub async fn stop(&mut self, id: BrokerId) {
        if let Some(n) = self.nodes.remove(&id) {
            n.shutdown().await;
        }
    }

    /// Restarts a stopped node from its data dir on its old port.
    pub async fn restart(&mut self, id: BrokerId) {
        let addr = &self.peers.iter().find(|(p, _)| *p == id).expect("peer").1;
        let mut tries = 0;
        let l = loop {
            match TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    tracing::debug!(error = %e, "rebind");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot rebind {addr}: {e}"),
            }
        };
        let mut cfg = fast_config(id, self.dir.path(), &self.peers);
        (self.tweak)(&mut cfg);
        let node = ClusterNode::start_on(cfg, l).await.expect("restart node");
        self.nodes.insert(id, node);
    }

    /// Waits until every running node agrees on one controller, and returns it.
    pub async fn controller(&self) -> BrokerId {
        eventually(
            Duration::from_secs(10),
            "a controller all running nodes agree on",
            || async {
                let ids: Vec<Option<BrokerId>> =
                    self.nodes.values().map(|n| n.controller_id()).collect();
                match ids.first().copied().flatten() {
                    Some(c) if ids.iter().all(|i| *i == Some(c)) && self.nodes.contains_key(&c) => {
                        Some(c)
                    }
                    _ => None,
                }
            },
        )
        .await
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

/// Waits until `node`'s image satisfies `pred`.
pub async fn wait_image(
    node: &ClusterNode,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&MetadataImage) -> bool,
) -> Arc<MetadataImage> {
    let mut rx = node.image();
    let waited = tokio::time::timeout(timeout, async {
        rx.wait_for(|img| pred(img)).await.map(|img| img.clone())
    })
    .await;
    match waited {
        Ok(Ok(img)) => img,
        Ok(Err(_)) => panic!(
            "node {} image channel closed waiting for {what}",
            node.node_id()
        ),
        Err(_) => panic!(
            "node {} timed out after {timeout:?} waiting for {what}; image: {:#?}",
            node.node_id(),
            node.image().borrow()
        ),
    }
}

//! A seeded fault test below TCP: openraft's `RaftNetworkFactory` over an in-memory
//! router with TiKV-style filters (partition, random drop). Three Raft nodes on the real
//! storage. Each round isolates the leader in a minority, lets it append entries it can
//! never commit, checks that the majority elects a new leader and commits, heals, and
//! checks that the old leader's uncommitted suffix is truncated (Log Matching) and that
//! every node applies the same image (State Machine Safety).
//!
//! `SLUICE_SEED=<n>` replays a run; a failure prints the seed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Config, Raft, RaftNetwork, RaftNetworkFactory, ServerState};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sluice_cluster::store::{LogStore, StateMachineStore};
use sluice_cluster::{Command, CommandOutput, NodeId, TypeConfig};

use crate::support::{eventually, init_tracing};

/// Which messages get through. Like TiKV's `transport_simulate` filters.
struct Filters {
    /// Node -> group; messages cross only within a group. Empty: fully connected.
    groups: BTreeMap<NodeId, u32>,
    /// Probability that a message (either direction) is dropped.
    drop_rate: f64,
    rng: StdRng,
    dropped: u64,
}

#[derive(Clone)]
struct Router {
    nodes: Arc<Mutex<BTreeMap<NodeId, Raft<TypeConfig>>>>,
    filters: Arc<Mutex<Filters>>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct SimError(String);

impl Router {
    fn new(seed: u64) -> Router {
        Router {
            nodes: Arc::default(),
            filters: Arc::new(Mutex::new(Filters {
                groups: BTreeMap::new(),
                drop_rate: 0.0,
                rng: StdRng::seed_from_u64(seed ^ 0x5eed),
                dropped: 0,
            })),
        }
    }

    fn filters(&self) -> std::sync::MutexGuard<'_, Filters> {
        self.filters.lock().unwrap()
    }

    /// Isolates `ids` from the rest.
    fn partition(&self, ids: &[NodeId]) {
        let all: Vec<NodeId> = self.nodes.lock().unwrap().keys().copied().collect();
        let mut f = self.filters();
        f.groups = all
            .iter()
            .map(|id| (*id, u32::from(ids.contains(id))))
            .collect();
    }

    fn heal(&self) {
        self.filters().groups.clear();
    }

    /// Whether a message from `from` to `to` is delivered.
    fn pass(&self, from: NodeId, to: NodeId) -> Result<Raft<TypeConfig>, SimError> {
        {
            let mut f = self.filters();
            if !f.groups.is_empty() && f.groups.get(&from) != f.groups.get(&to) {
                return Err(SimError(format!("{from} -> {to}: partitioned")));
            }
            let rate = f.drop_rate;
            if rate > 0.0 && f.rng.gen_bool(rate) {
                f.dropped += 1;
                return Err(SimError(format!("{from} -> {to}: dropped")));
            }
        }
        self.nodes
            .lock()
            .unwrap()
            .get(&to)
            .cloned()
            .ok_or_else(|| SimError(format!("{to} is down")))
    }
}

struct Net {
    from: NodeId,
    router: Router,
}

struct Conn {
    from: NodeId,
    to: NodeId,
    router: Router,
}

impl RaftNetworkFactory<TypeConfig> for Net {
    type Network = Conn;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Conn {
        Conn {
            from: self.from,
            to: target,
            router: self.router.clone(),
        }
    }
}

impl Conn {
    /// Filters the request, then (after delivery) the reply.
    async fn deliver<T, E, F, Fut>(&self, f: F) -> Result<T, RPCError<NodeId, BasicNode, E>>
    where
        E: std::error::Error,
        F: FnOnce(Raft<TypeConfig>) -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let target = self
            .router
            .pass(self.from, self.to)
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let reply = f(target).await;
        // A reply can be lost too (the request took effect anyway).
        self.router
            .pass(self.to, self.from)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        reply.map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))
    }
}

impl RaftNetwork<TypeConfig> for Conn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.deliver(|raft| async move { raft.append_entries(rpc).await })
            .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.deliver(|raft| async move { raft.install_snapshot(rpc).await })
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.deliver(|raft| async move { raft.vote(rpc).await })
            .await
    }
}

struct SimNode {
    raft: Raft<TypeConfig>,
    log: LogStore,
    sm: StateMachineStore,
}

/// Prints the seed when the test panics.
struct SeedGuard(u64);

impl Drop for SeedGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "router fault test failed; replay with SLUICE_SEED={}",
                self.0
            );
        }
    }
}

fn leader_of(nodes: &BTreeMap<NodeId, SimNode>, among: &[NodeId]) -> Option<NodeId> {
    let mut leader = None;
    for id in among {
        let m = nodes[id].raft.metrics().borrow().clone();
        if m.state == ServerState::Leader {
            leader = Some(*id);
        }
    }
    let l = leader?;
    // Every node of the group follows it.
    among
        .iter()
        .all(|id| nodes[id].raft.metrics().borrow().current_leader == Some(l))
        .then_some(l)
}

fn create(name: String) -> Command {
    Command::CreateTopic {
        name,
        partitions: 1,
        replication_factor: 1,
        configs: BTreeMap::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_leader_loses_its_uncommitted_suffix_and_all_nodes_converge() {
    init_tracing();
    let seed: u64 = std::env::var("SLUICE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let _guard = SeedGuard(seed);
    eprintln!("router fault test seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);

    let dir = tempfile::tempdir().unwrap();
    let router = Router::new(seed);
    let config = Arc::new(
        Config {
            heartbeat_interval: 50,
            election_timeout_min: 200,
            election_timeout_max: 400,
            // Snapshots and purges happen during the run too.
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(rng.gen_range(5..20)),
            // Keep the recent log so the truncation of each round stays observable;
            // older entries are purged behind snapshots.
            max_in_snapshot_log_to_keep: rng.gen_range(30..60),
            ..Default::default()
        }
        .validate()
        .unwrap(),
    );
    let ids: Vec<NodeId> = vec![1, 2, 3];
    let mut nodes = BTreeMap::new();
    for id in &ids {
        let (log, sm) = sluice_cluster::store::open(&dir.path().join(id.to_string())).unwrap();
        let net = Net {
            from: *id,
            router: router.clone(),
        };
        let raft = Raft::new(*id, config.clone(), net, log.clone(), sm.clone())
            .await
            .unwrap();
        router.nodes.lock().unwrap().insert(*id, raft.clone());
        nodes.insert(*id, SimNode { raft, log, sm });
    }
    let members: BTreeMap<NodeId, BasicNode> =
        ids.iter().map(|id| (*id, BasicNode::default())).collect();
    nodes[&1].raft.initialize(members).await.unwrap();
    let first = eventually(Duration::from_secs(10), "a first leader", || async {
        leader_of(&nodes, &ids)
    })
    .await;
    // The topics created below need a live broker to be placed on.
    let r = nodes[&first]
        .raft
        .client_write(Command::RegisterBroker {
            node_id: 1,
            kafka_host: "h".into(),
            kafka_port: 9092,
            raft_addr: "h:9093".into(),
            incarnation: 1,
            replica_addr: String::new(),
            endpoints: Default::default(),
        })
        .await
        .unwrap();
    assert_eq!(r.data, Ok(CommandOutput::BrokerEpoch(r.log_id.index)));

    let t = Duration::from_secs(10);
    let mut committed_topics: BTreeSet<String> = BTreeSet::new();
    let rounds = 3;
    for round in 0..rounds {
        // Steady phase with lossy links: the protocol retransmits.
        router.filters().drop_rate = rng.gen_range(0.0..0.15);
        let leader = eventually(t, "a leader", || async { leader_of(&nodes, &ids) }).await;
        for i in 0..rng.gen_range(1..6) {
            let name = format!("r{round}-ok{i}");
            let r = eventually(t, "a committed write", || {
                let name = name.clone();
                let nodes = &nodes;
                let ids = &ids;
                async move {
                    let l = leader_of(nodes, ids)?;
                    match nodes[&l].raft.client_write(create(name)).await {
                        Ok(resp) => Some(resp.data),
                        Err(_) => None,
                    }
                }
            })
            .await;
            // Retries after a lost reply may find it already there: that is the
            // proposer's ambiguity, not a Raft fault.
            assert!(
                matches!(r, Ok(CommandOutput::TopicCreated { .. }))
                    || committed_topics.contains(&name)
                    || r.is_err(),
                "{r:?}"
            );
            committed_topics.insert(name);
        }
        router.filters().drop_rate = 0.0;

        // Isolate the leader in a minority of one.
        let leader = leader_of(&nodes, &ids).unwrap_or(leader);
        let old_term = nodes[&leader].raft.metrics().borrow().current_term;
        let before_last = nodes[&leader]
            .raft
            .metrics()
            .borrow()
            .last_log_index
            .unwrap_or(0);
        router.partition(&[leader]);
        let ghosts = rng.gen_range(1..5);
        let mut pending = Vec::new();
        for g in 0..ghosts {
            // Appended to the old leader's log only; can never commit.
            if let Ok(rx) = nodes[&leader]
                .raft
                .client_write_ff(create(format!("r{round}-ghost{g}")))
                .await
            {
                pending.push(rx);
            }
        }
        let ghost_ids = eventually(
            t,
            "ghost entries appended on the isolated leader",
            || async {
                let ids = nodes[&leader].log.log_ids();
                let mine: Vec<_> = ids
                    .into_iter()
                    .filter(|l| l.index > before_last && l.leader_id.term == old_term)
                    .collect();
                (mine.len() >= ghosts).then_some(mine)
            },
        )
        .await;

        let majority: Vec<NodeId> = ids.iter().copied().filter(|id| *id != leader).collect();
        let new_leader = eventually(t, "a new leader in the majority", || async {
            leader_of(&nodes, &majority)
        })
        .await;
        assert_ne!(new_leader, leader);
        // Enough new entries to overwrite every ghost index.
        for i in 0..ghosts + 2 {
            let name = format!("r{round}-maj{i}");
            let r = nodes[&new_leader]
                .raft
                .client_write(create(name.clone()))
                .await;
            assert!(
                matches!(r, Ok(ref resp) if resp.data.is_ok()),
                "majority commit: {r:?}"
            );
            committed_topics.insert(name);
        }

        router.heal();
        let target = nodes[&new_leader].raft.metrics().borrow().last_applied;
        for id in &ids {
            eventually(t, "every node applied the majority's log", || async {
                (nodes[id].raft.metrics().borrow().last_applied >= target).then_some(())
            })
            .await;
        }
        // The ghost proposals were answered with an error, never a success.
        for rx in pending {
            if let Ok(Ok(Ok(resp))) = tokio::time::timeout(Duration::from_secs(1), rx).await {
                panic!("a ghost entry was committed: {resp:?}");
            }
        }
        // Log Matching: every ghost index now holds the new leader's entry.
        let reference = nodes[&new_leader].log.log_ids();
        let old_log = nodes[&leader].log.log_ids();
        for g in &ghost_ids {
            let current = old_log.iter().find(|l| l.index == g.index);
            let want = reference.iter().find(|l| l.index == g.index);
            assert!(
                current.is_some(),
                "round {round}: index {} missing on the old leader",
                g.index
            );
            assert_ne!(
                current,
                Some(g),
                "round {round}: ghost {g} survived on the old leader"
            );
            assert_eq!(
                current, want,
                "round {round}: old leader holds another entry at {}",
                g.index
            );
        }
        for id in &ids {
            let mine = nodes[id].log.log_ids();
            for l in &mine {
                if let Some(r) = reference.iter().find(|r| r.index == l.index) {
                    assert_eq!(
                        l, r,
                        "round {round}: node {id} diverges at index {}",
                        l.index
                    );
                }
            }
        }
        // State Machine Safety: identical images, no ghost, every committed topic.
        let images: Vec<_> = ids.iter().map(|id| nodes[id].sm.image()).collect();
        let mut want_applied = 0;
        for img in &images {
            want_applied = want_applied.max(img.applied_index);
        }
        for id in &ids {
            eventually(t, "images at the same index", || async {
                (nodes[id].sm.image().applied_index >= want_applied).then_some(())
            })
            .await;
        }
        let images: Vec<_> = ids.iter().map(|id| nodes[id].sm.image()).collect();
        for (id, img) in ids.iter().zip(&images) {
            if img.applied_index == images[0].applied_index {
                assert_eq!(
                    img.topics, images[0].topics,
                    "round {round}: node {id} image differs"
                );
            }
            assert!(
                img.topics.keys().all(|k| !k.contains("ghost")),
                "round {round}: node {id} applied an uncommitted entry"
            );
            for name in &committed_topics {
                assert!(
                    img.topics.contains_key(name),
                    "round {round}: node {id} lost committed {name}"
                );
            }
        }
    }
    eprintln!("router: {} messages dropped", router.filters().dropped);
    for n in nodes.values() {
        n.raft.shutdown().await.unwrap();
    }
}

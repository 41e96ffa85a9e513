//! A three-node cluster over real TCP: bootstrap, replication, forwarding, failover,
//! restart from the data dir.

use std::collections::BTreeMap;
use std::time::Duration;

use openraft::LogId;
use sluice_cluster::{ClusterNode, Command, CommandError, CommandOutput, MetadataImage};
use sluice_vocab::KafkaError;

use crate::support::{eventually, wait_image, TestCluster};

const T: Duration = Duration::from_secs(10);

fn create(name: &str, partitions: i32, rf: i16) -> Command {
    Command::CreateTopic {
        name: name.to_string(),
        partitions,
        replication_factor: rf,
        configs: BTreeMap::new(),
    }
}

fn membership_log_id(node: &ClusterNode) -> Option<LogId<u64>> {
    let m = node.raft().metrics();
    let id = *m.borrow().membership_config.log_id();
    id
}

fn all_registered(img: &MetadataImage, n: usize) -> bool {
    !img.cluster_id.is_empty() && img.brokers.len() == n && img.brokers.values().all(|b| !b.fenced)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_create_topic_rf3_and_every_image_converges() {
    let c = TestCluster::start(3).await;
    let ctrl = c.controller().await;
    for n in c.nodes.values() {
        wait_image(n, T, "3 registered brokers", |i| all_registered(i, 3)).await;
    }
    // No replica address configured: the Raft host with the Kafka port.
    let img = c.node(ctrl).image().borrow().clone();
    for (id, b) in &img.brokers {
        assert_eq!(b.replica_addr, format!("127.0.0.1:{}", 19000 + id));
        assert_eq!(b.replica_addr, c.node(*id).replica_addr());
    }
    let r = c
        .node(ctrl)
        .propose(create("orders", 3, 3))
        .await
        .expect("quorum");
    assert!(matches!(r, Ok(CommandOutput::TopicCreated { .. })), "{r:?}");
    let mut images = Vec::new();
    for n in c.nodes.values() {
        images.push(wait_image(n, T, "topic orders", |i| i.topics.contains_key("orders")).await);
    }
    let t = &images[0].topics["orders"];
    assert_eq!(t.partitions.len(), 3);
    for p in &t.partitions {
        assert_eq!(p.replicas.len(), 3);
        assert_eq!(p.isr, p.replicas);
        assert_eq!(p.leader, p.replicas[0]);
    }
    // Preferred leaders are spread over the three brokers.
    let leaders: std::collections::BTreeSet<i32> = t.partitions.iter().map(|p| p.leader).collect();
    assert_eq!(leaders.len(), 3);
    for img in &images[1..] {
        assert_eq!(
            img.topics, images[0].topics,
            "replicas converge on the same topics"
        );
        assert_eq!(img.cluster_id, images[0].cluster_id);
    }
    // Validation happens in apply and answers Kafka codes to the proposer.
    let r = c
        .node(ctrl)
        .propose(create("big", 1, 4))
        .await
        .expect("quorum");
    assert_eq!(r.map_err(|e| e.error_code().code()), Err(38));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proposal_from_a_follower_is_forwarded_to_the_controller() {
    let c = TestCluster::start(3).await;
    let ctrl = c.controller().await;
    let follower = *c.nodes.keys().find(|id| **id != ctrl).expect("a follower");
    wait_image(c.node(follower), T, "3 registered brokers", |i| {
        all_registered(i, 3)
    })
    .await;
    let r = c
        .node(follower)
        .propose(create("fwd", 2, 3))
        .await
        .expect("forwarded");
    assert!(matches!(r, Ok(CommandOutput::TopicCreated { .. })), "{r:?}");
    let r = c
        .node(follower)
        .propose(create("fwd", 2, 3))
        .await
        .expect("forwarded");
    assert_eq!(r, Err(CommandError::TopicAlreadyExists));
    let r = c
        .node(follower)
        .propose(Command::AllocateProducerIds { count: 1000 })
        .await
        .expect("forwarded");
    assert_eq!(
        r,
        Ok(CommandOutput::ProducerIds {
            first: 0,
            count: 1000
        })
    );
    for n in c.nodes.values() {
        wait_image(n, T, "fwd and pid block", |i| {
            i.topics.contains_key("fwd") && i.next_producer_id == 1000
        })
        .await;
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_failover_then_old_controller_restarts_and_catches_up() {
    let mut c = TestCluster::start(3).await;
    let old = c.controller().await;
    for n in c.nodes.values() {
        wait_image(n, T, "3 registered brokers", |i| all_registered(i, 3)).await;
    }
    let r = c
        .node(old)
        .propose(create("before", 1, 3))
        .await
        .expect("quorum");
    assert!(r.is_ok(), "{r:?}");
    let membership_before = membership_log_id(c.node(old));
    let cluster_id = c.node(old).image().borrow().cluster_id.clone();
    let before = c.node(old).raft_figures();
    assert!(before.is_leader && before.leader_changes >= 1, "{before:?}");
    assert!(before.last_applied_index.is_some() && before.last_log_index.is_some());

    c.stop(old).await;
    let new = c.controller().await;
    assert_ne!(new, old);
    // Both survivors saw the leader change, agree on the new term, and only
    // the new controller says it leads.
    let figures = eventually(T, "survivors agree on the new leader's term", || async {
        let f: Vec<_> = c.nodes.values().map(|n| n.raft_figures()).collect();
        let agreed = f
            .iter()
            .all(|x| x.term == f[0].term && x.leader_changes >= 2);
        agreed.then_some(f)
    })
    .await;
    assert!(figures[0].term > before.term, "{figures:?} {before:?}");
    assert_eq!(
        figures.iter().filter(|f| f.is_leader).count(),
        1,
        "{figures:?}"
    );
    assert!(c.node(new).raft_figures().is_leader);
    let survivor = *c.nodes.keys().find(|id| **id != new).expect("survivor");
    let r = c
        .node(survivor)
        .propose(create("during", 1, 2))
        .await
        .expect("new quorum");
    assert!(r.is_ok(), "{r:?}");

    // The new controller fences the dead one after a session, and only it: the
    // survivors got a full session of grace and have been heartbeating since.
    let img = wait_image(c.node(new), T, "old controller fenced", |i| {
        i.brokers.get(&old).is_some_and(|b| b.fenced)
    })
    .await;
    assert!(
        img.brokers
            .iter()
            .filter(|(id, _)| **id != old)
            .all(|(_, b)| !b.fenced),
        "{img:#?}"
    );
    // Partition 0 of "before" was led by... whoever: it is led by a live broker now.
    let p = img.partition("before", 0).expect("partition");
    assert_ne!(p.leader, old);
    assert!(!p.isr.contains(&old));

    c.restart(old).await;
    let img = wait_image(c.node(old), T, "restarted node caught up", |i| {
        i.topics.contains_key("during") && i.brokers.get(&old).is_some_and(|b| !b.fenced)
    })
    .await;
    assert_eq!(img.cluster_id, cluster_id, "same cluster, not a new one");
    // No re-initialization: the membership entry is the original one.
    let membership_after = eventually(T, "membership loaded", || async {
        let m = membership_log_id(c.node(old));
        m.is_some().then_some(m)
    })
    .await;
    assert_eq!(membership_after, membership_before);
    // Three live brokers are needed: on a loaded machine a survivor's
    // heartbeat can run late and its session lapse for a moment (it is
    // fenced, then unfenced at its next heartbeat), so retry while the
    // controller counts fewer.
    eventually(
        T,
        "a topic of three replicas created through the restarted node",
        || async {
            let r = c
                .node(old)
                .propose(create("after", 1, 3))
                .await
                .expect("quorum");
            match r {
                Ok(_) => Some(()),
                Err(CommandError::InvalidReplicationFactor(_)) => None,
                Err(e) => panic!("{e:?}"),
            }
        },
    )
    .await;
    for n in c.nodes.values() {
        wait_image(n, T, "after", |i| i.topics.contains_key("after")).await;
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_node_catches_up_by_snapshot_over_tcp() {
    // Snapshot every few entries and keep no log below it, so a node that missed
    // more than that can only catch up through InstallSnapshot.
    let mut c = TestCluster::start_with(3, |cfg| {
        cfg.snapshot_every = 5;
        cfg.keep_below_snapshot = 0;
    })
    .await;
    let ctrl = c.controller().await;
    for n in c.nodes.values() {
        wait_image(n, T, "3 registered brokers", |i| all_registered(i, 3)).await;
    }
    let lagging = *c.nodes.keys().find(|id| **id != ctrl).expect("a follower");
    c.stop(lagging).await;
    for i in 0..30 {
        let r = c
            .node(ctrl)
            .propose(Command::AllocateProducerIds { count: 7 })
            .await
            .expect("quorum of two");
        assert!(r.is_ok(), "proposal {i}: {r:?}");
    }
    let purged = eventually(
        T,
        "the controller purged its log behind a snapshot",
        || async {
            let m = c.node(ctrl).raft().metrics();
            let p = m.borrow().purged;
            p.filter(|p| p.index > 10)
        },
    )
    .await;
    c.restart(lagging).await;
    let want = c.node(ctrl).image().borrow().next_producer_id;
    assert_eq!(want, 30 * 7);
    let img = wait_image(c.node(lagging), T, "caught up", |i| {
        i.next_producer_id == want
    })
    .await;
    // The image is published before openraft updates its metrics: wait for them.
    eventually(T, "the installed snapshot in the metrics", || async {
        let m = c.node(lagging).raft().metrics();
        let snap = m.borrow().snapshot;
        snap.filter(|s| s.index >= purged.index)
    })
    .await;
    assert_eq!(img.brokers.len(), 3);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lowest_id_initializes_and_only_with_a_majority() {
    crate::support::init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut listeners = Vec::new();
    for id in 1..=3 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        listeners.push((id, addr, l));
    }
    let peers: Vec<(i32, String)> = listeners
        .iter()
        .map(|(id, a, _)| (*id, a.clone()))
        .collect();
    let mut by_id: BTreeMap<i32, tokio::net::TcpListener> =
        listeners.into_iter().map(|(id, _, l)| (id, l)).collect();
    let start = |id: i32, l| {
        let cfg = crate::support::fast_config(id, dir.path(), &peers);
        ClusterNode::start_on(cfg, l)
    };
    // Node 1 alone: no majority, so it must not form a one-node cluster.
    let n1 = start(1, by_id.remove(&1).expect("l1"))
        .await
        .expect("start 1");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(n1.controller_id(), None, "initialized without a majority");
    assert!(!n1.raft().is_initialized().await.expect("raft"));
    // Nodes 2 and 3 never initialize by themselves; with 2 up, node 1 has a majority.
    let n3 = start(3, by_id.remove(&3).expect("l3"))
        .await
        .expect("start 3");
    let c = eventually(T, "a controller once a majority is up", || async {
        n3.controller_id()
    })
    .await;
    assert!(c == 1 || c == 3, "controller {c}");
    let n2 = start(2, by_id.remove(&2).expect("l2"))
        .await
        .expect("start 2");
    wait_image(&n2, T, "the late node registered", |i| {
        i.brokers.get(&2).is_some_and(|b| !b.fenced)
    })
    .await;
    // One membership, written once at index 0 by node 1's initialize.
    for n in [&n1, &n2, &n3] {
        let m = eventually(T, "membership", || async { membership_log_id(n) }).await;
        assert_eq!(m.index, 0, "node {} membership at {m}", n.node_id());
    }
    for n in [n1, n2, n3] {
        n.shutdown().await;
    }
}

/// Starts node `id` outside the voter set: a broker that joins the running cluster.
async fn start_joiner(c: &TestCluster, id: i32) -> ClusterNode {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let mut cfg = crate::support::fast_config(id, c.dir.path(), &c.peers);
    cfg.raft_advertised = Some(l.local_addr().expect("addr").to_string());
    ClusterNode::start_on(cfg, l).await.expect("start joiner")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outside_the_voters_joins_as_learner_survives_failover_and_is_removed() {
    let mut c = TestCluster::start(3).await;
    let ctrl = c.controller().await;
    for n in c.nodes.values() {
        wait_image(n, T, "3 registered brokers", |i| all_registered(i, 3)).await;
    }
    let four = start_joiner(&c, 4).await;
    // It applies the metadata log itself (it is a Raft member), and it is registered.
    wait_image(&four, T, "4 registered brokers on the joiner", |i| {
        all_registered(i, 4)
    })
    .await;
    let members = eventually(T, "4 as a learner on the controller", || async {
        let m = c.node(ctrl).members();
        (m.learners == vec![4]).then_some(m)
    })
    .await;
    assert_eq!(members.voters, vec![1, 2, 3], "the quorum does not grow");
    // It may hold replicas, and its proposals reach the controller.
    let r = four.propose(create("wide", 2, 4)).await.expect("quorum");
    assert!(matches!(r, Ok(CommandOutput::TopicCreated { .. })), "{r:?}");

    // The controller fails: the learner follows the new one and stays live.
    c.stop(ctrl).await;
    let new = c.controller().await;
    wait_image(
        &four,
        Duration::from_secs(20),
        "old controller fenced",
        |i| i.brokers.get(&ctrl).is_some_and(|b| b.fenced),
    )
    .await;
    let r = four.propose(create("later", 1, 2)).await.expect("quorum");
    assert!(r.is_ok(), "{r:?}");
    let img = wait_image(c.node(new), T, "later", |i| i.topics.contains_key("later")).await;
    assert!(!img.brokers[&4].fenced, "the learner kept heartbeating");
    assert_eq!(four.controller_id(), Some(new));
    c.restart(ctrl).await;

    // Decommission: refused while it holds replicas or runs; then it leaves the
    // registry and, after a silent session, the Raft membership.
    let r = c
        .node(new)
        .propose(Command::UnregisterBroker { node_id: 4 })
        .await
        .expect("quorum");
    assert!(matches!(r, Err(CommandError::InvalidRequest(_))), "{r:?}");
    // Onto the in-sync replicas other than 4 (the restarted voter left the ISRs when
    // it was fenced, and nothing replicates data in this test to bring it back).
    let img = c.node(new).image().borrow().clone();
    let held: Vec<(String, i32, Vec<i32>)> = img
        .topics
        .iter()
        .flat_map(|(name, t)| {
            t.partitions
                .iter()
                .enumerate()
                .filter(|(_, p)| p.replicas.contains(&4))
                .map(move |(i, p)| {
                    let rest: Vec<i32> = p.isr.iter().copied().filter(|r| *r != 4).collect();
                    (name.clone(), i as i32, rest)
                })
        })
        .collect();
    assert!(held.len() >= 2, "wide-0 and wide-1 at least: {held:?}");
    for (topic, partition, rest) in held {
        let r = c
            .node(new)
            .propose(Command::ReassignPartition {
                topic,
                partition,
                replicas: rest.clone(),
            })
            .await
            .expect("quorum");
        let Ok(CommandOutput::Partition(p)) = r else {
            panic!("{r:?}")
        };
        assert_eq!(p.replicas, rest, "in sync already: done at once");
    }
    four.shutdown().await;
    wait_image(c.node(new), T, "4 fenced", |i| {
        i.brokers.get(&4).is_some_and(|b| b.fenced)
    })
    .await;
    let r = c
        .node(new)
        .propose(Command::UnregisterBroker { node_id: 4 })
        .await
        .expect("quorum");
    assert_eq!(r, Ok(CommandOutput::Done));
    eventually(T, "4 gone from the Raft membership", || async {
        let m = c.node(new).members();
        m.learners.is_empty().then_some(())
    })
    .await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_makes_a_change_acknowledged_elsewhere_visible_at_once() {
    let c = TestCluster::start(3).await;
    let ctrl = c.controller().await;
    for n in c.nodes.values() {
        wait_image(n, T, "3 registered brokers", |i| all_registered(i, 3)).await;
    }
    for round in 0..20 {
        // Alternate the proposer and the reader between the controller and followers.
        let ids: Vec<i32> = c.nodes.keys().copied().collect();
        let writer = ids[round % ids.len()];
        let reader = ids[(round + 1) % ids.len()];
        let name = format!("t{round}");
        let r = c
            .node(writer)
            .propose(create(&name, 1, 1))
            .await
            .expect("quorum");
        assert!(r.is_ok(), "{r:?}");
        let index = c.node(reader).catch_up(T).await.expect("read index");
        let img = c.node(reader).image().borrow().clone();
        assert!(
            img.topics.contains_key(&name) && img.applied_index >= index,
            "round {round}: node {reader} (controller {ctrl}) does not show {name} after catch_up \
             (read index {index}, applied {})",
            img.applied_index
        );
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controlled_shutdown_fences_at_once_and_stays_fenced_until_restart() {
    let mut c = TestCluster::start(3).await;
    let ctrl = c.controller().await;
    for n in c.nodes.values() {
        wait_image(n, T, "3 registered brokers", |i| all_registered(i, 3)).await;
    }
    let r = c
        .node(ctrl)
        .propose(create("led", 3, 3))
        .await
        .expect("quorum");
    assert!(r.is_ok(), "{r:?}");
    // A follower of the quorum that leads one of the partitions (placement is
    // round-robin, so every broker leads one).
    let going = *c.nodes.keys().find(|id| **id != ctrl).unwrap();
    let t0 = tokio::time::Instant::now();
    c.node(going)
        .controlled_shutdown(T)
        .await
        .expect("controlled shutdown");
    let img = c.node(ctrl).image().borrow().clone();
    assert!(img.brokers[&going].fenced);
    for p in &img.topics["led"].partitions {
        assert_ne!(p.leader, going, "{p:?}");
        assert!(!p.isr.contains(&going), "{p:?}");
    }
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "fenced through the quorum, not by a session timeout"
    );
    // No heartbeat unfences it while it winds down.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(c.node(ctrl).image().borrow().brokers[&going].fenced);
    c.stop(going).await;
    c.restart(going).await;
    wait_image(c.node(ctrl), T, "restarted broker unfenced", |i| {
        i.brokers.get(&going).is_some_and(|b| !b.fenced)
    })
    .await;
    c.shutdown().await;
}

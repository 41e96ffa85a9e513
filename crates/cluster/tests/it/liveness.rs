//! Broker liveness: fencing on silence, leader moves within the ISR, offline partitions
//! that come back with their last in-sync replica.

use std::collections::BTreeMap;
use std::time::Duration;

use sluice_cluster::{ClusterConfig, Command, MetadataImage, NO_LEADER};

use crate::support::{wait_image, TestCluster};

const T: Duration = Duration::from_secs(10);

/// Election timeouts well above the CPU stalls of a loaded 2-core machine: this test
/// wants the controller it starts with to stay controller, so that the silence it
/// measures is the one that controller saw.
fn steady_controller(c: &mut ClusterConfig) {
    c.election_timeout_min = Duration::from_millis(1000);
    c.election_timeout_max = Duration::from_millis(2000);
}

fn term_of(c: &TestCluster, id: i32) -> u64 {
    c.node(id).raft().metrics().borrow().current_term
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_broker_is_fenced_and_its_partitions_move_or_go_offline_then_return() {
    let mut c = TestCluster::start_with(3, steady_controller).await;
    let ctrl = c.controller().await;
    for n in c.nodes.values() {
        wait_image(n, T, "3 live brokers", |i| {
            i.brokers.len() == 3 && i.brokers.values().all(|b| !b.fenced)
        })
        .await;
    }
    let victim = *c
        .nodes
        .keys()
        .find(|id| **id != ctrl)
        .expect("a non-controller");
    for (name, rf) in [("replicated", 3i16), ("single", 1)] {
        let r = c
            .node(ctrl)
            .propose(Command::CreateTopic {
                name: name.to_string(),
                partitions: 3,
                replication_factor: rf,
                configs: BTreeMap::new(),
            })
            .await
            .expect("quorum");
        assert!(r.is_ok(), "{r:?}");
    }
    let before: MetadataImage = (**c.node(ctrl).image().borrow()).clone();
    let led = |img: &MetadataImage, topic: &str| -> Vec<i32> {
        img.topics[topic]
            .partitions
            .iter()
            .enumerate()
            .filter(|(_, p)| p.leader == victim)
            .map(|(i, _)| i as i32)
            .collect()
    };
    let replicated_led = led(&before, "replicated");
    let single_led = led(&before, "single");
    assert!(
        !replicated_led.is_empty() && !single_led.is_empty(),
        "{before:#?}"
    );

    let term = term_of(&c, ctrl);
    let stopped = tokio::time::Instant::now();
    let node = c.nodes.remove(&victim).expect("victim runs");
    node.shutdown().await;
    // The controller noted the victim alive at some instant after the last answered
    // heartbeat was sent, so the session runs from there at the earliest (not from the
    // stop: under load that heartbeat may be several intervals older than the stop).
    let last = node.last_heartbeat_ack().expect("the victim heartbeated");
    drop(node);
    let img = wait_image(c.node(ctrl), T, "victim fenced", |i| {
        i.brokers.get(&victim).is_some_and(|b| b.fenced)
    })
    .await;
    let silent = last.sent_at.elapsed();
    eprintln!(
        "victim fenced {silent:?} after its last answered heartbeat was sent, \
         {:?} after the stop",
        stopped.elapsed()
    );
    let session = Duration::from_millis(1500);
    if last.controller == ctrl && term_of(&c, ctrl) == term {
        assert!(
            silent > session,
            "fenced {silent:?} after the last heartbeat {ctrl} answered, before the \
             session timeout {session:?}"
        );
    } else {
        // A new controller gives every broker a session of grace from the start of
        // its own leadership, which this test does not observe.
        eprintln!(
            "controller changed (term {term} -> {}); fence timing not checked",
            term_of(&c, ctrl)
        );
    }
    for p in &replicated_led {
        let (old, new) = (
            before.partition("replicated", *p).unwrap(),
            img.partition("replicated", *p).unwrap(),
        );
        assert_ne!(new.leader, victim);
        assert!(
            old.isr.contains(&new.leader),
            "new leader {} from the ISR {:?}",
            new.leader,
            old.isr
        );
        assert_eq!(new.leader_epoch, old.leader_epoch + 1);
        assert!(!new.isr.contains(&victim));
    }
    for (i, p) in img.topics["replicated"].partitions.iter().enumerate() {
        assert!(
            !p.isr.contains(&victim),
            "partition {i} still lists the fenced broker in its ISR"
        );
    }
    for p in &single_led {
        let (old, new) = (
            before.partition("single", *p).unwrap(),
            img.partition("single", *p).unwrap(),
        );
        assert_eq!(new.leader, NO_LEADER, "no unclean election");
        assert_eq!(new.isr, vec![victim]);
        assert_eq!(new.leader_epoch, old.leader_epoch + 1);
    }
    // Every survivor serves the same view.
    for n in c.nodes.values() {
        wait_image(n, T, "fence replicated", |i| {
            i.brokers.get(&victim).is_some_and(|b| b.fenced)
        })
        .await;
    }

    c.restart(victim).await;
    let img2 = wait_image(c.node(ctrl), T, "victim back", |i| {
        i.brokers.get(&victim).is_some_and(|b| !b.fenced)
    })
    .await;
    for p in &single_led {
        let (off, back) = (
            img.partition("single", *p).unwrap(),
            img2.partition("single", *p).unwrap(),
        );
        assert_eq!(back.leader, victim, "the last in-sync replica leads again");
        assert_eq!(back.leader_epoch, off.leader_epoch + 1);
    }
    assert!(img2.offline().is_empty(), "{:?}", img2.offline());
    assert!(
        img2.brokers[&victim].epoch > before.brokers[&victim].epoch,
        "a new broker epoch"
    );
    c.shutdown().await;
}

//! The inter-node listener treats peers' bytes as untrusted: an oversized or malformed
//! frame closes that connection and nothing else.

use std::time::Duration;

use sluice_cluster::network::{read_frame, write_frame, Envelope, Request, Response};
use sluice_cluster::{ClusterConfig, ClusterNode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{fast_config, wait_image, TestCluster};

async fn probe_as(s: &mut TcpStream, cluster_id: Option<&str>) -> Response {
    let req = serde_json::to_vec(&Envelope {
        cluster_id: cluster_id.map(str::to_string),
        request: Request::Probe,
    })
    .expect("encode");
    write_frame(s, &req).await.expect("write");
    let reply = read_frame(s, 1 << 20).await.expect("reply");
    serde_json::from_slice(&reply).expect("decode")
}

async fn closed_by_peer(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_frames_close_only_that_connection() {
    let c = TestCluster::start(1).await;
    let node = c.node(1);
    let addr = node.local_raft_addr().expect("a Raft listener");

    // A length far above the limit: refused before allocating 4 GiB.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(&u32::MAX.to_be_bytes()).await.expect("write");
    assert!(
        closed_by_peer(&mut s).await,
        "oversized frame must close the connection"
    );

    // A frame of the right shape whose JSON is no request.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    write_frame(&mut s, b"{\"NoSuchRpc\":[1,2,3]}")
        .await
        .expect("write");
    assert!(
        closed_by_peer(&mut s).await,
        "malformed frame must close the connection"
    );

    // Truncated frame then EOF: handled quietly.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(&[0, 0, 0, 10, b'{']).await.expect("write");
    drop(s);

    // The node still serves well-formed requests.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let resp = probe_as(&mut s, None).await;
    assert!(
        matches!(resp, Response::Probe { node_id: 1, .. }),
        "{resp:?}"
    );
    // A single-node cluster forms by itself and accepts proposals.
    c.controller().await;
    let r = node
        .propose(sluice_cluster::Command::AllocateProducerIds { count: 5 })
        .await
        .expect("quorum of one");
    assert!(r.is_ok(), "{r:?}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_answers_only_its_own_cluster_and_nodes_that_do_not_know_theirs_yet() {
    let c = TestCluster::start(1).await;
    let node = c.node(1);
    let ours = node.image().borrow().cluster_id.clone();
    let ours = if ours.is_empty() {
        // Configured by the test support, before the metadata log holds it.
        wait_image(node, Duration::from_secs(10), "the cluster id", |i| {
            !i.cluster_id.is_empty()
        })
        .await
        .cluster_id
        .clone()
    } else {
        ours
    };
    let addr = node.local_raft_addr().expect("a Raft listener");

    let mut s = TcpStream::connect(addr).await.expect("connect");
    let resp = probe_as(&mut s, Some(&ours)).await;
    assert!(
        matches!(resp, Response::Probe { node_id: 1, .. }),
        "{resp:?}"
    );
    // Same connection, a sender that has no id yet: served.
    let resp = probe_as(&mut s, None).await;
    assert!(
        matches!(resp, Response::Probe { node_id: 1, .. }),
        "{resp:?}"
    );

    // Another cluster's request is answered with our id, and that connection closes.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let resp = probe_as(&mut s, Some("another-cluster")).await;
    match resp {
        Response::WrongCluster { cluster_id } => assert_eq!(cluster_id, ours),
        other => panic!("expected WrongCluster, got {other:?}"),
    }
    assert!(
        closed_by_peer(&mut s).await,
        "a foreign cluster's connection must be closed"
    );
    c.shutdown().await;
}

/// A cluster keeps calling a stopped member's address; when a node of another
/// cluster listens there, neither cluster takes the other's votes, entries or
/// heartbeats as its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_calling_a_reused_address_cannot_capture_the_node_behind_it() {
    fn with_short_election(c: &mut ClusterConfig) {
        c.election_timeout_min = Duration::from_millis(150);
        c.election_timeout_max = Duration::from_millis(300);
    }
    let mut a = TestCluster::start_with(3, with_short_election).await;
    let a_leader = a.controller().await;
    let a_id = wait_image(a.node(a_leader), Duration::from_secs(10), "a's id", |i| {
        !i.cluster_id.is_empty() && i.live_brokers().len() == 3
    })
    .await
    .cluster_id
    .clone();
    let victim = *a
        .nodes
        .keys()
        .find(|id| **id != a_leader)
        .expect("a follower");
    let addr = a
        .peers
        .iter()
        .find(|(p, _)| *p == victim)
        .expect("peer")
        .1
        .clone();
    a.stop(victim).await;

    // Cluster b: one voter with the stopped node's id, on its address.
    let b_dir = tempfile::tempdir().expect("tempdir");
    let listener = loop {
        match TcpListener::bind(&addr).await {
            Ok(l) => break l,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let mut cfg = fast_config(victim, b_dir.path(), &[(victim, addr.clone())]);
    cfg.cluster_id = Some("cluster-b".to_string());
    let b = ClusterNode::start_on(cfg, listener).await.expect("start b");
    wait_image(
        &b,
        Duration::from_secs(10),
        "b's own broker registered",
        |i| i.cluster_id == "cluster-b" && i.live_brokers() == vec![victim],
    )
    .await;

    // Force elections in a, so its terms pass b's: without the check, b would take
    // a's leader's entries (and a would count b's votes).
    let before = a.node(a_leader).image().borrow().brokers.len();
    a.stop(a_leader).await;
    let survivor = *a.nodes.keys().next().expect("one of a left");
    a.restart(a_leader).await;
    a.controller().await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let img = b.image().borrow().clone();
    assert_eq!(img.cluster_id, "cluster-b");
    assert_eq!(img.live_brokers(), vec![victim], "{img:#?}");
    assert_eq!(img.brokers.len(), 1, "{img:#?}");
    assert_eq!(b.controller_id(), Some(victim));

    // a's stopped node is fenced and stays so: b's node never stands in for it.
    wait_image(
        a.node(survivor),
        Duration::from_secs(10),
        "a's stopped node fenced",
        |i| i.brokers.get(&victim).is_some_and(|s| s.fenced),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let img = a.node(survivor).image().borrow().clone();
    assert_eq!(img.cluster_id, a_id);
    assert_eq!(img.brokers.len(), before);
    assert!(
        img.brokers.get(&victim).is_some_and(|s| s.fenced),
        "{img:#?}"
    );
    b.shutdown().await;
    a.shutdown().await;
}

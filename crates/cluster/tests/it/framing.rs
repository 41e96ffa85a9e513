//! The inter-node listener treats peers' bytes as untrusted: an oversized or malformed
//! frame closes that connection and nothing else.

use std::time::Duration;

use sluice_cluster::network::{read_frame, write_frame, Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::TestCluster;

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
    let req = serde_json::to_vec(&Request::Probe).expect("encode");
    write_frame(&mut s, &req).await.expect("write");
    let reply = read_frame(&mut s, 1 << 20).await.expect("reply");
    let resp: Response = serde_json::from_slice(&reply).expect("decode");
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

//! kill -9 durability: a child process (this test binary, re-executed) runs a one-node
//! quorum and prints every acknowledged proposal; the parent SIGKILLs it mid-stream,
//! reopens the data dir in-process, and checks that no acknowledged command was lost
//! and that writes continue.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command as Process, Stdio};
use std::time::Duration;

use sluice_cluster::{ClusterNode, Command, CommandOutput};
use tokio::net::TcpListener;

use crate::support::{fast_config, wait_image};

const CHILD_ENV: &str = "SLUICE_CLUSTER_CRASH_CHILD";

/// A one-node quorum (`peers = [itself]`) on an ephemeral port, data in `base/node-1`.
async fn single_node(base: &Path) -> ClusterNode {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    ClusterNode::start_on(fast_config(1, base, &[(1, addr)]), l)
        .await
        .expect("start")
}

/// The child: propose forever, print each acknowledgement. Does nothing unless started
/// by `kill9_loses_no_acknowledged_proposal`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of kill9_loses_no_acknowledged_proposal"]
async fn crash_child() {
    let Ok(base) = std::env::var(CHILD_ENV) else {
        return;
    };
    let node = single_node(Path::new(&base)).await;
    loop {
        match node
            .propose(Command::AllocateProducerIds { count: 10 })
            .await
        {
            // Printed only once the command is committed (fsync'd) and applied.
            Ok(Ok(CommandOutput::ProducerIds { first, count })) => {
                println!("ACK {}", first + count)
            }
            other => eprintln!("proposal: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_loses_no_acknowledged_proposal() {
    crate::support::init_tracing();
    let base = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("test binary");
    for round in 0..3 {
        let mut child = Process::new(&exe)
            .args([
                "crash::crash_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, base.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("stdout");
        // Kill after a round-dependent number of acknowledgements.
        let want = 20 + round * 15;
        let acked = tokio::task::spawn_blocking(move || {
            let mut acked = 0i64;
            let mut n = 0;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(v) = line
                    .strip_prefix("ACK ")
                    .and_then(|v| v.parse::<i64>().ok())
                {
                    acked = acked.max(v);
                    n += 1;
                    if n >= want {
                        break;
                    }
                }
            }
            acked
        });
        let acked = tokio::time::timeout(Duration::from_secs(30), acked)
            .await
            .map_err(|_| {
                let _ = child.kill();
                "child produced no acknowledgements in time"
            })
            .expect("acks")
            .expect("reader");
        // SIGKILL: no shutdown path runs; whatever was in flight is cut.
        child.kill().expect("kill -9");
        let _ = child.wait();
        assert!(acked > 0, "round {round}: the child acknowledged nothing");

        let node = single_node(base.path()).await;
        let img = wait_image(
            &node,
            Duration::from_secs(10),
            "acknowledged producer ids",
            |i| i.next_producer_id >= acked,
        )
        .await;
        assert!(
            img.next_producer_id >= acked,
            "round {round}: lost acknowledged writes"
        );
        let r = node
            .propose(Command::AllocateProducerIds { count: 1 })
            .await
            .expect("quorum of one after restart");
        assert!(
            matches!(r, Ok(CommandOutput::ProducerIds { first, .. }) if first >= acked),
            "round {round}: ids handed out again after the crash: {r:?}"
        );
        node.shutdown().await;
    }
}

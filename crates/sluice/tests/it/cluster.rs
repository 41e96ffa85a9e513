//! Cluster mode end to end: three `sluice serve` processes on 127.0.0.1 form
//! a metadata quorum; `sluice cluster status`, `topic create`, `produce`
//! (acks=all), `consume`, `node drain` and `partition reassign` run against
//! them; a fourth node joins, takes a partition's data and is removed again;
//! SIGTERM stops each one cleanly.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{assert_success, http_get, sluice_cmd, spawn_until_listening, wait_output};

/// Forming the quorum, registering and electing partition leaders.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(60);

struct Node {
    id: i32,
    child: Child,
    kafka: SocketAddr,
    http: SocketAddr,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Cluster {
    nodes: Vec<Node>,
    /// The voters, as --cluster-peers lists them.
    peers: String,
    /// The voters' Raft ports, node 1 first.
    raft: Vec<u16>,
    /// Flags every node is started with.
    extra: Vec<String>,
    _tmp: tempfile::TempDir,
}

/// A Raft port no other cluster of this test run has used (the Raft peers must be
/// known up front, so the port cannot come from binding `:0`).
///
/// Chosen below the kernel's ephemeral range (32768 and up by default): a port
/// the kernel handed out could be taken again, by another test's outgoing
/// connection or `:0` listener, between this check and the node's bind.
///
/// Never handed out twice in one run, across the run's test processes: a
/// cluster whose node was killed keeps sending Raft messages to that node's
/// port, and a fresh cluster listening there would take them as its own
/// peers' (two "node 1"s in one term). Each port is claimed by creating a file
/// in a directory shared by the run's processes.
fn free_port() -> u16 {
    use std::hash::{BuildHasher, RandomState};
    let claims = port_claims();
    let seed = RandomState::new();
    for attempt in 0u64.. {
        let port = 20_000 + (seed.hash_one(attempt) % 12_000) as u16;
        let claimed = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(claims.join(port.to_string()))
            .is_ok();
        if claimed && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    unreachable!("the loop above returns")
}

/// The directory where this test run's processes claim ports: one per nextest
/// run, or per process under `cargo test` (which runs every test in one).
/// Directories of runs older than a day are removed.
fn port_claims() -> std::path::PathBuf {
    const PREFIX: &str = "sluice-it-raft-ports-";
    let run = std::env::var("NEXTEST_RUN_ID").unwrap_or_else(|_| std::process::id().to_string());
    let tmp = std::env::temp_dir();
    if let Ok(entries) = std::fs::read_dir(&tmp) {
        for e in entries.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > Duration::from_secs(86_400));
            if old && e.file_name().to_string_lossy().starts_with(PREFIX) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let dir = tmp.join(format!("{PREFIX}{run}"));
    std::fs::create_dir_all(&dir).expect("create the port claims directory");
    dir
}

impl Cluster {
    fn start() -> Cluster {
        Cluster::start_with(&[])
    }

    /// Three voters, each started with `extra` flags too.
    fn start_with(extra: &[&str]) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let raft: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let peers = raft
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{}@127.0.0.1:{p}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Cluster {
            nodes: Vec::new(),
            peers,
            raft,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            _tmp: tmp,
        };
        c.spawn_voters();
        c
    }

    fn spawn_voters(&mut self) {
        for (i, port) in self.raft.clone().into_iter().enumerate() {
            let node = self.spawn(i as i32 + 1, port, false);
            self.nodes.push(node);
        }
    }

    /// SIGKILLs every node, then starts them again on their data directories
    /// with `extra` flags instead of the old ones.
    fn restart_all(&mut self, extra: &[&str]) {
        self.nodes.clear();
        self.extra = extra.iter().map(|s| s.to_string()).collect();
        self.spawn_voters();
    }

    /// Starts node `id` with its Raft listener on `port`: one of the voters, or
    /// (`joins`) a broker that joins the running cluster.
    fn spawn(&self, id: i32, port: u16, joins: bool) -> Node {
        let data = self._tmp.path().join(format!("node-{id}"));
        let mut cmd = sluice_cmd();
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&data)
            .args(["--kafka-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .args(["--amqp-addr", "127.0.0.1:0"])
            .args(["--group-initial-rebalance-delay-ms", "0"])
            .args(["--node-id", &id.to_string()])
            .args(["--raft-listen", &format!("127.0.0.1:{port}")]);
        if joins {
            cmd.args(["--raft-advertised", &format!("127.0.0.1:{port}")]);
        }
        cmd.args(&self.extra);
        // Peers through the environment, the rest as flags: both paths.
        cmd.env("SLUICE_CLUSTER_PEERS", &self.peers);
        let name = self._tmp.path().file_name().unwrap_or_default();
        cmd.env("SLUICE_CLUSTER_ID", name.to_string_lossy().replace('.', ""));
        // openraft warns about every stale vote response; a failing test's
        // output should show the broker's own lines.
        cmd.env("SLUICE_LOG", "info,openraft=error");
        let (child, line) = spawn_until_listening(cmd);
        let field = |name: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {line:?}"))
                .parse()
                .unwrap()
        };
        Node {
            id,
            kafka: field("kafka="),
            http: field("http="),
            child,
        }
    }

    /// An admin command against node `via`'s HTTP port, or a Kafka client
    /// command bootstrapping from node `via` only (it finds the others in the
    /// metadata).
    fn run(&self, via: usize, args: &[&str], stdin: &[u8]) -> Output {
        let mut cmd = sluice_cmd();
        cmd.args(args);
        if matches!(args.first(), Some(&("cluster" | "partition" | "node"))) {
            cmd.args(["--http", &self.nodes[via].http.to_string()]);
        } else {
            cmd.args(["--bootstrap", &self.nodes[via].kafka.to_string()]);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            let mut input = child.stdin.take().unwrap();
            input.write_all(stdin).unwrap();
        }
        wait_output(child, Duration::from_secs(120))
    }

    fn ok(&self, via: usize, args: &[&str]) -> String {
        let out = self.run(via, args, b"");
        assert_success(&out, args);
        String::from_utf8(out.stdout).unwrap()
    }

    fn status(&self, via: usize) -> Value {
        let out = self.ok(via, &["cluster", "status", "--json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    /// Polls `cluster status --json` on node `via` until `f` holds.
    fn wait_status(&self, via: usize, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        loop {
            let v = self.status(via);
            if f(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {CLUSTER_TIMEOUT:?}; last status:\n{v:#}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Creates a topic with replication factor 3 through node `via` and waits
    /// until every node's view shows all its partitions led and fully in sync.
    fn create_replicated(&self, via: usize, name: &str, partitions: usize) {
        let count = partitions.to_string();
        self.ok(
            via,
            &[
                "topic",
                "create",
                name,
                "--partitions",
                &count,
                "--replication-factor",
                "3",
            ],
        );
        for i in 0..self.nodes.len() {
            self.wait_status(i, &format!("{name} fully replicated"), |v| {
                fully_replicated(v, name, partitions)
            });
        }
    }

    /// SIGTERM every node and expect clean exits.
    fn terminate(mut self) {
        for n in &mut self.nodes {
            stop(n);
        }
    }
}

/// SIGTERM one node and expect a clean exit.
fn stop(n: &mut Node) {
    let status = Command::new("sh")
        .args(["-c", &format!("kill -TERM {}", n.child.id())])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = n.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "node {} did not exit after SIGTERM",
            n.id
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "node {} exited with {status}", n.id);
}

fn all_alive(v: &Value) -> bool {
    n_alive(v, 3)
}

fn n_alive(v: &Value, n: usize) -> bool {
    v["controller_id"].is_i64()
        && !v["cluster_id"].as_str().unwrap_or_default().is_empty()
        && v["nodes"]
            .as_array()
            .is_some_and(|ns| ns.len() == n && ns.iter().all(|n| n["state"] == "alive"))
}

fn node(v: &Value, id: i64) -> Option<&Value> {
    v["nodes"].as_array()?.iter().find(|n| n["id"] == id)
}

fn topic<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    v["topics"].as_array()?.iter().find(|t| t["name"] == name)
}

fn fully_replicated(v: &Value, name: &str, partitions: usize) -> bool {
    topic(v, name).is_some_and(|t| {
        let ps = t["partitions"].as_array().unwrap();
        ps.len() == partitions
            && ps.iter().all(|p| {
                p["leader"].as_i64().unwrap_or(-1) >= 0
                    && p["replicas"].as_array().unwrap().len() == 3
                    && p["isr"] == p["replicas"]
            })
    })
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

#[test]
fn three_node_cluster_status_replication_drain_and_reassign() {
    let c = Cluster::start();

    // Every node sees all three registered and one controller.
    let mut views = Vec::new();
    for i in 0..3 {
        views.push(c.wait_status(i, "3 alive nodes and a controller", all_alive));
    }
    let controller = &views[0]["controller_id"];
    let cluster_id = &views[0]["cluster_id"];
    for v in &views {
        assert_eq!(&v["cluster_id"], cluster_id);
        assert_eq!(&v["controller_id"], controller, "one controller");
    }
    // Peers replicate from the Kafka listen address (no --replica-addr given).
    for n in views[0]["nodes"].as_array().unwrap() {
        let node = &c.nodes[n["id"].as_i64().unwrap() as usize - 1];
        assert_eq!(n["replica"], node.kafka.to_string());
        assert_eq!(n["kafka"], node.kafka.to_string());
    }
    for n in &c.nodes {
        let (status, body) = http_get(n.http, "/healthz");
        assert_eq!(status, 200, "node {}: {body}", n.id);
    }

    // The human view.
    let table = c.ok(1, &["cluster", "status"]);
    assert!(table.contains("NODE  STATE"), "{table}");
    assert!(table.contains("under-replicated: none"), "{table}");

    // A replicated topic: acks=all writes, read back through the cluster.
    c.create_replicated(0, "orders", 3);
    let input: String = (0..30).map(|i| format!("k{i}:v{i}\n")).collect();
    let out = c.run(
        2,
        &["produce", "orders", "--key-separator", ":", "--acks", "all"],
        input.as_bytes(),
    );
    assert_success(&out, &["produce"]);
    let consumed = c.ok(
        1,
        &[
            "consume",
            "orders",
            "--from-beginning",
            "--max-messages",
            "30",
            "--timeout-ms",
            "30000",
        ],
    );
    let mut lines: Vec<&str> = consumed.lines().collect();
    lines.sort_unstable();
    let mut expected: Vec<String> = (0..30).map(|i| format!("v{i}")).collect();
    expected.sort_unstable();
    assert_eq!(lines, expected);

    // Drain node 1: it leads nothing; undo gives its preferred partitions back.
    let out = c.ok(2, &["node", "drain", "1"]);
    assert!(out.contains("node 1 draining"), "{out}");
    c.wait_status(0, "node 1 draining and leading nothing", |v| {
        v["nodes"][0]["state"] == "draining"
            && topic(v, "orders").is_some_and(|t| {
                t["partitions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|p| p["leader"] != 1 && p["leader"].as_i64().unwrap_or(-1) >= 0)
            })
    });
    c.ok(2, &["node", "drain", "1", "--undo"]);
    c.wait_status(0, "node 1 alive and leading again", |v| {
        v["nodes"][0]["state"] == "alive"
            && topic(v, "orders").is_some_and(|t| {
                t["partitions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["leader"] == 1)
            })
    });

    // Reassign orders-0 to two replicas: the ISR keeps only those.
    let out = c.ok(
        0,
        &["partition", "reassign", "orders", "0", "--replicas", "2,3"],
    );
    assert!(out.starts_with("orders-0: replicas 2,3"), "{out}");
    let v = c.wait_status(1, "orders-0 on 2,3", |v| {
        topic(v, "orders").is_some_and(|t| ids(&t["partitions"][0]["replicas"]) == vec![2, 3])
    });
    let p0 = &topic(&v, "orders").unwrap()["partitions"][0];
    assert!(ids(&p0["isr"]).iter().all(|r| *r == 2 || *r == 3), "{p0}");
    // A reassignment that names an unknown node is refused with the reason.
    let out = c.run(
        0,
        &["partition", "reassign", "orders", "1", "--replicas", "1,9"],
        b"",
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broker 9 is not registered"), "{err}");

    c.terminate();
}

/// Consumes `count` records of `topic` through node `via` and returns the values, sorted.
fn consume_sorted(c: &Cluster, via: usize, topic: &str, count: usize) -> Vec<String> {
    let out = c.ok(
        via,
        &[
            "consume",
            topic,
            "--from-beginning",
            "--max-messages",
            &count.to_string(),
            "--timeout-ms",
            "30000",
        ],
    );
    let mut lines: Vec<String> = out.lines().map(str::to_string).collect();
    lines.sort_unstable();
    lines
}

#[test]
fn a_node_joins_takes_over_a_partition_and_is_removed() {
    let mut c = Cluster::start();
    c.wait_status(0, "3 alive nodes and a controller", all_alive);
    c.create_replicated(0, "moving", 1);
    let input: String = (0..40).map(|i| format!("v{i:02}\n")).collect();
    let out = c.run(0, &["produce", "moving", "--acks", "all"], input.as_bytes());
    assert_success(&out, &["produce"]);
    let expected: Vec<String> = (0..40).map(|i| format!("v{i:02}")).collect();

    // Node 4 is not a voter: it joins as a broker and shows up everywhere.
    let joiner = c.spawn(4, free_port(), true);
    c.nodes.push(joiner);
    for via in [0, 3] {
        let v = c.wait_status(via, "4 alive nodes", |v| n_alive(v, 4));
        assert_eq!(node(&v, 4).unwrap()["role"], "broker", "{v:#}");
        assert_eq!(node(&v, 1).unwrap()["role"], "voter", "{v:#}");
    }
    // Its own metadata (it applies the Raft log as a learner) serves clients.
    assert_eq!(consume_sorted(&c, 3, "moving", 40), expected);

    // Move the partition from 1,2,3 to 4,2,3: 4 copies the log first, then 1 leaves
    // and 4, the preferred replica, is elected once in sync.
    let out = c.ok(
        3,
        &[
            "partition",
            "reassign",
            "moving",
            "0",
            "--replicas",
            "4,2,3",
        ],
    );
    assert!(out.starts_with("moving-0: replicas "), "{out}");
    let v = c.wait_status(0, "moving-0 on 4,2,3", |v| {
        topic(v, "moving").is_some_and(|t| {
            let p = &t["partitions"][0];
            ids(&p["replicas"]) == vec![4, 2, 3]
                && p.get("target_replicas").is_none()
                && ids(&p["isr"]).contains(&4)
        })
    });
    assert!(v["reassigning"].as_array().unwrap().is_empty(), "{v:#}");
    // Move leadership to 4 by draining 2 and 3, then read everything from 4's log.
    c.ok(0, &["node", "drain", "2"]);
    c.ok(0, &["node", "drain", "3"]);
    c.wait_status(0, "4 leads moving-0", |v| {
        topic(v, "moving").is_some_and(|t| t["partitions"][0]["leader"] == 4)
    });
    assert_eq!(consume_sorted(&c, 1, "moving", 40), expected);
    let more: String = (40..50).map(|i| format!("v{i:02}\n")).collect();
    let out = c.run(2, &["produce", "moving", "--acks", "all"], more.as_bytes());
    assert_success(&out, &["produce"]);
    c.ok(0, &["node", "drain", "2", "--undo"]);
    c.ok(0, &["node", "drain", "3", "--undo"]);

    // Removal: refused for a voter, for a live node and for a node with replicas.
    let refused = |id: &str, why: &str| {
        let out = c.run(0, &["node", "remove", id], b"");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{err}");
    };
    refused("1", "is a voter");
    refused("4", "is alive");
    // Move the partition back, stop 4, and remove it.
    c.ok(
        0,
        &[
            "partition",
            "reassign",
            "moving",
            "0",
            "--replicas",
            "1,2,3",
        ],
    );
    c.wait_status(0, "moving-0 back on 1,2,3", |v| {
        topic(v, "moving").is_some_and(|t| {
            let p = &t["partitions"][0];
            let mut isr = ids(&p["isr"]);
            isr.sort_unstable();
            ids(&p["replicas"]) == vec![1, 2, 3] && isr == vec![1, 2, 3]
        })
    });
    let mut four = c.nodes.pop().unwrap();
    stop(&mut four);
    c.wait_status(0, "4 fenced", |v| {
        node(v, 4).is_some_and(|n| n["state"] == "fenced")
    });
    let out = c.ok(1, &["node", "remove", "4"]);
    assert!(out.contains("node 4 removed"), "{out}");
    c.wait_status(2, "3 nodes again", all_alive);
    let mut all: Vec<String> = expected;
    all.extend((40..50).map(|i| format!("v{i:02}")));
    assert_eq!(consume_sorted(&c, 2, "moving", 50), all);
    c.terminate();
}

fn offsets_replicas(v: &Value) -> Option<(Vec<i64>, Vec<i64>, bool)> {
    let p = &topic(v, "__consumer_offsets")?["partitions"][0];
    (p["leader"].as_i64()? >= 0).then(|| {
        (
            ids(&p["replicas"]),
            ids(&p["isr"]),
            p.get("target_replicas").is_some(),
        )
    })
}

/// A node that had not applied the Raft membership yet used to create the
/// offsets topic with one replica in about half of fresh clusters; the
/// controller creates it now, once three brokers can hold it.
#[test]
fn twenty_fresh_clusters_all_create_the_offsets_topic_with_three_replicas() {
    for round in 0..20 {
        let c = Cluster::start();
        let v = c.wait_status(round % 3, "the offsets topic exists", |v| {
            offsets_replicas(v).is_some()
        });
        let (replicas, _, _) = offsets_replicas(&v).unwrap_or_default();
        assert_eq!(replicas.len(), 3, "round {round}: {v:#}");
        // Dropping the cluster SIGKILLs its nodes.
    }
}

/// A data directory whose offsets topic has one replica (as older releases
/// could leave it) is repaired: the controller grows the partition to three
/// replicas, which copy the committed offsets and join the ISR.
#[test]
fn an_offsets_topic_with_one_replica_grows_to_three() {
    let mut c = Cluster::start_with(&["--internal-replication-factor", "1"]);
    let v = c.wait_status(0, "the offsets topic exists", |v| {
        offsets_replicas(v).is_some()
    });
    let (replicas, _, _) = offsets_replicas(&v).unwrap_or_default();
    assert_eq!(replicas.len(), 1, "{v:#}");
    c.create_replicated(0, "jobs", 1);
    let input: String = (0..10).map(|i| format!("job{i}\n")).collect();
    assert_success(
        &c.run(1, &["produce", "jobs", "--acks", "all"], input.as_bytes()),
        &["produce"],
    );
    let consumed = c.ok(
        2,
        &[
            "consume",
            "jobs",
            "--group",
            "workers",
            "--from-beginning",
            "--max-messages",
            "4",
            "--timeout-ms",
            "30000",
        ],
    );
    assert_eq!(consumed.lines().count(), 4, "{consumed}");

    c.restart_all(&[]);
    for i in 0..3 {
        c.wait_status(i, "the offsets topic on three replicas, all in sync", |v| {
            offsets_replicas(v).is_some_and(|(replicas, isr, moving)| {
                replicas.len() == 3 && isr.len() == 3 && !moving
            })
        });
    }
    // The commit made while the topic had one replica is still there.
    let describe = c.ok(0, &["group", "describe", "workers"]);
    assert_eq!(super::total_lag(&describe), 6, "{describe}");
    c.terminate();
}

/// KIP-951: a node asked to produce to or fetch from a partition another node
/// leads names that leader, its epoch and (Produce v10+) its endpoint, so a
/// current client goes there without a metadata round trip first.
#[test]
fn a_node_that_does_not_lead_a_partition_names_its_leader() {
    use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
    use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
    use kafka_protocol::messages::{BrokerId, FetchRequest, ProduceRequest, TopicName};
    use kafka_protocol::protocol::StrBytes;
    use sluice_vocab::ErrorCode;

    let c = Cluster::start();
    for i in 0..3 {
        c.wait_status(i, "3 alive nodes and a controller", all_alive);
    }
    c.create_replicated(0, "hints", 1);
    let v = c.status(0);
    let p0 = &topic(&v, "hints").expect("topic in status")["partitions"][0];
    let leader = p0["leader"].as_i64().expect("a leader") as i32;
    let epoch = p0["leader_epoch"].as_i64().expect("an epoch") as i32;
    let follower = c.nodes.iter().find(|n| n.id != leader).expect("a follower");
    let leader_addr = c.nodes[leader as usize - 1].kafka;
    let name = || TopicName(StrBytes::from_static_str("hints"));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut conn = sluice_client::Connection::connect(
            &follower.kafka.to_string(),
            "kip-951-test",
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        let produce = ProduceRequest::default()
            .with_acks(1)
            .with_timeout_ms(5_000)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(name())
                .with_partition_data(vec![PartitionProduceData::default()
                    .with_index(0)
                    .with_records(Some(bytes::Bytes::new()))])]);
        let resp = conn.call(&produce, 11).await.unwrap();
        let p = &resp.responses[0].partition_responses[0];
        assert_eq!(
            p.error_code,
            ErrorCode::NotLeaderOrFollower.code(),
            "{resp:?}"
        );
        assert_eq!(p.current_leader.leader_id, BrokerId(leader), "{resp:?}");
        assert_eq!(p.current_leader.leader_epoch, epoch, "{resp:?}");
        assert_eq!(resp.node_endpoints.len(), 1, "{resp:?}");
        let e = &resp.node_endpoints[0];
        assert_eq!(e.node_id, BrokerId(leader));
        assert_eq!(
            (e.host.as_str(), e.port),
            (
                leader_addr.ip().to_string().as_str(),
                i32::from(leader_addr.port())
            )
        );

        let fetch = FetchRequest::default()
            .with_replica_id(BrokerId(-1))
            .with_max_wait_ms(0)
            .with_min_bytes(0)
            .with_max_bytes(1 << 20)
            .with_topics(vec![FetchTopic::default()
                .with_topic(name())
                .with_partitions(vec![FetchPartition::default()
                    .with_partition(0)
                    .with_fetch_offset(0)
                    .with_current_leader_epoch(-1)
                    .with_partition_max_bytes(1 << 20)])]);
        let resp = conn.call(&fetch, 12).await.unwrap();
        let p = &resp.responses[0].partitions[0];
        assert_eq!(
            p.error_code,
            ErrorCode::NotLeaderOrFollower.code(),
            "{resp:?}"
        );
        assert_eq!(p.current_leader.leader_id, BrokerId(leader), "{resp:?}");
        assert_eq!(p.current_leader.leader_epoch, epoch, "{resp:?}");

        // The leader itself takes the produce: no hint there.
        let mut at_leader = sluice_client::Connection::connect(
            &leader_addr.to_string(),
            "kip-951-test",
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        let resp = at_leader.call(&fetch, 12).await.unwrap();
        let p = &resp.responses[0].partitions[0];
        assert_eq!(p.error_code, 0, "{resp:?}");
        assert_eq!(p.current_leader.leader_id, BrokerId(-1), "{resp:?}");
    });
    c.terminate();
}

//! `sluice cluster status`, `sluice partition reassign`, `sluice node drain`
//! and `sluice node remove`:
//! operations on a cluster, through any node's HTTP admin port (they are
//! proposals to the metadata quorum, which the node forwards to the
//! controller). Unlike the other client commands these do not speak Kafka.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde::Deserialize;
use serde_json::{json, Value};

/// How long one admin request may take (a proposal waits up to 10 s for the
/// quorum, a drain makes two).
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// The node whose HTTP admin port serves the request.
#[derive(Args, Debug, Clone)]
pub struct AdminArgs {
    /// HTTP admin address of any cluster node.
    #[arg(
        long = "http",
        env = "SLUICE_ADMIN_HTTP",
        default_value = "127.0.0.1:8080",
        value_name = "HOST:PORT",
        global = true
    )]
    pub http: String,
}

#[derive(Args, Debug)]
pub struct ClusterArgs {
    #[command(flatten)]
    admin: AdminArgs,
    #[command(subcommand)]
    command: ClusterCommand,
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Nodes, controller, partition leaders and ISRs, under-replicated and
    /// offline partitions, as the answering node's metadata image has them.
    Status {
        /// Print the node's JSON answer instead of tables.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct PartitionArgs {
    #[command(flatten)]
    admin: AdminArgs,
    #[command(subcommand)]
    command: PartitionCommand,
}

#[derive(Subcommand, Debug)]
enum PartitionCommand {
    /// Move a partition to a new replica set. New replicas are added first and
    /// copy the log; the replicas left out are dropped once every new one is in
    /// sync (a move onto replicas already in sync is done at once). Naming the
    /// in-sync replicas again cancels a move in progress.
    Reassign {
        topic: String,
        partition: i32,
        /// The new replicas, preferred leader first: node ids, comma separated.
        #[arg(long, value_delimiter = ',', required = true, value_name = "ID,ID,...")]
        replicas: Vec<i32>,
    },
}

#[derive(Args, Debug)]
pub struct NodeArgs {
    #[command(flatten)]
    admin: AdminArgs,
    #[command(subcommand)]
    command: NodeCommand,
}

#[derive(Subcommand, Debug)]
enum NodeCommand {
    /// Move partition leadership off a node and place no new replicas on it
    /// (before a restart or removal); --undo gives it its leadership back.
    Drain {
        id: i32,
        /// Stop draining: the node takes new replicas and leads its preferred
        /// partitions again.
        #[arg(long)]
        undo: bool,
    },
    /// Forget a node for good: it must be stopped and hold no replica (move
    /// them with `partition reassign` first). Voters of the metadata quorum
    /// (the --cluster-peers) cannot be removed. A removed node that starts
    /// again joins as a new broker.
    Remove { id: i32 },
}

pub async fn run_cluster(args: ClusterArgs) -> Result<()> {
    match args.command {
        ClusterCommand::Status { json } => {
            let view = get_json(&args.admin.http, "/api/v1/cluster").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                let view: ClusterView = serde_json::from_value(view)
                    .context("unexpected answer to GET /api/v1/cluster")?;
                print!("{}", render_status(&view));
            }
            Ok(())
        }
    }
}

pub async fn run_partition(args: PartitionArgs) -> Result<()> {
    match args.command {
        PartitionCommand::Reassign {
            topic,
            partition,
            replicas,
        } => {
            let body = json!({ "topic": topic, "partition": partition, "replicas": replicas });
            let answer = post_json(&args.admin.http, "/api/v1/partitions/reassign", &body).await?;
            let p: PartitionView = serde_json::from_value(answer)
                .context("unexpected answer to POST /api/v1/partitions/reassign")?;
            let moving = match &p.target_replicas {
                Some(target) => format!(
                    "; moving to {} once they are in sync (see `sluice cluster status`)",
                    ids(target)
                ),
                None => String::new(),
            };
            println!(
                "{topic}-{partition}: replicas {} isr {} leader {} (epoch {}){moving}",
                ids(&p.replicas),
                ids(&p.isr),
                leader(p.leader),
                p.leader_epoch
            );
            Ok(())
        }
    }
}

pub async fn run_node(args: NodeArgs) -> Result<()> {
    match args.command {
        NodeCommand::Drain { id, undo } => {
            let body = json!({ "draining": !undo });
            let path = format!("/api/v1/nodes/{id}/drain");
            let answer = post_json(&args.admin.http, &path, &body).await?;
            let moved = answer["leaders_moved"].as_u64().unwrap_or(0);
            if undo {
                println!("node {id} no longer draining; {moved} partition leader(s) moved");
            } else {
                println!("node {id} draining; {moved} partition leader(s) moved off it");
            }
            Ok(())
        }
        NodeCommand::Remove { id } => {
            let path = format!("/api/v1/nodes/{id}/remove");
            post_json(&args.admin.http, &path, &json!({})).await?;
            println!("node {id} removed from the cluster");
            Ok(())
        }
    }
}

#[derive(Deserialize, Debug)]
struct ClusterView {
    cluster_id: String,
    node_id: i32,
    controller_id: Option<i32>,
    metadata_applied_index: u64,
    #[serde(default)]
    stale: Option<String>,
    nodes: Vec<NodeView>,
    topics: Vec<TopicView>,
    under_replicated: Vec<TopicPartition>,
    offline: Vec<TopicPartition>,
    #[serde(default)]
    reassigning: Vec<TopicPartition>,
}

#[derive(Deserialize, Debug)]
struct NodeView {
    id: i32,
    state: String,
    #[serde(default)]
    role: String,
    kafka: String,
    raft: String,
    replica: String,
    broker_epoch: u64,
}

#[derive(Deserialize, Debug)]
struct TopicView {
    name: String,
    partitions: Vec<PartitionView>,
}

#[derive(Deserialize, Debug)]
struct PartitionView {
    partition: i32,
    leader: i32,
    leader_epoch: i32,
    replicas: Vec<i32>,
    isr: Vec<i32>,
    #[serde(default)]
    target_replicas: Option<Vec<i32>>,
}

#[derive(Deserialize, Debug)]
struct TopicPartition {
    topic: String,
    partition: i32,
}

fn ids(v: &[i32]) -> String {
    v.iter().map(i32::to_string).collect::<Vec<_>>().join(",")
}

fn leader(id: i32) -> String {
    if id < 0 {
        "none".to_string()
    } else {
        id.to_string()
    }
}

/// Left-aligned columns, two spaces apart.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                let _ = write!(s, "{cell:<w$}  ");
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

fn render_status(v: &ClusterView) -> String {
    let mut out = String::new();
    let cluster_id = if v.cluster_id.is_empty() {
        "(not set yet)"
    } else {
        v.cluster_id.as_str()
    };
    let controller = v
        .controller_id
        .map_or_else(|| "none".to_string(), |c| c.to_string());
    let _ = writeln!(
        out,
        "cluster {cluster_id}  controller {controller}  (as node {} sees it, metadata index {})",
        v.node_id, v.metadata_applied_index
    );
    if let Some(why) = &v.stale {
        let _ = writeln!(
            out,
            "WARNING: node {}'s view may be stale: {why}",
            v.node_id
        );
    }
    out.push('\n');
    let rows: Vec<Vec<String>> = v
        .nodes
        .iter()
        .map(|n| {
            let mut id = n.id.to_string();
            if Some(n.id) == v.controller_id {
                id.push('*');
            }
            vec![
                id,
                n.state.clone(),
                n.role.clone(),
                n.kafka.clone(),
                if n.replica.is_empty() {
                    "-".to_string()
                } else {
                    n.replica.clone()
                },
                n.raft.clone(),
                n.broker_epoch.to_string(),
            ]
        })
        .collect();
    if rows.is_empty() {
        out.push_str("no registered nodes\n");
    } else {
        out.push_str(&table(
            &["NODE", "STATE", "ROLE", "KAFKA", "REPLICA", "RAFT", "EPOCH"],
            &rows,
        ));
        if v.controller_id.is_some() {
            out.push_str("(* controller)\n");
        }
    }
    out.push('\n');
    let rows: Vec<Vec<String>> = v
        .topics
        .iter()
        .flat_map(|t| {
            t.partitions.iter().map(move |p| {
                let rf = p
                    .target_replicas
                    .as_ref()
                    .map_or(p.replicas.len(), Vec::len);
                let mut notes = Vec::new();
                if p.leader < 0 {
                    notes.push("offline".to_string());
                } else if p.isr.len() < rf {
                    notes.push("under-replicated".to_string());
                }
                if let Some(target) = &p.target_replicas {
                    notes.push(format!("moving to {}", ids(target)));
                }
                let note = notes.join(", ");
                vec![
                    t.name.clone(),
                    p.partition.to_string(),
                    leader(p.leader),
                    p.leader_epoch.to_string(),
                    ids(&p.replicas),
                    ids(&p.isr),
                    note,
                ]
            })
        })
        .collect();
    if rows.is_empty() {
        out.push_str("no topics\n");
    } else {
        out.push_str(&table(
            &[
                "TOPIC",
                "PARTITION",
                "LEADER",
                "EPOCH",
                "REPLICAS",
                "ISR",
                "",
            ],
            &rows,
        ));
    }
    out.push('\n');
    let list = |v: &[TopicPartition]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.iter()
                .map(|tp| format!("{}-{}", tp.topic, tp.partition))
                .collect::<Vec<_>>()
                .join(" ")
        }
    };
    let _ = writeln!(out, "under-replicated: {}", list(&v.under_replicated));
    let _ = writeln!(out, "offline: {}", list(&v.offline));
    if !v.reassigning.is_empty() {
        let _ = writeln!(out, "reassigning: {}", list(&v.reassigning));
    }
    out
}

async fn get_json(addr: &str, path: &str) -> Result<Value> {
    answer(
        addr,
        "GET",
        path,
        http_request(addr, "GET", path, None).await?,
    )
}

async fn post_json(addr: &str, path: &str, body: &Value) -> Result<Value> {
    answer(
        addr,
        "POST",
        path,
        http_request(addr, "POST", path, Some(body)).await?,
    )
}

/// Any method; a 2xx answer's JSON (`null` when it has no body).
pub(crate) async fn request_json(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Value> {
    answer(
        addr,
        method,
        path,
        http_request(addr, method, path, body).await?,
    )
}

/// A 2xx JSON body (`null` when empty), or the node's error as a message.
fn answer(addr: &str, method: &str, path: &str, (status, body): (u16, Vec<u8>)) -> Result<Value> {
    let text = String::from_utf8_lossy(&body);
    if (200..300).contains(&status) && body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    if (200..300).contains(&status) {
        return serde_json::from_slice(&body)
            .with_context(|| format!("{method} {path} on {addr}: the answer is not JSON: {text}"));
    }
    let why = match serde_json::from_slice::<Value>(&body) {
        Ok(v) => match (v["error"].as_str(), v["kafka_error_code"].as_i64()) {
            (Some(e), Some(code)) => format!("{e} (Kafka error {code})"),
            (Some(e), None) => e.to_string(),
            // The AMQP routes answer RabbitMQ's reply code and text.
            _ => match v["reason"].as_str() {
                Some(reason) => reason.to_string(),
                None => v.to_string(),
            },
        },
        Err(_) => text.trim().to_string(),
    };
    bail!("{method} {path} on {addr}: HTTP {status}: {why}")
}

/// One request to the admin API (`sluice_client::http`), with the CLI's
/// time limit.
async fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Vec<u8>)> {
    let payload = body.map(serde_json::to_vec).transpose()?;
    sluice_client::http::request(addr, method, path, payload.as_deref(), HTTP_TIMEOUT)
        .await
        .with_context(|| format!("{method} {path} on {addr}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_the_nodes_reason() {
        let body = br#"{"error":"invalid replica assignment: broker 9 is not registered","kafka_error_code":39}"#;
        let err = answer("h:1", "POST", "/p", (400, body.to_vec())).unwrap_err();
        assert_eq!(
            err.to_string(),
            "POST /p on h:1: HTTP 400: invalid replica assignment: broker 9 is not registered (Kafka error 39)"
        );
        let err = answer("h:1", "GET", "/p", (404, b"not in cluster mode\n".to_vec())).unwrap_err();
        assert!(
            err.to_string().ends_with("HTTP 404: not in cluster mode"),
            "{err}"
        );
    }

    #[test]
    fn status_renders_tables() {
        let v: ClusterView = serde_json::from_value(json!({
            "cluster_id": "abc",
            "node_id": 2,
            "controller_id": 1,
            "metadata_applied_index": 42,
            "nodes": [
                {"id": 1, "state": "alive", "role": "voter", "kafka": "h1:9092", "raft": "h1:9093", "replica": "h1:9092", "broker_epoch": 3},
                {"id": 2, "state": "fenced", "role": "broker", "kafka": "h2:9092", "raft": "h2:9093", "replica": "", "broker_epoch": 4}
            ],
            "topics": [{"name": "t", "replication_factor": 2, "configs": {}, "partitions": [
                {"partition": 0, "leader": 1, "leader_epoch": 1, "replicas": [1, 2], "isr": [1]},
                {"partition": 1, "leader": -1, "leader_epoch": 2, "replicas": [2], "isr": [2]},
                {"partition": 2, "leader": 1, "leader_epoch": 0, "replicas": [2, 1], "isr": [1], "target_replicas": [2]}
            ]}],
            "under_replicated": [{"topic": "t", "partition": 0}],
            "offline": [{"topic": "t", "partition": 1}],
            "reassigning": [{"topic": "t", "partition": 2}]
        }))
        .unwrap();
        let s = render_status(&v);
        assert!(
            s.starts_with("cluster abc  controller 1  (as node 2 sees it, metadata index 42)\n"),
            "{s}"
        );
        assert!(
            s.contains("\n1*    alive   voter   h1:9092  h1:9092  h1:9093  3\n"),
            "{s}"
        );
        assert!(
            s.contains("\n2     fenced  broker  h2:9092  -        h2:9093  4\n"),
            "{s}"
        );
        assert!(
            s.contains("\nt      0          1       1      1,2       1    under-replicated\n"),
            "{s}"
        );
        assert!(
            s.contains("\nt      1          none    2      2         2    offline\n"),
            "{s}"
        );
        assert!(
            s.contains("\nt      2          1       0      2,1       1    moving to 2\n"),
            "{s}"
        );
        assert!(
            s.ends_with("under-replicated: t-0\noffline: t-1\nreassigning: t-2\n"),
            "{s}"
        );
    }
}

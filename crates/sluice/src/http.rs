//! The broker's small HTTP surface: `GET /healthz` for health checks,
//! `GET /metrics` for Prometheus (`http_metrics.rs`),
//! `GET /api/v1/topics` for a JSON view of the local topics and their offsets,
//! and the operations API: `GET /api/v1/cluster` (nodes, controller,
//! partitions, under-replicated and offline lists),
//! `POST /api/v1/partitions/reassign`, `POST /api/v1/nodes/{id}/drain` and
//! `POST /api/v1/nodes/{id}/remove`; and the AMQP objects (`http_amqp.rs`:
//! `/api/v1/queues`, `/api/v1/exchanges`, `/api/v1/bindings`), and the stream
//! jobs that report here (`http_jobs.rs`: `/api/v1/jobs`); and the web
//! console's pages (`console/`: `/`, `/topics`, `/groups`, ...). A single node
//! is a cluster of one and
//! answers the same. Operations are proposals to the metadata quorum,
//! answered once applied.

use std::future::Future;
use std::sync::{Arc, OnceLock};

use axum::extract;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use sluice_amqp::AmqpAdmin;
use sluice_cluster::{
    ClusterNode, Command, CommandOutput, MetadataImage, PartitionState, NO_LEADER,
};
use sluice_group::Coordination;
use sluice_kafka::KafkaMetrics;
use sluice_log::Store;
use sluice_node::Node;
use sluice_topology::Topology;
use sluice_vocab::KafkaError;
use tracing::error;

/// Shared with the handlers; the store and the node are set once they run.
#[derive(Clone, Default)]
pub struct State {
    store: Arc<OnceLock<Arc<Store>>>,
    node: Arc<OnceLock<Arc<Node>>>,
    amqp: Arc<OnceLock<AmqpAdmin>>,
    groups: Arc<OnceLock<Arc<Coordination>>>,
    kafka: Arc<OnceLock<Arc<KafkaMetrics>>>,
    jobs: crate::http_jobs::Jobs,
    partition_metrics: Arc<OnceLock<bool>>,
    console: Arc<OnceLock<Arc<crate::console::Console>>>,
}

impl State {
    pub fn set_groups(&self, groups: Arc<Coordination>) {
        let _ = self.groups.set(groups);
    }

    pub fn set_kafka_metrics(&self, metrics: Arc<KafkaMetrics>) {
        let _ = self.kafka.set(metrics);
    }

    /// The Kafka listener's request figures, once it runs.
    pub(crate) fn kafka_metrics(&self) -> Option<&Arc<KafkaMetrics>> {
        self.kafka.get()
    }

    /// Whether /metrics has per-partition series (default true).
    pub fn set_partition_metrics(&self, on: bool) {
        let _ = self.partition_metrics.set(on);
    }

    pub(crate) fn partition_metrics(&self) -> bool {
        self.partition_metrics.get().copied().unwrap_or(true)
    }

    pub fn set_console(&self, console: crate::console::Console) {
        let _ = self.console.set(Arc::new(console));
    }

    /// The web console's own client, once the Kafka listener runs.
    pub(crate) fn console(&self) -> Option<&Arc<crate::console::Console>> {
        self.console.get()
    }

    /// The group coordination, once the node runs.
    pub(crate) fn groups(&self) -> Option<&Arc<Coordination>> {
        self.groups.get()
    }

    pub fn set_store(&self, store: Arc<Store>) {
        let _ = self.store.set(store);
    }

    pub fn set_node(&self, node: Arc<Node>) {
        let _ = self.node.set(node);
    }

    pub fn set_amqp(&self, amqp: AmqpAdmin) {
        let _ = self.amqp.set(amqp);
    }

    /// What stream jobs reported to this node.
    pub(crate) fn jobs(&self) -> &crate::http_jobs::JobRegistry {
        &self.jobs
    }

    /// The AMQP objects, once the node runs.
    pub(crate) fn amqp(&self) -> Option<&AmqpAdmin> {
        self.amqp.get()
    }

    /// The quorum member of the node, once it runs.
    fn cluster(&self) -> Option<&Arc<ClusterNode>> {
        self.node.get().map(|n| n.cluster())
    }

    pub(crate) fn node(&self) -> Option<&Arc<Node>> {
        self.node.get()
    }

    pub(crate) fn store(&self) -> Option<&Arc<Store>> {
        self.store.get()
    }
}

pub fn router(state: State) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(crate::http_metrics::metrics))
        .route("/api/v1/topics", get(topics))
        .route("/api/v1/cluster", get(cluster_status))
        .route("/api/v1/partitions/reassign", post(reassign))
        .route("/api/v1/nodes/{id}/drain", post(drain))
        .route("/api/v1/nodes/{id}/remove", post(remove_node))
        .merge(crate::http_amqp::routes())
        .merge(crate::http_access::routes())
        .merge(crate::http_jobs::routes())
        .merge(crate::console::routes())
        .with_state(state)
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    state: State,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    if let Err(e) = axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
    {
        error!("HTTP server failed: {e}");
    }
}

const STARTING: (StatusCode, &str) = (StatusCode::SERVICE_UNAVAILABLE, "starting\n");

/// Why this node is not healthy, or None when it is: it sees a controller,
/// the quorum has it registered and unfenced (it can lead and replicate),
/// and a controller that a quorum stands behind answered it within the
/// session timeout (a node cut off from the quorum -- a controller without
/// a majority included -- may still see itself registered in its own,
/// stale, image).
pub(crate) fn unhealthy_reason(topology: &Node) -> Option<String> {
    let node = topology.cluster();
    let me = node.node_id();
    let image = topology.image();
    match (node.controller_id(), image.brokers.get(&me)) {
        (None, _) => Some("no controller (the metadata quorum has no leader)".to_owned()),
        (Some(_), None) => Some("not registered with the controller yet".to_owned()),
        (Some(_), Some(b)) if b.fenced => Some("fenced by the controller".to_owned()),
        _ => node.stale_view().map(|stale| stale.to_string()),
    }
}

async fn healthz(extract::State(state): extract::State<State>) -> Response {
    let Some(topology) = state.node() else {
        return STARTING.into_response();
    };
    let me = topology.cluster().node_id();
    let reason = unhealthy_reason(topology);
    match reason {
        None => (StatusCode::OK, "ok\n").into_response(),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "unavailable", "node": me, "reason": why })),
        )
            .into_response(),
    }
}

#[derive(Serialize)]
pub(crate) struct ClusterView {
    pub(crate) cluster_id: String,
    pub(crate) node_id: i32,
    pub(crate) controller_id: Option<i32>,
    pub(crate) metadata_applied_index: u64,
    /// Why this node's view may be out of date (no contact with a controller
    /// backed by a quorum for a session, or fenced); absent when it is current.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) stale: Option<String>,
    pub(crate) nodes: Vec<NodeView>,
    pub(crate) topics: Vec<ClusterTopicView>,
    pub(crate) under_replicated: Vec<TopicPartition>,
    pub(crate) offline: Vec<TopicPartition>,
    pub(crate) reassigning: Vec<TopicPartition>,
}

#[derive(Serialize)]
pub(crate) struct NodeView {
    pub(crate) id: i32,
    /// "alive", "fenced" (the controller stopped hearing from it) or "draining".
    pub(crate) state: &'static str,
    /// "voter" (of the metadata quorum) or "broker" (joined later, follows the
    /// metadata log without voting).
    pub(crate) role: &'static str,
    pub(crate) kafka: String,
    pub(crate) raft: String,
    pub(crate) replica: String,
    pub(crate) broker_epoch: u64,
}

#[derive(Serialize)]
pub(crate) struct ClusterTopicView {
    pub(crate) name: String,
    pub(crate) replication_factor: usize,
    pub(crate) configs: std::collections::BTreeMap<String, String>,
    pub(crate) partitions: Vec<ClusterPartitionView>,
}

#[derive(Serialize)]
pub(crate) struct ClusterPartitionView {
    pub(crate) partition: i32,
    /// -1 when offline.
    pub(crate) leader: i32,
    pub(crate) leader_epoch: i32,
    pub(crate) replicas: Vec<i32>,
    pub(crate) isr: Vec<i32>,
    /// The replica set a reassignment in progress moves to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) target_replicas: Option<Vec<i32>>,
}

impl ClusterPartitionView {
    fn new(partition: i32, p: &PartitionState) -> ClusterPartitionView {
        ClusterPartitionView {
            partition,
            leader: p.leader,
            leader_epoch: p.leader_epoch,
            replicas: p.replicas.clone(),
            isr: p.isr.clone(),
            target_replicas: p.target_replicas.clone(),
        }
    }
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: i32,
}

fn cluster_view(
    me: i32,
    controller: Option<i32>,
    voters: &[i32],
    image: &MetadataImage,
    stale: Option<String>,
) -> ClusterView {
    let nodes = image
        .brokers
        .iter()
        .map(|(id, b)| NodeView {
            id: *id,
            state: if b.fenced {
                "fenced"
            } else if b.draining {
                "draining"
            } else {
                "alive"
            },
            role: if voters.contains(id) {
                "voter"
            } else {
                "broker"
            },
            kafka: format!("{}:{}", b.kafka_host, b.kafka_port),
            raft: b.raft_addr.clone(),
            replica: b.replica_addr.clone(),
            broker_epoch: b.epoch,
        })
        .collect();
    let topics = image
        .topics
        .iter()
        .map(|(name, t)| ClusterTopicView {
            name: name.clone(),
            replication_factor: t.partitions.first().map_or(0, |p| p.replicas.len()),
            configs: t.configs.clone(),
            partitions: t
                .partitions
                .iter()
                .enumerate()
                .map(|(i, p)| ClusterPartitionView::new(i32::try_from(i).unwrap_or(i32::MAX), p))
                .collect(),
        })
        .collect();
    let tp = |v: Vec<(String, i32)>| {
        v.into_iter()
            .map(|(topic, partition)| TopicPartition { topic, partition })
            .collect()
    };
    ClusterView {
        cluster_id: image.cluster_id.clone(),
        node_id: me,
        controller_id: controller,
        metadata_applied_index: image.applied_index,
        stale,
        nodes,
        topics,
        under_replicated: tp(image.under_replicated()),
        offline: tp(image.offline()),
        reassigning: tp(image.reassigning()),
    }
}

/// The cluster as `topology` sees it now.
pub(crate) fn cluster_view_of(topology: &Node) -> ClusterView {
    let node = topology.cluster();
    let image = topology.image();
    let voters = node.members().voters;
    cluster_view(
        node.node_id(),
        node.controller_id(),
        &voters,
        &image,
        node.stale_view().map(|stale| stale.to_string()),
    )
}

async fn cluster_status(extract::State(state): extract::State<State>) -> Response {
    let Some(topology) = state.node() else {
        return STARTING.into_response();
    };
    Json(cluster_view_of(topology)).into_response()
}

#[derive(Deserialize)]
struct ReassignRequest {
    topic: String,
    partition: i32,
    replicas: Vec<i32>,
}

#[derive(Deserialize)]
struct DrainRequest {
    #[serde(default = "yes")]
    draining: bool,
}

fn yes() -> bool {
    true
}

/// Proposes `cmd` and turns the outcome into an HTTP answer.
async fn propose(node: &ClusterNode, cmd: Command) -> Result<CommandOutput, Response> {
    match node.propose(cmd).await {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(rejected)) => Err((
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({
                "error": rejected.to_string(),
                "kafka_error_code": rejected.error_code().code(),
            })),
        )
            .into_response()),
        Err(e) => Err((
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "error": e.to_string() })),
        )
            .into_response()),
    }
}

async fn reassign(
    extract::State(state): extract::State<State>,
    Json(req): Json<ReassignRequest>,
) -> Response {
    let Some(node) = state.cluster() else {
        return STARTING.into_response();
    };
    let partition = req.partition;
    let cmd = Command::ReassignPartition {
        topic: req.topic,
        partition,
        replicas: req.replicas,
    };
    match propose(node, cmd).await {
        Ok(CommandOutput::Partition(p)) => {
            Json(ClusterPartitionView::new(partition, &p)).into_response()
        }
        Ok(_) => (StatusCode::OK, "ok\n").into_response(),
        Err(r) => r,
    }
}

async fn drain(
    extract::State(state): extract::State<State>,
    extract::Path(id): extract::Path<i32>,
    body: Option<Json<DrainRequest>>,
) -> Response {
    let Some(node) = state.cluster() else {
        return STARTING.into_response();
    };
    let draining = body.is_none_or(|Json(b)| b.draining);
    if let Err(r) = propose(
        node,
        Command::SetDraining {
            node_id: id,
            draining,
        },
    )
    .await
    {
        return r;
    }
    // Move preferred leadership off (or back onto) the node now.
    let elections = match propose(
        node,
        Command::ElectLeaders {
            partitions: None,
            preferred_only: false,
        },
    )
    .await
    {
        Ok(CommandOutput::Elections(e)) => e
            .into_iter()
            .filter_map(|e| {
                e.result
                    .ok()
                    .filter(|l| *l != NO_LEADER)
                    .map(|l| (e.topic, e.partition, l))
            })
            .count(),
        Ok(_) => 0,
        Err(r) => return r,
    };
    Json(serde_json::json!({ "node": id, "draining": draining, "leaders_moved": elections }))
        .into_response()
}

/// Decommissions a stopped node that holds no replica: it leaves the broker
/// registry, and then the Raft membership. Voters are fixed by --cluster-peers.
async fn remove_node(
    extract::State(state): extract::State<State>,
    extract::Path(id): extract::Path<i32>,
) -> Response {
    let Some(node) = state.cluster() else {
        return STARTING.into_response();
    };
    if node.members().voters.contains(&id) {
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({
                "error": format!("node {id} is a voter of the metadata quorum (listed in --cluster-peers) and cannot be removed"),
            })),
        )
            .into_response();
    }
    match propose(node, Command::UnregisterBroker { node_id: id }).await {
        Ok(_) => Json(serde_json::json!({ "node": id, "removed": true })).into_response(),
        Err(r) => r,
    }
}

#[derive(Serialize)]
struct TopicView {
    name: String,
    /// Kafka's topic id as 32 hex digits.
    id: String,
    internal: bool,
    partition_count: u32,
    /// Topic-level config overrides (defaults are not listed).
    config_overrides: std::collections::BTreeMap<String, String>,
    partitions: Vec<PartitionView>,
}

#[derive(Serialize)]
struct PartitionView {
    partition: i32,
    log_start_offset: i64,
    high_watermark: i64,
    log_end_offset: i64,
    size_bytes: u64,
}

async fn topics(extract::State(state): extract::State<State>) -> Response {
    let Some(store) = state.store() else {
        return STARTING.into_response();
    };
    let views: Vec<TopicView> = store
        .topics()
        .into_iter()
        .map(|t| {
            let partitions = (0..t.partitions)
                .filter_map(|p| i32::try_from(p).ok())
                .filter_map(|p| {
                    store.partition(&t.name, p).map(|part| PartitionView {
                        partition: p,
                        log_start_offset: part.log_start_offset(),
                        high_watermark: part.high_watermark(),
                        log_end_offset: part.log_end_offset(),
                        size_bytes: part.size_bytes(),
                    })
                })
                .collect();
            TopicView {
                id: t.id.iter().map(|b| format!("{b:02x}")).collect(),
                internal: t.internal,
                partition_count: t.partitions,
                config_overrides: t.overrides,
                partitions,
                name: t.name,
            }
        })
        .collect();
    Json(views).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_cluster::{BrokerState, PartitionState, TopicState};

    #[tokio::test]
    async fn healthz_is_starting_until_the_node_runs() {
        let state = State::default();
        let r = healthz(extract::State(state)).await;
        assert_eq!(r.status(), 503);
    }

    #[test]
    fn cluster_view_lists_states_and_problem_partitions() {
        let broker = |fenced, draining| BrokerState {
            kafka_host: "h".into(),
            kafka_port: 9092,
            raft_addr: "h:9093".into(),
            replica_addr: "r:9092".into(),
            endpoints: Default::default(),
            fenced,
            draining,
            incarnation: 1,
            epoch: 7,
        };
        let mut img = MetadataImage {
            cluster_id: "c".into(),
            applied_index: 9,
            ..Default::default()
        };
        img.brokers.insert(1, broker(false, false));
        img.brokers.insert(2, broker(true, false));
        img.brokers.insert(3, broker(false, true));
        let part = |leader, isr: Vec<i32>| PartitionState {
            replicas: vec![1, 2, 3],
            isr,
            leader,
            leader_epoch: 1,
            partition_epoch: 1,
            target_replicas: None,
            original_replicas: None,
        };
        img.topics.insert(
            "t".into(),
            TopicState {
                topic_id: [1; 16],
                configs: Default::default(),
                partitions: vec![
                    part(1, vec![1, 2, 3]),
                    part(NO_LEADER, vec![2]),
                    PartitionState {
                        target_replicas: Some(vec![3, 1]),
                        original_replicas: Some(vec![1, 2]),
                        ..part(1, vec![1, 2])
                    },
                ],
            },
        );
        let v = serde_json::to_value(cluster_view(3, Some(1), &[1, 2], &img, None)).unwrap();
        assert!(v.get("stale").is_none(), "a current view says nothing");
        let stale = cluster_view(3, Some(1), &[1, 2], &img, Some("cut off".into()));
        assert_eq!(serde_json::to_value(stale).unwrap()["stale"], "cut off");
        assert_eq!(v["controller_id"], 1);
        assert_eq!(v["node_id"], 3);
        let states: Vec<&str> = v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["state"].as_str().unwrap())
            .collect();
        assert_eq!(states, ["alive", "fenced", "draining"]);
        let roles: Vec<&str> = v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["voter", "voter", "broker"]);
        assert_eq!(v["nodes"][0]["replica"], "r:9092");
        assert_eq!(v["nodes"][0]["kafka"], "h:9092");
        assert_eq!(v["topics"][0]["replication_factor"], 3);
        assert_eq!(v["topics"][0]["partitions"][1]["leader"], -1);
        assert_eq!(
            v["under_replicated"],
            serde_json::json!([{"topic": "t", "partition": 1}])
        );
        assert_eq!(
            v["offline"],
            serde_json::json!([{"topic": "t", "partition": 1}])
        );
        assert_eq!(
            v["reassigning"],
            serde_json::json!([{"topic": "t", "partition": 2}])
        );
        let moving = &v["topics"][0]["partitions"][2];
        assert_eq!(moving["target_replicas"], serde_json::json!([3, 1]));
        assert!(v["topics"][0]["partitions"][0]
            .get("target_replicas")
            .is_none());
    }
}

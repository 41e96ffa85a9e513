//! `GET /metrics`: the node in the Prometheus (OpenMetrics) text format.
//!
//! Everything here is read at scrape time from what the node already keeps
//! (the store's partitions, the metadata image, the groups' committed
//! offsets, the AMQP queues, the stream jobs' reports, `/proc`), so serving
//! metrics costs the request paths nothing. The exposition is encoded by
//! `prometheus-client`. Per-partition series can be switched off
//! (`[http] partition_metrics = false`) for nodes with very many partitions;
//! per-topic and per-group series stay. The few figures the data path keeps
//! itself (request times and error codes, records produced and fetched,
//! flush rounds) can be switched off too (`[server] metrics = false`): they
//! are then neither kept nor shown.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use axum::extract;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use sluice_cluster::MetadataImage;
use sluice_group::CommittedOffset;
use sluice_topology::Topology;

use crate::http::State;

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicLabels {
    topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabels {
    topic: String,
    partition: i32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupPartitionLabels {
    group: String,
    topic: String,
    partition: i32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabels {
    group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    vhost: String,
    queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    job: String,
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    job: String,
    stage: String,
}

type IntGauges<L> = Family<L, Gauge>;
type FloatGauges<L> = Family<L, Gauge<f64, AtomicU64>>;
type Counters<L> = Family<L, Counter>;

pub async fn metrics(extract::State(state): extract::State<State>) -> Response {
    let led_queues = match state.amqp() {
        Some(amqp) => amqp.queues_led_here().await,
        None => Vec::new(),
    };
    let group_offsets = group_offsets(&state).await;
    let mut root = Registry::default();
    process(&mut root);
    let registry = root.sub_registry_with_prefix("sluice");
    registry.register(
        "build",
        "The running build",
        Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
    );
    if let Some(kafka) = state.kafka_metrics() {
        kafka.register(registry);
    }
    sluice_log::log_metrics().register(registry);
    sluice_replica::replica_metrics().register(registry);
    storage(&state, registry);
    cluster(&state, registry);
    groups(group_offsets, registry);
    queues(led_queues, registry);
    jobs(&state, registry);
    let mut text = String::new();
    match encode(&mut text, &root) {
        Ok(()) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode metrics: {e}\n"),
        )
            .into_response(),
    }
}

/// The partitions this node holds: per topic always, per partition when
/// switched on.
/// Whether this node holds a replica of `topic`/`partition`, per the
/// metadata image: a node creates every partition of a topic it replicates
/// any partition of, and those it does not replicate stay empty. A topic
/// the image does not know (a node not running yet) counts as held.
fn replica_here(image: Option<&(Arc<MetadataImage>, i32)>, topic: &str, partition: i32) -> bool {
    let Some((image, me)) = image else {
        return true;
    };
    image
        .topics
        .get(topic)
        .and_then(|t| t.partitions.get(usize::try_from(partition).ok()?))
        .is_none_or(|p| p.replicas.contains(me))
}

/// The metadata image and this node's id, once the node runs.
fn placement(state: &State) -> Option<(Arc<MetadataImage>, i32)> {
    state.node().map(|n| (n.image(), n.cluster().node_id()))
}

fn storage(state: &State, registry: &mut Registry) {
    let Some(store) = state.store() else {
        return;
    };
    let placement = placement(state);
    let per_partition = state.partition_metrics();
    let size = IntGauges::<PartitionLabels>::default();
    let start = IntGauges::<PartitionLabels>::default();
    let end = IntGauges::<PartitionLabels>::default();
    let hw = IntGauges::<PartitionLabels>::default();
    let topic_size = IntGauges::<TopicLabels>::default();
    let topic_end = IntGauges::<TopicLabels>::default();
    let hosted = IntGauges::<TopicLabels>::default();
    let records_in = Counters::<TopicLabels>::default();
    let bytes_in = Counters::<TopicLabels>::default();
    let records_out = Counters::<TopicLabels>::default();
    let bytes_out = Counters::<TopicLabels>::default();
    let hot = sluice_log::hot_path_metrics();
    for t in store.topics() {
        let topic = TopicLabels {
            topic: t.name.clone(),
        };
        for p in (0..t.partitions).filter_map(|p| i32::try_from(p).ok()) {
            let Some(part) = store.partition(&t.name, p) else {
                continue;
            };
            if !replica_here(placement.as_ref(), &t.name, p) {
                continue;
            }
            let bytes = i64::try_from(part.size_bytes()).unwrap_or(i64::MAX);
            hosted.get_or_create(&topic).inc();
            if hot {
                let (records, bytes_produced) = part.produced();
                records_in.get_or_create(&topic).inc_by(records);
                bytes_in.get_or_create(&topic).inc_by(bytes_produced);
                let (records, bytes_fetched) = part.fetched();
                records_out.get_or_create(&topic).inc_by(records);
                bytes_out.get_or_create(&topic).inc_by(bytes_fetched);
            }
            topic_size.get_or_create(&topic).inc_by(bytes);
            topic_end
                .get_or_create(&topic)
                .inc_by(part.log_end_offset());
            if per_partition {
                let labels = PartitionLabels {
                    topic: t.name.clone(),
                    partition: p,
                };
                size.get_or_create(&labels).set(bytes);
                start.get_or_create(&labels).set(part.log_start_offset());
                end.get_or_create(&labels).set(part.log_end_offset());
                hw.get_or_create(&labels).set(part.high_watermark());
            }
        }
    }
    registry.register(
        "topic_partitions_hosted",
        "Partitions of the topic with a replica on this node",
        hosted,
    );
    if hot {
        registry.register(
            "topic_produced_records",
            "Records producers appended to the topic's partitions this node leads, since it started",
            records_in,
        );
        registry.register_with_unit(
            "topic_produced",
            "Bytes of record batches producers appended to the topic's partitions this node leads, since it started",
            Unit::Bytes,
            bytes_in,
        );
        registry.register(
            "topic_fetched_records",
            "Records consumers' fetches returned from the topic's partitions this node leads, since it started (counted off the batch headers; transaction markers left out)",
            records_out,
        );
        registry.register_with_unit(
            "topic_fetched",
            "Bytes of record batches consumers' fetches returned from the topic's partitions this node leads, since it started (followers' fetches left out)",
            Unit::Bytes,
            bytes_out,
        );
    }
    registry.register_with_unit(
        "topic_size",
        "Bytes of the topic's replicas on this node",
        Unit::Bytes,
        topic_size,
    );
    registry.register(
        "topic_end_offsets",
        "Sum of the log end offsets of the topic's partitions on this node (records appended, control records included)",
        topic_end,
    );
    if per_partition {
        registry.register_with_unit(
            "partition_size",
            "Bytes of the partition's log on this node",
            Unit::Bytes,
            size,
        );
        registry.register(
            "partition_log_start_offset",
            "First offset the partition's log on this node holds",
            start,
        );
        registry.register(
            "partition_log_end_offset",
            "Offset the next record appended to the partition gets",
            end,
        );
        registry.register(
            "partition_high_watermark",
            "Offset below which the partition's records are replicated to its ISR and readable",
            hw,
        );
    }
}

/// The cluster as this node's metadata image has it.
fn cluster(state: &State, registry: &mut Registry) {
    let Some(node) = state.node() else {
        return;
    };
    let image = node.image();
    let total: usize = image.topics.values().map(|t| t.partitions.len()).sum();
    let under = image.under_replicated().len();
    let offline = image.offline().len();
    let partitions = IntGauges::<StateLabels>::default();
    let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    partitions
        .get_or_create(&StateLabels { state: "online" })
        .set(count(total.saturating_sub(offline)));
    partitions
        .get_or_create(&StateLabels {
            state: "under_replicated",
        })
        .set(count(under));
    partitions
        .get_or_create(&StateLabels { state: "offline" })
        .set(count(offline));
    registry.register(
        "cluster_partitions",
        "Partitions of the cluster by state (under-replicated ones are online too)",
        partitions,
    );
    let brokers = IntGauges::<StateLabels>::default();
    for b in image.brokers.values() {
        let state = if b.fenced {
            "fenced"
        } else if b.draining {
            "draining"
        } else {
            "alive"
        };
        brokers.get_or_create(&StateLabels { state }).inc();
    }
    registry.register("cluster_nodes", "Nodes of the cluster by state", brokers);
    let cluster = node.cluster();
    let controller = Gauge::<i64>::default();
    controller.set(cluster.controller_id().map_or(-1, i64::from));
    registry.register(
        "cluster_controller_id",
        "Node id of the metadata quorum's leader (-1: none)",
        controller,
    );
    let applied = Gauge::<i64>::default();
    applied.set(i64::try_from(image.applied_index).unwrap_or(i64::MAX));
    registry.register(
        "cluster_metadata_applied_index",
        "Index of the last metadata log entry this node applied",
        applied,
    );
    // A single node is a quorum of one with nobody to elect: its Raft
    // figures would say nothing, so they are shown in cluster mode only.
    if cluster.local_raft_addr().is_some() {
        raft(cluster.raft_figures(), registry);
    }
}

/// The metadata quorum's Raft state as this node sees it.
fn raft(figures: sluice_cluster::RaftFigures, registry: &mut Registry) {
    let gauge = |v: Option<u64>| {
        let g = Gauge::<i64>::default();
        g.set(v.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX)));
        g
    };
    registry.register(
        "raft_term",
        "Current term of the metadata quorum's Raft",
        gauge(Some(figures.term)),
    );
    registry.register(
        "raft_last_log_index",
        "Index of the last entry in this node's metadata Raft log (-1: none)",
        gauge(figures.last_log_index),
    );
    registry.register(
        "raft_last_applied_index",
        "Index of the last committed metadata Raft entry this node applied (-1: none)",
        gauge(figures.last_applied_index),
    );
    let changes = Counter::<u64>::default();
    changes.inc_by(figures.leader_changes);
    registry.register(
        "raft_leader_changes",
        "Times this node saw the metadata quorum's leader change, the first leader it learnt of included",
        changes,
    );
    registry.register(
        "raft_is_leader",
        "1 while this node leads the metadata quorum (is the controller), else 0",
        gauge(Some(u64::from(figures.is_leader))),
    );
}

/// How long a scrape waits for the leaders of partitions with no replica
/// here (Prometheus gives a scrape 10 s by default).
const LEADER_OFFSETS_WAIT: Duration = Duration::from_secs(3);

/// The committed offsets of the groups this node coordinates, each with its
/// partition's high watermark: this node's replica's, or, for a partition
/// with no replica here, its leader's (one ListOffsets per leader, through
/// the console's Kafka client). None when neither answers.
async fn group_offsets(state: &State) -> Vec<(CommittedOffset, Option<i64>)> {
    let (Some(groups), Some(store)) = (state.groups(), state.store()) else {
        return Vec::new();
    };
    let Ok(coordinator) = groups.groups() else {
        return Vec::new();
    };
    let placement = placement(state);
    let mut out: Vec<(CommittedOffset, Option<i64>)> = coordinator
        .committed_offsets()
        .into_iter()
        .map(|c| {
            let hw = store
                .partition(&c.topic, c.partition)
                .filter(|_| replica_here(placement.as_ref(), &c.topic, c.partition))
                .map(|p| p.high_watermark());
            (c, hw)
        })
        .collect();
    let mut elsewhere: Vec<(String, i32)> = out
        .iter()
        .filter(|(_, hw)| hw.is_none())
        .map(|(c, _)| (c.topic.clone(), c.partition))
        .collect();
    if let (false, Some(console), Some((image, _))) =
        (elsewhere.is_empty(), state.console(), placement.as_ref())
    {
        elsewhere.sort();
        elsewhere.dedup();
        let asked = console.log_offsets(image, &elsewhere);
        if let Ok(ends) = tokio::time::timeout(LEADER_OFFSETS_WAIT, asked).await {
            for (c, hw) in &mut out {
                if hw.is_none() {
                    *hw = ends.get(&(c.topic.clone(), c.partition)).map(|o| o.end);
                }
            }
        }
    }
    out
}

/// Committed offsets of the groups this node coordinates and their lag
/// behind their partitions' high watermarks.
fn groups(offsets: Vec<(CommittedOffset, Option<i64>)>, registry: &mut Registry) {
    let committed = IntGauges::<GroupPartitionLabels>::default();
    let lag = IntGauges::<GroupPartitionLabels>::default();
    let mut total: BTreeMap<String, i64> = BTreeMap::new();
    for (c, hw) in offsets {
        let labels = GroupPartitionLabels {
            group: c.group.clone(),
            topic: c.topic.clone(),
            partition: c.partition,
        };
        committed.get_or_create(&labels).set(c.offset);
        if let Some(hw) = hw {
            let behind = (hw - c.offset).max(0);
            lag.get_or_create(&labels).set(behind);
            *total.entry(c.group).or_default() += behind;
        }
    }
    let group_lag = IntGauges::<GroupLabels>::default();
    for (group, behind) in total {
        group_lag.get_or_create(&GroupLabels { group }).set(behind);
    }
    registry.register(
        "consumer_group_committed_offset",
        "Offset a consumer group committed for a partition",
        committed,
    );
    registry.register(
        "consumer_group_partition_lag",
        "Records of a partition past a consumer group's committed offset (high watermark less committed offset)",
        lag,
    );
    registry.register(
        "consumer_group_lag",
        "A consumer group's lag summed over its partitions",
        group_lag,
    );
}

/// The AMQP queues this node leads: depth, unacknowledged, consumers,
/// messages through them.
fn queues(led: Vec<sluice_amqp::QueueInfo>, registry: &mut Registry) {
    let ready = IntGauges::<QueueLabels>::default();
    let unacked = IntGauges::<QueueLabels>::default();
    let consumers = IntGauges::<QueueLabels>::default();
    let published = Counters::<QueueLabels>::default();
    let delivered = Counters::<QueueLabels>::default();
    let acked = Counters::<QueueLabels>::default();
    for q in led {
        let labels = QueueLabels {
            vhost: q.vhost,
            queue: q.name,
        };
        ready
            .get_or_create(&labels)
            .set(i64::from(q.messages_ready));
        unacked
            .get_or_create(&labels)
            .set(i64::from(q.messages_unacknowledged));
        consumers.get_or_create(&labels).set(i64::from(q.consumers));
        published.get_or_create(&labels).inc_by(q.published_total);
        delivered.get_or_create(&labels).inc_by(q.delivered_total);
        acked.get_or_create(&labels).inc_by(q.acked_total);
    }
    registry.register(
        "amqp_queue_messages_published",
        "Messages published to an AMQP queue",
        published,
    );
    registry.register(
        "amqp_queue_messages_delivered",
        "Messages an AMQP queue delivered to consumers",
        delivered,
    );
    registry.register(
        "amqp_queue_messages_acknowledged",
        "Messages of an AMQP queue its consumers acknowledged",
        acked,
    );
    registry.register(
        "amqp_queue_messages_ready",
        "Messages of an AMQP queue ready for delivery",
        ready,
    );
    registry.register(
        "amqp_queue_messages_unacknowledged",
        "Messages of an AMQP queue delivered and not yet acknowledged",
        unacked,
    );
    registry.register(
        "amqp_queue_consumers",
        "Consumers of an AMQP queue",
        consumers,
    );
}

/// The stream jobs that report to this node, from their last report.
fn jobs(state: &State, registry: &mut Registry) {
    let running = IntGauges::<JobLabels>::default();
    let completed = Counters::<JobLabels>::default();
    let abandoned = Counters::<JobLabels>::default();
    let duration = FloatGauges::<JobLabels>::default();
    let size = IntGauges::<JobLabels>::default();
    let records_in = Counters::<StageLabels>::default();
    let records_out = Counters::<StageLabels>::default();
    let backpressure = FloatGauges::<StageLabels>::default();
    let watermark_lag = FloatGauges::<StageLabels>::default();
    for view in state.jobs().views() {
        let job = JobLabels {
            job: view["id"].as_str().unwrap_or_default().to_owned(),
            name: view["name"].as_str().unwrap_or_default().to_owned(),
        };
        running
            .get_or_create(&job)
            .set(i64::from(view["state"] == "RUNNING"));
        let checkpoints = &view["checkpoints"];
        completed
            .get_or_create(&job)
            .inc_by(checkpoints["completed"].as_u64().unwrap_or(0));
        abandoned
            .get_or_create(&job)
            .inc_by(checkpoints["abandoned"].as_u64().unwrap_or(0));
        if let Some(ms) = checkpoints["last_duration_ms"].as_f64() {
            duration.get_or_create(&job).set(ms / 1000.0);
        }
        if let Some(bytes) = checkpoints["last_size_bytes"].as_i64() {
            size.get_or_create(&job).set(bytes);
        }
        for stage in view["metrics"].as_array().into_iter().flatten() {
            let labels = StageLabels {
                job: job.job.clone(),
                stage: stage["name"].as_str().unwrap_or_default().to_owned(),
            };
            records_in
                .get_or_create(&labels)
                .inc_by(stage["records_in"].as_u64().unwrap_or(0));
            records_out
                .get_or_create(&labels)
                .inc_by(stage["records_out"].as_u64().unwrap_or(0));
            if let Some(ms) = stage["backpressured_ms_per_sec"].as_f64() {
                backpressure.get_or_create(&labels).set(ms / 1000.0);
            }
            if let Some(ms) = stage["watermark_lag_ms"].as_f64() {
                watermark_lag.get_or_create(&labels).set(ms / 1000.0);
            }
        }
    }
    registry.register(
        "stream_job_running",
        "1 while a stream job reports as running, 0 once it stopped or went quiet",
        running,
    );
    registry.register(
        "stream_job_checkpoints_completed",
        "Checkpoints a stream job completed",
        completed,
    );
    registry.register(
        "stream_job_checkpoints_abandoned",
        "Checkpoints a stream job abandoned (timed out or declined)",
        abandoned,
    );
    registry.register_with_unit(
        "stream_job_last_checkpoint_duration",
        "How long a stream job's last completed checkpoint took",
        Unit::Seconds,
        duration,
    );
    registry.register_with_unit(
        "stream_job_last_checkpoint_size",
        "State a stream job's last completed checkpoint wrote",
        Unit::Bytes,
        size,
    );
    registry.register(
        "stream_stage_records_in",
        "Records a stage of a stream job took in",
        records_in,
    );
    registry.register(
        "stream_stage_records_out",
        "Records a stage of a stream job sent on",
        records_out,
    );
    registry.register(
        "stream_stage_backpressure_ratio",
        "Share of the last second the busiest subtask of a stage waited for room downstream",
        backpressure,
    );
    registry.register_with_unit(
        "stream_stage_watermark_lag",
        "How far a stage's watermark trails the wall clock",
        Unit::Seconds,
        watermark_lag,
    );
}

/// The process: resident memory, open descriptors, CPU time (Prometheus's
/// standard `process_` names).
fn process(registry: &mut Registry) {
    let usage = crate::resources::process_usage();
    if let Some(rss) = usage.resident_bytes {
        let g = Gauge::<i64>::default();
        g.set(i64::try_from(rss).unwrap_or(i64::MAX));
        registry.register_with_unit(
            "process_resident_memory",
            "Resident memory of the process",
            Unit::Bytes,
            g,
        );
    }
    if let Some(fds) = usage.open_fds {
        let g = Gauge::<i64>::default();
        g.set(i64::try_from(fds).unwrap_or(i64::MAX));
        registry.register("process_open_fds", "Open file descriptors", g);
    }
    if let Some(cpu) = usage.cpu_seconds {
        let c = Counter::<f64, AtomicU64>::default();
        c.inc_by(cpu);
        registry.register_with_unit(
            "process_cpu",
            "User and system CPU time of the process",
            Unit::Seconds,
            c,
        );
    }
}

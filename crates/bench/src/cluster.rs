//! Control plane: where the topic's partitions live (Metadata), creating the
//! topic when it is missing (CreateTopics), and partition offsets
//! (ListOffsets). Only standard APIs, and the leader addresses the brokers
//! advertise, so any Kafka-compatible cluster works.

use sluice_vocab::ErrorCode;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::{
    ApiKey, BrokerId, CreateTopicsRequest, ListOffsetsRequest, MetadataRequest, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use sluice_client::Connection;

use crate::BenchError;

/// How long a just-created topic may take to get leaders.
const LEADER_WAIT: Duration = Duration::from_secs(15);
/// Client id sent in every request header.
const CLIENT_ID: &str = "sluice-bench";
/// Time allowed for a connection and its ApiVersions handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// ListOffsets timestamps.
pub const EARLIEST: i64 = -2;
pub const LATEST: i64 = -1;

/// The topic's layout as the brokers describe it.
#[derive(Clone, Debug)]
pub struct Cluster {
    pub topic: String,
    /// Advertised `host:port` of each broker by node id.
    pub brokers: BTreeMap<i32, String>,
    /// Leader node id of partition i at index i.
    pub leaders: Vec<i32>,
}

impl Cluster {
    /// Partitions whose leader is `node`, ascending.
    pub fn partitions_led_by(&self, node: i32) -> Vec<i32> {
        (0..)
            .zip(self.leaders.iter())
            .filter(|(_, l)| **l == node)
            .map(|(p, _)| p)
            .collect()
    }

    /// Advertised address of `node`.
    pub fn address(&self, node: i32) -> Result<&str, BenchError> {
        self.brokers
            .get(&node)
            .map(String::as_str)
            .ok_or_else(|| BenchError::Protocol(format!("leader {node} is not among the brokers")))
    }

    /// Leader node ids, each once, ascending.
    pub fn leader_nodes(&self) -> Vec<i32> {
        let mut nodes = self.leaders.clone();
        nodes.sort_unstable();
        nodes.dedup();
        nodes
    }
}

pub fn topic_name(s: &str) -> TopicName {
    TopicName(StrBytes::from_string(s.to_owned()))
}

/// Connects to one broker as the load generator.
pub(crate) async fn connect(addr: &str) -> Result<Connection, BenchError> {
    Ok(Connection::connect(addr, CLIENT_ID, CONNECT_TIMEOUT).await?)
}

/// Connects to the first reachable bootstrap server (comma separated list).
pub async fn bootstrap(servers: &str) -> Result<Connection, BenchError> {
    Ok(Connection::connect_any(servers, CLIENT_ID, CONNECT_TIMEOUT).await?)
}

/// Describes `topic`; when it does not exist and `create` is Some(n), creates
/// it with n partitions (broker-default replication) and waits for leaders.
pub async fn discover(
    conn: &mut Connection,
    topic: &str,
    create: Option<u32>,
) -> Result<Cluster, BenchError> {
    let deadline = Instant::now() + LEADER_WAIT;
    let mut created = false;
    loop {
        match describe(conn, topic).await? {
            Described::Ready(c) => return Ok(c),
            Described::Missing if !created => {
                let Some(partitions) = create else {
                    return Err(BenchError::Config(format!(
                        "topic {topic:?} does not exist (produce to it first)"
                    )));
                };
                create_topic(conn, topic, partitions).await?;
                created = true;
            }
            Described::Missing | Described::NotReady => {}
        }
        if Instant::now() >= deadline {
            return Err(BenchError::Config(format!(
                "topic {topic:?} has no leader for every partition after {LEADER_WAIT:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

enum Described {
    Ready(Cluster),
    Missing,
    NotReady,
}

async fn describe(conn: &mut Connection, topic: &str) -> Result<Described, BenchError> {
    // v1 is the first version with a topic list that can name one topic
    // without meaning "all"; v4 adds allow_auto_topic_creation.
    let version = conn.versions().pick(ApiKey::Metadata, 1, 12)?;
    let req = MetadataRequest::default()
        .with_topics(Some(vec![
            MetadataRequestTopic::default().with_name(Some(topic_name(topic)))
        ]))
        .with_allow_auto_topic_creation(false);
    let resp = conn.call(&req, version).await?;
    let Some(t) = resp
        .topics
        .iter()
        .find(|t| t.name.as_ref().map(|n| n.0.as_str()) == Some(topic))
    else {
        return Ok(Described::Missing);
    };
    match ErrorCode::check(t.error_code) {
        Ok(()) => {}
        Err(ErrorCode::UnknownTopicOrPartition) => return Ok(Described::Missing),
        Err(ErrorCode::LeaderNotAvailable) => return Ok(Described::NotReady),
        Err(code) => {
            return Err(BenchError::Broker {
                what: format!("Metadata of {topic:?}"),
                code,
            })
        }
    }
    let brokers: BTreeMap<i32, String> = resp
        .brokers
        .iter()
        .map(|b| (b.node_id.0, format!("{}:{}", b.host.as_str(), b.port)))
        .collect();
    let n = t.partitions.len();
    if n == 0 {
        return Ok(Described::NotReady);
    }
    let mut leaders = vec![-1; n];
    for p in &t.partitions {
        let idx = usize::try_from(p.partition_index)
            .ok()
            .filter(|i| *i < n)
            .ok_or_else(|| {
                BenchError::Protocol(format!("partition index {} of {n}", p.partition_index))
            })?;
        if !matches!(
            ErrorCode::check(p.error_code),
            Ok(()) | Err(ErrorCode::NotLeaderOrFollower)
        ) {
            return Ok(Described::NotReady);
        }
        if let Some(slot) = leaders.get_mut(idx) {
            *slot = p.leader_id.0;
        }
    }
    if leaders.iter().any(|l| *l < 0 || !brokers.contains_key(l)) {
        return Ok(Described::NotReady);
    }
    Ok(Described::Ready(Cluster {
        topic: topic.to_string(),
        brokers,
        leaders,
    }))
}

async fn create_topic(
    conn: &mut Connection,
    topic: &str,
    partitions: u32,
) -> Result<(), BenchError> {
    let version = conn.versions().pick(ApiKey::CreateTopics, 2, 7)?;
    let partitions = i32::try_from(partitions)
        .map_err(|_| BenchError::Config(format!("{partitions} partitions")))?;
    // -1 (the broker's default replication factor) needs v4.
    let replication = if version >= 4 { -1 } else { 1 };
    let req = CreateTopicsRequest::default()
        .with_topics(vec![CreatableTopic::default()
            .with_name(topic_name(topic))
            .with_num_partitions(partitions)
            .with_replication_factor(replication)])
        .with_timeout_ms(30_000);
    let resp = conn.call(&req, version).await?;
    for t in &resp.topics {
        let code = match ErrorCode::check(t.error_code) {
            Ok(()) | Err(ErrorCode::TopicAlreadyExists) => continue,
            Err(code) => code,
        };
        return Err(BenchError::Broker {
            what: format!(
                "CreateTopics {topic:?}{}",
                t.error_message
                    .as_ref()
                    .map(|m| format!(" ({})", m.as_str()))
                    .unwrap_or_default()
            ),
            code,
        });
    }
    Ok(())
}

/// The offset of every partition at `timestamp` (EARLIEST or LATEST), asking
/// each partition's leader.
pub async fn list_offsets(cluster: &Cluster, timestamp: i64) -> Result<Vec<i64>, BenchError> {
    let mut offsets = vec![-1i64; cluster.leaders.len()];
    for node in cluster.leader_nodes() {
        let mut conn = connect(cluster.address(node)?).await?;
        let version = conn.versions().pick(ApiKey::ListOffsets, 1, 6)?;
        let partitions = cluster
            .partitions_led_by(node)
            .into_iter()
            .map(|p| {
                ListOffsetsPartition::default()
                    .with_partition_index(p)
                    .with_current_leader_epoch(-1)
                    .with_timestamp(timestamp)
            })
            .collect();
        let req = ListOffsetsRequest::default()
            .with_replica_id(BrokerId(-1))
            .with_topics(vec![ListOffsetsTopic::default()
                .with_name(topic_name(&cluster.topic))
                .with_partitions(partitions)]);
        let resp = conn.call(&req, version).await?;
        for t in &resp.topics {
            for p in &t.partitions {
                if let Err(code) = ErrorCode::check(p.error_code) {
                    return Err(BenchError::Broker {
                        what: format!("ListOffsets partition {}", p.partition_index),
                        code,
                    });
                }
                let slot = usize::try_from(p.partition_index)
                    .ok()
                    .and_then(|i| offsets.get_mut(i));
                if let Some(slot) = slot {
                    *slot = p.offset;
                }
            }
        }
    }
    if let Some(p) = offsets.iter().position(|o| *o < 0) {
        return Err(BenchError::Protocol(format!(
            "ListOffsets gave no offset for partition {p}"
        )));
    }
    Ok(offsets)
}

//! What the console asks of the cluster through the Kafka protocol, as any
//! client would: offsets from the partitions' leaders, groups from their
//! coordinators, records by fetching, topic deletion through the
//! controller. Going through the protocol keeps the console right on every
//! node of a cluster, whatever this node leads or coordinates.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::{BrokerId, DeleteTopicsRequest, ListOffsetsRequest, TopicName};
use kafka_protocol::protocol::StrBytes;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use sluice_cluster::MetadataImage;
use sluice_vocab::ErrorCode;

use crate::cli::{ClientArgs, Wire};

/// ListOffsets' timestamps for "the log end" and "the log start".
const LATEST: i64 = -1;
const EARLIEST: i64 = -2;

/// Most records one browse shows, whatever the page asks.
pub(crate) const MAX_BROWSE: usize = 500;

/// How long a browse waits for records that are not there.
const BROWSE_WAIT: Duration = Duration::from_secs(2);

/// A partition's first and next offsets (-1 when its leader did not say).
#[derive(Clone, Copy, Debug)]
pub(crate) struct LogOffsets {
    pub(crate) start: i64,
    pub(crate) end: i64,
}

/// Log start and end offsets of `partitions`, asked of their leaders: one
/// ListOffsets per leader and end, however many partitions it leads.
/// Partitions without a leader, or whose leader did not answer, are absent.
pub(crate) async fn log_offsets(
    wire: &mut Wire,
    image: &MetadataImage,
    partitions: &[(String, i32)],
) -> BTreeMap<(String, i32), LogOffsets> {
    let mut by_leader: BTreeMap<String, BTreeMap<&str, Vec<i32>>> = BTreeMap::new();
    for (topic, p) in partitions {
        let leader = image
            .topics
            .get(topic)
            .and_then(|t| t.partitions.get(usize::try_from(*p).ok()?))
            .map(|s| s.leader);
        let Some(b) = leader.and_then(|l| image.brokers.get(&l)) else {
            continue;
        };
        by_leader
            .entry(format!("{}:{}", b.kafka_host, b.kafka_port))
            .or_default()
            .entry(topic)
            .or_default()
            .push(*p);
    }
    let mut out = BTreeMap::new();
    for (addr, topics) in by_leader {
        let (Ok(ends), Ok(starts)) = (
            list_offsets(wire, &addr, &topics, LATEST).await,
            list_offsets(wire, &addr, &topics, EARLIEST).await,
        ) else {
            // One leader out of reach leaves its partitions blank; the page
            // still shows the rest.
            continue;
        };
        for (key, end) in ends {
            let start = starts.get(&key).copied().unwrap_or(-1);
            out.insert(key, LogOffsets { start, end });
        }
    }
    out
}

async fn list_offsets(
    wire: &mut Wire,
    addr: &str,
    topics: &BTreeMap<&str, Vec<i32>>,
    timestamp: i64,
) -> Result<BTreeMap<(String, i32), i64>> {
    let req = ListOffsetsRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_topics(
            topics
                .iter()
                .map(|(t, ps)| {
                    ListOffsetsTopic::default()
                        .with_name(TopicName(StrBytes::from_string((*t).to_owned())))
                        .with_partitions(
                            ps.iter()
                                .map(|p| {
                                    ListOffsetsPartition::default()
                                        .with_partition_index(*p)
                                        .with_timestamp(timestamp)
                                })
                                .collect(),
                        )
                })
                .collect(),
        );
    let resp = wire.call(addr, &req, 1, 7).await?;
    let mut out = BTreeMap::new();
    for t in resp.topics {
        for p in t.partitions {
            if ErrorCode::check(p.error_code).is_ok() {
                out.insert((t.name.0.to_string(), p.partition_index), p.offset);
            }
        }
    }
    Ok(out)
}

/// Deletes `topic` (DeleteTopics, which the brokers hand to the controller).
pub(crate) async fn delete_topic(wire: &mut Wire, topic: &str) -> Result<()> {
    let req = DeleteTopicsRequest::default()
        .with_topic_names(vec![TopicName(StrBytes::from_string(topic.to_owned()))])
        .with_timeout_ms(30_000);
    let resp = wire.call_any(&req, 1, 5).await?;
    for r in resp.responses {
        if let Err(code) = ErrorCode::check(r.error_code) {
            let why = r.error_message.map(|m| m.to_string()).unwrap_or_default();
            bail!("cannot delete topic {topic:?}: {code:?} {why}");
        }
    }
    Ok(())
}

/// Where a browse starts.
#[derive(Clone, Copy, Debug)]
pub(crate) enum From {
    Offset(i64),
    /// The first record with a timestamp at or after this (ms since the epoch).
    Time(i64),
}

/// One record, as stored.
pub(crate) struct Record {
    pub(crate) offset: i64,
    pub(crate) timestamp: Option<i64>,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) headers: Vec<(String, Option<Vec<u8>>)>,
    pub(crate) value: Option<Vec<u8>>,
}

/// Up to `limit` records of one partition from `from`. Blocking (librdkafka):
/// call it off the async workers.
pub(crate) fn browse(
    client: &ClientArgs,
    topic: &str,
    partition: i32,
    from: From,
    limit: usize,
) -> Result<Vec<Record>> {
    let limit = limit.clamp(1, MAX_BROWSE);
    let mut config = client.config();
    config
        .set("group.id", "sluice-console")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("allow.auto.create.topics", "false")
        .set("enable.partition.eof", "true");
    let consumer: BaseConsumer = config
        .create()
        .context("cannot create a Kafka client for the console")?;
    let start = match from {
        From::Offset(o) => Offset::Offset(o.max(0)),
        From::Time(ms) => {
            let mut q = TopicPartitionList::new();
            q.add_partition_offset(topic, partition, Offset::Offset(ms))?;
            let found = consumer
                .offsets_for_times(q, crate::cli::REQUEST_TIMEOUT)
                .context("cannot look up an offset by time")?;
            match found.find_partition(topic, partition).map(|e| e.offset()) {
                Some(Offset::Offset(o)) if o >= 0 => Offset::Offset(o),
                // Nothing at or after that time.
                _ => return Ok(Vec::new()),
            }
        }
    };
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, partition, start)?;
    consumer.assign(&assignment)?;
    let deadline = Instant::now() + BROWSE_WAIT;
    let mut out = Vec::new();
    while out.len() < limit {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match consumer.poll(left) {
            None => break,
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => break,
            Some(Err(e)) => return Err(anyhow!("cannot read {topic}/{partition}: {e}")),
            Some(Ok(m)) => out.push(Record {
                offset: m.offset(),
                timestamp: m.timestamp().to_millis(),
                key: m.key().map(<[u8]>::to_vec),
                headers: m
                    .headers()
                    .map(|hs| {
                        hs.iter()
                            .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                            .collect()
                    })
                    .unwrap_or_default(),
                value: m.payload().map(<[u8]>::to_vec),
            }),
        }
    }
    Ok(out)
}

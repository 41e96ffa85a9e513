//! Consumers: assign-style (no group), partition p goes to consumer
//! p % consumers, and each consumer runs one Fetch loop per partition
//! leader, for all its partitions on that leader.
//!
//! Records are counted from RecordBatch headers, not decoded; only e2e
//! mode decodes records, to read the send time each value carries.

use sluice_vocab::ErrorCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::{ApiKey, BrokerId, FetchRequest};
use kafka_protocol::records::RecordBatchDecoder;
use sluice_client::Connection;

use crate::cluster::{self, topic_name, Cluster};
use crate::report::Stats;
use crate::schedule::Counters;
use crate::{BenchConfig, BenchError};

/// RecordBatch v2 header size: a batch is never smaller.
const HEADER_LEN: usize = 61;
/// Bytes before the part a batch's length counts (base offset, length).
const LOG_OVERHEAD: usize = 12;
/// Control batches (transaction markers) hold no data records.
const ATTR_CONTROL: i16 = 1 << 5;
/// Fetch v12 is the last version that names topics (v13+ uses ids).
const FETCH_MIN: i16 = 4;
const FETCH_MAX: i16 = 12;
/// Bytes per response of one fetch (per partition: `--fetch-bytes`).
const RESPONSE_MAX_BYTES: i32 = 64 << 20;
/// Long-poll bound; with min_bytes 1 a fetch returns as soon as data exists.
const MAX_WAIT_MS: i32 = 100;

/// What the consumers read and when they stop.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    /// First offset to read, per partition.
    pub start_offsets: Vec<i64>,
    /// Stop each partition here (consume mode); None reads on (e2e).
    pub end_offsets: Option<Vec<i64>>,
    /// Decode records and measure end-to-end latency.
    pub e2e: bool,
    /// Stop once this many records have been consumed over all consumers.
    pub target: Arc<AtomicU64>,
    pub duration: Option<Duration>,
}

/// One fetch loop: a consumer's partitions on one leader.
pub(crate) struct FetchTask {
    conn: Connection,
    topic: String,
    fetch_bytes: i32,
    version: i16,
    partitions: Vec<i32>,
}

pub(crate) async fn connect_all(
    cfg: &BenchConfig,
    cluster: &Cluster,
) -> Result<Vec<FetchTask>, BenchError> {
    let consumers = cfg.consumers.max(1);
    let mut tasks = Vec::new();
    for c in 0..consumers {
        for node in cluster.leader_nodes() {
            let partitions: Vec<i32> = cluster
                .partitions_led_by(node)
                .into_iter()
                .filter(|p| *p as usize % consumers == c)
                .collect();
            if partitions.is_empty() {
                continue;
            }
            let conn = cluster::connect(cluster.address(node)?).await?;
            let version = conn.versions().pick(ApiKey::Fetch, FETCH_MIN, FETCH_MAX)?;
            tasks.push(FetchTask {
                conn,
                topic: cluster.topic.clone(),
                fetch_bytes: i32::try_from(cfg.fetch_bytes).unwrap_or(i32::MAX),
                version,
                partitions,
            });
        }
    }
    Ok(tasks)
}

/// What the consumers did (`last_done`: start to the last record consumed).
pub(crate) type ConsumeOutcome = crate::Outcome;

pub(crate) async fn run_consumers(
    tasks: Vec<FetchTask>,
    plan: &Plan,
    start: Instant,
    counters: Arc<Counters>,
) -> Result<ConsumeOutcome, BenchError> {
    let handles: Vec<_> = tasks
        .into_iter()
        .map(|t| tokio::spawn(fetch_loop(t, plan.clone(), start, counters.clone())))
        .collect();
    crate::join_outcomes(handles, "consumer").await
}

struct Cursor {
    partition: i32,
    offset: i64,
    end: Option<i64>,
}

async fn fetch_loop(
    mut task: FetchTask,
    plan: Plan,
    start: Instant,
    counters: Arc<Counters>,
) -> Result<ConsumeOutcome, BenchError> {
    let mut cursors: Vec<Cursor> = task
        .partitions
        .iter()
        .map(|&p| {
            let i = p as usize;
            Cursor {
                partition: p,
                offset: plan.start_offsets.get(i).copied().unwrap_or(0),
                end: plan.end_offsets.as_ref().and_then(|e| e.get(i).copied()),
            }
        })
        .collect();
    let mut out = ConsumeOutcome {
        records: 0,
        last_done: Duration::ZERO,
        stats: Stats::new(),
        commits: crate::Commits::default(),
    };
    loop {
        if counters.completed.load(Ordering::Relaxed) >= plan.target.load(Ordering::Relaxed) {
            break;
        }
        if plan.duration.is_some_and(|d| start.elapsed() >= d) {
            break;
        }
        if cursors.iter().all(|c| c.end.is_some_and(|e| c.offset >= e)) {
            break;
        }
        let req = fetch_request(&task.topic, &cursors, task.fetch_bytes);
        counters.requests_in_flight.fetch_add(1, Ordering::Relaxed);
        let sent_at = start.elapsed();
        let resp = task.conn.call(&req, task.version).await;
        let now = start.elapsed();
        counters.requests_in_flight.fetch_sub(1, Ordering::Relaxed);
        let resp = resp?;
        if let Err(code) = ErrorCode::check(resp.error_code) {
            return Err(BenchError::Broker {
                what: "Fetch".into(),
                code,
            });
        }
        let now_ns = now.as_nanos() as u64;
        let mut got = 0u64;
        for t in &resp.responses {
            for pd in &t.partitions {
                if let Err(code) = ErrorCode::check(pd.error_code) {
                    return Err(BenchError::Broker {
                        what: format!("Fetch partition {}", pd.partition_index),
                        code,
                    });
                }
                let Some(cursor) = cursors
                    .iter_mut()
                    .find(|c| c.partition == pd.partition_index)
                else {
                    continue;
                };
                let Some(records) = pd.records.as_ref().filter(|r| !r.is_empty()) else {
                    continue;
                };
                let from = cursor.offset;
                let stats = &mut out.stats;
                let (n, next) = if plan.e2e {
                    walk_batches(records, from, |batch| {
                        decode_latencies(batch, from, now_ns, stats)
                    })?
                } else {
                    count_records(records, from)?
                };
                if next == from {
                    return Err(BenchError::Protocol(format!(
                        "fetch of partition {} at offset {from} returned no complete batch",
                        pd.partition_index
                    )));
                }
                cursor.offset = next;
                got += n;
            }
        }
        if !plan.e2e {
            out.stats
                .record(now.saturating_sub(sent_at).as_nanos() as u64);
        }
        if got > 0 {
            out.records += got;
            out.last_done = now;
            counters.completed.fetch_add(got, Ordering::Relaxed);
        }
    }
    Ok(out)
}

/// The RecordBatch header fields that counting needs, at the offsets of
/// Kafka's v2 layout (the magic byte sits at the same place in v0 and v1
/// message sets, so older formats are recognised and refused).
struct BatchHeader {
    base_offset: i64,
    /// Bytes after the first [`LOG_OVERHEAD`].
    batch_length: i32,
    magic: i8,
    attributes: i16,
    last_offset_delta: i32,
    records_count: i32,
}

impl BatchHeader {
    /// None when `buf` is shorter than a header.
    fn parse(buf: &[u8]) -> Option<BatchHeader> {
        let h = buf.get(..HEADER_LEN)?;
        let at = |from: usize, to: usize| h.get(from..to);
        Some(BatchHeader {
            base_offset: i64::from_be_bytes(at(0, 8)?.try_into().ok()?),
            batch_length: i32::from_be_bytes(at(8, 12)?.try_into().ok()?),
            magic: i8::from_be_bytes(at(16, 17)?.try_into().ok()?),
            attributes: i16::from_be_bytes(at(21, 23)?.try_into().ok()?),
            last_offset_delta: i32::from_be_bytes(at(23, 27)?.try_into().ok()?),
            records_count: i32::from_be_bytes(at(57, 61)?.try_into().ok()?),
        })
    }

    /// Total size of the batch in bytes (header included).
    fn size(&self) -> usize {
        LOG_OVERHEAD + self.batch_length.max(0) as usize
    }

    fn last_offset(&self) -> i64 {
        self.base_offset + i64::from(self.last_offset_delta)
    }

    fn is_control(&self) -> bool {
        self.attributes & ATTR_CONTROL != 0
    }
}

/// Walks the complete RecordBatches at the start of `records` (a fetch
/// answer may end with a partial batch, which is left for the next fetch).
/// Calls `on_batch` with the bytes of each complete data batch. Returns
/// the records at or after `fetch_offset` (control batches and records
/// before `fetch_offset` excluded) and the next offset to fetch.
fn walk_batches<F>(
    records: &Bytes,
    fetch_offset: i64,
    mut on_batch: F,
) -> Result<(u64, i64), BenchError>
where
    F: FnMut(Bytes) -> Result<(), BenchError>,
{
    let mut pos = 0usize;
    let mut count = 0u64;
    let mut next = fetch_offset;
    while let Some(h) = records.get(pos..).and_then(BatchHeader::parse) {
        let size = h.size();
        let end = pos + size;
        if end > records.len() {
            break;
        }
        if h.magic != 2 {
            return Err(BenchError::Unsupported(format!(
                "message format v{} at offset {} (only RecordBatch v2 is read)",
                h.magic, h.base_offset
            )));
        }
        if size < HEADER_LEN {
            return Err(BenchError::Protocol(format!(
                "batch at offset {} declares {size} bytes",
                h.base_offset
            )));
        }
        if !h.is_control() && h.last_offset() >= fetch_offset {
            count += if h.base_offset >= fetch_offset {
                h.records_count.max(0) as u64
            } else {
                (h.last_offset() - fetch_offset + 1) as u64
            };
            on_batch(records.slice(pos..end))?;
        }
        next = next.max(h.last_offset() + 1);
        pos = end;
    }
    Ok((count, next))
}

/// Counts the records of a fetch answer from batch headers only.
pub fn count_records(records: &Bytes, fetch_offset: i64) -> Result<(u64, i64), BenchError> {
    walk_batches(records, fetch_offset, |_| Ok(()))
}

fn decode_latencies(
    batch: Bytes,
    fetch_offset: i64,
    now_ns: u64,
    stats: &mut Stats,
) -> Result<(), BenchError> {
    let mut b = batch;
    let set = RecordBatchDecoder::decode(&mut b)
        .map_err(|e| BenchError::Protocol(format!("decoding a fetched batch: {e}")))?;
    for r in &set.records {
        if r.offset < fetch_offset || r.control {
            continue;
        }
        let sent = r
            .value
            .as_ref()
            .and_then(|v| v.get(..8))
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_be_bytes);
        if let Some(sent) = sent {
            stats.record(now_ns.saturating_sub(sent));
        }
    }
    Ok(())
}

fn fetch_request(topic: &str, cursors: &[Cursor], partition_max_bytes: i32) -> FetchRequest {
    let partitions = cursors
        .iter()
        .filter(|c| c.end.is_none_or(|e| c.offset < e))
        .map(|c| {
            FetchPartition::default()
                .with_partition(c.partition)
                .with_current_leader_epoch(-1)
                .with_fetch_offset(c.offset)
                .with_last_fetched_epoch(-1)
                .with_log_start_offset(-1)
                .with_partition_max_bytes(partition_max_bytes)
        })
        .collect();
    FetchRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_max_wait_ms(MAX_WAIT_MS)
        .with_min_bytes(1)
        .with_max_bytes(RESPONSE_MAX_BYTES)
        .with_isolation_level(0)
        .with_session_id(0)
        .with_session_epoch(-1)
        .with_topics(vec![FetchTopic::default()
            .with_topic(topic_name(topic))
            .with_partitions(partitions)])
}

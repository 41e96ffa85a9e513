//! Producers: one task per producer, one connection per partition leader,
//! up to `max_in_flight` pipelined Produce requests per connection, and a
//! reader task per connection that takes the acknowledgements in order.
//!
//! Batches are sticky: a producer fills one RecordBatch for one partition,
//! sends it, and moves to the next partition (Kafka's sticky partitioner
//! for records without a key). A batch is encoded once; its values live in
//! one buffer per batch that every record's value slices, so there is no
//! allocation per record.

use sluice_vocab::ErrorCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::indexmap::IndexMap;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{ApiKey, ProduceRequest, TopicName};
use kafka_protocol::records::{
    Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType, NO_PARTITION_LEADER_EPOCH,
    NO_PRODUCER_EPOCH, NO_PRODUCER_ID,
};
use sluice_client::{ReadHalf, WriteHalf};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::cluster::{self, topic_name, Cluster};
use crate::report::{Commits, Stats};
use crate::schedule::{Counters, Schedule};
use crate::txn::{Identity, Stamp};
use crate::{Acks, BenchConfig, BenchError, Delivery};

/// Produce versions used: v3 is the first with RecordBatch v2; v12+ belongs
/// to transactions v2 and v13+ names topics by id.
const PRODUCE_MIN: i16 = 3;
const PRODUCE_MAX: i16 = 11;

/// Per-record bytes a RecordBatch adds around a value (length, attributes,
/// timestamp and offset deltas, null key, value length, header count), an
/// upper bound for values below 16 KiB; used to size batches.
const RECORD_OVERHEAD: usize = 12;
/// RecordBatch v2 header.
const BATCH_HEADER: usize = 61;
/// A record's key with `--keys`: its index among the keys, u64 big endian.
const KEY_BYTES: usize = 8;

/// One connection of one producer, before its reader is started.
pub(crate) struct Link {
    node: i32,
    reader: ReadHalf,
    writer: WriteHalf,
    version: i16,
}

/// What one producer needs before the clock starts: a connection per
/// leader node and, unless plain, its producer id.
pub(crate) struct Connected {
    links: Vec<Link>,
    identity: Option<Identity>,
}

/// Connections (and identities) of every producer.
pub(crate) async fn connect_all(
    cfg: &BenchConfig,
    cluster: &Cluster,
) -> Result<Vec<Connected>, BenchError> {
    let mut all = Vec::with_capacity(cfg.producers);
    // Unique per run, so no earlier run's producer is fenced or waited for.
    let run = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    for idx in 0..cfg.producers {
        let identity = match cfg.delivery {
            Delivery::Plain => None,
            Delivery::Idempotent => Some(Identity::idempotent(cluster).await?),
            Delivery::Transactional { .. } => {
                let id = format!("sluice-bench-{}-{run}-{idx}", std::process::id());
                Some(Identity::transactional(cluster, &id).await?)
            }
        };
        let mut links = Vec::new();
        for node in cluster.leader_nodes() {
            let conn = cluster::connect(cluster.address(node)?).await?;
            let version = conn
                .versions()
                .pick(ApiKey::Produce, PRODUCE_MIN, PRODUCE_MAX)?;
            let (reader, writer) = conn.into_split();
            links.push(Link {
                node,
                reader,
                writer,
                version,
            });
        }
        all.push(Connected { links, identity });
    }
    Ok(all)
}

/// What the producers did (`last_done`: start to the last acknowledgement).
pub(crate) type ProduceOutcome = crate::Outcome;

pub(crate) async fn run_producers(
    cfg: &BenchConfig,
    cluster: &Arc<Cluster>,
    producers: Vec<Connected>,
    schedules: &[Schedule],
    start: Instant,
    counters: Arc<Counters>,
) -> Result<ProduceOutcome, BenchError> {
    let mut tasks = Vec::with_capacity(producers.len());
    for (idx, (conns, schedule)) in producers.into_iter().zip(schedules).enumerate() {
        let mut p = Producer::new(cfg, cluster, idx, *schedule, start, counters.clone());
        p.identity = conns.identity;
        tasks.push(tokio::spawn(p.run(conns.links)));
    }
    crate::join_outcomes(tasks, "producer").await
}

/// A request in flight, in the order sent on its connection.
struct Pending {
    correlation_id: i32,
    partition: i32,
    /// Schedule index of the batch's first record.
    first: u64,
    count: u32,
    /// Closed loop: when the batch was started (ns after the start).
    created_ns: u64,
    /// Returned to the connection's window when the answer is in.
    _permit: OwnedSemaphorePermit,
}

/// The per-connection state the producer loop writes through.
struct Writer {
    writer: WriteHalf,
    version: i16,
    window: Arc<Semaphore>,
    /// Acknowledgements (None with acks=0).
    pending: Option<mpsc::UnboundedSender<Pending>>,
}

struct Producer {
    topic: TopicName,
    acks: Acks,
    /// Leader node per partition.
    leaders: Vec<i32>,
    first_partition: usize,
    schedule: Schedule,
    start: Instant,
    counters: Arc<Counters>,
    max_in_flight: usize,
    linger: Duration,
    builder: BatchBuilder,
    /// Records per batch.
    capacity: u64,
    /// Producer id and sequences, unless plain.
    identity: Option<Identity>,
    /// When a transaction is committed.
    commit_every: Option<(Duration, Option<u64>)>,
    /// Latency of each commit.
    commits: Commits,
}

/// The transaction a transactional producer has open.
#[derive(Clone, Copy)]
struct OpenTxn {
    since: Duration,
    records: u64,
}

/// Result of one producer.
impl Producer {
    fn new(
        cfg: &BenchConfig,
        cluster: &Cluster,
        idx: usize,
        schedule: Schedule,
        start: Instant,
        counters: Arc<Counters>,
    ) -> Producer {
        // A key adds its 8 bytes (its length varint is in the overhead).
        let key_bytes = if cfg.keys.is_some() { KEY_BYTES } else { 0 };
        let capacity = (cfg.batch_bytes.saturating_sub(BATCH_HEADER)
            / (cfg.record_size + RECORD_OVERHEAD + key_bytes))
            .max(1);
        Producer {
            topic: topic_name(&cluster.topic),
            acks: cfg.acks,
            leaders: cluster.leaders.clone(),
            first_partition: idx % cluster.leaders.len().max(1),
            schedule,
            start,
            counters,
            max_in_flight: cfg.max_in_flight,
            linger: cfg.linger,
            builder: BatchBuilder::new(cfg.record_size, cfg.compression).with_keys(cfg.keys),
            capacity: capacity as u64,
            identity: None,
            commit_every: match cfg.delivery {
                Delivery::Transactional {
                    commit_interval,
                    commit_records,
                } => Some((commit_interval, commit_records)),
                Delivery::Plain | Delivery::Idempotent => None,
            },
            commits: Commits::default(),
        }
    }

    fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Records that may join a batch now, given `next` is the next index.
    fn available(&self, next: u64, elapsed: Duration) -> u64 {
        match self.schedule.due(elapsed) {
            Some(due) => due.saturating_sub(next),
            None if self.schedule.finished(next, elapsed) => 0,
            None => self
                .schedule
                .total
                .map_or(u64::MAX, |t| t.saturating_sub(next)),
        }
    }

    async fn run(mut self, links: Vec<Link>) -> Result<ProduceOutcome, BenchError> {
        let mut writers = Vec::with_capacity(links.len());
        let mut readers = Vec::with_capacity(links.len());
        let mut node_of = Vec::with_capacity(links.len());
        for link in links {
            let window = Arc::new(Semaphore::new(self.max_in_flight));
            let pending = if self.acks == Acks::None {
                // The broker sends nothing back; keep the read half open.
                readers.push(tokio::spawn(async move {
                    let _keep = link.reader;
                    Ok::<_, BenchError>((Stats::new(), Duration::ZERO))
                }));
                None
            } else {
                let (tx, rx) = mpsc::unbounded_channel();
                let acker = AckReader {
                    version: link.version,
                    schedule: self.schedule,
                    start: self.start,
                    counters: self.counters.clone(),
                };
                readers.push(tokio::spawn(acker.run(link.reader, rx)));
                Some(tx)
            };
            node_of.push(link.node);
            writers.push(Writer {
                writer: link.writer,
                version: link.version,
                window,
                pending,
            });
        }
        // Writer index per partition.
        let route: Vec<usize> = self
            .leaders
            .iter()
            .map(|l| node_of.iter().position(|n| n == l).unwrap_or(0))
            .collect();

        let sent = self.produce_loop(&mut writers, &route).await;
        // Closing the pending queues ends the readers once they have
        // taken every outstanding acknowledgement.
        let mut local = Stats::new();
        let mut last_done = Duration::ZERO;
        for w in &mut writers {
            w.pending = None;
        }
        if let Ok((_, stats, last)) = &sent {
            local = stats.clone();
            last_done = *last;
        }
        let mut first_err = sent
            .as_ref()
            .err()
            .map(|e| BenchError::Incomplete(e.to_string()));
        for r in readers {
            match r.await {
                Ok(Ok((stats, last))) => {
                    local.merge(&stats);
                    last_done = last_done.max(last);
                }
                // A reader's error explains a writer's "queue closed".
                Ok(Err(e)) => first_err = Some(e),
                Err(join) => {
                    first_err.get_or_insert(BenchError::Incomplete(format!(
                        "ack reader failed: {join}"
                    )));
                }
            }
        }
        drop(writers);
        match (first_err, sent) {
            (Some(e), _) => Err(e),
            (None, Ok((records, _, _))) => Ok(ProduceOutcome {
                records,
                last_done,
                stats: local,
                commits: std::mem::take(&mut self.commits),
            }),
            (None, Err(e)) => Err(e),
        }
    }

    /// Sends every record of the schedule. Returns (records sent, latency
    /// stats recorded here (acks=0 only), last completion).
    async fn produce_loop(
        &mut self,
        writers: &mut [Writer],
        route: &[usize],
    ) -> Result<(u64, Stats, Duration), BenchError> {
        let tokio_start = tokio::time::Instant::from_std(self.start);
        let nparts = self.leaders.len().max(1);
        let mut partition = self.first_partition;
        let mut next: u64 = 0;
        let mut batch_first: u64 = 0;
        let mut batch_len: u64 = 0;
        let mut batch_open = Duration::ZERO;
        let mut local = Stats::new();
        let mut last_done = Duration::ZERO;
        let mut txn: Option<OpenTxn> = None;
        let transactional_id = self.identity.as_ref().and_then(Identity::transactional_id);
        loop {
            let elapsed = self.elapsed();
            if let (Some(open), Some((interval, records))) = (txn, self.commit_every) {
                let due = elapsed >= open.since + interval
                    || records.is_some_and(|r| open.records >= r)
                    || self.schedule.finished(next, elapsed);
                if due && batch_len == 0 {
                    self.commit(writers).await?;
                    last_done = last_done.max(self.elapsed());
                    txn = None;
                    continue;
                }
            }
            let add = self.available(next, elapsed).min(self.capacity - batch_len);
            if add > 0 {
                if batch_len == 0 {
                    batch_first = next;
                    batch_open = elapsed;
                }
                next += add;
                batch_len += add;
                if self.schedule.rate.is_none() {
                    self.counters.started.fetch_add(add, Ordering::Relaxed);
                }
            }
            let done = self.schedule.finished(next, elapsed);
            if batch_len == 0 {
                if done {
                    break;
                }
                // Open loop, nothing due yet.
                let wait = self.schedule.wait_for(next, elapsed);
                tokio::time::sleep_until(tokio_start + elapsed + wait).await;
                continue;
            }
            let full = batch_len >= self.capacity;
            let lingered = elapsed >= batch_open + self.linger;
            if !(full || done || lingered) {
                let wake =
                    (batch_open + self.linger).min(elapsed + self.schedule.wait_for(next, elapsed));
                tokio::time::sleep_until(tokio_start + wake).await;
                continue;
            }
            if self.commit_every.is_some() && txn.is_none() {
                if let Some(identity) = self.identity.as_mut() {
                    identity.begin(self.topic.0.as_str(), nparts as u32).await?;
                }
                txn = Some(OpenTxn {
                    since: self.elapsed(),
                    records: 0,
                });
            }
            let w = route
                .get(partition)
                .and_then(|i| writers.get_mut(*i))
                .ok_or_else(|| {
                    BenchError::Protocol(format!("no connection for partition {partition}"))
                })?;
            let permit = match w.window.clone().try_acquire_owned() {
                Ok(p) => p,
                // Keep filling the batch while the window is full, as long
                // as it has room and records keep coming.
                Err(_) if !(full || done || self.schedule.rate.is_none()) => {
                    let wait = self
                        .schedule
                        .wait_for(next, elapsed)
                        .max(Duration::from_micros(100));
                    tokio::select! {
                        p = w.window.clone().acquire_owned() => p.map_err(|_| closed())?,
                        _ = tokio::time::sleep(wait) => continue,
                    }
                }
                Err(_) => w
                    .window
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| closed())?,
            };
            let created_ns = batch_open.as_nanos() as u64;
            let count = u32::try_from(batch_len).unwrap_or(u32::MAX);
            let stamp = match self.identity.as_mut() {
                Some(identity) => identity.next(partition, count),
                None => Stamp::PLAIN,
            };
            let batch =
                self.builder
                    .build(batch_first, batch_len, &self.schedule, created_ns, stamp)?;
            let req = ProduceRequest::default()
                .with_transactional_id(transactional_id.clone())
                .with_acks(self.acks.wire())
                .with_timeout_ms(30_000)
                .with_topic_data(vec![TopicProduceData::default()
                    .with_name(self.topic.clone())
                    .with_partition_data(vec![PartitionProduceData::default()
                        .with_index(partition as i32)
                        .with_records(Some(batch))])]);
            let correlation_id = w.writer.send(&req, w.version).await?;
            drop(req);
            if let Some(open) = txn.as_mut() {
                open.records += batch_len;
            }
            if let Some(tx) = &w.pending {
                // Queued once written: the reader takes an answer only
                // after its entry is queued, so an early one waits in the
                // socket.
                tx.send(Pending {
                    correlation_id,
                    partition: partition as i32,
                    first: batch_first,
                    count,
                    created_ns,
                    _permit: permit,
                })
                .map_err(|_| closed())?;
            } else {
                drop(permit);
                let now = self.elapsed();
                record_batch(
                    &mut local,
                    &self.schedule,
                    batch_first,
                    count,
                    created_ns,
                    now,
                );
                self.counters
                    .completed
                    .fetch_add(batch_len, Ordering::Relaxed);
                last_done = now;
            }
            batch_len = 0;
            partition = (partition + 1) % nparts;
        }
        if txn.is_some() {
            self.commit(writers).await?;
            last_done = last_done.max(self.elapsed());
        }
        Ok((next, local, last_done))
    }

    /// Waits for every batch in flight to be acknowledged (by taking every
    /// connection's whole window), then commits the transaction.
    async fn commit(&mut self, writers: &[Writer]) -> Result<(), BenchError> {
        let Some(identity) = self.identity.as_mut() else {
            return Ok(());
        };
        let t0 = self.start.elapsed();
        let window = u32::try_from(self.max_in_flight).unwrap_or(u32::MAX);
        let mut drained = Vec::with_capacity(writers.len());
        for w in writers {
            drained.push(
                w.window
                    .clone()
                    .acquire_many_owned(window)
                    .await
                    .map_err(|_| closed())?,
            );
        }
        let t1 = self.start.elapsed();
        identity.commit().await?;
        drop(drained);
        let t2 = self.start.elapsed();
        let ns = |d: Duration| d.as_nanos() as u64;
        self.commits.end_txn.record(ns(t2.saturating_sub(t1)));
        self.commits.with_flush.record(ns(t2.saturating_sub(t0)));
        Ok(())
    }
}

fn closed() -> BenchError {
    BenchError::Incomplete("a connection's acknowledgement reader stopped".into())
}

/// Records the latency of each record of a batch completed at `now`: from
/// its intended send time (open loop) or from when the batch was started.
fn record_batch(
    stats: &mut Stats,
    schedule: &Schedule,
    first: u64,
    count: u32,
    created_ns: u64,
    now: Duration,
) {
    let now_ns = now.as_nanos() as u64;
    if schedule.rate.is_some() {
        for i in first..first + u64::from(count) {
            let at = schedule.intended_ns(i).unwrap_or(created_ns);
            stats.record(now_ns.saturating_sub(at));
        }
    } else {
        stats.record_n(now_ns.saturating_sub(created_ns), u64::from(count));
    }
}

/// Takes a connection's Produce responses in order.
struct AckReader {
    version: i16,
    schedule: Schedule,
    start: Instant,
    counters: Arc<Counters>,
}

impl AckReader {
    async fn run(
        self,
        mut reader: ReadHalf,
        mut rx: mpsc::UnboundedReceiver<Pending>,
    ) -> Result<(Stats, Duration), BenchError> {
        let mut stats = Stats::new();
        let mut last = Duration::ZERO;
        while let Some(p) = rx.recv().await {
            let resp = reader
                .recv::<ProduceRequest>(self.version, p.correlation_id)
                .await?;
            let now = self.start.elapsed();
            let mut answered = false;
            for t in &resp.responses {
                for part in &t.partition_responses {
                    if part.index == p.partition {
                        answered = true;
                    }
                    if let Err(code) = ErrorCode::check(part.error_code) {
                        return Err(BenchError::Broker {
                            what: format!(
                                "Produce to partition {}{}",
                                part.index,
                                part.error_message
                                    .as_ref()
                                    .map(|m| format!(" ({})", m.as_str()))
                                    .unwrap_or_default()
                            ),
                            code,
                        });
                    }
                }
            }
            if !answered {
                return Err(BenchError::Protocol(format!(
                    "produce answer without partition {}",
                    p.partition
                )));
            }
            record_batch(
                &mut stats,
                &self.schedule,
                p.first,
                p.count,
                p.created_ns,
                now,
            );
            self.counters
                .completed
                .fetch_add(u64::from(p.count), Ordering::Relaxed);
            last = now;
        }
        Ok((stats, last))
    }
}

/// Builds RecordBatch v2 bytes with the crate's encoder, reusing the record
/// structs and the output buffer from batch to batch.
pub(crate) struct BatchBuilder {
    records: Vec<Record>,
    /// The fixed value; its first 8 bytes are replaced per record.
    payload: Vec<u8>,
    options: RecordEncodeOptions,
    values: BytesMut,
    /// Record i's key is `i % keys` as 8 bytes, when set.
    keys: Option<u64>,
    key_bytes: BytesMut,
    out: BytesMut,
}

impl BatchBuilder {
    pub(crate) fn new(
        record_size: usize,
        compression: kafka_protocol::records::Compression,
    ) -> Self {
        // Letters from a fixed xorshift sequence: not all one byte, so the
        // payload is not trivially compressible within a record (records
        // of a batch share it, as identical payloads would in any test).
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let payload = (0..record_size)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b'A' + (x % 26) as u8
            })
            .collect();
        BatchBuilder {
            records: Vec::new(),
            payload,
            options: RecordEncodeOptions {
                version: 2,
                compression,
            },
            values: BytesMut::new(),
            keys: None,
            key_bytes: BytesMut::new(),
            out: BytesMut::new(),
        }
    }

    /// Records get one of `keys` keys in turn (none when `None`).
    pub(crate) fn with_keys(mut self, keys: Option<u64>) -> Self {
        self.keys = keys.filter(|k| *k > 0);
        self
    }

    /// Encodes records `first..first+len` of `schedule`; each value starts
    /// with its intended send time (ns after the start, big endian).
    pub(crate) fn build(
        &mut self,
        first: u64,
        len: u64,
        schedule: &Schedule,
        created_ns: u64,
        stamp: Stamp,
    ) -> Result<Bytes, BenchError> {
        let n = usize::try_from(len).map_err(|_| BenchError::Config("batch too large".into()))?;
        let size = self.payload.len();
        let tail = self.payload.get(8..).unwrap_or_default();
        // Reuses the previous batch's allocation: every slice of it was
        // released after that batch was encoded.
        self.values.clear();
        self.values.reserve(n * size);
        for i in first..first + len {
            self.values
                .put_u64(schedule.intended_ns(i).unwrap_or(created_ns));
            self.values.put_slice(tail);
        }
        let values = self.values.split().freeze();
        // Keys live in one buffer per batch too: no allocation per record.
        self.key_bytes.clear();
        if let Some(k) = self.keys {
            self.key_bytes.reserve(n * KEY_BYTES);
            for i in first..first + len {
                self.key_bytes.put_u64(i % k);
            }
        }
        let keys = self.key_bytes.split().freeze();
        let wall_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        while self.records.len() < n {
            let j = self.records.len();
            self.records.push(Record {
                transactional: false,
                control: false,
                delete_horizon: false,
                partition_leader_epoch: NO_PARTITION_LEADER_EPOCH,
                producer_id: NO_PRODUCER_ID,
                producer_epoch: NO_PRODUCER_EPOCH,
                timestamp_type: TimestampType::Creation,
                offset: j as i64,
                sequence: -1,
                timestamp: 0,
                key: None,
                value: None,
                headers: IndexMap::new(),
            });
        }
        for (j, r) in self.records.iter_mut().take(n).enumerate() {
            r.value = Some(values.slice(j * size..(j + 1) * size));
            r.key = self
                .keys
                .map(|_| keys.slice(j * KEY_BYTES..(j + 1) * KEY_BYTES));
            r.timestamp = wall_ms;
            r.producer_id = stamp.producer_id;
            r.producer_epoch = stamp.epoch;
            r.transactional = stamp.transactional;
            // The encoder keeps records in one batch while offset - sequence
            // is constant and takes the first record's as the base sequence
            // (-1: not idempotent).
            r.sequence = if stamp.base_sequence < 0 {
                j as i32 - 1
            } else {
                stamp.base_sequence.wrapping_add(j as i32)
            };
        }
        let records = self.records.get(..n).unwrap_or_default();
        let encoded = RecordBatchEncoder::encode(&mut self.out, records, &self.options)
            .map_err(|e| BenchError::Protocol(format!("encoding a record batch: {e}")));
        for r in self.records.iter_mut().take(n) {
            r.value = None;
            r.key = None;
        }
        drop(values);
        drop(keys);
        encoded?;
        Ok(self.out.split().freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::records::{Compression, RecordBatchDecoder};

    #[test]
    fn batches_carry_intended_times_and_decode() {
        for c in [Compression::None, Compression::Zstd, Compression::Lz4] {
            let mut b = BatchBuilder::new(100, c);
            let s = Schedule {
                rate: Some(1000.0),
                total: None,
                duration: None,
            };
            let bytes = b.build(10, 5, &s, 0, Stamp::PLAIN).unwrap();
            // One batch (checksum verified by the decoder), counted as 5.
            assert_eq!(
                RecordBatchDecoder::decode_all(&mut bytes.clone())
                    .unwrap()
                    .len(),
                1
            );
            assert_eq!(crate::count_records(&bytes, 0).unwrap(), (5, 5));
            let mut buf = bytes.clone();
            let set = RecordBatchDecoder::decode(&mut buf).unwrap();
            assert_eq!(set.records.len(), 5);
            for (k, r) in set.records.iter().enumerate() {
                let v = r.value.as_ref().unwrap();
                assert_eq!(v.len(), 100);
                let t = u64::from_be_bytes(v[..8].try_into().unwrap());
                assert_eq!(t, (10 + k as u64) * 1_000_000, "{c:?}");
            }
            // Closed loop: every record carries the batch's start time.
            let closed = Schedule {
                rate: None,
                total: Some(3),
                duration: None,
            };
            let mut buf = b.build(0, 3, &closed, 777, Stamp::PLAIN).unwrap();
            let set = RecordBatchDecoder::decode(&mut buf).unwrap();
            assert!(set
                .records
                .iter()
                .all(|r| r.value.as_ref().unwrap()[..8] == 777u64.to_be_bytes()));
        }
    }

    #[test]
    fn batches_carry_the_producer_stamp() {
        let mut b = BatchBuilder::new(20, Compression::None);
        let s = Schedule {
            rate: None,
            total: None,
            duration: None,
        };
        let stamp = Stamp {
            producer_id: 7,
            epoch: 3,
            base_sequence: 40,
            transactional: true,
        };
        let mut buf = b.build(0, 4, &s, 1, stamp).unwrap();
        let set = RecordBatchDecoder::decode(&mut buf).unwrap();
        assert_eq!(set.records.len(), 4);
        for (j, r) in set.records.iter().enumerate() {
            assert_eq!((r.producer_id, r.producer_epoch), (7, 3));
            assert_eq!(r.sequence, 40 + j as i32);
            assert!(r.transactional && !r.control);
        }
        // The next plain batch from the same builder carries none of it.
        let mut buf = b.build(4, 4, &s, 1, Stamp::PLAIN).unwrap();
        let set = RecordBatchDecoder::decode(&mut buf).unwrap();
        assert!(set
            .records
            .iter()
            .all(|r| r.producer_id == -1 && !r.transactional));
    }

    #[test]
    fn records_take_the_keys_in_turn() {
        let mut b = BatchBuilder::new(20, Compression::None).with_keys(Some(3));
        let s = Schedule {
            rate: None,
            total: None,
            duration: None,
        };
        let mut buf = b.build(5, 4, &s, 1, Stamp::PLAIN).unwrap();
        let set = RecordBatchDecoder::decode(&mut buf).unwrap();
        let keys: Vec<u64> = set
            .records
            .iter()
            .map(|r| u64::from_be_bytes(r.key.as_deref().unwrap().try_into().unwrap()))
            .collect();
        assert_eq!(keys, vec![2, 0, 1, 2]);
        let mut plain = BatchBuilder::new(20, Compression::None);
        let mut buf = plain.build(0, 2, &s, 1, Stamp::PLAIN).unwrap();
        let set = RecordBatchDecoder::decode(&mut buf).unwrap();
        assert!(set.records.iter().all(|r| r.key.is_none()));
    }

    #[test]
    fn buffers_are_reused_from_batch_to_batch() {
        let mut b = BatchBuilder::new(100, Compression::None);
        let s = Schedule {
            rate: None,
            total: None,
            duration: None,
        };
        let first = b.build(0, 1000, &s, 1, Stamp::PLAIN).unwrap();
        let at = first.as_ptr();
        drop(first);
        let second = b.build(1000, 1000, &s, 2, Stamp::PLAIN).unwrap();
        assert_eq!(second.as_ptr(), at, "the encoded batch reuses its buffer");
        // While a batch is still referenced, the next one gets its own bytes.
        let third = b.build(2000, 1000, &s, 3, Stamp::PLAIN).unwrap();
        assert_ne!(third.as_ptr(), second.as_ptr());
        assert_eq!(crate::count_records(&second, 0).unwrap(), (1000, 1000));
        assert_eq!(
            RecordBatchDecoder::decode(&mut second.clone())
                .unwrap()
                .records
                .len(),
            1000
        );
    }

    #[test]
    fn latency_is_taken_from_intended_times() {
        let s = Schedule {
            rate: Some(1000.0),
            total: None,
            duration: None,
        };
        let mut stats = Stats::new();
        // Records 0..4 due at 0,1,2,3 ms, acknowledged at 10 ms.
        record_batch(&mut stats, &s, 0, 4, 0, Duration::from_millis(10));
        assert_eq!(stats.count(), 4);
        assert!((stats.mean_ns() - 8.5e6).abs() < 1.0);
        let closed = Schedule {
            rate: None,
            total: None,
            duration: None,
        };
        let mut stats = Stats::new();
        record_batch(
            &mut stats,
            &closed,
            0,
            4,
            2_000_000,
            Duration::from_millis(10),
        );
        assert_eq!(stats.count(), 4);
        assert!((stats.mean_ns() - 8e6).abs() < 1.0);
    }
}

//! Topics as sources and sinks, through the Kafka protocol (librdkafka for
//! records; `sluice-client` for the transaction-coordinator calls
//! librdkafka does not offer), so a job runs against Sluice or any Kafka
//! cluster alike.
//!
//! - [`KafkaSource`]: subtask `i` of `p` reads the partitions `n` with
//!   `n % p == i`, from its checkpointed offsets, read_committed. Event time
//!   is the record's timestamp; each partition has its own
//!   bounded-out-of-orderness watermark and the subtask's is the least of
//!   its partitions' that are not idle. Bounded mode stops at the end
//!   offsets found at start.
//! - [`KafkaSink`] at least once: an idempotent producer, flushed at every
//!   checkpoint barrier before the subtask acknowledges.
//! - [`KafkaSink`] exactly once (Flink's two-phase commit): the records
//!   between two barriers go in one transaction of a producer of its own
//!   (transactional id `<prefix>-<subtask>-<n>`). At the barrier it is
//!   flushed and *pre-committed*: its producer id and epoch go into the
//!   checkpoint; when the checkpoint completes, it commits. A restored job
//!   commits the pre-committed transactions of its checkpoint with EndTxn
//!   under their ids and epochs, then aborts whatever later transactions
//!   the failed run left open, so read_committed readers are not held back
//!   (also those of subtasks a crashed run at a higher parallelism had,
//!   found by listing the brokers' ongoing transactions).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use sluice_client::txn::{self, ProducerIdentity};
use sluice_client::Connection;

use crate::checkpoint::{CheckpointId, Commit, Cursor};
use crate::operator::Output;
use crate::sink::SuccessCommits;
use crate::source::{Source, SourceContext, SourceStatus};
use crate::{Record, StateReader, StateWriter, StreamError, SubtaskInfo};

/// How long a call to the cluster may take (metadata, flush, commit).
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(60);
/// Records a source subtask emits per poll at most.
const POLL_RECORDS: usize = 1024;
/// How long a poll waits for the first record.
const POLL_WAIT: Duration = Duration::from_millis(50);

fn kafka_error(what: &str, e: impl std::fmt::Display) -> StreamError {
    StreamError::Kafka(format!("{what}: {e}"))
}

/// The name a source subtask's positions take in a checkpoint.
pub(crate) const POSITIONS: &str = "offsets";

/// A record read from a topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KafkaRecord {
    pub partition: i32,
    pub offset: i64,
    /// Milliseconds since the epoch (CreateTime or LogAppendTime).
    pub timestamp: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

/// Where a source starts in a partition it has no checkpointed offset for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartFrom {
    Earliest,
    Latest,
}

/// A topic as a source (Flink's `KafkaSource`); build it, then
/// [`crate::StreamEnv::kafka_source`].
#[derive(Clone, Debug)]
pub struct KafkaSource {
    pub(crate) bootstrap: String,
    pub(crate) topic: String,
    start: StartFrom,
    pub(crate) bounded: bool,
    out_of_orderness_ms: i64,
    idle_after: Option<Duration>,
    properties: Vec<(String, String)>,
    /// In library mode: the partitions come from the group.
    pub(crate) library: Option<Arc<crate::library::Library>>,
}

impl KafkaSource {
    /// Reads `topic` from the cluster at `bootstrap` (`host:port,...`),
    /// from the earliest offsets, unbounded, with watermarks at the
    /// partitions' latest timestamps.
    pub fn new(bootstrap: &str, topic: &str) -> KafkaSource {
        KafkaSource {
            bootstrap: bootstrap.to_owned(),
            topic: topic.to_owned(),
            start: StartFrom::Earliest,
            bounded: false,
            out_of_orderness_ms: 0,
            idle_after: None,
            properties: Vec::new(),
            library: None,
        }
    }

    pub fn start_from(mut self, start: StartFrom) -> Self {
        self.start = start;
        self
    }

    /// Stops at the end offsets the partitions have when the job starts
    /// (Flink's `setBounded(latest)`): the stream then ends.
    pub fn bounded(mut self) -> Self {
        self.bounded = true;
        self
    }

    /// Watermarks trail each partition's largest timestamp by this much.
    pub fn out_of_orderness(mut self, bound: Duration) -> Self {
        self.out_of_orderness_ms = i64::try_from(bound.as_millis()).unwrap_or(i64::MAX);
        self
    }

    /// A partition without records for this long no longer holds the
    /// watermark back (Flink's `withIdleness`).
    pub fn idle_after(mut self, idle: Duration) -> Self {
        self.idle_after = Some(idle);
        self
    }

    /// A librdkafka consumer setting.
    pub fn property(mut self, key: &str, value: &str) -> Self {
        self.properties.push((key.to_owned(), value.to_owned()));
        self
    }
}

/// One partition as a source subtask reads it.
struct PartitionReader {
    /// The next offset to emit.
    next: Option<i64>,
    /// Bounded: the end offset found at start.
    end: Option<i64>,
    max_time: i64,
    last_record: Instant,
}

pub(crate) struct KafkaReader {
    config: KafkaSource,
    info: SubtaskInfo,
    consumer: Option<BaseConsumer>,
    partitions: BTreeMap<i32, PartitionReader>,
    /// Offsets a restore gave, taken when the consumer starts.
    restored: BTreeMap<i32, i64>,
    emitted_watermark: i64,
}

impl KafkaReader {
    pub fn new(config: KafkaSource, info: SubtaskInfo) -> KafkaReader {
        KafkaReader {
            config,
            info,
            consumer: None,
            partitions: BTreeMap::new(),
            restored: BTreeMap::new(),
            emitted_watermark: i64::MIN,
        }
    }

    fn start(&mut self) -> Result<(), StreamError> {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &self.config.bootstrap)
            .set("group.id", format!("sluice-stream-{}", self.config.topic))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "false")
            // A position gone (retention passed it) restarts where a
            // partition without one starts, not silently at the end.
            .set(
                "auto.offset.reset",
                match self.config.start {
                    StartFrom::Earliest => "earliest",
                    StartFrom::Latest => "latest",
                },
            );
        for (k, v) in &self.config.properties {
            cfg.set(k, v);
        }
        let consumer: BaseConsumer = cfg
            .create()
            .map_err(|e| kafka_error("creating a consumer", e))?;
        let metadata = consumer
            .fetch_metadata(Some(&self.config.topic), CLUSTER_TIMEOUT)
            .map_err(|e| kafka_error("reading the topic's metadata", e))?;
        let count = metadata
            .topics()
            .iter()
            .find(|t| t.name() == self.config.topic)
            .map_or(0, |t| t.partitions().len());
        if count == 0 {
            return Err(StreamError::Kafka(format!(
                "topic '{}' does not exist or has no partitions",
                self.config.topic
            )));
        }
        // Library mode: the group's share of the partitions and its
        // positions; else every partition, from the checkpoint's.
        let mine: Vec<(i32, Option<i64>)> = match &self.config.library {
            Some(library) => library
                .assigned(&self.config.topic)
                .into_iter()
                .enumerate()
                .filter(|(i, _)| i % self.info.parallelism == self.info.index)
                .map(|(_, p)| p)
                .collect(),
            None => (0..count as i32)
                .filter(|p| *p as usize % self.info.parallelism == self.info.index)
                .map(|p| (p, self.restored.get(&p).copied()))
                .collect(),
        };
        let mut assignment = TopicPartitionList::new();
        for (p, next) in mine {
            let end = if self.config.bounded {
                let (_, high) = consumer
                    .fetch_watermarks(&self.config.topic, p, CLUSTER_TIMEOUT)
                    .map_err(|e| kafka_error("reading the end offsets", e))?;
                Some(high)
            } else {
                None
            };
            let offset = match (next, self.config.start) {
                (Some(n), _) => Offset::Offset(n),
                (None, StartFrom::Earliest) => Offset::Beginning,
                (None, StartFrom::Latest) => Offset::End,
            };
            assignment
                .add_partition_offset(&self.config.topic, p, offset)
                .map_err(|e| kafka_error("assigning partitions", e))?;
            self.partitions.insert(
                p,
                PartitionReader {
                    next,
                    end,
                    max_time: i64::MIN,
                    last_record: Instant::now(),
                },
            );
        }
        consumer
            .assign(&assignment)
            .map_err(|e| kafka_error("assigning partitions", e))?;
        self.consumer = Some(consumer);
        Ok(())
    }

    /// Bounded partitions whose reader has passed the end offset (control
    /// records included, as the consumer's position shows).
    fn finished(&self) -> Result<bool, StreamError> {
        let Some(consumer) = &self.consumer else {
            return Ok(false);
        };
        // An unbounded subtask stays, even with no partition: one that
        // ended would acknowledge no checkpoint again.
        if !self.config.bounded || self.partitions.values().any(|p| p.end.is_none()) {
            return Ok(false);
        }
        let positions = consumer
            .position()
            .map_err(|e| kafka_error("reading positions", e))?;
        for (p, reader) in &self.partitions {
            let end = reader.end.unwrap_or(i64::MAX);
            let at = positions
                .find_partition(&self.config.topic, *p)
                .and_then(|tp| tp.offset().to_raw())
                .unwrap_or(-1)
                .max(reader.next.unwrap_or(0));
            if at < end && end > 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The least watermark of the partitions not idle (all idle: the
    /// largest, so an idle subtask does not hold the job back).
    fn watermark(&self) -> Option<i64> {
        let now = Instant::now();
        let of = |p: &PartitionReader| {
            p.max_time
                .saturating_sub(self.config.out_of_orderness_ms)
                .saturating_sub(1)
        };
        let active = self.partitions.values().filter(|p| {
            self.config
                .idle_after
                .is_none_or(|idle| now.duration_since(p.last_record) < idle)
        });
        active
            .map(of)
            .min()
            .or_else(|| self.partitions.values().map(of).max())
            .filter(|w| *w > i64::MIN)
    }
}

impl Source<KafkaRecord> for KafkaReader {
    fn poll(&mut self, ctx: &mut SourceContext<'_, KafkaRecord>) -> SourceStatus {
        if self.config.library.as_ref().is_some_and(|l| l.stopping()) {
            // Its partitions are someone else's now (or about to be).
            ctx.fail(StreamError::Cancelled {
                stage: "kafka".into(),
                subtask: self.info.index,
            });
            return SourceStatus::Ended;
        }
        if self.consumer.is_none() {
            if let Err(e) = self.start() {
                ctx.fail(e);
                return SourceStatus::Ended;
            }
            if self.partitions.is_empty() {
                // More subtasks than partitions: this one reads nothing.
                if self.config.bounded {
                    return SourceStatus::Ended;
                }
                ctx.emit_watermark(crate::WATERMARK_END - 1);
            }
        }
        let Some(consumer) = self.consumer.as_ref() else {
            return SourceStatus::Ended;
        };
        let mut wait = POLL_WAIT;
        for _ in 0..POLL_RECORDS {
            let Some(polled) = consumer.poll(wait) else {
                break;
            };
            wait = Duration::ZERO;
            let m = match polled {
                Ok(m) => m,
                Err(e) => {
                    ctx.fail(kafka_error("reading the topic", e));
                    return SourceStatus::Ended;
                }
            };
            let record = KafkaRecord {
                partition: m.partition(),
                offset: m.offset(),
                timestamp: m.timestamp().to_millis(),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().map(<[u8]>::to_vec),
                headers: m
                    .headers()
                    .map(|hs| {
                        hs.iter()
                            .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                            .collect()
                    })
                    .unwrap_or_default(),
            };
            if let Some(p) = self.partitions.get_mut(&record.partition) {
                p.next = Some(record.offset + 1);
                p.last_record = Instant::now();
                if let Some(t) = record.timestamp {
                    p.max_time = p.max_time.max(t);
                }
            }
            let time = record.timestamp;
            ctx.collect_record(Record::new(record, time));
        }
        if let Some(w) = self.watermark() {
            if w > self.emitted_watermark {
                self.emitted_watermark = w;
                ctx.emit_watermark(w);
            }
        }
        match self.finished() {
            Ok(true) => SourceStatus::Ended,
            Ok(false) => SourceStatus::More,
            Err(e) => {
                ctx.fail(e);
                SourceStatus::Ended
            }
        }
    }

    fn snapshot(&mut self, state: &mut StateWriter) {
        let offsets: Vec<(i32, i64)> = self
            .partitions
            .iter()
            .filter_map(|(p, r)| r.next.map(|n| (*p, n)))
            .chain(
                self.restored
                    .iter()
                    .filter(|(p, _)| !self.partitions.contains_key(p))
                    .map(|(p, n)| (*p, *n)),
            )
            .collect();
        if let Some(library) = &self.config.library {
            library.note_positions(&self.config.topic, &offsets);
        }
        state.value(POSITIONS, &offsets);
    }

    fn restore(&mut self, state: &StateReader) -> Result<(), StreamError> {
        let (me, parallelism) = state.subtask();
        for (_, offsets) in state.values::<Vec<(i32, i64)>>(POSITIONS)? {
            for (p, next) in offsets {
                if p as usize % parallelism == me {
                    self.restored.insert(p, next);
                }
            }
        }
        Ok(())
    }
}

/// Delivery guarantees of a [`KafkaSink`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeliveryGuarantee {
    /// Flushed at every checkpoint: nothing is lost; a restore may write
    /// records again.
    AtLeastOnce,
    /// Transactions committed with the checkpoints: read_committed readers
    /// see every record once. The prefix names the job's transactional ids
    /// and must be unique to it.
    ExactlyOnce { transactional_id_prefix: String },
}

/// A record for a topic: key, value and headers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KafkaOutput {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// The partition to write to; none: the producer's partitioner picks
    /// it from the key.
    pub partition: Option<i32>,
}

/// Turns a stream's value into a record.
pub type Serializer<T> = dyn Fn(&T) -> KafkaOutput + Send + Sync;

/// A topic as a sink (Flink's `KafkaSink`): build it, then
/// [`crate::DataStream::sink_to_kafka`].
#[derive(Clone, Debug)]
pub struct KafkaSink {
    pub(crate) bootstrap: String,
    pub(crate) topic: String,
    pub(crate) guarantee: DeliveryGuarantee,
    /// A transaction may stay open this long (it spans a checkpoint
    /// interval and a restore): `transaction.timeout.ms`.
    pub(crate) transaction_timeout: Duration,
    pub(crate) properties: Vec<(String, String)>,
}

impl KafkaSink {
    pub fn new(bootstrap: &str, topic: &str, guarantee: DeliveryGuarantee) -> KafkaSink {
        KafkaSink {
            bootstrap: bootstrap.to_owned(),
            topic: topic.to_owned(),
            guarantee,
            transaction_timeout: Duration::from_secs(900),
            properties: Vec::new(),
        }
    }

    pub fn transaction_timeout(mut self, timeout: Duration) -> Self {
        self.transaction_timeout = timeout;
        self
    }

    /// A librdkafka producer setting.
    pub fn property(mut self, key: &str, value: &str) -> Self {
        self.properties.push((key.to_owned(), value.to_owned()));
        self
    }
}

/// Counts failed deliveries: a sink fails its job on the first.
#[derive(Default)]
pub(crate) struct Deliveries {
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
    /// Where delivered offsets are noted, when someone needs them.
    offsets: Option<Arc<DeliveredOffsets>>,
}

/// The least and greatest offset delivered per partition since it was
/// last taken.
#[derive(Default)]
pub(crate) struct DeliveredOffsets(Mutex<BTreeMap<i32, (i64, i64)>>);

impl DeliveredOffsets {
    fn note(&self, partition: i32, offset: i64) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let e = m.entry(partition).or_insert((offset, offset));
        e.0 = e.0.min(offset);
        e.1 = e.1.max(offset);
    }

    /// What was delivered since the last call, per partition.
    pub fn take(&self) -> BTreeMap<i32, (i64, i64)> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The producer's context: it reports deliveries to the sink's count.
pub(crate) struct DeliveryCheck(pub(crate) Arc<Deliveries>);

impl ClientContext for DeliveryCheck {}

impl ProducerContext for DeliveryCheck {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let (Ok(m), Some(offsets)) = (result, &self.0.offsets) {
            offsets.note(m.partition(), m.offset());
        }
        if let Err((e, _)) = result {
            self.0.failed.fetch_add(1, Ordering::SeqCst);
            let mut first = self.0.first_error.lock().unwrap_or_else(|p| p.into_inner());
            first.get_or_insert_with(|| e.to_string());
        }
    }
}

impl Deliveries {
    /// Forgets failures (those of records an aborted transaction dropped).
    pub(crate) fn reset(&self) {
        self.failed.store(0, Ordering::SeqCst);
        *self.first_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    pub(crate) fn check(&self) -> Result<(), StreamError> {
        if self.failed.load(Ordering::SeqCst) == 0 {
            return Ok(());
        }
        let first = self
            .first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default();
        Err(StreamError::Kafka(format!(
            "a record was not delivered: {first}"
        )))
    }
}

pub(crate) type KafkaProducer = ThreadedProducer<DeliveryCheck>;

/// One producer of a sink subtask (with exactly-once: of one transaction).
struct Writer {
    producer: KafkaProducer,
    deliveries: Arc<Deliveries>,
    transactional_id: Option<String>,
    sent: u64,
}

/// A transaction flushed at a checkpoint's barrier, waiting for it to
/// complete; in the checkpoint as its id and producer identity.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Precommitted {
    checkpoint: CheckpointId,
    transactional_id: String,
    producer_id: i64,
    epoch: i16,
}

/// A sink subtask's state: its transactions waiting to commit, and the
/// number its next transactional id takes.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct SinkState {
    pending: Vec<Precommitted>,
    next_transaction: u64,
}

pub(crate) struct KafkaWriter<T> {
    config: KafkaSink,
    serialize: Arc<Serializer<T>>,
    info: SubtaskInfo,
    current: Option<Writer>,
    /// Pre-committed transactions with their producers, oldest first.
    waiting: Vec<(Precommitted, Writer)>,
    /// Pre-committed by an earlier run: committed by EndTxn on restore.
    next_transaction: u64,
    on_success: SuccessCommits,
    /// Transactions pre-committed when the input ended, for the final
    /// checkpoint.
    final_pending: Vec<Precommitted>,
    runtime: Option<tokio::runtime::Runtime>,
    offsets: Option<Arc<DeliveredOffsets>>,
}

impl<T> KafkaWriter<T> {
    pub fn new(
        config: KafkaSink,
        serialize: Arc<Serializer<T>>,
        info: SubtaskInfo,
        on_success: SuccessCommits,
    ) -> Self {
        KafkaWriter {
            config,
            serialize,
            info,
            current: None,
            waiting: Vec::new(),
            next_transaction: 0,
            on_success,
            final_pending: Vec::new(),
            runtime: None,
            offsets: None,
        }
    }

    /// Notes the offset of every record delivered in `offsets`.
    pub fn noting_offsets(mut self, offsets: Arc<DeliveredOffsets>) -> Self {
        self.offsets = Some(offsets);
        self
    }

    fn prefix(&self) -> Option<&str> {
        match &self.config.guarantee {
            DeliveryGuarantee::AtLeastOnce => None,
            DeliveryGuarantee::ExactlyOnce {
                transactional_id_prefix,
            } => Some(transactional_id_prefix),
        }
    }

    fn transactional_id(prefix: &str, subtask: usize, n: u64) -> String {
        format!("{prefix}-{subtask}-{n}")
    }

    fn writer(&mut self) -> Result<&mut Writer, StreamError> {
        if self.current.is_none() {
            let prefix = self.prefix().map(str::to_owned);
            let transactional_id = prefix.map(|p| {
                let id = Self::transactional_id(&p, self.info.index, self.next_transaction);
                self.next_transaction += 1;
                id
            });
            let deliveries = Arc::new(Deliveries {
                offsets: self.offsets.clone(),
                ..Deliveries::default()
            });
            let mut cfg = ClientConfig::new();
            cfg.set("bootstrap.servers", &self.config.bootstrap)
                .set("enable.idempotence", "true")
                .set("acks", "all")
                .set("linger.ms", "5");
            if let Some(id) = &transactional_id {
                cfg.set("transactional.id", id).set(
                    "transaction.timeout.ms",
                    self.config.transaction_timeout.as_millis().to_string(),
                );
            }
            for (k, v) in &self.config.properties {
                cfg.set(k, v);
            }
            let producer: KafkaProducer = cfg
                .create_with_context(DeliveryCheck(deliveries.clone()))
                .map_err(|e| kafka_error("creating a producer", e))?;
            if transactional_id.is_some() {
                producer
                    .init_transactions(CLUSTER_TIMEOUT)
                    .map_err(|e| kafka_error("initialising transactions", e))?;
                producer
                    .begin_transaction()
                    .map_err(|e| kafka_error("beginning a transaction", e))?;
            }
            self.current = Some(Writer {
                producer,
                deliveries,
                transactional_id,
                sent: 0,
            });
        }
        self.current
            .as_mut()
            .ok_or_else(|| StreamError::Kafka("the sink lost its producer".into()))
    }

    /// Runs a coordinator conversation on this subtask's runtime.
    fn block_on<R>(
        &mut self,
        f: impl std::future::Future<Output = Result<R, sluice_client::ClientError>>,
    ) -> Result<R, StreamError> {
        if self.runtime.is_none() {
            self.runtime = Some(
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| kafka_error("starting a runtime", e))?,
            );
        }
        match &self.runtime {
            Some(rt) => rt
                .block_on(f)
                .map_err(|e| kafka_error("transaction coordinator", e)),
            None => Err(StreamError::Kafka("no runtime".into())),
        }
    }

    fn coordinator_of(&mut self, transactional_id: &str) -> Result<Connection, StreamError> {
        let bootstrap = self.config.bootstrap.clone();
        let id = transactional_id.to_owned();
        self.block_on(async move {
            let mut any =
                Connection::connect_any(&bootstrap, "sluice-stream", CLUSTER_TIMEOUT).await?;
            let addr = txn::find_coordinator(&mut any, &id).await?;
            Connection::connect(&addr, "sluice-stream", CLUSTER_TIMEOUT).await
        })
    }

    /// Flushes the current producer: every record sent is acknowledged.
    fn flush(writer: &Writer) -> Result<(), StreamError> {
        writer
            .producer
            .flush(CLUSTER_TIMEOUT)
            .map_err(|e| kafka_error("flushing", e))?;
        writer.deliveries.check()
    }

    /// Commits the pre-committed transactions of checkpoints up to `id`.
    fn commit_through(&mut self, id: CheckpointId) -> Result<(), StreamError> {
        while self
            .waiting
            .first()
            .is_some_and(|(p, _)| p.checkpoint <= id)
        {
            let (_, writer) = self.waiting.remove(0);
            writer
                .producer
                .commit_transaction(CLUSTER_TIMEOUT)
                .map_err(|e| kafka_error("committing a transaction", e))?;
        }
        Ok(())
    }

    /// Commits, under their recorded identities, transactions a failed run
    /// pre-committed for the checkpoint being restored.
    fn commit_recovered(&mut self, pending: &[Precommitted]) -> Result<(), StreamError> {
        for p in pending {
            let mut conn = self.coordinator_of(&p.transactional_id)?;
            let producer = ProducerIdentity {
                producer_id: p.producer_id,
                epoch: p.epoch,
            };
            let id = p.transactional_id.clone();
            self.block_on(async move { txn::end_txn(&mut conn, &id, producer, true).await })?;
        }
        Ok(())
    }

    /// A subtask that starts afresh: aborts what an earlier run of it left
    /// open, from its first transactional id on.
    pub fn abort_lingering_from_start(&mut self) -> Result<(), StreamError> {
        let Some(prefix) = self.prefix().map(str::to_owned) else {
            return Ok(());
        };
        self.next_transaction = self.abort_lingering(&prefix, self.info.index, 0)?;
        if self.info.index == 0 {
            self.abort_orphans(&prefix, self.info.parallelism)?;
        }
        Ok(())
    }

    /// Aborts the transactions that subtasks numbered `from_subtask` and
    /// above left open: a crashed run at a higher parallelism than both
    /// the checkpoint's and this run's had them, and no subtask inherits
    /// their ids. They are found by listing every broker's ongoing
    /// transactions (ListTransactions) and fenced with InitProducerId.
    fn abort_orphans(&mut self, prefix: &str, from_subtask: usize) -> Result<(), StreamError> {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &self.config.bootstrap);
        for (k, v) in &self.config.properties {
            cfg.set(k, v);
        }
        let client: BaseConsumer = cfg
            .create()
            .map_err(|e| kafka_error("creating a metadata client", e))?;
        let metadata = client
            .fetch_metadata(None, CLUSTER_TIMEOUT)
            .map_err(|e| kafka_error("listing the brokers", e))?;
        let brokers: Vec<String> = metadata
            .brokers()
            .iter()
            .map(|b| format!("{}:{}", b.host(), b.port()))
            .collect();
        let mut open = std::collections::BTreeSet::new();
        for addr in brokers {
            let listed = self.block_on(async move {
                let mut conn = Connection::connect(&addr, "sluice-stream", CLUSTER_TIMEOUT).await?;
                txn::list_transactions(&mut conn, "Ongoing").await
            })?;
            open.extend(listed);
        }
        let timeout_ms =
            i32::try_from(self.config.transaction_timeout.as_millis()).unwrap_or(i32::MAX);
        for id in open {
            let orphan = id
                .strip_prefix(prefix)
                .and_then(|rest| rest.strip_prefix('-'))
                .and_then(|rest| rest.split_once('-'))
                .and_then(|(subtask, n)| {
                    Some((subtask.parse::<usize>().ok()?, n.parse::<u64>().ok()?))
                })
                .is_some_and(|(subtask, _)| subtask >= from_subtask);
            if orphan {
                let mut conn = self.coordinator_of(&id)?;
                self.block_on(async move {
                    txn::init_producer_id(&mut conn, Some(&id), timeout_ms).await
                })?;
            }
        }
        Ok(())
    }

    /// Aborts the transactions a failed run of subtask `subtask` may have
    /// left open after number `from`: InitProducerId on each id fences its
    /// producer and aborts its transaction; the first id that was never
    /// used (epoch 0) ends the search.
    fn abort_lingering(
        &mut self,
        prefix: &str,
        subtask: usize,
        from: u64,
    ) -> Result<u64, StreamError> {
        let timeout_ms =
            i32::try_from(self.config.transaction_timeout.as_millis()).unwrap_or(i32::MAX);
        let mut n = from;
        loop {
            let id = Self::transactional_id(prefix, subtask, n);
            let mut conn = self.coordinator_of(&id)?;
            let identity = self.block_on(async move {
                txn::init_producer_id(&mut conn, Some(&id), timeout_ms).await
            })?;
            if identity.epoch == 0 {
                return Ok(n);
            }
            n += 1;
        }
    }
}

/// Sends `out` to `topic`, waiting while the producer's queue is full.
pub(crate) fn send_record(
    producer: &KafkaProducer,
    topic: &str,
    out: &KafkaOutput,
    time: Option<i64>,
) -> Result<(), StreamError> {
    let mut r: BaseRecord<'_, [u8], [u8], ()> = BaseRecord::to(topic);
    if !out.headers.is_empty() {
        let mut headers = rdkafka::message::OwnedHeaders::new();
        for (k, v) in &out.headers {
            headers = headers.insert(rdkafka::message::Header {
                key: k,
                value: Some(v),
            });
        }
        r = r.headers(headers);
    }
    if let Some(k) = &out.key {
        r = r.key(k.as_slice());
    }
    if let Some(p) = out.partition {
        r = r.partition(p);
    }
    if let Some(v) = &out.value {
        r = r.payload(v.as_slice());
    }
    if let Some(t) = time {
        r = r.timestamp(t);
    }
    loop {
        match producer.send(r) {
            Ok(()) => return Ok(()),
            Err((
                rdkafka::error::KafkaError::MessageProduction(
                    rdkafka::types::RDKafkaErrorCode::QueueFull,
                ),
                back,
            )) => {
                // The producer's queue is full: wait for deliveries.
                r = back;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(kafka_error("producing", e)),
        }
    }
}

impl<T: Send> Output<T> for KafkaWriter<T> {
    fn push(&mut self, record: Record<T>) -> Result<(), StreamError> {
        let out = (self.serialize)(&record.value);
        self.writer()?;
        let (Some(writer), topic) = (self.current.as_mut(), &self.config.topic) else {
            return Err(StreamError::Kafka("the sink lost its producer".into()));
        };
        send_record(&writer.producer, topic, &out, record.time)?;
        writer.sent += 1;
        writer.deliveries.check()
    }

    fn watermark(&mut self, _: i64) -> Result<(), StreamError> {
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn finish(&mut self) -> Result<(), StreamError> {
        // What follows the last checkpoint is pre-committed like at a
        // barrier, and commits when the whole job has succeeded.
        self.precommit(crate::checkpoint::FINAL)?;
        self.leave_waiting_to_success()
    }

    fn barrier(&mut self, cp: &mut Cursor<'_>) -> Result<(), StreamError> {
        let pending = if cp.is_final() {
            self.final_pending.clone()
        } else {
            self.precommit(cp.id)?;
            self.waiting.iter().map(|(p, _)| p.clone()).collect()
        };
        let state = SinkState {
            pending,
            next_transaction: self.next_transaction,
        };
        let mut w = cp.writer();
        w.value("kafka sink", &state);
        cp.put(w)
    }

    fn restore(&mut self, cp: &mut Cursor<'_>) -> Result<(), StreamError> {
        let r = cp.reader()?;
        let Some(prefix) = self.prefix().map(str::to_owned) else {
            return Ok(());
        };
        let (me, parallelism) = (self.info.index, self.info.parallelism);
        let states = r.values::<SinkState>("kafka sink")?;
        let previous = r.previous_parallelism();
        for (old, state) in &states {
            if old % parallelism == me {
                self.commit_recovered(&state.pending)?;
            }
        }
        // Every subtask number this one inherits, of this run and the last.
        for old in (0..previous.max(parallelism)).filter(|s| s % parallelism == me) {
            let from = states
                .iter()
                .find(|(s, _)| *s == old)
                .map_or(0, |(_, st)| st.next_transaction);
            let fresh = self.abort_lingering(&prefix, old, from)?;
            if old == me {
                self.next_transaction = fresh;
            }
        }
        if me == 0 {
            self.abort_orphans(&prefix, previous.max(parallelism))?;
        }
        Ok(())
    }

    fn checkpoint_complete(&mut self, id: CheckpointId) -> Result<(), StreamError> {
        self.commit_through(id)
    }
}

impl<T> KafkaWriter<T> {
    /// Flushes the current producer; with transactions, its transaction
    /// (when it holds records) waits for checkpoint `id`, its producer id
    /// and epoch taken from the coordinator.
    fn precommit(&mut self, id: CheckpointId) -> Result<(), StreamError> {
        let Some(writer) = self.current.take() else {
            return Ok(());
        };
        Self::flush(&writer)?;
        match writer.transactional_id.clone() {
            Some(tid) if writer.sent > 0 => {
                let mut conn = self.coordinator_of(&tid)?;
                let asked = tid.clone();
                let described = self
                    .block_on(async move { txn::describe_transaction(&mut conn, &asked).await })?;
                let pending = Precommitted {
                    checkpoint: id,
                    transactional_id: tid,
                    producer_id: described.producer.producer_id,
                    epoch: described.producer.epoch,
                };
                self.waiting.push((pending, writer));
            }
            // An empty transaction holds nothing back: it just ends.
            Some(_) => drop(writer),
            // At least once: everything sent is acknowledged.
            None => self.current = Some(writer),
        }
        Ok(())
    }

    /// What is pre-committed when the input ends commits once the whole
    /// job has succeeded.
    fn leave_waiting_to_success(&mut self) -> Result<(), StreamError> {
        self.final_pending = self.waiting.iter().map(|(p, _)| p.clone()).collect();
        let waiting: Vec<Writer> = self.waiting.drain(..).map(|(_, w)| w).collect();
        if waiting.is_empty() {
            return Ok(());
        }
        let commit: Commit = Box::new(move || {
            for w in &waiting {
                w.producer
                    .commit_transaction(CLUSTER_TIMEOUT)
                    .map_err(|e| kafka_error("committing a transaction", e))?;
            }
            Ok(())
        });
        self.on_success
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(commit);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(out_of_orderness_ms: i64, idle_after: Option<Duration>) -> KafkaReader {
        let mut config = KafkaSource::new("127.0.0.1:1", "t");
        config.out_of_orderness_ms = out_of_orderness_ms;
        config.idle_after = idle_after;
        KafkaReader::new(
            config,
            SubtaskInfo {
                index: 0,
                parallelism: 1,
                max_parallelism: 128,
            },
        )
    }

    fn partition(max_time: i64, idle_for: Duration) -> PartitionReader {
        PartitionReader {
            next: None,
            end: None,
            max_time,
            last_record: Instant::now() - idle_for,
        }
    }

    #[test]
    fn the_watermark_is_the_least_of_the_partitions_not_idle() {
        let mut r = reader(100, Some(Duration::from_secs(5)));
        assert_eq!(r.watermark(), None, "no partition: no watermark");
        r.partitions.insert(0, partition(1_000, Duration::ZERO));
        r.partitions.insert(1, partition(i64::MIN, Duration::ZERO));
        assert_eq!(
            r.watermark(),
            None,
            "a partition without records holds it back"
        );
        r.partitions.insert(1, partition(700, Duration::ZERO));
        assert_eq!(r.watermark(), Some(599), "least of 899 and 599");
        r.partitions
            .insert(1, partition(700, Duration::from_secs(10)));
        assert_eq!(
            r.watermark(),
            Some(899),
            "the idle partition no longer counts"
        );
        r.partitions
            .insert(0, partition(1_000, Duration::from_secs(10)));
        assert_eq!(r.watermark(), Some(899), "all idle: the largest");
        let mut never_idle = reader(0, None);
        never_idle
            .partitions
            .insert(0, partition(50, Duration::from_secs(3600)));
        never_idle
            .partitions
            .insert(1, partition(80, Duration::ZERO));
        assert_eq!(never_idle.watermark(), Some(49));
    }
}

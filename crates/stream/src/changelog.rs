//! Keyed state kept in a compacted changelog topic, Kafka Streams and
//! Samza style ([`crate::StreamEnv::set_state_changelog`]).
//!
//! - Each stage with keyed state has a topic `<prefix>-s<stage>-changelog`
//!   (`cleanup.policy=compact`) with one partition per key group: the
//!   partition is the key group, so a subtask restoring at any parallelism
//!   reads exactly the partitions of the groups it owns.
//! - A record's key is the link, the state's name and the user key
//!   (postcard); its value the state's value, or none (a tombstone) for a
//!   key that is gone. At each checkpoint a subtask writes only the keys
//!   whose value changed since it last wrote them (a 64-bit hash of each
//!   key's encoded value is remembered) and tombstones for the keys that
//!   disappeared: what the checkpoint store holds is small and the same
//!   size whatever the state.
//! - The records go in the subtask's transaction for that checkpoint (the
//!   exactly-once sink's two-phase commit: pre-committed at the barrier,
//!   committed once the checkpoint completes, committed again by a
//!   restore). The checkpoint keeps, per key group, the offsets
//!   `[from, to]` that hold its state: a restore reads them read_committed,
//!   so what a failed run wrote after the checkpoint (aborted, or never
//!   committed) is not seen, and compaction (which keeps aborted records
//!   out of its choice of each key's latest) never removes what the range
//!   needs: every committed record past `to` belongs to a later checkpoint.
//! - A savepoint holds its keyed state itself too: a savepoint is restored
//!   after later checkpoints committed newer values, which compaction may
//!   have let replace the ones it needs. A run restored from full state
//!   (a savepoint, or checkpoints taken without a changelog) writes every
//!   key again at its first checkpoint and reads only from there on.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hasher;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use siphasher::sip::SipHasher13;

use crate::checkpoint::{decode, encode, Cursor, LoggedGroup};
use crate::kafka::{DeliveredOffsets, DeliveryGuarantee, KafkaOutput, KafkaSink, KafkaWriter};
use crate::keyed::key_group_range;
use crate::operator::Output;
use crate::sink::SuccessCommits;
use crate::{CheckpointId, Record, StreamError, SubtaskInfo};

/// How long a call to the cluster may take, and a restore may wait for
/// the changelog without reading anything.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a job keeps its keyed state: compacted topics of a Kafka-protocol
/// cluster (Sluice or any Kafka), named `<prefix>-s<stage>-changelog`. The
/// prefix must be unique to the job; it also names the changelog's
/// transactional ids.
#[derive(Clone, Debug)]
pub struct KafkaChangelog {
    bootstrap: String,
    prefix: String,
    replication_factor: i32,
    transaction_timeout: Duration,
    properties: Vec<(String, String)>,
}

impl KafkaChangelog {
    pub fn new(bootstrap: &str, prefix: &str) -> KafkaChangelog {
        KafkaChangelog {
            bootstrap: bootstrap.to_owned(),
            prefix: prefix.to_owned(),
            replication_factor: -1,
            transaction_timeout: Duration::from_secs(900),
            properties: Vec::new(),
        }
    }

    /// Replicas of each changelog partition when the job creates the
    /// topics (default -1: the cluster's default).
    pub fn replication_factor(mut self, replicas: i32) -> Self {
        self.replication_factor = replicas;
        self
    }

    /// How long a changelog transaction may stay open (it spans a
    /// checkpoint interval and a restore): `transaction.timeout.ms`.
    pub fn transaction_timeout(mut self, timeout: Duration) -> Self {
        self.transaction_timeout = timeout;
        self
    }

    /// A librdkafka setting for the changelog's producers and readers.
    pub fn property(mut self, key: &str, value: &str) -> Self {
        self.properties.push((key.to_owned(), value.to_owned()));
        self
    }

    /// The changelog topic of stage `stage`.
    pub fn topic(&self, stage: usize) -> String {
        format!("{}-s{stage}-changelog", self.prefix)
    }
}

/// A changelog record on its way: the key group is its partition.
struct LogRecord {
    group: u32,
    key: Vec<u8>,
    value: Option<Vec<u8>>,
}

/// What a checkpoint keeps of a subtask's changelog.
#[derive(Serialize, Deserialize, Default)]
struct Positions {
    /// The checkpoint holds the keyed state itself (a savepoint).
    keyed_in_checkpoint: bool,
    /// Per key group: the offsets that hold its state.
    ranges: Vec<(u32, i64, i64)>,
}

/// A keyed state's key group: link, state name, key group.
type Slot = (usize, String, u32);

/// Whether the checkpoint of `cp` keeps this stage's keyed state in a
/// changelog: restoring it without one would start the state empty.
pub(crate) fn keeps_state(cp: &Cursor<'_>) -> Result<bool, StreamError> {
    let mut own = cp.for_changelog();
    own.skip();
    Ok(!own.reader()?.values::<Positions>("changelog")?.is_empty())
}

/// The changelog of one subtask of a stage.
pub(crate) struct SubtaskLog {
    config: KafkaChangelog,
    info: SubtaskInfo,
    topic: String,
    writer: KafkaWriter<LogRecord>,
    delivered: Arc<DeliveredOffsets>,
    /// The hash of each key's value as last written, per link, state and
    /// key group.
    written: HashMap<Slot, HashMap<Vec<u8>, u64>>,
    /// Per key group this subtask owns: the offsets that hold its state.
    ranges: BTreeMap<u32, (i64, i64)>,
    topic_ready: bool,
}

fn value_hash(bytes: &[u8]) -> u64 {
    let mut h = SipHasher13::new_with_keys(0x6368_616e_6765, 0x6c6f_6720_7661_6c75);
    h.write(bytes);
    h.finish()
}

/// Errors a restore cannot wait out: the range's offsets or the topic are
/// gone.
fn refuses_restore(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::AutoOffsetReset
                | RDKafkaErrorCode::OffsetOutOfRange
                | RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::UnknownPartition
        )
    )
}

fn kafka_error(what: &str, e: impl std::fmt::Display) -> StreamError {
    StreamError::Kafka(format!("{what}: {e}"))
}

impl SubtaskLog {
    pub fn new(
        config: KafkaChangelog,
        stage: usize,
        info: SubtaskInfo,
        on_success: SuccessCommits,
    ) -> SubtaskLog {
        let topic = config.topic(stage);
        let mut sink = KafkaSink::new(
            &config.bootstrap,
            &topic,
            DeliveryGuarantee::ExactlyOnce {
                transactional_id_prefix: topic.clone(),
            },
        )
        .transaction_timeout(config.transaction_timeout);
        for (k, v) in &config.properties {
            sink = sink.property(k, v);
        }
        let serialize = Arc::new(|r: &LogRecord| KafkaOutput {
            key: Some(r.key.clone()),
            value: r.value.clone(),
            headers: Vec::new(),
            partition: Some(r.group as i32),
        });
        let delivered = Arc::new(DeliveredOffsets::default());
        let writer =
            KafkaWriter::new(sink, serialize, info, on_success).noting_offsets(delivered.clone());
        SubtaskLog {
            config,
            info,
            topic,
            writer,
            delivered,
            written: HashMap::new(),
            ranges: BTreeMap::new(),
            topic_ready: false,
        }
    }

    /// Creates the stage's changelog topic unless it exists, and checks it
    /// has a partition for every key group.
    fn ensure_topic(&mut self) -> Result<(), StreamError> {
        if self.topic_ready {
            return Ok(());
        }
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &self.config.bootstrap);
        for (k, v) in &self.config.properties {
            cfg.set(k, v);
        }
        let groups = self.info.max_parallelism;
        let admin: AdminClient<DefaultClientContext> = cfg
            .create()
            .map_err(|e| kafka_error("creating an admin client", e))?;
        let topic = NewTopic::new(
            &self.topic,
            i32::try_from(groups).unwrap_or(i32::MAX),
            TopicReplication::Fixed(self.config.replication_factor),
        )
        .set("cleanup.policy", "compact");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| kafka_error("starting a runtime", e))?;
        let options = AdminOptions::new().operation_timeout(Some(CLUSTER_TIMEOUT));
        let results = runtime
            .block_on(admin.create_topics([&topic], &options))
            .map_err(|e| kafka_error("creating the changelog topic", e))?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(StreamError::Kafka(format!(
                        "creating the changelog topic '{name}': {code}"
                    )))
                }
            }
        }
        let consumer = self.consumer()?;
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        loop {
            let metadata = consumer
                .fetch_metadata(Some(&self.topic), CLUSTER_TIMEOUT)
                .map_err(|e| kafka_error("reading the changelog topic's metadata", e))?;
            let count = metadata
                .topics()
                .iter()
                .find(|t| t.name() == self.topic)
                .map_or(0, |t| t.partitions().len());
            if count >= groups {
                break;
            }
            if count > 0 || Instant::now() >= deadline {
                return Err(StreamError::State(format!(
                    "changelog topic '{}' has {count} partitions; the job has {groups} key groups",
                    self.topic
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.topic_ready = true;
        Ok(())
    }

    fn consumer(&self) -> Result<BaseConsumer, StreamError> {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &self.config.bootstrap)
            .set("group.id", format!("{}-restore", self.topic))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            // A range that is gone (the topic recreated, or not compacted
            // and trimmed) fails the restore instead of reading nothing.
            .set("auto.offset.reset", "error");
        for (k, v) in &self.config.properties {
            cfg.set(k, v);
        }
        cfg.create()
            .map_err(|e| kafka_error("creating a changelog reader", e))
    }

    /// Writes the keys the links' state changed since they were last
    /// written, and tombstones for the keys that are gone.
    fn log(&mut self, written: Vec<(usize, LoggedGroup)>) -> Result<(), StreamError> {
        for (link, group) in written {
            let slot = (link, group.name, group.group);
            let before = self.written.remove(&slot).unwrap_or_default();
            if before.is_empty() && group.entries.is_empty() {
                continue;
            }
            self.ensure_topic()?;
            let mut now = HashMap::with_capacity(group.entries.len());
            for (key, value) in group.entries {
                let hash = value_hash(&value);
                if before.get(&key) != Some(&hash) {
                    self.push(link, &slot.1, slot.2, &key, Some(value))?;
                }
                now.insert(key, hash);
            }
            for key in before.keys().filter(|k| !now.contains_key(*k)) {
                self.push(link, &slot.1, slot.2, key, None)?;
            }
            if !now.is_empty() {
                self.written.insert(slot, now);
            }
        }
        Ok(())
    }

    fn push(
        &mut self,
        link: usize,
        name: &str,
        group: u32,
        key: &[u8],
        value: Option<Vec<u8>>,
    ) -> Result<(), StreamError> {
        let record = LogRecord {
            group,
            key: encode(&(link as u32, name, key))?,
            value,
        };
        self.writer.push(Record::new(record, None))
    }

    /// The links of the chain wrote their state for the checkpoint of `cp`:
    /// their changes go into the checkpoint's transaction, which is
    /// pre-committed, and the checkpoint keeps where the state lies.
    pub fn checkpoint(&mut self, cp: &mut Cursor<'_>, savepoint: bool) -> Result<(), StreamError> {
        let written = cp.take_logged();
        self.log(written)?;
        let mut own = cp.for_changelog();
        if cp.is_final() {
            // The final checkpoint has no barrier to pre-commit at: what
            // the input's end leaves commits when the whole job succeeds.
            self.writer.finish()?;
        }
        self.writer.barrier(&mut own)?;
        for (partition, (first, last)) in self.delivered.take() {
            let group = partition as u32;
            let from = self.ranges.get(&group).map_or(first, |r| r.0);
            self.ranges.insert(group, (from, last));
        }
        let positions = Positions {
            keyed_in_checkpoint: savepoint,
            ranges: self.ranges.iter().map(|(g, (f, t))| (*g, *f, *t)).collect(),
        };
        let mut w = own.writer();
        w.value("changelog", &positions);
        own.put(w)
    }

    /// Checkpoint `id` completed: its transaction commits.
    pub fn checkpoint_complete(&mut self, id: CheckpointId) -> Result<(), StreamError> {
        self.writer.checkpoint_complete(id)
    }

    /// A job that starts afresh: transactions an earlier run of this
    /// subtask left open are aborted, so they hold back no reader.
    pub fn start_afresh(&mut self) -> Result<(), StreamError> {
        self.writer.abort_lingering_from_start()
    }

    /// Restores from the checkpoint of `cp`: commits its transactions,
    /// aborts later ones, and reads the state of the key groups this
    /// subtask owns from the changelog, by link (none when the checkpoint
    /// holds the keyed state itself).
    pub fn restore(&mut self, cp: &Cursor<'_>) -> Result<Vec<(usize, LoggedGroup)>, StreamError> {
        let mut own = cp.for_changelog();
        self.writer.restore(&mut own)?;
        let positions = own.reader()?.values::<Positions>("changelog")?;
        if positions.is_empty() || positions.iter().any(|(_, p)| p.keyed_in_checkpoint) {
            // Full state in the checkpoint: written again from the first
            // checkpoint of this run, which is where it will be read from.
            return Ok(Vec::new());
        }
        let mine = key_group_range(
            self.info.index,
            self.info.parallelism,
            self.info.max_parallelism,
        );
        for (_, p) in positions {
            for (group, from, to) in p.ranges {
                if mine.contains(&(group as usize)) {
                    self.ranges.insert(group, (from, to));
                }
            }
        }
        self.read()
    }

    /// Reads each owned key group's range, keeping each key's latest value.
    fn read(&mut self) -> Result<Vec<(usize, LoggedGroup)>, StreamError> {
        if self.ranges.is_empty() {
            return Ok(Vec::new());
        }
        let consumer = self.consumer()?;
        let mut assignment = TopicPartitionList::new();
        for (group, (from, _)) in &self.ranges {
            assignment
                .add_partition_offset(&self.topic, *group as i32, Offset::Offset(*from))
                .map_err(|e| kafka_error("assigning changelog partitions", e))?;
        }
        consumer
            .assign(&assignment)
            .map_err(|e| kafka_error("assigning changelog partitions", e))?;
        let mut remaining: BTreeMap<i32, i64> = self
            .ranges
            .iter()
            .map(|(g, (_, to))| (*g as i32, *to))
            .collect();
        let mut state: HashMap<Slot, HashMap<Vec<u8>, Vec<u8>>> = HashMap::new();
        let mut quiet_since = Instant::now();
        while !remaining.is_empty() {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    quiet_since = Instant::now();
                    let Some(&to) = remaining.get(&m.partition()) else {
                        continue;
                    };
                    if m.offset() <= to {
                        let (link, name, key): (u32, String, Vec<u8>) =
                            decode(m.key().unwrap_or_default())?;
                        let slot = (link as usize, name, m.partition() as u32);
                        let values = state.entry(slot).or_default();
                        match m.payload() {
                            Some(v) => values.insert(key, v.to_vec()),
                            None => values.remove(&key),
                        };
                    }
                    if m.offset() >= to {
                        remaining.remove(&m.partition());
                    }
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    // At the end of what is committed. Nothing of this job
                    // is open in the changelog any more (the restore aborted
                    // it), so that end is the log end: past `to`, the range
                    // has been read, even when compaction removed its last
                    // records.
                    let to = remaining.get(&p).copied();
                    if let Some(to) = to {
                        let (_, high) = consumer
                            .fetch_watermarks(&self.topic, p, CLUSTER_TIMEOUT)
                            .map_err(|e| kafka_error("reading the changelog's end", e))?;
                        if high > to {
                            remaining.remove(&p);
                        }
                    }
                }
                Some(Err(e)) if refuses_restore(&e) => {
                    return Err(kafka_error("reading the changelog", e))
                }
                // Transient (a broker restarting): librdkafka retries; the
                // quiet-time limit below bounds the wait.
                Some(Err(e)) => tracing::debug!(topic = %self.topic, error = %e, "changelog read"),
                None => {}
            }
            if quiet_since.elapsed() > CLUSTER_TIMEOUT {
                return Err(StreamError::Kafka(format!(
                    "the changelog '{}' did not deliver partitions {:?} within {CLUSTER_TIMEOUT:?}",
                    self.topic,
                    remaining.keys().collect::<Vec<_>>()
                )));
            }
        }
        let mut restored = Vec::new();
        for ((link, name, group), values) in state {
            let hashes = values
                .iter()
                .map(|(k, v)| (k.clone(), value_hash(v)))
                .collect();
            self.written.insert((link, name.clone(), group), hashes);
            restored.push((
                link,
                LoggedGroup {
                    name,
                    group,
                    entries: values.into_iter().collect(),
                },
            ));
        }
        Ok(restored)
    }
}

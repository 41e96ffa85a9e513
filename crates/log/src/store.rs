//! The data directory: topics and their partitions, topic metadata, the
//! cluster id and the producer-id allocator.
//!
//! Layout:
//! ```text
//! <data_dir>/meta/topics.json        topic names, ids, partition counts, overrides
//! <data_dir>/meta/cluster-id         random id made on first start
//! <data_dir>/meta/producer-id-block  (earlier single-node releases) first producer
//!                                    id not yet reserved
//! <data_dir>/<topic>-<partition>/    segments and per-partition checkpoints
//! ```
//! Every file in meta/ is replaced atomically (tmp, fsync, rename, fsync dir).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::fsutil;
use crate::partition::{now_ms, Opening, Partition};
use crate::{CleanStats, FlushPolicy, LogError, StoreConfig, TopicConfig, TopicInfo};
use sluice_vocab::TopicName;

const META_DIR: &str = "meta";
const TOPICS_FILE: &str = "topics.json";
const CLUSTER_ID_FILE: &str = "cluster-id";
/// Present while the store is closed after a clean shutdown ([`Store::close`]):
/// every partition's files were synced and whole when it was written.
/// Removed (durably) when the store opens, before anything is written.
const CLEAN_SHUTDOWN_FILE: &str = "clean-shutdown";
/// Written by releases that allocated producer ids locally; read for adoption only.
const PRODUCER_ID_FILE: &str = "producer-id-block";
/// Upper bound on partitions per topic, a guard against absurd requests.
const MAX_PARTITIONS: u32 = 100_000;

#[derive(Serialize, Deserialize, Default)]
struct TopicsFile {
    topics: Vec<TopicRecord>,
}

#[derive(Serialize, Deserialize, Clone)]
struct TopicRecord {
    name: String,
    /// Hex of the 16-byte topic id.
    id: String,
    partitions: u32,
    overrides: BTreeMap<String, String>,
}

struct TopicState {
    id: [u8; 16],
    overrides: BTreeMap<String, String>,
    config: Arc<RwLock<TopicConfig>>,
    partitions: Vec<Arc<Partition>>,
}

/// The owner of a data directory: topics, their partitions, their configs.
pub struct Store {
    config: StoreConfig,
    meta_dir: PathBuf,
    runtime: tokio::runtime::Handle,
    topics: RwLock<BTreeMap<String, TopicState>>,
    /// Serialises topic-metadata changes and their file writes.
    meta_lock: Mutex<()>,
    cluster_id: String,
    reserved_producer_ids: i64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("data_dir", &self.config.data_dir)
            .finish_non_exhaustive()
    }
}

fn hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Kafka cluster ids are a UUID in URL-safe base64 without padding (22 chars).
fn base64url(bytes: &[u8; 16]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(22);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for &b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 6 {
            bits -= 6;
            out.push(char::from(ALPHABET[((acc >> bits) & 63) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((acc << (6 - bits)) & 63) as usize]));
    }
    out
}

fn partition_dir(data_dir: &Path, topic: &str, partition: u32) -> PathBuf {
    data_dir.join(format!("{topic}-{partition}"))
}

/// Makes every write to the file system holding `dir` durable.
fn syncfs(dir: &Path) -> std::io::Result<()> {
    let dir = fs::File::open(dir)?;
    rustix::fs::syncfs(&dir).map_err(std::io::Error::from)
}

/// A partition to recover: its topic, its index and the topic's shared config.
type ToOpen = (String, u32, Arc<RwLock<TopicConfig>>);
type Opened = Result<Arc<Partition>, LogError>;

/// Recovers `partitions` on one thread per core: recovery of many small
/// partitions is system calls and allocation, which two cores do in about
/// half the time of one. Returns them in the order given; the first failure
/// fails the whole open.
fn open_partitions(
    data_dir: &Path,
    partitions: Vec<ToOpen>,
    flush: FlushPolicy,
    runtime: &tokio::runtime::Handle,
    opening: Opening,
) -> Result<Vec<(String, Arc<Partition>)>, LogError> {
    let open_one = |(topic, p, config): &ToOpen| {
        let dir = partition_dir(data_dir, topic, *p);
        Partition::open(
            topic,
            *p as i32,
            dir,
            config.clone(),
            flush,
            runtime,
            opening,
        )
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(partitions.len().div_ceil(OPEN_CHUNK));
    let mut opened: Vec<Option<Opened>> = (0..partitions.len()).map(|_| None).collect();
    if threads <= 1 {
        for (slot, p) in opened.iter_mut().zip(&partitions) {
            *slot = Some(open_one(p));
        }
    } else {
        // Workers take chunks in turn, so one slow partition (a long log to
        // walk) does not leave the other cores idle.
        let next = std::sync::atomic::AtomicUsize::new(0);
        let work = || {
            let mut done: Vec<(usize, Opened)> = Vec::new();
            loop {
                let start = next.fetch_add(OPEN_CHUNK, std::sync::atomic::Ordering::Relaxed);
                let Some(chunk) = partitions.get(start..(start + OPEN_CHUNK).min(partitions.len()))
                else {
                    return done;
                };
                if chunk.is_empty() {
                    return done;
                }
                done.extend(
                    chunk
                        .iter()
                        .enumerate()
                        .map(|(i, p)| (start + i, open_one(p))),
                );
            }
        };
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads).map(|_| scope.spawn(work)).collect();
            for worker in workers {
                // A panicked worker leaves its slots empty: reported below.
                for (i, r) in worker.join().unwrap_or_default() {
                    opened[i] = Some(r);
                }
            }
        });
    }
    partitions
        .into_iter()
        .zip(opened)
        .map(|((topic, _, _), r)| {
            let r = r.unwrap_or_else(|| {
                Err(LogError::Io(std::io::Error::other(
                    "a partition recovery thread panicked",
                )))
            });
            r.map(|p| (topic, p))
        })
        .collect()
}

/// Partitions a recovery thread takes at a time.
const OPEN_CHUNK: usize = 64;

/// Effective config of a topic: broker defaults with the overrides applied.
fn effective(
    defaults: &TopicConfig,
    overrides: &BTreeMap<String, String>,
) -> Result<TopicConfig, LogError> {
    Ok(TopicConfig::with_overrides(defaults, overrides)?)
}

impl Store {
    /// Opens (creating if needed) the data directory and recovers every
    /// partition: validates segment tails, truncates torn writes, rebuilds
    /// indexes, rebuilds producer state. Must be called inside a Tokio runtime
    /// (background flushers are spawned on it).
    pub fn open(config: StoreConfig) -> Result<Arc<Store>, LogError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            LogError::Io(std::io::Error::other(
                "Store::open must be called inside a Tokio runtime",
            ))
        })?;
        let data_dir = config.data_dir.clone();
        fs::create_dir_all(&data_dir)?;
        let meta_dir = data_dir.join(META_DIR);
        let fresh_meta = !meta_dir.exists();
        fs::create_dir_all(&meta_dir)?;
        if fresh_meta {
            fsutil::sync_dir(&data_dir)?;
        }

        let cluster_id = match fsutil::read_optional(&meta_dir.join(CLUSTER_ID_FILE))? {
            Some(b) if !String::from_utf8_lossy(&b).trim().is_empty() => {
                String::from_utf8_lossy(&b).trim().to_string()
            }
            _ => {
                let id = base64url(uuid::Uuid::new_v4().as_bytes());
                fsutil::atomic_write(&meta_dir.join(CLUSTER_ID_FILE), id.as_bytes())?;
                id
            }
        };

        let next_pid = match fsutil::read_optional(&meta_dir.join(PRODUCER_ID_FILE))? {
            Some(b) => String::from_utf8_lossy(&b)
                .trim()
                .parse::<i64>()
                .map_err(|_| {
                    LogError::Io(std::io::Error::other(format!(
                        "unreadable {}",
                        meta_dir.join(PRODUCER_ID_FILE).display()
                    )))
                })?,
            None => 0,
        };

        // Kafka's `.kafka_cleanshutdown`: whatever happens from here on, the
        // next open must not trust the files unless this run closes cleanly.
        let marker = meta_dir.join(CLEAN_SHUTDOWN_FILE);
        let opening = match fs::remove_file(&marker) {
            Ok(()) => {
                fsutil::sync_dir(&meta_dir)?;
                Opening::AfterCleanShutdown
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Opening::AfterCrash,
            Err(e) => return Err(e.into()),
        };
        tracing::info!(data_dir = %data_dir.display(), ?opening, "opening the store");

        let topics_file: TopicsFile = match fsutil::read_optional(&meta_dir.join(TOPICS_FILE))? {
            Some(b) => serde_json::from_slice(&b).map_err(|e| {
                LogError::Io(std::io::Error::other(format!(
                    "unreadable {}: {e}",
                    meta_dir.join(TOPICS_FILE).display()
                )))
            })?,
            None => TopicsFile::default(),
        };

        let mut topics = BTreeMap::new();
        let mut to_open = Vec::new();
        for rec in topics_file.topics {
            let id = unhex(&rec.id).ok_or_else(|| {
                LogError::Io(std::io::Error::other(format!(
                    "bad id of topic {}",
                    rec.name
                )))
            })?;
            let cfg = effective(&config.defaults, &rec.overrides)?;
            let shared = Arc::new(RwLock::new(cfg));
            for p in 0..rec.partitions {
                to_open.push((rec.name.clone(), p, shared.clone()));
            }
            topics.insert(
                rec.name.clone(),
                TopicState {
                    id,
                    overrides: rec.overrides,
                    config: shared,
                    partitions: Vec::with_capacity(rec.partitions as usize),
                },
            );
        }
        let opened = open_partitions(&data_dir, to_open, config.flush, &runtime, opening)?;
        for (topic, partition) in opened {
            if let Some(t) = topics.get_mut(&topic) {
                t.partitions.push(partition);
            }
        }

        if opening == Opening::AfterCrash && config.flush != FlushPolicy::Never {
            // What a killed process left in the page cache, and every
            // repair recovery made, becomes durable here, before the high
            // watermarks (the log ends) are served: one sync of the file
            // system instead of an fsync per segment.
            syncfs(&data_dir)?;
        }

        // Partition directories no topic claims: a topic deleted or a
        // creation interrupted by a crash.
        for entry in fs::read_dir(&data_dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some((topic, part)) = name.rsplit_once('-') else {
                continue;
            };
            let Ok(part) = part.parse::<u32>() else {
                continue;
            };
            if TopicName::validate(topic).is_err() || !entry.path().is_dir() {
                continue;
            }
            let claimed = topics
                .get(topic)
                .is_some_and(|t| (part as usize) < t.partitions.len());
            if !claimed {
                tracing::warn!(dir = %entry.path().display(), "removing partition directory of no topic");
                fs::remove_dir_all(entry.path())?;
            }
        }

        Ok(Arc::new(Store {
            meta_dir,
            runtime,
            topics: RwLock::new(topics),
            meta_lock: Mutex::new(()),
            cluster_id,
            reserved_producer_ids: next_pid,
            config,
        }))
    }

    fn persist_topics(&self, topics: &BTreeMap<String, TopicState>) -> Result<(), LogError> {
        let file = TopicsFile {
            topics: topics
                .iter()
                .map(|(name, t)| TopicRecord {
                    name: name.clone(),
                    id: hex(&t.id),
                    partitions: t.partitions.len() as u32,
                    overrides: t.overrides.clone(),
                })
                .collect(),
        };
        let json = serde_json::to_vec_pretty(&file)
            .map_err(|e| LogError::Io(std::io::Error::other(e.to_string())))?;
        fsutil::atomic_write(&self.meta_dir.join(TOPICS_FILE), &json)?;
        Ok(())
    }

    fn info(&self, name: &str, t: &TopicState) -> TopicInfo {
        TopicInfo {
            name: name.to_string(),
            id: t.id,
            partitions: t.partitions.len() as u32,
            config: t.config.read().clone(),
            overrides: t.overrides.clone(),
            internal: sluice_vocab::internal::is_internal(name),
        }
    }

    /// Creates a topic. `validate_only` checks everything without creating.
    pub fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        overrides: &BTreeMap<String, String>,
        validate_only: bool,
    ) -> Result<TopicInfo, LogError> {
        self.create_topic_with_id(name, partitions, overrides, validate_only, None)
    }

    /// Cluster mode: makes the local topic match the metadata quorum's
    /// record of it. Creates it with exactly `topic_id` when missing; a
    /// topic of that name with another id (deleted and created again while
    /// this node was away) is deleted and created anew; missing partitions
    /// are added; the storage config overrides become `configs` (keys the
    /// storage engine does not know, such as `min.insync.replicas`, are the
    /// replication layer's and are skipped here).
    pub fn ensure_topic(
        &self,
        name: &str,
        topic_id: [u8; 16],
        partitions: u32,
        configs: &BTreeMap<String, String>,
    ) -> Result<TopicInfo, LogError> {
        let overrides: BTreeMap<String, String> = configs
            .iter()
            .filter(|(k, _)| TopicConfig::KEYS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        match self.topic(name) {
            None => {}
            Some(t) if t.id != topic_id => {
                tracing::info!(
                    topic = name,
                    "replacing a local topic of the same name but another id"
                );
                self.delete_topic(name)?;
            }
            Some(t) => {
                if t.partitions < partitions {
                    self.create_partitions(name, partitions, false)?;
                }
                if t.overrides != overrides {
                    self.replace_overrides(name, overrides)?;
                }
                return self
                    .topic(name)
                    .ok_or_else(|| LogError::UnknownTopicOrPartition(name.to_string()));
            }
        }
        match self.create_topic_with_id(name, partitions, &overrides, false, Some(topic_id)) {
            // Another caller created it first with the same id.
            Err(LogError::TopicAlreadyExists(_)) => match self.topic(name) {
                Some(t) if t.id == topic_id => Ok(t),
                _ => Err(LogError::TopicAlreadyExists(name.to_string())),
            },
            other => other,
        }
    }

    fn create_topic_with_id(
        &self,
        name: &str,
        partitions: u32,
        overrides: &BTreeMap<String, String>,
        validate_only: bool,
        topic_id: Option<[u8; 16]>,
    ) -> Result<TopicInfo, LogError> {
        TopicName::validate(name)?;
        if partitions == 0 || partitions > MAX_PARTITIONS {
            return Err(LogError::InvalidPartitions(format!(
                "number of partitions must be in [1, {MAX_PARTITIONS}], got {partitions}"
            )));
        }
        let cfg = effective(&self.config.defaults, overrides)?;
        let _g = self.meta_lock.lock();
        if self.topics.read().contains_key(name) {
            return Err(LogError::TopicAlreadyExists(name.to_string()));
        }
        let id = topic_id.unwrap_or_else(|| *uuid::Uuid::new_v4().as_bytes());
        if validate_only {
            return Ok(TopicInfo {
                name: name.to_string(),
                id,
                partitions,
                config: cfg,
                overrides: overrides.clone(),
                internal: sluice_vocab::internal::is_internal(name),
            });
        }
        let shared = Arc::new(RwLock::new(cfg));
        let mut parts = Vec::with_capacity(partitions as usize);
        for p in 0..partitions {
            let dir = partition_dir(&self.config.data_dir, name, p);
            // A leftover directory of an earlier topic of the same name.
            if dir.exists() {
                fs::remove_dir_all(&dir)?;
            }
            parts.push(Partition::open(
                name,
                p as i32,
                dir,
                shared.clone(),
                self.config.flush,
                &self.runtime,
                Opening::New,
            )?);
        }
        fsutil::sync_dir(&self.config.data_dir)?;
        let state = TopicState {
            id,
            overrides: overrides.clone(),
            config: shared,
            partitions: parts,
        };
        let info = self.info(name, &state);
        let mut topics = self.topics.write();
        topics.insert(name.to_string(), state);
        if let Err(e) = self.persist_topics(&topics) {
            if let Some(t) = topics.remove(name) {
                for p in &t.partitions {
                    p.mark_deleted();
                }
            }
            return Err(e);
        }
        Ok(info)
    }

    /// Deletes a topic and its files.
    pub fn delete_topic(&self, name: &str) -> Result<(), LogError> {
        let _g = self.meta_lock.lock();
        let removed = {
            let mut topics = self.topics.write();
            let Some(t) = topics.remove(name) else {
                return Err(LogError::UnknownTopicOrPartition(name.to_string()));
            };
            if let Err(e) = self.persist_topics(&topics) {
                topics.insert(name.to_string(), t);
                return Err(e);
            }
            t
        };
        for p in &removed.partitions {
            p.mark_deleted();
            match fs::remove_dir_all(p.dir()) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Grows a topic to `total` partitions (never shrinks: InvalidPartitions).
    fn create_partitions(
        &self,
        name: &str,
        total: u32,
        validate_only: bool,
    ) -> Result<(), LogError> {
        let _g = self.meta_lock.lock();
        let (current, shared) = {
            let topics = self.topics.read();
            let t = topics
                .get(name)
                .ok_or_else(|| LogError::UnknownTopicOrPartition(name.to_string()))?;
            (t.partitions.len() as u32, t.config.clone())
        };
        if total <= current {
            return Err(LogError::InvalidPartitions(format!(
                "topic {name} has {current} partitions; the new count {total} must be larger"
            )));
        }
        if total > MAX_PARTITIONS {
            return Err(LogError::InvalidPartitions(format!(
                "at most {MAX_PARTITIONS} partitions"
            )));
        }
        if validate_only {
            return Ok(());
        }
        let mut added = Vec::new();
        for p in current..total {
            let dir = partition_dir(&self.config.data_dir, name, p);
            if dir.exists() {
                fs::remove_dir_all(&dir)?;
            }
            added.push(Partition::open(
                name,
                p as i32,
                dir,
                shared.clone(),
                self.config.flush,
                &self.runtime,
                Opening::New,
            )?);
        }
        fsutil::sync_dir(&self.config.data_dir)?;
        let mut topics = self.topics.write();
        let Some(t) = topics.get_mut(name) else {
            return Err(LogError::UnknownTopicOrPartition(name.to_string()));
        };
        t.partitions.extend(added);
        if let Err(e) = self.persist_topics(&topics) {
            if let Some(t) = topics.get_mut(name) {
                for p in t.partitions.drain(current as usize..) {
                    p.mark_deleted();
                }
            }
            return Err(e);
        }
        Ok(())
    }

    /// All topics, sorted by name.
    pub fn topics(&self) -> Vec<TopicInfo> {
        self.topics
            .read()
            .iter()
            .map(|(n, t)| self.info(n, t))
            .collect()
    }

    pub fn topic(&self, name: &str) -> Option<TopicInfo> {
        self.topics.read().get(name).map(|t| self.info(name, t))
    }

    pub fn partition(&self, topic: &str, partition: i32) -> Option<Arc<Partition>> {
        let idx = usize::try_from(partition).ok()?;
        self.topics.read().get(topic)?.partitions.get(idx).cloned()
    }

    /// Makes `overrides` the topic's config overrides (all or none), persisting them.
    fn replace_overrides(
        &self,
        name: &str,
        overrides: BTreeMap<String, String>,
    ) -> Result<(), LogError> {
        let _g = self.meta_lock.lock();
        let cfg = effective(&self.config.defaults, &overrides)?;
        let mut topics = self.topics.write();
        let Some(t) = topics.get_mut(name) else {
            return Err(LogError::UnknownTopicOrPartition(name.to_string()));
        };
        let old = std::mem::replace(&mut t.overrides, overrides);
        if let Err(e) = self.persist_topics(&topics) {
            if let Some(t) = topics.get_mut(name) {
                t.overrides = old;
            }
            return Err(e);
        }
        if let Some(t) = topics.get(name) {
            *t.config.write() = cfg;
        }
        Ok(())
    }

    fn all_partitions(&self) -> Vec<Arc<Partition>> {
        self.topics
            .read()
            .values()
            .flat_map(|t| t.partitions.iter().cloned())
            .collect()
    }

    /// Rolls segments past `segment.ms` and deletes whole segments past
    /// `retention.ms` / `retention.bytes`. Returns the number of segments
    /// deleted. The server calls this periodically.
    pub fn enforce_retention(&self) -> Result<usize, LogError> {
        let now = now_ms();
        let mut deleted = 0;
        for p in self.all_partitions() {
            deleted += p.enforce_retention(now)?;
        }
        Ok(deleted)
    }

    /// One compaction round on every partition of a `cleanup.policy=compact`
    /// topic that needs one (the dirty ratio or `max.compaction.lag.ms`).
    /// Blocking work: the server runs it on a blocking thread.
    /// A partition whose round fails is logged and left as it was (the swap
    /// protocol guarantees that); the others go on.
    pub fn compact(&self) -> Vec<CleanStats> {
        let mut rounds = Vec::new();
        for p in self.all_partitions() {
            match p.compact(&self.config.cleaner, false) {
                Ok(Some(stats)) => rounds.push(stats),
                Ok(None) => {}
                Err(e) => tracing::error!(partition = ?p, error = %e, "log compaction failed"),
            }
        }
        rounds
    }

    /// Producer ids below this were handed out from this data directory itself,
    /// before the metadata quorum allocated them (an earlier single-node release
    /// wrote `meta/producer-id-block`); 0 when none were.
    pub fn reserved_producer_ids(&self) -> i64 {
        self.reserved_producer_ids
    }

    /// The data directory (Kafka's log dir).
    pub fn data_dir(&self) -> &std::path::Path {
        &self.config.data_dir
    }

    /// A random id made when the data directory is first created (Kafka's cluster id).
    pub fn cluster_id(&self) -> String {
        self.cluster_id.clone()
    }

    /// The broker-wide topic config defaults that topics override key by key.
    pub fn topic_defaults(&self) -> &TopicConfig {
        &self.config.defaults
    }

    /// Flushes everything: index entries held in memory and the high
    /// watermarks of replicated partitions go to their files, then one
    /// `syncfs` makes the whole file system's writes durable (one call
    /// instead of several fsyncs per partition).
    pub fn flush_all(&self) -> Result<(), LogError> {
        let partitions = self.all_partitions();
        let mut rounds = Vec::with_capacity(partitions.len());
        for p in &partitions {
            if let Some(round) = p.begin_flush()? {
                rounds.push((p, round));
            }
        }
        syncfs(&self.config.data_dir)?;
        for (p, round) in rounds {
            p.finish_flush(round);
        }
        Ok(())
    }

    /// Clean shutdown: flushes everything ([`Store::flush_all`]) and marks
    /// the store cleanly closed, so that the next open skips the recovery
    /// checks (CRC walks, index comparisons, syncs). Nothing may be written
    /// after this.
    pub fn close(&self) -> Result<(), LogError> {
        self.flush_all()?;
        fsutil::atomic_write(&self.meta_dir.join(CLEAN_SHUTDOWN_FILE), b"")?;
        Ok(())
    }

    /// Writes down the high watermark of every replicated partition whose
    /// watermark moved since its last checkpoint; the number written. The
    /// server calls this periodically in cluster mode.
    pub fn checkpoint_high_watermarks(&self) -> Result<usize, LogError> {
        let mut written = 0;
        for p in self.all_partitions() {
            written += usize::from(p.checkpoint_high_watermark()?);
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_encode() {
        let id = [0xabu8; 16];
        assert_eq!(unhex(&hex(&id)), Some(id));
        assert_eq!(unhex("zz"), None);
        assert_eq!(base64url(&[0u8; 16]).len(), 22);
        assert_eq!(base64url(&[0xffu8; 16]), "_____________________w");
    }
}

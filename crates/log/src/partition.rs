//! One partition's log: segments, appends with group commit, reads,
//! retention, truncation and recovery; follower appends and the high
//! watermark of replicated mode.
//!
//! Locking: `writer` (the append lock) serialises every mutation; `view`
//! (a RwLock) holds what readers need and is write-locked only for short
//! in-memory updates. No lock is held while fsyncing: the flusher takes a
//! snapshot of the files to sync under `view`, syncs without locks, then
//! publishes the new durable offset.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;

use crate::batch::{self, BatchHeader};
use crate::epoch::EpochCache;
use crate::fsutil;
use crate::index::{self, Located};
use crate::producer::{is_idempotent, ActiveProducer, Check, ProducerEntry, ProducerStates};
use crate::segment::{self, IndexTail, SegFiles, SegMeta, Stop, INDEX_WRITE_BATCH};
use crate::txn::{AbortedTxn, Marker, Transactions};
use crate::{AppendResult, FlushPolicy, LogError, ReadLimit, ReadResult, TopicConfig};

mod compact;

pub use compact::CleanStats;

const LOG_START_FILE: &str = "log-start-offset";
/// Replicated mode: the last high watermark written down (Kafka's
/// replication-offset-checkpoint), so a restarted replica serves the records
/// it knows were committed before its followers or leader tell it again.
const HIGH_WATERMARK_FILE: &str = "high-watermark";

/// Extra bytes read before the target batch on a fetch, beyond
/// `index.interval.bytes`, so that one pread normally covers the gap from
/// the index entry to the requested batch.
const READ_SLACK: usize = 16 * 1024;

const STATE_OK: u8 = 0;
const STATE_FAILED: u8 = 1;
const STATE_DELETED: u8 = 2;

pub(crate) use sluice_vocab::now_ms;

/// Raises a monotonic offset watch to `to`; notifies only on a change.
fn raise(tx: &watch::Sender<i64>, to: i64) {
    tx.send_if_modified(|v| {
        if to > *v {
            *v = to;
            true
        } else {
            false
        }
    });
}

#[derive(Clone, Copy, Debug)]
struct Durable {
    offset: i64,
    /// The partition can no longer make anything durable (fsync failed or
    /// the topic was deleted); waiters give up.
    stopped: bool,
}

/// State owned by the append lock.
struct Writer {
    producers: ProducerStates,
    epochs: EpochCache,
    /// Reused write buffer: the one copy of an append's bytes, stamped.
    buf: Vec<u8>,
    /// Reused buffers of the bulk index writes.
    index_tail: IndexTail,
    /// The epoch cache has an assigned epoch its checkpoint file lacks.
    epochs_unwritten: bool,
}

/// State readers look at.
struct View {
    /// Boxed: a map node holds eleven slots, and most partitions have one
    /// segment, so inline values would cost a partition ~1.5 KB of slots.
    segments: BTreeMap<i64, Box<SegMeta>>,
    log_start: i64,
    log_end: i64,
    /// Rolled segments whose data is not known to be synced yet.
    pending_sync: Vec<Arc<SegFiles>>,
    /// Segment files were created or removed since the last directory fsync.
    dir_dirty: bool,
    unflushed_bytes: u64,
    /// Bumped by truncation, so a flush that started before it does not
    /// declare the rewritten offsets durable.
    generation: u64,
}

impl View {
    fn active(&self) -> Option<&SegMeta> {
        self.segments.last_key_value().map(|(_, s)| &**s)
    }
}

/// What the flusher syncs in one round.
struct SyncWork {
    target: i64,
    generation: u64,
    pending: Vec<Arc<SegFiles>>,
    active: Option<Arc<SegFiles>>,
    dir: bool,
}

impl SyncWork {
    fn run(&self, dir: &Path) -> io::Result<()> {
        for f in &self.pending {
            f.log()?.sync_data()?;
            f.sync_indexes()?;
        }
        if let Some(a) = &self.active {
            a.log()?.sync_data()?;
        }
        if self.dir {
            fsutil::sync_dir(dir)?;
        }
        Ok(())
    }
}

/// A flush round of a store-wide flush: taken, not yet published.
pub(crate) struct FlushRound<'a> {
    _round: parking_lot::MutexGuard<'a, ()>,
    work: SyncWork,
}

/// One partition's log.
pub struct Partition {
    topic: String,
    id: i32,
    dir: PathBuf,
    config: Arc<RwLock<TopicConfig>>,
    flush: FlushPolicy,
    writer: Mutex<Writer>,
    /// Open and aborted transactions; changed under the append lock, read
    /// by fetches without it.
    txns: RwLock<Transactions>,
    view: RwLock<View>,
    /// Log end offset after each append; wakes the flusher.
    written_tx: watch::Sender<i64>,
    durable_tx: watch::Sender<Durable>,
    hw_tx: watch::Sender<i64>,
    /// Offsets below are durable under the flush policy (the log end when
    /// the policy does not fsync before acknowledging).
    durable_end_tx: watch::Sender<i64>,
    /// Replicated mode: the high watermark moves only by
    /// `advance_high_watermark` (the replication layer knows what the
    /// in-sync replicas hold); local mode: it follows `durable_end`.
    replicated: AtomicBool,
    fsyncs: AtomicU64,
    /// What producers appended since the partition was opened.
    records_in: AtomicU64,
    bytes_in: AtomicU64,
    /// What consumers' fetches returned since the partition was opened.
    records_out: AtomicU64,
    bytes_out: AtomicU64,
    /// Moves (under the transactions lock) whenever an aborted transaction
    /// may leave the list other than by a roll filing it: a compaction
    /// dropping its marker, a truncation, the log start passing it. A
    /// `read_committed` read that sees it move between reading records and
    /// listing aborted transactions reads again (see [`Partition::read_committed`]).
    aborted_changes: AtomicU64,
    /// Rewrites of index files that lookups may be reading (see
    /// [`index::Rewrites`]).
    index_rewrites: index::Rewrites,
    /// The high watermark last written to `HIGH_WATERMARK_FILE` (-1: none).
    hw_written: AtomicI64,
    /// Held by a flush round from snapshot to publication.
    sync_lock: Mutex<()>,
    state: AtomicU8,
    /// Held by a compaction round.
    cleaning: Mutex<()>,
    /// The first offset compaction has not cleaned (checkpointed).
    first_dirty: AtomicI64,
}

impl std::fmt::Debug for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partition")
            .field("topic", &self.topic)
            .field("partition", &self.id)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// How [`Partition::open`] finds a partition directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Opening {
    /// Created now: the directory must not exist yet.
    New,
    /// The store was closed cleanly: its files are whole and synced.
    AfterCleanShutdown,
    /// Anything may be torn: full recovery.
    AfterCrash,
}

/// The codec and level a topic's `compression.type` stores producers'
/// batches with; None for `producer` (as they came).
fn stored_codec(c: &TopicConfig) -> Option<(sluice_codec::Codec, Option<i32>)> {
    use sluice_codec::Codec;
    use sluice_vocab::CompressionType as T;
    Some(match c.compression_type {
        T::Producer => return None,
        T::Uncompressed => (Codec::None, None),
        T::Gzip => (
            Codec::Gzip,
            Some(c.compression_gzip_level).filter(|l| *l > 0),
        ),
        T::Snappy => (Codec::Snappy, None),
        T::Lz4 => (Codec::Lz4, Some(c.compression_lz4_level)),
        T::Zstd => (Codec::Zstd, Some(c.compression_zstd_level)),
    })
}

/// Every batch fits `max.message.bytes`, else MESSAGE_TOO_LARGE.
fn check_sizes(headers: &[BatchHeader], max_message: usize) -> Result<(), LogError> {
    match headers.iter().find(|h| h.size() > max_message) {
        Some(h) => Err(LogError::MessageTooLarge {
            size: h.size(),
            max: max_message,
        }),
        None => Ok(()),
    }
}

/// What an append may hold.
#[derive(Clone, Copy, Debug)]
enum AppendKind {
    /// A producer's batches, not transactional.
    Data,
    /// A transactional producer's batches.
    Transactional,
    /// The broker's transactional batches for a producer (no sequences).
    InTransaction,
    /// The broker's own control batches, not transactional (AMQP delivery state).
    Control,
    /// A transaction coordinator's marker.
    Marker(Marker),
}

impl AppendKind {
    fn check(self, h: &BatchHeader) -> Result<(), LogError> {
        let refused = match self {
            AppendKind::Data if h.is_transactional() || h.is_control() => {
                "transactional batches need a transactional producer, and control batches are the broker's"
            }
            AppendKind::Transactional
                if !h.is_transactional() || h.is_control() || !is_idempotent(h) =>
            {
                "a transactional producer's batches are transactional, idempotent data"
            }
            AppendKind::InTransaction
                if !h.is_transactional() || h.is_control() || h.producer_id < 0 =>
            {
                "records written in a transaction are transactional data of a producer"
            }
            AppendKind::Control if h.is_transactional() || !h.is_control() => {
                "only non-transactional control batches are the broker's to write"
            }
            _ => return Ok(()),
        };
        Err(LogError::InvalidRecord(refused.into()))
    }

    fn is_transactional(self) -> bool {
        matches!(
            self,
            AppendKind::Transactional | AppendKind::InTransaction | AppendKind::Marker(_)
        )
    }
}

/// The transaction marker a batch of a segment file holds, read at `pos`;
/// `None` for any other batch (only transactional control batches are read).
fn marker_at(log: &fs::File, pos: u64, h: &BatchHeader) -> Option<Marker> {
    if !(h.is_transactional() && h.is_control()) {
        return None;
    }
    let mut buf = vec![0u8; h.size()];
    log.read_exact_at(&mut buf, pos).ok()?;
    Marker::read(h, Bytes::from(buf))
}

/// Where each segment's aborted transactions live once filed.
struct Filed {
    /// Sealed segments: base, first offset of the earliest aborted
    /// transaction in its `.txnindex` (`None`: no file).
    sealed: Vec<(i64, Option<i64>)>,
    /// The active segment's, kept in memory.
    active: Vec<AbortedTxn>,
}

/// Files the aborted transactions a walk found per segment (`found`, by
/// base): each sealed segment's go to its `.txnindex` (rewritten only when
/// it differs), the active (last) segment's stay in memory and it keeps no
/// file. `maybe_filed(base)`: whether that segment may have a file.
fn file_aborted(
    segments: impl Iterator<Item = (i64, Arc<SegFiles>)>,
    mut found: BTreeMap<i64, Vec<AbortedTxn>>,
    maybe_filed: impl Fn(i64) -> bool,
) -> io::Result<Filed> {
    let mut segments = segments.peekable();
    let mut filed = Filed {
        sealed: Vec::new(),
        active: Vec::new(),
    };
    while let Some((base, files)) = segments.next() {
        let entries = found.remove(&base).unwrap_or_default();
        if segments.peek().is_none() {
            files.store_aborted(&[], maybe_filed(base))?;
            filed.active = entries;
        } else {
            let from = files.store_aborted(&entries, maybe_filed(base))?;
            filed.sealed.push((base, from));
        }
    }
    Ok(filed)
}

fn parse_log_name(name: &str) -> Option<i64> {
    let stem = name.strip_suffix(segment::LOG_SUFFIX)?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

/// An offset written by `fsutil::atomic_write` into `dir/name`; `None` when the
/// file is missing or unreadable (a checkpoint is only ever a hint bounded by
/// what recovery finds).
fn read_offset_checkpoint(dir: &Path, name: &str) -> io::Result<Option<i64>> {
    let Some(bytes) = fsutil::read_optional(&dir.join(name))? else {
        return Ok(None);
    };
    let parsed = std::str::from_utf8(&bytes)
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok());
    if parsed.is_none() {
        tracing::warn!(dir = %dir.display(), file = name, "ignoring an unreadable offset checkpoint");
    }
    Ok(parsed)
}

impl Partition {
    /// Opens (creating when needed) a partition directory and recovers it.
    ///
    /// `opening` says how the store was left: after a clean shutdown the
    /// files are known whole, synced and matching their indexes, so the
    /// last segment gets the structural walk only, index files are not
    /// compared and nothing is synced. A new partition's directory is not
    /// synced either: its first flush syncs it (an empty partition lost in
    /// a crash is recreated empty).
    pub(crate) fn open(
        topic: &str,
        id: i32,
        dir: PathBuf,
        config: Arc<RwLock<TopicConfig>>,
        flush: FlushPolicy,
        runtime: &tokio::runtime::Handle,
        opening: Opening,
    ) -> Result<Arc<Partition>, LogError> {
        if opening == Opening::New {
            fs::create_dir(&dir)?;
        } else if !dir.is_dir() {
            // A look-up, not a mkdir that fails: mkdir takes the data
            // directory's lock, which every partition of the store shares.
            fs::create_dir_all(&dir)?;
        }
        let clean = opening != Opening::AfterCrash;
        let interval = config.read().index_interval_bytes;
        let mut bases = Vec::new();
        let mut stems = Vec::new();
        let mut present = Vec::new();
        let mut txn_indexes = HashSet::new();
        let mut swaps = false;
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(base) = parse_log_name(name) {
                bases.push(base);
            } else if name.ends_with(segment::INDEX_SUFFIX)
                || name.ends_with(segment::TIME_SUFFIX)
                || name.ends_with(segment::TXN_INDEX_SUFFIX)
            {
                if let Some(base) = name
                    .strip_suffix(segment::TXN_INDEX_SUFFIX)
                    .and_then(|stem| stem.parse::<i64>().ok())
                {
                    txn_indexes.insert(base);
                }
                stems.push(name.to_string());
            } else if name.ends_with(".tmp") {
                // A checkpoint replacement interrupted by a crash.
                let _ = fs::remove_file(entry.path());
            } else if compact::is_swap_file(name) {
                swaps = true;
            } else {
                present.push(name.to_string());
            }
        }
        if swaps {
            compact::finish_swaps(&dir)?;
            return Partition::open(topic, id, dir, config, flush, runtime, Opening::AfterCrash);
        }
        let has = |file: &str| present.iter().any(|n| n == file);
        bases.sort_unstable();
        // Index files without a log file belong to a deleted segment.
        for name in stems {
            let stem = name.split('.').next().unwrap_or_default();
            if !bases.iter().any(|b| segment::stem(*b) == stem) {
                let _ = fs::remove_file(dir.join(&name));
            }
        }

        let loaded_epochs = if has(crate::epoch::CHECKPOINT_FILE) {
            EpochCache::load(&dir)?
        } else {
            EpochCache::empty(&dir)
        };
        let mut epochs = loaded_epochs.clone();
        let mut producers = ProducerStates::default();
        let mut txns = Transactions::default();
        // Each segment's aborted transactions, filed once the segments that
        // survive are known.
        let mut aborted = BTreeMap::new();
        let mut segments = BTreeMap::new();
        let mut prev_next: Option<i64> = None;
        let mut drop_rest = false;
        let count = bases.len();
        for (i, base) in bases.into_iter().enumerate() {
            let files = SegFiles::existing(&dir, base);
            if drop_rest || prev_next.is_some_and(|p| base < p) {
                tracing::warn!(
                    file = %files.log_path.display(),
                    "removing segment after a truncated or overlapping one"
                );
                files.remove_files()?;
                drop_rest = true;
                continue;
            }
            let log = files.log()?;
            let file_len = log.metadata()?.len();
            let is_last = i + 1 == count;
            let snapshot = (producers.clone(), epochs.clone(), txns.clone());
            let mut replay = |pos: u64, h: &BatchHeader| {
                let marker = marker_at(&log, pos, h);
                producers.replay(h, marker);
                txns.replay(h, marker);
                epochs.assign(h.partition_leader_epoch, h.base_offset);
            };
            let verify_crc = is_last && !clean;
            let mut w = segment::walk(&log, base, file_len, verify_crc, interval, &mut replay)?;
            let (on_disk_index, on_disk_time) = if clean {
                (Vec::new(), Vec::new())
            } else {
                (
                    fsutil::read_optional(&files.index_path)?.unwrap_or_default(),
                    fsutil::read_optional(&files.time_path)?.unwrap_or_default(),
                )
            };
            let index_matches = |w: &segment::Walk| {
                clean
                    || (on_disk_index == w.index.encode_offsets()
                        && on_disk_time == w.index.encode_times())
            };
            if !is_last && !clean {
                // Older segments get a structural walk. A full CRC walk
                // follows when something is off: a structural fault, a bad
                // CRC on the last batch (a tail never synced before a
                // crash), or index files that do not match the log.
                let last_ok = match w.last_batch {
                    Some((pos, size)) => segment::batch_crc_ok(&log, pos, size)?,
                    None => true,
                };
                if w.fault.is_some() || !last_ok || !index_matches(&w) {
                    (producers, epochs, txns) = snapshot;
                    let mut replay = |pos: u64, h: &BatchHeader| {
                        let marker = marker_at(&log, pos, h);
                        producers.replay(h, marker);
                        txns.replay(h, marker);
                        epochs.assign(h.partition_leader_epoch, h.base_offset);
                    };
                    w = segment::walk(&log, base, file_len, true, interval, &mut replay)?;
                }
            }
            if let Some(why) = &w.fault {
                tracing::warn!(
                    file = %files.log_path.display(),
                    offset = w.next_offset,
                    position = w.valid_len,
                    bytes_dropped = file_len - w.valid_len,
                    reason = %why,
                    "truncating torn or corrupt segment tail"
                );
                log.set_len(w.valid_len)?;
                log.sync_all()?;
                drop_rest = true;
            }
            if !index_matches(&w) {
                tracing::info!(file = %files.log_path.display(), "rebuilding segment indexes");
                files.write_indexes(&w.index)?;
            }
            let files = Arc::new(files);
            let mut meta = SegMeta::new_empty(files, now_ms());
            meta.size = w.valid_len;
            meta.next_offset = w.next_offset;
            // The files match the derived index now (checked or rewritten).
            meta.index = w.index;
            meta.index_written(meta.index.len(), !is_last);
            meta.first_batch_ts = w.first_batch_ts;
            prev_next = Some(meta.next_offset);
            segments.insert(base, meta);
            aborted.insert(base, txns.take_aborted());
        }

        let checkpoint = |name: &str| match has(name) {
            true => read_offset_checkpoint(&dir, name),
            false => Ok(None),
        };
        let log_start_checkpoint = checkpoint(LOG_START_FILE)?;
        let hw_checkpoint = checkpoint(HIGH_WATERMARK_FILE)?;
        let cleaned_to = checkpoint(compact::CLEANER_CHECKPOINT_FILE)?;
        // The new segment's directory entry is synced by the first flush.
        let dir_dirty = segments.is_empty();
        if segments.is_empty() {
            let start = log_start_checkpoint.unwrap_or(0).max(0);
            let files = Arc::new(SegFiles::create(&dir, start)?);
            segments.insert(start, SegMeta::new_empty(files, now_ms()));
        }
        let first_base = segments.first_key_value().map_or(0, |(b, _)| *b);
        let log_end = segments
            .last_key_value()
            .map_or(first_base, |(_, s)| s.next_offset);
        let log_start = log_start_checkpoint
            .unwrap_or(first_base)
            .max(first_base)
            .min(log_end);
        // Segments wholly below the log start (a crash between moving the
        // checkpoint and deleting them) are finished off now.
        let bases: Vec<i64> = segments.keys().copied().collect();
        for pair in bases.windows(2) {
            if let [base, next] = pair {
                if *next <= log_start {
                    if let Some(s) = segments.remove(base) {
                        s.files.remove_files()?;
                    }
                }
            }
        }
        let filed = file_aborted(
            segments.iter().map(|(b, s)| (*b, s.files.clone())),
            aborted,
            |base| txn_indexes.contains(&base),
        )?;
        for (base, from) in filed.sealed {
            if let Some(s) = segments.get_mut(&base) {
                s.aborted_from = from;
            }
        }
        txns.set_aborted(filed.active);
        // Epochs claiming offsets past the log end came from a torn tail.
        // One starting exactly at the end is kept: a leader assigns its new
        // epoch there before writing anything (and a clean shutdown writes
        // it down), so dropping it would rewrite the checkpoint of every
        // partition at every start for nothing.
        epochs.truncate_from_end(log_end.saturating_add(1));
        epochs.truncate_from_start(log_start);
        txns.forget_before(log_start);
        if epochs != loaded_epochs {
            // Not synced: the batches hold every epoch that has records,
            // and this only drops epochs that have none (or adds ones the
            // batches show).
            epochs.persist_unsynced()?;
        }
        // What survived a crash in the page cache is made durable by the
        // store before anything is served (one file-system sync for all
        // partitions), so the high watermark may start at the log end.

        let (written_tx, written_rx) = watch::channel(log_end);
        let partition = Arc::new(Partition {
            topic: topic.to_string(),
            id,
            dir,
            config,
            flush,
            writer: Mutex::new(Writer {
                producers,
                epochs,
                buf: Vec::new(),
                index_tail: IndexTail::default(),
                epochs_unwritten: false,
            }),
            txns: RwLock::new(txns),
            view: RwLock::new(View {
                segments,
                log_start,
                log_end,
                pending_sync: Vec::new(),
                dir_dirty,
                unflushed_bytes: 0,
                generation: 0,
            }),
            written_tx,
            durable_tx: watch::channel(Durable {
                offset: log_end,
                stopped: false,
            })
            .0,
            hw_tx: watch::channel(log_end).0,
            durable_end_tx: watch::channel(log_end).0,
            replicated: AtomicBool::new(false),
            fsyncs: AtomicU64::new(0),
            records_in: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            records_out: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            aborted_changes: AtomicU64::new(0),
            index_rewrites: index::Rewrites::default(),
            hw_written: AtomicI64::new(hw_checkpoint.unwrap_or(-1)),
            sync_lock: Mutex::new(()),
            state: AtomicU8::new(STATE_OK),
            cleaning: Mutex::new(()),
            first_dirty: AtomicI64::new(cleaned_to.unwrap_or(0)),
        });
        let weak = Arc::downgrade(&partition);
        match flush {
            FlushPolicy::Always => {
                runtime.spawn(flusher_always(weak, written_rx));
            }
            FlushPolicy::Interval { ms, bytes } => {
                runtime.spawn(flusher_interval(weak, written_rx, ms, bytes));
            }
            FlushPolicy::Never => {}
        }
        Ok(partition)
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    fn check_usable(&self) -> Result<(), LogError> {
        match self.state.load(Ordering::Acquire) {
            STATE_OK => Ok(()),
            STATE_DELETED => Err(LogError::UnknownTopicOrPartition(format!(
                "{}-{}",
                self.topic, self.id
            ))),
            _ => Err(LogError::Io(io::Error::other(format!(
                "partition {}-{} is offline after a storage failure",
                self.topic, self.id
            )))),
        }
    }

    /// Stops the partition after its topic was deleted; waiters are released.
    pub(crate) fn mark_deleted(&self) {
        self.state.store(STATE_DELETED, Ordering::Release);
        self.durable_tx.send_modify(|d| d.stopped = true);
    }

    fn mark_failed(&self, what: &str, err: &io::Error) {
        if self.state.load(Ordering::Acquire) == STATE_DELETED {
            // The topic's files went away under a flush: expected, not a failure.
            return;
        }
        tracing::error!(
            topic = %self.topic,
            partition = self.id,
            error = %err,
            "{what} failed; partition taken offline"
        );
        let _ = self.state.compare_exchange(
            STATE_OK,
            STATE_FAILED,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        self.durable_tx.send_modify(|d| d.stopped = true);
    }

    /// Validates `records` (one or more RecordBatch v2, as sent by a
    /// producer), checks idempotent-producer sequences, assigns offsets,
    /// stamps `leader_epoch` and writes them. Returns once the bytes are
    /// written to the OS, before they are durable: call
    /// [`Partition::wait_durable`] before acknowledging.
    pub fn append(&self, records: &[u8], leader_epoch: i32) -> Result<AppendResult, LogError> {
        self.counted(
            records.len(),
            self.append_kind(records, leader_epoch, AppendKind::Data),
        )
    }

    /// [`Partition::append`] for a transactional producer: every batch is
    /// transactional and idempotent, and opens its producer's transaction
    /// here if none is open; the transaction stays open (holding the last
    /// stable offset back) until [`Partition::append_marker`] ends it.
    pub fn append_transactional(
        &self,
        records: &[u8],
        leader_epoch: i32,
    ) -> Result<AppendResult, LogError> {
        self.counted(
            records.len(),
            self.append_kind(records, leader_epoch, AppendKind::Transactional),
        )
    }

    /// Adds a producer's append to what this partition took in (a retry
    /// already in the log counts once).
    fn counted(
        &self,
        bytes: usize,
        appended: Result<AppendResult, LogError>,
    ) -> Result<AppendResult, LogError> {
        if let Ok(r) = &appended {
            if !r.duplicate && crate::hot_path_metrics() {
                let records = u64::try_from(r.end_offset - r.base_offset).unwrap_or(0);
                self.records_in.fetch_add(records, Ordering::Relaxed);
                self.bytes_in.fetch_add(bytes as u64, Ordering::Relaxed);
            }
        }
        appended
    }

    /// Records and bytes producers appended here since the partition was
    /// opened (a leader's count; replicas copied from a leader are not
    /// counted).
    pub fn produced(&self) -> (u64, u64) {
        (
            self.records_in.load(Ordering::Relaxed),
            self.bytes_in.load(Ordering::Relaxed),
        )
    }

    /// Adds what a consumer's fetch returned from this partition (whole
    /// batches as [`Partition::read`] gives them) to what it handed out:
    /// its bytes, and its records counted off the batch headers.
    pub fn count_fetched(&self, batches: &[u8]) {
        if batches.is_empty() || !crate::hot_path_metrics() {
            return;
        }
        let records = crate::count_records(batches);
        self.records_out.fetch_add(records, Ordering::Relaxed);
        self.bytes_out
            .fetch_add(batches.len() as u64, Ordering::Relaxed);
    }

    /// Records and bytes consumers' fetches returned from here since the
    /// partition was opened (see [`Partition::count_fetched`]).
    pub fn fetched(&self) -> (u64, u64) {
        (
            self.records_out.load(Ordering::Relaxed),
            self.bytes_out.load(Ordering::Relaxed),
        )
    }

    /// The broker's own records written inside a producer's transaction
    /// (offsets a TxnOffsetCommit commits): transactional batches of that
    /// producer, without sequence numbers (the broker writes them once).
    /// They open the producer's transaction here as its own batches would.
    pub fn append_in_transaction(
        &self,
        records: &[u8],
        leader_epoch: i32,
    ) -> Result<AppendResult, LogError> {
        self.append_kind(records, leader_epoch, AppendKind::InTransaction)
    }

    /// Ends `producer_id`'s transaction with the coordinator's marker (a
    /// COMMIT or ABORT control batch), written even when the transaction
    /// wrote nothing here, as Kafka does. A marker from an epoch older than
    /// the producer's is refused (a fenced coordinator request).
    pub fn append_marker(
        &self,
        producer_id: i64,
        producer_epoch: i16,
        marker: Marker,
        leader_epoch: i32,
    ) -> Result<AppendResult, LogError> {
        let batch = marker
            .batch(producer_id, producer_epoch, now_ms())
            .ok_or_else(|| LogError::InvalidRecord("empty transaction marker".into()))?;
        self.append_kind(&batch, leader_epoch, AppendKind::Marker(marker))
    }

    /// Appends the broker's own control batches (never a producer's: the wire
    /// front end refuses those): non-transactional batches with the control
    /// attribute, which Kafka consumers skip. The AMQP front end records a
    /// queue's delivery state this way, in the queue's own log, so it is
    /// replicated and trimmed with the messages it describes.
    pub fn append_control(
        &self,
        records: &[u8],
        leader_epoch: i32,
    ) -> Result<AppendResult, LogError> {
        self.append_kind(records, leader_epoch, AppendKind::Control)
    }

    fn append_kind(
        &self,
        records: &[u8],
        leader_epoch: i32,
        kind: AppendKind,
    ) -> Result<AppendResult, LogError> {
        self.check_usable()?;
        let (max_message, segment_bytes, segment_ms, interval, append_time, codec) = {
            let c = self.config.read();
            (
                c.max_message_bytes as usize,
                c.segment_bytes,
                c.segment_ms,
                c.index_interval_bytes,
                c.message_timestamp_type == sluice_vocab::TimestampType::LogAppendTime,
                stored_codec(&c),
            )
        };
        // Validation (CRC over every byte) happens before taking the lock.
        let mut headers = batch::validate_batches(records)?;
        // As Kafka: the batches as sent must fit before any rewrite (which
        // also bounds the work a recompression may take), and as stored after.
        check_sizes(&headers, max_message)?;
        // The topic may ask for producers' batches in another codec, or
        // with the broker's time (LogAppendTime): they are rewritten, in a
        // copy (the broker's own batches are stored as they are).
        let mut log_append_time_ms = -1;
        let mut rewritten = None;
        if matches!(kind, AppendKind::Data | AppendKind::Transactional) {
            if let Some((codec, level)) = codec {
                rewritten = batch::recompress(records, codec, level)?;
            }
            if append_time {
                log_append_time_ms = now_ms();
                let buf = rewritten.get_or_insert_with(|| records.to_vec());
                batch::stamp_log_append_time(buf, log_append_time_ms);
            }
        }
        let records = match &rewritten {
            Some(buf) => {
                headers = batch::validate_batches(buf)?;
                buf.as_slice()
            }
            None => records,
        };
        check_sizes(&headers, max_message)?;
        for h in &headers {
            kind.check(h)?;
        }

        let mut w = self.writer.lock();
        self.check_usable()?;
        let (log_end, log_start) = {
            let v = self.view.read();
            (v.log_end, v.log_start)
        };

        // Sequence checks against the producer state, including batches
        // earlier in this same append (staged in `touched`).
        let mut touched: Vec<(i64, Option<ProducerEntry>)> = Vec::new();
        let mut next = log_end;
        if let (AppendKind::Marker(_) | AppendKind::InTransaction, Some(h)) =
            (kind, headers.first())
        {
            if let Some(e) = w.producers.get(h.producer_id) {
                if h.producer_epoch < e.epoch {
                    return Err(LogError::InvalidProducerEpoch {
                        producer_id: h.producer_id,
                        current: e.epoch,
                        got: h.producer_epoch,
                    });
                }
            }
        }
        for h in &headers {
            if is_idempotent(h) {
                let slot = match touched.iter().position(|(p, _)| *p == h.producer_id) {
                    Some(i) => i,
                    None => {
                        touched.push((h.producer_id, w.producers.get(h.producer_id).cloned()));
                        touched.len() - 1
                    }
                };
                if let Some((_, entry)) = touched.get_mut(slot) {
                    match ProducerStates::check(entry.as_ref(), h)? {
                        Check::Duplicate(orig) => {
                            return Ok(AppendResult {
                                base_offset: orig.base_offset,
                                end_offset: orig.end_offset,
                                log_start_offset: log_start,
                                duplicate: true,
                                log_append_time_ms,
                            })
                        }
                        Check::Append => {
                            let mut stamped = *h;
                            stamped.base_offset = next;
                            ProducerStates::apply(entry, &stamped);
                        }
                    }
                }
            }
            next = BatchHeader {
                base_offset: next,
                ..*h
            }
            .next_offset();
        }

        self.write_locked(
            &mut w,
            records,
            &headers,
            log_end,
            next,
            Some(leader_epoch),
            (segment_bytes, segment_ms, interval),
        )?;
        for (pid, entry) in touched {
            if let Some(e) = entry {
                w.producers.insert(pid, e);
            }
        }
        if kind.is_transactional() {
            let mut txns = self.txns.write();
            let mut at = log_end;
            for h in &headers {
                let stamped = BatchHeader {
                    base_offset: at,
                    ..*h
                };
                if let AppendKind::Marker(m) = kind {
                    w.producers.end_transaction(&stamped, m);
                    txns.replay(&stamped, Some(m));
                } else {
                    txns.replay(&stamped, None);
                }
                at = stamped.next_offset();
            }
        }
        if w.epochs.assign(leader_epoch, log_end) {
            if let Err(e) = w.epochs.persist() {
                tracing::warn!(dir = %self.dir.display(), error = %e, "leader epoch checkpoint write failed");
            }
        }
        self.publish_written(next);
        drop(w);
        Ok(AppendResult {
            base_offset: log_end,
            end_offset: next,
            log_start_offset: log_start,
            duplicate: false,
            log_append_time_ms,
        })
    }

    /// Follower append: batches exactly as the leader stored them (offsets
    /// and leader epochs kept, CRC validated, never re-stamped). The first
    /// batch must start at the log end and each next one where the previous
    /// ended ([`LogError::ReplicaOffsetMismatch`] otherwise). The
    /// leader-epoch cache and the idempotent-producer state follow the
    /// batches (no sequence check: the leader made it), so this replica
    /// rejects duplicates correctly once it leads. Returns the new log end;
    /// like `append`, the bytes are not durable yet.
    pub fn append_replica(&self, records: &[u8]) -> Result<i64, LogError> {
        self.check_usable()?;
        let headers = batch::validate_stored(records)?;
        let (segment_bytes, segment_ms, interval) = {
            let c = self.config.read();
            (c.segment_bytes, c.segment_ms, c.index_interval_bytes)
        };
        let mut w = self.writer.lock();
        self.check_usable()?;
        let log_end = self.view.read().log_end;
        let mut next = log_end;
        for h in &headers {
            // A leader's compacted segments have gaps between batches
            // (removed records); a batch never starts below the log end.
            if h.base_offset < next {
                return Err(LogError::ReplicaOffsetMismatch {
                    expected: next,
                    got: h.base_offset,
                });
            }
            next = h.next_offset();
        }
        if next == log_end {
            return Ok(log_end);
        }
        self.write_locked(
            &mut w,
            records,
            &headers,
            log_end,
            next,
            None,
            (segment_bytes, segment_ms, interval),
        )?;
        let mut epochs_changed = false;
        let mut pos = 0usize;
        for h in &headers {
            let marker = if h.is_transactional() {
                records
                    .get(pos..pos + h.size())
                    .and_then(|b| Marker::read(h, Bytes::copy_from_slice(b)))
            } else {
                None
            };
            w.producers.replay(h, marker);
            if h.is_transactional() {
                self.txns.write().replay(h, marker);
            }
            pos += h.size();
            epochs_changed |= w.epochs.follow(h.partition_leader_epoch, h.base_offset);
        }
        if epochs_changed {
            if let Err(e) = w.epochs.persist() {
                tracing::warn!(dir = %self.dir.display(), error = %e, "leader epoch checkpoint write failed");
            }
        }
        self.publish_written(next);
        Ok(next)
    }

    /// Tells the flusher and the watchers that the log end moved to `next`.
    /// Called under the append lock so watchers never see it go back.
    fn publish_written(&self, next: i64) {
        match self.flush {
            FlushPolicy::Always => {
                self.written_tx.send_replace(next);
            }
            FlushPolicy::Interval { .. } => {
                self.durable_end_tx.send_replace(next);
                if !self.replicated.load(Ordering::Acquire) {
                    self.hw_tx.send_replace(next);
                }
                self.written_tx.send_replace(next);
            }
            FlushPolicy::Never => {
                self.durable_end_tx.send_replace(next);
                if !self.replicated.load(Ordering::Acquire) {
                    self.hw_tx.send_replace(next);
                }
            }
        }
    }

    /// Switches who moves the high watermark. Local (the default): it
    /// follows the durable end, as a single node needs. Replicated: only
    /// [`Partition::advance_high_watermark`] raises it, because only the
    /// replication layer knows what the in-sync replicas hold; on the
    /// switch it drops to the last checkpointed high watermark (see
    /// [`Partition::checkpoint_high_watermark`]) capped at the durable end, or
    /// the log start without one, since nothing above it is known to be
    /// committed (a restarted replica learns the real value from the leader,
    /// a leader from its followers' fetches).
    pub fn set_replicated(&self, replicated: bool) {
        // The append lock orders this against appends (publish_written);
        // the view lock against a flush round publishing (publish_durable
        // holds it while it reads the mode and raises the watermark).
        let _w = self.writer.lock();
        let v = self.view.write();
        let was = self.replicated.swap(replicated, Ordering::AcqRel);
        if was == replicated {
            return;
        }
        if replicated {
            // Offsets below a checkpointed high watermark were on every in-sync
            // replica's disk when it was written; committed records are never
            // truncated (leaders come from the ISR), so they are still committed.
            let durable = *self.durable_end_tx.borrow();
            let start = match self.hw_written.load(Ordering::Acquire) {
                hw if hw >= 0 => hw.min(durable).min(v.log_end).max(v.log_start),
                _ => v.log_start,
            };
            self.hw_tx.send_replace(start);
        } else {
            let durable = *self.durable_end_tx.borrow();
            self.hw_tx.send_replace(durable);
        }
    }

    /// Replicated mode: writes the high watermark down when it moved since the
    /// last time (temporary file, fsync, rename). The replication layer calls it
    /// periodically and on shutdown; true when something was written.
    pub fn checkpoint_high_watermark(&self) -> Result<bool, LogError> {
        if self.state.load(Ordering::Acquire) != STATE_OK {
            return Ok(false);
        }
        self.write_high_watermark(true)
    }

    /// Writes the high watermark of a replicated partition down when it
    /// moved; `synced`: durably before returning, else for a
    /// file-system-wide sync that follows.
    fn write_high_watermark(&self, synced: bool) -> Result<bool, LogError> {
        if !self.replicated.load(Ordering::Acquire) {
            return Ok(false);
        }
        let hw = *self.hw_tx.borrow();
        if hw == self.hw_written.load(Ordering::Acquire) {
            return Ok(false);
        }
        let path = self.dir.join(HIGH_WATERMARK_FILE);
        let text = hw.to_string();
        if synced {
            fsutil::atomic_write(&path, text.as_bytes())?;
        } else {
            fsutil::replace_unsynced(&path, text.as_bytes())?;
        }
        self.hw_written.store(hw, Ordering::Release);
        Ok(true)
    }

    /// Whether the high watermark is under the replication layer's control.
    pub fn is_replicated(&self) -> bool {
        self.replicated.load(Ordering::Acquire)
    }

    /// Offsets below it are durable under the flush policy (fsync'd with
    /// `always`; the log end with `interval` and `never`).
    pub fn durable_end_offset(&self) -> i64 {
        *self.durable_end_tx.borrow()
    }

    /// Changes whenever the durable end moves (a leader recomputes its high
    /// watermark on it; a follower fetches again once its append is durable).
    pub fn watch_durable_end(&self) -> watch::Receiver<i64> {
        self.durable_end_tx.subscribe()
    }

    /// Replicated mode: raises the high watermark to `hw`, capped at the
    /// durable end (a replica never exposes what it could lose). Never
    /// lowers it (only truncation does). No effect in local mode.
    pub fn advance_high_watermark(&self, hw: i64) {
        if !self.replicated.load(Ordering::Acquire) {
            return;
        }
        // The append lock orders this against truncation, so a stale
        // caller cannot raise the watermark over a just-truncated tail.
        let _w = self.writer.lock();
        let cap = (*self.durable_end_tx.borrow()).min(self.view.read().log_end);
        raise(&self.hw_tx, hw.min(cap));
    }

    /// Resolves once the high watermark reaches `end_offset` (in local mode
    /// that is durability; in replicated mode, replication to the in-sync
    /// replicas). Fails when the partition stops (storage failure, topic
    /// deleted).
    pub async fn wait_committed(&self, end_offset: i64) -> Result<(), LogError> {
        let mut hw = self.hw_tx.subscribe();
        let mut durable = self.durable_tx.subscribe();
        loop {
            if *hw.borrow_and_update() >= end_offset {
                return Ok(());
            }
            if durable.borrow_and_update().stopped {
                self.check_usable()?;
                return Err(LogError::Io(io::Error::other("partition stopped")));
            }
            tokio::select! {
                r = hw.changed() => if r.is_err() { break },
                r = durable.changed() => if r.is_err() { break },
            }
        }
        self.check_usable()?;
        Err(LogError::Io(io::Error::other("partition stopped")))
    }

    /// Writes validated batches at the log end (rolling first when due),
    /// indexes them and moves the log end to `next`. `stamp`: the leader
    /// epoch to stamp with the assigned offsets (None: a replica's batches,
    /// already stamped by the leader). Caller holds the append lock.
    #[allow(clippy::too_many_arguments)]
    fn write_locked(
        &self,
        w: &mut Writer,
        records: &[u8],
        headers: &[BatchHeader],
        log_end: i64,
        next: i64,
        stamp: Option<i32>,
        (segment_bytes, segment_ms, interval): (u64, u64, u32),
    ) -> Result<(), LogError> {
        let total = records.len() as u64;
        let incoming_max_ts = headers.iter().map(|h| h.max_timestamp).max().unwrap_or(-1);
        let need_roll = {
            let v = self.view.read();
            v.active().is_some_and(|a| {
                a.size > 0
                    && (a.size + total > segment_bytes
                        || a.time_waited_for_roll(now_ms, incoming_max_ts) > segment_ms as i64
                        || next - a.base_offset() > i64::from(u32::MAX)
                        || a.size + total > u64::from(u32::MAX))
            })
        };
        if need_roll {
            self.roll_locked(w, log_end)?;
        }

        // The one copy: producer bytes into the write buffer, stamped in
        // place (a replica's batches keep the leader's stamps).
        w.buf.clear();
        w.buf.extend_from_slice(records);
        if let Some(leader_epoch) = stamp {
            let mut pos_in_buf = 0usize;
            let mut off = log_end;
            for h in headers {
                let size = h.size();
                if let Some(b) = w.buf.get_mut(pos_in_buf..pos_in_buf + size) {
                    batch::stamp(b, off, leader_epoch);
                }
                pos_in_buf += size;
                off = BatchHeader {
                    base_offset: off,
                    ..*h
                }
                .next_offset();
            }
        }

        let (files, pos) = {
            let v = self.view.read();
            match v.active() {
                Some(a) => (a.files.clone(), a.size),
                None => return Err(LogError::Io(io::Error::other("partition has no segment"))),
            }
        };
        let log = files.log()?;
        if let Err(e) = log.write_all_at(&w.buf, pos) {
            // Cut off whatever part of the write landed so the file matches
            // the in-memory size again; if even that fails, stop the partition.
            if let Err(e2) = log.set_len(pos) {
                self.mark_failed("truncating after a failed write", &e2);
            }
            return Err(LogError::Io(e));
        }

        let index_due = {
            let mut v = self.view.write();
            let mut p = pos;
            let mut off = log_end;
            let mut due = false;
            if let Some((_, seg)) = v.segments.iter_mut().next_back() {
                for h in headers {
                    let stamped = BatchHeader {
                        // A replica's batches keep the leader's offsets
                        // (which compaction may have spaced apart).
                        base_offset: if stamp.is_some() { off } else { h.base_offset },
                        partition_leader_epoch: stamp.unwrap_or(h.partition_leader_epoch),
                        ..*h
                    };
                    seg.account_batch(&stamped, p, interval);
                    p += h.size() as u64;
                    off = stamped.next_offset();
                }
                due = seg.index_pending() >= INDEX_WRITE_BATCH;
            }
            v.log_end = next;
            v.unflushed_bytes += total;
            due
        };
        if index_due {
            self.write_index_tail_locked(w, files.base_offset);
        }
        Ok(())
    }

    /// Writes the index entries segment `base` holds only in memory to its
    /// index files, in one write per file. Caller holds the append lock
    /// (the only writer of index entries). A failed write is logged and
    /// retried with the next bulk write: indexes are rebuilt from the log
    /// on recovery, so a missing entry costs lookups, not data.
    fn write_index_tail_locked(&self, w: &mut Writer, base: i64) {
        let files = {
            let mut v = self.view.write();
            let Some(seg) = v.segments.get_mut(&base) else {
                return;
            };
            if !seg.index_tail(&mut w.index_tail) {
                return;
            }
            seg.files.clone()
        };
        // Entries leave memory only once the file holds them, so a lookup
        // that finds them missing may read them there.
        match files.write_index_tail(&w.index_tail) {
            Ok(()) => {
                let mut v = self.view.write();
                let sealed = v.active().is_some_and(|a| a.base_offset() != base);
                if let Some(seg) = v.segments.get_mut(&base) {
                    seg.index_written(w.index_tail.to, sealed);
                }
            }
            Err(e) => {
                tracing::warn!(file = %files.index_path.display(), error = %e, "index write failed");
            }
        }
    }

    /// Starts a new active segment at `at` (the log end). Caller holds the append lock.
    fn roll_locked(&self, w: &mut Writer, at: i64) -> Result<(), LogError> {
        // The outgoing segment's indexes go to its files first, so the
        // flusher's sync of the rolled segment covers them.
        let active = self.view.read().active().map(SegMeta::base_offset);
        if let Some(base) = active {
            self.write_index_tail_locked(w, base);
        }
        let files = Arc::new(SegFiles::create(&self.dir, at)?);
        // The outgoing segment's aborted transactions go to its .txnindex
        // under the transactions lock (see `aborted_transactions`). Markers
        // are replayed after their batch is written, under the append lock,
        // so memory holds exactly the outgoing segment's.
        let mut txns = self.txns.write();
        let outgoing = txns.take_aborted();
        let sealed = active.filter(|_| !outgoing.is_empty()).and_then(|base| {
            self.view
                .read()
                .segments
                .get(&base)
                .map(|s| s.files.clone())
        });
        let aborted_from = match sealed.map(|f| f.store_aborted(&outgoing, false)) {
            Some(Ok(from)) => from,
            Some(Err(e)) => {
                txns.set_aborted(outgoing);
                return Err(e.into());
            }
            None => {
                txns.set_aborted(outgoing);
                None
            }
        };
        let mut v = self.view.write();
        if let Some(old) = v.segments.values_mut().next_back() {
            old.aborted_from = aborted_from;
            // Sealed: memory keeps only the page directory of what the
            // files hold (all of it, unless the tail write above failed).
            old.index_written(old.index_on_disk, true);
        }
        if self.flush != FlushPolicy::Never {
            if let Some(old) = v.active() {
                let f = old.files.clone();
                v.pending_sync.push(f);
            }
        }
        v.segments.insert(at, SegMeta::new_empty(files, now_ms()));
        v.dir_dirty = true;
        Ok(())
    }

    /// Resolves once every offset below `end_offset` is durable under the
    /// flush policy (at once for `Interval` and `Never`). Concurrent waiters
    /// share one fsync.
    pub async fn wait_durable(&self, end_offset: i64) -> Result<(), LogError> {
        if self.flush != FlushPolicy::Always {
            return Ok(());
        }
        let mut rx = self.durable_tx.subscribe();
        let reached = rx
            .wait_for(|d| d.stopped || d.offset >= end_offset)
            .await
            .map(|d| !d.stopped || d.offset >= end_offset);
        match reached {
            Ok(true) => Ok(()),
            _ => {
                self.check_usable()?;
                Err(LogError::Io(io::Error::other("partition stopped")))
            }
        }
    }

    fn take_sync_work(&self) -> SyncWork {
        let mut v = self.view.write();
        v.unflushed_bytes = 0;
        SyncWork {
            target: v.log_end,
            generation: v.generation,
            pending: std::mem::take(&mut v.pending_sync),
            active: v.active().map(|a| a.files.clone()),
            dir: std::mem::take(&mut v.dir_dirty),
        }
    }

    fn publish_durable(&self, work: &SyncWork) {
        let v = self.view.read();
        if v.generation != work.generation {
            // A truncation rewrote offsets meanwhile; the next round covers them.
            return;
        }
        let target = work.target.min(v.log_end);
        // The durable end, then the high watermark (never above it), then
        // the durable offset: a producer released by the durable offset
        // must find its records already visible to consumers.
        if self.flush == FlushPolicy::Always {
            raise(&self.durable_end_tx, target);
            if !self.replicated.load(Ordering::Acquire) {
                raise(&self.hw_tx, target);
            }
        }
        self.durable_tx.send_modify(|d| {
            if target > d.offset {
                d.offset = target;
            }
        });
    }

    fn needs_sync(&self) -> bool {
        let v = self.view.read();
        v.log_end > self.durable_tx.borrow().offset || !v.pending_sync.is_empty() || v.dir_dirty
    }

    /// One flush round: snapshot what was written, sync it, publish it.
    /// `sync_lock` makes rounds exclusive, so a round never publishes an
    /// offset whose segment another round drained but has not synced yet.
    fn sync_round(&self) -> io::Result<()> {
        let _g = self.sync_lock.lock();
        let work = self.take_sync_work();
        let (started, durable) = (std::time::Instant::now(), self.durable_tx.borrow().offset);
        work.run(&self.dir)?;
        crate::log_metrics().flush_round(started.elapsed(), work.target - durable);
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
        self.publish_durable(&work);
        Ok(())
    }

    /// One flush round on a blocking thread; false when the partition failed.
    async fn flush_round(self: &Arc<Self>) -> bool {
        let p = Arc::clone(self);
        match tokio::task::spawn_blocking(move || p.sync_round()).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                self.mark_failed("fsync", &e);
                false
            }
            Err(e) => {
                self.mark_failed("fsync task", &io::Error::other(e.to_string()));
                false
            }
        }
    }

    /// First half of a store-wide flush ([`crate::Store::flush_all`]):
    /// index entries held in memory and the high watermark go to their
    /// files, unsynced, and what is written so far is taken as one flush
    /// round, which holds off this partition's flusher until
    /// [`Self::finish_flush`] publishes it after the file system's sync.
    pub(crate) fn begin_flush(&self) -> Result<Option<FlushRound<'_>>, LogError> {
        if self.state.load(Ordering::Acquire) != STATE_OK {
            return Ok(None);
        }
        {
            let mut w = self.writer.lock();
            let active = self.view.read().active().map(SegMeta::base_offset);
            if let Some(base) = active {
                self.write_index_tail_locked(&mut w, base);
            }
            if std::mem::take(&mut w.epochs_unwritten) {
                w.epochs.persist_unsynced()?;
            }
        }
        self.write_high_watermark(false)?;
        let guard = self.sync_lock.lock();
        Ok(Some(FlushRound {
            _round: guard,
            work: self.take_sync_work(),
        }))
    }

    /// Publishes a round of [`Self::begin_flush`] once its writes are durable.
    pub(crate) fn finish_flush(&self, round: FlushRound<'_>) {
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
        self.publish_durable(&round.work);
    }

    /// Number of flush rounds (fsync batches) so far; for tests of group commit.
    #[doc(hidden)]
    pub fn fsync_count(&self) -> u64 {
        self.fsyncs.load(Ordering::Relaxed)
    }

    /// Reads whole batches starting with the one that contains `offset`, at
    /// most `max_bytes` unless `min_one_batch` and the first batch is larger.
    /// `offset` equal to the limit gives empty records; outside
    /// [log start, log end] gives OffsetOutOfRange.
    pub fn read(
        &self,
        offset: i64,
        max_bytes: usize,
        min_one_batch: bool,
        limit: ReadLimit,
    ) -> Result<ReadResult, LogError> {
        if self.state.load(Ordering::Acquire) == STATE_DELETED {
            return Err(LogError::UnknownTopicOrPartition(format!(
                "{}-{}",
                self.topic, self.id
            )));
        }
        let slack = self.config.read().index_interval_bytes as usize + READ_SLACK;
        let (log_start, log_end) = {
            let v = self.view.read();
            (v.log_start, v.log_end)
        };
        let high_watermark = self.high_watermark().min(log_end);
        let result = |records, next_offset| ReadResult {
            records,
            next_offset,
            high_watermark,
            log_start_offset: log_start,
            log_end_offset: log_end,
        };
        if offset < log_start || offset > log_end {
            return Err(LogError::OffsetOutOfRange {
                offset,
                log_start,
                log_end,
            });
        }
        let limit_offset = match limit {
            ReadLimit::HighWatermark => high_watermark,
            ReadLimit::LastStable => self.stable_below(high_watermark),
            ReadLimit::LogEnd => log_end,
        };
        if offset >= limit_offset {
            return Ok(result(Bytes::new(), offset));
        }

        let mut parts: Vec<Bytes> = Vec::new();
        let mut budget = max_bytes;
        let mut min_one = min_one_batch;
        let mut cur = offset;
        let mut prev_base: Option<i64> = None;
        loop {
            let stamp = self.index_rewrites.stamp();
            let seg = {
                let v = self.view.read();
                let found = match prev_base {
                    None => v.segments.range(..=cur).next_back(),
                    Some(b) => v.segments.range(b + 1..).next(),
                };
                found.map(|(base, s)| {
                    (
                        *base,
                        s.files.clone(),
                        s.index.locate_offset(cur - *base),
                        s.size,
                    )
                })
            };
            let Some((base, files, located, size)) = seg else {
                break;
            };
            prev_base = Some(base);
            let start_pos = self.start_position(&files, located, cur - base, stamp);
            let r = segment::read_batches(
                &files,
                start_pos,
                size,
                cur,
                limit_offset,
                budget,
                min_one,
                slack,
            )?;
            if !r.data.is_empty() {
                budget = budget.saturating_sub(r.data.len());
                min_one = false;
                cur = r.next_offset;
                parts.push(r.data);
            }
            if r.stop != Stop::SegmentEnd || budget == 0 {
                break;
            }
        }
        let records = match parts.len() {
            0 => Bytes::new(),
            1 => parts.pop().unwrap_or_default(),
            _ => {
                // Only a fetch that crosses a segment boundary pays this copy.
                let mut out = BytesMut::with_capacity(parts.iter().map(Bytes::len).sum());
                for p in &parts {
                    out.extend_from_slice(p);
                }
                out.freeze()
            }
        };
        Ok(result(records, cur))
    }

    /// Whether the topic's `cleanup.policy` includes `compact` (every record
    /// then needs a key).
    pub fn compacted(&self) -> bool {
        self.config.read().compacts()
    }

    /// The window a producer's record timestamps must lie in at broker
    /// time `now_ms`, when the topic bounds them
    /// ([`TopicConfig::timestamp_window`]).
    pub fn timestamp_window(&self, now_ms: i64) -> Option<(i64, i64)> {
        self.config.read().timestamp_window(now_ms)
    }

    /// The last stable offset: below it every transaction is decided, so
    /// `read_committed` consumers read up to it (never past the high
    /// watermark).
    pub fn last_stable_offset(&self) -> i64 {
        self.stable_below(self.high_watermark().min(self.log_end_offset()))
    }

    fn stable_below(&self, high_watermark: i64) -> i64 {
        self.txns
            .read()
            .first_unstable()
            .map_or(high_watermark, |first| first.min(high_watermark))
    }

    /// Every producer this partition knows (its idempotent and transactional
    /// producers' state), by producer id, with its open transaction's first
    /// offset.
    pub fn active_producers(&self) -> Vec<ActiveProducer> {
        let w = self.writer.lock();
        let txns = self.txns.read();
        w.producers
            .active(|producer_id| txns.open_since(producer_id))
    }

    /// A `read_committed` read: records up to the last stable offset, and
    /// the aborted transactions whose records reach into them (Kafka's
    /// bound: the end of what is returned), both from the same state of
    /// the log.
    pub fn read_committed(
        &self,
        offset: i64,
        max_bytes: usize,
        min_one_batch: bool,
    ) -> Result<(ReadResult, Vec<AbortedTxn>), LogError> {
        loop {
            let before = self.aborted_changes.load(Ordering::SeqCst);
            let read = self.read(offset, max_bytes, min_one_batch, ReadLimit::LastStable)?;
            let to = read.next_offset.min(self.last_stable_offset());
            let aborted = self.aborted_transactions(offset, to)?;
            if self.aborted_changes.load(Ordering::SeqCst) == before {
                return Ok((read, aborted));
            }
        }
    }

    /// Marks a change after which aborted transactions may be listed no
    /// more; the caller holds the transactions lock.
    pub(crate) fn aborted_list_changed(&self) {
        self.aborted_changes.fetch_add(1, Ordering::SeqCst);
    }

    /// The aborted transactions whose records reach into `[from, to)`, for a
    /// `read_committed` fetch of that range.
    pub fn aborted_transactions(&self, from: i64, to: i64) -> Result<Vec<AbortedTxn>, LogError> {
        if from >= to {
            return Ok(Vec::new());
        }
        // Every change to a `.txnindex` (a roll filing the active
        // segment's entries, a truncation, a compaction swap) happens under
        // the transactions lock, so holding it shows each entry exactly
        // once: in memory or in a file.
        let txns = self.txns.read();
        let (sealed, mut found) = {
            let v = self.view.read();
            let active = v.segments.last_key_value().map(|(b, _)| *b);
            // A transaction is listed by the segment of its marker, which
            // is at or after its records: the segments before `from`'s
            // cannot list one that reaches `from`.
            let start = v
                .segments
                .range(..=from)
                .next_back()
                .map_or(from, |(b, _)| *b);
            let sealed: Vec<Arc<SegFiles>> = v
                .segments
                .range(start..)
                .filter(|(b, s)| Some(**b) != active && s.aborted_from.is_some_and(|f| f < to))
                .map(|(_, s)| s.files.clone())
                .collect();
            (sealed, txns.aborted_between(from, to))
        };
        let mut out = Vec::new();
        for files in sealed {
            out.extend(
                files
                    .read_aborted()?
                    .into_iter()
                    .filter(|t| t.last_offset >= from && t.first_offset < to),
            );
        }
        drop(txns);
        out.append(&mut found);
        Ok(out)
    }

    /// Changes whenever the high watermark moves (long-polling fetches wait on it).
    pub fn watch_high_watermark(&self) -> watch::Receiver<i64> {
        self.hw_tx.subscribe()
    }

    pub fn log_start_offset(&self) -> i64 {
        self.view.read().log_start
    }

    /// The topic's `min.insync.replicas` (its override, else the broker default):
    /// enforced by the replication layer, kept with the other topic configs.
    pub fn min_insync_replicas(&self) -> i32 {
        self.config.read().min_insync_replicas
    }

    pub fn log_end_offset(&self) -> i64 {
        self.view.read().log_end
    }

    /// Offsets below it are visible to consumers: durable in local mode,
    /// committed by the replication layer in replicated mode (never above
    /// the durable end in either).
    pub fn high_watermark(&self) -> i64 {
        *self.hw_tx.borrow()
    }

    /// The first batch whose max timestamp is >= `timestamp`, found via the
    /// time index: returns that batch's base offset (or the log start offset
    /// when the batch straddles it) and the batch's max timestamp. Records
    /// are never decoded, so the offset is that of the batch, not of the
    /// exact record; Kafka clients skip earlier records of a batch when
    /// fetching. Only offsets below the high watermark are considered.
    pub fn offset_for_timestamp(&self, timestamp: i64) -> Result<Option<(i64, i64)>, LogError> {
        self.check_usable()?;
        let hw = self.high_watermark();
        let stamp = self.index_rewrites.stamp();
        let (log_start, candidates) = {
            let v = self.view.read();
            let c: Vec<_> = v
                .segments
                .iter()
                .filter(|(_, s)| s.index.max_timestamp >= timestamp && s.size > 0)
                .map(|(base, s)| {
                    (
                        *base,
                        s.files.clone(),
                        s.index.locate_timestamp(timestamp),
                        s.size,
                    )
                })
                .collect();
            (v.log_start, c)
        };
        for (base, files, located, size) in candidates {
            let rel = self.timestamp_scan_start(&files, located, timestamp, stamp);
            // A second lookup, for the batch's position.
            let stamp = self.index_rewrites.stamp();
            let located = self
                .view
                .read()
                .segments
                .get(&base)
                .map(|s| s.index.locate_offset(i64::from(rel)));
            let start = located.map_or(0, |at| {
                self.start_position(&files, at, i64::from(rel), stamp)
            });
            let mut found = None;
            let log = files.log()?;
            let mut sc = segment::Scanner::new(&log, size, segment::SCAN_CHUNK_HEADERS);
            let mut pos = start;
            while pos < size {
                let Some(h) = BatchHeader::parse(sc.bytes(pos, batch::HEADER_LEN)?) else {
                    break;
                };
                if h.size() < batch::HEADER_LEN || h.base_offset >= hw {
                    break;
                }
                if h.max_timestamp >= timestamp && h.last_offset() >= log_start {
                    found = Some((h.base_offset.max(log_start), h.max_timestamp));
                    break;
                }
                pos += h.size() as u64;
            }
            if found.is_some() {
                return Ok(found);
            }
            if base >= hw {
                break;
            }
        }
        Ok(None)
    }

    /// The file position of segment `files` to read from for relative
    /// offset `rel`, as `at` says: found in memory, or in a page of the
    /// `.index` file. `stamp` was taken before `at`. A page entry is used
    /// only when no index rewrite ran meanwhile and the log holds the batch
    /// it names at its position; else the page's first entry, which memory
    /// holds, is (reads scan forward from it).
    fn start_position(
        &self,
        files: &SegFiles,
        at: Located<(u32, u32)>,
        rel: i64,
        stamp: u64,
    ) -> u64 {
        let rel = u32::try_from(rel.max(0)).unwrap_or(u32::MAX);
        let Some(range) = at.page_range(index::OFFSET_ENTRY) else {
            return at.position(rel, None);
        };
        let mut buf = [0u8; index::MAX_PAGE_ENTRIES * index::OFFSET_ENTRY];
        let entry = match files.read_index_page(&files.index_path, range, &mut buf) {
            Ok(page) => at.page_entry(rel, page),
            Err(e) => {
                tracing::debug!(file = %files.index_path.display(), error = %e, "index page unreadable");
                None
            }
        };
        match entry {
            Some((erel, pos))
                if self.index_rewrites.none_since(stamp)
                    && files
                        .batch_starts_at(u64::from(pos), files.base_offset + i64::from(erel)) =>
            {
                u64::from(pos)
            }
            _ => at.position(rel, None),
        }
    }

    /// The relative offset from which segment `files` is scanned for the
    /// first batch reaching `ts`, as `at` says; as [`Self::start_position`].
    fn timestamp_scan_start(
        &self,
        files: &SegFiles,
        at: Located<(i64, u32)>,
        ts: i64,
        stamp: u64,
    ) -> u32 {
        let Some(range) = at.page_range(index::TIME_ENTRY) else {
            return at.scan_start(ts, None);
        };
        let mut buf = [0u8; index::MAX_PAGE_ENTRIES * index::TIME_ENTRY];
        let page = match files.read_index_page(&files.time_path, range, &mut buf) {
            Ok(page) => Some(page),
            Err(e) => {
                tracing::debug!(file = %files.time_path.display(), error = %e, "time index page unreadable");
                None
            }
        };
        let rel = at.scan_start(ts, page);
        if self.index_rewrites.none_since(stamp) {
            rel
        } else {
            at.scan_start(ts, None)
        }
    }

    /// Moves the log start offset to `offset` (DeleteRecords); -1 means the
    /// high watermark. Whole segments below it are deleted. Returns the new
    /// log start offset. OffsetOutOfRange above the high watermark.
    pub fn delete_records_before(&self, offset: i64) -> Result<i64, LogError> {
        self.check_usable()?;
        let mut w = self.writer.lock();
        let hw = self.high_watermark();
        let (log_start, log_end) = {
            let v = self.view.read();
            (v.log_start, v.log_end)
        };
        let target = if offset == -1 { hw } else { offset };
        if target < 0 || target > hw {
            return Err(LogError::OffsetOutOfRange {
                offset,
                log_start,
                log_end,
            });
        }
        if target <= log_start {
            return Ok(log_start);
        }
        self.advance_log_start(&mut w, target)?;
        Ok(target)
    }

    /// Sets the log start offset (checkpointed), drops the segments wholly
    /// below it and trims the epoch cache. Caller holds the append lock.
    fn advance_log_start(&self, w: &mut Writer, start: i64) -> Result<(), LogError> {
        fsutil::atomic_write(&self.dir.join(LOG_START_FILE), start.to_string().as_bytes())?;
        // Aborted transactions below the start leave the list with their
        // segments (see `aborted_changes`).
        let mut txns = self.txns.write();
        self.aborted_list_changed();
        let removed = {
            let mut v = self.view.write();
            v.log_start = start.max(v.log_start);
            let mut removed = Vec::new();
            loop {
                let mut it = v.segments.iter();
                let (Some((first, _)), Some((second, _))) = (it.next(), it.next()) else {
                    break;
                };
                let (first, second) = (*first, *second);
                if second > start {
                    break;
                }
                if let Some(s) = v.segments.remove(&first) {
                    removed.push(s.files);
                }
            }
            if !removed.is_empty() {
                v.dir_dirty = true;
            }
            removed
        };
        for f in &removed {
            f.remove_files()?;
        }
        txns.forget_before(start);
        drop(txns);
        if w.epochs.truncate_from_start(start) {
            w.epochs.persist()?;
        }
        Ok(())
    }

    /// Kafka's OffsetForLeaderEpoch: the largest epoch <= `epoch` and the
    /// end offset of that epoch; (-1, -1) when unknown. As in Kafka, an
    /// epoch older than the first known one answers (epoch, first epoch's
    /// start offset).
    pub fn end_offset_for_epoch(&self, epoch: i32) -> (i32, i64) {
        let w = self.writer.lock();
        let log_end = self.log_end_offset();
        w.epochs.end_offset_for(epoch, log_end)
    }

    /// Becoming leader in `epoch` (Kafka's `maybeAssignEpochStartOffset`):
    /// records that `epoch` starts at the log end before anything is
    /// appended in it, so OffsetForLeaderEpoch from a follower whose latest
    /// epoch this log never had answers the end of the newest older epoch
    /// (instead of "unknown"). No effect unless `epoch` is newer than the
    /// latest. A follower's append or truncation removes the entry again
    /// when nothing was written in `epoch`; a restart drops it.
    pub fn assign_leader_epoch(&self, epoch: i32) -> Result<(), LogError> {
        self.check_usable()?;
        let mut w = self.writer.lock();
        let log_end = self.view.read().log_end;
        if w.epochs.assign(epoch, log_end) {
            // Written down on a clean shutdown or with the next change that
            // is, not now: an epoch assigned here has nothing written in it
            // yet, and one that gets records is rebuilt from their batches
            // after a crash. Losing an empty one is harmless: the epoch
            // that follows it starts at the same offset. (A node taking
            // leadership of thousands of partitions at start-up pays no
            // file write per partition.)
            w.epochs_unwritten = true;
        }
        Ok(())
    }

    /// The latest leader epoch of the cache (appended, replicated or
    /// assigned by [`Partition::assign_leader_epoch`]), -1 when none.
    pub fn latest_epoch(&self) -> i32 {
        self.writer.lock().epochs.latest_epoch()
    }

    /// Removes every record at or above `offset` (replica truncation). As
    /// in Kafka, the batch holding `offset` goes entirely, so the log end
    /// becomes that batch's base offset. Below the log start the log is
    /// emptied and restarts at `offset`. The leader-epoch cache loses the
    /// epochs starting at or after the new end, the high watermark and the
    /// durable end drop to it when above, and the idempotent-producer state
    /// is rebuilt from what remains.
    pub fn truncate_to(&self, offset: i64) -> Result<(), LogError> {
        self.check_usable()?;
        let mut w = self.writer.lock();
        let interval = self.config.read().index_interval_bytes;
        let (log_start, log_end, first_base) = {
            let v = self.view.read();
            (
                v.log_start,
                v.log_end,
                v.segments.first_key_value().map_or(0, |(b, _)| *b),
            )
        };
        if offset >= log_end {
            // Nothing to cut; a leader epoch started at the log end with
            // nothing written in it (`assign_leader_epoch`) goes, as no
            // epoch of this log starts at or after its end.
            if w.epochs.truncate_from_end(log_end) {
                w.epochs.persist()?;
            }
            return Ok(());
        }
        // The segments and their `.txnindex` files change under the
        // transactions lock (see `aborted_transactions`), and what was
        // listed may be listed no more (see `aborted_changes`).
        let mut t = self.txns.write();
        self.aborted_list_changed();
        // Index files are rewritten, and segment names may be reused.
        let _rewrite = self.index_rewrites.begin();
        let new_end;
        if offset < log_start || offset <= first_base {
            let removed: Vec<Box<SegMeta>> = {
                let mut v = self.view.write();
                std::mem::take(&mut v.segments).into_values().collect()
            };
            for s in &removed {
                s.files.remove_files()?;
            }
            let files = Arc::new(SegFiles::create(&self.dir, offset)?);
            let mut v = self.view.write();
            v.segments
                .insert(offset, SegMeta::new_empty(files, now_ms()));
            v.log_start = offset;
            new_end = offset;
            drop(v);
            fsutil::atomic_write(
                &self.dir.join(LOG_START_FILE),
                offset.to_string().as_bytes(),
            )?;
        } else {
            let (removed, keep) = {
                let mut v = self.view.write();
                let removed: Vec<Box<SegMeta>> =
                    v.segments.split_off(&offset).into_values().collect();
                let keep = v
                    .segments
                    .last_key_value()
                    .map(|(b, s)| (*b, s.files.clone(), s.size));
                (removed, keep)
            };
            for s in &removed {
                s.files.remove_files()?;
            }
            let Some((base, files, size)) = keep else {
                return Err(LogError::Io(io::Error::other(
                    "no segment left to truncate",
                )));
            };
            let mut cut = None;
            let log = files.log()?;
            segment::walk(&log, base, size, false, interval, |pos, h| {
                if cut.is_none() && h.last_offset() >= offset {
                    cut = Some(pos);
                }
            })?;
            let cut = cut.unwrap_or(size);
            log.set_len(cut)?;
            let walked = segment::walk(&log, base, cut, false, interval, |_, _| {})?;
            files.write_indexes(&walked.index)?;
            let mut v = self.view.write();
            if let Some(s) = v.segments.get_mut(&base) {
                s.size = cut;
                s.next_offset = walked.next_offset;
                s.index = walked.index;
                // The last segment left: the active one.
                s.index_written(s.index.len(), false);
                s.first_batch_ts = walked.first_batch_ts;
            }
            new_end = walked.next_offset;
            let clamped = v.log_start > new_end;
            if clamped {
                v.log_start = new_end;
            }
            drop(v);
            if clamped {
                fsutil::atomic_write(
                    &self.dir.join(LOG_START_FILE),
                    new_end.to_string().as_bytes(),
                )?;
            }
        }
        {
            let mut v = self.view.write();
            v.log_end = new_end;
            v.generation += 1;
            v.dir_dirty = true;
            self.durable_tx
                .send_modify(|d| d.offset = d.offset.min(new_end));
            self.hw_tx.send_modify(|hw| *hw = (*hw).min(new_end));
            self.durable_end_tx.send_modify(|d| *d = (*d).min(new_end));
        }
        let (producers, txns, sealed) = self.rebuild_producers(interval)?;
        w.producers = producers;
        *t = txns;
        let mut v = self.view.write();
        for s in v.segments.values_mut() {
            s.aborted_from = None;
        }
        for (base, from) in sealed {
            if let Some(s) = v.segments.get_mut(&base) {
                s.aborted_from = from;
            }
        }
        drop((v, t));
        if w.epochs.truncate_from_end(new_end) {
            w.epochs.persist()?;
        }
        self.written_tx.send_replace(new_end);
        Ok(())
    }

    /// Producer and transaction state from the batches of every segment,
    /// the sealed segments' aborted transactions filed again (see
    /// [`file_aborted`]).
    #[allow(clippy::type_complexity)]
    fn rebuild_producers(
        &self,
        interval: u32,
    ) -> Result<(ProducerStates, Transactions, Vec<(i64, Option<i64>)>), LogError> {
        let segs: Vec<(i64, Arc<SegFiles>, u64)> = {
            let v = self.view.read();
            v.segments
                .iter()
                .map(|(b, s)| (*b, s.files.clone(), s.size))
                .collect()
        };
        let mut p = ProducerStates::default();
        let mut t = Transactions::default();
        let mut found = BTreeMap::new();
        for (base, files, size) in &segs {
            let log = files.log()?;
            segment::walk(&log, *base, *size, false, interval, |pos, h| {
                let marker = marker_at(&log, pos, h);
                p.replay(h, marker);
                t.replay(h, marker);
            })?;
            found.insert(*base, t.take_aborted());
        }
        let filed = file_aborted(segs.into_iter().map(|(b, f, _)| (b, f)), found, |_| true)?;
        t.set_aborted(filed.active);
        t.forget_before(self.view.read().log_start);
        Ok((p, t, filed.sealed))
    }

    /// Total bytes of this partition's segments.
    pub fn size_bytes(&self) -> u64 {
        self.view.read().segments.values().map(|s| s.size).sum()
    }

    /// Rolls the active segment past `segment.ms` and deletes whole
    /// segments past `retention.ms` / `retention.bytes` (only below the high
    /// watermark). Returns the number of segments deleted.
    pub(crate) fn enforce_retention(&self, now: i64) -> Result<usize, LogError> {
        if self.check_usable().is_err() {
            return Ok(0);
        }
        let mut w = self.writer.lock();
        let cfg = self.config.read().clone();
        let (roll_due, log_end) = {
            let v = self.view.read();
            // The periodic roll counts wall-clock time since the segment
            // was created: record timestamps may be arbitrarily old (the
            // append path compares them with each other, as Kafka does),
            // and comparing them with `now` here would roll a tiny segment
            // on every check.
            let due = v.active().is_some_and(|a| {
                a.size > 0 && now.saturating_sub(a.created_ms) > cfg.segment_ms as i64
            });
            (due, v.log_end)
        };
        if roll_due {
            self.roll_locked(&mut w, log_end)?;
        }
        let hw = self.high_watermark();
        let (to_delete, all) = {
            let v = self.view.read();
            let total: u64 = v.segments.values().map(|s| s.size).sum();
            let mut diff = if cfg.retention_bytes >= 0 {
                total as i64 - cfg.retention_bytes
            } else {
                i64::MIN
            };
            let n = v.segments.len();
            let mut out = Vec::new();
            for (i, (base, s)) in v.segments.iter().enumerate() {
                // A compact-only topic keeps its (compacted) history.
                if !cfg.deletes() || (i + 1 == n && s.size == 0) || s.next_offset > hw {
                    break;
                }
                let by_time = cfg.retention_ms >= 0
                    && s.largest_timestamp() < now.saturating_sub(cfg.retention_ms);
                let by_size = cfg.retention_bytes >= 0 && diff - s.size as i64 >= 0;
                if !(by_time || by_size) {
                    break;
                }
                diff = diff.saturating_sub(s.size as i64);
                out.push(*base);
            }
            let all = out.len() == n;
            (out, all)
        };
        if to_delete.is_empty() {
            return Ok(0);
        }
        if all {
            // Kafka never leaves a log without a segment: roll, then delete.
            self.roll_locked(&mut w, log_end)?;
        }
        let new_start = {
            let v = self.view.read();
            v.segments
                .range(to_delete.last().map_or(0, |b| b + 1)..)
                .next()
                .map_or(log_end, |(b, _)| *b)
        };
        let current_start = self.view.read().log_start;
        if new_start > current_start {
            self.advance_log_start(&mut w, new_start)?;
        }
        let count = to_delete.len();
        tracing::info!(
            topic = %self.topic,
            partition = self.id,
            segments = count,
            log_start = new_start,
            "retention deleted segments"
        );
        Ok(count)
    }
}

/// Group commit: each wake-up syncs everything written so far with one
/// fdatasync and releases every waiter at or below it.
async fn flusher_always(weak: Weak<Partition>, mut written: watch::Receiver<i64>) {
    loop {
        if written.changed().await.is_err() {
            return;
        }
        let Some(p) = weak.upgrade() else { return };
        if p.state.load(Ordering::Acquire) != STATE_OK {
            return;
        }
        if p.needs_sync() && !p.flush_round().await {
            return;
        }
    }
}

/// Background fsync every `ms` milliseconds, or sooner once `bytes` have
/// accumulated.
async fn flusher_interval(
    weak: Weak<Partition>,
    mut written: watch::Receiver<i64>,
    ms: u64,
    bytes: u64,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(ms.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let by_bytes = tokio::select! {
            _ = tick.tick() => false,
            r = written.changed() => {
                if r.is_err() {
                    return;
                }
                true
            }
        };
        let Some(p) = weak.upgrade() else { return };
        if p.state.load(Ordering::Acquire) != STATE_OK {
            return;
        }
        let due = if by_bytes {
            p.view.read().unflushed_bytes >= bytes
        } else {
            p.needs_sync()
        };
        if due && !p.flush_round().await {
            return;
        }
    }
}

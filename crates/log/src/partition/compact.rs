//! Log compaction of one partition (Kafka's log cleaner).
//!
//! A round cleans the *cleanable* part of the log: whole non-active
//! segments below the high watermark, the first open transaction and
//! `min.compaction.lag.ms`. Its *dirty* part (from the cleaner checkpoint
//! on) is read first into an [`OffsetMap`] of each key's latest offset;
//! then every cleanable segment, clean and dirty, is rewritten keeping a
//! record only when no later record of its key is in the map. Small
//! neighbouring segments are merged on the way (up to `segment.bytes`).
//!
//! The swap protocol, so that a crash at any point leaves either the old
//! or the new segments, never a mix:
//! 1. the group's records go to `<base>.cleaned`, which is fsynced;
//! 2. it is renamed to `<base>-<end>.swap` and the directory fsynced: the
//!    commit point (`end` is where the next, untouched segment starts);
//! 3. the group's other segments are deleted, the swap file is renamed
//!    over `<base>.log`, its indexes are written, the directory fsynced.
//!
//! On open, a `.cleaned` file is deleted (the round never committed) and a
//! `.swap` file is finished (steps 3 again), see [`finish_swaps`].
//! Readers are never blocked: they hold the old files (open descriptors)
//! until they are done; only the swap in memory takes the append lock.

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use crate::batch::BatchHeader;
use crate::cleaner::{self, Filtered, OffsetMap, Throttle};
use crate::config::CleanerConfig;
use crate::fsutil;
use crate::index::SegIndex;
use crate::segment::{self, Scanner, SegFiles, SegMeta};
use crate::txn::AbortedTxn;
use crate::LogError;

use super::{now_ms, Partition, STATE_OK};

/// The first offset not yet compacted (Kafka's cleaner-offset-checkpoint,
/// one per partition here).
pub(super) const CLEANER_CHECKPOINT_FILE: &str = "cleaner-offset-checkpoint";
const CLEANED_SUFFIX: &str = ".cleaned";
const SWAP_SUFFIX: &str = ".swap";
/// The cleaner writes its output in pieces of this size.
const WRITE_CHUNK: usize = 1 << 20;

/// What one compaction round did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CleanStats {
    pub segments_before: usize,
    pub segments_after: usize,
    /// Bytes of the dirty part this round compacted (its input).
    pub dirty_bytes: u64,
    /// Bytes read: the dirty part for the key map, then every cleanable
    /// segment for the rewrite.
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub records_removed: u64,
    /// The first offset the next round treats as dirty.
    pub cleaned_to: i64,
    /// Wall-clock time of the round, pacing included.
    pub elapsed_ms: u64,
}

/// A cleanable segment, as a round saw it.
#[derive(Clone)]
struct Source {
    base: i64,
    files: Arc<SegFiles>,
    size: u64,
    mtime: SystemTime,
}

fn mtime(files: &SegFiles) -> SystemTime {
    fs::metadata(&files.log_path)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn ms_of(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn swap_name(base: i64, end: i64) -> String {
    format!(
        "{}-{}{SWAP_SUFFIX}",
        segment::stem(base),
        segment::stem(end)
    )
}

fn parse_swap_name(name: &str) -> Option<(i64, i64)> {
    let (base, end) = name.strip_suffix(SWAP_SUFFIX)?.split_once('-')?;
    let digits = |s: &str| s.len() == 20 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(base) || !digits(end) {
        return None;
    }
    Some((base.parse().ok()?, end.parse().ok()?))
}

/// A file a compaction round leaves while it runs (`.cleaned`, `.swap`).
pub(super) fn is_swap_file(name: &str) -> bool {
    name.ends_with(CLEANED_SUFFIX) || parse_swap_name(name).is_some()
}

/// Finishes what a crash interrupted, before the segments are opened: a
/// `.cleaned` file never committed is deleted; a `.swap` file replaces the
/// segments it covers.
pub(super) fn finish_swaps(dir: &Path) -> io::Result<()> {
    let mut swaps = Vec::new();
    let mut logs = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(CLEANED_SUFFIX) {
            tracing::info!(file = %entry.path().display(), "removing an unfinished compaction");
            fs::remove_file(entry.path())?;
        } else if let Some(range) = parse_swap_name(name) {
            swaps.push((range, entry.path()));
        } else if let Some(base) = super::parse_log_name(name) {
            logs.push(base);
        }
    }
    if swaps.is_empty() {
        return Ok(());
    }
    swaps.sort_unstable_by_key(|(range, _)| *range);
    for ((base, end), path) in swaps {
        tracing::info!(file = %path.display(), "finishing an interrupted compaction swap");
        for b in logs.iter().filter(|b| **b > base && **b < end) {
            SegFiles::paths(dir, *b).remove()?;
        }
        let target = SegFiles::paths(dir, base);
        target.remove_indexes()?;
        fs::rename(&path, &target.log)?;
    }
    fsutil::sync_dir(dir)
}

/// Where a round stops, for tests that crash it on purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CrashAt {
    /// After the `.cleaned` file is written and synced.
    Cleaned,
    /// After the commit point (the `.swap` rename is durable).
    Committed,
    /// After the group's other segments are deleted.
    OthersDeleted,
}

impl Partition {
    /// One compaction round when the topic compacts and the dirty ratio
    /// (or `max.compaction.lag.ms`) calls for it; `force` ignores the
    /// ratio. `None` when there was nothing to do.
    pub fn compact(
        &self,
        cleaner: &CleanerConfig,
        force: bool,
    ) -> Result<Option<CleanStats>, LogError> {
        self.compact_inner(cleaner, force, None)
    }

    pub(crate) fn compact_inner(
        &self,
        cleaner: &CleanerConfig,
        force: bool,
        crash: Option<CrashAt>,
    ) -> Result<Option<CleanStats>, LogError> {
        let cfg = self.config.read().clone();
        if !cfg.compacts() || self.state.load(std::sync::atomic::Ordering::Acquire) != STATE_OK {
            return Ok(None);
        }
        // One round at a time per partition.
        let Some(_round) = self.cleaning.try_lock() else {
            return Ok(None);
        };
        let now = now_ms();
        let high_watermark = self.high_watermark();
        let stable = self
            .txns
            .read()
            .first_unstable()
            .map_or(high_watermark, |f| f.min(high_watermark));
        let (log_start, cleanable, end) = {
            let v = self.view.read();
            let active = v.segments.last_key_value().map(|(b, _)| *b);
            let mut cleanable = Vec::new();
            let mut end = None;
            for (base, s) in &v.segments {
                let too_new = cfg.min_compaction_lag_ms > 0
                    && s.largest_timestamp() > now.saturating_sub(cfg.min_compaction_lag_ms);
                if Some(*base) == active || s.next_offset > stable || too_new {
                    end = Some(*base);
                    break;
                }
                cleanable.push((
                    Source {
                        base: *base,
                        files: s.files.clone(),
                        size: s.size,
                        mtime: mtime(&s.files),
                    },
                    s.first_batch_ts.unwrap_or(s.created_ms),
                ));
            }
            (v.log_start, cleanable, end)
        };
        let Some(end) = end.filter(|_| !cleanable.is_empty()) else {
            return Ok(None);
        };
        let first_dirty = self
            .first_dirty
            .load(std::sync::atomic::Ordering::Acquire)
            .clamp(log_start, end);
        // A segment is dirty when any of it is at or past the checkpoint.
        let next_base = |i: usize| cleanable.get(i + 1).map_or(end, |(s, _)| s.base);
        let dirty_from = (0..cleanable.len())
            .find(|i| next_base(*i) > first_dirty)
            .unwrap_or(cleanable.len());
        let total: u64 = cleanable.iter().map(|(s, _)| s.size).sum();
        let dirty: u64 = cleanable.iter().skip(dirty_from).map(|(s, _)| s.size).sum();
        if dirty == 0 {
            return Ok(None);
        }
        let overdue = cleanable
            .get(dirty_from)
            .is_some_and(|(_, first_ts)| now.saturating_sub(*first_ts) > cfg.max_compaction_lag_ms);
        let ratio = dirty as f64 / total.max(1) as f64;
        if !(force || overdue || ratio >= cfg.min_cleanable_dirty_ratio.0) {
            return Ok(None);
        }

        let started = std::time::Instant::now();
        let mut throttle = Throttle::new(cleaner.io_bytes_per_second);
        let aborted = self.aborted_transactions(log_start, end)?;
        let is_aborted = |h: &BatchHeader| {
            h.is_transactional()
                && !h.is_control()
                && aborted.iter().any(|a| {
                    a.producer_id == h.producer_id
                        && a.first_offset <= h.base_offset
                        && h.base_offset <= a.last_offset
                })
        };
        let mut stats = CleanStats {
            segments_before: cleanable.len(),
            ..CleanStats::default()
        };

        // The dirty section's keys; a map that fills up ends the round at
        // the segment where it did.
        let mut map = OffsetMap::new(cleaner.dedupe_buffer_bytes);
        let mut clean_end = end;
        let mut scratch = Vec::new();
        for (i, (src, _)) in cleanable.iter().enumerate().skip(dirty_from) {
            let log = src.files.log()?;
            let mut sc = Scanner::new(&log, src.size, segment::SCAN_CHUNK_FULL);
            let mut pos = 0u64;
            while pos < src.size {
                let (h, batch) = read_batch(&mut sc, pos, src)?;
                pos += h.size() as u64;
                if h.is_control() || is_aborted(&h) {
                    continue;
                }
                let body = cleaner::batch_records(&h, batch, &mut scratch).map_err(corrupt)?;
                for r in cleaner::records(body) {
                    let r = r.ok_or_else(|| corrupt_at(h.base_offset))?;
                    if let Some(key) = r.key {
                        map.put(key, h.base_offset.saturating_add(r.offset_delta));
                    }
                }
            }
            stats.dirty_bytes += src.size;
            stats.bytes_read += src.size;
            throttle.spend(src.size);
            if map.is_full() && i + 1 < cleanable.len() {
                clean_end = next_base(i);
                break;
            }
        }

        // Tombstones and finished transactions' markers stay until the
        // segment holding them is older than the clean part's newest
        // segment by delete.retention.ms (Kafka's delete horizon).
        let horizon = dirty_from
            .checked_sub(1)
            .and_then(|i| cleanable.get(i))
            .map(|(s, _)| ms_of(s.mtime).saturating_sub(cfg.delete_retention_ms));
        let last_batches = self.writer.lock().producers.last_batch_offsets();
        let sources: Vec<Source> = cleanable
            .into_iter()
            .map(|(s, _)| s)
            .filter(|s| s.base < clean_end)
            .collect();
        let mut txn_data: HashSet<i64> = HashSet::new();
        // Transaction markers the round keeps, by producer and offset.
        let mut markers_kept: HashSet<(i64, i64)> = HashSet::new();
        let mut filter_scratch = Default::default();
        let interval = cfg.index_interval_bytes;
        let mut group_start = 0;
        while group_start < sources.len() {
            // A group: neighbouring segments whose bytes fit one segment.
            let mut group_end = group_start + 1;
            let mut bytes = sources[group_start].size;
            while let Some(next) = sources.get(group_end) {
                let span_ok = next_base_of(&sources, group_end, clean_end)
                    - sources[group_start].base
                    <= i64::from(u32::MAX);
                if bytes + next.size > cfg.segment_bytes || !span_ok {
                    break;
                }
                bytes += next.size;
                group_end += 1;
            }
            let group = &sources[group_start..group_end];
            let after = next_base_of(&sources, group_end - 1, clean_end);
            group_start = group_end;
            let base = group[0].base;
            let cleaned_path = self
                .dir
                .join(format!("{}{CLEANED_SUFFIX}", segment::stem(base)));
            let mut out = crate::descriptors::process().open(
                &cleaned_path,
                OpenOptions::new().write(true).create(true).truncate(true),
            )?;
            let mut buf: Vec<u8> = Vec::with_capacity(WRITE_CHUNK);
            let mut written = 0u64;
            let mut index = SegIndex::default();
            let mut next_offset = base;
            let mut first_batch_ts = None;
            let mut changed = group.len() > 1;
            for src in group {
                let retain_deletes = horizon.is_none_or(|h| ms_of(src.mtime) > h);
                let log = src.files.log()?;
                let mut sc = Scanner::new(&log, src.size, segment::SCAN_CHUNK_FULL);
                let mut pos = 0u64;
                while pos < src.size {
                    let (h, batch) = read_batch(&mut sc, pos, src)?;
                    pos += h.size() as u64;
                    let at = buf.len();
                    let outcome = if h.is_control() {
                        // A transaction's marker goes once its records are
                        // gone and the horizon passed; the broker's other
                        // control batches stay.
                        let had_data = txn_data.remove(&h.producer_id);
                        if !h.is_transactional() || had_data || retain_deletes {
                            buf.extend_from_slice(batch);
                            if h.is_transactional() {
                                markers_kept.insert((h.producer_id, h.base_offset));
                            }
                            Filtered::Unchanged
                        } else {
                            Filtered::Dropped
                        }
                    } else if is_aborted(&h) {
                        Filtered::Dropped
                    } else {
                        let retain_empty = h.producer_id >= 0
                            && last_batches.get(&h.producer_id) == Some(&h.base_offset);
                        let outcome = cleaner::filter_batch(
                            &h,
                            batch,
                            retain_empty,
                            |r| {
                                let offset = h.base_offset.saturating_add(r.offset_delta);
                                let Some(key) = r.key else {
                                    // Kafka's cleaner drops records without a key.
                                    return false;
                                };
                                let latest = map.get(key).is_none_or(|o| o <= offset);
                                latest && (r.has_value || retain_deletes)
                            },
                            &mut filter_scratch,
                            &mut buf,
                        )
                        .map_err(corrupt)?;
                        if matches!(outcome, Filtered::Unchanged) {
                            buf.extend_from_slice(batch);
                        }
                        outcome
                    };
                    match outcome {
                        Filtered::Dropped => {
                            changed = true;
                            stats.records_removed += h.records_count.max(0) as u64;
                            continue;
                        }
                        Filtered::Rewritten => {
                            changed = true;
                            let kept = BatchHeader::parse(buf.get(at..).unwrap_or_default())
                                .map_or(0, |k| k.records_count);
                            stats.records_removed += (h.records_count - kept).max(0) as u64;
                        }
                        Filtered::Unchanged => {}
                    }
                    let kept = BatchHeader::parse(buf.get(at..).unwrap_or_default())
                        .ok_or_else(|| corrupt_at(h.base_offset))?;
                    if h.is_transactional() && !h.is_control() && kept.records_count > 0 {
                        txn_data.insert(h.producer_id);
                    }
                    let rel = u32::try_from(h.base_offset - base).unwrap_or(u32::MAX);
                    let wpos = written + at as u64;
                    index.add_batch(
                        rel,
                        u32::try_from(wpos).unwrap_or(u32::MAX),
                        h.max_timestamp,
                        kept.size() as u64,
                        interval,
                    );
                    first_batch_ts.get_or_insert(h.max_timestamp);
                    next_offset = h.next_offset();
                    if buf.len() >= WRITE_CHUNK {
                        out.write_all(&buf)?;
                        written += buf.len() as u64;
                        throttle.spend(buf.len() as u64);
                        buf.clear();
                    }
                }
                stats.bytes_read += src.size;
                throttle.spend(src.size);
            }
            out.write_all(&buf)?;
            written += buf.len() as u64;
            throttle.spend(buf.len() as u64);
            if !changed {
                drop(out);
                fs::remove_file(&cleaned_path)?;
                continue;
            }
            out.sync_all()?;
            let newest = group
                .iter()
                .map(|s| s.mtime)
                .max()
                .unwrap_or(SystemTime::UNIX_EPOCH);
            // The merged segment is as old as its newest part, for the
            // delete horizon of later rounds.
            out.set_modified(newest)?;
            drop(out);
            stats.bytes_written += written;
            if crash == Some(CrashAt::Cleaned) {
                return Err(LogError::Io(io::Error::other("crash injected")));
            }
            // The group's aborted transactions whose markers stay.
            let group_aborted = aborted
                .iter()
                .filter(|a| {
                    a.last_offset >= base
                        && a.last_offset < after
                        && markers_kept.contains(&(a.producer_id, a.last_offset))
                })
                .copied()
                .collect();
            let meta = Cleaned {
                base,
                after,
                size: written,
                next_offset: next_offset.max(base),
                index,
                first_batch_ts,
                aborted: group_aborted,
            };
            if !self.swap_in(group, meta, crash)? {
                // The log changed under the round (retention, deletion):
                // this group's work is dropped, the next round redoes it.
                let _ = fs::remove_file(&cleaned_path);
                return Ok(None);
            }
        }
        fsutil::atomic_write(
            &self.dir.join(CLEANER_CHECKPOINT_FILE),
            clean_end.to_string().as_bytes(),
        )?;
        self.first_dirty
            .store(clean_end, std::sync::atomic::Ordering::Release);
        stats.segments_after = self.view.read().segments.range(..clean_end).count();
        stats.cleaned_to = clean_end;
        stats.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        tracing::info!(
            topic = %self.topic,
            partition = self.id,
            keys = map.len(),
            removed = stats.records_removed,
            dirty = stats.dirty_bytes,
            read = stats.bytes_read,
            written = stats.bytes_written,
            cleaned_to = clean_end,
            elapsed_ms = stats.elapsed_ms,
            "compacted"
        );
        Ok(Some(stats))
    }

    /// Replaces the `group` segments with the cleaned file (the swap
    /// protocol's steps 2 and 3) under the append lock. False when the
    /// group is no longer what the round read.
    fn swap_in(
        &self,
        group: &[Source],
        c: Cleaned,
        crash: Option<CrashAt>,
    ) -> Result<bool, LogError> {
        let _w = self.writer.lock();
        {
            let v = self.view.read();
            let intact = group.iter().all(|s| {
                v.segments
                    .get(&s.base)
                    .is_some_and(|m| Arc::ptr_eq(&m.files, &s.files) && m.size == s.size)
            });
            let after_ok = v.segments.contains_key(&c.after);
            if !intact || !after_ok {
                return Ok(false);
            }
        }
        let cleaned = self
            .dir
            .join(format!("{}{CLEANED_SUFFIX}", segment::stem(c.base)));
        let swap = self.dir.join(swap_name(c.base, c.after));
        // Readers that took these segments before the swap read on from
        // their files, which from here on are removed or replaced under
        // the same name: the descriptor cache must not reopen the path.
        for s in group {
            s.files.pin()?;
        }
        // The group's `.txnindex` files change under the transactions lock
        // (see `aborted_transactions`), and the transactions whose markers
        // the round dropped are listed no more (see `read_committed`).
        let _txns = self.txns.write();
        self.aborted_list_changed();
        fs::rename(&cleaned, &swap)?;
        fsutil::sync_dir(&self.dir)?;
        if crash == Some(CrashAt::Committed) {
            return Err(LogError::Io(io::Error::other("crash injected")));
        }
        for s in group.iter().skip(1) {
            s.files.paths_of().remove()?;
        }
        if crash == Some(CrashAt::OthersDeleted) {
            return Err(LogError::Io(io::Error::other("crash injected")));
        }
        // Index files under the group's name are replaced.
        let _rewrite = self.index_rewrites.begin();
        let target = SegFiles::paths(&self.dir, c.base);
        target.remove_indexes()?;
        fs::rename(&swap, &target.log)?;
        let files = Arc::new(SegFiles::existing(&self.dir, c.base));
        files.write_indexes(&c.index)?;
        let aborted_from = files.store_aborted(&c.aborted, false)?;
        fsutil::sync_dir(&self.dir)?;
        let mut v = self.view.write();
        let created_ms = v
            .segments
            .get(&c.base)
            .map_or_else(now_ms, |m| m.created_ms);
        for s in group {
            v.segments.remove(&s.base);
        }
        let mut meta = SegMeta::new_empty(files, created_ms);
        meta.size = c.size;
        meta.next_offset = c.next_offset;
        meta.index = c.index;
        // Compaction never touches the active segment.
        meta.index_written(meta.index.len(), true);
        meta.first_batch_ts = c.first_batch_ts;
        meta.aborted_from = aborted_from;
        v.segments.insert(c.base, meta);
        Ok(true)
    }
}

/// A cleaned group, ready to swap in.
struct Cleaned {
    base: i64,
    /// Base of the segment after the group.
    after: i64,
    size: u64,
    next_offset: i64,
    index: SegIndex,
    first_batch_ts: Option<i64>,
    /// Aborted transactions whose markers the group keeps, for its `.txnindex`.
    aborted: Vec<AbortedTxn>,
}

fn next_base_of(sources: &[Source], i: usize, end: i64) -> i64 {
    sources.get(i + 1).map_or(end, |s| s.base)
}

/// The whole batch at `pos` of a segment the round reads.
fn read_batch<'a>(
    sc: &'a mut Scanner<'_>,
    pos: u64,
    src: &Source,
) -> Result<(BatchHeader, &'a [u8]), LogError> {
    let h = BatchHeader::parse(sc.bytes(pos, crate::batch::HEADER_LEN)?)
        .filter(|h| h.size() >= crate::batch::HEADER_LEN)
        .ok_or_else(|| unreadable(src, pos))?;
    let batch = sc.bytes(pos, h.size())?;
    if batch.len() != h.size() {
        return Err(unreadable(src, pos));
    }
    Ok((h, batch))
}

fn unreadable(src: &Source, pos: u64) -> LogError {
    LogError::Io(io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "compaction: unreadable batch in {} at position {pos}",
            src.files.log_path.display()
        ),
    ))
}

fn corrupt(e: cleaner::CleanError) -> LogError {
    LogError::CorruptBatch(e.to_string())
}

fn corrupt_at(offset: i64) -> LogError {
    LogError::CorruptBatch(format!(
        "compaction: malformed records in the batch at offset {offset}"
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use proptest::prelude::*;

    use super::*;
    use crate::records::BatchBuilder;
    use crate::{FlushPolicy, ReadLimit, Store, StoreConfig, TopicConfig};

    const TOPIC: &str = "table";

    /// A record the model appended: offset → (key, value).
    type History = BTreeMap<i64, (u8, Option<u16>)>;

    struct Fixture {
        dir: tempfile::TempDir,
        rt: tokio::runtime::Runtime,
        store: Option<Arc<Store>>,
    }

    fn configs(delete_retention_ms: i64) -> BTreeMap<String, String> {
        [
            ("cleanup.policy", "compact".to_owned()),
            ("segment.bytes", "400".to_owned()),
            ("index.interval.bytes", "64".to_owned()),
            ("delete.retention.ms", delete_retention_ms.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    impl Fixture {
        fn new(delete_retention_ms: i64) -> Fixture {
            let mut f = Fixture {
                dir: tempfile::tempdir().unwrap(),
                rt: tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap(),
                store: None,
            };
            f.reopen();
            f.store()
                .create_topic(TOPIC, 1, &configs(delete_retention_ms), false)
                .unwrap();
            f
        }

        /// Opens the data directory afresh, as after a crash: only what
        /// is on disk counts.
        fn reopen(&mut self) {
            self.store = None;
            let _rt = self.rt.enter();
            self.store = Some(
                Store::open(StoreConfig {
                    data_dir: self.dir.path().to_path_buf(),
                    defaults: TopicConfig::default(),
                    flush: FlushPolicy::Never,
                    cleaner: CleanerConfig::default(),
                })
                .unwrap(),
            );
        }

        fn store(&self) -> &Arc<Store> {
            self.store.as_ref().unwrap()
        }

        fn partition(&self) -> Arc<Partition> {
            self.store().partition(TOPIC, 0).unwrap()
        }

        /// Appends one batch of `records`; compressed with `codec` when set.
        fn append(
            &self,
            records: &[(u8, Option<u16>)],
            codec: sluice_codec::Codec,
            history: &mut History,
        ) {
            let mut b = BatchBuilder::new(64, 1_000);
            for (k, v) in records {
                let value = v.map(|v| v.to_be_bytes());
                b.push(1_000, Some(&[*k]), value.as_ref().map(|v| &v[..]), &[]);
            }
            let batch = compressed(b.finish().unwrap().to_vec(), codec);
            let r = self.partition().append(&batch, 0).unwrap();
            for (i, rec) in records.iter().enumerate() {
                history.insert(r.base_offset + i as i64, *rec);
            }
        }

        /// Every record a consumer reads from `from`: (offset, key, value).
        fn read_from(&self, from: i64) -> Vec<(i64, u8, Option<u16>)> {
            let p = self.partition();
            let mut out = Vec::new();
            let mut at = from.max(p.log_start_offset());
            let mut scratch = Vec::new();
            loop {
                let r = p.read(at, 1 << 20, true, ReadLimit::HighWatermark).unwrap();
                if r.records.is_empty() {
                    break;
                }
                let mut rest = &r.records[..];
                while let Some(h) = BatchHeader::parse(rest) {
                    let (batch, next) = rest.split_at(h.size());
                    rest = next;
                    if h.is_control() {
                        // Markers: consumers skip them too.
                        at = h.next_offset();
                        continue;
                    }
                    let body = cleaner::batch_records(&h, batch, &mut scratch).unwrap();
                    for rec in cleaner::records(body) {
                        let rec = rec.unwrap();
                        let offset = h.base_offset + rec.offset_delta;
                        let value = rec.has_value.then(|| {
                            let raw = rec.raw;
                            u16::from_be_bytes([raw[raw.len() - 3], raw[raw.len() - 2]])
                        });
                        if offset >= from {
                            out.push((offset, rec.key.unwrap()[0], value));
                        }
                    }
                    at = h.next_offset();
                }
            }
            out
        }
    }

    /// `batch` (uncompressed, from BatchBuilder) with its records
    /// compressed by `codec`, as a producer would send it.
    fn compressed(batch: Vec<u8>, codec: sluice_codec::Codec) -> Vec<u8> {
        if codec == sluice_codec::Codec::None {
            return batch;
        }
        let mut packed = Vec::new();
        sluice_codec::compress(codec, &batch[61..], &mut packed).unwrap();
        let mut out = batch[..61].to_vec();
        out.extend_from_slice(&packed);
        crate::batch::reseal(&mut out, codec.attribute_bits()).unwrap();
        out
    }

    /// What a reader from `from` must see: for every key whose latest
    /// record is at or after `from`, that record last; nothing a later
    /// record of its key superseded before `from`'s reader could see it
    /// twice; every record read is one that was written.
    fn check_reader(
        history: &History,
        read: &[(i64, u8, Option<u16>)],
        from: i64,
        tombstones_may_go: bool,
    ) {
        let mut last_read: HashMap<u8, (i64, Option<u16>)> = HashMap::new();
        let mut prev = -1;
        for (offset, key, value) in read {
            assert!(*offset > prev, "offsets go up");
            prev = *offset;
            assert_eq!(
                history.get(offset),
                Some(&(*key, *value)),
                "record at {offset} was written so"
            );
            last_read.insert(*key, (*offset, *value));
        }
        let mut latest: HashMap<u8, (i64, Option<u16>)> = HashMap::new();
        for (offset, (key, value)) in history {
            latest.insert(*key, (*offset, *value));
        }
        for (key, (offset, value)) in latest {
            if offset < from {
                continue;
            }
            match last_read.get(&key) {
                Some(seen) => assert_eq!(*seen, (offset, value), "key {key} from {from}"),
                None => assert!(
                    value.is_none() && tombstones_may_go,
                    "key {key}'s latest record at {offset} is missing for a reader from {from}"
                ),
            }
        }
    }

    #[derive(Clone, Debug)]
    enum Step {
        Append(Vec<(u8, Option<u16>)>, u8),
        Compact,
        Crash(u8),
        Read(u16),
    }

    fn step() -> impl Strategy<Value = Step> {
        let record = (0u8..12, proptest::option::weighted(0.85, any::<u16>()));
        prop_oneof![
            6 => (proptest::collection::vec(record, 1..6), 0u8..5).prop_map(|(r, c)| Step::Append(r, c)),
            2 => Just(Step::Compact),
            1 => (0u8..3).prop_map(Step::Crash),
            2 => any::<u16>().prop_map(Step::Read),
        ]
    }

    fn codec(c: u8) -> sluice_codec::Codec {
        use sluice_codec::Codec::*;
        [None, Gzip, Snappy, Lz4, Zstd][usize::from(c % 5)]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Random keyed appends with tombstones, compaction rounds, rounds
        /// crashed at each step of the swap, and reads at random offsets:
        /// readers always see every key's latest value at or after their
        /// position, and a crash leaves a whole log.
        #[test]
        fn readers_see_the_latest_value_of_every_key(
            steps in proptest::collection::vec(step(), 1..40),
            drop_tombstones in any::<bool>(),
        ) {
            let mut f = Fixture::new(if drop_tombstones { 0 } else { 86_400_000 });
            let mut history = History::new();
            let crash_points = [CrashAt::Cleaned, CrashAt::Committed, CrashAt::OthersDeleted];
            for s in steps {
                match s {
                    Step::Append(records, c) => f.append(&records, codec(c), &mut history),
                    Step::Compact => {
                        f.partition().compact(&CleanerConfig::default(), true).unwrap();
                    }
                    Step::Crash(at) => {
                        let crash = crash_points[usize::from(at)];
                        let _ = f.partition().compact_inner(&CleanerConfig::default(), true, Some(crash));
                        f.reopen();
                    }
                    Step::Read(at) => {
                        let end = f.partition().log_end_offset();
                        let from = i64::from(at) % (end + 1);
                        let read = f.read_from(from);
                        check_reader(&history, &read, from, drop_tombstones);
                    }
                }
            }
            let read = f.read_from(0);
            check_reader(&history, &read, 0, drop_tombstones);
            // Appends still continue the log after everything.
            let end = f.partition().log_end_offset();
            f.append(&[(1, Some(7))], sluice_codec::Codec::None, &mut history);
            prop_assert_eq!(f.partition().log_end_offset(), end + 1);
        }
    }

    #[test]
    fn compaction_keeps_one_record_per_key_below_the_active_segment() {
        let f = Fixture::new(86_400_000);
        let mut history = History::new();
        for round in 0..60u16 {
            f.append(
                &[(round as u8 % 4, Some(round)), (9, Some(round))],
                sluice_codec::Codec::Lz4,
                &mut history,
            );
        }
        let before = f.partition().size_bytes();
        let stats = f
            .partition()
            .compact(&CleanerConfig::default(), true)
            .unwrap()
            .unwrap();
        assert!(stats.records_removed > 0);
        assert!(
            f.partition().size_bytes() < before / 4,
            "{} of {before}",
            f.partition().size_bytes()
        );
        let cleaned: Vec<_> = f
            .read_from(0)
            .into_iter()
            .filter(|r| r.0 < stats.cleaned_to)
            .collect();
        let mut keys: Vec<u8> = cleaned.iter().map(|r| r.1).collect();
        keys.sort_unstable();
        let n = keys.len();
        keys.dedup();
        assert_eq!(
            keys.len(),
            n,
            "one record per key in the cleaned part: {cleaned:?}"
        );
        check_reader(&history, &f.read_from(0), 0, false);
        // A reader at a removed offset gets the next surviving record.
        let first_kept = cleaned.first().unwrap().0;
        if first_kept > 0 {
            assert_eq!(f.read_from(0).first().unwrap().0, first_kept);
        }
        // Groups are cut by the segments' sizes before cleaning, as
        // Kafka's: the shrunk segments merge in the next round.
        for round in 60..80u16 {
            f.append(
                &[(round as u8 % 4, Some(round)), (9, Some(round))],
                sluice_codec::Codec::None,
                &mut history,
            );
        }
        let again = f
            .partition()
            .compact(&CleanerConfig::default(), true)
            .unwrap()
            .unwrap();
        assert!(
            again.segments_after < again.segments_before / 2,
            "{again:?}"
        );
        check_reader(&history, &f.read_from(0), 0, false);
    }

    #[test]
    fn a_dirty_ratio_below_the_minimum_waits_and_a_delete_only_topic_is_left_alone() {
        let f = Fixture::new(86_400_000);
        let mut history = History::new();
        for i in 0..40u16 {
            f.append(
                &[(i as u8, Some(i))],
                sluice_codec::Codec::None,
                &mut history,
            );
        }
        let p = f.partition();
        assert!(p
            .compact(&CleanerConfig::default(), false)
            .unwrap()
            .is_some());
        // Everything clean now: nothing is dirty until more is written.
        assert!(p
            .compact(&CleanerConfig::default(), false)
            .unwrap()
            .is_none());
        let store = f.store();
        store
            .create_topic(
                "plain",
                1,
                &BTreeMap::from([("segment.bytes".to_owned(), "400".to_owned())]),
                false,
            )
            .unwrap();
        let plain = store.partition("plain", 0).unwrap();
        for _ in 0..20 {
            let mut b = BatchBuilder::new(16, 0);
            b.push(0, Some(b"k"), Some(b"v"), &[]);
            plain.append(&b.finish().unwrap(), 0).unwrap();
        }
        assert!(plain
            .compact(&CleanerConfig::default(), true)
            .unwrap()
            .is_none());
    }

    /// A crash before the commit point leaves the old segments, one after
    /// it the new ones; either way no temporary file survives the restart.
    #[test]
    fn a_crash_at_each_step_of_the_swap_leaves_old_or_new_never_a_mix() {
        for (crash, committed) in [
            (CrashAt::Cleaned, false),
            (CrashAt::Committed, true),
            (CrashAt::OthersDeleted, true),
        ] {
            let mut f = Fixture::new(86_400_000);
            let mut history = History::new();
            for i in 0..40u16 {
                f.append(
                    &[(i as u8 % 3, Some(i)), (7, Some(i))],
                    sluice_codec::Codec::Snappy,
                    &mut history,
                );
            }
            let before = f.partition().size_bytes();
            let dir = f.partition().dir().to_path_buf();
            assert!(f
                .partition()
                .compact_inner(&CleanerConfig::default(), true, Some(crash))
                .is_err());
            f.reopen();
            let leftovers: Vec<_> = fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| n.ends_with(CLEANED_SUFFIX) || n.ends_with(SWAP_SUFFIX))
                .collect();
            assert!(leftovers.is_empty(), "{crash:?}: {leftovers:?}");
            let after = f.partition().size_bytes();
            assert_eq!(after < before, committed, "{crash:?}: {after} of {before}");
            check_reader(&history, &f.read_from(0), 0, false);
            // The next round finishes the job.
            f.partition()
                .compact(&CleanerConfig::default(), true)
                .unwrap();
            check_reader(&history, &f.read_from(0), 0, false);
        }
    }

    /// An aborted transaction's records go; a committed one's are compacted
    /// like any other; each marker stays while its transaction's records
    /// do, and once none remain and the delete horizon passed, it goes too.
    #[test]
    fn aborted_records_go_and_markers_stay_while_their_records_do() {
        let f = Fixture::new(0);
        let p = f.partition();
        let in_txn = |pid: i64, key: u8, value: u16| {
            let mut b = BatchBuilder::new(32, 1_000);
            b.push(1_000, Some(&[key]), Some(&value.to_be_bytes()), &[]);
            p.append_in_transaction(&b.finish_transactional(pid, 0).unwrap(), 0)
                .unwrap()
        };
        let marker = |pid: i64, commit: bool| {
            p.append_marker(
                pid,
                0,
                crate::Marker {
                    commit,
                    coordinator_epoch: 0,
                },
                0,
            )
            .unwrap()
        };
        let mut history = History::new();
        let committed = in_txn(7, 1, 100).base_offset;
        let aborted = in_txn(8, 2, 200).base_offset;
        let commit_marker = marker(7, true).base_offset;
        let abort_marker = marker(8, false).base_offset;
        history.insert(committed, (1, Some(100)));
        // Plain records after, so the transactions lie in rolled segments.
        for i in 0..30u16 {
            f.append(&[(3, Some(i))], sluice_codec::Codec::None, &mut history);
        }
        let batches = |p: &Partition| {
            let mut out = Vec::new();
            let mut at = p.log_start_offset();
            loop {
                let r = p.read(at, 1 << 20, true, ReadLimit::HighWatermark).unwrap();
                if r.records.is_empty() {
                    return out;
                }
                let mut rest = &r.records[..];
                while let Some(h) = BatchHeader::parse(rest) {
                    out.push((h.base_offset, h.is_control(), h.records_count));
                    rest = &rest[h.size()..];
                    at = h.next_offset();
                }
            }
        };
        p.compact(&CleanerConfig::default(), true).unwrap().unwrap();
        let after = batches(&p);
        assert!(
            !after.iter().any(|b| b.0 == aborted),
            "the aborted batch is gone: {after:?}"
        );
        assert!(
            after.iter().any(|b| b.0 == committed && b.2 == 1),
            "{after:?}"
        );
        // The first round has no clean part yet: both markers stay.
        assert!(
            after.iter().any(|b| b.0 == commit_marker && b.1),
            "{after:?}"
        );
        assert!(
            after.iter().any(|b| b.0 == abort_marker && b.1),
            "{after:?}"
        );
        check_reader(&history, &f.read_from(0), 0, false);
        // The merged segment's .txnindex still lists the aborted
        // transaction, whose marker stayed.
        let listed = |p: &Partition| p.aborted_transactions(0, p.log_end_offset()).unwrap();
        let abort = crate::AbortedTxn {
            producer_id: 8,
            first_offset: aborted,
            last_offset: abort_marker,
        };
        assert_eq!(listed(&p), vec![abort]);
        // Another round, past the horizon (delete.retention.ms = 0): the
        // abort marker has no records left and goes; the commit marker
        // stays with its committed record.
        for i in 30..60u16 {
            f.append(&[(3, Some(i))], sluice_codec::Codec::None, &mut history);
        }
        p.compact(&CleanerConfig::default(), true).unwrap().unwrap();
        let again = batches(&p);
        assert!(!again.iter().any(|b| b.0 == abort_marker), "{again:?}");
        assert!(
            again.iter().any(|b| b.0 == commit_marker && b.1),
            "{again:?}"
        );
        assert!(again.iter().any(|b| b.0 == committed), "{again:?}");
        check_reader(&history, &f.read_from(0), 0, false);
        // With its marker gone it is listed no more, as a reopen derives.
        assert!(listed(&p).is_empty());
        let mut f = f;
        f.reopen();
        assert!(listed(&f.partition()).is_empty());
    }
}

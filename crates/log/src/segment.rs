//! One segment: a log file of stored batches plus its two index files, the
//! recovery walk over it and the positioned reads of the fetch path.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use crate::batch::{self, BatchHeader, HEADER_LEN};
use crate::descriptors::{self, LogFile};
use crate::fsutil;
use crate::index::{self, SegIndex};
use crate::txn::{self, AbortedTxn};

pub(crate) const LOG_SUFFIX: &str = ".log";
pub(crate) const INDEX_SUFFIX: &str = ".index";
pub(crate) const TIME_SUFFIX: &str = ".timeindex";
/// A sealed segment's aborted transactions (those whose ABORT marker it
/// holds), as Kafka's per-segment `.txnindex`.
pub(crate) const TXN_INDEX_SUFFIX: &str = ".txnindex";

/// File name stem of a segment: the base offset, 20 digits, zero padded.
pub(crate) fn stem(base_offset: i64) -> String {
    format!("{base_offset:020}")
}

/// The files of a segment. Shared (Arc) with readers and the flusher, so a
/// reader keeps a deleted segment's data readable until it is done.
///
/// The log file is opened on demand through the descriptor cache
/// ([`crate::descriptors`]), which closes the least recently used ones
/// beyond its budget. The index files are written in bulk and read a page
/// at a time below what memory keeps of them ([`SegMeta::index`]), so they
/// are opened for each bulk write, sync or page read and closed again. An
/// idle segment costs no descriptor.
#[derive(Debug)]
pub(crate) struct SegFiles {
    pub base_offset: i64,
    file: Arc<LogFile>,
    pub log_path: PathBuf,
    pub index_path: PathBuf,
    pub time_path: PathBuf,
    pub txn_path: PathBuf,
}

/// The paths of a segment's files.
pub(crate) struct SegPaths {
    pub log: PathBuf,
    pub index: PathBuf,
    pub time: PathBuf,
    pub txn: PathBuf,
}

impl SegPaths {
    /// Removes the index files (missing ones are fine).
    pub fn remove_indexes(&self) -> io::Result<()> {
        remove_if_present(&[&self.index, &self.time, &self.txn])
    }

    /// Removes all of the segment's files (missing ones are fine).
    pub fn remove(&self) -> io::Result<()> {
        remove_if_present(&[&self.log, &self.index, &self.time, &self.txn])
    }
}

fn remove_if_present(paths: &[&PathBuf]) -> io::Result<()> {
    for p in paths {
        match std::fs::remove_file(p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Opens `p` for reading and writing, creating it when missing.
fn open_rw(p: &Path) -> io::Result<File> {
    descriptors::process().open(
        p,
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false),
    )
}

impl SegFiles {
    /// The paths of the segment starting at `base_offset` in `dir`.
    pub fn paths(dir: &Path, base_offset: i64) -> SegPaths {
        let s = stem(base_offset);
        SegPaths {
            log: dir.join(format!("{s}{LOG_SUFFIX}")),
            index: dir.join(format!("{s}{INDEX_SUFFIX}")),
            time: dir.join(format!("{s}{TIME_SUFFIX}")),
            txn: dir.join(format!("{s}{TXN_INDEX_SUFFIX}")),
        }
    }

    /// This segment's paths.
    pub fn paths_of(&self) -> SegPaths {
        SegPaths {
            log: self.log_path.clone(),
            index: self.index_path.clone(),
            time: self.time_path.clone(),
            txn: self.txn_path.clone(),
        }
    }

    /// An existing segment; its log file is opened when first used.
    pub fn existing(dir: &Path, base_offset: i64) -> SegFiles {
        let p = SegFiles::paths(dir, base_offset);
        SegFiles {
            base_offset,
            file: LogFile::existing(p.log.clone(), descriptors::process()),
            log_path: p.log,
            index_path: p.index,
            time_path: p.time,
            txn_path: p.txn,
        }
    }

    /// The open log file (opened now when the descriptor cache closed it).
    pub fn log(&self) -> io::Result<Arc<File>> {
        self.file.get()
    }

    /// Creates a fresh, empty segment (removing leftovers of the same name).
    ///
    /// The log file is truncated only when it has leftover bytes: on ext4 a
    /// truncate marks the inode for writeback on close, which a brand-new
    /// empty file does not need. The index files appear with their first
    /// bulk write, so a partition that never gets 128 index entries or a
    /// roll has none.
    pub fn create(dir: &Path, base_offset: i64) -> io::Result<SegFiles> {
        let p = SegFiles::paths(dir, base_offset);
        let f = SegFiles {
            base_offset,
            file: LogFile::create(p.log.clone(), descriptors::process())?,
            log_path: p.log,
            index_path: p.index,
            time_path: p.time,
            txn_path: p.txn,
        };
        let emptied = |file: &File| -> io::Result<()> {
            if file.metadata()?.len() > 0 {
                file.set_len(0)?;
            }
            Ok(())
        };
        emptied(&*f.log()?)?;
        // Index files are created by their first bulk write; leftovers of
        // an earlier segment of this name go.
        remove_if_present(&[&f.index_path, &f.time_path, &f.txn_path])?;
        Ok(f)
    }

    /// Makes the index files' written contents durable. A file that does
    /// not exist has nothing to sync (its writes failed and were logged;
    /// recovery rebuilds it from the log).
    pub fn sync_indexes(&self) -> io::Result<()> {
        for p in [&self.index_path, &self.time_path] {
            // fsync acts on the inode, so a fresh descriptor flushes what
            // earlier ones wrote.
            match descriptors::process().open(p, OpenOptions::new().read(true)) {
                Ok(f) => f.sync_data()?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Keeps the log file open for as long as this segment lives, before
    /// its name is removed or given to another file: readers that still
    /// hold the segment read on from it.
    pub fn pin(&self) -> io::Result<()> {
        match self.file.pin() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }

    /// Removes the segment's files (readers holding it read on: [`Self::pin`]).
    pub fn remove_files(&self) -> io::Result<()> {
        self.pin()?;
        self.paths_of().remove()
    }

    /// Replaces both index files with the given in-memory index.
    pub fn write_indexes(&self, ix: &SegIndex) -> io::Result<()> {
        rewrite(&open_rw(&self.index_path)?, &ix.encode_offsets())?;
        rewrite(&open_rw(&self.time_path)?, &ix.encode_times())
    }

    /// The aborted transactions in this segment's `.txnindex` (none when it
    /// has no file).
    pub fn read_aborted(&self) -> io::Result<Vec<AbortedTxn>> {
        Ok(fsutil::read_optional(&self.txn_path)?
            .map(|bytes| txn::decode_aborted(&bytes))
            .unwrap_or_default())
    }

    /// Makes this segment's `.txnindex` hold exactly `entries` (no file when
    /// there are none). `maybe_present`: whether a file may exist already;
    /// one that holds the same entries is left alone. Not synced: the file
    /// is derived from the log, and every open checks it against the log.
    /// Returns the first offset of the earliest aborted transaction listed.
    pub fn store_aborted(
        &self,
        entries: &[AbortedTxn],
        maybe_present: bool,
    ) -> io::Result<Option<i64>> {
        let first = entries.iter().map(|a| a.first_offset).min();
        if entries.is_empty() {
            if maybe_present {
                remove_if_present(&[&self.txn_path])?;
            }
            return Ok(None);
        }
        let encoded = txn::encode_aborted(entries);
        if maybe_present && fsutil::read_optional(&self.txn_path)?.as_deref() == Some(&encoded[..])
        {
            return Ok(first);
        }
        fsutil::replace_unsynced(&self.txn_path, &encoded)?;
        Ok(first)
    }

    /// Writes index entries that are in memory but not yet in the files
    /// (see [`IndexTail`]), each file with one positioned write.
    /// Reads `len` bytes at `at` of the index file `path` (one of this
    /// segment's) into `buf`: one page, for a lookup below the entries
    /// memory holds. Fails on a short file.
    pub fn read_index_page<'b>(
        &self,
        path: &Path,
        (at, len): (u64, usize),
        buf: &'b mut [u8],
    ) -> io::Result<&'b [u8]> {
        let page = buf
            .get_mut(..len)
            .ok_or_else(|| io::Error::other("index page larger than its buffer"))?;
        let f = descriptors::process().open(path, OpenOptions::new().read(true))?;
        f.read_exact_at(page, at)?;
        Ok(page)
    }

    /// Whether a batch with base offset `base_offset` starts at `pos` of the
    /// log: checks an index entry read from a file against the log itself.
    pub fn batch_starts_at(&self, pos: u64, base_offset: i64) -> bool {
        let mut head = [0u8; HEADER_LEN];
        let read = self.log().and_then(|log| read_into(&log, pos, &mut head));
        matches!(read, Ok(HEADER_LEN))
            && BatchHeader::parse(&head).is_some_and(|h| {
                h.base_offset == base_offset && batch::check_header(&h, batch::Made::InLog).is_ok()
            })
    }

    pub fn write_index_tail(&self, tail: &IndexTail) -> io::Result<()> {
        if !tail.offsets.is_empty() {
            let at = (tail.from.0 * index::OFFSET_ENTRY) as u64;
            open_rw(&self.index_path)?.write_all_at(&tail.offsets, at)?;
        }
        if !tail.times.is_empty() {
            let at = (tail.from.1 * index::TIME_ENTRY) as u64;
            open_rw(&self.time_path)?.write_all_at(&tail.times, at)?;
        }
        Ok(())
    }
}

/// Encoded index entries a segment holds in memory beyond what its index
/// files hold, ready to be appended to the files.
///
/// Index entries are written in bulk (every [`INDEX_WRITE_BATCH`] entries,
/// when the segment is rolled, and on a clean shutdown) instead of two tiny
/// writes per append. A crash may leave the files short; recovery derives
/// the indexes from the log and rewrites files that do not match.
#[derive(Debug, Default)]
pub(crate) struct IndexTail {
    /// Entry counts (offset index, time index) already in the files, where
    /// these entries start.
    pub from: (usize, usize),
    /// Entry counts once these are written.
    pub to: (usize, usize),
    pub offsets: Vec<u8>,
    pub times: Vec<u8>,
}

impl IndexTail {
    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty() && self.times.is_empty()
    }
}

/// Offset index entries a segment may hold in memory only before they are
/// written out (with the time index entries of the same span).
pub(crate) const INDEX_WRITE_BATCH: usize = 128;

fn rewrite(f: &File, contents: &[u8]) -> io::Result<()> {
    f.set_len(0)?;
    f.write_all_at(contents, 0)?;
    f.set_len(contents.len() as u64)
}

/// In-memory state of a segment; mutated only under the partition's append lock.
#[derive(Debug)]
pub(crate) struct SegMeta {
    pub files: Arc<SegFiles>,
    /// Bytes of valid batches; appends go here.
    pub size: u64,
    /// One past the last offset stored in this segment (= base when empty).
    pub next_offset: i64,
    pub index: SegIndex,
    /// Entries of `index` (offset index, time index) that are in the index
    /// files; the rest are written in bulk later (see [`IndexTail`]).
    pub index_on_disk: (usize, usize),
    /// Wall-clock time this segment was created or loaded (Kafka's
    /// `LogSegment.created`): `segment.ms` counts from it when batches carry
    /// no timestamp, and the periodic roll of an idle segment uses it.
    pub created_ms: i64,
    /// Max timestamp of the segment's first batch (Kafka's
    /// `rollingBasedTimestamp`); `None` while the segment is empty.
    pub first_batch_ts: Option<i64>,
    /// A sealed segment with aborted transactions in its `.txnindex`: the
    /// first offset of the earliest of them (a fetch below it must read the
    /// file). The active segment's are in memory ([`crate::txn`]).
    pub aborted_from: Option<i64>,
}

impl SegMeta {
    pub fn new_empty(files: Arc<SegFiles>, now_ms: i64) -> Box<SegMeta> {
        let base = files.base_offset;
        Box::new(SegMeta {
            files,
            size: 0,
            next_offset: base,
            index: SegIndex::default(),
            index_on_disk: (0, 0),
            created_ms: now_ms,
            first_batch_ts: None,
            aborted_from: None,
        })
    }

    /// How long this segment has waited for a time-based roll when a batch
    /// whose largest timestamp is `incoming_max_ts` arrives (Kafka's
    /// `LogSegment.timeWaitedForRoll`): record time since the first batch
    /// when that batch has a timestamp, else wall-clock time since creation.
    /// Counting in record time means a producer sending old timestamps does
    /// not roll a segment per append.
    /// `now_ms` is called only for that fallback (no clock read per append).
    pub fn time_waited_for_roll(&self, now_ms: impl FnOnce() -> i64, incoming_max_ts: i64) -> i64 {
        match self.first_batch_ts {
            Some(t) if t >= 0 => incoming_max_ts.saturating_sub(t),
            _ => now_ms().saturating_sub(self.created_ms),
        }
    }

    /// Index entries not yet in the files, encoded into `tail` (whose
    /// buffers are reused); `false` when there are none.
    pub fn index_tail(&self, tail: &mut IndexTail) -> bool {
        tail.offsets.clear();
        tail.times.clear();
        tail.from = self.index_on_disk;
        tail.to = self.index.len();
        self.index
            .encode_offsets_from(tail.from.0, &mut tail.offsets);
        self.index.encode_times_from(tail.from.1, &mut tail.times);
        !tail.is_empty()
    }

    /// Offset index entries held only in memory.
    pub fn index_pending(&self) -> usize {
        self.index.len().0.saturating_sub(self.index_on_disk.0)
    }

    /// Records that the index files hold entries up to `on_disk` (counts,
    /// as [`SegIndex::len`]) and drops what memory need not keep of them:
    /// everything but the page directory once the segment is `sealed`,
    /// else all but the last page's worth.
    pub fn index_written(&mut self, on_disk: (usize, usize), sealed: bool) {
        self.index_on_disk = on_disk;
        let keep = if sealed { 0 } else { self.index.page_entries() };
        self.index.release(on_disk, keep);
    }

    pub fn base_offset(&self) -> i64 {
        self.files.base_offset
    }

    /// Records a batch just written at `pos` (index entries in memory).
    pub fn account_batch(&mut self, h: &BatchHeader, pos: u64, interval: u32) {
        let rel = (h.base_offset - self.base_offset()).clamp(0, i64::from(u32::MAX)) as u32;
        let pos32 = u32::try_from(pos).unwrap_or(u32::MAX);
        self.index
            .add_batch(rel, pos32, h.max_timestamp, h.size() as u64, interval);
        if self.first_batch_ts.is_none() {
            self.first_batch_ts = Some(h.max_timestamp);
        }
        self.size = pos + h.size() as u64;
        self.next_offset = h.next_offset();
    }

    /// The timestamp retention compares: the largest batch timestamp, or
    /// the file's modification time when batches carry none (Kafka's rule).
    pub fn largest_timestamp(&self) -> i64 {
        if self.index.max_timestamp >= 0 {
            return self.index.max_timestamp;
        }
        std::fs::metadata(&self.files.log_path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as i64)
    }
}

/// Fills `dst` from `pos` with positioned reads; returns the bytes read
/// (fewer than `dst.len()` only at end of file).
fn read_into(f: &File, pos: u64, dst: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while let Some(rest) = dst.get_mut(filled..).filter(|r| !r.is_empty()) {
        match f.read_at(rest, pos + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Reads up to `len` bytes at `pos` (fewer at end of file).
pub(crate) fn read_at_most(f: &File, pos: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let filled = read_into(f, pos, &mut buf)?;
    buf.truncate(filled);
    Ok(buf)
}

/// Read buffers of the fetch path are recycled: zeroing a fresh ~1 MiB
/// buffer per fetch cost about 6% of read time. A buffer is zeroed once
/// when allocated; afterwards it is only ever exposed up to the bytes the
/// latest read put in it, so no stale bytes leak and no `unsafe` is needed.
/// It returns to the pool when the last `Bytes` slice of it is dropped
/// (after the fetch response went out).
mod read_pool {
    use parking_lot::Mutex;

    /// Buffers kept for reuse; at most this many times `MAX_POOLED_LEN`
    /// bytes stay allocated while idle.
    const MAX_POOLED: usize = 16;
    /// Larger buffers (unusually large fetches) are freed, not kept.
    pub(super) const MAX_POOLED_LEN: usize = 4 << 20;
    /// Allocation granule, so that reads of slightly different sizes reuse
    /// the same buffers.
    const GRANULE: usize = 64 << 10;

    static POOL: Mutex<Vec<Vec<u8>>> = parking_lot::const_mutex(Vec::new());

    /// A buffer of at least `len` initialized bytes.
    pub(super) fn take(len: usize) -> Vec<u8> {
        if len < GRANULE {
            // A small read (a partition with little data): exactly its
            // size. Rounded up to the granule, a fetch over 25,000 small
            // partitions held 1.6 GB of mostly unused buffers until its
            // response went out.
            return vec![0u8; len];
        }
        if len <= MAX_POOLED_LEN {
            let mut pool = POOL.lock();
            // Best fit: the smallest pooled buffer that is large enough.
            let best = pool
                .iter()
                .enumerate()
                .filter(|(_, b)| b.len() >= len)
                .min_by_key(|(_, b)| b.len())
                .map(|(i, _)| i);
            if let Some(i) = best {
                return pool.swap_remove(i);
            }
        }
        vec![0u8; len.div_ceil(GRANULE).saturating_mul(GRANULE).max(len)]
    }

    pub(super) fn give_back(buf: Vec<u8>) {
        if buf.len() > MAX_POOLED_LEN || buf.len() < GRANULE {
            return;
        }
        let mut pool = POOL.lock();
        if pool.len() < MAX_POOLED {
            pool.push(buf);
        } else if let Some((i, _)) = pool
            .iter()
            .enumerate()
            .min_by_key(|(_, b)| b.len())
            .filter(|(_, b)| b.len() < buf.len())
        {
            // Keep the larger buffers: they serve every read size.
            if let Some(slot) = pool.get_mut(i) {
                *slot = buf;
            }
        }
    }
}

/// Owner of a pooled read buffer behind `Bytes`: exposes the bytes read,
/// returns the buffer to the pool on drop.
struct PooledRead {
    buf: Vec<u8>,
    len: usize,
}

impl AsRef<[u8]> for PooledRead {
    fn as_ref(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }
}

impl Drop for PooledRead {
    fn drop(&mut self) {
        read_pool::give_back(std::mem::take(&mut self.buf));
    }
}

/// Reads up to `len` bytes at `pos` (fewer at end of file) into a recycled
/// buffer, without zeroing it first.
pub(crate) fn read_pooled(f: &File, pos: u64, len: usize) -> io::Result<Bytes> {
    let mut buf = read_pool::take(len);
    let filled = match buf.get_mut(..len) {
        Some(dst) => read_into(f, pos, dst)?,
        None => 0,
    };
    Ok(Bytes::from_owner(PooledRead { buf, len: filled }))
}

/// Chunked sequential reader over a file region, for header walks: few
/// large reads instead of one per batch.
pub(crate) struct Scanner<'a> {
    file: &'a File,
    end: u64,
    chunk: usize,
    /// Reused across chunks; `buf[..filled]` holds the file from `buf_pos`.
    buf: Vec<u8>,
    filled: usize,
    buf_pos: u64,
}

/// Chunk for walks that read whole batches (CRC checks).
pub(crate) const SCAN_CHUNK_FULL: usize = 1 << 20;
/// Chunk for header-only walks: small enough that large batches are
/// skipped rather than read.
pub(crate) const SCAN_CHUNK_HEADERS: usize = 64 << 10;

impl<'a> Scanner<'a> {
    pub fn new(file: &'a File, end: u64, chunk: usize) -> Scanner<'a> {
        Scanner {
            file,
            end,
            chunk,
            buf: Vec::new(),
            filled: 0,
            buf_pos: 0,
        }
    }

    /// Up to `len` bytes at `pos`; fewer only when `end` is reached first.
    pub fn bytes(&mut self, pos: u64, len: usize) -> io::Result<&[u8]> {
        let len = len.min(self.end.saturating_sub(pos) as usize);
        let in_buf = pos >= self.buf_pos && pos + len as u64 <= self.buf_pos + self.filled as u64;
        if !in_buf {
            let want = len
                .max(self.chunk)
                .min(self.end.saturating_sub(pos) as usize);
            if self.buf.len() < want {
                // Only the growth is zeroed; the buffer is reused after that.
                self.buf.resize(want, 0);
            }
            self.filled = 0;
            self.filled = match self.buf.get_mut(..want) {
                Some(dst) => read_into(self.file, pos, dst)?,
                None => 0,
            };
            self.buf_pos = pos;
        }
        let start = (pos - self.buf_pos) as usize;
        let stop = (start + len).min(self.filled);
        Ok(self.buf.get(start..stop).unwrap_or_default())
    }
}

/// Result of walking a segment's batches from its start.
pub(crate) struct Walk {
    pub valid_len: u64,
    pub next_offset: i64,
    pub index: SegIndex,
    /// Max timestamp of the first valid batch.
    pub first_batch_ts: Option<i64>,
    /// Position and size of the last valid batch.
    pub last_batch: Option<(u64, usize)>,
    /// Why the walk stopped before the end of the file.
    pub fault: Option<String>,
}

/// Walks the batches of a segment from position 0 to `file_len`, checking
/// structure (length, magic, record count, contiguous offsets) and, when
/// `verify_crc`, every CRC. Stops at the first fault. `on_batch` sees every
/// valid batch header in order.
pub(crate) fn walk(
    file: &File,
    base_offset: i64,
    file_len: u64,
    verify_crc: bool,
    interval: u32,
    mut on_batch: impl FnMut(u64, &BatchHeader),
) -> io::Result<Walk> {
    let chunk = if verify_crc {
        SCAN_CHUNK_FULL
    } else {
        SCAN_CHUNK_HEADERS
    };
    let mut sc = Scanner::new(file, file_len, chunk);
    let mut w = Walk {
        valid_len: 0,
        next_offset: base_offset,
        index: SegIndex::default(),
        first_batch_ts: None,
        last_batch: None,
        fault: None,
    };
    let mut pos = 0u64;
    while pos < file_len {
        let head = sc.bytes(pos, HEADER_LEN)?;
        let Some(h) = BatchHeader::parse(head) else {
            w.fault = Some(format!("truncated batch header ({} bytes)", head.len()));
            break;
        };
        if let Err(why) = batch::check_header(&h, batch::Made::InLog) {
            w.fault = Some(why);
            break;
        }
        let size = h.size();
        if pos + size as u64 > file_len {
            w.fault = Some(format!(
                "truncated batch: {} bytes present, {size} needed",
                file_len - pos
            ));
            break;
        }
        // Compaction leaves gaps between batches, never overlaps.
        if h.base_offset < w.next_offset {
            w.fault = Some(format!(
                "batch base offset {} where at least {} was expected",
                h.base_offset, w.next_offset
            ));
            break;
        }
        if verify_crc {
            let whole = sc.bytes(pos, size)?;
            if !batch::crc_matches(&h, whole) {
                w.fault = Some("CRC mismatch".into());
                break;
            }
        }
        let rel = (h.base_offset - base_offset).clamp(0, i64::from(u32::MAX)) as u32;
        let pos32 = u32::try_from(pos).unwrap_or(u32::MAX);
        w.index
            .add_batch(rel, pos32, h.max_timestamp, size as u64, interval);
        if w.first_batch_ts.is_none() {
            w.first_batch_ts = Some(h.max_timestamp);
        }
        on_batch(pos, &h);
        w.last_batch = Some((pos, size));
        pos += size as u64;
        w.valid_len = pos;
        w.next_offset = h.next_offset();
    }
    Ok(w)
}

/// Checks the CRC of one batch at `pos`.
pub(crate) fn batch_crc_ok(file: &File, pos: u64, size: usize) -> io::Result<bool> {
    let b = read_at_most(file, pos, size)?;
    Ok(b.len() == size && BatchHeader::parse(&b).is_some_and(|h| batch::crc_matches(&h, &b)))
}

/// Why a segment read stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stop {
    /// The byte budget is used up.
    Full,
    /// The next batch starts at or past the read limit.
    Limit,
    /// The segment has no more batches.
    SegmentEnd,
}

pub(crate) struct SegRead {
    pub data: Bytes,
    /// One past the last offset returned (the requested offset when nothing).
    pub next_offset: i64,
    pub stop: Stop,
}

/// Where a cut over an in-memory chunk ended.
enum Cut {
    Done(usize, i64, Stop),
    /// A batch that would fit is not (completely) in the chunk.
    NeedMore(usize, i64),
}

fn cut(buf: &[u8], start: usize, budget: usize, min_one: bool, limit: i64, mut next: i64) -> Cut {
    let mut q = start;
    loop {
        let Some(h) = buf.get(q..).and_then(BatchHeader::parse) else {
            return Cut::NeedMore(q, next);
        };
        if h.base_offset >= limit {
            return Cut::Done(q, next, Stop::Limit);
        }
        let size = h.size();
        let used = q - start;
        if used + size > budget && !(used == 0 && min_one) {
            return Cut::Done(q, next, Stop::Full);
        }
        if size < HEADER_LEN || q + size > buf.len() {
            return Cut::NeedMore(q, next);
        }
        q += size;
        next = h.next_offset();
    }
}

fn invalid_data(files: &SegFiles, pos: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "unreadable batch header in {} at position {pos}",
            files.log_path.display()
        ),
    )
}

/// Reads whole batches of one segment starting with the batch that holds
/// `offset`, from file position `start_pos` (an index hint at or before that
/// batch) up to `seg_size`. `slack` bounds how far before the target batch
/// the hint may be. Normally one pread; a second when the chunk missed.
#[allow(clippy::too_many_arguments)]
pub(crate) fn read_batches(
    files: &SegFiles,
    start_pos: u64,
    seg_size: u64,
    offset: i64,
    limit: i64,
    budget: usize,
    min_one: bool,
    slack: usize,
) -> io::Result<SegRead> {
    let nothing = |stop| SegRead {
        data: Bytes::new(),
        next_offset: offset,
        stop,
    };
    let log = files.log()?;
    let mut pos = start_pos;
    // Locate the first batch whose last offset is >= `offset`.
    let (buf, found) = loop {
        if pos >= seg_size {
            return Ok(nothing(Stop::SegmentEnd));
        }
        let want = ((seg_size - pos) as usize).min(slack.saturating_add(budget.max(HEADER_LEN)));
        let buf = read_pooled(&log, pos, want)?;
        let mut p = 0usize;
        let mut found = None;
        while let Some(h) = buf.get(p..).and_then(BatchHeader::parse) {
            if h.size() < HEADER_LEN {
                return Err(invalid_data(files, pos + p as u64));
            }
            if h.base_offset >= limit {
                return Ok(nothing(Stop::Limit));
            }
            if h.last_offset() >= offset {
                found = Some(p);
                break;
            }
            p += h.size();
        }
        match found {
            Some(p) => break (buf, p),
            None if p == 0 => return Err(invalid_data(files, pos)),
            None => pos += p as u64,
        }
    };
    let at_seg_end = |chunk_pos: u64, len: usize| chunk_pos + len as u64 >= seg_size;
    match cut(&buf, found, budget, min_one, limit, offset) {
        Cut::Done(end, next, stop) => {
            let data = buf.slice(found..end);
            Ok(SegRead {
                data,
                next_offset: next,
                stop,
            })
        }
        Cut::NeedMore(end, next) if at_seg_end(pos, buf.len()) && end == buf.len() => {
            let data = buf.slice(found..end);
            Ok(SegRead {
                data,
                next_offset: next,
                stop: Stop::SegmentEnd,
            })
        }
        Cut::NeedMore(..) => {
            // The chunk ended inside a batch we may return: read again from
            // the target batch, exactly the budget (or the first batch).
            let first_size = BatchHeader::parse(buf.get(found..).unwrap_or_default())
                .map_or(HEADER_LEN, |h| h.size());
            let from = pos + found as u64;
            let len = ((seg_size - from) as usize).min(budget.max(first_size));
            let buf = read_pooled(&log, from, len)?;
            match cut(&buf, 0, budget, min_one, limit, offset) {
                Cut::Done(end, next, stop) => Ok(SegRead {
                    data: buf.slice(..end),
                    next_offset: next,
                    stop,
                }),
                Cut::NeedMore(end, next) => {
                    let stop = if at_seg_end(from, buf.len()) && end == buf.len() {
                        Stop::SegmentEnd
                    } else {
                        Stop::Full
                    };
                    Ok(SegRead {
                        data: buf.slice(..end),
                        next_offset: next,
                        stop,
                    })
                }
            }
        }
    }
}

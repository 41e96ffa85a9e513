//! One segment: a log file of stored batches plus its two index files, the
//! recovery walk over it and the positioned reads of the fetch path.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use crate::batch::{self, BatchHeader, HEADER_LEN};
use crate::index::{self, SegIndex};

pub(crate) const LOG_SUFFIX: &str = ".log";
pub(crate) const INDEX_SUFFIX: &str = ".index";
pub(crate) const TIME_SUFFIX: &str = ".timeindex";

/// File name stem of a segment: the base offset, 20 digits, zero padded.
pub(crate) fn stem(base_offset: i64) -> String {
    format!("{base_offset:020}")
}

/// The open files of a segment. Shared (Arc) with readers and the flusher,
/// so a reader keeps a deleted segment's data readable until it is done.
#[derive(Debug)]
pub(crate) struct SegFiles {
    pub base_offset: i64,
    pub log: File,
    pub index: File,
    pub time: File,
    pub log_path: PathBuf,
    pub index_path: PathBuf,
    pub time_path: PathBuf,
}

impl SegFiles {
    /// Opens (creating when missing) the three files of a segment.
    pub fn open(dir: &Path, base_offset: i64) -> io::Result<SegFiles> {
        let s = stem(base_offset);
        let log_path = dir.join(format!("{s}{LOG_SUFFIX}"));
        let index_path = dir.join(format!("{s}{INDEX_SUFFIX}"));
        let time_path = dir.join(format!("{s}{TIME_SUFFIX}"));
        let open = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(p)
        };
        Ok(SegFiles {
            base_offset,
            log: open(&log_path)?,
            index: open(&index_path)?,
            time: open(&time_path)?,
            log_path,
            index_path,
            time_path,
        })
    }

    /// Creates a fresh, empty segment (truncating leftovers of the same name).
    pub fn create(dir: &Path, base_offset: i64) -> io::Result<SegFiles> {
        let f = SegFiles::open(dir, base_offset)?;
        f.log.set_len(0)?;
        f.index.set_len(0)?;
        f.time.set_len(0)?;
        Ok(f)
    }

    pub fn remove_files(&self) -> io::Result<()> {
        for p in [&self.log_path, &self.index_path, &self.time_path] {
            match std::fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Replaces both index files with the given in-memory index.
    pub fn write_indexes(&self, ix: &SegIndex) -> io::Result<()> {
        rewrite(&self.index, &ix.encode_offsets())?;
        rewrite(&self.time, &ix.encode_times())
    }

    /// Writes freshly added index entries at the ends of the index files;
    /// `n_offsets` / `n_times` are the entry counts including them.
    pub fn append_index_entry(
        &self,
        added: index::Added,
        n_offsets: usize,
        n_times: usize,
    ) -> io::Result<()> {
        if let Some((rel, pos)) = added.offset {
            let at = (n_offsets.saturating_sub(1) * index::OFFSET_ENTRY) as u64;
            self.index
                .write_all_at(&index::encode_offset_entry(rel, pos), at)?;
        }
        if let Some((ts, rel)) = added.time {
            let at = (n_times.saturating_sub(1) * index::TIME_ENTRY) as u64;
            self.time
                .write_all_at(&index::encode_time_entry(ts, rel), at)?;
        }
        Ok(())
    }
}

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
    /// Timestamp `segment.ms` counts from: the first batch's max timestamp,
    /// or the creation time for an empty segment (Kafka's rule).
    pub roll_base_ms: i64,
    pub has_first_batch: bool,
}

impl SegMeta {
    pub fn new_empty(files: Arc<SegFiles>, now_ms: i64) -> SegMeta {
        let base = files.base_offset;
        SegMeta {
            files,
            size: 0,
            next_offset: base,
            index: SegIndex::default(),
            roll_base_ms: now_ms,
            has_first_batch: false,
        }
    }

    pub fn base_offset(&self) -> i64 {
        self.files.base_offset
    }

    /// Records a batch just written at `pos`; returns new index entries.
    pub fn account_batch(&mut self, h: &BatchHeader, pos: u64, interval: u32) -> index::Added {
        let rel = (h.base_offset - self.base_offset()).clamp(0, i64::from(u32::MAX)) as u32;
        let pos32 = u32::try_from(pos).unwrap_or(u32::MAX);
        let added = self
            .index
            .add_batch(rel, pos32, h.max_timestamp, h.size() as u64, interval);
        if !self.has_first_batch {
            self.has_first_batch = true;
            if h.max_timestamp >= 0 {
                self.roll_base_ms = h.max_timestamp;
            }
        }
        self.size = pos + h.size() as u64;
        self.next_offset = h.next_offset();
        added
    }

    /// The timestamp retention compares: the largest batch timestamp, or
    /// the file's modification time when batches carry none (Kafka's rule).
    pub fn largest_timestamp(&self) -> i64 {
        if self.index.max_timestamp >= 0 {
            return self.index.max_timestamp;
        }
        self.files
            .log
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as i64)
    }
}

/// Reads up to `len` bytes at `pos` (fewer at end of file).
pub(crate) fn read_at_most(f: &File, pos: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        let Some(dst) = buf.get_mut(filled..) else {
            break;
        };
        match f.read_at(dst, pos + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(filled);
    Ok(buf)
}

/// Chunked sequential reader over a file region, for header walks: few
/// large reads instead of one per batch.
pub(crate) struct Scanner<'a> {
    file: &'a File,
    end: u64,
    chunk: usize,
    buf: Vec<u8>,
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
            buf_pos: 0,
        }
    }

    /// Up to `len` bytes at `pos`; fewer only when `end` is reached first.
    pub fn bytes(&mut self, pos: u64, len: usize) -> io::Result<&[u8]> {
        let len = len.min(self.end.saturating_sub(pos) as usize);
        let in_buf =
            pos >= self.buf_pos && pos + len as u64 <= self.buf_pos + self.buf.len() as u64;
        if !in_buf {
            let want = len
                .max(self.chunk)
                .min(self.end.saturating_sub(pos) as usize);
            self.buf = read_at_most(self.file, pos, want)?;
            self.buf_pos = pos;
        }
        let start = (pos - self.buf_pos) as usize;
        let stop = (start + len).min(self.buf.len());
        Ok(self.buf.get(start..stop).unwrap_or_default())
    }
}

/// Result of walking a segment's batches from its start.
pub(crate) struct Walk {
    pub valid_len: u64,
    pub next_offset: i64,
    pub index: SegIndex,
    pub roll_base_ms: Option<i64>,
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
        roll_base_ms: None,
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
        if let Err(why) = batch::check_header(&h) {
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
        if h.base_offset != w.next_offset {
            w.fault = Some(format!(
                "batch base offset {} where {} was expected",
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
        if w.roll_base_ms.is_none() {
            w.roll_base_ms = Some(h.max_timestamp);
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
    let mut pos = start_pos;
    // Locate the first batch whose last offset is >= `offset`.
    let (buf, found) = loop {
        if pos >= seg_size {
            return Ok(nothing(Stop::SegmentEnd));
        }
        let want = ((seg_size - pos) as usize).min(slack.saturating_add(budget.max(HEADER_LEN)));
        let buf = read_at_most(&files.log, pos, want)?;
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
            let data = Bytes::from(buf).slice(found..end);
            Ok(SegRead {
                data,
                next_offset: next,
                stop,
            })
        }
        Cut::NeedMore(end, next) if at_seg_end(pos, buf.len()) && end == buf.len() => {
            let data = Bytes::from(buf).slice(found..end);
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
            let buf = read_at_most(&files.log, from, len)?;
            match cut(&buf, 0, budget, min_one, limit, offset) {
                Cut::Done(end, next, stop) => Ok(SegRead {
                    data: Bytes::from(buf).slice(..end),
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
                        data: Bytes::from(buf).slice(..end),
                        next_offset: next,
                        stop,
                    })
                }
            }
        }
    }
}

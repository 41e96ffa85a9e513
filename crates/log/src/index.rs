//! Sparse offset index and time index of one segment.
//!
//! Entries are derived deterministically from the batch sequence, so
//! recovery can rebuild them from the log and compare with the `.index` /
//! `.timeindex` files. Memory holds only what lookups need often: the
//! entries not yet written to the files, the most recent page's worth
//! that are (a consumer near the log end finds its position without
//! touching a file), and the first entry of every page of the rest. A lookup below the resident entries reads one page of the
//! file (see [`Located`]). A sealed segment keeps no entries beyond that
//! page directory: a few bytes per 2 MiB of log.
//!
//! `.index` entry: relative offset u32 BE + file position u32 BE (8 bytes).
//! `.timeindex` entry: max timestamp so far i64 BE + relative offset u32 BE
//! of the batch that carried it (12 bytes).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

pub(crate) const OFFSET_ENTRY: usize = 8;
pub(crate) const TIME_ENTRY: usize = 12;

/// Entries of one page of an index file: what a lookup reads (4 KiB of
/// `.index`), and the most [`set_index_page_entries`] allows (lookups read
/// pages into buffers of this size).
pub(crate) const MAX_PAGE_ENTRIES: usize = 512;

/// Entries per page for indexes made from now on. Small in the crate's own
/// tests, so they cross pages often.
static PAGE_ENTRIES: AtomicUsize = AtomicUsize::new(if cfg!(test) { 4 } else { MAX_PAGE_ENTRIES });

/// Sets how many index entries make a page (default and most: 512, 4 KiB
/// of `.index`; at least 2): memory keeps one entry per page of what the
/// files hold, and a lookup below the resident entries reads one page.
/// Takes effect for indexes built afterwards; set it before opening a
/// store. Tests use small pages so that reads cross them often.
pub fn set_index_page_entries(entries: usize) {
    PAGE_ENTRIES.store(entries.clamp(2, MAX_PAGE_ENTRIES), Ordering::Relaxed);
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SegIndex {
    /// Resident offset index entries (relative base offset of a batch, its
    /// file position), increasing; entry number `offsets_from` is the first.
    offsets: Vec<(u32, u32)>,
    /// Resident time index entries (max timestamp of the segment up to a
    /// batch, relative offset of the batch that first reached it),
    /// increasing in both; entry number `times_from` is the first.
    times: Vec<(i64, u32)>,
    /// Entries before the resident ones are only in the files.
    offsets_from: usize,
    times_from: usize,
    /// Entries 0, page, 2 * page, ... of those only in the files.
    offset_pages: Vec<(u32, u32)>,
    time_pages: Vec<(i64, u32)>,
    /// Timestamp of the last time index entry, -1 when none.
    last_time: i64,
    /// Entries per page, fixed when the index is made.
    page: usize,
    bytes_since_entry: u64,
    /// Largest batch max timestamp in the segment, -1 when none.
    pub max_timestamp: i64,
    rel_of_max: u32,
}

impl Default for SegIndex {
    fn default() -> Self {
        SegIndex {
            offsets: Vec::new(),
            times: Vec::new(),
            offsets_from: 0,
            times_from: 0,
            offset_pages: Vec::new(),
            time_pages: Vec::new(),
            last_time: -1,
            page: PAGE_ENTRIES.load(Ordering::Relaxed),
            bytes_since_entry: 0,
            max_timestamp: -1,
            rel_of_max: 0,
        }
    }
}

/// Where a lookup found its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Located<T> {
    /// In memory.
    Here(T),
    /// In one page of the index file (entries `first..first + len`), whose
    /// first entry is `floor`: a valid answer itself, only less precise,
    /// for when the page cannot be read or does not look right.
    Page { first: usize, len: usize, floor: T },
}

/// A page of an index file as read, checked against what memory knows of it.
fn page_entries<E: PartialEq + Copy>(
    bytes: &[u8],
    entry: usize,
    decode: impl Fn(&[u8]) -> E,
    floor: E,
    increasing: impl Fn(&E, &E) -> bool,
) -> Option<Vec<E>> {
    let entries: Vec<E> = bytes.chunks_exact(entry).map(decode).collect();
    let sane = entries.first() == Some(&floor)
        && entries
            .windows(2)
            .all(|w| matches!(w, [a, b] if increasing(a, b)));
    sane.then_some(entries)
}

impl Located<(u32, u32)> {
    /// Answer of an offset lookup for relative offset `rel`: a file
    /// position. `page` is the page as read from `.index`, `None` when it
    /// could not be read.
    pub fn position(self, rel: u32, page: Option<&[u8]>) -> u64 {
        match self {
            Located::Here((_, pos)) => u64::from(pos),
            Located::Page { floor, .. } => {
                let found = page.and_then(|b| self.page_entry(rel, b));
                u64::from(found.unwrap_or(floor).1)
            }
        }
    }

    /// For a `Page`: the entry (relative offset, position) of `page` that
    /// answers `rel`, when the page looks right.
    pub fn page_entry(self, rel: u32, page: &[u8]) -> Option<(u32, u32)> {
        let Located::Page { floor, .. } = self else {
            return None;
        };
        let entries = page_entries(page, OFFSET_ENTRY, decode_offset_entry, floor, |a, b| {
            a.0 < b.0 && a.1 < b.1
        })?;
        entries.iter().take_while(|e| e.0 <= rel).last().copied()
    }
}

impl Located<(i64, u32)> {
    /// Answer of a time lookup for `ts`: the relative offset of a batch from
    /// which a scan may start. `page` as for [`Located::position`].
    pub fn scan_start(self, ts: i64, page: Option<&[u8]>) -> u32 {
        match self {
            Located::Here((_, rel)) => rel,
            Located::Page { floor, .. } => {
                let entries = page.and_then(|b| {
                    page_entries(b, TIME_ENTRY, decode_time_entry, floor, |a, b| {
                        a.0 < b.0 && a.1 <= b.1
                    })
                });
                entries
                    .and_then(|e| e.iter().take_while(|e| e.0 < ts).last().copied())
                    .unwrap_or(floor)
                    .1
            }
        }
    }
}

impl<T> Located<T> {
    /// Byte range of the page in its file, for `entry`-byte entries.
    pub fn page_range(&self, entry: usize) -> Option<(u64, usize)> {
        match self {
            Located::Here(_) => None,
            Located::Page { first, len, .. } => Some(((first * entry) as u64, len * entry)),
        }
    }
}

impl SegIndex {
    /// Accounts for a batch appended at `pos`, adding index entries for it
    /// when due. An entry is added when more than `interval` bytes were appended since
    /// the previous one (Kafka's rule), pointing at this batch's start.
    pub fn add_batch(&mut self, rel: u32, pos: u32, max_ts: i64, size: u64, interval: u32) {
        if max_ts > self.max_timestamp {
            self.max_timestamp = max_ts;
            self.rel_of_max = rel;
        }
        if pos > 0 && self.bytes_since_entry > u64::from(interval) {
            self.offsets.push((rel, pos));
            if self.max_timestamp >= 0 && self.max_timestamp > self.last_time {
                self.times.push((self.max_timestamp, self.rel_of_max));
                self.last_time = self.max_timestamp;
            }
            self.bytes_since_entry = 0;
        }
        self.bytes_since_entry += size;
    }

    /// Entry counts (offset index, time index), resident or not.
    pub fn len(&self) -> (usize, usize) {
        (
            self.offsets_from + self.offsets.len(),
            self.times_from + self.times.len(),
        )
    }

    /// Drops from memory the entries the files hold (`on_disk` counts, as
    /// [`Self::len`]) except the last `keep` of each index, keeping the
    /// first of each page. Does nothing until at least a page's worth can
    /// go, unless `keep` is 0 (a sealed segment).
    pub fn release(&mut self, on_disk: (usize, usize), keep: usize) {
        fn drop_front<E: Copy>(
            resident: &mut Vec<E>,
            from: &mut usize,
            pages: &mut Vec<E>,
            (on_disk, keep, page): (usize, usize, usize),
        ) {
            let upto = on_disk.saturating_sub(keep).min(*from + resident.len());
            if upto <= *from || (keep > 0 && upto - *from < page) {
                return;
            }
            let gone = upto - *from;
            pages.extend(
                resident
                    .iter()
                    .take(gone)
                    .enumerate()
                    .filter(|(i, _)| (*from + i).is_multiple_of(page))
                    .map(|(_, e)| *e),
            );
            resident.drain(..gone);
            resident.shrink_to_fit();
            *from = upto;
        }
        let page = self.page;
        drop_front(
            &mut self.offsets,
            &mut self.offsets_from,
            &mut self.offset_pages,
            (on_disk.0, keep, page),
        );
        drop_front(
            &mut self.times,
            &mut self.times_from,
            &mut self.time_pages,
            (on_disk.1, keep, page),
        );
    }

    /// Entries per page of this index.
    pub fn page_entries(&self) -> usize {
        self.page
    }

    /// The last indexed batch starting at or before relative offset `rel`
    /// (the segment's start when none is indexed).
    /// Answers are index entries (relative offset, position); `(0, 0)`
    /// stands for the segment's start.
    pub fn locate_offset(&self, rel: i64) -> Located<(u32, u32)> {
        if rel <= 0 {
            return Located::Here((0, 0));
        }
        let rel = u32::try_from(rel).unwrap_or(u32::MAX);
        if self.offsets.first().is_some_and(|e| e.0 <= rel) {
            let i = self.offsets.partition_point(|e| e.0 <= rel);
            return Located::Here(self.offsets.get(i - 1).copied().unwrap_or((0, 0)));
        }
        let page = self.offset_pages.partition_point(|e| e.0 <= rel);
        match page.checked_sub(1) {
            None => Located::Here((0, 0)),
            Some(p) => self.page_of(p, self.offsets_from, &self.offset_pages, |e| *e),
        }
    }

    /// Where a scan for the first batch with max timestamp >= `ts` may
    /// start (every earlier batch is below `ts`): a relative offset.
    pub fn locate_timestamp(&self, ts: i64) -> Located<(i64, u32)> {
        if self.times.first().is_some_and(|e| e.0 < ts) {
            let i = self.times.partition_point(|e| e.0 < ts);
            // Every batch up to and including the one that reached e.0 is
            // below ts, so the scan may start right there.
            return Located::Here(self.times.get(i - 1).map_or((-1, 0), |e| *e));
        }
        let page = self.time_pages.partition_point(|e| e.0 < ts);
        match page.checked_sub(1) {
            None => Located::Here((-1, 0)),
            Some(p) => self.page_of(p, self.times_from, &self.time_pages, |e| *e),
        }
    }

    fn page_of<E: Copy, T>(
        &self,
        page: usize,
        in_files: usize,
        pages: &[E],
        answer: impl Fn(&E) -> T,
    ) -> Located<T> {
        let first = page * self.page;
        let len = self.page.min(in_files - first);
        let floor = answer(&pages[page]);
        if len == 1 {
            Located::Here(floor)
        } else {
            Located::Page { first, len, floor }
        }
    }

    /// The offset index file's contents. Only for an index built whole (by
    /// a walk or a compaction round), none of it released.
    pub fn encode_offsets(&self) -> Vec<u8> {
        debug_assert_eq!(self.offsets_from, 0);
        let mut out = Vec::with_capacity(self.offsets.len() * OFFSET_ENTRY);
        self.encode_offsets_from(self.offsets_from, &mut out);
        out
    }

    /// The time index file's contents; as [`Self::encode_offsets`].
    pub fn encode_times(&self) -> Vec<u8> {
        debug_assert_eq!(self.times_from, 0);
        let mut out = Vec::with_capacity(self.times.len() * TIME_ENTRY);
        self.encode_times_from(self.times_from, &mut out);
        out
    }

    /// Appends the offset entries from number `from` on (all resident:
    /// only entries in the files are released) to `out`.
    pub fn encode_offsets_from(&self, from: usize, out: &mut Vec<u8>) {
        for (rel, pos) in self.offsets.iter().skip(from - self.offsets_from) {
            out.extend_from_slice(&encode_offset_entry(*rel, *pos));
        }
    }

    /// Appends the time entries from number `from` on to `out`.
    pub fn encode_times_from(&self, from: usize, out: &mut Vec<u8>) {
        for (ts, rel) in self.times.iter().skip(from - self.times_from) {
            out.extend_from_slice(&encode_time_entry(*ts, *rel));
        }
    }
}

pub(crate) fn encode_offset_entry(rel: u32, pos: u32) -> [u8; OFFSET_ENTRY] {
    let mut b = [0u8; OFFSET_ENTRY];
    b[..4].copy_from_slice(&rel.to_be_bytes());
    b[4..].copy_from_slice(&pos.to_be_bytes());
    b
}

pub(crate) fn encode_time_entry(ts: i64, rel: u32) -> [u8; TIME_ENTRY] {
    let mut b = [0u8; TIME_ENTRY];
    b[..8].copy_from_slice(&ts.to_be_bytes());
    b[8..].copy_from_slice(&rel.to_be_bytes());
    b
}

fn decode_offset_entry(b: &[u8]) -> (u32, u32) {
    let word = |r: std::ops::Range<usize>| {
        b.get(r)
            .and_then(|s| <[u8; 4]>::try_from(s).ok())
            .map_or(0, u32::from_be_bytes)
    };
    (word(0..4), word(4..8))
}

fn decode_time_entry(b: &[u8]) -> (i64, u32) {
    let ts = b
        .get(..8)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map_or(-1, i64::from_be_bytes);
    let rel = b
        .get(8..12)
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map_or(0, u32::from_be_bytes);
    (ts, rel)
}

/// Counts rewrites of a partition's index files under entries memory still
/// describes (a truncation, a compaction swap), as a sequence lock: odd
/// while one runs. A lookup that read a page reads the count before it took
/// its [`Located`] and again after the page; when the two differ (or the
/// first is odd) the page may belong to other contents, and the floor is
/// used instead.
#[derive(Debug, Default)]
pub(crate) struct Rewrites(AtomicU64);

impl Rewrites {
    /// Starts a rewrite; it ends when the guard drops, after memory
    /// describes the new files.
    pub fn begin(&self) -> RewriteGuard<'_> {
        self.0.fetch_add(1, Ordering::SeqCst);
        RewriteGuard(self)
    }

    pub fn stamp(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    /// Whether no rewrite ran at any time since `stamp` was taken.
    pub fn none_since(&self, stamp: u64) -> bool {
        stamp.is_multiple_of(2) && self.0.load(Ordering::SeqCst) == stamp
    }
}

pub(crate) struct RewriteGuard<'a>(&'a Rewrites);

impl Drop for RewriteGuard<'_> {
    fn drop(&mut self) {
        self.0 .0.fetch_add(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Looks `rel` up as the read path does, with the files as `index`
    /// would have written them whole.
    fn position(ix: &SegIndex, files: &(Vec<u8>, Vec<u8>), rel: i64) -> u64 {
        let at = ix.locate_offset(rel);
        let page = at
            .page_range(OFFSET_ENTRY)
            .map(|(o, n)| &files.0[o as usize..o as usize + n]);
        at.position(u32::try_from(rel.max(0)).unwrap_or(u32::MAX), page)
    }

    fn scan_start(ix: &SegIndex, files: &(Vec<u8>, Vec<u8>), ts: i64) -> u32 {
        let at = ix.locate_timestamp(ts);
        let page = at
            .page_range(TIME_ENTRY)
            .map(|(o, n)| &files.1[o as usize..o as usize + n]);
        at.scan_start(ts, page)
    }

    #[test]
    fn entries_follow_interval_and_lookup_floors() {
        let mut ix = SegIndex::default();
        let mut pos = 0u32;
        for i in 0..10u32 {
            ix.add_batch(i * 2, pos, i64::from(i) * 10, 100, 150);
            pos += 100;
        }
        // An entry whenever more than 150 bytes accumulated: every second batch.
        assert_eq!(ix.offsets, vec![(4, 200), (8, 400), (12, 600), (16, 800)]);
        let files = (ix.encode_offsets(), ix.encode_times());
        assert_eq!(files.0.len(), 4 * OFFSET_ENTRY);
        for released in [false, true] {
            if released {
                ix.release(ix.len(), 0);
                assert!(ix.offsets.is_empty() && ix.times.is_empty());
                assert_eq!(ix.offset_pages, vec![(4, 200)]);
            }
            assert_eq!(position(&ix, &files, 0), 0);
            assert_eq!(position(&ix, &files, 3), 0);
            assert_eq!(position(&ix, &files, 5), 200);
            assert_eq!(position(&ix, &files, 9), 400);
            assert_eq!(position(&ix, &files, 100), 800);
            assert_eq!(ix.max_timestamp, 90);
            assert_eq!(scan_start(&ix, &files, 25), 4);
            assert_eq!(scan_start(&ix, &files, 5), 0);
        }
        // A page that does not start with the entry memory has for it
        // (a file rewritten meanwhile, or damaged) gives the floor.
        let mut bad = files.clone();
        bad.0[4..8].copy_from_slice(&7u32.to_be_bytes());
        assert_eq!(position(&ix, &bad, 9), 200);
        bad.1[..8].copy_from_slice(&21i64.to_be_bytes());
        assert_eq!(scan_start(&ix, &bad, 100), 4);
        // An unreadable page gives the floor too.
        assert_eq!(ix.locate_offset(13).position(13, None), 200);
    }

    proptest! {
        /// Whatever is released, and when, lookups give what the whole
        /// index in memory gives.
        #[test]
        fn released_entries_answer_as_resident_ones(
            batches in prop::collection::vec((1u32..4, 0i64..30, 50u64..400), 1..200),
            releases in prop::collection::vec((0usize..200, 0usize..6), 0..8),
            probes in prop::collection::vec(-2i64..700, 1..40),
        ) {
            let mut whole = SegIndex::default();
            let mut part = SegIndex::default();
            let (mut rel, mut pos, mut ts) = (0u32, 0u32, 0i64);
            for (i, (count, dt, size)) in batches.iter().enumerate() {
                whole.add_batch(rel, pos, ts, *size, 200);
                part.add_batch(rel, pos, ts, *size, 200);
                for (at, keep) in &releases {
                    if *at == i {
                        let len = part.len();
                        part.release(len, *keep);
                    }
                }
                rel += count;
                pos += *size as u32;
                ts += dt;
            }
            prop_assert_eq!(whole.len(), part.len());
            let files = (whole.encode_offsets(), whole.encode_times());
            for p in probes {
                prop_assert_eq!(position(&part, &files, p), position(&whole, &files, p));
                prop_assert_eq!(scan_start(&part, &files, p), scan_start(&whole, &files, p));
            }
        }
    }
}

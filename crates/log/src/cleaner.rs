//! Log compaction's record work, apart from the partition it runs on: the
//! key → latest offset map of a dirty section, and the filter that rewrites
//! one stored batch keeping only the records that survive.
//!
//! This is the one place the storage engine decodes a producer's records
//! (keys, and whether a value is null); the append and fetch paths never
//! do. A batch keeps its base offset, last offset delta, producer fields
//! and max timestamp when records are removed (as Kafka's cleaner does for
//! RecordBatch v2), so offsets never move, a reader at a removed offset
//! gets the next surviving record, and the producer state replays the same.
//! Surviving records are copied as their stored bytes (their offset and
//! timestamp deltas are relative to the unchanged batch header), then
//! compressed again with the batch's codec.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::time::{Duration, Instant};

use siphasher::sip128::{Hasher128, SipHasher13};
use sluice_codec::Codec;

use crate::batch::{
    BatchHeader, ATTR_COMPRESSION, HEADER_LEN, MAX_DECOMPRESSED, OFF_RECORDS_COUNT,
};
/// Bytes one offset-map entry costs (key hash, offset, the table's slack),
/// for the dedupe-buffer budget.
pub(crate) const MAP_ENTRY_BYTES: usize = 40;

/// Why a batch could not be read or rewritten by the cleaner.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CleanError {
    #[error("records of the batch at offset {offset} are malformed: {why}")]
    Malformed { offset: i64, why: &'static str },
    #[error("batch at offset {offset}: {source}")]
    Codec {
        offset: i64,
        source: sluice_codec::CodecError,
    },
}

/// One record of a batch, as the cleaner sees it.
pub(crate) struct RecordRef<'a> {
    /// The record's stored bytes, length prefix included.
    pub raw: &'a [u8],
    pub offset_delta: i64,
    pub key: Option<&'a [u8]>,
    pub has_value: bool,
}

/// Reads one zigzag varint at the start of `buf`: (value, bytes used).
fn varint(buf: &[u8]) -> Option<(i64, usize)> {
    let mut z: u64 = 0;
    for (i, b) in buf.iter().take(10).enumerate() {
        z |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((((z >> 1) as i64) ^ -((z & 1) as i64), i + 1));
        }
    }
    None
}

/// A length-prefixed byte field: (None for null, bytes used).
fn field(buf: &[u8]) -> Option<(Option<&[u8]>, usize)> {
    let (len, n) = varint(buf)?;
    if len < 0 {
        return Some((None, n));
    }
    let end = n.checked_add(usize::try_from(len).ok()?)?;
    Some((Some(buf.get(n..end)?), end))
}

/// Walks the records of an uncompressed record section.
pub(crate) fn records(mut buf: &[u8]) -> impl Iterator<Item = Option<RecordRef<'_>>> {
    std::iter::from_fn(move || {
        if buf.is_empty() {
            return None;
        }
        let parsed = (|| {
            let (len, n) = varint(buf)?;
            let total = n.checked_add(usize::try_from(len).ok()?)?;
            let raw = buf.get(..total)?;
            let body = raw.get(n..)?;
            // Attributes, then the timestamp delta.
            let mut at = 1;
            let (_, used) = varint(body.get(at..)?)?;
            at += used;
            let (offset_delta, used) = varint(body.get(at..)?)?;
            at += used;
            let (key, used) = field(body.get(at..)?)?;
            at += used;
            let (value_len, _) = varint(body.get(at..)?)?;
            Some((
                RecordRef {
                    raw,
                    offset_delta,
                    key,
                    has_value: value_len >= 0,
                },
                total,
            ))
        })();
        match parsed {
            Some((r, total)) => {
                buf = buf.get(total..).unwrap_or_default();
                Some(Some(r))
            }
            None => {
                buf = &[];
                Some(None)
            }
        }
    })
}

/// The uncompressed records of a whole stored batch, in `scratch`.
pub(crate) fn batch_records<'a>(
    h: &BatchHeader,
    batch: &'a [u8],
    scratch: &'a mut Vec<u8>,
) -> Result<&'a [u8], CleanError> {
    let body = batch.get(HEADER_LEN..h.size()).unwrap_or_default();
    let codec = Codec::from_attributes(h.attributes).map_err(|source| CleanError::Codec {
        offset: h.base_offset,
        source,
    })?;
    if codec == Codec::None {
        return Ok(body);
    }
    sluice_codec::decompress(codec, body, MAX_DECOMPRESSED, scratch).map_err(|source| {
        CleanError::Codec {
            offset: h.base_offset,
            source,
        }
    })?;
    Ok(scratch.as_slice())
}

/// Key → offset of its latest record in the dirty section. Keys are kept
/// as 128-bit digests under a random per-map SipHash key, as Kafka keeps
/// MD5s: fixed memory per key, and no one can aim a collision at it.
pub(crate) struct OffsetMap {
    key: (u64, u64),
    map: HashMap<u128, i64, BuildHasherDefault<DigestHasher>>,
    max_entries: usize,
}

/// The table's hash of a digest: its low 64 bits. A digest is already a
/// keyed hash, so hashing it again would only cost time.
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Only digests (`write_u128`) are hashed here; any other input is
        // folded in so that the hasher stays total.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u128(&mut self, digest: u128) {
        self.0 = digest as u64;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

impl OffsetMap {
    pub fn new(budget_bytes: usize) -> OffsetMap {
        // A fresh random key per map (round): std's RandomState is seeded
        // from the OS per process and differs per instance.
        let random = || RandomState::new().build_hasher().finish();
        OffsetMap {
            key: (random(), random()),
            map: HashMap::default(),
            max_entries: (budget_bytes / MAP_ENTRY_BYTES).max(1),
        }
    }

    fn hash(&self, key: &[u8]) -> u128 {
        let mut h = SipHasher13::new_with_keys(self.key.0, self.key.1);
        h.write(key);
        h.finish128().as_u128()
    }

    pub fn put(&mut self, key: &[u8], offset: i64) {
        let h = self.hash(key);
        self.map.insert(h, offset);
    }

    /// The latest offset of `key` in the dirty section.
    pub fn get(&self, key: &[u8]) -> Option<i64> {
        self.map.get(&self.hash(key)).copied()
    }

    /// True once the budget is used up.
    pub fn is_full(&self) -> bool {
        self.map.len() >= self.max_entries
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }
}

/// The batch the cleaner writes in place of a stored one.
pub(crate) enum Filtered {
    /// Every record survives: the stored bytes are kept as they are.
    Unchanged,
    /// Some records survive, or none but the batch must stay (the header
    /// of a producer's last batch): this is the rewritten batch.
    Rewritten,
    /// Nothing of the batch stays.
    Dropped,
}

/// Rewrites `batch` (one whole stored batch with header `h`) keeping the
/// records `keep` accepts, into `out` (appended). `retain_empty`: write a
/// header-only batch when no record survives. `scratch` buffers are reused
/// across calls.
pub(crate) fn filter_batch(
    h: &BatchHeader,
    batch: &[u8],
    retain_empty: bool,
    mut keep: impl FnMut(&RecordRef<'_>) -> bool,
    scratch: &mut (Vec<u8>, Vec<u8>, Vec<u8>),
    out: &mut Vec<u8>,
) -> Result<Filtered, CleanError> {
    let (plain, kept, packed) = scratch;
    let malformed = |why| CleanError::Malformed {
        offset: h.base_offset,
        why,
    };
    let body = batch_records(h, batch, plain)?;
    kept.clear();
    let mut count = 0i32;
    let mut total = 0i32;
    for r in records(body) {
        let r = r.ok_or_else(|| malformed("record framing"))?;
        total += 1;
        if keep(&r) {
            kept.extend_from_slice(r.raw);
            count += 1;
        }
    }
    if total != h.records_count {
        return Err(malformed("record count"));
    }
    if count == total {
        return Ok(Filtered::Unchanged);
    }
    if count == 0 && !retain_empty {
        return Ok(Filtered::Dropped);
    }
    let mut attributes = h.attributes;
    let records: &[u8] = if count == 0 {
        attributes &= !ATTR_COMPRESSION;
        &[]
    } else {
        let codec = Codec::from_attributes(h.attributes).map_err(|source| CleanError::Codec {
            offset: h.base_offset,
            source,
        })?;
        if codec == Codec::None {
            kept.as_slice()
        } else {
            sluice_codec::compress(codec, kept, packed).map_err(|source| CleanError::Codec {
                offset: h.base_offset,
                source,
            })?;
            packed.as_slice()
        }
    };
    let start = out.len();
    let header = batch.get(..HEADER_LEN).ok_or_else(|| malformed("header"))?;
    out.extend_from_slice(header);
    out.extend_from_slice(records);
    let written = out.get_mut(start..).unwrap_or_default();
    put(written, OFF_RECORDS_COUNT, &count.to_be_bytes());
    crate::batch::reseal(written, attributes).map_err(|_| malformed("size"))?;
    Ok(Filtered::Rewritten)
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(dst) = buf.get_mut(at..at + bytes.len()) {
        dst.copy_from_slice(bytes);
    }
}

/// Paces the cleaner's reads and writes to a byte rate, so compaction
/// leaves the disk to appends and fetches.
pub(crate) struct Throttle {
    bytes_per_second: Option<u64>,
    started: Instant,
    bytes: u64,
}

impl Throttle {
    pub fn new(bytes_per_second: Option<u64>) -> Throttle {
        Throttle {
            bytes_per_second: bytes_per_second.filter(|b| *b > 0),
            started: Instant::now(),
            bytes: 0,
        }
    }

    /// Accounts for `bytes` of I/O, sleeping when ahead of the rate.
    pub fn spend(&mut self, bytes: u64) {
        let Some(rate) = self.bytes_per_second else {
            return;
        };
        self.bytes += bytes;
        let due = Duration::from_secs_f64(self.bytes as f64 / rate as f64);
        let elapsed = self.started.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::BatchBuilder;

    #[test]
    fn the_offset_map_keeps_the_latest_offset_of_each_key_and_fills_at_its_budget() {
        let keys = 50_000u32;
        let mut map = OffsetMap::new(keys as usize * MAP_ENTRY_BYTES);
        for round in 0..2i64 {
            for k in 0..keys {
                map.put(&k.to_be_bytes(), round * 1_000_000 + i64::from(k));
            }
        }
        assert_eq!(map.len(), keys as usize);
        assert!(map.is_full());
        for k in 0..keys {
            assert_eq!(map.get(&k.to_be_bytes()), Some(1_000_000 + i64::from(k)));
        }
        // Keys that differ only in length or by one bit are other keys.
        assert_eq!(map.get(&[0, 0, 0]), None);
        assert_eq!(map.get(&(keys | 1 << 31).to_be_bytes()), None);
        assert!(!OffsetMap::new(2 * MAP_ENTRY_BYTES).is_full());
    }

    #[test]
    fn a_filtered_batch_keeps_its_offsets_and_is_valid() {
        let mut b = BatchBuilder::new(256, 1_000);
        for i in 0..5u8 {
            let value = [i];
            b.push(
                1_000 + i64::from(i),
                Some(&[b'k', i % 2]),
                Some(&value),
                &[],
            );
        }
        let mut batch = b.finish().unwrap().to_vec();
        crate::batch::stamp(&mut batch, 100, 3);
        let h = BatchHeader::parse(&batch).unwrap();
        let mut scratch = Default::default();
        let mut out = Vec::new();
        let kept = filter_batch(
            &h,
            &batch,
            false,
            |r| r.offset_delta >= 3,
            &mut scratch,
            &mut out,
        )
        .unwrap();
        assert!(matches!(kept, Filtered::Rewritten));
        let nh = BatchHeader::parse(&out).unwrap();
        assert_eq!(
            (nh.base_offset, nh.last_offset_delta, nh.records_count),
            (100, 4, 2)
        );
        assert!(crate::batch::crc_matches(&nh, &out));
        let read: Vec<i64> = crate::PlainRecords::new(bytes::Bytes::from(out.clone()))
            .unwrap()
            .map(|r| r.unwrap().offset)
            .collect();
        assert_eq!(read, vec![103, 104]);
        out.clear();
        let none = filter_batch(&h, &batch, false, |_| false, &mut scratch, &mut out).unwrap();
        assert!(matches!(none, Filtered::Dropped));
        let empty = filter_batch(&h, &batch, true, |_| false, &mut scratch, &mut out).unwrap();
        assert!(matches!(empty, Filtered::Rewritten));
        let eh = BatchHeader::parse(&out).unwrap();
        assert_eq!(
            (eh.records_count, eh.last_offset_delta, eh.size()),
            (0, 4, HEADER_LEN)
        );
        let all = filter_batch(&h, &batch, false, |_| true, &mut scratch, &mut out).unwrap();
        assert!(matches!(all, Filtered::Unchanged));
    }
}

//! Kafka RecordBatch v2 headers: parsing and validation.
//!
//! Only the 61-byte batch header is ever interpreted; records stay opaque
//! (they may be compressed), so validation costs one CRC-32C pass per batch
//! and no per-record work.

use crate::LogError;

/// Size of the RecordBatch v2 header; records start here.
pub const HEADER_LEN: usize = 61;
/// Bytes before the part counted by `batchLength` (baseOffset + batchLength).
pub const LOG_OVERHEAD: usize = 12;
/// Smallest legal `batchLength`: the header minus the log overhead.
const MIN_BATCH_LENGTH: i32 = (HEADER_LEN - LOG_OVERHEAD) as i32;

const OFF_BASE_OFFSET: usize = 0;
pub(crate) const OFF_BATCH_LENGTH: usize = 8;
const OFF_LEADER_EPOCH: usize = 12;
const OFF_MAGIC: usize = 16;
pub(crate) const OFF_CRC: usize = 17;
/// The CRC covers everything from the attributes to the end of the batch.
pub(crate) const OFF_ATTRIBUTES: usize = 21;
const OFF_LAST_OFFSET_DELTA: usize = 23;
const OFF_BASE_TIMESTAMP: usize = 27;
const OFF_MAX_TIMESTAMP: usize = 35;
const OFF_PRODUCER_ID: usize = 43;
const OFF_PRODUCER_EPOCH: usize = 51;
const OFF_BASE_SEQUENCE: usize = 53;
pub(crate) const OFF_RECORDS_COUNT: usize = 57;

/// The codec bits of the attributes.
pub(crate) const ATTR_COMPRESSION: i16 = 0x07;
const ATTR_TRANSACTIONAL: i16 = 1 << 4;
/// Most bytes a stored batch's records may take decompressed when the
/// broker rewrites it (compaction, recompression): the largest batch Kafka
/// accepts decompresses to far less than this, and a cap keeps one odd
/// batch from taking the broker's memory.
pub(crate) const MAX_DECOMPRESSED: u64 = 256 << 20;
const ATTR_CONTROL: i16 = 1 << 5;

/// The fields of a RecordBatch v2 header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: i64,
    /// `batchLength`: bytes after the first 12.
    pub batch_length: i32,
    pub partition_leader_epoch: i32,
    pub magic: i8,
    pub crc: u32,
    pub attributes: i16,
    pub last_offset_delta: i32,
    pub base_timestamp: i64,
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub records_count: i32,
}

impl BatchHeader {
    /// Parses the header at the start of `buf`; None when fewer than 61 bytes.
    pub fn parse(buf: &[u8]) -> Option<BatchHeader> {
        let h: &[u8; HEADER_LEN] = buf.get(..HEADER_LEN)?.try_into().ok()?;
        Some(BatchHeader {
            base_offset: be_i64(h, OFF_BASE_OFFSET),
            batch_length: be_i32(h, OFF_BATCH_LENGTH),
            partition_leader_epoch: be_i32(h, OFF_LEADER_EPOCH),
            magic: h[OFF_MAGIC] as i8,
            crc: be_i32(h, OFF_CRC) as u32,
            attributes: be_i16(h, OFF_ATTRIBUTES),
            last_offset_delta: be_i32(h, OFF_LAST_OFFSET_DELTA),
            base_timestamp: be_i64(h, OFF_BASE_TIMESTAMP),
            max_timestamp: be_i64(h, OFF_MAX_TIMESTAMP),
            producer_id: be_i64(h, OFF_PRODUCER_ID),
            producer_epoch: be_i16(h, OFF_PRODUCER_EPOCH),
            base_sequence: be_i32(h, OFF_BASE_SEQUENCE),
            records_count: be_i32(h, OFF_RECORDS_COUNT),
        })
    }

    /// Total size of the batch in bytes (header included).
    pub fn size(&self) -> usize {
        LOG_OVERHEAD + self.batch_length.max(0) as usize
    }

    /// Offset of the batch's last record.
    pub fn last_offset(&self) -> i64 {
        self.base_offset + i64::from(self.last_offset_delta)
    }

    /// One past the last record's offset.
    pub fn next_offset(&self) -> i64 {
        self.last_offset() + 1
    }

    pub fn is_transactional(&self) -> bool {
        self.attributes & ATTR_TRANSACTIONAL != 0
    }

    pub fn is_control(&self) -> bool {
        self.attributes & ATTR_CONTROL != 0
    }

    /// Sequence number of the batch's last record (sequences wrap at i32::MAX).
    pub fn last_sequence(&self) -> i32 {
        wrap_seq(self.base_sequence, self.last_offset_delta)
    }
}

/// Records a consumer gets from the whole batches at the start of `buf`,
/// read off their headers alone (records stay unread, compressed or not).
/// Control batches are left out: consumers never see their records. A batch
/// cut short ends the count; a malformed length ends it too, so what a
/// corrupt log holds can make the figure low, never make this loop forever.
pub fn count_records(buf: &[u8]) -> u64 {
    let mut records = 0u64;
    let mut at = 0usize;
    while let Some(h) = buf
        .get(at..)
        .and_then(|rest| rest.get(..HEADER_LEN))
        .and_then(|h| <&[u8; HEADER_LEN]>::try_from(h).ok())
    {
        let length = be_i32(h, OFF_BATCH_LENGTH);
        if length < MIN_BATCH_LENGTH {
            break;
        }
        let size = LOG_OVERHEAD + length as usize;
        if buf.len() - at < size {
            break;
        }
        if be_i16(h, OFF_ATTRIBUTES) & ATTR_CONTROL == 0 {
            records += u64::try_from(be_i32(h, OFF_RECORDS_COUNT)).unwrap_or(0);
        }
        at += size;
    }
    records
}

/// `seq + delta` wrapping from i32::MAX to 0, as Kafka's producer does.
pub(crate) fn wrap_seq(seq: i32, delta: i32) -> i32 {
    let sum = i64::from(seq) + i64::from(delta);
    if sum > i64::from(i32::MAX) {
        (sum - i64::from(i32::MAX) - 1) as i32
    } else {
        sum as i32
    }
}

// The helpers read fixed offsets of a header that is known to be complete
// (the array type guarantees the length), so they cannot go out of bounds.
fn be_i64(b: &[u8; HEADER_LEN], at: usize) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    i64::from_be_bytes(a)
}

fn be_i32(b: &[u8; HEADER_LEN], at: usize) -> i32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    i32::from_be_bytes(a)
}

fn be_i16(b: &[u8; HEADER_LEN], at: usize) -> i16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    i16::from_be_bytes(a)
}

/// Why a batch at some position is not acceptable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum BatchFault {
    /// Fewer bytes than the header or the declared length needs (a torn write).
    Short { have: usize, need: usize },
    /// The bytes are there but are not a valid batch.
    Corrupt(String),
}

impl BatchFault {
    pub(crate) fn describe(&self) -> String {
        match self {
            BatchFault::Short { have, need } => {
                format!("truncated batch: {have} bytes present, {need} needed")
            }
            BatchFault::Corrupt(why) => why.clone(),
        }
    }
}

/// Who made a batch, which decides how its record count may relate to its
/// offsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Made {
    /// A producer: `recordsCount == lastOffsetDelta + 1 >= 1`.
    ByProducer,
    /// The log (stored, or a leader's stored bytes on a follower): the
    /// cleaner may have removed records, keeping the batch's offsets, so
    /// `0 <= recordsCount <= lastOffsetDelta + 1`.
    InLog,
}

/// Checks the header fields that can be judged without the batch body.
pub(crate) fn check_header(h: &BatchHeader, made: Made) -> Result<(), String> {
    if h.batch_length < MIN_BATCH_LENGTH {
        return Err(format!("batch length {} too small", h.batch_length));
    }
    if h.magic != 2 {
        return Err(format!(
            "unsupported magic {} (only 2 is accepted)",
            h.magic
        ));
    }
    let least = match made {
        Made::ByProducer => 1,
        Made::InLog => 0,
    };
    if h.records_count < least {
        return Err(format!("record count {} below {least}", h.records_count));
    }
    let span = i64::from(h.last_offset_delta) + 1;
    let count = i64::from(h.records_count);
    let matches = match made {
        Made::ByProducer => count == span,
        Made::InLog => count <= span,
    };
    if h.last_offset_delta < 0 || !matches {
        return Err(format!(
            "record count {} does not match last offset delta {}",
            h.records_count, h.last_offset_delta
        ));
    }
    Ok(())
}

/// True when the stored CRC-32C matches the bytes of `batch` (one whole batch).
pub(crate) fn crc_matches(h: &BatchHeader, batch: &[u8]) -> bool {
    batch
        .get(OFF_ATTRIBUTES..)
        .is_some_and(|covered| crc32c::crc32c(covered) == h.crc)
}

/// Checks the declared length of the batch at the start of `buf` against
/// what is present, returning the parsed header and the batch's total size.
/// The CRC is not checked here.
pub(crate) fn check_structure(buf: &[u8], made: Made) -> Result<(BatchHeader, usize), BatchFault> {
    let Some(h) = BatchHeader::parse(buf) else {
        // A header too short to parse; if the length field is readable and
        // already absurd, call it corrupt rather than short.
        if let Some(len_bytes) = buf.get(OFF_BATCH_LENGTH..OFF_BATCH_LENGTH + 4) {
            let mut a = [0u8; 4];
            a.copy_from_slice(len_bytes);
            let len = i32::from_be_bytes(a);
            if len < MIN_BATCH_LENGTH {
                return Err(BatchFault::Corrupt(format!("batch length {len} too small")));
            }
        }
        return Err(BatchFault::Short {
            have: buf.len(),
            need: HEADER_LEN,
        });
    };
    check_header(&h, made).map_err(BatchFault::Corrupt)?;
    let size = h.size();
    if size > buf.len() {
        return Err(BatchFault::Short {
            have: buf.len(),
            need: size,
        });
    }
    Ok((h, size))
}

/// Checks the batch at the start of `buf` completely (structure and CRC).
pub(crate) fn check_batch(buf: &[u8], made: Made) -> Result<(BatchHeader, usize), BatchFault> {
    let (h, size) = check_structure(buf, made)?;
    let batch = buf
        .get(..size)
        .ok_or_else(|| BatchFault::Corrupt("batch shorter than header".into()))?;
    if !crc_matches(&h, batch) {
        return Err(BatchFault::Corrupt(format!(
            "CRC mismatch: stored {:#010x}, computed {:#010x}",
            h.crc,
            batch.get(OFF_ATTRIBUTES..).map_or(0, crc32c::crc32c)
        )));
    }
    Ok((h, size))
}

/// Validates a buffer of one or more RecordBatch v2 as a producer sends
/// them: every batch complete, sane lengths, magic 2, CRC-32C correct,
/// `recordsCount >= 1` and equal to `lastOffsetDelta + 1`. Returns the
/// header of each batch, in order. Records are not decoded.
///
/// This is the entry point of the batch-validation fuzz target.
pub fn validate_batches(buf: &[u8]) -> Result<Vec<BatchHeader>, LogError> {
    validate(buf, Made::ByProducer)
}

/// [`validate_batches`] for batches as a log stores them (a leader's bytes
/// on a follower), which compaction may have thinned.
pub(crate) fn validate_stored(buf: &[u8]) -> Result<Vec<BatchHeader>, LogError> {
    validate(buf, Made::InLog)
}

fn validate(buf: &[u8], made: Made) -> Result<Vec<BatchHeader>, LogError> {
    if buf.is_empty() {
        return Err(LogError::CorruptBatch("no record batch".into()));
    }
    let mut headers = Vec::with_capacity(1);
    let mut rest = buf;
    while !rest.is_empty() {
        let (h, size) =
            check_batch(rest, made).map_err(|f| LogError::CorruptBatch(f.describe()))?;
        headers.push(h);
        rest = rest.get(size..).unwrap_or_default();
    }
    Ok(headers)
}

/// Overwrites the base offset and partition leader epoch of the batch at the
/// start of `batch` (both fields lie outside the CRC).
pub(crate) fn stamp(batch: &mut [u8], base_offset: i64, leader_epoch: i32) {
    if let Some(b) = batch.get_mut(OFF_BASE_OFFSET..OFF_BASE_OFFSET + 8) {
        b.copy_from_slice(&base_offset.to_be_bytes());
    }
    if let Some(b) = batch.get_mut(OFF_LEADER_EPOCH..OFF_LEADER_EPOCH + 4) {
        b.copy_from_slice(&leader_epoch.to_be_bytes());
    }
}

/// Finishes a batch the broker rewrote, whole in `batch`: its
/// `batchLength` from the slice's length, `attributes`, and the CRC over
/// both and everything after, computed again.
pub(crate) fn reseal(batch: &mut [u8], attributes: i16) -> Result<(), LogError> {
    let length = batch
        .len()
        .checked_sub(LOG_OVERHEAD)
        .filter(|_| batch.len() >= HEADER_LEN)
        .and_then(|l| i32::try_from(l).ok())
        .ok_or_else(|| LogError::CorruptBatch("a rewritten batch has no room".into()))?;
    batch[OFF_BATCH_LENGTH..OFF_BATCH_LENGTH + 4].copy_from_slice(&length.to_be_bytes());
    batch[OFF_ATTRIBUTES..OFF_ATTRIBUTES + 2].copy_from_slice(&attributes.to_be_bytes());
    let crc = crc32c::crc32c(&batch[OFF_ATTRIBUTES..]);
    batch[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_be_bytes());
    Ok(())
}

/// The batches of `buf` (validated) stored with codec `to` at `level`
/// (Kafka's topic `compression.type`): each batch of another codec is
/// decompressed and compressed again, the rest copied. None when every
/// batch has `to` already, so the producer's bytes are stored as sent.
pub(crate) fn recompress(
    buf: &[u8],
    to: sluice_codec::Codec,
    level: Option<i32>,
) -> Result<Option<Vec<u8>>, LogError> {
    use sluice_codec::Codec;
    let codec_of = |h: &BatchHeader| {
        Codec::from_attributes(h.attributes).map_err(|e| LogError::CorruptBatch(e.to_string()))
    };
    let mut rest = buf;
    let mut all_match = true;
    while let Some(h) = BatchHeader::parse(rest) {
        all_match &= codec_of(&h)? == to;
        rest = rest.get(h.size()..).unwrap_or_default();
    }
    if all_match {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(buf.len());
    let (mut raw, mut packed) = (Vec::new(), Vec::new());
    let mut rest = buf;
    while let Some(h) = BatchHeader::parse(rest) {
        let batch = rest
            .get(..h.size())
            .ok_or_else(|| LogError::CorruptBatch("a batch is cut short".into()))?;
        rest = rest.get(h.size()..).unwrap_or_default();
        let from = codec_of(&h)?;
        if from == to {
            out.extend_from_slice(batch);
            continue;
        }
        let codec_failed = |e: sluice_codec::CodecError| LogError::CorruptBatch(e.to_string());
        let body = batch.get(HEADER_LEN..).unwrap_or_default();
        let records: &[u8] = if from == Codec::None {
            body
        } else {
            sluice_codec::decompress(from, body, MAX_DECOMPRESSED, &mut raw)
                .map_err(codec_failed)?;
            &raw
        };
        let stored: &[u8] = if to == Codec::None {
            records
        } else {
            sluice_codec::compress_at(to, level, records, &mut packed).map_err(codec_failed)?;
            &packed
        };
        let start = out.len();
        out.extend_from_slice(batch.get(..HEADER_LEN).unwrap_or_default());
        out.extend_from_slice(stored);
        let attributes = (h.attributes & !ATTR_COMPRESSION) | to.attribute_bits();
        reseal(&mut out[start..], attributes)?;
    }
    Ok(Some(out))
}

/// The timestamp-type attribute bit: set, the batch's time is the
/// broker's (LogAppendTime), its max timestamp.
const ATTR_LOG_APPEND_TIME: i16 = 1 << 3;

/// Makes every batch in `buf` a LogAppendTime batch of broker time `now_ms`
/// (Kafka's `message.timestamp.type=LogAppendTime`): the timestamp-type
/// attribute set and the max timestamp replaced, the CRC (which covers
/// both) computed again. Consumers take the max timestamp as every
/// record's time. Batches must have been validated.
pub(crate) fn stamp_log_append_time(buf: &mut [u8], now_ms: i64) {
    let mut pos = 0usize;
    while let Some(len) = buf
        .get(pos + OFF_BATCH_LENGTH..pos + OFF_BATCH_LENGTH + 4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(i32::from_be_bytes)
    {
        let Some(size) = usize::try_from(len)
            .ok()
            .map(|l| l + LOG_OVERHEAD)
            .filter(|&s| s >= HEADER_LEN && pos + s <= buf.len())
        else {
            return;
        };
        let batch = &mut buf[pos..pos + size];
        let attributes = i16::from_be_bytes([batch[OFF_ATTRIBUTES], batch[OFF_ATTRIBUTES + 1]])
            | ATTR_LOG_APPEND_TIME;
        batch[OFF_MAX_TIMESTAMP..OFF_MAX_TIMESTAMP + 8].copy_from_slice(&now_ms.to_be_bytes());
        if reseal(batch, attributes).is_err() {
            return;
        }
        pos += size;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_append_time_stamping_keeps_batches_valid() {
        let mut buf = batch(3, 10);
        buf.extend(batch(1, 0));
        stamp_log_append_time(&mut buf, 1_700_000_000_123);
        let hs = validate_batches(&buf).unwrap();
        assert_eq!(hs.len(), 2);
        for h in hs {
            assert_eq!(h.max_timestamp, 1_700_000_000_123);
            assert_ne!(h.attributes & ATTR_LOG_APPEND_TIME, 0);
        }
    }

    /// A batch of `count` opaque "records" (`raw`) compressed with `codec`.
    fn packed_batch(count: i32, raw: &[u8], codec: sluice_codec::Codec) -> Vec<u8> {
        let mut b = batch(count, 0);
        let mut body = Vec::new();
        sluice_codec::compress(codec, raw, &mut body).unwrap();
        b.extend_from_slice(&body);
        let attributes = codec.attribute_bits() | ATTR_TRANSACTIONAL;
        reseal(&mut b, attributes).unwrap();
        b
    }

    fn codec(c: u8) -> sluice_codec::Codec {
        use sluice_codec::Codec::*;
        [None, Gzip, Snappy, Lz4, Zstd][usize::from(c % 5)]
    }

    proptest::proptest! {
        /// Recompressed batches are valid, all in the target codec, hold the
        /// same records and keep every other header field; a request whose
        /// batches all have the target codec already is stored as sent.
        #[test]
        fn recompression_keeps_the_records_and_the_header(
            batches in proptest::collection::vec(
                (1i32..50, proptest::collection::vec(0u8..4, 0..3000), 0u8..5), 1..5),
            to in 0u8..5,
            level in proptest::option::of(1i32..9),
        ) {
            let to = codec(to);
            let mut buf = Vec::new();
            for (count, raw, c) in &batches {
                buf.extend(packed_batch(*count, raw, codec(*c)));
            }
            let before = validate_batches(&buf).unwrap();
            let Some(out) = recompress(&buf, to, level).unwrap() else {
                proptest::prop_assert!(batches.iter().all(|(_, _, c)| codec(*c) == to));
                return Ok(());
            };
            let after = validate_batches(&out).unwrap();
            proptest::prop_assert_eq!(after.len(), batches.len());
            let mut rest = out.as_slice();
            for ((h, old), (_, raw, _)) in after.iter().zip(&before).zip(&batches) {
                let from = sluice_codec::Codec::from_attributes(h.attributes).unwrap();
                proptest::prop_assert_eq!(from, to);
                proptest::prop_assert_eq!(h.attributes & !ATTR_COMPRESSION,
                    old.attributes & !ATTR_COMPRESSION);
                proptest::prop_assert_eq!(
                    (h.records_count, h.base_sequence, h.producer_id, h.max_timestamp),
                    (old.records_count, old.base_sequence, old.producer_id, old.max_timestamp));
                let mut back = Vec::new();
                sluice_codec::decompress(to, &rest[HEADER_LEN..h.size()], 1 << 20, &mut back)
                    .unwrap();
                proptest::prop_assert_eq!(&back, raw);
                rest = &rest[h.size()..];
            }
        }
    }

    /// A minimal valid batch with `count` opaque "records" of `payload` bytes.
    fn batch(count: i32, payload: usize) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN + payload];
        let len = (b.len() - LOG_OVERHEAD) as i32;
        b[8..12].copy_from_slice(&len.to_be_bytes());
        b[16] = 2;
        b[23..27].copy_from_slice(&(count - 1).to_be_bytes());
        b[43..51].copy_from_slice(&(-1i64).to_be_bytes());
        b[57..61].copy_from_slice(&count.to_be_bytes());
        let crc = crc32c::crc32c(&b[21..]);
        b[17..21].copy_from_slice(&crc.to_be_bytes());
        b
    }

    #[test]
    fn valid_batches_pass_and_report_headers() {
        let mut buf = batch(3, 10);
        buf.extend(batch(1, 0));
        let hs = validate_batches(&buf).unwrap();
        assert_eq!(hs.len(), 2);
        assert_eq!(hs[0].records_count, 3);
        assert_eq!(hs[0].size(), HEADER_LEN + 10);
        assert_eq!(hs[1].last_offset_delta, 0);
    }

    #[test]
    fn count_records_reads_headers_only() {
        let mut buf = batch(3, 10);
        buf.extend(batch(1, 0));
        assert_eq!(count_records(&buf), 4);
        // A control batch (a transaction marker) reaches no consumer.
        let mut marker = batch(1, 0);
        marker[21..23].copy_from_slice(&ATTR_CONTROL.to_be_bytes());
        buf.extend(&marker);
        assert_eq!(count_records(&buf), 4);
        // The records are never looked at: garbage in them changes nothing.
        let mut opaque = batch(5, 20);
        opaque[HEADER_LEN..].fill(0xff);
        buf.extend(&opaque);
        assert_eq!(count_records(&buf), 9);
        // A batch cut short at the end of a read is not counted.
        let whole = buf.len();
        buf.extend(&batch(7, 30)[..40]);
        assert_eq!(count_records(&buf), 9);
        buf.truncate(whole);
        buf.extend(&batch(7, 30)[..HEADER_LEN + 3]);
        assert_eq!(count_records(&buf), 9);
        assert_eq!(count_records(&[]), 0);
    }

    #[test]
    fn count_records_stops_at_a_bad_length() {
        let mut buf = batch(2, 0);
        let mut bad = batch(4, 0);
        bad[8..12].copy_from_slice(&(-1i32).to_be_bytes());
        buf.extend(&bad);
        buf.extend(batch(8, 0));
        assert_eq!(count_records(&buf), 2);
        let mut zero = batch(4, 0);
        zero[8..12].copy_from_slice(&0i32.to_be_bytes());
        assert_eq!(count_records(&zero), 0);
        let mut negative = batch(1, 0);
        negative[57..61].copy_from_slice(&(-3i32).to_be_bytes());
        assert_eq!(count_records(&negative), 0);
    }

    #[test]
    fn stamping_keeps_crc_valid() {
        let mut b = batch(2, 5);
        stamp(&mut b, 1234, 7);
        let hs = validate_batches(&b).unwrap();
        assert_eq!(hs[0].base_offset, 1234);
        assert_eq!(hs[0].partition_leader_epoch, 7);
    }

    #[test]
    fn faults_are_detected() {
        let good = batch(2, 5);
        let mut bad_crc = good.clone();
        *bad_crc.last_mut().unwrap() ^= 1;
        assert!(validate_batches(&bad_crc).is_err());
        let mut bad_magic = good.clone();
        bad_magic[16] = 1;
        assert!(validate_batches(&bad_magic).is_err());
        assert!(validate_batches(&good[..good.len() - 1]).is_err());
        let mut bad_count = batch(2, 5);
        bad_count[57..61].copy_from_slice(&5i32.to_be_bytes());
        let crc = crc32c::crc32c(&bad_count[21..]);
        bad_count[17..21].copy_from_slice(&crc.to_be_bytes());
        assert!(validate_batches(&bad_count).is_err());
        assert!(validate_batches(&[]).is_err());
        assert!(matches!(
            check_structure(&[0u8; 30], Made::ByProducer),
            Err(BatchFault::Corrupt(_))
        ));
    }

    #[test]
    fn sequences_wrap() {
        assert_eq!(wrap_seq(i32::MAX, 1), 0);
        assert_eq!(wrap_seq(i32::MAX - 1, 3), 1);
        assert_eq!(wrap_seq(5, 2), 7);
    }
}

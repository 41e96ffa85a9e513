//! Record-level checks of what a producer sends, before it is appended.
//!
//! The storage engine validates batch headers and CRCs and never looks
//! inside a batch. A CRC only proves the bytes arrived as the producer made
//! them, not that they are records: a batch can declare five records and
//! hold one (the log would hand out four phantom offsets), declare 2^31-1 in
//! 70 bytes, hold bytes no consumer can parse (consumers then stop at that
//! offset for good), or name a codec nobody knows. Kafka's LogValidator
//! refuses all of these; so does this walk, which reads only the varint
//! framing of each record (lengths, deltas, header counts), skips keys,
//! values and header values without keeping them (header keys are checked to
//! be UTF-8), and leaves the stored bytes exactly the producer's.
//!
//! Compressed batches are walked the same way over a decompressing stream:
//! the records pass through a small buffer and are never held whole, and
//! the walk stops with an error once it has read more than
//! [`RecordLimits::max_decompressed`] bytes, so a small "bomb" batch costs at
//! most that much decompression work.

use std::io::{BufRead, BufReader, Read};

use sluice_codec::Codec;
use sluice_vocab::{ErrorCode, Refused};

/// RecordBatch v2 layout (the storage engine checks the rest of the header).
const HEADER_LEN: usize = 61;
const LOG_OVERHEAD: usize = 12;
const OFF_BATCH_LENGTH: usize = 8;
const OFF_MAGIC: usize = 16;
const OFF_ATTRIBUTES: usize = 21;
const OFF_BASE_TIMESTAMP: usize = 27;
const OFF_RECORDS_COUNT: usize = 57;
/// Decompressed bytes pass through a buffer of this size.
const STREAM_BUFFER: usize = 32 * 1024;

/// Bounds of the record walk.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RecordLimits {
    /// Most bytes a compressed batch's records may take once decompressed.
    pub max_decompressed: usize,
    /// Every record needs a key: the topic is compacted (Kafka refuses
    /// keyless records there with INVALID_RECORD).
    pub keys_required: bool,
    /// Every record's timestamp must lie in this window (the topic's
    /// `message.timestamp.before.max.ms` / `after.max.ms` around the
    /// broker's clock); Kafka refuses one outside with INVALID_TIMESTAMP.
    pub timestamp_window: Option<(i64, i64)>,
}

/// Why a producer's batches are refused: what, and in which record of its
/// batch (Kafka's `record_errors` batch index), when one record is to blame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RecordFault {
    pub record: Option<i32>,
    pub message: String,
    /// CORRUPT_MESSAGE for bytes that are not records, INVALID_RECORD for
    /// records the topic does not take.
    pub code: ErrorCode,
}

impl RecordFault {
    fn batch(message: impl Into<String>) -> Self {
        RecordFault {
            record: None,
            message: message.into(),
            code: ErrorCode::CorruptMessage,
        }
    }

    pub(crate) fn refused(&self) -> Refused {
        Refused::new(self.code, self.message.clone())
    }
}

/// Checks the records of every batch in `buf`. Batches whose framing is
/// broken are left to the storage engine's header check when this walk cannot
/// even find them; anything it can see to be wrong is refused here.
pub(crate) fn validate(buf: &[u8], limits: RecordLimits) -> Result<(), RecordFault> {
    let mut rest = buf;
    let mut left = limits.max_decompressed as u64;
    while !rest.is_empty() {
        let (Some(len), Some(&magic)) = (be_i32(rest, OFF_BATCH_LENGTH), rest.get(OFF_MAGIC))
        else {
            return Err(RecordFault::batch("truncated record batch header"));
        };
        if magic != 2 {
            // The storage engine refuses other magic values with its own message.
            return Ok(());
        }
        let size = usize::try_from(len)
            .ok()
            .and_then(|l| l.checked_add(LOG_OVERHEAD))
            .filter(|&s| s >= HEADER_LEN && s <= rest.len())
            .ok_or_else(|| RecordFault::batch(format!("record batch length {len} out of range")))?;
        let (batch, next) = rest.split_at(size);
        // One limit for all the batches of a request's partition: many
        // small bombs in one request cost no more than one.
        let used = check_batch(batch, left, limits)?;
        left = left.saturating_sub(used);
        rest = next;
    }
    Ok(())
}

/// Checks one batch; returns the bytes its records took decompressed
/// (none for an uncompressed batch), which must stay within `cap`.
fn check_batch(batch: &[u8], cap: u64, limits: RecordLimits) -> Result<u64, RecordFault> {
    let attributes = be_i16(batch, OFF_ATTRIBUTES).unwrap_or(0);
    let count = be_i32(batch, OFF_RECORDS_COUNT).unwrap_or(-1);
    let body = batch.get(HEADER_LEN..).unwrap_or_default();
    let rules = Rules {
        keys_required: limits.keys_required,
        timestamps: limits
            .timestamp_window
            .map(|window| (be_i64(batch, OFF_BASE_TIMESTAMP).unwrap_or(0), window)),
    };
    let codec =
        Codec::from_attributes(attributes).map_err(|e| RecordFault::batch(e.to_string()))?;
    if codec == Codec::None {
        return walk_records(Slice { buf: body, pos: 0 }, count, rules).map(|_| 0);
    }
    let decoder =
        sluice_codec::decoder(codec, body, cap).map_err(|e| RecordFault::batch(e.to_string()))?;
    walk_records(Stream::new(decoder, cap), count, rules)
}

/// What the topic asks of each record.
#[derive(Clone, Copy)]
struct Rules {
    keys_required: bool,
    /// The batch's base timestamp and the window its records' times must
    /// lie in.
    timestamps: Option<(i64, (i64, i64))>,
}

/// Why a walk stopped: a fault of one record, or of the batch's bytes as a
/// whole (a broken compressed stream, the decompressed-size limit).
enum Stop {
    Record(String),
    Batch(String),
    /// A well-formed record the topic does not take.
    Invalid(String),
    /// A record whose timestamp lies outside the topic's window.
    Timestamp(String),
}

impl From<&'static str> for Stop {
    fn from(message: &'static str) -> Self {
        Stop::Record(message.to_string())
    }
}

impl From<String> for Stop {
    fn from(message: String) -> Self {
        Stop::Record(message)
    }
}

/// Walks `count` records that must fill `input` exactly; returns the bytes
/// they took.
fn walk_records(input: impl Input, count: i32, rules: Rules) -> Result<u64, RecordFault> {
    let mut w = Walker {
        input,
        pos: 0,
        rules,
    };
    for index in 0..count {
        let at = |message: String| RecordFault {
            record: Some(index),
            message,
            code: ErrorCode::CorruptMessage,
        };
        match w.input.at_end() {
            Ok(false) => {}
            Ok(true) => {
                return Err(at(format!(
                    "batch declares {count} records but holds {index}"
                )))
            }
            Err(stop) => return Err(located(stop, index)),
        }
        w.record(index).map_err(|stop| located(stop, index))?;
    }
    match w.input.at_end() {
        Ok(true) => Ok(w.pos),
        Ok(false) => Err(RecordFault::batch(format!(
            "bytes follow the {count} declared records"
        ))),
        Err(stop) => Err(located(stop, count)),
    }
}

fn located(stop: Stop, index: i32) -> RecordFault {
    match stop {
        Stop::Record(message) => RecordFault {
            record: Some(index),
            message,
            code: ErrorCode::CorruptMessage,
        },
        Stop::Invalid(message) => RecordFault {
            record: Some(index),
            message,
            code: ErrorCode::InvalidRecord,
        },
        Stop::Timestamp(message) => RecordFault {
            record: Some(index),
            message,
            code: ErrorCode::InvalidTimestamp,
        },
        Stop::Batch(message) => RecordFault::batch(message),
    }
}

/// Reads the framing of records from an [`Input`], counting bytes so each
/// record's fields can be held to its declared length.
struct Walker<I> {
    input: I,
    pos: u64,
    rules: Rules,
}

impl<I: Input> Walker<I> {
    /// One record: attributes, timestamp delta, offset delta (which must be
    /// its index: offsets in a batch are dense), key, value and headers,
    /// exactly filling the record's declared length.
    fn record(&mut self, index: i32) -> Result<(), Stop> {
        let len = self.varint()?;
        let len = u64::try_from(len).map_err(|_| format!("record length {len} out of range"))?;
        let end = self.pos + len;
        self.skip(1, end, "attributes")?;
        let timestamp_delta = self.varlong()?;
        if let Some((base, (earliest, latest))) = self.rules.timestamps {
            let time = base.saturating_add(timestamp_delta);
            if time < earliest || time > latest {
                return Err(Stop::Timestamp(format!(
                    "timestamp {time} of record {index} is outside the topic's window [{earliest}, {latest}]"
                )));
            }
        }
        let offset_delta = self.varint()?;
        if offset_delta != index {
            return Err(format!("offset delta {offset_delta}, expected {index}").into());
        }
        let key_len = self.varint()?;
        if key_len < 0 && self.rules.keys_required {
            return Err(Stop::Invalid(
                "Compacted topic cannot accept message without key".into(),
            ));
        }
        if key_len < -1 {
            return Err(format!("key length {key_len} below -1").into());
        }
        self.skip(usize::try_from(key_len).unwrap_or(0), end, "key")?;
        self.bytes(-1, end, "value", |_| Ok(()))?;
        let headers = self.varint()?;
        if headers < 0 {
            return Err(format!("negative header count {headers}").into());
        }
        for _ in 0..headers {
            // Header keys are strings (Java's clients hand them out as
            // String); bytes that are not UTF-8 are refused so every
            // consumer can read them.
            let mut utf8 = Utf8::default();
            self.bytes(0, end, "header key", |piece| utf8.push(piece))?;
            utf8.finish()?;
            self.bytes(-1, end, "header value", |_| Ok(()))?;
        }
        if self.pos != end {
            return Err(format!(
                "record declares {len} bytes but its fields take {}",
                len + self.pos - end
            )
            .into());
        }
        Ok(())
    }

    /// A length-prefixed byte string (`min` -1 allows null), handed to `f`.
    #[inline]
    fn bytes(
        &mut self,
        min: i32,
        end: u64,
        what: &str,
        f: impl FnMut(&[u8]) -> Result<(), Stop>,
    ) -> Result<(), Stop> {
        let len = self.varint()?;
        if len < min {
            return Err(format!("{what} length {len} below {min}").into());
        }
        let n = usize::try_from(len).unwrap_or(0);
        self.feed(n, end, what, f)
    }

    #[inline]
    fn skip(&mut self, n: usize, end: u64, what: &str) -> Result<(), Stop> {
        self.feed(n, end, what, |_| Ok(()))
    }

    #[inline]
    fn feed(
        &mut self,
        n: usize,
        end: u64,
        what: &str,
        f: impl FnMut(&[u8]) -> Result<(), Stop>,
    ) -> Result<(), Stop> {
        let overrun = || Stop::from(format!("{what} of {n} bytes overruns its record"));
        let after = self.pos + n as u64;
        if after > end || !self.input.feed(n, f)? {
            return Err(overrun());
        }
        self.pos = after;
        Ok(())
    }

    /// A zigzag varint of at most `max_bytes` bytes.
    #[inline]
    fn zigzag(&mut self, max_bytes: u32) -> Result<i64, Stop> {
        let mut raw: u64 = 0;
        for i in 0..max_bytes {
            let b = self.input.byte()?.ok_or("truncated varint")?;
            self.pos += 1;
            raw |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(((raw >> 1) as i64) ^ -((raw & 1) as i64));
            }
        }
        Err("varint too long".into())
    }

    #[inline]
    fn varint(&mut self) -> Result<i32, Stop> {
        let v = self.zigzag(5)?;
        i32::try_from(v).map_err(|_| "varint out of range".into())
    }

    #[inline]
    fn varlong(&mut self) -> Result<i64, Stop> {
        self.zigzag(10)
    }
}

/// Where a walk reads a batch's record bytes from.
trait Input {
    /// The next byte, `None` at the end of the records.
    fn byte(&mut self) -> Result<Option<u8>, Stop>;
    /// Whether the records end here.
    fn at_end(&mut self) -> Result<bool, Stop>;
    /// Passes the next `n` bytes to `f`, in one or more pieces; `false` if
    /// the records end first.
    fn feed(&mut self, n: usize, f: impl FnMut(&[u8]) -> Result<(), Stop>) -> Result<bool, Stop>;
}

/// An uncompressed batch's records, in place.
struct Slice<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Input for Slice<'_> {
    #[inline]
    fn byte(&mut self) -> Result<Option<u8>, Stop> {
        let b = self.buf.get(self.pos).copied();
        if b.is_some() {
            self.pos += 1;
        }
        Ok(b)
    }

    fn at_end(&mut self) -> Result<bool, Stop> {
        Ok(self.pos >= self.buf.len())
    }

    #[inline]
    fn feed(
        &mut self,
        n: usize,
        mut f: impl FnMut(&[u8]) -> Result<(), Stop>,
    ) -> Result<bool, Stop> {
        let Some(piece) = (self.pos.checked_add(n)).and_then(|end| self.buf.get(self.pos..end))
        else {
            return Ok(false);
        };
        self.pos += n;
        f(piece)?;
        Ok(true)
    }
}

/// A compressed batch's records, decompressed through a bounded buffer; the
/// walk stops once more than `cap` bytes have been read from it.
struct Stream<R> {
    r: R,
    read: u64,
    cap: u64,
}

impl<'a> Stream<BufReader<Box<dyn Read + 'a>>> {
    fn new(decoder: Box<dyn Read + 'a>, cap: u64) -> Self {
        Stream {
            r: BufReader::with_capacity(STREAM_BUFFER, decoder),
            read: 0,
            cap,
        }
    }
}

impl<R: BufRead> Stream<R> {
    fn fill(r: &mut R) -> Result<&[u8], Stop> {
        r.fill_buf()
            .map_err(|e| Stop::Batch(format!("cannot decompress records: {e}")))
    }

    fn consume(&mut self, n: usize) -> Result<(), Stop> {
        self.r.consume(n);
        self.read += n as u64;
        self.within_cap(0)
    }

    fn within_cap(&self, more: u64) -> Result<(), Stop> {
        if self.read + more > self.cap {
            return Err(Stop::Batch(format!(
                "records exceed the decompressed-size limit ({} bytes left of it)",
                self.cap
            )));
        }
        Ok(())
    }
}

impl<R: BufRead> Input for Stream<R> {
    fn byte(&mut self) -> Result<Option<u8>, Stop> {
        let b = Self::fill(&mut self.r)?.first().copied();
        if b.is_some() {
            self.consume(1)?;
        }
        Ok(b)
    }

    fn at_end(&mut self) -> Result<bool, Stop> {
        Ok(Self::fill(&mut self.r)?.is_empty())
    }

    fn feed(
        &mut self,
        n: usize,
        mut f: impl FnMut(&[u8]) -> Result<(), Stop>,
    ) -> Result<bool, Stop> {
        // A declared length beyond the limit is refused before decompressing it.
        self.within_cap(n as u64)?;
        let mut left = n;
        while left > 0 {
            let buf = Self::fill(&mut self.r)?;
            if buf.is_empty() {
                return Ok(false);
            }
            let k = left.min(buf.len());
            f(&buf[..k])?;
            self.consume(k)?;
            left -= k;
        }
        Ok(true)
    }
}

/// Checks UTF-8 that arrives in pieces (a character may straddle two).
#[derive(Default)]
struct Utf8 {
    pending: [u8; 4],
    len: usize,
}

impl Utf8 {
    fn push(&mut self, mut piece: &[u8]) -> Result<(), Stop> {
        let invalid = || Stop::from("header key is not UTF-8");
        if self.len > 0 {
            let width = match self.pending[0] {
                0xC0..=0xDF => 2,
                0xE0..=0xEF => 3,
                _ => 4,
            };
            let take = (width - self.len).min(piece.len());
            self.pending[self.len..self.len + take].copy_from_slice(&piece[..take]);
            self.len += take;
            piece = &piece[take..];
            if self.len < width {
                return Ok(());
            }
            std::str::from_utf8(&self.pending[..width]).map_err(|_| invalid())?;
            self.len = 0;
        }
        match std::str::from_utf8(piece) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                // An incomplete character at the end: kept for the next piece.
                let tail = &piece[e.valid_up_to()..];
                self.pending[..tail.len()].copy_from_slice(tail);
                self.len = tail.len();
                Ok(())
            }
            Err(_) => Err(invalid()),
        }
    }

    fn finish(&self) -> Result<(), Stop> {
        if self.len == 0 {
            Ok(())
        } else {
            Err("header key is not UTF-8".into())
        }
    }
}

fn be_i16(buf: &[u8], at: usize) -> Option<i16> {
    let b: [u8; 2] = buf.get(at..at + 2)?.try_into().ok()?;
    Some(i16::from_be_bytes(b))
}

fn be_i32(buf: &[u8], at: usize) -> Option<i32> {
    let b: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
    Some(i32::from_be_bytes(b))
}

fn be_i64(buf: &[u8], at: usize) -> Option<i64> {
    let b: [u8; 8] = buf.get(at..at + 8)?.try_into().ok()?;
    Some(i64::from_be_bytes(b))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    const LIMITS: RecordLimits = RecordLimits {
        max_decompressed: 1 << 20,
        keys_required: false,
        timestamp_window: None,
    };

    fn check(buf: &[u8]) -> Result<(), RecordFault> {
        validate(buf, LIMITS)
    }

    fn zigzag(v: i64, out: &mut Vec<u8>) {
        let mut z = ((v << 1) ^ (v >> 63)) as u64;
        loop {
            let b = (z & 0x7f) as u8;
            z >>= 7;
            if z == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    /// A record with the given offset delta, key, value and one header.
    fn record_with_header(
        offset_delta: i64,
        key: &[u8],
        value: Option<&[u8]>,
        header: &[u8],
    ) -> Vec<u8> {
        let mut body = vec![0u8]; // attributes
        zigzag(3, &mut body); // timestamp delta
        zigzag(offset_delta, &mut body);
        zigzag(key.len() as i64, &mut body);
        body.extend_from_slice(key);
        match value {
            Some(v) => {
                zigzag(v.len() as i64, &mut body);
                body.extend_from_slice(v);
            }
            None => zigzag(-1, &mut body),
        }
        zigzag(1, &mut body);
        zigzag(header.len() as i64, &mut body);
        body.extend_from_slice(header);
        zigzag(-1, &mut body);
        let mut r = Vec::new();
        zigzag(body.len() as i64, &mut r);
        r.extend(body);
        r
    }

    fn record(offset_delta: i64, key: &[u8], value: Option<&[u8]>) -> Vec<u8> {
        record_with_header(offset_delta, key, value, b"h")
    }

    /// A batch header (CRC not set: the storage engine checks it) over `body`.
    fn batch(count: i32, attributes: i16, body: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        let len = i32::try_from(HEADER_LEN - LOG_OVERHEAD + body.len()).unwrap();
        b[OFF_BATCH_LENGTH..OFF_BATCH_LENGTH + 4].copy_from_slice(&len.to_be_bytes());
        b[OFF_MAGIC] = 2;
        b[OFF_ATTRIBUTES..OFF_ATTRIBUTES + 2].copy_from_slice(&attributes.to_be_bytes());
        b[OFF_RECORDS_COUNT..].copy_from_slice(&count.to_be_bytes());
        b.extend_from_slice(body);
        b
    }

    fn records(n: i64) -> Vec<u8> {
        (0..n)
            .flat_map(|i| record(i, b"key", Some(b"value")))
            .collect()
    }

    /// A record whose time lies outside the topic's window is refused with
    /// INVALID_TIMESTAMP, naming it; the window applies to every record's
    /// own time (base plus its delta), not the batch's header.
    #[test]
    fn records_outside_the_timestamp_window_are_refused() {
        // Base timestamp 1,000; records at deltas 0 and +500, each a null
        // key, value "v", no headers.
        let record = |delta: i64, index: i64| {
            let mut r = vec![0u8];
            zigzag(delta, &mut r);
            zigzag(index, &mut r);
            zigzag(-1, &mut r);
            zigzag(1, &mut r);
            r.push(b'v');
            zigzag(0, &mut r);
            let mut framed = Vec::new();
            zigzag(r.len() as i64, &mut framed);
            framed.extend(r);
            framed
        };
        let body = [record(0, 0), record(500, 1)].concat();
        let mut b = batch(2, 0, &body);
        b[OFF_BASE_TIMESTAMP..OFF_BASE_TIMESTAMP + 8].copy_from_slice(&1_000i64.to_be_bytes());
        let within = RecordLimits {
            timestamp_window: Some((1_000, 1_500)),
            ..LIMITS
        };
        assert_eq!(validate(&b, within), Ok(()));
        let too_late = RecordLimits {
            timestamp_window: Some((0, 1_499)),
            ..LIMITS
        };
        let fault = validate(&b, too_late).unwrap_err();
        assert_eq!(
            (fault.record, fault.code),
            (Some(1), ErrorCode::InvalidTimestamp)
        );
        let too_early = RecordLimits {
            timestamp_window: Some((1_001, i64::MAX)),
            ..LIMITS
        };
        let fault = validate(&b, too_early).unwrap_err();
        assert_eq!(
            (fault.record, fault.code),
            (Some(0), ErrorCode::InvalidTimestamp)
        );
    }

    /// A compacted topic takes no record without a key: INVALID_RECORD,
    /// naming the record, as Kafka answers; an empty key is a key.
    #[test]
    fn a_compacted_topic_refuses_records_without_a_key() {
        let keyed = LIMITS;
        let compacted = RecordLimits {
            keys_required: true,
            ..LIMITS
        };
        // Offset delta 1, a null key (length -1), value "v", no headers.
        let keyless = {
            let mut body = vec![0u8];
            zigzag(3, &mut body);
            zigzag(1, &mut body);
            zigzag(-1, &mut body);
            zigzag(1, &mut body);
            body.push(b'v');
            zigzag(0, &mut body);
            let mut r = Vec::new();
            zigzag(body.len() as i64, &mut r);
            r.extend(body);
            r
        };
        let body = [record(0, b"", Some(b"v")), keyless].concat();
        assert_eq!(validate(&batch(2, 0, &body), keyed), Ok(()));
        let fault = validate(&batch(2, 0, &body), compacted).unwrap_err();
        assert_eq!(
            (fault.record, fault.code),
            (Some(1), ErrorCode::InvalidRecord)
        );
        let packed = compress(ZSTD, &body, false);
        let fault = validate(&batch(2, i16::from(ZSTD), &packed), compacted).unwrap_err();
        assert_eq!(
            (fault.record, fault.code),
            (Some(1), ErrorCode::InvalidRecord)
        );
    }

    /// Codec ids in the low three attribute bits, as producers set them.
    const GZIP: u8 = 1;
    const SNAPPY: u8 = 2;
    const LZ4: u8 = 3;
    const ZSTD: u8 = 4;

    /// `records` compressed as a producer using `codec` sends them (snappy
    /// both xerial-framed, as Java does, and raw, as librdkafka does).
    fn compress(codec: u8, records: &[u8], xerial: bool) -> Vec<u8> {
        match codec {
            GZIP => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), Default::default());
                e.write_all(records).unwrap();
                e.finish().unwrap()
            }
            SNAPPY if xerial => {
                let mut out = b"\x82SNAPPY\x00\x00\x00\x00\x01\x00\x00\x00\x01".to_vec();
                for chunk in records.chunks(32 * 1024) {
                    let block = snap::raw::Encoder::new().compress_vec(chunk).unwrap();
                    out.extend((block.len() as u32).to_be_bytes());
                    out.extend(block);
                }
                out
            }
            SNAPPY => snap::raw::Encoder::new().compress_vec(records).unwrap(),
            LZ4 => {
                let mut e = lz4::EncoderBuilder::new()
                    .block_mode(lz4::BlockMode::Independent)
                    .build(Vec::new())
                    .unwrap();
                e.write_all(records).unwrap();
                let (out, result) = e.finish();
                result.unwrap();
                out
            }
            ZSTD => zstd::encode_all(records, 3).unwrap(),
            _ => unreachable!(),
        }
    }

    /// Every codec producers use, with snappy in both framings.
    const CODECS: [(u8, bool); 5] = [
        (GZIP, false),
        (SNAPPY, true),
        (SNAPPY, false),
        (LZ4, false),
        (ZSTD, false),
    ];

    #[test]
    fn well_formed_batches_pass() {
        let mut buf = batch(3, 0, &records(3));
        buf.extend(batch(1, 0, &record(0, b"", None)));
        assert_eq!(check(&buf), Ok(()));
    }

    #[test]
    fn lying_counts_are_refused() {
        let fault = check(&batch(5, 0, &records(1))).unwrap_err();
        assert_eq!(fault.record, Some(1), "{fault:?}");
        assert!(check(&batch(i32::MAX, 0, &records(1))).is_err());
        assert!(check(&batch(1, 0, &records(2))).is_err(), "bytes left over");
        assert!(
            check(&batch(0, 0, &[])).is_ok(),
            "the header check refuses 0"
        );
    }

    #[test]
    fn garbage_records_and_unknown_codecs_are_refused() {
        let fault = check(&batch(1, 0, &[0xff; 40])).unwrap_err();
        assert_eq!(fault.record, Some(0));
        for codec in 5..=7 {
            let fault = check(&batch(1, codec, &records(1))).unwrap_err();
            assert!(fault.message.contains("codec"), "{fault:?}");
        }
    }

    #[test]
    fn record_fields_must_fill_the_record_exactly() {
        // Offset deltas must count up from 0.
        let skipped: Vec<u8> = [record(0, b"k", None), record(2, b"k", None)].concat();
        assert!(check(&batch(2, 0, &skipped)).is_err());
        // A record whose length claims one byte more than its fields.
        let mut long = record(0, b"k", Some(b"v"));
        long[0] += 2; // zigzag: +1
        long.push(0);
        assert!(check(&batch(1, 0, &long)).is_err());
        // A key longer than the record.
        let mut r = vec![0u8];
        zigzag(0, &mut r);
        zigzag(0, &mut r);
        zigzag(100, &mut r);
        let mut framed = Vec::new();
        zigzag(r.len() as i64, &mut framed);
        framed.extend(r);
        assert!(check(&batch(1, 0, &framed)).is_err());
        // A batch length beyond the buffer.
        let mut b = batch(1, 0, &records(1));
        b.truncate(b.len() - 1);
        assert!(check(&b).is_err());
    }

    #[test]
    fn compressed_records_are_walked_like_plain_ones() {
        for (codec, xerial) in CODECS {
            let attrs = i16::from(codec);
            let case = format!("codec {codec} xerial {xerial}");
            let good = compress(codec, &records(300), xerial);
            assert_eq!(check(&batch(300, attrs, &good)), Ok(()), "{case}");
            // The same lies as uncompressed: counts, garbage, leftovers.
            let fault = check(&batch(301, attrs, &good)).unwrap_err();
            assert_eq!(fault.record, Some(300), "{case}: {fault:?}");
            assert!(check(&batch(299, attrs, &good)).is_err(), "{case}");
            let garbage = compress(codec, &[0xff; 40], xerial);
            let fault = check(&batch(1, attrs, &garbage)).unwrap_err();
            assert_eq!(fault.record, Some(0), "{case}: {fault:?}");
            // Bytes that do not decompress at all.
            let mut broken = good.clone();
            let mid = broken.len() / 2;
            broken.truncate(mid);
            let fault = check(&batch(300, attrs, &broken)).unwrap_err();
            assert!(!fault.message.is_empty(), "{case}");
        }
    }

    /// A small batch that decompresses to far more than the limit (a
    /// "bomb") is refused after reading about the limit, not all of it.
    #[test]
    fn decompressed_size_is_limited() {
        let big = vec![0u8; 4 << 20];
        let records: Vec<u8> = record(0, b"k", Some(&big));
        for (codec, xerial) in CODECS {
            let body = compress(codec, &records, xerial);
            assert!(body.len() < 300 << 10, "{codec}: {} bytes", body.len());
            let fault = check(&batch(1, i16::from(codec), &body)).unwrap_err();
            assert_eq!(fault.record, None, "{codec} {xerial}: {fault:?}");
            let roomy = RecordLimits {
                max_decompressed: 8 << 20,
                ..LIMITS
            };
            assert_eq!(validate(&batch(1, i16::from(codec), &body), roomy), Ok(()));
        }
        // Header keys are checked as UTF-8 across buffer refills too.
        let key = "é".repeat(STREAM_BUFFER);
        let good = record_with_header(0, b"k", None, key.as_bytes());
        let mut bad = key.into_bytes();
        let last = bad.len() - 1;
        bad[last] = b'x'; // cuts the last character in half
        let bad = record_with_header(0, b"k", None, &bad);
        for (codec, xerial) in CODECS {
            let attrs = i16::from(codec);
            assert_eq!(
                check(&batch(1, attrs, &compress(codec, &good, xerial))),
                Ok(())
            );
            let fault = check(&batch(1, attrs, &compress(codec, &bad, xerial))).unwrap_err();
            assert!(fault.message.contains("UTF-8"), "{fault:?}");
        }
    }

    /// lz4 frames Kafka's Java consumers could not read are refused: cut
    /// before the end mark, linked blocks, bytes after the frame.
    #[test]
    fn lz4_frames_must_be_whole_and_of_independent_blocks() {
        let good = compress(LZ4, &records(50), false);
        assert_eq!(check(&batch(50, i16::from(LZ4), &good)), Ok(()));
        let cut = &good[..good.len() - 4];
        assert!(
            check(&batch(50, i16::from(LZ4), cut)).is_err(),
            "no end mark"
        );
        let mut trailing = good.clone();
        trailing.extend([0, 0, 0, 0]);
        assert!(check(&batch(50, i16::from(LZ4), &trailing)).is_err());
        let mut e = lz4::EncoderBuilder::new()
            .block_mode(lz4::BlockMode::Linked)
            .build(Vec::new())
            .unwrap();
        e.write_all(&records(50)).unwrap();
        let (linked, result) = e.finish();
        result.unwrap();
        let fault = check(&batch(50, i16::from(LZ4), &linked)).unwrap_err();
        assert!(fault.message.contains("independent"), "{fault:?}");
    }

    /// A raw snappy block that claims more than snappy can expand to is
    /// refused before anything is allocated for it.
    #[test]
    fn snappy_blocks_cannot_claim_more_than_they_can_hold() {
        let mut claim = Vec::new();
        let mut n: u64 = 60 << 20; // uvarint length preamble
        while n >= 0x80 {
            claim.push((n as u8) | 0x80);
            n >>= 7;
        }
        claim.push(n as u8);
        claim.extend([0u8; 40]);
        let roomy = RecordLimits {
            max_decompressed: 1 << 30,
            ..LIMITS
        };
        let fault = validate(&batch(1, i16::from(SNAPPY), &claim), roomy).unwrap_err();
        assert!(fault.message.contains("claims"), "{fault:?}");
    }

    /// The decompressed-size limit holds for all the batches of one call
    /// together, not for each.
    #[test]
    fn the_limit_covers_all_batches_of_a_request() {
        let value = vec![0u8; 600 << 10];
        let one = batch(
            1,
            i16::from(ZSTD),
            &compress(ZSTD, &record(0, b"k", Some(&value)), false),
        );
        assert_eq!(check(&one), Ok(()), "one batch fits the 1 MiB limit");
        let two = [one.clone(), one].concat();
        let fault = check(&two).unwrap_err();
        assert!(fault.message.contains("limit"), "{fault:?}");
    }

    /// zstd as Java producers at the highest levels write it (a 2^27 window
    /// declared by a streaming encoder) is accepted, as Kafka accepts it.
    #[test]
    fn zstd_high_level_windows_are_accepted() {
        let mut e = zstd::stream::write::Encoder::new(Vec::new(), 22).unwrap();
        e.write_all(&records(20)).unwrap();
        let body = e.finish().unwrap();
        assert_eq!(check(&batch(20, i16::from(ZSTD), &body)), Ok(()));
    }

    #[test]
    fn utf8_split_anywhere_is_checked_as_a_whole() {
        let text = "aé€😀z".as_bytes();
        for cut in 0..=text.len() {
            for cut2 in cut..=text.len() {
                let mut u = Utf8::default();
                let ok = [&text[..cut], &text[cut..cut2], &text[cut2..]]
                    .into_iter()
                    .try_for_each(|p| u.push(p))
                    .and_then(|()| u.finish())
                    .is_ok();
                assert!(ok, "{cut} {cut2}");
            }
        }
        let mut u = Utf8::default();
        assert!(u.push(&text[..2]).is_ok());
        assert!(u.finish().is_err(), "a character cut short at the end");
        let mut u = Utf8::default();
        assert!(u.push(&[0xe2]).is_ok());
        assert!(u.push(&[0x28, 0x80]).is_err(), "a bad continuation byte");
    }
}

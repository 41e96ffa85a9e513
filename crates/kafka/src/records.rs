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
//! values and header values without copying (header keys are checked to be
//! UTF-8), and leaves the stored bytes exactly the producer's.
//!
//! Compressed batches are checked for a known codec; their records are not
//! walked here yet.

use sluice_vocab::{ErrorCode, Refused};

/// RecordBatch v2 layout (the storage engine checks the rest of the header).
const HEADER_LEN: usize = 61;
const LOG_OVERHEAD: usize = 12;
const OFF_BATCH_LENGTH: usize = 8;
const OFF_MAGIC: usize = 16;
const OFF_ATTRIBUTES: usize = 21;
const OFF_RECORDS_COUNT: usize = 57;
/// Codec ids in the low three attribute bits: none, gzip, snappy, lz4, zstd.
const CODEC_MASK: u8 = 0x07;
const LAST_CODEC: u8 = 4;

/// Why a producer's batches are refused: what, and in which record of its
/// batch (Kafka's `record_errors` batch index), when one record is to blame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RecordFault {
    pub record: Option<i32>,
    pub message: String,
}

impl RecordFault {
    fn batch(message: impl Into<String>) -> Self {
        RecordFault {
            record: None,
            message: message.into(),
        }
    }

    pub(crate) fn refused(&self) -> Refused {
        Refused::new(ErrorCode::CorruptMessage, self.message.clone())
    }
}

/// Checks the records of every batch in `buf`. Batches whose framing is
/// broken are left to the storage engine's header check when this walk cannot
/// even find them; anything it can see to be wrong is refused here.
pub(crate) fn validate(buf: &[u8]) -> Result<(), RecordFault> {
    let mut rest = buf;
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
        check_batch(batch)?;
        rest = next;
    }
    Ok(())
}

fn check_batch(batch: &[u8]) -> Result<(), RecordFault> {
    let codec = batch.get(OFF_ATTRIBUTES + 1).map_or(0, |b| b & CODEC_MASK);
    if codec > LAST_CODEC {
        return Err(RecordFault::batch(format!(
            "unknown compression codec {codec}"
        )));
    }
    let count = be_i32(batch, OFF_RECORDS_COUNT).unwrap_or(-1);
    if codec != 0 {
        return Ok(());
    }
    walk_records(batch.get(HEADER_LEN..).unwrap_or_default(), count)
}

/// Walks `count` uncompressed records that must fill `body` exactly.
fn walk_records(body: &[u8], count: i32) -> Result<(), RecordFault> {
    let mut r = Reader { buf: body, pos: 0 };
    for index in 0..count {
        let at = |message: String| RecordFault {
            record: Some(index),
            message,
        };
        if r.pos == body.len() {
            return Err(at(format!(
                "batch declares {count} records but holds {index}"
            )));
        }
        let len = r.varint().map_err(|e| at(e.into()))?;
        let record = usize::try_from(len)
            .ok()
            .and_then(|l| r.take(l))
            .ok_or_else(|| at(format!("record length {len} out of range")))?;
        check_record(record, index).map_err(at)?;
    }
    if r.pos != body.len() {
        return Err(RecordFault::batch(format!(
            "{} bytes after the {count} declared records",
            body.len() - r.pos
        )));
    }
    Ok(())
}

/// One record: attributes, timestamp delta, offset delta (which must be its
/// index: offsets in a batch are dense), key, value and headers, exactly
/// filling the record's declared length.
fn check_record(record: &[u8], index: i32) -> Result<(), String> {
    let mut r = Reader {
        buf: record,
        pos: 0,
    };
    r.take(1).ok_or("record too short for its attributes")?;
    r.varlong()?;
    let offset_delta = r.varint()?;
    if offset_delta != index {
        return Err(format!("offset delta {offset_delta}, expected {index}"));
    }
    r.bytes(-1, "key")?;
    r.bytes(-1, "value")?;
    let headers = r.varint()?;
    if headers < 0 {
        return Err(format!("negative header count {headers}"));
    }
    for _ in 0..headers {
        // Header keys are strings (Java's clients hand them out as String);
        // bytes that are not UTF-8 are refused so every consumer can read them.
        let key = r.bytes(0, "header key")?;
        std::str::from_utf8(key).map_err(|_| "header key is not UTF-8".to_string())?;
        r.bytes(-1, "header value")?;
    }
    if r.pos != record.len() {
        return Err(format!(
            "record declares {} bytes but its fields take {}",
            record.len(),
            r.pos
        ));
    }
    Ok(())
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    /// A zigzag varint of at most `max_bytes` bytes.
    fn zigzag(&mut self, max_bytes: u32) -> Result<i64, &'static str> {
        let mut raw: u64 = 0;
        for i in 0..max_bytes {
            let b = *self.buf.get(self.pos).ok_or("truncated varint")?;
            self.pos += 1;
            raw |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(((raw >> 1) as i64) ^ -((raw & 1) as i64));
            }
        }
        Err("varint too long")
    }

    fn varint(&mut self) -> Result<i32, &'static str> {
        let v = self.zigzag(5)?;
        i32::try_from(v).map_err(|_| "varint out of range")
    }

    fn varlong(&mut self) -> Result<i64, &'static str> {
        self.zigzag(10)
    }

    /// A length-prefixed byte string (`min` -1 allows null; empty then).
    fn bytes(&mut self, min: i32, what: &str) -> Result<&'a [u8], String> {
        let len = self.varint()?;
        if len < min {
            return Err(format!("{what} length {len} below {min}"));
        }
        let n = usize::try_from(len).unwrap_or(0);
        self.take(n)
            .ok_or_else(|| format!("{what} of {len} bytes overruns its record"))
    }
}

fn be_i32(buf: &[u8], at: usize) -> Option<i32> {
    let b: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
    Some(i32::from_be_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn record(offset_delta: i64, key: &[u8], value: Option<&[u8]>) -> Vec<u8> {
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
        zigzag(1, &mut body);
        body.push(b'h');
        zigzag(-1, &mut body);
        let mut r = Vec::new();
        zigzag(body.len() as i64, &mut r);
        r.extend(body);
        r
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

    #[test]
    fn well_formed_batches_pass() {
        let mut buf = batch(3, 0, &records(3));
        buf.extend(batch(1, 0, &record(0, b"", None)));
        assert_eq!(validate(&buf), Ok(()));
        // Compressed bodies are not walked; a known codec passes.
        assert_eq!(validate(&batch(5, 4, &[0xff; 40])), Ok(()));
    }

    #[test]
    fn lying_counts_are_refused() {
        let fault = validate(&batch(5, 0, &records(1))).unwrap_err();
        assert_eq!(fault.record, Some(1), "{fault:?}");
        assert!(validate(&batch(i32::MAX, 0, &records(1))).is_err());
        assert!(
            validate(&batch(1, 0, &records(2))).is_err(),
            "bytes left over"
        );
        assert!(
            validate(&batch(0, 0, &[])).is_ok(),
            "the header check refuses 0"
        );
    }

    #[test]
    fn garbage_records_and_unknown_codecs_are_refused() {
        let fault = validate(&batch(1, 0, &[0xff; 40])).unwrap_err();
        assert_eq!(fault.record, Some(0));
        for codec in 5..=7 {
            let fault = validate(&batch(1, codec, &records(1))).unwrap_err();
            assert!(fault.message.contains("codec"), "{fault:?}");
        }
    }

    #[test]
    fn record_fields_must_fill_the_record_exactly() {
        // Offset deltas must count up from 0.
        let skipped: Vec<u8> = [record(0, b"k", None), record(2, b"k", None)].concat();
        assert!(validate(&batch(2, 0, &skipped)).is_err());
        // A record whose length claims one byte more than its fields.
        let mut long = record(0, b"k", Some(b"v"));
        long[0] += 2; // zigzag: +1
        long.push(0);
        assert!(validate(&batch(1, 0, &long)).is_err());
        // A key longer than the record.
        let mut r = vec![0u8];
        zigzag(0, &mut r);
        zigzag(0, &mut r);
        zigzag(100, &mut r);
        let mut framed = Vec::new();
        zigzag(r.len() as i64, &mut framed);
        framed.extend(r);
        assert!(validate(&batch(1, 0, &framed)).is_err());
        // A batch length beyond the buffer.
        let mut b = batch(1, 0, &records(1));
        b.truncate(b.len() - 1);
        assert!(validate(&b).is_err());
    }
}

//! The records of an uncompressed RecordBatch v2, written one by one straight
//! into the buffer that is appended (`BatchBuilder`) and read in place
//! (`PlainRecords`): no record is built as a value first, so a batch of small
//! messages costs no allocation or copy per record either way.
//!
//! Only the broker's own use of records goes through here (messages of
//! another protocol stored as records, and read back); a producer's batches
//! are stored as they came, and compressed batches are left to a codec.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::batch::{
    BatchHeader, ATTR_COMPRESSION, HEADER_LEN, LOG_OVERHEAD, OFF_ATTRIBUTES, OFF_CRC,
};
const ATTR_TRANSACTIONAL: i16 = 1 << 4;

/// The fields of a batch header that this writer does not fill from records.
const NO_PARTITION_LEADER_EPOCH: i32 = -1;
const NO_PRODUCER_ID: i64 = -1;
const NO_PRODUCER_EPOCH: i16 = -1;
const NO_SEQUENCE: i32 = -1;

/// One RecordBatch v2 (magic 2, no compression, no producer id, base offset
/// 0: the log assigns offsets on append) written record by record.
pub struct BatchBuilder {
    buf: BytesMut,
    base_timestamp: i64,
    max_timestamp: i64,
    count: i32,
}

impl BatchBuilder {
    /// A batch whose records' timestamps are deltas from `base_timestamp`;
    /// `capacity` is the expected size of the records (the header is added).
    pub fn new(capacity: usize, base_timestamp: i64) -> BatchBuilder {
        let mut buf = BytesMut::with_capacity(HEADER_LEN + capacity);
        // The header is written by `finish`, when lengths and counts are known.
        buf.put_bytes(0, HEADER_LEN);
        BatchBuilder {
            buf,
            base_timestamp,
            max_timestamp: base_timestamp,
            count: 0,
        }
    }

    /// Appends one record; `None` is a null key, value or header value.
    pub fn push(
        &mut self,
        timestamp: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&[u8], Option<&[u8]>)],
    ) {
        let timestamp_delta = timestamp.wrapping_sub(self.base_timestamp);
        let offset_delta = i64::from(self.count);
        let body = 1
            + varlong_len(timestamp_delta)
            + varlong_len(offset_delta)
            + bytes_len(key)
            + bytes_len(value)
            + varlong_len(headers.len() as i64)
            + headers
                .iter()
                .map(|(k, v)| bytes_len(Some(k)) + bytes_len(*v))
                .sum::<usize>();
        self.buf.reserve(body + 5);
        put_varlong(&mut self.buf, body as i64);
        // Attributes of a record: unused, always 0.
        self.buf.put_u8(0);
        put_varlong(&mut self.buf, timestamp_delta);
        put_varlong(&mut self.buf, offset_delta);
        put_bytes(&mut self.buf, key);
        put_bytes(&mut self.buf, value);
        put_varlong(&mut self.buf, headers.len() as i64);
        for (k, v) in headers {
            put_bytes(&mut self.buf, Some(k));
            put_bytes(&mut self.buf, *v);
        }
        self.max_timestamp = self.max_timestamp.max(timestamp);
        self.count += 1;
    }

    /// The whole batch, header and CRC filled in; None when it holds no record
    /// (a batch must hold at least one).
    pub fn finish(self) -> Option<BytesMut> {
        self.finish_as(0, NO_PRODUCER_ID, NO_PRODUCER_EPOCH)
    }

    /// [`BatchBuilder::finish`] as a transactional batch of `producer_id`
    /// in `producer_epoch`, without sequence numbers: records the broker
    /// writes inside that producer's transaction
    /// (`Partition::append_in_transaction`).
    pub fn finish_transactional(self, producer_id: i64, producer_epoch: i16) -> Option<BytesMut> {
        self.finish_as(ATTR_TRANSACTIONAL, producer_id, producer_epoch)
    }

    /// [`BatchBuilder::finish`] with these attributes and producer (the
    /// log's own transaction markers).
    pub(crate) fn finish_as(
        mut self,
        attributes: i16,
        producer_id: i64,
        producer_epoch: i16,
    ) -> Option<BytesMut> {
        if self.count == 0 {
            return None;
        }
        let batch_length = i32::try_from(self.buf.len() - LOG_OVERHEAD).ok()?;
        let mut header = &mut self.buf[..HEADER_LEN];
        header.put_i64(0);
        header.put_i32(batch_length);
        header.put_i32(NO_PARTITION_LEADER_EPOCH);
        header.put_i8(2);
        header.put_u32(0);
        header.put_i16(attributes);
        header.put_i32(self.count - 1);
        header.put_i64(self.base_timestamp);
        header.put_i64(self.max_timestamp);
        header.put_i64(producer_id);
        header.put_i16(producer_epoch);
        header.put_i32(NO_SEQUENCE);
        header.put_i32(self.count);
        let crc = crc32c::crc32c(&self.buf[OFF_ATTRIBUTES..]);
        self.buf[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_be_bytes());
        Some(self.buf)
    }
}

/// One record of an uncompressed batch; key, value and headers are slices of
/// the batch's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub offset: i64,
    pub timestamp: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    headers: Bytes,
    header_count: usize,
}

impl StoredRecord {
    /// The headers, in order: (name, value; `None` is a null value).
    pub fn headers(&self) -> impl Iterator<Item = (Bytes, Option<Bytes>)> + '_ {
        let mut rest = self.headers.clone();
        (0..self.header_count).map_while(move |_| {
            // Checked when the record was read: never fails here.
            let name = take_bytes(&mut rest).ok()??;
            let value = take_bytes(&mut rest).ok()?;
            Some((name, value))
        })
    }

    pub fn header_count(&self) -> usize {
        self.header_count
    }

    /// The value of the last header named `name` (as Kafka's `lastHeader`);
    /// `Some(None)` for a null value.
    pub fn header(&self, name: &[u8]) -> Option<Option<Bytes>> {
        self.headers()
            .filter(|(n, _)| n == name)
            .last()
            .map(|(_, v)| v)
    }
}

/// The records of one uncompressed batch, in order; each is checked before it
/// is handed out. Records past the first malformed one are not read (`Err`
/// once, then the end).
pub struct PlainRecords {
    rest: Bytes,
    header: BatchHeader,
    index: i32,
}

/// Why a batch's records cannot be read in place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordsError {
    #[error("compressed batch")]
    Compressed,
    #[error("malformed record: {0}")]
    Malformed(&'static str),
}

impl PlainRecords {
    /// The records of `batch`, one whole batch (as `Partition::read` returns
    /// them); a compressed batch is `Err(Compressed)`.
    pub fn new(batch: Bytes) -> Result<PlainRecords, RecordsError> {
        let header = BatchHeader::parse(&batch).ok_or(RecordsError::Malformed("batch header"))?;
        if header.attributes & ATTR_COMPRESSION != 0 {
            return Err(RecordsError::Compressed);
        }
        let end = header.size().min(batch.len());
        Ok(PlainRecords {
            rest: batch.slice(HEADER_LEN.min(end)..end),
            header,
            index: 0,
        })
    }

    fn read_one(&mut self) -> Result<StoredRecord, RecordsError> {
        let len = take_varint(&mut self.rest)?;
        let len = usize::try_from(len).map_err(|_| RecordsError::Malformed("record length"))?;
        if len > self.rest.len() {
            return Err(RecordsError::Malformed("record length"));
        }
        let mut r = self.rest.split_to(len);
        if !r.has_remaining() {
            return Err(RecordsError::Malformed("record attributes"));
        }
        r.advance(1);
        let timestamp_delta = take_varint(&mut r)?;
        let offset_delta = take_varint(&mut r)?;
        let key = take_bytes(&mut r)?;
        let value = take_bytes(&mut r)?;
        let count = take_varint(&mut r)?;
        let header_count =
            usize::try_from(count).map_err(|_| RecordsError::Malformed("header count"))?;
        let headers = r.clone();
        for _ in 0..header_count {
            take_bytes(&mut r)?.ok_or(RecordsError::Malformed("null header name"))?;
            take_bytes(&mut r)?;
        }
        Ok(StoredRecord {
            offset: self.header.base_offset.saturating_add(offset_delta),
            timestamp: self.header.base_timestamp.saturating_add(timestamp_delta),
            key,
            value,
            headers: headers.slice(..headers.len() - r.len()),
            header_count,
        })
    }
}

impl Iterator for PlainRecords {
    type Item = Result<StoredRecord, RecordsError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.index >= self.header.records_count || self.rest.is_empty() {
            return None;
        }
        self.index += 1;
        let record = self.read_one();
        if record.is_err() {
            self.index = self.header.records_count;
        }
        Some(record)
    }
}

fn take_varint(buf: &mut Bytes) -> Result<i64, RecordsError> {
    let mut z: u64 = 0;
    for shift in (0..70).step_by(7) {
        if !buf.has_remaining() {
            return Err(RecordsError::Malformed("truncated varint"));
        }
        let b = buf.get_u8();
        z |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(((z >> 1) as i64) ^ -((z & 1) as i64));
        }
    }
    Err(RecordsError::Malformed("varint too long"))
}

/// A length-prefixed byte string; a negative length is null.
fn take_bytes(buf: &mut Bytes) -> Result<Option<Bytes>, RecordsError> {
    let len = take_varint(buf)?;
    if len < 0 {
        return Ok(None);
    }
    let len = usize::try_from(len).map_err(|_| RecordsError::Malformed("length"))?;
    if len > buf.len() {
        return Err(RecordsError::Malformed("length past the record"));
    }
    Ok(Some(buf.split_to(len)))
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn varlong_len(v: i64) -> usize {
    let bits = 64 - (zigzag(v) | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

fn put_varlong(buf: &mut BytesMut, v: i64) {
    let mut z = zigzag(v);
    while z >= 0x80 {
        buf.put_u8((z as u8) | 0x80);
        z >>= 7;
    }
    buf.put_u8(z as u8);
}

fn bytes_len(b: Option<&[u8]>) -> usize {
    match b {
        Some(b) => varlong_len(b.len() as i64) + b.len(),
        None => varlong_len(-1),
    }
}

fn put_bytes(buf: &mut BytesMut, b: Option<&[u8]>) {
    match b {
        Some(b) => {
            put_varlong(buf, b.len() as i64);
            buf.put_slice(b);
        }
        None => put_varlong(buf, -1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use kafka_protocol::indexmap::IndexMap;
    use kafka_protocol::protocol::StrBytes;
    use kafka_protocol::records::{
        Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions,
        TimestampType,
    };
    use proptest::prelude::*;

    type Rec = (
        i64,
        Option<Vec<u8>>,
        Option<Vec<u8>>,
        Vec<(String, Option<Vec<u8>>)>,
    );

    fn record() -> impl Strategy<Value = Rec> {
        let bytes = || proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300));
        (
            -1_000_000i64..1_000_000,
            bytes(),
            bytes(),
            // Unique names: the client codec keeps headers in a map.
            proptest::collection::btree_map("[a-z-]{0,20}", bytes(), 0..4)
                .prop_map(|h| h.into_iter().collect()),
        )
    }

    /// The client codec's encoding of the same records.
    fn reference(base: i64, recs: &[Rec]) -> BytesMut {
        let records: Vec<Record> = recs
            .iter()
            .enumerate()
            .map(|(i, (ts, k, v, h))| {
                let mut headers = IndexMap::new();
                for (hk, hv) in h {
                    headers.insert(
                        StrBytes::from_string(hk.clone()),
                        hv.clone().map(Bytes::from),
                    );
                }
                Record {
                    transactional: false,
                    control: false,
                    delete_horizon: false,
                    partition_leader_epoch: NO_PARTITION_LEADER_EPOCH,
                    producer_id: NO_PRODUCER_ID,
                    producer_epoch: NO_PRODUCER_EPOCH,
                    timestamp_type: TimestampType::Creation,
                    offset: i as i64,
                    // The client codec starts a new batch wherever offset
                    // minus sequence changes: this keeps one batch, with
                    // base sequence -1 (none), as the builder writes.
                    sequence: i as i32 - 1,
                    timestamp: base + ts,
                    key: k.clone().map(Bytes::from),
                    value: v.clone().map(Bytes::from),
                    headers,
                }
            })
            .collect();
        let mut buf = BytesMut::new();
        RecordBatchEncoder::encode(
            &mut buf,
            &records,
            &RecordEncodeOptions {
                version: 2,
                compression: Compression::None,
            },
        )
        .expect("the reference encoder takes these records");
        buf
    }

    fn built(base: i64, recs: &[Rec]) -> Option<BytesMut> {
        let mut b = BatchBuilder::new(0, base);
        for (ts, k, v, h) in recs {
            let headers: Vec<(&[u8], Option<&[u8]>)> = h
                .iter()
                .map(|(hk, hv)| (hk.as_bytes(), hv.as_deref()))
                .collect();
            b.push(base + ts, k.as_deref(), v.as_deref(), &headers);
        }
        b.finish()
    }

    proptest! {
        /// Timestamps at or above the base (as a broker stamps them): the
        /// same bytes as the client codec, which takes the smallest as base.
        #[test]
        fn writes_what_the_client_codec_writes(
            recs in proptest::collection::vec(record(), 1..20),
        ) {
            let min = recs.iter().map(|r| r.0).min().unwrap_or(0);
            let recs: Vec<Rec> = recs.into_iter().map(|mut r| { r.0 -= min; r }).collect();
            let base = 1_700_000_000_000;
            let ours = built(base, &recs).expect("records were pushed");
            let headers = crate::validate_batches(&ours).expect("a valid batch");
            prop_assert_eq!(headers.len(), 1);
            prop_assert_eq!(&ours[..], &reference(base, &recs)[..]);
        }

        /// Any timestamps: the client codec reads back every field.
        #[test]
        fn decodes_with_the_client_codec(recs in proptest::collection::vec(record(), 1..20)) {
            let base = 1_700_000_000_000;
            let mut ours = built(base, &recs).expect("records were pushed").freeze();
            let sets = RecordBatchDecoder::decode_all(&mut ours).expect("decodes");
            let decoded: Vec<Record> = sets.into_iter().flat_map(|s| s.records).collect();
            prop_assert_eq!(decoded.len(), recs.len());
            for (d, (ts, k, v, h)) in decoded.iter().zip(&recs) {
                prop_assert_eq!(d.timestamp, base + ts);
                prop_assert_eq!(d.key.as_deref(), k.as_deref());
                prop_assert_eq!(d.value.as_deref(), v.as_deref());
                let hs: Vec<(Vec<u8>, Option<Vec<u8>>)> = d.headers.iter()
                    .map(|(hk, hv)| (hk.as_bytes().to_vec(), hv.as_ref().map(|b| b.to_vec())))
                    .collect();
                let want: Vec<(Vec<u8>, Option<Vec<u8>>)> = h.iter()
                    .map(|(hk, hv)| (hk.as_bytes().to_vec(), hv.clone()))
                    .collect();
                prop_assert_eq!(hs, want);
            }
        }
    }

    fn read_back(batch: BytesMut) -> Vec<StoredRecord> {
        PlainRecords::new(batch.freeze())
            .expect("uncompressed")
            .collect::<Result<_, _>>()
            .expect("well formed")
    }

    proptest! {
        /// What the client codec wrote (with a base offset, as stored) reads
        /// back field by field.
        #[test]
        fn reads_what_the_client_codec_writes(
            recs in proptest::collection::vec(record(), 1..20),
            base_offset in 0i64..1 << 40,
        ) {
            let min = recs.iter().map(|r| r.0).min().unwrap_or(0);
            let recs: Vec<Rec> = recs.into_iter().map(|mut r| { r.0 -= min; r }).collect();
            let base = 1_700_000_000_000;
            let mut batch = reference(base, &recs);
            batch[..8].copy_from_slice(&base_offset.to_be_bytes());
            let read = read_back(batch);
            prop_assert_eq!(read.len(), recs.len());
            for (i, (r, (ts, k, v, h))) in read.iter().zip(&recs).enumerate() {
                prop_assert_eq!(r.offset, base_offset + i as i64);
                prop_assert_eq!(r.timestamp, base + ts);
                prop_assert_eq!(r.key.as_deref(), k.as_deref());
                prop_assert_eq!(r.value.as_deref(), v.as_deref());
                prop_assert_eq!(r.header_count(), h.len());
                let got: Vec<(Vec<u8>, Option<Vec<u8>>)> = r.headers()
                    .map(|(n, v)| (n.to_vec(), v.map(|v| v.to_vec())))
                    .collect();
                let want: Vec<(Vec<u8>, Option<Vec<u8>>)> = h.iter()
                    .map(|(n, v)| (n.as_bytes().to_vec(), v.clone()))
                    .collect();
                prop_assert_eq!(got, want);
                for (n, v) in h {
                    prop_assert_eq!(r.header(n.as_bytes()), Some(v.clone().map(Bytes::from)));
                }
            }
        }

        /// Hostile or torn bytes: records are refused, never a panic, and
        /// reading stops at the first bad one.
        #[test]
        fn bad_bytes_are_refused_without_panic(
            recs in proptest::collection::vec(record(), 1..5),
            cut in 0usize..2000,
            flips in proptest::collection::vec((0usize..2000, any::<u8>()), 0..8),
        ) {
            let mut batch = built(0, &recs).expect("records were pushed");
            for (at, b) in flips {
                if at < batch.len() {
                    batch[at] ^= b;
                }
            }
            batch.truncate(cut.max(1));
            if let Ok(records) = PlainRecords::new(batch.freeze()) {
                let mut failed = false;
                for r in records {
                    prop_assert!(!failed, "a record after an error");
                    failed = r.is_err();
                }
            }
        }
    }

    #[test]
    fn a_compressed_batch_is_not_read_in_place() {
        let mut batch = built(0, &[(0, None, Some(b"x".to_vec()), Vec::new())]).expect("a batch");
        // Attributes: gzip.
        batch[22] |= 1;
        assert!(matches!(
            PlainRecords::new(batch.freeze()),
            Err(RecordsError::Compressed)
        ));
    }

    #[test]
    fn an_empty_batch_is_none() {
        assert!(BatchBuilder::new(0, 0).finish().is_none());
    }
}

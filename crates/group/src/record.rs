//! The records Sluice keeps in the `__consumer_offsets` topic.
//!
//! Every committed offset is one record of a Kafka RecordBatch v2 (built with
//! kafka-protocol's `RecordBatchEncoder`, no compression) appended to
//! partition 0 of the offsets topic. All integers are big-endian; a string is
//! an `i16` byte length followed by that many UTF-8 bytes.
//!
//! Key (version-tagged):
//!
//! | field     | type   | notes                          |
//! |-----------|--------|--------------------------------|
//! | version   | i16    | 1 (offset commit key)          |
//! | group     | string |                                |
//! | topic     | string |                                |
//! | partition | i32    |                                |
//!
//! Value:
//!
//! | field            | type   | notes                                  |
//! |------------------|--------|----------------------------------------|
//! | version          | i16    | 3                                      |
//! | offset           | i64    | the committed offset                   |
//! | leader_epoch     | i32    | -1 when the client sent none           |
//! | metadata         | string | the client's metadata ("" for null)    |
//! | commit_timestamp | i64    | broker wall clock, ms since the epoch  |
//!
//! A record with a null value is a tombstone: DeleteGroups writes one per
//! committed partition of the group, and replay forgets that key.
//!
//! Replay applies records in log order, the last record of a key winning,
//! which is what the log cleaner keeps of a compacted topic: the offsets
//! topic is one, so no other record kind is needed.
//!
//! The layout deliberately matches Kafka's own `OffsetCommitKey` v1 and
//! `OffsetCommitValue` v3, so tools that read Kafka's offsets topic can read
//! ours. Keys of any other version (Kafka uses 2 for group metadata, which
//! Sluice does not persist) are skipped on replay.

use bytes::{BufMut, Bytes, BytesMut};

/// Key version of an offset commit.
pub(crate) const KEY_VERSION: i16 = 1;
/// Value version of an offset commit.
pub(crate) const VALUE_VERSION: i16 = 3;

/// Longest string the format can hold.
pub(crate) const MAX_STRING: usize = i16::MAX as usize;

/// Identifies one committed partition of one group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct OffsetKey {
    pub group: String,
    pub topic: String,
    pub partition: i32,
}

/// What a group committed for one partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct OffsetValue {
    pub offset: i64,
    pub leader_epoch: i32,
    pub metadata: String,
    pub commit_timestamp: i64,
}

/// Errors of decoding a key or value.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FormatError {
    #[error("{0} truncated")]
    Truncated(&'static str),
    #[error("{0} is not UTF-8")]
    NotUtf8(&'static str),
    #[error("negative length of {0}")]
    NegativeLength(&'static str),
    #[error("unknown value version {0}")]
    UnknownValueVersion(i16),
}

fn put_string(buf: &mut BytesMut, s: &str) {
    // Callers check MAX_STRING before encoding; clamp defensively so a bug
    // cannot write a length that disagrees with the bytes that follow.
    let bytes = s.as_bytes();
    let len = bytes.len().min(MAX_STRING);
    buf.put_i16(len as i16);
    buf.put_slice(bytes.get(..len).unwrap_or_default());
}

pub(crate) fn encode_key(key: &OffsetKey) -> Bytes {
    let mut buf = BytesMut::with_capacity(2 + 2 + key.group.len() + 2 + key.topic.len() + 4);
    buf.put_i16(KEY_VERSION);
    put_string(&mut buf, &key.group);
    put_string(&mut buf, &key.topic);
    buf.put_i32(key.partition);
    buf.freeze()
}

pub(crate) fn encode_value(value: &OffsetValue) -> Bytes {
    let mut buf = BytesMut::with_capacity(2 + 8 + 4 + 2 + value.metadata.len() + 8);
    buf.put_i16(VALUE_VERSION);
    buf.put_i64(value.offset);
    buf.put_i32(value.leader_epoch);
    put_string(&mut buf, &value.metadata);
    buf.put_i64(value.commit_timestamp);
    buf.freeze()
}

/// A bounds-checked reader over bytes from disk.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], FormatError> {
        if self.buf.len() < n {
            return Err(FormatError::Truncated(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], FormatError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn i16(&mut self, what: &'static str) -> Result<i16, FormatError> {
        Ok(i16::from_be_bytes(self.array(what)?))
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, FormatError> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, FormatError> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &'static str) -> Result<String, FormatError> {
        let len = self.i16(what)?;
        let len = usize::try_from(len).map_err(|_| FormatError::NegativeLength(what))?;
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| FormatError::NotUtf8(what))
    }
}

/// Decodes a key. `Ok(None)` for a key version Sluice does not write.
pub(crate) fn decode_key(bytes: &[u8]) -> Result<Option<OffsetKey>, FormatError> {
    let mut r = Reader { buf: bytes };
    let version = r.i16("key version")?;
    // Kafka's offset commit key versions 0 and 1 share this layout.
    if version != 0 && version != KEY_VERSION {
        return Ok(None);
    }
    let group = r.string("key group")?;
    let topic = r.string("key topic")?;
    let partition = r.i32("key partition")?;
    Ok(Some(OffsetKey {
        group,
        topic,
        partition,
    }))
}

pub(crate) fn decode_value(bytes: &[u8]) -> Result<OffsetValue, FormatError> {
    let mut r = Reader { buf: bytes };
    let version = r.i16("value version")?;
    if version != VALUE_VERSION {
        return Err(FormatError::UnknownValueVersion(version));
    }
    let offset = r.i64("value offset")?;
    let leader_epoch = r.i32("value leader epoch")?;
    let metadata = r.string("value metadata")?;
    let commit_timestamp = r.i64("value commit timestamp")?;
    Ok(OffsetValue {
        offset,
        leader_epoch,
        metadata,
        commit_timestamp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_and_value_round_trip() {
        let key = OffsetKey {
            group: "g".into(),
            topic: "t".into(),
            partition: 7,
        };
        let value = OffsetValue {
            offset: 42,
            leader_epoch: 3,
            metadata: "meta ü".into(),
            commit_timestamp: 1_700_000_000_000,
        };
        assert_eq!(decode_key(&encode_key(&key)).unwrap(), Some(key));
        assert_eq!(decode_value(&encode_value(&value)).unwrap(), value);
    }

    #[test]
    fn truncated_and_foreign_input() {
        let key = encode_key(&OffsetKey {
            group: "group".into(),
            topic: "topic".into(),
            partition: 1,
        });
        for cut in 0..key.len() {
            assert!(decode_key(&key[..cut]).is_err(), "cut at {cut}");
        }
        // A group metadata key (version 2) is skipped, not an error.
        assert_eq!(decode_key(&[0, 2, 0, 1, b'g']).unwrap(), None);
        assert!(decode_key(&[0, 1, 0xff, 0xff]).is_err());
        assert!(decode_value(&[0, 9]).is_err());
    }
}

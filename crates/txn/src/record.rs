//! The records the transaction coordinator keeps in `__transaction_state`:
//! one per transition of a transactional id, the last one of an id winning on
//! replay (a null value is the id's tombstone). Integers are big-endian; a
//! string is an `i16` byte length and that many UTF-8 bytes.
//!
//! Key:
//!
//! | field            | type   | notes |
//! |------------------|--------|-------|
//! | version          | i16    | 0     |
//! | transactional_id | string |       |
//!
//! Value:
//!
//! | field               | type | notes                                   |
//! |---------------------|------|-----------------------------------------|
//! | version             | i16  | 0                                       |
//! | producer_id         | i64  |                                         |
//! | last_producer_id    | i64  | -1 when never rotated                   |
//! | producer_epoch      | i16  |                                         |
//! | last_producer_epoch | i16  | -1 when never bumped                    |
//! | timeout_ms          | i32  | the producer's `transaction.timeout.ms` |
//! | state               | i8   | Kafka's `TransactionState` code         |
//! | start_ms            | i64  | -1 when no transaction is open          |
//! | last_update_ms      | i64  |                                         |
//! | partitions          | i32  | count, then each: topic string, i32     |
//!
//! Kafka's own `TransactionLogValue` is close but not the same (it has no
//! last producer id and epoch before its flexible version): these records
//! are Sluice's.

use std::collections::BTreeSet;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::state::{TxnMetadata, TxnState};

const KEY_VERSION: i16 = 0;
const VALUE_VERSION: i16 = 0;

/// Longest string the format holds.
pub const MAX_STRING: usize = i16::MAX as usize;

/// Why a key or value does not decode.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("{0} truncated")]
    Truncated(&'static str),
    #[error("{0} is not UTF-8")]
    NotUtf8(&'static str),
    #[error("negative length of {0}")]
    NegativeLength(&'static str),
    #[error("unknown {0} version {1}")]
    UnknownVersion(&'static str, i16),
    #[error("unknown transaction state {0}")]
    UnknownState(i8),
    #[error("{0} too long to encode")]
    TooLong(&'static str),
}

fn put_string(buf: &mut BytesMut, s: &str, what: &'static str) -> Result<(), FormatError> {
    let len = i16::try_from(s.len()).map_err(|_| FormatError::TooLong(what))?;
    buf.put_i16(len);
    buf.put_slice(s.as_bytes());
    Ok(())
}

/// The key of `transactional_id`'s records.
pub fn encode_key(transactional_id: &str) -> Result<Bytes, FormatError> {
    let mut buf = BytesMut::with_capacity(4 + transactional_id.len());
    buf.put_i16(KEY_VERSION);
    put_string(&mut buf, transactional_id, "transactional id")?;
    Ok(buf.freeze())
}

pub fn encode_value(m: &TxnMetadata) -> Result<Bytes, FormatError> {
    let topics: usize = m.partitions.iter().map(|(t, _)| 6 + t.len()).sum();
    let mut buf = BytesMut::with_capacity(48 + topics);
    buf.put_i16(VALUE_VERSION);
    buf.put_i64(m.producer_id);
    buf.put_i64(m.last_producer_id);
    buf.put_i16(m.producer_epoch);
    buf.put_i16(m.last_producer_epoch);
    buf.put_i32(m.timeout_ms);
    buf.put_i8(m.state.code());
    buf.put_i64(m.start_ms);
    buf.put_i64(m.last_update_ms);
    let count =
        i32::try_from(m.partitions.len()).map_err(|_| FormatError::TooLong("partitions"))?;
    buf.put_i32(count);
    for (topic, partition) in &m.partitions {
        put_string(&mut buf, topic, "topic")?;
        buf.put_i32(*partition);
    }
    Ok(buf.freeze())
}

/// Bounds-checked reads over bytes from the log.
trait Take: Buf {
    fn int<T>(
        &mut self,
        what: &'static str,
        get: impl FnOnce(&mut Self) -> Result<T, bytes::TryGetError>,
    ) -> Result<T, FormatError> {
        get(self).map_err(|_| FormatError::Truncated(what))
    }

    fn string(&mut self, what: &'static str) -> Result<String, FormatError> {
        let len = self.int(what, |b| b.try_get_i16())?;
        let len = usize::try_from(len).map_err(|_| FormatError::NegativeLength(what))?;
        if self.remaining() < len {
            return Err(FormatError::Truncated(what));
        }
        let mut bytes = vec![0u8; len];
        self.copy_to_slice(&mut bytes);
        String::from_utf8(bytes).map_err(|_| FormatError::NotUtf8(what))
    }
}

impl Take for &[u8] {}

/// The transactional id of a key.
pub fn decode_key(mut bytes: &[u8]) -> Result<String, FormatError> {
    let version = bytes.int("key version", |b| b.try_get_i16())?;
    if version != KEY_VERSION {
        return Err(FormatError::UnknownVersion("key", version));
    }
    bytes.string("transactional id")
}

pub fn decode_value(mut b: &[u8]) -> Result<TxnMetadata, FormatError> {
    let version = b.int("value version", |b| b.try_get_i16())?;
    if version != VALUE_VERSION {
        return Err(FormatError::UnknownVersion("value", version));
    }
    let producer_id = b.int("producer id", |b| b.try_get_i64())?;
    let last_producer_id = b.int("last producer id", |b| b.try_get_i64())?;
    let producer_epoch = b.int("producer epoch", |b| b.try_get_i16())?;
    let last_producer_epoch = b.int("last producer epoch", |b| b.try_get_i16())?;
    let timeout_ms = b.int("timeout", |b| b.try_get_i32())?;
    let code = b.int("state", |b| b.try_get_i8())?;
    let state = TxnState::from_code(code).ok_or(FormatError::UnknownState(code))?;
    let start_ms = b.int("start", |b| b.try_get_i64())?;
    let last_update_ms = b.int("last update", |b| b.try_get_i64())?;
    let count = b.int("partition count", |b| b.try_get_i32())?;
    let count = usize::try_from(count).map_err(|_| FormatError::NegativeLength("partitions"))?;
    let mut partitions = BTreeSet::new();
    // Each partition takes at least six bytes: a count beyond that is a lie
    // and must not size anything.
    if count > b.remaining() / 6 {
        return Err(FormatError::Truncated("partitions"));
    }
    for _ in 0..count {
        let topic = b.string("topic")?;
        let partition = b.int("partition", |b| b.try_get_i32())?;
        partitions.insert((topic, partition));
    }
    Ok(TxnMetadata {
        producer_id,
        last_producer_id,
        producer_epoch,
        last_producer_epoch,
        timeout_ms,
        state,
        partitions,
        start_ms,
        last_update_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn state() -> impl Strategy<Value = TxnState> {
        (0i8..8).prop_map(|c| TxnState::from_code(c).unwrap_or(TxnState::Empty))
    }

    proptest! {
        #[test]
        fn values_and_keys_round_trip(
            id in "\\PC{0,40}",
            producer_id in any::<i64>(),
            last_producer_id in any::<i64>(),
            producer_epoch in any::<i16>(),
            last_producer_epoch in any::<i16>(),
            timeout_ms in any::<i32>(),
            state in state(),
            start_ms in any::<i64>(),
            last_update_ms in any::<i64>(),
            partitions in proptest::collection::btree_set(("[a-z._-]{1,20}", 0..1000i32), 0..20),
        ) {
            let m = TxnMetadata {
                producer_id, last_producer_id, producer_epoch, last_producer_epoch,
                timeout_ms, state, partitions, start_ms, last_update_ms,
            };
            let value = encode_value(&m).unwrap();
            prop_assert_eq!(decode_value(&value), Ok(m));
            let key = encode_key(&id).unwrap();
            prop_assert_eq!(decode_key(&key), Ok(id));
        }

        #[test]
        fn any_bytes_decode_or_fail_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_value(&bytes);
            let _ = decode_key(&bytes);
        }

        #[test]
        fn every_cut_of_a_value_is_an_error(cut in 0usize..60) {
            let m = TxnMetadata {
                producer_id: 7, last_producer_id: -1, producer_epoch: 3, last_producer_epoch: 2,
                timeout_ms: 60_000, state: TxnState::Ongoing,
                partitions: [("orders".to_owned(), 1), ("payments".to_owned(), 0)].into(),
                start_ms: 1, last_update_ms: 2,
            };
            let value = encode_value(&m).unwrap();
            prop_assume!(cut < value.len());
            prop_assert!(decode_value(&value[..cut]).is_err());
        }
    }

    #[test]
    fn foreign_versions_and_states_are_refused() {
        assert_eq!(
            decode_key(&[0, 1, 0, 0]),
            Err(FormatError::UnknownVersion("key", 1))
        );
        let mut v = encode_value(&TxnMetadata {
            producer_id: 1,
            last_producer_id: -1,
            producer_epoch: 0,
            last_producer_epoch: -1,
            timeout_ms: 1,
            state: TxnState::Empty,
            partitions: BTreeSet::new(),
            start_ms: -1,
            last_update_ms: 0,
        })
        .unwrap()
        .to_vec();
        v[2 + 8 + 8 + 2 + 2 + 4] = 9;
        assert_eq!(decode_value(&v), Err(FormatError::UnknownState(9)));
        assert!(encode_key(&"x".repeat(MAX_STRING + 1)).is_err());
    }
}

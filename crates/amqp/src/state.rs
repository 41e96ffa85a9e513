//! A queue's delivery state, kept in the queue's own log as control records so
//! it is replicated with the messages and survives `kill -9`: which offsets above
//! the log start offset are settled (acknowledged out of order, rejected,
//! expired, dropped) and how far messages were ever handed out (those below are
//! flagged `redelivered` when delivered again after a restart or failover).
//!
//! Each record is a whole snapshot, so only the last one matters. A record lies
//! after every message it settles, but its delivered-up-to mark (a claim) reaches
//! past it: so the log start offset stops at the oldest unsettled message and
//! never passes the newest committed record (see `Actor::advance_head`).
//!
//! | part | holds |
//! |---|---|
//! | batch attributes | control (Kafka consumers skip it), not transactional |
//! | key | version `0` (int16), type [`STATE_TYPE`] (int16), as Kafka's control keys |
//! | value | format `1` (int8), delivered-up-to (int64), acked-below (int64), range count (int32), then `[start, end)` pairs (int64, int64); return count (int32), then (offset int64, returns int32) pairs |

use std::collections::BTreeMap;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::indexmap::IndexMap;
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions,
    TimestampType, NO_PARTITION_LEADER_EPOCH, NO_PRODUCER_EPOCH, NO_PRODUCER_ID, NO_SEQUENCE,
};
use sluice_log::{BatchHeader, Partition, ReadLimit};

use crate::message::now_ms;

/// The control record type of a delivery-state record (Kafka's own types are
/// small numbers; consumers ignore types they do not know).
pub(crate) const STATE_TYPE: i16 = 1001;
const FORMAT: i8 = 1;
/// How much of the log one read of the start-up scan takes.
const SCAN_BYTES: usize = 1024 * 1024;

/// Offsets as half-open ranges `[start, end)`, merged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Ranges(BTreeMap<i64, i64>);

impl Ranges {
    pub(crate) fn insert(&mut self, start: i64, end: i64) {
        if start >= end {
            return;
        }
        let (mut start, mut end) = (start, end);
        // Merge with a range that starts before and reaches `start`.
        if let Some((&s, &e)) = self.0.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        let overlapping: Vec<i64> = self.0.range(start..=end).map(|(&s, _)| s).collect();
        for s in overlapping {
            if let Some(e) = self.0.remove(&s) {
                end = end.max(e);
            }
        }
        self.0.insert(start, end);
    }

    pub(crate) fn contains(&self, offset: i64) -> bool {
        self.0
            .range(..=offset)
            .next_back()
            .is_some_and(|(_, &e)| offset < e)
    }

    /// Forgets everything below `offset`.
    pub(crate) fn remove_below(&mut self, offset: i64) {
        let below: Vec<i64> = self.0.range(..offset).map(|(&s, _)| s).collect();
        for s in below {
            if let Some(e) = self.0.remove(&s) {
                if e > offset {
                    self.0.insert(offset, e);
                }
            }
        }
    }

    /// How many offsets in `[from, to)` it holds.
    pub(crate) fn count_in(&self, from: i64, to: i64) -> i64 {
        self.0
            .iter()
            .map(|(&s, &e)| (e.min(to) - s.max(from)).max(0))
            .sum()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (i64, i64)> + '_ {
        self.0.iter().map(|(&s, &e)| (s, e))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What a queue must remember about the messages above its log start offset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct DeliveryState {
    /// Every message below was handed out at least once.
    pub delivered_up_to: i64,
    /// Everything below is settled (the queue's `head` when written): the log
    /// start offset follows it only after a checkpoint, which a crash can beat.
    pub acked_below: i64,
    pub settled: Ranges,
    /// How often messages above the log start offset were returned to the
    /// queue (x-delivery-count, x-delivery-limit).
    pub returns: BTreeMap<i64, u32>,
}

impl DeliveryState {
    /// The control batch that records this state.
    pub(crate) fn encode(&self) -> Result<BytesMut, String> {
        let mut key = BytesMut::with_capacity(4);
        key.put_i16(0);
        key.put_i16(STATE_TYPE);
        let ranges: Vec<(i64, i64)> = self.settled.iter().collect();
        let count = i32::try_from(ranges.len()).map_err(|_| "too many settled ranges")?;
        let returns =
            i32::try_from(self.returns.len()).map_err(|_| "too many returned messages")?;
        let mut value = BytesMut::with_capacity(25 + ranges.len() * 16 + self.returns.len() * 12);
        value.put_i8(FORMAT);
        value.put_i64(self.delivered_up_to);
        value.put_i64(self.acked_below);
        value.put_i32(count);
        for (s, e) in ranges {
            value.put_i64(s);
            value.put_i64(e);
        }
        value.put_i32(returns);
        for (&offset, &n) in &self.returns {
            value.put_i64(offset);
            value.put_i32(i32::try_from(n).unwrap_or(i32::MAX));
        }
        let record = Record {
            transactional: false,
            control: true,
            delete_horizon: false,
            partition_leader_epoch: NO_PARTITION_LEADER_EPOCH,
            producer_id: NO_PRODUCER_ID,
            producer_epoch: NO_PRODUCER_EPOCH,
            timestamp_type: TimestampType::Creation,
            offset: 0,
            sequence: NO_SEQUENCE,
            timestamp: now_ms(),
            key: Some(key.freeze()),
            value: Some(value.freeze()),
            headers: IndexMap::new(),
        };
        let mut buf = BytesMut::new();
        RecordBatchEncoder::encode(
            &mut buf,
            [&record],
            &RecordEncodeOptions {
                version: 2,
                compression: Compression::None,
            },
        )
        .map_err(|e| e.to_string())?;
        Ok(buf)
    }

    /// The state a control record holds, if it is one of ours and whole.
    fn decode(record: &Record) -> Option<DeliveryState> {
        let mut key = record.key.clone()?;
        if key.remaining() < 4 || key.get_i16() != 0 || key.get_i16() != STATE_TYPE {
            return None;
        }
        let mut v = record.value.clone()?;
        if v.remaining() < 21 || v.get_i8() != FORMAT {
            return None;
        }
        let delivered_up_to = v.get_i64();
        let acked_below = v.get_i64();
        let count = usize::try_from(v.get_i32()).ok()?;
        if v.remaining() < count.checked_mul(16)?.checked_add(4)? {
            return None;
        }
        let mut settled = Ranges::default();
        for _ in 0..count {
            let (s, e) = (v.get_i64(), v.get_i64());
            settled.insert(s, e);
        }
        let count = usize::try_from(v.get_i32()).ok()?;
        if v.remaining() != count.checked_mul(12)? {
            return None;
        }
        let mut returns = BTreeMap::new();
        for _ in 0..count {
            let offset = v.get_i64();
            returns.insert(offset, u32::try_from(v.get_i32()).ok()?);
        }
        Some(DeliveryState {
            delivered_up_to,
            acked_below,
            settled,
            returns,
        })
    }
}

/// The last delivery state recorded in `partition` between `from` and its log
/// end (with the offset of its batch), and where the control batches lie. Only
/// control batches are decoded; the others are stepped over by their headers.
/// Blocking: call it off the async workers.
pub(crate) fn last_recorded(
    partition: &Partition,
    from: i64,
) -> (Option<(i64, DeliveryState)>, Ranges) {
    let mut last = None;
    let mut controls = Ranges::default();
    let mut at = from;
    while at < partition.log_end_offset() {
        // Up to the log end: a new leader's high watermark may still lag
        // records of its own log that will be committed.
        let read = match partition.read(at, SCAN_BYTES, true, ReadLimit::LogEnd) {
            Ok(r) => r.records,
            Err(e) => {
                tracing::warn!(
                    offset = at,
                    "cannot read a queue's log for its delivery state: {e}"
                );
                return (last, controls);
            }
        };
        let next = scan_chunk(read, &mut last, &mut controls);
        if next <= at {
            break;
        }
        at = next;
    }
    (last, controls)
}

/// Walks the whole batches in `bytes`, keeping the last state record seen (and
/// its batch's base offset); returns the offset after the last batch.
fn scan_chunk(
    mut bytes: Bytes,
    last: &mut Option<(i64, DeliveryState)>,
    controls: &mut Ranges,
) -> i64 {
    let mut end = i64::MIN;
    while let Some(h) = BatchHeader::parse(&bytes) {
        let size = h.size();
        if size > bytes.len() {
            break;
        }
        let mut batch = bytes.split_to(size);
        end = h.next_offset();
        if !h.is_control() {
            continue;
        }
        controls.insert(h.base_offset, end);
        if let Ok(sets) = RecordBatchDecoder::decode_all(&mut batch) {
            for set in sets {
                for rec in &set.records {
                    if let Some(s) = DeliveryState::decode(rec) {
                        *last = Some((h.base_offset, s));
                    }
                }
            }
        }
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    proptest! {
        #[test]
        fn ranges_behave_as_a_set_of_offsets(
            ops in proptest::collection::vec((0i64..200, 0i64..20, any::<bool>()), 0..60),
            probe in proptest::collection::vec(0i64..230, 0..40),
        ) {
            let (mut ranges, mut model) = (Ranges::default(), BTreeSet::new());
            for (start, len, trim) in ops {
                if trim {
                    ranges.remove_below(start);
                    model.retain(|&o| o >= start);
                } else {
                    ranges.insert(start, start + len);
                    model.extend(start..start + len);
                }
                let spans: Vec<(i64, i64)> = ranges.iter().collect();
                for w in spans.windows(2) {
                    prop_assert!(w[0].1 < w[1].0, "ranges stay merged and ordered: {:?}", spans);
                }
            }
            for o in probe {
                prop_assert_eq!(ranges.contains(o), model.contains(&o), "offset {}", o);
                prop_assert_eq!(
                    ranges.count_in(o, o + 50),
                    model.iter().filter(|&&m| m >= o && m < o + 50).count() as i64
                );
            }
        }
    }

    #[test]
    fn a_state_round_trips_through_its_control_batch() {
        let mut settled = Ranges::default();
        settled.insert(5, 9);
        settled.insert(12, 13);
        let state = DeliveryState {
            delivered_up_to: 20,
            acked_below: 3,
            settled,
            returns: BTreeMap::from([(6, 2), (15, 1)]),
        };
        let mut batch = state.encode().expect("encodes").freeze();
        let header = BatchHeader::parse(&batch).expect("a batch");
        assert!(header.is_control() && !header.is_transactional());
        let (mut last, mut controls) = (None, Ranges::default());
        scan_chunk(batch.clone(), &mut last, &mut controls);
        assert_eq!(last, Some((0, state)));
        assert!(controls.contains(0) && controls.count_in(0, 10) == 1);
        // A truncated value is not a state.
        let sets = RecordBatchDecoder::decode_all(&mut batch).expect("decodes");
        let mut rec = sets[0].records[0].clone();
        rec.value = rec.value.map(|v| v.slice(..v.len() - 1));
        assert_eq!(DeliveryState::decode(&rec), None);
    }
}

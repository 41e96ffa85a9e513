//! Idempotent-producer state of one partition: per producer id, the current
//! epoch and the last five batches, to detect retries and sequence gaps.

use std::collections::{HashMap, VecDeque};

use crate::batch::{wrap_seq, BatchHeader};
use crate::txn::Marker;
use crate::LogError;

/// Kafka keeps the metadata of this many recent batches per producer.
pub(crate) const CACHED_BATCHES: usize = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BatchMeta {
    pub first_seq: i32,
    pub last_seq: i32,
    pub base_offset: i64,
    /// One past the batch's last offset.
    pub end_offset: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ProducerEntry {
    pub epoch: i16,
    pub batches: VecDeque<BatchMeta>,
    /// The max timestamp of the producer's last batch or marker here.
    pub last_timestamp: i64,
    /// The coordinator epoch of the last marker here, -1 before any.
    pub coordinator_epoch: i32,
}

impl ProducerEntry {
    fn new(epoch: i16) -> ProducerEntry {
        ProducerEntry {
            epoch,
            batches: VecDeque::with_capacity(CACHED_BATCHES),
            last_timestamp: -1,
            coordinator_epoch: -1,
        }
    }
}

/// A producer as one partition knows it, for DescribeProducers (KIP-664).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActiveProducer {
    pub producer_id: i64,
    pub epoch: i16,
    /// The last sequence number it wrote here, -1 when none is remembered
    /// (only markers since its epoch began).
    pub last_sequence: i32,
    /// The max timestamp of its last batch or marker.
    pub last_timestamp: i64,
    /// The coordinator epoch of its last marker here, -1 before any.
    pub coordinator_epoch: i32,
    /// The first offset of its open transaction here, if one is open.
    pub txn_start_offset: Option<i64>,
}

/// Outcome of checking a batch against the producer state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Check {
    /// Not an idempotent batch, or the next in sequence: append it.
    Append,
    /// A retry of a batch already in the log.
    Duplicate(BatchMeta),
}

#[derive(Clone, Debug, Default)]
pub(crate) struct ProducerStates {
    map: HashMap<i64, ProducerEntry>,
}

/// True when a batch from an idempotent producer carries a sequence.
pub(crate) fn is_idempotent(h: &BatchHeader) -> bool {
    h.producer_id >= 0 && h.base_sequence >= 0
}

fn in_sequence(last: i32, next: i32) -> bool {
    next == wrap_seq(last, 1)
}

impl ProducerStates {
    pub fn get(&self, producer_id: i64) -> Option<&ProducerEntry> {
        self.map.get(&producer_id)
    }

    /// Kafka's checks for one batch, against `entry` (the producer's state
    /// including batches accepted earlier in the same append).
    pub fn check(entry: Option<&ProducerEntry>, h: &BatchHeader) -> Result<Check, LogError> {
        if !is_idempotent(h) {
            return Ok(Check::Append);
        }
        let Some(e) = entry else {
            // Unknown producer (new, or its state expired with the log): any
            // sequence is accepted.
            return Ok(Check::Append);
        };
        if h.producer_epoch < e.epoch {
            return Err(LogError::InvalidProducerEpoch {
                producer_id: h.producer_id,
                current: e.epoch,
                got: h.producer_epoch,
            });
        }
        if h.producer_epoch > e.epoch {
            if h.base_sequence != 0 {
                return Err(LogError::OutOfOrderSequence {
                    producer_id: h.producer_id,
                    expected: 0,
                    got: h.base_sequence,
                });
            }
            return Ok(Check::Append);
        }
        let last_seq = h.last_sequence();
        if let Some(dup) = e
            .batches
            .iter()
            .find(|b| b.first_seq == h.base_sequence && b.last_seq == last_seq)
        {
            return Ok(Check::Duplicate(*dup));
        }
        match e.batches.back() {
            Some(last) if !in_sequence(last.last_seq, h.base_sequence) => {
                Err(LogError::OutOfOrderSequence {
                    producer_id: h.producer_id,
                    expected: wrap_seq(last.last_seq, 1),
                    got: h.base_sequence,
                })
            }
            _ => Ok(Check::Append),
        }
    }

    /// Applies a batch (already stamped with its base offset) to `entry`.
    pub fn apply(entry: &mut Option<ProducerEntry>, h: &BatchHeader) {
        if !is_idempotent(h) {
            return;
        }
        let meta = BatchMeta {
            first_seq: h.base_sequence,
            last_seq: h.last_sequence(),
            base_offset: h.base_offset,
            end_offset: h.next_offset(),
        };
        let e = entry.get_or_insert_with(|| ProducerEntry::new(h.producer_epoch));
        if h.producer_epoch > e.epoch {
            e.epoch = h.producer_epoch;
            e.batches.clear();
        }
        if e.batches.len() == CACHED_BATCHES {
            e.batches.pop_front();
        }
        e.batches.push_back(meta);
        e.last_timestamp = h.max_timestamp;
    }

    /// Applies a batch read back from the log (recovery, a follower's
    /// append): no checks, the log is the truth. `marker` is what a
    /// transactional control batch holds.
    pub fn replay(&mut self, h: &BatchHeader, marker: Option<Marker>) {
        if let Some(m) = marker {
            self.end_transaction(h, m);
            return;
        }
        if !is_idempotent(h) {
            return;
        }
        let mut entry = self.map.remove(&h.producer_id);
        Self::apply(&mut entry, h);
        if let Some(e) = entry {
            self.map.insert(h.producer_id, e);
        }
    }

    /// The marker batch `h` ended its producer's transaction: a newer epoch
    /// (the coordinator fenced the producer) fences older ones and starts
    /// its sequences afresh, as Kafka's marker append does.
    pub fn end_transaction(&mut self, h: &BatchHeader, marker: Marker) {
        let e = self
            .map
            .entry(h.producer_id)
            .or_insert_with(|| ProducerEntry::new(h.producer_epoch));
        if h.producer_epoch > e.epoch {
            e.epoch = h.producer_epoch;
            e.batches.clear();
        }
        e.coordinator_epoch = marker.coordinator_epoch;
        e.last_timestamp = h.max_timestamp;
    }

    /// Every producer known here, by producer id; `open_since` gives the
    /// first offset of a producer's open transaction.
    pub fn active(&self, open_since: impl Fn(i64) -> Option<i64>) -> Vec<ActiveProducer> {
        let mut all: Vec<ActiveProducer> = self
            .map
            .iter()
            .map(|(&producer_id, e)| ActiveProducer {
                producer_id,
                epoch: e.epoch,
                last_sequence: e.batches.back().map_or(-1, |b| b.last_seq),
                last_timestamp: e.last_timestamp,
                coordinator_epoch: e.coordinator_epoch,
                txn_start_offset: open_since(producer_id),
            })
            .collect();
        all.sort_unstable_by_key(|p| p.producer_id);
        all
    }

    /// Each producer's last batch here (its base offset): compaction keeps
    /// that batch, emptied if need be, so the state replays after a restart.
    pub fn last_batch_offsets(&self) -> HashMap<i64, i64> {
        self.map
            .iter()
            .filter_map(|(pid, e)| Some((*pid, e.batches.back()?.base_offset)))
            .collect()
    }

    pub fn insert(&mut self, producer_id: i64, entry: ProducerEntry) {
        self.map.insert(producer_id, entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(pid: i64, epoch: i16, seq: i32, count: i32, base: i64) -> BatchHeader {
        BatchHeader {
            base_offset: base,
            batch_length: 49,
            partition_leader_epoch: 0,
            magic: 2,
            crc: 0,
            attributes: 0,
            last_offset_delta: count - 1,
            base_timestamp: 0,
            max_timestamp: 0,
            producer_id: pid,
            producer_epoch: epoch,
            base_sequence: seq,
            records_count: count,
        }
    }

    #[test]
    fn sequence_rules() {
        let mut s = ProducerStates::default();
        s.replay(&hdr(7, 0, 0, 3, 0), None);
        s.replay(&hdr(7, 0, 3, 2, 3), None);
        let e = s.get(7);
        assert_eq!(
            ProducerStates::check(e, &hdr(7, 0, 5, 1, 0)).unwrap(),
            Check::Append
        );
        assert!(matches!(
            ProducerStates::check(e, &hdr(7, 0, 3, 2, 0)).unwrap(),
            Check::Duplicate(BatchMeta {
                base_offset: 3,
                end_offset: 5,
                ..
            })
        ));
        assert!(matches!(
            ProducerStates::check(e, &hdr(7, 0, 9, 1, 0)),
            Err(LogError::OutOfOrderSequence {
                expected: 5,
                got: 9,
                ..
            })
        ));
        assert!(matches!(
            ProducerStates::check(e, &hdr(7, 1, 4, 1, 0)),
            Err(LogError::OutOfOrderSequence { expected: 0, .. })
        ));
        assert_eq!(
            ProducerStates::check(e, &hdr(7, 1, 0, 1, 0)).unwrap(),
            Check::Append
        );
        s.replay(&hdr(7, 1, 0, 1, 5), None);
        assert!(matches!(
            ProducerStates::check(s.get(7), &hdr(7, 0, 5, 1, 0)),
            Err(LogError::InvalidProducerEpoch {
                current: 1,
                got: 0,
                ..
            })
        ));
        // Unknown producers start anywhere.
        assert_eq!(
            ProducerStates::check(s.get(8), &hdr(8, 0, 42, 1, 0)).unwrap(),
            Check::Append
        );
    }

    #[test]
    fn only_five_batches_are_remembered_and_sequences_wrap() {
        let mut s = ProducerStates::default();
        for i in 0..7 {
            s.replay(&hdr(1, 0, i, 1, i64::from(i)), None);
        }
        let e = s.get(1).unwrap();
        assert_eq!(e.batches.len(), CACHED_BATCHES);
        assert_eq!(e.batches.front().unwrap().first_seq, 2);
        let mut s = ProducerStates::default();
        s.replay(&hdr(1, 0, i32::MAX - 1, 2, 0), None);
        assert_eq!(s.get(1).unwrap().batches.back().unwrap().last_seq, i32::MAX);
        assert_eq!(
            ProducerStates::check(s.get(1), &hdr(1, 0, 0, 1, 0)).unwrap(),
            Check::Append
        );
        assert!(ProducerStates::check(s.get(1), &hdr(1, 0, 1, 1, 0)).is_err());
    }
}

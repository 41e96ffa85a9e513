//! Kafka transactions as one partition's log sees them (KIP-98): a producer's
//! transaction is open from its first transactional batch here until the
//! COMMIT or ABORT marker its coordinator writes (a control batch holding one
//! `EndTransactionMarker` record). From that follow the last stable offset
//! (LSO: below it every transaction is decided, so `read_committed` consumers
//! read up to it) and the aborted transactions a `read_committed` fetch lists
//! so that the consumer drops their records.
//!
//! Like the idempotent-producer state, this is derived from the log alone:
//! replayed batch by batch on append, on a follower's append, on open and
//! after truncation.

use std::collections::{BTreeSet, HashMap, VecDeque};

use bytes::Bytes;

use crate::batch::BatchHeader;
use crate::records::{BatchBuilder, PlainRecords};

/// `EndTransactionMarker`'s record key: version 0, then the control type.
const MARKER_VERSION: i16 = 0;
const CONTROL_ABORT: i16 = 0;
const CONTROL_COMMIT: i16 = 1;
const ATTR_TRANSACTIONAL: i16 = 1 << 4;
const ATTR_CONTROL: i16 = 1 << 5;

/// How a transaction ended, as its marker says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Marker {
    pub commit: bool,
    /// The coordinator's epoch when it wrote the marker (a zombie coordinator
    /// is fenced by it).
    pub coordinator_epoch: i32,
}

impl Marker {
    /// The control batch that ends `producer_id`'s transaction: transactional
    /// and control, one record whose key is the control type and whose value
    /// the coordinator epoch, as Kafka writes it.
    pub fn batch(&self, producer_id: i64, producer_epoch: i16, timestamp: i64) -> Option<Bytes> {
        let kind = if self.commit {
            CONTROL_COMMIT
        } else {
            CONTROL_ABORT
        };
        let mut key = [0u8; 4];
        key[..2].copy_from_slice(&MARKER_VERSION.to_be_bytes());
        key[2..].copy_from_slice(&kind.to_be_bytes());
        let mut value = [0u8; 6];
        value[..2].copy_from_slice(&MARKER_VERSION.to_be_bytes());
        value[2..].copy_from_slice(&self.coordinator_epoch.to_be_bytes());
        let mut b = BatchBuilder::new(32, timestamp);
        b.push(timestamp, Some(&key), Some(&value), &[]);
        b.finish_as(
            ATTR_TRANSACTIONAL | ATTR_CONTROL,
            producer_id,
            producer_epoch,
        )
        .map(|b| b.freeze())
    }

    /// The marker a transactional control batch holds; `None` when `batch`
    /// (one whole batch) is not one or its record does not read as a marker.
    pub fn read(header: &BatchHeader, batch: Bytes) -> Option<Marker> {
        if !(header.is_transactional() && header.is_control()) {
            return None;
        }
        let record = PlainRecords::new(batch).ok()?.next()?.ok()?;
        let key = record.key?;
        let value = record.value.unwrap_or_default();
        let kind = i16::from_be_bytes(key.get(2..4)?.try_into().ok()?);
        let coordinator_epoch = value
            .get(2..6)
            .and_then(|v| v.try_into().ok())
            .map_or(-1, i32::from_be_bytes);
        match kind {
            CONTROL_COMMIT | CONTROL_ABORT => Some(Marker {
                commit: kind == CONTROL_COMMIT,
                coordinator_epoch,
            }),
            _ => None,
        }
    }
}

/// A transaction that was aborted: a `read_committed` consumer drops its
/// producer's transactional records from `first_offset` until it meets the
/// marker at `last_offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AbortedTxn {
    pub producer_id: i64,
    pub first_offset: i64,
    /// The offset of its ABORT marker.
    pub last_offset: i64,
}

/// Bytes of one entry of a segment's `.txnindex`: producer id, first
/// offset, marker offset, each big-endian.
const ABORTED_ENTRY: usize = 24;

/// A `.txnindex` file's contents for `entries`.
pub(crate) fn encode_aborted(entries: &[AbortedTxn]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * ABORTED_ENTRY);
    for a in entries {
        out.extend_from_slice(&a.producer_id.to_be_bytes());
        out.extend_from_slice(&a.first_offset.to_be_bytes());
        out.extend_from_slice(&a.last_offset.to_be_bytes());
    }
    out
}

/// The entries of a `.txnindex` file; a torn last entry is ignored (the
/// file is checked against the log, and rewritten, at every open).
pub(crate) fn decode_aborted(bytes: &[u8]) -> Vec<AbortedTxn> {
    let word = |e: &[u8], i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&e[i * 8..i * 8 + 8]);
        i64::from_be_bytes(w)
    };
    bytes
        .chunks_exact(ABORTED_ENTRY)
        .map(|e| AbortedTxn {
            producer_id: word(e, 0),
            first_offset: word(e, 1),
            last_offset: word(e, 2),
        })
        .collect()
}

/// The transactions of one partition's log.
#[derive(Clone, Debug, Default)]
pub(crate) struct Transactions {
    /// Producers with an open transaction here: its first offset.
    open: HashMap<i64, i64>,
    /// The same, ordered by first offset (the LSO is the smallest).
    by_first: BTreeSet<(i64, i64)>,
    /// Aborted transactions whose markers were replayed since the last
    /// [`Transactions::take_aborted`], in marker order: the active
    /// segment's. A sealed segment's are in its `.txnindex`, so memory
    /// holds one segment's worth, however long the log.
    aborted: VecDeque<AbortedTxn>,
}

impl Transactions {
    /// Follows one batch as it is appended (or replayed); `marker` is what a
    /// transactional control batch holds.
    pub fn replay(&mut self, h: &BatchHeader, marker: Option<Marker>) {
        if !h.is_transactional() || h.producer_id < 0 {
            return;
        }
        if !h.is_control() {
            if let std::collections::hash_map::Entry::Vacant(e) = self.open.entry(h.producer_id) {
                e.insert(h.base_offset);
                self.by_first.insert((h.base_offset, h.producer_id));
            }
            return;
        }
        let Some(marker) = marker else {
            return;
        };
        // A transaction that wrote nothing here still gets its marker (the
        // coordinator marks every partition it added): as in Kafka, it spans
        // the marker alone.
        let first = match self.open.remove(&h.producer_id) {
            Some(first) => {
                self.by_first.remove(&(first, h.producer_id));
                first
            }
            None => h.base_offset,
        };
        if !marker.commit {
            self.aborted.push_back(AbortedTxn {
                producer_id: h.producer_id,
                first_offset: first,
                last_offset: h.base_offset,
            });
        }
    }

    /// The first offset of `producer_id`'s open transaction, if it has one.
    pub fn open_since(&self, producer_id: i64) -> Option<i64> {
        self.open.get(&producer_id).copied()
    }

    /// The first offset of the oldest open transaction, if any.
    pub fn first_unstable(&self) -> Option<i64> {
        self.by_first.first().map(|(first, _)| *first)
    }

    /// The aborted transactions a fetch of `[from, to)` must list: those
    /// whose records reach into that range.
    pub fn aborted_between(&self, from: i64, to: i64) -> Vec<AbortedTxn> {
        self.aborted
            .iter()
            .filter(|t| t.last_offset >= from && t.first_offset < to)
            .copied()
            .collect()
    }

    /// The aborted transactions held in memory, for a segment's
    /// `.txnindex`; memory keeps none.
    pub fn take_aborted(&mut self) -> Vec<AbortedTxn> {
        std::mem::take(&mut self.aborted).into()
    }

    /// Puts aborted transactions (the active segment's) in memory.
    pub fn set_aborted(&mut self, entries: Vec<AbortedTxn>) {
        self.aborted = entries.into();
    }

    /// Forgets aborted transactions wholly below the log start.
    pub fn forget_before(&mut self, log_start: i64) {
        while self
            .aborted
            .front()
            .is_some_and(|t| t.last_offset < log_start)
        {
            self.aborted.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn batch(pid: i64, base: i64, len: i32, transactional: bool) -> BatchHeader {
        BatchHeader {
            base_offset: base,
            batch_length: 0,
            partition_leader_epoch: 0,
            magic: 2,
            crc: 0,
            attributes: if transactional { ATTR_TRANSACTIONAL } else { 0 },
            last_offset_delta: len - 1,
            base_timestamp: 0,
            max_timestamp: 0,
            producer_id: pid,
            producer_epoch: 0,
            base_sequence: 0,
            records_count: len,
        }
    }

    fn marker_header(pid: i64, at: i64) -> BatchHeader {
        BatchHeader {
            attributes: ATTR_TRANSACTIONAL | ATTR_CONTROL,
            ..batch(pid, at, 1, true)
        }
    }

    #[test]
    fn a_marker_batch_reads_back_as_written() {
        for commit in [true, false] {
            let m = Marker {
                commit,
                coordinator_epoch: 7,
            };
            let bytes = m.batch(42, 3, 1_700_000_000_000).expect("one record");
            crate::batch::validate_batches(&bytes).expect("a valid batch");
            let h = BatchHeader::parse(&bytes).expect("a header");
            assert!(h.is_transactional() && h.is_control());
            assert_eq!(
                (h.producer_id, h.producer_epoch, h.base_sequence),
                (42, 3, -1)
            );
            assert_eq!(Marker::read(&h, bytes), Some(m));
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// A producer's batch of `len` records, transactional or not.
        Data {
            pid: i64,
            len: i32,
            transactional: bool,
        },
        /// Its coordinator ends its transaction.
        End { pid: i64, commit: bool },
        /// Retention drops everything below this share of the log.
        Trim { permille: i64 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..4i64, 1..5i32, any::<bool>())
                .prop_map(|(pid, len, transactional)| Op::Data { pid, len, transactional }),
            2 => (0..4i64, any::<bool>()).prop_map(|(pid, commit)| Op::End { pid, commit }),
            1 => (0..1000i64).prop_map(|permille| Op::Trim { permille }),
        ]
    }

    proptest! {
        /// Against a model that keeps every record with its producer and
        /// transaction outcome: the LSO is the first record of an undecided
        /// transaction, and a read_committed reader that drops the listed
        /// aborted transactions' records keeps exactly the records that are
        /// not transactional or whose transaction committed.
        #[test]
        fn stable_offset_and_aborted_list_match_a_model(ops in proptest::collection::vec(op(), 1..60)) {
            let mut t = Transactions::default();
            // Model: per offset, (producer, transactional, txn id); txn outcome by id.
            let mut records: Vec<(i64, bool, Option<usize>)> = Vec::new();
            let mut outcome: Vec<Option<bool>> = Vec::new();
            let mut current: HashMap<i64, usize> = HashMap::new();
            let mut log_start = 0i64;
            for op in ops {
                let end = records.len() as i64;
                match op {
                    Op::Data { pid, len, transactional } => {
                        let txn = transactional.then(|| *current.entry(pid).or_insert_with(|| {
                            outcome.push(None);
                            outcome.len() - 1
                        }));
                        for _ in 0..len {
                            records.push((pid, transactional, txn));
                        }
                        t.replay(&batch(pid, end, len, transactional), None);
                    }
                    Op::End { pid, commit } => {
                        if let Some(txn) = current.remove(&pid) {
                            outcome[txn] = Some(commit);
                        }
                        records.push((pid, true, None)); // the marker
                        t.replay(&marker_header(pid, end), Some(Marker { commit, coordinator_epoch: 0 }));
                    }
                    Op::Trim { permille } => {
                        log_start = log_start.max(end * permille / 1000);
                        t.forget_before(log_start);
                    }
                }
                let end = records.len() as i64;
                let model_lso = records
                    .iter()
                    .position(|(_, _, txn)| txn.is_some_and(|i| outcome[i].is_none()))
                    .map_or(end, |p| p as i64);
                prop_assert_eq!(t.first_unstable().unwrap_or(end), model_lso);

                // A read_committed reader of [log_start, lso).
                let aborted = t.aborted_between(log_start, model_lso);
                let mut dropping: HashMap<i64, i64> = HashMap::new();
                for (offset, (pid, transactional, txn)) in records.iter().enumerate().take(model_lso as usize).skip(log_start as usize) {
                    let offset = offset as i64;
                    for a in aborted.iter().filter(|a| a.first_offset <= offset && a.producer_id == *pid) {
                        if a.last_offset >= offset {
                            dropping.insert(a.producer_id, a.last_offset);
                        }
                    }
                    let Some(txn) = txn else {
                        // Non-transactional data, or a marker (which ends dropping).
                        if *transactional {
                            dropping.remove(pid);
                        }
                        continue;
                    };
                    let dropped = dropping.get(pid).is_some_and(|last| *last > offset);
                    prop_assert_eq!(dropped, outcome[*txn] == Some(false), "offset {}", offset);
                }
            }
        }
    }
}

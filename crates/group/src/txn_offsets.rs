//! Offsets committed inside a transaction (TxnOffsetCommit, KIP-98 and
//! KIP-447): written to the offsets log as transactional records of the
//! producer, held aside, and made the group's committed offsets only when
//! the transaction's COMMIT marker reaches the offsets log; an ABORT drops
//! them. While a group has such offsets pending, an OffsetFetch that
//! requires stable offsets is told UNSTABLE_OFFSET_COMMIT for them, so a
//! consumer that takes over never starts from offsets about to change.
//!
//! Replay follows the same rule over the log: a producer's transactional
//! records wait for its marker; those still waiting at the end are pending
//! again.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use kafka_protocol::messages::txn_offset_commit_response::{
    TxnOffsetCommitResponsePartition, TxnOffsetCommitResponseTopic,
};
use kafka_protocol::messages::{TxnOffsetCommitRequest, TxnOffsetCommitResponse};
use kafka_protocol::records::Record;
use sluice_log::BatchBuilder;
use sluice_topology::AppendError;
use sluice_vocab::{now_ms, ErrorCode};

use crate::group::{CommitApi, Committed};
use crate::record::{self, OffsetKey, OffsetValue};
use crate::{
    closed_error, commit_error, committed, offset_entry, GroupCoordinator, GroupError,
    OffsetsByGroup,
};

/// One offset a transaction committed: group, partition, the commit.
pub(crate) type TxnCommit = (String, (String, i32), Committed);

/// Offsets of open transactions, by producer id.
#[derive(Debug, Default)]
pub(crate) struct PendingTxnOffsets {
    by_producer: HashMap<i64, Vec<TxnCommit>>,
}

impl PendingTxnOffsets {
    pub(crate) fn add(&mut self, producer_id: i64, commit: TxnCommit) {
        self.by_producer
            .entry(producer_id)
            .or_default()
            .push(commit);
    }

    pub(crate) fn take(&mut self, producer_id: i64) -> Vec<TxnCommit> {
        self.by_producer.remove(&producer_id).unwrap_or_default()
    }

    /// Whether `group` has an offset of `tp` waiting for its transaction.
    pub(crate) fn is_pending(&self, group: &str, tp: &(String, i32)) -> bool {
        self.by_producer
            .values()
            .flatten()
            .any(|(g, p, _)| g == group && p == tp)
    }

    /// Whether `group` has any offset waiting for its transaction.
    pub(crate) fn has_group(&self, group: &str) -> bool {
        self.by_producer
            .values()
            .flatten()
            .any(|(g, _, _)| g == group)
    }

    /// Drops the commits at these log offsets (their append failed).
    fn forget(&mut self, producer_id: i64, log_offsets: &[i64]) {
        if let Some(commits) = self.by_producer.get_mut(&producer_id) {
            commits.retain(|(_, _, c)| !log_offsets.contains(&c.log_offset));
            if commits.is_empty() {
                self.by_producer.remove(&producer_id);
            }
        }
    }
}

/// The control type of a transaction marker record (its key: version,
/// type): COMMIT is 1, ABORT 0.
fn marker_commits(rec: &Record) -> Option<bool> {
    let key = rec.key.as_ref()?;
    let kind = i16::from_be_bytes(key.get(2..4)?.try_into().ok()?);
    match kind {
        1 => Some(true),
        0 => Some(false),
        _ => None,
    }
}

/// Replays one record of the offsets log that belongs to a transaction:
/// a record joins its producer's pending offsets, a marker settles them.
/// Returns false for records outside transactions (replayed as plain
/// commits by the caller).
pub(crate) fn replay_in_transaction(
    rec: &Record,
    groups: &mut OffsetsByGroup,
    pending: &mut PendingTxnOffsets,
) -> Result<bool, GroupError> {
    if !rec.transactional {
        return Ok(false);
    }
    if rec.control {
        let settled = pending.take(rec.producer_id);
        if marker_commits(rec) == Some(true) {
            for (group, tp, c) in settled {
                let offsets = groups.entry(group).or_default();
                let newer = offsets
                    .get(&tp)
                    .is_some_and(|o| o.log_offset > c.log_offset);
                if !newer {
                    offsets.insert(tp, c);
                }
            }
        }
        return Ok(true);
    }
    let corrupt = |msg: String| GroupError::CorruptEntry(rec.offset, msg);
    let key = rec
        .key
        .as_ref()
        .ok_or_else(|| corrupt("record without a key".to_owned()))?;
    let Some(key) = record::decode_key(key).map_err(|e| corrupt(e.to_string()))? else {
        return Ok(true);
    };
    if let Some(value) = &rec.value {
        let v = record::decode_value(value).map_err(|e| corrupt(e.to_string()))?;
        pending.add(
            rec.producer_id,
            (
                key.group,
                (key.topic, key.partition),
                committed(&v, rec.offset),
            ),
        );
    }
    Ok(true)
}

impl GroupCoordinator {
    /// TxnOffsetCommit: the offsets are written in the producer's
    /// transaction and wait for its outcome.
    pub async fn txn_offset_commit(
        self: &Arc<Self>,
        req: TxnOffsetCommitRequest,
    ) -> TxnOffsetCommitResponse {
        let group_id = req.group_id.as_str();
        let mut topics: Vec<TxnOffsetCommitResponseTopic> = req
            .topics
            .iter()
            .map(|t| {
                TxnOffsetCommitResponseTopic::default()
                    .with_name(t.name.clone())
                    .with_partitions(
                        t.partitions
                            .iter()
                            .map(|p| {
                                TxnOffsetCommitResponsePartition::default()
                                    .with_partition_index(p.partition_index)
                            })
                            .collect(),
                    )
            })
            .collect();
        let set =
            |topics: &mut Vec<TxnOffsetCommitResponseTopic>, ti: usize, pi: usize, e: ErrorCode| {
                if let Some(p) = topics.get_mut(ti).and_then(|t| t.partitions.get_mut(pi)) {
                    p.error_code = e.code();
                }
            };
        let fail_all = |topics: &mut Vec<TxnOffsetCommitResponseTopic>, e: ErrorCode| {
            for t in topics.iter_mut() {
                for p in t.partitions.iter_mut() {
                    p.error_code = e.code();
                }
            }
        };
        let done = |topics| TxnOffsetCommitResponse::default().with_topics(topics);
        if group_id.len() > record::MAX_STRING {
            fail_all(&mut topics, ErrorCode::InvalidGroupId);
            return done(topics);
        }
        // KIP-447: a member of the group commits with its generation; a
        // producer that is no member commits with none.
        let handle = self.live_group(group_id);
        {
            let g = handle.state.lock();
            let member_id = req.member_id.as_str();
            let instance_id = req.group_instance_id.as_deref();
            let as_member =
                req.generation_id >= 0 || !member_id.is_empty() || instance_id.is_some();
            if as_member {
                if let Err(e) = g.validate_offset_commit(
                    req.generation_id,
                    member_id,
                    instance_id,
                    CommitApi::Transactional,
                ) {
                    fail_all(&mut topics, e);
                    return done(topics);
                }
            }
        }
        let commit_ts = now_ms();
        let mut entries: Vec<(usize, usize, OffsetKey, OffsetValue)> = Vec::new();
        for (ti, t) in req.topics.iter().enumerate() {
            for (pi, p) in t.partitions.iter().enumerate() {
                if !self.partition_exists(t.name.as_str(), p.partition_index) {
                    set(&mut topics, ti, pi, ErrorCode::UnknownTopicOrPartition);
                    continue;
                }
                match offset_entry(
                    group_id,
                    t.name.as_str(),
                    p.partition_index,
                    p.committed_offset,
                    p.committed_leader_epoch,
                    p.committed_metadata.as_deref(),
                    commit_ts,
                ) {
                    Ok((key, value)) => entries.push((ti, pi, key, value)),
                    Err(e) => set(&mut topics, ti, pi, e),
                }
            }
        }
        if entries.is_empty() {
            return done(topics);
        }
        let records: Vec<(Bytes, Option<Bytes>)> = entries
            .iter()
            .map(|(_, _, k, v)| (record::encode_key(k), Some(record::encode_value(v))))
            .collect();
        let producer_id = req.producer_id.0;
        // Appended and made pending under the pending map's lock, so a
        // marker written meanwhile cannot miss them.
        let appended = {
            let mut pending = self.pending_txn.lock();
            match self.append_in_transaction(&records, producer_id, req.producer_epoch) {
                Ok((base, end)) => {
                    for (log_offset, (_, _, k, v)) in (base..).zip(&entries) {
                        pending.add(
                            producer_id,
                            (
                                k.group.clone(),
                                (k.topic.clone(), k.partition),
                                committed(v, log_offset),
                            ),
                        );
                    }
                    Ok((base, end))
                }
                Err(e) => Err(e),
            }
        };
        let (base, end) = match appended {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(group = group_id, error = %e, "transactional offset commit append failed");
                let err = commit_error(&e);
                for (ti, pi, _, _) in &entries {
                    set(&mut topics, *ti, *pi, err);
                }
                return done(topics);
            }
        };
        if let Err(e) = self.settle(end).await {
            let offsets: Vec<i64> = (base..end).collect();
            self.pending_txn.lock().forget(producer_id, &offsets);
            let err = commit_error(&e);
            for (ti, pi, _, _) in &entries {
                set(&mut topics, *ti, *pi, err);
            }
        }
        done(topics)
    }

    /// The transaction of `producer_id` ended in the offsets log (its marker
    /// there is committed): its offsets become the groups' committed
    /// offsets, or are dropped.
    pub fn complete_transaction(self: &Arc<Self>, producer_id: i64, commit: bool) {
        let settled = self.pending_txn.lock().take(producer_id);
        if !commit {
            return;
        }
        for (group, tp, c) in settled {
            let handle = self.live_group(&group);
            handle.state.lock().apply_committed(tp, c);
        }
    }

    /// Appends offsets as one transactional batch of the producer.
    fn append_in_transaction(
        &self,
        records: &[(Bytes, Option<Bytes>)],
        producer_id: i64,
        producer_epoch: i16,
    ) -> Result<(i64, i64), sluice_log::LogError> {
        let timestamp = now_ms();
        let size = records
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Bytes::len) + 16)
            .sum();
        let mut batch = BatchBuilder::new(size, timestamp);
        for (key, value) in records {
            batch.push(timestamp, Some(key), value.as_deref(), &[]);
        }
        let buf = batch
            .finish_transactional(producer_id, producer_epoch)
            .ok_or_else(|| sluice_log::LogError::InvalidRecord("no offsets to append".into()))?;
        if self.is_closed() {
            return Err(closed_error());
        }
        let result = self
            .leadership
            .append_in_transaction(&buf)
            .map_err(|e| match e {
                AppendError::NotLeader => closed_error(),
                AppendError::Log(e) => e,
            })?;
        Ok((result.base_offset, result.end_offset))
    }
}

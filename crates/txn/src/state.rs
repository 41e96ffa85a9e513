//! What the transaction coordinator knows of each transactional id, and the
//! rules by which a request changes it (Kafka's `TransactionMetadata` and
//! the checks of its `TransactionCoordinator`, KIP-98 and KIP-360).
//!
//! Every change is a *transition*: a request computes the state it leads to,
//! which is written to `__transaction_state` first and takes effect only once
//! that record is committed ([`TxnTable::complete`]); meanwhile the
//! transactional id has a pending transition and every other request for it
//! is answered CONCURRENT_TRANSACTIONS. A failed write drops the pending
//! transition ([`TxnTable::abandon`]) and the state is as before.
//!
//! Nothing here does I/O or reads a clock: times are passed in, so every
//! rule is tested on its own.

use std::collections::{BTreeSet, HashMap};

use sluice_vocab::ErrorCode;

/// "No epoch yet" / "no producer id", as Kafka writes them.
pub const NO_PRODUCER_EPOCH: i16 = -1;
pub const NO_PRODUCER_ID: i64 = -1;

/// The last epoch a producer id may be given: past it the id is replaced by
/// a fresh one (Kafka keeps `Short.MaxValue` itself out of use).
const LAST_EPOCH: i16 = i16::MAX - 1;

/// A transactional id's state (Kafka's `TransactionState`, with its codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TxnState {
    /// No transaction; the producer may begin one.
    Empty,
    /// Partitions (or a group's offsets) were added: a transaction is open.
    Ongoing,
    /// EndTxn(commit) accepted: markers are being written.
    PrepareCommit,
    /// EndTxn(abort), a timeout or a fencing: markers are being written.
    PrepareAbort,
    /// Every partition has its COMMIT marker.
    CompleteCommit,
    /// Every partition has its ABORT marker.
    CompleteAbort,
    /// The transactional id expired (kept only until its tombstone).
    Dead,
    /// The producer is being fenced before its open transaction is aborted.
    PrepareEpochFence,
}

impl TxnState {
    /// Kafka's code of the state, as stored and as DescribeTransactions
    /// answers it.
    pub fn code(self) -> i8 {
        match self {
            TxnState::Empty => 0,
            TxnState::Ongoing => 1,
            TxnState::PrepareCommit => 2,
            TxnState::PrepareAbort => 3,
            TxnState::CompleteCommit => 4,
            TxnState::CompleteAbort => 5,
            TxnState::Dead => 6,
            TxnState::PrepareEpochFence => 7,
        }
    }

    pub fn from_code(code: i8) -> Option<TxnState> {
        Some(match code {
            0 => TxnState::Empty,
            1 => TxnState::Ongoing,
            2 => TxnState::PrepareCommit,
            3 => TxnState::PrepareAbort,
            4 => TxnState::CompleteCommit,
            5 => TxnState::CompleteAbort,
            6 => TxnState::Dead,
            7 => TxnState::PrepareEpochFence,
            _ => return None,
        })
    }

    /// The name Kafka's tools print (DescribeTransactions, ListTransactions).
    pub fn name(self) -> &'static str {
        match self {
            TxnState::Empty => "Empty",
            TxnState::Ongoing => "Ongoing",
            TxnState::PrepareCommit => "PrepareCommit",
            TxnState::PrepareAbort => "PrepareAbort",
            TxnState::CompleteCommit => "CompleteCommit",
            TxnState::CompleteAbort => "CompleteAbort",
            TxnState::Dead => "Dead",
            TxnState::PrepareEpochFence => "PrepareEpochFence",
        }
    }

    /// Whether a transactional id in `from` may move to `self` (Kafka's
    /// `validPreviousStates`).
    fn may_follow(self, from: TxnState) -> bool {
        use TxnState::*;
        match self {
            Empty => matches!(from, Empty | CompleteCommit | CompleteAbort),
            Ongoing => matches!(from, Ongoing | Empty | CompleteCommit | CompleteAbort),
            PrepareCommit => from == Ongoing,
            PrepareAbort => matches!(from, Ongoing | PrepareEpochFence),
            CompleteCommit => from == PrepareCommit,
            CompleteAbort => from == PrepareAbort,
            Dead => matches!(from, Empty | CompleteCommit | CompleteAbort),
            PrepareEpochFence => from == Ongoing,
        }
    }

    #[cfg(test)]
    pub(crate) fn may_follow_for_test(self, from: TxnState) -> bool {
        self.may_follow(from)
    }

    /// A transaction's markers are being written.
    pub fn is_preparing(self) -> bool {
        matches!(self, TxnState::PrepareCommit | TxnState::PrepareAbort)
    }
}

/// A partition by topic name and index.
pub type TopicPartition = (String, i32);

/// What the coordinator keeps of one transactional id (one record of
/// `__transaction_state` holds all of it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnMetadata {
    pub producer_id: i64,
    /// The id before the last rotation, for a retried InitProducerId.
    pub last_producer_id: i64,
    pub producer_epoch: i16,
    /// The epoch before the last bump, for a retried InitProducerId.
    pub last_producer_epoch: i16,
    pub timeout_ms: i32,
    pub state: TxnState,
    /// The partitions of the open (or ending) transaction.
    pub partitions: BTreeSet<TopicPartition>,
    /// When the open transaction began (ms since the epoch); -1 when none is.
    pub start_ms: i64,
    pub last_update_ms: i64,
}

impl TxnMetadata {
    /// The same producer with its epoch bumped: a fresh producer id once
    /// the epoch is exhausted (the old one is remembered for a retry).
    fn bumped(&self, fresh_producer_id: Option<i64>) -> Result<TxnMetadata, Init> {
        let mut next = self.clone();
        if self.producer_epoch >= LAST_EPOCH {
            let pid = fresh_producer_id.ok_or(Init::NeedProducerId)?;
            next.last_producer_id = self.producer_id;
            next.last_producer_epoch = self.producer_epoch;
            next.producer_id = pid;
            next.producer_epoch = 0;
        } else {
            next.last_producer_id = self.producer_id;
            next.last_producer_epoch = self.producer_epoch;
            next.producer_epoch = self.producer_epoch + 1;
        }
        Ok(next)
    }
}

/// How an InitProducerId goes on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Init {
    /// Write this state; once committed its producer id and epoch are the
    /// answer.
    Write(TxnMetadata),
    /// A retry of an InitProducerId whose answer was lost: the current id
    /// and epoch, nothing written.
    Current {
        producer_id: i64,
        producer_epoch: i16,
    },
    /// The open transaction is aborted first, under a bumped epoch that
    /// fences its producer: write this PrepareAbort, then complete the abort
    /// as an EndTxn would. The client is told CONCURRENT_TRANSACTIONS and
    /// retries.
    AbortFirst(TxnMetadata),
    /// A fresh producer id is needed (a new transactional id, or an
    /// exhausted epoch): ask again with one.
    NeedProducerId,
}

/// How an EndTxn goes on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// Write this PrepareCommit or PrepareAbort, then the markers, then
    /// [`TxnTable::complete_end`].
    Write(TxnMetadata),
    /// A retry of an EndTxn that already completed: success, nothing to do.
    AlreadyDone,
}

#[derive(Clone, Debug)]
struct Entry {
    meta: TxnMetadata,
    /// A transition written but not committed yet.
    pending: Option<TxnMetadata>,
    /// Created by its pending transition: it exists once that is committed.
    fresh: bool,
}

/// A producer's transaction timeout must be positive and within the
/// broker's `transaction.max.timeout.ms`. Kafka checks it before it asks
/// whether this node coordinates the id, so a misconfigured producer hears
/// the real problem even while the coordinator is loading.
pub(crate) fn check_timeout(timeout_ms: i32, max_timeout_ms: i32) -> Result<(), ErrorCode> {
    if timeout_ms <= 0 || timeout_ms > max_timeout_ms {
        return Err(ErrorCode::InvalidTransactionTimeout);
    }
    Ok(())
}

/// Every transactional id this coordinator knows.
#[derive(Clone, Debug, Default)]
pub struct TxnTable {
    ids: HashMap<String, Entry>,
}

impl TxnTable {
    /// The committed state of `id`.
    pub fn get(&self, id: &str) -> Option<&TxnMetadata> {
        self.ids.get(id).filter(|e| !e.fresh).map(|e| &e.meta)
    }

    /// Every transactional id with its committed state.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &TxnMetadata)> {
        self.ids
            .iter()
            .filter(|(_, e)| !e.fresh)
            .map(|(id, e)| (id.as_str(), &e.meta))
    }

    /// Applies a record read back from `__transaction_state` (`None`: the
    /// id's tombstone). The log is the truth: no rule is checked.
    pub fn replay(&mut self, id: &str, meta: Option<TxnMetadata>) {
        match meta {
            Some(meta) => {
                self.ids.insert(
                    id.to_owned(),
                    Entry {
                        meta,
                        pending: None,
                        fresh: false,
                    },
                );
            }
            None => {
                self.ids.remove(id);
            }
        }
    }

    /// InitProducerId with a transactional id. `expected` is the producer id
    /// and epoch the client had (KIP-360), `fresh_producer_id` one the
    /// caller allocated in case it is needed.
    pub fn init(
        &mut self,
        id: &str,
        timeout_ms: i32,
        max_timeout_ms: i32,
        expected: Option<(i64, i16)>,
        fresh_producer_id: Option<i64>,
        now_ms: i64,
    ) -> Result<Init, ErrorCode> {
        check_timeout(timeout_ms, max_timeout_ms)?;
        let Some(entry) = self.ids.get_mut(id) else {
            let Some(producer_id) = fresh_producer_id else {
                return Ok(Init::NeedProducerId);
            };
            let meta = TxnMetadata {
                producer_id,
                last_producer_id: NO_PRODUCER_ID,
                producer_epoch: 0,
                last_producer_epoch: NO_PRODUCER_EPOCH,
                timeout_ms,
                state: TxnState::Empty,
                partitions: BTreeSet::new(),
                start_ms: -1,
                last_update_ms: now_ms,
            };
            self.ids.insert(
                id.to_owned(),
                Entry {
                    meta: meta.clone(),
                    pending: Some(meta.clone()),
                    fresh: true,
                },
            );
            return Ok(Init::Write(meta));
        };
        if entry.pending.is_some() {
            return Err(ErrorCode::ConcurrentTransactions);
        }
        let meta = &entry.meta;
        if let Some((pid, epoch)) = expected {
            if pid == meta.last_producer_id
                && epoch == meta.last_producer_epoch
                && meta.state == TxnState::Empty
            {
                // Its answer was lost after the bump was written.
                return Ok(Init::Current {
                    producer_id: meta.producer_id,
                    producer_epoch: meta.producer_epoch,
                });
            }
            if pid != meta.producer_id || epoch != meta.producer_epoch {
                return Err(ErrorCode::ProducerFenced);
            }
        }
        match meta.state {
            TxnState::PrepareCommit | TxnState::PrepareAbort | TxnState::PrepareEpochFence => {
                Err(ErrorCode::ConcurrentTransactions)
            }
            TxnState::Ongoing => {
                let mut abort = match meta.bumped(None) {
                    Ok(next) => next,
                    // An exhausted epoch cannot fence: abort under it.
                    Err(_) => meta.clone(),
                };
                abort.state = TxnState::PrepareAbort;
                abort.last_update_ms = now_ms;
                entry.pending = Some(abort.clone());
                Ok(Init::AbortFirst(abort))
            }
            TxnState::Empty | TxnState::CompleteCommit | TxnState::CompleteAbort => {
                let mut next = match meta.bumped(fresh_producer_id) {
                    Ok(next) => next,
                    Err(need) => return Ok(need),
                };
                next.state = TxnState::Empty;
                next.timeout_ms = timeout_ms;
                next.partitions.clear();
                next.start_ms = -1;
                next.last_update_ms = now_ms;
                entry.pending = Some(next.clone());
                Ok(Init::Write(next))
            }
            TxnState::Dead => Err(ErrorCode::ConcurrentTransactions),
        }
    }

    /// The checks every request of a producer in a transaction passes: the
    /// id is known, the producer id is its, the epoch is current, nothing is
    /// pending.
    fn producer_entry(
        &mut self,
        id: &str,
        producer_id: i64,
        epoch: i16,
    ) -> Result<&mut Entry, ErrorCode> {
        let entry = self
            .ids
            .get_mut(id)
            .ok_or(ErrorCode::InvalidProducerIdMapping)?;
        if entry.meta.producer_id != producer_id {
            return Err(ErrorCode::InvalidProducerIdMapping);
        }
        if entry.meta.producer_epoch != epoch {
            return Err(ErrorCode::ProducerFenced);
        }
        if entry.pending.is_some() {
            return Err(ErrorCode::ConcurrentTransactions);
        }
        Ok(entry)
    }

    /// AddPartitionsToTxn with `verify_only` (a partition leader asking,
    /// KIP-890): whether each partition is in `id`'s open transaction, from
    /// its committed state; nothing changes.
    pub fn verify(
        &self,
        id: &str,
        producer_id: i64,
        epoch: i16,
        partitions: &[TopicPartition],
    ) -> Result<Vec<bool>, ErrorCode> {
        let meta = self.get(id).ok_or(ErrorCode::InvalidProducerIdMapping)?;
        if meta.producer_id != producer_id {
            return Err(ErrorCode::InvalidProducerIdMapping);
        }
        if meta.producer_epoch != epoch {
            return Err(ErrorCode::ProducerFenced);
        }
        if meta.state.is_preparing() {
            return Err(ErrorCode::ConcurrentTransactions);
        }
        let open = meta.state == TxnState::Ongoing;
        Ok(partitions
            .iter()
            .map(|p| open && meta.partitions.contains(p))
            .collect())
    }

    /// AddPartitionsToTxn (and AddOffsetsToTxn, with the group's offsets
    /// partition): the state to write, or `None` when every partition is in
    /// the open transaction already.
    pub fn add_partitions(
        &mut self,
        id: &str,
        producer_id: i64,
        epoch: i16,
        partitions: &[TopicPartition],
        now_ms: i64,
    ) -> Result<Option<TxnMetadata>, ErrorCode> {
        let entry = self.producer_entry(id, producer_id, epoch)?;
        let meta = &entry.meta;
        match meta.state {
            TxnState::PrepareCommit | TxnState::PrepareAbort => {
                return Err(ErrorCode::ConcurrentTransactions)
            }
            TxnState::Dead | TxnState::PrepareEpochFence => return Err(ErrorCode::InvalidTxnState),
            TxnState::Ongoing if partitions.iter().all(|p| meta.partitions.contains(p)) => {
                return Ok(None)
            }
            _ => {}
        }
        let mut next = meta.clone();
        if meta.state != TxnState::Ongoing {
            next.partitions.clear();
            next.start_ms = now_ms;
        }
        next.state = TxnState::Ongoing;
        next.partitions.extend(partitions.iter().cloned());
        next.last_update_ms = now_ms;
        entry.pending = Some(next.clone());
        Ok(Some(next))
    }

    /// EndTxn from the producer.
    pub fn end(
        &mut self,
        id: &str,
        producer_id: i64,
        epoch: i16,
        commit: bool,
        now_ms: i64,
    ) -> Result<End, ErrorCode> {
        let entry = self.producer_entry(id, producer_id, epoch)?;
        let meta = &entry.meta;
        let wrong = Err(ErrorCode::InvalidTxnState);
        match (meta.state, commit) {
            (TxnState::Ongoing, _) => {
                let mut next = meta.clone();
                next.state = if commit {
                    TxnState::PrepareCommit
                } else {
                    TxnState::PrepareAbort
                };
                next.last_update_ms = now_ms;
                entry.pending = Some(next.clone());
                Ok(End::Write(next))
            }
            (TxnState::CompleteCommit, true) | (TxnState::CompleteAbort, false) => {
                Ok(End::AlreadyDone)
            }
            (TxnState::PrepareCommit, true) | (TxnState::PrepareAbort, false) => {
                Err(ErrorCode::ConcurrentTransactions)
            }
            _ => wrong,
        }
    }

    /// Transactions open past their timeout, and the PrepareAbort each is
    /// aborted with: the epoch is bumped, so the producer is fenced, and the
    /// transition is pending from now on.
    pub fn expire(&mut self, now_ms: i64) -> Vec<(String, TxnMetadata)> {
        let mut out = Vec::new();
        for (id, entry) in &mut self.ids {
            let meta = &entry.meta;
            let due = meta.state == TxnState::Ongoing
                && entry.pending.is_none()
                && meta.start_ms.saturating_add(i64::from(meta.timeout_ms)) <= now_ms;
            if !due {
                continue;
            }
            let mut abort = meta.bumped(None).unwrap_or_else(|_| meta.clone());
            abort.state = TxnState::PrepareAbort;
            abort.last_update_ms = now_ms;
            entry.pending = Some(abort.clone());
            out.push((id.clone(), abort));
        }
        out
    }

    /// Transactions whose markers were being written when this coordinator
    /// took over (its predecessor stopped between PrepareX and CompleteX):
    /// they are completed now, their markers written again.
    pub fn preparing(&self) -> Vec<(String, TxnMetadata)> {
        self.ids
            .iter()
            .filter(|(_, e)| e.pending.is_none() && e.meta.state.is_preparing())
            .map(|(id, e)| (id.clone(), e.meta.clone()))
            .collect()
    }

    /// The CompleteCommit or CompleteAbort that follows `id`'s markers, now
    /// pending; `None` unless it is preparing.
    pub fn complete_end(&mut self, id: &str, now_ms: i64) -> Option<TxnMetadata> {
        let entry = self.ids.get_mut(id)?;
        if entry.pending.is_some() {
            return None;
        }
        let mut next = entry.meta.clone();
        next.state = match entry.meta.state {
            TxnState::PrepareCommit => TxnState::CompleteCommit,
            TxnState::PrepareAbort => TxnState::CompleteAbort,
            _ => return None,
        };
        next.partitions.clear();
        next.start_ms = -1;
        next.last_update_ms = now_ms;
        entry.pending = Some(next.clone());
        Some(next)
    }

    /// The pending transition of `id` was committed to the log: it is the
    /// state now. `written` must be that transition.
    pub fn complete(&mut self, id: &str, written: &TxnMetadata) -> bool {
        let Some(entry) = self.ids.get_mut(id) else {
            return false;
        };
        if entry.pending.as_ref() != Some(written)
            || !(entry.fresh || written.state.may_follow(entry.meta.state))
        {
            return false;
        }
        entry.meta = written.clone();
        entry.pending = None;
        entry.fresh = false;
        true
    }

    /// The pending transition of `id` could not be written: the state stays
    /// as it was (a transactional id created by it goes).
    pub fn abandon(&mut self, id: &str) {
        let Some(entry) = self.ids.get_mut(id) else {
            return;
        };
        entry.pending = None;
        if entry.fresh {
            // A new id's first transition: it never existed.
            self.ids.remove(id);
        }
    }
}

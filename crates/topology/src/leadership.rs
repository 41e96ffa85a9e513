//! [`Leadership`]: a partition this node leads, for as long as that leadership lasts.

use std::sync::Arc;
use std::time::Duration;

use sluice_log::{AppendResult, LogError, Marker, Partition};
use sluice_vocab::{ErrorCode, KafkaError};
use tokio::sync::watch;
use tokio::time::Instant;

/// One leadership of one partition, from the moment the replication layer takes the
/// role until it gives it up ([`Term::end`]). Every [`Leadership`] handed out under it
/// stops working when it ends.
#[derive(Debug)]
pub struct Term {
    current: watch::Sender<bool>,
}

impl Term {
    /// A term that lasts until [`Term::end`].
    pub fn new() -> Arc<Term> {
        Arc::new(Term {
            current: watch::channel(true).0,
        })
    }

    /// The role is given up: appends are refused and commit waits answer
    /// NOT_LEADER_OR_FOLLOWER from now on. Idempotent.
    pub fn end(&self) {
        self.current.send_replace(false);
    }

    /// Whether the term still lasts.
    pub fn is_current(&self) -> bool {
        *self.current.borrow()
    }
}

/// Why an append through a [`Leadership`] failed.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The leadership ended. NOT_LEADER_OR_FOLLOWER.
    #[error("no longer the leader of this partition")]
    NotLeader,
    /// The storage engine refused the batch (its own code).
    #[error(transparent)]
    Log(#[from] LogError),
}

impl KafkaError for AppendError {
    fn error_code(&self) -> ErrorCode {
        match self {
            AppendError::NotLeader => ErrorCode::NotLeaderOrFollower,
            AppendError::Log(e) => e.error_code(),
        }
    }
}

/// A partition this node leads in `epoch`: appends are stamped with the epoch, and
/// everything stops working once the leadership's [`Term`] ends.
#[derive(Debug, Clone)]
pub struct Leadership {
    partition: Arc<Partition>,
    epoch: i32,
    term: Arc<Term>,
}

impl Leadership {
    /// Handed out by the replication layer while `term` lasts.
    pub fn new(partition: Arc<Partition>, epoch: i32, term: Arc<Term>) -> Leadership {
        Leadership {
            partition,
            epoch,
            term,
        }
    }

    /// The local replica this node leads.
    pub fn partition(&self) -> &Arc<Partition> {
        &self.partition
    }

    /// The leader epoch of this leadership.
    pub fn epoch(&self) -> i32 {
        self.epoch
    }

    /// Whether this node still leads the partition in this epoch.
    pub fn is_current(&self) -> bool {
        self.term.is_current()
    }

    /// Appends producer batches stamped with the leader epoch. Refused once the
    /// leadership is over: a deposed leader never writes into a log it does not lead.
    pub fn append(&self, records: &[u8]) -> Result<AppendResult, AppendError> {
        if !self.is_current() {
            return Err(AppendError::NotLeader);
        }
        Ok(self.partition.append(records, self.epoch)?)
    }

    /// Appends the broker's own control batches (see
    /// [`Partition::append_control`]) while this leadership lasts.
    pub fn append_control(&self, records: &[u8]) -> Result<AppendResult, AppendError> {
        if !self.is_current() {
            return Err(AppendError::NotLeader);
        }
        Ok(self.partition.append_control(records, self.epoch)?)
    }

    /// Appends a transactional producer's batches (see
    /// [`Partition::append_transactional`]) while this leadership lasts.
    pub fn append_transactional(&self, records: &[u8]) -> Result<AppendResult, AppendError> {
        if !self.is_current() {
            return Err(AppendError::NotLeader);
        }
        Ok(self.partition.append_transactional(records, self.epoch)?)
    }

    /// Appends the broker's records written inside a producer's
    /// transaction (see [`Partition::append_in_transaction`]) while this
    /// leadership lasts.
    pub fn append_in_transaction(&self, records: &[u8]) -> Result<AppendResult, AppendError> {
        if !self.is_current() {
            return Err(AppendError::NotLeader);
        }
        Ok(self.partition.append_in_transaction(records, self.epoch)?)
    }

    /// Writes a transaction coordinator's marker (see
    /// [`Partition::append_marker`]) while this leadership lasts.
    pub fn append_marker(
        &self,
        producer_id: i64,
        producer_epoch: i16,
        marker: Marker,
    ) -> Result<AppendResult, AppendError> {
        if !self.is_current() {
            return Err(AppendError::NotLeader);
        }
        Ok(self
            .partition
            .append_marker(producer_id, producer_epoch, marker, self.epoch)?)
    }

    /// Resolves once the high watermark reaches `end_offset` (the records are on
    /// every in-sync replica; on a single node: on its disk). NOT_LEADER_OR_FOLLOWER
    /// when the leadership ends first (the high watermark counts only while it was
    /// raised by this leadership), REQUEST_TIMED_OUT after `timeout`.
    pub async fn wait_committed(
        &self,
        end_offset: i64,
        timeout: Option<Duration>,
    ) -> Result<(), ErrorCode> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut hw = self.partition.watch_high_watermark();
        let mut current = self.term.current.subscribe();
        loop {
            let reached = *hw.borrow_and_update() >= end_offset;
            if !*current.borrow_and_update() {
                return Err(ErrorCode::NotLeaderOrFollower);
            }
            if reached {
                return Ok(());
            }
            let expired = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = hw.changed() => if r.is_err() {
                    return Err(ErrorCode::NotLeaderOrFollower);
                },
                r = current.changed() => if r.is_err() {
                    return Err(ErrorCode::NotLeaderOrFollower);
                },
                _ = expired => return Err(ErrorCode::RequestTimedOut),
            }
        }
    }

    /// Resolves when the leadership ends.
    pub async fn ended(&self) {
        let mut current = self.term.current.subscribe();
        let _ = current.wait_for(|c| !*c).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_log::{FlushPolicy, Store, StoreConfig, TopicConfig};

    /// One RecordBatch v2 holding one record without key or value.
    fn batch() -> Vec<u8> {
        let record = [12u8, 0, 0, 0, 1, 1, 0];
        let mut b = vec![0u8; 61];
        let batch_length = i32::try_from(61 - 12 + record.len()).unwrap();
        b[8..12].copy_from_slice(&batch_length.to_be_bytes());
        b[16] = 2;
        b[43..51].copy_from_slice(&(-1i64).to_be_bytes());
        b[51..53].copy_from_slice(&(-1i16).to_be_bytes());
        b[53..57].copy_from_slice(&(-1i32).to_be_bytes());
        b[57..61].copy_from_slice(&1i32.to_be_bytes());
        b.extend_from_slice(&record);
        let crc = crc32c::crc32c(&b[21..]);
        b[17..21].copy_from_slice(&crc.to_be_bytes());
        b
    }

    #[tokio::test]
    async fn appends_and_commit_waits_stop_when_the_term_ends() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(StoreConfig {
            data_dir: dir.path().to_owned(),
            defaults: TopicConfig::default(),
            flush: FlushPolicy::Always,
            cleaner: Default::default(),
        })
        .unwrap();
        store
            .create_topic("t", 1, &Default::default(), false)
            .unwrap();
        let partition = store.partition("t", 0).unwrap();
        partition.set_replicated(true);
        let term = Term::new();
        let lead = Leadership::new(partition.clone(), 3, term.clone());
        let appended = lead.append(&batch()).unwrap();
        assert_eq!(partition.latest_epoch(), 3, "stamped with the leader epoch");
        // Nobody raised the high watermark: the wait times out.
        let waited = lead
            .wait_committed(appended.end_offset, Some(Duration::from_millis(50)))
            .await;
        assert_eq!(waited, Err(ErrorCode::RequestTimedOut));
        partition.wait_durable(appended.end_offset).await.unwrap();
        partition.advance_high_watermark(appended.end_offset);
        assert_eq!(lead.wait_committed(appended.end_offset, None).await, Ok(()));

        let waiting = {
            let lead = lead.clone();
            tokio::spawn(async move { lead.wait_committed(i64::MAX, None).await })
        };
        term.end();
        assert_eq!(waiting.await.unwrap(), Err(ErrorCode::NotLeaderOrFollower));
        assert!(matches!(lead.append(&batch()), Err(AppendError::NotLeader)));
        assert!(!lead.is_current());
        lead.ended().await;
    }
}

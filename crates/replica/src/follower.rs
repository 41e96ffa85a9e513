//! The follower's fetcher: one task per followed partition.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sluice_cluster::{BrokerId, MetadataImage};
use sluice_log::{LogError, Partition};
use sluice_vocab::ErrorCode;
use tokio::sync::watch;

use crate::transport::{FetchArgs, LeaderConnector, LeaderTransport, TransportError};

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Everything one fetcher needs. The task is aborted (and joined) on a role change.
pub(crate) struct Fetcher {
    pub(crate) me: BrokerId,
    pub(crate) topic: String,
    pub(crate) index: i32,
    pub(crate) partition: Arc<Partition>,
    pub(crate) leader: BrokerId,
    pub(crate) epoch: i32,
    pub(crate) max_bytes: usize,
    pub(crate) max_wait: Duration,
    pub(crate) connector: Arc<dyn LeaderConnector>,
    pub(crate) images: watch::Receiver<Arc<MetadataImage>>,
}

#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("leader answered {0}")]
    Leader(ErrorCode),
    #[error("local log: {0}")]
    Log(#[from] LogError),
    #[error("leader {0} has no address in the image")]
    NoAddress(BrokerId),
    #[error("the log end moved under the fetcher ({expected} -> {got})")]
    Moved { expected: i64, got: i64 },
}

/// Where the follower reaches broker `id`: its replica address when the image has one,
/// else its advertised Kafka address.
fn replica_addr(image: &MetadataImage, id: BrokerId) -> Option<String> {
    let b = image.brokers.get(&id)?;
    if b.replica_addr.is_empty() {
        // Registered by a node that predates replica addresses.
        Some(format!("{}:{}", b.kafka_host, b.kafka_port))
    } else {
        Some(b.replica_addr.clone())
    }
}

impl Fetcher {
    pub(crate) async fn run(self) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let err = self.session(&mut backoff).await;
            tracing::debug!(
                node = self.me,
                topic = %self.topic,
                partition = self.index,
                leader = self.leader,
                error = %err,
                "follower session ended; reconnecting"
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One connection: truncate, then fetch until something fails.
    async fn session(&self, backoff: &mut Duration) -> FetchError {
        let addr = {
            let image = self.images.borrow();
            replica_addr(&image, self.leader)
        };
        let Some(addr) = addr else {
            return FetchError::NoAddress(self.leader);
        };
        let mut t = match self.connector.connect(self.leader, &addr).await {
            Ok(t) => t,
            Err(e) => return e.into(),
        };
        if let Err(e) = self.truncate(t.as_mut()).await {
            return e;
        }
        let mut expected_end = self.partition.log_end_offset();
        loop {
            match self.fetch_once(t.as_mut(), expected_end).await {
                Ok(end) => {
                    expected_end = end;
                    *backoff = BACKOFF_MIN;
                }
                Err(e) => return e,
            }
        }
    }

    /// Truncation on becoming follower (Kafka's OffsetForLeaderEpoch protocol).
    async fn truncate(&self, t: &mut dyn LeaderTransport) -> Result<(), FetchError> {
        let p = &self.partition;
        let leo = p.log_end_offset();
        if leo <= p.log_start_offset() {
            return Ok(());
        }
        let latest = p.latest_epoch();
        let target = if latest < 0 {
            p.high_watermark()
        } else {
            let ans = t
                .end_offset_for_epoch(&self.topic, self.index, self.epoch, latest)
                .await?;
            if let Some(code) = ans.error {
                return Err(FetchError::Leader(code));
            }
            if ans.leader_epoch < 0 || ans.end_offset < 0 {
                p.high_watermark()
            } else if ans.leader_epoch < latest {
                let (_, own_end) = p.end_offset_for_epoch(ans.leader_epoch);
                if own_end >= 0 {
                    ans.end_offset.min(own_end)
                } else {
                    ans.end_offset
                }
            } else {
                ans.end_offset
            }
        };
        if target < leo {
            tracing::info!(
                node = self.me,
                topic = %self.topic,
                partition = self.index,
                from = leo,
                to = target,
                "truncating divergent suffix before following"
            );
            p.truncate_to(target)?;
        }
        Ok(())
    }

    /// One fetch round; returns the new log end.
    async fn fetch_once(
        &self,
        t: &mut dyn LeaderTransport,
        expected_end: i64,
    ) -> Result<i64, FetchError> {
        let p = &self.partition;
        let offset = p.log_end_offset();
        if offset != expected_end {
            // Something else wrote (a produce that raced the role change): truncate again.
            return Err(FetchError::Moved {
                expected: expected_end,
                got: offset,
            });
        }
        let args = FetchArgs {
            topic: self.topic.clone(),
            partition: self.index,
            fetch_offset: offset,
            current_leader_epoch: self.epoch,
            last_fetched_epoch: p.latest_epoch(),
            log_start_offset: p.log_start_offset(),
            max_bytes: self.max_bytes,
            max_wait: self.max_wait,
        };
        let ans = t.fetch(&args).await?;
        match ans.error {
            None => {}
            Some(ErrorCode::OffsetOutOfRange) => {
                return self.out_of_range(t, offset, ans.log_start_offset).await
            }
            Some(code) => return Err(FetchError::Leader(code)),
        }
        let records = whole_batches_from(&ans.records, offset);
        let mut end = offset;
        if !records.is_empty() {
            end = p.append_replica(&records)?;
            p.wait_durable(end).await?;
        }
        if ans.high_watermark >= 0 {
            p.advance_high_watermark(ans.high_watermark.min(p.durable_end_offset()));
        }
        // Records the leader deleted (DeleteRecords, retention) go here too,
        // so a failover never brings them back. Bounded by our own high
        // watermark, as Kafka bounds a follower's log start offset.
        let leader_start = ans.log_start_offset.min(p.high_watermark());
        if leader_start > p.log_start_offset() {
            p.delete_records_before(leader_start)?;
        }
        Ok(end)
    }

    /// OFFSET_OUT_OF_RANGE: below the leader's log start, start over there; otherwise
    /// (above the leader's end) truncate again in a new session.
    async fn out_of_range(
        &self,
        t: &mut dyn LeaderTransport,
        offset: i64,
        known_start: i64,
    ) -> Result<i64, FetchError> {
        let start = if known_start >= 0 {
            known_start
        } else {
            t.log_start_offset(&self.topic, self.index, self.epoch)
                .await?
                .map_err(FetchError::Leader)?
        };
        if start >= 0 && offset < start {
            tracing::info!(
                node = self.me,
                topic = %self.topic,
                partition = self.index,
                offset,
                leader_log_start = start,
                "behind the leader's log start; restarting the log there"
            );
            self.partition.truncate_to(start)?;
            return Ok(self.partition.log_end_offset());
        }
        Err(FetchError::Leader(ErrorCode::OffsetOutOfRange))
    }
}

/// The whole record batches of `records` that end at or after `offset` (a leader may
/// start with the batch holding `offset`, and a foreign one may cut the last batch).
fn whole_batches_from(records: &Bytes, offset: i64) -> Bytes {
    const HEADER: usize = 61;
    let mut start = None;
    let mut pos = 0usize;
    while let Some(h) = records.get(pos..pos + HEADER) {
        let base = i64::from_be_bytes(h[0..8].try_into().unwrap_or_default());
        let len = i32::from_be_bytes(h[8..12].try_into().unwrap_or_default());
        let delta = i32::from_be_bytes(h[23..27].try_into().unwrap_or_default());
        let Ok(len) = usize::try_from(len) else { break };
        let size = len + 12;
        if size < HEADER || pos + size > records.len() {
            break;
        }
        if start.is_none() && base + i64::from(delta) >= offset {
            start = Some(pos);
        }
        pos += size;
    }
    match start {
        Some(s) => records.slice(s..pos),
        None => Bytes::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(base: i64, delta: i32, body: usize) -> Vec<u8> {
        let mut b = vec![0u8; 61 + body];
        b[0..8].copy_from_slice(&base.to_be_bytes());
        b[8..12].copy_from_slice(&((49 + body) as i32).to_be_bytes());
        b[23..27].copy_from_slice(&delta.to_be_bytes());
        b
    }

    #[test]
    fn trims_to_whole_batches_from_offset() {
        let mut all = batch(0, 4, 3);
        all.extend(batch(5, 1, 0));
        all.extend(&batch(7, 0, 10)[..30]);
        let all = Bytes::from(all);
        let first = 64;
        let second = 61;
        assert_eq!(whole_batches_from(&all, 0).len(), first + second);
        assert_eq!(whole_batches_from(&all, 4).len(), first + second);
        assert_eq!(whole_batches_from(&all, 5).len(), second);
        assert_eq!(whole_batches_from(&all, 7).len(), 0);
        assert!(whole_batches_from(&Bytes::new(), 0).is_empty());
    }
}

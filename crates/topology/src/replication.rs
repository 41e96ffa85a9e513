//! The leader side of replication, as every transport sees it: one follower fetch of
//! one partition and the answer, one OffsetForLeaderEpoch answer.

use std::time::Duration;

use bytes::Bytes;
use sluice_vocab::ErrorCode;

/// One follower fetch of one partition.
#[derive(Debug, Clone)]
pub struct FetchArgs {
    pub topic: String,
    pub partition: i32,
    /// The follower's log end (= its durable end: it fetches only after its last
    /// append is on disk).
    pub fetch_offset: i64,
    /// The leader epoch of the follower's image.
    pub current_leader_epoch: i32,
    /// The epoch of the follower's last batch (-1 when none).
    pub last_fetched_epoch: i32,
    /// The follower's log start offset (-1 when unknown): a DeleteRecords on the
    /// leader completes once the in-sync followers report they followed it.
    pub log_start_offset: i64,
    /// Bytes asked for.
    pub max_bytes: usize,
    /// How long the leader may hold the request when it has nothing new.
    pub max_wait: Duration,
}

/// The leader's answer to one [`FetchArgs`].
#[derive(Debug, Clone, Default)]
pub struct FetchAnswer {
    /// Why the leader refused the fetch; `None` on success.
    pub error: Option<ErrorCode>,
    /// The leader's high watermark (-1 when unknown).
    pub high_watermark: i64,
    /// The leader's log start offset (-1 when unknown).
    pub log_start_offset: i64,
    /// Stored record batches from `fetch_offset`, as the leader has them.
    pub records: Bytes,
}

impl FetchAnswer {
    /// An error answer without data.
    pub fn error(code: ErrorCode) -> FetchAnswer {
        FetchAnswer {
            error: Some(code),
            high_watermark: -1,
            log_start_offset: -1,
            records: Bytes::new(),
        }
    }
}

/// The leader's answer to OffsetForLeaderEpoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochAnswer {
    /// Why the leader refused; `None` on success.
    pub error: Option<ErrorCode>,
    /// The largest epoch <= the one asked for that the leader knows (-1 when none).
    pub leader_epoch: i32,
    /// The end offset of that epoch on the leader (-1 when unknown).
    pub end_offset: i64,
}

impl EpochAnswer {
    /// An error answer.
    pub fn error(code: ErrorCode) -> EpochAnswer {
        EpochAnswer {
            error: Some(code),
            leader_epoch: -1,
            end_offset: -1,
        }
    }
}

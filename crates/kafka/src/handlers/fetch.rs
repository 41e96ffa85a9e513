//! Fetch: returns the stored batches as `Bytes` slices, never decoding
//! records; long polls on the partitions' high-watermark watches.

use sluice_vocab::KafkaError;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::*;
use sluice_log::{Partition, ReadLimit};
use sluice_vocab::ErrorCode;
use tokio::sync::watch;
use tokio::time::Instant;

use kafka_protocol::messages::fetch_request::FetchPartition;

use super::{leader_partition, topic_name_by_id};
use crate::dispatch::{later, now, Hdr, Outcome};
use crate::server::Ctx;

const READ_COMMITTED: i8 = 1;

/// One pass over every requested partition.
struct Collected {
    response: FetchResponse,
    bytes: usize,
    /// Some partition failed: answer at once, as Kafka does.
    error: bool,
    /// What the long poll waits on, with the value the read saw.
    watched: Vec<Watched>,
}

/// One value a long poll waits on.
struct Watched {
    rx: watch::Receiver<i64>,
    /// The value the read saw: a different one means new data.
    seen: i64,
}

/// The partition a fetch reads and how far.
fn fetch_source(
    ctx: &Ctx,
    req: &FetchRequest,
    version: i16,
    topic: &str,
    fp: &FetchPartition,
) -> Result<(Arc<Partition>, ReadLimit), i16> {
    let Some(c) = &ctx.cluster else {
        let (log, _) = leader_partition(ctx, topic, fp.partition, fp.current_leader_epoch)?;
        return Ok((log, ReadLimit::HighWatermark));
    };
    let replica_id = if version >= 15 {
        req.replica_state.replica_id.0
    } else {
        req.replica_id.0
    };
    if replica_id >= 0 {
        // A follower: its fetch offset is its durable log end, which may
        // move the high watermark; it reads up to our log end.
        let log = c.replicas.on_follower_fetch(
            topic,
            fp.partition,
            replica_id,
            fp.fetch_offset,
            fp.current_leader_epoch,
            fp.log_start_offset,
        )?;
        Ok((log, ReadLimit::LogEnd))
    } else {
        let (log, _) = c
            .replicas
            .leader_for_read(topic, fp.partition, fp.current_leader_epoch)?;
        Ok((log, ReadLimit::HighWatermark))
    }
}

fn read_all(ctx: &Ctx, req: &FetchRequest, version: i16) -> Collected {
    let by_id = version >= 13;
    let response_max = usize::try_from(req.max_bytes).unwrap_or(0);
    let mut bytes = 0usize;
    let mut error = false;
    let mut watched = Vec::new();
    let mut topics = Vec::with_capacity(req.topics.len());
    for topic in &req.topics {
        let resolved: Option<std::borrow::Cow<'_, str>> = if by_id {
            topic_name_by_id(ctx, topic.topic_id).map(Into::into)
        } else {
            Some(topic.topic.0.as_str().into())
        };
        let mut partitions = Vec::with_capacity(topic.partitions.len());
        for fp in &topic.partitions {
            let mut pd = PartitionData::default()
                .with_partition_index(fp.partition)
                .with_high_watermark(-1)
                .with_last_stable_offset(-1)
                .with_log_start_offset(-1)
                .with_aborted_transactions((req.isolation_level == READ_COMMITTED).then(Vec::new))
                .with_records(Some(Bytes::new()));
            let source = match resolved.as_deref() {
                None => Err(ErrorCode::UnknownTopicId.code()),
                Some(name) => fetch_source(ctx, req, version, name, fp),
            };
            let code = match source {
                Err(code) => {
                    if code == ErrorCode::OffsetOutOfRange.code() {
                        // A follower outside our log resets from our log start.
                        if let Some(log) = resolved
                            .as_deref()
                            .and_then(|name| ctx.store.partition(name, fp.partition))
                        {
                            pd.log_start_offset = log.log_start_offset();
                            pd.high_watermark = log.high_watermark();
                            pd.last_stable_offset = pd.high_watermark;
                        }
                    }
                    code
                }
                Ok((log, limit)) => {
                    let partition_max = usize::try_from(fp.partition_max_bytes).unwrap_or(0);
                    let max = partition_max.min(response_max.saturating_sub(bytes));
                    // KIP-74: the first partition with data returns at least one
                    // whole batch, so a batch above the limits cannot stall a consumer.
                    let code = match log.read(fp.fetch_offset, max, bytes == 0, limit) {
                        Ok(read) => {
                            bytes += read.records.len();
                            pd.high_watermark = read.high_watermark;
                            pd.last_stable_offset = read.high_watermark;
                            pd.log_start_offset = read.log_start_offset;
                            pd.records = Some(read.records);
                            if limit == ReadLimit::LogEnd {
                                // A follower also waits for our log end to move.
                                watched.push(Watched {
                                    rx: log.watch_durable_end(),
                                    seen: read.log_end_offset,
                                });
                            }
                            0
                        }
                        Err(err) => err.error_code().code(),
                    };
                    if code != 0 {
                        pd.high_watermark = log.high_watermark();
                        pd.last_stable_offset = pd.high_watermark;
                        pd.log_start_offset = log.log_start_offset();
                    }
                    watched.push(Watched {
                        rx: log.watch_high_watermark(),
                        seen: pd.high_watermark,
                    });
                    code
                }
            };
            if code != 0 {
                error = true;
                pd.error_code = code;
            }
            partitions.push(pd);
        }
        let mut resp = FetchableTopicResponse::default().with_partitions(partitions);
        if by_id {
            resp.topic_id = topic.topic_id;
        } else {
            resp.topic = topic.topic.clone();
        }
        topics.push(resp);
    }
    Collected {
        response: FetchResponse::default().with_responses(topics),
        bytes,
        error,
        watched,
    }
}

pub(crate) fn handle(ctx: &Arc<Ctx>, req: FetchRequest, h: Hdr) -> Outcome {
    let version = h.version;
    // Sessions are optional: answering session 0 makes clients send full
    // requests. An id we never gave out is unknown.
    if version >= 7 && req.session_id != 0 {
        return now(
            h,
            &FetchResponse::default().with_error_code(ErrorCode::FetchSessionIdNotFound.code()),
        );
    }
    let min_bytes = usize::try_from(req.min_bytes).unwrap_or(0);
    let max_wait = Duration::from_millis(u64::try_from(req.max_wait_ms).unwrap_or(0));
    let first = read_all(ctx, &req, version);
    if first.bytes >= min_bytes || first.error || max_wait.is_zero() || first.watched.is_empty() {
        return now(h, &first.response);
    }
    let deadline = Instant::now() + max_wait;
    // Subscribed after the read: a receiver whose value differs from what
    // the read saw means data arrived in between, so read again at once.
    let mut stale = false;
    let mut receivers: Vec<watch::Receiver<i64>> = Vec::with_capacity(first.watched.len());
    for Watched { mut rx, seen } in first.watched {
        if *rx.borrow_and_update() != seen {
            stale = true;
        }
        receivers.push(rx);
    }
    let ctx = ctx.clone();
    later(
        h,
        long_poll(
            ctx,
            req,
            version,
            first.response,
            receivers,
            deadline,
            min_bytes,
            stale,
        ),
    )
}

#[allow(clippy::too_many_arguments)]
async fn long_poll(
    ctx: Arc<Ctx>,
    req: FetchRequest,
    version: i16,
    mut last: FetchResponse,
    mut receivers: Vec<watch::Receiver<i64>>,
    deadline: Instant,
    min_bytes: usize,
    mut stale: bool,
) -> FetchResponse {
    loop {
        if !stale {
            let changed =
                futures::future::select_all(receivers.iter_mut().map(|rx| Box::pin(rx.changed())));
            match tokio::time::timeout_at(deadline, changed).await {
                // Nothing new within max_wait: the last read stands.
                Err(_) => return last,
                // The partition went away (topic deleted): report what is there now.
                Ok((Err(_), _, _)) => return read_all(&ctx, &req, version).response,
                Ok((Ok(()), _, _)) => {}
            }
        }
        stale = false;
        let again = read_all(&ctx, &req, version);
        if again.bytes >= min_bytes || again.error || Instant::now() >= deadline {
            return again.response;
        }
        last = again.response;
    }
}

//! ListOffsets, OffsetForLeaderEpoch, DeleteRecords.

use super::fetch::READ_COMMITTED;
use kafka_protocol::messages::delete_records_response::{
    DeleteRecordsPartitionResult, DeleteRecordsTopicResult,
};
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::offset_for_leader_epoch_response::{
    EpochEndOffset, OffsetForLeaderTopicResult,
};
use kafka_protocol::messages::*;
use kafka_protocol::records::RecordBatchDecoder;
use sluice_log::{Partition, ReadLimit};
use sluice_vocab::ErrorCode;
use sluice_vocab::KafkaError;

use std::time::Duration;

use tokio::time::Instant;

use crate::server::Ctx;

const LATEST: i64 = -1;
const EARLIEST: i64 = -2;

pub(crate) fn list_offsets(
    ctx: &Ctx,
    req: ListOffsetsRequest,
    version: i16,
) -> ListOffsetsResponse {
    let topics = req
        .topics
        .into_iter()
        .map(|topic| {
            let partitions = topic
                .partitions
                .iter()
                .map(|p| {
                    let resp = ListOffsetsPartitionResponse::default()
                        .with_partition_index(p.partition_index)
                        .with_timestamp(-1)
                        .with_offset(-1);
                    let lead = match ctx.topology.lead_for_read(
                        topic.name.0.as_str(),
                        p.partition_index,
                        p.current_leader_epoch,
                    ) {
                        Ok(lead) => lead,
                        Err(code) => return resp.with_error_code(code.code()),
                    };
                    let (log, leader_epoch) = (lead.partition(), lead.epoch());
                    // Read-committed sees up to the last stable offset.
                    let latest = if req.isolation_level == READ_COMMITTED {
                        log.last_stable_offset()
                    } else {
                        log.high_watermark()
                    };
                    let found = match p.timestamp {
                        LATEST => Ok(Some((latest, -1))),
                        EARLIEST => Ok(Some((log.log_start_offset(), -1))),
                        ts if ts >= 0 => log
                            .offset_for_timestamp(ts)
                            .map(|found| found.map(|(offset, t)| exact_record(log, ts, offset, t))),
                        _ => {
                            return resp.with_error_code(ErrorCode::InvalidRequest.code());
                        }
                    };
                    match found {
                        Ok(Some((offset, timestamp))) => {
                            let mut resp = resp.with_offset(offset).with_timestamp(timestamp);
                            if version >= 4 {
                                resp.leader_epoch = leader_epoch;
                            }
                            resp
                        }
                        // No record at or after the timestamp.
                        Ok(None) => resp,
                        Err(err) => resp.with_error_code(err.error_code().code()),
                    }
                })
                .collect();
            ListOffsetsTopicResponse::default()
                .with_name(topic.name)
                .with_partitions(partitions)
        })
        .collect();
    ListOffsetsResponse::default().with_topics(topics)
}

/// The time index finds the batch; Kafka answers with the first *record*
/// at or after the timestamp, so that one batch is decoded (ListOffsets
/// only, never on the produce/fetch path). Falls back to the batch-level
/// answer if the batch cannot be read or decoded.
fn exact_record(log: &Partition, target: i64, offset: i64, timestamp: i64) -> (i64, i64) {
    let Ok(read) = log.read(offset, 1, true, ReadLimit::HighWatermark) else {
        return (offset, timestamp);
    };
    let mut bytes = read.records;
    match RecordBatchDecoder::decode(&mut bytes) {
        Ok(set) => set
            .records
            .iter()
            .find(|r| r.offset >= offset && r.timestamp >= target)
            .map_or((offset, timestamp), |r| (r.offset, r.timestamp)),
        Err(err) => {
            tracing::debug!(error = %err, offset, "cannot decode batch for ListOffsets");
            (offset, timestamp)
        }
    }
}

pub(crate) fn offset_for_leader_epoch(
    ctx: &Ctx,
    req: OffsetForLeaderEpochRequest,
) -> OffsetForLeaderEpochResponse {
    let topics = req
        .topics
        .into_iter()
        .map(|topic| {
            let partitions = topic
                .partitions
                .iter()
                .map(|p| {
                    // Followers ask too (replica_id >= 0), to truncate after a
                    // leader change: the leader side of replication answers both.
                    let answer = ctx.topology.end_offset_for_epoch(
                        topic.topic.0.as_str(),
                        p.partition,
                        p.current_leader_epoch,
                        p.leader_epoch,
                    );
                    EpochEndOffset::default()
                        .with_partition(p.partition)
                        .with_error_code(ErrorCode::of(answer.error.map_or(Ok(()), Err)))
                        .with_leader_epoch(answer.leader_epoch)
                        .with_end_offset(answer.end_offset)
                })
                .collect();
            OffsetForLeaderTopicResult::default()
                .with_topic(topic.topic)
                .with_partitions(partitions)
        })
        .collect();
    OffsetForLeaderEpochResponse::default().with_topics(topics)
}

/// Deletes on the leader, then answers each partition once its low watermark (the
/// smallest log start among the leader and its in-sync followers) has reached the
/// new log start, as Kafka's delayed DeleteRecords does; a partition whose followers
/// do not follow within `timeout_ms` gets REQUEST_TIMED_OUT (the deletion itself
/// stands and completes on the followers' next fetches).
pub(crate) async fn delete_records(ctx: &Ctx, req: DeleteRecordsRequest) -> DeleteRecordsResponse {
    let resp = delete_on_leader(ctx, req.clone());
    let deadline =
        Instant::now() + Duration::from_millis(u64::try_from(req.timeout_ms).unwrap_or(0));
    let mut topics = resp.topics;
    for t in &mut topics {
        for p in &mut t.partitions {
            if p.error_code != 0 {
                continue;
            }
            let target = p.low_watermark;
            loop {
                match ctx
                    .topology
                    .low_watermark(t.name.0.as_str(), p.partition_index)
                {
                    Ok(low) if low >= target => {
                        p.low_watermark = low;
                        break;
                    }
                    Ok(_) if Instant::now() < deadline => {
                        tokio::time::sleep(LOW_WATERMARK_POLL).await;
                    }
                    Ok(_) => {
                        p.error_code = ErrorCode::RequestTimedOut.code();
                        break;
                    }
                    Err(code) => {
                        p.error_code = code.code();
                        break;
                    }
                }
            }
        }
    }
    DeleteRecordsResponse::default().with_topics(topics)
}

/// How often a replicated DeleteRecords looks at the followers' log starts.
const LOW_WATERMARK_POLL: Duration = Duration::from_millis(20);

fn delete_on_leader(ctx: &Ctx, req: DeleteRecordsRequest) -> DeleteRecordsResponse {
    let topics = req
        .topics
        .into_iter()
        .map(|topic| {
            let partitions = topic
                .partitions
                .iter()
                .map(|p| {
                    let resp = DeleteRecordsPartitionResult::default()
                        .with_partition_index(p.partition_index)
                        .with_low_watermark(-1);
                    let lead = match ctx.topology.lead_for_read(
                        topic.name.0.as_str(),
                        p.partition_index,
                        -1,
                    ) {
                        Ok(lead) => lead,
                        Err(code) => return resp.with_error_code(code.code()),
                    };
                    match lead.partition().delete_records_before(p.offset) {
                        Ok(low) => {
                            tracing::info!(topic = %topic.name.0.as_str(), partition = p.partition_index,
                                log_start_offset = low, "deleted records");
                            resp.with_low_watermark(low)
                        }
                        Err(err) => resp.with_error_code(err.error_code().code()),
                    }
                })
                .collect();
            DeleteRecordsTopicResult::default()
                .with_name(topic.name)
                .with_partitions(partitions)
        })
        .collect();
    DeleteRecordsResponse::default().with_topics(topics)
}

//! Produce: record batches go to `Partition::append` exactly as received
//! (the store validates them); the response waits for durability.

use sluice_vocab::KafkaError;
use std::sync::Arc;
use std::time::Duration;

use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::*;
use sluice_log::Partition;
use sluice_vocab::ErrorCode;

use super::{str_bytes, topic_or_create, LEADER_EPOCH};
use crate::cluster::{ProduceLeader, Replicas};
use crate::dispatch::{later, now, Hdr, Outcome};
use crate::server::Ctx;

/// An appended partition whose acknowledgement waits for durability.
struct Wait {
    topic: usize,
    partition: usize,
    log: Arc<Partition>,
    end_offset: i64,
    /// Cluster mode: the leadership the batch was appended under.
    leader: Option<ProduceLeader>,
}

/// Appends one partition's records; the wait for its acknowledgement is
/// pushed to `waits`.
#[allow(clippy::too_many_arguments)]
fn append(
    h: Hdr,
    name: &str,
    index: i32,
    records: &Option<bytes::Bytes>,
    log: Arc<Partition>,
    leader: Option<ProduceLeader>,
    replicas: Option<&dyn Replicas>,
    at: (usize, usize),
    resp: &mut PartitionProduceResponse,
    waits: &mut Vec<Wait>,
) -> Result<(), (i16, String)> {
    let Some(records) = records else {
        return Err((ErrorCode::CorruptMessage.code(), "no records".into()));
    };
    let appended = match (&leader, replicas) {
        (Some(leader), Some(replicas)) => replicas.append(leader, records),
        _ => log
            .append(records, LEADER_EPOCH)
            .map_err(|err| (err.error_code().code(), err.to_string())),
    };
    match appended {
        Ok(appended) => {
            resp.base_offset = appended.base_offset;
            resp.log_start_offset = appended.log_start_offset;
            waits.push(Wait {
                topic: at.0,
                partition: at.1,
                log,
                end_offset: appended.end_offset,
                leader,
            });
            Ok(())
        }
        Err((code, message)) => {
            tracing::debug!(peer = %h.peer, topic = name, partition = index,
                error = %message, "produce rejected");
            Err((code, message))
        }
    }
}

pub(crate) fn handle(ctx: &Arc<Ctx>, req: ProduceRequest, h: Hdr) -> Outcome {
    let acks = req.acks;
    let timeout_ms = req.timeout_ms;
    let acks_valid = matches!(acks, -1..=1);
    let transactional = req
        .transactional_id
        .as_ref()
        .is_some_and(|t| !t.0.is_empty());
    let mut waits = Vec::new();
    let mut failed = false;
    let mut responses = Vec::with_capacity(req.topic_data.len());
    for (ti, topic) in req.topic_data.into_iter().enumerate() {
        let name = topic.name.0.as_str();
        // Looked up (and auto-created) only when a partition is unknown, so
        // the common path costs one map lookup per partition.
        let mut known: Option<Result<(), i16>> = None;
        let mut partitions = Vec::with_capacity(topic.partition_data.len());
        for (pi, data) in topic.partition_data.into_iter().enumerate() {
            let mut resp = PartitionProduceResponse::default()
                .with_index(data.index)
                .with_base_offset(-1)
                .with_log_append_time_ms(-1)
                .with_log_start_offset(-1);
            let outcome: Result<(), (i16, String)> = if !acks_valid {
                Err((
                    ErrorCode::InvalidRequiredAcks.code(),
                    format!("acks {acks} is not -1, 0 or 1"),
                ))
            } else if name.starts_with("__") {
                // Internal topics (committed offsets) are written by the
                // broker only; a client's bytes there could break replay.
                Err((
                    ErrorCode::InvalidTopicException.code(),
                    format!("cannot produce to internal topic {name}"),
                ))
            } else if transactional {
                Err((
                    ErrorCode::TransactionalIdAuthorizationFailed.code(),
                    "transactions are not supported".into(),
                ))
            } else if let Some(c) = &ctx.cluster {
                match c.replicas.leader_for_produce(name, data.index, acks == -1) {
                    Ok(leader) => append(
                        h,
                        name,
                        data.index,
                        &data.records,
                        leader.partition.clone(),
                        Some(leader),
                        Some(c.replicas.as_ref()),
                        (ti, pi),
                        &mut resp,
                        &mut waits,
                    ),
                    Err(code) => {
                        if code == ErrorCode::UnknownTopicOrPartition.code() && known.is_none() {
                            // Created in the background; the client retries.
                            super::cluster_meta::auto_create_in_background(ctx, c, name);
                            known = Some(Err(code));
                        }
                        Err((code, format!("cannot produce to {name}-{}", data.index)))
                    }
                }
            } else {
                let mut log = ctx.store.partition(name, data.index);
                if log.is_none() && known.is_none() {
                    let created = topic_or_create(ctx, name, true).map(|_| ());
                    if created.is_ok() {
                        log = ctx.store.partition(name, data.index);
                    }
                    known = Some(created);
                }
                match (&known, log) {
                    (Some(Err(code)), _) => Err((*code, format!("unknown topic {name}"))),
                    (_, None) => Err((
                        ErrorCode::UnknownTopicOrPartition.code(),
                        format!("unknown partition {name}-{}", data.index),
                    )),
                    (_, Some(log)) => append(
                        h,
                        name,
                        data.index,
                        &data.records,
                        log,
                        None,
                        None,
                        (ti, pi),
                        &mut resp,
                        &mut waits,
                    ),
                }
            };
            if let Err((code, message)) = outcome {
                failed = true;
                resp.error_code = code;
                if h.version >= 8 {
                    resp.error_message = Some(str_bytes(&message));
                }
            }
            partitions.push(resp);
        }
        responses.push(
            TopicProduceResponse::default()
                .with_name(topic.name)
                .with_partition_responses(partitions),
        );
    }
    let resp = ProduceResponse::default().with_responses(responses);
    if acks == 0 {
        // Nobody waits for the answer, but the data must still be flushed
        // under the flush policy: that is what moves the high watermark and
        // makes it visible to consumers.
        if !waits.is_empty() {
            tokio::spawn(async move {
                for wait in waits {
                    if let Err(err) = wait.log.wait_durable(wait.end_offset).await {
                        tracing::warn!(error = %err, "acks=0 produce not made durable");
                    }
                }
            });
        }
        // No response; like Kafka, close on failure so the client notices.
        if failed {
            tracing::info!(peer = %h.peer, "closing connection after a failed acks=0 produce");
            return Outcome::Close;
        }
        return Outcome::NoResponse;
    }
    if waits.is_empty() {
        return now(h, &resp);
    }
    let replicated = match (&ctx.cluster, acks) {
        (Some(c), -1) => Some((
            c.replicas.clone(),
            Duration::from_millis(u64::try_from(timeout_ms).unwrap_or(0)),
        )),
        _ => None,
    };
    later(h, acknowledge(resp, waits, replicated))
}

/// Waits until every appended partition is durable (acks=1) or, in cluster
/// mode with acks=all, replicated to the ISR (the high watermark passed the
/// batch); a partition that fails is answered with its error instead of an
/// offset.
async fn acknowledge(
    mut resp: ProduceResponse,
    waits: Vec<Wait>,
    replicated: Option<(Arc<dyn Replicas>, Duration)>,
) -> ProduceResponse {
    let results = futures::future::join_all(waits.iter().map(|w| async {
        match (&replicated, &w.leader) {
            (Some((replicas, timeout)), Some(leader)) => {
                replicas
                    .wait_replicated(leader, w.end_offset, *timeout)
                    .await
            }
            _ => w
                .log
                .wait_durable(w.end_offset)
                .await
                .map_err(|err| err.error_code().code()),
        }
    }))
    .await;
    for (wait, result) in waits.iter().zip(results) {
        if let Err(code) = result {
            if let Some(p) = resp
                .responses
                .get_mut(wait.topic)
                .and_then(|t| t.partition_responses.get_mut(wait.partition))
            {
                p.error_code = code;
                p.base_offset = -1;
            }
        }
    }
    resp
}

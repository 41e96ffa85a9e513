//! Produce: record batches go to `Partition::append` exactly as received
//! (the store validates them); the response waits for durability.

use std::sync::Arc;

use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::*;
use kafka_protocol::ResponseError;
use sluice_log::Partition;

use super::{str_bytes, topic_or_create, LEADER_EPOCH};
use crate::dispatch::{later, now, Hdr, Outcome};
use crate::server::Ctx;

/// An appended partition whose acknowledgement waits for durability.
struct Wait {
    topic: usize,
    partition: usize,
    log: Arc<Partition>,
    end_offset: i64,
}

pub(crate) fn handle(ctx: &Arc<Ctx>, req: ProduceRequest, h: Hdr) -> Outcome {
    let acks = req.acks;
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
                    ResponseError::InvalidRequiredAcks.code(),
                    format!("acks {acks} is not -1, 0 or 1"),
                ))
            } else if name.starts_with("__") {
                // Internal topics (committed offsets) are written by the
                // broker only; a client's bytes there could break replay.
                Err((
                    ResponseError::InvalidTopicException.code(),
                    format!("cannot produce to internal topic {name}"),
                ))
            } else if transactional {
                Err((
                    ResponseError::TransactionalIdAuthorizationFailed.code(),
                    "transactions are not supported".into(),
                ))
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
                        ResponseError::UnknownTopicOrPartition.code(),
                        format!("unknown partition {name}-{}", data.index),
                    )),
                    (_, Some(log)) => match &data.records {
                        None => Err((ResponseError::CorruptMessage.code(), "no records".into())),
                        Some(records) => match log.append(records, LEADER_EPOCH) {
                            Ok(appended) => {
                                resp.base_offset = appended.base_offset;
                                resp.log_start_offset = appended.log_start_offset;
                                waits.push(Wait {
                                    topic: ti,
                                    partition: pi,
                                    log,
                                    end_offset: appended.end_offset,
                                });
                                Ok(())
                            }
                            Err(err) => {
                                tracing::debug!(peer = %h.peer, topic = name, partition = data.index,
                                    error = %err, "produce rejected");
                                Err((crate::errors::code(&err), err.to_string()))
                            }
                        },
                    },
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
    later(h, acknowledge(resp, waits))
}

/// Waits until every appended partition is durable; a partition that cannot
/// be made durable is answered with its storage error instead of an offset.
async fn acknowledge(mut resp: ProduceResponse, waits: Vec<Wait>) -> ProduceResponse {
    let results =
        futures::future::join_all(waits.iter().map(|w| w.log.wait_durable(w.end_offset))).await;
    for (wait, result) in waits.iter().zip(results) {
        if let Err(err) = result {
            let code = crate::errors::code(&err);
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

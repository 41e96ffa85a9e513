//! Produce: record batches go to the partition leader's
//! [`Leadership::append`] exactly as received, once their records passed
//! [`crate::records::validate`] (the store checks headers and CRCs); the
//! response waits for durability (acks=1) or for the high watermark (acks=all).

use std::sync::Arc;
use std::time::Duration;

use kafka_protocol::messages::produce_response::{
    BatchIndexAndErrorMessage, LeaderIdAndEpoch, NodeEndpoint, PartitionProduceResponse,
    TopicProduceResponse,
};
use kafka_protocol::messages::*;
use sluice_topology::Leadership;
use sluice_vocab::internal::is_internal;
use sluice_vocab::{ErrorCode, KafkaError, Refused};

use super::str_bytes;
use crate::dispatch::{later, now, Hdr, Outcome};
use crate::quotas::Flow;
use crate::server::Ctx;

/// An appended partition whose acknowledgement waits.
struct Wait {
    topic: usize,
    partition: usize,
    leadership: Leadership,
    end_offset: i64,
}

/// Appends one partition's records under `leadership`; the wait for its
/// acknowledgement is pushed to `waits`.
fn append(
    ctx: &Ctx,
    records: &Option<bytes::Bytes>,
    transactional: bool,
    leadership: Leadership,
    at: (usize, usize),
    resp: &mut PartitionProduceResponse,
    waits: &mut Vec<Wait>,
) -> Result<(), Refused> {
    let Some(records) = records else {
        return Err(Refused::new(ErrorCode::CorruptMessage, "no records"));
    };
    if *ctx.disk_low.borrow() {
        return Err(Refused::new(
            ErrorCode::KafkaStorageError,
            "free disk space is below the broker's limit; retry once space is freed",
        ));
    }
    let limits = crate::records::RecordLimits {
        max_decompressed: ctx.config.max_decompressed_batch_bytes,
        keys_required: leadership.partition().compacted(),
        timestamp_window: leadership
            .partition()
            .timestamp_window(sluice_vocab::now_ms()),
    };
    if let Err(fault) = crate::records::validate(records, limits) {
        if let Some(index) = fault.record {
            resp.record_errors = vec![BatchIndexAndErrorMessage::default()
                .with_batch_index(index)
                .with_batch_index_error_message(Some(str_bytes(&fault.message)))];
        }
        return Err(fault.refused());
    }
    let appended = if transactional {
        leadership.append_transactional(records)
    } else {
        leadership.append(records)
    }
    .map_err(|e| Refused::from_error(&e))?;
    resp.base_offset = appended.base_offset;
    resp.log_start_offset = appended.log_start_offset;
    resp.log_append_time_ms = appended.log_append_time_ms;
    waits.push(Wait {
        topic: at.0,
        partition: at.1,
        leadership,
        end_offset: appended.end_offset,
    });
    Ok(())
}

/// Why a partition of this request is refused before anything is appended.
fn refusal(acks: i16, name: &str, transactional: bool) -> Option<Refused> {
    if !matches!(acks, -1..=1) {
        return Some(Refused::new(
            ErrorCode::InvalidRequiredAcks,
            format!("acks {acks} is not -1, 0 or 1"),
        ));
    }
    if is_internal(name) {
        // Internal topics (committed offsets) are written by the broker only; a
        // client's bytes there could break replay.
        return Some(Refused::new(
            ErrorCode::InvalidTopicException,
            format!("cannot produce to internal topic {name}"),
        ));
    }
    if transactional && acks != -1 {
        return Some(Refused::new(
            ErrorCode::InvalidRequiredAcks,
            "a transactional producer must use acks=all",
        ));
    }
    None
}

pub(crate) fn handle(ctx: &Arc<Ctx>, req: ProduceRequest, h: Hdr) -> Outcome {
    let acks = req.acks;
    let timeout_ms = req.timeout_ms;
    let transactional = req
        .transactional_id
        .as_ref()
        .is_some_and(|t| !t.0.is_empty());
    let mut waits = Vec::new();
    let mut failed = false;
    let mut responses = Vec::with_capacity(req.topic_data.len());
    let sent: usize = req
        .topic_data
        .iter()
        .flat_map(|t| &t.partition_data)
        .map(|p| p.records.as_ref().map_or(0, |r| r.len()))
        .sum();
    for (ti, topic) in req.topic_data.into_iter().enumerate() {
        let name = topic.name.0.as_str();
        let refused = refusal(acks, name, transactional);
        // Auto-creation is asked for once per topic of the request.
        let mut creating = false;
        let mut partitions = Vec::with_capacity(topic.partition_data.len());
        for (pi, data) in topic.partition_data.into_iter().enumerate() {
            let mut resp = PartitionProduceResponse::default()
                .with_index(data.index)
                .with_base_offset(-1)
                .with_log_append_time_ms(-1)
                .with_log_start_offset(-1);
            let outcome = match &refused {
                Some(refused) => Err(refused.clone()),
                None => match ctx.topology.lead_for_produce(name, data.index, acks == -1) {
                    Ok(leadership) => append(
                        ctx,
                        &data.records,
                        transactional,
                        leadership,
                        (ti, pi),
                        &mut resp,
                        &mut waits,
                    ),
                    Err(code) => {
                        if code == ErrorCode::UnknownTopicOrPartition && !creating {
                            // Created in the background; the client retries.
                            super::meta::auto_create_in_background(ctx, name);
                            creating = true;
                        }
                        Err(Refused::new(
                            code,
                            format!("cannot produce to {name}-{}", data.index),
                        ))
                    }
                },
            };
            if let Err(refused) = outcome {
                tracing::debug!(peer = %h.peer, topic = name, partition = data.index,
                    error = %refused, "produce rejected");
                failed = true;
                resp.error_code = refused.code.code();
                if h.version >= 8 {
                    resp.error_message = Some(str_bytes(&refused.message));
                } else {
                    // Not in the older response schemas.
                    resp.record_errors.clear();
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
    let client = crate::connection::CLIENT.try_with(Arc::clone).ok();
    let throttle_ms = crate::quotas::throttle(ctx, client.as_deref(), Flow::Produce, sent, false);
    let mut resp = ProduceResponse::default()
        .with_responses(responses)
        .with_throttle_time_ms(throttle_ms);
    if failed && h.version >= 10 {
        add_leader_hints(ctx, &mut resp);
    }
    if acks == 0 {
        // Nobody waits for the answer, but the data must still be flushed under the
        // flush policy: that is what moves the high watermark and makes it visible to
        // consumers.
        if !waits.is_empty() {
            tokio::spawn(async move {
                for wait in waits {
                    if let Err(err) = wait
                        .leadership
                        .partition()
                        .wait_durable(wait.end_offset)
                        .await
                    {
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
    let commit_timeout =
        (acks == -1).then(|| Duration::from_millis(u64::try_from(timeout_ms).unwrap_or(0)));
    later(h, acknowledge(resp, waits, commit_timeout))
}

/// KIP-951: each partition refused because another node leads it names
/// that leader and its epoch, and the response lists those leaders'
/// endpoints.
fn add_leader_hints(ctx: &Ctx, resp: &mut ProduceResponse) {
    let image = ctx.topology.image();
    let mut endpoints: Vec<NodeEndpoint> = Vec::new();
    for topic in &mut resp.responses {
        for p in &mut topic.partition_responses {
            if !super::leads_elsewhere(p.error_code) {
                continue;
            }
            let Some(hint) = super::leader_hint(ctx, &image, topic.name.0.as_str(), p.index) else {
                continue;
            };
            p.current_leader = LeaderIdAndEpoch::default()
                .with_leader_id(BrokerId(hint.id))
                .with_leader_epoch(hint.epoch);
            if !endpoints.iter().any(|e| e.node_id.0 == hint.id) {
                endpoints.push(
                    NodeEndpoint::default()
                        .with_node_id(BrokerId(hint.id))
                        .with_host(str_bytes(&hint.host))
                        .with_port(hint.port),
                );
            }
        }
    }
    resp.node_endpoints = endpoints;
}

/// Waits until every appended partition is durable (acks=1) or committed, the high
/// watermark past the batch (acks=all, bounded by `commit_timeout`); a partition
/// that fails is answered with its error instead of an offset.
async fn acknowledge(
    mut resp: ProduceResponse,
    waits: Vec<Wait>,
    commit_timeout: Option<Duration>,
) -> ProduceResponse {
    let results = futures::future::join_all(waits.iter().map(|w| async {
        match commit_timeout {
            Some(timeout) => {
                w.leadership
                    .wait_committed(w.end_offset, Some(timeout))
                    .await
            }
            None => w
                .leadership
                .partition()
                .wait_durable(w.end_offset)
                .await
                .map_err(|err| err.error_code()),
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
                p.error_code = code.code();
                p.base_offset = -1;
            }
        }
    }
    resp
}

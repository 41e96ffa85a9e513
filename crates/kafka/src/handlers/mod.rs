//! Request handlers, one module per area.

pub(crate) mod cluster_admin;
pub(crate) mod cluster_meta;
pub(crate) mod configs;
pub(crate) mod fetch;
pub(crate) mod meta;
pub(crate) mod offsets;
pub(crate) mod produce;
pub(crate) mod topics;
pub(crate) mod unsupported;

use kafka_protocol::messages::TopicName;
use kafka_protocol::protocol::StrBytes;
use sluice_vocab::KafkaError;
use std::sync::Arc;

use sluice_log::{LogError, Partition, TopicInfo};
use sluice_vocab::ErrorCode;
use uuid::Uuid;

use crate::server::Ctx;

/// The leader epoch of every partition: a single node is leader from the
/// start and never changes (replication will bump it).
pub(crate) const LEADER_EPOCH: i32 = 0;

pub(crate) fn str_bytes(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_owned())
}

pub(crate) fn topic_name(s: &str) -> TopicName {
    TopicName(str_bytes(s))
}

pub(crate) fn topic_uuid(info: &TopicInfo) -> Uuid {
    Uuid::from_bytes(info.id)
}

/// The topic with this id, if any.
pub(crate) fn topic_by_id(ctx: &Ctx, id: Uuid) -> Option<TopicInfo> {
    if id.is_nil() {
        return None;
    }
    let id = *id.as_bytes();
    let cached = ctx.topic_ids.read().get(&id).cloned();
    if let Some(name) = cached {
        match ctx.store.topic(&name) {
            Some(info) if info.id == id => return Some(info),
            // Deleted, or deleted and created again with a new id.
            _ => {
                ctx.topic_ids.write().remove(&id);
            }
        }
    }
    let topics = ctx.store.topics();
    let mut cache = ctx.topic_ids.write();
    cache.clear();
    let mut found = None;
    for info in topics {
        cache.insert(info.id, info.name.clone());
        if info.id == id {
            found = Some(info);
        }
    }
    found
}

/// The topic, created with the default partition count when unknown and
/// `allow` (the request's wish) and the broker's auto-create setting agree.
pub(crate) fn topic_or_create(ctx: &Ctx, name: &str, allow: bool) -> Result<TopicInfo, i16> {
    if let Some(info) = ctx.store.topic(name) {
        return Ok(info);
    }
    if !(allow && ctx.config.auto_create_topics) {
        return Err(ErrorCode::UnknownTopicOrPartition.code());
    }
    let none = std::collections::BTreeMap::new();
    match ctx
        .store
        .create_topic(name, ctx.config.default_partitions.max(1), &none, false)
    {
        Ok(info) => {
            tracing::info!(
                topic = name,
                partitions = info.partitions,
                "auto-created topic"
            );
            Ok(info)
        }
        // Another connection created it first.
        Err(LogError::TopicAlreadyExists(_)) => ctx
            .store
            .topic(name)
            .ok_or(ErrorCode::UnknownTopicOrPartition.code()),
        Err(err) => Err(err.error_code().code()),
    }
}

/// Error for a request's current leader epoch: -1 (unknown) and ours pass.
pub(crate) fn leader_epoch_error(current_leader_epoch: i32) -> i16 {
    if current_leader_epoch < 0 || current_leader_epoch == LEADER_EPOCH {
        0
    } else if current_leader_epoch > LEADER_EPOCH {
        ErrorCode::UnknownLeaderEpoch.code()
    } else {
        ErrorCode::FencedLeaderEpoch.code()
    }
}

/// The name of the topic with this id: from the metadata image in cluster
/// mode (this node need not host it), from the store otherwise.
pub(crate) fn topic_name_by_id(ctx: &Ctx, id: Uuid) -> Option<String> {
    match &ctx.cluster {
        Some(c) => {
            if id.is_nil() {
                return None;
            }
            let id = *id.as_bytes();
            let image = c.replicas.image();
            let found = image
                .topics
                .iter()
                .find(|(_, t)| t.topic_id == id)
                .map(|(name, _)| name.clone());
            found
        }
        None => topic_by_id(ctx, id).map(|info| info.name),
    }
}

/// The partition and its leader epoch for a read that only the leader
/// serves (consumer fetch, ListOffsets, OffsetForLeaderEpoch,
/// DeleteRecords). A single node leads everything in epoch 0.
pub(crate) fn leader_partition(
    ctx: &Ctx,
    topic: &str,
    partition: i32,
    current_leader_epoch: i32,
) -> Result<(Arc<Partition>, i32), i16> {
    match &ctx.cluster {
        Some(c) => c
            .replicas
            .leader_for_read(topic, partition, current_leader_epoch),
        None => {
            let log = ctx
                .store
                .partition(topic, partition)
                .ok_or(ErrorCode::UnknownTopicOrPartition.code())?;
            match leader_epoch_error(current_leader_epoch) {
                0 => Ok((log, LEADER_EPOCH)),
                code => Err(code),
            }
        }
    }
}

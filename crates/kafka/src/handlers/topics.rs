//! CreateTopics, DeleteTopics, CreatePartitions.

use sluice_vocab::KafkaError;
use std::collections::{BTreeMap, HashSet};

use kafka_protocol::messages::create_partitions_response::CreatePartitionsTopicResult;
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::create_topics_response::{
    CreatableTopicConfigs, CreatableTopicResult,
};
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::*;
use sluice_log::{LogError, TopicInfo};
use sluice_vocab::ErrorCode;

use super::{str_bytes, topic_by_id, topic_uuid};
use crate::server::Ctx;

/// DescribeConfigs/CreateTopics config sources.
pub(crate) const SOURCE_TOPIC_CONFIG: i8 = 1;
pub(crate) const SOURCE_DEFAULT_CONFIG: i8 = 5;

fn error_result(name: TopicName, code: i16, message: String) -> CreatableTopicResult {
    CreatableTopicResult::default()
        .with_name(name)
        .with_error_code(code)
        .with_error_message(Some(str_bytes(&message)))
        .with_num_partitions(-1)
        .with_replication_factor(-1)
}

/// Partition count of a CreateTopics entry, or an error.
fn partition_count(ctx: &Ctx, topic: &CreatableTopic) -> Result<u32, (i16, String)> {
    if !topic.assignments.is_empty() {
        if topic.num_partitions != -1 || topic.replication_factor != -1 {
            return Err((
                ErrorCode::InvalidRequest.code(),
                "give either assignments or partitions and replication factor".into(),
            ));
        }
        for (i, a) in topic.assignments.iter().enumerate() {
            if a.partition_index != i32::try_from(i).unwrap_or(-1)
                || a.broker_ids.len() != 1
                || a.broker_ids.iter().any(|b| b.0 != ctx.config.node_id)
            {
                return Err((
                    ErrorCode::InvalidReplicaAssignment.code(),
                    format!(
                        "partitions must be 0..n, each on broker {} only",
                        ctx.config.node_id
                    ),
                ));
            }
        }
        return u32::try_from(topic.assignments.len()).map_err(|_| {
            (
                ErrorCode::InvalidPartitions.code(),
                "too many partitions".into(),
            )
        });
    }
    if topic.replication_factor != -1 && topic.replication_factor != 1 {
        return Err((
            ErrorCode::InvalidReplicationFactor.code(),
            format!(
                "replication factor {} is larger than the 1 available broker",
                topic.replication_factor
            ),
        ));
    }
    match topic.num_partitions {
        -1 => Ok(ctx.config.default_partitions.max(1)),
        n if n >= 1 => Ok(n as u32),
        n => Err((
            ErrorCode::InvalidPartitions.code(),
            format!("number of partitions {n} is below 1"),
        )),
    }
}

fn created_result(ctx: &Ctx, info: &TopicInfo, version: i16) -> CreatableTopicResult {
    let mut result = CreatableTopicResult::default()
        .with_name(super::topic_name(&info.name))
        .with_topic_id(topic_uuid(info));
    if version >= 5 {
        result.num_partitions = i32::try_from(info.partitions).unwrap_or(i32::MAX);
        result.replication_factor = 1;
        let configs = sluice_log::TopicConfig::KEYS
            .iter()
            .filter_map(|key| {
                let value = info.config.get(key)?;
                let source = if info.overrides.contains_key(*key) {
                    SOURCE_TOPIC_CONFIG
                } else {
                    SOURCE_DEFAULT_CONFIG
                };
                Some(
                    CreatableTopicConfigs::default()
                        .with_name(str_bytes(key))
                        .with_value(Some(str_bytes(&value)))
                        .with_config_source(source),
                )
            })
            .collect();
        result.configs = Some(configs);
    }
    let _ = ctx;
    result
}

pub(crate) fn create_topics(
    ctx: &Ctx,
    req: CreateTopicsRequest,
    version: i16,
) -> CreateTopicsResponse {
    let mut seen = HashSet::new();
    let duplicates: HashSet<String> = req
        .topics
        .iter()
        .filter(|t| !seen.insert(t.name.0.to_string()))
        .map(|t| t.name.0.to_string())
        .collect();
    let topics = req
        .topics
        .into_iter()
        .map(|topic| {
            let name = topic.name.0.to_string();
            if duplicates.contains(&name) {
                return error_result(
                    topic.name,
                    ErrorCode::InvalidRequest.code(),
                    "topic named more than once in the request".into(),
                );
            }
            let partitions = match partition_count(ctx, &topic) {
                Ok(n) => n,
                Err((code, message)) => return error_result(topic.name, code, message),
            };
            let mut overrides = BTreeMap::new();
            for config in &topic.configs {
                // A null value means "the default": nothing to override.
                if let Some(value) = &config.value {
                    overrides.insert(config.name.to_string(), value.to_string());
                }
            }
            match ctx
                .store
                .create_topic(&name, partitions, &overrides, req.validate_only)
            {
                Ok(info) => {
                    if !req.validate_only {
                        tracing::info!(topic = %name, partitions, "created topic");
                    }
                    created_result(ctx, &info, version)
                }
                Err(err) => {
                    let message = err.to_string();
                    error_result(topic.name, err.error_code().code(), message)
                }
            }
        })
        .collect();
    CreateTopicsResponse::default().with_topics(topics)
}

fn delete_one(ctx: &Ctx, name: &str) -> (i16, Option<String>) {
    if ctx.store.topic(name).is_some_and(|t| t.internal) {
        return (
            ErrorCode::InvalidRequest.code(),
            Some(format!("internal topic {name} cannot be deleted")),
        );
    }
    match ctx.store.delete_topic(name) {
        Ok(()) => {
            tracing::info!(topic = name, "deleted topic");
            (0, None)
        }
        Err(err) => (err.error_code().code(), Some(err.to_string())),
    }
}

pub(crate) fn delete_topics(
    ctx: &Ctx,
    req: DeleteTopicsRequest,
    version: i16,
) -> DeleteTopicsResponse {
    let responses = if version >= 6 {
        req.topics
            .into_iter()
            .map(|t| {
                let (name, id) = match (&t.name, topic_by_id(ctx, t.topic_id)) {
                    (Some(name), _) => (
                        Some(name.clone()),
                        ctx.store
                            .topic(name.0.as_str())
                            .map(|i| topic_uuid(&i))
                            .unwrap_or_default(),
                    ),
                    (None, Some(info)) => (Some(super::topic_name(&info.name)), t.topic_id),
                    (None, None) => {
                        return DeletableTopicResult::default()
                            .with_topic_id(t.topic_id)
                            .with_error_code(ErrorCode::UnknownTopicId.code());
                    }
                };
                let topic = name.as_ref().map(|n| n.0.to_string()).unwrap_or_default();
                let (code, message) = delete_one(ctx, &topic);
                DeletableTopicResult::default()
                    .with_name(name)
                    .with_topic_id(id)
                    .with_error_code(code)
                    .with_error_message(message.as_deref().map(str_bytes))
            })
            .collect()
    } else {
        req.topic_names
            .into_iter()
            .map(|name| {
                let (code, message) = delete_one(ctx, name.0.as_str());
                let mut result = DeletableTopicResult::default()
                    .with_name(Some(name))
                    .with_error_code(code);
                if version >= 5 {
                    result.error_message = message.as_deref().map(str_bytes);
                }
                result
            })
            .collect()
    };
    DeleteTopicsResponse::default().with_responses(responses)
}

pub(crate) fn create_partitions(
    ctx: &Ctx,
    req: CreatePartitionsRequest,
) -> CreatePartitionsResponse {
    let results = req
        .topics
        .into_iter()
        .map(|topic| {
            let result = CreatePartitionsTopicResult::default().with_name(topic.name.clone());
            let outcome = match u32::try_from(topic.count) {
                Err(_) => Err((
                    ErrorCode::InvalidPartitions.code(),
                    format!("partition count {} is below 1", topic.count),
                )),
                Ok(_) if topic.assignments.as_ref().is_some_and(|a| {
                    a.iter().any(|x| x.broker_ids.iter().any(|b| b.0 != ctx.config.node_id))
                }) =>
                {
                    Err((
                        ErrorCode::InvalidReplicaAssignment.code(),
                        format!("new partitions can only be placed on broker {}", ctx.config.node_id),
                    ))
                }
                Ok(count) => ctx
                    .store
                    .create_partitions(topic.name.0.as_str(), count, req.validate_only)
                    .map_err(|err: LogError| (err.error_code().code(), err.to_string())),
            };
            match outcome {
                Ok(()) => {
                    if !req.validate_only {
                        tracing::info!(topic = %topic.name.0.as_str(), count = topic.count, "grew topic");
                    }
                    result
                }
                Err((code, message)) => result
                    .with_error_code(code)
                    .with_error_message(Some(str_bytes(&message))),
            }
        })
        .collect();
    CreatePartitionsResponse::default().with_results(results)
}

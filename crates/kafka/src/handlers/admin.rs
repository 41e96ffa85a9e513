//! CreateTopics, DeleteTopics, CreatePartitions, AlterConfigs and
//! IncrementalAlterConfigs as commands to the metadata quorum, which validates
//! them inside `apply`; requests that only validate use the same rules
//! (`sluice_vocab`). The answer waits (bounded by [`IMAGE_WAIT`]) until this
//! node's image shows the change, so a client that acts on the answer finds it.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use kafka_protocol::messages::create_partitions_response::CreatePartitionsTopicResult;
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::create_topics_response::{
    CreatableTopicConfigs, CreatableTopicResult,
};
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use sluice_topology::{wait_image, Command, CommandOutput, MetadataImage};
use sluice_vocab::internal::is_internal;
use sluice_vocab::{ErrorCode, Refused, TopicConfig, TopicName as ValidTopicName};
use uuid::Uuid;

use super::configs::topic_source;
use super::configs::{
    alter_result, broker_is_read_only, changes_with, current_value, ConfigChange, RESOURCE_BROKER,
    RESOURCE_TOPIC,
};
use super::meta::default_replication_factor;
use super::{str_bytes, topic_name};
use crate::dispatch::{later, Hdr, Outcome};
use crate::server::Ctx;

/// Longest wait for the local image to show a committed change.
const IMAGE_WAIT: Duration = Duration::from_secs(10);

type Failure = Refused;

fn invalid(code: ErrorCode, message: impl Into<String>) -> Failure {
    Refused::new(code, message)
}

/// How long to wait for the image: the request's timeout when it gives
/// one, at most [`IMAGE_WAIT`].
pub(super) fn image_wait(timeout_ms: i32) -> Duration {
    match u64::try_from(timeout_ms) {
        Ok(ms) if ms > 0 => Duration::from_millis(ms).min(IMAGE_WAIT),
        _ => IMAGE_WAIT,
    }
}

/// Overrides checked against Kafka's keys and limits (the rule the quorum applies),
/// or INVALID_CONFIG.
fn validate_overrides(overrides: &BTreeMap<String, String>) -> Result<(), Failure> {
    TopicConfig::validate(overrides).map_err(|e| Refused::from_error(&e))
}

// ---- CreateTopics ----------------------------------------------------------

/// What a CreateTopics entry asks for, checked: (partitions, RF, overrides).
pub(crate) fn creation(
    ctx: &Ctx,
    image: &MetadataImage,
    topic: &CreatableTopic,
) -> Result<(i32, i16, BTreeMap<String, String>), Failure> {
    let name = topic.name.0.as_str();
    ValidTopicName::validate(name).map_err(|e| Refused::from_error(&e))?;
    if !topic.assignments.is_empty() {
        return Err(invalid(
            ErrorCode::InvalidReplicaAssignment,
            "manual replica assignments are not supported; create the topic, then use \
             `sluice partition reassign`",
        ));
    }
    let partitions = match topic.num_partitions {
        -1 => i32::try_from(ctx.config.default_partitions.max(1)).unwrap_or(1),
        n if n >= 1 => n,
        n => {
            return Err(invalid(
                ErrorCode::InvalidPartitions,
                format!("number of partitions {n} is below 1"),
            ))
        }
    };
    let live = image.live_brokers().len();
    let rf = match topic.replication_factor {
        -1 => default_replication_factor(image),
        n if n >= 1 && usize::try_from(n).is_ok_and(|n| n <= live) => n,
        n => {
            return Err(invalid(
                ErrorCode::InvalidReplicationFactor,
                format!("replication factor {n} with {live} live brokers"),
            ))
        }
    };
    let mut overrides = BTreeMap::new();
    for config in &topic.configs {
        // A null value means "the default": nothing to override.
        if let Some(value) = &config.value {
            overrides.insert(config.name.to_string(), value.to_string());
        }
    }
    validate_overrides(&overrides)?;
    Ok((partitions, rf, overrides))
}

fn error_result(name: TopicName, failure: Failure) -> CreatableTopicResult {
    CreatableTopicResult::default()
        .with_name(name)
        .with_error_code(failure.code.code())
        .with_error_message(Some(str_bytes(&failure.message)))
        .with_num_partitions(-1)
        .with_replication_factor(-1)
}

fn created_result(
    ctx: &Ctx,
    name: &str,
    topic_id: [u8; 16],
    partitions: i32,
    rf: i16,
    overrides: &BTreeMap<String, String>,
    version: i16,
) -> CreatableTopicResult {
    let mut result = CreatableTopicResult::default()
        .with_name(topic_name(name))
        .with_topic_id(Uuid::from_bytes(topic_id));
    if version >= 5 {
        result.num_partitions = partitions;
        result.replication_factor = rf;
        let configs = TopicConfig::KEYS
            .iter()
            .map(|key| {
                CreatableTopicConfigs::default()
                    .with_name(str_bytes(key))
                    .with_value(Some(str_bytes(&current_value(ctx, overrides, key))))
                    .with_config_source(topic_source(ctx, overrides, key))
            })
            .collect();
        result.configs = Some(configs);
    }
    result
}

async fn create_one(
    ctx: &Ctx,
    topic: CreatableTopic,
    validate_only: bool,
    wait: Duration,
    version: i16,
) -> CreatableTopicResult {
    let image = ctx.topology.image();
    let (partitions, rf, overrides) = match creation(ctx, &image, &topic) {
        Ok(x) => x,
        Err(failure) => return error_result(topic.name, failure),
    };
    let name = topic.name.0.to_string();
    if validate_only {
        if image.topics.contains_key(&name) {
            return error_result(
                topic.name,
                invalid(ErrorCode::TopicAlreadyExists, "topic already exists"),
            );
        }
        return created_result(ctx, &name, [0; 16], partitions, rf, &overrides, version);
    }
    let cmd = Command::CreateTopic {
        name: name.clone(),
        partitions,
        replication_factor: rf,
        configs: overrides.clone(),
    };
    match ctx.topology.propose(cmd).await {
        Ok(CommandOutput::TopicCreated { topic_id }) => {
            tracing::info!(topic = %name, partitions, replication_factor = rf, "created topic");
            wait_image(ctx.topology.as_ref(), wait, |image| {
                image
                    .topics
                    .get(&name)
                    .is_some_and(|t| t.topic_id == topic_id)
            })
            .await;
            created_result(ctx, &name, topic_id, partitions, rf, &overrides, version)
        }
        Ok(other) => error_result(
            topic.name,
            invalid(
                ErrorCode::UnknownServerError,
                format!("unexpected answer {other:?}"),
            ),
        ),
        Err(failure) => error_result(topic.name, failure),
    }
}

pub(crate) fn create_topics(ctx: &Arc<Ctx>, req: CreateTopicsRequest, h: Hdr) -> Outcome {
    let ctx = ctx.clone();
    later(h, async move {
        let mut seen = HashSet::new();
        let duplicates: HashSet<String> = req
            .topics
            .iter()
            .filter(|t| !seen.insert(t.name.0.to_string()))
            .map(|t| t.name.0.to_string())
            .collect();
        let wait = image_wait(req.timeout_ms);
        let topics = futures::future::join_all(req.topics.into_iter().map(|topic| {
            let ctx = &ctx;
            let duplicate = duplicates.contains(topic.name.0.as_str());
            async move {
                if duplicate {
                    return error_result(
                        topic.name,
                        invalid(
                            ErrorCode::InvalidRequest,
                            "topic named more than once in the request",
                        ),
                    );
                }
                create_one(ctx, topic, req.validate_only, wait, h.version).await
            }
        }))
        .await;
        CreateTopicsResponse::default().with_topics(topics)
    })
}

// ---- DeleteTopics ----------------------------------------------------------

async fn delete_one(ctx: &Ctx, name: &str, wait: Duration) -> Result<(), Failure> {
    if is_internal(name) {
        return Err(invalid(
            ErrorCode::InvalidRequest,
            format!("internal topic {name} cannot be deleted"),
        ));
    }
    // The quorum says whether the topic exists: this node's image can lag a
    // create it already answered (while the new partitions are still being
    // opened), and the topic must be deletable then too.
    let id = ctx.topology.image().topics.get(name).map(|t| t.topic_id);
    ctx.topology
        .propose(Command::DeleteTopic {
            name: name.to_owned(),
        })
        .await
        .map_err(|refused| match refused.code {
            ErrorCode::UnknownTopicOrPartition => {
                invalid(refused.code, format!("unknown topic {name}"))
            }
            _ => refused,
        })?;
    tracing::info!(topic = name, "deleted topic");
    // Answered once this node has acted on the delete: by the log index the
    // controller had committed (the delete's or later), or, when the
    // controller cannot be asked, by the topic this node knew being gone.
    let committed = ctx.topology.catch_up().await;
    wait_image(ctx.topology.as_ref(), wait, |image| match committed {
        Some(index) => image.applied_index >= index,
        None => image
            .topics
            .get(name)
            .is_none_or(|t| Some(t.topic_id) != id),
    })
    .await;
    Ok(())
}

pub(crate) fn delete_topics(ctx: &Arc<Ctx>, req: DeleteTopicsRequest, h: Hdr) -> Outcome {
    let ctx = ctx.clone();
    let version = h.version;
    later(h, async move {
        let wait = image_wait(req.timeout_ms);
        let image = ctx.topology.image();
        let responses = if version >= 6 {
            futures::future::join_all(req.topics.into_iter().map(|t| {
                let ctx = &ctx;
                let named = match &t.name {
                    Some(name) => Some((
                        name.clone(),
                        image.topics.get(name.0.as_str()).map(|x| x.topic_id),
                    )),
                    None => image
                        .topics
                        .iter()
                        .find(|(_, x)| !t.topic_id.is_nil() && x.topic_id == *t.topic_id.as_bytes())
                        .map(|(name, x)| (topic_name(name), Some(x.topic_id))),
                };
                async move {
                    let Some((name, id)) = named else {
                        return DeletableTopicResult::default()
                            .with_topic_id(t.topic_id)
                            .with_error_code(ErrorCode::UnknownTopicId.code());
                    };
                    let outcome = delete_one(ctx, name.0.as_str(), wait).await;
                    let (code, message) = outcome
                        .err()
                        .map_or((0, None), |r| (r.code.code(), Some(r.message)));
                    DeletableTopicResult::default()
                        .with_name(Some(name))
                        .with_topic_id(id.map(Uuid::from_bytes).unwrap_or_default())
                        .with_error_code(code)
                        .with_error_message(message.as_deref().map(str_bytes))
                }
            }))
            .await
        } else {
            futures::future::join_all(req.topic_names.into_iter().map(|name| {
                let ctx = &ctx;
                async move {
                    let outcome = delete_one(ctx, name.0.as_str(), wait).await;
                    let (code, message) = outcome
                        .err()
                        .map_or((0, None), |r| (r.code.code(), Some(r.message)));
                    let mut result = DeletableTopicResult::default()
                        .with_name(Some(name))
                        .with_error_code(code);
                    if version >= 5 {
                        result.error_message = message.as_deref().map(str_bytes);
                    }
                    result
                }
            }))
            .await
        };
        DeleteTopicsResponse::default().with_responses(responses)
    })
}

// ---- CreatePartitions ------------------------------------------------------

pub(crate) fn create_partitions(ctx: &Arc<Ctx>, req: CreatePartitionsRequest, h: Hdr) -> Outcome {
    let ctx = ctx.clone();
    later(h, async move {
        let wait = image_wait(req.timeout_ms);
        let validate_only = req.validate_only;
        let results = futures::future::join_all(req.topics.into_iter().map(|topic| {
            let ctx = &ctx;
            async move {
                let name = topic.name.0.to_string();
                let result = CreatePartitionsTopicResult::default().with_name(topic.name.clone());
                let current = ctx.topology.image().topics.get(&name).map(|t| t.partitions.len());
                let outcome: Result<(), Failure> = match current {
                    None => Err(invalid(
                        ErrorCode::UnknownTopicOrPartition,
                        format!("unknown topic {name}"),
                    )),
                    Some(_) if topic.assignments.as_ref().is_some_and(|a| !a.is_empty()) => Err(invalid(
                        ErrorCode::InvalidReplicaAssignment,
                        "manual replica assignments are not supported; use `sluice partition reassign`",
                    )),
                    Some(n) if usize::try_from(topic.count).map_or(true, |count| count <= n) => Err(invalid(
                        ErrorCode::InvalidPartitions,
                        format!("topic has {n} partitions; {} must be more", topic.count),
                    )),
                    Some(_) if validate_only => Ok(()),
                    Some(_) => {
                        let count = topic.count;
                        match ctx.topology.propose(Command::CreatePartitions { name: name.clone(), count }).await {
                            Ok(_) => {
                                tracing::info!(topic = %name, count, "grew topic");
                                wait_image(ctx.topology.as_ref(), wait, |image| {
                                    image.topics.get(&name).is_some_and(|t| {
                                        usize::try_from(count).is_ok_and(|n| t.partitions.len() >= n)
                                    })
                                })
                                .await;
                                Ok(())
                            }
                            Err(failure) => Err(failure),
                        }
                    }
                };
                match outcome {
                    Ok(()) => result,
                    Err(refused) => result
                        .with_error_code(refused.code.code())
                        .with_error_message(Some(str_bytes(&refused.message))),
                }
            }
        }))
        .await;
        CreatePartitionsResponse::default().with_results(results)
    })
}

// ---- AlterConfigs / IncrementalAlterConfigs ---------------------------------

/// Applies `changes` to a topic's overrides through the quorum; `replace`
/// (legacy AlterConfigs) first drops every override not set again.
async fn alter_topic(
    ctx: &Ctx,
    topic: &str,
    changes: Result<Vec<ConfigChange>, Failure>,
    replace: bool,
    validate_only: bool,
) -> Result<(), Failure> {
    let changes = changes?;
    let Some(current) = ctx
        .topology
        .image()
        .topics
        .get(topic)
        .map(|t| t.configs.clone())
    else {
        return Err(invalid(
            ErrorCode::UnknownTopicOrPartition,
            format!("unknown topic {topic}"),
        ));
    };
    let mut delta: BTreeMap<String, Option<String>> = BTreeMap::new();
    if replace {
        for key in current.keys() {
            delta.insert(key.clone(), None);
        }
    }
    for change in changes {
        match change {
            ConfigChange::Set { key, value } => {
                delta.insert(key, Some(value));
            }
            ConfigChange::Delete { key } => {
                if !TopicConfig::KEYS.contains(&key.as_str()) {
                    return Err(invalid(
                        ErrorCode::InvalidConfig,
                        format!("unknown topic config {key}"),
                    ));
                }
                delta.insert(key, None);
            }
        }
    }
    let mut after = current.clone();
    for (k, v) in &delta {
        match v {
            Some(v) => after.insert(k.clone(), v.clone()),
            None => after.remove(k),
        };
    }
    validate_overrides(&after)?;
    if validate_only {
        return Ok(());
    }
    ctx.topology
        .propose(Command::AlterConfigs {
            name: topic.to_owned(),
            configs: delta,
        })
        .await?;
    tracing::info!(topic, "altered topic config");
    wait_image(ctx.topology.as_ref(), IMAGE_WAIT, |image| {
        image.topics.get(topic).is_none_or(|t| t.configs == after)
    })
    .await;
    Ok(())
}

fn broker_refused() -> Failure {
    broker_is_read_only()
}

fn unsupported_resource() -> Failure {
    invalid(ErrorCode::InvalidRequest, "unsupported resource type")
}

pub(crate) fn incremental_alter_configs(
    ctx: &Arc<Ctx>,
    req: IncrementalAlterConfigsRequest,
    h: Hdr,
) -> Outcome {
    let ctx = ctx.clone();
    later(h, async move {
        let mut responses = Vec::with_capacity(req.resources.len());
        // One at a time: two changes of one topic in a request apply in order.
        for resource in req.resources {
            let outcome = match resource.resource_type {
                RESOURCE_TOPIC => {
                    let topic = resource.resource_name.as_str();
                    let image = ctx.topology.image();
                    let overrides = image
                        .topics
                        .get(topic)
                        .map(|t| t.configs.clone())
                        .unwrap_or_default();
                    let changes = changes_with(&resource.configs, |key| {
                        current_value(&ctx, &overrides, key)
                    });
                    alter_topic(&ctx, topic, changes, false, req.validate_only).await
                }
                RESOURCE_BROKER => Err(broker_refused()),
                _ => Err(unsupported_resource()),
            };
            responses.push(alter_result(
                resource.resource_type,
                resource.resource_name,
                outcome,
            ));
        }
        IncrementalAlterConfigsResponse::default().with_responses(responses)
    })
}

pub(crate) fn alter_configs(ctx: &Arc<Ctx>, req: AlterConfigsRequest, h: Hdr) -> Outcome {
    let ctx = ctx.clone();
    later(h, async move {
        let mut responses = Vec::with_capacity(req.resources.len());
        for resource in req.resources {
            let outcome = match resource.resource_type {
                RESOURCE_TOPIC => {
                    let changes = resource
                        .configs
                        .iter()
                        .map(|c| match &c.value {
                            Some(v) => ConfigChange::Set {
                                key: c.name.to_string(),
                                value: v.to_string(),
                            },
                            None => ConfigChange::Delete {
                                key: c.name.to_string(),
                            },
                        })
                        .collect();
                    let topic = resource.resource_name.as_str();
                    alter_topic(&ctx, topic, Ok(changes), true, req.validate_only).await
                }
                RESOURCE_BROKER => Err(broker_refused()),
                _ => Err(unsupported_resource()),
            };
            let result = alter_configs_response::AlterConfigsResourceResponse::default()
                .with_resource_type(resource.resource_type)
                .with_resource_name(resource.resource_name);
            responses.push(match outcome {
                Ok(()) => result,
                Err(refused) => result
                    .with_error_code(refused.code.code())
                    .with_error_message(Some(StrBytes::from_string(refused.message))),
            });
        }
        AlterConfigsResponse::default().with_responses(responses)
    })
}

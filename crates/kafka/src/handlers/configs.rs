//! DescribeConfigs, IncrementalAlterConfigs and the legacy AlterConfigs.

use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResult, DescribeConfigsSynonym,
};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use sluice_log::{ConfigChange, ConfigEntry, LogError};
use sluice_vocab::ErrorCode;
use sluice_vocab::KafkaError;

use super::str_bytes;
use super::topics::{SOURCE_DEFAULT_CONFIG, SOURCE_TOPIC_CONFIG};
use crate::server::Ctx;

pub(crate) const RESOURCE_TOPIC: i8 = 2;
pub(crate) const RESOURCE_BROKER: i8 = 4;

const SOURCE_STATIC_BROKER_CONFIG: i8 = 4;

/// IncrementalAlterConfigs operations.
const OP_SET: i8 = 0;
const OP_DELETE: i8 = 1;
const OP_APPEND: i8 = 2;
const OP_SUBTRACT: i8 = 3;

/// DescribeConfigs v3+ config types.
const TYPE_BOOLEAN: i8 = 1;
const TYPE_STRING: i8 = 2;
const TYPE_INT: i8 = 3;
const TYPE_LONG: i8 = 5;
const TYPE_LIST: i8 = 7;

/// Topic keys whose value is a comma-separated list (APPEND/SUBTRACT apply).
const LIST_KEYS: &[&str] = &["cleanup.policy"];

fn config_type(key: &str) -> i8 {
    match key {
        "cleanup.policy" => TYPE_LIST,
        "index.interval.bytes"
        | "max.message.bytes"
        | "segment.bytes"
        | "num.partitions"
        | "socket.request.max.bytes"
        | "broker.id" => TYPE_INT,
        "retention.bytes" | "retention.ms" | "segment.ms" => TYPE_LONG,
        "auto.create.topics.enable" => TYPE_BOOLEAN,
        _ => TYPE_STRING,
    }
}

fn entry(
    name: &str,
    value: String,
    source: i8,
    read_only: bool,
    req: &DescribeConfigsRequest,
    version: i16,
) -> DescribeConfigsResourceResult {
    let mut result = DescribeConfigsResourceResult::default()
        .with_name(str_bytes(name))
        .with_value(Some(StrBytes::from_string(value.clone())))
        .with_read_only(read_only)
        .with_config_source(source);
    if req.include_synonyms {
        result.synonyms = vec![DescribeConfigsSynonym::default()
            .with_name(str_bytes(name))
            .with_value(Some(StrBytes::from_string(value)))
            .with_source(source)];
    }
    if version >= 3 {
        result.config_type = config_type(name);
    }
    result
}

/// Null (and, leniently, an empty list) asks for every key.
fn wanted(resource_keys: &Option<Vec<StrBytes>>, key: &str) -> bool {
    match resource_keys {
        Some(keys) if !keys.is_empty() => keys.iter().any(|k| k.as_str() == key),
        _ => true,
    }
}

pub(crate) fn describe_configs(
    ctx: &Ctx,
    req: DescribeConfigsRequest,
    version: i16,
) -> DescribeConfigsResponse {
    let results = req
        .resources
        .iter()
        .map(|resource| {
            let result = DescribeConfigsResult::default()
                .with_resource_type(resource.resource_type)
                .with_resource_name(resource.resource_name.clone());
            match resource.resource_type {
                RESOURCE_TOPIC => match topic_entries(ctx, resource.resource_name.as_str()) {
                    Ok(entries) => {
                        let configs = entries
                            .into_iter()
                            .filter(|e: &ConfigEntry| wanted(&resource.configuration_keys, &e.name))
                            .map(|e| {
                                let source = if e.is_default {
                                    SOURCE_DEFAULT_CONFIG
                                } else {
                                    SOURCE_TOPIC_CONFIG
                                };
                                entry(&e.name, e.value, source, false, &req, version)
                            })
                            .collect();
                        result.with_configs(configs)
                    }
                    Err(err) => result
                        .with_error_code(err.error_code().code())
                        .with_error_message(Some(str_bytes(&err.to_string()))),
                },
                RESOURCE_BROKER => {
                    let name = resource.resource_name.as_str();
                    if !name.is_empty() && name != ctx.config.node_id.to_string() {
                        return result
                            .with_error_code(ErrorCode::InvalidRequest.code())
                            .with_error_message(Some(str_bytes("unknown broker id")));
                    }
                    let configs = broker_configs(ctx)
                        .into_iter()
                        .filter(|(key, _)| wanted(&resource.configuration_keys, key))
                        .map(|(key, value)| {
                            entry(key, value, SOURCE_STATIC_BROKER_CONFIG, true, &req, version)
                        })
                        .collect();
                    result.with_configs(configs)
                }
                _ => result
                    .with_error_code(ErrorCode::InvalidRequest.code())
                    .with_error_message(Some(str_bytes("unsupported resource type"))),
            }
        })
        .collect();
    DescribeConfigsResponse::default().with_results(results)
}

/// Every topic config key with its effective value: from the store, or in
/// cluster mode from the image's overrides (this node need not host the
/// topic) over the local or default values.
fn topic_entries(ctx: &Ctx, name: &str) -> Result<Vec<ConfigEntry>, LogError> {
    let Some(c) = &ctx.cluster else {
        return ctx.store.describe_topic_config(name);
    };
    let image = c.replicas.image();
    let t = image
        .topics
        .get(name)
        .ok_or_else(|| LogError::UnknownTopicOrPartition(name.to_owned()))?;
    Ok(sluice_log::TopicConfig::KEYS
        .iter()
        .map(|k| ConfigEntry {
            name: (*k).to_owned(),
            value: current_value(ctx, name, &t.configs, k),
            is_default: !t.configs.contains_key(*k),
        })
        .collect())
}

/// Cluster mode: the value of `key` for a topic whose overrides (from the
/// image) are `overrides`.
pub(crate) fn current_value(
    ctx: &Ctx,
    topic: &str,
    overrides: &std::collections::BTreeMap<String, String>,
    key: &str,
) -> String {
    if let Some(v) = overrides.get(key) {
        return v.clone();
    }
    match ctx.store.topic(topic) {
        // The local replica's broker defaults.
        Some(info) if !info.overrides.contains_key(key) => info.config.get(key),
        _ => sluice_log::TopicConfig::default().get(key),
    }
    .unwrap_or_default()
}

/// The broker settings reported (read-only) for a BROKER resource.
fn broker_configs(ctx: &Ctx) -> Vec<(&'static str, String)> {
    vec![
        (
            "auto.create.topics.enable",
            ctx.config.auto_create_topics.to_string(),
        ),
        ("broker.id", ctx.config.node_id.to_string()),
        ("num.partitions", ctx.config.default_partitions.to_string()),
        (
            "socket.request.max.bytes",
            ctx.config.max_request_bytes.to_string(),
        ),
    ]
}

pub(crate) fn broker_is_read_only() -> (i16, Option<StrBytes>) {
    (
        ErrorCode::InvalidRequest.code(),
        Some(str_bytes(
            "broker configs are static; set them in the config file",
        )),
    )
}

pub(crate) fn alter_result(
    resource_type: i8,
    resource_name: StrBytes,
    outcome: Result<(), (i16, String)>,
) -> incremental_alter_configs_response::AlterConfigsResourceResponse {
    let result = incremental_alter_configs_response::AlterConfigsResourceResponse::default()
        .with_resource_type(resource_type)
        .with_resource_name(resource_name);
    match outcome {
        Ok(()) => result,
        Err((code, message)) => result
            .with_error_code(code)
            .with_error_message(Some(StrBytes::from_string(message))),
    }
}

fn log_err(err: LogError) -> (i16, String) {
    (err.error_code().code(), err.to_string())
}

/// New value of a list-valued key after APPEND or SUBTRACT of `value`.
fn list_op(current: &str, value: &str, append: bool) -> String {
    let mut items: Vec<&str> = current
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if append {
            if !items.contains(&item) {
                items.push(item);
            }
        } else {
            items.retain(|x| *x != item);
        }
    }
    items.join(",")
}

fn incremental_changes(
    ctx: &Ctx,
    topic: &str,
    configs: &[incremental_alter_configs_request::AlterableConfig],
) -> Result<Vec<ConfigChange>, (i16, String)> {
    let info = ctx.store.topic(topic);
    changes_with(configs, |key| {
        info.as_ref()
            .and_then(|i| i.config.get(key))
            .unwrap_or_default()
    })
}

/// IncrementalAlterConfigs entries as changes; `current` gives a key's
/// value for APPEND and SUBTRACT.
pub(crate) fn changes_with(
    configs: &[incremental_alter_configs_request::AlterableConfig],
    current: impl Fn(&str) -> String,
) -> Result<Vec<ConfigChange>, (i16, String)> {
    configs
        .iter()
        .map(|c| {
            let key = c.name.to_string();
            let value = c.value.as_ref().map(|v| v.to_string());
            match (c.config_operation, value) {
                (OP_SET, Some(value)) => Ok(ConfigChange::Set { key, value }),
                (OP_DELETE, _) => Ok(ConfigChange::Delete { key }),
                (op @ (OP_APPEND | OP_SUBTRACT), Some(value)) => {
                    if !LIST_KEYS.contains(&key.as_str()) {
                        return Err((
                            ErrorCode::InvalidConfig.code(),
                            format!("{key} is not a list; APPEND and SUBTRACT do not apply"),
                        ));
                    }
                    let value = list_op(&current(&key), &value, op == OP_APPEND);
                    Ok(ConfigChange::Set { key, value })
                }
                (OP_SET | OP_APPEND | OP_SUBTRACT, None) => Err((
                    ErrorCode::InvalidRequest.code(),
                    format!("no value given for {key}"),
                )),
                (op, _) => Err((
                    ErrorCode::InvalidRequest.code(),
                    format!("unknown config operation {op}"),
                )),
            }
        })
        .collect()
}

pub(crate) fn incremental_alter_configs(
    ctx: &Ctx,
    req: IncrementalAlterConfigsRequest,
) -> IncrementalAlterConfigsResponse {
    let responses = req
        .resources
        .into_iter()
        .map(|resource| {
            let outcome = match resource.resource_type {
                RESOURCE_TOPIC => {
                    let topic = resource.resource_name.as_str();
                    incremental_changes(ctx, topic, &resource.configs).and_then(|changes| {
                        ctx.store
                            .alter_topic_config(topic, &changes, req.validate_only)
                            .map_err(log_err)
                    })
                }
                RESOURCE_BROKER => {
                    let (code, message) = broker_is_read_only();
                    Err((code, message.map(|m| m.to_string()).unwrap_or_default()))
                }
                _ => Err((
                    ErrorCode::InvalidRequest.code(),
                    "unsupported resource type".into(),
                )),
            };
            if outcome.is_ok() && !req.validate_only {
                tracing::info!(topic = %resource.resource_name.as_str(), "altered topic config");
            }
            alter_result(resource.resource_type, resource.resource_name, outcome)
        })
        .collect();
    IncrementalAlterConfigsResponse::default().with_responses(responses)
}

/// Legacy AlterConfigs: the given set replaces every override of the topic.
pub(crate) fn alter_configs(ctx: &Ctx, req: AlterConfigsRequest) -> AlterConfigsResponse {
    let responses = req
        .resources
        .into_iter()
        .map(|resource| {
            let outcome = match resource.resource_type {
                RESOURCE_TOPIC => {
                    let topic = resource.resource_name.as_str();
                    match ctx.store.topic(topic) {
                        None => Err((
                            ErrorCode::UnknownTopicOrPartition.code(),
                            format!("unknown topic {topic}"),
                        )),
                        Some(info) => {
                            let mut changes: Vec<ConfigChange> = info
                                .overrides
                                .keys()
                                .filter(|k| {
                                    !resource
                                        .configs
                                        .iter()
                                        .any(|c| c.name.as_str() == k.as_str())
                                })
                                .map(|k| ConfigChange::Delete { key: k.clone() })
                                .collect();
                            for c in &resource.configs {
                                changes.push(match &c.value {
                                    Some(v) => ConfigChange::Set {
                                        key: c.name.to_string(),
                                        value: v.to_string(),
                                    },
                                    None => ConfigChange::Delete {
                                        key: c.name.to_string(),
                                    },
                                });
                            }
                            ctx.store
                                .alter_topic_config(topic, &changes, req.validate_only)
                                .map_err(log_err)
                        }
                    }
                }
                RESOURCE_BROKER => {
                    let (code, message) = broker_is_read_only();
                    Err((code, message.map(|m| m.to_string()).unwrap_or_default()))
                }
                _ => Err((
                    ErrorCode::InvalidRequest.code(),
                    "unsupported resource type".into(),
                )),
            };
            let result = alter_configs_response::AlterConfigsResourceResponse::default()
                .with_resource_type(resource.resource_type)
                .with_resource_name(resource.resource_name);
            match outcome {
                Ok(()) => result,
                Err((code, message)) => result
                    .with_error_code(code)
                    .with_error_message(Some(StrBytes::from_string(message))),
            }
        })
        .collect();
    AlterConfigsResponse::default().with_responses(responses)
}

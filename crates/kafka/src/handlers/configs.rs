//! DescribeConfigs, and what the config-altering APIs share with it: config
//! sources, effective values, IncrementalAlterConfigs operations.

use std::collections::BTreeMap;

use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResult, DescribeConfigsSynonym,
};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use sluice_vocab::{ErrorCode, Refused, TopicConfig};

use super::str_bytes;
use crate::server::Ctx;

/// One change of a topic's config overrides, as an alter request asks for it.
#[derive(Clone, Debug)]
pub(crate) enum ConfigChange {
    Set {
        key: String,
        value: String,
    },
    /// Back to the broker default.
    Delete {
        key: String,
    },
}

/// DescribeConfigs/CreateTopics config sources.
pub(crate) const SOURCE_TOPIC_CONFIG: i8 = 1;
pub(crate) const SOURCE_DEFAULT_CONFIG: i8 = 5;

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
                            .filter(|(key, _, _)| wanted(&resource.configuration_keys, key))
                            .map(|(key, value, overridden)| {
                                let source = if overridden {
                                    SOURCE_TOPIC_CONFIG
                                } else {
                                    SOURCE_DEFAULT_CONFIG
                                };
                                entry(key, value, source, false, &req, version)
                            })
                            .collect();
                        result.with_configs(configs)
                    }
                    Err(refused) => result
                        .with_error_code(refused.code.code())
                        .with_error_message(Some(str_bytes(&refused.message))),
                },
                RESOURCE_BROKER => {
                    let name = resource.resource_name.as_str();
                    if !name.is_empty() && name != ctx.topology.node_id().to_string() {
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

/// Every topic config key with its effective value and whether the topic overrides
/// it, from the image (this node need not host the topic).
fn topic_entries(ctx: &Ctx, name: &str) -> Result<Vec<(&'static str, String, bool)>, Refused> {
    let image = ctx.topology.image();
    let t = image.topics.get(name).ok_or_else(|| {
        Refused::new(
            ErrorCode::UnknownTopicOrPartition,
            format!("unknown topic {name}"),
        )
    })?;
    Ok(TopicConfig::KEYS
        .iter()
        .map(|k| {
            (
                *k,
                current_value(ctx, &t.configs, k),
                t.configs.contains_key(*k),
            )
        })
        .collect())
}

/// The value of `key` for a topic whose overrides (from the image) are
/// `overrides`: the override, else this broker's default.
pub(crate) fn current_value(ctx: &Ctx, overrides: &BTreeMap<String, String>, key: &str) -> String {
    match overrides.get(key) {
        Some(v) => v.clone(),
        None => ctx
            .topology
            .store()
            .topic_defaults()
            .get(key)
            .unwrap_or_default(),
    }
}

/// The broker settings reported (read-only) for a BROKER resource.
fn broker_configs(ctx: &Ctx) -> Vec<(&'static str, String)> {
    vec![
        (
            "auto.create.topics.enable",
            ctx.config.auto_create_topics.to_string(),
        ),
        ("broker.id", ctx.topology.node_id().to_string()),
        ("num.partitions", ctx.config.default_partitions.to_string()),
        (
            "socket.request.max.bytes",
            ctx.config.max_request_bytes.to_string(),
        ),
        ("fetch.max.bytes", ctx.config.fetch_max_bytes.to_string()),
    ]
}

pub(crate) fn broker_is_read_only() -> Refused {
    Refused::new(
        ErrorCode::InvalidRequest,
        "broker configs are static; set them in the config file",
    )
}

pub(crate) fn alter_result(
    resource_type: i8,
    resource_name: StrBytes,
    outcome: Result<(), Refused>,
) -> incremental_alter_configs_response::AlterConfigsResourceResponse {
    let result = incremental_alter_configs_response::AlterConfigsResourceResponse::default()
        .with_resource_type(resource_type)
        .with_resource_name(resource_name);
    match outcome {
        Ok(()) => result,
        Err(refused) => result
            .with_error_code(refused.code.code())
            .with_error_message(Some(StrBytes::from_string(refused.message))),
    }
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

/// IncrementalAlterConfigs entries as changes; `current` gives a key's
/// value for APPEND and SUBTRACT.
pub(crate) fn changes_with(
    configs: &[incremental_alter_configs_request::AlterableConfig],
    current: impl Fn(&str) -> String,
) -> Result<Vec<ConfigChange>, Refused> {
    configs
        .iter()
        .map(|c| {
            let key = c.name.to_string();
            let value = c.value.as_ref().map(|v| v.to_string());
            match (c.config_operation, value) {
                (OP_SET, Some(value)) => Ok(ConfigChange::Set { key, value }),
                (OP_DELETE, _) => Ok(ConfigChange::Delete { key }),
                (op @ (OP_APPEND | OP_SUBTRACT), Some(value)) => {
                    if !TopicConfig::LIST_KEYS.contains(&key.as_str()) {
                        return Err(Refused::new(
                            ErrorCode::InvalidConfig,
                            format!("{key} is not a list; APPEND and SUBTRACT do not apply"),
                        ));
                    }
                    let value = list_op(&current(&key), &value, op == OP_APPEND);
                    Ok(ConfigChange::Set { key, value })
                }
                (OP_SET | OP_APPEND | OP_SUBTRACT, None) => Err(Refused::new(
                    ErrorCode::InvalidRequest,
                    format!("no value given for {key}"),
                )),
                (op, _) => Err(Refused::new(
                    ErrorCode::InvalidRequest,
                    format!("unknown config operation {op}"),
                )),
            }
        })
        .collect()
}

//! DescribeConfigs, and what the config-altering APIs share with it: config
//! sources, effective values, IncrementalAlterConfigs operations.

use std::collections::BTreeMap;

use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResult, DescribeConfigsSynonym,
};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use sluice_vocab::{ConfigType, ErrorCode, Refused, TopicConfig};

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
const SOURCE_STATIC_BROKER_CONFIG: i8 = 4;
const SOURCE_DEFAULT_CONFIG: i8 = 5;

pub(crate) const RESOURCE_TOPIC: i8 = 2;
pub(crate) const RESOURCE_BROKER: i8 = 4;

/// IncrementalAlterConfigs operations.
const OP_SET: i8 = 0;
const OP_DELETE: i8 = 1;
const OP_APPEND: i8 = 2;
const OP_SUBTRACT: i8 = 3;

/// DescribeConfigs v3+ config type codes.
fn type_code(kind: ConfigType) -> i8 {
    match kind {
        ConfigType::Boolean => 1,
        ConfigType::String => 2,
        ConfigType::Int => 3,
        ConfigType::Long => 5,
        ConfigType::Double => 6,
        ConfigType::List => 7,
    }
}

/// One described config: its value, where the value comes from, and what
/// it overrides (the synonyms Kafka lists, most specific first).
struct Described {
    name: &'static str,
    value: String,
    kind: ConfigType,
    source: i8,
    read_only: bool,
    synonyms: Vec<(&'static str, String, i8)>,
}

impl Described {
    fn into_result(
        self,
        req: &DescribeConfigsRequest,
        version: i16,
    ) -> DescribeConfigsResourceResult {
        let mut result = DescribeConfigsResourceResult::default()
            .with_name(str_bytes(self.name))
            .with_value(Some(StrBytes::from_string(self.value)))
            .with_read_only(self.read_only)
            .with_config_source(self.source);
        if req.include_synonyms {
            result.synonyms = self
                .synonyms
                .into_iter()
                .map(|(name, value, source)| {
                    DescribeConfigsSynonym::default()
                        .with_name(str_bytes(name))
                        .with_value(Some(StrBytes::from_string(value)))
                        .with_source(source)
                })
                .collect();
        }
        if version >= 3 {
            result.config_type = type_code(self.kind);
        }
        result
    }
}

/// Where a topic key's broker-wide default `value` comes from: the broker's
/// config file when it differs from Kafka's default, else Kafka's default.
pub(crate) fn default_source(key: &str, value: &str) -> i8 {
    if TopicConfig::default().get(key).as_deref() == Some(value) {
        SOURCE_DEFAULT_CONFIG
    } else {
        SOURCE_STATIC_BROKER_CONFIG
    }
}

/// The source of topic key `key` given the topic's overrides.
pub(crate) fn topic_source(ctx: &Ctx, overrides: &BTreeMap<String, String>, key: &str) -> i8 {
    if overrides.contains_key(key) {
        SOURCE_TOPIC_CONFIG
    } else {
        default_source(key, &broker_default(ctx, key))
    }
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
                            .filter(|d| wanted(&resource.configuration_keys, d.name))
                            .map(|d| d.into_result(&req, version))
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
                        .filter(|d| wanted(&resource.configuration_keys, d.name))
                        .map(|d| d.into_result(&req, version))
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

/// Every topic config key with its effective value, its source and (for
/// synonyms) the broker default under it, from the image (this node need
/// not host the topic).
fn topic_entries(ctx: &Ctx, name: &str) -> Result<Vec<Described>, Refused> {
    let image = ctx.topology.image();
    let t = image.topics.get(name).ok_or_else(|| {
        Refused::new(
            ErrorCode::UnknownTopicOrPartition,
            format!("unknown topic {name}"),
        )
    })?;
    Ok(TopicConfig::KEYS
        .iter()
        .map(|&key| {
            let default = broker_default(ctx, key);
            let mut synonyms = Vec::new();
            if let Some(v) = t.configs.get(key) {
                synonyms.push((key, v.clone(), SOURCE_TOPIC_CONFIG));
            }
            if let Some(broker_key) = TopicConfig::broker_key(key) {
                synonyms.push((broker_key, default.clone(), default_source(key, &default)));
            }
            Described {
                name: key,
                value: current_value(ctx, &t.configs, key),
                kind: TopicConfig::key_type(key).unwrap_or(ConfigType::String),
                source: topic_source(ctx, &t.configs, key),
                read_only: false,
                synonyms,
            }
        })
        .collect())
}

/// This broker's default of topic key `key`.
fn broker_default(ctx: &Ctx, key: &str) -> String {
    ctx.topology
        .store()
        .topic_defaults()
        .get(key)
        .unwrap_or_default()
}

/// The value of `key` for a topic whose overrides (from the image) are
/// `overrides`: the override, else this broker's default.
pub(crate) fn current_value(ctx: &Ctx, overrides: &BTreeMap<String, String>, key: &str) -> String {
    match overrides.get(key) {
        Some(v) => v.clone(),
        None => broker_default(ctx, key),
    }
}

/// The broker settings reported (read-only) for a BROKER resource: the
/// front end's own, those of other layers the binary passes on
/// ([`crate::ServerConfig::other_broker_configs`]), and the broker-wide
/// default of every topic config under Kafka's broker name.
fn broker_configs(ctx: &Ctx) -> Vec<Described> {
    let c = &ctx.config;
    let own = [
        (
            "auto.create.topics.enable",
            c.auto_create_topics.to_string(),
            ConfigType::Boolean,
        ),
        (
            "broker.id",
            ctx.topology.node_id().to_string(),
            ConfigType::Int,
        ),
        (
            "connections.max.idle.ms",
            c.connections_max_idle.as_millis().to_string(),
            ConfigType::Long,
        ),
        (
            "fetch.max.bytes",
            c.fetch_max_bytes.to_string(),
            ConfigType::Int,
        ),
        (
            "max.connections",
            c.max_connections.to_string(),
            ConfigType::Int,
        ),
        (
            "max.incremental.fetch.session.cache.slots",
            c.fetch_session_slots.to_string(),
            ConfigType::Int,
        ),
        (
            "max.connections.per.ip",
            c.max_connections_per_ip.min(i32::MAX as usize).to_string(),
            ConfigType::Int,
        ),
        (
            "num.partitions",
            c.default_partitions.to_string(),
            ConfigType::Int,
        ),
        (
            "socket.request.max.bytes",
            c.max_request_bytes.to_string(),
            ConfigType::Int,
        ),
        (
            "transaction.max.timeout.ms",
            c.transaction_max_timeout_ms.to_string(),
            ConfigType::Int,
        ),
    ];
    let others = c
        .other_broker_configs
        .iter()
        .map(|(name, value, kind)| (*name, value.clone(), *kind));
    let statics = own
        .into_iter()
        .chain(others)
        .map(|(name, value, kind)| Described {
            name,
            synonyms: vec![(name, value.clone(), SOURCE_STATIC_BROKER_CONFIG)],
            value,
            kind,
            source: SOURCE_STATIC_BROKER_CONFIG,
            read_only: true,
        });
    let topic_defaults = TopicConfig::KEYS.iter().filter_map(|&key| {
        let name = TopicConfig::broker_key(key)?;
        let value = broker_default(ctx, key);
        let source = default_source(key, &value);
        Some(Described {
            name,
            synonyms: vec![(name, value.clone(), source)],
            value,
            kind: TopicConfig::key_type(key).unwrap_or(ConfigType::String),
            source,
            read_only: true,
        })
    });
    let mut all: Vec<Described> = statics.chain(topic_defaults).collect();
    all.sort_by_key(|d| d.name);
    all.dedup_by_key(|d| d.name);
    all
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
                    if TopicConfig::key_type(&key) != Some(ConfigType::List) {
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

//! ApiVersions, Metadata, DescribeCluster, FindCoordinator, InitProducerId.

use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::describe_cluster_response::DescribeClusterBroker;
use kafka_protocol::messages::find_coordinator_response::Coordinator;
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::*;
use sluice_log::TopicInfo;
use sluice_vocab::ErrorCode;
use sluice_vocab::KafkaError;

use super::{str_bytes, topic_by_id, topic_name, topic_or_create, topic_uuid, LEADER_EPOCH};
use crate::api_versions::SUPPORTED_APIS;
use crate::server::Ctx;

/// FindCoordinator key types.
const KEY_TYPE_GROUP: i8 = 0;
const KEY_TYPE_TRANSACTION: i8 = 1;

/// DescribeCluster endpoint type of brokers.
const ENDPOINT_TYPE_BROKERS: i8 = 1;

pub(crate) fn api_versions(error_code: i16) -> ApiVersionsResponse {
    let api_keys = SUPPORTED_APIS
        .iter()
        .map(|&(key, min, max)| {
            ApiVersion::default()
                .with_api_key(key)
                .with_min_version(min)
                .with_max_version(max)
        })
        .collect();
    ApiVersionsResponse::default()
        .with_error_code(error_code)
        .with_api_keys(api_keys)
}

fn broker_id(ctx: &Ctx) -> BrokerId {
    BrokerId(ctx.config.node_id)
}

fn topic_metadata(ctx: &Ctx, info: &TopicInfo) -> MetadataResponseTopic {
    let node = broker_id(ctx);
    let partitions = (0..info.partitions)
        .map(|p| {
            MetadataResponsePartition::default()
                .with_partition_index(i32::try_from(p).unwrap_or(i32::MAX))
                .with_leader_id(node)
                .with_leader_epoch(LEADER_EPOCH)
                .with_replica_nodes(vec![node])
                .with_isr_nodes(vec![node])
        })
        .collect();
    MetadataResponseTopic::default()
        .with_name(Some(topic_name(&info.name)))
        .with_topic_id(topic_uuid(info))
        .with_is_internal(info.internal)
        .with_partitions(partitions)
}

pub(crate) fn metadata(ctx: &Ctx, req: MetadataRequest, version: i16) -> MetadataResponse {
    // Before v4 there is no flag and Kafka auto-creates.
    let allow_create = version < 4 || req.allow_auto_topic_creation;
    let topics = match req.topics {
        None => ctx
            .store
            .topics()
            .iter()
            .map(|t| topic_metadata(ctx, t))
            .collect(),
        // v0 has no null: an empty list means every topic.
        Some(list) if list.is_empty() && version == 0 => ctx
            .store
            .topics()
            .iter()
            .map(|t| topic_metadata(ctx, t))
            .collect(),
        Some(list) => list
            .into_iter()
            .map(|t| match t.name {
                // Some clients send "" rather than null next to a topic id.
                Some(name) if !name.0.is_empty() || t.topic_id.is_nil() => {
                    match topic_or_create(ctx, name.0.as_str(), allow_create) {
                        Ok(info) => topic_metadata(ctx, &info),
                        Err(code) => MetadataResponseTopic::default()
                            .with_error_code(code)
                            .with_name(Some(name)),
                    }
                }
                _ => match topic_by_id(ctx, t.topic_id) {
                    Some(info) => topic_metadata(ctx, &info),
                    None => MetadataResponseTopic::default()
                        .with_error_code(ErrorCode::UnknownTopicId.code())
                        .with_topic_id(t.topic_id),
                },
            })
            .collect(),
    };
    let broker = MetadataResponseBroker::default()
        .with_node_id(broker_id(ctx))
        .with_host(str_bytes(&ctx.host))
        .with_port(ctx.port);
    MetadataResponse::default()
        .with_brokers(vec![broker])
        .with_cluster_id(Some(str_bytes(&ctx.store.cluster_id())))
        .with_controller_id(broker_id(ctx))
        .with_topics(topics)
}

pub(crate) fn describe_cluster(
    ctx: &Ctx,
    req: DescribeClusterRequest,
    version: i16,
) -> DescribeClusterResponse {
    let mut resp = DescribeClusterResponse::default()
        .with_cluster_id(str_bytes(&ctx.store.cluster_id()))
        .with_controller_id(broker_id(ctx));
    if version >= 1 && req.endpoint_type != ENDPOINT_TYPE_BROKERS {
        return resp
            .with_error_code(ErrorCode::UnsupportedEndpointType.code())
            .with_error_message(Some(str_bytes("only broker endpoints are served")));
    }
    resp.brokers = vec![DescribeClusterBroker::default()
        .with_broker_id(broker_id(ctx))
        .with_host(str_bytes(&ctx.host))
        .with_port(ctx.port)];
    resp
}

/// (error, node, host, port) for one coordinator key.
fn coordinator(ctx: &Ctx, key_type: i8) -> (i16, Option<&'static str>, i32, String, i32) {
    match key_type {
        KEY_TYPE_GROUP => (0, None, ctx.config.node_id, ctx.host.clone(), ctx.port),
        KEY_TYPE_TRANSACTION => (
            ErrorCode::CoordinatorNotAvailable.code(),
            Some("transactions are not supported"),
            -1,
            String::new(),
            -1,
        ),
        _ => (
            ErrorCode::InvalidRequest.code(),
            Some("unknown coordinator key type"),
            -1,
            String::new(),
            -1,
        ),
    }
}

pub(crate) fn find_coordinator(
    ctx: &Ctx,
    req: FindCoordinatorRequest,
    version: i16,
) -> FindCoordinatorResponse {
    if version < 4 {
        let (error, message, node, host, port) = coordinator(ctx, req.key_type);
        let mut resp = FindCoordinatorResponse::default()
            .with_error_code(error)
            .with_node_id(BrokerId(node))
            .with_host(str_bytes(&host))
            .with_port(port);
        if version >= 1 {
            resp.error_message = message.map(str_bytes);
        }
        return resp;
    }
    let coordinators = req
        .coordinator_keys
        .into_iter()
        .map(|key| {
            let (error, message, node, host, port) = coordinator(ctx, req.key_type);
            Coordinator::default()
                .with_key(key)
                .with_node_id(BrokerId(node))
                .with_host(str_bytes(&host))
                .with_port(port)
                .with_error_code(error)
                .with_error_message(message.map(str_bytes))
        })
        .collect();
    FindCoordinatorResponse::default().with_coordinators(coordinators)
}

pub(crate) fn init_producer_id(ctx: &Ctx, req: InitProducerIdRequest) -> InitProducerIdResponse {
    let resp = InitProducerIdResponse::default()
        .with_producer_id(ProducerId(-1))
        .with_producer_epoch(-1);
    if req
        .transactional_id
        .as_ref()
        .is_some_and(|id| !id.0.is_empty())
    {
        // Transactions are not supported; a fatal, explicit error beats a
        // retriable one the client would loop on.
        return resp.with_error_code(ErrorCode::TransactionalIdAuthorizationFailed.code());
    }
    // Idempotent producers get a fresh id on every (re)initialisation, as
    // Kafka does for producers without a transactional id.
    match ctx.store.next_producer_id() {
        Ok(id) => resp.with_producer_id(ProducerId(id)).with_producer_epoch(0),
        Err(err) => resp.with_error_code(err.error_code().code()),
    }
}

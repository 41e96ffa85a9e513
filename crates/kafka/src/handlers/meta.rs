//! ApiVersions, Metadata, DescribeCluster, FindCoordinator and InitProducerId,
//! answered from the metadata image and the quorum.

use std::sync::Arc;
use std::time::Duration;

use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::describe_cluster_response::DescribeClusterBroker;
use kafka_protocol::messages::find_coordinator_response::Coordinator;
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::*;
use sluice_topology::{wait_image, Command, MetadataImage, TopicState, NO_LEADER};
use sluice_vocab::internal::{is_internal, OFFSETS_TOPIC, TRANSACTION_STATE_TOPIC};
use sluice_vocab::{ErrorCode, TopicName as ValidTopicName};
use uuid::Uuid;

use super::{str_bytes, topic_name};
use crate::api_versions::SUPPORTED_APIS;
use crate::dispatch::{later, now, Hdr, Outcome};
use crate::server::Ctx;

/// FindCoordinator key types.
const KEY_TYPE_GROUP: i8 = 0;
const KEY_TYPE_TRANSACTION: i8 = 1;

/// DescribeCluster endpoint type of brokers.
const ENDPOINT_TYPE_BROKERS: i8 = 1;

/// How long a Metadata request waits for topics it auto-creates.
const AUTO_CREATE_WAIT: Duration = Duration::from_secs(3);

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

/// Replication factor of `replication_factor: -1`.
pub(crate) fn default_replication_factor(image: &MetadataImage) -> i16 {
    image.default_replication_factor()
}

/// A topic a Metadata request names.
#[derive(Clone, Debug)]
pub(crate) enum Wanted {
    Name(TopicName),
    Id(Uuid),
}

/// The error for a named topic the image does not have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Missing {
    /// Being auto-created: LEADER_NOT_AVAILABLE (the client retries).
    Creating,
    /// UNKNOWN_TOPIC_OR_PARTITION.
    Unknown,
}

/// Registered, unfenced brokers with their advertised Kafka endpoint.
pub(crate) fn live_endpoints(image: &MetadataImage) -> Vec<(i32, String, i32)> {
    image
        .brokers
        .iter()
        .filter(|(_, b)| !b.fenced)
        .map(|(id, b)| (*id, b.kafka_host.clone(), i32::from(b.kafka_port)))
        .collect()
}

fn partition_metadata(
    image: &MetadataImage,
    index: usize,
    p: &sluice_topology::PartitionState,
) -> MetadataResponsePartition {
    let ids = |v: &[i32]| v.iter().map(|&b| BrokerId(b)).collect::<Vec<_>>();
    let offline: Vec<BrokerId> = p
        .replicas
        .iter()
        .filter(|&&r| !image.is_live(r))
        .map(|&r| BrokerId(r))
        .collect();
    let leader = if p.leader != NO_LEADER && image.is_live(p.leader) {
        p.leader
    } else {
        NO_LEADER
    };
    let error = if leader == NO_LEADER {
        ErrorCode::LeaderNotAvailable.code()
    } else {
        0
    };
    MetadataResponsePartition::default()
        .with_error_code(error)
        .with_partition_index(i32::try_from(index).unwrap_or(i32::MAX))
        .with_leader_id(BrokerId(leader))
        .with_leader_epoch(p.leader_epoch)
        .with_replica_nodes(ids(&p.replicas))
        .with_isr_nodes(ids(&p.isr))
        .with_offline_replicas(offline)
}

pub(crate) fn topic_metadata(
    image: &MetadataImage,
    name: &str,
    t: &TopicState,
) -> MetadataResponseTopic {
    let partitions = t
        .partitions
        .iter()
        .enumerate()
        .map(|(i, p)| partition_metadata(image, i, p))
        .collect();
    MetadataResponseTopic::default()
        .with_name(Some(topic_name(name)))
        .with_topic_id(Uuid::from_bytes(t.topic_id))
        .with_is_internal(is_internal(name))
        .with_partitions(partitions)
}

/// Builds a Metadata answer from an image: `wanted` None means every topic;
/// names the image lacks get `missing`'s error (INVALID_TOPIC_EXCEPTION for
/// a name Kafka would refuse).
pub(crate) fn build_metadata(
    image: &MetadataImage,
    controller_id: Option<i32>,
    cluster_id: &str,
    wanted: Option<Vec<Wanted>>,
    missing: Missing,
) -> MetadataResponse {
    let topics = match wanted {
        None => image
            .topics
            .iter()
            .map(|(name, t)| topic_metadata(image, name, t))
            .collect(),
        Some(list) => list
            .into_iter()
            .map(|w| match w {
                Wanted::Name(name) => match image.topics.get(name.0.as_str()) {
                    Some(t) => topic_metadata(image, name.0.as_str(), t),
                    None => {
                        let code = if ValidTopicName::validate(name.0.as_str()).is_err() {
                            ErrorCode::InvalidTopicException.code()
                        } else if missing == Missing::Creating {
                            ErrorCode::LeaderNotAvailable.code()
                        } else {
                            ErrorCode::UnknownTopicOrPartition.code()
                        };
                        MetadataResponseTopic::default()
                            .with_error_code(code)
                            .with_name(Some(name))
                    }
                },
                Wanted::Id(id) => {
                    let bytes = *id.as_bytes();
                    match image.topics.iter().find(|(_, t)| t.topic_id == bytes) {
                        Some((name, t)) => topic_metadata(image, name, t),
                        None => MetadataResponseTopic::default()
                            .with_error_code(ErrorCode::UnknownTopicId.code())
                            .with_topic_id(id),
                    }
                }
            })
            .collect(),
    };
    let brokers = live_endpoints(image)
        .into_iter()
        .map(|(id, host, port)| {
            MetadataResponseBroker::default()
                .with_node_id(BrokerId(id))
                .with_host(str_bytes(&host))
                .with_port(port)
        })
        .collect();
    MetadataResponse::default()
        .with_brokers(brokers)
        .with_cluster_id(Some(str_bytes(cluster_id)))
        .with_controller_id(BrokerId(controller_id.unwrap_or(-1)))
        .with_topics(topics)
}

fn cluster_id(ctx: &Ctx, image: &MetadataImage) -> String {
    if image.cluster_id.is_empty() {
        ctx.topology.store().cluster_id()
    } else {
        image.cluster_id.clone()
    }
}

/// What a Metadata request asks for: None is every topic.
fn wanted(req: &MetadataRequest, version: i16) -> Option<Vec<Wanted>> {
    match &req.topics {
        None => None,
        // v0 has no null: an empty list means every topic.
        Some(list) if list.is_empty() && version == 0 => None,
        Some(list) => Some(
            list.iter()
                .map(|t| match &t.name {
                    // Some clients send "" rather than null next to a topic id.
                    Some(name) if !name.0.is_empty() || t.topic_id.is_nil() => {
                        Wanted::Name(name.clone())
                    }
                    _ => Wanted::Id(t.topic_id),
                })
                .collect(),
        ),
    }
}

/// Proposes an auto-created topic (default partitions, RF min(3, live)).
/// Ok when it exists afterwards (created by us or someone else).
async fn auto_create(ctx: &Ctx, name: &str) -> Result<(), sluice_vocab::Refused> {
    let image = ctx.topology.image();
    let cmd = Command::CreateTopic {
        name: name.to_owned(),
        partitions: i32::try_from(ctx.config.default_partitions.max(1)).unwrap_or(1),
        replication_factor: default_replication_factor(&image),
        configs: Default::default(),
    };
    match ctx.topology.propose(cmd).await {
        Ok(_) => {
            tracing::info!(topic = name, "auto-created topic");
            Ok(())
        }
        Err(refused) if refused.code == ErrorCode::TopicAlreadyExists => Ok(()),
        Err(refused) => Err(refused),
    }
}

/// Produce to an unknown topic: create it without holding the request.
pub(crate) fn auto_create_in_background(ctx: &Arc<Ctx>, name: &str) {
    if !ctx.config.auto_create_topics
        || is_internal(name)
        || ValidTopicName::validate(name).is_err()
        || ctx.topology.image().topics.contains_key(name)
    {
        return;
    }
    let (ctx, name) = (ctx.clone(), name.to_owned());
    tokio::spawn(async move {
        if let Err(refused) = auto_create(&ctx, &name).await {
            tracing::warn!(topic = %name, error = %refused, "auto-create failed");
        }
    });
}

pub(crate) fn metadata(ctx: &Arc<Ctx>, req: MetadataRequest, h: Hdr) -> Outcome {
    let version = h.version;
    // Before v4 there is no flag and Kafka auto-creates.
    let allow_create =
        (version < 4 || req.allow_auto_topic_creation) && ctx.config.auto_create_topics;
    let wanted = wanted(&req, version);
    let image = ctx.topology.image();
    let missing = if allow_create {
        Missing::Creating
    } else {
        Missing::Unknown
    };
    let unknown = unknown_names(&wanted, &image);
    if unknown.is_empty() {
        return now(h, &answer(ctx, &image, wanted, missing));
    }
    let ctx = ctx.clone();
    later(h, async move {
        // A topic this node does not know may have been created through another node a
        // moment ago: catch up with the controller before calling it unknown (or
        // auto-creating it), so a client that created a topic anywhere sees it here.
        let topology = ctx.topology.as_ref();
        if let Some(index) = topology.catch_up().await {
            wait_image(topology, AUTO_CREATE_WAIT, |image| {
                image.applied_index >= index
            })
            .await;
        }
        let image = topology.image();
        let to_create: Vec<String> = if allow_create {
            unknown_names(&wanted, &image)
                .into_iter()
                .filter(|n| !is_internal(n) && ValidTopicName::validate(n).is_ok())
                .collect()
        } else {
            Vec::new()
        };
        if !to_create.is_empty() {
            let results =
                futures::future::join_all(to_create.iter().map(|n| auto_create(&ctx, n))).await;
            for (name, result) in to_create.iter().zip(&results) {
                if let Err(refused) = result {
                    tracing::warn!(topic = %name, error = %refused, "auto-create failed");
                }
            }
            wait_image(topology, AUTO_CREATE_WAIT, |image| {
                to_create.iter().all(|n| image.topics.contains_key(n))
            })
            .await;
        }
        answer(&ctx, &topology.image(), wanted, missing)
    })
}

/// The Metadata answer from `image`, without leaders when this node's view may
/// be stale.
fn answer(
    ctx: &Ctx,
    image: &MetadataImage,
    wanted: Option<Vec<Wanted>>,
    missing: Missing,
) -> MetadataResponse {
    let cluster_id = cluster_id(ctx, image);
    guard_stale(
        ctx,
        build_metadata(
            image,
            ctx.topology.controller_id(),
            &cluster_id,
            wanted,
            missing,
        ),
    )
}

/// A node cut off from the controller for a session (partitioned, or just
/// unpaused) may hold a stale image that still names it, or another departed
/// node, as a leader. It names no leaders then (LEADER_NOT_AVAILABLE), so
/// clients refresh their metadata from another node instead of retrying a
/// leader that moved.
fn guard_stale(ctx: &Ctx, mut resp: MetadataResponse) -> MetadataResponse {
    if ctx.topology.stale_view().is_none() {
        return resp;
    }
    for t in &mut resp.topics {
        for p in &mut t.partitions {
            if p.error_code == 0 {
                p.error_code = ErrorCode::LeaderNotAvailable.code();
            }
            p.leader_id = BrokerId(NO_LEADER);
        }
    }
    resp
}

/// Topics requested by name that the image does not hold.
fn unknown_names(wanted: &Option<Vec<Wanted>>, image: &MetadataImage) -> Vec<String> {
    match wanted {
        Some(list) => list
            .iter()
            .filter_map(|w| match w {
                Wanted::Name(n) => Some(n.0.to_string()),
                Wanted::Id(_) => None,
            })
            .filter(|n| !image.topics.contains_key(n))
            .collect(),
        None => Vec::new(),
    }
}

pub(crate) fn describe_cluster(
    ctx: &Ctx,
    req: DescribeClusterRequest,
    version: i16,
) -> DescribeClusterResponse {
    let image = ctx.topology.image();
    let mut resp = DescribeClusterResponse::default()
        .with_cluster_id(str_bytes(&cluster_id(ctx, &image)))
        .with_controller_id(BrokerId(ctx.topology.controller_id().unwrap_or(-1)));
    if version >= 1 && req.endpoint_type != ENDPOINT_TYPE_BROKERS {
        return resp
            .with_error_code(ErrorCode::UnsupportedEndpointType.code())
            .with_error_message(Some(str_bytes("only broker endpoints are served")));
    }
    resp.brokers = live_endpoints(&image)
        .into_iter()
        .map(|(id, host, port)| {
            DescribeClusterBroker::default()
                .with_broker_id(BrokerId(id))
                .with_host(str_bytes(&host))
                .with_port(port)
        })
        .collect();
    resp
}

/// (error, message, node, host, port) of the coordinator for `key_type`:
/// groups are coordinated by the leader of `__consumer_offsets-0`,
/// transactions by the leader of `__transaction_state-0`.
pub(crate) fn coordinator(
    image: &MetadataImage,
    key_type: i8,
) -> (i16, Option<&'static str>, i32, String, i32) {
    let none = |code: i16, message: &'static str| (code, Some(message), -1, String::new(), -1);
    let (topic, no_leader) = match key_type {
        KEY_TYPE_GROUP => (OFFSETS_TOPIC, "the offsets topic has no leader"),
        KEY_TYPE_TRANSACTION => (
            TRANSACTION_STATE_TOPIC,
            "the transaction state topic has no leader",
        ),
        _ => {
            return none(
                ErrorCode::InvalidRequest.code(),
                "unknown coordinator key type",
            )
        }
    };
    let leader = image.partition(topic, 0).map_or(NO_LEADER, |p| p.leader);
    match image.brokers.get(&leader).filter(|b| !b.fenced) {
        Some(b) => (
            0,
            None,
            leader,
            b.kafka_host.clone(),
            i32::from(b.kafka_port),
        ),
        None => none(ErrorCode::CoordinatorNotAvailable.code(), no_leader),
    }
}

pub(crate) fn find_coordinator(
    ctx: &Ctx,
    req: FindCoordinatorRequest,
    version: i16,
) -> FindCoordinatorResponse {
    let image = ctx.topology.image();
    if version < 4 {
        let (error, message, node, host, port) = coordinator(&image, req.key_type);
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
    let (error, message, node, host, port) = coordinator(&image, req.key_type);
    let coordinators = req
        .coordinator_keys
        .into_iter()
        .map(|key| {
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

pub(crate) fn init_producer_id(ctx: &Arc<Ctx>, req: InitProducerIdRequest, h: Hdr) -> Outcome {
    let resp = InitProducerIdResponse::default()
        .with_producer_id(ProducerId(-1))
        .with_producer_epoch(-1);
    if let Some(id) = req.transactional_id.as_ref().filter(|id| !id.0.is_empty()) {
        let id = id.0.to_string();
        // KIP-360: the id and epoch the producer had, if it had one.
        let expected = (req.producer_id.0 >= 0).then_some((req.producer_id.0, req.producer_epoch));
        let ctx = ctx.clone();
        let version = h.version;
        return later(h, async move {
            match ctx
                .txns
                .init_producer_id(&id, req.transaction_timeout_ms, expected)
                .await
            {
                Ok((pid, epoch)) => resp
                    .with_producer_id(ProducerId(pid))
                    .with_producer_epoch(epoch),
                Err(code) => resp.with_error_code(super::txn::fenced_as(code, version, 4).code()),
            }
        });
    }
    let ctx = ctx.clone();
    later(h, async move {
        match ctx.topology.next_producer_id().await {
            Ok(id) => resp.with_producer_id(ProducerId(id)).with_producer_epoch(0),
            Err(refused) => {
                tracing::warn!(error = %refused, "cannot allocate producer ids");
                // Whatever kept the quorum from answering, the client's
                // retriable answer for InitProducerId is this one.
                resp.with_error_code(ErrorCode::CoordinatorNotAvailable.code())
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use kafka_protocol::messages::TopicName;
    use kafka_protocol::protocol::{Encodable, StrBytes};
    use sluice_topology::{BrokerState, PartitionState, TopicState};

    use super::*;

    fn broker(port: u16, fenced: bool) -> BrokerState {
        BrokerState {
            kafka_host: "h".into(),
            kafka_port: port,
            raft_addr: String::new(),
            replica_addr: String::new(),
            endpoints: Default::default(),
            fenced,
            draining: false,
            incarnation: 1,
            epoch: 1,
        }
    }

    fn partition(replicas: &[i32], isr: &[i32], leader: i32, epoch: i32) -> PartitionState {
        PartitionState {
            replicas: replicas.to_vec(),
            isr: isr.to_vec(),
            leader,
            leader_epoch: epoch,
            partition_epoch: 0,
            target_replicas: None,
            original_replicas: None,
        }
    }

    /// Brokers 1, 2 live and 3 fenced; topic "t": p0 led by 1, p1 offline.
    fn image() -> MetadataImage {
        let mut image = MetadataImage {
            cluster_id: "cid".into(),
            ..Default::default()
        };
        image.brokers.insert(1, broker(9001, false));
        image.brokers.insert(2, broker(9002, false));
        image.brokers.insert(3, broker(9003, true));
        image.topics.insert(
            "t".into(),
            TopicState {
                topic_id: [7; 16],
                configs: Default::default(),
                partitions: vec![
                    partition(&[1, 2, 3], &[1, 2], 1, 4),
                    partition(&[3], &[3], NO_LEADER, 2),
                ],
            },
        );
        image
    }

    fn name(s: &str) -> TopicName {
        TopicName(StrBytes::from_string(s.to_owned()))
    }

    #[test]
    fn metadata_from_the_image() {
        let image = image();
        let resp = build_metadata(&image, Some(2), "cid", None, Missing::Unknown);
        let brokers: Vec<(i32, i32)> = resp.brokers.iter().map(|b| (b.node_id.0, b.port)).collect();
        assert_eq!(
            brokers,
            vec![(1, 9001), (2, 9002)],
            "fenced broker 3 is not listed"
        );
        assert_eq!(resp.controller_id.0, 2);
        assert_eq!(resp.topics.len(), 1);
        let t = &resp.topics[0];
        assert_eq!(t.topic_id.as_bytes(), &[7; 16]);
        let p0 = &t.partitions[0];
        assert_eq!((p0.error_code, p0.leader_id.0, p0.leader_epoch), (0, 1, 4));
        assert_eq!(
            p0.replica_nodes.iter().map(|b| b.0).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(
            p0.isr_nodes.iter().map(|b| b.0).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(
            p0.offline_replicas.iter().map(|b| b.0).collect::<Vec<_>>(),
            vec![3]
        );
        let p1 = &t.partitions[1];
        assert_eq!(p1.error_code, ErrorCode::LeaderNotAvailable.code());
        assert_eq!(p1.leader_id.0, -1);
        for v in 0..=12 {
            let mut buf = bytes::BytesMut::new();
            resp.encode(&mut buf, v).expect("encodes");
        }
    }

    #[test]
    fn metadata_for_named_and_missing_topics() {
        let image = image();
        let wanted = vec![
            Wanted::Name(name("t")),
            Wanted::Name(name("nope")),
            Wanted::Name(name("bad name")),
            Wanted::Id(uuid::Uuid::from_bytes([7; 16])),
            Wanted::Id(uuid::Uuid::from_bytes([9; 16])),
        ];
        let codes = |missing| {
            build_metadata(&image, None, "cid", Some(wanted.clone()), missing)
                .topics
                .iter()
                .map(|t| t.error_code)
                .collect::<Vec<_>>()
        };
        assert_eq!(codes(Missing::Unknown), vec![0, 3, 17, 0, 100]);
        assert_eq!(codes(Missing::Creating), vec![0, 5, 17, 0, 100]);
        let resp = build_metadata(&image, None, "cid", Some(wanted), Missing::Unknown);
        assert_eq!(resp.controller_id.0, -1);
        assert_eq!(
            resp.topics[3].name.as_ref().map(|n| n.0.as_str()),
            Some("t")
        );
    }

    #[test]
    fn coordinator_is_the_offsets_leader() {
        let mut image = image();
        let (code, _, node, ..) = coordinator(&image, 0);
        assert_eq!(
            (code, node),
            (ErrorCode::CoordinatorNotAvailable.code(), -1)
        );
        image.topics.insert(
            OFFSETS_TOPIC.into(),
            TopicState {
                topic_id: [1; 16],
                configs: Default::default(),
                partitions: vec![partition(&[2, 1], &[2, 1], 2, 0)],
            },
        );
        let (code, _, node, host, port) = coordinator(&image, 0);
        assert_eq!((code, node, host.as_str(), port), (0, 2, "h", 9002));
        // A fenced leader is no coordinator.
        image.brokers.insert(2, broker(9002, true));
        assert_eq!(
            coordinator(&image, 0).0,
            ErrorCode::CoordinatorNotAvailable.code()
        );
        assert_eq!(
            coordinator(&image, 1).0,
            ErrorCode::CoordinatorNotAvailable.code()
        );
    }
}

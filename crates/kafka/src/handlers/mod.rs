//! Request handlers, one module per area. Each is written once, against the
//! topology seam.

pub(crate) mod admin;
pub(crate) mod configs;
pub(crate) mod fetch;
pub(crate) mod log_dirs;
pub(crate) mod meta;
pub(crate) mod offsets;
pub(crate) mod placement;
pub(crate) mod produce;
pub(crate) mod quotas;
pub(crate) mod txn;
pub(crate) mod unsupported;

use kafka_protocol::messages::TopicName;
use kafka_protocol::protocol::StrBytes;
use sluice_topology::MetadataImage;
use sluice_vocab::ErrorCode;
use uuid::Uuid;

use crate::server::Ctx;

pub(crate) fn str_bytes(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_owned())
}

pub(crate) fn topic_name(s: &str) -> TopicName {
    TopicName(str_bytes(s))
}

/// The name of the topic with this id, from the image (this node need not host
/// the topic).
pub(crate) fn topic_name_by_id(ctx: &Ctx, id: Uuid) -> Option<String> {
    if id.is_nil() {
        return None;
    }
    let id = *id.as_bytes();
    let image = ctx.topology.image();
    let found = image
        .topics
        .iter()
        .find(|(_, t)| t.topic_id == id)
        .map(|(name, _)| name.clone());
    found
}

/// Where a partition's leader is now, for a client that asked another node
/// (KIP-951: Produce v10+ and Fetch v12+/v16+ carry it, so the client
/// goes there at once instead of first refreshing its metadata).
pub(crate) struct LeaderHint {
    pub id: i32,
    pub epoch: i32,
    pub host: String,
    pub port: i32,
}

/// Whether `code` tells the client that the partition is led elsewhere.
pub(crate) fn leads_elsewhere(code: i16) -> bool {
    code == ErrorCode::NotLeaderOrFollower.code() || code == ErrorCode::FencedLeaderEpoch.code()
}

/// The leader of `topic`-`partition` in `image` when it is a live node
/// other than this one.
pub(crate) fn leader_hint(
    ctx: &Ctx,
    image: &MetadataImage,
    topic: &str,
    partition: i32,
) -> Option<LeaderHint> {
    let state = image
        .topics
        .get(topic)?
        .partitions
        .get(usize::try_from(partition).ok()?)?;
    if state.leader == ctx.topology.node_id() {
        return None;
    }
    let broker = image.brokers.get(&state.leader).filter(|b| !b.fenced)?;
    Some(LeaderHint {
        id: state.leader,
        epoch: state.leader_epoch,
        host: broker.kafka_host.clone(),
        port: i32::from(broker.kafka_port),
    })
}

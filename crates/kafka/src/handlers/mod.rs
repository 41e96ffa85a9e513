//! Request handlers, one module per area. Each is written once, against the
//! topology seam.

pub(crate) mod admin;
pub(crate) mod configs;
pub(crate) mod fetch;
pub(crate) mod meta;
pub(crate) mod offsets;
pub(crate) mod produce;
pub(crate) mod txn;
pub(crate) mod unsupported;

use kafka_protocol::messages::TopicName;
use kafka_protocol::protocol::StrBytes;
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

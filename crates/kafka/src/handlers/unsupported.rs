//! Answers to versions outside SUPPORTED_APIS.

use std::sync::Arc;

use bytes::Bytes;
use kafka_protocol::messages::ApiKey;
use kafka_protocol::ResponseError;

use crate::dispatch::{now_at, Hdr, Outcome};
use crate::server::Ctx;

/// ApiVersions of a version we do not serve gets UNSUPPORTED_VERSION with
/// our table, encoded at v0 (as Kafka does) so any client can read it and
/// retry with a version we serve. For other APIs the client negotiated
/// versions through ApiVersions first, so an unsupported version is a
/// misbehaving client: the connection is closed with one log line.
pub(crate) fn respond(ctx: &Arc<Ctx>, h: Hdr, body: Bytes) -> Outcome {
    let _ = (ctx, body);
    if h.api == ApiKey::ApiVersions {
        let resp = super::meta::api_versions(ResponseError::UnsupportedVersion.code());
        return now_at(h, 0, &resp);
    }
    tracing::warn!(peer = %h.peer, api = ?h.api, version = h.version,
        "closing connection: unsupported api version");
    Outcome::Close
}

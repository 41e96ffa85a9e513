//! The AMQP part of the HTTP API: queues (with their counts and rates),
//! exchanges and bindings, as `sluice queue|exchange|binding` use them. A virtual
//! host in a path is percent-encoded (`%2F` for `/`), as in RabbitMQ's API.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State as Extract};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use sluice_amqp::{AdminError, BindingSpec, DestinationKind, ExchangeSpec, FieldTableText};

use crate::http::State;

pub fn routes() -> Router<State> {
    Router::new()
        .route("/api/v1/vhosts", get(vhosts))
        .route(
            "/api/v1/vhosts/{name}",
            put(create_vhost).delete(delete_vhost),
        )
        .route("/api/v1/queues", get(queues))
        .route(
            "/api/v1/queues/{vhost}/{name}",
            put(declare_queue).delete(delete_queue),
        )
        .route(
            "/api/v1/queues/{vhost}/{name}/contents",
            axum::routing::delete(purge_queue),
        )
        .route("/api/v1/queues/{vhost}/{name}/get", post(get_messages))
        .route("/api/v1/exchanges", get(exchanges))
        .route(
            "/api/v1/exchanges/{vhost}/{name}",
            put(declare_exchange).delete(delete_exchange),
        )
        .route("/api/v1/bindings", get(bindings).post(add_binding))
        .route("/api/v1/bindings/delete", post(remove_binding))
}

const STARTING: (StatusCode, &str) = (StatusCode::SERVICE_UNAVAILABLE, "starting\n");

fn refused(e: AdminError) -> Response {
    let status = match e.code {
        403 => StatusCode::FORBIDDEN,
        404 => StatusCode::NOT_FOUND,
        405 => StatusCode::CONFLICT,
        406 | 501..=540 => StatusCode::BAD_REQUEST,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    (status, Json(json!({ "error": e.code, "reason": e.text }))).into_response()
}

async fn vhosts(Extract(state): Extract<State>) -> Response {
    match state.amqp() {
        Some(a) => Json(a.vhosts()).into_response(),
        None => STARTING.into_response(),
    }
}

async fn create_vhost(Extract(state): Extract<State>, Path(name): Path<String>) -> Response {
    let Some(a) = state.amqp() else {
        return STARTING.into_response();
    };
    match a.create_vhost(&name).await {
        Ok(()) => (StatusCode::CREATED, Json(json!({ "vhost": name }))).into_response(),
        Err(e) => refused(e),
    }
}

async fn delete_vhost(Extract(state): Extract<State>, Path(name): Path<String>) -> Response {
    let Some(a) = state.amqp() else {
        return STARTING.into_response();
    };
    match a.delete_vhost(&name).await {
        Ok(()) => (StatusCode::NO_CONTENT, "").into_response(),
        Err(e) => refused(e),
    }
}

async fn queues(Extract(state): Extract<State>) -> Response {
    match state.amqp() {
        Some(a) => Json(a.queues().await).into_response(),
        None => STARTING.into_response(),
    }
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct QueueBody {
    durable: Option<bool>,
    auto_delete: bool,
    arguments: BTreeMap<String, String>,
}

async fn declare_queue(
    Extract(state): Extract<State>,
    Path((vhost, name)): Path<(String, String)>,
    body: Option<Json<QueueBody>>,
) -> Response {
    let Some(a) = state.amqp() else {
        return STARTING.into_response();
    };
    let b = body.map(|Json(b)| b).unwrap_or_default();
    let args = FieldTableText(b.arguments);
    match a
        .declare_queue(
            &vhost,
            &name,
            b.durable.unwrap_or(true),
            b.auto_delete,
            &args,
        )
        .await
    {
        Ok(()) => (StatusCode::CREATED, Json(json!({ "queue": name }))).into_response(),
        Err(e) => refused(e),
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct DeleteQuery {
    if_unused: bool,
    if_empty: bool,
}

async fn delete_queue(
    Extract(state): Extract<State>,
    Path((vhost, name)): Path<(String, String)>,
    Query(q): Query<DeleteQuery>,
) -> Response {
    let Some(a) = state.amqp() else {
        return STARTING.into_response();
    };
    match a.delete_queue(&vhost, &name, q.if_unused, q.if_empty).await {
        Ok(n) => Json(json!({ "message_count": n })).into_response(),
        Err(e) => refused(e),
    }
}

async fn purge_queue(
    Extract(state): Extract<State>,
    Path((vhost, name)): Path<(String, String)>,
) -> Response {
    let Some(a) = state.amqp() else {
        return STARTING.into_response();
    };
    match a.purge_queue(&vhost, &name).await {
        Ok(n) => Json(json!({ "message_count": n })).into_response(),
        Err(e) => refused(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetBody {
    count: usize,
    /// Put the messages back (flagged redelivered) instead of acknowledging them.
    #[serde(default)]
    requeue: bool,
}

/// Most messages one `get` takes.
const MAX_GET: usize = 10_000;

async fn get_messages(
    Extract(state): Extract<State>,
    Path((vhost, name)): Path<(String, String)>,
    Json(b): Json<GetBody>,
) -> Response {
    let Some(a) = state.amqp() else {
        return STARTING.into_response();
    };
    match a.get(&vhost, &name, b.count.min(MAX_GET), b.requeue).await {
        Ok(messages) => Json(messages).into_response(),
        Err(e) => refused(e),
    }
}

async fn exchanges(Extract(state): Extract<State>) -> Response {
    match state.amqp() {
        Some(a) => Json(a.exchanges()).into_response(),
        None => STARTING.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExchangeBody {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default = "yes")]
    durable: bool,
    #[serde(default)]
    auto_delete: bool,
    #[serde(default)]
    internal: bool,
    #[serde(default)]
    arguments: BTreeMap<String, String>,
}

fn yes() -> bool {
    true
}

async fn declare_exchange(
    Extract(state): Extract<State>,
    Path((vhost, name)): Path<(String, String)>,
    Json(b): Json<ExchangeBody>,
) -> Response {
    let Some(a) = state.amqp() else {
        return STARTING.into_response();
    };
    let spec = ExchangeSpec {
        kind: b.kind,
        durable: b.durable,
        auto_delete: b.auto_delete,
        internal: b.internal,
        arguments: FieldTableText(b.arguments),
    };
    match a.declare_exchange(&vhost, &name, &spec).await {
        Ok(()) => (StatusCode::CREATED, Json(json!({ "exchange": name }))).into_response(),
        Err(e) => refused(e),
    }
}

async fn delete_exchange(
    Extract(state): Extract<State>,
    Path((vhost, name)): Path<(String, String)>,
) -> Response {
    let Some(a) = state.amqp() else {
        return STARTING.into_response();
    };
    match a.delete_exchange(&vhost, &name).await {
        Ok(()) => (StatusCode::NO_CONTENT, "").into_response(),
        Err(e) => refused(e),
    }
}

async fn bindings(Extract(state): Extract<State>) -> Response {
    match state.amqp() {
        Some(a) => Json(a.bindings()).into_response(),
        None => STARTING.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BindingBody {
    #[serde(default = "default_vhost")]
    vhost: String,
    source: String,
    destination: String,
    /// `queue` (default) or `exchange`.
    #[serde(default = "queue_kind")]
    destination_type: String,
    #[serde(default)]
    routing_key: String,
    #[serde(default)]
    arguments: BTreeMap<String, String>,
}

fn default_vhost() -> String {
    sluice_amqp::DEFAULT_VHOST.to_owned()
}

fn queue_kind() -> String {
    "queue".to_owned()
}

fn kind(b: &BindingBody) -> Option<DestinationKind> {
    match b.destination_type.as_str() {
        "queue" => Some(DestinationKind::Queue),
        "exchange" => Some(DestinationKind::Exchange),
        _ => None,
    }
}

fn bad_kind(b: &BindingBody) -> Response {
    let reason = format!(
        "destination_type '{}' is neither queue nor exchange",
        b.destination_type
    );
    (
        StatusCode::BAD_REQUEST,
        Json(json!({ "error": 406, "reason": reason })),
    )
        .into_response()
}

async fn add_binding(Extract(state): Extract<State>, Json(b): Json<BindingBody>) -> Response {
    change_binding(&state, b, true).await
}

async fn remove_binding(Extract(state): Extract<State>, Json(b): Json<BindingBody>) -> Response {
    change_binding(&state, b, false).await
}

async fn change_binding(state: &State, b: BindingBody, add: bool) -> Response {
    let Some(a) = state.amqp() else {
        return STARTING.into_response();
    };
    let Some(kind) = kind(&b) else {
        return bad_kind(&b);
    };
    let spec = BindingSpec {
        source: b.source,
        destination: b.destination,
        kind,
        routing_key: b.routing_key,
        arguments: FieldTableText(b.arguments),
    };
    let done = if add {
        a.bind(&b.vhost, &spec).await
    } else {
        a.unbind(&b.vhost, &spec).await
    };
    match (done, add) {
        (Ok(()), true) => (StatusCode::CREATED, "").into_response(),
        (Ok(()), false) => (StatusCode::NO_CONTENT, "").into_response(),
        (Err(e), _) => refused(e),
    }
}

//! Users and their permissions in the HTTP API, as `sluice user` and
//! `sluice permission` use them (RabbitMQ's management API has the same
//! shape). A password arrives here and leaves only as a salted credential
//! (`sluice_auth`): the quorum never holds it.

use std::collections::BTreeSet;

use axum::extract::{Path, State as Extract};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sluice_auth::Credential;
use sluice_topology::access::{AccessCommand, Permission};
use sluice_topology::{Command, Topology};
use sluice_vocab::{ErrorCode, Refused};

use crate::http::State;

pub fn routes() -> Router<State> {
    Router::new()
        .route("/api/v1/users", get(users))
        .route("/api/v1/users/{name}", put(put_user).delete(delete_user))
        .route(
            "/api/v1/permissions/{vhost}/{user}",
            put(set_permission).delete(clear_permission),
        )
}

const STARTING: (StatusCode, &str) = (StatusCode::SERVICE_UNAVAILABLE, "starting\n");

#[derive(Serialize)]
struct UserInfo {
    name: String,
    tags: BTreeSet<String>,
    /// Virtual hosts the user may use.
    vhosts: Vec<String>,
}

async fn users(Extract(state): Extract<State>) -> Response {
    let Some(node) = state.node() else {
        return STARTING.into_response();
    };
    let image = node.image();
    let list: Vec<UserInfo> = image
        .access
        .users
        .iter()
        .map(|(name, u)| UserInfo {
            name: name.clone(),
            tags: u.tags.clone(),
            vhosts: u.permissions.keys().cloned().collect(),
        })
        .collect();
    Json(list).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserBody {
    password: String,
    #[serde(default)]
    tags: BTreeSet<String>,
}

async fn put_user(
    Extract(state): Extract<State>,
    Path(name): Path<String>,
    Json(b): Json<UserBody>,
) -> Response {
    let Some(node) = state.node() else {
        return STARTING.into_response();
    };
    let existed = node.image().access.users.contains_key(&name);
    let password = b.password.into_bytes();
    // PBKDF2 costs milliseconds by design: off the async workers.
    let Ok(credential) = tokio::task::spawn_blocking(move || Credential::derive(&password)).await
    else {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "credential derivation failed\n",
        )
            .into_response();
    };
    let cmd = AccessCommand::PutUser {
        name: name.clone(),
        credential,
        tags: b.tags,
    };
    match propose(&**node, cmd).await {
        Ok(()) if existed => (StatusCode::NO_CONTENT, "").into_response(),
        Ok(()) => (StatusCode::CREATED, Json(json!({ "user": name }))).into_response(),
        Err(r) => refused(&r),
    }
}

async fn delete_user(Extract(state): Extract<State>, Path(name): Path<String>) -> Response {
    let Some(node) = state.node() else {
        return STARTING.into_response();
    };
    match propose(&**node, AccessCommand::DeleteUser { name }).await {
        Ok(()) => (StatusCode::NO_CONTENT, "").into_response(),
        Err(r) => refused(&r),
    }
}

async fn set_permission(
    Extract(state): Extract<State>,
    Path((vhost, user)): Path<(String, String)>,
) -> Response {
    let Some(node) = state.node() else {
        return STARTING.into_response();
    };
    let cmd = AccessCommand::SetPermission {
        user,
        vhost,
        permission: Permission::full(),
    };
    match propose(&**node, cmd).await {
        Ok(()) => (StatusCode::CREATED, "").into_response(),
        Err(r) => refused(&r),
    }
}

async fn clear_permission(
    Extract(state): Extract<State>,
    Path((vhost, user)): Path<(String, String)>,
) -> Response {
    let Some(node) = state.node() else {
        return STARTING.into_response();
    };
    match propose(&**node, AccessCommand::ClearPermission { user, vhost }).await {
        Ok(()) => (StatusCode::NO_CONTENT, "").into_response(),
        Err(r) => refused(&r),
    }
}

/// Proposes the change and answers once this node's image has it, so the
/// next request to this node sees it.
async fn propose(topology: &dyn Topology, cmd: AccessCommand) -> Result<(), Refused> {
    topology.propose(Command::Access(cmd)).await?;
    topology.catch_up().await;
    Ok(())
}

fn refused(r: &Refused) -> Response {
    let status = match r.code {
        ErrorCode::ResourceNotFound => StatusCode::NOT_FOUND,
        ErrorCode::InvalidRequest => StatusCode::BAD_REQUEST,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    (
        status,
        Json(json!({ "error": r.message, "reason": r.message })),
    )
        .into_response()
}

//! The broker's small HTTP surface: `GET /healthz` for health checks and
//! `GET /api/v1/topics` for a JSON view of topics and their offsets.

use std::future::Future;
use std::sync::{Arc, OnceLock};

use axum::extract;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use sluice_log::Store;
use tracing::error;

/// Shared with the handlers; the store is set once it has been opened.
#[derive(Clone, Default)]
pub struct State {
    store: Arc<OnceLock<Arc<Store>>>,
}

impl State {
    pub fn set_store(&self, store: Arc<Store>) {
        let _ = self.store.set(store);
    }

    fn store(&self) -> Option<&Arc<Store>> {
        self.store.get()
    }
}

pub fn router(state: State) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/api/v1/topics", get(topics))
        .with_state(state)
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    state: State,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    if let Err(e) = axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
    {
        error!("HTTP server failed: {e}");
    }
}

const STARTING: (StatusCode, &str) = (StatusCode::SERVICE_UNAVAILABLE, "starting\n");

async fn healthz(extract::State(state): extract::State<State>) -> Response {
    match state.store() {
        Some(_) => (StatusCode::OK, "ok\n").into_response(),
        None => STARTING.into_response(),
    }
}

#[derive(Serialize)]
struct TopicView {
    name: String,
    /// Kafka's topic id as 32 hex digits.
    id: String,
    internal: bool,
    partition_count: u32,
    /// Topic-level config overrides (defaults are not listed).
    config_overrides: std::collections::BTreeMap<String, String>,
    partitions: Vec<PartitionView>,
}

#[derive(Serialize)]
struct PartitionView {
    partition: i32,
    log_start_offset: i64,
    high_watermark: i64,
    log_end_offset: i64,
    size_bytes: u64,
}

async fn topics(extract::State(state): extract::State<State>) -> Response {
    let Some(store) = state.store() else {
        return STARTING.into_response();
    };
    let views: Vec<TopicView> = store
        .topics()
        .into_iter()
        .map(|t| {
            let partitions = (0..t.partitions)
                .filter_map(|p| i32::try_from(p).ok())
                .filter_map(|p| {
                    store.partition(&t.name, p).map(|part| PartitionView {
                        partition: p,
                        log_start_offset: part.log_start_offset(),
                        high_watermark: part.high_watermark(),
                        log_end_offset: part.log_end_offset(),
                        size_bytes: part.size_bytes(),
                    })
                })
                .collect();
            TopicView {
                id: t.id.iter().map(|b| format!("{b:02x}")).collect(),
                internal: t.internal,
                partition_count: t.partitions,
                config_overrides: t.overrides,
                partitions,
                name: t.name,
            }
        })
        .collect();
    Json(views).into_response()
}

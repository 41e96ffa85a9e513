//! The web console on the HTTP port: server-rendered pages (overview,
//! topics and their records, consumer groups, cluster, queues) with a small
//! script for live charts and confirmations, all embedded in the binary.
//!
//! Pages read the metadata image this node holds (topics, partitions,
//! leaders, ISR, configs, nodes) and ask the rest of the cluster through
//! the Kafka protocol, as a client would (`kafka.rs`), so every node shows
//! the whole cluster. Markup is built with `maud`, which escapes every
//! interpolated value: topic names, group ids and record contents come from
//! users.

mod kafka;
mod pages;

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Form, Path, Query, State as Extract};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::sync::Mutex;

use sluice_topology::Topology;

use crate::cli::group::{commit_plan, reset_plan, ResetTarget};
use crate::cli::{ClientArgs, Wire};
use crate::http::State;

/// What the console needs besides the node: a Kafka client of its own and
/// whether it may change anything.
pub struct Console {
    client: ClientArgs,
    wire: Mutex<Wire>,
    read_only: bool,
}

impl Console {
    /// A console that reaches the cluster through the Kafka listener at
    /// `bootstrap`; `read_only` refuses (and hides) destructive actions.
    pub fn new(bootstrap: String, read_only: bool) -> anyhow::Result<Console> {
        let client = ClientArgs {
            bootstrap,
            client_config: Vec::new(),
        };
        Ok(Console {
            wire: Mutex::new(Wire::new(&client)?),
            client,
            read_only,
        })
    }
}

impl Console {
    /// Log start and end offsets of `partitions`, asked of their leaders
    /// (also what /metrics uses for the lag of partitions with no replica
    /// on this node). Partitions whose leader does not answer are absent.
    pub(crate) async fn log_offsets(
        &self,
        image: &sluice_cluster::MetadataImage,
        partitions: &[(String, i32)],
    ) -> BTreeMap<(String, i32), kafka::LogOffsets> {
        let mut wire = self.wire.lock().await;
        kafka::log_offsets(&mut wire, image, partitions).await
    }
}

pub(crate) fn routes() -> Router<State> {
    Router::new()
        .route("/", get(overview))
        .route("/topics", get(topics))
        .route("/topics/{topic}", get(topic))
        .route("/topics/{topic}/delete", post(delete_topic))
        .route("/topics/{topic}/partitions/{partition}", get(browse))
        .route("/groups", get(groups))
        .route("/groups/{group}", get(group))
        .route("/groups/{group}/reset", post(reset_group))
        .route("/cluster", get(cluster))
        .route("/queues", get(queues))
        .route("/console/api/totals", get(totals))
        .route("/console/api/groups/{group}/lag", get(group_lag))
        .route("/console/console.css", get(css))
        .route("/console/console.js", get(js))
}

/// The page for "not ready yet" and for failures: the console never
/// answers a bare error to a browser.
fn failure(status: StatusCode, page: &str, why: &str) -> Response {
    (status, Html(pages::failure(page, why).into_string())).into_response()
}

fn starting() -> Response {
    failure(
        StatusCode::SERVICE_UNAVAILABLE,
        "Starting",
        "the node is starting; this page answers once it runs",
    )
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Every partition of the user topics (internal ones start with `__`).
fn user_partitions(image: &sluice_cluster::MetadataImage) -> Vec<(String, i32)> {
    image
        .topics
        .iter()
        .filter(|(name, _)| !name.starts_with("__"))
        .flat_map(|(name, t)| {
            (0..t.partitions.len())
                .filter_map(|p| i32::try_from(p).ok())
                .map(move |p| (name.clone(), p))
        })
        .collect()
}

async fn overview(Extract(state): Extract<State>) -> Response {
    let (Some(node), Some(console)) = (state.node(), state.console()) else {
        return starting();
    };
    let view = crate::http::cluster_view_of(node);
    let health = crate::http::unhealthy_reason(node);
    let image = node.image();
    let offsets = console.log_offsets(&image, &user_partitions(&image)).await;
    let records: i64 = offsets.values().map(|o| o.end.max(0)).sum();
    Html(pages::overview(&view, health.as_deref(), records).into_string()).into_response()
}

async fn topics(Extract(state): Extract<State>) -> Response {
    let (Some(node), Some(console)) = (state.node(), state.console()) else {
        return starting();
    };
    let view = crate::http::cluster_view_of(node);
    let image = node.image();
    let offsets = console.log_offsets(&image, &user_partitions(&image)).await;
    Html(pages::topics(view.node_id, &view.topics, &offsets).into_string()).into_response()
}

async fn topic(Extract(state): Extract<State>, Path(name): Path<String>) -> Response {
    let (Some(node), Some(console)) = (state.node(), state.console()) else {
        return starting();
    };
    let view = crate::http::cluster_view_of(node);
    let Some(t) = view.topics.iter().find(|t| t.name == name) else {
        return failure(
            StatusCode::NOT_FOUND,
            "No such topic",
            &format!("topic {name:?} does not exist"),
        );
    };
    let image = node.image();
    let partitions: Vec<(String, i32)> = t
        .partitions
        .iter()
        .map(|p| (name.clone(), p.partition))
        .collect();
    let offsets = console.log_offsets(&image, &partitions).await;
    // Sizes are this node's replicas' (each node knows only its own disk).
    let sizes: BTreeMap<i32, u64> = state
        .store()
        .map(|store| {
            t.partitions
                .iter()
                .filter_map(|p| {
                    store
                        .partition(&name, p.partition)
                        .map(|part| (p.partition, part.size_bytes()))
                })
                .collect()
        })
        .unwrap_or_default();
    Html(pages::topic(view.node_id, t, &offsets, &sizes, console.read_only).into_string())
        .into_response()
}

/// The console, when it may change something: the one place a read-only
/// console refuses, whatever the page sent.
fn writable<'a>(state: &'a State, what: &str) -> Result<&'a Console, Box<Response>> {
    let Some(console) = state.console() else {
        return Err(Box::new(starting()));
    };
    if console.read_only {
        return Err(Box::new(failure(
            StatusCode::FORBIDDEN,
            "Read-only console",
            &format!("this console is read-only: {what} cannot be done from it"),
        )));
    }
    Ok(console)
}

async fn delete_topic(Extract(state): Extract<State>, Path(name): Path<String>) -> Response {
    let console = match writable(&state, "deleting a topic") {
        Ok(c) => c,
        Err(refused) => return *refused,
    };
    let deleted = {
        let mut wire = console.wire.lock().await;
        kafka::delete_topic(&mut wire, &name).await
    };
    match deleted {
        Ok(()) => Redirect::to("/topics").into_response(),
        Err(e) => failure(StatusCode::BAD_GATEWAY, "Delete failed", &format!("{e:#}")),
    }
}

/// `?offset=N` or `?time=MS` (or `?time=` as RFC 3339 from the form's
/// datetime field), `format=text|json|hex`, `limit=N`.
#[derive(Deserialize, Default)]
struct BrowseQuery {
    offset: Option<String>,
    time: Option<String>,
    format: Option<String>,
    limit: Option<usize>,
}

/// How record bytes are shown.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Format {
    Text,
    Json,
    Hex,
}

impl Format {
    fn parse(s: Option<&str>) -> Format {
        match s {
            Some("json") => Format::Json,
            Some("hex") => Format::Hex,
            _ => Format::Text,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::Json => "json",
            Format::Hex => "hex",
        }
    }
}

/// A time from the browse form: milliseconds since the epoch, or a
/// `YYYY-MM-DDTHH:MM[:SS]` (UTC) from a datetime-local field.
fn parse_time(s: &str) -> Option<i64> {
    if let Ok(ms) = s.parse::<i64>() {
        return Some(ms);
    }
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(str::parse::<i64>);
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.trim_end_matches('Z').splitn(3, ':');
    let (h, min) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let sec = t.next().map_or(Some(0.0), |s| s.parse::<f64>().ok())?;
    // Bounded so the arithmetic below cannot overflow on what a user typed.
    let plausible = (0..=9999).contains(&y) && (0.0..60.0).contains(&sec);
    if !plausible
        || !(1..=12).contains(&m)
        || !(1..=31).contains(&day)
        || !(0..=23).contains(&h)
        || !(0..=59).contains(&min)
    {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + h * 3600 + min * 60) as f64 * 1000.0 + sec * 1000.0) as i64)
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS.mmm` UTC.
pub(crate) fn utc(ms: i64) -> String {
    let (days, ms_of_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // The civil date of a day number (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let s = ms_of_day / 1000;
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        ms_of_day % 1000
    )
}

async fn browse(
    Extract(state): Extract<State>,
    Path((name, partition)): Path<(String, i32)>,
    Query(q): Query<BrowseQuery>,
) -> Response {
    let (Some(node), Some(console)) = (state.node(), state.console()) else {
        return starting();
    };
    let image = node.image();
    if image
        .topics
        .get(&name)
        .is_none_or(|t| usize::try_from(partition).map_or(true, |p| p >= t.partitions.len()))
    {
        return failure(
            StatusCode::NOT_FOUND,
            "No such partition",
            &format!("{name}/{partition} does not exist"),
        );
    }
    let format = Format::parse(q.format.as_deref());
    let limit = q.limit.unwrap_or(50).clamp(1, kafka::MAX_BROWSE);
    let offsets = console
        .log_offsets(&image, &[(name.clone(), partition)])
        .await;
    let bounds = offsets.get(&(name.clone(), partition)).copied();
    let time = q.time.as_deref().filter(|s| !s.is_empty());
    let from = match (time, q.offset.as_deref().filter(|s| !s.is_empty())) {
        (Some(t), _) => match parse_time(t) {
            Some(ms) => kafka::From::Time(ms),
            None => {
                return failure(
                    StatusCode::BAD_REQUEST,
                    "Bad time",
                    &format!("{t:?} is not a time (milliseconds, or YYYY-MM-DDTHH:MM)"),
                )
            }
        },
        (None, Some(o)) => match o.parse::<i64>() {
            Ok(o) => kafka::From::Offset(o),
            Err(_) => {
                return failure(
                    StatusCode::BAD_REQUEST,
                    "Bad offset",
                    &format!("{o:?} is not an offset"),
                )
            }
        },
        // The last `limit` records by default.
        (None, None) => kafka::From::Offset(bounds.map_or(0, |b| {
            (b.end - i64::try_from(limit).unwrap_or(0)).max(b.start)
        })),
    };
    let client = console.client.clone();
    let topic = name.clone();
    let read =
        tokio::task::spawn_blocking(move || kafka::browse(&client, &topic, partition, from, limit))
            .await;
    let records = match read {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return failure(StatusCode::BAD_GATEWAY, "Read failed", &format!("{e:#}")),
        Err(e) => {
            return failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Read failed",
                &e.to_string(),
            )
        }
    };
    let me = node.cluster().node_id();
    Html(pages::browse(me, &name, partition, bounds, from, format, limit, &records).into_string())
        .into_response()
}

async fn groups(Extract(state): Extract<State>) -> Response {
    let (Some(node), Some(console)) = (state.node(), state.console()) else {
        return starting();
    };
    let client = console.client.clone();
    let me = node.cluster().node_id();
    match tokio::task::spawn_blocking(move || crate::cli::group::group_summaries(&client)).await {
        Ok(Ok(list)) => Html(pages::groups(me, &list).into_string()).into_response(),
        Ok(Err(e)) => failure(StatusCode::BAD_GATEWAY, "Groups", &format!("{e:#}")),
        Err(e) => failure(StatusCode::INTERNAL_SERVER_ERROR, "Groups", &e.to_string()),
    }
}

async fn group_report(
    console: &Console,
    group: String,
) -> Result<crate::cli::group::GroupReport, String> {
    let client = console.client.clone();
    match tokio::task::spawn_blocking(move || crate::cli::group::group_report(&client, &group))
        .await
    {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(format!("{e:#}")),
        Err(e) => Err(e.to_string()),
    }
}

async fn group(Extract(state): Extract<State>, Path(name): Path<String>) -> Response {
    let (Some(node), Some(console)) = (state.node(), state.console()) else {
        return starting();
    };
    let me = node.cluster().node_id();
    match group_report(console, name.clone()).await {
        Ok(r) => Html(pages::group(me, &name, &r, console.read_only).into_string()).into_response(),
        Err(why) => failure(StatusCode::NOT_FOUND, "Group", &why),
    }
}

#[derive(Deserialize)]
struct ResetForm {
    topic: String,
    /// `earliest` or `latest`.
    to: String,
}

/// Moves an inactive group's offsets on one topic to its start or end (the
/// CLI's `group reset-offsets`, same plan, same refusal of active groups).
async fn reset_group(
    Extract(state): Extract<State>,
    Path(name): Path<String>,
    Form(form): Form<ResetForm>,
) -> Response {
    let console = match writable(&state, "resetting offsets") {
        Ok(c) => c,
        Err(refused) => return *refused,
    };
    let target = match form.to.as_str() {
        "earliest" => ResetTarget::Earliest,
        "latest" => ResetTarget::Latest,
        other => {
            return failure(
                StatusCode::BAD_REQUEST,
                "Reset offsets",
                &format!("{other:?} is not earliest or latest"),
            )
        }
    };
    let client = console.client.clone();
    let group = name.clone();
    let done = tokio::task::spawn_blocking(move || {
        let plan = reset_plan(&client, &group, &form.topic, target)?;
        commit_plan(&client, &group, &form.topic, &plan)
    })
    .await;
    match done {
        Ok(Ok(())) => Redirect::to(&format!("/groups/{}", pages::segment(&name))).into_response(),
        Ok(Err(e)) => failure(StatusCode::CONFLICT, "Reset offsets", &format!("{e:#}")),
        Err(e) => failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Reset offsets",
            &e.to_string(),
        ),
    }
}

async fn group_lag(Extract(state): Extract<State>, Path(name): Path<String>) -> Response {
    let Some(console) = state.console() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response();
    };
    match group_report(console, name).await {
        Ok(r) => {
            let lag: i64 = r.partitions.iter().filter_map(|p| p.lag).sum();
            Json(serde_json::json!({ "t": now_ms(), "lag": lag })).into_response()
        }
        Err(why) => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({ "error": why })),
        )
            .into_response(),
    }
}

/// The records in the user topics (the sum of their end offsets) now: the
/// overview's live chart plots its change per second.
async fn totals(Extract(state): Extract<State>) -> Response {
    let (Some(node), Some(console)) = (state.node(), state.console()) else {
        return (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response();
    };
    let image = node.image();
    let offsets = console.log_offsets(&image, &user_partitions(&image)).await;
    let records: i64 = offsets.values().map(|o| o.end.max(0)).sum();
    Json(serde_json::json!({ "t": now_ms(), "records": records })).into_response()
}

async fn cluster(Extract(state): Extract<State>) -> Response {
    let Some(node) = state.node() else {
        return starting();
    };
    let view = crate::http::cluster_view_of(node);
    Html(pages::cluster(&view).into_string()).into_response()
}

async fn queues(Extract(state): Extract<State>) -> Response {
    let (Some(node), Some(amqp)) = (state.node(), state.amqp()) else {
        return starting();
    };
    let me = node.cluster().node_id();
    let list = amqp.queues().await;
    Html(pages::queues(me, &list).into_string()).into_response()
}

async fn css() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("assets/console.css"),
    )
        .into_response()
}

async fn js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("assets/console.js"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_milliseconds_or_utc_datetimes() {
        assert_eq!(parse_time("1700000000000"), Some(1_700_000_000_000));
        assert_eq!(parse_time("1970-01-01T00:00"), Some(0));
        assert_eq!(parse_time("2023-11-14T22:13:20"), Some(1_700_000_000_000));
        assert_eq!(
            parse_time("2024-02-29T12:00:00.5Z"),
            Some(1_709_208_000_500)
        );
        assert_eq!(parse_time("2024-13-01T00:00"), None);
        assert_eq!(parse_time("yesterday"), None);
        assert_eq!(parse_time("999999999999999-01-01T00:00"), None);
        assert_eq!(parse_time("2024-01-01T00:00:1e300"), None);
        assert_eq!(parse_time("2024-01-01T-1:00"), None);
    }

    #[test]
    fn times_show_in_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00.000");
        assert_eq!(utc(1_700_000_000_123), "2023-11-14 22:13:20.123");
        assert_eq!(utc(1_709_208_000_500), "2024-02-29 12:00:00.500");
        assert_eq!(utc(-1), "1969-12-31 23:59:59.999");
    }

    #[test]
    fn formats_parse_with_text_as_the_default() {
        assert_eq!(Format::parse(Some("json")), Format::Json);
        assert_eq!(Format::parse(Some("hex")), Format::Hex);
        assert_eq!(Format::parse(Some("nonsense")), Format::Text);
        assert_eq!(Format::parse(None), Format::Text);
    }
}

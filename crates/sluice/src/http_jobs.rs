//! Stream jobs in the HTTP API, as `sluice job` uses them (Flink's REST API
//! for jobs, in miniature). A job built with `sluice-stream` that is told
//! this node's HTTP address (`StreamEnv::report_to`) reports its state here
//! every second and takes back what was asked of it: to cancel, or to
//! write a savepoint. The node keeps what jobs reported in memory: a job
//! that stops reporting is shown `LOST`; one that ended is shown with its
//! end state until newer jobs push it out.
//!
//! - `PUT /api/v1/jobs/{id}`: a job's report; answered with the requests
//!   for it (`cancel`, and savepoints it has not reported yet).
//! - `GET /api/v1/jobs`, `GET /api/v1/jobs/{id}`: what jobs reported, with
//!   `state` and `seconds_since_report`.
//! - `POST /api/v1/jobs/{id}/cancel`; `POST /api/v1/jobs/{id}/savepoints`
//!   with `{"dir": ..., "stop": bool}`, answered with the request's id,
//!   whose progress the job's `savepoints` list shows (`stop`: the job
//!   ends once it is written, Flink's stop-with-savepoint).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State as Extract};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::http::State;

pub fn routes() -> Router<State> {
    Router::new()
        .route("/api/v1/jobs", get(list))
        .route("/api/v1/jobs/{id}", put(report).get(status))
        .route("/api/v1/jobs/{id}/cancel", post(cancel))
        .route("/api/v1/jobs/{id}/savepoints", post(savepoint))
}

/// A job that has not reported for this long is shown `LOST`.
const LOST_AFTER: Duration = Duration::from_secs(15);
/// Jobs remembered; beyond it the one that reported least recently goes.
pub(crate) const MAX_JOBS: usize = 1024;
/// Savepoint requests waiting for one job.
const MAX_PENDING_SAVEPOINTS: usize = 16;
/// Longest job id accepted.
const MAX_ID_LEN: usize = 200;

/// What jobs reported and what was asked of them.
#[derive(Default)]
pub struct JobRegistry {
    jobs: Mutex<BTreeMap<String, Job>>,
}

struct SavepointAsked {
    request: String,
    dir: String,
    /// Stop the job once it is written (Flink's stop-with-savepoint).
    stop: bool,
}

impl SavepointAsked {
    fn json(&self) -> Value {
        json!({"request": self.request, "dir": self.dir, "stop": self.stop})
    }
}

struct Job {
    /// The job's last report (an object).
    report: Value,
    seen: Instant,
    cancel: bool,
    /// Savepoints asked for.
    savepoints: Vec<SavepointAsked>,
    next_request: u64,
}

impl Job {
    fn state(&self) -> &str {
        self.report["state"].as_str().unwrap_or("RUNNING")
    }

    fn running(&self) -> bool {
        self.state() == "RUNNING" && self.seen.elapsed() < LOST_AFTER
    }

    /// The report as shown: its state `LOST` when it went quiet.
    fn view(&self, id: &str) -> Value {
        let mut v = self.report.clone();
        let state = if self.state() == "RUNNING" && !self.running() {
            "LOST"
        } else {
            self.state()
        };
        let pending: Vec<Value> = self.savepoints.iter().map(SavepointAsked::json).collect();
        if let Some(o) = v.as_object_mut() {
            o.insert("id".into(), json!(id));
            o.insert("state".into(), json!(state));
            o.insert(
                "seconds_since_report".into(),
                json!(self.seen.elapsed().as_secs_f64()),
            );
            o.insert("cancel_requested".into(), json!(self.cancel));
            o.insert("savepoints_requested".into(), json!(pending));
        }
        v
    }

    /// What the job is asked to do, answered to its report.
    fn requests(&self) -> Value {
        let savepoints: Vec<Value> = self.savepoints.iter().map(SavepointAsked::json).collect();
        json!({"cancel": self.cancel, "savepoints": savepoints})
    }
}

impl JobRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Job>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a job's report; the requests for it.
    pub(crate) fn report(&self, id: &str, report: Value) -> Value {
        let mut jobs = self.lock();
        if !jobs.contains_key(id) && jobs.len() >= MAX_JOBS {
            let stalest = jobs
                .iter()
                .min_by_key(|(_, j)| j.seen)
                .map(|(k, _)| k.clone());
            if let Some(k) = stalest {
                jobs.remove(&k);
            }
        }
        let job = jobs.entry(id.to_owned()).or_insert_with(|| Job {
            report: Value::Null,
            seen: Instant::now(),
            cancel: false,
            savepoints: Vec::new(),
            next_request: 1,
        });
        // Savepoints the job reports (in whatever state) are no longer
        // requests: it has them.
        let known: Vec<&str> = report["savepoints"]
            .as_array()
            .map(|list| list.iter().filter_map(|s| s["request"].as_str()).collect())
            .unwrap_or_default();
        job.savepoints
            .retain(|s| !known.contains(&s.request.as_str()));
        job.report = report;
        job.seen = Instant::now();
        job.requests()
    }

    /// Every job as `sluice job list` shows it.
    pub(crate) fn views(&self) -> Vec<Value> {
        self.lock().iter().map(|(id, j)| j.view(id)).collect()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

fn refuse(status: StatusCode, why: impl Into<String>) -> Response {
    (status, Json(json!({"error": why.into()}))).into_response()
}

fn unknown(id: &str) -> Response {
    refuse(
        StatusCode::NOT_FOUND,
        format!("no job {id} has reported to this node"),
    )
}

async fn report(
    Extract(state): Extract<State>,
    Path(id): Path<String>,
    Json(report): Json<Value>,
) -> Response {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return refuse(StatusCode::BAD_REQUEST, "a job id has 1 to 200 characters");
    }
    if !report.is_object() {
        return refuse(StatusCode::BAD_REQUEST, "a job report is a JSON object");
    }
    Json(state.jobs().report(&id, report)).into_response()
}

async fn list(Extract(state): Extract<State>) -> Response {
    Json(state.jobs().views()).into_response()
}

async fn status(Extract(state): Extract<State>, Path(id): Path<String>) -> Response {
    match state.jobs().lock().get(&id) {
        Some(job) => Json(job.view(&id)).into_response(),
        None => unknown(&id),
    }
}

/// `ask` applied to job `id` when it is running; a refusal otherwise.
fn ask_running(state: &State, id: &str, ask: impl FnOnce(&mut Job) -> Response) -> Response {
    let mut jobs = state.jobs().lock();
    let Some(job) = jobs.get_mut(id) else {
        return unknown(id);
    };
    if !job.running() {
        return refuse(
            StatusCode::CONFLICT,
            format!("job {id} is {}, not running", job.view(id)["state"]),
        );
    }
    ask(job)
}

async fn cancel(Extract(state): Extract<State>, Path(id): Path<String>) -> Response {
    ask_running(&state, &id, |job| {
        job.cancel = true;
        (
            StatusCode::ACCEPTED,
            Json(json!({"id": id, "cancel": true})),
        )
            .into_response()
    })
}

#[derive(Deserialize)]
struct SavepointRequest {
    dir: String,
    #[serde(default)]
    stop: bool,
}

async fn savepoint(
    Extract(state): Extract<State>,
    Path(id): Path<String>,
    Json(req): Json<SavepointRequest>,
) -> Response {
    if req.dir.trim().is_empty() {
        return refuse(StatusCode::BAD_REQUEST, "a savepoint needs a directory");
    }
    ask_running(&state, &id, |job| {
        if job.savepoints.len() >= MAX_PENDING_SAVEPOINTS {
            return refuse(
                StatusCode::TOO_MANY_REQUESTS,
                format!("job {id} has {MAX_PENDING_SAVEPOINTS} savepoints waiting already"),
            );
        }
        let request = format!("sp-{}", job.next_request);
        job.next_request += 1;
        job.savepoints.push(SavepointAsked {
            request: request.clone(),
            dir: req.dir,
            stop: req.stop,
        });
        (
            StatusCode::ACCEPTED,
            Json(json!({"id": id, "request": request})),
        )
            .into_response()
    })
}

/// Shared by the state: one registry per node.
pub(crate) type Jobs = Arc<JobRegistry>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn savepoint_requests_last_until_the_job_reports_them() {
        let r = JobRegistry::default();
        let answer = r.report("j", json!({"name": "n", "state": "RUNNING"}));
        assert_eq!(answer["savepoints"], json!([]));
        {
            let mut jobs = r.lock();
            let job = jobs.get_mut("j").unwrap();
            job.savepoints.push(SavepointAsked {
                request: "sp-1".into(),
                dir: "/d".into(),
                stop: false,
            });
        }
        // Until the job lists it, every answer repeats the request.
        for _ in 0..2 {
            let answer = r.report("j", json!({"state": "RUNNING", "savepoints": []}));
            assert_eq!(answer["savepoints"][0]["request"], "sp-1");
        }
        let answer = r.report(
            "j",
            json!({"state": "RUNNING", "savepoints": [{"request": "sp-1", "state": "IN_PROGRESS"}]}),
        );
        assert_eq!(answer["savepoints"], json!([]));
    }

    fn ask(stop: bool) -> Json<SavepointRequest> {
        Json(SavepointRequest {
            dir: "/d".into(),
            stop,
        })
    }

    #[tokio::test]
    async fn requests_are_bounded_and_only_for_running_jobs() {
        let state = State::default();
        let id = || Path("j".to_owned());
        let r = savepoint(Extract(state.clone()), id(), ask(false)).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        state.jobs().report("j", json!({"state": "RUNNING"}));
        for i in 0..MAX_PENDING_SAVEPOINTS {
            let r = savepoint(Extract(state.clone()), id(), ask(i % 2 == 0)).await;
            assert_eq!(r.status(), StatusCode::ACCEPTED, "request {i}");
        }
        let r = savepoint(Extract(state.clone()), id(), ask(false)).await;
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        // Once the job reports them they no longer wait.
        let taken: Vec<Value> = (1..=MAX_PENDING_SAVEPOINTS)
            .map(|n| json!({"request": format!("sp-{n}"), "state": "IN_PROGRESS"}))
            .collect();
        state
            .jobs()
            .report("j", json!({"state": "RUNNING", "savepoints": taken}));
        let r = savepoint(Extract(state.clone()), id(), ask(false)).await;
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        // An ended job takes no request.
        state.jobs().report("j", json!({"state": "FINISHED"}));
        let r = cancel(Extract(state.clone()), id()).await;
        assert_eq!(r.status(), StatusCode::CONFLICT);
        let long = Path("x".repeat(MAX_ID_LEN + 1));
        let r = report(Extract(state.clone()), long, Json(json!({}))).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn the_registry_holds_at_most_max_jobs() {
        let r = JobRegistry::default();
        for i in 0..MAX_JOBS + 10 {
            r.report(&format!("job-{i}"), json!({"state": "RUNNING"}));
        }
        assert_eq!(r.len(), MAX_JOBS);
        // The stalest went; the newest are there.
        let jobs = r.lock();
        assert!(!jobs.contains_key("job-0"));
        assert!(jobs.contains_key(&format!("job-{}", MAX_JOBS + 9)));
    }
}

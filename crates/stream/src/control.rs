//! A running job: what its threads share (`Coordination`), the checkpoint
//! coordinator that starts and completes checkpoints, and the job seen from
//! outside: it reports its state to a Sluice
//! node's HTTP API every second ([`crate::StreamEnv::report_to`]) and takes
//! back what was asked of it there (`sluice job cancel`, `sluice job
//! savepoint`). Savepoints are checkpoints taken on request and copied out
//! of the checkpoint store into a directory of their own, which a later
//! run starts from ([`crate::StreamEnv::restore_from_savepoint`]), at any
//! parallelism.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};

use crate::checkpoint::{
    CheckpointConfig, CheckpointId, CheckpointStore, FinalParts, LocalDirStore,
};
use crate::StreamError;

/// What the subtasks of a running job share about checkpoints.
pub(crate) struct Coordination {
    pub config: Option<CheckpointConfig>,
    /// The latest checkpoint started (0: none).
    pub requested: AtomicU64,
    /// The latest checkpoint completed (0: none).
    pub completed: AtomicU64,
    /// The checkpoint this run restores from.
    pub restore: Option<CheckpointId>,
    acks: Mutex<Sender<CheckpointId>>,
    /// What subtasks that ended wrote for the final checkpoint.
    pub final_parts: FinalParts,
    /// Where the restored checkpoint is read from when it is not the
    /// checkpoint store (a savepoint).
    pub restore_store: Option<Arc<dyn CheckpointStore>>,
    /// Savepoints asked for, cancel requests, figures for reports.
    pub control: Arc<JobControl>,
    /// The job's cancel flag: every subtask stops when it is set.
    pub cancel: Arc<std::sync::atomic::AtomicBool>,
    /// Bytes of state the subtasks wrote for the checkpoint in progress
    /// (one runs at a time).
    pub bytes_written: AtomicU64,
    /// The latest checkpoint a subtask declined (it would have held back
    /// too much while aligning): the coordinator abandons it at once.
    pub declined: AtomicU64,
}

impl Coordination {
    /// `first_id`: checkpoints of this run are numbered after it.
    pub fn new(
        config: Option<CheckpointConfig>,
        restore: Option<CheckpointId>,
        restore_store: Option<Arc<dyn CheckpointStore>>,
        first_id: CheckpointId,
        acks: Sender<CheckpointId>,
        cancel: Arc<std::sync::atomic::AtomicBool>,
    ) -> Coordination {
        Coordination {
            config,
            requested: AtomicU64::new(first_id),
            completed: AtomicU64::new(first_id),
            restore,
            acks: Mutex::new(acks),
            final_parts: FinalParts::default(),
            restore_store,
            control: Arc::default(),
            cancel,
            bytes_written: AtomicU64::new(0),
            declined: AtomicU64::new(0),
        }
    }

    pub fn ack(&self, id: CheckpointId) {
        if let Ok(tx) = self.acks.lock() {
            // The coordinator gone means the job is ending: nothing to tell.
            let _ = tx.send(id);
        }
    }
}

/// Runs checkpoints every `interval` until `done`: starts one, waits for
/// `tasks` acknowledgements (or the timeout, which abandons it), completes
/// it in the store.
pub(crate) fn coordinate(
    shared: &Coordination,
    config: &CheckpointConfig,
    tasks: usize,
    acks: &Receiver<CheckpointId>,
    done: &AtomicBool,
) -> Result<(), StreamError> {
    let tick = Duration::from_millis(5).min(config.interval);
    let mut next_start = Instant::now() + config.interval;
    loop {
        // A savepoint asked for starts a checkpoint at once.
        while Instant::now() < next_start && !shared.control.savepoint_wanted() {
            if done.load(Ordering::SeqCst) {
                return Ok(());
            }
            std::thread::sleep(tick);
        }
        let id = shared.requested.load(Ordering::SeqCst) + 1;
        shared.bytes_written.store(0, Ordering::SeqCst);
        shared.control.checkpoint_started(id);
        shared.requested.store(id, Ordering::SeqCst);
        let started = Instant::now();
        let deadline = started + config.timeout;
        let mut acked = 0;
        while acked < tasks {
            if done.load(Ordering::SeqCst) {
                return Ok(());
            }
            match acks.recv_timeout(tick) {
                Ok(a) if a == id => acked += 1,
                Ok(_) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
            if Instant::now() >= deadline || shared.declined.load(Ordering::SeqCst) >= id {
                break;
            }
        }
        if acked == tasks {
            config.store.complete(id)?;
            shared.completed.store(id, Ordering::SeqCst);
            // Savepoints are copied out before pruning can remove it.
            let size = shared.bytes_written.load(Ordering::SeqCst);
            let stop = shared
                .control
                .checkpoint_completed(id, (started, size), &*config.store);
            config.store.prune(config.keep)?;
            if stop {
                // Stop-with-savepoint: no checkpoint after it, and the
                // subtasks stop before their sinks commit anything newer.
                shared.cancel.store(true, Ordering::SeqCst);
                return Ok(());
            }
        } else {
            config.store.abandoned(id);
            shared.control.checkpoint_abandoned(id);
            lock(&shared.control.stats).abandoned += 1;
        }
        next_start = Instant::now() + config.interval;
    }
}

/// How often a job reports.
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// How long one report may take.
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// A savepoint asked for, and how far it got.
#[derive(Clone, Debug)]
struct Savepoint {
    request: String,
    dir: PathBuf,
    /// End the job once it is written.
    stop: bool,
    state: SavepointState,
}

#[derive(Clone, Debug)]
enum SavepointState {
    /// Waiting for the next checkpoint to start.
    Requested,
    /// Checkpoint `id` carries it.
    InProgress(CheckpointId),
    Completed(PathBuf),
    Failed(String),
}

/// Checkpoint figures a report carries.
#[derive(Default, Clone, Copy)]
struct CheckpointStats {
    completed: u64,
    last_id: CheckpointId,
    last_duration_ms: u64,
    last_size_bytes: u64,
    /// Timed out or declined.
    abandoned: u64,
}

/// What the coordinator, the reporter and `execute` share about a run.
#[derive(Default)]
pub(crate) struct JobControl {
    savepoints: Mutex<Vec<Savepoint>>,
    stats: Mutex<CheckpointStats>,
    /// Someone asked (through the node) to cancel the job.
    pub cancel_requested: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl JobControl {
    /// Whether a savepoint waits for a checkpoint to start.
    pub fn savepoint_wanted(&self) -> bool {
        lock(&self.savepoints)
            .iter()
            .any(|s| matches!(s.state, SavepointState::Requested))
    }

    /// Whether checkpoint `id` carries a savepoint.
    pub fn is_savepoint(&self, id: CheckpointId) -> bool {
        lock(&self.savepoints)
            .iter()
            .any(|s| matches!(s.state, SavepointState::InProgress(i) if i == id))
    }

    /// Checkpoint `id` starts: it carries every savepoint waiting.
    pub fn checkpoint_started(&self, id: CheckpointId) {
        for s in lock(&self.savepoints).iter_mut() {
            if matches!(s.state, SavepointState::Requested) {
                s.state = SavepointState::InProgress(id);
            }
        }
    }

    /// Checkpoint `id` was abandoned (timed out): its savepoints wait for
    /// the next one.
    pub fn checkpoint_abandoned(&self, id: CheckpointId) {
        for s in lock(&self.savepoints).iter_mut() {
            if matches!(s.state, SavepointState::InProgress(i) if i == id) {
                s.state = SavepointState::Requested;
            }
        }
    }

    /// Checkpoint `id`, started at `started` and `size` bytes of state, is
    /// complete in `store`: the savepoints it carries are copied out of it.
    /// Whether the job is to stop now (a stop-with-savepoint was written):
    /// the caller starts no further checkpoint and cancels the job.
    pub fn checkpoint_completed(
        &self,
        id: CheckpointId,
        (started, size): (Instant, u64),
        store: &dyn CheckpointStore,
    ) -> bool {
        {
            let mut stats = lock(&self.stats);
            stats.completed += 1;
            stats.last_id = id;
            stats.last_duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(0);
            stats.last_size_bytes = size;
        }
        let carried: Vec<(usize, PathBuf, bool)> = lock(&self.savepoints)
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s.state, SavepointState::InProgress(i) if i == id))
            .map(|(i, s)| (i, s.dir.clone(), s.stop))
            .collect();
        let mut stop = false;
        for (i, dir, stop_after) in carried {
            let state = match copy_checkpoint(store, id, &dir) {
                Ok(path) => {
                    stop |= stop_after;
                    SavepointState::Completed(path)
                }
                Err(e) => SavepointState::Failed(e.to_string()),
            };
            if let Some(s) = lock(&self.savepoints).get_mut(i) {
                s.state = state;
            }
        }
        if stop {
            self.cancel_requested.store(true, Ordering::SeqCst);
        }
        stop
    }

    /// Takes the node's answer to a report: a cancel, savepoints not seen
    /// before. `checkpointing`: whether this job can take savepoints.
    fn take_requests(&self, answer: &Value, checkpointing: bool, cancel: &AtomicBool) {
        if answer["cancel"].as_bool() == Some(true) {
            self.cancel_requested.store(true, Ordering::SeqCst);
            cancel.store(true, Ordering::SeqCst);
        }
        let Some(asked) = answer["savepoints"].as_array() else {
            return;
        };
        let mut savepoints = lock(&self.savepoints);
        for a in asked {
            let (Some(request), Some(dir)) = (a["request"].as_str(), a["dir"].as_str()) else {
                continue;
            };
            if savepoints.iter().any(|s| s.request == request) {
                continue;
            }
            savepoints.push(Savepoint {
                request: request.to_owned(),
                dir: PathBuf::from(dir),
                stop: a["stop"].as_bool() == Some(true),
                state: if checkpointing {
                    SavepointState::Requested
                } else {
                    SavepointState::Failed(
                        "the job does not checkpoint (enable_checkpointing)".to_owned(),
                    )
                },
            });
        }
    }

    /// The job's report in the node's JSON shape; `stages`: each stage's
    /// figures ([`crate::metrics::Sampler::report`]).
    fn report(&self, job: &JobInfo, state: &str, error: Option<&str>, stages: Value) -> Value {
        let stats = *lock(&self.stats);
        let savepoints: Vec<Value> = lock(&self.savepoints)
            .iter()
            .map(|s| {
                let (state, path, error) = match &s.state {
                    SavepointState::Requested | SavepointState::InProgress(_) => {
                        ("IN_PROGRESS", None, None)
                    }
                    SavepointState::Completed(p) => {
                        ("COMPLETED", Some(p.display().to_string()), None)
                    }
                    SavepointState::Failed(e) => ("FAILED", None, Some(e.clone())),
                };
                json!({"request": s.request, "state": state, "path": path, "error": error})
            })
            .collect();
        json!({
            "name": job.name,
            "state": state,
            "error": error,
            "pid": std::process::id(),
            "started_ms": job.started_ms,
            "parallelism": job.parallelism,
            "stages": job.stages,
            "restored_from": job.restored_from,
            "checkpoints": {
                "enabled": job.checkpointing,
                "completed": stats.completed,
                "last_id": stats.last_id,
                "last_duration_ms": stats.last_duration_ms,
                "last_size_bytes": stats.last_size_bytes,
                "abandoned": stats.abandoned,
            },
            "savepoints": savepoints,
            "metrics": stages,
        })
    }
}

/// Copies complete checkpoint `id` into a new directory under `dir`, as a
/// checkpoint store of its own holding just it; its path.
fn copy_checkpoint(
    store: &dyn CheckpointStore,
    id: CheckpointId,
    dir: &Path,
) -> Result<PathBuf, StreamError> {
    let path = dir.join(format!("savepoint-{}-{id}", now_ms()));
    let target = LocalDirStore::new(&path)?;
    for (name, bytes) in store.parts(id, "")? {
        target.put(id, &name, &bytes)?;
    }
    target.complete(id)?;
    Ok(path)
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0))
}

/// What a report says about the job itself.
pub(crate) struct JobInfo {
    pub name: String,
    pub started_ms: u64,
    pub parallelism: usize,
    pub stages: Vec<Value>,
    pub restored_from: Option<CheckpointId>,
    pub checkpointing: bool,
}

/// The job's id at the node: its name (made safe for a URL path), process
/// and start time.
fn job_id(info: &JobInfo) -> String {
    let name: String = info
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(100)
        .collect();
    format!("{name}-{}-{}", std::process::id(), info.started_ms)
}

/// Reports to the node at `http` until `done`, then once more with the
/// end state `execute` leaves in `end`.
pub(crate) struct Reporter {
    pub http: String,
    pub info: JobInfo,
    pub control: Arc<JobControl>,
    pub metrics: Arc<crate::metrics::JobMetrics>,
    pub cancel: Arc<AtomicBool>,
    pub done: Arc<AtomicBool>,
    pub end: JobEnd,
}

/// How the job ended, for its last report: the state and the error.
pub(crate) type JobEnd = Arc<Mutex<Option<(String, Option<String>)>>>;

impl Reporter {
    pub fn run(self) {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        let path = format!("/api/v1/jobs/{}", job_id(&self.info));
        let send = |report: &Value| -> Option<Value> {
            let body = serde_json::to_vec(report).ok()?;
            let (status, answer) = runtime
                .block_on(sluice_client::http::request(
                    &self.http,
                    "PUT",
                    &path,
                    Some(&body),
                    REPORT_TIMEOUT,
                ))
                .ok()?;
            // A node that cannot be reached or refuses is tried again at
            // the next report: the job runs on either way.
            (200..300)
                .contains(&status)
                .then(|| serde_json::from_slice(&answer).ok())
                .flatten()
        };
        let mut sampler = crate::metrics::Sampler::default();
        let mut stages = || sampler.report(&self.metrics, now_ms() as i64);
        let mut next = Instant::now();
        while !self.done.load(Ordering::SeqCst) {
            if Instant::now() >= next {
                let report = self.control.report(&self.info, "RUNNING", None, stages());
                if let Some(answer) = send(&report) {
                    self.control
                        .take_requests(&answer, self.info.checkpointing, &self.cancel);
                }
                next = Instant::now() + REPORT_EVERY;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let end = lock(&self.end).clone();
        let (state, error) = end.unwrap_or_else(|| ("FINISHED".to_owned(), None));
        send(
            &self
                .control
                .report(&self.info, &state, error.as_deref(), stages()),
        );
    }
}

//! The job under construction and its execution: one thread per subtask.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::checkpoint::{self, CheckpointConfig, CheckpointId, CheckpointStore, Coordination};
use crate::operator::Output;
use crate::sink::SuccessCommits;
use crate::source::SubtaskInfo;
use crate::StreamError;

/// A subtask ready to run on its thread.
pub(crate) type Task = Box<dyn FnOnce(&TaskRuntime) -> Result<(), StreamError> + Send>;

/// What a running subtask knows of its job.
pub(crate) struct TaskRuntime {
    /// The stage's number in the job (names its state in checkpoints).
    pub stage: usize,
    pub info: SubtaskInfo,
    pub cancel: Arc<AtomicBool>,
    pub shared: Arc<Coordination>,
}

impl TaskRuntime {
    /// A cursor over checkpoint `id` for this subtask's chain.
    pub fn cursor(&self, id: CheckpointId) -> Option<checkpoint::Cursor<'_>> {
        let config = self.shared.config.as_ref()?;
        Some(checkpoint::Cursor::new(
            id,
            &*config.store,
            self.stage,
            self.info,
        ))
    }

    /// A cursor over the final checkpoint, which this subtask writes as it
    /// ends (when the job checkpoints).
    pub fn final_cursor(&self) -> Option<checkpoint::Cursor<'_>> {
        self.shared.config.as_ref()?;
        Some(checkpoint::Cursor::new(
            checkpoint::FINAL,
            &self.shared.final_parts,
            self.stage,
            self.info,
        ))
    }

    /// The subtask's chain ended: every link writes its last state into
    /// the final checkpoint.
    pub fn final_checkpoint<T>(&self, out: &mut dyn Output<T>) -> Result<(), StreamError> {
        match self.final_cursor() {
            Some(mut cp) => out.barrier(&mut cp),
            None => Ok(()),
        }
    }

    /// The checkpoint this run restores from, if any.
    pub fn restoring(&self) -> Option<CheckpointId> {
        self.shared.restore
    }

    /// Restores the chain that starts at `out` (when the job restores).
    pub fn restore<T>(&self, out: &mut dyn Output<T>) -> Result<(), StreamError> {
        match self.restoring().and_then(|id| self.cursor(id)) {
            Some(mut cp) => out.restore(&mut cp),
            None => Ok(()),
        }
    }

    /// Checkpoint `id` reached this subtask's chain at `out`: every link
    /// writes its state, the barrier goes on, the subtask acknowledges.
    pub fn checkpoint<T>(
        &self,
        id: CheckpointId,
        out: &mut dyn Output<T>,
    ) -> Result<(), StreamError> {
        if let Some(mut cp) = self.cursor(id) {
            out.barrier(&mut cp)?;
            self.shared.ack(id);
        }
        Ok(())
    }

    pub fn requested(&self) -> CheckpointId {
        self.shared.requested.load(Ordering::SeqCst)
    }

    pub fn completed(&self) -> CheckpointId {
        self.shared.completed.load(Ordering::SeqCst)
    }

    /// The latest checkpoint completed since `seen`, which it updates.
    pub fn newly_completed(&self, seen: &mut CheckpointId) -> Option<CheckpointId> {
        let now = self.completed();
        (now > *seen).then(|| {
            *seen = now;
            now
        })
    }
}

/// Makes subtask `info.index` of a stage.
pub(crate) type MakeTask = Box<dyn Fn(SubtaskInfo) -> Result<Task, StreamError> + Send>;

/// A stage whose chain is complete (it ends in a sink or an exchange).
pub(crate) struct Stage {
    pub name: String,
    pub parallelism: usize,
    pub make: MakeTask,
}

pub(crate) struct Settings {
    pub parallelism: usize,
    pub max_parallelism: usize,
    /// Records per batch on an exchange.
    pub batch: usize,
    /// Batches a channel holds before its sender waits.
    pub channel_batches: usize,
}

/// Inputs of a stage that its subtasks take when they start: untaken ones
/// at `execute` mean a stream was built and given no sink.
pub(crate) trait PendingInputs: Send {
    fn untaken(&self) -> bool;
}

struct Plan {
    settings: Settings,
    stages: Vec<Stage>,
    /// Every receiving stage built, by name.
    inputs: Vec<(String, Arc<dyn PendingInputs + Sync>)>,
    /// What makes the job invalid, found while it was built.
    invalid: Vec<String>,
    /// A keyed exchange exists: the max parallelism is fixed.
    keyed: bool,
    checkpoints: Option<CheckpointConfig>,
    /// The checkpoint the last `execute` restored from.
    restored: Option<CheckpointId>,
    /// What sinks commit once the whole job has succeeded.
    on_success: SuccessCommits,
}

/// Builds and runs a job (Flink's `StreamExecutionEnvironment`). Cheap to
/// clone: clones build the same job.
#[derive(Clone)]
pub struct StreamEnv {
    plan: Arc<Mutex<Plan>>,
    /// Set when a subtask fails: every other one stops at its next record,
    /// batch or wait (a source that never ends included).
    cancelled: Arc<AtomicBool>,
}

impl Default for StreamEnv {
    fn default() -> Self {
        StreamEnv::new()
    }
}

impl StreamEnv {
    /// A job whose stages run at the machine's parallelism (its cores).
    pub fn new() -> StreamEnv {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        StreamEnv {
            plan: Arc::new(Mutex::new(Plan {
                settings: Settings {
                    parallelism: cores,
                    max_parallelism: 128,
                    batch: 1024,
                    channel_batches: 4,
                },
                stages: Vec::new(),
                inputs: Vec::new(),
                invalid: Vec::new(),
                keyed: false,
                checkpoints: None,
                restored: None,
                on_success: SuccessCommits::default(),
            })),
            cancelled: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Records why the job cannot run; `execute` reports it.
    pub(crate) fn invalid(&self, why: String) {
        self.plan().invalid.push(why);
    }

    pub(crate) fn add_inputs(&self, name: &str, inputs: Arc<dyn PendingInputs + Sync>) {
        self.plan().inputs.push((name.to_owned(), inputs));
    }

    /// A keyed exchange was built: its key groups are fixed from now on.
    pub(crate) fn keyed_exchange_built(&self) {
        self.plan().keyed = true;
    }

    fn plan(&self) -> std::sync::MutexGuard<'_, Plan> {
        self.plan.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Parallelism of the parallel sources and exchanges made from now on.
    pub fn set_parallelism(&self, parallelism: usize) -> &Self {
        self.plan().settings.parallelism = parallelism.max(1);
        self
    }

    /// Key groups (Flink's max parallelism, default 128): the most subtasks
    /// a keyed stage can have, and the unit keyed state moves in.
    /// Set it before the first `key_by`: keyed exchanges built already
    /// assign keys with the old value (the job is then refused).
    pub fn set_max_parallelism(&self, max_parallelism: usize) -> &Self {
        let mut plan = self.plan();
        let m = max_parallelism.max(1);
        if plan.keyed && plan.settings.max_parallelism != m {
            plan.invalid
                .push("set_max_parallelism after a key_by: key groups would disagree".into());
        }
        plan.settings.max_parallelism = m;
        self
    }

    /// Records per batch on an exchange (default 1,024) and batches a
    /// channel holds before its sender waits (default 4): together they
    /// bound the records in flight between two subtasks.
    pub fn set_buffers(&self, batch: usize, channel_batches: usize) -> &Self {
        let mut plan = self.plan();
        plan.settings.batch = batch.max(1);
        plan.settings.channel_batches = channel_batches.max(1);
        self
    }

    pub fn parallelism(&self) -> usize {
        self.plan().settings.parallelism
    }

    /// Takes a checkpoint every `interval` into `store`, and makes
    /// `execute` restore from the latest complete checkpoint there (see
    /// [`crate::checkpoint`]). The two latest complete ones are kept.
    pub fn enable_checkpointing(
        &self,
        interval: Duration,
        store: impl CheckpointStore + 'static,
    ) -> &Self {
        self.plan().checkpoints = Some(CheckpointConfig {
            interval: interval.max(Duration::from_millis(1)),
            timeout: Duration::from_secs(600),
            keep: 2,
            store: Arc::new(store),
        });
        self
    }

    /// How long a checkpoint may take before it is abandoned (default 10
    /// minutes, as Flink's).
    pub fn set_checkpoint_timeout(&self, timeout: Duration) -> &Self {
        if let Some(c) = self.plan().checkpoints.as_mut() {
            c.timeout = timeout;
        }
        self
    }

    /// The checkpoint the last [`Self::execute`] restored from (None: it
    /// started afresh).
    pub fn restored_checkpoint(&self) -> Option<CheckpointId> {
        self.plan().restored
    }

    pub(crate) fn success_commits(&self) -> SuccessCommits {
        self.plan().on_success.clone()
    }

    pub(crate) fn with_settings<R>(&self, f: impl FnOnce(&Settings) -> R) -> R {
        f(&self.plan().settings)
    }

    pub(crate) fn add_stage(&self, stage: Stage) {
        self.plan().stages.push(stage);
    }

    /// Runs every stage built so far, one thread per subtask, until all
    /// end. A failed subtask fails the job: the others stop, and the error
    /// names the first failure (not the stops it caused).
    pub fn execute(&self, job: &str) -> Result<(), StreamError> {
        let (stages, inputs, invalid, max_parallelism, config) = {
            let mut plan = self.plan();
            (
                std::mem::take(&mut plan.stages),
                std::mem::take(&mut plan.inputs),
                std::mem::take(&mut plan.invalid),
                plan.settings.max_parallelism,
                plan.checkpoints.clone(),
            )
        };
        if let Some(why) = invalid.into_iter().next() {
            return Err(StreamError::InvalidJob(why));
        }
        self.cancelled.store(false, Ordering::SeqCst);
        let restore = match &config {
            Some(c) => {
                c.store.discard_incomplete()?;
                c.store.latest()?
            }
            None => None,
        };
        self.plan().restored = restore;
        let (acks, acked) = std::sync::mpsc::channel();
        let shared = Arc::new(Coordination::new(config.clone(), restore, acks));
        let mut tasks = Vec::new();
        for (stage_number, s) in stages.iter().enumerate() {
            if s.parallelism > max_parallelism {
                return Err(StreamError::InvalidJob(format!(
                    "stage '{}' has parallelism {}, above the max parallelism {max_parallelism}",
                    s.name, s.parallelism
                )));
            }
            for index in 0..s.parallelism {
                let info = SubtaskInfo {
                    index,
                    parallelism: s.parallelism,
                    max_parallelism,
                };
                let runtime = TaskRuntime {
                    stage: stage_number,
                    info,
                    cancel: self.cancelled.clone(),
                    shared: shared.clone(),
                };
                tasks.push((s.name.clone(), index, runtime, (s.make)(info)?));
            }
        }
        // The stages' makers hold channel ends; only the tasks may now, so
        // that a channel closes when its last subtask ends.
        drop(stages);
        if let Some((name, _)) = inputs.iter().find(|(_, i)| i.untaken()) {
            return Err(StreamError::InvalidJob(format!(
                "the stream of stage '{name}' has no sink"
            )));
        }
        drop(inputs);
        let mut running = Vec::new();
        let mut failure = None;
        let total = tasks.len();
        for (stage, index, runtime, task) in tasks {
            if failure.is_some() {
                continue;
            }
            let cancel = self.cancelled.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("{job}/{index}"))
                .spawn(move || {
                    // Whatever ends a subtask early stops the others.
                    let guard = CancelOnDrop(Some(cancel));
                    let r = task(&runtime);
                    if r.is_ok() {
                        guard.disarm();
                    }
                    r
                });
            match spawned {
                Ok(handle) => running.push((stage, index, handle)),
                Err(e) => {
                    failure = Some(StreamError::Spawn {
                        stage,
                        message: e.to_string(),
                    })
                }
            }
        }
        let done = Arc::new(AtomicBool::new(false));
        let coordinator = match &config {
            Some(config) if failure.is_none() => {
                let (shared, config, done) = (shared.clone(), config.clone(), done.clone());
                let cancel = self.cancelled.clone();
                std::thread::Builder::new()
                    .name(format!("{job}/checkpoints"))
                    .spawn(move || {
                        // A checkpoint that cannot be stored fails the job
                        // (Flink's default: no checkpoint failure tolerated).
                        let guard = CancelOnDrop(Some(cancel));
                        let r = checkpoint::coordinate(&shared, &config, total, &acked, &done);
                        if r.is_ok() {
                            guard.disarm();
                        }
                        r
                    })
                    .ok()
            }
            _ => None,
        };
        let mut errors: Vec<StreamError> = failure.into_iter().collect();
        for (stage, subtask, handle) in running {
            match handle.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push(e),
                Err(panic) => errors.push(StreamError::SubtaskFailed {
                    stage,
                    subtask,
                    message: panic_message(panic.as_ref()),
                }),
            }
        }
        done.store(true, Ordering::SeqCst);
        // Taken whether the job failed or not: a failed run's are dropped.
        let commits = std::mem::take(
            &mut *self
                .success_commits()
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        if let Some(Ok(Err(e))) = coordinator.map(|c| c.join()) {
            errors.push(e);
        }
        let first_cause = errors.iter().position(|e| !e.is_consequence());
        match first_cause.or(if errors.is_empty() { None } else { Some(0) }) {
            Some(i) => Err(errors.swap_remove(i)),
            None => {
                // Every subtask ended well. The final checkpoint records
                // where they ended (sources at their end, sinks' last
                // transactions pre-committed): a run started again from it
                // has nothing to repeat. Then what sinks staged after the
                // last checkpoint is committed (a crash in between: the
                // restore commits it).
                if let Some(c) = &config {
                    let latest = c.store.latest()?.unwrap_or(0);
                    let id = shared.requested.load(Ordering::SeqCst).max(latest) + 1;
                    for (name, bytes) in shared.final_parts.take() {
                        c.store.put(id, &name, &bytes)?;
                    }
                    c.store.complete(id)?;
                    c.store.prune(c.keep)?;
                }
                for commit in commits {
                    commit()?;
                }
                Ok(())
            }
        }
    }
}

/// Sets the cancel flag when dropped armed: on an error and while a panic
/// unwinds.
struct CancelOnDrop(Option<Arc<AtomicBool>>);

impl CancelOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(flag) = self.0.take() {
            flag.store(true, Ordering::SeqCst);
        }
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panicked".to_owned())
}

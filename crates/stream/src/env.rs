//! The job under construction and its execution: one thread per subtask.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::source::SubtaskInfo;
use crate::StreamError;

/// A subtask ready to run on its thread.
pub(crate) type Task = Box<dyn FnOnce() -> Result<(), StreamError> + Send>;

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
            })),
            cancelled: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The job's cancel flag, for the subtasks.
    pub(crate) fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancelled.clone()
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
        let (stages, inputs, invalid, max_parallelism) = {
            let mut plan = self.plan();
            (
                std::mem::take(&mut plan.stages),
                std::mem::take(&mut plan.inputs),
                std::mem::take(&mut plan.invalid),
                plan.settings.max_parallelism,
            )
        };
        if let Some(why) = invalid.into_iter().next() {
            return Err(StreamError::InvalidJob(why));
        }
        self.cancelled.store(false, Ordering::SeqCst);
        let mut tasks = Vec::new();
        for s in &stages {
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
                tasks.push((s.name.clone(), index, (s.make)(info)?));
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
        for (stage, index, task) in tasks {
            if failure.is_some() {
                continue;
            }
            let cancel = self.cancelled.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("{job}/{index}"))
                .spawn(move || {
                    // Whatever ends a subtask early stops the others.
                    let guard = CancelOnDrop(Some(cancel));
                    let r = task();
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
        let first_cause = errors.iter().position(|e| !e.is_consequence());
        match first_cause.or(if errors.is_empty() { None } else { Some(0) }) {
            Some(i) => Err(errors.swap_remove(i)),
            None => Ok(()),
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

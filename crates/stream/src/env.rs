//! The job under construction and its execution: one thread per subtask.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::checkpoint::{self, CheckpointConfig, CheckpointId, CheckpointStore};
use crate::control::Coordination;
use crate::operator::Output;
use crate::sink::SuccessCommits;
use crate::source::SubtaskInfo;
use crate::StreamError;

/// Records held back during alignment before a checkpoint is declined.
const DEFAULT_MAX_ALIGNMENT_RECORDS: usize = 100_000;

/// A subtask ready to run on its thread.
pub(crate) type Task = Box<dyn FnOnce(&TaskRuntime) -> Result<(), StreamError> + Send>;

/// What a running subtask knows of its job.
pub(crate) struct TaskRuntime {
    /// The stage's number in the job (names its state in checkpoints).
    pub stage: usize,
    pub info: SubtaskInfo,
    pub cancel: Arc<AtomicBool>,
    pub shared: Arc<Coordination>,
    pub metrics: Arc<crate::metrics::SubtaskMetrics>,
    /// Where the chain's keyed state goes, when the job keeps it in a
    /// changelog topic.
    pub changelog: Option<Mutex<crate::changelog::SubtaskLog>>,
}

impl TaskRuntime {
    /// A cursor over checkpoint `id` for this subtask's chain.
    pub fn cursor(&self, id: CheckpointId) -> Option<checkpoint::Cursor<'_>> {
        let config = self.shared.config.as_ref()?;
        Some(
            checkpoint::Cursor::new(id, &*config.store, self.stage, self.info)
                .counting_into(&self.shared.bytes_written)
                .keyed_to(self.keyed_to(id)),
        )
    }

    /// Where checkpoint `id` puts keyed state: with a changelog, there (and
    /// into a savepoint itself as well).
    fn keyed_to(&self, id: CheckpointId) -> checkpoint::KeyedTo {
        match &self.changelog {
            None => checkpoint::KeyedTo::Checkpoint,
            Some(_) if self.shared.control.is_savepoint(id) => checkpoint::KeyedTo::Both,
            Some(_) => checkpoint::KeyedTo::Changelog,
        }
    }

    fn changelog(&self) -> Option<std::sync::MutexGuard<'_, crate::changelog::SubtaskLog>> {
        self.changelog
            .as_ref()
            .map(|c| c.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The links of the chain wrote their state into `cp`: the changelog
    /// takes its share.
    pub fn log_state(&self, cp: &mut checkpoint::Cursor<'_>) -> Result<(), StreamError> {
        match self.changelog() {
            Some(mut log) => {
                let savepoint = self.shared.control.is_savepoint(cp.id);
                log.checkpoint(cp, savepoint)
            }
            None => Ok(()),
        }
    }

    /// Checkpoint `id` completed: the changelog's transaction for it
    /// commits (the chain's sinks are told by the caller).
    pub fn checkpoint_complete(&self, id: CheckpointId) -> Result<(), StreamError> {
        match self.changelog() {
            Some(mut log) => log.checkpoint_complete(id),
            None => Ok(()),
        }
    }

    /// A cursor over the final checkpoint, which this subtask writes as it
    /// ends (when the job checkpoints).
    pub fn final_cursor(&self) -> Option<checkpoint::Cursor<'_>> {
        self.shared.config.as_ref()?;
        let keyed_to = match self.changelog {
            Some(_) => checkpoint::KeyedTo::Changelog,
            None => checkpoint::KeyedTo::Checkpoint,
        };
        Some(
            checkpoint::Cursor::new(
                checkpoint::FINAL,
                &self.shared.final_parts,
                self.stage,
                self.info,
            )
            .keyed_to(keyed_to),
        )
    }

    /// The subtask's chain ended: every link writes its last state into
    /// the final checkpoint.
    pub fn final_checkpoint<T>(&self, out: &mut dyn Output<T>) -> Result<(), StreamError> {
        match self.final_cursor() {
            Some(mut cp) => {
                out.barrier(&mut cp)?;
                self.log_state(&mut cp)
            }
            None => Ok(()),
        }
    }

    /// The checkpoint this run restores from, if any.
    pub fn restoring(&self) -> Option<CheckpointId> {
        self.shared.restore
    }

    /// A cursor over the checkpoint this run restores from: in the
    /// checkpoint store, or in a savepoint's own directory.
    pub fn restore_cursor(&self) -> Option<checkpoint::Cursor<'_>> {
        let id = self.restoring()?;
        match &self.shared.restore_store {
            Some(store) => Some(checkpoint::Cursor::new(id, &**store, self.stage, self.info)),
            None => self.cursor(id),
        }
    }

    /// The cursor the chain restores from, its keyed state read back from
    /// the changelog when the job keeps one. A subtask that starts afresh
    /// clears what an earlier run left open in the changelog.
    pub fn restoring_cursor(&self) -> Result<Option<checkpoint::Cursor<'_>>, StreamError> {
        let cp = self.restore_cursor();
        let Some(mut log) = self.changelog() else {
            if let Some(cp) = &cp {
                if crate::changelog::keeps_state(cp)? {
                    return Err(StreamError::State(
                        "the checkpoint keeps keyed state in changelog topics: restore it with set_state_changelog".into(),
                    ));
                }
            }
            return Ok(cp);
        };
        match cp {
            Some(cp) => {
                let restored = log.restore(&cp)?;
                Ok(Some(cp.with_restored_log(restored)))
            }
            None => log.start_afresh().map(|()| None),
        }
    }

    /// Restores the chain that starts at `out` (when the job restores).
    pub fn restore<T>(&self, out: &mut dyn Output<T>) -> Result<(), StreamError> {
        match self.restoring_cursor()? {
            Some(mut cp) => out.restore(&mut cp),
            None => Ok(()),
        }
    }

    /// This subtask declines checkpoint `id`: the coordinator abandons it,
    /// and the barrier still goes on (without an acknowledgement), so the
    /// subtasks downstream stop aligning on it instead of holding back what
    /// their other inputs send (Flink sends a cancellation marker).
    pub fn decline<T>(&self, id: CheckpointId, out: &mut dyn Output<T>) -> Result<(), StreamError> {
        // Abandoned first: nothing downstream can complete it after this.
        self.shared.declined.fetch_max(id, Ordering::SeqCst);
        match self.cursor(id) {
            Some(mut cp) => out.barrier(&mut cp),
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
        if self.snapshot(id, out)? {
            self.shared.ack(id);
        }
        Ok(())
    }

    /// Every link of the chain at `out` writes its state for checkpoint
    /// `id` and the barrier goes on, without an acknowledgement yet (an
    /// unaligned checkpoint still has in-flight records to store). False
    /// when the job does not checkpoint.
    pub fn snapshot<T>(
        &self,
        id: CheckpointId,
        out: &mut dyn Output<T>,
    ) -> Result<bool, StreamError> {
        match self.cursor(id) {
            Some(mut cp) => {
                out.barrier(&mut cp)?;
                self.log_state(&mut cp)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Stores what this subtask received in flight for unaligned checkpoint
    /// `id`, whose state it wrote already, and acknowledges the checkpoint.
    pub fn complete_unaligned(
        &self,
        id: CheckpointId,
        records: Vec<(Option<u32>, Vec<u8>)>,
    ) -> Result<(), StreamError> {
        if let Some(mut cp) = self.cursor(id) {
            cp.put_channel(records)?;
            self.shared.ack(id);
        }
        Ok(())
    }

    /// This subtask gives up checkpoint `id` after its barrier went on (it
    /// would store too many in-flight records): the coordinator abandons it.
    pub fn abandon(&self, id: CheckpointId) {
        self.shared.declined.fetch_max(id, Ordering::SeqCst);
    }

    /// The in-flight records of the restored checkpoint this subtask takes
    /// over (none when the job does not restore).
    pub fn restored_channel_records(&self) -> Result<Vec<Vec<u8>>, StreamError> {
        match self.restore_cursor() {
            Some(cp) => cp.channel_records(),
            None => Ok(Vec::new()),
        }
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
    /// The HTTP address of the node the job reports to.
    report_to: Option<String>,
    /// A savepoint the next `execute` starts from.
    savepoint: Option<std::path::PathBuf>,
    /// The pool async I/O calls run on, made for the first async link.
    async_runtime: Option<Arc<crate::async_io::AsyncRuntime>>,
    /// The instance this job runs in, in library mode.
    library: Option<Arc<crate::library::Library>>,
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
                report_to: None,
                savepoint: None,
                async_runtime: None,
                library: None,
            })),
            cancelled: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Records why the job cannot run; `execute` reports it.
    /// The job's async I/O pool, started the first time it is asked for. When
    /// it cannot be started the job is invalid (and the pool an empty one).
    pub(crate) fn async_runtime(&self) -> Arc<crate::async_io::AsyncRuntime> {
        let made = {
            let mut plan = self.plan.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(rt) = &plan.async_runtime {
                return rt.clone();
            }
            crate::async_io::AsyncRuntime::start().map(|rt| {
                let rt = Arc::new(rt);
                plan.async_runtime = Some(rt.clone());
                rt
            })
        };
        made.unwrap_or_else(|e| {
            self.invalid(e.to_string());
            Arc::new(crate::async_io::AsyncRuntime::none())
        })
    }

    /// The flag every subtask stops at (a subtask failed, or the job was
    /// cancelled).
    pub(crate) fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancelled.clone()
    }

    pub(crate) fn invalid(&self, why: String) {
        self.plan().invalid.push(why);
    }

    pub(crate) fn add_inputs(&self, name: &str, inputs: Arc<dyn PendingInputs + Sync>) {
        self.plan().inputs.push((name.to_owned(), inputs));
    }

    /// The job runs as an instance of an application ([`crate::LibraryMode`]).
    pub(crate) fn set_library(&self, library: Arc<crate::library::Library>) {
        self.plan().library = Some(library);
    }

    pub(crate) fn library(&self) -> Option<Arc<crate::library::Library>> {
        self.plan().library.clone()
    }

    /// The first reason found while building that the job cannot run.
    pub(crate) fn check_valid(&self) -> Result<(), StreamError> {
        match self.plan().invalid.first() {
            Some(why) => Err(StreamError::InvalidJob(why.clone())),
            None => Ok(()),
        }
    }

    /// Whether the job has a keyed exchange (so keyed state).
    pub(crate) fn keyed(&self) -> bool {
        self.plan().keyed
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
            max_alignment_records: DEFAULT_MAX_ALIGNMENT_RECORDS,
            unaligned_after: None,
            changelog: None,
        });
        self
    }

    /// Records a subtask may hold back while it waits for a checkpoint's
    /// barrier on its slower inputs (default 100,000). A subtask that would
    /// hold more declines that checkpoint and lets everything through: its
    /// memory stays bounded and the next checkpoint tries again (Flink's
    /// limit on buffering during alignment).
    pub fn set_max_alignment_records(&self, records: usize) -> &Self {
        if let Some(c) = self.plan().checkpoints.as_mut() {
            c.max_alignment_records = records.max(1);
        }
        self
    }

    /// Unaligned checkpoints (Flink's `enableUnalignedCheckpoints`): a
    /// subtask with several inputs does not wait for a checkpoint's barrier
    /// on every input before it writes its state. At the first barrier it
    /// writes its state and passes the barrier on; the records its other
    /// inputs sent before their barriers, which reach it afterwards, are
    /// processed as usual and stored with the checkpoint, and a restore
    /// processes them again before anything else. Checkpoints then complete
    /// under backpressure and skew, where aligning would stall the faster
    /// inputs or hold back too much (see [`Self::set_max_alignment_records`]).
    /// Records that cross an exchange are serialized for it
    /// ([`crate::StateData`]). As in Flink, watermarks in flight are not
    /// stored: a restored subtask replays those records under its restored
    /// watermark, so a record that became late only while in flight counts
    /// as on time after a restore.
    pub fn enable_unaligned_checkpoints(&self) -> &Self {
        self.set_aligned_checkpoint_timeout(Duration::ZERO)
    }

    /// Unaligned checkpoints that start aligned (Flink's
    /// `setAlignedCheckpointTimeout`): a subtask aligns as usual and turns
    /// the checkpoint unaligned once it has waited `timeout` for its slower
    /// inputs' barriers, or would hold back more than the alignment limit.
    pub fn set_aligned_checkpoint_timeout(&self, timeout: Duration) -> &Self {
        if let Some(c) = self.plan().checkpoints.as_mut() {
            c.unaligned_after = Some(timeout);
        }
        self
    }

    /// Keeps keyed state in compacted changelog topics, Kafka Streams
    /// style, instead of in the checkpoints (call after
    /// [`Self::enable_checkpointing`]): each checkpoint writes the keys
    /// that changed since the last one into `changelog`, in a transaction
    /// committed with the checkpoint, and keeps only where they lie; a
    /// restore rebuilds each subtask's state from the changelog partitions
    /// of its key groups, at any parallelism. Savepoints still hold the
    /// state themselves.
    pub fn set_state_changelog(&self, changelog: crate::changelog::KafkaChangelog) -> &Self {
        let mut plan = self.plan();
        match plan.checkpoints.as_mut() {
            Some(c) => c.changelog = Some(changelog),
            None => plan
                .invalid
                .push("a state changelog needs checkpointing: enable it first".into()),
        }
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

    /// Reports the running job to the Sluice node whose HTTP admin port is
    /// `http` (`host:port`) every second, where `sluice job list|status`
    /// show it, and takes requests from there: `sluice job cancel` stops
    /// it ([`StreamError::CancelledByRequest`]), `sluice job savepoint`
    /// takes a checkpoint at once and copies it into a directory of its
    /// own (the job must checkpoint). A node that cannot be reached does
    /// not stop the job.
    pub fn report_to(&self, http: impl Into<String>) -> &Self {
        self.plan().report_to = Some(http.into());
        self
    }

    /// Makes the next [`Self::execute`] start from the savepoint in `dir`
    /// (the path `sluice job savepoint` printed) instead of the latest
    /// checkpoint, at whatever parallelism the job now has. Its own
    /// checkpoints go on into its checkpoint store, numbered after both.
    pub fn restore_from_savepoint(&self, dir: impl Into<std::path::PathBuf>) -> &Self {
        self.plan().savepoint = Some(dir.into());
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
        let (stages, inputs, invalid, max_parallelism, config, report_to, savepoint) = {
            let mut plan = self.plan();
            (
                std::mem::take(&mut plan.stages),
                std::mem::take(&mut plan.inputs),
                std::mem::take(&mut plan.invalid),
                plan.settings.max_parallelism,
                plan.checkpoints.clone(),
                plan.report_to.clone(),
                plan.savepoint.take(),
            )
        };
        if let Some(why) = invalid.into_iter().next() {
            return Err(StreamError::InvalidJob(why));
        }
        self.cancelled.store(false, Ordering::SeqCst);
        let latest = match &config {
            Some(c) => {
                c.store.discard_incomplete()?;
                c.store.latest()?
            }
            None => None,
        };
        let (restore, restore_store) = match savepoint {
            Some(dir) => {
                let store = crate::LocalDirStore::new(&dir)?;
                let id = store.latest()?.ok_or_else(|| {
                    StreamError::InvalidJob(format!("no savepoint in {}", dir.display()))
                })?;
                let store: Arc<dyn CheckpointStore> = Arc::new(store);
                (Some(id), Some(store))
            }
            None => (latest, None),
        };
        self.plan().restored = restore;
        let first_id = restore.max(latest).unwrap_or(0);
        let (acks, acked) = std::sync::mpsc::channel();
        let shared = Arc::new(Coordination::new(
            config.clone(),
            restore,
            restore_store,
            first_id,
            acks,
            self.cancelled.clone(),
        ));
        let metrics = Arc::new(crate::metrics::JobMetrics::new(
            stages.iter().map(|s| (s.name.as_str(), s.parallelism)),
        ));
        let reporter_done = Arc::new(AtomicBool::new(false));
        let job_end: crate::control::JobEnd = Arc::default();
        let reporter = report_to.and_then(|http| {
            let reporter = crate::control::Reporter {
                http,
                info: crate::control::JobInfo {
                    name: job.to_owned(),
                    started_ms: crate::control::now_ms(),
                    parallelism: stages.iter().map(|s| s.parallelism).max().unwrap_or(1),
                    stages: stages
                        .iter()
                        .map(|s| serde_json::json!({"name": s.name, "parallelism": s.parallelism}))
                        .collect(),
                    restored_from: restore,
                    checkpointing: config.is_some(),
                },
                control: shared.control.clone(),
                metrics: metrics.clone(),
                cancel: self.cancelled.clone(),
                done: reporter_done.clone(),
                end: job_end.clone(),
            };
            std::thread::Builder::new()
                .name(format!("{job}/report"))
                .spawn(move || reporter.run())
                .ok()
        });
        let result = self.run(
            job,
            stages,
            inputs,
            max_parallelism,
            config,
            (&shared, &metrics),
            acked,
        );
        let result = match result {
            Err(e)
                if e.is_consequence() && shared.control.cancel_requested.load(Ordering::SeqCst) =>
            {
                Err(StreamError::CancelledByRequest)
            }
            other => other,
        };
        if let Some(reporter) = reporter {
            let end = match &result {
                Ok(()) => ("FINISHED".to_owned(), None),
                Err(StreamError::CancelledByRequest) => ("CANCELED".to_owned(), None),
                Err(e) => ("FAILED".to_owned(), Some(e.to_string())),
            };
            *job_end.lock().unwrap_or_else(|p| p.into_inner()) = Some(end);
            reporter_done.store(true, Ordering::SeqCst);
            let _ = reporter.join();
        }
        result
    }

    /// Runs the job's subtasks and its checkpoint coordinator until all end.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        job: &str,
        stages: Vec<Stage>,
        inputs: Vec<(String, Arc<dyn PendingInputs + Sync>)>,
        max_parallelism: usize,
        config: Option<CheckpointConfig>,
        (shared, metrics): (&Arc<Coordination>, &crate::metrics::JobMetrics),
        acked: std::sync::mpsc::Receiver<CheckpointId>,
    ) -> Result<(), StreamError> {
        let mut tasks = Vec::new();
        let changelog = config.as_ref().and_then(|c| c.changelog.clone());
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
                    metrics: metrics.subtask(stage_number, index),
                    changelog: changelog.clone().map(|c| {
                        Mutex::new(crate::changelog::SubtaskLog::new(
                            c,
                            stage_number,
                            info,
                            self.success_commits(),
                        ))
                    }),
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
                    crate::metrics::enter(runtime.metrics.clone());
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
                        let r = crate::control::coordinate(&shared, &config, total, &acked, &done);
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
            None if shared.control.cancel_requested.load(Ordering::SeqCst) => {
                // Cancelled, or stopped at a savepoint, just as the last
                // subtasks ended well: not a success, so nothing beyond the
                // last checkpoint (the savepoint) is committed, and a run
                // restored from the savepoint repeats nothing.
                Err(StreamError::CancelledByRequest)
            }
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

//! Library mode, the Kafka Streams way: a job is a Rust program, and every
//! instance of it started with the same application id joins one consumer
//! group. The group shares the job's source partitions among the running
//! instances; an instance that starts, stops or dies moves partitions, and
//! the others take them over where the last commit left them.
//!
//! - **Membership**: a consumer of the group (the application id) subscribed
//!   to the job's source topics, with the eager protocol: at a rebalance
//!   every instance stops its run (a *generation*) before partitions move,
//!   then runs the job again over what it was given. The membership
//!   consumer reads nothing itself: its partitions are paused, and the
//!   job's source subtasks read them.
//! - **Commits**: the job runs with checkpoints every commit interval. An
//!   instance has one transactional producer (transactional id
//!   `<application id>-<instance id>`); the job's topic sinks (at least
//!   once ones too, which so become exactly once) write into its open
//!   transaction. When a checkpoint completes, the
//!   source positions at its barrier go into that transaction with the
//!   group's metadata (KIP-447: a member of an older generation is refused)
//!   and it commits: outputs and positions together, or neither. A sink
//!   that passed a barrier waits for that commit before it writes on, so a
//!   transaction holds exactly what precedes its positions. A checkpoint
//!   that is abandoned commits nothing: its records commit with the next.
//! - **Restarts**: a generation starts from the group's committed positions
//!   (read as stable: a transaction still open on them is waited for). A
//!   dead instance's open transaction is aborted when an instance with its
//!   id starts again (its producer is fenced) or when it times out.
//!
//! Keyed state does not yet move with partitions: that needs Kafka
//! Streams' repartition topics at keyed exchanges, so that a task's state
//! is the matching changelog partition. Jobs in library mode are refused
//! when they keep state of their own (keyed exchanges, operator state).
//!
//! ```no_run
//! use sluice_stream::kafka::{DeliveryGuarantee, KafkaOutput, KafkaSink, KafkaSource};
//! use sluice_stream::LibraryMode;
//!
//! let bootstrap = "127.0.0.1:9092";
//! LibraryMode::new(bootstrap, "shouter")
//!     .run("shout", |env| {
//!         env.kafka_source(KafkaSource::new(bootstrap, "words"))
//!             .map(|r| KafkaOutput {
//!                 key: r.key,
//!                 value: r.value.map(|v| v.to_ascii_uppercase()),
//!                 ..KafkaOutput::default()
//!             })
//!             .sink_to_kafka(
//!                 KafkaSink::new(
//!                     bootstrap,
//!                     "shouts",
//!                     // In library mode the instance's transaction is used.
//!                     DeliveryGuarantee::ExactlyOnce { transactional_id_prefix: "shouter".into() },
//!                 ),
//!                 |o| o.clone(),
//!             );
//!         Ok(())
//!     })
//!     .unwrap();
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, Consumer, ConsumerContext, ConsumerGroupMetadata, Rebalance,
};
use rdkafka::producer::Producer;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::checkpoint::{CheckpointId, CheckpointStore};
use crate::kafka::{
    send_record, Deliveries, DeliveryCheck, KafkaOutput, KafkaProducer, Serializer,
};
use crate::operator::Output;
use crate::{Record, StreamEnv, StreamError, SubtaskInfo};

/// How long a call to the cluster may take.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(60);
/// How often waits look again at whether the generation is stopping.
const TICK: Duration = Duration::from_millis(50);
/// Generations in a row that may fail on the cluster before the instance
/// gives up.
const MAX_FAILED_GENERATIONS: u32 = 5;
/// Longest a revocation waits for the running generation to stop.
const STOP_WAIT: Duration = Duration::from_secs(120);

fn kafka_error(what: &str, e: impl std::fmt::Display) -> StreamError {
    StreamError::Kafka(format!("{what}: {e}"))
}

/// Runs a job as one instance of an application (see the module's
/// documentation).
#[derive(Clone, Debug)]
pub struct LibraryMode {
    bootstrap: String,
    application_id: String,
    instance_id: String,
    commit_interval: Duration,
    transaction_timeout: Duration,
    properties: Vec<(String, String)>,
}

impl LibraryMode {
    /// An instance of application `application_id` (the consumer group and
    /// the prefix of its transactional ids) on the cluster at `bootstrap`.
    pub fn new(bootstrap: &str, application_id: &str) -> LibraryMode {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        LibraryMode {
            bootstrap: bootstrap.to_owned(),
            application_id: application_id.to_owned(),
            instance_id: format!("{}-{nanos}", std::process::id()),
            commit_interval: Duration::from_millis(200),
            transaction_timeout: Duration::from_secs(10),
            properties: Vec::new(),
        }
    }

    /// Names this instance in its transactional id. An instance started
    /// again under the same id fences what its last run left open at once;
    /// under another, that waits for the transaction timeout.
    pub fn instance_id(mut self, id: &str) -> Self {
        self.instance_id = id.to_owned();
        self
    }

    /// How often outputs and positions commit (default 200 ms).
    pub fn commit_interval(mut self, interval: Duration) -> Self {
        self.commit_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// How long a transaction of a dead instance holds its partitions'
    /// readers back at most (default 10 s).
    pub fn transaction_timeout(mut self, timeout: Duration) -> Self {
        self.transaction_timeout = timeout;
        self
    }

    /// A librdkafka setting for the group's consumer and the instance's
    /// producer (`session.timeout.ms`, say).
    pub fn property(mut self, key: &str, value: &str) -> Self {
        self.properties.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Builds the job with `build` and runs it over the partitions the group
    /// gives this instance, again at every rebalance, until its sources
    /// end or it fails. `build` is called once per generation; the
    /// checkpoint settings it makes are replaced by the instance's (commit
    /// interval, aligned barriers).
    pub fn run(
        &self,
        job: &str,
        build: impl Fn(&StreamEnv) -> Result<(), StreamError>,
    ) -> Result<(), StreamError> {
        let shared = Arc::new(Shared::default());
        let first = self.env(&shared);
        build(&first)?;
        // Refused before the instance joins anything.
        first.check_valid()?;
        if first.keyed() {
            return Err(StreamError::InvalidJob(
                "library mode cannot hand keyed state over yet (it needs repartition topics): no key_by".into(),
            ));
        }
        let topics: Vec<String> = first.library().map(|l| l.topics()).unwrap_or_default();
        if topics.is_empty() {
            return Err(StreamError::InvalidJob(
                "library mode needs a topic source: the group shares its partitions".into(),
            ));
        }
        let consumer = Arc::new(self.consumer(&shared)?);
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&names)
            .map_err(|e| kafka_error("joining the group", e))?;
        // Whatever ends this call (a panic in `build` included) ends the
        // group's thread.
        let _shutdown = ShutdownOnDrop(shared.clone());
        let membership = {
            let (consumer, shared) = (consumer.clone(), shared.clone());
            std::thread::Builder::new()
                .name(format!("{job}/group"))
                .spawn(move || {
                    while !lock(&shared.state).shutdown {
                        // Rebalances run in here (the context's callbacks);
                        // records do not, the partitions being paused.
                        let _ = consumer.poll(Duration::from_millis(100));
                    }
                })
                .map_err(|e| StreamError::Spawn {
                    stage: "group".into(),
                    message: e.to_string(),
                })?
        };
        let result = self.generations(job, &shared, &consumer, first, &build);
        shared.shut_down();
        let _ = membership.join();
        consumer.unsubscribe();
        result
    }

    fn generations(
        &self,
        job: &str,
        shared: &Arc<Shared>,
        consumer: &Arc<BaseConsumer<Membership>>,
        first: StreamEnv,
        build: &impl Fn(&StreamEnv) -> Result<(), StreamError>,
    ) -> Result<(), StreamError> {
        let mut producer = Arc::new(self.producer()?);
        *lock(&shared.producer) = Some(producer.clone());
        let mut next_env = Some(first);
        let mut last = 0;
        let mut failures = 0;
        loop {
            let (generation, partitions) = shared.next_assignment(last);
            let Some(partitions) = partitions else {
                return Ok(());
            };
            last = generation;
            let env = match next_env.take() {
                Some(env) => env,
                None => {
                    let env = self.env(shared);
                    build(&env)?;
                    env
                }
            };
            if partitions.is_empty() {
                continue;
            }
            let result = committed(consumer, &partitions).and_then(|positions| {
                // Taken now, with the assignment: commits of this
                // generation carry it even if the member is reset meanwhile.
                let metadata = consumer.group_metadata().ok_or_else(|| {
                    StreamError::Kafka("the group's consumer has no metadata".into())
                })?;
                tracing::info!(
                    generation,
                    partitions = partitions.len(),
                    "library mode: running the job over the partitions assigned"
                );
                shared.begin_generation(positions);
                producer.context().0.reset();
                producer
                    .begin_transaction()
                    .map_err(|e| kafka_error("beginning a transaction", e))?;
                env.enable_checkpointing(
                    self.commit_interval,
                    GroupCommits {
                        shared: shared.clone(),
                        producer: producer.clone(),
                        metadata,
                    },
                );
                // A checkpoint that cannot complete is given up while its
                // transaction is still alive.
                env.set_checkpoint_timeout(self.transaction_timeout / 2);
                shared.started(env.cancel_flag());
                let result = env.execute(job);
                // Whatever the last commit did not take is dropped: the
                // next owner of these partitions does it again.
                if let Err(e) = producer.abort_transaction(CLUSTER_TIMEOUT) {
                    // Fenced (a transaction timed out while this instance
                    // was stopped, say): a new producer fences the old.
                    tracing::warn!("library mode: aborting failed ({e}): a new producer");
                    producer = Arc::new(self.producer()?);
                    *lock(&shared.producer) = Some(producer.clone());
                }
                result
            });
            let stopped = shared.ended();
            if lock(&shared.plan).commits > 0 {
                failures = 0;
            }
            match result {
                _ if stopped => {}
                Ok(()) => return Ok(()),
                // The cluster refused (a rebalance began, a coordinator
                // moved): the same partitions again, from the last commit,
                // unless the group moves them first.
                Err(StreamError::Kafka(why)) if failures < MAX_FAILED_GENERATIONS => {
                    failures += 1;
                    tracing::warn!(
                        "library mode: generation {generation} failed ({why}): running it again"
                    );
                    std::thread::sleep(Duration::from_secs(1));
                    last = generation - 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn env(&self, shared: &Arc<Shared>) -> StreamEnv {
        let env = StreamEnv::new();
        env.set_library(Arc::new(Library {
            bootstrap: self.bootstrap.clone(),
            shared: shared.clone(),
            topics: Mutex::default(),
        }));
        env
    }

    fn client_config(&self) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &self.bootstrap);
        for (k, v) in &self.properties {
            cfg.set(k, v);
        }
        cfg
    }

    fn consumer(&self, shared: &Arc<Shared>) -> Result<BaseConsumer<Membership>, StreamError> {
        let mut cfg = self.client_config();
        cfg.set("group.id", &self.application_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // Stable positions: one an open transaction holds is waited for.
            .set("isolation.level", "read_committed")
            // Eager: every member stops before any partition moves.
            .set("partition.assignment.strategy", "range,roundrobin");
        cfg.create_with_context(Membership(shared.clone()))
            .map_err(|e| kafka_error("creating the group's consumer", e))
    }

    fn producer(&self) -> Result<KafkaProducer, StreamError> {
        let mut cfg = self.client_config();
        cfg.set(
            "transactional.id",
            format!("{}-{}", self.application_id, self.instance_id),
        )
        .set(
            "transaction.timeout.ms",
            self.transaction_timeout.as_millis().to_string(),
        )
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5");
        let producer: KafkaProducer = cfg
            .create_with_context(DeliveryCheck(Arc::new(Deliveries::default())))
            .map_err(|e| kafka_error("creating the instance's producer", e))?;
        producer
            .init_transactions(CLUSTER_TIMEOUT)
            .map_err(|e| kafka_error("initialising transactions", e))?;
        Ok(producer)
    }
}

/// The group's positions of `partitions` (none where nothing committed).
fn committed(
    consumer: &BaseConsumer<Membership>,
    partitions: &[(String, i32)],
) -> Result<BTreeMap<(String, i32), i64>, StreamError> {
    if partitions.is_empty() {
        return Ok(BTreeMap::new());
    }
    let mut tpl = TopicPartitionList::new();
    for (topic, p) in partitions {
        tpl.add_partition(topic, *p);
    }
    let got = consumer
        .committed_offsets(tpl, CLUSTER_TIMEOUT)
        .map_err(|e| kafka_error("reading the group's positions", e))?;
    let mut positions = BTreeMap::new();
    for e in got.elements() {
        e.error()
            .map_err(|err| kafka_error("reading the group's positions", err))?;
        if let Offset::Offset(n) = e.offset() {
            positions.insert((e.topic().to_owned(), e.partition()), n);
        }
    }
    Ok(positions)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a job built in library mode knows of its instance.
pub(crate) struct Library {
    bootstrap: String,
    shared: Arc<Shared>,
    /// The topics this build of the job reads (the group subscribes to the
    /// first build's: every build must build the same job).
    topics: Mutex<BTreeSet<String>>,
}

impl std::fmt::Debug for Library {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Library")
            .field("bootstrap", &self.bootstrap)
            .finish_non_exhaustive()
    }
}

impl Library {
    /// A source of `topic` on the cluster at `bootstrap` joins the group's
    /// subscription; why not when the job cannot read it in library mode.
    pub fn add_source(&self, bootstrap: &str, topic: &str) -> Result<(), String> {
        if bootstrap != self.bootstrap {
            return Err(format!(
                "topic '{topic}': in library mode every source reads the application's cluster ({})",
                self.bootstrap
            ));
        }
        if !lock(&self.topics).insert(topic.to_owned()) {
            // Both sources would read each assigned partition.
            return Err(format!(
                "topic '{topic}' is read by two sources: in library mode each topic has one"
            ));
        }
        Ok(())
    }

    fn topics(&self) -> Vec<String> {
        lock(&self.topics).iter().cloned().collect()
    }

    /// Whether a sink on `bootstrap` can write in the instance's transaction.
    pub fn check_sink(&self, bootstrap: &str, topic: &str) -> Result<(), String> {
        if bootstrap != self.bootstrap {
            return Err(format!(
                "topic '{topic}': in library mode an exactly-once sink writes to the application's cluster ({})",
                self.bootstrap
            ));
        }
        Ok(())
    }

    /// The partitions of `topic` this generation reads, with the group's
    /// positions in them.
    pub fn assigned(&self, topic: &str) -> Vec<(i32, Option<i64>)> {
        let partitions: Vec<i32> = lock(&self.shared.state)
            .assignment
            .iter()
            .flat_map(|(_, ps)| ps.iter())
            .filter(|(t, _)| t == topic)
            .map(|(_, p)| *p)
            .collect();
        let plan = lock(&self.shared.plan);
        partitions
            .into_iter()
            .map(|p| (p, plan.positions.get(&(topic.to_owned(), p)).copied()))
            .collect()
    }

    /// The generation's partitions were revoked: its sources stop.
    pub fn stopping(&self) -> bool {
        self.shared.stopping()
    }

    /// A source subtask's positions at the barrier being taken.
    pub fn note_positions(&self, topic: &str, positions: &[(i32, i64)]) {
        let mut plan = lock(&self.shared.plan);
        for (p, next) in positions {
            plan.noted.insert((topic.to_owned(), *p), *next);
        }
    }

    /// A sink subtask writing into the instance's transaction; it gives up
    /// waiting for a commit when `cancel` (the job's) is set.
    pub fn writer<T>(
        &self,
        topic: &str,
        serialize: Arc<Serializer<T>>,
        info: SubtaskInfo,
        cancel: Arc<AtomicBool>,
    ) -> GroupWriter<T> {
        GroupWriter {
            shared: self.shared.clone(),
            topic: topic.to_owned(),
            serialize,
            info,
            cancel,
            waiting_for: None,
            producer: None,
        }
    }
}

/// The generations' shared state: what the group assigned, what the running
/// one noted, and how far its commits got. Lock order: `state`, then `plan`
/// (never `state` while `plan` is held).
#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    state_changed: Condvar,
    plan: Mutex<Plan>,
    plan_changed: Condvar,
    /// The running generation must stop (its partitions are revoked).
    stop: AtomicBool,
    producer: Mutex<Option<Arc<KafkaProducer>>>,
}

#[derive(Default)]
struct State {
    /// The latest assignment and its number; none while revoked.
    assignment: Option<(u64, Vec<(String, i32)>)>,
    generations: u64,
    /// The running generation's cancel flag.
    running: Option<Arc<AtomicBool>>,
    shutdown: bool,
}

#[derive(Default)]
struct Plan {
    /// The group's positions when the generation started.
    positions: BTreeMap<(String, i32), i64>,
    /// Source positions at the latest barrier.
    noted: BTreeMap<(String, i32), i64>,
    /// The latest checkpoint committed or abandoned: sinks waiting for it
    /// write on.
    released: CheckpointId,
    /// Commits this generation made.
    commits: u64,
    /// A commit failed: the generation is over.
    failed: bool,
}

/// Ends the group's thread when the instance's run ends, however it ends.
struct ShutdownOnDrop(Arc<Shared>);

impl Drop for ShutdownOnDrop {
    fn drop(&mut self) {
        self.0.shut_down();
    }
}

fn wait<'a, T>(cv: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait_timeout(guard, TICK)
        .map(|(g, _)| g)
        .unwrap_or_else(|p| p.into_inner().0)
}

impl Shared {
    /// Waits for an assignment newer than generation `last`; none when the
    /// instance shuts down.
    fn next_assignment(&self, last: u64) -> (u64, Option<Vec<(String, i32)>>) {
        let mut state = lock(&self.state);
        loop {
            if state.shutdown {
                return (last, None);
            }
            if let Some((generation, partitions)) = &state.assignment {
                if *generation > last {
                    let got = (*generation, Some(partitions.clone()));
                    self.stop.store(false, Ordering::SeqCst);
                    return got;
                }
            }
            state = wait(&self.state_changed, state);
        }
    }

    fn shut_down(&self) {
        lock(&self.state).shutdown = true;
        self.state_changed.notify_all();
    }

    fn begin_generation(&self, positions: BTreeMap<(String, i32), i64>) {
        let mut plan = lock(&self.plan);
        plan.positions = positions;
        plan.noted.clear();
        plan.released = 0;
        plan.commits = 0;
        plan.failed = false;
    }

    fn started(&self, cancel: Arc<AtomicBool>) {
        let mut state = lock(&self.state);
        if self.stopping() {
            cancel.store(true, Ordering::SeqCst);
        }
        state.running = Some(cancel);
    }

    /// The generation ended; true when it was stopped by a rebalance.
    fn ended(&self) -> bool {
        let mut state = lock(&self.state);
        state.running = None;
        self.state_changed.notify_all();
        self.stopping()
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Partitions revoked (or lost): the running generation stops, and this
    /// returns once it has (its transaction aborted), so no partition is
    /// worked on by two instances.
    fn revoke(&self) {
        let deadline = Instant::now() + STOP_WAIT;
        let mut state = lock(&self.state);
        state.assignment = None;
        self.stop.store(true, Ordering::SeqCst);
        self.plan_changed.notify_all();
        while let Some(cancel) = state.running.clone() {
            // Again each time: a run that was starting clears the flag.
            cancel.store(true, Ordering::SeqCst);
            if Instant::now() >= deadline {
                tracing::warn!("library mode: the generation did not stop in time");
                break;
            }
            state = wait(&self.state_changed, state);
        }
    }

    fn assign(&self, partitions: Vec<(String, i32)>) {
        let mut state = lock(&self.state);
        state.generations += 1;
        let generation = state.generations;
        state.assignment = Some((generation, partitions));
        self.state_changed.notify_all();
    }

    /// Checkpoint `id` committed (`committed`) or abandoned: sinks waiting
    /// for it go on.
    fn release(&self, id: CheckpointId, committed: bool) {
        let mut plan = lock(&self.plan);
        plan.released = plan.released.max(id);
        plan.commits += u64::from(committed);
        drop(plan);
        self.plan_changed.notify_all();
    }

    fn commit_failed(&self) {
        lock(&self.plan).failed = true;
        self.plan_changed.notify_all();
    }

    /// Waits until checkpoint `id` is committed or abandoned; false when the
    /// generation ends first (stopped, cancelled, or its commit failed).
    fn wait_released(&self, id: CheckpointId, cancel: &AtomicBool) -> bool {
        let mut plan = lock(&self.plan);
        while plan.released < id {
            if plan.failed || self.stopping() || cancel.load(Ordering::SeqCst) {
                return false;
            }
            plan = wait(&self.plan_changed, plan);
        }
        true
    }
}

/// The group consumer's context: rebalances stop and start generations.
struct Membership(Arc<Shared>);

impl ClientContext for Membership {}

impl ConsumerContext for Membership {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // An error unassigns everything too.
        if let Rebalance::Revoke(_) | Rebalance::Error(_) = rebalance {
            self.0.revoke();
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // The job's sources read these; the group's consumer only holds them.
            if let Err(e) = consumer.pause(tpl) {
                tracing::warn!("library mode: pausing the group's consumer: {e}");
            }
            let partitions = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect();
            self.0.assign(partitions);
        }
    }
}

/// The checkpoint store of a generation: a completed checkpoint is a
/// commit of the instance's transaction with the positions at its barrier.
/// State is not kept: a job that writes any is refused.
struct GroupCommits {
    shared: Arc<Shared>,
    producer: Arc<KafkaProducer>,
    /// The group generation the commits are fenced by.
    metadata: ConsumerGroupMetadata,
}

impl GroupCommits {
    fn commit(&self) -> Result<(), StreamError> {
        let positions = std::mem::take(&mut lock(&self.shared.plan).noted);
        if !positions.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for ((topic, p), next) in &positions {
                tpl.add_partition_offset(topic, *p, Offset::Offset(*next))
                    .map_err(|e| kafka_error("listing positions", e))?;
            }
            self.producer
                .send_offsets_to_transaction(&tpl, &self.metadata, CLUSTER_TIMEOUT)
                .map_err(|e| kafka_error("adding positions to the transaction", e))?;
        }
        // A record not delivered fails the commit: nothing is half done.
        self.producer
            .commit_transaction(CLUSTER_TIMEOUT)
            .map_err(|e| kafka_error("committing a transaction", e))?;
        self.producer
            .begin_transaction()
            .map_err(|e| kafka_error("beginning a transaction", e))
    }
}

impl CheckpointStore for GroupCommits {
    fn put(&self, _: CheckpointId, name: &str, bytes: &[u8]) -> Result<(), StreamError> {
        // Sources write their positions (noted apart, with their topics).
        let entries = crate::checkpoint::entry_names(bytes);
        if !entries.is_empty() && entries.iter().all(|e| e == crate::kafka::POSITIONS) {
            return Ok(());
        }
        Err(StreamError::InvalidJob(format!(
            "'{name}' keeps state ({}), which library mode cannot hand over yet",
            entries.join(", ")
        )))
    }

    fn complete(&self, id: CheckpointId) -> Result<(), StreamError> {
        if self.shared.stopping() {
            self.shared.commit_failed();
            return Err(StreamError::CancelledByRequest);
        }
        match self.commit() {
            Ok(()) => {
                self.shared.release(id, true);
                Ok(())
            }
            Err(e) => {
                self.shared.commit_failed();
                Err(e)
            }
        }
    }

    fn abandoned(&self, id: CheckpointId) {
        self.shared.release(id, false);
    }

    fn latest(&self) -> Result<Option<CheckpointId>, StreamError> {
        Ok(None)
    }

    fn parts(&self, _: CheckpointId, _: &str) -> Result<Vec<(String, Vec<u8>)>, StreamError> {
        Ok(Vec::new())
    }

    fn prune(&self, _: usize) -> Result<(), StreamError> {
        Ok(())
    }

    fn discard_incomplete(&self) -> Result<(), StreamError> {
        Ok(())
    }
}

/// A topic sink in library mode: it writes into the instance's
/// transaction, and after a barrier waits for the commit it belongs to.
pub(crate) struct GroupWriter<T> {
    shared: Arc<Shared>,
    topic: String,
    serialize: Arc<Serializer<T>>,
    info: SubtaskInfo,
    cancel: Arc<AtomicBool>,
    waiting_for: Option<CheckpointId>,
    /// The generation's producer, taken at the first record.
    producer: Option<Arc<KafkaProducer>>,
}

impl<T> GroupWriter<T> {
    /// Waits for the commit of the barrier passed, if one is due, and takes
    /// the generation's producer.
    fn go_on(&mut self) -> Result<(), StreamError> {
        if let Some(id) = self.waiting_for.take() {
            if !self.shared.wait_released(id, &self.cancel) {
                // The generation ended (its cause is reported elsewhere).
                return Err(StreamError::Cancelled {
                    stage: "kafka".into(),
                    subtask: self.info.index,
                });
            }
        }
        if self.producer.is_none() {
            self.producer = lock(&self.shared.producer).clone();
        }
        Ok(())
    }
}

impl<T: Send> Output<T> for GroupWriter<T> {
    fn push(&mut self, record: Record<T>) -> Result<(), StreamError> {
        self.go_on()?;
        let Some(producer) = self.producer.as_deref() else {
            return Err(StreamError::Kafka("the instance has no producer".into()));
        };
        let out: KafkaOutput = (self.serialize)(&record.value);
        send_record(producer, &self.topic, &out, record.time)?;
        producer.context().0.check()
    }

    fn watermark(&mut self, _: i64) -> Result<(), StreamError> {
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn finish(&mut self) -> Result<(), StreamError> {
        self.go_on()
    }

    fn barrier(&mut self, cp: &mut crate::checkpoint::Cursor<'_>) -> Result<(), StreamError> {
        if !cp.is_final() {
            self.waiting_for = Some(cp.id);
        }
        cp.skip();
        Ok(())
    }

    fn restore(&mut self, cp: &mut crate::checkpoint::Cursor<'_>) -> Result<(), StreamError> {
        cp.skip();
        Ok(())
    }

    fn checkpoint_complete(&mut self, _: CheckpointId) -> Result<(), StreamError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink waiting for a commit goes on when it is made or abandoned,
    /// and gives up when the generation ends another way: it never waits
    /// on a commit that will not come.
    #[test]
    fn a_waiting_sink_is_released_by_every_end_of_its_checkpoint() {
        let shared = Shared::default();
        let cancel = AtomicBool::new(false);
        shared.release(1, true);
        assert!(shared.wait_released(1, &cancel));
        shared.release(2, false);
        assert!(shared.wait_released(2, &cancel));
        assert_eq!(lock(&shared.plan).commits, 1);

        shared.commit_failed();
        assert!(!shared.wait_released(3, &cancel));

        shared.begin_generation(BTreeMap::new());
        cancel.store(true, Ordering::SeqCst);
        assert!(!shared.wait_released(1, &cancel));

        let cancel = AtomicBool::new(false);
        shared.stop.store(true, Ordering::SeqCst);
        assert!(!shared.wait_released(1, &cancel));
    }

    /// A revocation returns only once the running generation has ended,
    /// setting its cancel flag again while it waits (a run that was
    /// starting clears it).
    #[test]
    fn a_revocation_waits_for_the_generation_to_end() {
        let shared = Arc::new(Shared::default());
        shared.assign(vec![("t".into(), 0)]);
        let (generation, partitions) = shared.next_assignment(0);
        assert_eq!((generation, partitions.map(|p| p.len())), (1, Some(1)));
        let cancel = Arc::new(AtomicBool::new(false));
        shared.started(cancel.clone());
        let revoking = {
            let shared = shared.clone();
            std::thread::spawn(move || shared.revoke())
        };
        // The run clears its flag as it starts, after the revocation began.
        while !cancel.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        cancel.store(false, Ordering::SeqCst);
        while !cancel.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(!revoking.is_finished(), "returned while the generation ran");
        assert!(
            shared.ended(),
            "the generation was stopped by the revocation"
        );
        revoking.join().unwrap();
        assert!(lock(&shared.state).assignment.is_none());
        // The next assignment starts a generation that is not stopped.
        shared.assign(vec![("t".into(), 1)]);
        assert_eq!(shared.next_assignment(1).0, 2);
        assert!(!shared.stopping());
    }
}

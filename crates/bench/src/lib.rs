//! `sluice bench`: a Kafka load generator.
//!
//! It speaks only standard Kafka APIs (ApiVersions, Metadata, CreateTopics,
//! ListOffsets, Produce, Fetch) through `sluice-client`, the workspace's
//! Kafka wire client, so it measures Sluice or any Kafka-compatible
//! broker, and it is cheap enough per record that the broker, not the load
//! generator, is what gets measured: each producer keeps up to
//! `max_in_flight` Produce requests outstanding on a connection per leader,
//! encodes each RecordBatch once, and allocates per batch, never per record.
//!
//! Modes: `produce` (acknowledged write throughput and per-record ack
//! latency), `consume` (read what the topic holds from the beginning;
//! latency is per fetch), `e2e` (both at once; latency from each record's
//! intended send time to its consumption). With a target rate the run is
//! open loop (see [`schedule::Schedule`]).

pub mod cluster;
mod consume;
pub mod nexmark;
mod produce;
pub mod report;
pub mod schedule;
mod txn;

use sluice_vocab::ErrorCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kafka_protocol::records::Compression;

pub use consume::count_records;
pub use report::{Commits, LatencyMs, Report, Stats};
pub use schedule::LittlesLaw;

/// Errors of a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("invalid settings: {0}")]
    Config(String),
    #[error(transparent)]
    Client(#[from] sluice_client::ClientError),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{what}: the broker answered {code}")]
    Broker { what: String, code: ErrorCode },
    #[error("{0}")]
    Incomplete(String),
}

/// What to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Produce,
    Consume,
    E2e,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Produce => "produce",
            Mode::Consume => "consume",
            Mode::E2e => "e2e",
        }
    }
}

/// Produce acknowledgement level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acks {
    /// -1: every in-sync replica (and, on Sluice, durable under its flush policy).
    All,
    /// 1: the leader.
    Leader,
    /// 0: no response at all; a record counts as done once written to the socket.
    None,
}

impl Acks {
    pub fn wire(self) -> i16 {
        match self {
            Acks::All => -1,
            Acks::Leader => 1,
            Acks::None => 0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Acks::All => "all",
            Acks::Leader => "1",
            Acks::None => "0",
        }
    }
}

/// What a producer promises about its writes, as Kafka's producer settings
/// name it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Delivery {
    /// No producer id: a retried batch could be written twice.
    Plain,
    /// `enable.idempotence=true`: a producer id and a sequence per batch.
    Idempotent,
    /// `transactional.id` set: batches are written in transactions, each
    /// committed when it is `commit_interval` old or holds `commit_records`
    /// records, whichever comes first.
    Transactional {
        commit_interval: Duration,
        commit_records: Option<u64>,
    },
}

impl Delivery {
    pub fn name(self) -> &'static str {
        match self {
            Delivery::Plain => "plain",
            Delivery::Idempotent => "idempotent",
            Delivery::Transactional { .. } => "transactional",
        }
    }
}

/// The name of a compression codec as the CLI and JSON spell it.
pub fn compression_name(c: Compression) -> &'static str {
    match c {
        Compression::None => "none",
        Compression::Gzip => "gzip",
        Compression::Snappy => "snappy",
        Compression::Lz4 => "lz4",
        Compression::Zstd => "zstd",
    }
}

/// One run's settings.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub mode: Mode,
    /// Comma-separated `host:port` list.
    pub bootstrap: String,
    pub topic: String,
    /// Partitions when the topic has to be created (default 1).
    pub partitions: Option<u32>,
    /// Value bytes per record; the first 8 carry the intended send time.
    pub record_size: usize,
    /// Records to send (produce, e2e) or read at most (consume).
    pub records: Option<u64>,
    /// Run length instead of a record count.
    pub duration: Option<Duration>,
    pub producers: usize,
    pub consumers: usize,
    pub acks: Acks,
    pub compression: Compression,
    /// Target size of one RecordBatch.
    pub batch_bytes: usize,
    /// How long a batch that is not full may wait for more records.
    pub linger: Duration,
    /// Produce requests outstanding per connection.
    pub max_in_flight: usize,
    /// Bytes per partition one fetch may return.
    pub fetch_bytes: usize,
    /// Open-loop target rate over all producers, records per second.
    pub rate: Option<f64>,
    pub delivery: Delivery,
    /// Records carry one of this many keys in turn (none when unset).
    pub keys: Option<u64>,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

impl BenchConfig {
    /// Settings with the CLI's defaults for `mode`.
    pub fn new(mode: Mode, bootstrap: &str, topic: &str) -> BenchConfig {
        BenchConfig {
            mode,
            bootstrap: bootstrap.to_string(),
            topic: topic.to_string(),
            partitions: None,
            record_size: 100,
            records: None,
            duration: None,
            producers: 1,
            consumers: 1,
            acks: Acks::All,
            compression: Compression::None,
            batch_bytes: 1 << 20,
            linger: Duration::ZERO,
            max_in_flight: 5,
            fetch_bytes: 16 << 20,
            rate: None,
            delivery: Delivery::Plain,
            keys: None,
            progress: false,
        }
    }

    fn validate(&self) -> Result<(), BenchError> {
        let bad = |m: &str| Err(BenchError::Config(m.to_string()));
        if self.record_size < 8 {
            return bad("--record-size must be at least 8 (the send time is embedded)");
        }
        if self.records.is_some() && self.duration.is_some() {
            return bad("give --records or --duration, not both");
        }
        if self.records == Some(0) {
            return bad("--records must be positive");
        }
        if self.duration.is_some_and(|d| d.is_zero()) {
            return bad("--duration must be positive");
        }
        if self.mode != Mode::Consume && self.producers == 0 {
            return bad("--producers must be at least 1");
        }
        if self.mode != Mode::Produce && self.consumers == 0 {
            return bad("--consumers must be at least 1");
        }
        if self.max_in_flight == 0 {
            return bad("--max-in-flight must be at least 1");
        }
        if self.keys == Some(0) {
            return bad("--keys must be at least 1");
        }
        if self.partitions == Some(0) {
            return bad("--partitions must be at least 1");
        }
        if let Some(r) = self.rate {
            if !(r.is_finite() && r > 0.0) {
                return bad("--rate must be a positive number of records per second");
            }
        }
        if self.delivery != Delivery::Plain {
            // Kafka's producer refuses idempotence without acks=all, and
            // keeps ordering across retries for at most 5 requests in flight.
            if self.acks != Acks::All {
                return bad("an idempotent or transactional producer needs --acks all");
            }
            if self.max_in_flight > 5 {
                return bad(
                    "an idempotent or transactional producer allows at most 5 requests in flight",
                );
            }
        }
        if let Delivery::Transactional {
            commit_interval,
            commit_records,
        } = self.delivery
        {
            if commit_interval.is_zero() || commit_records == Some(0) {
                return bad("--commit-interval-ms and --commit-records must be positive");
            }
        }
        if self.fetch_bytes < 1024 || self.fetch_bytes > 64 << 20 {
            return bad("--fetch-bytes must be between 1 KiB and 64 MiB");
        }
        if self.batch_bytes < 128 || self.batch_bytes > 64 << 20 {
            return bad("--batch-bytes must be between 128 and 64 MiB");
        }
        Ok(())
    }

    /// Records sent per run when neither a count nor a duration is given.
    pub const DEFAULT_RECORDS: u64 = 1_000_000;
}

/// Runs one benchmark and returns its report.
pub async fn run(cfg: BenchConfig) -> Result<Report, BenchError> {
    cfg.validate()?;
    let mut conn = cluster::bootstrap(&cfg.bootstrap).await?;
    let create = match cfg.mode {
        Mode::Consume => None,
        Mode::Produce | Mode::E2e => Some(cfg.partitions.unwrap_or(1)),
    };
    let cluster = Arc::new(cluster::discover(&mut conn, &cfg.topic, create).await?);
    drop(conn);
    if let Some(p) = cfg.partitions {
        if p as usize != cluster.leaders.len() {
            eprintln!(
                "sluice bench: topic {:?} exists with {} partitions; --partitions {p} ignored",
                cfg.topic,
                cluster.leaders.len()
            );
        }
    }
    match cfg.mode {
        Mode::Produce => run_produce(&cfg, cluster).await,
        Mode::Consume => run_consume(&cfg, cluster).await,
        Mode::E2e => run_e2e(&cfg, cluster).await,
    }
}

fn schedules(cfg: &BenchConfig) -> Vec<schedule::Schedule> {
    let records = match (cfg.records, cfg.duration) {
        (None, None) => Some(BenchConfig::DEFAULT_RECORDS),
        (r, _) => r,
    };
    schedule::split(cfg.producers, records, cfg.rate, cfg.duration)
}

/// Records due over all producers by `elapsed` (open loop), or started
/// (closed loop).
fn arrivals(schedules: &[schedule::Schedule], started: &AtomicU64, elapsed: Duration) -> u64 {
    match schedules.first().and_then(|s| s.rate) {
        Some(_) => schedules.iter().filter_map(|s| s.due(elapsed)).sum(),
        None => started.load(Ordering::Relaxed),
    }
}

/// Shows progress of `done` out of `total` on stderr until dropped.
struct Progress {
    stop: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    fn start(
        enabled: bool,
        verb: &'static str,
        total: Option<u64>,
        done: Arc<schedule::Counters>,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        if !enabled {
            return Progress { stop, task: None };
        }
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
            let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
            let template = match total {
                Some(_) => {
                    format!("{{bar:20}} {{human_pos}}/{{human_len}} {verb} {{rate}} {{elapsed}}")
                }
                None => format!("{{spinner}} {{human_pos}} {verb} {{rate}} {{elapsed}}"),
            };
            if let Ok(style) = ProgressStyle::with_template(&template) {
                bar.set_style(style.with_key(
                    "rate",
                    |state: &ProgressState, w: &mut dyn std::fmt::Write| {
                        let _ = write!(w, "{:.0}/s", state.per_sec());
                    },
                ));
            }
            while !flag.load(Ordering::Relaxed) {
                bar.set_position(done.completed.load(Ordering::Relaxed));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            bar.finish_and_clear();
        });
        Progress {
            stop,
            task: Some(task),
        }
    }

    async fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// Period of the in-flight sampler.
const SAMPLE_PERIOD: Duration = Duration::from_millis(1);

async fn run_produce(
    cfg: &BenchConfig,
    cluster: Arc<cluster::Cluster>,
) -> Result<Report, BenchError> {
    let schedules = schedules(cfg);
    let total = schedules.iter().map(|s| s.total).sum::<Option<u64>>();
    let counters = Arc::new(schedule::Counters::default());
    let links = produce::connect_all(cfg, &cluster).await?;
    let cpu0 = schedule::process_cpu_seconds();
    let start = Instant::now();
    let sampler = {
        let (scheds, counters) = (schedules.clone(), counters.clone());
        schedule::Sampler::start(SAMPLE_PERIOD, start, move |elapsed| {
            arrivals(&scheds, &counters.started, elapsed)
                .saturating_sub(counters.completed.load(Ordering::Relaxed))
        })
    };
    let progress = Progress::start(cfg.progress, "acknowledged", total, counters.clone());
    let result =
        produce::run_producers(cfg, &cluster, links, &schedules, start, counters.clone()).await;
    let cpu = schedule::process_cpu_seconds() - cpu0;
    let samples = sampler.finish();
    progress.finish().await;
    let out = result?;
    Ok(Report::build(
        cfg,
        &cluster,
        report::Measured {
            records: out.records,
            elapsed: out.last_done,
            stats: out.stats,
            cpu_seconds: cpu,
            samples,
            unit: "records",
            latency_of: if cfg.acks == Acks::None {
                "socket_write"
            } else {
                "ack"
            },
            producers: cfg.producers,
            consumers: 0,
            ack_stats: None,
            commits: out.commits,
        },
    ))
}

async fn run_consume(
    cfg: &BenchConfig,
    cluster: Arc<cluster::Cluster>,
) -> Result<Report, BenchError> {
    let earliest = cluster::list_offsets(&cluster, cluster::EARLIEST).await?;
    let latest = cluster::list_offsets(&cluster, cluster::LATEST).await?;
    let available: u64 = earliest
        .iter()
        .zip(&latest)
        .map(|(e, l)| (l - e).max(0) as u64)
        .sum();
    if available == 0 {
        return Err(BenchError::Config(format!(
            "topic {:?} is empty: produce to it first",
            cluster.topic
        )));
    }
    let limit = cfg.records.map(|r| r.min(available)).unwrap_or(available);
    let counters = Arc::new(schedule::Counters::default());
    let plan = consume::Plan {
        start_offsets: earliest,
        end_offsets: Some(latest),
        e2e: false,
        target: Arc::new(AtomicU64::new(limit)),
        duration: cfg.duration,
    };
    let tasks = consume::connect_all(cfg, &cluster).await?;
    let cpu0 = schedule::process_cpu_seconds();
    let start = Instant::now();
    let sampler = {
        let c = counters.clone();
        schedule::Sampler::start(SAMPLE_PERIOD, start, move |_| {
            c.requests_in_flight.load(Ordering::Relaxed)
        })
    };
    let progress = Progress::start(cfg.progress, "consumed", Some(limit), counters.clone());
    let result = consume::run_consumers(tasks, &plan, start, counters.clone()).await;
    let cpu = schedule::process_cpu_seconds() - cpu0;
    let samples = sampler.finish();
    progress.finish().await;
    let out = result?;
    Ok(Report::build(
        cfg,
        &cluster,
        report::Measured {
            records: out.records,
            elapsed: out.last_done,
            stats: out.stats,
            cpu_seconds: cpu,
            samples,
            unit: "fetch_requests",
            latency_of: "fetch",
            producers: 0,
            consumers: cfg.consumers,
            ack_stats: None,
            commits: Commits::default(),
        },
    ))
}

/// How long consumers may trail the producers' last acknowledgement.
const E2E_DRAIN: Duration = Duration::from_secs(60);

async fn run_e2e(cfg: &BenchConfig, cluster: Arc<cluster::Cluster>) -> Result<Report, BenchError> {
    let schedules = schedules(cfg);
    let total = schedules.iter().map(|s| s.total).sum::<Option<u64>>();
    // Consumers start at the end of the log, so they see only this run.
    let latest = cluster::list_offsets(&cluster, cluster::LATEST).await?;
    let produced = Arc::new(schedule::Counters::default());
    let consumed = Arc::new(schedule::Counters::default());
    let plan = consume::Plan {
        start_offsets: latest,
        end_offsets: None,
        e2e: true,
        // Unknown until the producers are done.
        target: Arc::new(AtomicU64::new(u64::MAX)),
        duration: None,
    };
    let consumer_tasks = consume::connect_all(cfg, &cluster).await?;
    let links = produce::connect_all(cfg, &cluster).await?;
    let cpu0 = schedule::process_cpu_seconds();
    let start = Instant::now();
    let sampler = {
        let (scheds, p, c) = (schedules.clone(), produced.clone(), consumed.clone());
        schedule::Sampler::start(SAMPLE_PERIOD, start, move |elapsed| {
            arrivals(&scheds, &p.started, elapsed)
                .saturating_sub(c.completed.load(Ordering::Relaxed))
        })
    };
    let progress = Progress::start(cfg.progress, "consumed", total, consumed.clone());
    let mut consumers = tokio::spawn({
        let (plan, consumed) = (plan.clone(), consumed.clone());
        async move { consume::run_consumers(consumer_tasks, &plan, start, consumed).await }
    });
    let produced_result =
        produce::run_producers(cfg, &cluster, links, &schedules, start, produced.clone()).await;
    let sent = match &produced_result {
        Ok(out) => out.records,
        // Stop the consumers at what they have; the producer error is reported.
        Err(_) => 0,
    };
    plan.target.store(sent, Ordering::Relaxed);
    let drained = tokio::time::timeout(E2E_DRAIN, &mut consumers).await;
    if drained.is_err() {
        consumers.abort();
    }
    let cpu = schedule::process_cpu_seconds() - cpu0;
    let samples = sampler.finish();
    progress.finish().await;
    let produced = produced_result?;
    let out = match drained {
        Ok(Ok(r)) => r?,
        Ok(Err(join)) => return Err(BenchError::Incomplete(format!("consumer task failed: {join}"))),
        Err(_) => {
            return Err(BenchError::Incomplete(format!(
                "consumers did not receive all {sent} records within {E2E_DRAIN:?} of the last acknowledgement ({} received)",
                consumed.completed.load(Ordering::Relaxed)
            )))
        }
    };
    Ok(Report::build(
        cfg,
        &cluster,
        report::Measured {
            records: out.records,
            elapsed: out.last_done,
            stats: out.stats,
            cpu_seconds: cpu,
            samples,
            unit: "records",
            latency_of: "end_to_end",
            producers: cfg.producers,
            consumers: cfg.consumers,
            ack_stats: Some(produced.stats),
            commits: produced.commits,
        },
    ))
}

/// What a set of producer or consumer tasks did, summed.
pub(crate) struct Outcome {
    pub records: u64,
    /// Start to the last acknowledgement (producers) or record consumed (consumers).
    pub last_done: Duration,
    pub stats: report::Stats,
    /// Transactional producers: the latency of each commit.
    pub commits: report::Commits,
}

/// Awaits every task and sums their outcomes; the first error (or panic,
/// reported as `what` failing) wins, but every task is awaited first so none
/// is left running.
pub(crate) async fn join_outcomes(
    tasks: Vec<tokio::task::JoinHandle<Result<Outcome, BenchError>>>,
    what: &str,
) -> Result<Outcome, BenchError> {
    let mut out = Outcome {
        records: 0,
        last_done: Duration::ZERO,
        stats: report::Stats::new(),
        commits: report::Commits::default(),
    };
    let mut first_err = None;
    for t in tasks {
        match t.await {
            Ok(Ok(r)) => {
                out.records += r.records;
                out.last_done = out.last_done.max(r.last_done);
                out.stats.merge(&r.stats);
                out.commits.merge(&r.commits);
            }
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(join) => {
                first_err.get_or_insert(BenchError::Incomplete(format!(
                    "{what} task failed: {join}"
                )));
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_errors_are_named() {
        let e = BenchError::Broker {
            what: "Produce to partition 0".into(),
            code: ErrorCode::MessageTooLarge,
        };
        assert_eq!(
            e.to_string(),
            "Produce to partition 0: the broker answered MESSAGE_TOO_LARGE (10)"
        );
    }

    #[test]
    fn settings_are_checked() {
        let ok = BenchConfig::new(Mode::Produce, "h:1", "t");
        assert!(ok.validate().is_ok());
        let mut c = ok.clone();
        c.records = Some(1);
        c.duration = Some(Duration::from_secs(1));
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.rate = Some(0.0);
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.max_in_flight = 0;
        assert!(c.validate().is_err());
        let mut c = ok;
        c.mode = Mode::E2e;
        c.consumers = 0;
        assert!(c.validate().is_err());
    }
}

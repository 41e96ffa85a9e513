//! `sluice bench`: the Kafka load generator (crate sluice-bench). It has its
//! own lean client rather than librdkafka, so the load generator stays far
//! from being the bottleneck; it still speaks only standard Kafka APIs.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use sluice_bench::{Acks, BenchConfig, Delivery, Mode};

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchMode {
    /// Acknowledged write throughput; latency from each record's (intended)
    /// send time to its batch's acknowledgement.
    Produce,
    /// Read the topic from the beginning to its current end; latency per fetch.
    Consume,
    /// Produce and consume at once; latency from intended send time to consumption.
    E2e,
    /// A Nexmark query on the event-processing engine, in this process
    /// (no broker): events per second per core, or the result rows.
    Nexmark,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcksArg {
    #[value(name = "all", alias = "-1")]
    All,
    #[value(name = "1")]
    One,
    #[value(name = "0")]
    Zero,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionArg {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

/// Options of `sluice bench`.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum)]
    pub mode: BenchMode,
    /// Kafka bootstrap server(s), comma separated.
    #[arg(
        long,
        env = "SLUICE_BOOTSTRAP",
        default_value = "127.0.0.1:9092",
        value_name = "HOST:PORT"
    )]
    pub bootstrap: String,
    /// Topic; produce and e2e create it when missing.
    #[arg(long, default_value = "sluice-bench")]
    pub topic: String,
    /// Partitions of the topic when it is created (default 1).
    #[arg(long)]
    pub partitions: Option<u32>,
    /// Value bytes per record (at least 8: the send time is embedded).
    #[arg(long, default_value_t = 100)]
    pub record_size: usize,
    /// Records to send (default 1,000,000), or at most to read in consume mode.
    #[arg(long, conflicts_with = "duration")]
    pub records: Option<u64>,
    /// Run for this many seconds instead of a record count.
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// Producers, each with its own connection per partition leader.
    #[arg(long, default_value_t = 1)]
    pub producers: usize,
    /// Consumers; partition p is read by consumer p % consumers.
    #[arg(long, default_value_t = 1)]
    pub consumers: usize,
    /// Acknowledgement level of produce requests.
    #[arg(long, value_enum, default_value = "all")]
    pub acks: AcksArg,
    /// Compression codec of record batches.
    #[arg(long, value_enum, default_value = "none")]
    pub compression: CompressionArg,
    /// Target size of one record batch in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub batch_bytes: usize,
    /// How long a batch that is not full may wait for more records.
    #[arg(long, default_value_t = 0.0)]
    pub linger_ms: f64,
    /// Produce requests outstanding per connection.
    #[arg(long, default_value_t = 5)]
    pub max_in_flight: usize,
    /// Bytes per partition that one fetch may return (consume, e2e).
    #[arg(long, default_value_t = 16 << 20)]
    pub fetch_bytes: usize,
    /// Open-loop target rate, records per second over all producers;
    /// latency counts from each record's intended send time.
    #[arg(long, value_name = "RECORDS_PER_SEC")]
    pub rate: Option<f64>,
    /// Produce as an idempotent producer (a producer id and a sequence per
    /// batch, as `enable.idempotence=true`).
    #[arg(long, conflicts_with = "transactional")]
    pub idempotent: bool,
    /// Produce in transactions (`transactional.id` set), each committed
    /// after --commit-interval-ms or --commit-records, whichever is first.
    #[arg(long)]
    pub transactional: bool,
    /// How long a transaction stays open before it is committed.
    #[arg(long, default_value_t = 100.0, requires = "transactional")]
    pub commit_interval_ms: f64,
    /// Records after which a transaction is committed.
    #[arg(long, requires = "transactional")]
    pub commit_records: Option<u64>,
    /// Give records keys, N distinct ones in turn (8 bytes each), as a
    /// table or changelog topic gets; default: no key.
    #[arg(long, value_name = "N")]
    pub keys: Option<u64>,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Nexmark: the query (q0, q1, q2, q3, q4, q5, q7, q8).
    #[arg(long, default_value = "q0")]
    pub query: String,
    /// Nexmark: events to generate (the generator's default configuration).
    #[arg(long, default_value_t = 10_000_000)]
    pub events: u64,
    /// Nexmark: event time of the first event, ms since the epoch
    /// (default: now).
    #[arg(long, value_name = "MS")]
    pub base_time: Option<u64>,
    /// Nexmark: subtasks per stage (default: the machine's cores).
    #[arg(long)]
    pub parallelism: Option<usize>,
    /// Nexmark: write the result rows to FILE as JSON lines.
    #[arg(long, value_name = "FILE")]
    pub output: Option<std::path::PathBuf>,
}

impl BenchArgs {
    fn config(&self) -> Result<BenchConfig> {
        let mode = match self.mode {
            BenchMode::Produce => Mode::Produce,
            BenchMode::Consume => Mode::Consume,
            BenchMode::E2e => Mode::E2e,
            BenchMode::Nexmark => anyhow::bail!("nexmark runs no Kafka load"),
        };
        let mut cfg = BenchConfig::new(mode, &self.bootstrap, &self.topic);
        cfg.partitions = self.partitions;
        cfg.record_size = self.record_size;
        cfg.records = self.records;
        cfg.duration = match self.duration {
            Some(s) => Some(
                Duration::try_from_secs_f64(s)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .context("--duration must be a positive number of seconds")?,
            ),
            None => None,
        };
        cfg.producers = self.producers;
        cfg.consumers = self.consumers;
        cfg.acks = match self.acks {
            AcksArg::All => Acks::All,
            AcksArg::One => Acks::Leader,
            AcksArg::Zero => Acks::None,
        };
        use kafka_protocol::records::Compression;
        cfg.compression = match self.compression {
            CompressionArg::None => Compression::None,
            CompressionArg::Gzip => Compression::Gzip,
            CompressionArg::Snappy => Compression::Snappy,
            CompressionArg::Lz4 => Compression::Lz4,
            CompressionArg::Zstd => Compression::Zstd,
        };
        cfg.batch_bytes = self.batch_bytes;
        cfg.linger = Duration::try_from_secs_f64(self.linger_ms / 1e3)
            .context("--linger-ms must be a non-negative number")?;
        cfg.max_in_flight = self.max_in_flight;
        cfg.fetch_bytes = self.fetch_bytes;
        cfg.rate = self.rate;
        cfg.keys = self.keys;
        cfg.delivery = if self.transactional {
            Delivery::Transactional {
                commit_interval: Duration::try_from_secs_f64(self.commit_interval_ms / 1e3)
                    .context("--commit-interval-ms must be a positive number")?,
                commit_records: self.commit_records,
            }
        } else if self.idempotent {
            Delivery::Idempotent
        } else {
            Delivery::Plain
        };
        cfg.progress = std::io::stderr().is_terminal();
        Ok(cfg)
    }
}

pub async fn run(args: BenchArgs) -> Result<()> {
    if args.mode == BenchMode::Nexmark {
        return nexmark(args).await;
    }
    let cfg = args.config()?;
    let report = sluice_bench::run(cfg)
        .await
        .with_context(|| format!("bench {} against {}", args.mode_name(), args.bootstrap))?;
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

async fn nexmark(args: BenchArgs) -> Result<()> {
    use sluice_bench::nexmark::{self, NexmarkRun, Query};
    let query = Query::parse(&args.query)
        .with_context(|| format!("unknown Nexmark query '{}' (q0-q5, q7, q8)", args.query))?;
    let base_time = args.base_time.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    });
    let spec = NexmarkRun {
        query,
        events: args.events,
        config: nexmark::config(base_time),
        parallelism: args
            .parallelism
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        output: args.output.clone(),
    };
    let (report, _) = tokio::task::spawn_blocking(move || nexmark::run(&spec))
        .await
        .context("the Nexmark run stopped")?
        .with_context(|| format!("Nexmark {}", query.name()))?;
    if args.json {
        println!("{}", report.to_json());
    } else {
        println!(
            "nexmark {}: {} events in {:.2} s ({:.2} CPU s): {:.0} events/s/core, {} result rows",
            query.name(),
            report.events,
            report.seconds,
            report.cpu_seconds,
            report.events_per_sec_per_core(),
            report.rows
        );
    }
    Ok(())
}

impl BenchArgs {
    fn mode_name(&self) -> &'static str {
        match self.mode {
            BenchMode::Produce => "produce",
            BenchMode::Consume => "consume",
            BenchMode::E2e => "e2e",
            BenchMode::Nexmark => "nexmark",
        }
    }
}

//! `sluice-bench-peers`: the peer side of Sluice's comparison suite (bench/run.sh).
//! Each load-generating subcommand prints ONE JSON object on stdout with the
//! schema of `sluice bench --json`; `annotate`, `report` and `charts` turn the
//! collected objects into the suite's results.

mod amqp;
mod amqp_wire;
mod charts;
mod disk;
mod iperf;
mod nats;
mod report;
mod stats;
mod window;

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Publish with confirms/acks; latency = send to acknowledgement.
    Publish,
    /// Fill the queue (not timed), then drain it with acks.
    Consume,
    /// Publish and consume at once; latency = intended send time to consumption.
    E2e,
}

impl Mode {
    fn label(self, rate: Option<f64>) -> String {
        match (self, rate) {
            (Mode::Publish, None) => "publish".into(),
            (Mode::Publish, Some(r)) => format!("publish at {r:.0}/s"),
            (Mode::Consume, _) => "consume".into(),
            (Mode::E2e, None) => "e2e closed loop".into(),
            (Mode::E2e, Some(r)) => format!("e2e at {r:.0}/s"),
        }
    }
}

/// Options shared by the messaging load generators.
#[derive(Debug, Clone, clap::Args)]
pub struct PeerArgs {
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// Payload bytes per message (>= 8: e2e carries a timestamp).
    #[arg(long, default_value_t = 100)]
    pub record_size: usize,
    #[arg(long, default_value_t = 100_000)]
    pub records: u64,
    /// Open-loop target rate (messages/s); latency is measured from each
    /// message's intended send time. Omit for closed loop (as fast as the window allows).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Publishes awaiting their confirm/ack at most.
    #[arg(long, default_value_t = 1000)]
    pub window: usize,
    /// Fail when no message arrives for this many seconds.
    #[arg(long, default_value_t = 60)]
    pub idle_timeout_s: u64,
    /// Scenario label (default: derived from the options).
    #[arg(long)]
    pub scenario: Option<String>,
}

impl PeerArgs {
    fn validate(&self) -> Result<()> {
        if self.record_size < 8 {
            bail!("--record-size must be at least 8 (the payload carries a timestamp)");
        }
        if self.records == 0 || self.window == 0 {
            bail!("--records and --window must be positive");
        }
        if let Some(r) = self.rate {
            if !(r.is_finite() && r > 0.0) {
                bail!("--rate must be a positive number");
            }
        }
        Ok(())
    }

    fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_s.max(1))
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "sluice-bench-peers",
    about = "Peers and report tools of Sluice's comparison suite"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// RabbitMQ over AMQP 0-9-1 (durable queue, persistent messages, confirms).
    Amqp(amqp::AmqpArgs),
    /// NATS JetStream (file storage, async publish, pull consumer).
    Nats(nats::NatsArgs),
    /// The disk's limits (sequential write bandwidth, fdatasync latency).
    #[command(subcommand)]
    Disk(disk::DiskCmd),
    /// Loopback TCP bandwidth with iperf3.
    Iperf(iperf::IperfArgs),
    /// Read a command's stdout on stdin, take its JSON object, apply labels,
    /// print it as one line.
    Annotate {
        /// key=value (value parsed as JSON when it is JSON, else a string).
        #[arg(long = "set")]
        sets: Vec<String>,
    },
    /// Collect JSON lines into the suite's JSON file and Markdown table.
    Report {
        /// JSON lines, one result object per line.
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        date: String,
        /// key=value run metadata shown above the table.
        #[arg(long = "meta")]
        meta: Vec<String>,
        /// Markdown appended under "Notes".
        #[arg(long)]
        notes: Option<PathBuf>,
        #[arg(long)]
        out_json: PathBuf,
        #[arg(long)]
        out_md: PathBuf,
    },
    /// SVG charts from the suite's JSON file.
    Charts {
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        throughput: PathBuf,
        #[arg(long)]
        latency: PathBuf,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Amqp(a) => runtime()?.block_on(amqp::run(a))?.print(),
        Cmd::Nats(a) => runtime()?.block_on(nats::run(a))?.print(),
        Cmd::Disk(d) => disk::run(d)?.print(),
        Cmd::Iperf(a) => iperf::run(a)?.print(),
        Cmd::Annotate { sets } => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading stdin")?;
            let mut obj = report::last_object(&text)?;
            report::annotate(&mut obj, &sets)?;
            println!("{}", serde_json::to_string(&obj)?);
            Ok(())
        }
        Cmd::Report {
            input,
            date,
            meta,
            notes,
            out_json,
            out_md,
        } => {
            let text = std::fs::read_to_string(&input)
                .with_context(|| format!("reading {}", input.display()))?;
            let results = report::parse_lines(&text)?;
            let mut meta_obj = serde_json::Value::Object(Default::default());
            report::annotate(&mut meta_obj, &meta)?;
            let suite = report::Suite {
                date,
                meta: meta_obj.as_object().cloned().unwrap_or_default(),
                results,
            };
            let notes = match notes {
                Some(p) => std::fs::read_to_string(&p)
                    .with_context(|| format!("reading {}", p.display()))?,
                None => String::new(),
            };
            std::fs::write(&out_json, serde_json::to_string_pretty(&suite)? + "\n")
                .with_context(|| format!("writing {}", out_json.display()))?;
            std::fs::write(&out_md, report::markdown(&suite, &notes))
                .with_context(|| format!("writing {}", out_md.display()))?;
            Ok(())
        }
        Cmd::Charts {
            input,
            throughput,
            latency,
        } => {
            let suite = report::load_suite(&input)?;
            charts::throughput_svg(&suite, &throughput)?;
            charts::latency_svg(&suite, &latency)?;
            Ok(())
        }
    }
}

/// Two worker threads: the machine has two cores, and the broker under test
/// needs them too; the client's own CPU use is reported.
fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

//! NATS JetStream load generator (async-nats): a file-storage stream, async
//! publish with a bounded window of acks in flight, and a pull consumer with
//! explicit acks.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use async_nats::jetstream::{self, consumer::pull, context::PublishAckFuture, stream};
use bytes::Bytes;
use futures::StreamExt;

use crate::stats::{self, BenchResult, LatencyRecorder, Pacer, RunClock};
use crate::window::Window;
use crate::{Mode, PeerArgs};

#[derive(Debug, clap::Args)]
pub struct NatsArgs {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:4222")]
    pub server: String,
    /// Stream name (deleted and created afresh); its subject is `<stream>.data`.
    #[arg(long, default_value = "SLUICEBENCH")]
    pub stream: String,
    /// Whether the server was started with `sync_interval: always` (an fsync
    /// before each ack). This only labels the result; the server decides.
    #[arg(long)]
    pub sync_always: bool,
    /// Messages per pull request.
    #[arg(long, default_value_t = 1000)]
    pub pull_batch: usize,
    #[command(flatten)]
    pub common: PeerArgs,
}

pub async fn run(args: NatsArgs) -> Result<BenchResult> {
    let c = &args.common;
    c.validate()?;
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(10))
        .connect(args.server.as_str())
        .await
        .with_context(|| format!("connecting to {}", args.server))?;
    let mut js = jetstream::new(client.clone());
    // The client's 5 s ack timeout counts from publish; with a full window on
    // a server that fsyncs each message, acks legitimately take longer.
    js.set_timeout(Duration::from_secs(60));
    let subject = format!("{}.data", args.stream);
    // Missing stream is the normal case; any other failure shows up at create.
    let _ = js.delete_stream(&args.stream).await;
    let st = js
        .create_stream(stream::Config {
            name: args.stream.clone(),
            subjects: vec![subject.clone()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .context("creating the stream")?;
    let fsync = if args.sync_always {
        "sync always"
    } else {
        "default lazy fsync"
    };
    let scenario = c.scenario.clone().unwrap_or_else(|| {
        format!(
            "file stream, {fsync}, {} B, {}",
            c.record_size,
            c.mode.label(c.rate)
        )
    });
    let durable = args.sync_always;

    let result = match c.mode {
        Mode::Publish => {
            let clock = RunClock::start();
            let lat = publish(&js, &subject, c, clock.start, Pacer::new(c.rate)).await?;
            BenchResult::new(
                "nats-jetstream",
                &scenario,
                "publish",
                c.record_size as u64,
                c.records,
                clock.start.elapsed(),
                lat.summary(),
                clock.cpu_seconds(),
                durable,
            )
        }
        Mode::Consume => {
            publish(&js, &subject, c, Instant::now(), Pacer::new(None)).await?;
            let consumer = create_consumer(&st).await?;
            let clock = RunClock::start();
            let lat = consume(consumer, &args, clock.start, false).await?;
            BenchResult::new(
                "nats-jetstream",
                &scenario,
                "consume",
                c.record_size as u64,
                c.records,
                clock.start.elapsed(),
                lat.summary(),
                clock.cpu_seconds(),
                durable,
            )
        }
        Mode::E2e => {
            let consumer = create_consumer(&st).await?;
            let clock = RunClock::start();
            let start = clock.start;
            let cons_args = NatsArgs {
                server: args.server.clone(),
                stream: args.stream.clone(),
                sync_always: args.sync_always,
                pull_batch: args.pull_batch,
                common: c.clone(),
            };
            let cons =
                tokio::spawn(async move { consume(consumer, &cons_args, start, true).await });
            let ack_lat = publish(&js, &subject, c, start, Pacer::new(c.rate)).await?;
            let lat = cons.await.context("consumer task")??;
            let mut r = BenchResult::new(
                "nats-jetstream",
                &scenario,
                "e2e",
                c.record_size as u64,
                c.records,
                clock.start.elapsed(),
                lat.summary(),
                clock.cpu_seconds(),
                durable,
            );
            if let Some(s) = ack_lat.summary() {
                r = r.with("confirm_latency_ms", serde_json::to_value(s)?);
            }
            r
        }
    };
    js.delete_stream(&args.stream)
        .await
        .context("deleting the stream after the run")?;
    client.flush().await.ok();
    Ok(result
        .with("storage", "file")
        .with(
            "sync_interval",
            if args.sync_always {
                "always"
            } else {
                "default"
            },
        )
        .with("window", c.window as u64)
        .with(
            "rate_target",
            c.rate
                .map_or(serde_json::Value::Null, serde_json::Value::from),
        ))
}

async fn create_consumer(st: &stream::Stream) -> Result<PullConsumer> {
    let consumer = st
        .create_consumer(pull::Config {
            durable_name: Some("sluice-bench".to_owned()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: 100_000,
            ..Default::default()
        })
        .await
        .context("creating the pull consumer")?;
    Ok(consumer)
}

async fn publish(
    js: &jetstream::Context,
    subject: &str,
    c: &PeerArgs,
    start: Instant,
    pacer: Pacer,
) -> Result<LatencyRecorder> {
    let window = Window::new(c.window, start, |ack: PublishAckFuture| async move {
        let ack = ack.await.context("jetstream publish ack")?;
        if ack.duplicate {
            bail!("server reported a duplicate publish");
        }
        Ok(())
    });
    match send_all(js, subject, c, start, pacer, &window).await {
        Ok(()) => window.finish().await,
        Err(e) => Err(window.fail(e).await),
    }
}

async fn send_all(
    js: &jetstream::Context,
    subject: &str,
    c: &PeerArgs,
    start: Instant,
    pacer: Pacer,
    window: &Window<PublishAckFuture>,
) -> Result<()> {
    let mut body = stats::payload(c.record_size);
    for i in 0..c.records {
        let permit = window.reserve().await?;
        let due = pacer.wait_for(start, i).await;
        stats::stamp(&mut body, due);
        let ack = js
            .publish(subject.to_owned(), Bytes::copy_from_slice(&body))
            .await
            .context("jetstream publish")?;
        window.push(due, ack, permit)?;
    }
    Ok(())
}

/// The pull consumer's handle type (a durable consumer on the stream).
type PullConsumer = jetstream::consumer::Consumer<pull::Config>;

async fn consume(
    consumer: PullConsumer,
    args: &NatsArgs,
    start: Instant,
    e2e: bool,
) -> Result<LatencyRecorder> {
    let c = &args.common;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(args.pull_batch)
        .messages()
        .await
        .context("pull subscription")?;
    let mut lat = LatencyRecorder::new();
    let mut got = 0u64;
    while got < c.records {
        let msg = tokio::time::timeout(c.idle_timeout(), messages.next())
            .await
            .with_context(|| format!("no message for {:?} after {got} records", c.idle_timeout()))?
            .context("pull stream ended")?
            .map_err(|e| anyhow::anyhow!("pull: {e}"))?;
        got += 1;
        if e2e {
            let due = stats::read_stamp(&msg.payload).context("message shorter than 8 bytes")?;
            lat.record_ns(stats::nanos_since(start).saturating_sub(due));
        }
        msg.ack().await.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
    }
    Ok(lat)
}

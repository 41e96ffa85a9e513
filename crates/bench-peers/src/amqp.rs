//! RabbitMQ load generator (AMQP 0-9-1 via lapin): durable queue, persistent
//! messages, publisher confirms with a bounded window in flight, and a
//! consumer with manual acks and a prefetch limit.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::PublisherConfirm;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use crate::stats::{self, BenchResult, LatencyRecorder, Pacer, RunClock};
use crate::window::Window;
use crate::{Mode, PeerArgs};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QueueType {
    Classic,
    Quorum,
    /// Read from the first message (`x-stream-offset: first`); acks return credit.
    Stream,
}

impl QueueType {
    fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
            QueueType::Stream => "stream",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct AmqpArgs {
    /// AMQP URI of the broker.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub url: String,
    /// Queue name (deleted and declared afresh).
    #[arg(long, default_value = "sluice-bench")]
    pub queue: String,
    #[arg(long, value_enum, default_value_t = QueueType::Classic)]
    pub queue_type: QueueType,
    /// Consumer prefetch (basic.qos).
    #[arg(long, default_value_t = 1000)]
    pub prefetch: u16,
    /// Ack every N deliveries (multiple=true when N > 1); 1 acks each message.
    #[arg(long, default_value_t = 1)]
    pub ack_every: u64,
    #[command(flatten)]
    pub common: PeerArgs,
}

pub async fn run(args: AmqpArgs) -> Result<BenchResult> {
    let c = &args.common;
    c.validate()?;
    let conn = Connection::connect(&args.url, ConnectionProperties::default())
        .await
        .with_context(|| format!("connecting to {}", args.url))?;
    let setup = conn.create_channel().await?;
    // A fresh queue per run, so earlier runs' backlog cannot leak into this one.
    setup
        .queue_delete(args.queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .context("deleting the old queue")?;
    let mut qargs = FieldTable::default();
    qargs.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from(args.queue_type.as_str())),
    );
    setup
        .queue_declare(
            args.queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            qargs,
        )
        .await
        .context("declaring the queue")?;

    let scenario = c.scenario.clone().unwrap_or_else(|| {
        format!(
            "{} queue, {} B, {}",
            args.queue_type.as_str(),
            c.record_size,
            c.mode.label(c.rate)
        )
    });
    let publisher = conn.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;

    let result = match c.mode {
        Mode::Publish => {
            let clock = RunClock::start();
            let lat = publish(&publisher, &args, clock.start, Pacer::new(c.rate)).await?;
            let elapsed = clock.start.elapsed();
            BenchResult::new(
                "rabbitmq",
                &scenario,
                "publish",
                c.record_size as u64,
                c.records,
                elapsed,
                lat.summary(),
                clock.cpu_seconds(),
                true,
            )
        }
        Mode::Consume => {
            // Fill the queue first (not measured), then drain it.
            let fill_start = Instant::now();
            publish(&publisher, &args, fill_start, Pacer::new(None)).await?;
            let consumer = conn.create_channel().await?;
            let clock = RunClock::start();
            let lat = consume(&consumer, &args, clock.start, false).await?;
            let elapsed = clock.start.elapsed();
            BenchResult::new(
                "rabbitmq",
                &scenario,
                "consume",
                c.record_size as u64,
                c.records,
                elapsed,
                lat.summary(),
                clock.cpu_seconds(),
                true,
            )
        }
        Mode::E2e => {
            let consumer = conn.create_channel().await?;
            let clock = RunClock::start();
            let start = clock.start;
            let cons_args = AmqpArgs {
                url: args.url.clone(),
                queue: args.queue.clone(),
                queue_type: args.queue_type,
                prefetch: args.prefetch,
                ack_every: args.ack_every,
                common: c.clone(),
            };
            let cons =
                tokio::spawn(async move { consume(&consumer, &cons_args, start, true).await });
            let confirm_lat = publish(&publisher, &args, start, Pacer::new(c.rate)).await?;
            let lat = cons.await.context("consumer task")??;
            let elapsed = clock.start.elapsed();
            let mut r = BenchResult::new(
                "rabbitmq",
                &scenario,
                "e2e",
                c.record_size as u64,
                c.records,
                elapsed,
                lat.summary(),
                clock.cpu_seconds(),
                true,
            );
            if let Some(s) = confirm_lat.summary() {
                r = r.with("confirm_latency_ms", serde_json::to_value(s)?);
            }
            r
        }
    };
    // The measurement is complete; a failed clean-up only leaves a queue the
    // next run deletes first, so it warns instead of discarding the result.
    if let Err(e) = setup
        .queue_delete(args.queue.as_str().into(), QueueDeleteOptions::default())
        .await
    {
        eprintln!("warning: deleting queue {} after the run: {e}", args.queue);
    }
    conn.close(200, "bench done".into()).await.ok();
    Ok(result
        .with("queue_type", args.queue_type.as_str())
        .with("window", c.window as u64)
        .with("prefetch", u64::from(args.prefetch))
        .with(
            "rate_target",
            c.rate
                .map_or(serde_json::Value::Null, serde_json::Value::from),
        ))
}

/// Publishes `records` persistent messages with at most `window` confirms
/// outstanding. Returns the send→confirm latency (from intended send time).
async fn publish(
    ch: &Channel,
    args: &AmqpArgs,
    start: Instant,
    pacer: Pacer,
) -> Result<LatencyRecorder> {
    let window = Window::new(
        args.common.window,
        start,
        |confirm: PublisherConfirm| async move {
            let confirmation = tokio::time::timeout(Duration::from_secs(60), confirm)
                .await
                .context("no publisher confirm within 60 s")?
                .context("publisher confirm")?;
            if !confirmation.is_ack() {
                bail!("broker refused a message (nack)");
            }
            Ok(())
        },
    );
    match send_all(ch, args, start, pacer, &window).await {
        Ok(()) => window.finish().await,
        Err(e) => Err(window.fail(e).await),
    }
}

async fn send_all(
    ch: &Channel,
    args: &AmqpArgs,
    start: Instant,
    pacer: Pacer,
    window: &Window<PublisherConfirm>,
) -> Result<()> {
    let mut body = stats::payload(args.common.record_size);
    let props = BasicProperties::default().with_delivery_mode(2);
    let routing_key: lapin::types::ShortString = args.queue.as_str().into();
    for i in 0..args.common.records {
        let permit = window.reserve().await?;
        let due = pacer.wait_for(start, i).await;
        stats::stamp(&mut body, due);
        let confirm = ch
            .basic_publish(
                "".into(),
                routing_key.clone(),
                BasicPublishOptions::default(),
                &body,
                props.clone(),
            )
            .await
            .context("basic.publish")?;
        window.push(due, confirm, permit)?;
    }
    Ok(())
}

/// Consumes `records` deliveries with manual acks. With `e2e`, records the
/// latency from each message's intended send time; a drain of a pre-filled
/// queue has no meaningful per-message latency and records none.
async fn consume(
    ch: &Channel,
    args: &AmqpArgs,
    start: Instant,
    e2e: bool,
) -> Result<LatencyRecorder> {
    let c = &args.common;
    ch.basic_qos(args.prefetch, BasicQosOptions::default())
        .await?;
    let mut consume_args = FieldTable::default();
    if args.queue_type == QueueType::Stream {
        consume_args.insert(
            "x-stream-offset".into(),
            AMQPValue::LongString(LongString::from("first")),
        );
    }
    let mut consumer = ch
        .basic_consume(
            args.queue.as_str().into(),
            "sluice-bench".into(),
            BasicConsumeOptions::default(),
            consume_args,
        )
        .await
        .context("basic.consume")?;
    let mut lat = LatencyRecorder::new();
    let mut got = 0u64;
    let ack_every = args.ack_every.max(1);
    while got < c.records {
        let delivery = tokio::time::timeout(c.idle_timeout(), consumer.next())
            .await
            .with_context(|| format!("no delivery for {:?} after {got} records", c.idle_timeout()))?
            .context("consumer closed")?
            .context("delivery")?;
        got += 1;
        if e2e {
            let due = stats::read_stamp(&delivery.data).context("message shorter than 8 bytes")?;
            lat.record_ns(stats::nanos_since(start).saturating_sub(due));
        }
        if got % ack_every == 0 || got == c.records {
            delivery
                .ack(BasicAckOptions {
                    multiple: ack_every > 1,
                })
                .await
                .context("basic.ack")?;
        }
    }
    // Close the channel (cancelling the consumer) before the queue is
    // deleted: deleting a quorum queue under a live consumer makes the broker
    // send a cancel that lapin rejects as an unexpected frame.
    ch.close(200, "consumer done".into())
        .await
        .context("closing the consumer channel")?;
    Ok(lat)
}

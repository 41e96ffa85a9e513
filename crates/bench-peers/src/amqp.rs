//! AMQP 0-9-1 load generator: durable queue, persistent messages, publisher
//! confirms with a bounded window in flight, and a consumer with manual acks
//! and a prefetch limit. It drives RabbitMQ and Sluice alike through the
//! pipelined client in `amqp_wire`.

use std::time::Instant;

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{basic, channel, connection, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use anyhow::{bail, Context, Result};

use crate::amqp_wire::{put, Outstanding, PublishTemplate, Wire, CHANNEL};
use crate::stats::{self, BenchResult, LatencyRecorder, Pacer, RunClock};
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
    let mut setup = Wire::connect(&args.url).await?;
    // A fresh queue per run, so earlier runs' backlog cannot leak into this one.
    setup
        .queue_delete(&args.queue)
        .await
        .context("deleting the old queue")?;
    setup
        .queue_declare(&args.queue, args.queue_type.as_str())
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
    let row = |op: &str, elapsed, lat: &LatencyRecorder, clock: &RunClock| {
        BenchResult::new(
            "rabbitmq",
            &scenario,
            op,
            c.record_size as u64,
            c.records,
            elapsed,
            lat.summary(),
            clock.cpu_seconds(),
            true,
        )
    };

    let result = match c.mode {
        Mode::Publish => {
            let clock = RunClock::start();
            let lat = publish(&args, clock.start, Pacer::new(c.rate)).await?;
            row("publish", clock.start.elapsed(), &lat, &clock)
        }
        Mode::Consume => {
            // Fill the queue first (not measured), then drain it.
            publish(&args, Instant::now(), Pacer::new(None)).await?;
            let clock = RunClock::start();
            let lat = consume(&args, clock.start, false).await?;
            row("consume", clock.start.elapsed(), &lat, &clock)
        }
        Mode::E2e => {
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
            let cons = tokio::spawn(async move { consume(&cons_args, start, true).await });
            let confirm_lat = publish(&args, start, Pacer::new(c.rate)).await?;
            let lat = cons.await.context("consumer task")??;
            let mut r = row("e2e", clock.start.elapsed(), &lat, &clock);
            if let Some(s) = confirm_lat.summary() {
                r = r.with("confirm_latency_ms", serde_json::to_value(s)?);
            }
            r
        }
    };
    // The measurement is complete; a failed clean-up only leaves a queue the
    // next run deletes first, so it warns instead of discarding the result.
    if let Err(e) = setup.queue_delete(&args.queue).await {
        eprintln!("warning: deleting queue {} after the run: {e}", args.queue);
    }
    setup.close().await.ok();
    Ok(result
        .with("queue_type", args.queue_type.as_str())
        .with("window", c.window as u64)
        .with("prefetch", u64::from(args.prefetch))
        .with("client", "pipelined amq-protocol")
        .with(
            "rate_target",
            c.rate
                .map_or(serde_json::Value::Null, serde_json::Value::from),
        ))
}

/// Bytes of publishes written to the socket at once.
const WRITE_CHUNK: usize = 64 * 1024;

/// Publishes `records` persistent messages on its own connection with at most
/// `window` confirms outstanding. Returns the send→confirm latency (from
/// intended send time).
async fn publish(args: &AmqpArgs, start: Instant, pacer: Pacer) -> Result<LatencyRecorder> {
    use tokio::io::AsyncWriteExt;
    let c = &args.common;
    let mut wire = Wire::connect(&args.url).await?;
    wire.confirm_select().await?;
    let template =
        PublishTemplate::new(&args.queue, &stats::payload(c.record_size), wire.frame_max)?;
    let Wire {
        mut reader,
        mut writer,
        ..
    } = wire;
    let mut outstanding = Outstanding::new();
    let mut lat = LatencyRecorder::new();
    let mut sent = 0u64;
    let mut buf = Vec::with_capacity(WRITE_CHUNK * 2);
    loop {
        buf.clear();
        let mut next_due = None;
        while sent < c.records && outstanding.len() < c.window && buf.len() < WRITE_CHUNK {
            let now = stats::nanos_since(start);
            let due = match pacer.due_ns(sent) {
                Some(d) if d > now => {
                    next_due = Some(d);
                    break;
                }
                Some(d) => d,
                None => now,
            };
            template.put(&mut buf, due);
            outstanding.push(due);
            sent += 1;
        }
        if !buf.is_empty() {
            writer.write_all(&buf).await.context("basic.publish")?;
            continue;
        }
        if sent == c.records && outstanding.len() == 0 {
            break;
        }
        let waiting_for_time = next_due.filter(|_| outstanding.len() < c.window);
        tokio::select! {
            r = tokio::time::timeout(c.idle_timeout(), reader.fill()) => {
                r.with_context(|| format!("no publisher confirm for {:?}", c.idle_timeout()))??;
            }
            _ = sleep_until(start, waiting_for_time.unwrap_or(0)), if waiting_for_time.is_some() => continue,
        }
        let now = stats::nanos_since(start);
        while let Some(frame) = reader.buffered()? {
            match frame {
                AMQPFrame::Method(_, AMQPClass::Basic(basic::AMQPMethod::Ack(a))) => outstanding
                    .settle(a.delivery_tag, a.multiple, |due| {
                        lat.record_ns(now.saturating_sub(due))
                    })?,
                AMQPFrame::Method(_, AMQPClass::Basic(basic::AMQPMethod::Nack(n))) => {
                    bail!("broker refused message {} (nack)", n.delivery_tag)
                }
                other => unexpected(other)?,
            }
        }
    }
    Wire {
        reader,
        writer,
        frame_max: 0,
    }
    .close()
    .await?;
    Ok(lat)
}

async fn sleep_until(start: Instant, due_ns: u64) {
    let target = start + std::time::Duration::from_nanos(due_ns);
    tokio::time::sleep_until(target.into()).await;
}

/// A frame neither loop expects: a close is the broker's error, heartbeats
/// are ignored, anything else is a protocol surprise.
fn unexpected(frame: AMQPFrame) -> Result<()> {
    match frame {
        AMQPFrame::Heartbeat => Ok(()),
        AMQPFrame::Method(_, AMQPClass::Connection(connection::AMQPMethod::Close(c))) => {
            bail!("connection closed: {} {}", c.reply_code, c.reply_text)
        }
        AMQPFrame::Method(_, AMQPClass::Channel(channel::AMQPMethod::Close(c))) => {
            bail!("channel closed: {} {}", c.reply_code, c.reply_text)
        }
        other => bail!("unexpected frame from the broker: {other:?}"),
    }
}

/// Consumes `records` deliveries with manual acks on its own connection. With
/// `e2e`, records the latency from each message's intended send time; a drain
/// of a pre-filled queue has no meaningful per-message latency and records none.
async fn consume(args: &AmqpArgs, start: Instant, e2e: bool) -> Result<LatencyRecorder> {
    use tokio::io::AsyncWriteExt;
    let c = &args.common;
    let mut wire = Wire::connect(&args.url).await?;
    wire.qos(args.prefetch).await?;
    let mut consume_args = FieldTable::default();
    if args.queue_type == QueueType::Stream {
        consume_args.insert(
            "x-stream-offset".into(),
            AMQPValue::LongString(LongString::from("first")),
        );
    }
    wire.consume(&args.queue, consume_args)
        .await
        .context("basic.consume")?;
    let mut lat = LatencyRecorder::new();
    let mut got = 0u64;
    let ack_every = args.ack_every.max(1);
    let mut tag = 0u64;
    // Body size and bytes still to come of the delivery in progress.
    let mut remaining = None::<(u64, u64)>;
    let mut acks = Vec::new();
    while got < c.records {
        tokio::time::timeout(c.idle_timeout(), wire.reader.fill())
            .await
            .with_context(|| {
                format!("no delivery for {:?} after {got} records", c.idle_timeout())
            })??;
        while let Some(frame) = wire.reader.buffered()? {
            let done = match frame {
                AMQPFrame::Method(_, AMQPClass::Basic(basic::AMQPMethod::Deliver(d))) => {
                    tag = d.delivery_tag;
                    false
                }
                AMQPFrame::Header(_, h) => {
                    remaining = Some((h.body_size, h.body_size));
                    h.body_size == 0
                }
                AMQPFrame::Body(_, b) => {
                    let Some(left) = remaining.as_mut() else {
                        bail!("content body without a delivery");
                    };
                    let (size, left) = (left.0, &mut left.1);
                    // The first body frame carries the stamp.
                    if e2e && *left == size {
                        if let Some(due) = stats::read_stamp(&b) {
                            lat.record_ns(stats::nanos_since(start).saturating_sub(due));
                        }
                    }
                    *left = left.saturating_sub(b.len() as u64);
                    *left == 0
                }
                AMQPFrame::Method(_, AMQPClass::Basic(basic::AMQPMethod::Cancel(_))) => {
                    bail!("the broker cancelled the consumer")
                }
                other => {
                    unexpected(other)?;
                    false
                }
            };
            if done {
                remaining = None;
                got += 1;
                if got % ack_every == 0 || got == c.records {
                    put(
                        &mut acks,
                        &AMQPFrame::Method(
                            CHANNEL,
                            AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                                delivery_tag: tag,
                                multiple: ack_every > 1,
                            })),
                        ),
                    )?;
                }
            }
        }
        if !acks.is_empty() {
            wire.writer.write_all(&acks).await.context("basic.ack")?;
            acks.clear();
        }
    }
    wire.close().await?;
    Ok(lat)
}

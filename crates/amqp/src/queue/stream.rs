//! A stream queue (`x-queue-type=stream`) on its leader: its topic's log read
//! without consuming. Each consumer has its own position, set by the
//! `x-stream-offset` consumer argument; acknowledgements only give prefetch
//! credit back, and messages leave only through the topic's retention
//! (`x-max-age`, `x-max-length-bytes`). Nothing is ever trimmed by delivery, so
//! the log start offset is the retention's alone.
//!
//! A stream attached to a Kafka topic (`x-stream-topic`) reads all its
//! partitions: a consumer keeps one position per partition, takes turns between
//! partitions that have messages, and each delivery also carries its partition
//! in `x-stream-partition` when there is more than one.
//!
//! Every partition is read from this node's replica of it, whichever node
//! leads it: below its high watermark a replica holds committed records only.
//! So a stream is served on the node leading its partition 0 (where consumers
//! are sent) even when other nodes lead its other partitions; a node with no
//! replica of some partition refuses consumers. The actor ends when the
//! topic's partitions or this node's replicas of them change (its consumers
//! are cancelled and consume again), not when a leadership moves.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use amq_protocol::types::{AMQPValue, FieldTable};
use futures::StreamExt;
use sluice_log::{Partition, ReadLimit};
use tokio::sync::mpsc;

use super::{
    handle_round, Command, ConsumerSpec, Event, Gauge, QueueLink, QueueStatus, StreamTopic,
    BLOCKED_RETRY,
};
use crate::error::AmqpError;
use crate::message::{decode_batches, now_ms, Stored};
use crate::model::{parse_age, value_int, value_text};

/// How much of the log one read brings into a consumer's buffer.
const READ_BYTES: usize = 64 * 1024;

/// Where a stream consumer starts (`x-stream-offset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub(crate) enum StreamStart {
    /// The first message still in the log.
    First,
    /// The last message written (RabbitMQ: the last chunk).
    Last,
    /// Messages written from now on (the default).
    #[default]
    Next,
    /// This offset, clamped to the log.
    Offset(i64),
    /// The first message stored at or after this time, ms since the epoch.
    Timestamp(i64),
}

impl StreamStart {
    /// The consumer argument as RabbitMQ reads it: `first`, `last`, `next`, an
    /// offset, an AMQP timestamp (seconds) or an interval back from now (`1h`).
    pub(crate) fn parse(arguments: &FieldTable) -> Result<StreamStart, AmqpError> {
        let Some(v) = arguments.inner().get("x-stream-offset") else {
            return Ok(StreamStart::Next);
        };
        if let AMQPValue::Timestamp(secs) = v {
            let ms = i64::try_from(*secs)
                .unwrap_or(i64::MAX)
                .saturating_mul(1000);
            return Ok(StreamStart::Timestamp(ms));
        }
        if let Some(offset) = value_int(v) {
            return Ok(StreamStart::Offset(offset.max(0)));
        }
        let text = value_text(v).unwrap_or_default();
        Ok(match text.as_str() {
            "first" => StreamStart::First,
            "last" => StreamStart::Last,
            "next" => StreamStart::Next,
            interval => {
                let back = parse_age(interval).ok_or_else(|| {
                    AmqpError::precondition(format!(
                        "invalid x-stream-offset '{interval}': first, last, next, an offset, a timestamp or an interval such as 1h"
                    ))
                })?;
                StreamStart::Timestamp(
                    now_ms().saturating_sub(i64::try_from(back).unwrap_or(i64::MAX)),
                )
            }
        })
    }
}

struct Reader {
    spec: ConsumerSpec,
    /// The next offset to read, per partition.
    next: Vec<i64>,
    /// Read, not delivered yet: (partition, message).
    buffered: VecDeque<(usize, Stored)>,
    /// The partition to read from first next time (turns between partitions).
    turn: usize,
    /// Its connection could take no more deliveries at the last attempt.
    blocked: bool,
}

struct StreamActor {
    link: QueueLink,
    topic: Arc<StreamTopic>,
    /// This node's replica of each partition, `None` where it holds none.
    partitions: Vec<Option<Arc<Partition>>>,
    readers: Vec<Reader>,
    gauge: Arc<Gauge>,
}

/// Starts the actor of a stream read on this node.
pub(super) fn start(
    link: QueueLink,
    rx: mpsc::UnboundedReceiver<Command>,
    topic: Arc<StreamTopic>,
    gauge: Arc<Gauge>,
) {
    let actor = StreamActor {
        link,
        partitions: topic.replicas(),
        topic,
        readers: Vec::new(),
        gauge,
    };
    tokio::spawn(actor.run(rx));
}

impl StreamActor {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        // New committed messages on any partition wake the actor.
        let mut written = futures::stream::select_all(self.partitions.iter().flatten().map(|p| {
            futures::stream::unfold(p.watch_high_watermark(), |mut hw| async move {
                hw.changed().await.ok().map(|()| ((), hw))
            })
            .boxed()
        }));
        let mut roles = self.topic.topology.watch_roles();
        loop {
            self.dispatch();
            let blocked = self.readers.iter().any(|r| r.blocked);
            tokio::select! {
                c = rx.recv() => match c {
                    Some(Command::Close) | None => break,
                    Some(c) => if handle_round(&mut rx, c, |c| self.handle(c)) { break },
                },
                Some(()) = written.next() => {}
                r = roles.changed() => {
                    if r.is_err() || !same_replicas(&self.partitions, &self.topic.replicas()) {
                        break;
                    }
                }
                _ = tokio::time::sleep(BLOCKED_RETRY), if blocked => {}
            }
        }
        for r in self.readers.drain(..) {
            let _ = r.spec.events.try_send(Event::Cancelled {
                channel: r.spec.channel,
                consumer_tag: r.spec.tag.clone(),
            });
        }
    }

    fn handle(&mut self, c: Command) {
        match c {
            Command::Consume { spec, reply } => {
                let r = self.admit(spec);
                let _ = reply.send(r);
            }
            Command::Cancel {
                connection,
                channel,
                tag,
            } => self.readers.retain(|r| {
                !(r.spec.connection == connection && r.spec.channel == channel && r.spec.tag == tag)
            }),
            Command::Detach {
                connection,
                channel,
            } => self.readers.retain(|r| {
                r.spec.connection != connection || channel.is_some_and(|ch| r.spec.channel != ch)
            }),
            Command::Settle { offsets, .. } => {
                // Credit went back with the settlement; the log keeps the message.
                self.gauge
                    .acked
                    .fetch_add(offsets.len() as u64, Ordering::Relaxed);
            }
            Command::Status { reply, .. } => {
                let stored: i64 = self
                    .partitions
                    .iter()
                    .flatten()
                    .map(|p| (p.high_watermark() - p.log_start_offset()).max(0))
                    .sum();
                let unacked: u32 = self
                    .readers
                    .iter()
                    .map(|r| r.spec.own.used.load(Ordering::Acquire))
                    .sum();
                let _ = reply.send(QueueStatus {
                    ready: u32::try_from(stored).unwrap_or(u32::MAX),
                    unacked,
                    consumers: u32::try_from(self.readers.len()).unwrap_or(u32::MAX),
                });
            }
            // QueueLink refuses these for a stream before they reach the actor.
            Command::Get { reply, .. } => {
                let _ = reply.send(None);
            }
            Command::Purge { reply } => {
                let _ = reply.send(0);
            }
            Command::Trimmed { .. } | Command::Close => {}
        }
    }

    /// Checks a new consumer as RabbitMQ does and places it in the log.
    fn admit(&mut self, spec: ConsumerSpec) -> Result<(), AmqpError> {
        let queue = format!("queue '{}' in vhost '{}'", self.link.name, self.link.vhost);
        if spec.no_ack {
            return Err(AmqpError::not_implemented(format!(
                "automatic acknowledgement not supported by stream queues {queue}"
            )));
        }
        // Without a per-consumer window a stream consumer would be sent the
        // whole log at once (a channel-wide window does not count).
        if spec.own.limit.load(Ordering::Acquire) == 0 {
            return Err(AmqpError::precondition(format!(
                "consumer prefetch count is not set for '{queue}'"
            )));
        }
        let mut next = Vec::with_capacity(self.partitions.len());
        for (i, p) in self.partitions.iter().enumerate() {
            let Some(p) = p else {
                return Err(AmqpError::unavailable(format!(
                    "{queue} cannot be read on node {}: it holds no replica of partition {i} of topic '{}'",
                    self.topic.topology.node_id(),
                    self.topic.topic
                )));
            };
            next.push(self.position(p, spec.start));
        }
        self.readers.push(Reader {
            spec,
            next,
            buffered: VecDeque::new(),
            turn: 0,
            blocked: false,
        });
        Ok(())
    }

    /// The offset `start` names in `partition`, clamped to its committed log.
    fn position(&self, partition: &Partition, start: StreamStart) -> i64 {
        let (first, end) = (partition.log_start_offset(), partition.high_watermark());
        let at = match start {
            StreamStart::First => first,
            StreamStart::Next => end,
            StreamStart::Last => end - 1,
            StreamStart::Offset(o) => o,
            StreamStart::Timestamp(ms) => match partition.offset_for_timestamp(ms) {
                Ok(Some((offset, _))) => offset,
                Ok(None) => end,
                Err(e) => {
                    tracing::warn!(queue = %self.link.name, "cannot look up a timestamp: {e}; starting at the end");
                    end
                }
            },
        };
        at.clamp(first, end.max(first))
    }

    /// Hands each consumer with credit the next messages from its positions.
    fn dispatch(&mut self) {
        let several = self.partitions.len() > 1;
        let mut i = 0;
        while i < self.readers.len() {
            let r = &mut self.readers[i];
            r.blocked = false;
            let mut gone = false;
            while r.spec.own.has_room() {
                if r.buffered.is_empty() && !fill(&self.partitions, r, &self.link.name) {
                    break;
                }
                let Some((partition, message)) = r.buffered.pop_front() else {
                    break;
                };
                let event = Event::Deliver {
                    channel: r.spec.channel,
                    consumer_tag: r.spec.tag.clone(),
                    queue: super::QueueHandle::Here(self.link.clone()),
                    message: Box::new(with_position_headers(message, several.then_some(partition))),
                    redelivered: false,
                    no_ack: false,
                };
                match r.spec.events.try_send(event) {
                    Ok(()) => {
                        self.gauge.delivered.fetch_add(1, Ordering::Relaxed);
                        r.spec.own.used.fetch_add(1, Ordering::AcqRel);
                        r.spec.shared.used.fetch_add(1, Ordering::AcqRel);
                    }
                    Err(mpsc::error::TrySendError::Full(Event::Deliver { message, .. })) => {
                        r.buffered.push_front((partition, *message));
                        r.blocked = true;
                        break;
                    }
                    Err(_) => {
                        gone = true;
                        break;
                    }
                }
            }
            if gone {
                self.readers.remove(i);
            } else {
                i += 1;
            }
        }
    }
}

/// Reads the next batches of the first partition, in turn, that has messages
/// past the reader's position; false when none has.
fn fill(partitions: &[Option<Arc<Partition>>], r: &mut Reader, queue: &str) -> bool {
    let n = partitions.len();
    for k in 0..n {
        let p = (r.turn + k) % n;
        // A consumer is admitted only where every partition has a replica.
        let Some(partition) = &partitions[p] else {
            continue;
        };
        // A read may hold only control batches: read on in this partition
        // until a message comes or its committed end.
        loop {
            // Retention may have dropped what this consumer had not read.
            let from = r.next[p].max(partition.log_start_offset());
            r.next[p] = from;
            if from >= partition.high_watermark() {
                break;
            }
            let read = partition
                .read(from, READ_BYTES, true, ReadLimit::HighWatermark)
                .map_err(|e| e.to_string())
                .and_then(|read| decode_batches(read.records, from));
            match read {
                Ok((messages, end)) if end > from => {
                    r.next[p] = end;
                    if !messages.is_empty() {
                        r.turn = p + 1;
                        r.buffered.extend(messages.into_iter().map(|m| (p, m)));
                        return true;
                    }
                }
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(
                        queue,
                        partition = p,
                        offset = from,
                        "cannot read stream: {e}"
                    );
                    break;
                }
            }
        }
    }
    false
}

/// Whether two lists of replicas are the same partitions' same replicas.
fn same_replicas(a: &[Option<Arc<Partition>>], b: &[Option<Arc<Partition>>]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(a, b)| match (a, b) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        })
}

/// The message with its offset in the `x-stream-offset` header, as RabbitMQ
/// delivers from a stream, and its partition in `x-stream-partition` when the
/// stream's topic has several.
fn with_position_headers(mut m: Stored, partition: Option<usize>) -> Stored {
    let mut headers = m.properties.headers().clone().unwrap_or_default();
    headers.insert("x-stream-offset".into(), AMQPValue::LongLongInt(m.offset));
    if let Some(p) = partition {
        headers.insert(
            "x-stream-partition".into(),
            AMQPValue::LongLongInt(i64::try_from(p).unwrap_or(i64::MAX)),
        );
    }
    m.properties = m.properties.with_headers(headers);
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::{LongString, ShortString};

    fn args(v: AMQPValue) -> FieldTable {
        let mut t = FieldTable::default();
        t.insert(ShortString::from("x-stream-offset"), v);
        t
    }

    #[test]
    fn offsets_parse_as_rabbitmq_reads_them() {
        let text = |s: &str| args(AMQPValue::LongString(LongString::from(s)));
        assert_eq!(
            StreamStart::parse(&FieldTable::default()).ok(),
            Some(StreamStart::Next)
        );
        assert_eq!(
            StreamStart::parse(&text("first")).ok(),
            Some(StreamStart::First)
        );
        assert_eq!(
            StreamStart::parse(&text("last")).ok(),
            Some(StreamStart::Last)
        );
        assert_eq!(
            StreamStart::parse(&text("next")).ok(),
            Some(StreamStart::Next)
        );
        assert_eq!(
            StreamStart::parse(&args(AMQPValue::LongLongInt(42))).ok(),
            Some(StreamStart::Offset(42))
        );
        assert_eq!(
            StreamStart::parse(&args(AMQPValue::ShortShortInt(-3))).ok(),
            Some(StreamStart::Offset(0))
        );
        assert_eq!(
            StreamStart::parse(&args(AMQPValue::Timestamp(1_686_519_750))).ok(),
            Some(StreamStart::Timestamp(1_686_519_750_000))
        );
        let before = now_ms();
        match StreamStart::parse(&text("1h")) {
            Ok(StreamStart::Timestamp(ms)) => {
                let back = before - ms;
                assert!((3_599_000..=3_601_000).contains(&back), "{back}");
            }
            other => panic!("1h parsed as {other:?}"),
        }
        assert!(StreamStart::parse(&text("bogus")).is_err());
        assert!(StreamStart::parse(&text("0h")).is_err());
    }
}

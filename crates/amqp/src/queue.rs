//! A queue on its leader: the log of its topic plus delivery state, owned by one
//! task (the queue's actor) that every channel talks to by message.
//!
//! Delivery state: messages below `head` are acknowledged (the log start offset is
//! moved there, so retention frees whole segments and a restart resumes there);
//! above it, an offset is *ready* (read ahead into `ready`, requeued into
//! `requeued`, or not yet read: at or above `next`) or *unacked* (delivered to a
//! consumer or a `basic.get`, not yet settled) or acknowledged out of order.
//!
//! *Invariant:* `head` never passes an offset that is ready or unacked, so the log
//! start offset (the durable record of acknowledgements) only ever drops messages
//! that were acknowledged. Nor does the log start offset pass the newest
//! committed delivery-state record: a claim reaches past its record, so a
//! follower (whose log start offset follows this one) must keep a record of it.
//!
//! Above `head`, what was settled out of order and how far messages were handed
//! out are recorded in the log too (`state.rs`), after each round of changes: a
//! restarted or new leader skips what was settled and flags what was delivered
//! before as redelivered. A first delivery waits until a committed record
//! claims its offset (`Actor::claimed`), so that flag survives any crash.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sluice_log::{Partition, ReadLimit};
use sluice_topology::{Leadership, Topology};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::error::AmqpError;
use crate::message::{decode_batches, now_ms, Publication, Stored};
use crate::model::{Overflow, QueueArgs, QueueKind};
use crate::state::{self, DeliveryState, Ranges};

mod ready;
mod stream;
use ready::Ready;
pub(crate) use stream::StreamStart;

/// How much of the log one read brings into memory.
const READ_AHEAD_BYTES: usize = 256 * 1024;
/// Longest a new leader waits for its log's tail to be committed before it
/// serves the queue.
const RECOVERY_WAIT: Duration = Duration::from_secs(10);
/// How often a consumer whose connection could take no more is retried.
const BLOCKED_RETRY: Duration = Duration::from_millis(5);
/// Commands handled together before deliveries and the delivery state are
/// brought up to date (a client acking one by one sends one per message).
const COMMANDS_PER_ROUND: usize = 256;
/// How far past the first delivery that asked for it a delivery claim
/// reaches (see `Actor::claimed`): one committed record covers this many
/// later first deliveries, and a claim is renewed when deliveries come within
/// half of it. It bounds what a crash flags redelivered (and holds in memory
/// as returned) without having been handed out.
const CLAIM_AHEAD: i64 = 1024;
/// Least time between two moves of the log start offset over acknowledged
/// messages. A move writes and syncs checkpoints (three fsyncs), and a
/// consumer acking one by one would otherwise keep the disk busy with them;
/// acknowledgements are durable sooner, in the delivery-state records.
const TRIM_EVERY: Duration = Duration::from_millis(250);

/// A prefetch window (`basic.qos`): at most `limit` unacked deliveries (0: no limit).
#[derive(Debug, Default)]
pub(crate) struct Credit {
    pub limit: AtomicU32,
    pub used: AtomicU32,
}

impl Credit {
    fn has_room(&self) -> bool {
        let limit = self.limit.load(Ordering::Acquire);
        limit == 0 || self.used.load(Ordering::Acquire) < limit
    }

    /// One unacked delivery settled.
    pub(crate) fn release(&self) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| u.checked_sub(1));
    }
}

/// What a queue tells a connection.
#[derive(Debug)]
pub(crate) enum Event {
    Deliver {
        channel: u16,
        consumer_tag: Arc<str>,
        queue: QueueHandle,
        message: Box<Stored>,
        redelivered: bool,
        /// Acknowledged on delivery (`no_ack`): nothing to settle.
        no_ack: bool,
    },
    /// The queue cancelled the consumer (deleted, or no longer led here).
    Cancelled {
        channel: u16,
        consumer_tag: Arc<str>,
    },
}

/// A connection or peer session that ends: what queues delivered to it and it
/// never handed on goes back to them. Its consumers are going, and the queue
/// counts those messages unacked until someone settles them. Closing first
/// makes every later delivery fail at the queue, which then keeps it.
pub(crate) fn requeue_undelivered(events: &mut mpsc::Receiver<Event>) {
    events.close();
    while let Ok(e) = events.try_recv() {
        if let Event::Deliver {
            queue,
            message,
            no_ack: false,
            ..
        } = e
        {
            queue.settle(vec![message.offset], Outcome::Requeue);
        }
    }
}

/// Who consumes.
#[derive(Debug, Clone)]
pub(crate) struct ConsumerSpec {
    pub connection: u64,
    pub channel: u16,
    pub tag: Arc<str>,
    pub exclusive: bool,
    pub no_ack: bool,
    pub own: Arc<Credit>,
    pub shared: Arc<Credit>,
    pub events: mpsc::Sender<Event>,
    /// Where a stream queue's consumer starts (other queues ignore it).
    pub start: StreamStart,
}

/// A message for `basic.get`.
#[derive(Debug)]
pub(crate) struct Got {
    pub message: Stored,
    pub redelivered: bool,
    /// Messages still ready after this one.
    pub remaining: u32,
}

#[derive(Debug)]
enum Command {
    Consume {
        spec: ConsumerSpec,
        reply: oneshot::Sender<Result<(), AmqpError>>,
    },
    Cancel {
        connection: u64,
        channel: u16,
        tag: Arc<str>,
    },
    /// Every consumer of one channel (or of a whole connection with `None`) goes.
    Detach {
        connection: u64,
        channel: Option<u16>,
    },
    Get {
        no_ack: bool,
        reply: oneshot::Sender<Option<Got>>,
    },
    Settle {
        offsets: Vec<i64>,
        outcome: Outcome,
    },
    Purge {
        reply: oneshot::Sender<u32>,
    },
    Status {
        reply: oneshot::Sender<QueueStatus>,
        /// A client's look (a declaration) is a use that restarts `x-expires`;
        /// the operator's listing is not.
        is_use: bool,
    },
    /// The queue is deleted: consumers are told, the actor stops.
    Close,
    Trimmed {
        to: i64,
        ok: bool,
    },
}

/// How a delivery is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) enum Outcome {
    Ack,
    /// Back to the queue, delivered again (flagged redelivered).
    Requeue,
    /// Rejected without requeue: dead-lettered (reason `rejected`) or dropped.
    Reject,
}

/// Counts `queue.declare-ok`, `queue.delete` and the operator see.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStatus {
    pub ready: u32,
    pub unacked: u32,
    pub consumers: u32,
}

/// A channel's way to its queue's actor.
#[derive(Debug, Clone)]
pub(crate) struct QueueLink {
    tx: mpsc::UnboundedSender<Command>,
    /// A queue's only partition, led here. A stream has none: it is read from
    /// this node's replicas and appended to where each partition is led.
    leadership: Option<Leadership>,
    /// A stream's topic as this node holds it.
    stream: Option<Arc<StreamTopic>>,
    pub name: Arc<str>,
    pub vhost: Arc<str>,
    pub args: Arc<QueueArgs>,
    gauge: Arc<Gauge>,
    id: u64,
}

/// The actor's counts, for the publish path's overflow check.
#[derive(Debug, Default)]
struct Gauge {
    /// Ready messages held in memory (read ahead or requeued).
    in_memory: AtomicU64,
    /// Their body bytes (all ready bytes when a byte limit makes the actor read
    /// everything ahead).
    bytes: AtomicU64,
    /// The first offset not read yet.
    next: AtomicI64,
    /// Offsets from `next` on that hold nothing to deliver (delivery-state records,
    /// messages settled before a restart).
    skipped: AtomicI64,
    /// Messages stored into the queue, handed out, acknowledged (totals).
    published: AtomicU64,
    delivered: AtomicU64,
    acked: AtomicU64,
    sample: parking_lot::Mutex<Option<RateSample>>,
}

/// Totals at the last rate sample, and the rates then (per second).
#[derive(Debug, Clone, Copy)]
struct RateSample {
    at: Instant,
    totals: [u64; 3],
    rates: [f64; 3],
}

/// A queue's totals and rates, for the operator.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct Traffic {
    pub totals: [u64; 3],
    /// Per second, over the time since the previous sample (at least a second).
    pub rates: [f64; 3],
}

/// What a queue actor needs from the broker.
pub(crate) struct Hooks {
    /// Deletes the queue (auto-delete, `x-expires`).
    pub delete: Box<dyn Fn() + Send + Sync>,
    /// Routes and stores dead-lettered messages.
    pub dead_letter: Box<dyn Fn(Vec<Publication>) + Send + Sync>,
}

/// A queue as its actor serves it.
pub(crate) struct QueueSpec {
    pub name: Arc<str>,
    pub vhost: Arc<str>,
    pub auto_delete: bool,
    pub args: QueueArgs,
}

impl PartialEq for QueueLink {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

/// The partition of a queue's topic (of `partitions`) a message with this
/// routing key is appended to: the one Kafka's default partitioner picks for
/// the same record key. A queue has one partition; a stream over a Kafka topic
/// may have several.
pub(crate) fn partition_for(routing_key: &str, partitions: usize) -> usize {
    if partitions <= 1 {
        return 0;
    }
    let n = i32::try_from(partitions).unwrap_or(i32::MAX);
    usize::try_from(sluice_vocab::partition_for_key(routing_key.as_bytes(), n)).unwrap_or(0)
}

/// A stream's topic as this node holds it: every partition is read from the
/// replica here, whichever node leads it, and appended to only where it is
/// led. Replicas below their high watermark hold committed records only, so
/// any replica serves a reader as the leader would.
pub(crate) struct StreamTopic {
    topology: Arc<dyn Topology>,
    topic: Arc<str>,
    /// The leadership of each partition last found here.
    led: parking_lot::RwLock<Vec<Option<Leadership>>>,
}

impl std::fmt::Debug for StreamTopic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamTopic")
            .field("topic", &self.topic)
            .field("partitions", &self.partitions())
            .finish()
    }
}

impl StreamTopic {
    pub(crate) fn new(
        topology: Arc<dyn Topology>,
        topic: &str,
        partitions: usize,
    ) -> Arc<StreamTopic> {
        Arc::new(StreamTopic {
            topology,
            topic: Arc::from(topic),
            led: parking_lot::RwLock::new(vec![None; partitions.max(1)]),
        })
    }

    fn partitions(&self) -> usize {
        self.led.read().len()
    }

    /// This node's leadership of partition `p`, if it leads it now.
    fn leadership(&self, p: usize) -> Option<Leadership> {
        if let Some(l) = self.led.read().get(p)?.as_ref().filter(|l| l.is_current()) {
            return Some(l.clone());
        }
        let found = self
            .topology
            .leadership(&self.topic, i32::try_from(p).ok()?);
        if let Some(slot) = self.led.write().get_mut(p) {
            slot.clone_from(&found);
        }
        found
    }

    /// This node's replica of each partition the topic has now (`None` where
    /// it holds none).
    fn replicas(&self) -> Vec<Option<Arc<Partition>>> {
        let n = self
            .topology
            .image()
            .topics
            .get(&*self.topic)
            .map_or(0, |t| t.partitions.len());
        (0..n)
            .map(|p| {
                let p = i32::try_from(p).ok()?;
                self.topology.store().partition(&self.topic, p)
            })
            .collect()
    }
}

/// Where a queue's actor finds its log.
pub(crate) enum Placement {
    /// A queue: its one partition, led here.
    Queue(Leadership),
    /// A stream: its topic's partitions, read from the replicas here.
    Stream(Arc<StreamTopic>),
}

impl QueueLink {
    pub(crate) fn is_alive(&self) -> bool {
        !self.tx.is_closed() && self.leadership.as_ref().is_none_or(Leadership::is_current)
    }

    /// The leadership a message with this routing key is appended under; a
    /// retriable error when another node leads its partition.
    pub(crate) fn leadership_for(
        &self,
        routing_key: &str,
    ) -> Result<Cow<'_, Leadership>, AmqpError> {
        if let Some(l) = &self.leadership {
            return Ok(Cow::Borrowed(l));
        }
        let Some(s) = &self.stream else {
            return Err(gone(&self.name));
        };
        let p = partition_for(routing_key, s.partitions());
        s.leadership(p).map(Cow::Owned).ok_or_else(|| {
            AmqpError::unavailable(format!(
                "partition {p} of topic '{}' (stream '{}') is not led by this node",
                s.topic, self.name
            ))
            .retriable()
        })
    }

    pub(crate) async fn consume(&self, spec: ConsumerSpec) -> Result<(), AmqpError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Consume { spec, reply });
        rx.await.unwrap_or_else(|_| Err(gone(&self.name)))
    }

    pub(crate) fn cancel(&self, connection: u64, channel: u16, tag: Arc<str>) {
        self.send(Command::Cancel {
            connection,
            channel,
            tag,
        });
    }

    pub(crate) fn detach(&self, connection: u64, channel: Option<u16>) {
        self.send(Command::Detach {
            connection,
            channel,
        });
    }

    pub(crate) fn is_stream(&self) -> bool {
        self.args.kind == QueueKind::Stream
    }

    /// A stream is read by consumers only, as in RabbitMQ (540, closing the
    /// connection).
    fn refuse_on_stream(&self, what: &str) -> Result<(), AmqpError> {
        if self.is_stream() {
            return Err(AmqpError::not_implemented(format!(
                "{what} not supported by stream queues queue '{}' in vhost '{}'",
                self.name, self.vhost
            )));
        }
        Ok(())
    }

    pub(crate) async fn get(&self, no_ack: bool) -> Result<Option<Got>, AmqpError> {
        self.refuse_on_stream("basic.get")?;
        let (reply, rx) = oneshot::channel();
        self.send(Command::Get { no_ack, reply });
        rx.await.map_err(|_| gone(&self.name))
    }

    pub(crate) fn settle(&self, offsets: Vec<i64>, outcome: Outcome) {
        if !offsets.is_empty() {
            self.send(Command::Settle { offsets, outcome });
        }
    }

    /// Counts a message stored into the queue.
    pub(crate) fn count_published(&self, n: usize) {
        self.gauge.published.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Whether publishes may be appended together: a queue that refuses
    /// messages once full decides message by message (`is_full_for`).
    pub(crate) fn takes_batches(&self) -> bool {
        self.args.overflow == Overflow::DropHead
            || (self.args.max_length.is_none() && self.args.max_length_bytes.is_none())
    }

    /// Publish, deliver and ack totals and rates (`[published, delivered, acked]`).
    pub(crate) fn traffic(&self) -> Traffic {
        let g = &self.gauge;
        let totals = [
            g.published.load(Ordering::Relaxed),
            g.delivered.load(Ordering::Relaxed),
            g.acked.load(Ordering::Relaxed),
        ];
        let now = Instant::now();
        let mut sample = g.sample.lock();
        let rates = match *sample {
            Some(s) if now.duration_since(s.at) < Duration::from_secs(1) => s.rates,
            Some(s) => {
                let secs = now.duration_since(s.at).as_secs_f64();
                let rates = [0, 1, 2].map(|i| totals[i].saturating_sub(s.totals[i]) as f64 / secs);
                *sample = Some(RateSample {
                    at: now,
                    totals,
                    rates,
                });
                rates
            }
            None => {
                let rates = [0.0; 3];
                *sample = Some(RateSample {
                    at: now,
                    totals,
                    rates,
                });
                rates
            }
        };
        Traffic { totals, rates }
    }

    /// Whether a publish of `body_len` bytes must be refused (`x-overflow`
    /// `reject-publish*` on a full queue), judged from the actor's last count and
    /// what was appended since.
    pub(crate) fn is_full_for(&self, body_len: u64) -> bool {
        let Some(leadership) = &self.leadership else {
            // A stream drops by retention, never refuses.
            return false;
        };
        if self.args.overflow == Overflow::DropHead {
            return false;
        }
        let unread = (leadership.partition().log_end_offset()
            - self.gauge.next.load(Ordering::Acquire)
            - self.gauge.skipped.load(Ordering::Acquire))
        .max(0) as u64;
        let count = self.gauge.in_memory.load(Ordering::Acquire) + unread;
        let bytes = self.gauge.bytes.load(Ordering::Acquire);
        self.args.max_length.is_some_and(|m| count >= m)
            || self
                .args
                .max_length_bytes
                .is_some_and(|m| bytes + body_len > m)
    }

    pub(crate) async fn purge(&self) -> Result<u32, AmqpError> {
        self.refuse_on_stream("queue.purge")?;
        let (reply, rx) = oneshot::channel();
        self.send(Command::Purge { reply });
        rx.await.map_err(|_| gone(&self.name))
    }

    /// The counts, as a client's declaration sees them (a use of the queue).
    pub(crate) async fn status(&self) -> Result<QueueStatus, AmqpError> {
        self.counts(true).await
    }

    /// The counts, as the operator sees them (not a use: `x-expires` runs on).
    pub(crate) async fn peek(&self) -> Result<QueueStatus, AmqpError> {
        self.counts(false).await
    }

    async fn counts(&self, is_use: bool) -> Result<QueueStatus, AmqpError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Status { reply, is_use });
        rx.await.map_err(|_| gone(&self.name))
    }

    pub(crate) fn close(&self) {
        self.send(Command::Close);
    }

    fn send(&self, c: Command) {
        // A stopped actor's channel is closed: what it would have done (deliver,
        // settle) is redone by the next leader from the log.
        let _ = self.tx.send(c);
    }
}

/// A queue as a channel uses it: served by its actor on this node, or by its
/// leader through a peer session (`peer.rs`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum QueueHandle {
    Here(QueueLink),
    There(crate::peer::RemoteQueue),
}

impl QueueHandle {
    pub(crate) fn name(&self) -> &Arc<str> {
        match self {
            QueueHandle::Here(l) => &l.name,
            QueueHandle::There(r) => &r.name,
        }
    }

    pub(crate) fn vhost(&self) -> &Arc<str> {
        match self {
            QueueHandle::Here(l) => &l.vhost,
            QueueHandle::There(r) => &r.vhost,
        }
    }

    pub(crate) fn is_stream(&self) -> bool {
        let args = match self {
            QueueHandle::Here(l) => &l.args,
            QueueHandle::There(r) => &r.args,
        };
        args.kind == QueueKind::Stream
    }

    pub(crate) async fn consume(&self, spec: ConsumerSpec) -> Result<(), AmqpError> {
        match self {
            QueueHandle::Here(l) => l.consume(spec).await,
            QueueHandle::There(r) => r.consume(spec).await,
        }
    }

    pub(crate) fn cancel(&self, connection: u64, channel: u16, tag: Arc<str>) {
        match self {
            QueueHandle::Here(l) => l.cancel(connection, channel, tag),
            QueueHandle::There(r) => r.cancel(channel, tag),
        }
    }

    pub(crate) fn detach(&self, connection: u64, channel: Option<u16>) {
        match self {
            QueueHandle::Here(l) => l.detach(connection, channel),
            QueueHandle::There(r) => r.detach(channel),
        }
    }

    pub(crate) async fn get(&self, no_ack: bool) -> Result<Option<Got>, AmqpError> {
        match self {
            QueueHandle::Here(l) => l.get(no_ack).await,
            QueueHandle::There(r) => r.get(no_ack).await,
        }
    }

    pub(crate) fn settle(&self, offsets: Vec<i64>, outcome: Outcome) {
        match self {
            QueueHandle::Here(l) => l.settle(offsets, outcome),
            QueueHandle::There(r) => r.settle(offsets, outcome),
        }
    }

    pub(crate) async fn purge(&self) -> Result<u32, AmqpError> {
        match self {
            QueueHandle::Here(l) => l.purge().await,
            QueueHandle::There(r) => r.purge().await,
        }
    }

    /// The counts, as a client's declaration sees them (a use of the queue).
    pub(crate) async fn status(&self) -> Result<QueueStatus, AmqpError> {
        match self {
            QueueHandle::Here(l) => l.status().await,
            QueueHandle::There(r) => r.counts(true).await,
        }
    }
}

/// Handles `first` and whatever else is queued, up to [`COMMANDS_PER_ROUND`],
/// before the actor delivers and records its state again (a client acking one
/// by one sends a command per message). True when the queue was closed.
fn handle_round(
    rx: &mut mpsc::UnboundedReceiver<Command>,
    first: Command,
    mut handle: impl FnMut(Command),
) -> bool {
    handle(first);
    for _ in 1..COMMANDS_PER_ROUND {
        match rx.try_recv() {
            Ok(Command::Close) => return true,
            Ok(c) => handle(c),
            Err(_) => break,
        }
    }
    false
}

/// A quorum queue's delivery carries how often the message was returned before
/// (`x-delivery-count`, 0 the first time), as RabbitMQ's quorum queues do.
fn with_delivery_count(mut m: Stored, count: u32) -> Stored {
    let mut headers = m.properties.headers().clone().unwrap_or_default();
    headers.insert(
        "x-delivery-count".into(),
        amq_protocol::types::AMQPValue::LongLongInt(i64::from(count)),
    );
    m.properties = m.properties.with_headers(headers);
    m
}

fn gone(name: &str) -> AmqpError {
    AmqpError::unavailable(format!(
        "queue '{name}' is no longer served by this node (leadership moved or the queue was deleted)"
    ))
    .retriable()
}

/// Starts the actor of a queue this node leads, or of a stream read here.
pub(crate) fn start(spec: QueueSpec, placement: Placement, hooks: Hooks) -> QueueLink {
    static IDS: AtomicU64 = AtomicU64::new(1);
    let (tx, rx) = mpsc::unbounded_channel();
    let gauge = Arc::new(Gauge::default());
    let args = Arc::new(spec.args);
    let (leadership, stream) = match &placement {
        Placement::Queue(l) => (Some(l.clone()), None),
        Placement::Stream(s) => (None, Some(s.clone())),
    };
    let link = QueueLink {
        tx: tx.clone(),
        leadership,
        stream,
        name: spec.name.clone(),
        vhost: spec.vhost.clone(),
        args: args.clone(),
        gauge: gauge.clone(),
        id: IDS.fetch_add(1, Ordering::Relaxed),
    };
    let leadership = match placement {
        Placement::Queue(l) => l,
        Placement::Stream(topic) => {
            stream::start(link.clone(), rx, topic, gauge);
            return link;
        }
    };
    let partition = leadership.partition().clone();
    let head = partition.log_start_offset();
    gauge.next.store(head, Ordering::Release);
    let actor = Actor {
        name: spec.name,
        link: link.clone(),
        self_tx: tx,
        leadership: leadership.clone(),
        partition,
        consumers: Vec::new(),
        turn: 0,
        next: head,
        ready: Ready::new(args.max_priority),
        requeued: BTreeMap::new(),
        unacked: BTreeSet::new(),
        head,
        trimmed: head,
        trimming: false,
        last_trim: Instant::now(),
        trim_due: None,
        had_consumer: false,
        auto_delete: spec.auto_delete,
        args,
        gauge,
        in_memory_bytes: 0,
        last_used: Instant::now(),
        deleting: false,
        hooks,
        delivered_up_to: head,
        claimed: head,
        claim_from: head,
        claim_written: head,
        claim: None,
        want_claim: false,
        waiting_gets: Vec::new(),
        skip: Ranges::default(),
        returns: BTreeMap::new(),
        controls: Ranges::default(),
        uncommitted: VecDeque::new(),
        kept: None,
        state_dirty: false,
        last_state: None,
    };
    tokio::spawn(actor.run(rx, leadership));
    link
}

#[derive(Debug)]
struct Consumer {
    spec: ConsumerSpec,
    /// Its connection could take no more deliveries at the last attempt.
    blocked: bool,
}

struct Actor {
    name: Arc<str>,
    link: QueueLink,
    self_tx: mpsc::UnboundedSender<Command>,
    /// Its partition's leadership: the actor serves while it lasts.
    leadership: Leadership,
    partition: Arc<Partition>,
    consumers: Vec<Consumer>,
    turn: usize,
    /// First offset not read into memory yet.
    next: i64,
    /// Read, never delivered, in offset order.
    ready: Ready,
    /// Delivered once, returned to the queue: delivered again first, redelivered.
    requeued: BTreeMap<i64, Stored>,
    unacked: BTreeSet<i64>,
    /// Everything below is acknowledged: the smallest offset that is ready or
    /// unacked (or `next`).
    head: i64,
    /// The log start offset as last moved.
    trimmed: i64,
    trimming: bool,
    /// When the log start offset last started to move.
    last_trim: Instant,
    /// When a move held back by `TRIM_EVERY` is due.
    trim_due: Option<Instant>,
    had_consumer: bool,
    auto_delete: bool,
    args: Arc<QueueArgs>,
    gauge: Arc<Gauge>,
    /// Body bytes of `ready` and `requeued`.
    in_memory_bytes: u64,
    /// Last consume, get or declaration (`x-expires` counts from here).
    last_used: Instant,
    /// The queue asked to be deleted: it does so once.
    deleting: bool,
    hooks: Hooks,
    /// Every message below was handed out at least once (here, or before a
    /// restart or failover).
    delivered_up_to: i64,
    /// A message is handed out for the first time only below this offset: a
    /// committed delivery-state record says everything below may have been
    /// handed out, so whoever serves the queue after a crash or a failover
    /// flags it redelivered. A claim reaches `CLAIM_AHEAD` past the offset
    /// that asked for it; a false "redelivered" after a failover is allowed, a
    /// missing one not.
    claimed: i64,
    /// The highest offset a first delivery asked a claim for.
    claim_from: i64,
    /// The largest claim any record carried (every later record repeats it:
    /// recovery reads the last one).
    claim_written: i64,
    /// A claim written but not committed yet: (its reach, its record's end).
    claim: Option<(i64, i64)>,
    /// Deliveries reached the claim (or came near it): write a new one.
    want_claim: bool,
    /// `basic.get`s that wait for a claim to be committed.
    waiting_gets: Vec<(bool, oneshot::Sender<Option<Got>>)>,
    /// Offsets at or above `next` with nothing to deliver: settled before this
    /// actor started, and delivery-state records not read yet. Counts leave
    /// them out.
    skip: Ranges,
    /// How often each message above `head` was returned (x-delivery-count).
    returns: BTreeMap<i64, u32>,
    /// Delivery-state records above `head`: gaps made only of them need no
    /// mention in the next record (recovery finds them by their headers).
    controls: Ranges,
    /// Delivery-state records this actor appended that are not known to be
    /// committed yet: (base offset, end offset), in log order.
    uncommitted: VecDeque<(i64, i64)>,
    /// Where the newest committed delivery-state record lies (or the one
    /// recovery read): the log start offset is never moved past it. Every
    /// record repeats the largest claim, and a claim reaches past its record
    /// over messages the log start offset may pass once they are settled; a
    /// follower moves its log start offset with this one, so trimming past
    /// every committed record would leave whoever serves the queue next no
    /// record of messages handed out under the claim (delivered again
    /// without the redelivered flag). `None` while no record was committed:
    /// nothing was handed out under a claim yet.
    kept: Option<i64>,
    /// Something the delivery state records changed since it was last written.
    state_dirty: bool,
    last_state: Option<DeliveryState>,
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>, leadership: Leadership) {
        self.recover().await;
        let mut hw = self.partition.watch_high_watermark();
        let ended = leadership.ended();
        tokio::pin!(ended);
        loop {
            self.note_committed_records();
            self.settle_claim();
            self.enforce_limits();
            self.dispatch();
            self.persist_state();
            self.publish_gauge();
            let blocked = self.consumers.iter().any(|c| c.blocked);
            let deadline = self.next_deadline();
            let timer = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                c = rx.recv() => match c {
                    Some(Command::Close) | None => break,
                    Some(c) => if handle_round(&mut rx, c, |c| self.handle(c)) { break },
                },
                r = hw.changed() => if r.is_err() { break },
                _ = &mut ended => break,
                _ = tokio::time::sleep(BLOCKED_RETRY), if blocked => {}
                _ = timer => self.on_timer(),
            }
        }
        // Consumers learn that this queue no longer delivers here; their unacked
        // messages stay unacknowledged in the log for whoever serves it next.
        // A full event queue (a peer link busy with other consumers'
        // deliveries) must not lose the cancellation: the consumer would
        // wait forever on a queue that is gone.
        for c in self.consumers.drain(..) {
            let cancelled = Event::Cancelled {
                channel: c.spec.channel,
                consumer_tag: c.spec.tag.clone(),
            };
            if let Err(mpsc::error::TrySendError::Full(cancelled)) =
                c.spec.events.try_send(cancelled)
            {
                let events = c.spec.events.clone();
                tokio::spawn(async move {
                    let _ = events.send(cancelled).await;
                });
            }
        }
    }

    fn handle(&mut self, c: Command) {
        match c {
            Command::Consume { spec, reply } => {
                self.last_used = Instant::now();
                let locked = self.consumers.iter().any(|c| c.spec.exclusive)
                    || (spec.exclusive && !self.consumers.is_empty());
                let r = if locked {
                    Err(AmqpError::access_refused(format!(
                        "queue '{}' in vhost '{}' in exclusive use",
                        self.name, self.link.vhost
                    )))
                } else {
                    self.had_consumer = true;
                    self.consumers.push(Consumer {
                        spec,
                        blocked: false,
                    });
                    Ok(())
                };
                let _ = reply.send(r);
            }
            Command::Cancel {
                connection,
                channel,
                tag,
            } => {
                self.consumers.retain(|c| {
                    !(c.spec.connection == connection
                        && c.spec.channel == channel
                        && c.spec.tag == tag)
                });
                self.check_auto_delete();
            }
            Command::Detach {
                connection,
                channel,
            } => {
                self.consumers.retain(|c| {
                    c.spec.connection != connection
                        || channel.is_some_and(|ch| c.spec.channel != ch)
                });
                self.check_auto_delete();
            }
            Command::Get { no_ack, reply } => self.get(no_ack, reply),
            Command::Settle { offsets, outcome } => {
                self.state_dirty = true;
                let (mut rejected, mut over_limit) = (Vec::new(), Vec::new());
                for o in offsets {
                    if !self.unacked.remove(&o) {
                        continue;
                    }
                    // Every return counts (a nack, a reject, a channel that went
                    // with the message unacked); past x-delivery-limit the
                    // message leaves as a poison message.
                    let returned = outcome == Outcome::Requeue;
                    let returns = if returned {
                        let n = self.returns.entry(o).or_insert(0);
                        *n = n.saturating_add(1);
                        *n
                    } else {
                        self.returns.remove(&o).unwrap_or(0)
                    };
                    let poison = returned
                        && self
                            .args
                            .delivery_limit
                            .is_some_and(|limit| u64::from(returns) > limit);
                    match outcome {
                        Outcome::Ack => {
                            self.gauge.acked.fetch_add(1, Ordering::Relaxed);
                        }
                        Outcome::Requeue if poison => {
                            self.returns.remove(&o);
                            if let Some(m) = self.read_back(o) {
                                over_limit.push(m);
                            }
                        }
                        Outcome::Requeue => match self.read_back(o) {
                            Some(m) => {
                                self.in_memory_bytes += m.body_len();
                                self.requeued.insert(o, m);
                            }
                            // Unreadable now: it stays unacknowledged, so `head`
                            // (and the log start offset) cannot pass it, and a
                            // restart delivers it again.
                            None => {
                                self.unacked.insert(o);
                            }
                        },
                        Outcome::Reject => {
                            if self.args.dead_letter_exchange.is_some() {
                                if let Some(m) = self.read_back(o) {
                                    rejected.push(m);
                                }
                            }
                        }
                    }
                }
                self.dead_letter(&rejected, "rejected");
                self.dead_letter(&over_limit, "delivery_limit");
                self.advance_head();
            }
            Command::Purge { reply } => {
                self.state_dirty = true;
                let purged = self.ready_count();
                self.requeued.clear();
                self.ready.clear();
                self.in_memory_bytes = 0;
                self.next = self.next.max(self.partition.high_watermark());
                self.advance_head();
                let _ = reply.send(purged);
            }
            Command::Status { reply, is_use } => {
                if is_use {
                    self.last_used = Instant::now();
                }
                let _ = reply.send(QueueStatus {
                    ready: self.ready_count(),
                    unacked: u32::try_from(self.unacked.len()).unwrap_or(u32::MAX),
                    consumers: u32::try_from(self.consumers.len()).unwrap_or(u32::MAX),
                });
            }
            Command::Trimmed { to, ok } => {
                self.trimming = false;
                // After a failure the next settlement tries again.
                if ok {
                    self.trimmed = self.trimmed.max(to);
                    self.advance_head();
                }
            }
            Command::Close => {}
        }
    }

    /// Messages ready for delivery (unread ones counted by offset).
    fn ready_count(&self) -> u32 {
        let unread = (self.partition.high_watermark() - self.next).max(0)
            - self
                .skip
                .count_in(self.next, self.partition.high_watermark());
        let n = self.requeued.len() as i64 + self.ready.len() as i64 + unread;
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    fn publish_gauge(&self) {
        let in_memory = (self.requeued.len() + self.ready.len()) as u64;
        self.gauge.in_memory.store(in_memory, Ordering::Release);
        self.gauge
            .bytes
            .store(self.in_memory_bytes, Ordering::Release);
        self.gauge.next.store(self.next, Ordering::Release);
        self.gauge
            .skipped
            .store(self.skip.count_in(self.next, i64::MAX), Ordering::Release);
    }

    /// The oldest ready message, whatever its expiry or priority.
    fn pop_oldest(&mut self) -> Option<(Stored, bool)> {
        self.pop_ready(false)
    }

    /// The ready message to deliver next: requeued ones first (RabbitMQ puts a
    /// returned message back at the head), unless a ready one has a higher
    /// priority.
    fn pop_next(&mut self) -> Option<(Stored, bool)> {
        self.pop_ready(true)
    }

    fn pop_ready(&mut self, by_priority: bool) -> Option<(Stored, bool)> {
        self.refill();
        let candidate = if by_priority {
            self.ready.next()
        } else {
            self.ready.oldest()
        };
        // The requeued message that goes first: the oldest, or in a priority
        // queue the oldest of the highest level (requeued messages are few:
        // at most what consumers held).
        let priorities = by_priority && self.args.max_priority.is_some();
        let requeued = if priorities {
            self.requeued
                .iter()
                .min_by_key(|(&o, m)| (std::cmp::Reverse(self.ready.level_of(m)), o))
        } else {
            self.requeued.first_key_value()
        };
        let requeued_first = match (requeued, candidate) {
            (Some((&r, rm)), Some(m)) => {
                let (rl, l) = if priorities {
                    (self.ready.level_of(rm), self.ready.level_of(m))
                } else {
                    (0, 0)
                };
                rl > l || (rl == l && r < m.offset)
            }
            (Some(_), None) => true,
            _ => false,
        };
        let requeued = requeued.map(|(&o, _)| o);
        let taken = if requeued_first {
            requeued
                .and_then(|o| self.requeued.remove(&o))
                .map(|m| (m, true))
        } else if by_priority {
            self.ready.pop_next().map(|m| (m, false))
        } else {
            self.ready.pop_oldest().map(|m| (m, false))
        };
        if let Some((m, _)) = &taken {
            self.in_memory_bytes = self.in_memory_bytes.saturating_sub(m.body_len());
        }
        taken
    }

    /// Reads ahead when nothing is ready, or always when the queue must see
    /// every ready message (priorities, a byte limit).
    fn refill(&mut self) {
        if self.ready.is_empty() || self.reads_everything() {
            self.read_ahead();
        }
    }

    fn get(&mut self, no_ack: bool, reply: oneshot::Sender<Option<Got>>) {
        self.last_used = Instant::now();
        let taken = match self.take() {
            Some((message, false)) if !self.may_hand_out(message.offset) => {
                // Answered once a claim covers it.
                self.untake(message, false);
                self.waiting_gets.push((no_ack, reply));
                return;
            }
            taken => taken,
        };
        let got = taken.map(|(message, redelivered)| {
            self.gauge.delivered.fetch_add(1, Ordering::Relaxed);
            self.delivered_up_to = self.delivered_up_to.max(message.offset + 1);
            self.state_dirty = true;
            if !no_ack {
                self.unacked.insert(message.offset);
            }
            Got {
                message,
                redelivered,
                remaining: 0,
            }
        });
        let got = got.map(|mut g| {
            g.remaining = self.ready_count();
            g
        });
        if let Err(Some(g)) = reply.send(got) {
            // The channel went away before the answer: nothing was delivered.
            if !no_ack && self.unacked.remove(&g.message.offset) {
                self.untake(g.message, g.redelivered);
            }
        }
        self.advance_head();
    }

    /// Whether a message may be handed out for the first time now; when it is
    /// near or past the claim, asks for a new one.
    fn may_hand_out(&mut self, offset: i64) -> bool {
        if offset + CLAIM_AHEAD / 2 >= self.claimed && self.claim.is_none() {
            self.want_claim = true;
            self.state_dirty = true;
            self.claim_from = self.claim_from.max(offset);
        }
        offset < self.claimed
    }

    /// Notes the delivery-state records that are committed now: the log start
    /// offset may move up to the newest of them. Before `settle_claim`, so a
    /// claim holds only once the log start offset is kept at or below a
    /// committed record of it.
    fn note_committed_records(&mut self) {
        let hw = self.partition.high_watermark();
        while let Some(&(base, end)) = self.uncommitted.front() {
            if end > hw {
                break;
            }
            self.kept = Some(self.kept.map_or(base, |k| k.max(base)));
            self.uncommitted.pop_front();
        }
    }

    /// A claim whose record is committed holds: deliveries may go up to it.
    fn settle_claim(&mut self) {
        let Some((reach, end)) = self.claim else {
            return;
        };
        if !self.leadership.is_current() || self.partition.high_watermark() < end {
            return;
        }
        self.claim = None;
        self.claimed = self.claimed.max(reach);
        for (no_ack, reply) in std::mem::take(&mut self.waiting_gets) {
            self.get(no_ack, reply);
        }
    }

    fn reads_everything(&self) -> bool {
        self.args.max_length_bytes.is_some() || self.args.max_priority.is_some()
    }

    /// The next message to hand out, and whether it was delivered before. Expired
    /// messages met on the way are dead-lettered.
    fn take(&mut self) -> Option<(Stored, bool)> {
        let now = now_ms();
        loop {
            let (m, redelivered) = self.pop_next()?;
            if m.expires_at(self.args.message_ttl)
                .is_some_and(|at| at <= now)
            {
                self.dead_letter(std::slice::from_ref(&m), "expired");
                self.state_dirty = true;
                continue;
            }
            if self.args.kind == QueueKind::Quorum {
                let count = self.returns.get(&m.offset).copied().unwrap_or(0);
                return Some((with_delivery_count(m, count), redelivered));
            }
            return Some((m, redelivered));
        }
    }

    /// Puts back a message that was taken but not delivered.
    fn untake(&mut self, m: Stored, redelivered: bool) {
        self.in_memory_bytes += m.body_len();
        if redelivered {
            self.requeued.insert(m.offset, m);
        } else {
            self.ready.push_front(m);
        }
    }

    /// Reads the next batches into `ready` (all of them, when a byte limit needs
    /// their sizes).
    fn read_ahead(&mut self) {
        let hw = self.partition.high_watermark();
        // A byte limit needs every ready message's size, priorities need every
        // ready message to pick the highest.
        let all = self.reads_everything();
        while (self.ready.is_empty() || all) && self.next < hw {
            let read = self
                .partition
                .read(self.next, READ_AHEAD_BYTES, true, ReadLimit::HighWatermark)
                .map_err(|e| e.to_string())
                .and_then(|r| decode_batches(r.records, self.next));
            match read {
                Ok((messages, end)) if end > self.next => {
                    self.next = end;
                    for m in messages {
                        // Settled before a restart: gone. Handed out before it:
                        // delivered again first, flagged redelivered.
                        if self.skip.contains(m.offset) {
                            continue;
                        }
                        self.in_memory_bytes += m.body_len();
                        if m.offset < self.delivered_up_to {
                            self.requeued.insert(m.offset, m);
                        } else {
                            self.ready.push_back(m);
                        }
                    }
                    self.skip.remove_below(self.next);
                }
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(queue = %self.name, offset = self.next, "cannot read queue log: {e}");
                    return;
                }
            }
        }
    }

    /// A delivered message, read back from the log.
    fn read_back(&self, offset: i64) -> Option<Stored> {
        let read = self
            .partition
            .read(offset, 1, true, ReadLimit::HighWatermark)
            .map_err(|e| e.to_string())
            .and_then(|r| decode_batches(r.records, offset));
        match read {
            Ok((messages, _)) => messages.into_iter().find(|m| m.offset == offset),
            Err(e) => {
                tracing::warn!(queue = %self.name, offset, "cannot read back a message: {e}");
                None
            }
        }
    }

    /// Re-publishes messages leaving the queue to its dead-letter exchange (those
    /// without one are dropped, as in RabbitMQ).
    fn dead_letter(&self, messages: &[Stored], reason: &str) {
        let Some(exchange) = &self.args.dead_letter_exchange else {
            return;
        };
        let out: Vec<Publication> = messages
            .iter()
            .filter_map(|m| {
                let key = self
                    .args
                    .dead_letter_routing_key
                    .as_deref()
                    .unwrap_or(&m.routing_key);
                m.dead_lettered(&self.name, reason, exchange, key)
                    .map_err(
                        |e| tracing::warn!(queue = %self.name, "cannot dead-letter a message: {e}"),
                    )
                    .ok()
            })
            .collect();
        if !out.is_empty() {
            (self.hooks.dead_letter)(out);
        }
    }

    /// `x-max-length` / `x-max-length-bytes` with drop-head: the oldest ready
    /// messages go (dead-lettered, reason `maxlen`).
    fn enforce_limits(&mut self) {
        if !self.args.is_bounded() || self.args.overflow != Overflow::DropHead {
            return;
        }
        if self.args.max_length_bytes.is_some() {
            self.read_ahead();
        }
        let mut dropped = Vec::new();
        loop {
            let over_count = self
                .args
                .max_length
                .is_some_and(|m| u64::from(self.ready_count()) > m);
            let over_bytes = self
                .args
                .max_length_bytes
                .is_some_and(|m| self.in_memory_bytes > m);
            if !over_count && !over_bytes {
                break;
            }
            match self.pop_oldest() {
                Some((m, _)) => dropped.push(m),
                None => break,
            }
        }
        if !dropped.is_empty() {
            self.dead_letter(&dropped, "maxlen");
            self.state_dirty = true;
            self.advance_head();
        }
    }

    /// When the timer must wake the actor: the oldest ready message expires, or
    /// the unused queue expires.
    fn next_deadline(&mut self) -> Option<Instant> {
        let mut deadline = None;
        if let Some(ms) = self.args.expires {
            if self.consumers.is_empty() && !self.deleting {
                deadline = Some(self.last_used + Duration::from_millis(ms));
            }
        }
        if self.ready.is_empty() && self.requeued.is_empty() {
            self.read_ahead();
        }
        let head = match (self.requeued.first_key_value(), self.ready.oldest()) {
            (Some((&r, rm)), Some(m)) => Some(if r < m.offset { rm } else { m }),
            (Some((_, rm)), None) => Some(rm),
            (None, Some(m)) => Some(m),
            (None, None) => None,
        };
        if let Some(at) = head.and_then(|m| m.expires_at(self.args.message_ttl)) {
            let wait = Duration::from_millis(u64::try_from((at - now_ms()).max(0)).unwrap_or(0));
            let at = Instant::now() + wait;
            deadline = Some(deadline.map_or(at, |d: Instant| d.min(at)));
        }
        if let Some(at) = self.trim_due {
            deadline = Some(deadline.map_or(at, |d: Instant| d.min(at)));
        }
        deadline
    }

    fn on_timer(&mut self) {
        if self.trim_due.is_some_and(|at| at <= Instant::now()) {
            // Cleared first: a deadline left in the past would fire at once,
            // again and again; `advance_head` sets a new one if it must wait.
            self.trim_due = None;
            self.advance_head();
        }
        // Expired messages at the head leave the queue even with no consumer.
        let now = now_ms();
        let mut expired = Vec::new();
        while let Some((m, redelivered)) = self.pop_oldest() {
            if m.expires_at(self.args.message_ttl)
                .is_some_and(|at| at <= now)
            {
                expired.push(m);
            } else {
                self.untake(m, redelivered);
                break;
            }
        }
        if !expired.is_empty() {
            self.dead_letter(&expired, "expired");
            self.state_dirty = true;
            self.advance_head();
        }
        if let Some(ms) = self.args.expires {
            let unused =
                self.consumers.is_empty() && self.last_used.elapsed() >= Duration::from_millis(ms);
            if unused && !self.deleting {
                self.deleting = true;
                (self.hooks.delete)();
            }
        }
    }

    /// Hands ready messages to consumers with room, in turn (only to the first
    /// consumer with `x-single-active-consumer`).
    fn dispatch(&mut self) {
        for c in &mut self.consumers {
            c.blocked = false;
        }
        loop {
            let n = if self.args.single_active_consumer {
                self.consumers.len().min(1)
            } else {
                self.consumers.len()
            };
            let Some(i) = (0..n).map(|k| (self.turn + k) % n.max(1)).find(|&i| {
                let c = &self.consumers[i];
                !c.blocked && (c.spec.no_ack || (c.spec.own.has_room() && c.spec.shared.has_room()))
            }) else {
                break;
            };
            let Some((message, redelivered)) = self.take() else {
                break;
            };
            if !redelivered && !self.may_hand_out(message.offset) {
                // Delivered once a claim covers it (the round ends on commit).
                self.untake(message, false);
                break;
            }
            let offset = message.offset;
            let c = &self.consumers[i];
            let event = Event::Deliver {
                channel: c.spec.channel,
                consumer_tag: c.spec.tag.clone(),
                queue: QueueHandle::Here(self.link.clone()),
                message: Box::new(message),
                redelivered,
                no_ack: c.spec.no_ack,
            };
            match c.spec.events.try_send(event) {
                Ok(()) => {
                    self.gauge.delivered.fetch_add(1, Ordering::Relaxed);
                    self.delivered_up_to = self.delivered_up_to.max(offset + 1);
                    self.state_dirty = true;
                    if !c.spec.no_ack {
                        c.spec.own.used.fetch_add(1, Ordering::AcqRel);
                        c.spec.shared.used.fetch_add(1, Ordering::AcqRel);
                        self.unacked.insert(offset);
                    } else {
                        self.gauge.acked.fetch_add(1, Ordering::Relaxed);
                    }
                    self.turn = i + 1;
                }
                Err(mpsc::error::TrySendError::Full(Event::Deliver { message, .. })) => {
                    self.consumers[i].blocked = true;
                    self.untake(*message, redelivered);
                }
                Err(mpsc::error::TrySendError::Closed(Event::Deliver { message, .. })) => {
                    self.consumers.remove(i);
                    self.untake(*message, redelivered);
                }
                Err(_) => {}
            }
        }
        self.advance_head();
    }

    /// Reads the delivery state the log records, before anything is delivered.
    async fn recover(&mut self) {
        // A leader that just took over, or restarted with its followers, holds
        // the queue up to its log end, but its high watermark stays below until
        // the followers confirm that tail. Serving starts once it is committed,
        // so a restarted queue is not seen empty (bounded: a follower that
        // does not come back leaves the ISR and the watermark moves on).
        let end = self.partition.log_end_offset();
        let mut hw = self.partition.watch_high_watermark();
        let caught_up = async {
            while self.partition.high_watermark() < end {
                if hw.changed().await.is_err() {
                    return;
                }
            }
        };
        let caught_up = tokio::time::timeout(RECOVERY_WAIT, caught_up).await.is_ok()
            && self.partition.high_watermark() >= end;
        let (partition, from) = (self.partition.clone(), self.head);
        let Ok((recorded, controls)) =
            tokio::task::spawn_blocking(move || state::last_recorded(&partition, from)).await
        else {
            return;
        };
        // Earlier delivery-state records hold nothing to deliver either.
        for (start, end) in controls.iter() {
            self.skip.insert(start, end);
        }
        self.controls = controls;
        if let Some((at, mut s)) = recorded {
            self.kept = Some(at);
            self.delivered_up_to = self.delivered_up_to.max(s.delivered_up_to);
            // Acknowledged before the crash, though the log start offset did
            // not get there.
            self.skip.insert(self.head, s.acked_below);
            self.returns = s.returns.split_off(&self.head);
            for (start, end) in s.settled.iter() {
                self.skip.insert(start, end);
            }
            tracing::debug!(queue = %self.name, delivered_up_to = self.delivered_up_to, "delivery state recovered");
        }
        self.skip.remove_below(self.head);
        // Every later record repeats the largest claim read. It holds for
        // new first deliveries only once committed: when the tail did not
        // commit in time, a new claim is written first.
        self.claim_written = self.delivered_up_to;
        self.claimed = if caught_up {
            self.delivered_up_to
        } else {
            self.head
        };
    }

    /// Records what changed in the delivery state: the settled offsets above
    /// `head` (everything between `head` and `next` that is neither ready nor
    /// unacked) and how far messages were handed out.
    fn persist_state(&mut self) {
        if !std::mem::take(&mut self.state_dirty) {
            return;
        }
        let mut pending: Vec<i64> = self
            .unacked
            .iter()
            .copied()
            .chain(self.requeued.keys().copied())
            .chain(self.ready.offsets())
            .collect();
        pending.sort_unstable();
        self.controls.remove_below(self.head);
        let mut settled = Ranges::default();
        let mut at = self.head;
        for o in pending.into_iter().chain(std::iter::once(self.next)) {
            // A gap of delivery-state records alone settles no message: leaving
            // it out keeps a record small while publishers and consumers
            // interleave records with messages.
            if o > at && self.controls.count_in(at, o) < o - at {
                settled.insert(at, o);
            }
            at = at.max(o + 1);
        }
        for (start, end) in self.skip.iter() {
            settled.insert(start.max(self.next), end);
        }
        self.returns = self.returns.split_off(&self.head);
        let claiming = self.want_claim && self.claim.is_none();
        if claiming {
            self.claim_written = self
                .claim_written
                .max(self.claimed.max(self.claim_from) + CLAIM_AHEAD);
        }
        let state = DeliveryState {
            delivered_up_to: self.delivered_up_to.max(self.claim_written),
            acked_below: self.head,
            settled,
            returns: self.returns.clone(),
        };
        // Nothing to add to what the log start offset and the last record
        // say. The log start offset moves at most every `TRIM_EVERY`: until
        // it reaches `head`, only a record makes those acks durable.
        let nothing_above_head = state.settled.is_empty()
            && state.returns.is_empty()
            && state.delivered_up_to <= self.head
            && self.head <= self.trimmed;
        if self.last_state.as_ref() == Some(&state)
            || (nothing_above_head && self.last_state.is_none())
        {
            // The last record, committed (no claim is pending), already
            // carries this reach.
            self.want_claim = false;
            return;
        }
        let written = state.encode().and_then(|batch| {
            self.leadership
                .append_control(&batch)
                .map_err(|e| e.to_string())
        });
        match written {
            Ok(appended) => {
                if claiming {
                    self.want_claim = false;
                    self.claim = Some((self.claim_written, appended.end_offset));
                }
                self.skip.insert(appended.base_offset, appended.end_offset);
                self.controls
                    .insert(appended.base_offset, appended.end_offset);
                self.uncommitted
                    .push_back((appended.base_offset, appended.end_offset));
                self.last_state = Some(state);
            }
            Err(e) => {
                // Tried again after the next round.
                self.state_dirty = true;
                tracing::warn!(queue = %self.name, "cannot record the delivery state: {e}");
            }
        }
    }

    /// Moves `head` over what is acknowledged and the log start offset after it.
    fn advance_head(&mut self) {
        let mut head = self.next;
        if let Some(&o) = self.unacked.first() {
            head = head.min(o);
        }
        if let Some((&o, _)) = self.requeued.first_key_value() {
            head = head.min(o);
        }
        if let Some(m) = self.ready.oldest() {
            head = head.min(m.offset);
        }
        self.head = self.head.max(head);
        // Not past the newest committed delivery-state record (see `kept`).
        let to = self.kept.map_or(self.head, |k| k.min(self.head));
        if self.trimming || to <= self.trimmed {
            return;
        }
        let due = self.last_trim + TRIM_EVERY;
        if Instant::now() < due {
            self.trim_due = Some(due);
            return;
        }
        self.trim_due = None;
        self.last_trim = Instant::now();
        self.trimming = true;
        let (partition, tx) = (self.partition.clone(), self.self_tx.clone());
        // Moving the log start offset writes and syncs a checkpoint: off the workers.
        tokio::task::spawn_blocking(move || {
            let ok = match partition.delete_records_before(to) {
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!("cannot record acknowledgements up to offset {to}: {e}");
                    false
                }
            };
            let _ = tx.send(Command::Trimmed { to, ok });
        });
    }

    fn check_auto_delete(&mut self) {
        if self.consumers.is_empty() {
            self.last_used = Instant::now();
        }
        if !self.auto_delete || !self.had_consumer || !self.consumers.is_empty() || self.deleting {
            return;
        }
        self.deleting = true;
        (self.hooks.delete)();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::encode_properties;
    use amq_protocol::protocol::basic::AMQPProperties;
    use sluice_log::{FlushPolicy, Store, StoreConfig, TopicConfig};
    use sluice_topology::Term;

    const WAIT: Duration = Duration::from_secs(5);

    /// A data directory removed when dropped.
    struct TempDir(std::path::PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn store() -> (TempDir, Arc<Store>) {
        let dir = std::env::temp_dir().join(format!("sluice-amqp-queue-{}", uuid::Uuid::new_v4()));
        let store = Store::open(StoreConfig {
            data_dir: dir.clone(),
            defaults: TopicConfig::default(),
            flush: FlushPolicy::Always,
            cleaner: Default::default(),
        })
        .expect("a store");
        (TempDir(dir), store)
    }

    fn serve(leadership: Leadership) -> QueueLink {
        start(
            QueueSpec {
                name: Arc::from("q"),
                vhost: Arc::from("/"),
                auto_delete: false,
                args: QueueArgs::default(),
            },
            Placement::Queue(leadership),
            Hooks {
                delete: Box::new(|| {}),
                dead_letter: Box::new(|_| {}),
            },
        )
    }

    async fn consume(link: &QueueLink, connection: u64) -> mpsc::Receiver<Event> {
        let (events, rx) = mpsc::channel(64);
        consume_into(link, connection, events).await;
        rx
    }

    /// Consumer "c" on channel 1, its events sent to `events`.
    async fn consume_into(link: &QueueLink, connection: u64, events: mpsc::Sender<Event>) {
        link.consume(ConsumerSpec {
            connection,
            channel: 1,
            tag: Arc::from("c"),
            exclusive: false,
            no_ack: false,
            own: Arc::default(),
            shared: Arc::default(),
            events,
            start: StreamStart::default(),
        })
        .await
        .expect("consumes");
    }

    fn publish(leadership: &Leadership, body: &'static [u8]) {
        let p = Publication {
            exchange: String::new(),
            routing_key: "q".to_owned(),
            properties: encode_properties(&AMQPProperties::default())
                .expect("encodes")
                .into(),
            body: bytes::Bytes::from_static(body),
        };
        let batch = crate::message::encode_batch(&[&p]).expect("encodes");
        leadership.append(&batch).expect("appended");
    }

    /// Everything appended so far reaches the in-sync replicas.
    async fn commit(partition: &Partition) {
        let end = partition.log_end_offset();
        partition.wait_durable(end).await.expect("durable");
        partition.advance_high_watermark(end);
    }

    /// The next delivery, committing what the actor writes meanwhile (its
    /// claims) when `replicate`.
    async fn next_delivery(
        partition: &Partition,
        rx: &mut mpsc::Receiver<Event>,
        replicate: bool,
    ) -> (Stored, bool) {
        let deadline = Instant::now() + WAIT;
        loop {
            if replicate {
                commit(partition).await;
            }
            match tokio::time::timeout(Duration::from_millis(20), rx.recv()).await {
                Ok(Some(Event::Deliver {
                    message,
                    redelivered,
                    ..
                })) => return (*message, redelivered),
                Ok(other) => panic!("expected a delivery, got {other:?}"),
                Err(_) => assert!(Instant::now() < deadline, "no delivery"),
            }
        }
    }

    /// A consumer whose event queue is full when its queue stops (a peer
    /// link busy with other consumers' deliveries) still learns it was
    /// cancelled; before, the cancellation was dropped and the consumer
    /// waited on a queue that was gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_event_queue_does_not_lose_the_cancellation() {
        let (_dir, store) = store();
        store
            .create_topic("amqp.q", 1, &Default::default(), false)
            .expect("a topic");
        let partition = store.partition("amqp.q", 0).expect("a partition");
        let term = Term::new();
        let link = serve(Leadership::new(partition, 1, term.clone()));
        let (events, mut rx) = mpsc::channel(1);
        consume_into(&link, 1, events.clone()).await;
        events
            .try_send(Event::Cancelled {
                channel: 9,
                consumer_tag: Arc::from("filler"),
            })
            .expect("room for one");
        term.end();
        let mut tags = Vec::new();
        while tags.len() < 2 {
            match tokio::time::timeout(WAIT, rx.recv()).await {
                Ok(Some(Event::Cancelled { consumer_tag, .. })) => tags.push(consumer_tag),
                Ok(other) => panic!("expected cancellations, got {other:?}"),
                Err(_) => panic!("the consumer was never told: {tags:?}"),
            }
        }
        assert_eq!(tags, [Arc::from("filler"), Arc::from("c")]);
    }

    /// A leader delivers a message under a claim a committed record made
    /// long before, then dies before the record after that delivery reaches
    /// a follower. Meanwhile the log start offset moved over every committed
    /// record (the queue was empty, everything acknowledged): the follower
    /// that takes over must still find a record of the claim, and flag the
    /// message redelivered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_survives_a_log_start_offset_moved_past_it() {
        let (_dir, store) = store();
        store
            .create_topic("amqp.q", 1, &Default::default(), false)
            .expect("a topic");
        let partition = store.partition("amqp.q", 0).expect("a partition");
        partition.set_replicated(true);
        let first = Term::new();
        let lead = Leadership::new(partition.clone(), 1, first.clone());
        let link = serve(lead.clone());
        let mut rx = consume(&link, 1).await;

        // m0 needs a claim: committed, then delivered, then acknowledged.
        publish(&lead, b"m0");
        let (m0, again) = next_delivery(&partition, &mut rx, true).await;
        assert!(!again && &m0.body[..] == b"m0");
        link.settle(vec![m0.offset], Outcome::Ack);
        // Every record committed and read past; the log start offset is
        // moved (at most every `TRIM_EVERY`) to where the queue is empty.
        let until = Instant::now() + TRIM_EVERY * 3;
        while Instant::now() < until {
            commit(&partition).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            partition.log_start_offset() > m0.offset,
            "the acknowledged m0 leaves the log"
        );

        // m1 is committed and delivered under the claim m0 asked for; the
        // record written after it is appended, never replicated.
        publish(&lead, b"m1");
        commit(&partition).await;
        let committed = partition.high_watermark();
        let (m1, again) = next_delivery(&partition, &mut rx, false).await;
        assert!(!again && &m1.body[..] == b"m1");
        let deadline = Instant::now() + WAIT;
        while partition.log_end_offset() == committed {
            assert!(Instant::now() < deadline, "no record after the delivery");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        // The leader dies. The follower that takes over holds the committed
        // log, from the log start offset it learnt from the leader.
        first.end();
        let deadline = Instant::now() + WAIT;
        while !link.tx.is_closed() {
            assert!(Instant::now() < deadline, "the actor goes on");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        partition.truncate_to(committed).expect("truncated");
        let second = Term::new();
        let lead = Leadership::new(partition.clone(), 2, second.clone());
        let link = serve(lead);
        let mut rx = consume(&link, 2).await;
        let (again_m1, redelivered) = next_delivery(&partition, &mut rx, true).await;
        assert_eq!(&again_m1.body[..], b"m1");
        assert!(
            redelivered,
            "m1 was handed out by the last leader: it must come back flagged redelivered"
        );
        second.end();
    }
}

//! Channels: the methods of the channel, exchange, queue, basic and confirm
//! classes, content assembly, deliveries and publisher confirms.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use amq_protocol::frame::AMQPContentHeader;
use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::protocol::{basic, channel, confirm, exchange, queue, tx, AMQPClass};
use amq_protocol::types::{FieldTable, ShortString};
use bytes::{Bytes, BytesMut};
use sluice_topology::amqp::{Binding, Destination};
use sluice_topology::Leadership;
use tokio::sync::mpsc;
use tokio::time::{Duration, Instant};

use crate::connection::Conn;
use crate::error::AmqpError;
use crate::frame::{put_body, put_header, put_method};
use crate::message::{encode_batch, Publication, Stored};
use crate::model::encode_table;
use crate::ops::{no_exchange, ExchangeDeclaration, QueueDeclaration, Who};
use crate::peer::{PublishAnswer, RemoteQueue};
use crate::queue::{ConsumerSpec, Credit, Event, Outcome, QueueHandle, QueueLink, StreamStart};
use crate::short;

/// How long a consume or get whose queue's leadership moved under it is tried
/// again at the new leader, and how often.
const LEADER_MOVE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
const LEADER_MOVE_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// Unconfirmed publishes a channel keeps before it drops those already committed.
const UNCONFIRMED_PRUNE: usize = 256;
/// Longest a close waits for the channel's unconfirmed publishes to commit.
const CLOSE_SETTLE: std::time::Duration = std::time::Duration::from_secs(5);

/// What confirm tasks tell the connection.
#[derive(Debug)]
pub(crate) enum Notice {
    Confirm {
        channel: u16,
        seq: u64,
        multiple: bool,
        ack: bool,
    },
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    Open,
    /// We sent `channel.close`: everything but `close-ok` is dropped.
    Closing,
}

/// A `basic.publish` waiting for its content.
#[derive(Debug)]
struct Pending {
    exchange: String,
    routing_key: String,
    mandatory: bool,
    header: Option<(u64, AMQPProperties, Bytes)>,
    /// The body's first frame, and any after it (most bodies are one frame).
    body: Bytes,
    more: Vec<Bytes>,
    received: u64,
}

/// A publish whose content is complete, staged until the connection stores
/// the publishes of one read together: channel, confirm sequence number.
pub(crate) type Staged = (u16, Option<u64>, Message);

/// A whole published message.
#[derive(Debug)]
pub(crate) struct Message {
    publication: Publication,
    /// The properties, parsed (routing by headers, returns).
    properties: AMQPProperties,
    mandatory: bool,
}

/// What a transaction holds until `tx.commit`.
#[derive(Debug, Default)]
struct TxWork {
    publishes: Vec<Message>,
    /// Settlements and their delivery tags (given back on rollback).
    settles: Vec<(Unacked, Outcome)>,
    settle_tags: Vec<u64>,
}

#[derive(Debug, Clone)]
pub(crate) struct Unacked {
    queue: QueueHandle,
    offset: i64,
    /// The consumer whose prefetch window it takes (none for `basic.get`).
    consumer: Option<Arc<str>>,
}

#[derive(Debug)]
struct ConsumerEntry {
    queue: QueueHandle,
    credit: Arc<Credit>,
}

/// What a published message waits for in one queue it went to.
///
/// On a channel with confirms (or a transaction) a publish that no leader
/// took is made at the queue's next leader (`Republish`): the queue had no
/// reachable leader when the message came, or the session it went to never
/// reached its node. The publisher's confirm then waits through a failover
/// instead of being a nack. A message a leader may have taken is never offered
/// again: that leader may have committed it, and nothing deduplicates a second
/// copy; its confirm is a nack if the leader is lost. The confirm loop awaits
/// outcomes in publish order; a message made again at the next leader may
/// still land after a later one that went there directly (as a nacked
/// message its publisher sends again would).
enum Wait {
    /// Its offset committed in a partition this node leads.
    Log(Leadership, i64),
    /// The leader's answer, through a peer session; with the way to make it
    /// again if that session never reached the leader.
    Peer(PublishAnswer, Option<Box<(RemoteQueue, Arc<Republish>)>>),
    /// No leader took it yet.
    Again(Arc<Republish>),
}

impl std::fmt::Debug for Wait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Wait::Log(_, end) => write!(f, "Wait::Log(..{end})"),
            Wait::Peer(..) => write!(f, "Wait::Peer"),
            Wait::Again(_) => write!(f, "Wait::Again"),
        }
    }
}

impl Wait {
    /// Stored (`Ok(true)`), refused by a full queue (`Ok(false)`), or not known
    /// to be durable (`Err`).
    async fn outcome(&self) -> Result<bool, ()> {
        match self {
            Wait::Log(l, end) => l
                .wait_committed(*end, None)
                .await
                .map(|_| true)
                .map_err(|_| ()),
            Wait::Peer(answer, unsent) => match (answer.clone().await, unsent) {
                (Err(()), Some(u)) if !u.0.reached_leader() => u.1.clone().run().await,
                (outcome, _) => outcome,
            },
            Wait::Again(r) => r.clone().run().await,
        }
    }

    fn is_stored(&self) -> bool {
        match self {
            Wait::Log(l, end) => l.is_current() && l.partition().high_watermark() >= *end,
            Wait::Peer(answer, _) => matches!(answer.peek(), Some(Ok(true))),
            Wait::Again(_) => false,
        }
    }
}

/// How long a publish waits for a queue's next leader before its confirm is a
/// nack: longer than a failover (a silent leader is fenced after 6 s, and a
/// new one elected at once).
const REPUBLISH_FOR: Duration = Duration::from_secs(15);
const REPUBLISH_EVERY: Duration = Duration::from_millis(250);

/// A message to store in a queue that has no reachable leader yet.
pub(crate) struct Republish {
    broker: Arc<crate::Broker>,
    vhost: Arc<str>,
    queue: Arc<str>,
    publication: Arc<Publication>,
    since: Instant,
}

impl Republish {
    /// Tries at whichever node leads the queue now until one takes the
    /// message; its answer is the outcome. Nobody taking it within
    /// `REPUBLISH_FOR` is `Err` (the confirm is a nack). Once a leader has the
    /// message it is never offered again: that could store it twice.
    async fn run(self: Arc<Self>) -> Result<bool, ()> {
        let mut first = true;
        loop {
            if !std::mem::take(&mut first) {
                tokio::time::sleep(REPUBLISH_EVERY).await;
            }
            if self.since.elapsed() >= REPUBLISH_FOR {
                return Err(());
            }
            let handle = match self.broker.queue_for_message(
                crate::NODE_SESSION,
                &self.vhost,
                &self.queue,
                &self.publication.routing_key,
            ) {
                Ok(h) => h,
                // No leader yet, or it is not reachable: try again.
                Err(e) if e.retriable => continue,
                // The queue is gone.
                Err(_) => return Err(()),
            };
            let p = &*self.publication;
            match handle {
                QueueHandle::Here(link) => {
                    let Ok(batch) = encode_batch(&[p]) else {
                        return Err(());
                    };
                    match self.broker.append_here(&link, p, &batch, true) {
                        Ok(Some((l, end))) => {
                            return l
                                .wait_committed(end, None)
                                .await
                                .map(|_| true)
                                .map_err(|_| ())
                        }
                        Ok(None) => return Ok(false),
                        // Not appended; the log refused it: a nack.
                        Err(_) => return Err(()),
                    }
                }
                QueueHandle::There(remote) => {
                    let answer = remote.publish(p).await;
                    if answer.is_err() && !remote.reached_leader() {
                        // The session never reached that node: try again.
                        continue;
                    }
                    return answer;
                }
            }
        }
    }
}

/// Published messages (sequence numbers `first..=seq`) waiting for the queues
/// they went to.
struct ConfirmJob {
    first: u64,
    seq: u64,
    waits: Vec<Wait>,
    /// A full queue refused it: the confirm is a nack.
    refused: bool,
}

#[derive(Debug)]
pub(crate) struct Channel {
    state: State,
    pending: Option<Pending>,
    confirms: Option<mpsc::UnboundedSender<ConfirmJob>>,
    /// `tx.select`ed: publishes and settlements wait for `tx.commit`.
    tx: Option<TxWork>,
    next_seq: u64,
    /// Publishes without confirms not yet known to be committed: the channel's
    /// (and its connection's) `close-ok` waits for them, so a client that
    /// closed finds its messages in the queue from any other connection.
    unconfirmed: Vec<Wait>,
    next_tag: u64,
    unacked: BTreeMap<u64, Unacked>,
    consumers: HashMap<Arc<str>, ConsumerEntry>,
    /// `basic.qos` with global=false: the window of consumers started later.
    prefetch: u16,
    /// `basic.qos` with global=true: one window for the whole channel.
    shared: Arc<Credit>,
}

impl std::fmt::Debug for ConfirmJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ConfirmJob({}..={})", self.first, self.seq)
    }
}

impl Channel {
    fn new() -> Channel {
        Channel {
            state: State::Open,
            pending: None,
            confirms: None,
            tx: None,
            next_seq: 1,
            unconfirmed: Vec::new(),
            next_tag: 1,
            unacked: BTreeMap::new(),
            consumers: HashMap::new(),
            prefetch: 0,
            shared: Arc::new(Credit::default()),
        }
    }
}

/// Resolves confirm jobs in publish order and tells the connection, one
/// `multiple` acknowledgement for every run that completed together.
async fn confirm_loop(
    channel: u16,
    mut jobs: mpsc::UnboundedReceiver<ConfirmJob>,
    notices: mpsc::UnboundedSender<Notice>,
) {
    while let Some(job) = jobs.recv().await {
        let mut ok = !job.refused && wait_all(&job.waits).await;
        let mut last = job.seq;
        let mut multiple = job.first < job.seq;
        // Jobs already committed join this acknowledgement.
        while ok {
            match jobs.try_recv() {
                Ok(next) if !next.refused && committed(&next.waits) => {
                    last = next.seq;
                    multiple = true;
                }
                Ok(next) => {
                    send_confirm(&notices, channel, last, multiple, true);
                    ok = !next.refused && wait_all(&next.waits).await;
                    last = next.seq;
                    multiple = next.first < next.seq;
                }
                Err(_) => break,
            }
        }
        if notices
            .send(Notice::Confirm {
                channel,
                seq: last,
                multiple,
                ack: ok,
            })
            .is_err()
        {
            return;
        }
    }
}

fn send_confirm(
    notices: &mpsc::UnboundedSender<Notice>,
    channel: u16,
    seq: u64,
    multiple: bool,
    ack: bool,
) {
    let _ = notices.send(Notice::Confirm {
        channel,
        seq,
        multiple,
        ack,
    });
}

/// Whether every queue stored the message (a confirm's ack).
async fn wait_all(waits: &[Wait]) -> bool {
    for w in waits {
        if w.outcome().await != Ok(true) {
            return false;
        }
    }
    true
}

/// Whether every queue's answer is known and none failed (a full queue's
/// refusal is an answer: the message is dropped there, as RabbitMQ drops it).
async fn wait_known(waits: &[Wait]) -> bool {
    for w in waits {
        if w.outcome().await.is_err() {
            return false;
        }
    }
    true
}

fn committed(waits: &[Wait]) -> bool {
    waits.iter().all(Wait::is_stored)
}

/// One publish round's ways to a queue, by partition of its topic (a stream
/// over a Kafka topic is appended to where each partition is led), each found
/// on first use.
struct QueueTargets {
    handles: Vec<Option<Result<QueueHandle, AmqpError>>>,
}

impl QueueTargets {
    fn new(partitions: usize) -> QueueTargets {
        QueueTargets {
            handles: vec![None; partitions.max(1)],
        }
    }
}

/// Messages bound for one partition this node leads, appended together.
struct LocalBatch {
    link: QueueLink,
    leadership: Leadership,
    /// Indices of the messages, in order.
    members: Vec<usize>,
}

impl LocalBatch {
    fn is_for(&self, l: &Leadership) -> bool {
        Arc::ptr_eq(self.leadership.partition(), l.partition())
            && self.leadership.epoch() == l.epoch()
    }
}

/// Bytes of messages one appended batch holds at most, unless one message is
/// larger on its own.
const BATCH_BYTES: usize = 1024 * 1024;

/// Splits `members` into runs of at most `BATCH_BYTES` by `size`, in order;
/// a message larger than that is a run of its own.
fn chunks(members: &[usize], size: impl Fn(usize) -> usize) -> Vec<&[usize]> {
    let mut runs = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (k, &i) in members.iter().enumerate() {
        let s = size(i);
        if k > start && bytes + s > BATCH_BYTES {
            runs.push(&members[start..k]);
            (start, bytes) = (k, 0);
        }
        bytes += s;
    }
    if start < members.len() {
        runs.push(&members[start..]);
    }
    runs
}

/// Adds `more` to `waits`; a wait for a partition's commit covers every
/// earlier offset of the same leadership, so one per leadership is kept.
fn merge_waits(waits: &mut Vec<Wait>, more: Vec<Wait>) {
    for w in more {
        if let Wait::Log(l, end) = &w {
            let same = waits.iter_mut().find_map(|x| match x {
                Wait::Log(xl, xend)
                    if Arc::ptr_eq(xl.partition(), l.partition()) && xl.epoch() == l.epoch() =>
                {
                    Some(xend)
                }
                _ => None,
            });
            if let Some(xend) = same {
                *xend = (*xend).max(*end);
                continue;
            }
        }
        waits.push(w);
    }
}

fn method(out: &mut Vec<u8>, ch: u16, m: AMQPClass) {
    put_method(out, ch, m);
}

impl Conn {
    /// The queue as [`crate::Broker::queue_for`] finds it, waiting (at most
    /// `LEADER_MOVE_WAIT`) while it is between leaders: a node that just
    /// restarted, or a failover, hands its leadership over in a moment.
    async fn queue_settled(&self, vhost: &str, name: &str) -> Result<QueueHandle, AmqpError> {
        let deadline = tokio::time::Instant::now() + LEADER_MOVE_WAIT;
        loop {
            match self.broker.queue_for(self.id, vhost, name) {
                Err(e) if e.retriable && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(LEADER_MOVE_RETRY).await;
                }
                found => return found,
            }
        }
    }

    fn send_method(&mut self, ch: u16, m: AMQPClass) {
        let mut buf = Vec::new();
        method(&mut buf, ch, m);
        self.out.send(buf);
    }

    /// Writes a message: the method, its content header, its body in frames.
    fn send_content(&mut self, ch: u16, m: AMQPClass, properties: AMQPProperties, body: &Bytes) {
        let chunk = self.body_chunk();
        self.out.frames(|buf| {
            buf.reserve(body.len() + 256);
            method(buf, ch, m);
            put_header(buf, ch, body.len() as u64, &properties);
            for part in body.chunks(chunk) {
                put_body(buf, ch, part);
            }
        });
    }

    pub(crate) async fn on_channel_method(
        &mut self,
        ch: u16,
        m: AMQPClass,
        events: &mpsc::Sender<Event>,
        notices: &mpsc::UnboundedSender<Notice>,
    ) -> Result<(), AmqpError> {
        self.check_channel_id(ch)?;
        match (&m, self.channels.get(&ch).map(|c| &c.state)) {
            (AMQPClass::Channel(channel::AMQPMethod::Open(_)), None) => {
                self.channels.insert(ch, Channel::new());
                self.send_method(
                    ch,
                    AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
                );
                return Ok(());
            }
            (AMQPClass::Channel(channel::AMQPMethod::Open(_)), Some(_)) => {
                return Err(AmqpError::channel_error("second 'channel.open' seen").on(&m));
            }
            (_, None) => {
                return Err(AmqpError::channel_error("expected 'channel.open'").on(&m));
            }
            (AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)), Some(State::Closing)) => {
                self.channels.remove(&ch);
                return Ok(());
            }
            (AMQPClass::Channel(channel::AMQPMethod::Close(_)), Some(_)) => {
                self.settle_unconfirmed(Some(ch)).await;
                self.release_channel(ch);
                self.channels.remove(&ch);
                self.send_method(
                    ch,
                    AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                );
                return Ok(());
            }
            (_, Some(State::Closing)) => return Ok(()),
            (_, Some(State::Open)) => {}
        }
        if self.channels.get(&ch).is_some_and(|c| c.pending.is_some()) {
            return Err(AmqpError::unexpected_frame(
                "expected content header for class 60, got non content header frame instead",
            )
            .on(&m));
        }
        let r = match &m {
            // The hot path, without the general dispatch's awaits.
            AMQPClass::Basic(basic::AMQPMethod::Publish(p)) if self.permitted => {
                self.on_publish(ch, p)
            }
            _ => self.dispatch(ch, &m, events, notices).await,
        };
        match r {
            Err(e) if !e.is_hard() => {
                self.close_channel(ch, &e.on(&m));
                Ok(())
            }
            Err(e) if e.class_id == 0 => Err(e.on(&m)),
            other => other,
        }
    }

    /// Waits (bounded) until the publishes without confirms of one channel, or
    /// of every channel, are committed: what a client sent before its close is
    /// in the queue once the close is answered.
    pub(crate) async fn settle_unconfirmed(&mut self, ch: Option<u16>) {
        let mut waits = Vec::new();
        for (id, c) in self.channels.iter_mut() {
            if ch.is_none_or(|ch| ch == *id) {
                waits.append(&mut c.unconfirmed);
            }
        }
        if !waits.is_empty() {
            let _ = tokio::time::timeout(CLOSE_SETTLE, wait_known(&waits)).await;
        }
    }

    /// Closes one channel with a soft error.
    pub(crate) fn close_channel(&mut self, ch: u16, e: &AmqpError) {
        tracing::debug!(
            channel = ch,
            code = e.reply_code(),
            "closing AMQP channel: {}",
            e.text
        );
        self.release_channel(ch);
        if let Some(c) = self.channels.get_mut(&ch) {
            c.state = State::Closing;
        }
        self.send_method(
            ch,
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: e.reply_code(),
                reply_text: short(&e.text),
                class_id: e.class_id,
                method_id: e.method_id,
            })),
        );
    }

    /// A channel ends: its unacked messages return to their queues, its consumers
    /// go, its confirm task stops.
    pub(crate) fn release_channel(&mut self, ch: u16) {
        let Some(c) = self.channels.get_mut(&ch) else {
            return;
        };
        let mut unacked: Vec<Unacked> = std::mem::take(&mut c.unacked).into_values().collect();
        // Settlements of an uncommitted transaction never happened.
        if let Some(tx) = c.tx.take() {
            unacked.extend(tx.settles.into_iter().map(|(u, _)| u));
        }
        let consumers = std::mem::take(&mut c.consumers);
        c.pending = None;
        c.confirms = None;
        let mut detached: Vec<QueueHandle> = Vec::new();
        for (_, e) in consumers {
            if !detached.contains(&e.queue) {
                e.queue.detach(self.id, Some(ch));
                detached.push(e.queue);
            }
        }
        settle(unacked.into_iter(), Outcome::Requeue);
    }

    async fn dispatch(
        &mut self,
        ch: u16,
        m: &AMQPClass,
        events: &mpsc::Sender<Event>,
        notices: &mpsc::UnboundedSender<Notice>,
    ) -> Result<(), AmqpError> {
        if !self.permitted {
            if let Some((kind, name)) = resource_of(m) {
                return Err(AmqpError::access_refused(format!(
                    "access to {kind} '{name}' in vhost '{}' refused for user '{}'",
                    self.vhost,
                    self.user()
                )));
            }
        }
        match m {
            AMQPClass::Channel(channel::AMQPMethod::Flow(f)) => {
                if !f.active {
                    return Err(AmqpError::not_implemented("active=false"));
                }
                self.send_method(
                    ch,
                    AMQPClass::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk {
                        active: true,
                    })),
                );
                Ok(())
            }
            AMQPClass::Channel(_) => Err(AmqpError::command_invalid("unexpected channel method")),
            AMQPClass::Access(_) => {
                self.send_method(
                    ch,
                    AMQPClass::Access(amq_protocol::protocol::access::AMQPMethod::RequestOk(
                        amq_protocol::protocol::access::RequestOk {},
                    )),
                );
                Ok(())
            }
            AMQPClass::Exchange(e) => self.on_exchange(ch, e).await,
            AMQPClass::Queue(q) => self.on_queue(ch, q).await,
            AMQPClass::Basic(b) => self.on_basic(ch, b, events).await,
            AMQPClass::Confirm(confirm::AMQPMethod::Select(s)) => {
                let c = self.channel(ch)?;
                if c.tx.is_some() {
                    return Err(AmqpError::precondition(
                        "cannot switch from tx to confirm mode",
                    ));
                }
                if c.confirms.is_none() {
                    let (tx, rx) = mpsc::unbounded_channel();
                    tokio::spawn(confirm_loop(ch, rx, notices.clone()));
                    c.confirms = Some(tx);
                }
                if !s.nowait {
                    self.send_method(
                        ch,
                        AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
                    );
                }
                Ok(())
            }
            AMQPClass::Confirm(_) => Err(AmqpError::command_invalid("unexpected confirm method")),
            AMQPClass::Tx(t) => self.on_tx(ch, t).await,
            AMQPClass::Connection(_) => {
                Err(AmqpError::command_invalid("connection method on a channel"))
            }
        }
    }

    fn channel(&mut self, ch: u16) -> Result<&mut Channel, AmqpError> {
        self.channels
            .get_mut(&ch)
            .ok_or_else(|| AmqpError::channel_error("expected 'channel.open'"))
    }

    // ---------------------------------------------------------------- exchanges

    async fn on_exchange(&mut self, ch: u16, m: &exchange::AMQPMethod) -> Result<(), AmqpError> {
        let vhost = self.vhost.clone();
        let (reply, nowait) = match m {
            exchange::AMQPMethod::Declare(d) => {
                let declaration = ExchangeDeclaration {
                    name: d.exchange.as_str(),
                    kind: d.kind.as_str(),
                    passive: d.passive,
                    durable: d.durable,
                    auto_delete: d.auto_delete,
                    internal: d.internal,
                    arguments: &d.arguments,
                };
                self.broker.declare_exchange(&vhost, declaration).await?;
                (
                    exchange::AMQPMethod::DeclareOk(exchange::DeclareOk {}),
                    d.nowait,
                )
            }
            exchange::AMQPMethod::Delete(d) => {
                self.broker
                    .delete_exchange(&vhost, d.exchange.as_str(), d.if_unused)
                    .await?;
                (
                    exchange::AMQPMethod::DeleteOk(exchange::DeleteOk {}),
                    d.nowait,
                )
            }
            exchange::AMQPMethod::Bind(b) => {
                let destination = Destination::Exchange(b.destination.as_str().to_owned());
                let binding = binding(&b.source, destination, &b.routing_key, &b.arguments);
                self.broker.bind(&vhost, binding, self.who()).await?;
                (exchange::AMQPMethod::BindOk(exchange::BindOk {}), b.nowait)
            }
            exchange::AMQPMethod::Unbind(b) => {
                let destination = Destination::Exchange(b.destination.as_str().to_owned());
                let binding = binding(&b.source, destination, &b.routing_key, &b.arguments);
                self.broker.unbind(&vhost, binding).await?;
                (
                    exchange::AMQPMethod::UnbindOk(exchange::UnbindOk {}),
                    b.nowait,
                )
            }
            _ => return Err(AmqpError::command_invalid("unexpected exchange method")),
        };
        if !nowait {
            self.send_method(ch, AMQPClass::Exchange(reply));
        }
        Ok(())
    }

    // ------------------------------------------------------------------- queues

    /// This connection, as exclusive queues know it.
    fn who(&self) -> Who<'_> {
        Who::Connection {
            owner: &self.owner,
            id: self.id,
        }
    }

    async fn on_queue(&mut self, ch: u16, m: &queue::AMQPMethod) -> Result<(), AmqpError> {
        let vhost = self.vhost.clone();
        let (reply, nowait) = match m {
            queue::AMQPMethod::Declare(d) => {
                let declaration = QueueDeclaration {
                    name: d.queue.as_str(),
                    passive: d.passive,
                    durable: d.durable,
                    exclusive: d.exclusive,
                    auto_delete: d.auto_delete,
                    arguments: &d.arguments,
                };
                let declared = self
                    .broker
                    .declare_queue(&vhost, declaration, self.who())
                    .await?;
                if declared.created && d.exclusive {
                    self.exclusive_queues.push(declared.name.clone());
                }
                let ok = queue::DeclareOk {
                    queue: short(&declared.name),
                    message_count: declared.status.ready,
                    consumer_count: declared.status.consumers,
                };
                (queue::AMQPMethod::DeclareOk(ok), d.nowait)
            }
            queue::AMQPMethod::Bind(b) => {
                let destination = Destination::Queue(b.queue.as_str().to_owned());
                let binding = binding(&b.exchange, destination, &b.routing_key, &b.arguments);
                self.broker.bind(&vhost, binding, self.who()).await?;
                (queue::AMQPMethod::BindOk(queue::BindOk {}), b.nowait)
            }
            queue::AMQPMethod::Unbind(b) => {
                let destination = Destination::Queue(b.queue.as_str().to_owned());
                let binding = binding(&b.exchange, destination, &b.routing_key, &b.arguments);
                self.broker.unbind(&vhost, binding).await?;
                (queue::AMQPMethod::UnbindOk(queue::UnbindOk {}), false)
            }
            queue::AMQPMethod::Purge(p) => {
                let purged = self
                    .broker
                    .purge_queue(&vhost, p.queue.as_str(), self.who())
                    .await?;
                let ok = queue::PurgeOk {
                    message_count: purged,
                };
                (queue::AMQPMethod::PurgeOk(ok), p.nowait)
            }
            queue::AMQPMethod::Delete(d) => {
                let name = d.queue.as_str();
                let count = self
                    .broker
                    .delete_queue_checked(&vhost, name, d.if_unused, d.if_empty, self.who())
                    .await?;
                self.exclusive_queues.retain(|q| q != name);
                let ok = queue::DeleteOk {
                    message_count: count,
                };
                (queue::AMQPMethod::DeleteOk(ok), d.nowait)
            }
            _ => return Err(AmqpError::command_invalid("unexpected queue method")),
        };
        if !nowait {
            self.send_method(ch, AMQPClass::Queue(reply));
        }
        Ok(())
    }

    // -------------------------------------------------------------------- basic

    /// `basic.publish`: checks the exchange and waits for the content.
    fn on_publish(&mut self, ch: u16, p: &basic::Publish) -> Result<(), AmqpError> {
        if p.immediate {
            return Err(AmqpError::not_implemented("immediate=true"));
        }
        let exchange = p.exchange.as_str();
        if !exchange.is_empty() {
            let vhost = &self.vhost;
            let image = self.broker.topology.image();
            let v = image.vhost(vhost);
            let predeclared = sluice_topology::amqp::PREDECLARED_EXCHANGES
                .iter()
                .any(|(n, _)| *n == exchange);
            if !predeclared && !v.is_some_and(|v| v.has_exchange(exchange)) {
                return Err(no_exchange(vhost, exchange));
            }
            if v.and_then(|v| v.exchanges.get(exchange))
                .is_some_and(|e| e.internal)
            {
                return Err(AmqpError::access_refused(format!(
                    "cannot publish to internal exchange '{exchange}' in vhost '{vhost}'"
                )));
            }
        }
        self.channel(ch)?.pending = Some(Pending {
            exchange: exchange.to_owned(),
            routing_key: p.routing_key.as_str().to_owned(),
            mandatory: p.mandatory,
            header: None,
            body: Bytes::new(),
            more: Vec::new(),
            received: 0,
        });
        Ok(())
    }

    async fn on_basic(
        &mut self,
        ch: u16,
        m: &basic::AMQPMethod,
        events: &mpsc::Sender<Event>,
    ) -> Result<(), AmqpError> {
        let vhost = self.vhost.clone();
        match m {
            basic::AMQPMethod::Qos(q) => {
                let c = self.channel(ch)?;
                if q.global {
                    c.shared
                        .limit
                        .store(u32::from(q.prefetch_count), Ordering::Release);
                    crate::peer::shared_limit_changed(
                        &self.broker.sessions_of(self.id),
                        ch,
                        u32::from(q.prefetch_count),
                    );
                } else {
                    c.prefetch = q.prefetch_count;
                }
                self.send_method(
                    ch,
                    AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})),
                );
                Ok(())
            }
            basic::AMQPMethod::Publish(p) => self.on_publish(ch, p),
            basic::AMQPMethod::Consume(c) => {
                let name = c.queue.as_str();
                self.broker.queue_state(&vhost, name, self.who())?;
                let link = self.queue_settled(&vhost, name).await?;
                let start = if link.is_stream() {
                    StreamStart::parse(&c.arguments)?
                } else {
                    StreamStart::default()
                };
                let tag: Arc<str> = if c.consumer_tag.as_str().is_empty() {
                    Arc::from(format!("amq.ctag-{}", uuid::Uuid::new_v4().simple()))
                } else {
                    Arc::from(c.consumer_tag.as_str())
                };
                let chan = self.channel(ch)?;
                if chan.consumers.contains_key(&tag) {
                    return Err(AmqpError::not_allowed(format!(
                        "attempt to reuse consumer tag '{tag}'"
                    )));
                }
                let credit = Arc::new(Credit::default());
                credit
                    .limit
                    .store(u32::from(chan.prefetch), Ordering::Release);
                let shared = chan.shared.clone();
                chan.consumers.insert(
                    tag.clone(),
                    ConsumerEntry {
                        queue: link.clone(),
                        credit: credit.clone(),
                    },
                );
                // consume-ok goes out before any delivery: deliveries reach this
                // task through `events`, after this method is handled.
                let spec = ConsumerSpec {
                    connection: self.id,
                    channel: ch,
                    tag: tag.clone(),
                    exclusive: c.exclusive,
                    no_ack: c.no_ack,
                    own: credit,
                    shared,
                    events: events.clone(),
                    start,
                };
                let mut consumed = link.consume(spec.clone()).await;
                let deadline = tokio::time::Instant::now() + LEADER_MOVE_WAIT;
                while consumed.as_ref().is_err_and(|e| e.retriable)
                    && tokio::time::Instant::now() < deadline
                {
                    // The queue's leadership moved under the consume: again,
                    // at its leader now.
                    tokio::time::sleep(LEADER_MOVE_RETRY).await;
                    let Ok(fresh) = self.broker.queue_for(self.id, &vhost, name) else {
                        continue;
                    };
                    if let Some(e) = self
                        .channels
                        .get_mut(&ch)
                        .and_then(|c| c.consumers.get_mut(&tag))
                    {
                        e.queue = fresh.clone();
                    }
                    consumed = fresh.consume(spec.clone()).await;
                }
                if let Err(e) = consumed {
                    if let Some(chan) = self.channels.get_mut(&ch) {
                        chan.consumers.remove(&tag);
                    }
                    return Err(e);
                }
                if !c.nowait {
                    self.send_method(
                        ch,
                        AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                            consumer_tag: short(&tag),
                        })),
                    );
                }
                Ok(())
            }
            basic::AMQPMethod::Cancel(c) => {
                let tag: Arc<str> = Arc::from(c.consumer_tag.as_str());
                if let Some(e) = self.channel(ch)?.consumers.remove(&tag) {
                    e.queue.cancel(self.id, ch, tag.clone());
                }
                if !c.nowait {
                    self.send_method(
                        ch,
                        AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                            consumer_tag: c.consumer_tag.clone(),
                        })),
                    );
                }
                Ok(())
            }
            basic::AMQPMethod::Get(g) => {
                let name = g.queue.as_str();
                self.broker.queue_state(&vhost, name, self.who())?;
                let mut link = self.queue_settled(&vhost, name).await?;
                let mut got = link.get(g.no_ack).await;
                let deadline = tokio::time::Instant::now() + LEADER_MOVE_WAIT;
                while got.as_ref().is_err_and(|e| e.retriable)
                    && tokio::time::Instant::now() < deadline
                {
                    tokio::time::sleep(LEADER_MOVE_RETRY).await;
                    if let Ok(fresh) = self.broker.queue_for(self.id, &vhost, name) {
                        link = fresh;
                        got = link.get(g.no_ack).await;
                    }
                }
                match got? {
                    None => self.send_method(
                        ch,
                        AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {})),
                    ),
                    Some(got) => {
                        let chan = self.channel(ch)?;
                        let tag = chan.next_tag;
                        chan.next_tag += 1;
                        if !g.no_ack {
                            chan.unacked.insert(
                                tag,
                                Unacked {
                                    queue: link,
                                    offset: got.message.offset,
                                    consumer: None,
                                },
                            );
                        }
                        let Stored {
                            exchange,
                            routing_key,
                            properties,
                            body,
                            ..
                        } = got.message;
                        self.send_content(
                            ch,
                            AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
                                delivery_tag: tag,
                                redelivered: got.redelivered,
                                exchange: short(&exchange),
                                routing_key: short(&routing_key),
                                message_count: got.remaining,
                            })),
                            properties,
                            &body,
                        );
                    }
                }
                Ok(())
            }
            basic::AMQPMethod::Ack(a) => {
                self.settle_tags(ch, a.delivery_tag, a.multiple, Outcome::Ack)
            }
            basic::AMQPMethod::Nack(n) => {
                let outcome = if n.requeue {
                    Outcome::Requeue
                } else {
                    Outcome::Reject
                };
                self.settle_tags(ch, n.delivery_tag, n.multiple, outcome)
            }
            basic::AMQPMethod::Reject(r) => {
                let outcome = if r.requeue {
                    Outcome::Requeue
                } else {
                    Outcome::Reject
                };
                self.settle_tags(ch, r.delivery_tag, false, outcome)
            }
            basic::AMQPMethod::Recover(_) | basic::AMQPMethod::RecoverAsync(_) => {
                let chan = self.channel(ch)?;
                let unacked = std::mem::take(&mut chan.unacked);
                release_credit(chan, unacked.values());
                settle(unacked.into_values(), Outcome::Requeue);
                if matches!(m, basic::AMQPMethod::Recover(_)) {
                    self.send_method(
                        ch,
                        AMQPClass::Basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {})),
                    );
                }
                Ok(())
            }
            _ => Err(AmqpError::command_invalid("unexpected basic method")),
        }
    }

    /// ack / nack / reject of one tag, or of every tag up to it with `multiple`.
    /// In a transaction they take effect at `tx.commit`.
    fn settle_tags(
        &mut self,
        ch: u16,
        tag: u64,
        multiple: bool,
        outcome: Outcome,
    ) -> Result<(), AmqpError> {
        let broker = self.broker.clone();
        let chan = self.channel(ch)?;
        let settled: Vec<(u64, Unacked)> = if multiple {
            let keep = if tag == 0 {
                BTreeMap::new()
            } else {
                chan.unacked.split_off(&(tag + 1))
            };
            let done = std::mem::replace(&mut chan.unacked, keep);
            if tag != 0 && done.is_empty() {
                return Err(AmqpError::precondition(format!(
                    "unknown delivery tag {tag}"
                )));
            }
            done.into_iter().collect()
        } else {
            match chan.unacked.remove(&tag) {
                Some(u) => vec![(tag, u)],
                None => {
                    return Err(AmqpError::precondition(format!(
                        "unknown delivery tag {tag}"
                    )))
                }
            }
        };
        if outcome != Outcome::Ack {
            // A deleted queue's deliveries settle as nothing, as on RabbitMQ
            // (a client rejects what its cancelled consumer still had).
            let refused = settled.iter().find(|(_, u)| {
                u.queue.is_stream() && broker.declares(u.queue.vhost(), u.queue.name())
            });
            if let Some((_, u)) = refused {
                return Err(AmqpError::not_implemented(format!(
                    "basic.nack and basic.reject not supported by stream queues queue '{}' in vhost '{}'",
                    u.queue.name(), u.queue.vhost()
                )));
            }
        }
        if let Some(tx) = chan.tx.as_mut() {
            for (tag, u) in settled {
                tx.settle_tags.push(tag);
                tx.settles.push((u, outcome));
            }
            return Ok(());
        }
        if outcome == Outcome::Ack {
            // Settled with the other acks of the same read (`store_staged`):
            // one message to each queue instead of one per ack.
            self.staged_acks
                .extend(settled.into_iter().map(|(_, u)| (ch, u)));
            return Ok(());
        }
        release_credit(chan, settled.iter().map(|(_, u)| u));
        settle(settled.into_iter().map(|(_, u)| u), outcome);
        Ok(())
    }

    // ------------------------------------------------------------------ content

    pub(crate) fn on_content_header(
        &mut self,
        ch: u16,
        header: AMQPContentHeader,
        raw_properties: Bytes,
    ) -> Result<(), AmqpError> {
        self.check_channel_id(ch)?;
        let max = self.broker.config.max_message_bytes;
        let Some(chan) = self.channels.get_mut(&ch) else {
            return Err(AmqpError::channel_error("expected 'channel.open'"));
        };
        if chan.state == State::Closing {
            return Ok(());
        }
        let Some(p) = chan.pending.as_mut().filter(|p| p.header.is_none()) else {
            return Err(AmqpError::unexpected_frame(
                "content header without a preceding basic.publish",
            ));
        };
        if header.class_id != 60 {
            return Err(AmqpError::unexpected_frame(format!(
                "content header for class {}",
                header.class_id
            )));
        }
        if header.body_size > max {
            return Err(AmqpError::precondition(format!(
                "message size {} is larger than configured max size {max}",
                header.body_size
            )));
        }
        p.header = Some((header.body_size, header.properties, raw_properties));
        if header.body_size == 0 {
            return self.publish(ch);
        }
        Ok(())
    }

    pub(crate) fn on_content_body(&mut self, ch: u16, body: Bytes) -> Result<(), AmqpError> {
        self.check_channel_id(ch)?;
        let Some(chan) = self.channels.get_mut(&ch) else {
            return Err(AmqpError::channel_error("expected 'channel.open'"));
        };
        if chan.state == State::Closing {
            return Ok(());
        }
        let Some(p) = chan.pending.as_mut() else {
            return Err(AmqpError::unexpected_frame(
                "content body without a basic.publish",
            ));
        };
        let Some((size, ..)) = p.header else {
            return Err(AmqpError::unexpected_frame(
                "content body before its header",
            ));
        };
        let first = p.received == 0;
        p.received += body.len() as u64;
        if p.received > size {
            return Err(AmqpError::frame_error(format!(
                "content body of {} bytes exceeds the declared {size}",
                p.received
            )));
        }
        if first {
            p.body = body;
        } else {
            p.more.push(body);
        }
        if p.received == size {
            return self.publish(ch);
        }
        Ok(())
    }

    /// A whole message arrived: route it, append it to every queue it reaches,
    /// return it when mandatory and unroutable, and queue its confirm.
    fn publish(&mut self, ch: u16) -> Result<(), AmqpError> {
        let Some(chan) = self.channels.get_mut(&ch) else {
            return Ok(());
        };
        let Some(p) = chan.pending.take() else {
            return Ok(());
        };
        let Some((_, properties, raw_properties)) = p.header else {
            return Ok(());
        };
        let body = if p.more.is_empty() {
            p.body
        } else {
            let mut b = BytesMut::with_capacity(usize::try_from(p.received).unwrap_or(0));
            for part in std::iter::once(&p.body).chain(&p.more) {
                b.extend_from_slice(part);
            }
            b.freeze()
        };
        let message = Message {
            publication: Publication {
                exchange: p.exchange,
                routing_key: p.routing_key,
                properties: raw_properties,
                body,
            },
            properties,
            mandatory: p.mandatory,
        };
        // In a transaction the message waits for tx.commit.
        if let Some(tx) = chan.tx.as_mut() {
            tx.publishes.push(message);
            return Ok(());
        }
        let seq = if chan.confirms.is_some() {
            let s = chan.next_seq;
            chan.next_seq += 1;
            Some(s)
        } else {
            None
        };
        // Stored with the other publishes of the same read (`store_staged`).
        self.staged.push((ch, seq, message));
        Ok(())
    }

    /// Settles the acks staged since the last call. Stores the publishes
    /// staged since the last call, in order, and queues
    /// their confirms: a run of one channel's messages that are all stored is
    /// one confirm job (one `multiple` acknowledgement).
    pub(crate) fn store_staged(&mut self) {
        if !self.staged_acks.is_empty() {
            let acks = std::mem::take(&mut self.staged_acks);
            for (ch, u) in &acks {
                if let Some(c) = self.channels.get(ch) {
                    release_credit(c, std::iter::once(u));
                }
            }
            settle(acks.into_iter().map(|(_, u)| u), Outcome::Ack);
        }
        if self.staged.is_empty() {
            return;
        }
        let staged = std::mem::take(&mut self.staged);
        let mut keys = Vec::with_capacity(staged.len());
        let messages = staged
            .into_iter()
            .map(|(ch, seq, m)| {
                keys.push((ch, seq));
                (ch, m)
            })
            .collect();
        let results = self.store_all(messages);
        let mut run: Option<(u16, ConfirmJob)> = None;
        for ((ch, seq), result) in keys.into_iter().zip(results) {
            let (waits, refused) = match result {
                Ok(stored) => stored,
                Err(e) => {
                    self.confirm_run(run.take());
                    // As the publish's own error would: its channel closes.
                    if self
                        .channels
                        .get(&ch)
                        .is_some_and(|c| c.state == State::Open)
                    {
                        let e = AmqpError {
                            class_id: 60,
                            method_id: 40,
                            ..e
                        };
                        self.close_channel(ch, &e);
                    }
                    continue;
                }
            };
            let Some(seq) = seq else {
                if let Some(c) = self.channels.get_mut(&ch) {
                    if c.unconfirmed.len() >= UNCONFIRMED_PRUNE {
                        c.unconfirmed.retain(|w| !w.is_stored());
                    }
                    merge_waits(&mut c.unconfirmed, waits);
                }
                continue;
            };
            match &mut run {
                Some((rch, job)) if *rch == ch && !job.refused && !refused => {
                    job.seq = seq;
                    merge_waits(&mut job.waits, waits);
                }
                _ => {
                    self.confirm_run(run.take());
                    run = Some((
                        ch,
                        ConfirmJob {
                            first: seq,
                            seq,
                            waits,
                            refused,
                        },
                    ));
                }
            }
        }
        self.confirm_run(run);
    }

    fn confirm_run(&self, run: Option<(u16, ConfirmJob)>) {
        if let Some((ch, job)) = run {
            if let Some(confirms) = self.channels.get(&ch).and_then(|c| c.confirms.as_ref()) {
                let _ = confirms.send(job);
            }
        }
    }

    /// Routes messages and appends each to every queue it reaches; returns,
    /// per message, what its confirm waits for and whether a full queue
    /// refused it. The messages bound for one partition this node leads go in
    /// one batch, in their order: one append, one commit to wait for. An
    /// unroutable mandatory message goes back to its publisher (`basic.return`).
    fn store_all(
        &mut self,
        messages: Vec<(u16, Message)>,
    ) -> Vec<Result<(Vec<Wait>, bool), AmqpError>> {
        let vhost = self.vhost.clone();
        let router = self.broker.router(&vhost);
        let image = self.broker.topology.image();
        let mut handles: HashMap<String, QueueTargets> = HashMap::new();
        let mut batches: Vec<LocalBatch> = Vec::new();
        let mut results = Vec::with_capacity(messages.len());
        for (i, (ch, m)) in messages.iter().enumerate() {
            // Only a publisher that hears of the outcome waits for a next
            // leader; without confirms a message no leader takes is lost.
            let told = self
                .channels
                .get(ch)
                .is_some_and(|c| c.confirms.is_some() || c.tx.is_some());
            let p = &m.publication;
            let queues = router.route(
                image.vhost(&vhost),
                &p.exchange,
                &p.routing_key,
                m.properties.headers().as_ref(),
            );
            if queues.is_empty() {
                if m.mandatory {
                    self.send_content(
                        *ch,
                        AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                            reply_code: 312,
                            reply_text: "NO_ROUTE".into(),
                            exchange: short(&p.exchange),
                            routing_key: short(&p.routing_key),
                        })),
                        m.properties.clone(),
                        &p.body,
                    );
                }
                results.push(Ok((Vec::new(), false)));
                continue;
            }
            let mut waits = Vec::with_capacity(queues.len());
            let mut refused = false;
            let mut failed = None;
            for q in &queues {
                let republish = || {
                    Arc::new(Republish {
                        broker: self.broker.clone(),
                        vhost: Arc::from(vhost.as_str()),
                        queue: Arc::from(q.as_str()),
                        // Copied only on this rare path, not per message.
                        publication: Arc::new(p.clone()),
                        since: Instant::now(),
                    })
                };
                let targets = match handles.get_mut(q.as_str()) {
                    Some(t) => t,
                    None => handles
                        .entry(q.clone())
                        .or_insert_with(|| QueueTargets::new(self.broker.partitions_of(&vhost, q))),
                };
                let part = crate::queue::partition_for(&p.routing_key, targets.handles.len());
                let handle = targets.handles[part]
                    .get_or_insert_with(|| self.broker.queue_at(self.id, &vhost, q, part));
                let stored = match handle {
                    Ok(QueueHandle::Here(link)) if link.takes_batches() => {
                        match link.leadership_for(&p.routing_key) {
                            Ok(leadership) => {
                                match batches.iter_mut().find(|b| b.is_for(&leadership)) {
                                    Some(b) => b.members.push(i),
                                    None => batches.push(LocalBatch {
                                        link: link.clone(),
                                        leadership: leadership.into_owned(),
                                        members: vec![i],
                                    }),
                                }
                                // Its wait comes with the batch's append.
                                continue;
                            }
                            Err(e) => Err(e),
                        }
                    }
                    Ok(QueueHandle::Here(link)) => encode_batch(&[p])
                        .map_err(|e| AmqpError::internal(format!("cannot encode message: {e}")))
                        .and_then(|batch| self.broker.append_here(link, p, &batch, true))
                        .map(|stored| stored.map(|(leadership, end)| Wait::Log(leadership, end))),
                    Ok(QueueHandle::There(remote)) => {
                        let answer = remote.publish(p);
                        // A session still connecting (to a leader that may be
                        // gone): made again if it never connects.
                        let unsent = (told && !remote.reached_leader())
                            .then(|| Box::new((remote.clone(), republish())));
                        Ok(Some(Wait::Peer(answer, unsent)))
                    }
                    Err(e) => Err(e.clone()),
                };
                match stored {
                    Ok(Some(wait)) => waits.push(wait),
                    // A full queue refused it: the publisher's confirm is a nack.
                    Ok(None) => refused = true,
                    // Between leaders: stored at the next one.
                    Err(e) if told && e.retriable => waits.push(Wait::Again(republish())),
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            results.push(match failed {
                Some(e) => Err(e),
                None => Ok((waits, refused)),
            });
        }
        for b in batches {
            // Messages bound for one partition go in batches of up to
            // `BATCH_BYTES` (or one larger message): the partition's largest
            // batch is sized for one message of the largest body accepted.
            for chunk in chunks(&b.members, |i| messages[i].1.publication.size()) {
                let publications: Vec<&Publication> =
                    chunk.iter().map(|i| &messages[*i].1.publication).collect();
                let appended = encode_batch(&publications)
                    .map_err(|e| AmqpError::internal(format!("cannot encode message: {e}")))
                    .and_then(|batch| {
                        self.broker
                            .append_batch_here(&b.link, &b.leadership, &batch, chunk.len())
                    });
                for &i in chunk {
                    match (&appended, &mut results[i]) {
                        (Ok(end), Ok((waits, _))) => {
                            waits.push(Wait::Log(b.leadership.clone(), *end))
                        }
                        (Err(e), r @ Ok(_)) => *r = Err(e.clone()),
                        (_, Err(_)) => {}
                    }
                }
            }
        }
        results
    }

    // ------------------------------------------------------------ transactions

    async fn on_tx(&mut self, ch: u16, m: &tx::AMQPMethod) -> Result<(), AmqpError> {
        match m {
            tx::AMQPMethod::Select(_) => {
                let c = self.channel(ch)?;
                if c.confirms.is_some() {
                    return Err(AmqpError::precondition(
                        "cannot switch from confirm to tx mode",
                    ));
                }
                c.tx.get_or_insert_with(Default::default);
                self.send_method(ch, AMQPClass::Tx(tx::AMQPMethod::SelectOk(tx::SelectOk {})));
                Ok(())
            }
            tx::AMQPMethod::Commit(_) => {
                let c = self.channel(ch)?;
                let Some(work) = c.tx.as_mut().map(std::mem::take) else {
                    return Err(AmqpError::precondition("channel is not transactional"));
                };
                // Publishes first, all of them durable before the acks count.
                let mut waits = Vec::new();
                let messages = work.publishes.into_iter().map(|m| (ch, m)).collect();
                for stored in self.store_all(messages) {
                    waits.extend(stored?.0);
                }
                if !wait_known(&waits).await {
                    return Err(AmqpError::unavailable(
                        "the transaction's messages could not be made durable",
                    ));
                }
                if let Some(c) = self.channels.get(&ch) {
                    release_credit(c, work.settles.iter().map(|(u, _)| u));
                }
                for outcome in [Outcome::Ack, Outcome::Requeue, Outcome::Reject] {
                    let group = work
                        .settles
                        .iter()
                        .filter(|(_, o)| *o == outcome)
                        .map(|(u, _)| u.clone());
                    settle(group, outcome);
                }
                self.send_method(ch, AMQPClass::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {})));
                Ok(())
            }
            tx::AMQPMethod::Rollback(_) => {
                let c = self.channel(ch)?;
                let Some(work) = c.tx.as_mut().map(std::mem::take) else {
                    return Err(AmqpError::precondition("channel is not transactional"));
                };
                // Discarded acks leave their messages unacknowledged, as before.
                for (tag, (u, _)) in work.settle_tags.into_iter().zip(work.settles) {
                    c.unacked.insert(tag, u);
                }
                self.send_method(
                    ch,
                    AMQPClass::Tx(tx::AMQPMethod::RollbackOk(tx::RollbackOk {})),
                );
                Ok(())
            }
            _ => Err(AmqpError::command_invalid("unexpected tx method")),
        }
    }

    // ---------------------------------------------------------- queue → client

    pub(crate) fn on_event(&mut self, e: Event) {
        match e {
            Event::Deliver {
                channel: ch,
                consumer_tag,
                queue,
                message,
                redelivered,
                no_ack,
            } => {
                let Some(chan) = self
                    .channels
                    .get_mut(&ch)
                    .filter(|c| c.state == State::Open && c.consumers.contains_key(&consumer_tag))
                else {
                    // The consumer went while this was on its way: back to the queue.
                    if !no_ack {
                        queue.settle(vec![message.offset], Outcome::Requeue);
                    }
                    return;
                };
                let tag = chan.next_tag;
                chan.next_tag += 1;
                if !no_ack {
                    chan.unacked.insert(
                        tag,
                        Unacked {
                            queue,
                            offset: message.offset,
                            consumer: Some(consumer_tag.clone()),
                        },
                    );
                }
                let Stored {
                    exchange,
                    routing_key,
                    properties,
                    body,
                    ..
                } = *message;
                self.send_content(
                    ch,
                    AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                        consumer_tag: short(&consumer_tag),
                        delivery_tag: tag,
                        redelivered,
                        // Moved, not copied: the message's own strings.
                        exchange: crate::short_owned(exchange),
                        routing_key: crate::short_owned(routing_key),
                    })),
                    properties,
                    &body,
                );
            }
            Event::Cancelled {
                channel: ch,
                consumer_tag,
            } => {
                let Some(chan) = self.channels.get_mut(&ch) else {
                    return;
                };
                if chan.consumers.remove(&consumer_tag).is_some() && chan.state == State::Open {
                    self.send_method(
                        ch,
                        AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                            consumer_tag: short(&consumer_tag),
                            nowait: true,
                        })),
                    );
                }
            }
        }
    }

    pub(crate) fn on_notice(&mut self, n: Notice) {
        match n {
            Notice::Confirm {
                channel: ch,
                seq,
                multiple,
                ack,
            } => {
                if !self
                    .channels
                    .get(&ch)
                    .is_some_and(|c| c.state == State::Open && c.confirms.is_some())
                {
                    return;
                }
                let m = if ack {
                    basic::AMQPMethod::Ack(basic::Ack {
                        delivery_tag: seq,
                        multiple,
                    })
                } else {
                    basic::AMQPMethod::Nack(basic::Nack {
                        delivery_tag: seq,
                        multiple,
                        requeue: false,
                    })
                };
                self.send_method(ch, AMQPClass::Basic(m));
            }
        }
    }
}

/// The queue or exchange a method uses, as RabbitMQ names it when it refuses
/// access (`None`: the method uses none).
fn resource_of(m: &AMQPClass) -> Option<(&'static str, &str)> {
    match m {
        AMQPClass::Exchange(e) => Some((
            "exchange",
            match e {
                // RabbitMQ checks no permission for a passive declaration.
                exchange::AMQPMethod::Declare(d) if !d.passive => d.exchange.as_str(),
                exchange::AMQPMethod::Delete(d) => d.exchange.as_str(),
                exchange::AMQPMethod::Bind(b) => b.destination.as_str(),
                exchange::AMQPMethod::Unbind(b) => b.destination.as_str(),
                _ => return None,
            },
        )),
        AMQPClass::Queue(q) => Some((
            "queue",
            match q {
                queue::AMQPMethod::Declare(d) if !d.passive => d.queue.as_str(),
                queue::AMQPMethod::Delete(d) => d.queue.as_str(),
                queue::AMQPMethod::Purge(p) => p.queue.as_str(),
                queue::AMQPMethod::Bind(b) => b.queue.as_str(),
                queue::AMQPMethod::Unbind(b) => b.queue.as_str(),
                _ => return None,
            },
        )),
        AMQPClass::Basic(basic::AMQPMethod::Publish(p)) => Some((
            "exchange",
            match p.exchange.as_str() {
                "" => "amq.default",
                name => name,
            },
        )),
        AMQPClass::Basic(basic::AMQPMethod::Consume(c)) => Some(("queue", c.queue.as_str())),
        AMQPClass::Basic(basic::AMQPMethod::Get(g)) => Some(("queue", g.queue.as_str())),
        _ => None,
    }
}

/// A binding as the quorum stores it.
fn binding(
    source: &ShortString,
    destination: Destination,
    routing_key: &ShortString,
    arguments: &FieldTable,
) -> Binding {
    Binding {
        source: source.as_str().to_owned(),
        destination,
        routing_key: routing_key.as_str().to_owned(),
        arguments: encode_table(arguments),
    }
}

/// Settled deliveries give their consumer's and the channel's window back.
fn release_credit<'a>(chan: &Channel, settled: impl Iterator<Item = &'a Unacked>) {
    for u in settled {
        if let Some(tag) = &u.consumer {
            chan.shared.release();
            if let Some(c) = chan.consumers.get(tag) {
                c.credit.release();
            }
        }
    }
}

/// Tells each queue which of its deliveries are acknowledged or returned.
fn settle(unacked: impl Iterator<Item = Unacked>, outcome: Outcome) {
    let mut by_queue: Vec<(QueueHandle, Vec<i64>)> = Vec::new();
    for u in unacked {
        match by_queue.iter_mut().find(|(q, _)| *q == u.queue) {
            Some((_, offsets)) => offsets.push(u.offset),
            None => by_queue.push((u.queue, vec![u.offset])),
        }
    }
    for (q, offsets) in by_queue {
        q.settle(offsets, outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_hold_at_most_a_mebibyte_unless_one_message_is_larger() {
        let sizes = [600_000, 400_000, 100_000, 2_000_000, 10, 20];
        let members: Vec<usize> = (0..sizes.len()).collect();
        let runs = chunks(&members, |i| sizes[i]);
        assert_eq!(runs, vec![&[0, 1][..], &[2][..], &[3][..], &[4, 5][..]]);
        assert!(chunks(&[], |_| 1).is_empty());
        let small: Vec<usize> = (0..5000).collect();
        let runs = chunks(&small, |_| 1000);
        assert_eq!(runs.len(), 5);
        assert!(runs.iter().all(|r| r.len() <= BATCH_BYTES / 1000));
        assert_eq!(runs.concat(), small, "every message once, in order");
    }
}

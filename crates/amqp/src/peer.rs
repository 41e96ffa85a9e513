//! Queues led by another node: a channel anywhere in the cluster uses a queue
//! through the node that leads it, as RabbitMQ's channels reach a queue process
//! on another node.
//!
//! A connection that touches a queue led elsewhere opens one *peer session* to
//! that node's AMQP listener (registered as the broker's `amqp` endpoint). The
//! session speaks on behalf of the connection: the leader serves it like a
//! connection of its own (consumers, prefetch windows, unacknowledged deliveries),
//! so when the client connection ends, or the session breaks, the leader returns
//! what was delivered and not acknowledged, exactly as for a local connection.
//! Operations without a connection (the operator's `get`, purge and counts,
//! dead-lettering) share one session per node pair.
//!
//! Wire: the session opens with [`PEER_HEADER`] instead of AMQP's protocol
//! header, then frames `[len u32 BE][head len u32 BE][head: JSON][payload]`; the
//! payload carries message properties and bodies as they are, the head
//! everything else. Frames are bounded by the largest message plus headroom,
//! checked before anything is allocated.
//!
//! Flow: a leader keeps at most [`WINDOW`] deliveries in flight per session; the
//! receiving node reports how many it handed to its connection (`Drained`), so a
//! slow client backs its deliveries up into the queue, not into memory, and a
//! delivery never blocks a reply the connection waits for.
//!
//! Trust: like the Raft and replication ports today, a node accepts a peer
//! session from whoever opens one (TLS and authentication between nodes come
//! with the security work).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use amq_protocol::protocol::basic::AMQPProperties;
use bytes::{Buf, Bytes, BytesMut};
use futures::future::{FutureExt, Shared};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{debug, warn};

use crate::connection::write_batch;
use crate::error::AmqpError;
use crate::message::{decode_properties, encode_batch, encode_properties, Publication, Stored};
use crate::model::QueueArgs;
use crate::queue::{
    ConsumerSpec, Credit, Event, Got, Outcome, QueueHandle, QueueLink, QueueStatus, StreamStart,
    Traffic,
};
use crate::Broker;

/// What a peer session sends instead of AMQP's protocol header.
pub(crate) const PEER_HEADER: [u8; 8] = *b"SLUICEQ1";
/// Deliveries a leader has in flight to one session.
const WINDOW: u64 = 1024;
/// Deliveries handed on before the receiving node reports them.
const DRAIN_REPORT: u64 = 128;
/// Headroom above the largest message for a frame's head and properties.
const FRAME_HEADROOM: u64 = 1024 * 1024;
/// Time a call may take before the session is taken as lost.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// A session that answers no ping for this long is closed: a paused or cut-off
/// leader must not hold publishes and consumers forever.
const PING_EVERY: Duration = Duration::from_secs(2);
const PING_TIMEOUT: Duration = Duration::from_secs(6);
/// Time a leader waits for its image to show a queue (or its leadership) the
/// asking node already sees.
const CATCH_UP: Duration = Duration::from_secs(5);
/// Time a closing connection waits for its sessions to finish.
const FINISH_TIMEOUT: Duration = Duration::from_secs(5);
/// Time to connect to a peer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// From the node a connection is on to the queue's leader.
#[derive(Debug, Serialize, Deserialize)]
enum ToLeader {
    Consume {
        id: u64,
        vhost: String,
        queue: String,
        channel: u16,
        tag: String,
        exclusive: bool,
        no_ack: bool,
        own_limit: u32,
        shared_limit: u32,
        start: StreamStart,
    },
    Cancel {
        vhost: String,
        queue: String,
        channel: u16,
        tag: String,
    },
    Detach {
        vhost: String,
        queue: String,
        channel: Option<u16>,
    },
    Get {
        id: u64,
        vhost: String,
        queue: String,
        no_ack: bool,
    },
    Settle {
        vhost: String,
        queue: String,
        offsets: Vec<i64>,
        outcome: Outcome,
    },
    Purge {
        id: u64,
        vhost: String,
        queue: String,
    },
    Status {
        id: u64,
        vhost: String,
        queue: String,
        is_use: bool,
    },
    /// Payload: the encoded properties, then the body.
    Publish {
        id: u64,
        vhost: String,
        queue: String,
        exchange: String,
        routing_key: String,
        properties_len: u32,
    },
    /// `basic.qos` with global=true on a channel that consumes here.
    SharedLimit {
        channel: u16,
        limit: u32,
    },
    /// The receiving node handed this many deliveries to its connection.
    Drained {
        n: u64,
    },
    Ping {
        id: u64,
    },
}

/// From the leader back.
#[derive(Debug, Serialize, Deserialize)]
enum FromLeader {
    Reply {
        id: u64,
        answer: Answer,
    },
    /// Payload: the encoded properties, then the body.
    Deliver {
        vhost: String,
        queue: String,
        channel: u16,
        tag: String,
        redelivered: bool,
        no_ack: bool,
        message: MessageHead,
    },
    Cancelled {
        channel: u16,
        tag: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
enum Answer {
    Done,
    /// A publish a full queue refused (`x-overflow` reject-publish).
    Refused,
    Failed {
        code: u16,
        text: String,
        #[serde(default)]
        retriable: bool,
    },
    /// Payload (when a message is got): the encoded properties, then the body.
    Got {
        got: Option<GotHead>,
    },
    Count(u32),
    Status {
        ready: u32,
        unacked: u32,
        consumers: u32,
        /// For the operator's look (not a use), the queue's traffic.
        traffic: Option<Traffic>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct MessageHead {
    offset: i64,
    timestamp: i64,
    exchange: String,
    routing_key: String,
    properties_len: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct GotHead {
    message: MessageHead,
    redelivered: bool,
    remaining: u32,
}

// ------------------------------------------------------------------- framing

fn frame<T: Serialize>(head: &T, payload: &[&[u8]]) -> Vec<u8> {
    let head = match serde_json::to_vec(head) {
        Ok(h) => h,
        Err(e) => {
            // Our own types always serialize; a failure is a bug, not a peer's doing.
            warn!("cannot encode a peer frame: {e}");
            return Vec::new();
        }
    };
    let payload_len: usize = payload.iter().map(|p| p.len()).sum();
    let len = 4 + head.len() + payload_len;
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(&u32::try_from(head.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(&head);
    for p in payload {
        out.extend_from_slice(p);
    }
    out
}

/// Reads one frame: its head decoded, its payload as is. `None` at a clean end.
async fn read_frame<T: for<'de> Deserialize<'de>, R: AsyncRead + Unpin>(
    r: &mut R,
    max: u64,
) -> std::io::Result<Option<(T, Bytes)>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u64::from(u32::from_be_bytes(len));
    if !(4..=max).contains(&len) {
        return Err(invalid(format!("peer frame of {len} bytes")));
    }
    let mut buf = BytesMut::zeroed(usize::try_from(len).map_err(|e| invalid(e.to_string()))?);
    r.read_exact(&mut buf).await?;
    let head_len = usize::try_from(buf.get_u32()).map_err(|e| invalid(e.to_string()))?;
    if head_len > buf.len() {
        return Err(invalid("peer frame head past its end".to_owned()));
    }
    let head = buf.split_to(head_len);
    let head = serde_json::from_slice(&head).map_err(|e| invalid(e.to_string()))?;
    Ok(Some((head, buf.freeze())))
}

/// How many frames of either direction `data` holds whole, up to the first
/// that does not decode (the fuzz target's way in).
pub(crate) fn decode_all(data: &[u8], max: u64) -> usize {
    futures::executor::block_on(async {
        let mut n = 0;
        let mut to_leader = data;
        while let Ok(Some(_)) = read_frame::<ToLeader, _>(&mut to_leader, max).await {
            n += 1;
        }
        let mut from_leader = data;
        while let Ok(Some(_)) = read_frame::<FromLeader, _>(&mut from_leader, max).await {
            n += 1;
        }
        n
    })
}

fn invalid(text: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, text)
}

pub(crate) fn max_frame(broker: &Broker) -> u64 {
    broker.config.max_message_bytes + FRAME_HEADROOM
}

fn properties_bytes(p: &AMQPProperties) -> Vec<u8> {
    encode_properties(p).unwrap_or_else(|e| {
        warn!("cannot encode message properties: {e}");
        Vec::new()
    })
}

fn message_head(m: &Stored, properties_len: usize) -> MessageHead {
    MessageHead {
        offset: m.offset,
        timestamp: m.timestamp,
        exchange: m.exchange.clone(),
        routing_key: m.routing_key.clone(),
        properties_len: u32::try_from(properties_len).unwrap_or(u32::MAX),
    }
}

/// Splits a payload into properties and body at `properties_len`.
fn split_payload(mut payload: Bytes, properties_len: u32) -> Result<(Bytes, Bytes), AmqpError> {
    let n = usize::try_from(properties_len).unwrap_or(usize::MAX);
    if n > payload.len() {
        return Err(AmqpError::internal(
            "peer message shorter than its properties",
        ));
    }
    let properties = payload.split_to(n);
    Ok((properties, payload))
}

fn stored_from(head: MessageHead, payload: Bytes) -> Result<Stored, AmqpError> {
    let (properties, body) = split_payload(payload, head.properties_len)?;
    let properties = decode_properties(&properties);
    Ok(Stored {
        offset: head.offset,
        timestamp: head.timestamp,
        exchange: head.exchange,
        routing_key: head.routing_key,
        properties,
        body,
    })
}

fn failed(e: &AmqpError) -> Answer {
    Answer::Failed {
        code: e.reply_code(),
        text: e.text.clone(),
        retriable: e.retriable,
    }
}

/// A call's answer that is not the one asked for: the leader's refusal, or a
/// peer that answered out of turn.
fn refusal(answer: Answer) -> AmqpError {
    match answer {
        Answer::Failed {
            code,
            text,
            retriable,
        } => error_from(code, text, retriable),
        other => AmqpError::internal(format!("unexpected answer {other:?}")),
    }
}

fn error_from(code: u16, text: String, retriable: bool) -> AmqpError {
    let e = error_from_code(code, text);
    if retriable {
        e.retriable()
    } else {
        e
    }
}

fn error_from_code(code: u16, text: String) -> AmqpError {
    // The text already carries RabbitMQ's `NAME - ` prefix from the leader.
    let detail = text
        .split_once(" - ")
        .map_or(text.as_str(), |(_, d)| d)
        .to_owned();
    match amq_protocol::protocol::AMQPErrorKind::from_id(code) {
        Some(amq_protocol::protocol::AMQPErrorKind::Soft(s)) => AmqpError::soft(s, detail),
        Some(amq_protocol::protocol::AMQPErrorKind::Hard(h)) => AmqpError::hard(h, detail),
        None => AmqpError::internal(detail),
    }
}

fn lost(node: i32) -> AmqpError {
    AmqpError::unavailable(format!(
        "lost the session to node {node}, which leads the queue; retry once it has a leader"
    ))
}

// ------------------------------------------------------------ the asking side

/// Where a consumer's deliveries from a session go.
struct Route {
    vhost: Arc<str>,
    name: Arc<str>,
    args: Arc<QueueArgs>,
    events: mpsc::Sender<Event>,
}

/// One session to a leader, on behalf of one connection (or of the node).
pub(crate) struct PeerClient {
    node: i32,
    out: mpsc::UnboundedSender<Vec<u8>>,
    calls: Mutex<HashMap<u64, oneshot::Sender<(Answer, Bytes)>>>,
    routes: Mutex<HashMap<(u16, Arc<str>), Route>>,
    next_id: AtomicU64,
    closed: AtomicBool,
    /// The TCP connection to the leader was made: what was sent since may
    /// have reached it. Until then nothing did.
    connected: AtomicBool,
    /// Wakes the writer to end the session (held apart from the client, so the
    /// writer does not keep the client alive).
    shutdown: Arc<Notify>,
}

impl std::fmt::Debug for PeerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PeerClient(node {})", self.node)
    }
}

/// What the answer to a publish is: stored (`Ok(true)`), refused by a full
/// queue (`Ok(false)`), or unknown (the session or the leader failed).
pub(crate) type PublishAnswer = Shared<futures::future::BoxFuture<'static, Result<bool, ()>>>;

impl PeerClient {
    /// Starts a session to `node` at `addr`; it connects in the background, so
    /// calls made meanwhile wait for it.
    pub(crate) fn open(node: i32, addr: String, max_frame: u64) -> Arc<PeerClient> {
        let (out, rx) = mpsc::unbounded_channel();
        let shutdown = Arc::new(Notify::new());
        let client = Arc::new(PeerClient {
            node,
            out,
            calls: Mutex::new(HashMap::new()),
            routes: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            shutdown: shutdown.clone(),
        });
        tokio::spawn(run_client(
            Arc::downgrade(&client),
            addr,
            rx,
            shutdown,
            max_frame,
        ));
        tokio::spawn(ping_loop(Arc::downgrade(&client)));
        client
    }

    pub(crate) fn is_alive(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
    }

    /// Ends the session once the leader has handled what the connection sent
    /// before (its settlements: the answer to a ping comes after them), so a
    /// client's `close-ok` means the same as with a queue on this node. (Its
    /// channels already waited for their unconfirmed publishes.)
    pub(crate) async fn finish(&self) {
        let flushed = self.call(|id| ToLeader::Ping { id });
        let _ = tokio::time::timeout(FINISH_TIMEOUT, flushed).await;
        self.close();
    }

    /// Ends the session: the leader returns what it delivered and was not acked.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.shutdown.notify_one();
    }

    fn send(&self, m: &ToLeader, payload: &[&[u8]]) {
        if self.is_alive() {
            let _ = self.out.send(frame(m, payload));
        }
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn call_start(&self, id: u64) -> oneshot::Receiver<(Answer, Bytes)> {
        let (tx, rx) = oneshot::channel();
        self.calls.lock().insert(id, tx);
        rx
    }

    async fn call(&self, make: impl FnOnce(u64) -> ToLeader) -> Result<(Answer, Bytes), AmqpError> {
        if !self.is_alive() {
            return Err(lost(self.node));
        }
        let id = self.id();
        let rx = self.call_start(id);
        self.send(&make(id), &[]);
        match tokio::time::timeout(CALL_TIMEOUT, rx).await {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(_)) => Err(lost(self.node)),
            Err(_) => {
                self.calls.lock().remove(&id);
                self.close();
                Err(lost(self.node))
            }
        }
    }

    fn shared_limit(&self, channel: u16, limit: u32) {
        let consumes_here = self.routes.lock().keys().any(|(ch, _)| *ch == channel);
        if consumes_here {
            self.send(&ToLeader::SharedLimit { channel, limit }, &[]);
        }
    }

    /// The session ended: calls fail, consumers are told their queue is gone
    /// from here.
    fn fail_all(&self) {
        self.closed.store(true, Ordering::Release);
        self.calls.lock().clear();
        let routes: Vec<((u16, Arc<str>), Route)> = self.routes.lock().drain().collect();
        for ((channel, consumer_tag), r) in routes {
            tokio::spawn(async move {
                let _ = r
                    .events
                    .send(Event::Cancelled {
                        channel,
                        consumer_tag,
                    })
                    .await;
            });
        }
    }
}

async fn run_client(
    client: Weak<PeerClient>,
    addr: String,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    shutdown: Arc<Notify>,
    max_frame: u64,
) {
    let node = client.upgrade().map_or(-1, |c| c.node);
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr)).await;
    let socket = match connected {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(node, %addr, "cannot open a peer session: {e}");
            if let Some(c) = client.upgrade() {
                c.fail_all();
            }
            return;
        }
        Err(_) => {
            debug!(node, %addr, "peer session: connect timed out");
            if let Some(c) = client.upgrade() {
                c.fail_all();
            }
            return;
        }
    };
    let _ = socket.set_nodelay(true);
    if let Some(c) = client.upgrade() {
        c.connected.store(true, Ordering::Release);
    }
    let (mut read, write) = socket.into_split();
    let (deliveries_tx, deliveries_rx) = mpsc::unbounded_channel();
    let forward = tokio::spawn(forward_deliveries(client.clone(), deliveries_rx));
    let writer = async {
        let mut w = BufWriter::with_capacity(64 * 1024, write);
        if w.write_all(&PEER_HEADER).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                m = rx.recv() => {
                    let Some(first) = m else { break };
                    if write_batch(&mut w, first, &mut rx).await.is_err() {
                        return;
                    }
                }
                _ = shutdown.notified() => break,
            }
        }
        // What was queued before the close still goes (settlements).
        while let Ok(more) = rx.try_recv() {
            if w.write_all(&more).await.is_err() {
                return;
            }
        }
        let _ = w.flush().await;
        let _ = w.shutdown().await;
    };
    let reader = async {
        loop {
            let next = read_frame::<FromLeader, _>(&mut read, max_frame).await;
            let Some(c) = client.upgrade() else { return };
            match next {
                Ok(Some((FromLeader::Reply { id, answer }, payload))) => {
                    if let Some(tx) = c.calls.lock().remove(&id) {
                        let _ = tx.send((answer, payload));
                    }
                }
                Ok(Some((m @ FromLeader::Deliver { .. }, payload))) => {
                    let _ = deliveries_tx.send((m, payload));
                }
                Ok(Some((m @ FromLeader::Cancelled { .. }, payload))) => {
                    let _ = deliveries_tx.send((m, payload));
                }
                Ok(None) => return,
                Err(e) => {
                    debug!(node, "peer session read failed: {e}");
                    return;
                }
            }
        }
    };
    // Either side ending ends the session.
    tokio::select! {
        _ = writer => {}
        _ = reader => {}
    }
    forward.abort();
    if let Some(c) = client.upgrade() {
        c.fail_all();
    }
}

/// Hands deliveries to their connections in order and reports progress, so the
/// session's reader never waits on a busy connection.
async fn forward_deliveries(
    client: Weak<PeerClient>,
    mut rx: mpsc::UnboundedReceiver<(FromLeader, Bytes)>,
) {
    let mut handed = 0u64;
    while let Some((m, payload)) = rx.recv().await {
        let Some(c) = client.upgrade() else { return };
        match m {
            FromLeader::Deliver {
                vhost,
                queue,
                channel,
                tag,
                redelivered,
                no_ack,
                message,
            } => {
                handed += 1;
                let tag: Arc<str> = Arc::from(tag);
                let route = c.routes.lock().get(&(channel, tag.clone())).map(|r| {
                    (
                        r.events.clone(),
                        RemoteQueue {
                            client: c.clone(),
                            vhost: r.vhost.clone(),
                            name: r.name.clone(),
                            args: r.args.clone(),
                        },
                    )
                });
                let offset = message.offset;
                let Some((events, queue)) = route else {
                    // The consumer went while this was on its way: back to the queue.
                    if !no_ack {
                        let outcome = Outcome::Requeue;
                        let offsets = vec![offset];
                        c.send(
                            &ToLeader::Settle {
                                vhost,
                                queue,
                                offsets,
                                outcome,
                            },
                            &[],
                        );
                    }
                    continue;
                };
                let message = match stored_from(message, payload) {
                    Ok(m) => m,
                    Err(e) => {
                        warn!("bad delivery from node {}: {e}", c.node);
                        continue;
                    }
                };
                drop(c);
                let event = Event::Deliver {
                    channel,
                    consumer_tag: tag,
                    queue: QueueHandle::There(queue),
                    message: Box::new(message),
                    redelivered,
                    no_ack,
                };
                if let Err(mpsc::error::SendError(Event::Deliver { queue, .. })) =
                    events.send(event).await
                {
                    if !no_ack {
                        queue.settle(vec![offset], Outcome::Requeue);
                    }
                }
            }
            FromLeader::Cancelled { channel, tag } => {
                let tag: Arc<str> = Arc::from(tag);
                let route = c.routes.lock().remove(&(channel, tag.clone()));
                drop(c);
                if let Some(r) = route {
                    let _ = r
                        .events
                        .send(Event::Cancelled {
                            channel,
                            consumer_tag: tag,
                        })
                        .await;
                }
            }
            FromLeader::Reply { .. } => {}
        }
        if handed >= DRAIN_REPORT || (handed > 0 && rx.is_empty()) {
            if let Some(c) = client.upgrade() {
                c.send(&ToLeader::Drained { n: handed }, &[]);
            }
            handed = 0;
        }
    }
}

async fn ping_loop(client: Weak<PeerClient>) {
    loop {
        tokio::time::sleep(PING_EVERY).await;
        let Some(c) = client.upgrade() else { return };
        if !c.is_alive() {
            return;
        }
        let id = c.id();
        let rx = c.call_start(id);
        c.send(&ToLeader::Ping { id }, &[]);
        drop(c);
        if tokio::time::timeout(PING_TIMEOUT, rx).await.is_err() {
            if let Some(c) = client.upgrade() {
                warn!(
                    node = c.node,
                    "peer session answered no ping for {PING_TIMEOUT:?}; closing it"
                );
                c.calls.lock().remove(&id);
                c.close();
            }
            return;
        }
    }
}

/// A queue led by another node, reached through a peer session.
#[derive(Debug, Clone)]
pub(crate) struct RemoteQueue {
    client: Arc<PeerClient>,
    pub name: Arc<str>,
    pub vhost: Arc<str>,
    pub args: Arc<QueueArgs>,
}

impl RemoteQueue {
    /// Whether the session ever reached the leader: if not, nothing sent
    /// through it arrived, and a publish that failed may be made elsewhere.
    pub(crate) fn reached_leader(&self) -> bool {
        self.client.connected.load(Ordering::Acquire)
    }
}

impl PartialEq for RemoteQueue {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.client, &other.client)
            && self.name == other.name
            && self.vhost == other.vhost
    }
}

impl RemoteQueue {
    pub(crate) fn new(
        client: Arc<PeerClient>,
        vhost: &str,
        name: &str,
        args: Arc<QueueArgs>,
    ) -> RemoteQueue {
        RemoteQueue {
            client,
            name: Arc::from(name),
            vhost: Arc::from(vhost),
            args,
        }
    }

    fn names(&self) -> (String, String) {
        (self.vhost.to_string(), self.name.to_string())
    }

    fn answer_unit(answer: Answer) -> Result<(), AmqpError> {
        match answer {
            Answer::Done => Ok(()),
            other => Err(refusal(other)),
        }
    }

    pub(crate) async fn consume(&self, spec: ConsumerSpec) -> Result<(), AmqpError> {
        let key = (spec.channel, spec.tag.clone());
        self.client.routes.lock().insert(
            key.clone(),
            Route {
                vhost: self.vhost.clone(),
                name: self.name.clone(),
                args: self.args.clone(),
                events: spec.events.clone(),
            },
        );
        let (vhost, queue) = self.names();
        let r = self
            .client
            .call(|id| ToLeader::Consume {
                id,
                vhost,
                queue,
                channel: spec.channel,
                tag: spec.tag.to_string(),
                exclusive: spec.exclusive,
                no_ack: spec.no_ack,
                own_limit: spec.own.limit.load(Ordering::Acquire),
                shared_limit: spec.shared.limit.load(Ordering::Acquire),
                start: spec.start,
            })
            .await
            .and_then(|(a, _)| Self::answer_unit(a));
        if r.is_err() {
            self.client.routes.lock().remove(&key);
        }
        r
    }

    pub(crate) fn cancel(&self, channel: u16, tag: Arc<str>) {
        self.client.routes.lock().remove(&(channel, tag.clone()));
        let (vhost, queue) = self.names();
        self.client.send(
            &ToLeader::Cancel {
                vhost,
                queue,
                channel,
                tag: tag.to_string(),
            },
            &[],
        );
    }

    pub(crate) fn detach(&self, channel: Option<u16>) {
        let (vhost, queue) = self.names();
        self.client.routes.lock().retain(|(ch, _), r| {
            !(r.vhost == self.vhost && r.name == self.name && channel.is_none_or(|c| c == *ch))
        });
        self.client.send(
            &ToLeader::Detach {
                vhost,
                queue,
                channel,
            },
            &[],
        );
    }

    pub(crate) async fn get(&self, no_ack: bool) -> Result<Option<Got>, AmqpError> {
        let (vhost, queue) = self.names();
        let (answer, payload) = self
            .client
            .call(|id| ToLeader::Get {
                id,
                vhost,
                queue,
                no_ack,
            })
            .await?;
        match answer {
            Answer::Got { got: None } => Ok(None),
            Answer::Got { got: Some(g) } => Ok(Some(Got {
                message: stored_from(g.message, payload)?,
                redelivered: g.redelivered,
                remaining: g.remaining,
            })),
            other => Err(refusal(other)),
        }
    }

    pub(crate) fn settle(&self, offsets: Vec<i64>, outcome: Outcome) {
        if offsets.is_empty() {
            return;
        }
        let (vhost, queue) = self.names();
        self.client.send(
            &ToLeader::Settle {
                vhost,
                queue,
                offsets,
                outcome,
            },
            &[],
        );
    }

    pub(crate) async fn purge(&self) -> Result<u32, AmqpError> {
        let (vhost, queue) = self.names();
        match self
            .client
            .call(|id| ToLeader::Purge { id, vhost, queue })
            .await?
            .0
        {
            Answer::Count(n) => Ok(n),
            other => Err(refusal(other)),
        }
    }

    pub(crate) async fn counts(&self, is_use: bool) -> Result<QueueStatus, AmqpError> {
        self.status_call(is_use).await.map(|(s, _)| s)
    }

    /// The counts and traffic, as the operator sees them (not a use).
    pub(crate) async fn observe(&self) -> Result<(QueueStatus, Traffic), AmqpError> {
        self.status_call(false)
            .await
            .map(|(s, t)| (s, t.unwrap_or_default()))
    }

    async fn status_call(&self, is_use: bool) -> Result<(QueueStatus, Option<Traffic>), AmqpError> {
        let (vhost, queue) = self.names();
        let answer = self
            .client
            .call(|id| ToLeader::Status {
                id,
                vhost,
                queue,
                is_use,
            })
            .await?
            .0;
        match answer {
            Answer::Status {
                ready,
                unacked,
                consumers,
                traffic,
            } => Ok((
                QueueStatus {
                    ready,
                    unacked,
                    consumers,
                },
                traffic,
            )),
            other => Err(refusal(other)),
        }
    }

    /// Sends a message to the leader to store; the answer says whether it is
    /// durable there (or refused by a full queue).
    pub(crate) fn publish(&self, p: &Publication) -> PublishAnswer {
        let id = self.client.id();
        let rx = self.client.call_start(id);
        let (vhost, queue) = self.names();
        self.client.send(
            &ToLeader::Publish {
                id,
                vhost,
                queue,
                exchange: p.exchange.clone(),
                routing_key: p.routing_key.clone(),
                properties_len: u32::try_from(p.properties.len()).unwrap_or(u32::MAX),
            },
            &[&p.properties, &p.body],
        );
        let alive = self.client.is_alive();
        async move {
            if !alive {
                return Err(());
            }
            match rx.await {
                Ok((Answer::Done, _)) => Ok(true),
                Ok((Answer::Refused, _)) => Ok(false),
                _ => Err(()),
            }
        }
        .boxed()
        .shared()
    }
}

/// Tells every session of `clients` that a channel's shared window changed.
pub(crate) fn shared_limit_changed(clients: &[Arc<PeerClient>], channel: u16, limit: u32) {
    for c in clients {
        c.shared_limit(channel, limit);
    }
}

// ---------------------------------------------------------- the leader's side

/// A queue a session uses here, and what it delivered from it unacknowledged
/// (to which consumer: `None` for `basic.get`).
struct Used {
    link: QueueLink,
    unacked: HashMap<i64, Option<(u16, Arc<str>)>>,
}

struct Session {
    broker: Arc<Broker>,
    id: u64,
    out: mpsc::UnboundedSender<Vec<u8>>,
    events: mpsc::Sender<Event>,
    used: HashMap<(Arc<str>, Arc<str>), Used>,
    /// Per channel: its `basic.qos global` window.
    shared: HashMap<u16, Arc<Credit>>,
    /// Per consumer: its own window.
    own: HashMap<(u16, Arc<str>), Arc<Credit>>,
    in_flight: u64,
}

/// Serves one peer session (its header already read) until it ends.
pub(crate) async fn serve(broker: Arc<Broker>, socket: TcpStream) {
    let _ = socket.set_nodelay(true);
    let max = max_frame(&broker);
    let (mut read, write) = socket.into_split();
    let (out, mut out_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let writer = tokio::spawn(async move {
        let mut w = BufWriter::with_capacity(64 * 1024, write);
        while let Some(first) = out_rx.recv().await {
            if write_batch(&mut w, first, &mut out_rx).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    });
    let (frames_tx, mut frames) = mpsc::channel(64);
    let reader = tokio::spawn(async move {
        loop {
            match read_frame::<ToLeader, _>(&mut read, max).await {
                Ok(Some(f)) => {
                    if frames_tx.send(f).await.is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    debug!("peer session closed: {e}");
                    return;
                }
            }
        }
    });
    let (events, mut events_rx) = mpsc::channel(crate::connection::EVENT_QUEUE);
    let mut s = Session {
        id: broker.next_connection_id(),
        broker,
        out,
        events,
        used: HashMap::new(),
        shared: HashMap::new(),
        own: HashMap::new(),
        in_flight: 0,
    };
    loop {
        tokio::select! {
            f = frames.recv() => match f {
                Some((m, payload)) => s.handle(m, payload).await,
                None => break,
            },
            e = events_rx.recv(), if s.in_flight < WINDOW => match e {
                Some(e) => s.forward(e),
                None => break,
            },
        }
    }
    crate::queue::requeue_undelivered(&mut events_rx);
    s.end();
    reader.abort();
    drop(s);
    let _ = writer.await;
}

impl Session {
    fn reply(&self, id: u64, answer: Answer, payload: &[&[u8]]) {
        let _ = self
            .out
            .send(frame(&FromLeader::Reply { id, answer }, payload));
    }

    /// The queue's actor here. The asking node acts on its image, which may be
    /// ahead of this one's (a queue just declared, a leadership just moved
    /// here): a queue that is not found or not led here yet is waited for, a
    /// little, before the answer is no.
    async fn link(&mut self, vhost: &str, name: &str) -> Result<&mut Used, AmqpError> {
        let key = (Arc::<str>::from(vhost), Arc::<str>::from(name));
        let fresh = match self.used.get(&key) {
            Some(u) => !u.link.is_alive(),
            None => true,
        };
        if fresh {
            let mut link = self.broker.local_queue(vhost, name);
            if link.is_err() {
                let _ = self.broker.topology.catch_up().await;
                let deadline = tokio::time::Instant::now() + CATCH_UP;
                while link.is_err() && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    link = self.broker.local_queue(vhost, name);
                }
            }
            let link = link?;
            match self.used.get_mut(&key) {
                // A new actor (leadership came back): what the old one delivered
                // it redelivers from the log, so nothing is owed from before.
                Some(u) => {
                    u.link = link;
                    u.unacked.clear();
                }
                None => {
                    self.used.insert(
                        key.clone(),
                        Used {
                            link,
                            unacked: HashMap::new(),
                        },
                    );
                }
            }
        }
        self.used
            .get_mut(&key)
            .ok_or_else(|| AmqpError::internal("queue vanished from the session"))
    }

    fn shared_credit(&mut self, channel: u16) -> Arc<Credit> {
        self.shared.entry(channel).or_default().clone()
    }

    async fn handle(&mut self, m: ToLeader, payload: Bytes) {
        match m {
            ToLeader::Consume {
                id,
                vhost,
                queue,
                channel,
                tag,
                exclusive,
                no_ack,
                own_limit,
                shared_limit,
                start,
            } => {
                let shared = self.shared_credit(channel);
                shared.limit.store(shared_limit, Ordering::Release);
                let own = Arc::new(Credit::default());
                own.limit.store(own_limit, Ordering::Release);
                let tag: Arc<str> = Arc::from(tag);
                let spec = ConsumerSpec {
                    connection: self.id,
                    channel,
                    tag: tag.clone(),
                    exclusive,
                    no_ack,
                    own: own.clone(),
                    shared,
                    events: self.events.clone(),
                    start,
                };
                let r = match self.link(&vhost, &queue).await {
                    Ok(u) => u.link.consume(spec).await,
                    Err(e) => Err(e),
                };
                match r {
                    Ok(()) => {
                        self.own.insert((channel, tag), own);
                        self.reply(id, Answer::Done, &[]);
                    }
                    Err(e) => self.reply(id, failed(&e), &[]),
                }
            }
            ToLeader::Cancel {
                vhost,
                queue,
                channel,
                tag,
            } => {
                let tag: Arc<str> = Arc::from(tag);
                self.own.remove(&(channel, tag.clone()));
                let session = self.id;
                if let Ok(u) = self.link(&vhost, &queue).await {
                    u.link.cancel(session, channel, tag);
                }
            }
            ToLeader::Detach {
                vhost,
                queue,
                channel,
            } => {
                self.own
                    .retain(|(ch, _), _| channel.is_some_and(|c| c != *ch));
                let session = self.id;
                if let Ok(u) = self.link(&vhost, &queue).await {
                    u.link.detach(session, channel);
                }
            }
            ToLeader::Get {
                id,
                vhost,
                queue,
                no_ack,
            } => {
                let r = match self.link(&vhost, &queue).await {
                    Ok(u) => u.link.get(no_ack).await,
                    Err(e) => Err(e),
                };
                match r {
                    Ok(None) => self.reply(id, Answer::Got { got: None }, &[]),
                    Ok(Some(g)) => {
                        if !no_ack {
                            if let Ok(u) = self.link(&vhost, &queue).await {
                                u.unacked.insert(g.message.offset, None);
                            }
                        }
                        let properties = properties_bytes(&g.message.properties);
                        let head = GotHead {
                            message: message_head(&g.message, properties.len()),
                            redelivered: g.redelivered,
                            remaining: g.remaining,
                        };
                        self.reply(
                            id,
                            Answer::Got { got: Some(head) },
                            &[&properties, &g.message.body],
                        );
                    }
                    Err(e) => self.reply(id, failed(&e), &[]),
                }
            }
            ToLeader::Settle {
                vhost,
                queue,
                offsets,
                outcome,
            } => {
                let Ok(u) = self.link(&vhost, &queue).await else {
                    return;
                };
                let mut settled = Vec::with_capacity(offsets.len());
                let mut releases = Vec::new();
                for o in offsets {
                    if let Some(by) = u.unacked.remove(&o) {
                        settled.push(o);
                        releases.extend(by);
                    }
                }
                u.link.settle(settled, outcome);
                for (channel, tag) in releases {
                    self.release(channel, &tag);
                }
            }
            ToLeader::Purge { id, vhost, queue } => {
                let r = match self.link(&vhost, &queue).await {
                    Ok(u) => u.link.purge().await,
                    Err(e) => Err(e),
                };
                match r {
                    Ok(n) => self.reply(id, Answer::Count(n), &[]),
                    Err(e) => self.reply(id, failed(&e), &[]),
                }
            }
            ToLeader::Status {
                id,
                vhost,
                queue,
                is_use,
            } => {
                let r = match self.link(&vhost, &queue).await {
                    Ok(u) if is_use => u.link.status().await.map(|s| (s, None)),
                    Ok(u) => {
                        let link = u.link.clone();
                        link.peek().await.map(|s| (s, Some(link.traffic())))
                    }
                    Err(e) => Err(e),
                };
                match r {
                    Ok((s, traffic)) => self.reply(
                        id,
                        Answer::Status {
                            ready: s.ready,
                            unacked: s.unacked,
                            consumers: s.consumers,
                            traffic,
                        },
                        &[],
                    ),
                    Err(e) => self.reply(id, failed(&e), &[]),
                }
            }
            ToLeader::Publish {
                id,
                vhost,
                queue,
                exchange,
                routing_key,
                properties_len,
            } => {
                let link = self.link(&vhost, &queue).await.map(|u| u.link.clone());
                self.publish(id, link, exchange, routing_key, properties_len, payload);
            }
            ToLeader::SharedLimit { channel, limit } => {
                self.shared_credit(channel)
                    .limit
                    .store(limit, Ordering::Release);
            }
            ToLeader::Drained { n } => {
                self.in_flight = self.in_flight.saturating_sub(n);
            }
            ToLeader::Ping { id } => self.reply(id, Answer::Done, &[]),
        }
    }

    fn publish(
        &mut self,
        id: u64,
        link: Result<QueueLink, AmqpError>,
        exchange: String,
        routing_key: String,
        properties_len: u32,
        payload: Bytes,
    ) {
        let stored = split_payload(payload, properties_len).and_then(|(properties, body)| {
            let p = Publication {
                exchange,
                routing_key,
                properties,
                body,
            };
            let batch = encode_batch(&[&p])
                .map_err(|e| AmqpError::internal(format!("cannot encode message: {e}")))?;
            self.broker.append_here(&link?, &p, &batch, true)
        });
        match stored {
            Ok(None) => self.reply(id, Answer::Refused, &[]),
            Ok(Some((leadership, end))) => {
                let out = self.out.clone();
                tokio::spawn(async move {
                    let answer = match leadership.wait_committed(end, None).await {
                        Ok(_) => Answer::Done,
                        Err(e) => failed(&AmqpError::unavailable(format!(
                            "message not made durable: {e}"
                        ))),
                    };
                    let _ = out.send(frame(&FromLeader::Reply { id, answer }, &[]));
                });
            }
            Err(e) => self.reply(id, failed(&e), &[]),
        }
    }

    fn release(&self, channel: u16, tag: &Arc<str>) {
        if let Some(c) = self.shared.get(&channel) {
            c.release();
        }
        if let Some(c) = self.own.get(&(channel, tag.clone())) {
            c.release();
        }
    }

    /// A queue's event for one of this session's consumers goes to the peer.
    fn forward(&mut self, e: Event) {
        match e {
            Event::Deliver {
                channel,
                consumer_tag,
                queue,
                message,
                redelivered,
                no_ack,
            } => {
                if !no_ack {
                    if let QueueHandle::Here(link) = &queue {
                        let key = (link.vhost.clone(), link.name.clone());
                        if let Some(u) = self.used.get_mut(&key) {
                            u.unacked
                                .insert(message.offset, Some((channel, consumer_tag.clone())));
                        }
                    }
                }
                let properties = properties_bytes(&message.properties);
                let (vhost, queue) = match &queue {
                    QueueHandle::Here(l) => (l.vhost.to_string(), l.name.to_string()),
                    QueueHandle::There(r) => (r.vhost.to_string(), r.name.to_string()),
                };
                let head = FromLeader::Deliver {
                    vhost,
                    queue,
                    channel,
                    tag: consumer_tag.to_string(),
                    redelivered,
                    no_ack,
                    message: message_head(&message, properties.len()),
                };
                self.in_flight += 1;
                let _ = self.out.send(frame(&head, &[&properties, &message.body]));
            }
            Event::Cancelled {
                channel,
                consumer_tag,
            } => {
                self.own.remove(&(channel, consumer_tag.clone()));
                let m = FromLeader::Cancelled {
                    channel,
                    tag: consumer_tag.to_string(),
                };
                let _ = self.out.send(frame(&m, &[]));
            }
        }
    }

    /// The session ended: its consumers go and what it was delivered and did not
    /// settle returns to the queues, as for a connection that closed.
    fn end(&mut self) {
        for (_, u) in self.used.drain() {
            u.link.detach(self.id, None);
            let offsets: Vec<i64> = u.unacked.into_keys().collect();
            u.link.settle(offsets, Outcome::Requeue);
        }
    }
}

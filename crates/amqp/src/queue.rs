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
//! that were acknowledged.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sluice_log::{Partition, ReadLimit};
use sluice_topology::Leadership;
use tokio::sync::{mpsc, oneshot};

use crate::error::AmqpError;
use crate::message::{decode_batches, Stored};

/// How much of the log one read brings into memory.
const READ_AHEAD_BYTES: usize = 256 * 1024;
/// How often a consumer whose connection could take no more is retried.
const BLOCKED_RETRY: Duration = Duration::from_millis(5);

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
        queue: QueueLink,
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

/// Who consumes.
#[derive(Debug)]
pub(crate) struct ConsumerSpec {
    pub connection: u64,
    pub channel: u16,
    pub tag: Arc<str>,
    pub exclusive: bool,
    pub no_ack: bool,
    pub own: Arc<Credit>,
    pub shared: Arc<Credit>,
    pub events: mpsc::Sender<Event>,
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
    /// Acknowledge (`requeue: false`) or return to the queue.
    Settle {
        offsets: Vec<i64>,
        requeue: bool,
    },
    Purge {
        reply: oneshot::Sender<u32>,
    },
    Status {
        reply: oneshot::Sender<QueueStatus>,
    },
    /// The queue is deleted: consumers are told, the actor stops.
    Close,
    Trimmed {
        to: i64,
        ok: bool,
    },
}

/// Counts `queue.declare-ok`, `queue.delete` and the operator see.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct QueueStatus {
    pub ready: u32,
    pub unacked: u32,
    pub consumers: u32,
}

/// A channel's way to its queue's actor.
#[derive(Debug, Clone)]
pub(crate) struct QueueLink {
    tx: mpsc::UnboundedSender<Command>,
    pub leadership: Leadership,
    pub name: Arc<str>,
    id: u64,
}

impl PartialEq for QueueLink {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl QueueLink {
    pub(crate) fn is_alive(&self) -> bool {
        !self.tx.is_closed() && self.leadership.is_current()
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

    pub(crate) async fn get(&self, no_ack: bool) -> Result<Option<Got>, AmqpError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Get { no_ack, reply });
        rx.await.map_err(|_| gone(&self.name))
    }

    pub(crate) fn settle(&self, offsets: Vec<i64>, requeue: bool) {
        if !offsets.is_empty() {
            self.send(Command::Settle { offsets, requeue });
        }
    }

    pub(crate) async fn purge(&self) -> Result<u32, AmqpError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Purge { reply });
        rx.await.map_err(|_| gone(&self.name))
    }

    pub(crate) async fn status(&self) -> Result<QueueStatus, AmqpError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Status { reply });
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

fn gone(name: &str) -> AmqpError {
    AmqpError::unavailable(format!(
        "queue '{name}' is no longer served by this node (leadership moved or the queue was deleted)"
    ))
}

/// Starts the actor of a queue this node leads.
pub(crate) fn start(
    name: Arc<str>,
    leadership: Leadership,
    on_unused: Option<OnUnused>,
) -> QueueLink {
    static IDS: AtomicU64 = AtomicU64::new(1);
    let (tx, rx) = mpsc::unbounded_channel();
    let link = QueueLink {
        tx: tx.clone(),
        leadership: leadership.clone(),
        name: name.clone(),
        id: IDS.fetch_add(1, Ordering::Relaxed),
    };
    let partition = leadership.partition().clone();
    let head = partition.log_start_offset();
    let actor = Actor {
        name,
        link: link.clone(),
        self_tx: tx,
        partition,
        consumers: Vec::new(),
        turn: 0,
        next: head,
        ready: VecDeque::new(),
        requeued: BTreeMap::new(),
        unacked: BTreeSet::new(),
        head,
        trimmed: head,
        trimming: false,
        had_consumer: false,
        on_unused,
    };
    tokio::spawn(actor.run(rx, leadership));
    link
}

/// What an auto-delete queue does once its last consumer is gone.
pub(crate) type OnUnused = Box<dyn Fn() + Send + Sync>;

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
    partition: Arc<Partition>,
    consumers: Vec<Consumer>,
    turn: usize,
    /// First offset not read into memory yet.
    next: i64,
    /// Read, never delivered, in offset order.
    ready: VecDeque<Stored>,
    /// Delivered once, returned to the queue: delivered again first, redelivered.
    requeued: BTreeMap<i64, Stored>,
    unacked: BTreeSet<i64>,
    /// Everything below is acknowledged: the smallest offset that is ready or
    /// unacked (or `next`).
    head: i64,
    /// The log start offset as last moved.
    trimmed: i64,
    trimming: bool,
    had_consumer: bool,
    on_unused: Option<OnUnused>,
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>, leadership: Leadership) {
        let mut hw = self.partition.watch_high_watermark();
        let ended = leadership.ended();
        tokio::pin!(ended);
        loop {
            self.dispatch();
            let blocked = self.consumers.iter().any(|c| c.blocked);
            tokio::select! {
                c = rx.recv() => match c {
                    Some(Command::Close) | None => break,
                    Some(c) => self.handle(c),
                },
                r = hw.changed() => if r.is_err() { break },
                _ = &mut ended => break,
                _ = tokio::time::sleep(BLOCKED_RETRY), if blocked => {}
            }
        }
        // Consumers learn that this queue no longer delivers here; their unacked
        // messages stay unacknowledged in the log for whoever serves it next.
        for c in self.consumers.drain(..) {
            let _ = c.spec.events.try_send(Event::Cancelled {
                channel: c.spec.channel,
                consumer_tag: c.spec.tag.clone(),
            });
        }
    }

    fn handle(&mut self, c: Command) {
        match c {
            Command::Consume { spec, reply } => {
                let locked = self.consumers.iter().any(|c| c.spec.exclusive)
                    || (spec.exclusive && !self.consumers.is_empty());
                let r = if locked {
                    Err(AmqpError::access_refused(format!(
                        "queue '{}' in vhost '/' in exclusive use",
                        self.name
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
            Command::Get { no_ack, reply } => {
                let got = self.take().map(|(message, redelivered)| {
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
            Command::Settle { offsets, requeue } => {
                for o in offsets {
                    if self.unacked.remove(&o) && requeue {
                        self.requeue(o);
                    }
                }
                self.advance_head();
            }
            Command::Purge { reply } => {
                let purged = self.ready_count();
                self.requeued.clear();
                self.ready.clear();
                self.next = self.next.max(self.partition.high_watermark());
                self.advance_head();
                let _ = reply.send(purged);
            }
            Command::Status { reply } => {
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
        let unread = (self.partition.high_watermark() - self.next).max(0);
        let n = self.requeued.len() as i64 + self.ready.len() as i64 + unread;
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// The next message to hand out, and whether it was delivered before.
    fn take(&mut self) -> Option<(Stored, bool)> {
        if let Some((_, m)) = self.requeued.pop_first() {
            return Some((m, true));
        }
        if self.ready.is_empty() {
            self.read_ahead();
        }
        self.ready.pop_front().map(|m| (m, false))
    }

    /// Puts back a message that was taken but not delivered.
    fn untake(&mut self, m: Stored, redelivered: bool) {
        if redelivered {
            self.requeued.insert(m.offset, m);
        } else {
            self.ready.push_front(m);
        }
    }

    fn read_ahead(&mut self) {
        let hw = self.partition.high_watermark();
        while self.ready.is_empty() && self.next < hw {
            let read = self
                .partition
                .read(self.next, READ_AHEAD_BYTES, true, ReadLimit::HighWatermark)
                .map_err(|e| e.to_string())
                .and_then(|r| decode_batches(r.records, self.next));
            match read {
                Ok((messages, end)) if end > self.next => {
                    self.next = end;
                    self.ready.extend(messages);
                }
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(queue = %self.name, offset = self.next, "cannot read queue log: {e}");
                    return;
                }
            }
        }
    }

    /// A delivered message returns to the queue: read it back from the log.
    fn requeue(&mut self, offset: i64) {
        let read = self
            .partition
            .read(offset, 1, true, ReadLimit::HighWatermark)
            .map_err(|e| e.to_string())
            .and_then(|r| decode_batches(r.records, offset));
        match read {
            Ok((messages, _)) => {
                if let Some(m) = messages.into_iter().find(|m| m.offset == offset) {
                    self.requeued.insert(offset, m);
                }
            }
            Err(e) => {
                tracing::warn!(queue = %self.name, offset, "cannot read back a requeued message: {e}")
            }
        }
    }

    /// Hands ready messages to consumers with room, in turn.
    fn dispatch(&mut self) {
        for c in &mut self.consumers {
            c.blocked = false;
        }
        loop {
            let n = self.consumers.len();
            let Some(i) = (0..n).map(|k| (self.turn + k) % n.max(1)).find(|&i| {
                let c = &self.consumers[i];
                !c.blocked && (c.spec.no_ack || (c.spec.own.has_room() && c.spec.shared.has_room()))
            }) else {
                break;
            };
            let Some((message, redelivered)) = self.take() else {
                break;
            };
            let offset = message.offset;
            let c = &self.consumers[i];
            let event = Event::Deliver {
                channel: c.spec.channel,
                consumer_tag: c.spec.tag.clone(),
                queue: self.link.clone(),
                message: Box::new(message),
                redelivered,
                no_ack: c.spec.no_ack,
            };
            match c.spec.events.try_send(event) {
                Ok(()) => {
                    if !c.spec.no_ack {
                        c.spec.own.used.fetch_add(1, Ordering::AcqRel);
                        c.spec.shared.used.fetch_add(1, Ordering::AcqRel);
                        self.unacked.insert(offset);
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

    /// Moves `head` over what is acknowledged and the log start offset after it.
    fn advance_head(&mut self) {
        let mut head = self.next;
        if let Some(&o) = self.unacked.first() {
            head = head.min(o);
        }
        if let Some((&o, _)) = self.requeued.first_key_value() {
            head = head.min(o);
        }
        if let Some(m) = self.ready.front() {
            head = head.min(m.offset);
        }
        self.head = self.head.max(head);
        if self.trimming || self.head <= self.trimmed {
            return;
        }
        self.trimming = true;
        let (partition, to, tx) = (self.partition.clone(), self.head, self.self_tx.clone());
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
        if !self.had_consumer || !self.consumers.is_empty() {
            return;
        }
        if let Some(on_unused) = self.on_unused.take() {
            on_unused();
        }
    }
}

//! One client connection: the handshake, then frames in, deliveries and confirms
//! out. A reader task turns bytes into frames (bounded by `frame_max`), a writer
//! task owns the socket's write half; this task owns all channel state, so channel
//! handling needs no locks.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use amq_protocol::protocol::{connection, AMQPClass};
use amq_protocol::types::parsing::parse_field_table;
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::channel::{Channel, Notice, Staged, Unacked};
use crate::error::AmqpError;
use crate::frame::{put_method, FrameError, FrameReader, Inbound, FRAME_OVERHEAD};
use crate::queue::Event;
use crate::{short, Broker, DEFAULT_VHOST};
use sluice_auth::Credential;

/// The protocol header of AMQP 0-9-1, also what a client with another one is sent.
const PROTOCOL_HEADER: [u8; 8] = *b"AMQP\x00\x00\x09\x01";
/// RabbitMQ's `loopback_users` default: the user whose password everyone knows.
const GUEST: &str = "guest";
/// Time a client has for the whole handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Frame size before `tune-ok` (the spec's minimum frame size).
const HANDSHAKE_FRAME_MAX: u32 = 4096;
/// Batches of frames (each what one socket read brought) read ahead of the
/// connection's handling.
const READ_AHEAD: usize = 8;
/// Deliveries a queue may hand a connection ahead of the socket.
pub(crate) const EVENT_QUEUE: usize = 1024;
/// Deliveries handled (and written) together at most.
const EVENT_BATCH: usize = 256;
/// Unsent bytes above which the connection takes no more deliveries.
const WRITE_BACKLOG: usize = 8 * 1024 * 1024;
/// How often a connection held under a resource alarm checks that its client
/// is still there.
const HELD_CHECK: Duration = Duration::from_secs(1);
/// Time a client has to answer our `close` with `close-ok`.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Bytes for the writer task, with a count of what is not written yet.
pub(crate) struct Output {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    backlog: Arc<AtomicUsize>,
    drained: Arc<Notify>,
    /// Corked: bytes gather here and go to the writer as one (`uncork`).
    corked: Option<Vec<u8>>,
}

impl Output {
    pub(crate) fn send(&mut self, bytes: Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        if let Some(gathered) = self.corked.as_mut() {
            gathered.extend_from_slice(&bytes);
            return;
        }
        self.backlog.fetch_add(bytes.len(), Ordering::AcqRel);
        let _ = self.tx.send(bytes);
    }

    /// Writes frames with `write` straight into the gathered bytes when
    /// corked (no buffer of their own, no copy), else into one hand-off.
    pub(crate) fn frames(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        match self.corked.as_mut() {
            Some(gathered) => write(gathered),
            None => {
                let mut bytes = Vec::new();
                write(&mut bytes);
                self.send(bytes);
            }
        }
    }

    /// Gathers what is sent until `uncork`: many small frames (deliveries,
    /// confirms) become one hand-off to the writer and one socket write.
    fn cork(&mut self) {
        self.corked.get_or_insert_with(Vec::new);
    }

    fn uncork(&mut self) {
        if let Some(gathered) = self.corked.take() {
            self.send(gathered);
        }
    }

    fn has_room(&self) -> bool {
        self.backlog.load(Ordering::Acquire) < WRITE_BACKLOG
    }
}

async fn write_loop(
    socket: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    backlog: Arc<AtomicUsize>,
    drained: Arc<Notify>,
) {
    let mut w = BufWriter::with_capacity(64 * 1024, socket);
    while let Some(first) = rx.recv().await {
        let Ok(n) = write_batch(&mut w, first, &mut rx).await else {
            break;
        };
        backlog.fetch_sub(n, Ordering::AcqRel);
        drained.notify_waiters();
    }
    let _ = w.shutdown().await;
}

/// Writes `first` and whatever else is queued behind it, then flushes: one
/// write to the socket for everything that piled up. Returns the bytes written.
pub(crate) async fn write_batch<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut BufWriter<W>,
    first: Vec<u8>,
    rx: &mut mpsc::UnboundedReceiver<Vec<u8>>,
) -> std::io::Result<usize> {
    let mut n = first.len();
    w.write_all(&first).await?;
    while let Ok(more) = rx.try_recv() {
        n += more.len();
        w.write_all(&more).await?;
    }
    w.flush().await?;
    Ok(n)
}

/// A connection's channels by number. Every frame looks its channel up, and
/// the numbers are small integers: one multiplication hashes them.
pub(crate) type Channels = HashMap<u16, Channel, BuildHasherDefault<ChannelNumberHasher>>;

#[derive(Default)]
pub(crate) struct ChannelNumberHasher(u64);

const FIBONACCI: u64 = 0x9E37_79B9_7F4A_7C15;

impl Hasher for ChannelNumberHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(FIBONACCI);
        }
    }

    fn write_u16(&mut self, n: u16) {
        // Fibonacci hashing: spreads the number over the high bits too.
        self.0 = u64::from(n).wrapping_mul(FIBONACCI);
    }
}

/// Serves one connection until it closes.
pub(crate) async fn serve(
    broker: Arc<Broker>,
    socket: TcpStream,
    peer: SocketAddr,
    mut stop: watch::Receiver<bool>,
) {
    let (read, write) = socket.into_split();
    let (tx, rx) = mpsc::unbounded_channel();
    let backlog = Arc::new(AtomicUsize::new(0));
    let drained = Arc::new(Notify::new());
    let writer = tokio::spawn(write_loop(write, rx, backlog.clone(), drained.clone()));
    let out = Output {
        tx,
        backlog,
        drained,
        corked: None,
    };
    let frame_max = Arc::new(AtomicU32::new(HANDSHAKE_FRAME_MAX));
    let (frames_tx, frames) = mpsc::channel(READ_AHEAD);
    let reader = tokio::spawn(read_loop(
        FrameReader::new(read),
        frames_tx,
        frame_max.clone(),
    ));
    let id = broker.next_connection_id();
    let owner = broker.owner_tag(id);
    let alarm = broker.alarm.clone();
    let mut conn = Conn {
        broker,
        alarm,
        wants_blocked: false,
        held: false,
        inbox: VecDeque::new(),
        told_blocked: false,
        id,
        owner,
        peer,
        out,
        frames,
        frame_max,
        negotiated_frame_max: HANDSHAKE_FRAME_MAX,
        channel_max: 0,
        heartbeat: 0,
        vhost: DEFAULT_VHOST.to_owned(),
        user: String::new(),
        user_since: 0,
        vhost_since: 0,
        permitted: true,
        channels: Channels::default(),
        staged: Vec::new(),
        staged_acks: Vec::new(),
        exclusive_queues: Vec::new(),
        closing: false,
    };
    let (events_tx, mut events) = mpsc::channel(EVENT_QUEUE);
    let (notices_tx, notices) = mpsc::unbounded_channel();
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.handshake()).await {
        Ok(Ok(true)) => {
            debug!(%peer, connection = id, "AMQP connection open");
            conn.run(events_tx, &mut events, notices_tx, notices, &mut stop)
                .await;
        }
        Ok(Ok(false)) => {}
        Ok(Err(e)) => {
            debug!(%peer, "AMQP handshake failed: {e}");
            conn.close_connection(&e).await;
        }
        Err(_) => debug!(%peer, "AMQP handshake timed out"),
    }
    crate::queue::requeue_undelivered(&mut events);
    conn.release_all().await;
    reader.abort();
    drop(conn);
    let _ = writer.await;
}

/// Frames whose work may be staged and done together (`store_staged`):
/// publishes with their content, and acks.
fn is_staged_work(frame: &Inbound) -> bool {
    matches!(frame, Inbound::Header(..) | Inbound::Body(..))
        || is_publish(frame)
        || matches!(frame, Inbound::Method(_, m)
            if matches!(**m, AMQPClass::Basic(amq_protocol::protocol::basic::AMQPMethod::Ack(_))))
}

fn is_publish(frame: &Inbound) -> bool {
    matches!(frame, Inbound::Method(_, m)
        if matches!(**m, AMQPClass::Basic(amq_protocol::protocol::basic::AMQPMethod::Publish(_))))
}

async fn read_loop(
    mut reader: FrameReader<tokio::net::tcp::OwnedReadHalf>,
    tx: mpsc::Sender<Result<Vec<Inbound>, FrameError>>,
    frame_max: Arc<AtomicU32>,
) {
    loop {
        let mut batch = Vec::new();
        let item = match reader
            .next_batch(frame_max.load(Ordering::Acquire), &mut batch)
            .await
        {
            Ok(true) => Ok(batch),
            Ok(false) => return,
            Err(e) => Err(e),
        };
        let end = item.is_err();
        if tx.send(item).await.is_err() || end {
            return;
        }
    }
}

pub(crate) struct Conn {
    pub broker: Arc<Broker>,
    alarm: crate::ResourceAlarm,
    /// The client listed the `connection.blocked` capability.
    wants_blocked: bool,
    /// A publish arrived under a resource alarm: it and the frames behind it
    /// wait in `inbox` until the alarm clears, and nothing more is read.
    held: bool,
    /// Frames read and not handled yet.
    inbox: VecDeque<Inbound>,
    /// `connection.blocked` was sent and `unblocked` is owed.
    told_blocked: bool,
    pub id: u64,
    /// What exclusive queues of this connection record as their owner.
    pub owner: String,
    peer: SocketAddr,
    pub out: Output,
    frames: mpsc::Receiver<Result<Vec<Inbound>, FrameError>>,
    frame_max: Arc<AtomicU32>,
    pub negotiated_frame_max: u32,
    channel_max: u16,
    heartbeat: u16,
    pub vhost: String,
    /// Who logged in.
    user: String,
    /// The log indexes that created the user and the virtual host this
    /// connection opened: one deleted and created again is another.
    user_since: u64,
    vhost_since: u64,
    /// The user still holds a permission on the vhost. A withdrawn one
    /// refuses every later use of a queue or exchange (403), as RabbitMQ's
    /// permission checks do; the connection stays open.
    pub permitted: bool,
    pub channels: Channels,
    /// Publishes complete and not stored yet (`store_staged`).
    pub staged: Vec<Staged>,
    /// `basic.ack`s not passed to their queues yet, with their channels.
    pub staged_acks: Vec<(u16, Unacked)>,
    /// Exclusive queues this connection declared: deleted when it closes.
    pub exclusive_queues: Vec<String>,
    /// We sent `connection.close`: only `close-ok` matters now.
    closing: bool,
}

impl Conn {
    /// Start, secure (PLAIN / AMQPLAIN), tune, open. `false`: the client left or
    /// spoke another protocol.
    async fn handshake(&mut self) -> Result<bool, AmqpError> {
        match self.recv_frame().await {
            Some(Ok(Inbound::ProtocolHeader(h))) if h == PROTOCOL_HEADER => {}
            Some(Ok(Inbound::ProtocolHeader(_))) | Some(Ok(_)) | Some(Err(_)) => {
                // The spec: answer with the header we speak, then close.
                self.out.send(PROTOCOL_HEADER.to_vec());
                return Ok(false);
            }
            None => return Ok(false),
        }
        let mut capabilities = FieldTable::default();
        for cap in [
            "publisher_confirms",
            "exchange_exchange_bindings",
            "basic.nack",
            "consumer_cancel_notify",
            "connection.blocked",
            "authentication_failure_close",
            "per_consumer_qos",
        ] {
            capabilities.insert(cap.into(), AMQPValue::Boolean(true));
        }
        let mut props = FieldTable::default();
        let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
        props.insert("product".into(), text("Sluice"));
        props.insert("version".into(), text(env!("CARGO_PKG_VERSION")));
        props.insert("platform".into(), text("Rust"));
        props.insert(
            "cluster_name".into(),
            text(&self.broker.topology.image().cluster_id),
        );
        props.insert("capabilities".into(), AMQPValue::FieldTable(capabilities));
        let mut buf = Vec::new();
        put_method(
            &mut buf,
            0,
            AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
                version_major: 0,
                version_minor: 9,
                server_properties: props,
                mechanisms: "PLAIN AMQPLAIN".into(),
                locales: "en_US".into(),
            })),
        );
        self.out.send(buf);

        let start_ok = match self.expect_connection_method().await? {
            Some(connection::AMQPMethod::StartOk(s)) => s,
            Some(_) => return Err(AmqpError::command_invalid("expected connection.start-ok")),
            None => return Ok(false),
        };
        self.user = self.authenticate(&start_ok).await?;
        self.wants_blocked = matches!(
            start_ok.client_properties.inner().get("capabilities"),
            Some(AMQPValue::FieldTable(caps))
                if matches!(caps.inner().get("connection.blocked"), Some(AMQPValue::Boolean(true)))
        );

        let config = self.broker.config.clone();
        let mut buf = Vec::new();
        put_method(
            &mut buf,
            0,
            AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
                channel_max: config.channel_max,
                frame_max: config.frame_max,
                heartbeat: config.heartbeat_secs,
            })),
        );
        self.out.send(buf);
        let tune_ok = match self.expect_connection_method().await? {
            Some(connection::AMQPMethod::TuneOk(t)) => t,
            Some(_) => return Err(AmqpError::command_invalid("expected connection.tune-ok")),
            None => return Ok(false),
        };
        let frame_max = match tune_ok.frame_max {
            0 => config.frame_max,
            f => f.min(config.frame_max),
        };
        if frame_max < HANDSHAKE_FRAME_MAX {
            return Err(AmqpError::not_allowed(format!(
                "frame_max={frame_max} < {HANDSHAKE_FRAME_MAX} min size"
            )));
        }
        self.negotiated_frame_max = frame_max;
        self.frame_max.store(frame_max, Ordering::Release);
        self.channel_max = match tune_ok.channel_max {
            0 => config.channel_max,
            c => c.min(config.channel_max),
        };
        self.heartbeat = tune_ok.heartbeat;

        let open = match self.expect_connection_method().await? {
            Some(connection::AMQPMethod::Open(o)) => o,
            Some(_) => return Err(AmqpError::command_invalid("expected connection.open")),
            None => return Ok(false),
        };
        let vhost = open.virtual_host.as_str().to_owned();
        let mut image = self.broker.topology.image();
        if !image.may_use_vhost(&self.user, &vhost) {
            // Created or granted a moment ago through another node?
            self.broker.topology.catch_up().await;
            image = self.broker.topology.image();
        }
        if image.vhost(&vhost).is_none() {
            return Err(AmqpError::not_allowed(format!("vhost {vhost} not found")));
        }
        if !image.may_use_vhost(&self.user, &vhost) {
            info!(peer = %self.peer, user = %self.user, vhost, "AMQP open refused: no permission on the vhost");
            return Err(AmqpError::not_allowed(format!(
                "access to vhost '{vhost}' refused for user '{}'",
                self.user
            )));
        }
        self.vhost_since = image.vhost(&vhost).map_or(0, |v| v.since);
        self.user_since = image.access.users.get(&self.user).map_or(0, |u| u.since);
        self.vhost = vhost;
        let mut buf = Vec::new();
        put_method(
            &mut buf,
            0,
            AMQPClass::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {})),
        );
        self.out.send(buf);
        Ok(true)
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    /// Why this connection may not go on: its virtual host or its user was
    /// deleted (RabbitMQ's 320 texts).
    fn access_revoked(&self) -> Option<AmqpError> {
        let image = self.broker.topology.image();
        let forced = |text: String| {
            AmqpError::hard(
                amq_protocol::protocol::AMQPHardError::CONNECTIONFORCED,
                text,
            )
        };
        // Deleted, or deleted and created again since this connection opened.
        if image
            .vhost(&self.vhost)
            .is_none_or(|v| v.since != self.vhost_since)
        {
            return Some(forced(format!("vhost '{}' is deleted", self.vhost)));
        }
        if image
            .access
            .users
            .get(&self.user)
            .is_none_or(|u| u.since != self.user_since)
        {
            return Some(forced(format!("user '{}' is deleted", self.user)));
        }
        None
    }

    async fn password_checks(&self, user: &str, pass: &[u8]) -> bool {
        let known = self.broker.credential_of(user).await;
        let pass = pass.to_vec();
        // PBKDF2 costs milliseconds by design: keep it off the async workers.
        // An unknown user costs the same as a wrong password, so the time of
        // a refusal does not tell which names exist.
        tokio::task::spawn_blocking(move || match known {
            Some(credential) => credential.verify(&pass),
            None => {
                let _ = Credential::derive_with(&pass, vec![0; 16], Credential::ITERATIONS);
                false
            }
        })
        .await
        .unwrap_or(false)
    }

    async fn expect_connection_method(
        &mut self,
    ) -> Result<Option<connection::AMQPMethod>, AmqpError> {
        loop {
            match self.recv_frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(frame_error(&e)),
                Some(Ok(Inbound::Heartbeat(_))) => continue,
                Some(Ok(Inbound::Method(0, m))) => match *m {
                    AMQPClass::Connection(c) => return Ok(Some(c)),
                    other => {
                        return Err(
                            AmqpError::command_invalid("expected a connection method").on(&other)
                        )
                    }
                },
                Some(Ok(_)) => {
                    return Err(AmqpError::unexpected_frame(
                        "expected a connection method on channel 0",
                    ))
                }
            }
        }
    }

    /// The user a `start-ok` names, once its password checks against the
    /// user's stored credential.
    async fn authenticate(&self, s: &connection::StartOk) -> Result<String, AmqpError> {
        let refused = || {
            AmqpError::access_refused(format!(
                "Login was refused using authentication mechanism {}. For details see the broker logfile.",
                s.mechanism
            ))
        };
        let response = s.response.as_bytes();
        let (user, pass): (Vec<u8>, Vec<u8>) = match s.mechanism.as_str() {
            "PLAIN" => {
                // [authzid] NUL authcid NUL passwd
                let mut parts = response.split(|b| *b == 0);
                let (Some(_), Some(u), Some(p), None) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    return Err(refused());
                };
                (u.to_vec(), p.to_vec())
            }
            "AMQPLAIN" => {
                // A field table without its length prefix.
                let len = u32::try_from(response.len()).map_err(|_| refused())?;
                let mut table = len.to_be_bytes().to_vec();
                table.extend_from_slice(response);
                let (_, t) = parse_field_table(&table[..]).map_err(|_| refused())?;
                let field = |k: &str| match t.inner().get(k) {
                    Some(AMQPValue::LongString(s)) => Some(s.as_bytes().to_vec()),
                    Some(AMQPValue::ShortString(s)) => Some(s.as_str().as_bytes().to_vec()),
                    _ => None,
                };
                (
                    field("LOGIN").ok_or_else(refused)?,
                    field("PASSWORD").ok_or_else(refused)?,
                )
            }
            other => {
                return Err(AmqpError::access_refused(format!(
                    "unsupported authentication mechanism '{other}'"
                )))
            }
        };
        let user = String::from_utf8(user).map_err(|_| refused())?;
        if pass.is_empty() {
            // As RabbitMQ's internal backend: a blank password never logs in,
            // not even a user's own blank password.
            info!(peer = %self.peer, user, "AMQP login refused: blank password");
            return Err(refused());
        }
        let mut checks = self.password_checks(&user, &pass).await;
        if !checks {
            // The user may have been created or changed a moment ago through
            // another node: look again once this node has every committed change.
            self.broker.topology.catch_up().await;
            checks = self.password_checks(&user, &pass).await;
        }
        if !checks {
            info!(peer = %self.peer, user, "AMQP login refused: unknown user or wrong password");
            return Err(refused());
        }
        if user == GUEST && self.broker.config.guest_loopback_only && !self.peer.ip().is_loopback()
        {
            info!(peer = %self.peer, "AMQP login refused: user 'guest' may only connect from loopback");
            return Err(refused());
        }
        Ok(user)
    }

    async fn run(
        &mut self,
        events_tx: mpsc::Sender<Event>,
        events: &mut mpsc::Receiver<Event>,
        notices_tx: mpsc::UnboundedSender<Notice>,
        mut notices: mpsc::UnboundedReceiver<Notice>,
        stop: &mut watch::Receiver<bool>,
    ) {
        let heartbeat = Duration::from_secs(u64::from(self.heartbeat));
        let mut last_read = Instant::now();
        let mut ticker = tokio::time::interval(if self.heartbeat > 0 {
            heartbeat / 2
        } else {
            Duration::from_secs(3600)
        });
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let drained = self.out.drained.clone();
        let mut access = self.broker.access_changes();
        // A change between the handshake's check and this subscription.
        access.mark_changed();
        loop {
            let room = self.out.has_room();
            let result = tokio::select! {
                biased;
                _ = stop.changed() => {
                    let e = AmqpError::hard(
                        amq_protocol::protocol::AMQPHardError::CONNECTIONFORCED,
                        "broker forced connection closure with reason 'shutdown'",
                    );
                    self.close_connection(&e).await;
                    return;
                }
                _ = access.changed() => match self.access_revoked() {
                    Some(e) => {
                        info!(peer = %self.peer, user = %self.user, vhost = %self.vhost, "closing AMQP connection: {}", e.text);
                        self.close_connection(&e).await;
                        return;
                    }
                    None => {
                        let image = self.broker.topology.image();
                        self.permitted = image.may_use_vhost(&self.user, &self.vhost);
                        Ok(())
                    }
                },
                n = notices.recv() => match n {
                    Some(n) => {
                        self.out.cork();
                        self.on_notice(n);
                        while let Ok(n) = notices.try_recv() {
                            self.on_notice(n);
                        }
                        self.out.uncork();
                        Ok(())
                    }
                    None => Ok(()),
                },
                batch = self.frames.recv(), if !self.held => match batch {
                    None => return,
                    Some(Err(e)) => Err(frame_error(&e)),
                    Some(Ok(frames)) => {
                        last_read = Instant::now();
                        self.inbox.extend(frames);
                        self.handle_inbox(&events_tx, &notices_tx).await
                    }
                },
                // Held connections are not read; a client that gave up and went
                // is noticed by its reader's end or a dead socket.
                _ = tokio::time::sleep(HELD_CHECK), if self.held => {
                    if self.frames.is_closed() || self.out.tx.is_closed() {
                        return;
                    }
                    Ok(())
                },
                changed = self.alarm.changed(), if self.held => {
                    // A dropped sender means nobody watches resources any more.
                    if changed.is_err() || self.alarm.borrow().is_none() {
                        last_read = Instant::now();
                        self.release_held();
                        self.handle_inbox(&events_tx, &notices_tx).await
                    } else {
                        Ok(())
                    }
                },
                e = events.recv(), if room => match e {
                    Some(e) => {
                        self.out.cork();
                        self.on_event(e);
                        for _ in 1..EVENT_BATCH {
                            let Ok(e) = events.try_recv() else { break };
                            self.on_event(e);
                        }
                        self.out.uncork();
                        Ok(())
                    }
                    None => Ok(()),
                },
                _ = drained.notified(), if !room => Ok(()),
                _ = ticker.tick(), if self.heartbeat > 0 => {
                    // A blocked connection is not read, so its heartbeats are
                    // not seen: RabbitMQ pauses the check too.
                    if !self.held && last_read.elapsed() > heartbeat * 2 {
                        info!(peer = %self.peer, "AMQP client missed heartbeats; closing");
                        return;
                    }
                    self.out.send(heartbeat_frame());
                    Ok(())
                }
            };
            match result {
                Ok(()) if self.closing => return,
                Ok(()) => {}
                Err(e) if e.is_hard() => {
                    self.close_connection(&e).await;
                    return;
                }
                // Channel errors close their channel where they arise.
                Err(e) => warn!("channel error escaped its channel: {e}"),
            }
        }
    }

    /// The next frame, read ahead or from the reader; `None` when it ended.
    async fn recv_frame(&mut self) -> Option<Result<Inbound, FrameError>> {
        loop {
            if let Some(f) = self.inbox.pop_front() {
                return Some(Ok(f));
            }
            match self.frames.recv().await? {
                Ok(batch) => self.inbox.extend(batch),
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// Handles the frames read, in order, until a publish meets a resource
    /// alarm (it waits, with everything behind it). Publishes are stored
    /// together: before any other frame, and when the inbox is empty.
    async fn handle_inbox(
        &mut self,
        events: &mpsc::Sender<Event>,
        notices: &mpsc::UnboundedSender<Notice>,
    ) -> Result<(), AmqpError> {
        let mut result = Ok(());
        self.out.cork();
        while let Some(frame) = self.inbox.pop_front() {
            if is_publish(&frame) && self.alarm.borrow().is_some() {
                self.inbox.push_front(frame);
                self.hold();
                break;
            }
            if !is_staged_work(&frame) {
                // Anything else sees the work before it done, and may wait:
                // what it answers goes out at once.
                self.store_staged();
                self.out.uncork();
            }
            result = self.on_frame(frame, events, notices).await;
            if result.is_err() || self.closing {
                break;
            }
            self.out.cork();
        }
        self.store_staged();
        self.out.uncork();
        result
    }

    /// Holds publishes under a resource alarm, telling the client once why it
    /// is blocked.
    fn hold(&mut self) {
        self.held = true;
        if self.wants_blocked && !self.told_blocked {
            let reason = self.alarm.borrow().clone().unwrap_or_default();
            info!(peer = %self.peer, %reason, "blocking an AMQP publisher");
            self.told_blocked = true;
            let mut buf = Vec::new();
            put_method(
                &mut buf,
                0,
                AMQPClass::Connection(connection::AMQPMethod::Blocked(connection::Blocked {
                    reason: short(&reason),
                })),
            );
            self.out.send(buf);
        }
    }

    /// The alarm cleared: `connection.unblocked`, and the held frames may go.
    fn release_held(&mut self) {
        if std::mem::take(&mut self.told_blocked) {
            let mut buf = Vec::new();
            put_method(
                &mut buf,
                0,
                AMQPClass::Connection(connection::AMQPMethod::Unblocked(connection::Unblocked {})),
            );
            self.out.send(buf);
        }
        self.held = false;
    }

    async fn on_frame(
        &mut self,
        frame: Inbound,
        events: &mpsc::Sender<Event>,
        notices: &mpsc::UnboundedSender<Notice>,
    ) -> Result<(), AmqpError> {
        match frame {
            Inbound::Heartbeat(0) => Ok(()),
            Inbound::Heartbeat(_) => Err(AmqpError::frame_error(
                "heartbeat on a channel other than 0",
            )),
            Inbound::ProtocolHeader(_) => Err(AmqpError::unexpected_frame(
                "protocol header after the handshake",
            )),
            Inbound::Method(0, m) => self.on_connection_method(*m).await,
            Inbound::Method(ch, m) => self.on_channel_method(ch, *m, events, notices).await,
            Inbound::Header(0, ..) | Inbound::Body(0, _) => {
                Err(AmqpError::unexpected_frame("content frame on channel 0"))
            }
            Inbound::Header(ch, header, props) => {
                let r = self.on_content_header(ch, *header, props);
                self.close_channel_on_soft_error(ch, r)
            }
            Inbound::Body(ch, body) => {
                let r = self.on_content_body(ch, body);
                self.close_channel_on_soft_error(ch, r)
            }
        }
    }

    /// A message's content completes a `basic.publish`: a soft error storing it
    /// (its queue is led elsewhere, the log refused it) closes the channel as the
    /// publish's own error would, so a confirming publisher is not left waiting.
    fn close_channel_on_soft_error(
        &mut self,
        ch: u16,
        r: Result<(), AmqpError>,
    ) -> Result<(), AmqpError> {
        match r {
            Err(e) if !e.is_hard() => {
                // Publishes before the failing one are stored as they came.
                self.store_staged();
                let e = AmqpError {
                    class_id: 60,
                    method_id: 40,
                    ..e
                };
                self.close_channel(ch, &e);
                Ok(())
            }
            other => other,
        }
    }

    async fn on_connection_method(&mut self, m: AMQPClass) -> Result<(), AmqpError> {
        match &m {
            AMQPClass::Connection(connection::AMQPMethod::Close(_)) => {
                // As RabbitMQ: by `close-ok`, exclusive queues are gone and unacked
                // messages are back in their queues.
                self.release_all().await;
                let mut buf = Vec::new();
                put_method(
                    &mut buf,
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
                );
                self.out.send(buf);
                self.closing = true;
                Ok(())
            }
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)) => {
                self.closing = true;
                Ok(())
            }
            AMQPClass::Connection(connection::AMQPMethod::Blocked(_))
            | AMQPClass::Connection(connection::AMQPMethod::Unblocked(_))
            | AMQPClass::Connection(connection::AMQPMethod::UpdateSecret(_)) => {
                Err(AmqpError::not_implemented("this connection method is not served").on(&m))
            }
            _ => Err(AmqpError::command_invalid("unexpected method on channel 0").on(&m)),
        }
    }

    /// Checks a channel number against the negotiated maximum.
    pub(crate) fn check_channel_id(&self, ch: u16) -> Result<(), AmqpError> {
        if ch > self.channel_max {
            return Err(AmqpError::not_allowed(format!(
                "channel number {ch} exceeds channel_max {}",
                self.channel_max
            )));
        }
        Ok(())
    }

    /// The largest body a single frame carries.
    pub(crate) fn body_chunk(&self) -> usize {
        (self.negotiated_frame_max - FRAME_OVERHEAD) as usize
    }

    /// Sends `connection.close`, waits briefly for `close-ok`, releases everything.
    async fn close_connection(&mut self, e: &AmqpError) {
        if e.reply_code() != 320 {
            warn!(peer = %self.peer, code = e.reply_code(), "closing AMQP connection: {}", e.text);
        }
        let mut buf = Vec::new();
        put_method(
            &mut buf,
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: e.reply_code(),
                reply_text: short(&e.text),
                class_id: e.class_id,
                method_id: e.method_id,
            })),
        );
        self.out.send(buf);
        self.release_all().await;
        let deadline = Instant::now() + CLOSE_WAIT;
        while let Ok(Some(Ok(f))) = tokio::time::timeout_at(deadline, self.recv_frame()).await {
            if let Inbound::Method(0, m) = f {
                if matches!(
                    *m,
                    AMQPClass::Connection(connection::AMQPMethod::CloseOk(_))
                        | AMQPClass::Connection(connection::AMQPMethod::Close(_))
                ) {
                    break;
                }
            }
        }
    }

    /// Every channel's unacked messages go back, consumers and exclusive queues go.
    async fn release_all(&mut self) {
        self.store_staged();
        self.settle_unconfirmed(None).await;
        let ids: Vec<u16> = self.channels.keys().copied().collect();
        for ch in ids {
            self.release_channel(ch);
        }
        self.broker.end_sessions(self.id).await;
        for name in std::mem::take(&mut self.exclusive_queues) {
            let vhost = self.vhost.clone();
            self.broker.delete_queue(&vhost, &name).await;
        }
    }
}

fn frame_error(e: &FrameError) -> AmqpError {
    match e {
        FrameError::Io(e) => AmqpError::frame_error(format!("read failed: {e}")),
        other => AmqpError::frame_error(other.to_string()),
    }
}

fn heartbeat_frame() -> Vec<u8> {
    let mut buf = Vec::new();
    crate::frame::put(&mut buf, &amq_protocol::frame::AMQPFrame::Heartbeat);
    buf
}

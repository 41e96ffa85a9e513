//! One client connection: framing, in-order pipelining and backpressure.
//!
//! The reader task reads one frame at a time and runs the synchronous part
//! of each request (decoding, appends, reads) in arrival order, so
//! idempotent sequences are checked in the order the producer sent them.
//! Parts that wait (durability for acks, long-poll fetches) run as tasks;
//! the writer task writes responses strictly in request order. At most
//! [`MAX_IN_FLIGHT`] responses are queued per connection, and the reader
//! stops reading while the responses built but not yet written hold more
//! than `max_unsent_response_bytes` (Kafka mutes such a channel): a client
//! that sends requests and never reads the answers costs the broker about
//! one budget plus one response, not a queue of full responses. Not reading
//! pushes back on the client through TCP.
//!
//! Across connections, one [`Budget`] of `max_in_flight_bytes` bounds the
//! rest. Request frames count against it from when they have arrived until
//! they are handled; while they exceed it, no reader starts a new frame
//! (Kafka's memory pool mutes channels the same way). A frame still arriving
//! costs the bytes received so far and is not counted, so a client that
//! sends part of a frame and stalls holds up no one. Responses count
//! against it from when they are built until they are written, and Fetch
//! answers are cut to what is left of it (down to one batch); while they
//! exceed it, every connection that holds unsent responses is muted, and
//! connections whose clients have taken their answers read on, so clients
//! that do not read cannot stall those that do. Together: about twice the
//! budget plus one batch per connection, however many clients push.
//!
//! A client that goes away (end of stream or a failed read) takes its
//! pending work with it: long polls and acks waits are aborted and the
//! connection's slot is free at once, as Kafka drops a closed channel's
//! responses. Only a broker shutdown lets queued responses drain. A
//! connection that neither sent a request nor got a response for
//! `connections_max_idle` is closed the same way.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use kafka_protocol::protocol::StrBytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::futures::Notified;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::dispatch::{self, Outcome};
use crate::server::Ctx;

/// Responses queued or being prepared per connection.
const MAX_IN_FLIGHT: usize = 64;

/// Request and response bytes in flight on every connection together.
pub(crate) struct Budget {
    /// Request frames being read or handled.
    requests: AtomicUsize,
    /// Responses built and not yet written.
    responses: AtomicUsize,
    limit: usize,
    /// Readers waiting for bytes to be freed: frees wake them only when
    /// there are some, so the common case touches no lock.
    waiting: AtomicUsize,
    freed: Notify,
}

// The counters and `waiting` are SeqCst: a reader counts itself waiting and
// then checks a counter, a free changes the counter and then checks for
// waiters, so one of the two always sees the other.
impl Budget {
    pub(crate) fn new(limit: usize) -> Self {
        Budget {
            requests: AtomicUsize::new(0),
            responses: AtomicUsize::new(0),
            limit,
            waiting: AtomicUsize::new(0),
            freed: Notify::new(),
        }
    }

    /// Response bytes that may still be built before the budget is spent.
    /// Fetch answers are cut to it (down to one batch, KIP-74), so many
    /// consumers reading at once share the budget instead of each building a
    /// full answer.
    pub(crate) fn response_room(&self) -> usize {
        self.limit
            .saturating_sub(self.responses.load(Ordering::SeqCst))
    }

    fn responses_over(&self) -> bool {
        self.responses.load(Ordering::SeqCst) > self.limit
    }

    fn free(&self, counter: &AtomicUsize, n: usize) -> usize {
        let taken = saturating_sub(counter, n);
        if taken > 0 && self.waiting.load(Ordering::SeqCst) > 0 {
            self.freed.notify_waiters();
        }
        taken
    }

    /// A wake-up for the next free, registered (and counted as waiting)
    /// before the caller checks its condition again.
    fn next_free(&self) -> (Waiting<'_>, Pin<Box<Notified<'_>>>) {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let waiting = Waiting(self);
        let mut freed = Box::pin(self.freed.notified());
        freed.as_mut().enable();
        (waiting, freed)
    }

    fn requests_over(&self) -> bool {
        self.requests.load(Ordering::SeqCst) > self.limit
    }

    /// Waits, holding nothing, while the request frames being handled exceed
    /// the limit; a reader calls it before it starts the next frame, so a
    /// client that sends half a frame and stalls stalls nobody else.
    async fn wait_for_requests(&self) {
        while self.requests_over() {
            let (_waiting, freed) = self.next_free();
            if !self.requests_over() {
                return;
            }
            freed.await;
        }
    }

    /// Counts a whole request frame of `n` bytes until the guard is dropped.
    fn count_request(self: &Arc<Self>, n: usize) -> Reserved {
        self.requests.fetch_add(n, Ordering::SeqCst);
        Reserved {
            budget: self.clone(),
            bytes: n,
        }
    }
}

/// Counts a reader as waiting on [`Budget::freed`] while alive.
struct Waiting<'a>(&'a Budget);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A request frame's bytes counted in the [`Budget`], given back on drop.
struct Reserved {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.budget.free(&self.budget.requests, self.bytes);
    }
}

/// Bytes of responses built for one connection and not yet written; they
/// count against the broker-wide [`Budget`] too, until written or, when the
/// connection is gone, until the last of its pending work ends.
pub(crate) struct Unsent {
    bytes: AtomicUsize,
    written: Notify,
    budget: Arc<Budget>,
    /// The listener's figures: a response counts its error codes where it is
    /// built, in the connection's scope or in a task started from it.
    pub(crate) metrics: Arc<crate::KafkaMetrics>,
}

impl Unsent {
    fn new(budget: Arc<Budget>, metrics: Arc<crate::KafkaMetrics>) -> Self {
        Unsent {
            bytes: AtomicUsize::new(0),
            written: Notify::new(),
            budget,
            metrics,
        }
    }

    pub(crate) fn add(&self, n: usize) {
        self.bytes.fetch_add(n, Ordering::SeqCst);
        self.budget.responses.fetch_add(n, Ordering::SeqCst);
    }

    fn sub(&self, n: usize) {
        let taken = saturating_sub(&self.bytes, n);
        self.budget.free(&self.budget.responses, taken);
        self.written.notify_one();
    }

    fn get(&self) -> usize {
        self.bytes.load(Ordering::SeqCst)
    }

    /// Whether this connection must not read: its client has not taken
    /// enough of its answers, or all connections' unsent answers are over
    /// the broker-wide budget and some of them are this one's.
    fn muted(&self, own_limit: usize) -> bool {
        let own = self.get();
        own > own_limit || (own > 0 && self.budget.responses_over())
    }
}

impl Drop for Unsent {
    fn drop(&mut self) {
        // Responses that were built and never written (the client left).
        let left = *self.bytes.get_mut();
        self.budget.free(&self.budget.responses, left);
    }
}

/// Subtracts at most what `counter` holds (a response built outside a
/// connection's scope was never counted, and wrapping around would mute
/// readers for good); returns what was subtracted.
fn saturating_sub(counter: &AtomicUsize, n: usize) -> usize {
    let before = counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| {
            Some(b.saturating_sub(n))
        })
        .unwrap_or_else(|b| b);
    before.min(n)
}

tokio::task_local! {
    /// The connection whose request is being dispatched: a response finished
    /// later (`dispatch::later`) counts itself against this connection's budget.
    pub(crate) static UNSENT: Arc<Unsent>;
    /// Who sends the request being dispatched, for client quotas.
    pub(crate) static CLIENT: Arc<Client>;
}

/// The client on a connection, as its requests name it, and until when its
/// quota keeps the connection muted (KIP-219: the answer goes out at once,
/// the next request is read only after the throttle time).
pub(crate) struct Client {
    id: parking_lot::Mutex<StrBytes>,
    start: Instant,
    /// Milliseconds after `start`; 0 when not muted.
    muted_until_ms: AtomicU64,
}

impl Client {
    fn new() -> Self {
        Client {
            id: parking_lot::Mutex::new(StrBytes::default()),
            start: Instant::now(),
            muted_until_ms: AtomicU64::new(0),
        }
    }

    /// The client id of the request being dispatched (headers carry it on
    /// every request; it rarely changes on a connection).
    pub(crate) fn set_id(&self, id: Option<&StrBytes>) {
        let id = id.map_or("", |id| id.as_str());
        let mut current = self.id.lock();
        if current.as_str() != id {
            *current = StrBytes::from_string(id.to_owned());
        }
    }

    pub(crate) fn id(&self) -> StrBytes {
        self.id.lock().clone()
    }

    /// Mutes the connection for `d` from now (a longer mute stands).
    pub(crate) fn mute_for(&self, d: std::time::Duration) {
        let until = self.start.elapsed() + d;
        let ms = u64::try_from(until.as_millis()).unwrap_or(u64::MAX).max(1);
        self.muted_until_ms.fetch_max(ms, Ordering::SeqCst);
    }

    fn muted_until(&self) -> Option<Instant> {
        match self.muted_until_ms.load(Ordering::SeqCst) {
            0 => None,
            ms => Some(self.start + std::time::Duration::from_millis(ms)),
        }
    }
}

/// Which request a response answers, and when it was read (its time in
/// the request metrics runs until the response is ready to write).
#[derive(Clone, Copy)]
struct Asked {
    api_key: i16,
    at: Instant,
}

/// A response in its place in the connection's order.
pub(crate) enum Slot {
    /// Encoded and ready to write.
    Ready(Bytes),
    /// Still waiting; `None` from the task means close the connection
    /// (the reason was logged).
    Pending(JoinHandle<Option<Bytes>>),
}

pub(crate) async fn run(
    ctx: Arc<Ctx>,
    socket: TcpStream,
    peer: SocketAddr,
    stop: watch::Receiver<bool>,
) {
    if let Err(err) = socket.set_nodelay(true) {
        tracing::debug!(%peer, error = %err, "set_nodelay failed");
    }
    let _open = ctx.metrics.connection();
    let (reader, writer) = socket.into_split();
    let (tx, rx) = mpsc::channel(MAX_IN_FLIGHT);
    let (gone_tx, gone_rx) = watch::channel(false);
    let activity = Arc::new(Activity::new());
    let unsent = Arc::new(Unsent::new(ctx.budget.clone(), ctx.metrics.clone()));
    let client = Arc::new(Client::new());
    let writer = tokio::spawn(write_loop(
        writer,
        rx,
        peer,
        gone_rx,
        (activity.clone(), unsent.clone()),
        ctx.metrics.clone(),
    ));
    let ended = read_loop(&ctx, reader, tx, peer, stop, &activity, (&unsent, &client)).await;
    if ended == Ended::PeerGone {
        let _ = gone_tx.send(true);
    }
    // The sender is gone: the writer flushes what is queued and closes, or
    // (peer gone) aborts it.
    if let Err(err) = writer.await {
        tracing::error!(%peer, error = %err, "connection writer failed");
    }
}

/// When the connection last read a request or wrote a response.
struct Activity {
    start: Instant,
    /// Milliseconds after `start`.
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + std::time::Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Why the reader stopped.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// The client closed the connection, it broke, or it sat idle: nobody
    /// will read the answers still pending.
    PeerGone,
    /// The broker stops, or closes the connection itself.
    Closed,
}

async fn read_loop<R: AsyncRead + Unpin>(
    ctx: &Arc<Ctx>,
    reader: R,
    tx: mpsc::Sender<(Slot, Asked)>,
    peer: SocketAddr,
    mut stop: watch::Receiver<bool>,
    activity: &Activity,
    (unsent, client): (&Arc<Unsent>, &Arc<Client>),
) -> Ended {
    let mut reader = BufReader::with_capacity(64 * 1024, reader);
    let max = ctx.config.max_request_bytes;
    // Capped so that adding it to an instant cannot overflow.
    let idle = ctx
        .config
        .connections_max_idle
        .min(std::time::Duration::from_secs(365 * 24 * 3600));
    let budget = ctx.config.max_unsent_response_bytes;
    loop {
        if *stop.borrow() {
            return Ended::Closed;
        }
        // Muted while its answers hold too much (see `Unsent::muted`).
        while unsent.muted(budget) {
            let written = unsent.written.notified();
            let (_waiting, freed) = ctx.budget.next_free();
            if !unsent.muted(budget) {
                break;
            }
            tokio::select! {
                _ = stop.changed() => return Ended::Closed,
                _ = tx.closed() => return Ended::PeerGone,
                _ = written => {}
                _ = freed => {}
                // A client that takes none of its answers (a stopped process
                // keeps its receive window at zero) is idle too.
                _ = tokio::time::sleep_until(activity.last() + idle) => {
                    if activity.last() + idle <= Instant::now() {
                        tracing::debug!(%peer, idle_ms = idle.as_millis(), "closing connection whose client takes no answers");
                        return Ended::PeerGone;
                    }
                }
            }
        }
        tokio::select! {
            _ = stop.changed() => return Ended::Closed,
            _ = tx.closed() => return Ended::PeerGone,
            _ = ctx.budget.wait_for_requests() => {}
        }
        // One read future across idle checks: dropping it mid-frame would
        // lose the bytes it already took.
        let read = read_frame(&mut reader, max, peer);
        tokio::pin!(read);
        let frame = loop {
            let idle_at = activity.last() + idle;
            tokio::select! {
                _ = stop.changed() => return Ended::Closed,
                // The writer closed (peer gone or a fatal response error).
                _ = tx.closed() => return Ended::PeerGone,
                _ = tokio::time::sleep_until(idle_at) => {
                    // A response written meanwhile counts as activity.
                    if activity.last() + idle <= Instant::now() {
                        tracing::debug!(%peer, idle_ms = idle.as_millis(), "closing idle connection");
                        return Ended::PeerGone;
                    }
                }
                frame = &mut read => match frame {
                    Ok(frame) => break frame,
                    Err(ended) => return ended,
                },
            }
        };
        activity.touch();
        // Muted while its quota's throttle time runs: checked once the frame
        // is in, so a mute set while it was awaited (a long poll answered
        // meanwhile) holds it too.
        if let Some(until) = client.muted_until() {
            tokio::select! {
                _ = stop.changed() => return Ended::Closed,
                _ = tx.closed() => return Ended::PeerGone,
                _ = tokio::time::sleep_until(until) => {}
            }
        }
        let asked = Asked {
            api_key: frame
                .get(..2)
                .map_or(-1, |k| i16::from_be_bytes([k[0], k[1]])),
            at: Instant::now(),
        };
        let in_flight = ctx.budget.count_request(frame.len());
        let outcome = UNSENT
            .scope(
                unsent.clone(),
                CLIENT.scope(client.clone(), dispatch::handle(ctx, frame, peer)),
            )
            .await;
        drop(in_flight);
        match outcome {
            Outcome::Respond(slot) => {
                if let Slot::Ready(bytes) = &slot {
                    unsent.add(bytes.len());
                }
                if tx.send((slot, asked)).await.is_err() {
                    // The writer is gone (peer closed); stop reading.
                    return Ended::PeerGone;
                }
            }
            Outcome::NoResponse => ctx.metrics.request(asked.api_key, asked.at.elapsed()),
            Outcome::Close => return Ended::Closed,
        }
    }
}

/// Reads one size-prefixed frame; an error ends the connection (logged here
/// when the peer did something wrong). Its buffer's pages become resident
/// only as its bytes arrive.
async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    max: usize,
    peer: SocketAddr,
) -> Result<Bytes, Ended> {
    let size = match reader.read_i32().await {
        Ok(size) => size,
        Err(err) => {
            if err.kind() != std::io::ErrorKind::UnexpectedEof {
                tracing::debug!(%peer, error = %err, "read failed");
            }
            return Err(Ended::PeerGone);
        }
    };
    // Checked before allocating anything for the frame.
    let len = match usize::try_from(size) {
        Ok(len) if len <= max => len,
        _ => {
            tracing::warn!(%peer, size, max, "closing connection: request size out of range");
            return Err(Ended::Closed);
        }
    };
    let mut buf = BytesMut::with_capacity(len);
    let mut limited = reader.take(len as u64);
    while buf.len() < len {
        match limited.read_buf(&mut buf).await {
            Ok(0) => {
                tracing::warn!(%peer, expected = len, got = buf.len(), "closing connection: truncated request frame");
                return Err(Ended::PeerGone);
            }
            Ok(_) => {}
            Err(err) => {
                tracing::debug!(%peer, error = %err, "read failed");
                return Err(Ended::PeerGone);
            }
        }
    }
    Ok(buf.freeze())
}

async fn write_loop(
    writer: OwnedWriteHalf,
    mut rx: mpsc::Receiver<(Slot, Asked)>,
    peer: SocketAddr,
    mut gone: watch::Receiver<bool>,
    (activity, unsent): (Arc<Activity>, Arc<Unsent>),
    metrics: Arc<crate::KafkaMetrics>,
) {
    let mut writer = BufWriter::with_capacity(64 * 1024, writer);
    while let Some((slot, asked)) = rx.recv().await {
        let bytes = match slot {
            Slot::Ready(bytes) => bytes,
            Slot::Pending(mut task) => {
                let done = tokio::select! {
                    done = &mut task => done,
                    Ok(_) = gone.wait_for(|gone| *gone) => {
                        task.abort();
                        abort_pending(&mut rx);
                        return;
                    }
                };
                match done {
                    Ok(Some(bytes)) => bytes,
                    Ok(None) => break,
                    Err(err) => {
                        tracing::error!(%peer, error = %err, "request task failed; closing connection");
                        break;
                    }
                }
            }
        };
        metrics.request(asked.api_key, asked.at.elapsed());
        // A client gone (or idle past its limit) while a write waits on its
        // full receive window must not keep this task and its bytes forever.
        let written = tokio::select! {
            r = writer.write_all(&bytes) => r,
            Ok(_) = gone.wait_for(|gone| *gone) => {
                abort_pending(&mut rx);
                return;
            }
        };
        if let Err(err) = written {
            tracing::debug!(%peer, error = %err, "write failed");
            return;
        }
        // Every response was counted when it was built (ready now, or by its task).
        unsent.sub(bytes.len());
        activity.touch();
        // Coalesce writes of responses that are already queued.
        if rx.is_empty() {
            let flushed = tokio::select! {
                r = writer.flush() => r,
                Ok(_) = gone.wait_for(|gone| *gone) => {
                    abort_pending(&mut rx);
                    return;
                }
            };
            if let Err(err) = flushed {
                tracing::debug!(%peer, error = %err, "write failed");
                return;
            }
        }
    }
    let _ = writer.flush().await;
    let _ = writer.shutdown().await;
}

/// Aborts the work queued for a client that is gone.
fn abort_pending(rx: &mut mpsc::Receiver<(Slot, Asked)>) {
    rx.close();
    while let Ok((slot, _)) = rx.try_recv() {
        if let Slot::Pending(task) = slot {
            task.abort();
        }
    }
}

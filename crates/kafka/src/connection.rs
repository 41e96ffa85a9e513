//! One client connection: framing, in-order pipelining and backpressure.
//!
//! The reader task reads one frame at a time and runs the synchronous part
//! of each request (decoding, appends, reads) in arrival order, so
//! idempotent sequences are checked in the order the producer sent them.
//! Parts that wait (durability for acks, long-poll fetches) run as tasks;
//! the writer task writes responses strictly in request order. At most
//! [`MAX_IN_FLIGHT`] responses are queued per connection; beyond that the
//! reader stops reading, which pushes back on the client through TCP.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::dispatch::{self, Outcome};
use crate::server::Ctx;

/// Responses queued or being prepared per connection.
const MAX_IN_FLIGHT: usize = 64;

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
    let (reader, writer) = socket.into_split();
    let (tx, rx) = mpsc::channel(MAX_IN_FLIGHT);
    let writer = tokio::spawn(write_loop(writer, rx, peer));
    read_loop(&ctx, reader, tx, peer, stop).await;
    // The sender is gone: the writer flushes what is queued and closes.
    if let Err(err) = writer.await {
        tracing::error!(%peer, error = %err, "connection writer failed");
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    ctx: &Arc<Ctx>,
    reader: R,
    tx: mpsc::Sender<Slot>,
    peer: SocketAddr,
    mut stop: watch::Receiver<bool>,
) {
    let mut reader = BufReader::with_capacity(64 * 1024, reader);
    let max = ctx.config.max_request_bytes;
    loop {
        if *stop.borrow() {
            return;
        }
        let frame = tokio::select! {
            _ = stop.changed() => return,
            // The writer closed (peer gone or a fatal response error).
            _ = tx.closed() => return,
            frame = read_frame(&mut reader, max, peer) => match frame {
                Some(frame) => frame,
                None => return,
            },
        };
        match dispatch::handle(ctx, frame, peer).await {
            Outcome::Respond(slot) => {
                if tx.send(slot).await.is_err() {
                    // The writer is gone (peer closed); stop reading.
                    return;
                }
            }
            Outcome::NoResponse => {}
            Outcome::Close => return,
        }
    }
}

/// Reads one size-prefixed frame; None closes the connection (logged here
/// when the peer did something wrong).
async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    max: usize,
    peer: SocketAddr,
) -> Option<Bytes> {
    let size = match reader.read_i32().await {
        Ok(size) => size,
        Err(err) => {
            if err.kind() != std::io::ErrorKind::UnexpectedEof {
                tracing::debug!(%peer, error = %err, "read failed");
            }
            return None;
        }
    };
    // Checked before allocating anything for the frame.
    let len = match usize::try_from(size) {
        Ok(len) if len <= max => len,
        _ => {
            tracing::warn!(%peer, size, max, "closing connection: request size out of range");
            return None;
        }
    };
    let mut buf = BytesMut::with_capacity(len);
    let mut limited = reader.take(len as u64);
    while buf.len() < len {
        match limited.read_buf(&mut buf).await {
            Ok(0) => {
                tracing::warn!(%peer, expected = len, got = buf.len(), "closing connection: truncated request frame");
                return None;
            }
            Ok(_) => {}
            Err(err) => {
                tracing::debug!(%peer, error = %err, "read failed");
                return None;
            }
        }
    }
    Some(buf.freeze())
}

async fn write_loop(writer: OwnedWriteHalf, mut rx: mpsc::Receiver<Slot>, peer: SocketAddr) {
    let mut writer = BufWriter::with_capacity(64 * 1024, writer);
    while let Some(slot) = rx.recv().await {
        let bytes = match slot {
            Slot::Ready(bytes) => bytes,
            Slot::Pending(task) => match task.await {
                Ok(Some(bytes)) => bytes,
                Ok(None) => break,
                Err(err) => {
                    tracing::error!(%peer, error = %err, "request task failed; closing connection");
                    break;
                }
            },
        };
        if let Err(err) = writer.write_all(&bytes).await {
            tracing::debug!(%peer, error = %err, "write failed");
            return;
        }
        // Coalesce writes of responses that are already queued.
        if rx.is_empty() {
            if let Err(err) = writer.flush().await {
                tracing::debug!(%peer, error = %err, "write failed");
                return;
            }
        }
    }
    let _ = writer.flush().await;
    let _ = writer.shutdown().await;
}

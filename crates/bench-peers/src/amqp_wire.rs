//! A pipelined AMQP 0-9-1 client for load generation: frames are encoded and
//! parsed by amq-protocol, but messages are written back to back from one
//! pre-encoded template and confirms and deliveries are read in bulk, so the
//! client costs a few microseconds of CPU per message. A general-purpose client
//! (lapin costs ~50 µs per confirmed publish here) would be the bottleneck on a
//! two-core machine and the suite would measure it rather than the broker.

use std::collections::VecDeque;

use amq_protocol::frame::parsing::parse_frame;
use amq_protocol::frame::{gen_frame, AMQPContentHeader, AMQPFrame, WriteContext};
use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::protocol::{basic, channel, confirm, connection, queue, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use amq_protocol::uri::AMQPUri;
use anyhow::{bail, Context, Result};
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// The channel every operation of this client uses.
pub const CHANNEL: u16 = 1;
const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";
/// A frame's bytes besides its payload: type, channel, size, frame-end.
const FRAME_OVERHEAD: usize = 8;

/// Appends one encoded frame to `out`.
pub fn put(out: &mut Vec<u8>, frame: &AMQPFrame) -> Result<()> {
    let ctx = gen_frame(frame)(WriteContext::from(Vec::new()))
        .map_err(|e| anyhow::anyhow!("encoding an AMQP frame: {e}"))?;
    out.extend_from_slice(&ctx.into_inner().0);
    Ok(())
}

fn method(m: AMQPClass) -> AMQPFrame {
    AMQPFrame::Method(CHANNEL, m)
}

/// Frames in from one socket.
pub struct Reader {
    io: OwnedReadHalf,
    buf: BytesMut,
}

impl Reader {
    /// The next frame, reading more only when no whole frame is buffered.
    pub async fn next(&mut self) -> Result<AMQPFrame> {
        loop {
            if let Some(f) = self.buffered()? {
                return Ok(f);
            }
            self.fill().await?;
        }
    }

    /// A whole frame already in the buffer, if there is one.
    pub fn buffered(&mut self) -> Result<Option<AMQPFrame>> {
        if self.buf.len() < 7 {
            return Ok(None);
        }
        let size = u32::from_be_bytes([self.buf[3], self.buf[4], self.buf[5], self.buf[6]]);
        let total = size as usize + FRAME_OVERHEAD;
        if self.buf.len() < total {
            return Ok(None);
        }
        let (_, frame) = parse_frame(&self.buf[..total])
            .map_err(|e| anyhow::anyhow!("malformed frame from the broker: {e}"))?;
        self.buf.advance(total);
        Ok(Some(frame))
    }

    /// Reads whatever the socket has.
    pub async fn fill(&mut self) -> Result<()> {
        if self.buf.capacity() - self.buf.len() < 16 * 1024 {
            self.buf.reserve(256 * 1024);
        }
        if self.io.read_buf(&mut self.buf).await? == 0 {
            bail!("the broker closed the connection");
        }
        Ok(())
    }

    /// The next method on `CHANNEL` or 0, skipping heartbeats; a close is an error.
    pub async fn method(&mut self) -> Result<AMQPClass> {
        loop {
            match self.next().await? {
                AMQPFrame::Heartbeat => continue,
                AMQPFrame::Method(_, AMQPClass::Connection(connection::AMQPMethod::Close(c))) => {
                    bail!("connection closed: {} {}", c.reply_code, c.reply_text)
                }
                AMQPFrame::Method(_, AMQPClass::Channel(channel::AMQPMethod::Close(c))) => {
                    bail!("channel closed: {} {}", c.reply_code, c.reply_text)
                }
                AMQPFrame::Method(_, m) => return Ok(m),
                other => bail!("expected a method, got {other:?}"),
            }
        }
    }
}

/// One connection with channel `CHANNEL` open.
pub struct Wire {
    pub reader: Reader,
    pub writer: OwnedWriteHalf,
    pub frame_max: u32,
}

impl Wire {
    /// Connects, logs in with PLAIN, opens the vhost and channel 1.
    pub async fn connect(url: &str) -> Result<Wire> {
        let uri: AMQPUri = url
            .parse()
            .map_err(|e| anyhow::anyhow!("bad AMQP URL {url}: {e}"))?;
        let addr = format!("{}:{}", uri.authority.host, uri.authority.port);
        let socket = TcpStream::connect(&addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        socket.set_nodelay(true)?;
        let (r, w) = socket.into_split();
        let mut wire = Wire {
            reader: Reader {
                io: r,
                buf: BytesMut::with_capacity(256 * 1024),
            },
            writer: w,
            frame_max: 4096,
        };
        wire.writer.write_all(PROTOCOL_HEADER).await?;
        match wire.reader.method().await? {
            AMQPClass::Connection(connection::AMQPMethod::Start(_)) => {}
            other => bail!("expected connection.start, got {other:?}"),
        }
        let user = &uri.authority.userinfo;
        let response = format!("\0{}\0{}", user.username, user.password);
        wire.send_frames(&[AMQPFrame::Method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: FieldTable::default(),
                mechanism: "PLAIN".into(),
                response: response.into(),
                locale: "en_US".into(),
            })),
        )])
        .await?;
        let tune = match wire.reader.method().await? {
            AMQPClass::Connection(connection::AMQPMethod::Tune(t)) => t,
            other => bail!("expected connection.tune, got {other:?}"),
        };
        wire.frame_max = if tune.frame_max == 0 {
            131_072
        } else {
            tune.frame_max.min(131_072)
        };
        wire.send_frames(&[
            AMQPFrame::Method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                    channel_max: tune.channel_max,
                    frame_max: wire.frame_max,
                    // No heartbeats: the runs are short and always busy.
                    heartbeat: 0,
                })),
            ),
            AMQPFrame::Method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                    virtual_host: uri.vhost.as_str().into(),
                })),
            ),
        ])
        .await?;
        match wire.reader.method().await? {
            AMQPClass::Connection(connection::AMQPMethod::OpenOk(_)) => {}
            other => bail!("expected connection.open-ok, got {other:?}"),
        }
        wire.call(AMQPClass::Channel(channel::AMQPMethod::Open(
            channel::Open {},
        )))
        .await?;
        Ok(wire)
    }

    pub async fn send_frames(&mut self, frames: &[AMQPFrame]) -> Result<()> {
        let mut out = Vec::new();
        for f in frames {
            put(&mut out, f)?;
        }
        self.writer.write_all(&out).await?;
        Ok(())
    }

    /// Sends a synchronous method on `CHANNEL` and returns its reply.
    pub async fn call(&mut self, m: AMQPClass) -> Result<AMQPClass> {
        self.send_frames(&[method(m)]).await?;
        self.reader.method().await
    }

    pub async fn confirm_select(&mut self) -> Result<()> {
        self.call(AMQPClass::Confirm(confirm::AMQPMethod::Select(
            confirm::Select { nowait: false },
        )))
        .await?;
        Ok(())
    }

    pub async fn queue_delete(&mut self, name: &str) -> Result<()> {
        self.call(AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
            queue: name.into(),
            if_unused: false,
            if_empty: false,
            nowait: false,
        })))
        .await?;
        Ok(())
    }

    pub async fn queue_declare(&mut self, name: &str, queue_type: &str) -> Result<()> {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from(queue_type)),
        );
        self.call(AMQPClass::Queue(queue::AMQPMethod::Declare(
            queue::Declare {
                queue: name.into(),
                passive: false,
                durable: true,
                exclusive: false,
                auto_delete: false,
                nowait: false,
                arguments: args,
            },
        )))
        .await?;
        Ok(())
    }

    pub async fn qos(&mut self, prefetch: u16) -> Result<()> {
        self.call(AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count: prefetch,
            global: false,
        })))
        .await?;
        Ok(())
    }

    pub async fn consume(&mut self, queue: &str, arguments: FieldTable) -> Result<()> {
        self.call(AMQPClass::Basic(basic::AMQPMethod::Consume(
            basic::Consume {
                queue: queue.into(),
                consumer_tag: "sluice-bench".into(),
                no_local: false,
                no_ack: false,
                exclusive: false,
                nowait: false,
                arguments,
            },
        )))
        .await?;
        Ok(())
    }

    pub async fn close(mut self) -> Result<()> {
        self.send_frames(&[AMQPFrame::Method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: 200,
                reply_text: "bench done".into(),
                class_id: 0,
                method_id: 0,
            })),
        )])
        .await?;
        // close-ok, or anything still in flight before it: the run is over.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                match self.reader.next().await {
                    Ok(AMQPFrame::Method(
                        0,
                        AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)),
                    ))
                    | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        Ok(())
    }
}

/// One persistent `basic.publish` to the default exchange, encoded once; each
/// send patches the timestamp at the front of the body.
pub struct PublishTemplate {
    bytes: Vec<u8>,
    body_at: usize,
}

impl PublishTemplate {
    pub fn new(routing_key: &str, body: &[u8], frame_max: u32) -> Result<Self> {
        let mut bytes = Vec::new();
        put(
            &mut bytes,
            &method(AMQPClass::Basic(basic::AMQPMethod::Publish(
                basic::Publish {
                    exchange: "".into(),
                    routing_key: routing_key.into(),
                    mandatory: false,
                    immediate: false,
                },
            ))),
        )?;
        put(
            &mut bytes,
            &AMQPFrame::Header(
                CHANNEL,
                AMQPContentHeader {
                    class_id: 60,
                    body_size: body.len() as u64,
                    properties: AMQPProperties::default().with_delivery_mode(2),
                },
            ),
        )?;
        let chunk = (frame_max as usize).saturating_sub(FRAME_OVERHEAD).max(1);
        let mut body_at = None;
        for part in body.chunks(chunk) {
            body_at.get_or_insert(bytes.len() + 7);
            put(&mut bytes, &AMQPFrame::Body(CHANNEL, part.to_vec()))?;
        }
        let body_at = body_at.context("an empty body has no timestamp")?;
        Ok(PublishTemplate { bytes, body_at })
    }

    /// Appends one publish whose body carries `stamp_ns`.
    pub fn put(&self, out: &mut Vec<u8>, stamp_ns: u64) {
        let at = out.len() + self.body_at;
        out.extend_from_slice(&self.bytes);
        crate::stats::stamp(&mut out[at..], stamp_ns);
    }
}

/// Confirms of a publisher: sequence numbers outstanding and their send times.
#[derive(Default)]
pub struct Outstanding {
    /// Send time (ns since start) of each unconfirmed sequence number, oldest first.
    due: VecDeque<u64>,
    /// Sequence number of `due`'s front.
    first: u64,
}

impl Outstanding {
    pub fn new() -> Self {
        Outstanding {
            due: VecDeque::new(),
            first: 1,
        }
    }

    pub fn len(&self) -> usize {
        self.due.len()
    }

    pub fn push(&mut self, due_ns: u64) {
        self.due.push_back(due_ns);
    }

    /// Settles through `tag` (or only `tag` when not `multiple`); calls `each`
    /// with every settled message's send time.
    pub fn settle(&mut self, tag: u64, multiple: bool, mut each: impl FnMut(u64)) -> Result<()> {
        if tag < self.first || tag >= self.first + self.due.len() as u64 {
            bail!("confirm for unknown sequence number {tag}");
        }
        if !multiple && tag != self.first {
            // Out-of-order single confirms: RabbitMQ sends them in order per
            // queue, and this client publishes to one queue.
            bail!("confirm for {tag} before {}", self.first);
        }
        while self.first <= tag {
            if let Some(d) = self.due.pop_front() {
                each(d);
            }
            self.first += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multiple_confirm_settles_everything_up_to_its_tag() {
        let mut o = Outstanding::new();
        for d in [10, 20, 30] {
            o.push(d);
        }
        let mut seen = Vec::new();
        o.settle(2, true, |d| seen.push(d)).expect("settles");
        assert_eq!(seen, vec![10, 20]);
        assert_eq!(o.len(), 1);
        assert!(o.settle(2, false, |_| ()).is_err(), "already settled");
        o.settle(3, false, |d| seen.push(d)).expect("settles");
        assert_eq!(seen, vec![10, 20, 30]);
        assert!(o.settle(4, true, |_| ()).is_err(), "never sent");
    }

    #[test]
    fn the_template_stamps_the_body_it_carries() {
        let body = crate::stats::payload(100);
        let t = PublishTemplate::new("q", &body, 4096).expect("template");
        let mut out = Vec::new();
        t.put(&mut out, 7);
        t.put(&mut out, 9);
        let mut frames = Vec::new();
        let mut rest = &out[..];
        while !rest.is_empty() {
            let (r, f) = parse_frame(rest).expect("parses");
            frames.push(f);
            rest = r;
        }
        assert_eq!(frames.len(), 6);
        let stamps: Vec<u64> = frames
            .iter()
            .filter_map(|f| match f {
                AMQPFrame::Body(_, b) => {
                    assert_eq!(b.len(), 100);
                    assert_eq!(b[8..], body[8..]);
                    crate::stats::read_stamp(b)
                }
                _ => None,
            })
            .collect();
        assert_eq!(stamps, vec![7, 9]);
    }
}

//! Frames on the socket. Parsing and generation are amq-protocol's; this module only
//! bounds what is buffered: a frame's declared size is checked against the
//! negotiated `frame_max` before its payload is read, and a body frame's payload
//! stays a slice of the read buffer.

use amq_protocol::frame::parsing::parse_raw_frame;
use amq_protocol::frame::{gen_frame, AMQPContentHeader, AMQPFrame, AMQPFrameType, WriteContext};
use amq_protocol::protocol::{parse_class, AMQPClass};
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Bytes before a frame's payload: type, channel, size.
const HEADER_LEN: usize = 7;
/// The frame-end octet after the payload.
const END_LEN: usize = 1;
/// A frame's bytes besides its payload.
pub(crate) const FRAME_OVERHEAD: u32 = (HEADER_LEN + END_LEN) as u32;

/// One frame a client sent.
#[derive(Debug)]
pub(crate) enum Inbound {
    /// `AMQP` followed by a version: only valid as the first bytes.
    ProtocolHeader([u8; 8]),
    Method(u16, Box<AMQPClass>),
    /// The parsed header and its properties exactly as sent (stored unchanged).
    Header(u16, Box<AMQPContentHeader>, Bytes),
    Body(u16, Bytes),
    Heartbeat(u16),
}

/// Why the byte stream is not AMQP.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FrameError {
    #[error("frame of {size} bytes exceeds frame_max {max}")]
    TooLarge { size: u64, max: u32 },
    #[error("malformed {0} frame")]
    Malformed(&'static str),
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Reads frames from one socket into one growing buffer.
pub(crate) struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    /// An error behind frames already returned, for the next call.
    failed: Option<FrameError>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(crate) fn new(io: R) -> Self {
        FrameReader {
            io,
            buf: BytesMut::with_capacity(64 * 1024),
            failed: None,
        }
    }

    /// Every whole frame the buffer holds, reading once when it holds none:
    /// what one socket read brought, so the connection handles it as one batch
    /// (one append per queue, one hand-off). `false` at a clean end of stream.
    /// Frames parsed before an error are returned first; the error comes with
    /// the next call. Cancel-safe like `next`.
    pub(crate) async fn next_batch(
        &mut self,
        frame_max: u32,
        out: &mut Vec<Inbound>,
    ) -> Result<bool, FrameError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        loop {
            loop {
                match parse_one(&mut self.buf, frame_max) {
                    Ok(Some(frame)) => {
                        // A connection method (the handshake's `tune-ok`
                        // among them) ends the batch: frames behind it are
                        // parsed under the `frame_max` it leads to.
                        let ends =
                            matches!(frame, Inbound::ProtocolHeader(_) | Inbound::Method(0, _));
                        out.push(frame);
                        if ends {
                            return Ok(true);
                        }
                    }
                    Ok(None) => break,
                    Err(e) if out.is_empty() => return Err(e),
                    Err(e) => {
                        self.failed = Some(e);
                        return Ok(true);
                    }
                }
            }
            if !out.is_empty() {
                return Ok(true);
            }
            match self.next(frame_max).await? {
                Some(frame) => out.push(frame),
                None => return Ok(false),
            }
        }
    }

    /// The next frame, `None` at a clean end of stream. `frame_max` bounds the whole
    /// frame (at least 4096 once tuned). Cancel-safe: bytes read stay buffered.
    pub(crate) async fn next(&mut self, frame_max: u32) -> Result<Option<Inbound>, FrameError> {
        loop {
            if let Some(frame) = parse_one(&mut self.buf, frame_max)? {
                return Ok(Some(frame));
            }
            if self.buf.capacity() - self.buf.len() < 8 * 1024 {
                self.buf.reserve(64 * 1024);
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()))
                };
            }
        }
    }
}

/// Takes one whole frame off the front of `buf`; `None` until one has arrived.
/// A declared size above `frame_max` is an error before the payload is awaited.
pub(crate) fn parse_one(buf: &mut BytesMut, frame_max: u32) -> Result<Option<Inbound>, FrameError> {
    if buf.first() == Some(&b'A') {
        if buf.len() < 8 {
            return Ok(None);
        }
        let mut header = [0u8; 8];
        buf.copy_to_slice(&mut header);
        return Ok(Some(Inbound::ProtocolHeader(header)));
    }
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]);
    let total = u64::from(size) + u64::from(FRAME_OVERHEAD);
    if total > u64::from(frame_max) {
        return Err(FrameError::TooLarge {
            size: total,
            max: frame_max,
        });
    }
    let total = usize::try_from(total).map_err(|_| FrameError::Malformed("oversized"))?;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let frame = buf.split_to(total).freeze();
    decode(frame).map(Some)
}

/// Decodes one whole frame (`frame` holds exactly its bytes).
fn decode(frame: Bytes) -> Result<Inbound, FrameError> {
    let kind = match frame[0] {
        amq_protocol::protocol::constants::FRAME_METHOD => AMQPFrameType::Method,
        amq_protocol::protocol::constants::FRAME_HEADER => AMQPFrameType::Header,
        amq_protocol::protocol::constants::FRAME_BODY => AMQPFrameType::Body,
        amq_protocol::protocol::constants::FRAME_HEARTBEAT => AMQPFrameType::Heartbeat,
        other => return Err(FrameError::UnknownType(other)),
    };
    let (rest, raw) =
        parse_raw_frame(kind)(&frame[1..]).map_err(|_| FrameError::Malformed("raw"))?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed("raw"));
    }
    let channel = raw.channel_id;
    Ok(match kind {
        AMQPFrameType::Method => {
            let (rest, class) =
                parse_class(raw.payload).map_err(|_| FrameError::Malformed("method"))?;
            if !rest.is_empty() {
                return Err(FrameError::Malformed("method"));
            }
            Inbound::Method(channel, Box::new(class))
        }
        AMQPFrameType::Header => {
            let (rest, header) = amq_protocol::frame::parsing::parse_content_header(raw.payload)
                .map_err(|_| FrameError::Malformed("content header"))?;
            if !rest.is_empty() {
                return Err(FrameError::Malformed("content header"));
            }
            // class id, weight and body size precede the properties.
            let props = frame.slice(HEADER_LEN + 12..frame.len() - END_LEN);
            Inbound::Header(channel, Box::new(header), props)
        }
        AMQPFrameType::Body => {
            let start = HEADER_LEN;
            Inbound::Body(channel, frame.slice(start..frame.len() - END_LEN))
        }
        AMQPFrameType::Heartbeat => Inbound::Heartbeat(channel),
        AMQPFrameType::ProtocolHeader => return Err(FrameError::Malformed("protocol header")),
    })
}

/// Appends one generated frame to `out`.
pub(crate) fn put(out: &mut Vec<u8>, frame: &AMQPFrame) {
    thread_local! {
        // The generator writes into an owned buffer: one per thread, reused,
        // instead of one allocated per frame.
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with_borrow_mut(|scratch| {
        let mut buf = std::mem::take(scratch);
        buf.clear();
        match gen_frame(frame)(WriteContext::from(buf)) {
            Ok(ctx) => {
                let buf = ctx.into_inner().0;
                out.extend_from_slice(&buf);
                *scratch = buf;
            }
            // Generation into a Vec fails only when a value exceeds its wire type: the
            // values are ours and bounded, so this is a bug, logged rather than a panic.
            Err(e) => tracing::error!("cannot encode AMQP frame: {e}"),
        }
    });
}

/// Appends a content body frame holding `chunk`. amq-protocol's generator
/// for one takes the payload as an owned frame (a copy of every body sent);
/// this writes its fields with amq-protocol's own generators and the chunk
/// straight into `out`, the same bytes (tested against `gen_frame`).
pub(crate) fn put_body(out: &mut Vec<u8>, channel: u16, chunk: &[u8]) {
    use amq_protocol::protocol::constants::{FRAME_BODY, FRAME_END};
    use amq_protocol::types::generation::{gen_id, gen_long_uint, gen_short_short_uint};
    // Chunks are cut to frame_max, far below u32::MAX.
    let Ok(len) = u32::try_from(chunk.len()) else {
        tracing::error!("content body chunk of {} bytes", chunk.len());
        return;
    };
    out.reserve(chunk.len() + 8);
    let head = gen_short_short_uint(FRAME_BODY)(WriteContext::from(&mut *out))
        .and_then(|ctx| gen_id(channel)(ctx))
        .and_then(|ctx| gen_long_uint(len)(ctx));
    if let Err(e) = head {
        tracing::error!("cannot encode AMQP body frame: {e}");
        return;
    }
    out.extend_from_slice(chunk);
    if let Err(e) = gen_short_short_uint(FRAME_END)(WriteContext::from(&mut *out)) {
        tracing::error!("cannot encode AMQP body frame: {e}");
    }
}

/// Appends a method frame.
pub(crate) fn put_method(out: &mut Vec<u8>, channel: u16, method: AMQPClass) {
    use amq_protocol::protocol::{constants::FRAME_METHOD, gen_class};
    put_framed(out, FRAME_METHOD, channel, gen_class(&method));
}

/// Appends a content header frame (class basic) for a body of `body_size` bytes.
pub(crate) fn put_header(
    out: &mut Vec<u8>,
    channel: u16,
    body_size: u64,
    properties: &amq_protocol::protocol::basic::AMQPProperties,
) {
    use amq_protocol::protocol::basic::gen_properties;
    use amq_protocol::protocol::constants::FRAME_HEADER;
    use amq_protocol::types::generation::{gen_id, gen_long_long_uint, gen_short_uint};
    const CLASS_BASIC: u16 = 60;
    let fields = |ctx| {
        gen_id(CLASS_BASIC)(ctx)
            .and_then(|ctx| gen_short_uint(0)(ctx)) // weight
            .and_then(|ctx| gen_long_long_uint(body_size)(ctx))
            .and_then(|ctx| gen_properties(properties)(ctx))
    };
    put_framed(out, FRAME_HEADER, channel, fields);
}

/// Appends a frame whose payload `payload` generates, straight into `out`.
/// amq-protocol's frame generator writes the payload's size ahead of it
/// through a separately allocated buffer and copies it back, once per frame;
/// here the size is written after the payload, into the place kept for it,
/// with amq-protocol's own field generators (the same bytes as `gen_frame`,
/// tested).
fn put_framed(
    out: &mut Vec<u8>,
    kind: u8,
    channel: u16,
    payload: impl amq_protocol::types::generation::SerializeFn<Vec<u8>>,
) {
    use amq_protocol::protocol::constants::FRAME_END;
    use amq_protocol::types::generation::{gen_id, gen_long_uint, gen_short_short_uint};
    let start = out.len();
    let written = gen_short_short_uint(kind)(WriteContext::from(std::mem::take(out)))
        .and_then(|ctx| gen_id(channel)(ctx))
        .and_then(|ctx| gen_long_uint(0)(ctx))
        .and_then(payload)
        .map(|ctx| ctx.into_inner().0);
    let mut buf = match written {
        Ok(buf) => buf,
        // Generation into a Vec fails only when a value exceeds its wire type:
        // the values are ours and bounded, so this is a bug, logged rather than
        // a panic (the buffer went with the error; what it held is lost).
        Err(e) => {
            tracing::error!("cannot encode AMQP frame: {e}");
            return;
        }
    };
    let size = buf.len() - start - HEADER_LEN;
    let Ok(size) = u32::try_from(size) else {
        tracing::error!("AMQP frame payload of {size} bytes");
        buf.truncate(start);
        *out = buf;
        return;
    };
    let sized = gen_long_uint(size)(WriteContext::from(&mut buf[start + 3..start + HEADER_LEN]))
        .map(|_| ());
    let ended = sized
        .and_then(|()| gen_short_short_uint(FRAME_END)(WriteContext::from(&mut buf)).map(|_| ()));
    if let Err(e) = ended {
        tracing::error!("cannot encode AMQP frame: {e}");
        buf.truncate(start);
    }
    *out = buf;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_body_frame_is_what_amq_protocol_generates(
            channel in any::<u16>(),
            chunk in proptest::collection::vec(any::<u8>(), 0..2000),
        ) {
            let mut ours = vec![7u8];
            put_body(&mut ours, channel, &chunk);
            let mut theirs = vec![7u8];
            put(&mut theirs, &AMQPFrame::Body(channel, chunk));
            prop_assert_eq!(ours, theirs);
        }

        #[test]
        fn method_and_header_frames_are_what_amq_protocol_generates(
            channel in any::<u16>(),
            tag in any::<u64>(),
            redelivered in any::<bool>(),
            key in "[a-z.]{0,40}",
            body_size in any::<u64>(),
            headers in proptest::collection::btree_map("[a-z-]{1,12}", any::<i64>(), 0..5),
            priority in proptest::option::of(any::<u8>()),
        ) {
            use amq_protocol::protocol::basic::{self, AMQPProperties};
            use amq_protocol::types::{AMQPValue, FieldTable};
            let method = AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                consumer_tag: "ctag".into(),
                delivery_tag: tag,
                redelivered,
                exchange: "ex".into(),
                routing_key: key.as_str().into(),
            }));
            let mut ours = vec![7u8];
            put_method(&mut ours, channel, method.clone());
            let mut theirs = vec![7u8];
            put(&mut theirs, &AMQPFrame::Method(channel, method));
            prop_assert_eq!(&ours, &theirs);

            let mut table = FieldTable::default();
            for (k, v) in &headers {
                table.insert(k.as_str().into(), AMQPValue::LongLongInt(*v));
            }
            let mut properties = AMQPProperties::default().with_headers(table);
            if let Some(p) = priority {
                properties = properties.with_priority(p);
            }
            let mut ours = vec![7u8];
            put_header(&mut ours, channel, body_size, &properties);
            let mut theirs = vec![7u8];
            put(&mut theirs, &AMQPFrame::Header(channel, AMQPContentHeader {
                class_id: 60,
                body_size,
                properties,
            }));
            prop_assert_eq!(ours, theirs);
        }
    }
}

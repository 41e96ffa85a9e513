//! A minimal Kafka connection: length-prefixed frames whose headers and
//! bodies are encoded and decoded by `kafka-protocol`, plus the version
//! negotiation (ApiVersions) each connection does once.
//!
//! Two ways to use it: `call` (one request, wait for its response) for the
//! control plane, and `into_split` for the produce hot path, where a writer
//! keeps up to `--max-in-flight` requests outstanding and a reader task
//! matches responses to them in order (Kafka answers a connection's requests
//! in the order they were sent, so the correlation id only has to be checked).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, ApiVersionsRequest, RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};
use sluice_vocab::ErrorCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::BenchError;

/// Client id sent in every request header.
pub const CLIENT_ID: &str = "sluice-bench";

/// Largest response frame accepted. A fetch answer is bounded by the
/// request's max_bytes (64 MiB here); anything far above is a broken peer.
const MAX_RESPONSE_BYTES: usize = 256 << 20;

/// The version range a broker serves for one API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VersionRange {
    pub min: i16,
    pub max: i16,
}

/// The broker's ApiVersions table.
#[derive(Clone, Debug, Default)]
pub struct Versions {
    ranges: Vec<(i16, VersionRange)>,
}

impl Versions {
    pub fn from_pairs(pairs: impl IntoIterator<Item = (i16, i16, i16)>) -> Versions {
        Versions {
            ranges: pairs
                .into_iter()
                .map(|(k, min, max)| (k, VersionRange { min, max }))
                .collect(),
        }
    }

    /// The highest version both sides speak: at most `ours_max`, at least
    /// `ours_min`; an error naming the API when the ranges do not meet.
    pub fn pick(&self, api: ApiKey, ours_min: i16, ours_max: i16) -> Result<i16, BenchError> {
        let key = api as i16;
        let Some((_, r)) = self.ranges.iter().find(|(k, _)| *k == key) else {
            return Err(BenchError::Unsupported(format!(
                "the broker does not serve {api:?}"
            )));
        };
        let v = r.max.min(ours_max);
        if v < ours_min || v < r.min {
            return Err(BenchError::Unsupported(format!(
                "{api:?}: the broker serves v{}-v{}, the load generator v{ours_min}-v{ours_max}",
                r.min, r.max
            )));
        }
        Ok(v)
    }
}

/// Encodes one request frame (size prefix, header, body) at the end of `buf`.
pub fn encode_request<R: Request>(
    buf: &mut BytesMut,
    req: &R,
    version: i16,
    correlation_id: i32,
) -> Result<(), BenchError> {
    let start = buf.len();
    buf.put_i32(0);
    let header = RequestHeader::default()
        .with_request_api_key(R::KEY)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str(CLIENT_ID)));
    header
        .encode(buf, R::header_version(version))
        .map_err(|e| BenchError::Protocol(format!("encoding a request header: {e}")))?;
    req.encode(buf, version)
        .map_err(|e| BenchError::Protocol(format!("encoding a request: {e}")))?;
    let size = i32::try_from(buf.len() - start - 4)
        .map_err(|_| BenchError::Protocol("request larger than 2 GiB".into()))?;
    if let Some(prefix) = buf.get_mut(start..start + 4) {
        prefix.copy_from_slice(&size.to_be_bytes());
    }
    Ok(())
}

/// Reads one response frame (without its size prefix) into `buf`, which
/// is kept across calls: once the previous frame's `Bytes` are dropped, the
/// same allocation is reused, so a 16 MiB fetch answer does not fault in
/// fresh pages every time.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
) -> Result<Bytes, BenchError> {
    let size = reader.read_i32().await?;
    let size = usize::try_from(size)
        .ok()
        .filter(|s| *s >= 4 && *s <= MAX_RESPONSE_BYTES)
        .ok_or_else(|| BenchError::Protocol(format!("response frame of {size} bytes")))?;
    buf.clear();
    // No zero-filling: read_buf appends into spare capacity.
    buf.reserve(size);
    while buf.len() < size {
        let want = (size - buf.len()) as u64;
        let n = (&mut *reader).take(want).read_buf(buf).await?;
        if n == 0 {
            return Err(BenchError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed in the middle of a response",
            )));
        }
    }
    Ok(buf.split().freeze())
}

/// Decodes a response frame of request type `R`: (correlation id, body).
pub fn decode_response<R: Request>(
    mut frame: Bytes,
    version: i16,
) -> Result<(i32, R::Response), BenchError> {
    let header = ResponseHeader::decode(
        &mut frame,
        <R::Response as HeaderVersion>::header_version(version),
    )
    .map_err(|e| BenchError::Protocol(format!("decoding a response header: {e}")))?;
    let body = R::Response::decode(&mut frame, version).map_err(|e| {
        BenchError::Protocol(format!(
            "decoding a response to api key {} v{version}: {e}",
            R::KEY
        ))
    })?;
    if frame.has_remaining() {
        return Err(BenchError::Protocol(format!(
            "{} trailing bytes after a response to api key {}",
            frame.remaining(),
            R::KEY
        )));
    }
    Ok((header.correlation_id, body))
}

/// One connection to one broker.
pub struct Conn {
    stream: TcpStream,
    pub addr: String,
    pub versions: Versions,
    next_correlation: i32,
    buf: BytesMut,
    rbuf: BytesMut,
}

impl Conn {
    /// Connects and asks for the broker's API versions.
    pub async fn connect(addr: &str) -> Result<Conn, BenchError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| BenchError::Connect(addr.to_string(), e))?;
        // Small requests (acks, fetches) must not wait for Nagle.
        stream.set_nodelay(true)?;
        let mut conn = Conn {
            stream,
            addr: addr.to_string(),
            versions: Versions::default(),
            next_correlation: 1,
            buf: BytesMut::new(),
            rbuf: BytesMut::new(),
        };
        // v2: the last non-flexible version, served by every broker since 2.0
        // and by Sluice; its answer is the same table as later versions.
        let resp = conn.call(&ApiVersionsRequest::default(), 2).await?;
        if let Err(code) = ErrorCode::check(resp.error_code) {
            return Err(BenchError::Broker {
                what: format!("ApiVersions from {addr}"),
                code,
            });
        }
        conn.versions = Versions::from_pairs(
            resp.api_keys
                .iter()
                .map(|k| (k.api_key, k.min_version, k.max_version)),
        );
        Ok(conn)
    }

    pub fn next_correlation_id(&mut self) -> i32 {
        let id = self.next_correlation;
        self.next_correlation = self.next_correlation.wrapping_add(1);
        id
    }

    /// Sends one request and waits for its response.
    pub async fn call<R: Request>(
        &mut self,
        req: &R,
        version: i16,
    ) -> Result<R::Response, BenchError> {
        let correlation_id = self.next_correlation_id();
        self.buf.clear();
        encode_request(&mut self.buf, req, version, correlation_id)?;
        self.stream.write_all(&self.buf).await?;
        let frame = read_frame(&mut self.stream, &mut self.rbuf).await?;
        let (got, resp) = decode_response::<R>(frame, version)?;
        if got != correlation_id {
            return Err(BenchError::Protocol(format!(
                "correlation id {got} in answer to {correlation_id}"
            )));
        }
        Ok(resp)
    }

    /// Splits for pipelining: the caller owns correlation ids from here on.
    pub fn into_split(self) -> (OwnedReadHalf, OwnedWriteHalf, i32) {
        let (r, w) = self.stream.into_split();
        (r, w, self.next_correlation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_pick() {
        let v = Versions::from_pairs([
            (ApiKey::Produce as i16, 3, 11),
            (ApiKey::Fetch as i16, 4, 16),
        ]);
        assert_eq!(v.pick(ApiKey::Produce, 3, 9).unwrap(), 9);
        assert_eq!(v.pick(ApiKey::Produce, 3, 20).unwrap(), 11);
        assert_eq!(v.pick(ApiKey::Fetch, 4, 12).unwrap(), 12);
        assert!(v.pick(ApiKey::Fetch, 17, 18).is_err());
        assert!(v.pick(ApiKey::Metadata, 0, 12).is_err());
        let old = Versions::from_pairs([(ApiKey::Produce as i16, 0, 2)]);
        assert!(old.pick(ApiKey::Produce, 3, 11).is_err());
    }

    #[test]
    fn request_frame_has_its_size() {
        let mut buf = BytesMut::new();
        buf.put_u8(0xAA); // frames are appended after existing bytes
        encode_request(&mut buf, &ApiVersionsRequest::default(), 2, 7).unwrap();
        let size = i32::from_be_bytes(buf[1..5].try_into().unwrap()) as usize;
        assert_eq!(size, buf.len() - 5);
        let mut body = buf.freeze().slice(5..);
        let h = RequestHeader::decode(&mut body, 1).unwrap();
        assert_eq!(h.correlation_id, 7);
        assert_eq!(h.request_api_key, ApiKey::ApiVersions as i16);
    }
}

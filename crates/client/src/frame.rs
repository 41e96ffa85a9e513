//! Frames: the size prefix, request headers and response headers.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::{ClientError, ProtocolError};

/// The largest response frame a [`Connection`](crate::Connection) accepts.
/// A fetch answer is bounded by the request's max_bytes (tens of MiB in
/// practice); a prefix far above that is a broken or hostile peer.
pub const MAX_FRAME: usize = 256 << 20;

/// Appends one request frame (size prefix, header, body) to `buf`, leaving
/// what `buf` already holds in front of it, so several frames can be
/// batched into one write.
pub fn encode_request<R: Request>(
    buf: &mut BytesMut,
    req: &R,
    version: i16,
    correlation_id: i32,
    client_id: &str,
) -> Result<(), ClientError> {
    let client_id = StrBytes::from_string(client_id.to_owned());
    encode_with(buf, req, version, correlation_id, &client_id)
}

/// [`encode_request`] with the client id already in the form the header
/// holds, so a connection's per-request path clones a reference count
/// instead of copying a string.
pub(crate) fn encode_with<R: Request>(
    buf: &mut BytesMut,
    req: &R,
    version: i16,
    correlation_id: i32,
    client_id: &StrBytes,
) -> Result<(), ClientError> {
    let encode_error = |reason: String| ProtocolError::Encode {
        api: R::KEY,
        version,
        reason,
    };
    let start = buf.len();
    // The size is known only once the body is encoded; computing it first
    // would walk the whole request (every record batch) twice.
    buf.put_i32(0);
    RequestHeader::default()
        .with_request_api_key(R::KEY)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(client_id.clone()))
        .encode(buf, R::header_version(version))
        .map_err(|e| encode_error(format!("header: {e}")))?;
    req.encode(buf, version)
        .map_err(|e| encode_error(e.to_string()))?;
    let size = i32::try_from(buf.len() - start - 4)
        .map_err(|_| encode_error("frame larger than 2 GiB".to_owned()))?;
    if let Some(prefix) = buf.get_mut(start..start + 4) {
        prefix.copy_from_slice(&size.to_be_bytes());
    }
    Ok(())
}

/// Reads one frame and returns it without its size prefix.
///
/// The size is checked against `max` before anything is reserved. `buf` is
/// the caller's to keep across calls: once the previous frame's `Bytes` are
/// dropped, the next frame reuses the same allocation.
pub async fn read_frame<Rd: AsyncRead + Unpin>(
    reader: &mut Rd,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Bytes, ClientError> {
    let declared = reader.read_i32().await?;
    let size =
        usize::try_from(declared)
            .ok()
            .filter(|s| *s <= max)
            .ok_or(ProtocolError::FrameSize {
                size: declared,
                max,
            })?;
    buf.clear();
    // No zero-filling: read_buf appends into spare capacity.
    buf.reserve(size);
    while buf.len() < size {
        let want = (size - buf.len()) as u64;
        let n = (&mut *reader).take(want).read_buf(buf).await?;
        if n == 0 {
            return Err(ClientError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed in the middle of a frame",
            )));
        }
    }
    Ok(buf.split().freeze())
}

/// Decodes a response frame (as [`read_frame`] returns it) to a request of
/// type `R` sent at `version` with `correlation_id`.
///
/// The whole frame must be one response: bytes left over mean the two
/// sides disagree on the layout, which is reported rather than ignored.
pub fn decode_response<R: Request>(
    mut frame: Bytes,
    version: i16,
    correlation_id: i32,
) -> Result<R::Response, ClientError> {
    let decode_error = |reason: String| ProtocolError::Decode {
        api: R::KEY,
        version,
        reason,
    };
    let header = ResponseHeader::decode(
        &mut frame,
        <R::Response as HeaderVersion>::header_version(version),
    )
    .map_err(|e| decode_error(format!("header: {e}")))?;
    // Checked before the body: a body meant for another request may not
    // even decode, and the mismatch is the real error.
    if header.correlation_id != correlation_id {
        return Err(ProtocolError::CorrelationId {
            expected: correlation_id,
            got: header.correlation_id,
        }
        .into());
    }
    let body = R::Response::decode(&mut frame, version).map_err(|e| decode_error(e.to_string()))?;
    if frame.has_remaining() {
        return Err(decode_error(format!("{} bytes left over", frame.remaining())).into());
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::{
        ApiKey, ApiVersionsRequest, ApiVersionsResponse, MetadataRequest, MetadataResponse,
    };

    fn response<M: Encodable>(m: &M, header_version: i16, version: i16, cid: i32) -> Bytes {
        let mut b = BytesMut::new();
        ResponseHeader::default()
            .with_correlation_id(cid)
            .encode(&mut b, header_version)
            .unwrap();
        m.encode(&mut b, version).unwrap();
        b.freeze()
    }

    #[test]
    fn request_frame_has_its_size_and_header() {
        let mut buf = BytesMut::new();
        buf.put_u8(0xAA); // frames are appended after existing bytes
        encode_request(&mut buf, &ApiVersionsRequest::default(), 2, 7, "me").unwrap();
        let size = i32::from_be_bytes(buf[1..5].try_into().unwrap()) as usize;
        assert_eq!(size, buf.len() - 5);
        let mut body = buf.freeze().slice(5..);
        let h = RequestHeader::decode(&mut body, 1).unwrap();
        assert_eq!(h.correlation_id, 7);
        assert_eq!(h.request_api_key, ApiKey::ApiVersions as i16);
        assert_eq!(h.request_api_version, 2);
        assert_eq!(h.client_id.as_deref(), Some("me"));
        ApiVersionsRequest::decode(&mut body, 2).unwrap();
        assert!(body.is_empty());
    }

    #[test]
    fn flexible_requests_use_header_v2() {
        let mut buf = BytesMut::new();
        let req = MetadataRequest::default().with_topics(None);
        encode_request(&mut buf, &req, 12, 3, "me").unwrap();
        let mut body = buf.freeze().slice(4..);
        let h = RequestHeader::decode(&mut body, 2).unwrap();
        assert_eq!((h.request_api_version, h.correlation_id), (12, 3));
        assert_eq!(MetadataRequest::decode(&mut body, 12).unwrap(), req);
        assert!(body.is_empty());
    }

    #[test]
    fn responses_decode_and_check_their_correlation_id() {
        // ApiVersions answers always carry header v0; Metadata v12 header v1.
        let av = ApiVersionsResponse::default().with_throttle_time_ms(5);
        let frame = response(&av, 0, 2, 9);
        let got = decode_response::<ApiVersionsRequest>(frame.clone(), 2, 9).unwrap();
        assert_eq!(got.throttle_time_ms, 5);
        let err = decode_response::<ApiVersionsRequest>(frame, 2, 8).unwrap_err();
        assert!(matches!(
            err,
            ClientError::Protocol(ProtocolError::CorrelationId {
                expected: 8,
                got: 9
            })
        ));
        let md = MetadataResponse::default().with_cluster_id(Some(StrBytes::from_static_str("c")));
        let frame = response(&md, 1, 12, 1);
        assert_eq!(
            decode_response::<MetadataRequest>(frame, 12, 1).unwrap(),
            md
        );
    }

    #[test]
    fn leftover_and_truncated_bodies_are_errors() {
        let av = ApiVersionsResponse::default();
        let mut long = BytesMut::from(&response(&av, 0, 2, 1)[..]);
        long.put_u8(0);
        assert!(matches!(
            decode_response::<ApiVersionsRequest>(long.freeze(), 2, 1),
            Err(ClientError::Protocol(ProtocolError::Decode { .. }))
        ));
        let whole = response(&av, 0, 2, 1);
        let short = whole.slice(..whole.len() - 1);
        assert!(matches!(
            decode_response::<ApiVersionsRequest>(short, 2, 1),
            Err(ClientError::Protocol(ProtocolError::Decode { .. }))
        ));
    }

    #[tokio::test]
    async fn frames_are_read_whole_into_a_reused_buffer() {
        let mut wire = Vec::new();
        for body in [&b"first"[..], b"", b"third!"] {
            wire.extend_from_slice(&(body.len() as i32).to_be_bytes());
            wire.extend_from_slice(body);
        }
        let mut r = &wire[..];
        let mut buf = BytesMut::new();
        let a = read_frame(&mut r, &mut buf, 64).await.unwrap();
        assert_eq!(&a[..], b"first");
        let at = a.as_ptr();
        drop(a);
        assert!(read_frame(&mut r, &mut buf, 64).await.unwrap().is_empty());
        let c = read_frame(&mut r, &mut buf, 64).await.unwrap();
        assert_eq!(&c[..], b"third!");
        assert_eq!(c.as_ptr(), at, "the dropped frame's allocation is reused");
        // A clean end of stream between frames is an I/O error.
        assert!(matches!(
            read_frame(&mut r, &mut buf, 64).await,
            Err(ClientError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof
        ));
    }

    #[tokio::test]
    async fn lying_size_prefixes_are_refused_before_allocating() {
        for declared in [i32::MAX, 65, -1, i32::MIN] {
            // Only the prefix: a reader that tried to fill the frame would
            // hit the end of the input instead of the cap.
            let wire = declared.to_be_bytes();
            let mut buf = BytesMut::new();
            let err = read_frame(&mut &wire[..], &mut buf, 64).await.unwrap_err();
            assert!(
                matches!(
                    err,
                    ClientError::Protocol(ProtocolError::FrameSize { size, max: 64 }) if size == declared
                ),
                "{declared}: {err}"
            );
            assert_eq!(buf.capacity(), 0, "{declared}: nothing reserved");
        }
        // At the cap exactly is accepted.
        let mut wire = 64i32.to_be_bytes().to_vec();
        wire.extend_from_slice(&[1; 64]);
        let mut buf = BytesMut::new();
        assert_eq!(
            read_frame(&mut &wire[..], &mut buf, 64)
                .await
                .unwrap()
                .len(),
            64
        );
    }

    #[tokio::test]
    async fn a_frame_cut_short_is_an_io_error() {
        let mut wire = 10i32.to_be_bytes().to_vec();
        wire.extend_from_slice(b"abc");
        let mut buf = BytesMut::new();
        assert!(matches!(
            read_frame(&mut &wire[..], &mut buf, 64).await,
            Err(ClientError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof
        ));
    }
}

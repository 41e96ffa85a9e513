//! A connection to one broker: the handshake, calls, and the two halves a
//! pipelining caller drives from separate tasks.

use std::time::Duration;

use bytes::BytesMut;
use kafka_protocol::messages::ApiVersionsRequest;
use kafka_protocol::protocol::{Request, StrBytes};
use sluice_vocab::ErrorCode;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::error::api_name;
use crate::frame::{decode_response, encode_with, read_frame, MAX_FRAME};
use crate::{ClientError, Versions};

/// ApiVersions v2: the last version before flexible headers, served by
/// every broker since Kafka 2.0; later versions carry the same table.
const API_VERSIONS_VERSION: i16 = 2;

/// Read-side buffering: many small answers (Produce acknowledgements) are
/// taken per system call, and large ones bypass the buffer.
const READ_BUFFER: usize = 64 * 1024;

/// One connection to one broker, after the ApiVersions handshake.
///
/// Any failed or abandoned call (an error, an elapsed
/// [`call_within`](Connection::call_within), a dropped future) leaves the
/// connection unusable, because its answer may still arrive and would be
/// taken for the next request's: later calls fail with an I/O error of
/// kind `NotConnected`, and the caller reconnects.
pub struct Connection {
    reader: ReadHalf,
    writer: WriteHalf,
    versions: Versions,
    broken: bool,
}

impl Connection {
    /// Connects to `addr` and asks for the broker's API versions; both
    /// together must finish within `timeout`. Every request carries
    /// `client_id`.
    pub async fn connect(
        addr: &str,
        client_id: &str,
        timeout: Duration,
    ) -> Result<Connection, ClientError> {
        tokio::time::timeout(timeout, Connection::open(addr, client_id))
            .await
            .map_err(|_| ClientError::Timeout {
                what: format!("connecting to {addr}"),
                limit: timeout,
            })?
    }

    /// [`connect`](Connection::connect) to the first of `servers` (comma
    /// separated `host:port`, as a bootstrap list) that answers, in order;
    /// the error is the last one tried.
    pub async fn connect_any(
        servers: &str,
        client_id: &str,
        timeout: Duration,
    ) -> Result<Connection, ClientError> {
        let mut last = None;
        for addr in servers.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match Connection::connect(addr, client_id, timeout).await {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| ClientError::Connect {
            addr: servers.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no server given"),
        }))
    }

    async fn open(addr: &str, client_id: &str) -> Result<Connection, ClientError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| ClientError::Connect {
                addr: addr.to_owned(),
                source,
            })?;
        // Small requests (acknowledgements, fetches) must not wait for Nagle.
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        let mut conn = Connection {
            reader: ReadHalf {
                reader: BufReader::with_capacity(READ_BUFFER, r),
                buf: BytesMut::new(),
            },
            writer: WriteHalf {
                writer: w,
                client_id: StrBytes::from_string(client_id.to_owned()),
                next_correlation: 1,
                buf: BytesMut::new(),
            },
            versions: Versions::default(),
            broken: false,
        };
        let resp = conn
            .call(&ApiVersionsRequest::default(), API_VERSIONS_VERSION)
            .await?;
        ErrorCode::check(resp.error_code).map_err(ClientError::Handshake)?;
        conn.versions = Versions::from_response(&resp);
        Ok(conn)
    }

    /// The versions the broker serves, from the handshake.
    pub fn versions(&self) -> &Versions {
        &self.versions
    }

    /// Sends `req` at `version` and waits for its answer. Only for
    /// requests the broker answers (not Produce with acks=0).
    pub async fn call<R: Request>(
        &mut self,
        req: &R,
        version: i16,
    ) -> Result<R::Response, ClientError> {
        if self.broken {
            return Err(ClientError::Io(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "an earlier call on this connection failed or was abandoned",
            )));
        }
        // Cleared only on success, so a future dropped halfway (a timeout)
        // leaves the mark too.
        self.broken = true;
        let correlation_id = self.writer.send(req, version).await?;
        let resp = self.reader.recv::<R>(version, correlation_id).await?;
        self.broken = false;
        Ok(resp)
    }

    /// [`call`](Connection::call), failing with [`ClientError::Timeout`]
    /// when the answer has not arrived within `limit`.
    pub async fn call_within<R: Request>(
        &mut self,
        req: &R,
        version: i16,
        limit: Duration,
    ) -> Result<R::Response, ClientError> {
        tokio::time::timeout(limit, self.call(req, version))
            .await
            .map_err(|_| ClientError::Timeout {
                what: format!("{} v{version}", api_name(R::KEY)),
                limit,
            })?
    }

    /// Splits the connection for pipelining: the write half sends requests
    /// while the read half, typically in another task, takes their answers
    /// in the order they were sent.
    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        (self.reader, self.writer)
    }
}

/// The sending side of a split [`Connection`].
pub struct WriteHalf {
    writer: OwnedWriteHalf,
    client_id: StrBytes,
    next_correlation: i32,
    /// Reused from request to request: a produce request's frame is as
    /// large as its record batch.
    buf: BytesMut,
}

impl WriteHalf {
    /// Encodes `req` at `version` and writes it; returns the correlation
    /// id its answer will carry (one more than the previous request's).
    pub async fn send<R: Request>(&mut self, req: &R, version: i16) -> Result<i32, ClientError> {
        let correlation_id = self.next_correlation;
        self.next_correlation = correlation_id.wrapping_add(1);
        self.buf.clear();
        encode_with(&mut self.buf, req, version, correlation_id, &self.client_id)?;
        self.writer.write_all(&self.buf).await?;
        Ok(correlation_id)
    }
}

/// The receiving side of a split [`Connection`].
pub struct ReadHalf {
    reader: BufReader<OwnedReadHalf>,
    /// Holds one answer at a time; see [`read_frame`].
    buf: BytesMut,
}

impl ReadHalf {
    /// Reads the next answer, which must be to the request of type `R`
    /// sent at `version` with `correlation_id` (the oldest one unanswered).
    pub async fn recv<R: Request>(
        &mut self,
        version: i16,
        correlation_id: i32,
    ) -> Result<R::Response, ClientError> {
        let frame = read_frame(&mut self.reader, &mut self.buf, MAX_FRAME).await?;
        decode_response::<R>(frame, version, correlation_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ProtocolError, VersionRange};
    use bytes::{BufMut, Bytes};
    use kafka_protocol::messages::api_versions_response::ApiVersion;
    use kafka_protocol::messages::metadata_response::MetadataResponseTopic;
    use kafka_protocol::messages::{
        ApiKey, ApiVersionsResponse, MetadataRequest, MetadataResponse, RequestHeader,
        ResponseHeader, TopicName,
    };
    use kafka_protocol::protocol::{Decodable, Encodable};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    const LIMIT: Duration = Duration::from_secs(10);

    /// What the fake broker does with a request other than ApiVersions.
    enum Reply {
        /// Writes these bytes (whole frames, or anything else).
        Bytes(Vec<u8>),
        /// Reads on without answering.
        Nothing,
    }

    /// A request as the fake broker saw it.
    struct Seen {
        header: RequestHeader,
        body: Bytes,
    }

    /// Frames an answer with kafka-protocol's own encoders.
    fn answer<M: Encodable>(key: ApiKey, version: i16, cid: i32, m: &M) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_i32(0);
        ResponseHeader::default()
            .with_correlation_id(cid)
            .encode(&mut b, key.response_header_version(version))
            .unwrap();
        m.encode(&mut b, version).unwrap();
        let n = (b.len() - 4) as i32;
        b[0..4].copy_from_slice(&n.to_be_bytes());
        b.to_vec()
    }

    fn metadata_answer(cid: i32, topic: &str) -> Vec<u8> {
        let resp = MetadataResponse::default().with_topics(vec![MetadataResponseTopic::default()
            .with_name(Some(TopicName(StrBytes::from_string(topic.to_owned()))))]);
        answer(ApiKey::Metadata, 12, cid, &resp)
    }

    /// Serves one connection: answers ApiVersions with `handshake_error`
    /// and a fixed table, everything else with `reply`. Returns what it saw.
    async fn fake_broker(
        handshake_error: i16,
        mut reply: impl FnMut(&Seen) -> Reply + Send + 'static,
    ) -> (String, tokio::task::JoinHandle<Vec<Seen>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut seen = Vec::new();
            while let Ok(size) = s.read_i32().await {
                let mut buf = vec![0u8; size as usize];
                s.read_exact(&mut buf).await.unwrap();
                let key = ApiKey::try_from(i16::from_be_bytes([buf[0], buf[1]])).unwrap();
                let version = i16::from_be_bytes([buf[2], buf[3]]);
                let mut body = Bytes::from(buf);
                let header =
                    RequestHeader::decode(&mut body, key.request_header_version(version)).unwrap();
                let req = Seen { header, body };
                let out = if key == ApiKey::ApiVersions {
                    let keys = [(ApiKey::ApiVersions, 0, 3), (ApiKey::Metadata, 1, 12)].map(
                        |(k, min, max)| {
                            ApiVersion::default()
                                .with_api_key(k as i16)
                                .with_min_version(min)
                                .with_max_version(max)
                        },
                    );
                    let resp = ApiVersionsResponse::default()
                        .with_error_code(handshake_error)
                        .with_api_keys(keys.to_vec());
                    Reply::Bytes(answer(key, version, req.header.correlation_id, &resp))
                } else {
                    reply(&req)
                };
                if let Reply::Bytes(b) = out {
                    s.write_all(&b).await.unwrap();
                }
                seen.push(req);
            }
            seen
        });
        (addr, task)
    }

    fn metadata_request(topic: &str) -> MetadataRequest {
        use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
        MetadataRequest::default().with_topics(Some(vec![MetadataRequestTopic::default()
            .with_name(Some(TopicName(StrBytes::from_string(topic.to_owned()))))]))
    }

    /// The topic a Metadata request named, as the fake broker decoded it.
    fn requested_topic(seen: &Seen) -> String {
        let req = MetadataRequest::decode(&mut seen.body.clone(), 12).unwrap();
        req.topics.unwrap()[0].name.as_ref().unwrap().to_string()
    }

    fn answered_topic(resp: &MetadataResponse) -> String {
        resp.topics[0].name.as_ref().unwrap().to_string()
    }

    #[tokio::test]
    async fn handshake_then_calls_round_trip() {
        let (addr, broker) = fake_broker(0, |seen| {
            Reply::Bytes(metadata_answer(
                seen.header.correlation_id,
                &requested_topic(seen),
            ))
        })
        .await;
        let mut c = Connection::connect(&addr, "tester", LIMIT).await.unwrap();
        assert_eq!(
            c.versions().get(ApiKey::Metadata),
            Some(VersionRange { min: 1, max: 12 })
        );
        let v = c.versions().pick(ApiKey::Metadata, 1, 20).unwrap();
        assert_eq!(v, 12);
        for topic in ["a", "b"] {
            let resp = c.call(&metadata_request(topic), v).await.unwrap();
            assert_eq!(answered_topic(&resp), topic);
        }
        let resp = c
            .call_within(&metadata_request("c"), v, LIMIT)
            .await
            .unwrap();
        assert_eq!(answered_topic(&resp), "c");
        drop(c);
        let seen = broker.await.unwrap();
        let ids: Vec<i32> = seen.iter().map(|s| s.header.correlation_id).collect();
        assert_eq!(ids, [1, 2, 3, 4]);
        assert!(seen
            .iter()
            .all(|s| s.header.client_id.as_deref() == Some("tester")));
        assert_eq!(seen[0].header.request_api_version, API_VERSIONS_VERSION);
    }

    #[tokio::test]
    async fn split_halves_pipeline_in_order() {
        // Answers are held back until three requests are in, so all three
        // are in flight at once.
        let mut held = Vec::new();
        let (addr, broker) = fake_broker(0, move |seen| {
            held.extend(metadata_answer(
                seen.header.correlation_id,
                &requested_topic(seen),
            ));
            if seen.header.correlation_id == 4 {
                Reply::Bytes(std::mem::take(&mut held))
            } else {
                Reply::Nothing
            }
        })
        .await;
        let c = Connection::connect(&addr, "tester", LIMIT).await.unwrap();
        let (mut r, mut w) = c.into_split();
        let mut sent = Vec::new();
        for topic in ["x", "y", "z"] {
            sent.push((w.send(&metadata_request(topic), 12).await.unwrap(), topic));
        }
        assert_eq!(
            sent.iter().map(|s| s.0).collect::<Vec<_>>(),
            [2, 3, 4],
            "ids continue after the handshake's"
        );
        for (id, topic) in sent {
            let resp = r.recv::<MetadataRequest>(12, id).await.unwrap();
            assert_eq!(answered_topic(&resp), topic);
        }
        drop((r, w));
        assert_eq!(broker.await.unwrap().len(), 4);
    }

    #[tokio::test]
    async fn a_mismatched_correlation_id_is_caught_and_poisons_the_connection() {
        let (addr, _broker) = fake_broker(0, |seen| {
            Reply::Bytes(metadata_answer(seen.header.correlation_id + 100, "t"))
        })
        .await;
        let mut c = Connection::connect(&addr, "tester", LIMIT).await.unwrap();
        let err = c.call(&metadata_request("t"), 12).await.unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Protocol(ProtocolError::CorrelationId {
                    expected: 2,
                    got: 102
                })
            ),
            "{err}"
        );
        let err = c.call(&metadata_request("t"), 12).await.unwrap_err();
        assert!(
            matches!(&err, ClientError::Io(e) if e.kind() == std::io::ErrorKind::NotConnected),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_silent_broker_times_out_and_the_connection_is_not_reused() {
        let (addr, _broker) = fake_broker(0, |_| Reply::Nothing).await;
        let mut c = Connection::connect(&addr, "tester", LIMIT).await.unwrap();
        let err = c
            .call_within(&metadata_request("t"), 12, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ClientError::Timeout { what, .. } if what == "Metadata v12"),
            "{err}"
        );
        assert!(matches!(
            c.call(&metadata_request("t"), 12).await,
            Err(ClientError::Io(_))
        ));
    }

    #[tokio::test]
    async fn an_oversized_answer_is_refused() {
        let (addr, _broker) = fake_broker(0, |_| {
            Reply::Bytes(((MAX_FRAME + 1) as i32).to_be_bytes().to_vec())
        })
        .await;
        let mut c = Connection::connect(&addr, "tester", LIMIT).await.unwrap();
        let err = c.call(&metadata_request("t"), 12).await.unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Protocol(ProtocolError::FrameSize { max: MAX_FRAME, .. })
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_refused_handshake_is_reported() {
        let code = ErrorCode::UnsupportedVersion;
        let (addr, _broker) = fake_broker(code.code(), |_| Reply::Nothing).await;
        let err = Connection::connect(&addr, "tester", LIMIT)
            .await
            .err()
            .unwrap();
        assert!(
            matches!(err, ClientError::Handshake(c) if c == code),
            "{err}"
        );
    }

    #[tokio::test]
    async fn connect_failures_are_connect_errors_or_timeouts() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        // Accepted by the kernel but never answered.
        let err = Connection::connect(&addr, "tester", Duration::from_millis(50))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
        drop(l);
        let err = Connection::connect(&addr, "tester", LIMIT)
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&err, ClientError::Connect { addr: a, .. } if *a == addr),
            "{err}"
        );
        assert!(err.to_string().starts_with("cannot connect to"), "{err}");
    }
}

//! [`TcpConnector`]: followers reach leaders over the Kafka protocol, at the leader's
//! replica address. Fetch v12 (replica_id is the top-level field up to v14),
//! OffsetForLeaderEpoch v3+ (with replica_id), ListOffsets(earliest).

use std::time::Duration;

use futures::future::BoxFuture;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::offset_for_leader_epoch_request::{
    OffsetForLeaderPartition, OffsetForLeaderTopic,
};
use kafka_protocol::messages::{
    ApiKey, BrokerId as KBrokerId, FetchRequest, ListOffsetsRequest, OffsetForLeaderEpochRequest,
    TopicName,
};
use kafka_protocol::protocol::{Request, StrBytes};
use sluice_client::{ClientError, Connection};
use sluice_cluster::BrokerId;
use sluice_vocab::ErrorCode;

use crate::transport::{
    EpochAnswer, FetchAnswer, FetchArgs, LeaderConnector, LeaderTransport, TransportError,
};

const CLIENT_ID: &str = "sluice-replica";
/// Fetch v12: the last version with replica_id at the top level and topics by name.
const FETCH_VERSION: i16 = 12;
/// Time allowed for connecting and for a non-fetch request.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects followers to their leaders' Kafka listeners.
#[derive(Debug, Clone)]
pub struct TcpConnector {
    node_id: BrokerId,
}

impl TcpConnector {
    /// Sessions identify themselves as replica `node_id`.
    pub fn new(node_id: BrokerId) -> TcpConnector {
        TcpConnector { node_id }
    }
}

impl LeaderConnector for TcpConnector {
    fn connect<'a>(
        &'a self,
        leader: BrokerId,
        addr: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn LeaderTransport>, TransportError>> {
        Box::pin(async move {
            let conn =
                Conn::connect(self.node_id, addr)
                    .await
                    .map_err(|e| TransportError::Connect {
                        leader,
                        addr: addr.to_string(),
                        reason: e.to_string(),
                    })?;
            Ok(Box::new(conn) as Box<dyn LeaderTransport>)
        })
    }
}

struct Conn {
    node_id: BrokerId,
    conn: Connection,
    epoch_version: i16,
    list_offsets_version: i16,
}

/// A dead or silent leader (reconnect) versus one that answers something
/// a follower cannot use.
fn transport_error(e: ClientError) -> TransportError {
    match e {
        ClientError::Connect { .. } | ClientError::Io(_) | ClientError::Timeout { .. } => {
            TransportError::Io(e.to_string())
        }
        ClientError::Protocol(_)
        | ClientError::Unsupported { .. }
        | ClientError::Handshake(_)
        | ClientError::Broker { .. } => TransportError::Protocol(e.to_string()),
    }
}

impl Conn {
    async fn connect(node_id: BrokerId, addr: &str) -> Result<Conn, ClientError> {
        let conn = Connection::connect(addr, CLIENT_ID, CALL_TIMEOUT).await?;
        let versions = conn.versions();
        versions.pick(ApiKey::Fetch, FETCH_VERSION, FETCH_VERSION)?;
        let epoch_version = versions.pick(ApiKey::OffsetForLeaderEpoch, 3, 4)?;
        let list_offsets_version = versions.pick(ApiKey::ListOffsets, 1, 6)?;
        Ok(Conn {
            node_id,
            conn,
            epoch_version,
            list_offsets_version,
        })
    }

    async fn call_within<R: Request>(
        &mut self,
        req: &R,
        version: i16,
        limit: Duration,
    ) -> Result<R::Response, TransportError> {
        self.conn
            .call_within(req, version, limit)
            .await
            .map_err(transport_error)
    }
}

fn topic_name(t: &str) -> TopicName {
    TopicName(StrBytes::from_string(t.to_string()))
}

impl LeaderTransport for Conn {
    fn fetch<'a>(
        &'a mut self,
        args: &'a FetchArgs,
    ) -> BoxFuture<'a, Result<FetchAnswer, TransportError>> {
        Box::pin(async move {
            let max_bytes = i32::try_from(args.max_bytes).unwrap_or(i32::MAX);
            let req = FetchRequest::default()
                .with_replica_id(KBrokerId(self.node_id))
                .with_max_wait_ms(i32::try_from(args.max_wait.as_millis()).unwrap_or(i32::MAX))
                .with_min_bytes(1)
                .with_max_bytes(max_bytes)
                .with_isolation_level(0)
                .with_session_id(0)
                .with_session_epoch(-1)
                .with_topics(vec![FetchTopic::default()
                    .with_topic(topic_name(&args.topic))
                    .with_partitions(vec![FetchPartition::default()
                        .with_partition(args.partition)
                        .with_current_leader_epoch(args.current_leader_epoch)
                        .with_fetch_offset(args.fetch_offset)
                        .with_last_fetched_epoch(args.last_fetched_epoch)
                        .with_log_start_offset(args.log_start_offset)
                        .with_partition_max_bytes(max_bytes)])]);
            let resp = self
                .call_within(&req, FETCH_VERSION, args.max_wait + CALL_TIMEOUT)
                .await?;
            if let Err(code) = ErrorCode::check(resp.error_code) {
                return Ok(FetchAnswer::error(code));
            }
            let part = resp
                .responses
                .into_iter()
                .filter(|t| t.topic.0.as_str() == args.topic)
                .flat_map(|t| t.partitions)
                .find(|p| p.partition_index == args.partition)
                .ok_or_else(|| {
                    TransportError::Protocol("fetch answer without our partition".into())
                })?;
            Ok(FetchAnswer {
                error: ErrorCode::check(part.error_code).err(),
                high_watermark: part.high_watermark,
                log_start_offset: part.log_start_offset,
                records: part.records.unwrap_or_default(),
            })
        })
    }

    fn end_offset_for_epoch<'a>(
        &'a mut self,
        topic: &'a str,
        partition: i32,
        current_leader_epoch: i32,
        leader_epoch: i32,
    ) -> BoxFuture<'a, Result<EpochAnswer, TransportError>> {
        Box::pin(async move {
            let req = OffsetForLeaderEpochRequest::default()
                .with_replica_id(KBrokerId(self.node_id))
                .with_topics(vec![OffsetForLeaderTopic::default()
                    .with_topic(topic_name(topic))
                    .with_partitions(vec![OffsetForLeaderPartition::default()
                        .with_partition(partition)
                        .with_current_leader_epoch(current_leader_epoch)
                        .with_leader_epoch(leader_epoch)])]);
            let version = self.epoch_version;
            let resp = self.call_within(&req, version, CALL_TIMEOUT).await?;
            let p = resp
                .topics
                .into_iter()
                .filter(|t| t.topic.0.as_str() == topic)
                .flat_map(|t| t.partitions)
                .find(|p| p.partition == partition)
                .ok_or_else(|| {
                    TransportError::Protocol(
                        "OffsetForLeaderEpoch answer without our partition".into(),
                    )
                })?;
            Ok(EpochAnswer {
                error: ErrorCode::check(p.error_code).err(),
                leader_epoch: p.leader_epoch,
                end_offset: p.end_offset,
            })
        })
    }

    fn log_start_offset<'a>(
        &'a mut self,
        topic: &'a str,
        partition: i32,
        current_leader_epoch: i32,
    ) -> BoxFuture<'a, Result<Result<i64, ErrorCode>, TransportError>> {
        Box::pin(async move {
            let version = self.list_offsets_version;
            let mut p = ListOffsetsPartition::default()
                .with_partition_index(partition)
                .with_timestamp(-2);
            if version >= 4 {
                p = p.with_current_leader_epoch(current_leader_epoch);
            }
            let req = ListOffsetsRequest::default()
                .with_replica_id(KBrokerId(self.node_id))
                .with_topics(vec![ListOffsetsTopic::default()
                    .with_name(topic_name(topic))
                    .with_partitions(vec![p])]);
            let resp = self.call_within(&req, version, CALL_TIMEOUT).await?;
            let p = resp
                .topics
                .into_iter()
                .filter(|t| t.name.0.as_str() == topic)
                .flat_map(|t| t.partitions)
                .find(|p| p.partition_index == partition)
                .ok_or_else(|| {
                    TransportError::Protocol("ListOffsets answer without our partition".into())
                })?;
            Ok(ErrorCode::check(p.error_code).map(|()| p.offset))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, Bytes, BytesMut};
    use kafka_protocol::messages::api_versions_response::ApiVersion;
    use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
    use kafka_protocol::messages::list_offsets_response::{
        ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
    };
    use kafka_protocol::messages::offset_for_leader_epoch_response::{
        EpochEndOffset, OffsetForLeaderTopicResult,
    };
    use kafka_protocol::messages::{
        ApiVersionsResponse, FetchResponse, ListOffsetsResponse, OffsetForLeaderEpochResponse,
        RequestHeader, ResponseHeader,
    };
    use kafka_protocol::protocol::{Decodable, Encodable};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    async fn read_request(s: &mut TcpStream) -> Option<(ApiKey, i16, RequestHeader, Bytes)> {
        let size = s.read_i32().await.ok()?;
        let mut buf = vec![0u8; size as usize];
        s.read_exact(&mut buf).await.ok()?;
        let key = ApiKey::try_from(i16::from_be_bytes([buf[0], buf[1]])).ok()?;
        let version = i16::from_be_bytes([buf[2], buf[3]]);
        let mut b = Bytes::from(buf);
        let h = RequestHeader::decode(&mut b, key.request_header_version(version)).ok()?;
        Some((key, version, h, b))
    }

    async fn reply<M: Encodable>(s: &mut TcpStream, key: ApiKey, version: i16, cid: i32, m: &M) {
        let mut b = BytesMut::new();
        b.put_i32(0);
        ResponseHeader::default()
            .with_correlation_id(cid)
            .encode(&mut b, key.response_header_version(version))
            .unwrap();
        m.encode(&mut b, version).unwrap();
        let n = (b.len() - 4) as i32;
        b[0..4].copy_from_slice(&n.to_be_bytes());
        s.write_all(&b).await.unwrap();
    }

    /// A fake leader: checks what a follower sends and answers fixed values.
    async fn fake_leader(l: TcpListener) {
        let (mut s, _) = l.accept().await.unwrap();
        while let Some((key, v, h, mut body)) = read_request(&mut s).await {
            let cid = h.correlation_id;
            match key {
                ApiKey::ApiVersions => {
                    let keys = [
                        (ApiKey::Fetch, 4, 16),
                        (ApiKey::OffsetForLeaderEpoch, 2, 4),
                        (ApiKey::ListOffsets, 1, 6),
                    ]
                    .map(|(k, min, max)| {
                        ApiVersion::default()
                            .with_api_key(k as i16)
                            .with_min_version(min)
                            .with_max_version(max)
                    });
                    let r = ApiVersionsResponse::default().with_api_keys(keys.to_vec());
                    reply(&mut s, key, v, cid, &r).await;
                }
                ApiKey::Fetch => {
                    assert_eq!(v, 12);
                    let req = FetchRequest::decode(&mut body, v).unwrap();
                    assert_eq!(req.replica_id.0, 7);
                    let p = &req.topics[0].partitions[0];
                    assert_eq!((p.fetch_offset, p.current_leader_epoch), (42, 3));
                    let r = FetchResponse::default().with_responses(vec![
                        FetchableTopicResponse::default()
                            .with_topic(req.topics[0].topic.clone())
                            .with_partitions(vec![PartitionData::default()
                                .with_partition_index(p.partition)
                                .with_high_watermark(40)
                                .with_log_start_offset(5)
                                .with_records(Some(Bytes::from_static(b"xyz")))]),
                    ]);
                    reply(&mut s, key, v, cid, &r).await;
                }
                ApiKey::OffsetForLeaderEpoch => {
                    assert_eq!(v, 4);
                    let req = OffsetForLeaderEpochRequest::decode(&mut body, v).unwrap();
                    assert_eq!(req.replica_id.0, 7);
                    let p = &req.topics[0].partitions[0];
                    assert_eq!((p.current_leader_epoch, p.leader_epoch), (3, 2));
                    let r = OffsetForLeaderEpochResponse::default().with_topics(vec![
                        OffsetForLeaderTopicResult::default()
                            .with_topic(req.topics[0].topic.clone())
                            .with_partitions(vec![EpochEndOffset::default()
                                .with_partition(p.partition)
                                .with_leader_epoch(1)
                                .with_end_offset(30)]),
                    ]);
                    reply(&mut s, key, v, cid, &r).await;
                }
                ApiKey::ListOffsets => {
                    assert_eq!(v, 6);
                    let req = ListOffsetsRequest::decode(&mut body, v).unwrap();
                    assert_eq!(req.replica_id.0, 7);
                    assert_eq!(req.topics[0].partitions[0].timestamp, -2);
                    let r = ListOffsetsResponse::default().with_topics(vec![
                        ListOffsetsTopicResponse::default()
                            .with_name(req.topics[0].name.clone())
                            .with_partitions(vec![ListOffsetsPartitionResponse::default()
                                .with_partition_index(0)
                                .with_offset(5)]),
                    ]);
                    reply(&mut s, key, v, cid, &r).await;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn speaks_kafka_to_a_leader() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let server = tokio::spawn(fake_leader(l));
        let c = TcpConnector::new(7);
        let mut t = c.connect(1, &addr).await.unwrap();
        let e = t.end_offset_for_epoch("t", 0, 3, 2).await.unwrap();
        assert_eq!(
            e,
            EpochAnswer {
                error: None,
                leader_epoch: 1,
                end_offset: 30
            }
        );
        let args = FetchArgs {
            topic: "t".into(),
            partition: 0,
            fetch_offset: 42,
            current_leader_epoch: 3,
            last_fetched_epoch: 2,
            log_start_offset: 0,
            max_bytes: 1 << 20,
            max_wait: Duration::from_millis(10),
        };
        let a = t.fetch(&args).await.unwrap();
        assert_eq!(
            (a.error, a.high_watermark, a.log_start_offset),
            (None, 40, 5)
        );
        assert_eq!(&a.records[..], b"xyz");
        assert_eq!(t.log_start_offset("t", 0, 3).await.unwrap(), Ok(5));
        drop(t);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn unreachable_leader_is_a_connect_error() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let c = TcpConnector::new(7);
        assert!(matches!(
            c.connect(1, &addr).await,
            Err(TransportError::Connect { leader: 1, .. })
        ));
    }
}

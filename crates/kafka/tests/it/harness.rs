//! Test server and a raw Kafka protocol client.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::indexmap::IndexMap;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use sluice_group::GroupConfig;
use sluice_kafka::{KafkaListener, ServerConfig};
use sluice_log::{FlushPolicy, Store, StoreConfig, TopicConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct Server {
    pub addr: SocketAddr,
    pub store: Arc<Store>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), sluice_kafka::ServeError>>>,
    _dir: tempfile::TempDir,
}

impl Server {
    pub async fn start() -> Server {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut ServerConfig)) -> Server {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(StoreConfig {
            data_dir: dir.path().to_path_buf(),
            defaults: TopicConfig::default(),
            flush: FlushPolicy::Always,
        })
        .unwrap();
        let mut config = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            group: GroupConfig {
                initial_rebalance_delay_ms: 0,
                ..GroupConfig::default()
            },
            ..ServerConfig::default()
        };
        tweak(&mut config);
        let listener = KafkaListener::bind(config).await.unwrap();
        let addr = listener.local_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(listener.serve(store.clone(), async move {
            let _ = rx.await;
        }));
        Server {
            addr,
            store,
            shutdown: Some(tx),
            task: Some(task),
            _dir: dir,
        }
    }

    pub async fn client(&self) -> Raw {
        Raw::connect(self.addr).await
    }

    /// Resolves the shutdown future given to `serve`.
    pub fn signal_stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Signals shutdown and waits for `serve` to return.
    pub async fn stop(mut self) {
        self.signal_stop();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("serve returns after shutdown")
                .expect("serve task")
                .expect("serve ok");
        }
    }

    /// Creates a topic through the store.
    pub fn create_topic(&self, name: &str, partitions: u32) {
        self.store
            .create_topic(name, partitions, &BTreeMap::new(), false)
            .unwrap();
    }
}

/// A raw protocol client: encodes requests with kafka-protocol.
pub struct Raw {
    pub stream: TcpStream,
    next_correlation: i32,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Raw {
            stream,
            next_correlation: 1,
        }
    }

    /// Encodes a request frame.
    pub fn frame<R: Request>(&mut self, req: &R, version: i16) -> (i32, Bytes) {
        let correlation_id = self.next_correlation;
        self.next_correlation += 1;
        let header = RequestHeader::default()
            .with_request_api_key(R::KEY)
            .with_request_api_version(version)
            .with_correlation_id(correlation_id)
            .with_client_id(Some(StrBytes::from_static_str("sluice-test")));
        let mut body = BytesMut::new();
        header
            .encode(&mut body, R::header_version(version))
            .unwrap();
        req.encode(&mut body, version).unwrap();
        let mut frame = BytesMut::with_capacity(body.len() + 4);
        frame.put_i32(body.len() as i32);
        frame.put_slice(&body);
        (correlation_id, frame.freeze())
    }

    pub async fn send<R: Request>(&mut self, req: &R, version: i16) -> i32 {
        let (correlation_id, frame) = self.frame(req, version);
        self.stream.write_all(&frame).await.unwrap();
        correlation_id
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads one response frame: (correlation id, body).
    pub async fn recv_frame(&mut self, header_version: i16) -> (i32, Bytes) {
        let size = tokio::time::timeout(Duration::from_secs(20), self.stream.read_i32())
            .await
            .expect("response within 20 s")
            .expect("response size");
        let mut buf = vec![0u8; size as usize];
        self.stream.read_exact(&mut buf).await.unwrap();
        let mut buf = Bytes::from(buf);
        let header = ResponseHeader::decode(&mut buf, header_version).unwrap();
        (header.correlation_id, buf)
    }

    pub async fn recv<R: Request>(&mut self, version: i16) -> (i32, R::Response) {
        let (correlation_id, mut body) = self
            .recv_frame(<R::Response as HeaderVersion>::header_version(version))
            .await;
        let resp = R::Response::decode(&mut body, version).unwrap();
        assert_eq!(body.remaining(), 0, "trailing bytes in response");
        (correlation_id, resp)
    }

    pub async fn call<R: Request>(&mut self, req: &R, version: i16) -> R::Response {
        let sent = self.send(req, version).await;
        let (got, resp) = self.recv::<R>(version).await;
        assert_eq!(sent, got, "correlation id");
        resp
    }

    /// True when the server closed the connection (EOF or reset) within 5 s.
    pub async fn closed_by_server(&mut self) -> bool {
        let mut buf = [0u8; 64];
        loop {
            match tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
            }
        }
    }
}

pub fn name(s: &str) -> TopicName {
    TopicName(StrBytes::from_string(s.to_owned()))
}

pub fn sb(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_owned())
}

/// Builds the records of one v2 batch (key-i, value-i; timestamps given).
pub fn records(keys: &[&str], timestamp: i64) -> Vec<Record> {
    keys.iter()
        .enumerate()
        .map(|(i, key)| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: -1,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            // The encoder starts a new batch whenever offset - sequence
            // changes; base sequence -1 means "not idempotent".
            sequence: i as i32 - 1,
            timestamp,
            key: Some(Bytes::from(key.to_string())),
            value: Some(Bytes::from(format!("value-of-{key}"))),
            headers: IndexMap::new(),
        })
        .collect()
}

pub fn encode_batch(records: &[Record]) -> Bytes {
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        records,
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .unwrap();
    buf.freeze()
}

/// A plain batch of records with the given keys, all at `timestamp`.
pub fn batch(keys: &[&str], timestamp: i64) -> Bytes {
    encode_batch(&records(keys, timestamp))
}

/// An idempotent producer's batch.
pub fn idempotent_batch(keys: &[&str], producer_id: i64, epoch: i16, base_sequence: i32) -> Bytes {
    let mut recs = records(keys, 1_000);
    for (i, r) in recs.iter_mut().enumerate() {
        r.producer_id = producer_id;
        r.producer_epoch = epoch;
        r.sequence = base_sequence + i as i32;
    }
    encode_batch(&recs)
}

/// Decodes fetched record bytes into (offset, key, value).
pub fn decode(mut bytes: Bytes) -> Vec<(i64, String, String)> {
    let sets = RecordBatchDecoder::decode_all(&mut bytes).unwrap();
    sets.into_iter()
        .flat_map(|s| s.records)
        .map(|r| {
            (
                r.offset,
                String::from_utf8(r.key.unwrap_or_default().to_vec()).unwrap(),
                String::from_utf8(r.value.unwrap_or_default().to_vec()).unwrap(),
            )
        })
        .collect()
}

pub fn produce_request(topic: &str, partition: i32, records: Bytes, acks: i16) -> ProduceRequest {
    use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
    ProduceRequest::default()
        .with_acks(acks)
        .with_timeout_ms(5_000)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(name(topic))
            .with_partition_data(vec![PartitionProduceData::default()
                .with_index(partition)
                .with_records(Some(records))])])
}

/// Produces one batch (acks=-1, v9) and returns (error code, base offset).
pub async fn produce(c: &mut Raw, topic: &str, partition: i32, records: Bytes) -> (i16, i64) {
    let resp = c
        .call(&produce_request(topic, partition, records, -1), 9)
        .await;
    let p = &resp.responses[0].partition_responses[0];
    (p.error_code, p.base_offset)
}

pub fn fetch_request(topic: &str, partition: i32, offset: i64) -> FetchRequest {
    use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
    FetchRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_max_wait_ms(0)
        .with_min_bytes(0)
        .with_max_bytes(50 * 1024 * 1024)
        .with_session_epoch(-1)
        .with_topics(vec![FetchTopic::default()
            .with_topic(name(topic))
            .with_partitions(vec![FetchPartition::default()
                .with_partition(partition)
                .with_fetch_offset(offset)
                .with_partition_max_bytes(1024 * 1024)])])
}

/// Fetches (v11) without waiting; returns (error, high watermark, records).
pub async fn fetch(
    c: &mut Raw,
    topic: &str,
    partition: i32,
    offset: i64,
) -> (i16, i64, Vec<(i64, String, String)>) {
    let resp = c.call(&fetch_request(topic, partition, offset), 11).await;
    assert_eq!(resp.error_code, 0);
    let p = &resp.responses[0].partitions[0];
    (
        p.error_code,
        p.high_watermark,
        decode(p.records.clone().unwrap_or_default()),
    )
}

pub fn keys(n: usize, prefix: &str) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

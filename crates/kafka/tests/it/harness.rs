//! Test server and a raw Kafka protocol client.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kafka_protocol::indexmap::IndexMap;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, Request, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use sluice_client::{decode_response, encode_request, read_frame, MAX_FRAME};
use sluice_testkit::Broker;
pub use sluice_testkit::Setup;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The in-process broker every test talks to.
pub struct Server(Broker);

impl std::ops::Deref for Server {
    type Target = Broker;
    fn deref(&self) -> &Broker {
        &self.0
    }
}

impl Server {
    pub async fn start() -> Server {
        Server(Broker::start().await)
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Setup)) -> Server {
        Server(Broker::start_with(tweak).await)
    }

    pub async fn client(&self) -> Raw {
        Raw::connect(self.addr).await
    }

    /// Resolves the shutdown future given to `serve`.
    pub fn signal_stop(&mut self) {
        self.0.signal_stop();
    }

    pub async fn stop(self) {
        self.0.stop().await;
    }

    /// Creates a topic through the metadata quorum; returns once it is led here.
    pub async fn create_topic(&self, name: &str, partitions: u32) {
        self.0.create_topic(name, partitions, BTreeMap::new()).await;
    }

    /// [`Server::create_topic`] with config overrides.
    pub async fn create_topic_with(
        &self,
        name: &str,
        partitions: u32,
        configs: BTreeMap<String, String>,
    ) {
        self.0.create_topic(name, partitions, configs).await;
    }
}

/// A raw protocol client on sluice-client's frame functions. It does no
/// handshake and keeps the socket public, so tests can send malformed
/// bytes, see the correlation ids the server echoes, and watch it close
/// the connection.
pub struct Raw {
    pub stream: TcpStream,
    next_correlation: i32,
    rbuf: BytesMut,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Raw {
            stream,
            next_correlation: 1,
            rbuf: BytesMut::new(),
        }
    }

    /// Encodes a request frame.
    pub fn frame<R: Request>(&mut self, req: &R, version: i16) -> (i32, Bytes) {
        let correlation_id = self.next_correlation;
        self.next_correlation += 1;
        let mut frame = BytesMut::new();
        encode_request(&mut frame, req, version, correlation_id, "sluice-test").unwrap();
        (correlation_id, frame.freeze())
    }

    pub async fn send<R: Request>(&mut self, req: &R, version: i16) -> i32 {
        let (correlation_id, frame) = self.frame(req, version);
        self.stream.write_all(&frame).await.unwrap();
        correlation_id
    }

    /// The socket itself, for a test that must see write and read errors.
    pub fn into_stream(self) -> TcpStream {
        self.stream
    }

    /// A client over a socket [`Raw::into_stream`] gave out, with no bytes of
    /// an answer left unread on it.
    pub fn from_stream(stream: TcpStream) -> Raw {
        Raw {
            stream,
            next_correlation: 100,
            rbuf: BytesMut::new(),
        }
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads one whole response frame (without its size prefix).
    async fn read(&mut self) -> Bytes {
        tokio::time::timeout(
            Duration::from_secs(20),
            read_frame(&mut self.stream, &mut self.rbuf, MAX_FRAME),
        )
        .await
        .expect("response within 20 s")
        .expect("response frame")
    }

    /// Reads one response frame: (correlation id, body).
    pub async fn recv_frame(&mut self, header_version: i16) -> (i32, Bytes) {
        let mut buf = self.read().await;
        let header = ResponseHeader::decode(&mut buf, header_version).unwrap();
        (header.correlation_id, buf)
    }

    /// Reads and decodes one response, whatever correlation id it carries
    /// (the caller checks it): (correlation id, body).
    pub async fn recv<R: Request>(&mut self, version: i16) -> (i32, R::Response) {
        let frame = self.read().await;
        // Every response header starts with the correlation id.
        let correlation_id = i32::from_be_bytes(frame[..4].try_into().unwrap());
        let resp = decode_response::<R>(frame, version, correlation_id).unwrap();
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

/// Sets a v2 batch's length and CRC-32C to match its bytes, as a client that
/// means what it sends would.
pub fn seal(b: &mut [u8]) {
    let len = i32::try_from(b.len() - 12).unwrap();
    b[8..12].copy_from_slice(&len.to_be_bytes());
    let crc = crc32c::crc32c(&b[21..]);
    b[17..21].copy_from_slice(&crc.to_be_bytes());
}

/// Kafka's codec ids with names, as clients configure them.
pub const CODECS: [(u8, &str); 4] = [(1, "gzip"), (2, "snappy"), (3, "lz4"), (4, "zstd")];

/// A batch's record bytes compressed as clients do with codec id `codec`
/// (snappy in the xerial framing Java's clients use).
pub fn compress(codec: u8, records: &[u8]) -> Vec<u8> {
    use std::io::Write;
    match codec {
        1 => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), Default::default());
            e.write_all(records).unwrap();
            e.finish().unwrap()
        }
        2 => {
            let mut out = b"\x82SNAPPY\x00\x00\x00\x00\x01\x00\x00\x00\x01".to_vec();
            for chunk in records.chunks(32 * 1024) {
                let block = snap::raw::Encoder::new().compress_vec(chunk).unwrap();
                out.extend(u32::try_from(block.len()).unwrap().to_be_bytes());
                out.extend(block);
            }
            out
        }
        3 => {
            // Independent blocks: Kafka's Java consumers refuse linked ones.
            let mut e = lz4::EncoderBuilder::new()
                .block_mode(lz4::BlockMode::Independent)
                .build(Vec::new())
                .unwrap();
            e.write_all(records).unwrap();
            let (out, result) = e.finish();
            result.unwrap();
            out
        }
        4 => zstd::encode_all(records, 3).unwrap(),
        _ => panic!("no codec {codec}"),
    }
}

/// An uncompressed v2 `batch` with its records compressed with `codec`,
/// sealed again.
pub fn with_codec(batch: &[u8], codec: u8) -> Vec<u8> {
    let mut b = batch[..61].to_vec();
    b[22] = (b[22] & !7) | codec;
    b.extend(compress(codec, &batch[61..]));
    seal(&mut b);
    b
}

/// A plain batch of records with the given keys, all at `timestamp`.
pub fn batch(keys: &[&str], timestamp: i64) -> Bytes {
    encode_batch(&records(keys, timestamp))
}

/// An idempotent producer's batch.
pub fn idempotent_batch(keys: &[&str], producer_id: i64, epoch: i16, base_sequence: i32) -> Bytes {
    producer_batch(keys, producer_id, epoch, base_sequence, false)
}

/// A transactional producer's batch.
pub fn transactional_batch(
    keys: &[&str],
    producer_id: i64,
    epoch: i16,
    base_sequence: i32,
) -> Bytes {
    producer_batch(keys, producer_id, epoch, base_sequence, true)
}

fn producer_batch(
    keys: &[&str],
    producer_id: i64,
    epoch: i16,
    base_sequence: i32,
    transactional: bool,
) -> Bytes {
    let mut recs = records(keys, 1_000);
    for (i, r) in recs.iter_mut().enumerate() {
        r.producer_id = producer_id;
        r.producer_epoch = epoch;
        r.sequence = base_sequence + i as i32;
        r.transactional = transactional;
    }
    encode_batch(&recs)
}

/// Waits until this node coordinates transactions: it leads
/// `__transaction_state-0`, which it creates at start.
pub async fn wait_for_txn_coordinator(c: &mut Raw) -> FindCoordinatorResponse {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let resp = c
            .call(
                &FindCoordinatorRequest::default()
                    .with_key(sb("tx"))
                    .with_key_type(1),
                2,
            )
            .await;
        if resp.error_code == 0 {
            return resp;
        }
        assert_eq!(
            resp.error_code,
            sluice_vocab::ErrorCode::CoordinatorNotAvailable.code()
        );
        assert!(
            std::time::Instant::now() < deadline,
            "no transaction coordinator"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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

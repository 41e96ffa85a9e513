//! Request decoding as the broker does it for every frame: peek the API key
//! and version, decode the request header, then the body with kafka-protocol
//! into the same message types dispatch uses.
//!
//! Frames are built as clients send them (client id, header version of the
//! API, realistic field values):
//! - `decode/produce_v9_16KiB`: acks=all, one partition, one uncompressed
//!   16 KiB batch of 100-byte records made by RecordBatchEncoder;
//! - `decode/fetch_v12`: a consumer's fetch of one partition (1 MiB max);
//! - `decode/metadata_v12`: metadata for one topic;
//! - `validate/records_16KiB`: the record walk Produce runs on that batch
//!   before appending (throughput per record);
//! - `validate_compressed/records_16KiB_{gzip,snappy,lz4,zstd}`: the same
//!   records compressed with each codec (as kafka-protocol's encoder does;
//!   one repeated value, so they compress far better than real data), which
//!   the walk decompresses as it goes.
//!
//! Throughput is per request (and frame bytes for Produce).
//!
//! Run: `cargo bench -p sluice-kafka --bench decode`

// A failed unwrap is a failed test (clippy.toml allows it in #[test] fns only).
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kafka_protocol::indexmap::IndexMap;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, BrokerId, FetchRequest, MetadataRequest, ProduceRequest, RequestHeader, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};

const BATCH_BYTES: usize = 16 * 1024;
const VALUE_BYTES: usize = 100;
/// The broker's default limit on a batch's decompressed records.
const MAX_DECOMPRESSED: usize = 64 << 20;

fn topic() -> TopicName {
    TopicName(StrBytes::from_static_str("bench-topic"))
}

/// The records of the largest uncompressed batch of 100-byte records (no
/// key) that fits in a producer's default `batch.size` of 16 KiB.
fn producer_records() -> Vec<Record> {
    let value = Bytes::from(vec![0x5a; VALUE_BYTES]);
    let mut records: Vec<Record> = Vec::new();
    loop {
        let i = records.len();
        records.push(Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: -1,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            // Constant offset - sequence keeps one batch; base sequence -1.
            sequence: i as i32 - 1,
            timestamp: 1_767_225_600_000,
            key: None,
            value: Some(value.clone()),
            headers: IndexMap::new(),
        });
        if encode(&records, Compression::None).len() > BATCH_BYTES {
            records.pop();
            return records;
        }
    }
}

fn encode(records: &[Record], compression: Compression) -> Bytes {
    let mut buf = BytesMut::with_capacity(BATCH_BYTES + 256);
    let options = RecordEncodeOptions {
        version: 2,
        compression,
    };
    RecordBatchEncoder::encode(&mut buf, records, &options).expect("encode batch");
    buf.freeze()
}

/// A request frame without its size prefix, as the connection hands it to
/// dispatch.
fn frame<T: Encodable>(api: ApiKey, version: i16, body: &T) -> Bytes {
    let header = RequestHeader::default()
        .with_request_api_key(api as i16)
        .with_request_api_version(version)
        .with_correlation_id(42)
        .with_client_id(Some(StrBytes::from_static_str("rdkafka")));
    let mut buf = BytesMut::new();
    header
        .encode(&mut buf, api.request_header_version(version))
        .expect("encode header");
    body.encode(&mut buf, version).expect("encode body");
    let frame = buf.freeze();
    // The bench input must be what the server accepts.
    sluice_kafka::decode_request_frame(&frame).expect("server decodes the frame");
    frame
}

/// What dispatch does with a frame: API key and version, header, body.
fn decode<T: Decodable>(frame: &Bytes) -> (RequestHeader, T) {
    let peek = |at: usize| {
        frame
            .get(at..at + 2)
            .map(|b| i16::from_be_bytes([b[0], b[1]]))
            .expect("frame holds a request header")
    };
    let (key, version) = (peek(0), peek(2));
    let api = ApiKey::try_from(key).expect("api key");
    // A Bytes clone is a reference count: the body's record bytes stay
    // slices of the frame, as in the server.
    let mut buf = frame.clone();
    let header = RequestHeader::decode(&mut buf, api.request_header_version(version))
        .expect("request header");
    let body = T::decode(&mut buf, version).expect("request body");
    (header, body)
}

fn bench_decode(c: &mut Criterion) {
    let producer_records = producer_records();
    let records = producer_records.len();
    let batch = encode(&producer_records, Compression::None);
    let produce = frame(
        ApiKey::Produce,
        9,
        &ProduceRequest::default()
            .with_acks(-1)
            .with_timeout_ms(30_000)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(topic())
                .with_partition_data(vec![PartitionProduceData::default()
                    .with_index(0)
                    .with_records(Some(batch.clone()))])]),
    );
    let fetch = frame(
        ApiKey::Fetch,
        12,
        &FetchRequest::default()
            .with_replica_id(BrokerId(-1))
            .with_max_wait_ms(500)
            .with_min_bytes(1)
            .with_max_bytes(52_428_800)
            .with_isolation_level(0)
            .with_session_id(0)
            .with_session_epoch(-1)
            .with_topics(vec![FetchTopic::default()
                .with_topic(topic())
                .with_partitions(vec![FetchPartition::default()
                    .with_partition(0)
                    .with_current_leader_epoch(0)
                    .with_fetch_offset(1_234_567)
                    .with_last_fetched_epoch(-1)
                    .with_log_start_offset(-1)
                    .with_partition_max_bytes(1_048_576)])]),
    );
    let metadata = frame(
        ApiKey::Metadata,
        12,
        &MetadataRequest::default()
            .with_topics(Some(vec![
                MetadataRequestTopic::default().with_name(Some(topic()))
            ]))
            .with_allow_auto_topic_creation(true),
    );

    // The produce body keeps the batch as a slice of the frame, unchanged.
    let (_, req) = decode::<ProduceRequest>(&produce);
    let records_field = req
        .topic_data
        .first()
        .and_then(|t| t.partition_data.first())
        .and_then(|p| p.records.clone())
        .expect("records");
    assert_eq!(records_field, batch);
    println!(
        "decode: produce frame {} bytes ({} records of {} bytes), fetch frame {} bytes, metadata frame {} bytes",
        produce.len(),
        records,
        VALUE_BYTES,
        fetch.len(),
        metadata.len()
    );

    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::ElementsAndBytes {
        elements: 1,
        bytes: produce.len() as u64,
    });
    group.bench_function("produce_v9_16KiB", |b| {
        b.iter(|| black_box(decode::<ProduceRequest>(black_box(&produce))))
    });
    group.throughput(Throughput::Elements(1));
    group.bench_function("fetch_v12", |b| {
        b.iter(|| black_box(decode::<FetchRequest>(black_box(&fetch))))
    });
    group.bench_function("metadata_v12", |b| {
        b.iter(|| black_box(decode::<MetadataRequest>(black_box(&metadata))))
    });
    group.finish();

    // The record walk Produce adds before appending, per record of the same batch.
    let mut group = c.benchmark_group("validate");
    group.throughput(Throughput::ElementsAndBytes {
        elements: records as u64,
        bytes: batch.len() as u64,
    });
    group.bench_function("records_16KiB", |b| {
        b.iter(|| {
            black_box(sluice_kafka::validate_records(
                black_box(&batch),
                MAX_DECOMPRESSED,
            ))
            .unwrap()
        })
    });
    group.finish();

    // The same records compressed: decompressing them is most of the work.
    let mut group = c.benchmark_group("validate_compressed");
    group.throughput(Throughput::Elements(records as u64));
    for (name, codec) in [
        ("gzip", Compression::Gzip),
        ("snappy", Compression::Snappy),
        ("lz4", Compression::Lz4),
        ("zstd", Compression::Zstd),
    ] {
        let compressed = encode(&producer_records, codec);
        group.bench_function(format!("records_16KiB_{name}"), |b| {
            b.iter(|| {
                black_box(sluice_kafka::validate_records(
                    black_box(&compressed),
                    MAX_DECOMPRESSED,
                ))
                .unwrap()
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // Short runs: the whole bench finishes in about 15 s on two shared cores.
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench_decode
}
criterion_main!(benches);

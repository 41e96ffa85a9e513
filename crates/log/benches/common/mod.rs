//! Shared setup of the sluice-log benches: producer batches made by the
//! client codec and stores in throwaway directories under /var/tmp.

// Each bench binary compiles this module and uses only part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use criterion::Criterion;
use kafka_protocol::indexmap::IndexMap;
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use sluice_log::{FlushPolicy, Partition, Store, StoreConfig, TopicConfig};

/// A producer's `batch.size` default (Java and librdkafka): the batch that
/// reaches the broker under load.
pub const BATCH_BYTES: usize = 16 * 1024;
/// The record size the targets are stated in.
pub const VALUE_BYTES: usize = 100;

/// Short runs: `cargo bench -p sluice-log` must finish in a few minutes on
/// two shared cores.
pub fn criterion() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20)
}

/// One RecordBatch v2 as a non-idempotent producer sends it, uncompressed.
pub struct ProducerBatch {
    pub bytes: Bytes,
    pub records: u64,
}

/// The largest uncompressed batch of `VALUE_BYTES` records (no key) that
/// fits in `BATCH_BYTES`, encoded by kafka-protocol's RecordBatchEncoder,
/// the way a producer fills a batch up to `batch.size`.
pub fn producer_batch() -> ProducerBatch {
    let value = value_bytes();
    // Producers stamp records with the current time, and so does this
    // batch. The timestamp does not decide rolls here: the time-based roll
    // counts in record time from the segment's first batch (Kafka's
    // timeWaitedForRoll), so appending these same bytes again and again
    // never rolls by time, whatever the timestamp; only segment.bytes does.
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64;
    let record = |i: usize| Record {
        transactional: false,
        control: false,
        delete_horizon: false,
        partition_leader_epoch: -1,
        producer_id: -1,
        producer_epoch: -1,
        timestamp_type: TimestampType::Creation,
        offset: i as i64,
        // The encoder keeps records in one batch while offset - sequence is
        // constant; the first record's -1 makes base sequence -1 (not idempotent).
        sequence: i as i32 - 1,
        timestamp: now_ms + (i / 50) as i64,
        key: None,
        value: Some(value.clone()),
        headers: IndexMap::new(),
    };
    let mut records: Vec<Record> = Vec::new();
    let mut best: Option<Bytes> = None;
    loop {
        records.push(record(records.len()));
        let encoded = encode(&records);
        if encoded.len() > BATCH_BYTES {
            break;
        }
        best = Some(encoded);
    }
    let bytes = best.expect("one record fits in a batch");
    ProducerBatch {
        bytes,
        records: (records.len() - 1) as u64,
    }
}

fn encode(records: &[Record]) -> Bytes {
    let mut buf = BytesMut::with_capacity(BATCH_BYTES + 256);
    RecordBatchEncoder::encode(
        &mut buf,
        records,
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .expect("encode batch");
    buf.freeze()
}

/// Incompressible-looking payload (xorshift), so nothing downstream could
/// profit from runs of equal bytes.
fn value_bytes() -> Bytes {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..VALUE_BYTES)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

/// Deterministic pseudo-random numbers for offsets (no `rand` dependency).
pub struct XorShift(pub u64);

impl XorShift {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// A store in a fresh directory under /var/tmp (a real disk, not tmpfs),
/// removed when dropped, and the single partition of topic `bench`.
pub struct BenchLog {
    pub store: Arc<Store>,
    pub partition: Arc<Partition>,
    // Dropped last: the directory outlives the store.
    _dir: tempfile::TempDir,
}

/// Opens a store with `flush`; must run inside a Tokio runtime (the
/// partition's flusher is spawned on it). `overrides` are topic configs.
pub fn open_log(flush: FlushPolicy, overrides: &[(&str, &str)]) -> BenchLog {
    let dir = tempfile::Builder::new()
        .prefix("sluice-bench-")
        .tempdir_in("/var/tmp")
        .expect("tempdir under /var/tmp");
    let store = Store::open(StoreConfig {
        data_dir: dir.path().to_path_buf(),
        defaults: TopicConfig::default(),
        flush,
        cleaner: Default::default(),
    })
    .expect("open store");
    let overrides: BTreeMap<String, String> = overrides
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    store
        .create_topic("bench", 1, &overrides, false)
        .expect("create topic");
    let partition = store.partition("bench", 0).expect("partition 0");
    BenchLog {
        store,
        partition,
        _dir: dir,
    }
}

//! Integration tests of sluice-node: a single node is a cluster of one voter that
//! leads at once, keeps its data across restarts, and adopts the data directory of an
//! earlier single-node release.

// A failed unwrap is a failed test (clippy.toml allows it in #[test] fns only).
#![allow(clippy::unwrap_used)]

mod single;
mod upgrade;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use sluice_log::{FlushPolicy, ReadLimit, Store, StoreConfig, TopicConfig};
use sluice_node::{Node, NodeConfig};
use sluice_topology::{wait_image, MetadataImage, Topology};

/// Start-up, proposals and leadership of a single node take milliseconds; this is a
/// bound for a loaded machine.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,openraft=off")),
        )
        .with_test_writer()
        .try_init();
}

pub fn open_store(dir: &Path) -> Arc<Store> {
    Store::open(StoreConfig {
        data_dir: dir.to_path_buf(),
        defaults: TopicConfig::default(),
        flush: FlushPolicy::Always,
        cleaner: Default::default(),
    })
    .expect("open store")
}

/// A single node on the data directory `dir`, ready to lead.
pub async fn start_single(dir: &Path) -> Arc<Node> {
    init_tracing();
    let store = open_store(dir);
    let config = NodeConfig::single(0, dir, ("127.0.0.1".to_string(), 9092));
    let node = Node::start(store, config).await.expect("start node");
    assert!(node.wait_ready(WAIT).await, "the single node became ready");
    node
}

/// Waits until the node's image satisfies `done`.
pub async fn image_where(node: &Node, what: &str, done: impl Fn(&MetadataImage) -> bool) {
    assert!(wait_image(node, WAIT, done).await, "{what} within {WAIT:?}");
}

/// Records with the given keys (values `v-<key>`), all at `timestamp`.
pub fn records(keys: &[&str], timestamp: i64) -> Vec<Record> {
    keys.iter()
        .zip(0i64..)
        .map(|(k, offset)| Record {
            transactional: false,
            control: false,
            partition_leader_epoch: 0,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset,
            sequence: -1,
            timestamp,
            key: Some(Bytes::copy_from_slice(k.as_bytes())),
            value: Some(Bytes::from(format!("v-{k}"))),
            headers: Default::default(),
            delete_horizon: false,
        })
        .collect()
}

pub fn encode(records: &[Record]) -> Bytes {
    let mut buf = BytesMut::new();
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

/// An idempotent producer's batch: sequences from `base_sequence`.
pub fn idempotent(keys: &[&str], producer_id: i64, base_sequence: i32) -> Bytes {
    let mut recs = records(keys, 1_000);
    for (i, r) in recs.iter_mut().enumerate() {
        r.producer_id = producer_id;
        r.producer_epoch = 0;
        r.sequence = base_sequence + i32::try_from(i).unwrap_or(0);
    }
    encode(&recs)
}

/// Every committed record of a partition this node leads: (offset, key, value).
pub fn read_all(node: &Node, topic: &str, partition: i32) -> Vec<(i64, String, String)> {
    let lead = node.lead_for_read(topic, partition, -1).expect("leads");
    let p = lead.partition();
    let mut out = Vec::new();
    let mut offset = p.log_start_offset();
    while offset < p.high_watermark() {
        let read = p
            .read(offset, 1 << 20, true, ReadLimit::HighWatermark)
            .expect("read");
        let mut bytes = read.records;
        if bytes.is_empty() {
            break;
        }
        for set in RecordBatchDecoder::decode_all(&mut bytes).expect("decode") {
            for r in set.records {
                if r.offset >= offset {
                    let text = |b: Option<Bytes>| {
                        String::from_utf8_lossy(&b.unwrap_or_default()).into_owned()
                    };
                    out.push((r.offset, text(r.key), text(r.value)));
                }
            }
        }
        offset = out.last().map_or(p.high_watermark(), |r| r.0 + 1);
    }
    out
}

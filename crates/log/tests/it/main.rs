//! Integration tests of the storage engine (one test binary).

// A failed unwrap is a failed test (clippy.toml allows it in #[test] fns only).
#![allow(clippy::unwrap_used)]

mod clean_shutdown;
mod crash;
mod durability;
mod idempotence;
mod index_pages;
mod model;
mod replication;
mod retention;
mod store_meta;
mod transactions;
mod validator;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use sluice_log::{FlushPolicy, Store, StoreConfig, TopicConfig};

/// Segment log files the tests' process keeps open at most.
pub const DESCRIPTOR_BUDGET: usize = 32;

/// Describes a RecordBatch v2 to build.
#[derive(Clone, Debug)]
pub struct Spec {
    pub count: i32,
    pub payload: usize,
    pub timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub attributes: i16,
    /// Seed of the opaque "records" bytes.
    pub fill: u8,
}

impl Spec {
    pub fn plain(count: i32, payload: usize) -> Spec {
        Spec {
            count,
            payload,
            timestamp: now_ms(),
            producer_id: -1,
            producer_epoch: -1,
            base_sequence: -1,
            attributes: 0,
            fill: 7,
        }
    }

    pub fn idem(pid: i64, epoch: i16, seq: i32, count: i32) -> Spec {
        Spec {
            producer_id: pid,
            producer_epoch: epoch,
            base_sequence: seq,
            ..Spec::plain(count, 10)
        }
    }

    pub fn at(mut self, ts: i64) -> Spec {
        self.timestamp = ts;
        self
    }
}

/// A correct RecordBatch v2 (base offset 0) with a valid CRC-32C. The
/// records section is opaque filler: the engine never decodes it.
pub fn batch(s: &Spec) -> Vec<u8> {
    let mut b = Vec::with_capacity(61 + s.payload);
    b.extend_from_slice(&0i64.to_be_bytes());
    b.extend_from_slice(&((49 + s.payload) as i32).to_be_bytes());
    b.extend_from_slice(&(-1i32).to_be_bytes());
    b.push(2);
    b.extend_from_slice(&0u32.to_be_bytes());
    b.extend_from_slice(&s.attributes.to_be_bytes());
    b.extend_from_slice(&(s.count - 1).to_be_bytes());
    b.extend_from_slice(&s.timestamp.to_be_bytes());
    b.extend_from_slice(&s.timestamp.to_be_bytes());
    b.extend_from_slice(&s.producer_id.to_be_bytes());
    b.extend_from_slice(&s.producer_epoch.to_be_bytes());
    b.extend_from_slice(&s.base_sequence.to_be_bytes());
    b.extend_from_slice(&s.count.to_be_bytes());
    for i in 0..s.payload {
        b.push(s.fill.wrapping_add(i as u8));
    }
    let crc = crc32c::crc32c(&b[21..]);
    b[17..21].copy_from_slice(&crc.to_be_bytes());
    b
}

/// What the log stores for `b` at `base_offset` in `epoch`.
pub fn stamped(b: &[u8], base_offset: i64, epoch: i32) -> Vec<u8> {
    let mut v = b.to_vec();
    v[0..8].copy_from_slice(&base_offset.to_be_bytes());
    v[12..16].copy_from_slice(&epoch.to_be_bytes());
    v
}

/// (base offset, last offset, max timestamp, total size) of each batch in `buf`.
pub fn batches_in(buf: &[u8]) -> Vec<(i64, i64, i64, usize)> {
    sluice_log::validate_batches(buf)
        .map(|hs| {
            hs.iter()
                .map(|h| (h.base_offset, h.last_offset(), h.max_timestamp, h.size()))
                .collect()
        })
        .unwrap_or_else(|e| {
            if buf.is_empty() {
                Vec::new()
            } else {
                panic!("log returned invalid batches: {e}")
            }
        })
}

pub fn config(dir: &Path, flush: FlushPolicy, defaults: TopicConfig) -> StoreConfig {
    // Every test of this binary runs with few segment files open at once,
    // so closing and reopening them is exercised everywhere.
    static SMALL_DESCRIPTOR_BUDGET: std::sync::Once = std::sync::Once::new();
    // And with index pages of a few entries, so lookups read pages of the
    // index files (as they do below the newest 512 entries of a segment).
    SMALL_DESCRIPTOR_BUDGET.call_once(|| {
        sluice_log::set_segment_file_budget(DESCRIPTOR_BUDGET);
        sluice_log::set_index_page_entries(4);
    });
    StoreConfig {
        data_dir: dir.to_path_buf(),
        defaults,
        flush,
        cleaner: Default::default(),
    }
}

pub fn open(dir: &Path, flush: FlushPolicy, defaults: TopicConfig) -> Arc<Store> {
    Store::open(config(dir, flush, defaults)).expect("open store")
}

pub fn small_segments(segment_bytes: u64, index_interval: u32) -> TopicConfig {
    TopicConfig {
        segment_bytes,
        index_interval_bytes: index_interval,
        ..TopicConfig::default()
    }
}

pub fn no_overrides() -> BTreeMap<String, String> {
    BTreeMap::new()
}

/// Names of the segment log files of a partition directory, sorted.
pub fn log_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

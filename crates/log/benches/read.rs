//! The fetch read path and batch validation.
//!
//! - `read/page_cache_1MiB`: Partition::read of up to 1 MiB (a consumer's
//!   `max.partition.fetch.bytes` default) at random offsets of a 128 MiB
//!   partition whose pages are all cached: index lookup, one positioned
//!   read, the header walk that cuts whole batches.
//! - `validate/batches_1MiB`: validate_batches (what append runs first) over
//!   1 MiB of producer batches: header checks and CRC-32C of every byte.
//! - `validate/crc32c_1MiB`: the bare crc32c crate over the same bytes, the
//!   floor validation cannot go below.
//!
//! Run: `cargo bench -p sluice-log --bench read`

// A failed unwrap is a failed test (clippy.toml allows it in #[test] fns only).
#![allow(clippy::unwrap_used)]

mod common;

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sluice_log::{validate_batches, FlushPolicy, ReadLimit};

use common::{open_log, producer_batch, XorShift};

const FETCH_BYTES: usize = 1024 * 1024;
const LOG_BYTES: usize = 128 * 1024 * 1024;

fn bench_read(c: &mut Criterion) {
    let batch = producer_batch();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let log = {
        let _guard = rt.enter();
        open_log(FlushPolicy::Never, &[])
    };
    let p = &log.partition;
    for _ in 0..LOG_BYTES / batch.bytes.len() {
        p.append(&batch.bytes, 0).expect("fill partition");
    }
    let log_end = p.log_end_offset();
    // Start offsets that leave a full 1 MiB behind them, so every read
    // returns the same amount of data.
    let per_fetch_records = (FETCH_BYTES / batch.bytes.len()) as u64 * batch.records;
    let last_start = (log_end as u64).saturating_sub(2 * per_fetch_records);
    let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
    let offsets: Vec<i64> = (0..4096).map(|_| rng.below(last_start) as i64).collect();

    // Warm the page cache, check the reads are whole 1 MiB fetches and
    // measure what one returns.
    let mut returned = None;
    for &o in &offsets {
        let r = p
            .read(o, FETCH_BYTES, true, ReadLimit::HighWatermark)
            .expect("read");
        let headers = validate_batches(&r.records).expect("read returns whole batches");
        let records: u64 = headers.iter().map(|h| h.records_count as u64).sum();
        let first = headers.first().expect("a read returns data");
        assert!(first.base_offset <= o && o <= first.last_offset());
        assert!(r.records.len() <= FETCH_BYTES);
        match returned {
            None => returned = Some((r.records.len() as u64, records)),
            Some(prev) => assert_eq!(prev, (r.records.len() as u64, records)),
        }
    }
    let (bytes, records) = returned.expect("offsets");

    let mut group = c.benchmark_group("read");
    group.throughput(Throughput::ElementsAndBytes {
        elements: records,
        bytes,
    });
    let mut i = 0usize;
    group.bench_function("page_cache_1MiB", |b| {
        b.iter(|| {
            i = (i + 1) % offsets.len();
            let offset = offsets.get(i).copied().unwrap_or_default();
            black_box(
                p.read(offset, FETCH_BYTES, true, ReadLimit::HighWatermark)
                    .expect("read"),
            )
        })
    });
    group.finish();
}

fn bench_validate(c: &mut Criterion) {
    let batch = producer_batch();
    // Whole batches up to 1 MiB, as in a large produce request.
    let count = FETCH_BYTES / batch.bytes.len();
    let mut buf = BytesMut::with_capacity(FETCH_BYTES);
    for _ in 0..count {
        buf.extend_from_slice(&batch.bytes);
    }
    let buf = buf.freeze();
    assert_eq!(validate_batches(&buf).expect("valid").len(), count);

    let mut group = c.benchmark_group("validate");
    group.throughput(Throughput::ElementsAndBytes {
        elements: count as u64 * batch.records,
        bytes: buf.len() as u64,
    });
    group.bench_function("batches_1MiB", |b| {
        b.iter(|| black_box(validate_batches(black_box(&buf)).expect("valid")))
    });
    group.bench_function("crc32c_1MiB", |b| {
        b.iter(|| black_box(crc32c::crc32c(black_box(&buf))))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = bench_read, bench_validate
}
criterion_main!(benches);

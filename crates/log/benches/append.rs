//! Partition::append of a producer's 16 KiB batch of 100-byte records.
//!
//! - `append/never`: FlushPolicy::Never, one appender: the pure write path
//!   (validation with CRC-32C, the copy into the write buffer, stamping, one
//!   positioned write into the page cache, index and state updates).
//! - `append/always/N`: FlushPolicy::Always (the default), N tasks each
//!   appending and awaiting `wait_durable` in a loop, like N producers with
//!   one request in flight: group commit, one fdatasync shared by every
//!   append that arrived while the previous one ran.
//!
//! Throughput is per appended batch: bytes and records.
//!
//! Run: `cargo bench -p sluice-log --bench append`

// A failed unwrap is a failed test (clippy.toml allows it in #[test] fns only).
#![allow(clippy::unwrap_used)]

mod common;

use std::cell::Cell;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sluice_log::FlushPolicy;

use common::{open_log, producer_batch, BenchLog};

/// Segments roll at 64 MiB and retention keeps 128 MiB, so the benches
/// exercise rolls and never fill the disk; the trim runs between samples,
/// outside the timed part.
const TOPIC: &[(&str, &str)] = &[
    ("segment.bytes", "67108864"),
    ("retention.bytes", "134217728"),
];
const TRIM_ABOVE: u64 = 256 * 1024 * 1024;

fn trim(log: &BenchLog) {
    if log.partition.size_bytes() > TRIM_ABOVE {
        log.store.enforce_retention().expect("enforce retention");
    }
}

fn runtime() -> tokio::runtime::Runtime {
    // Two workers like the broker on this machine's two cores; fsyncs run on
    // the blocking pool as in the server.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn bench_append(c: &mut Criterion) {
    let batch = producer_batch();
    let rt = runtime();
    let mut group = c.benchmark_group("append");
    group.throughput(Throughput::ElementsAndBytes {
        elements: batch.records,
        bytes: batch.bytes.len() as u64,
    });

    {
        let log = {
            let _guard = rt.enter();
            open_log(FlushPolicy::Never, TOPIC)
        };
        group.bench_function("never", |b| {
            b.iter_custom(|iters| {
                trim(&log);
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(log.partition.append(&batch.bytes, 0).expect("append"));
                }
                start.elapsed()
            })
        });
    }

    for tasks in [1u64, 4, 16, 64] {
        let log = {
            let _guard = rt.enter();
            open_log(FlushPolicy::Always, TOPIC)
        };
        // (appends, fsync rounds) over the whole run, warm-up included.
        let counts = Cell::new((0u64, 0u64));
        group.bench_with_input(BenchmarkId::new("always", tasks), &tasks, |b, &tasks| {
            b.iter_custom(|iters| {
                trim(&log);
                let fsyncs_before = log.partition.fsync_count();
                let elapsed = rt.block_on(group_commit(&log, &batch.bytes, tasks, iters));
                let (appends, fsyncs) = counts.get();
                counts.set((
                    appends + iters,
                    fsyncs + log.partition.fsync_count() - fsyncs_before,
                ));
                elapsed
            })
        });
        // How much the group commit shares: appends per fdatasync round.
        let (appends, fsyncs) = counts.get();
        println!(
            "append/always/{tasks}: {appends} appends, {fsyncs} fsync rounds, {:.2} appends per fsync",
            appends as f64 / fsyncs.max(1) as f64
        );
    }
    group.finish();
}

/// `iters` appends spread over `tasks` concurrent appenders, each awaiting
/// durability before its next append. Returns the wall time of all of them.
async fn group_commit(log: &BenchLog, batch: &bytes::Bytes, tasks: u64, iters: u64) -> Duration {
    let start = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let n = iters / tasks + u64::from(t < iters % tasks);
            let partition = log.partition.clone();
            let batch = batch.clone();
            tokio::spawn(async move {
                for _ in 0..n {
                    let r = partition.append(&batch, 0).expect("append");
                    partition
                        .wait_durable(r.end_offset)
                        .await
                        .expect("wait durable");
                }
            })
        })
        .collect();
    for h in handles {
        h.await.expect("appender task");
    }
    start.elapsed()
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = bench_append
}
criterion_main!(benches);

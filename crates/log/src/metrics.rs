//! The storage engine's figures for `GET /metrics`: how long each flush
//! round's fsyncs take and how many records one round makes durable (the
//! group commit's batch). One observation per round, never per record.
//!
//! The process-wide switch for the data path's figures lives here too (the
//! lowest crate that keeps some): off, flush rounds, appends, fetches and
//! Kafka requests count nothing, at the cost of one relaxed load each.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

static HOT_PATH: AtomicBool = AtomicBool::new(true);

/// Switches the figures the data path keeps (request times and error codes,
/// records and bytes produced and fetched, flush rounds) on or off for the
/// whole process; on until switched off. Figures kept anyway (offsets,
/// sizes, the cluster) are not affected.
pub fn set_hot_path_metrics(on: bool) {
    HOT_PATH.store(on, Ordering::Relaxed);
}

/// Whether the data path keeps its figures (see [`set_hot_path_metrics`]).
/// Relaxed: a request that sees the switch late counts once more or less.
#[inline]
pub fn hot_path_metrics() -> bool {
    HOT_PATH.load(Ordering::Relaxed)
}

/// The process's flush rounds, over every store and partition.
pub struct LogMetrics {
    fsync: Histogram,
    records_per_fsync: Histogram,
}

/// The process's figures (metrics of a process, like the segment file
/// budget: every store in it shares them).
pub fn log_metrics() -> &'static LogMetrics {
    static METRICS: OnceLock<LogMetrics> = OnceLock::new();
    METRICS.get_or_init(|| LogMetrics {
        // 50 µs to about 1.6 s, doubling.
        fsync: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
        // 1 to about 1M records, by fours.
        records_per_fsync: Histogram::new(exponential_buckets(1.0, 4.0, 11)),
    })
}

impl LogMetrics {
    /// A flush round synced `records` records in `took`.
    pub(crate) fn flush_round(&self, took: Duration, records: i64) {
        if !hot_path_metrics() {
            return;
        }
        self.fsync.observe(took.as_secs_f64());
        self.records_per_fsync.observe(records.max(0) as f64);
    }

    /// Adds the storage engine's series to `registry` (under its prefix).
    pub fn register(&self, registry: &mut Registry) {
        if !hot_path_metrics() {
            return;
        }
        registry.register_with_unit(
            "log_flush_duration",
            "Time one flush round of a partition takes to fsync what was written (group commit)",
            Unit::Seconds,
            self.fsync.clone(),
        );
        registry.register(
            "log_flush_records",
            "Records one flush round of a partition made durable (the group commit's batch)",
            self.records_per_fsync.clone(),
        );
    }
}

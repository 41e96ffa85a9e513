//! The storage engine's figures for `GET /metrics`: how long each flush
//! round's fsyncs take and how many records one round makes durable (the
//! group commit's batch). One observation per round, never per record.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

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
        self.fsync.observe(took.as_secs_f64());
        self.records_per_fsync.observe(records.max(0) as f64);
    }

    /// Adds the storage engine's series to `registry` (under its prefix).
    pub fn register(&self, registry: &mut Registry) {
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

//! Latency statistics and the run's report (JSON and a human table).

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::cluster::Cluster;
use crate::schedule::{mean_until, LittlesLaw, Sample};
use crate::{compression_name, BenchConfig};

/// Highest latency the histogram tracks (one hour, in nanoseconds); larger
/// values are clamped to it.
const MAX_TRACKED_NS: u64 = 3_600_000_000_000;

/// Latencies in nanoseconds: an HDR histogram (3 significant digits) for
/// percentiles, and an exact sum for the mean.
#[derive(Clone, Debug)]
pub struct Stats {
    hist: Histogram<u64>,
    sum_ns: u128,
    count: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

impl Stats {
    pub fn new() -> Stats {
        // The bounds are constants that the constructor accepts.
        let hist = Histogram::new_with_bounds(1, MAX_TRACKED_NS, 3)
            .unwrap_or_else(|_| unreachable!("valid histogram bounds"));
        Stats {
            hist,
            sum_ns: 0,
            count: 0,
        }
    }

    /// Records `n` occurrences of one latency.
    pub fn record_n(&mut self, latency_ns: u64, n: u64) {
        if n == 0 {
            return;
        }
        let v = latency_ns.clamp(1, MAX_TRACKED_NS);
        self.hist.saturating_record_n(v, n);
        self.sum_ns += u128::from(latency_ns) * u128::from(n);
        self.count += n;
    }

    pub fn record(&mut self, latency_ns: u64) {
        self.record_n(latency_ns, 1);
    }

    pub fn merge(&mut self, other: &Stats) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.hist.add(&other.hist);
        self.sum_ns += other.sum_ns;
        self.count += other.count;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn mean_ns(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum_ns as f64 / self.count as f64
        }
    }

    pub fn latency_ms(&self) -> LatencyMs {
        let q = |q: f64| self.hist.value_at_quantile(q) as f64 / 1e6;
        if self.count == 0 {
            return LatencyMs::default();
        }
        LatencyMs {
            p50: q(0.50),
            p90: q(0.90),
            p99: q(0.99),
            p999: q(0.999),
            max: self.hist.max() as f64 / 1e6,
            mean: self.mean_ns() / 1e6,
        }
    }
}

/// A transactional producer's commits: EndTxn alone (request to answer),
/// and the whole commit call (waiting for the batches in flight to be
/// acknowledged, then EndTxn) as a client's `commit_transaction()` takes it.
#[derive(Clone, Debug, Default)]
pub struct Commits {
    pub end_txn: Stats,
    pub with_flush: Stats,
}

impl Commits {
    pub fn merge(&mut self, other: &Commits) {
        self.end_txn.merge(&other.end_txn);
        self.with_flush.merge(&other.with_flush);
    }
}

/// Latency percentiles in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct LatencyMs {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// What a mode measured, turned into a [`Report`] by [`Report::build`].
pub struct Measured {
    pub records: u64,
    /// From the start to the last completion.
    pub elapsed: Duration,
    pub stats: Stats,
    pub cpu_seconds: f64,
    pub samples: Vec<Sample>,
    /// What the in-flight samples and the histogram count.
    pub unit: &'static str,
    pub latency_of: &'static str,
    pub producers: usize,
    pub consumers: usize,
    /// e2e: the producers' own acknowledgement latencies.
    pub ack_stats: Option<Stats>,
    /// Transactional producers: commit latencies (empty otherwise).
    pub commits: Commits,
}

/// The result of one run; `--json` prints it as one object.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub mode: &'static str,
    pub bootstrap: String,
    pub topic: String,
    pub record_size: usize,
    pub records: u64,
    pub duration_s: f64,
    pub records_per_sec: f64,
    /// Value bytes per second over 10^6.
    pub mb_per_sec: f64,
    pub latency_ms: LatencyMs,
    /// e2e only: produce acknowledgement latency of the same run, to tell
    /// the write path's share of the end-to-end latency from the read path's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ack_latency_ms: Option<LatencyMs>,
    /// "ack" (produce: request sent to acknowledgement, attributed to each
    /// record of the batch, from its intended send time), "socket_write"
    /// (acks=0), "fetch" (consume: per fetch request) or "end_to_end".
    pub latency_of: &'static str,
    /// "plain", "idempotent" or "transactional".
    pub delivery: &'static str,
    /// Transactional producers: transactions committed, the latency of
    /// EndTxn, and of the whole commit call (the in-flight batches'
    /// acknowledgements, then EndTxn).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transactions: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit_latency_ms: Option<LatencyMs>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit_call_latency_ms: Option<LatencyMs>,
    pub client_cpu_seconds: f64,
    /// CPU seconds per wall-clock second of the load generator (1.0 = one core).
    pub client_cpu_share: f64,
    pub littles_law: LittlesLaw,
    pub acks: &'static str,
    pub compression: &'static str,
    pub producers: usize,
    pub consumers: usize,
    pub partitions: usize,
    /// Open-loop target rate in records per second; null when closed loop.
    pub target_rate: Option<f64>,
    pub batch_bytes: usize,
    pub linger_ms: f64,
    pub max_in_flight: usize,
    pub fetch_bytes: usize,
}

impl Report {
    pub fn build(cfg: &BenchConfig, cluster: &Cluster, m: Measured) -> Report {
        let secs = m.elapsed.as_secs_f64();
        let per_sec = |x: f64| if secs > 0.0 { x / secs } else { 0.0 };
        let records_per_sec = per_sec(m.records as f64);
        let mb_per_sec = per_sec(m.records as f64 * cfg.record_size as f64) / 1e6;
        let littles_law = LittlesLaw::compute(
            mean_until(&m.samples, m.elapsed),
            per_sec(m.stats.count() as f64),
            m.stats.mean_ns() / 1e9,
            m.unit,
        );
        Report {
            mode: cfg.mode.name(),
            bootstrap: cfg.bootstrap.clone(),
            topic: cfg.topic.clone(),
            record_size: cfg.record_size,
            records: m.records,
            duration_s: secs,
            records_per_sec,
            mb_per_sec,
            latency_ms: m.stats.latency_ms(),
            ack_latency_ms: m.ack_stats.as_ref().map(Stats::latency_ms),
            latency_of: m.latency_of,
            delivery: cfg.delivery.name(),
            transactions: (m.commits.end_txn.count() > 0).then(|| m.commits.end_txn.count()),
            commit_latency_ms: (m.commits.end_txn.count() > 0)
                .then(|| m.commits.end_txn.latency_ms()),
            commit_call_latency_ms: (m.commits.with_flush.count() > 0)
                .then(|| m.commits.with_flush.latency_ms()),
            client_cpu_seconds: m.cpu_seconds,
            client_cpu_share: if secs > 0.0 {
                m.cpu_seconds / secs
            } else {
                0.0
            },
            littles_law,
            acks: cfg.acks.name(),
            compression: compression_name(cfg.compression),
            producers: m.producers,
            consumers: m.consumers,
            partitions: cluster.leaders.len(),
            target_rate: cfg.rate,
            batch_bytes: cfg.batch_bytes,
            linger_ms: cfg.linger.as_secs_f64() * 1e3,
            max_in_flight: cfg.max_in_flight,
            fetch_bytes: cfg.fetch_bytes,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let l = &self.latency_ms;
        let rate = match self.target_rate {
            Some(r) => format!("open loop at {r:.0} records/s"),
            None => "closed loop".to_string(),
        };
        let _ = writeln!(
            s,
            "sluice bench {} — {} on {} (topic {}, {} partitions)",
            self.mode, rate, self.bootstrap, self.topic, self.partitions
        );
        if self.producers > 0 {
            let _ = writeln!(
                s,
                "  producers {} ({})  consumers {}  record {} B  acks {}  compression {}  batch {} B  linger {} ms  in-flight {}",
                self.producers,
                self.delivery,
                self.consumers,
                self.record_size,
                self.acks,
                self.compression,
                self.batch_bytes,
                self.linger_ms,
                self.max_in_flight
            );
        } else {
            let _ = writeln!(s, "  consumers {}", self.consumers);
        }
        let _ = writeln!(s, "  {:<22} {:>14}", "records", self.records);
        let _ = writeln!(s, "  {:<22} {:>14.3}", "duration (s)", self.duration_s);
        let _ = writeln!(s, "  {:<22} {:>14.0}", "records/s", self.records_per_sec);
        let _ = writeln!(s, "  {:<22} {:>14.1}", "MB/s (values)", self.mb_per_sec);
        let _ = writeln!(s, "  latency ({}) ms:", self.latency_of);
        for (name, v) in [
            ("p50", l.p50),
            ("p90", l.p90),
            ("p99", l.p99),
            ("p99.9", l.p999),
            ("max", l.max),
            ("mean", l.mean),
        ] {
            let _ = writeln!(s, "    {name:<20} {v:>14.3}");
        }
        if let Some(n) = self.transactions {
            let _ = writeln!(s, "  {:<22} {:>14}", "transactions", n);
        }
        for (what, l) in [
            ("EndTxn", &self.commit_latency_ms),
            ("flush + EndTxn", &self.commit_call_latency_ms),
        ] {
            if let Some(c) = l {
                let _ = writeln!(
                    s,
                    "  commit ({what}) ms: p50 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
                    c.p50, c.p99, c.p999, c.max
                );
            }
        }
        if let Some(a) = &self.ack_latency_ms {
            let _ = writeln!(
                s,
                "  produce ack latency ms: p50 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
                a.p50, a.p99, a.p999, a.max
            );
        }
        let _ = writeln!(
            s,
            "  {:<22} {:>14.2} s ({:.0}% of one core)",
            "client CPU",
            self.client_cpu_seconds,
            self.client_cpu_share * 100.0
        );
        let ll = &self.littles_law;
        let _ =
            writeln!(
            s,
            "  Little's law ({}): mean in flight {:.1} vs throughput x mean latency {:.1} -> {}",
            ll.unit,
            ll.mean_in_flight,
            ll.throughput_x_mean_latency,
            if ll.agree { "agree (within 20%)" } else { "DISAGREE (more than 20% apart)" }
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_percentiles_and_mean() {
        let mut s = Stats::new();
        for i in 1..=1000u64 {
            s.record(i * 1_000_000); // 1..1000 ms
        }
        let l = s.latency_ms();
        assert!((l.p50 - 500.0).abs() < 1.0, "{l:?}");
        assert!((l.p99 - 990.0).abs() < 1.0, "{l:?}");
        assert!((l.max - 1000.0).abs() < 1.0, "{l:?}");
        assert!((l.mean - 500.5).abs() < 1e-9, "{l:?}");
        let mut t = Stats::new();
        t.record_n(2_000_000_000, 1000);
        s.merge(&t);
        assert_eq!(s.count(), 2000);
        assert!((s.latency_ms().p90 - 2000.0).abs() < 2.0);
        assert_eq!(Stats::new().latency_ms(), LatencyMs::default());
    }
}

//! Measurement primitives shared by every load generator: an HDR latency
//! histogram, the process's own CPU time, open-loop pacing, and the result
//! object whose schema matches `sluice bench --json`.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Highest latency the histogram tracks exactly (ns); larger samples saturate
/// at this value, so a stalled run still reports a (capped) max.
const MAX_TRACKED_NS: u64 = 600_000_000_000;

/// Latency percentiles in milliseconds, as `sluice bench --json` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// Nanosecond-resolution latency histogram (3 significant digits).
pub struct LatencyRecorder {
    hist: Histogram<u64>,
}

impl Default for LatencyRecorder {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyRecorder {
    pub fn new() -> Self {
        // Bounds are constants that hdrhistogram accepts (low >= 1, high >= 2*low,
        // sigfig <= 5); the fallback only guards against a library change.
        let hist = Histogram::new_with_bounds(1, MAX_TRACKED_NS, 3)
            .or_else(|_| Histogram::new(3))
            .unwrap_or_else(|_| unreachable_histogram());
        Self { hist }
    }

    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.hist.saturating_record(ns.min(MAX_TRACKED_NS));
    }

    pub fn record_ns(&mut self, ns: u64) {
        self.hist.saturating_record(ns.clamp(1, MAX_TRACKED_NS));
    }

    #[cfg(test)]
    pub fn len(&self) -> u64 {
        self.hist.len()
    }

    /// Percentiles in ms, or None when nothing was recorded.
    pub fn summary(&self) -> Option<LatencySummary> {
        if self.hist.is_empty() {
            return None;
        }
        let ms = |ns: u64| ns as f64 / 1e6;
        Some(LatencySummary {
            p50: ms(self.hist.value_at_quantile(0.50)),
            p90: ms(self.hist.value_at_quantile(0.90)),
            p99: ms(self.hist.value_at_quantile(0.99)),
            p999: ms(self.hist.value_at_quantile(0.999)),
            max: ms(self.hist.max()),
            mean: self.hist.mean() / 1e6,
        })
    }
}

#[cold]
fn unreachable_histogram() -> Histogram<u64> {
    // Histogram::new(3) only fails for sigfig > 5; keep a panic-free path anyway.
    Histogram::new(2).unwrap_or_else(|_| std::process::abort())
}

/// User + system CPU seconds consumed by this process so far.
#[allow(unsafe_code)]
pub fn process_cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a full rusage into the pointer we pass; the
    // struct is zero-initialised, so reading it is sound even on failure.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if rc != 0 {
        return 0.0;
    }
    // SAFETY: initialised above (zeroed, then filled by the kernel).
    let usage = unsafe { usage.assume_init() };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Wall clock and CPU clock started together, so a run reports both.
pub struct RunClock {
    pub start: Instant,
    cpu_start: f64,
}

impl RunClock {
    pub fn start() -> Self {
        Self {
            start: Instant::now(),
            cpu_start: process_cpu_seconds(),
        }
    }

    pub fn cpu_seconds(&self) -> f64 {
        (process_cpu_seconds() - self.cpu_start).max(0.0)
    }
}

/// Open-loop schedule: record `i` is due at `start + i / rate`. Latency is
/// measured from that intended time, so a stall that delays sending is
/// counted against the system instead of being hidden (coordinated omission).
#[derive(Debug, Clone, Copy)]
pub struct Pacer {
    interval_ns: Option<f64>,
}

impl Pacer {
    pub fn new(rate: Option<f64>) -> Self {
        let interval_ns = rate.filter(|r| r.is_finite() && *r > 0.0).map(|r| 1e9 / r);
        Self { interval_ns }
    }

    /// Intended send time of record `i`, as ns after the run's start; None
    /// when closed loop (send as fast as the window allows).
    pub fn due_ns(&self, i: u64) -> Option<u64> {
        self.interval_ns.map(|iv| (i as f64 * iv) as u64)
    }

    /// Sleep until record `i` is due (no-op when closed loop or already late).
    pub async fn wait_for(&self, start: Instant, i: u64) -> u64 {
        match self.due_ns(i) {
            Some(due) => {
                let target = start + Duration::from_nanos(due);
                if target > Instant::now() {
                    tokio::time::sleep_until(target.into()).await;
                }
                due
            }
            None => nanos_since(start),
        }
    }
}

pub fn nanos_since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Writes the send timestamp (ns since the run's start) into the first 8
/// bytes of the payload, where the consumer finds it.
pub fn stamp(payload: &mut [u8], ns: u64) {
    if let Some(head) = payload.get_mut(..8) {
        head.copy_from_slice(&ns.to_le_bytes());
    }
}

/// Reads a timestamp written by [`stamp`]; None if the payload is too short.
pub fn read_stamp(payload: &[u8]) -> Option<u64> {
    let head: [u8; 8] = payload.get(..8)?.try_into().ok()?;
    Some(u64::from_le_bytes(head))
}

/// Payload of `size` bytes that does not compress to nothing.
pub fn payload(size: usize) -> Vec<u8> {
    let mut x: u32 = 0x9E37_79B9;
    (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x & 0xFF) as u8
        })
        .collect()
}

/// One benchmark result: the schema of `sluice bench --json`, plus free-form
/// extra fields (flattened into the same object).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchResult {
    #[serde(default)]
    pub system: String,
    #[serde(default)]
    pub scenario: String,
    #[serde(default)]
    pub mode: String,
    #[serde(default)]
    pub record_size: u64,
    #[serde(default)]
    pub records: u64,
    #[serde(default)]
    pub duration_s: f64,
    #[serde(default)]
    pub records_per_sec: f64,
    #[serde(default)]
    pub mb_per_sec: f64,
    #[serde(default)]
    pub latency_ms: Option<LatencySummary>,
    #[serde(default)]
    pub client_cpu_seconds: f64,
    #[serde(default)]
    pub client_cpu_share: f64,
    #[serde(default)]
    pub durable_before_ack: Option<bool>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// MB as 10^6 bytes, the unit `sluice bench` reports.
pub const MB: f64 = 1e6;

impl BenchResult {
    /// Builds a result from raw counts; rates are derived, never passed in,
    /// so records/s and MB/s always agree with records and duration.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        system: &str,
        scenario: &str,
        mode: &str,
        record_size: u64,
        records: u64,
        duration: Duration,
        latency: Option<LatencySummary>,
        cpu_seconds: f64,
        durable_before_ack: bool,
    ) -> Self {
        let secs = duration.as_secs_f64();
        let per_sec = |n: f64| if secs > 0.0 { n / secs } else { 0.0 };
        Self {
            system: system.to_owned(),
            scenario: scenario.to_owned(),
            mode: mode.to_owned(),
            record_size,
            records,
            duration_s: secs,
            records_per_sec: per_sec(records as f64),
            mb_per_sec: per_sec(records as f64 * record_size as f64) / MB,
            latency_ms: latency,
            client_cpu_seconds: cpu_seconds,
            client_cpu_share: if secs > 0.0 { cpu_seconds / secs } else { 0.0 },
            durable_before_ack: Some(durable_before_ack),
            extra: Map::new(),
        }
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(key.to_owned(), value.into());
        self
    }

    /// Prints the result as ONE JSON object on stdout (one line).
    pub fn print(&self) -> anyhow::Result<()> {
        println!("{}", serde_json::to_string(self)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_uniform_samples() {
        let mut r = LatencyRecorder::new();
        for us in 1..=1000u64 {
            r.record(Duration::from_micros(us));
        }
        let s = r.summary().expect("samples recorded");
        // 3 significant digits: within 0.1% of the exact order statistic.
        assert!((s.p50 - 0.500).abs() < 0.001, "p50 {}", s.p50);
        assert!((s.p90 - 0.900).abs() < 0.001, "p90 {}", s.p90);
        assert!((s.p99 - 0.990).abs() < 0.001, "p99 {}", s.p99);
        assert!((s.p999 - 0.999).abs() < 0.002, "p999 {}", s.p999);
        assert!((s.max - 1.000).abs() < 0.001, "max {}", s.max);
        assert!((s.mean - 0.5005).abs() < 0.001, "mean {}", s.mean);
        assert_eq!(r.len(), 1000);
    }

    #[test]
    fn empty_histogram_has_no_summary() {
        assert!(LatencyRecorder::new().summary().is_none());
    }

    #[test]
    fn huge_samples_saturate_instead_of_failing() {
        let mut r = LatencyRecorder::new();
        r.record(Duration::from_secs(3600));
        r.record_ns(0);
        let s = r.summary().expect("samples recorded");
        assert!(s.max >= 599_000.0 && s.max <= 601_000.0, "max {}", s.max);
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn rates_derive_from_counts() {
        let r = BenchResult::new(
            "x",
            "s",
            "publish",
            100,
            50_000,
            Duration::from_millis(500),
            None,
            0.25,
            true,
        );
        assert!((r.records_per_sec - 100_000.0).abs() < 1e-6);
        assert!((r.mb_per_sec - 10.0).abs() < 1e-9);
        assert!((r.client_cpu_share - 0.5).abs() < 1e-9);
    }

    #[test]
    fn json_round_trip_keeps_extra_fields_flat() {
        let r = BenchResult::new(
            "nats",
            "s",
            "e2e",
            1024,
            10,
            Duration::from_secs(1),
            None,
            0.0,
            false,
        )
        .with("rate_target", 500.0);
        let text = serde_json::to_string(&r).expect("serialise");
        let v: Value = serde_json::from_str(&text).expect("parse");
        assert_eq!(v.get("rate_target").and_then(Value::as_f64), Some(500.0));
        assert_eq!(
            v.get("durable_before_ack").and_then(Value::as_bool),
            Some(false)
        );
        let back: BenchResult = serde_json::from_str(&text).expect("deserialise");
        assert_eq!(back, r);
    }

    #[test]
    fn stamp_round_trip_and_short_payload() {
        let mut p = payload(100);
        stamp(&mut p, 123_456_789);
        assert_eq!(read_stamp(&p), Some(123_456_789));
        assert_eq!(read_stamp(&[1, 2, 3]), None);
        let mut short = [0u8; 4];
        stamp(&mut short, 7);
        assert_eq!(short, [0u8; 4]);
    }

    #[test]
    fn pacer_schedule() {
        let p = Pacer::new(Some(1000.0));
        assert_eq!(p.due_ns(0), Some(0));
        assert_eq!(p.due_ns(1500), Some(1_500_000_000));
        assert_eq!(Pacer::new(None).due_ns(5), None);
        assert_eq!(Pacer::new(Some(0.0)).due_ns(5), None);
    }

    #[test]
    fn cpu_clock_advances_with_work() {
        let c = RunClock::start();
        let mut x = 0u64;
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        assert!(c.cpu_seconds() > 0.01, "cpu {}", c.cpu_seconds());
    }
}

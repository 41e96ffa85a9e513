//! When records are due, how many are in flight, and the arithmetic that
//! checks one against the other (Little's law).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One producer's send schedule.
///
/// Open loop (`rate` set): record i is due at `start + i / rate`, whatever
/// happened to earlier records, and its latency is measured from that
/// intended time, so a stall shows up in the latency of every record that
/// should have been sent during it (no coordinated omission).
/// Closed loop (`rate` None): a record is due when the producer gets to it;
/// the intended time is when it is put into a batch.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    /// Records per second of this producer.
    pub rate: Option<f64>,
    /// Records this producer sends; None with a duration.
    pub total: Option<u64>,
    /// No record is due at or after this offset from the start.
    pub duration: Option<Duration>,
}

impl Schedule {
    /// Intended send time of record `i`, as nanoseconds after the start
    /// (open loop only).
    pub fn intended_ns(&self, i: u64) -> Option<u64> {
        let rate = self.rate?;
        Some((i as f64 * 1e9 / rate) as u64)
    }

    /// True when record `i` is past the end of the run (count or duration).
    pub fn finished(&self, i: u64, elapsed: Duration) -> bool {
        if self.total.is_some_and(|t| i >= t) {
            return true;
        }
        match (self.duration, self.intended_ns(i)) {
            (Some(d), Some(at)) => at >= d.as_nanos() as u64,
            (Some(d), None) => elapsed >= d,
            (None, _) => false,
        }
    }

    /// Number of records due by `elapsed` after the start (open loop): the
    /// i with `intended_ns(i) <= elapsed`, capped by the total and duration.
    /// None in closed loop, where every record is due as soon as possible.
    pub fn due(&self, elapsed: Duration) -> Option<u64> {
        let mut n = self.count_at_or_before(elapsed.as_nanos() as u64)?;
        if let Some(t) = self.total {
            n = n.min(t);
        }
        if let Some(d) = self.duration {
            // Records intended at or after the end of the run are not sent.
            let end = d.as_nanos() as u64;
            let before_end = match end.checked_sub(1) {
                Some(last) => self.count_at_or_before(last)?,
                None => 0,
            };
            n = n.min(before_end);
        }
        Some(n)
    }

    /// How many i have `intended_ns(i) <= ns`.
    fn count_at_or_before(&self, ns: u64) -> Option<u64> {
        let rate = self.rate?;
        let mut n = (ns as f64 * rate / 1e9).floor() as u64 + 1;
        // Float rounding may put the boundary one record off; settle it with
        // the function that gives the intended times.
        while n > 0 && self.intended_ns(n - 1).is_some_and(|t| t > ns) {
            n -= 1;
        }
        while self.intended_ns(n).is_some_and(|t| t <= ns) {
            n += 1;
        }
        Some(n)
    }

    /// Time until record `i` is due, from `elapsed` (zero when already due).
    pub fn wait_for(&self, i: u64, elapsed: Duration) -> Duration {
        match self.intended_ns(i) {
            Some(at) => Duration::from_nanos(at.saturating_sub(elapsed.as_nanos() as u64)),
            None => Duration::ZERO,
        }
    }
}

/// Splits `total` records and `rate` over `producers` schedules.
pub fn split(
    producers: usize,
    total: Option<u64>,
    rate: Option<f64>,
    duration: Option<Duration>,
) -> Vec<Schedule> {
    let p = producers.max(1) as u64;
    (0..p)
        .map(|k| Schedule {
            rate: rate.map(|r| r / p as f64),
            total: total.map(|t| t / p + u64::from(k < t % p)),
            duration,
        })
        .collect()
}

/// Counters shared by the workers and the in-flight sampler.
#[derive(Debug, Default)]
pub struct Counters {
    /// Records handed to the system (closed loop: put in a batch).
    pub started: AtomicU64,
    /// Records whose latency was recorded (acknowledged, or consumed in e2e).
    pub completed: AtomicU64,
    /// Requests in flight (consume mode's Little's law is over fetches).
    pub requests_in_flight: AtomicU64,
}

/// One in-flight sample: (nanoseconds after the start, count).
pub type Sample = (u64, u64);

/// Samples "in flight" every `period` until stopped.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Vec<Sample>>,
}

impl Sampler {
    /// `in_flight(elapsed)` is called from a plain thread, so sampling keeps
    /// its pace when the async workers are busy.
    pub fn start<F>(period: Duration, start: Instant, in_flight: F) -> Sampler
    where
        F: Fn(Duration) -> u64 + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut samples = Vec::with_capacity(1 << 16);
            while !flag.load(Ordering::Relaxed) {
                let at = start.elapsed();
                samples.push((at.as_nanos() as u64, in_flight(at)));
                std::thread::sleep(period);
            }
            samples
        });
        Sampler { stop, handle }
    }

    /// Stops sampling and returns the samples.
    pub fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

/// Mean of the samples taken up to `end` (the measured interval; samples
/// after the last completion would add zeros that are not part of it).
pub fn mean_until(samples: &[Sample], end: Duration) -> f64 {
    let end = end.as_nanos() as u64;
    let (sum, n) = samples
        .iter()
        .filter(|(at, _)| *at <= end)
        .fold((0f64, 0u64), |(s, n), (_, v)| (s + *v as f64, n + 1));
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

/// Little's law, L = λW, measured both ways.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct LittlesLaw {
    /// L: mean of the periodic in-flight samples.
    pub mean_in_flight: f64,
    /// λW: completions per second times mean latency in seconds.
    pub throughput_x_mean_latency: f64,
    /// Whether the two are within 20% of each other.
    pub agree: bool,
    /// What is counted: "records" or "fetch_requests".
    pub unit: &'static str,
}

/// Relative tolerance of the Little's-law cross-check.
pub const LITTLE_TOLERANCE: f64 = 0.20;

impl LittlesLaw {
    pub fn compute(
        mean_in_flight: f64,
        throughput_per_s: f64,
        mean_latency_s: f64,
        unit: &'static str,
    ) -> LittlesLaw {
        let lw = throughput_per_s * mean_latency_s;
        let big = mean_in_flight.max(lw);
        // Relative difference to the larger side; two (near) zeros agree.
        let agree = big < 1e-9 || (mean_in_flight - lw).abs() / big <= LITTLE_TOLERANCE;
        LittlesLaw {
            mean_in_flight,
            throughput_x_mean_latency: lw,
            agree,
            unit,
        }
    }
}

/// CPU seconds (user + system) this process has used so far.
#[allow(unsafe_code)]
pub fn process_cpu_seconds() -> f64 {
    // SAFETY: rusage is plain integers, for which all-zero bytes are a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes the struct it is given.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(rate: f64, total: Option<u64>, duration: Option<Duration>) -> Schedule {
        Schedule {
            rate: Some(rate),
            total,
            duration,
        }
    }

    #[test]
    fn intended_times_are_start_plus_i_over_rate() {
        let s = open(1000.0, None, None);
        assert_eq!(s.intended_ns(0), Some(0));
        assert_eq!(s.intended_ns(1), Some(1_000_000));
        assert_eq!(s.intended_ns(2500), Some(2_500_000_000));
        let s = open(3.0, None, None);
        assert_eq!(s.intended_ns(1), Some(333_333_333));
        assert_eq!(s.intended_ns(3), Some(1_000_000_000));
        let closed = Schedule {
            rate: None,
            total: Some(5),
            duration: None,
        };
        assert_eq!(closed.intended_ns(3), None);
        assert_eq!(closed.due(Duration::from_secs(1)), None);
    }

    #[test]
    fn due_counts_records_whose_time_has_come() {
        let s = open(1000.0, None, None);
        // Record 0 is due at the start itself.
        assert_eq!(s.due(Duration::ZERO), Some(1));
        assert_eq!(s.due(Duration::from_micros(999)), Some(1));
        assert_eq!(s.due(Duration::from_millis(1)), Some(2));
        assert_eq!(s.due(Duration::from_millis(10)), Some(11));
        // Consistent with intended times at every boundary.
        let s = open(7.0, None, None);
        for i in 0..50u64 {
            let at = Duration::from_nanos(s.intended_ns(i).unwrap());
            assert_eq!(s.due(at), Some(i + 1), "record {i}");
            if let Some(before) = at.checked_sub(Duration::from_nanos(1)) {
                assert_eq!(s.due(before), Some(i), "just before record {i}");
            }
        }
    }

    #[test]
    fn due_is_capped_by_total_and_duration() {
        let s = open(1000.0, Some(5), None);
        assert_eq!(s.due(Duration::from_secs(10)), Some(5));
        assert!(s.finished(5, Duration::ZERO));
        assert!(!s.finished(4, Duration::ZERO));
        // 2 s at 1000/s: records 0..=1999 have intended times below 2 s.
        let s = open(1000.0, None, Some(Duration::from_secs(2)));
        assert_eq!(s.due(Duration::from_secs(100)), Some(2000));
        assert!(s.finished(2000, Duration::ZERO));
        assert!(!s.finished(1999, Duration::from_secs(100)));
    }

    #[test]
    fn waits_until_the_intended_time() {
        let s = open(100.0, None, None);
        assert_eq!(
            s.wait_for(3, Duration::from_millis(10)),
            Duration::from_millis(20)
        );
        assert_eq!(s.wait_for(3, Duration::from_millis(40)), Duration::ZERO);
    }

    #[test]
    fn split_shares_records_and_rate() {
        let parts = split(3, Some(10), Some(300.0), None);
        let totals: Vec<u64> = parts.iter().map(|s| s.total.unwrap()).collect();
        assert_eq!(totals, vec![4, 3, 3]);
        assert!(parts.iter().all(|s| s.rate == Some(100.0)));
        let parts = split(2, None, None, Some(Duration::from_secs(1)));
        assert!(parts.iter().all(|s| s.total.is_none() && s.rate.is_none()));
    }

    #[test]
    fn littles_law_agreement() {
        // 1000 records/s, 5 ms mean latency: 5 in flight.
        let l = LittlesLaw::compute(5.0, 1000.0, 0.005, "records");
        assert!((l.throughput_x_mean_latency - 5.0).abs() < 1e-9);
        assert!(l.agree);
        // 19% off agrees, 30% off does not (relative to the larger side).
        assert!(LittlesLaw::compute(4.1, 1000.0, 0.005, "records").agree);
        assert!(!LittlesLaw::compute(3.5, 1000.0, 0.005, "records").agree);
        assert!(!LittlesLaw::compute(7.5, 1000.0, 0.005, "records").agree);
        assert!(LittlesLaw::compute(0.0, 0.0, 0.0, "records").agree);
        assert!(!LittlesLaw::compute(0.0, 1000.0, 0.005, "records").agree);
    }

    #[test]
    fn sampler_averages() {
        let start = Instant::now();
        let s = Sampler::start(Duration::from_millis(1), start, |_| 7);
        std::thread::sleep(Duration::from_millis(20));
        let samples = s.finish();
        assert!(samples.len() >= 2);
        assert_eq!(mean_until(&samples, Duration::from_secs(10)), 7.0);
        // Only samples inside the measured interval count.
        let samples = [(0, 4), (1_000, 6), (2_000, 100)];
        assert_eq!(mean_until(&samples, Duration::from_nanos(1_500)), 5.0);
        assert_eq!(mean_until(&[], Duration::from_secs(1)), 0.0);
    }

    #[test]
    fn cpu_time_moves_forward() {
        let a = process_cpu_seconds();
        let mut x = 0u64;
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_mul(31).wrapping_add(1);
        }
        std::hint::black_box(x);
        let b = process_cpu_seconds();
        assert!(b > a, "{a} -> {b}");
    }
}

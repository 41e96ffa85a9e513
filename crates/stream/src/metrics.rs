//! The figures a running job reports for each stage and subtask (Flink's task
//! metrics): records in and out, the time its output waited on a full channel
//! (backpressure), and its current watermark with how far it trails the clock.
//!
//! Subtasks only add to atomics, once per batch, never per record. Links at
//! the end of a chain (the exchange to the next stage) are built before their
//! subtask's thread starts, so they find their subtask's figures through the
//! thread it runs on ([`enter`]).

use std::cell::RefCell;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::WATERMARK_END;

/// One subtask's figures, since the run started.
pub(crate) struct SubtaskMetrics {
    records_in: AtomicU64,
    records_out: AtomicU64,
    backpressured_ns: AtomicU64,
    watermark: AtomicI64,
}

impl Default for SubtaskMetrics {
    fn default() -> Self {
        SubtaskMetrics {
            records_in: AtomicU64::new(0),
            records_out: AtomicU64::new(0),
            backpressured_ns: AtomicU64::new(0),
            watermark: AtomicI64::new(i64::MIN),
        }
    }
}

impl SubtaskMetrics {
    /// Records that entered the stage here: from its inputs, or from its source.
    pub fn add_in(&self, n: usize) {
        self.records_in.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Records the stage sent on to the next one.
    pub fn add_out(&self, n: usize) {
        self.records_out.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Time the subtask waited for room in a full channel downstream.
    pub fn add_backpressure(&self, waited: Duration) {
        let ns = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
        self.backpressured_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub fn set_watermark(&self, watermark: i64) {
        self.watermark.store(watermark, Ordering::Relaxed);
    }

    fn sample(&self) -> Sample {
        Sample {
            records_in: self.records_in.load(Ordering::Relaxed),
            records_out: self.records_out.load(Ordering::Relaxed),
            backpressured_ns: self.backpressured_ns.load(Ordering::Relaxed),
            watermark: self.watermark.load(Ordering::Relaxed),
        }
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<SubtaskMetrics>>> = const { RefCell::new(None) };
}

/// The calling thread runs the subtask these figures are of.
pub(crate) fn enter(metrics: Arc<SubtaskMetrics>) {
    CURRENT.with(|c| *c.borrow_mut() = Some(metrics));
}

/// Adds to the figures of the subtask the calling thread runs (nothing on a
/// thread that runs none, as in a unit test of a link).
pub(crate) fn with_current(f: impl FnOnce(&SubtaskMetrics)) {
    CURRENT.with(|c| {
        if let Some(m) = c.borrow().as_ref() {
            f(m);
        }
    });
}

/// The figures of every subtask of a run, by stage.
pub(crate) struct JobMetrics {
    stages: Vec<(String, Vec<Arc<SubtaskMetrics>>)>,
}

impl JobMetrics {
    /// Empty figures for stages named `stages` with their parallelisms.
    pub fn new<'a>(stages: impl IntoIterator<Item = (&'a str, usize)>) -> JobMetrics {
        JobMetrics {
            stages: stages
                .into_iter()
                .map(|(name, parallelism)| {
                    let subtasks = (0..parallelism).map(|_| Arc::default()).collect();
                    (name.to_owned(), subtasks)
                })
                .collect(),
        }
    }

    /// Subtask `index` of stage number `stage` (fresh figures for one out of
    /// range, which nobody reports).
    pub fn subtask(&self, stage: usize, index: usize) -> Arc<SubtaskMetrics> {
        self.stages
            .get(stage)
            .and_then(|(_, subtasks)| subtasks.get(index))
            .cloned()
            .unwrap_or_default()
    }
}

#[derive(Clone, Copy)]
struct Sample {
    records_in: u64,
    records_out: u64,
    backpressured_ns: u64,
    watermark: i64,
}

/// Turns successive readings of a job's figures into rates.
#[derive(Default)]
pub(crate) struct Sampler {
    last: Option<(Instant, Vec<Vec<Sample>>)>,
}

impl Sampler {
    /// The figures now, with rates over the time since the last call
    /// (`now_ms`: the wall clock, which watermarks are compared with).
    pub fn report(&mut self, job: &JobMetrics, now_ms: i64) -> Value {
        let now = Instant::now();
        let samples: Vec<Vec<Sample>> = job
            .stages
            .iter()
            .map(|(_, subtasks)| subtasks.iter().map(|s| s.sample()).collect())
            .collect();
        let previous = self.last.take();
        let elapsed = previous
            .as_ref()
            .map_or(Duration::ZERO, |(at, _)| now.saturating_duration_since(*at));
        let per_sec = |delta: u64| -> f64 {
            if elapsed.is_zero() {
                0.0
            } else {
                delta as f64 / elapsed.as_secs_f64()
            }
        };
        let stages: Vec<Value> = job
            .stages
            .iter()
            .zip(&samples)
            .enumerate()
            .map(|(i, ((name, _), subtasks))| {
                let before = previous.as_ref().and_then(|(_, p)| p.get(i));
                let rows: Vec<Value> = subtasks
                    .iter()
                    .enumerate()
                    .map(|(j, s)| {
                        let b = before.and_then(|b| b.get(j)).copied();
                        let delta =
                            |f: fn(&Sample) -> u64| f(s).saturating_sub(b.as_ref().map_or(0, f));
                        json!({
                            "records_in": s.records_in,
                            "records_out": s.records_out,
                            "records_in_per_sec": per_sec(delta(|s| s.records_in)),
                            "records_out_per_sec": per_sec(delta(|s| s.records_out)),
                            "backpressured_ms_per_sec":
                                per_sec(delta(|s| s.backpressured_ns)) / 1e6,
                            "watermark": watermark_json(s.watermark),
                            "watermark_lag_ms": watermark_lag(s.watermark, now_ms),
                        })
                    })
                    .collect();
                let sum = |key: &str| -> f64 { rows.iter().filter_map(|r| r[key].as_f64()).sum() };
                let most = |key: &str| -> f64 {
                    rows.iter()
                        .filter_map(|r| r[key].as_f64())
                        .fold(0.0, f64::max)
                };
                // A stage's watermark is its least subtask's, as downstream sees it.
                let least = subtasks
                    .iter()
                    .map(|s| s.watermark)
                    .min()
                    .unwrap_or(i64::MIN);
                json!({
                    "name": name,
                    "records_in": subtasks.iter().map(|s| s.records_in).sum::<u64>(),
                    "records_out": subtasks.iter().map(|s| s.records_out).sum::<u64>(),
                    "records_in_per_sec": sum("records_in_per_sec"),
                    "records_out_per_sec": sum("records_out_per_sec"),
                    "backpressured_ms_per_sec": most("backpressured_ms_per_sec"),
                    "watermark": watermark_json(least),
                    "watermark_lag_ms": watermark_lag(least, now_ms),
                    "subtasks": rows,
                })
            })
            .collect();
        self.last = Some((now, samples));
        Value::Array(stages)
    }
}

/// A watermark as reported: none before the first, `"end"` once the input ended.
fn watermark_json(watermark: i64) -> Value {
    match watermark {
        i64::MIN => Value::Null,
        WATERMARK_END => Value::from("end"),
        w => Value::from(w),
    }
}

/// How far a watermark trails the wall clock (event time in epoch ms).
fn watermark_lag(watermark: i64, now_ms: i64) -> Value {
    match watermark {
        i64::MIN | WATERMARK_END => Value::Null,
        w => Value::from(now_ms.saturating_sub(w)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_taken_over_the_time_between_reports() {
        let job = JobMetrics::new([("source -> map", 2), ("sink", 1)]);
        let mut sampler = Sampler::default();
        let (a, b, c) = (job.subtask(0, 0), job.subtask(0, 1), job.subtask(1, 0));
        a.add_in(100);
        b.add_in(50);
        a.set_watermark(1_000);
        b.set_watermark(1_500);
        let first = sampler.report(&job, 2_000);
        assert_eq!(first[0]["records_in"], 150);
        assert_eq!(first[0]["records_in_per_sec"], 0.0, "no interval yet");
        assert_eq!(first[0]["watermark"], 1_000, "the least subtask's");
        assert_eq!(first[0]["watermark_lag_ms"], 1_000);
        assert_eq!(first[1]["watermark"], Value::Null);

        std::thread::sleep(Duration::from_millis(50));
        a.add_in(100);
        a.add_out(40);
        c.add_in(40);
        c.add_backpressure(Duration::from_millis(10));
        c.set_watermark(WATERMARK_END);
        let second = sampler.report(&job, 2_100);
        let rate = second[0]["records_in_per_sec"].as_f64().unwrap();
        // 100 records in 50 ms and a little more: at most 2,000/s.
        assert!(rate > 0.0 && rate <= 2_000.0, "{rate}");
        assert_eq!(second[0]["subtasks"][1]["records_in_per_sec"], 0.0);
        assert_eq!(second[0]["records_out"], 40);
        let bp = second[1]["backpressured_ms_per_sec"].as_f64().unwrap();
        assert!(bp > 0.0 && bp <= 200.0, "{bp}");
        assert_eq!(second[1]["watermark"], "end");
        assert_eq!(second[1]["watermark_lag_ms"], Value::Null);
    }

    #[test]
    fn a_thread_adds_to_the_subtask_it_entered() {
        let job = JobMetrics::new([("s", 2)]);
        let one = job.subtask(0, 1);
        with_current(|m| m.add_out(5));
        let entered = one.clone();
        std::thread::spawn(move || {
            enter(entered);
            with_current(|m| m.add_out(7));
        })
        .join()
        .unwrap();
        assert_eq!(one.sample().records_out, 7);
        assert_eq!(job.subtask(0, 0).sample().records_out, 0);
    }
}

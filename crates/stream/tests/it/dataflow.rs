//! The engine end to end: chains, exchanges, keyed state, watermarks,
//! backpressure and failures, each checked against a direct computation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use sluice_stream::{
    BoundedOutOfOrderness, Collector, Operator, Record, Source, SourceContext, SourceStatus,
    StreamEnv, StreamError, WatermarkGenerator, WatermarkOutput, WATERMARK_END,
};

/// The source article's `SourceFunction`, as `examples/flink_job.rs` has it.
struct TenEvents;

impl Source<String> for TenEvents {
    fn poll(&mut self, ctx: &mut SourceContext<'_, String>) -> SourceStatus {
        for i in 0..10 {
            ctx.collect(format!("Event {i}"));
        }
        SourceStatus::Ended
    }
}

#[test]
fn the_flink_job_prints_ten_events() {
    let out = Arc::new(Mutex::new(Vec::<u8>::new()));
    let env = StreamEnv::new();
    env.add_source("events", 1, |_| TenEvents)
        .print_to(out.clone());
    env.execute("Flink Job").unwrap();
    let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
    let want: String = (0..10).map(|i| format!("Event {i}\n")).collect();
    assert_eq!(text, want);
}

#[test]
fn parallel_print_prefixes_the_subtask() {
    let out = Arc::new(Mutex::new(Vec::<u8>::new()));
    let env = StreamEnv::new();
    env.set_parallelism(3);
    env.generate(Some(9), |n| n).print_to(out.clone());
    env.execute("print").unwrap();
    let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort();
    // Subtask i of 3 generates i, i + 3, i + 6 and prints them as "i+1> n".
    let mut want: Vec<String> = (0..9u64).map(|n| format!("{}> {n}", n % 3 + 1)).collect();
    want.sort();
    assert_eq!(lines, want);
}

/// Running sums per key, as a single thread computes them in input order.
fn running_sums(input: &[(u8, i64)]) -> Vec<(u8, i64)> {
    let mut sums: HashMap<u8, i64> = HashMap::new();
    input
        .iter()
        .map(|(k, v)| {
            let s = sums.entry(*k).or_default();
            *s += v;
            (*k, *s)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// A keyed reduce from one ordered source gives each key's running sums
    /// in order, at any parallelism and batch size.
    #[test]
    fn keyed_reduce_matches_a_single_thread(
        input in prop::collection::vec((0u8..20, -1000i64..1000), 0..400),
        parallelism in 1usize..5,
        max_parallelism in 5usize..40,
        batch in 1usize..64,
    ) {
        let env = StreamEnv::new();
        env.set_parallelism(parallelism).set_max_parallelism(max_parallelism).set_buffers(batch, 2);
        let out = env
            .from_iter(input.clone())
            .key_by(|(k, _)| *k)
            .reduce(|(k, a), (_, b)| (k, a + b))
            .collect();
        env.execute("sums").unwrap();
        let got = out.take();
        let want = running_sums(&input);
        for key in 0..20u8 {
            let g: Vec<_> = got.iter().filter(|(k, _)| *k == key).collect();
            let w: Vec<_> = want.iter().filter(|(k, _)| *k == key).collect();
            prop_assert_eq!(g, w, "key {}", key);
        }
        prop_assert_eq!(got.len(), input.len());
    }

    /// Through a rebalance, order across subtasks is lost but every record
    /// arrives once: each key's last sum is its total.
    #[test]
    fn rebalanced_records_arrive_once(
        n in 0u64..3000,
        parallelism in 1usize..5,
        batch in 1usize..100,
    ) {
        let env = StreamEnv::new();
        env.set_parallelism(parallelism).set_buffers(batch, 2);
        let out = env
            .generate(Some(n), |i| i)
            .rebalance()
            .map(|i| (i % 7, i))
            .key_by(|(k, _)| *k)
            .reduce(|(k, a), (_, b)| (k, a + b))
            .collect();
        env.execute("totals").unwrap();
        let got = out.take();
        prop_assert_eq!(got.len() as u64, n);
        let mut last: HashMap<u64, u64> = HashMap::new();
        for (k, s) in got {
            last.insert(k, s);
        }
        for k in 0..7u64.min(n) {
            let total: u64 = (0..n).filter(|i| i % 7 == k).sum();
            prop_assert_eq!(last.get(&k).copied(), Some(total), "key {}", k);
        }
    }
}

/// Records the watermarks it sees, and the event time of each record.
struct WatermarkProbe {
    /// Each watermark, and whether the input that holds at 100 was ending.
    seen: Arc<Mutex<Vec<(i64, bool)>>>,
    slow_input_ending: Arc<std::sync::atomic::AtomicBool>,
    /// Raised when the record [`MARKER`] comes through.
    marker: Arc<(Mutex<bool>, std::sync::Condvar)>,
}

/// A record input 0 sends after its last watermark.
const MARKER: u64 = 310;

impl Operator<u64, u64> for WatermarkProbe {
    fn process(&mut self, record: Record<u64>, out: &mut Collector<'_, u64>) {
        assert!(record.time.is_some(), "record without a time");
        if record.value == MARKER {
            let (seen, signal) = &*self.marker;
            *seen.lock().unwrap() = true;
            signal.notify_all();
        }
        out.emit(record.value);
    }

    fn on_watermark(&mut self, watermark: i64, _: &mut Collector<'_, u64>) {
        let ending = self.slow_input_ending.load(Ordering::SeqCst);
        self.seen.lock().unwrap().push((watermark, ending));
    }
}

/// Emits its script; the slow one then waits until the probe saw the
/// marker, which the other sends after all its watermarks.
struct Scripted {
    steps: Vec<Result<i64, i64>>,
    wait_for_marker: bool,
    marker: Arc<(Mutex<bool>, std::sync::Condvar)>,
    /// Set by the waiting subtask just before it ends.
    ending: Arc<std::sync::atomic::AtomicBool>,
}

impl Source<u64> for Scripted {
    fn poll(&mut self, ctx: &mut SourceContext<'_, u64>) -> SourceStatus {
        for step in &self.steps {
            match step {
                Ok(t) => ctx.collect_at(*t as u64, *t),
                Err(w) => ctx.emit_watermark(*w),
            }
        }
        ctx.flush();
        if self.wait_for_marker {
            let (seen, signal) = &*self.marker;
            let mut seen = seen.lock().unwrap();
            while !*seen {
                seen = signal.wait(seen).unwrap();
            }
            self.ending.store(true, Ordering::SeqCst);
        }
        SourceStatus::Ended
    }
}

#[test]
fn a_subtask_watermark_is_the_least_of_its_inputs() {
    let env = StreamEnv::new();
    env.set_parallelism(1);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let probe = seen.clone();
    let marker = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
    let probe_marker = marker.clone();
    let ending = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe_ending = ending.clone();
    // Input 0 runs to 300 and ends; input 1 stays at 100 until the merge
    // has taken everything input 0 sent before its end. The merged
    // watermark is 100 while input 1 lives: a maximum, or any input's rise
    // passed on, would show 300 before input 1 began to end. (Once it has,
    // 300 may show: input 1's end can reach the merge before input 0's.)
    env.add_source("scripted", 2, move |info| Scripted {
        steps: if info.index == 0 {
            vec![Ok(50), Err(100), Ok(150), Err(300), Ok(MARKER as i64)]
        } else {
            vec![Ok(60), Err(100)]
        },
        wait_for_marker: info.index == 1,
        marker: marker.clone(),
        ending: ending.clone(),
    })
    .rebalance()
    .process("probe", move |_| WatermarkProbe {
        seen: probe.clone(),
        slow_input_ending: probe_ending.clone(),
        marker: probe_marker.clone(),
    })
    .for_each(|_| {});
    env.execute("watermarks").unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.first().map(|s| s.0), Some(100), "{seen:?}");
    assert_eq!(seen.last().map(|s| s.0), Some(WATERMARK_END), "{seen:?}");
    for (w, slow_input_ending) in &seen {
        assert!(
            [100, WATERMARK_END].contains(w) || *slow_input_ending,
            "watermark {w} while the input at 100 lived: {seen:?}"
        );
    }
}

/// Runs `env` on another thread; fails the test if it does not end in 20 s.
fn execute_within(env: StreamEnv, job: &'static str) -> Result<(), StreamError> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(env.execute(job));
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("the job did not end: a subtask hangs")
}

#[test]
fn a_failed_source_stops_an_endless_sibling() {
    let env = StreamEnv::new();
    env.set_parallelism(2);
    // Subtask 1 fails at its first record; subtask 0 would run forever.
    env.generate(None, |n| {
        assert!(n != 1, "source record {n} is poison");
        n
    })
    .rebalance()
    .for_each(|_| {});
    match execute_within(env, "poisoned source") {
        Err(StreamError::SubtaskFailed { message, .. }) => assert!(message.contains("poison")),
        other => panic!("expected the source's panic, got {other:?}"),
    }
}

#[test]
fn a_stream_without_a_sink_is_refused() {
    let env = StreamEnv::new();
    let _unused = env.from_iter(0..10).rebalance();
    let _ = env.from_iter(0..10).collect();
    match execute_within(env.clone(), "dangling") {
        Err(StreamError::InvalidJob(why)) => assert!(why.contains("no sink"), "{why}"),
        other => panic!("expected an invalid job, got {other:?}"),
    }
}

#[test]
fn bounded_out_of_orderness_trails_the_largest_time() {
    let env = StreamEnv::new();
    env.set_buffers(2, 2);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let probe = seen.clone();
    env.from_iter([1000u64, 1500, 1200, 4000, 3000, 3500])
        .assign_timestamps(Duration::from_millis(500), |t| *t as i64)
        .process("probe", move |_| WatermarkProbe {
            seen: probe.clone(),
            slow_input_ending: Default::default(),
            marker: Default::default(),
        })
        .for_each(|_| {});
    env.execute("bounded").unwrap();
    // Batches of two: max 1500, then 4000, then 4000: watermarks at
    // max - 500 - 1, not repeated; then the end.
    let seen: Vec<i64> = seen.lock().unwrap().iter().map(|s| s.0).collect();
    assert_eq!(seen, vec![999, 3499, WATERMARK_END]);
}

#[test]
fn a_slow_sink_holds_the_source_back() {
    const BATCH: usize = 16;
    const CHANNEL: usize = 2;
    let env = StreamEnv::new();
    env.set_parallelism(1).set_buffers(BATCH, CHANNEL);
    let emitted = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let most_ahead = Arc::new(AtomicU64::new(0));
    let (e, r, m) = (emitted.clone(), received.clone(), most_ahead.clone());
    env.generate(Some(2_000), move |n| {
        e.fetch_add(1, Ordering::SeqCst);
        n
    })
    .rebalance()
    .for_each(move |_| {
        let got = r.fetch_add(1, Ordering::SeqCst) + 1;
        let ahead = e_minus(&emitted, got);
        m.fetch_max(ahead, Ordering::SeqCst);
        if got % BATCH as u64 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    env.execute("backpressure").unwrap();
    assert_eq!(received.load(Ordering::SeqCst), 2_000);
    // In flight at most: the channel's batches, one batch being received,
    // one being filled and the one blocked in send.
    let bound = ((CHANNEL + 3) * BATCH) as u64;
    let ahead = most_ahead.load(Ordering::SeqCst);
    assert!(
        ahead <= bound,
        "the source ran {ahead} records ahead (bound {bound})"
    );
    assert!(
        ahead >= BATCH as u64,
        "the sink never lagged: the test measured nothing"
    );
}

fn e_minus(emitted: &AtomicU64, received: u64) -> u64 {
    emitted.load(Ordering::SeqCst).saturating_sub(received)
}

#[test]
fn a_panic_fails_the_job_and_names_the_subtask() {
    let env = StreamEnv::new();
    env.set_parallelism(2);
    let _ = env
        .generate(None, |n| n)
        .key_by(|n| n % 2)
        .into_stream()
        .map(|n| {
            assert!(n < 5_000, "record {n} is poison");
            n
        })
        .collect();
    let err = env.execute("poison").unwrap_err();
    match err {
        StreamError::SubtaskFailed { message, .. } => {
            assert!(message.contains("is poison"), "{message}");
        }
        other => panic!("expected the panic, got {other}"),
    }
}

/// Flink's punctuated generator: a watermark right after every record that
/// carries one (here: a marker), none at the ends of batches.
struct Punctuated;

impl WatermarkGenerator<(i64, bool)> for Punctuated {
    fn on_event(&mut self, record: &(i64, bool), time: i64, output: &mut WatermarkOutput) {
        if record.1 {
            output.emit_watermark(time);
        }
    }
}

/// Writes down, in order, the records and watermarks it sees.
struct Trace;

impl Operator<(i64, bool), String> for Trace {
    fn process(&mut self, record: Record<(i64, bool)>, out: &mut Collector<'_, String>) {
        out.emit(format!("record {} at {:?}", record.value.0, record.time));
    }

    fn on_watermark(&mut self, watermark: i64, out: &mut Collector<'_, String>) {
        if watermark != WATERMARK_END {
            out.emit(format!("watermark {watermark}"));
        }
    }
}

#[test]
fn a_custom_generator_places_watermarks_where_it_emits_them() {
    let input = vec![
        (1, false),
        (5, true),
        (3, false),
        (9, false),
        (4, true),
        (12, true),
    ];
    for batch in [1, 2, 100] {
        let env = StreamEnv::new();
        env.set_parallelism(1).set_buffers(batch, 2);
        let out = env
            .from_iter(input.clone())
            .assign_timestamps_with(|(t, _)| *t, |_| Punctuated)
            .process("trace", |_| Trace)
            .collect();
        env.execute("punctuated").unwrap();
        // A watermark that does not rise (4 after 5) is not passed on.
        assert_eq!(
            out.take(),
            vec![
                "record 1 at Some(1)",
                "record 5 at Some(5)",
                "watermark 5",
                "record 3 at Some(3)",
                "record 9 at Some(9)",
                "record 4 at Some(4)",
                "record 12 at Some(12)",
                "watermark 12",
            ],
            "batch {batch}"
        );
    }
}

/// The built-in bounded-out-of-orderness generator, given as a generator:
/// after each input batch, the largest time so far less the bound less
/// 1 ms, when that rises.
#[test]
fn bounded_out_of_orderness_trails_the_largest_time_after_each_batch() {
    let input: Vec<(i64, bool)> = (0..50).map(|i| ((i * 7) % 23 + i, false)).collect();
    let batch = 4;
    let env = StreamEnv::new();
    env.set_parallelism(1).set_buffers(batch, 2);
    let out = env
        .from_iter(input.clone())
        .assign_timestamps_with(
            |(t, _)| *t,
            |_| BoundedOutOfOrderness::new(Duration::from_millis(3)),
        )
        .process("trace", |_| Trace)
        .collect();
    env.execute("bounded").unwrap();
    let mut want = Vec::new();
    let (mut max, mut emitted) = (i64::MIN, i64::MIN);
    for chunk in input.chunks(batch) {
        for (t, _) in chunk {
            want.push(format!("record {t} at Some({t})"));
            max = max.max(*t);
        }
        if max - 4 > emitted {
            emitted = max - 4;
            want.push(format!("watermark {emitted}"));
        }
    }
    assert_eq!(out.take(), want);
}

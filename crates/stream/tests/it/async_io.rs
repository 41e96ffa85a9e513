//! Async I/O: ordered results keep the input order, unordered ones do not wait
//! for slow calls but never cross a watermark, the capacity bounds the calls
//! in flight, and a failed or late call fails the job.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_stream::{
    AsyncOptions, Collector, Operator, Record, StreamEnv, StreamError, WatermarkGenerator,
    WatermarkOutput,
};

/// A pretend service latency for `n`: 0–4 ms, and long for `slow`.
fn latency(n: u64, slow: Option<u64>) -> Duration {
    if slow == Some(n) {
        Duration::from_millis(200)
    } else {
        Duration::from_millis((n * 7919) % 5)
    }
}

fn run(options: AsyncOptions, n: u64, slow: Option<u64>) -> Vec<u64> {
    let env = StreamEnv::new();
    env.set_parallelism(1);
    let out = env
        .from_iter(0..n)
        .async_map(options, move |i| async move {
            tokio::time::sleep(latency(i, slow)).await;
            Ok::<_, Infallible>(Some(i))
        })
        .collect();
    env.execute("async").expect("the job runs");
    out.take()
}

#[test]
fn ordered_results_keep_the_input_order() {
    let got = run(
        AsyncOptions::ordered(32, Duration::from_secs(10)),
        2000,
        Some(0),
    );
    assert_eq!(got, (0..2000).collect::<Vec<_>>());
}

#[test]
fn unordered_results_do_not_wait_for_a_slow_call() {
    let got = run(
        AsyncOptions::unordered(32, Duration::from_secs(10)),
        2000,
        Some(0),
    );
    let mut sorted = got.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..2000).collect::<Vec<_>>(), "each result once");
    // Record 0 takes 200 ms; the 31 after it are done long before.
    let at = got.iter().position(|v| *v == 0).expect("0 is there");
    assert!(at >= 31, "the slow call's result came {at}th");
}

#[test]
fn a_call_may_return_none_one_or_several_values() {
    let env = StreamEnv::new();
    env.set_parallelism(2);
    let out = env
        .from_iter(0..300u64)
        .async_map(
            AsyncOptions::ordered(8, Duration::from_secs(10)),
            |i| async move { Ok::<_, Infallible>(vec![i; (i % 3) as usize]) },
        )
        .collect();
    env.execute("fan out").expect("the job runs");
    let mut got = out.take();
    got.sort_unstable();
    let want: Vec<u64> = (0..300u64)
        .flat_map(|i| std::iter::repeat_n(i, (i % 3) as usize))
        .collect();
    assert_eq!(got, want);
}

#[test]
fn the_capacity_bounds_the_calls_in_flight() {
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let env = StreamEnv::new();
    env.set_parallelism(1);
    let (r, m) = (running.clone(), most.clone());
    let out = env
        .from_iter(0..400u64)
        .async_map(
            AsyncOptions::unordered(6, Duration::from_secs(10)),
            move |i| {
                let (r, m) = (r.clone(), m.clone());
                async move {
                    let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                    m.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    r.fetch_sub(1, Ordering::SeqCst);
                    Ok::<_, Infallible>(Some(i))
                }
            },
        )
        .collect();
    env.execute("bounded").expect("the job runs");
    assert_eq!(out.take().len(), 400);
    let most = most.load(Ordering::SeqCst);
    assert!(
        most <= 6,
        "{most} calls ran at once, above the capacity of 6"
    );
    assert!(most > 1, "the calls never overlapped");
}

/// A watermark after every tenth record: the time of the record just
/// emitted, so every later record is newer than it.
struct EveryTenth(u64);

impl WatermarkGenerator<u64> for EveryTenth {
    fn on_event(&mut self, _: &u64, time: i64, out: &mut WatermarkOutput) {
        self.0 += 1;
        if self.0 % 10 == 0 {
            out.emit_watermark(time);
        }
    }
}

/// What a [`Witness`] saw.
#[derive(Default)]
struct Seen {
    values: Vec<u64>,
    watermarks: Vec<i64>,
    /// Records whose time was not past the last watermark (late, which an
    /// async link must never make them).
    late: usize,
}

struct Witness {
    watermark: i64,
    seen: Arc<Mutex<Seen>>,
}

impl Operator<u64, u64> for Witness {
    fn process(&mut self, record: Record<u64>, out: &mut Collector<'_, u64>) {
        let mut seen = self.seen.lock().unwrap();
        if record.time.is_some_and(|t| t <= self.watermark) {
            seen.late += 1;
        }
        seen.values.push(record.value);
        out.emit(record.value);
    }

    fn on_watermark(&mut self, watermark: i64, _: &mut Collector<'_, u64>) {
        self.watermark = watermark;
        self.seen.lock().unwrap().watermarks.push(watermark);
    }
}

#[test]
fn unordered_results_stay_between_the_watermarks_of_their_records() {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let env = StreamEnv::new();
    env.set_parallelism(1);
    let s = seen.clone();
    let _ = env
        .from_iter(0..1000u64)
        .assign_timestamps_with(|n: &u64| *n as i64, |_| EveryTenth(0))
        // The first record of every ten is the slowest.
        .async_map(
            AsyncOptions::unordered(25, Duration::from_secs(10)),
            |n| async move {
                let ms = if n % 10 == 0 { 6 } else { n % 3 };
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok::<_, Infallible>(Some(n))
            },
        )
        .process("witness", move |_| Witness {
            watermark: i64::MIN,
            seen: s.clone(),
        })
        .collect();
    env.execute("segments").expect("the job runs");
    let Seen {
        values,
        watermarks,
        late,
    } = std::mem::take(&mut *seen.lock().unwrap());
    assert_eq!(late, 0, "results were emitted after a newer watermark");
    assert!(watermarks.len() >= 10, "{} watermarks", watermarks.len());
    assert!(
        watermarks.windows(2).all(|w| w[0] <= w[1]),
        "{watermarks:?}"
    );
    // Within each ten, completion order; the tens themselves in order.
    let tens: Vec<u64> = values.iter().map(|v| v / 10).collect();
    assert!(
        tens.windows(2).all(|w| w[0] <= w[1]),
        "a result crossed a watermark"
    );
    let mut sorted = values.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
    assert_ne!(values, sorted, "no result overtook a slower one");
}

#[test]
fn a_call_that_outlasts_the_timeout_fails_the_job() {
    let env = StreamEnv::new();
    env.set_parallelism(1);
    let _ = env
        .from_iter(0..10u64)
        .async_map(
            AsyncOptions::ordered(4, Duration::from_millis(100)),
            |i| async move {
                if i == 5 {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
                Ok::<_, Infallible>(Some(i))
            },
        )
        .collect();
    match env.execute("late call") {
        Err(StreamError::SubtaskFailed { message, .. }) => {
            assert!(message.contains("timed out"), "{message}")
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
}

#[test]
fn a_call_that_fails_fails_the_job() {
    let env = StreamEnv::new();
    env.set_parallelism(1);
    let _ = env
        .from_iter(0..10u64)
        .async_map(
            AsyncOptions::unordered(4, Duration::from_secs(10)),
            |i| async move {
                if i == 7 {
                    Err(format!("lookup of {i} refused"))
                } else {
                    Ok(Some(i))
                }
            },
        )
        .collect();
    match env.execute("failed call") {
        Err(StreamError::SubtaskFailed { message, .. }) => {
            assert!(message.contains("lookup of 7 refused"), "{message}")
        }
        other => panic!("expected the call's error, got {other:?}"),
    }
}

/// Runs `env` on a thread: its result, or `None` when it has not ended
/// within `limit` (the thread is left behind).
fn execute_within(env: StreamEnv, limit: Duration) -> Option<Result<(), StreamError>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(env.execute("bounded in time"));
    });
    rx.recv_timeout(limit).ok()
}

#[test]
fn a_call_that_panics_fails_the_job_instead_of_hanging_it() {
    let env = StreamEnv::new();
    env.set_parallelism(1);
    let _ = env
        .from_iter(0..10u64)
        .async_map(
            AsyncOptions::ordered(4, Duration::from_secs(60)),
            |i| async move {
                if i == 3 {
                    panic!("lookup of {i} blew up");
                }
                Ok::<_, Infallible>(Some(i))
            },
        )
        .collect();
    match execute_within(env, Duration::from_secs(30)) {
        Some(Err(StreamError::SubtaskFailed { message, .. })) => {
            assert!(message.contains("panicked"), "{message}")
        }
        Some(other) => panic!("expected the call's panic, got {other:?}"),
        None => panic!("the job hung on a call that panicked"),
    }
}

#[test]
fn a_subtask_waiting_on_its_calls_stops_when_another_fails() {
    let env = StreamEnv::new();
    env.set_parallelism(1);
    let slow = env.from_iter(0..4u64).async_map(
        AsyncOptions::ordered(4, Duration::from_secs(120)),
        |i| async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok::<_, Infallible>(Some(i))
        },
    );
    let failing = env.from_iter(0..1u64).map(|i| {
        std::thread::sleep(Duration::from_millis(200));
        if i == 0 {
            panic!("the other branch fails");
        }
        i
    });
    let _ = slow.union(failing).collect();
    match execute_within(env, Duration::from_secs(20)) {
        Some(Err(e)) => assert!(e.to_string().contains("the other branch fails"), "{e}"),
        Some(Ok(())) => panic!("the job succeeded"),
        None => panic!("the async subtask kept waiting on its calls after the job failed"),
    }
}

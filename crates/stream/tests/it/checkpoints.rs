//! Checkpoints end to end: jobs fail at random points and restore from
//! their latest checkpoint, at the same or another parallelism; what the
//! exactly-once file sink committed must equal a failure-free run's output,
//! line for line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use sluice_stream::{
    Collector, LocalDirStore, Operator, Record, Source, SourceContext, SourceStatus, StateReader,
    StateWriter, StreamEnv, StreamError, SubtaskInfo, Windows,
};

/// Numbered records in splits, as a topic's partitions hold them: split `s`
/// holds `(s, 0)`, `(s, 1)`, ... below `len`, with event time = the number.
/// Subtask `i` of `p` reads the splits `s` with `s % p == i`; its position
/// is the next number of each split, so a restored job can split them over
/// another parallelism. Watermarks: the least position of its splits.
struct Splits {
    positions: BTreeMap<u32, u64>,
    splits: u32,
    len: u64,
    per_poll: u64,
}

impl Splits {
    fn new(splits: u32, len: u64, index: usize, parallelism: usize) -> Splits {
        Splits {
            positions: (0..splits)
                .filter(|s| *s as usize % parallelism == index)
                .map(|s| (s, 0))
                .collect(),
            splits,
            len,
            per_poll: 20,
        }
    }
}

impl Source<(u32, u64)> for Splits {
    fn poll(&mut self, ctx: &mut SourceContext<'_, (u32, u64)>) -> SourceStatus {
        for (split, next) in self.positions.iter_mut() {
            let end = (*next + self.per_poll).min(self.len);
            for n in *next..end {
                ctx.collect_at((*split, n), n as i64);
            }
            *next = end;
        }
        if let Some(least) = self.positions.values().min() {
            ctx.emit_watermark(*least as i64 - 1);
        }
        // A topic's pace: checkpoints happen between the batches.
        std::thread::sleep(Duration::from_millis(1));
        if self.positions.values().all(|n| *n >= self.len) {
            SourceStatus::Ended
        } else {
            SourceStatus::More
        }
    }

    fn snapshot(&mut self, state: &mut StateWriter) {
        let positions: Vec<(u32, u64)> = self.positions.iter().map(|(s, n)| (*s, *n)).collect();
        state.value("positions", &positions);
    }

    fn restore(&mut self, state: &StateReader) -> Result<(), StreamError> {
        let (me, parallelism) = state.subtask();
        for (_, positions) in state.values::<Vec<(u32, u64)>>("positions")? {
            for (split, next) in positions {
                if split < self.splits && split as usize % parallelism == me {
                    self.positions.insert(split, next);
                }
            }
        }
        Ok(())
    }
}

/// What a job computes: per split, a running count and sum of its
/// numbers (keyed reduce), or the count per 10 ms window (event time).
#[derive(Clone, Copy, Debug)]
enum Shape {
    RunningSums,
    Windows,
}

/// Builds the job; it panics once `fail_after` records passed its map
/// (counted over all subtasks), when given.
fn job(
    shape: Shape,
    parallelism: usize,
    splits: u32,
    len: u64,
    checkpoints: &Path,
    out: &Path,
    fail_after: Option<u64>,
) -> StreamEnv {
    let env = StreamEnv::new();
    env.set_parallelism(parallelism).set_max_parallelism(16);
    env.enable_checkpointing(
        Duration::from_millis(10),
        LocalDirStore::new(checkpoints).expect("checkpoint dir"),
    );
    let seen = Arc::new(AtomicU64::new(0));
    let records = env
        .add_source("splits", parallelism, move |info| {
            Splits::new(splits, len, info.index, info.parallelism)
        })
        .map(move |r| {
            let n = seen.fetch_add(1, Ordering::SeqCst) + 1;
            if fail_after.is_some_and(|f| n == f) {
                panic!("injected failure after {n} records");
            }
            r
        });
    match shape {
        Shape::RunningSums => records
            .map(|(split, n)| (split, 1u64, n))
            .key_by(|(split, _, _)| *split)
            .reduce(|(s, c1, n1), (_, c2, n2)| (s, c1 + c2, n1 + n2))
            .map(|(s, c, n)| format!("{s},{c},{n}"))
            .write_files(out),
        Shape::Windows => records
            .key_by(|(split, _)| *split)
            .window(Windows::tumbling(Duration::from_millis(10)))
            .aggregate(
                || 0u64,
                |count, _| *count += 1,
                |count, other| *count += other,
                |split, window, count| format!("{split},{},{count}", window.start),
            )
            .write_files(out),
    }
    env
}

/// What a failure-free run writes, computed directly.
fn expected(shape: Shape, splits: u32, len: u64) -> Vec<String> {
    let mut lines = Vec::new();
    for s in 0..splits {
        match shape {
            Shape::RunningSums => {
                let mut sum = 0;
                for n in 0..len {
                    sum += n;
                    lines.push(format!("{s},{},{sum}", n + 1));
                }
            }
            Shape::Windows => {
                for start in (0..len).step_by(10) {
                    let count = (start + 10).min(len) - start;
                    lines.push(format!("{s},{start},{count}"));
                }
            }
        }
    }
    lines.sort();
    lines
}

/// Every line of the committed files (not the hidden, uncommitted ones).
fn committed(out: &Path) -> Vec<String> {
    let mut lines = Vec::new();
    for entry in std::fs::read_dir(out).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).expect("read part file");
        lines.extend(text.lines().map(str::to_owned));
    }
    lines.sort();
    lines
}

fn fresh_dir(name: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "sluice-stream-it-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Runs the job through `attempts` (parallelism, failure point), then once
/// more without a failure; returns how many runs restored a checkpoint.
fn run_until_done(shape: Shape, splits: u32, len: u64, attempts: &[(usize, u64)]) -> usize {
    let base = fresh_dir("job");
    let (chk, out) = (base.join("checkpoints"), base.join("out"));
    let mut restored = 0;
    let last = attempts.last().map_or(2, |a| a.0);
    for &(p, fail_after) in attempts.iter().chain([(last, 0)].iter()) {
        let fail = (fail_after > 0).then_some(fail_after);
        let env = job(shape, p, splits, len, &chk, &out, fail);
        let result = env.execute("checkpointed");
        restored += usize::from(env.restored_checkpoint().is_some());
        match (fail, result) {
            (None, Ok(())) => {}
            (None, Err(e)) => panic!("the run without failure failed: {e}"),
            (Some(_), Err(StreamError::SubtaskFailed { message, .. })) => {
                assert!(message.contains("injected"), "{message}")
            }
            // The failure point lay past what the run had left to do.
            (Some(_), Ok(())) => {}
            (Some(_), Err(e)) => panic!("unexpected failure: {e}"),
        }
        if fail.is_some() && committed(&out) == expected(shape, splits, len) {
            break;
        }
    }
    assert_eq!(
        committed(&out),
        expected(shape, splits, len),
        "committed output differs from a failure-free run"
    );
    // Run again: it restores the final checkpoint, where every source had
    // ended, and writes nothing more.
    let env = job(shape, last, splits, len, &chk, &out, None);
    env.execute("checkpointed").unwrap();
    assert!(env.restored_checkpoint().is_some());
    assert_eq!(
        committed(&out),
        expected(shape, splits, len),
        "a finished job ran again"
    );
    let _ = std::fs::remove_dir_all(&base);
    restored
}

#[test]
fn a_job_failed_late_restores_its_checkpoint_and_writes_each_line_once() {
    for shape in [Shape::RunningSums, Shape::Windows] {
        // 4 splits of 1,500 records at 20 per split per poll: ~75 polls of
        // 1 ms and more, so checkpoints every 10 ms complete before the
        // failure at 90% of the records.
        let restored = run_until_done(shape, 4, 1500, &[(2, 5400)]);
        assert_eq!(restored, 1, "{shape:?}: the second run did not restore");
    }
}

#[test]
fn a_restored_job_may_run_at_another_parallelism() {
    for shape in [Shape::RunningSums, Shape::Windows] {
        let restored = run_until_done(shape, 5, 1200, &[(2, 4000), (3, 1500), (1, 900)]);
        assert!(restored >= 1, "{shape:?}: no run restored");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    /// Failures anywhere, several in a row, parallelism changing between
    /// runs: the committed output is always the failure-free one.
    #[test]
    fn failures_anywhere_leave_exactly_the_failure_free_output(
        attempts in prop::collection::vec((1usize..4, 1u64..2400), 1..4),
        windows in any::<bool>(),
    ) {
        let shape = if windows { Shape::Windows } else { Shape::RunningSums };
        run_until_done(shape, 3, 800, &attempts);
    }
}

/// Fails subtask 0 while it writes its third checkpoint, after a pause in
/// which the other subtasks' sinks have had that checkpoint's barrier.
struct FailsMidCheckpoint {
    subtask: usize,
    snapshots: std::cell::Cell<u32>,
}

impl Operator<String, String> for FailsMidCheckpoint {
    fn process(&mut self, record: Record<String>, out: &mut Collector<'_, String>) {
        out.emit(record.value);
    }

    fn snapshot(&self, _: &mut StateWriter) {
        self.snapshots.set(self.snapshots.get() + 1);
        if self.subtask == 0 && self.snapshots.get() == 3 {
            std::thread::sleep(Duration::from_millis(50));
            panic!("injected failure in a checkpoint");
        }
    }
}

#[test]
fn a_checkpoint_that_fails_midway_commits_nothing() {
    let base = fresh_dir("midway");
    let (chk, out) = (base.join("checkpoints"), base.join("out"));
    let (splits, len) = (4, 1500);
    for fail in [true, false] {
        let env = StreamEnv::new();
        env.set_parallelism(3).set_max_parallelism(16);
        env.enable_checkpointing(Duration::from_millis(10), LocalDirStore::new(&chk).unwrap());
        let keyed = env
            .add_source("splits", 3, move |info| {
                Splits::new(splits, len, info.index, info.parallelism)
            })
            .map(|(split, n)| (split, 1u64, n))
            .key_by(|(split, _, _)| *split)
            .reduce(|(s, c1, n1), (_, c2, n2)| (s, c1 + c2, n1 + n2))
            .map(|(s, c, n)| format!("{s},{c},{n}"));
        if fail {
            keyed
                .process("fails mid-checkpoint", |info: SubtaskInfo| {
                    FailsMidCheckpoint {
                        subtask: info.index,
                        snapshots: Default::default(),
                    }
                })
                .write_files(&out);
            let err = env.execute("midway").unwrap_err();
            assert!(err.to_string().contains("injected"), "{err}");
        } else {
            keyed
                .process("passes", |_: SubtaskInfo| FailsMidCheckpoint {
                    subtask: usize::MAX,
                    snapshots: Default::default(),
                })
                .write_files(&out);
            env.execute("midway").unwrap();
            assert!(env.restored_checkpoint().is_some());
        }
    }
    assert_eq!(committed(&out), expected(Shape::RunningSums, splits, len));
    let _ = std::fs::remove_dir_all(&base);
}

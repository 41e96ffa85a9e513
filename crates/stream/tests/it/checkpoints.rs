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
    AsyncOptions, CheckpointId, CheckpointStore, Collector, KeyedProcess, ListState, LocalDirStore,
    MapState, Operator, ProcessContext, Record, Source, SourceContext, SourceStatus, StateReader,
    StateWriter, StreamEnv, StreamError, SubtaskInfo, Windows,
};

/// A local directory store that counts the checkpoints completed and notes
/// which stored in-flight records (unaligned checkpoints).
struct Counting {
    inner: LocalDirStore,
    seen: Arc<Seen>,
}

#[derive(Default)]
struct Seen {
    completed: AtomicU64,
    /// Checkpoints with a part of in-flight records.
    in_flight: std::sync::Mutex<Vec<CheckpointId>>,
    /// Whether the latest complete checkpoint has one.
    latest_had_in_flight: std::sync::atomic::AtomicBool,
}

impl Counting {
    fn new(dir: &Path, seen: &Arc<Seen>) -> Counting {
        Counting {
            inner: LocalDirStore::new(dir).expect("checkpoint dir"),
            seen: seen.clone(),
        }
    }
}

impl CheckpointStore for Counting {
    fn put(&self, id: CheckpointId, name: &str, bytes: &[u8]) -> Result<(), StreamError> {
        if name.contains(".in.") {
            self.seen.in_flight.lock().unwrap().push(id);
        }
        self.inner.put(id, name, bytes)
    }
    fn complete(&self, id: CheckpointId) -> Result<(), StreamError> {
        self.inner.complete(id)?;
        self.seen.completed.fetch_add(1, Ordering::SeqCst);
        let had = self.seen.in_flight.lock().unwrap().contains(&id);
        self.seen.latest_had_in_flight.store(had, Ordering::SeqCst);
        Ok(())
    }
    fn latest(&self) -> Result<Option<CheckpointId>, StreamError> {
        self.inner.latest()
    }
    fn parts(&self, id: CheckpointId, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StreamError> {
        self.inner.parts(id, prefix)
    }
    fn prune(&self, keep: usize) -> Result<(), StreamError> {
        self.inner.prune(keep)
    }
    fn discard_incomplete(&self) -> Result<(), StreamError> {
        self.inner.discard_incomplete()
    }
}

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
    /// Subtasks wait a little longer the higher their number, so they do
    /// not poll in step.
    pause: Duration,
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
            pause: Duration::from_micros(1_000 + 350 * index as u64),
        }
    }
}

impl Source<(u32, u64)> for Splits {
    fn poll(&mut self, ctx: &mut SourceContext<'_, (u32, u64)>) -> SourceStatus {
        // A topic's pace: checkpoints happen between the polls. Each split
        // is sent on its own, after a pause: a checkpoint that starts while
        // one subtask polls finds the others' barriers on their way while
        // it still sends. Aligned, what it sends then is waited for;
        // unaligned, it is in flight.
        let pause = self.pause / self.positions.len().max(1) as u32;
        for (split, next) in self.positions.iter_mut() {
            std::thread::sleep(pause);
            let end = (*next + self.per_poll).min(self.len);
            for n in *next..end {
                ctx.collect_at((*split, n), n as i64);
            }
            *next = end;
            ctx.flush();
        }
        if let Some(least) = self.positions.values().min() {
            ctx.emit_watermark(*least as i64 - 1);
        }
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
/// The `Async` shapes first pass every record through an async call that
/// takes 0–3 ms: ordered before the running sums (which depend on the order),
/// unordered before the windows (which depend only on the watermarks).
#[derive(Clone, Copy, Debug)]
enum Shape {
    RunningSums,
    Windows,
    AsyncRunningSums,
    AsyncWindows,
    /// Per split, a keyed process function with list and map state: the
    /// sum of the last three numbers and how many numbers so far share the
    /// record's remainder by 5.
    ListAndMap,
}

impl Shape {
    fn sums(self) -> bool {
        matches!(self, Shape::RunningSums | Shape::AsyncRunningSums)
    }
}

/// The `ListAndMap` shape's function.
struct LastThreeAndBuckets {
    last: ListState<u32, u64>,
    buckets: MapState<u32, u64, u64>,
}

impl KeyedProcess<u32, (u32, u64), String> for LastThreeAndBuckets {
    fn process(
        &mut self,
        split: &u32,
        record: Record<(u32, u64)>,
        ctx: &mut ProcessContext<'_, u32, String>,
    ) {
        let n = record.value.1;
        self.last.add(*split, n);
        let last = self.last.get_or_default(*split);
        if last.len() > 3 {
            last.remove(0);
        }
        let sum: u64 = last.iter().sum();
        let bucket = self.buckets.entry_of(split, &(n % 5)).copied().unwrap_or(0) + 1;
        self.buckets.put(*split, n % 5, bucket);
        ctx.emit(format!("{split},{n},{sum},{bucket}"));
    }

    fn snapshot(&self, state: &mut StateWriter) {
        state.keyed("last", &self.last);
        state.keyed("buckets", &self.buckets);
    }

    fn restore(&mut self, state: &StateReader) -> Result<(), StreamError> {
        state.keyed("last", &mut self.last)?;
        state.keyed("buckets", &mut self.buckets)
    }
}

/// An async call's pretend latency for a record: 0–3 ms.
fn latency((split, n): (u32, u64)) -> Duration {
    Duration::from_millis((u64::from(split) * 31 + n * 17) % 4)
}

/// How the jobs of a test checkpoint.
#[derive(Clone, Default)]
struct Mode {
    unaligned: bool,
    seen: Arc<Seen>,
}

impl Mode {
    fn unaligned() -> Mode {
        Mode {
            unaligned: true,
            seen: Arc::default(),
        }
    }
}

/// Builds the job; it panics once `fail_after` records passed its map
/// (counted over all subtasks), when given.
#[allow(clippy::too_many_arguments)]
fn job(
    shape: Shape,
    mode: &Mode,
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
        Counting::new(checkpoints, &mode.seen),
    );
    if mode.unaligned {
        env.enable_unaligned_checkpoints();
    }
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
    let timeout = Duration::from_secs(10);
    let records = match shape {
        Shape::RunningSums | Shape::Windows | Shape::ListAndMap => records,
        Shape::AsyncRunningSums => {
            records.async_map(AsyncOptions::ordered(16, timeout), |r| async move {
                tokio::time::sleep(latency(r)).await;
                Ok::<_, std::convert::Infallible>(Some(r))
            })
        }
        Shape::AsyncWindows => {
            records.async_map(AsyncOptions::unordered(16, timeout), |r| async move {
                tokio::time::sleep(latency(r)).await;
                Ok::<_, std::convert::Infallible>(Some(r))
            })
        }
    };
    if let Shape::ListAndMap = shape {
        records
            .key_by(|(split, _)| *split)
            .process("last three and buckets", |info| LastThreeAndBuckets {
                last: ListState::new(info.index, info.parallelism, info.max_parallelism),
                buckets: MapState::new(info.index, info.parallelism, info.max_parallelism),
            })
            .write_files(out)
    } else if shape.sums() {
        records
            .map(|(split, n)| (split, 1u64, n))
            .key_by(|(split, _, _)| *split)
            .reduce(|(s, c1, n1), (_, c2, n2)| (s, c1 + c2, n1 + n2))
            .map(|(s, c, n)| format!("{s},{c},{n}"))
            .write_files(out)
    } else {
        records
            .key_by(|(split, _)| *split)
            .window(Windows::tumbling(Duration::from_millis(10)))
            .aggregate(
                || 0u64,
                |count, _| *count += 1,
                |count, other| *count += other,
                |split, window, count| format!("{split},{},{count}", window.start),
            )
            .write_files(out)
    }
    env
}

/// What a failure-free run writes, computed directly.
fn expected(shape: Shape, splits: u32, len: u64) -> Vec<String> {
    let mut lines = Vec::new();
    for s in 0..splits {
        if let Shape::ListAndMap = shape {
            let mut buckets = [0u64; 5];
            for n in 0..len {
                let sum: u64 = (n.saturating_sub(2)..=n).sum();
                buckets[(n % 5) as usize] += 1;
                lines.push(format!("{s},{n},{sum},{}", buckets[(n % 5) as usize]));
            }
        } else if shape.sums() {
            let mut sum = 0;
            for n in 0..len {
                sum += n;
                lines.push(format!("{s},{},{sum}", n + 1));
            }
        } else {
            for start in (0..len).step_by(10) {
                let count = (start + 10).min(len) - start;
                lines.push(format!("{s},{start},{count}"));
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

/// Fails with the lines missing and those too many (a few of each), not the
/// thousands of lines compared.
fn same_lines(shape: Shape, got: &[String], want: &[String], why: &str) {
    if got == want {
        return;
    }
    let count = |lines: &[String]| {
        let mut n: BTreeMap<String, usize> = BTreeMap::new();
        for l in lines {
            *n.entry(l.clone()).or_default() += 1;
        }
        n
    };
    let (g, w) = (count(got), count(want));
    let missing: Vec<&String> = w.keys().filter(|l| g.get(*l) < w.get(*l)).take(5).collect();
    let extra: Vec<&String> = g.keys().filter(|l| w.get(*l) < g.get(*l)).take(5).collect();
    panic!(
        "{shape:?}: {why}: {} lines, {} wanted; missing e.g. {missing:?}; too many e.g. {extra:?}",
        got.len(),
        want.len()
    );
}

/// Runs the job through `attempts` (parallelism, failure point), then once
/// more without a failure; returns how many runs restored a checkpoint.
fn run_until_done(
    shape: Shape,
    mode: &Mode,
    splits: u32,
    len: u64,
    attempts: &[(usize, u64)],
) -> usize {
    let base = fresh_dir("job");
    let (chk, out) = (base.join("checkpoints"), base.join("out"));
    let mut restored = 0;
    let last = attempts.last().map_or(2, |a| a.0);
    for &(p, fail_after) in attempts.iter().chain([(last, 0)].iter()) {
        let fail = (fail_after > 0).then_some(fail_after);
        let env = job(shape, mode, p, splits, len, &chk, &out, fail);
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
    same_lines(
        shape,
        &committed(&out),
        &expected(shape, splits, len),
        "committed output differs from a failure-free run",
    );
    // Run again: it restores the final checkpoint, where every source had
    // ended, and writes nothing more.
    let env = job(shape, mode, last, splits, len, &chk, &out, None);
    env.execute("checkpointed").unwrap();
    assert!(env.restored_checkpoint().is_some());
    same_lines(
        shape,
        &committed(&out),
        &expected(shape, splits, len),
        "a finished job ran again",
    );
    let _ = std::fs::remove_dir_all(&base);
    restored
}

const SHAPES: [Shape; 5] = [
    Shape::RunningSums,
    Shape::Windows,
    Shape::AsyncRunningSums,
    Shape::AsyncWindows,
    Shape::ListAndMap,
];

#[test]
fn a_job_failed_late_restores_its_checkpoint_and_writes_each_line_once() {
    for shape in SHAPES {
        // 4 splits of 1,500 records at 20 per split per poll: ~75 polls of
        // 1 ms and more, so checkpoints every 10 ms complete before the
        // failure at 90% of the records.
        let restored = run_until_done(shape, &Mode::default(), 4, 1500, &[(2, 5400)]);
        assert_eq!(restored, 1, "{shape:?}: the second run did not restore");
    }
}

#[test]
fn a_restored_job_may_run_at_another_parallelism() {
    for shape in SHAPES {
        let restored = run_until_done(
            shape,
            &Mode::default(),
            5,
            1200,
            &[(2, 4000), (3, 1500), (1, 900)],
        );
        assert!(restored >= 1, "{shape:?}: no run restored");
    }
}

#[test]
fn unaligned_checkpoints_restore_exactly_at_another_parallelism() {
    for shape in SHAPES {
        let restored = run_until_done(
            shape,
            &Mode::unaligned(),
            5,
            1200,
            &[(2, 4000), (3, 1500), (2, 900)],
        );
        assert!(restored >= 1, "{shape:?}: no run restored");
    }
}

/// Emits `(input, 0..len)`: `per_poll` records per poll, each flushed on
/// its own `gap` after the one before, so its barriers (sent between polls)
/// trail what it sends.
struct Dribble {
    input: u8,
    next: u64,
    len: u64,
    per_poll: u64,
    gap: Duration,
}

impl Source<(u8, u64)> for Dribble {
    fn poll(&mut self, ctx: &mut SourceContext<'_, (u8, u64)>) -> SourceStatus {
        let end = (self.next + self.per_poll).min(self.len);
        while self.next < end {
            std::thread::sleep(self.gap);
            ctx.collect((self.input, self.next));
            ctx.flush();
            self.next += 1;
        }
        if self.next >= self.len {
            SourceStatus::Ended
        } else {
            SourceStatus::More
        }
    }

    fn snapshot(&mut self, state: &mut StateWriter) {
        state.value("next", &self.next);
    }

    fn restore(&mut self, state: &StateReader) -> Result<(), StreamError> {
        if let Some(next) = state.own::<u64>("next")? {
            self.next = next;
        }
        Ok(())
    }
}

#[test]
fn a_restore_replays_the_records_an_unaligned_checkpoint_took_in_flight() {
    // Input 0 sends a record every millisecond, each poll a barrier
    // opportunity; input 1 sends one every 2 ms but polls only every 50,
    // so its barrier comes up to 100 ms after input 0's and what it sends
    // meanwhile is in flight. The job fails at the first record after a
    // checkpoint with records in flight completed (checkpoints are 300 ms
    // apart: no other completes in between) and restores from it; the
    // keyed running sums it commits must be exactly a failure-free run's.
    let base = fresh_dir("in-flight");
    let (chk, out) = (base.join("checkpoints"), base.join("out"));
    let len = 400u64;
    let mut restored = None;
    for attempt in 0..2 {
        let seen = Arc::new(Seen::default());
        let env = StreamEnv::new();
        env.set_parallelism(1).set_max_parallelism(16);
        env.enable_checkpointing(Duration::from_millis(300), Counting::new(&chk, &seen))
            .enable_unaligned_checkpoints();
        let (s, fail) = (seen.clone(), attempt == 0);
        let dribble = move |input, per_poll, gap| Dribble {
            input,
            next: 0,
            len,
            per_poll,
            gap: Duration::from_millis(gap),
        };
        env.add_source("steady", 1, move |_| dribble(0, 1, 1))
            .union(env.add_source("bursty", 1, move |_| dribble(1, 50, 2)))
            .map(move |r| {
                if fail && s.latest_had_in_flight.load(Ordering::SeqCst) {
                    panic!("injected failure after a checkpoint with records in flight");
                }
                r
            })
            .map(|(input, n)| (input, 1u64, n))
            .key_by(|(input, _, _)| *input)
            .reduce(|(i, c1, n1), (_, c2, n2)| (i, c1 + c2, n1 + n2))
            .map(|(i, c, n)| format!("{i},{c},{n}"))
            .write_files(&out);
        let result = env.execute("in flight");
        if attempt == 0 {
            assert!(
                matches!(result, Err(StreamError::SubtaskFailed { .. })),
                "the first run should fail: {result:?}"
            );
            restored = Some(seen.in_flight.lock().unwrap().clone());
        } else {
            result.unwrap();
            let restored_from = env.restored_checkpoint().expect("the second run restored");
            let had_in_flight = restored.as_ref().expect("first run");
            assert!(
                had_in_flight.contains(&restored_from),
                "checkpoint {restored_from} held no records in flight ({had_in_flight:?})"
            );
        }
    }
    let mut want = Vec::new();
    for input in 0..2 {
        let mut sum = 0;
        for n in 0..len {
            sum += n;
            want.push(format!("{input},{},{sum}", n + 1));
        }
    }
    want.sort();
    same_lines(
        Shape::RunningSums,
        &committed(&out),
        &want,
        "committed output differs",
    );
    let _ = std::fs::remove_dir_all(&base);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    /// Failures anywhere, several in a row, parallelism changing between
    /// runs: the committed output is always the failure-free one.
    #[test]
    fn failures_anywhere_leave_exactly_the_failure_free_output(
        attempts in prop::collection::vec((1usize..4, 1u64..2400), 1..4),
        shape in prop::sample::select(SHAPES.to_vec()),
        unaligned in any::<bool>(),
    ) {
        let mode = if unaligned { Mode::unaligned() } else { Mode::default() };
        run_until_done(shape, &mode, 3, 800, &attempts);
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

/// Emits `(0, i)` for i below `len`, `per_poll` at a time, a millisecond
/// apart.
struct Paced {
    next: u64,
    len: u64,
}

impl Source<(u8, u64)> for Paced {
    fn poll(&mut self, ctx: &mut SourceContext<'_, (u8, u64)>) -> SourceStatus {
        let end = (self.next + 500).min(self.len);
        for i in self.next..end {
            ctx.collect((0, i));
        }
        self.next = end;
        std::thread::sleep(Duration::from_millis(1));
        if self.next >= self.len {
            SourceStatus::Ended
        } else {
            SourceStatus::More
        }
    }
}

/// Sleeps in its first poll (so its barriers come late), then emits `(1, 0)`
/// and ends; `woke` says when.
struct Sleepy {
    woke: Arc<std::sync::atomic::AtomicBool>,
}

impl Source<(u8, u64)> for Sleepy {
    fn poll(&mut self, ctx: &mut SourceContext<'_, (u8, u64)>) -> SourceStatus {
        std::thread::sleep(Duration::from_secs(3));
        self.woke.store(true, Ordering::SeqCst);
        ctx.collect((1, 0));
        SourceStatus::Ended
    }
}

/// How many of the paced source's `len` records reach the sink while the
/// sleepy one sleeps, with at most `max_held` records held back in alignment.
fn records_through_while_one_input_lags(max_held: usize, len: u64) -> (u64, u64) {
    let base = fresh_dir("alignment");
    let env = StreamEnv::new();
    env.set_parallelism(1);
    env.enable_checkpointing(
        Duration::from_millis(10),
        LocalDirStore::new(base.join("checkpoints")).unwrap(),
    )
    .set_max_alignment_records(max_held);
    let woke = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (early, total) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let w = woke.clone();
    let (e, t) = (early.clone(), total.clone());
    env.add_source("paced", 1, move |_| Paced { next: 0, len })
        .union(env.add_source("sleepy", 1, move |_| Sleepy { woke: w.clone() }))
        .for_each(move |r| {
            if r.value.0 == 0 && !woke.load(Ordering::SeqCst) {
                e.fetch_add(1, Ordering::SeqCst);
            }
            t.fetch_add(1, Ordering::SeqCst);
        });
    env.execute("one input lags").unwrap();
    let _ = std::fs::remove_dir_all(&base);
    (early.load(Ordering::SeqCst), total.load(Ordering::SeqCst))
}

#[test]
fn a_subtask_that_would_hold_too_much_while_aligning_declines_the_checkpoint() {
    // 100,000 records over about 200 ms while the other input sleeps 3 s.
    // Aligned without a limit, a checkpoint's barrier from the paced input
    // would hold back everything after it until the sleepy one's barrier.
    // With at most 1,000 held, the subtask declines and lets them through.
    let len = 100_000;
    let (early, total) = records_through_while_one_input_lags(1_000, len);
    assert_eq!(total, len + 1, "every record arrives once");
    assert!(
        early >= len * 3 / 4,
        "only {early} of {len} records got through while the other input lagged"
    );
}

/// Emits one record `(1, i)` every 100 ms until it has sent `len`: an input
/// whose barriers come late, for as long as it runs.
struct Trickle {
    next: u64,
    len: u64,
}

impl Source<(u8, u64)> for Trickle {
    fn poll(&mut self, ctx: &mut SourceContext<'_, (u8, u64)>) -> SourceStatus {
        std::thread::sleep(Duration::from_millis(100));
        ctx.collect((1, self.next));
        self.next += 1;
        if self.next >= self.len {
            SourceStatus::Ended
        } else {
            SourceStatus::More
        }
    }
}

#[test]
fn unaligned_checkpoints_complete_while_one_input_lags_behind_a_busy_one() {
    // A busy input and one that sends a record (and so can send a barrier)
    // every 100 ms, for 3 s. Aligned, the busy input's barrier would hold
    // back far more than 1,000 records before the slow one's came: the
    // checkpoint is declined, again and again (it completes only when the
    // slow input's barrier happens to come first). Unaligned, the subtask
    // writes its state at the busy input's barrier, takes no hold, and the
    // checkpoint completes when the slow input's barrier arrives.
    let base = fresh_dir("unaligned-skew");
    let seen = Arc::new(Seen::default());
    let env = StreamEnv::new();
    env.set_parallelism(1);
    env.enable_checkpointing(
        Duration::from_millis(10),
        Counting::new(&base.join("checkpoints"), &seen),
    )
    .set_max_alignment_records(1_000)
    .enable_unaligned_checkpoints();
    // The busy input takes about 6 s, the slow one 3 s.
    let (len, slow) = (3_000_000u64, 30u64);
    let counts = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    // When the slow input's last record arrives: checkpoints completed by
    // then, and how far the busy input had got.
    let at_slow_end = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let (c, e, s) = (counts.clone(), at_slow_end.clone(), seen.clone());
    env.add_source("busy", 1, move |_| Paced { next: 0, len })
        .union(env.add_source("slow", 1, move |_| Trickle { next: 0, len: slow }))
        .for_each(move |r| {
            let (input, n) = (usize::from(r.value.0), r.value.1);
            // Every record once, in order per input.
            assert_eq!(c[input].fetch_add(1, Ordering::SeqCst), n, "input {input}");
            if input == 1 && n + 1 == slow {
                e[0].store(s.completed.load(Ordering::SeqCst), Ordering::SeqCst);
                e[1].store(c[0].load(Ordering::SeqCst), Ordering::SeqCst);
            }
        });
    env.execute("one input lags").unwrap();
    assert_eq!(counts[0].load(Ordering::SeqCst), len);
    assert_eq!(counts[1].load(Ordering::SeqCst), slow);
    let (completed, busy) = (
        at_slow_end[0].load(Ordering::SeqCst),
        at_slow_end[1].load(Ordering::SeqCst),
    );
    assert!(
        busy < len,
        "the busy input had ended before the slow one: nothing lagged"
    );
    // About one per poll of the slow input (30); aligned, 5 to 7 here.
    assert!(
        completed >= 20,
        "only {completed} checkpoints completed while one input lagged behind the other"
    );
    let _ = std::fs::remove_dir_all(&base);
}

//! Keyed process functions with event-time timers, union and connect.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use sluice_stream::{
    Either, KeyedProcess, KeyedState, LocalDirStore, ProcessContext, Record, Source, SourceContext,
    SourceStatus, StateReader, StateWriter, StreamEnv, StreamError, SubtaskInfo,
};

/// Flink's `CountWithTimeoutFunction`: counts a key's records and emits the
/// count once the key has been quiet for `TIMEOUT` ms of event time.
struct CountWithTimeout {
    /// (count, event time of the last record).
    state: KeyedState<u8, (u64, i64)>,
}

const TIMEOUT: i64 = 10;

impl KeyedProcess<u8, (u8, i64), (u8, u64)> for CountWithTimeout {
    fn process(
        &mut self,
        key: &u8,
        record: Record<(u8, i64)>,
        ctx: &mut ProcessContext<'_, u8, (u8, u64)>,
    ) {
        let time = record.time.unwrap();
        let count = self.state.get(key).map_or(0, |s| s.0) + 1;
        self.state.insert(*key, (count, time));
        ctx.register_event_time_timer(time + TIMEOUT);
    }

    fn on_timer(&mut self, key: &u8, time: i64, ctx: &mut ProcessContext<'_, u8, (u8, u64)>) {
        if let Some((count, last)) = self.state.get(key).copied() {
            if time == last + TIMEOUT {
                ctx.emit((*key, count));
            }
        }
    }
}

/// What the function emits when the source passes records on in batches
/// of `batch`, each followed by the watermark (largest time so far - 1): a
/// key's count at record i is emitted when the first watermark to reach
/// `t_i + TIMEOUT` comes before the key's next record (or there is none).
fn count_with_timeout(input: &[(u8, i64)], batch: usize) -> Vec<(u8, u64)> {
    // The watermark after each batch (in time order, the batch's last time - 1).
    let marks: Vec<(usize, i64)> = input
        .chunks(batch)
        .scan(0usize, |end, chunk| {
            *end += chunk.len();
            Some((*end, chunk.last().map_or(i64::MIN, |r| r.1 - 1)))
        })
        .collect();
    let mut out = Vec::new();
    let mut counts: HashMap<u8, u64> = HashMap::new();
    for (i, (k, t)) in input.iter().enumerate() {
        let count = counts.entry(*k).or_default();
        *count += 1;
        let next = input[i + 1..]
            .iter()
            .position(|r| r.0 == *k)
            .map(|p| i + 1 + p);
        // Records before this index arrive before the watermark that fires.
        let fires_before = marks
            .iter()
            .find(|(end, wm)| *end > i && *wm >= t + TIMEOUT)
            .map_or(usize::MAX, |(end, _)| *end);
        if next.is_none_or(|n| n >= fires_before) {
            out.push((*k, *count));
        }
    }
    out.sort();
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Records in time order: a key's count is emitted where the watermark
    /// passed its timeout before the key's next record arrived.
    #[test]
    fn timers_fire_where_keys_go_quiet(
        steps in prop::collection::vec((0u8..5, 1i64..15), 0..200),
        parallelism in 1usize..4,
        batch in 1usize..16,
    ) {
        let mut t = 0;
        let input: Vec<(u8, i64)> = steps.into_iter().map(|(k, dt)| { t += dt; (k, t) }).collect();
        let env = StreamEnv::new();
        env.set_parallelism(parallelism).set_buffers(batch, 2);
        let out = env
            .from_iter(input.clone())
            .assign_timestamps(Duration::ZERO, |(_, t)| *t)
            .key_by(|(k, _)| *k)
            .process("count with timeout", |info: SubtaskInfo| CountWithTimeout {
                state: KeyedState::new(info.index, info.parallelism, info.max_parallelism),
            })
            .collect();
        env.execute("timeouts").unwrap();
        let mut got = out.take();
        got.sort();
        prop_assert_eq!(got, count_with_timeout(&input, batch));
    }
}

/// Registers a timer per record and deletes it again for odd values.
struct DeleteOdd;

impl KeyedProcess<u8, u32, u32> for DeleteOdd {
    fn process(&mut self, _: &u8, record: Record<u32>, ctx: &mut ProcessContext<'_, u8, u32>) {
        let at = i64::from(record.value) * 10;
        ctx.register_event_time_timer(at);
        if record.value % 2 == 1 {
            ctx.delete_event_time_timer(at);
        }
    }

    fn on_timer(&mut self, _: &u8, time: i64, ctx: &mut ProcessContext<'_, u8, u32>) {
        assert_eq!(ctx.timestamp(), Some(time));
        ctx.emit((time / 10) as u32);
    }
}

#[test]
fn deleted_timers_do_not_fire() {
    let env = StreamEnv::new();
    env.set_parallelism(2);
    let out = env
        .from_iter(0u32..20)
        .key_by(|n| (n % 3) as u8)
        .process("delete odd", |_| DeleteOdd)
        .collect();
    env.execute("timers").unwrap();
    let mut got = out.take();
    got.sort();
    assert_eq!(got, (0..20).filter(|n| n % 2 == 0).collect::<Vec<_>>());
}

#[test]
fn union_and_connect_see_both_inputs() {
    let env = StreamEnv::new();
    env.set_parallelism(3);
    let evens = env.generate(Some(500), |n| n * 2);
    let odds = env.from_iter((0..300u64).map(|n| n * 2 + 1));
    let all = evens.union(odds).collect();
    let words = env.from_iter(["a", "b", "a"].map(String::from));
    let counts = env.generate(Some(4), |n| n);
    let both = words.connect(counts).collect();
    env.execute("two inputs").unwrap();
    let mut got = all.take();
    got.sort();
    let mut want: Vec<u64> = (0..500)
        .map(|n| n * 2)
        .chain((0..300).map(|n| n * 2 + 1))
        .collect();
    want.sort();
    assert_eq!(got, want);
    let both = both.take();
    assert_eq!(
        both.iter().filter(|e| matches!(e, Either::Left(_))).count(),
        3
    );
    let mut right: Vec<u64> = both
        .into_iter()
        .filter_map(|e| match e {
            Either::Right(n) => Some(n),
            Either::Left(_) => None,
        })
        .collect();
    right.sort();
    assert_eq!(right, vec![0, 1, 2, 3]);
}

/// Emits keys 0..KEYS, then stays open (idle) until the process function
/// has fired what it expects; fails the job when a deadline passes first.
struct KeysThenIdle {
    next: u8,
    fired: Arc<AtomicUsize>,
    deadline: Instant,
    /// Fail the job once this many checkpoints began after the last key.
    fail_after_checkpoints: Option<usize>,
    checkpoints_after_keys: usize,
}

impl KeysThenIdle {
    fn new(fired: Arc<AtomicUsize>, fail_after_checkpoints: Option<usize>) -> KeysThenIdle {
        KeysThenIdle {
            next: 0,
            fired,
            deadline: Instant::now() + Duration::from_secs(20),
            fail_after_checkpoints,
            checkpoints_after_keys: 0,
        }
    }
}

const KEYS: u8 = 10;

impl Source<u8> for KeysThenIdle {
    fn poll(&mut self, ctx: &mut SourceContext<'_, u8>) -> SourceStatus {
        if self.next < KEYS {
            ctx.collect(self.next);
            self.next += 1;
            if self.next == KEYS {
                ctx.flush();
            }
            return SourceStatus::More;
        }
        if self
            .fail_after_checkpoints
            .is_some_and(|n| self.checkpoints_after_keys >= n)
        {
            ctx.fail(StreamError::InvalidJob("injected failure".into()));
            return SourceStatus::Ended;
        }
        if self.fired.load(Ordering::SeqCst) >= usize::from(KEYS / 2) {
            return SourceStatus::Ended;
        }
        if Instant::now() > self.deadline {
            // Timers that fire only once the input ends do not count.
            ctx.fail(StreamError::InvalidJob(
                "the timers did not fire in time".into(),
            ));
            return SourceStatus::Ended;
        }
        std::thread::sleep(Duration::from_millis(5));
        SourceStatus::More
    }

    fn snapshot(&mut self, state: &mut StateWriter) {
        if self.next == KEYS {
            self.checkpoints_after_keys += 1;
        }
        state.value("next", &self.next);
    }

    fn restore(&mut self, state: &StateReader) -> Result<(), StreamError> {
        for (_, next) in state.values::<u8>("next")? {
            self.next = self.next.max(next);
        }
        Ok(())
    }
}

/// Per key: a processing-time timer `delay_ms` ahead, deleted again for odd
/// keys. Emits (key, event time, registered time, time it fired).
struct WallClockTimeout {
    fired: Arc<AtomicUsize>,
    delay_ms: i64,
}

impl KeyedProcess<u8, u8, (u8, Option<i64>, i64, i64)> for WallClockTimeout {
    fn process(
        &mut self,
        key: &u8,
        _: Record<u8>,
        ctx: &mut ProcessContext<'_, u8, (u8, Option<i64>, i64, i64)>,
    ) {
        let at = ctx.current_processing_time() + self.delay_ms;
        ctx.register_processing_time_timer(at);
        // A second registration of the same time is the same timer.
        ctx.register_processing_time_timer(at);
        if key % 2 == 1 {
            ctx.delete_processing_time_timer(at);
        }
    }

    fn on_processing_timer(
        &mut self,
        key: &u8,
        time: i64,
        ctx: &mut ProcessContext<'_, u8, (u8, Option<i64>, i64, i64)>,
    ) {
        let now = ctx.current_processing_time();
        ctx.emit((*key, ctx.timestamp(), time, now));
        self.fired.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn processing_time_timers_fire_on_the_wall_clock_while_the_input_is_idle() {
    let fired = Arc::new(AtomicUsize::new(0));
    let env = StreamEnv::new();
    env.set_parallelism(2);
    let source_fired = fired.clone();
    let out = env
        .add_source("keys", 1, move |_| {
            KeysThenIdle::new(source_fired.clone(), None)
        })
        .key_by(|k| *k)
        .process("wall-clock timeout", move |_| WallClockTimeout {
            fired: fired.clone(),
            delay_ms: 30,
        })
        .collect();
    env.execute("processing time").unwrap();
    let mut got = out.take();
    got.sort();
    let keys: Vec<u8> = got.iter().map(|r| r.0).collect();
    // Each even key once; the odd keys' timers were deleted.
    assert_eq!(keys, (0..KEYS).filter(|k| k % 2 == 0).collect::<Vec<_>>());
    for (key, event_time, time, fired_at) in got {
        assert_eq!(
            event_time, None,
            "key {key}: a processing-time timer has no event time"
        );
        assert!(
            fired_at >= time,
            "key {key} fired at {fired_at}, before its time {time}"
        );
    }
}

/// Timers registered but not yet due are part of a checkpoint: the job
/// fails before they fire, and the restored job fires them (the ones due
/// meanwhile at once), each once.
#[test]
fn processing_time_timers_are_restored_from_a_checkpoint() {
    let checkpoints = tempfile::tempdir().unwrap();
    let run = |fail: bool| {
        let fired = Arc::new(AtomicUsize::new(0));
        let env = StreamEnv::new();
        env.set_parallelism(2);
        env.enable_checkpointing(
            Duration::from_millis(10),
            LocalDirStore::new(checkpoints.path()).unwrap(),
        );
        let source_fired = fired.clone();
        let out = env
            .add_source("keys", 1, move |_| {
                KeysThenIdle::new(source_fired.clone(), fail.then_some(3))
            })
            .key_by(|k| *k)
            .process("wall-clock timeout", move |_| WallClockTimeout {
                fired: fired.clone(),
                // Far enough ahead that the first run fails before any is due.
                delay_ms: 3_000,
            })
            .collect();
        (env.execute("processing time restored"), out)
    };
    let (first, out) = run(true);
    assert!(first.is_err(), "the first run was to fail");
    assert_eq!(out.take(), Vec::new(), "nothing was due before the failure");
    let (second, out) = run(false);
    second.unwrap();
    let mut keys: Vec<u8> = out.take().iter().map(|r| r.0).collect();
    keys.sort();
    assert_eq!(keys, (0..KEYS).filter(|k| k % 2 == 0).collect::<Vec<_>>());
}

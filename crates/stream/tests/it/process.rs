//! Keyed process functions with event-time timers, union and connect.

use std::collections::HashMap;
use std::time::Duration;

use proptest::prelude::*;
use sluice_stream::{
    Either, KeyedProcess, KeyedState, ProcessContext, Record, StreamEnv, SubtaskInfo,
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
    let words = env.from_iter(["a", "b", "a"]);
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

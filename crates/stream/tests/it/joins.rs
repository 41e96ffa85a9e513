//! Interval and window joins against brute-force references.

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use sluice_stream::{
    Either, IntervalJoin, JoinFn, Source, SourceContext, SourceStatus, StreamEnv, Windows,
};

type Side = (u8, u32);
/// (key, left id, right id).
type Pair = (u8, u32, u32);

#[derive(Clone, Debug)]
enum Step {
    Left(u8, i64, u32),
    Right(u8, i64, u32),
    Watermark(i64),
}

/// Plays the script from one subtask, so the join sees it in order.
struct Script(Vec<Step>);

impl Source<Either<Side, Side>> for Script {
    fn poll(&mut self, ctx: &mut SourceContext<'_, Either<Side, Side>>) -> SourceStatus {
        for step in &self.0 {
            match *step {
                Step::Left(k, t, id) => ctx.collect_at(Either::Left((k, id)), t),
                Step::Right(k, t, id) => ctx.collect_at(Either::Right((k, id)), t),
                Step::Watermark(w) => ctx.emit_watermark(w),
            }
        }
        SourceStatus::Ended
    }
}

fn script() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec((0u8..3, -40i64..40, 0i64..20, 0u8..10), 0..120).prop_map(|raw| {
        let mut wm = 0i64;
        let mut steps = Vec::new();
        for (i, (key, behind, rise, kind)) in raw.into_iter().enumerate() {
            let id = i as u32;
            match kind {
                0 | 1 => {
                    wm += rise;
                    steps.push(Step::Watermark(wm));
                }
                2..=5 => steps.push(Step::Left(key, wm + behind, id)),
                _ => steps.push(Step::Right(key, wm + behind, id)),
            }
        }
        steps
    })
}

/// (key, left id, right id, result time) of every pair of records that
/// were not late when they came, with `tl + lower <= tr <= tl + upper`.
fn interval_reference(steps: &[Step], lower: i64, upper: i64) -> Vec<(u8, u32, u32, i64)> {
    let mut wm = i64::MIN;
    let (mut lefts, mut rights) = (Vec::new(), Vec::new());
    for step in steps {
        match *step {
            Step::Watermark(w) => wm = wm.max(w),
            Step::Left(k, t, id) if wm == i64::MIN || t >= wm => lefts.push((k, t, id)),
            Step::Right(k, t, id) if wm == i64::MIN || t >= wm => rights.push((k, t, id)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    for (kl, tl, l) in &lefts {
        for (kr, tr, r) in &rights {
            if kl == kr && tl + lower <= *tr && *tr <= tl + upper {
                out.push((*kl, *l, *r, (*tl).max(*tr)));
            }
        }
    }
    out.sort();
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Out of order, with late records: every pair of records that were not
    /// late is joined once, at the later of their times.
    #[test]
    fn interval_join_matches_the_reference(
        steps in script(),
        bounds in prop_oneof![Just((-5i64, 5i64)), Just((0, 20)), Just((-30, -10)), Just((3, 3))],
        parallelism in 1usize..4,
        batch in 1usize..8,
    ) {
        let (lower, upper) = bounds;
        let env = StreamEnv::new();
        env.set_parallelism(parallelism).set_buffers(batch, 2);
        let script = steps.clone();
        let join: Arc<JoinFn<u8, Side, Side, Pair>> = Arc::new(|k, l, r| (*k, l.1, r.1));
        let out = env
            .add_source("script", 1, move |_| Script(script.clone()))
            .key_by(|e| match e {
                Either::Left((k, _)) | Either::Right((k, _)) => *k,
            })
            .process("interval join", move |info| IntervalJoin::new(info, lower, upper, join.clone()))
            .process("with times", |_| WithTime)
            .collect();
        env.execute("interval join").unwrap();
        let mut got = out.take();
        got.sort();
        prop_assert_eq!(got, interval_reference(&steps, lower, upper));
    }
}

/// Appends the event time to each value.
struct WithTime;

impl sluice_stream::Operator<(u8, u32, u32), (u8, u32, u32, i64)> for WithTime {
    fn process(
        &mut self,
        record: sluice_stream::Record<(u8, u32, u32)>,
        out: &mut sluice_stream::Collector<'_, (u8, u32, u32, i64)>,
    ) {
        let (k, l, r) = record.value;
        out.emit((k, l, r, record.time.unwrap_or(i64::MIN)));
    }
}

/// Two streams of (key, time) from generators, joined through the public
/// API, against every pair computed directly.
#[test]
fn joins_of_two_streams_pair_every_match() {
    let left: Vec<(u8, i64)> = (0..300).map(|i| ((i % 7) as u8, i * 3)).collect();
    let right: Vec<(u8, i64)> = (0..200).map(|i| ((i % 5) as u8, i * 5 + 1)).collect();
    let run = |interval: bool| {
        let env = StreamEnv::new();
        env.set_parallelism(3);
        let (l, r) = (left.clone(), right.clone());
        let a = env
            .from_iter(l)
            .assign_timestamps(Duration::from_secs(10), |(_, t)| *t)
            .key_by(|(k, _)| *k);
        let b = env
            .from_iter(r)
            .assign_timestamps(Duration::from_secs(10), |(_, t)| *t)
            .key_by(|(k, _)| *k);
        let out = if interval {
            a.interval_join(b, -4, 6, |k, l, r| (*k, l.1, r.1))
                .collect()
        } else {
            a.window_join(
                b,
                Windows::tumbling(Duration::from_millis(50)),
                |k, _, l, r| (*k, l.1, r.1),
            )
            .collect()
        };
        env.execute("joins").unwrap();
        let mut got = out.take();
        got.sort();
        got
    };
    let pairs = |ok: &dyn Fn(i64, i64) -> bool| {
        let mut v: Vec<(u8, i64, i64)> = left
            .iter()
            .flat_map(|(kl, tl)| {
                right
                    .iter()
                    .filter(move |(kr, tr)| kl == kr && ok(*tl, *tr))
                    .map(move |(_, tr)| (*kl, *tl, *tr))
            })
            .collect();
        v.sort();
        v
    };
    let interval = pairs(&|tl, tr| tl - 4 <= tr && tr <= tl + 6);
    assert!(
        interval.len() > 50,
        "too few pairs to say much: {}",
        interval.len()
    );
    assert_eq!(run(true), interval);
    let windowed = pairs(&|tl, tr| tl.div_euclid(50) == tr.div_euclid(50));
    assert!(
        windowed.len() > 50,
        "too few pairs to say much: {}",
        windowed.len()
    );
    assert_eq!(run(false), windowed);
}

#[test]
fn jobs_that_cannot_be_right_are_refused() {
    let env = StreamEnv::new();
    let a = env.from_iter([(1u8, 0i64)]).key_by(|(k, _)| *k);
    let b = env.from_iter([(1u8, 0i64)]).key_by(|(k, _)| *k);
    let _ = a.interval_join(b, 5, -5, |_, _, _| ()).collect();
    match env.execute("backwards bounds") {
        Err(sluice_stream::StreamError::InvalidJob(why)) => assert!(why.contains("lower"), "{why}"),
        other => panic!("expected an invalid job, got {other:?}"),
    }
    let env = StreamEnv::new();
    let _ = env.from_iter([1u8]).key_by(|k| *k).into_stream().collect();
    env.set_max_parallelism(64);
    match env.execute("key groups changed") {
        Err(sluice_stream::StreamError::InvalidJob(why)) => {
            assert!(why.contains("key_by"), "{why}")
        }
        other => panic!("expected an invalid job, got {other:?}"),
    }
}

//! Event-time windows against a brute-force reference: out-of-order
//! records, watermarks, allowed lateness and late data, at several
//! parallelisms.

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;
use sluice_stream::{Source, SourceContext, SourceStatus, StreamEnv, TimeWindow, Windows};

#[derive(Clone, Debug)]
enum Step {
    /// A record: key, event time, id.
    Record(u8, i64, u32),
    Watermark(i64),
}

/// Plays the steps from one subtask, so every window subtask sees its
/// records and the watermarks in script order.
struct Script(Vec<Step>);

impl Source<(u8, u32)> for Script {
    fn poll(&mut self, ctx: &mut SourceContext<'_, (u8, u32)>) -> SourceStatus {
        for step in &self.0 {
            match *step {
                Step::Record(key, time, id) => ctx.collect_at((key, id), time),
                Step::Watermark(w) => ctx.emit_watermark(w),
            }
        }
        SourceStatus::Ended
    }
}

/// Records around a watermark that rises now and then: some on time, some
/// behind it, some far behind.
fn script() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        (0u8..4, -70i64..50, 0i64..30, prop::bool::weighted(0.2)),
        0..150,
    )
    .prop_map(|raw| {
        let mut wm = 0i64;
        let mut steps = Vec::new();
        for (i, (key, behind, rise, is_wm)) in raw.into_iter().enumerate() {
            if is_wm {
                wm += rise;
                steps.push(Step::Watermark(wm));
            } else {
                steps.push(Step::Record(key, wm + behind, i as u32));
            }
        }
        steps
    })
}

type Fired = Vec<(u8, i64, i64, Vec<u32>)>;

/// Flink's rules, computed by scanning: a window's contents are the records
/// not dropped; it fires when the watermark first reaches its last
/// millisecond, and again for each record that arrives after that but
/// within the allowed lateness; a record is late when every window it
/// falls in is past the lateness, and its time too.
/// `Shape::Session`: a record opens `[t, t + gap)`, and windows of its key
/// that overlap or meet it merge with it.
#[derive(Clone, Copy, Debug)]
enum Shape {
    Fixed { size: i64, slide: i64 },
    Session { gap: i64 },
}

fn reference(steps: &[Step], shape: Shape, lateness: i64) -> (Fired, Vec<u32>) {
    let mut wm = i64::MIN;
    let mut live: BTreeMap<(u8, i64, i64), Vec<u32>> = BTreeMap::new();
    let mut fired = Vec::new();
    let mut late = Vec::new();
    let advance = |to: i64,
                   wm: &mut i64,
                   live: &mut BTreeMap<(u8, i64, i64), Vec<u32>>,
                   fired: &mut Fired| {
        if to <= *wm {
            return;
        }
        let before = *wm;
        *wm = to;
        for ((k, s, e), ids) in live.iter() {
            if e - 1 > before && e - 1 <= to {
                fired.push((*k, *s, *e, sorted(ids)));
            }
        }
        live.retain(|(_, _, e), _| (e - 1).saturating_add(lateness) > to);
    };
    for step in steps {
        match *step {
            Step::Watermark(w) => advance(w, &mut wm, &mut live, &mut fired),
            Step::Record(k, t, id) => {
                if let Shape::Session { gap } = shape {
                    let (s, e) = (t, t + gap);
                    let touched: Vec<(u8, i64, i64)> = live
                        .keys()
                        .filter(|(lk, ls, le)| *lk == k && *ls <= e && *le >= s)
                        .copied()
                        .collect();
                    let start = touched.iter().map(|w| w.1).fold(s, i64::min);
                    let end = touched.iter().map(|w| w.2).fold(e, i64::max);
                    if (end - 1).saturating_add(lateness) <= wm {
                        if t.saturating_add(lateness) <= wm {
                            late.push(id);
                        }
                        continue;
                    }
                    let mut ids = vec![id];
                    for w in touched {
                        ids.extend(live.remove(&w).unwrap_or_default());
                    }
                    if end - 1 <= wm {
                        fired.push((k, start, end, sorted(&ids)));
                    }
                    live.insert((k, start, end), ids);
                    continue;
                }
                let Shape::Fixed { size, slide } = shape else {
                    continue;
                };
                let mut skipped = true;
                for start in (t - size + 1)..=t {
                    if start.rem_euclid(slide) != 0 {
                        continue;
                    }
                    let end = start + size;
                    if (end - 1).saturating_add(lateness) <= wm {
                        continue;
                    }
                    skipped = false;
                    let ids = live.entry((k, start, end)).or_default();
                    ids.push(id);
                    if end - 1 <= wm {
                        fired.push((k, start, end, sorted(ids)));
                    }
                }
                if skipped && t.saturating_add(lateness) <= wm {
                    late.push(id);
                }
            }
        }
    }
    advance(i64::MAX, &mut wm, &mut live, &mut fired);
    fired.sort();
    late.sort();
    (fired, late)
}

fn sorted(ids: &[u32]) -> Vec<u32> {
    let mut v = ids.to_vec();
    v.sort();
    v
}

fn run(
    steps: Vec<Step>,
    windows: Windows,
    lateness: i64,
    parallelism: usize,
    batch: usize,
) -> (Fired, Vec<u32>) {
    let env = StreamEnv::new();
    env.set_parallelism(parallelism).set_buffers(batch, 2);
    let mut windowed = env
        .add_source("script", 1, move |_| Script(steps.clone()))
        .key_by(|(k, _)| *k)
        .window(windows)
        .allowed_lateness(Duration::from_millis(lateness as u64));
    let late = windowed.late_data().map(|(_, id)| id).collect();
    let fired = windowed
        .process(|k: &u8, w: &TimeWindow, all: &[(u8, u32)]| {
            let ids: Vec<u32> = all.iter().map(|(_, id)| *id).collect();
            Some((*k, w.start, w.end, sorted(&ids)))
        })
        .collect();
    env.execute("windows").unwrap();
    let mut fired = fired.take();
    let mut late = late.take();
    fired.sort();
    late.sort();
    (fired, late)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn windows_match_the_reference(
        steps in script(),
        shape in prop_oneof![
            Just(Shape::Fixed { size: 10, slide: 10 }),
            Just(Shape::Fixed { size: 25, slide: 25 }),
            Just(Shape::Fixed { size: 30, slide: 10 }),
            Just(Shape::Fixed { size: 20, slide: 7 }),
            Just(Shape::Session { gap: 5 }),
            Just(Shape::Session { gap: 20 }),
        ],
        lateness in prop_oneof![Just(0i64), Just(15), Just(40)],
        parallelism in 1usize..4,
        batch in 1usize..8,
    ) {
        let ms = |v: i64| Duration::from_millis(v as u64);
        let windows = match shape {
            Shape::Fixed { size, slide } if size == slide => Windows::tumbling(ms(size)),
            Shape::Fixed { size, slide } => Windows::sliding(ms(size), ms(slide)),
            Shape::Session { gap } => Windows::session(ms(gap)),
        };
        let got = run(steps.clone(), windows, lateness, parallelism, batch);
        let want = reference(&steps, shape, lateness);
        prop_assert_eq!(got, want);
    }
}

#[test]
fn a_windowed_reduce_sums_each_window() {
    let env = StreamEnv::new();
    env.set_parallelism(2);
    let out = env
        .from_iter([
            ('a', 1i64, 0i64),
            ('a', 2, 5),
            ('b', 10, 7),
            ('a', 4, 12),
            ('b', 20, 19),
        ])
        .assign_timestamps(Duration::ZERO, |(_, _, t)| *t)
        .key_by(|(k, _, _)| *k)
        .window(Windows::tumbling(Duration::from_millis(10)))
        .reduce(|(k, a, t), (_, b, _)| (k, a + b, t))
        .map(|(k, w, (_, sum, _))| (k, w.start, sum))
        .collect();
    env.execute("sums").unwrap();
    let mut got = out.take();
    got.sort();
    assert_eq!(
        got,
        vec![('a', 0, 3), ('a', 10, 4), ('b', 0, 10), ('b', 10, 20)]
    );
}

#[test]
fn sessions_merge_bursts_per_key() {
    let env = StreamEnv::new();
    env.set_parallelism(2);
    // Key 'a': 0, 4 and 13 (gap 5: 4 + 5 = 9 < 13) and a late bridge at 8
    // that joins them: [0, 18). Key 'b': 2 alone: [2, 7).
    let out = env
        .from_iter([('a', 0i64), ('a', 4), ('b', 2), ('a', 13), ('a', 8)])
        .assign_timestamps(Duration::from_millis(100), |(_, t)| *t)
        .key_by(|(k, _)| *k)
        .window(Windows::session(Duration::from_millis(5)))
        .aggregate(
            || 0u32,
            |n, _| *n += 1,
            |n, m| *n += m,
            |k, w, n| (*k, w.start, w.end, *n),
        )
        .collect();
    env.execute("sessions").unwrap();
    let mut got = out.take();
    got.sort();
    assert_eq!(got, vec![('a', 0, 18, 4), ('b', 2, 7, 1)]);
}

#[test]
fn a_record_without_event_time_fails_the_job() {
    let env = StreamEnv::new();
    let _ = env
        .from_iter([1u32, 2, 3])
        .key_by(|n| *n)
        .window(Windows::tumbling(Duration::from_millis(10)))
        .reduce(|a, b| a + b)
        .collect();
    let err = env.execute("no times").unwrap_err();
    assert!(
        matches!(err, sluice_stream::StreamError::NoEventTime { .. }),
        "{err}"
    );
}

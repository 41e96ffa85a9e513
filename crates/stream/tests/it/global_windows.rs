//! Global windows with triggers and evictors, against a single-threaded
//! reference that replays the same script (records in order, one watermark
//! after each input batch).

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;
use sluice_stream::{Evictor, StreamEnv, Trigger};

/// A record: (key, event time, value).
type Rec = (u8, i64, u32);
/// A firing: the key and the values the function saw, in order.
type Fired = (u8, Vec<u32>);

#[derive(Clone, Copy, Debug)]
enum Shape {
    /// `count_window(n)`.
    Tumbling(u64),
    /// `count_window_sliding(size, slide)`.
    Sliding(u64, u64),
    /// A count trigger with a time evictor.
    CountKeepingRecent(u64, i64),
    /// `Trigger::every(interval)`, purging or not.
    EveryInterval(i64, bool),
}

fn run(shape: Shape, input: &[Rec], parallelism: usize, batch: usize) -> Vec<Fired> {
    let env = StreamEnv::new();
    env.set_parallelism(parallelism).set_buffers(batch, 2);
    let keyed = env
        .from_iter(input.to_vec())
        .assign_timestamps(Duration::ZERO, |r: &Rec| r.1)
        .key_by(|r: &Rec| r.0);
    let windowed = match shape {
        Shape::Tumbling(n) => keyed.count_window(n),
        Shape::Sliding(size, slide) => keyed.count_window_sliding(size, slide),
        Shape::CountKeepingRecent(n, span) => keyed
            .global_window()
            .trigger(Trigger::count(n))
            .evictor(Evictor::time(Duration::from_millis(span as u64))),
        Shape::EveryInterval(interval, purge) => {
            let trigger = Trigger::every(Duration::from_millis(interval as u64));
            keyed
                .global_window()
                .trigger(if purge { trigger.purging() } else { trigger })
        }
    };
    let out = windowed
        .process(|k: &u8, all: &[Rec]| Some((*k, all.iter().map(|r| r.2).collect::<Vec<u32>>())))
        .collect();
    env.execute("global windows").unwrap();
    let mut got = out.take();
    got.sort();
    got
}

/// The same windows, computed by replaying the script in one thread.
fn reference(shape: Shape, input: &[Rec], batch: usize) -> Vec<Fired> {
    let mut panes: BTreeMap<u8, (Vec<Rec>, u64, Option<i64>)> = BTreeMap::new();
    let mut out = Vec::new();
    let fire = |key: u8, pane: &mut Vec<Rec>, out: &mut Vec<Fired>| {
        if let Shape::Sliding(size, _) = shape {
            let drop = pane.len().saturating_sub(size as usize);
            pane.drain(..drop);
        }
        if let Shape::CountKeepingRecent(_, span) = shape {
            if let Some(newest) = pane.iter().map(|r| r.1).max() {
                pane.retain(|r| r.1 > newest - span);
            }
        }
        if !pane.is_empty() {
            out.push((key, pane.iter().map(|r| r.2).collect()));
        }
        if matches!(shape, Shape::Tumbling(_) | Shape::EveryInterval(_, true)) {
            pane.clear();
        }
    };
    let mut max_time = i64::MIN;
    let mut watermark = i64::MIN;
    for chunk in input.chunks(batch) {
        for r in chunk {
            max_time = max_time.max(r.1);
            let pane = panes.entry(r.0).or_default();
            pane.0.push(*r);
            pane.1 += 1;
            match shape {
                Shape::Tumbling(n) | Shape::Sliding(_, n) | Shape::CountKeepingRecent(n, _) => {
                    if pane.1 >= n {
                        pane.1 = 0;
                        fire(r.0, &mut pane.0, &mut out);
                    }
                }
                Shape::EveryInterval(iv, _) => {
                    if pane.2.is_none() {
                        pane.2 = Some(r.1 - r.1.rem_euclid(iv) + iv);
                    }
                }
            }
        }
        if max_time - 1 > watermark {
            watermark = max_time - 1;
            if let Shape::EveryInterval(iv, _) = shape {
                for (key, pane) in panes.iter_mut() {
                    if let Some(at) = pane.2.filter(|at| *at <= watermark) {
                        fire(*key, &mut pane.0, &mut out);
                        pane.2 = Some(at + ((watermark - at) / iv + 1) * iv);
                    }
                }
            }
        }
        // Emptied windows go (and start on the grid again).
        panes.retain(|_, p| !p.0.is_empty() || p.1 > 0);
        for p in panes.values_mut() {
            if p.0.is_empty() {
                p.2 = None;
            }
        }
    }
    // The end of the input: interval timers first, then the window's end.
    if let Shape::EveryInterval(..) = shape {
        for (key, pane) in panes.iter_mut() {
            if pane.2.is_some() {
                fire(*key, &mut pane.0, &mut out);
            }
        }
        for (key, pane) in panes.iter_mut() {
            fire(*key, &mut pane.0, &mut out);
        }
    }
    out.sort();
    out
}

fn shapes() -> impl Strategy<Value = Shape> {
    prop_oneof![
        (1u64..6).prop_map(Shape::Tumbling),
        (1u64..6, 1u64..4).prop_map(|(size, slide)| Shape::Sliding(size, slide)),
        (1u64..5, 0i64..20).prop_map(|(n, span)| Shape::CountKeepingRecent(n, span)),
        (1i64..30, any::<bool>()).prop_map(|(iv, purge)| Shape::EveryInterval(iv, purge)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Records in time order (so none is late) over a few keys.
    #[test]
    fn global_windows_fire_as_the_reference_does(
        steps in prop::collection::vec((0u8..4, 0i64..8), 0..150),
        shape in shapes(),
        parallelism in 1usize..4,
        batch in 1usize..12,
    ) {
        let mut t = 0;
        let input: Vec<Rec> = steps
            .into_iter()
            .enumerate()
            .map(|(i, (k, dt))| { t += dt; (k, t, i as u32) })
            .collect();
        prop_assert_eq!(run(shape, &input, parallelism, batch), reference(shape, &input, batch));
    }
}

#[test]
fn a_count_window_of_three_fires_on_every_third_record_of_a_key() {
    let input: Vec<Rec> = (0..10).map(|i| ((i % 2) as u8, i64::from(i), i)).collect();
    assert_eq!(
        run(Shape::Tumbling(3), &input, 2, 4),
        vec![(0, vec![0, 2, 4]), (1, vec![1, 3, 5])]
    );
    assert_eq!(
        run(Shape::Sliding(3, 2), &input, 2, 4),
        vec![
            (0, vec![0, 2]),
            (0, vec![2, 4, 6]),
            (1, vec![1, 3]),
            (1, vec![3, 5, 7]),
        ]
    );
}

//! Joins of two keyed streams on event time (Flink's interval join and
//! window join).
//!
//! Both sides are keyed the same way, so subtask `i` of one holds the same
//! key groups as subtask `i` of the other: they meet pointwise, each pair
//! of subtasks feeding one subtask of the join (no second exchange).

use std::collections::BTreeMap;
use std::hash::Hash;
use std::sync::Arc;

use crate::process::{KeyedProcess, ProcessContext};
use crate::{
    Either, KeyedState, Record, StateData, StateReader, StateWriter, StreamError, SubtaskInfo,
    TimeWindow,
};

/// Flink's interval join as a keyed process over both sides: a left
/// record at `tl` and a right one at `tr` of the same key join when
/// `tl + lower <= tr <= tl + upper`; the result carries the later time.
///
/// A record behind the watermark (`time < watermark`) is dropped, as
/// Flink does. Otherwise a record waits for partners as long as one can
/// still come: a left one until the watermark passes `tl + upper`, a right
/// one until it passes `tr - lower`. So every pair of records that were
/// not late is joined, exactly once.
pub struct IntervalJoin<K, L, R, O> {
    lower: i64,
    upper: i64,
    join: Arc<JoinFn<K, L, R, O>>,
    /// Per key: waiting records by time, left and right.
    waiting: KeyedState<K, Sides<L, R>>,
}

/// What an interval join makes of a key and a left and right record.
pub type JoinFn<K, L, R, O> = dyn Fn(&K, &L, &R) -> O + Send + Sync;

type Sides<L, R> = (BTreeMap<i64, Vec<L>>, BTreeMap<i64, Vec<R>>);

impl<K: Hash + Eq, L, R, O> IntervalJoin<K, L, R, O> {
    pub fn new(info: SubtaskInfo, lower: i64, upper: i64, join: Arc<JoinFn<K, L, R, O>>) -> Self {
        IntervalJoin {
            lower,
            upper,
            join,
            waiting: KeyedState::new(info.index, info.parallelism, info.max_parallelism),
        }
    }
}

impl<K, L, R, O> KeyedProcess<K, Either<L, R>, O> for IntervalJoin<K, L, R, O>
where
    K: Hash + Eq + Clone + Send + StateData,
    L: Send + StateData,
    R: Send + StateData,
    O: Send,
{
    fn snapshot(&self, state: &mut StateWriter) {
        state.keyed("waiting", &self.waiting);
    }

    fn restore(&mut self, state: &StateReader) -> Result<(), StreamError> {
        state.keyed("waiting", &mut self.waiting)
    }

    fn process(
        &mut self,
        key: &K,
        record: Record<Either<L, R>>,
        ctx: &mut ProcessContext<'_, K, O>,
    ) {
        let Some(time) = record.time else {
            return; // without a time it can join nothing
        };
        if ctx.current_watermark() != i64::MIN && time < ctx.current_watermark() {
            return;
        }
        let (lower, upper) = (self.lower, self.upper);
        let mut sides = self.waiting.remove(key).unwrap_or_default();
        match record.value {
            Either::Left(l) => {
                let from = time.saturating_add(lower);
                let to = time.saturating_add(upper);
                for (tr, rights) in sides.1.range(from..=to) {
                    for r in rights {
                        let out = (self.join)(key, &l, r);
                        ctx.emit_at(out, Some(time.max(*tr)));
                    }
                }
                sides.0.entry(time).or_default().push(l);
                ctx.register_event_time_timer(to.saturating_add(1));
            }
            Either::Right(r) => {
                let from = time.saturating_sub(upper);
                let to = time.saturating_sub(lower);
                for (tl, lefts) in sides.0.range(from..=to) {
                    for l in lefts {
                        let out = (self.join)(key, l, &r);
                        ctx.emit_at(out, Some(time.max(*tl)));
                    }
                }
                sides.1.entry(time).or_default().push(r);
                ctx.register_event_time_timer(to.saturating_add(1));
            }
        }
        self.waiting.insert(key.clone(), sides);
    }

    fn on_timer(&mut self, key: &K, _: i64, ctx: &mut ProcessContext<'_, K, O>) {
        let Some(mut sides) = self.waiting.remove(key) else {
            return;
        };
        let wm = ctx.current_watermark();
        // Left records older than wm - upper, right ones older than
        // wm + lower, can meet no record that is not late.
        let keep_left = wm.saturating_sub(self.upper);
        let keep_right = wm.saturating_add(self.lower);
        sides.0 = sides.0.split_off(&keep_left);
        sides.1 = sides.1.split_off(&keep_right);
        if !(sides.0.is_empty() && sides.1.is_empty()) {
            self.waiting.insert(key.clone(), sides);
        }
    }
}

/// The pairs of a window join: every left and right record of a key that
/// share a window, joined.
pub(crate) fn window_pairs<K, L, R, O>(
    key: &K,
    window: &TimeWindow,
    all: &[Either<L, R>],
    join: &WindowJoinFn<K, L, R, O>,
) -> Vec<O> {
    let lefts = all.iter().filter_map(|e| match e {
        Either::Left(l) => Some(l),
        Either::Right(_) => None,
    });
    let rights: Vec<&R> = all
        .iter()
        .filter_map(|e| match e {
            Either::Right(r) => Some(r),
            Either::Left(_) => None,
        })
        .collect();
    lefts
        .flat_map(|l| rights.iter().map(move |r| join(key, window, l, r)))
        .collect()
}

pub(crate) type WindowJoinFn<K, L, R, O> = dyn Fn(&K, &TimeWindow, &L, &R) -> O + Send + Sync;

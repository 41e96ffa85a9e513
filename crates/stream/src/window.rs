//! Event-time windows on a keyed stream, with Flink's semantics:
//!
//! - A record goes to every window its event time falls in ([`Windows`]).
//! - A window fires when the watermark reaches its last millisecond
//!   (`end - 1`, its *max timestamp*): its result is emitted at that time.
//! - Its state is kept `allowed_lateness` longer. A record that arrives
//!   for a window already fired but not yet cleaned fires it again, with
//!   the record included; a record whose windows are all past that
//!   (`max timestamp + allowed lateness <= watermark`) is dropped, or sent
//!   to the late-data stream ([`WindowedStream::late_data`]).

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::checkpoint::{CheckpointId, Cursor};
use crate::keyed::KeyedState;
use crate::operator::{BoxOutput, Output};
use crate::{Record, StateData, StreamError};

/// A window: the event times `start..end` (ms).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TimeWindow {
    pub start: i64,
    pub end: i64,
}

impl TimeWindow {
    /// The last event time in the window; it fires when the watermark
    /// reaches it, and its results carry it as their event time.
    pub fn max_timestamp(&self) -> i64 {
        self.end - 1
    }
}

/// Which windows a record's event time falls in. Made by
/// [`Windows::tumbling`], [`Windows::sliding`] and [`Windows::session`],
/// whose sizes are at least 1 ms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Windows(Kind);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Windows of `size` ms, back to back, starting at multiples of the size
    /// shifted by `offset`.
    Tumbling { size: i64, offset: i64 },
    /// Windows of `size` ms starting every `slide` ms (shifted by `offset`):
    /// a record falls in `size / slide` of them.
    Sliding { size: i64, slide: i64, offset: i64 },
    /// A window per burst of a key's records: a record opens `gap` ms,
    /// and windows that overlap or meet merge.
    Session { gap: i64 },
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

impl Windows {
    pub fn tumbling(size: Duration) -> Windows {
        Windows(Kind::Tumbling {
            size: millis(size),
            offset: 0,
        })
    }

    pub fn sliding(size: Duration, slide: Duration) -> Windows {
        Windows(Kind::Sliding {
            size: millis(size),
            slide: millis(slide),
            offset: 0,
        })
    }

    pub fn session(gap: Duration) -> Windows {
        Windows(Kind::Session { gap: millis(gap) })
    }

    fn merges(&self) -> bool {
        matches!(self.0, Kind::Session { .. })
    }

    /// Shifts window starts by `offset` (e.g. to local midnight); sessions
    /// have none.
    pub fn with_offset(self, offset: Duration) -> Windows {
        let offset = i64::try_from(offset.as_millis()).unwrap_or(0);
        Windows(match self.0 {
            Kind::Session { gap } => Kind::Session { gap },
            Kind::Tumbling { size, .. } => Kind::Tumbling { size, offset },
            Kind::Sliding { size, slide, .. } => Kind::Sliding {
                size,
                slide,
                offset,
            },
        })
    }

    /// Calls `f` with each window `time` falls in, latest start first (a
    /// session: the window the record opens, before merging).
    pub fn assign(&self, time: i64, mut f: impl FnMut(TimeWindow)) {
        let (size, step, offset) = match self.0 {
            Kind::Session { gap } => {
                f(TimeWindow {
                    start: time,
                    end: time.saturating_add(gap),
                });
                return;
            }
            Kind::Tumbling { size, offset } => (size, size, offset),
            Kind::Sliding {
                size,
                slide,
                offset,
            } => (size, slide, offset),
        };
        // Flink's getWindowStartWithOffset, with a remainder that is never
        // negative (times before 1970 too). Near the ends of i64 a window
        // that cannot be represented is skipped.
        let Some(mut start) = time
            .checked_sub(offset)
            .map(|t| t.rem_euclid(step))
            .and_then(|rem| time.checked_sub(rem))
        else {
            return;
        };
        while start > time.saturating_sub(size) {
            f(TimeWindow {
                start,
                end: start.saturating_add(size),
            });
            match start.checked_sub(step) {
                Some(s) => start = s,
                None => return,
            }
        }
    }
}

/// What a window keeps and how its result is made (Flink's
/// `AggregateFunction` with the key and window a `ProcessWindowFunction`
/// would see).
pub(crate) struct Aggregation<K, T, A, U> {
    pub init: Arc<dyn Fn() -> A + Send + Sync>,
    pub add: Arc<AddFn<T, A>>,
    /// Folds the second into the first (session windows that merge).
    pub merge: Arc<MergeFn<A>>,
    pub result: Arc<ResultFn<K, A, U>>,
}

type AddFn<T, A> = dyn Fn(&mut A, T) + Send + Sync;
type MergeFn<A> = dyn Fn(&mut A, A) + Send + Sync;
type ResultFn<K, A, U> = dyn Fn(&K, &TimeWindow, &A) -> U + Send + Sync;

impl<K, T, A, U> Clone for Aggregation<K, T, A, U> {
    fn clone(&self) -> Self {
        Aggregation {
            init: self.init.clone(),
            add: self.add.clone(),
            merge: self.merge.clone(),
            result: self.result.clone(),
        }
    }
}

/// Timers of one subtask: (time, what) → the windows that wait for it.
/// At equal times a window fires before it is cleaned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Fire,
    Cleanup,
}

/// What a window of a key holds: its accumulator, and whether it fired
/// already (then a record within the allowed lateness fires it again at
/// once). The panes and the watermark are the operator's checkpointed
/// state; its timers follow from them.
#[derive(Serialize, Deserialize)]
pub(crate) struct Pane<A> {
    acc: A,
    fired: bool,
}

pub(crate) type Panes<K, A> = KeyedState<K, HashMap<TimeWindow, Pane<A>>>;

/// The window operator of one subtask.
pub(crate) struct WindowOp<K, T, A, U> {
    pub stage: String,
    pub key: Arc<dyn Fn(&T) -> K + Send + Sync>,
    pub windows: Windows,
    pub lateness: i64,
    pub agg: Aggregation<K, T, A, U>,
    pub state: Panes<K, A>,
    timers: BTreeMap<(i64, Timer), Vec<(K, TimeWindow)>>,
    watermark: i64,
    pub out: BoxOutput<U>,
    /// Late records, when someone takes them.
    pub late: Option<BoxOutput<T>>,
}

impl<K, T, A, U> WindowOp<K, T, A, U> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        stage: String,
        key: Arc<dyn Fn(&T) -> K + Send + Sync>,
        windows: Windows,
        lateness: i64,
        agg: Aggregation<K, T, A, U>,
        state: Panes<K, A>,
        out: BoxOutput<U>,
        late: Option<BoxOutput<T>>,
    ) -> Self {
        WindowOp {
            stage,
            key,
            windows,
            lateness,
            agg,
            state,
            timers: BTreeMap::new(),
            watermark: i64::MIN,
            out,
            late,
        }
    }
}

impl<K, T, A, U> WindowOp<K, T, A, U>
where
    K: Hash + Eq + Clone + Send,
    T: Clone + Send,
    A: Send,
    U: Send,
{
    /// The windows of `key` that `new` touches (Flink merges windows that
    /// overlap or meet) and the window covering them all.
    fn touching(&self, key: &K, new: TimeWindow) -> (TimeWindow, Vec<TimeWindow>) {
        let touched: Vec<TimeWindow> = self
            .state
            .get(key)
            .map(|m| {
                m.keys()
                    .filter(|w| w.start <= new.end && w.end >= new.start)
                    .copied()
                    .collect()
            })
            .unwrap_or_default();
        let cover = touched.iter().fold(new, |c, w| TimeWindow {
            start: c.start.min(w.start),
            end: c.end.max(w.end),
        });
        (cover, touched)
    }

    /// Fires `window` of `key`, if it still holds state.
    fn emit(&mut self, key: &K, window: &TimeWindow) -> Result<(), StreamError> {
        let value = match self.state.get_mut(key).and_then(|m| m.get_mut(window)) {
            Some(pane) => {
                pane.fired = true;
                (self.agg.result)(key, window, &pane.acc)
            }
            None => return Ok(()),
        };
        self.out.push(Record {
            value,
            time: Some(window.max_timestamp()),
        })
    }
}

impl<K, T, A, U> Output<T> for WindowOp<K, T, A, U>
where
    K: Hash + Eq + Clone + Send + StateData,
    T: Clone + Send,
    A: Send + StateData,
    U: Send,
{
    fn push(&mut self, record: Record<T>) -> Result<(), StreamError> {
        let Some(time) = record.time else {
            return Err(StreamError::NoEventTime {
                stage: self.stage.clone(),
            });
        };
        let key = (self.key)(&record.value);
        let mut windows = Vec::new();
        self.windows.assign(time, |w| windows.push(w));
        let wm = self.watermark;
        let mut skipped = true;
        for new in windows {
            // A session window covers every window of its key it touches.
            let (w, touched) = if self.windows.merges() {
                self.touching(&key, new)
            } else {
                (new, Vec::new())
            };
            if w.max_timestamp().saturating_add(self.lateness) <= wm {
                continue;
            }
            skipped = false;
            let per_key = match self.state.get_mut(&key) {
                Some(m) => m,
                None => {
                    self.state.insert(key.clone(), HashMap::new());
                    self.state
                        .get_mut(&key)
                        .ok_or_else(|| StreamError::InvalidJob("keyed state lost a key".into()))?
                }
            };
            let fresh = !per_key.contains_key(&w);
            if fresh {
                // The touched windows' state moves to the cover; their
                // timers find nothing when they come.
                let mut acc = (self.agg.init)();
                for t in touched {
                    if let Some(old) = per_key.remove(&t) {
                        (self.agg.merge)(&mut acc, old.acc);
                    }
                }
                per_key.insert(w, Pane { acc, fired: false });
            }
            let pane = per_key.entry(w).or_insert_with(|| Pane {
                acc: (self.agg.init)(),
                fired: false,
            });
            (self.agg.add)(&mut pane.acc, record.value.clone());
            // A window fired already fires again; a new one behind the
            // watermark (within the lateness) fires at once.
            if pane.fired || (fresh && w.max_timestamp() <= wm) {
                self.emit(&key, &w)?;
            } else if fresh {
                self.timers
                    .entry((w.max_timestamp(), Timer::Fire))
                    .or_default()
                    .push((key.clone(), w));
            }
            if fresh {
                let cleanup = w.max_timestamp().saturating_add(self.lateness);
                self.timers
                    .entry((cleanup, Timer::Cleanup))
                    .or_default()
                    .push((key.clone(), w));
            }
        }
        if skipped && time.saturating_add(self.lateness) <= wm {
            if let Some(late) = self.late.as_mut() {
                // The late stream may have no consumer: then records go nowhere.
                if late.push(record).is_err() {
                    self.late = None;
                }
            }
        }
        Ok(())
    }

    fn watermark(&mut self, watermark: i64) -> Result<(), StreamError> {
        if watermark > self.watermark {
            self.watermark = watermark;
            while let Some(entry) = self.timers.first_entry() {
                if entry.key().0 > watermark {
                    break;
                }
                let ((_, timer), due) = entry.remove_entry();
                for (key, window) in due {
                    match timer {
                        Timer::Fire => self.emit(&key, &window)?,
                        Timer::Cleanup => {
                            if let Some(m) = self.state.get_mut(&key) {
                                m.remove(&window);
                                if m.is_empty() {
                                    self.state.remove(&key);
                                }
                            }
                        }
                    }
                }
            }
        }
        if let Some(late) = self.late.as_mut() {
            if late.watermark(watermark).is_err() {
                self.late = None;
            }
        }
        self.out.watermark(watermark)
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        if let Some(late) = self.late.as_mut() {
            if late.flush().is_err() {
                self.late = None;
            }
        }
        self.out.flush()
    }

    fn finish(&mut self) -> Result<(), StreamError> {
        if let Some(late) = self.late.as_mut() {
            let _ = late.finish();
        }
        self.out.finish()
    }

    fn barrier(&mut self, cp: &mut Cursor<'_>) -> Result<(), StreamError> {
        let mut w = cp.writer();
        w.keyed("panes", &self.state);
        w.value("watermark", &self.watermark);
        cp.put(w)?;
        if let Some(late) = self.late.as_mut() {
            // The late stream's stage takes part in the checkpoint too.
            late.barrier(cp)?;
        }
        self.out.barrier(cp)
    }

    fn restore(&mut self, cp: &mut Cursor<'_>) -> Result<(), StreamError> {
        let r = cp.reader()?;
        r.keyed("panes", &mut self.state)?;
        if let Some(w) = r.least_watermark("watermark")? {
            self.watermark = w;
        }
        self.timers.clear();
        for (_, per_key) in self.state.groups() {
            for (key, panes) in per_key {
                for (window, pane) in panes {
                    if !pane.fired {
                        self.timers
                            .entry((window.max_timestamp(), Timer::Fire))
                            .or_default()
                            .push((key.clone(), *window));
                    }
                    let cleanup = window.max_timestamp().saturating_add(self.lateness);
                    self.timers
                        .entry((cleanup, Timer::Cleanup))
                        .or_default()
                        .push((key.clone(), *window));
                }
            }
        }
        self.out.restore(cp)
    }

    fn checkpoint_complete(&mut self, id: CheckpointId) -> Result<(), StreamError> {
        self.out.checkpoint_complete(id)
    }
}

/// A keyed stream cut into event-time windows (Flink's `WindowedStream`).
pub struct WindowedStream<K, T> {
    pub(crate) stream: crate::DataStream<T>,
    pub(crate) key: Arc<dyn Fn(&T) -> K + Send + Sync>,
    pub(crate) windows: Windows,
    pub(crate) lateness: i64,
    pub(crate) late: Option<crate::stream::SideOutput<T>>,
}

impl<K, T> WindowedStream<K, T>
where
    K: Hash + Eq + Clone + Send + StateData + 'static,
    T: Clone + Send + StateData + 'static,
{
    /// How long after a window fired records may still update it (default
    /// 0: a record behind the watermark is late).
    pub fn allowed_lateness(mut self, lateness: Duration) -> Self {
        self.lateness = i64::try_from(lateness.as_millis()).unwrap_or(i64::MAX);
        self
    }

    /// The records that came too late for every window they fall in (Flink's
    /// `sideOutputLateData`), from the window operator's subtasks. Give it a
    /// sink (a job with a stream that has none is refused); without it late
    /// records are dropped.
    pub fn late_data(&mut self) -> crate::DataStream<T> {
        let (side, stream) = self.stream.side_output("late data");
        self.late = Some(side);
        stream
    }

    /// Per key and window: `init()` when the window gets its first record,
    /// `add` for each record, `merge` when session windows merge (the
    /// second into the first), and `result` when it fires (Flink's
    /// `AggregateFunction`, with the key and window).
    pub fn aggregate<A, U>(
        self,
        init: impl Fn() -> A + Send + Sync + 'static,
        add: impl Fn(&mut A, T) + Send + Sync + 'static,
        merge: impl Fn(&mut A, A) + Send + Sync + 'static,
        result: impl Fn(&K, &TimeWindow, &A) -> U + Send + Sync + 'static,
    ) -> crate::DataStream<U>
    where
        A: Send + StateData + 'static,
        U: Send + 'static,
    {
        let agg = Aggregation {
            init: Arc::new(init),
            add: Arc::new(add),
            merge: Arc::new(merge),
            result: Arc::new(result),
        };
        let (key, windows, lateness, late) = (self.key, self.windows, self.lateness, self.late);
        let stage = self.stream.stage_name();
        self.stream.chain("window", move |info, out| {
            Box::new(WindowOp::new(
                stage.clone(),
                key.clone(),
                windows,
                lateness,
                agg.clone(),
                KeyedState::new(info.index, info.parallelism, info.max_parallelism),
                out,
                late.as_ref().map(|side| side.output(info)),
            ))
        })
    }

    /// Folds each window's records with `f` and emits (key, window, result).
    pub fn reduce(
        self,
        f: impl Fn(T, T) -> T + Send + Sync + 'static,
    ) -> crate::DataStream<(K, TimeWindow, T)> {
        let f = Arc::new(f);
        let g = f.clone();
        let fold = move |f: &dyn Fn(T, T) -> T, acc: &mut Option<T>, v: T| {
            *acc = Some(match acc.take() {
                Some(a) => f(a, v),
                None => v,
            })
        };
        self.aggregate(
            || None,
            move |acc: &mut Option<T>, v| fold(&*f, acc, v),
            move |acc: &mut Option<T>, other: Option<T>| {
                if let Some(v) = other {
                    fold(&*g, acc, v)
                }
            },
            |k: &K, w: &TimeWindow, acc: &Option<T>| acc.clone().map(|v| (k.clone(), *w, v)),
        )
        .flat_map(|r| r)
    }

    /// Calls `f` with all of a window's records when it fires (Flink's
    /// `ProcessWindowFunction`); it keeps them all until then.
    pub fn process<U, I>(
        self,
        f: impl Fn(&K, &TimeWindow, &[T]) -> I + Send + Sync + 'static,
    ) -> crate::DataStream<U>
    where
        U: Send + 'static,
        I: IntoIterator<Item = U> + 'static,
        I::IntoIter: Send,
    {
        self.aggregate(
            Vec::new,
            |acc: &mut Vec<T>, v| acc.push(v),
            |acc: &mut Vec<T>, other: Vec<T>| acc.extend(other),
            move |k: &K, w: &TimeWindow, all: &Vec<T>| f(k, w, all).into_iter().collect::<Vec<U>>(),
        )
        .flat_map(|v| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn windows_of(w: Windows, t: i64) -> Vec<(i64, i64)> {
        let mut v = Vec::new();
        w.assign(t, |w| v.push((w.start, w.end)));
        v
    }

    #[test]
    fn assignment_follows_flink() {
        let tumbling = Windows::tumbling(Duration::from_millis(10));
        assert_eq!(windows_of(tumbling, 0), vec![(0, 10)]);
        assert_eq!(windows_of(tumbling, 9), vec![(0, 10)]);
        assert_eq!(windows_of(tumbling, 10), vec![(10, 20)]);
        assert_eq!(windows_of(tumbling, -1), vec![(-10, 0)]);
        let shifted = tumbling.with_offset(Duration::from_millis(3));
        assert_eq!(windows_of(shifted, 2), vec![(-7, 3)]);
        let sliding = Windows::sliding(Duration::from_millis(10), Duration::from_millis(5));
        assert_eq!(windows_of(sliding, 12), vec![(10, 20), (5, 15)]);
        assert_eq!(windows_of(sliding, 10), vec![(10, 20), (5, 15)]);
        let uneven = Windows::sliding(Duration::from_millis(10), Duration::from_millis(3));
        assert_eq!(
            windows_of(uneven, 9),
            vec![(9, 19), (6, 16), (3, 13), (0, 10)]
        );
    }

    #[test]
    fn times_at_the_ends_of_i64_do_not_overflow() {
        let tumbling = Windows::tumbling(Duration::from_millis(10));
        let sliding = Windows::sliding(Duration::from_millis(10), Duration::from_millis(3));
        for w in [
            tumbling,
            sliding,
            Windows::session(Duration::from_millis(5)),
        ] {
            for t in [i64::MIN, i64::MIN + 3, i64::MAX - 3, i64::MAX] {
                for (start, end) in windows_of(w, t) {
                    // Ends saturate at i64::MAX.
                    assert!(
                        start <= t && (t < end || end == i64::MAX),
                        "{t}: {start}..{end}"
                    );
                }
            }
        }
        // A window that would start below i64::MIN is skipped, not wrapped.
        assert_eq!(windows_of(tumbling, i64::MIN + 3), Vec::<(i64, i64)>::new());
    }
}

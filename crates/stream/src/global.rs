//! Global windows: one window per key for all time, fired by a trigger and
//! trimmed by an evictor (Flink's `GlobalWindows` with a `Trigger` and an
//! `Evictor`, and the count windows built from them).
//!
//! - A key's window holds its records in arrival order.
//! - The trigger fires it: on the record that completes a count
//!   ([`Trigger::count`]), or when the watermark passes the next multiple
//!   of an interval ([`Trigger::every`], Flink's continuous event-time
//!   trigger, which also fires once more when the input ends). A purging
//!   trigger empties the window after it fired.
//! - An evictor removes records from the window before the function sees
//!   them (or after, [`Evictor::after`]): all but the last `n`
//!   ([`Evictor::count`]) or those more than a duration older than the
//!   window's newest ([`Evictor::time`]). Evicted records are gone.
//! - The function gets the key and the window's records; what it returns
//!   carries the largest event time among them (Flink stamps
//!   `Long.MAX_VALUE`, the global window's end, which no later event-time
//!   operator can use). An empty window does not fire.

use std::collections::{BTreeMap, HashSet};
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::checkpoint::{CheckpointId, Cursor};
use crate::keyed::KeyedState;
use crate::operator::{BoxOutput, Output};
use crate::{Record, StateData, StreamError, WATERMARK_END};

/// When a key's global window fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trigger {
    kind: TriggerKind,
    purge: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TriggerKind {
    Never,
    /// Every `n`-th record since the last firing.
    Count(u64),
    /// Each time the watermark passes the next multiple of the interval
    /// (ms) after the window's first record, and at the end of the input.
    EventTimeEvery(i64),
}

impl Trigger {
    /// Never fires: Flink's default for global windows, so a window of
    /// [`crate::KeyedStream::global_window`] needs [`GlobalWindowedStream::trigger`].
    pub fn never() -> Trigger {
        Trigger {
            kind: TriggerKind::Never,
            purge: false,
        }
    }

    /// Fires on every `n`-th record of a key since it last fired (Flink's
    /// `CountTrigger`); `n` is at least 1.
    pub fn count(n: u64) -> Trigger {
        Trigger {
            kind: TriggerKind::Count(n.max(1)),
            purge: false,
        }
    }

    /// Fires when the watermark passes each multiple of `interval` (ms since
    /// the epoch) following the time of a key's first record, and once
    /// more at the end of the input (Flink's `ContinuousEventTimeTrigger`).
    pub fn every(interval: Duration) -> Trigger {
        Trigger {
            kind: TriggerKind::EventTimeEvery(
                i64::try_from(interval.as_millis())
                    .unwrap_or(i64::MAX)
                    .max(1),
            ),
            purge: false,
        }
    }

    /// Empties the window each time it fires (Flink's `PurgingTrigger`).
    pub fn purging(self) -> Trigger {
        Trigger {
            purge: true,
            ..self
        }
    }
}

/// Which records a firing window drops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Evictor {
    kind: EvictorKind,
    after: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EvictorKind {
    /// Keeps the last `n`.
    Count(usize),
    /// Keeps the records whose time is within `ms` of the newest time.
    Time(i64),
}

impl Evictor {
    /// Keeps only the last `n` records of the window (Flink's `CountEvictor`).
    pub fn count(n: usize) -> Evictor {
        Evictor {
            kind: EvictorKind::Count(n),
            after: false,
        }
    }

    /// Keeps only the records whose event time is more than `span` after
    /// the window's newest time less `span` (Flink's `TimeEvictor`); records
    /// without a time are kept.
    pub fn time(span: Duration) -> Evictor {
        Evictor {
            kind: EvictorKind::Time(i64::try_from(span.as_millis()).unwrap_or(i64::MAX)),
            after: false,
        }
    }

    /// Evicts after the function ran instead of before (Flink's
    /// `doEvictAfter`).
    pub fn after(self) -> Evictor {
        Evictor {
            after: true,
            ..self
        }
    }

    fn evict<T>(&self, records: &mut Vec<Record<T>>) {
        match self.kind {
            EvictorKind::Count(n) => {
                let drop = records.len().saturating_sub(n);
                records.drain(..drop);
            }
            EvictorKind::Time(span) => {
                let Some(newest) = records.iter().filter_map(|r| r.time).max() else {
                    return;
                };
                let cutoff = newest.saturating_sub(span);
                records.retain(|r| r.time.is_none_or(|t| t > cutoff));
            }
        }
    }
}

/// A key's window: its records, the count since it last fired, and the
/// next firing time of an interval trigger.
#[derive(Serialize, Deserialize)]
pub(crate) struct GlobalPane<T> {
    records: Vec<Record<T>>,
    since_fire: u64,
    next_fire: Option<i64>,
}

type WindowFn<K, T, U> = dyn Fn(&K, &[T]) -> Vec<U> + Send + Sync;

/// The global window operator of one subtask.
pub(crate) struct GlobalWindowOp<K, T, U> {
    key: Arc<dyn Fn(&T) -> K + Send + Sync>,
    trigger: Trigger,
    evictor: Option<Evictor>,
    f: Arc<WindowFn<K, T, U>>,
    state: KeyedState<K, GlobalPane<T>>,
    /// Interval-trigger firing times → the keys due then.
    timers: BTreeMap<i64, HashSet<K>>,
    watermark: i64,
    out: BoxOutput<U>,
}

impl<K, T, U> GlobalWindowOp<K, T, U>
where
    K: Hash + Eq + Clone + Send,
    T: Clone + Send,
    U: Send,
{
    /// Fires `key`'s window: evicts, calls the function, emits, purges. A
    /// window left empty goes, timers and all: an empty window never fires,
    /// and the next record starts it again on the same grid of times.
    fn fire(&mut self, key: &K) -> Result<(), StreamError> {
        let Some(pane) = self.state.get_mut(key) else {
            return Ok(());
        };
        pane.since_fire = 0;
        if let Some(e) = self.evictor.filter(|e| !e.after) {
            e.evict(&mut pane.records);
        }
        let fired = if pane.records.is_empty() {
            None
        } else {
            let time = pane.records.iter().filter_map(|r| r.time).max();
            let values: Vec<T> = pane.records.iter().map(|r| r.value.clone()).collect();
            if let Some(e) = self.evictor.filter(|e| e.after) {
                e.evict(&mut pane.records);
            }
            if self.trigger.purge {
                pane.records.clear();
            }
            Some((time, values))
        };
        if pane.records.is_empty() {
            if let Some(at) = pane.next_fire {
                if let Some(keys) = self.timers.get_mut(&at) {
                    keys.remove(key);
                    if keys.is_empty() {
                        self.timers.remove(&at);
                    }
                }
            }
            self.state.remove(key);
        }
        if let Some((time, values)) = fired {
            for value in (self.f)(key, &values) {
                self.out.push(Record { value, time })?;
            }
        }
        Ok(())
    }

    fn schedule(&mut self, key: &K, at: i64) {
        self.timers.entry(at).or_default().insert(key.clone());
    }
}

impl<K, T, U> Output<T> for GlobalWindowOp<K, T, U>
where
    K: Hash + Eq + Clone + Send + StateData,
    T: Clone + Send + StateData,
    U: Send,
{
    fn push(&mut self, record: Record<T>) -> Result<(), StreamError> {
        let key = (self.key)(&record.value);
        let time = record.time;
        if self.state.get(&key).is_none() {
            self.state.insert(
                key.clone(),
                GlobalPane {
                    records: Vec::new(),
                    since_fire: 0,
                    next_fire: None,
                },
            );
        }
        let Some(pane) = self.state.get_mut(&key) else {
            return Err(StreamError::InvalidJob("keyed state lost a key".into()));
        };
        pane.records.push(record);
        pane.since_fire += 1;
        let mut schedule = None;
        let mut fire = false;
        match self.trigger.kind {
            TriggerKind::Never => {}
            TriggerKind::Count(n) => fire = pane.since_fire >= n,
            TriggerKind::EventTimeEvery(interval) => {
                // Flink's: the first multiple of the interval above the
                // record's time, registered once per firing round.
                if let (None, Some(t)) = (pane.next_fire, time) {
                    let at = t
                        .saturating_sub(t.rem_euclid(interval))
                        .saturating_add(interval);
                    pane.next_fire = Some(at);
                    schedule = Some(at);
                }
            }
        }
        if let Some(at) = schedule {
            self.schedule(&key, at);
        }
        if fire {
            self.fire(&key)?;
        }
        Ok(())
    }

    fn watermark(&mut self, watermark: i64) -> Result<(), StreamError> {
        if watermark > self.watermark {
            self.watermark = watermark;
            while let Some(entry) = self.timers.first_entry() {
                if *entry.key() > watermark {
                    break;
                }
                let (at, keys) = entry.remove_entry();
                for key in keys {
                    self.fire(&key)?;
                    let TriggerKind::EventTimeEvery(interval) = self.trigger.kind else {
                        continue;
                    };
                    // The next round on the same grid, the first one the
                    // watermark has not passed: a watermark that jumps far
                    // ahead fires a window once, not once per interval.
                    let rounds = watermark.saturating_sub(at) / interval + 1;
                    let next = at.saturating_add(rounds.saturating_mul(interval));
                    let live = watermark < WATERMARK_END && next < WATERMARK_END;
                    let Some(pane) = self.state.get_mut(&key) else {
                        continue;
                    };
                    pane.next_fire = live.then_some(next);
                    if live {
                        self.schedule(&key, next);
                    }
                }
            }
            if watermark == WATERMARK_END {
                if let TriggerKind::EventTimeEvery(_) = self.trigger.kind {
                    // The end of the input is the global window's end.
                    let keys: Vec<K> = self
                        .state
                        .groups()
                        .flat_map(|(_, m)| m.keys().cloned())
                        .collect();
                    for key in keys {
                        self.fire(&key)?;
                    }
                }
            }
        }
        self.out.watermark(watermark)
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        self.out.flush()
    }

    fn finish(&mut self) -> Result<(), StreamError> {
        self.out.finish()
    }

    fn barrier(&mut self, cp: &mut Cursor<'_>) -> Result<(), StreamError> {
        let mut w = cp.writer();
        w.keyed("global panes", &self.state);
        w.value("watermark", &self.watermark);
        cp.put(w)?;
        self.out.barrier(cp)
    }

    fn restore(&mut self, cp: &mut Cursor<'_>) -> Result<(), StreamError> {
        let r = cp.reader()?;
        r.keyed("global panes", &mut self.state)?;
        if let Some(w) = r.least_watermark("watermark")? {
            self.watermark = w;
        }
        self.timers.clear();
        let due: Vec<(K, i64)> = self
            .state
            .groups()
            .flat_map(|(_, m)| m.iter())
            .filter_map(|(k, pane)| pane.next_fire.map(|at| (k.clone(), at)))
            .collect();
        for (key, at) in due {
            self.schedule(&key, at);
        }
        self.out.restore(cp)
    }

    fn checkpoint_complete(&mut self, id: CheckpointId) -> Result<(), StreamError> {
        self.out.checkpoint_complete(id)
    }
}

/// A keyed stream in global windows (Flink's `WindowedStream` over
/// `GlobalWindows`): set the trigger and the evictor, then the function.
///
/// ```
/// use sluice_stream::StreamEnv;
///
/// let env = StreamEnv::new();
/// let sums = env
///     .from_iter(1..=7u32)
///     .key_by(|n| n % 2)
///     .count_window(2)
///     .reduce(|a, b| a + b)
///     .collect();
/// env.execute("count windows").unwrap();
/// let mut got = sums.take();
/// got.sort();
/// // Odd numbers: 1+3 and 5+7; even: 2+4, while 6 waits for a partner.
/// assert_eq!(got, vec![(0, 6), (1, 4), (1, 12)]);
/// ```
pub struct GlobalWindowedStream<K, T> {
    pub(crate) stream: crate::DataStream<T>,
    pub(crate) key: Arc<dyn Fn(&T) -> K + Send + Sync>,
    pub(crate) trigger: Trigger,
    pub(crate) evictor: Option<Evictor>,
}

impl<K, T> GlobalWindowedStream<K, T>
where
    K: Hash + Eq + Clone + Send + StateData + 'static,
    T: Clone + Send + StateData + 'static,
{
    pub fn trigger(mut self, trigger: Trigger) -> Self {
        self.trigger = trigger;
        self
    }

    pub fn evictor(mut self, evictor: Evictor) -> Self {
        self.evictor = Some(evictor);
        self
    }

    /// Calls `f` with a key's window contents, oldest first, each time the
    /// trigger fires (Flink's `ProcessWindowFunction` on a global window).
    pub fn process<U, I>(
        self,
        f: impl Fn(&K, &[T]) -> I + Send + Sync + 'static,
    ) -> crate::DataStream<U>
    where
        U: Send + 'static,
        I: IntoIterator<Item = U>,
    {
        let f: Arc<WindowFn<K, T, U>> = Arc::new(move |k, all| f(k, all).into_iter().collect());
        let (key, trigger, evictor) = (self.key, self.trigger, self.evictor);
        self.stream.chain("global window", move |info, out| {
            Box::new(GlobalWindowOp {
                key: key.clone(),
                trigger,
                evictor,
                f: f.clone(),
                state: KeyedState::new(info.index, info.parallelism, info.max_parallelism),
                timers: BTreeMap::new(),
                watermark: i64::MIN,
                out,
            })
        })
    }

    /// Folds a key's window contents with `f` each time the trigger fires,
    /// and emits (key, result).
    pub fn reduce(
        self,
        f: impl Fn(T, T) -> T + Send + Sync + 'static,
    ) -> crate::DataStream<(K, T)> {
        self.process(move |k: &K, all: &[T]| all.iter().cloned().reduce(&f).map(|v| (k.clone(), v)))
    }
}

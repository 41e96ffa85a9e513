//! Keyed process functions: per-record code with a key, event-time timers
//! and whatever keyed state the function keeps (Flink's
//! `KeyedProcessFunction`).

use std::collections::{BTreeMap, HashSet};
use std::hash::Hash;
use std::sync::Arc;

use crate::checkpoint::{CheckpointId, Cursor, StateReader, StateWriter};
use crate::keyed::KeyedState;
use crate::operator::{BoxOutput, Output};
use crate::{Record, StateData, StreamError};

/// A keyed operator with event-time timers. One instance runs in each
/// subtask and sees the keys of the key groups the subtask owns; keep
/// per-key state in a [`crate::KeyedState`] made from the subtask's
/// [`crate::SubtaskInfo`].
pub trait KeyedProcess<K, In, Out>: Send {
    fn process(&mut self, key: &K, record: Record<In>, ctx: &mut ProcessContext<'_, K, Out>);

    /// A timer of `key` registered for `time` is due: the watermark reached
    /// it. What is emitted here carries `time` as its event time.
    fn on_timer(&mut self, key: &K, time: i64, ctx: &mut ProcessContext<'_, K, Out>) {
        let _ = (key, time, ctx);
    }

    /// Writes the function's state into a checkpoint (its timers are the
    /// runtime's and are written with it). A function that keeps state
    /// writes its [`crate::KeyedState`]s here with [`StateWriter::keyed`]
    /// and takes them back in [`Self::restore`]; otherwise a restored job
    /// starts it empty.
    fn snapshot(&self, state: &mut StateWriter) {
        let _ = state;
    }

    /// Takes back the state of a checkpoint, before the first record: the
    /// key groups this subtask owns, whichever subtask wrote them.
    fn restore(&mut self, state: &StateReader) -> Result<(), StreamError> {
        let _ = state;
        Ok(())
    }
}

/// Event-time timers of one subtask: at most one per key and time (`set`
/// and `by_time` always hold the same ones).
struct Timers<K> {
    by_time: BTreeMap<i64, Vec<K>>,
    set: HashSet<(K, i64)>,
}

/// What a [`KeyedProcess`] can do while it handles a record or a timer.
pub struct ProcessContext<'a, K, Out> {
    out: &'a mut dyn Output<Out>,
    timers: &'a mut Timers<K>,
    key: &'a K,
    time: Option<i64>,
    watermark: i64,
    failed: Option<StreamError>,
}

impl<K: Hash + Eq + Clone, Out> ProcessContext<'_, K, Out> {
    /// Emits `value` at the event time of the record (or timer) handled.
    pub fn emit(&mut self, value: Out) {
        let time = self.time;
        self.emit_at(value, time);
    }

    pub fn emit_at(&mut self, value: Out, time: Option<i64>) {
        if self.failed.is_none() {
            if let Err(e) = self.out.push(Record { value, time }) {
                self.failed = Some(e);
            }
        }
    }

    /// Event time of the record handled (a timer's: its time).
    pub fn timestamp(&self) -> Option<i64> {
        self.time
    }

    /// The subtask's watermark (`i64::MIN` before the first).
    pub fn current_watermark(&self) -> i64 {
        self.watermark
    }

    /// Calls `on_timer` for the current key once the watermark reaches
    /// `time` (a time already reached: at the next watermark). Registering
    /// the same key and time again does nothing.
    pub fn register_event_time_timer(&mut self, time: i64) {
        if self.timers.set.insert((self.key.clone(), time)) {
            self.timers
                .by_time
                .entry(time)
                .or_default()
                .push(self.key.clone());
        }
    }

    /// Cancels the current key's timer for `time`, if any.
    pub fn delete_event_time_timer(&mut self, time: i64) {
        if self.timers.set.remove(&(self.key.clone(), time)) {
            if let Some(keys) = self.timers.by_time.get_mut(&time) {
                keys.retain(|k| k != self.key);
                if keys.is_empty() {
                    self.timers.by_time.remove(&time);
                }
            }
        }
    }
}

pub(crate) struct KeyedProcessLink<K, In, Out, P> {
    key_of: Arc<dyn Fn(&In) -> K + Send + Sync>,
    process: P,
    timers: Timers<K>,
    watermark: i64,
    out: BoxOutput<Out>,
}

impl<K, In, Out, P> KeyedProcessLink<K, In, Out, P> {
    pub fn new(
        key_of: Arc<dyn Fn(&In) -> K + Send + Sync>,
        process: P,
        out: BoxOutput<Out>,
    ) -> Self {
        KeyedProcessLink {
            key_of,
            process,
            timers: Timers {
                by_time: BTreeMap::new(),
                set: HashSet::new(),
            },
            watermark: i64::MIN,
            out,
        }
    }
}

impl<K, In, Out, P> KeyedProcessLink<K, In, Out, P>
where
    K: Hash + Eq + Clone + StateData,
{
    /// The timers, per key, as keyed state of the subtask.
    fn timers_by_key(&self, info: crate::SubtaskInfo) -> KeyedState<K, Vec<i64>> {
        let mut by_key: KeyedState<K, Vec<i64>> =
            KeyedState::new(info.index, info.parallelism, info.max_parallelism);
        for (key, time) in &self.timers.set {
            match by_key.get_mut(key) {
                Some(times) => times.push(*time),
                None => {
                    by_key.insert(key.clone(), vec![*time]);
                }
            }
        }
        by_key
    }

    fn add_timer(&mut self, key: K, time: i64) {
        if self.timers.set.insert((key.clone(), time)) {
            self.timers.by_time.entry(time).or_default().push(key);
        }
    }
}

impl<K, In, Out, P> Output<In> for KeyedProcessLink<K, In, Out, P>
where
    K: Hash + Eq + Clone + Send + StateData,
    In: Send,
    Out: Send,
    P: KeyedProcess<K, In, Out>,
{
    fn push(&mut self, record: Record<In>) -> Result<(), StreamError> {
        let key = (self.key_of)(&record.value);
        let mut ctx = ProcessContext {
            out: self.out.as_mut(),
            timers: &mut self.timers,
            key: &key,
            time: record.time,
            watermark: self.watermark,
            failed: None,
        };
        self.process.process(&key, record, &mut ctx);
        ctx.failed.map_or(Ok(()), Err)
    }

    fn watermark(&mut self, watermark: i64) -> Result<(), StreamError> {
        if watermark > self.watermark {
            self.watermark = watermark;
            // Timers registered by on_timer that are due fire in this pass.
            while let Some(entry) = self.timers.by_time.first_entry() {
                if *entry.key() > watermark {
                    break;
                }
                let (time, keys) = entry.remove_entry();
                for key in keys {
                    self.timers.set.remove(&(key.clone(), time));
                    let mut ctx = ProcessContext {
                        out: self.out.as_mut(),
                        timers: &mut self.timers,
                        key: &key,
                        time: Some(time),
                        watermark,
                        failed: None,
                    };
                    self.process.on_timer(&key, time, &mut ctx);
                    if let Some(e) = ctx.failed {
                        return Err(e);
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
        w.keyed("timers", &self.timers_by_key(cp.subtask_info()));
        w.value("watermark", &self.watermark);
        self.process.snapshot(&mut w);
        cp.put(w)?;
        self.out.barrier(cp)
    }

    fn restore(&mut self, cp: &mut Cursor<'_>) -> Result<(), StreamError> {
        let r = cp.reader()?;
        let info = cp.subtask_info();
        let mut by_key: KeyedState<K, Vec<i64>> =
            KeyedState::new(info.index, info.parallelism, info.max_parallelism);
        r.keyed("timers", &mut by_key)?;
        for (_, entries) in by_key.groups() {
            for (key, times) in entries {
                for time in times {
                    self.add_timer(key.clone(), *time);
                }
            }
        }
        if let Some(w) = r.least_watermark("watermark")? {
            self.watermark = w;
        }
        self.process.restore(&r)?;
        self.out.restore(cp)
    }

    fn checkpoint_complete(&mut self, id: CheckpointId) -> Result<(), StreamError> {
        self.out.checkpoint_complete(id)
    }
}

//! Keyed process functions: per-record code with a key, event-time and
//! processing-time timers and whatever keyed state the function keeps
//! (Flink's `KeyedProcessFunction`).

use std::collections::{BTreeMap, HashSet};
use std::hash::Hash;
use std::sync::Arc;

use crate::checkpoint::{CheckpointId, Cursor, StateReader, StateWriter};
use crate::keyed::KeyedState;
use crate::operator::{BoxOutput, Output};
use crate::{Record, StateData, StreamError};

/// A keyed operator with timers. One instance runs in each subtask and sees
/// the keys of the key groups the subtask owns; keep per-key state in a
/// [`crate::KeyedState`] made from the subtask's [`crate::SubtaskInfo`].
pub trait KeyedProcess<K, In, Out>: Send {
    fn process(&mut self, key: &K, record: Record<In>, ctx: &mut ProcessContext<'_, K, Out>);

    /// An event-time timer of `key` registered for `time` is due: the
    /// watermark reached it. What is emitted here carries `time` as its
    /// event time.
    fn on_timer(&mut self, key: &K, time: i64, ctx: &mut ProcessContext<'_, K, Out>) {
        let _ = (key, time, ctx);
    }

    /// A processing-time timer of `key` registered for `time` (ms since the
    /// epoch, wall clock) is due. What is emitted here has no event time
    /// unless given one, as in Flink.
    fn on_processing_timer(&mut self, key: &K, time: i64, ctx: &mut ProcessContext<'_, K, Out>) {
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

/// Timers of one time domain in one subtask: at most one per key and time
/// (`set` and `by_time` always hold the same ones).
struct Timers<K> {
    by_time: BTreeMap<i64, Vec<K>>,
    set: HashSet<(K, i64)>,
}

impl<K: Hash + Eq + Clone> Timers<K> {
    fn new() -> Timers<K> {
        Timers {
            by_time: BTreeMap::new(),
            set: HashSet::new(),
        }
    }

    fn register(&mut self, key: &K, time: i64) {
        if self.set.insert((key.clone(), time)) {
            self.by_time.entry(time).or_default().push(key.clone());
        }
    }

    fn delete(&mut self, key: &K, time: i64) {
        if self.set.remove(&(key.clone(), time)) {
            if let Some(keys) = self.by_time.get_mut(&time) {
                keys.retain(|k| k != key);
                if keys.is_empty() {
                    self.by_time.remove(&time);
                }
            }
        }
    }

    /// The earliest timer at or before `now`, taken out.
    fn pop_due(&mut self, now: i64) -> Option<(K, i64)> {
        let mut entry = self.by_time.first_entry()?;
        if *entry.key() > now {
            return None;
        }
        let time = *entry.key();
        let key = entry.get_mut().pop()?;
        if entry.get().is_empty() {
            entry.remove();
        }
        self.set.remove(&(key.clone(), time));
        Some((key, time))
    }

    /// The timers, per key, as keyed state of the subtask.
    fn by_key(&self, info: crate::SubtaskInfo) -> KeyedState<K, Vec<i64>> {
        let mut by_key: KeyedState<K, Vec<i64>> =
            KeyedState::new(info.index, info.parallelism, info.max_parallelism);
        for (key, time) in &self.set {
            match by_key.get_mut(key) {
                Some(times) => times.push(*time),
                None => {
                    by_key.insert(key.clone(), vec![*time]);
                }
            }
        }
        by_key
    }

    fn restore(&mut self, by_key: &KeyedState<K, Vec<i64>>) {
        for (_, entries) in by_key.groups() {
            for (key, times) in entries {
                for time in times {
                    self.register(key, *time);
                }
            }
        }
    }
}

/// Wall-clock time in ms since the epoch: the processing-time domain.
fn processing_time() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// What a [`KeyedProcess`] can do while it handles a record or a timer.
pub struct ProcessContext<'a, K, Out> {
    out: &'a mut dyn Output<Out>,
    event_timers: &'a mut Timers<K>,
    processing_timers: &'a mut Timers<K>,
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

    /// Event time of the record handled (an event-time timer's: its time;
    /// a processing-time timer's: none).
    pub fn timestamp(&self) -> Option<i64> {
        self.time
    }

    /// The subtask's watermark (`i64::MIN` before the first).
    pub fn current_watermark(&self) -> i64 {
        self.watermark
    }

    /// The wall clock, in ms since the epoch.
    pub fn current_processing_time(&self) -> i64 {
        processing_time()
    }

    /// Calls `on_timer` for the current key once the watermark reaches
    /// `time` (a time already reached: at the next watermark). Registering
    /// the same key and time again does nothing.
    pub fn register_event_time_timer(&mut self, time: i64) {
        self.event_timers.register(self.key, time);
    }

    /// Cancels the current key's event-time timer for `time`, if any.
    pub fn delete_event_time_timer(&mut self, time: i64) {
        self.event_timers.delete(self.key, time);
    }

    /// Calls `on_processing_timer` for the current key once the wall clock
    /// reaches `time` (checked after each input batch, and at least every
    /// 50 ms). Timers still pending when the input ends
    /// do not fire; they are part of checkpoints, and a restored job fires
    /// the ones that came due meanwhile at once.
    pub fn register_processing_time_timer(&mut self, time: i64) {
        self.processing_timers.register(self.key, time);
    }

    /// Cancels the current key's processing-time timer for `time`, if any.
    pub fn delete_processing_time_timer(&mut self, time: i64) {
        self.processing_timers.delete(self.key, time);
    }
}

pub(crate) struct KeyedProcessLink<K, In, Out, P> {
    key_of: Arc<dyn Fn(&In) -> K + Send + Sync>,
    process: P,
    event_timers: Timers<K>,
    processing_timers: Timers<K>,
    watermark: i64,
    out: BoxOutput<Out>,
}

impl<K: Hash + Eq + Clone, In, Out, P> KeyedProcessLink<K, In, Out, P> {
    pub fn new(
        key_of: Arc<dyn Fn(&In) -> K + Send + Sync>,
        process: P,
        out: BoxOutput<Out>,
    ) -> Self {
        KeyedProcessLink {
            key_of,
            process,
            event_timers: Timers::new(),
            processing_timers: Timers::new(),
            watermark: i64::MIN,
            out,
        }
    }
}

/// Which timers fire.
#[derive(Clone, Copy)]
enum Domain {
    EventTime,
    ProcessingTime,
}

impl<K, In, Out, P> KeyedProcessLink<K, In, Out, P>
where
    K: Hash + Eq + Clone,
    P: KeyedProcess<K, In, Out>,
{
    /// Fires every timer of `domain` due at `now`, earliest first; timers
    /// that the calls register and that are due too fire in the same pass.
    fn fire(&mut self, domain: Domain, now: i64) -> Result<(), StreamError> {
        loop {
            let due = match domain {
                Domain::EventTime => self.event_timers.pop_due(now),
                Domain::ProcessingTime => self.processing_timers.pop_due(now),
            };
            let Some((key, time)) = due else {
                return Ok(());
            };
            let mut ctx = ProcessContext {
                out: self.out.as_mut(),
                event_timers: &mut self.event_timers,
                processing_timers: &mut self.processing_timers,
                key: &key,
                time: match domain {
                    Domain::EventTime => Some(time),
                    Domain::ProcessingTime => None,
                },
                watermark: self.watermark,
                failed: None,
            };
            match domain {
                Domain::EventTime => self.process.on_timer(&key, time, &mut ctx),
                Domain::ProcessingTime => self.process.on_processing_timer(&key, time, &mut ctx),
            }
            if let Some(e) = ctx.failed {
                return Err(e);
            }
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
            event_timers: &mut self.event_timers,
            processing_timers: &mut self.processing_timers,
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
            self.fire(Domain::EventTime, watermark)?;
        }
        self.out.watermark(watermark)
    }

    /// After each input batch and on the input's idle ticks: the wall
    /// clock's timers fire here.
    fn flush(&mut self) -> Result<(), StreamError> {
        if !self.processing_timers.by_time.is_empty() {
            self.fire(Domain::ProcessingTime, processing_time())?;
        }
        self.out.flush()
    }

    fn finish(&mut self) -> Result<(), StreamError> {
        self.out.finish()
    }

    fn barrier(&mut self, cp: &mut Cursor<'_>) -> Result<(), StreamError> {
        let mut w = cp.writer();
        w.keyed("timers", &self.event_timers.by_key(cp.subtask_info()));
        w.keyed(
            "processing timers",
            &self.processing_timers.by_key(cp.subtask_info()),
        );
        w.value("watermark", &self.watermark);
        self.process.snapshot(&mut w);
        cp.put(w)?;
        self.out.barrier(cp)
    }

    fn restore(&mut self, cp: &mut Cursor<'_>) -> Result<(), StreamError> {
        let r = cp.reader()?;
        let info = cp.subtask_info();
        for (name, timers) in [
            ("timers", &mut self.event_timers),
            ("processing timers", &mut self.processing_timers),
        ] {
            let mut by_key = KeyedState::new(info.index, info.parallelism, info.max_parallelism);
            r.keyed(name, &mut by_key)?;
            timers.restore(&by_key);
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

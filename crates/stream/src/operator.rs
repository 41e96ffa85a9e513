//! Operators and sinks: what a stage's chain is made of. Each link owns the
//! next one and passes records to it by a call (operator chaining).

use std::hash::Hash;
use std::io::Write;
use std::sync::{Arc, Mutex};

use crate::checkpoint::{CheckpointId, Cursor, StateReader, StateWriter};
use crate::keyed::KeyedState;
use crate::{Record, StreamError};

/// The receiving end of one link of a chain.
pub(crate) trait Output<T>: Send {
    fn push(&mut self, record: Record<T>) -> Result<(), StreamError>;
    /// Event time has reached `watermark`: no record older follows.
    fn watermark(&mut self, watermark: i64) -> Result<(), StreamError>;
    /// The input batch ended: buffered records go on now (bounded latency).
    fn flush(&mut self) -> Result<(), StreamError>;
    /// The input ended; called once, after the watermark [`crate::WATERMARK_END`].
    fn finish(&mut self) -> Result<(), StreamError>;
    /// A checkpoint's barrier reached this link (on every input): it
    /// writes its state through the cursor, then passes the barrier on.
    fn barrier(&mut self, cp: &mut Cursor<'_>) -> Result<(), StreamError>;
    /// Before the first record: this link takes its state from the
    /// checkpoint the job restores, then the links after it.
    fn restore(&mut self, cp: &mut Cursor<'_>) -> Result<(), StreamError>;
    /// Checkpoint `id` is complete: what was staged for it may be committed.
    fn checkpoint_complete(&mut self, id: CheckpointId) -> Result<(), StreamError>;
}

pub(crate) type BoxOutput<T> = Box<dyn Output<T>>;

/// Where an [`Operator`] emits. Records emitted keep the event time of the
/// record being processed unless given another.
pub struct Collector<'a, T> {
    out: &'a mut dyn Output<T>,
    time: Option<i64>,
    failed: Option<StreamError>,
}

impl<T> Collector<'_, T> {
    /// Emits `value` with the event time of the record being processed.
    pub fn emit(&mut self, value: T) {
        let time = self.time;
        self.emit_record(Record { value, time });
    }

    /// Emits `value` with event time `time`.
    pub fn emit_at(&mut self, value: T, time: Option<i64>) {
        self.emit_record(Record { value, time });
    }

    pub fn emit_record(&mut self, record: Record<T>) {
        if self.failed.is_none() {
            if let Err(e) = self.out.push(record) {
                self.failed = Some(e);
            }
        }
    }

    /// Event time of the record being processed (None outside `process`).
    pub fn time(&self) -> Option<i64> {
        self.time
    }
}

/// A user-defined operator: the extension point every built-in one could
/// be written with (Arroyo's and Flink's operator shape). One instance runs
/// in each subtask.
pub trait Operator<In, Out>: Send {
    fn process(&mut self, record: Record<In>, out: &mut Collector<'_, Out>);

    /// Event time has reached `watermark` (timers and windows fire here).
    /// The watermark itself is passed on after this returns.
    fn on_watermark(&mut self, watermark: i64, out: &mut Collector<'_, Out>) {
        let _ = (watermark, out);
    }

    /// The input ended (after the watermark [`crate::WATERMARK_END`]).
    fn finish(&mut self, out: &mut Collector<'_, Out>) {
        let _ = out;
    }

    /// Writes the operator's state into a checkpoint. An operator that
    /// keeps state across records writes it here and takes it back in
    /// [`Self::restore`]; otherwise a restored job starts it empty.
    fn snapshot(&self, state: &mut StateWriter) {
        let _ = state;
    }

    /// Takes back the state of a checkpoint, before the first record.
    fn restore(&mut self, state: &StateReader) -> Result<(), StreamError> {
        let _ = state;
        Ok(())
    }
}

/// Runs an [`Operator`] as a link of the chain.
pub(crate) struct OperatorLink<In, Out, O> {
    pub op: O,
    pub out: BoxOutput<Out>,
    pub _types: std::marker::PhantomData<fn(In) -> Out>,
}

impl<In, Out, O: Operator<In, Out>> OperatorLink<In, Out, O> {
    fn with<R>(
        &mut self,
        time: Option<i64>,
        f: impl FnOnce(&mut O, &mut Collector<'_, Out>) -> R,
    ) -> Result<R, StreamError> {
        let mut c = Collector {
            out: self.out.as_mut(),
            time,
            failed: None,
        };
        let r = f(&mut self.op, &mut c);
        match c.failed {
            Some(e) => Err(e),
            None => Ok(r),
        }
    }
}

impl<In, Out, O> Output<In> for OperatorLink<In, Out, O>
where
    O: Operator<In, Out>,
    In: Send,
    Out: Send,
{
    fn push(&mut self, record: Record<In>) -> Result<(), StreamError> {
        self.with(record.time, |op, c| op.process(record, c))
    }

    fn watermark(&mut self, watermark: i64) -> Result<(), StreamError> {
        self.with(None, |op, c| op.on_watermark(watermark, c))?;
        self.out.watermark(watermark)
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        self.out.flush()
    }

    fn finish(&mut self) -> Result<(), StreamError> {
        self.with(None, |op, c| op.finish(c))?;
        self.out.finish()
    }

    fn barrier(&mut self, cp: &mut Cursor<'_>) -> Result<(), StreamError> {
        let mut w = cp.writer();
        self.op.snapshot(&mut w);
        cp.put(w)?;
        self.out.barrier(cp)
    }

    fn restore(&mut self, cp: &mut Cursor<'_>) -> Result<(), StreamError> {
        self.op.restore(&cp.reader()?)?;
        self.out.restore(cp)
    }

    fn checkpoint_complete(&mut self, id: CheckpointId) -> Result<(), StreamError> {
        self.out.checkpoint_complete(id)
    }
}

/// Forwards watermarks, flushes and the end to `out` (the links that only
/// transform records).
macro_rules! forward_control {
    () => {
        forward_flow!();
        forward_checkpoints!();
    };
}

/// Forwards watermarks, flushes and the end to `out`.
macro_rules! forward_flow {
    () => {
        fn watermark(&mut self, watermark: i64) -> Result<(), StreamError> {
            self.out.watermark(watermark)
        }
        fn flush(&mut self) -> Result<(), StreamError> {
            self.out.flush()
        }
        fn finish(&mut self) -> Result<(), StreamError> {
            self.out.finish()
        }
    };
}

/// Passes checkpoints on from a link without state.
macro_rules! forward_checkpoints {
    () => {
        fn barrier(&mut self, cp: &mut Cursor<'_>) -> Result<(), StreamError> {
            cp.skip();
            self.out.barrier(cp)
        }
        fn restore(&mut self, cp: &mut Cursor<'_>) -> Result<(), StreamError> {
            cp.skip();
            self.out.restore(cp)
        }
        fn checkpoint_complete(&mut self, id: CheckpointId) -> Result<(), StreamError> {
            self.out.checkpoint_complete(id)
        }
    };
}
pub(crate) use forward_checkpoints;

/// Checkpoints end at a link with nothing after it and no state.
macro_rules! end_checkpoints {
    () => {
        fn barrier(&mut self, cp: &mut Cursor<'_>) -> Result<(), StreamError> {
            cp.skip();
            Ok(())
        }
        fn restore(&mut self, cp: &mut Cursor<'_>) -> Result<(), StreamError> {
            cp.skip();
            Ok(())
        }
        fn checkpoint_complete(&mut self, _: CheckpointId) -> Result<(), StreamError> {
            Ok(())
        }
    };
}

pub(crate) struct Map<F, U> {
    pub f: Arc<F>,
    pub out: BoxOutput<U>,
}

impl<T, U: Send, F: Fn(T) -> U + Send + Sync> Output<T> for Map<F, U> {
    fn push(&mut self, r: Record<T>) -> Result<(), StreamError> {
        self.out.push(Record {
            value: (self.f)(r.value),
            time: r.time,
        })
    }
    forward_control!();
}

pub(crate) struct Filter<F, T> {
    pub f: Arc<F>,
    pub out: BoxOutput<T>,
}

impl<T: Send, F: Fn(&T) -> bool + Send + Sync> Output<T> for Filter<F, T> {
    fn push(&mut self, r: Record<T>) -> Result<(), StreamError> {
        if (self.f)(&r.value) {
            self.out.push(r)
        } else {
            Ok(())
        }
    }
    forward_control!();
}

pub(crate) struct FlatMap<F, U> {
    pub f: Arc<F>,
    pub out: BoxOutput<U>,
}

impl<T, U: Send, I, F> Output<T> for FlatMap<F, U>
where
    I: IntoIterator<Item = U>,
    F: Fn(T) -> I + Send + Sync,
{
    fn push(&mut self, r: Record<T>) -> Result<(), StreamError> {
        for value in (self.f)(r.value) {
            self.out.push(Record {
                value,
                time: r.time,
            })?;
        }
        Ok(())
    }
    forward_control!();
}

/// Flink's rolling reduce: each record is folded into its key's value,
/// which is emitted. The values are its checkpointed state.
pub(crate) struct Reduce<K, T, KF: ?Sized, F> {
    pub key: Arc<KF>,
    pub f: Arc<F>,
    pub state: KeyedState<K, T>,
    pub out: BoxOutput<T>,
}

impl<K, T, KF: ?Sized, F> Output<T> for Reduce<K, T, KF, F>
where
    K: Hash + Eq + Send + crate::StateData,
    T: Clone + Send + crate::StateData,
    KF: Fn(&T) -> K + Send + Sync,
    F: Fn(T, T) -> T + Send + Sync,
{
    fn push(&mut self, r: Record<T>) -> Result<(), StreamError> {
        let k = (self.key)(&r.value);
        let value = match self.state.remove(&k) {
            Some(acc) => (self.f)(acc, r.value),
            None => r.value,
        };
        self.state.insert(k, value.clone());
        self.out.push(Record {
            value,
            time: r.time,
        })
    }
    forward_flow!();
    fn barrier(&mut self, cp: &mut Cursor<'_>) -> Result<(), StreamError> {
        let mut w = cp.writer();
        w.keyed("reduce", &self.state);
        cp.put(w)?;
        self.out.barrier(cp)
    }
    fn restore(&mut self, cp: &mut Cursor<'_>) -> Result<(), StreamError> {
        cp.reader()?.keyed("reduce", &mut self.state)?;
        self.out.restore(cp)
    }
    fn checkpoint_complete(&mut self, id: CheckpointId) -> Result<(), StreamError> {
        self.out.checkpoint_complete(id)
    }
}

/// Calls a function for every record (the end of a chain).
pub(crate) struct ForEach<F> {
    pub f: F,
}

impl<T, F: FnMut(Record<T>) + Send> Output<T> for ForEach<F> {
    fn push(&mut self, r: Record<T>) -> Result<(), StreamError> {
        (self.f)(r);
        Ok(())
    }
    fn watermark(&mut self, _: i64) -> Result<(), StreamError> {
        Ok(())
    }
    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }
    fn finish(&mut self) -> Result<(), StreamError> {
        Ok(())
    }
    end_checkpoints!();
}

/// Writes each value on a line, prefixed with the subtask's number (from 1)
/// when the stage runs in parallel, as Flink's `print()` does.
pub(crate) struct Print<W> {
    pub prefix: String,
    pub to: Arc<Mutex<W>>,
    pub line: Vec<u8>,
}

impl<T: std::fmt::Display, W: Write + Send> Output<T> for Print<W> {
    fn push(&mut self, r: Record<T>) -> Result<(), StreamError> {
        // One line per record, written whole so subtasks do not interleave.
        let _ = writeln!(self.line, "{}{}", self.prefix, r.value);
        Ok(())
    }
    fn watermark(&mut self, _: i64) -> Result<(), StreamError> {
        Ok(())
    }
    fn flush(&mut self) -> Result<(), StreamError> {
        if !self.line.is_empty() {
            let mut w = self.to.lock().unwrap_or_else(|p| p.into_inner());
            let _ = w.write_all(&self.line);
            let _ = w.flush();
            self.line.clear();
        }
        Ok(())
    }
    fn finish(&mut self) -> Result<(), StreamError> {
        <Self as Output<T>>::flush(self)
    }
    end_checkpoints!();
}

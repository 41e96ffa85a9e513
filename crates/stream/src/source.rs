//! Sources: where records enter a job.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::operator::BoxOutput;
use crate::{Record, StreamError, WATERMARK_END};

/// Which parallel instance a subtask is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubtaskInfo {
    /// From 0.
    pub index: usize,
    pub parallelism: usize,
    pub max_parallelism: usize,
}

/// A source: one instance runs in each subtask of its stage and emits
/// through the context until it returns (a bounded source) or sees
/// [`SourceContext::is_cancelled`].
pub trait Source<T>: Send {
    fn run(&mut self, ctx: &mut SourceContext<'_, T>);
}

/// Where a [`Source`] emits. Records are passed on in batches: when
/// [`Self::flush`] is called (a source that waits for input calls it
/// before it waits) and every `batch` records.
pub struct SourceContext<'a, T> {
    out: &'a mut BoxOutput<T>,
    cancel: &'a AtomicBool,
    info: SubtaskInfo,
    pending: usize,
    batch: usize,
    failed: Option<StreamError>,
}

impl<'a, T> SourceContext<'a, T> {
    pub(crate) fn new(
        out: &'a mut BoxOutput<T>,
        info: SubtaskInfo,
        batch: usize,
        cancel: &'a AtomicBool,
    ) -> Self {
        SourceContext {
            out,
            cancel,
            info,
            pending: 0,
            batch,
            failed: None,
        }
    }

    /// Emits `value` without an event time.
    pub fn collect(&mut self, value: T) {
        self.collect_record(Record { value, time: None });
    }

    /// Emits `value` at event time `time` (ms).
    pub fn collect_at(&mut self, value: T, time: i64) {
        self.collect_record(Record {
            value,
            time: Some(time),
        });
    }

    pub fn collect_record(&mut self, record: Record<T>) {
        if self.is_cancelled() {
            return;
        }
        let r = self.out.push(record);
        self.note(r);
        self.pending += 1;
        if self.pending >= self.batch {
            self.flush();
        }
    }

    /// Promises that no record older than `watermark` follows from this
    /// subtask.
    pub fn emit_watermark(&mut self, watermark: i64) {
        if self.failed.is_none() {
            self.flush();
            let r = self.out.watermark(watermark);
            self.note(r);
        }
    }

    /// Passes on what was emitted since the last batch.
    pub fn flush(&mut self) {
        self.pending = 0;
        if self.failed.is_none() {
            let r = self.out.flush();
            self.note(r);
        }
    }

    /// Whether the job is stopping (a subtask failed): a source that runs
    /// forever returns when this turns true.
    pub fn is_cancelled(&mut self) -> bool {
        if self.failed.is_none() && self.cancel.load(Ordering::Relaxed) {
            self.failed = Some(StreamError::Cancelled {
                stage: "source".into(),
                subtask: self.info.index,
            });
        }
        self.failed.is_some()
    }

    pub fn subtask(&self) -> SubtaskInfo {
        self.info
    }

    fn note(&mut self, r: Result<(), StreamError>) {
        if let Err(e) = r {
            self.failed.get_or_insert(e);
        }
    }

    /// The source returned: the end of its input.
    pub(crate) fn end(mut self) -> Result<(), StreamError> {
        self.emit_watermark(WATERMARK_END);
        self.flush();
        if self.failed.is_none() {
            let r = self.out.finish();
            self.note(r);
        }
        match self.failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// A collection, emitted by one subtask in order.
pub(crate) struct IterSource<I> {
    pub iter: Option<I>,
}

impl<T, I: Iterator<Item = T> + Send> Source<T> for IterSource<I> {
    fn run(&mut self, ctx: &mut SourceContext<'_, T>) {
        for value in self.iter.take().into_iter().flatten() {
            if ctx.is_cancelled() {
                return;
            }
            ctx.collect(value);
        }
    }
}

/// Values made from their sequence number: subtask `i` of `p` makes
/// numbers `i`, `i + p`, `i + 2p`, ... below `count` (forever when none).
pub(crate) struct Generator<F> {
    pub count: Option<u64>,
    pub make: std::sync::Arc<F>,
}

impl<T, F: Fn(u64) -> T + Send + Sync> Source<T> for Generator<F> {
    fn run(&mut self, ctx: &mut SourceContext<'_, T>) {
        let info = ctx.subtask();
        let step = info.parallelism.max(1) as u64;
        let mut n = info.index as u64;
        while self.count.is_none_or(|c| n < c) && !ctx.is_cancelled() {
            ctx.collect((self.make)(n));
            n += step;
        }
    }
}

//! Sources: where records enter a job.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::checkpoint::{Cursor, StateReader, StateWriter};
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

/// Whether a source has more to emit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceStatus {
    More,
    /// The input ended (a bounded source): the subtask finishes.
    Ended,
}

/// A source: one instance runs in each subtask of its stage. The subtask
/// calls [`Self::poll`] until it returns [`SourceStatus::Ended`]; between
/// two polls a checkpoint may take the source's position
/// ([`Self::snapshot`]), so a poll should return after a batch or a short
/// wait (at most about 100 ms), not hold on to the thread.
pub trait Source<T>: Send {
    /// Emits what comes next through the context.
    fn poll(&mut self, ctx: &mut SourceContext<'_, T>) -> SourceStatus;

    /// Writes the source's position: everything emitted so far is before
    /// it. A source that writes none starts again from its beginning when
    /// the job restores (at-least-once).
    fn snapshot(&mut self, state: &mut StateWriter) {
        let _ = state;
    }

    /// Takes back the position of a checkpoint, before the first poll. The
    /// parallelism may differ from the run that wrote it: the reader has
    /// every subtask's positions ([`StateReader::values`]).
    fn restore(&mut self, state: &StateReader) -> Result<(), StreamError> {
        let _ = state;
        Ok(())
    }
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
    metrics: &'a crate::metrics::SubtaskMetrics,
}

impl<'a, T> SourceContext<'a, T> {
    pub(crate) fn new(
        out: &'a mut BoxOutput<T>,
        info: SubtaskInfo,
        batch: usize,
        cancel: &'a AtomicBool,
        metrics: &'a crate::metrics::SubtaskMetrics,
    ) -> Self {
        SourceContext {
            out,
            cancel,
            info,
            pending: 0,
            batch,
            failed: None,
            metrics,
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
            self.metrics.set_watermark(watermark);
            let r = self.out.watermark(watermark);
            self.note(r);
        }
    }

    /// Passes on what was emitted since the last batch.
    pub fn flush(&mut self) {
        self.metrics.add_in(self.pending);
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

    /// Fails the job with `error` (the source then returns).
    pub fn fail(&mut self, error: StreamError) {
        self.failed.get_or_insert(error);
    }

    pub fn subtask(&self) -> SubtaskInfo {
        self.info
    }

    /// A checkpoint's barrier goes out after what was emitted so far.
    pub(crate) fn barrier(&mut self, cp: &mut Cursor<'_>) -> Result<(), StreamError> {
        self.flush();
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        self.out.barrier(cp)
    }

    pub(crate) fn output(&mut self) -> &mut BoxOutput<T> {
        self.out
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

/// Records a source emits per poll, at most, when it has them at hand.
pub(crate) const POLL_BATCH: usize = 1024;

/// A collection, emitted by one subtask in order. Its position is the
/// number of items emitted.
pub(crate) struct IterSource<I> {
    pub iter: Option<I>,
    pub emitted: u64,
}

impl<T, I: Iterator<Item = T> + Send> Source<T> for IterSource<I> {
    fn poll(&mut self, ctx: &mut SourceContext<'_, T>) -> SourceStatus {
        let Some(iter) = self.iter.as_mut() else {
            return SourceStatus::Ended;
        };
        for _ in 0..POLL_BATCH {
            match iter.next() {
                Some(value) => {
                    ctx.collect(value);
                    self.emitted += 1;
                }
                None => return SourceStatus::Ended,
            }
        }
        SourceStatus::More
    }

    fn snapshot(&mut self, state: &mut StateWriter) {
        state.value("emitted", &self.emitted);
    }

    fn restore(&mut self, state: &StateReader) -> Result<(), StreamError> {
        let emitted: u64 = state.own("emitted")?.unwrap_or(0);
        if let Some(iter) = self.iter.as_mut() {
            for _ in 0..emitted {
                iter.next();
            }
        }
        self.emitted = emitted;
        Ok(())
    }
}

/// Values made from their sequence number: subtask `i` of `p` makes
/// numbers `i`, `i + p`, `i + 2p`, ... below `count` (forever when none).
/// Its position is the next number.
pub(crate) struct Generator<F> {
    pub count: Option<u64>,
    pub make: std::sync::Arc<F>,
    pub next: u64,
    pub step: u64,
}

impl<T, F: Fn(u64) -> T + Send + Sync> Source<T> for Generator<F> {
    fn poll(&mut self, ctx: &mut SourceContext<'_, T>) -> SourceStatus {
        for _ in 0..POLL_BATCH {
            if self.count.is_some_and(|c| self.next >= c) {
                return SourceStatus::Ended;
            }
            ctx.collect((self.make)(self.next));
            self.next += self.step;
        }
        SourceStatus::More
    }

    fn snapshot(&mut self, state: &mut StateWriter) {
        state.value("next", &self.next);
    }

    // The numbers left to make depend on the parallelism: it cannot change.
    fn restore(&mut self, state: &StateReader) -> Result<(), StreamError> {
        if let Some(next) = state.own("next")? {
            self.next = next;
        }
        Ok(())
    }
}

/// Runs a source subtask: restores it, polls it until it ends, and puts
/// checkpoint barriers between polls.
pub(crate) fn run_source<T, S: Source<T>>(
    source: &mut S,
    rt: &crate::env::TaskRuntime,
    out: &mut BoxOutput<T>,
    batch: usize,
) -> Result<(), StreamError> {
    // The source's own state is the first link of its stage.
    if let Some(mut cp) = rt.restoring_cursor()? {
        source.restore(&cp.reader()?)?;
        out.restore(&mut cp)?;
    }
    let mut requested = rt.requested();
    let mut completed = rt.completed();
    let mut ctx = SourceContext::new(out, rt.info, batch, &rt.cancel, &rt.metrics);
    let mut flushed = std::time::Instant::now();
    loop {
        if ctx.is_cancelled() {
            break;
        }
        if let Some(id) = rt.newly_completed(&mut completed) {
            let r = ctx.output().checkpoint_complete(id);
            ctx.note(r);
            let r = rt.checkpoint_complete(id);
            ctx.note(r);
        }
        let now = rt.requested();
        if now > requested {
            requested = now;
            if let Some(mut cp) = rt.cursor(now) {
                let mut w = cp.writer();
                source.snapshot(&mut w);
                cp.put(w)?;
                ctx.barrier(&mut cp)?;
                rt.log_state(&mut cp)?;
                rt.shared.ack(now);
            }
        }
        if source.poll(&mut ctx) == SourceStatus::Ended {
            break;
        }
        // A quiet source still lets its chain act on the clock (async
        // results, processing-time timers) at the receivers' pace.
        if flushed.elapsed() >= crate::exchange::CANCEL_CHECK {
            ctx.flush();
            flushed = std::time::Instant::now();
        }
    }
    ctx.end()?;
    if let Some(mut cp) = rt.final_cursor() {
        let mut w = cp.writer();
        source.snapshot(&mut w);
        cp.put(w)?;
        out.barrier(&mut cp)?;
        rt.log_state(&mut cp)?;
    }
    Ok(())
}

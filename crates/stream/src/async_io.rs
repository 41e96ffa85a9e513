//! Async I/O (Flink's `AsyncDataStream`): a link that calls an async function
//! for each record, with up to `capacity` calls in flight, and emits their
//! results in input order or as they complete.
//!
//! The calls run on the job's async runtime (a small Tokio pool shared by every
//! async link of the job); the subtask's thread only starts them and emits what
//! they return, so it never waits on one call while others could go on.
//!
//! - **Order.** [`AsyncOrder::Ordered`] emits results in input order.
//!   [`AsyncOrder::Unordered`] emits each as soon as it is there, but never
//!   across a watermark: results of records before a watermark go out before
//!   it, those of records after it go out after it, so no result is late that
//!   was not late as input (Flink's rule).
//! - **Capacity.** Calls in flight and results not yet emitted count; at the
//!   capacity the subtask waits for one to free, which backpressures the input.
//! - **Timeout and errors.** A call that fails or takes longer than the
//!   timeout fails the job (Flink's default), which then restores its last
//!   checkpoint.
//! - **Checkpoints.** A barrier waits for the calls in flight (each at most
//!   the timeout) and goes on after their results, so the link has no state
//!   to write. Flink instead writes the inputs in flight into the checkpoint
//!   and calls again on restore, dealing them out round robin at another
//!   parallelism; that sends a key's restored records through another
//!   subtask than its new ones, which reorders them and breaks the promise
//!   that a restored run's output is a failure-free run's.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Display;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Duration;

use crate::checkpoint::{CheckpointId, Cursor};
use crate::operator::{BoxOutput, Output};
use crate::{Record, StreamError, SubtaskInfo};

/// In which order an async link emits results.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AsyncOrder {
    /// In the order of the records that asked for them.
    Ordered,
    /// As they complete, between the same watermarks as their records.
    Unordered,
}

/// How an async link runs its calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AsyncOptions {
    pub order: AsyncOrder,
    /// Calls in flight (and results not yet emitted) at most, per subtask.
    pub capacity: usize,
    /// Longest a call may take before it fails the job.
    pub timeout: Duration,
}

impl AsyncOptions {
    /// Results in input order (Flink's `orderedWait`).
    pub fn ordered(capacity: usize, timeout: Duration) -> AsyncOptions {
        AsyncOptions {
            order: AsyncOrder::Ordered,
            capacity,
            timeout,
        }
    }

    /// Results as they complete (Flink's `unorderedWait`).
    pub fn unordered(capacity: usize, timeout: Duration) -> AsyncOptions {
        AsyncOptions {
            order: AsyncOrder::Unordered,
            capacity,
            timeout,
        }
    }
}

/// The Tokio pool a job's async calls run on, shut down without waiting when
/// the job's last async link is gone (dropping a runtime from inside another
/// one would panic).
pub(crate) struct AsyncRuntime(Option<tokio::runtime::Runtime>);

impl AsyncRuntime {
    pub(crate) fn start() -> Result<AsyncRuntime, StreamError> {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("sluice-stream-async")
            .enable_all()
            .build()
            .map(|rt| AsyncRuntime(Some(rt)))
            .map_err(|e| StreamError::Spawn {
                stage: "async I/O".into(),
                message: e.to_string(),
            })
    }

    /// A pool that runs nothing, for a job that is invalid anyway.
    pub(crate) fn none() -> AsyncRuntime {
        AsyncRuntime(None)
    }

    fn handle(&self) -> Option<&tokio::runtime::Handle> {
        self.0.as_ref().map(tokio::runtime::Runtime::handle)
    }
}

impl Drop for AsyncRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// How often a subtask waiting for a call looks whether the job stopped, and
/// passes on the results it emitted meanwhile.
const WAIT_SLICE: Duration = Duration::from_millis(50);

type Completion<U> = (u64, Result<Vec<U>, String>);

/// Reports a call's end however it ends: with its result, or, when the task
/// is dropped without one (the user's future panicked), as a failure. A
/// call that never reported would leave its subtask waiting for ever.
struct Report<U> {
    seq: u64,
    done: Sender<Completion<U>>,
    sent: bool,
}

impl<U> Report<U> {
    fn send(mut self, result: Result<Vec<U>, String>) {
        self.sent = true;
        // The link is gone when the job failed: nobody waits for this.
        let _ = self.done.send((self.seq, result));
    }
}

impl<U> Drop for Report<U> {
    fn drop(&mut self) {
        if !self.sent {
            let _ = self
                .done
                .send((self.seq, Err("async call panicked".to_owned())));
        }
    }
}

/// One record whose call has been started and whose result is not emitted.
struct InFlight<U> {
    /// The record's event time, which its results carry.
    time: Option<i64>,
    result: Option<Vec<U>>,
    abort: tokio::task::AbortHandle,
}

/// Records between two watermarks, by sequence number, and the watermark
/// that closes them (none yet for the last one).
struct Segment {
    seqs: std::collections::BTreeSet<u64>,
    watermark: Option<i64>,
}

impl Segment {
    fn open() -> Segment {
        Segment {
            seqs: Default::default(),
            watermark: None,
        }
    }
}

pub(crate) struct AsyncLink<T, U, F> {
    pub(crate) f: Arc<F>,
    pub(crate) runtime: Arc<AsyncRuntime>,
    /// The job's stop flag: a subtask waiting for calls stops at it.
    pub(crate) cancel: Arc<AtomicBool>,
    pub(crate) options: AsyncOptions,
    pub(crate) stage: String,
    pub(crate) info: SubtaskInfo,
    pub(crate) out: BoxOutput<U>,
    next_seq: u64,
    in_flight: BTreeMap<u64, InFlight<U>>,
    /// Never empty: the last segment is the open one.
    segments: VecDeque<Segment>,
    done_tx: Sender<Completion<U>>,
    done_rx: Receiver<Completion<U>>,
    _input: std::marker::PhantomData<fn(T)>,
}

impl<T, U, F> AsyncLink<T, U, F> {
    pub(crate) fn new(
        f: Arc<F>,
        (runtime, cancel): (Arc<AsyncRuntime>, Arc<AtomicBool>),
        options: AsyncOptions,
        stage: String,
        info: SubtaskInfo,
        out: BoxOutput<U>,
    ) -> AsyncLink<T, U, F> {
        let (done_tx, done_rx) = channel();
        AsyncLink {
            f,
            runtime,
            cancel,
            options,
            stage,
            info,
            out,
            next_seq: 0,
            in_flight: BTreeMap::new(),
            segments: VecDeque::from([Segment::open()]),
            done_tx,
            done_rx,
            _input: std::marker::PhantomData,
        }
    }
}

impl<T, U, F, Fut, I, E> AsyncLink<T, U, F>
where
    T: Send + 'static,
    U: Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<I, E>> + Send + 'static,
    I: IntoIterator<Item = U>,
    E: Display,
{
    fn failed(&self, message: String) -> StreamError {
        StreamError::SubtaskFailed {
            stage: self.stage.clone(),
            subtask: self.info.index,
            message,
        }
    }

    /// Starts the call for `input`, first waiting for room under the capacity.
    fn start(&mut self, input: Record<T>) -> Result<(), StreamError> {
        while self.in_flight.len() >= self.options.capacity.max(1) {
            self.wait_one()?;
        }
        let Some(handle) = self.runtime.handle() else {
            return Err(self.failed("the async runtime is gone".into()));
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let call = (self.f)(input.value);
        let timeout = self.options.timeout;
        let report = Report {
            seq,
            done: self.done_tx.clone(),
            sent: false,
        };
        let task = handle.spawn(async move {
            let result = match tokio::time::timeout(timeout, call).await {
                Ok(Ok(values)) => Ok(values.into_iter().collect()),
                Ok(Err(e)) => Err(format!("async call failed: {e}")),
                Err(_) => Err(format!("async call timed out after {timeout:?}")),
            };
            report.send(result);
        });
        self.in_flight.insert(
            seq,
            InFlight {
                time: input.time,
                result: None,
                abort: task.abort_handle(),
            },
        );
        if let Some(open) = self.segments.back_mut() {
            open.seqs.insert(seq);
        }
        Ok(())
    }

    fn complete(&mut self, (seq, result): Completion<U>) -> Result<(), StreamError> {
        let values = result.map_err(|e| self.failed(e))?;
        if let Some(entry) = self.in_flight.get_mut(&seq) {
            entry.result = Some(values);
        }
        Ok(())
    }

    /// Takes the completions that are there, without waiting, and emits what
    /// may go out.
    fn drain(&mut self) -> Result<(), StreamError> {
        while let Ok(done) = self.done_rx.try_recv() {
            self.complete(done)?;
        }
        self.emit_ready()
    }

    /// Waits for every call in flight and emits all results and the
    /// watermarks held back behind them.
    fn complete_all(&mut self) -> Result<(), StreamError> {
        while !self.in_flight.is_empty() {
            self.wait_one()?;
        }
        self.emit_ready()
    }

    /// Waits for at least one call to complete, then emits what may go out.
    fn wait_one(&mut self) -> Result<(), StreamError> {
        let before = self.in_flight.len();
        loop {
            match self.done_rx.recv_timeout(WAIT_SLICE) {
                Ok(done) => {
                    self.complete(done)?;
                    self.drain()?;
                    if self.in_flight.len() < before {
                        return Ok(());
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    if self.cancel.load(Ordering::SeqCst) {
                        return Err(StreamError::Cancelled {
                            stage: self.stage.clone(),
                            subtask: self.info.index,
                        });
                    }
                    // A long wait: what was emitted before it goes on now.
                    self.out.flush()?;
                }
                // The link holds a sender itself: this does not happen.
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.failed("async completions closed".into()))
                }
            }
        }
    }

    /// Emits the results that may go out, and the watermarks whose records
    /// have all gone out.
    fn emit_ready(&mut self) -> Result<(), StreamError> {
        loop {
            let Some(first) = self.segments.front_mut() else {
                return Ok(());
            };
            let ready: Vec<u64> = match self.options.order {
                AsyncOrder::Ordered => first
                    .seqs
                    .iter()
                    .take_while(|s| self.in_flight.get(s).is_some_and(|e| e.result.is_some()))
                    .copied()
                    .collect(),
                AsyncOrder::Unordered => first
                    .seqs
                    .iter()
                    .filter(|s| self.in_flight.get(s).is_some_and(|e| e.result.is_some()))
                    .copied()
                    .collect(),
            };
            for seq in ready {
                first.seqs.remove(&seq);
                if let Some(entry) = self.in_flight.remove(&seq) {
                    let time = entry.time;
                    for value in entry.result.into_iter().flatten() {
                        self.out.push(Record { value, time })?;
                    }
                }
            }
            let Some(first) = self.segments.front() else {
                return Ok(());
            };
            match first.watermark {
                Some(watermark) if first.seqs.is_empty() => {
                    self.segments.pop_front();
                    if self.segments.is_empty() {
                        self.segments.push_back(Segment::open());
                    }
                    self.out.watermark(watermark)?;
                }
                _ => return Ok(()),
            }
        }
    }
}

impl<T, U, F, Fut, I, E> Output<T> for AsyncLink<T, U, F>
where
    T: Send + 'static,
    U: Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<I, E>> + Send + 'static,
    I: IntoIterator<Item = U>,
    E: Display,
{
    fn push(&mut self, record: Record<T>) -> Result<(), StreamError> {
        self.start(record)?;
        self.drain()
    }

    fn watermark(&mut self, watermark: i64) -> Result<(), StreamError> {
        self.drain()?;
        if self.in_flight.is_empty() {
            return self.out.watermark(watermark);
        }
        let n = self.segments.len();
        let open_is_empty = self.segments.back().is_some_and(|s| s.seqs.is_empty());
        match self.segments.get_mut(n.wrapping_sub(2)) {
            // No record since the last watermark held back: this one replaces it.
            Some(closed) if open_is_empty => closed.watermark = Some(watermark),
            _ => {
                if let Some(open) = self.segments.back_mut() {
                    open.watermark = Some(watermark);
                }
                self.segments.push_back(Segment::open());
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        self.drain()?;
        self.out.flush()
    }

    fn finish(&mut self) -> Result<(), StreamError> {
        self.complete_all()?;
        self.out.finish()
    }

    fn barrier(&mut self, cp: &mut Cursor<'_>) -> Result<(), StreamError> {
        self.complete_all()?;
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
}

impl<T, U, F> Drop for AsyncLink<T, U, F> {
    fn drop(&mut self) {
        for entry in self.in_flight.values() {
            entry.abort.abort();
        }
    }
}

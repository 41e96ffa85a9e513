//! Exchanges: where one stage's subtasks send to the next stage's over
//! bounded channels, and where those merge their inputs again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::operator::{BoxOutput, Output};
use crate::{Record, StreamError, WATERMARK_END};

/// What travels on a channel.
pub(crate) enum Message<T> {
    Records(Vec<Record<T>>),
    Watermark(i64),
    /// The sending subtask ended.
    End,
}

/// A message and the number of the upstream subtask that sent it.
pub(crate) type Envelope<T> = (usize, Message<T>);

/// How records pick a downstream subtask.
pub(crate) enum Partitioning<T> {
    /// Batches go to the subtasks in turn.
    RoundRobin,
    /// By key group: the function gives a record's key group; the
    /// downstream subtask is the one that owns it.
    KeyGroups {
        group_of: Arc<dyn Fn(&T) -> usize + Send + Sync>,
        max_parallelism: usize,
    },
}

/// The end of an upstream subtask's chain: buffers records per downstream
/// subtask and sends them in batches. A full channel blocks the sender,
/// and with it the whole upstream chain: backpressure.
pub(crate) struct ExchangeSender<T> {
    pub stage: String,
    pub me: usize,
    pub targets: Vec<SyncSender<Envelope<T>>>,
    pub partitioning: Partitioning<T>,
    pub buffers: Vec<Vec<Record<T>>>,
    pub batch: usize,
    pub next: usize,
}

impl<T: Send> ExchangeSender<T> {
    fn send(&self, to: usize, m: Message<T>) -> Result<(), StreamError> {
        let gone = || StreamError::DownstreamGone {
            stage: self.stage.clone(),
        };
        self.targets.get(to).ok_or_else(gone)?;
        self.targets[to].send((self.me, m)).map_err(|_| gone())
    }

    fn send_buffer(&mut self, to: usize) -> Result<(), StreamError> {
        let full = std::mem::replace(&mut self.buffers[to], Vec::with_capacity(self.batch));
        self.send(to, Message::Records(full))
    }

    fn broadcast(&mut self, m: impl Fn() -> Message<T>) -> Result<(), StreamError> {
        self.send_all()?;
        for to in 0..self.targets.len() {
            self.send(to, m())?;
        }
        Ok(())
    }

    fn send_all(&mut self) -> Result<(), StreamError> {
        for to in 0..self.buffers.len() {
            if !self.buffers[to].is_empty() {
                self.send_buffer(to)?;
            }
        }
        Ok(())
    }
}

impl<T: Send> Output<T> for ExchangeSender<T> {
    fn push(&mut self, record: Record<T>) -> Result<(), StreamError> {
        let n = self.targets.len();
        let to = match &self.partitioning {
            Partitioning::RoundRobin => self.next,
            Partitioning::KeyGroups {
                group_of,
                max_parallelism,
            } => crate::keyed::subtask_for_key_group(group_of(&record.value), n, *max_parallelism),
        }
        .min(n.saturating_sub(1));
        self.buffers[to].push(record);
        if self.buffers[to].len() >= self.batch {
            self.send_buffer(to)?;
            if matches!(self.partitioning, Partitioning::RoundRobin) {
                self.next = (self.next + 1) % n;
            }
        }
        Ok(())
    }

    fn watermark(&mut self, watermark: i64) -> Result<(), StreamError> {
        self.broadcast(|| Message::Watermark(watermark))
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        self.send_all()?;
        if matches!(self.partitioning, Partitioning::RoundRobin) {
            self.next = (self.next + 1) % self.targets.len().max(1);
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), StreamError> {
        self.broadcast(|| Message::End)
    }
}

/// The start of a downstream subtask's chain: merges its inputs. Its
/// watermark is the least of its inputs' (an ended input counts as
/// [`WATERMARK_END`]); it ends when every input has.
/// How often a waiting receiver looks at the job's cancel flag.
const CANCEL_CHECK: Duration = Duration::from_millis(50);

/// The receivers of a stage's subtasks, each taken when its subtask starts.
pub(crate) type Inputs<T> = Mutex<Vec<Option<Receiver<Envelope<T>>>>>;

impl<T: Send> crate::env::PendingInputs for Inputs<T> {
    fn untaken(&self) -> bool {
        self.lock()
            .map(|r| r.iter().any(Option::is_some))
            .unwrap_or(false)
    }
}

pub(crate) fn receive<T: Send>(
    stage: &str,
    subtask: usize,
    inputs: Receiver<Envelope<T>>,
    upstream: usize,
    cancel: &AtomicBool,
    mut out: BoxOutput<T>,
) -> Result<(), StreamError> {
    let mut watermarks = vec![i64::MIN; upstream];
    let mut current = i64::MIN;
    let mut ended = 0;
    while ended < upstream {
        let (from, m) = match inputs.recv_timeout(CANCEL_CHECK) {
            Ok(envelope) => envelope,
            Err(RecvTimeoutError::Timeout) if cancel.load(Ordering::SeqCst) => {
                return Err(StreamError::Cancelled {
                    stage: stage.to_owned(),
                    subtask,
                })
            }
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => {
                return Err(StreamError::UpstreamGone {
                    stage: stage.to_owned(),
                    subtask,
                })
            }
        };
        let advanced = match m {
            Message::Records(batch) => {
                for r in batch {
                    out.push(r)?;
                }
                out.flush()?;
                None
            }
            Message::Watermark(w) => watermarks.get_mut(from).map(|slot| *slot = w.max(*slot)),
            Message::End => {
                ended += 1;
                watermarks.get_mut(from).map(|slot| *slot = WATERMARK_END)
            }
        };
        if advanced.is_some() {
            let least = watermarks.iter().copied().min().unwrap_or(WATERMARK_END);
            if least > current {
                current = least;
                out.watermark(least)?;
                out.flush()?;
            }
        }
    }
    out.finish()
}

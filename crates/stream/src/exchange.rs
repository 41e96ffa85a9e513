//! Exchanges: where one stage's subtasks send to the next stage's over
//! bounded channels, and where those merge their inputs again.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::checkpoint::{CheckpointId, Cursor};
use crate::env::TaskRuntime;
use crate::operator::{BoxOutput, Output};
use crate::{Record, StreamError, WATERMARK_END};

/// What travels on a channel.
pub(crate) enum Message<T> {
    Records(Vec<Record<T>>),
    Watermark(i64),
    /// Checkpoint `n`'s barrier: what the sender sent before it is in the
    /// checkpoint, what follows is not.
    Barrier(CheckpointId),
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

    fn barrier(&mut self, cp: &mut Cursor<'_>) -> Result<(), StreamError> {
        if cp.is_final() {
            return Ok(());
        }
        let id = cp.id;
        self.broadcast(|| Message::Barrier(id))
    }

    // The stage ends here: its receivers restore and hear of completions
    // from their own subtasks.
    fn restore(&mut self, _: &mut Cursor<'_>) -> Result<(), StreamError> {
        Ok(())
    }

    fn checkpoint_complete(&mut self, _: CheckpointId) -> Result<(), StreamError> {
        Ok(())
    }
}

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

/// The start of a downstream subtask's chain: merges its inputs. Its
/// watermark is the least of its inputs' (an ended input counts as
/// [`WATERMARK_END`]); it ends when every input has. Checkpoint barriers
/// are aligned here (see [`crate::checkpoint`]).
pub(crate) fn receive<T: Send>(
    stage: &str,
    rt: &TaskRuntime,
    inputs: Receiver<Envelope<T>>,
    upstream: usize,
    mut out: BoxOutput<T>,
) -> Result<(), StreamError> {
    rt.restore(out.as_mut())?;
    let subtask = rt.info.index;
    let mut watermarks = vec![i64::MIN; upstream];
    let mut ended = vec![false; upstream];
    let mut current = i64::MIN;
    let mut completed = rt.completed();
    // Alignment: the checkpoint whose barriers are coming in, the inputs
    // that delivered it, and what those sent after it, held back in order.
    let mut aligning: Option<CheckpointId> = None;
    let mut blocked = vec![false; upstream];
    let mut held: VecDeque<Envelope<T>> = VecDeque::new();
    while ended.iter().any(|e| !e) {
        if let Some(id) = rt.newly_completed(&mut completed) {
            out.checkpoint_complete(id)?;
        }
        // Held messages of inputs no longer blocked go first, oldest first:
        // each input's messages stay in the order it sent them.
        let next = held
            .iter()
            .position(|(from, _)| !blocked.get(*from).copied().unwrap_or(false));
        let (from, m) = match next.and_then(|i| held.remove(i)) {
            Some(envelope) => envelope,
            None => match inputs.recv_timeout(CANCEL_CHECK) {
                Ok(envelope) => envelope,
                Err(RecvTimeoutError::Timeout) if rt.cancel.load(Ordering::SeqCst) => {
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
            },
        };
        if from >= upstream {
            continue;
        }
        if blocked[from] {
            held.push_back((from, m));
            continue;
        }
        let advanced = match m {
            Message::Records(batch) => {
                for r in batch {
                    out.push(r)?;
                }
                out.flush()?;
                false
            }
            Message::Watermark(w) => {
                watermarks[from] = w.max(watermarks[from]);
                true
            }
            Message::End => {
                ended[from] = true;
                watermarks[from] = WATERMARK_END;
                true
            }
            Message::Barrier(id) => {
                // A newer barrier means the older checkpoint was abandoned
                // upstream: align on the newer one.
                if aligning.is_some_and(|a| a < id) {
                    blocked.fill(false);
                }
                if aligning.is_none_or(|a| a <= id) {
                    aligning = Some(id);
                    blocked[from] = true;
                }
                false
            }
        };
        if advanced {
            let least = watermarks.iter().copied().min().unwrap_or(WATERMARK_END);
            if least > current {
                current = least;
                out.watermark(least)?;
                out.flush()?;
            }
        }
        if let Some(id) = aligning {
            if (0..upstream).all(|i| blocked[i] || ended[i]) {
                aligning = None;
                blocked.fill(false);
                rt.checkpoint(id, out.as_mut())?;
            }
        }
    }
    out.finish()?;
    rt.final_checkpoint(out.as_mut())
}

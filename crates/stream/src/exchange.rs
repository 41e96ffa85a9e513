//! Exchanges: where one stage's subtasks send to the next stage's over
//! bounded channels, and where those merge their inputs again.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
        let target = self.targets.get(to).ok_or_else(gone)?;
        if let Message::Records(batch) = &m {
            let n = batch.len();
            crate::metrics::with_current(|metrics| metrics.add_out(n));
        }
        match target.try_send((self.me, m)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Disconnected(_)) => Err(gone()),
            // A full channel: the time waited for room is backpressure.
            Err(TrySendError::Full(m)) => {
                let waiting = Instant::now();
                let sent = target.send(m).map_err(|_| gone());
                crate::metrics::with_current(|metrics| metrics.add_backpressure(waiting.elapsed()));
                sent
            }
        }
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

/// How often a waiting receiver looks at the job's cancel flag and lets
/// its links check the clock (processing-time timers).
pub(crate) const CANCEL_CHECK: Duration = Duration::from_millis(50);

/// What a held message counts against the alignment bound: its records, or
/// one for a watermark, a barrier or an end.
fn weight<T>(m: &Message<T>) -> usize {
    match m {
        Message::Records(batch) => batch.len().max(1),
        _ => 1,
    }
}

/// How a receiver with several inputs stores the records an unaligned
/// checkpoint takes from its channels, and reads them back on restore.
pub(crate) struct ChannelCodec<T> {
    encode: fn(&Record<T>) -> Result<Vec<u8>, StreamError>,
    decode: fn(&[u8]) -> Result<Record<T>, StreamError>,
    /// A record's key group when the exchange is keyed: the subtask that
    /// owns it takes the record over at any parallelism.
    group_of: Option<GroupOf<T>>,
}

/// A record's key group.
pub(crate) type GroupOf<T> = Arc<dyn Fn(&T) -> usize + Send + Sync>;

impl<T: crate::StateData> ChannelCodec<T> {
    pub fn new(group_of: Option<GroupOf<T>>) -> Arc<ChannelCodec<T>> {
        Arc::new(ChannelCodec {
            encode: |r| crate::checkpoint::encode(&(r.time, &r.value)),
            decode: |bytes| {
                crate::checkpoint::decode::<(Option<i64>, T)>(bytes)
                    .map(|(time, value)| Record { value, time })
            },
            group_of,
        })
    }
}

impl<T> ChannelCodec<T> {
    fn entry(&self, r: &Record<T>) -> Result<(Option<u32>, Vec<u8>), StreamError> {
        let group = self.group_of.as_ref().map(|g| g(&r.value) as u32);
        Ok((group, (self.encode)(r)?))
    }
}

/// An unaligned checkpoint whose state this subtask wrote, while the
/// barriers of some inputs are still on their way: what those inputs send
/// until then was sent before the barrier, so it is stored with it.
struct InFlight {
    id: CheckpointId,
    waiting: Vec<bool>,
    records: Vec<(Option<u32>, Vec<u8>)>,
}

impl InFlight {
    fn done(&self) -> bool {
        !self.waiting.iter().any(|w| *w)
    }
}

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
/// are aligned here, or not (see [`crate::checkpoint`]); `codec` stores the
/// records of an unaligned checkpoint (none: the stage always aligns).
pub(crate) fn receive<T: Send>(
    stage: &str,
    rt: &TaskRuntime,
    inputs: Receiver<Envelope<T>>,
    upstream: usize,
    codec: Option<Arc<ChannelCodec<T>>>,
    mut out: BoxOutput<T>,
) -> Result<(), StreamError> {
    rt.restore(out.as_mut())?;
    if let Some(codec) = &codec {
        // Records that were in flight at the restored checkpoint come
        // before anything the restored upstream sends.
        let replayed = rt.restored_channel_records()?;
        if !replayed.is_empty() {
            for bytes in replayed {
                out.push((codec.decode)(&bytes)?)?;
            }
            out.flush()?;
        }
    }
    let subtask = rt.info.index;
    let mut watermarks = vec![i64::MIN; upstream];
    let mut ended = vec![false; upstream];
    let mut current = i64::MIN;
    let mut completed = rt.completed();
    // Alignment: the checkpoint whose barriers are coming in, the inputs
    // that delivered it, and what those sent after it, held back in order.
    let mut aligning: Option<CheckpointId> = None;
    let mut aligning_since = Instant::now();
    let mut blocked = vec![false; upstream];
    let mut held: VecDeque<Envelope<T>> = VecDeque::new();
    let mut held_records = 0usize;
    let config = rt.shared.config.as_ref();
    let max_held = config.map_or(usize::MAX, |c| c.max_alignment_records);
    // An input alone needs no alignment: its barrier is the last one.
    let unaligned_after = match &codec {
        Some(_) if upstream > 1 => config.and_then(|c| c.unaligned_after),
        _ => None,
    };
    let mut in_flight: Option<InFlight> = None;
    // The latest checkpoint this subtask wrote its state for, declined or
    // abandoned: its barriers still on their way from slower inputs are
    // passed over.
    let mut passed: CheckpointId = 0;
    let mut flushed = Instant::now();
    while ended.iter().any(|e| !e) {
        if let Some(id) = rt.newly_completed(&mut completed) {
            out.checkpoint_complete(id)?;
            rt.checkpoint_complete(id)?;
        }
        // A tick at least every CANCEL_CHECK, even while barriers or
        // watermarks keep arriving: links with processing-time timers
        // check the clock when flushed.
        if flushed.elapsed() >= CANCEL_CHECK {
            out.flush()?;
            flushed = Instant::now();
        }
        if let (Some(id), Some(after)) = (aligning, unaligned_after) {
            if aligning_since.elapsed() >= after {
                aligning = None;
                passed = id;
                in_flight = Some(go_unaligned(rt, id, &mut blocked, &ended, out.as_mut())?);
            }
        }
        // Held messages of inputs no longer blocked go first, oldest first:
        // each input's messages stay in the order it sent them.
        let next = held
            .iter()
            .position(|(from, _)| !blocked.get(*from).copied().unwrap_or(false));
        let (from, m) = match next.and_then(|i| held.remove(i)) {
            Some(envelope) => {
                held_records = held_records.saturating_sub(weight(&envelope.1));
                envelope
            }
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
            held_records += weight(&m);
            held.push_back((from, m));
            if held_records > max_held {
                if let Some(id) = aligning.take() {
                    if unaligned_after.is_some() {
                        passed = id;
                        in_flight = Some(go_unaligned(rt, id, &mut blocked, &ended, out.as_mut())?);
                        continue;
                    }
                    // Let everything through, in order, and tell the
                    // coordinator: memory stays bounded, the next
                    // checkpoint tries again.
                    tracing::warn!(
                        stage,
                        subtask,
                        checkpoint = id,
                        held = held_records,
                        "declining a checkpoint: too many records held back while aligning"
                    );
                    blocked.fill(false);
                    passed = id;
                    rt.decline(id, out.as_mut())?;
                }
            }
            continue;
        }
        let advanced = match m {
            Message::Records(batch) => {
                rt.metrics.add_in(batch.len());
                if let (Some(f), Some(codec)) = (in_flight.as_mut(), &codec) {
                    if f.waiting[from] {
                        for r in &batch {
                            f.records.push(codec.entry(r)?);
                        }
                        if f.records.len() > max_held {
                            tracing::warn!(
                                stage,
                                subtask,
                                checkpoint = f.id,
                                records = f.records.len(),
                                "abandoning an unaligned checkpoint: too many records in flight"
                            );
                            rt.abandon(f.id);
                            in_flight = None;
                        }
                    }
                }
                for r in batch {
                    out.push(r)?;
                }
                out.flush()?;
                flushed = Instant::now();
                false
            }
            Message::Watermark(w) => {
                watermarks[from] = w.max(watermarks[from]);
                true
            }
            Message::End => {
                ended[from] = true;
                watermarks[from] = WATERMARK_END;
                if let Some(f) = in_flight.as_mut() {
                    f.waiting[from] = false;
                }
                true
            }
            Message::Barrier(id) => {
                if let Some(f) = in_flight.as_mut().filter(|f| f.id == id) {
                    f.waiting[from] = false;
                } else if id > passed {
                    // A newer barrier means the older checkpoint was
                    // abandoned upstream: align on the newer one.
                    if in_flight.as_ref().is_some_and(|f| f.id < id) {
                        in_flight = None;
                    }
                    if aligning.is_some_and(|a| a < id) {
                        blocked.fill(false);
                    }
                    if aligning.is_none_or(|a| a < id) {
                        aligning_since = Instant::now();
                    }
                    if aligning.is_none_or(|a| a <= id) {
                        aligning = Some(id);
                        blocked[from] = true;
                    }
                }
                false
            }
        };
        if advanced {
            let least = watermarks.iter().copied().min().unwrap_or(WATERMARK_END);
            if least > current {
                current = least;
                rt.metrics.set_watermark(least);
                out.watermark(least)?;
                out.flush()?;
            }
        }
        if let Some(id) = aligning {
            if (0..upstream).all(|i| blocked[i] || ended[i]) {
                aligning = None;
                blocked.fill(false);
                passed = id;
                rt.checkpoint(id, out.as_mut())?;
            } else if unaligned_after == Some(Duration::ZERO) {
                aligning = None;
                passed = id;
                in_flight = Some(go_unaligned(rt, id, &mut blocked, &ended, out.as_mut())?);
            }
        }
        if in_flight.as_ref().is_some_and(InFlight::done) {
            if let Some(f) = in_flight.take() {
                rt.complete_unaligned(f.id, f.records)?;
            }
        }
    }
    out.finish()?;
    rt.final_checkpoint(out.as_mut())
}

/// Turns checkpoint `id`, aligned so far, unaligned: the chain writes its
/// state now (it holds everything the inputs that delivered the barrier
/// sent before it, and nothing after), the barrier goes on, and what the
/// inputs still `blocked`-free and not ended send until their barriers is
/// in flight. What was held back is let through.
fn go_unaligned<T: Send>(
    rt: &TaskRuntime,
    id: CheckpointId,
    blocked: &mut [bool],
    ended: &[bool],
    out: &mut dyn Output<T>,
) -> Result<InFlight, StreamError> {
    rt.snapshot(id, out)?;
    let waiting = blocked.iter().zip(ended).map(|(b, e)| !b && !e).collect();
    blocked.fill(false);
    Ok(InFlight {
        id,
        waiting,
        records: Vec::new(),
    })
}

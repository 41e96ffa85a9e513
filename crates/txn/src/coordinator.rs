//! The transaction coordinator of one node: serves while this node leads
//! `__transaction_state-0`, with the [`TxnTable`] replayed from that
//! partition.
//!
//! A request decides its transition under the table's lock and appends its
//! record there too (so the log holds transitions in the order they were
//! decided); it waits for the record to be committed without the lock, and
//! only then does the transition take effect ([`TxnTable::complete`]). An
//! EndTxn is answered once its PrepareCommit or PrepareAbort is committed;
//! the markers and the CompleteCommit or CompleteAbort follow in a task of
//! their own, as in Kafka. Every second the coordinator aborts transactions
//! past their timeout and finishes any transaction it finds preparing with
//! no task at it (one whose markers failed, or one a previous coordinator
//! left).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use parking_lot::Mutex;
use sluice_log::{BatchBuilder, BatchHeader, Marker, PlainRecords, ReadLimit};
use sluice_topology::{Leadership, Topology};
use sluice_vocab::internal::TRANSACTION_STATE_TOPIC;
use sluice_vocab::now_ms;
use sluice_vocab::ErrorCode;
use tokio::sync::watch;

use crate::record;
use crate::state::{End, Init, TopicPartition, TxnMetadata, TxnTable};

/// Longest a transition waits to be committed before the request fails.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a coordinator that just took over waits for its log's tail to be
/// committed before it answers COORDINATOR_LOAD_IN_PROGRESS.
const LOAD_WAIT: Duration = Duration::from_secs(5);
/// Pause between two attempts at a transaction's markers.
const MARKER_RETRY: Duration = Duration::from_millis(200);

/// The coordinator's settings.
#[derive(Clone, Debug)]
pub struct TxnConfig {
    /// Kafka's `transaction.max.timeout.ms`: longer producer timeouts are
    /// INVALID_TRANSACTION_TIMEOUT.
    pub max_timeout_ms: i32,
    /// How often transactions past their timeout are looked for.
    pub abort_check_interval: Duration,
}

impl Default for TxnConfig {
    fn default() -> TxnConfig {
        TxnConfig {
            max_timeout_ms: 900_000,
            abort_check_interval: Duration::from_secs(1),
        }
    }
}

/// Writes a transaction's marker to every partition of it, each at its
/// leader, and resolves once every marker is committed there (the wire
/// front end implements it: partitions led elsewhere are reached through
/// their leader's WriteTxnMarkers).
pub trait MarkerWriter: Send + Sync + 'static {
    fn write<'a>(
        &'a self,
        partitions: &'a [TopicPartition],
        producer_id: i64,
        producer_epoch: i16,
        marker: Marker,
    ) -> BoxFuture<'a, Result<(), ErrorCode>>;
}

struct Loaded {
    leadership: Leadership,
    table: TxnTable,
    /// Transactional ids whose markers a task is writing.
    completing: HashSet<String>,
}

/// See the module docs.
pub struct TxnCoordinator {
    topology: Arc<dyn Topology>,
    markers: Arc<dyn MarkerWriter>,
    config: TxnConfig,
    loaded: Mutex<Option<Loaded>>,
    loading: tokio::sync::Mutex<()>,
    stop: watch::Sender<bool>,
}

/// A leadership that ended (or a write that failed with it) tells the client
/// to find the coordinator again.
fn lost(code: ErrorCode) -> ErrorCode {
    match code {
        ErrorCode::RequestTimedOut => ErrorCode::CoordinatorNotAvailable,
        _ => ErrorCode::NotCoordinator,
    }
}

impl TxnCoordinator {
    /// Starts the coordinator of this node (idle until it leads the state
    /// partition) and its timeout and completion duty. Must be called inside
    /// a Tokio runtime.
    pub fn start(
        topology: Arc<dyn Topology>,
        markers: Arc<dyn MarkerWriter>,
        config: TxnConfig,
    ) -> Arc<TxnCoordinator> {
        let c = Arc::new(TxnCoordinator {
            topology,
            markers,
            config,
            loaded: Mutex::new(None),
            loading: tokio::sync::Mutex::new(()),
            stop: watch::channel(false).0,
        });
        tokio::spawn(duty(Arc::downgrade(&c), c.stop.subscribe()));
        c
    }

    /// Stops the duty. Idempotent.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }

    /// This node's leadership of the state partition, with the table
    /// replayed for it.
    async fn lead(&self) -> Result<Leadership, ErrorCode> {
        let lead = self
            .topology
            .leadership(TRANSACTION_STATE_TOPIC, 0)
            .ok_or(ErrorCode::NotCoordinator)?;
        if self.is_loaded(&lead) {
            return Ok(lead);
        }
        let _one = self.loading.lock().await;
        if self.is_loaded(&lead) {
            return Ok(lead);
        }
        let end = lead.partition().log_end_offset();
        lead.wait_committed(end, Some(LOAD_WAIT))
            .await
            .map_err(|e| match e {
                ErrorCode::RequestTimedOut => ErrorCode::CoordinatorLoadInProgress,
                _ => ErrorCode::NotCoordinator,
            })?;
        let table = replay(&lead)?;
        tracing::info!(
            epoch = lead.epoch(),
            transactional_ids = table.iter().count(),
            "transaction coordinator ready"
        );
        *self.loaded.lock() = Some(Loaded {
            leadership: lead.clone(),
            table,
            completing: HashSet::new(),
        });
        Ok(lead)
    }

    fn is_loaded(&self, lead: &Leadership) -> bool {
        self.loaded
            .lock()
            .as_ref()
            .is_some_and(|l| l.leadership.epoch() == lead.epoch() && lead.is_current())
    }

    /// Runs `f` on the table of `lead`'s epoch.
    fn with_table<T>(
        &self,
        lead: &Leadership,
        f: impl FnOnce(&mut Loaded) -> Result<T, ErrorCode>,
    ) -> Result<T, ErrorCode> {
        let mut g = self.loaded.lock();
        match g.as_mut() {
            Some(l) if l.leadership.epoch() == lead.epoch() && lead.is_current() => f(l),
            _ => Err(ErrorCode::NotCoordinator),
        }
    }

    /// Appends `id`'s transition (under the table's lock: log order is
    /// decision order); its end offset. A failed append drops the transition.
    fn append(l: &mut Loaded, id: &str, meta: &TxnMetadata) -> Result<i64, ErrorCode> {
        let appended = encode(id, meta).and_then(|batch| {
            l.leadership
                .append(&batch)
                .map(|a| a.end_offset)
                .map_err(|e| lost(sluice_vocab::KafkaError::error_code(&e)))
        });
        if appended.is_err() {
            l.table.abandon(id);
        }
        appended
    }

    /// Waits for `id`'s transition to be committed, then makes it the state.
    async fn settle(
        &self,
        lead: &Leadership,
        id: &str,
        meta: &TxnMetadata,
        end: i64,
    ) -> Result<(), ErrorCode> {
        let committed = lead.wait_committed(end, Some(WRITE_TIMEOUT)).await;
        self.with_table(lead, |l| match committed {
            Ok(()) => {
                l.table.complete(id, meta);
                Ok(())
            }
            Err(e) => {
                l.table.abandon(id);
                Err(lost(e))
            }
        })
    }

    /// InitProducerId with a transactional id: its producer id and epoch.
    pub async fn init_producer_id(
        self: &Arc<Self>,
        id: &str,
        timeout_ms: i32,
        expected: Option<(i64, i16)>,
    ) -> Result<(i64, i16), ErrorCode> {
        crate::state::check_timeout(timeout_ms, self.config.max_timeout_ms)?;
        let lead = self.lead().await?;
        let mut fresh = None;
        loop {
            let decided = self.with_table(&lead, |l| {
                let plan = l.table.init(
                    id,
                    timeout_ms,
                    self.config.max_timeout_ms,
                    expected,
                    fresh,
                    now_ms(),
                )?;
                let end = match &plan {
                    Init::Write(m) | Init::AbortFirst(m) => Some(Self::append(l, id, m)?),
                    Init::Current { .. } | Init::NeedProducerId => None,
                };
                Ok((plan, end))
            })?;
            match decided {
                (Init::NeedProducerId, _) => {
                    let pid = self.topology.next_producer_id().await.map_err(|e| {
                        tracing::warn!(error = %e, "cannot allocate a producer id");
                        ErrorCode::CoordinatorNotAvailable
                    })?;
                    fresh = Some(pid);
                }
                (
                    Init::Current {
                        producer_id,
                        producer_epoch,
                    },
                    _,
                ) => return Ok((producer_id, producer_epoch)),
                (Init::Write(m), Some(end)) => {
                    self.settle(&lead, id, &m, end).await?;
                    return Ok((m.producer_id, m.producer_epoch));
                }
                (Init::AbortFirst(m), Some(end)) => {
                    // The open transaction is aborted, its producer fenced;
                    // the client asks again once that is done.
                    self.settle(&lead, id, &m, end).await?;
                    self.complete_in_background(&lead, id.to_owned(), m);
                    return Err(ErrorCode::ConcurrentTransactions);
                }
                (Init::Write(_) | Init::AbortFirst(_), None) => {
                    return Err(ErrorCode::UnknownServerError)
                }
            }
        }
    }

    /// AddPartitionsToTxn (and AddOffsetsToTxn with the offsets partition).
    pub async fn add_partitions(
        &self,
        id: &str,
        producer_id: i64,
        producer_epoch: i16,
        partitions: &[TopicPartition],
    ) -> Result<(), ErrorCode> {
        let lead = self.lead().await?;
        let decided = self.with_table(&lead, |l| {
            match l
                .table
                .add_partitions(id, producer_id, producer_epoch, partitions, now_ms())?
            {
                Some(m) => Ok(Some((Self::append(l, id, &m)?, m))),
                None => Ok(None),
            }
        })?;
        match decided {
            Some((end, m)) => self.settle(&lead, id, &m, end).await,
            None => Ok(()),
        }
    }

    /// AddPartitionsToTxn with `verify_only`: whether each partition is in
    /// `id`'s open transaction.
    pub async fn verify_partitions(
        &self,
        id: &str,
        producer_id: i64,
        producer_epoch: i16,
        partitions: &[TopicPartition],
    ) -> Result<Vec<bool>, ErrorCode> {
        let lead = self.lead().await?;
        self.with_table(&lead, |l| {
            l.table.verify(id, producer_id, producer_epoch, partitions)
        })
    }

    /// EndTxn: answered once the outcome is committed to the state log; the
    /// markers follow.
    pub async fn end_txn(
        self: &Arc<Self>,
        id: &str,
        producer_id: i64,
        producer_epoch: i16,
        commit: bool,
    ) -> Result<(), ErrorCode> {
        let lead = self.lead().await?;
        let decided = self.with_table(&lead, |l| {
            match l
                .table
                .end(id, producer_id, producer_epoch, commit, now_ms())?
            {
                End::Write(m) => Ok(Some((Self::append(l, id, &m)?, m))),
                End::AlreadyDone => Ok(None),
            }
        })?;
        let Some((end, m)) = decided else {
            return Ok(());
        };
        self.settle(&lead, id, &m, end).await?;
        self.complete_in_background(&lead, id.to_owned(), m);
        Ok(())
    }

    /// The committed state of every transactional id (DescribeTransactions,
    /// ListTransactions).
    pub async fn transactions(&self) -> Result<Vec<(String, TxnMetadata)>, ErrorCode> {
        let lead = self.lead().await?;
        self.with_table(&lead, |l| {
            Ok(l.table
                .iter()
                .map(|(id, m)| (id.to_owned(), m.clone()))
                .collect())
        })
    }

    /// Writes the markers of a preparing transaction and then its
    /// CompleteCommit or CompleteAbort, in a task of its own; at most one
    /// task per transactional id.
    fn complete_in_background(
        self: &Arc<Self>,
        lead: &Leadership,
        id: String,
        prepared: TxnMetadata,
    ) {
        let claimed = self
            .with_table(lead, |l| Ok(l.completing.insert(id.clone())))
            .unwrap_or(false);
        if !claimed {
            return;
        }
        let c = self.clone();
        let lead = lead.clone();
        tokio::spawn(async move {
            let done = c.complete(&lead, &id, &prepared).await;
            let _ = c.with_table(&lead, |l| Ok(l.completing.remove(&id)));
            if let Err(e) = done {
                tracing::warn!(transactional_id = %id, error = %e,
                    "transaction not completed yet; retried by the coordinator's duty");
            }
        });
    }

    async fn complete(
        &self,
        lead: &Leadership,
        id: &str,
        prepared: &TxnMetadata,
    ) -> Result<(), ErrorCode> {
        let commit = prepared.state == crate::TxnState::PrepareCommit;
        let marker = Marker {
            commit,
            coordinator_epoch: lead.epoch(),
        };
        let partitions: Vec<TopicPartition> = prepared.partitions.iter().cloned().collect();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            if !lead.is_current() {
                return Err(ErrorCode::NotCoordinator);
            }
            match self
                .markers
                .write(
                    &partitions,
                    prepared.producer_id,
                    prepared.producer_epoch,
                    marker,
                )
                .await
            {
                Ok(()) => break,
                Err(e) => {
                    // Once, then every minute or so: a partition without a
                    // leader keeps this going until it has one.
                    if attempts % 300 == 1 {
                        tracing::warn!(transactional_id = %id, error = %e, attempts, "markers not written; retrying");
                    }
                    tokio::time::sleep(MARKER_RETRY).await;
                }
            }
        }
        let decided = self.with_table(lead, |l| match l.table.complete_end(id, now_ms()) {
            Some(m) => Ok(Some((Self::append(l, id, &m)?, m))),
            None => Ok(None),
        })?;
        match decided {
            Some((end, m)) => self.settle(lead, id, &m, end).await,
            None => Ok(()),
        }
    }

    /// One round of the duty: abort what timed out, finish what is preparing.
    async fn tick(self: &Arc<Self>) {
        if self
            .topology
            .leadership(TRANSACTION_STATE_TOPIC, 0)
            .is_none()
        {
            return;
        }
        let Ok(lead) = self.lead().await else {
            return;
        };
        let now = now_ms();
        let expired = self
            .with_table(&lead, |l| {
                let mut out = Vec::new();
                for (id, abort) in l.table.expire(now) {
                    tracing::info!(transactional_id = %id, "transaction timed out; aborting it");
                    if let Ok(end) = Self::append(l, &id, &abort) {
                        out.push((id, abort, end));
                    }
                }
                Ok(out)
            })
            .unwrap_or_default();
        for (id, abort, end) in expired {
            if self.settle(&lead, &id, &abort, end).await.is_ok() {
                self.complete_in_background(&lead, id, abort);
            }
        }
        let preparing = self
            .with_table(&lead, |l| {
                Ok(l.table
                    .preparing()
                    .into_iter()
                    .filter(|(id, _)| !l.completing.contains(id))
                    .collect::<Vec<_>>())
            })
            .unwrap_or_default();
        for (id, prepared) in preparing {
            self.complete_in_background(&lead, id, prepared);
        }
    }
}

async fn duty(c: std::sync::Weak<TxnCoordinator>, mut stop: watch::Receiver<bool>) {
    loop {
        let Some(every) = c.upgrade().map(|c| c.config.abort_check_interval) else {
            return;
        };
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let Some(coordinator) = c.upgrade() else {
            return;
        };
        coordinator.tick().await;
    }
}

/// One record of `id`'s transition, as a batch to append.
fn encode(id: &str, meta: &TxnMetadata) -> Result<bytes::BytesMut, ErrorCode> {
    let key = record::encode_key(id).map_err(|_| ErrorCode::InvalidRequest)?;
    let value = record::encode_value(meta).map_err(|_| ErrorCode::InvalidRequest)?;
    let now = now_ms();
    let mut b = BatchBuilder::new(key.len() + value.len() + 16, now);
    b.push(now, Some(&key), Some(&value), &[]);
    b.finish().ok_or(ErrorCode::UnknownServerError)
}

/// The table the state partition's committed records describe.
fn replay(lead: &Leadership) -> Result<TxnTable, ErrorCode> {
    const READ_BYTES: usize = 1 << 20;
    let partition = lead.partition();
    let mut table = TxnTable::default();
    let mut position = partition.log_start_offset();
    let high_watermark = partition.high_watermark();
    while position < high_watermark {
        let read = partition
            .read(position, READ_BYTES, true, ReadLimit::HighWatermark)
            .map_err(|e| {
                tracing::error!(error = %e, "cannot read the transaction state log");
                ErrorCode::CoordinatorLoadInProgress
            })?;
        let mut rest = read.records;
        let start = position;
        while let Some(h) = BatchHeader::parse(&rest) {
            if h.size() > rest.len() {
                break;
            }
            let batch = rest.split_to(h.size());
            position = position.max(h.next_offset());
            if h.is_control() {
                continue;
            }
            let Ok(records) = PlainRecords::new(batch) else {
                tracing::warn!(
                    offset = h.base_offset,
                    "unreadable batch in the transaction state log; skipped"
                );
                continue;
            };
            for r in records.flatten() {
                if r.offset < start {
                    continue;
                }
                let Some(id) = r.key.as_deref().and_then(|k| record::decode_key(k).ok()) else {
                    continue;
                };
                match r.value.as_deref().map(record::decode_value) {
                    None => table.replay(&id, None),
                    Some(Ok(meta)) => table.replay(&id, Some(meta)),
                    Some(Err(e)) => {
                        tracing::warn!(transactional_id = %id, error = %e, "unreadable transaction state record; skipped")
                    }
                }
            }
        }
        if position <= start {
            break;
        }
    }
    Ok(table)
}

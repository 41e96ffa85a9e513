//! Cluster mode: what the front end needs from the replication layer, the
//! group coordinator that follows leadership of `__consumer_offsets-0`, and
//! proposals to the metadata quorum with a bounded wait for the local image.
//!
//! The handlers talk to [`Replicas`], a narrow internal trait: the broker
//! implements it on `sluice_replica::ReplicaManager` (see `replica.rs`), the
//! unit tests on a fake, so the cluster-mode handlers are tested without a
//! quorum.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use sluice_cluster::{ClusterError, Command, CommandOutput, CommandResult, MetadataImage};
use sluice_group::{GroupConfig, GroupCoordinator, ReplicatedOffsets};
use sluice_log::{AppendResult, Partition, Store};
use sluice_vocab::internal::OFFSETS_TOPIC;
use sluice_vocab::KafkaError;
use tokio::sync::watch;
use tokio::time::Instant;

pub(crate) type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A partition this node leads, ready for a produce.
pub(crate) struct ProduceLeader {
    pub partition: Arc<Partition>,
    /// The replication layer's own handle, handed back to `wait_replicated`.
    pub token: Arc<dyn Any + Send + Sync>,
}

/// The replication layer and the metadata quorum, as the handlers use them.
/// Error values are Kafka error codes.
pub(crate) trait Replicas: Send + Sync + 'static {
    /// The latest image the replication layer has acted on (local topics
    /// exist, roles are set).
    fn image(&self) -> Arc<MetadataImage>;
    /// Changes whenever the quorum's locally applied image changes.
    fn watch_image(&self) -> watch::Receiver<Arc<MetadataImage>>;
    /// The controller (Raft leader), if known.
    fn controller_id(&self) -> Option<i32>;
    /// Whether this node has lost touch with the controller for a session (its
    /// image may be stale).
    fn metadata_stale(&self) -> bool;
    /// Waits (bounded) until the quorum's locally applied image holds every change
    /// the controller had committed when called; the read index, or `None` when the
    /// controller could not be asked in time.
    fn catch_up(&self) -> BoxFut<'_, Option<u64>>;
    fn propose(&self, cmd: Command) -> BoxFut<'_, Result<CommandResult, ClusterError>>;
    /// 3 unknown, 6 not leader, 19 not enough replicas (only when `acks_all`).
    fn leader_for_produce(
        &self,
        topic: &str,
        partition: i32,
        acks_all: bool,
    ) -> Result<ProduceLeader, i16>;
    /// Appends to a partition led through `leader`, stamped with its epoch;
    /// refused with NOT_LEADER_OR_FOLLOWER once that leadership is over.
    fn append(&self, leader: &ProduceLeader, records: &[u8])
        -> Result<AppendResult, (i16, String)>;
    /// acks=all: resolves once the high watermark reaches `end_offset`;
    /// 6 if leadership was lost meanwhile, 7 after `timeout`.
    fn wait_replicated<'a>(
        &'a self,
        leader: &'a ProduceLeader,
        end_offset: i64,
        timeout: Duration,
    ) -> BoxFut<'a, Result<(), i16>>;
    /// Consumer reads: the partition and leader epoch if this node leads it
    /// (74/79 on an epoch mismatch when `current_leader_epoch` >= 0).
    fn leader_for_read(
        &self,
        topic: &str,
        partition: i32,
        current_leader_epoch: i32,
    ) -> Result<(Arc<Partition>, i32), i16>;
    /// A follower's fetch: records its fetch offset and returns the
    /// partition to read from (up to the log end).
    fn on_follower_fetch(
        &self,
        topic: &str,
        partition: i32,
        replica_id: i32,
        fetch_offset: i64,
        current_leader_epoch: i32,
        log_start_offset: i64,
    ) -> Result<Arc<Partition>, i16>;
    /// The smallest log start offset among the leader and its in-sync followers
    /// (3/6 when this node does not lead the partition).
    fn low_watermark(&self, topic: &str, partition: i32) -> Result<i64, i16>;
    /// Fires whenever this node's roles change.
    fn watch_roles(&self) -> watch::Receiver<u64>;
    /// The epoch this node leads the partition in, if it leads it.
    fn leader_epoch_of(&self, topic: &str, partition: i32) -> Option<i32>;
}

/// The group coordinator of a cluster node, following leadership of
/// `__consumer_offsets-0`.
pub(crate) enum CoordinatorState {
    /// Another node (or nobody) leads the offsets partition: NOT_COORDINATOR.
    Absent,
    /// This node leads it in this epoch and is replaying it:
    /// COORDINATOR_LOAD_IN_PROGRESS.
    Loading(i32),
    /// Serving groups in this epoch.
    Ready(i32, Arc<GroupCoordinator>),
}

/// Cluster-mode state every connection shares.
pub(crate) struct ClusterCtx {
    pub replicas: Arc<dyn Replicas>,
    pub coordinator: parking_lot::RwLock<CoordinatorState>,
    /// Producer ids handed out from the current block: (next, end).
    pub producer_ids: tokio::sync::Mutex<(i64, i64)>,
}

/// Producer ids requested from the quorum at a time (as Kafka).
pub(crate) const PRODUCER_ID_BLOCK: i64 = 1000;

/// Longest wait for the local image to show a committed change.
pub(crate) const IMAGE_WAIT: Duration = Duration::from_secs(10);

/// Replication factor of `replication_factor: -1`: min(3, live brokers).
pub(crate) fn default_replication_factor(image: &MetadataImage) -> i16 {
    i16::try_from(image.live_brokers().len().clamp(1, 3)).unwrap_or(1)
}

impl ClusterCtx {
    pub(crate) fn new(replicas: Arc<dyn Replicas>) -> ClusterCtx {
        ClusterCtx {
            replicas,
            coordinator: parking_lot::RwLock::new(CoordinatorState::Absent),
            producer_ids: tokio::sync::Mutex::new((0, 0)),
        }
    }

    /// Proposes `cmd` and maps every failure to a Kafka error code and message.
    pub(crate) async fn propose(&self, cmd: Command) -> Result<CommandOutput, (i16, String)> {
        match self.replicas.propose(cmd).await {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(rejected)) => Err((rejected.error_code().code(), rejected.to_string())),
            Err(err) => Err((err.error_code().code(), err.to_string())),
        }
    }

    /// Waits until `done` holds for the replication layer's image, at most
    /// `limit`. True when it held.
    pub(crate) async fn wait_image(
        &self,
        limit: Duration,
        done: impl Fn(&MetadataImage) -> bool,
    ) -> bool {
        let deadline = Instant::now() + limit;
        let mut changes = self.replicas.watch_image();
        loop {
            if done(&self.replicas.image()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            // The replication layer acts on an image shortly after the quorum
            // applies it: wake on every applied change, and poll briefly for
            // the replication layer's own step.
            let tick = deadline.min(Instant::now() + Duration::from_millis(20));
            let _ = tokio::time::timeout_at(tick, changes.changed()).await;
        }
    }

    /// The next producer id, taking a new block from the quorum when the
    /// current one is used up.
    pub(crate) async fn next_producer_id(&self) -> Result<i64, (i16, String)> {
        let mut ids = self.producer_ids.lock().await;
        if ids.0 >= ids.1 {
            match self
                .propose(Command::AllocateProducerIds {
                    count: PRODUCER_ID_BLOCK,
                })
                .await?
            {
                CommandOutput::ProducerIds { first, count } => *ids = (first, first + count),
                other => {
                    return Err((
                        sluice_vocab::ErrorCode::UnknownServerError.code(),
                        format!("unexpected answer to a producer id allocation: {other:?}"),
                    ))
                }
            }
        }
        let id = ids.0;
        ids.0 += 1;
        Ok(id)
    }

    /// The group coordinator, or the error group requests get.
    pub(crate) fn groups(&self) -> Result<Arc<GroupCoordinator>, i16> {
        match &*self.coordinator.read() {
            CoordinatorState::Ready(_, g) => Ok(g.clone()),
            CoordinatorState::Loading(_) => {
                Err(sluice_vocab::ErrorCode::CoordinatorLoadInProgress.code())
            }
            CoordinatorState::Absent => Err(sluice_vocab::ErrorCode::NotCoordinator.code()),
        }
    }
}

/// Follows leadership of `__consumer_offsets-0`: opens a coordinator (after
/// replaying the partition) while this node leads it, closes it when the
/// leadership goes or its epoch changes.
pub(crate) async fn follow_coordinator(
    ctx: Arc<ClusterCtx>,
    store: Arc<Store>,
    config: GroupConfig,
    mut stop: watch::Receiver<bool>,
) {
    let mut roles = ctx.replicas.watch_roles();
    loop {
        let wanted = ctx.replicas.leader_epoch_of(OFFSETS_TOPIC, 0);
        let current = match &*ctx.coordinator.read() {
            CoordinatorState::Absent => None,
            CoordinatorState::Loading(e) | CoordinatorState::Ready(e, _) => Some(*e),
        };
        if wanted != current {
            let old = std::mem::replace(
                &mut *ctx.coordinator.write(),
                match wanted {
                    Some(epoch) => CoordinatorState::Loading(epoch),
                    None => CoordinatorState::Absent,
                },
            );
            if let CoordinatorState::Ready(epoch, g) = old {
                tracing::info!(epoch, "no longer the group coordinator");
                g.close();
            }
        }
        if let Some(epoch) = wanted {
            let loading =
                matches!(&*ctx.coordinator.read(), CoordinatorState::Loading(e) if *e == epoch);
            if loading {
                // Loading waits for the high watermark; a role change (or
                // shutdown) abandons it.
                tokio::select! {
                    loaded = load_coordinator(&ctx, &store, &config, epoch) => {
                        if let Some(g) = loaded {
                            let mut state = ctx.coordinator.write();
                            if matches!(&*state, CoordinatorState::Loading(e) if *e == epoch) {
                                tracing::info!(epoch, "group coordinator ready");
                                *state = CoordinatorState::Ready(epoch, g);
                            } else {
                                g.close();
                            }
                        }
                        continue;
                    }
                    changed = roles.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        continue;
                    }
                    _ = stop.changed() => break,
                }
            }
        }
        tokio::select! {
            changed = roles.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            _ = stop.changed() => break,
        }
    }
    let old = std::mem::replace(&mut *ctx.coordinator.write(), CoordinatorState::Absent);
    if let CoordinatorState::Ready(_, g) = old {
        g.close();
    }
}

/// One attempt (with retries on errors) to open the coordinator for
/// `epoch`; None when the leadership moved on meanwhile.
async fn load_coordinator(
    ctx: &Arc<ClusterCtx>,
    store: &Arc<Store>,
    config: &GroupConfig,
    epoch: i32,
) -> Option<Arc<GroupCoordinator>> {
    loop {
        if ctx.replicas.leader_epoch_of(OFFSETS_TOPIC, 0) != Some(epoch) {
            return None;
        }
        let Some(partition) = store.partition(OFFSETS_TOPIC, 0) else {
            // The replication layer creates the local replica before it
            // takes the role; wait for it.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (images, roles) = (ctx.replicas.clone(), ctx.replicas.clone());
        let offsets = ReplicatedOffsets {
            partition,
            leader_epoch: epoch,
            partition_exists: Arc::new(move |topic, partition| {
                images.image().partition(topic, partition).is_some()
            }),
            still_leading: Arc::new(move || roles.leader_epoch_of(OFFSETS_TOPIC, 0) == Some(epoch)),
        };
        match GroupCoordinator::open_replicated(store.clone(), config.clone(), offsets).await {
            Ok(g) => return Some(g),
            Err(err) => {
                tracing::warn!(epoch, error = %err, "cannot load the group coordinator; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests;

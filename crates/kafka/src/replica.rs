//! [`Replicas`] on the real replication layer: `sluice_replica::ReplicaManager`
//! and the metadata quorum node it follows.

use std::sync::Arc;
use std::time::Duration;

use sluice_cluster::{ClusterError, Command, CommandResult, MetadataImage};
use sluice_log::{AppendResult, Partition};
use sluice_replica::{LeaderHandle, ReplicaManager};
use sluice_vocab::{ErrorCode, KafkaError};
use tokio::sync::watch;

use crate::cluster::{BoxFut, ProduceLeader, Replicas};

pub(crate) struct Live(pub Arc<ReplicaManager>);

/// NOT_LEADER_OR_FOLLOWER as the handlers still spell it.
const NOT_LEADER: i16 = ErrorCode::NotLeaderOrFollower.code();

/// Longest wait for the controller's read index on a metadata miss; a client
/// that asked for a topic this node does not know yet waits at most this long.
const CATCH_UP_WAIT: Duration = Duration::from_secs(2);

fn handle(leader: &ProduceLeader) -> Option<&LeaderHandle> {
    leader.token.downcast_ref::<LeaderHandle>()
}

impl Replicas for Live {
    fn image(&self) -> Arc<MetadataImage> {
        self.0.image()
    }

    fn watch_image(&self) -> watch::Receiver<Arc<MetadataImage>> {
        self.0.cluster().image()
    }

    fn controller_id(&self) -> Option<i32> {
        self.0.cluster().controller_id()
    }

    fn metadata_stale(&self) -> bool {
        self.0.lease_expired()
    }

    fn catch_up(&self) -> BoxFut<'_, Option<u64>> {
        Box::pin(async move {
            match self.0.cluster().catch_up(CATCH_UP_WAIT).await {
                Ok(index) => Some(index),
                Err(e) => {
                    tracing::debug!(error = %e, "metadata catch-up with the controller failed");
                    None
                }
            }
        })
    }

    fn propose(&self, cmd: Command) -> BoxFut<'_, Result<CommandResult, ClusterError>> {
        Box::pin(self.0.cluster().propose(cmd))
    }

    fn leader_for_produce(
        &self,
        topic: &str,
        partition: i32,
        acks_all: bool,
    ) -> Result<ProduceLeader, i16> {
        let h = self
            .0
            .leader_for_produce(topic, partition, acks_all)
            .map_err(ErrorCode::code)?;
        Ok(ProduceLeader {
            partition: h.partition.clone(),
            token: Arc::new(h),
        })
    }

    fn append(
        &self,
        leader: &ProduceLeader,
        records: &[u8],
    ) -> Result<AppendResult, (i16, String)> {
        let not_leader = || {
            (
                NOT_LEADER,
                "no longer the leader of this partition".to_owned(),
            )
        };
        match handle(leader).map(|h| h.append(records)) {
            Some(Ok(appended)) => Ok(appended),
            Some(Err(Some(err))) => Err((err.error_code().code(), err.to_string())),
            Some(Err(None)) | None => Err(not_leader()),
        }
    }

    fn wait_replicated<'a>(
        &'a self,
        leader: &'a ProduceLeader,
        end_offset: i64,
        timeout: Duration,
    ) -> BoxFut<'a, Result<(), i16>> {
        Box::pin(async move {
            match handle(leader) {
                Some(h) => self
                    .0
                    .wait_replicated(h, end_offset, timeout)
                    .await
                    .map_err(ErrorCode::code),
                None => Err(NOT_LEADER),
            }
        })
    }

    fn leader_for_read(
        &self,
        topic: &str,
        partition: i32,
        current_leader_epoch: i32,
    ) -> Result<(Arc<Partition>, i32), i16> {
        self.0
            .leader_for_read(topic, partition, current_leader_epoch)
            .map_err(ErrorCode::code)
    }

    fn on_follower_fetch(
        &self,
        topic: &str,
        partition: i32,
        replica_id: i32,
        fetch_offset: i64,
        current_leader_epoch: i32,
        log_start_offset: i64,
    ) -> Result<Arc<Partition>, i16> {
        self.0
            .on_follower_fetch(
                topic,
                partition,
                replica_id,
                fetch_offset,
                current_leader_epoch,
                log_start_offset,
            )
            .map_err(ErrorCode::code)
    }

    fn low_watermark(&self, topic: &str, partition: i32) -> Result<i64, i16> {
        self.0
            .low_watermark(topic, partition)
            .map_err(ErrorCode::code)
    }

    fn watch_roles(&self) -> watch::Receiver<u64> {
        self.0.watch_roles()
    }

    fn leader_epoch_of(&self, topic: &str, partition: i32) -> Option<i32> {
        self.0.leader_epoch_of(topic, partition)
    }
}

//! [`Topology`] on a [`Node`]: the quorum member answers metadata and proposals, the
//! replica manager answers leadership and the leader side of replication.

use std::sync::Arc;

use futures::future::BoxFuture;
use sluice_cluster::{Command, CommandOutput, MetadataImage, StaleView};
use sluice_log::Store;
use sluice_topology::{EpochAnswer, FetchAnswer, FetchArgs, Leadership, Topology};
use sluice_vocab::{ErrorCode, Refused};
use tokio::sync::watch;

use crate::{Node, CATCH_UP_WAIT, PRODUCER_ID_BLOCK};

impl Topology for Node {
    fn node_id(&self) -> i32 {
        self.cluster.node_id()
    }

    fn store(&self) -> &Arc<Store> {
        &self.store
    }

    fn image(&self) -> Arc<MetadataImage> {
        self.replicas.acted_image()
    }

    fn watch_image(&self) -> watch::Receiver<Arc<MetadataImage>> {
        self.replicas.watch_acted_image()
    }

    fn controller_id(&self) -> Option<i32> {
        self.cluster.controller_id()
    }

    fn stale_view(&self) -> Option<StaleView> {
        self.cluster.stale_view()
    }

    fn catch_up(&self) -> BoxFuture<'_, Option<u64>> {
        Box::pin(async move {
            match self.cluster.catch_up(CATCH_UP_WAIT).await {
                Ok(index) => Some(index),
                Err(e) => {
                    tracing::debug!(error = %e, "metadata catch-up with the controller failed");
                    None
                }
            }
        })
    }

    fn propose(&self, cmd: Command) -> BoxFuture<'_, Result<CommandOutput, Refused>> {
        Box::pin(async move {
            match self.cluster.propose(cmd).await {
                Ok(Ok(out)) => Ok(out),
                Ok(Err(rejected)) => Err(Refused::from_error(&rejected)),
                Err(err) => Err(Refused::from_error(&err)),
            }
        })
    }

    fn next_producer_id(&self) -> BoxFuture<'_, Result<i64, Refused>> {
        Box::pin(async move {
            let mut ids = self.producer_ids.lock().await;
            if ids.0 >= ids.1 {
                let cmd = Command::AllocateProducerIds {
                    count: PRODUCER_ID_BLOCK,
                };
                match self.propose(cmd).await? {
                    CommandOutput::ProducerIds { first, count } => *ids = (first, first + count),
                    other => {
                        return Err(Refused::new(
                            ErrorCode::UnknownServerError,
                            format!("unexpected answer to a producer id allocation: {other:?}"),
                        ))
                    }
                }
            }
            let id = ids.0;
            ids.0 += 1;
            Ok(id)
        })
    }

    fn lead_for_produce(
        &self,
        topic: &str,
        partition: i32,
        acks_all: bool,
    ) -> Result<Leadership, ErrorCode> {
        self.replicas.leader_for_produce(topic, partition, acks_all)
    }

    fn lead_for_read(
        &self,
        topic: &str,
        partition: i32,
        current_leader_epoch: i32,
    ) -> Result<Leadership, ErrorCode> {
        self.replicas
            .leader_for_read(topic, partition, current_leader_epoch)
    }

    fn leadership(&self, topic: &str, partition: i32) -> Option<Leadership> {
        self.replicas.leadership(topic, partition)
    }

    fn watch_roles(&self) -> watch::Receiver<u64> {
        self.replicas.watch_roles()
    }

    fn low_watermark(&self, topic: &str, partition: i32) -> Result<i64, ErrorCode> {
        self.replicas.low_watermark(topic, partition)
    }

    fn follower_fetch<'a>(
        &'a self,
        replica_id: i32,
        args: &'a FetchArgs,
    ) -> BoxFuture<'a, FetchAnswer> {
        Box::pin(self.replicas.answer_follower_fetch(replica_id, args))
    }

    fn end_offset_for_epoch(
        &self,
        topic: &str,
        partition: i32,
        current_leader_epoch: i32,
        leader_epoch: i32,
    ) -> EpochAnswer {
        self.replicas.answer_end_offset_for_epoch(
            topic,
            partition,
            current_leader_epoch,
            leader_epoch,
        )
    }
}

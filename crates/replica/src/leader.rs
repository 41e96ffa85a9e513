//! Leader state of one partition: follower progress, the high watermark, ISR changes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use sluice_cluster::{
    BrokerId, ClusterNode, Command, CommandOutput, MetadataImage, PartitionState,
};
use sluice_log::Partition;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::codes;

/// How long to wait before proposing again after a failed or rejected ISR change.
const ALTER_RETRY: Duration = Duration::from_millis(200);

/// What the leader knows about one follower.
#[derive(Debug, Clone, Copy)]
struct Progress {
    /// The follower's durable log end, from its last fetch; `None` before its first
    /// fetch in this leadership.
    fetch_offset: Option<i64>,
    /// Last time the follower was caught up (Kafka's `lastCaughtUpTimeMs`).
    last_caught_up: Instant,
    /// Time of the previous fetch and the leader's log end then.
    last_fetch: Instant,
    last_fetch_leader_end: i64,
    /// The follower's log start offset from its last fetch (`None`: not reported).
    log_start: Option<i64>,
}

impl Progress {
    fn new(now: Instant) -> Progress {
        Progress {
            fetch_offset: None,
            last_caught_up: now,
            last_fetch: now,
            last_fetch_leader_end: i64::MAX,
            log_start: None,
        }
    }
}

struct Inner {
    /// False once the role is given up: nothing may move the HW or answer acks after.
    active: bool,
    replicas: Vec<BrokerId>,
    /// The committed ISR as this leader knows it (image or AlterPartition answer).
    isr: Vec<BrokerId>,
    partition_epoch: i32,
    followers: HashMap<BrokerId, Progress>,
    /// The ISR proposed by the AlterPartition in flight.
    pending: Option<Vec<BrokerId>>,
    pending_task: Option<JoinHandle<()>>,
    retry_after: Option<Instant>,
}

impl Inner {
    /// Image ISR ∪ the in-flight proposal (KIP-497's maximal ISR).
    fn maximal_isr(&self) -> impl Iterator<Item = BrokerId> + '_ {
        let pending = self.pending.iter().flatten().copied();
        self.isr
            .iter()
            .copied()
            .chain(pending.filter(|r| !self.isr.contains(r)))
    }
}

/// This node leads `topic`-`index` in `epoch`.
pub(crate) struct Leader {
    pub(crate) me: BrokerId,
    pub(crate) topic: String,
    pub(crate) index: i32,
    pub(crate) epoch: i32,
    pub(crate) partition: Arc<Partition>,
    /// The log end when this leadership began: a follower rejoins the ISR only once it
    /// has everything up to here.
    epoch_start: i64,
    lag_max: Duration,
    cluster: Arc<ClusterNode>,
    inner: Mutex<Inner>,
}

impl Leader {
    pub(crate) fn new(
        me: BrokerId,
        topic: &str,
        index: i32,
        state: &PartitionState,
        partition: Arc<Partition>,
        lag_max: Duration,
        cluster: Arc<ClusterNode>,
    ) -> Arc<Leader> {
        let now = Instant::now();
        let followers = state
            .replicas
            .iter()
            .filter(|r| **r != me)
            .map(|r| (*r, Progress::new(now)))
            .collect();
        let leader = Arc::new(Leader {
            me,
            topic: topic.to_string(),
            index,
            epoch: state.leader_epoch,
            epoch_start: partition.log_end_offset(),
            partition,
            lag_max,
            cluster,
            inner: Mutex::new(Inner {
                active: true,
                replicas: state.replicas.clone(),
                isr: state.isr.clone(),
                partition_epoch: state.partition_epoch,
                followers,
                pending: None,
                pending_task: None,
                retry_after: None,
            }),
        });
        leader.update_hw(&leader.inner.lock());
        leader
    }

    pub(crate) fn is_active(&self) -> bool {
        self.inner.lock().active
    }

    /// Gives the role up: the HW stops moving, waiters get NOT_LEADER_OR_FOLLOWER.
    pub(crate) fn deactivate(&self) {
        let mut g = self.inner.lock();
        g.active = false;
        if let Some(t) = g.pending_task.take() {
            t.abort();
        }
    }

    /// The smallest log start offset among this replica and the in-sync followers
    /// that reported one (Kafka's low watermark).
    pub(crate) fn low_watermark(&self) -> i64 {
        let g = self.inner.lock();
        let own = self.partition.log_start_offset();
        g.isr
            .iter()
            .filter(|r| **r != self.me)
            .filter_map(|r| g.followers.get(r).and_then(|p| p.log_start))
            .fold(own, i64::min)
    }

    /// The committed ISR as this leader knows it.
    pub(crate) fn isr_len(&self) -> usize {
        self.inner.lock().isr.len()
    }

    /// A newer record of this partition (same leader epoch) from the image.
    pub(crate) fn on_image(&self, state: &PartitionState) {
        let mut g = self.inner.lock();
        self.adopt(&mut g, state);
    }

    fn adopt(&self, g: &mut Inner, state: &PartitionState) {
        if state.leader != self.me
            || state.leader_epoch != self.epoch
            || state.partition_epoch <= g.partition_epoch
        {
            return;
        }
        g.replicas = state.replicas.clone();
        g.isr = state.isr.clone();
        g.partition_epoch = state.partition_epoch;
        let now = Instant::now();
        for r in &state.replicas {
            if *r != self.me {
                g.followers.entry(*r).or_insert_with(|| Progress::new(now));
            }
        }
        let replicas = g.replicas.clone();
        g.followers.retain(|r, _| replicas.contains(r));
        self.update_hw(g);
    }

    /// HW = min(own durable end, fetch offsets of the maximal ISR).
    fn update_hw(&self, g: &Inner) {
        if !g.active {
            return;
        }
        let mut hw = self.partition.durable_end_offset();
        for r in g.maximal_isr() {
            if r == self.me {
                continue;
            }
            match g.followers.get(&r).and_then(|p| p.fetch_offset) {
                Some(o) => hw = hw.min(o),
                // Not heard from in this leadership: hold the HW.
                None => return,
            }
        }
        self.partition.advance_high_watermark(hw);
    }

    /// The local durable end moved.
    pub(crate) fn on_durable_end(&self) {
        self.update_hw(&self.inner.lock());
    }

    /// A fetch from follower `replica` at `fetch_offset` (its durable end), holding
    /// `log_start` (its log start offset, -1 when not sent).
    pub(crate) fn on_follower_fetch(
        self: &Arc<Self>,
        replica: BrokerId,
        fetch_offset: i64,
        log_start: i64,
    ) -> Result<(), i16> {
        let mut g = self.inner.lock();
        if !g.active {
            return Err(codes::NOT_LEADER_OR_FOLLOWER);
        }
        if replica == self.me || !g.replicas.contains(&replica) {
            return Err(codes::NOT_LEADER_OR_FOLLOWER);
        }
        let leader_end = self.partition.log_end_offset();
        if fetch_offset < self.partition.log_start_offset() || fetch_offset > leader_end {
            return Err(codes::OFFSET_OUT_OF_RANGE);
        }
        let now = Instant::now();
        let p = g
            .followers
            .entry(replica)
            .or_insert_with(|| Progress::new(now));
        if fetch_offset >= leader_end {
            p.last_caught_up = now;
        } else if fetch_offset >= p.last_fetch_leader_end {
            p.last_caught_up = p.last_caught_up.max(p.last_fetch);
        }
        p.last_fetch = now;
        p.last_fetch_leader_end = leader_end;
        p.fetch_offset = Some(fetch_offset);
        if log_start >= 0 {
            p.log_start = Some(log_start);
        }
        self.update_hw(&g);
        self.maybe_expand(&mut g, replica, fetch_offset);
        Ok(())
    }

    fn can_propose(&self, g: &Inner) -> bool {
        g.active && g.pending.is_none() && g.retry_after.is_none_or(|t| Instant::now() >= t)
    }

    fn maybe_expand(self: &Arc<Self>, g: &mut Inner, replica: BrokerId, fetch_offset: i64) {
        if g.isr.contains(&replica) || !self.can_propose(g) {
            return;
        }
        if fetch_offset < self.partition.high_watermark() || fetch_offset < self.epoch_start {
            return;
        }
        let mut new_isr = g.isr.clone();
        new_isr.push(replica);
        tracing::info!(
            topic = %self.topic,
            partition = self.index,
            replica,
            fetch_offset,
            "follower caught up; expanding the ISR"
        );
        self.propose(g, new_isr);
    }

    /// Shrinks out ISR members not caught up for longer than the lag limit.
    pub(crate) fn maybe_shrink(self: &Arc<Self>) {
        let mut g = self.inner.lock();
        if !self.can_propose(&g) {
            return;
        }
        let now = Instant::now();
        let lagging: Vec<BrokerId> = g
            .isr
            .iter()
            .copied()
            .filter(|r| *r != self.me)
            .filter(|r| {
                g.followers
                    .get(r)
                    .is_none_or(|p| now.saturating_duration_since(p.last_caught_up) > self.lag_max)
            })
            .collect();
        if lagging.is_empty() {
            return;
        }
        let new_isr: Vec<BrokerId> = g
            .isr
            .iter()
            .copied()
            .filter(|r| !lagging.contains(r))
            .collect();
        tracing::info!(
            topic = %self.topic,
            partition = self.index,
            ?lagging,
            "followers lag behind; shrinking the ISR"
        );
        self.propose(&mut g, new_isr);
    }

    fn propose(self: &Arc<Self>, g: &mut Inner, new_isr: Vec<BrokerId>) {
        let cmd = Command::AlterPartition {
            topic: self.topic.clone(),
            partition: self.index,
            leader_id: self.me,
            leader_epoch: self.epoch,
            partition_epoch: g.partition_epoch,
            new_isr: new_isr.clone(),
        };
        g.pending = Some(new_isr);
        let me = self.clone();
        g.pending_task = Some(tokio::spawn(async move {
            let result = me.cluster.propose(cmd).await;
            let image = me.cluster.image().borrow().clone();
            me.alter_done(result, &image);
        }));
    }

    fn alter_done(
        &self,
        result: Result<sluice_cluster::CommandResult, sluice_cluster::ClusterError>,
        image: &MetadataImage,
    ) {
        let mut g = self.inner.lock();
        g.pending = None;
        g.pending_task = None;
        match result {
            Ok(Ok(CommandOutput::Partition(state))) => {
                g.retry_after = None;
                self.adopt(&mut g, &state);
            }
            Ok(Ok(other)) => {
                tracing::warn!(?other, "unexpected AlterPartition answer");
                g.retry_after = Some(Instant::now() + ALTER_RETRY);
            }
            Ok(Err(e)) => {
                tracing::info!(topic = %self.topic, partition = self.index, error = %e,
                    "ISR change rejected; re-reading the image");
                g.retry_after = Some(Instant::now() + ALTER_RETRY);
            }
            Err(e) => {
                tracing::info!(topic = %self.topic, partition = self.index, error = %e,
                    "ISR change not proposed or outcome unknown; re-reading the image");
                g.retry_after = Some(Instant::now() + ALTER_RETRY);
            }
        }
        // Whatever happened, the image is the truth (an unknown outcome may have
        // committed, a rejection means our view was stale).
        if let Some(state) = image.partition(&self.topic, self.index) {
            self.adopt(&mut g, state);
        }
        self.update_hw(&g);
    }
}

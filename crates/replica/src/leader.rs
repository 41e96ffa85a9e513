//! Leader state of one partition: follower progress, the high watermark, ISR changes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use sluice_cluster::{
    BrokerId, ClusterNode, Command, CommandOutput, MetadataImage, PartitionState,
};
use sluice_log::Partition;
use sluice_topology::{Leadership, Term};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use sluice_vocab::ErrorCode;

/// How long to wait before proposing the same ISR again after it failed or was
/// rejected. A different ISR (another eligible follower) may be proposed at once.
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
    /// The size of the ISR the pending proposal changes (for the shrink
    /// and expand counts once it takes effect).
    pending_from: usize,
    pending_task: Option<JoinHandle<()>>,
    /// The last ISR proposal that failed or was rejected, and until when not to
    /// propose that same ISR again.
    failed: Option<(Vec<BrokerId>, Instant)>,
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
    /// Ends with the role; every [`Leadership`] handed out shares it.
    term: Arc<Term>,
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
            term: Term::new(),
            inner: Mutex::new(Inner {
                active: true,
                replicas: state.replicas.clone(),
                isr: state.isr.clone(),
                partition_epoch: state.partition_epoch,
                followers,
                pending: None,
                pending_from: 0,
                pending_task: None,
                failed: None,
            }),
        });
        leader.update_hw(&leader.inner.lock());
        leader
    }

    pub(crate) fn is_active(&self) -> bool {
        self.term.is_current()
    }

    /// The partition as a front end leads it, for as long as this role lasts.
    pub(crate) fn leadership(&self) -> Leadership {
        Leadership::new(self.partition.clone(), self.epoch, self.term.clone())
    }

    /// Gives the role up: the HW stops moving, appends through its leaderships are
    /// refused and commit waiters get NOT_LEADER_OR_FOLLOWER.
    pub(crate) fn deactivate(&self) {
        let mut g = self.inner.lock();
        g.active = false;
        self.term.end();
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
        if state.leader != self.me || state.leader_epoch > self.epoch {
            // The metadata has moved the leadership on (an AlterPartition
            // answer or the image can say so before the manager gives the
            // role up). From here the HW must not move: followers that have
            // not learnt of the new leader yet would otherwise let this
            // deposed leader acknowledge records the new one never had
            // (seen when a reassignment's ISR expansion completed and moved
            // the leadership at once).
            g.active = false;
            self.term.end();
            return;
        }
        if state.leader_epoch != self.epoch || state.partition_epoch <= g.partition_epoch {
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
    ) -> Result<(), ErrorCode> {
        let mut g = self.inner.lock();
        if !g.active {
            return Err(ErrorCode::NotLeaderOrFollower);
        }
        if replica == self.me || !g.replicas.contains(&replica) {
            return Err(ErrorCode::NotLeaderOrFollower);
        }
        let leader_end = self.partition.log_end_offset();
        if fetch_offset < self.partition.log_start_offset() || fetch_offset > leader_end {
            return Err(ErrorCode::OffsetOutOfRange);
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
        self.maybe_change_isr(&mut g);
        Ok(())
    }

    /// Proposes the ISR [`next_isr`] asks for, unless a proposal is in flight or the
    /// same ISR failed a moment ago. Runs on every follower fetch and on the leader's
    /// timer, so a follower that became eligible between fetches is not forgotten.
    fn maybe_change_isr(self: &Arc<Self>, g: &mut Inner) {
        if !g.active || g.pending.is_some() {
            return;
        }
        let hw = self.partition.high_watermark();
        let image = self.cluster.image().borrow().clone();
        let Some(change) = next_isr(
            self.me,
            &g.isr,
            &g.followers,
            Instant::now(),
            self.lag_max,
            hw.max(self.epoch_start),
            |r| image.is_live(r),
        ) else {
            return;
        };
        if let Some((isr, until)) = &g.failed {
            if *isr == change.isr && Instant::now() < *until {
                return;
            }
        }
        match &change.reason {
            IsrChange::Shrink(lagging) => tracing::info!(
                topic = %self.topic,
                partition = self.index,
                ?lagging,
                "followers lag behind; shrinking the ISR"
            ),
            IsrChange::Expand(joining) => tracing::info!(
                topic = %self.topic,
                partition = self.index,
                ?joining,
                "followers caught up; expanding the ISR"
            ),
        }
        self.propose(g, change.isr);
    }

    /// The timer's turn: laggards are shrunk out, eligible followers added.
    pub(crate) fn on_tick(self: &Arc<Self>) {
        let mut g = self.inner.lock();
        self.maybe_change_isr(&mut g);
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
        g.pending_from = g.isr.len();
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
        let proposed = g.pending.take().unwrap_or_default();
        g.pending_task = None;
        let failed = Some((proposed, Instant::now() + ALTER_RETRY));
        match result {
            Ok(Ok(CommandOutput::Partition(state))) => {
                g.failed = None;
                crate::replica_metrics().isr_changed(g.pending_from, state.isr.len());
                self.adopt(&mut g, &state);
            }
            Ok(Ok(other)) => {
                tracing::warn!(?other, "unexpected AlterPartition answer");
                g.failed = failed;
            }
            Ok(Err(e)) => {
                tracing::info!(topic = %self.topic, partition = self.index, error = %e,
                    "ISR change rejected; re-reading the image");
                g.failed = failed;
            }
            Err(e) => {
                tracing::info!(topic = %self.topic, partition = self.index, error = %e,
                    "ISR change not proposed or outcome unknown; re-reading the image");
                g.failed = failed;
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

/// Why the ISR changes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum IsrChange {
    /// These members were not caught up for longer than the lag limit.
    Shrink(Vec<BrokerId>),
    /// These followers hold everything the leader must have them hold.
    Expand(Vec<BrokerId>),
}

/// An ISR a leader should propose, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NextIsr {
    isr: Vec<BrokerId>,
    reason: IsrChange,
}

/// The ISR change a leader should propose, if any. Shrinking comes first: members
/// (other than the leader) not caught up for longer than `lag_max` leave. Otherwise
/// every follower outside the ISR whose fetch offset reached `join_at` (the high
/// watermark and the start of the leader's epoch, whichever is larger) joins, as long
/// as `eligible` says so (the image shows it registered and unfenced: the controller
/// refuses anything else, and proposing it again and again would starve the others).
fn next_isr(
    me: BrokerId,
    isr: &[BrokerId],
    followers: &HashMap<BrokerId, Progress>,
    now: Instant,
    lag_max: Duration,
    join_at: i64,
    eligible: impl Fn(BrokerId) -> bool,
) -> Option<NextIsr> {
    let lagging: Vec<BrokerId> = isr
        .iter()
        .copied()
        .filter(|r| *r != me)
        .filter(|r| {
            followers
                .get(r)
                .is_none_or(|p| now.saturating_duration_since(p.last_caught_up) > lag_max)
        })
        .collect();
    if !lagging.is_empty() {
        return Some(NextIsr {
            isr: isr
                .iter()
                .copied()
                .filter(|r| !lagging.contains(r))
                .collect(),
            reason: IsrChange::Shrink(lagging),
        });
    }
    let mut joining: Vec<BrokerId> = followers
        .iter()
        .filter(|(r, _)| **r != me && !isr.contains(r))
        .filter(|(_, p)| p.fetch_offset.is_some_and(|o| o >= join_at))
        .map(|(r, _)| *r)
        .filter(|r| eligible(*r))
        .collect();
    if joining.is_empty() {
        return None;
    }
    joining.sort_unstable();
    let mut new_isr = isr.to_vec();
    new_isr.extend(joining.iter().copied());
    Some(NextIsr {
        isr: new_isr,
        reason: IsrChange::Expand(joining),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caught_up(offset: i64, now: Instant) -> Progress {
        Progress {
            fetch_offset: Some(offset),
            last_caught_up: now,
            last_fetch: now,
            last_fetch_leader_end: offset,
            log_start: None,
        }
    }

    #[test]
    fn a_fenced_follower_that_still_fetches_does_not_keep_an_eligible_one_out() {
        // The bridge: leader 2 with ISR [2]; follower 1 is fenced by the controller
        // but still reaches the leader and fetches; follower 3 is eligible. Both are
        // caught up.
        let now = Instant::now();
        let followers = HashMap::from([(1, caught_up(100, now)), (3, caught_up(100, now))]);
        let next = next_isr(2, &[2], &followers, now, Duration::from_secs(5), 100, |r| {
            r != 1
        });
        assert_eq!(
            next,
            Some(NextIsr {
                isr: vec![2, 3],
                reason: IsrChange::Expand(vec![3])
            })
        );
    }

    #[test]
    fn every_eligible_caught_up_follower_joins_at_once_and_laggards_do_not() {
        let now = Instant::now();
        let followers = HashMap::from([
            (1, caught_up(100, now)),
            (3, caught_up(99, now)),
            (4, caught_up(120, now)),
        ]);
        let next = next_isr(
            2,
            &[2],
            &followers,
            now,
            Duration::from_secs(5),
            100,
            |_| true,
        );
        assert_eq!(
            next,
            Some(NextIsr {
                isr: vec![2, 1, 4],
                reason: IsrChange::Expand(vec![1, 4])
            })
        );
        // Nobody eligible: no proposal at all.
        assert_eq!(
            next_isr(
                2,
                &[2],
                &followers,
                now,
                Duration::from_secs(5),
                100,
                |_| false
            ),
            None
        );
    }

    #[test]
    fn lagging_members_are_shrunk_out_before_anyone_joins() {
        let now = Instant::now();
        let lag = Duration::from_secs(5);
        let mut stale = caught_up(50, now);
        stale.last_caught_up = now.checked_sub(Duration::from_secs(6)).unwrap_or(now);
        let followers = HashMap::from([(1, stale), (3, caught_up(100, now))]);
        let next = next_isr(2, &[2, 1], &followers, now, lag, 100, |_| true);
        assert_eq!(
            next,
            Some(NextIsr {
                isr: vec![2],
                reason: IsrChange::Shrink(vec![1])
            })
        );
        // A member never heard from in this leadership counts as lagging too.
        let next = next_isr(2, &[2, 5], &HashMap::new(), now, lag, 100, |_| true);
        assert_eq!(next.map(|n| n.isr), Some(vec![2]));
    }
}

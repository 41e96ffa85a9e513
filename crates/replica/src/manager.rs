//! [`ReplicaManager`]: the image watcher, the roles, and the API the Kafka front end
//! calls.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use sluice_cluster::{BrokerId, ClusterNode, MetadataImage, PartitionState, NO_LEADER};
use sluice_log::{LogError, Partition, ReadLimit, Store};
use sluice_topology::Leadership;
use sluice_vocab::ErrorCode;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::follower::Fetcher;
use crate::leader::Leader;
use crate::transport::{EpochAnswer, FetchAnswer, FetchArgs, LeaderConnector};
use crate::{ReplicaConfig, TcpConnector};

/// When applying an image failed locally (disk), try again this soon.
const IMAGE_RETRY: Duration = Duration::from_secs(1);

type Key = (String, i32);

/// A topic as last made to match the image: (id, partition count, configs).
type TopicDesc = ([u8; 16], u32, BTreeMap<String, String>);

enum Role {
    Leader {
        leader: Arc<Leader>,
        /// Raises the HW with the durable end and shrinks the ISR on a timer.
        task: JoinHandle<()>,
    },
    Follower {
        leader: BrokerId,
        epoch: i32,
        task: JoinHandle<()>,
    },
}

impl Role {
    /// Stops the role; returns once nothing of it runs any more.
    async fn stop(self) {
        match self {
            Role::Leader { leader, task } => {
                leader.deactivate();
                task.abort();
                let _ = task.await;
            }
            Role::Follower { task, .. } => {
                task.abort();
                let _ = task.await;
            }
        }
    }
}

struct Slot {
    partition: Arc<Partition>,
    role: Option<Role>,
}

#[derive(Default)]
struct State {
    slots: HashMap<Key, Slot>,
    /// Topics as last made to match the image.
    topics: HashMap<String, TopicDesc>,
}

/// What the image asks this node to be for one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Wanted {
    Leader(i32),
    Follower(BrokerId, i32),
    Offline,
}

fn wanted(me: BrokerId, p: &PartitionState) -> Wanted {
    if p.leader == me {
        Wanted::Leader(p.leader_epoch)
    } else if p.leader == NO_LEADER {
        Wanted::Offline
    } else {
        Wanted::Follower(p.leader, p.leader_epoch)
    }
}

/// Replication of this broker's partitions. See the crate docs.
pub struct ReplicaManager {
    cfg: ReplicaConfig,
    store: Arc<Store>,
    cluster: Arc<ClusterNode>,
    connector: Arc<dyn LeaderConnector>,
    images: watch::Receiver<Arc<MetadataImage>>,
    /// The last image this node has fully acted on: local topics match it and roles
    /// are taken (what front ends answer from, so a change they waited for is usable).
    acted: watch::Sender<Arc<MetadataImage>>,
    /// Role changes are applied by the watcher only; this lock is held across them.
    apply_lock: tokio::sync::Mutex<()>,
    state: Mutex<State>,
    roles_tx: watch::Sender<u64>,
    watcher: Mutex<Option<JoinHandle<()>>>,
    stopped: AtomicBool,
}

impl ReplicaManager {
    /// Starts replication with followers fetching over the Kafka protocol
    /// ([`TcpConnector`]). Must be called inside a Tokio runtime.
    pub fn start(store: Arc<Store>, cluster: Arc<ClusterNode>, cfg: ReplicaConfig) -> Arc<Self> {
        let connector = Arc::new(TcpConnector::new(cfg.node_id));
        ReplicaManager::start_with(store, cluster, cfg, connector)
    }

    /// Starts replication with followers reaching leaders through `connector`.
    pub fn start_with(
        store: Arc<Store>,
        cluster: Arc<ClusterNode>,
        cfg: ReplicaConfig,
        connector: Arc<dyn LeaderConnector>,
    ) -> Arc<Self> {
        let images = cluster.image();
        let mgr = Arc::new(ReplicaManager {
            cfg,
            store,
            cluster,
            connector,
            images,
            acted: watch::channel(Arc::new(MetadataImage::default())).0,
            apply_lock: tokio::sync::Mutex::new(()),
            state: Mutex::new(State::default()),
            roles_tx: watch::channel(0).0,
            watcher: Mutex::new(None),
            stopped: AtomicBool::new(false),
        });
        let task = tokio::spawn(watch_images(Arc::downgrade(&mgr), mgr.cluster.image()));
        *mgr.watcher.lock() = Some(task);
        mgr
    }

    /// This broker's id.
    pub fn node_id(&self) -> BrokerId {
        self.cfg.node_id
    }

    /// The latest metadata image the quorum applied locally.
    pub fn image(&self) -> Arc<MetadataImage> {
        self.images.borrow().clone()
    }

    /// The latest image this node has acted on: every local topic matches it and
    /// every partition role it gives this node is taken (a failed step is retried,
    /// and the image is published only once all of it succeeded).
    pub fn acted_image(&self) -> Arc<MetadataImage> {
        self.acted.borrow().clone()
    }

    /// Changes whenever [`Self::acted_image`] does.
    pub fn watch_acted_image(&self) -> watch::Receiver<Arc<MetadataImage>> {
        self.acted.subscribe()
    }

    /// The metadata quorum member this manager follows.
    pub fn cluster(&self) -> &Arc<ClusterNode> {
        &self.cluster
    }

    /// The local store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub(crate) fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Whether this node's metadata view may be stale
    /// ([`ClusterNode::stale_view`]: no quorum-backed controller answered its
    /// heartbeats for a session, or it is fenced): it leads nothing then, and its
    /// view of who leads what may be out of date.
    pub fn lease_expired(&self) -> bool {
        self.cluster.stale_view().is_some()
    }

    /// The leader state of a partition this node leads in the epoch its current image
    /// says; Kafka error code otherwise (3 unknown, 6 not the leader).
    fn current_leader(
        &self,
        topic: &str,
        partition: i32,
    ) -> Result<(Arc<Leader>, Arc<MetadataImage>), ErrorCode> {
        let image = self.image();
        let Some(p) = image.partition(topic, partition) else {
            return Err(ErrorCode::UnknownTopicOrPartition);
        };
        if p.leader != self.cfg.node_id {
            return Err(ErrorCode::NotLeaderOrFollower);
        }
        // Refusing is always safe; serving after our lease may have expired
        // only makes clients wait on a leader that can no longer commit.
        if self.lease_expired() {
            return Err(ErrorCode::NotLeaderOrFollower);
        }
        let epoch = p.leader_epoch;
        let state = self.state.lock();
        match state
            .slots
            .get(&(topic.to_string(), partition))
            .and_then(|s| s.role.as_ref())
        {
            Some(Role::Leader { leader, .. }) if leader.epoch == epoch && leader.is_active() => {
                Ok((leader.clone(), image.clone()))
            }
            // The watcher has not taken the role yet (or is giving it up).
            _ => Err(ErrorCode::NotLeaderOrFollower),
        }
    }

    /// Produce path: the leadership to append under (UNKNOWN_TOPIC_OR_PARTITION,
    /// NOT_LEADER_OR_FOLLOWER). With `acks_all`, NOT_ENOUGH_REPLICAS when the ISR is
    /// smaller than the topic's `min.insync.replicas` (capped at the replica count).
    pub fn leader_for_produce(
        &self,
        topic: &str,
        partition: i32,
        acks_all: bool,
    ) -> Result<Leadership, ErrorCode> {
        let (leader, image) = self.current_leader(topic, partition)?;
        if acks_all {
            let replicas = image
                .partition(topic, partition)
                .map_or(1, |p| p.replicas.len());
            let configured = usize::try_from(leader.partition.min_insync_replicas()).unwrap_or(1);
            if leader.isr_len() < configured.clamp(1, replicas.max(1)) {
                return Err(ErrorCode::NotEnoughReplicas);
            }
        }
        Ok(leader.leadership())
    }

    /// Leader-only reads (consumer fetch, ListOffsets, OffsetForLeaderEpoch,
    /// DeleteRecords): the leadership, with `current_leader_epoch` checked when >= 0.
    pub fn leader_for_read(
        &self,
        topic: &str,
        partition: i32,
        current_leader_epoch: i32,
    ) -> Result<Leadership, ErrorCode> {
        let (leader, _) = self.current_leader(topic, partition)?;
        check_epoch(current_leader_epoch, leader.epoch)?;
        Ok(leader.leadership())
    }

    /// A Fetch from follower `replica_id`: checks the epoch, records
    /// `fetch_offset` as that follower's durable end (and `log_start_offset`, -1 when
    /// not sent, as its log start), recomputes the HW and ISR expansion. Returns the
    /// partition to read from (follower reads go up to the log end, not the HW).
    /// Err(1) when `fetch_offset` is outside the leader's log.
    pub fn on_follower_fetch(
        &self,
        topic: &str,
        partition: i32,
        replica_id: i32,
        fetch_offset: i64,
        current_leader_epoch: i32,
        log_start_offset: i64,
    ) -> Result<Arc<Partition>, ErrorCode> {
        let (leader, _) = self.current_leader(topic, partition)?;
        check_epoch(current_leader_epoch, leader.epoch)?;
        leader.on_follower_fetch(replica_id, fetch_offset, log_start_offset)?;
        Ok(leader.partition.clone())
    }

    /// Kafka's low watermark of a partition this node leads: the smallest log start
    /// offset among this replica and the in-sync followers that reported theirs in
    /// this leadership. DeleteRecords is done once it reaches the requested offset.
    pub fn low_watermark(&self, topic: &str, partition: i32) -> Result<i64, ErrorCode> {
        let (leader, _) = self.current_leader(topic, partition)?;
        Ok(leader.low_watermark())
    }

    /// The whole leader side of a follower fetch, for transports that call in directly
    /// ([`crate::InProcessConnector`]) and usable by a front end: `on_follower_fetch`,
    /// then hold the request up to `max_wait` while there is nothing past
    /// `fetch_offset`, then read up to the log end.
    pub async fn answer_follower_fetch(&self, replica_id: i32, args: &FetchArgs) -> FetchAnswer {
        // The high watermark before this fetch is the most the follower can
        // know. When this fetch is what moves it (the last in-sync follower
        // catching up), answer at once: held, the follower would serve a stale
        // high watermark (to follower reads, to lag figures, to a failover)
        // for up to `max_wait`.
        let hw_known = self
            .store
            .partition(&args.topic, args.partition)
            .map(|p| p.high_watermark());
        let p = match self.on_follower_fetch(
            &args.topic,
            args.partition,
            replica_id,
            args.fetch_offset,
            args.current_leader_epoch,
            args.log_start_offset,
        ) {
            Ok(p) => p,
            Err(code) => {
                let mut a = FetchAnswer::error(code);
                if code == ErrorCode::OffsetOutOfRange {
                    if let Some(p) = self.store.partition(&args.topic, args.partition) {
                        a.log_start_offset = p.log_start_offset();
                    }
                }
                return a;
            }
        };
        if p.log_end_offset() <= args.fetch_offset {
            let mut durable = p.watch_durable_end();
            let mut hw = p.watch_high_watermark();
            let hw_now = hw_known.unwrap_or(*hw.borrow_and_update());
            let _ = tokio::time::timeout(args.max_wait, async {
                loop {
                    if p.log_end_offset() > args.fetch_offset || *hw.borrow() != hw_now {
                        return;
                    }
                    tokio::select! {
                        r = durable.changed() => if r.is_err() { return },
                        r = hw.changed() => if r.is_err() { return },
                    }
                }
            })
            .await;
        }
        match p.read(args.fetch_offset, args.max_bytes, true, ReadLimit::LogEnd) {
            Ok(r) => FetchAnswer {
                error: None,
                high_watermark: r.high_watermark,
                log_start_offset: r.log_start_offset,
                records: r.records,
            },
            Err(LogError::OffsetOutOfRange { log_start, .. }) => FetchAnswer {
                log_start_offset: log_start,
                ..FetchAnswer::error(ErrorCode::OffsetOutOfRange)
            },
            Err(LogError::UnknownTopicOrPartition(_)) => {
                FetchAnswer::error(ErrorCode::UnknownTopicOrPartition)
            }
            Err(_) => FetchAnswer::error(ErrorCode::KafkaStorageError),
        }
    }

    /// The leader side of OffsetForLeaderEpoch (followers' and consumers'): checks the
    /// epoch (FENCED_LEADER_EPOCH / UNKNOWN_LEADER_EPOCH), then the end offset of
    /// `leader_epoch` (or of the largest smaller epoch).
    pub fn answer_end_offset_for_epoch(
        &self,
        topic: &str,
        partition: i32,
        current_leader_epoch: i32,
        leader_epoch: i32,
    ) -> EpochAnswer {
        match self.leader_for_read(topic, partition, current_leader_epoch) {
            Ok(lead) => {
                let (epoch, end) = lead.partition().end_offset_for_epoch(leader_epoch);
                EpochAnswer {
                    error: None,
                    leader_epoch: epoch,
                    end_offset: end,
                }
            }
            Err(code) => EpochAnswer::error(code),
        }
    }

    /// Fires whenever roles change; [`Self::leadership`] tells whether we lead.
    pub fn watch_roles(&self) -> watch::Receiver<u64> {
        self.roles_tx.subscribe()
    }

    /// The leadership this node holds of the partition now, if it leads it.
    pub fn leadership(&self, topic: &str, partition: i32) -> Option<Leadership> {
        let state = self.state.lock();
        match state
            .slots
            .get(&(topic.to_string(), partition))
            .and_then(|s| s.role.as_ref())
        {
            Some(Role::Leader { leader, .. }) if leader.is_active() => Some(leader.leadership()),
            _ => None,
        }
    }

    /// The epoch this node leads the partition in, if it does.
    pub fn leader_epoch_of(&self, topic: &str, partition: i32) -> Option<i32> {
        self.leadership(topic, partition).map(|l| l.epoch())
    }

    /// The leader this node follows for the partition, with the epoch, if it follows.
    pub fn following(&self, topic: &str, partition: i32) -> Option<(BrokerId, i32)> {
        let state = self.state.lock();
        match state
            .slots
            .get(&(topic.to_string(), partition))
            .and_then(|s| s.role.as_ref())
        {
            Some(Role::Follower { leader, epoch, .. }) => Some((*leader, *epoch)),
            _ => None,
        }
    }

    /// Stops the image watcher and every role (leaders answer 6 from now on).
    /// Idempotent. The cluster node is not shut down.
    pub async fn shutdown(&self) {
        self.stopped.store(true, Ordering::Release);
        let watcher = self.watcher.lock().take();
        if let Some(t) = watcher {
            t.abort();
            let _ = t.await;
        }
        let _guard = self.apply_lock.lock().await;
        let roles: Vec<Role> = {
            let mut state = self.state.lock();
            state
                .slots
                .values_mut()
                .filter_map(|s| s.role.take())
                .collect()
        };
        for r in roles {
            r.stop().await;
        }
        self.bump_roles();
    }

    fn bump_roles(&self) {
        self.roles_tx.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Makes local state match `image`. Returns false when something failed locally
    /// (retried later).
    async fn apply_image(&self, image: &Arc<MetadataImage>) -> bool {
        let _guard = self.apply_lock.lock().await;
        if self.is_stopped() {
            return true;
        }
        let me = self.cfg.node_id;
        let mut ok = true;
        let mut changed = false;

        // Partitions this node replicates, per the image. Until this process
        // is registered the image's leaders and epochs are those of an
        // earlier run: the controller elects again once it registers, so no
        // role is taken from them (a restarted node must not lead, even
        // briefly, a partition another node leads at a newer epoch).
        let registered = image
            .brokers
            .get(&me)
            .is_some_and(|b| b.incarnation == self.cluster.incarnation());
        let mut want: HashMap<Key, (Wanted, PartitionState)> = HashMap::new();
        for (name, t) in image.topics.iter().filter(|_| registered) {
            for (i, p) in t.partitions.iter().enumerate() {
                if p.replicas.contains(&me) {
                    want.insert((name.clone(), i as i32), (wanted(me, p), p.clone()));
                }
            }
        }

        // Topics recreated under the same name (new id): their old partitions go first.
        let recreated: Vec<String> = {
            let state = self.state.lock();
            state
                .topics
                .iter()
                .filter(|(name, (id, _, _))| {
                    image.topics.get(*name).is_some_and(|t| t.topic_id != *id)
                })
                .map(|(name, _)| name.clone())
                .collect()
        };

        // Stop roles no longer wanted (partition gone, reassigned away, recreated topic).
        let stale: Vec<(Key, Option<Role>)> = {
            let mut state = self.state.lock();
            let keys: Vec<Key> = state
                .slots
                .keys()
                .filter(|k| !want.contains_key(*k) || recreated.contains(&k.0))
                .cloned()
                .collect();
            keys.into_iter()
                .filter_map(|k| state.slots.remove(&k).map(|s| (k, s.role)))
                .collect()
        };
        for (key, role) in stale {
            if let Some(r) = role {
                tracing::info!(node = me, topic = %key.0, partition = key.1, "giving up replica role");
                r.stop().await;
                changed = true;
            }
        }
        if !recreated.is_empty() {
            let mut state = self.state.lock();
            for name in &recreated {
                state.topics.remove(name);
            }
        }

        // Make local topics match the image.
        for (name, t) in &image.topics {
            if !t.partitions.iter().any(|p| p.replicas.contains(&me)) {
                continue;
            }
            let count = t.partitions.len() as u32;
            let desc = (t.topic_id, count, t.configs.clone());
            let known = self.state.lock().topics.get(name) == Some(&desc);
            if known {
                continue;
            }
            let store = self.store.clone();
            let (n, id, configs) = (name.clone(), t.topic_id, t.configs.clone());
            let r =
                tokio::task::spawn_blocking(move || store.ensure_topic(&n, id, count, &configs))
                    .await;
            match r {
                Ok(Ok(_)) => {
                    self.state.lock().topics.insert(name.clone(), desc);
                }
                Ok(Err(e)) => {
                    tracing::warn!(node = me, topic = %name, error = %e, "cannot make the local topic match the image");
                    ok = false;
                }
                Err(e) => {
                    tracing::warn!(node = me, topic = %name, error = %e, "ensure_topic task failed");
                    ok = false;
                }
            }
        }

        // Take the wanted roles.
        let mut keys: Vec<&Key> = want.keys().collect();
        keys.sort();
        for key in keys {
            let Some((w, pstate)) = want.get(key) else {
                continue;
            };
            if !self.state.lock().topics.contains_key(&key.0) {
                continue; // ensure_topic failed; retried later
            }
            match self.take_role(key, w, pstate).await {
                Ok(c) => changed |= c,
                Err(e) => {
                    tracing::warn!(node = me, topic = %key.0, partition = key.1, error = %e, "cannot take the replica role");
                    ok = false;
                }
            }
        }

        // Delete local topics the image no longer has, once the image is trustworthy.
        if image.applied_index > 0 && image.brokers.get(&me).is_some_and(|b| !b.fenced) {
            for t in self.store.topics() {
                if image.topics.contains_key(&t.name) {
                    continue;
                }
                let store = self.store.clone();
                let name = t.name.clone();
                tracing::info!(node = me, topic = %name, "deleting local topic absent from the metadata image");
                let r = tokio::task::spawn_blocking(move || store.delete_topic(&name)).await;
                match r {
                    Ok(Ok(())) | Ok(Err(LogError::UnknownTopicOrPartition(_))) => {
                        self.state.lock().topics.remove(&t.name);
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(node = me, topic = %t.name, error = %e, "cannot delete local topic");
                        ok = false;
                    }
                    Err(e) => {
                        tracing::warn!(node = me, topic = %t.name, error = %e, "delete task failed");
                        ok = false;
                    }
                }
            }
        }
        if changed {
            self.bump_roles();
        }
        ok
    }

    /// Brings one partition to the wanted role. Returns whether the role changed.
    async fn take_role(
        &self,
        key: &Key,
        w: &Wanted,
        pstate: &PartitionState,
    ) -> Result<bool, LogError> {
        let me = self.cfg.node_id;
        // Current role, and whether it already is the wanted one.
        let (partition, current) = {
            let state = self.state.lock();
            match state.slots.get(key) {
                Some(slot) => {
                    let same = match (&slot.role, w) {
                        (Some(Role::Leader { leader, .. }), Wanted::Leader(e)) => {
                            leader.epoch == *e && leader.is_active()
                        }
                        (Some(Role::Follower { leader, epoch, .. }), Wanted::Follower(l, e)) => {
                            leader == l && epoch == e
                        }
                        (None, Wanted::Offline) => true,
                        _ => false,
                    };
                    if same {
                        if let Some(Role::Leader { leader, .. }) = &slot.role {
                            leader.on_image(pstate);
                        }
                        return Ok(false);
                    }
                    (Some(slot.partition.clone()), true)
                }
                None => (None, false),
            }
        };
        let partition = match partition {
            Some(p) => p,
            None => {
                let p = self.store.partition(&key.0, key.1).ok_or_else(|| {
                    LogError::UnknownTopicOrPartition(format!("{}-{}", key.0, key.1))
                })?;
                p.set_replicated(true);
                p
            }
        };
        // Stop the old role before anything of the new one runs.
        if current {
            let old = {
                let mut state = self.state.lock();
                state.slots.get_mut(key).and_then(|s| s.role.take())
            };
            if let Some(r) = old {
                r.stop().await;
            }
        }
        let role = match w {
            Wanted::Offline => {
                tracing::info!(node = me, topic = %key.0, partition = key.1, "partition offline");
                None
            }
            Wanted::Leader(epoch) => {
                tracing::info!(node = me, topic = %key.0, partition = key.1, epoch, isr = ?pstate.isr, "becoming leader");
                // The new epoch starts at our log end before anything is
                // written in it (Kafka's maybeAssignEpochStartOffset), so a
                // follower whose latest epoch we never had learns where to
                // truncate instead of "unknown epoch".
                if let Err(e) = partition.assign_leader_epoch(*epoch) {
                    tracing::error!(node = me, topic = %key.0, partition = key.1, epoch, error = %e, "cannot record the new leader epoch");
                }
                let leader = Leader::new(
                    me,
                    &key.0,
                    key.1,
                    pstate,
                    partition.clone(),
                    self.cfg.replica_lag_max,
                    self.cluster.clone(),
                );
                // Before the leadership is handed out: with an ISR of one the HW is
                // the durable end at once, so a reader never sees committed data
                // hidden while the leader task starts.
                leader.on_durable_end();
                let task = tokio::spawn(leader_loop(leader.clone(), self.cfg.replica_lag_max));
                Some(Role::Leader { leader, task })
            }
            Wanted::Follower(leader, epoch) => {
                tracing::info!(node = me, topic = %key.0, partition = key.1, leader, epoch, "becoming follower");
                let fetcher = Fetcher {
                    me,
                    topic: key.0.clone(),
                    index: key.1,
                    partition: partition.clone(),
                    leader: *leader,
                    epoch: *epoch,
                    max_bytes: self.cfg.fetch_max_bytes,
                    max_wait: self.cfg.fetch_max_wait,
                    connector: self.connector.clone(),
                    images: self.images.clone(),
                };
                Some(Role::Follower {
                    leader: *leader,
                    epoch: *epoch,
                    task: tokio::spawn(fetcher.run()),
                })
            }
        };
        self.state
            .lock()
            .slots
            .insert(key.clone(), Slot { partition, role });
        Ok(true)
    }
}

fn check_epoch(requested: i32, ours: i32) -> Result<(), ErrorCode> {
    if requested < 0 || requested == ours {
        Ok(())
    } else if requested < ours {
        Err(ErrorCode::FencedLeaderEpoch)
    } else {
        Err(ErrorCode::UnknownLeaderEpoch)
    }
}

/// Per led partition: the HW follows the durable end; the ISR is checked for laggards.
async fn leader_loop(leader: Arc<Leader>, lag_max: Duration) {
    let tick = (lag_max / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut durable = leader.partition.watch_durable_end();
    let mut timer = tokio::time::interval(tick);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    leader.on_durable_end();
    loop {
        tokio::select! {
            r = durable.changed() => {
                if r.is_err() {
                    return;
                }
                leader.on_durable_end();
            }
            _ = timer.tick() => leader.on_tick(),
        }
    }
}

/// Applies every new image; retries a failed one after [`IMAGE_RETRY`].
async fn watch_images(
    mgr: std::sync::Weak<ReplicaManager>,
    mut images: watch::Receiver<Arc<MetadataImage>>,
) {
    loop {
        let image = images.borrow_and_update().clone();
        let ok = match mgr.upgrade() {
            Some(m) => {
                let ok = m.apply_image(&image).await;
                if ok {
                    m.acted.send_replace(image);
                }
                ok
            }
            None => return,
        };
        if ok {
            if images.changed().await.is_err() {
                return;
            }
        } else {
            tokio::select! {
                r = images.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(IMAGE_RETRY) => {}
            }
        }
    }
}

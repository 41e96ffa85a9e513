//! [`Coordination`]: where groups are coordinated, as seen from one node. The leader
//! of `__consumer_offsets-0` coordinates every group; this node opens a coordinator
//! while it holds that leadership and closes it when the leadership goes.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use sluice_topology::{Leadership, Topology};
use sluice_vocab::internal::OFFSETS_TOPIC;
use sluice_vocab::ErrorCode;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{GroupConfig, GroupCoordinator, OffsetsLog, TopicCatalog, TopicInfo};

/// Pause before opening a coordinator again after an error (a disk error while
/// replaying): the leadership may still be ours.
const RETRY: Duration = Duration::from_millis(500);

/// The coordinator state of this node.
enum State {
    /// Another node (or nobody) leads the offsets partition: NOT_COORDINATOR.
    Absent,
    /// This node leads it in this epoch and is replaying it:
    /// COORDINATOR_LOAD_IN_PROGRESS.
    Loading(i32),
    /// Serving groups in this epoch.
    Ready(i32, Arc<GroupCoordinator>),
}

/// Follows the leadership of `__consumer_offsets-0` on one node and hands out its
/// group coordinator while it has one.
pub struct Coordination {
    state: RwLock<State>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Coordination {
    /// Starts following the offsets partition's leadership on `topology`. Must be
    /// called inside a Tokio runtime.
    pub fn start(topology: Arc<dyn Topology>, config: GroupConfig) -> Arc<Coordination> {
        let coordination = Arc::new(Coordination {
            state: RwLock::new(State::Absent),
            stop: watch::channel(false).0,
            task: Mutex::new(None),
        });
        let task = tokio::spawn(follow(coordination.clone(), topology, config));
        *coordination.task.lock() = Some(task);
        coordination
    }

    /// The group coordinator, or the error group requests get: NOT_COORDINATOR
    /// unless this node leads the offsets partition, COORDINATOR_LOAD_IN_PROGRESS
    /// while it replays it.
    pub fn groups(&self) -> Result<Arc<GroupCoordinator>, ErrorCode> {
        match &*self.state.read() {
            State::Ready(_, g) => Ok(g.clone()),
            State::Loading(_) => Err(ErrorCode::CoordinatorLoadInProgress),
            State::Absent => Err(ErrorCode::NotCoordinator),
        }
    }

    /// Waits, at most `limit`, until this node coordinates groups (it leads the
    /// offsets partition and has replayed it); whether it does. A single node waits
    /// for this before it serves, as it coordinated at once before it was a cluster
    /// of one.
    pub async fn wait_coordinating(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.groups().is_ok() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Stops following and closes the coordinator. Idempotent.
    pub async fn shutdown(&self) {
        self.stop.send_replace(true);
        let task = self.task.lock().take();
        if let Some(task) = task {
            let _ = task.await;
        }
        self.set(State::Absent);
    }

    fn epoch(&self) -> Option<i32> {
        match &*self.state.read() {
            State::Absent => None,
            State::Loading(e) | State::Ready(e, _) => Some(*e),
        }
    }

    /// Replaces the state, closing a coordinator that is no longer wanted.
    fn set(&self, new: State) {
        let old = std::mem::replace(&mut *self.state.write(), new);
        if let State::Ready(epoch, g) = old {
            tracing::info!(epoch, "no longer the group coordinator");
            g.close();
        }
    }
}

/// Opens a coordinator whenever this node leads the offsets partition in a new epoch,
/// and drops it when the leadership ends.
async fn follow(c: Arc<Coordination>, topology: Arc<dyn Topology>, config: GroupConfig) {
    let mut roles = topology.watch_roles();
    let mut stop = c.stop.subscribe();
    loop {
        let lead = topology.leadership(OFFSETS_TOPIC, 0);
        let wanted = lead.as_ref().map(Leadership::epoch);
        if wanted != c.epoch() {
            c.set(match wanted {
                Some(epoch) => State::Loading(epoch),
                None => State::Absent,
            });
        }
        if let Some(lead) = lead.filter(|_| matches!(*c.state.read(), State::Loading(_))) {
            // Loading waits for the high watermark; a role change (or shutdown)
            // abandons it.
            tokio::select! {
                opened = open(&topology, &config, lead.clone()) => {
                    if let Some(g) = opened {
                        let mut state = c.state.write();
                        if matches!(&*state, State::Loading(e) if *e == lead.epoch()) {
                            tracing::info!(epoch = lead.epoch(), "group coordinator ready");
                            *state = State::Ready(lead.epoch(), g);
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
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        tokio::select! {
            changed = roles.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    c.set(State::Absent);
}

/// Opens the coordinator of `lead` (retrying after errors); `None` once the leadership
/// ended meanwhile.
async fn open(
    topology: &Arc<dyn Topology>,
    config: &GroupConfig,
    lead: Leadership,
) -> Option<Arc<GroupCoordinator>> {
    loop {
        if !lead.is_current() {
            return None;
        }
        let images = topology.clone();
        let offsets = OffsetsLog {
            leadership: lead.clone(),
            partition_exists: Arc::new(move |topic, partition| {
                images.image().partition(topic, partition).is_some()
            }),
            catalog: Arc::new(ImageCatalog(topology.clone())),
        };
        match GroupCoordinator::open(config.clone(), offsets).await {
            Ok(g) => return Some(g),
            Err(err) => {
                tracing::warn!(epoch = lead.epoch(), error = %err, "cannot load the group coordinator; retrying");
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

/// The topics of the metadata image, for consumer-protocol subscriptions.
struct ImageCatalog(Arc<dyn Topology>);

impl TopicCatalog for ImageCatalog {
    fn version(&self) -> u64 {
        self.0.image().applied_index
    }

    fn topic(&self, name: &str) -> Option<TopicInfo> {
        let image = self.0.image();
        let t = image.topics.get(name)?;
        Some(TopicInfo {
            id: t.topic_id,
            partitions: i32::try_from(t.partitions.len()).unwrap_or(i32::MAX),
        })
    }

    fn names(&self) -> Vec<String> {
        self.0
            .image()
            .topics
            .keys()
            .filter(|name| !sluice_vocab::internal::is_internal(name))
            .cloned()
            .collect()
    }
}

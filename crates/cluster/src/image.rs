//! The replicated state machine: [`MetadataImage`] and the [`Command`]s that change it.
//!
//! Everything here is pure and deterministic: `apply` reads nothing but the image, the
//! command and the Raft log index of the entry that carries it, so every replica that
//! applies the same log reaches the same image (Raft's *State Machine Safety*).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sluice_vocab::{ErrorCode, KafkaError, TopicConfig, TopicName};

use crate::access::{AccessCommand, AccessModel};
use crate::amqp::{AmqpCommand, AmqpModel};

/// Kafka broker id (also the Raft node id, as `u64`).
pub type BrokerId = i32;

/// Leader id of a partition that has no leader.
pub const NO_LEADER: BrokerId = -1;

/// Most producer ids one `AllocateProducerIds` may hand out (Kafka uses blocks of 1000).
pub const MAX_PRODUCER_ID_BLOCK: i64 = 1_000_000;

/// Most partitions one topic may have; bounds the work one command can cause.
pub const MAX_PARTITIONS: i32 = 100_000;

/// One registered broker as the quorum knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerState {
    /// Advertised Kafka host.
    pub kafka_host: String,
    /// Advertised Kafka port.
    pub kafka_port: u16,
    /// Advertised inter-node (Raft) address, `host:port`.
    pub raft_addr: String,
    /// Where the other brokers reach this broker's Kafka listener to replicate
    /// (`host:port`); clients use `kafka_host:kafka_port`, which may only be
    /// reachable from outside (a published container port).
    #[serde(default)]
    pub replica_addr: String,
    /// Named protocol endpoints of this broker that other nodes connect to: name →
    /// `host:port`. The names are free-form; `"amqp"` is the AMQP listener other
    /// nodes forward queue operations to (the queue leader's node). Empty in images
    /// from before endpoints were registered.
    #[serde(default)]
    pub endpoints: BTreeMap<String, String>,
    /// Fenced brokers lead nothing and are not placed on; set when the controller
    /// stops hearing from the broker.
    pub fenced: bool,
    /// A draining broker gets no new replicas and gives up preferred leadership.
    pub draining: bool,
    /// Random id the broker process picked at start; a new one means a restart.
    pub incarnation: u64,
    /// Raft log index of the registration: KRaft's broker epoch.
    pub epoch: u64,
}

/// Replica assignment and leadership of one partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionState {
    /// Assigned replicas; the first is the preferred leader.
    pub replicas: Vec<BrokerId>,
    /// In-sync replicas: always a non-empty subset of `replicas`, containing the leader
    /// when there is one.
    pub isr: Vec<BrokerId>,
    /// Current leader, or [`NO_LEADER`] (offline).
    pub leader: BrokerId,
    /// Bumped on every leader change (fences the old leader's writes).
    pub leader_epoch: i32,
    /// Bumped on every change of this record (ISR, replicas, leader).
    pub partition_epoch: i32,
    /// A reassignment in progress (KIP-455): the replica set it moves to. While set,
    /// `replicas` is this target followed by the replicas it removes, so the new
    /// replicas copy the log before any old copy is dropped; the move completes when
    /// every target replica is in the ISR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_replicas: Option<Vec<BrokerId>>,
    /// While a reassignment is in progress, the replica set (in preference order) it
    /// started from: what cancelling it restores. A reassignment altered while in
    /// progress keeps the first one's origin, as Kafka does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_replicas: Option<Vec<BrokerId>>,
}

impl PartitionState {
    /// The replicas an ongoing reassignment adds (in the target, not in the origin).
    pub fn adding_replicas(&self) -> Vec<BrokerId> {
        match (&self.target_replicas, &self.original_replicas) {
            (Some(target), Some(origin)) => target
                .iter()
                .copied()
                .filter(|r| !origin.contains(r))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The replicas an ongoing reassignment drops once it completes.
    pub fn removing_replicas(&self) -> Vec<BrokerId> {
        match &self.target_replicas {
            Some(target) => self
                .replicas
                .iter()
                .copied()
                .filter(|r| !target.contains(r))
                .collect(),
            None => Vec::new(),
        }
    }
}

/// One topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicState {
    /// Kafka topic id (UUID bytes), never all zero.
    pub topic_id: [u8; 16],
    /// Per-topic config overrides; the broker validates keys and values.
    pub configs: BTreeMap<String, String>,
    /// Partition `i` is `partitions[i]`.
    pub partitions: Vec<PartitionState>,
}

/// The whole cluster metadata, as of `applied_index`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetadataImage {
    /// Set once by the first controller; empty before that.
    pub cluster_id: String,
    /// Registered brokers.
    pub brokers: BTreeMap<BrokerId, BrokerState>,
    /// Topics by name.
    pub topics: BTreeMap<String, TopicState>,
    /// First producer id not yet handed out.
    pub next_producer_id: i64,
    /// Raft log index of the last entry applied to this image (0 before any).
    pub applied_index: u64,
    /// Whether `AdoptLocalState` has run: a single node's topics from before its
    /// metadata lived in the quorum are adopted once, never again.
    #[serde(default)]
    pub local_state_adopted: bool,
    /// AMQP virtual hosts, exchanges, queues and bindings.
    #[serde(default)]
    pub amqp: AmqpModel,
    /// Users and their permissions.
    #[serde(default)]
    pub access: AccessModel,
    /// Client quotas (producer and consumer byte rates).
    #[serde(default)]
    pub quotas: crate::quotas::QuotaModel,
}

/// A topic of a single node's data directory from an earlier release, adopted into
/// the metadata with its own id, partition count and configs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdoptedTopic {
    pub name: String,
    pub topic_id: [u8; 16],
    pub partitions: i32,
    pub configs: BTreeMap<String, String>,
}

/// A state change proposed to the quorum. Validated inside `apply`, never before: only
/// the log order decides (a check done by the proposer could be stale).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Sets the cluster id if none is set yet (first proposal wins).
    InitCluster { cluster_id: String },
    /// A broker (re)announces itself. A new incarnation of a known broker is a restart:
    /// it is fenced (leadership moves) and then unfenced under a new epoch.
    RegisterBroker {
        node_id: BrokerId,
        kafka_host: String,
        kafka_port: u16,
        raft_addr: String,
        incarnation: u64,
        #[serde(default)]
        replica_addr: String,
        /// See [`BrokerState::endpoints`].
        #[serde(default)]
        endpoints: BTreeMap<String, String>,
    },
    /// The controller stopped hearing from the broker.
    FenceBroker { node_id: BrokerId },
    /// The broker's heartbeats came back.
    UnfenceBroker { node_id: BrokerId },
    /// Start or stop draining a broker.
    SetDraining { node_id: BrokerId, draining: bool },
    /// Create a topic, placing replicas round-robin over live, non-draining brokers.
    CreateTopic {
        name: String,
        partitions: i32,
        replication_factor: i16,
        configs: BTreeMap<String, String>,
    },
    /// Delete a topic.
    DeleteTopic { name: String },
    /// Grow a topic to `count` partitions in total.
    CreatePartitions { name: String, count: i32 },
    /// Incremental config change: `Some(v)` sets, `None` removes the override.
    AlterConfigs {
        name: String,
        configs: BTreeMap<String, Option<String>>,
    },
    /// ISR change requested by the partition leader (KIP-497).
    AlterPartition {
        topic: String,
        partition: i32,
        leader_id: BrokerId,
        leader_epoch: i32,
        partition_epoch: i32,
        new_isr: Vec<BrokerId>,
    },
    /// (Re)elect the preferred live in-sync leader of each partition (all partitions
    /// when `partitions` is `None`): the controller's own elections, and Kafka's
    /// ElectLeaders with `preferred_only`, which elects only the first replica
    /// (PREFERRED_LEADER_NOT_AVAILABLE when it is not live, in sync and undrained).
    ElectLeaders {
        partitions: Option<Vec<(String, i32)>>,
        #[serde(default)]
        preferred_only: bool,
    },
    /// Move a partition to a new replica set. Completes at once when every new replica
    /// is already in sync; otherwise the new replicas are added first and the old ones
    /// dropped once the new ones have joined the ISR (see [`PartitionState`]).
    ReassignPartition {
        topic: String,
        partition: i32,
        replicas: Vec<BrokerId>,
    },
    /// Cancel a partition's move at once (Kafka's AlterPartitionReassignments with no
    /// replicas): back to the replicas it started from, keeping only those of them in
    /// the ISR (at least one must be, else INVALID_REPLICA_ASSIGNMENT, as Kafka), with
    /// a new leader if the leader was an added replica.
    CancelReassignment { topic: String, partition: i32 },
    /// Hand out `count` producer ids; answers the first.
    AllocateProducerIds { count: i64 },
    /// Forget a decommissioned broker: only a fenced one (stopped) that holds no
    /// replica. A broker that starts again registers anew.
    UnregisterBroker { node_id: BrokerId },
    /// Once per image: the topics a single node's data directory held before its
    /// metadata lived in the quorum (an earlier release), each with `broker` as its one
    /// replica, and the producer ids that node had handed out already. Names the image
    /// has are kept as they are; a later `AdoptLocalState` changes nothing.
    AdoptLocalState {
        broker: BrokerId,
        topics: Vec<AdoptedTopic>,
        /// Producer ids below this were handed out already.
        producer_ids_from: i64,
    },
    /// A change to the AMQP model.
    Amqp(AmqpCommand),
    /// A change to users and permissions.
    Access(AccessCommand),
    /// Client quotas set or removed, all or none (Kafka's AlterClientQuotas).
    AlterClientQuotas(Vec<crate::quotas::QuotaAlteration>),
}

/// Outcome of one partition in an election.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ElectionOutcome {
    pub topic: String,
    pub partition: i32,
    /// `Ok(new leader)` (may be [`NO_LEADER`] when nobody eligible is live), or why not.
    pub result: Result<BrokerId, CommandError>,
}

/// What a successful command answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandOutput {
    /// Applied (or an idempotent no-op).
    Done,
    /// `RegisterBroker`: the broker epoch.
    BrokerEpoch(u64),
    /// `CreateTopic`.
    TopicCreated { topic_id: [u8; 16] },
    /// `AlterPartition` / `ReassignPartition`: the partition as it is now.
    Partition(PartitionState),
    /// `ElectLeaders`.
    Elections(Vec<ElectionOutcome>),
    /// `AllocateProducerIds`: the first id of the block.
    ProducerIds { first: i64, count: i64 },
}

/// Why a command was rejected. Each variant is one Kafka error code
/// ([`KafkaError::error_code`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CommandError {
    /// UNKNOWN_TOPIC_OR_PARTITION (3).
    #[error("unknown topic or partition")]
    UnknownTopicOrPartition,
    /// NOT_LEADER_OR_FOLLOWER (6): the requester is not the partition leader.
    #[error("not the leader of this partition")]
    NotLeaderOrFollower,
    /// BROKER_NOT_AVAILABLE (8): no such registered broker.
    #[error("broker {0} is not registered")]
    BrokerNotAvailable(BrokerId),
    /// INVALID_TOPIC_EXCEPTION (17).
    #[error("invalid topic name: {0}")]
    InvalidTopic(String),
    /// TOPIC_ALREADY_EXISTS (36).
    #[error("topic already exists")]
    TopicAlreadyExists,
    /// INVALID_PARTITIONS (37).
    #[error("invalid partition count: {0}")]
    InvalidPartitions(String),
    /// INVALID_REPLICATION_FACTOR (38).
    #[error("invalid replication factor: {0}")]
    InvalidReplicationFactor(String),
    /// INVALID_REPLICA_ASSIGNMENT (39).
    #[error("invalid replica assignment: {0}")]
    InvalidReplicaAssignment(String),
    /// INVALID_CONFIG (40): an unknown topic config key or a value outside its limits.
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    /// INVALID_REQUEST (42).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// FENCED_LEADER_EPOCH (74): the requester's leader epoch is older than the current one.
    #[error("fenced leader epoch")]
    FencedLeaderEpoch,
    /// NO_REASSIGNMENT_IN_PROGRESS (85): nothing to cancel.
    #[error("no reassignment is in progress")]
    NoReassignmentInProgress,
    /// PREFERRED_LEADER_NOT_AVAILABLE (80): the first replica is not live, in sync and
    /// undrained.
    #[error("the preferred replica {0} is not live and in sync")]
    PreferredLeaderNotAvailable(BrokerId),
    /// ELIGIBLE_LEADERS_NOT_AVAILABLE (83): no live in-sync replica.
    #[error("no eligible leader is available")]
    EligibleLeadersNotAvailable,
    /// ELECTION_NOT_NEEDED (84): the preferred live leader already leads.
    #[error("election not needed")]
    ElectionNotNeeded,
    /// INVALID_UPDATE_VERSION (95): stale partition epoch.
    #[error("stale partition epoch")]
    InvalidUpdateVersion,
    /// INELIGIBLE_REPLICA (107): a fenced or unknown broker cannot join the ISR.
    #[error("replica {0} is not eligible for the ISR")]
    IneligibleReplica(BrokerId),
    /// RESOURCE_NOT_FOUND (91): a named user or virtual host does not exist.
    #[error("{0}")]
    NotFound(String),
}

impl KafkaError for CommandError {
    fn error_code(&self) -> ErrorCode {
        match self {
            CommandError::UnknownTopicOrPartition => ErrorCode::UnknownTopicOrPartition,
            CommandError::NotLeaderOrFollower => ErrorCode::NotLeaderOrFollower,
            CommandError::BrokerNotAvailable(_) => ErrorCode::BrokerNotAvailable,
            CommandError::InvalidTopic(_) => ErrorCode::InvalidTopicException,
            CommandError::TopicAlreadyExists => ErrorCode::TopicAlreadyExists,
            CommandError::InvalidPartitions(_) => ErrorCode::InvalidPartitions,
            CommandError::InvalidReplicationFactor(_) => ErrorCode::InvalidReplicationFactor,
            CommandError::InvalidReplicaAssignment(_) => ErrorCode::InvalidReplicaAssignment,
            CommandError::InvalidConfig(_) => ErrorCode::InvalidConfig,
            CommandError::InvalidRequest(_) => ErrorCode::InvalidRequest,
            CommandError::FencedLeaderEpoch => ErrorCode::FencedLeaderEpoch,
            CommandError::EligibleLeadersNotAvailable => ErrorCode::EligibleLeadersNotAvailable,
            CommandError::ElectionNotNeeded => ErrorCode::ElectionNotNeeded,
            CommandError::PreferredLeaderNotAvailable(_) => ErrorCode::PreferredLeaderNotAvailable,
            CommandError::NoReassignmentInProgress => ErrorCode::NoReassignmentInProgress,
            CommandError::InvalidUpdateVersion => ErrorCode::InvalidUpdateVersion,
            CommandError::IneligibleReplica(_) => ErrorCode::IneligibleReplica,
            CommandError::NotFound(_) => ErrorCode::ResourceNotFound,
        }
    }
}

/// The answer to one applied command.
pub type CommandResult = Result<CommandOutput, CommandError>;

/// A topic the controller keeps in existence at the internal replication factor
/// (the consumer offsets topic; later the transaction and queue state logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InternalTopic {
    pub name: String,
    pub partitions: i32,
    pub configs: BTreeMap<String, String>,
}

/// What [`MetadataImage::internal_topic_plan`] asks the controller to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InternalTopicPlan {
    /// The topic exists and every partition has its replicas.
    Ready,
    /// Propose these commands (create the topic, or grow partitions).
    Propose(Vec<Command>),
    /// Too few brokers can be placed on yet: `placeable` of `needed`.
    Waiting { placeable: usize, needed: usize },
}

/// Kafka's topic name rule ([`TopicName`]), as a rejection.
fn validate_topic_name(name: &str) -> Result<(), CommandError> {
    TopicName::validate(name).map_err(|e| CommandError::InvalidTopic(e.to_string()))
}

/// Topic config overrides checked against Kafka's keys and limits ([`TopicConfig`]).
fn validate_configs(configs: &BTreeMap<String, String>) -> Result<(), CommandError> {
    TopicConfig::validate(configs).map_err(|e| CommandError::InvalidConfig(e.to_string()))
}

impl MetadataImage {
    /// Brokers that may lead and be placed on: registered and not fenced (ascending id).
    /// Replication factor of a topic created without one (Kafka's `-1`):
    /// min(3, live brokers).
    pub fn default_replication_factor(&self) -> i16 {
        i16::try_from(self.live_brokers().len().clamp(1, 3)).unwrap_or(1)
    }

    pub fn live_brokers(&self) -> Vec<BrokerId> {
        self.brokers
            .iter()
            .filter(|(_, b)| !b.fenced)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Registered and not fenced.
    pub fn is_live(&self, id: BrokerId) -> bool {
        self.brokers.get(&id).is_some_and(|b| !b.fenced)
    }

    /// Registered and draining.
    pub fn is_draining(&self, id: BrokerId) -> bool {
        self.brokers.get(&id).is_some_and(|b| b.draining)
    }

    /// The partition, if it exists.
    pub fn partition(&self, topic: &str, partition: i32) -> Option<&PartitionState> {
        let t = self.topics.get(topic)?;
        usize::try_from(partition)
            .ok()
            .and_then(|p| t.partitions.get(p))
    }

    fn partition_mut(
        &mut self,
        topic: &str,
        partition: i32,
    ) -> Result<&mut PartitionState, CommandError> {
        let t = self
            .topics
            .get_mut(topic)
            .ok_or(CommandError::UnknownTopicOrPartition)?;
        usize::try_from(partition)
            .ok()
            .and_then(|p| t.partitions.get_mut(p))
            .ok_or(CommandError::UnknownTopicOrPartition)
    }

    /// Partitions with fewer in-sync replicas than replicas.
    pub fn under_replicated(&self) -> Vec<(String, i32)> {
        // While a partition moves, its replication factor is the target's.
        self.partitions_where(|p| {
            p.isr.len()
                < p.target_replicas
                    .as_ref()
                    .map_or(p.replicas.len(), Vec::len)
        })
    }

    /// Partitions with a reassignment in progress.
    pub fn reassigning(&self) -> Vec<(String, i32)> {
        self.partitions_where(|p| p.target_replicas.is_some())
    }

    /// Partitions without a leader.
    pub fn offline(&self) -> Vec<(String, i32)> {
        self.partitions_where(|p| p.leader == NO_LEADER)
    }

    fn partitions_where(&self, f: impl Fn(&PartitionState) -> bool) -> Vec<(String, i32)> {
        let mut out = Vec::new();
        for (name, t) in &self.topics {
            for (i, p) in t.partitions.iter().enumerate() {
                if f(p) {
                    out.push((name.clone(), i as i32));
                }
            }
        }
        out
    }

    /// Applies `cmd`, carried by the Raft entry at `index`. Deterministic: the same image,
    /// command and index give the same result on every replica. A rejected command
    /// leaves the image unchanged (except `applied_index`).
    pub fn apply(&mut self, index: u64, cmd: &Command) -> CommandResult {
        self.applied_index = index;
        match cmd {
            Command::InitCluster { cluster_id } => {
                if self.cluster_id.is_empty() {
                    self.cluster_id = cluster_id.clone();
                }
                Ok(CommandOutput::Done)
            }
            Command::RegisterBroker {
                node_id,
                kafka_host,
                kafka_port,
                raft_addr,
                incarnation,
                replica_addr,
                endpoints,
            } => self.register_broker(
                index,
                *node_id,
                (kafka_host, *kafka_port),
                raft_addr,
                (replica_addr, endpoints),
                *incarnation,
            ),
            Command::FenceBroker { node_id } => {
                if !self.brokers.contains_key(node_id) {
                    return Err(CommandError::BrokerNotAvailable(*node_id));
                }
                self.fence(*node_id);
                Ok(CommandOutput::Done)
            }
            Command::UnfenceBroker { node_id } => {
                if !self.brokers.contains_key(node_id) {
                    return Err(CommandError::BrokerNotAvailable(*node_id));
                }
                self.unfence(*node_id);
                Ok(CommandOutput::Done)
            }
            Command::UnregisterBroker { node_id } => self.unregister_broker(*node_id),
            Command::AdoptLocalState {
                broker,
                topics,
                producer_ids_from,
            } => self.adopt_local_state(*broker, topics, *producer_ids_from),
            Command::SetDraining { node_id, draining } => {
                let b = self
                    .brokers
                    .get_mut(node_id)
                    .ok_or(CommandError::BrokerNotAvailable(*node_id))?;
                b.draining = *draining;
                Ok(CommandOutput::Done)
            }
            Command::CreateTopic {
                name,
                partitions,
                replication_factor,
                configs,
            } => self.create_topic(index, name, *partitions, *replication_factor, configs),
            Command::DeleteTopic { name } => {
                self.topics
                    .remove(name)
                    .ok_or(CommandError::UnknownTopicOrPartition)?;
                self.forget_queues_of(name);
                Ok(CommandOutput::Done)
            }
            Command::Amqp(cmd) => self.apply_amqp(index, cmd),
            Command::Access(cmd) => self.apply_access(index, cmd),
            Command::AlterClientQuotas(alterations) => self.alter_client_quotas(alterations),
            Command::CreatePartitions { name, count } => self.create_partitions(name, *count),
            Command::AlterConfigs { name, configs } => {
                let t = self
                    .topics
                    .get_mut(name)
                    .ok_or(CommandError::UnknownTopicOrPartition)?;
                let mut altered = t.configs.clone();
                for (k, v) in configs {
                    match v {
                        Some(v) => {
                            altered.insert(k.clone(), v.clone());
                        }
                        None => {
                            if !TopicConfig::KEYS.contains(&k.as_str()) {
                                return Err(CommandError::InvalidConfig(format!(
                                    "unknown topic config key {k:?}"
                                )));
                            }
                            altered.remove(k);
                        }
                    }
                }
                validate_configs(&altered)?;
                t.configs = altered;
                Ok(CommandOutput::Done)
            }
            Command::AlterPartition {
                topic,
                partition,
                leader_id,
                leader_epoch,
                partition_epoch,
                new_isr,
            } => self.alter_partition(
                topic,
                *partition,
                *leader_id,
                *leader_epoch,
                *partition_epoch,
                new_isr,
            ),
            Command::ElectLeaders {
                partitions,
                preferred_only,
            } => {
                let targets = match partitions {
                    Some(list) => list.clone(),
                    None => self.partitions_where(|_| true),
                };
                let outcomes = targets
                    .into_iter()
                    .map(|(topic, partition)| {
                        let result = self.elect_preferred(&topic, partition, *preferred_only);
                        ElectionOutcome {
                            topic,
                            partition,
                            result,
                        }
                    })
                    .collect();
                Ok(CommandOutput::Elections(outcomes))
            }
            Command::ReassignPartition {
                topic,
                partition,
                replicas,
            } => self.reassign(topic, *partition, replicas),
            Command::CancelReassignment { topic, partition } => {
                self.cancel_reassignment(topic, *partition)
            }
            Command::AllocateProducerIds { count } => {
                if *count <= 0 || *count > MAX_PRODUCER_ID_BLOCK {
                    return Err(CommandError::InvalidRequest(format!(
                        "producer id block size {count} is outside 1..={MAX_PRODUCER_ID_BLOCK}"
                    )));
                }
                let first = self.next_producer_id;
                let next = first.checked_add(*count).ok_or_else(|| {
                    CommandError::InvalidRequest("producer ids exhausted".to_string())
                })?;
                self.next_producer_id = next;
                Ok(CommandOutput::ProducerIds {
                    first,
                    count: *count,
                })
            }
        }
    }

    fn register_broker(
        &mut self,
        index: u64,
        node_id: BrokerId,
        (kafka_host, kafka_port): (&str, u16),
        raft_addr: &str,
        (replica_addr, endpoints): (&str, &BTreeMap<String, String>),
        incarnation: u64,
    ) -> CommandResult {
        if node_id < 0 {
            return Err(CommandError::InvalidRequest(format!(
                "broker id {node_id} is negative"
            )));
        }
        if let Some(b) = self.brokers.get(&node_id) {
            if b.incarnation != incarnation {
                // A restart: whatever the old process led is gone with its memory, so
                // move leadership first (Raft's leader completeness is not at stake,
                // but the new process must start from a fresh epoch).
                self.fence(node_id);
            }
        }
        let draining = self.brokers.get(&node_id).is_some_and(|b| b.draining);
        let same = self.brokers.get(&node_id).filter(|b| {
            b.incarnation == incarnation
                && b.kafka_host == kafka_host
                && b.kafka_port == kafka_port
                && b.raft_addr == raft_addr
                && b.replica_addr == replica_addr
                && b.endpoints == *endpoints
        });
        let epoch = match same {
            // Re-announcement of the same process: keep its epoch.
            Some(b) => b.epoch,
            None => index,
        };
        self.brokers.insert(
            node_id,
            BrokerState {
                kafka_host: kafka_host.to_string(),
                kafka_port,
                raft_addr: raft_addr.to_string(),
                replica_addr: replica_addr.to_string(),
                endpoints: endpoints.clone(),
                fenced: true,
                draining,
                incarnation,
                epoch,
            },
        );
        self.unfence(node_id);
        Ok(CommandOutput::BrokerEpoch(epoch))
    }

    /// KRaft's fencing: the broker leads nothing and leaves every ISR where another
    /// member remains; partitions it led get the next live ISR member (epoch + 1) or go
    /// offline, keeping it as the last ISR member so it can come back without data loss.
    fn fence(&mut self, node_id: BrokerId) {
        let Some(b) = self.brokers.get_mut(&node_id) else {
            return;
        };
        if b.fenced {
            return;
        }
        b.fenced = true;
        let live: BTreeSet<BrokerId> = self.live_brokers().into_iter().collect();
        let draining = draining_of(&self.brokers);
        for t in self.topics.values_mut() {
            for p in &mut t.partitions {
                let in_isr = p.isr.contains(&node_id);
                let was_leader = p.leader == node_id;
                if !in_isr && !was_leader {
                    continue;
                }
                if in_isr && p.isr.len() > 1 {
                    p.isr.retain(|r| *r != node_id);
                }
                if was_leader {
                    p.leader = pick_leader(p, &live, &draining);
                    p.leader_epoch += 1;
                }
                p.partition_epoch += 1;
            }
        }
    }

    /// Unfencing: offline partitions whose ISR holds this broker get it back as leader.
    fn unfence(&mut self, node_id: BrokerId) {
        let Some(b) = self.brokers.get_mut(&node_id) else {
            return;
        };
        if !b.fenced {
            return;
        }
        b.fenced = false;
        for t in self.topics.values_mut() {
            for p in &mut t.partitions {
                if p.leader == NO_LEADER && p.isr.contains(&node_id) {
                    p.leader = node_id;
                    p.leader_epoch += 1;
                    p.partition_epoch += 1;
                }
            }
        }
    }

    pub(crate) fn create_topic(
        &mut self,
        index: u64,
        name: &str,
        partitions: i32,
        replication_factor: i16,
        configs: &BTreeMap<String, String>,
    ) -> CommandResult {
        validate_topic_name(name)?;
        if self.topics.contains_key(name) {
            return Err(CommandError::TopicAlreadyExists);
        }
        validate_configs(configs)?;
        if partitions <= 0 || partitions > MAX_PARTITIONS {
            return Err(CommandError::InvalidPartitions(format!(
                "{partitions} is outside 1..={MAX_PARTITIONS}"
            )));
        }
        let candidates = self.placement_candidates();
        let rf = usize::try_from(replication_factor).unwrap_or(0);
        if rf == 0 || rf > candidates.len() {
            return Err(CommandError::InvalidReplicationFactor(format!(
                "{replication_factor} with {} live brokers",
                candidates.len()
            )));
        }
        // Spread preferred leaders across topics too: start where the topic count says.
        let start = self.topics.len();
        let parts = (0..partitions as usize)
            .map(|p| new_partition(&candidates, start + p, rf))
            .collect();
        let topic_id = derive_topic_id(&self.cluster_id, name, index);
        self.topics.insert(
            name.to_string(),
            TopicState {
                topic_id,
                configs: configs.clone(),
                partitions: parts,
            },
        );
        Ok(CommandOutput::TopicCreated { topic_id })
    }

    /// Brokers new replicas may be placed on: live and not draining, ascending id.
    pub fn placement_candidates(&self) -> Vec<BrokerId> {
        self.brokers
            .iter()
            .filter(|(_, b)| !b.fenced && !b.draining)
            .map(|(id, _)| *id)
            .collect()
    }

    /// What the controller must propose so that `spec` exists with `replication_factor`
    /// replicas per partition. Pure: the controller acts on the answer.
    ///
    /// A missing topic is created only once that many brokers can be placed on, never
    /// with fewer replicas. A partition with fewer replicas (created by an older
    /// release, or while fewer brokers were live) grows by a reassignment that keeps
    /// its replicas, in order, and appends live brokers it lacks; partitions without a
    /// live leader or with a move in progress wait.
    pub fn internal_topic_plan(
        &self,
        spec: &InternalTopic,
        replication_factor: usize,
    ) -> InternalTopicPlan {
        let rf = replication_factor.max(1);
        let candidates = self.placement_candidates();
        let Some(t) = self.topics.get(&spec.name) else {
            if candidates.len() < rf {
                return InternalTopicPlan::Waiting {
                    placeable: candidates.len(),
                    needed: rf,
                };
            }
            return InternalTopicPlan::Propose(vec![Command::CreateTopic {
                name: spec.name.clone(),
                partitions: spec.partitions,
                replication_factor: i16::try_from(rf).unwrap_or(i16::MAX),
                configs: spec.configs.clone(),
            }]);
        };
        let mut grow = Vec::new();
        let mut waiting = None;
        for (i, p) in t.partitions.iter().enumerate() {
            if p.target_replicas.is_some() {
                // A move in progress (perhaps this one's growth) finishes first.
                waiting.get_or_insert((p.replicas.len(), rf));
                continue;
            }
            let short = rf.saturating_sub(p.replicas.len());
            if short == 0 {
                continue;
            }
            if !self.is_live(p.leader) {
                waiting.get_or_insert((p.replicas.len(), rf));
                continue;
            }
            let missing: Vec<BrokerId> = candidates
                .iter()
                .copied()
                .filter(|b| !p.replicas.contains(b))
                .collect();
            if missing.len() < short {
                waiting.get_or_insert((p.replicas.len() + missing.len(), rf));
                continue;
            }
            // Start where the partition index says, so partitions spread their copies.
            let start = i % missing.len();
            let mut replicas = p.replicas.clone();
            replicas.extend(missing.iter().cycle().skip(start).take(short));
            grow.push(Command::ReassignPartition {
                topic: spec.name.clone(),
                partition: i32::try_from(i).unwrap_or(i32::MAX),
                replicas,
            });
        }
        match (grow.is_empty(), waiting) {
            (false, _) => InternalTopicPlan::Propose(grow),
            (true, Some((placeable, needed))) => InternalTopicPlan::Waiting { placeable, needed },
            (true, None) => InternalTopicPlan::Ready,
        }
    }

    fn create_partitions(&mut self, name: &str, count: i32) -> CommandResult {
        let candidates = self.placement_candidates();
        let topics_before = self.topics.len();
        let t = self
            .topics
            .get_mut(name)
            .ok_or(CommandError::UnknownTopicOrPartition)?;
        let current = t.partitions.len();
        let wanted = usize::try_from(count).unwrap_or(0);
        if wanted <= current || count > MAX_PARTITIONS {
            return Err(CommandError::InvalidPartitions(format!(
                "topic has {current} partitions; {count} must be more and at most {MAX_PARTITIONS}"
            )));
        }
        let rf = t.partitions.first().map_or(1, |p| p.replicas.len()).max(1);
        if rf > candidates.len() {
            return Err(CommandError::InvalidReplicationFactor(format!(
                "{rf} with {} live brokers",
                candidates.len()
            )));
        }
        for p in current..wanted {
            t.partitions
                .push(new_partition(&candidates, topics_before + p, rf));
        }
        Ok(CommandOutput::Done)
    }

    fn alter_partition(
        &mut self,
        topic: &str,
        partition: i32,
        leader_id: BrokerId,
        leader_epoch: i32,
        partition_epoch: i32,
        new_isr: &[BrokerId],
    ) -> CommandResult {
        let live: BTreeSet<BrokerId> = self.live_brokers().into_iter().collect();
        let draining = draining_of(&self.brokers);
        let p = self.partition_mut(topic, partition)?;
        if leader_epoch < p.leader_epoch {
            return Err(CommandError::FencedLeaderEpoch);
        }
        if leader_id != p.leader || leader_epoch != p.leader_epoch {
            return Err(CommandError::NotLeaderOrFollower);
        }
        if partition_epoch != p.partition_epoch {
            return Err(CommandError::InvalidUpdateVersion);
        }
        let unique: BTreeSet<BrokerId> = new_isr.iter().copied().collect();
        if unique.len() != new_isr.len() {
            return Err(CommandError::InvalidRequest(
                "duplicate broker in the ISR".to_string(),
            ));
        }
        if !new_isr.contains(&leader_id) {
            return Err(CommandError::InvalidRequest(
                "the ISR must contain the leader".to_string(),
            ));
        }
        if let Some(r) = new_isr.iter().find(|r| !p.replicas.contains(r)) {
            return Err(CommandError::InvalidRequest(format!(
                "{r} is not a replica of this partition"
            )));
        }
        // Only live brokers may join; members already in the ISR may stay.
        if let Some(r) = new_isr
            .iter()
            .find(|r| !p.isr.contains(r) && !live.contains(r))
        {
            return Err(CommandError::IneligibleReplica(*r));
        }
        p.isr = new_isr.to_vec();
        p.partition_epoch += 1;
        if let Some(target) = p.target_replicas.clone() {
            if target.iter().all(|r| p.isr.contains(r)) {
                finish_reassignment(p, target, &live, &draining);
            }
        }
        Ok(CommandOutput::Partition(p.clone()))
    }

    fn elect_preferred(
        &mut self,
        topic: &str,
        partition: i32,
        preferred_only: bool,
    ) -> Result<BrokerId, CommandError> {
        let live: BTreeSet<BrokerId> = self.live_brokers().into_iter().collect();
        let draining = draining_of(&self.brokers);
        let p = self.partition_mut(topic, partition)?;
        let choice = pick_leader(p, &live, &draining);
        let preferred = p.replicas.first().copied().unwrap_or(NO_LEADER);
        if preferred_only && p.leader == preferred {
            return Err(CommandError::ElectionNotNeeded);
        }
        if preferred_only && choice != preferred {
            return Err(CommandError::PreferredLeaderNotAvailable(preferred));
        }
        if choice == p.leader {
            return Err(if choice == NO_LEADER {
                CommandError::EligibleLeadersNotAvailable
            } else {
                CommandError::ElectionNotNeeded
            });
        }
        p.leader = choice;
        p.leader_epoch += 1;
        p.partition_epoch += 1;
        Ok(choice)
    }

    fn reassign(&mut self, topic: &str, partition: i32, target: &[BrokerId]) -> CommandResult {
        if target.is_empty() {
            return Err(CommandError::InvalidReplicaAssignment(
                "no replicas".to_string(),
            ));
        }
        let unique: BTreeSet<BrokerId> = target.iter().copied().collect();
        if unique.len() != target.len() {
            return Err(CommandError::InvalidReplicaAssignment(
                "duplicate replica".to_string(),
            ));
        }
        if let Some(r) = target.iter().find(|r| !self.brokers.contains_key(r)) {
            return Err(CommandError::InvalidReplicaAssignment(format!(
                "broker {r} is not registered"
            )));
        }
        let live: BTreeSet<BrokerId> = self.live_brokers().into_iter().collect();
        let draining = draining_of(&self.brokers);
        let p = self.partition_mut(topic, partition)?;
        if target.iter().all(|r| p.isr.contains(r)) {
            // Every new replica already holds the log: nothing to copy.
            finish_reassignment(p, target.to_vec(), &live, &draining);
        } else {
            // Add first, remove later: dropping an in-sync copy before its
            // replacement caught up could leave too few copies of acknowledged data.
            let mut replicas = target.to_vec();
            replicas.extend(p.replicas.iter().copied().filter(|r| !target.contains(r)));
            if p.original_replicas.is_none() {
                p.original_replicas = Some(p.replicas.clone());
            }
            p.replicas = replicas;
            p.target_replicas = Some(target.to_vec());
        }
        p.partition_epoch += 1;
        Ok(CommandOutput::Partition(p.clone()))
    }

    fn cancel_reassignment(&mut self, topic: &str, partition: i32) -> CommandResult {
        let live: BTreeSet<BrokerId> = self.live_brokers().into_iter().collect();
        let draining = draining_of(&self.brokers);
        let p = self.partition_mut(topic, partition)?;
        let (Some(_), Some(origin)) = (&p.target_replicas, p.original_replicas.clone()) else {
            return Err(if p.target_replicas.is_none() {
                CommandError::NoReassignmentInProgress
            } else {
                CommandError::InvalidReplicaAssignment(
                    "this move started before its origin was recorded; reassign to the replicas wanted".into(),
                )
            });
        };
        if !p.isr.iter().any(|r| origin.contains(r)) {
            // Reverting now would leave no in-sync copy: the move goes on.
            return Err(CommandError::InvalidReplicaAssignment(
                "no replica the move started from is in sync; cancelling would need an unclean election"
                    .into(),
            ));
        }
        finish_reassignment(p, origin, &live, &draining);
        p.partition_epoch += 1;
        Ok(CommandOutput::Partition(p.clone()))
    }

    fn adopt_local_state(
        &mut self,
        broker: BrokerId,
        topics: &[AdoptedTopic],
        producer_ids_from: i64,
    ) -> CommandResult {
        if self.local_state_adopted {
            return Ok(CommandOutput::Done);
        }
        if broker < 0 {
            return Err(CommandError::InvalidRequest(format!(
                "broker id {broker} is negative"
            )));
        }
        // All or nothing: a topic left out would be deleted from the disk as absent.
        for t in topics {
            validate_topic_name(&t.name)?;
            validate_configs(&t.configs)?;
            if t.partitions <= 0 || t.partitions > MAX_PARTITIONS {
                return Err(CommandError::InvalidPartitions(format!(
                    "{}: {} is outside 1..={MAX_PARTITIONS}",
                    t.name, t.partitions
                )));
            }
        }
        let leader = if self.is_live(broker) {
            broker
        } else {
            // Registration (unfencing) makes it the leader.
            NO_LEADER
        };
        for t in topics {
            if self.topics.contains_key(&t.name) {
                continue;
            }
            let partition = PartitionState {
                replicas: vec![broker],
                isr: vec![broker],
                leader,
                leader_epoch: 0,
                partition_epoch: 0,
                target_replicas: None,
                original_replicas: None,
            };
            self.topics.insert(
                t.name.clone(),
                TopicState {
                    topic_id: t.topic_id,
                    configs: t.configs.clone(),
                    partitions: vec![partition; usize::try_from(t.partitions).unwrap_or(0)],
                },
            );
        }
        self.next_producer_id = self.next_producer_id.max(producer_ids_from);
        self.local_state_adopted = true;
        Ok(CommandOutput::Done)
    }

    fn unregister_broker(&mut self, node_id: BrokerId) -> CommandResult {
        let b = self
            .brokers
            .get(&node_id)
            .ok_or(CommandError::BrokerNotAvailable(node_id))?;
        if !b.fenced {
            return Err(CommandError::InvalidRequest(format!(
                "broker {node_id} is alive; stop it before removing it"
            )));
        }
        let held = self.partitions_where(|p| p.replicas.contains(&node_id));
        if !held.is_empty() {
            let list: Vec<String> = held
                .iter()
                .take(5)
                .map(|(t, p)| format!("{t}-{p}"))
                .collect();
            return Err(CommandError::InvalidRequest(format!(
                "broker {node_id} still holds {} replica(s) ({}{}); reassign them first",
                held.len(),
                list.join(", "),
                if held.len() > list.len() { ", ..." } else { "" }
            )));
        }
        self.brokers.remove(&node_id);
        Ok(CommandOutput::Done)
    }
}

fn draining_of(brokers: &BTreeMap<BrokerId, BrokerState>) -> BTreeSet<BrokerId> {
    brokers
        .iter()
        .filter(|(_, b)| b.draining)
        .map(|(id, _)| *id)
        .collect()
}

/// The partition takes `target` as its replica set: the ISR keeps only target members
/// (the caller made sure one is in sync), and a leader that is not among them hands
/// over to the preferred live in-sync target replica under a new epoch.
fn finish_reassignment(
    p: &mut PartitionState,
    target: Vec<BrokerId>,
    live: &BTreeSet<BrokerId>,
    draining: &BTreeSet<BrokerId>,
) {
    p.isr.retain(|r| target.contains(r));
    p.replicas = target;
    p.target_replicas = None;
    p.original_replicas = None;
    if !p.isr.contains(&p.leader) {
        p.leader = pick_leader(p, live, draining);
        p.leader_epoch += 1;
    }
}

/// The first live ISR member in replica (preference) order, preferring non-draining
/// brokers; [`NO_LEADER`] if none. Never a replica outside the ISR (no unclean election).
fn pick_leader(
    p: &PartitionState,
    live: &BTreeSet<BrokerId>,
    draining: &BTreeSet<BrokerId>,
) -> BrokerId {
    let eligible = || {
        p.replicas
            .iter()
            .copied()
            .filter(|r| p.isr.contains(r) && live.contains(r))
    };
    eligible()
        .find(|r| !draining.contains(r))
        .or_else(|| eligible().next())
        .unwrap_or(NO_LEADER)
}

fn new_partition(candidates: &[BrokerId], start: usize, rf: usize) -> PartitionState {
    let n = candidates.len().max(1);
    let replicas: Vec<BrokerId> = (0..rf)
        .filter_map(|j| candidates.get((start + j) % n).copied())
        .collect();
    PartitionState {
        leader: replicas.first().copied().unwrap_or(NO_LEADER),
        isr: replicas.clone(),
        replicas,
        leader_epoch: 0,
        partition_epoch: 0,
        target_replicas: None,
        original_replicas: None,
    }
}

/// A deterministic, practically unique topic id: FNV-1a (two 64-bit lanes) over the
/// cluster id, the name and the log index, which no other topic shares.
fn derive_topic_id(cluster_id: &str, name: &str, index: u64) -> [u8; 16] {
    let mut a: u64 = 0xcbf2_9ce4_8422_2325;
    let mut b: u64 = 0x6c62_272e_07bb_0142;
    let feed = |h: &mut u64, bytes: &[u8]| {
        for &x in bytes {
            *h ^= u64::from(x);
            *h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for h in [&mut a, &mut b] {
        feed(h, cluster_id.as_bytes());
        feed(h, &[0]);
        feed(h, name.as_bytes());
        feed(h, &[0]);
        feed(h, &index.to_be_bytes());
    }
    b = b.rotate_left(29) ^ a;
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&a.to_be_bytes());
    id[8..].copy_from_slice(&b.to_be_bytes());
    if id == [0u8; 16] {
        id[15] = 1;
    }
    id
}

#[cfg(test)]
mod tests;

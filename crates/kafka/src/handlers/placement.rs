//! Where partitions live and who leads them, as Kafka's admin tools move them:
//! ElectLeaders (preferred leader election), AlterPartitionReassignments and
//! ListPartitionReassignments (KIP-455). Each is a command to the metadata quorum,
//! which owns the rules (`ElectLeaders`, `ReassignPartition`); this module maps
//! Kafka's requests and answers onto them. The answer waits (bounded) until this
//! node's image shows the change, so a client that acts on it finds it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use kafka_protocol::messages::alter_partition_reassignments_response::{
    ReassignablePartitionResponse, ReassignableTopicResponse,
};
use kafka_protocol::messages::elect_leaders_response::{PartitionResult, ReplicaElectionResult};
use kafka_protocol::messages::list_partition_reassignments_response::{
    OngoingPartitionReassignment, OngoingTopicReassignment,
};
use kafka_protocol::messages::BrokerId as WireBrokerId;
use kafka_protocol::messages::*;
use sluice_topology::{
    wait_image, BrokerId, Command, CommandOutput, MetadataImage, PartitionState, NO_LEADER,
};
use sluice_vocab::{ErrorCode, Refused};

use super::admin::image_wait;
use super::{str_bytes, topic_name};
use crate::dispatch::{later, Hdr, Outcome};
use crate::server::Ctx;

/// ElectLeaders' `election_type`.
const PREFERRED: i8 = 0;
const UNCLEAN: i8 = 1;

fn refused(code: ErrorCode, message: impl Into<String>) -> Refused {
    Refused::new(code, message)
}

/// Whether an election of `election_type` is asked of the quorum for
/// `topic`-`partition`; why not when it is not. The quorum decides the rest
/// where it applies the election (a preferred one elects the first replica or
/// answers why not), so the answer never rests on a stale check.
fn may_elect(
    image: &MetadataImage,
    topic: &str,
    partition: i32,
    election_type: i8,
) -> Result<(), Refused> {
    let Some(p) = image.partition(topic, partition) else {
        return Err(refused(
            ErrorCode::UnknownTopicOrPartition,
            format!("unknown partition {topic}-{partition}"),
        ));
    };
    match election_type {
        PREFERRED => Ok(()),
        UNCLEAN if p.leader != NO_LEADER => Err(refused(
            ErrorCode::ElectionNotNeeded,
            format!("replica {} leads", p.leader),
        )),
        // A partition without a leader gets the election every leaderless partition
        // gets: among live in-sync replicas only. Sluice never elects a replica
        // outside the ISR, so an unclean election finds no one a clean one would not.
        UNCLEAN => Ok(()),
        other => Err(refused(
            ErrorCode::InvalidRequest,
            format!("unknown election type {other}"),
        )),
    }
}

pub(crate) fn elect_leaders(ctx: &Arc<Ctx>, req: ElectLeadersRequest, h: Hdr) -> Outcome {
    let ctx = ctx.clone();
    later(h, async move {
        let wait = image_wait(req.timeout_ms);
        let election_type = if h.version == 0 {
            PREFERRED
        } else {
            req.election_type
        };
        let image = ctx.topology.image();
        let every_partition = req.topic_partitions.is_none();
        let asked: Vec<(String, i32)> = match req.topic_partitions {
            None => image
                .topics
                .iter()
                .flat_map(|(name, t)| (0..t.partitions.len()).map(move |i| (name.clone(), i)))
                .filter_map(|(name, i)| Some((name, i32::try_from(i).ok()?)))
                .collect(),
            // A partition named twice is elected once and answered once,
            // as on Kafka.
            Some(topics) => {
                let mut seen = HashSet::new();
                topics
                    .into_iter()
                    .flat_map(|t| {
                        let name = t.topic.0.to_string();
                        t.partitions.into_iter().map(move |p| (name.clone(), p))
                    })
                    .filter(|tp| seen.insert(tp.clone()))
                    .collect()
            }
        };
        let mut results: Vec<((String, i32), Result<(), Refused>)> = asked
            .into_iter()
            .map(|(topic, partition)| {
                let check = may_elect(&image, &topic, partition, election_type);
                ((topic, partition), check)
            })
            .collect();
        let candidates: Vec<(String, i32)> = results
            .iter()
            .filter(|(_, check)| check.is_ok())
            .map(|(tp, _)| tp.clone())
            .collect();
        if !candidates.is_empty() {
            let elected = ctx
                .topology
                .propose(Command::ElectLeaders {
                    partitions: Some(candidates),
                    preferred_only: election_type == PREFERRED,
                })
                .await;
            let outcomes = match elected {
                Ok(CommandOutput::Elections(outcomes)) => outcomes,
                Ok(other) => {
                    tracing::warn!(?other, "ElectLeaders: unexpected answer from the quorum");
                    Vec::new()
                }
                Err(failure) => {
                    for (_, result) in results.iter_mut().filter(|(_, r)| r.is_ok()) {
                        *result = Err(failure.clone());
                    }
                    Vec::new()
                }
            };
            let index: HashMap<(String, i32), usize> = results
                .iter()
                .enumerate()
                .map(|(i, (tp, _))| (tp.clone(), i))
                .collect();
            let mut new_leaders = Vec::new();
            for outcome in outcomes {
                let tp = (outcome.topic, outcome.partition);
                let Some((_, result)) = index.get(&tp).and_then(|&i| results.get_mut(i)) else {
                    continue;
                };
                match outcome.result {
                    Ok(leader) => {
                        tracing::info!(topic = %tp.0, partition = tp.1, leader, "elected leader");
                        new_leaders.push((tp, leader));
                    }
                    Err(e) => *result = Err(Refused::from_error(&e)),
                }
            }
            wait_image(ctx.topology.as_ref(), wait, |image| {
                new_leaders.iter().all(|((topic, partition), leader)| {
                    image
                        .partition(topic, *partition)
                        .is_none_or(|p| p.leader == *leader)
                })
            })
            .await;
        }
        // Asked for every partition, Kafka lists only those an election was
        // needed for.
        if every_partition {
            results.retain(|(_, r)| !matches!(r, Err(e) if e.code == ErrorCode::ElectionNotNeeded));
        }
        let mut by_topic: Vec<ReplicaElectionResult> = Vec::new();
        let mut topic_at: HashMap<String, usize> = HashMap::new();
        for ((topic, partition), result) in results {
            let entry = PartitionResult::default().with_partition_id(partition);
            let entry = match result {
                Ok(()) => entry,
                Err(e) => entry
                    .with_error_code(e.code.code())
                    .with_error_message(Some(str_bytes(&e.message))),
            };
            match topic_at.get(&topic).and_then(|&i| by_topic.get_mut(i)) {
                Some(t) => t.partition_result.push(entry),
                None => {
                    topic_at.insert(topic.clone(), by_topic.len());
                    by_topic.push(
                        ReplicaElectionResult::default()
                            .with_topic(topic_name(&topic))
                            .with_partition_result(vec![entry]),
                    );
                }
            }
        }
        ElectLeadersResponse::default().with_replica_election_results(by_topic)
    })
}

/// One partition of an AlterPartitionReassignments request: a move to `target`, or
/// the cancellation of the move in progress (`None`).
async fn reassign_one(
    ctx: &Ctx,
    topic: &str,
    partition: i32,
    target: Option<Vec<BrokerId>>,
    allow_replication_factor_change: bool,
    wait: Duration,
) -> Result<(), Refused> {
    let image = ctx.topology.image();
    let Some(p) = image.partition(topic, partition) else {
        return Err(refused(
            ErrorCode::UnknownTopicOrPartition,
            format!("unknown partition {topic}-{partition}"),
        ));
    };
    let origin = p.original_replicas.as_ref().unwrap_or(&p.replicas);
    let Some(replicas) = target else {
        // A cancel reverts at once; the quorum checks there is a move to cancel.
        let cmd = Command::CancelReassignment {
            topic: topic.to_string(),
            partition,
        };
        if let CommandOutput::Partition(now) = ctx.topology.propose(cmd).await? {
            tracing::info!(topic, partition, replicas = ?now.replicas, "reassignment cancelled");
            until_applied(ctx, topic, partition, now.partition_epoch, wait).await;
        }
        return Ok(());
    };
    if !allow_replication_factor_change && replicas.len() != origin.len() {
        return Err(refused(
            ErrorCode::InvalidReplicationFactor,
            format!(
                "the replication factor would change from {} to {} but \
                 allowReplicationFactorChange is false",
                origin.len(),
                replicas.len()
            ),
        ));
    }
    if p.target_replicas.is_none() && p.replicas == replicas {
        return Ok(());
    }
    let unique: BTreeSet<BrokerId> = replicas.iter().copied().collect();
    if let Some(r) = unique.iter().find(|r| !image.brokers.contains_key(r)) {
        return Err(refused(
            ErrorCode::InvalidReplicaAssignment,
            format!("broker {r} is not registered"),
        ));
    }
    let cmd = Command::ReassignPartition {
        topic: topic.to_string(),
        partition,
        replicas: replicas.clone(),
    };
    if let CommandOutput::Partition(now) = ctx.topology.propose(cmd).await? {
        tracing::info!(
            topic,
            partition,
            ?replicas,
            moving = now.target_replicas.is_some(),
            "reassigned partition"
        );
        until_applied(ctx, topic, partition, now.partition_epoch, wait).await;
    }
    Ok(())
}

/// Waits (bounded) until this node's image shows the partition at
/// `partition_epoch` or later, so a client acting on the answer finds it.
async fn until_applied(
    ctx: &Ctx,
    topic: &str,
    partition: i32,
    partition_epoch: i32,
    wait: Duration,
) {
    wait_image(ctx.topology.as_ref(), wait, |image| {
        image
            .partition(topic, partition)
            .is_none_or(|p| p.partition_epoch >= partition_epoch)
    })
    .await;
}

pub(crate) fn alter_partition_reassignments(
    ctx: &Arc<Ctx>,
    req: AlterPartitionReassignmentsRequest,
    h: Hdr,
) -> Outcome {
    let ctx = ctx.clone();
    later(h, async move {
        let wait = image_wait(req.timeout_ms);
        // v0 has no such field: any change is allowed, as before KIP-860.
        let allow_rf_change = h.version == 0 || req.allow_replication_factor_change;
        let ctx = &ctx;
        let responses = futures::future::join_all(req.topics.into_iter().map(|topic| async move {
            let name = topic.name.0.to_string();
            let partitions = futures::future::join_all(topic.partitions.into_iter().map(|p| {
                let name = &name;
                async move {
                    let result = reassign_one(
                        ctx,
                        name,
                        p.partition_index,
                        p.replicas.map(|r| r.into_iter().map(|b| b.0).collect()),
                        allow_rf_change,
                        wait,
                    )
                    .await;
                    let entry = ReassignablePartitionResponse::default()
                        .with_partition_index(p.partition_index);
                    match result {
                        Ok(()) => entry,
                        Err(e) => entry
                            .with_error_code(e.code.code())
                            .with_error_message(Some(str_bytes(&e.message))),
                    }
                }
            }))
            .await;
            ReassignableTopicResponse::default()
                .with_name(topic.name)
                .with_partitions(partitions)
        }))
        .await;
        AlterPartitionReassignmentsResponse::default()
            .with_allow_replication_factor_change(allow_rf_change)
            .with_responses(responses)
    })
}

fn ongoing(partition: i32, p: &PartitionState) -> OngoingPartitionReassignment {
    let ids = |list: Vec<BrokerId>| list.into_iter().map(WireBrokerId).collect();
    OngoingPartitionReassignment::default()
        .with_partition_index(partition)
        .with_replicas(ids(p.replicas.clone()))
        .with_adding_replicas(ids(p.adding_replicas()))
        .with_removing_replicas(ids(p.removing_replicas()))
}

/// The moves in progress among the partitions asked for (all when `None`);
/// partitions that do not exist or are not moving are left out, as Kafka does.
pub(crate) fn list_partition_reassignments(
    ctx: &Ctx,
    req: ListPartitionReassignmentsRequest,
) -> ListPartitionReassignmentsResponse {
    let image = ctx.topology.image();
    let mut topics = Vec::new();
    let mut add = |name: &str, partitions: Vec<OngoingPartitionReassignment>| {
        if !partitions.is_empty() {
            topics.push(
                OngoingTopicReassignment::default()
                    .with_name(topic_name(name))
                    .with_partitions(partitions),
            );
        }
    };
    match req.topics {
        None => {
            for (name, t) in &image.topics {
                let moving = t
                    .partitions
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| p.target_replicas.is_some())
                    .filter_map(|(i, p)| Some(ongoing(i32::try_from(i).ok()?, p)))
                    .collect();
                add(name, moving);
            }
        }
        Some(asked) => {
            for t in asked {
                let name = t.name.0.to_string();
                let moving = t
                    .partition_indexes
                    .iter()
                    .filter_map(|&i| {
                        let p = image.partition(&name, i)?;
                        p.target_replicas.is_some().then(|| ongoing(i, p))
                    })
                    .collect();
                add(&name, moving);
            }
        }
    }
    ListPartitionReassignmentsResponse::default().with_topics(topics)
}

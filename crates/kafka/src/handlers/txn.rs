//! Transactions on the wire: AddPartitionsToTxn and EndTxn go to this node's
//! [`TxnCoordinator`] (InitProducerId with a transactional id and
//! FindCoordinator for transactions are in `meta.rs`), WriteTxnMarkers
//! writes a coordinator's markers into partitions this node leads,
//! DescribeProducers reads the producer state of partitions it leads, and
//! [`Markers`] is how the coordinator reaches every partition of a
//! transaction: in place where this node leads it, through its leader's
//! WriteTxnMarkers otherwise.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use kafka_protocol::messages::add_partitions_to_txn_request::AddPartitionsToTxnTopic;
use kafka_protocol::messages::add_partitions_to_txn_response::{
    AddPartitionsToTxnPartitionResult, AddPartitionsToTxnResult, AddPartitionsToTxnTopicResult,
};
use kafka_protocol::messages::txn_offset_commit_response::{
    TxnOffsetCommitResponsePartition, TxnOffsetCommitResponseTopic,
};
use kafka_protocol::messages::write_txn_markers_request::{
    WritableTxnMarker, WritableTxnMarkerTopic,
};
use kafka_protocol::messages::write_txn_markers_response::{
    WritableTxnMarkerPartitionResult, WritableTxnMarkerResult, WritableTxnMarkerTopicResult,
};
use kafka_protocol::messages::*;
use sluice_client::Connection;
use sluice_group::Coordination;
use sluice_log::Marker;
use sluice_topology::Topology;
use sluice_txn::{MarkerWriter, TopicPartition, TxnState};
use sluice_vocab::internal::OFFSETS_TOPIC;
use sluice_vocab::now_ms;
use sluice_vocab::{ErrorCode, KafkaError};

use super::str_bytes;
use crate::dispatch::{later, Hdr, Outcome};
use crate::server::Ctx;

/// PRODUCER_FENCED as a request of `version` knows it: requests older than
/// `since` (the version that introduced it, KIP-588) are told
/// INVALID_PRODUCER_EPOCH, as Kafka does.
pub(crate) fn fenced_as(code: ErrorCode, version: i16, since: i16) -> ErrorCode {
    if code == ErrorCode::ProducerFenced && version < since {
        ErrorCode::InvalidProducerEpoch
    } else {
        code
    }
}

/// Longest a marker waits to be committed on its partition.
const MARKER_COMMIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a WriteTxnMarkers call to another node may take.
const MARKER_CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// WriteTxnMarkers version this node sends (the only one Kafka 4 serves).
const WRITE_TXN_MARKERS_VERSION: i16 = 1;

/// AddPartitionsToTxn: v0-3 from a producer (one transaction); v4+ the
/// batched form partition leaders use (KIP-890), where a transaction may be
/// `verify_only`: is each partition in it already?
pub(crate) fn add_partitions_to_txn(
    ctx: &Arc<Ctx>,
    req: AddPartitionsToTxnRequest,
    h: Hdr,
) -> Outcome {
    let ctx = ctx.clone();
    let version = h.version;
    later(h, async move {
        if version <= 3 {
            let results = add_or_verify(
                &ctx,
                version,
                &req.v3_and_below_transactional_id.0,
                req.v3_and_below_producer_id.0,
                req.v3_and_below_producer_epoch,
                false,
                &req.v3_and_below_topics,
            )
            .await;
            return AddPartitionsToTxnResponse::default()
                .with_results_by_topic_v3_and_below(results);
        }
        let mut results = Vec::with_capacity(req.transactions.len());
        for t in &req.transactions {
            let topic_results = add_or_verify(
                &ctx,
                version,
                &t.transactional_id.0,
                t.producer_id.0,
                t.producer_epoch,
                t.verify_only,
                &t.topics,
            )
            .await;
            results.push(
                AddPartitionsToTxnResult::default()
                    .with_transactional_id(t.transactional_id.clone())
                    .with_topic_results(topic_results),
            );
        }
        AddPartitionsToTxnResponse::default().with_results_by_transaction(results)
    })
}

/// One transaction of an AddPartitionsToTxn request: its partitions added
/// (or, `verify_only`, checked), an error code for each.
async fn add_or_verify(
    ctx: &Arc<Ctx>,
    version: i16,
    id: &str,
    producer_id: i64,
    producer_epoch: i16,
    verify_only: bool,
    topics: &[AddPartitionsToTxnTopic],
) -> Vec<AddPartitionsToTxnTopicResult> {
    let wanted: Vec<TopicPartition> = topics
        .iter()
        .flat_map(|t| t.partitions.iter().map(|p| (t.name.0.to_string(), *p)))
        .collect();
    // Every partition must exist; otherwise none is added (as Kafka).
    let image = ctx.topology.image();
    let missing = |(t, p): &TopicPartition| image.partition(t, *p).is_none();
    let outcome: Result<Vec<bool>, ErrorCode> = if wanted.iter().any(missing) {
        Err(ErrorCode::UnknownTopicOrPartition)
    } else if verify_only {
        ctx.txns
            .verify_partitions(id, producer_id, producer_epoch, &wanted)
            .await
    } else {
        ctx.txns
            .add_partitions(id, producer_id, producer_epoch, &wanted)
            .await
            .map(|()| vec![true; wanted.len()])
    };
    // A partition a verified transaction does not hold: the producer must
    // abort (v5 names it so, KIP-890; v4 did not know that code).
    let not_in_txn = if version >= 5 {
        ErrorCode::TransactionAbortable
    } else {
        ErrorCode::InvalidTxnState
    };
    let mut held = outcome.as_ref().ok().map(|v| v.iter());
    topics
        .iter()
        .map(|t| {
            let partitions = t
                .partitions
                .iter()
                .map(|p| {
                    let own = match &outcome {
                        Ok(_) => match held.as_mut().and_then(Iterator::next) {
                            Some(true) => 0,
                            _ => not_in_txn.code(),
                        },
                        Err(ErrorCode::UnknownTopicOrPartition)
                            if missing(&(t.name.0.to_string(), *p)) =>
                        {
                            ErrorCode::UnknownTopicOrPartition.code()
                        }
                        // The others were not added because of it.
                        Err(ErrorCode::UnknownTopicOrPartition) => {
                            ErrorCode::OperationNotAttempted.code()
                        }
                        Err(e) => fenced_as(*e, version, 2).code(),
                    };
                    AddPartitionsToTxnPartitionResult::default()
                        .with_partition_index(*p)
                        .with_partition_error_code(own)
                })
                .collect();
            AddPartitionsToTxnTopicResult::default()
                .with_name(t.name.clone())
                .with_results_by_partition(partitions)
        })
        .collect()
}

/// AddOffsetsToTxn: the offsets partition joins the transaction (every
/// group's offsets live in `__consumer_offsets-0`).
pub(crate) fn add_offsets_to_txn(ctx: &Arc<Ctx>, req: AddOffsetsToTxnRequest, h: Hdr) -> Outcome {
    let ctx = ctx.clone();
    let version = h.version;
    later(h, async move {
        let result = ctx
            .txns
            .add_partitions(
                &req.transactional_id.0,
                req.producer_id.0,
                req.producer_epoch,
                &[(OFFSETS_TOPIC.to_owned(), 0)],
            )
            .await;
        AddOffsetsToTxnResponse::default()
            .with_error_code(ErrorCode::of(result.map_err(|e| fenced_as(e, version, 2))))
    })
}

/// TxnOffsetCommit goes to the group coordinator.
pub(crate) fn txn_offset_commit(ctx: &Arc<Ctx>, req: TxnOffsetCommitRequest, h: Hdr) -> Outcome {
    let ctx = ctx.clone();
    later(h, async move {
        match ctx.groups.groups() {
            Ok(groups) => groups.txn_offset_commit(req).await,
            Err(code) => {
                let topics = req
                    .topics
                    .iter()
                    .map(|t| {
                        TxnOffsetCommitResponseTopic::default()
                            .with_name(t.name.clone())
                            .with_partitions(
                                t.partitions
                                    .iter()
                                    .map(|p| {
                                        TxnOffsetCommitResponsePartition::default()
                                            .with_partition_index(p.partition_index)
                                            .with_error_code(code.code())
                                    })
                                    .collect(),
                            )
                    })
                    .collect();
                TxnOffsetCommitResponse::default().with_topics(topics)
            }
        }
    })
}

pub(crate) fn end_txn(ctx: &Arc<Ctx>, req: EndTxnRequest, h: Hdr) -> Outcome {
    let ctx = ctx.clone();
    let version = h.version;
    later(h, async move {
        let result = ctx
            .txns
            .end_txn(
                &req.transactional_id.0,
                req.producer_id.0,
                req.producer_epoch,
                req.committed,
            )
            .await;
        EndTxnResponse::default()
            .with_error_code(ErrorCode::of(result.map_err(|e| fenced_as(e, version, 2))))
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1)
    })
}

/// ListTransactions: the transactions this node coordinates (none unless it
/// leads `__transaction_state-0`), filtered by state, producer id and how
/// long they have been open.
pub(crate) fn list_transactions(ctx: &Arc<Ctx>, req: ListTransactionsRequest, h: Hdr) -> Outcome {
    let ctx = ctx.clone();
    later(h, async move {
        let states: Vec<TxnState> = req
            .state_filters
            .iter()
            .filter_map(|name| state_named(name))
            .collect();
        let unknown: Vec<_> = req
            .state_filters
            .iter()
            .filter(|name| state_named(name).is_none())
            .cloned()
            .collect();
        let resp = ListTransactionsResponse::default().with_unknown_state_filters(unknown);
        let pattern = match id_pattern(req.transactional_id_pattern.as_deref()) {
            Ok(p) => p,
            Err(code) => return resp.with_error_code(code.code()),
        };
        let all = match ctx.txns.transactions().await {
            Ok(all) => all,
            // Coordinated elsewhere: nothing of this node's to list.
            Err(ErrorCode::NotCoordinator) => Vec::new(),
            Err(code) => return resp.with_error_code(code.code()),
        };
        let now = now_ms();
        let listed = all
            .into_iter()
            .filter(|(_, m)| states.is_empty() || states.contains(&m.state))
            .filter(|(_, m)| {
                req.producer_id_filters.is_empty()
                    || req.producer_id_filters.iter().any(|p| p.0 == m.producer_id)
            })
            .filter(|(_, m)| {
                req.duration_filter < 0
                    || (m.start_ms >= 0 && now.saturating_sub(m.start_ms) >= req.duration_filter)
            })
            .filter(|(id, _)| pattern.as_ref().is_none_or(|p| p.is_match(id)))
            .map(|(id, m)| {
                list_transactions_response::TransactionState::default()
                    .with_transactional_id(TransactionalId(str_bytes(&id)))
                    .with_producer_id(ProducerId(m.producer_id))
                    .with_transaction_state(str_bytes(m.state.name()))
            })
            .collect();
        resp.with_transaction_states(listed)
    })
}

/// DescribeTransactions, answered by the coordinator.
pub(crate) fn describe_transactions(
    ctx: &Arc<Ctx>,
    req: DescribeTransactionsRequest,
    h: Hdr,
) -> Outcome {
    let ctx = ctx.clone();
    later(h, async move {
        let all = ctx.txns.transactions().await;
        let states = req
            .transactional_ids
            .into_iter()
            .map(|id| {
                let described = describe_transactions_response::TransactionState::default()
                    .with_transactional_id(id.clone())
                    .with_producer_id(ProducerId(-1))
                    .with_producer_epoch(-1)
                    .with_transaction_start_time_ms(-1);
                let found = match &all {
                    Err(code) => return described.with_error_code(code.code()),
                    Ok(all) => all.iter().find(|(t, _)| t.as_str() == id.0.as_str()),
                };
                let Some((_, m)) = found else {
                    return described.with_error_code(ErrorCode::TransactionalIdNotFound.code());
                };
                let mut by_topic: std::collections::BTreeMap<&str, Vec<i32>> =
                    std::collections::BTreeMap::new();
                for (t, p) in &m.partitions {
                    by_topic.entry(t.as_str()).or_default().push(*p);
                }
                described
                    .with_transaction_state(str_bytes(m.state.name()))
                    .with_transaction_timeout_ms(m.timeout_ms)
                    .with_transaction_start_time_ms(m.start_ms)
                    .with_producer_id(ProducerId(m.producer_id))
                    .with_producer_epoch(m.producer_epoch)
                    .with_topics(
                        by_topic
                            .into_iter()
                            .map(|(t, ps)| {
                                describe_transactions_response::TopicData::default()
                                    .with_topic(TopicName(str_bytes(t)))
                                    .with_partitions(ps)
                            })
                            .collect(),
                    )
            })
            .collect();
        DescribeTransactionsResponse::default().with_transaction_states(states)
    })
}

/// DescribeProducers (KIP-664): the producer state of partitions this node
/// leads, from their logs; a partition led elsewhere answers
/// NOT_LEADER_OR_FOLLOWER, so the client asks its leader, as in Kafka.
pub(crate) fn describe_producers(
    ctx: &Ctx,
    req: DescribeProducersRequest,
) -> DescribeProducersResponse {
    let topics = req
        .topics
        .into_iter()
        .map(|topic| {
            let partitions = topic
                .partition_indexes
                .iter()
                .map(|&p| {
                    let resp = describe_producers_response::PartitionResponse::default()
                        .with_partition_index(p);
                    let lead = match ctx.topology.lead_for_read(topic.name.0.as_str(), p, -1) {
                        Ok(lead) => lead,
                        Err(code) => return resp.with_error_code(code.code()),
                    };
                    let producers = lead
                        .partition()
                        .active_producers()
                        .into_iter()
                        .map(|a| {
                            describe_producers_response::ProducerState::default()
                                .with_producer_id(ProducerId(a.producer_id))
                                .with_producer_epoch(i32::from(a.epoch))
                                .with_last_sequence(a.last_sequence)
                                .with_last_timestamp(a.last_timestamp)
                                .with_coordinator_epoch(a.coordinator_epoch)
                                .with_current_txn_start_offset(a.txn_start_offset.unwrap_or(-1))
                        })
                        .collect();
                    resp.with_active_producers(producers)
                })
                .collect();
            describe_producers_response::TopicResponse::default()
                .with_name(topic.name)
                .with_partitions(partitions)
        })
        .collect();
    DescribeProducersResponse::default().with_topics(topics)
}

/// Most memory a ListTransactions pattern may compile to.
const PATTERN_SIZE_LIMIT: usize = 1 << 20;

/// ListTransactions v2's transactional id pattern: a regular expression the
/// whole id must match (Java's `Matcher.matches`, as Kafka applies it); none
/// when absent or empty.
fn id_pattern(pattern: Option<&str>) -> Result<Option<regex::Regex>, ErrorCode> {
    let Some(p) = pattern.filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    regex::RegexBuilder::new(&format!("^(?:{p})$"))
        .size_limit(PATTERN_SIZE_LIMIT)
        .build()
        .map(Some)
        .map_err(|_| ErrorCode::InvalidRegularExpression)
}

/// The state Kafka's tools name `name`.
fn state_named(name: &str) -> Option<TxnState> {
    (0..8)
        .filter_map(TxnState::from_code)
        .find(|s| s.name() == name)
}

/// Writes each marker into the partitions this node leads and answers each
/// partition once its marker is committed (or why not).
pub(crate) fn write_txn_markers(ctx: &Arc<Ctx>, req: WriteTxnMarkersRequest, h: Hdr) -> Outcome {
    let ctx = ctx.clone();
    later(h, async move {
        let mut markers = Vec::with_capacity(req.markers.len());
        for m in req.markers {
            let marker = Marker {
                commit: m.transaction_result,
                coordinator_epoch: m.coordinator_epoch,
            };
            let mut topics = Vec::with_capacity(m.topics.len());
            for t in m.topics {
                let writes = t.partition_indexes.iter().map(|p| {
                    let topology = ctx.topology.clone();
                    let groups = ctx.groups.clone();
                    let name = t.name.0.to_string();
                    async move {
                        let code = write_here(
                            &*topology,
                            &groups,
                            &name,
                            *p,
                            m.producer_id.0,
                            m.producer_epoch,
                            marker,
                        )
                        .await;
                        WritableTxnMarkerPartitionResult::default()
                            .with_partition_index(*p)
                            .with_error_code(ErrorCode::of(code))
                    }
                });
                let partitions = futures::future::join_all(writes).await;
                topics.push(
                    WritableTxnMarkerTopicResult::default()
                        .with_name(t.name)
                        .with_partitions(partitions),
                );
            }
            markers.push(
                WritableTxnMarkerResult::default()
                    .with_producer_id(m.producer_id)
                    .with_topics(topics),
            );
        }
        WriteTxnMarkersResponse::default().with_markers(markers)
    })
}

/// Writes `marker` into `topic`-`partition`, which this node must lead, and
/// waits until it is committed; in the offsets partition the group
/// coordinator then settles the transaction's offsets. A marker whose
/// producer epoch is older than the partition's (a newer epoch already ended
/// the transaction there) is done: nothing is left to end.
async fn write_here(
    topology: &dyn Topology,
    groups: &Coordination,
    topic: &str,
    partition: i32,
    producer_id: i64,
    producer_epoch: i16,
    marker: Marker,
) -> Result<(), ErrorCode> {
    let lead = topology.lead_for_produce(topic, partition, true)?;
    match lead.append_marker(producer_id, producer_epoch, marker) {
        Ok(appended) => {
            lead.wait_committed(appended.end_offset, Some(MARKER_COMMIT_TIMEOUT))
                .await?;
            if topic == OFFSETS_TOPIC {
                // The group coordinator lives with this leadership.
                if let Ok(g) = groups.groups() {
                    g.complete_transaction(producer_id, marker.commit);
                }
            }
            Ok(())
        }
        Err(e) if e.error_code() == ErrorCode::InvalidProducerEpoch => Ok(()),
        Err(e) => Err(e.error_code()),
    }
}

/// The coordinator's way to every partition of a transaction.
pub(crate) struct Markers {
    topology: Arc<dyn Topology>,
    groups: Arc<Coordination>,
    /// Connections to other nodes, by node id, reused between transactions.
    peers: tokio::sync::Mutex<HashMap<i32, Connection>>,
}

impl Markers {
    pub(crate) fn new(topology: Arc<dyn Topology>, groups: Arc<Coordination>) -> Markers {
        Markers {
            topology,
            groups,
            peers: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Writes the marker at node `leader` through its WriteTxnMarkers.
    async fn write_there(
        &self,
        leader: i32,
        partitions: &[&TopicPartition],
        producer_id: i64,
        producer_epoch: i16,
        marker: Marker,
    ) -> Result<(), ErrorCode> {
        let addr = {
            let image = self.topology.image();
            let b = image
                .brokers
                .get(&leader)
                .ok_or(ErrorCode::NotLeaderOrFollower)?;
            format!("{}:{}", b.kafka_host, b.kafka_port)
        };
        let mut by_topic: HashMap<&str, Vec<i32>> = HashMap::new();
        for (t, p) in partitions {
            by_topic.entry(t.as_str()).or_default().push(*p);
        }
        let req =
            WriteTxnMarkersRequest::default().with_markers(vec![WritableTxnMarker::default()
                .with_producer_id(ProducerId(producer_id))
                .with_producer_epoch(producer_epoch)
                .with_transaction_result(marker.commit)
                .with_coordinator_epoch(marker.coordinator_epoch)
                .with_topics(
                    by_topic
                        .into_iter()
                        .map(|(t, ps)| {
                            WritableTxnMarkerTopic::default()
                                .with_name(TopicName(str_bytes(t)))
                                .with_partition_indexes(ps)
                        })
                        .collect(),
                )]);
        // Taken out while in use: calls to other nodes go on side by side,
        // and a failed call's connection (unusable) is not put back.
        let idle = self.peers.lock().await.remove(&leader);
        let mut conn = match idle {
            Some(c) => c,
            None => Connection::connect(&addr, "sluice-txn-coordinator", MARKER_CALL_TIMEOUT)
                .await
                .map_err(|e| {
                    tracing::debug!(leader, %addr, error = %e, "cannot reach a partition leader for markers");
                    ErrorCode::NotLeaderOrFollower
                })?,
        };
        let resp = conn
            .call_within(&req, WRITE_TXN_MARKERS_VERSION, MARKER_CALL_TIMEOUT)
            .await
            .map_err(|e| {
                tracing::debug!(leader, error = %e, "WriteTxnMarkers failed");
                ErrorCode::NotLeaderOrFollower
            })?;
        self.peers.lock().await.insert(leader, conn);
        for m in resp.markers {
            for t in m.topics {
                for p in t.partitions {
                    ErrorCode::check(p.error_code)?;
                }
            }
        }
        Ok(())
    }
}

impl MarkerWriter for Markers {
    fn write<'a>(
        &'a self,
        partitions: &'a [TopicPartition],
        producer_id: i64,
        producer_epoch: i16,
        marker: Marker,
    ) -> BoxFuture<'a, Result<(), ErrorCode>> {
        Box::pin(async move {
            let image = self.topology.image();
            let me = self.topology.node_id();
            let mut here = Vec::new();
            let mut there: HashMap<i32, Vec<&TopicPartition>> = HashMap::new();
            for tp in partitions {
                match image.partition(&tp.0, tp.1) {
                    // A deleted partition has nothing left to mark.
                    None => {}
                    Some(p) if p.leader == me => here.push(tp),
                    Some(p) => there.entry(p.leader).or_default().push(tp),
                }
            }
            drop(image);
            let local = futures::future::join_all(here.into_iter().map(|(t, p)| {
                write_here(
                    &*self.topology,
                    &self.groups,
                    t,
                    *p,
                    producer_id,
                    producer_epoch,
                    marker,
                )
            }));
            let remote = futures::future::join_all(there.iter().map(|(leader, tps)| {
                self.write_there(*leader, tps, producer_id, producer_epoch, marker)
            }));
            let (local, remote) = futures::join!(local, remote);
            local
                .into_iter()
                .chain(remote)
                .collect::<Result<Vec<()>, _>>()?;
            Ok(())
        })
    }
}

//! ConsumerGroupHeartbeat and ConsumerGroupDescribe (KIP-848) on the wire:
//! request checks as Kafka makes them, then the group's state machine
//! ([`crate::consumer`]) under its mutex.

use std::sync::Arc;

use kafka_protocol::messages::consumer_group_describe_response::{
    self as describe, DescribedGroup,
};
use kafka_protocol::messages::consumer_group_heartbeat_response::{Assignment, TopicPartitions};
use kafka_protocol::messages::{
    ConsumerGroupDescribeRequest, ConsumerGroupDescribeResponse, ConsumerGroupHeartbeatRequest,
    ConsumerGroupHeartbeatResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use sluice_vocab::ErrorCode;
use tokio::time::Instant;
use uuid::Uuid;

use crate::consumer::{Heartbeat, Refusal, TopicId, LEAVE_EPOCH, STATIC_LEAVE_EPOCH};
use crate::group::{GroupKind, GroupState};
use crate::{record, str_bytes, GroupCoordinator, GROUP_AUTHORIZED_OPERATIONS};

/// Most topics a subscription may name.
const MAX_SUBSCRIBED_TOPICS: usize = 10_000;

fn invalid(message: &str) -> Refusal {
    (ErrorCode::InvalidRequest, message.to_owned())
}

/// Kafka's `throwIfConsumerGroupHeartbeatRequestIsInvalid`.
fn check(req: &ConsumerGroupHeartbeatRequest, version: i16) -> Result<(), Refusal> {
    if req.group_id.as_str().is_empty() {
        return Err(invalid("GroupId can't be empty."));
    }
    if req.group_id.as_str().len() > record::MAX_STRING
        || req.member_id.as_str().len() > record::MAX_STRING
    {
        return Err(invalid("GroupId or MemberId is too long."));
    }
    if req.instance_id.as_ref().is_some_and(|i| i.is_empty()) {
        return Err(invalid("InstanceId can't be empty."));
    }
    if req.rack_id.as_ref().is_some_and(|r| r.is_empty()) {
        return Err(invalid("RackId can't be empty."));
    }
    if req
        .subscribed_topic_names
        .as_ref()
        .is_some_and(|n| n.len() > MAX_SUBSCRIBED_TOPICS)
    {
        return Err(invalid("SubscribedTopicNames names too many topics."));
    }
    if version >= 1 && req.member_id.as_str().is_empty() {
        return Err(invalid("MemberId can't be empty."));
    }
    match req.member_epoch {
        0 => {
            if req.rebalance_timeout_ms == -1 {
                return Err(invalid(
                    "RebalanceTimeoutMs must be provided in first request.",
                ));
            }
            if req.topic_partitions.as_ref().is_none_or(|t| !t.is_empty()) {
                return Err(invalid("TopicPartitions must be empty when (re-)joining."));
            }
            if req.subscribed_topic_names.is_none() && req.subscribed_topic_regex.is_none() {
                return Err(invalid(
                    "SubscribedTopicNames or SubscribedTopicRegex must be set in first request.",
                ));
            }
        }
        STATIC_LEAVE_EPOCH => {
            if req.instance_id.is_none() {
                return Err(invalid("InstanceId can't be null."));
            }
            if req.member_id.as_str().is_empty() {
                return Err(invalid("MemberId can't be empty."));
            }
        }
        e if e > 0 || e == LEAVE_EPOCH => {
            if req.member_id.as_str().is_empty() {
                return Err(invalid("MemberId can't be empty."));
            }
        }
        _ => return Err(invalid("MemberEpoch is invalid.")),
    }
    Ok(())
}

fn refused(err: ErrorCode, message: String) -> ConsumerGroupHeartbeatResponse {
    ConsumerGroupHeartbeatResponse::default()
        .with_error_code(err.code())
        .with_error_message(Some(StrBytes::from_string(message)))
}

fn wire_assignment(a: Vec<(TopicId, Vec<i32>)>) -> Assignment {
    Assignment::default().with_topic_partitions(
        a.into_iter()
            .map(|(id, partitions)| {
                TopicPartitions::default()
                    .with_topic_id(Uuid::from_bytes(id))
                    .with_partitions(partitions)
            })
            .collect(),
    )
}

impl GroupCoordinator {
    /// One heartbeat of a member of a consumer-protocol group.
    pub fn consumer_group_heartbeat(
        self: &Arc<Self>,
        req: ConsumerGroupHeartbeatRequest,
        version: i16,
        client_id: &str,
        client_host: &str,
    ) -> ConsumerGroupHeartbeatResponse {
        if let Err((err, message)) = check(&req, version) {
            return refused(err, message);
        }
        let group_id = req.group_id.to_string();
        let member_id = if req.member_id.as_str().is_empty() {
            // v0: the coordinator names a joining member.
            self.new_member_id(client_id)
        } else {
            req.member_id.to_string()
        };
        let hb = Heartbeat {
            member_id,
            member_epoch: req.member_epoch,
            instance_id: req.instance_id.as_ref().map(ToString::to_string),
            rack_id: req.rack_id.as_ref().map(ToString::to_string),
            rebalance_timeout_ms: req.rebalance_timeout_ms,
            subscribed_names: req
                .subscribed_topic_names
                .as_ref()
                .map(|names| names.iter().map(|n| n.to_string()).collect()),
            subscribed_regex: req.subscribed_topic_regex.as_ref().map(ToString::to_string),
            server_assignor: req.server_assignor.as_ref().map(ToString::to_string),
            owned: req.topic_partitions.as_ref().map(|tps| {
                tps.iter()
                    .map(|tp| (*tp.topic_id.as_bytes(), tp.partitions.clone()))
                    .collect()
            }),
            client_id: client_id.to_owned(),
            client_host: client_host.to_owned(),
        };
        let handle = if req.member_epoch == 0 {
            self.live_group(&group_id)
        } else {
            match self.get_group(&group_id) {
                Some(h) => h,
                None => {
                    return refused(
                        ErrorCode::UnknownMemberId,
                        format!("Group {group_id} has no member {}.", req.member_id.as_str()),
                    )
                }
            }
        };
        let answer = {
            let mut g = handle.state.lock();
            if self.is_closed() {
                return refused(
                    ErrorCode::NotCoordinator,
                    "This broker is no longer the group coordinator.".to_owned(),
                );
            }
            if g.state == GroupState::Dead {
                return refused(
                    ErrorCode::CoordinatorNotAvailable,
                    format!("Group {group_id} was just removed."),
                );
            }
            g.consumer_heartbeat(hb, Instant::now(), &self.config, self.catalog.as_ref())
        };
        handle.wake.notify_one();
        match answer {
            Err((err, message)) => refused(err, message),
            Ok(a) => ConsumerGroupHeartbeatResponse::default()
                .with_member_id(Some(StrBytes::from_string(a.member_id)))
                .with_member_epoch(a.member_epoch)
                .with_heartbeat_interval_ms(a.heartbeat_interval_ms)
                .with_assignment(a.assignment.map(wire_assignment)),
        }
    }

    pub fn consumer_group_describe(
        self: &Arc<Self>,
        req: ConsumerGroupDescribeRequest,
        version: i16,
    ) -> ConsumerGroupDescribeResponse {
        let groups = req
            .group_ids
            .iter()
            .map(|id| {
                let mut out = DescribedGroup::default().with_group_id(id.clone());
                if req.include_authorized_operations {
                    out.authorized_operations = GROUP_AUTHORIZED_OPERATIONS;
                }
                let not_found = |out: DescribedGroup, why: &str| {
                    out.with_error_code(ErrorCode::GroupIdNotFound.code())
                        .with_error_message(Some(StrBytes::from_string(format!(
                            "Group {} {why}.",
                            id.as_str()
                        ))))
                };
                let Some(handle) = self.get_group(id.as_str()) else {
                    return not_found(out, "not found");
                };
                let g = handle.state.lock();
                if g.state == GroupState::Dead {
                    return not_found(out, "not found");
                }
                if g.kind != GroupKind::Consumer {
                    return not_found(out, "is not a consumer group");
                }
                let c = &g.consumer;
                let topic_partitions = |a: &crate::consumer::Assignment| {
                    describe::Assignment::default().with_topic_partitions(
                        a.iter()
                            .filter(|(_, parts)| !parts.is_empty())
                            .map(|(id, parts)| {
                                describe::TopicPartitions::default()
                                    .with_topic_id(Uuid::from_bytes(*id))
                                    .with_topic_name(TopicName(str_bytes(
                                        c.topic_name(id).unwrap_or_default(),
                                    )))
                                    .with_partitions(parts.iter().copied().collect())
                            })
                            .collect(),
                    )
                };
                let members = c
                    .members
                    .values()
                    .map(|m| {
                        let mut d = describe::Member::default()
                            .with_member_id(str_bytes(&m.id))
                            .with_instance_id(m.instance_id.as_deref().map(str_bytes))
                            .with_rack_id(m.rack_id.as_deref().map(str_bytes))
                            .with_member_epoch(m.member_epoch)
                            .with_client_id(str_bytes(&m.client_id))
                            .with_client_host(str_bytes(&m.client_host))
                            .with_subscribed_topic_names(
                                m.subscribed_names
                                    .iter()
                                    .map(|t| TopicName(str_bytes(t)))
                                    .collect(),
                            )
                            .with_subscribed_topic_regex(
                                m.subscribed_regex.as_deref().map(str_bytes),
                            )
                            .with_assignment(topic_partitions(&m.assigned))
                            .with_target_assignment(topic_partitions(
                                c.target.get(&m.id).unwrap_or(&Default::default()),
                            ));
                        if version >= 1 {
                            // 1: the consumer protocol (0 would be classic).
                            d.member_type = 1;
                        }
                        d
                    })
                    .collect();
                out.with_group_state(StrBytes::from_static_str(c.state()))
                    .with_group_epoch(c.group_epoch)
                    .with_assignment_epoch(c.assignment_epoch)
                    .with_assignor_name(str_bytes(if c.assignor.is_empty() {
                        self.config.consumer_default_assignor()
                    } else {
                        &c.assignor
                    }))
                    .with_members(members)
            })
            .collect();
        ConsumerGroupDescribeResponse::default().with_groups(groups)
    }
}

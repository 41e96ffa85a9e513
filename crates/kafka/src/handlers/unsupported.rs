//! Answers to versions outside SUPPORTED_APIS.
//!
//! ApiVersions of a version we do not serve gets UNSUPPORTED_VERSION with our
//! table, encoded at v0 (as Kafka does) so any client can read it and retry
//! with a version we serve. Any other API at a version the codec can still
//! decode and encode (newer than ours, e.g. Produce v12) is answered with
//! UNSUPPORTED_VERSION in every error field of its response, so the client
//! gets a clear error instead of a dropped connection. Produce v0-v2 are
//! advertised but refused (see `ADVERTISED_NOT_SERVED`) and answered here the
//! same way, in their own response layout, as Kafka 4 does. A version the codec
//! cannot handle at all (below its range, or beyond it) cannot be parsed or
//! answered: the connection is closed with one log line.

use bytes::Bytes;
use kafka_protocol::messages::describe_groups_response::DescribedGroup;
use kafka_protocol::messages::find_coordinator_response::Coordinator;
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::OffsetFetchResponseGroup;
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion};
use sluice_vocab::ErrorCode;

use crate::dispatch::{now, now_at, Hdr, Outcome};
use crate::error_counts::ErrorCounts;

const UNSUPPORTED: i16 = ErrorCode::UnsupportedVersion.code();

fn close(h: Hdr, why: &str) -> Outcome {
    tracing::warn!(peer = %h.peer, api = ?h.api, version = h.version, reason = why,
        "closing connection: unsupported api version");
    Outcome::Close
}

/// Decodes the request at its (unsupported) version and answers with the
/// error response `build` makes of it.
fn answer<Req, Resp>(h: Hdr, mut body: Bytes, build: impl FnOnce(Req) -> Option<Resp>) -> Outcome
where
    Req: Decodable,
    Resp: Encodable + HeaderVersion + ErrorCounts,
{
    let range = h.api.valid_versions();
    if h.version < range.min || h.version > range.max {
        return close(h, "version unknown to the codec");
    }
    match Req::decode(&mut body, h.version) {
        Ok(req) => match build(req) {
            Some(resp) => {
                tracing::info!(peer = %h.peer, api = ?h.api, version = h.version,
                    "answered UNSUPPORTED_VERSION");
                now(h, &resp)
            }
            None => close(h, "no response expected"),
        },
        Err(err) => {
            tracing::warn!(peer = %h.peer, api = ?h.api, version = h.version, error = %err,
                "closing connection: malformed request");
            Outcome::Close
        }
    }
}

pub(crate) fn respond(h: Hdr, body: Bytes) -> Outcome {
    match h.api {
        ApiKey::ApiVersions => now_at(h, 0, &super::meta::api_versions(UNSUPPORTED)),
        ApiKey::Produce => answer(h, body, |req: ProduceRequest| {
            // acks=0 expects no answer: closing is the only signal.
            (req.acks != 0).then(|| {
                let responses = req
                    .topic_data
                    .into_iter()
                    .map(|t| {
                        let partitions = t
                            .partition_data
                            .iter()
                            .map(|p| {
                                PartitionProduceResponse::default()
                                    .with_index(p.index)
                                    .with_error_code(UNSUPPORTED)
                                    .with_base_offset(-1)
                                    .with_log_append_time_ms(-1)
                                    .with_log_start_offset(-1)
                            })
                            .collect();
                        TopicProduceResponse::default()
                            .with_name(t.name)
                            .with_topic_id(t.topic_id)
                            .with_partition_responses(partitions)
                    })
                    .collect();
                ProduceResponse::default().with_responses(responses)
            })
        }),
        ApiKey::Fetch => answer(h, body, |_: FetchRequest| {
            Some(FetchResponse::default().with_error_code(UNSUPPORTED))
        }),
        ApiKey::ListOffsets => answer(h, body, |req: ListOffsetsRequest| {
            let topics = req
                .topics
                .into_iter()
                .map(|t| {
                    let partitions = t
                        .partitions
                        .iter()
                        .map(|p| {
                            ListOffsetsPartitionResponse::default()
                                .with_partition_index(p.partition_index)
                                .with_error_code(UNSUPPORTED)
                                .with_timestamp(-1)
                                .with_offset(-1)
                        })
                        .collect();
                    ListOffsetsTopicResponse::default()
                        .with_name(t.name)
                        .with_partitions(partitions)
                })
                .collect();
            Some(ListOffsetsResponse::default().with_topics(topics))
        }),
        ApiKey::Metadata => answer(h, body, |_: MetadataRequest| {
            Some(MetadataResponse::default().with_error_code(UNSUPPORTED))
        }),
        ApiKey::OffsetCommit => answer(h, body, |req: OffsetCommitRequest| {
            let topics = req
                .topics
                .into_iter()
                .map(|t| {
                    let partitions = t
                        .partitions
                        .iter()
                        .map(|p| {
                            OffsetCommitResponsePartition::default()
                                .with_partition_index(p.partition_index)
                                .with_error_code(UNSUPPORTED)
                        })
                        .collect();
                    OffsetCommitResponseTopic::default()
                        .with_name(t.name)
                        .with_topic_id(t.topic_id)
                        .with_partitions(partitions)
                })
                .collect();
            Some(OffsetCommitResponse::default().with_topics(topics))
        }),
        ApiKey::OffsetFetch => answer(h, body, |req: OffsetFetchRequest| {
            let groups = req
                .groups
                .into_iter()
                .map(|g| {
                    OffsetFetchResponseGroup::default()
                        .with_group_id(g.group_id)
                        .with_error_code(UNSUPPORTED)
                })
                .collect();
            Some(OffsetFetchResponse::default().with_groups(groups))
        }),
        ApiKey::FindCoordinator => answer(h, body, |req: FindCoordinatorRequest| {
            let coordinators = req
                .coordinator_keys
                .into_iter()
                .map(|key| {
                    Coordinator::default()
                        .with_key(key)
                        .with_node_id(BrokerId(-1))
                        .with_port(-1)
                        .with_error_code(UNSUPPORTED)
                })
                .collect();
            Some(FindCoordinatorResponse::default().with_coordinators(coordinators))
        }),
        ApiKey::ListGroups => answer(h, body, |_: ListGroupsRequest| {
            Some(ListGroupsResponse::default().with_error_code(UNSUPPORTED))
        }),
        ApiKey::DescribeGroups => answer(h, body, |req: DescribeGroupsRequest| {
            let groups = req
                .groups
                .into_iter()
                .map(|g| {
                    DescribedGroup::default()
                        .with_group_id(g)
                        .with_error_code(UNSUPPORTED)
                })
                .collect();
            Some(DescribeGroupsResponse::default().with_groups(groups))
        }),
        ApiKey::InitProducerId => answer(h, body, |_: InitProducerIdRequest| {
            Some(
                InitProducerIdResponse::default()
                    .with_error_code(UNSUPPORTED)
                    .with_producer_id(ProducerId(-1))
                    .with_producer_epoch(-1),
            )
        }),
        ApiKey::DescribeCluster => answer(h, body, |_: DescribeClusterRequest| {
            Some(DescribeClusterResponse::default().with_error_code(UNSUPPORTED))
        }),
        // The brokers' batched form (v4+) has a top-level error.
        ApiKey::AddPartitionsToTxn => answer(h, body, |_: AddPartitionsToTxnRequest| {
            Some(AddPartitionsToTxnResponse::default().with_error_code(UNSUPPORTED))
        }),
        ApiKey::ListTransactions => answer(h, body, |_: ListTransactionsRequest| {
            Some(ListTransactionsResponse::default().with_error_code(UNSUPPORTED))
        }),
        ApiKey::AddOffsetsToTxn => answer(h, body, |_: AddOffsetsToTxnRequest| {
            Some(AddOffsetsToTxnResponse::default().with_error_code(UNSUPPORTED))
        }),
        ApiKey::TxnOffsetCommit => answer(h, body, |req: TxnOffsetCommitRequest| {
            let topics = req
                .topics
                .into_iter()
                .map(|t| {
                    let partitions = t
                        .partitions
                        .into_iter()
                        .map(|p| {
                            txn_offset_commit_response::TxnOffsetCommitResponsePartition::default()
                                .with_partition_index(p.partition_index)
                                .with_error_code(UNSUPPORTED)
                        })
                        .collect();
                    txn_offset_commit_response::TxnOffsetCommitResponseTopic::default()
                        .with_name(t.name)
                        .with_partitions(partitions)
                })
                .collect();
            Some(TxnOffsetCommitResponse::default().with_topics(topics))
        }),
        ApiKey::EndTxn => answer(h, body, |_: EndTxnRequest| {
            Some(
                EndTxnResponse::default()
                    .with_error_code(UNSUPPORTED)
                    .with_producer_id(ProducerId(-1))
                    .with_producer_epoch(-1),
            )
        }),
        // Every other served API is served over the codec's whole range, so
        // its unsupported versions are ones the codec cannot parse either.
        _ => close(h, "version unknown to the codec"),
    }
}

#[cfg(test)]
mod tests {
    use crate::api_versions::SUPPORTED_APIS;
    use kafka_protocol::messages::ApiKey;

    /// Versions beyond ours that the codec still knows must be answered;
    /// this lists the APIs `respond` builds error responses for.
    #[test]
    fn every_gap_above_our_range_is_answered() {
        let answered = [
            ApiKey::ApiVersions,
            ApiKey::Produce,
            ApiKey::Fetch,
            ApiKey::ListOffsets,
            ApiKey::Metadata,
            ApiKey::OffsetCommit,
            ApiKey::OffsetFetch,
            ApiKey::FindCoordinator,
            ApiKey::ListGroups,
            ApiKey::DescribeGroups,
            ApiKey::InitProducerId,
            ApiKey::DescribeCluster,
            ApiKey::AddPartitionsToTxn,
            ApiKey::AddOffsetsToTxn,
            ApiKey::TxnOffsetCommit,
            ApiKey::ListTransactions,
            ApiKey::EndTxn,
        ];
        for &(key, min, max) in SUPPORTED_APIS {
            let api = ApiKey::try_from(key).expect("known key");
            let codec = api.valid_versions();
            assert_eq!(
                min, codec.min,
                "{api:?}: versions below ours would be closed"
            );
            if max < codec.max {
                assert!(answered.contains(&api), "{api:?} v{} not answered", max + 1);
            }
        }
    }
}

//! Request header decoding, version checks and routing to the handlers.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion};

use sluice_group::refuse;
use sluice_vocab::ErrorCode;

use crate::api_versions::{refused, supported_range};
use crate::connection::Slot;
use crate::error_counts::ErrorCounts;
use crate::handlers;
use crate::server::Ctx;

/// What the connection does after a request.
pub(crate) enum Outcome {
    Respond(Slot),
    /// acks=0 produce: the client expects nothing back.
    NoResponse,
    /// Close the connection (the reason was logged).
    Close,
}

/// The parts of a request header the handlers need.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Hdr {
    pub api: ApiKey,
    pub version: i16,
    pub correlation_id: i32,
    pub peer: SocketAddr,
}

fn peek_i16(frame: &[u8], at: usize) -> Option<i16> {
    let bytes = frame.get(at..at.checked_add(2)?)?;
    Some(i16::from_be_bytes(bytes.try_into().ok()?))
}

/// Decodes a request body; a malformed one closes the connection.
macro_rules! decode {
    ($ty:ty, $buf:expr, $h:expr) => {
        match <$ty>::decode(&mut $buf, $h.version) {
            Ok(req) => req,
            Err(err) => {
                tracing::warn!(peer = %$h.peer, api = ?$h.api, version = $h.version, error = %err,
                    "closing connection: malformed request");
                return Outcome::Close;
            }
        }
    };
}

pub(crate) async fn handle(ctx: &Arc<Ctx>, frame: Bytes, peer: SocketAddr) -> Outcome {
    let (Some(key), Some(version)) = (peek_i16(&frame, 0), peek_i16(&frame, 2)) else {
        tracing::warn!(%peer, size = frame.len(), "closing connection: frame too short for a request header");
        return Outcome::Close;
    };
    let Ok(api) = ApiKey::try_from(key) else {
        tracing::warn!(%peer, api_key = key, "closing connection: unknown api key");
        return Outcome::Close;
    };
    let mut buf = frame;
    let header = match RequestHeader::decode(&mut buf, api.request_header_version(version)) {
        Ok(header) => header,
        Err(err) => {
            tracing::warn!(%peer, ?api, version, error = %err, "closing connection: malformed request header");
            return Outcome::Close;
        }
    };
    let h = Hdr {
        api,
        version,
        correlation_id: header.correlation_id,
        peer,
    };
    let _ = crate::connection::CLIENT.try_with(|c| c.set_id(header.client_id.as_ref()));
    let Some((min, max)) = supported_range(key) else {
        tracing::warn!(%peer, ?api, version, "closing connection: api not supported by this broker");
        return Outcome::Close;
    };
    // Advertised-but-refused versions (Produce v0-v2) are answered like
    // versions outside the table.
    if version < min || version > max || refused(key, version) {
        return handlers::unsupported::respond(h, buf);
    }
    match api {
        ApiKey::ApiVersions => {
            let _req = decode!(ApiVersionsRequest, buf, h);
            now(h, &handlers::meta::api_versions(0))
        }
        ApiKey::Metadata => {
            let req = decode!(MetadataRequest, buf, h);
            handlers::meta::metadata(ctx, req, h)
        }
        ApiKey::DescribeCluster => {
            let req = decode!(DescribeClusterRequest, buf, h);
            now(h, &handlers::meta::describe_cluster(ctx, req, version))
        }
        ApiKey::FindCoordinator => {
            let req = decode!(FindCoordinatorRequest, buf, h);
            now(h, &handlers::meta::find_coordinator(ctx, req, version))
        }
        ApiKey::InitProducerId => {
            let req = decode!(InitProducerIdRequest, buf, h);
            handlers::meta::init_producer_id(ctx, req, h)
        }
        ApiKey::AddPartitionsToTxn => {
            let req = decode!(AddPartitionsToTxnRequest, buf, h);
            handlers::txn::add_partitions_to_txn(ctx, req, h)
        }
        ApiKey::AddOffsetsToTxn => {
            let req = decode!(AddOffsetsToTxnRequest, buf, h);
            handlers::txn::add_offsets_to_txn(ctx, req, h)
        }
        ApiKey::TxnOffsetCommit => {
            let req = decode!(TxnOffsetCommitRequest, buf, h);
            handlers::txn::txn_offset_commit(ctx, req, h)
        }
        ApiKey::EndTxn => {
            let req = decode!(EndTxnRequest, buf, h);
            handlers::txn::end_txn(ctx, req, h)
        }
        ApiKey::WriteTxnMarkers => {
            let req = decode!(WriteTxnMarkersRequest, buf, h);
            handlers::txn::write_txn_markers(ctx, req, h)
        }
        ApiKey::ListTransactions => {
            let req = decode!(ListTransactionsRequest, buf, h);
            handlers::txn::list_transactions(ctx, req, h)
        }
        ApiKey::DescribeTransactions => {
            let req = decode!(DescribeTransactionsRequest, buf, h);
            handlers::txn::describe_transactions(ctx, req, h)
        }
        ApiKey::DescribeProducers => {
            let req = decode!(DescribeProducersRequest, buf, h);
            now(h, &handlers::txn::describe_producers(ctx, req))
        }
        ApiKey::DescribeLogDirs => {
            let req = decode!(DescribeLogDirsRequest, buf, h);
            now(h, &handlers::log_dirs::describe_log_dirs(ctx, req))
        }
        ApiKey::CreateTopics => {
            let req = decode!(CreateTopicsRequest, buf, h);
            handlers::admin::create_topics(ctx, req, h)
        }
        ApiKey::DeleteTopics => {
            let req = decode!(DeleteTopicsRequest, buf, h);
            handlers::admin::delete_topics(ctx, req, h)
        }
        ApiKey::CreatePartitions => {
            let req = decode!(CreatePartitionsRequest, buf, h);
            handlers::admin::create_partitions(ctx, req, h)
        }
        ApiKey::DescribeClientQuotas => {
            let req = decode!(DescribeClientQuotasRequest, buf, h);
            now(h, &handlers::quotas::describe_client_quotas(ctx, req))
        }
        ApiKey::AlterClientQuotas => {
            let req = decode!(AlterClientQuotasRequest, buf, h);
            handlers::quotas::alter_client_quotas(ctx, req, h)
        }
        ApiKey::ElectLeaders => {
            let req = decode!(ElectLeadersRequest, buf, h);
            handlers::placement::elect_leaders(ctx, req, h)
        }
        ApiKey::AlterPartitionReassignments => {
            let req = decode!(AlterPartitionReassignmentsRequest, buf, h);
            handlers::placement::alter_partition_reassignments(ctx, req, h)
        }
        ApiKey::ListPartitionReassignments => {
            let req = decode!(ListPartitionReassignmentsRequest, buf, h);
            now(
                h,
                &handlers::placement::list_partition_reassignments(ctx, req),
            )
        }
        ApiKey::DescribeConfigs => {
            let req = decode!(DescribeConfigsRequest, buf, h);
            now(h, &handlers::configs::describe_configs(ctx, req, version))
        }
        ApiKey::IncrementalAlterConfigs => {
            let req = decode!(IncrementalAlterConfigsRequest, buf, h);
            handlers::admin::incremental_alter_configs(ctx, req, h)
        }
        ApiKey::AlterConfigs => {
            let req = decode!(AlterConfigsRequest, buf, h);
            handlers::admin::alter_configs(ctx, req, h)
        }
        ApiKey::Produce => {
            let req = decode!(ProduceRequest, buf, h);
            handlers::produce::handle(ctx, req, h)
        }
        ApiKey::Fetch => {
            let req = decode!(FetchRequest, buf, h);
            handlers::fetch::handle(ctx, req, h)
        }
        ApiKey::ListOffsets => {
            let req = decode!(ListOffsetsRequest, buf, h);
            now(h, &handlers::offsets::list_offsets(ctx, req, version))
        }
        ApiKey::OffsetForLeaderEpoch => {
            let req = decode!(OffsetForLeaderEpochRequest, buf, h);
            now(h, &handlers::offsets::offset_for_leader_epoch(ctx, req))
        }
        ApiKey::DeleteRecords => {
            let req = decode!(DeleteRecordsRequest, buf, h);
            let ctx = ctx.clone();
            later(h, async move {
                handlers::offsets::delete_records(&ctx, req).await
            })
        }
        // Group APIs: awaited in line, like Kafka, which handles one request
        // of a connection at a time; a JoinGroup holds its connection until
        // the rebalance completes.
        ApiKey::JoinGroup => {
            let req = decode!(JoinGroupRequest, buf, h);
            match ctx.groups.groups() {
                Ok(groups) => {
                    // Kafka names members after the client id and shows "/<ip>" as their host.
                    let client_id = header.client_id.as_ref().map_or("", |id| id.as_str());
                    let host = format!("/{}", peer.ip());
                    let response = groups
                        .join_group_with_client(req, version, client_id, &host)
                        .await;
                    now(h, &response)
                }
                Err(code) => now(h, &refuse::join_group(&req, version, code)),
            }
        }
        ApiKey::SyncGroup => {
            let req = decode!(SyncGroupRequest, buf, h);
            match ctx.groups.groups() {
                Ok(groups) => now(h, &groups.sync_group(req, version).await),
                Err(code) => now(h, &refuse::sync_group(version, code)),
            }
        }
        ApiKey::Heartbeat => {
            let req = decode!(HeartbeatRequest, buf, h);
            match ctx.groups.groups() {
                Ok(groups) => now(h, &groups.heartbeat(req, version).await),
                Err(code) => now(h, &refuse::heartbeat(code)),
            }
        }
        ApiKey::LeaveGroup => {
            let req = decode!(LeaveGroupRequest, buf, h);
            match ctx.groups.groups() {
                Ok(groups) => now(h, &groups.leave_group(req, version).await),
                Err(code) => now(h, &refuse::leave_group(code)),
            }
        }
        ApiKey::OffsetCommit => {
            let req = decode!(OffsetCommitRequest, buf, h);
            match ctx.groups.groups() {
                Ok(groups) => now(h, &groups.offset_commit(req, version).await),
                Err(code) => now(h, &refuse::offset_commit(&req, code)),
            }
        }
        ApiKey::OffsetFetch => {
            let req = decode!(OffsetFetchRequest, buf, h);
            match ctx.groups.groups() {
                Ok(groups) => now(h, &groups.offset_fetch(req, version).await),
                Err(code) => now(h, &refuse::offset_fetch(&req, version, code)),
            }
        }
        ApiKey::ListGroups => {
            let req = decode!(ListGroupsRequest, buf, h);
            match ctx.groups.groups() {
                Ok(groups) => now(h, &groups.list_groups(req, version)),
                // A broker that coordinates nothing has no groups to list
                // (clients ask every broker).
                Err(ErrorCode::NotCoordinator) => now(h, &ListGroupsResponse::default()),
                Err(code) => now(h, &refuse::list_groups(code)),
            }
        }
        ApiKey::DescribeGroups => {
            let req = decode!(DescribeGroupsRequest, buf, h);
            match ctx.groups.groups() {
                Ok(groups) => now(h, &groups.describe_groups(req, version)),
                Err(code) => now(h, &refuse::describe_groups(&req, code)),
            }
        }
        ApiKey::OffsetDelete => {
            let req = decode!(OffsetDeleteRequest, buf, h);
            match ctx.groups.groups() {
                Ok(groups) => {
                    let image = ctx.topology.image();
                    let exists = |topic: &str, p: i32| {
                        image.topics.get(topic).is_some_and(|t| {
                            usize::try_from(p).is_ok_and(|p| p < t.partitions.len())
                        })
                    };
                    now(h, &groups.offset_delete(req, exists).await)
                }
                Err(code) => now(h, &refuse::offset_delete(code)),
            }
        }
        ApiKey::DeleteGroups => {
            let req = decode!(DeleteGroupsRequest, buf, h);
            match ctx.groups.groups() {
                Ok(groups) => now(h, &groups.delete_groups(req, version).await),
                Err(code) => now(h, &refuse::delete_groups(&req, code)),
            }
        }
        ApiKey::ConsumerGroupHeartbeat => {
            let req = decode!(ConsumerGroupHeartbeatRequest, buf, h);
            match ctx.groups.groups() {
                Ok(groups) => {
                    let client_id = header.client_id.as_ref().map_or("", |id| id.as_str());
                    let host = format!("/{}", peer.ip());
                    now(
                        h,
                        &groups.consumer_group_heartbeat(req, version, client_id, &host),
                    )
                }
                Err(code) => now(h, &refuse::consumer_group_heartbeat(code)),
            }
        }
        ApiKey::ConsumerGroupDescribe => {
            let req = decode!(ConsumerGroupDescribeRequest, buf, h);
            match ctx.groups.groups() {
                Ok(groups) => now(h, &groups.consumer_group_describe(req, version)),
                Err(code) => now(h, &refuse::consumer_group_describe(&req, code)),
            }
        }
        other => {
            // Only reachable if SUPPORTED_APIS lists an API routed nowhere.
            tracing::error!(%peer, api = ?other, "api advertised but not routed; closing connection");
            Outcome::Close
        }
    }
}

/// Decodes a request frame (header and body) exactly as [`handle`] does,
/// without acting on it: the fuzz target's entry point. Err says why the
/// server would close the connection.
pub(crate) fn decode_only(frame: Bytes) -> Result<(), String> {
    let (Some(key), Some(version)) = (peek_i16(&frame, 0), peek_i16(&frame, 2)) else {
        return Err("frame too short".into());
    };
    let api = ApiKey::try_from(key).map_err(|()| format!("unknown api key {key}"))?;
    let mut buf = frame;
    RequestHeader::decode(&mut buf, api.request_header_version(version))
        .map_err(|e| e.to_string())?;
    supported_range(key).ok_or_else(|| format!("{api:?} not served"))?;
    let codec = api.valid_versions();
    if version < codec.min || version > codec.max {
        return Err(format!("{api:?} v{version} unknown to the codec"));
    }
    fn body<T: Decodable>(buf: &mut Bytes, version: i16) -> Result<(), String> {
        T::decode(buf, version)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
    match api {
        ApiKey::ApiVersions => body::<ApiVersionsRequest>(&mut buf, version),
        ApiKey::Metadata => body::<MetadataRequest>(&mut buf, version),
        ApiKey::DescribeCluster => body::<DescribeClusterRequest>(&mut buf, version),
        ApiKey::FindCoordinator => body::<FindCoordinatorRequest>(&mut buf, version),
        ApiKey::InitProducerId => body::<InitProducerIdRequest>(&mut buf, version),
        ApiKey::AddPartitionsToTxn => body::<AddPartitionsToTxnRequest>(&mut buf, version),
        ApiKey::AddOffsetsToTxn => body::<AddOffsetsToTxnRequest>(&mut buf, version),
        ApiKey::TxnOffsetCommit => body::<TxnOffsetCommitRequest>(&mut buf, version),
        ApiKey::EndTxn => body::<EndTxnRequest>(&mut buf, version),
        ApiKey::WriteTxnMarkers => body::<WriteTxnMarkersRequest>(&mut buf, version),
        ApiKey::ListTransactions => body::<ListTransactionsRequest>(&mut buf, version),
        ApiKey::DescribeTransactions => body::<DescribeTransactionsRequest>(&mut buf, version),
        ApiKey::DescribeProducers => body::<DescribeProducersRequest>(&mut buf, version),
        ApiKey::DescribeLogDirs => body::<DescribeLogDirsRequest>(&mut buf, version),
        ApiKey::CreateTopics => body::<CreateTopicsRequest>(&mut buf, version),
        ApiKey::DeleteTopics => body::<DeleteTopicsRequest>(&mut buf, version),
        ApiKey::CreatePartitions => body::<CreatePartitionsRequest>(&mut buf, version),
        ApiKey::DescribeConfigs => body::<DescribeConfigsRequest>(&mut buf, version),
        ApiKey::ElectLeaders => body::<ElectLeadersRequest>(&mut buf, version),
        ApiKey::DescribeClientQuotas => body::<DescribeClientQuotasRequest>(&mut buf, version),
        ApiKey::AlterClientQuotas => body::<AlterClientQuotasRequest>(&mut buf, version),
        ApiKey::AlterPartitionReassignments => {
            body::<AlterPartitionReassignmentsRequest>(&mut buf, version)
        }
        ApiKey::ListPartitionReassignments => {
            body::<ListPartitionReassignmentsRequest>(&mut buf, version)
        }
        ApiKey::IncrementalAlterConfigs => {
            body::<IncrementalAlterConfigsRequest>(&mut buf, version)
        }
        ApiKey::AlterConfigs => body::<AlterConfigsRequest>(&mut buf, version),
        ApiKey::Produce => body::<ProduceRequest>(&mut buf, version),
        ApiKey::Fetch => body::<FetchRequest>(&mut buf, version),
        ApiKey::ListOffsets => body::<ListOffsetsRequest>(&mut buf, version),
        ApiKey::OffsetForLeaderEpoch => body::<OffsetForLeaderEpochRequest>(&mut buf, version),
        ApiKey::DeleteRecords => body::<DeleteRecordsRequest>(&mut buf, version),
        ApiKey::JoinGroup => body::<JoinGroupRequest>(&mut buf, version),
        ApiKey::SyncGroup => body::<SyncGroupRequest>(&mut buf, version),
        ApiKey::Heartbeat => body::<HeartbeatRequest>(&mut buf, version),
        ApiKey::LeaveGroup => body::<LeaveGroupRequest>(&mut buf, version),
        ApiKey::OffsetCommit => body::<OffsetCommitRequest>(&mut buf, version),
        ApiKey::OffsetFetch => body::<OffsetFetchRequest>(&mut buf, version),
        ApiKey::ListGroups => body::<ListGroupsRequest>(&mut buf, version),
        ApiKey::DescribeGroups => body::<DescribeGroupsRequest>(&mut buf, version),
        ApiKey::DeleteGroups => body::<DeleteGroupsRequest>(&mut buf, version),
        ApiKey::OffsetDelete => body::<OffsetDeleteRequest>(&mut buf, version),
        ApiKey::ConsumerGroupHeartbeat => body::<ConsumerGroupHeartbeatRequest>(&mut buf, version),
        ApiKey::ConsumerGroupDescribe => body::<ConsumerGroupDescribeRequest>(&mut buf, version),
        other => Err(format!("{other:?} not routed")),
    }
}

/// Encodes a whole response frame: size, header, body. None (logged) when
/// the codec refuses the response, which is a bug of ours.
pub(crate) fn encode_frame<R: Encodable + HeaderVersion>(
    h: Hdr,
    version: i16,
    resp: &R,
) -> Option<Bytes> {
    let header_version = R::header_version(version);
    let header = ResponseHeader::default().with_correlation_id(h.correlation_id);
    let encoded = (|| -> Result<Bytes, String> {
        let size = header
            .compute_size(header_version)
            .map_err(|e| e.to_string())?
            + resp.compute_size(version).map_err(|e| e.to_string())?;
        let size_prefix =
            i32::try_from(size).map_err(|_| format!("response of {size} bytes is too large"))?;
        let mut buf = BytesMut::with_capacity(4 + size);
        buf.put_i32(size_prefix);
        header
            .encode(&mut buf, header_version)
            .map_err(|e| e.to_string())?;
        resp.encode(&mut buf, version).map_err(|e| e.to_string())?;
        Ok(buf.freeze())
    })();
    match encoded {
        Ok(bytes) => Some(bytes),
        Err(err) => {
            tracing::error!(peer = %h.peer, api = ?h.api, version, error = %err, "cannot encode response; closing connection");
            None
        }
    }
}

/// A response ready now.
pub(crate) fn now<R: Encodable + HeaderVersion + ErrorCounts>(h: Hdr, resp: &R) -> Outcome {
    now_at(h, h.version, resp)
}

/// A response ready now, encoded at `version` (UNSUPPORTED_VERSION answers).
pub(crate) fn now_at<R: Encodable + HeaderVersion + ErrorCounts>(
    h: Hdr,
    version: i16,
    resp: &R,
) -> Outcome {
    // Every response passes here or through `later`: its error codes are
    // counted once, off the typed response, before it becomes bytes.
    let _ = crate::connection::UNSENT
        .try_with(|unsent| unsent.metrics.responded(h.api as i16, version, resp));
    match encode_frame(h, version, resp) {
        Some(bytes) => Outcome::Respond(Slot::Ready(bytes)),
        None => Outcome::Close,
    }
}

/// A response that needs waiting; it runs concurrently with later requests
/// of the connection and is written in its turn.
pub(crate) fn later<R, F>(h: Hdr, fut: F) -> Outcome
where
    R: Encodable + HeaderVersion + ErrorCounts + Send + 'static,
    F: Future<Output = R> + Send + 'static,
{
    // Outside a connection (tests of a handler) nothing is counted.
    let unsent = crate::connection::UNSENT.try_with(Arc::clone).ok();
    let task = tokio::spawn(async move {
        let resp = fut.await;
        if let Some(unsent) = &unsent {
            unsent.metrics.responded(h.api as i16, h.version, &resp);
        }
        let frame = encode_frame(h, h.version, &resp);
        if let (Some(unsent), Some(frame)) = (&unsent, &frame) {
            unsent.add(frame.len());
        }
        frame
    });
    Outcome::Respond(Slot::Pending(task))
}

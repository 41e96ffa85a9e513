//! Fetch: returns the stored batches as `Bytes` slices, never decoding
//! records; consumers long-poll on the partitions' high-watermark watches
//! (through their incremental fetch session, `fetch_sessions.rs`, when they
//! have one), followers are answered by the topology's leader side of
//! replication.

use sluice_vocab::KafkaError;
use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::messages::fetch_response::{
    FetchableTopicResponse, LeaderIdAndEpoch, NodeEndpoint, PartitionData,
};
use kafka_protocol::messages::*;
use sluice_log::{Partition, ReadLimit};
use sluice_topology::FetchArgs;
use sluice_vocab::ErrorCode;
use tokio::sync::watch;
use tokio::time::Instant;

use super::topic_name_by_id;
use crate::connection::Client;
use crate::dispatch::{later, now, Hdr, Outcome};
use crate::fetch_sessions::Plan;
use crate::quotas::Flow;
use crate::server::Ctx;

pub(crate) const READ_COMMITTED: i8 = 1;

/// One pass over every requested partition.
struct Collected {
    response: FetchResponse,
    bytes: usize,
    /// Some partition failed: answer at once, as Kafka does.
    error: bool,
    /// What the long poll waits on, with the value the read saw.
    watched: Vec<Watched>,
    /// What each partition returned, counted once this read is the answer
    /// (a long poll may read again and drop it). Empty with the hot-path
    /// figures off.
    returned: Vec<(Arc<Partition>, Bytes)>,
}

impl Collected {
    /// This read is the answer: what it returned goes into its partitions'
    /// figures.
    fn answer(self) -> FetchResponse {
        for (partition, records) in &self.returned {
            partition.count_fetched(records);
        }
        self.response
    }
}

/// One value a long poll waits on.
struct Watched {
    rx: watch::Receiver<i64>,
    /// The value the read saw: a different one means new data.
    seen: i64,
}

/// The replica id of a follower's fetch (v<15 `replica_id`, v15+ `replica_state`);
/// consumers send -1.
fn replica_id(req: &FetchRequest, version: i16) -> i32 {
    if version >= 15 {
        req.replica_state.replica_id.0
    } else {
        req.replica_id.0
    }
}

/// One topic of a fetch request: as sent, its name (None: an unknown topic
/// id), and the partitions to answer.
type Listing<'r> = (
    &'r fetch_request::FetchTopic,
    Option<Cow<'r, str>>,
    Vec<&'r fetch_request::FetchPartition>,
);

/// Kafka answers each partition of a fetch once: a partition listed again
/// (a buggy or hostile client) is dropped from the request, so it is neither
/// read twice nor answered twice. The first listing wins. Listings are told
/// apart by what the request names them with (topic ids from v13, names
/// before; one request never mixes the two), so nothing is copied.
fn first_listings<'r>(ctx: &Ctx, req: &'r FetchRequest, by_id: bool) -> Vec<Listing<'r>> {
    let listed: usize = req.topics.iter().map(|t| t.partitions.len()).sum();
    let mut seen: HashSet<(&'r [u8], i32)> = HashSet::new();
    req.topics
        .iter()
        .map(|topic| {
            let (name, key) = if by_id {
                (
                    topic_name_by_id(ctx, topic.topic_id).map(Cow::Owned),
                    &topic.topic_id.as_bytes()[..],
                )
            } else {
                (
                    Some(Cow::Borrowed(topic.topic.0.as_str())),
                    topic.topic.0.as_bytes(),
                )
            };
            let partitions = topic
                .partitions
                .iter()
                // One listing cannot repeat itself: no set needed.
                .filter(|fp| listed <= 1 || seen.insert((key, fp.partition)))
                .collect();
            (topic, name, partitions)
        })
        .collect()
}

fn read_all(ctx: &Ctx, req: &FetchRequest, version: i16) -> Collected {
    let by_id = version >= 13;
    // The broker's cap (fetch.max.bytes) bounds what one response holds,
    // whatever the client asks for, and so does what is left of the
    // broker-wide response budget.
    let response_max = usize::try_from(req.max_bytes)
        .unwrap_or(0)
        .min(ctx.config.fetch_max_bytes)
        .min(ctx.budget.response_room());
    let mut bytes = 0usize;
    let mut error = false;
    let mut watched = Vec::new();
    let mut returned = Vec::new();
    // KIP-951: partitions another node leads name it (image read once).
    let mut image = None;
    let mut endpoints: Vec<NodeEndpoint> = Vec::new();
    let count = sluice_log::hot_path_metrics();
    let listings = first_listings(ctx, req, by_id);
    let mut topics = Vec::with_capacity(listings.len());
    for (topic, resolved, requested) in listings {
        let mut partitions = Vec::with_capacity(requested.len());
        for fp in requested {
            let mut pd = PartitionData::default()
                .with_partition_index(fp.partition)
                .with_high_watermark(-1)
                .with_last_stable_offset(-1)
                .with_log_start_offset(-1)
                .with_aborted_transactions((req.isolation_level == READ_COMMITTED).then(Vec::new))
                .with_records(Some(Bytes::new()));
            let source = match resolved.as_deref() {
                None => Err(ErrorCode::UnknownTopicId),
                Some(name) => {
                    ctx.topology
                        .lead_for_read(name, fp.partition, fp.current_leader_epoch)
                }
            };
            let code = match source {
                Err(code) => code.code(),
                Ok(lead) => {
                    let log = lead.partition();
                    let partition_max = usize::try_from(fp.partition_max_bytes).unwrap_or(0);
                    let max = partition_max.min(response_max.saturating_sub(bytes));
                    // KIP-74: the first partition with data returns at least one
                    // whole batch, so a batch above the limits cannot stall a consumer.
                    // read_committed: up to the last stable offset, with
                    // every aborted transaction whose records reach into
                    // what is returned (the consumer drops them).
                    let read = if req.isolation_level == READ_COMMITTED {
                        log.read_committed(fp.fetch_offset, max, bytes == 0)
                            .map(|(read, aborted)| (read, Some(aborted)))
                    } else {
                        log.read(fp.fetch_offset, max, bytes == 0, ReadLimit::HighWatermark)
                            .map(|read| (read, None))
                    };
                    let code = match read {
                        Ok((read, aborted)) => {
                            if let Some(list) = aborted {
                                pd.aborted_transactions = Some(
                                    list.into_iter()
                                        .map(|t| {
                                            fetch_response::AbortedTransaction::default()
                                                .with_producer_id(t.producer_id.into())
                                                .with_first_offset(t.first_offset)
                                        })
                                        .collect(),
                                );
                            }
                            bytes += read.records.len();
                            if count && !read.records.is_empty() {
                                returned.push((log.clone(), read.records.clone()));
                            }
                            pd.high_watermark = read.high_watermark;
                            pd.last_stable_offset = log.last_stable_offset();
                            pd.log_start_offset = read.log_start_offset;
                            pd.records = Some(read.records);
                            0
                        }
                        Err(err) => err.error_code().code(),
                    };
                    if code != 0 {
                        pd.high_watermark = log.high_watermark();
                        pd.last_stable_offset = log.last_stable_offset();
                        pd.log_start_offset = log.log_start_offset();
                    }
                    watched.push(Watched {
                        rx: log.watch_high_watermark(),
                        seen: pd.high_watermark,
                    });
                    code
                }
            };
            if code != 0 {
                error = true;
                pd.error_code = code;
            }
            if version >= 12 && super::leads_elsewhere(code) {
                let image = image.get_or_insert_with(|| ctx.topology.image());
                let hint = resolved
                    .as_deref()
                    .and_then(|name| super::leader_hint(ctx, image, name, fp.partition));
                if let Some(hint) = hint {
                    pd.current_leader = LeaderIdAndEpoch::default()
                        .with_leader_id(BrokerId(hint.id))
                        .with_leader_epoch(hint.epoch);
                    if version >= 16 && !endpoints.iter().any(|e| e.node_id.0 == hint.id) {
                        endpoints.push(
                            NodeEndpoint::default()
                                .with_node_id(BrokerId(hint.id))
                                .with_host(super::str_bytes(&hint.host))
                                .with_port(hint.port),
                        );
                    }
                }
            }
            partitions.push(pd);
        }
        let mut resp = FetchableTopicResponse::default().with_partitions(partitions);
        if by_id {
            resp.topic_id = topic.topic_id;
        } else {
            resp.topic = topic.topic.clone();
        }
        topics.push(resp);
    }
    Collected {
        response: FetchResponse::default()
            .with_responses(topics)
            .with_node_endpoints(endpoints),
        bytes,
        error,
        watched,
        returned,
    }
}

pub(crate) fn handle(ctx: &Arc<Ctx>, req: FetchRequest, h: Hdr) -> Outcome {
    let version = h.version;
    let replica = replica_id(&req, version);
    if replica >= 0 {
        // Followers fetch sessionless: an id we never gave out is unknown.
        if version >= 7 && req.session_id != 0 {
            return now(
                h,
                &FetchResponse::default().with_error_code(ErrorCode::FetchSessionIdNotFound.code()),
            );
        }
        let ctx = ctx.clone();
        return later(h, follower_fetch(ctx, req, version, replica));
    }
    if version < 7 {
        return consumer_fetch(ctx, req, h, None);
    }
    match ctx.fetch_sessions.plan(&req, version, Instant::now()) {
        Plan::Sessionless => consumer_fetch(ctx, req, h, None),
        Plan::Refused(code) => now(h, &FetchResponse::default().with_error_code(code.code())),
        Plan::Session {
            id,
            incremental,
            request,
        } => {
            let req = request.map_or(req, |full| *full);
            consumer_fetch(ctx, req, h, Some((id, incremental)))
        }
    }
}

/// The answer to a consumer's fetch, through its session (id, incremental) if
/// it has one. A client over its quota gets no records (they are not
/// counted) and the time to wait; a session it was creating is dropped, an
/// incremental one learns nothing.
fn respond(
    ctx: &Ctx,
    client: Option<&Client>,
    session: Option<(i32, bool)>,
    mut resp: FetchResponse,
) -> FetchResponse {
    let bytes: usize = resp
        .responses
        .iter()
        .flat_map(|t| &t.partitions)
        .map(|p| p.records.as_ref().map_or(0, |r| r.len()))
        .sum();
    let throttle_ms = crate::quotas::throttle(ctx, client, Flow::Fetch, bytes, true);
    if throttle_ms > 0 {
        let session_id = match session {
            Some((id, true)) => id,
            Some((id, false)) => {
                ctx.fetch_sessions.forget(id);
                0
            }
            None => 0,
        };
        return FetchResponse::default()
            .with_throttle_time_ms(throttle_ms)
            .with_session_id(session_id);
    }
    if let Some((id, incremental)) = session {
        ctx.fetch_sessions.finish(id, incremental, &mut resp);
    }
    resp
}

fn consumer_fetch(
    ctx: &Arc<Ctx>,
    mut req: FetchRequest,
    h: Hdr,
    session: Option<(i32, bool)>,
) -> Outcome {
    let version = h.version;
    let client = crate::connection::CLIENT.try_with(Arc::clone).ok();
    if let Some(cap) = crate::quotas::fetch_cap(ctx, client.as_deref()) {
        let cap = i32::try_from(cap).unwrap_or(i32::MAX);
        req.max_bytes = req.max_bytes.min(cap);
        req.min_bytes = req.min_bytes.min(req.max_bytes);
    }
    let min_bytes = usize::try_from(req.min_bytes).unwrap_or(0);
    let max_wait = Duration::from_millis(u64::try_from(req.max_wait_ms).unwrap_or(0));
    let mut first = read_all(ctx, &req, version);
    if first.bytes >= min_bytes || first.error || max_wait.is_zero() || first.watched.is_empty() {
        return now(h, &respond(ctx, client.as_deref(), session, first.answer()));
    }
    let deadline = Instant::now() + max_wait;
    // Subscribed after the read: a receiver whose value differs from what
    // the read saw means data arrived in between, so read again at once.
    let mut stale = false;
    let mut receivers: Vec<watch::Receiver<i64>> = Vec::with_capacity(first.watched.len());
    for Watched { mut rx, seen } in std::mem::take(&mut first.watched) {
        if *rx.borrow_and_update() != seen {
            stale = true;
        }
        receivers.push(rx);
    }
    let ctx = ctx.clone();
    later(h, async move {
        let resp = long_poll(
            &ctx, &req, version, first, receivers, deadline, min_bytes, stale,
        )
        .await;
        respond(&ctx, client.as_deref(), session, resp)
    })
}

#[allow(clippy::too_many_arguments)]
async fn long_poll(
    ctx: &Ctx,
    req: &FetchRequest,
    version: i16,
    mut last: Collected,
    mut receivers: Vec<watch::Receiver<i64>>,
    deadline: Instant,
    min_bytes: usize,
    mut stale: bool,
) -> FetchResponse {
    loop {
        if !stale {
            let changed =
                futures::future::select_all(receivers.iter_mut().map(|rx| Box::pin(rx.changed())));
            match tokio::time::timeout_at(deadline, changed).await {
                // Nothing new within max_wait: the last read stands.
                Err(_) => return last.answer(),
                // The partition went away (topic deleted): report what is there now.
                Ok((Err(_), _, _)) => return read_all(ctx, req, version).answer(),
                Ok((Ok(()), _, _)) => {}
            }
        }
        stale = false;
        let again = read_all(ctx, req, version);
        if again.bytes >= min_bytes || again.error || Instant::now() >= deadline {
            return again.answer();
        }
        last = again;
    }
}

/// A follower's fetch: every partition goes to the topology's leader side of
/// replication (the one implementation every transport reaches), concurrently, so
/// the request waits at most `max_wait` for the slowest of them.
async fn follower_fetch(
    ctx: Arc<Ctx>,
    req: FetchRequest,
    version: i16,
    replica: i32,
) -> FetchResponse {
    let by_id = version >= 13;
    let max_wait = Duration::from_millis(u64::try_from(req.max_wait_ms).unwrap_or(0));
    let topology = ctx.topology.as_ref();
    let listings = first_listings(&ctx, &req, by_id);
    // The partitions, read concurrently, share one response's cap (and what
    // is left of the response budget); each still returns at least one batch,
    // so replication never stalls.
    let listed: usize = listings
        .iter()
        .map(|(_, _, requested)| requested.len())
        .sum();
    let partition_cap = ctx.config.fetch_max_bytes.min(ctx.budget.response_room()) / listed.max(1);
    let topics = futures::future::join_all(listings.into_iter().map(
        |(topic, name, requested)| async move {
            let partitions = futures::future::join_all(requested.into_iter().map(|fp| {
                let name = name.clone();
                async move {
                    let pd = PartitionData::default()
                        .with_partition_index(fp.partition)
                        .with_records(Some(Bytes::new()));
                    let Some(name) = name else {
                        return pd
                            .with_error_code(ErrorCode::UnknownTopicId.code())
                            .with_high_watermark(-1)
                            .with_last_stable_offset(-1)
                            .with_log_start_offset(-1);
                    };
                    let args = FetchArgs {
                        topic: name.into_owned(),
                        partition: fp.partition,
                        fetch_offset: fp.fetch_offset,
                        current_leader_epoch: fp.current_leader_epoch,
                        last_fetched_epoch: fp.last_fetched_epoch,
                        log_start_offset: fp.log_start_offset,
                        max_bytes: usize::try_from(fp.partition_max_bytes)
                            .unwrap_or(0)
                            .min(partition_cap),
                        max_wait,
                    };
                    let answer = topology.follower_fetch(replica, &args).await;
                    pd.with_error_code(ErrorCode::of(answer.error.map_or(Ok(()), Err)))
                        .with_high_watermark(answer.high_watermark)
                        .with_last_stable_offset(answer.high_watermark)
                        .with_log_start_offset(answer.log_start_offset)
                        .with_records(Some(answer.records))
                }
            }))
            .await;
            let mut resp = FetchableTopicResponse::default().with_partitions(partitions);
            if by_id {
                resp.topic_id = topic.topic_id;
            } else {
                resp.topic = topic.topic.clone();
            }
            resp
        },
    ))
    .await;
    FetchResponse::default().with_responses(topics)
}

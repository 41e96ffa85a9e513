//! Incremental fetch sessions (KIP-227): a consumer with many partitions
//! sends its whole list once; later requests name only the partitions whose
//! fetch position changed (and those it forgets), and the answer carries only
//! the partitions with something new: records, an error, or a moved high
//! watermark, last stable offset or log start.
//!
//! The cache holds at most `slots` sessions (Kafka's
//! `max.incremental.fetch.session.cache.slots`). When it is full, a new session
//! takes the slot of the least recently used one only if that one has been
//! idle for [`EVICTABLE_AFTER`] (Kafka's `min.incremental.fetch.session.eviction.ms`);
//! otherwise the client is answered without a session (id 0) and goes on with
//! full requests, which always work. Only consumers get sessions: followers
//! fetch sessionless.
//!
//! A session is read the way a full request is: [`FetchSessions::plan`] turns
//! the request into the full list of the session's partitions, the fetch path
//! reads it, and [`FetchSessions::finish`] records what the answer told the
//! client and drops what it already knew.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::time::Duration;

use indexmap::IndexMap;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::{FetchRequest, FetchResponse};
use kafka_protocol::protocol::StrBytes;
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use sluice_vocab::ErrorCode;
use tokio::time::Instant;
use uuid::Uuid;

/// Partitions all sessions may hold together (about 15 MB of cache).
pub(crate) const MAX_CACHED_PARTITIONS: usize = 100_000;

/// A session idle this long may give its slot to a new one.
pub(crate) const EVICTABLE_AFTER: Duration = Duration::from_secs(120);

/// Request epochs with a meaning of their own.
const INITIAL_EPOCH: i32 = 0;
const FINAL_EPOCH: i32 = -1;

/// How a session names a topic: by name before Fetch v13, by id from v13.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum TopicKey {
    Name(StrBytes),
    Id(Uuid),
}

/// One partition of a session: what the client last asked for it, and what
/// the last answer told the client (`None` until one did).
#[derive(Clone, Debug)]
struct Cached {
    request: FetchPartition,
    told: Option<Told>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Told {
    high_watermark: i64,
    last_stable_offset: i64,
    log_start_offset: i64,
}

struct Session {
    /// The epoch the next incremental request must carry.
    next_epoch: i32,
    by_id: bool,
    partitions: IndexMap<(TopicKey, i32), Cached>,
    last_used: Instant,
}

/// What the fetch path does with a consumer's request.
pub(crate) enum Plan {
    /// No session: read the request as sent, answer with session id 0.
    Sessionless,
    /// Answer with this top-level error and nothing else.
    Refused(ErrorCode),
    /// Read `request` (every partition of session `id`), then pass the answer
    /// through [`FetchSessions::finish`]. `None`: the client's own request is
    /// the full list (a session being created).
    Session {
        id: i32,
        incremental: bool,
        request: Option<Box<FetchRequest>>,
    },
}

/// Figures of the cache for `/metrics`.
#[derive(Clone, Default)]
pub(crate) struct SessionFigures {
    pub sessions: Gauge,
    pub partitions: Gauge,
    pub evictions: Counter,
}

pub(crate) struct FetchSessions {
    slots: usize,
    /// Partitions all sessions hold together; a session that would take more
    /// is not made (or is closed), and its client fetches in full.
    max_partitions: usize,
    cache: Mutex<HashMap<i32, Session>>,
    /// Session ids are unpredictable, so one a client kept from before a
    /// restart is unlikely to name another client's session.
    ids: RandomState,
    figures: SessionFigures,
}

fn epoch_after(epoch: i32) -> i32 {
    // After the largest epoch comes 1: 0 and -1 mean something else.
    if epoch == i32::MAX {
        1
    } else {
        epoch + 1
    }
}

/// How a session of this naming (`by_id`) names a topic listed with `id` and `name`.
fn topic_key(by_id: bool, id: Uuid, name: &StrBytes) -> TopicKey {
    if by_id {
        TopicKey::Id(id)
    } else {
        TopicKey::Name(name.clone())
    }
}

fn key_of(topic: &FetchTopic, by_id: bool) -> TopicKey {
    topic_key(by_id, topic.topic_id, &topic.topic.0)
}

/// A key to keep: a name copied out of the request, whose bytes would
/// otherwise keep the whole request frame alive for the session's life.
fn owned(key: &TopicKey) -> TopicKey {
    match key {
        TopicKey::Name(name) => TopicKey::Name(StrBytes::from_string(name.as_str().to_owned())),
        TopicKey::Id(id) => TopicKey::Id(*id),
    }
}

/// A partition's request to keep (tagged fields we do not read would pin
/// the request frame too).
fn kept(p: &FetchPartition) -> Cached {
    let mut request = p.clone();
    request.unknown_tagged_fields.clear();
    Cached {
        request,
        told: None,
    }
}

impl FetchSessions {
    pub(crate) fn new(
        slots: usize,
        max_partitions: usize,
        figures: SessionFigures,
    ) -> FetchSessions {
        FetchSessions {
            slots,
            max_partitions,
            cache: Mutex::new(HashMap::new()),
            ids: RandomState::new(),
            figures,
        }
    }

    /// Partitions held by every session (at most `slots` to add up).
    fn held(cache: &HashMap<i32, Session>) -> usize {
        cache.values().map(|s| s.partitions.len()).sum()
    }

    fn update_figures(&self, cache: &HashMap<i32, Session>) {
        let partitions = Self::held(cache);
        self.figures
            .sessions
            .set(i64::try_from(cache.len()).unwrap_or(i64::MAX));
        self.figures
            .partitions
            .set(i64::try_from(partitions).unwrap_or(i64::MAX));
    }

    /// A free id, or `None` when the cache is full and no session is idle
    /// long enough to give up its slot.
    fn slot(&self, cache: &mut HashMap<i32, Session>, now: Instant) -> Option<i32> {
        if self.slots == 0 {
            return None;
        }
        if cache.len() >= self.slots {
            let (&oldest, session) = cache.iter().min_by_key(|(_, s)| s.last_used)?;
            if now.saturating_duration_since(session.last_used) < EVICTABLE_AFTER {
                return None;
            }
            cache.remove(&oldest);
            self.figures.evictions.inc();
        }
        let mut n = cache.len() as u64;
        loop {
            let id = (self.ids.hash_one(n) & 0x7fff_ffff) as i32;
            if id != 0 && !cache.contains_key(&id) {
                return Some(id);
            }
            n += 1;
        }
    }

    /// Decides how `req` (a consumer's Fetch at `version`, v7 or later) is read.
    pub(crate) fn plan(&self, req: &FetchRequest, version: i16, now: Instant) -> Plan {
        let by_id = version >= 13;
        let mut cache = self.cache.lock();
        let plan = match req.session_epoch {
            FINAL_EPOCH => {
                cache.remove(&req.session_id);
                Plan::Sessionless
            }
            INITIAL_EPOCH => {
                cache.remove(&req.session_id);
                // Whether the partitions fit (counting a repeated one twice)
                // is known before a slot is taken or anything is built: a
                // request that gets no session costs no copies and evicts no
                // one's session.
                let listed: usize = req.topics.iter().map(|t| t.partitions.len()).sum();
                let room = Self::held(&cache) + listed <= self.max_partitions;
                match room.then(|| self.slot(&mut cache, now)).flatten() {
                    None => Plan::Sessionless,
                    Some(id) => {
                        let mut partitions = IndexMap::with_capacity(listed);
                        for topic in &req.topics {
                            let key = key_of(topic, by_id);
                            for p in &topic.partitions {
                                // A partition listed twice: the first listing
                                // wins, as the read does.
                                if !partitions.contains_key(&(key.clone(), p.partition)) {
                                    partitions.insert((owned(&key), p.partition), kept(p));
                                }
                            }
                        }
                        cache.insert(
                            id,
                            Session {
                                next_epoch: 1,
                                by_id,
                                partitions,
                                last_used: now,
                            },
                        );
                        Plan::Session {
                            id,
                            incremental: false,
                            request: None,
                        }
                    }
                }
            }
            epoch => match cache.get_mut(&req.session_id) {
                None => Plan::Refused(ErrorCode::FetchSessionIdNotFound),
                Some(session) if session.by_id != by_id => {
                    Plan::Refused(ErrorCode::FetchSessionTopicIdError)
                }
                Some(session) if session.next_epoch != epoch => {
                    Plan::Refused(ErrorCode::InvalidFetchSessionEpoch)
                }
                Some(session) => {
                    session.next_epoch = epoch_after(epoch);
                    session.last_used = now;
                    // Adds and updates first, then forgets, as Kafka does.
                    for topic in &req.topics {
                        let key = key_of(topic, by_id);
                        for p in &topic.partitions {
                            match session.partitions.get_mut(&(key.clone(), p.partition)) {
                                // What the client was told stays: only news is sent.
                                Some(cached) => cached.request = kept(p).request,
                                None => {
                                    session
                                        .partitions
                                        .insert((owned(&key), p.partition), kept(p));
                                }
                            }
                        }
                    }
                    for topic in &req.forgotten_topics_data {
                        let key = topic_key(by_id, topic.topic_id, &topic.topic.0);
                        for &p in &topic.partitions {
                            session.partitions.shift_remove(&(key.clone(), p));
                        }
                    }
                    let request = Box::new(full_request(req, session));
                    if Self::held(&cache) > self.max_partitions {
                        // Grown past what sessions may hold: closed; the
                        // client starts over with a full request.
                        cache.remove(&req.session_id);
                        Plan::Refused(ErrorCode::FetchSessionIdNotFound)
                    } else {
                        Plan::Session {
                            id: req.session_id,
                            incremental: true,
                            request: Some(request),
                        }
                    }
                }
            },
        };
        self.update_figures(&cache);
        plan
    }

    /// Drops session `id` (its first answer never went out).
    pub(crate) fn forget(&self, id: i32) {
        let mut cache = self.cache.lock();
        cache.remove(&id);
        self.update_figures(&cache);
    }

    /// Records what `resp` (the answer to session `id`'s request) tells the
    /// client, and, for an incremental request, leaves out every partition
    /// with nothing new. Partitions that returned records go to the end of
    /// the session, so the others come first in the next response's budget.
    pub(crate) fn finish(&self, id: i32, incremental: bool, resp: &mut FetchResponse) {
        resp.session_id = id;
        let mut cache = self.cache.lock();
        let Some(session) = cache.get_mut(&id) else {
            // Evicted or closed meanwhile: the client learns it next time.
            return;
        };
        let by_id = session.by_id;
        let mut to_end = Vec::new();
        for topic in &mut resp.responses {
            let key = topic_key(by_id, topic.topic_id, &topic.topic.0);
            topic.partitions.retain(|pd| {
                let Some(cached) = session
                    .partitions
                    .get_mut(&(key.clone(), pd.partition_index))
                else {
                    return true;
                };
                let told = Told {
                    high_watermark: pd.high_watermark,
                    last_stable_offset: pd.last_stable_offset,
                    log_start_offset: pd.log_start_offset,
                };
                let has_records = pd.records.as_ref().is_some_and(|r| !r.is_empty());
                let news = has_records || pd.error_code != 0 || cached.told != Some(told);
                cached.told = Some(told);
                if has_records {
                    to_end.push((key.clone(), pd.partition_index));
                }
                !incremental || news
            });
        }
        for key in to_end {
            if let Some(index) = session.partitions.get_index_of(&key) {
                let last = session.partitions.len() - 1;
                session.partitions.move_index(index, last);
            }
        }
        if incremental {
            resp.responses.retain(|t| !t.partitions.is_empty());
        }
    }
}

/// The session's partitions as one full request, in session order, with the
/// client's request-wide settings.
fn full_request(req: &FetchRequest, session: &Session) -> FetchRequest {
    let mut topics: Vec<FetchTopic> = Vec::new();
    for ((key, _), cached) in &session.partitions {
        let same_topic = topics
            .last()
            .is_some_and(|t| key_of(t, session.by_id) == *key);
        if !same_topic {
            let mut topic = FetchTopic::default();
            match key {
                TopicKey::Name(name) => topic.topic.0 = name.clone(),
                TopicKey::Id(id) => topic.topic_id = *id,
            }
            topics.push(topic);
        }
        if let Some(topic) = topics.last_mut() {
            topic.partitions.push(cached.request.clone());
        }
    }
    // Every request-wide setting; the topic lists are the session's.
    FetchRequest::default()
        .with_cluster_id(req.cluster_id.clone())
        .with_replica_id(req.replica_id)
        .with_replica_state(req.replica_state.clone())
        .with_max_wait_ms(req.max_wait_ms)
        .with_min_bytes(req.min_bytes)
        .with_max_bytes(req.max_bytes)
        .with_isolation_level(req.isolation_level)
        .with_session_id(req.session_id)
        .with_session_epoch(req.session_epoch)
        .with_rack_id(req.rack_id.clone())
        .with_topics(topics)
}

#[cfg(test)]
mod tests;

//! The session cache against a model of what a client knows: merging the
//! incremental answers gives the client the same view a full fetch would.

use std::collections::BTreeMap;

use bytes::Bytes;
use kafka_protocol::messages::fetch_request::ForgottenTopic;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::TopicName;
use proptest::prelude::*;

use super::*;

fn name(s: &str) -> TopicName {
    TopicName(StrBytes::from_string(s.to_owned()))
}

fn partition(p: i32, offset: i64) -> FetchPartition {
    FetchPartition::default()
        .with_partition(p)
        .with_fetch_offset(offset)
        .with_partition_max_bytes(1 << 20)
}

fn request(session_id: i32, epoch: i32, topics: &[(&str, Vec<(i32, i64)>)]) -> FetchRequest {
    FetchRequest::default()
        .with_max_wait_ms(500)
        .with_session_id(session_id)
        .with_session_epoch(epoch)
        .with_topics(
            topics
                .iter()
                .map(|(t, ps)| {
                    FetchTopic::default()
                        .with_topic(name(t))
                        .with_partitions(ps.iter().map(|&(p, o)| partition(p, o)).collect())
                })
                .collect(),
        )
}

fn forget(mut req: FetchRequest, topic: &str, partitions: Vec<i32>) -> FetchRequest {
    req.forgotten_topics_data.push(
        ForgottenTopic::default()
            .with_topic(name(topic))
            .with_partitions(partitions),
    );
    req
}

/// The broker's side: each partition's high watermark. A read returns the
/// records from the fetch offset up to it (one byte per record).
type Logs = BTreeMap<(String, i32), i64>;

fn read(req: &FetchRequest, logs: &Logs) -> FetchResponse {
    let responses = req
        .topics
        .iter()
        .map(|t| {
            let topic = t.topic.0.to_string();
            let partitions = t
                .partitions
                .iter()
                .map(|p| {
                    let hw = logs.get(&(topic.clone(), p.partition)).copied();
                    let pd = PartitionData::default().with_partition_index(p.partition);
                    match hw {
                        None => pd.with_error_code(ErrorCode::UnknownTopicOrPartition.code()),
                        Some(hw) => {
                            let n = usize::try_from((hw - p.fetch_offset).max(0)).unwrap();
                            pd.with_high_watermark(hw)
                                .with_last_stable_offset(hw)
                                .with_records(Some(Bytes::from(vec![0u8; n])))
                        }
                    }
                })
                .collect();
            FetchableTopicResponse::default()
                .with_topic(t.topic.clone())
                .with_partitions(partitions)
        })
        .collect();
    FetchResponse::default().with_responses(responses)
}

fn answered(resp: &FetchResponse) -> Vec<(String, i32)> {
    resp.responses
        .iter()
        .flat_map(|t| {
            t.partitions
                .iter()
                .map(move |p| (t.topic.0.to_string(), p.partition_index))
        })
        .collect()
}

fn sessions(slots: usize) -> FetchSessions {
    FetchSessions::new(slots, 1000, SessionFigures::default())
}

/// Plans and answers `req` against `logs` as the fetch path does.
fn fetch(cache: &FetchSessions, req: FetchRequest, logs: &Logs, now: Instant) -> FetchResponse {
    match cache.plan(&req, 12, now) {
        Plan::Sessionless => read(&req, logs),
        Plan::Refused(code) => FetchResponse::default().with_error_code(code.code()),
        Plan::Session {
            id,
            incremental,
            request,
        } => {
            let full = request.map_or(req, |r| *r);
            let mut resp = read(&full, logs);
            cache.finish(id, incremental, &mut resp);
            resp
        }
    }
}

#[test]
fn an_incremental_fetch_names_only_partitions_with_news() {
    let cache = sessions(10);
    let now = Instant::now();
    let mut logs: Logs = [
        (("a".into(), 0), 5),
        (("a".into(), 1), 0),
        (("b".into(), 0), 0),
    ]
    .into();
    let full = fetch(
        &cache,
        request(0, 0, &[("a", vec![(0, 0), (1, 0)]), ("b", vec![(0, 0)])]),
        &logs,
        now,
    );
    let id = full.session_id;
    assert_ne!(id, 0);
    assert_eq!(
        answered(&full),
        [("a".into(), 0), ("a".into(), 1), ("b".into(), 0)]
    );
    // The client moved a-0 to 5; nothing else changed: nothing to say.
    let resp = fetch(&cache, request(id, 1, &[("a", vec![(0, 5)])]), &logs, now);
    assert_eq!((resp.error_code, resp.session_id), (0, id));
    assert!(answered(&resp).is_empty());
    // New records on b-0 only.
    logs.insert(("b".into(), 0), 3);
    let resp = fetch(&cache, request(id, 2, &[]), &logs, now);
    assert_eq!(answered(&resp), [("b".into(), 0)]);
    // b-0 still has records from offset 0 (the client did not move): said again.
    let resp = fetch(&cache, request(id, 3, &[]), &logs, now);
    assert_eq!(answered(&resp), [("b".into(), 0)]);
    // Forgetting b-0 and adding c-0 (unknown: an error each time).
    let resp = fetch(
        &cache,
        forget(request(id, 4, &[("c", vec![(0, 0)])]), "b", vec![0]),
        &logs,
        now,
    );
    assert_eq!(answered(&resp), [("c".into(), 0)]);
    let resp = fetch(&cache, request(id, 5, &[]), &logs, now);
    assert_eq!(answered(&resp), [("c".into(), 0)]);
    assert_eq!(cache.figures.partitions.get(), 3);
}

#[test]
fn wrong_epochs_ids_and_naming_are_refused_and_final_closes() {
    let cache = sessions(10);
    let now = Instant::now();
    let logs: Logs = [(("a".into(), 0), 0)].into();
    let id = fetch(&cache, request(0, 0, &[("a", vec![(0, 0)])]), &logs, now).session_id;
    let code = |resp: FetchResponse| ErrorCode::check(resp.error_code).err();
    assert_eq!(
        code(fetch(&cache, request(id, 2, &[]), &logs, now)),
        Some(ErrorCode::InvalidFetchSessionEpoch)
    );
    assert_eq!(
        code(fetch(&cache, request(id ^ 1, 1, &[]), &logs, now)),
        Some(ErrorCode::FetchSessionIdNotFound)
    );
    // Asked by topic id (v13) of a session that names topics.
    assert!(matches!(
        cache.plan(&request(id, 1, &[]), 13, now),
        Plan::Refused(ErrorCode::FetchSessionTopicIdError)
    ));
    // Epoch 1 is still expected: none of the refusals moved it.
    assert_eq!(code(fetch(&cache, request(id, 1, &[]), &logs, now)), None);
    // The final epoch closes the session and answers sessionless.
    let resp = fetch(&cache, request(id, -1, &[("a", vec![(0, 0)])]), &logs, now);
    assert_eq!((resp.session_id, answered(&resp).len()), (0, 1));
    assert_eq!(
        code(fetch(&cache, request(id, 2, &[]), &logs, now)),
        Some(ErrorCode::FetchSessionIdNotFound)
    );
    assert_eq!(cache.figures.sessions.get(), 0);
    assert_eq!(epoch_after(i32::MAX), 1);
}

#[test]
fn a_full_cache_gives_a_slot_only_to_replace_an_idle_session() {
    let cache = sessions(2);
    let start = Instant::now();
    let logs: Logs = [(("a".into(), 0), 0)].into();
    let new = |at| fetch(&cache, request(0, 0, &[("a", vec![(0, 0)])]), &logs, at).session_id;
    let first = new(start);
    let second = new(start + Duration::from_secs(1));
    assert!(first != 0 && second != 0 && first != second);
    // Both busy: the next client goes on without a session.
    assert_eq!(new(start + Duration::from_secs(60)), 0);
    assert_eq!(cache.figures.evictions.get(), 0);
    // The first has been idle long enough: its slot goes to a new session.
    let third = new(start + EVICTABLE_AFTER + Duration::from_secs(1));
    assert!(third != 0 && third != second);
    assert_eq!(cache.figures.evictions.get(), 1);
    assert_eq!(cache.figures.sessions.get(), 2);
    let code = fetch(
        &cache,
        request(first, 1, &[]),
        &logs,
        start + EVICTABLE_AFTER * 2,
    )
    .error_code;
    assert_eq!(code, ErrorCode::FetchSessionIdNotFound.code());
    // No slots at all: sessions are off.
    assert_eq!(
        fetch(
            &sessions(0),
            request(0, 0, &[("a", vec![(0, 0)])]),
            &logs,
            start
        )
        .session_id,
        0
    );
}

#[test]
fn sessions_hold_a_bounded_number_of_partitions_and_forget_after_adding() {
    let cache = FetchSessions::new(10, 4, SessionFigures::default());
    let now = Instant::now();
    let logs: Logs = (0..6).map(|p| (("a".to_string(), p), 0)).collect();
    let list = |ps: std::ops::Range<i32>| vec![("a", ps.map(|p| (p, 0)).collect::<Vec<_>>())];
    // Five partitions do not fit: no session, a full answer.
    let resp = fetch(&cache, request(0, 0, &list(0..5)), &logs, now);
    assert_eq!((resp.session_id, answered(&resp).len()), (0, 5));
    let id = fetch(&cache, request(0, 0, &list(0..3)), &logs, now).session_id;
    assert_ne!(id, 0);
    // Listed and forgotten in one request: forgotten, as on Kafka.
    let resp = fetch(
        &cache,
        forget(request(id, 1, &list(3..4)), "a", vec![3]),
        &logs,
        now,
    );
    assert_eq!(resp.error_code, 0);
    assert_eq!(cache.figures.partitions.get(), 3);
    // Growing past the bound closes the session; the client starts over.
    let resp = fetch(&cache, request(id, 2, &list(3..5)), &logs, now);
    assert_eq!(resp.error_code, ErrorCode::FetchSessionIdNotFound.code());
    assert_eq!(cache.figures.sessions.get(), 0);
}

#[derive(Clone, Debug)]
enum Step {
    /// The broker appends to a partition (topic index, partition, records).
    Append(usize, i32, i64),
    /// The client starts fetching a partition at its high watermark's
    /// current value, or moves it there if it fetches it already.
    Fetch(usize, i32),
    /// The client stops fetching a partition.
    Forget(usize, i32),
    /// The client consumes what it was last told about a partition.
    Consume(usize, i32),
}

fn step() -> impl Strategy<Value = Step> {
    let topic = 0..3usize;
    let p = 0..3i32;
    prop_oneof![
        (topic.clone(), p.clone(), 1..5i64).prop_map(|(t, p, n)| Step::Append(t, p, n)),
        (topic.clone(), p.clone()).prop_map(|(t, p)| Step::Fetch(t, p)),
        (topic.clone(), p.clone()).prop_map(|(t, p)| Step::Forget(t, p)),
        (topic, p).prop_map(|(t, p)| Step::Consume(t, p)),
    ]
}

const TOPICS: [&str; 3] = ["x", "y", "z"];

proptest! {
    /// A client that merges each incremental answer into what it knows
    /// always knows what a sessionless full fetch of the same partitions
    /// would tell it, and is told of every partition with records.
    #[test]
    fn merged_incremental_answers_equal_a_full_fetch(
        steps in proptest::collection::vec(step(), 1..60),
    ) {
        let cache = sessions(4);
        let now = Instant::now();
        let mut logs: Logs = BTreeMap::new();
        for t in TOPICS {
            for p in 0..3 {
                logs.insert((t.to_string(), p), 0);
            }
        }
        // The client's side: its partitions, their positions, and the high
        // watermark it was last told.
        let mut positions: BTreeMap<(String, i32), i64> = BTreeMap::new();
        let mut known: BTreeMap<(String, i32), i64> = BTreeMap::new();
        let mut session = (0, 0);
        for step in steps {
            let mut changed: Vec<(String, i32, i64)> = Vec::new();
            let mut forgotten: Vec<(String, i32)> = Vec::new();
            match step {
                Step::Append(t, p, n) => {
                    *logs.get_mut(&(TOPICS[t].to_string(), p)).unwrap() += n;
                }
                Step::Fetch(t, p) | Step::Consume(t, p) => {
                    let key = (TOPICS[t].to_string(), p);
                    let fetching = positions.contains_key(&key);
                    if matches!(step, Step::Fetch(..)) || fetching {
                        let to = if matches!(step, Step::Consume(..)) {
                            known.get(&key).copied().unwrap_or(0)
                        } else {
                            logs[&key]
                        };
                        positions.insert(key.clone(), to);
                        changed.push((key.0, key.1, to));
                    }
                }
                Step::Forget(t, p) => {
                    let key = (TOPICS[t].to_string(), p);
                    if positions.remove(&key).is_some() {
                        known.remove(&key);
                        forgotten.push(key);
                    }
                }
            }
            let (id, epoch) = session;
            let req = if id == 0 {
                let all: Vec<(String, Vec<(i32, i64)>)> = TOPICS
                    .iter()
                    .map(|t| {
                        let ps = positions
                            .iter()
                            .filter(|((topic, _), _)| topic == t)
                            .map(|((_, p), &o)| (*p, o))
                            .collect();
                        (t.to_string(), ps)
                    })
                    .collect();
                let all: Vec<(&str, Vec<(i32, i64)>)> =
                    all.iter().map(|(t, ps)| (t.as_str(), ps.clone())).collect();
                request(0, 0, &all)
            } else {
                let mut req = request(id, epoch, &[]);
                for (t, p, o) in &changed {
                    req.topics.push(
                        FetchTopic::default().with_topic(name(t)).with_partitions(vec![partition(*p, *o)]),
                    );
                }
                for (t, p) in &forgotten {
                    req = forget(req, t, vec![*p]);
                }
                req
            };
            let resp = fetch(&cache, req, &logs, now);
            prop_assert_eq!(resp.error_code, 0);
            session = (resp.session_id, epoch_after(if id == 0 { 0 } else { epoch }));
            prop_assert_ne!(session.0, 0, "four slots, one client");
            for t in &resp.responses {
                for p in &t.partitions {
                    known.insert((t.topic.0.to_string(), p.partition_index), p.high_watermark);
                }
            }
            // What a full, sessionless fetch of the client's partitions says.
            let listed: Vec<(String, Vec<(i32, i64)>)> = TOPICS
                .iter()
                .map(|t| {
                    (t.to_string(), positions.iter().filter(|((topic, _), _)| topic == t)
                        .map(|((_, p), &o)| (*p, o)).collect())
                })
                .collect();
            let listed: Vec<(&str, Vec<(i32, i64)>)> =
                listed.iter().map(|(t, ps)| (t.as_str(), ps.clone())).collect();
            let truth = read(&request(0, -1, &listed), &logs);
            for t in &truth.responses {
                for p in &t.partitions {
                    let key = (t.topic.0.to_string(), p.partition_index);
                    prop_assert_eq!(known.get(&key), Some(&p.high_watermark), "{:?}", key);
                    let has_records = p.records.as_ref().is_some_and(|r| !r.is_empty());
                    if has_records {
                        prop_assert!(answered(&resp).contains(&key), "records of {:?} not sent", key);
                    }
                }
            }
            prop_assert_eq!(known.len(), positions.len());
        }
    }
}

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use proptest::prelude::*;
use sluice_vocab::ErrorCode;
use tokio::time::Instant;

use super::*;
use crate::{GroupConfig, TopicCatalog, TopicInfo};

/// Topics by name, with a version that moves on every change.
#[derive(Default)]
struct Topics(Mutex<(u64, BTreeMap<String, TopicInfo>)>);

impl Topics {
    fn with(topics: &[(&str, i32)]) -> Topics {
        let t = Topics::default();
        for (name, n) in topics {
            t.set(name, *n);
        }
        t
    }

    fn set(&self, name: &str, partitions: i32) {
        let mut g = self.0.lock().expect("lock");
        g.0 += 1;
        let id = match g.1.get(name) {
            Some(t) => t.id,
            None => {
                let mut id = [0u8; 16];
                for (i, b) in name.bytes().enumerate().take(15) {
                    id[i] = b;
                }
                id[15] = 1;
                id
            }
        };
        g.1.insert(name.to_owned(), TopicInfo { id, partitions });
    }

    /// The topic deleted and created again: same name, another id.
    fn recreate(&self, name: &str) {
        let mut g = self.0.lock().expect("lock");
        g.0 += 1;
        if let Some(t) = g.1.get_mut(name) {
            t.id[15] = t.id[15].wrapping_add(1);
        }
    }

    fn id(&self, name: &str) -> TopicId {
        self.0.lock().expect("lock").1[name].id
    }
}

impl TopicCatalog for Topics {
    fn version(&self) -> u64 {
        self.0.lock().expect("lock").0
    }
    fn topic(&self, name: &str) -> Option<TopicInfo> {
        self.0.lock().expect("lock").1.get(name).copied()
    }
    fn names(&self) -> Vec<String> {
        self.0.lock().expect("lock").1.keys().cloned().collect()
    }
}

fn cfg() -> GroupConfig {
    GroupConfig {
        consumer_session_timeout_ms: 10_000,
        consumer_heartbeat_interval_ms: 1_000,
        ..GroupConfig::default()
    }
}

fn join(id: &str, topics: &[&str]) -> Heartbeat {
    Heartbeat {
        member_id: id.to_owned(),
        member_epoch: 0,
        instance_id: None,
        rack_id: None,
        rebalance_timeout_ms: 5_000,
        subscribed_names: Some(topics.iter().map(|t| (*t).to_owned()).collect()),
        subscribed_regex: None,
        server_assignor: None,
        owned: Some(Vec::new()),
        client_id: "test".to_owned(),
        client_host: "/127.0.0.1".to_owned(),
    }
}

/// A heartbeat that reports `owned` (None: not reported).
fn beat(id: &str, epoch: i32, owned: Option<Vec<(TopicId, Vec<i32>)>>) -> Heartbeat {
    Heartbeat {
        member_epoch: epoch,
        rebalance_timeout_ms: -1,
        subscribed_names: None,
        owned,
        ..join(id, &[])
    }
}

/// An assignment as the protocol carries it.
type Wire = Vec<(TopicId, Vec<i32>)>;

/// A client that does what librdkafka does: it takes new partitions at
/// once, gives revoked ones up after `slow` more heartbeats (its revocation
/// callback takes that long), reports what it owns, and heartbeats with the
/// epoch it was given.
struct Client {
    id: String,
    epoch: i32,
    owned: Vec<(TopicId, Vec<i32>)>,
    slow: usize,
    /// The assignment it moves to once its revocation is done, and how many
    /// more heartbeats that takes.
    revoking: Option<(Wire, usize)>,
    /// Its subscription, for full requests.
    subscription: Vec<String>,
    /// An answer was lost: the next heartbeat is a full request (Kafka's
    /// clients send one after any error).
    lost: bool,
}

fn flat(a: &[(TopicId, Vec<i32>)]) -> BTreeSet<(TopicId, i32)> {
    a.iter()
        .flat_map(|(t, ps)| ps.iter().map(move |p| (*t, *p)))
        .collect()
}

fn unflat(s: &BTreeSet<(TopicId, i32)>) -> Vec<(TopicId, Vec<i32>)> {
    let mut out: BTreeMap<TopicId, Vec<i32>> = BTreeMap::new();
    for (t, p) in s {
        out.entry(*t).or_default().push(*p);
    }
    out.into_iter().collect()
}

impl Client {
    fn new(id: &str, answer: HeartbeatAnswer, slow: usize) -> Client {
        Client {
            id: id.to_owned(),
            epoch: answer.member_epoch,
            owned: answer.assignment.unwrap_or_default(),
            slow,
            revoking: None,
            subscription: Vec::new(),
            lost: false,
        }
    }

    fn subscribed(mut self, sub: &[&str]) -> Client {
        self.subscription = sub.iter().map(|t| (*t).to_owned()).collect();
        self
    }

    fn beat(
        &mut self,
        g: &mut ConsumerGroup,
        topics: &Topics,
        now: Instant,
    ) -> Result<HeartbeatAnswer, Refusal> {
        let mut hb = beat(&self.id, self.epoch, Some(self.owned.clone()));
        if std::mem::take(&mut self.lost) {
            hb.rebalance_timeout_ms = 5_000;
            hb.subscribed_names = Some(self.subscription.clone());
        }
        let a = g.heartbeat("g", hb, now, &cfg(), topics)?;
        self.answered(&a);
        Ok(a)
    }

    fn answered(&mut self, a: &HeartbeatAnswer) {
        self.epoch = a.member_epoch;
        match &a.assignment {
            Some(assigned) => self.adopt(assigned.clone()),
            None => {
                if let Some((next, left)) = self.revoking.take() {
                    if left == 0 {
                        self.owned = next;
                    } else {
                        self.revoking = Some((next, left - 1));
                    }
                }
            }
        }
    }

    fn adopt(&mut self, assigned: Vec<(TopicId, Vec<i32>)>) {
        let (have, want) = (flat(&self.owned), flat(&assigned));
        if have.is_subset(&want) || self.slow == 0 {
            self.owned = assigned;
            self.revoking = None;
        } else {
            self.owned = unflat(&have.union(&want).copied().collect());
            self.revoking = Some((assigned, self.slow - 1));
        }
    }

    fn partitions(&self) -> usize {
        self.owned.iter().map(|(_, p)| p.len()).sum()
    }
}

fn joined(
    g: &mut ConsumerGroup,
    topics: &Topics,
    id: &str,
    subscribed: &[&str],
    now: Instant,
) -> Client {
    let a = g
        .heartbeat("g", join(id, subscribed), now, &cfg(), topics)
        .expect("join");
    Client::new(id, a, 0)
}

/// What clients really hold never overlaps.
fn check_clients_exclusive<'a>(clients: impl Iterator<Item = &'a Client>) {
    let mut seen = BTreeSet::new();
    for c in clients {
        for tp in flat(&c.owned) {
            assert!(
                seen.insert(tp),
                "{tp:?} owned by two clients (one is {})",
                c.id
            );
        }
    }
}

/// No partition is ever held by two members, counting what they were
/// asked to revoke and have not yet.
fn check_exclusive(g: &ConsumerGroup) {
    let mut seen = BTreeSet::new();
    for m in g.members.values() {
        for (t, parts) in m.assigned.iter().chain(&m.pending_revocation) {
            for p in parts {
                assert!(seen.insert((*t, *p)), "{t:?}-{p} held twice");
            }
        }
    }
}

#[test]
fn a_second_member_gets_its_partitions_only_after_the_first_revokes_them() {
    let topics = Topics::with(&[("t", 4)]);
    let now = Instant::now();
    let mut g = ConsumerGroup::default();
    let mut a = joined(&mut g, &topics, "a", &["t"], now);
    assert_eq!(a.partitions(), 4);
    assert_eq!(a.epoch, g.group_epoch);
    let mut b = joined(&mut g, &topics, "b", &["t"], now);
    // Everything b is to get is still a's: it waits at the new epoch.
    assert_eq!(b.partitions(), 0);
    assert_eq!(b.epoch, g.assignment_epoch);
    assert_eq!(g.members["b"].state, MemberState::UnreleasedPartitions);
    assert_eq!(g.state(), "Reconciling");
    check_exclusive(&g);

    // a is asked to give two up and keeps its epoch until it has.
    let before = a.epoch;
    let answer = g
        .heartbeat(
            "g",
            beat("a", a.epoch, Some(a.owned.clone())),
            now,
            &cfg(),
            &topics,
        )
        .expect("beat");
    assert_eq!(answer.member_epoch, before);
    let kept = answer.assignment.expect("a smaller assignment");
    assert_eq!(kept.iter().map(|(_, p)| p.len()).sum::<usize>(), 2);
    assert_eq!(g.members["a"].state, MemberState::UnrevokedPartitions);
    check_exclusive(&g);
    // b still gets nothing while a holds them.
    b.beat(&mut g, &topics, now).expect("beat");
    assert_eq!(b.partitions(), 0);

    // a revokes (its next heartbeat owns only what it kept) and moves on.
    a.owned = kept;
    a.beat(&mut g, &topics, now).expect("beat");
    assert_eq!(a.epoch, g.assignment_epoch);
    assert_eq!(g.members["a"].state, MemberState::Stable);
    check_exclusive(&g);
    b.beat(&mut g, &topics, now).expect("beat");
    assert_eq!(b.partitions(), 2);
    assert_eq!(g.state(), "Stable");
    check_exclusive(&g);
}

#[test]
fn a_heartbeat_from_another_epoch_is_fenced_but_the_previous_one_is_forgiven_once() {
    let topics = Topics::with(&[("t", 2)]);
    let now = Instant::now();
    let mut g = ConsumerGroup::default();
    let mut a = joined(&mut g, &topics, "a", &["t"], now);
    let err = g
        .heartbeat("g", beat("a", a.epoch + 1, None), now, &cfg(), &topics)
        .expect_err("a future epoch");
    assert_eq!(err.0, ErrorCode::FencedMemberEpoch);
    let err = g
        .heartbeat("g", beat("nobody", 1, None), now, &cfg(), &topics)
        .expect_err("unknown member");
    assert_eq!(err.0, ErrorCode::UnknownMemberId);
    // b joins, a's epoch moves; a heartbeat that still carries a's previous
    // epoch and owns a subset of its assignment is accepted.
    let topics = Topics::with(&[("t", 3)]);
    for other in ["b", "c"] {
        let _ = joined(&mut g, &topics, other, &["t"], now);
        a.beat(&mut g, &topics, now).expect("beat");
        a.owned.truncate(0);
        a.beat(&mut g, &topics, now).expect("revoked");
    }
    let previous = g.members["a"].previous_member_epoch;
    assert!(previous > 1 && previous < a.epoch);
    g.heartbeat(
        "g",
        beat("a", previous, Some(Vec::new())),
        now,
        &cfg(),
        &topics,
    )
    .expect("the previous epoch with a subset is accepted");
    let err = g
        .heartbeat("g", beat("a", previous - 1, None), now, &cfg(), &topics)
        .expect_err("older");
    assert_eq!(err.0, ErrorCode::FencedMemberEpoch);
}

#[test]
fn a_join_sent_again_is_the_same_member_and_moves_nothing() {
    let topics = Topics::with(&[("t", 4)]);
    let now = Instant::now();
    let mut g = ConsumerGroup::default();
    let a = joined(&mut g, &topics, "a", &["t"], now);
    let epoch = g.group_epoch;
    let again = g
        .heartbeat("g", join("a", &["t"]), now, &cfg(), &topics)
        .expect("join again");
    assert_eq!(g.group_epoch, epoch, "no rebalance");
    assert_eq!(again.member_epoch, a.epoch);
    assert_eq!(again.assignment.as_ref(), Some(&a.owned));
}

#[test]
fn a_group_waiting_for_a_static_member_is_not_stable() {
    let topics = Topics::with(&[("t", 2)]);
    let now = Instant::now();
    let mut g = ConsumerGroup::default();
    let mut s = join("s1", &["t"]);
    s.instance_id = Some("i".to_owned());
    let first = g.heartbeat("g", s, now, &cfg(), &topics).expect("join");
    assert_eq!(g.state(), "Stable");
    let mut leave = beat("s1", STATIC_LEAVE_EPOCH, None);
    leave.instance_id = Some("i".to_owned());
    g.heartbeat("g", leave, now, &cfg(), &topics)
        .expect("leave");
    // Its partitions wait for it: nobody consumes them meanwhile.
    assert_eq!(g.state(), "Reconciling");
    let mut back = join("s2", &["t"]);
    back.instance_id = Some("i".to_owned());
    let r = g.heartbeat("g", back, now, &cfg(), &topics).expect("back");
    assert_eq!(r.assignment, first.assignment);
    assert_eq!(g.state(), "Stable");
}

#[test]
fn commits_need_the_current_member_epoch() {
    let topics = Topics::with(&[("t", 2)]);
    let now = Instant::now();
    let mut g = ConsumerGroup::default();
    assert_eq!(
        g.validate_commit("", -1),
        Ok(()),
        "an empty group takes admin commits"
    );
    let a = joined(&mut g, &topics, "a", &["t"], now);
    assert_eq!(g.validate_commit("a", a.epoch), Ok(()));
    assert_eq!(
        g.validate_commit("a", a.epoch - 1),
        Err(ErrorCode::StaleMemberEpoch)
    );
    assert_eq!(g.validate_commit("", -1), Err(ErrorCode::UnknownMemberId));
    assert_eq!(
        g.validate_fetch("a", a.epoch + 1),
        Err(ErrorCode::StaleMemberEpoch)
    );
}

#[test]
fn a_silent_member_is_removed_and_one_that_keeps_revoked_partitions_is_fenced() {
    let topics = Topics::with(&[("t", 4)]);
    let start = Instant::now();
    let mut g = ConsumerGroup::default();
    let mut a = joined(&mut g, &topics, "a", &["t"], start);
    let mut b = joined(&mut g, &topics, "b", &["t"], start);
    // a is asked to revoke and never does; b keeps heartbeating.
    g.heartbeat(
        "g",
        beat("a", a.epoch, Some(a.owned.clone())),
        start,
        &cfg(),
        &topics,
    )
    .expect("beat");
    let deadline = g.next_deadline().expect("deadlines");
    assert!(deadline <= start + Duration::from_millis(5_000));
    let later = start + Duration::from_millis(5_001);
    g.fire_timers("g", later);
    assert!(
        !g.members.contains_key("a"),
        "fenced after the rebalance timeout"
    );
    b.beat(&mut g, &topics, later).expect("beat");
    assert_eq!(b.partitions(), 4);
    // b goes silent for a whole session.
    g.fire_timers("g", later + Duration::from_millis(10_001));
    assert!(g.members.is_empty());
    assert_eq!(g.state(), "Empty");
    let err = a.beat(&mut g, &topics, later).expect_err("gone");
    assert_eq!(err.0, ErrorCode::UnknownMemberId);
}

#[test]
fn a_static_member_restarting_keeps_its_partitions_and_the_group_epoch_stays() {
    let topics = Topics::with(&[("t", 4)]);
    let now = Instant::now();
    let mut g = ConsumerGroup::default();
    let mut a = join("a1", &["t"]);
    a.instance_id = Some("ia".to_owned());
    let first = g.heartbeat("g", a, now, &cfg(), &topics).expect("join");
    let mut b = joined(&mut g, &topics, "b", &["t"], now);
    let mut a = Client::new("a1", first, 0);
    for _ in 0..3 {
        let mut hb = beat(&a.id, a.epoch, Some(a.owned.clone()));
        hb.instance_id = Some("ia".to_owned());
        let r = g.heartbeat("g", hb, now, &cfg(), &topics).expect("beat");
        a.epoch = r.member_epoch;
        if let Some(x) = r.assignment {
            a.owned = x;
        }
        b.beat(&mut g, &topics, now).expect("beat");
    }
    assert_eq!(g.state(), "Stable");
    let epoch = g.group_epoch;
    let held = g.members["a1"].assigned.clone();
    // Leaves for a restart, comes back under a new member id.
    let mut leave = beat("a1", STATIC_LEAVE_EPOCH, None);
    leave.instance_id = Some("ia".to_owned());
    g.heartbeat("g", leave, now, &cfg(), &topics)
        .expect("leave");
    let mut back = join("a2", &["t"]);
    back.instance_id = Some("ia".to_owned());
    let r = g
        .heartbeat("g", back, now, &cfg(), &topics)
        .expect("rejoin");
    assert_eq!(g.group_epoch, epoch, "nothing moved");
    assert_eq!(g.members["a2"].assigned, held);
    assert_eq!(
        r.assignment
            .map(|a| a.iter().map(|(_, p)| p.len()).sum::<usize>()),
        Some(2)
    );
    // The instance id is taken while its member is active.
    let mut thief = join("a3", &["t"]);
    thief.instance_id = Some("ia".to_owned());
    let err = g
        .heartbeat("g", thief, now, &cfg(), &topics)
        .expect_err("taken");
    assert_eq!(err.0, ErrorCode::UnreleasedInstanceId);
}

#[test]
fn new_partitions_and_regex_subscriptions_move_the_group_epoch() {
    let topics = Topics::with(&[("orders-eu", 2), ("orders-us", 2), ("audit", 1)]);
    let now = Instant::now();
    let mut g = ConsumerGroup::default();
    let mut hb = join("a", &[]);
    hb.subscribed_names = None;
    hb.subscribed_regex = Some("orders-.*".to_owned());
    let r = g.heartbeat("g", hb, now, &cfg(), &topics).expect("join");
    let mut a = Client::new("a", r, 0);
    assert_eq!(a.partitions(), 4);
    let epoch = g.group_epoch;
    topics.set("orders-eu", 3);
    topics.set("orders-apac", 1);
    // Regexes are matched again at most every REGEX_REFRESH.
    a.beat(&mut g, &topics, now).expect("beat");
    assert_eq!(g.group_epoch, epoch, "not yet");
    a.beat(&mut g, &topics, now + REGEX_REFRESH).expect("beat");
    assert!(g.group_epoch > epoch);
    assert_eq!(a.partitions(), 6);
    assert!(a
        .owned
        .iter()
        .any(|(id, _)| *id == topics.id("orders-apac")));
    let mut bad = join("b", &[]);
    bad.subscribed_regex = Some("(".to_owned());
    let err = g
        .heartbeat("g", bad, now, &cfg(), &topics)
        .expect_err("bad regex");
    assert_eq!(err.0, ErrorCode::InvalidRegularExpression);
    let mut bad = join("b", &["audit"]);
    bad.server_assignor = Some("sticky".to_owned());
    let err = g
        .heartbeat("g", bad, now, &cfg(), &topics)
        .expect_err("unknown assignor");
    assert_eq!(err.0, ErrorCode::UnsupportedAssignor);
}

fn subscription(s: u8) -> Vec<&'static str> {
    match s {
        1 => vec!["x"],
        2 => vec!["y"],
        _ => vec!["x", "y"],
    }
}

fn topic_of(t: u8) -> &'static str {
    if t == 0 {
        "x"
    } else {
        "y"
    }
}

/// Member 3 is static: it restarts under a new member id.
const STATIC: usize = 3;

fn join_as(m: usize, generation: usize, sub: &[&str]) -> (String, Heartbeat) {
    let id = if m == STATIC {
        format!("m{m}-{generation}")
    } else {
        format!("m{m}")
    };
    let mut hb = join(&id, sub);
    if m == STATIC {
        hb.instance_id = Some("static".to_owned());
    }
    (id, hb)
}

/// A heartbeat as a client sends it; fenced, the client loses what it
/// owns and joins again, as librdkafka does.
fn beat_or_rejoin(
    c: &mut Client,
    g: &mut ConsumerGroup,
    topics: &Topics,
    now: Instant,
    sub: &[&str],
) {
    match c.beat(g, topics, now) {
        Ok(_) => {}
        Err((ErrorCode::FencedMemberEpoch, _)) => {
            let mut hb = join(&c.id, sub);
            if c.id.starts_with(&format!("m{STATIC}-")) {
                hb.instance_id = Some("static".to_owned());
            }
            let a = g.heartbeat("g", hb, now, &cfg(), topics).expect("rejoin");
            *c = Client::new(&c.id.clone(), a, c.slow).subscribed(sub);
        }
        Err(e) => panic!("heartbeat refused: {e:?}"),
    }
}

#[derive(Clone, Debug)]
enum Op {
    Join(usize, u8),
    /// A heartbeat whose answer is lost.
    LoseAnswer(usize),
    /// The static member restarts: leaves with -2, joins under a new id.
    Bounce,
    Leave(usize),
    /// Heartbeat reporting what the client owns.
    Beat(usize),
    /// Heartbeat without reporting ownership.
    Quiet(usize),
    Grow(u8),
    Expire(usize),
    Resubscribe(usize, u8),
    Recreate(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0usize..4, 1u8..4).prop_map(|(m, s)| Op::Join(m, s)),
        (0usize..4).prop_map(Op::Leave),
        (0usize..4).prop_map(Op::Beat),
        (0usize..4).prop_map(Op::Beat),
        (0usize..4).prop_map(Op::Beat),
        (0usize..4).prop_map(Op::Quiet),
        (0usize..4).prop_map(Op::LoseAnswer),
        Just(Op::Bounce),
        (0u8..2).prop_map(Op::Grow),
        (0usize..4).prop_map(Op::Expire),
        (0usize..4, 1u8..4).prop_map(|(m, s)| Op::Resubscribe(m, s)),
        (0u8..2).prop_map(Op::Recreate),
    ]
}

proptest! {
    /// Whatever members do, and however long clients take to give up
    /// revoked partitions, no partition is ever held by two of them, and
    /// once everyone heartbeats as a client does the group settles with
    /// every subscribed partition held by exactly one subscriber.
    #[test]
    fn members_never_share_a_partition_and_the_group_settles(
        ops in prop::collection::vec(op(), 1..60),
        slowness in prop::collection::vec(0usize..4, 4),
    ) {
        let topics = Topics::with(&[("x", 3), ("y", 2)]);
        let now = Instant::now();
        let mut g = ConsumerGroup::default();
        let mut clients: BTreeMap<usize, Client> = BTreeMap::new();
        let mut subs: BTreeMap<usize, Vec<&'static str>> = BTreeMap::new();
        let mut generation = 0;
        for op in ops {
            match op {
                Op::Join(m, s) => {
                    if clients.contains_key(&m) { continue; }
                    let sub = subscription(s);
                    generation += 1;
                    let (id, hb) = join_as(m, generation, &sub);
                    let a = g.heartbeat("g", hb, now, &cfg(), &topics).expect("join");
                    clients.insert(m, Client::new(&id, a, slowness[m]).subscribed(&sub));
                    subs.insert(m, sub);
                }
                Op::LoseAnswer(m) => {
                    if let Some(c) = clients.get_mut(&m) {
                        let _ = g.heartbeat("g", beat(&c.id, c.epoch, Some(c.owned.clone())), now, &cfg(), &topics);
                        c.lost = true;
                    }
                }
                Op::Bounce => {
                    if let Some(c) = clients.remove(&STATIC) {
                        let mut leave = beat(&c.id, STATIC_LEAVE_EPOCH, None);
                        leave.instance_id = Some("static".to_owned());
                        g.heartbeat("g", leave, now, &cfg(), &topics).expect("static leave");
                        let sub = subs[&STATIC].clone();
                        generation += 1;
                        let (id, hb) = join_as(STATIC, generation, &sub);
                        let a = g.heartbeat("g", hb, now, &cfg(), &topics).expect("static rejoin");
                        clients.insert(STATIC, Client::new(&id, a, slowness[STATIC]).subscribed(&sub));
                    }
                }
                Op::Leave(m) => {
                    if let Some(c) = clients.remove(&m) {
                        g.heartbeat("g", beat(&c.id, LEAVE_EPOCH, None), now, &cfg(), &topics).expect("leave");
                    }
                }
                Op::Beat(m) => {
                    if let Some(c) = clients.get_mut(&m) {
                        beat_or_rejoin(c, &mut g, &topics, now, &subs[&m]);
                    }
                }
                Op::Quiet(m) => {
                    if let Some(c) = clients.get_mut(&m) {
                        match g.heartbeat("g", beat(&c.id, c.epoch, None), now, &cfg(), &topics) {
                            Ok(a) => c.answered(&a),
                            // Only a lost answer puts a client at another epoch.
                            Err((ErrorCode::FencedMemberEpoch, _)) => beat_or_rejoin(c, &mut g, &topics, now, &subs[&m]),
                            Err(e) => panic!("heartbeat refused: {e:?}"),
                        }
                    }
                }
                Op::Grow(t) => {
                    let n = topics.topic(topic_of(t)).map_or(0, |i| i.partitions);
                    topics.set(topic_of(t), n + 1);
                }
                Op::Expire(m) => {
                    if let Some(c) = clients.remove(&m) {
                        g.remove_member(&c.id, "test", "g");
                    }
                }
                Op::Resubscribe(m, s) => {
                    if let Some(c) = clients.get_mut(&m) {
                        let sub = subscription(s);
                        let mut hb = beat(&c.id, c.epoch, Some(c.owned.clone()));
                        hb.subscribed_names = Some(sub.iter().map(|t| (*t).to_owned()).collect());
                        c.subscription = sub.iter().map(|t| (*t).to_owned()).collect();
                        subs.insert(m, sub);
                        match g.heartbeat("g", hb, now, &cfg(), &topics) {
                            Ok(a) => c.answered(&a),
                            Err((ErrorCode::FencedMemberEpoch, _)) => beat_or_rejoin(c, &mut g, &topics, now, &subs[&m]),
                            Err(e) => panic!("heartbeat refused: {e:?}"),
                        }
                    }
                }
                Op::Recreate(t) => topics.recreate(topic_of(t)),
            }
            check_exclusive(&g);
            check_clients_exclusive(clients.values());
        }
        // Everyone heartbeats until nothing changes.
        for _ in 0..20 {
            let ids: Vec<usize> = clients.keys().copied().collect();
            for m in ids {
                if let Some(c) = clients.get_mut(&m) {
                    beat_or_rejoin(c, &mut g, &topics, now, &subs[&m]);
                }
                check_exclusive(&g);
                check_clients_exclusive(clients.values());
            }
        }
        if clients.is_empty() {
            return Ok(());
        }
        prop_assert_eq!(g.state(), "Stable");
        for name in ["x", "y"] {
            let n = topics.topic(name).map_or(0, |i| i.partitions);
            let subscribed = subs.iter().any(|(m, s)| clients.contains_key(m) && s.contains(&name));
            let held: usize = clients.values()
                .flat_map(|c| c.owned.iter())
                .filter(|(id, _)| *id == topics.id(name))
                .map(|(_, p)| p.len())
                .sum();
            prop_assert_eq!(held, if subscribed { n as usize } else { 0 }, "topic {}", name);
            // Nothing of an earlier incarnation of the topic is still held.
            let stale: usize = clients.values()
                .flat_map(|c| c.owned.iter())
                .filter(|(id, _)| id[..15] == topics.id(name)[..15] && *id != topics.id(name))
                .map(|(_, p)| p.len())
                .sum();
            prop_assert_eq!(stale, 0, "topic {} (earlier ids)", name);
        }
    }
}

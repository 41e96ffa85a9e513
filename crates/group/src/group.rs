//! One group's membership state machine: Kafka's `GroupMetadata` and the
//! parts of its `GroupCoordinator` that act on one group, run under the
//! group's mutex. Nothing here blocks or awaits; waiting JoinGroup and
//! SyncGroup requests hold the receiving end of a oneshot channel whose
//! sender lives in the member.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use sluice_vocab::ErrorCode;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::consumer::{ConsumerGroup, Heartbeat, HeartbeatAnswer, Refusal};
use crate::{GroupConfig, TopicCatalog};

/// How long a new member's JoinGroup may wait before it is dropped
/// (Kafka's `GroupCoordinator.NewMemberJoinTimeoutMs`).
pub(crate) const NEW_MEMBER_JOIN_TIMEOUT: Duration = Duration::from_secs(300);

/// How long an Empty group without offsets or members is kept before it is
/// forgotten (Kafka's `offsets.retention.check.interval.ms` sweep).
pub(crate) const EMPTY_GROUP_TTL: Duration = Duration::from_secs(600);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GroupState {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
    Dead,
}

impl GroupState {
    /// Kafka's names, as DescribeGroups and ListGroups report them.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            GroupState::Empty => "Empty",
            GroupState::PreparingRebalance => "PreparingRebalance",
            GroupState::CompletingRebalance => "CompletingRebalance",
            GroupState::Stable => "Stable",
            GroupState::Dead => "Dead",
        }
    }
}

fn code(err: ErrorCode) -> i16 {
    err.code()
}

/// The outcome of a JoinGroup, before it is shaped for a protocol version.
#[derive(Debug, Clone)]
pub(crate) struct JoinResult {
    pub error: i16,
    pub member_id: String,
    pub generation_id: i32,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    pub leader: String,
    pub skip_assignment: bool,
    /// (member id, group instance id, metadata of the chosen protocol); the
    /// leader's answer only.
    pub members: Vec<(String, Option<String>, Bytes)>,
}

impl JoinResult {
    pub(crate) fn error(member_id: &str, err: ErrorCode) -> Self {
        JoinResult {
            error: code(err),
            member_id: member_id.to_owned(),
            generation_id: -1,
            protocol_type: None,
            protocol_name: None,
            leader: String::new(),
            skip_assignment: false,
            members: Vec::new(),
        }
    }
}

/// The outcome of a SyncGroup.
#[derive(Debug, Clone)]
pub(crate) struct SyncResult {
    pub error: i16,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    pub assignment: Bytes,
}

impl SyncResult {
    pub(crate) fn error(err: ErrorCode) -> Self {
        SyncResult {
            error: code(err),
            protocol_type: None,
            protocol_name: None,
            assignment: Bytes::new(),
        }
    }
}

/// Either an answer now or one to wait for.
pub(crate) enum Outcome<T> {
    Now(T),
    Wait(oneshot::Receiver<T>),
}

/// A JoinGroup as the state machine sees it.
pub(crate) struct JoinParams {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub rebalance_timeout_ms: i32,
    pub session_timeout_ms: i32,
    pub protocol_type: String,
    pub protocols: Vec<(String, Bytes)>,
    /// JoinGroup v4+: a new dynamic member first gets MEMBER_ID_REQUIRED.
    pub require_known_member_id: bool,
    /// JoinGroup v9+: a static leader rejoining a Stable group is told to skip assignment.
    pub support_skip_assignment: bool,
}

pub(crate) struct Member {
    pub id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub rebalance_timeout_ms: i32,
    pub session_timeout_ms: i32,
    /// Preference order, as the member sent them.
    pub protocols: Vec<(String, Bytes)>,
    pub assignment: Bytes,
    join_waiter: Option<oneshot::Sender<JoinResult>>,
    sync_waiter: Option<oneshot::Sender<SyncResult>>,
    /// Joined but not yet through a completed join phase.
    is_new: bool,
    /// Session deadline; None while a pending rebalance keeps the member alive.
    deadline: Option<Instant>,
}

impl Member {
    fn awaiting_join(&self) -> bool {
        self.join_waiter.is_some()
    }

    fn awaiting_sync(&self) -> bool {
        self.sync_waiter.is_some()
    }

    fn supports(&self, protocol: &str) -> bool {
        self.protocols.iter().any(|(name, _)| name == protocol)
    }

    pub(crate) fn metadata(&self, protocol: &str) -> Bytes {
        self.protocols
            .iter()
            .find(|(name, _)| name == protocol)
            .map(|(_, m)| m.clone())
            .unwrap_or_default()
    }

    /// Same protocols with the same metadata in the same order.
    fn matches(&self, protocols: &[(String, Bytes)]) -> bool {
        self.protocols == protocols
    }

    fn reset_session(&mut self, now: Instant) {
        let ms = u64::try_from(self.session_timeout_ms).unwrap_or(0);
        self.deadline = Some(now + Duration::from_millis(ms));
    }

    fn send_join(&mut self, result: JoinResult) -> bool {
        match self.join_waiter.take() {
            // A closed receiver means the client went away; nothing to do.
            Some(tx) => {
                let _ = tx.send(result);
                true
            }
            None => false,
        }
    }

    fn send_sync(&mut self, result: SyncResult) -> bool {
        match self.sync_waiter.take() {
            Some(tx) => {
                let _ = tx.send(result);
                true
            }
            None => false,
        }
    }
}

/// The timer of a join phase (Kafka's DelayedJoin / InitialDelayedJoin).
#[derive(Clone, Copy, Debug)]
struct JoinTimer {
    deadline: Instant,
    /// Some for the initial delay of a group that was Empty: (this delay,
    /// what remains of the rebalance timeout after it), both in ms.
    initial: Option<(u64, u64)>,
}

/// A committed offset as kept in memory.
#[derive(Clone, Debug)]
pub(crate) struct Committed {
    pub offset: i64,
    pub leader_epoch: i32,
    pub metadata: String,
    /// Where the commit sits in the offsets log; a completion never
    /// replaces a later commit of the same partition.
    pub log_offset: i64,
}

pub(crate) struct Group {
    pub id: String,
    pub state: GroupState,
    pub generation: i32,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    pub leader: Option<String>,
    pub members: BTreeMap<String, Member>,
    /// group instance id -> member id
    static_members: HashMap<String, String>,
    /// Member ids handed out with MEMBER_ID_REQUIRED, with their expiry.
    pending_members: HashMap<String, Instant>,
    /// Members that got a JoinGroup answer but have not synced yet.
    pending_sync: HashSet<String>,
    /// (deadline, generation) by which every pending member must sync.
    sync_deadline: Option<(Instant, i32)>,
    join_timer: Option<JoinTimer>,
    /// A member joined during the initial delay, so wait once more.
    new_member_added: bool,
    pub offsets: BTreeMap<(String, i32), Committed>,
    /// Partitions with commits appended but not yet durable: how many, and
    /// the latest one appended (a deleted group's tombstones cover them).
    pub inflight: HashMap<(String, i32), (usize, Committed)>,
    /// Partitions whose offsets OffsetDelete removed, with the end of its
    /// tombstones in the offsets log: a commit written before them (still
    /// settling, or in a transaction not yet ended) stays removed, as Kafka
    /// drops pending commits of deleted offsets.
    deleted_before: HashMap<(String, i32), i64>,
    /// When the group last became Empty (for forgetting idle groups).
    empty_since: Instant,
    /// Which protocol the group's members speak.
    pub kind: GroupKind,
    /// The members of the consumer protocol (KIP-848), when `kind` says so.
    pub consumer: ConsumerGroup,
}

/// Which API a commit came in: the consumer protocol answers them
/// differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CommitApi {
    /// OffsetCommit at this version.
    OffsetCommit(i16),
    /// TxnOffsetCommit.
    Transactional,
}

/// A group speaks one membership protocol at a time; an empty group takes
/// the protocol of the next member that joins (Kafka converts an empty
/// group the same way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GroupKind {
    Classic,
    Consumer,
}

/// The topics of a consumer-protocol subscription (the metadata a consumer
/// joins with): a version, then that version's fields, of which every
/// version starts with version 0's (topics, user data); only those are
/// read, as Kafka reads a subscription for its topics. None when the bytes
/// are not one.
fn subscription_topics(metadata: &Bytes) -> Option<Vec<String>> {
    use kafka_protocol::messages::ConsumerProtocolSubscription;
    use kafka_protocol::protocol::Decodable;
    let mut buf = metadata.clone();
    let version = i16::from_be_bytes([*buf.first()?, *buf.get(1)?]);
    if version < 0 {
        return None;
    }
    let _ = bytes::Buf::get_i16(&mut buf);
    let s = ConsumerProtocolSubscription::decode(&mut buf, 0).ok()?;
    Some(s.topics.into_iter().map(|t| t.to_string()).collect())
}

impl Group {
    /// The topics the members of a consumer group subscribe to (Kafka's
    /// `GroupMetadata.subscribedTopics`); None when the group does not
    /// use the consumer protocol or a member's subscription cannot be
    /// read, so that callers assume it reads any topic.
    pub(crate) fn subscribed_topics(&self) -> Option<BTreeSet<String>> {
        if self.protocol_type.as_deref() != Some("consumer") {
            return None;
        }
        let protocol = self.protocol_name.as_deref()?;
        let mut topics = BTreeSet::new();
        for m in self.members.values() {
            let (_, metadata) = m.protocols.iter().find(|(name, _)| name == protocol)?;
            topics.extend(subscription_topics(metadata)?);
        }
        Some(topics)
    }

    pub(crate) fn new(id: String, now: Instant) -> Self {
        Group {
            id,
            state: GroupState::Empty,
            generation: 0,
            protocol_type: None,
            protocol_name: None,
            leader: None,
            members: BTreeMap::new(),
            static_members: HashMap::new(),
            pending_members: HashMap::new(),
            pending_sync: HashSet::new(),
            sync_deadline: None,
            join_timer: None,
            new_member_added: false,
            offsets: BTreeMap::new(),
            inflight: HashMap::new(),
            deleted_before: HashMap::new(),
            empty_since: now,
            kind: GroupKind::Classic,
            consumer: ConsumerGroup::default(),
        }
    }

    /// Answers every waiting JoinGroup and SyncGroup with `err` (the
    /// coordinator is going away; the clients look it up again).
    pub(crate) fn fail_waiters(&mut self, err: ErrorCode) {
        for member in self.members.values_mut() {
            if let Some(tx) = member.join_waiter.take() {
                let _ = tx.send(JoinResult::error(&member.id, err));
            }
            if let Some(tx) = member.sync_waiter.take() {
                let _ = tx.send(SyncResult::error(err));
            }
        }
    }

    /// Notes a commit appended to the offsets log (not yet durable).
    pub(crate) fn commit_appended(&mut self, tp: (String, i32), committed: Committed) {
        let entry = self.inflight.entry(tp).or_insert((0, committed.clone()));
        entry.0 += 1;
        if entry.1.log_offset <= committed.log_offset {
            entry.1 = committed;
        }
    }

    /// Settles one appended commit: on success it becomes the committed
    /// offset unless the group is gone or a later commit already landed.
    pub(crate) fn commit_settled(&mut self, tp: (String, i32), committed: Option<Committed>) {
        if let Some(entry) = self.inflight.get_mut(&tp) {
            entry.0 = entry.0.saturating_sub(1);
            if entry.0 == 0 {
                self.inflight.remove(&tp);
            }
        }
        let Some(committed) = committed else {
            return;
        };
        self.apply_committed(tp, committed);
    }

    /// A commit that is durable (a settled one, or a transaction's that was
    /// committed) becomes the committed offset unless the group is gone or
    /// a later commit already landed.
    pub(crate) fn apply_committed(&mut self, tp: (String, i32), committed: Committed) {
        if let Some(&end) = self.deleted_before.get(&tp) {
            if committed.log_offset < end {
                return;
            }
            self.deleted_before.remove(&tp);
        }
        let newer = self
            .offsets
            .get(&tp)
            .is_some_and(|c| c.log_offset > committed.log_offset);
        if self.state != GroupState::Dead && !newer {
            self.offsets.insert(tp, committed);
        }
    }

    /// Forgets the committed offsets of `keys`, whose tombstones end at
    /// `tombstones_end` in the offsets log (OffsetDelete).
    pub(crate) fn forget_offsets(&mut self, keys: &[(String, i32)], tombstones_end: i64) {
        for key in keys {
            self.offsets.remove(key);
            self.deleted_before.insert(key.clone(), tombstones_end);
        }
    }

    pub(crate) fn is_leader(&self, member_id: &str) -> bool {
        self.leader.as_deref() == Some(member_id)
    }

    fn rebalance_timeout_ms(&self) -> u64 {
        self.members
            .values()
            .map(|m| u64::try_from(m.rebalance_timeout_ms).unwrap_or(0))
            .max()
            .unwrap_or(0)
    }

    /// Kafka's `supportsProtocols`.
    fn supports_protocols(&self, protocol_type: &str, protocols: &[(String, Bytes)]) -> bool {
        if self.state == GroupState::Empty {
            !protocol_type.is_empty() && !protocols.is_empty()
        } else {
            self.protocol_type.as_deref() == Some(protocol_type)
                && protocols
                    .iter()
                    .any(|(name, _)| self.members.values().all(|m| m.supports(name)))
        }
    }

    /// True when `instance_id` belongs to a member other than `member_id`.
    pub(crate) fn is_static_member_fenced(
        &self,
        instance_id: Option<&str>,
        member_id: &str,
    ) -> bool {
        match instance_id.and_then(|i| self.static_members.get(i)) {
            Some(current) => current != member_id,
            None => false,
        }
    }

    /// Kafka's `validateCurrentMember`.
    pub(crate) fn validate_current_member(
        &self,
        member_id: &str,
        instance_id: Option<&str>,
    ) -> Result<(), ErrorCode> {
        if self.is_static_member_fenced(instance_id, member_id) {
            Err(ErrorCode::FencedInstanceId)
        } else if !self.members.contains_key(member_id) {
            Err(ErrorCode::UnknownMemberId)
        } else {
            Ok(())
        }
    }

    /// Kafka's `selectProtocol`: every member votes for its most preferred
    /// protocol that all members support; most votes wins, ties go to the
    /// leader's preference order.
    fn select_protocol(&self) -> Option<String> {
        let first = self.members.values().next()?;
        let candidates: Vec<&str> = first
            .protocols
            .iter()
            .map(|(name, _)| name.as_str())
            .filter(|name| self.members.values().all(|m| m.supports(name)))
            .collect();
        let mut votes: HashMap<&str, usize> = HashMap::new();
        for m in self.members.values() {
            if let Some((name, _)) = m
                .protocols
                .iter()
                .find(|(name, _)| candidates.contains(&name.as_str()))
            {
                *votes.entry(name.as_str()).or_default() += 1;
            }
        }
        let best = votes.values().copied().max()?;
        let order = self
            .leader
            .as_ref()
            .and_then(|l| self.members.get(l))
            .unwrap_or(first);
        order
            .protocols
            .iter()
            .map(|(name, _)| name.as_str())
            .find(|name| votes.get(name) == Some(&best))
            .or_else(|| {
                votes
                    .iter()
                    .find(|(_, v)| **v == best)
                    .map(|(name, _)| *name)
            })
            .map(str::to_owned)
    }

    fn current_member_metadata(&self) -> Vec<(String, Option<String>, Bytes)> {
        let protocol = self.protocol_name.as_deref().unwrap_or_default();
        self.members
            .values()
            .map(|m| (m.id.clone(), m.instance_id.clone(), m.metadata(protocol)))
            .collect()
    }

    fn success_join(&self, member_id: &str, with_members: bool, leader: String) -> JoinResult {
        JoinResult {
            error: 0,
            member_id: member_id.to_owned(),
            generation_id: self.generation,
            protocol_type: self.protocol_type.clone(),
            protocol_name: self.protocol_name.clone(),
            leader,
            skip_assignment: false,
            members: if with_members {
                self.current_member_metadata()
            } else {
                Vec::new()
            },
        }
    }

    // ---- JoinGroup -------------------------------------------------------

    pub(crate) fn join(
        &mut self,
        p: JoinParams,
        new_member_id: impl FnOnce(&str) -> String,
        now: Instant,
        cfg: &GroupConfig,
    ) -> Outcome<JoinResult> {
        if self.kind == GroupKind::Consumer {
            if !self.consumer.is_empty() {
                return Outcome::Now(JoinResult::error(
                    &p.member_id,
                    ErrorCode::InconsistentGroupProtocol,
                ));
            }
            self.kind = GroupKind::Classic;
        }
        let out = if p.member_id.is_empty() {
            self.join_new_member(p, new_member_id, now, cfg)
        } else {
            self.join_current_member(p, now, cfg)
        };
        if self.state == GroupState::PreparingRebalance {
            self.try_complete_join(now);
        }
        out
    }

    fn join_new_member(
        &mut self,
        p: JoinParams,
        new_member_id: impl FnOnce(&str) -> String,
        now: Instant,
        cfg: &GroupConfig,
    ) -> Outcome<JoinResult> {
        if self.state == GroupState::Dead {
            return Outcome::Now(JoinResult::error("", ErrorCode::CoordinatorNotAvailable));
        }
        if !self.supports_protocols(&p.protocol_type, &p.protocols) {
            return Outcome::Now(JoinResult::error("", ErrorCode::InconsistentGroupProtocol));
        }
        let prefix = p.instance_id.as_deref().unwrap_or(&p.client_id);
        let new_id = new_member_id(prefix);
        if let Some(instance) = p.instance_id.clone() {
            match self.static_members.get(&instance).cloned() {
                Some(old_id) => {
                    tracing::info!(group = %self.id, %instance, %old_id, %new_id,
                        "static member rejoins with a new member id; replacing the old one");
                    self.update_static_member_and_rebalance(&old_id, new_id, &instance, p, now, cfg)
                }
                None => self.add_member_and_rebalance(new_id, p, now, cfg),
            }
        } else if p.require_known_member_id {
            // Kafka answers MEMBER_ID_REQUIRED and remembers the id for one
            // session timeout; the client rejoins with it.
            let ms = u64::try_from(p.session_timeout_ms).unwrap_or(0);
            self.pending_members
                .insert(new_id.clone(), now + Duration::from_millis(ms));
            Outcome::Now(JoinResult::error(&new_id, ErrorCode::MemberIdRequired))
        } else {
            self.add_member_and_rebalance(new_id, p, now, cfg)
        }
    }

    fn join_current_member(
        &mut self,
        p: JoinParams,
        now: Instant,
        cfg: &GroupConfig,
    ) -> Outcome<JoinResult> {
        let member_id = p.member_id.clone();
        if self.state == GroupState::Dead {
            return Outcome::Now(JoinResult::error(
                &member_id,
                ErrorCode::CoordinatorNotAvailable,
            ));
        }
        if !self.supports_protocols(&p.protocol_type, &p.protocols) {
            return Outcome::Now(JoinResult::error(
                &member_id,
                ErrorCode::InconsistentGroupProtocol,
            ));
        }
        if self.pending_members.contains_key(&member_id) {
            // The second JoinGroup of a v4+ dynamic member. (A pending member
            // is never static: static members skip MEMBER_ID_REQUIRED.)
            let mut p = p;
            p.instance_id = None;
            return self.add_member_and_rebalance(member_id, p, now, cfg);
        }
        let instance = p.instance_id.as_deref();
        if self.is_static_member_fenced(instance, &member_id) {
            return Outcome::Now(JoinResult::error(&member_id, ErrorCode::FencedInstanceId));
        }
        let instance_unknown = instance.is_some_and(|i| !self.static_members.contains_key(i));
        if !self.members.contains_key(&member_id) || instance_unknown {
            return Outcome::Now(JoinResult::error(&member_id, ErrorCode::UnknownMemberId));
        }
        let matches = self
            .members
            .get(&member_id)
            .is_some_and(|m| m.matches(&p.protocols));
        match self.state {
            GroupState::PreparingRebalance => self.update_member_and_rebalance(p, now, cfg),
            GroupState::CompletingRebalance => {
                if matches {
                    // The member lost our JoinGroup answer; repeat it.
                    let leader = self.leader.clone().unwrap_or_default();
                    let is_leader = self.is_leader(&member_id);
                    Outcome::Now(self.success_join(&member_id, is_leader, leader))
                } else {
                    self.update_member_and_rebalance(p, now, cfg)
                }
            }
            GroupState::Stable => {
                if self.is_leader(&member_id) || !matches {
                    // A leader's JoinGroup always rebalances: it is how the
                    // leader reacts to metadata changes the others cannot see.
                    self.update_member_and_rebalance(p, now, cfg)
                } else {
                    let leader = self.leader.clone().unwrap_or_default();
                    Outcome::Now(self.success_join(&member_id, false, leader))
                }
            }
            GroupState::Empty | GroupState::Dead => {
                Outcome::Now(JoinResult::error(&member_id, ErrorCode::UnknownMemberId))
            }
        }
    }

    fn add_member_and_rebalance(
        &mut self,
        member_id: String,
        p: JoinParams,
        now: Instant,
        cfg: &GroupConfig,
    ) -> Outcome<JoinResult> {
        let (tx, rx) = oneshot::channel();
        let member = Member {
            id: member_id.clone(),
            instance_id: p.instance_id,
            client_id: p.client_id,
            client_host: p.client_host,
            rebalance_timeout_ms: p.rebalance_timeout_ms,
            session_timeout_ms: p.session_timeout_ms,
            protocols: p.protocols,
            assignment: Bytes::new(),
            join_waiter: Some(tx),
            sync_waiter: None,
            is_new: true,
            // A new member cannot heartbeat yet; its JoinGroup times out
            // after NEW_MEMBER_JOIN_TIMEOUT instead (Kafka does the same).
            deadline: Some(now + NEW_MEMBER_JOIN_TIMEOUT),
        };
        if self.state == GroupState::PreparingRebalance && self.generation == 0 {
            self.new_member_added = true;
        }
        if let Some(instance) = &member.instance_id {
            self.static_members
                .insert(instance.clone(), member_id.clone());
        }
        if self.members.is_empty() {
            self.protocol_type = Some(p.protocol_type);
        }
        if self.leader.is_none() {
            self.leader = Some(member_id.clone());
        }
        self.pending_members.remove(&member_id);
        self.members.insert(member_id, member);
        self.maybe_prepare_rebalance(now, cfg);
        Outcome::Wait(rx)
    }

    /// Records a rejoining member's protocols and timeouts and makes it wait
    /// for the join phase.
    fn update_member(
        &mut self,
        member_id: &str,
        p: JoinParams,
    ) -> Option<oneshot::Receiver<JoinResult>> {
        let member = self.members.get_mut(member_id)?;
        member.protocols = p.protocols;
        member.rebalance_timeout_ms = p.rebalance_timeout_ms;
        member.session_timeout_ms = p.session_timeout_ms;
        let (tx, rx) = oneshot::channel();
        // A superseded JoinGroup of the same member gets no answer of its
        // own; its receiver sees the sender dropped.
        member.join_waiter = Some(tx);
        Some(rx)
    }

    fn update_member_and_rebalance(
        &mut self,
        p: JoinParams,
        now: Instant,
        cfg: &GroupConfig,
    ) -> Outcome<JoinResult> {
        let member_id = p.member_id.clone();
        match self.update_member(&member_id, p) {
            Some(rx) => {
                self.maybe_prepare_rebalance(now, cfg);
                Outcome::Wait(rx)
            }
            None => Outcome::Now(JoinResult::error(&member_id, ErrorCode::UnknownMemberId)),
        }
    }

    /// Kafka's `replaceStaticMember`: the old member id is fenced and the
    /// member (with its assignment) continues under the new id.
    fn replace_static_member(&mut self, instance: &str, old_id: &str, new_id: &str) {
        let Some(mut member) = self.members.remove(old_id) else {
            return;
        };
        member.send_join(JoinResult::error(old_id, ErrorCode::FencedInstanceId));
        member.send_sync(SyncResult::error(ErrorCode::FencedInstanceId));
        member.id = new_id.to_owned();
        self.members.insert(new_id.to_owned(), member);
        if self.is_leader(old_id) {
            self.leader = Some(new_id.to_owned());
        }
        if self.pending_sync.remove(old_id) {
            self.pending_sync.insert(new_id.to_owned());
        }
        self.static_members
            .insert(instance.to_owned(), new_id.to_owned());
    }

    fn update_static_member_and_rebalance(
        &mut self,
        old_id: &str,
        new_id: String,
        instance: &str,
        mut p: JoinParams,
        now: Instant,
        cfg: &GroupConfig,
    ) -> Outcome<JoinResult> {
        let previous_leader = self.leader.clone().unwrap_or_default();
        self.replace_static_member(instance, old_id, &new_id);
        if let Some(m) = self.members.get_mut(&new_id) {
            m.reset_session(now);
            m.client_id = std::mem::take(&mut p.client_id);
            m.client_host = std::mem::take(&mut p.client_host);
        }
        let support_skip = p.support_skip_assignment;
        let Some(rx) = self.update_member(&new_id, p) else {
            return Outcome::Now(JoinResult::error(&new_id, ErrorCode::UnknownMemberId));
        };
        match self.state {
            GroupState::Stable => {
                // As Kafka: no rebalance unless the protocol the group would
                // choose changes. The member keeps its old assignment (the
                // subscription metadata of a restarted consumer differs only
                // in owned partitions and generation, which must not force a
                // rebalance — avoiding that is the point of static membership).
                if self.select_protocol() == self.protocol_name {
                    let is_leader = self.is_leader(&new_id);
                    let result = if support_skip {
                        let mut r = self.success_join(
                            &new_id,
                            is_leader,
                            self.leader.clone().unwrap_or_default(),
                        );
                        r.skip_assignment = is_leader;
                        r
                    } else {
                        // Before v9 the old leader id is returned so that a
                        // rejoining leader does not run an assignment that a
                        // Stable group would never distribute.
                        self.success_join(&new_id, false, previous_leader)
                    };
                    if let Some(m) = self.members.get_mut(&new_id) {
                        m.join_waiter = None;
                    }
                    Outcome::Now(result)
                } else {
                    self.maybe_prepare_rebalance(now, cfg);
                    Outcome::Wait(rx)
                }
            }
            GroupState::CompletingRebalance => {
                // The leader may be assigning for the old member id; start over.
                self.prepare_rebalance(now, cfg);
                Outcome::Wait(rx)
            }
            GroupState::PreparingRebalance => Outcome::Wait(rx),
            GroupState::Empty | GroupState::Dead => {
                if let Some(m) = self.members.get_mut(&new_id) {
                    m.join_waiter = None;
                }
                Outcome::Now(JoinResult::error(&new_id, ErrorCode::UnknownMemberId))
            }
        }
    }

    fn maybe_prepare_rebalance(&mut self, now: Instant, cfg: &GroupConfig) {
        if matches!(
            self.state,
            GroupState::Stable | GroupState::CompletingRebalance | GroupState::Empty
        ) {
            self.prepare_rebalance(now, cfg);
        }
    }

    fn prepare_rebalance(&mut self, now: Instant, cfg: &GroupConfig) {
        if self.state == GroupState::CompletingRebalance {
            self.reset_and_propagate_assignment_error(ErrorCode::RebalanceInProgress, now);
        }
        self.sync_deadline = None;
        let rebalance_ms = self.rebalance_timeout_ms();
        self.join_timer = Some(if self.state == GroupState::Empty {
            let delay = cfg.initial_rebalance_delay_ms;
            JoinTimer {
                deadline: now + Duration::from_millis(delay),
                initial: Some((delay, rebalance_ms.saturating_sub(delay))),
            }
        } else {
            JoinTimer {
                deadline: now + Duration::from_millis(rebalance_ms),
                initial: None,
            }
        });
        tracing::info!(group = %self.id, generation = self.generation, from = self.state.as_str(),
            "preparing to rebalance");
        self.state = GroupState::PreparingRebalance;
        self.try_complete_join(now);
    }

    fn has_all_members_joined(&self) -> bool {
        self.pending_members.is_empty() && self.members.values().all(Member::awaiting_join)
    }

    /// Completes the join phase early once everyone has rejoined (not
    /// during the initial delay, which always runs its course).
    fn try_complete_join(&mut self, now: Instant) {
        let normal = self.join_timer.is_some_and(|t| t.initial.is_none());
        if self.state == GroupState::PreparingRebalance && normal && self.has_all_members_joined() {
            self.complete_join(now);
        }
    }

    fn maybe_elect_new_joined_leader(&mut self) -> bool {
        let Some(leader) = self.leader.clone() else {
            return false;
        };
        if self.members.get(&leader).is_some_and(Member::awaiting_join) {
            return true;
        }
        match self.members.values().find(|m| m.awaiting_join()) {
            Some(m) => {
                self.leader = Some(m.id.clone());
                true
            }
            None => false,
        }
    }

    /// Kafka's `onCompleteJoin`.
    fn complete_join(&mut self, now: Instant) {
        self.join_timer = None;
        let gone: Vec<String> = self
            .members
            .values()
            .filter(|m| !m.awaiting_join() && m.instance_id.is_none())
            .map(|m| m.id.clone())
            .collect();
        if !gone.is_empty() {
            tracing::info!(group = %self.id, members = ?gone,
                "removing dynamic members that did not rejoin in time");
        }
        for id in &gone {
            self.remove_member(id);
        }
        if self.state == GroupState::Dead {
            return;
        }
        if !self.maybe_elect_new_joined_leader() && !self.members.is_empty() {
            // Nobody rejoined (only static members that went silent are
            // left): wait another rebalance timeout; their sessions expire.
            tracing::warn!(group = %self.id, "no member rejoined; extending the join phase");
            // (At least a second: a zero rebalance timeout must not spin.)
            self.join_timer = Some(JoinTimer {
                deadline: now + Duration::from_millis(self.rebalance_timeout_ms().max(1_000)),
                initial: None,
            });
            return;
        }
        self.init_next_generation(now);
        if self.state == GroupState::Empty {
            tracing::info!(group = %self.id, generation = self.generation,
                "group is empty after the rebalance");
            return;
        }
        tracing::info!(group = %self.id, generation = self.generation,
            protocol = ?self.protocol_name, members = self.members.len(), "rebalance joined");
        let leader = self.leader.clone().unwrap_or_default();
        let leader_view = self.current_member_metadata();
        let ids: Vec<String> = self.members.keys().cloned().collect();
        for id in ids {
            let is_leader = id == leader;
            let result = JoinResult {
                error: 0,
                member_id: id.clone(),
                generation_id: self.generation,
                protocol_type: self.protocol_type.clone(),
                protocol_name: self.protocol_name.clone(),
                leader: leader.clone(),
                skip_assignment: false,
                members: if is_leader {
                    leader_view.clone()
                } else {
                    Vec::new()
                },
            };
            if let Some(m) = self.members.get_mut(&id) {
                m.send_join(result);
                m.reset_session(now);
                m.is_new = false;
            }
            self.pending_sync.insert(id);
        }
        self.sync_deadline = Some((
            now + Duration::from_millis(self.rebalance_timeout_ms()),
            self.generation,
        ));
    }

    fn init_next_generation(&mut self, now: Instant) {
        self.generation += 1;
        if self.members.is_empty() {
            self.protocol_name = None;
            self.state = GroupState::Empty;
            self.empty_since = now;
        } else {
            self.protocol_name = self.select_protocol();
            self.state = GroupState::CompletingRebalance;
        }
        self.pending_sync.clear();
    }

    /// Kafka's `GroupMetadata.remove`.
    fn remove_member(&mut self, member_id: &str) -> Option<Member> {
        let member = self.members.remove(member_id);
        if let Some(instance) = member.as_ref().and_then(|m| m.instance_id.as_ref()) {
            if self.static_members.get(instance).map(String::as_str) == Some(member_id) {
                self.static_members.remove(instance);
            }
        }
        if self.is_leader(member_id) {
            self.leader = self.members.keys().next().cloned();
        }
        self.pending_members.remove(member_id);
        self.pending_sync.remove(member_id);
        if self.pending_sync.is_empty() {
            self.sync_deadline = None;
        }
        member
    }

    /// Kafka's `removeMemberAndUpdateGroup`.
    pub(crate) fn remove_member_and_update(
        &mut self,
        member_id: &str,
        now: Instant,
        cfg: &GroupConfig,
    ) {
        if let Some(mut m) = self.remove_member(member_id) {
            m.send_join(JoinResult::error("", ErrorCode::UnknownMemberId));
            m.send_sync(SyncResult::error(ErrorCode::UnknownMemberId));
        }
        match self.state {
            GroupState::Dead | GroupState::Empty => {}
            GroupState::Stable | GroupState::CompletingRebalance => {
                self.maybe_prepare_rebalance(now, cfg)
            }
            GroupState::PreparingRebalance => self.try_complete_join(now),
        }
    }

    fn remove_pending_member(&mut self, member_id: &str, now: Instant) {
        self.pending_members.remove(member_id);
        if self.state == GroupState::PreparingRebalance {
            self.try_complete_join(now);
        }
    }

    /// Answers every waiting SyncGroup: assignments with `None`, else the error.
    fn propagate_assignment(&mut self, error: Option<ErrorCode>, now: Instant) {
        let (ptype, pname) = match error {
            None => (self.protocol_type.clone(), self.protocol_name.clone()),
            Some(_) => (None, None),
        };
        for m in self.members.values_mut() {
            let result = SyncResult {
                error: error.map_or(0, |e| e.code()),
                protocol_type: ptype.clone(),
                protocol_name: pname.clone(),
                assignment: m.assignment.clone(),
            };
            if m.send_sync(result) {
                // A session may have run out while the member waited for the
                // leader; it starts afresh now that it has an answer.
                m.reset_session(now);
            }
        }
    }

    fn reset_and_propagate_assignment_error(&mut self, error: ErrorCode, now: Instant) {
        for m in self.members.values_mut() {
            m.assignment = Bytes::new();
        }
        self.propagate_assignment(Some(error), now);
    }

    // ---- SyncGroup -------------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn sync(
        &mut self,
        generation: i32,
        member_id: &str,
        instance_id: Option<&str>,
        protocol_type: Option<&str>,
        protocol_name: Option<&str>,
        assignments: Vec<(String, Bytes)>,
        now: Instant,
    ) -> Outcome<SyncResult> {
        if self.state == GroupState::Dead {
            return Outcome::Now(SyncResult::error(ErrorCode::CoordinatorNotAvailable));
        }
        if let Err(e) = self.validate_current_member(member_id, instance_id) {
            return Outcome::Now(SyncResult::error(e));
        }
        if generation != self.generation {
            return Outcome::Now(SyncResult::error(ErrorCode::IllegalGeneration));
        }
        if protocol_type.is_some_and(|t| self.protocol_type.as_deref() != Some(t))
            || protocol_name.is_some_and(|n| self.protocol_name.as_deref() != Some(n))
        {
            return Outcome::Now(SyncResult::error(ErrorCode::InconsistentGroupProtocol));
        }
        match self.state {
            GroupState::Empty | GroupState::Dead => {
                Outcome::Now(SyncResult::error(ErrorCode::UnknownMemberId))
            }
            GroupState::PreparingRebalance => {
                Outcome::Now(SyncResult::error(ErrorCode::RebalanceInProgress))
            }
            GroupState::CompletingRebalance => {
                let (tx, rx) = oneshot::channel();
                if let Some(m) = self.members.get_mut(member_id) {
                    m.sync_waiter = Some(tx);
                }
                self.remove_pending_sync(member_id);
                if self.is_leader(member_id) {
                    tracing::info!(group = %self.id, generation = self.generation,
                        leader = member_id, members = self.members.len(),
                        "assignment received from the leader");
                    let mut by_member: HashMap<String, Bytes> = assignments.into_iter().collect();
                    for m in self.members.values_mut() {
                        // Members the leader left out get an empty assignment,
                        // as in Kafka; entries for unknown members are ignored.
                        m.assignment = by_member.remove(&m.id).unwrap_or_default();
                    }
                    self.propagate_assignment(None, now);
                    self.state = GroupState::Stable;
                }
                Outcome::Wait(rx)
            }
            GroupState::Stable => {
                self.remove_pending_sync(member_id);
                let ptype = self.protocol_type.clone();
                let pname = self.protocol_name.clone();
                match self.members.get_mut(member_id) {
                    Some(m) => {
                        m.reset_session(now);
                        Outcome::Now(SyncResult {
                            error: 0,
                            protocol_type: ptype,
                            protocol_name: pname,
                            assignment: m.assignment.clone(),
                        })
                    }
                    None => Outcome::Now(SyncResult::error(ErrorCode::UnknownMemberId)),
                }
            }
        }
    }

    fn remove_pending_sync(&mut self, member_id: &str) {
        self.pending_sync.remove(member_id);
        if self.pending_sync.is_empty() {
            self.sync_deadline = None;
        }
    }

    // ---- Heartbeat, LeaveGroup ------------------------------------------

    pub(crate) fn heartbeat(
        &mut self,
        generation: i32,
        member_id: &str,
        instance_id: Option<&str>,
        now: Instant,
    ) -> Result<(), ErrorCode> {
        if self.state == GroupState::Dead {
            return Err(ErrorCode::CoordinatorNotAvailable);
        }
        self.validate_current_member(member_id, instance_id)?;
        if generation != self.generation {
            return Err(ErrorCode::IllegalGeneration);
        }
        let state = self.state;
        let member = self
            .members
            .get_mut(member_id)
            .ok_or(ErrorCode::UnknownMemberId)?;
        match state {
            GroupState::Empty | GroupState::Dead => Err(ErrorCode::UnknownMemberId),
            GroupState::PreparingRebalance => {
                member.reset_session(now);
                Err(ErrorCode::RebalanceInProgress)
            }
            GroupState::CompletingRebalance | GroupState::Stable => {
                member.reset_session(now);
                Ok(())
            }
        }
    }

    /// One member of a LeaveGroup; Kafka's per-member logic.
    pub(crate) fn leave(
        &mut self,
        member_id: &str,
        instance_id: Option<&str>,
        now: Instant,
        cfg: &GroupConfig,
    ) -> Result<(), ErrorCode> {
        if member_id.is_empty() {
            // Administrative removal by group instance id.
            let current = instance_id
                .and_then(|i| self.static_members.get(i))
                .cloned();
            return match current {
                Some(id) => {
                    tracing::info!(group = %self.id, member = %id, "static member removed by LeaveGroup");
                    self.remove_member_and_update(&id, now, cfg);
                    Ok(())
                }
                None => Err(ErrorCode::UnknownMemberId),
            };
        }
        if self.pending_members.contains_key(member_id) {
            self.remove_pending_member(member_id, now);
            return Ok(());
        }
        self.validate_current_member(member_id, instance_id)?;
        tracing::info!(group = %self.id, member = member_id, "member left the group");
        self.remove_member_and_update(member_id, now, cfg);
        Ok(())
    }

    /// Kafka's `validateOffsetCommit`.
    pub(crate) fn validate_offset_commit(
        &self,
        generation: i32,
        member_id: &str,
        instance_id: Option<&str>,
        api: CommitApi,
    ) -> Result<(), ErrorCode> {
        if self.state == GroupState::Dead {
            return Err(ErrorCode::CoordinatorNotAvailable);
        }
        if self.kind == GroupKind::Consumer {
            let checked = self.consumer.validate_commit(member_id, generation);
            return match (checked, api) {
                // Kafka's transactional commits say ILLEGAL_GENERATION (a
                // producer aborts on it), and OffsetCommit before v9 has no
                // member epoch to be stale.
                (Err(ErrorCode::StaleMemberEpoch), CommitApi::Transactional) => {
                    Err(ErrorCode::IllegalGeneration)
                }
                (Ok(()), CommitApi::OffsetCommit(v)) if v < 9 && !self.consumer.is_empty() => {
                    Err(ErrorCode::UnsupportedVersion)
                }
                (Err(ErrorCode::StaleMemberEpoch), CommitApi::OffsetCommit(v)) if v < 9 => {
                    Err(ErrorCode::UnsupportedVersion)
                }
                (r, _) => r,
            };
        }
        if generation >= 0 || !member_id.is_empty() || instance_id.is_some() {
            self.validate_current_member(member_id, instance_id)?;
            if generation != self.generation {
                return Err(ErrorCode::IllegalGeneration);
            }
        } else if self.state != GroupState::Empty {
            // Only members may commit for a group with members.
            return Err(ErrorCode::UnknownMemberId);
        }
        match self.state {
            GroupState::Empty => Ok(()),
            // Kafka accepts commits while preparing a rebalance: the member
            // learns of the rebalance from its next heartbeat.
            GroupState::Stable | GroupState::PreparingRebalance => Ok(()),
            GroupState::CompletingRebalance => Err(ErrorCode::RebalanceInProgress),
            GroupState::Dead => Err(ErrorCode::CoordinatorNotAvailable),
        }
    }

    /// A successful commit counts as a heartbeat of a classic member
    /// (Kafka resets its session); a consumer-protocol member's session
    /// runs on its heartbeats alone.
    pub(crate) fn commit_heartbeat(&mut self, member_id: &str, now: Instant) {
        if let Some(m) = self.members.get_mut(member_id) {
            m.reset_session(now);
        }
    }

    /// A ConsumerGroupHeartbeat: an empty classic group becomes a consumer
    /// group; one with classic members is not one (Kafka's answer when its
    /// migration between protocols does not apply).
    pub(crate) fn consumer_heartbeat(
        &mut self,
        hb: Heartbeat,
        now: Instant,
        cfg: &GroupConfig,
        catalog: &dyn TopicCatalog,
    ) -> Result<HeartbeatAnswer, Refusal> {
        if self.kind == GroupKind::Classic {
            if self.state != GroupState::Empty || !self.members.is_empty() {
                return Err((
                    ErrorCode::GroupIdNotFound,
                    format!("Group {} is not a consumer group.", self.id),
                ));
            }
            if hb.member_epoch != 0 {
                return Err((
                    ErrorCode::UnknownMemberId,
                    format!(
                        "Member {} is not a member of group {}.",
                        hb.member_id, self.id
                    ),
                ));
            }
            self.kind = GroupKind::Consumer;
        }
        let answer = self.consumer.heartbeat(&self.id, hb, now, cfg, catalog);
        if self.consumer.is_empty() && answer.is_err() {
            // A refused first member leaves the group as it was.
            self.kind = GroupKind::Classic;
        }
        if self.consumer.is_empty() {
            self.empty_since = now;
        }
        answer
    }

    /// Whether members of either protocol belong to the group.
    pub(crate) fn has_members(&self) -> bool {
        self.state != GroupState::Empty || !self.consumer.is_empty()
    }

    /// The state ListGroups and DescribeGroups report, by protocol.
    pub(crate) fn state_name(&self) -> &'static str {
        match self.kind {
            GroupKind::Consumer if self.state != GroupState::Dead => self.consumer.state(),
            _ => self.state.as_str(),
        }
    }

    // ---- timers ----------------------------------------------------------

    fn empty_and_idle(&self) -> bool {
        self.state == GroupState::Empty
            && self.consumer.is_empty()
            && self.members.is_empty()
            && self.pending_members.is_empty()
            && self.offsets.is_empty()
            && self.inflight.is_empty()
    }

    /// The earliest instant a timer of this group fires, if any.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let members = self.members.values().filter_map(|m| m.deadline);
        let pending = self.pending_members.values().copied();
        let join = self.join_timer.map(|t| t.deadline);
        let sync = self.sync_deadline.map(|(d, _)| d);
        let idle = self
            .empty_and_idle()
            .then_some(self.empty_since + EMPTY_GROUP_TTL);
        let consumer = self.consumer.next_deadline();
        members
            .chain(consumer)
            .chain(pending)
            .chain(join)
            .chain(sync)
            .chain(idle)
            .min()
    }

    /// Runs every timer due at `now`. Returns true when the group is idle
    /// long enough to be forgotten (the caller marks it Dead and drops it).
    pub(crate) fn fire_timers(&mut self, now: Instant, cfg: &GroupConfig) -> bool {
        // Join phase.
        if let Some(timer) = self.join_timer {
            if timer.deadline <= now && self.state == GroupState::PreparingRebalance {
                match timer.initial {
                    Some((delay, remaining)) if self.new_member_added && remaining > 0 => {
                        // Kafka's InitialDelayedJoin: someone joined during
                        // the delay, so wait again (bounded by the rebalance timeout).
                        self.new_member_added = false;
                        let next = cfg.initial_rebalance_delay_ms.min(remaining);
                        let left = remaining.saturating_sub(delay);
                        self.join_timer = Some(JoinTimer {
                            deadline: now + Duration::from_millis(next),
                            initial: Some((next, left)),
                        });
                    }
                    _ => self.complete_join(now),
                }
            } else if self.state != GroupState::PreparingRebalance {
                self.join_timer = None;
            }
        }

        // Member sessions (Kafka's heartbeat expiration).
        let expired: Vec<String> = self
            .members
            .values_mut()
            .filter_map(|m| {
                let due = m.deadline.is_some_and(|d| d <= now);
                if !due {
                    None
                } else if !m.is_new && (m.awaiting_join() || m.awaiting_sync()) {
                    // A member waiting on the rebalance needs no heartbeat;
                    // the join/sync timers bound its wait instead.
                    m.deadline = None;
                    None
                } else {
                    Some(m.id.clone())
                }
            })
            .collect();
        for id in expired {
            tracing::info!(group = %self.id, member = %id, "session expired; removing member");
            self.remove_member_and_update(&id, now, cfg);
        }

        // Consumer-protocol members out of session or past their revocation time.
        if !self.consumer.is_empty() {
            self.consumer.fire_timers(&self.id, now);
            if self.consumer.is_empty() {
                self.empty_since = now;
            }
        }

        // Member ids handed out with MEMBER_ID_REQUIRED and never used.
        let stale: Vec<String> = self
            .pending_members
            .iter()
            .filter(|(_, d)| **d <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            tracing::debug!(group = %self.id, member = %id, "pending member expired");
            self.remove_pending_member(&id, now);
        }

        // Members that got their JoinGroup answer but never synced.
        if let Some((deadline, generation)) = self.sync_deadline {
            if deadline <= now {
                self.sync_deadline = None;
                let in_sync_phase = matches!(
                    self.state,
                    GroupState::CompletingRebalance | GroupState::Stable
                );
                if generation == self.generation && in_sync_phase && !self.pending_sync.is_empty() {
                    let missing: Vec<String> = self.pending_sync.iter().cloned().collect();
                    tracing::info!(group = %self.id, members = ?missing,
                        "removing members that did not sync in time");
                    for id in &missing {
                        if let Some(mut m) = self.remove_member(id) {
                            m.send_join(JoinResult::error("", ErrorCode::UnknownMemberId));
                        }
                    }
                    self.prepare_rebalance(now, cfg);
                }
            }
        }

        self.empty_and_idle() && self.empty_since + EMPTY_GROUP_TTL <= now
    }
}

#[cfg(test)]
mod tests {
    use super::{subscription_topics, Committed, Group};
    use bytes::Bytes;
    use kafka_protocol::messages::ConsumerProtocolSubscription;
    use kafka_protocol::protocol::{Encodable, StrBytes};

    fn encoded(version: i16) -> Vec<u8> {
        let mut sub = ConsumerProtocolSubscription::default();
        sub.topics = vec![
            StrBytes::from_static_str("a"),
            StrBytes::from_static_str("b"),
        ];
        let mut buf = bytes::BytesMut::new();
        buf.extend_from_slice(&version.to_be_bytes());
        sub.encode(&mut buf, version.min(3)).unwrap();
        buf.to_vec()
    }

    #[test]
    fn subscriptions_of_every_version_are_read_and_garbage_is_not() {
        for v in 0..=3 {
            let topics = subscription_topics(&Bytes::from(encoded(v)));
            assert_eq!(topics, Some(vec!["a".into(), "b".into()]), "v{v}");
        }
        // A newer version only adds fields: read as the newest known.
        assert!(subscription_topics(&Bytes::from(encoded(9))).is_some());
        let whole = encoded(1);
        // Cut within the version, the topics or the user data's length.
        for cut in 0..encoded(0).len() {
            assert_eq!(
                subscription_topics(&Bytes::copy_from_slice(&whole[..cut])),
                None
            );
        }
        // Arbitrary bytes never panic (a deterministic sweep of mutations).
        let mut x = 0x2545_f491_u32;
        for _ in 0..20_000 {
            let mut bytes = whole.clone();
            for _ in 0..3 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let at = x as usize % bytes.len();
                bytes[at] = (x >> 8) as u8;
            }
            let _ = subscription_topics(&Bytes::from(bytes));
        }
        assert_eq!(
            subscription_topics(&Bytes::from_static(&[0xff, 0xff, 0, 0])),
            None
        );
    }

    fn at(log_offset: i64) -> Committed {
        Committed {
            offset: log_offset * 10,
            leader_epoch: -1,
            metadata: String::new(),
            log_offset,
        }
    }

    #[test]
    fn a_commit_written_before_an_offset_delete_does_not_bring_the_offset_back() {
        let mut g = Group::new("g".into(), tokio::time::Instant::now());
        let tp = ("t".to_owned(), 0);
        g.commit_appended(tp.clone(), at(5));
        g.commit_appended(tp.clone(), at(6));
        // OffsetDelete's tombstones end at 8, after both commits.
        g.forget_offsets(std::slice::from_ref(&tp), 8);
        g.commit_settled(tp.clone(), Some(at(5)));
        g.commit_settled(tp.clone(), Some(at(6)));
        assert!(
            !g.offsets.contains_key(&tp),
            "a settled commit undid the delete"
        );
        // A commit written after the tombstones counts again.
        g.commit_appended(tp.clone(), at(9));
        g.commit_settled(tp.clone(), Some(at(9)));
        assert_eq!(g.offsets.get(&tp).map(|c| c.offset), Some(90));
    }
}

//! The consumer group protocol (KIP-848): ConsumerGroupHeartbeat's state
//! machine for one group, run under the group's mutex like the classic one.
//!
//! - The **group epoch** moves whenever what the assignment depends on
//!   changes: a member joins, leaves or is fenced, a subscription or an
//!   assignor preference changes, a subscribed topic gains partitions or
//!   comes or goes. The coordinator then computes a **target assignment**
//!   with a server-side assignor ([`crate::assignor`]) and stamps it with
//!   that epoch (the **assignment epoch**).
//! - Each member **reconciles** towards its target in steps its heartbeats
//!   drive (Kafka's `CurrentAssignmentBuilder`): partitions it must give up
//!   are revoked first, the member keeping its epoch
//!   (UNREVOKED_PARTITIONS) until a heartbeat shows it no longer owns them;
//!   then it moves to the assignment epoch and gets the new partitions
//!   whose previous owner released them, waiting for the others
//!   (UNRELEASED_PARTITIONS). So no partition is ever owned by two members.
//! - A heartbeat from an epoch the member is no longer at is fenced
//!   (FENCED_MEMBER_EPOCH); a commit must carry the member's current epoch
//!   (STALE_MEMBER_EPOCH otherwise).
//! - A member that misses its session is removed; one that keeps
//!   partitions past its rebalance timeout after being asked to revoke them
//!   is fenced. A static member (`InstanceId`) that leaves with epoch -2
//!   keeps its assignment for a session, so its restart moves nothing.
//!
//! Membership is not persisted (as for classic groups here): after a
//! coordinator change members get UNKNOWN_MEMBER_ID and join again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use regex::Regex;
use sluice_vocab::ErrorCode;
use tokio::time::Instant;

use crate::assignor::{self, AssignorMember};
use crate::{GroupConfig, TopicCatalog, TopicInfo};

/// Topic ids as the protocol carries them. Assignments are kept by id, as
/// Kafka keeps them: a topic deleted and created again under its name is
/// another topic, and what a member reports it owns is compared id for id.
pub(crate) type TopicId = [u8; 16];

/// Partitions by topic id.
pub(crate) type Assignment = assignor::Assignment<TopicId>;

/// The member epoch of a member that leaves for good.
pub(crate) const LEAVE_EPOCH: i32 = -1;
/// The member epoch of a static member that leaves for a restart.
pub(crate) const STATIC_LEAVE_EPOCH: i32 = -2;

/// Longest subscription regex accepted, in bytes.
const MAX_REGEX_LEN: usize = 4096;
/// Compiled subscription regexes kept at most.
const MAX_CACHED_REGEXES: usize = 1024;
/// Regex subscriptions are matched against the topics at most this often
/// (and whenever a subscription changes): the metadata image moves with
/// every quorum entry, and a heartbeat must stay cheap.
const REGEX_REFRESH: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MemberState {
    Stable,
    UnrevokedPartitions,
    UnreleasedPartitions,
}

pub(crate) struct ConsumerMember {
    pub id: String,
    pub instance_id: Option<String>,
    pub rack_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub rebalance_timeout_ms: i32,
    pub subscribed_names: BTreeSet<String>,
    pub subscribed_regex: Option<String>,
    pub server_assignor: Option<String>,
    pub member_epoch: i32,
    pub previous_member_epoch: i32,
    pub state: MemberState,
    /// What the member owns now.
    pub assigned: Assignment,
    /// What it was asked to give up and has not confirmed yet.
    pub pending_revocation: Assignment,
    session_deadline: Instant,
    revocation_deadline: Option<Instant>,
}

/// A ConsumerGroupHeartbeat as the state machine sees it: the request's
/// nullable fields stay `None` when the member did not send them.
pub(crate) struct Heartbeat {
    pub member_id: String,
    pub member_epoch: i32,
    pub instance_id: Option<String>,
    pub rack_id: Option<String>,
    pub rebalance_timeout_ms: i32,
    pub subscribed_names: Option<Vec<String>>,
    pub subscribed_regex: Option<String>,
    pub server_assignor: Option<String>,
    /// What the member says it owns.
    pub owned: Option<Vec<(TopicId, Vec<i32>)>>,
    pub client_id: String,
    pub client_host: String,
}

/// A heartbeat's answer.
#[derive(Debug)]
pub(crate) struct HeartbeatAnswer {
    pub member_id: String,
    pub member_epoch: i32,
    pub heartbeat_interval_ms: i32,
    /// Sent when it changed, and on a join or a full request.
    pub assignment: Option<Vec<(TopicId, Vec<i32>)>>,
}

/// Why a heartbeat is refused.
pub(crate) type Refusal = (ErrorCode, String);

#[derive(Default)]
pub(crate) struct ConsumerGroup {
    pub group_epoch: i32,
    pub assignment_epoch: i32,
    pub members: BTreeMap<String, ConsumerMember>,
    /// Instance id -> member id.
    static_members: HashMap<String, String>,
    /// The target assignment of every member, as of `assignment_epoch`.
    pub target: BTreeMap<String, Assignment>,
    /// Who owns each partition (assigned or pending revocation).
    owners: HashMap<(TopicId, i32), String>,
    /// The subscribed topics that exist, by name, as last resolved.
    pub topics: BTreeMap<String, TopicInfo>,
    /// Names of the topics in `topics`, by id.
    names: HashMap<TopicId, String>,
    /// Topics each subscribed regex matched when last resolved.
    regex_matches: BTreeMap<String, BTreeSet<String>>,
    /// Compiled subscription regexes.
    regexes: HashMap<String, Regex>,
    /// The catalog version `topics` was resolved at, and when.
    resolved_at: Option<(u64, Instant)>,
    /// The assignor of the last target assignment.
    pub assignor: String,
}

impl ConsumerMember {
    fn new(id: String, now: Instant, session: Duration) -> ConsumerMember {
        ConsumerMember {
            id,
            instance_id: None,
            rack_id: None,
            client_id: String::new(),
            client_host: String::new(),
            rebalance_timeout_ms: 0,
            subscribed_names: BTreeSet::new(),
            subscribed_regex: None,
            server_assignor: None,
            member_epoch: 0,
            previous_member_epoch: -1,
            state: MemberState::Stable,
            assigned: Assignment::new(),
            pending_revocation: Assignment::new(),
            session_deadline: now + session,
            revocation_deadline: None,
        }
    }

    /// Kafka's `updateMemberEpoch`: the epoch it had becomes the previous.
    fn set_epoch(&mut self, epoch: i32) {
        self.previous_member_epoch = self.member_epoch;
        self.member_epoch = epoch;
    }

    /// A static member that left with epoch -2 and may come back.
    fn left_for_restart(&self) -> bool {
        self.member_epoch == STATIC_LEAVE_EPOCH
    }
}

/// A heartbeat naming another instance id than its member's is fenced; a
/// null instance id means "unchanged".
fn check_instance(hb: &Heartbeat, m: &ConsumerMember) -> Result<(), Refusal> {
    if hb.instance_id.is_some() && hb.instance_id != m.instance_id {
        return Err((
            ErrorCode::FencedInstanceId,
            format!("Member {} has another instance id.", hb.member_id),
        ));
    }
    Ok(())
}

fn to_assignment(owned: &[(TopicId, Vec<i32>)]) -> Assignment {
    let mut out = Assignment::new();
    for (id, parts) in owned {
        out.entry(*id).or_default().extend(parts.iter().copied());
    }
    out
}

fn to_wire(a: &Assignment) -> Vec<(TopicId, Vec<i32>)> {
    a.iter()
        .filter(|(_, parts)| !parts.is_empty())
        .map(|(id, parts)| (*id, parts.iter().copied().collect()))
        .collect()
}

/// Whether the member still holds any of `revoking` (not knowing what it
/// owns counts as holding).
fn owns_any(owned: Option<&Assignment>, revoking: &Assignment) -> bool {
    let Some(owned) = owned else {
        return true;
    };
    revoking
        .iter()
        .any(|(topic, parts)| owned.get(topic).is_some_and(|o| !o.is_disjoint(parts)))
}

/// Kafka's `isSubset`: a member that did not say what it owns is not
/// known to own a subset.
fn is_subset(a: Option<&Assignment>, b: &Assignment) -> bool {
    a.is_some_and(|a| {
        a.iter()
            .all(|(t, parts)| parts.is_empty() || b.get(t).is_some_and(|bp| parts.is_subset(bp)))
    })
}

/// A subscription regex as Kafka matches it: against the whole topic name.
/// Checked alone first, so that no pattern can escape the anchoring.
fn compile(regex: &str) -> Result<Regex, Refusal> {
    let refuse = |e: String| {
        (
            ErrorCode::InvalidRegularExpression,
            format!("SubscribedTopicRegex `{regex}` is not a valid regular expression: {e}"),
        )
    };
    if regex.len() > MAX_REGEX_LEN {
        return Err(refuse(format!("longer than {MAX_REGEX_LEN} bytes")));
    }
    let limited = |pattern: &str| {
        regex::RegexBuilder::new(pattern)
            .size_limit(1 << 20)
            .build()
            .map_err(|e| refuse(e.to_string()))
    };
    limited(regex)?;
    limited(&format!("^(?:{regex})$"))
}

impl ConsumerGroup {
    pub(crate) fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Kafka's names: Empty, Assigning, Reconciling, Stable.
    pub(crate) fn state(&self) -> &'static str {
        if self.members.is_empty() {
            "Empty"
        } else if self.group_epoch > self.assignment_epoch {
            "Assigning"
        } else if self
            .members
            .values()
            .any(|m| m.member_epoch != self.assignment_epoch || m.state != MemberState::Stable)
        {
            "Reconciling"
        } else {
            "Stable"
        }
    }

    /// The topics every subscription names that exist (for OffsetDelete's
    /// GROUP_SUBSCRIBED_TO_TOPIC).
    pub(crate) fn subscribed_topics(&self) -> BTreeSet<String> {
        self.members
            .values()
            .flat_map(|m| self.member_topic_names(m))
            .map(str::to_owned)
            .collect()
    }

    fn member_topic_names<'a>(&'a self, m: &'a ConsumerMember) -> BTreeSet<&'a str> {
        let by_regex = m
            .subscribed_regex
            .as_ref()
            .and_then(|r| self.regex_matches.get(r))
            .into_iter()
            .flatten();
        m.subscribed_names
            .iter()
            .chain(by_regex)
            .filter(|t| self.topics.contains_key(*t))
            .map(String::as_str)
            .collect()
    }

    /// The name of a subscribed topic.
    pub(crate) fn topic_name(&self, id: &TopicId) -> Option<&str> {
        self.names.get(id).map(String::as_str)
    }

    fn bump(&mut self) {
        self.group_epoch += 1;
    }

    fn release(&mut self, member_id: &str, a: &Assignment) {
        for (t, parts) in a {
            for &p in parts {
                let key = (*t, p);
                if self.owners.get(&key).is_some_and(|o| o == member_id) {
                    self.owners.remove(&key);
                }
            }
        }
    }

    fn claim(&mut self, member_id: &str, a: &Assignment) {
        for (t, parts) in a {
            for &p in parts {
                self.owners.insert((*t, p), member_id.to_owned());
            }
        }
    }

    /// Removes a member and frees what it owned; the group epoch moves.
    pub(crate) fn remove_member(&mut self, member_id: &str, why: &str, group: &str) {
        let Some(m) = self.members.remove(member_id) else {
            return;
        };
        self.release(member_id, &m.assigned);
        self.release(member_id, &m.pending_revocation);
        if let Some(instance) = &m.instance_id {
            if self
                .static_members
                .get(instance)
                .is_some_and(|id| id == member_id)
            {
                self.static_members.remove(instance);
            }
        }
        self.target.remove(member_id);
        self.bump();
        tracing::info!(
            group,
            member = member_id,
            why,
            epoch = self.group_epoch,
            "consumer group member removed"
        );
    }

    /// Re-reads the subscribed topics from the catalog when the
    /// subscriptions changed, or when the catalog did (regexes at most every
    /// `REGEX_REFRESH`); the group epoch moves when what they resolve to
    /// does.
    fn resolve_topics(&mut self, catalog: &dyn TopicCatalog, force: bool, now: Instant) {
        let version = catalog.version();
        let regexes: BTreeSet<String> = self
            .members
            .values()
            .filter_map(|m| m.subscribed_regex.clone())
            .collect();
        match self.resolved_at {
            _ if force => {}
            Some((v, _)) if v == version => return,
            Some((_, at)) if !regexes.is_empty() && now < at + REGEX_REFRESH => return,
            _ => {}
        }
        self.resolved_at = Some((version, now));
        self.regexes.retain(|r, _| regexes.contains(r));
        let mut matches: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        if !regexes.is_empty() {
            let names = catalog.names();
            for r in regexes {
                let re = match self.regexes.get(&r) {
                    Some(re) => re,
                    None => {
                        // Validated when the member sent it.
                        let Ok(re) = compile(&r) else { continue };
                        self.regexes.entry(r.clone()).or_insert(re)
                    }
                };
                let hit = names.iter().filter(|n| re.is_match(n)).cloned().collect();
                matches.insert(r, hit);
            }
        }
        let wanted: BTreeSet<&String> = self
            .members
            .values()
            .flat_map(|m| m.subscribed_names.iter())
            .chain(matches.values().flatten())
            .collect();
        let topics: BTreeMap<String, TopicInfo> = wanted
            .into_iter()
            .filter_map(|t| catalog.topic(t).map(|info| (t.clone(), info)))
            .collect();
        if topics != self.topics || matches != self.regex_matches {
            // Names of topics no longer subscribed stay while a member
            // still holds their partitions (describe shows them).
            let held: BTreeSet<TopicId> = self
                .members
                .values()
                .flat_map(|m| m.assigned.keys().chain(m.pending_revocation.keys()))
                .copied()
                .collect();
            self.names.retain(|id, _| held.contains(id));
            self.names
                .extend(topics.iter().map(|(name, info)| (info.id, name.clone())));
            self.topics = topics;
            self.regex_matches = matches;
            self.bump();
        }
    }

    /// The configured assignor the members prefer most (ties: the first in
    /// the configured order), the configured default when none asks.
    fn pick_assignor(&self, cfg: &GroupConfig) -> String {
        let mut votes: BTreeMap<&str, usize> = BTreeMap::new();
        for m in self.members.values() {
            if let Some(a) = &m.server_assignor {
                *votes.entry(a.as_str()).or_default() += 1;
            }
        }
        let most = votes.values().copied().max().unwrap_or(0);
        cfg.consumer_assignors
            .iter()
            .find(|a| most > 0 && votes.get(a.as_str()).copied() == Some(most))
            .cloned()
            .unwrap_or_else(|| cfg.consumer_default_assignor().to_owned())
    }

    fn compute_target(&mut self, cfg: &GroupConfig) {
        let assignor = self.pick_assignor(cfg);
        let partitions: BTreeMap<TopicId, i32> = self
            .topics
            .values()
            .map(|info| (info.id, info.partitions))
            .collect();
        let target = {
            let members: Vec<AssignorMember<'_, TopicId>> = self
                .members
                .values()
                .map(|m| AssignorMember {
                    id: &m.id,
                    topics: self
                        .member_topic_names(m)
                        .into_iter()
                        .filter_map(|t| self.topics.get(t).map(|info| info.id))
                        .collect(),
                    previous: self.target.get(&m.id),
                })
                .collect();
            assignor::assign(&assignor, &members, &partitions)
        };
        self.target = target;
        self.assignment_epoch = self.group_epoch;
        self.assignor = assignor;
    }

    /// Moves a member one step towards its target (Kafka's
    /// `CurrentAssignmentBuilder`); `owned` is what its heartbeat says it
    /// owns, if it said.
    fn reconcile(&mut self, member_id: &str, owned: Option<&Assignment>, now: Instant) {
        let Some(m) = self.members.get(member_id) else {
            return;
        };
        let target_epoch = self.assignment_epoch;
        let epoch = match m.state {
            MemberState::Stable if m.member_epoch == target_epoch => return,
            MemberState::Stable | MemberState::UnreleasedPartitions => m.member_epoch,
            MemberState::UnrevokedPartitions => {
                if owns_any(owned, &m.pending_revocation) {
                    return;
                }
                (m.member_epoch + 1).min(target_epoch)
            }
        };
        let from = m.assigned.clone();
        let (old_epoch, old_pending, old_state) =
            (m.member_epoch, m.pending_revocation.clone(), m.state);
        let target = self.target.get(member_id).cloned().unwrap_or_default();
        let mut keep = Assignment::new();
        let mut revoke = Assignment::new();
        let mut gain = Assignment::new();
        let mut unreleased = false;
        let topics: BTreeSet<TopicId> = from.keys().chain(target.keys()).copied().collect();
        for t in topics {
            let current = from.get(&t).cloned().unwrap_or_default();
            let wanted = target.get(&t).cloned().unwrap_or_default();
            let kept: BTreeSet<i32> = current.intersection(&wanted).copied().collect();
            let gone: BTreeSet<i32> = current.difference(&wanted).copied().collect();
            let mut new: BTreeSet<i32> = BTreeSet::new();
            for &p in wanted.difference(&current) {
                match self.owners.get(&(t, p)) {
                    Some(o) if o != member_id => unreleased = true,
                    _ => {
                        new.insert(p);
                    }
                }
            }
            if !kept.is_empty() {
                keep.insert(t, kept);
            }
            if !gone.is_empty() {
                revoke.insert(t, gone);
            }
            if !new.is_empty() {
                gain.insert(t, new);
            }
        }
        let (state, new_epoch, assigned, pending) =
            if !revoke.is_empty() && owns_any(owned, &revoke) {
                (MemberState::UnrevokedPartitions, epoch, keep, revoke)
            } else {
                for (t, parts) in gain {
                    keep.entry(t).or_default().extend(parts);
                }
                let state = if unreleased {
                    MemberState::UnreleasedPartitions
                } else {
                    MemberState::Stable
                };
                (state, target_epoch, keep, Assignment::new())
            };
        self.release(member_id, &from);
        self.release(member_id, &old_pending);
        self.claim(member_id, &assigned);
        self.claim(member_id, &pending);
        let Some(m) = self.members.get_mut(member_id) else {
            return;
        };
        // Each new revocation gets its own rebalance timeout (Kafka
        // schedules one per epoch a member is asked to revoke in).
        let new_revocation = state == MemberState::UnrevokedPartitions
            && (old_state != MemberState::UnrevokedPartitions
                || old_epoch != new_epoch
                || old_pending != pending);
        if new_epoch != m.member_epoch {
            m.set_epoch(new_epoch);
        }
        m.assigned = assigned;
        m.pending_revocation = pending;
        m.state = state;
        if new_revocation {
            let ms = u64::try_from(m.rebalance_timeout_ms).unwrap_or(0);
            m.revocation_deadline = Some(now + Duration::from_millis(ms));
        } else if state != MemberState::UnrevokedPartitions {
            m.revocation_deadline = None;
        }
    }

    fn check_assignor(cfg: &GroupConfig, assignor: Option<&String>) -> Result<(), Refusal> {
        match assignor {
            Some(a) if !cfg.consumer_assignors.contains(a) => Err((
                ErrorCode::UnsupportedAssignor,
                format!(
                    "ServerAssignor {a} is not supported. Supported assignors: {}.",
                    cfg.consumer_assignors.join(", ")
                ),
            )),
            _ => Ok(()),
        }
    }

    fn unknown(group: &str, member_id: &str) -> Refusal {
        (
            ErrorCode::UnknownMemberId,
            format!("Member {member_id} is not a member of group {group}."),
        )
    }

    /// A leave: -1 for good, -2 for a static member's restart (its
    /// assignment waits for it for a session).
    fn leave(
        &mut self,
        group: &str,
        hb: &Heartbeat,
        now: Instant,
        cfg: &GroupConfig,
        catalog: &dyn TopicCatalog,
    ) -> Result<(), Refusal> {
        if hb.member_epoch == STATIC_LEAVE_EPOCH {
            let instance = hb.instance_id.as_deref().unwrap_or_default();
            let Some(id) = self.static_members.get(instance).cloned() else {
                return Err(Self::unknown(group, &hb.member_id));
            };
            if id != hb.member_id {
                return Err((
                    ErrorCode::FencedInstanceId,
                    format!("Static member {instance} is {id}, not {}.", hb.member_id),
                ));
            }
            let pending = match self.members.get_mut(&id) {
                Some(m) => {
                    m.set_epoch(STATIC_LEAVE_EPOCH);
                    m.session_deadline =
                        now + Duration::from_millis(cfg.consumer_session_timeout_ms);
                    m.revocation_deadline = None;
                    m.state = MemberState::Stable;
                    std::mem::take(&mut m.pending_revocation)
                }
                None => return Err(Self::unknown(group, &hb.member_id)),
            };
            self.release(&id, &pending);
            tracing::info!(group, member = %id, "static consumer group member left for a restart");
            return Ok(());
        }
        let Some(m) = self.members.get(&hb.member_id) else {
            return Err(Self::unknown(group, &hb.member_id));
        };
        check_instance(hb, m)?;
        self.remove_member(&hb.member_id, "left the group", group);
        self.compute_if_needed(cfg, catalog, now);
        Ok(())
    }

    /// A member with epoch 0: new, a static member back from a restart, or
    /// a known member that lost its state. Returns whether it is new.
    fn join(
        &mut self,
        group: &str,
        hb: &Heartbeat,
        now: Instant,
        cfg: &GroupConfig,
    ) -> Result<bool, Refusal> {
        let session = Duration::from_millis(cfg.consumer_session_timeout_ms);
        if let Some(instance) = &hb.instance_id {
            if let Some(old_id) = self.static_members.get(instance).cloned() {
                let left = self
                    .members
                    .get(&old_id)
                    .is_some_and(ConsumerMember::left_for_restart);
                if !left && old_id != hb.member_id {
                    return Err((
                        ErrorCode::UnreleasedInstanceId,
                        format!(
                            "Static member {old_id} with instance id {instance} has not left the group."
                        ),
                    ));
                }
                if left {
                    // A member already known under the new id goes first:
                    // one id, one member.
                    if old_id != hb.member_id && self.members.contains_key(&hb.member_id) {
                        self.remove_member(&hb.member_id, "replaced by a static member", group);
                    }
                    // The restarted static member takes its old place:
                    // same assignment, nothing moves; it moves to the
                    // assignment epoch when it reconciles.
                    if let Some(mut m) = self.members.remove(&old_id) {
                        let assigned = m.assigned.clone();
                        self.release(&old_id, &assigned);
                        m.id.clone_from(&hb.member_id);
                        m.set_epoch(0);
                        m.session_deadline = now + session;
                        self.claim(&hb.member_id, &assigned);
                        if let Some(t) = self.target.remove(&old_id) {
                            self.target.insert(hb.member_id.clone(), t);
                        }
                        self.members.insert(hb.member_id.clone(), m);
                        self.static_members
                            .insert(instance.clone(), hb.member_id.clone());
                    }
                    return Ok(false);
                }
            }
        }
        if let Some(m) = self.members.get(&hb.member_id) {
            if m.instance_id.is_some() && m.instance_id == hb.instance_id {
                // A static member joining again under its own id keeps its place.
                return Ok(false);
            }
            if m.previous_member_epoch == 0 && hb.owned.as_ref().is_some_and(Vec::is_empty) {
                // Its join again (the answer to the first was lost): still
                // the same member, as Kafka takes it (epoch 0 is its
                // previous epoch, and it owns nothing).
                return Ok(false);
            }
            // A known member joining again lost its state (it was fenced):
            // it starts over.
            self.remove_member(&hb.member_id, "joined again", group);
        }
        let mut m = ConsumerMember::new(hb.member_id.clone(), now, session);
        m.instance_id.clone_from(&hb.instance_id);
        if let Some(instance) = &hb.instance_id {
            self.static_members
                .insert(instance.clone(), hb.member_id.clone());
        }
        self.members.insert(hb.member_id.clone(), m);
        self.bump();
        tracing::info!(group, member = %hb.member_id, epoch = self.group_epoch, "consumer group member joined");
        Ok(true)
    }

    /// One ConsumerGroupHeartbeat.
    pub(crate) fn heartbeat(
        &mut self,
        group: &str,
        hb: Heartbeat,
        now: Instant,
        cfg: &GroupConfig,
        catalog: &dyn TopicCatalog,
    ) -> Result<HeartbeatAnswer, Refusal> {
        let session = Duration::from_millis(cfg.consumer_session_timeout_ms);
        Self::check_assignor(cfg, hb.server_assignor.as_ref())?;
        if let Some(r) = &hb.subscribed_regex {
            // Compiled once, when first seen.
            if !r.is_empty() && !self.regexes.contains_key(r) {
                let re = compile(r)?;
                // Bounded: `resolve_topics` drops the ones no member uses.
                if self.regexes.len() < MAX_CACHED_REGEXES {
                    self.regexes.insert(r.clone(), re);
                }
            }
        }
        if hb.member_epoch == LEAVE_EPOCH || hb.member_epoch == STATIC_LEAVE_EPOCH {
            self.leave(group, &hb, now, cfg, catalog)?;
            return Ok(HeartbeatAnswer {
                member_id: hb.member_id,
                member_epoch: hb.member_epoch,
                heartbeat_interval_ms: 0,
                assignment: None,
            });
        }
        let joining = hb.member_epoch == 0;
        let owned = hb.owned.as_deref().map(to_assignment);
        let is_new = joining && self.join(group, &hb, now, cfg)?;
        // A new member moved the group epoch already.
        let mut changed_subscription = false;
        if !joining {
            let Some(m) = self.members.get(&hb.member_id) else {
                return Err(Self::unknown(group, &hb.member_id));
            };
            check_instance(&hb, m)?;
            let fenced = if hb.member_epoch > m.member_epoch {
                true
            } else if hb.member_epoch < m.member_epoch {
                // A member that missed the answer carrying its new epoch
                // may come back with the previous one, owning no more than
                // it is assigned now.
                hb.member_epoch != m.previous_member_epoch
                    || !is_subset(owned.as_ref(), &m.assigned)
            } else {
                false
            };
            if fenced {
                return Err((
                    ErrorCode::FencedMemberEpoch,
                    format!(
                        "The consumer group member has a smaller or larger member epoch ({}) than the one known by the group coordinator ({}).",
                        hb.member_epoch, m.member_epoch
                    ),
                ));
            }
        }

        // The member's fields; a field not sent keeps its value.
        let member_id = hb.member_id.clone();
        let old_assigned;
        {
            let Some(m) = self.members.get_mut(&member_id) else {
                return Err(Self::unknown(group, &member_id));
            };
            m.session_deadline = now + session;
            m.client_id.clone_from(&hb.client_id);
            m.client_host.clone_from(&hb.client_host);
            if hb.rebalance_timeout_ms >= 0 {
                m.rebalance_timeout_ms = hb.rebalance_timeout_ms;
            }
            if hb.rack_id.is_some() && hb.rack_id != m.rack_id {
                m.rack_id.clone_from(&hb.rack_id);
                changed_subscription = true;
            }
            if let Some(names) = &hb.subscribed_names {
                let names: BTreeSet<String> = names.iter().cloned().collect();
                if names != m.subscribed_names {
                    m.subscribed_names = names;
                    changed_subscription = true;
                }
            }
            if hb.subscribed_regex.is_some() {
                let regex = hb.subscribed_regex.clone().filter(|r| !r.is_empty());
                if regex != m.subscribed_regex {
                    m.subscribed_regex = regex;
                    changed_subscription = true;
                }
            }
            if hb.server_assignor.is_some() && hb.server_assignor != m.server_assignor {
                m.server_assignor.clone_from(&hb.server_assignor);
                changed_subscription = true;
            }
            old_assigned = m.assigned.clone();
        }
        if changed_subscription && !is_new {
            self.bump();
        }
        self.resolve_topics(catalog, changed_subscription || is_new, now);
        if self.group_epoch > self.assignment_epoch {
            self.compute_target(cfg);
        }
        self.reconcile(&member_id, owned.as_ref(), now);
        let Some(m) = self.members.get(&member_id) else {
            return Err(Self::unknown(group, &member_id));
        };
        let full = joining
            || (hb.rebalance_timeout_ms != -1
                && (hb.subscribed_names.is_some() || hb.subscribed_regex.is_some())
                && hb.owned.is_some());
        let assignment = (full || m.assigned != old_assigned).then(|| to_wire(&m.assigned));
        Ok(HeartbeatAnswer {
            member_id,
            member_epoch: m.member_epoch,
            heartbeat_interval_ms: i32::try_from(cfg.consumer_heartbeat_interval_ms)
                .unwrap_or(i32::MAX),
            assignment,
        })
    }

    fn compute_if_needed(&mut self, cfg: &GroupConfig, catalog: &dyn TopicCatalog, now: Instant) {
        if self.members.is_empty() {
            self.target.clear();
            self.assignment_epoch = self.group_epoch;
            return;
        }
        self.resolve_topics(catalog, true, now);
        if self.group_epoch > self.assignment_epoch {
            self.compute_target(cfg);
        }
    }

    /// Checks an offset commit's member and epoch (Kafka's
    /// `ConsumerGroup.validateOffsetCommit`): a commit without a member is
    /// accepted only while the group has none.
    pub(crate) fn validate_commit(&self, member_id: &str, epoch: i32) -> Result<(), ErrorCode> {
        if epoch < 0 && self.members.is_empty() {
            return Ok(());
        }
        self.validate_fetch(member_id, epoch)
    }

    /// Checks an OffsetFetch's member and epoch.
    pub(crate) fn validate_fetch(&self, member_id: &str, epoch: i32) -> Result<(), ErrorCode> {
        let Some(m) = self.members.get(member_id) else {
            return Err(ErrorCode::UnknownMemberId);
        };
        if m.member_epoch != epoch {
            return Err(ErrorCode::StaleMemberEpoch);
        }
        Ok(())
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.members
            .values()
            .flat_map(|m| std::iter::once(m.session_deadline).chain(m.revocation_deadline))
            .min()
    }

    /// Removes members whose session or revocation time ran out.
    pub(crate) fn fire_timers(&mut self, group: &str, now: Instant) {
        let due: Vec<(String, &'static str)> = self
            .members
            .values()
            .filter_map(|m| {
                if m.session_deadline <= now {
                    Some((m.id.clone(), "session expired"))
                } else if m.revocation_deadline.is_some_and(|d| d <= now) {
                    Some((
                        m.id.clone(),
                        "did not revoke its partitions within the rebalance timeout",
                    ))
                } else {
                    None
                }
            })
            .collect();
        for (id, why) in due {
            self.remove_member(&id, why, group);
        }
        if self.members.is_empty() {
            self.target.clear();
            self.assignment_epoch = self.group_epoch;
        }
    }
}

#[cfg(test)]
mod tests;

//! `sluice group list|describe|reset-offsets`.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Context, Result};
use clap::{ArgGroup, Args, Subcommand};
use kafka_protocol::messages::{
    ConsumerGroupDescribeRequest, ConsumerProtocolAssignment, FindCoordinatorRequest, GroupId,
};
use kafka_protocol::protocol::{Decodable, StrBytes};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::{all_metadata, topic_partitions, ClientArgs, Wire, REQUEST_TIMEOUT};

#[derive(Args, Debug)]
pub struct GroupArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: GroupCommand,
}

#[derive(Subcommand, Debug)]
enum GroupCommand {
    /// List consumer groups with their state and member count.
    List,
    /// Show a group's members, assignments, committed offsets and lag.
    Describe { group: String },
    /// Move a group's committed offsets on one topic (dry run unless --execute).
    ResetOffsets(ResetArgs),
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("target").required(true)
    .args(["to_earliest", "to_latest", "to_offset", "to_timestamp"])))]
struct ResetArgs {
    group: String,
    #[arg(long)]
    topic: String,
    /// The first offset still in the log.
    #[arg(long)]
    to_earliest: bool,
    /// The end of the log (skip everything).
    #[arg(long)]
    to_latest: bool,
    /// This offset, clamped into [earliest, latest].
    #[arg(long, value_name = "N")]
    to_offset: Option<i64>,
    /// The first record with a timestamp >= MS (latest when none).
    #[arg(long, value_name = "MS")]
    to_timestamp: Option<i64>,
    /// Commit the new offsets; without it, only print the plan.
    #[arg(long)]
    execute: bool,
}

pub async fn run(args: GroupArgs) -> Result<()> {
    let client = &args.client;
    // Blocking (librdkafka), and a consumer-protocol group is described
    // through the runtime from that blocking thread.
    let blocking = |f: Box<dyn FnOnce() -> Result<()> + Send>| async move {
        tokio::task::spawn_blocking(f)
            .await
            .context("the command's thread failed")?
    };
    match args.command {
        GroupCommand::List => {
            let client = client.clone();
            blocking(Box::new(move || list(&client))).await
        }
        GroupCommand::Describe { group } => {
            let client = client.clone();
            blocking(Box::new(move || describe(&client, &group))).await
        }
        GroupCommand::ResetOffsets(reset) => {
            let client = client.clone();
            blocking(Box::new(move || reset_offsets(&client, &reset))).await
        }
    }
}

/// One line of `group list`.
pub struct GroupSummary {
    pub name: String,
    pub state: String,
    pub members: usize,
}

/// Every consumer group the brokers know, by name.
pub fn group_summaries(client: &ClientArgs) -> Result<Vec<GroupSummary>> {
    let consumer = client.lookup_consumer(None)?;
    let groups = consumer
        .fetch_group_list(None, REQUEST_TIMEOUT)
        .context("cannot list consumer groups")?;
    let mut out: Vec<GroupSummary> = Vec::new();
    for g in groups.groups() {
        let mut summary = GroupSummary {
            name: g.name().to_string(),
            state: g.state().to_string(),
            members: g.members().len(),
        };
        if g.state() == "Dead" && g.members().is_empty() {
            if let Some((state, members)) = consumer_protocol_group(client, g.name())? {
                summary.state = state;
                summary.members = members.len();
            }
        }
        out.push(summary);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn list(client: &ClientArgs) -> Result<()> {
    println!("{:<40}  {:<20}  {:>7}", "GROUP", "STATE", "MEMBERS");
    for g in group_summaries(client)? {
        println!("{:<40}  {:<20}  {:>7}", g.name, g.state, g.members);
    }
    Ok(())
}

/// Topic -> partitions assigned to a member, decoded from the consumer
/// protocol's assignment bytes; empty when they are not the consumer protocol.
fn decode_assignment(bytes: Option<&[u8]>) -> BTreeMap<String, Vec<i32>> {
    let mut out = BTreeMap::new();
    // The assignment is prefixed by its version (an int16).
    let Some((version, rest)) = bytes.and_then(|b| b.split_first_chunk::<2>()) else {
        return out;
    };
    let version = i16::from_be_bytes(*version);
    let mut buf = bytes::Bytes::copy_from_slice(rest);
    if let Ok(assignment) = ConsumerProtocolAssignment::decode(&mut buf, version.clamp(0, 3)) {
        for tp in assignment.assigned_partitions {
            let mut partitions = tp.partitions;
            partitions.sort_unstable();
            out.insert(tp.topic.0.to_string(), partitions);
        }
    }
    out
}

/// A group of the consumer protocol (KIP-848), which DescribeGroups does
/// not describe (librdkafka reports it Dead): its state and members from
/// ConsumerGroupDescribe at its coordinator. None when the group is not
/// one, or the brokers do not know the API. Call from a blocking thread of
/// the runtime.
fn consumer_protocol_group(
    client: &ClientArgs,
    group: &str,
) -> Result<Option<(String, Vec<Member>)>> {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return Ok(None);
    };
    runtime.block_on(async {
        // Wire speaks plaintext only: with TLS or SASL, or on any error,
        // librdkafka's answer stands.
        let Ok(mut wire) = Wire::new(client) else {
            return Ok(None);
        };
        let find =
            FindCoordinatorRequest::default().with_key(StrBytes::from_string(group.to_owned()));
        let Ok(coordinator) = wire.call_any(&find, 1, 3).await else {
            return Ok(None);
        };
        if coordinator.error_code != 0 {
            return Ok(None);
        }
        let addr = format!("{}:{}", coordinator.host.as_str(), coordinator.port);
        let req = ConsumerGroupDescribeRequest::default()
            .with_group_ids(vec![GroupId(StrBytes::from_string(group.to_owned()))]);
        let Ok(resp) = wire.call(&addr, &req, 0, 1).await else {
            return Ok(None);
        };
        let Some(g) = resp.groups.into_iter().next().filter(|g| g.error_code == 0) else {
            return Ok(None);
        };
        let members = g
            .members
            .into_iter()
            .map(|m| Member {
                id: m.member_id.to_string(),
                client_id: m.client_id.to_string(),
                host: m.client_host.to_string(),
                assignment: m
                    .assignment
                    .topic_partitions
                    .into_iter()
                    .map(|tp| {
                        let mut partitions = tp.partitions;
                        partitions.sort_unstable();
                        (tp.topic_name.0.to_string(), partitions)
                    })
                    .collect(),
            })
            .collect();
        Ok(Some((g.group_state.to_string(), members)))
    })
}

fn one_group(
    client: &ClientArgs,
    consumer: &BaseConsumer,
    group: &str,
) -> Result<Option<(String, Vec<Member>)>> {
    let list = consumer
        .fetch_group_list(Some(group), REQUEST_TIMEOUT)
        .with_context(|| format!("cannot describe group {group:?}"))?;
    let Some(info) = list.groups().iter().find(|g| g.name() == group) else {
        return Ok(None);
    };
    if info.state() == "Dead" && info.members().is_empty() {
        if let Some(described) = consumer_protocol_group(client, group)? {
            return Ok(Some(described));
        }
    }
    let members = info
        .members()
        .iter()
        .map(|m| Member {
            id: m.id().to_string(),
            client_id: m.client_id().to_string(),
            host: m.client_host().to_string(),
            assignment: if info.protocol_type() == "consumer" || info.protocol_type().is_empty() {
                decode_assignment(m.assignment())
            } else {
                BTreeMap::new()
            },
        })
        .collect();
    Ok(Some((info.state().to_string(), members)))
}

pub struct Member {
    pub id: String,
    pub client_id: String,
    pub host: String,
    /// Topic -> the partitions assigned to this member.
    pub assignment: BTreeMap<String, Vec<i32>>,
}

/// What `group describe` shows: the group's state, its members and, per
/// partition of the topics it consumes, where it stands.
pub struct GroupReport {
    pub state: String,
    pub members: Vec<Member>,
    pub partitions: Vec<GroupPartition>,
}

/// One partition of a group's topics.
pub struct GroupPartition {
    pub topic: String,
    pub partition: i32,
    /// None: the group never committed an offset here.
    pub committed: Option<i64>,
    pub log_end: i64,
    /// The log end less the committed offset; None without a commit.
    pub lag: Option<i64>,
    /// The client id of the member the partition is assigned to.
    pub consumer: Option<String>,
}

/// A group's members, assignments, committed offsets and lag; an error when
/// the group does not exist.
pub fn group_report(client: &ClientArgs, group: &str) -> Result<GroupReport> {
    let lookup = client.lookup_consumer(None)?;
    let (state, members) =
        one_group(client, &lookup, group)?.unwrap_or_else(|| ("Dead".into(), Vec::new()));

    // Committed offsets are fetched with a consumer configured with the
    // group's id (it never joins). Every user topic is asked for, since a
    // group without members still has offsets.
    let group_consumer = client.lookup_consumer(Some(group))?;
    let metadata = all_metadata(&lookup)?;
    let mut query = TopicPartitionList::new();
    for t in metadata.topics() {
        if t.name().starts_with("__") {
            continue;
        }
        for p in t.partitions() {
            query.add_partition(t.name(), p.id());
        }
    }
    let committed = group_consumer
        .committed_offsets(query, REQUEST_TIMEOUT)
        .context("cannot fetch committed offsets")?;

    let mut owner: BTreeMap<(String, i32), String> = BTreeMap::new();
    for m in &members {
        for (topic, parts) in &m.assignment {
            for p in parts {
                owner.insert((topic.clone(), *p), m.client_id.clone());
            }
        }
    }
    let mut rows: BTreeSet<(String, i32)> = owner.keys().cloned().collect();
    let mut committed_at = BTreeMap::new();
    for elem in committed.elements() {
        if let Offset::Offset(o) = elem.offset() {
            rows.insert((elem.topic().to_string(), elem.partition()));
            committed_at.insert((elem.topic().to_string(), elem.partition()), o);
        }
    }
    if members.is_empty() && rows.is_empty() && matches!(state.as_str(), "Dead" | "") {
        bail!("consumer group {group:?} does not exist");
    }
    // Every partition of a topic the group consumes is listed, so that a
    // partition it never committed on shows up (as "-") instead of hiding.
    let group_topics: BTreeSet<String> = rows.iter().map(|(t, _)| t.clone()).collect();
    for t in metadata.topics() {
        if group_topics.contains(t.name()) {
            for p in t.partitions() {
                rows.insert((t.name().to_string(), p.id()));
            }
        }
    }
    let mut partitions = Vec::with_capacity(rows.len());
    for (topic, partition) in rows {
        let (_, high) = lookup
            .fetch_watermarks(&topic, partition, REQUEST_TIMEOUT)
            .with_context(|| format!("cannot fetch offsets of {topic}/{partition}"))?;
        let key = (topic, partition);
        let committed = committed_at.get(&key).copied();
        partitions.push(GroupPartition {
            consumer: owner.remove(&key),
            topic: key.0,
            partition,
            committed,
            log_end: high,
            lag: committed.map(|c| (high - c).max(0)),
        });
    }
    Ok(GroupReport {
        state,
        members,
        partitions,
    })
}

fn describe(client: &ClientArgs, group: &str) -> Result<()> {
    let report = group_report(client, group)?;
    let members = &report.members;
    println!(
        "Group: {group}\tState: {}\tMembers: {}",
        report.state,
        members.len()
    );
    if !members.is_empty() {
        println!();
        println!(
            "{:<50}  {:<24}  {:<20}  ASSIGNMENT",
            "MEMBER-ID", "CLIENT-ID", "HOST"
        );
        for m in members {
            let assignment: Vec<String> = m
                .assignment
                .iter()
                .map(|(t, ps)| {
                    let ps: Vec<String> = ps.iter().map(i32::to_string).collect();
                    format!("{t}:{}", ps.join(","))
                })
                .collect();
            println!(
                "{:<50}  {:<24}  {:<20}  {}",
                m.id,
                m.client_id,
                m.host,
                assignment.join(" ")
            );
        }
    }
    println!();
    println!(
        "{:<30}  {:>9}  {:>16}  {:>16}  {:>10}  CONSUMER",
        "TOPIC", "PARTITION", "COMMITTED-OFFSET", "LOG-END-OFFSET", "LAG"
    );
    for p in &report.partitions {
        let dash = |v: Option<i64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
        println!(
            "{:<30}  {:>9}  {:>16}  {:>16}  {:>10}  {}",
            p.topic,
            p.partition,
            dash(p.committed),
            p.log_end,
            dash(p.lag),
            p.consumer.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}

/// Where `reset-offsets` moves a group's offsets.
#[derive(Clone, Copy, Debug)]
pub enum ResetTarget {
    /// The first offset still in the log.
    Earliest,
    /// The end of the log.
    Latest,
    /// This offset, clamped into [earliest, latest].
    Offset(i64),
    /// The first record with a timestamp at or after this (the end when none).
    Timestamp(i64),
}

/// One partition's move: from the committed offset (None: never committed)
/// to the new one.
pub struct ResetStep {
    pub partition: i32,
    pub current: Option<i64>,
    pub new: i64,
}

/// Where `target` puts `group`'s offsets on every partition of `topic`;
/// refused while the group has members (they would overwrite it).
pub fn reset_plan(
    client: &ClientArgs,
    group: &str,
    topic: &str,
    target: ResetTarget,
) -> Result<Vec<ResetStep>> {
    let lookup = client.lookup_consumer(None)?;
    if let Some((state, members)) = one_group(client, &lookup, group)? {
        if !members.is_empty() {
            bail!(
                "consumer group {group:?} has {} active member(s) (state {state}); \
                 offsets can only be reset when the group is inactive: stop its consumers first",
                members.len()
            );
        }
    }
    let partitions = topic_partitions(&lookup, topic)?;
    let group_consumer = client.lookup_consumer(Some(group))?;

    let mut query = TopicPartitionList::new();
    for p in &partitions {
        query.add_partition(topic, *p);
    }
    let committed = group_consumer
        .committed_offsets(query, REQUEST_TIMEOUT)
        .context("cannot fetch committed offsets")?;

    let by_time = match target {
        ResetTarget::Timestamp(ts) => {
            let mut q = TopicPartitionList::new();
            for p in &partitions {
                q.add_partition_offset(topic, *p, Offset::Offset(ts))?;
            }
            Some(
                lookup
                    .offsets_for_times(q, REQUEST_TIMEOUT)
                    .context("cannot look up offsets by timestamp")?,
            )
        }
        _ => None,
    };

    let mut plan = Vec::with_capacity(partitions.len());
    for p in &partitions {
        let (low, high) = lookup
            .fetch_watermarks(topic, *p, REQUEST_TIMEOUT)
            .with_context(|| format!("cannot fetch offsets of {topic}/{p}"))?;
        let new = match target {
            ResetTarget::Earliest => low,
            ResetTarget::Latest => high,
            ResetTarget::Offset(o) => o.clamp(low, high.max(low)),
            ResetTarget::Timestamp(_) => match by_time
                .as_ref()
                .and_then(|found| found.find_partition(topic, *p))
                .map(|e| e.offset())
            {
                Some(Offset::Offset(o)) if o >= 0 => o,
                _ => high,
            },
        };
        let current = match committed.find_partition(topic, *p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        };
        plan.push(ResetStep {
            partition: *p,
            current,
            new,
        });
    }
    Ok(plan)
}

/// Commits `plan` as `group`'s offsets on `topic`.
pub fn commit_plan(
    client: &ClientArgs,
    group: &str,
    topic: &str,
    plan: &[ResetStep],
) -> Result<()> {
    let group_consumer = client.lookup_consumer(Some(group))?;
    let mut offsets = TopicPartitionList::new();
    for step in plan {
        offsets.add_partition_offset(topic, step.partition, Offset::Offset(step.new))?;
    }
    group_consumer
        .commit(&offsets, CommitMode::Sync)
        .with_context(|| format!("cannot commit offsets for group {group:?}"))
}

fn reset_offsets(client: &ClientArgs, args: &ResetArgs) -> Result<()> {
    let target = if args.to_earliest {
        ResetTarget::Earliest
    } else if args.to_latest {
        ResetTarget::Latest
    } else if let Some(o) = args.to_offset {
        ResetTarget::Offset(o)
    } else if let Some(ts) = args.to_timestamp {
        ResetTarget::Timestamp(ts)
    } else {
        bail!("no reset target given");
    };
    let plan = reset_plan(client, &args.group, &args.topic, target)?;
    println!(
        "{:<30}  {:>9}  {:>16}  {:>10}",
        "TOPIC", "PARTITION", "CURRENT-OFFSET", "NEW-OFFSET"
    );
    for step in &plan {
        println!(
            "{:<30}  {:>9}  {:>16}  {:>10}",
            args.topic,
            step.partition,
            step.current
                .map_or_else(|| "-".to_string(), |c| c.to_string()),
            step.new
        );
    }
    if args.execute {
        commit_plan(client, &args.group, &args.topic, &plan)?;
        println!("committed new offsets for group {}", args.group);
    } else {
        println!("dry run: nothing committed (add --execute to apply)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::consumer_protocol_assignment::TopicPartition;
    use kafka_protocol::messages::TopicName;
    use kafka_protocol::protocol::{Encodable, StrBytes};

    #[test]
    fn assignments_decode() {
        let assignment = ConsumerProtocolAssignment::default().with_assigned_partitions(vec![
            TopicPartition::default()
                .with_topic(TopicName(StrBytes::from_static_str("t")))
                .with_partitions(vec![2, 0]),
        ]);
        let mut buf = bytes::BytesMut::new();
        buf.extend_from_slice(&1i16.to_be_bytes());
        assignment.encode(&mut buf, 1).unwrap();
        assert!(!buf.is_empty());
        let got = decode_assignment(Some(&buf));
        assert_eq!(got.get("t"), Some(&vec![0, 2]));
        assert!(decode_assignment(Some(&[0, 1, 0xff])).is_empty());
        assert!(decode_assignment(None).is_empty());
    }
}

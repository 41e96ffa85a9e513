//! `sluice transaction list|describe` (Kafka's `kafka-transactions.sh`),
//! and the partition leaders' producer state that `sluice topic describe`
//! shows: ListTransactions, DescribeTransactions and DescribeProducers
//! (KIP-664), which librdkafka has no admin API for, through [`Wire`].

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use clap::builder::PossibleValuesParser;
use clap::{Args, Subcommand};
use kafka_protocol::messages::describe_producers_request::TopicRequest;
use kafka_protocol::messages::describe_producers_response::ProducerState;
use kafka_protocol::messages::describe_transactions_response::TransactionState;
use kafka_protocol::messages::{
    DescribeProducersRequest, DescribeTransactionsRequest, FindCoordinatorRequest,
    ListTransactionsRequest, ProducerId, TopicName, TransactionalId,
};
use kafka_protocol::protocol::StrBytes;
use sluice_vocab::ErrorCode;

use super::{ClientArgs, Wire};

/// The states Kafka's coordinators report (and ListTransactions filters by).
const STATES: [&str; 8] = [
    "Empty",
    "Ongoing",
    "PrepareCommit",
    "PrepareAbort",
    "CompleteCommit",
    "CompleteAbort",
    "Dead",
    "PrepareEpochFence",
];
/// FindCoordinator's key type of a transactional id.
const TRANSACTION_KEY: i8 = 1;
/// How long a coordinator that is moving or loading is waited for.
const COORDINATOR_WAIT: Duration = Duration::from_secs(15);

#[derive(Args, Debug)]
pub struct TransactionArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: TransactionCommand,
}

#[derive(Subcommand, Debug)]
enum TransactionCommand {
    /// List transactional ids with their coordinator, producer id and state.
    List {
        /// Only transactions in this state; repeatable.
        #[arg(long = "state", value_name = "STATE", value_parser = PossibleValuesParser::new(STATES))]
        states: Vec<String>,
        /// Only transactions of this producer id; repeatable.
        #[arg(long = "producer-id", value_name = "ID")]
        producer_ids: Vec<i64>,
        /// Only transactions open for at least MS milliseconds.
        #[arg(long, value_name = "MS")]
        duration_ms: Option<i64>,
        /// Only transactional ids the regular expression matches whole.
        #[arg(long, value_name = "REGEX")]
        pattern: Option<String>,
    },
    /// Show transactional ids: state, producer, timeout, start and the
    /// partitions of the open transaction.
    Describe {
        #[arg(required = true, value_name = "TRANSACTIONAL_ID")]
        transactional_ids: Vec<String>,
    },
}

pub async fn run(args: TransactionArgs) -> Result<()> {
    let mut wire = Wire::new(&args.client)?;
    match args.command {
        TransactionCommand::List {
            states,
            producer_ids,
            duration_ms,
            pattern,
        } => {
            let filter = Filter {
                states,
                producer_ids,
                duration_ms,
                pattern,
            };
            list(&mut wire, filter).await
        }
        TransactionCommand::Describe { transactional_ids } => {
            describe(&mut wire, transactional_ids).await
        }
    }
}

/// What `transaction list` asks the coordinators for.
struct Filter {
    states: Vec<String>,
    producer_ids: Vec<i64>,
    duration_ms: Option<i64>,
    pattern: Option<String>,
}

/// Each broker lists the transactions it coordinates, so every broker is
/// asked and the answers merged.
async fn list(wire: &mut Wire, filter: Filter) -> Result<()> {
    let Filter {
        states,
        producer_ids,
        duration_ms,
        pattern,
    } = filter;
    let brokers = wire.brokers().await?;
    if brokers.is_empty() {
        bail!("the cluster's metadata lists no brokers");
    }
    let req = ListTransactionsRequest::default()
        .with_state_filters(states.iter().map(|s| str_bytes(s)).collect())
        .with_producer_id_filters(producer_ids.into_iter().map(ProducerId).collect())
        .with_duration_filter(duration_ms.unwrap_or(-1))
        .with_transactional_id_pattern(pattern.as_deref().map(str_bytes));
    // v0 has no duration filter and v1 no pattern: a broker without them
    // cannot apply them.
    let min = match (&pattern, duration_ms) {
        (Some(_), _) => 2,
        (None, Some(_)) => 1,
        (None, None) => 0,
    };
    let mut listed: BTreeMap<String, (i32, i64, String)> = BTreeMap::new();
    let mut failed = Vec::new();
    for (node, addr) in &brokers {
        let answer = wire.call(addr, &req, min, 2).await.and_then(|resp| {
            ErrorCode::check(resp.error_code)?;
            Ok(resp)
        });
        match answer {
            Ok(resp) => {
                for t in resp.transaction_states {
                    // A coordinator that just moved may be listed by two
                    // nodes for a moment: the first answer stands.
                    listed.entry(t.transactional_id.0.to_string()).or_insert((
                        *node,
                        t.producer_id.0,
                        t.transaction_state.to_string(),
                    ));
                }
            }
            Err(e) => failed.push(format!("node {node} ({addr}): {e:#}")),
        }
    }
    if failed.len() == brokers.len() {
        bail!("no broker answered ListTransactions: {}", failed.join("; "));
    }
    println!(
        "{:<40}  {:>11}  {:>12}  STATE",
        "TRANSACTIONAL-ID", "COORDINATOR", "PRODUCER-ID"
    );
    for (id, (node, producer_id, state)) in listed {
        println!("{id:<40}  {node:>11}  {producer_id:>12}  {state}");
    }
    for f in failed {
        eprintln!("warning: not listed, the transactions coordinated by {f}");
    }
    Ok(())
}

/// Each id is described by its coordinator (FindCoordinator); an id whose
/// coordinator is moving or loading is asked again until COORDINATOR_WAIT.
async fn describe(wire: &mut Wire, mut ids: Vec<String>) -> Result<()> {
    let mut seen = std::collections::BTreeSet::new();
    ids.retain(|id| seen.insert(id.clone()));
    let deadline = Instant::now() + COORDINATOR_WAIT;
    let mut pending = ids.clone();
    let mut described: BTreeMap<String, (i32, TransactionState)> = BTreeMap::new();
    let mut failed: BTreeMap<String, ErrorCode> = BTreeMap::new();
    while !pending.is_empty() {
        let mut by_coordinator: BTreeMap<(i32, String), Vec<String>> = BTreeMap::new();
        let mut retry = Vec::new();
        for id in pending {
            match coordinator(wire, &id).await? {
                Ok(at) => by_coordinator.entry(at).or_default().push(id),
                Err(code) if code.is_retriable() => retry.push((id, code)),
                Err(code) => {
                    failed.insert(id, code);
                }
            }
        }
        for ((node, addr), ids) in by_coordinator {
            let req = DescribeTransactionsRequest::default().with_transactional_ids(
                ids.iter()
                    .map(|id| TransactionalId(str_bytes(id)))
                    .collect(),
            );
            let resp = wire.call(&addr, &req, 0, 0).await?;
            for t in resp.transaction_states {
                let id = t.transactional_id.0.to_string();
                match ErrorCode::check(t.error_code) {
                    Ok(()) => {
                        described.insert(id, (node, t));
                    }
                    Err(code) if code.is_retriable() => retry.push((id, code)),
                    Err(code) => {
                        failed.insert(id, code);
                    }
                }
            }
        }
        if Instant::now() >= deadline {
            failed.extend(retry);
            break;
        }
        if !retry.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        pending = retry.into_iter().map(|(id, _)| id).collect();
    }

    if !described.is_empty() {
        let now = now_ms();
        println!(
            "{:<40}  {:>11}  {:>12}  {:>5}  {:<16}  {:>10}  {:>13}  {:>11}  PARTITIONS",
            "TRANSACTIONAL-ID",
            "COORDINATOR",
            "PRODUCER-ID",
            "EPOCH",
            "STATE",
            "TIMEOUT-MS",
            "START-MS",
            "DURATION-MS"
        );
        for id in &ids {
            let Some((node, t)) = described.get(id) else {
                continue;
            };
            let (start, duration) = match t.transaction_start_time_ms {
                ms if ms >= 0 => (ms.to_string(), now.saturating_sub(ms).max(0).to_string()),
                _ => ("-".to_owned(), "-".to_owned()),
            };
            let mut partitions: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
            for topic in &t.topics {
                partitions
                    .entry(topic.topic.0.as_str())
                    .or_default()
                    .extend(&topic.partitions);
            }
            let partitions: Vec<String> = partitions
                .into_iter()
                .map(|(topic, mut ps)| {
                    ps.sort_unstable();
                    let ps: Vec<String> = ps.iter().map(i32::to_string).collect();
                    format!("{topic}:{}", ps.join(","))
                })
                .collect();
            println!(
                "{:<40}  {:>11}  {:>12}  {:>5}  {:<16}  {:>10}  {:>13}  {:>11}  {}",
                id,
                node,
                t.producer_id.0,
                t.producer_epoch,
                t.transaction_state.as_str(),
                t.transaction_timeout_ms,
                start,
                duration,
                if partitions.is_empty() {
                    "-".to_owned()
                } else {
                    partitions.join(" ")
                }
            );
        }
    }
    if !failed.is_empty() {
        let why: Vec<String> = failed
            .iter()
            .map(|(id, code)| match code {
                ErrorCode::TransactionalIdNotFound => format!("transactional id {id:?} not found"),
                code => format!("cannot describe transactional id {id:?}: {code}"),
            })
            .collect();
        bail!("{}", why.join("; "));
    }
    Ok(())
}

/// The node id and address of `id`'s transaction coordinator, or the code
/// FindCoordinator answered with.
async fn coordinator(wire: &mut Wire, id: &str) -> Result<Result<(i32, String), ErrorCode>> {
    // v1-v3 name one key per request; v0 has no key type.
    let req = FindCoordinatorRequest::default()
        .with_key(str_bytes(id))
        .with_key_type(TRANSACTION_KEY);
    let resp = wire.call_any(&req, 1, 3).await?;
    Ok(ErrorCode::check(resp.error_code).map(|()| {
        (
            resp.node_id.0,
            format!("{}:{}", resp.host.as_str(), resp.port),
        )
    }))
}

/// One partition's producers as its leader reports them, or why it could
/// not be asked.
pub(super) type Producers = Result<Vec<ProducerState>, String>;

/// DescribeProducers of `topic`'s partitions, each asked of its leader:
/// `leaders` maps a leader's address to the partitions it leads.
pub(super) async fn producers(
    wire: &mut Wire,
    topic: &str,
    leaders: BTreeMap<String, Vec<i32>>,
) -> BTreeMap<i32, Producers> {
    let mut out = BTreeMap::new();
    for (addr, partitions) in leaders {
        let req = DescribeProducersRequest::default().with_topics(vec![TopicRequest::default()
            .with_name(TopicName(str_bytes(topic)))
            .with_partition_indexes(partitions.clone())]);
        let resp = match wire.call(&addr, &req, 0, 0).await {
            Ok(resp) => resp,
            Err(e) => {
                for p in partitions {
                    out.insert(p, Err(format!("{e:#}")));
                }
                continue;
            }
        };
        for p in resp.topics.into_iter().flat_map(|t| t.partitions) {
            let answer = match ErrorCode::check(p.error_code) {
                Ok(()) => Ok(p.active_producers),
                Err(code) => Err(code.to_string()),
            };
            out.insert(p.partition_index, answer);
        }
    }
    out
}

fn str_bytes(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_owned())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

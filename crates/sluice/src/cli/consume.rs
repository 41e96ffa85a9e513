//! `sluice consume`: print records of a topic as text or JSON lines.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::ProgressBar;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use tracing::warn;

use super::{progress, topic_partitions, ClientArgs, REQUEST_TIMEOUT};

#[derive(Args, Debug)]
pub struct ConsumeArgs {
    pub topic: String,
    /// Consume as a member of this consumer group and commit offsets.
    /// Without it, partitions are assigned directly and nothing is committed.
    #[arg(long)]
    pub group: Option<String>,
    /// Start at the earliest offset (with --group: when the group has no committed offset).
    #[arg(long, conflicts_with_all = ["offset", "timestamp"])]
    pub from_beginning: bool,
    /// Start every partition at this offset (with --group: instead of the
    /// committed offset, when the partition is first assigned).
    #[arg(long, conflicts_with = "timestamp")]
    pub offset: Option<i64>,
    /// Start every partition at the first record with a timestamp >= MS
    /// (epoch milliseconds; with --group: instead of the committed offset).
    #[arg(long, value_name = "MS")]
    pub timestamp: Option<i64>,
    /// Read only this partition.
    #[arg(long, conflicts_with = "group")]
    pub partition: Option<i32>,
    /// Stop after this many records.
    #[arg(long, value_name = "N")]
    pub max_messages: Option<u64>,
    /// Stop when no record arrived for this long.
    #[arg(long, value_name = "MS")]
    pub timeout_ms: Option<u64>,
    /// Output format: text (the value per line) or json (one object per line).
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
    /// In text format, print "key<TAB>value".
    #[arg(long)]
    pub print_key: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Where each partition starts when the consumer first gets it.
#[derive(Clone, Copy, Debug)]
enum Start {
    Earliest,
    Latest,
    Offset(i64),
    Timestamp(i64),
}

/// Positions partitions of a group assignment the first time they are
/// assigned (the group's committed offsets are used otherwise).
struct Positioning {
    /// Start offset per partition, computed before subscribing; None = use the
    /// committed offset / auto.offset.reset.
    starts: Option<BTreeMap<i32, Offset>>,
    positioned: Mutex<HashSet<i32>>,
}

impl ClientContext for Positioning {}

impl ConsumerContext for Positioning {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            rdkafka::consumer::RebalanceProtocol::Cooperative
        );
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                if let (Some(starts), Ok(mut done)) = (&self.starts, self.positioned.lock()) {
                    let assigned: Vec<(String, i32)> = tpl
                        .elements()
                        .iter()
                        .map(|e| (e.topic().to_string(), e.partition()))
                        .collect();
                    for (topic, partition) in assigned {
                        if let (true, Some(offset)) =
                            (done.insert(partition), starts.get(&partition))
                        {
                            if let Err(e) = tpl.set_partition_offset(&topic, partition, *offset) {
                                warn!("cannot position {topic}/{partition}: {e}");
                            }
                        }
                    }
                }
                if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
            other => {
                warn!("rebalance error: {other:?}");
                consumer.unassign()
            }
        };
        if let Err(e) = result {
            warn!("cannot apply the group assignment: {e}");
        }
    }
}

pub fn run(runtime: &tokio::runtime::Runtime, args: ConsumeArgs) -> Result<()> {
    let start = if let Some(o) = args.offset {
        if o < 0 {
            bail!("--offset must be 0 or more");
        }
        Start::Offset(o)
    } else if let Some(ts) = args.timestamp {
        Start::Timestamp(ts)
    } else if args.from_beginning {
        Start::Earliest
    } else {
        Start::Latest
    };

    // Ctrl-C stops the loop so that a group member commits and leaves cleanly.
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        runtime.spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                stop.store(true, Ordering::Relaxed);
            }
        });
    }

    let lookup = args.client.lookup_consumer(None)?;
    let mut partitions = topic_partitions(&lookup, &args.topic)?;
    if let Some(p) = args.partition {
        if !partitions.contains(&p) {
            bail!("topic {:?} has no partition {p}", args.topic);
        }
        partitions = vec![p];
    }
    let starts = start_offsets(&lookup, &args.topic, &partitions, start)?;
    drop(lookup);

    let mut config = args.client.config();
    config
        .set("enable.partition.eof", "false")
        .set("allow.auto.create.topics", "false")
        .set(
            "auto.offset.reset",
            if matches!(start, Start::Earliest) {
                "earliest"
            } else {
                "latest"
            },
        );
    match &args.group {
        // Offsets are stored only after a record is printed, and committed
        // in the background and on exit: what was printed is what is committed.
        Some(group) => config
            .set("group.id", group)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false"),
        // librdkafka's assign() wants a group.id although nothing is joined
        // or committed with it (auto commit off, no store).
        None => config
            .set("group.id", "sluice-cli-assign")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false"),
    };
    for (k, v) in &args.client.client_config {
        config.set(k, v);
    }
    let context = Positioning {
        // In a group, an explicit start overrides the committed offsets; the
        // default (latest / --from-beginning) only applies where none is committed.
        starts: match start {
            Start::Offset(_) | Start::Timestamp(_) => Some(starts.clone()),
            Start::Earliest | Start::Latest => None,
        },
        positioned: Mutex::new(HashSet::new()),
    };
    let consumer: BaseConsumer<Positioning> =
        config.create_with_context(context).with_context(|| {
            format!(
                "cannot create a Kafka consumer for {}",
                args.client.bootstrap
            )
        })?;

    if args.group.is_some() {
        consumer
            .subscribe(&[&args.topic])
            .with_context(|| format!("cannot subscribe to {}", args.topic))?;
    } else {
        let mut tpl = TopicPartitionList::new();
        for (p, offset) in &starts {
            tpl.add_partition_offset(&args.topic, *p, *offset)?;
        }
        consumer.assign(&tpl).context("cannot assign partitions")?;
    }

    let bar = progress("consumed");
    let result = consume_loop(&consumer, &args, &stop, &bar);
    bar.finish_and_clear();

    if args.group.is_some() {
        match consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => {}
            // Nothing consumed since the last commit.
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                warn!("final offset commit failed: {e}");
                result?;
                bail!("final offset commit failed: {e}");
            }
        }
    }
    let count = result?;
    eprintln!("consumed {count} record(s)");
    Ok(())
}

/// Absolute or logical start offsets per partition.
fn start_offsets(
    lookup: &BaseConsumer,
    topic: &str,
    partitions: &[i32],
    start: Start,
) -> Result<BTreeMap<i32, Offset>> {
    let fixed = |o: Offset| partitions.iter().map(|p| (*p, o)).collect();
    Ok(match start {
        Start::Earliest => fixed(Offset::Beginning),
        Start::Latest => fixed(Offset::End),
        Start::Offset(o) => fixed(Offset::Offset(o)),
        Start::Timestamp(ts) => {
            let mut query = TopicPartitionList::new();
            for p in partitions {
                query.add_partition_offset(topic, *p, Offset::Offset(ts))?;
            }
            let found = lookup
                .offsets_for_times(query, REQUEST_TIMEOUT)
                .context("cannot look up offsets by timestamp")?;
            let mut starts = BTreeMap::new();
            for elem in found.elements() {
                elem.error().with_context(|| {
                    format!("offset for timestamp in partition {}", elem.partition())
                })?;
                // No record at or after the timestamp: start at the end.
                let offset = match elem.offset() {
                    Offset::Offset(o) if o >= 0 => Offset::Offset(o),
                    _ => Offset::End,
                };
                starts.insert(elem.partition(), offset);
            }
            starts
        }
    })
}

fn consume_loop(
    consumer: &BaseConsumer<Positioning>,
    args: &ConsumeArgs,
    stop: &AtomicBool,
    bar: &ProgressBar,
) -> Result<u64> {
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let idle_limit = args.timeout_ms.map(Duration::from_millis);
    let mut last_record = Instant::now();
    let mut count = 0u64;
    let mut line = Vec::with_capacity(1024);
    while !stop.load(Ordering::Relaxed) {
        if args.max_messages.is_some_and(|max| count >= max) {
            break;
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {
                out.flush().context("cannot write to stdout")?;
                if idle_limit.is_some_and(|limit| last_record.elapsed() >= limit) {
                    break;
                }
            }
            Some(Err(e)) => match e {
                KafkaError::MessageConsumption(
                    RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic,
                ) => bail!("topic {:?} does not exist: {e}", args.topic),
                KafkaError::MessageConsumptionFatal(_) => bail!("consumer failed: {e}"),
                _ => warn!("consumer error: {e}"),
            },
            Some(Ok(msg)) => {
                line.clear();
                format_record(&mut line, &msg, args)?;
                if bar.is_hidden() {
                    out.write_all(&line).context("cannot write to stdout")?;
                } else {
                    // Keep the bar from drawing over records on the terminal.
                    bar.suspend(|| out.write_all(&line).and_then(|()| out.flush()))
                        .context("cannot write to stdout")?;
                }
                if args.group.is_some() {
                    consumer
                        .store_offset_from_message(&msg)
                        .context("cannot store the consumed offset")?;
                }
                count += 1;
                bar.inc(1);
                last_record = Instant::now();
            }
        }
    }
    out.flush().context("cannot write to stdout")?;
    Ok(count)
}

fn format_record(line: &mut Vec<u8>, msg: &BorrowedMessage<'_>, args: &ConsumeArgs) -> Result<()> {
    match args.format {
        Format::Text => {
            if args.print_key {
                line.extend_from_slice(msg.key().unwrap_or_default());
                line.push(b'\t');
            }
            line.extend_from_slice(msg.payload().unwrap_or_default());
        }
        Format::Json => {
            serde_json::to_writer(&mut *line, &JsonRecord(msg)).context("cannot encode record")?;
        }
    }
    line.push(b'\n');
    Ok(())
}

/// `{topic, partition, offset, timestamp, key, value, headers}` for one record.
struct JsonRecord<'a, 'b>(&'a BorrowedMessage<'b>);

impl Serialize for JsonRecord<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let m = self.0;
        let mut map = s.serialize_map(Some(7))?;
        map.serialize_entry("topic", m.topic())?;
        map.serialize_entry("partition", &m.partition())?;
        map.serialize_entry("offset", &m.offset())?;
        map.serialize_entry("timestamp", &m.timestamp().to_millis())?;
        map.serialize_entry("key", &Bytes(m.key()))?;
        map.serialize_entry("value", &Bytes(m.payload()))?;
        map.serialize_entry("headers", &JsonHeaders(m))?;
        map.end()
    }
}

struct JsonHeaders<'a, 'b>(&'a BorrowedMessage<'b>);

impl Serialize for JsonHeaders<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let headers = self.0.headers();
        let mut seq = s.serialize_seq(headers.map(|h| h.count()))?;
        if let Some(headers) = headers {
            for h in headers.iter() {
                seq.serialize_element(&JsonHeader {
                    key: h.key,
                    value: Bytes(h.value),
                })?;
            }
        }
        seq.end()
    }
}

#[derive(Serialize)]
struct JsonHeader<'a> {
    key: &'a str,
    value: Bytes<'a>,
}

/// A key, value or header value: a string when it is UTF-8, `null` when
/// absent, else `{"hex": "..."}` so that no byte is lost.
struct Bytes<'a>(Option<&'a [u8]>);

impl Serialize for Bytes<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            None => s.serialize_none(),
            Some(b) => match std::str::from_utf8(b) {
                Ok(text) => s.serialize_str(text),
                Err(_) => {
                    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
                    let mut map = s.serialize_map(Some(1))?;
                    map.serialize_entry("hex", &hex)?;
                    map.end()
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_render_as_utf8_null_or_hex() {
        let j = |b: Option<&[u8]>| serde_json::to_string(&Bytes(b)).unwrap();
        assert_eq!(j(None), "null");
        assert_eq!(j(Some(b"h\xc3\xa9\"")), r#""hé\"""#);
        assert_eq!(j(Some(b"")), r#""""#);
        assert_eq!(j(Some(b"\xff\x00")), r#"{"hex":"ff00"}"#);
    }
}

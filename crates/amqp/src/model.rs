//! Declarations: what a queue or exchange declaration means, the topic that backs a
//! queue, and arguments as stored in the metadata image.

use amq_protocol::types::generation::gen_field_table;
use amq_protocol::types::parsing::parse_field_table;
use amq_protocol::types::{AMQPValue, FieldTable};
use sluice_topology::amqp::{ExchangeState, QueueState};

use crate::error::AmqpError;

/// The default virtual host.
pub use sluice_topology::amqp::DEFAULT_VHOST;

/// Longest Kafka topic name.
const MAX_TOPIC_LEN: usize = 249;

/// The topic that holds a queue's messages.
///
/// `amqp.` followed by the queue name for the default virtual host, and by the
/// virtual host, `..` and the queue name for others. Bytes other than ASCII letters,
/// digits, `-` and `_` are written `.XX` (upper-case hex), so `.` and `..` cannot
/// come from a name and the mapping is one-to-one: queue `task_queue` is topic
/// `amqp.task_queue`, `amq.gen-x` is `amqp.amq.2Egen-x`.
/// `None` when the topic name would be longer than Kafka allows.
pub fn queue_topic(vhost: &str, queue: &str) -> Option<String> {
    let mut topic = String::from("amqp.");
    if vhost != DEFAULT_VHOST {
        escape_into(&mut topic, vhost);
        topic.push_str("..");
    }
    escape_into(&mut topic, queue);
    (topic.len() <= MAX_TOPIC_LEN).then_some(topic)
}

fn escape_into(out: &mut String, name: &str) {
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!(".{b:02X}"));
        }
    }
}

/// A field table as stored in the image.
pub(crate) fn encode_table(t: &FieldTable) -> Vec<u8> {
    match gen_field_table(t)(Vec::new().into()) {
        Ok(ctx) => ctx.into_inner().0,
        Err(_) => Vec::new(),
    }
}

/// A stored field table (empty when the bytes are not one: they are ours).
pub(crate) fn decode_table(bytes: &[u8]) -> FieldTable {
    if bytes.is_empty() {
        return FieldTable::default();
    }
    parse_field_table(bytes).map(|(_, t)| t).unwrap_or_default()
}

/// Whether a redeclaration matches the exchange as it exists (RabbitMQ compares
/// type, durability, auto-delete, internal and arguments).
pub(crate) fn same_exchange(existing: &ExchangeState, wanted: &ExchangeState) -> bool {
    existing.kind == wanted.kind
        && existing.durable == wanted.durable
        && existing.auto_delete == wanted.auto_delete
        && existing.internal == wanted.internal
        && decode_table(&existing.arguments) == decode_table(&wanted.arguments)
}

/// Queue arguments that must match on redeclaration, as RabbitMQ checks them (an
/// argument it does not check, such as `x-single-active-consumer` changes, is
/// ignored likewise).
const EQUIVALENT_ARGS: [&str; 10] = [
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-expires",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-priority",
    "x-message-ttl",
    "x-overflow",
    "x-queue-type",
    "x-stream-topic",
];

/// Why a redeclaration does not match the queue as it exists, if it does not.
pub(crate) fn queue_mismatch(
    name: &str,
    vhost: &str,
    existing: &QueueState,
    durable: bool,
    auto_delete: bool,
    exclusive: bool,
    arguments: &FieldTable,
) -> Option<AmqpError> {
    let field = |what: &str, was: bool, asked: bool| {
        AmqpError::precondition(format!(
            "inequivalent arg '{what}' for queue '{name}' in vhost '{vhost}': received '{asked}' but current is '{was}'"
        ))
    };
    if existing.durable != durable {
        return Some(field("durable", existing.durable, durable));
    }
    if existing.auto_delete != auto_delete {
        return Some(field("auto_delete", existing.auto_delete, auto_delete));
    }
    if existing.exclusive_owner.is_some() != exclusive {
        return Some(field(
            "exclusive",
            existing.exclusive_owner.is_some(),
            exclusive,
        ));
    }
    let was = decode_table(&existing.arguments);
    for key in EQUIVALENT_ARGS {
        let (a, b) = (was.inner().get(key), arguments.inner().get(key));
        let same = match (a, b) {
            (Some(a), Some(b)) => same_value(a, b),
            (None, None) => true,
            // RabbitMQ treats x-queue-type=classic as the default.
            (None, Some(v)) | (Some(v), None) if key == "x-queue-type" => {
                value_text(v).as_deref() == Some("classic")
            }
            _ => false,
        };
        if !same {
            return Some(AmqpError::precondition(format!(
                "inequivalent arg '{key}' for queue '{name}' in vhost '{vhost}': received {} but current is {}",
                describe(b),
                describe(a)
            )));
        }
    }
    None
}

/// Equal as RabbitMQ compares arguments: integers by value whatever their width,
/// strings whether short or long.
fn same_value(a: &AMQPValue, b: &AMQPValue) -> bool {
    match (value_int(a), value_int(b)) {
        (Some(x), Some(y)) => x == y,
        _ => match (value_text(a), value_text(b)) {
            (Some(x), Some(y)) => x == y,
            _ => a == b,
        },
    }
}

pub(crate) fn value_int(v: &AMQPValue) -> Option<i64> {
    Some(match v {
        AMQPValue::ShortShortInt(x) => i64::from(*x),
        AMQPValue::ShortShortUInt(x) => i64::from(*x),
        AMQPValue::ShortInt(x) => i64::from(*x),
        AMQPValue::ShortUInt(x) => i64::from(*x),
        AMQPValue::LongInt(x) => i64::from(*x),
        AMQPValue::LongUInt(x) => i64::from(*x),
        AMQPValue::LongLongInt(x) => *x,
        _ => return None,
    })
}

pub(crate) fn value_text(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn describe(v: Option<&AMQPValue>) -> String {
    match v {
        None => "none".to_owned(),
        Some(v) => value_int(v)
            .map(|i| format!("the value '{i}' of type 'long'"))
            .or_else(|| value_text(v).map(|s| format!("the value '{s}' of type 'longstr'")))
            .unwrap_or_else(|| format!("{v:?}")),
    }
}

/// A duration as RabbitMQ writes `x-max-age` and `x-stream-offset` intervals: a
/// positive number and one of the units Y, M, D, h, m, s (a year is 365 days, a
/// month 30), in milliseconds.
pub(crate) fn parse_age(text: &str) -> Option<u64> {
    let unit = text.chars().last()?;
    let secs: u64 = match unit {
        'Y' => 365 * 86_400,
        'M' => 30 * 86_400,
        'D' => 86_400,
        'h' => 3_600,
        'm' => 60,
        's' => 1,
        _ => return None,
    };
    let n: u64 = text[..text.len() - 1].parse().ok()?;
    (n > 0).then_some(n)?.checked_mul(secs)?.checked_mul(1000)
}

/// What to do with a publish to a full queue (`x-overflow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Overflow {
    /// Drop (dead-letter) the oldest ready messages.
    #[default]
    DropHead,
    /// Refuse the new message (a confirm nack).
    RejectPublish,
    /// Refuse the new message and dead-letter it.
    RejectPublishDlx,
}

/// The queue arguments Sluice acts on, parsed once per queue actor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct QueueArgs {
    /// `x-message-ttl`, milliseconds.
    pub message_ttl: Option<u64>,
    /// `x-expires`: the queue is deleted after this long unused, milliseconds.
    pub expires: Option<u64>,
    pub max_length: Option<u64>,
    pub max_length_bytes: Option<u64>,
    pub overflow: Overflow,
    /// `x-dead-letter-exchange` (`""` is the default exchange).
    pub dead_letter_exchange: Option<String>,
    pub dead_letter_routing_key: Option<String>,
    pub single_active_consumer: bool,
    /// `x-max-priority`: messages are delivered highest `priority` first, up to
    /// this level.
    pub max_priority: Option<u8>,
    /// `x-delivery-limit` (quorum queues): a message returned more often than
    /// this is dead-lettered with reason `delivery_limit`.
    pub delivery_limit: Option<u64>,
    pub kind: QueueKind,
    /// `x-max-age` of a stream queue, milliseconds.
    pub max_age: Option<u64>,
    /// `x-stream-max-segment-size-bytes` of a stream queue.
    pub segment_bytes: Option<u64>,
    /// `x-stream-topic` (Sluice's): the stream queue reads and appends to this
    /// existing topic (a Kafka topic) instead of a topic of its own.
    pub topic: Option<String>,
}

/// `x-queue-type`. Classic and quorum queues are served alike (durable and, in a
/// cluster, replicated); a stream queue is read without consuming.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum QueueKind {
    #[default]
    Classic,
    Quorum,
    Stream,
}

/// The arguments a stream queue takes (RabbitMQ refuses the others with 406).
const STREAM_ARGS: [&str; 8] = [
    "x-queue-type",
    "x-stream-topic",
    "x-max-length-bytes",
    "x-max-age",
    "x-stream-max-segment-size-bytes",
    "x-initial-cluster-size",
    "x-queue-leader-locator",
    "x-stream-filter-size-bytes",
];

impl QueueArgs {
    pub(crate) fn is_bounded(&self) -> bool {
        self.max_length.is_some() || self.max_length_bytes.is_some()
    }
}

/// Checks and parses a queue's arguments as RabbitMQ validates them (406 with
/// RabbitMQ's wording); refuses the ones whose semantics are missing.
pub(crate) fn queue_arguments(
    name: &str,
    vhost: &str,
    arguments: &FieldTable,
) -> Result<QueueArgs, AmqpError> {
    let invalid = |key: &str, why: &str| {
        AmqpError::precondition(format!(
            "invalid arg '{key}' for queue '{name}' in vhost '{vhost}': {why}"
        ))
    };
    let non_negative = |key: &str, v: &AMQPValue| match value_int(v) {
        Some(i) if i >= 0 => Ok(i as u64),
        Some(i) => Err(invalid(key, &format!("{{value_negative,{i}}}"))),
        None => Err(invalid(key, "{unacceptable_type,...}")),
    };
    let text = |key: &str, v: &AMQPValue| {
        value_text(v).ok_or_else(|| invalid(key, "{unacceptable_type,...}"))
    };
    let mut args = QueueArgs::default();
    if let Some(v) = arguments.inner().get("x-queue-type") {
        args.kind = match value_text(v).unwrap_or_default().as_str() {
            "classic" => QueueKind::Classic,
            "quorum" => QueueKind::Quorum,
            "stream" => QueueKind::Stream,
            t => {
                return Err(AmqpError::precondition(format!(
                    "invalid arg 'x-queue-type': queue type '{t}' is not supported"
                )))
            }
        };
    }
    for (key, v) in arguments.inner() {
        let key = key.as_str();
        if args.kind == QueueKind::Stream && key.starts_with("x-") && !STREAM_ARGS.contains(&key) {
            return Err(AmqpError::precondition(format!(
                "invalid arg '{key}' for queue '{name}' in vhost '{vhost}' of queue type rabbit_stream_queue"
            )));
        }
        match key {
            "x-queue-type" => {}
            "x-max-age" => {
                let text = text(key, v)?;
                args.max_age =
                    Some(parse_age(&text).ok_or_else(|| invalid(key, "invalid_max_age"))?);
            }
            "x-stream-topic" => {
                let topic = text(key, v)?;
                if topic.is_empty() {
                    return Err(invalid(key, "empty topic name"));
                }
                // The broker's own logs are written only by the broker.
                if sluice_vocab::internal::is_internal(&topic) {
                    return Err(AmqpError::access_refused(format!(
                        "topic '{topic}' is internal to the broker"
                    )));
                }
                args.topic = Some(topic);
            }
            "x-stream-max-segment-size-bytes" => args.segment_bytes = Some(non_negative(key, v)?),
            "x-message-ttl" => args.message_ttl = Some(non_negative(key, v)?),
            "x-expires" => {
                let ms = non_negative(key, v)?;
                if ms == 0 {
                    return Err(invalid(key, "{value_zero,0}"));
                }
                args.expires = Some(ms);
            }
            "x-max-length" => args.max_length = Some(non_negative(key, v)?),
            "x-max-length-bytes" => args.max_length_bytes = Some(non_negative(key, v)?),
            "x-overflow" => {
                args.overflow = match text(key, v)?.as_str() {
                    "drop-head" => Overflow::DropHead,
                    "reject-publish" => Overflow::RejectPublish,
                    "reject-publish-dlx" => Overflow::RejectPublishDlx,
                    other => return Err(invalid(key, &format!("{{unknown_overflow,{other}}}"))),
                }
            }
            "x-max-priority" => {
                let p = non_negative(key, v)?;
                args.max_priority = Some(
                    u8::try_from(p)
                        .map_err(|_| invalid(key, &format!("{{value_too_large,{p},255}}")))?,
                );
            }
            "x-dead-letter-exchange" => args.dead_letter_exchange = Some(text(key, v)?),
            "x-dead-letter-routing-key" => args.dead_letter_routing_key = Some(text(key, v)?),
            "x-single-active-consumer" => {
                args.single_active_consumer = match v {
                    AMQPValue::Boolean(b) => *b,
                    _ => return Err(invalid(key, "{unacceptable_type,...}")),
                }
            }
            "x-delivery-limit" => args.delivery_limit = Some(non_negative(key, v)?),
            _ => {}
        }
    }
    if args.delivery_limit.is_some() && args.kind == QueueKind::Classic {
        return Err(AmqpError::precondition(format!(
            "invalid arg 'x-delivery-limit' for queue '{name}' in vhost '{vhost}' of queue type rabbit_classic_queue"
        )));
    }
    if args.topic.is_some() && args.kind != QueueKind::Stream {
        return Err(invalid(
            "x-stream-topic",
            "only a stream queue (x-queue-type=stream) reads a topic",
        ));
    }
    if args.dead_letter_routing_key.is_some() && args.dead_letter_exchange.is_none() {
        return Err(AmqpError::precondition(format!(
            "invalid arg 'x-dead-letter-routing-key' for queue '{name}' in vhost '{vhost}': Key 'x-dead-letter-exchange' is mandatory if 'x-dead-letter-routing-key' is set"
        )));
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sluice_vocab::TopicName;

    #[test]
    fn documented_examples() {
        assert_eq!(
            queue_topic("/", "task_queue").as_deref(),
            Some("amqp.task_queue")
        );
        assert_eq!(
            queue_topic("/", "amq.gen-x").as_deref(),
            Some("amqp.amq.2Egen-x")
        );
        assert_eq!(queue_topic("shop", "q").as_deref(), Some("amqp.shop..q"));
        assert_eq!(queue_topic("/", &"q".repeat(250)), None);
    }

    fn name() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop::sample::select(vec!["a", "Z", "0", "-", "_", ".", "..", "/", " ", "é", ":"]),
            0..12,
        )
        .prop_map(|parts| parts.concat())
    }

    proptest! {
        #[test]
        fn distinct_queues_get_distinct_valid_topics(
            a in (prop::sample::select(vec!["/", "shop", "a.b", ""]), name()),
            b in (prop::sample::select(vec!["/", "shop", "a.b", ""]), name()),
        ) {
            let (ta, tb) = (queue_topic(a.0, &a.1), queue_topic(b.0, &b.1));
            if let (Some(ta), Some(tb)) = (&ta, &tb) {
                prop_assert_eq!(ta == tb, a == b, "{:?} {:?} -> {} {}", a, b, ta, tb);
                prop_assert!(TopicName::new(ta).is_ok(), "{} is not a valid topic name", ta);
            }
        }
    }
}

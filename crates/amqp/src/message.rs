//! An AMQP message as a Kafka record of the queue's topic, so Kafka clients read a
//! queue as a topic and the log needs no second format.
//!
//! | record part | holds |
//! |---|---|
//! | key | the routing key the message was published with |
//! | value | the body |
//! | header `amqp.exchange` | the exchange it was published to |
//! | header `amqp.properties` | the content properties exactly as the publisher encoded them (AMQP 0-9-1 property flags and fields) |
//! | timestamp | when the broker received it (ms since the epoch) |
//!
//! A record without `amqp.properties` (produced over Kafka) is delivered with its
//! Kafka headers as AMQP headers (values as long strings) and no other
//! properties, its key as the routing key.

use amq_protocol::frame::WriteContext;
use amq_protocol::protocol::basic::{gen_properties, parse_properties, AMQPProperties};
use amq_protocol::types::{AMQPValue, FieldTable};
use bytes::{Bytes, BytesMut};
use kafka_protocol::records::{Record, RecordBatchDecoder};
use sluice_log::{BatchBuilder, BatchHeader, PlainRecords, RecordsError, StoredRecord};

const EXCHANGE_HEADER: &str = "amqp.exchange";
const PROPERTIES_HEADER: &str = "amqp.properties";

/// A message as published.
#[derive(Debug, Clone)]
pub(crate) struct Publication {
    pub exchange: String,
    pub routing_key: String,
    /// Encoded content properties, as sent.
    pub properties: Bytes,
    pub body: Bytes,
}

impl Publication {
    /// Bytes it takes in a batch, at most (its record's framing and header
    /// names included).
    pub(crate) fn size(&self) -> usize {
        self.exchange.len() + self.routing_key.len() + self.properties.len() + self.body.len() + 96
    }
}

/// A stored message, read back for delivery.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub offset: i64,
    /// When the broker received it, ms since the epoch.
    pub timestamp: i64,
    pub exchange: String,
    pub routing_key: String,
    pub properties: AMQPProperties,
    pub body: Bytes,
}

/// Content properties as a publisher encoded them, parsed; properties that do
/// not parse are delivered as none (the body still goes).
pub(crate) fn decode_properties(raw: &[u8]) -> AMQPProperties {
    parse_properties(raw).map(|(_, p)| p).unwrap_or_default()
}

/// Content properties in their AMQP 0-9-1 encoding (flags, then the fields).
pub(crate) fn encode_properties(p: &AMQPProperties) -> Result<Vec<u8>, String> {
    gen_properties(p)(WriteContext::from(Vec::new()))
        .map(|ctx| ctx.into_inner().0)
        .map_err(|e| e.to_string())
}

pub(crate) use sluice_vocab::now_ms;

/// One RecordBatch holding `messages`, in order.
pub(crate) fn encode_batch(messages: &[&Publication]) -> Result<BytesMut, String> {
    let timestamp = now_ms();
    let mut batch = BatchBuilder::new(messages.iter().map(|m| m.size()).sum(), timestamp);
    for m in messages {
        batch.push(
            timestamp,
            Some(m.routing_key.as_bytes()),
            Some(&m.body),
            &[
                (EXCHANGE_HEADER.as_bytes(), Some(m.exchange.as_bytes())),
                (PROPERTIES_HEADER.as_bytes(), Some(&m.properties)),
            ],
        );
    }
    batch
        .finish()
        .ok_or_else(|| "no message to store".to_string())
}

/// The messages of whole stored batches from `from` on (control records skipped),
/// and the offset after the last record read. Uncompressed batches (all that
/// AMQP publishes write) are read in place; compressed ones, produced over
/// Kafka, by the client codec.
pub(crate) fn decode_batches(mut bytes: Bytes, from: i64) -> Result<(Vec<Stored>, i64), String> {
    let mut out = Vec::new();
    let mut end = from;
    while let Some(header) = BatchHeader::parse(&bytes) {
        if header.size() > bytes.len() {
            // A read returns whole batches; a torn tail is read again later.
            break;
        }
        let batch = bytes.split_to(header.size());
        end = end.max(header.next_offset());
        if header.is_control() {
            continue;
        }
        match PlainRecords::new(batch.clone()) {
            Ok(records) => {
                for record in records {
                    let record = record.map_err(|e| e.to_string())?;
                    if record.offset >= from {
                        out.push(stored_in_place(record));
                    }
                }
            }
            Err(RecordsError::Compressed) => {
                let sets = RecordBatchDecoder::decode_all(&mut batch.clone())
                    .map_err(|e| e.to_string())?;
                for rec in sets.into_iter().flat_map(|set| set.records) {
                    if rec.offset >= from && !rec.control {
                        out.push(stored(rec));
                    }
                }
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok((out, end))
}

fn text(b: Option<&[u8]>) -> String {
    b.map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

fn stored_in_place(rec: StoredRecord) -> Stored {
    let properties = match rec.header(PROPERTIES_HEADER.as_bytes()) {
        Some(raw) => raw.map(|raw| decode_properties(&raw)).unwrap_or_default(),
        None => kafka_properties(rec.headers()),
    };
    Stored {
        offset: rec.offset,
        timestamp: rec.timestamp,
        exchange: text(rec.header(EXCHANGE_HEADER.as_bytes()).flatten().as_deref()),
        routing_key: text(rec.key.as_deref()),
        properties,
        body: rec.value.unwrap_or_default(),
    }
}

fn stored(rec: Record) -> Stored {
    let properties = match rec.headers.get(PROPERTIES_HEADER.as_bytes()) {
        Some(raw) => raw
            .as_ref()
            .map(|raw| decode_properties(raw))
            .unwrap_or_default(),
        None => kafka_properties(
            rec.headers
                .iter()
                .map(|(name, value)| (Bytes::from(name.clone()), value.clone())),
        ),
    };
    let exchange = rec
        .headers
        .get(EXCHANGE_HEADER.as_bytes())
        .and_then(|v| v.as_deref());
    Stored {
        offset: rec.offset,
        timestamp: rec.timestamp,
        exchange: text(exchange),
        routing_key: text(rec.key.as_deref()),
        properties,
        body: rec.value.unwrap_or_default(),
    }
}

/// The properties of a record produced over Kafka: its headers as AMQP headers
/// (values as long strings, a null value as void).
fn kafka_properties(headers: impl Iterator<Item = (Bytes, Option<Bytes>)>) -> AMQPProperties {
    let mut table = FieldTable::default();
    for (name, value) in headers {
        let value = match value {
            Some(v) => AMQPValue::LongString(v.to_vec().into()),
            None => AMQPValue::Void,
        };
        table.insert(String::from_utf8_lossy(&name).as_ref().into(), value);
    }
    if table.inner().is_empty() {
        return AMQPProperties::default();
    }
    AMQPProperties::default().with_headers(table)
}

impl Stored {
    /// When it expires (ms since the epoch): the queue's TTL or its own
    /// `expiration` property, whichever comes first.
    pub(crate) fn expires_at(&self, queue_ttl: Option<u64>) -> Option<i64> {
        let own = self
            .properties
            .expiration()
            .as_ref()
            .and_then(|e| e.as_str().parse::<u64>().ok());
        [queue_ttl, own]
            .into_iter()
            .flatten()
            .map(|ttl| {
                self.timestamp
                    .saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX))
            })
            .min()
    }

    pub(crate) fn body_len(&self) -> u64 {
        self.body.len() as u64
    }

    /// The message as it is re-published to a dead-letter exchange: an `x-death`
    /// entry for (`queue`, `reason`) first in the list (its count raised when there
    /// was one), the `x-first-death-*` headers set once, and `expiration` removed
    /// (kept in the entry as `original-expiration`), as RabbitMQ does.
    pub(crate) fn dead_lettered(
        &self,
        queue: &str,
        reason: &str,
        exchange: &str,
        routing_key: &str,
    ) -> Result<Publication, String> {
        let p = &self.properties;
        let mut headers = p.headers().clone().unwrap_or_default();
        let mut deaths: Vec<AMQPValue> = match headers.inner().get("x-death") {
            Some(AMQPValue::FieldArray(a)) => a.as_slice().to_vec(),
            _ => Vec::new(),
        };
        let same = |v: &AMQPValue| match v {
            AMQPValue::FieldTable(t) => {
                text_of(t.inner().get("queue")).as_deref() == Some(queue)
                    && text_of(t.inner().get("reason")).as_deref() == Some(reason)
            }
            _ => false,
        };
        let mut count = 1i64;
        if let Some(i) = deaths.iter().position(same) {
            if let AMQPValue::FieldTable(t) = deaths.remove(i) {
                if let Some(AMQPValue::LongLongInt(c)) = t.inner().get("count") {
                    count = c + 1;
                }
            }
        }
        let long = |s: &str| AMQPValue::LongString(s.as_bytes().to_vec().into());
        let mut entry = FieldTable::default();
        entry.insert("count".into(), AMQPValue::LongLongInt(count));
        entry.insert("reason".into(), long(reason));
        entry.insert("queue".into(), long(queue));
        entry.insert(
            "time".into(),
            AMQPValue::Timestamp(u64::try_from(now_ms() / 1000).unwrap_or(0)),
        );
        entry.insert("exchange".into(), long(&self.exchange));
        entry.insert(
            "routing-keys".into(),
            AMQPValue::FieldArray(vec![long(&self.routing_key)].into()),
        );
        if let Some(e) = p.expiration() {
            entry.insert("original-expiration".into(), long(e.as_str()));
        }
        deaths.insert(0, AMQPValue::FieldTable(entry));
        headers.insert("x-death".into(), AMQPValue::FieldArray(deaths.into()));
        for (k, v) in [
            ("x-first-death-exchange", self.exchange.as_str()),
            ("x-first-death-queue", queue),
            ("x-first-death-reason", reason),
        ] {
            if !headers.contains_key(k) {
                headers.insert(k.into(), long(v));
            }
        }
        let mut out = AMQPProperties::default().with_headers(headers);
        if let Some(v) = p.content_type() {
            out = out.with_content_type(v.clone());
        }
        if let Some(v) = p.content_encoding() {
            out = out.with_content_encoding(v.clone());
        }
        if let Some(v) = p.delivery_mode() {
            out = out.with_delivery_mode(*v);
        }
        if let Some(v) = p.priority() {
            out = out.with_priority(*v);
        }
        if let Some(v) = p.correlation_id() {
            out = out.with_correlation_id(v.clone());
        }
        if let Some(v) = p.reply_to() {
            out = out.with_reply_to(v.clone());
        }
        if let Some(v) = p.message_id() {
            out = out.with_message_id(v.clone());
        }
        if let Some(v) = p.timestamp() {
            out = out.with_timestamp(*v);
        }
        if let Some(v) = p.kind() {
            out = out.with_type(v.clone());
        }
        if let Some(v) = p.user_id() {
            out = out.with_user_id(v.clone());
        }
        if let Some(v) = p.app_id() {
            out = out.with_app_id(v.clone());
        }
        if let Some(v) = p.cluster_id() {
            out = out.with_cluster_id(v.clone());
        }
        let encoded = encode_properties(&out)?;
        Ok(Publication {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            properties: Bytes::from(encoded),
            body: self.body.clone(),
        })
    }
}

fn text_of(v: Option<&AMQPValue>) -> Option<String> {
    match v? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

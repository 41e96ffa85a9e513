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
//! A record without `amqp.properties` (produced over Kafka) is delivered with no
//! properties, its key as the routing key.

use std::time::{SystemTime, UNIX_EPOCH};

use amq_protocol::protocol::basic::{parse_properties, AMQPProperties};
use bytes::{Bytes, BytesMut};
use kafka_protocol::indexmap::IndexMap;
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions,
    TimestampType, NO_PARTITION_LEADER_EPOCH, NO_PRODUCER_EPOCH, NO_PRODUCER_ID, NO_SEQUENCE,
};

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

/// A stored message, read back for delivery.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub offset: i64,
    pub exchange: String,
    pub routing_key: String,
    pub properties: AMQPProperties,
    pub body: Bytes,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// One RecordBatch holding `messages`, in order.
pub(crate) fn encode_batch(messages: &[&Publication]) -> Result<BytesMut, String> {
    let timestamp = now_ms();
    let records: Vec<Record> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let mut headers = IndexMap::with_capacity(2);
            headers.insert(
                StrBytes::from_static_str(EXCHANGE_HEADER),
                Some(Bytes::copy_from_slice(m.exchange.as_bytes())),
            );
            headers.insert(
                StrBytes::from_static_str(PROPERTIES_HEADER),
                Some(m.properties.clone()),
            );
            Record {
                transactional: false,
                control: false,
                delete_horizon: false,
                partition_leader_epoch: NO_PARTITION_LEADER_EPOCH,
                producer_id: NO_PRODUCER_ID,
                producer_epoch: NO_PRODUCER_EPOCH,
                timestamp_type: TimestampType::Creation,
                offset: i64::try_from(i).unwrap_or(i64::MAX),
                sequence: NO_SEQUENCE,
                timestamp,
                key: Some(Bytes::copy_from_slice(m.routing_key.as_bytes())),
                value: Some(m.body.clone()),
                headers,
            }
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &records,
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .map_err(|e| e.to_string())?;
    Ok(buf)
}

/// The messages of whole stored batches from `from` on (control records skipped),
/// and the offset after the last record read.
pub(crate) fn decode_batches(mut bytes: Bytes, from: i64) -> Result<(Vec<Stored>, i64), String> {
    let sets = RecordBatchDecoder::decode_all(&mut bytes).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut end = from;
    for set in sets {
        for rec in set.records {
            end = end.max(rec.offset + 1);
            if rec.offset < from || rec.control {
                continue;
            }
            out.push(stored(rec));
        }
    }
    Ok((out, end))
}

fn stored(rec: Record) -> Stored {
    let text = |b: Option<&Option<Bytes>>| {
        b.and_then(|v| v.as_ref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    let exchange = text(rec.headers.get(EXCHANGE_HEADER.as_bytes())).unwrap_or_default();
    let properties = rec
        .headers
        .get(PROPERTIES_HEADER.as_bytes())
        .and_then(|v| v.as_ref())
        .and_then(|raw| parse_properties(&raw[..]).ok().map(|(_, p)| p))
        .unwrap_or_default();
    let routing_key = rec
        .key
        .as_ref()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .unwrap_or_default();
    Stored {
        offset: rec.offset,
        exchange,
        routing_key,
        properties,
        body: rec.value.unwrap_or_default(),
    }
}

//! The frame decoder under mutation (the in-suite, bounded form of the
//! `decode_frames` fuzz target): valid frame sequences are decoded whole, and any
//! mutation of them returns without a panic.

use amq_protocol::frame::{AMQPContentHeader, AMQPFrame};
use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::protocol::{basic, queue, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable};
use proptest::prelude::*;

use crate::raw::encode;

fn frames(routing_key: String, body: Vec<u8>, header_value: i64) -> Vec<AMQPFrame> {
    let mut headers = FieldTable::default();
    headers.insert("n".into(), AMQPValue::LongLongInt(header_value));
    vec![
        AMQPFrame::Method(
            1,
            AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                queue: routing_key.as_str().into(),
                passive: false,
                durable: true,
                exclusive: false,
                auto_delete: false,
                nowait: false,
                arguments: headers.clone(),
            })),
        ),
        AMQPFrame::Method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: "".into(),
                routing_key: routing_key.as_str().into(),
                mandatory: true,
                immediate: false,
            })),
        ),
        AMQPFrame::Header(
            1,
            AMQPContentHeader {
                class_id: 60,
                body_size: body.len() as u64,
                properties: AMQPProperties::default()
                    .with_headers(headers)
                    .with_delivery_mode(2),
            },
        ),
        AMQPFrame::Body(1, body),
        AMQPFrame::Heartbeat,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn valid_frames_decode_whole(
        key in "[a-z.]{0,40}",
        body in proptest::collection::vec(any::<u8>(), 0..2048),
        n in any::<i64>(),
    ) {
        let fs = frames(key, body, n);
        let bytes: Vec<u8> = fs.iter().flat_map(encode).collect();
        prop_assert_eq!(sluice_amqp::decode_client_bytes(&bytes, 131_072), fs.len());
    }

    #[test]
    fn mutated_frames_never_panic(
        key in "[a-z.]{0,40}",
        body in proptest::collection::vec(any::<u8>(), 0..512),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes: Vec<u8> = frames(key, body, 7).iter().flat_map(encode).collect();
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        let end = cut.index(bytes.len() + 1);
        let decoded = sluice_amqp::decode_client_bytes(&bytes[..end], 4096);
        prop_assert!(decoded <= 5);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = sluice_amqp::decode_client_bytes(&bytes, 4096);
    }
}

/// A peer-session frame: `[len][head len][JSON head][payload]`.
fn peer_frame(head: &str, payload: &[u8]) -> Vec<u8> {
    let len = 4 + head.len() + payload.len();
    let mut out = (len as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&(head.len() as u32).to_be_bytes());
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(payload);
    out
}

#[test]
fn peer_frames_decode_and_their_bounds_hold() {
    let ping = peer_frame(r#"{"Ping":{"id":7}}"#, b"");
    let mut two = ping.clone();
    two.extend_from_slice(&ping);
    assert_eq!(sluice_amqp::decode_peer_bytes(&two, 1 << 20), 2);
    // A frame longer than the bound is refused before it is read.
    assert_eq!(sluice_amqp::decode_peer_bytes(&ping, 8), 0);
    // A head that claims more than the frame holds.
    let mut lying = ping.clone();
    lying[4..8].copy_from_slice(&1000u32.to_be_bytes());
    assert_eq!(sluice_amqp::decode_peer_bytes(&lying, 1 << 20), 0);
    // A frame cut short.
    assert_eq!(
        sluice_amqp::decode_peer_bytes(&ping[..ping.len() - 1], 1 << 20),
        0
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn peer_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = sluice_amqp::decode_peer_bytes(&bytes, 1 << 20);
    }

    #[test]
    fn mutated_peer_frames_never_panic(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut bytes = peer_frame(
            r#"{"Publish":{"id":1,"vhost":"/","queue":"q","exchange":"","routing_key":"q","properties_len":0}}"#,
            b"body",
        );
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        prop_assert!(sluice_amqp::decode_peer_bytes(&bytes, 1 << 20) <= 2);
    }
}

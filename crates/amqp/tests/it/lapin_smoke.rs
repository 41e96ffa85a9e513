//! lapin, a second client implementation (the one Rust services use), against the
//! same listener: declare, publish with confirms, consume with acks, get, and the
//! redelivery of what a closed channel left unacknowledged.

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use sluice_testkit::Broker;

use crate::raw::WAIT;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_publishes_with_confirms_and_consumes_with_acks() {
    let b = Broker::start().await;
    let url = format!("amqp://guest:guest@{}/%2f", b.amqp_addr);
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("lapin connects");
    let ch = conn.create_channel().await.expect("a channel");
    ch.queue_declare(
        "lapin".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declared");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    let mut confirms = Vec::new();
    for i in 0..200u32 {
        let confirm = ch
            .basic_publish(
                "".into(),
                "lapin".into(),
                BasicPublishOptions::default(),
                format!("m{i}").as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("published");
        confirms.push(confirm);
    }
    for c in confirms {
        assert!(c.await.expect("confirmed").is_ack());
    }

    // basic.get takes the first one, unacknowledged; its channel then closes.
    let getter = conn.create_channel().await.expect("a channel");
    let first = getter
        .basic_get("lapin".into(), BasicGetOptions::default())
        .await
        .expect("get")
        .expect("a message");
    assert_eq!(first.delivery.data, b"m0");
    assert!(!first.delivery.redelivered);
    getter.close(200, "bye".into()).await.expect("closed");

    ch.basic_qos(50, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = ch
        .basic_consume(
            "lapin".into(),
            "c1".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consuming");
    let mut bodies = Vec::new();
    while bodies.len() < 200 {
        let delivery = tokio::time::timeout(WAIT, consumer.next())
            .await
            .expect("a delivery in time")
            .expect("the consumer stays open")
            .expect("a delivery");
        // m0 comes back first, marked redelivered: its channel closed unacked.
        if bodies.is_empty() {
            assert_eq!(delivery.data, b"m0");
            assert!(delivery.redelivered);
        }
        bodies.push(String::from_utf8(delivery.data.clone()).expect("utf-8"));
        delivery
            .ack(BasicAckOptions::default())
            .await
            .expect("acked");
    }
    let mut expected: Vec<String> = (0..200).map(|i| format!("m{i}")).collect();
    expected.sort();
    bodies.sort();
    assert_eq!(bodies, expected);
    conn.close(200, "done".into()).await.expect("closed");
    b.stop().await;
}

//! Flow control: while the resource alarm is raised, a publishing connection is
//! sent `connection.blocked` and nothing more is read from it; once it clears,
//! `connection.unblocked` follows and the held publish is stored. Connections
//! that do not publish are served throughout.

use std::sync::Arc;

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{basic, connection, queue, AMQPClass};
use sluice_testkit::Broker;
use tokio::sync::watch;

use crate::raw::{declare, Raw, WAIT};

/// basic.get on `ch`: the body, or `None` for get-empty.
async fn get(c: &mut Raw, ch: u16, queue: &str) -> Option<Vec<u8>> {
    c.method(
        ch,
        AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
            queue: queue.into(),
            no_ack: true,
        })),
    )
    .await;
    match c.recv_method().await {
        Some((_, AMQPClass::Basic(basic::AMQPMethod::GetEmpty(_)))) => None,
        Some((_, AMQPClass::Basic(basic::AMQPMethod::GetOk(_)))) => {
            let Some(AMQPFrame::Header(..)) = c.recv().await else {
                panic!("expected a content header");
            };
            match c.recv().await {
                Some(AMQPFrame::Body(_, body)) => Some(body),
                other => panic!("expected a body, got {other:?}"),
            }
        }
        other => panic!("expected get-ok or get-empty, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_waits_out_the_alarm_and_its_message_is_stored_after() {
    let (alarm, rx) = watch::channel(None);
    let b = Broker::start_with(|s| s.amqp_alarm = Some(rx)).await;
    alarm.send_replace(Some(Arc::from("low on disk")));

    let mut reader = Raw::open(b.amqp_addr, 131_072).await;
    reader.open_channel(1).await;
    reader.method(1, declare("held")).await;
    let Some((1, AMQPClass::Queue(queue::AMQPMethod::DeclareOk(_)))) = reader.recv_method().await
    else {
        panic!("a connection that does not publish is served under the alarm");
    };

    let mut publisher = Raw::open(b.amqp_addr, 131_072).await;
    publisher.open_channel(1).await;
    publisher.publish_header(1, "held", 5).await;
    publisher.send(AMQPFrame::Body(1, b"hello".to_vec())).await;
    match publisher.recv_method().await {
        Some((0, AMQPClass::Connection(connection::AMQPMethod::Blocked(b)))) => {
            assert_eq!(b.reason.as_str(), "low on disk");
        }
        other => panic!("expected connection.blocked, got {other:?}"),
    }
    // Held, not stored; the reader is still served.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(get(&mut reader, 1, "held").await, None);

    alarm.send_replace(None);
    match tokio::time::timeout(WAIT, publisher.recv_method()).await {
        Ok(Some((0, AMQPClass::Connection(connection::AMQPMethod::Unblocked(_))))) => {}
        other => panic!("expected connection.unblocked, got {other:?}"),
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(body) = get(&mut reader, 1, "held").await {
            assert_eq!(body, b"hello");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the held publish was not stored after the alarm cleared"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    b.stop().await;
}

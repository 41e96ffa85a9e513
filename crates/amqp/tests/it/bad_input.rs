//! What a hostile or broken client gets: the close code RabbitMQ would give, and
//! nothing for any other connection.

use amq_protocol::frame::{AMQPContentHeader, AMQPFrame};
use amq_protocol::protocol::{channel, connection, queue, AMQPClass};
use sluice_testkit::Broker;
use tokio::io::AsyncReadExt;

use crate::raw::{declare, Raw, WAIT};

/// A healthy connection still declares a queue and gets its answer.
async fn still_serves(c: &mut Raw, ch: u16, name: &str) {
    c.method(ch, declare(name)).await;
    match c.recv_method().await {
        Some((got, AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)))) => {
            assert_eq!(got, ch);
            assert_eq!(ok.queue.as_str(), name);
        }
        other => panic!("expected queue.declare-ok, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_protocol_gets_our_header_back_and_the_socket_closed() {
    let b = Broker::start().await;
    let mut c = Raw::connect(b.amqp_addr).await;
    c.send_bytes(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(c.recv_bytes().await, b"AMQP\x00\x00\x09\x01");
    let mut c = Raw::connect(b.amqp_addr).await;
    c.send_bytes(b"AMQP\x00\x00\x08\x00").await;
    assert_eq!(c.recv_bytes().await, b"AMQP\x00\x00\x09\x01");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_above_frame_max_closes_only_its_connection_with_501() {
    let b = Broker::start().await;
    let mut bad = Raw::open(b.amqp_addr, 4096).await;
    let mut good = Raw::open(b.amqp_addr, 4096).await;
    good.open_channel(1).await;
    bad.open_channel(1).await;
    // A body frame announcing 1 MB on a 4 KiB connection: refused from its header,
    // before any of the payload is read or buffered.
    let mut header = vec![3u8, 0, 1];
    header.extend_from_slice(&1_000_000u32.to_be_bytes());
    bad.send_bytes(&header).await;
    let (code, text) = bad.expect_connection_close().await;
    assert_eq!(code, 501, "{text}");
    assert!(text.starts_with("FRAME_ERROR"), "{text}");
    still_serves(&mut good, 1, "after-frame-max").await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_after_the_handshake_closes_only_its_connection() {
    let b = Broker::start().await;
    let mut bad = Raw::open(b.amqp_addr, 131_072).await;
    let mut good = Raw::open(b.amqp_addr, 131_072).await;
    good.open_channel(7).await;
    // An unknown frame type, then a method frame whose payload is no method.
    bad.send_bytes(&[9, 0, 0, 0, 0, 0, 0, 0xCE]).await;
    let (code, _) = bad.expect_connection_close().await;
    assert_eq!(code, 501);
    let mut bad = Raw::open(b.amqp_addr, 131_072).await;
    bad.send_bytes(&[1, 0, 1, 0, 0, 0, 3, 0xFF, 0xFF, 0xFF, 0xCE])
        .await;
    let (code, _) = bad.expect_connection_close().await;
    assert_eq!(code, 501);
    still_serves(&mut good, 7, "after-garbage").await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_out_of_order_are_505_and_an_unopened_channel_is_504() {
    let b = Broker::start().await;
    // A content header with no basic.publish before it.
    let mut c = Raw::open(b.amqp_addr, 131_072).await;
    c.open_channel(1).await;
    c.send(AMQPFrame::Header(
        1,
        AMQPContentHeader {
            class_id: 60,
            body_size: 3,
            properties: Default::default(),
        },
    ))
    .await;
    let (code, text) = c.expect_connection_close().await;
    assert_eq!(code, 505, "{text}");
    // A method in the middle of a message's content.
    let mut c = Raw::open(b.amqp_addr, 131_072).await;
    c.open_channel(1).await;
    c.publish_header(1, "q", 10).await;
    c.method(1, declare("mid-content")).await;
    let (code, text) = c.expect_connection_close().await;
    assert_eq!(code, 505, "{text}");
    // A method on a channel never opened.
    let mut c = Raw::open(b.amqp_addr, 131_072).await;
    c.method(5, declare("no-channel")).await;
    let (code, text) = c.expect_connection_close().await;
    assert_eq!(code, 504, "{text}");
    // A second channel.open of the same channel.
    let mut c = Raw::open(b.amqp_addr, 131_072).await;
    c.open_channel(2).await;
    c.method(
        2,
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    )
    .await;
    let (code, _) = c.expect_connection_close().await;
    assert_eq!(code, 504);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_larger_than_the_maximum_is_refused_from_its_header() {
    let b = Broker::start_with(|s| s.amqp.max_message_bytes = 1024).await;
    let mut c = Raw::open(b.amqp_addr, 131_072).await;
    c.open_channel(1).await;
    c.open_channel(2).await;
    still_serves(&mut c, 2, "bounded").await;
    // 1 GiB announced: the channel closes at the header; nothing is buffered.
    c.publish_header(1, "bounded", 1 << 30).await;
    let (code, text) = c.expect_channel_close(1).await;
    assert_eq!(code, 406, "{text}");
    assert!(
        text.contains("larger than configured max size 1024"),
        "{text}"
    );
    // The connection and its other channel carry on.
    still_serves(&mut c, 2, "bounded").await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_longer_than_announced_is_a_frame_error() {
    let b = Broker::start().await;
    let mut c = Raw::open(b.amqp_addr, 131_072).await;
    c.open_channel(1).await;
    c.publish_header(1, "q", 3).await;
    c.send(AMQPFrame::Body(1, b"12345".to_vec())).await;
    let (code, _) = c.expect_connection_close().await;
    assert_eq!(code, 501);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_numbers_above_channel_max_are_530() {
    let b = Broker::start_with(|s| s.amqp.channel_max = 16).await;
    let mut c = Raw::open(b.amqp_addr, 131_072).await;
    c.open_channel(16).await;
    c.method(
        17,
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    )
    .await;
    let (code, text) = c.expect_connection_close().await;
    assert_eq!(code, 530, "{text}");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_and_unknown_mechanisms_are_403() {
    let b = Broker::start().await;
    for (mechanism, response) in [
        ("PLAIN", &b"\0guest\0wrong"[..]),
        ("PLAIN", &b"no separators"[..]),
        ("EXTERNAL", &b""[..]),
        // AMQPLAIN with a truncated table.
        ("AMQPLAIN", &b"\x05LOGINS\x00\x00\x00\x09gu"[..]),
    ] {
        let mut c = Raw::started(b.amqp_addr).await;
        c.start_ok(mechanism, response).await;
        let (code, text) = c.expect_connection_close().await;
        assert_eq!(code, 403, "{mechanism}: {text}");
        assert!(text.starts_with("ACCESS_REFUSED"), "{text}");
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqplain_logs_in() {
    let b = Broker::start().await;
    let mut c = Raw::started(b.amqp_addr).await;
    // LOGIN and PASSWORD as long strings, without the table's length prefix.
    let mut table = Vec::new();
    for (k, v) in [("LOGIN", "guest"), ("PASSWORD", "guest")] {
        table.push(u8::try_from(k.len()).unwrap());
        table.extend_from_slice(k.as_bytes());
        table.push(b'S');
        table.extend_from_slice(&u32::try_from(v.len()).unwrap().to_be_bytes());
        table.extend_from_slice(v.as_bytes());
    }
    c.start_ok("AMQPLAIN", &table).await;
    match c.recv_method().await {
        Some((0, AMQPClass::Connection(connection::AMQPMethod::Tune(t)))) => {
            assert_eq!(t.frame_max, 131_072);
            assert_eq!(t.channel_max, 2047);
            assert_eq!(t.heartbeat, 60);
        }
        other => panic!("expected connection.tune, got {other:?}"),
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_max_below_the_minimum_is_refused() {
    let b = Broker::start().await;
    let mut c = Raw::started(b.amqp_addr).await;
    c.start_ok("PLAIN", b"\0guest\0guest").await;
    let Some((0, AMQPClass::Connection(connection::AMQPMethod::Tune(_)))) = c.recv_method().await
    else {
        panic!("expected connection.tune");
    };
    c.method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
            channel_max: 0,
            frame_max: 1024,
            heartbeat: 0,
        })),
    )
    .await;
    let (code, text) = c.expect_connection_close().await;
    assert_eq!(code, 530, "{text}");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_dropped_after_missing_heartbeats() {
    let b = Broker::start().await;
    let mut c = Raw::open_with(b.amqp_addr, 131_072, 1).await;
    let started = tokio::time::Instant::now();
    let mut heartbeats = 0;
    // The server beats every half interval and, hearing nothing for two
    // intervals, closes the socket.
    while let Some(frame) = c.recv().await {
        assert!(started.elapsed() < WAIT, "still open after {WAIT:?}");
        if matches!(frame, AMQPFrame::Heartbeat) {
            heartbeats += 1;
        }
    }
    assert!(heartbeats >= 1, "the server sent no heartbeat");
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(2),
        "closed after {:?}, before two intervals",
        started.elapsed()
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_that_never_finishes_is_dropped() {
    let b = Broker::start().await;
    let mut c = Raw::started(b.amqp_addr).await;
    // No start-ok: the server gives up after its handshake timeout (10 s).
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 1024];
    let end = tokio::time::timeout(WAIT * 3, async {
        while c.socket.read(&mut buf).await.is_ok_and(|n| n > 0) {}
    })
    .await;
    assert!(end.is_ok(), "still open after {:?}", started.elapsed());
    b.stop().await;
}

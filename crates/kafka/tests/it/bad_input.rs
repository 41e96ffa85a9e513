//! Bad input: each case closes (or answers) only the offending connection;
//! afterwards another connection produces and fetches, and the data written
//! before is read back unchanged.

use std::collections::BTreeMap;

use bytes::{BufMut, BytesMut};
use kafka_protocol::messages::*;
use sluice_vocab::ErrorCode;
use tokio::io::AsyncWriteExt;

use crate::harness::*;

type Log = Vec<(i64, String, String)>;

/// A server with a topic holding a few records.
async fn seeded() -> (Server, Log) {
    let server = Server::start().await;
    server.create_topic("safe", 1).await;
    let mut c = server.client().await;
    let k = keys(5, "seed-");
    assert_eq!(
        produce(&mut c, "safe", 0, batch(&strs(&k), 1_000)).await,
        (0, 0)
    );
    let (_, _, log) = fetch(&mut c, "safe", 0, 0).await;
    assert_eq!(log.len(), 5);
    (server, log)
}

/// Another connection still works and the log is intact.
async fn assert_healthy(server: &Server, log: &mut Log, tag: &str) {
    let mut c = server.client().await;
    let key = format!("after-{tag}");
    let (code, offset) = produce(&mut c, "safe", 0, batch(&[&key], 2_000)).await;
    assert_eq!(code, 0, "produce after {tag}");
    assert_eq!(
        offset,
        log.len() as i64,
        "nothing else was appended ({tag})"
    );
    log.push((offset, key.clone(), format!("value-of-{key}")));
    let (code, _, got) = fetch(&mut c, "safe", 0, 0).await;
    assert_eq!(code, 0);
    assert_eq!(&got, log, "log intact after {tag}");
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as i32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

#[tokio::test]
async fn garbage_and_bad_frames_close_only_that_connection() {
    let (server, mut log) = seeded().await;
    // An idle bystander connection opened before the bad ones stays usable.
    let mut bystander = server.client().await;

    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "garbage",
            frame(b"\xde\xad\xbe\xef this is not kafka at all \x00\x01\x02"),
        ),
        ("all-ones", frame(&[0xff; 64])),
        ("2GiB-length", 0x7fff_ffffu32.to_be_bytes().to_vec()),
        ("negative-length", (-5i32).to_be_bytes().to_vec()),
        (
            "unknown-api-key",
            frame(&[0x03, 0xe7, 0, 0, 0, 0, 0, 1, 0, 0]),
        ),
        ("short-header", frame(&[0, 18])),
        // A Metadata v9 header that claims a 10,000-byte client id.
        (
            "bad-header",
            frame(&[0, 3, 0, 9, 0, 0, 0, 1, 0x27, 0x10, b'x']),
        ),
        // A valid header (Produce v9) followed by a body cut short.
        (
            "bad-body",
            frame(&[0, 0, 0, 9, 0, 0, 0, 1, 0, 1, b'c', 0, 0xff, 0xff, 0x80]),
        ),
    ];
    for (tag, bytes) in cases {
        let mut c = server.client().await;
        c.send_raw(&bytes).await;
        assert!(c.closed_by_server().await, "{tag}: connection closed");
        assert_healthy(&server, &mut log, tag).await;
    }

    // A truncated frame: the length promises more than ever arrives.
    let mut c = server.client().await;
    let mut partial = 100i32.to_be_bytes().to_vec();
    partial.extend_from_slice(&[0, 18, 0, 3, 0, 0]);
    c.send_raw(&partial).await;
    c.stream.shutdown().await.unwrap();
    assert!(c.closed_by_server().await, "truncated: connection closed");
    assert_healthy(&server, &mut log, "truncated").await;

    let resp = bystander.call(&ApiVersionsRequest::default(), 3).await;
    assert_eq!(resp.error_code, 0, "bystander unaffected");
    server.stop().await;
}

#[tokio::test]
async fn oversized_request_is_refused_before_reading_it() {
    let server = Server::start_with(|s| s.server.max_request_bytes = 1024).await;
    server.create_topic("safe", 1).await;
    let mut c = server.client().await;
    // Just the size prefix: refused without waiting for (or allocating) the body.
    c.send_raw(&2048i32.to_be_bytes()).await;
    assert!(c.closed_by_server().await);
    let mut log = Vec::new();
    assert_healthy(&server, &mut log, "oversized").await;
    server.stop().await;
}

#[tokio::test]
async fn corrupt_batch_gets_corrupt_message() {
    let (server, mut log) = seeded().await;
    let mut c = server.client().await;
    // Flip a byte of the records area: the CRC no longer matches.
    let good = batch(&["corrupt-me"], 3_000);
    let mut bad = BytesMut::from(&good[..]);
    let last = bad.len() - 1;
    bad[last] ^= 0x55;
    let (code, offset) = produce(&mut c, "safe", 0, bad.freeze()).await;
    assert_eq!(code, ErrorCode::CorruptMessage.code());
    assert_eq!(offset, -1);
    // A batch whose length field lies.
    let mut lying = BytesMut::from(&good[..]);
    lying[8..12].copy_from_slice(&1_000_000i32.to_be_bytes());
    let (code, _) = produce(&mut c, "safe", 0, lying.freeze()).await;
    assert_eq!(code, ErrorCode::CorruptMessage.code());
    // Not a batch at all; and an empty record set.
    let (code, _) = produce(&mut c, "safe", 0, bytes::Bytes::from_static(b"rubbish")).await;
    assert_eq!(code, ErrorCode::CorruptMessage.code());
    // The same connection keeps working.
    let resp = c.call(&ApiVersionsRequest::default(), 3).await;
    assert_eq!(resp.error_code, 0);
    assert_healthy(&server, &mut log, "corrupt batch").await;
    server.stop().await;
}

#[tokio::test]
async fn oversized_batch_gets_message_too_large() {
    let (server, mut log) = seeded().await;
    let mut overrides = BTreeMap::new();
    overrides.insert("max.message.bytes".to_string(), "1000".to_string());
    server.create_topic_with("small", 1, overrides).await;
    let mut c = server.client().await;
    let big: Vec<String> = (0..20).map(|i| format!("{i:0>100}")).collect();
    let (code, _) = produce(&mut c, "small", 0, batch(&strs(&big), 1)).await;
    assert_eq!(code, ErrorCode::MessageTooLarge.code());
    let (code, offset) = produce(&mut c, "small", 0, batch(&["fits"], 1)).await;
    assert_eq!((code, offset), (0, 0));
    let (_, hw, _) = fetch(&mut c, "small", 0, 0).await;
    assert_eq!(hw, 1);
    assert_healthy(&server, &mut log, "message too large").await;
    server.stop().await;
}

/// A failed allocation aborts the process rather than panicking, so the
/// case runs in a child process: a regression fails this test instead of
/// killing every other test of the binary.
#[tokio::test]
async fn huge_array_count_does_not_take_the_broker_down() {
    let exe = std::env::current_exe().unwrap();
    let out = tokio::process::Command::new(exe)
        .args([
            "--exact",
            "bad_input::huge_array_count_child",
            "--ignored",
            "--test-threads=1",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "the broker died or misbehaved on a huge array count: {:?}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"));
}

#[tokio::test]
#[ignore = "run in a child process by huge_array_count_does_not_take_the_broker_down"]
async fn huge_array_count_child() {
    let (server, mut log) = seeded().await;
    let mut c = server.client().await;
    // Produce v3 header, then transactional_id null, acks, timeout and a
    // topic array claiming 2^31-1 entries with nothing behind it.
    let mut body = BytesMut::new();
    body.put_i16(0);
    body.put_i16(3);
    body.put_i32(1);
    body.put_i16(-1); // client id null
    body.put_i16(-1); // transactional id null
    body.put_i16(-1); // acks
    body.put_i32(1000);
    body.put_i32(i32::MAX);
    c.send_raw(&frame(&body)).await;
    assert!(c.closed_by_server().await);
    assert_healthy(&server, &mut log, "huge array").await;
    server.stop().await;
}

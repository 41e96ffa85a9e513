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
    seeded_with(|_| {}).await
}

/// [`seeded`], with settings changed by `tweak`.
async fn seeded_with(tweak: impl FnOnce(&mut Setup)) -> (Server, Log) {
    let server = Server::start_with(tweak).await;
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

/// A fetch request for `partitions` of `topic`, each listed `times` times,
/// asking for everything (no client-side limit).
fn greedy_fetch(topic: &str, partitions: i32, times: usize) -> FetchRequest {
    use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
    let listed = (0..times)
        .flat_map(|_| 0..partitions)
        .map(|p| {
            FetchPartition::default()
                .with_partition(p)
                .with_fetch_offset(0)
                .with_partition_max_bytes(i32::MAX)
        })
        .collect();
    FetchRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_max_wait_ms(0)
        .with_min_bytes(0)
        .with_max_bytes(i32::MAX)
        .with_session_epoch(-1)
        .with_topics(vec![FetchTopic::default()
            .with_topic(name(topic))
            .with_partitions(listed)])
}

fn record_bytes(resp: &FetchResponse) -> usize {
    resp.responses
        .iter()
        .flat_map(|t| &t.partitions)
        .map(|p| p.records.as_ref().map_or(0, |r| r.len()))
        .sum()
}

/// However much a client asks for, one Fetch response holds at most the
/// broker's fetch cap of record bytes, and a partition listed many times is
/// read and answered once (Kafka collapses duplicates). Without both, a few
/// hundred request bytes could make the broker build a response of hundreds
/// of megabytes.
#[tokio::test]
async fn fetch_responses_are_capped_and_each_partition_is_read_once() {
    const CAP: usize = 256 * 1024;
    let server = Server::start_with(|s| s.server.fetch_max_bytes = CAP).await;
    server.create_topic("big", 4).await;
    let mut c = server.client().await;
    // Batches of about 100 KiB: 50 records with 1,000-byte keys (and values).
    let prefix = "k".repeat(1_000);
    for p in 0..4 {
        for b in 0..8 {
            let k = keys(50, &format!("{prefix}-{b}-"));
            assert_eq!(
                produce(&mut c, "big", p, batch(&strs(&k), 1_000)).await.0,
                0
            );
        }
    }
    let resp = c.call(&greedy_fetch("big", 4, 20), 11).await;
    assert_eq!(resp.error_code, 0);
    let answered: Vec<i32> = resp.responses[0]
        .partitions
        .iter()
        .map(|p| p.partition_index)
        .collect();
    assert_eq!(answered, vec![0, 1, 2, 3], "each partition answered once");
    let total = record_bytes(&resp);
    assert!(total > 0 && total <= CAP, "{total} record bytes, cap {CAP}");
    // What came back is whole batches, from offset 0.
    let first = decode(
        resp.responses[0].partitions[0]
            .records
            .clone()
            .unwrap_or_default(),
    );
    assert_eq!(first.first().map(|r| r.0), Some(0));
    assert_eq!(first.len() % 50, 0);
}

/// The cap never stalls a consumer: a batch larger than the cap is still
/// returned, alone, as the first data of a response (KIP-74).
#[tokio::test]
async fn a_batch_above_the_fetch_cap_is_still_delivered() {
    const CAP: usize = 64 * 1024;
    let server = Server::start_with(|s| s.server.fetch_max_bytes = CAP).await;
    server.create_topic("wide", 1).await;
    let mut c = server.client().await;
    let prefix = "w".repeat(1_000);
    for b in 0..2 {
        let k = keys(100, &format!("{prefix}-{b}-"));
        assert_eq!(
            produce(&mut c, "wide", 0, batch(&strs(&k), 1_000)).await.0,
            0
        );
    }
    let resp = c.call(&greedy_fetch("wide", 1, 1), 11).await;
    let got = decode(
        resp.responses[0].partitions[0]
            .records
            .clone()
            .unwrap_or_default(),
    );
    assert_eq!(got.len(), 100, "exactly the first (oversized) batch");
    assert!(record_bytes(&resp) > CAP);
    let (_, _, rest) = fetch(&mut c, "wide", 0, 100).await;
    assert_eq!(rest.len(), 100, "and the next one after it");
}

/// A fresh connection that got an answer to ApiVersions, or `None` when the
/// broker closed it (at its connection limit).
async fn served(server: &Server) -> Option<Raw> {
    use tokio::io::AsyncReadExt;
    let mut c = server.client().await;
    let (_, frame) = c.frame(&ApiVersionsRequest::default(), 3);
    let mut stream = c.into_stream();
    stream.write_all(&frame).await.ok()?;
    let mut size = [0u8; 4];
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_exact(&mut size),
    )
    .await
    .ok()?
    .ok()?;
    let mut body = vec![0u8; usize::try_from(i32::from_be_bytes(size)).ok()?];
    stream.read_exact(&mut body).await.ok()?;
    Some(Raw::from_stream(stream))
}

/// Polls until a fresh connection is served, at most `limit`.
async fn served_within(server: &Server, limit: std::time::Duration) -> Option<Raw> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(c) = served(server).await {
            return Some(c);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A client that goes away while its long-poll Fetch waits takes the request
/// with it: the connection's slot is free at once, not when the poll's max
/// wait (here ten minutes) runs out.
#[tokio::test]
async fn an_abandoned_long_poll_frees_its_connection_slot() {
    let server = Server::start_with(|s| s.server.max_connections = 2).await;
    server.create_topic("quiet", 1).await;
    let limit = std::time::Duration::from_secs(5);
    // Both slots: served connections that then wait on a long poll.
    let mut polls = Vec::new();
    for _ in 0..2 {
        let mut c = served_within(&server, limit)
            .await
            .expect("a free slot while fewer than two are taken");
        let req = fetch_request("quiet", 0, 0)
            .with_max_wait_ms(600_000)
            .with_min_bytes(1);
        c.send(&req, 11).await;
        polls.push(c);
    }
    // The broker is full: a third connection is refused.
    assert!(served(&server).await.is_none(), "the limit holds");
    drop(polls);
    assert!(
        served_within(&server, limit).await.is_some(),
        "the abandoned long polls still hold the connection slots"
    );
}

/// Sockets this process holds open, from /proc (the broker's and the test
/// clients' ends alike).
fn open_sockets() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("socket:"))
        .count()
}

/// The open socket count once `want` holds for it, or after 5 s.
async fn sockets_once(want: impl Fn(usize) -> bool) -> usize {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let n = open_sockets();
        if want(n) || std::time::Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Fifty clients that start a ten-minute long poll and go away leave no
/// socket behind: the broker closes its ends as soon as they close theirs
/// (counted in /proc), not when the polls would have ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_long_polls_leave_no_open_sockets() {
    const CLIENTS: usize = 50;
    let server = Server::start().await;
    server.create_topic("quiet", 1).await;
    let baseline = open_sockets();
    let mut polls = Vec::new();
    for _ in 0..CLIENTS {
        let mut c = server.client().await;
        let req = fetch_request("quiet", 0, 0)
            .with_max_wait_ms(600_000)
            .with_min_bytes(1);
        c.send(&req, 11).await;
        polls.push(c);
    }
    // Both ends of every connection are open while the polls wait.
    let waiting = sockets_once(|n| n >= baseline + 2 * CLIENTS).await;
    assert!(
        waiting >= baseline + 2 * CLIENTS,
        "{waiting} sockets, baseline {baseline}"
    );
    drop(polls);
    let after = sockets_once(|n| n <= baseline).await;
    assert!(
        after <= baseline,
        "{after} sockets 5 s after the clients left (baseline {baseline})"
    );
    // And the broker still serves.
    let mut c = server.client().await;
    let (code, _) = produce(&mut c, "quiet", 0, batch(&["k"], 1_000)).await;
    assert_eq!(code, 0);
}

/// A real one-record batch, changed by `f` and sealed again (length and
/// CRC-32C recomputed), as a client that means it would send it.
fn forged(f: impl FnOnce(&mut Vec<u8>)) -> bytes::Bytes {
    let mut b = batch(&["forged"], 1_000).to_vec();
    f(&mut b);
    seal(&mut b);
    b.into()
}

/// Producing `records` to `safe` is refused with CORRUPT_MESSAGE, naming
/// `bad_record` as the failing record; nothing is appended and the log
/// stays usable.
async fn assert_corrupt(
    server: &Server,
    log: &mut Log,
    what: &str,
    records: bytes::Bytes,
    bad_record: Option<i32>,
) {
    let mut c = server.client().await;
    let resp = c.call(&produce_request("safe", 0, records, -1), 9).await;
    let p = &resp.responses[0].partition_responses[0];
    assert_eq!(
        p.error_code,
        ErrorCode::CorruptMessage.code(),
        "{what}: {p:?}"
    );
    assert_eq!(
        p.record_errors.first().map(|e| e.batch_index),
        bad_record,
        "{what}: {p:?}"
    );
    assert_healthy(server, log, what).await;
}

/// Batches whose CRC is right but whose records are not what the header says
/// are refused with CORRUPT_MESSAGE, as Kafka's LogValidator refuses them:
/// nothing is appended (no phantom offsets), and the records produced after
/// them are delivered to consumers.
#[tokio::test]
async fn batches_whose_records_lie_are_refused() {
    let (server, mut log) = seeded().await;
    let set_count = |count: i32| {
        move |b: &mut Vec<u8>| {
            b[23..27].copy_from_slice(&(count - 1).to_be_bytes());
            b[57..61].copy_from_slice(&count.to_be_bytes());
        }
    };
    let cases: Vec<(&str, bytes::Bytes, Option<i32>)> = vec![
        ("count 5, one record", forged(set_count(5)), Some(1)),
        (
            "count 2^31-1 in 70 bytes",
            forged(set_count(i32::MAX)),
            Some(1),
        ),
        (
            "40 bytes of 0xff as the record",
            forged(|b| {
                b.truncate(61);
                b.extend_from_slice(&[0xff; 40]);
            }),
            Some(0),
        ),
        ("unknown codec 7", forged(|b| b[22] |= 7), None),
    ];
    for (what, records, bad_record) in cases {
        assert_corrupt(&server, &mut log, what, records, bad_record).await;
    }
}

/// Compressed batches are walked like plain ones: a lying count inside a
/// gzip batch, garbage records inside zstd, and a "bomb" (a batch that
/// decompresses to 16 to 1,000 times its size, more than `max_decompressed_batch_bytes`) in every codec are
/// refused with CORRUPT_MESSAGE, and nothing of them is appended; honest
/// batches of every codec are accepted; consumers read on past the refusals.
#[tokio::test]
async fn compressed_batches_are_walked_and_bombs_refused() {
    const LIMIT: usize = 1 << 20;
    let (server, mut log) = seeded_with(|s| s.server.max_decompressed_batch_bytes = LIMIT).await;
    let plain = batch(&["one"], 1_000);
    let bomb = {
        // One record whose value is zeros, twice the limit.
        let mut b = batch(&["k"], 1_000).to_vec();
        b.truncate(61);
        let value = vec![0u8; 2 * LIMIT];
        // Attributes, timestamp and offset deltas 0, a null key (zigzag -1).
        let mut fields = vec![0u8, 0, 0, 1];
        varint(value.len() as i64, &mut fields);
        fields.extend(&value);
        fields.push(0); // no headers
        let mut record = Vec::new();
        varint(fields.len() as i64, &mut record);
        record.extend(fields);
        b.extend(record);
        seal(&mut b);
        b
    };
    let mut garbage = plain.to_vec();
    garbage.truncate(61);
    garbage.extend([0xff; 40]);
    seal(&mut garbage);
    let mut lying = plain.to_vec();
    lying[57..61].copy_from_slice(&3i32.to_be_bytes());
    lying[23..27].copy_from_slice(&2i32.to_be_bytes());
    seal(&mut lying);
    let mut cases: Vec<(String, Vec<u8>, Option<i32>)> = vec![
        (
            "gzip, count 3, one record".into(),
            with_codec(&lying, 1),
            Some(1),
        ),
        (
            "zstd, 40 bytes of 0xff".into(),
            with_codec(&garbage, 4),
            Some(0),
        ),
    ];
    for (codec, name) in CODECS {
        let b = with_codec(&bomb, codec);
        assert!(
            b.len() < bomb.len() / 16,
            "{name} bomb is {} bytes",
            b.len()
        );
        cases.push((format!("{name} bomb"), b, None));
    }
    for (what, records, bad_record) in cases {
        assert_corrupt(&server, &mut log, &what, records.into(), bad_record).await;
    }
    for (codec, name) in CODECS {
        let key = format!("honest-{name}");
        let mut c = server.client().await;
        let honest = with_codec(&batch(&[&key], 3_000), codec);
        let (code, offset) = produce(&mut c, "safe", 0, honest.into()).await;
        assert_eq!((code, offset), (0, log.len() as i64), "{name}");
        log.push((offset, key.clone(), format!("value-of-{key}")));
        assert_healthy(&server, &mut log, name).await;
    }
}

/// A zigzag varint, as records encode lengths.
fn varint(v: i64, out: &mut Vec<u8>) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

/// A connection that sends nothing is closed after `connections_max_idle`
/// (Kafka's connections.max.idle.ms); one that keeps sending requests is not.
#[tokio::test]
async fn idle_connections_are_closed_and_busy_ones_are_not() {
    let idle = std::time::Duration::from_millis(300);
    let server = Server::start_with(|s| s.server.connections_max_idle = idle).await;
    let mut quiet = served(&server).await.expect("served");
    let mut busy = served(&server).await.expect("served");
    let started = tokio::time::Instant::now();
    while started.elapsed() < idle * 4 {
        let resp = busy.call(&ApiVersionsRequest::default(), 3).await;
        assert_eq!(resp.error_code, 0);
        tokio::time::sleep(idle / 3).await;
    }
    assert!(
        quiet.closed_by_server().await,
        "the idle connection is closed"
    );
    let resp = busy.call(&ApiVersionsRequest::default(), 3).await;
    assert_eq!(resp.error_code, 0, "the busy one still serves");
}

/// At most `max_connections_per_ip` connections from one address; a slot is
/// free again once one of them closes.
#[tokio::test]
async fn connections_per_address_are_limited() {
    let server = Server::start_with(|s| s.server.max_connections_per_ip = 2).await;
    let limit = std::time::Duration::from_secs(5);
    let first = served_within(&server, limit).await.expect("first");
    let _second = served_within(&server, limit).await.expect("second");
    assert!(
        served(&server).await.is_none(),
        "a third from 127.0.0.1 is refused"
    );
    drop(first);
    assert!(
        served_within(&server, limit).await.is_some(),
        "a slot frees when a connection closes"
    );
}

/// This process's resident memory, from /proc.
fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// Creates topic `big` with about 8 MiB in its one partition (4,000 records
/// in batches of about 200 KiB); returns the client that wrote them.
async fn big_partition(server: &Server) -> Raw {
    server.create_topic("big", 1).await;
    let mut c = server.client().await;
    // About 8 MiB in the partition, in batches of about 200 KiB.
    let prefix = "b".repeat(1_000);
    for b in 0..40 {
        let k = keys(100, &format!("{prefix}-{b}-"));
        assert_eq!(
            produce(&mut c, "big", 0, batch(&strs(&k), 1_000)).await.0,
            0
        );
    }
    c
}

/// A client that sends requests and never reads the answers costs the broker
/// about its unsent-response budget plus one response, not a queue of full
/// responses; once it reads, every answer arrives. (In a child process: the
/// measure is this process's RSS.)
#[tokio::test]
async fn a_client_that_never_reads_costs_a_bounded_amount() {
    crate::fuzz::run_child("bad_input::never_reading_client_child").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run in a child process by a_client_that_never_reads_costs_a_bounded_amount"]
async fn never_reading_client_child() {
    const BUDGET: usize = 8 * 1024 * 1024;
    const REQUESTS: usize = 32;
    let server = Server::start_with(|s| s.server.max_unsent_response_bytes = BUDGET).await;
    let mut c = big_partition(&server).await;
    let (_, hw, _) = fetch(&mut c, "big", 0, 0).await;
    assert_eq!(hw, 4_000);
    let before = rss_bytes();
    let mut greedy = server.client().await;
    let req = greedy_fetch("big", 1, 1);
    for _ in 0..REQUESTS {
        greedy.send(&req, 11).await;
    }
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let grown = rss_bytes().saturating_sub(before);
    // Unbounded, this is REQUESTS full answers: about 256 MiB.
    assert!(
        grown < 96 * 1024 * 1024,
        "RSS grew by {} MiB for a client that does not read",
        grown >> 20
    );
    for i in 0..REQUESTS {
        let (_, resp) = greedy.recv::<FetchRequest>(11).await;
        let records = resp.responses[0].partitions[0]
            .records
            .as_ref()
            .map_or(0, |r| r.len());
        assert!(records > 7 * 1024 * 1024, "answer {i}: {records} bytes");
    }
}

/// Many clients that send fetches and do not read the answers hold, all
/// together, about the broker-wide `max_in_flight_bytes` (answers are cut
/// to what is left of it, down to one batch), not each its own
/// unsent-response budget; meanwhile a client that reads its answers is
/// served as usual. Once they read, every answer arrives. (In a child
/// process: the measure is this process's RSS.)
#[tokio::test]
async fn clients_together_hold_at_most_the_in_flight_budget() {
    crate::fuzz::run_child("bad_input::in_flight_budget_child").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run in a child process by clients_together_hold_at_most_the_in_flight_budget"]
async fn in_flight_budget_child() {
    const BUDGET: usize = 16 * 1024 * 1024;
    const CLIENTS: usize = 8;
    const REQUESTS: usize = 8;
    let server = Server::start_with(|s| s.server.max_in_flight_bytes = BUDGET).await;
    big_partition(&server).await;
    let before = rss_bytes();
    let req = greedy_fetch("big", 1, 1);
    let mut greedy = Vec::new();
    for _ in 0..CLIENTS {
        let mut g = server.client().await;
        for _ in 0..REQUESTS {
            g.send(&req, 11).await;
        }
        greedy.push(g);
    }
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let grown = rss_bytes().saturating_sub(before);
    // Each connection's own budget (64 MiB) would let every answer be
    // built: CLIENTS * REQUESTS * 8 MiB = 512 MiB.
    assert!(
        grown < 160 * 1024 * 1024,
        "RSS grew by {} MiB for {CLIENTS} clients that do not read",
        grown >> 20
    );
    // A client that reads its answers is not held up by those that do not.
    let mut other = server.client().await;
    let (code, offset) = produce(&mut other, "big", 0, batch(&["late"], 1_000)).await;
    assert_eq!((code, offset), (0, 4_000));
    let (code, _, _) = fetch(&mut other, "big", 0, 4_000).await;
    assert_eq!(code, 0);
    // Every answer arrives once the clients read, at the pace they read.
    let readers = greedy.into_iter().enumerate().map(|(i, mut g)| {
        tokio::spawn(async move {
            for r in 0..REQUESTS {
                let (_, resp) = g.recv::<FetchRequest>(11).await;
                // Cut to what was left of the budget, at least one batch.
                assert!(record_bytes(&resp) > 0, "client {i} answer {r}");
            }
        })
    });
    for r in futures::future::join_all(readers).await {
        r.unwrap();
    }
}

/// Topic creation and deletion do their file-system work off the async
/// workers: while three clients each create (then delete) a topic of 600
/// partitions, another client's produce and fetch round trips stay short.
/// (Before, two or three such creates stalled every client for 1.7-7.3 s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_creates_and_deletes_do_not_stall_other_clients() {
    use kafka_protocol::messages::create_topics_request::CreatableTopic;
    use kafka_protocol::messages::delete_topics_request::DeleteTopicState;
    use std::time::{Duration, Instant};
    const PARTITIONS: i32 = 600;
    const CREATORS: usize = 3;
    let (server, log) = seeded().await;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = tokio::spawn({
        let mut c = server.client().await;
        let done = done.clone();
        async move {
            let mut worst = Duration::ZERO;
            let mut rounds = 0u32;
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                let t0 = Instant::now();
                let (code, _) = produce(&mut c, "safe", 0, batch(&["probe"], 1_000)).await;
                assert_eq!(code, 0);
                let (code, _, _) = fetch(&mut c, "safe", 0, 0).await;
                assert_eq!(code, 0);
                worst = worst.max(t0.elapsed());
                rounds += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (worst, rounds)
        }
    });
    let started = Instant::now();
    let creators = (0..CREATORS).map(|i| {
        let server = &server;
        async move {
            let mut c = server.client().await;
            let topic = format!("wide-{i}");
            let req = CreateTopicsRequest::default()
                .with_timeout_ms(60_000)
                .with_topics(vec![CreatableTopic::default()
                    .with_name(name(&topic))
                    .with_num_partitions(PARTITIONS)
                    .with_replication_factor(1)]);
            let resp = c.call(&req, 7).await;
            assert_eq!(resp.topics[0].error_code, 0, "{resp:?}");
            // Its last partition serves once its leader is in place (a
            // client retries NOT_LEADER_OR_FOLLOWER until then, as with Kafka).
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let (code, _) = produce(&mut c, &topic, PARTITIONS - 1, batch(&["w"], 1_000)).await;
                if code == 0 {
                    break;
                }
                assert_eq!(
                    code,
                    ErrorCode::NotLeaderOrFollower.code(),
                    "produce to {topic}"
                );
                assert!(
                    Instant::now() < deadline,
                    "{topic} has no leader after 30 s"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let req = DeleteTopicsRequest::default()
                .with_timeout_ms(60_000)
                .with_topics(vec![
                    DeleteTopicState::default().with_name(Some(name(&topic)))
                ]);
            let resp = c.call(&req, 6).await;
            assert_eq!(resp.responses[0].error_code, 0, "{resp:?}");
        }
    });
    futures::future::join_all(creators).await;
    let control_plane = started.elapsed();
    done.store(true, std::sync::atomic::Ordering::Release);
    let (worst, rounds) = probe.await.unwrap();
    println!(
        "{CREATORS} creates+deletes of {PARTITIONS} partitions took {control_plane:?}; \
         {rounds} produce+fetch round trips meanwhile, the slowest {worst:?}"
    );
    assert!(rounds > 0);
    assert!(
        worst < Duration::from_millis(1_000),
        "a produce+fetch round trip took {worst:?} while topics were created"
    );
    // The probes' records are all there, after the seeded ones.
    let mut c = server.client().await;
    let (_, hw, _) = fetch(&mut c, "safe", 0, 0).await;
    assert_eq!(hw, log.len() as i64 + i64::from(rounds));
}

/// Consumers that read as fast as they can share the response budget too:
/// with sixteen of them fetching everything from an 8 MiB partition at
/// once, the broker cuts answers to what is left of `max_in_flight_bytes`
/// (down to one batch, KIP-74) instead of building sixteen 8 MiB answers,
/// and every consumer still reads the whole partition. (In a child process:
/// the measure is this process's peak RSS, sampled while they read.)
#[tokio::test]
async fn consumers_reading_at_once_share_the_in_flight_budget() {
    crate::fuzz::run_child("bad_input::sharing_consumers_child").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run in a child process by consumers_reading_at_once_share_the_in_flight_budget"]
async fn sharing_consumers_child() {
    const BUDGET: usize = 8 * 1024 * 1024;
    const CONSUMERS: usize = 16;
    let server = Server::start_with(|s| s.server.max_in_flight_bytes = BUDGET).await;
    big_partition(&server).await;
    let before = rss_bytes();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = tokio::spawn({
        let done = done.clone();
        async move {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                peak = peak.max(rss_bytes());
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            peak
        }
    });
    let mut consumers = Vec::new();
    for _ in 0..CONSUMERS {
        let mut c = server.client().await;
        consumers.push(tokio::spawn(async move {
            let (mut offset, mut fetches) = (0i64, 0u32);
            while offset < 4_000 {
                let mut req = greedy_fetch("big", 1, 1);
                req.topics[0].partitions[0].fetch_offset = offset;
                let resp = c.call(&req, 11).await;
                let p = &resp.responses[0].partitions[0];
                assert_eq!(p.error_code, 0);
                // Offsets from the batch headers: decoding the records would
                // weigh on this process's RSS, the measure.
                let mut raw = p.records.as_deref().unwrap_or_default();
                while raw.len() >= 61 {
                    let base = i64::from_be_bytes(raw[..8].try_into().unwrap());
                    let last_delta = i32::from_be_bytes(raw[23..27].try_into().unwrap());
                    assert_eq!(base, offset, "batches dense from {offset}");
                    offset = base + i64::from(last_delta) + 1;
                    let len = i32::from_be_bytes(raw[8..12].try_into().unwrap());
                    raw = &raw[12 + usize::try_from(len).unwrap()..];
                }
                fetches += 1;
            }
            fetches
        }));
    }
    let mut fetches = 0;
    for c in consumers {
        fetches += c.await.unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::Release);
    let grown = sampler.await.unwrap().saturating_sub(before);
    println!(
        "{CONSUMERS} consumers read 8 MiB each in {fetches} fetches; peak RSS +{} MiB",
        grown >> 20
    );
    // Whole answers (16 x 8 MiB on the broker, read into the clients in the
    // same process) peaked at 137-178 MiB in runs without the budget; with
    // it, 60-87 MiB (answers in the making are not counted until built).
    assert!(
        grown < 100 * 1024 * 1024,
        "RSS grew by {} MiB while {CONSUMERS} consumers read",
        grown >> 20
    );
}

/// A client that stops taking its answers without closing (a stopped
/// process keeps its receive window at zero) is closed once it has been idle
/// for `connections_max_idle`, and the answers it held go back to the
/// in-flight budget: afterwards another client's fetch is answered whole,
/// not cut to what the stuck one left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_gives_its_budget_back_when_idle() {
    const BUDGET: usize = 16 * 1024 * 1024;
    let server = Server::start_with(|s| {
        s.server.max_in_flight_bytes = BUDGET;
        s.server.connections_max_idle = std::time::Duration::from_secs(1);
    })
    .await;
    big_partition(&server).await;
    let baseline = open_sockets();
    let mut stuck = server.client().await;
    let req = greedy_fetch("big", 1, 1);
    for _ in 0..8 {
        stuck.send(&req, 11).await;
    }
    // Its answers fill the budget: another client's answer is cut meanwhile.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // Past the idle limit (1 s) the broker closes it and frees what it held:
    // within a few seconds another client's fetch is answered whole. (Waiting
    // on the socket count alone can end early: a socket of the setup closing
    // late lowers the count as much as the stuck one's broker end.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let whole = loop {
        let mut other = server.client().await;
        let got = record_bytes(&other.call(&req, 11).await);
        if got > 7 * 1024 * 1024 || std::time::Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert!(
        whole > 7 * 1024 * 1024,
        "answer cut to {whole} bytes 5 s after the idle limit: the budget was not given back"
    );
    let after = sockets_once(|n| n <= baseline + 1).await;
    assert!(
        after <= baseline + 1,
        "{after} sockets: the stuck connection's broker end is still open (baseline {baseline})"
    );
    drop(stuck);
}

/// Clients that announce large request frames and then send nothing hold
/// up no one: a frame counts against the in-flight budget only once it has
/// arrived, so another client is served at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_frames_that_never_arrive_stall_no_one() {
    const BUDGET: usize = 16 * 1024 * 1024;
    let (server, mut log) = seeded_with(|s| s.server.max_in_flight_bytes = BUDGET).await;
    let mut stalled = Vec::new();
    for _ in 0..6 {
        let mut c = server.client().await;
        // A size prefix of 90 MiB, then silence.
        c.stream
            .write_all(&(90i32 << 20).to_be_bytes())
            .await
            .unwrap();
        stalled.push(c);
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let served = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        assert_healthy(&server, &mut log, "announced frames"),
    )
    .await;
    assert!(
        served.is_ok(),
        "another client waited on frames that never arrived"
    );
    drop(stalled);
}

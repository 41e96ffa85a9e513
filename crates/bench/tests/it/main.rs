//! Integration tests of sluice-bench against an in-process Sluice broker
//! (the same listener `sluice serve` runs) on 127.0.0.1:0.

// A failed unwrap is a failed test (clippy.toml allows it in #[test] fns only).
#![allow(clippy::unwrap_used)]

mod nexmark;

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::records::Compression;
use sluice_bench::cluster::{self, EARLIEST, LATEST};
use sluice_bench::{count_records, Acks, BenchConfig, Mode};
use sluice_testkit::Broker;

struct Server(Broker);

impl Server {
    async fn start() -> Server {
        Server(Broker::start().await)
    }

    fn config(&self, mode: Mode, topic: &str) -> BenchConfig {
        BenchConfig::new(mode, &self.0.addr.to_string(), topic)
    }

    async fn stop(self) {
        self.0.stop().await;
    }
}

/// Records the topic holds according to ListOffsets (latest - earliest).
async fn held(server: &Server, topic: &str) -> u64 {
    let mut conn = cluster::bootstrap(&server.0.addr.to_string())
        .await
        .unwrap();
    let c = cluster::discover(&mut conn, topic, None).await.unwrap();
    let earliest = cluster::list_offsets(&c, EARLIEST).await.unwrap();
    let latest = cluster::list_offsets(&c, LATEST).await.unwrap();
    earliest
        .iter()
        .zip(&latest)
        .map(|(e, l)| (l - e) as u64)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_then_consume_exactly_n() {
    let server = Server::start().await;
    let mut cfg = server.config(Mode::Produce, "pc");
    cfg.partitions = Some(3);
    cfg.records = Some(25_000);
    cfg.batch_bytes = 16 * 1024; // several batches per partition
    let r = sluice_bench::run(cfg).await.unwrap();
    assert_eq!(r.records, 25_000);
    assert_eq!(r.partitions, 3);
    assert_eq!(r.mode, "produce");
    assert!(r.records_per_sec > 0.0);
    assert!(r.latency_ms.max >= r.latency_ms.p50 && r.latency_ms.p50 > 0.0);
    assert!(r.client_cpu_seconds > 0.0);
    assert_eq!(held(&server, "pc").await, 25_000);

    let mut cfg = server.config(Mode::Consume, "pc");
    cfg.consumers = 2;
    let r = sluice_bench::run(cfg).await.unwrap();
    assert_eq!(r.records, 25_000, "consume reads exactly what is there");
    assert_eq!(r.latency_of, "fetch");
    assert_eq!(r.littles_law.unit, "fetch_requests");

    // A second produce appends; consume then sees both runs.
    let mut cfg = server.config(Mode::Produce, "pc");
    cfg.records = Some(5_000);
    cfg.producers = 2;
    cfg.compression = Compression::Zstd;
    cfg.acks = Acks::Leader;
    assert_eq!(sluice_bench::run(cfg).await.unwrap().records, 5_000);
    assert_eq!(held(&server, "pc").await, 30_000);
    let mut cfg = server.config(Mode::Consume, "pc");
    assert_eq!(
        sluice_bench::run(cfg.clone()).await.unwrap().records,
        30_000
    );
    // --records bounds a consume run (whole fetches may pass it a little).
    cfg.records = Some(100);
    let r = sluice_bench::run(cfg).await.unwrap();
    assert!(r.records >= 100 && r.records <= 30_000, "{}", r.records);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_zero_and_codecs_round_trip() {
    let server = Server::start().await;
    for (i, c) in [
        Compression::None,
        Compression::Gzip,
        Compression::Snappy,
        Compression::Lz4,
        Compression::Zstd,
    ]
    .into_iter()
    .enumerate()
    {
        let mut cfg = server.config(Mode::Produce, "codecs");
        cfg.records = Some(2_000);
        cfg.compression = c;
        cfg.batch_bytes = 8 * 1024;
        cfg.acks = if i == 0 { Acks::None } else { Acks::All };
        let r = sluice_bench::run(cfg).await.unwrap();
        assert_eq!(r.records, 2_000, "{c:?}");
    }
    // acks=0 gets no answer: wait until the broker has appended it all.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while held(&server, "codecs").await < 10_000 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(held(&server, "codecs").await, 10_000);
    let r = sluice_bench::run(server.config(Mode::Consume, "codecs"))
        .await
        .unwrap();
    assert_eq!(r.records, 10_000);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_open_loop_measures_latency() {
    let server = Server::start().await;
    let mut cfg = server.config(Mode::E2e, "e2e");
    cfg.partitions = Some(2);
    cfg.rate = Some(20_000.0);
    cfg.records = Some(10_000);
    cfg.consumers = 2;
    let r = sluice_bench::run(cfg).await.unwrap();
    assert_eq!(r.records, 10_000);
    assert_eq!(r.latency_of, "end_to_end");
    assert!(r.latency_ms.p50 > 0.0);
    assert!(r.latency_ms.p999 >= r.latency_ms.p50);
    assert!(r.latency_ms.mean > 0.0);
    // Open loop at 20k/s: 10k records cannot take less than about 0.5 s.
    assert!(r.duration_s >= 0.45, "{}", r.duration_s);
    assert!(r.records_per_sec <= 22_000.0, "{}", r.records_per_sec);
    assert!(r.littles_law.mean_in_flight > 0.0);
    assert!(r.littles_law.throughput_x_mean_latency > 0.0);
    assert_eq!(r.target_rate, Some(20_000.0));
    let acks = r
        .ack_latency_ms
        .expect("e2e reports the producers' ack latency");
    assert!(acks.p50 > 0.0 && acks.max >= acks.p50);
    // The records are in the topic, once.
    assert_eq!(held(&server, "e2e").await, 10_000);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duration_runs_and_json_has_every_field() {
    let server = Server::start().await;
    let mut cfg = server.config(Mode::Produce, "dur");
    cfg.duration = Some(Duration::from_millis(500));
    cfg.rate = Some(10_000.0);
    let r = sluice_bench::run(cfg).await.unwrap();
    // 0.5 s at 10k/s: records 0..4999 are due before the end.
    assert_eq!(r.records, 5_000);
    assert_eq!(held(&server, "dur").await, 5_000);

    let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
    for key in [
        "mode",
        "bootstrap",
        "topic",
        "record_size",
        "records",
        "duration_s",
        "records_per_sec",
        "mb_per_sec",
        "latency_ms",
        "client_cpu_seconds",
        "client_cpu_share",
        "littles_law",
        "acks",
        "compression",
        "producers",
        "consumers",
        "partitions",
    ] {
        assert!(v.get(key).is_some(), "missing {key}: {v}");
    }
    for key in ["p50", "p90", "p99", "p999", "max", "mean"] {
        assert!(v["latency_ms"][key].is_number(), "latency_ms.{key}: {v}");
    }
    for key in ["mean_in_flight", "throughput_x_mean_latency"] {
        assert!(v["littles_law"][key].is_number(), "littles_law.{key}: {v}");
    }
    assert!(v["littles_law"]["agree"].is_boolean());
    assert_eq!(v["mode"], "produce");
    assert_eq!(v["acks"], "all");
    assert_eq!(v["records"], 5_000);
    let table = r.table();
    assert!(
        table.contains("records/s") && table.contains("p99.9"),
        "{table}"
    );

    // Closed loop for a duration stops on time.
    let mut cfg = server.config(Mode::Produce, "dur2");
    cfg.duration = Some(Duration::from_millis(300));
    let r = sluice_bench::run(cfg).await.unwrap();
    assert!(r.records > 0);
    assert!(r.duration_s < 5.0, "{}", r.duration_s);
    assert_eq!(held(&server, "dur2").await, r.records);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_reported() {
    let server = Server::start().await;
    let err = sluice_bench::run(server.config(Mode::Consume, "nothing-here"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    let mut cfg = server.config(Mode::Produce, "x");
    cfg.record_size = 4;
    assert!(sluice_bench::run(cfg).await.is_err());
    let mut cfg = BenchConfig::new(Mode::Produce, "127.0.0.1:1", "x");
    cfg.records = Some(1);
    let err = sluice_bench::run(cfg).await.unwrap_err();
    assert!(err.to_string().contains("cannot connect"), "{err}");
    server.stop().await;
}

/// A minimal uncompressed batch header + opaque body, with a valid layout.
fn batch(base_offset: i64, count: i32, control: bool) -> Bytes {
    let body = 10usize;
    let mut b = BytesMut::new();
    b.put_i64(base_offset);
    b.put_i32((61 - 12 + body) as i32);
    b.put_i32(0); // leader epoch
    b.put_i8(2);
    b.put_u32(0); // crc (not checked when counting)
    b.put_i16(if control { 1 << 5 } else { 0 });
    b.put_i32(count - 1);
    b.put_i64(0);
    b.put_i64(0);
    b.put_i64(-1);
    b.put_i16(-1);
    b.put_i32(-1);
    b.put_i32(count);
    b.put_bytes(0, body);
    b.freeze()
}

#[test]
fn counting_from_batch_headers() {
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&batch(0, 5, false));
    buf.extend_from_slice(&batch(5, 1, true)); // control: not counted
    buf.extend_from_slice(&batch(6, 4, false));
    let whole = buf.clone().freeze();
    assert_eq!(count_records(&whole, 0).unwrap(), (9, 10));
    // Fetching from the middle of the first batch skips its earlier records.
    assert_eq!(count_records(&whole, 3).unwrap(), (6, 10));
    // A partial batch at the end is left for the next fetch.
    let third = batch(10, 7, false);
    buf.extend_from_slice(&third[..30]);
    assert_eq!(count_records(&buf.freeze(), 0).unwrap(), (9, 10));
    assert_eq!(count_records(&Bytes::new(), 42).unwrap(), (0, 42));
    // Old message formats are refused, not miscounted.
    let mut old = BytesMut::from(&batch(0, 1, false)[..]);
    old[16] = 1;
    assert!(count_records(&old.freeze(), 0).is_err());
}

/// librdkafka reads what the load generator wrote, every codec: the batches
/// are standard RecordBatch v2, readable by any client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn librdkafka_reads_bench_records() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
    let server = Server::start().await;
    let mut cfg = server.config(Mode::Produce, "rd");
    cfg.partitions = Some(2);
    cfg.records = Some(3_000);
    cfg.compression = Compression::Snappy;
    cfg.batch_bytes = 4096;
    cfg.record_size = 50;
    sluice_bench::run(cfg).await.unwrap();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", server.0.addr.to_string())
        .set("broker.address.family", "v4")
        .set("group.id", "assign-only")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..2 {
        tpl.add_partition_offset("rd", p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let got = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut n = 0usize;
        while n < 3_000 && std::time::Instant::now() < deadline {
            if let Some(m) = consumer.poll(Duration::from_millis(200)) {
                let m = m.unwrap();
                let v = m.payload().unwrap();
                assert_eq!(v.len(), 50);
                assert!(m.key().is_none());
                n += 1;
            }
        }
        n
    })
    .await
    .unwrap();
    assert_eq!(got, 3_000);
    server.stop().await;
}

/// Idempotent and transactional runs: every record lands once, each
/// transaction is committed (a read_committed reader sees them all, which it
/// could not while one was left open), and commits are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_and_transactional_producers_commit_everything() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};
    use sluice_bench::Delivery;
    let server = Server::start().await;

    let mut cfg = server.config(Mode::Produce, "idem");
    cfg.partitions = Some(2);
    cfg.records = Some(6_000);
    cfg.batch_bytes = 4096;
    cfg.delivery = Delivery::Idempotent;
    let r = sluice_bench::run(cfg.clone()).await.unwrap();
    assert_eq!((r.records, r.delivery), (6_000, "idempotent"));
    assert_eq!(r.transactions, None);
    assert_eq!(held(&server, "idem").await, 6_000);
    cfg.acks = Acks::Leader;
    assert!(
        sluice_bench::run(cfg).await.is_err(),
        "idempotence needs acks=all"
    );

    let mut cfg = server.config(Mode::Produce, "txn");
    cfg.partitions = Some(2);
    cfg.records = Some(6_000);
    cfg.producers = 2;
    cfg.batch_bytes = 4096;
    cfg.delivery = Delivery::Transactional {
        commit_interval: Duration::from_secs(60),
        commit_records: Some(1_000),
    };
    let r = sluice_bench::run(cfg).await.unwrap();
    assert_eq!((r.records, r.delivery), (6_000, "transactional"));
    // 3,000 records per producer, a commit at each 1,000 or more (whole
    // batches of 36 records), and the last one at the end.
    let n = r.transactions.unwrap();
    assert!((4..=6).contains(&n), "{n} transactions");
    let end_txn = r.commit_latency_ms.unwrap();
    let call = r.commit_call_latency_ms.unwrap();
    assert!(end_txn.max > 0.0 && call.max >= end_txn.max);

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", server.0.addr.to_string())
        .set("broker.address.family", "v4")
        .set("group.id", "assign-only")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..2 {
        tpl.add_partition_offset("txn", p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let got = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut n = 0usize;
        while n < 6_000 && std::time::Instant::now() < deadline {
            if let Some(m) = consumer.poll(Duration::from_millis(200)) {
                m.unwrap();
                n += 1;
            }
        }
        n
    })
    .await
    .unwrap();
    assert_eq!(got, 6_000, "every transaction was committed");
    server.stop().await;
}

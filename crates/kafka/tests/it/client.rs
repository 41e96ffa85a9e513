//! A real client: rdkafka (librdkafka) against the in-process server.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewPartitions, NewTopic, ResourceSpecifier,
    TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use crate::harness::*;

fn config(server: &Server) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", server.addr.to_string())
        .set("broker.address.family", "v4");
    c
}

fn admin(server: &Server) -> AdminClient<DefaultClientContext> {
    config(server).create().unwrap()
}

async fn create_topic(server: &Server, topic: &str, partitions: i32) {
    let res = admin(server)
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    assert!(res[0].is_ok(), "{res:?}");
}

/// (partition, offset, key, value, header, timestamp)
type Got = (
    i32,
    i64,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Option<String>,
    Option<i64>,
);

/// Reads `n` messages of `topic` from the beginning of every partition
/// without a group (assign).
async fn read_all(server: &Server, topic: &str, partitions: i32, n: usize) -> Vec<Got> {
    // librdkafka wants a group.id even for assign(); the group is never joined.
    let consumer: BaseConsumer = config(server)
        .set("group.id", "assign-only")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "100")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut got = Vec::new();
        while got.len() < n && Instant::now() < deadline {
            if let Some(msg) = consumer.poll(Duration::from_millis(200)) {
                let m = msg.unwrap();
                let header = m.headers().and_then(|h| {
                    h.iter()
                        .next()
                        .and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).into_owned()))
                });
                got.push((
                    m.partition(),
                    m.offset(),
                    m.key().map(<[u8]>::to_vec),
                    m.payload().map(<[u8]>::to_vec),
                    header,
                    m.timestamp().to_millis(),
                ));
            }
        }
        got
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rdkafka_produces_and_consumes_every_codec() {
    let server = Server::start().await;
    create_topic(&server, "rd", 3).await;
    let mut sent: HashMap<Vec<u8>, (Vec<u8>, String, i64)> = HashMap::new();
    for codec in ["none", "gzip", "snappy", "lz4", "zstd"] {
        let producer: FutureProducer = config(&server)
            .set("compression.type", codec)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .create()
            .unwrap();
        let mut pending = Vec::new();
        for i in 0..60 {
            let key = format!("{codec}-key-{i}");
            let value = format!("{codec}-value-{i}-{}", "x".repeat(i * 7));
            let ts = 1_700_000_000_000 + i as i64;
            sent.insert(
                key.clone().into_bytes(),
                (value.clone().into_bytes(), codec.to_string(), ts),
            );
            let record = FutureRecord::to("rd")
                .key(key.as_bytes())
                .payload(value.as_bytes())
                .timestamp(ts)
                .headers(OwnedHeaders::new().insert(Header {
                    key: "codec",
                    value: Some(codec),
                }));
            pending.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
        }
        for p in pending {
            p.await.unwrap().unwrap();
        }
    }
    // A null value and an empty key round-trip.
    let producer: FutureProducer = config(&server).create().unwrap();
    producer
        .send(
            FutureRecord::<[u8], [u8]>::to("rd").key(&[]).partition(0),
            Duration::from_secs(10),
        )
        .await
        .unwrap();

    let got = read_all(&server, "rd", 3, sent.len() + 1).await;
    assert_eq!(got.len(), sent.len() + 1);
    let mut last_offset = [-1i64; 3];
    let mut null_seen = false;
    for (partition, offset, key, value, header, ts) in got {
        let idx = partition as usize;
        assert!(offset > last_offset[idx], "per-partition order");
        last_offset[idx] = offset;
        let key = key.unwrap_or_default();
        if key.is_empty() {
            assert_eq!(value, None, "null value");
            null_seen = true;
            continue;
        }
        let (want_value, want_codec, want_ts) =
            sent.remove(&key).expect("each record exactly once");
        assert_eq!(value, Some(want_value));
        assert_eq!(header, Some(want_codec));
        assert_eq!(ts, Some(want_ts));
    }
    assert!(null_seen);
    assert!(sent.is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rdkafka_admin_operations() {
    let server = Server::start().await;
    create_topic(&server, "adm", 1).await;
    let admin = admin(&server);
    let opts = AdminOptions::new();

    let res = admin
        .create_partitions(&[NewPartitions::new("adm", 4)], &opts)
        .await
        .unwrap();
    assert!(res[0].is_ok(), "{res:?}");
    assert_eq!(server.store.topic("adm").unwrap().partitions, 4);

    let res = admin
        .alter_configs(
            &[AlterConfig::new(ResourceSpecifier::Topic("adm")).set("retention.ms", "123456")],
            &opts,
        )
        .await
        .unwrap();
    assert!(res[0].is_ok(), "{res:?}");
    let res = admin
        .describe_configs(&[ResourceSpecifier::Topic("adm")], &opts)
        .await
        .unwrap();
    let described = res[0].as_ref().unwrap();
    assert_eq!(
        described
            .get("retention.ms")
            .and_then(|e| e.value.clone())
            .as_deref(),
        Some("123456")
    );
    assert!(!described.get("retention.ms").unwrap().is_default);
    assert!(described.get("segment.bytes").unwrap().is_default);

    // Produce 10 records to partition 0, then delete the first 4.
    let producer: FutureProducer = config(&server).create().unwrap();
    for i in 0..10 {
        producer
            .send(
                FutureRecord::to("adm")
                    .partition(0)
                    .key(&format!("k{i}"))
                    .payload("v")
                    .timestamp(1_000 * (i + 1)),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("adm", 0, Offset::Offset(4))
        .unwrap();
    let res = admin.delete_records(&tpl, &opts).await.unwrap();
    assert_eq!(res.elements()[0].offset(), Offset::Offset(4));
    assert!(res.elements()[0].error().is_ok());

    let consumer: BaseConsumer = config(&server).set("group.id", "unused").create().unwrap();
    let (low, high, by_time) = tokio::task::spawn_blocking(move || {
        let (low, high) = consumer
            .fetch_watermarks("adm", 0, Duration::from_secs(10))
            .unwrap();
        let mut q = TopicPartitionList::new();
        q.add_partition_offset("adm", 0, Offset::Offset(7_500))
            .unwrap();
        let by_time = consumer
            .offsets_for_times(q, Duration::from_secs(10))
            .unwrap();
        (low, high, by_time.elements()[0].offset())
    })
    .await
    .unwrap();
    assert_eq!((low, high), (4, 10));
    // The first record with timestamp >= 7500 is k7 (timestamp 8000), offset 7.
    assert_eq!(by_time, Offset::Offset(7));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rdkafka_consumer_group_commits() {
    let server = Server::start().await;
    create_topic(&server, "grp", 2).await;
    let producer: FutureProducer = config(&server).create().unwrap();
    for i in 0..20 {
        producer
            .send(
                FutureRecord::to("grp").key(&format!("k{i}")).payload("v"),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    let group_consumer = || -> BaseConsumer {
        config(&server)
            .set("group.id", "g1")
            .set("client.id", "grp-member")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .create()
            .unwrap()
    };
    let consumer = group_consumer();
    consumer.subscribe(&["grp"]).unwrap();
    let consumed = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut n = 0;
        while n < 20 && Instant::now() < deadline {
            if let Some(m) = consumer.poll(Duration::from_millis(200)) {
                m.unwrap();
                n += 1;
            }
        }
        consumer.commit_consumer_state(CommitMode::Sync).unwrap();
        // DescribeGroups names the member after its client id and host, as Kafka does.
        let groups = consumer
            .fetch_group_list(Some("g1"), Duration::from_secs(10))
            .unwrap();
        let group = &groups.groups()[0];
        assert_eq!(group.state(), "Stable");
        let member = &group.members()[0];
        assert_eq!(member.client_id(), "grp-member");
        assert_eq!(member.client_host(), "/127.0.0.1");
        assert!(member.id().starts_with("grp-member-"), "{}", member.id());
        n
    })
    .await
    .unwrap();
    assert_eq!(consumed, 20);
    // A new member of the group sees the committed offsets.
    let consumer = group_consumer();
    let committed = tokio::task::spawn_blocking(move || {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition("grp", 0);
        tpl.add_partition("grp", 1);
        consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .unwrap()
    })
    .await
    .unwrap();
    let total: i64 = committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            other => panic!("no committed offset: {other:?}"),
        })
        .sum();
    assert_eq!(total, 20);
    server.stop().await;
}

//! Produce, Fetch, ListOffsets, DeleteRecords, OffsetForLeaderEpoch,
//! idempotence and pipelining.

use std::time::{Duration, Instant};

use kafka_protocol::messages::delete_records_request::{
    DeleteRecordsPartition, DeleteRecordsTopic,
};
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::offset_for_leader_epoch_request::{
    OffsetForLeaderPartition, OffsetForLeaderTopic,
};
use kafka_protocol::messages::*;
use sluice_vocab::ErrorCode;

use crate::harness::*;

#[tokio::test]
async fn produce_fetch_round_trip_across_versions() {
    let server = Server::start().await;
    server.create_topic("rt", 2).await;
    let mut c = server.client().await;
    let mut expected = Vec::new();
    let mut offset = 0;
    for (i, version) in [3i16, 5, 7, 9, 11].into_iter().enumerate() {
        let k = keys(3, &format!("b{i}-"));
        let resp = c
            .call(
                &produce_request("rt", 1, batch(&strs(&k), 1_000 + i as i64), -1),
                version,
            )
            .await;
        let p = &resp.responses[0].partition_responses[0];
        assert_eq!(p.error_code, 0, "produce v{version}");
        assert_eq!(p.base_offset, offset, "produce v{version}");
        for key in &k {
            expected.push((offset, key.clone(), format!("value-of-{key}")));
            offset += 1;
        }
    }
    // Fetch by name at several versions.
    for version in [4i16, 7, 11, 12] {
        let resp = c.call(&fetch_request("rt", 1, 0), version).await;
        let p = &resp.responses[0].partitions[0];
        assert_eq!(p.error_code, 0, "fetch v{version}");
        assert_eq!(p.high_watermark, offset);
        assert_eq!(p.last_stable_offset, offset);
        if version >= 5 {
            assert_eq!(p.log_start_offset, 0);
        }
        assert_eq!(
            decode(p.records.clone().unwrap()),
            expected,
            "fetch v{version}"
        );
    }
    // Fetch by topic id (v13+).
    let id = uuid::Uuid::from_bytes(server.store.topic("rt").unwrap().id);
    for version in [13i16, 16] {
        let mut req = fetch_request("rt", 1, 4);
        req.topics[0].topic = TopicName::default();
        req.topics[0].topic_id = id;
        let resp = c.call(&req, version).await;
        assert_eq!(resp.responses[0].topic_id, id);
        let p = &resp.responses[0].partitions[0];
        assert_eq!(p.error_code, 0, "fetch v{version}");
        // Whole batches: the batch holding offset 4 starts at 3.
        let got = decode(p.records.clone().unwrap());
        assert_eq!(got.first().map(|r| r.0), Some(3));
        assert_eq!(got, expected[3..]);
        let mut unknown = req.clone();
        unknown.topics[0].topic_id = uuid::Uuid::from_u128(42);
        let resp = c.call(&unknown, version).await;
        assert_eq!(
            resp.responses[0].partitions[0].error_code,
            ErrorCode::UnknownTopicId.code()
        );
    }
    // The other partition is empty; out-of-range offsets are refused.
    let (code, hw, recs) = fetch(&mut c, "rt", 0, 0).await;
    assert_eq!((code, hw, recs.len()), (0, 0, 0));
    let (code, _, _) = fetch(&mut c, "rt", 1, offset + 10).await;
    assert_eq!(code, ErrorCode::OffsetOutOfRange.code());
    let (code, _, _) = fetch(&mut c, "rt", 7, 0).await;
    assert_eq!(code, ErrorCode::UnknownTopicOrPartition.code());
    // Clients cannot write to internal topics.
    let (code, _) = produce(&mut c, "__consumer_offsets", 0, batch(&["x"], 1)).await;
    assert_eq!(code, ErrorCode::InvalidTopicException.code());
    // Produce to a missing partition.
    let (code, _) = produce(&mut c, "rt", 9, batch(&["x"], 1)).await;
    assert_eq!(code, ErrorCode::UnknownTopicOrPartition.code());
    server.stop().await;
}

#[tokio::test]
async fn fetch_size_limits_and_first_batch_rule() {
    let server = Server::start().await;
    server.create_topic("lim", 2).await;
    let mut c = server.client().await;
    let big: Vec<String> = (0..50).map(|i| format!("{i:0>200}")).collect();
    for p in 0..2 {
        let (code, _) = produce(&mut c, "lim", p, batch(&strs(&big), 1)).await;
        assert_eq!(code, 0);
        let (code, _) = produce(&mut c, "lim", p, batch(&strs(&big), 1)).await;
        assert_eq!(code, 0);
    }
    let mut req = fetch_request("lim", 0, 0);
    req.topics[0].partitions.push(
        FetchPartition::default()
            .with_partition(1)
            .with_fetch_offset(0)
            .with_partition_max_bytes(1024 * 1024),
    );
    // partition_max_bytes 100 is below one batch: still one whole batch (KIP-74)
    // for the first partition; response max_bytes 100 leaves nothing for the second.
    req.max_bytes = 100;
    req.topics[0].partitions[0].partition_max_bytes = 100;
    let resp = c.call(&req, 11).await;
    let p0 = decode(resp.responses[0].partitions[0].records.clone().unwrap());
    let p1 = decode(resp.responses[0].partitions[1].records.clone().unwrap());
    assert_eq!(p0.len(), 50, "exactly the first batch");
    assert!(p1.is_empty());
    assert_eq!(resp.responses[0].partitions[1].high_watermark, 100);
    // Large limits: everything.
    req.max_bytes = 10 * 1024 * 1024;
    req.topics[0].partitions[0].partition_max_bytes = 1024 * 1024;
    let resp = c.call(&req, 11).await;
    assert_eq!(
        decode(resp.responses[0].partitions[0].records.clone().unwrap()).len(),
        100
    );
    assert_eq!(
        decode(resp.responses[0].partitions[1].records.clone().unwrap()).len(),
        100
    );
    server.stop().await;
}

#[tokio::test]
async fn long_poll_waits_for_data_and_times_out() {
    let server = Server::start().await;
    server.create_topic("lp", 1).await;
    let mut consumer = server.client().await;
    // Nothing arrives: the fetch answers empty after max_wait.
    let mut req = fetch_request("lp", 0, 0);
    req.max_wait_ms = 300;
    req.min_bytes = 1;
    let start = Instant::now();
    let resp = consumer.call(&req, 11).await;
    assert!(
        start.elapsed() >= Duration::from_millis(290),
        "waited {:?}",
        start.elapsed()
    );
    assert!(decode(resp.responses[0].partitions[0].records.clone().unwrap()).is_empty());

    // Data arrives mid-wait: the fetch returns it well before max_wait.
    req.max_wait_ms = 10_000;
    let start = Instant::now();
    let sent = consumer.send(&req, 11).await;
    let addr = server.addr;
    let producer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut p = Raw::connect(addr).await;
        produce(&mut p, "lp", 0, batch(&["late"], 5)).await
    });
    let (got, resp) = consumer.recv::<FetchRequest>(11).await;
    let elapsed = start.elapsed();
    assert_eq!(sent, got);
    assert_eq!(producer.await.unwrap(), (0, 0));
    assert!(
        elapsed >= Duration::from_millis(250),
        "returned before the data: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "returned only after {elapsed:?}"
    );
    let recs = decode(resp.responses[0].partitions[0].records.clone().unwrap());
    assert_eq!(
        recs,
        vec![(0, "late".to_string(), "value-of-late".to_string())]
    );
    server.stop().await;
}

fn list_offsets(topic: &str, timestamp: i64) -> ListOffsetsRequest {
    ListOffsetsRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_topics(vec![ListOffsetsTopic::default()
            .with_name(name(topic))
            .with_partitions(vec![ListOffsetsPartition::default()
                .with_partition_index(0)
                .with_timestamp(timestamp)])])
}

async fn offset_at(c: &mut Raw, topic: &str, timestamp: i64, version: i16) -> (i16, i64, i64) {
    let resp = c.call(&list_offsets(topic, timestamp), version).await;
    let p = &resp.topics[0].partitions[0];
    (p.error_code, p.offset, p.timestamp)
}

#[tokio::test]
async fn list_offsets_delete_records_and_leader_epochs() {
    let server = Server::start().await;
    server.create_topic("lo", 1).await;
    let mut c = server.client().await;
    for (i, ts) in [1_000i64, 2_000, 3_000].into_iter().enumerate() {
        let k = keys(2, &format!("t{i}-"));
        assert_eq!(produce(&mut c, "lo", 0, batch(&strs(&k), ts)).await.0, 0);
    }
    for version in [1i16, 4, 6] {
        assert_eq!(
            offset_at(&mut c, "lo", -2, version).await.1,
            0,
            "earliest v{version}"
        );
        assert_eq!(
            offset_at(&mut c, "lo", -1, version).await.1,
            6,
            "latest v{version}"
        );
        let (code, offset, ts) = offset_at(&mut c, "lo", 1_500, version).await;
        assert_eq!((code, offset, ts), (0, 2, 2_000), "by timestamp v{version}");
        assert_eq!(offset_at(&mut c, "lo", 3_000, version).await.1, 4);
        assert_eq!(
            offset_at(&mut c, "lo", 9_999, version).await.1,
            -1,
            "none after"
        );
    }
    // Inside one batch: the first record at or after the timestamp, not the batch.
    let mut recs = records(&["r0", "r1", "r2", "r3", "r4"], 0);
    for (i, r) in recs.iter_mut().enumerate() {
        r.timestamp = 10_000 + 100 * i as i64;
    }
    assert_eq!(produce(&mut c, "lo", 0, encode_batch(&recs)).await, (0, 6));
    for version in [1i16, 6] {
        assert_eq!(
            offset_at(&mut c, "lo", 10_250, version).await,
            (0, 9, 10_300)
        );
        assert_eq!(
            offset_at(&mut c, "lo", 9_000, version).await,
            (0, 6, 10_000)
        );
        assert_eq!(
            offset_at(&mut c, "lo", 10_400, version).await,
            (0, 10, 10_400)
        );
    }
    let resp = c.call(&list_offsets("missing", -1), 5).await;
    assert_eq!(
        resp.topics[0].partitions[0].error_code,
        ErrorCode::UnknownTopicOrPartition.code()
    );

    // DeleteRecords moves the log start; earlier offsets are then out of range.
    let del = |offset| {
        DeleteRecordsRequest::default().with_topics(vec![DeleteRecordsTopic::default()
            .with_name(name("lo"))
            .with_partitions(vec![DeleteRecordsPartition::default()
                .with_partition_index(0)
                .with_offset(offset)])])
    };
    let resp = c.call(&del(2), 2).await;
    let p = &resp.topics[0].partitions[0];
    assert_eq!((p.error_code, p.low_watermark), (0, 2));
    assert_eq!(offset_at(&mut c, "lo", -2, 4).await.1, 2);
    let (code, _, _) = fetch(&mut c, "lo", 0, 0).await;
    assert_eq!(code, ErrorCode::OffsetOutOfRange.code());
    let (code, _, recs) = fetch(&mut c, "lo", 0, 2).await;
    assert_eq!(code, 0);
    assert_eq!(recs.first().map(|r| r.0), Some(2));
    let resp = c.call(&del(100), 1).await;
    assert_eq!(
        resp.topics[0].partitions[0].error_code,
        ErrorCode::OffsetOutOfRange.code()
    );

    // OffsetForLeaderEpoch: everything was written in epoch 0.
    let req =
        OffsetForLeaderEpochRequest::default().with_topics(vec![OffsetForLeaderTopic::default()
            .with_topic(name("lo"))
            .with_partitions(vec![OffsetForLeaderPartition::default()
                .with_partition(0)
                .with_current_leader_epoch(0)
                .with_leader_epoch(0)])]);
    let resp = c.call(&req, 4).await;
    let p = &resp.topics[0].partitions[0];
    assert_eq!((p.error_code, p.leader_epoch, p.end_offset), (0, 0, 11));
    let mut future_epoch = req.clone();
    future_epoch.topics[0].partitions[0].current_leader_epoch = 5;
    let resp = c.call(&future_epoch, 3).await;
    assert_eq!(
        resp.topics[0].partitions[0].error_code,
        ErrorCode::UnknownLeaderEpoch.code()
    );
    server.stop().await;
}

#[tokio::test]
async fn idempotent_retry_is_acknowledged_once() {
    let server = Server::start().await;
    server.create_topic("idem", 1).await;
    let mut c = server.client().await;
    let pid = c.call(&InitProducerIdRequest::default(), 4).await;
    assert_eq!(pid.error_code, 0);
    let pid = pid.producer_id.0;
    let first = idempotent_batch(&["a", "b"], pid, 0, 0);
    assert_eq!(produce(&mut c, "idem", 0, first.clone()).await, (0, 0));
    // The retry of the same batch: same offsets, nothing appended.
    assert_eq!(produce(&mut c, "idem", 0, first).await, (0, 0));
    assert_eq!(
        produce(&mut c, "idem", 0, idempotent_batch(&["c"], pid, 0, 2)).await,
        (0, 2)
    );
    // A gap in the sequence.
    let (code, _) = produce(&mut c, "idem", 0, idempotent_batch(&["z"], pid, 0, 7)).await;
    assert_eq!(code, ErrorCode::OutOfOrderSequenceNumber.code());
    let (_, hw, recs) = fetch(&mut c, "idem", 0, 0).await;
    assert_eq!(hw, 3);
    let got: Vec<&str> = recs.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(got, vec!["a", "b", "c"]);
    server.stop().await;
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let server = Server::start().await;
    server.create_topic("pipe", 1).await;
    let mut c = server.client().await;
    let mut frames = Vec::new();
    let mut expected = Vec::new();
    for i in 0..30i64 {
        let (corr, frame, kind) = match i % 4 {
            0 | 1 => {
                let (corr, f) = c.frame(
                    &produce_request("pipe", 0, batch(&[&format!("k{i}")], i), -1),
                    9,
                );
                (corr, f, 'p')
            }
            2 => {
                // A long poll that cannot be satisfied: answered after max_wait,
                // while later requests are already done.
                let mut req = fetch_request("pipe", 0, 0);
                req.min_bytes = 10_000_000;
                req.max_wait_ms = 50;
                let (corr, f) = c.frame(&req, 11);
                (corr, f, 'f')
            }
            _ => {
                let (corr, f) = c.frame(&ApiVersionsRequest::default(), 3);
                (corr, f, 'a')
            }
        };
        frames.extend_from_slice(&frame);
        expected.push((corr, kind));
    }
    // One write with every request: the server must not wait for us to read.
    c.send_raw(&frames).await;
    let mut produced = 0;
    for (corr, kind) in expected {
        let got = match kind {
            'p' => {
                let (got, resp) = c.recv::<ProduceRequest>(9).await;
                let p = &resp.responses[0].partition_responses[0];
                assert_eq!(p.error_code, 0);
                // Appends happen in request order.
                assert_eq!(p.base_offset, produced);
                produced += 1;
                got
            }
            'f' => c.recv::<FetchRequest>(11).await.0,
            _ => c.recv::<ApiVersionsRequest>(3).await.0,
        };
        assert_eq!(got, corr, "responses in request order");
    }
    server.stop().await;
}

#[tokio::test]
async fn acks_zero_gets_no_response() {
    let server = Server::start().await;
    server.create_topic("zero", 1).await;
    let mut c = server.client().await;
    c.send(&produce_request("zero", 0, batch(&["a"], 1), 0), 9)
        .await;
    // The next response is the ApiVersions one: nothing came for the produce.
    let resp = c.call(&ApiVersionsRequest::default(), 3).await;
    assert_eq!(resp.error_code, 0);
    // The record becomes durable, hence visible, without anyone waiting.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, hw, recs) = fetch(&mut c, "zero", 0, 0).await;
        if hw == 1 {
            assert_eq!(recs.len(), 1);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "acks=0 record never became visible"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Invalid acks value.
    let resp = c
        .call(&produce_request("zero", 0, batch(&["b"], 1), 2), 9)
        .await;
    assert_eq!(
        resp.responses[0].partition_responses[0].error_code,
        ErrorCode::InvalidRequiredAcks.code()
    );
    server.stop().await;
}

#[tokio::test]
async fn fetch_many_partitions_one_request() {
    let server = Server::start().await;
    server.create_topic("m1", 3).await;
    server.create_topic("m2", 1).await;
    let mut c = server.client().await;
    for p in 0..3 {
        assert_eq!(
            produce(&mut c, "m1", p, batch(&[&format!("m1-{p}")], 1))
                .await
                .0,
            0
        );
    }
    assert_eq!(produce(&mut c, "m2", 0, batch(&["m2-0"], 1)).await.0, 0);
    let mut req = fetch_request("m1", 0, 0);
    for p in 1..3 {
        req.topics[0].partitions.push(
            FetchPartition::default()
                .with_partition(p)
                .with_fetch_offset(0)
                .with_partition_max_bytes(1 << 20),
        );
    }
    req.topics.push(
        FetchTopic::default()
            .with_topic(name("m2"))
            .with_partitions(vec![FetchPartition::default()
                .with_partition(0)
                .with_fetch_offset(0)
                .with_partition_max_bytes(1 << 20)]),
    );
    let resp = c.call(&req, 11).await;
    let mut got = Vec::new();
    for t in &resp.responses {
        for p in &t.partitions {
            assert_eq!(p.error_code, 0);
            got.extend(decode(p.records.clone().unwrap()).into_iter().map(|r| r.1));
        }
    }
    assert_eq!(got, vec!["m1-0", "m1-1", "m1-2", "m2-0"]);
    server.stop().await;
}

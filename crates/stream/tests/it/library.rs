//! Library mode refuses, before it joins a group, the jobs it cannot run
//! yet or at all (the instances at work are tested against a broker in
//! `tests/interop/test_stream_library.py`).

use sluice_stream::kafka::{DeliveryGuarantee, KafkaOutput, KafkaSink, KafkaSource};
use sluice_stream::{LibraryMode, StreamError};

/// Nothing listens there: a job that got as far as the cluster would hang
/// in its connection attempts instead of failing at once.
const NOWHERE: &str = "127.0.0.1:9";

fn refusal(build: impl Fn(&sluice_stream::StreamEnv)) -> String {
    let result = LibraryMode::new(NOWHERE, "app").run("refused", |env| {
        build(env);
        Ok(())
    });
    match result {
        Err(StreamError::InvalidJob(why)) => why,
        other => panic!("expected an invalid job, got {other:?}"),
    }
}

#[test]
fn keyed_state_is_refused_until_it_can_move_with_partitions() {
    let why = refusal(|env| {
        env.kafka_source(KafkaSource::new(NOWHERE, "in"))
            .map(|r| (r.partition, 1u64))
            .key_by(|(p, _)| *p)
            .reduce(|(p, a), (_, b)| (p, a + b))
            .collect();
    });
    assert!(why.contains("keyed state"), "{why}");
}

#[test]
fn a_job_without_a_topic_source_is_refused() {
    let why = refusal(|env| {
        env.from_iter([1u32, 2, 3]).map(|x| x + 1).collect();
    });
    assert!(why.contains("topic source"), "{why}");
}

#[test]
fn a_bounded_source_is_refused() {
    let why = refusal(|env| {
        env.kafka_source(KafkaSource::new(NOWHERE, "in").bounded())
            .collect();
    });
    assert!(why.contains("without end"), "{why}");
}

#[test]
fn sources_and_exactly_once_sinks_of_another_cluster_are_refused() {
    let why = refusal(|env| {
        env.kafka_source(KafkaSource::new("127.0.0.1:10", "in"))
            .collect();
    });
    assert!(why.contains("application's cluster"), "{why}");
    let why = refusal(|env| {
        env.kafka_source(KafkaSource::new(NOWHERE, "in"))
            .sink_to_kafka(
                KafkaSink::new(
                    "127.0.0.1:10",
                    "out",
                    DeliveryGuarantee::ExactlyOnce {
                        transactional_id_prefix: "t".into(),
                    },
                ),
                |r| KafkaOutput {
                    value: r.value.clone(),
                    ..KafkaOutput::default()
                },
            );
    });
    assert!(why.contains("exactly-once sink"), "{why}");
}

#[test]
fn a_topic_read_by_two_sources_is_refused() {
    let why = refusal(|env| {
        let a = env.kafka_source(KafkaSource::new(NOWHERE, "in"));
        let b = env.kafka_source(KafkaSource::new(NOWHERE, "in"));
        a.union(b).collect();
    });
    assert!(why.contains("two sources"), "{why}");
}

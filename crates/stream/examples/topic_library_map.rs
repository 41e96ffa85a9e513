//! A job in library mode, the Kafka Streams way: every instance started with
//! the same `--application-id` joins one consumer group, and the group
//! shares the input topic's partitions among them. Each instance copies its
//! partitions' records to the same partition of the output topic, exactly
//! once: a record's value is kept and a header `instance` names the
//! instance that wrote it. Start it several times (with different
//! `--instance-id`s), stop some: the others take their partitions over.
//!
//! ```sh
//! cargo run --release -p sluice-stream --example topic_library_map -- \
//!     --bootstrap 127.0.0.1:9092 --application-id copier --instance-id a \
//!     --input orders --output orders-copy
//! ```

use std::time::Duration;

use sluice_stream::kafka::{DeliveryGuarantee, KafkaOutput, KafkaSink, KafkaSource};
use sluice_stream::LibraryMode;

struct Args {
    bootstrap: String,
    application_id: String,
    instance_id: String,
    input: String,
    output: String,
    parallelism: usize,
    commit_ms: u64,
    properties: Vec<(String, String)>,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        bootstrap: "127.0.0.1:9092".into(),
        application_id: String::new(),
        instance_id: String::new(),
        input: String::new(),
        output: String::new(),
        parallelism: 2,
        commit_ms: 200,
        properties: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let number = |v: &str| v.parse::<u64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--bootstrap" => a.bootstrap = value,
            "--application-id" => a.application_id = value,
            "--instance-id" => a.instance_id = value,
            "--input" => a.input = value,
            "--output" => a.output = value,
            "--parallelism" => a.parallelism = (number(&value)? as usize).max(1),
            "--commit-ms" => a.commit_ms = number(&value)?.max(1),
            "--property" => {
                let (k, v) = value
                    .split_once('=')
                    .ok_or(format!("--property {value}: want key=value"))?;
                a.properties.push((k.to_owned(), v.to_owned()));
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    for (flag, v) in [
        ("--application-id", &a.application_id),
        ("--instance-id", &a.instance_id),
        ("--input", &a.input),
        ("--output", &a.output),
    ] {
        if v.is_empty() {
            return Err(format!("{flag} is required"));
        }
    }
    Ok(a)
}

fn main() {
    // The instance's generations (rebalances) go to standard error.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "sluice_stream=info".into()),
        )
        .init();
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("topic_library_map: {e}");
            std::process::exit(2);
        }
    };
    let mut instance = LibraryMode::new(&args.bootstrap, &args.application_id)
        .instance_id(&args.instance_id)
        .commit_interval(Duration::from_millis(args.commit_ms));
    for (k, v) in &args.properties {
        instance = instance.property(k, v);
    }
    let header = args.instance_id.clone().into_bytes();
    let result = instance.run("topic library map", |env| {
        env.set_parallelism(args.parallelism);
        let header = header.clone();
        env.kafka_source(KafkaSource::new(&args.bootstrap, &args.input))
            .map(move |r| KafkaOutput {
                key: r.key,
                value: r.value,
                headers: vec![("instance".to_owned(), header.clone())],
                partition: Some(r.partition),
            })
            .sink_to_kafka(
                KafkaSink::new(
                    &args.bootstrap,
                    &args.output,
                    DeliveryGuarantee::ExactlyOnce {
                        transactional_id_prefix: args.application_id.clone(),
                    },
                ),
                KafkaOutput::clone,
            );
        Ok(())
    });
    if let Err(e) = result {
        eprintln!("topic_library_map: {e}");
        std::process::exit(1);
    }
}

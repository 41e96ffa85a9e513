//! A job over topics: counts each key's records per tumbling event-time
//! window and writes `key -> "<window start>,<count>"` to another topic
//! (with `--running-count`: every record's key and its count so far),
//! exactly once, checkpointing to a local directory. Run it again after a
//! crash (`kill -9` included) and it restores from its latest checkpoint,
//! at the same or another parallelism. With `--report-to HOST:PORT` (a
//! Sluice node's HTTP port) `sluice job list|status|cancel|savepoint` see
//! and steer it; `--from-savepoint DIR` starts from a savepoint;
//! `--changelog PREFIX` keeps the counts in changelog topics
//! (`PREFIX-s<stage>-changelog`, compacted) instead of in the checkpoints.
//!
//! ```sh
//! cargo run --release -p sluice-stream --example topic_window_count -- \
//!     --bootstrap 127.0.0.1:9092 --input clicks --output clicks-per-second \
//!     --checkpoints ./checkpoints --window-ms 1000 --parallelism 2 --bounded
//! ```

use std::time::Duration;

use sluice_stream::kafka::{DeliveryGuarantee, KafkaOutput, KafkaSink, KafkaSource};
use sluice_stream::{CheckpointStore, KafkaChangelog, LocalDirStore, StreamEnv, Windows};

struct Args {
    bootstrap: String,
    input: String,
    output: String,
    checkpoints: String,
    window_ms: u64,
    parallelism: usize,
    bounded: bool,
    checkpoint_ms: u64,
    /// Sleeps 1 ms after this many records per subtask (0: never), so a
    /// test can stop a run midway.
    pause_every: u64,
    transactional_id_prefix: String,
    /// A running count per key instead of counts per window.
    running: bool,
    /// librdkafka consumer settings, `key=value`.
    consumer_properties: Vec<(String, String)>,
    /// A Sluice node's HTTP admin address to report to.
    report_to: Option<String>,
    /// A savepoint directory to start from.
    from_savepoint: Option<String>,
    /// Keyed state in changelog topics named with this prefix, instead of
    /// in the checkpoints.
    changelog: Option<String>,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        bootstrap: "127.0.0.1:9092".into(),
        input: String::new(),
        output: String::new(),
        checkpoints: "./checkpoints".into(),
        window_ms: 1000,
        parallelism: 2,
        bounded: false,
        checkpoint_ms: 1000,
        pause_every: 0,
        transactional_id_prefix: "topic-window-count".into(),
        consumer_properties: Vec::new(),
        running: false,
        report_to: None,
        from_savepoint: None,
        changelog: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--bounded" {
            a.bounded = true;
            continue;
        }
        if flag == "--running-count" {
            a.running = true;
            continue;
        }
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let number = |v: &str| v.parse::<u64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--bootstrap" => a.bootstrap = value,
            "--input" => a.input = value,
            "--output" => a.output = value,
            "--checkpoints" => a.checkpoints = value,
            "--window-ms" => a.window_ms = number(&value)?,
            "--parallelism" => a.parallelism = number(&value)? as usize,
            "--checkpoint-ms" => a.checkpoint_ms = number(&value)?,
            "--pause-every" => a.pause_every = number(&value)?,
            "--transactional-id-prefix" => a.transactional_id_prefix = value,
            "--report-to" => a.report_to = Some(value),
            "--from-savepoint" => a.from_savepoint = Some(value),
            "--changelog" => a.changelog = Some(value),
            "--consumer-property" => {
                let (k, v) = value
                    .split_once('=')
                    .ok_or(format!("{flag}: expected key=value"))?;
                a.consumer_properties.push((k.to_owned(), v.to_owned()));
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if a.input.is_empty() || a.output.is_empty() {
        return Err("--input and --output are required".into());
    }
    Ok(a)
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("topic_window_count: {e}");
            std::process::exit(2);
        }
    };
    let env = StreamEnv::new();
    env.set_parallelism(args.parallelism);
    let store = match LocalDirStore::new(&args.checkpoints) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("topic_window_count: {e}");
            std::process::exit(1);
        }
    };
    match &args.from_savepoint {
        Some(dir) => {
            println!("restoring from savepoint {dir}");
            env.restore_from_savepoint(dir);
        }
        None => {
            if let Ok(Some(id)) = store.latest() {
                println!("restoring from checkpoint {id}");
            }
        }
    }
    env.enable_checkpointing(Duration::from_millis(args.checkpoint_ms), store);
    if let Some(prefix) = &args.changelog {
        env.set_state_changelog(KafkaChangelog::new(&args.bootstrap, prefix));
    }
    if let Some(http) = &args.report_to {
        env.report_to(http);
    }
    let mut source = KafkaSource::new(&args.bootstrap, &args.input);
    if args.bounded {
        source = source.bounded();
    }
    for (k, v) in &args.consumer_properties {
        source = source.property(k, v);
    }
    let pause_every = args.pause_every;
    let counted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let keys = env.kafka_source(source).map(move |r| {
        let n = counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        if pause_every > 0 && n % pause_every == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned()
    });
    let sink = KafkaSink::new(
        &args.bootstrap,
        &args.output,
        DeliveryGuarantee::ExactlyOnce {
            transactional_id_prefix: args.transactional_id_prefix.clone(),
        },
    );
    let record = |key: &str, value: String| KafkaOutput {
        key: Some(key.as_bytes().to_vec()),
        value: Some(value.into_bytes()),
        headers: Vec::new(),
        partition: None,
    };
    if args.running {
        // A running count per key: every record updates its key's count.
        keys.map(|key| (key, 1u64))
            .key_by(|(key, _): &(String, u64)| key.clone())
            .reduce(|(key, a), (_, b)| (key, a + b))
            .sink_to_kafka(sink, move |(key, count): &(String, u64)| {
                record(key, count.to_string())
            });
    } else {
        keys.key_by(|key: &String| key.clone())
            .window(Windows::tumbling(Duration::from_millis(args.window_ms)))
            .aggregate(
                || 0u64,
                |count, _| *count += 1,
                |count, other| *count += other,
                |key, window, count| (key.clone(), window.start, *count),
            )
            .sink_to_kafka(sink, move |(key, start, count): &(String, i64, u64)| {
                record(key, format!("{start},{count}"))
            });
    }
    match env.execute("topic window count") {
        Ok(()) => println!("done"),
        Err(sluice_stream::StreamError::CancelledByRequest) => println!("cancelled"),
        Err(e) => {
            eprintln!("topic_window_count: {e}");
            std::process::exit(1);
        }
    }
}

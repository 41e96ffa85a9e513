//! A windowed word count over a topic (Flink's `WindowWordCount` over Kafka):
//! reads lines from a topic's record values, splits them into lower-case
//! words, counts each word per tumbling event-time window of the records'
//! timestamps, and prints `<window start ms>\t<word>\t<count>` per window and
//! word as the windows close. `--bounded` stops at the topic's end as found
//! at start, so every window closes and the job ends.
//!
//! ```sh
//! cargo run --release -p sluice-stream --example topic_word_count -- \
//!     --bootstrap 127.0.0.1:9092 --input lines --window-ms 5000 --bounded
//! ```

use std::time::Duration;

use sluice_stream::kafka::KafkaSource;
use sluice_stream::{StreamEnv, Windows};

struct Args {
    bootstrap: String,
    input: String,
    window_ms: u64,
    parallelism: usize,
    bounded: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        bootstrap: "127.0.0.1:9092".into(),
        input: String::new(),
        window_ms: 5000,
        parallelism: 2,
        bounded: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--bounded" {
            a.bounded = true;
            continue;
        }
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let number = |v: &str| v.parse::<u64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--bootstrap" => a.bootstrap = value,
            "--input" => a.input = value,
            "--window-ms" => a.window_ms = number(&value)?.max(1),
            "--parallelism" => a.parallelism = (number(&value)? as usize).max(1),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if a.input.is_empty() {
        return Err("--input is required".into());
    }
    Ok(a)
}

/// The words of a line: runs of letters and digits, in lower case.
fn words(line: &str) -> Vec<String> {
    line.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("topic_word_count: {e}");
            std::process::exit(2);
        }
    };
    let env = StreamEnv::new();
    env.set_parallelism(args.parallelism);
    let mut source = KafkaSource::new(&args.bootstrap, &args.input);
    if args.bounded {
        source = source.bounded();
    }
    env.kafka_source(source)
        .flat_map(|r| {
            words(&String::from_utf8_lossy(
                r.value.as_deref().unwrap_or_default(),
            ))
        })
        .key_by(|word: &String| word.clone())
        .window(Windows::tumbling(Duration::from_millis(args.window_ms)))
        .aggregate(
            || 0u64,
            |count, _| *count += 1,
            |count, other| *count += other,
            |word, window, count| format!("{}\t{word}\t{count}", window.start),
        )
        .for_each(|r| println!("{}", r.value));
    if let Err(e) = env.execute("topic word count") {
        eprintln!("topic_word_count: {e}");
        std::process::exit(1);
    }
}

//! `sluice produce`: one record per input line, from stdin or a file.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::ProgressBar;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::util::Timeout;
use rdkafka::ClientContext;

use super::{parse_kv, progress, ClientArgs};

#[derive(Args, Debug)]
pub struct ProduceArgs {
    pub topic: String,
    /// Read lines from this file instead of stdin.
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Text before the first SEP of a line is the record key, the rest its value.
    /// Lines without SEP get no key.
    #[arg(long, value_name = "SEP")]
    pub key_separator: Option<String>,
    /// Header added to every record; repeatable.
    #[arg(long = "header", value_name = "KEY=VALUE", value_parser = parse_kv)]
    pub headers: Vec<(String, String)>,
    /// Send every record to this partition (default: by key, murmur2 like the Java client).
    #[arg(long)]
    pub partition: Option<i32>,
    /// Acknowledgements required from the broker.
    #[arg(long, value_enum, default_value = "all")]
    pub acks: Acks,
    /// Compression codec of the record batches.
    #[arg(long, value_enum, default_value = "none")]
    pub compression: Compression,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Acks {
    All,
    #[value(name = "1")]
    One,
    #[value(name = "0")]
    Zero,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

/// Counts delivery reports (called on librdkafka's polling thread).
struct Deliveries {
    delivered: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
    bar: ProgressBar,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
                self.bar.inc(1);
            }
            Err((e, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut first) = self.first_error.lock() {
                    first.get_or_insert_with(|| e.to_string());
                }
            }
        }
    }
}

pub fn run(_runtime: &tokio::runtime::Runtime, args: ProduceArgs) -> Result<()> {
    let input: Box<dyn BufRead> = match &args.file {
        Some(path) => Box::new(BufReader::new(
            File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
        )),
        None => Box::new(BufReader::new(std::io::stdin())),
    };

    let mut config = args.client.config();
    config
        .set(
            "acks",
            match args.acks {
                Acks::All => "all",
                Acks::One => "1",
                Acks::Zero => "0",
            },
        )
        .set(
            "compression.type",
            match args.compression {
                Compression::None => "none",
                Compression::Gzip => "gzip",
                Compression::Snappy => "snappy",
                Compression::Lz4 => "lz4",
                Compression::Zstd => "zstd",
            },
        )
        // Same key -> partition mapping as the Java client, so records keyed
        // by this tool land where other producers put the same keys.
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5");
    // -X wins over the options above.
    for (k, v) in &args.client.client_config {
        config.set(k, v);
    }

    let bar = progress("delivered");
    let context = Deliveries {
        delivered: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        first_error: Mutex::new(None),
        bar: bar.clone(),
    };
    let producer: ThreadedProducer<Deliveries> =
        config.create_with_context(context).with_context(|| {
            format!(
                "cannot create a Kafka producer for {}",
                args.client.bootstrap
            )
        })?;

    let mut headers = OwnedHeaders::new_with_capacity(args.headers.len());
    for (k, v) in &args.headers {
        headers = headers.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }

    let started = Instant::now();
    let sent = send_lines(&producer, input, &args, &headers)?;
    // Waits for every outstanding delivery report; librdkafka gives up on a
    // record after message.timeout.ms, so this ends.
    producer
        .flush(Timeout::Never)
        .context("cannot flush the producer")?;
    bar.finish_and_clear();

    let context = producer.context();
    let delivered = context.delivered.load(Ordering::Relaxed);
    let failed = context.failed.load(Ordering::Relaxed);
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "produced {delivered} of {sent} record(s) to {} in {secs:.2}s ({failed} failed)",
        args.topic
    );
    if failed > 0 || delivered != sent {
        let first = context
            .first_error
            .lock()
            .ok()
            .and_then(|e| e.clone())
            .unwrap_or_else(|| "no delivery report".into());
        bail!("{failed} record(s) were not delivered; first error: {first}");
    }
    Ok(())
}

/// Sends every line; returns how many were handed to the producer.
fn send_lines(
    producer: &ThreadedProducer<Deliveries>,
    mut input: Box<dyn BufRead>,
    args: &ProduceArgs,
    headers: &OwnedHeaders,
) -> Result<u64> {
    let separator = args.key_separator.as_deref().map(str::as_bytes);
    let mut line = Vec::with_capacity(4096);
    let mut sent = 0u64;
    loop {
        line.clear();
        let n = input
            .read_until(b'\n', &mut line)
            .context("cannot read input")?;
        if n == 0 {
            return Ok(sent);
        }
        let text = strip_newline(&line);
        let (key, value) = split_key(text, separator);
        let mut record: BaseRecord<'_, [u8], [u8], ()> = BaseRecord::to(&args.topic).payload(value);
        if let Some(key) = key {
            record = record.key(key);
        }
        if !args.headers.is_empty() {
            record = record.headers(headers.clone());
        }
        if let Some(p) = args.partition {
            record = record.partition(p);
        }
        let mut record = record;
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    // The local queue drains as the broker acknowledges.
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => bail!("cannot produce record {}: {e}", sent + 1),
            }
        }
        sent += 1;
    }
}

/// Drops a trailing "\n" or "\r\n".
fn strip_newline(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Splits at the first `sep`; without `sep` (or without it in the line) the whole line is the value.
fn split_key<'a>(line: &'a [u8], sep: Option<&[u8]>) -> (Option<&'a [u8]>, &'a [u8]) {
    let Some(sep) = sep.filter(|s| !s.is_empty()) else {
        return (None, line);
    };
    match line.windows(sep.len()).position(|w| w == sep) {
        Some(at) => {
            let key = line.get(..at).unwrap_or_default();
            let value = line.get(at + sep.len()..).unwrap_or_default();
            (Some(key), value)
        }
        None => (None, line),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_at_the_first_separator() {
        assert_eq!(
            split_key(b"k:v:w", Some(b":")),
            (Some(&b"k"[..]), &b"v:w"[..])
        );
        assert_eq!(
            split_key(b"k::v", Some(b"::")),
            (Some(&b"k"[..]), &b"v"[..])
        );
        assert_eq!(split_key(b":v", Some(b":")), (Some(&b""[..]), &b"v"[..]));
        assert_eq!(split_key(b"v", Some(b":")), (None, &b"v"[..]));
        assert_eq!(split_key(b"k:v", None), (None, &b"k:v"[..]));
    }

    #[test]
    fn newlines_are_stripped() {
        assert_eq!(strip_newline(b"a\r\n"), b"a");
        assert_eq!(strip_newline(b"a\n"), b"a");
        assert_eq!(strip_newline(b"a"), b"a");
        assert_eq!(strip_newline(b"\n"), b"");
    }
}

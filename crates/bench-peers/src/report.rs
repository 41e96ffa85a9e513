//! The suite's report: collects result objects (one JSON object per line, from
//! `sluice bench --json` and this tool), labels them, and writes the results
//! JSON and the Markdown table.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::stats::BenchResult;

/// The suite's JSON file: run metadata plus every raw result object.
#[derive(Debug, Serialize, Deserialize)]
pub struct Suite {
    pub date: String,
    #[serde(default)]
    pub meta: Map<String, Value>,
    pub results: Vec<Value>,
}

/// Parses a JSON-lines file; blank lines are skipped, anything else must be
/// one JSON object per line.
pub fn parse_lines(text: &str) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(line).with_context(|| format!("line {}: not JSON", n + 1))?;
        if !v.is_object() {
            bail!("line {}: not a JSON object", n + 1);
        }
        out.push(v);
    }
    Ok(out)
}

/// Finds the single JSON object in a command's stdout (a load generator may
/// print nothing else there, but tolerate leading noise lines).
pub fn last_object(text: &str) -> Result<Value> {
    text.lines()
        .rev()
        .map(str::trim)
        .filter(|l| l.starts_with('{'))
        .find_map(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .filter(Value::is_object)
        })
        .context("no JSON object on stdout")
}

/// Applies `key=value` labels; a value that parses as JSON (true, 12, null)
/// is stored as such, anything else as a string.
pub fn annotate(obj: &mut Value, sets: &[String]) -> Result<()> {
    let map = obj.as_object_mut().context("result is not a JSON object")?;
    for s in sets {
        let (k, v) = s
            .split_once('=')
            .with_context(|| format!("--set {s}: expected key=value"))?;
        let value =
            serde_json::from_str::<Value>(v).unwrap_or_else(|_| Value::String(v.to_owned()));
        map.insert(k.to_owned(), value);
    }
    Ok(())
}

/// Reads the suite's JSON file (an object with `results`, or a bare array).
pub fn load_suite(path: &Path) -> Result<Suite> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    match v {
        Value::Array(results) => Ok(Suite {
            date: String::new(),
            meta: Map::new(),
            results,
        }),
        other => serde_json::from_value(other)
            .with_context(|| format!("{}: not a suite file", path.display())),
    }
}

/// Typed view of a raw object; fields it lacks take their defaults.
pub fn typed(v: &Value) -> BenchResult {
    serde_json::from_value(v.clone()).unwrap_or_else(|_| BenchResult {
        system: str_field(v, "system"),
        scenario: str_field(v, "scenario"),
        mode: str_field(v, "mode"),
        record_size: 0,
        records: 0,
        duration_s: 0.0,
        records_per_sec: v
            .get("records_per_sec")
            .and_then(Value::as_f64)
            .unwrap_or(0.0),
        mb_per_sec: v.get("mb_per_sec").and_then(Value::as_f64).unwrap_or(0.0),
        latency_ms: None,
        client_cpu_seconds: 0.0,
        client_cpu_share: v
            .get("client_cpu_share")
            .and_then(Value::as_f64)
            .unwrap_or(0.0),
        durable_before_ack: v.get("durable_before_ack").and_then(Value::as_bool),
        extra: Map::new(),
    })
}

fn str_field(v: &Value, k: &str) -> String {
    v.get(k)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// 1234567.8 -> "1,234,568".
pub fn thousands(x: f64) -> String {
    if !x.is_finite() {
        return "–".to_owned();
    }
    let n = x.round().abs() as u64;
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if x < -0.5 {
        out.push('-');
    }
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Latency in ms with three significant digits (0.0123, 1.23, 123, 1234).
pub fn ms(x: f64) -> String {
    if !x.is_finite() || x < 0.0 {
        "–".to_owned()
    } else if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else if x >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

fn mb(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

/// The Markdown report: a header, the table, then free-form notes.
pub fn markdown(suite: &Suite, notes: &str) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Sluice comparison suite — {}\n", suite.date);
    for (k, v) in &suite.meta {
        let shown = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
        let _ = writeln!(md, "- {k}: {shown}");
    }
    if !suite.meta.is_empty() {
        md.push('\n');
    }
    md.push_str(
        "| system | scenario | durable before ack | records/s | MB/s | p50 ms | p99 ms | p99.9 ms | max ms | client CPU share |\n\
         |---|---|---|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    for v in &suite.results {
        let r = typed(v);
        let durable = match r.durable_before_ack {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "n/a",
        };
        let rps = if r.records > 0 || r.records_per_sec > 0.0 {
            thousands(r.records_per_sec)
        } else {
            "–".to_owned()
        };
        let (p50, p99, p999, max) = match r.latency_ms {
            Some(l) => (ms(l.p50), ms(l.p99), ms(l.p999), ms(l.max)),
            None => ("–".into(), "–".into(), "–".into(), "–".into()),
        };
        let cpu = if r.client_cpu_seconds > 0.0 || r.client_cpu_share > 0.0 {
            format!("{:.2}", r.client_cpu_share)
        } else {
            "–".to_owned()
        };
        let mut scenario = r.scenario.replace('|', "/");
        if missed_target(&r) {
            scenario.push_str(" †");
        }
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.system,
            scenario,
            durable,
            rps,
            mb(r.mb_per_sec),
            p50,
            p99,
            p999,
            max,
            cpu
        );
    }
    md.push_str(
        "\n† open-loop run that did not sustain its target rate (achieved < 95 % of it): its \
         latency includes the growing backlog.\n",
    );
    md.push_str(
        "\nMB = 10^6 bytes of record payload. Latency: publish/produce = send (intended, for \
         open-loop runs) to broker acknowledgement; e2e = intended send time to consumption; \
         disk = one write interval + fdatasync. Client CPU share = load generator CPU seconds / \
         wall seconds (1.0 = one full core of the machine's 2).\n",
    );
    if !notes.trim().is_empty() {
        md.push_str("\n## Notes\n\n");
        md.push_str(notes.trim_end());
        md.push('\n');
    }
    md
}

/// Open-loop target rate of a result: `rate_target` (this tool) or
/// `target_rate` (`sluice bench`).
pub fn target_rate(r: &BenchResult) -> Option<f64> {
    ["rate_target", "target_rate"]
        .iter()
        .find_map(|k| r.extra.get(*k).and_then(Value::as_f64))
        .filter(|t| *t > 0.0)
}

/// True when an open-loop run achieved less than 95 % of its target rate.
pub fn missed_target(r: &BenchResult) -> bool {
    target_rate(r).is_some_and(|t| r.records_per_sec < 0.95 * t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1_234_567.8), "1,234,568");
        assert_eq!(thousands(f64::NAN), "–");
    }

    #[test]
    fn ms_three_significant_digits() {
        assert_eq!(ms(0.01234), "0.012");
        assert_eq!(ms(1.234), "1.23");
        assert_eq!(ms(12.34), "12.3");
        assert_eq!(ms(1234.4), "1234");
    }

    #[test]
    fn parse_lines_rejects_non_objects() {
        assert_eq!(
            parse_lines("{\"a\":1}\n\n{\"b\":2}\n").expect("ok").len(),
            2
        );
        assert!(parse_lines("[1,2]").is_err());
        assert!(parse_lines("{oops").is_err());
    }

    #[test]
    fn last_object_skips_noise() {
        let v = last_object("progress...\n{\"records\":5}\n").expect("object");
        assert_eq!(v["records"], json!(5));
        assert!(last_object("nothing here").is_err());
    }

    #[test]
    fn annotate_parses_json_values() {
        let mut v = json!({"system": "kafka"});
        annotate(
            &mut v,
            &[
                "system=sluice".into(),
                "durable_before_ack=true".into(),
                "n=3".into(),
            ],
        )
        .expect("annotate");
        assert_eq!(
            v,
            json!({"system": "sluice", "durable_before_ack": true, "n": 3})
        );
        assert!(annotate(&mut v, &["novalue".into()]).is_err());
    }

    #[test]
    fn markdown_table_rows() {
        let suite = Suite {
            date: "2026-11-26".into(),
            meta: Map::new(),
            results: vec![
                json!({"system":"sluice","scenario":"produce | 100 B","records":1000,
                       "records_per_sec":1234567.0,"mb_per_sec":123.4567,
                       "latency_ms":{"p50":1.5,"p90":2.0,"p99":3.25,"p999":10.5,"max":20.0,"mean":1.6},
                       "client_cpu_seconds":0.5,"client_cpu_share":0.41,"durable_before_ack":true}),
                json!({"system":"nats-jetstream","scenario":"lazy","records":10,"records_per_sec":10.0,
                       "mb_per_sec":0.001,"durable_before_ack":false}),
                json!({"system":"loopback-tcp","scenario":"iperf3","mb_per_sec":2000.0}),
            ],
        };
        let md = markdown(&suite, "drop_caches not permitted");
        assert!(md.contains(
            "| sluice | produce / 100 B | yes | 1,234,567 | 123 | 1.50 | 3.25 | 10.5 | 20.0 | 0.41 |"
        ), "{md}");
        assert!(
            md.contains("| nats-jetstream | lazy | **no** | 10 | 0.0 | – | – | – | – | – |"),
            "{md}"
        );
        assert!(
            md.contains("| loopback-tcp | iperf3 | n/a | – | 2000 |"),
            "{md}"
        );
        assert!(md.contains("## Notes\n\ndrop_caches not permitted\n"));
    }

    #[test]
    fn missed_target_marks_both_schemas() {
        let ok = typed(&json!({"records_per_sec": 960.0, "rate_target": 1000.0}));
        let missed = typed(&json!({"records_per_sec": 900.0, "target_rate": 1000.0}));
        let closed = typed(&json!({"records_per_sec": 900.0, "target_rate": null}));
        assert!(!missed_target(&ok));
        assert!(missed_target(&missed));
        assert!(!missed_target(&closed));
        let suite = Suite {
            date: "d".into(),
            meta: Map::new(),
            results: vec![
                json!({"system":"s","scenario":"e2e","records":9,"records_per_sec":900.0,
                                 "target_rate":1000.0}),
            ],
        };
        assert!(markdown(&suite, "").contains("| s | e2e † |"));
    }

    #[test]
    fn typed_tolerates_foreign_schema() {
        // A result whose latency block lacks fields must still yield a row.
        let v = json!({"system":"sluice","records_per_sec":5.0,"latency_ms":{"p50":1.0}});
        let r = typed(&v);
        assert_eq!(r.system, "sluice");
        assert_eq!(r.records_per_sec, 5.0);
    }
}

//! Every Nexmark query against its single-threaded reference, at several
//! parallelisms: the rows must be the same.

use sluice_bench::nexmark::{self, NexmarkRun, Query};

/// A fixed start, so runs are repeatable.
const BASE_TIME: u64 = 1_700_000_000_000;

fn rows_as_text(rows: &[nexmark::Row]) -> Vec<String> {
    let mut v: Vec<String> = rows.iter().map(|r| r.to_json().to_string()).collect();
    v.sort();
    v
}

fn check(config: nexmark::NexmarkConfig, events: u64) {
    let all = nexmark::generate(events, &config);
    for q in Query::ALL {
        let want = rows_as_text(&nexmark::reference(q, &all));
        assert!(
            !want.is_empty(),
            "{}: the reference found nothing: a vacuous check",
            q.name()
        );
        for parallelism in [1, 3] {
            let dir = tempfile::tempdir().unwrap();
            let output = dir.path().join("rows.jsonl");
            let (report, rows) = nexmark::run(&NexmarkRun {
                query: q,
                events,
                config: config.clone(),
                parallelism,
                output: Some(output.clone()),
            })
            .unwrap();
            assert_eq!(report.events, events);
            let got = rows_as_text(&rows);
            same(
                &got,
                &want,
                &format!("{} at parallelism {parallelism}", q.name()),
            );
            // The file holds the same rows, one JSON object per line.
            let text = std::fs::read_to_string(&output).unwrap();
            let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
            for l in &lines {
                serde_json::from_str::<serde_json::Value>(l).unwrap();
            }
            lines.sort();
            same(&lines, &want, &format!("{} output file", q.name()));
        }
    }
}

/// Equal row sets; on a difference, names the first row that differs
/// rather than printing thousands.
fn same(got: &[String], want: &[String], what: &str) {
    if got == want {
        return;
    }
    let first = got.iter().zip(want).position(|(g, w)| g != w);
    panic!(
        "{what}: {} rows, {} expected; first difference at {first:?}: {:?} vs {:?}",
        got.len(),
        want.len(),
        first.and_then(|i| got.get(i)),
        first.and_then(|i| want.get(i)),
    );
}

#[test]
fn queries_match_their_reference_with_the_default_configuration() {
    check(nexmark::config(BASE_TIME), 30_000);
}

#[test]
fn queries_match_their_reference_over_many_windows() {
    // A tenth of the default rate: 40,000 events span 40 s of event time,
    // so q5, q7 and q8 fire many windows.
    let config = nexmark::NexmarkConfig {
        first_rate: 1_000,
        next_rate: 1_000,
        ..nexmark::config(BASE_TIME)
    };
    check(config, 40_000);
}

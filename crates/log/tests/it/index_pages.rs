//! Lookups below the index entries memory keeps read one page of the index
//! files: reads at every offset and timestamp lookups give what a scan of
//! the batches gives, in the active segment and in sealed ones, after a
//! clean reopen, after a crash (no close), and with offset index files
//! damaged on disk (an entry read from `.index` is checked against the
//! log; `.timeindex` pages are checked for shape only, as Kafka does).

use std::path::Path;

use sluice_log::{FlushPolicy, ReadLimit};

use crate::{batch, batches_in, no_overrides, open, small_segments, Spec};

/// Batches appended: with an index entry for every batch after a segment's
/// first and pages of 4 entries, most lookups land in a page.
const BATCHES: i64 = 600;

/// (base offset, last offset, max timestamp) of every batch appended.
type Written = Vec<(i64, i64, i64)>;

fn fill(dir: &Path) -> Written {
    let store = open(dir, FlushPolicy::Never, small_segments(16 << 10, 0));
    store.create_topic("t", 1, &no_overrides(), false).unwrap();
    let p = store.partition("t", 0).unwrap();
    let mut written = Vec::new();
    let t0 = crate::now_ms() - 10_000_000;
    for i in 0..BATCHES {
        let count = 1 + (i % 3) as i32;
        // Timestamps rise with steps back now and then, so the time index
        // skips batches.
        let ts = t0 + i * 10 - if i % 7 == 3 { 45 } else { 0 };
        let r = p.append(&batch(&Spec::plain(count, 40).at(ts)), 0).unwrap();
        written.push((r.base_offset, r.end_offset - 1, ts));
    }
    written
}

fn check(dir: &Path, written: &Written) {
    let store = open(dir, FlushPolicy::Never, small_segments(16 << 10, 0));
    let p = store.partition("t", 0).unwrap();
    let end = written.last().unwrap().1 + 1;
    for offset in 0..end {
        let r = p.read(offset, 1, true, ReadLimit::LogEnd).unwrap();
        let got = batches_in(&r.records);
        let want = written.iter().find(|b| b.1 >= offset).unwrap();
        assert_eq!(got.len(), 1, "read at {offset}");
        assert_eq!((got[0].0, got[0].1), (want.0, want.1), "read at {offset}");
    }
    let (first_ts, last_ts) = (written[0].2, written.last().unwrap().2);
    for ts in (first_ts - 20..last_ts + 20).step_by(3) {
        let want = written
            .iter()
            .scan(i64::MIN, |max, b| {
                *max = (*max).max(b.2);
                Some((b.0, b.2, *max))
            })
            .find(|b| b.1 >= ts)
            .map(|b| (b.0, b.1));
        assert_eq!(p.offset_for_timestamp(ts).unwrap(), want, "timestamp {ts}");
    }
}

#[tokio::test]
async fn lookups_through_index_pages_match_a_scan() {
    let dir = tempfile::tempdir().unwrap();
    let written = fill(dir.path());
    let segments = std::fs::read_dir(dir.path().join("t-0"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "log"))
        })
        .count();
    assert!(segments > 2, "only {segments} segments: none sealed");
    // A crash: the store was dropped without a close, so this open
    // recovers, compares the index files with the log and keeps them.
    check(dir.path(), &written);
    {
        let store = open(dir.path(), FlushPolicy::Never, small_segments(16 << 10, 0));
        store.close().unwrap();
    }
    // A clean open trusts the files.
    check(dir.path(), &written);
}

#[tokio::test]
async fn a_damaged_offset_index_costs_precision_not_answers() {
    let dir = tempfile::tempdir().unwrap();
    let written = fill(dir.path());
    {
        let store = open(dir.path(), FlushPolicy::Never, small_segments(16 << 10, 0));
        store.close().unwrap();
    }
    // After a clean close the next open does not compare index files with
    // the log; scramble every offset index after its first two pages.
    let mut damaged = 0;
    for e in std::fs::read_dir(dir.path().join("t-0")).unwrap() {
        let path = e.unwrap().path();
        let ext = path.extension().and_then(|x| x.to_str()).unwrap_or("");
        if ext == "index" {
            let mut bytes = std::fs::read(&path).unwrap();
            if bytes.len() > 64 {
                for (i, b) in bytes.iter_mut().enumerate().skip(64) {
                    *b = b.wrapping_mul(31).wrapping_add(i as u8);
                }
                std::fs::write(&path, bytes).unwrap();
                damaged += 1;
            }
        }
    }
    assert!(damaged > 2, "only {damaged} index files damaged");
    check(dir.path(), &written);
}

//! Retention, segment rolls, log start offset, offset_for_timestamp.

use std::collections::BTreeMap;

use sluice_log::{FlushPolicy, LogError, ReadLimit, TopicConfig};

use crate::{batch, batches_in, log_files, no_overrides, now_ms, open, small_segments, Spec};

const DAY: i64 = 86_400_000;

#[tokio::test]
async fn segments_roll_by_size() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), FlushPolicy::Never, small_segments(1000, 4096));
    store.create_topic("r", 1, &no_overrides(), false).unwrap();
    let p = store.partition("r", 0).unwrap();
    // 261-byte batches: three fit in 1000 bytes, the fourth rolls.
    for _ in 0..10 {
        p.append(&batch(&Spec::plain(1, 200)), 0).unwrap();
    }
    let logs = log_files(&dir.path().join("r-0"));
    let names: Vec<String> = logs
        .iter()
        .map(|l| l.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        vec![
            "00000000000000000000.log",
            "00000000000000000003.log",
            "00000000000000000006.log",
            "00000000000000000009.log"
        ]
    );
    for l in &logs[..3] {
        assert_eq!(std::fs::metadata(l).unwrap().len(), 3 * 261);
    }
    // A fetch spanning segments returns whole batches across them.
    let r = p.read(1, 5 * 261, false, ReadLimit::HighWatermark).unwrap();
    let got: Vec<i64> = batches_in(&r.records).iter().map(|b| b.0).collect();
    assert_eq!(got, vec![1, 2, 3, 4, 5]);
    assert_eq!(p.size_bytes(), 10 * 261);
}

#[tokio::test]
async fn segments_roll_by_age_of_first_timestamp() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), FlushPolicy::Never, TopicConfig::default());
    store.create_topic("r", 1, &no_overrides(), false).unwrap();
    let p = store.partition("r", 0).unwrap();
    // segment.ms is 7 days: a segment whose first batch is 8 days old rolls.
    p.append(&batch(&Spec::plain(1, 10).at(now_ms() - 8 * DAY)), 0)
        .unwrap();
    p.append(&batch(&Spec::plain(1, 10)), 0).unwrap();
    p.append(&batch(&Spec::plain(1, 10)), 0).unwrap();
    assert_eq!(log_files(&dir.path().join("r-0")).len(), 2);
    // enforce_retention rolls an active segment that holds data and was
    // created more than segment.ms ago.
    let mut o = BTreeMap::new();
    o.insert("segment.ms".to_string(), "100".to_string());
    store.create_topic("s", 1, &o, false).unwrap();
    let p = store.partition("s", 0).unwrap();
    p.append(&batch(&Spec::plain(1, 10).at(now_ms() - 5000)), 0)
        .unwrap();
    assert_eq!(log_files(&dir.path().join("s-0")).len(), 1);
    std::thread::sleep(std::time::Duration::from_millis(250));
    // (The 8-day-old segment of "r" is past the default 7-day retention.)
    assert_eq!(store.enforce_retention().unwrap(), 1);
    assert_eq!(log_files(&dir.path().join("r-0")).len(), 1);
    assert_eq!(log_files(&dir.path().join("s-0")).len(), 2);
    // An empty active segment is not rolled again.
    assert_eq!(store.enforce_retention().unwrap(), 0);
    assert_eq!(log_files(&dir.path().join("s-0")).len(), 2);
    assert_eq!(
        p.append(&batch(&Spec::plain(1, 1)), 0).unwrap().base_offset,
        1
    );
}

/// Topic overrides: `segment.ms` as given, retention by time off (the
/// batches below carry timestamps months old).
fn roll_overrides(segment_ms: i64) -> BTreeMap<String, String> {
    let mut o = BTreeMap::new();
    o.insert("segment.ms".to_string(), segment_ms.to_string());
    o.insert("retention.ms".to_string(), "-1".to_string());
    o
}

#[tokio::test]
async fn old_record_timestamps_do_not_roll_a_segment_per_append() {
    // Regression: segment.ms used to count from the first batch's timestamp
    // to the wall clock, so a producer replaying 11-month-old records rolled
    // a new segment (three more open files) on every append.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), FlushPolicy::Never, TopicConfig::default());
    let mut o = BTreeMap::new();
    o.insert("retention.ms".to_string(), "-1".to_string());
    store.create_topic("old", 1, &o, false).unwrap();
    let p = store.partition("old", 0).unwrap();
    let eleven_months_ago = now_ms() - 330 * DAY;
    for i in 0..50 {
        let ts = eleven_months_ago + i * 1000;
        p.append(&batch(&Spec::plain(2, 100).at(ts)), 0).unwrap();
    }
    assert_eq!(log_files(&dir.path().join("old-0")).len(), 1);
    assert_eq!(p.log_end_offset(), 100);
    // Nor does the periodic check: the segment was created just now.
    assert_eq!(store.enforce_retention().unwrap(), 0);
    assert_eq!(log_files(&dir.path().join("old-0")).len(), 1);
    let r = p.read(0, 1 << 20, true, ReadLimit::LogEnd).unwrap();
    assert_eq!(batches_in(&r.records).len(), 50);
}

#[tokio::test]
async fn record_timestamps_spanning_segment_ms_roll() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), FlushPolicy::Never, TopicConfig::default());
    store
        .create_topic("span", 1, &roll_overrides(1000), false)
        .unwrap();
    let p = store.partition("span", 0).unwrap();
    let pdir = dir.path().join("span-0");
    let t0 = now_ms() - 330 * DAY;
    // (record timestamp, segments afterwards): a batch rolls when its
    // timestamp is more than segment.ms after the segment's first batch.
    let steps = [
        (t0, 1),
        (t0 + 500, 1),
        (t0 + 1000, 1),
        (t0 + 1001, 2),
        (t0 + 1500, 2),
        (t0 + 2001, 2),
        (t0 + 2002, 3),
        // Older than the segment's first batch: no roll.
        (t0, 3),
    ];
    for (i, (ts, segments)) in steps.into_iter().enumerate() {
        let r = p.append(&batch(&Spec::plain(1, 10).at(ts)), 0).unwrap();
        assert_eq!(r.base_offset, i as i64);
        assert_eq!(log_files(&pdir).len(), segments, "after batch {i} at {ts}");
    }
    let names: Vec<String> = log_files(&pdir)
        .iter()
        .map(|l| l.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        vec![
            "00000000000000000000.log",
            "00000000000000000003.log",
            "00000000000000000006.log"
        ]
    );
    // Batches without timestamps fall back to wall-clock time since the
    // segment was created.
    store
        .create_topic("nots", 1, &roll_overrides(100), false)
        .unwrap();
    let q = store.partition("nots", 0).unwrap();
    q.append(&batch(&Spec::plain(1, 10).at(-1)), 0).unwrap();
    q.append(&batch(&Spec::plain(1, 10).at(-1)), 0).unwrap();
    assert_eq!(log_files(&dir.path().join("nots-0")).len(), 1);
    std::thread::sleep(std::time::Duration::from_millis(250));
    q.append(&batch(&Spec::plain(1, 10).at(-1)), 0).unwrap();
    assert_eq!(log_files(&dir.path().join("nots-0")).len(), 2);
}

#[tokio::test]
async fn idle_segment_rolls_by_creation_time_on_enforce_retention() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), FlushPolicy::Always, TopicConfig::default());
    store
        .create_topic("busy", 1, &roll_overrides(200), false)
        .unwrap();
    store
        .create_topic("empty", 1, &roll_overrides(200), false)
        .unwrap();
    let p = store.partition("busy", 0).unwrap();
    let busy = dir.path().join("busy-0");
    let empty = dir.path().join("empty-0");
    // Timestamps far older than segment.ms: the periodic check must not
    // compare them with the wall clock.
    let r = p
        .append(&batch(&Spec::plain(1, 10).at(now_ms() - 330 * DAY)), 0)
        .unwrap();
    p.wait_durable(r.end_offset).await.unwrap();
    assert_eq!(store.enforce_retention().unwrap(), 0);
    assert_eq!(log_files(&busy).len(), 1, "a fresh segment does not roll");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(store.enforce_retention().unwrap(), 0);
    assert_eq!(log_files(&busy).len(), 2, "a non-empty idle segment rolls");
    assert_eq!(log_files(&empty).len(), 1, "an empty segment never rolls");
    // The new active segment is empty: later checks leave it alone.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(store.enforce_retention().unwrap(), 0);
    assert_eq!(log_files(&busy).len(), 2);
    assert_eq!(log_files(&empty).len(), 1);
    let r = p.append(&batch(&Spec::plain(1, 10)), 0).unwrap();
    assert_eq!(r.base_offset, 1);
    // A fetch still spans the rolled segment and the new one.
    let r = p.read(0, 1 << 20, true, ReadLimit::LogEnd).unwrap();
    let got: Vec<i64> = batches_in(&r.records).iter().map(|b| b.0).collect();
    assert_eq!(got, vec![0, 1]);
}

#[tokio::test]
async fn retention_by_time_deletes_old_segments_and_moves_log_start() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), FlushPolicy::Always, small_segments(300, 4096));
    let mut o = BTreeMap::new();
    o.insert("retention.ms".to_string(), DAY.to_string());
    store.create_topic("r", 1, &o, false).unwrap();
    let p = store.partition("r", 0).unwrap();
    let old = now_ms() - 3 * DAY;
    for _ in 0..4 {
        p.append(&batch(&Spec::plain(2, 200).at(old)), 0).unwrap();
    }
    for _ in 0..2 {
        p.append(&batch(&Spec::plain(2, 200)), 0).unwrap();
    }
    // Nothing above the high watermark is deleted: make it all durable first.
    p.wait_durable(p.log_end_offset()).await.unwrap();
    assert_eq!(p.high_watermark(), 12);
    assert_eq!(store.enforce_retention().unwrap(), 4);
    assert_eq!(p.log_start_offset(), 8);
    assert!(matches!(
        p.read(7, 1 << 20, true, ReadLimit::HighWatermark),
        Err(LogError::OffsetOutOfRange { log_start: 8, .. })
    ));
    let r = p.read(8, 1 << 20, true, ReadLimit::HighWatermark).unwrap();
    assert_eq!(batches_in(&r.records).len(), 2);
    assert_eq!(store.enforce_retention().unwrap(), 0);
    drop(p);
    drop(store);
    // The log start offset survives a restart.
    let store = open(dir.path(), FlushPolicy::Always, small_segments(300, 4096));
    assert_eq!(store.partition("r", 0).unwrap().log_start_offset(), 8);
}

#[tokio::test]
async fn retention_rolls_then_deletes_an_expired_active_segment() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), FlushPolicy::Never, TopicConfig::default());
    let mut o = BTreeMap::new();
    o.insert("retention.ms".to_string(), "1000".to_string());
    store.create_topic("r", 1, &o, false).unwrap();
    let p = store.partition("r", 0).unwrap();
    p.append(&batch(&Spec::plain(3, 10).at(now_ms() - 60_000)), 0)
        .unwrap();
    assert_eq!(store.enforce_retention().unwrap(), 1);
    assert_eq!((p.log_start_offset(), p.log_end_offset()), (3, 3));
    let r = p.read(3, 100, true, ReadLimit::HighWatermark).unwrap();
    assert!(r.records.is_empty());
    assert_eq!(
        p.append(&batch(&Spec::plain(1, 1)), 0).unwrap().base_offset,
        3
    );
    assert_eq!(log_files(&dir.path().join("r-0")).len(), 1);
}

#[tokio::test]
async fn retention_by_bytes_keeps_the_newest_segments() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), FlushPolicy::Never, small_segments(600, 4096));
    let mut o = BTreeMap::new();
    o.insert("retention.bytes".to_string(), "1300".to_string());
    store.create_topic("r", 1, &o, false).unwrap();
    let p = store.partition("r", 0).unwrap();
    // 261-byte batches, two per segment (522 bytes): 5 segments of 2.
    for _ in 0..10 {
        p.append(&batch(&Spec::plain(1, 200)), 0).unwrap();
    }
    assert_eq!(p.size_bytes(), 2610);
    // Kafka's rule: delete oldest while the rest stays >= retention.bytes.
    assert_eq!(store.enforce_retention().unwrap(), 2);
    assert_eq!(p.size_bytes(), 1566);
    assert_eq!(p.log_start_offset(), 4);
}

#[tokio::test]
async fn delete_records_moves_log_start_and_drops_whole_segments() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), FlushPolicy::Never, small_segments(600, 4096));
    store.create_topic("r", 1, &no_overrides(), false).unwrap();
    let p = store.partition("r", 0).unwrap();
    for _ in 0..10 {
        p.append(&batch(&Spec::plain(1, 200)), 0).unwrap();
    }
    assert!(matches!(
        p.delete_records_before(11),
        Err(LogError::OffsetOutOfRange { .. })
    ));
    assert_eq!(p.delete_records_before(5).unwrap(), 5);
    assert_eq!(log_files(&dir.path().join("r-0")).len(), 3);
    assert!(p.read(4, 1000, true, ReadLimit::HighWatermark).is_err());
    let r = p.read(5, 261, true, ReadLimit::HighWatermark).unwrap();
    assert_eq!(batches_in(&r.records)[0].0, 5);
    // Never backwards.
    assert_eq!(p.delete_records_before(2).unwrap(), 5);
    // -1 means the high watermark.
    assert_eq!(p.delete_records_before(-1).unwrap(), 10);
    assert_eq!(
        p.read(10, 1000, true, ReadLimit::HighWatermark)
            .unwrap()
            .records
            .len(),
        0
    );
}

#[tokio::test]
async fn offset_for_timestamp_uses_batch_max_timestamps() {
    let dir = tempfile::tempdir().unwrap();
    // Small index interval and segments so the time index and several
    // segments are involved.
    let store = open(dir.path(), FlushPolicy::Never, small_segments(2000, 100));
    store.create_topic("r", 1, &no_overrides(), false).unwrap();
    let p = store.partition("r", 0).unwrap();
    let base = now_ms() - 1000 * 1000;
    // Timestamps mostly increase, with one going back in time.
    let ts: Vec<i64> = (0..40)
        .map(|i| if i == 20 { base + 5 } else { base + i * 1000 })
        .collect();
    for t in &ts {
        p.append(&batch(&Spec::plain(2, 80).at(*t)), 0).unwrap();
    }
    assert!(log_files(&dir.path().join("r-0")).len() > 2);
    for target in [
        base - 1,
        base,
        base + 1,
        base + 999,
        base + 1000,
        base + 20_500,
        base + 39_000,
    ] {
        let want = ts
            .iter()
            .position(|t| *t >= target)
            .map(|i| (2 * i as i64, ts[i]));
        assert_eq!(
            p.offset_for_timestamp(target).unwrap(),
            want,
            "target {target}"
        );
    }
    assert_eq!(p.offset_for_timestamp(base + 39_001).unwrap(), None);
    // Not below the log start.
    p.delete_records_before(3).unwrap();
    assert_eq!(
        p.offset_for_timestamp(base).unwrap(),
        Some((3, base + 1000))
    );
}

#[tokio::test]
async fn truncate_to_rewinds_offsets_and_epochs() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), FlushPolicy::Never, small_segments(400, 4096));
    store.create_topic("r", 1, &no_overrides(), false).unwrap();
    let p = store.partition("r", 0).unwrap();
    for epoch in [1, 1, 2, 2, 5, 5] {
        p.append(&batch(&Spec::plain(2, 100)), epoch).unwrap();
    }
    assert_eq!(p.latest_epoch(), 5);
    assert_eq!(p.end_offset_for_epoch(5), (5, 12));
    assert_eq!(p.end_offset_for_epoch(2), (2, 8));
    assert_eq!(p.end_offset_for_epoch(3), (2, 8));
    assert_eq!(p.end_offset_for_epoch(0), (0, 0));
    assert_eq!(p.end_offset_for_epoch(9), (-1, -1));
    // Truncating into the middle of a batch removes that whole batch.
    p.truncate_to(9).unwrap();
    assert_eq!(p.log_end_offset(), 8);
    assert_eq!(p.latest_epoch(), 2);
    assert_eq!(p.end_offset_for_epoch(2), (2, 8));
    let r = p.append(&batch(&Spec::plain(1, 1)), 7).unwrap();
    assert_eq!(r.base_offset, 8);
    let all = p.read(0, 1 << 20, true, ReadLimit::LogEnd).unwrap();
    let got: Vec<(i64, i64)> = batches_in(&all.records)
        .iter()
        .map(|b| (b.0, b.1))
        .collect();
    assert_eq!(got, vec![(0, 1), (2, 3), (4, 5), (6, 7), (8, 8)]);
    drop(p);
    drop(store);
    let store = open(dir.path(), FlushPolicy::Never, small_segments(400, 4096));
    let p = store.partition("r", 0).unwrap();
    assert_eq!(p.latest_epoch(), 7);
    assert_eq!(p.end_offset_for_epoch(2), (2, 8));
    assert_eq!(p.end_offset_for_epoch(1), (1, 4));
}

#[tokio::test]
async fn segments_below_a_checkpointed_log_start_are_removed_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let defaults = small_segments(600, 4096);
    {
        let store = open(dir.path(), FlushPolicy::Never, defaults.clone());
        store.create_topic("r", 1, &no_overrides(), false).unwrap();
        let p = store.partition("r", 0).unwrap();
        for _ in 0..6 {
            p.append(&batch(&Spec::plain(1, 200)), 0).unwrap();
        }
    }
    // As if a crash hit after the checkpoint moved but before the deletion.
    std::fs::write(dir.path().join("r-0/log-start-offset"), "4").unwrap();
    let store = open(dir.path(), FlushPolicy::Never, defaults);
    let p = store.partition("r", 0).unwrap();
    assert_eq!(p.log_start_offset(), 4);
    assert_eq!(log_files(&dir.path().join("r-0")).len(), 1);
    assert_eq!(p.size_bytes(), 2 * 261);
}

/// Descriptors this process holds on `dir` or files under it.
fn descriptors_under(dir: &std::path::Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.starts_with(dir))
        .count()
}

/// A segment holds one descriptor (its log), not three: the indexes live in
/// memory and their files are opened only to be written or synced. They are
/// still written, and a restart still finds them.
#[tokio::test]
async fn a_segment_holds_one_descriptor_and_its_indexes_are_still_written() {
    let dir = tempfile::tempdir().unwrap();
    let part = dir.path().join("r-0");
    {
        let store = open(dir.path(), FlushPolicy::Always, small_segments(1000, 100));
        store.create_topic("r", 1, &no_overrides(), false).unwrap();
        let p = store.partition("r", 0).unwrap();
        for _ in 0..30 {
            let appended = p.append(&batch(&Spec::plain(1, 200)), 0).unwrap();
            p.wait_durable(appended.end_offset).await.unwrap();
        }
        let segments = log_files(&part).len();
        assert_eq!(segments, 10);
        assert_eq!(descriptors_under(&part), segments);
        // Every rolled segment's offset index holds its entries (one per
        // 100 bytes of batches: the second and third batch; the first is
        // at position 0).
        for log in &log_files(&part)[..9] {
            let index = log.with_extension("index");
            assert_eq!(std::fs::metadata(&index).unwrap().len(), 2 * 8, "{index:?}");
            assert!(log.with_extension("timeindex").exists());
        }
        store.flush_all().unwrap();
    }
    // The first store's flusher may still hold its files; the reopened
    // store adds one descriptor per segment.
    let before = descriptors_under(&part);
    let store = open(dir.path(), FlushPolicy::Always, small_segments(1000, 100));
    let p = store.partition("r", 0).unwrap();
    assert_eq!(descriptors_under(&part) - before, 10);
    let r = p.read(13, 261, false, ReadLimit::HighWatermark).unwrap();
    assert_eq!(batches_in(&r.records).first().map(|b| b.0), Some(13));
}

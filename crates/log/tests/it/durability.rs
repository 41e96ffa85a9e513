//! Flush policies: group commit, the high watermark under each policy.

use std::sync::Arc;

use sluice_log::{FlushPolicy, ReadLimit, TopicConfig};

use crate::{batch, batches_in, no_overrides, open, Spec};

#[tokio::test(flavor = "current_thread")]
async fn waiters_share_one_fsync_and_hw_follows_durability() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), FlushPolicy::Always, TopicConfig::default());
    store.create_topic("d", 1, &no_overrides(), false).unwrap();
    let p = store.partition("d", 0).unwrap();
    let mut hw = p.watch_high_watermark();
    // On a current-thread runtime the flusher cannot run before we yield:
    // all 50 appends are written to the OS first.
    let mut ends = Vec::new();
    for _ in 0..50 {
        ends.push(p.append(&batch(&Spec::plain(2, 30)), 0).unwrap().end_offset);
    }
    assert_eq!(p.log_end_offset(), 100);
    // Not durable yet, so not visible to consumers; replicas see the log end.
    assert_eq!(p.high_watermark(), 0);
    let r = p.read(0, 1 << 20, true, ReadLimit::HighWatermark).unwrap();
    assert!(r.records.is_empty());
    assert_eq!(r.high_watermark, 0);
    let r = p.read(0, 1 << 20, true, ReadLimit::LogEnd).unwrap();
    assert_eq!(batches_in(&r.records).len(), 50);

    let before = p.fsync_count();
    let waiters: Vec<_> = ends
        .into_iter()
        .map(|end| {
            let p = Arc::clone(&p);
            tokio::spawn(async move { p.wait_durable(end).await })
        })
        .collect();
    for w in waiters {
        w.await.unwrap().unwrap();
    }
    assert_eq!(p.fsync_count() - before, 1, "one fsync for all 50 waiters");
    assert_eq!(p.high_watermark(), 100);
    hw.wait_for(|h| *h == 100).await.unwrap();
    let r = p.read(0, 1 << 20, true, ReadLimit::HighWatermark).unwrap();
    assert_eq!(batches_in(&r.records).len(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_producers_all_become_durable() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), FlushPolicy::Always, TopicConfig::default());
    store.create_topic("d", 1, &no_overrides(), false).unwrap();
    let p = store.partition("d", 0).unwrap();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let p = Arc::clone(&p);
        tasks.push(tokio::spawn(async move {
            for i in 0..20 {
                let b = batch(&Spec {
                    fill: (t * 20 + i) as u8,
                    ..Spec::plain(1, 50)
                });
                let r = p.append(&b, 0).unwrap();
                p.wait_durable(r.end_offset).await.unwrap();
                assert!(p.high_watermark() >= r.end_offset);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(p.high_watermark(), 160);
    let r = p.read(0, 1 << 20, true, ReadLimit::HighWatermark).unwrap();
    let offsets: Vec<i64> = batches_in(&r.records).iter().map(|b| b.0).collect();
    assert_eq!(offsets, (0..160).collect::<Vec<i64>>());
    assert!(p.fsync_count() >= 1);
}

#[tokio::test]
async fn interval_and_never_acknowledge_at_once() {
    for flush in [
        FlushPolicy::Never,
        FlushPolicy::Interval {
            ms: 3_600_000,
            bytes: u64::MAX,
        },
    ] {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), flush, TopicConfig::default());
        store.create_topic("d", 1, &no_overrides(), false).unwrap();
        let p = store.partition("d", 0).unwrap();
        let r = p.append(&batch(&Spec::plain(3, 10)), 0).unwrap();
        // Returns without any fsync having happened.
        p.wait_durable(r.end_offset).await.unwrap();
        assert_eq!(p.fsync_count(), 0);
        assert_eq!(p.high_watermark(), 3);
        store.flush_all().unwrap();
        assert_eq!(p.fsync_count(), 1);
    }
}

#[tokio::test]
async fn interval_flushes_once_enough_bytes_accumulate() {
    let dir = tempfile::tempdir().unwrap();
    let flush = FlushPolicy::Interval {
        ms: 3_600_000,
        bytes: 1000,
    };
    let store = open(dir.path(), flush, TopicConfig::default());
    store.create_topic("d", 1, &no_overrides(), false).unwrap();
    let p = store.partition("d", 0).unwrap();
    for _ in 0..5 {
        p.append(&batch(&Spec::plain(1, 300)), 0).unwrap();
    }
    // Wait (without a deadline assertion) for the background flusher.
    while p.fsync_count() == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn deleting_a_topic_releases_waiters_and_stops_the_partition() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), FlushPolicy::Always, TopicConfig::default());
    store.create_topic("d", 1, &no_overrides(), false).unwrap();
    let p = store.partition("d", 0).unwrap();
    p.append(&batch(&Spec::plain(1, 1)), 0).unwrap();
    store.delete_topic("d").unwrap();
    assert!(p.wait_durable(1_000).await.is_err());
    assert!(p.append(&batch(&Spec::plain(1, 1)), 0).is_err());
    assert!(!dir.path().join("d-0").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_see_only_whole_durable_batches_while_appends_and_rolls_run() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(
        dir.path(),
        FlushPolicy::Always,
        crate::small_segments(4000, 300),
    );
    store.create_topic("d", 1, &no_overrides(), false).unwrap();
    let p = store.partition("d", 0).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let p = Arc::clone(&p);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || reads == 0 {
                let hw = p.high_watermark();
                let from = (reads as i64 * 7) % (hw + 1);
                let r = p.read(from, 3000, true, ReadLimit::HighWatermark).unwrap();
                // validate_batches checks every CRC: no torn bytes, ever.
                let bs = batches_in(&r.records);
                let mut expect = None;
                for (base, last, _, _) in &bs {
                    if let Some(e) = expect {
                        assert_eq!(*base, e, "offsets are contiguous");
                    }
                    assert!(*last < r.high_watermark, "nothing above the high watermark");
                    expect = Some(last + 1);
                }
                if from < r.high_watermark {
                    let first = bs.first().expect("data below the high watermark");
                    assert!(first.0 <= from && from <= first.1);
                }
                reads += 1;
            }
            reads
        })
    };
    let mut tasks = Vec::new();
    for t in 0..4u8 {
        let p = Arc::clone(&p);
        tasks.push(tokio::spawn(async move {
            for i in 0..50u8 {
                let b = batch(&Spec {
                    fill: t.wrapping_mul(50).wrapping_add(i),
                    ..Spec::plain(1 + i32::from(i % 4), 40 + usize::from(i) * 3)
                });
                let r = p.append(&b, 0).unwrap();
                p.wait_durable(r.end_offset).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
    assert!(crate::log_files(&dir.path().join("d-0")).len() > 3);
    assert_eq!(p.high_watermark(), p.log_end_offset());
}

//! Closing cleanly and opening again: the clean-shutdown marker lets the
//! next open skip the recovery checks, and lasts for that one open only;
//! the descriptor cache keeps many partitions readable with few files open.

use std::os::unix::fs::FileExt;
use std::path::Path;

use sluice_log::{FlushPolicy, ReadLimit, TopicConfig};

use crate::{batch, batches_in, no_overrides, open, stamped, Spec, DESCRIPTOR_BUDGET};

const MARKER: &str = "meta/clean-shutdown";

fn values(dir: &Path, topic: &str, partitions: i32) -> Vec<Vec<u8>> {
    let store = open(dir, FlushPolicy::Always, TopicConfig::default());
    (0..partitions)
        .map(|i| {
            let p = store.partition(topic, i).unwrap();
            p.read(0, 1 << 20, true, ReadLimit::HighWatermark)
                .unwrap()
                .records
                .to_vec()
        })
        .collect()
}

#[tokio::test]
async fn a_clean_close_is_trusted_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut stored = Vec::new();
    {
        let store = open(dir.path(), FlushPolicy::Always, TopicConfig::default());
        store.create_topic("t", 1, &no_overrides(), false).unwrap();
        let p = store.partition("t", 0).unwrap();
        for seq in 0..3 {
            let b = batch(&Spec::idem(7, 0, seq * 2, 2));
            let r = p.append(&b, 0).unwrap();
            p.wait_durable(r.end_offset).await.unwrap();
            stored.push(stamped(&b, r.base_offset, 0));
        }
        store.close().unwrap();
    }
    assert!(dir.path().join(MARKER).exists());
    {
        let store = open(dir.path(), FlushPolicy::Always, TopicConfig::default());
        // Consumed by the open: a crash from here on gets full recovery.
        assert!(!dir.path().join(MARKER).exists());
        let p = store.partition("t", 0).unwrap();
        assert_eq!(p.high_watermark(), 6);
        let r = p.read(0, 1 << 20, true, ReadLimit::HighWatermark).unwrap();
        assert_eq!(r.records.as_ref(), stored.concat().as_slice());
        // The producer state came back: a retry of the last batch is a duplicate.
        let retry = p.append(&batch(&Spec::idem(7, 0, 4, 2)), 0).unwrap();
        assert!(retry.duplicate);
        assert_eq!(retry.base_offset, 4);
        // Appended after the clean open, then "killed": the tail is torn.
        let b = batch(&Spec::idem(7, 0, 6, 2));
        let r = p.append(&b, 0).unwrap();
        p.wait_durable(r.end_offset).await.unwrap();
        stored.push(stamped(&b, r.base_offset, 0));
    }
    let log = dir.path().join("t-0").join(format!("{:020}.log", 0));
    let len = std::fs::metadata(&log).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&log).unwrap();
    // A batch whose header claims more bytes than follow, then garbage
    // inside the last good batch's records: the CRC walk must run.
    f.write_all_at(&[0xAB; 8], len - 4).unwrap();
    drop(f);
    let recovered = values(dir.path(), "t", 1);
    let good: Vec<u8> = stored[..3].concat();
    assert_eq!(recovered[0], good, "the torn tail was served");
    assert_eq!(batches_in(&recovered[0]).len(), 3);
}

#[tokio::test]
async fn many_partitions_with_few_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let partitions = 20 * DESCRIPTOR_BUDGET as i32;
    let mut stored = Vec::new();
    {
        let store = open(dir.path(), FlushPolicy::Always, TopicConfig::default());
        store
            .create_topic("wide", partitions as u32, &no_overrides(), false)
            .unwrap();
        for i in 0..partitions {
            let p = store.partition("wide", i).unwrap();
            let b = batch(&Spec {
                fill: i as u8,
                ..Spec::plain(1, 20)
            });
            let r = p.append(&b, 0).unwrap();
            p.wait_durable(r.end_offset).await.unwrap();
            stored.push(stamped(&b, r.base_offset, 0));
        }
        // Read back twice in turn: every read reopens a closed file.
        for _ in 0..2 {
            for (i, want) in stored.iter().enumerate() {
                let p = store.partition("wide", i as i32).unwrap();
                let r = p.read(0, 1 << 20, true, ReadLimit::HighWatermark).unwrap();
                assert_eq!(r.records.as_ref(), want.as_slice(), "partition {i}");
            }
        }
        let stats = sluice_log::segment_file_stats();
        assert!(stats.evictions > 0, "{stats:?}");
        // Other tests of this binary run meanwhile; each may hold one
        // file above the budget while it opens.
        assert!(stats.open <= DESCRIPTOR_BUDGET + 16, "{stats:?}");
        store.close().unwrap();
    }
    for (i, got) in values(dir.path(), "wide", partitions)
        .into_iter()
        .enumerate()
    {
        assert_eq!(got, stored[i], "partition {i} after reopening");
    }
}

/// A leader assigns its epoch at the log end before anything is written in
/// it; a clean close writes that down and the next open keeps it as it is:
/// same epoch, and the checkpoint file not replaced (no write per partition
/// at every start).
#[tokio::test]
async fn an_empty_leader_epoch_survives_a_clean_restart_unrewritten() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), FlushPolicy::Always, TopicConfig::default());
        store.create_topic("t", 1, &no_overrides(), false).unwrap();
        let p = store.partition("t", 0).unwrap();
        let r = p.append(&batch(&Spec::plain(3, 10)), 0).unwrap();
        p.wait_durable(r.end_offset).await.unwrap();
        p.assign_leader_epoch(4).unwrap();
        store.close().unwrap();
    }
    let checkpoint = dir.path().join("t-0").join("leader-epoch-checkpoint");
    let written = std::fs::metadata(&checkpoint).unwrap().ino();
    for _ in 0..2 {
        let store = open(dir.path(), FlushPolicy::Always, TopicConfig::default());
        let p = store.partition("t", 0).unwrap();
        assert_eq!(p.latest_epoch(), 4);
        assert_eq!(p.end_offset_for_epoch(0), (0, 3));
        assert_eq!(std::fs::metadata(&checkpoint).unwrap().ino(), written);
        store.close().unwrap();
    }
}

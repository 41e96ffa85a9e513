//! Replicated mode: follower appends (`append_replica`), the high watermark
//! under the replication layer's control, `wait_committed`, the durable-end
//! watch, divergent-suffix truncation and `Store::ensure_topic`. The
//! property test at the end replicates between two partitions against a
//! model of the leader's log.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use proptest::prelude::*;
use sluice_log::{FlushPolicy, LogError, Partition, ReadLimit, Store, TopicConfig};
use tempfile::TempDir;

use crate::{batch, batches_in, log_files, no_overrides, open, small_segments, stamped, Spec};

const TOPIC: &str = "r";
const TOPIC_ID: [u8; 16] = [7; 16];

/// One broker's store in its own directory.
struct Node {
    dir: TempDir,
    /// None only while reopening.
    store: Option<Arc<Store>>,
    flush: FlushPolicy,
    defaults: TopicConfig,
}

impl Node {
    /// A store holding topic `r` (one partition, id `TOPIC_ID`, created by
    /// `ensure_topic` as the replication layer does), in replicated mode.
    fn new(flush: FlushPolicy, defaults: TopicConfig) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), flush, defaults.clone());
        let info = store
            .ensure_topic(TOPIC, TOPIC_ID, 1, &no_overrides())
            .unwrap();
        assert_eq!(info.id, TOPIC_ID);
        let node = Node {
            dir,
            store: Some(store),
            flush,
            defaults,
        };
        node.p().set_replicated(true);
        node
    }

    fn store(&self) -> &Arc<Store> {
        self.store.as_ref().unwrap()
    }

    fn p(&self) -> Arc<Partition> {
        self.store().partition(TOPIC, 0).unwrap()
    }

    fn part_dir(&self) -> PathBuf {
        self.dir.path().join(format!("{TOPIC}-0"))
    }

    /// Drops the store without a flush (a process crash; the page cache
    /// survives) and opens it again in replicated mode.
    fn reopen(&mut self) {
        self.store = None;
        self.store = Some(open(self.dir.path(), self.flush, self.defaults.clone()));
        self.p().set_replicated(true);
    }
}

/// Everything from the log start to the log end.
fn all_bytes(p: &Partition) -> Vec<u8> {
    p.read(
        p.log_start_offset(),
        usize::MAX / 2,
        true,
        ReadLimit::LogEnd,
    )
    .unwrap()
    .records
    .to_vec()
}

/// One follower fetch: reads from the leader at the follower's log end (at
/// most `max_bytes`, at least one batch) and appends it as a replica.
/// Returns the follower's new log end.
fn copy(leader: &Partition, follower: &Partition, max_bytes: usize) -> i64 {
    let at = follower.log_end_offset();
    let r = leader.read(at, max_bytes, true, ReadLimit::LogEnd).unwrap();
    if r.records.is_empty() {
        return at;
    }
    follower.append_replica(&r.records).unwrap()
}

/// Kafka's follower truncation: ask the leader for the end of our latest
/// epoch; when it answers an older epoch, our own end of that epoch bounds
/// it too; never above our log end. Without an answer, only what is known
/// committed (the high watermark) stays.
fn truncate_follower(leader: &Partition, follower: &Partition) -> i64 {
    let ours = follower.latest_epoch();
    let target = if ours < 0 {
        follower.high_watermark()
    } else {
        let (epoch, end) = leader.end_offset_for_epoch(ours);
        if epoch < 0 {
            follower.high_watermark()
        } else if epoch < ours {
            end.min(follower.end_offset_for_epoch(epoch).1)
        } else {
            end
        }
    };
    let target = target.min(follower.log_end_offset());
    follower.truncate_to(target).unwrap();
    target
}

/// The epoch cache as OffsetForLeaderEpoch answers for epochs 0..=max.
fn epoch_answers(p: &Partition, max: i32) -> Vec<(i32, i64)> {
    (0..=max).map(|e| p.end_offset_for_epoch(e)).collect()
}

/// Polls `wait_committed(end)` exactly once.
async fn committed_now(p: &Partition, end: i64) -> Option<Result<(), LogError>> {
    let fut = p.wait_committed(end);
    tokio::pin!(fut);
    std::future::poll_fn(|cx| match fut.as_mut().poll(cx) {
        Poll::Ready(r) => Poll::Ready(Some(r)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

async fn settle() {
    for _ in 0..5 {
        tokio::task::yield_now().await;
    }
}

/// Whether `task` finishes within a generous bound: what must happen is
/// waited for, so a loaded machine cannot fail the test (only a lost wake-up
/// can).
async fn finishes<T>(task: &tokio::task::JoinHandle<T>) -> bool {
    for _ in 0..5_000 {
        if task.is_finished() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    task.is_finished()
}

#[tokio::test(flavor = "current_thread")]
async fn replica_append_keeps_the_leaders_bytes_offsets_and_epochs() {
    let leader = Node::new(FlushPolicy::Always, TopicConfig::default());
    let mut follower = Node::new(FlushPolicy::Always, TopicConfig::default());
    let (l, f) = (leader.p(), follower.p());
    let a = batch(&Spec::plain(3, 40));
    let b = batch(&Spec::idem(9, 0, 0, 2));
    let c = batch(&Spec::plain(1, 10));
    let d = [batch(&Spec::plain(2, 5)), batch(&Spec::plain(4, 70))].concat();
    assert_eq!(l.append(&a, 0).unwrap().end_offset, 3);
    assert_eq!(l.append(&b, 0).unwrap().end_offset, 5);
    assert_eq!(l.append(&c, 2).unwrap().end_offset, 6);
    assert_eq!(l.append(&d, 5).unwrap().end_offset, 12);

    // First one batch, then the rest in one call.
    assert_eq!(copy(&l, &f, 1), 3);
    assert_eq!(f.log_end_offset(), 3);
    assert_eq!(copy(&l, &f, 1 << 20), 12);
    assert_eq!(copy(&l, &f, 1 << 20), 12, "nothing left to copy");

    let want = [
        stamped(&a, 0, 0),
        stamped(&b, 3, 0),
        stamped(&c, 5, 2),
        stamped(&d[..d.len() - 70 - 61], 6, 5),
        stamped(&d[d.len() - 70 - 61..], 8, 5),
    ]
    .concat();
    assert_eq!(all_bytes(&l), want);
    assert_eq!(
        all_bytes(&f),
        want,
        "the follower stores the leader's bytes"
    );
    assert_eq!(f.latest_epoch(), 5);
    assert_eq!(epoch_answers(&f, 6), epoch_answers(&l, 6));
    assert_eq!(f.end_offset_for_epoch(2), (2, 6));
    assert_eq!(f.end_offset_for_epoch(4), (2, 6));

    // Group commit works for replica appends: the follower's flusher makes
    // them durable and moves the durable end.
    assert!(f.durable_end_offset() < 12);
    f.wait_durable(12).await.unwrap();
    assert_eq!(f.durable_end_offset(), 12);

    let leader_checkpoint =
        std::fs::read(leader.part_dir().join("leader-epoch-checkpoint")).unwrap();
    let follower_checkpoint =
        std::fs::read(follower.part_dir().join("leader-epoch-checkpoint")).unwrap();
    assert_eq!(follower_checkpoint, leader_checkpoint);
    assert_eq!(follower_checkpoint, b"0\n3\n0 0\n2 5\n5 6\n");

    drop(f);
    follower.reopen();
    let f = follower.p();
    assert_eq!(all_bytes(&f), want);
    assert_eq!(epoch_answers(&f, 6), epoch_answers(&l, 6));
}

#[tokio::test(flavor = "current_thread")]
async fn replica_append_refuses_overlaps_and_damaged_batches_and_takes_compaction_gaps() {
    let leader = Node::new(FlushPolicy::Never, TopicConfig::default());
    let mut follower = Node::new(FlushPolicy::Never, TopicConfig::default());
    let (l, f) = (leader.p(), follower.p());
    for n in [3, 2, 4] {
        l.append(&batch(&Spec::plain(n, 20)), 1).unwrap();
    }
    let all = all_bytes(&l);
    let sizes: Vec<usize> = batches_in(&all).iter().map(|b| b.3).collect();
    let (first, rest) = all.split_at(sizes[0]);
    let (second, third) = rest.split_at(sizes[1]);

    // A batch that overlaps what the follower has: all or nothing.
    assert_eq!(f.append_replica(first).unwrap(), 3);
    assert!(matches!(
        f.append_replica(first),
        Err(LogError::ReplicaOffsetMismatch {
            expected: 3,
            got: 0
        })
    ));
    match f.append_replica(&[second, first].concat()) {
        Err(LogError::ReplicaOffsetMismatch { expected, got }) => {
            assert_eq!((expected, got), (5, 0));
        }
        other => panic!("expected ReplicaOffsetMismatch, got {other:?}"),
    }
    assert_eq!(f.log_end_offset(), 3);
    // The CRC is checked (the leader's stamps lie outside it).
    let mut damaged = second.to_vec();
    let last = damaged.len() - 1;
    damaged[last] ^= 0x40;
    assert!(matches!(
        f.append_replica(&damaged),
        Err(LogError::CorruptBatch(_))
    ));
    assert!(f.append_replica(&[]).is_err());
    assert_eq!(f.log_end_offset(), 3);
    // A leader's compacted log has gaps where records were removed: the
    // follower stores the batches at their own offsets, and a read at a
    // removed offset gets the next batch.
    assert_eq!(f.append_replica(third).unwrap(), 9);
    assert_eq!(all_bytes(&f), [first, third].concat());
    let at_gap = f.read(3, 1 << 20, true, ReadLimit::LogEnd).unwrap();
    assert_eq!(&at_gap.records[..], third);
    drop(f);
    follower.reopen();
    assert_eq!(all_bytes(&follower.p()), [first, third].concat());
}

/// The files of a partition directory (name → contents), sorted.
fn dir_contents(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "current_thread")]
async fn replica_segments_and_indexes_are_the_leaders_when_copied_batch_by_batch() {
    // Small segments and a dense index: many rolls and more than the 128
    // index entries a bulk index write waits for.
    let defaults = small_segments(20_000, 0);
    let mut leader = Node::new(FlushPolicy::Never, defaults.clone());
    let mut follower = Node::new(FlushPolicy::Never, defaults.clone());
    let mut chunked = Node::new(FlushPolicy::Never, defaults);
    let l = leader.p();
    for i in 0..600 {
        let spec = Spec {
            fill: i as u8,
            ..Spec::plain(1 + (i % 4), 10 + (i as usize * 7) % 90)
        };
        l.append(&batch(&spec), i / 150).unwrap();
    }
    let end = l.log_end_offset();
    let (f, c) = (follower.p(), chunked.p());
    while f.log_end_offset() < end {
        copy(&l, &f, 1);
    }
    while c.log_end_offset() < end {
        copy(&l, &c, 1500);
    }
    assert_eq!(all_bytes(&f), all_bytes(&l));
    assert_eq!(all_bytes(&c), all_bytes(&l));
    leader.store().flush_all().unwrap();
    follower.store().flush_all().unwrap();
    chunked.store().flush_all().unwrap();
    // Batch by batch, the follower makes the same rolls and writes the same
    // indexes and checkpoints as the leader, byte for byte.
    assert!(log_files(&leader.part_dir()).len() > 2);
    assert_eq!(
        dir_contents(&follower.part_dir()),
        dir_contents(&leader.part_dir())
    );
    // In bigger chunks the rolls differ, but the indexes it wrote are the
    // ones recovery derives from the log: reopening rewrites nothing.
    assert!(log_files(&chunked.part_dir()).len() > 2);
    let before = dir_contents(&chunked.part_dir());
    drop((l, f, c));
    leader.reopen();
    follower.reopen();
    chunked.reopen();
    assert_eq!(dir_contents(&chunked.part_dir()), before);
    assert_eq!(
        dir_contents(&follower.part_dir()),
        dir_contents(&leader.part_dir())
    );
    // Reads at every offset agree.
    let (l, f, c) = (leader.p(), follower.p(), chunked.p());
    for off in (0..end).step_by(37) {
        let want = l.read(off, 700, true, ReadLimit::LogEnd).unwrap().records;
        assert_eq!(
            f.read(off, 700, true, ReadLimit::LogEnd).unwrap().records,
            want
        );
        let got = c.read(off, 700, true, ReadLimit::LogEnd).unwrap().records;
        assert_eq!(batches_in(&got).first(), batches_in(&want).first());
    }
}

#[tokio::test(flavor = "current_thread")]
async fn replicated_idempotent_batches_are_duplicates_once_the_follower_leads() {
    let leader = Node::new(FlushPolicy::Never, TopicConfig::default());
    let mut follower = Node::new(FlushPolicy::Never, TopicConfig::default());
    let (l, f) = (leader.p(), follower.p());
    l.append(&batch(&Spec::idem(7, 0, 0, 3)), 1).unwrap();
    l.append(&batch(&Spec::idem(8, 2, 10, 1)), 1).unwrap();
    l.append(&batch(&Spec::idem(7, 0, 3, 2)), 1).unwrap();
    assert_eq!(copy(&l, &f, 1 << 20), 6);

    // The follower takes over in epoch 2; the producer retries its last batch.
    let r = f.append(&batch(&Spec::idem(7, 0, 3, 2)), 2).unwrap();
    assert!(r.duplicate, "a replicated batch is recognised as a retry");
    assert_eq!((r.base_offset, r.end_offset), (4, 6));
    let r = f.append(&batch(&Spec::idem(8, 2, 10, 1)), 2).unwrap();
    assert!(r.duplicate);
    assert_eq!((r.base_offset, r.end_offset), (3, 4));
    assert!(matches!(
        f.append(&batch(&Spec::idem(7, 0, 9, 1)), 2),
        Err(LogError::OutOfOrderSequence {
            expected: 5,
            got: 9,
            ..
        })
    ));
    assert!(matches!(
        f.append(&batch(&Spec::idem(8, 1, 0, 1)), 2),
        Err(LogError::InvalidProducerEpoch { .. })
    ));
    assert_eq!(f.log_end_offset(), 6);
    let r = f.append(&batch(&Spec::idem(7, 0, 5, 1)), 2).unwrap();
    assert!(!r.duplicate);
    assert_eq!((r.base_offset, r.end_offset), (6, 7));

    // Still after a restart (producer state rebuilt from the log).
    drop(f);
    follower.reopen();
    let f = follower.p();
    assert!(
        f.append(&batch(&Spec::idem(7, 0, 5, 1)), 2)
            .unwrap()
            .duplicate
    );
    // A truncated batch is no longer a duplicate: it is written again.
    f.truncate_to(4).unwrap();
    let r = f.append(&batch(&Spec::idem(7, 0, 3, 2)), 2).unwrap();
    assert!(!r.duplicate);
    assert_eq!((r.base_offset, r.end_offset), (4, 6));
}

#[tokio::test(flavor = "current_thread")]
async fn high_watermark_in_replicated_and_local_mode() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), FlushPolicy::Always, TopicConfig::default());
    store.create_topic("h", 1, &no_overrides(), false).unwrap();
    let p = store.partition("h", 0).unwrap();
    assert!(!p.is_replicated());
    p.append(&batch(&Spec::plain(3, 10)), 0).unwrap();
    let end = p.append(&batch(&Spec::plain(2, 10)), 0).unwrap().end_offset;
    p.wait_durable(end).await.unwrap();
    assert_eq!((p.high_watermark(), p.durable_end_offset()), (5, 5));
    // Local mode: advance_high_watermark has no effect.
    p.advance_high_watermark(1);
    assert_eq!(p.high_watermark(), 5);

    // Replicated: nothing is known committed until the replication layer says so.
    p.set_replicated(true);
    assert!(p.is_replicated());
    assert_eq!(p.high_watermark(), 0);
    let r = p.read(0, 1 << 20, true, ReadLimit::HighWatermark).unwrap();
    assert!(r.records.is_empty());
    assert_eq!(r.high_watermark, 0);
    p.advance_high_watermark(2);
    assert_eq!(p.high_watermark(), 2);
    p.set_replicated(true);
    assert_eq!(
        p.high_watermark(),
        2,
        "switching to the same mode changes nothing"
    );

    // Capped at the durable end: the append below is not fsync'd yet (the
    // flusher cannot run before this task yields).
    let end = p.append(&batch(&Spec::plain(1, 10)), 0).unwrap().end_offset;
    assert_eq!(end, 6);
    assert_eq!(p.durable_end_offset(), 5);
    p.advance_high_watermark(100);
    assert_eq!(p.high_watermark(), 5);
    p.advance_high_watermark(3);
    assert_eq!(p.high_watermark(), 5, "never moves backwards");
    p.wait_durable(6).await.unwrap();
    assert_eq!(p.durable_end_offset(), 6);
    assert_eq!(p.high_watermark(), 5, "durability alone does not commit");
    p.advance_high_watermark(6);
    assert_eq!(p.high_watermark(), 6);
    let r = p.read(0, 1 << 20, true, ReadLimit::HighWatermark).unwrap();
    assert_eq!(batches_in(&r.records).len(), 3);

    // Truncation lowers the watermark and the durable end.
    p.truncate_to(4).unwrap();
    assert_eq!(p.log_end_offset(), 3);
    assert_eq!((p.high_watermark(), p.durable_end_offset()), (3, 3));

    // Back to local: the watermark is the durable end again and follows it.
    let end = p.append(&batch(&Spec::plain(2, 10)), 0).unwrap().end_offset;
    p.set_replicated(false);
    assert_eq!(p.high_watermark(), 3);
    p.wait_durable(end).await.unwrap();
    assert_eq!(p.high_watermark(), 5);
}

#[tokio::test(flavor = "current_thread")]
async fn durable_end_watch_follows_group_commit_and_policies() {
    let node = Node::new(FlushPolicy::Always, TopicConfig::default());
    let p = node.p();
    let mut rx = p.watch_durable_end();
    assert_eq!(*rx.borrow_and_update(), 0);
    let end = p.append(&batch(&Spec::plain(4, 10)), 0).unwrap().end_offset;
    assert_eq!(p.durable_end_offset(), 0);
    tokio::time::timeout(Duration::from_secs(10), rx.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(*rx.borrow_and_update(), end);
    assert_eq!(p.durable_end_offset(), end);

    // Without fsync before acknowledging, the durable end is the log end.
    for flush in [
        FlushPolicy::Never,
        FlushPolicy::Interval {
            ms: 60_000,
            bytes: 1 << 30,
        },
    ] {
        let node = Node::new(flush, TopicConfig::default());
        let p = node.p();
        let rx = p.watch_durable_end();
        p.append(&batch(&Spec::plain(4, 10)), 0).unwrap();
        assert_eq!(p.durable_end_offset(), 4);
        assert_eq!(*rx.borrow(), 4);
        assert_eq!(p.high_watermark(), 0, "replicated: not committed yet");
        p.advance_high_watermark(4);
        assert_eq!(p.high_watermark(), 4);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn wait_committed_resolves_exactly_when_the_high_watermark_passes() {
    let node = Node::new(FlushPolicy::Never, TopicConfig::default());
    let p = node.p();
    p.append(&batch(&Spec::plain(10, 10)), 0).unwrap();
    assert!(committed_now(&p, 0).await.is_some());
    assert!(committed_now(&p, 1).await.is_none());
    let waiter = {
        let p = Arc::clone(&p);
        tokio::spawn(async move { p.wait_committed(8).await })
    };
    settle().await;
    assert!(!waiter.is_finished());
    p.advance_high_watermark(7);
    settle().await;
    assert!(!waiter.is_finished());
    p.advance_high_watermark(8);
    assert!(finishes(&waiter).await);
    waiter.await.unwrap().unwrap();
    assert!(matches!(committed_now(&p, 8).await, Some(Ok(()))));
    assert!(committed_now(&p, 9).await.is_none());

    // A deleted topic releases its waiters with an error.
    let waiter = {
        let p = Arc::clone(&p);
        tokio::spawn(async move { p.wait_committed(10).await })
    };
    settle().await;
    node.store().delete_topic(TOPIC).unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(r, Err(LogError::UnknownTopicOrPartition(_))));

    // Local mode under `always`: committed means durable.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), FlushPolicy::Always, TopicConfig::default());
    store.create_topic("l", 1, &no_overrides(), false).unwrap();
    let p = store.partition("l", 0).unwrap();
    let end = p.append(&batch(&Spec::plain(3, 10)), 0).unwrap().end_offset;
    assert!(committed_now(&p, end).await.is_none());
    tokio::time::timeout(Duration::from_secs(10), p.wait_committed(end))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(p.durable_end_offset(), end);
}

#[tokio::test(flavor = "current_thread")]
async fn divergent_suffix_is_truncated_by_offset_for_leader_epoch() {
    // A leads in epoch 1; B copies offsets 0..5; A writes 5..8 alone.
    let mut a = Node::new(FlushPolicy::Never, TopicConfig::default());
    let b = Node::new(FlushPolicy::Never, TopicConfig::default());
    let (pa, pb) = (a.p(), b.p());
    pa.append(&batch(&Spec::plain(3, 10)), 1).unwrap();
    pa.append(&batch(&Spec::plain(2, 10)), 1).unwrap();
    assert_eq!(copy(&pa, &pb, 1 << 20), 5);
    pa.append(&batch(&Spec::plain(3, 10)), 1).unwrap();
    pb.advance_high_watermark(5);
    pa.advance_high_watermark(5);
    // B leads in epoch 3 and writes other records at 5..7; A crashes.
    pb.append(&batch(&Spec::plain(2, 99)), 3).unwrap();
    drop(pa);
    a.reopen();
    let pa = a.p();
    assert_eq!(pa.log_end_offset(), 8);
    assert_eq!(
        pa.high_watermark(),
        0,
        "a restarted replica knows nothing committed"
    );
    // A follows B: B answers epoch 1 ends at 5.
    assert_eq!(pb.end_offset_for_epoch(1), (1, 5));
    assert_eq!(truncate_follower(&pb, &pa), 5);
    assert_eq!(pa.log_end_offset(), 5);
    assert_eq!(pa.latest_epoch(), 1);
    assert_eq!(copy(&pb, &pa, 1 << 20), 7);
    assert_eq!(all_bytes(&pa), all_bytes(&pb));
    assert_eq!(epoch_answers(&pa, 4), epoch_answers(&pb, 4));
    assert_eq!(pa.end_offset_for_epoch(2), (1, 5));

    // An epoch the leader never had: A leads briefly in epoch 4 and writes
    // 7..9 alone; B leads again in epoch 5 and writes 7..8. B answers
    // epoch 3 (ending at 7 where its epoch 5 starts); A's own end of
    // epoch 3 is 7 too.
    pa.append(&batch(&Spec::plain(2, 50)), 4).unwrap();
    pb.append(&batch(&Spec::plain(1, 60)), 5).unwrap();
    assert_eq!(pb.end_offset_for_epoch(4), (3, 7));
    assert_eq!(truncate_follower(&pb, &pa), 7);
    assert_eq!(pa.latest_epoch(), 3);
    assert_eq!(copy(&pb, &pa, 1 << 20), 8);
    assert_eq!(all_bytes(&pa), all_bytes(&pb));
    assert_eq!(epoch_answers(&pa, 6), epoch_answers(&pb, 6));
}

#[tokio::test(flavor = "current_thread")]
async fn a_new_leaders_epoch_starts_at_its_log_end_before_it_appends() {
    // B led epoch 1 (0..5), A copied it; A led epoch 2 and wrote 5..7
    // alone; B is elected in epoch 3 and has not appended yet.
    let mut a = Node::new(FlushPolicy::Never, TopicConfig::default());
    let mut b = Node::new(FlushPolicy::Never, TopicConfig::default());
    let (pa, pb) = (a.p(), b.p());
    pb.append(&batch(&Spec::plain(5, 10)), 1).unwrap();
    copy(&pb, &pa, 1 << 20);
    pa.append(&batch(&Spec::plain(2, 10)), 2).unwrap();
    // Without the new epoch B cannot place A's epoch 2.
    assert_eq!(pb.end_offset_for_epoch(2), (-1, -1));
    pb.assign_leader_epoch(3).unwrap();
    assert_eq!(pb.latest_epoch(), 3);
    assert_eq!(pb.end_offset_for_epoch(2), (1, 5));
    assert_eq!(pb.end_offset_for_epoch(3), (3, 5));
    // Not newer than the latest: no effect.
    pb.assign_leader_epoch(2).unwrap();
    assert_eq!(pb.latest_epoch(), 3);
    assert_eq!(truncate_follower(&pb, &pa), 5);
    // Appends in the epoch keep its start.
    pb.append(&batch(&Spec::plain(1, 10)), 3).unwrap();
    assert_eq!(pb.end_offset_for_epoch(1), (1, 5));
    assert_eq!(copy(&pb, &pa, 1 << 20), 6);
    assert_eq!(epoch_answers(&pa, 4), epoch_answers(&pb, 4));

    // A leads epoch 5 but writes nothing; B, leading epoch 6 (elected
    // from a stale view), has one more batch of epoch 3: A's replica
    // append replaces the empty epoch, and A's epochs follow B's log.
    pa.assign_leader_epoch(5).unwrap();
    pb.append(&batch(&Spec::plain(2, 10)), 3).unwrap();
    assert_eq!(copy(&pb, &pa, 1 << 20), 8);
    assert_eq!(pa.latest_epoch(), 3);
    assert_eq!(epoch_answers(&pa, 6), epoch_answers(&pb, 6));
    // A truncation to the log end drops an epoch with nothing in it, and
    // so does a restart.
    pa.assign_leader_epoch(7).unwrap();
    pa.truncate_to(pa.log_end_offset()).unwrap();
    assert_eq!(pa.latest_epoch(), 3);
    pb.assign_leader_epoch(7).unwrap();
    drop(pb);
    b.reopen();
    assert_eq!(b.p().latest_epoch(), 3);
    drop(pa);
    a.reopen();
    assert_eq!(epoch_answers(&a.p(), 8), epoch_answers(&b.p(), 8));
}

#[tokio::test(flavor = "current_thread")]
async fn ensure_topic_matches_the_quorums_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), FlushPolicy::Never, TopicConfig::default());
    let id_a = [1u8; 16];
    let id_b = [2u8; 16];
    let mut configs = BTreeMap::new();
    configs.insert("retention.ms".to_string(), "60000".to_string());
    // min.insync.replicas is kept with the other topic configs (the
    // replication layer enforces it); keys nobody knows are skipped.
    configs.insert("min.insync.replicas".to_string(), "2".to_string());
    configs.insert("a.key.of.a.later.version".to_string(), "*".to_string());
    let t = store.ensure_topic("e", id_a, 2, &configs).unwrap();
    assert_eq!((t.id, t.partitions), (id_a, 2));
    assert_eq!(t.overrides.len(), 2);
    assert_eq!(t.config.retention_ms, 60_000);
    assert_eq!(t.config.min_insync_replicas, 2);
    // Again: nothing changes.
    let t = store.ensure_topic("e", id_a, 2, &configs).unwrap();
    assert_eq!((t.id, t.partitions), (id_a, 2));

    // More partitions and other configs.
    let mut configs = BTreeMap::new();
    configs.insert("segment.bytes".to_string(), "100000".to_string());
    let t = store.ensure_topic("e", id_a, 3, &configs).unwrap();
    assert_eq!(t.partitions, 3);
    assert_eq!(t.overrides, configs);
    assert_eq!(t.config.retention_ms, TopicConfig::default().retention_ms);
    assert!(store.partition("e", 2).is_some());
    // Fewer partitions than present: never shrinks.
    assert_eq!(
        store
            .ensure_topic("e", id_a, 1, &configs)
            .unwrap()
            .partitions,
        3
    );

    let old = store.partition("e", 0).unwrap();
    old.append(&batch(&Spec::plain(5, 10)), 0).unwrap();
    // Same name, another id: the topic was deleted and created again.
    let t = store.ensure_topic("e", id_b, 1, &no_overrides()).unwrap();
    assert_eq!((t.id, t.partitions), (id_b, 1));
    assert!(t.overrides.is_empty());
    let new = store.partition("e", 0).unwrap();
    assert_eq!(new.log_end_offset(), 0);
    assert!(matches!(
        old.append(&batch(&Spec::plain(1, 10)), 0),
        Err(LogError::UnknownTopicOrPartition(_))
    ));
    assert!(store.partition("e", 1).is_none());

    // Bad storage configs are refused.
    let mut bad = BTreeMap::new();
    bad.insert("segment.bytes".to_string(), "nope".to_string());
    assert!(store.ensure_topic("f", id_a, 1, &bad).is_err());
    assert!(store.topic("f").is_none());

    // The id survives a restart.
    drop((old, new));
    drop(store);
    let store = open(dir.path(), FlushPolicy::Never, TopicConfig::default());
    assert_eq!(store.topic("e").unwrap().id, id_b);
    assert_eq!(
        store
            .ensure_topic("e", id_b, 1, &no_overrides())
            .unwrap()
            .id,
        id_b
    );
}

// ---------------------------------------------------------------------------
// Property test: two replicas, a leader and a follower, against a model of
// the leader's log.

#[derive(Clone, Debug)]
enum ROp {
    /// One produce call on the leader: (record count, payload bytes,
    /// producer: 0 none, else idempotent producer id 1 or 2).
    Append(Vec<(i32, usize, u8)>),
    /// One follower fetch of at most this many bytes (at least one batch),
    /// after truncating a divergent suffix when needed; then both
    /// replicas' high watermarks move as the replication layer moves them.
    Copy(usize),
    /// The follower takes over in an epoch this much newer; the old leader
    /// becomes the follower (with whatever suffix it alone has).
    Failover(i32),
    /// The producer retries its last batch on the current leader.
    Retry(u8),
    /// A crash and restart of the leader (true) or the follower.
    Reopen(bool),
    /// The leader (true) or the follower writes its high watermark down.
    Checkpoint(bool),
}

fn rop() -> impl Strategy<Value = ROp> {
    prop_oneof![
        5 => prop::collection::vec((1i32..5, 0usize..200, 0u8..3), 1..4).prop_map(ROp::Append),
        5 => prop_oneof![Just(1usize), 100usize..1500, Just(1usize << 20)].prop_map(ROp::Copy),
        2 => (1i32..4).prop_map(ROp::Failover),
        1 => (1u8..3).prop_map(ROp::Retry),
        1 => any::<bool>().prop_map(ROp::Reopen),
        1 => any::<bool>().prop_map(ROp::Checkpoint),
    ]
}

/// One batch of the leader's log, as the model knows it.
#[derive(Clone, Debug)]
struct MBatch {
    base: i64,
    end: i64,
    epoch: i32,
    /// What the producer sent (base offset 0, no epoch).
    raw: Vec<u8>,
    producer: Option<(i64, i32)>,
    last_seq: i32,
}

impl MBatch {
    fn stored(&self) -> Vec<u8> {
        stamped(&self.raw, self.base, self.epoch)
    }
}

/// Kafka's OffsetForLeaderEpoch over the epochs of `batches` (plus a leader
/// epoch started at the log end with nothing written, when given).
fn model_epoch_answer(batches: &[MBatch], started: Option<i32>, epoch: i32) -> (i32, i64) {
    let log_end = batches.last().map_or(0, |b| b.end);
    let mut entries: Vec<(i32, i64)> = Vec::new();
    for b in batches {
        if entries.last().is_none_or(|l| b.epoch > l.0) {
            entries.push((b.epoch, b.base));
        }
    }
    if let Some(e) = started {
        if entries.last().is_none_or(|l| e > l.0) {
            entries.push((e, log_end));
        }
    }
    let Some(latest) = entries.last().map(|l| l.0) else {
        return (-1, -1);
    };
    if epoch < 0 {
        return (-1, -1);
    }
    if epoch == latest {
        return (epoch, log_end);
    }
    let higher = entries.iter().find(|e| e.0 > epoch);
    let floor = entries.iter().rev().find(|e| e.0 <= epoch);
    match (floor, higher) {
        (_, None) => (-1, -1),
        (None, Some(h)) => (epoch, h.1),
        (Some(f), Some(h)) => (f.0, h.1),
    }
}

struct Cluster {
    nodes: [Node; 2],
    leader: usize,
    epoch: i32,
    /// The leader's log.
    model: Vec<MBatch>,
    /// The follower may hold a suffix the leader does not have.
    follower_diverged: bool,
    /// The highest high watermark a leader has reported, and the bytes
    /// below it: they must never change.
    committed: i64,
    committed_bytes: Vec<u8>,
    /// Per node: the high watermark its last checkpoint wrote.
    checkpointed: [Option<i64>; 2],
}

impl Cluster {
    fn l(&self) -> Arc<Partition> {
        self.nodes[self.leader].p()
    }

    fn f(&self) -> Arc<Partition> {
        self.nodes[1 - self.leader].p()
    }

    fn model_bytes(&self, upto: i64) -> Vec<u8> {
        self.model
            .iter()
            .filter(|b| b.end <= upto)
            .flat_map(MBatch::stored)
            .collect()
    }

    fn model_end(&self) -> i64 {
        self.model.last().map_or(0, |b| b.end)
    }

    fn next_seq(&self, pid: i64) -> i32 {
        self.model
            .iter()
            .rev()
            .find(|b| b.producer.is_some_and(|p| p.0 == pid))
            .map_or(0, |b| b.last_seq + 1)
    }

    /// Brings a diverged follower back to a prefix of the leader's log.
    fn truncate_follower(&mut self) -> Result<(), TestCaseError> {
        if !self.follower_diverged {
            return Ok(());
        }
        let (l, f) = (self.l(), self.f());
        let ours = f.latest_epoch();
        let (epoch, end) = l.end_offset_for_epoch(ours);
        let target = if ours < 0 || epoch < 0 {
            // As the replication layer does: only what is known committed.
            f.high_watermark()
        } else if epoch < ours {
            end.min(f.end_offset_for_epoch(epoch).1)
        } else {
            end
        };
        f.truncate_to(target.min(f.log_end_offset())).unwrap();
        prop_assert!(f.high_watermark() <= f.log_end_offset());
        self.follower_diverged = false;
        Ok(())
    }

    fn check(&self) -> Result<(), TestCaseError> {
        let (l, f) = (self.l(), self.f());
        let end = self.model_end();
        prop_assert_eq!(l.log_end_offset(), end);
        prop_assert_eq!(all_bytes(&l), self.model_bytes(end));
        prop_assert!(end >= self.committed, "committed data lost");
        prop_assert_eq!(
            &all_bytes(&l)[..self.committed_bytes.len()],
            self.committed_bytes.as_slice()
        );
        for e in 0..=self.epoch + 1 {
            prop_assert_eq!(
                l.end_offset_for_epoch(e),
                model_epoch_answer(&self.model, Some(self.epoch), e),
                "leader, epoch {}",
                e
            );
        }
        if !self.follower_diverged {
            // The follower holds a prefix of the leader's log, ending at a
            // batch boundary, with the epochs of that prefix.
            let fend = f.log_end_offset();
            prop_assert!(fend <= end);
            prop_assert!(fend == 0 || self.model.iter().any(|b| b.end == fend));
            prop_assert_eq!(all_bytes(&f), self.model_bytes(fend));
            let prefix: Vec<MBatch> = self
                .model
                .iter()
                .filter(|b| b.end <= fend)
                .cloned()
                .collect();
            for e in 0..=self.epoch + 1 {
                prop_assert_eq!(
                    f.end_offset_for_epoch(e),
                    model_epoch_answer(&prefix, None, e),
                    "follower, epoch {}",
                    e
                );
            }
        }
        for p in [&l, &f] {
            let hw = p.high_watermark();
            prop_assert!(hw <= p.durable_end_offset(), "HW above the durable end");
            // Whatever a replica exposes (also a watermark restored from its
            // checkpoint) was committed by a leader.
            prop_assert!(
                hw <= self.committed.max(p.log_start_offset()),
                "HW {} above what was committed ({})",
                hw,
                self.committed
            );
            prop_assert!(p.durable_end_offset() <= p.log_end_offset());
        }
        Ok(())
    }
}

async fn run_replication(ops: Vec<ROp>, flush: FlushPolicy) -> Result<(), TestCaseError> {
    let defaults = small_segments(1500, 100);
    let nodes = [
        Node::new(flush, defaults.clone()),
        Node::new(flush, defaults),
    ];
    let mut c = Cluster {
        nodes,
        leader: 0,
        epoch: 0,
        model: Vec::new(),
        follower_diverged: false,
        committed: 0,
        committed_bytes: Vec::new(),
        checkpointed: [None, None],
    };
    c.l().assign_leader_epoch(0).unwrap();
    let mut fill = 0u8;
    for op in ops {
        match op {
            ROp::Append(specs) => {
                let l = c.l();
                let mut call = Vec::new();
                let mut staged = Vec::new();
                let mut next = c.model_end();
                let mut seqs: BTreeMap<i64, i32> = BTreeMap::new();
                for (count, payload, producer) in specs {
                    fill = fill.wrapping_add(13);
                    let (spec, producer) = if producer == 0 {
                        (Spec::plain(count, payload), None)
                    } else {
                        let pid = i64::from(producer);
                        let seq = *seqs.entry(pid).or_insert_with(|| c.next_seq(pid));
                        seqs.insert(pid, seq + count);
                        (
                            Spec {
                                payload,
                                ..Spec::idem(pid, 0, seq, count)
                            },
                            Some((pid, seq)),
                        )
                    };
                    let raw = batch(&Spec { fill, ..spec });
                    call.extend_from_slice(&raw);
                    staged.push(MBatch {
                        base: next,
                        end: next + i64::from(count),
                        epoch: c.epoch,
                        raw,
                        producer,
                        last_seq: producer.map_or(-1, |p| p.1 + count - 1),
                    });
                    next += i64::from(count);
                }
                let r = l.append(&call, c.epoch).unwrap();
                prop_assert!(!r.duplicate);
                prop_assert_eq!((r.base_offset, r.end_offset), (c.model_end(), next));
                c.model.extend(staged);
            }
            ROp::Copy(max_bytes) => {
                c.truncate_follower()?;
                let (l, f) = (c.l(), c.f());
                let end = copy(&l, &f, max_bytes);
                f.wait_durable(end).await.unwrap();
                prop_assert_eq!(f.durable_end_offset(), end);
                // The leader's own flush must not land between the two
                // readings of its durable end below.
                l.wait_durable(l.log_end_offset()).await.unwrap();
                // The leader's HW: the follower's durable end, capped by the
                // leader's own; a waiter for it resolves exactly then.
                let old = l.high_watermark();
                let target = f.durable_end_offset().min(l.durable_end_offset());
                let waiter = {
                    let l = Arc::clone(&l);
                    tokio::spawn(async move { l.wait_committed(target).await })
                };
                if target <= old {
                    prop_assert!(
                        finishes(&waiter).await,
                        "a waiter at or below the HW resolves"
                    );
                } else {
                    settle().await;
                    prop_assert!(!waiter.is_finished(), "a waiter above the HW waits");
                }
                let want = old.max(f.durable_end_offset().min(l.durable_end_offset()));
                l.advance_high_watermark(f.durable_end_offset());
                prop_assert_eq!(l.high_watermark(), want);
                prop_assert!(
                    finishes(&waiter).await,
                    "the waiter resolves once the HW passes it"
                );
                waiter.await.unwrap().unwrap();
                prop_assert!(matches!(committed_now(&l, want).await, Some(Ok(()))));
                prop_assert!(committed_now(&l, want + 1).await.is_none());
                if want > c.committed {
                    c.committed = want;
                    c.committed_bytes = c.model_bytes(want);
                }
                // The follower learns the leader's HW from the fetch answer.
                let fold = f.high_watermark();
                f.advance_high_watermark(l.high_watermark());
                prop_assert_eq!(
                    f.high_watermark(),
                    fold.max(l.high_watermark().min(f.durable_end_offset()))
                );
            }
            ROp::Failover(gap) => {
                c.truncate_follower()?;
                // Only a replica in the ISR is elected: it holds the HW.
                if c.f().log_end_offset() < c.l().high_watermark() {
                    continue;
                }
                let new_end = c.f().log_end_offset();
                c.model.retain(|b| b.end <= new_end);
                c.leader = 1 - c.leader;
                c.epoch += gap;
                c.l().assign_leader_epoch(c.epoch).unwrap();
                c.follower_diverged = true;
            }
            ROp::Retry(pid) => {
                let pid = i64::from(pid);
                let Some(last) = c
                    .model
                    .iter()
                    .rev()
                    .find(|b| b.producer.is_some_and(|p| p.0 == pid))
                    .cloned()
                else {
                    continue;
                };
                let r = c.l().append(&last.raw, c.epoch).unwrap();
                prop_assert!(r.duplicate, "retry of {:?} not recognised", last.producer);
                prop_assert_eq!((r.base_offset, r.end_offset), (last.base, last.end));
            }
            ROp::Checkpoint(leader) => {
                let i = if leader { c.leader } else { 1 - c.leader };
                let p = c.nodes[i].p();
                let hw = p.high_watermark();
                let wrote = p.checkpoint_high_watermark().unwrap();
                prop_assert_eq!(wrote, c.checkpointed[i] != Some(hw) && hw != -1);
                c.checkpointed[i] = Some(hw);
                prop_assert!(
                    !p.checkpoint_high_watermark().unwrap(),
                    "unchanged: no write"
                );
            }
            ROp::Reopen(leader) => {
                let i = if leader { c.leader } else { 1 - c.leader };
                c.nodes[i].reopen();
                let p = c.nodes[i].p();
                // A checkpointed watermark comes back, bounded by what recovery kept.
                let want = match c.checkpointed[i] {
                    Some(hw) => hw
                        .min(p.durable_end_offset())
                        .min(p.log_end_offset())
                        .max(p.log_start_offset()),
                    None => p.log_start_offset(),
                };
                prop_assert_eq!(p.high_watermark(), want);
                if leader {
                    c.l().assign_leader_epoch(c.epoch).unwrap();
                }
            }
        }
        c.check()?;
    }
    // Finally the follower catches up completely.
    c.truncate_follower()?;
    let (l, f) = (c.l(), c.f());
    while f.log_end_offset() < l.log_end_offset() {
        copy(&l, &f, 1 << 20);
    }
    prop_assert_eq!(all_bytes(&f), all_bytes(&l));
    c.check()?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn follower_log_converges_with_the_leaders(
        ops in prop::collection::vec(rop(), 1..50),
        always in any::<bool>(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let flush = if always { FlushPolicy::Always } else { FlushPolicy::Never };
        rt.block_on(run_replication(ops, flush))?;
    }
}

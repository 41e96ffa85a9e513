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
/// it too; never above our log end.
fn truncate_follower(leader: &Partition, follower: &Partition) -> i64 {
    let ours = follower.latest_epoch();
    let target = if ours < 0 {
        follower.log_start_offset()
    } else {
        let (epoch, end) = leader.end_offset_for_epoch(ours);
        if epoch < 0 {
            follower.log_start_offset()
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
async fn replica_append_refuses_gaps_overlaps_and_damaged_batches() {
    let leader = Node::new(FlushPolicy::Never, TopicConfig::default());
    let follower = Node::new(FlushPolicy::Never, TopicConfig::default());
    let (l, f) = (leader.p(), follower.p());
    for n in [3, 2, 4] {
        l.append(&batch(&Spec::plain(n, 20)), 1).unwrap();
    }
    let all = all_bytes(&l);
    let sizes: Vec<usize> = batches_in(&all).iter().map(|b| b.3).collect();
    let (first, rest) = all.split_at(sizes[0]);
    let (second, third) = rest.split_at(sizes[1]);

    // Not at the log end.
    match f.append_replica(rest) {
        Err(LogError::ReplicaOffsetMismatch { expected, got }) => {
            assert_eq!((expected, got), (0, 3));
        }
        other => panic!("expected ReplicaOffsetMismatch, got {other:?}"),
    }
    // A gap between two batches of one call: all or nothing.
    match f.append_replica(&[first, third].concat()) {
        Err(LogError::ReplicaOffsetMismatch { expected, got }) => {
            assert_eq!((expected, got), (3, 5));
        }
        other => panic!("expected ReplicaOffsetMismatch, got {other:?}"),
    }
    assert_eq!(f.log_end_offset(), 0);
    // A batch that overlaps what the follower has.
    assert_eq!(f.append_replica(first).unwrap(), 3);
    assert!(matches!(
        f.append_replica(first),
        Err(LogError::ReplicaOffsetMismatch {
            expected: 3,
            got: 0
        })
    ));
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
    assert_eq!(f.append_replica(&[second, third].concat()).unwrap(), 9);
    assert_eq!(all_bytes(&f), all);
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
    settle().await;
    assert!(waiter.is_finished());
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
async fn ensure_topic_matches_the_quorums_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), FlushPolicy::Never, TopicConfig::default());
    let id_a = [1u8; 16];
    let id_b = [2u8; 16];
    let mut configs = BTreeMap::new();
    configs.insert("retention.ms".to_string(), "60000".to_string());
    // Replication-layer keys are not storage configs and are skipped.
    configs.insert("min.insync.replicas".to_string(), "2".to_string());
    let t = store.ensure_topic("e", id_a, 2, &configs).unwrap();
    assert_eq!((t.id, t.partitions), (id_a, 2));
    assert_eq!(t.overrides.len(), 1);
    assert_eq!(t.config.retention_ms, 60_000);
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

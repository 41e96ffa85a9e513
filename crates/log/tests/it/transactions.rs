//! Transactions in the log: the last stable offset, aborted transactions,
//! markers and fencing, across restarts, truncation and follower appends.

use sluice_log::{AbortedTxn, FlushPolicy, LogError, Marker, Partition, ReadLimit};

use crate::{batch, batches_in, no_overrides, open, small_segments, Spec};

const TXN: i16 = 1 << 4;

fn txn(pid: i64, epoch: i16, seq: i32, count: i32) -> Vec<u8> {
    batch(&Spec {
        attributes: TXN,
        ..Spec::idem(pid, epoch, seq, count)
    })
}

fn end(p: &Partition, pid: i64, epoch: i16, commit: bool) -> Result<i64, LogError> {
    let marker = Marker {
        commit,
        coordinator_epoch: 1,
    };
    p.append_marker(pid, epoch, marker, 0)
        .map(|r| r.base_offset)
}

fn aborted(pid: i64, first: i64, last: i64) -> AbortedTxn {
    AbortedTxn {
        producer_id: pid,
        first_offset: first,
        last_offset: last,
    }
}

/// Everything a read_committed reader gets from `from`: (base, last offset) of each batch.
fn committed_read(p: &Partition, from: i64) -> Vec<(i64, i64)> {
    let r = p.read(from, 1 << 20, true, ReadLimit::LastStable).unwrap();
    batches_in(&r.records)
        .into_iter()
        .map(|(base, last, _, _)| (base, last))
        .collect()
}

#[tokio::test]
async fn stable_offset_and_aborted_transactions_survive_restart_and_truncation() {
    let dir = tempfile::tempdir().unwrap();
    // Small segments: the markers land in several of them.
    let defaults = small_segments(300, 64);
    {
        let store = open(dir.path(), FlushPolicy::Always, defaults.clone());
        store.create_topic("t", 1, &no_overrides(), false).unwrap();
        let p = store.partition("t", 0).unwrap();

        assert_eq!(
            p.append_transactional(&txn(10, 0, 0, 2), 0)
                .unwrap()
                .base_offset,
            0
        );
        p.append(&batch(&Spec::plain(2, 5)), 0).unwrap(); // 2-3
        assert_eq!(
            p.append_transactional(&txn(11, 0, 0, 1), 0)
                .unwrap()
                .base_offset,
            4
        );
        p.wait_durable(p.log_end_offset()).await.unwrap();
        assert_eq!(p.high_watermark(), 5);
        // Producer 10's open transaction holds read_committed readers at 0.
        assert_eq!(p.last_stable_offset(), 0);
        assert!(committed_read(&p, 0).is_empty());

        assert_eq!(end(&p, 10, 0, true).unwrap(), 5);
        p.wait_durable(p.log_end_offset()).await.unwrap();
        assert_eq!(p.last_stable_offset(), 4, "producer 11 is still open");
        assert_eq!(committed_read(&p, 0), vec![(0, 1), (2, 3)]);

        assert_eq!(end(&p, 11, 0, false).unwrap(), 6);
        p.wait_durable(p.log_end_offset()).await.unwrap();
        assert_eq!(p.last_stable_offset(), 7);
        assert_eq!(p.aborted_transactions(0, 7), vec![aborted(11, 4, 6)]);
        assert_eq!(p.aborted_transactions(5, 7), vec![aborted(11, 4, 6)]);
        assert!(p.aborted_transactions(0, 4).is_empty());
        assert!(p.aborted_transactions(7, 8).is_empty());

        // A transaction left open at the stop.
        assert_eq!(
            p.append_transactional(&txn(12, 0, 0, 3), 0)
                .unwrap()
                .base_offset,
            7
        );
        p.wait_durable(p.log_end_offset()).await.unwrap();
        assert_eq!(p.last_stable_offset(), 7);
    }
    {
        // Rebuilt from the log, markers read back from the segment files.
        let store = open(dir.path(), FlushPolicy::Always, defaults.clone());
        let p = store.partition("t", 0).unwrap();
        assert_eq!(p.log_end_offset(), 10);
        assert_eq!(p.last_stable_offset(), 7);
        assert_eq!(p.aborted_transactions(0, 10), vec![aborted(11, 4, 6)]);
        assert_eq!(end(&p, 12, 0, true).unwrap(), 10);
        p.wait_durable(p.log_end_offset()).await.unwrap();
        assert_eq!(p.last_stable_offset(), 11);

        // Cutting the abort marker off reopens producer 11's transaction.
        p.truncate_to(6).unwrap();
        assert_eq!(p.last_stable_offset(), 4);
        assert!(p.aborted_transactions(0, 6).is_empty());
    }
    let store = open(dir.path(), FlushPolicy::Always, defaults);
    let p = store.partition("t", 0).unwrap();
    assert_eq!(p.last_stable_offset(), 4);
}

#[tokio::test]
async fn markers_fence_older_epochs_and_batches_are_checked_for_their_kind() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(
        dir.path(),
        FlushPolicy::Always,
        small_segments(1 << 20, 4096),
    );
    store.create_topic("f", 1, &no_overrides(), false).unwrap();
    let p = store.partition("f", 0).unwrap();

    p.append_transactional(&txn(20, 2, 0, 1), 0).unwrap();
    // A marker from before the producer's epoch: a fenced coordinator request.
    assert!(matches!(
        end(&p, 20, 1, false),
        Err(LogError::InvalidProducerEpoch {
            current: 2,
            got: 1,
            ..
        })
    ));
    // The coordinator fences the producer: the abort carries a newer epoch.
    end(&p, 20, 3, false).unwrap();
    assert!(matches!(
        p.append_transactional(&txn(20, 2, 1, 1), 0),
        Err(LogError::InvalidProducerEpoch {
            current: 3,
            got: 2,
            ..
        })
    ));
    // The new epoch starts its sequences at 0.
    p.append_transactional(&txn(20, 3, 0, 1), 0).unwrap();

    // Each append takes only its own kind of batch.
    let refused = |r: Result<_, LogError>| matches!(r, Err(LogError::InvalidRecord(_)));
    assert!(refused(p.append(&txn(21, 0, 0, 1), 0)));
    assert!(refused(
        p.append_transactional(&batch(&Spec::idem(21, 0, 0, 1)), 0)
    ));
    assert!(refused(p.append_transactional(
        &batch(&Spec {
            attributes: TXN,
            ..Spec::plain(1, 3)
        }),
        0
    )));
    assert!(refused(p.append_control(&txn(21, 0, 0, 1), 0)));
    assert!(refused(
        p.append_in_transaction(&batch(&Spec::plain(1, 3)), 0)
    ));

    // The broker's own records in a producer's transaction (no sequence)
    // open it like the producer's batches; its marker ends it.
    end(&p, 20, 3, true).unwrap();
    let before = p.log_end_offset();
    let offsets = batch(&Spec {
        attributes: TXN,
        ..Spec::idem(22, 0, -1, 2)
    });
    assert_eq!(
        p.append_in_transaction(&offsets, 0).unwrap().base_offset,
        before
    );
    p.wait_durable(p.log_end_offset()).await.unwrap();
    assert_eq!(
        p.last_stable_offset(),
        before,
        "producer 22's transaction is open"
    );
    let marker = end(&p, 22, 0, false).unwrap();
    p.wait_durable(p.log_end_offset()).await.unwrap();
    assert_eq!(p.last_stable_offset(), p.log_end_offset());
    assert_eq!(
        p.aborted_transactions(before, marker + 1),
        vec![aborted(22, before, marker)]
    );
}

#[tokio::test]
async fn a_follower_derives_the_same_transactions_from_the_leaders_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let leader_store = open(
        &dir.path().join("leader"),
        FlushPolicy::Always,
        small_segments(1 << 20, 4096),
    );
    let follower_store = open(
        &dir.path().join("follower"),
        FlushPolicy::Always,
        small_segments(1 << 20, 4096),
    );
    leader_store
        .create_topic("r", 1, &no_overrides(), false)
        .unwrap();
    follower_store
        .create_topic("r", 1, &no_overrides(), false)
        .unwrap();
    let (l, f) = (
        leader_store.partition("r", 0).unwrap(),
        follower_store.partition("r", 0).unwrap(),
    );

    l.append_transactional(&txn(30, 0, 0, 2), 0).unwrap();
    l.append_transactional(&txn(31, 0, 0, 2), 0).unwrap();
    // Aborted with a bumped epoch (the coordinator fenced producer 30).
    end(&l, 30, 1, false).unwrap();
    l.append(&batch(&Spec::plain(1, 4)), 0).unwrap();
    let all = l.read(0, 1 << 20, true, ReadLimit::LogEnd).unwrap();
    assert_eq!(f.append_replica(&all.records).unwrap(), l.log_end_offset());
    f.wait_durable(f.log_end_offset()).await.unwrap();
    l.wait_durable(l.log_end_offset()).await.unwrap();
    assert_eq!(f.aborted_transactions(0, 10), vec![aborted(30, 0, 4)]);
    assert_eq!(f.aborted_transactions(0, 10), l.aborted_transactions(0, 10));
    assert_eq!(f.last_stable_offset(), 2, "producer 31 is open on both");
    assert_eq!(l.last_stable_offset(), 2);
    // The follower knows the fencing epoch too, should it lead.
    assert!(matches!(
        end(&f, 30, 0, true),
        Err(LogError::InvalidProducerEpoch {
            current: 1,
            got: 0,
            ..
        })
    ));
}

#[tokio::test]
async fn active_producers_are_the_same_after_restart_and_on_a_follower() {
    let dir = tempfile::tempdir().unwrap();
    let defaults = small_segments(1 << 20, 4096);
    let replica = |name: &str| {
        let store = open(
            &dir.path().join(name),
            FlushPolicy::Always,
            defaults.clone(),
        );
        store.create_topic("a", 1, &no_overrides(), false).unwrap();
        let p = store.partition("a", 0).unwrap();
        (store, p)
    };
    let (leader_store, l) = replica("leader");

    // Offsets 0-2, an idempotent producer; 3-4 and 5, two transactions;
    // 6, producer 41's abort, with a newer epoch (the coordinator fenced it).
    let in_txn = |spec: Spec| {
        batch(&Spec {
            attributes: TXN,
            ..spec
        })
    };
    l.append(&batch(&Spec::idem(40, 0, 0, 3).at(1_000)), 0)
        .unwrap();
    l.append_transactional(&in_txn(Spec::idem(41, 0, 0, 2).at(2_000)), 0)
        .unwrap();
    l.append_transactional(&in_txn(Spec::idem(42, 5, 7, 1).at(3_000)), 0)
        .unwrap();
    end(&l, 41, 1, false).unwrap();
    let producers = l.active_producers();
    let summary: Vec<_> = producers
        .iter()
        .map(|p| {
            (
                p.producer_id,
                p.epoch,
                p.last_sequence,
                p.coordinator_epoch,
                p.txn_start_offset,
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (40, 0, 2, -1, None),
            (41, 1, -1, 1, None),
            (42, 5, 7, -1, Some(5)),
        ]
    );
    assert_eq!(producers[0].last_timestamp, 1_000);
    assert_eq!(producers[2].last_timestamp, 3_000);
    assert!(producers[1].last_timestamp > 3_000, "the marker's time");
    l.wait_durable(l.log_end_offset()).await.unwrap();

    let (_follower_store, f) = replica("follower");
    let all = l.read(0, 1 << 20, true, ReadLimit::LogEnd).unwrap();
    f.append_replica(&all.records).unwrap();
    assert_eq!(f.active_producers(), producers);

    drop((l, leader_store));
    let reopened = open(&dir.path().join("leader"), FlushPolicy::Always, defaults);
    let r = reopened.partition("a", 0).unwrap();
    assert_eq!(r.active_producers(), producers, "rebuilt from the log");
    r.truncate_to(6).unwrap();
    let cut = r.active_producers();
    assert_eq!(
        (cut[1].epoch, cut[1].last_sequence, cut[1].txn_start_offset),
        (0, 1, Some(3)),
        "without its marker, producer 41's transaction is open again"
    );
}

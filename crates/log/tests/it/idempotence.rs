//! Idempotent producers: duplicates, sequence gaps, epoch fencing, restarts.

use sluice_log::{FlushPolicy, LogError, ReadLimit, TopicConfig};

use crate::{batch, batches_in, no_overrides, open, Spec};

#[tokio::test]
async fn duplicates_gaps_and_fencing_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), FlushPolicy::Always, TopicConfig::default());
        store.create_topic("i", 1, &no_overrides(), false).unwrap();
        let p = store.partition("i", 0).unwrap();

        // Another producer's and a plain batch interleave.
        let first = p.append(&batch(&Spec::idem(5, 0, 0, 3)), 0).unwrap();
        assert_eq!(
            (first.base_offset, first.end_offset, first.duplicate),
            (0, 3, false)
        );
        p.append(&batch(&Spec::plain(2, 1)), 0).unwrap();
        p.append(&batch(&Spec::idem(6, 2, 100, 1)), 0).unwrap();

        // A retry of the first batch: nothing appended, original offsets.
        let dup = p.append(&batch(&Spec::idem(5, 0, 0, 3)), 0).unwrap();
        assert_eq!(
            (dup.base_offset, dup.end_offset, dup.duplicate),
            (0, 3, true)
        );
        assert_eq!(p.log_end_offset(), 6);

        let next = p.append(&batch(&Spec::idem(5, 0, 3, 2)), 0).unwrap();
        assert_eq!((next.base_offset, next.end_offset), (6, 8));

        // A gap.
        match p.append(&batch(&Spec::idem(5, 0, 9, 1)), 0) {
            Err(LogError::OutOfOrderSequence { expected, got, .. }) => {
                assert_eq!((expected, got), (5, 9))
            }
            other => panic!("expected OutOfOrderSequence, got {other:?}"),
        }
        // Overlapping but not identical to a cached batch: out of order too.
        assert!(matches!(
            p.append(&batch(&Spec::idem(5, 0, 1, 2)), 0),
            Err(LogError::OutOfOrderSequence { .. })
        ));
        // A new epoch must start at 0.
        assert!(matches!(
            p.append(&batch(&Spec::idem(5, 1, 5, 1)), 0),
            Err(LogError::OutOfOrderSequence { expected: 0, .. })
        ));
        p.wait_durable(p.log_end_offset()).await.unwrap();
        assert_eq!(p.log_end_offset(), 8);
    }
    // Restart: the state is rebuilt from the batch headers.
    let store = open(dir.path(), FlushPolicy::Always, TopicConfig::default());
    let p = store.partition("i", 0).unwrap();
    let dup = p.append(&batch(&Spec::idem(5, 0, 3, 2)), 0).unwrap();
    assert_eq!(
        (dup.base_offset, dup.end_offset, dup.duplicate),
        (6, 8, true)
    );
    let dup = p.append(&batch(&Spec::idem(6, 2, 100, 1)), 0).unwrap();
    assert!(dup.duplicate);
    assert!(matches!(
        p.append(&batch(&Spec::idem(5, 0, 6, 1)), 0),
        Err(LogError::OutOfOrderSequence { expected: 5, .. })
    ));
    let r = p.append(&batch(&Spec::idem(5, 0, 5, 1)), 0).unwrap();
    assert_eq!((r.base_offset, r.duplicate), (8, false));

    // Fencing: epoch 1 takes over, epoch 0 is refused from then on.
    let r = p.append(&batch(&Spec::idem(5, 1, 0, 1)), 0).unwrap();
    assert_eq!(r.base_offset, 9);
    match p.append(&batch(&Spec::idem(5, 0, 6, 1)), 0) {
        Err(LogError::InvalidProducerEpoch { current, got, .. }) => {
            assert_eq!((current, got), (1, 0))
        }
        other => panic!("expected InvalidProducerEpoch, got {other:?}"),
    }
    // The log holds each batch once.
    let all = p.read(0, 1 << 20, true, ReadLimit::LogEnd).unwrap();
    let offsets: Vec<(i64, i64)> = batches_in(&all.records)
        .iter()
        .map(|b| (b.0, b.1))
        .collect();
    assert_eq!(
        offsets,
        vec![(0, 2), (3, 4), (5, 5), (6, 7), (8, 8), (9, 9)]
    );
}

#[tokio::test]
async fn only_the_last_five_batches_are_duplicates_and_sequences_wrap() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), FlushPolicy::Never, TopicConfig::default());
    store.create_topic("i", 1, &no_overrides(), false).unwrap();
    let p = store.partition("i", 0).unwrap();
    for seq in 0..6 {
        p.append(&batch(&Spec::idem(1, 0, seq, 1)), 0).unwrap();
    }
    // seq 1..=5 are cached; 0 fell out and is now simply out of order.
    assert!(
        p.append(&batch(&Spec::idem(1, 0, 1, 1)), 0)
            .unwrap()
            .duplicate
    );
    assert!(matches!(
        p.append(&batch(&Spec::idem(1, 0, 0, 1)), 0),
        Err(LogError::OutOfOrderSequence { .. })
    ));
    // Wrap: a producer at i32::MAX continues at 0.
    p.append(&batch(&Spec::idem(2, 0, i32::MAX - 1, 2)), 0)
        .unwrap();
    let r = p.append(&batch(&Spec::idem(2, 0, 0, 1)), 0).unwrap();
    assert!(!r.duplicate);
}

#[tokio::test]
async fn several_batches_in_one_call_are_checked_in_order_and_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), FlushPolicy::Never, TopicConfig::default());
    store.create_topic("i", 1, &no_overrides(), false).unwrap();
    let p = store.partition("i", 0).unwrap();
    let mut call = batch(&Spec::idem(3, 0, 0, 2));
    call.extend(batch(&Spec::idem(3, 0, 2, 2)));
    let r = p.append(&call, 0).unwrap();
    assert_eq!((r.base_offset, r.end_offset), (0, 4));
    // Second batch of the call has a gap: nothing of the call is written.
    let mut call = batch(&Spec::idem(3, 0, 4, 1));
    call.extend(batch(&Spec::idem(3, 0, 7, 1)));
    assert!(p.append(&call, 0).is_err());
    assert_eq!(p.log_end_offset(), 4);
    // And the first of them was not remembered either.
    assert!(
        !p.append(&batch(&Spec::idem(3, 0, 4, 1)), 0)
            .unwrap()
            .duplicate
    );
}

#[tokio::test]
async fn what_producers_appended_is_counted_once_per_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), FlushPolicy::Always, TopicConfig::default());
    store
        .create_topic("counted", 1, &no_overrides(), false)
        .unwrap();
    let p = store.partition("counted", 0).unwrap();
    let (a, b) = (batch(&Spec::idem(7, 0, 0, 3)), batch(&Spec::plain(2, 10)));
    p.append(&a, 0).unwrap();
    p.append(&b, 0).unwrap();
    // A retry adds nothing; a refused batch neither.
    assert!(p.append(&a, 0).unwrap().duplicate);
    assert!(p.append(&batch(&Spec::idem(7, 0, 9, 1)), 0).is_err());
    assert_eq!(p.produced(), (5, (a.len() + b.len()) as u64));
    // A flush round went into the process's group-commit figures.
    p.wait_durable(5).await.unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    sluice_log::log_metrics().register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let count = text
        .lines()
        .find(|l| l.starts_with("log_flush_records_count"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse::<u64>().ok());
    assert!(count.is_some_and(|n| n >= 1), "{text}");
}

#[tokio::test]
async fn what_consumers_fetched_is_counted_off_the_batch_headers() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), FlushPolicy::Always, TopicConfig::default());
    store
        .create_topic("fetched", 1, &no_overrides(), false)
        .unwrap();
    let p = store.partition("fetched", 0).unwrap();
    let (a, b) = (batch(&Spec::idem(7, 0, 0, 3)), batch(&Spec::plain(2, 10)));
    p.append(&a, 0).unwrap();
    p.append(&b, 0).unwrap();
    p.wait_durable(5).await.unwrap();
    let read = p.read(0, 1 << 20, true, ReadLimit::HighWatermark).unwrap();
    p.count_fetched(&read.records);
    assert_eq!(p.fetched(), (5, (a.len() + b.len()) as u64));
    // A read from the second batch on counts that batch only.
    let read = p.read(3, 1 << 20, true, ReadLimit::HighWatermark).unwrap();
    p.count_fetched(&read.records);
    assert_eq!(p.fetched(), (7, (a.len() + 2 * b.len()) as u64));
    // An empty read counts nothing.
    p.count_fetched(&[]);
    assert_eq!(p.fetched().0, 7);
}

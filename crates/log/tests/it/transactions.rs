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
        assert_eq!(
            p.aborted_transactions(0, 7).unwrap(),
            vec![aborted(11, 4, 6)]
        );
        assert_eq!(
            p.aborted_transactions(5, 7).unwrap(),
            vec![aborted(11, 4, 6)]
        );
        assert!(p.aborted_transactions(0, 4).unwrap().is_empty());
        assert!(p.aborted_transactions(7, 8).unwrap().is_empty());

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
        assert_eq!(
            p.aborted_transactions(0, 10).unwrap(),
            vec![aborted(11, 4, 6)]
        );
        assert_eq!(end(&p, 12, 0, true).unwrap(), 10);
        p.wait_durable(p.log_end_offset()).await.unwrap();
        assert_eq!(p.last_stable_offset(), 11);

        // Cutting the abort marker off reopens producer 11's transaction.
        p.truncate_to(6).unwrap();
        assert_eq!(p.last_stable_offset(), 4);
        assert!(p.aborted_transactions(0, 6).unwrap().is_empty());
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
        p.aborted_transactions(before, marker + 1).unwrap(),
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
    assert_eq!(
        f.aborted_transactions(0, 10).unwrap(),
        vec![aborted(30, 0, 4)]
    );
    assert_eq!(
        f.aborted_transactions(0, 10).unwrap(),
        l.aborted_transactions(0, 10).unwrap()
    );
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

mod filed_against_a_model {
    //! Property test: the aborted transactions a read_committed fetch is
    //! given, and where they are kept (sealed segments' `.txnindex` files,
    //! the active segment's in memory), against a model of the log's
    //! batches, across segment rolls, truncation and clean and crash
    //! restarts.

    use std::collections::{BTreeSet, HashMap};
    use std::path::Path;

    use proptest::prelude::*;
    use sluice_log::{AbortedTxn, FlushPolicy, Partition};

    use super::{end, txn};
    use crate::{batch, log_files, no_overrides, open, small_segments, Spec};

    #[derive(Clone, Debug)]
    enum Op {
        Data {
            pid: i64,
            len: i32,
            transactional: bool,
        },
        End {
            pid: i64,
            commit: bool,
        },
        /// Truncate at the offset `permille` of the way into the log.
        Truncate {
            permille: i64,
        },
        /// `tamper` damages one `.txnindex` before the store opens again
        /// (picked by the value): removed, torn, or holding a wrong entry,
        /// as a crash or a bad disk may leave it.
        Reopen {
            clean: bool,
            tamper: Option<(u8, u8)>,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..4i64, 1..4i32, any::<bool>())
                .prop_map(|(pid, len, transactional)| Op::Data { pid, len, transactional }),
            3 => (0..4i64, any::<bool>()).prop_map(|(pid, commit)| Op::End { pid, commit }),
            1 => (0..1000i64).prop_map(|permille| Op::Truncate { permille }),
            2 => (any::<bool>(), prop::option::of((any::<u8>(), 0..3u8)))
                .prop_map(|(clean, tamper)| Op::Reopen { clean, tamper }),
        ]
    }

    #[derive(Clone, Copy, Debug)]
    enum Kind {
        Plain,
        Txn,
        Marker { commit: bool },
    }

    /// The log as a list of batches: (base offset, records, producer, kind).
    #[derive(Default)]
    struct Model {
        batches: Vec<(i64, i64, i64, Kind)>,
    }

    impl Model {
        fn end(&self) -> i64 {
            self.batches
                .last()
                .map_or(0, |(base, len, _, _)| base + len)
        }

        /// Kafka's rule, replayed: a transaction runs from its producer's
        /// first transactional batch to its marker (the marker alone when
        /// nothing came before it).
        fn replay(&self) -> (Vec<AbortedTxn>, Option<i64>) {
            let mut open: HashMap<i64, i64> = HashMap::new();
            let mut aborted = Vec::new();
            for (base, _, pid, kind) in &self.batches {
                match kind {
                    Kind::Plain => {}
                    Kind::Txn => {
                        open.entry(*pid).or_insert(*base);
                    }
                    Kind::Marker { commit } => {
                        let first = open.remove(pid).unwrap_or(*base);
                        if !commit {
                            aborted.push(AbortedTxn {
                                producer_id: *pid,
                                first_offset: first,
                                last_offset: *base,
                            });
                        }
                    }
                }
            }
            (aborted, open.values().min().copied())
        }
    }

    /// Each sealed segment holding ABORT markers has a `.txnindex` listing
    /// exactly their transactions; no other segment has one (the active
    /// one's stay in memory).
    fn filed_where_the_markers_are(dir: &Path, model: &Model) -> Result<(), TestCaseError> {
        let bases: Vec<i64> = log_files(dir)
            .iter()
            .map(|p| p.file_stem().unwrap().to_str().unwrap().parse().unwrap())
            .collect();
        let (aborted, _) = model.replay();
        for (i, base) in bases.iter().enumerate() {
            let expected: Vec<AbortedTxn> = match bases.get(i + 1) {
                Some(next) => aborted
                    .iter()
                    .filter(|a| a.last_offset >= *base && a.last_offset < *next)
                    .copied()
                    .collect(),
                None => Vec::new(),
            };
            let file = dir.join(format!("{base:020}.txnindex"));
            let filed = std::fs::read(&file).ok().map(|bytes| {
                bytes
                    .chunks(24)
                    .map(|e| {
                        let word = |i: usize| {
                            e.get(i * 8..i * 8 + 8)
                                .map_or(-1, |w| i64::from_be_bytes(w.try_into().unwrap()))
                        };
                        AbortedTxn {
                            producer_id: word(0),
                            first_offset: word(1),
                            last_offset: word(2),
                        }
                    })
                    .collect::<Vec<_>>()
            });
            let wanted = (!expected.is_empty()).then_some(expected);
            prop_assert_eq!(filed, wanted, "segment {} of {:?}", base, bases);
        }
        Ok(())
    }

    fn check(p: &Partition, model: &Model) -> Result<(), TestCaseError> {
        let end = model.end();
        let (aborted, first_open) = model.replay();
        prop_assert_eq!(p.log_end_offset(), end);
        prop_assert_eq!(p.last_stable_offset(), first_open.unwrap_or(end).min(end));
        for from in 0..=end {
            for to in [from + 1, from + 3, end + 1] {
                let expected: Vec<AbortedTxn> = aborted
                    .iter()
                    .filter(|a| a.last_offset >= from && a.first_offset < to)
                    .copied()
                    .collect();
                prop_assert_eq!(
                    p.aborted_transactions(from, to).unwrap(),
                    expected,
                    "[{}, {})",
                    from,
                    to
                );
            }
        }
        Ok(())
    }

    fn run(ops: Vec<Op>, segment_bytes: u64) -> Result<(), TestCaseError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let dir = tempfile::tempdir().unwrap();
        let defaults = small_segments(segment_bytes, 64);
        let mut store = open(dir.path(), FlushPolicy::Never, defaults.clone());
        store.create_topic("t", 1, &no_overrides(), false).unwrap();
        let partition_dir = dir.path().join("t-0");
        let mut model = Model::default();
        // A truncation moves on to fresh producer ids, so sequences never
        // have to follow what it cut.
        let mut generation = 0i64;
        let mut next_seq: HashMap<i64, i32> = HashMap::new();
        let mut seen = BTreeSet::new();
        for op in ops {
            let p = store.partition("t", 0).unwrap();
            match op {
                Op::Data {
                    pid,
                    len,
                    transactional,
                } => {
                    let at = if transactional {
                        let pid = pid + generation * 10;
                        let seq = next_seq.entry(pid).or_insert(0);
                        let r = p.append_transactional(&txn(pid, 0, *seq, len), 0).unwrap();
                        *seq += len;
                        seen.insert(pid);
                        model
                            .batches
                            .push((r.base_offset, i64::from(len), pid, Kind::Txn));
                        r.base_offset
                    } else {
                        let r = p.append(&batch(&Spec::plain(len, 20)), 0).unwrap();
                        model
                            .batches
                            .push((r.base_offset, i64::from(len), -1, Kind::Plain));
                        r.base_offset
                    };
                    prop_assert_eq!(at, model.end() - model.batches.last().unwrap().1);
                }
                Op::End { pid, commit } => {
                    let pid = pid + generation * 10;
                    if seen.contains(&pid) {
                        let at = end(&p, pid, 0, commit).unwrap();
                        prop_assert_eq!(at, model.end());
                        model.batches.push((at, 1, pid, Kind::Marker { commit }));
                    }
                }
                Op::Truncate { permille } => {
                    let offset = model.end() * permille / 1000;
                    p.truncate_to(offset).unwrap();
                    model
                        .batches
                        .retain(|(base, len, _, _)| base + len - 1 < offset);
                    generation += 1;
                }
                Op::Reopen { clean, tamper } => {
                    drop(p);
                    if clean {
                        store.close().unwrap();
                    }
                    drop(store);
                    let mut filed: Vec<_> = std::fs::read_dir(&partition_dir)
                        .unwrap()
                        .map(|e| e.unwrap().path())
                        .filter(|p| p.extension().is_some_and(|e| e == "txnindex"))
                        .collect();
                    filed.sort();
                    if let (Some((pick, how)), false) = (tamper, filed.is_empty()) {
                        let file = &filed[usize::from(pick) % filed.len()];
                        let mut bytes = std::fs::read(file).unwrap();
                        match how {
                            0 => std::fs::remove_file(file).unwrap(),
                            1 => {
                                bytes.truncate(bytes.len() - 5);
                                std::fs::write(file, bytes).unwrap();
                            }
                            _ => {
                                bytes[15] ^= 1; // an entry's first offset
                                std::fs::write(file, bytes).unwrap();
                            }
                        }
                    }
                    store = open(dir.path(), FlushPolicy::Never, defaults.clone());
                }
            }
            let p = store.partition("t", 0).unwrap();
            check(&p, &model)?;
            filed_where_the_markers_are(&partition_dir, &model)?;
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn fetches_list_the_aborted_transactions_the_model_does(
            ops in prop::collection::vec(op(), 1..50),
            segment_bytes in 150u64..600,
        ) {
            run(ops, segment_bytes)?;
        }
    }
}

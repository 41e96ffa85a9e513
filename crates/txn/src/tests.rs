//! The coordinator's rules, request by request, and a property test of its
//! invariants under any interleaving.

use std::collections::HashMap;

use proptest::prelude::*;
use sluice_vocab::ErrorCode;

use crate::{End, Init, TxnMetadata, TxnState, TxnTable};

const MAX_TIMEOUT: i32 = 900_000;

fn tp(topic: &str, p: i32) -> (String, i32) {
    (topic.to_owned(), p)
}

/// Writes and commits whatever `init` asks for; the producer's id and epoch.
fn init(t: &mut TxnTable, id: &str, fresh: i64, now: i64) -> (i64, i16) {
    match t.init(id, 60_000, MAX_TIMEOUT, None, Some(fresh), now) {
        Ok(Init::Write(m)) => {
            assert!(t.complete(id, &m));
            (m.producer_id, m.producer_epoch)
        }
        other => panic!("init: {other:?}"),
    }
}

fn add(t: &mut TxnTable, id: &str, pe: (i64, i16), parts: &[(String, i32)], now: i64) {
    if let Some(m) = t.add_partitions(id, pe.0, pe.1, parts, now).unwrap() {
        assert!(t.complete(id, &m));
    }
}

/// EndTxn through to its completion.
fn end(t: &mut TxnTable, id: &str, pe: (i64, i16), commit: bool, now: i64) -> TxnMetadata {
    match t.end(id, pe.0, pe.1, commit, now).unwrap() {
        End::Write(m) => assert!(t.complete(id, &m)),
        End::AlreadyDone => {}
    }
    if let Some(done) = t.complete_end(id, now) {
        assert!(t.complete(id, &done));
    }
    t.get(id).unwrap().clone()
}

#[test]
fn a_transaction_from_init_to_commit() {
    let mut t = TxnTable::default();
    assert_eq!(
        t.init("app", 60_000, MAX_TIMEOUT, None, None, 0),
        Ok(Init::NeedProducerId)
    );
    let pending = match t.init("app", 60_000, MAX_TIMEOUT, None, Some(40), 0) {
        Ok(Init::Write(m)) => m,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        (pending.producer_id, pending.producer_epoch, pending.state),
        (40, 0, TxnState::Empty)
    );
    // Not there until written, and busy meanwhile.
    assert!(t.get("app").is_none());
    assert_eq!(
        t.add_partitions("app", 40, 0, &[tp("a", 0)], 1),
        Err(ErrorCode::ConcurrentTransactions)
    );
    assert!(t.complete("app", &pending));
    let pe = (40, 0);

    add(&mut t, "app", pe, &[tp("a", 0), tp("b", 1)], 5);
    let m = t.get("app").unwrap();
    assert_eq!(
        (m.state, m.start_ms, m.partitions.len()),
        (TxnState::Ongoing, 5, 2)
    );
    // Partitions already in: nothing to write; a new one joins, same start.
    assert_eq!(t.add_partitions("app", 40, 0, &[tp("a", 0)], 6), Ok(None));
    add(&mut t, "app", pe, &[tp("c", 0)], 7);
    assert_eq!(t.get("app").unwrap().start_ms, 5);

    let prepare = match t.end("app", 40, 0, true, 8) {
        Ok(End::Write(m)) => m,
        other => panic!("{other:?}"),
    };
    assert_eq!(prepare.state, TxnState::PrepareCommit);
    assert!(t.complete("app", &prepare));
    assert_eq!(t.preparing(), vec![("app".to_owned(), prepare.clone())]);
    assert_eq!(
        t.add_partitions("app", 40, 0, &[tp("d", 0)], 9),
        Err(ErrorCode::ConcurrentTransactions)
    );
    assert_eq!(
        t.end("app", 40, 0, true, 9),
        Err(ErrorCode::ConcurrentTransactions)
    );
    assert_eq!(
        t.end("app", 40, 0, false, 9),
        Err(ErrorCode::InvalidTxnState)
    );
    let done = t.complete_end("app", 10).unwrap();
    assert!(t.complete("app", &done));
    let m = t.get("app").unwrap();
    assert_eq!(
        (m.state, m.partitions.len(), m.start_ms),
        (TxnState::CompleteCommit, 0, -1)
    );

    // A retried EndTxn succeeds; the other outcome is refused.
    assert_eq!(t.end("app", 40, 0, true, 11), Ok(End::AlreadyDone));
    assert_eq!(
        t.end("app", 40, 0, false, 11),
        Err(ErrorCode::InvalidTxnState)
    );
    // The next transaction starts afresh, and aborts.
    add(&mut t, "app", pe, &[tp("z", 3)], 12);
    let m = t.get("app").unwrap();
    assert_eq!((m.start_ms, m.partitions.len()), (12, 1));
    let m = end(&mut t, "app", pe, false, 13);
    assert_eq!((m.state, m.producer_epoch), (TxnState::CompleteAbort, 0));
}

/// A partition leader's verification (AddPartitionsToTxn verify_only)
/// answers from the committed state and changes nothing.
#[test]
fn verification_tells_which_partitions_are_in_the_open_transaction() {
    let mut t = TxnTable::default();
    let pe = init(&mut t, "app", 5, 0);
    let (a, b) = (tp("a", 0), tp("b", 1));
    let only_a = std::slice::from_ref(&a);
    // No transaction open: no partition is in one.
    assert_eq!(t.verify("app", pe.0, pe.1, only_a), Ok(vec![false]));
    add(&mut t, "app", pe, only_a, 1);
    let before = t.get("app").cloned();
    assert_eq!(
        t.verify("app", pe.0, pe.1, &[a.clone(), b.clone()]),
        Ok(vec![true, false])
    );
    assert_eq!(t.get("app").cloned(), before, "verification writes nothing");
    assert_eq!(
        t.verify("app", pe.0, pe.1 - 1, only_a),
        Err(ErrorCode::ProducerFenced)
    );
    assert_eq!(
        t.verify("app", pe.0 + 1, pe.1, only_a),
        Err(ErrorCode::InvalidProducerIdMapping)
    );
    assert_eq!(
        t.verify("other", pe.0, pe.1, only_a),
        Err(ErrorCode::InvalidProducerIdMapping)
    );
    // While the outcome's markers are being written, ask again later.
    match t.end("app", pe.0, pe.1, true, 2).unwrap() {
        End::Write(m) => assert!(t.complete("app", &m)),
        End::AlreadyDone => panic!("the transaction was open"),
    }
    assert_eq!(
        t.verify("app", pe.0, pe.1, only_a),
        Err(ErrorCode::ConcurrentTransactions)
    );
    if let Some(done) = t.complete_end("app", 3) {
        assert!(t.complete("app", &done));
    }
    assert_eq!(t.verify("app", pe.0, pe.1, only_a), Ok(vec![false]));
}

#[test]
fn requests_of_the_wrong_producer_are_refused() {
    let mut t = TxnTable::default();
    assert_eq!(
        t.add_partitions("nobody", 1, 0, &[tp("a", 0)], 0),
        Err(ErrorCode::InvalidProducerIdMapping)
    );
    let pe = init(&mut t, "app", 7, 0);
    assert_eq!(
        t.add_partitions("app", 8, pe.1, &[tp("a", 0)], 0),
        Err(ErrorCode::InvalidProducerIdMapping)
    );
    assert_eq!(
        t.add_partitions("app", 7, pe.1 + 1, &[tp("a", 0)], 0),
        Err(ErrorCode::ProducerFenced)
    );
    assert_eq!(
        t.end("app", 7, pe.1, true, 0),
        Err(ErrorCode::InvalidTxnState),
        "nothing is open"
    );
    for bad in [0, -5, MAX_TIMEOUT + 1] {
        assert_eq!(
            t.init("app", bad, MAX_TIMEOUT, None, Some(9), 0),
            Err(ErrorCode::InvalidTransactionTimeout)
        );
    }
}

#[test]
fn a_new_instance_fences_the_old_one_and_aborts_its_transaction() {
    let mut t = TxnTable::default();
    let old = init(&mut t, "app", 7, 0);
    add(&mut t, "app", old, &[tp("a", 0)], 1);
    // The new instance's InitProducerId: the open transaction is aborted
    // first, under a bumped epoch.
    let abort = match t.init("app", 60_000, MAX_TIMEOUT, None, None, 2) {
        Ok(Init::AbortFirst(m)) => m,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        (abort.state, abort.producer_epoch),
        (TxnState::PrepareAbort, old.1 + 1)
    );
    assert_eq!(
        abort.partitions.len(),
        1,
        "its markers go to the transaction's partitions"
    );
    assert!(t.complete("app", &abort));
    let done = t.complete_end("app", 3).unwrap();
    assert_eq!(done.state, TxnState::CompleteAbort);
    assert!(t.complete("app", &done));
    // The old instance is fenced from now on.
    assert_eq!(
        t.add_partitions("app", old.0, old.1, &[tp("a", 0)], 4),
        Err(ErrorCode::ProducerFenced)
    );
    assert_eq!(
        t.end("app", old.0, old.1, true, 4),
        Err(ErrorCode::ProducerFenced)
    );
    // The new one's retry gets another bump.
    let new = init(&mut t, "app", 99, 5);
    assert_eq!(new, (old.0, old.1 + 2));
}

#[test]
fn a_retried_init_gets_the_current_epoch_and_a_stale_one_is_fenced() {
    let mut t = TxnTable::default();
    let first = init(&mut t, "app", 7, 0);
    let second = match t.init("app", 60_000, MAX_TIMEOUT, Some(first), None, 1) {
        Ok(Init::Write(m)) => {
            assert!(t.complete("app", &m));
            (m.producer_id, m.producer_epoch)
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(second, (7, first.1 + 1));
    // Its answer was lost; the client asks again with what it had.
    assert_eq!(
        t.init("app", 60_000, MAX_TIMEOUT, Some(first), None, 2),
        Ok(Init::Current {
            producer_id: 7,
            producer_epoch: second.1
        })
    );
    assert_eq!(
        t.init("app", 60_000, MAX_TIMEOUT, Some((3, 3)), None, 2),
        Err(ErrorCode::ProducerFenced)
    );
}

#[test]
fn an_exhausted_epoch_rotates_the_producer_id() {
    let mut t = TxnTable::default();
    t.replay(
        "app",
        Some(TxnMetadata {
            producer_id: 7,
            last_producer_id: -1,
            producer_epoch: i16::MAX - 1,
            last_producer_epoch: i16::MAX - 2,
            timeout_ms: 1000,
            state: TxnState::CompleteCommit,
            partitions: Default::default(),
            start_ms: -1,
            last_update_ms: 0,
        }),
    );
    assert_eq!(
        t.init("app", 1000, MAX_TIMEOUT, None, None, 1),
        Ok(Init::NeedProducerId)
    );
    let m = match t.init("app", 1000, MAX_TIMEOUT, None, Some(8), 1) {
        Ok(Init::Write(m)) => m,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        (
            m.producer_id,
            m.producer_epoch,
            m.last_producer_id,
            m.last_producer_epoch
        ),
        (8, 0, 7, i16::MAX - 1)
    );
}

#[test]
fn a_transaction_past_its_timeout_is_aborted_under_a_bumped_epoch() {
    let mut t = TxnTable::default();
    let pe = init(&mut t, "slow", 7, 0);
    add(&mut t, "slow", pe, &[tp("a", 0)], 1_000);
    assert!(t.expire(60_999).is_empty());
    let expired = t.expire(61_000);
    assert_eq!(expired.len(), 1);
    let (id, abort) = &expired[0];
    assert_eq!(
        (id.as_str(), abort.state, abort.producer_epoch),
        ("slow", TxnState::PrepareAbort, pe.1 + 1)
    );
    // Pending: not expired twice, and the producer is busy.
    assert!(t.expire(70_000).is_empty());
    assert!(t.complete("slow", abort));
    assert_eq!(
        t.end("slow", pe.0, pe.1, true, 62_000),
        Err(ErrorCode::ProducerFenced)
    );
}

#[test]
fn a_failed_write_leaves_the_state_as_it_was() {
    let mut t = TxnTable::default();
    assert!(matches!(
        t.init("new", 1000, MAX_TIMEOUT, None, Some(1), 0),
        Ok(Init::Write(_))
    ));
    t.abandon("new");
    assert!(t.get("new").is_none());
    assert!(matches!(
        t.init("new", 1000, MAX_TIMEOUT, None, None, 0),
        Ok(Init::NeedProducerId)
    ));

    let pe = init(&mut t, "app", 7, 0);
    let before = t.get("app").cloned();
    assert!(t
        .add_partitions("app", pe.0, pe.1, &[tp("a", 0)], 1)
        .unwrap()
        .is_some());
    t.abandon("app");
    assert_eq!(t.get("app").cloned(), before);
    add(&mut t, "app", pe, &[tp("a", 0)], 2);
    assert_eq!(t.get("app").unwrap().state, TxnState::Ongoing);
}

#[derive(Clone, Debug)]
enum Op {
    Init {
        id: usize,
        expected_current: bool,
    },
    Add {
        id: usize,
        partition: i32,
    },
    End {
        id: usize,
        commit: bool,
    },
    CompleteEnd {
        id: usize,
    },
    Expire,
    /// The pending write of an id commits, or fails.
    Settle {
        id: usize,
        ok: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..3usize, any::<bool>()).prop_map(|(id, expected_current)| Op::Init {
            id,
            expected_current
        }),
        (0..3usize, 0..4i32).prop_map(|(id, partition)| Op::Add { id, partition }),
        (0..3usize, any::<bool>()).prop_map(|(id, commit)| Op::End { id, commit }),
        (0..3usize).prop_map(|id| Op::CompleteEnd { id }),
        Just(Op::Expire),
        (0..3usize, any::<bool>()).prop_map(|(id, ok)| Op::Settle { id, ok }),
    ]
}

proptest! {
    /// Whatever the requests and however their writes end: a committed state
    /// only ever follows a valid transition; a producer's (id, epoch) never
    /// goes back; Ongoing always has partitions and a start, CompleteX and
    /// Empty never do.
    #[test]
    fn committed_states_follow_kafkas_transitions(ops in proptest::collection::vec(op(), 1..80)) {
        let ids = ["a", "b", "c"];
        let mut t = TxnTable::default();
        let mut pending: HashMap<usize, TxnMetadata> = HashMap::new();
        let mut next_pid = 100i64;
        let mut now = 0i64;
        for op in ops {
            now += 500;
            let before: Vec<Option<TxnMetadata>> = ids.iter().map(|id| t.get(id).cloned()).collect();
            match op {
                Op::Init { id, expected_current } => {
                    let expected = expected_current
                        .then(|| t.get(ids[id]).map(|m| (m.producer_id, m.producer_epoch)))
                        .flatten();
                    next_pid += 1;
                    if let Ok(Init::Write(m) | Init::AbortFirst(m)) =
                        t.init(ids[id], 2_000, MAX_TIMEOUT, expected, Some(next_pid), now)
                    {
                        prop_assert!(pending.insert(id, m).is_none(), "two transitions pending");
                    }
                }
                Op::Add { id, partition } => {
                    if let Some(m) = t.get(ids[id]).cloned() {
                        if let Ok(Some(w)) = t.add_partitions(ids[id], m.producer_id, m.producer_epoch, &[tp("t", partition)], now) {
                            prop_assert!(pending.insert(id, w).is_none());
                        }
                    }
                }
                Op::End { id, commit } => {
                    if let Some(m) = t.get(ids[id]).cloned() {
                        if let Ok(End::Write(w)) = t.end(ids[id], m.producer_id, m.producer_epoch, commit, now) {
                            prop_assert!(pending.insert(id, w).is_none());
                        }
                    }
                }
                Op::CompleteEnd { id } => {
                    if let Some(w) = t.complete_end(ids[id], now) {
                        prop_assert!(pending.insert(id, w).is_none());
                    }
                }
                Op::Expire => {
                    for (name, w) in t.expire(now) {
                        let id = ids.iter().position(|i| *i == name).unwrap();
                        prop_assert!(pending.insert(id, w).is_none());
                    }
                }
                Op::Settle { id, ok } => {
                    if let Some(w) = pending.remove(&id) {
                        if ok {
                            prop_assert!(t.complete(ids[id], &w), "a pending transition did not complete");
                        } else {
                            t.abandon(ids[id]);
                        }
                    }
                }
            }
            for (i, id) in ids.iter().enumerate() {
                let Some(after) = t.get(id) else { continue };
                match after.state {
                    TxnState::Ongoing | TxnState::PrepareCommit | TxnState::PrepareAbort => {
                        prop_assert!(!after.partitions.is_empty() && after.start_ms >= 0, "{:?}", after);
                    }
                    TxnState::Empty | TxnState::CompleteCommit | TxnState::CompleteAbort => {
                        prop_assert!(after.partitions.is_empty() && after.start_ms == -1, "{:?}", after);
                    }
                    _ => {}
                }
                if let Some(b) = &before[i] {
                    if b != after {
                        prop_assert!(after.state.may_follow_for_test(b.state), "{:?} -> {:?}", b.state, after.state);
                        let moved_on = after.producer_id != b.producer_id && after.last_producer_id == b.producer_id;
                        prop_assert!(moved_on || (after.producer_id == b.producer_id && after.producer_epoch >= b.producer_epoch));
                    }
                }
            }
        }
    }
}

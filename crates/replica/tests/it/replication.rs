//! Replication end to end: acks=all, failover, truncation, ISR changes, min.insync.

use sluice_vocab::ErrorCode;
use std::time::Duration;

use sluice_cluster::BrokerId;

use crate::support::*;

fn batches_of(log: &[u8]) -> Vec<(i64, usize)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + 12 <= log.len() {
        let base = i64::from_be_bytes(log[pos..pos + 8].try_into().unwrap());
        let len = i32::from_be_bytes(log[pos + 8..pos + 12].try_into().unwrap()) as usize;
        out.push((base, pos));
        pos += 12 + len;
    }
    out
}

/// The payload tag of each batch of a log (first payload byte, see `support::batch`).
fn tags_of(log: &[u8]) -> Vec<u8> {
    batches_of(log)
        .iter()
        .map(|(_, pos)| log[pos + 61])
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_all_replicates_and_survives_leader_failover() {
    let mut c = Cluster::start(3).await;
    c.create_topic("t", 1, 3, &[]).await;
    let leader = c.settled("t", 0).await;
    for tag in 0..10u8 {
        produce_all(&c, leader, "t", tag).await.expect("acks=all");
    }
    let log = logs_converge(&c, leader, "t").await;
    assert_eq!(tags_of(&log), (0..10).collect::<Vec<u8>>());
    // Followers learn the HW too.
    eventually(WAIT, "follower high watermarks", || async {
        c.nodes
            .keys()
            .all(|id| c.partition(*id, "t", 0).high_watermark() == 20)
            .then_some(())
    })
    .await;

    // A follower is not the leader: produce, reads and follower fetches are refused.
    let follower = *c.nodes.keys().find(|id| **id != leader).unwrap();
    assert_eq!(
        c.mgr(follower)
            .leader_for_produce("t", 0, false)
            .unwrap_err(),
        ErrorCode::NotLeaderOrFollower
    );
    assert_eq!(
        c.mgr(follower).leader_for_read("t", 0, -1).unwrap_err(),
        ErrorCode::NotLeaderOrFollower
    );
    assert_eq!(
        c.mgr(leader)
            .leader_for_produce("nope", 0, false)
            .unwrap_err(),
        ErrorCode::UnknownTopicOrPartition
    );
    let epoch = c.mgr(leader).leader_epoch_of("t", 0).unwrap();
    assert_eq!(
        c.mgr(leader)
            .leader_for_read("t", 0, epoch + 1)
            .unwrap_err(),
        ErrorCode::UnknownLeaderEpoch
    );
    if epoch > 0 {
        assert_eq!(
            c.mgr(leader)
                .leader_for_read("t", 0, epoch - 1)
                .unwrap_err(),
            ErrorCode::FencedLeaderEpoch
        );
    }

    // Kill the leader: a new one is elected from the ISR and has every acked batch.
    let old_epoch = c.image().partition("t", 0).unwrap().leader_epoch;
    c.stop(leader).await;
    let new_leader = eventually(WAIT, "a new leader", || async {
        let img = c.image();
        let p = img.partition("t", 0)?;
        (p.leader != leader && p.leader >= 0 && p.leader_epoch > old_epoch).then_some(p.leader)
    })
    .await;
    assert_eq!(c.settled("t", 0).await, new_leader);
    let log = log_contents(&c.partition(new_leader, "t", 0));
    assert_eq!(tags_of(&log), (0..10).collect::<Vec<u8>>());
    // ISR = the two live brokers >= min.insync 2: acks=all still works.
    for tag in 10..15u8 {
        produce_all(&c, new_leader, "t", tag)
            .await
            .expect("acks=all after failover");
    }
    let log = logs_converge(&c, new_leader, "t").await;
    assert_eq!(tags_of(&log), (0..15).collect::<Vec<u8>>());

    // The old leader comes back as a follower and catches up.
    c.restart(leader).await;
    c.settled("t", 0).await;
    let log = logs_converge(&c, new_leader, "t").await;
    assert_eq!(tags_of(&log), (0..15).collect::<Vec<u8>>());
    c.shutdown().await;
}

/// The follower whose fetch moves the high watermark is answered at once,
/// not held for `max_wait` with a high watermark it does not know: every
/// replica serves the committed end (to lag figures, to a failover) as soon
/// as the leader does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_learn_the_high_watermark_without_waiting_out_a_held_fetch() {
    let held = Duration::from_secs(120);
    let c = Cluster::start_with(3, Duration::from_secs(150), held).await;
    c.create_topic("t", 1, 3, &[]).await;
    let leader = c.settled("t", 0).await;
    for tag in 0..5u8 {
        let end = produce_all(&c, leader, "t", tag).await.expect("acks=all");
        eventually(
            WAIT,
            "every replica's high watermark at the committed end",
            || async {
                c.nodes
                    .keys()
                    .all(|id| c.partition(*id, "t", 0).high_watermark() == end)
                    .then_some(())
            },
        )
        .await;
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn divergent_suffix_is_truncated_on_rejoin() {
    // A lag limit well above the time the cut leader runs alone, so it cannot shrink
    // the ISR to itself before it is stopped.
    let mut c = Cluster::start_with_lag(3, Duration::from_secs(4)).await;
    c.create_topic("d", 1, 3, &[]).await;
    let leader = c.settled("d", 0).await;
    for tag in 0..5u8 {
        produce_all(&c, leader, "d", tag).await.expect("acks=all");
    }
    logs_converge(&c, leader, "d").await;

    // Cut the leader's replication links; it still leads in the image for a while.
    c.connector.set_cut(leader, true);
    let mgr = c.mgr(leader).clone();
    let h = mgr.leader_for_produce("d", 0, true).expect("still leader");
    let mut unreplicated = 0;
    for tag in 100..103u8 {
        let r = h.append(&batch(2, tag)).expect("append on the cut leader");
        unreplicated = r.end_offset;
    }
    // It cannot ack with acks=all: the followers never fetch what it appended.
    let waited = h
        .wait_committed(unreplicated, Some(Duration::from_millis(500)))
        .await;
    assert!(
        matches!(
            waited,
            Err(ErrorCode::RequestTimedOut) | Err(ErrorCode::NotLeaderOrFollower)
        ),
        "{waited:?}"
    );
    assert_eq!(
        tags_of(&log_contents(&c.partition(leader, "d", 0))).len(),
        8
    );

    // It goes away; a new leader is elected and takes writes.
    let old_epoch = c.image().partition("d", 0).unwrap().leader_epoch;
    c.stop(leader).await;
    c.connector.set_cut(leader, false);
    let new_leader = eventually(WAIT, "a new leader", || async {
        let img = c.image();
        let p = img.partition("d", 0)?;
        (p.leader != leader && p.leader >= 0 && p.leader_epoch > old_epoch).then_some(p.leader)
    })
    .await;
    c.settled("d", 0).await;
    for tag in 10..14u8 {
        produce_all(&c, new_leader, "d", tag)
            .await
            .expect("acks=all on the new leader");
    }

    // The old leader rejoins: its suffix 100..103 is cut, it gets 10..14 instead.
    c.restart(leader).await;
    c.settled("d", 0).await;
    let log = logs_converge(&c, new_leader, "d").await;
    let expected: Vec<u8> = (0..5).chain(10..14).collect();
    assert_eq!(tags_of(&log), expected);
    assert_eq!(
        tags_of(&log_contents(&c.partition(leader, "d", 0))),
        expected
    );
    // It rejoins the ISR.
    eventually(WAIT, "the old leader back in the ISR", || async {
        let img = c.image();
        (img.partition("d", 0)?.isr.len() == 3).then_some(())
    })
    .await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isr_shrinks_and_expands_and_min_insync_is_enforced() {
    let (shrinks_before, expands_before) = sluice_replica::replica_metrics().isr_changes();
    let c = Cluster::start(3).await;
    c.create_topic("i", 1, 3, &[("min.insync.replicas", "3")])
        .await;
    let leader = c.settled("i", 0).await;
    produce_all(&c, leader, "i", 1)
        .await
        .expect("acks=all with full ISR");

    // A follower stops fetching: it is shrunk out after replica_lag_max.
    let follower: BrokerId = *c.nodes.keys().find(|id| **id != leader).unwrap();
    c.connector.set_cut(follower, true);
    eventually(WAIT, "the ISR without the cut follower", || async {
        let img = c.image();
        let p = img.partition("i", 0)?;
        (p.isr.len() == 2 && !p.isr.contains(&follower)).then_some(())
    })
    .await;
    // |ISR| = 2 < min.insync 3: acks=all refused before appending, acks=1 fine.
    let end_before = c.partition(leader, "i", 0).log_end_offset();
    assert_eq!(
        c.mgr(leader).leader_for_produce("i", 0, true).unwrap_err(),
        ErrorCode::NotEnoughReplicas
    );
    assert_eq!(c.partition(leader, "i", 0).log_end_offset(), end_before);
    let h = c
        .mgr(leader)
        .leader_for_produce("i", 0, false)
        .expect("acks=1");
    let r = h.append(&batch(2, 2)).expect("append");
    // The HW still moves with the remaining ISR.
    h.wait_committed(r.end_offset, Some(Duration::from_secs(10)))
        .await
        .expect("HW covers the 2-member ISR");

    // It comes back: caught up, added to the ISR, acks=all works again.
    c.connector.set_cut(follower, false);
    eventually(WAIT, "the follower back in the ISR", || async {
        let img = c.image();
        (img.partition("i", 0)?.isr.len() == 3).then_some(())
    })
    .await;
    eventually(WAIT, "the leader sees the expanded ISR", || async {
        c.mgr(leader).leader_for_produce("i", 0, true).ok()
    })
    .await;
    produce_all(&c, leader, "i", 3)
        .await
        .expect("acks=all after expansion");
    // The leader counted both changes (other tests of this process may add
    // theirs: at least one of each).
    let (shrinks, expands) = sluice_replica::replica_metrics().isr_changes();
    assert!(shrinks > shrinks_before, "no ISR shrink counted");
    assert!(expands > expands_before, "no ISR expansion counted");
    let log = logs_converge(&c, leader, "i").await;
    assert_eq!(tags_of(&log), vec![1, 2, 3]);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_topic_goes_from_every_broker() {
    let c = Cluster::start(3).await;
    c.create_topic("gone", 2, 3, &[]).await;
    for id in c.nodes.keys() {
        assert!(c.node(*id).store.topic("gone").is_some());
    }
    let r = c
        .any()
        .cluster
        .propose(sluice_cluster::Command::DeleteTopic {
            name: "gone".to_string(),
        })
        .await
        .expect("propose");
    assert!(r.is_ok(), "{r:?}");
    eventually(WAIT, "the topic deleted everywhere", || async {
        c.nodes
            .values()
            .all(|n| n.store.topic("gone").is_none() && n.mgr.leader_epoch_of("gone", 0).is_none())
            .then_some(())
    })
    .await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_watermark_waits_for_the_in_sync_followers_log_starts() {
    let c = Cluster::start(3).await;
    c.create_topic("d", 1, 3, &[]).await;
    let leader = c.settled("d", 0).await;
    for tag in 0..5u8 {
        produce_all(&c, leader, "d", tag).await.expect("acks=all");
    }
    logs_converge(&c, leader, "d").await;
    assert_eq!(c.mgr(leader).low_watermark("d", 0), Ok(0));
    // DeleteRecords on the leader: its own log start moves at once, the low
    // watermark only once every in-sync follower has followed and said so.
    let start = c
        .partition(leader, "d", 0)
        .delete_records_before(6)
        .expect("delete");
    assert_eq!(start, 6);
    let low = c.mgr(leader).low_watermark("d", 0).unwrap();
    let followers: Vec<i64> = c
        .nodes
        .keys()
        .filter(|id| **id != leader)
        .map(|id| c.partition(*id, "d", 0).log_start_offset())
        .collect();
    assert!(
        low <= *followers.iter().min().unwrap(),
        "low watermark {low} ahead of the followers' log starts {followers:?}"
    );
    eventually(WAIT, "low watermark 6", || async {
        (c.mgr(leader).low_watermark("d", 0) == Ok(6)).then_some(())
    })
    .await;
    for id in c.nodes.keys() {
        assert_eq!(c.partition(*id, "d", 0).log_start_offset(), 6, "node {id}");
    }
    // Only the leader answers.
    let follower = *c.nodes.keys().find(|id| **id != leader).unwrap();
    assert_eq!(
        c.mgr(follower).low_watermark("d", 0),
        Err(ErrorCode::NotLeaderOrFollower)
    );
    c.shutdown().await;
}

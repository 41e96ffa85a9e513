//! `apply` validation and determinism, checked against a simple model.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

fn register(img: &mut MetadataImage, index: &mut u64, id: BrokerId) {
    *index += 1;
    let r = img.apply(
        *index,
        &Command::RegisterBroker {
            node_id: id,
            kafka_host: format!("b{id}"),
            kafka_port: 9092,
            raft_addr: format!("b{id}:9093"),
            incarnation: 1,
            replica_addr: String::new(),
            endpoints: BTreeMap::new(),
        },
    );
    assert_eq!(r, Ok(CommandOutput::BrokerEpoch(*index)));
}

/// An image with brokers 1..=n registered, at log index n.
fn cluster(n: i32) -> (MetadataImage, u64) {
    let mut img = MetadataImage::default();
    let mut index = 0;
    for id in 1..=n {
        register(&mut img, &mut index, id);
    }
    (img, index)
}

fn create(name: &str, partitions: i32, rf: i16) -> Command {
    Command::CreateTopic {
        name: name.to_string(),
        partitions,
        replication_factor: rf,
        configs: BTreeMap::new(),
    }
}

/// Move `t`-0 to `replicas`.
fn re(replicas: Vec<i32>) -> Command {
    Command::ReassignPartition {
        topic: "t".into(),
        partition: 0,
        replicas,
    }
}

/// `t`-0's leader, as `p` has it, sets the ISR to `new_isr`.
fn alter_isr(p: &PartitionState, new_isr: Vec<i32>) -> Command {
    Command::AlterPartition {
        topic: "t".into(),
        partition: 0,
        leader_id: p.leader,
        leader_epoch: p.leader_epoch,
        partition_epoch: p.partition_epoch,
        new_isr,
    }
}

fn part<'a>(img: &'a MetadataImage, t: &str, p: i32) -> &'a PartitionState {
    img.partition(t, p).expect("partition exists")
}

#[test]
fn create_topic_places_round_robin_over_live_brokers() {
    let (mut img, i) = cluster(3);
    let r = img.apply(i + 1, &create("t", 3, 2));
    assert!(matches!(r, Ok(CommandOutput::TopicCreated { .. })));
    let t = &img.topics["t"];
    assert_ne!(t.topic_id, [0; 16]);
    assert_eq!(t.partitions[0].replicas, vec![1, 2]);
    assert_eq!(t.partitions[1].replicas, vec![2, 3]);
    assert_eq!(t.partitions[2].replicas, vec![3, 1]);
    for p in &t.partitions {
        assert_eq!(p.isr, p.replicas);
        assert_eq!(p.leader, p.replicas[0]);
        assert_eq!((p.leader_epoch, p.partition_epoch), (0, 0));
    }
}

#[test]
fn create_topic_validation_maps_to_kafka_codes() {
    let (mut img, i) = cluster(3);
    let code = |r: CommandResult| r.err().map(|e| e.error_code().code());
    assert_eq!(code(img.apply(i + 1, &create("t", 1, 4))), Some(38));
    assert_eq!(code(img.apply(i + 1, &create("t", 1, 0))), Some(38));
    assert_eq!(code(img.apply(i + 1, &create("t", 0, 1))), Some(37));
    assert_eq!(code(img.apply(i + 1, &create("bad name", 1, 1))), Some(17));
    assert_eq!(code(img.apply(i + 1, &create("..", 1, 1))), Some(17));
    assert_eq!(
        code(img.apply(i + 1, &create(&"x".repeat(250), 1, 1))),
        Some(17)
    );
    assert!(img.topics.is_empty(), "rejections change nothing");
    assert!(img.apply(i + 2, &create("t", 1, 3)).is_ok());
    assert_eq!(code(img.apply(i + 3, &create("t", 1, 1))), Some(36));
    // A fenced broker does not count as live.
    img.apply(i + 4, &Command::FenceBroker { node_id: 3 }).ok();
    assert_eq!(code(img.apply(i + 5, &create("u", 1, 3))), Some(38));
    // Nor does a draining one for placement.
    img.apply(i + 6, &Command::UnfenceBroker { node_id: 3 })
        .ok();
    img.apply(
        i + 7,
        &Command::SetDraining {
            node_id: 2,
            draining: true,
        },
    )
    .ok();
    assert_eq!(code(img.apply(i + 8, &create("u", 1, 3))), Some(38));
    assert!(img.apply(i + 9, &create("u", 2, 2)).is_ok());
    assert!(img.topics["u"]
        .partitions
        .iter()
        .all(|p| !p.replicas.contains(&2)));
}

#[test]
fn fencing_moves_leadership_within_the_isr_and_shrinks_it() {
    let (mut img, i) = cluster(3);
    img.apply(i + 1, &create("t", 3, 3)).ok();
    let before = part(&img, "t", 0).clone();
    assert_eq!(before.leader, 1);
    img.apply(i + 2, &Command::FenceBroker { node_id: 1 }).ok();
    let p = part(&img, "t", 0);
    assert_eq!(
        p.leader, 2,
        "next replica in preference order that is in the ISR"
    );
    assert_eq!(p.leader_epoch, before.leader_epoch + 1);
    assert_eq!(p.isr, vec![2, 3]);
    assert!(p.partition_epoch > before.partition_epoch);
    // A partition broker 1 followed: leader unchanged, epoch unchanged, ISR shrunk.
    let p1 = part(&img, "t", 1);
    assert_eq!((p1.leader, p1.leader_epoch), (2, 0));
    assert!(!p1.isr.contains(&1));
    // Unfencing does not put it back into ISRs (the leader does that by AlterPartition).
    img.apply(i + 3, &Command::UnfenceBroker { node_id: 1 })
        .ok();
    assert_eq!(part(&img, "t", 0).isr, vec![2, 3]);
}

#[test]
fn sole_isr_member_fenced_takes_the_partition_offline_until_it_returns() {
    let (mut img, i) = cluster(2);
    img.apply(i + 1, &create("t", 1, 2)).ok();
    // The leader (1) shrinks the ISR to itself.
    let r = img.apply(
        i + 2,
        &Command::AlterPartition {
            topic: "t".into(),
            partition: 0,
            leader_id: 1,
            leader_epoch: 0,
            partition_epoch: 0,
            new_isr: vec![1],
        },
    );
    assert!(r.is_ok(), "{r:?}");
    img.apply(i + 3, &Command::FenceBroker { node_id: 1 }).ok();
    let p = part(&img, "t", 0);
    assert_eq!(p.leader, NO_LEADER, "never elected outside the ISR");
    assert_eq!(p.isr, vec![1], "the last in-sync replica stays in the ISR");
    assert_eq!(p.leader_epoch, 1);
    assert_eq!(img.offline(), vec![("t".to_string(), 0)]);
    // An election finds nobody eligible.
    let r = img.apply(
        i + 4,
        &Command::ElectLeaders {
            partitions: None,
            preferred_only: false,
        },
    );
    let Ok(CommandOutput::Elections(out)) = r else {
        panic!("{r:?}")
    };
    assert_eq!(
        out[0].result,
        Err(CommandError::EligibleLeadersNotAvailable)
    );
    img.apply(i + 5, &Command::UnfenceBroker { node_id: 1 })
        .ok();
    let p = part(&img, "t", 0);
    assert_eq!((p.leader, p.leader_epoch), (1, 2));
}

#[test]
fn restart_with_new_incarnation_moves_leadership_and_bumps_epoch() {
    let (mut img, i) = cluster(3);
    img.apply(i + 1, &create("t", 1, 3)).ok();
    let r = img.apply(
        i + 2,
        &Command::RegisterBroker {
            node_id: 1,
            kafka_host: "b1".into(),
            kafka_port: 9092,
            raft_addr: "b1:9093".into(),
            incarnation: 2,
            replica_addr: String::new(),
            endpoints: BTreeMap::new(),
        },
    );
    assert_eq!(r, Ok(CommandOutput::BrokerEpoch(i + 2)));
    let p = part(&img, "t", 0);
    assert_eq!((p.leader, p.leader_epoch), (2, 1));
    assert!(!img.brokers[&1].fenced);
}

#[test]
fn alter_partition_is_fenced_by_epochs_and_validated() {
    let (mut img, i) = cluster(3);
    img.apply(i + 1, &create("t", 1, 3)).ok();
    let alter =
        |leader_id, leader_epoch, partition_epoch, new_isr: Vec<i32>| Command::AlterPartition {
            topic: "t".into(),
            partition: 0,
            leader_id,
            leader_epoch,
            partition_epoch,
            new_isr,
        };
    let code = |img: &mut MetadataImage, c: Command| {
        img.apply(i + 2, &c).err().map(|e| e.error_code().code())
    };
    assert_eq!(code(&mut img, alter(1, 0, 0, vec![1, 2])), None);
    assert_eq!(part(&img, "t", 0).partition_epoch, 1);
    assert_eq!(
        code(&mut img, alter(1, 0, 0, vec![1])),
        Some(95),
        "stale partition epoch"
    );
    assert_eq!(
        code(&mut img, alter(2, 0, 1, vec![2])),
        Some(6),
        "not the leader"
    );
    assert_eq!(
        code(&mut img, alter(1, 0, 1, vec![2])),
        Some(42),
        "ISR without leader"
    );
    assert_eq!(
        code(&mut img, alter(1, 0, 1, vec![1, 4])),
        Some(42),
        "not a replica"
    );
    assert_eq!(
        code(&mut img, alter(1, 0, 1, vec![1, 1])),
        Some(42),
        "duplicate"
    );
    img.apply(i + 3, &Command::FenceBroker { node_id: 3 }).ok();
    assert_eq!(
        code(&mut img, alter(1, 0, 1, vec![1, 2, 3])),
        Some(107),
        "fenced may not join"
    );
    img.apply(i + 4, &Command::FenceBroker { node_id: 1 }).ok();
    // Broker 1 was deposed (leader epoch 1 now): its old epoch is fenced.
    assert_eq!(code(&mut img, alter(1, 0, 2, vec![1])), Some(74));
    assert_eq!(code(&mut img, alter(9, 0, 0, vec![9])), Some(74));
    let missing = Command::AlterPartition {
        topic: "t".into(),
        partition: 5,
        leader_id: 2,
        leader_epoch: 1,
        partition_epoch: 3,
        new_isr: vec![2],
    };
    assert_eq!(code(&mut img, missing), Some(3));
}

#[test]
fn elect_leaders_prefers_first_live_isr_replica_and_skips_draining() {
    let (mut img, i) = cluster(3);
    img.apply(i + 1, &create("t", 1, 3)).ok();
    let r = img.apply(
        i + 2,
        &Command::ElectLeaders {
            partitions: None,
            preferred_only: false,
        },
    );
    let Ok(CommandOutput::Elections(out)) = r else {
        panic!("{r:?}")
    };
    assert_eq!(out[0].result, Err(CommandError::ElectionNotNeeded));
    img.apply(
        i + 3,
        &Command::SetDraining {
            node_id: 1,
            draining: true,
        },
    )
    .ok();
    let r = img.apply(
        i + 4,
        &Command::ElectLeaders {
            partitions: Some(vec![("t".into(), 0), ("nope".into(), 0)]),
            preferred_only: false,
        },
    );
    let Ok(CommandOutput::Elections(out)) = r else {
        panic!("{r:?}")
    };
    assert_eq!(out[0].result, Ok(2));
    assert_eq!(out[1].result, Err(CommandError::UnknownTopicOrPartition));
    let p = part(&img, "t", 0);
    assert_eq!((p.leader, p.leader_epoch, p.partition_epoch), (2, 1, 1));
    // Kafka's preferred election elects the first replica or no one.
    let preferred = Command::ElectLeaders {
        partitions: Some(vec![("t".into(), 0)]),
        preferred_only: true,
    };
    let result = |r: CommandResult| match r {
        Ok(CommandOutput::Elections(out)) => out[0].result.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        result(img.apply(i + 5, &preferred)),
        Err(CommandError::PreferredLeaderNotAvailable(1)),
        "1 is draining"
    );
    img.apply(
        i + 6,
        &Command::SetDraining {
            node_id: 1,
            draining: false,
        },
    )
    .ok();
    let _ = img.apply(i + 7, &preferred);
    assert_eq!(part(&img, "t", 0).leader, 1);
    assert_eq!(
        result(img.apply(i + 8, &preferred)),
        Err(CommandError::ElectionNotNeeded)
    );
}

#[test]
fn reassign_validates_and_completes_at_once_onto_in_sync_replicas() {
    let (mut img, i) = cluster(4);
    img.apply(i + 1, &create("t", 1, 2)).ok();
    assert_eq!(part(&img, "t", 0).replicas, vec![1, 2]);
    for bad in [vec![3, 9], vec![3, 3], vec![]] {
        let before = img.clone();
        let r = img.apply(i + 2, &re(bad.clone()));
        assert_eq!(r.err().map(|e| e.error_code().code()), Some(39), "{bad:?}");
        assert_eq!(img.topics, before.topics, "a rejection changes nothing");
    }
    // Dropping replica 1 keeps in-sync 2: done at once, 2 leads under a new epoch.
    let r = img.apply(i + 2, &re(vec![2]));
    let Ok(CommandOutput::Partition(p)) = r else {
        panic!("{r:?}")
    };
    assert_eq!(p.replicas, vec![2]);
    assert_eq!(p.isr, vec![2]);
    assert_eq!(p.target_replicas, None);
    assert_eq!((p.leader, p.leader_epoch), (2, 1));
}

#[test]
fn reassign_onto_new_brokers_adds_them_first_and_drops_the_old_once_in_sync() {
    let (mut img, mut i) = cluster(4);
    i += 1;
    img.apply(i, &create("t", 1, 2)).ok();
    let re = Command::ReassignPartition {
        topic: "t".into(),
        partition: 0,
        replicas: vec![3, 4],
    };
    i += 1;
    let Ok(CommandOutput::Partition(p)) = img.apply(i, &re) else {
        panic!()
    };
    // Both old copies stay, in sync and leading, while 3 and 4 copy the log.
    assert_eq!(p.replicas, vec![3, 4, 1, 2]);
    assert_eq!(p.target_replicas, Some(vec![3, 4]));
    assert_eq!(p.original_replicas, Some(vec![1, 2]));
    assert_eq!(
        (p.adding_replicas(), p.removing_replicas()),
        (vec![3, 4], vec![1, 2])
    );
    assert_eq!(
        (p.isr.clone(), p.leader, p.leader_epoch),
        (vec![1, 2], 1, 0)
    );
    assert_eq!(img.reassigning(), vec![("t".to_string(), 0)]);
    assert!(
        img.under_replicated().is_empty(),
        "2 of 2 target copies in sync"
    );
    let alter = |p: &PartitionState, new_isr: Vec<i32>| Command::AlterPartition {
        topic: "t".into(),
        partition: 0,
        leader_id: p.leader,
        leader_epoch: p.leader_epoch,
        partition_epoch: p.partition_epoch,
        new_isr,
    };
    // 3 catches up: still moving (4 is not in sync).
    i += 1;
    let Ok(CommandOutput::Partition(p)) = img.apply(i, &alter(&p, vec![1, 2, 3])) else {
        panic!()
    };
    assert_eq!(p.target_replicas, Some(vec![3, 4]));
    assert_eq!(p.leader, 1);
    // A broker can't be removed while it holds a replica, even a departing one.
    i += 1;
    img.apply(i, &Command::FenceBroker { node_id: 2 }).ok();
    let p = part(&img, "t", 0).clone();
    assert_eq!(p.isr, vec![1, 3]);
    i += 1;
    let r = img.apply(i, &Command::UnregisterBroker { node_id: 2 });
    assert!(
        matches!(&r, Err(CommandError::InvalidRequest(m)) if m.contains("t-0")),
        "{r:?}"
    );
    // 4 catches up: the move completes, the old replicas go, 3 leads under a new epoch.
    i += 1;
    let Ok(CommandOutput::Partition(p)) = img.apply(i, &alter(&p, vec![1, 3, 4])) else {
        panic!()
    };
    assert_eq!(p.replicas, vec![3, 4]);
    assert_eq!(p.isr, vec![3, 4]);
    assert_eq!(p.target_replicas, None);
    assert_eq!(p.original_replicas, None);
    assert!(p.adding_replicas().is_empty() && p.removing_replicas().is_empty());
    assert_eq!((p.leader, p.leader_epoch), (3, 1));
    assert!(img.reassigning().is_empty());
    // Now 2 holds nothing and is fenced: it can be removed; a live one cannot.
    i += 1;
    assert_eq!(
        img.apply(i, &Command::UnregisterBroker { node_id: 2 }),
        Ok(CommandOutput::Done)
    );
    assert!(!img.brokers.contains_key(&2));
    i += 1;
    let r = img.apply(i, &Command::UnregisterBroker { node_id: 1 });
    assert!(
        matches!(&r, Err(CommandError::InvalidRequest(m)) if m.contains("alive")),
        "{r:?}"
    );
    i += 1;
    assert_eq!(
        img.apply(i, &Command::UnregisterBroker { node_id: 2 }),
        Err(CommandError::BrokerNotAvailable(2))
    );
}

#[test]
fn reassign_back_to_the_in_sync_set_cancels_a_move() {
    let (mut img, i) = cluster(4);
    img.apply(i + 1, &create("t", 1, 2)).ok();
    img.apply(i + 2, &re(vec![3, 4])).ok();
    let Ok(CommandOutput::Partition(p)) = img.apply(i + 3, &re(vec![1, 2])) else {
        panic!()
    };
    assert_eq!(p.replicas, vec![1, 2]);
    assert_eq!((p.target_replicas, p.original_replicas), (None, None));
    assert_eq!((p.leader, p.leader_epoch, p.partition_epoch), (1, 0, 2));
}

#[test]
fn a_move_altered_in_flight_keeps_its_origin() {
    let (mut img, i) = cluster(5);
    img.apply(i + 1, &create("t", 1, 2)).ok();
    img.apply(i + 2, &re(vec![3, 4])).ok();
    // Retargeted before 3 and 4 caught up: 2 stays, 3 goes, 5 comes.
    let Ok(CommandOutput::Partition(p)) = img.apply(i + 3, &re(vec![2, 4, 5])) else {
        panic!()
    };
    assert_eq!(p.replicas, vec![2, 4, 5, 3, 1]);
    assert_eq!(p.original_replicas, Some(vec![1, 2]));
    assert_eq!(p.adding_replicas(), vec![4, 5]);
    assert_eq!(p.removing_replicas(), vec![3, 1]);
    // Cancelling restores the origin in its order; both of its copies are in sync.
    let Ok(CommandOutput::Partition(p)) = img.apply(i + 4, &re(vec![1, 2])) else {
        panic!()
    };
    assert_eq!((p.replicas, p.isr, p.leader), (vec![1, 2], vec![1, 2], 1));
    assert_eq!((p.target_replicas, p.original_replicas), (None, None));
}

#[test]
fn a_cancel_reverts_at_once_even_when_an_origin_replica_is_out_of_sync() {
    let (mut img, mut i) = cluster(4);
    i += 1;
    img.apply(i, &create("t", 1, 2)).ok();
    let cancel = Command::CancelReassignment {
        topic: "t".into(),
        partition: 0,
    };
    i += 1;
    assert_eq!(
        img.apply(i, &cancel),
        Err(CommandError::NoReassignmentInProgress)
    );
    i += 1;
    let Ok(CommandOutput::Partition(p)) = img.apply(i, &re(vec![1, 3])) else {
        panic!()
    };
    // 3 catches up and 2 falls behind: the move would complete at once if
    // it went on; cancelling instead goes back to [1, 2] with 1 in sync.
    i += 1;
    img.apply(i, &alter_isr(&p, vec![1, 3])).ok();
    let p = part(&img, "t", 0).clone();
    assert_eq!(p.target_replicas, None, "3 in sync completes the move");
    i += 1;
    let Ok(CommandOutput::Partition(p)) = img.apply(i, &re(vec![3, 4])) else {
        panic!()
    };
    assert_eq!(p.original_replicas, Some(vec![1, 3]));
    // 1 leaves the ISR (fenced): the origin still has 3 in sync.
    i += 1;
    img.apply(i, &Command::FenceBroker { node_id: 1 }).ok();
    i += 1;
    let Ok(CommandOutput::Partition(p)) = img.apply(i, &cancel) else {
        panic!("{:?}", img.apply(i, &cancel))
    };
    assert_eq!((p.replicas, p.isr, p.leader), (vec![1, 3], vec![3], 3));
    assert_eq!((p.target_replicas, p.original_replicas), (None, None));
    i += 1;
    assert_eq!(
        img.apply(i, &cancel),
        Err(CommandError::NoReassignmentInProgress)
    );
}

#[test]
fn a_cancel_hands_leadership_back_from_an_added_replica_and_never_to_none() {
    let (mut img, mut i) = cluster(4);
    i += 1;
    img.apply(i, &create("t", 1, 2)).ok();
    let cancel = Command::CancelReassignment {
        topic: "t".into(),
        partition: 0,
    };
    i += 1;
    let Ok(CommandOutput::Partition(p)) = img.apply(i, &re(vec![3, 4])) else {
        panic!()
    };
    // 3 catches up; then leader 1 stops: the first in-sync replica in
    // preference order (target first) is 3, an added replica.
    i += 1;
    img.apply(i, &alter_isr(&p, vec![1, 2, 3])).ok();
    i += 1;
    img.apply(i, &Command::FenceBroker { node_id: 1 }).ok();
    let p = part(&img, "t", 0).clone();
    assert_eq!((p.leader, p.isr.clone()), (3, vec![2, 3]));
    i += 1;
    let Ok(CommandOutput::Partition(p)) = img.apply(i, &cancel) else {
        panic!()
    };
    assert_eq!((p.replicas, p.isr, p.leader), (vec![1, 2], vec![2], 2));
    assert!(p.leader_epoch > 0);
    // A move whose origin has no in-sync replica left cannot be cancelled.
    // 3 in sync again, then 2 stops: only an added replica is in sync.
    i += 1;
    let Ok(CommandOutput::Partition(p)) = img.apply(i, &re(vec![3, 4])) else {
        panic!()
    };
    i += 1;
    img.apply(i, &alter_isr(&p, vec![2, 3])).ok();
    i += 1;
    img.apply(i, &Command::FenceBroker { node_id: 2 }).ok();
    assert_eq!(part(&img, "t", 0).isr, vec![3]);
    i += 1;
    let r = img.apply(i, &cancel);
    assert!(
        matches!(r, Err(CommandError::InvalidReplicaAssignment(_))),
        "{r:?}"
    );
    assert!(
        part(&img, "t", 0).target_replicas.is_some(),
        "the move goes on"
    );
}

#[test]
fn configs_partitions_producer_ids_and_delete() {
    let (mut img, i) = cluster(2);
    img.apply(i + 1, &create("t", 1, 2)).ok();
    let mut set = BTreeMap::new();
    set.insert("retention.ms".to_string(), Some("1000".to_string()));
    img.apply(
        i + 2,
        &Command::AlterConfigs {
            name: "t".into(),
            configs: set,
        },
    )
    .ok();
    assert_eq!(img.topics["t"].configs["retention.ms"], "1000");
    let mut unset = BTreeMap::new();
    unset.insert("retention.ms".to_string(), None);
    img.apply(
        i + 3,
        &Command::AlterConfigs {
            name: "t".into(),
            configs: unset,
        },
    )
    .ok();
    assert!(img.topics["t"].configs.is_empty());
    let grow = |count| Command::CreatePartitions {
        name: "t".into(),
        count,
    };
    assert_eq!(
        img.apply(i + 4, &grow(1))
            .err()
            .map(|e| e.error_code().code()),
        Some(37)
    );
    assert!(img.apply(i + 4, &grow(3)).is_ok());
    assert_eq!(img.topics["t"].partitions.len(), 3);
    assert!(img.topics["t"]
        .partitions
        .iter()
        .all(|p| p.replicas.len() == 2));
    let alloc = |count| Command::AllocateProducerIds { count };
    assert_eq!(
        img.apply(i + 5, &alloc(1000)),
        Ok(CommandOutput::ProducerIds {
            first: 0,
            count: 1000
        })
    );
    assert_eq!(
        img.apply(i + 6, &alloc(10)),
        Ok(CommandOutput::ProducerIds {
            first: 1000,
            count: 10
        })
    );
    assert_eq!(
        img.apply(i + 7, &alloc(0))
            .err()
            .map(|e| e.error_code().code()),
        Some(42)
    );
    assert_eq!(img.next_producer_id, 1010);
    assert!(img
        .apply(i + 8, &Command::DeleteTopic { name: "t".into() })
        .is_ok());
    assert_eq!(
        img.apply(i + 9, &Command::DeleteTopic { name: "t".into() })
            .err()
            .map(|e| e.error_code().code()),
        Some(3)
    );
}

/// The model: what must hold whatever the command sequence.
#[derive(Default)]
struct Model {
    topics: BTreeMap<String, usize>,
    next_pid: i64,
}

fn random_command(rng: &mut StdRng, img: &MetadataImage) -> Command {
    let topic = format!("t{}", rng.gen_range(0..4));
    let broker = rng.gen_range(0..6);
    match rng.gen_range(0..12) {
        0 => Command::RegisterBroker {
            node_id: broker,
            kafka_host: "h".into(),
            kafka_port: 9092,
            raft_addr: "h:9093".into(),
            incarnation: rng.gen_range(0..2),
            replica_addr: String::new(),
            endpoints: BTreeMap::new(),
        },
        1 => Command::FenceBroker { node_id: broker },
        2 => Command::UnfenceBroker { node_id: broker },
        3 => Command::SetDraining {
            node_id: broker,
            draining: rng.gen(),
        },
        4 => create(&topic, rng.gen_range(-1..4), rng.gen_range(0..4)),
        5 => Command::DeleteTopic { name: topic },
        6 => Command::CreatePartitions {
            name: topic,
            count: rng.gen_range(0..6),
        },
        7 => {
            // Mostly well-formed ISR changes from the current leader, sometimes stale.
            let p = rng.gen_range(0..3);
            let (leader_id, leader_epoch, partition_epoch, mut isr) = match img.partition(&topic, p)
            {
                Some(s) => (
                    s.leader,
                    s.leader_epoch,
                    s.partition_epoch,
                    s.replicas.clone(),
                ),
                None => (broker, 0, 0, vec![broker]),
            };
            isr.retain(|_| rng.gen_bool(0.7));
            if rng.gen_bool(0.8) && !isr.contains(&leader_id) {
                isr.push(leader_id);
            }
            Command::AlterPartition {
                topic,
                partition: p,
                leader_id,
                leader_epoch: leader_epoch - i32::from(rng.gen_bool(0.1)),
                partition_epoch: partition_epoch - i32::from(rng.gen_bool(0.1)),
                new_isr: isr,
            }
        }
        8 => Command::ElectLeaders {
            partitions: None,
            preferred_only: false,
        },
        9 => Command::ReassignPartition {
            topic,
            partition: rng.gen_range(0..3),
            replicas: (0..rng.gen_range(0..4))
                .map(|_| rng.gen_range(0..6))
                .collect(),
        },
        10 => Command::AllocateProducerIds {
            count: rng.gen_range(-1..5),
        },
        _ => Command::UnregisterBroker { node_id: broker },
    }
}

fn check_invariants(img: &MetadataImage, before: &MetadataImage, seed: u64, step: usize) {
    for (name, t) in &img.topics {
        for (i, p) in t.partitions.iter().enumerate() {
            let ctx = format!("seed {seed} step {step} {name}/{i}: {p:?}");
            assert!(!p.isr.is_empty(), "{ctx}: empty ISR");
            assert!(
                p.isr.iter().all(|r| p.replicas.contains(r)),
                "{ctx}: ISR outside replicas"
            );
            if let Some(target) = &p.target_replicas {
                assert!(
                    p.replicas.starts_with(target),
                    "{ctx}: replicas do not start with the target"
                );
                assert!(
                    target.iter().any(|r| !p.isr.contains(r)),
                    "{ctx}: target in sync but the move did not complete"
                );
            }
            for r in &p.replicas {
                assert!(
                    img.brokers.contains_key(r),
                    "{ctx}: replica {r} unregistered"
                );
            }
            if p.leader != NO_LEADER {
                assert!(p.isr.contains(&p.leader), "{ctx}: leader outside ISR");
                assert!(img.is_live(p.leader), "{ctx}: fenced leader");
            }
            if let Some(old) = before.topics.get(name).filter(|o| o.topic_id == t.topic_id) {
                if let Some(op) = old.partitions.get(i) {
                    assert!(
                        p.leader_epoch >= op.leader_epoch,
                        "{ctx}: leader epoch went back"
                    );
                    assert!(
                        p.partition_epoch >= op.partition_epoch,
                        "{ctx}: partition epoch went back"
                    );
                    if op.leader != p.leader {
                        assert!(
                            p.leader_epoch > op.leader_epoch,
                            "{ctx}: leader changed, same epoch"
                        );
                    }
                    if op != p {
                        assert!(
                            p.partition_epoch > op.partition_epoch,
                            "{ctx}: changed, same partition epoch"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn random_sequences_are_deterministic_and_keep_invariants() {
    for seed in 0..300u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut a = MetadataImage::default();
        let mut b = MetadataImage::default();
        let mut model = Model::default();
        let mut log = Vec::new();
        for step in 0..60 {
            let cmd = random_command(&mut rng, &a);
            let index = step as u64 + 1;
            let before = a.clone();
            let ra = a.apply(index, &cmd);
            let rb = b.apply(index, &cmd);
            assert_eq!(
                ra, rb,
                "seed {seed} step {step}: replicas answered differently"
            );
            assert_eq!(a, b, "seed {seed} step {step}: replicas diverged");
            if ra.is_err() {
                let mut unchanged = before.clone();
                unchanged.applied_index = index;
                assert_eq!(
                    a, unchanged,
                    "seed {seed} step {step}: rejected {cmd:?} changed the image"
                );
            }
            match (&cmd, &ra) {
                (
                    Command::CreateTopic {
                        name, partitions, ..
                    },
                    Ok(_),
                ) => {
                    model.topics.insert(name.clone(), *partitions as usize);
                }
                (Command::DeleteTopic { name }, Ok(_)) => {
                    model.topics.remove(name);
                }
                (Command::CreatePartitions { name, count }, Ok(_)) => {
                    model.topics.insert(name.clone(), *count as usize);
                }
                (Command::AllocateProducerIds { count }, Ok(out)) => {
                    assert_eq!(
                        out,
                        &CommandOutput::ProducerIds {
                            first: model.next_pid,
                            count: *count
                        },
                        "seed {seed} step {step}"
                    );
                    model.next_pid += count;
                }
                _ => {}
            }
            let shape: BTreeMap<String, usize> = a
                .topics
                .iter()
                .map(|(n, t)| (n.clone(), t.partitions.len()))
                .collect();
            assert_eq!(
                shape, model.topics,
                "seed {seed} step {step}: topics differ from the model"
            );
            assert_eq!(
                a.next_producer_id, model.next_pid,
                "seed {seed} step {step}"
            );
            check_invariants(&a, &before, seed, step);
            log.push(cmd);
        }
        // Replaying the log on a snapshot round-trip of an empty image gives the same image.
        let json = serde_json::to_vec(&MetadataImage::default()).expect("encode");
        let mut c: MetadataImage = serde_json::from_slice(&json).expect("decode");
        for (i, cmd) in log.iter().enumerate() {
            let _ = c.apply(i as u64 + 1, cmd);
        }
        assert_eq!(a, c, "seed {seed}: replay differs");
        let round: MetadataImage =
            serde_json::from_slice(&serde_json::to_vec(&a).expect("encode")).expect("decode");
        assert_eq!(a, round, "seed {seed}: snapshot round trip");
    }
}

#[test]
fn replica_addr_is_registered_and_defaults_to_empty_in_old_json() {
    let mut img = MetadataImage::default();
    let r = img.apply(
        1,
        &Command::RegisterBroker {
            node_id: 1,
            kafka_host: "public".into(),
            kafka_port: 19092,
            raft_addr: "b1:9093".into(),
            incarnation: 1,
            replica_addr: "b1:9092".into(),
            endpoints: BTreeMap::new(),
        },
    );
    assert_eq!(r, Ok(CommandOutput::BrokerEpoch(1)));
    assert_eq!(img.brokers[&1].replica_addr, "b1:9092");
    // A new replica address is a new registration (new broker epoch).
    let r = img.apply(
        2,
        &Command::RegisterBroker {
            node_id: 1,
            kafka_host: "public".into(),
            kafka_port: 19092,
            raft_addr: "b1:9093".into(),
            incarnation: 1,
            replica_addr: "b1:9094".into(),
            endpoints: BTreeMap::new(),
        },
    );
    assert_eq!(r, Ok(CommandOutput::BrokerEpoch(2)));
    // Log entries and snapshots written before the field existed still decode.
    let old = r#"{"RegisterBroker":{"node_id":2,"kafka_host":"h","kafka_port":9092,"raft_addr":"h:9093","incarnation":7}}"#;
    let cmd: Command = serde_json::from_str(old).expect("old command");
    assert!(
        matches!(cmd, Command::RegisterBroker { ref replica_addr, .. } if replica_addr.is_empty())
    );
    let old = r#"{"kafka_host":"h","kafka_port":9092,"raft_addr":"h:9093","fenced":false,"draining":false,"incarnation":7,"epoch":3}"#;
    let b: BrokerState = serde_json::from_str(old).expect("old broker state");
    assert_eq!(b.replica_addr, "");
}

#[test]
fn endpoints_are_registered_and_default_to_empty_in_old_json() {
    let reg = |endpoints: BTreeMap<String, String>| Command::RegisterBroker {
        node_id: 1,
        kafka_host: "public".into(),
        kafka_port: 19092,
        raft_addr: "b1:9093".into(),
        incarnation: 1,
        replica_addr: "b1:9092".into(),
        endpoints,
    };
    let amqp = |addr: &str| BTreeMap::from([("amqp".to_string(), addr.to_string())]);
    let mut img = MetadataImage::default();
    let r = img.apply(1, &reg(amqp("b1:5672")));
    assert_eq!(r, Ok(CommandOutput::BrokerEpoch(1)));
    assert_eq!(img.brokers[&1].endpoints, amqp("b1:5672"));
    // The same registration again keeps the epoch.
    let r = img.apply(2, &reg(amqp("b1:5672")));
    assert_eq!(r, Ok(CommandOutput::BrokerEpoch(1)));
    // Changed endpoints are a new registration (new broker epoch).
    let r = img.apply(3, &reg(amqp("b1:5673")));
    assert_eq!(r, Ok(CommandOutput::BrokerEpoch(3)));
    assert_eq!(img.brokers[&1].endpoints, amqp("b1:5673"));
    // Log entries and snapshots written before the field existed still decode.
    let old = r#"{"RegisterBroker":{"node_id":2,"kafka_host":"h","kafka_port":9092,"raft_addr":"h:9093","incarnation":7,"replica_addr":"h:9092"}}"#;
    let cmd: Command = serde_json::from_str(old).expect("old command");
    assert!(matches!(cmd, Command::RegisterBroker { ref endpoints, .. } if endpoints.is_empty()));
    let old = r#"{"kafka_host":"h","kafka_port":9092,"raft_addr":"h:9093","replica_addr":"h:9092","fenced":false,"draining":false,"incarnation":7,"epoch":3}"#;
    let b: BrokerState = serde_json::from_str(old).expect("old broker state");
    assert!(b.endpoints.is_empty());
    // And a broker state round-trips with them.
    let mut b = b;
    b.endpoints = amqp("h:5672");
    let json = serde_json::to_string(&b).expect("encode");
    assert_eq!(
        serde_json::from_str::<BrokerState>(&json).expect("decode"),
        b
    );
}

fn offsets_spec() -> InternalTopic {
    InternalTopic {
        name: "__consumer_offsets".to_string(),
        partitions: 1,
        configs: BTreeMap::from([("cleanup.policy".to_string(), "compact".to_string())]),
    }
}

#[test]
fn an_internal_topic_is_created_only_with_its_full_replication_factor() {
    let spec = offsets_spec();
    let (mut img, mut i) = cluster(2);
    assert_eq!(
        img.internal_topic_plan(&spec, 3),
        InternalTopicPlan::Waiting {
            placeable: 2,
            needed: 3
        }
    );
    register(&mut img, &mut i, 3);
    let InternalTopicPlan::Propose(cmds) = img.internal_topic_plan(&spec, 3) else {
        panic!("three brokers can hold it");
    };
    assert_eq!(
        cmds,
        vec![Command::CreateTopic {
            name: spec.name.clone(),
            partitions: 1,
            replication_factor: 3,
            configs: spec.configs.clone(),
        }]
    );
    for cmd in &cmds {
        i += 1;
        assert!(img.apply(i, cmd).is_ok());
    }
    assert_eq!(part(&img, &spec.name, 0).replicas.len(), 3);
    assert_eq!(img.internal_topic_plan(&spec, 3), InternalTopicPlan::Ready);
}

#[test]
fn an_internal_topic_with_too_few_replicas_grows_keeping_its_own() {
    let spec = offsets_spec();
    let (mut img, mut i) = cluster(3);
    i += 1;
    assert!(img.apply(i, &create(&spec.name, 2, 1)).is_ok());
    let before: Vec<Vec<BrokerId>> = img.topics[&spec.name]
        .partitions
        .iter()
        .map(|p| p.replicas.clone())
        .collect();
    let InternalTopicPlan::Propose(cmds) = img.internal_topic_plan(&spec, 3) else {
        panic!("both partitions can grow");
    };
    assert_eq!(cmds.len(), 2);
    for cmd in &cmds {
        i += 1;
        assert!(img.apply(i, cmd).is_ok(), "{cmd:?}");
    }
    for (p, old) in before.iter().enumerate() {
        let state = part(&img, &spec.name, p as i32);
        let target = state.target_replicas.clone().expect("a move in progress");
        assert_eq!(target.len(), 3);
        assert_eq!(
            target[0], old[0],
            "the current replica stays first (preferred leader)"
        );
        assert_eq!(
            state.leader, old[0],
            "leadership does not move while copies are made"
        );
    }
    // While the copies are made, nothing more is proposed.
    assert!(matches!(
        img.internal_topic_plan(&spec, 3),
        InternalTopicPlan::Waiting { .. }
    ));
}

#[test]
fn an_internal_partition_without_a_live_leader_waits_for_it() {
    let spec = offsets_spec();
    let (mut img, mut i) = cluster(3);
    i += 1;
    assert!(img.apply(i, &create(&spec.name, 1, 1)).is_ok());
    let leader = part(&img, &spec.name, 0).leader;
    i += 1;
    assert!(img
        .apply(i, &Command::FenceBroker { node_id: leader })
        .is_ok());
    assert!(matches!(
        img.internal_topic_plan(&spec, 2),
        InternalTopicPlan::Waiting { .. }
    ));
}

// ---- the AMQP model -------------------------------------------------------------

mod amqp_model {
    use super::*;
    use crate::amqp::{AmqpCommand, Binding, Destination, ExchangeState, QueueState};

    fn queue(topic: &str) -> QueueState {
        QueueState {
            topic: topic.to_owned(),
            durable: true,
            auto_delete: false,
            exclusive_owner: None,
            declared_by: "1:7".to_owned(),
            arguments: Vec::new(),
            attached: false,
        }
    }

    /// A one-node cluster with the virtual host `/`, which objects need.
    fn with_default_vhost() -> (MetadataImage, u64) {
        let (mut img, mut i) = cluster(1);
        i += 1;
        let create = Command::Amqp(AmqpCommand::CreateVhost {
            name: "/".to_owned(),
        });
        img.apply(i, &create).unwrap();
        (img, i)
    }

    fn declare(name: &str) -> Command {
        Command::Amqp(AmqpCommand::DeclareQueue {
            vhost: "/".to_owned(),
            name: name.to_owned(),
            queue: queue(&format!("amqp.{name}")),
            replication_factor: 1,
            topic_configs: BTreeMap::new(),
        })
    }

    fn bind(source: &str, queue: &str) -> Command {
        Command::Amqp(AmqpCommand::Bind {
            vhost: "/".to_owned(),
            binding: Binding {
                source: source.to_owned(),
                destination: Destination::Queue(queue.to_owned()),
                routing_key: "k".to_owned(),
                arguments: Vec::new(),
            },
        })
    }

    #[test]
    fn a_queue_and_its_topic_are_created_and_deleted_together() {
        let (mut img, mut i) = with_default_vhost();
        i += 1;
        assert!(matches!(
            img.apply(i, &declare("jobs")),
            Ok(CommandOutput::TopicCreated { .. })
        ));
        assert_eq!(img.topics["amqp.jobs"].partitions.len(), 1);
        // Declaring again changes nothing (the front end compares properties).
        i += 1;
        assert_eq!(img.apply(i, &declare("jobs")), Ok(CommandOutput::Done));
        i += 1;
        assert_eq!(
            img.apply(i, &bind("amq.direct", "jobs")),
            Ok(CommandOutput::Done)
        );
        assert_eq!(img.vhost("/").unwrap().bindings.len(), 1);
        i += 1;
        let delete = Command::Amqp(AmqpCommand::DeleteQueue {
            vhost: "/".to_owned(),
            name: "jobs".to_owned(),
        });
        assert_eq!(img.apply(i, &delete), Ok(CommandOutput::Done));
        assert!(!img.topics.contains_key("amqp.jobs"));
        let v = img.vhost("/").unwrap();
        assert!(v.queues.is_empty() && v.bindings.is_empty());
        i += 1;
        assert_eq!(
            img.apply(i, &delete),
            Err(CommandError::UnknownTopicOrPartition)
        );
    }

    #[test]
    fn a_stream_attached_to_a_topic_needs_it_and_leaves_it_when_deleted() {
        let (mut img, mut i) = with_default_vhost();
        let attach = Command::Amqp(AmqpCommand::DeclareQueue {
            vhost: "/".to_owned(),
            name: "orders-stream".to_owned(),
            queue: QueueState {
                attached: true,
                ..queue("orders")
            },
            replication_factor: 1,
            topic_configs: BTreeMap::new(),
        });
        i += 1;
        assert_eq!(
            img.apply(i, &attach),
            Err(CommandError::UnknownTopicOrPartition)
        );
        assert!(img.vhost("/").is_none_or(|v| v.queues.is_empty()));
        i += 1;
        img.apply(i, &create("orders", 3, 1)).unwrap();
        i += 1;
        assert_eq!(img.apply(i, &attach), Ok(CommandOutput::Done));
        i += 1;
        let delete = Command::Amqp(AmqpCommand::DeleteQueue {
            vhost: "/".to_owned(),
            name: "orders-stream".to_owned(),
        });
        assert_eq!(img.apply(i, &delete), Ok(CommandOutput::Done));
        assert_eq!(img.topics["orders"].partitions.len(), 3);
        // Deleting the topic over Kafka takes an attached queue with it.
        i += 1;
        img.apply(i, &attach).unwrap();
        i += 1;
        img.apply(
            i,
            &Command::DeleteTopic {
                name: "orders".to_owned(),
            },
        )
        .unwrap();
        assert!(img.vhost("/").unwrap().queues.is_empty());
    }

    #[test]
    fn a_queue_whose_topic_exists_is_refused_and_nothing_changes() {
        let (mut img, mut i) = with_default_vhost();
        i += 1;
        img.apply(i, &create("amqp.taken", 1, 1)).unwrap();
        let before = img.clone();
        i += 1;
        assert_eq!(
            img.apply(i, &declare("taken")),
            Err(CommandError::TopicAlreadyExists)
        );
        assert_eq!(img.amqp, before.amqp);
        assert_eq!(img.topics, before.topics);
    }

    #[test]
    fn deleting_a_queue_topic_over_kafka_deletes_the_queue() {
        let (mut img, mut i) = with_default_vhost();
        i += 1;
        img.apply(i, &declare("q")).unwrap();
        i += 1;
        img.apply(i, &bind("amq.fanout", "q")).unwrap();
        i += 1;
        img.apply(
            i,
            &Command::DeleteTopic {
                name: "amqp.q".to_owned(),
            },
        )
        .unwrap();
        let v = img.vhost("/").unwrap();
        assert!(v.queues.is_empty() && v.bindings.is_empty());
    }

    #[test]
    fn bindings_need_both_ends_and_exchanges_take_theirs_along() {
        let (mut img, mut i) = with_default_vhost();
        i += 1;
        img.apply(i, &declare("q")).unwrap();
        i += 1;
        assert_eq!(
            img.apply(i, &bind("no-such-exchange", "q")),
            Err(CommandError::UnknownTopicOrPartition)
        );
        i += 1;
        assert_eq!(
            img.apply(i, &bind("amq.topic", "no-such-queue")),
            Err(CommandError::UnknownTopicOrPartition)
        );
        i += 1;
        let ex = ExchangeState {
            kind: "direct".to_owned(),
            durable: true,
            auto_delete: false,
            internal: false,
            arguments: Vec::new(),
        };
        img.apply(
            i,
            &Command::Amqp(AmqpCommand::DeclareExchange {
                vhost: "/".to_owned(),
                name: "x".to_owned(),
                exchange: ex,
            }),
        )
        .unwrap();
        i += 1;
        img.apply(i, &bind("x", "q")).unwrap();
        i += 1;
        img.apply(
            i,
            &Command::Amqp(AmqpCommand::DeleteExchange {
                vhost: "/".to_owned(),
                name: "x".to_owned(),
            }),
        )
        .unwrap();
        assert!(img.vhost("/").unwrap().bindings.is_empty());
        assert!(img.vhost("/").unwrap().queues.contains_key("q"));
    }

    #[test]
    fn the_model_survives_a_snapshot_round_trip() {
        let (mut img, mut i) = with_default_vhost();
        i += 1;
        img.apply(i, &declare("q")).unwrap();
        i += 1;
        img.apply(i, &bind("amq.direct", "q")).unwrap();
        let json = serde_json::to_string(&img).unwrap();
        let back: MetadataImage = serde_json::from_str(&json).unwrap();
        assert_eq!(back, img);
        // An image from before AMQP existed still loads.
        let mut old: serde_json::Value = serde_json::from_str(&json).unwrap();
        old.as_object_mut().unwrap().remove("amqp");
        let loaded: MetadataImage = serde_json::from_value(old).unwrap();
        assert!(loaded.amqp.vhosts.is_empty());
    }
}

// ---- users, virtual hosts and permissions ---------------------------------------

mod access {
    use super::*;
    use crate::access::{AccessCommand, Permission};
    use crate::amqp::{AmqpCommand, QueueState};
    use sluice_auth::Credential;

    // A cheap credential: these tests are about the model, not the hash.
    fn credential(password: &str) -> Credential {
        Credential::derive_with(password.as_bytes(), b"salt".to_vec(), 1)
    }

    fn initialize(user: &str) -> Command {
        Command::Access(AccessCommand::Initialize {
            user: user.to_owned(),
            credential: credential("guest"),
            vhost: "/".to_owned(),
        })
    }

    fn amqp(cmd: AmqpCommand) -> Command {
        Command::Amqp(cmd)
    }

    #[test]
    fn the_default_user_and_vhost_are_created_once_so_deleting_them_sticks() {
        let (mut img, mut i) = cluster(1);
        assert!(!img.may_use_vhost("guest", "/"));
        i += 1;
        img.apply(i, &initialize("guest")).unwrap();
        assert!(img.access.initialized);
        assert!(img.may_use_vhost("guest", "/"));
        assert!(img.access.users["guest"].credential.verify(b"guest"));
        i += 1;
        img.apply(
            i,
            &Command::Access(AccessCommand::DeleteUser {
                name: "guest".to_owned(),
            }),
        )
        .unwrap();
        i += 1;
        img.apply(
            i,
            &amqp(AmqpCommand::DeleteVhost {
                name: "/".to_owned(),
            }),
        )
        .unwrap();
        // Another node proposing the default again (it restarted) changes nothing.
        i += 1;
        assert_eq!(img.apply(i, &initialize("guest")), Ok(CommandOutput::Done));
        assert!(img.access.users.is_empty() && img.amqp.vhosts.is_empty());
        // An image from before users existed loads as not yet initialized, and
        // keeps the vhost its objects were declared in.
        let mut old = MetadataImage::default();
        old.amqp.vhosts.insert("/".to_owned(), Default::default());
        let mut json: serde_json::Value = serde_json::to_value(&old).unwrap();
        json.as_object_mut().unwrap().remove("access");
        let mut loaded: MetadataImage = serde_json::from_value(json).unwrap();
        assert!(!loaded.access.initialized);
        loaded.apply(1, &initialize("guest")).unwrap();
        assert!(loaded.may_use_vhost("guest", "/"));
    }

    #[test]
    fn a_user_or_vhost_deleted_and_created_again_is_another_one() {
        let (mut img, mut i) = cluster(1);
        let put = |name: &str, password: &str| {
            Command::Access(AccessCommand::PutUser {
                name: name.to_owned(),
                credential: credential(password),
                tags: Default::default(),
            })
        };
        let vhost = |create: bool| {
            let name = "tenant".to_owned();
            amqp(if create {
                AmqpCommand::CreateVhost { name }
            } else {
                AmqpCommand::DeleteVhost { name }
            })
        };
        i += 1;
        img.apply(i, &put("ann", "one")).unwrap();
        i += 1;
        img.apply(i, &vhost(true)).unwrap();
        let (user_since, vhost_since) = (
            img.access.users["ann"].since,
            img.amqp.vhosts["tenant"].since,
        );
        // A password change or a repeated create is the same user and vhost.
        i += 1;
        img.apply(i, &put("ann", "two")).unwrap();
        i += 1;
        img.apply(i, &vhost(true)).unwrap();
        assert_eq!(img.access.users["ann"].since, user_since);
        assert_eq!(img.amqp.vhosts["tenant"].since, vhost_since);
        // Deleted and created again: another one.
        for cmd in [
            Command::Access(AccessCommand::DeleteUser {
                name: "ann".to_owned(),
            }),
            put("ann", "two"),
            vhost(false),
            vhost(true),
        ] {
            i += 1;
            img.apply(i, &cmd).unwrap();
        }
        assert_ne!(img.access.users["ann"].since, user_since);
        assert_ne!(img.amqp.vhosts["tenant"].since, vhost_since);
    }

    #[test]
    fn an_older_log_still_declares_into_the_default_vhost_until_it_is_initialized() {
        let (mut img, mut i) = cluster(1);
        let declare = amqp(AmqpCommand::DeclareExchange {
            vhost: "/".to_owned(),
            name: "x".to_owned(),
            exchange: crate::amqp::ExchangeState {
                kind: "direct".to_owned(),
                durable: true,
                auto_delete: false,
                internal: false,
                arguments: Vec::new(),
            },
        });
        // Replayed from an earlier release's log: `/` was never created.
        i += 1;
        img.apply(i, &declare).unwrap();
        assert!(img.vhost("/").unwrap().exchanges.contains_key("x"));
        i += 1;
        img.apply(i, &initialize("guest")).unwrap();
        assert!(img.vhost("/").unwrap().exchanges.contains_key("x"), "kept");
        // Once initialized, a deleted `/` stays deleted.
        i += 1;
        img.apply(
            i,
            &amqp(AmqpCommand::DeleteVhost {
                name: "/".to_owned(),
            }),
        )
        .unwrap();
        i += 1;
        assert!(matches!(
            img.apply(i, &declare),
            Err(CommandError::NotFound(_))
        ));
    }

    #[test]
    fn objects_live_only_in_a_vhost_that_exists_and_go_with_it() {
        let (mut img, mut i) = cluster(1);
        let declare = amqp(AmqpCommand::DeclareQueue {
            vhost: "v1".to_owned(),
            name: "jobs".to_owned(),
            queue: QueueState {
                topic: "amqp.v1..jobs".to_owned(),
                durable: true,
                auto_delete: false,
                exclusive_owner: None,
                declared_by: "1:7".to_owned(),
                arguments: Vec::new(),
                attached: false,
            },
            replication_factor: 1,
            topic_configs: BTreeMap::new(),
        });
        i += 1;
        assert!(matches!(
            img.apply(i, &declare),
            Err(CommandError::NotFound(_))
        ));
        assert!(
            !img.topics.contains_key("amqp.v1..jobs"),
            "no topic for a refused queue"
        );
        i += 1;
        img.apply(
            i,
            &amqp(AmqpCommand::CreateVhost {
                name: "v1".to_owned(),
            }),
        )
        .unwrap();
        i += 1;
        img.apply(i, &declare).unwrap();
        assert!(img.topics.contains_key("amqp.v1..jobs"));
        i += 1;
        img.apply(i, &initialize("guest")).unwrap();
        i += 1;
        img.apply(
            i,
            &Command::Access(AccessCommand::SetPermission {
                user: "guest".to_owned(),
                vhost: "v1".to_owned(),
                permission: Permission::full(),
            }),
        )
        .unwrap();
        assert!(img.may_use_vhost("guest", "v1"));
        i += 1;
        img.apply(
            i,
            &amqp(AmqpCommand::DeleteVhost {
                name: "v1".to_owned(),
            }),
        )
        .unwrap();
        assert!(img.vhost("v1").is_none());
        assert!(
            !img.topics.contains_key("amqp.v1..jobs"),
            "the queue's topic goes too"
        );
        assert!(!img.access.users["guest"].permissions.contains_key("v1"));
        assert!(
            img.may_use_vhost("guest", "/"),
            "other vhosts are untouched"
        );
        i += 1;
        assert!(matches!(
            img.apply(
                i,
                &amqp(AmqpCommand::DeleteVhost {
                    name: "v1".to_owned()
                })
            ),
            Err(CommandError::NotFound(_))
        ));
    }

    #[test]
    fn a_password_change_keeps_permissions_and_unknown_names_are_refused() {
        let (mut img, mut i) = cluster(1);
        i += 1;
        img.apply(i, &initialize("guest")).unwrap();
        let put = |pw: &str| {
            Command::Access(AccessCommand::PutUser {
                name: "alice".to_owned(),
                credential: credential(pw),
                tags: Default::default(),
            })
        };
        i += 1;
        img.apply(i, &put("one")).unwrap();
        let grant = |user: &str, vhost: &str| {
            Command::Access(AccessCommand::SetPermission {
                user: user.to_owned(),
                vhost: vhost.to_owned(),
                permission: Permission::full(),
            })
        };
        i += 1;
        img.apply(i, &grant("alice", "/")).unwrap();
        i += 1;
        img.apply(i, &put("two")).unwrap();
        let alice = &img.access.users["alice"];
        assert!(alice.credential.verify(b"two") && !alice.credential.verify(b"one"));
        assert!(img.may_use_vhost("alice", "/"));
        i += 1;
        assert!(matches!(
            img.apply(i, &grant("bob", "/")),
            Err(CommandError::NotFound(_))
        ));
        i += 1;
        assert!(matches!(
            img.apply(i, &grant("alice", "nope")),
            Err(CommandError::NotFound(_))
        ));
        i += 1;
        let bad = Command::Access(AccessCommand::PutUser {
            name: String::new(),
            credential: credential("x"),
            tags: Default::default(),
        });
        assert!(matches!(
            img.apply(i, &bad),
            Err(CommandError::InvalidRequest(_))
        ));
        i += 1;
        img.apply(
            i,
            &Command::Access(AccessCommand::ClearPermission {
                user: "alice".to_owned(),
                vhost: "/".to_owned(),
            }),
        )
        .unwrap();
        assert!(!img.may_use_vhost("alice", "/"));
        assert!(img.access.users.contains_key("alice"));
    }
}

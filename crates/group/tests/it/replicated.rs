//! The coordinator and its leadership of the offsets partition: batches are
//! stamped with the leader epoch, replayed by the next leadership, refused once
//! the leadership ends or the coordinator is closed.

use super::*;

struct Cluster {
    _dir: TempDir,
    store: Arc<Store>,
}

fn cluster() -> Cluster {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_store(dir.path());
    store
        .create_topic(TOPIC, PARTITIONS, &BTreeMap::new(), false)
        .expect("create topic");
    Cluster { _dir: dir, store }
}

/// A coordinator leading the offsets partition in `epoch`; only "events"
/// exists as far as the image is concerned. The term ends the leadership.
async fn open(c: &Cluster, epoch: i32, config: GroupConfig) -> (Arc<GroupCoordinator>, Arc<Term>) {
    let (leadership, term) = offsets_leadership(&c.store, epoch);
    let offsets = OffsetsLog {
        leadership,
        partition_exists: Arc::new(|topic, partition| {
            topic == TOPIC && (0..PARTITIONS as i32).contains(&partition)
        }),
        catalog: Arc::new(crate::StoreCatalog(c.store.clone())),
    };
    let coord = GroupCoordinator::open(config, offsets).await.expect("open");
    (coord, term)
}

#[tokio::test]
async fn commits_are_stamped_replayed_and_refused_after_close() {
    let c = cluster();
    let (coord, _) = open(&c, 7, config(0)).await;
    let r = commit(&coord, "g", -1, "", TOPIC, &[(0, 42, 3, Some("m"))]).await;
    assert_eq!(commit_errors(&r), vec![0]);
    let offsets = c
        .store
        .partition(sluice_vocab::internal::OFFSETS_TOPIC, 0)
        .expect("partition");
    assert_eq!(
        offsets.end_offset_for_epoch(7),
        (7, 1),
        "stamped with the leader epoch"
    );

    // A new leadership replays what the old one committed.
    coord.close();
    let r = commit(&coord, "g", -1, "", TOPIC, &[(0, 43, 3, None)]).await;
    assert_eq!(commit_errors(&r), vec![code(ErrorCode::NotCoordinator)]);
    let (again, term) = open(&c, 8, config(0)).await;
    assert_eq!(
        fetched(&fetch(&again, "g", TOPIC, Some(&[0])).await),
        vec![(TOPIC.to_owned(), 0, 42, 3, "m".to_owned(), 0)]
    );

    // A coordinator that no longer leads writes nothing, even before close.
    term.end();
    let end = offsets.log_end_offset();
    let r = commit(&again, "g", -1, "", TOPIC, &[(1, 5, 3, None)]).await;
    assert_eq!(commit_errors(&r), vec![code(ErrorCode::NotCoordinator)]);
    assert_eq!(offsets.log_end_offset(), end);
}

#[tokio::test]
async fn topic_existence_comes_from_the_caller() {
    let c = cluster();
    let (coord, _) = open(&c, 0, config(0)).await;
    let r = commit(&coord, "g", -1, "", "elsewhere", &[(0, 1, 0, None)]).await;
    assert_eq!(
        commit_errors(&r),
        vec![code(ErrorCode::UnknownTopicOrPartition)]
    );
}

#[tokio::test]
async fn close_answers_waiting_joins() {
    let c = cluster();
    // An initial rebalance delay keeps the first member's join waiting.
    let (slow, _) = open(&c, 1, config(60_000)).await;
    let first = slow
        .join_group_with_client(
            join_request("g", "", None, 10_000, 10_000, b"x"),
            JOIN_V,
            "c",
            "/127.0.0.1",
        )
        .await;
    assert_eq!(first.error_code, code(ErrorCode::MemberIdRequired));
    let waiting = {
        let slow = slow.clone();
        let member = first.member_id.to_string();
        tokio::spawn(async move {
            slow.join_group_with_client(
                join_request("g", &member, None, 10_000, 10_000, b"x"),
                JOIN_V,
                "c",
                "/127.0.0.1",
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !waiting.is_finished(),
        "the join waits for the rebalance delay"
    );
    slow.close();
    let resp = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("answered")
        .expect("task");
    assert_eq!(resp.error_code, code(ErrorCode::NotCoordinator));
    // New joins are refused at once.
    let late = slow
        .join_group_with_client(
            join_request("h", "", None, 10_000, 10_000, b"x"),
            JOIN_V,
            "c",
            "/127.0.0.1",
        )
        .await;
    assert_eq!(late.error_code, code(ErrorCode::NotCoordinator));
}

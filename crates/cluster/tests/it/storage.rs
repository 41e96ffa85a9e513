//! Durable Raft storage: openraft's own storage conformance suite, torn-tail recovery,
//! truncation, purge and snapshots across reopening.

use std::fs::OpenOptions;
use std::io::Write;

use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{
    CommittedLeaderId, Entry, EntryPayload, LogId, RaftLogReader, RaftSnapshotBuilder,
    StorageError, Vote,
};
use sluice_cluster::store::{LogStore, StateMachineStore};
use sluice_cluster::{Command, NodeId, TypeConfig};
use tempfile::TempDir;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError<NodeId>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = LogStore::open(dir.path()).expect("open log");
        let sm = StateMachineStore::open(dir.path()).expect("open sm");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).expect("openraft storage suite");
}

fn log_id(term: u64, index: u64) -> LogId<NodeId> {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn entry(term: u64, index: u64) -> Entry<TypeConfig> {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(Command::AllocateProducerIds {
            count: index as i64,
        }),
    }
}

async fn indexes(log: &mut LogStore) -> Vec<u64> {
    log.try_get_log_entries(0..u64::MAX)
        .await
        .expect("read")
        .iter()
        .map(|e| e.log_id.index)
        .collect()
}

#[tokio::test]
async fn torn_tail_is_cut_and_appends_continue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = LogStore::open(dir.path()).expect("open");
    log.blocking_append((1..=5).map(|i| entry(1, i)))
        .await
        .expect("append");
    drop(log);
    // kill -9 in the middle of the next append: half a record at the end.
    let path = dir.path().join("log");
    let full = std::fs::metadata(&path).expect("stat").len();
    {
        let mut f = OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open file");
        f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, b'{', b'"'])
            .expect("write torn tail");
    }
    let mut log = LogStore::open(dir.path()).expect("reopen");
    assert_eq!(indexes(&mut log).await, vec![1, 2, 3, 4, 5]);
    assert_eq!(
        std::fs::metadata(&path).expect("stat").len(),
        full,
        "torn tail truncated on disk"
    );
    log.blocking_append([entry(1, 6)])
        .await
        .expect("append after recovery");
    drop(log);

    // A flipped byte inside the last record: its CRC fails, it is dropped.
    let mut bytes = std::fs::read(&path).expect("read");
    let last = bytes.len() - 3;
    bytes[last] ^= 0xff;
    std::fs::write(&path, &bytes).expect("write");
    let mut log = LogStore::open(dir.path()).expect("reopen");
    assert_eq!(indexes(&mut log).await, vec![1, 2, 3, 4, 5]);
    let state = log.get_log_state().await.expect("state");
    assert_eq!(state.last_log_id, Some(log_id(1, 5)));
}

#[tokio::test]
async fn truncate_purge_vote_and_committed_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = LogStore::open(dir.path()).expect("open");
    log.blocking_append((1..=10).map(|i| entry(1, i)))
        .await
        .expect("append");
    // A divergent suffix from an old term is replaced by the new leader's entries.
    log.truncate(log_id(1, 8)).await.expect("truncate");
    log.blocking_append((8..=9).map(|i| entry(2, i)))
        .await
        .expect("append");
    log.purge(log_id(1, 3)).await.expect("purge");
    let vote = Vote::new_committed(2, 2);
    log.save_vote(&vote).await.expect("vote");
    log.save_committed(Some(log_id(2, 8)))
        .await
        .expect("committed");
    drop(log);

    let mut log = LogStore::open(dir.path()).expect("reopen");
    assert_eq!(indexes(&mut log).await, vec![4, 5, 6, 7, 8, 9]);
    let ids = log.log_ids();
    assert_eq!(ids.last(), Some(&log_id(2, 9)));
    assert_eq!(
        ids[4],
        log_id(2, 8),
        "the new term's entry, not the truncated one"
    );
    let state = log.get_log_state().await.expect("state");
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 3)));
    assert_eq!(state.last_log_id, Some(log_id(2, 9)));
    assert_eq!(log.read_vote().await.expect("vote"), Some(vote));
    assert_eq!(
        log.read_committed().await.expect("committed"),
        Some(log_id(2, 8))
    );
    // Purging everything leaves an empty log that still knows where it ends.
    log.purge(log_id(2, 9)).await.expect("purge all");
    drop(log);
    let mut log = LogStore::open(dir.path()).expect("reopen");
    assert!(indexes(&mut log).await.is_empty());
    assert_eq!(
        log.get_log_state().await.expect("state").last_log_id,
        Some(log_id(2, 9))
    );
}

#[tokio::test]
async fn snapshot_restores_the_image_on_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sm = StateMachineStore::open(dir.path()).expect("open");
    let results = sm.apply((1..=4).map(|i| entry(1, i))).await.expect("apply");
    assert_eq!(results.len(), 4);
    let img = sm.image();
    assert_eq!(img.next_producer_id, 1 + 2 + 3 + 4);
    assert_eq!(img.applied_index, 4);
    let mut builder = sm.get_snapshot_builder().await;
    let snap = builder.build_snapshot().await.expect("snapshot");
    assert_eq!(snap.meta.last_log_id, Some(log_id(1, 4)));
    drop(sm);

    let mut sm = StateMachineStore::open(dir.path()).expect("reopen");
    assert_eq!(*sm.image(), *img);
    let (applied, _) = sm.applied_state().await.expect("applied");
    assert_eq!(applied, Some(log_id(1, 4)));
    let current = sm
        .get_current_snapshot()
        .await
        .expect("current")
        .expect("a snapshot");
    assert_eq!(current.meta.last_log_id, Some(log_id(1, 4)));

    // Installing a received snapshot replaces the image and is durable.
    let mut other = StateMachineStore::open(&dir.path().join("other")).expect("open other");
    let rx = other.subscribe();
    other
        .install_snapshot(&current.meta, current.snapshot)
        .await
        .expect("install");
    assert_eq!(*other.image(), *img);
    assert!(
        rx.has_changed().expect("channel open"),
        "watchers see the installed image"
    );
    drop(other);
    let other = StateMachineStore::open(&dir.path().join("other")).expect("reopen other");
    assert_eq!(*other.image(), *img);
}

//! Durable Raft storage in `<data_dir>/raft/`: the log, the vote, the committed log id and
//! the last snapshot of the [`MetadataImage`].
//!
//! Files:
//! - `log`: records `[len u32 LE][crc32c u32 LE][JSON entry]`, consecutive indexes. An
//!   append is written and fdatasync'd before Raft hears it is persisted. On open, the
//!   file is read up to the first record whose length, checksum, JSON or index does not
//!   check (a torn tail after kill -9) and cut there.
//! - `vote.json`, `committed.json`, `purged.json`, `snapshot.json`: replaced atomically
//!   (temporary file, fsync, rename, fsync of the directory).
//!
//! The metadata log is small (it is purged after every snapshot), so every live entry is
//! also kept in memory; reads never touch the disk.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io::{Cursor, Read, Seek, SeekFrom, Write};
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, LogState, OptionalSend, RaftLogReader,
    RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError, StorageIOError, StoredMembership,
    Vote,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::image::{CommandOutput, CommandResult, MetadataImage};
use crate::{NodeId, TypeConfig};

/// Largest log record accepted when reading the log back (a length above it is a torn or
/// corrupt tail, not an allocation request).
const MAX_RECORD: u32 = 64 * 1024 * 1024;
const RECORD_HEADER: usize = 8;

type StoreResult<T> = Result<T, StorageError<NodeId>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the data half-written in a way the
    // next holder could not see: every mutation is finished before I/O errors return.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn io_write(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_logs(AnyError::new(&e)).into()
}

/// Writes `bytes` to `dir/name` atomically and durably.
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> std::io::Result<Option<T>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn encode_record(entry: &Entry<TypeConfig>, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
    let payload = serde_json::to_vec(entry)?;
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(())
}

/// Parses records from `buf`; returns the entries with their file offsets and the length
/// of the valid prefix. Stops at the first record that does not check.
fn decode_records(buf: &[u8]) -> (Vec<(u64, Entry<TypeConfig>)>, usize) {
    let mut out: Vec<(u64, Entry<TypeConfig>)> = Vec::new();
    let mut pos = 0usize;
    while let Some(header) = buf.get(pos..pos + RECORD_HEADER) {
        let mut len4 = [0u8; 4];
        let mut crc4 = [0u8; 4];
        len4.copy_from_slice(&header[..4]);
        crc4.copy_from_slice(&header[4..]);
        let len = u32::from_le_bytes(len4);
        if len > MAX_RECORD {
            break;
        }
        let start = pos + RECORD_HEADER;
        let Some(payload) = buf.get(start..start + len as usize) else {
            break;
        };
        if crc32c::crc32c(payload) != u32::from_le_bytes(crc4) {
            break;
        }
        let Ok(entry) = serde_json::from_slice::<Entry<TypeConfig>>(payload) else {
            break;
        };
        if let Some((_, prev)) = out.last() {
            if entry.log_id.index != prev.log_id.index + 1 {
                break;
            }
        }
        out.push((pos as u64, entry));
        pos = start + len as usize;
    }
    (out, pos)
}

struct LogInner {
    dir: PathBuf,
    file: File,
    /// index -> (file offset of its record, entry)
    entries: BTreeMap<u64, (u64, Entry<TypeConfig>)>,
    file_len: u64,
    last_purged: Option<LogId<NodeId>>,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
}

impl LogInner {
    fn rewrite(&mut self) -> std::io::Result<()> {
        // Drops purged records from the file: write the survivors to a new file, then
        // rename it over the old one. `purged.json` is already durable, so a crash at
        // any point leaves a log that opens to the same entries.
        let mut buf = Vec::new();
        let mut offsets = BTreeMap::new();
        for (idx, (_, e)) in &self.entries {
            let off = buf.len() as u64;
            encode_record(e, &mut buf).map_err(std::io::Error::other)?;
            offsets.insert(*idx, off);
        }
        let tmp = self.dir.join("log.tmp");
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&buf)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, self.dir.join("log"))?;
        File::open(&self.dir)?.sync_all()?;
        self.file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.dir.join("log"))?;
        self.file_len = buf.len() as u64;
        for (idx, (off, _)) in self.entries.iter_mut() {
            if let Some(o) = offsets.get(idx) {
                *off = *o;
            }
        }
        Ok(())
    }
}

/// The Raft log and vote store ([`RaftLogStorage`]). Cheap to clone; clones share state.
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<LogInner>>,
}

impl LogStore {
    /// Opens (or creates) the log in `dir`, cutting a torn tail.
    pub fn open(dir: &Path) -> std::io::Result<LogStore> {
        fs::create_dir_all(dir)?;
        let path = dir.join("log");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)?;
        let (records, valid) = decode_records(&buf);
        if valid < buf.len() {
            tracing::warn!(
                path = %path.display(),
                valid,
                len = buf.len(),
                "raft log has a torn or corrupt tail; truncating it"
            );
            file.set_len(valid as u64)?;
            file.sync_all()?;
        }
        let last_purged: Option<LogId<NodeId>> = read_json(&dir.join("purged.json"))?;
        let vote = read_json(&dir.join("vote.json"))?;
        let committed = read_json(&dir.join("committed.json"))?;
        let purged_index = last_purged.map(|l| l.index);
        let entries = records
            .into_iter()
            .filter(|(_, e)| purged_index.is_none_or(|p| e.log_id.index > p))
            .map(|(off, e)| (e.log_id.index, (off, e)))
            .collect();
        Ok(LogStore {
            inner: Arc::new(Mutex::new(LogInner {
                dir: dir.to_path_buf(),
                file,
                entries,
                file_len: valid as u64,
                last_purged,
                vote,
                committed,
            })),
        })
    }

    /// Every log id held, in order (for tests and diagnostics).
    pub fn log_ids(&self) -> Vec<LogId<NodeId>> {
        lock(&self.inner)
            .entries
            .values()
            .map(|(_, e)| e.log_id)
            .collect()
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StoreResult<Vec<Entry<TypeConfig>>> {
        let inner = lock(&self.inner);
        let start = match range.start_bound() {
            Bound::Included(s) => Bound::Included(*s),
            Bound::Excluded(s) => Bound::Excluded(*s),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(s) => Bound::Included(*s),
            Bound::Excluded(s) => Bound::Excluded(*s),
            Bound::Unbounded => Bound::Unbounded,
        };
        Ok(inner
            .entries
            .range((start, end))
            .map(|(_, (_, e))| e.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StoreResult<LogState<TypeConfig>> {
        let inner = lock(&self.inner);
        let last = inner
            .entries
            .values()
            .next_back()
            .map(|(_, e)| e.log_id)
            .or(inner.last_purged);
        Ok(LogState {
            last_purged_log_id: inner.last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StoreResult<()> {
        let mut inner = lock(&self.inner);
        let bytes = serde_json::to_vec(vote).map_err(|e| StorageIOError::write_vote(&e))?;
        write_atomic(&inner.dir, "vote.json", &bytes)
            .map_err(|e| StorageIOError::write_vote(&e))?;
        inner.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> StoreResult<Option<Vote<NodeId>>> {
        Ok(lock(&self.inner).vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StoreResult<()> {
        let mut inner = lock(&self.inner);
        let bytes = serde_json::to_vec(&committed).map_err(io_write)?;
        write_atomic(&inner.dir, "committed.json", &bytes).map_err(io_write)?;
        inner.committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> StoreResult<Option<LogId<NodeId>>> {
        Ok(lock(&self.inner).committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StoreResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut inner = lock(&self.inner);
        let mut buf = Vec::new();
        let base = inner.file_len;
        let mut staged = Vec::new();
        for e in entries {
            let off = base + buf.len() as u64;
            encode_record(&e, &mut buf).map_err(io_write)?;
            staged.push((off, e));
        }
        let result = (|| {
            inner.file.seek(SeekFrom::Start(base))?;
            inner.file.write_all(&buf)?;
            // Raft's rule: a follower acknowledges AppendEntries only for durable entries.
            inner.file.sync_data()
        })();
        if let Err(e) = result {
            // Whatever part reached the file is cut again on the next open or append.
            let _ = inner.file.set_len(base);
            return Err(io_write(e));
        }
        inner.file_len = base + buf.len() as u64;
        for (off, e) in staged {
            inner.entries.insert(e.log_id.index, (off, e));
        }
        drop(inner);
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StoreResult<()> {
        let mut inner = lock(&self.inner);
        let Some(off) = inner.entries.get(&log_id.index).map(|(o, _)| *o) else {
            return Ok(());
        };
        inner.file.set_len(off).map_err(io_write)?;
        inner.file.sync_all().map_err(io_write)?;
        inner.file_len = off;
        inner.entries.split_off(&log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StoreResult<()> {
        let mut inner = lock(&self.inner);
        let bytes = serde_json::to_vec(&Some(log_id)).map_err(io_write)?;
        write_atomic(&inner.dir, "purged.json", &bytes).map_err(io_write)?;
        inner.last_purged = Some(log_id);
        let keep = inner.entries.split_off(&(log_id.index + 1));
        inner.entries = keep;
        inner.rewrite().map_err(io_write)?;
        Ok(())
    }
}

/// The snapshot file: the image and the Raft position it reflects.
#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    image: MetadataImage,
}

struct SmInner {
    dir: PathBuf,
    image: Arc<MetadataImage>,
    last_applied: Option<LogId<NodeId>>,
    last_membership: StoredMembership<NodeId, openraft::BasicNode>,
    snapshot: Option<(SnapshotMeta<NodeId, openraft::BasicNode>, Vec<u8>)>,
    snapshots_built: u64,
    tx: watch::Sender<Arc<MetadataImage>>,
}

/// The state machine ([`RaftStateMachine`]): the in-memory [`MetadataImage`], published on
/// a watch channel after every applied batch, and its durable snapshot. Cheap to clone.
#[derive(Clone)]
pub struct StateMachineStore {
    inner: Arc<Mutex<SmInner>>,
}

impl StateMachineStore {
    /// Opens the state machine in `dir`, starting from the last snapshot if any.
    pub fn open(dir: &Path) -> std::io::Result<StateMachineStore> {
        fs::create_dir_all(dir)?;
        let snap: Option<SnapshotFile> = read_json(&dir.join("snapshot.json"))?;
        let (image, last_applied, last_membership, snapshot) = match snap {
            Some(s) => {
                let data = serde_json::to_vec(&s.image).map_err(std::io::Error::other)?;
                (
                    s.image,
                    s.meta.last_log_id,
                    s.meta.last_membership.clone(),
                    Some((s.meta, data)),
                )
            }
            None => (
                MetadataImage::default(),
                None,
                StoredMembership::default(),
                None,
            ),
        };
        let image = Arc::new(image);
        let (tx, _) = watch::channel(image.clone());
        Ok(StateMachineStore {
            inner: Arc::new(Mutex::new(SmInner {
                dir: dir.to_path_buf(),
                image,
                last_applied,
                last_membership,
                snapshot,
                snapshots_built: 0,
                tx,
            })),
        })
    }

    /// A receiver of the applied image.
    pub fn subscribe(&self) -> watch::Receiver<Arc<MetadataImage>> {
        lock(&self.inner).tx.subscribe()
    }

    /// The applied image now.
    pub fn image(&self) -> Arc<MetadataImage> {
        lock(&self.inner).image.clone()
    }
}

fn persist_snapshot(
    dir: &Path,
    meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
    image: &MetadataImage,
) -> std::io::Result<()> {
    let file = SnapshotFile {
        meta: meta.clone(),
        image: image.clone(),
    };
    let bytes = serde_json::to_vec(&file).map_err(std::io::Error::other)?;
    write_atomic(dir, "snapshot.json", &bytes)
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> StoreResult<Snapshot<TypeConfig>> {
        let mut inner = lock(&self.inner);
        inner.snapshots_built += 1;
        let snapshot_id = match inner.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, inner.snapshots_built),
            None => format!("none-{}", inner.snapshots_built),
        };
        let meta = SnapshotMeta {
            last_log_id: inner.last_applied,
            last_membership: inner.last_membership.clone(),
            snapshot_id,
        };
        let data = serde_json::to_vec(&*inner.image)
            .map_err(|e| StorageIOError::read_state_machine(&e))?;
        persist_snapshot(&inner.dir, &meta, &inner.image)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        inner.snapshot = Some((meta.clone(), data.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(
        &mut self,
    ) -> StoreResult<(
        Option<LogId<NodeId>>,
        StoredMembership<NodeId, openraft::BasicNode>,
    )> {
        let inner = lock(&self.inner);
        Ok((inner.last_applied, inner.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StoreResult<Vec<CommandResult>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut inner = lock(&self.inner);
        let mut out = Vec::new();
        let mut image = (*inner.image).clone();
        for entry in entries {
            inner.last_applied = Some(entry.log_id);
            image.applied_index = entry.log_id.index;
            match entry.payload {
                EntryPayload::Blank => out.push(Ok(CommandOutput::Done)),
                EntryPayload::Normal(cmd) => out.push(image.apply(entry.log_id.index, &cmd)),
                EntryPayload::Membership(m) => {
                    inner.last_membership = StoredMembership::new(Some(entry.log_id), m);
                    out.push(Ok(CommandOutput::Done));
                }
            }
        }
        let image = Arc::new(image);
        inner.image = image.clone();
        inner.tx.send_replace(image);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StoreResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StoreResult<()> {
        let data = snapshot.into_inner();
        let image: MetadataImage = serde_json::from_slice(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let mut inner = lock(&self.inner);
        persist_snapshot(&inner.dir, meta, &image)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        inner.last_applied = meta.last_log_id;
        inner.last_membership = meta.last_membership.clone();
        inner.snapshot = Some((meta.clone(), data));
        let image = Arc::new(image);
        inner.image = image.clone();
        inner.tx.send_replace(image);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StoreResult<Option<Snapshot<TypeConfig>>> {
        let inner = lock(&self.inner);
        Ok(inner.snapshot.as_ref().map(|(meta, data)| Snapshot {
            meta: meta.clone(),
            snapshot: Box::new(Cursor::new(data.clone())),
        }))
    }
}

/// Opens both halves of the Raft storage under `dir`.
pub fn open(dir: &Path) -> std::io::Result<(LogStore, StateMachineStore)> {
    Ok((LogStore::open(dir)?, StateMachineStore::open(dir)?))
}

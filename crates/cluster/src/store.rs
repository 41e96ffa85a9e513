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

/// What readers see: every live entry and the log's bounds. Never held across I/O.
struct LogMem {
    /// index -> (file offset of its record, entry)
    entries: BTreeMap<u64, (u64, Entry<TypeConfig>)>,
    file_len: u64,
    last_purged: Option<LogId<NodeId>>,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
}

/// The files. Only the (serialized) write path touches them, on the blocking pool.
struct LogDisk {
    dir: PathBuf,
    file: File,
}

/// Runs file I/O on tokio's blocking pool, so an fsync never stalls a runtime worker.
async fn blocking<T, F>(f: F) -> std::io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> std::io::Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(std::io::Error::other)?
}

/// The Raft log and vote store ([`RaftLogStorage`]). Cheap to clone; clones share state.
///
/// openraft serializes every write call (append, truncate, purge, vote, committed), so
/// the write path needs no ordering of its own; readers only take the memory lock.
#[derive(Clone)]
pub struct LogStore {
    mem: Arc<Mutex<LogMem>>,
    disk: Arc<Mutex<LogDisk>>,
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
            mem: Arc::new(Mutex::new(LogMem {
                entries,
                file_len: valid as u64,
                last_purged,
                vote,
                committed,
            })),
            disk: Arc::new(Mutex::new(LogDisk {
                dir: dir.to_path_buf(),
                file,
            })),
        })
    }

    /// Every log id held, in order (for tests and diagnostics).
    pub fn log_ids(&self) -> Vec<LogId<NodeId>> {
        lock(&self.mem)
            .entries
            .values()
            .map(|(_, e)| e.log_id)
            .collect()
    }

    /// Writes `bytes` atomically to `name` in the log directory.
    async fn write_meta(&self, name: &'static str, bytes: Vec<u8>) -> std::io::Result<()> {
        let disk = self.disk.clone();
        blocking(move || {
            let d = lock(&disk);
            write_atomic(&d.dir, name, &bytes)
        })
        .await
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StoreResult<Vec<Entry<TypeConfig>>> {
        let mem = lock(&self.mem);
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
        Ok(mem
            .entries
            .range((start, end))
            .map(|(_, (_, e))| e.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StoreResult<LogState<TypeConfig>> {
        let mem = lock(&self.mem);
        let last = mem
            .entries
            .values()
            .next_back()
            .map(|(_, e)| e.log_id)
            .or(mem.last_purged);
        Ok(LogState {
            last_purged_log_id: mem.last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StoreResult<()> {
        let bytes = serde_json::to_vec(vote).map_err(|e| StorageIOError::write_vote(&e))?;
        // Durable before returning: a node must not vote twice in one term.
        self.write_meta("vote.json", bytes)
            .await
            .map_err(|e| StorageIOError::write_vote(&e))?;
        lock(&self.mem).vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> StoreResult<Option<Vote<NodeId>>> {
        Ok(lock(&self.mem).vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StoreResult<()> {
        let bytes = serde_json::to_vec(&committed).map_err(io_write)?;
        self.write_meta("committed.json", bytes)
            .await
            .map_err(io_write)?;
        lock(&self.mem).committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> StoreResult<Option<LogId<NodeId>>> {
        Ok(lock(&self.mem).committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StoreResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let base = lock(&self.mem).file_len;
        let mut buf = Vec::new();
        let mut staged = Vec::new();
        for e in entries {
            let off = base + buf.len() as u64;
            encode_record(&e, &mut buf).map_err(io_write)?;
            staged.push((off, e));
        }
        let len = buf.len() as u64;
        let disk = self.disk.clone();
        blocking(move || {
            let mut d = lock(&disk);
            let written = (|| {
                d.file.seek(SeekFrom::Start(base))?;
                d.file.write_all(&buf)?;
                // Raft's rule: a follower acknowledges AppendEntries only for durable
                // entries, and a leader counts only durable copies.
                d.file.sync_data()
            })();
            if written.is_err() {
                // Whatever part reached the file is cut here, or on the next open.
                let _ = d.file.set_len(base);
            }
            written
        })
        .await
        .map_err(io_write)?;
        {
            let mut mem = lock(&self.mem);
            mem.file_len = base + len;
            for (off, e) in staged {
                mem.entries.insert(e.log_id.index, (off, e));
            }
        }
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StoreResult<()> {
        let Some(off) = lock(&self.mem).entries.get(&log_id.index).map(|(o, _)| *o) else {
            return Ok(());
        };
        let disk = self.disk.clone();
        blocking(move || {
            let d = lock(&disk);
            d.file.set_len(off)?;
            d.file.sync_all()
        })
        .await
        .map_err(io_write)?;
        let mut mem = lock(&self.mem);
        mem.file_len = off;
        mem.entries.split_off(&log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StoreResult<()> {
        // 1. Record the purge point durably, so a crash below never resurrects entries.
        let bytes = serde_json::to_vec(&Some(log_id)).map_err(io_write)?;
        self.write_meta("purged.json", bytes)
            .await
            .map_err(io_write)?;
        // 2. Drop the purged entries from memory and re-encode the survivors.
        let (buf, offsets) = {
            let mut mem = lock(&self.mem);
            mem.last_purged = Some(log_id);
            let keep = mem.entries.split_off(&(log_id.index + 1));
            mem.entries = keep;
            let mut buf = Vec::new();
            let mut offsets = BTreeMap::new();
            for (idx, (_, e)) in &mem.entries {
                offsets.insert(*idx, buf.len() as u64);
                encode_record(e, &mut buf).map_err(io_write)?;
            }
            (buf, offsets)
        };
        // 3. Replace the log file by one without them (temp file, fsync, rename, fsync
        //    dir). A crash before the rename leaves the old file, whose purged records
        //    are skipped on open.
        let len = buf.len() as u64;
        let disk = self.disk.clone();
        blocking(move || {
            let mut d = lock(&disk);
            let tmp = d.dir.join("log.tmp");
            {
                let mut f = File::create(&tmp)?;
                f.write_all(&buf)?;
                f.sync_all()?;
            }
            fs::rename(&tmp, d.dir.join("log"))?;
            File::open(&d.dir)?.sync_all()?;
            d.file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(d.dir.join("log"))?;
            Ok(())
        })
        .await
        .map_err(io_write)?;
        let mut mem = lock(&self.mem);
        mem.file_len = len;
        for (idx, (off, _)) in mem.entries.iter_mut() {
            if let Some(o) = offsets.get(idx) {
                *off = *o;
            }
        }
        Ok(())
    }
}

/// The snapshot file: the image and the Raft position it reflects.
#[derive(Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    image: MetadataImage,
}

/// [`SnapshotFile`] for writing, without copying the image.
#[derive(Serialize)]
struct SnapshotFileRef<'a> {
    meta: &'a SnapshotMeta<NodeId, openraft::BasicNode>,
    image: &'a MetadataImage,
}

/// The snapshot file's directory and the log position of the snapshot in it.
struct SnapDisk {
    dir: PathBuf,
    persisted: Option<LogId<NodeId>>,
}

struct SmInner {
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
    disk: Arc<Mutex<SnapDisk>>,
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
                image,
                last_applied,
                last_membership,
                snapshot,
                snapshots_built: 0,
                tx,
            })),
            disk: Arc::new(Mutex::new(SnapDisk {
                dir: dir.to_path_buf(),
                persisted: last_applied,
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

impl StateMachineStore {
    /// Writes the snapshot file unless a newer snapshot is already on disk (a build and
    /// an install may race; the later log position wins).
    async fn persist(
        &self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        image: Arc<MetadataImage>,
    ) -> StoreResult<()> {
        let disk = self.disk.clone();
        let m = meta.clone();
        blocking(move || {
            let mut d = lock(&disk);
            if m.last_log_id < d.persisted {
                return Ok(());
            }
            let file = SnapshotFileRef {
                meta: &m,
                image: &image,
            };
            let bytes = serde_json::to_vec(&file).map_err(std::io::Error::other)?;
            write_atomic(&d.dir, "snapshot.json", &bytes)?;
            d.persisted = m.last_log_id;
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e).into())
    }

    /// Makes this the snapshot served to lagging followers, unless a newer one is.
    fn set_current(&self, meta: &SnapshotMeta<NodeId, openraft::BasicNode>, data: &[u8]) {
        let mut inner = lock(&self.inner);
        let newer = inner
            .snapshot
            .as_ref()
            .is_none_or(|(cur, _)| cur.last_log_id <= meta.last_log_id);
        if newer {
            inner.snapshot = Some((meta.clone(), data.to_vec()));
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> StoreResult<Snapshot<TypeConfig>> {
        // Take a consistent view under the lock; serialize and write outside it, so
        // apply goes on meanwhile (the image is an immutable Arc).
        let (meta, image) = {
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
            (meta, inner.image.clone())
        };
        let data =
            serde_json::to_vec(&*image).map_err(|e| StorageIOError::read_state_machine(&e))?;
        self.persist(&meta, image).await?;
        self.set_current(&meta, &data);
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
        let image = Arc::new(image);
        self.persist(meta, image.clone()).await?;
        self.set_current(meta, &data);
        let mut inner = lock(&self.inner);
        inner.last_applied = meta.last_log_id;
        inner.last_membership = meta.last_membership.clone();
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

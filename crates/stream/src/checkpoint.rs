//! Checkpoints: Flink's asynchronous barrier snapshots, aligned or not.
//!
//! - The coordinator (a thread of [`crate::StreamEnv::execute`]) starts
//!   checkpoint `n` by raising the job's requested id. Each source subtask
//!   sees it between two polls, writes its position and sends a **barrier**
//!   `n` after the records it emitted before.
//! - A subtask with several inputs **aligns**: once input `i` delivered
//!   barrier `n`, what `i` sends next is held back until every other input
//!   (that has not ended) delivered `n` too. Then the state of every link of
//!   its chain reflects exactly the records before the barriers; each link
//!   writes it, the barrier goes downstream, and the subtask acknowledges.
//! - When every subtask of the job acknowledged, the coordinator marks the
//!   checkpoint complete in the store (one atomic step) and tells every
//!   subtask, so transactional sinks commit what they staged for it.
//! - A job that starts where its store holds a complete checkpoint restores
//!   from the latest: sources resume at their positions, operators with
//!   their state. Keyed state is written per key group, so a restored job may
//!   run at another parallelism.
//!
//! - **Unaligned** (when enabled): a subtask with several inputs does not
//!   wait. At the first barrier `n` it writes its state and passes the
//!   barrier on; what its other inputs send until their barriers `n` is
//!   processed and also stored with the checkpoint, and a restore replays
//!   it first. Records at exchanges are serialized for this
//!   ([`crate::StateData`]).
//!
//! A checkpoint cannot complete once a subtask has ended (it would not
//! acknowledge): a bounded job's results after its last checkpoint are
//! committed when the whole job has succeeded.

use std::fs;
use std::hash::Hash;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::keyed::{key_group_range, KeyedState};
use crate::StreamError;

/// Checkpoints are numbered from 1, in the order they were started.
pub type CheckpointId = u64;

/// Where checkpoints are kept (Flink's checkpoint storage). Parts of a
/// checkpoint are put while it runs; it counts only once `complete` made it
/// so, and a reader never sees the parts of one that did not complete.
pub trait CheckpointStore: Send + Sync {
    /// Stores part `name` of checkpoint `id`, durably before it returns.
    fn put(&self, id: CheckpointId, name: &str, bytes: &[u8]) -> Result<(), StreamError>;
    /// Makes checkpoint `id` complete, in one atomic and durable step.
    fn complete(&self, id: CheckpointId) -> Result<(), StreamError>;
    /// The latest complete checkpoint.
    fn latest(&self) -> Result<Option<CheckpointId>, StreamError>;
    /// The parts of complete checkpoint `id` whose names start with `prefix`.
    fn parts(&self, id: CheckpointId, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StreamError>;
    /// Removes every checkpoint but the `keep` latest complete ones, and
    /// the incomplete ones older than those.
    fn prune(&self, keep: usize) -> Result<(), StreamError>;
    /// Removes incomplete checkpoints newer than the latest complete one
    /// (left by a job that stopped mid-checkpoint); called before a job
    /// starts.
    fn discard_incomplete(&self) -> Result<(), StreamError>;
    /// Checkpoint `id` will not complete (it timed out, or a subtask
    /// declined it).
    fn abandoned(&self, id: CheckpointId) {
        let _ = id;
    }
}

/// Checkpoints in a local directory: `chk-<id>/` holds the parts; the file
/// `_complete` in it, written last and renamed into place, marks it
/// complete.
pub struct LocalDirStore {
    dir: PathBuf,
}

const COMPLETE: &str = "_complete";

impl LocalDirStore {
    pub fn new(dir: impl Into<PathBuf>) -> Result<LocalDirStore, StreamError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e))?;
        Ok(LocalDirStore { dir })
    }

    fn chk(&self, id: CheckpointId) -> PathBuf {
        self.dir.join(format!("chk-{id}"))
    }

    /// Every checkpoint directory, with whether it is complete, oldest first.
    fn all(&self) -> Result<Vec<(CheckpointId, bool)>, StreamError> {
        let mut found = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(|e| io_error(&self.dir, e))? {
            let entry = entry.map_err(|e| io_error(&self.dir, e))?;
            let name = entry.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_prefix("chk-"))
                .and_then(|n| n.parse::<CheckpointId>().ok())
            else {
                continue;
            };
            found.push((id, entry.path().join(COMPLETE).exists()));
        }
        found.sort_unstable();
        Ok(found)
    }

    fn remove(&self, id: CheckpointId) -> Result<(), StreamError> {
        let path = self.chk(id);
        fs::remove_dir_all(&path).map_err(|e| io_error(&path, e))
    }
}

/// Writes `bytes` to `path` through a temporary file: fsynced, renamed, the
/// directory fsynced. A crash leaves the old file or the new one.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), StreamError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = fs::File::create(&tmp).map_err(|e| io_error(&tmp, e))?;
    f.write_all(bytes).map_err(|e| io_error(&tmp, e))?;
    f.sync_all().map_err(|e| io_error(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io_error(path, e))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), StreamError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(dir, e))
}

pub(crate) fn io_error(path: &Path, e: std::io::Error) -> StreamError {
    StreamError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

impl CheckpointStore for LocalDirStore {
    fn put(&self, id: CheckpointId, name: &str, bytes: &[u8]) -> Result<(), StreamError> {
        let dir = self.chk(id);
        fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e))?;
        write_durably(&dir.join(name), bytes)
    }

    fn complete(&self, id: CheckpointId) -> Result<(), StreamError> {
        let dir = self.chk(id);
        fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e))?;
        write_durably(&dir.join(COMPLETE), format!("checkpoint {id}\n").as_bytes())
    }

    fn latest(&self) -> Result<Option<CheckpointId>, StreamError> {
        Ok(self
            .all()?
            .into_iter()
            .rev()
            .find(|(_, complete)| *complete)
            .map(|(id, _)| id))
    }

    fn parts(&self, id: CheckpointId, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StreamError> {
        let dir = self.chk(id);
        let mut parts = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| io_error(&dir, e))? {
            let entry = entry.map_err(|e| io_error(&dir, e))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if name.starts_with(prefix) && name != COMPLETE && !name.ends_with(".tmp") {
                let bytes = fs::read(entry.path()).map_err(|e| io_error(&entry.path(), e))?;
                parts.push((name, bytes));
            }
        }
        parts.sort();
        Ok(parts)
    }

    fn prune(&self, keep: usize) -> Result<(), StreamError> {
        let all = self.all()?;
        let complete: Vec<CheckpointId> =
            all.iter().filter(|(_, c)| *c).map(|(id, _)| *id).collect();
        let Some(&oldest_kept) = complete.get(complete.len().saturating_sub(keep.max(1))) else {
            return Ok(());
        };
        for (id, _) in all {
            if id < oldest_kept {
                self.remove(id)?;
            }
        }
        Ok(())
    }

    fn discard_incomplete(&self) -> Result<(), StreamError> {
        let latest = self.latest()?.unwrap_or(0);
        for (id, complete) in self.all()? {
            if !complete && id > latest {
                self.remove(id)?;
            }
        }
        Ok(())
    }
}

/// The id under which subtasks write their state when they end; the job
/// gives the final checkpoint its real id once every subtask has ended.
pub(crate) const FINAL: CheckpointId = CheckpointId::MAX;

/// Parts held in memory: the final checkpoint's, written to the store as
/// one checkpoint when the whole job has succeeded.
#[derive(Default)]
pub(crate) struct FinalParts(Mutex<Vec<(String, Vec<u8>)>>);

impl FinalParts {
    pub fn take(&self) -> Vec<(String, Vec<u8>)> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl CheckpointStore for FinalParts {
    fn put(&self, _: CheckpointId, name: &str, bytes: &[u8]) -> Result<(), StreamError> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name.to_owned(), bytes.to_vec()));
        Ok(())
    }
    fn complete(&self, _: CheckpointId) -> Result<(), StreamError> {
        Ok(())
    }
    fn latest(&self) -> Result<Option<CheckpointId>, StreamError> {
        Ok(None)
    }
    fn parts(&self, _: CheckpointId, _: &str) -> Result<Vec<(String, Vec<u8>)>, StreamError> {
        Ok(Vec::new())
    }
    fn prune(&self, _: usize) -> Result<(), StreamError> {
        Ok(())
    }
    fn discard_incomplete(&self) -> Result<(), StreamError> {
        Ok(())
    }
}

/// How a job checkpoints.
#[derive(Clone)]
pub(crate) struct CheckpointConfig {
    pub interval: Duration,
    pub timeout: Duration,
    pub keep: usize,
    pub store: Arc<dyn CheckpointStore>,
    /// Records a subtask may hold back while it aligns a checkpoint's
    /// barriers; past it the subtask declines the checkpoint instead (or,
    /// with unaligned checkpoints, stops aligning). Also bounds the records
    /// an unaligned checkpoint stores from the channels.
    pub max_alignment_records: usize,
    /// Unaligned checkpoints: how long a subtask aligns before it stops
    /// waiting and stores the records still in flight instead (zero: at
    /// the first barrier). None: always aligned.
    pub unaligned_after: Option<Duration>,
    /// Keyed state goes to changelog topics instead of the checkpoints.
    pub changelog: Option<crate::changelog::KafkaChangelog>,
}

/// A commit a sink left for the end of a successful job.
pub(crate) type Commit = Box<dyn FnOnce() -> Result<(), StreamError> + Send>;

/// One link's state in a checkpoint: named entries, keyed ones cut by key
/// group.
#[derive(Serialize, Deserialize, Default)]
struct LinkState {
    subtask: u32,
    parallelism: u32,
    entries: Vec<Entry>,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    name: String,
    group: Option<u32>,
    bytes: Vec<u8>,
}

pub(crate) fn encode<V: Serialize + ?Sized>(v: &V) -> Result<Vec<u8>, StreamError> {
    postcard::to_allocvec(v).map_err(|e| StreamError::State(format!("cannot encode state: {e}")))
}

pub(crate) fn decode<V: DeserializeOwned>(bytes: &[u8]) -> Result<V, StreamError> {
    postcard::from_bytes(bytes).map_err(|e| StreamError::State(format!("cannot decode state: {e}")))
}

/// Where a checkpoint puts keyed state: into its own parts, into the
/// changelog (whose positions it keeps instead), or both (a savepoint
/// taken with a changelog holds its state itself, so compaction cannot
/// take it away).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeyedTo {
    Checkpoint,
    Changelog,
    Both,
}

/// A key and its value, each encoded on its own.
pub(crate) type EncodedEntry = (Vec<u8>, Vec<u8>);

/// One key group of one named keyed state: what a changelog records (keys
/// and their latest values).
pub(crate) struct LoggedGroup {
    pub name: String,
    pub group: u32,
    pub entries: Vec<EncodedEntry>,
}

/// Where an operator writes its state when a checkpoint passes it.
pub struct StateWriter {
    state: LinkState,
    failed: Option<StreamError>,
    keyed_to: KeyedTo,
    logged: Vec<LoggedGroup>,
}

impl StateWriter {
    /// Keyed state, written per key group (restorable at any parallelism).
    pub fn keyed<K, V>(&mut self, name: &str, state: &KeyedState<K, V>)
    where
        K: Hash + Eq + Serialize,
        V: Serialize,
    {
        for (group, entries) in state.groups() {
            if self.keyed_to != KeyedTo::Changelog && !entries.is_empty() {
                let pairs: Vec<(&K, &V)> = entries.iter().collect();
                self.put(name, Some(group as u32), &pairs);
            }
            if self.keyed_to != KeyedTo::Checkpoint && self.failed.is_none() {
                // Every group, emptied ones too: their keys' removals are
                // changes to record.
                let encoded: Result<Vec<EncodedEntry>, StreamError> = entries
                    .iter()
                    .map(|(k, v)| Ok((encode(k)?, encode(v)?)))
                    .collect();
                match encoded {
                    Ok(entries) => self.logged.push(LoggedGroup {
                        name: name.to_owned(),
                        group: group as u32,
                        entries,
                    }),
                    Err(e) => self.failed = Some(e),
                }
            }
        }
    }

    /// A value of this subtask (operator state, such as a source's position).
    pub fn value<V: Serialize>(&mut self, name: &str, value: &V) {
        self.put(name, None, value);
    }

    fn put<V: Serialize + ?Sized>(&mut self, name: &str, group: Option<u32>, value: &V) {
        if self.failed.is_some() {
            return;
        }
        match encode(value) {
            Ok(bytes) => self.state.entries.push(Entry {
                name: name.to_owned(),
                group,
                bytes,
            }),
            Err(e) => self.failed = Some(e),
        }
    }
}

/// What an operator restores from: the state every subtask of the run that
/// took the checkpoint wrote for it.
pub struct StateReader {
    subtask: usize,
    parallelism: usize,
    max_parallelism: usize,
    previous_parallelism: usize,
    parts: Vec<LinkState>,
    /// Keyed state rebuilt from the changelog: this link's, of the key
    /// groups this subtask owns.
    logged: Vec<LoggedGroup>,
}

impl StateReader {
    /// Restores keyed state: the entries of the key groups this subtask
    /// owns, whichever subtask wrote them.
    pub fn keyed<K, V>(&self, name: &str, into: &mut KeyedState<K, V>) -> Result<(), StreamError>
    where
        K: Hash + Eq + DeserializeOwned,
        V: DeserializeOwned,
    {
        let mine = key_group_range(self.subtask, self.parallelism, self.max_parallelism);
        for part in &self.parts {
            for e in &part.entries {
                match e.group {
                    Some(g) if e.name == name && mine.contains(&(g as usize)) => {
                        for (k, v) in decode::<Vec<(K, V)>>(&e.bytes)? {
                            into.insert(k, v);
                        }
                    }
                    _ => {}
                }
            }
        }
        for logged in self.logged.iter().filter(|l| l.name == name) {
            for (k, v) in &logged.entries {
                into.insert(decode(k)?, decode(v)?);
            }
        }
        Ok(())
    }

    /// The values named `name` of every subtask that wrote one, with the
    /// number of that subtask (in the run that took the checkpoint).
    pub fn values<V: DeserializeOwned>(&self, name: &str) -> Result<Vec<(usize, V)>, StreamError> {
        let mut out = Vec::new();
        for part in &self.parts {
            for e in &part.entries {
                if e.group.is_none() && e.name == name {
                    out.push((part.subtask as usize, decode(&e.bytes)?));
                }
            }
        }
        Ok(out)
    }

    /// The least of the watermarks the subtasks wrote under `name`: where
    /// several subtasks' state meets in one, the least holds for all of it.
    pub(crate) fn least_watermark(&self, name: &str) -> Result<Option<i64>, StreamError> {
        Ok(self.values::<i64>(name)?.into_iter().map(|(_, w)| w).min())
    }

    /// The value this subtask wrote under `name`, when the job runs at the
    /// parallelism it had; an error when that changed (the operator cannot
    /// split its state).
    pub fn own<V: DeserializeOwned>(&self, name: &str) -> Result<Option<V>, StreamError> {
        if self.previous_parallelism != self.parallelism {
            return Err(StreamError::State(format!(
                "'{name}' was written at parallelism {} and cannot be restored at {}",
                self.previous_parallelism, self.parallelism
            )));
        }
        Ok(self
            .values(name)?
            .into_iter()
            .find(|(s, _)| *s == self.subtask)
            .map(|(_, v)| v))
    }

    /// This subtask's number and the parallelism it runs at now.
    pub fn subtask(&self) -> (usize, usize) {
        (self.subtask, self.parallelism)
    }

    /// The parallelism of the run that took the checkpoint.
    pub fn previous_parallelism(&self) -> usize {
        self.previous_parallelism
    }
}

/// Names the part that holds what a stage's subtask received in flight
/// during an unaligned checkpoint.
fn channel_prefix(stage: usize) -> String {
    format!("s{stage}.in.")
}

/// Records an unaligned checkpoint took from a subtask's input channels:
/// each encoded, with its key group when the exchange is keyed.
#[derive(Serialize, Deserialize)]
struct ChannelState {
    subtask: u32,
    records: Vec<(Option<u32>, Vec<u8>)>,
}

/// The subtask's side of a checkpoint or a restore, passed down its chain:
/// each link takes the next link number.
pub(crate) struct Cursor<'a> {
    pub id: CheckpointId,
    store: &'a dyn CheckpointStore,
    stage: usize,
    info: crate::SubtaskInfo,
    link: usize,
    /// Where the bytes written are added up (the checkpoint's size).
    written: Option<&'a AtomicU64>,
    /// Where the links' keyed state goes.
    keyed_to: KeyedTo,
    /// Keyed state the links wrote for the changelog, by link.
    logged: Vec<(usize, LoggedGroup)>,
    /// Keyed state rebuilt from the changelog for a restore, by link.
    restored_log: Vec<(usize, LoggedGroup)>,
    /// Names the parts of something other than the chain's links (the
    /// changelog's own state): `s<stage>.<kind><link>.<subtask>`.
    kind: &'static str,
}

impl<'a> Cursor<'a> {
    pub fn new(
        id: CheckpointId,
        store: &'a dyn CheckpointStore,
        stage: usize,
        info: crate::SubtaskInfo,
    ) -> Cursor<'a> {
        Cursor {
            id,
            store,
            stage,
            info,
            link: 0,
            written: None,
            keyed_to: KeyedTo::Checkpoint,
            logged: Vec::new(),
            restored_log: Vec::new(),
            kind: "l",
        }
    }

    /// Keyed state goes to `to`.
    pub fn keyed_to(mut self, to: KeyedTo) -> Cursor<'a> {
        self.keyed_to = to;
        self
    }

    /// A cursor over the same checkpoint for the changelog's own state,
    /// whose parts are apart from the links'.
    pub fn for_changelog(&self) -> Cursor<'a> {
        Cursor {
            id: self.id,
            store: self.store,
            stage: self.stage,
            info: self.info,
            link: 0,
            written: self.written,
            keyed_to: KeyedTo::Checkpoint,
            logged: Vec::new(),
            restored_log: Vec::new(),
            kind: "log",
        }
    }

    /// Takes the keyed state the links wrote for the changelog.
    pub fn take_logged(&mut self) -> Vec<(usize, LoggedGroup)> {
        std::mem::take(&mut self.logged)
    }

    /// Keyed state rebuilt from the changelog, which the links' readers
    /// hand out as if the checkpoint held it.
    pub fn with_restored_log(mut self, log: Vec<(usize, LoggedGroup)>) -> Cursor<'a> {
        self.restored_log = log;
        self
    }

    fn part_prefix(&self, link: usize) -> String {
        format!("s{}.{}{link}.", self.stage, self.kind)
    }

    /// Adds the size of every part written to `written`.
    pub fn counting_into(mut self, written: &'a AtomicU64) -> Cursor<'a> {
        self.written = Some(written);
        self
    }

    /// Whether this is the final checkpoint, taken as a subtask ends: no
    /// barrier goes downstream (the subtasks there ended or end too).
    pub fn is_final(&self) -> bool {
        self.id == FINAL
    }

    /// The subtask the cursor runs in.
    pub fn subtask_info(&self) -> crate::SubtaskInfo {
        self.info
    }

    /// A link with no state: it takes its number.
    pub fn skip(&mut self) {
        self.link += 1;
    }

    /// A writer for the next link's state.
    pub fn writer(&self) -> StateWriter {
        StateWriter {
            state: LinkState {
                subtask: self.info.index as u32,
                parallelism: self.info.parallelism as u32,
                entries: Vec::new(),
            },
            failed: None,
            keyed_to: self.keyed_to,
            logged: Vec::new(),
        }
    }

    /// Stores what the next link wrote.
    pub fn put(&mut self, w: StateWriter) -> Result<(), StreamError> {
        let link = self.link;
        self.link += 1;
        if let Some(e) = w.failed {
            return Err(e);
        }
        self.logged
            .extend(w.logged.into_iter().map(|group| (link, group)));
        if w.state.entries.is_empty() {
            return Ok(());
        }
        let name = format!("{}{}", self.part_prefix(link), self.info.index);
        let bytes = encode(&w.state)?;
        if let Some(written) = self.written {
            written.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        self.store.put(self.id, &name, &bytes)
    }

    /// Stores the records this subtask received in flight: they were sent
    /// before the checkpoint's barrier and reached the subtask after its
    /// state was written.
    pub fn put_channel(&mut self, records: Vec<(Option<u32>, Vec<u8>)>) -> Result<(), StreamError> {
        if records.is_empty() {
            return Ok(());
        }
        let bytes = encode(&ChannelState {
            subtask: self.info.index as u32,
            records,
        })?;
        if let Some(written) = self.written {
            written.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        let name = format!("{}{}", channel_prefix(self.stage), self.info.index);
        self.store.put(self.id, &name, &bytes)
    }

    /// The in-flight records of this stage's channels that this subtask
    /// takes over, in the order each writer received them: keyed ones by
    /// key group, the others from writer `w` by subtask `w % parallelism`.
    pub fn channel_records(&self) -> Result<Vec<Vec<u8>>, StreamError> {
        let mine = key_group_range(
            self.info.index,
            self.info.parallelism,
            self.info.max_parallelism,
        );
        let parallelism = self.info.parallelism.max(1);
        let mut out = Vec::new();
        for (_, bytes) in self.store.parts(self.id, &channel_prefix(self.stage))? {
            let state: ChannelState = decode(&bytes)?;
            let writer_is_mine = state.subtask as usize % parallelism == self.info.index;
            for (group, record) in state.records {
                let take = match group {
                    Some(g) => mine.contains(&(g as usize)),
                    None => writer_is_mine,
                };
                if take {
                    out.push(record);
                }
            }
        }
        Ok(out)
    }

    /// What the next link wrote in the checkpoint, from every subtask.
    pub fn reader(&mut self) -> Result<StateReader, StreamError> {
        let link = self.link;
        self.link += 1;
        let mut parts = Vec::new();
        let mut previous_parallelism = self.info.parallelism;
        for (_, bytes) in self.store.parts(self.id, &self.part_prefix(link))? {
            let part: LinkState = decode(&bytes)?;
            previous_parallelism = part.parallelism as usize;
            parts.push(part);
        }
        let (logged, rest) = std::mem::take(&mut self.restored_log)
            .into_iter()
            .partition(|(l, _)| *l == link);
        self.restored_log = rest;
        Ok(StateReader {
            subtask: self.info.index,
            parallelism: self.info.parallelism,
            max_parallelism: self.info.max_parallelism,
            previous_parallelism,
            parts,
            logged: logged.into_iter().map(|(_, g)| g).collect(),
        })
    }
}

/// The names of the entries a part holds (none when it is no link's state).
pub(crate) fn entry_names(bytes: &[u8]) -> Vec<String> {
    decode::<LinkState>(bytes)
        .map(|s| s.entries.into_iter().map(|e| e.name).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "sluice-stream-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn only_complete_checkpoints_count() {
        let dir = tempdir("store");
        let store = LocalDirStore::new(&dir).unwrap();
        assert_eq!(store.latest().unwrap(), None);
        store.put(1, "s0.l0.0", b"a").unwrap();
        assert_eq!(store.latest().unwrap(), None, "no _complete yet");
        store.complete(1).unwrap();
        store.put(2, "s0.l0.0", b"b").unwrap();
        assert_eq!(store.latest().unwrap(), Some(1));
        assert_eq!(
            store.parts(1, "s0.l0.").unwrap(),
            vec![("s0.l0.0".to_owned(), b"a".to_vec())]
        );
        store.discard_incomplete().unwrap();
        assert!(!dir.join("chk-2").exists());
        for id in 2..=5 {
            store.put(id, "s0.l0.0", b"x").unwrap();
            store.complete(id).unwrap();
        }
        store.put(6, "s0.l0.0", b"y").unwrap();
        store.prune(2).unwrap();
        let left: Vec<_> = store.all().unwrap();
        assert_eq!(left, vec![(4, true), (5, true), (6, false)]);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn keyed_state_moves_by_key_group_to_another_parallelism() {
        let dir = tempdir("rescale");
        let store = LocalDirStore::new(&dir).unwrap();
        let max = 16;
        let keys: Vec<String> = (0..200).map(|i| format!("k{i}")).collect();
        // Written by 3 subtasks...
        for s in 0..3 {
            let info = crate::SubtaskInfo {
                index: s,
                parallelism: 3,
                max_parallelism: max,
            };
            let mut state: KeyedState<String, u32> = KeyedState::new(s, 3, max);
            for (i, k) in keys.iter().enumerate() {
                if key_group_range(s, 3, max).contains(&crate::key_group_of(k, max)) {
                    state.insert(k.clone(), i as u32);
                }
            }
            let mut c = Cursor::new(1, &store, 0, info);
            c.skip();
            let mut w = c.writer();
            w.keyed("counts", &state);
            w.value("position", &(s as u64 * 10));
            c.put(w).unwrap();
            let names = entry_names(&store.parts(1, "s0.l1.").unwrap()[0].1);
            assert!(names.iter().any(|n| n == "position"));
        }
        store.complete(1).unwrap();
        // ...restored by 2: every key once, in the subtask that owns it.
        let mut seen = 0;
        for s in 0..2 {
            let info = crate::SubtaskInfo {
                index: s,
                parallelism: 2,
                max_parallelism: max,
            };
            let mut c = Cursor::new(1, &store, 0, info);
            c.skip();
            let r = c.reader().unwrap();
            assert_eq!(r.previous_parallelism(), 3);
            let mut state: KeyedState<String, u32> = KeyedState::new(s, 2, max);
            r.keyed("counts", &mut state).unwrap();
            for (i, k) in keys.iter().enumerate() {
                let owned = key_group_range(s, 2, max).contains(&crate::key_group_of(k, max));
                assert_eq!(state.get(k).copied(), owned.then_some(i as u32), "{k}");
            }
            seen += state.len();
            let mut positions = r.values::<u64>("position").unwrap();
            positions.sort_unstable();
            assert_eq!(positions, vec![(0, 0), (1, 10), (2, 20)]);
            assert!(r.own::<u64>("position").is_err());
        }
        assert_eq!(seen, keys.len());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn keyed_state_for_the_changelog_leaves_the_parts_and_comes_back_through_the_reader() {
        let dir = tempdir("changelog");
        let store = LocalDirStore::new(&dir).unwrap();
        let max = 8;
        let info = crate::SubtaskInfo {
            index: 0,
            parallelism: 1,
            max_parallelism: max,
        };
        let mut state: KeyedState<String, u32> = KeyedState::new(0, 1, max);
        state.insert("a".into(), 1);
        state.insert("b".into(), 2);
        for (keyed_to, in_parts) in [
            (KeyedTo::Changelog, false),
            (KeyedTo::Both, true),
            (KeyedTo::Checkpoint, true),
        ] {
            let mut c = Cursor::new(1, &store, 0, info).keyed_to(keyed_to);
            let mut w = c.writer();
            w.keyed("counts", &state);
            w.value("watermark", &7i64);
            c.put(w).unwrap();
            let logged = c.take_logged();
            let names = entry_names(&store.parts(1, "s0.l0.").unwrap()[0].1);
            assert_eq!(
                names.iter().filter(|n| *n == "counts").count() > 0,
                in_parts,
                "{keyed_to:?}"
            );
            assert!(names.iter().any(|n| n == "watermark"));
            if keyed_to == KeyedTo::Checkpoint {
                assert!(logged.is_empty());
                continue;
            }
            // Every owned group is reported, emptied ones included.
            assert_eq!(logged.len(), max);
            let entries: usize = logged.iter().map(|(_, g)| g.entries.len()).sum();
            assert_eq!(entries, 2);
            let mut r = Cursor::new(1, &store, 0, info).with_restored_log(logged);
            let mut back: KeyedState<String, u32> = KeyedState::new(0, 1, max);
            r.reader().unwrap().keyed("counts", &mut back).unwrap();
            assert_eq!(back.get(&"a".to_owned()), Some(&1));
            assert_eq!(back.get(&"b".to_owned()), Some(&2));
            assert_eq!(back.len(), 2);
        }
        let _ = fs::remove_dir_all(&dir);
    }
}

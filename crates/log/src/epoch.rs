//! Leader-epoch cache: for each leader epoch, the first offset written in it.
//! Persisted as Kafka's `leader-epoch-checkpoint` text format.

use std::io;
use std::path::{Path, PathBuf};

use crate::fsutil;

pub(crate) const CHECKPOINT_FILE: &str = "leader-epoch-checkpoint";

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct EpochCache {
    path: PathBuf,
    /// (epoch, start offset), both strictly increasing.
    entries: Vec<(i32, i64)>,
}

impl EpochCache {
    /// A partition directory's cache with no entries (no checkpoint file).
    pub fn empty(dir: &Path) -> EpochCache {
        EpochCache {
            path: dir.join(CHECKPOINT_FILE),
            entries: Vec::new(),
        }
    }

    /// Loads the checkpoint of a partition directory (empty when missing or unreadable).
    pub fn load(dir: &Path) -> io::Result<EpochCache> {
        let path = dir.join(CHECKPOINT_FILE);
        let mut entries = Vec::new();
        if let Some(bytes) = fsutil::read_optional(&path)? {
            let text = String::from_utf8_lossy(&bytes);
            let mut lines = text.lines();
            let version = lines.next().map(str::trim);
            let count = lines.next().and_then(|l| l.trim().parse::<usize>().ok());
            match (version, count) {
                (Some("0"), Some(count)) => {
                    for line in lines.take(count) {
                        let mut it = line.split_whitespace();
                        let e = it.next().and_then(|v| v.parse::<i32>().ok());
                        let o = it.next().and_then(|v| v.parse::<i64>().ok());
                        if let (Some(e), Some(o)) = (e, o) {
                            let increasing = entries
                                .last()
                                .is_none_or(|&(le, lo): &(i32, i64)| e > le && o >= lo);
                            if increasing {
                                entries.push((e, o));
                            }
                        }
                    }
                }
                _ => tracing::warn!(
                    file = %path.display(),
                    "ignoring unreadable leader epoch checkpoint; rebuilding it from the log"
                ),
            }
        }
        Ok(EpochCache { path, entries })
    }

    pub fn persist(&self) -> io::Result<()> {
        fsutil::atomic_write(&self.path, self.encode().as_bytes())
    }

    /// Writes the checkpoint without syncing it (see `fsutil::replace_unsynced`).
    pub fn persist_unsynced(&self) -> io::Result<()> {
        fsutil::replace_unsynced(&self.path, self.encode().as_bytes())
    }

    fn encode(&self) -> String {
        let mut s = format!("0\n{}\n", self.entries.len());
        for (e, o) in &self.entries {
            s.push_str(&format!("{e} {o}\n"));
        }
        s
    }

    pub fn latest_epoch(&self) -> i32 {
        self.entries.last().map_or(-1, |e| e.0)
    }

    /// Records that `epoch` starts at `offset` if it is newer than the
    /// latest; true when the cache changed.
    pub fn assign(&mut self, epoch: i32, offset: i64) -> bool {
        if epoch < 0 || epoch <= self.latest_epoch() {
            return false;
        }
        // A start offset can only grow; an older entry claiming later
        // offsets came from a truncated tail.
        self.entries.retain(|&(_, o)| o < offset);
        self.entries.push((epoch, offset));
        true
    }

    /// A follower's append: the batch at `offset` carries `epoch`, and the
    /// leader's log is the truth. A newer epoch starts there (as
    /// [`EpochCache::assign`]); the same epoch changes nothing; an older
    /// one drops the entries of newer epochs and those starting at or after
    /// `offset` (a leader-epoch start with nothing written behind it, or a
    /// tail the caller should have truncated) and starts `epoch` at
    /// `offset` unless it is then the latest already. True when changed.
    pub fn follow(&mut self, epoch: i32, offset: i64) -> bool {
        let latest = self.latest_epoch();
        if epoch < 0 || epoch == latest {
            return false;
        }
        if epoch > latest {
            return self.assign(epoch, offset);
        }
        self.entries.retain(|&(e, o)| e <= epoch && o < offset);
        if self.latest_epoch() != epoch {
            self.entries.push((epoch, offset));
        }
        true
    }

    /// Drops epochs starting at or after `end` (log truncated to `end`).
    pub fn truncate_from_end(&mut self, end: i64) -> bool {
        let before = self.entries.len();
        self.entries.retain(|&(_, o)| o < end);
        before != self.entries.len()
    }

    /// The log now starts at `start`: the first epoch still present starts there.
    pub fn truncate_from_start(&mut self, start: i64) -> bool {
        let before = self.entries.clone();
        while self.entries.get(1).is_some_and(|e| e.1 <= start) {
            self.entries.remove(0);
        }
        if let Some(first) = self.entries.first_mut() {
            if first.1 < start {
                first.1 = start;
            }
        }
        before != self.entries
    }

    /// Kafka's OffsetForLeaderEpoch answer for `epoch` given the log end offset.
    pub fn end_offset_for(&self, epoch: i32, log_end: i64) -> (i32, i64) {
        if epoch < 0 || self.entries.is_empty() {
            return (-1, -1);
        }
        if epoch == self.latest_epoch() {
            return (epoch, log_end);
        }
        let higher = self.entries.iter().find(|e| e.0 > epoch);
        let floor = self.entries.iter().rev().find(|e| e.0 <= epoch);
        match (floor, higher) {
            (_, None) => (-1, -1),
            (None, Some(h)) => (epoch, h.1),
            (Some(f), Some(h)) => (f.0, h.1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_semantics_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = EpochCache::load(dir.path()).unwrap();
        assert_eq!(c.end_offset_for(0, 10), (-1, -1));
        assert!(c.assign(1, 0));
        assert!(!c.assign(1, 5));
        assert!(c.assign(3, 10));
        assert!(c.assign(4, 20));
        assert_eq!(c.latest_epoch(), 4);
        assert_eq!(c.end_offset_for(4, 30), (4, 30));
        assert_eq!(c.end_offset_for(3, 30), (3, 20));
        assert_eq!(c.end_offset_for(2, 30), (1, 10));
        assert_eq!(c.end_offset_for(0, 30), (0, 0));
        assert_eq!(c.end_offset_for(9, 30), (-1, -1));
        c.persist().unwrap();
        let d = EpochCache::load(dir.path()).unwrap();
        assert_eq!(d.entries, c.entries);
        assert!(c.truncate_from_end(10));
        assert_eq!(c.latest_epoch(), 1);
        let mut d = d;
        assert!(d.truncate_from_start(15));
        assert_eq!(d.entries, vec![(3, 15), (4, 20)]);
    }

    #[test]
    fn follow_trusts_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = EpochCache::load(dir.path()).unwrap();
        assert!(c.follow(1, 0));
        assert!(!c.follow(1, 4));
        assert!(c.follow(3, 5));
        // Epoch 5 started at 9 with nothing written (a leader that never
        // appended); the leader's log has epoch 3 there.
        assert!(c.assign(5, 9));
        assert!(c.follow(3, 9));
        assert_eq!(c.entries, vec![(1, 0), (3, 5)]);
        // An epoch between two known ones replaces the newer.
        assert!(c.follow(2, 12));
        assert_eq!(c.entries, vec![(1, 0), (2, 12)]);
        assert!(!c.follow(-1, 20));
    }
}

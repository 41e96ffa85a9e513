//! A file sink that writes each record exactly once, however often the job
//! fails and restores (Flink's `FileSink`, two-phase commit on files).
//!
//! - Records go to a hidden in-progress file, `.part-<subtask>-<run>-<n>.inprogress`.
//! - At a checkpoint's barrier the file is fsynced and becomes *pending*
//!   for that checkpoint; its name is in the sink's checkpointed state.
//! - When the checkpoint completes, pending files are committed: renamed
//!   to `part-<subtask>-<run>-<n>`, the directory fsynced. Readers see only
//!   committed files.
//! - A job that restores commits the pending files of the checkpoint it
//!   restores (their checkpoint did complete; the notice may have been lost)
//!   and deletes every other hidden file the failed run left.
//! - What follows the last checkpoint of a bounded job is committed once
//!   the whole job has succeeded.

use std::fmt::Display;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::checkpoint::{io_error, sync_dir, CheckpointId, Commit, Cursor};
use crate::operator::Output;
use crate::{Record, StreamError};

/// Commits a sink leaves for the end of a successful job.
pub(crate) type SuccessCommits = Arc<Mutex<Vec<Commit>>>;

pub(crate) struct FileSink {
    dir: PathBuf,
    subtask: usize,
    parallelism: usize,
    /// Unique to this run of the subtask: its files' names never collide
    /// with an earlier run's.
    run: u64,
    seq: u64,
    current: Option<(String, BufWriter<File>)>,
    /// Hidden files closed at a checkpoint, waiting for it to complete.
    pending: Vec<(CheckpointId, String)>,
    /// Leftovers of earlier runs were dealt with.
    started: bool,
    on_success: SuccessCommits,
    /// Files staged when the input ended, for the final checkpoint.
    final_pending: Vec<String>,
    line: Vec<u8>,
}

fn final_name(hidden: &str) -> Option<&str> {
    hidden.strip_prefix('.')?.strip_suffix(".inprogress")
}

/// The subtask that wrote a hidden file.
fn writer_of(hidden: &str) -> Option<usize> {
    hidden
        .strip_prefix(".part-")?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Renames a hidden file to its final name (nothing when an earlier run
/// did already).
fn commit_file(dir: &Path, hidden: &str) -> Result<(), StreamError> {
    let Some(done) = final_name(hidden) else {
        return Ok(());
    };
    let from = dir.join(hidden);
    if from.exists() {
        fs::rename(&from, dir.join(done)).map_err(|e| io_error(&from, e))?;
    }
    Ok(())
}

impl FileSink {
    pub fn new(dir: PathBuf, info: crate::SubtaskInfo, on_success: SuccessCommits) -> FileSink {
        let run = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        FileSink {
            dir,
            subtask: info.index,
            parallelism: info.parallelism,
            run,
            seq: 0,
            current: None,
            pending: Vec::new(),
            started: false,
            on_success,
            final_pending: Vec::new(),
            line: Vec::new(),
        }
    }

    /// Deletes the hidden files of earlier runs that this subtask inherits
    /// (those of old subtasks `s` with `s % parallelism == subtask`) and
    /// that `keep` does not name.
    fn clean(&mut self, keep: &[String]) -> Result<(), StreamError> {
        fs::create_dir_all(&self.dir).map_err(|e| io_error(&self.dir, e))?;
        let mine = format!("-{}-", self.run);
        for entry in fs::read_dir(&self.dir).map_err(|e| io_error(&self.dir, e))? {
            let entry = entry.map_err(|e| io_error(&self.dir, e))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let inherited = writer_of(&name).is_some_and(|s| s % self.parallelism == self.subtask);
            if inherited && !name.contains(&mine) && !keep.contains(&name) {
                fs::remove_file(entry.path()).map_err(|e| io_error(&entry.path(), e))?;
            }
        }
        self.started = true;
        Ok(())
    }

    fn start(&mut self) -> Result<(), StreamError> {
        if !self.started {
            self.clean(&[])?;
        }
        Ok(())
    }

    fn file(&mut self) -> Result<&mut BufWriter<File>, StreamError> {
        if self.current.is_none() {
            let name = format!(
                ".part-{}-{}-{}.inprogress",
                self.subtask, self.run, self.seq
            );
            self.seq += 1;
            let path = self.dir.join(&name);
            let f = File::create(&path).map_err(|e| io_error(&path, e))?;
            self.current = Some((name, BufWriter::new(f)));
        }
        match self.current.as_mut() {
            Some((_, w)) => Ok(w),
            None => Err(StreamError::State("file sink lost its file".into())),
        }
    }

    /// Closes the current file durably; its name, if there was one.
    fn close(&mut self) -> Result<Option<String>, StreamError> {
        let Some((name, mut w)) = self.current.take() else {
            return Ok(None);
        };
        let path = self.dir.join(&name);
        w.flush().map_err(|e| io_error(&path, e))?;
        w.get_ref().sync_all().map_err(|e| io_error(&path, e))?;
        Ok(Some(name))
    }

    fn commit_through(&mut self, id: CheckpointId) -> Result<(), StreamError> {
        let (due, later): (Vec<_>, Vec<_>) = self.pending.drain(..).partition(|(p, _)| *p <= id);
        self.pending = later;
        if due.is_empty() {
            return Ok(());
        }
        for (_, name) in &due {
            commit_file(&self.dir, name)?;
        }
        sync_dir(&self.dir)
    }
}

impl<T: Display> Output<T> for FileSink {
    fn push(&mut self, r: Record<T>) -> Result<(), StreamError> {
        self.start()?;
        self.line.clear();
        let _ = writeln!(self.line, "{}", r.value);
        let line = std::mem::take(&mut self.line);
        let written = self.file()?.write_all(&line);
        self.line = line;
        written.map_err(|e| io_error(&self.dir, e))
    }

    fn watermark(&mut self, _: i64) -> Result<(), StreamError> {
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn finish(&mut self) -> Result<(), StreamError> {
        self.start()?;
        let mut staged: Vec<String> = self.pending.drain(..).map(|(_, n)| n).collect();
        staged.extend(self.close()?);
        self.final_pending = staged.clone();
        let dir = self.dir.clone();
        let commit: Commit = Box::new(move || {
            for name in &staged {
                commit_file(&dir, name)?;
            }
            sync_dir(&dir)
        });
        self.on_success
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(commit);
        Ok(())
    }

    fn barrier(&mut self, cp: &mut Cursor<'_>) -> Result<(), StreamError> {
        self.start()?;
        if let Some(name) = self.close()? {
            self.pending.push((cp.id, name));
        }
        let mut w = cp.writer();
        let names: Vec<&String> = if cp.is_final() {
            self.final_pending.iter().collect()
        } else {
            self.pending.iter().map(|(_, n)| n).collect()
        };
        w.value("pending", &names);
        cp.put(w)
    }

    fn restore(&mut self, cp: &mut Cursor<'_>) -> Result<(), StreamError> {
        let r = cp.reader()?;
        let mut keep = Vec::new();
        for (old, names) in r.values::<Vec<String>>("pending")? {
            if old % self.parallelism == self.subtask {
                keep.extend(names);
            }
        }
        fs::create_dir_all(&self.dir).map_err(|e| io_error(&self.dir, e))?;
        for name in &keep {
            commit_file(&self.dir, name)?;
        }
        sync_dir(&self.dir)?;
        self.clean(&keep)
    }

    fn checkpoint_complete(&mut self, id: CheckpointId) -> Result<(), StreamError> {
        self.commit_through(id)
    }
}

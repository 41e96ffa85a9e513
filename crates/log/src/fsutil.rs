//! Small file-system helpers: crash-safe replacement of small files, the
//! space left on a data directory's disk.
//! Files are opened through the descriptor cache, so that running out of
//! descriptors closes cached segment files instead of failing.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;

use crate::descriptors;

/// Replaces `path` with `contents` so that after a crash the file holds
/// either the old or the new contents: write a temporary file, fsync it,
/// rename it over the target, fsync the directory.
pub(crate) fn atomic_write(path: &Path, contents: &[u8]) -> io::Result<()> {
    replace(path, contents, true)
}

/// Replaces `path` with `contents` by a rename, without syncing: after a
/// crash the file may hold the old contents, the new ones or (on some file
/// systems) nothing. For files whose contents recovery can rebuild, or that
/// a file-system-wide sync makes durable right after.
pub(crate) fn replace_unsynced(path: &Path, contents: &[u8]) -> io::Result<()> {
    replace(path, contents, false)
}

/// The size of the file system holding a directory, and what an
/// unprivileged writer may still use of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskSpace {
    pub total_bytes: u64,
    pub usable_bytes: u64,
}

/// The [`DiskSpace`] of the file system holding `dir`; None when the file
/// system cannot tell.
pub fn disk_space(dir: &Path) -> Option<DiskSpace> {
    let s = rustix::fs::statvfs(dir).ok()?;
    Some(DiskSpace {
        total_bytes: s.f_blocks.checked_mul(s.f_frsize)?,
        usable_bytes: s.f_bavail.checked_mul(s.f_frsize)?,
    })
}

fn replace(path: &Path, contents: &[u8], synced: bool) -> io::Result<()> {
    let tmp = tmp_path(path)?;
    {
        let mut f = descriptors::process().open(
            &tmp,
            OpenOptions::new().write(true).create(true).truncate(true),
        )?;
        f.write_all(contents)?;
        if synced {
            f.sync_all()?;
        }
    }
    fs::rename(&tmp, path)?;
    match path.parent() {
        Some(dir) if synced => sync_dir(dir),
        _ => Ok(()),
    }
}

fn tmp_path(path: &Path) -> io::Result<std::path::PathBuf> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other(format!("{} has no parent", path.display())))?;
    let mut tmp_name = path
        .file_name()
        .ok_or_else(|| io::Error::other(format!("{} has no file name", path.display())))?
        .to_os_string();
    tmp_name.push(".tmp");
    Ok(dir.join(tmp_name))
}

/// fsyncs a directory so that entries created, renamed or removed in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    open_read(dir)?.sync_all()
}

fn open_read(path: &Path) -> io::Result<File> {
    descriptors::process().open(path, OpenOptions::new().read(true))
}

/// Reads a small file, None when it does not exist.
pub(crate) fn read_optional(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let mut f = match open_read(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)?;
    Ok(Some(bytes))
}

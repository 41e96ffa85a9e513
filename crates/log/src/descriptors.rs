//! The segment descriptor cache: a segment's log file is opened when it is
//! first read or written and closed again when more log files are open
//! than the budget allows, least recently used first. A partition nobody
//! touches costs no descriptor, so the number of partitions a node holds
//! is not bounded by its descriptor limit.
//!
//! Eviction is the CLOCK approximation of LRU (second chance): every use
//! sets a bit on the file without taking a shared lock; the eviction hand
//! walks the open files in the order they were opened, clears set bits and
//! closes the first file whose bit was already clear. The append and fetch
//! paths therefore pay one relaxed atomic load per use.
//!
//! A closed descriptor is reopened from the path on the next use. Closing
//! never loses data: writes went through the page cache to the inode, and
//! fsync on any descriptor of a file makes all of its written pages durable
//! (Linux keeps dirty pages, and since 4.16 unreported writeback errors,
//! per inode, not per descriptor). A reader that holds a descriptor keeps
//! it open while it reads: the cache drops only its own reference.
//!
//! Running out of descriptors is not an error the storage engine passes
//! on: when an open fails with EMFILE or ENFILE, the cache closes a part of
//! its files, lowers its budget to what the process can afford and tries
//! again.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Weak};

use parking_lot::Mutex;

/// Fewest log files the cache keeps open: below this a node with a tiny
/// descriptor limit would reopen files on nearly every request.
const MIN_BUDGET: usize = 16;

/// The soft limit on this process's descriptors.
fn descriptor_limit() -> usize {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(1 << 20);
    usize::try_from(limit).unwrap_or(usize::MAX)
}

/// Budget when none is configured: half of the soft descriptor limit, the
/// other half left to client connections, replication links, index and
/// checkpoint writes.
fn default_budget() -> usize {
    (descriptor_limit() / 2).max(MIN_BUDGET)
}

/// The process's cache: the descriptor limit is the process's, so one
/// budget covers every store in it.
static PROCESS: LazyLock<Arc<Descriptors>> =
    LazyLock::new(|| Arc::new(Descriptors::new(default_budget())));

/// The process-wide descriptor cache.
pub(crate) fn process() -> &'static Arc<Descriptors> {
    &PROCESS
}

/// Sets how many segment log files the process keeps open at most (0: half
/// of the soft descriptor limit, the default). A budget above three
/// quarters of the limit is lowered to that: connections need the rest.
pub fn set_segment_file_budget(files: usize) {
    let affordable = (descriptor_limit() / 4 * 3).max(MIN_BUDGET);
    let budget = match files {
        0 => default_budget(),
        n if n > affordable => {
            tracing::warn!(
                configured = n,
                limit = descriptor_limit(),
                budget = affordable,
                "more segment files configured than the descriptor limit allows; keeping fewer open"
            );
            affordable
        }
        n => n.max(MIN_BUDGET),
    };
    process().budget.store(budget, Ordering::Relaxed);
}

/// What the cache has done, for tests and the operator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DescriptorStats {
    /// Log files open now (the cache's own references).
    pub open: usize,
    /// Most log files the cache keeps open.
    pub budget: usize,
    /// Opens since start (first uses and reopens after eviction).
    pub opens: u64,
    /// Files closed to stay within the budget.
    pub evictions: u64,
    /// Times an open failed for lack of descriptors and was retried.
    pub exhausted: u64,
}

/// The figures of the process-wide cache.
pub fn segment_file_stats() -> DescriptorStats {
    process().stats()
}

#[derive(Debug)]
pub(crate) struct Descriptors {
    budget: AtomicUsize,
    /// Files with an open descriptor, oldest first; the eviction hand
    /// starts at the front. Entries of dropped files are skipped.
    ring: Mutex<VecDeque<Weak<LogFile>>>,
    open: AtomicUsize,
    opens: AtomicU64,
    evictions: AtomicU64,
    exhausted: AtomicU64,
}

impl Descriptors {
    pub fn new(budget: usize) -> Descriptors {
        Descriptors {
            budget: AtomicUsize::new(budget.max(1)),
            ring: Mutex::new(VecDeque::new()),
            open: AtomicUsize::new(0),
            opens: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            exhausted: AtomicU64::new(0),
        }
    }

    pub fn stats(&self) -> DescriptorStats {
        DescriptorStats {
            open: self.open.load(Ordering::Relaxed),
            budget: self.budget.load(Ordering::Relaxed),
            opens: self.opens.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            exhausted: self.exhausted.load(Ordering::Relaxed),
        }
    }

    /// Opens a file with `options`; when the process is out of descriptors,
    /// closes some of the cached ones and tries again. Every open of the
    /// storage engine goes through here.
    pub fn open(&self, path: &Path, options: &OpenOptions) -> io::Result<File> {
        let mut attempt = 0;
        loop {
            match options.open(path) {
                Err(e) if out_of_descriptors(&e) && attempt < 8 => {
                    attempt += 1;
                    self.exhausted.fetch_add(1, Ordering::Relaxed);
                    if self.shed() == 0 && attempt > 2 {
                        // Nothing of ours left to close: the descriptors
                        // are taken elsewhere (connections); give them a
                        // moment to go.
                        std::thread::sleep(std::time::Duration::from_millis(5 << attempt));
                    }
                }
                r => return r,
            }
        }
    }

    /// Closes a quarter of the cached files (at least one) and lowers the
    /// budget to what stays open: the process could not afford more.
    /// Returns how many were closed.
    fn shed(&self) -> usize {
        let open = self.open.load(Ordering::Relaxed);
        let keep = open - open.div_ceil(4);
        let lowered = keep.max(MIN_BUDGET);
        let before = self.budget.fetch_min(lowered, Ordering::Relaxed);
        if lowered < before {
            tracing::warn!(
                from = before,
                to = lowered,
                "out of file descriptors: keeping fewer segment files open"
            );
        }
        self.evict_down_to(keep, true)
    }

    /// Registers a file that just got a descriptor, closing others when
    /// the budget is exceeded.
    fn admit(&self, file: Weak<LogFile>) {
        // Counted before the hand can see it: an eviction of this file
        // must never subtract it before it was added.
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.opens.fetch_add(1, Ordering::Relaxed);
        self.ring.lock().push_back(file);
        let budget = self.budget.load(Ordering::Relaxed);
        if open > budget {
            self.evict_down_to(budget, false);
        }
    }

    /// Closes cached files, least recently used first, until at most `keep`
    /// are open or every file was looked at twice; `force` ignores the
    /// second chance. Returns how many were closed.
    fn evict_down_to(&self, keep: usize, force: bool) -> usize {
        let mut ring = self.ring.lock();
        let mut closed = 0;
        let mut looks = ring.len().saturating_mul(2);
        while self.open.load(Ordering::Relaxed) > keep && looks > 0 {
            looks -= 1;
            let Some(weak) = ring.pop_front() else { break };
            let Some(file) = weak.upgrade() else {
                continue; // dropped: it gave its descriptor back itself
            };
            if file.pinned.load(Ordering::Relaxed)
                || (!force && file.used.swap(false, Ordering::Relaxed))
            {
                ring.push_back(weak);
                continue;
            }
            // Whoever holds the slot is using the file right now.
            let Some(mut slot) = file.slot.try_lock() else {
                ring.push_back(weak);
                continue;
            };
            if slot.take().is_some() {
                self.open.fetch_sub(1, Ordering::Relaxed);
                self.evictions.fetch_add(1, Ordering::Relaxed);
                closed += 1;
            }
        }
        closed
    }
}

fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == rustix::io::Errno::MFILE.raw_os_error()
            || code == rustix::io::Errno::NFILE.raw_os_error()
    )
}

fn read_write() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    o
}

/// A segment's log file, opened on demand through a [`Descriptors`] cache.
#[derive(Debug)]
pub(crate) struct LogFile {
    path: PathBuf,
    cache: Arc<Descriptors>,
    /// The cache's reference to the open file; users clone it.
    slot: Mutex<Option<Arc<File>>>,
    /// Used since the eviction hand last passed (CLOCK's reference bit).
    /// A file enters the ring with the bit clear, at the hand's far end:
    /// one scan over many partitions (a consumer reading every partition
    /// once, start-up) does not push out the files in steady use.
    used: AtomicBool,
    /// Never closed by the cache: the file is unlinked and could not be
    /// opened again.
    pinned: AtomicBool,
}

impl LogFile {
    /// Creates the file when missing and hands it to `cache` open.
    pub fn create(path: PathBuf, cache: &Arc<Descriptors>) -> io::Result<Arc<LogFile>> {
        let file = cache.open(&path, read_write().create(true))?;
        Ok(LogFile::with_open(path, cache, file))
    }

    /// An existing file; opened on first use.
    pub fn existing(path: PathBuf, cache: &Arc<Descriptors>) -> Arc<LogFile> {
        Arc::new(LogFile {
            path,
            cache: cache.clone(),
            slot: Mutex::new(None),
            used: AtomicBool::new(false),
            pinned: AtomicBool::new(false),
        })
    }

    fn with_open(path: PathBuf, cache: &Arc<Descriptors>, file: File) -> Arc<LogFile> {
        let lf = Arc::new(LogFile {
            path,
            cache: cache.clone(),
            slot: Mutex::new(Some(Arc::new(file))),
            used: AtomicBool::new(false),
            pinned: AtomicBool::new(false),
        });
        cache.admit(Arc::downgrade(&lf));
        lf
    }

    #[cfg(test)]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file, opened now when the cache had closed it.
    pub fn get(self: &Arc<Self>) -> io::Result<Arc<File>> {
        if let Some(f) = self.slot.lock().as_ref() {
            if !self.used.load(Ordering::Relaxed) {
                self.used.store(true, Ordering::Relaxed);
            }
            return Ok(f.clone());
        }
        let opened = Arc::new(self.cache.open(&self.path, &read_write())?);
        {
            let mut slot = self.slot.lock();
            if let Some(f) = slot.as_ref() {
                return Ok(f.clone()); // another user opened it meanwhile
            }
            *slot = Some(opened.clone());
        }
        self.cache.admit(Arc::downgrade(self));
        Ok(opened)
    }

    /// Opens the file if needed and keeps it open for as long as this
    /// handle lives: called before the file is unlinked, so that readers
    /// still holding the segment can finish.
    pub fn pin(self: &Arc<Self>) -> io::Result<()> {
        self.pinned.store(true, Ordering::Relaxed);
        self.get().map(drop)
    }
}

impl Drop for LogFile {
    fn drop(&mut self) {
        if self.slot.get_mut().take().is_some() {
            self.cache.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// `n` new one-byte files in `dir` (byte i in the i-th).
    fn files(dir: &Path, cache: &Arc<Descriptors>, n: usize) -> Vec<Arc<LogFile>> {
        let dir = tempfile::tempdir_in(dir).unwrap().keep();
        (0..n)
            .map(|i| {
                let f = LogFile::create(dir.join(format!("{i}.log")), cache).unwrap();
                f.get().unwrap().write_all_at(&[i as u8], 0).unwrap();
                f
            })
            .collect()
    }

    fn read_byte(f: &Arc<LogFile>) -> u8 {
        let mut b = [0u8; 1];
        f.get().unwrap().read_exact_at(&mut b, 0).unwrap();
        b[0]
    }

    #[test]
    fn never_more_open_than_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(Descriptors::new(8));
        let all = files(dir.path(), &cache, 100);
        assert!(cache.stats().open <= 8, "{:?}", cache.stats());
        for round in 0..3 {
            for (i, f) in all.iter().enumerate() {
                assert_eq!(read_byte(f), i as u8, "round {round}");
                assert!(cache.stats().open <= 8, "{:?}", cache.stats());
            }
        }
        let s = cache.stats();
        assert!(s.evictions >= 300 - 8, "{s:?}");
        drop(all);
        assert_eq!(cache.stats().open, 0);
    }

    #[test]
    fn recently_used_files_stay_open() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(Descriptors::new(4));
        let hot = files(dir.path(), &cache, 1).remove(0);
        read_byte(&hot);
        let cold = files(dir.path(), &cache, 40);
        for (i, f) in cold.iter().enumerate() {
            // The hot file is used between every use of another; creating
            // the cold files closed it once.
            let opens = cache.stats().opens;
            read_byte(&hot);
            if i > 0 {
                assert_eq!(cache.stats().opens, opens, "the hot file was closed");
            }
            read_byte(f);
        }
    }

    #[test]
    fn a_pinned_file_survives_its_unlinking() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(Descriptors::new(2));
        let all = files(dir.path(), &cache, 3);
        all[0].pin().unwrap();
        std::fs::remove_file(all[0].path()).unwrap();
        // Pressure on the cache does not close it.
        let _more = files(dir.path(), &cache, 10);
        assert_eq!(read_byte(&all[0]), 0);
        // An unpinned, unlinked, evicted file cannot come back.
        std::fs::remove_file(all[1].path()).unwrap();
        let _more = files(dir.path(), &cache, 10);
        assert!(all[1].get().is_err());
    }

    #[test]
    fn running_out_of_descriptors_sheds_cached_files() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(Descriptors::new(1000));
        let all = files(dir.path(), &cache, 64);
        assert_eq!(cache.stats().open, 64);
        assert_eq!(cache.shed(), 16);
        assert_eq!(cache.stats().open, 48);
        assert_eq!(cache.stats().budget, 48);
        for f in &all {
            read_byte(f);
        }
        assert!(cache.stats().open <= 48);
    }
}

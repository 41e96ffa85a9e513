//! The disk's limits: sequential write bandwidth with fdatasync every N bytes
//! (through the page cache, with O_DIRECT, and into preallocated blocks that
//! were already written once), and the latency of 4 KiB append + fdatasync.
//!
//! Why three write methods: a buffered append to fresh blocks makes every
//! fdatasync also commit block allocation and page-cache writeback, which on
//! this machine kind caps durable throughput near 200-400 MB/s, while O_DIRECT
//! or overwriting blocks that already exist reaches about 1 GB/s. Sluice's
//! segment layout decides which of the two bounds it lives under.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::stats::{BenchResult, LatencyRecorder, RunClock};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    /// Buffered writes appending to fresh blocks.
    PageCache,
    /// O_DIRECT writes (aligned buffer) appending to fresh blocks.
    Direct,
    /// Buffered overwrite of a file preallocated and written in full beforehand.
    Prealloc,
}

impl Method {
    fn label(self) -> &'static str {
        match self {
            Method::PageCache => "page cache",
            Method::Direct => "O_DIRECT",
            Method::Prealloc => "preallocated+written, page cache",
        }
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum DiskCmd {
    /// Sequential write bandwidth with fdatasync every --sync-every bytes.
    SeqWrite {
        /// Directory on the disk to measure (a scratch file is created and removed).
        #[arg(long)]
        dir: PathBuf,
        /// Total bytes to write.
        #[arg(long, default_value_t = 1 << 30)]
        bytes: u64,
        /// fdatasync after every this many bytes (a multiple of 4096).
        #[arg(long, default_value_t = 1 << 20)]
        sync_every: u64,
        #[arg(long, value_enum, default_value_t = Method::PageCache)]
        method: Method,
    },
    /// Latency distribution of a small append followed by fdatasync.
    FsyncLatency {
        #[arg(long)]
        dir: PathBuf,
        /// Number of append+fdatasync operations.
        #[arg(long, default_value_t = 3000)]
        count: u64,
        /// Bytes appended before each fdatasync.
        #[arg(long, default_value_t = 4096)]
        block: usize,
    },
}

pub fn run(cmd: DiskCmd) -> Result<BenchResult> {
    match cmd {
        DiskCmd::SeqWrite {
            dir,
            bytes,
            sync_every,
            method,
        } => seq_write(&dir, bytes, sync_every, method),
        DiskCmd::FsyncLatency { dir, count, block } => fsync_latency(&dir, count, block),
    }
}

/// Removes the scratch file however the run ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn scratch_path(dir: &Path) -> PathBuf {
    dir.join(format!(".sluice-bench-disk-{}.dat", std::process::id()))
}

/// A heap buffer aligned to 4096 bytes, as O_DIRECT requires.
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

#[allow(unsafe_code)]
impl AlignedBuf {
    fn new(len: usize) -> Result<Self> {
        let layout = std::alloc::Layout::from_size_align(len.max(4096), 4096)?;
        // SAFETY: layout has a non-zero size. Zeroed, so the bytes are initialised
        // before as_mut_slice hands them out as `&mut [u8]`.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            bail!("allocating {len} aligned bytes failed");
        }
        let mut buf = Self { ptr, layout };
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        for b in buf.as_mut_slice() {
            // Non-zero, incompressible-ish bytes so no layer can elide the write.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = (x >> 24) as u8;
        }
        Ok(buf)
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to layout.size() bytes owned by self, initialised by
        // alloc_zeroed.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

#[allow(unsafe_code)]
impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

#[allow(unsafe_code)]
fn fdatasync(f: &File) -> Result<()> {
    // SAFETY: the fd is valid for the lifetime of `f`.
    let rc = unsafe { libc::fdatasync(f.as_raw_fd()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("fdatasync");
    }
    Ok(())
}

fn seq_write(dir: &Path, bytes: u64, sync_every: u64, method: Method) -> Result<BenchResult> {
    if sync_every == 0 || sync_every % 4096 != 0 {
        bail!("--sync-every must be a positive multiple of 4096");
    }
    // Writes of at most 1 MiB; a sync interval above that is several writes.
    let chunk = sync_every.min(1 << 20);
    if sync_every % chunk != 0 {
        bail!("--sync-every above 1 MiB must be a multiple of 1 MiB");
    }
    let intervals = bytes / sync_every;
    if intervals == 0 {
        bail!("--bytes must be at least --sync-every");
    }
    let total = intervals * sync_every;
    let path = scratch_path(dir);
    let _guard = Scratch(path.clone());
    let buf = AlignedBuf::new(usize::try_from(chunk)?)?;
    let data = buf
        .as_slice()
        .get(..usize::try_from(chunk)?)
        .context("buffer length")?;

    let mut file = match method {
        Method::PageCache => OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?,
        Method::Direct => OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .with_context(|| format!("creating {} with O_DIRECT", path.display()))?,
        Method::Prealloc => {
            // Allocate and write every block once, durably, before timing, so
            // the timed pass overwrites blocks the filesystem already maps.
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            let len = libc::off_t::try_from(total)?;
            // SAFETY: valid fd; offset 0 and a positive length.
            #[allow(unsafe_code)]
            let rc = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, len) };
            if rc != 0 {
                return Err(std::io::Error::from_raw_os_error(rc)).context("posix_fallocate");
            }
            let mut written = 0;
            while written < total {
                f.write_all(data)?;
                written += chunk;
            }
            fdatasync(&f)?;
            drop(f);
            OpenOptions::new().write(true).open(&path)?
        }
    };

    let per_interval = sync_every / chunk;
    let mut lat = LatencyRecorder::new();
    let clock = RunClock::start();
    for _ in 0..intervals {
        let t = Instant::now();
        for _ in 0..per_interval {
            file.write_all(data)
                .with_context(|| format!("writing ({})", method.label()))?;
        }
        fdatasync(&file)?;
        lat.record(t.elapsed());
    }
    let elapsed = clock.start.elapsed();
    let writes = intervals * per_interval;
    let scenario = format!(
        "seq write {} chunks, fdatasync every {}, {}",
        human_bytes(chunk),
        human_bytes(sync_every),
        method.label()
    );
    Ok(BenchResult::new(
        "disk",
        &scenario,
        "write",
        chunk,
        writes,
        elapsed,
        lat.summary(),
        clock.cpu_seconds(),
        true,
    )
    .with("bytes", total)
    .with("sync_every", sync_every)
    .with("method", format!("{method:?}").to_lowercase())
    .with("latency_measures", "write + fdatasync of one sync interval")
    .with("dir", dir.display().to_string()))
}

fn fsync_latency(dir: &Path, count: u64, block: usize) -> Result<BenchResult> {
    if count == 0 || block == 0 {
        bail!("--count and --block must be positive");
    }
    let path = scratch_path(dir);
    let _guard = Scratch(path.clone());
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    let buf = AlignedBuf::new(block)?;
    let data = buf.as_slice().get(..block).context("buffer length")?;
    let mut lat = LatencyRecorder::new();
    let clock = RunClock::start();
    for _ in 0..count {
        let t = Instant::now();
        file.write_all(data)?;
        fdatasync(&file)?;
        lat.record(t.elapsed());
    }
    let elapsed = clock.start.elapsed();
    Ok(BenchResult::new(
        "disk",
        &format!("{} append + fdatasync", human_bytes(block as u64)),
        "fsync",
        block as u64,
        count,
        elapsed,
        lat.summary(),
        clock.cpu_seconds(),
        true,
    )
    .with("latency_measures", "one append + fdatasync")
    .with("dir", dir.display().to_string()))
}

pub fn human_bytes(n: u64) -> String {
    if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{} MiB", n >> 20)
    } else if n >= 1 << 10 && n % (1 << 10) == 0 {
        format!("{} KiB", n >> 10)
    } else {
        format!("{n} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_units() {
        assert_eq!(human_bytes(1 << 20), "1 MiB");
        assert_eq!(human_bytes(64 << 10), "64 KiB");
        assert_eq!(human_bytes(100), "100 B");
        assert_eq!(human_bytes(1500), "1500 B");
    }

    #[test]
    fn seq_write_counts_and_cleans_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = seq_write(dir.path(), 4 << 20, 64 << 10, Method::PageCache).expect("run");
        assert_eq!(r.records, 64);
        assert_eq!(r.record_size, 64 << 10);
        assert_eq!(r.extra.get("bytes").and_then(|v| v.as_u64()), Some(4 << 20));
        assert_eq!(r.latency_ms.map(|_| ()), Some(()));
        assert_eq!(std::fs::read_dir(dir.path()).expect("read dir").count(), 0);
    }

    #[test]
    fn prealloc_overwrites_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = seq_write(dir.path(), 2 << 20, 1 << 20, Method::Prealloc).expect("run");
        assert_eq!(r.records, 2);
        assert!(r.mb_per_sec > 0.0);
    }

    #[test]
    fn rejects_unaligned_sync_interval() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(seq_write(dir.path(), 1 << 20, 1000, Method::PageCache).is_err());
        assert!(seq_write(dir.path(), 1000, 4096, Method::PageCache).is_err());
    }

    #[test]
    fn fsync_latency_records_every_operation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = fsync_latency(dir.path(), 20, 4096).expect("run");
        assert_eq!(r.records, 20);
        let s = r.latency_ms.expect("latency");
        assert!(s.p50 > 0.0 && s.max >= s.p50);
    }
}

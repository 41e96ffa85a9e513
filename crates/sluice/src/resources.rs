//! Resource alarms: a task that looks at the data directory's free disk space
//! and the process's resident memory once a second and raises an alarm, as
//! RabbitMQ's disk and memory monitors do, while either is past its limit. The
//! AMQP listener blocks publishers while an alarm is raised; the Kafka
//! listener refuses produce requests while the disk is below its limit.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::ResourceLimits;

const INTERVAL: Duration = Duration::from_secs(1);

/// What the monitor raises.
pub struct Alarms {
    /// The alarm's reason while one is raised (AMQP publishers block).
    pub publishers: watch::Receiver<Option<Arc<str>>>,
    /// True while the disk is below its free-space limit (Kafka produce is
    /// refused).
    pub disk_low: watch::Receiver<bool>,
}

/// Starts the monitor.
pub fn watch(data_dir: PathBuf, limits: ResourceLimits) -> Alarms {
    let memory_limit = limits
        .memory_bytes
        .or_else(|| machine_memory().map(|total| total / 10 * 4));
    let (tx, rx) = watch::channel(None);
    let (disk_tx, disk_rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let dir = data_dir.clone();
            let Ok((free, resident)) =
                tokio::task::spawn_blocking(move || (disk_free(&dir), resident_memory())).await
            else {
                continue;
            };
            let reason = alarm_reason(free, resident, limits.disk_free_bytes, memory_limit);
            disk_tx.send_if_modified(|low| {
                let now = disk_is_low(free, limits.disk_free_bytes);
                std::mem::replace(low, now) != now
            });
            let changed = *tx.borrow() != reason;
            if changed {
                match &reason {
                    Some(r) => warn!(
                        reason = %r,
                        disk_free = ?free,
                        resident = ?resident,
                        disk_free_limit = limits.disk_free_bytes,
                        memory_limit = ?memory_limit,
                        "resource alarm raised: AMQP publishers are blocked (and Kafka produce refused while the disk is low)"
                    ),
                    None => {
                        info!("resource alarm cleared: AMQP publishers and Kafka producers resume")
                    }
                }
                if tx.send(reason).is_err() {
                    return;
                }
            }
        }
    });
    Alarms {
        publishers: rx,
        disk_low: disk_rx,
    }
}

fn disk_is_low(disk_free: Option<u64>, disk_limit: u64) -> bool {
    disk_free.is_some_and(|f| f < disk_limit)
}

/// RabbitMQ's wording of what is low, or `None`. A figure that cannot be read
/// raises nothing.
fn alarm_reason(
    disk_free: Option<u64>,
    resident: Option<u64>,
    disk_limit: u64,
    memory_limit: Option<u64>,
) -> Option<Arc<str>> {
    let disk = disk_is_low(disk_free, disk_limit);
    let memory = matches!((resident, memory_limit), (Some(r), Some(l)) if r > l);
    match (disk, memory) {
        (true, true) => Some(Arc::from("low on memory & disk")),
        (true, false) => Some(Arc::from("low on disk")),
        (false, true) => Some(Arc::from("low on memory")),
        (false, false) => None,
    }
}

/// Bytes an unprivileged writer may still use on the disk holding `dir`.
fn disk_free(dir: &Path) -> Option<u64> {
    sluice_log::disk_space(dir).map(|d| d.usable_bytes)
}

/// This process's resident set, from /proc/self/statm (in pages).
fn resident_memory() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    pages.checked_mul(page_size())
}

/// What the process uses, for its metrics; a figure /proc does not give is
/// None.
pub struct ProcessUsage {
    pub resident_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub cpu_seconds: Option<f64>,
}

pub fn process_usage() -> ProcessUsage {
    ProcessUsage {
        resident_bytes: resident_memory(),
        open_fds: std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as u64),
        cpu_seconds: cpu_seconds(),
    }
}

/// User and system time from /proc/self/stat (fields 14 and 15, in clock
/// ticks; the command name before them may hold spaces, so count from
/// its closing parenthesis).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let ticks = rustix::param::clock_ticks_per_second();
    (ticks > 0).then(|| (utime + stime) as f64 / ticks as f64)
}

fn page_size() -> u64 {
    rustix::param::page_size() as u64
}

/// MemTotal from /proc/meminfo, in bytes.
fn machine_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Raises the soft limit on open file descriptors to the hard one, as Kafka's
/// and RabbitMQ's packaging do: every partition's segments, every client
/// connection and every replication link take descriptors, and shells and
/// container runtimes often start processes with a soft limit of 1,024 far
/// below what the hard limit allows. Returns the limit in force.
pub fn raise_descriptor_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return limit.current;
    }
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => {
            info!(
                from = ?limit.current,
                to = ?limit.maximum,
                "raised the open file descriptor limit to its hard limit"
            );
            limit.maximum
        }
        Err(e) => {
            warn!(limit = ?limit.current, error = %e, "could not raise the open file descriptor limit");
            limit.current
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_reports_its_usage() {
        let before = process_usage()
            .cpu_seconds
            .expect("cpu time of this process");
        // Spin until the process's CPU time moves 0.1 s: a loaded machine
        // gives the thread less of the wall clock, so only CPU time that
        // never moves fails.
        let start = std::time::Instant::now();
        let mut spin = 0u64;
        let mut after = before;
        while after < before + 0.1 && start.elapsed() < std::time::Duration::from_secs(30) {
            for _ in 0..1_000_000 {
                spin = std::hint::black_box(spin.wrapping_add(1));
            }
            after = process_usage()
                .cpu_seconds
                .expect("cpu time of this process");
        }
        assert!(
            after >= before + 0.1,
            "cpu time went from {before} to {after} s in 30 s of spinning"
        );
        let usage = process_usage();
        assert!(usage.resident_bytes.is_some_and(|b| b > 1 << 20));
        // Standard input, output and error at least.
        assert!(usage.open_fds.is_some_and(|n| n >= 3));
    }

    #[test]
    fn reasons_are_rabbitmqs() {
        assert_eq!(alarm_reason(Some(100), Some(10), 50, Some(20)), None);
        assert_eq!(
            alarm_reason(Some(10), Some(10), 50, Some(20)).as_deref(),
            Some("low on disk")
        );
        assert_eq!(
            alarm_reason(Some(100), Some(30), 50, Some(20)).as_deref(),
            Some("low on memory")
        );
        assert_eq!(
            alarm_reason(Some(10), Some(30), 50, Some(20)).as_deref(),
            Some("low on memory & disk")
        );
        // Unknown figures raise nothing.
        assert_eq!(alarm_reason(None, None, 50, None), None);
    }

    #[test]
    fn this_machine_reports_its_figures() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        assert!(disk_free(dir.path()).is_some_and(|f| f > 0));
        assert!(resident_memory().is_some_and(|r| r > 0));
        assert!(machine_memory().is_some_and(|m| m > 0));
    }
}

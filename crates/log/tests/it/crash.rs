//! Torn and corrupt tails: after a "crash" the log ends at the last good
//! batch, never serves corrupt bytes and keeps appending at the right offset.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sluice_log::{FlushPolicy, ReadLimit, TopicConfig};

use crate::{batch, batches_in, log_files, no_overrides, open, small_segments, stamped, Spec};

/// Writes `n` batches of 2 records each; returns their stored bytes and the
/// partition directory.
fn setup(dir: &Path, n: usize, defaults: TopicConfig) -> (Vec<Vec<u8>>, PathBuf) {
    let store = open(dir, FlushPolicy::Never, defaults);
    store.create_topic("c", 1, &no_overrides(), false).unwrap();
    let p = store.partition("c", 0).unwrap();
    let mut stored = Vec::new();
    for i in 0..n {
        let b = batch(&Spec {
            fill: i as u8,
            ..Spec::plain(2, 100)
        });
        let r = p.append(&b, 0).unwrap();
        stored.push(stamped(&b, r.base_offset, 0));
    }
    store.flush_all().unwrap();
    (stored, dir.join("c-0"))
}

fn last_log(pdir: &Path) -> PathBuf {
    log_files(pdir).pop().unwrap()
}

/// Reopens and checks the log holds exactly `good` and accepts new appends.
fn check_recovered(dir: &Path, good: &[Vec<u8>], defaults: TopicConfig) {
    let store = open(dir, FlushPolicy::Never, defaults);
    let p = store.partition("c", 0).unwrap();
    let expected_end = 2 * good.len() as i64;
    assert_eq!(p.log_end_offset(), expected_end);
    let r = p.read(0, 1 << 20, true, ReadLimit::LogEnd).unwrap();
    assert_eq!(r.records.as_ref(), good.concat().as_slice());
    let size: usize = good.iter().map(Vec::len).sum();
    assert_eq!(p.size_bytes(), size as u64);
    let next = p.append(&batch(&Spec::plain(1, 5)), 0).unwrap();
    assert_eq!(next.base_offset, expected_end);
    let r = p
        .read(expected_end, 1 << 20, true, ReadLimit::LogEnd)
        .unwrap();
    assert_eq!(batches_in(&r.records).len(), 1);
    drop(p);
    drop(store);
    // And once more: the repaired log is stable across another restart.
    let store = open(dir, FlushPolicy::Never, TopicConfig::default());
    assert_eq!(
        store.partition("c", 0).unwrap().log_end_offset(),
        expected_end + 1
    );
}

#[tokio::test]
async fn truncated_mid_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (stored, pdir) = setup(dir.path(), 5, TopicConfig::default());
    let f = OpenOptions::new()
        .write(true)
        .open(last_log(&pdir))
        .unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - 40).unwrap();
    check_recovered(dir.path(), &stored[..4], TopicConfig::default());
}

#[tokio::test]
async fn truncated_inside_header() {
    let dir = tempfile::tempdir().unwrap();
    let (stored, pdir) = setup(dir.path(), 3, TopicConfig::default());
    let f = OpenOptions::new()
        .write(true)
        .open(last_log(&pdir))
        .unwrap();
    let len = f.metadata().unwrap().len();
    let last = stored[2].len() as u64;
    f.set_len(len - last + 30).unwrap();
    check_recovered(dir.path(), &stored[..2], TopicConfig::default());
}

#[tokio::test]
async fn flipped_byte_in_last_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (stored, pdir) = setup(dir.path(), 4, TopicConfig::default());
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(last_log(&pdir))
        .unwrap();
    let len = f.metadata().unwrap().len();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, len - 10).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], len - 10).unwrap();
    check_recovered(dir.path(), &stored[..3], TopicConfig::default());
}

#[tokio::test]
async fn zero_filled_tail_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let (stored, pdir) = setup(dir.path(), 3, TopicConfig::default());
    let mut f = OpenOptions::new()
        .append(true)
        .open(last_log(&pdir))
        .unwrap();
    f.write_all(&[0u8; 8192]).unwrap();
    check_recovered(dir.path(), &stored, TopicConfig::default());
}

#[tokio::test]
async fn garbage_tail_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let (stored, pdir) = setup(dir.path(), 3, TopicConfig::default());
    let mut f = OpenOptions::new()
        .append(true)
        .open(last_log(&pdir))
        .unwrap();
    // A plausible-looking header claiming a huge length, then nothing.
    let mut junk = batch(&Spec::plain(1, 10));
    junk[8..12].copy_from_slice(&100_000i32.to_be_bytes());
    f.write_all(&junk).unwrap();
    check_recovered(dir.path(), &stored, TopicConfig::default());
}

#[tokio::test]
async fn missing_and_bogus_indexes_are_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let defaults = small_segments(1 << 20, 150);
    let (stored, pdir) = setup(dir.path(), 20, defaults.clone());
    let log = last_log(&pdir);
    let index = log.with_extension("index");
    let time = log.with_extension("timeindex");
    assert!(std::fs::metadata(&index).unwrap().len() > 0);
    std::fs::remove_file(&index).unwrap();
    std::fs::write(&time, [0xffu8; 25]).unwrap();
    {
        let store = open(dir.path(), FlushPolicy::Never, defaults.clone());
        let p = store.partition("c", 0).unwrap();
        // Reads in the middle go through the rebuilt index.
        let r = p.read(21, 1 << 20, true, ReadLimit::LogEnd).unwrap();
        assert_eq!(r.records.as_ref(), stored[10..].concat().as_slice());
        assert_eq!(p.offset_for_timestamp(0).unwrap().map(|x| x.0), Some(0));
    }
    assert!(std::fs::metadata(&index).unwrap().len() > 0);
    assert_eq!(std::fs::metadata(&index).unwrap().len() % 8, 0);
    assert_eq!(std::fs::metadata(&time).unwrap().len() % 12, 0);
    check_recovered(dir.path(), &stored, defaults);
}

/// Index entries are written to the files in bulk; a process that stops
/// without a clean shutdown (no `flush_all`) leaves the active segment's
/// index files short. Reopening detects that and rebuilds them.
#[tokio::test]
async fn short_index_after_unclean_stop_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    // 161-byte batches, an index entry for every batch after the first.
    let defaults = small_segments(1 << 20, 150);
    let pdir = dir.path().join("c-0");
    let mut stored = Vec::new();
    {
        let store = open(dir.path(), FlushPolicy::Never, defaults.clone());
        store.create_topic("c", 1, &no_overrides(), false).unwrap();
        let p = store.partition("c", 0).unwrap();
        for i in 0..300 {
            let b = batch(&Spec {
                fill: i as u8,
                ..Spec::plain(2, 100).at(1_000_000 + i64::from(i))
            });
            let r = p.append(&b, 0).unwrap();
            stored.push(stamped(&b, r.base_offset, 0));
        }
        // Dropped without flush_all: what a kill leaves behind.
    }
    let log = last_log(&pdir);
    let index = log.with_extension("index");
    let time = log.with_extension("timeindex");
    let entries = (stored.len() - 1) as u64;
    let short = std::fs::metadata(&index).unwrap().len();
    assert!(short < entries * 8, "index not short: {short} bytes");
    assert_eq!(short % 8, 0);
    assert!(std::fs::metadata(&time).unwrap().len() < entries * 12);
    {
        let store = open(dir.path(), FlushPolicy::Never, defaults.clone());
        let p = store.partition("c", 0).unwrap();
        assert_eq!(std::fs::metadata(&index).unwrap().len(), entries * 8);
        assert_eq!(std::fs::metadata(&time).unwrap().len(), entries * 12);
        // Reads from offsets whose index entries were missing before.
        for start in [0usize, 150, 257, 299] {
            let r = p
                .read(2 * start as i64 + 1, 1 << 20, true, ReadLimit::LogEnd)
                .unwrap();
            assert_eq!(r.records.as_ref(), stored[start..].concat().as_slice());
        }
        assert_eq!(
            p.offset_for_timestamp(1_000_280).unwrap(),
            Some((560, 1_000_280))
        );
        // A clean shutdown writes every entry appended since.
        for i in 0..10 {
            let b = batch(&Spec::plain(2, 100).at(2_000_000 + i));
            let r = p.append(&b, 0).unwrap();
            stored.push(stamped(&b, r.base_offset, 0));
        }
        store.flush_all().unwrap();
        let entries = (stored.len() - 1) as u64;
        assert_eq!(std::fs::metadata(&index).unwrap().len(), entries * 8);
        assert_eq!(std::fs::metadata(&time).unwrap().len(), entries * 12);
    }
    check_recovered(dir.path(), &stored, defaults);
}

#[tokio::test]
async fn rolled_segments_have_complete_indexes_without_a_clean_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    // Ten 161-byte batches per segment, an index entry for each but the first.
    let defaults = small_segments(1610, 150);
    let pdir = dir.path().join("c-0");
    {
        let store = open(dir.path(), FlushPolicy::Never, defaults.clone());
        store.create_topic("c", 1, &no_overrides(), false).unwrap();
        let p = store.partition("c", 0).unwrap();
        // One timestamp for all: batches stamped with the clock would cross a
        // millisecond now and then and add a time index entry.
        let ts = crate::now_ms();
        for _ in 0..25 {
            p.append(&batch(&Spec::plain(2, 100).at(ts)), 0).unwrap();
        }
    }
    let logs = log_files(&pdir);
    assert_eq!(logs.len(), 3);
    for l in &logs[..2] {
        assert_eq!(
            std::fs::metadata(l.with_extension("index")).unwrap().len(),
            9 * 8
        );
        assert_eq!(
            std::fs::metadata(l.with_extension("timeindex"))
                .unwrap()
                .len(),
            12,
            "one time entry: every batch carries the same timestamp"
        );
    }
}

#[tokio::test]
async fn corrupt_older_segment_drops_everything_after_it() {
    let dir = tempfile::tempdir().unwrap();
    // Every batch is 161 bytes: three per 500-byte segment.
    let defaults = small_segments(500, 4096);
    let (stored, pdir) = setup(dir.path(), 9, defaults.clone());
    let logs = log_files(&pdir);
    assert_eq!(logs.len(), 3);
    // Damage the last batch of the first segment.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&logs[0])
        .unwrap();
    let len = f.metadata().unwrap().len();
    f.write_all_at(&[0xAA, 0xBB], len - 3).unwrap();
    check_recovered(dir.path(), &stored[..2], defaults);
    assert_eq!(log_files(&pdir).len(), 1);
}

#[tokio::test]
async fn read_never_returns_a_torn_batch_before_recovery_either() {
    // The in-memory size bounds reads: bytes appended to the file behind
    // the log's back are not served.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), FlushPolicy::Never, TopicConfig::default());
    store.create_topic("c", 1, &no_overrides(), false).unwrap();
    let p = store.partition("c", 0).unwrap();
    let b = batch(&Spec::plain(1, 10));
    p.append(&b, 0).unwrap();
    let log = last_log(&dir.path().join("c-0"));
    let mut f = OpenOptions::new().append(true).open(log).unwrap();
    f.write_all(&[0u8; 100]).unwrap();
    let r = p.read(0, 1 << 20, true, ReadLimit::LogEnd).unwrap();
    assert_eq!(r.records.as_ref(), stamped(&b, 0, 0).as_slice());
    assert!(p.read(2, 1 << 20, true, ReadLimit::LogEnd).is_err());
}

#[tokio::test]
async fn older_segment_with_missing_index_is_fully_verified() {
    let dir = tempfile::tempdir().unwrap();
    // Three 161-byte batches per segment, an index entry every batch.
    let defaults = small_segments(500, 100);
    let (stored, pdir) = setup(dir.path(), 9, defaults.clone());
    let logs = log_files(&pdir);
    assert_eq!(logs.len(), 3);
    // Damage the middle batch of the first segment (only a CRC walk can
    // tell) and remove that segment's index.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&logs[0])
        .unwrap();
    f.write_all_at(&[0x55], 161 + 100).unwrap();
    std::fs::remove_file(logs[0].with_extension("index")).unwrap();
    check_recovered(dir.path(), &stored[..1], defaults);
}

const KILL9_DIR_ENV: &str = "SLUICE_LOG_TEST_KILL9_DIR";

/// Child process of `kill9_mid_stream_keeps_every_acknowledged_batch`:
/// appends forever, printing each acknowledged (durable) end offset.
#[test]
#[ignore = "child process of kill9_mid_stream_keeps_every_acknowledged_batch"]
fn kill9_child() {
    let Ok(dir) = std::env::var(KILL9_DIR_ENV) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let store = open(
            Path::new(&dir),
            FlushPolicy::Always,
            small_segments(20_000, 512),
        );
        if store.topic("k").is_none() {
            store.create_topic("k", 1, &no_overrides(), false).unwrap();
        }
        let p = store.partition("k", 0).unwrap();
        loop {
            let next = p.log_end_offset();
            let b = batch(&Spec {
                fill: (next % 251) as u8,
                ..Spec::plain(1 + (next % 3) as i32, 50 + (next % 400) as usize)
            });
            let r = p.append(&b, 0).unwrap();
            p.wait_durable(r.end_offset).await.unwrap();
            println!("ACK {}", r.end_offset);
        }
    });
}

#[test]
fn kill9_mid_stream_keeps_every_acknowledged_batch() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut acked = 0i64;
    for round in 0..3 {
        let mut child = std::process::Command::new(&exe)
            .args([
                "--exact",
                "crash::kill9_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(KILL9_DIR_ENV, dir.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let mut acks = 0;
        for line in std::io::BufReader::new(out).lines() {
            let line = line.unwrap();
            if let Some(end) = line.strip_prefix("ACK ") {
                acked = acked.max(end.trim().parse().unwrap());
                acks += 1;
                if acks == 300 {
                    break;
                }
            }
        }
        assert_eq!(acks, 300, "child stopped early in round {round}");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        let rt = tokio::runtime::Runtime::new().unwrap();
        let _g = rt.enter();
        let store = open(dir.path(), FlushPolicy::Always, small_segments(20_000, 512));
        let p = store.partition("k", 0).unwrap();
        assert!(p.log_end_offset() >= acked, "acknowledged data lost");
        let all = p.read(0, usize::MAX / 2, true, ReadLimit::LogEnd).unwrap();
        let mut next = 0;
        let mut pos = 0usize;
        for (base, last, _, size) in batches_in(&all.records) {
            assert_eq!(base, next, "offsets are contiguous");
            // The payload identifies the offset it was written at.
            assert_eq!(all.records[pos + 61], (base % 251) as u8);
            next = last + 1;
            pos += size;
        }
        assert_eq!(next, p.log_end_offset());
    }
}

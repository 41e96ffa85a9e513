//! End-to-end tests of the `sluice` binary: `sluice serve` started on
//! ephemeral ports with a temporary data directory, driven by the binary's
//! own client commands (which speak Kafka through librdkafka).

// A failed unwrap is a failed test (clippy.toml allows it in #[test] fns only).
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod cluster;

const BIN: &str = env!("CARGO_BIN_EXE_sluice");
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A `sluice` command with no `SLUICE_*` variable inherited from the caller.
fn sluice_cmd() -> Command {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with("SLUICE_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("SLUICE_LOG", "warn");
    cmd
}

/// A running `sluice serve`, killed on drop.
struct Broker {
    child: Child,
    kafka: SocketAddr,
    http: SocketAddr,
    data: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Broker {
    fn start() -> Broker {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let mut cmd = sluice_cmd();
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&data)
            .args(["--kafka-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .args(["--amqp-addr", "127.0.0.1:0"])
            .args(["--group-initial-rebalance-delay-ms", "0"]);
        let (child, line) = spawn_until_listening(cmd);
        let field = |name: &str| -> String {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {line:?}"))
                .to_string()
        };
        Broker {
            kafka: field("kafka=").parse().unwrap(),
            http: field("http=").parse().unwrap(),
            data: PathBuf::from(field("data=")),
            child,
            _tmp: tmp,
        }
    }

    /// Runs a client command against this broker.
    fn run(&self, args: &[&str]) -> Output {
        self.run_with_stdin(args, b"")
    }

    fn run_with_stdin(&self, args: &[&str], stdin: &[u8]) -> Output {
        let mut child = sluice_cmd()
            .args(args)
            .args(["--bootstrap", &self.kafka.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin).unwrap();
        drop(input);
        wait_output(child, Duration::from_secs(120))
    }

    /// Runs a client command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_success(&out, args);
        String::from_utf8(out.stdout).unwrap()
    }

    fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.http, path)
    }

    /// SIGTERM and wait for the exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        // The shell's builtin kill: no procps needed.
        let status = Command::new("sh")
            .args(["-c", &format!("kill -TERM {}", self.child.id())])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "broker did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `cmd` and waits for its "sluice listening" line; panics with the
/// process's stderr if it exits first.
fn spawn_until_listening(mut cmd: Command) -> (Child, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = tx.send(line);
        }
        // Keep draining so the broker never blocks on a full pipe.
        for _ in lines {}
    });
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[broker] {line}");
        }
    });
    match rx.recv_timeout(START_TIMEOUT) {
        Ok(line) => {
            assert!(line.starts_with("sluice listening kafka="), "{line:?}");
            (child, line)
        }
        Err(_) => {
            let _ = child.kill();
            let status = child.wait().unwrap();
            panic!("broker did not announce itself (exit status {status})");
        }
    }
}

fn wait_output(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("command did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_thread.join().unwrap(),
        stderr: err_thread.join().unwrap(),
    }
}

fn assert_success(out: &Output, what: &[&str]) {
    assert!(
        out.status.success(),
        "{what:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad HTTP response {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Runs `sluice serve` expected to fail at start; returns (status, stderr).
fn serve_failure(args: &[&str], env: &[(&str, &Path)]) -> (std::process::ExitStatus, String) {
    let mut cmd = sluice_cmd();
    cmd.arg("serve")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = wait_output(cmd.spawn().unwrap(), Duration::from_secs(60));
    assert!(
        out.stdout.is_empty(),
        "a failed start must not announce itself: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn taken_kafka_port_fails_with_a_clear_message() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (status, stderr) = serve_failure(
        &[
            "--data-dir",
            data.to_str().unwrap(),
            "--kafka-addr",
            &addr,
            "--http-addr",
            "127.0.0.1:0",
        ],
        &[],
    );
    assert!(!status.success());
    assert!(
        stderr.contains(&format!(
            "address {addr} is already in use (is another broker running?)"
        )),
        "{stderr}"
    );
}

#[test]
fn taken_http_port_fails_with_a_clear_message() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (status, stderr) = serve_failure(
        &[
            "--data-dir",
            data.to_str().unwrap(),
            "--kafka-addr",
            "127.0.0.1:0",
            "--http-addr",
            &addr,
        ],
        &[],
    );
    assert!(!status.success());
    assert!(
        stderr.contains(&format!("HTTP address {addr} is already in use")),
        "{stderr}"
    );
}

#[test]
fn a_file_as_data_dir_fails_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let (status, stderr) = serve_failure(
        &[
            "--data-dir",
            file.to_str().unwrap(),
            "--kafka-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ],
        &[],
    );
    assert!(!status.success());
    assert!(
        stderr.contains("is unusable: it exists and is not a directory"),
        "{stderr}"
    );
    assert!(stderr.contains(file.to_str().unwrap()), "{stderr}");
}

/// The data dir from flag, env and file, each made unusable (a plain file)
/// so the error names the one that won — without needing a working store.
#[test]
fn config_precedence_is_flag_then_env_then_file() {
    let tmp = tempfile::tempdir().unwrap();
    let from_file = tmp.path().join("from-file");
    let from_env = tmp.path().join("from-env");
    let from_flag = tmp.path().join("from-flag");
    for f in [&from_file, &from_env, &from_flag] {
        std::fs::write(f, b"x").unwrap();
    }
    let config = tmp.path().join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nkafka_addr = \"127.0.0.1:0\"\nhttp_addr = \"127.0.0.1:0\"\namqp_addr = \"127.0.0.1:0\"\n\
             [storage]\ndata_dir = {:?}\n",
            from_file.to_str().unwrap()
        ),
    )
    .unwrap();
    let names = |stderr: &str| {
        [&from_file, &from_env, &from_flag]
            .iter()
            .filter(|p| stderr.contains(&format!("{} is unusable", p.display())))
            .count()
    };

    let (status, stderr) = serve_failure(&["--config", config.to_str().unwrap()], &[]);
    assert!(!status.success());
    assert!(
        stderr.contains(&format!("{} is unusable", from_file.display())),
        "{stderr}"
    );
    assert_eq!(names(&stderr), 1);

    // SLUICE_CONFIG names the file too; the env var beats the file.
    let (status, stderr) = serve_failure(
        &[],
        &[("SLUICE_CONFIG", &config), ("SLUICE_DATA_DIR", &from_env)],
    );
    assert!(!status.success());
    assert!(
        stderr.contains(&format!("{} is unusable", from_env.display())),
        "{stderr}"
    );
    assert_eq!(names(&stderr), 1);

    let (status, stderr) = serve_failure(
        &["--data-dir", from_flag.to_str().unwrap()],
        &[("SLUICE_CONFIG", &config), ("SLUICE_DATA_DIR", &from_env)],
    );
    assert!(!status.success());
    assert!(
        stderr.contains(&format!("{} is unusable", from_flag.display())),
        "{stderr}"
    );
    assert_eq!(names(&stderr), 1);
}

#[test]
fn a_bad_config_file_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("bad.toml");
    std::fs::write(&config, "[storage]\nflush = \"sometimes\"\n").unwrap();
    let (status, stderr) = serve_failure(&["--config", config.to_str().unwrap()], &[]);
    assert!(!status.success());
    assert!(stderr.contains("invalid config file"), "{stderr}");
}

/// The listening line reports the configured data dir, the file's choice
/// when no flag or variable overrides it.
#[test]
fn serve_announces_itself_and_answers_health_checks() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("file-data");
    let config = tmp.path().join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nkafka_addr = \"127.0.0.1:0\"\nhttp_addr = \"127.0.0.1:0\"\namqp_addr = \"127.0.0.1:0\"\n\
             [storage]\ndata_dir = {:?}\n[defaults]\n\"retention.ms\" = 3600000\n",
            data.to_str().unwrap()
        ),
    )
    .unwrap();
    let mut cmd = sluice_cmd();
    cmd.args(["serve", "--config", config.to_str().unwrap()]);
    let (mut child, line) = spawn_until_listening(cmd);
    let canonical = data.canonicalize().unwrap();
    assert!(
        line.ends_with(&format!(" data={}", canonical.display())),
        "{line}"
    );
    let http: SocketAddr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http="))
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(http.port(), 0);
    assert_eq!(http_get(http, "/healthz"), (200, "ok\n".to_string()));
    assert_eq!(http_get(http, "/nope").0, 404);
    let _ = child.kill();
    let _ = child.wait();
}

/// Started with a soft descriptor limit below its hard one (as shells and
/// container runtimes often start processes), `serve` raises it to the hard
/// limit: partitions and connections need descriptors.
#[test]
fn serve_raises_its_descriptor_limit_to_the_hard_limit() {
    let limits = |pid: u32| -> (String, String) {
        let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap()
            .to_owned();
        let f: Vec<&str> = line.split_whitespace().collect();
        (f[3].to_owned(), f[4].to_owned())
    };
    let (_, hard) = limits(std::process::id());
    if hard == "unlimited" || hard.parse::<u64>().unwrap() <= 256 {
        // Nothing to raise to: a soft limit can be lowered below the hard
        // one only when there is room.
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // util-linux's prlimit starts the broker with the soft limit lowered.
    let mut cmd = Command::new("prlimit");
    cmd.arg("--nofile=256:")
        .arg(BIN)
        .arg("serve")
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .args(["--kafka-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .args(["--amqp-addr", "127.0.0.1:0"])
        .env("SLUICE_LOG", "warn");
    let (mut child, _) = spawn_until_listening(cmd);
    assert_eq!(limits(child.id()), (hard.clone(), hard));
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn topics_lifecycle() {
    let b = Broker::start();
    assert!(b.data.is_dir());
    assert_eq!(b.http_get("/healthz"), (200, "ok\n".to_string()));

    let out = b.ok(&[
        "topic",
        "create",
        "orders",
        "--partitions",
        "2",
        "--config",
        "retention.ms=60000",
    ]);
    assert!(out.contains("created topic orders"), "{out}");
    // A second create of the same name fails.
    let again = b.run(&["topic", "create", "orders"]);
    assert!(!again.status.success());

    let list = b.ok(&["topic", "list"]);
    assert!(list.lines().any(|l| l == "orders"), "{list}");

    let d = b.ok(&["topic", "describe", "orders"]);
    assert!(
        d.contains("Topic: orders\tPartitions: 2\tReplicationFactor: 1"),
        "{d}"
    );
    assert!(d.contains("retention.ms=60000\t(override)"), "{d}");

    b.ok(&[
        "topic",
        "alter",
        "orders",
        "--partitions",
        "3",
        "--config",
        "segment.bytes=1048576",
    ]);
    let d = b.ok(&["topic", "describe", "orders"]);
    assert!(d.contains("Partitions: 3"), "{d}");
    // The earlier override survives an alter of another key.
    assert!(d.contains("retention.ms=60000\t(override)"), "{d}");
    assert!(d.contains("segment.bytes=1048576\t(override)"), "{d}");

    b.ok(&[
        "topic",
        "alter",
        "orders",
        "--delete-config",
        "retention.ms",
    ]);
    let d = b.ok(&["topic", "describe", "orders"]);
    assert!(d.contains("retention.ms=604800000\t(default)"), "{d}");
    assert!(d.contains("segment.bytes=1048576\t(override)"), "{d}");

    // Shrinking is refused.
    assert!(!b
        .run(&["topic", "alter", "orders", "--partitions", "1"])
        .status
        .success());

    let (status, body) = b.http_get("/api/v1/topics");
    assert_eq!(status, 200, "{body}");
    let topics: Value = serde_json::from_str(&body).unwrap();
    let orders = topics
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "orders")
        .unwrap_or_else(|| panic!("no orders in {body}"));
    assert_eq!(orders["partitions"].as_array().unwrap().len(), 3);
    assert_eq!(orders["partitions"][0]["log_end_offset"], 0);

    b.ok(&["topic", "delete", "orders"]);
    let list = b.ok(&["topic", "list"]);
    assert!(!list.lines().any(|l| l == "orders"), "{list}");
    assert!(!b.run(&["topic", "describe", "orders"]).status.success());

    let status = b.terminate();
    assert!(
        status.success(),
        "SIGTERM must end the broker cleanly: {status}"
    );
}

#[test]
fn produce_then_consume_json_round_trips_keys_values_and_headers() {
    let b = Broker::start();
    b.ok(&["topic", "create", "lines", "--partitions", "1"]);
    let input = "k1:v1\nk2:hello: world\n:empty key\nno separator\n\nk\u{e9}:caf\u{e9}\r\n";
    let out = b.run_with_stdin(
        &[
            "produce",
            "lines",
            "--key-separator",
            ":",
            "--header",
            "source=test",
            "--header",
            "eq=a=b",
            "--compression",
            "lz4",
        ],
        input.as_bytes(),
    );
    assert_success(&out, &["produce"]);
    let summary = String::from_utf8_lossy(&out.stderr);
    assert!(
        summary.contains("produced 6 of 6 record(s) to lines"),
        "{summary}"
    );

    let before = now_ms() - 60_000;
    let out = b.ok(&[
        "consume",
        "lines",
        "--from-beginning",
        "--format",
        "json",
        "--max-messages",
        "6",
        "--timeout-ms",
        "20000",
    ]);
    let headers = json!([{"key": "source", "value": "test"}, {"key": "eq", "value": "a=b"}]);
    let expected = [
        (json!("k1"), "v1"),
        (json!("k2"), "hello: world"),
        (json!(""), "empty key"),
        (Value::Null, "no separator"),
        (Value::Null, ""),
        (json!("k\u{e9}"), "caf\u{e9}"),
    ];
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), expected.len(), "{out}");
    for (i, (line, (key, value))) in lines.iter().zip(expected.iter()).enumerate() {
        let mut got: Value = serde_json::from_str(line).unwrap();
        let ts = got["timestamp"]
            .as_i64()
            .unwrap_or_else(|| panic!("{line}"));
        assert!(ts >= before && ts <= now_ms() + 60_000, "{line}");
        got.as_object_mut().unwrap().remove("timestamp");
        let want = json!({
            "topic": "lines", "partition": 0, "offset": i, "key": key, "value": value,
            "headers": headers,
        });
        assert_eq!(got, want);
    }

    // Text output with keys, from an offset.
    let out = b.ok(&[
        "consume",
        "lines",
        "--offset",
        "4",
        "--print-key",
        "--max-messages",
        "2",
        "--timeout-ms",
        "20000",
    ]);
    assert_eq!(out, "\t\nk\u{e9}\tcaf\u{e9}\n");

    // A timestamp after every record: nothing to read.
    let out = b.ok(&[
        "consume",
        "lines",
        "--timestamp",
        &(now_ms() + 3_600_000).to_string(),
        "--timeout-ms",
        "1500",
    ]);
    assert_eq!(out, "");
    // A timestamp before every record: all of them.
    let out = b.ok(&[
        "consume",
        "lines",
        "--timestamp",
        &before.to_string(),
        "--timeout-ms",
        "3000",
    ]);
    assert_eq!(out.lines().count(), 6, "{out}");
}

#[test]
fn consumer_group_commits_resumes_and_reports_lag() {
    let b = Broker::start();
    b.ok(&["topic", "create", "jobs", "--partitions", "2"]);
    let input: String = (0..10).map(|i| format!("key{i}:job{i}\n")).collect();
    let out = b.run_with_stdin(
        &["produce", "jobs", "--key-separator", ":"],
        input.as_bytes(),
    );
    assert_success(&out, &["produce"]);

    let consume = |max: &str| {
        b.ok(&[
            "consume",
            "jobs",
            "--group",
            "workers",
            "--from-beginning",
            "--max-messages",
            max,
            "--timeout-ms",
            "15000",
        ])
    };
    let first = consume("4");
    assert_eq!(first.lines().count(), 4, "{first}");
    assert_eq!(total_lag(&b.ok(&["group", "describe", "workers"])), 6);

    let list = b.ok(&["group", "list"]);
    assert!(list.lines().any(|l| l.starts_with("workers ")), "{list}");

    let second = consume("6");
    // Nothing is left for the group.
    let rest = b.ok(&[
        "consume",
        "jobs",
        "--group",
        "workers",
        "--from-beginning",
        "--timeout-ms",
        "2000",
    ]);
    assert_eq!(rest, "");
    let mut all: Vec<&str> = first.lines().chain(second.lines()).collect();
    assert_eq!(all.len(), 10, "first:\n{first}\nsecond:\n{second}");
    all.sort_unstable();
    let mut want: Vec<String> = (0..10).map(|i| format!("job{i}")).collect();
    want.sort_unstable();
    assert_eq!(all, want);
    assert_eq!(total_lag(&b.ok(&["group", "describe", "workers"])), 0);

    // Dry run changes nothing; --execute rewinds the group.
    let plan = b.ok(&[
        "group",
        "reset-offsets",
        "workers",
        "--topic",
        "jobs",
        "--to-earliest",
    ]);
    assert!(plan.contains("dry run"), "{plan}");
    assert_eq!(total_lag(&b.ok(&["group", "describe", "workers"])), 0);
    b.ok(&[
        "group",
        "reset-offsets",
        "workers",
        "--topic",
        "jobs",
        "--to-earliest",
        "--execute",
    ]);
    assert_eq!(total_lag(&b.ok(&["group", "describe", "workers"])), 10);
    b.ok(&[
        "group",
        "reset-offsets",
        "workers",
        "--topic",
        "jobs",
        "--to-offset",
        "1000000",
        "--execute",
    ]);
    assert_eq!(total_lag(&b.ok(&["group", "describe", "workers"])), 0);

    // An explicit --offset overrides the committed offsets (now at the end).
    let replay = b.ok(&[
        "consume",
        "jobs",
        "--group",
        "workers",
        "--offset",
        "0",
        "--max-messages",
        "10",
        "--timeout-ms",
        "15000",
    ]);
    assert_eq!(replay.lines().count(), 10, "{replay}");
    assert_eq!(total_lag(&b.ok(&["group", "describe", "workers"])), 0);

    // A group with a live member refuses a reset.
    let member = sluice_cmd()
        .args([
            "consume",
            "jobs",
            "--group",
            "workers",
            "--bootstrap",
            &b.kafka.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let member = KillOnDrop(member);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = b.ok(&["group", "describe", "workers"]);
        if d.contains("Members: 1") {
            break;
        }
        assert!(Instant::now() < deadline, "member never joined:\n{d}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let refused = b.run(&[
        "group",
        "reset-offsets",
        "workers",
        "--topic",
        "jobs",
        "--to-earliest",
        "--execute",
    ]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("active member"), "{stderr}");
    drop(member);
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Records the group has not consumed, from `group describe` output: the LAG
/// column, or the whole LOG-END-OFFSET (the topics here start at 0) of a
/// partition without a committed offset ("-").
fn total_lag(describe: &str) -> i64 {
    let mut rows = describe
        .lines()
        .skip_while(|l| !l.starts_with("TOPIC"))
        .skip(1)
        .peekable();
    assert!(rows.peek().is_some(), "no offsets table in:\n{describe}");
    rows.map(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        let lag = match (cols.get(2), cols.get(4)) {
            (Some(&"-"), Some(&"-")) => cols.get(3),
            _ => cols.get(4),
        };
        lag.and_then(|c| c.parse::<i64>().ok())
            .unwrap_or_else(|| panic!("bad row {l:?} in:\n{describe}"))
    })
    .sum()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A client-chosen string (here a group id) with a newline in it cannot forge a
/// log line: the broker escapes control characters inside each event.
#[test]
fn client_strings_cannot_forge_log_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let log_path = tmp.path().join("broker.log");
    /// Kills the broker however the test ends.
    struct Killed(Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = sluice_cmd()
        .arg("serve")
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .args(["--kafka-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .args(["--amqp-addr", "127.0.0.1:0"])
        .args(["--group-initial-rebalance-delay-ms", "0"])
        .env("SLUICE_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let child = Killed(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let kafka = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("kafka="))
        .unwrap_or_else(|| panic!("no kafka= in {line:?}"))
        .to_string();
    let created = sluice_cmd()
        .args(["topic", "create", "jobs", "--bootstrap", &kafka])
        .output()
        .unwrap();
    assert_success(&created, &["topic", "create"]);
    let group = "evil\nFORGED ERROR sluice: disk on fire\r";
    let out = sluice_cmd()
        .args(["consume", "jobs", "--group", group, "--from-beginning"])
        .args(["--max-messages", "1", "--timeout-ms", "3000"])
        .args(["--bootstrap", &kafka])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_output(out, Duration::from_secs(60));
    assert_success(&out, &["consume"]);
    drop(child);
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains(r"evil\nFORGED ERROR sluice: disk on fire\r"),
        "the group id is logged, escaped:\n{log}"
    );
    assert!(
        !log.lines().any(|l| l.starts_with("FORGED")),
        "a forged line:\n{log}"
    );
}

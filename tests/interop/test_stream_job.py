"""The event-processing engine's golden exactly-once test: a job reading a
topic and writing per-key window counts to a topic
(`crates/stream/examples/topic_window_count.rs`, checkpoints in a local
directory, a transactional Kafka sink) is killed with SIGKILL at random
points and started again several times, once at another parallelism. What a
read_committed consumer then reads from the output topic must equal the
failure-free result exactly: every window of every key once, with its full
count. A second test checks the same job's output without failures, and that
read_uncommitted readers see nothing twice either once the job is done.
"""

import json
import os
import random
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from conftest import sluice_bin
from kutil import metric_samples, scrape_metrics, unique
from test_transactions import create, read

WINDOW_MS = 100
KEYS = [f"key-{k}" for k in range(40)]
RECORDS = 60_000
# Event times an hour back: far older ones would fall to the topics'
# retention (7 days by record timestamp) while the test runs.
BASE_TIME = (int(time.time()) - 3600) * 1000


def job_binary():
    path = Path(os.environ.get("SLUICE_STREAM_JOB", Path(sluice_bin()).parent / "examples" / "topic_window_count"))
    if not path.exists():
        pytest.skip(f"no job binary at {path} (the build step makes it)")
    return str(path)


def produce_input(bootstrap, topic):
    """Record i: key KEYS[i % 40], event time BASE + i ms; each partition
    gets its records in time order, so none is late."""
    p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5, "enable.idempotence": True})
    for i in range(RECORDS):
        key = KEYS[(i * 7) % len(KEYS)]
        p.produce(topic, key=key, value=str(i), timestamp=BASE_TIME + i)
        if i % 10_000 == 0:
            p.poll(0)
    assert p.flush(60) == 0


def expected_counts(running=False):
    if running:
        # Each key's records come from one partition, in order: its running
        # count goes 1, 2, ... whatever the interleaving of keys.
        per_key = Counter(KEYS[(i * 7) % len(KEYS)] for i in range(RECORDS))
        return sorted(f"{k}|{n}" for k, total in per_key.items() for n in range(1, total + 1))
    counts = Counter()
    for i in range(RECORDS):
        key = KEYS[(i * 7) % len(KEYS)]
        t = BASE_TIME + i
        counts[(key, t - t % WINDOW_MS)] += 1
    return sorted(f"{k}|{start},{n}" for (k, start), n in counts.items())


def read_output(bootstrap, topic, isolation, expect):
    from confluent_kafka import Consumer
    import uuid

    c = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": uuid.uuid4().hex,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "isolation.level": isolation,
    })
    c.subscribe([topic])
    got = []
    deadline = time.monotonic() + 90
    quiet = time.monotonic()
    try:
        while time.monotonic() < deadline:
            m = c.poll(0.2)
            if m is None:
                if len(got) >= expect and time.monotonic() - quiet > 3:
                    break
                continue
            if m.error():
                continue
            got.append(f"{m.key().decode()}|{m.value().decode()}")
            quiet = time.monotonic()
    finally:
        c.close()
    return sorted(got)


def offsets_of(bootstrap, topic):
    """Per partition of `topic`: (log start, high watermark, last stable
    offset): a transaction left open shows as an LSO below the high mark."""
    import uuid

    out = {}
    for isolation in ("read_uncommitted", "read_committed"):
        c = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex,
                      "isolation.level": isolation})
        try:
            md = c.list_topics(topic, timeout=10).topics[topic]
            for p in sorted(md.partitions):
                low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)
                out.setdefault(p, [low])
                out[p].append(high)
        finally:
            c.close()
    return {p: tuple(v) for p, v in out.items()}


def assert_same_results(got, want, bootstrap, topic, log_path, what):
    """`got` (sorted) is exactly `want`: else a short account (how many
    missing, extra and twice, a few of each, the topic's offsets and the
    job log's tail) instead of a diff of tens of thousands of lines."""
    if got == want:
        return
    counts = Counter(got)
    dupes = sorted(k for k, n in counts.items() if n > 1)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    raise AssertionError(
        f"{what}: read {len(got)} results, want {len(want)}: missing {len(missing)} "
        f"(e.g. {missing[:5]}), unexpected {len(extra)} (e.g. {extra[:5]}), "
        f"twice {len(dupes)} (e.g. {dupes[:5]}); offsets (start, high, stable) "
        f"{offsets_of(bootstrap, topic)}; job log tail:\n{Path(log_path).read_text()[-3000:]}")


def start_job(bootstrap, src, out, checkpoints, parallelism, log, running=False, extra=(), pause_every=3):
    args = [
        job_binary(),
        "--bootstrap", bootstrap,
        "--input", src,
        "--output", out,
        "--checkpoints", str(checkpoints),
        "--window-ms", str(WINDOW_MS),
        "--parallelism", str(parallelism),
        "--checkpoint-ms", "150",
        "--pause-every", str(pause_every),
        "--transactional-id-prefix", out,
        # Small fetches interleave the partitions a subtask reads, so its
        # watermark (the least of theirs) rises all along, windows fire all
        # along and every checkpoint has output to commit.
        "--consumer-property", "max.partition.fetch.bytes=8192",
        "--bounded",
    ] + (["--running-count"] if running else []) + list(extra)
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)


def latest_complete(checkpoints):
    ids = [int(p.parent.name[4:]) for p in Path(checkpoints).glob("chk-*/_complete")]
    return max(ids, default=0)


def kill_when_checkpoint_completes(job, checkpoints, after, delay=0.0, timeout=60.0):
    """SIGKILLs `job` `delay` seconds after a checkpoint later than `after`
    is complete in the store. With no delay that is before its sinks have
    committed what they pre-committed for it, more often than not, so the
    next run must commit those transactions. False if the job ended first."""
    next_one = Path(checkpoints) / f"chk-{after + 1}/_complete"
    deadline = time.monotonic() + timeout
    polls = 0
    while time.monotonic() < deadline and job.poll() is None:
        polls += 1
        # The next id is checked on every poll to kill the moment it lands;
        # the whole store now and then in case that checkpoint was declined.
        if next_one.exists() or (polls % 500 == 0 and latest_complete(checkpoints) > after):
            if delay:
                try:
                    job.wait(delay)
                    return False
                except subprocess.TimeoutExpired:
                    pass
            job.send_signal(signal.SIGKILL)
            return True
    return False


@pytest.mark.parametrize(
    "running,changelog",
    [(False, False), (True, False), (False, True), (True, True)],
    ids=["window-counts", "running-counts", "window-counts-changelog", "running-counts-changelog"],
)
def test_killed_and_restored_job_writes_exactly_the_failure_free_output(broker, tmp_path, running, changelog):
    """Window counts are the issue's aggregate; running counts give every
    checkpoint output to commit, so a kill as a checkpoint completes finds
    pre-committed transactions the next run must commit. With `changelog`
    the keyed state lives in compacted changelog topics, Kafka Streams
    style, and every restore rebuilds it from there."""
    src, out = unique("clicks"), unique("counts")
    state_args = ("--changelog", out + "-state") if changelog else ()
    create(broker.bootstrap, src, partitions=3)
    create(broker.bootstrap, out, partitions=2)
    produce_input(broker.bootstrap, src)
    checkpoints = tmp_path / "checkpoints"
    log_path = tmp_path / "job.log"
    rng = random.Random(int(os.environ.get("SLUICE_STREAM_SEED", "7")))
    # The first run is killed at a random time, whether or not it completed
    # a checkpoint (if not, the next starts afresh and must abort the
    # transactions it left open). Each later one but the last is killed at a
    # random moment after a checkpoint of its own completes, so it always has
    # something to restore from: the second at another parallelism, the third
    # the moment its checkpoint completes. The last runs to the end.
    plan = [
        (2, ("at random", rng.uniform(1.0, 2.5))),
        (3, ("after a checkpoint", rng.uniform(0.2, 1.0))),
        (2, ("after a checkpoint", 0.0)),
        (2, ("after a checkpoint", rng.uniform(0.0, 0.8))),
        (2, None),
    ]
    killed = 0
    restored_from = []
    with open(log_path, "w") as log:
        for parallelism, kill in plan:
            first = latest_complete(checkpoints) if checkpoints.exists() else 0
            if first:
                restored_from.append(first)
            job = start_job(broker.bootstrap, src, out, checkpoints, parallelism, log, running, state_args)
            try:
                if kill is None:
                    assert job.wait(180) == 0, f"the last run failed; log:\n{log_path.read_text()[-4000:]}"
                    continue
                when, delay = kill
                if when == "after a checkpoint":
                    if kill_when_checkpoint_completes(job, checkpoints, first, delay):
                        job.wait(30)
                        killed += 1
                    else:
                        # Ended before its kill: the next run restores from
                        # the final checkpoint and has nothing left to do.
                        assert job.wait(30) == 0, log_path.read_text()[-4000:]
                    continue
                try:
                    assert job.wait(delay) == 0, log_path.read_text()[-4000:]
                except subprocess.TimeoutExpired:
                    job.send_signal(signal.SIGKILL)
                    job.wait(30)
                    killed += 1
            finally:
                if job.poll() is None:
                    job.kill()
                    job.wait(30)
    text = log_path.read_text()
    assert killed >= 3, f"runs ended before their kill; log:\n{text[-4000:]}"
    # Every run that started with a complete checkpoint in the store restored
    # from the latest one, and no other run restored at all.
    logged = [int(n) for n in re.findall(r"restoring from checkpoint (\d+)", text)]
    assert logged == restored_from, f"runs restored from {logged}, not {restored_from}; log:\n{text[-4000:]}"
    assert len(restored_from) >= len(plan) - 2, f"too few runs had a checkpoint to restore: {restored_from}"
    want = expected_counts(running)
    got = read_output(broker.bootstrap, out, "read_committed", expect=len(want))
    assert_same_results(got, want, broker.bootstrap, out, log_path, "read_committed after the runs")
    if changelog:
        # The keyed stage's state went to its changelog, not the checkpoints.
        logged = changelog_records(broker.bootstrap, out + "-state-s1-changelog")
        assert logged > 0, "the changelog holds no committed record"


def changelog_records(bootstrap, topic):
    """Committed records in every partition of `topic`, read to its end."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("g"),
                  "isolation.level": "read_committed", "enable.partition.eof": True,
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    try:
        md = c.list_topics(topic, timeout=10).topics[topic]
        assert md.error is None, md.error
        c.assign([TopicPartition(topic, p, 0) for p in md.partitions])
        count, ended = 0, set()
        deadline = time.monotonic() + 60
        while len(ended) < len(md.partitions) and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is None:
                continue
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    ended.add(m.partition())
                    continue
                raise AssertionError(m.error())
            count += 1
        assert len(ended) == len(md.partitions), "the changelog was not read to its end"
        return count
    finally:
        c.close()


def test_a_job_run_without_failures_writes_each_window_once(broker, tmp_path):
    src, out = unique("clicks"), unique("counts")
    create(broker.bootstrap, src, partitions=3)
    create(broker.bootstrap, out, partitions=2)
    produce_input(broker.bootstrap, src)
    with open(tmp_path / "job.log", "w") as log:
        job = start_job(broker.bootstrap, src, out, tmp_path / "checkpoints", 2, log)
        assert job.wait(180) == 0, (tmp_path / "job.log").read_text()[-4000:]
    want = expected_counts()
    log_path = tmp_path / "job.log"

    def same(isolation, what):
        got = read_output(broker.bootstrap, out, isolation, expect=len(want))
        assert_same_results(got, want, broker.bootstrap, out, log_path, what)

    same("read_committed", "read_committed after the run")
    # Nothing aborted either: the job wrote every result exactly once.
    same("read_uncommitted", "read_uncommitted after the run")
    # Run again, it restores from the final checkpoint: nothing left to do.
    with open(log_path, "a") as log:
        job = start_job(broker.bootstrap, src, out, tmp_path / "checkpoints", 3, log)
        assert job.wait(180) == 0, log_path.read_text()[-4000:]
    assert "restoring from checkpoint" in log_path.read_text()
    same("read_uncommitted", "read_uncommitted after a run restored from the final checkpoint")


def job_cli(broker, *args, timeout=90):
    """`sluice job <args>` against the broker's HTTP port; its stdout."""
    cmd = [sluice_bin(), "job", *args, "--http", broker.http]
    cp = subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert cp.returncode == 0, f"`{' '.join(cmd)}` exited {cp.returncode}: {cp.stderr.decode(errors='replace')}"
    return cp.stdout.decode()


def wait_listed(broker, job, log_path, timeout=30):
    """The id of the one job `sluice job list` shows running with `job`'s pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert job.poll() is None, f"the job ended early; log:\n{log_path.read_text()[-4000:]}"
        for j in json.loads(job_cli(broker, "list", "--json")):
            if j["pid"] == job.pid and j["state"] == "RUNNING":
                return j["id"]
        time.sleep(0.2)
    raise AssertionError("the job never showed up in `sluice job list`")


@pytest.mark.parametrize("changelog", [False, True], ids=["checkpoint-state", "changelog-state"])
def test_a_job_is_listed_cancelled_and_restored_from_a_savepoint_at_another_parallelism(broker, tmp_path, changelog):
    """The job reports to the broker: `sluice job list` shows it, `sluice job
    cancel` stops it, `sluice job savepoint` writes a savepoint while it runs
    and `--stop` ends it there. A run started from that savepoint at another
    parallelism (with no checkpoints of its own) finishes the work: the
    read_committed output is exactly the failure-free result. With a state
    changelog the savepoint holds the keyed state itself, and the restored
    run writes it to the changelog afresh."""
    src, out = unique("clicks"), unique("counts")
    state_args = ["--changelog", out + "-state"] if changelog else []
    create(broker.bootstrap, src, partitions=3)
    create(broker.bootstrap, out, partitions=2)
    produce_input(broker.bootstrap, src)
    log_path = tmp_path / "job.log"
    report = ["--report-to", broker.http]
    savepoints = tmp_path / "savepoints"
    with open(log_path, "w") as log:
        # Cancel: a run writing elsewhere, stopped on request.
        spare = unique("spare")
        create(broker.bootstrap, spare, partitions=1)
        job = start_job(broker.bootstrap, src, spare, tmp_path / "spare-checkpoints", 2, log,
                        extra=report, pause_every=1)
        try:
            spare_id = wait_listed(broker, job, log_path)
            job_cli(broker, "cancel", spare_id)
            assert job.wait(60) == 0, log_path.read_text()[-4000:]
        finally:
            if job.poll() is None:
                job.kill()
        assert json.loads(job_cli(broker, "status", spare_id))["state"] == "CANCELED"

        # Savepoints: one while running, then one that stops the job.
        job = start_job(broker.bootstrap, src, out, tmp_path / "checkpoints", 2, log,
                        extra=report + state_args, pause_every=1)
        try:
            job_id = wait_listed(broker, job, log_path)
            time.sleep(1)
            first = Path(job_cli(broker, "savepoint", job_id, "--dir", str(savepoints)).strip())
            assert list(first.glob("chk-*/_complete")), f"no complete checkpoint in {first}"
            stopped_at = Path(job_cli(broker, "savepoint", job_id, "--dir", str(savepoints), "--stop").strip())
            assert job.wait(60) == 0, log_path.read_text()[-4000:]
        finally:
            if job.poll() is None:
                job.kill()
        status = json.loads(job_cli(broker, "status", job_id))
        assert status["state"] == "CANCELED", status
        assert [s["state"] for s in status["savepoints"]] == ["COMPLETED", "COMPLETED"], status
        # Per-stage figures: the topic stage read records and sent them on to
        # the window stage, which took them in; state went into checkpoints.
        stages = status["metrics"]
        assert [m["name"] for m in stages] == [s["name"] for s in status["stages"]], stages
        for m, s in zip(stages, status["stages"]):
            assert len(m["subtasks"]) == s["parallelism"], m
        assert stages[0]["records_in"] > 0 and stages[0]["records_out"] > 0, stages
        assert stages[-1]["records_in"] > 0, stages
        assert stages[-1]["records_in"] <= stages[0]["records_out"], stages
        # Each source subtask's watermark is its partitions' least; the stage's
        # is its least subtask's, none while one has not got one yet.
        marks = [s["watermark"] for s in stages[0]["subtasks"]]
        assert any(isinstance(w, int) for w in marks), json.dumps(stages, indent=1)
        if None in marks:
            assert stages[0]["watermark"] is None, stages[0]
        assert status["checkpoints"]["last_size_bytes"] > 0, status["checkpoints"]
        # The node's /metrics shows the same figures from the job's last report.
        node = scrape_metrics(broker.http)
        job_label = {"job": job_id}
        assert metric_samples(node, "sluice_stream_job_running", **job_label)[0].value == 0
        assert metric_samples(node, "sluice_stream_job_checkpoints_completed", **job_label)[0].value == \
            status["checkpoints"]["completed"]
        for m in stages:
            got = metric_samples(node, "sluice_stream_stage_records_in", job=job_id, stage=m["name"])
            assert got and got[0].value == m["records_in"], (m["name"], got)
        # The stopped run had work left: the savepoint is not its end.
        partial = read_output(broker.bootstrap, out, "read_committed", expect=0)
        want = expected_counts()
        assert len(partial) < len(want), "the job finished before it was stopped"

        job = start_job(broker.bootstrap, src, out, tmp_path / "fresh-checkpoints", 3, log,
                        extra=["--from-savepoint", str(stopped_at)] + state_args)
        assert job.wait(180) == 0, log_path.read_text()[-4000:]
    assert f"restoring from savepoint {stopped_at}" in log_path.read_text()
    got = read_output(broker.bootstrap, out, "read_committed", expect=len(want))
    assert_same_results(got, want, broker.bootstrap, out, log_path, "read_committed after the savepoint run")


def test_the_word_count_example_counts_each_word_per_window(broker, tmp_path):
    """crates/stream/examples/topic_word_count.rs over a topic of lines with
    timestamps 250 ms apart: its printed counts per one-second window and word
    are what counting them directly gives."""
    binary = Path(job_binary()).parent / "topic_word_count"
    if not binary.exists():
        pytest.skip(f"no example binary at {binary}")
    src = unique("lines")
    create(broker.bootstrap, src, partitions=2)
    verses = [
        "To be, or not to be, that is the question:",
        "Whether 'tis nobler in the mind to suffer",
        "The slings and arrows of outrageous fortune,",
        "Or to take arms against a sea of troubles",
    ]
    p = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all"})
    want = Counter()
    for i in range(400):
        line, t = verses[i % len(verses)], BASE_TIME + i * 250
        p.produce(src, value=line.encode(), timestamp=t)
        for word in re.findall(r"[^\W_]+", line):
            want[(t - t % 1000, word.lower())] += 1
    assert p.flush(30) == 0
    out = subprocess.run(
        [str(binary), "--bootstrap", broker.bootstrap, "--input", src,
         "--window-ms", "1000", "--parallelism", "2", "--bounded"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    got = Counter()
    for row in out.stdout.splitlines():
        start, word, count = row.split("\t")
        assert (int(start), word) not in got, f"window {start} of {word!r} printed twice"
        got[(int(start), word)] = int(count)
    assert got == want

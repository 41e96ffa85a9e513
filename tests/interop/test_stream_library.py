"""Library mode (Kafka Streams' deployment): instances of one job share its
input partitions through a consumer group. The job
(`crates/stream/examples/topic_library_map.rs`) copies each record to the
same partition of an output topic, exactly once, naming the instance that
wrote it. While input keeps arriving, instances are killed with SIGKILL and
started again, one more joins and dies, and one is paused past its
session and woken as a zombie, and a fourth joins for good: what a read_committed
consumer reads from the output must be every input record once, each
partition in its input order, and written by more than one instance.
"""

import os
import random
import signal
import subprocess
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from conftest import sluice_bin
from kutil import unique
from test_transactions import create

PARTITIONS = 4
RECORDS = 40_000
RATE = 4_000  # records a second
# Longer than the session timeout the instances are given (6 s).
PAUSE_S = 8


def job_binary():
    path = Path(os.environ.get("SLUICE_LIBRARY_JOB", Path(sluice_bin()).parent / "examples" / "topic_library_map"))
    if not path.exists():
        pytest.skip(f"no job binary at {path} (the build step makes it)")
    return str(path)


def produce_steadily(bootstrap, topic, done):
    """Record i goes to partition i % PARTITIONS with value i, at RATE a second."""
    p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5, "enable.idempotence": True})
    start = time.monotonic()
    for i in range(RECORDS):
        while i > (time.monotonic() - start) * RATE:
            time.sleep(0.005)
        p.produce(topic, key=f"k{i % 97}", value=str(i), partition=i % PARTITIONS)
        p.poll(0)
    assert p.flush(60) == 0
    done.set()


def start_instance(bootstrap, app, instance, src, out, log):
    args = [
        job_binary(),
        "--bootstrap", bootstrap,
        "--application-id", app,
        "--instance-id", instance,
        "--input", src,
        "--output", out,
        "--commit-ms", "100",
        "--property", "session.timeout.ms=6000",
        "--property", "heartbeat.interval.ms=500",
    ]
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)


def read_committed(bootstrap, topic, expect, timeout=120):
    """Per partition, the committed values in order and who wrote them."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("reader"),
                  "isolation.level": "read_committed", "enable.auto.commit": False,
                  "auto.offset.reset": "earliest"})
    c.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    values, writers = defaultdict(list), defaultdict(int)
    total, quiet = 0, time.monotonic()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            m = c.poll(0.2)
            if m is None:
                if total >= expect and time.monotonic() - quiet > 3:
                    break
                continue
            if m.error():
                continue
            values[m.partition()].append(int(m.value()))
            writers[dict(m.headers() or [])["instance"].decode()] += 1
            total += 1
            quiet = time.monotonic()
    finally:
        c.close()
    return values, writers


def test_instances_share_partitions_and_write_each_record_once_through_kills(broker, tmp_path):
    src, out, app = unique("orders"), unique("copies"), unique("app")
    create(broker.bootstrap, src, partitions=PARTITIONS)
    create(broker.bootstrap, out, partitions=PARTITIONS)
    rng = random.Random(int(os.environ.get("SLUICE_STREAM_SEED", "11")))
    log_path = tmp_path / "instances.log"
    produced = threading.Event()
    feeder = threading.Thread(target=produce_steadily, args=(broker.bootstrap, src, produced), daemon=True)
    running = {}
    kills = 0
    with open(log_path, "w") as log:
        def start(name):
            running[name] = start_instance(broker.bootstrap, app, name, src, out, log)

        def kill(name):
            nonlocal kills
            running[name].send_signal(signal.SIGKILL)
            running[name].wait(30)
            kills += 1

        try:
            start("a")
            start("b")
            feeder.start()
            # While the input flows: kill and restart each instance at a
            # random moment, add a third and kill it for good.
            time.sleep(rng.uniform(1.0, 2.0))
            kill("a")
            time.sleep(rng.uniform(0.2, 1.0))
            start("a")
            time.sleep(rng.uniform(1.0, 2.0))
            kill("b")
            time.sleep(rng.uniform(0.2, 1.0))
            start("b")
            time.sleep(rng.uniform(0.5, 1.5))
            start("c")
            time.sleep(rng.uniform(1.0, 2.0))
            # A paused instance outlives its session: the group gives its
            # partitions away, and when it wakes it is a zombie whose
            # commits the group refuses (its generation is over).
            running["a"].send_signal(signal.SIGSTOP)
            time.sleep(rng.uniform(0.2, 0.8))
            kill("c")
            time.sleep(PAUSE_S)
            running["a"].send_signal(signal.SIGCONT)
            # Three to the end: one of them has one partition for its two
            # source subtasks, so one subtask reads none and must still
            # take part in every commit.
            start("d")
            assert produced.wait(60), "the input was not all produced"
            values, writers = read_committed(broker.bootstrap, out, RECORDS)
            for name, job in running.items():
                assert job.poll() is None or name == "c", f"instance {name} ended; log:\n{log_path.read_text()[-4000:]}"
        finally:
            for job in running.values():
                if job.poll() is None:
                    job.send_signal(signal.SIGKILL)
                    job.wait(30)
    log_text = log_path.read_text()
    assert kills == 3
    # The kills moved partitions: the survivors and the restarted ran the
    # job again over new assignments (how many rebalances the changes
    # collapse into depends on timing; at least one after the first).
    generations = log_text.count("running the job over the partitions assigned")
    assert generations >= 4, f"{generations} generations; log:\n{log_text[-4000:]}"
    for p in range(PARTITIONS):
        want = list(range(p, RECORDS, PARTITIONS))
        got = values[p]
        if got != want:
            seen = set(got)
            missing = [v for v in want if v not in seen]
            twice = len(got) - len(seen)
            raise AssertionError(
                f"partition {p}: read {len(got)} values, want {len(want)}: missing {len(missing)} "
                f"(e.g. {missing[:5]}), twice {twice}, in order {got == sorted(got)}; "
                f"log tail:\n{log_text[-4000:]}")
    # The group shared the work: more than one instance wrote output.
    assert len([w for w, n in writers.items() if n > 0]) >= 2, writers


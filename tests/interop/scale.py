"""Many partitions on one broker, through confluent-kafka: create them with
the admin API, produce one record to each, read every one back, restart
the broker (cleanly and with SIGKILL) and read everything again.

Used by test_scale.py (25,000 partitions under a low descriptor limit, in
CI) and by the benchmark suite (`python scale.py --partitions 100000`),
which reports the figures this prints.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

PARTITIONS_PER_TOPIC = 100
# Topics per CreateTopics request: large requests, few round trips.
CREATE_CHUNK = 50


def value_of(topic, partition):
    return f"{topic}/{partition}".encode()


def create_topics(bootstrap, topics):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for i in range(0, len(topics), CREATE_CHUNK):
        chunk = topics[i:i + CREATE_CHUNK]
        futures = admin.create_topics(
            [NewTopic(t, PARTITIONS_PER_TOPIC, 1) for t in chunk], request_timeout=120)
        for t, f in futures.items():
            f.result(120)


# Topics one producer instance writes to. librdkafka's broker thread walks
# every partition its producer knows on each wake-up, so one producer over
# 100,000 partitions spends its time in that walk (the broker idles); a
# producer per few thousand partitions, as an application sharding its
# writers would have, keeps the client out of the measurement.
PRODUCER_TOPICS = 20


def produce_one_each(bootstrap, topics):
    """One record to every partition; returns the number acknowledged."""
    failed = []
    acked = [0]

    def delivered(err, msg):
        if err is not None:
            failed.append((msg.topic(), msg.partition(), err))
        else:
            acked[0] += 1

    for i in range(0, len(topics), PRODUCER_TOPICS):
        p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20,
                      "enable.idempotence": True, "message.timeout.ms": 600_000,
                      "request.timeout.ms": 300_000})
        for t in topics[i:i + PRODUCER_TOPICS]:
            for part in range(PARTITIONS_PER_TOPIC):
                p.produce(t, value_of(t, part), partition=part, on_delivery=delivered)
            p.poll(0)
        left = p.flush(300)
        if left or failed:
            raise AssertionError(f"{left} records undelivered, {len(failed)} failed: {failed[:5]}")
    return acked[0]


def read_all(bootstrap, topics, timeout=600):
    """Reads every partition from offset 0 until each gave its one record;
    raises when one is missing, duplicated or wrong."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "scale-check",
                  "enable.auto.commit": False, "enable.partition.eof": True,
                  "fetch.wait.max.ms": 100, "queued.max.messages.kbytes": 65536})
    want = {(t, part) for t in topics for part in range(PARTITIONS_PER_TOPIC)}
    c.assign([TopicPartition(t, part, 0) for t, part in sorted(want)])
    got = {}
    eof = set()
    deadline = time.monotonic() + timeout
    try:
        while len(eof) < len(want):
            if time.monotonic() > deadline:
                missing = sorted(want - set(got))[:5]
                raise AssertionError(
                    f"read {len(got)} of {len(want)} partitions in {timeout}s; missing e.g. {missing}")
            for m in c.consume(10_000, 1.0):
                key = (m.topic(), m.partition())
                if m.error():
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        eof.add(key)
                        continue
                    raise AssertionError(f"{key}: {m.error()}")
                if key in got:
                    raise AssertionError(f"{key}: a second record at offset {m.offset()}")
                if m.offset() != 0 or m.value() != value_of(*key):
                    raise AssertionError(f"{key}: offset {m.offset()} value {m.value()!r}")
                got[key] = m.offset()
    finally:
        c.close()
    if set(got) != want:
        raise AssertionError(f"{len(want - set(got))} partitions gave no record")
    return len(got)


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def open_descriptors(pid, under):
    """(all open descriptors, those on files under `under`)."""
    total = 0
    data = 0
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue  # closed meanwhile
        total += 1
        if target.startswith(str(under)):
            data += 1
    return total, data


def run(broker, topics, report):
    """The whole scenario against a started broker; `report(name, value)`
    gets each figure."""
    started = time.monotonic()
    create_topics(broker.bootstrap, topics)
    report("create_s", round(time.monotonic() - started, 1))
    started = time.monotonic()
    report("acked", produce_one_each(broker.bootstrap, topics))
    report("produce_s", round(time.monotonic() - started, 1))
    started = time.monotonic()
    report("read", read_all(broker.bootstrap, topics))
    report("read_s", round(time.monotonic() - started, 1))
    report("rss_mib", rss_bytes(broker.proc.pid) >> 20)
    report("fds", open_descriptors(broker.proc.pid, broker.data_dir))
    for how in ("clean", "kill9"):
        if how == "clean":
            assert broker.stop(timeout=300) == 0, "the broker did not stop cleanly"
        else:
            broker.kill9()
        started = time.monotonic()
        broker.start(timeout=300)
        report(f"restart_{how}_s", round(time.monotonic() - started, 2))
        report(f"rss_after_{how}_restart_mib", rss_bytes(broker.proc.pid) >> 20)
        started = time.monotonic()
        report(f"read_after_{how}", read_all(broker.bootstrap, topics))
        report(f"read_after_{how}_s", round(time.monotonic() - started, 1))
        report(f"fds_after_{how}", open_descriptors(broker.proc.pid, broker.data_dir))


def main():
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import Broker

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--partitions", type=int, default=100_000)
    ap.add_argument("--nofile", type=int, default=0, help="descriptor limit for the broker")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    args = ap.parse_args()
    topics = [f"scale-{i:04}" for i in range(args.partitions // PARTITIONS_PER_TOPIC)]
    figures = {}

    def report(name, value):
        figures[name] = value
        if not args.json:
            print(f"{name} {value}", flush=True)

    with tempfile.TemporaryDirectory(prefix="sluice-scale-") as tmp:
        launcher = ["prlimit", f"--nofile={args.nofile}:{args.nofile}"] if args.nofile else []
        b = Broker(Path(tmp) / "data", Path(tmp) / "broker.log", launcher=launcher,
                   env={"SLUICE_LOG": "warn"})
        b.start(timeout=300)
        try:
            run(b, topics, report)
        except BaseException:
            print(b.log_tail(40), file=sys.stderr)
            raise
        finally:
            b._kill_proc()
    if args.json:
        # The benchmark suite's row shape: a mode and a rate (none here).
        print(json.dumps({"mode": "scale", "partitions": args.partitions,
                          "records_per_sec": 0, **figures}))


if __name__ == "__main__":
    main()

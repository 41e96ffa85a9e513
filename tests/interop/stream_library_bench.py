"""Library mode's throughput: `--instances` instances of the example job
`topic_library_map` (each copies its share of a 4-partition topic to an
output topic, exactly once, committing every `--commit-ms`) on a fresh
broker, over `--records` records loaded before they start. The time runs
from the instances' start until the group's committed positions reach the
input's end: everything read is then written and committed.

Used by the benchmark suite (`python stream_library_bench.py --instances 2
--json`). Kafka Streams, the peer, cannot be run here (no Maven).
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

PARTITIONS = 4


def produce(bootstrap, topic, records):
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.num.messages": 10000,
                  "queue.buffering.max.messages": 1000000, "enable.idempotence": True})
    value = b"x" * 100
    for i in range(records):
        while True:
            try:
                p.produce(topic, key=str(i % 1000).encode(), value=value, partition=i % PARTITIONS)
                break
            except BufferError:
                p.poll(0.05)
    if p.flush(120) != 0:
        raise SystemExit("the input was not all acknowledged")


def committed_total(bootstrap, group, topic):
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                  "isolation.level": "read_committed"})
    try:
        got = c.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=10)
        return sum(max(tp.offset, 0) for tp in got)
    finally:
        c.close()


def main():
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import Broker

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=1)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--commit-ms", type=int, default=200)
    ap.add_argument("--parallelism", type=int, default=1)
    ap.add_argument("--job", default=os.environ.get(
        "SLUICE_LIBRARY_JOB",
        str(Path(os.environ.get("SLUICE_BIN", "sluice")).parent / "examples" / "topic_library_map")))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="sluice-stream-library-") as tmp:
        b = Broker(Path(tmp) / "data", Path(tmp) / "broker.log", env={"SLUICE_LOG": "warn"})
        b.start(timeout=120)
        jobs = []
        try:
            admin = AdminClient({"bootstrap.servers": b.bootstrap})
            for f in admin.create_topics([NewTopic("input", PARTITIONS, 1), NewTopic("copies", PARTITIONS, 1)]).values():
                f.result(60)
            produce(b.bootstrap, "input", args.records)
            logs = [open(Path(tmp) / f"instance-{i}.log", "w") for i in range(args.instances)]
            started = time.monotonic()
            for i in range(args.instances):
                jobs.append(subprocess.Popen(
                    [args.job, "--bootstrap", b.bootstrap, "--application-id", "bench", "--instance-id", str(i),
                     "--input", "input", "--output", "copies", "--parallelism", str(args.parallelism),
                     "--commit-ms", str(args.commit_ms)],
                    stdout=logs[i], stderr=subprocess.STDOUT))
            deadline = started + 1800
            while committed_total(b.bootstrap, "bench", "input") < args.records:
                for i, j in enumerate(jobs):
                    if j.poll() is not None:
                        raise SystemExit(f"instance {i} ended: {(Path(tmp) / f'instance-{i}.log').read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise SystemExit("the instances did not finish in time")
                time.sleep(0.1)
            seconds = time.monotonic() - started
            result = {
                "instances": args.instances,
                "records": args.records,
                "seconds": round(seconds, 3),
                "records_per_sec": round(args.records / seconds, 1),
            }
        finally:
            for j in jobs:
                if j.poll() is None:
                    j.send_signal(signal.SIGTERM)
                    j.wait(30)
            b.stop()
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()

"""Keyed state in checkpoints or in a changelog topic, side by side: the
example job `topic_window_count --running-count` (a running count per key,
exactly-once output) over a topic of `--records` records with `--keys`
distinct keys, on a fresh broker, checkpointing every `--checkpoint-ms`.

Used by the benchmark suite (`python stream_state_bench.py --state changelog
--json`); prints records per second of the whole bounded run and what the
checkpoint store holds at its end (the changelog keeps the state in the
topic instead).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic


def produce(bootstrap, topic, records, keys):
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.num.messages": 10000,
                  "queue.buffering.max.messages": 1000000, "enable.idempotence": True})
    base = int(time.time() * 1000) - records
    for i in range(records):
        while True:
            try:
                p.produce(topic, key=f"key-{i % keys}".encode(), value=b"x", timestamp=base + i)
                break
            except BufferError:
                p.poll(0.05)
    if p.flush(120) != 0:
        raise SystemExit("the input was not all acknowledged")


def directory_bytes(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main():
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import Broker

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--state", choices=["checkpoint", "changelog"], default="checkpoint")
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--checkpoint-ms", type=int, default=1000)
    ap.add_argument("--parallelism", type=int, default=2)
    ap.add_argument("--job", default=os.environ.get(
        "SLUICE_STREAM_JOB",
        str(Path(os.environ.get("SLUICE_BIN", "sluice")).parent / "examples" / "topic_window_count")))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="sluice-stream-state-") as tmp:
        b = Broker(Path(tmp) / "data", Path(tmp) / "broker.log", env={"SLUICE_LOG": "warn"})
        b.start(timeout=120)
        try:
            admin = AdminClient({"bootstrap.servers": b.bootstrap})
            for f in admin.create_topics([NewTopic("input", 4, 1), NewTopic("counts", 4, 1)]).values():
                f.result(60)
            produce(b.bootstrap, "input", args.records, args.keys)
            checkpoints = Path(tmp) / "checkpoints"
            cmd = [args.job, "--bootstrap", b.bootstrap, "--input", "input", "--output", "counts",
                   "--checkpoints", str(checkpoints), "--parallelism", str(args.parallelism),
                   "--checkpoint-ms", str(args.checkpoint_ms), "--running-count", "--bounded",
                   "--transactional-id-prefix", "bench-counts"]
            if args.state == "changelog":
                cmd += ["--changelog", "bench-state"]
            started = time.monotonic()
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            seconds = time.monotonic() - started
            if run.returncode != 0:
                raise SystemExit(f"the job failed: {run.stdout[-2000:]}{run.stderr[-2000:]}")
            completed = sorted(checkpoints.glob("chk-*/_complete"))
            latest = max((int(p.parent.name[4:]) for p in completed), default=0)
            result = {
                "state": args.state,
                "records": args.records,
                "keys": args.keys,
                "seconds": round(seconds, 3),
                "records_per_sec": round(args.records / seconds, 1),
                "checkpoints": len(completed),
                "latest_checkpoint_bytes": directory_bytes(checkpoints / f"chk-{latest}") if latest else 0,
            }
        finally:
            b.stop()
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()

"""How long a consumer group takes to give a joining member its share, with
the classic protocol (librdkafka's eager `range` assignment, the default)
or the consumer protocol (KIP-848, `group.protocol=consumer`), each with
its defaults on the client and on a fresh broker.

Two members consume a 12-partition topic; a third joins `--rounds` times
(leaving again in between). A round's time runs from the third member's
subscribe to the moment all three own four partitions each, and records
produced meanwhile are still read: the time a group's consumption is
disturbed by a member joining. Used by the benchmark suite
(`python group_rebalance_bench.py --protocol consumer --json`).
"""

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

PARTITIONS = 12


class Member:
    def __init__(self, bootstrap, group, topic, protocol, name):
        conf = {"bootstrap.servers": bootstrap, "group.id": group, "client.id": name,
                "auto.offset.reset": "earliest", "enable.auto.commit": True}
        if protocol == "consumer":
            conf["group.protocol"] = "consumer"
        self.consumer = Consumer(conf)
        self.owned = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.topic = topic
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def on_assign(self, _, partitions):
        with self.lock:
            self.owned |= {p.partition for p in partitions}

    def on_revoke(self, _, partitions):
        with self.lock:
            self.owned -= {p.partition for p in partitions}

    def run(self):
        self.consumer.subscribe([self.topic], on_assign=self.on_assign, on_revoke=self.on_revoke,
                                on_lost=self.on_revoke)
        while not self.stop.is_set():
            self.consumer.consume(num_messages=500, timeout=0.05)
        self.consumer.close()

    def close(self):
        self.stop.set()
        self.thread.join(30)

    def count(self):
        with self.lock:
            return len(self.owned)


def wait_shares(members, share, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(m.count() == share for m in members):
            return
        time.sleep(0.01)
    raise SystemExit(f"no {share}-partition share each within {timeout} s: {[m.count() for m in members]}")


def main():
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import Broker

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--protocol", choices=["classic", "consumer"], default="consumer")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="sluice-rebalance-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        broker = Broker(data, Path(tmp) / "broker.log").start()
        try:
            admin = AdminClient({"bootstrap.servers": broker.bootstrap})
            admin.create_topics([NewTopic("rebalance", num_partitions=PARTITIONS,
                                          replication_factor=1)])["rebalance"].result(30)
            producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 5})
            for i in range(PARTITIONS * 100):
                producer.produce("rebalance", value=b"x", partition=i % PARTITIONS)
            producer.flush(30)
            members = [Member(broker.bootstrap, "bench", "rebalance", args.protocol, f"m{i}") for i in range(2)]
            wait_shares(members, PARTITIONS // 2)
            times = []
            for r in range(args.rounds):
                start = time.monotonic()
                third = Member(broker.bootstrap, "bench", "rebalance", args.protocol, f"joiner{r}")
                wait_shares(members + [third], PARTITIONS // 3)
                times.append((time.monotonic() - start) * 1000)
                third.close()
                wait_shares(members, PARTITIONS // 2)
            for m in members:
                m.close()
        finally:
            broker.stop()
    result = {
        "protocol": args.protocol,
        "rounds": args.rounds,
        "rebalance_ms_median": round(statistics.median(times)),
        "rebalance_ms_max": round(max(times)),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.protocol}: a joining member had its share after {result['rebalance_ms_median']} ms "
              f"(median of {args.rounds}, max {result['rebalance_ms_max']} ms)")


if __name__ == "__main__":
    main()

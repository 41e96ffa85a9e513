"""Disk space, through confluent-kafka.

- Below the free-space floor (`--amqp-disk-free-limit-bytes`, RabbitMQ's
  `disk_free_limit`, 50 MB by default) produce is refused with
  KAFKA_STORAGE_ERROR, a retriable error, while reads go on.
- A full disk (a small tmpfs as the data directory; the test needs root to
  mount it and skips without) fails produce cleanly; once space is freed
  (a topic deleted) produce works again, and every acknowledged record is
  there exactly once and in order, also after a restart.

One broker's disk: not run against the three-node cluster.
"""

import subprocess
import time

import pytest
from confluent_kafka import KafkaError, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from conftest import Broker
from kutil import confluent_read_to_end, unique, wait_until, RF

pytestmark = pytest.mark.skipif(RF != 1, reason="one broker's disk")


def create(bootstrap, name):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(name, 1, 1)])[name].result(30)


def produce(bootstrap, topic, values, **conf):
    """Produces `values` in order; returns [(value, error or None)] in delivery order."""
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, **conf})
    out = []
    for v in values:
        while True:
            try:
                p.produce(topic, v, on_delivery=lambda err, msg: out.append((msg.value(), err)))
                break
            except BufferError:
                p.poll(0.1)
        p.poll(0)
    assert p.flush(120) == 0
    return out


def read_values(bootstrap, topic):
    return [m.value() for m in confluent_read_to_end(bootstrap, topic)]


def test_below_the_free_space_floor_produce_is_refused_with_a_retriable_error(broker_factory):
    b = broker_factory("disk-floor", extra_args=("--amqp-disk-free-limit-bytes", str(1 << 60)))
    topic = unique("floor")
    create(b.bootstrap, topic)
    # The monitor looks once a second.
    wait_until(lambda: "resource alarm raised" in b.log_tail(200), timeout=10, what="the disk alarm")
    results = produce(b.bootstrap, topic, [b"refused"], retries=0, **{"enable.idempotence": False})
    err = results[0][1]
    assert err is not None and err.code() == KafkaError.KAFKA_STORAGE_ERROR, results
    # Retriable: a producer that may retry keeps at it until its delivery
    # timeout instead of failing at once.
    started = time.monotonic()
    results = produce(b.bootstrap, topic, [b"retried"], **{"message.timeout.ms": 3000})
    err = results[0][1]
    assert err is not None and err.code() == KafkaError._MSG_TIMED_OUT, results
    assert time.monotonic() - started >= 2.5
    # Reads are not refused.
    assert read_values(b.bootstrap, topic) == []


@pytest.mark.timeout_s(240)
def test_a_full_disk_fails_produce_cleanly_and_recovers_when_space_is_freed(tmp_path):
    disk = tmp_path / "small-disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    b = Broker(disk / "data", tmp_path / "disk-full.log", extra_args=("--amqp-disk-free-limit-bytes", "0"))
    try:
        b.start()
        create(b.bootstrap, "ballast")
        ballast = produce(b.bootstrap, "ballast", [b"b" * 100_000] * 100, acks="all")
        assert all(err is None for _, err in ballast)
        create(b.bootstrap, "data")
        # 10 KiB records until well past what the disk holds.
        values = [f"{i:08d}".encode() + b"d" * 10_232 for i in range(4_000)]
        first = produce(b.bootstrap, "data", values, acks="all", **{"enable.idempotence": True,
                                                                     "message.timeout.ms": 8000})
        acked = [v for v, err in first if err is None]
        failed = [err for _, err in first if err is not None]
        assert failed, "the disk never filled up"
        assert acked, "nothing was written before the disk filled up"
        assert b.alive(), b.log_tail()

        # Free space: the ballast topic goes; produce works again.
        admin = AdminClient({"bootstrap.servers": b.bootstrap})
        admin.delete_topics(["ballast"])["ballast"].result(30)
        def probe():
            results = produce(b.bootstrap, "probe", [b"probe"], acks="all", **{"message.timeout.ms": 3000})
            return results[0][1] is None

        create(b.bootstrap, "probe")
        wait_until(probe, timeout=60, what="produce to work once space was freed")
        later = [f"after-{i:04d}".encode() for i in range(200)]
        results = produce(b.bootstrap, "data", later, acks="all", **{"enable.idempotence": True})
        assert all(err is None for _, err in results), results[:3]

        def check():
            got = read_values(b.bootstrap, "data")
            # Every acknowledged record exactly once, in the order sent.
            wanted = set(acked)
            kept = [v for v in got if v in wanted]
            assert kept == acked, f"{len(kept)} of {len(acked)} acknowledged records read back in order"
            assert got[-len(later):] == later
            assert len(got) == len(set(got)), "a record was read twice"

        check()
        b.stop()
        b.start()
        check()
    finally:
        b._kill_proc()
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)

"""Fetch long polling as clients see it: a waiting fetch is answered as soon as a
record arrives (not at max_wait), and a fetch whose min_bytes is not reached is
answered after max_wait (not never)."""

import threading
import time

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from kutil import unique, watermarks, RF


def tail_latency(broker, topic, conf, produce_after=1.0, timeout=15.0):
    """Seconds from a produce's acknowledgement to the tailing consumer receiving it."""
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": unique("tail"), **conf})
    got = {}
    try:
        lo, hi = watermarks(c, topic, 0)
        c.assign([TopicPartition(topic, 0, hi)])
        acked = threading.Event()
        acked_at = []

        def produce():
            time.sleep(produce_after)
            p = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 0})
            p.produce(topic, value=b"wake", partition=0,
                      on_delivery=lambda e, m: (acked_at.append(time.monotonic()), acked.set()))
            p.flush(10)

        t = threading.Thread(target=produce, daemon=True)
        t.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and "at" not in got:
            m = c.poll(0.05)
            if m is not None and not m.error():
                got["at"] = time.monotonic()
        t.join(10)
    finally:
        c.close()
    assert acked.is_set(), "the produce was not acknowledged"
    assert "at" in got, f"tailing consumer ({conf}) did not receive the record within {timeout}s"
    return got["at"] - acked_at[0]


def test_long_poll_wakes_on_append_and_honours_max_wait(broker):
    topic = unique("lp")
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=RF)])[topic].result(30)

    # min_bytes 1, max_wait 5 s: the parked fetch must return when the record lands.
    fast = tail_latency(broker, topic, {"fetch.wait.max.ms": 5000, "fetch.min.bytes": 1})
    print(f"[fetch] min_bytes=1 max_wait=5000: record seen {fast * 1000:.0f} ms after its ack")
    assert fast < 1.0, f"long poll not woken by an append: {fast:.2f}s (max_wait 5 s)"

    # min_bytes 1 MB (never reached), max_wait 1.5 s: answered within max_wait, with the record.
    slow = tail_latency(broker, topic, {"fetch.wait.max.ms": 1500, "fetch.min.bytes": 1_000_000})
    print(f"[fetch] min_bytes=1MB max_wait=1500: record seen {slow * 1000:.0f} ms after its ack")
    assert slow < 1.5 + 1.5, f"fetch with unmet min_bytes not answered at max_wait: {slow:.2f}s"

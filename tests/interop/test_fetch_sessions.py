"""Incremental fetch sessions (KIP-227), with kafka-python, whose consumer
uses them by default: after one full request a consumer names only the
partitions whose position moved, and hears only about partitions with news.
Every record still arrives once and in order, a seek inside a session moves
the read back, and the cache's slot limit holds (a client without a slot
goes on with full fetches). Single node and three-node cluster.
"""

import time

from confluent_kafka import Producer
from kafka import KafkaConsumer, TopicPartition

from kutil import metric_samples, scrape_metrics, unique
from test_transactions import create

PARTITIONS, PER_ROUND = 12, 50


def nodes(broker):
    return getattr(broker, "nodes", None) or [broker]


def gauge(broker, family):
    """Each node's value of a gauge."""
    return [sum(s.value for s in metric_samples(scrape_metrics(n.http), family)) for n in nodes(broker)]


def consumer(broker, topic):
    c = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=None, auto_offset_reset="earliest",
                      enable_auto_commit=False, fetch_max_wait_ms=200, enable_incremental_fetch_sessions=True)
    c.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
    return c


def produce_round(bootstrap, topic, partitions, start):
    p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5})
    for part in partitions:
        for i in range(start, start + PER_ROUND):
            p.produce(topic, value=f"{part}-{i}".encode(), partition=part)
    assert p.flush(30) == 0


def drain(c, got, want, timeout=60):
    """Polls `c` into `got` ({partition: [values]}) until it holds `want` records."""
    deadline = time.monotonic() + timeout
    while sum(map(len, got.values())) < want and time.monotonic() < deadline:
        for tp, records in c.poll(timeout_ms=500).items():
            got.setdefault(tp.partition, []).extend(r.value.decode() for r in records)


def test_a_consumer_with_a_session_reads_every_record_once_and_in_order(broker):
    topic = unique("sessions")
    create(broker.bootstrap, topic, partitions=PARTITIONS)
    c = consumer(broker, topic)
    got, written = {}, {p: 0 for p in range(PARTITIONS)}
    try:
        # Rounds write to a third of the partitions each: the others have no
        # news, and an incremental answer leaves them out.
        for r in range(6):
            parts = [p for p in range(PARTITIONS) if p % 3 == r % 3]
            for p in parts:
                produce_round(broker.bootstrap, topic, [p], written[p])
                written[p] += PER_ROUND
            drain(c, got, sum(written.values()))
        for p in range(PARTITIONS):
            assert got.get(p) == [f"{p}-{i}" for i in range(written[p])], p
        # The broker holds the consumer's session with every partition it
        # leads (a cluster spreads them over the nodes' caches).
        assert sum(gauge(broker, "sluice_kafka_fetch_sessions")) >= 1
        assert sum(gauge(broker, "sluice_kafka_fetch_session_partitions")) >= PARTITIONS
        # A seek is a changed position in the next incremental request.
        tp = TopicPartition(topic, 0)
        c.seek(tp, 10)
        again = {}
        drain(c, again, written[0] - 10)
        assert again == {0: [f"0-{i}" for i in range(10, written[0])]}
    finally:
        c.close()


def test_a_consumer_without_a_slot_fetches_in_full(broker_factory):
    one = broker_factory("one-slot", extra_args=("--fetch-session-slots", "1"))
    topic = unique("slots")
    create(one.bootstrap, topic, partitions=PARTITIONS)
    first, second = consumer(one, topic), consumer(one, topic)
    try:
        got_first, got_second = {}, {}
        produce_round(one.bootstrap, topic, range(PARTITIONS), 0)
        for _ in range(3):
            drain(first, got_first, PARTITIONS * PER_ROUND, timeout=5)
            drain(second, got_second, PARTITIONS * PER_ROUND, timeout=5)
        want = {p: [f"{p}-{i}" for i in range(PER_ROUND)] for p in range(PARTITIONS)}
        assert got_first == want and got_second == want
        # One slot per node: never more, whoever holds it.
        assert all(n <= 1 for n in gauge(one, "sluice_kafka_fetch_sessions"))
        assert sum(gauge(one, "sluice_kafka_fetch_sessions")) >= 1
    finally:
        first.close()
        second.close()

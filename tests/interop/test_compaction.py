"""Compacted topics through confluent-kafka (and read back by kafka-python).

A topic created with `cleanup.policy=compact` through the admin API gets
keyed records in several codecs, with headers, explicit timestamps and
tombstones. Once its segments roll (`segment.ms`) the broker compacts them
in the background. Read from the beginning, the topic then gives Kafka's
result: the latest record of every key, at the offset it was written at,
with its timestamp and headers; a tombstone stays for `delete.retention.ms`
after the first compaction and then goes; a fetch at a removed offset
starts at the next surviving record.

The broker for this module rolls and compacts every 200 ms
(`retention_check_interval_ms`, `cleaner_check_interval_ms`).
"""

import time

import pytest
from confluent_kafka import KafkaError, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from kutil import confluent_read_to_end, unique, wait_until, RF

CONFIG = """
[storage]
retention_check_interval_ms = 200
cleaner_check_interval_ms = 200
"""

KEYS = 12
ROUNDS = 6
CODECS = ["none", "gzip", "snappy", "lz4", "zstd", "none"]


@pytest.fixture(scope="module")
def cbroker(broker_factory):
    return broker_factory("compaction", config_text=CONFIG)


def create_compacted(bootstrap, name, delete_retention_ms):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    config = {
        "cleanup.policy": "compact",
        "segment.ms": "300",
        "min.cleanable.dirty.ratio": "0.01",
        "delete.retention.ms": str(delete_retention_ms),
    }
    fut = admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=RF, config=config)])
    fut[name].result(30)


def produce(bootstrap, topic, records, codec):
    """records: [(key, value or None, timestamp)]; returns {offset: (key, value, ts, headers)}."""
    p = Producer({"bootstrap.servers": bootstrap, "compression.type": codec, "linger.ms": 20,
                  "enable.idempotence": True})
    written = {}
    errors = []

    def report(err, msg):
        if err:
            errors.append(str(err))
        else:
            # A delivery report carries no headers: they are the key, as sent.
            written[msg.offset()] = (msg.key(), msg.value(), msg.timestamp()[1], [("k", msg.key())])

    for key, value, ts in records:
        p.produce(topic, key=key, value=value, timestamp=ts, headers=[("k", key)], on_delivery=report)
    assert p.flush(30) == 0
    assert not errors, errors
    return written


def read_all(bootstrap, topic, start=0):
    """Every record from `start` to the end: [(offset, key, value, ts, headers)]."""
    return [(m.offset(), m.key(), m.value(), m.timestamp()[1], m.headers())
            for m in confluent_read_to_end(bootstrap, topic, start, timeout=30)]


def latest_per_key(written, with_tombstones):
    latest = {}
    for offset in sorted(written):
        key, value, ts, headers = written[offset]
        latest[key] = (offset, key, value, ts, headers)
    return sorted(r for r in latest.values() if with_tombstones or r[2] is not None)


def history(rounds, tombstoned, base_ts):
    """Each round writes every key once; the last round deletes `tombstoned`."""
    out = []
    for r in range(rounds):
        batch = []
        for k in range(KEYS):
            key = f"key-{k}".encode()
            value = None if (r == rounds - 1 and k in tombstoned) else f"value-{k}-{r}".encode() * 4
            batch.append((key, value, base_ts + r * 1000 + k))
        out.append(batch)
    return out


def test_a_compacted_topic_keeps_the_latest_record_of_every_key(cbroker):
    topic = unique("compacted")
    create_compacted(cbroker.bootstrap, topic, delete_retention_ms=0)
    written = {}
    base_ts = int(time.time() * 1000) - 60_000
    for batch, codec in zip(history(ROUNDS, {3, 7}, base_ts), CODECS):
        written.update(produce(cbroker.bootstrap, topic, batch, codec))
    assert len(written) == KEYS * ROUNDS

    # Once the segments roll, compaction leaves the latest record per key,
    # tombstones included (the first compaction keeps them).
    expected = latest_per_key(written, with_tombstones=True)
    wait_until(lambda: read_all(cbroker.bootstrap, topic) == expected, timeout=60,
               what="the topic compacted to the latest record per key")

    # A fetch at a removed offset starts at the next surviving record.
    assert read_all(cbroker.bootstrap, topic, start=0)[0][0] == expected[0][0] > 0
    gap = expected[0][0] - 1
    assert read_all(cbroker.bootstrap, topic, start=gap)[0][0] == expected[0][0]

    # More writes dirty the log again; the next compaction finds the
    # tombstones older than delete.retention.ms (0) and removes them.
    more = produce(cbroker.bootstrap, topic, [(b"fresh", b"x", base_ts + 99_000)], "lz4")
    written.update(more)
    expected = latest_per_key(written, with_tombstones=False)
    wait_until(lambda: read_all(cbroker.bootstrap, topic) == expected, timeout=60,
               what="tombstones removed after delete.retention.ms")

    # kafka-python reads the same records (it skips the offsets in between).
    from kafka import KafkaConsumer, TopicPartition as KTP
    kc = KafkaConsumer(bootstrap_servers=cbroker.bootstrap, enable_auto_commit=False, consumer_timeout_ms=3000)
    kc.assign([KTP(topic, 0)])
    kc.seek_to_beginning()
    got = [(m.offset, m.key, m.value, m.timestamp) for m in kc]
    kc.close()
    assert got == [(o, k, v, ts) for (o, k, v, ts, _) in expected]


def test_a_record_without_a_key_is_refused_as_kafka_does(cbroker):
    topic = unique("keyless")
    create_compacted(cbroker.bootstrap, topic, delete_retention_ms=0)
    p = Producer({"bootstrap.servers": cbroker.bootstrap, "retries": 0})
    errors = []
    # Separate batches: Kafka refuses a whole batch for one keyless record.
    p.produce(topic, value=b"no key", on_delivery=lambda err, msg: errors.append(err))
    assert p.flush(30) == 0
    p.produce(topic, key=b"", value=b"an empty key is a key", on_delivery=lambda err, msg: errors.append(err))
    assert p.flush(30) == 0
    assert errors[0] is not None and errors[0].code() == KafkaError.INVALID_RECORD, errors
    assert errors[1] is None, errors
    assert [r[1:3] for r in read_all(cbroker.bootstrap, topic)] == [(b"", b"an empty key is a key")]


def test_tombstones_stay_for_delete_retention_ms(cbroker):
    topic = unique("retained-deletes")
    create_compacted(cbroker.bootstrap, topic, delete_retention_ms=3_600_000)
    written = {}
    base_ts = int(time.time() * 1000) - 60_000
    for batch in history(3, {0, 1, 2}, base_ts):
        written.update(produce(cbroker.bootstrap, topic, batch, "snappy"))
    expected = latest_per_key(written, with_tombstones=True)
    wait_until(lambda: read_all(cbroker.bootstrap, topic) == expected, timeout=60,
               what="the topic compacted")
    # Dirty it again: another compaction runs, and within the hour the
    # tombstones are still there.
    written.update(produce(cbroker.bootstrap, topic, [(b"key-5", b"again", base_ts + 50_000)], "none"))
    expected = latest_per_key(written, with_tombstones=True)
    wait_until(lambda: read_all(cbroker.bootstrap, topic) == expected, timeout=60,
               what="the topic compacted again")
    assert sum(1 for r in expected if r[2] is None) == 3

"""Kafka's topic configs, as tools and Terraform/Helm charts set them.

Every key Kafka 3.x accepts is accepted with Kafka's types and ranges and
described back; `message.timestamp.type=LogAppendTime` makes the broker stamp
records with its own time; `message.timestamp.before.max.ms` /
`after.max.ms` refuse records outside the window with INVALID_TIMESTAMP;
switches Sluice cannot honour (`unclean.leader.election.enable=true`,
`remote.storage.enable=true`) are refused with INVALID_CONFIG; a
`compression.type` other than `producer` makes the broker store every batch
in that codec, whatever the producer used, and every client reads it back.
"""

import time

import pytest
from confluent_kafka import (TIMESTAMP_CREATE_TIME, TIMESTAMP_LOG_APPEND_TIME, Consumer, KafkaError,
                             KafkaException, Producer)
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

from kutil import stored_batches, unique, RF


@pytest.fixture(scope="module")
def admin(broker):
    return AdminClient({"bootstrap.servers": broker.bootstrap})


def create(admin, config):
    name = unique("cfg")
    admin.create_topics([NewTopic(name, 1, RF, config=config)])[name].result(30)
    return name


def describe(admin, topic):
    res = ConfigResource(ResourceType.TOPIC, topic)
    return admin.describe_configs([res])[res].result(30)


def produce(bootstrap, topic, timestamps):
    """Produces one record per timestamp; (acknowledged, errors by code)."""
    done, errors = [], []
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0, "retries": 0,
                  "enable.idempotence": False, "message.timeout.ms": 10000})

    def cb(err, msg):
        if err is None:
            done.append(msg)
        else:
            errors.append(err.code())

    for ts in timestamps:
        p.produce(topic, value=b"v", timestamp=ts, on_delivery=cb)
        p.flush(15)
    return done, errors


def consume(bootstrap, topic, count):
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("g"),
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([topic])
    got = []
    deadline = time.monotonic() + 30
    try:
        while len(got) < count and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is not None and not m.error():
                got.append(m)
    finally:
        c.close()
    return got


def test_every_kafka_topic_config_is_accepted_and_described(admin):
    settings = {
        "compression.type": "gzip",
        "compression.gzip.level": "5",
        "compression.lz4.level": "10",
        "compression.zstd.level": "7",
        "file.delete.delay.ms": "1000",
        "flush.messages": "1",
        "flush.ms": "1000",
        "follower.replication.throttled.replicas": "*",
        "leader.replication.throttled.replicas": "0:1",
        "local.retention.bytes": "-2",
        "local.retention.ms": "-2",
        "message.downconversion.enable": "false",
        "message.format.version": "3.0-IV1",
        "message.timestamp.after.max.ms": "3600000",
        "message.timestamp.before.max.ms": "86400000",
        "message.timestamp.difference.max.ms": "86400000",
        "message.timestamp.type": "CreateTime",
        "preallocate": "true",
        "remote.storage.enable": "false",
        "segment.index.bytes": "1048576",
        "segment.jitter.ms": "100",
        "unclean.leader.election.enable": "false",
    }
    topic = create(admin, settings)
    described = describe(admin, topic)
    for k, v in settings.items():
        assert k in described, f"{k} not described; has {sorted(described)}"
        assert described[k].value == v, (k, described[k].value)
        assert not described[k].is_default, k


@pytest.mark.parametrize("key,value", [
    ("unclean.leader.election.enable", "true"),
    ("remote.storage.enable", "true"),
    ("message.timestamp.type", "BrokerTime"),
    ("segment.index.bytes", "2"),
    ("preallocate", "maybe"),
    ("message.format.version", "9.9"),
    ("compression.type", "brotli"),
    ("compression.zstd.level", "23"),
    ("compression.gzip.level", "0"),
])
def test_values_kafka_refuses_or_sluice_cannot_honour_are_refused(admin, key, value):
    name = unique("bad")
    with pytest.raises(KafkaException) as e:
        admin.create_topics([NewTopic(name, 1, RF, config={key: value})])[name].result(30)
    assert e.value.args[0].code() == KafkaError.INVALID_CONFIG, e.value


def test_log_append_time_topics_carry_the_brokers_time(broker, admin):
    topic = create(admin, {"message.timestamp.type": "LogAppendTime"})
    old = 1_000_000_000_000  # 2001: the broker's time replaces it
    before = int(time.time() * 1000)
    done, errors = produce(broker.bootstrap, topic, [old, old + 1])
    after = int(time.time() * 1000)
    assert errors == [] and len(done) == 2
    for m in consume(broker.bootstrap, topic, 2):
        kind, ts = m.timestamp()
        assert kind == TIMESTAMP_LOG_APPEND_TIME, m.timestamp()
        assert before - 1000 <= ts <= after + 1000, (ts, before, after)


def test_records_outside_the_timestamp_window_are_refused(broker, admin):
    topic = create(admin, {"message.timestamp.before.max.ms": "3600000",
                           "message.timestamp.after.max.ms": "60000"})
    now = int(time.time() * 1000)
    done, errors = produce(broker.bootstrap, topic, [now - 7_200_000, now + 600_000, now - 1000])
    assert errors == [KafkaError.INVALID_TIMESTAMP, KafkaError.INVALID_TIMESTAMP], errors
    assert len(done) == 1
    (m,) = consume(broker.bootstrap, topic, 1)
    assert m.timestamp() == (TIMESTAMP_CREATE_TIME, now - 1000)


def data_dirs(broker):
    """Every replica's data directory: the broker's, or each cluster node's."""
    if broker.data_dir is not None:
        return [broker.data_dir]
    return [n.data_dir for n in broker.nodes]


@pytest.mark.parametrize("target", ["uncompressed", "gzip", "snappy", "lz4", "zstd"])
def test_compression_type_recompresses_what_producers_send(broker, admin, target):
    """Producers of two other codecs write to a topic whose compression.type
    names `target`: every replica stores every batch in `target`, and a
    consumer reads back every record, key, header and timestamp in order."""
    topic = create(admin, {"compression.type": target, "compression.zstd.level": "9"})
    sent = []
    for codec in [c for c in ("none", "lz4", "zstd", "gzip") if c != target][:2]:
        p = Producer({"bootstrap.servers": broker.bootstrap, "compression.type": codec,
                      "linger.ms": 20, "enable.idempotence": True})
        for i in range(300):
            key, value = f"{codec}-{i % 7}".encode(), (f"{codec} record {i} " * (i % 5 + 1)).encode()
            ts = 1_700_000_000_000 + len(sent)
            p.produce(topic, key=key, value=value, headers=[("n", str(i).encode())], timestamp=ts)
            sent.append((key, value, [("n", str(i).encode())], ts))
        assert p.flush(30) == 0
    got = consume(broker.bootstrap, topic, len(sent))
    assert [(m.key(), m.value(), m.headers(), m.timestamp()[1]) for m in got] == sent
    want = "none" if target == "uncompressed" else target
    for d in data_dirs(broker):
        codecs = {codec for (_, _, _, codec, _) in stored_batches(d, topic)}
        assert codecs == {want}, (d, codecs)


def test_brokers_describe_their_configs_under_kafkas_names(admin):
    """DescribeConfigs on each broker: the topic configs' broker-wide
    defaults and the broker's own settings under Kafka's names, read-only,
    Kafka's defaults marked as such (`log.retention.check.interval.ms` is
    five minutes, as on Kafka); a topic's override lists the broker default
    it overrides as a synonym."""
    brokers = admin.list_topics(timeout=10).brokers
    assert brokers
    for broker_id in brokers:
        res = ConfigResource(ResourceType.BROKER, str(broker_id))
        cfg = admin.describe_configs([res])[res].result(30)
        assert cfg["broker.id"].value == str(broker_id)
        assert cfg["log.retention.check.interval.ms"].value == "300000"
        assert cfg["log.retention.ms"].value == "604800000" and cfg["log.retention.ms"].is_default
        assert cfg["log.segment.bytes"].value == "1073741824"
        assert cfg["log.cleanup.policy"].value == "delete"
        assert cfg["compression.type"].value == "producer"
        assert cfg["num.partitions"].value.isdigit()
        assert all(e.is_read_only for e in cfg.values()), [k for k, e in cfg.items() if not e.is_read_only]
    topic = create(admin, {"retention.ms": "3600000"})
    entry = describe(admin, topic)["retention.ms"]
    assert entry.value == "3600000" and not entry.is_default
    synonyms = [(s.name, s.value) for s in entry.synonyms.values()]
    assert synonyms == [("retention.ms", "3600000"), ("log.retention.ms", "604800000")], synonyms


def test_a_batch_too_large_as_sent_is_refused_even_if_recompression_would_shrink_it(broker, admin):
    """As Kafka: max.message.bytes applies to the batch the producer sent,
    before the topic's compression.type rewrites it."""
    topic = create(admin, {"compression.type": "zstd", "max.message.bytes": "20000"})
    errors, done = [], []
    p = Producer({"bootstrap.servers": broker.bootstrap, "compression.type": "none",
                  "linger.ms": 0, "retries": 0, "message.timeout.ms": 10000})
    cb = lambda err, msg: errors.append(err.code()) if err else done.append(msg)  # noqa: E731
    for size in (50_000, 5_000):
        p.produce(topic, value=b"\0" * size, on_delivery=cb)
        p.flush(15)
    assert errors == [KafkaError.MSG_SIZE_TOO_LARGE] and len(done) == 1, (errors, done)

"""Acceptance 1: real clients round-trip through Sluice.

For each producing client (confluent-kafka, kafka-python, kcat): create a
4-partition topic through that client's admin path, produce N keyed records
with headers (N/4 per codec: gzip, snappy, lz4, zstd) and explicit create
timestamps (kcat cannot set them: its records must carry a timestamp inside
the produce window), then read the topic back with the same client and with
the others. Every record must come back exactly once, in order per partition
(offsets strictly increasing, per-key sequence increasing), with key, value,
headers and timestamp intact. A null value (tombstone), a null key and an
empty key must round-trip and stay distinguishable.
"""

import os
import subprocess
import time

import pytest

from kutil import CODECS, Expected, assert_report, confluent_consume_all, kafka_python_consume_all, RF
from kutil import kcat_consume_all, make_value, parse_value
from kutil import stored_batches, unique, verify, wait_until

N = int(os.environ.get("SLUICE_INTEROP_N", "100000"))
PARTITIONS = 4
KEYS = 1000


def key_of(i):
    return f"k{i % KEYS}".encode()


def headers_of(tag, i, codec):
    return (
        ("client", tag.encode()),
        ("codec", codec.encode()),
        ("seq", str(i).encode()),
        ("dup", b"1"),
        ("dup", b"2"),
        ("empty", b""),
    )


def kcat_headers_of(codec):
    return (("client", b"kcat"), ("codec", codec.encode()), ("dup", b"1"), ("dup", b"2"), ("empty", b""))


def codec_of(i):
    return CODECS[i * len(CODECS) // N]


# -- producers -------------------------------------------------------------------


def produce_confluent(broker, topic, tag):
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    futs = admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=RF)], operation_timeout=10)
    futs[topic].result(timeout=30)
    md = admin.list_topics(topic=topic, timeout=10)
    assert len(md.topics[topic].partitions) == PARTITIONS, f"metadata after CreateTopics: {md.topics[topic].partitions}"

    base_ts = int(time.time() * 1000) - 3_600_000
    expected = {}
    errors = []
    for codec in CODECS:
        p = Producer({
            "bootstrap.servers": broker.bootstrap,
            "compression.type": codec,
            "enable.idempotence": True,
            "linger.ms": 20,
            "batch.num.messages": 5000,
        })

        def on_delivery(err, msg, _exp=expected):
            if err is not None:
                errors.append(str(err))
                return
            # Delivery reports carry no headers: the index comes from the value.
            i = parse_value(msg.value())[1]
            _exp[i].partition = msg.partition()

        for i in (j for j in range(N) if codec_of(j) == codec):
            key = key_of(i)
            hdrs = headers_of(tag, i, codec)
            expected[i] = Expected(key=key, headers=hdrs, ts=base_ts + i)
            while True:
                try:
                    p.produce(topic, key=key, value=make_value(tag, i, key.decode(), codec, pad=i % 64),
                              headers=list(hdrs), timestamp=base_ts + i, on_delivery=on_delivery)
                    break
                except BufferError:
                    p.poll(0.1)
            p.poll(0)
        left = p.flush(60)
        assert left == 0, f"confluent producer ({codec}): {left} messages not delivered within 60 s"
    assert not errors, f"confluent delivery errors: {len(errors)} e.g. {errors[:5]}"
    return expected


def produce_kafka_python(broker, topic, tag):
    from kafka import KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=10000)
    try:
        resp = admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=RF)], timeout_ms=10000)
        errs = [t for t in resp.get("topics", []) if t.get("error_code")] if isinstance(resp, dict) else []
        assert not errs, f"kafka-python create_topics: {errs}"
        # In a cluster the node asked may apply the new topic a moment after the
        # controller answered CreateTopics (metadata propagates as in KRaft).
        md = wait_until(lambda: (lambda d: d if d and len(d[0]["partitions"]) == PARTITIONS else None)(
            admin.describe_topics([topic])), 15, what=f"describe_topics({topic}) with {PARTITIONS} partitions")
        assert md[0]["name"] == topic
    finally:
        admin.close()

    base_ts = int(time.time() * 1000) - 3_600_000
    expected = {}
    futures = []
    for codec in CODECS:
        p = KafkaProducer(bootstrap_servers=broker.bootstrap, compression_type=codec, linger_ms=20,
                          batch_size=256 * 1024, acks="all")
        for i in (j for j in range(N) if codec_of(j) == codec):
            key = key_of(i)
            hdrs = headers_of(tag, i, codec)
            expected[i] = Expected(key=key, headers=hdrs, ts=base_ts + i)
            f = p.send(topic, key=key, value=make_value(tag, i, key.decode(), codec, pad=i % 64),
                       headers=list(hdrs), timestamp_ms=base_ts + i)
            futures.append((i, f))
        p.flush(timeout=60)
        p.close(timeout=10)
    failed = []
    for i, f in futures:
        if not f.is_done or f.failed():
            failed.append((i, f.exception if f.is_done else "not done"))
        else:
            expected[i].partition = f.value.partition
    assert not failed, f"kafka-python: {len(failed)} sends failed e.g. {failed[:5]}"
    return expected


def produce_kcat(broker, topic, tag):
    assert tag == "kcat"
    # kcat has no admin API: the topic is created with Sluice's own CLI.
    broker.cli("topic", "create", topic, "--partitions", str(PARTITIONS))
    md = subprocess.run(["kcat", "-L", "-b", broker.bootstrap, "-t", topic], capture_output=True, timeout=30)
    assert f"{PARTITIONS} partitions".encode() in md.stdout, f"kcat -L after topic create: {md.stdout!r}"

    expected = {}
    for codec in CODECS:
        idx = [j for j in range(N) if codec_of(j) == codec]
        lines = []
        for i in idx:
            key = key_of(i)
            lines.append(key + b":" + make_value(tag, i, key.decode(), codec, pad=i % 64))
        cmd = ["kcat", "-P", "-b", broker.bootstrap, "-t", topic, "-K", ":", "-z", codec,
               "-H", "client=kcat", "-H", f"codec={codec}", "-H", "dup=1", "-H", "dup=2", "-H", "empty=",
               "-X", "enable.idempotence=true", "-X", "linger.ms=20"]
        lo = int(time.time() * 1000)
        cp = subprocess.run(cmd, input=b"\n".join(lines) + b"\n", capture_output=True, timeout=120)
        hi = int(time.time() * 1000)
        assert cp.returncode == 0, f"kcat -P ({codec}) exited {cp.returncode}: {cp.stderr.decode(errors='replace')}"
        assert b"fail" not in cp.stderr.lower(), f"kcat -P ({codec}) reported: {cp.stderr.decode(errors='replace')}"
        for i in idx:
            expected[i] = Expected(key=key_of(i), headers=kcat_headers_of(codec), ts_range=(lo - 1000, hi + 1000))
    return expected


PRODUCERS = {"confluent": produce_confluent, "kafka-python": produce_kafka_python, "kcat": produce_kcat}


@pytest.fixture(scope="module")
def produced(broker):
    """Lazily produces each client's topic once per module: {tag: (topic, expected)}."""
    cache = {}

    def get(tag):
        if tag not in cache:
            topic = unique(f"rt-{tag}")
            t0 = time.monotonic()
            expected = PRODUCERS[tag](broker, topic, tag)
            dt = time.monotonic() - t0
            print(f"[{tag}] produced {len(expected)} records to {topic} in {dt:.1f}s ({len(expected) / dt:.0f}/s)")
            assert len(expected) == N
            cache[tag] = (topic, expected)
        return cache[tag]

    return get


def read_with(reader, broker, topic):
    if reader == "confluent":
        return confluent_consume_all(broker.bootstrap, topic, PARTITIONS, N)
    if reader == "kafka-python":
        return kafka_python_consume_all(broker.bootstrap, topic, PARTITIONS, N)
    if reader == "kcat":
        return kcat_consume_all(broker.bootstrap, topic, N)
    raise ValueError(reader)


PAIRS = [
    ("confluent", "confluent"),
    ("confluent", "kafka-python"),
    ("confluent", "kcat"),
    ("kafka-python", "kafka-python"),
    ("kafka-python", "confluent"),
    ("kcat", "kcat"),
    ("kcat", "confluent"),
]


@pytest.mark.parametrize("producer,reader", PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_roundtrip(broker, produced, producer, reader):
    topic, expected = produced(producer)
    t0 = time.monotonic()
    records = read_with(reader, broker, topic)
    dt = time.monotonic() - t0
    print(f"[{producer}->{reader}] read {len(records)} records in {dt:.1f}s")
    per_partition = {}
    for r in records:
        per_partition[r.partition] = per_partition.get(r.partition, 0) + 1
    print(f"[{producer}->{reader}] per partition: {dict(sorted(per_partition.items()))}")
    rep = verify(records, producer, expected)
    assert_report(rep, f"{producer}->{reader}")
    assert len(per_partition) == PARTITIONS, f"keys landed in {len(per_partition)} partitions, expected all {PARTITIONS}"


@pytest.mark.parametrize("producer", ["confluent", "kafka-python", "kcat"])
def test_codecs_stored_as_sent(broker, produced, producer):
    """Every batch on disk carries the codec its producer used, and the four
    codecs' batches together hold all N records (no re-encoding by the broker)."""
    if broker.data_dir is None:
        pytest.skip("external broker: data directory not visible")
    topic, _ = produced(producer)
    batches = stored_batches(broker.data_dir, topic)
    per_codec = {}
    for part, base, count, codec, magic in batches:
        assert magic == 2, f"batch at p{part}@{base} has magic {magic}"
        per_codec[codec] = per_codec.get(codec, 0) + count
    # librdkafka sends a batch uncompressed when compressing would grow it,
    # which only happens to one-record tail batches here. Tolerate exactly
    # those; every multi-record batch must carry its requested codec.
    uncompressed_singles = sum(c for _, _, c, codec, _ in batches if codec == "none" and c == 1)
    if "none" not in CODECS and uncompressed_singles:
        per_codec["none"] -= uncompressed_singles
        if per_codec["none"] == 0:
            del per_codec["none"]
    print(f"[{producer}] stored {len(batches)} batches; records per codec {per_codec}")
    want = {c: N // len(CODECS) for c in CODECS}
    # kcat included: librdkafka <= 2.11.0 only compresses with gzip/snappy/lz4
    # when the broker advertises Produce v0 (librdkafka #4956); Sluice, like
    # Kafka 4 since KAFKA-18659, advertises v0 (and refuses v0-v2), so every
    # client's batches must carry the codec it was asked for.
    got = {c: n for c, n in per_codec.items()}
    for c in CODECS:
        assert want[c] - uncompressed_singles <= got.get(c, 0) <= want[c], (
            f"records per stored codec: {per_codec}, expected {want}")
    assert set(got) <= set(CODECS), f"unexpected stored codecs: {per_codec}"


# -- null value, null key, empty key -------------------------------------------------

SPECIAL = [
    (b"", b"empty-key"),
    (None, b"null-key"),
    (b"tomb", None),
    (b"empty-value", b""),
    (b"", None),
]


@pytest.fixture(scope="module")
def special_topics(broker):
    """One single-partition topic per producing client holding SPECIAL in order."""
    from confluent_kafka import Producer
    from kafka import KafkaProducer

    topics = {}
    t = unique("special-confluent")
    p = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True})
    errs = []
    for k, v in SPECIAL:
        p.produce(t, key=k, value=v, partition=0, on_delivery=lambda e, m: e and errs.append(str(e)))
    assert p.flush(30) == 0 and not errs, f"confluent special produce: {errs}"
    topics["confluent"] = t

    t = unique("special-kafka-python")
    kp = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    futs = [kp.send(t, key=k, value=v, partition=0) for k, v in SPECIAL]
    kp.flush(timeout=30)
    for f in futs:
        f.get(timeout=10)
    kp.close(timeout=10)
    topics["kafka-python"] = t
    return topics


def read_special(reader, broker, topic):
    if reader == "confluent":
        recs = confluent_consume_all(broker.bootstrap, topic, 1, len(SPECIAL), timeout=30)
    elif reader == "kafka-python":
        recs = kafka_python_consume_all(broker.bootstrap, topic, 1, len(SPECIAL), timeout=30)
    else:
        recs = kcat_consume_all(broker.bootstrap, topic, len(SPECIAL), timeout=30)
    return [(r.key, r.value) for r in recs]


@pytest.mark.parametrize("producer", ["confluent", "kafka-python"])
@pytest.mark.parametrize("reader", ["confluent", "kafka-python", "kcat"])
def test_null_value_and_empty_key(broker, special_topics, producer, reader):
    got = read_special(reader, broker, special_topics[producer])
    print(f"[special {producer}->{reader}] {got}")
    assert got == SPECIAL, f"{producer}->{reader}: expected {SPECIAL}, got {got}"


def test_kcat_tombstone(broker):
    """kcat -Z sends an empty line payload as a NULL value (a tombstone)."""
    topic = unique("special-kcat")
    broker.cli("topic", "create", topic, "--partitions", "1")
    cp = subprocess.run(["kcat", "-P", "-b", broker.bootstrap, "-t", topic, "-K", ":", "-Z", "-p", "0"],
                        input=b"tomb:\nk:v\n", capture_output=True, timeout=30)
    assert cp.returncode == 0, cp.stderr
    recs = confluent_consume_all(broker.bootstrap, topic, 1, 2, timeout=30)
    got = [(r.key, r.value) for r in recs]
    assert got == [(b"tomb", None), (b"k", b"v")], got


def test_large_records_with_small_fetch_limits(broker):
    """Records bigger than the consumer's per-partition and per-response fetch
    limits still come through (Kafka returns the first batch whole, KIP-74)."""
    import hashlib

    from confluent_kafka import Producer

    topic = unique("large")
    broker.cli("topic", "create", topic, "--partitions", "2")
    sizes = [600_000, 900_000, 1_000, 750_000, 5]
    values = [hashlib.sha256(str(i).encode()).digest() * (s // 32) + b"x" * (s % 32) for i, s in enumerate(sizes)]
    p = Producer({"bootstrap.servers": broker.bootstrap, "compression.type": "none", "linger.ms": 0,
                  "enable.idempotence": True})
    errs = []
    for i, v in enumerate(values):
        p.produce(topic, key=str(i).encode(), value=v, partition=i % 2, on_delivery=lambda e, m: e and errs.append(e))
    assert p.flush(30) == 0 and not errs, errs

    recs = confluent_consume_all(broker.bootstrap, topic, 2, len(values), timeout=30, extra_conf={
        "max.partition.fetch.bytes": 100_000, "fetch.max.bytes": 200_000, "message.max.bytes": 200_000})
    got = {int(r.key): r.value for r in recs}
    assert len(recs) == len(values) and all(got[i] == v for i, v in enumerate(values)), \
        f"confluent with small fetch limits: got {len(recs)} records, sizes {[len(r.value) for r in recs]}"

    from kafka import KafkaConsumer
    from kafka import TopicPartition as KTP

    kc = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=None, auto_offset_reset="earliest",
                       max_partition_fetch_bytes=100_000, fetch_max_bytes=200_000)
    try:
        kc.assign([KTP(topic, 0), KTP(topic, 1)])
        out = {}
        deadline = time.monotonic() + 30
        while len(out) < len(values) and time.monotonic() < deadline:
            for msgs in kc.poll(timeout_ms=500).values():
                for m in msgs:
                    out[int(m.key)] = m.value
    finally:
        kc.close()
    assert len(out) == len(values) and all(out[i] == v for i, v in enumerate(values)), \
        f"kafka-python with small fetch limits: got {sorted(out)}"

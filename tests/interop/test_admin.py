"""Acceptance 4: admin APIs through real clients' admin interfaces.

ListOffsets (earliest/latest/by timestamp), DeleteRecords, retention by time
and by bytes, CreatePartitions, DescribeConfigs / IncrementalAlterConfigs,
max.message.bytes enforcement, auto topic creation and DescribeCluster, each
checked with confluent-kafka's AdminClient/Consumer/Producer and cross-checked
with kafka-python where it has the call.

The broker for this module enforces retention every 300 ms
(`[storage] retention_check_interval_ms`) so retention shows within seconds.
"""

import json
import time
import urllib.request

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import (AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, NewPartitions,
                                   NewTopic, OffsetSpec, ResourceType)

from kutil import confluent_consume_all, unique, wait_until, RF

CONFIG = """
[storage]
retention_check_interval_ms = 300
"""


@pytest.fixture(scope="module")
def abroker(broker_factory):
    return broker_factory("admin", config_text=CONFIG)


@pytest.fixture(scope="module")
def admin(abroker):
    return AdminClient({"bootstrap.servers": abroker.bootstrap})


def create(admin, name, partitions=1, config=None):
    fut = admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=RF, config=config or {})])
    fut[name].result(30)
    return name


def produce_batches(bootstrap, topic, batches, partition=0, ts=None, value_size=64):
    """Produces each inner list as its own batch (flush in between). Returns offsets in order."""
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True})
    offsets = []
    errs = []

    def cb(err, msg):
        if err:
            errs.append(str(err))
        else:
            offsets.append(msg.offset())

    n = 0
    for batch in batches:
        for _ in range(batch):
            kw = {}
            if ts is not None:
                kw["timestamp"] = ts(n)
            p.produce(topic, value=f"{n:06d}".encode() + b"v" * value_size, partition=partition, on_delivery=cb, **kw)
            n += 1
        assert p.flush(30) == 0
    assert not errs, errs
    return offsets


def list_offset(admin, topic, partition, spec):
    tp = TopicPartition(topic, partition)
    return admin.list_offsets({tp: spec}, request_timeout=15)[tp].result(30)


def earliest(admin, topic, partition=0):
    return list_offset(admin, topic, partition, OffsetSpec.earliest()).offset


def latest(admin, topic, partition=0):
    return list_offset(admin, topic, partition, OffsetSpec.latest()).offset


# -- ListOffsets -----------------------------------------------------------------


def test_list_offsets_by_timestamp(abroker, admin):
    from kafka import KafkaConsumer
    from kafka import TopicPartition as KTP

    topic = create(admin, unique("lo"))
    t0 = int(time.time() * 1000) - 3_600_000
    # 10 records in one batch (look-up inside a batch), then 10 batches of 1.
    produce_batches(abroker.bootstrap, topic, [10] + [1] * 10, ts=lambda i: t0 + i * 1000)
    assert earliest(admin, topic) == 0
    assert latest(admin, topic) == 20

    cases = {t0 - 5: 0, t0: 0, t0 + 4500: 5, t0 + 5000: 5, t0 + 9999: 10, t0 + 15000: 15, t0 + 19000: 19}
    wrong = []
    for ts, want in list(cases.items()) + [(t0 + 19001, -1)]:
        got = list_offset(admin, topic, 0, OffsetSpec.for_timestamp(ts))
        want_ts = t0 + want * 1000 if want >= 0 else -1
        print(f"[admin] AdminClient ListOffsets(ts=t0{ts - t0:+d}) -> offset {got.offset} timestamp {got.timestamp}")
        if got.offset != want or got.timestamp != want_ts:
            wrong.append(f"AdminClient.list_offsets(for_timestamp t0{ts - t0:+d}): offset {got.offset} timestamp "
                         f"{got.timestamp}, expected offset {want} timestamp {want_ts}")

    c = Consumer({"bootstrap.servers": abroker.bootstrap, "group.id": unique("oft")})
    try:
        for ts, want in [(t0 + 3000, 3), (t0 + 12000, 12), (t0 + 99_000, -1)]:
            res = c.offsets_for_times([TopicPartition(topic, 0, ts)], timeout=15)
            if res[0].offset != want:
                wrong.append(f"Consumer.offsets_for_times(t0{ts - t0:+d}): {res[0].offset}, expected {want}")
    finally:
        c.close()

    kc = KafkaConsumer(bootstrap_servers=abroker.bootstrap, group_id=None)
    try:
        tp = KTP(topic, 0)
        for ts, want in [(t0 + 7500, 8), (t0 + 12000, 12), (t0 + 99_000, None)]:
            r = kc.offsets_for_times({tp: ts})[tp]
            got = None if r is None else (r.offset, r.timestamp)
            exp = None if want is None else (want, t0 + want * 1000)
            if got != exp:
                wrong.append(f"kafka-python offsets_for_times(t0{ts - t0:+d}): {got}, expected {exp}")
        if kc.beginning_offsets([tp])[tp] != 0 or kc.end_offsets([tp])[tp] != 20:
            wrong.append(f"kafka-python beginning/end offsets {kc.beginning_offsets([tp])} {kc.end_offsets([tp])}")
    finally:
        kc.close()
    assert not wrong, ("ListOffsets by timestamp (Kafka answers the first record with timestamp >= target, "
                       "with that record's own offset and timestamp, also inside a multi-record batch):\n"
                       + "\n".join(wrong))


# -- DeleteRecords ------------------------------------------------------------------


def test_delete_records(abroker, admin):
    from kafka import TopicPartition as KTP
    from kafka.admin import KafkaAdminClient

    topic = create(admin, unique("dr"))
    produce_batches(abroker.bootstrap, topic, [10] * 5)
    tp = TopicPartition(topic, 0, 23)  # inside the third batch
    res = admin.delete_records([tp], request_timeout=15)
    dr = list(res.values())[0].result(30)
    assert dr.low_watermark == 23, f"delete_records low watermark {dr.low_watermark}, expected 23"
    assert earliest(admin, topic) == 23
    assert latest(admin, topic) == 50

    recs = confluent_consume_all(abroker.bootstrap, topic, 1, 27, timeout=30)
    offs = [r.offset for r in recs]
    assert offs == list(range(23, 50)), f"consume from beginning after DeleteRecords(23): offsets {offs[:5]}..."
    assert recs[0].value.startswith(b"000023"), recs[0].value[:10]

    # A fetch below the log start offset is OFFSET_OUT_OF_RANGE.
    c = Consumer({"bootstrap.servers": abroker.bootstrap, "group.id": unique("oor"), "auto.offset.reset": "error"})
    try:
        c.assign([TopicPartition(topic, 0, 5)])
        err = None
        deadline = time.monotonic() + 15
        while err is None and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is not None:
                assert m.error() is not None, f"fetch at offset 5 below log start 23 returned offset {m.offset()}"
                err = m.error()
        assert err is not None and err.code() in (KafkaError.OFFSET_OUT_OF_RANGE, KafkaError._AUTO_OFFSET_RESET), err
    finally:
        c.close()

    # Deleting past the high watermark is OFFSET_OUT_OF_RANGE, as in Kafka.
    res = admin.delete_records([TopicPartition(topic, 0, 1000)], request_timeout=15)
    with pytest.raises(KafkaException) as ei:
        list(res.values())[0].result(30)
    assert ei.value.args[0].code() == KafkaError.OFFSET_OUT_OF_RANGE, ei.value

    # kafka-python's DeleteRecords moves it further.
    ka = KafkaAdminClient(bootstrap_servers=abroker.bootstrap)
    try:
        out = ka.delete_records({KTP(topic, 0): 31})
        print(f"[admin] kafka-python delete_records -> {out}")
    finally:
        ka.close()
    assert earliest(admin, topic) == 31

    nodes = getattr(abroker, "nodes", None)
    if nodes:
        # In a cluster the followers take the leader's log start offset from
        # their next fetch (DeleteRecords answers once the leader applied it):
        # wait until every replica has it, so the kill below tests durability.
        def everywhere():
            starts = []
            for n in nodes:
                with urllib.request.urlopen(f"http://{n.http}/api/v1/topics", timeout=5) as r:
                    t = next(t for t in json.load(r) if t["name"] == topic)
                    starts.append(t["partitions"][0]["log_start_offset"])
            return starts == [31] * len(nodes) or None

        wait_until(everywhere, 15, what="every replica's log start offset at 31")

    # The log start offset survives a crash of the broker (of every node).
    abroker.kill9()
    abroker.start()
    # A new client for every attempt: after a restart of every node the
    # controller moves the partition to a new leader epoch a moment after the
    # nodes answer, and librdkafka's admin ListOffsets does not refresh its
    # metadata on FENCED_LEADER_EPOCH, so a client that cached the epoch of that
    # moment would be fenced until its next periodic refresh (minutes).
    def fresh():
        return AdminClient({"bootstrap.servers": abroker.bootstrap})

    assert wait_until(lambda: earliest(fresh(), topic) == 31, 30, interval=0.5, what="log start offset 31 after restart")
    # A restarted replicated partition starts its high watermark low and
    # raises it as the followers fetch again (a single node has it at once).
    assert wait_until(lambda: latest(fresh(), topic) == 50, 30, interval=0.5, what="high watermark 50 after restart")


# -- retention ----------------------------------------------------------------------


def test_retention_by_time(abroker, admin):
    retention_ms = 2000
    topic = create(admin, unique("ret"), config={
        "retention.ms": str(retention_ms), "segment.bytes": "1024", "segment.ms": "500"})
    n1 = 60
    t_first = time.monotonic()
    produce_batches(abroker.bootstrap, topic, [3] * (n1 // 3), value_size=100)
    t_last = time.monotonic()
    assert latest(admin, topic) == n1
    e0 = earliest(admin, topic)
    if time.monotonic() - t_first < retention_ms / 1000 * 0.8:
        assert e0 == 0, f"records disappeared before retention.ms elapsed: earliest {e0}"
    # New records appended after the old ones expired; they roll the active segment.
    time.sleep(max(0.0, t_last + retention_ms / 1000 + 0.3 - time.monotonic()))
    produce_batches(abroker.bootstrap, topic, [1] * 3, value_size=100)

    def gone():
        e = earliest(admin, topic)
        return e if e >= n1 else None

    e = wait_until(gone, 20, interval=0.2, what=f"retention to remove the first {n1} records")
    print(f"[admin] retention: earliest offset {e} {time.monotonic() - t_last:.1f}s after the last old record")
    hw = latest(admin, topic)
    assert hw == n1 + 3, f"high watermark changed by retention: {hw}"
    if e < hw:
        recs = confluent_consume_all(abroker.bootstrap, topic, 1, hw - e, timeout=20)
        assert all(r.offset >= n1 for r in recs), f"expired records still readable: {[r.offset for r in recs][:5]}"


def test_retention_by_bytes(abroker, admin):
    topic = create(admin, unique("retb"), config={"retention.bytes": "2048", "segment.bytes": "1024"})
    n = 60
    produce_batches(abroker.bootstrap, topic, [1] * n, value_size=200)  # ~270 bytes per batch
    # Kafka keeps whole segments: at most retention.bytes plus the active segment remain.
    e = wait_until(lambda: earliest(admin, topic) or None, 20, interval=0.2, what="retention.bytes to delete segments")
    time.sleep(1.0)
    e = earliest(admin, topic)
    remaining = n - e
    print(f"[admin] retention.bytes=2048: earliest {e}, {remaining} of {n} records remain")
    assert 0 < remaining <= (2048 + 1024) // 250 + 2, f"{remaining} records remain, more than retention.bytes allows"


# -- CreatePartitions -----------------------------------------------------------------


def test_create_partitions(abroker, admin):
    from kafka import KafkaConsumer

    topic = create(admin, unique("cp"), partitions=2)
    admin.create_partitions([NewPartitions(topic, 5)])[topic].result(30)
    # In a cluster another node may answer Metadata a moment before it has
    # applied the change (Kafka's metadata propagates the same way).
    seen = []

    def five():
        md = admin.list_topics(topic, timeout=10).topics[topic].partitions
        seen.append(sorted(md))
        return sorted(md) == [0, 1, 2, 3, 4] or None

    wait_until(five, 10, what="Metadata to show the 5 partitions")
    assert seen[-1] == [0, 1, 2, 3, 4], seen
    kc = KafkaConsumer(bootstrap_servers=abroker.bootstrap, group_id=None)
    try:
        assert kc.partitions_for_topic(topic) == {0, 1, 2, 3, 4}
    finally:
        kc.close()

    offs = produce_batches(abroker.bootstrap, topic, [3], partition=4)
    assert offs == [0, 1, 2]
    recs = confluent_consume_all(abroker.bootstrap, topic, 5, 3, timeout=20)
    assert [(r.partition, r.offset) for r in recs] == [(4, 0), (4, 1), (4, 2)]

    # Shrinking is refused with INVALID_PARTITIONS.
    with pytest.raises(KafkaException) as ei:
        admin.create_partitions([NewPartitions(topic, 3)])[topic].result(30)
    assert ei.value.args[0].code() == KafkaError.INVALID_PARTITIONS, ei.value


# -- DescribeConfigs / IncrementalAlterConfigs ----------------------------------------


def describe(admin, topic):
    res = ConfigResource(ResourceType.TOPIC, topic)
    return admin.describe_configs([res], request_timeout=15)[res].result(30)


def test_describe_and_alter_configs(abroker, admin):
    from kafka.admin import ConfigResource as KCR
    from kafka.admin import ConfigResourceType, KafkaAdminClient

    topic = create(admin, unique("cfg"), config={"retention.ms": "3600000", "max.message.bytes": "200000"})
    cfg = describe(admin, topic)
    want_keys = {"retention.ms", "retention.bytes", "segment.bytes", "max.message.bytes", "cleanup.policy"}
    missing = want_keys - set(cfg)
    assert not missing, f"DescribeConfigs lacks {missing}; has {sorted(cfg)}"
    print("[admin] " + ", ".join(f"{k}={cfg[k].value}{'' if cfg[k].is_default else '*'}" for k in sorted(want_keys)))
    assert cfg["retention.ms"].value == "3600000" and not cfg["retention.ms"].is_default
    assert cfg["max.message.bytes"].value == "200000" and not cfg["max.message.bytes"].is_default
    assert cfg["retention.bytes"].value == "-1" and cfg["retention.bytes"].is_default
    assert cfg["cleanup.policy"].value == "delete"
    assert int(cfg["segment.bytes"].value) > 0

    res = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[
        ConfigEntry("retention.ms", "7200000", incremental_operation=AlterConfigOpType.SET),
        ConfigEntry("cleanup.policy", "compact", incremental_operation=AlterConfigOpType.SET),
    ])
    admin.incremental_alter_configs([res])[res].result(30)
    cfg = describe(admin, topic)
    assert cfg["retention.ms"].value == "7200000", cfg["retention.ms"]
    assert cfg["cleanup.policy"].value == "compact", cfg["cleanup.policy"]
    assert cfg["max.message.bytes"].value == "200000", "incremental alter dropped another override"

    res = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[
        ConfigEntry("retention.ms", None, incremental_operation=AlterConfigOpType.DELETE)])
    admin.incremental_alter_configs([res])[res].result(30)
    cfg = describe(admin, topic)
    assert cfg["retention.ms"].is_default, f"after DELETE retention.ms is {cfg['retention.ms']}"

    bad = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[
        ConfigEntry("retention.ms", "not-a-number", incremental_operation=AlterConfigOpType.SET)])
    with pytest.raises(KafkaException) as ei:
        admin.incremental_alter_configs([bad])[bad].result(30)
    assert ei.value.args[0].code() == KafkaError.INVALID_CONFIG, ei.value

    # The same view through kafka-python.
    ka = KafkaAdminClient(bootstrap_servers=abroker.bootstrap)
    try:
        out = ka.describe_configs([KCR(ConfigResourceType.TOPIC, topic)], config_filter="all")
    finally:
        ka.close()
    text = repr(out)
    assert "max.message.bytes" in text and "200000" in text, f"kafka-python describe_configs: {text[:500]}"


# -- max.message.bytes ------------------------------------------------------------------


def test_max_message_bytes_enforced(abroker, admin):
    from kafka import KafkaProducer
    from kafka.errors import MessageSizeTooLargeError

    topic = create(admin, unique("mmb"), config={"max.message.bytes": "10000"})
    p = Producer({"bootstrap.servers": abroker.bootstrap, "compression.type": "none", "linger.ms": 0})
    results = []
    p.produce(topic, value=b"a" * 5000, on_delivery=lambda e, m: results.append(("small", e)))
    assert p.flush(30) == 0
    p.produce(topic, value=b"b" * 20000, on_delivery=lambda e, m: results.append(("big", e)))
    assert p.flush(30) == 0
    print(f"[admin] max.message.bytes results: {results}")
    assert results[0] == ("small", None), results
    assert results[1][1] is not None and results[1][1].code() == KafkaError.MSG_SIZE_TOO_LARGE, results

    kp = KafkaProducer(bootstrap_servers=abroker.bootstrap, linger_ms=0, retries=0)
    try:
        fut = kp.send(topic, value=b"c" * 20000)
        with pytest.raises(MessageSizeTooLargeError):
            fut.get(timeout=30)
    finally:
        kp.close(timeout=10)
    assert latest(admin, topic) == 1, "an oversized record was appended"


# -- auto topic creation, DescribeCluster ---------------------------------------------------


def test_auto_topic_creation(abroker, admin):
    from kafka import KafkaProducer

    topic = unique("auto")
    assert topic not in admin.list_topics(timeout=10).topics
    p = Producer({"bootstrap.servers": abroker.bootstrap})
    errs = []
    p.produce(topic, key=b"k", value=b"v", on_delivery=lambda e, m: errs.append(e))
    assert p.flush(30) == 0 and errs == [None], errs
    md = admin.list_topics(timeout=10).topics
    assert topic in md and len(md[topic].partitions) == 1, f"auto-created topic metadata: {md.get(topic)}"

    # A Metadata request naming an unknown topic creates it (allow_auto_topic_creation).
    topic_md = unique("auto-md")
    md = wait_until(lambda: p.list_topics(topic_md, timeout=10).topics[topic_md].partitions or None, 15,
                    what="metadata auto-creation")
    assert sorted(md) == [0], f"metadata-created topic partitions: {sorted(md)}"
    # In a cluster the admin client may ask another node, whose metadata can
    # trail the creating node's by a moment (as between Kafka brokers).
    wait_until(lambda: topic_md in admin.list_topics(timeout=10).topics, 15,
               what="the created topic in every node's metadata")

    # ... but not when the request says allow_auto_topic_creation=false.
    topic_no = unique("auto-no")
    c = Consumer({"bootstrap.servers": abroker.bootstrap, "group.id": unique("noauto"),
                  "allow.auto.create.topics": False})
    try:
        tmd = c.list_topics(topic_no, timeout=10).topics.get(topic_no)
        assert tmd is None or tmd.error is not None, f"unknown topic answered without error: {tmd}"
    finally:
        c.close()
    time.sleep(0.5)
    assert topic_no not in admin.list_topics(timeout=10).topics, "created despite allow_auto_topic_creation=false"

    topic2 = unique("auto-kp")
    kp = KafkaProducer(bootstrap_servers=abroker.bootstrap)
    try:
        meta = kp.send(topic2, value=b"x").get(timeout=30)
        assert meta.offset == 0 and meta.partition == 0
    finally:
        kp.close(timeout=10)
    assert topic2 in admin.list_topics(timeout=10).topics


def test_describe_cluster(abroker, admin):
    d = admin.describe_cluster(request_timeout=15).result(30)
    print(f"[admin] cluster id={d.cluster_id} controller={d.controller} nodes={d.nodes}")
    expected = sorted(abroker.bootstrap.split(","))
    assert sorted(f"{n.host}:{n.port}" for n in d.nodes) == expected

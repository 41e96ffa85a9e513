"""Client quotas (DescribeClientQuotas, AlterClientQuotas): producer and
consumer byte rates per client id and user, with defaults, kept in the
metadata quorum and enforced by each node as a Kafka broker does: a client
over its quota is told to wait (throttle_time_ms) and its connection is
muted meanwhile. kafka-python's protocol classes send the admin requests
(neither Python client has the admin calls); confluent-kafka producers and
consumers are throttled. Single node and three-node cluster.
"""

import json
import time

from confluent_kafka import Consumer, Producer
from confluent_kafka import TopicPartition as CTP
from kafka.admin import KafkaAdminClient
from kafka.protocol.admin.client_quotas import AlterClientQuotasRequest, DescribeClientQuotasRequest

from kutil import unique
from test_transactions import create

INVALID_REQUEST = 42
QUOTA = 100 * 1024  # bytes per second
# 1.6 MB: the first window lets about 1.1 MB through at QUOTA, the rest
# takes about 5 s more.
RECORD, RECORDS = 16 * 1024, 100


def send(admin, request):
    return admin._manager.run(admin._manager.send, request)


def alter(admin, changes, validate_only=False):
    """changes: [(entity {type: name or None}, {key: value or None to remove})];
    the error code of each entry."""
    E = AlterClientQuotasRequest.EntryData
    entries = [
        E(entity=[E.EntityData(entity_type=k, entity_name=n) for k, n in entity.items()],
          ops=[E.OpData(key=key, value=float(v or 0), remove=v is None) for key, v in ops.items()])
        for entity, ops in changes
    ]
    resp = send(admin, AlterClientQuotasRequest(entries=entries, validate_only=validate_only))
    return [e.error_code for e in resp.entries]


def describe(admin, components=(), strict=False):
    """components: [(type, match type, name)]; {entity: {key: value}}."""
    C = DescribeClientQuotasRequest.ComponentData
    resp = send(admin, DescribeClientQuotasRequest(
        components=[C(entity_type=t, match_type=m, match=n) for t, m, n in components], strict=strict))
    assert resp.error_code == 0, resp
    return {tuple((e.entity_type, e.entity_name) for e in entry.entity): {v.key: v.value for v in entry.values}
            for entry in resp.entries}


def test_quotas_are_set_described_and_removed(broker):
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    app, user = unique("app"), unique("user")
    try:
        assert alter(admin, [({"client-id": app}, {"producer_byte_rate": 1024}),
                             ({"user": user, "client-id": None}, {"consumer_byte_rate": 2048,
                                                                 "producer_byte_rate": 4096})]) == [0, 0]
        everything = describe(admin)
        assert everything[(("client-id", app),)] == {"producer_byte_rate": 1024.0}
        assert everything[(("client-id", None), ("user", user))] == {"consumer_byte_rate": 2048.0,
                                                                     "producer_byte_rate": 4096.0}
        # Exact, default and any matches; strict wants exactly the types named.
        assert describe(admin, [("client-id", 0, app)], strict=True) == {(("client-id", app),): {
            "producer_byte_rate": 1024.0}}
        assert (("client-id", None), ("user", user)) in describe(admin, [("client-id", 1, None)])
        assert describe(admin, [("client-id", 1, None)], strict=True).get((("client-id", None),)) is None
        assert set(describe(admin, [("user", 0, user), ("client-id", 2, None)], strict=True)) == {
            (("client-id", None), ("user", user))}
        # What Sluice does not enforce is refused, with the rest of its entry.
        assert alter(admin, [({"client-id": app}, {"request_percentage": 50}),
                             ({"ip": None}, {"connection_creation_rate": 10}),
                             ({"client-id": app}, {"producer_byte_rate": 0.5})]) == [INVALID_REQUEST] * 3
        assert alter(admin, [({"client-id": app}, {"producer_byte_rate": 1})], validate_only=True) == [0]
        assert describe(admin, [("client-id", 0, app)])[(("client-id", app),)] == {"producer_byte_rate": 1024.0}
        # Removing every value removes the entity.
        assert alter(admin, [({"client-id": app}, {"producer_byte_rate": None}),
                             ({"user": user, "client-id": None}, {"consumer_byte_rate": None})]) == [0, 0]
        assert describe(admin, [("client-id", 0, app)]) == {}
        assert describe(admin, [("user", 0, user)]) == {(("client-id", None), ("user", user)): {
            "producer_byte_rate": 4096.0}}
        assert alter(admin, [({"user": user, "client-id": None}, {"producer_byte_rate": None})]) == [0]
    finally:
        admin.close()


def produce_all(bootstrap, topic, client_id):
    """(seconds to write RECORDS records as `client_id`, the longest throttle
    librdkafka reported)."""
    throttles = [0]

    def stats(text):
        for b in json.loads(text).get("brokers", {}).values():
            throttles.append(b.get("throttle", {}).get("max", 0))

    # Small requests one at a time: the broker's answer to each says how
    # long to wait, and the next is read only then.
    p = Producer({"bootstrap.servers": bootstrap, "client.id": client_id, "acks": "all", "linger.ms": 5,
                  "batch.size": 64 * 1024, "max.in.flight": 1, "compression.type": "none",
                  "statistics.interval.ms": 200, "stats_cb": stats})
    start = time.monotonic()
    for _ in range(RECORDS):
        p.produce(topic, value=bytes(RECORD), partition=0)
        p.poll(0)
    assert p.flush(120) == 0
    took = time.monotonic() - start
    p.poll(0.5)
    return took, max(throttles)


def consume_all(bootstrap, topic, client_id):
    c = Consumer({"bootstrap.servers": bootstrap, "client.id": client_id, "group.id": unique("g"),
                  "enable.auto.commit": False, "fetch.max.bytes": 64 * 1024, "message.max.bytes": 64 * 1024,
                  "max.partition.fetch.bytes": 64 * 1024})
    c.assign([CTP(topic, 0, 0)])
    got, start = 0, time.monotonic()
    while got < RECORDS and time.monotonic() - start < 120:
        m = c.poll(0.5)
        if m is not None and not m.error():
            got += 1
    took = time.monotonic() - start
    c.close()
    assert got == RECORDS
    return took


def test_a_client_over_its_byte_rate_is_throttled_and_others_are_not(broker):
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    topic = unique("quota")
    create(broker.bootstrap, topic, partitions=1)
    slow, fast = unique("slow"), unique("fast")
    try:
        assert alter(admin, [({"client-id": slow}, {"producer_byte_rate": QUOTA,
                                                    "consumer_byte_rate": QUOTA})]) == [0]
        quick, quick_throttle = produce_all(broker.bootstrap, topic, fast)
        took, throttle = produce_all(broker.bootstrap, topic, slow)
        # About 5 s at QUOTA after the first window's allowance; the
        # unthrottled client writes the same in a fraction of that.
        assert took >= 2.5, (took, throttle)
        assert throttle > 0 and quick_throttle == 0, (throttle, quick_throttle)
        assert quick < took / 2, (quick, took)
        reading_fast = consume_all(broker.bootstrap, topic, fast)
        reading_slow = consume_all(broker.bootstrap, topic, slow)
        print(f"[quota {QUOTA} B/s, {RECORD * RECORDS} B] produce {quick:.2f}s unthrottled, {took:.2f}s "
              f"throttled (librdkafka saw up to {throttle} ms); fetch {reading_fast:.2f}s vs {reading_slow:.2f}s")
        assert reading_slow >= 2.5 and reading_fast < reading_slow / 2, (reading_fast, reading_slow)
    finally:
        alter(admin, [({"client-id": slow}, {"producer_byte_rate": None, "consumer_byte_rate": None})])
        admin.close()

"""A restarted node serves nothing from its stale metadata (cluster mode).

A node's local metadata log may say it leads a partition that another node
has led since the node died. Until the node has registered with the quorum
(and so applied every change committed before its registration), it must not
act on that: no produce may be acknowledged there, acks=1 included, or the
record is lost when the node learns of the new leader and truncates.

The window is made as long as the test likes: the other two nodes are
stopped (SIGSTOP) while the node restarts, so it cannot reach a quorum.
"""

import os
import signal
import time

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from kutil import unique
from test_transactions import read

pytestmark = pytest.mark.skipif(
    not os.environ.get("SLUICE_INTEROP_CLUSTER"), reason="needs the three-node cluster"
)


def leader_of(bootstrap, topic, partition=0, timeout=30.0):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            md = admin.list_topics(topic, timeout=5).topics.get(topic)
            if md is not None and md.error is None and partition in md.partitions:
                leader = md.partitions[partition].leader
                if leader >= 0:
                    return leader
        except Exception:  # noqa: BLE001 - a node may be restarting
            pass
        time.sleep(0.2)
    raise AssertionError(f"no leader for {topic}-{partition} in {timeout}s")


def produce(bootstrap, topic, values, acks, timeout_ms=30000):
    """Produces `values`; returns those the broker acknowledged."""
    acked = []
    p = Producer({"bootstrap.servers": bootstrap, "acks": acks, "enable.idempotence": False,
                  "message.timeout.ms": timeout_ms, "retries": 0 if acks == "1" else 10})

    def done(err, msg):
        if err is None:
            acked.append(msg.value().decode())

    for v in values:
        p.produce(topic, v.encode(), partition=0, on_delivery=done)
    p.flush(timeout_ms / 1000 + 10)
    return acked


def test_a_restarted_node_acknowledges_nothing_for_a_partition_it_led_before(broker):
    cluster = broker
    topic = unique("fenced")
    admin = AdminClient({"bootstrap.servers": cluster.bootstrap})
    admin.create_topics([NewTopic(topic, 1, 3)])[topic].result(30)
    before = [f"before-{i}" for i in range(20)]
    assert produce(cluster.bootstrap, topic, before, "all") == before

    old = leader_of(cluster.bootstrap, topic)
    node = cluster.nodes[old - 1]
    others = [b for b in cluster.nodes if b is not node]
    node.kill9()
    rest = ",".join(b.bootstrap for b in others)
    deadline = time.monotonic() + 30
    while leader_of(rest, topic) == old:
        assert time.monotonic() < deadline, "leadership did not move off the killed node"
        time.sleep(0.2)
    moved = [f"moved-{i}" for i in range(20)]
    assert produce(rest, topic, moved, "all") == moved

    for b in others:
        os.kill(b.proc.pid, signal.SIGSTOP)
    try:
        # The node comes back knowing only what it knew when it died: that
        # it led the partition. No quorum answers it.
        node.start()
        time.sleep(1.0)
        stale = [f"stale-{i}" for i in range(5)]
        acked = produce(node.bootstrap, topic, stale, "1", timeout_ms=4000)
        assert acked == [], f"an unregistered node acknowledged {acked}"
    finally:
        for b in others:
            os.kill(b.proc.pid, signal.SIGCONT)

    cluster.wait_healthy()
    after = [f"after-{i}" for i in range(20)]
    assert produce(cluster.bootstrap, topic, after, "all") == after
    got = [v.decode() if isinstance(v, bytes) else v for v in read(cluster.bootstrap, [topic], "read_committed")]
    assert got == before + moved + after

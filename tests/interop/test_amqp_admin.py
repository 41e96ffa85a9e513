"""The operator's side of AMQP: `sluice queue|exchange|binding` through the HTTP
API of a running `sluice serve`, checked against what pika sees."""

import json
import os
import subprocess
import time
import uuid

import pika
import pytest

from conftest import sluice_bin


@pytest.fixture(scope="module")
def node(broker):
    if not getattr(broker, "amqp_port", None):
        pytest.skip("the external broker has no AMQP listener known to the harness")
    return broker


def sluice(node, *args, check=True):
    cp = subprocess.run(
        [sluice_bin(), *args, "--http", node.http], capture_output=True, text=True, timeout=60
    )
    if check:
        assert cp.returncode == 0, f"sluice {' '.join(args)}: {cp.stderr}"
    return cp


def channel(node):
    params = pika.ConnectionParameters(
        "127.0.0.1", node.amqp_port, "/", pika.PlainCredentials("guest", "guest")
    )
    conn = pika.BlockingConnection(params)
    return conn, conn.channel()


def queue_row(node, name):
    rows = json.loads(sluice(node, "queue", "list", "--json").stdout)
    return next(r for r in rows if r["name"] == name)


def test_queue_lifecycle_from_the_command_line(node):
    q = f"ops-{uuid.uuid4().hex[:8]}"
    sluice(node, "queue", "declare", q, "--arg", "x-max-length=100")
    conn, ch = channel(node)
    try:
        # The declaration is the operator's: a client redeclaring it the same way agrees.
        ch.queue_declare(q, durable=True, arguments={"x-max-length": 100})
        ch.confirm_delivery()
        for i in range(5):
            ch.basic_publish("", q, f"m{i}".encode())
        row = queue_row(node, q)
        assert row["messages_ready"] == 5
        assert row["published_total"] == 5
        assert row["durable"] is True and row["arguments"] == {"x-max-length": "100"}
        assert row["topic"] == f"amqp.{q}"
        # The list comes from node 1; in a cluster the queue may be led by
        # another node, whose counts node 1 asks for.
        assert row["served_here"] is (row["leader"] == 1 or not os.environ.get("SLUICE_INTEROP_CLUSTER"))

        peek = sluice(node, "queue", "get", q, "--count", "2", "--requeue").stdout
        assert "m0" in peek and "m1" in peek
        taken = sluice(node, "queue", "get", q, "--count", "1").stdout
        assert "m0" in taken and "true" in taken  # requeued above: redelivered
        assert queue_row(node, q)["messages_ready"] == 4

        # A consumer shows up in the list.
        ch.basic_consume(q, lambda *a: None, auto_ack=False)
        conn.process_data_events(time_limit=0.5)
        row = queue_row(node, q)
        assert row["consumers"] == 1 and row["messages_unacknowledged"] == 4

        refused = sluice(node, "queue", "delete", q, "--if-unused", check=False)
        assert refused.returncode != 0 and "in use" in refused.stderr
    finally:
        conn.close()
    assert "purged (4 messages)" in sluice(node, "queue", "purge", q).stdout
    sluice(node, "queue", "delete", q)
    assert all(r["name"] != q for r in json.loads(sluice(node, "queue", "list", "--json").stdout))
    missing = sluice(node, "queue", "purge", q, check=False)
    assert missing.returncode != 0 and "NOT_FOUND" in missing.stderr


def test_exchanges_and_bindings_from_the_command_line(node):
    ex, q = f"ops-x-{uuid.uuid4().hex[:8]}", f"ops-q-{uuid.uuid4().hex[:8]}"
    sluice(node, "exchange", "declare", ex, "--type", "topic")
    sluice(node, "queue", "declare", q)
    sluice(node, "binding", "add", ex, q, "--routing-key", "orders.*")
    exchanges = json.loads(sluice(node, "exchange", "list", "--json").stdout)
    assert {"name": ex, "type": "topic"}.items() <= next(e for e in exchanges if e["name"] == ex).items()
    assert any(e["name"] == "amq.topic" for e in exchanges)
    bindings = json.loads(sluice(node, "binding", "list", "--json").stdout)
    assert any(b["source"] == ex and b["destination"] == q and b["routing_key"] == "orders.*" for b in bindings)

    conn, ch = channel(node)
    try:
        ch.confirm_delivery()
        ch.basic_publish(ex, "orders.created", b"routed")
        ch.basic_publish(ex, "users.created", b"not routed")
        deadline = time.monotonic() + 10
        while queue_row(node, q)["messages_ready"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert queue_row(node, q)["messages_ready"] == 1
    finally:
        conn.close()

    sluice(node, "binding", "remove", ex, q, "--routing-key", "orders.*")
    assert not any(b["source"] == ex for b in json.loads(sluice(node, "binding", "list", "--json").stdout))
    bad = sluice(node, "exchange", "declare", "amq.mine", "--type", "direct", check=False)
    assert bad.returncode != 0 and "ACCESS_REFUSED" in bad.stderr
    sluice(node, "exchange", "delete", ex)
    sluice(node, "queue", "delete", q)


def test_listing_queues_does_not_keep_an_expiring_queue_alive(node):
    q = f"ops-exp-{uuid.uuid4().hex[:8]}"
    sluice(node, "queue", "declare", q, "--arg", "x-expires=1000")
    # An operator watching the list is not a use of the queue (as in RabbitMQ).
    deadline = time.monotonic() + 10
    while any(r["name"] == q for r in json.loads(sluice(node, "queue", "list", "--json").stdout)):
        assert time.monotonic() < deadline, "the listed queue never expired"
        time.sleep(0.2)

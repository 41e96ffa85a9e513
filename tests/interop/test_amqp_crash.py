"""AMQP under `kill -9`, with pika: confirms and acknowledgements are durable.

Several rounds of: publish persistent messages with confirms, consume some
without acknowledging, acknowledge others out of order, then SIGKILL the broker
while another publisher is sending, and start it again on the same data. After
every restart:

- no confirmed message is lost, and none appears twice once acknowledged;
- an acknowledged message never comes back;
- a message delivered but not acknowledged before the crash comes back with
  `redelivered` set.

Sluice only: RabbitMQ's own restart takes longer than this suite allows.
"""

import os
import threading
import time
import uuid

import pika
import pytest

ROUNDS = 3
PER_ROUND = 120
# Acknowledgements and delivery marks are written within milliseconds of their
# arrival; the crash comes this long after the broker has read them.
SETTLE_S = 1.0


def connect(broker):
    return pika.BlockingConnection(
        pika.ConnectionParameters("127.0.0.1", broker.amqp_port, "/", pika.PlainCredentials("guest", "guest"))
    )


def publish(broker, q, bodies):
    """Publishes with confirms; returns the bodies whose confirm arrived."""
    confirmed = []
    with connect(broker) as c:
        ch = c.channel()
        ch.queue_declare(q, durable=True)
        ch.confirm_delivery()
        for b in bodies:
            ch.basic_publish("", q, b, pika.BasicProperties(delivery_mode=2))
            confirmed.append(b)
    return confirmed


class Publisher(threading.Thread):
    """Publishes with confirms until the broker dies under it."""

    def __init__(self, broker, q, prefix):
        super().__init__(daemon=True)
        self.broker, self.q, self.prefix = broker, q, prefix
        self.attempted, self.confirmed = set(), set()

    def run(self):
        try:
            with connect(self.broker) as c:
                ch = c.channel()
                ch.confirm_delivery()
                for n in range(100_000):
                    body = f"{self.prefix}-{n}".encode()
                    self.attempted.add(body)
                    ch.basic_publish("", self.q, body, pika.BasicProperties(delivery_mode=2))
                    self.confirmed.add(body)
        except Exception:
            # The kill: whatever was not confirmed may or may not be stored.
            pass


def take(broker, q, count, quiet_s=1.0):
    """Consumes up to `count` messages without acknowledging them, keeping the
    connection open; returns (connection, channel, [(tag, body, redelivered)])."""
    c = connect(broker)
    ch = c.channel()
    ch.basic_qos(prefetch_count=count)
    got = []
    ch.basic_consume(q, lambda ch_, m, p, b: got.append((m.delivery_tag, b, m.redelivered)))
    deadline = time.monotonic() + 15
    last = time.monotonic()
    while len(got) < count and time.monotonic() < deadline:
        n = len(got)
        c.process_data_events(0.1)
        if len(got) > n:
            last = time.monotonic()
        elif got and time.monotonic() - last > quiet_s:
            break
    return c, ch, got


def test_confirms_and_acks_survive_kill_9(broker_factory):
    broker = broker_factory("crash")
    q = f"crash-{uuid.uuid4().hex[:8]}"
    confirmed = set()
    attempted = set()
    acked = set()
    owed_redelivery = set()
    serial = 0
    for round_ in range(ROUNDS):
        bodies = [f"r{round_}-m{serial + i}".encode() for i in range(PER_ROUND)]
        serial += PER_ROUND
        confirmed.update(publish(broker, q, bodies))

        c, ch, got = take(broker, q, 60)
        assert got, f"round {round_}: nothing delivered"
        for tag, body, redelivered in got:
            assert body not in acked, f"round {round_}: acknowledged {body!r} came back"
            if body in owed_redelivery:
                assert redelivered, f"round {round_}: {body!r} was delivered before the crash but not flagged"
                owed_redelivery.discard(body)
        # Out of order: every second delivery is acknowledged, the rest stay
        # unacknowledged across the crash.
        for i, (tag, body, _) in enumerate(got):
            if i % 2 == 1:
                ch.basic_ack(tag)
                acked.add(body)
            else:
                owed_redelivery.add(body)
        # A round trip on the channel: the broker has read every ack before
        # it answers (AMQP acknowledges no ack); then give it time to write.
        ch.basic_qos(prefetch_count=60)
        # Mid-stream: a publisher is sending when the broker dies.
        publisher = Publisher(broker, q, f"r{round_}-live")
        publisher.start()
        time.sleep(SETTLE_S)
        broker.kill9()
        publisher.join(30)
        assert publisher.confirmed, f"round {round_}: the live publisher got no confirm before the kill"
        confirmed |= publisher.confirmed
        attempted |= publisher.attempted
        broker.start()

    # Drain: everything confirmed and not acknowledged is there, once.
    c, ch, got = take(broker, q, len(confirmed | attempted), quiet_s=2.0)
    rest = [body for _, body, _ in got]
    for _, body, redelivered in got:
        if body in owed_redelivery:
            assert redelivered, f"{body!r} was delivered before the crash but not flagged"
    assert not acked & set(rest), f"acknowledged messages came back: {sorted(acked & set(rest))[:5]}"
    assert len(rest) == len(set(rest)), "a message was delivered twice in one run"
    assert confirmed <= acked | set(rest), f"confirmed and lost: {sorted(confirmed - acked - set(rest))[:5]}"
    # A publish that was never confirmed may have been stored before the kill.
    unexpected = set(rest) - confirmed - attempted
    assert not unexpected, f"never published: {sorted(unexpected)[:5]}"
    ch.basic_ack(got[-1][0], multiple=True)
    c.process_data_events(0.5)
    c.close()


def test_delivery_counts_survive_kill_9(broker_factory):
    broker = broker_factory("crash-counts")
    q, dlq = f"poison-{uuid.uuid4().hex[:8]}", f"poison-dlq-{uuid.uuid4().hex[:8]}"
    with connect(broker) as c:
        ch = c.channel()
        ch.queue_declare(dlq, durable=True)
        ch.queue_declare(
            q,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": 1,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": dlq,
            },
        )
        ch.confirm_delivery()
        ch.basic_publish("", q, b"poison", pika.BasicProperties(delivery_mode=2))
        method, props, _ = ch.basic_get(q)
        assert props.headers["x-delivery-count"] == 0
        ch.basic_nack(method.delivery_tag, requeue=True)
        ch.basic_qos(prefetch_count=1)  # a round trip: the nack was read
        time.sleep(SETTLE_S)
    broker.kill9()
    broker.start()
    with connect(broker) as c:
        ch = c.channel()
        method, props, _ = ch.basic_get(q)
        assert method.redelivered and props.headers["x-delivery-count"] == 1
        ch.basic_nack(method.delivery_tag, requeue=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            method, props, body = ch.basic_get(dlq, auto_ack=True)
            if method is not None:
                break
            time.sleep(0.1)
        assert body == b"poison" and props.headers["x-death"][0]["reason"] == "delivery_limit"

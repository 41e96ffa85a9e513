"""Stream queues (`x-queue-type=stream`) with pika, against Sluice and RabbitMQ.

A stream is a log read without consuming: each consumer starts where its
`x-stream-offset` argument says, acknowledgements only return prefetch credit,
and every delivery carries its offset in the `x-stream-offset` header. The same
tests run on both servers, so they encode RabbitMQ's behaviour.
"""

import datetime
import os
import time
import uuid

import pika
import pika.exceptions
import pytest

from amqp_servers import rabbitmq_server, server  # noqa: F401 - pytest fixtures

WAIT_S = 15.0
STREAM = {"x-queue-type": "stream"}


def name(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def declare_stream(ch, q, **args):
    return ch.queue_declare(q, durable=True, arguments={**STREAM, **args})


def publish(server, q, bodies):
    with server.connect() as c:
        ch = c.channel()
        declare_stream(ch, q)
        ch.confirm_delivery()
        for i, b in enumerate(bodies):
            ch.basic_publish("", q, b, pika.BasicProperties(headers={"n": i}, message_id=f"id-{i}"))


def read(server, q, offset, want, prefetch=10, settle=True, quiet_s=0.7):
    """Consumes from `offset` until `want` messages came (or nothing more comes
    for `quiet_s` once `want` is 0): [(body, stream offset, headers, redelivered)]."""
    got = []
    with server.connect() as c:
        ch = c.channel()
        ch.basic_qos(prefetch_count=prefetch)
        args = {} if offset is None else {"x-stream-offset": offset}

        def on_message(ch_, method, props, body):
            headers = dict(props.headers or {})
            got.append((body, headers.get("x-stream-offset"), headers, method.redelivered))
            if settle:
                ch_.basic_ack(method.delivery_tag)

        ch.basic_consume(q, on_message, arguments=args)
        deadline = time.monotonic() + (WAIT_S if want else quiet_s)
        while time.monotonic() < deadline and (want == 0 or len(got) < want):
            c.process_data_events(0.1)
        if want:
            # Anything beyond `want` would show up now.
            end = time.monotonic() + quiet_s
            while time.monotonic() < end:
                c.process_data_events(0.1)
    return got


def bodies(got):
    return [g[0] for g in got]


def test_consumers_read_the_same_stream_from_where_they_ask(server):
    q = name("stream")
    sent = [f"m{i}".encode() for i in range(6)]
    publish(server, q, sent)

    first = read(server, q, "first", 6)
    assert bodies(first) == sent
    assert [g[1] for g in first] == list(range(6))
    assert [g[2]["n"] for g in first] == list(range(6))
    assert not any(g[3] for g in first), "stream deliveries are never redelivered"

    # Acknowledged messages stay: a second reader sees them all again.
    assert bodies(read(server, q, "first", 6)) == sent
    assert bodies(read(server, q, 4, 2)) == sent[4:]
    assert bodies(read(server, q, "last", 1)) == sent[-1:]
    assert bodies(read(server, q, 1000, 0)) == []
    assert bodies(read(server, q, datetime.datetime(2020, 1, 1), 6)) == sent
    assert bodies(read(server, q, "1h", 6)) == sent
    with server.connect() as c:
        c.channel().queue_delete(q)


def test_next_is_the_default_and_reads_only_new_messages(server):
    q = name("stream-next")
    publish(server, q, [b"old"])
    with server.connect() as c:
        ch = c.channel()
        ch.basic_qos(prefetch_count=5)
        got = []
        ch.basic_consume(q, lambda ch_, m, p, b: (got.append(b), ch_.basic_ack(m.delivery_tag)))
        c.process_data_events(0.5)
        assert got == []
        with server.connect() as pc:
            pch = pc.channel()
            pch.confirm_delivery()
            pch.basic_publish("", q, b"new")
        deadline = time.monotonic() + WAIT_S
        while not got and time.monotonic() < deadline:
            c.process_data_events(0.1)
        assert got == [b"new"]
        ch.queue_delete(q)


def test_prefetch_bounds_unacknowledged_stream_deliveries(server):
    q = name("stream-credit")
    publish(server, q, [f"m{i}".encode() for i in range(5)])
    with server.connect() as c:
        ch = c.channel()
        ch.basic_qos(prefetch_count=2)
        got = []
        ch.basic_consume(q, lambda ch_, m, p, b: got.append(m.delivery_tag), arguments={"x-stream-offset": "first"})
        c.process_data_events(1.0)
        assert len(got) == 2, got
        ch.basic_ack(got[-1], multiple=True)
        deadline = time.monotonic() + WAIT_S
        while len(got) < 4 and time.monotonic() < deadline:
            c.process_data_events(0.1)
        c.process_data_events(0.5)
        assert len(got) == 4, got
        ch.queue_delete(q)


def test_deliveries_of_a_deleted_stream_settle_as_nothing(server):
    """A stream refuses nack and reject (below), but not once it is gone: a
    client that rejects what its consumer still held when the stream was
    deleted (pika does so for deliveries it had not handed out when it
    closes) keeps its connection, and its channel goes on."""
    q = name("stream-gone")
    publish(server, q, [b"a", b"b"])
    with server.connect() as c:
        ch = c.channel()
        ch.basic_qos(prefetch_count=10)
        got = []
        ch.basic_consume(q, lambda ch_, m, p, b: got.append(m.delivery_tag), arguments={"x-stream-offset": "first"})
        deadline = time.monotonic() + WAIT_S
        while len(got) < 2 and time.monotonic() < deadline:
            c.process_data_events(0.1)
        assert len(got) == 2, got
        c.channel().queue_delete(q)
        c.process_data_events(0.5)
        ch.basic_reject(got[0], requeue=True)
        ch.basic_nack(got[1], requeue=False)
        c.process_data_events(0.5)
        assert ch.is_open and c.is_open
        # The channel still works.
        ch.queue_declare(name("after"), exclusive=True)


def test_kafka_reads_a_stream_queue_as_a_topic(server):
    if server.kind != "sluice":
        pytest.skip("a queue readable as a Kafka topic is Sluice's")
    from confluent_kafka import Consumer

    q = name("stream-kafka")
    publish(server, q, [f"m{i}".encode() for i in range(3)])
    consumer = Consumer(
        {"bootstrap.servers": server.bootstrap, "group.id": name("g"), "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([f"amqp.{q}"])
    got = []
    deadline = time.monotonic() + 30
    while len(got) < 3 and time.monotonic() < deadline:
        m = consumer.poll(0.5)
        if m is not None and not m.error():
            got.append(m.value())
    consumer.close()
    assert got == [b"m0", b"m1", b"m2"]


# -- what a stream refuses, as RabbitMQ refuses it ------------------------------------


def refused(server, action, connection_level=False):
    """The reply code of the close `action` provokes (channel or connection)."""
    kind = pika.exceptions.ConnectionClosedByBroker if connection_level else pika.exceptions.ChannelClosedByBroker
    with server.connect() as c:
        ch = c.channel()
        with pytest.raises(kind) as e:
            action(c, ch)
        return e.value.reply_code, e.value.reply_text


@pytest.mark.parametrize(
    "properties,arguments",
    [
        ({"durable": False}, {}),
        ({"durable": True, "exclusive": True}, {}),
        ({"durable": True, "auto_delete": True}, {}),
        ({"durable": True}, {"x-message-ttl": 1000}),
        ({"durable": True}, {"x-max-length": 5}),
        ({"durable": True}, {"x-dead-letter-exchange": "dlx"}),
        ({"durable": True}, {"x-max-age": "7Q"}),
    ],
)
def test_stream_declarations_rabbitmq_refuses_are_406(server, properties, arguments):
    q = name("stream-bad")
    code, text = refused(server, lambda c, ch: ch.queue_declare(q, arguments={**STREAM, **arguments}, **properties))
    assert code == 406 and text.startswith("PRECONDITION_FAILED"), text


def test_stream_retention_arguments_are_accepted(server):
    q = name("stream-retained")
    with server.connect() as c:
        ch = c.channel()
        declare_stream(ch, q, **{"x-max-age": "7D", "x-max-length-bytes": 10_000_000})
        # The same declaration again is equivalent.
        declare_stream(ch, q, **{"x-max-age": "7D", "x-max-length-bytes": 10_000_000})
        if server.kind == "sluice":
            # They are the retention of the stream's topic.
            from confluent_kafka.admin import AdminClient, ConfigResource

            admin = AdminClient({"bootstrap.servers": server.bootstrap})
            resource = ConfigResource(ConfigResource.Type.TOPIC, f"amqp.{q}")
            configs = admin.describe_configs([resource])[resource].result(30)
            assert configs["retention.ms"].value == str(7 * 86_400_000)
            assert configs["retention.bytes"].value == "10000000"
        ch.queue_delete(q)


def test_get_purge_no_ack_and_nack_on_a_stream_close_the_connection_with_540(server):
    q = name("stream-refuse")
    publish(server, q, [b"x"])

    def consume_then(settle):
        def act(c, ch):
            ch.basic_qos(prefetch_count=1)
            ch.basic_consume(q, lambda ch_, m, p, b: settle(ch_, m), arguments={"x-stream-offset": "first"})
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline:
                c.process_data_events(0.1)

        return act

    def no_ack(c, ch):
        ch.basic_qos(prefetch_count=1)
        ch.basic_consume(q, lambda *a: None, auto_ack=True)
        c.process_data_events(1.0)

    for action in (
        lambda c, ch: ch.basic_get(q),
        lambda c, ch: ch.queue_purge(q),
        no_ack,
        consume_then(lambda ch_, m: ch_.basic_nack(m.delivery_tag, requeue=True)),
        consume_then(lambda ch_, m: ch_.basic_reject(m.delivery_tag, requeue=False)),
    ):
        code, text = refused(server, action, connection_level=True)
        assert code == 540 and text.startswith("NOT_IMPLEMENTED"), text
    with server.connect() as c:
        c.channel().queue_delete(q)


def test_stream_consumer_without_a_prefetch_is_406(server):
    q = name("stream-noqos")
    publish(server, q, [b"x"])

    def without_prefetch(c, ch):
        ch.basic_consume(q, lambda *a: None)

    def with_channel_wide_prefetch_only(c, ch):
        ch.basic_qos(prefetch_count=10, global_qos=True)
        ch.basic_consume(q, lambda *a: None)

    for action in (without_prefetch, with_channel_wide_prefetch_only):
        code, text = refused(server, action)
        assert code == 406 and "prefetch count is not set" in text, text
    with server.connect() as c:
        c.channel().queue_delete(q)


# -- a Kafka topic read over AMQP as a stream queue (Sluice's) ------------------------


def create_topic(bootstrap, topic, partitions):
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    # The broker's default replication: every node of the cluster holds a
    # replica of every partition.
    admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=-1)])[topic].result(30)
    return admin


def test_an_amqp_stream_consumer_reads_a_kafka_topic(server):
    if server.kind != "sluice":
        pytest.skip("x-stream-topic is Sluice's")
    from confluent_kafka import Producer

    topic = name("orders")
    admin = create_topic(server.bootstrap, topic, 3)
    producer = Producer({"bootstrap.servers": server.bootstrap, "partitioner": "murmur2_random"})
    sent = {}
    delivered = []
    for i in range(30):
        key = f"customer-{i % 7}"
        sent[f"order {i}".encode()] = key
        producer.produce(
            topic,
            key=key,
            value=f"order {i}".encode(),
            headers=[("source", b"kafka")],
            on_delivery=lambda err, m: delivered.append((err, m.partition(), m.offset(), m.value())),
        )
    assert producer.flush(30) == 0
    assert all(err is None for err, *_ in delivered)
    where = {value: (p, o) for _, p, o, value in delivered}
    if os.environ.get("SLUICE_INTEROP_CLUSTER"):
        leaders = {p.leader for p in admin.list_topics(topic, timeout=10).topics[topic].partitions.values()}
        assert len(leaders) > 1, f"the partitions should be led by different nodes: {leaders}"

    q = name("orders-stream")
    with server.connect() as c:
        declare_stream(c.channel(), q, **{"x-stream-topic": topic})
    got = read(server, q, "first", 30)
    assert sorted(bodies(got)) == sorted(sent), "every record of every partition, once"
    for body, offset, headers, _ in got:
        assert (headers["x-stream-partition"], offset) == where[body]
        assert headers["source"] == "kafka"  # a Kafka header is a long string; pika decodes it
    # Within a partition, in offset order.
    for p in range(3):
        offsets = [g[1] for g in got if g[2]["x-stream-partition"] == p]
        assert offsets == sorted(offsets)

    # A message published over AMQP lands where Kafka's partitioner puts its
    # key (the routing key), whichever node leads that partition.
    keys = [f"key-{i}" for i in range(12)]
    exchange = name("orders-in")
    with server.connect() as c:
        ch = c.channel()
        ch.exchange_declare(exchange, "fanout")
        ch.queue_bind(q, exchange)
        ch.confirm_delivery()
        for key in keys:
            ch.basic_publish(exchange, key, f"amqp {key}".encode(), pika.BasicProperties(headers={"via": "amqp"}))
    key_partition = {}
    probe = Producer({"bootstrap.servers": server.bootstrap, "partitioner": "murmur2_random"})
    for key in keys:
        probe.produce(
            topic,
            key=key,
            value=b"probe",
            on_delivery=lambda err, m: key_partition.update({m.key().decode(): m.partition()}),
        )
    assert probe.flush(30) == 0
    assert len(set(key_partition.values())) == 3, "the keys reach every partition"
    tail = [g for g in read(server, q, "first", 30 + 2 * len(keys)) if g[0] != b"probe" and g[0].startswith(b"amqp ")]
    assert sorted(g[0] for g in tail) == sorted(f"amqp {k}".encode() for k in keys)
    for body, _, headers, _ in tail:
        assert headers["x-stream-partition"] == key_partition[body.decode().removeprefix("amqp ")]
        assert headers["via"] == "amqp"

    # Deleting the stream queue leaves the Kafka topic.
    with server.connect() as c:
        c.channel().queue_delete(q)
    assert topic in admin.list_topics(timeout=10).topics


def test_a_stream_over_a_missing_topic_is_404(server):
    if server.kind != "sluice":
        pytest.skip("x-stream-topic is Sluice's")
    code, text = refused(server, lambda c, ch: declare_stream(ch, name("s"), **{"x-stream-topic": name("nothing")}))
    assert code == 404 and "no topic" in text, text
    code, text = refused(server, lambda c, ch: ch.queue_declare(name("s"), arguments={"x-stream-topic": "t"}))
    assert code == 406, text
    code, text = refused(server, lambda c, ch: declare_stream(ch, name("s"), **{"x-stream-topic": "__consumer_offsets"}))
    assert code == 403, text
    # A queue's own topic, or one another stream reads, is taken.
    owner = name("owner")
    with server.connect() as c:
        c.channel().queue_declare(owner, durable=True)
    code, text = refused(server, lambda c, ch: declare_stream(ch, name("s"), **{"x-stream-topic": f"amqp.{owner}"}))
    assert code == 405, text
    with server.connect() as c:
        c.channel().queue_delete(owner)

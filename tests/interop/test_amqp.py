"""AMQP 0-9-1 with pika, unmodified, against Sluice and against RabbitMQ.

Every test runs twice: on a `sluice serve` and on a private node of Debian's
rabbitmq-server. The assertions are what RabbitMQ does, so a test that passes on
both is RabbitMQ's behaviour reproduced, not Sluice's idea of it.

Covered here: the source article's pika sample, RabbitMQ's six tutorials, acks
and redelivery, confirms and returns, prefetch, large multi-frame bodies, every
message property, exclusive and auto-delete lifecycles, and the error codes of
refused methods.
"""

import os
import subprocess
import sys
import threading
import time
import uuid

import pika
import pika.exceptions
import pytest

from amqp_servers import rabbitmq_server, server  # noqa: F401 - pytest fixtures


WAIT_S = 15.0


def wait_gone(ch_factory, queue, why):
    """Passive declares until the queue is gone (404), within WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            ch_factory().queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as e:
            assert e.reply_code == 404
            return
        assert time.monotonic() < deadline, why
        time.sleep(0.1)


def name(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def drain(channel, queue, count, auto_ack=True, timeout=WAIT_S):
    """Consumes `count` messages (bodies, in order) with basic.consume."""
    got = []
    deadline = time.monotonic() + timeout
    for method, props, body in channel.consume(queue, auto_ack=auto_ack, inactivity_timeout=0.5):
        if method is not None:
            got.append(body)
            if not auto_ack:
                channel.basic_ack(method.delivery_tag)
        if len(got) >= count or time.monotonic() > deadline:
            break
    channel.cancel()
    return got


def get_one(channel, queue, timeout=WAIT_S):
    """basic.get until a message arrives (confirm-less publishes land a little later)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        method, props, body = channel.basic_get(queue, auto_ack=False)
        if method is not None:
            return method, props, body
        time.sleep(0.05)
    raise AssertionError(f"no message on {queue} within {timeout}s")


# -- the source article's sample ---------------------------------------------------


def test_article_sample_publishes_hello_world(server):
    # The article's app.py, with `import pika` and the credentials passed as pika
    # takes them.
    params = pika.ConnectionParameters("localhost", server.port, "/", pika.PlainCredentials("guest", "guest"))
    connection = pika.BlockingConnection(params)
    channel = connection.channel()
    channel.queue_declare(queue="hello")
    channel.basic_publish(exchange="", routing_key="hello", body="Hello World!")
    connection.close()

    with server.connect() as c:
        ch = c.channel()
        method, _, body = get_one(ch, "hello")
        assert body == b"Hello World!"
        assert method.routing_key == "hello"
        assert method.exchange == ""
        assert method.redelivered is False
        ch.basic_ack(method.delivery_tag)
        ch.queue_delete("hello")


# -- RabbitMQ's tutorials ------------------------------------------------------


def test_tutorial1_hello_world_consumer(server):
    q = name("t1")
    with server.connect() as c:
        ch = c.channel()
        ch.queue_declare(q)
        for i in range(10):
            ch.basic_publish("", q, f"hello {i}".encode())
        got = drain(ch, q, 10)
        assert got == [f"hello {i}".encode() for i in range(10)]
        ch.queue_delete(q)


def test_tutorial2_work_queue_fair_dispatch(server):
    q = name("task_queue")
    n = 40
    with server.connect() as c:
        ch = c.channel()
        ch.queue_declare(q, durable=True)
        ch.confirm_delivery()
        for i in range(n):
            ch.basic_publish(
                "", q, f"task {i}".encode(), pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
            )
    done = {"slow": [], "fast": []}
    lock = threading.Lock()

    def worker(label, delay):
        with server.connect() as c:
            ch = c.channel()
            ch.basic_qos(prefetch_count=1)
            deadline = time.monotonic() + 30
            for method, _, body in ch.consume(q, inactivity_timeout=0.3):
                if method is None:
                    with lock:
                        if len(done["slow"]) + len(done["fast"]) >= n or time.monotonic() > deadline:
                            break
                    continue
                time.sleep(delay)
                with lock:
                    done[label].append(body)
                ch.basic_ack(method.delivery_tag)
            ch.cancel()

    threads = [threading.Thread(target=worker, args=a) for a in (("slow", 0.2), ("fast", 0.0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    everything = sorted(done["slow"] + done["fast"], key=lambda b: int(b.split()[1]))
    assert everything == [f"task {i}".encode() for i in range(n)], "each task once"
    # Fair dispatch with prefetch 1: the busy worker is not handed every other task.
    assert len(done["fast"]) > len(done["slow"]) * 2, (len(done["fast"]), len(done["slow"]))
    with server.connect() as c:
        c.channel().queue_delete(q)


def test_tutorial3_publish_subscribe_fanout(server):
    ex = name("logs")
    with server.connect() as c:
        ch = c.channel()
        ch.exchange_declare(ex, exchange_type="fanout")
        queues = []
        for _ in range(2):
            r = ch.queue_declare("", exclusive=True)
            assert r.method.queue.startswith("amq.gen-")
            ch.queue_bind(r.method.queue, ex)
            queues.append(r.method.queue)
        for i in range(5):
            ch.basic_publish(ex, "", f"log {i}".encode())
        for q in queues:
            assert drain(ch, q, 5) == [f"log {i}".encode() for i in range(5)]
        ch.exchange_delete(ex)


def test_tutorial4_routing_direct(server):
    ex = name("direct_logs")
    with server.connect() as c:
        ch = c.channel()
        ch.exchange_declare(ex, exchange_type="direct")
        errors = ch.queue_declare("", exclusive=True).method.queue
        everything = ch.queue_declare("", exclusive=True).method.queue
        ch.queue_bind(errors, ex, routing_key="error")
        for sev in ("info", "warning", "error"):
            ch.queue_bind(everything, ex, routing_key=sev)
        for sev in ("info", "error", "debug", "warning"):
            ch.basic_publish(ex, sev, sev.encode())
        assert drain(ch, errors, 1) == [b"error"]
        assert drain(ch, everything, 3) == [b"info", b"error", b"warning"]
        ch.exchange_delete(ex)


def test_tutorial5_topics(server):
    ex = name("topic_logs")
    with server.connect() as c:
        ch = c.channel()
        ch.exchange_declare(ex, exchange_type="topic")
        orange = ch.queue_declare("", exclusive=True).method.queue
        lazy = ch.queue_declare("", exclusive=True).method.queue
        ch.queue_bind(orange, ex, "*.orange.*")
        ch.queue_bind(lazy, ex, "*.*.rabbit")
        ch.queue_bind(lazy, ex, "lazy.#")
        keys = [
            "quick.orange.rabbit",
            "lazy.orange.elephant",
            "quick.orange.fox",
            "lazy.brown.fox",
            "quick.brown.fox",
            "quick.orange.male.rabbit",
            "lazy.orange.male.rabbit",
            "lazy",
        ]
        for k in keys:
            ch.basic_publish(ex, k, k.encode())
        assert drain(ch, orange, 3) == [b"quick.orange.rabbit", b"lazy.orange.elephant", b"quick.orange.fox"]
        assert drain(ch, lazy, 5) == [
            b"quick.orange.rabbit",
            b"lazy.orange.elephant",
            b"lazy.brown.fox",
            b"lazy.orange.male.rabbit",
            b"lazy",
        ]
        ch.exchange_delete(ex)


def test_tutorial6_rpc(server):
    rpc_queue = name("rpc_queue")
    ready = threading.Event()
    stop = threading.Event()

    def fib(n):
        a, b = 0, 1
        for _ in range(n):
            a, b = b, a + b
        return a

    def rpc_server():
        with server.connect() as c:
            ch = c.channel()
            ch.queue_declare(rpc_queue)
            ch.basic_qos(prefetch_count=1)
            ready.set()
            for method, props, body in ch.consume(rpc_queue, inactivity_timeout=0.2):
                if stop.is_set():
                    break
                if method is None:
                    continue
                reply = str(fib(int(body))).encode()
                ch.basic_publish(
                    "", props.reply_to, reply, pika.BasicProperties(correlation_id=props.correlation_id)
                )
                ch.basic_ack(method.delivery_tag)
            ch.cancel()

    t = threading.Thread(target=rpc_server)
    t.start()
    try:
        assert ready.wait(WAIT_S)
        with server.connect() as c:
            ch = c.channel()
            callback = ch.queue_declare("", exclusive=True).method.queue
            answers = {}
            for n in (1, 10, 30):
                corr = str(uuid.uuid4())
                ch.basic_publish(
                    "", rpc_queue, str(n).encode(), pika.BasicProperties(reply_to=callback, correlation_id=corr)
                )
                _, props, body = get_one(ch, callback)
                assert props.correlation_id == corr
                answers[n] = int(body)
            assert answers == {1: 1, 10: 55, 30: 832040}
    finally:
        stop.set()
        t.join(WAIT_S)
    with server.connect() as c:
        c.channel().queue_delete(rpc_queue)


# -- acknowledgements ----------------------------------------------------------


def test_unacked_message_is_redelivered_when_its_channel_closes(server):
    q = name("redeliver")
    with server.connect() as c:
        ch = c.channel()
        ch.queue_declare(q)
        ch.confirm_delivery()
        ch.basic_publish("", q, b"once")
        method, _, body = get_one(ch, q)
        assert (body, method.redelivered) == (b"once", False)
        ch.close()
        ch = c.channel()
        method, _, body = get_one(ch, q)
        assert (body, method.redelivered) == (b"once", True)
        ch.basic_ack(method.delivery_tag)
        assert ch.basic_get(q)[0] is None
        ch.queue_delete(q)


def test_nack_requeues_and_reject_discards(server):
    q = name("nack")
    with server.connect() as c:
        ch = c.channel()
        ch.queue_declare(q)
        ch.confirm_delivery()
        ch.basic_publish("", q, b"a")
        ch.basic_publish("", q, b"b")
        m1, _, b1 = get_one(ch, q)
        m2, _, b2 = get_one(ch, q)
        assert (b1, b2) == (b"a", b"b")
        ch.basic_nack(m2.delivery_tag, multiple=True, requeue=True)
        again = [get_one(ch, q) for _ in range(2)]
        assert sorted(b for _, _, b in again) == [b"a", b"b"]
        assert all(m.redelivered for m, _, _ in again)
        for m, _, _ in again:
            ch.basic_reject(m.delivery_tag, requeue=False)
        ch.basic_qos(prefetch_count=0)  # a round trip: the rejects were handled
        assert ch.basic_get(q)[0] is None
        ch.queue_delete(q)


STALLED_CONSUMER = """
import sys, time
import pika
params = pika.ConnectionParameters("127.0.0.1", int(sys.argv[1]), "/", pika.PlainCredentials("guest", "guest"))
channel = pika.BlockingConnection(params).channel()
channel.basic_consume(sys.argv[2], lambda *args: None)
print("consuming", flush=True)
time.sleep(600)  # never reads again
"""


def test_a_consumer_that_stops_reading_and_dies_hands_back_everything_it_was_sent(server):
    """A consumer without a prefetch limit stops reading its socket, so the
    server's buffers towards it fill: the socket, the bytes waiting to be
    written, the deliveries waiting to be encoded (and, on a cluster, those
    on their way from the queue's node). When its process is killed, every
    message it was sent and did not ack goes back to the queue, wherever it
    waited: another consumer gets all of them, each once."""
    q = name("stalled")
    n, size = 5000, 4096
    with server.connect() as c:
        ch = c.channel()
        ch.queue_declare(q)
        ch.confirm_delivery()
        for i in range(n):
            ch.basic_publish("", q, i.to_bytes(4, "big") + bytes(size - 4))
    stalled = subprocess.Popen(
        [sys.executable, "-c", STALLED_CONSUMER, str(server.port), q],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert stalled.stdout.readline().strip() == "consuming"
        # The server pushes until every buffer towards the consumer is full.
        time.sleep(2)
    finally:
        stalled.kill()
        stalled.wait()
    with server.connect() as c:
        ch = c.channel()
        got = drain(ch, q, n, auto_ack=False, timeout=60)
        ids = sorted(int.from_bytes(body[:4], "big") for body in got)
        assert ids == list(range(n)), f"{len(ids)} messages back of {n}, {len(set(ids))} distinct"
        ch.queue_delete(q)


def test_multiple_ack_settles_everything_up_to_the_tag(server):
    q = name("multi")
    with server.connect() as c:
        ch = c.channel()
        ch.queue_declare(q)
        ch.confirm_delivery()
        for i in range(5):
            ch.basic_publish("", q, str(i).encode())
        tags = [get_one(ch, q)[0].delivery_tag for _ in range(5)]
        assert tags == sorted(tags)
        ch.basic_ack(tags[2], multiple=True)
        ch.close()
        ch = c.channel()
        left = [get_one(ch, q)[2] for _ in range(2)]
        assert left == [b"3", b"4"]
        ch.queue_delete(q)


def test_prefetch_limits_unacked_deliveries(server):
    q = name("prefetch")
    with server.connect() as c:
        ch = c.channel()
        ch.queue_declare(q)
        ch.confirm_delivery()
        for i in range(10):
            ch.basic_publish("", q, str(i).encode())
        ch.basic_qos(prefetch_count=3)
        seen = []
        ch.basic_consume(q, lambda c_, m, p, b: seen.append(m))
        c.process_data_events(time_limit=1.0)
        assert len(seen) == 3
        ch.basic_ack(seen[0].delivery_tag)
        c.process_data_events(time_limit=1.0)
        assert len(seen) == 4
        ch.basic_ack(0, multiple=True)
        deadline = time.monotonic() + WAIT_S
        while len(seen) < 10 and time.monotonic() < deadline:
            c.process_data_events(time_limit=0.2)
            ch.basic_ack(0, multiple=True)
        assert [m.delivery_tag for m in seen] == list(range(1, 11))
        ch.queue_delete(q)


# -- confirms and returns ------------------------------------------------------


def test_confirms_and_mandatory_returns(server):
    q = name("confirm")
    with server.connect() as c:
        ch = c.channel()
        ch.queue_declare(q, durable=True)
        ch.confirm_delivery()
        for i in range(100):
            ch.basic_publish("", q, str(i).encode(), pika.BasicProperties(delivery_mode=2), mandatory=True)
        with pytest.raises(pika.exceptions.UnroutableError):
            ch.basic_publish("", name("nowhere"), b"lost", mandatory=True)
        # Unroutable without mandatory: confirmed and dropped, as RabbitMQ does.
        ch.basic_publish("", name("nowhere"), b"dropped")
        assert ch.queue_declare(q, durable=True, passive=True).method.message_count == 100
        ch.queue_delete(q)


# -- content -------------------------------------------------------------------


def test_large_body_spans_many_frames(server):
    q = name("large")
    body = os.urandom(3 * 1024 * 1024 + 17)
    with server.connect(frame_max=8192) as c:
        ch = c.channel()
        ch.queue_declare(q)
        ch.confirm_delivery()
        ch.basic_publish("", q, body)
        _, _, got = get_one(ch, q)
        assert got == body
        ch.queue_delete(q)


def test_every_property_round_trips(server):
    q = name("props")
    props = pika.BasicProperties(
        content_type="application/json",
        content_encoding="gzip",
        headers={
            "s": "text",
            "i": 42,
            "neg": -7,
            "big": 2**40,
            "t": True,
            "nested": {"a": [1, "two", False]},
            "bytes": b"\x00\x01",
        },
        delivery_mode=2,
        priority=5,
        correlation_id="corr-1",
        reply_to="replies",
        expiration="60000",
        message_id="msg-1",
        timestamp=1700000000,
        type="order.created",
        user_id="guest",
        app_id="tests",
        cluster_id="c1",
    )
    with server.connect() as c:
        ch = c.channel()
        ch.queue_declare(q)
        ch.confirm_delivery()
        ch.basic_publish("", q, b"{}", props)
        _, got, _ = get_one(ch, q)
        for field in (
            "content_type",
            "content_encoding",
            "delivery_mode",
            "priority",
            "correlation_id",
            "reply_to",
            "expiration",
            "message_id",
            "timestamp",
            "type",
            "user_id",
            "app_id",
            "cluster_id",
        ):
            assert getattr(got, field) == getattr(props, field), field
        assert got.headers == props.headers
        ch.queue_delete(q)


def test_empty_body(server):
    q = name("empty")
    with server.connect() as c:
        ch = c.channel()
        ch.queue_declare(q)
        ch.confirm_delivery()
        ch.basic_publish("", q, b"")
        assert get_one(ch, q)[2] == b""
        ch.queue_delete(q)


# -- lifecycles ----------------------------------------------------------------


def test_exclusive_queue_belongs_to_its_connection(server):
    owner = server.connect()
    q = owner.channel().queue_declare("", exclusive=True).method.queue
    with server.connect() as other:
        ch = other.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
            ch.queue_declare(q, passive=True)
        assert e.value.reply_code == 405
    owner.close()
    with server.connect() as other:
        # RabbitMQ has deleted it by close-ok: the first look must find it gone.
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
            other.channel().queue_declare(q, passive=True)
        assert e.value.reply_code == 404


def test_auto_delete_queue_goes_with_its_last_consumer(server):
    q = name("auto")
    with server.connect() as c:
        ch = c.channel()
        ch.queue_declare(q, auto_delete=True)
        tag = ch.basic_consume(q, lambda *a: None)
        ch.basic_cancel(tag)
        wait_gone(c.channel, q, "auto-delete queue outlived its consumer")


def test_purge_and_conditional_delete(server):
    q = name("purge")
    with server.connect() as c:
        ch = c.channel()
        ch.queue_declare(q)
        ch.confirm_delivery()
        for i in range(7):
            ch.basic_publish("", q, b"x")
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
            ch.queue_delete(q, if_empty=True)
        assert e.value.reply_code == 406
        ch = c.channel()
        assert ch.queue_purge(q).method.message_count == 7
        assert ch.basic_get(q)[0] is None
        ch.queue_delete(q, if_empty=True)


def test_consumer_is_cancelled_when_its_queue_is_deleted(server):
    q = name("cancelled")
    cancelled = []
    with server.connect() as c:
        ch = c.channel()
        ch.queue_declare(q)
        ch.add_on_cancel_callback(lambda frame: cancelled.append(frame.method.consumer_tag))
        tag = ch.basic_consume(q, lambda *a: None)
        with server.connect() as other:
            other.channel().queue_delete(q)
        deadline = time.monotonic() + WAIT_S
        while not cancelled and time.monotonic() < deadline:
            c.process_data_events(time_limit=0.2)
        assert cancelled == [tag]


# -- routing details -----------------------------------------------------------


def test_headers_exchange_all_and_any(server):
    ex = name("hdrs")
    with server.connect() as c:
        ch = c.channel()
        ch.exchange_declare(ex, exchange_type="headers")
        all_q = ch.queue_declare("", exclusive=True).method.queue
        any_q = ch.queue_declare("", exclusive=True).method.queue
        ch.queue_bind(all_q, ex, arguments={"x-match": "all", "format": "pdf", "type": "report"})
        ch.queue_bind(any_q, ex, arguments={"x-match": "any", "format": "pdf", "type": "report"})
        for i, h in enumerate(({"format": "pdf", "type": "report"}, {"format": "pdf"}, {"type": "log"})):
            ch.basic_publish(ex, "", str(i).encode(), pika.BasicProperties(headers=h))
        assert drain(ch, all_q, 1) == [b"0"]
        assert drain(ch, any_q, 2) == [b"0", b"1"]
        ch.exchange_delete(ex)


def test_exchange_to_exchange_and_alternate_exchange(server):
    upstream, downstream, alt = name("up"), name("down"), name("alt")
    with server.connect() as c:
        ch = c.channel()
        ch.exchange_declare(alt, exchange_type="fanout")
        ch.exchange_declare(upstream, exchange_type="direct", arguments={"alternate-exchange": alt})
        ch.exchange_declare(downstream, exchange_type="fanout")
        ch.exchange_bind(downstream, upstream, routing_key="k")
        via = ch.queue_declare("", exclusive=True).method.queue
        unrouted = ch.queue_declare("", exclusive=True).method.queue
        ch.queue_bind(via, downstream)
        ch.queue_bind(unrouted, alt)
        ch.basic_publish(upstream, "k", b"routed")
        ch.basic_publish(upstream, "other", b"alternate")
        assert drain(ch, via, 1) == [b"routed"]
        assert drain(ch, unrouted, 1) == [b"alternate"]
        for ex in (upstream, downstream, alt):
            ch.exchange_delete(ex)


# -- errors as RabbitMQ gives them -------------------------------------------------


def closed_by_broker(server, action):
    with server.connect() as c:
        ch = c.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
            action(ch)
        return e.value.reply_code, e.value.reply_text


def test_passive_declare_of_a_missing_queue_is_404(server):
    code, text = closed_by_broker(server, lambda ch: ch.queue_declare(name("missing"), passive=True))
    assert code == 404 and text.startswith("NOT_FOUND"), text


def test_redeclare_with_other_properties_is_406(server):
    q = name("redeclare")

    def act(ch):
        ch.queue_declare(q, durable=False)
        ch.queue_declare(q, durable=True)

    code, text = closed_by_broker(server, act)
    assert code == 406 and "inequivalent arg 'durable'" in text, text
    with server.connect() as c:
        c.channel().queue_delete(q)


def test_ack_of_an_unknown_delivery_tag_is_406(server):
    def act(ch):
        ch.basic_ack(99)
        ch.queue_declare(name("after"), exclusive=True)

    code, text = closed_by_broker(server, act)
    assert code == 406 and "unknown delivery tag 99" in text, text


def test_reserved_exchange_name_is_403(server):
    code, _ = closed_by_broker(server, lambda ch: ch.exchange_declare("amq.mine", exchange_type="direct"))
    assert code == 403


def test_publish_to_a_missing_exchange_is_404(server):
    def act(ch):
        ch.confirm_delivery()
        ch.basic_publish(name("no-such-exchange"), "k", b"x")

    code, text = closed_by_broker(server, act)
    assert code == 404 and "no exchange" in text, text


def test_redeclare_exchange_with_another_type_is_406(server):
    ex = name("typed")

    def act(ch):
        ch.exchange_declare(ex, exchange_type="direct")
        ch.exchange_declare(ex, exchange_type="fanout")

    code, _ = closed_by_broker(server, act)
    assert code == 406
    with server.connect() as c:
        c.channel().exchange_delete(ex)


def test_a_closed_channel_leaves_the_connection_and_its_other_channels_working(server):
    q = name("survivor")
    with server.connect() as c:
        good = c.channel()
        good.queue_declare(q)
        bad = c.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker):
            bad.queue_declare(name("missing"), passive=True)
        good.confirm_delivery()
        good.basic_publish("", q, b"still fine")
        assert get_one(good, q)[2] == b"still fine"
        good.queue_delete(q)


# -- aio-pika ------------------------------------------------------------------


def test_aio_pika_round_trip(server):
    import asyncio

    import aio_pika

    async def run():
        q_name = name("aio")
        conn = await aio_pika.connect_robust(f"amqp://guest:guest@127.0.0.1:{server.port}/")
        async with conn:
            ch = await conn.channel(publisher_confirms=True)
            await ch.set_qos(prefetch_count=10)
            q = await ch.declare_queue(q_name, durable=True)
            for i in range(50):
                await ch.default_exchange.publish(
                    aio_pika.Message(
                        f"m{i}".encode(),
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        headers={"i": i},
                    ),
                    routing_key=q_name,
                )
            got = []
            async with q.iterator() as it:
                async for message in it:
                    async with message.process():
                        got.append((message.body, message.headers["i"]))
                    if len(got) == 50:
                        break
            assert got == [(f"m{i}".encode(), i) for i in range(50)]
            await q.delete()

    asyncio.run(asyncio.wait_for(run(), 60))


# -- across protocols (Sluice only: RabbitMQ has no Kafka side) ------------------


def test_kafka_client_reads_an_amqp_queue_as_a_topic(server):
    if server.kind != "sluice":
        pytest.skip("a queue readable as a Kafka topic is Sluice's")
    from confluent_kafka import Consumer

    q = name("xproto")
    with server.connect() as c:
        ch = c.channel()
        ch.queue_declare(q, durable=True)
        ch.confirm_delivery()
        for i in range(20):
            ch.basic_publish("", q, f"body {i}".encode(), pika.BasicProperties(message_id=f"id-{i}"))
    consumer = Consumer(
        {
            "bootstrap.servers": server.bootstrap,
            "group.id": name("reader"),
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([f"amqp.{q}"])
    got = []
    deadline = time.monotonic() + 30
    while len(got) < 20 and time.monotonic() < deadline:
        m = consumer.poll(0.5)
        if m is None or m.error():
            continue
        got.append(m)
    consumer.close()
    assert [m.value() for m in got] == [f"body {i}".encode() for i in range(20)]
    assert {m.key() for m in got} == {q.encode()}
    headers = dict(got[0].headers())
    assert headers["amqp.exchange"] == b""
    assert b"id-0" in headers["amqp.properties"]


def test_kafka_clients_read_past_the_queues_delivery_state_records(server):
    if server.kind != "sluice":
        pytest.skip("a queue readable as a Kafka topic is Sluice's")
    from confluent_kafka import Consumer, TopicPartition

    # AMQP consumption with out-of-order acks leaves delivery-state control
    # records in the queue's log, between its messages; Kafka readers skip them.
    q = name("xproto-state")
    with server.connect() as c:
        ch = c.channel()
        ch.queue_declare(q, durable=True)
        ch.confirm_delivery()
        for i in range(10):
            ch.basic_publish("", q, f"body {i}".encode())
        ch.basic_qos(prefetch_count=10)
        got = []
        ch.basic_consume(q, lambda ch_, m, p, b: got.append(m.delivery_tag))
        deadline = time.monotonic() + WAIT_S
        while len(got) < 10 and time.monotonic() < deadline:
            c.process_data_events(0.1)
        for tag in got[1::2]:
            ch.basic_ack(tag)
        ch.basic_qos(prefetch_count=10)
        for _ in range(5):
            ch.basic_publish("", q, b"after")
        time.sleep(0.5)
    consumer = Consumer({"bootstrap.servers": server.bootstrap, "group.id": name("reader"), "enable.auto.commit": False})
    consumer.assign([TopicPartition(f"amqp.{q}", 0, 0)])
    values = []
    deadline = time.monotonic() + 30
    while len(values) < 15 and time.monotonic() < deadline:
        m = consumer.poll(0.5)
        if m is not None and not m.error():
            values.append(m.value())
    consumer.close()
    assert values == [f"body {i}".encode() for i in range(10)] + [b"after"] * 5
    # kafka-python, a client with its own decoder, reads it the same way.
    from kafka import KafkaConsumer
    from kafka import TopicPartition as KTP

    kc = KafkaConsumer(bootstrap_servers=server.bootstrap, enable_auto_commit=False, consumer_timeout_ms=5000)
    kc.assign([KTP(f"amqp.{q}", 0)])
    kc.seek(KTP(f"amqp.{q}", 0), 0)
    assert [r.value for r in kc] == values
    kc.close()


# -- queue arguments: dead-lettering, TTL, length limits, single active consumer ----


def declare_dlq(ch):
    """A fanout dead-letter exchange and the queue it feeds."""
    dlx = name("dlx")
    ch.exchange_declare(dlx, exchange_type="fanout")
    dlq = name("dlq")
    ch.queue_declare(dlq)
    ch.queue_bind(dlq, dlx)
    return dlx, dlq


def test_rejected_message_is_dead_lettered_with_x_death(server):
    q = name("work")
    with server.connect() as c:
        ch = c.channel()
        dlx, dlq = declare_dlq(ch)
        ch.queue_declare(q, arguments={"x-dead-letter-exchange": dlx})
        ch.confirm_delivery()
        ch.basic_publish("", q, b"bad", pika.BasicProperties(headers={"mine": "kept"}))
        method, _, _ = get_one(ch, q)
        ch.basic_reject(method.delivery_tag, requeue=False)
        m, props, body = get_one(ch, dlq)
        assert body == b"bad"
        assert m.routing_key == q and m.exchange == dlx
        death = props.headers["x-death"][0]
        assert death["reason"] == "rejected"
        assert death["queue"] == q
        assert death["count"] == 1
        assert death["exchange"] == ""
        assert death["routing-keys"] == [q]
        assert props.headers["x-first-death-reason"] == "rejected"
        assert props.headers["x-first-death-queue"] == q
        assert props.headers["mine"] == "kept"
        ch.basic_ack(m.delivery_tag)
        for x in (q, dlq):
            ch.queue_delete(x)
        ch.exchange_delete(dlx)


def test_queue_ttl_dead_letters_expired_messages_without_a_consumer(server):
    q, dlq = name("ttl"), name("expired")
    with server.connect() as c:
        ch = c.channel()
        ch.queue_declare(dlq)
        ch.queue_declare(
            q,
            arguments={"x-message-ttl": 200, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": dlq},
        )
        ch.confirm_delivery()
        for i in range(3):
            ch.basic_publish("", q, f"late {i}".encode())
        got = [get_one(ch, dlq) for _ in range(3)]
        assert [b for _, _, b in got] == [b"late 0", b"late 1", b"late 2"]
        assert all(p.headers["x-death"][0]["reason"] == "expired" for _, p, _ in got)
        assert all(m.routing_key == dlq for m, _, _ in got)
        assert ch.basic_get(q)[0] is None
        for x in (q, dlq):
            ch.queue_delete(x)


def test_per_message_expiration_is_dropped_on_dead_lettering(server):
    q = name("msg-ttl")
    with server.connect() as c:
        ch = c.channel()
        dlx, dlq = declare_dlq(ch)
        ch.queue_declare(q, arguments={"x-dead-letter-exchange": dlx})
        ch.confirm_delivery()
        ch.basic_publish("", q, b"short-lived", pika.BasicProperties(expiration="100"))
        ch.basic_publish("", q, b"long-lived", pika.BasicProperties(expiration="600000"))
        _, props, body = get_one(ch, dlq)
        assert body == b"short-lived"
        assert props.expiration is None
        assert props.headers["x-death"][0]["original-expiration"] == "100"
        assert get_one(ch, q)[2] == b"long-lived"
        for x in (q, dlq):
            ch.queue_delete(x)
        ch.exchange_delete(dlx)


def test_max_length_drops_and_dead_letters_the_head(server):
    q = name("bounded")
    with server.connect() as c:
        ch = c.channel()
        dlx, dlq = declare_dlq(ch)
        ch.queue_declare(q, arguments={"x-max-length": 3, "x-dead-letter-exchange": dlx})
        ch.confirm_delivery()
        for i in range(5):
            ch.basic_publish("", q, str(i).encode())
        assert [get_one(ch, dlq)[2] for _ in range(2)] == [b"0", b"1"]
        deadline = time.monotonic() + WAIT_S
        while ch.queue_declare(q, passive=True).method.message_count != 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert [get_one(ch, q)[2] for _ in range(3)] == [b"2", b"3", b"4"]
        for x in (q, dlq):
            ch.queue_delete(x)
        ch.exchange_delete(dlx)


def test_max_length_bytes_counts_bodies(server):
    q = name("bytes")
    with server.connect() as c:
        ch = c.channel()
        ch.queue_declare(q, arguments={"x-max-length-bytes": 10})
        ch.confirm_delivery()
        for body in (b"aaaa", b"bbbb", b"cccc"):
            ch.basic_publish("", q, body)
        deadline = time.monotonic() + WAIT_S
        while ch.queue_declare(q, passive=True).method.message_count != 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert [get_one(ch, q)[2] for _ in range(2)] == [b"bbbb", b"cccc"]
        ch.queue_delete(q)


def test_reject_publish_nacks_what_a_full_queue_refuses(server):
    q = name("full")
    with server.connect() as c:
        ch = c.channel()
        ch.queue_declare(q, arguments={"x-max-length": 2, "x-overflow": "reject-publish"})
        ch.confirm_delivery()
        ch.basic_publish("", q, b"1")
        ch.basic_publish("", q, b"2")
        with pytest.raises(pika.exceptions.NackError):
            ch.basic_publish("", q, b"3")
        assert ch.queue_declare(q, passive=True).method.message_count == 2
        assert [get_one(ch, q)[2] for _ in range(2)] == [b"1", b"2"]
        ch.queue_delete(q)


def test_single_active_consumer_gets_everything_until_it_leaves(server):
    q = name("sac")
    with server.connect() as c:
        ch = c.channel()
        ch.queue_declare(q, arguments={"x-single-active-consumer": True})
        ch.confirm_delivery()
        got = {"first": [], "second": []}
        first = ch.basic_consume(q, lambda c_, m, p, b: got["first"].append(b), auto_ack=True)
        ch2 = c.channel()
        ch2.basic_consume(q, lambda c_, m, p, b: got["second"].append(b), auto_ack=True)
        for i in range(6):
            ch.basic_publish("", q, str(i).encode())
        deadline = time.monotonic() + WAIT_S
        while len(got["first"]) < 6 and time.monotonic() < deadline:
            c.process_data_events(time_limit=0.1)
        assert got == {"first": [str(i).encode() for i in range(6)], "second": []}
        ch.basic_cancel(first)
        ch.basic_publish("", q, b"after")
        while not got["second"] and time.monotonic() < deadline:
            c.process_data_events(time_limit=0.1)
        assert got["second"] == [b"after"]
        ch.queue_delete(q)


def test_unused_queue_expires(server):
    q = name("expires")
    with server.connect() as c:
        ch = c.channel()
        ch.queue_declare(q, arguments={"x-expires": 300})
        # A declaration (passive too) counts as use: look only once it had time to go.
        delay = 1.0
        while True:
            time.sleep(delay)
            try:
                ch.queue_declare(q, passive=True)
            except pika.exceptions.ChannelClosedByBroker as e:
                assert e.reply_code == 404
                break
            delay *= 2
            assert delay < WAIT_S, "x-expires queue still there"


def test_priority_queue_delivers_highest_priority_first(server):
    q = name("priority")
    # (body, priority); priorities above the queue's maximum count as the maximum.
    sent = [(b"m0", 1), (b"m1", 5), (b"m2", None), (b"m3", 9), (b"m4", 3), (b"m5", 5)]
    with server.connect() as c:
        ch = c.channel()
        ch.queue_declare(q, arguments={"x-max-priority": 5})
        ch.confirm_delivery()
        for body, p in sent:
            ch.basic_publish("", q, body, pika.BasicProperties(priority=p))
        got = [get_one(ch, q)[2] for _ in sent]
        assert got == [b"m1", b"m3", b"m5", b"m4", b"m0", b"m2"]

        # A consumer with room gets them in the same order; one returned goes
        # back ahead of its priority level.
        for body, p in sent:
            ch.basic_publish("", q, body, pika.BasicProperties(priority=p))
        method, _, body = get_one(ch, q)
        assert body == b"m1"
        ch.basic_nack(method.delivery_tag, requeue=True)
        assert drain(ch, q, 6) == [b"m1", b"m3", b"m5", b"m4", b"m0", b"m2"]

        # Returned messages keep their priority: a returned high one goes before
        # a ready middle one, and a returned low one after it.
        for body, p in [(b"low", 0), (b"high", 5)]:
            ch.basic_publish("", q, body, pika.BasicProperties(priority=p))
        tags = {}
        for _ in range(2):
            method, _, body = get_one(ch, q)
            tags[body] = method.delivery_tag
        assert set(tags) == {b"high", b"low"}
        ch.basic_publish("", q, b"mid", pika.BasicProperties(priority=3))
        ch.basic_nack(tags[b"low"], requeue=True)
        ch.basic_nack(tags[b"high"], requeue=True)
        assert drain(ch, q, 3) == [b"high", b"mid", b"low"]
        ch.queue_delete(q)


def test_quorum_delivery_limit_dead_letters_a_poison_message(server):
    q, dlq = name("poison"), name("poison-dlq")
    with server.connect() as c:
        ch = c.channel()
        ch.queue_declare(dlq, durable=True)
        ch.queue_declare(
            q,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": 2,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": dlq,
            },
        )
        ch.confirm_delivery()
        ch.basic_publish("", q, b"poison", pika.BasicProperties(headers={"a": 1}))
        # Delivered three times (x-delivery-count 0, 1, 2), returned each time.
        for count in range(3):
            method, props, body = get_one(ch, q)
            assert body == b"poison" and method.redelivered == (count > 0)
            assert props.headers["x-delivery-count"] == count
            ch.basic_nack(method.delivery_tag, requeue=True)
        # The third return passes the limit: dead-lettered, gone from the queue.
        method, props, body = get_one(ch, dlq)
        assert body == b"poison"
        death = props.headers["x-death"][0]
        assert death["reason"] == "delivery_limit" and death["queue"] == q
        ch.basic_ack(method.delivery_tag)
        assert ch.queue_declare(q, passive=True).method.message_count == 0
        ch.queue_delete(q)
        ch.queue_delete(dlq)


def test_delivery_limit_on_a_classic_queue_is_406(server):
    code, text = closed_by_broker(
        server, lambda ch: ch.queue_declare(name("classic-limit"), arguments={"x-delivery-limit": 2})
    )
    assert code == 406 and "x-delivery-limit" in text, text


def test_invalid_queue_arguments_are_406(server):
    for args in (
        {"x-message-ttl": -1},
        {"x-overflow": "sideways"},
        {"x-dead-letter-routing-key": "k"},
        {"x-max-priority": 256},
        {"x-max-priority": -1},
    ):
        code, _ = closed_by_broker(server, lambda ch: ch.queue_declare(name("invalid"), arguments=args))
        assert code == 406, args


# -- transactions ----------------------------------------------------------------


def test_transaction_publishes_and_acks_take_effect_at_commit(server):
    q = name("tx")
    with server.connect() as c:
        ch = c.channel()
        ch.queue_declare(q)
        ch.tx_select()
        ch.basic_publish("", q, b"kept")
        ch.basic_publish("", q, b"kept too")
        with server.connect() as other:
            assert other.channel().queue_declare(q, passive=True).method.message_count == 0
        ch.tx_commit()
        ch.basic_publish("", q, b"rolled back")
        ch.tx_rollback()
        assert ch.queue_declare(q, passive=True).method.message_count == 2
        method, _, body = ch.basic_get(q)
        assert body == b"kept"
        ch.basic_ack(method.delivery_tag)
        ch.tx_rollback()  # the ack is discarded: the message stays unacked
        ch.close()
        ch = c.channel()
        method, _, body = get_one(ch, q)
        assert (body, method.redelivered) == (b"kept", True)
        ch.tx_select()
        ch.basic_ack(method.delivery_tag)
        ch.tx_commit()
        assert get_one(ch, q)[2] == b"kept too"
        ch.close()
        ch = c.channel()
        assert get_one(ch, q)[2] == b"kept too"
        ch.queue_delete(q)


def test_transaction_modes_do_not_mix(server):
    code, text = closed_by_broker(server, lambda ch: ch.tx_commit())
    assert code == 406 and "not transactional" in text, text

    def confirm_then_tx(ch):
        ch.confirm_delivery()
        ch.tx_select()

    code, _ = closed_by_broker(server, confirm_then_tx)
    assert code == 406

"""Flow control under a resource alarm, with pika, against Sluice and RabbitMQ.

Each server is started with a free-disk limit far above the disk's size, so its
disk alarm is raised from the start. As RabbitMQ does, a connection that
publishes is then sent `connection.blocked` and its publishes are not taken in,
while a connection that only declares and reads keeps working. (Clearing the
alarm, `connection.unblocked` and the held publish going through are tested in
crates/amqp/tests/it/flow.rs, where the alarm can be lowered.)
"""

import os
import time
import uuid

import pika
import pika.exceptions
import pytest

from amqp_servers import Server
from rabbitmq import RabbitMQ

# A petabyte: more than any disk here has free.
HUGE = 10**15


@pytest.fixture(scope="module", params=["sluice", "rabbitmq"])
def alarmed(request, broker_factory, tmp_path_factory):
    if request.param == "sluice":
        b = broker_factory("alarmed", extra_args=["--amqp-disk-free-limit-bytes", str(HUGE)])
        yield Server("sluice", b.amqp_port, b.bootstrap)
        return
    r = RabbitMQ(tmp_path_factory.mktemp("rabbitmq-alarmed"), extra_conf=f"disk_free_limit.absolute = {HUGE}\n")
    r.start()
    yield Server("rabbitmq", r.port)
    r.stop()


def test_a_publisher_is_blocked_while_the_disk_alarm_is_raised(alarmed):
    # The disk monitor may take a moment after start to raise the alarm: until
    # then a publish goes through, and the next attempt uses a fresh queue.
    deadline = time.monotonic() + 30
    while True:
        q = f"flow-{uuid.uuid4().hex[:10]}"
        with alarmed.connect() as c:
            c.channel().queue_declare(q)
        # pika's blocked-connection timer starts only when the broker sends
        # connection.blocked, so ConnectionBlockedTimeout is the proof of it.
        publisher = alarmed.connect(blocked_connection_timeout=3)
        ch = publisher.channel()
        ch.confirm_delivery()
        try:
            # Its confirm never comes: the broker does not read the message.
            ch.basic_publish("", q, b"held")
        except pika.exceptions.ConnectionBlockedTimeout:
            break
        publisher.close()
        assert time.monotonic() < deadline, "no disk alarm within 30 s"
        time.sleep(0.5)

    # A connection that only declares and reads is not blocked.
    with alarmed.connect() as c:
        ch = c.channel()
        ok = ch.queue_declare(q, passive=True)
        assert ok.method.message_count == 0
        method, _, _ = ch.basic_get(q, auto_ack=True)
        assert method is None
        ch.queue_delete(q)

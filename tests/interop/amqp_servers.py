"""The two AMQP servers every AMQP interop test runs against: a `sluice serve`
of the module and the session's private RabbitMQ node (`rabbitmq.py`). A test
module imports the fixtures: `from amqp_servers import rabbitmq_server, server`."""

import pika
import pytest

from rabbitmq import RabbitMQ


class Server:
    def __init__(self, kind, port, bootstrap=None, ports=None):
        self.kind = kind
        self._ports = list(ports or [port])
        self._next = 0
        self.bootstrap = bootstrap

    @property
    def port(self):
        """An AMQP port to connect to. On a cluster each connection goes to the
        next node, so the publishers and consumers of one queue sit on different
        nodes and reach its leader through the node they are connected to."""
        p = self._ports[self._next % len(self._ports)]
        self._next += 1
        return p

    def params(self, **kw):
        kw.setdefault("heartbeat", 30)
        kw.setdefault("blocked_connection_timeout", 30)
        return pika.ConnectionParameters(
            "127.0.0.1", self.port, "/", pika.PlainCredentials("guest", "guest"), **kw
        )

    def connect(self, **kw):
        return pika.BlockingConnection(self.params(**kw))


@pytest.fixture(scope="session")
def rabbitmq_server(tmp_path_factory):
    r = RabbitMQ(tmp_path_factory.mktemp("rabbitmq"))
    r.start()
    yield r
    r.stop()


@pytest.fixture(scope="module", params=["sluice", "rabbitmq"])
def server(request, broker_factory):
    if request.param == "sluice":
        b = broker_factory("amqp")
        if not getattr(b, "amqp_port", None):
            pytest.skip("the external broker has no AMQP listener known to the harness")
        return Server("sluice", b.amqp_port, b.bootstrap, getattr(b, "amqp_ports", None))
    r = request.getfixturevalue("rabbitmq_server")
    return Server("rabbitmq", r.port)

"""The two AMQP servers every AMQP interop test runs against: a `sluice serve`
of the module and the session's private RabbitMQ node (`rabbitmq.py`). A test
module imports the fixtures: `from amqp_servers import rabbitmq_server, server`."""

import subprocess

import pika
import pytest

from conftest import sluice_bin
from rabbitmq import RabbitMQ


class SluiceAdmin:
    """Users, virtual hosts and permissions through `sluice user|vhost|permission`."""

    def __init__(self, http):
        self.http = http

    def _run(self, *args):
        cp = subprocess.run(
            [sluice_bin(), *args, "--http", self.http], capture_output=True, text=True, timeout=60
        )
        assert cp.returncode == 0, f"sluice {' '.join(args)}: {cp.stderr}"
        return cp.stdout

    def add_vhost(self, name):
        self._run("vhost", "create", name)

    def delete_vhost(self, name):
        self._run("vhost", "delete", name)

    def add_user(self, name, password):
        self._run("user", "create", name, "--password", password)

    def change_password(self, name, password):
        self._run("user", "passwd", name, "--password", password)

    def delete_user(self, name):
        self._run("user", "delete", name)

    def set_permissions(self, user, vhost):
        self._run("permission", "set", user, "--vhost", vhost)

    def clear_permissions(self, user, vhost):
        self._run("permission", "clear", user, "--vhost", vhost)


class RabbitAdmin:
    """The same through `rabbitmqctl`."""

    def __init__(self, rabbitmq):
        self.r = rabbitmq

    def add_vhost(self, name):
        self.r.ctl("add_vhost", name)

    def delete_vhost(self, name):
        self.r.ctl("delete_vhost", name)

    def add_user(self, name, password):
        self.r.ctl("add_user", name, password)

    def change_password(self, name, password):
        self.r.ctl("change_password", name, password)

    def delete_user(self, name):
        self.r.ctl("delete_user", name)

    def set_permissions(self, user, vhost):
        self.r.ctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")

    def clear_permissions(self, user, vhost):
        self.r.ctl("clear_permissions", "-p", vhost, user)


class Server:
    def __init__(self, kind, port, bootstrap=None, ports=None, admin=None, data_dir=None):
        self.kind = kind
        self.admin = admin
        self.data_dir = data_dir
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

    def connect_as(self, user, password, vhost="/", **kw):
        kw.setdefault("heartbeat", 30)
        params = pika.ConnectionParameters(
            "127.0.0.1", self.port, vhost, pika.PlainCredentials(user, password), **kw
        )
        return pika.BlockingConnection(params)


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
        admin = SluiceAdmin(b.http) if getattr(b, "http", None) else None
        return Server(
            "sluice", b.amqp_port, b.bootstrap, getattr(b, "amqp_ports", None), admin, getattr(b, "data_dir", None)
        )
    r = request.getfixturevalue("rabbitmq_server")
    return Server("rabbitmq", r.port, admin=RabbitAdmin(r))

"""Users, virtual hosts and permissions, against Sluice and RabbitMQ alike: each
is managed with its own tool (`sluice user|vhost|permission`, `rabbitmqctl`) and
then seen by pika the same way. On the three-node cluster the changes go
through node 1's admin port while connections rotate over all nodes: the
users live in the metadata quorum, not on one node."""

import json
import os
import subprocess
import time
import uuid

import pika
import pytest

from amqp_servers import rabbitmq_server, server  # noqa: F401  (fixtures)
from conftest import sluice_bin


def refusal(connect):
    """The reply code a refused connection attempt was closed with."""
    with pytest.raises(pika.exceptions.AMQPConnectionError) as e:
        connect().close()
    err = e.value
    # pika wraps the broker's connection.close in the last attempt's error.
    if isinstance(err, pika.exceptions.AMQPConnectionError) and err.args and isinstance(
        err.args[0], pika.exceptions.ConnectionClosedByBroker
    ):
        err = err.args[0]
    if isinstance(err, pika.exceptions.ConnectionClosedByBroker):
        return err.reply_code, err.reply_text
    if isinstance(err, pika.exceptions.ProbableAuthenticationError):
        return 403, str(err)
    if isinstance(err, pika.exceptions.ProbableAccessDeniedError):
        return 530, str(err)
    raise AssertionError(f"unexpected refusal {err!r}")


@pytest.fixture
def tenant(server):
    """A fresh virtual host and a user who may use it; both removed afterwards."""
    if server.admin is None:
        pytest.skip("no admin tool for this broker")
    tag = uuid.uuid4().hex[:8]
    vhost, user, password = f"tenant-{tag}", f"user-{tag}", f"pw-{tag}"
    server.admin.add_vhost(vhost)
    server.admin.add_user(user, password)
    server.admin.set_permissions(user, vhost)
    yield vhost, user, password
    for cleanup in (lambda: server.admin.delete_user(user), lambda: server.admin.delete_vhost(vhost)):
        try:
            cleanup()
        except (AssertionError, RuntimeError):
            pass  # the test deleted it already


def test_a_vhost_is_a_namespace_of_its_own(server, tenant):
    vhost, user, password = tenant
    q = f"shared-name-{uuid.uuid4().hex[:6]}"
    conn = server.connect_as(user, password, vhost)
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_declare(q, durable=True)
    ch.basic_publish("", q, b"in the tenant's vhost")
    conn.close()

    # The same name in "/" is another queue: not there until declared there.
    conn = server.connect()
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch.queue_declare(q, passive=True)
    assert e.value.reply_code == 404
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_declare(q, durable=True)
    for _ in range(2):
        ch.basic_publish("", q, b"in /")
    assert ch.queue_declare(q, passive=True).method.message_count == 2
    ch.queue_delete(q)
    conn.close()

    conn = server.connect_as(user, password, vhost)
    ch = conn.channel()
    assert ch.queue_declare(q, passive=True).method.message_count == 1
    _, _, body = ch.basic_get(q, auto_ack=True)
    assert body == b"in the tenant's vhost"
    conn.close()


def test_a_wrong_password_or_unknown_user_is_403(server, tenant):
    vhost, user, password = tenant
    code, text = refusal(lambda: server.connect_as(user, password + "x", vhost))
    assert code == 403 and "ACCESS_REFUSED" in text
    code, _ = refusal(lambda: server.connect_as("nobody-" + uuid.uuid4().hex[:6], "pw", vhost))
    assert code == 403
    # The right password still works afterwards.
    server.connect_as(user, password, vhost).close()


def test_a_blank_password_never_logs_in(server, tenant):
    """RabbitMQ's internal backend refuses a blank password, even one that is
    the user's own."""
    vhost, user, password = tenant
    server.admin.change_password(user, "")
    code, text = refusal(lambda: server.connect_as(user, "", vhost))
    assert code == 403 and "ACCESS_REFUSED" in text
    server.admin.change_password(user, password)
    server.connect_as(user, password, vhost).close()


def test_a_vhost_without_permission_or_that_does_not_exist_is_530(server, tenant):
    vhost, user, password = tenant
    code, text = refusal(lambda: server.connect_as(user, password, "/"))
    assert code == 530 and "access to vhost '/' refused for user" in text
    code, text = refusal(lambda: server.connect_as(user, password, "no-such-vhost"))
    assert code == 530 and "NOT_ALLOWED" in text
    server.admin.clear_permissions(user, vhost)
    code, _ = refusal(lambda: server.connect_as(user, password, vhost))
    assert code == 530
    server.admin.set_permissions(user, vhost)
    server.connect_as(user, password, vhost).close()


def test_a_password_change_and_a_deleted_user_take_effect(server, tenant):
    vhost, user, password = tenant
    server.admin.change_password(user, "new-" + password)
    code, _ = refusal(lambda: server.connect_as(user, password, vhost))
    assert code == 403
    server.connect_as(user, "new-" + password, vhost).close()
    server.admin.delete_user(user)
    code, _ = refusal(lambda: server.connect_as(user, "new-" + password, vhost))
    assert code == 403


def test_deleting_a_vhost_deletes_what_it_held(server, tenant):
    vhost, user, password = tenant
    conn = server.connect_as(user, password, vhost)
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_declare("kept-until-the-vhost-goes", durable=True)
    ch.basic_publish("", "kept-until-the-vhost-goes", b"x")
    conn.close()
    server.admin.delete_vhost(vhost)
    code, _ = refusal(lambda: server.connect_as(user, password, vhost))
    assert code == 530
    # Recreated, it is empty, and the user's permission did not come back with it.
    server.admin.add_vhost(vhost)
    code, _ = refusal(lambda: server.connect_as(user, password, vhost))
    assert code == 530
    server.admin.set_permissions(user, vhost)
    conn = server.connect_as(user, password, vhost)
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch.queue_declare("kept-until-the-vhost-goes", passive=True)
    assert e.value.reply_code == 404
    conn.close()


def test_sluice_stores_no_password(server, tenant):
    if server.kind != "sluice":
        pytest.skip("Sluice's admin API")
    vhost, user, password = tenant
    cp = subprocess.run(
        [sluice_bin(), "user", "list", "--json", "--http", server.admin.http],
        capture_output=True, text=True, timeout=60, check=True,
    )
    users = {u["name"]: u for u in json.loads(cp.stdout)}
    assert users[user]["vhosts"] == [vhost]
    assert set(users[user]) == {"name", "tags", "vhosts"}, "the list carries no credential"
    # Nor does the quorum's log or snapshot hold the password in the clear
    # (checked on one node; a cluster's nodes each keep their own directory).
    if server.data_dir is None:
        return
    for path, _, files in os.walk(server.data_dir):
        for f in files:
            with open(os.path.join(path, f), "rb") as fh:
                assert password.encode() not in fh.read(), f"password in clear in {f}"



def test_a_withdrawn_permission_refuses_the_next_use_with_403(server, tenant):
    vhost, user, password = tenant
    conn = server.connect_as(user, password, vhost)
    ch = conn.channel()
    ch.queue_declare("perm-q")
    server.admin.clear_permissions(user, vhost)
    # The change reaches the node the connection is on within moments. (A
    # fresh channel each time: RabbitMQ caches a channel's permission checks.)
    deadline = time.monotonic() + 5
    while True:
        conn.process_data_events(time_limit=0.1)
        try:
            conn.channel().queue_declare("perm-q")
        except pika.exceptions.ChannelClosedByBroker as e:
            refused = e
            break
        assert time.monotonic() < deadline, "the withdrawn permission was never enforced"
    assert refused.reply_code == 403
    assert refused.reply_text == (
        f"ACCESS_REFUSED - access to queue 'perm-q' in vhost '{vhost}' refused for user '{user}'"
    )
    # The connection stays open; granted again, its next channel works.
    server.admin.set_permissions(user, vhost)
    deadline = time.monotonic() + 5
    while True:
        ch = conn.channel()
        try:
            ch.queue_delete("perm-q")
            break
        except pika.exceptions.ChannelClosedByBroker:
            assert time.monotonic() < deadline, "the permission given back was never seen"
            time.sleep(0.1)
    conn.close()


def closed_by_broker(conn, seconds=5.0):
    """The reply code and text the broker closed an idle connection with, or None."""
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.1)
    except pika.exceptions.ConnectionClosedByBroker as e:
        return e.reply_code, e.reply_text
    return None


def test_open_connections_go_with_their_vhost_or_user_but_not_a_password_change(server, tenant):
    vhost, user, password = tenant
    kept = server.connect_as(user, password, vhost)
    server.admin.change_password(user, "new-" + password)
    assert closed_by_broker(kept, seconds=1.0) is None
    kept.channel().queue_declare("", exclusive=True)  # still usable
    kept.close()

    by_user = server.connect_as(user, "new-" + password, vhost)
    server.admin.delete_user(user)
    assert closed_by_broker(by_user) == (320, f"CONNECTION_FORCED - user '{user}' is deleted")

    server.admin.set_permissions("guest", vhost)
    in_vhost = server.connect_as("guest", "guest", vhost)
    server.admin.delete_vhost(vhost)
    code, text = closed_by_broker(in_vhost)
    # RabbitMQ says "is deleted", or "is down" when the vhost's processes stop first.
    assert code == 320 and text.startswith(f"CONNECTION_FORCED - vhost '{vhost}' is "), text

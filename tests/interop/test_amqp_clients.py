"""More AMQP client implementations, unmodified, against Sluice and RabbitMQ:
the RabbitMQ Java client (Debian's librabbitmq-client-java on the machine's JDK)
and the C client's command-line tools (rabbitmq-c's amqp-tools)."""

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from amqp_servers import rabbitmq_server, server  # noqa: F401 - pytest fixtures

HERE = Path(__file__).resolve().parent
JARS = ["/usr/share/java/amqp-client.jar", "/usr/share/java/slf4j-api.jar", "/usr/share/java/slf4j-nop.jar"]


def test_rabbitmq_java_client(server):
    missing = [j for j in JARS if not Path(j).exists()] + ([] if shutil.which("java") else ["java"])
    assert not missing, f"scripts/test.sh setup installs these: {missing}"
    queue = f"java-{uuid.uuid4().hex[:8]}"
    cp = subprocess.run(
        ["java", "-cp", ":".join(JARS), str(HERE / "java" / "AmqpSmoke.java"), str(server.port), queue],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert cp.returncode == 0, f"stdout: {cp.stdout}\nstderr: {cp.stderr}"
    assert cp.stdout.strip() == "OK 200"


def run(*args, input=None):
    cp = subprocess.run(list(args), capture_output=True, input=input, timeout=60)
    assert cp.returncode == 0, f"{args}: {cp.stderr.decode(errors='replace')}"
    return cp.stdout


def test_c_client_tools(server):
    assert shutil.which("amqp-publish"), "scripts/test.sh setup installs amqp-tools"
    url = f"amqp://guest:guest@127.0.0.1:{server.port}/%2f"
    queue = f"c-{uuid.uuid4().hex[:8]}"
    assert run("amqp-declare-queue", "--url", url, "-d", "-q", queue).decode().strip() == queue
    for i in range(3):
        run("amqp-publish", "--url", url, "-r", queue, "-p", "-C", "text/plain", "-H", f"n: {i}", "-b", f"c{i}")
    got = [run("amqp-get", "--url", url, "-q", queue) for _ in range(3)]
    assert got == [b"c0", b"c1", b"c2"]
    cp = subprocess.run(["amqp-get", "--url", url, "-q", queue], capture_output=True, timeout=60)
    assert cp.returncode != 0, "the queue should be empty"
    run("amqp-delete-queue", "--url", url, "-q", queue)

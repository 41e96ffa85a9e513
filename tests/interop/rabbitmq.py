"""A private RabbitMQ node (Debian's rabbitmq-server, installed by scripts/test.sh
setup) on free loopback ports, so the AMQP interop tests run the same test against
the reference broker and against Sluice: the tests encode RabbitMQ's behaviour.

The node runs from a temporary directory with its own epmd port and is stopped
(with its epmd) when the test session ends.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
START_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class RabbitMQ:
    """One private rabbitmq-server process."""

    def __init__(self, workdir: Path, extra_conf: str = ""):
        self.dir = Path(workdir)
        self.extra_conf = extra_conf
        self.port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.proc = None

    def start(self):
        if not Path(SERVER).exists():
            raise RuntimeError(f"{SERVER} not found: scripts/test.sh setup installs rabbitmq-server")
        for sub in ("mnesia", "log", "home"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "env.conf").write_text("")
        (self.dir / "enabled_plugins").write_text("[].\n")
        # Remote guest logins are allowed as in RabbitMQ's Docker image; the
        # loopback-only default is checked against Sluice alone.
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\nloopback_users = none\n{self.extra_conf}"
        )
        log = open(self.dir / "server.log", "ab")
        self.proc = subprocess.Popen(
            [SERVER], env=self._env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited with {self.proc.returncode}; see {self.dir}/server.log")
            if _listening(self.port):
                return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"rabbitmq-server did not listen within {START_TIMEOUT_S} s; see {self.dir}/server.log")

    def ctl(self, *args):
        """Runs `rabbitmqctl` against this node; its standard output."""
        cp = subprocess.run([CTL, *args], env=self._env(), capture_output=True, text=True, timeout=60)
        if cp.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {cp.stderr.strip()}")
        return cp.stdout

    def _env(self):
        env = dict(os.environ)
        env.update(
            HOME=str(self.dir / "home"),
            RABBITMQ_CONF_ENV_FILE=str(self.dir / "env.conf"),
            RABBITMQ_CONFIG_FILE=str(self.dir / "rabbitmq.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(self.dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.dir / "log"),
            RABBITMQ_NODENAME=f"sluicetest{os.getpid()}@localhost",
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_EPMD_PORT=str(self.epmd_port),
        )
        return env

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            # The node runs in its own session: end the whole group (beam, its
            # helpers), then the private epmd it started on our port.
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._stop_epmd()
        shutil.rmtree(self.dir / "mnesia", ignore_errors=True)

    def _stop_epmd(self):
        try:
            out = subprocess.run(
                ["ss", "-ltnpH", f"sport = :{self.epmd_port}"], capture_output=True, text=True, timeout=10
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return
        for pid in {int(p) for p in re.findall(r"pid=(\d+)", out)}:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

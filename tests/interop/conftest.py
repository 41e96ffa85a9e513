"""Harness for Sluice's interop tests: starts the real `sluice serve` binary and
lets tests kill -9 / restart / stop it. With SLUICE_INTEROP_CLUSTER=1 every
"broker" is a three-node cluster (replication factor 3) that is killed and
restarted as a whole.

The broker binary comes from $SLUICE_BIN (default
/var/tmp/sluice-target/release/sluice). Every test module gets a broker of its
own on a fresh data directory (the `broker` fixture); a module that needs a
special configuration uses `broker_factory`.

Every wait in these tests is bounded. On top of that a watchdog dumps all
thread stacks and exits the run if one test exceeds SLUICE_TEST_TIMEOUT
seconds (default 300), so a hung client can never stall CI; brokers are
started with PR_SET_PDEATHSIG so they die with the test run even then.
"""

import ctypes
import faulthandler
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

DEFAULT_BIN = "/var/tmp/sluice-target/release/sluice"
READY_RE = re.compile(r"^sluice listening kafka=(\S+) http=(\S+) amqp=(\S+) data=(.+)$")
START_TIMEOUT_S = 30.0
TEST_TIMEOUT_S = float(os.environ.get("SLUICE_TEST_TIMEOUT", "300"))


def sluice_bin() -> str:
    return os.environ.get("SLUICE_BIN", DEFAULT_BIN)


def _set_pdeathsig():
    # Runs in the child between fork and exec: the broker gets SIGKILL when
    # the thread that started it dies, so a crashed or timed-out test run
    # never leaves a broker behind. Only used when spawning from the main
    # thread (pdeathsig is tied to the spawning *thread*).
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class BrokerError(RuntimeError):
    pass


class Broker:
    """One `sluice serve` process on a data directory it keeps across restarts."""

    def __init__(self, data_dir: Path, log_path: Path, env=None, config_text=None, extra_args=(),
                 launcher=()):
        self.data_dir = Path(data_dir)
        # A command the broker runs under, e.g. prlimit with a lower limit.
        self.launcher = list(launcher)
        self.log_path = Path(log_path)
        self.extra_env = dict(env or {})
        self.extra_args = list(extra_args)
        self.config_path = None
        if config_text is not None:
            self.config_path = self.log_path.with_suffix(".toml")
            self.config_path.write_text(config_text)
        self.proc = None
        self.bootstrap = None
        self.http = None
        self.kafka_port = 0
        self.http_port = 0
        self.amqp_port = 0
        self.amqp = None
        self.starts = 0
        self._log = None
        self._drain = None

    # -- lifecycle ---------------------------------------------------------

    def start(self, timeout=START_TIMEOUT_S):
        if self.proc is not None and self.proc.poll() is None:
            raise BrokerError("broker already running")
        env = dict(os.environ)
        env.setdefault("SLUICE_GROUP_INITIAL_REBALANCE_DELAY_MS", "0")
        env.setdefault("SLUICE_LOG", "info")
        env.update(self.extra_env)
        cmd = [
            *self.launcher,
            sluice_bin(),
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--kafka-addr",
            f"127.0.0.1:{self.kafka_port}",
            "--http-addr",
            f"127.0.0.1:{self.http_port}",
            "--amqp-addr",
            f"127.0.0.1:{self.amqp_port}",
        ]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        cmd += self.extra_args
        if not Path(sluice_bin()).exists():
            raise BrokerError(f"sluice binary not found at {sluice_bin()} (set SLUICE_BIN)")
        # A port we held a moment ago may still be taken briefly (a client
        # socket in the kernel's way); retry the same port for a few seconds.
        deadline = time.monotonic() + timeout
        attempt = 0
        while True:
            attempt += 1
            ok, why = self._spawn(cmd, env, deadline)
            if ok:
                return self
            if time.monotonic() >= deadline or attempt >= 20:
                raise BrokerError(f"broker did not start: {why}\n--- broker log tail ---\n{self.log_tail()}")
            time.sleep(0.25)

    def _spawn(self, cmd, env, deadline):
        self._log = open(self.log_path, "ab", buffering=0)
        self._log.write(f"\n=== start #{self.starts + 1}: {' '.join(cmd)}\n".encode())
        preexec = _set_pdeathsig if threading.current_thread() is threading.main_thread() else None
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            preexec_fn=preexec,
        )
        line_box = []
        got_line = threading.Event()
        proc = self.proc
        log = self._log

        def drain():
            # First stdout line is the readiness line; everything after it is
            # copied to the log so the pipe never fills up.
            for raw in iter(proc.stdout.readline, b""):
                if not got_line.is_set():
                    line_box.append(raw.decode(errors="replace").rstrip("\n"))
                    got_line.set()
                try:
                    log.write(b"[stdout] " + raw)
                except ValueError:
                    break
            got_line.set()

        self._drain = threading.Thread(target=drain, daemon=True)
        self._drain.start()
        got_line.wait(max(0.1, deadline - time.monotonic()))
        if not line_box:
            rc = self.proc.poll()
            if rc is None:
                self._kill_proc()
                return False, "no readiness line on stdout in time"
            self._kill_proc()
            return False, f"exited with code {rc} before printing its readiness line"
        m = READY_RE.match(line_box[0])
        if not m:
            self._kill_proc()
            raise BrokerError(f"unexpected first stdout line: {line_box[0]!r}")
        self.bootstrap = m.group(1)
        self.http = m.group(2)
        self.kafka_port = int(self.bootstrap.rsplit(":", 1)[1])
        self.http_port = int(self.http.rsplit(":", 1)[1])
        self.amqp = m.group(3)
        self.amqp_port = int(self.amqp.rsplit(":", 1)[1])
        self.starts += 1
        return True, ""

    def _kill_proc(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        if self._drain is not None:
            self._drain.join(5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill9(self):
        """SIGKILL the broker and wait until it is gone."""
        if self.proc is None or self.proc.poll() is not None:
            raise BrokerError("kill9: broker is not running")
        os.kill(self.proc.pid, signal.SIGKILL)
        self._kill_proc()

    def stop(self, timeout=15.0):
        """SIGTERM (graceful shutdown); SIGKILL if it does not exit in time. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        rc = self.proc.poll()
        self._kill_proc()
        return rc

    def restart(self, graceful=False):
        """Stop (SIGKILL unless graceful) and start again on the same data dir and ports."""
        if self.proc is not None and self.proc.poll() is None:
            if graceful:
                self.stop()
            else:
                self.kill9()
        return self.start()

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n=60):
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    # -- CLI ---------------------------------------------------------------

    def cli(self, *args, timeout=60, check=True, input=None):
        """Runs `sluice <args> --bootstrap <this broker>` and returns the CompletedProcess."""
        cmd = [sluice_bin(), *args, "--bootstrap", self.bootstrap]
        cp = subprocess.run(
            cmd,
            input=input,
            capture_output=True,
            timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and cp.returncode != 0:
            raise AssertionError(
                f"`{' '.join(cmd)}` exited {cp.returncode}\nstdout: {cp.stdout.decode(errors='replace')}\n"
                f"stderr: {cp.stderr.decode(errors='replace')}"
            )
        return cp


def wait_port_connectable(bootstrap, timeout=10.0):
    host, port = bootstrap.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, int(port)), timeout=1):
                return True
        except OSError:
            time.sleep(0.1)
    return False


class ExternalBroker:
    """A broker this run did not start (SLUICE_EXTERNAL_BOOTSTRAP): lets the suite
    check itself against another Kafka implementation. Tests that must kill or
    restart the broker skip."""

    def __init__(self, bootstrap):
        self.bootstrap = bootstrap
        self.data_dir = None

    def _nope(self, *a, **k):
        pytest.skip("needs a broker started by the harness (SLUICE_EXTERNAL_BOOTSTRAP is set)")

    kill9 = stop = restart = start = _nope
    cli = Broker.cli

    def alive(self):
        return True

    def log_tail(self, n=60):
        return "(external broker)"

    def _kill_proc(self):
        pass


_PORTS_HANDED_OUT = set()


def free_port():
    """A free port below the kernel's ephemeral range (32768 and up), so no
    socket bound to port 0 or connecting out (a node's AMQP listener, the peer
    sessions between nodes, clients) takes it between this pick and its use.

    Never the same port twice in one run: a cluster picks all its nodes' ports
    before any node binds one, so a repeat would make two of its nodes race
    for one port (the bind check below cannot see a port not yet bound)."""
    if len(_PORTS_HANDED_OUT) > 8000:
        _PORTS_HANDED_OUT.clear()
    for _ in range(500):
        port = random.randint(20000, 32000)
        if port in _PORTS_HANDED_OUT:
            continue
        _PORTS_HANDED_OUT.add(port)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


class LocalCluster:
    """Three `sluice serve` processes in cluster mode on 127.0.0.1, behaving like
    one broker to the tests (SLUICE_INTEROP_CLUSTER=1): `bootstrap` lists all
    three, `kill9()` SIGKILLs all of them at once (power loss) and `start()`
    starts all of them again on their data directories. Tests that read a
    broker's files skip (`data_dir` is None): each node has its own."""

    SIZE = 3

    def __init__(self, base: Path, name, env=None, config_text=None, extra_args=()):
        ids = list(range(1, self.SIZE + 1))
        kafka = {i: free_port() for i in ids}
        raft = {i: free_port() for i in ids}
        peers = ",".join(f"{i}@127.0.0.1:{raft[i]}" for i in ids)
        # Its own cluster id, so nodes of a cluster an earlier test left behind
        # cannot talk to this one through a reused port.
        cluster_id = re.sub(r"[^A-Za-z0-9_-]", "-", str(name))[:40] + f"-{random.getrandbits(48):012x}"
        self.nodes = []
        for i in ids:
            data = base / f"{name}-node{i}-data"
            data.mkdir()
            args = [
                "--node-id", str(i),
                "--cluster-peers", peers,
                "--cluster-id", cluster_id,
                "--raft-listen", f"127.0.0.1:{raft[i]}",
                "--advertised-kafka", f"127.0.0.1:{kafka[i]}",
                "--replica-addr", f"127.0.0.1:{kafka[i]}",
                *extra_args,
            ]
            b = Broker(data, base / f"{name}-node{i}.log", env=env, config_text=config_text, extra_args=args)
            b.kafka_port = kafka[i]
            b.http_port = free_port()
            self.nodes.append(b)
        self.bootstrap = ",".join(f"127.0.0.1:{kafka[i]}" for i in ids)
        self.data_dir = None
        self.log_path = self.nodes[0].log_path

    @property
    def http(self):
        return self.nodes[0].http

    @property
    def amqp_port(self):
        return self.nodes[0].amqp_port

    @property
    def amqp_ports(self):
        """Every node's AMQP port: a client may connect to any of them."""
        return [b.amqp_port for b in self.nodes]

    def start(self, timeout=START_TIMEOUT_S):
        # All at once: a node may wait for a quorum before it reports ready.
        errors = []

        def run(b):
            try:
                b.start(timeout)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(b,)) for b in self.nodes if not b.alive()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise BrokerError(f"cluster did not start: {errors[0]}")
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout=START_TIMEOUT_S):
        """Every node answers /healthz 200 (it has a controller and is registered)."""
        import urllib.request

        deadline = time.monotonic() + timeout
        pending = list(self.nodes)
        while pending and time.monotonic() < deadline:
            b = pending[0]
            try:
                with urllib.request.urlopen(f"http://{b.http}/healthz", timeout=2) as r:
                    if r.status == 200:
                        pending.pop(0)
                        continue
            except OSError:
                pass
            time.sleep(0.2)
        if pending:
            raise BrokerError(f"nodes not healthy in {timeout}s: {[b.http for b in pending]}\n{self.log_tail()}")

    def kill9(self):
        for b in self.nodes:
            if b.alive():
                os.kill(b.proc.pid, signal.SIGKILL)
        for b in self.nodes:
            b._kill_proc()

    def stop(self, timeout=15.0):
        rcs = [b.stop(timeout) for b in self.nodes]
        return next((rc for rc in rcs if rc), rcs[0])

    def restart(self, graceful=False):
        if graceful:
            self.stop()
        else:
            self.kill9()
        return self.start()

    def alive(self):
        return all(b.alive() for b in self.nodes)

    def log_tail(self, n=60):
        return "\n".join(f"--- node {i + 1} ---\n{b.log_tail(n)}" for i, b in enumerate(self.nodes))

    def _kill_proc(self):
        for b in self.nodes:
            b._kill_proc()

    cli = Broker.cli


@pytest.fixture(scope="module")
def broker_factory(tmp_path_factory, request):
    """Starts brokers for one module; all of them are killed at module teardown."""
    started = []
    external = os.environ.get("SLUICE_EXTERNAL_BOOTSTRAP")
    if external:
        yield lambda *a, **k: ExternalBroker(external)
        return
    base = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])

    def make(name="broker", env=None, config_text=None, extra_args=()):
        if os.environ.get("SLUICE_INTEROP_CLUSTER"):
            c = LocalCluster(base, name, env=env, config_text=config_text, extra_args=extra_args)
            started.append(c)
            c.start()
            print(f"[harness] {name}: three-node cluster on {c.bootstrap} (logs {base})")
            return c
        data = base / f"{name}-data"
        data.mkdir()
        b = Broker(data, base / f"{name}.log", env=env, config_text=config_text, extra_args=extra_args)
        started.append(b)
        b.start()
        print(f"[harness] {name} listening on {b.bootstrap} (data {data}, log {b.log_path})")
        return b

    yield make
    for b in started:
        b._kill_proc()
    if request.session.testsfailed:
        for b in started:
            print(f"\n--- {b.log_path} (tail) ---\n{b.log_tail(120)}")
    else:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def broker(broker_factory):
    """A clean broker for this test module."""
    return broker_factory()


# -- watchdog ----------------------------------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    marker = item.get_closest_marker("timeout_s")
    limit = float(marker.args[0]) if marker else TEST_TIMEOUT_S
    faulthandler.dump_traceback_later(limit, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def pytest_configure(config):
    config.addinivalue_line("markers", "timeout_s(seconds): hard limit for one test (the run exits past it)")

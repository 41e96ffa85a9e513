"""Control of the docker-compose cluster for the fault tests: find the project's
containers and network by their compose labels, inject faults with the docker CLI
(kill, start, pause, network disconnect, restart) and with iptables rules inside
the containers' network namespaces (cuts of single links between two nodes), and
read the nodes' state through their published HTTP ports (/healthz, /api/v1/cluster).

Only containers and networks labelled with this run's compose project are ever
touched. Every wait is bounded.

Link cuts. ``cut_link(a, b)`` drops the packets between two nodes on the
``cluster`` network only, in one direction or both, while every other link and the
clients' traffic (which reaches each node over its own ``clientN`` network) stay
untouched. A cut of the direction a -> b is one rule in b's network namespace,

    nsenter -t <pid of b's container> -n iptables -w 5 -I INPUT \
        -s <a's address on the cluster network>/32 \
        -m comment --comment "sluice-jepsen <project> cut a->b" -j DROP

run with the host's iptables (the containers have none; we are root and the
Docker daemon is local). Dropping at the receiver is silent packet loss, like a
broken link: the sender sees only retransmissions and timeouts (a DROP in OUTPUT
would fail its sends at once with EPERM). Note that TCP needs both directions: with
a -> b dropped, a connection b opens to a never completes (a's SYN-ACK is dropped)
and on an established one b's segments still reach a but a's answers do not reach
b. Rules are idempotent (``-C`` before ``-I``), tracked, and removed by
``heal_links()`` (also called by ``heal_all()``), which finally sweeps every node
of the project for rules carrying this project's comment. The host's own iptables
are never touched, and a container's rules vanish with its network namespace
(``docker kill``/``compose down``).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable, Optional


class ClusterError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[cluster {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def docker(*args: str, timeout: float = 90, check: bool = True) -> str:
    cp = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and cp.returncode != 0:
        raise ClusterError(f"docker {' '.join(args)} failed ({cp.returncode}): {cp.stderr.strip()}")
    return cp.stdout.strip()


@dataclass(frozen=True)
class Node:
    id: int  # Sluice node id = the N of service sluiceN
    service: str
    kafka_port: int
    http_port: int

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.http_port}"


class ComposeCluster:
    """The three nodes of one compose project (docker-compose.yml at the repo root)."""

    def __init__(self, project: str, kafka_ports, http_ports, network: str = "cluster", extra=None):
        self.project = project
        self.nodes = {
            i + 1: Node(i + 1, f"sluice{i + 1}", int(k), int(h)) for i, (k, h) in enumerate(zip(kafka_ports, http_ports))
        }
        # Nodes that are not started with the cluster (compose profile "grow"): id -> Node.
        self.extra = dict(extra or {})
        self.network_key = network
        self._containers: dict = {}
        self._network: Optional[str] = None
        self.cut: set = set()  # nodes this harness disconnected from the peer network
        self.paused: set = set()
        # Directed link cuts this harness made: (src, dst) -> rule details (see cut_link).
        self.links: dict = {}
        self._ever_cut = False  # whether this harness ever cut a link (then heal must be able to sweep)
        self._warned = False

    # -- discovery ---------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        return ",".join(n.bootstrap for n in self.nodes.values())

    def node(self, node_id: int) -> Node:
        return self.nodes.get(node_id) or self.extra[node_id]

    def container(self, node_id: int) -> str:
        c = self._containers.get(node_id)
        if c:
            return c
        svc = self.node(node_id).service
        out = docker(
            "ps", "-a", "-q", "--no-trunc",
            "--filter", f"label=com.docker.compose.project={self.project}",
            "--filter", f"label=com.docker.compose.service={svc}",
        )
        ids = out.split()
        if len(ids) != 1:
            raise ClusterError(f"expected one container for service {svc} of project {self.project}, found {ids}")
        self._containers[node_id] = ids[0]
        return ids[0]

    def network(self) -> str:
        if self._network:
            return self._network
        out = docker(
            "network", "ls", "-q", "--format", "{{.Name}}",
            "--filter", f"label=com.docker.compose.project={self.project}",
            "--filter", f"label=com.docker.compose.network={self.network_key}",
        )
        names = out.split()
        if len(names) != 1:
            raise ClusterError(f"expected one '{self.network_key}' network of project {self.project}, found {names}")
        self._network = names[0]
        return self._network

    def state(self, node_id: int) -> dict:
        out = docker("inspect", "-f", "{{json .State}}", self.container(node_id))
        return json.loads(out)

    def networks_of(self, node_id: int) -> list:
        out = docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", self.container(node_id))
        return sorted((json.loads(out) or {}).keys())

    # -- faults --------------------------------------------------------------------

    def kill(self, *node_ids: int) -> None:
        """SIGKILL (power loss): `docker kill` of all given nodes in one call."""
        docker("kill", "--signal", "KILL", *[self.container(n) for n in node_ids])

    def start(self, *node_ids: int) -> None:
        docker("start", *[self.container(n) for n in node_ids])

    def restart(self, node_id: int, grace_s: int = 30) -> None:
        """Graceful: SIGTERM, SIGKILL after grace_s, then start."""
        docker("restart", "--time", str(grace_s), self.container(node_id), timeout=grace_s + 60)

    def pause(self, node_id: int) -> None:
        # The cgroup freezer gives up ("unable to freeze") when a task stays
        # in uninterruptible sleep, e.g. inside an fsync, for longer than it
        # waits; runc leaves the container running then, so try again.
        for attempt in range(5):
            try:
                docker("pause", self.container(node_id))
                break
            except ClusterError as e:
                if "unable to freeze" not in str(e) or attempt == 4:
                    raise
                time.sleep(0.2)
        self.paused.add(node_id)

    def unpause(self, node_id: int) -> None:
        docker("unpause", self.container(node_id))
        self.paused.discard(node_id)

    def disconnect(self, node_id: int) -> None:
        """Cuts the node off the peer network. Its published ports are on its own client
        network, so clients on the host still reach it (see docker-compose.yml)."""
        docker("network", "disconnect", self.network(), self.container(node_id))
        self.cut.add(node_id)

    def connect(self, node_id: int) -> None:
        # The alias is the name the peers use (sluiceN); a reconnect without it would
        # leave the node reachable only under its container name.
        docker("network", "connect", "--alias", self.node(node_id).service, self.network(), self.container(node_id))
        self.cut.discard(node_id)

    # -- link cuts (iptables in a container's network namespace) ---------------------

    IPTABLES = "/usr/sbin/iptables"

    def cluster_ip(self, node_id: int) -> str:
        """The node's address on the project's cluster network (it may change when
        the node is disconnected and reconnected)."""
        out = docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", self.container(node_id))
        ep = (json.loads(out) or {}).get(self.network()) or {}
        ip = ep.get("IPAddress")
        if not ip:
            raise ClusterError(f"node {node_id} has no address on {self.network()} (disconnected?)")
        return ip

    def _netns_pid(self, node_id: int) -> Optional[int]:
        """The pid whose network namespace is the container's, None when it is not running."""
        st = self.state(node_id)
        pid = int(st.get("Pid") or 0)
        return pid if st.get("Running") and pid > 0 else None

    def _iptables(self, pid: int, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = ["nsenter", "-t", str(pid), "-n", "--", self.IPTABLES, "-w", "5", *args]
        try:
            cp = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as e:
            raise ClusterError(f"{' '.join(cmd)}: {e} (link cuts need root, a local Docker daemon, "
                               f"nsenter and {self.IPTABLES} on the host)") from e
        if check and cp.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed ({cp.returncode}): {cp.stderr.strip()}")
        return cp

    def _tag(self, src: int, dst: int) -> str:
        return f"sluice-jepsen {self.project} cut {src}->{dst}"

    def _rule(self, src_ip: str, tag: str) -> list:
        return ["INPUT", "-s", f"{src_ip}/32", "-m", "comment", "--comment", tag, "-j", "DROP"]

    def cut_link(self, a: int, b: int, both: bool = True) -> None:
        """Drops the packets from a to b on the cluster network (and from b to a when
        `both`). Idempotent. Clients on the host and every other link are untouched."""
        self._cut_direction(a, b)
        if both:
            self._cut_direction(b, a)

    def _cut_direction(self, src: int, dst: int) -> None:
        if src == dst:
            raise ClusterError(f"cannot cut node {src} from itself")
        pid = self._netns_pid(dst)
        if pid is None:
            raise ClusterError(f"cannot cut {src}->{dst}: node {dst} is not running")
        src_ip = self.cluster_ip(src)
        tag = self._tag(src, dst)
        rule = self._rule(src_ip, tag)
        if self._iptables(pid, "-C", *rule, check=False).returncode != 0:
            self._iptables(pid, "-I", *rule)
        self._ever_cut = True
        self.links[(src, dst)] = dict(src_ip=src_ip, tag=tag, container=self.container(dst), pid=pid)

    def uncut_link(self, a: int, b: int, both: bool = True) -> None:
        """Removes the cut of a -> b (and b -> a when `both`). Idempotent."""
        for src, dst in [(a, b), (b, a)] if both else [(a, b)]:
            info = self.links.pop((src, dst), None)
            if info is None:
                continue
            pid = self._netns_pid(dst)
            if pid is None:
                continue  # not running: its network namespace, and the rule, are gone
            rule = self._rule(info["src_ip"], info["tag"])
            while self._iptables(pid, "-C", *rule, check=False).returncode == 0:
                self._iptables(pid, "-D", *rule)

    def link_rules(self) -> dict:
        """{node: [iptables -S lines]} of the rules this project's harness put into the
        running nodes' network namespaces (found by their comment)."""
        marker = f"sluice-jepsen {self.project} "
        out = {}
        for n in list(self.nodes) + list(self.extra):
            try:
                pid = self._netns_pid(n)
            except ClusterError:
                continue  # an extra node that was never created
            if pid is None:
                continue
            lines = self._iptables(pid, "-S", "INPUT").stdout.splitlines()
            mine = [ln for ln in lines if marker in ln]
            if mine:
                out[n] = mine
        return out

    def heal_links(self) -> None:
        """Removes every link cut: the tracked ones, then any rule of this project
        still found in a node (a rule made before the harness lost track, or for an
        address that changed). Raises if one survives."""
        for src, dst in list(self.links):
            self.uncut_link(src, dst, both=False)
        try:
            found = self.link_rules()
        except ClusterError as e:
            if self._ever_cut:
                raise
            # No cut was ever made here (e.g. a scenario without link faults on a host
            # without nsenter/iptables): nothing of ours to remove.
            if not self._warned:
                log(f"warning: cannot list link cut rules ({e})")
                self._warned = True
            return
        for n, lines in found.items():
            pid = self._netns_pid(n)
            for ln in lines:
                args = shlex.split(ln)
                if args[:1] == ["-A"]:
                    self._iptables(pid, "-D", *args[1:], check=False)
        left = self.link_rules()
        if left:
            raise ClusterError(f"link cut rules left after heal: {left}")
        self.links.clear()

    def heal_all(self) -> None:
        """Undo every fault, whatever state a failed scenario left: unpause, start,
        reconnect, remove link cuts. Idempotent."""
        net = self.network()
        for n in self.nodes:
            st = self.state(n)
            if st.get("Paused"):
                self.unpause(n)
            elif not st.get("Running"):
                self.start(n)
            if net not in self.networks_of(n):
                self.connect(n)
        self.paused.clear()
        self.cut.clear()
        self.heal_links()

    # -- growing and shrinking ---------------------------------------------------------

    def compose_up(self, node_id: int) -> None:
        """Starts an extra node's compose service (profile "grow") with the compose
        command run.sh used for the cluster (SLUICE_COMPOSE)."""
        cmd = os.environ.get("SLUICE_COMPOSE")
        if not cmd:
            raise ClusterError("SLUICE_COMPOSE is not set (run the scenarios through tests/cluster/run.sh)")
        svc = self.node(node_id).service
        cp = subprocess.run([*shlex.split(cmd), "--profile", "grow", "up", "-d", "--no-recreate", svc],
                            capture_output=True, text=True, timeout=120)
        if cp.returncode != 0:
            raise ClusterError(f"compose up {svc} failed ({cp.returncode}): {cp.stderr.strip()}")
        self._containers.pop(node_id, None)

    def stop(self, node_id: int, grace_s: int = 30) -> None:
        docker("stop", "--time", str(grace_s), self.container(node_id), timeout=grace_s + 60)

    def admin_post(self, path: str, body: dict, via: Optional[int] = None, timeout: float = 30.0) -> dict:
        """POST to the operations API of `via` (default: the first node that answers), as
        `sluice partition reassign` / `sluice node remove` do. Raises with the node's error."""
        data = json.dumps(body).encode()
        last = None
        for n in ([via] if via else list(self.nodes)):
            req = urllib.request.Request(f"http://{self.node(n).http}{path}", data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=timeout) as r:
                    return json.loads(r.read().decode() or "{}")
            except urllib.error.HTTPError as e:
                raise ClusterError(f"POST {path}: HTTP {e.code}: {e.read().decode(errors='replace')}") from e
            except (OSError, urllib.error.URLError) as e:
                last = e
        raise ClusterError(f"POST {path}: no node answered ({last})")

    def partition(self, topic: str, partition: int = 0) -> Optional[dict]:
        for p in self.partitions(topic) or []:
            if p.get("partition") == partition:
                return p
        return None

    # -- observation -----------------------------------------------------------------

    def health(self, node_id: int, timeout: float = 1.0) -> tuple:
        """GET /healthz through the published port: (status, body), status None when
        the node did not answer (body then says why)."""
        try:
            with urllib.request.urlopen(f"http://{self.node(node_id).http}/healthz", timeout=timeout) as r:
                return r.status, r.read(300).decode(errors="replace").strip()
        except urllib.error.HTTPError as e:
            try:
                body = e.read(300).decode(errors="replace").strip()
            except OSError:
                body = ""
            return e.code, body
        except (OSError, urllib.error.URLError) as e:
            return None, f"{type(e).__name__}: {e}"

    def healthy(self, node_id: int, timeout: float = 2.0) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.node(node_id).http}/healthz", timeout=timeout) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def wait_healthy(self, node_ids=None, timeout: float = 90.0) -> float:
        """Waits until every given node answers /healthz 200; returns the seconds waited."""
        t0 = time.monotonic()
        pending = list(node_ids or self.nodes)
        deadline = t0 + timeout
        while pending:
            pending = [n for n in pending if not self.healthy(n)]
            if not pending:
                break
            if time.monotonic() >= deadline:
                raise ClusterError(f"nodes {pending} not healthy after {timeout:.0f}s")
            time.sleep(0.3)
        return time.monotonic() - t0

    def status(self, node_id: int, timeout: float = 2.0) -> Optional[dict]:
        """GET /api/v1/cluster of one node (what `sluice cluster status --json` shows), or None."""
        try:
            with urllib.request.urlopen(f"http://{self.node(node_id).http}/api/v1/cluster", timeout=timeout) as r:
                return json.loads(r.read().decode())
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def freshest_status(self, exclude=()) -> Optional[dict]:
        """The /api/v1/cluster view with the highest applied metadata index among the
        reachable nodes (a cut-off node's image is stale)."""
        best = None
        for n in self.nodes:
            if n in exclude or n in self.paused:
                continue
            s = self.status(n)
            if s and (best is None or s.get("metadata_applied_index", 0) > best.get("metadata_applied_index", 0)):
                best = s
        return best

    def partitions(self, topic: str, exclude=()) -> Optional[list]:
        s = self.freshest_status(exclude)
        if not s:
            return None
        for t in s.get("topics", []):
            if t.get("name") == topic:
                return t.get("partitions", [])
        return None

    def leader(self, topic: str, partition: int = 0, timeout: float = 30.0, exclude=()) -> int:
        """The partition's leader in the freshest image; waits while it is offline (-1)."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            parts = self.partitions(topic, exclude)
            if parts:
                for p in parts:
                    if p.get("partition") == partition:
                        last = p
                        if p.get("leader", -1) in self.nodes or p.get("leader", -1) in self.extra:
                            return p["leader"]
            if time.monotonic() >= deadline:
                raise ClusterError(f"{topic}-{partition} has no leader after {timeout:.0f}s (last view {last})")
            time.sleep(0.3)

    def replicas(self, topic: str, partition: int = 0) -> list:
        for p in self.partitions(topic) or []:
            if p.get("partition") == partition:
                return list(p.get("replicas", []))
        return []

    def wait_isr_full(self, topic: str, timeout: float = 30.0) -> bool:
        """Waits until every partition of the topic has a leader and ISR == replicas.
        Returns False (and logs) instead of raising: a slow catch-up is unavailability,
        not a safety failure."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            parts = self.partitions(topic)
            last = parts
            if parts and all(p.get("leader", -1) >= 0 and sorted(p.get("isr", [])) == sorted(p.get("replicas", [])) for p in parts):
                return True
            time.sleep(0.5)
        log(f"warning: {topic} ISR not full after {timeout:.0f}s: {last}")
        return False

    def logs(self, node_id: int, tail: int = 200) -> str:
        cp = subprocess.run(
            ["docker", "logs", "--tail", str(tail), self.container(node_id)], capture_output=True, text=True, timeout=30
        )
        return cp.stdout + cp.stderr


def wait_until(pred: Callable[[], object], timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)

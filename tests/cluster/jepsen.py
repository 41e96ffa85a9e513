"""Jepsen-style fault tests of a three-node Sluice cluster run by docker compose.

For each scenario: a fresh topic (replication factor 3, min.insync.replicas 2),
an idempotent acks=all producer and two consumers running, a nemesis injecting
faults for a few rounds, then heal, stop the clients, drain the whole topic and
check the history (checker.py). Exit status 1 when any scenario shows an anomaly
(lost or duplicated acknowledged writes, inconsistent offsets, dirty reads...) or
never recovers; 2 when the harness itself could not run.

Normally started by tests/cluster/run.sh, which brings the compose project up and
down; by hand, against a running project:

    python tests/cluster/jepsen.py --project sluice-cluster-test-123 \
        [--scenarios kill-leader,pause-leader] [--rounds 2] [--soak] [--out DIR]

Nemeses:
  kill-leader         docker kill (SIGKILL) the leader of partition 0, restart it
  pause-leader        docker pause the leader longer than the session timeout, unpause
  partition-leader    cut the leader off the peer network (clients still reach it)
  partition-follower  the same for a follower of partition 0
  partition-controller  the same for the metadata quorum's leader (the controller); while
                      it is cut off its /healthz must turn non-200 within the session
                      timeout + 3 s (else healthy-while-cut-off)
  bridge              cut the link between the controller C and another node E (both
                      directions; each still reaches the third node M, which leads a
                      partition when a non-controller does) for ~20 s, heal; every
                      partition must take writes again within session timeout + replica
                      lag + 3 s of the cut until the heal (else partition-unwritable);
                      E's /healthz is recorded
  asymmetric          drop only the packets from a partition's leader to one follower
                      (a non-controller leader and follower when there is one, so the
                      link carries replication, not Raft) for ~15 s, heal: the follower's
                      fetches go unanswered and it cannot connect, the leader must drop
                      it from the ISR and keep taking writes
  kill-all            SIGKILL all three nodes at once, start them again
  rolling-restart     docker restart (SIGTERM, then start) each node in turn
  amqp                a quorum queue under a confirming publisher and an acking consumer
                      on other nodes: its leader SIGKILLed (and started), paused, then cut
                      off the peer network; nothing confirmed lost, nothing acked outside
                      a fault window delivered again (amqp_faults.py)
  add-node            a fourth node (compose service sluice4) joins, partition 0 moves
                      onto it and it leads; it is SIGKILLed (failover back), restarted,
                      the partition moves back, and the node is stopped and removed
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from confluent_kafka import KafkaError, KafkaException  # noqa: E402
from confluent_kafka.admin import AdminClient, NewTopic  # noqa: E402

import checker  # noqa: E402
from amqp_faults import run_amqp_scenario  # noqa: E402
from cluster import ClusterError, ComposeCluster, Node, log, wait_until  # noqa: E402
from workload import (  # noqa: E402
    ConsumerWorkload,
    GroupConsumerWorkload,
    ProducerWorkload,
    client_logger,
    committed_offsets,
    drain,
)

PARTITIONS = 2
RATE = 250  # records per second offered
# The controller fences a node after 6 s without heartbeats (session timeout) and
# Raft elects within 1-2 s: a fault shorter than that tests nothing but retries.
SESSION_TIMEOUT_S = 6.0
# A leader drops a follower from the ISR that has not caught up for 5 s.
REPLICA_LAG_S = 5.0
SLACK_S = 3.0
# A node cut off from its peers must say so on /healthz within this long.
HEALTH_DEADLINE_S = SESSION_TIMEOUT_S + SLACK_S
# A bridge may leave a partition unwritable this long (fence, then shrink/grow ISRs);
# after that every partition must take writes until the heal.
BRIDGE_GRACE_S = SESSION_TIMEOUT_S + REPLICA_LAG_S + SLACK_S
# The bridge is held at least this long after the grace, so the check has a window.
BRIDGE_CHECKED_S = 6.0
POLL_S = 0.25


@dataclass
class Timing:
    warmup_s: float = 3.0
    down_s: float = 8.0  # a killed leader stays down this long (> session timeout: failover)
    fault_s: float = 10.0  # pause / partition length (> session timeout)
    settle_s: float = 3.0  # after a heal, before the next round
    tail_s: float = 5.0  # after the last heal, before the producer stops
    recovery_s: float = 60.0  # an ack must arrive this long after the last heal
    bridge_s: float = 20.0  # a bridge (controller <-> one node cut) is held this long
    asym_s: float = 15.0  # a one-way link cut is held this long


@dataclass
class Ctx:
    cluster: ComposeCluster
    topic: str
    rounds: int
    timing: Timing
    rng: random.Random
    t0: float
    events: list = field(default_factory=list)
    # Failures a nemesis found itself: kind -> [example], reported like the checker's.
    failures: dict = field(default_factory=dict)
    # Fault windows whose per-partition writability is checked after the run:
    # dict(what, t_fault, t_heal, grace_s, enforce, roles), times as ctx.now().
    writability: list = field(default_factory=list)

    def now(self):
        return time.monotonic() - self.t0

    def event(self, what, **kw):
        e = dict(t=round(self.now(), 3), what=what, **kw)
        self.events.append(e)
        log(f"  t={e['t']:7.2f}s {what} {kw if kw else ''}")

    def fail(self, kind, example):
        self.failures.setdefault(kind, []).append(example)
        log(f"  FAILURE {kind}: {example}")

    def controller(self, exclude=()):
        """The metadata quorum's leader (the controller) as the freshest reachable node sees it."""
        st = self.cluster.freshest_status(exclude)
        return st.get("controller_id") if st else None

    def hold_fault(self, seconds, node, failover=True, health=()):
        """Keeps a fault on `node` for `seconds` while watching, through the other
        nodes, when partition 0 gets a leader other than `node` (the failover time),
        unless not `failover`; and /healthz of the `health` nodes (see HealthWatch,
        returned)."""
        t_fault = time.monotonic()
        end = t_fault + seconds
        hw = HealthWatch(self, health, t_fault)
        moved = not failover
        while time.monotonic() < end:
            hw.poll()
            if not moved:
                parts = self.cluster.partitions(self.topic, exclude=(node,)) or []
                lead = next((p.get("leader") for p in parts if p.get("partition") == 0), None)
                if lead is not None and lead not in (-1, node):
                    moved = True
                    self.event("failover", new_leader=lead, after_s=round(time.monotonic() - t_fault, 2),
                               controller=self.controller(exclude=(node,)))
            time.sleep(POLL_S)
        if not moved:
            self.event("no failover during the fault", node=node, held_s=round(seconds, 1))
        return hw

    def jitter(self, s):
        # Soak runs vary the fault lengths; the default run is deterministic enough.
        return s * self.rng.uniform(0.8, 1.5)

    def healed(self, nodes=None):
        self.cluster.wait_healthy(nodes, timeout=120)
        self.cluster.wait_isr_full(self.topic, timeout=30)
        self.event("healthy")


class HealthWatch:
    """Polls /healthz of `nodes` through their published ports (clients reach a node
    that is cut off from its peers) and records each change of the answer as a
    `healthz` event with the seconds since `t_fault` (monotonic). ``first_unhealthy``:
    node -> (after_s, status, body) of the first answer other than 200 (status None:
    no answer within 1 s, which a probe counts as a failure too)."""

    def __init__(self, ctx, nodes, t_fault):
        self.ctx = ctx
        self.nodes = tuple(nodes)
        self.t_fault = t_fault
        self.last = {}
        self.first_unhealthy = {}

    def poll(self):
        for n in self.nodes:
            status, body = self.ctx.cluster.health(n, timeout=1.0)
            after = round(time.monotonic() - self.t_fault, 2)
            if status != 200 and n not in self.first_unhealthy:
                self.first_unhealthy[n] = (after, status, body)
            if self.last.get(n, ("?",))[0] != status:
                self.ctx.event("healthz", node=n, status=status, body=body[:160], after_s=after)
            self.last[n] = (status, body)


class Watch:
    """Follows the cluster while a link fault is held and records every change once,
    as an event with the seconds since the fault began (`after_s`): the controller,
    the nodes' states (alive / fenced) and each partition's leader and ISR of the
    scenario's topic in the freshest view (highest applied metadata index), the
    controller each node of `views` believes in (its own, possibly stale, view),
    and /healthz of the `health` nodes. A partition whose leader moves to another
    node gets a `failover` event (as in hold_fault)."""

    def __init__(self, ctx, views=(), health=()):
        self.ctx = ctx
        self.views = tuple(views)
        self.health_nodes = tuple(health)
        self.t_fault = time.monotonic()
        self.health = HealthWatch(ctx, self.health_nodes, self.t_fault)
        self.controller = None
        self.states = {}
        self.leaders = {}
        self.isrs = {}
        self.seen = {}
        self.failed_over = set()
        self._read(record=False)

    def _after(self):
        return round(time.monotonic() - self.t_fault, 2)

    def _read(self, record=True):
        c = self.ctx.cluster
        st = c.freshest_status()
        if st:
            ctl = st.get("controller_id")
            if ctl != self.controller:
                if record:
                    self.ctx.event("controller", controller=ctl, was=self.controller, after_s=self._after())
                self.controller = ctl
            for n in st.get("nodes", []):
                if self.states.get(n["id"]) != n.get("state"):
                    if record:
                        self.ctx.event("node state", node=n["id"], state=n.get("state"),
                                       was=self.states.get(n["id"]), after_s=self._after())
                    self.states[n["id"]] = n.get("state")
            for t in st.get("topics", []):
                if t.get("name") != self.ctx.topic:
                    continue
                for p in t.get("partitions", []):
                    k = p.get("partition")
                    lead, isr = p.get("leader"), sorted(p.get("isr", []))
                    if k in self.leaders and lead != self.leaders[k] and record:
                        if lead in c.nodes and k not in self.failed_over:
                            self.failed_over.add(k)
                            self.ctx.event("failover", partition=k, new_leader=lead, was=self.leaders[k],
                                           after_s=self._after(), controller=ctl)
                        else:
                            self.ctx.event("leader", partition=k, leader=lead, was=self.leaders[k],
                                           after_s=self._after())
                    if k in self.isrs and isr != self.isrs[k] and record:
                        self.ctx.event("isr", partition=k, isr=isr, was=self.isrs[k], leader=lead,
                                       after_s=self._after())
                    self.leaders[k], self.isrs[k] = lead, isr
        for n in self.views:
            v = c.status(n)
            ctl = v.get("controller_id") if v else "no answer"
            if self.seen.get(n, "?") != ctl:
                if record:
                    self.ctx.event("view", node=n, controller=ctl, after_s=self._after())
                self.seen[n] = ctl

    def start(self):
        """The fault is in place from now on."""
        self.t_fault = time.monotonic()
        self.health.t_fault = self.t_fault

    def hold(self, seconds):
        end = self.t_fault + seconds
        while time.monotonic() < end:
            self._read()
            self.health.poll()
            time.sleep(POLL_S)


# -- nemeses -----------------------------------------------------------------------


def kill_leader(ctx: Ctx):
    for r in range(ctx.rounds):
        leader = ctx.cluster.leader(ctx.topic, 0)
        ctx.event("kill", round=r + 1, node=leader, controller=ctx.controller())
        ctx.cluster.kill(leader)
        ctx.hold_fault(ctx.jitter(ctx.timing.down_s), leader)
        ctx.cluster.start(leader)
        ctx.event("start", node=leader)
        ctx.healed()
        time.sleep(ctx.timing.settle_s)


def pause_leader(ctx: Ctx):
    for r in range(ctx.rounds):
        leader = ctx.cluster.leader(ctx.topic, 0)
        ctx.event("pause", round=r + 1, node=leader, controller=ctx.controller())
        ctx.cluster.pause(leader)
        ctx.hold_fault(ctx.jitter(ctx.timing.fault_s), leader)
        ctx.cluster.unpause(leader)
        ctx.event("unpause", node=leader)
        ctx.healed()
        time.sleep(ctx.timing.settle_s)


def _partition(ctx: Ctx, pick, check_health=False):
    for r in range(ctx.rounds):
        node = pick()
        leader = ctx.cluster.leader(ctx.topic, 0)
        ctx.event("disconnect", round=r + 1, node=node, leader=leader, controller=ctx.controller())
        ctx.cluster.disconnect(node)
        hold = ctx.jitter(ctx.timing.fault_s)
        if check_health:
            # Long enough to see the deadline pass.
            hold = max(hold, HEALTH_DEADLINE_S + 1.0)
            hw = ctx.hold_fault(hold, node, failover=node == leader, health=(node,))
            _check_cut_off_health(ctx, r, node, hw, hold)
        elif node == leader:
            ctx.hold_fault(hold, node)
        else:
            time.sleep(hold)
        ctx.cluster.connect(node)
        ctx.event("connect", node=node)
        ctx.healed()
        time.sleep(ctx.timing.settle_s)


def partition_leader(ctx: Ctx):
    _partition(ctx, lambda: ctx.cluster.leader(ctx.topic, 0))


def _check_cut_off_health(ctx: Ctx, r, node, hw: HealthWatch, held):
    """A node cut off from its peers (it lost the quorum: no controller, or fenced)
    must answer /healthz with something other than 200 within HEALTH_DEADLINE_S of
    the cut, so that a load balancer or readiness probe stops sending clients to it."""
    first = hw.first_unhealthy.get(node)
    ctx.event("cut-off health", node=node, first_unhealthy_after_s=first[0] if first else None,
              status=first[1] if first else 200, body=(first[2] if first else "ok")[:160],
              limit_s=HEALTH_DEADLINE_S, held_s=round(held, 1))
    if first is None:
        ctx.fail("healthy-while-cut-off",
                 f"round {r + 1}: node {node} (cut off from its peers) still answered /healthz 200 when "
                 f"reconnected {held:.1f}s after the cut (limit {HEALTH_DEADLINE_S:.0f}s)")
    elif first[0] > HEALTH_DEADLINE_S:
        ctx.fail("healthy-while-cut-off",
                 f"round {r + 1}: node {node} (cut off from its peers) answered /healthz 200 for {first[0]:.1f}s "
                 f"after the cut (limit {HEALTH_DEADLINE_S:.0f}s), then {first[1]} {first[2][:120]}")


def partition_controller(ctx: Ctx):
    """Cuts off the metadata quorum's leader (whether or not it leads partition 0).
    Its /healthz must turn non-200 within HEALTH_DEADLINE_S of the cut."""

    def pick():
        c = ctx.controller()
        if c not in ctx.cluster.nodes:
            raise ClusterError(f"no controller in the cluster status ({c!r})")
        return c

    _partition(ctx, pick, check_health=True)


def bridge(ctx: Ctx):
    """The controller C and another node E lose the link between them (both
    directions); both still reach the third node M. M is a node other than the
    controller, preferably one leading a partition of the topic. E's heartbeats no
    longer reach the controller, so C fences E after the session timeout; E still
    replicates with M, and C with M. Raft may or may not move (E can only win with
    M's vote). Held ~bridge_s (at least BRIDGE_GRACE_S + BRIDGE_CHECKED_S), then
    healed. Every partition must take writes again BRIDGE_GRACE_S after the cut
    and until the heal (checked after the run: `partition-unwritable`); E's
    /healthz is recorded (events only)."""
    c = ctx.cluster
    for r in range(ctx.rounds):
        ctl = ctx.controller()
        if ctl not in c.nodes:
            raise ClusterError(f"no controller in the cluster status ({ctl!r})")
        parts = c.partitions(ctx.topic) or []
        leaders = {p["partition"]: p.get("leader") for p in parts}
        others = sorted(n for n in c.nodes if n != ctl)
        led = sorted({x for x in leaders.values() if x in others})
        m = ctx.rng.choice(led or others)
        e = next(n for n in others if n != m)
        watch = Watch(ctx, views=(e,), health=sorted(c.nodes))
        ctx.event("bridge", round=r + 1, controller=ctl, cut_off=e, bridge=m, leaders=leaders,
                  isr={p["partition"]: p.get("isr") for p in parts})
        c.cut_link(ctl, e, both=True)
        t_fault = ctx.now()
        watch.start()
        ctx.event("link cut", between=[ctl, e], rules=c.link_rules())
        hold = max(ctx.jitter(ctx.timing.bridge_s), BRIDGE_GRACE_S + BRIDGE_CHECKED_S)
        watch.hold(hold)
        t_heal = ctx.now()
        first = watch.health.first_unhealthy.get(e)
        ctx.event("bridge health", node=e, first_unhealthy_after_s=first[0] if first else None,
                  first_status=first[1] if first else 200, first_body=(first[2] if first else "ok")[:160],
                  at_heal=watch.health.last.get(e))
        c.heal_links()
        ctx.event("links healed", held_s=round(t_heal - t_fault, 1), rules=c.link_rules())
        ctx.writability.append(dict(what=f"bridge round {r + 1}", t_fault=t_fault, t_heal=t_heal,
                                    grace_s=BRIDGE_GRACE_S, enforce=True,
                                    roles=dict(controller=ctl, cut_off=e, bridge=m)))
        ctx.healed()
        time.sleep(ctx.timing.settle_s)


def asymmetric(ctx: Ctx):
    """Drops only the packets from a partition's leader L to one of its followers F
    (F -> L still flows). Picked so that the link carries replication, not Raft:
    a partition led by a node other than the controller (partition 0 first) and a
    follower that is not the controller, when there is one. F's fetch requests can
    still reach L on an established connection, but L's answers (and the SYN-ACKs of
    new connections) never reach F: F cannot replicate, while its heartbeats to the
    controller are untouched (no fencing). L must drop F from the ISR after the
    replica lag time and keep taking writes with the remaining ISR; after the heal F
    catches up and rejoins. The per-partition writability is recorded (information
    only, grace = replica lag + 3 s)."""
    c = ctx.cluster
    for r in range(ctx.rounds):
        ctl = ctx.controller()
        parts = [p for p in (c.partitions(ctx.topic) or []) if p.get("leader") in c.nodes]
        if not parts:
            raise ClusterError(f"{ctx.topic} has no partition with a leader")
        p = sorted(parts, key=lambda p: (p.get("leader") == ctl, p.get("partition")))[0]
        lead = p["leader"]
        followers = sorted(n for n in p.get("replicas", []) if n != lead)
        f = ctx.rng.choice([n for n in followers if n != ctl] or followers)
        watch = Watch(ctx, health=(f,))
        ctx.event("cut one way", round=r + 1, partition=p["partition"], dropped=f"{lead}->{f}", leader=lead,
                  follower=f, controller=ctl, isr=p.get("isr"))
        c.cut_link(lead, f, both=False)
        t_fault = ctx.now()
        watch.start()
        ctx.event("link cut", rules=c.link_rules())
        watch.hold(ctx.jitter(ctx.timing.asym_s))
        t_heal = ctx.now()
        c.heal_links()
        ctx.event("links healed", held_s=round(t_heal - t_fault, 1), rules=c.link_rules())
        ctx.writability.append(dict(what=f"asymmetric round {r + 1}", t_fault=t_fault, t_heal=t_heal,
                                    grace_s=REPLICA_LAG_S + SLACK_S, enforce=False,
                                    roles=dict(leader=lead, follower=f, controller=ctl, partition=p["partition"])))
        ctx.healed()
        time.sleep(ctx.timing.settle_s)


def partition_follower(ctx: Ctx):
    def pick():
        leader = ctx.cluster.leader(ctx.topic, 0)
        followers = [n for n in ctx.cluster.replicas(ctx.topic, 0) if n != leader] or [
            n for n in ctx.cluster.nodes if n != leader
        ]
        return ctx.rng.choice(sorted(followers))

    _partition(ctx, pick)


def kill_all(ctx: Ctx):
    nodes = sorted(ctx.cluster.nodes)
    for r in range(ctx.rounds):
        ctx.event("kill all", round=r + 1)
        ctx.cluster.kill(*nodes)
        time.sleep(ctx.jitter(3.0))
        ctx.cluster.start(*nodes)
        ctx.event("start all")
        ctx.healed()
        time.sleep(ctx.timing.settle_s)


def rolling_restart(ctx: Ctx):
    for r in range(ctx.rounds):
        # Followers first, the leader of partition 0 last (as an operator would).
        leader = ctx.cluster.leader(ctx.topic, 0)
        order = [n for n in sorted(ctx.cluster.nodes) if n != leader] + [leader]
        for n in order:
            ctx.event("restart", round=r + 1, node=n)
            ctx.cluster.restart(n, grace_s=30)
            ctx.healed([n])
            ctx.cluster.wait_isr_full(ctx.topic, timeout=30)


def _moved(ctx: Ctx, target):
    """Waits until partition 0's reassignment to `target` has completed."""

    def done():
        p = ctx.cluster.partition(ctx.topic, 0)
        return p if p and p.get("replicas") == target and "target_replicas" not in p else None

    return wait_until(done, timeout=90, interval=0.3, what=f"{ctx.topic}-0 on {target}")


def add_node(ctx: Ctx):
    c = ctx.cluster
    new = max(c.extra)
    for r in range(ctx.rounds):
        before = c.replicas(ctx.topic, 0)
        leader = c.leader(ctx.topic, 0)
        ctx.event("start node", round=r + 1, node=new)
        c.compose_up(new)
        c.start(new)  # a no-op when compose just created it; starts it in later rounds
        c.wait_healthy([new], timeout=120)
        roles = {n["id"]: n.get("role") for n in (c.status(new) or {}).get("nodes", [])}
        ctx.event("joined", roles=roles)
        if roles.get(new) != "broker":
            raise ClusterError(f"node {new} is not listed as a joined broker: {roles}")
        # Replace the leader by the new node, new node first (preferred leader): it copies
        # the log under load, then the old leader drops out and the new node leads.
        target = [new] + [n for n in before if n != leader]
        ctx.event("reassign", partition=0, replicas=target)
        c.admin_post("/api/v1/partitions/reassign", {"topic": ctx.topic, "partition": 0, "replicas": target})
        p = _moved(ctx, target)
        ctx.event("moved", leader=p.get("leader"), isr=p.get("isr"))
        # The new node fails while leading: the partition fails over to the other ISR.
        lead = c.leader(ctx.topic, 0)
        ctx.event("kill", node=lead)
        c.kill(lead)
        ctx.hold_fault(ctx.jitter(ctx.timing.down_s), lead)
        c.start(lead)
        ctx.event("start", node=lead)
        c.wait_healthy([lead], timeout=120)
        ctx.healed()
        # Back to the original replicas, then decommission the new node.
        ctx.event("reassign", partition=0, replicas=before)
        c.admin_post("/api/v1/partitions/reassign", {"topic": ctx.topic, "partition": 0, "replicas": before})
        _moved(ctx, before)
        ctx.healed()
        held = [(t["name"], p["partition"]) for t in (c.freshest_status() or {}).get("topics", [])
                for p in t.get("partitions", []) if new in p.get("replicas", [])]
        if held:
            raise ClusterError(f"node {new} still holds {held}")
        ctx.event("stop node", node=new)
        c.stop(new)
        wait_until(lambda: any(n["id"] == new and n["state"] == "fenced"
                               for n in (c.freshest_status() or {}).get("nodes", [])),
                   timeout=60, what=f"node {new} fenced")
        c.admin_post(f"/api/v1/nodes/{new}/remove", {})
        ctx.event("removed", node=new)
        wait_until(lambda: all(n["id"] != new for n in (c.freshest_status() or {}).get("nodes", [])),
                   timeout=30, what=f"node {new} gone from the status")
        time.sleep(ctx.timing.settle_s)


SCENARIOS = {
    # AMQP: a quorum queue's leader killed, paused and cut off in turn (amqp_faults.py).
    "amqp": (None, 1),
    "kill-leader": (kill_leader, 2),
    "pause-leader": (pause_leader, 2),
    "partition-leader": (partition_leader, 2),
    "partition-follower": (partition_follower, 1),
    "partition-controller": (partition_controller, 1),
    "bridge": (bridge, 1),
    "asymmetric": (asymmetric, 1),
    "kill-all": (kill_all, 2),
    "rolling-restart": (rolling_restart, 1),
    "add-node": (add_node, 1),
}


# -- one scenario ---------------------------------------------------------------------


def create_topic(cluster: ComposeCluster, topic: str, timeout=60.0):
    """Creates the topic (RF 3, min.insync.replicas 2) and waits for leaders and a full
    ISR. Retriable errors (no controller yet...) are retried; others fail at once."""
    admin = AdminClient({"bootstrap.servers": cluster.bootstrap, "socket.connection.setup.timeout.ms": 5000})
    deadline = time.monotonic() + timeout
    while True:
        fut = admin.create_topics(
            [NewTopic(topic, num_partitions=PARTITIONS, replication_factor=3, config={"min.insync.replicas": "2"})],
            request_timeout=15,
        )[topic]
        try:
            fut.result(20)
            break
        except KafkaException as e:
            err = e.args[0] if e.args and isinstance(e.args[0], KafkaError) else None
            if err is not None and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                break
            retriable = err is not None and (err.retriable() or err.code() in (
                KafkaError._TIMED_OUT, KafkaError._TRANSPORT, KafkaError.REQUEST_TIMED_OUT,
                KafkaError.NOT_CONTROLLER, KafkaError.LEADER_NOT_AVAILABLE))
            if not retriable or time.monotonic() >= deadline:
                raise ClusterError(f"could not create {topic}: {e}") from e
            time.sleep(1)
    for p in range(PARTITIONS):
        cluster.leader(topic, p, timeout=30)
    st = cluster.freshest_status() or {}
    configs = next((t.get("configs", {}) for t in st.get("topics", []) if t.get("name") == topic), {})
    if configs.get("min.insync.replicas") != "2":
        raise ClusterError(f"{topic} was created without min.insync.replicas=2 (configs {configs})")
    cluster.wait_isr_full(topic, timeout=30)


def run_scenario(name, nemesis, rounds, cluster: ComposeCluster, timing: Timing, rng, out: Path) -> dict:
    topic = f"jepsen-{name}-{uuid.uuid4().hex[:6]}"
    log(f"=== scenario {name}: {rounds} round(s), topic {topic}")
    cluster.heal_all()
    cluster.wait_healthy(timeout=120)
    create_topic(cluster, topic)
    lg = client_logger(out / f"{name}.librdkafka.log")
    t0 = time.monotonic()
    ctx = Ctx(cluster, topic, rounds, timing, rng, t0)
    prod = ProducerWorkload(cluster.bootstrap, topic, PARTITIONS, RATE, t0, lg)
    # Two readers, bootstrapping from different ends of the cluster.
    cons = [
        ConsumerWorkload("c1", cluster.bootstrap, topic, PARTITIONS, t0, lg),
        ConsumerWorkload("c2", ",".join(reversed(cluster.bootstrap.split(","))), topic, PARTITIONS, t0, lg),
    ]
    # And one consumer-group member with manual commits: the group coordinator moves
    # with the leadership of __consumer_offsets-0.
    group_id = f"{topic}-group"
    grp = GroupConsumerWorkload(cluster.bootstrap, topic, group_id, t0, lg)
    prod.start()
    for c in cons:
        c.start()
    grp.start()
    result = dict(scenario=name, topic=topic, rounds=rounds)
    harness_error = None
    try:
        time.sleep(timing.warmup_s)
        ctx.event("nemesis start")
        nemesis(ctx)
        t_heal = ctx.now()
        ctx.event("nemesis done")
        time.sleep(timing.tail_s)
        # Liveness: the cluster must take writes again after the last heal.
        deadline = time.monotonic() + timing.recovery_s
        while prod.acks_after(t_heal) == 0 and time.monotonic() < deadline and prod.is_alive():
            time.sleep(0.5)
        recovered = prod.acks_after(t_heal) > 0
    except Exception as e:  # noqa: BLE001 - reported as a harness error, clients still stopped
        harness_error = f"{type(e).__name__}: {e}"
        traceback.print_exc()
        recovered = False
        t_heal = ctx.now()
    finally:
        t_stop = ctx.now()
        ctx.event("producer stop")
        prod.stop()
        ctx.event("producer flushed", left=prod.left_after_flush)
        try:
            cluster.heal_all()
            cluster.wait_healthy(timeout=120)
            cluster.wait_isr_full(topic, timeout=30)
        except ClusterError as e:
            harness_error = harness_error or str(e)
        time.sleep(1.0)
        for c in cons:
            c.stop()
        grp.stop()
    final, complete, ends = drain(cluster.bootstrap, topic, PARTITIONS, lg)
    final_committed = committed_offsets(cluster.bootstrap, topic, PARTITIONS, group_id, lg)
    ctx.event("group committed offsets", offsets=final_committed, commits=len(grp.commits),
              commit_failures=grp.commit_failures, assignments=grp.assignments)
    ctx.event("drained", records=len(final), complete=complete, high_watermarks=ends)
    writes = prod.writes()
    reads = [r for c in cons for r in c.reads]
    rep = checker.check(writes, reads, final, t_start=0.0, t_end=t_stop, drain_complete=complete,
                        group_reads=grp.reads, commits=grp.commits, final_committed=final_committed)

    failures = list(rep.failures)
    examples = {k: [repr(x) for x in v] for k, v in rep.examples.items()}
    # Per-partition writability of the fault windows a nemesis asked for.
    writability = []
    for wnd in ctx.writability:
        gaps = checker.partition_gaps(writes, wnd["t_fault"], wnd["t_heal"], range(PARTITIONS))
        bad = checker.unwritable_partitions(writes, wnd["t_fault"], wnd["t_heal"], wnd["grace_s"],
                                            range(PARTITIONS))
        writability.append(dict(
            wnd, violations=[(p, why) for p, why, _ in bad],
            partitions={p: dict(longest_gap_s=round(g[0], 2), gap=(round(g[1], 2), round(g[2], 2)), acks=g[3])
                        for p, g in gaps.items()}))
        log(f"--- {name}: {wnd['what']} ({wnd['roles']}): fault {wnd['t_fault']:.1f}..{wnd['t_heal']:.1f}s, "
            f"grace {wnd['grace_s']:.0f}s, per partition (longest gap, acks): "
            + ", ".join(f"p{p} {g[0]:.1f}s [{g[1]:.1f}..{g[2]:.1f}] {g[3]}" for p, g in gaps.items())
            + (f"; VIOLATIONS {[(p, why) for p, why, _ in bad]}" if bad else "")
            + ("" if wnd["enforce"] else " (information only)"))
        if wnd["enforce"]:
            for p, why, detail in bad:
                ctx.failures.setdefault("partition-unwritable", []).append(
                    f"{wnd['what']} {wnd['roles']}: partition {p} {why}: {detail}")
    for kind, items in ctx.failures.items():
        failures.append(kind)
        examples[kind] = [str(x) for x in items]
    if not recovered:
        failures.append("no-recovery")
    if final_committed is None:
        failures.append("no-committed-offsets")
    if prod.crashed or grp.crashed or any(c.crashed for c in cons):
        failures.append("client-crashed")
    if harness_error:
        failures.append("harness-error")
    result.update(
        failures=failures,
        summary=rep.summary(),
        counts=rep.counts,
        info={k: v for k, v in rep.info.items()},
        fatal_producer_errors=prod.fatal,
        producer_instances=prod.instances,
        producer_client_errors=prod.client_errors,
        consumer_errors={c.reader_name: c.errors for c in cons},
        consumer_sessions={c.reader_name: c.sessions for c in cons},
        group=dict(reads=len(grp.reads), commits=len(grp.commits), commit_failures=grp.commit_failures,
                   errors=grp.errors, assignments=grp.assignments, final_committed=final_committed),
        harness_error=harness_error,
        client_crash=[repr(x) for x in [prod.crashed, grp.crashed, *[c.crashed for c in cons]] if x],
        events=ctx.events,
        examples=examples,
        writability=writability,
        duration_s=round(ctx.now(), 1),
    )
    log(f"--- {name}: {rep.summary()}")
    log(f"--- {name}: producer errors {rep.info.get('errors')}, fatal {len(prod.fatal)}, "
        f"consumer errors {result['consumer_errors']}, group {result['group']}")
    if failures:
        log(f"--- {name}: FAILED {failures}")
        for k, v in result["examples"].items():
            for x in v[:4]:
                log(f"      {k}: {x[:300]}")
    else:
        log(f"--- {name}: ok")
    with open(out / f"{name}.history.json", "w") as f:
        json.dump(
            dict(result=result, writes=[asdict(w) for w in writes], reads=[asdict(r) for r in reads],
                 group_reads=[asdict(r) for r in grp.reads], commits=[asdict(c) for c in grp.commits],
                 final=[asdict(r) for r in final]),
            f,
        )
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", required=True, help="compose project name")
    ap.add_argument("--kafka-ports", default=os.environ.get("SLUICE_KAFKA_PORTS", "19092,19093,19094"))
    ap.add_argument("--http-ports", default=os.environ.get("SLUICE_HTTP_PORTS", "18081,18082,18083"))
    ap.add_argument("--amqp-ports", default=os.environ.get("SLUICE_AMQP_PORTS", "5672,5673,5674"))
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset")
    ap.add_argument("--rounds", type=int, default=0, help="rounds per scenario (default: each scenario's own)")
    ap.add_argument("--soak", action="store_true", help="more rounds, longer and varied faults")
    ap.add_argument("--seed", type=int, default=int(os.environ.get("SLUICE_JEPSEN_SEED", time.time())))
    ap.add_argument("--out", default=os.environ.get("SLUICE_JEPSEN_OUT", "/tmp/sluice-jepsen"))
    args = ap.parse_args(argv)

    names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown:
        print(f"unknown scenarios {unknown}; known: {list(SCENARIOS)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    timing = Timing()
    if args.soak:
        timing = Timing(warmup_s=5, down_s=12, fault_s=20, settle_s=5, tail_s=10, bridge_s=30, asym_s=20)
    extra = {4: Node(4, "sluice4", int(os.environ.get("SLUICE_KAFKA_PORT_4", "19095")),
                     int(os.environ.get("SLUICE_HTTP_PORT_4", "18084")))}
    cluster = ComposeCluster(args.project, args.kafka_ports.split(","), args.http_ports.split(","), extra=extra)
    log(f"project {args.project}, bootstrap {cluster.bootstrap}, seed {args.seed}, out {out}")

    results = []
    t_all = time.monotonic()
    try:
        cluster.wait_healthy(timeout=120)
        for name in names:
            fn, default_rounds = SCENARIOS[name]
            rounds = args.rounds or (default_rounds * 4 if args.soak else default_rounds)
            try:
                if fn is None:
                    amqp_ports = {i + 1: int(p) for i, p in enumerate(args.amqp_ports.split(","))}
                    results.append(run_amqp_scenario(name, cluster, amqp_ports, timing, rng))
                else:
                    results.append(run_scenario(name, fn, rounds, cluster, timing, rng, out))
            except Exception as e:  # noqa: BLE001 - one broken scenario does not hide the others
                traceback.print_exc()
                results.append(dict(scenario=name, failures=["harness-error"], harness_error=str(e), summary=""))
    except ClusterError as e:
        log(f"cluster unusable: {e}")
        for n in cluster.nodes:
            try:
                print(f"--- logs of node {n} ---\n{cluster.logs(n, 80)}")
            except Exception:  # noqa: BLE001
                pass
        return 2
    finally:
        try:
            cluster.heal_all()
        except Exception as e:  # noqa: BLE001
            log(f"heal at exit failed: {e}")

    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=1, default=str)
    print()
    print(f"==== Jepsen-style fault tests: {len(results)} scenario(s) in {time.monotonic() - t_all:.0f}s "
          f"(seed {args.seed}, histories in {out}) ====")
    print(f"{'scenario':20} {'acked':>7} {'lost':>5} {'dup':>5} {'other':>6} {'unavail':>8} {'failover':>9}  result")
    bad = 0
    for r in results:
        c, i = r.get("counts", {}), r.get("info", {})
        other = sum(v for k, v in c.items() if k not in ("lost", "duplicate"))
        verdict = "ok" if not r["failures"] else "FAIL " + ",".join(r["failures"])
        bad += bool(r["failures"])
        # Slowest failover seen by the nemesis ("none" if a fault ended before any).
        fo = [e["after_s"] for e in r.get("events", []) if e.get("what") == "failover"]
        missed = any(e.get("what") == "no failover during the fault" for e in r.get("events", []))
        failover = "none" if missed else (f"{max(fo):.1f}s" if fo else "-")
        print(f"{r['scenario']:20} {i.get('acknowledged', 0):>7} {c.get('lost', 0):>5} {c.get('duplicate', 0):>5} "
              f"{other:>6} {i.get('unavailable-s', 0.0):>7.1f}s {failover:>9}  {verdict}")
    if bad:
        print(f"{bad} of {len(results)} scenario(s) failed")
        failed_harness = [r for r in results if "harness-error" in r["failures"]]
        for r in failed_harness:
            print(f"  {r['scenario']}: harness error: {r.get('harness_error')}")
        for n in cluster.nodes:
            try:
                with open(out / f"node{n}.log", "w") as f:
                    f.write(cluster.logs(n, 2000))
            except Exception:  # noqa: BLE001
                pass
        return 1
    print("all scenarios passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
  partition-controller  the same for the metadata quorum's leader (the controller)
  kill-all            SIGKILL all three nodes at once, start them again
  rolling-restart     docker restart (SIGTERM, then start) each node in turn
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


@dataclass
class Timing:
    warmup_s: float = 3.0
    down_s: float = 8.0  # a killed leader stays down this long (> session timeout: failover)
    fault_s: float = 10.0  # pause / partition length (> session timeout)
    settle_s: float = 3.0  # after a heal, before the next round
    tail_s: float = 5.0  # after the last heal, before the producer stops
    recovery_s: float = 60.0  # an ack must arrive this long after the last heal


@dataclass
class Ctx:
    cluster: ComposeCluster
    topic: str
    rounds: int
    timing: Timing
    rng: random.Random
    t0: float
    events: list = field(default_factory=list)

    def now(self):
        return time.monotonic() - self.t0

    def event(self, what, **kw):
        e = dict(t=round(self.now(), 3), what=what, **kw)
        self.events.append(e)
        log(f"  t={e['t']:7.2f}s {what} {kw if kw else ''}")

    def controller(self, exclude=()):
        """The metadata quorum's leader (the controller) as the freshest reachable node sees it."""
        st = self.cluster.freshest_status(exclude)
        return st.get("controller_id") if st else None

    def hold_fault(self, seconds, node):
        """Keeps a fault on `node` for `seconds` while watching, through the other
        nodes, when partition 0 gets a leader other than `node` (the failover time)."""
        t_fault = time.monotonic()
        end = t_fault + seconds
        moved = False
        while time.monotonic() < end:
            if not moved:
                parts = self.cluster.partitions(self.topic, exclude=(node,)) or []
                lead = next((p.get("leader") for p in parts if p.get("partition") == 0), None)
                if lead is not None and lead not in (-1, node):
                    moved = True
                    self.event("failover", new_leader=lead, after_s=round(time.monotonic() - t_fault, 2),
                               controller=self.controller(exclude=(node,)))
            time.sleep(0.25)
        if not moved:
            self.event("no failover during the fault", node=node, held_s=round(seconds, 1))

    def jitter(self, s):
        # Soak runs vary the fault lengths; the default run is deterministic enough.
        return s * self.rng.uniform(0.8, 1.5)

    def healed(self, nodes=None):
        self.cluster.wait_healthy(nodes, timeout=120)
        self.cluster.wait_isr_full(self.topic, timeout=30)
        self.event("healthy")


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


def _partition(ctx: Ctx, pick):
    for r in range(ctx.rounds):
        node = pick()
        leader = ctx.cluster.leader(ctx.topic, 0)
        ctx.event("disconnect", round=r + 1, node=node, leader=leader, controller=ctx.controller())
        ctx.cluster.disconnect(node)
        if node == leader:
            ctx.hold_fault(ctx.jitter(ctx.timing.fault_s), node)
        else:
            time.sleep(ctx.jitter(ctx.timing.fault_s))
        ctx.cluster.connect(node)
        ctx.event("connect", node=node)
        ctx.healed()
        time.sleep(ctx.timing.settle_s)


def partition_leader(ctx: Ctx):
    _partition(ctx, lambda: ctx.cluster.leader(ctx.topic, 0))


def partition_controller(ctx: Ctx):
    """Cuts off the metadata quorum's leader (whether or not it leads partition 0)."""

    def pick():
        c = ctx.controller()
        if c not in ctx.cluster.nodes:
            raise ClusterError(f"no controller in the cluster status ({c!r})")
        return c

    _partition(ctx, pick)


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
    "kill-leader": (kill_leader, 2),
    "pause-leader": (pause_leader, 2),
    "partition-leader": (partition_leader, 2),
    "partition-follower": (partition_follower, 1),
    "partition-controller": (partition_controller, 1),
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
        examples={k: [repr(x) for x in v] for k, v in rep.examples.items()},
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
        timing = Timing(warmup_s=5, down_s=12, fault_s=20, settle_s=5, tail_s=10)
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

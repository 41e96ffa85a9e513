"""The AMQP scenario of the cluster fault tests: a quorum queue (replicated on
all three nodes) with a publisher using confirms and a consumer acking each
message, both started on nodes that do not lead the queue, so their
publishes, deliveries and acks travel to the leader through the node they are
connected to. The nemesis then, in turn, SIGKILLs the queue's leader (and
starts it again), pauses it, and cuts it off the peer network (clients on the
host still reach it), healing in between; before each fault the clients move
off the leader. A last round cuts the leader off with both clients connected
to it. Clients reconnect to the next node after any failure, as a RabbitMQ
client with several addresses does.

Checked afterwards (`check`, pure, unit-tested in test_checker.py):

  lost              a confirmed message was never delivered
  phantom           a delivered message was never published
  acked-redelivered a message delivered again after an ack that was sent
                    outside every fault window (from ACK_GRACE_S before the
                    fault until SETTLE_S after its heal): an ack in flight to a
                    leader that dies may be lost, at least once as in RabbitMQ,
                    but an ack the leader had time to record never is
  unflagged-redelivery  a message delivered again without the redelivered flag
  no-recovery       no confirm after the last heal

Reported, not failing: nacks and publishes whose outcome is unknown (a
closed channel or connection), redeliveries inside fault windows, reconnects,
and the longest stretch without a confirm.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field

import pika
import pika.exceptions

from cluster import ComposeCluster, ClusterError, log

# An ack sent this close to a fault may die with the leader.
ACK_GRACE_S = 1.0
# After a heal: a new leader, reconnections and redeliveries.
SETTLE_S = 8.0
# The consumer drains until nothing arrives for this long.
QUIET_S = 4.0
PUBLISH_INTERVAL_S = 0.004


def connect(port: int) -> pika.BlockingConnection:
    return pika.BlockingConnection(
        pika.ConnectionParameters(
            "127.0.0.1",
            port,
            "/",
            pika.PlainCredentials("guest", "guest"),
            heartbeat=10,
            blocked_connection_timeout=30,
            socket_timeout=5,
            connection_attempts=1,
        )
    )


class Rotation:
    """The nodes a client tries, in order, starting at a given one."""

    def __init__(self, ports: dict, first: int):
        self.ids = sorted(ports)
        self.ports = ports
        self.i = self.ids.index(first)
        self.lock = threading.Lock()

    def current(self) -> tuple:
        with self.lock:
            n = self.ids[self.i]
            return n, self.ports[n]

    def advance(self) -> None:
        with self.lock:
            self.i = (self.i + 1) % len(self.ids)

    def move(self, onto=None, off=None) -> bool:
        """Points the client at `onto`, or off `off`; the client reconnects
        when its node is no longer the current one. Whether it moved."""
        with self.lock:
            now = self.ids[self.i]
            want = onto if onto is not None else (now if now != off else self.ids[(self.i + 1) % len(self.ids)])
            self.i = self.ids.index(want)
            return want != now

    def still(self, node) -> bool:
        with self.lock:
            return self.ids[self.i] == node


def failed_over(client, node, e):
    """A client's connection failed: note why, and reconnect to the next node."""
    client.reconnects += 1
    if len(client.errors) < 50:
        client.errors.append(f"{time.monotonic() - client.t0:.1f}s node {node}: {type(e).__name__}: {e}")
    client.rotation.advance()
    time.sleep(0.2)


class Publisher(threading.Thread):
    def __init__(self, rotation: Rotation, queue: str, t0: float):
        super().__init__(daemon=True, name="amqp-publisher")
        self.rotation, self.queue, self.t0 = rotation, queue, t0
        self.stop = threading.Event()
        self.attempted: set = set()
        self.confirmed: dict = {}  # body -> time confirmed
        self.nacked: set = set()
        self.unknown: set = set()
        self.reconnects = 0
        self.errors: list = []

    def run(self):
        n = 0
        while not self.stop.is_set():
            node, port = self.rotation.current()
            body = None
            try:
                with connect(port) as c:
                    ch = c.channel()
                    ch.confirm_delivery()
                    while not self.stop.is_set() and self.rotation.still(node):
                        body = f"v-{n}"
                        n += 1
                        self.attempted.add(body)
                        try:
                            ch.basic_publish("", self.queue, body.encode(), pika.BasicProperties(delivery_mode=2))
                        except pika.exceptions.NackError:
                            self.nacked.add(body)
                        else:
                            self.confirmed[body] = time.monotonic() - self.t0
                        body = None
                        time.sleep(PUBLISH_INTERVAL_S)
            except Exception as e:  # noqa: BLE001 - a fault: the message in flight may or may not be stored
                if body is not None:
                    self.unknown.add(body)
                failed_over(self, node, e)


@dataclass
class Delivery:
    body: str
    redelivered: bool
    received_s: float
    acked_s: float
    node: int


class Consumer(threading.Thread):
    def __init__(self, rotation: Rotation, queue: str, t0: float):
        super().__init__(daemon=True, name="amqp-consumer")
        self.rotation, self.queue, self.t0 = rotation, queue, t0
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.deliveries: list = []
        self.last = time.monotonic()
        self.reconnects = 0
        self.cancels = 0
        self.errors: list = []
        self.node = None

    def _on_message(self, ch, method, props, body):
        received = time.monotonic() - self.t0
        ch.basic_ack(method.delivery_tag)
        with self.lock:
            self.deliveries.append(Delivery(body.decode(), bool(method.redelivered), received,
                                            time.monotonic() - self.t0, self.node))
            self.last = time.monotonic()

    def run(self):
        while not self.stop.is_set():
            node, port = self.rotation.current()
            self.node = node
            try:
                with connect(port) as c:
                    ch = c.channel()
                    ch.basic_qos(prefetch_count=50)
                    ch.basic_consume(self.queue, self._on_message)
                    while not self.stop.is_set() and ch.consumer_tags and self.rotation.still(node):
                        c.process_data_events(0.1)
                    if not self.stop.is_set() and self.rotation.still(node):
                        # basic.cancel from the broker (the queue's leader was lost):
                        # consume again, as a client honouring consumer_cancel_notify does.
                        self.cancels += 1
                        continue
            except Exception as e:  # noqa: BLE001 - a fault: consume again elsewhere
                failed_over(self, node, e)


@dataclass
class Report:
    failures: list = field(default_factory=list)
    examples: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)


def check(attempted, confirmed, deliveries, windows, t_last_heal) -> Report:
    """The history against the scenario's promises. `confirmed`: body -> time;
    `deliveries`: Delivery list in arrival order; `windows`: (fault start, heal)
    times of the faults."""
    rep = Report()
    received = {d.body for d in deliveries}
    lost = sorted(set(confirmed) - received)
    phantom = sorted(received - set(attempted))

    def in_window(t):
        return any(start - ACK_GRACE_S <= t <= heal + SETTLE_S for start, heal in windows)

    safe_ack = {}  # body -> time of its first ack outside every fault window
    again, unflagged = [], []
    repeats = 0
    seen = set()
    for d in deliveries:
        if d.body in seen:
            repeats += 1
            if not d.redelivered:
                unflagged.append(f"{d.body} delivered again at {d.received_s:.2f}s without the redelivered flag")
        if d.body in safe_ack and d.received_s > safe_ack[d.body]:
            again.append(f"{d.body} acked at {safe_ack[d.body]:.2f}s, delivered again at {d.received_s:.2f}s "
                         f"(redelivered={d.redelivered}, via node {d.node})")
        seen.add(d.body)
        if d.body not in safe_ack and not in_window(d.acked_s):
            safe_ack[d.body] = d.acked_s
    for kind, items in (("lost", lost), ("phantom", phantom), ("acked-redelivered", again),
                        ("unflagged-redelivery", unflagged)):
        if items:
            rep.failures.append(kind)
            rep.examples[kind] = items[:10]
    if not any(t > t_last_heal for t in confirmed.values()):
        rep.failures.append("no-recovery")
    rep.counts = dict(confirmed=len(confirmed), received=len(received), deliveries=len(deliveries),
                      repeats=repeats, lost=len(lost), phantom=len(phantom), acked_redelivered=len(again))
    return rep


def longest_gap(times, start, end):
    ts = sorted(t for t in times if start <= t <= end)
    points = [start, *ts, end]
    return max((b - a for a, b in zip(points, points[1:])), default=0.0)


def run_amqp_scenario(name, cluster: ComposeCluster, amqp_ports: dict, timing, rng) -> dict:
    queue = f"jepsen-amqp-{uuid.uuid4().hex[:6]}"
    topic = f"amqp.{queue}"
    log(f"=== scenario {name}: quorum queue {queue}: kill, pause and partition its leader")
    cluster.heal_all()
    cluster.wait_healthy(timeout=120)
    first = min(amqp_ports)
    deadline = time.monotonic() + 60
    while True:
        try:
            with connect(amqp_ports[first]) as c:
                c.channel().queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
            break
        except Exception as e:  # noqa: BLE001 - the cluster may still be settling
            if time.monotonic() > deadline:
                raise ClusterError(f"cannot declare {queue}: {e}") from e
            time.sleep(1)
    leader = cluster.leader(topic, 0)
    cluster.wait_isr_full(topic, timeout=30)
    others = [n for n in sorted(amqp_ports) if n != leader]
    t0 = time.monotonic()
    now = lambda: time.monotonic() - t0  # noqa: E731
    pub = Publisher(Rotation(amqp_ports, others[0]), queue, t0)
    con = Consumer(Rotation(amqp_ports, others[1]), queue, t0)
    pub.start()
    con.start()
    events, windows = [], []

    def event(what, **kw):
        e = dict(t=round(now(), 2), what=what, **kw)
        events.append(e)
        log(f"    {e}")

    harness_error = None
    try:
        time.sleep(timing.warmup_s)
        # The forwarded path under each fault: clients on nodes that do not lead
        # the queue. Last, the clients on the leader as it is cut off: a deposed
        # leader they still reach must not confirm what it cannot commit.
        for fault, clients_on_leader in (("kill", False), ("pause", False), ("partition", False),
                                         ("partition", True)):
            target = cluster.leader(topic, 0)
            for rotation in (pub.rotation, con.rotation):
                if clients_on_leader:
                    rotation.move(onto=target)
                else:
                    rotation.move(off=target)
            time.sleep(1.0)  # reconnected, publishing and consuming again
            event(fault, node=target, publisher_node=pub.rotation.current()[0],
                  consumer_node=con.rotation.current()[0], clients_on_leader=clients_on_leader)
            start = now()
            if fault == "kill":
                cluster.kill(target)
                time.sleep(timing.down_s + rng.uniform(0, 2))
                cluster.start(target)
            elif fault == "pause":
                cluster.pause(target)
                time.sleep(timing.fault_s + rng.uniform(0, 3))
                cluster.unpause(target)
            else:
                cluster.disconnect(target)
                time.sleep(timing.fault_s + rng.uniform(0, 3))
                cluster.connect(target)
            heal = now()
            windows.append((start, heal))
            event("healed", node=target)
            cluster.wait_healthy(timeout=120)
            time.sleep(SETTLE_S)
        t_last_heal = windows[-1][1]
        # Liveness: confirms again after the last heal.
        deadline = time.monotonic() + timing.recovery_s
        while not any(t > t_last_heal for t in list(pub.confirmed.values())) and time.monotonic() < deadline:
            time.sleep(0.5)
    except Exception as e:  # noqa: BLE001 - reported, clients still stopped
        harness_error = f"{type(e).__name__}: {e}"
        t_last_heal = now()
    finally:
        pub.stop.set()
        pub.join(60)
        try:
            cluster.heal_all()
            cluster.wait_healthy(timeout=120)
        except ClusterError as e:
            harness_error = harness_error or str(e)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and time.monotonic() - con.last < QUIET_S:
            time.sleep(0.2)
        con.stop.set()
        con.join(30)

    with con.lock:
        deliveries = list(con.deliveries)
    rep = check(pub.attempted, dict(pub.confirmed), deliveries, windows, t_last_heal)
    failures = list(rep.failures)
    if harness_error:
        failures.append("harness-error")
    if pub.is_alive() or con.is_alive():
        failures.append("client-stuck")
    redelivered_flagged = sum(1 for d in deliveries if d.redelivered)
    unavailable = longest_gap(pub.confirmed.values(), 0.0, t_last_heal)
    info = dict(rep.counts, nacked=len(pub.nacked), unknown=len(pub.unknown),
                publisher_reconnects=pub.reconnects, consumer_reconnects=con.reconnects,
                consumer_cancels=con.cancels, redelivered_flagged=redelivered_flagged,
                unavailable_s=round(unavailable, 1))
    log(f"--- {name}: {info}")
    for e in pub.errors[:8] + con.errors[:8]:
        log(f"      client: {e}")
    if failures:
        log(f"--- {name}: FAILED {failures}")
        for k, v in rep.examples.items():
            for x in v[:4]:
                log(f"      {k}: {x}")
    else:
        log(f"--- {name}: ok")
    return dict(scenario=name, queue=queue, failures=failures, counts=dict(lost=rep.counts.get("lost", 0),
                duplicate=0, phantom=rep.counts.get("phantom", 0),
                acked_redelivered=rep.counts.get("acked_redelivered", 0)),
                info={"acknowledged": len(pub.confirmed), "unavailable-s": unavailable, **info},
                events=events, examples=rep.examples, harness_error=harness_error,
                summary=str(info))

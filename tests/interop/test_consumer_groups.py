"""Acceptance 2: consumer groups with real confluent-kafka consumers.

Two members split a 6-partition topic; a third joins (three-way split); one
leaves (two-way split again); every record is consumed, and a record is read
twice only if a commit covering it failed during a rebalance. Offsets are
committed; after a kill -9 and restart of the broker the committed offsets are
unchanged and a new member resumes exactly after them. `sluice group describe`
reports the lag of records produced afterwards.
"""

import re
import threading
from collections import Counter
import time

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from kutil import unique, wait_until, RF

PARTITIONS = 6


class Member:
    """One group member polling in its own thread; records what it was given."""

    def __init__(self, name, bootstrap, group, topic, extra_conf=None):
        self.name = name
        self.assignment = set()
        self.generations = 0
        self.records = []  # (partition, offset, id, assignment generation)
        self.commit_failed_ids = set()
        self.commits = 0
        self.errors = []
        self._stop = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        conf = {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "client.id": name,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 100,
            **(extra_conf or {}),
        }
        # The consumer protocol (KIP-848) takes its timing and assignor from
        # the broker and refuses these settings.
        self.consumer_protocol = conf.get("group.protocol") == "consumer"
        if not self.consumer_protocol:
            conf.update({"session.timeout.ms": 10000, "heartbeat.interval.ms": 300,
                         "partition.assignment.strategy": "range"})
        self.consumer = Consumer(conf)
        self.topic = topic
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self):
        self.thread.start()
        return self

    # Callbacks name what changes: everything for the classic protocol's
    # eager rebalances, only the moving partitions for the consumer protocol.
    def _on_assign(self, consumer, partitions):
        with self._lock:
            self.assignment |= {p.partition for p in partitions}
            self.generations += 1

    def _on_revoke(self, consumer, partitions):
        if self.consumer_protocol and partitions:
            # What was read from a partition about to go is committed
            # before it goes (the consumer protocol keeps the member's epoch
            # until the revocation is acknowledged, so this commit counts).
            try:
                consumer.commit(asynchronous=False)
            except KafkaException as e:
                self.errors.append(f"commit on revoke: {e}")
        with self._lock:
            self.assignment -= {p.partition for p in partitions}

    def _on_lost(self, consumer, partitions):
        with self._lock:
            self.assignment -= {p.partition for p in partitions}

    def _run(self):
        c = self.consumer
        try:
            c.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost)
            while not self._stop.is_set():
                msgs = c.consume(num_messages=200, timeout=0.2)
                batch = []
                for m in msgs:
                    if m.error():
                        self.errors.append(str(m.error()))
                        continue
                    rid = int(m.value().decode().split("|")[1])
                    batch.append((m.partition(), m.offset(), rid, self.generations))
                if not batch:
                    continue
                with self._lock:
                    self.records.extend(batch)
                try:
                    c.commit(asynchronous=False)
                    self.commits += 1
                except KafkaException as e:
                    # A commit may legitimately fail while the group rebalances;
                    # those records may then be read again by the next owner.
                    self.commit_failed_ids.update(r[2] for r in batch)
                    self.errors.append(f"commit: {e}")
        except Exception as e:  # surfaced by the test through .errors
            self.errors.append(f"member crashed: {e!r}")
        finally:
            try:
                c.close()
            finally:
                self._closed.set()

    def close(self, timeout=20):
        self._stop.set()
        assert self._closed.wait(timeout), f"{self.name} did not close within {timeout}s"
        self.thread.join(5)

    def current(self):
        with self._lock:
            return set(self.assignment)

    def ids(self):
        with self._lock:
            return [r[2] for r in self.records]


def wait_split(members, timeout=45, stable_s=1.5):
    """Waits until the members' assignments are non-empty, disjoint, cover every
    partition, are equal in size (range assignor, 6 partitions), and stay so."""
    deadline = time.monotonic() + timeout
    stable_since = None
    last = None
    while time.monotonic() < deadline:
        sets = [m.current() for m in members]
        union = set().union(*sets)
        disjoint = sum(len(s) for s in sets) == len(union)
        ok = (all(sets) and disjoint and union == set(range(PARTITIONS))
              and len({len(s) for s in sets}) == 1)
        if ok and sets == last:
            if stable_since is None:
                stable_since = time.monotonic()
            if time.monotonic() - stable_since >= stable_s:
                print("[groups] split: " + ", ".join(f"{m.name}={sorted(s)}" for m, s in zip(members, sets)))
                return sets
        else:
            stable_since = None
        last = sets
        time.sleep(0.1)
    errs = {m.name: m.errors[-3:] for m in members}
    raise AssertionError(f"no stable {len(members)}-way split within {timeout}s; last assignments "
                         f"{[(m.name, sorted(s)) for m, s in zip(members, last or [])]}; member errors {errs}")


def produce(bootstrap, topic, start, count):
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    errs = []
    for i in range(start, start + count):
        p.produce(topic, key=f"k{i}".encode(), value=f"rec|{i}".encode(),
                  on_delivery=lambda e, m: e and errs.append(str(e)))
    assert p.flush(30) == 0 and not errs, f"produce failed: {errs[:5]}"
    return set(range(start, start + count))


def consumed_ids(members):
    out = []
    for m in members:
        out.extend(m.ids())
    return out


def wait_consumed(members, expected_ids, timeout=45):
    def done():
        return expected_ids <= set(consumed_ids(members))
    wait_until(done, timeout, what=f"{len(expected_ids)} records consumed by the group")


def committed(bootstrap, group, topic):
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        tps = c.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=15)
        return {tp.partition: tp.offset for tp in tps}
    finally:
        c.close()


def high_watermarks(bootstrap, topic):
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("hw")})
    try:
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(PARTITIONS)}
    finally:
        c.close()


def parse_lag(text, topic):
    """Sums the LAG column of `sluice group describe` rows for `topic`."""
    lines = text.splitlines()
    header = next((i for i, l in enumerate(lines) if "TOPIC" in l and "LAG" in l), None)
    assert header is not None, f"no TOPIC/LAG header in group describe output:\n{text}"
    cols = lines[header].split()
    lag_col = cols.index("LAG")
    total = 0
    rows = 0
    for l in lines[header + 1:]:
        f = l.split()
        if len(f) > lag_col and f[0] == topic:
            rows += 1
            assert re.fullmatch(r"\d+", f[lag_col]), f"non-numeric lag in row {l!r}"
            total += int(f[lag_col])
    assert rows == PARTITIONS, f"expected {PARTITIONS} rows for {topic}, got {rows}:\n{text}"
    return total


def test_group_rebalance_commit_restart_lag(broker):
    t_start = time.monotonic()
    topic = unique("grp")
    group = unique("g")
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=RF)])[topic].result(30)

    produced = produce(broker.bootstrap, topic, 0, 300)
    a = Member("member-a", broker.bootstrap, group, topic).start()
    b = Member("member-b", broker.bootstrap, group, topic).start()
    members = [a, b]
    sa, sb = wait_split([a, b])
    assert len(sa) == len(sb) == 3
    wait_consumed(members, produced)

    c = Member("member-c", broker.bootstrap, group, topic).start()
    members.append(c)
    wait_split([a, b, c])
    produced |= produce(broker.bootstrap, topic, 300, 300)
    wait_consumed(members, produced)

    a.close()
    print(f"[groups] member-a left after consuming {len(a.ids())} records")
    wait_split([b, c])
    produced |= produce(broker.bootstrap, topic, 600, 300)
    wait_consumed(members, produced)

    b.close()
    c.close()

    ids = consumed_ids(members)
    dup = {i for i, n in Counter(ids).items() if n > 1}
    failed_commit_ids = set().union(*(m.commit_failed_ids for m in members))
    commits = sum(m.commits for m in members)
    print(f"[groups] produced={len(produced)} consumed={len(ids)} distinct={len(set(ids))} "
          f"re-read={len(dup)} commits={commits} failed-commit-records={len(failed_commit_ids)}")
    for m in members:
        print(f"[groups] {m.name}: {len(m.records)} records, {m.generations} assignments, errors={m.errors[:3]}")
        assert not [e for e in m.errors if "crashed" in e], f"{m.name}: {m.errors}"
    lost = produced - set(ids)
    assert not lost, f"lost-write: {len(lost)} records never consumed by the group, e.g. {sorted(lost)[:10]}"
    unexplained = dup - failed_commit_ids
    assert not unexplained, (f"duplicate: {len(unexplained)} records consumed twice although their commit "
                             f"succeeded, e.g. {sorted(unexplained)[:10]}")
    # Within one assignment, a member sees each partition's offsets strictly increasing.
    for m in members:
        last = {}
        for p, o, _, gen in m.records:
            prev = last.get((gen, p), -1)
            assert o > prev, f"nonmonotonic-poll: {m.name} generation {gen} p{p} offset {o} after {prev}"
            last[(gen, p)] = o

    hw = high_watermarks(broker.bootstrap, topic)
    before = committed(broker.bootstrap, group, topic)
    assert before == hw, f"committed offsets {before} != log end offsets {hw} after everything was consumed"
    assert sum(hw.values()) == 900

    # Records produced now stay uncommitted across a crash of the broker.
    fresh = produce(broker.bootstrap, topic, 900, 120)
    broker.kill9()
    broker.start()
    after = wait_until(lambda: committed(broker.bootstrap, group, topic), 30, what="committed offsets after restart")
    assert after == before, f"committed offsets changed across kill -9/restart: before {before}, after {after}"

    d = Member("member-d", broker.bootstrap, group, topic).start()
    try:
        wait_until(lambda: d.current() == set(range(PARTITIONS)), 30, what="member-d assigned all partitions")
        wait_until(lambda: fresh <= set(d.ids()), 30, what="member-d reads the 120 uncommitted records")
        time.sleep(1.0)  # anything re-read from before the commit point would show up by now
    finally:
        d.close()
    got = d.ids()
    print(f"[groups] after restart member-d read {len(got)} records (expected exactly {len(fresh)})")
    reread = set(got) - fresh
    assert not reread, f"duplicate: resumed group re-read {len(reread)} committed records, e.g. {sorted(reread)[:10]}"
    assert len(got) == len(fresh), f"duplicate: member-d read {len(got)} records for {len(fresh)} new ones"
    assert committed(broker.bootstrap, group, topic) == high_watermarks(broker.bootstrap, topic)

    # Lag: N records produced with no consumer running.
    n_lag = 37
    produce(broker.bootstrap, topic, 1020, n_lag)
    out = broker.cli("group", "describe", group).stdout.decode()
    print(out)
    lag = parse_lag(out, topic)
    assert lag == n_lag, f"`sluice group describe` reports total lag {lag}, expected {n_lag}"
    print(f"[groups] total {time.monotonic() - t_start:.1f}s")


def test_kafka_python_group_commit_and_admin(broker):
    """kafka-python as a group member: consume, commit, and read the commits back
    through KafkaConsumer.committed and KafkaAdminClient (OffsetFetch, DescribeGroups, ListGroups)."""
    from kafka import KafkaConsumer
    from kafka import TopicPartition as KTP
    from kafka.admin import KafkaAdminClient

    topic = unique("kp-grp")
    group = unique("kp-g")
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=RF)])[topic].result(30)
    produced = produce(broker.bootstrap, topic, 0, 200)

    c = KafkaConsumer(topic, bootstrap_servers=broker.bootstrap, group_id=group, auto_offset_reset="earliest",
                      enable_auto_commit=False, session_timeout_ms=10000, heartbeat_interval_ms=500)
    got = []
    try:
        deadline = time.monotonic() + 30
        while len(got) < len(produced) and time.monotonic() < deadline:
            for msgs in c.poll(timeout_ms=500).values():
                got.extend(int(m.value.decode().split("|")[1]) for m in msgs)
        c.commit()
        committed_kp = {p: c.committed(KTP(topic, p)) for p in range(3)}
    finally:
        c.close()
    assert sorted(got) == sorted(produced), f"kafka-python group read {len(got)} records, {len(set(got))} distinct"
    hw = {p: v for p, v in high_watermarks_n(broker.bootstrap, topic, 3).items()}
    assert committed_kp == hw, f"KafkaConsumer.committed {committed_kp} != log end {hw}"

    ka = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        if hasattr(ka, "list_group_offsets"):  # kafka-python >= 3
            offs = ka.list_group_offsets({group: None})[group]
            groups = ka.list_groups()
            desc = ka.describe_groups([group])
        else:  # kafka-python 2.x names
            offs = ka.list_consumer_group_offsets(group)
            groups = ka.list_consumer_groups()
            desc = ka.describe_consumer_groups([group])
    finally:
        ka.close()
    got_offs = {tp.partition: om.offset for tp, om in offs.items() if tp.topic == topic}
    assert got_offs == hw, f"OffsetFetch via KafkaAdminClient: {got_offs}, expected {hw}"
    assert group in repr(groups), f"ListGroups lacks {group}: {groups}"
    print(f"[groups] kafka-python describe_consumer_groups: {repr(desc)[:300]}")
    assert group in repr(desc)


def high_watermarks_n(bootstrap, topic, n):
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("hw")})
    try:
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(n)}
    finally:
        c.close()


def test_members_survive_broker_restart(broker):
    """Running members ride out a kill -9/restart of the broker: they rejoin, split
    the partitions again and consume what is produced afterwards, without losing
    anything and re-reading only records whose commit failed."""
    topic = unique("grp-rs")
    group = unique("g-rs")
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=RF)])[topic].result(30)
    produced = produce(broker.bootstrap, topic, 0, 200)
    a = Member("rs-a", broker.bootstrap, group, topic).start()
    b = Member("rs-b", broker.bootstrap, group, topic).start()
    members = [a, b]
    try:
        wait_split(members)
        wait_consumed(members, produced)
        broker.kill9()
        time.sleep(0.5)
        broker.start()
        produced |= produce(broker.bootstrap, topic, 200, 200)
        wait_consumed(members, produced, timeout=60)
        wait_split(members, timeout=60)
    finally:
        a.close()
        b.close()
    ids = consumed_ids(members)
    dup = {i for i, n in Counter(ids).items() if n > 1}
    failed_commit_ids = a.commit_failed_ids | b.commit_failed_ids
    print(f"[groups] across restart: consumed={len(ids)} distinct={len(set(ids))} re-read={len(dup)} "
          f"failed-commit-records={len(failed_commit_ids)} errors a={a.errors[:2]} b={b.errors[:2]}")
    assert not produced - set(ids), f"lost-write: {sorted(produced - set(ids))[:10]}"
    unexplained = dup - failed_commit_ids
    assert not unexplained, f"duplicate: re-read although committed: {sorted(unexplained)[:10]}"
    assert committed(broker.bootstrap, group, topic) == high_watermarks(broker.bootstrap, topic)


def test_static_membership_and_commit_metadata(broker):
    """A static member (group.instance.id) that restarts within the session
    timeout gets its partitions back without a rebalance of the others; commit
    metadata round-trips through OffsetCommit/OffsetFetch."""
    topic = unique("grp-static")
    group = unique("g-static")
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=RF)])[topic].result(30)
    static = {"session.timeout.ms": 15000}
    a = Member("st-a", broker.bootstrap, group, topic, {**static, "group.instance.id": "inst-a"}).start()
    b = Member("st-b", broker.bootstrap, group, topic, {**static, "group.instance.id": "inst-b"}).start()
    try:
        sa, sb = wait_split([a, b])
        gens_b = b.generations
        a.close()  # a static member leaves without LeaveGroup: no rebalance yet
        a2 = Member("st-a2", broker.bootstrap, group, topic, {**static, "group.instance.id": "inst-a"}).start()
        try:
            wait_until(lambda: a2.current() == sa, 20, what="restarted static member gets its partitions back")
            time.sleep(1.5)
            assert b.generations == gens_b and b.current() == sb, (
                f"static rejoin rebalanced the other member: assignments {gens_b} -> {b.generations}, "
                f"{sorted(sb)} -> {sorted(b.current())}")
        finally:
            a2.close()
    finally:
        b.close()

    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": unique("meta"), "enable.auto.commit": False})
    try:
        tp = TopicPartition(topic, 0, 0, metadata="checkpoint-42")
        c.commit(offsets=[tp], asynchronous=False)
        got = c.committed([TopicPartition(topic, 0)], timeout=15)[0]
        assert (got.offset, got.metadata) == (0, "checkpoint-42"), f"committed: {got.offset} {got.metadata!r}"
    finally:
        c.close()

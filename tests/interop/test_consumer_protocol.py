"""The consumer group protocol (KIP-848) with confluent-kafka's
`group.protocol=consumer`: the broker assigns (ConsumerGroupHeartbeat), a
partition moves only after its owner revoked it, so members never share
one; every record is read, and read twice only where a commit failed.
A member killed with SIGKILL loses its partitions to the others after the
session timeout; ConsumerGroupDescribe and ListGroups report the group as a
consumer-protocol group with each member's assignment. Single node and
three-node cluster.
"""

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
from confluent_kafka import ConsumerGroupType, ConsumerGroupState
from confluent_kafka.admin import AdminClient, NewTopic

from kutil import RF, unique, wait_until
from test_consumer_groups import PARTITIONS, Member, committed, consumed_ids, produce, wait_consumed, wait_split

# A short session so the kill test is quick; heartbeats often enough that a
# rebalance completes within a second or two.
CONFIG = """
[group]
consumer_session_timeout_ms = 6000
consumer_heartbeat_interval_ms = 500
"""

PROTOCOL = {"group.protocol": "consumer"}


@pytest.fixture(scope="module")
def server(broker_factory):
    return broker_factory("consumer-protocol", config_text=CONFIG)


def create_topic(bootstrap, topic):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=RF)]).values():
        f.result(30)
    return admin


def check_read_once(members):
    counts = Counter(consumed_ids(members))
    twice = {i for i, n in counts.items() if n > 1}
    failed = set().union(*(m.commit_failed_ids for m in members))
    errors = {m.name: m.errors[-5:] for m in members}
    assert twice <= failed, (f"{len(twice - failed)} records read twice without a failed commit, "
                             f"e.g. {sorted(twice - failed)[:10]}; member errors {errors}")


def test_members_split_the_partitions_and_every_record_is_read_once(server):
    topic, group = unique("kip848"), unique("kip848-group")
    create_topic(server.bootstrap, topic)
    ids = produce(server.bootstrap, topic, 0, 600)
    a = Member("a", server.bootstrap, group, topic, PROTOCOL).start()
    members = [a]
    try:
        wait_split([a])
        wait_consumed([a], ids)
        b = Member("b", server.bootstrap, group, topic, PROTOCOL).start()
        members.append(b)
        wait_split([a, b])
        ids |= produce(server.bootstrap, topic, 600, 600)
        c = Member("c", server.bootstrap, group, topic, PROTOCOL).start()
        members.append(c)
        wait_split([a, b, c])
        wait_consumed(members, ids)
        # b leaves: its partitions go to the two others.
        b.close()
        wait_split([a, c])
        ids |= produce(server.bootstrap, topic, 1200, 600)
        wait_consumed(members, ids)
        check_read_once(members)
        assert set(consumed_ids(members)) == ids
        for m in members:
            assert not [e for e in m.errors if "crashed" in e], m.errors
    finally:
        for m in members:
            if not m._closed.is_set():
                m.close()
    # Every record was committed: the group's offsets are the log ends.
    offsets = committed(server.bootstrap, group, topic)
    assert sum(offsets.values()) == 1800, offsets


def test_describe_and_list_report_a_consumer_protocol_group(server):
    topic, group = unique("kip848-describe"), unique("kip848-describe-group")
    admin = create_topic(server.bootstrap, topic)
    produce(server.bootstrap, topic, 0, 60)
    a = Member("a", server.bootstrap, group, topic, PROTOCOL).start()
    b = Member("b", server.bootstrap, group, topic, PROTOCOL).start()
    try:
        wait_split([a, b])
        d = admin.describe_consumer_groups([group])[group].result(30)
        assert d.type == ConsumerGroupType.CONSUMER
        assert d.state == ConsumerGroupState.STABLE
        assert d.partition_assignor == "uniform"
        assert sorted(m.client_id for m in d.members) == ["a", "b"]
        described = {}
        for m in d.members:
            parts = {tp.partition for tp in m.assignment.topic_partitions if tp.topic == topic}
            target = {tp.partition for tp in m.target_assignment.topic_partitions if tp.topic == topic}
            assert parts == target
            described[m.client_id] = parts
        assert described == {"a": a.current(), "b": b.current()}
        listed = admin.list_consumer_groups(types={ConsumerGroupType.CONSUMER}).result(30)
        mine = [g for g in listed.valid if g.group_id == group]
        assert len(mine) == 1 and mine[0].type == ConsumerGroupType.CONSUMER, listed.valid
        classic = admin.list_consumer_groups(types={ConsumerGroupType.CLASSIC}).result(30)
        assert group not in [g.group_id for g in classic.valid]
        # `sluice group describe` and `group list` show the members too.
        out = server.cli("group", "describe", group).stdout.decode()
        assert "State: Stable\tMembers: 2" in out, out
        for name, parts in described.items():
            row = next((l for l in out.splitlines() if f" {name} " in l), None)
            assert row is not None, out
            assert row.rstrip().endswith(f"{topic}:" + ",".join(map(str, sorted(parts)))), (row, parts)
        listed = server.cli("group", "list").stdout.decode()
        row = next(l for l in listed.splitlines() if l.startswith(group))
        assert row.split()[1:] == ["Stable", "2"], row
        # Its offsets cannot be reset under its members' feet.
        reset = server.cli("group", "reset-offsets", group, "--topic", topic, "--to-earliest", "--execute",
                           check=False)
        assert reset.returncode != 0 and b"2 active member(s)" in reset.stderr, reset
    finally:
        a.close()
        b.close()


MEMBER_SCRIPT = r"""
import sys
from confluent_kafka import Consumer
bootstrap, group, topic = sys.argv[1:4]
c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "group.protocol": "consumer",
              "client.id": "doomed", "auto.offset.reset": "earliest", "enable.auto.commit": False})
owned = set()
def on_assign(consumer, partitions):
    owned.update(p.partition for p in partitions)
    print("owned", sorted(owned), flush=True)
def on_revoke(consumer, partitions):
    owned.difference_update(p.partition for p in partitions)
    print("owned", sorted(owned), flush=True)
c.subscribe([topic], on_assign=on_assign, on_revoke=on_revoke)
while True:
    c.poll(0.2)
"""


def test_a_killed_member_loses_its_partitions_after_the_session_timeout(server):
    topic, group = unique("kip848-kill"), unique("kip848-kill-group")
    create_topic(server.bootstrap, topic)
    produce(server.bootstrap, topic, 0, 60)
    doomed = subprocess.Popen([sys.executable, "-c", MEMBER_SCRIPT, server.bootstrap, group, topic],
                              stdout=subprocess.PIPE, text=True)
    a = None
    try:
        # Wait until the doomed member owns everything, then a second joins.
        # Its lines are read in a thread, so a silent child cannot hang us.
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(l) for l in doomed.stdout], daemon=True).start()
        deadline = time.monotonic() + 45
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail("the doomed member never owned every partition")
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                continue
            if line.strip() == f"owned {list(range(PARTITIONS))}":
                break
        a = Member("a", server.bootstrap, group, topic, PROTOCOL).start()
        wait_until(lambda: len(a.current()) == PARTITIONS // 2, 45, what="a owns half the partitions")
        os.kill(doomed.pid, signal.SIGKILL)
        killed = time.monotonic()
        doomed.wait(10)
        # No leave was sent: the broker notices only when the session ends.
        wait_until(lambda: a.current() == set(range(PARTITIONS)), 30, what="a owns every partition")
        took = time.monotonic() - killed
        print(f"[kip848] the survivor owned every partition {took:.1f} s after the kill (session 6 s)")
        assert took >= 5.0, f"partitions moved {took:.1f} s after a kill, before the 6 s session ended"
    finally:
        if doomed.poll() is None:
            doomed.kill()
            doomed.wait(10)
        if a is not None:
            a.close()

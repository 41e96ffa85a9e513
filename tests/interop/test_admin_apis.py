"""Admin APIs that operators' tools script against, through kafka-python's
KafkaAdminClient (the Python client whose admin API has them):
DescribeLogDirs (partition sizes and disk space per broker, what disk-usage
dashboards and Cruise Control read) and OffsetDelete (forget a group's
committed offsets of some partitions, refused for topics a live consumer of
the group subscribes to), AlterPartitionReassignments and
ListPartitionReassignments (what kafka-reassign-partitions drives: start,
list, cancel and complete a move) and ElectLeaders (preferred leader
election, also through confluent-kafka's AdminClient, which asks for every
partition with a null list). Single node and three-node cluster.
"""

import os
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, ElectionType, Producer
from confluent_kafka import TopicPartition as CTP
from confluent_kafka.admin import AdminClient
from kafka import TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.errors import GroupIdNotFoundError

from kutil import unique
from test_transactions import create

RECORDS, SIZE = 200, 4096


@pytest.fixture
def kadmin(broker):
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=30000)
    yield admin
    admin.close()


def partition_sizes(reply, topic):
    """{partition: size} of `topic` in one broker's DescribeLogDirs reply."""
    (d,) = reply["log_dirs"]
    return {p["partition_index"]: p["partition_size"]
            for t in d["topics"] if t["name"] == topic for p in t["partitions"]}


def test_describe_log_dirs_reports_each_replicas_size_and_the_disk(broker, kadmin):
    topic = unique("dirs")
    create(broker.bootstrap, topic, partitions=2)
    p = Producer({"bootstrap.servers": broker.bootstrap, "compression.type": "none", "linger.ms": 5})
    for _ in range(RECORDS):
        p.produce(topic, value=os.urandom(SIZE), partition=0)
    assert p.flush(30) == 0
    replicas = 0
    deadline = time.monotonic() + 30
    while True:
        replies = kadmin.describe_log_dirs({topic: [0, 1]})
        sized = [partition_sizes(r, topic) for r in replies]
        # Followers may still be fetching the last batches.
        if all(not s or s.get(0, 0) >= RECORDS * SIZE for s in sized) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for reply, sizes in zip(replies, sized):
        (d,) = reply["log_dirs"]
        assert d["error_code"] == 0, d
        assert d["total_bytes"] > d["usable_bytes"] > 0, d
        assert Path(d["log_dir"]).is_absolute(), d["log_dir"]
        if not sizes:
            continue
        replicas += 1
        # The records and their batch and record headers; nothing else.
        assert RECORDS * SIZE <= sizes[0] <= RECORDS * (SIZE + 100), sizes
        assert sizes[1] == 0, sizes
    assert replicas == (3 if os.environ.get("SLUICE_INTEROP_CLUSTER") else 1), replies
    # Every partition when none is named; a partition no broker stores is left out.
    everything = kadmin.describe_log_dirs()
    assert any(partition_sizes(r, topic) for r in everything)
    assert not any(partition_sizes(r, topic).get(7) for r in kadmin.describe_log_dirs({topic: [7]}))


def committed(kadmin, group):
    offsets = kadmin.list_group_offsets(group)[group]
    return {(tp.topic, tp.partition): m.offset for tp, m in offsets.items() if m.offset >= 0}


def test_offset_delete_spares_the_topics_a_live_consumer_subscribes_to(broker, kadmin):
    read, other = unique("read"), unique("other")
    create(broker.bootstrap, read, other, partitions=1)
    group = unique("g")
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group,
                  "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    try:
        c.subscribe([read])
        deadline = time.monotonic() + 30
        while not c.assignment() and time.monotonic() < deadline:
            c.poll(0.2)
        assert c.assignment(), "the consumer never joined"
        c.commit(offsets=[CTP(read, 0, 5), CTP(other, 0, 7)], asynchronous=False)
        assert committed(kadmin, group) == {(read, 0): 5, (other, 0): 7}
        result = kadmin.delete_group_offsets(group, [TopicPartition(read, 0), TopicPartition(other, 0)])
        assert {(tp.topic, e.__name__) for tp, e in result.items()} == {
            (read, "GroupSubscribedToTopicError"), (other, "NoError")}, result
        assert committed(kadmin, group) == {(read, 0): 5}
    finally:
        c.close()
    # The consumer left: the group is Empty and loses the rest too.
    result = kadmin.delete_group_offsets(group, [TopicPartition(read, 0)])
    assert [e.__name__ for e in result.values()] == ["NoError"], result
    assert committed(kadmin, group) == {}
    # Empty with no offsets left: the group is gone, as on Kafka.
    assert group not in [g["group_id"] for g in kadmin.list_groups()]
    with pytest.raises(GroupIdNotFoundError):
        kadmin.delete_group_offsets(group, [TopicPartition(read, 0)])
    with pytest.raises(GroupIdNotFoundError):
        kadmin.delete_group_offsets(unique("nobody"), [TopicPartition(read, 0)])


CLUSTER = bool(os.environ.get("SLUICE_INTEROP_CLUSTER"))
ELECTION_NOT_NEEDED, PREFERRED = 84, 0


def placement(kadmin, topic, partition=0):
    """(replicas, isr, leader) of a partition, as Metadata tells it."""
    (t,) = kadmin.describe_topics([topic])
    (p,) = [p for p in t["partitions"] if p["partition_index"] == partition]
    return p["replica_nodes"], p["isr_nodes"], p["leader_id"]


def confluent_admin(broker):
    return AdminClient({"bootstrap.servers": broker.bootstrap})


def election_codes(response):
    return {(r.topic, p.partition_id): p.error_code
            for r in response.replica_election_results for p in r.partition_result}


def produce_some(bootstrap, topic, n=100):
    p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5})
    for i in range(n):
        p.produce(topic, key=str(i).encode(), value=str(i).encode(), partition=0)
    assert p.flush(30) == 0


def read_all(bootstrap, topic, n):
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("g"), "auto.offset.reset": "earliest",
                  "enable.auto.commit": False})
    c.assign([CTP(topic, 0, 0)])
    values = []
    deadline = time.monotonic() + 30
    while len(values) < n and time.monotonic() < deadline:
        m = c.poll(0.5)
        if m is not None and not m.error():
            values.append(m.value().decode())
    c.close()
    return values


def test_reordered_replicas_and_a_preferred_election_move_the_leader(broker, kadmin):
    """kafka-reassign-partitions' reorder then kafka-leader-election's
    preferred election: the new first replica leads, and a second election
    is not needed. One node can only keep its one replica."""
    topic = unique("elect")
    create(broker.bootstrap, topic, partitions=1)
    produce_some(broker.bootstrap, topic)
    tp = TopicPartition(topic, 0)
    replicas, isr, leader = placement(kadmin, topic)
    assert leader == replicas[0]
    if CLUSTER:
        # Every replica in sync: a reorder completes at once, the leader stays.
        reordered = replicas[1:] + replicas[:1]
        assert kadmin.alter_partition_reassignments({tp: reordered}) == {tp: None}
        assert placement(kadmin, topic)[0] == reordered
        assert placement(kadmin, topic)[2] == leader
        response = kadmin.elect_leaders(PREFERRED, {topic: [0]})
        assert election_codes(response) == {(topic, 0): 0}
        assert placement(kadmin, topic)[2] == reordered[0]
        # The moved leader serves everything written before the move.
        assert read_all(broker.bootstrap, topic, 100) == [str(i) for i in range(100)]
        # And back, with confluent-kafka's AdminClient this time.
        assert kadmin.alter_partition_reassignments({tp: replicas}) == {tp: None}
        ca = confluent_admin(broker)
        result = ca.elect_leaders(ElectionType.PREFERRED, [CTP(topic, 0)]).result(30)
        assert result == {CTP(topic, 0): None}, result
        assert placement(kadmin, topic)[2] == replicas[0]
    else:
        assert kadmin.alter_partition_reassignments({tp: replicas}) == {tp: None}
        refused = kadmin.alter_partition_reassignments({tp: [replicas[0] + 1]})
        assert refused[tp].__name__ == "InvalidReplicationAssignmentError", refused
    again = kadmin.elect_leaders(PREFERRED, {topic: [0], unique("missing"): [0]}, raise_errors=False)
    codes = election_codes(again)
    assert codes[(topic, 0)] == ELECTION_NOT_NEEDED, codes
    assert 3 in codes.values(), codes  # UNKNOWN_TOPIC_OR_PARTITION
    # librdkafka asks for every partition with a null list: only partitions
    # an election was needed for are answered, so not this one.
    ca = confluent_admin(broker)  # kept: the futures need their client
    everything = ca.elect_leaders(ElectionType.PREFERRED, None).result(30)
    assert CTP(topic, 0) not in everything, everything
    (refused,) = ca.elect_leaders(ElectionType.PREFERRED, [CTP(topic, 0)]).result(30).values()
    assert refused is not None and refused.code() == ELECTION_NOT_NEEDED, refused
    assert kadmin.list_partition_reassignments() == {}
    cancelled = kadmin.alter_partition_reassignments({tp: None})
    assert cancelled[tp].__name__ == "NoReassignmentInProgressError", cancelled


def stored_size(kadmin, topic, broker_id):
    """The size of `topic`-0 on one broker, None when it holds no replica."""
    (reply,) = kadmin.describe_log_dirs({topic: [0]}, brokers=[broker_id])
    return partition_sizes(reply, topic).get(0)


@pytest.mark.skipif(not CLUSTER, reason="a move needs another broker")
def test_a_move_onto_a_stopped_broker_is_listed_cancelled_and_completes_once_it_is_back(broker, kadmin):
    """ListPartitionReassignments shows a move in progress with its adding and
    removing replicas; cancelling restores the origin; a move that can
    complete copies the log onto the new replica before dropping the old."""
    topic = unique("move")
    create(broker.bootstrap, topic, partitions=1)
    produce_some(broker.bootstrap, topic)
    tp = TopicPartition(topic, 0)
    replicas, _, _ = placement(kadmin, topic)
    # The broker the partition moves onto is stopped meanwhile: not the
    # controller, which the admin client sends its requests to.
    controller = kadmin.describe_cluster()["controller_id"]
    away = next(r for r in reversed(replicas) if r != controller)
    stay = [r for r in replicas if r != away]
    assert kadmin.alter_partition_reassignments({tp: stay}) == {tp: None}
    assert placement(kadmin, topic)[0] == stay
    node = broker.nodes[away - 1]
    node.stop()
    target = [away, stay[0]]
    try:
        assert kadmin.alter_partition_reassignments({tp: target}) == {tp: None}
        listed = kadmin.list_partition_reassignments()
        assert listed == {tp: {"replicas": [away, stay[0], stay[1]],
                               "adding_replicas": [away], "removing_replicas": [stay[1]]}}, listed
        assert kadmin.list_partition_reassignments([tp]) == listed
        assert kadmin.list_partition_reassignments({unique("missing"): [0]}) == {}
        assert kadmin.alter_partition_reassignments({tp: None}) == {tp: None}
        assert kadmin.list_partition_reassignments() == {}
        assert placement(kadmin, topic)[0] == stay
        # Again, and this time the stopped broker comes back and catches up.
        assert kadmin.alter_partition_reassignments({tp: target}) == {tp: None}
    finally:
        node.start()
        broker.wait_healthy()
    # A new client: this one's metadata lost the stopped broker.
    kadmin.close()
    kadmin = KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=30000)
    deadline = time.monotonic() + 30
    while kadmin.list_partition_reassignments() and time.monotonic() < deadline:
        time.sleep(0.3)
    assert kadmin.list_partition_reassignments() == {}
    new_replicas, isr, _ = placement(kadmin, topic)
    assert new_replicas == target and sorted(isr) == sorted(target), (new_replicas, isr)
    # The new replica holds the same bytes as the one that stayed.
    deadline = time.monotonic() + 30
    while stored_size(kadmin, topic, away) != stored_size(kadmin, topic, stay[0]) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert stored_size(kadmin, topic, away) == stored_size(kadmin, topic, stay[0]) >= 100 * 2
    assert read_all(broker.bootstrap, topic, 100) == [str(i) for i in range(100)]
    kadmin.close()

"""Kafka transactions with confluent-kafka's transactional producer (init,
begin, produce, commit, abort) and read_committed / read_uncommitted
consumers: atomic visibility across topics and partitions, the last stable
offset holding read_committed readers while a transaction is open, zombie
fencing, the coordinator aborting a transaction past its timeout, `kill -9`
with one transaction committed and one left open, and exactly-once
consume-transform-produce. In the cluster (SLUICE_INTEROP_CLUSTER=1) the
partitions are led by different nodes, so markers travel between nodes, and
the coordinator's node and a partition leader are killed mid-stream.
"""

import os
import re
import signal
import threading
import time
import uuid

import pytest
from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from kutil import RF, unique, wait_until


def create(bootstrap, *topics, partitions=3):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(t, num_partitions=partitions, replication_factor=RF) for t in topics])
    for f in futures.values():
        f.result(30)


def producer(bootstrap, tid, **conf):
    p = Producer({"bootstrap.servers": bootstrap, "transactional.id": tid, "linger.ms": 5, **conf})
    p.init_transactions(60)
    return p


def read(bootstrap, topics, isolation, expect=None, quiet_s=3.0, timeout=60.0):
    """Every value of `topics` a consumer with `isolation` reads: until
    `expect` values came, or nothing came for `quiet_s` (after reaching each
    partition's end)."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": uuid.uuid4().hex,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": isolation,
        }
    )
    c.subscribe(list(topics))
    got = []
    deadline = time.monotonic() + timeout
    last = time.monotonic()
    try:
        while time.monotonic() < deadline:
            m = c.poll(0.2)
            if m is None:
                if expect is not None and len(got) >= expect:
                    break
                if expect is None and time.monotonic() - last > quiet_s:
                    break
                continue
            if m.error():
                continue
            got.append(m.value().decode())
            last = time.monotonic()
    finally:
        c.close()
    return got


def test_committed_transactions_are_visible_whole_and_aborted_ones_never(broker):
    a, b = unique("txa"), unique("txb")
    create(broker.bootstrap, a, b)
    p = producer(broker.bootstrap, unique("tid"))
    committed, aborted = [], []
    for round_ in range(4):
        p.begin_transaction()
        values = [f"r{round_}-{i}" for i in range(20)]
        for i, v in enumerate(values):
            p.produce(a if i % 2 else b, key=f"k{i}", value=v)
        if round_ % 2:
            p.flush()
            p.abort_transaction(30)
            aborted += values
        else:
            p.commit_transaction(30)
            committed += values
    got = read(broker.bootstrap, [a, b], "read_committed", expect=len(committed))
    assert sorted(got) == sorted(committed), "read_committed: exactly the committed records"
    # A quiet spell after: nothing aborted trickles in.
    assert sorted(read(broker.bootstrap, [a, b], "read_committed")) == sorted(committed)
    everything = read(broker.bootstrap, [a, b], "read_uncommitted", expect=len(committed) + len(aborted))
    assert sorted(everything) == sorted(committed + aborted), "read_uncommitted sees aborted records too"


def test_an_open_transaction_holds_read_committed_readers_at_its_start(broker):
    topic = unique("txlso")
    create(broker.bootstrap, topic, partitions=1)
    plain = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all"})
    plain.produce(topic, value="before")
    plain.flush(30)
    p = producer(broker.bootstrap, unique("tid"))
    p.begin_transaction()
    p.produce(topic, value="in-transaction")
    p.flush(30)
    # Written after the open transaction began: above the last stable offset.
    plain.produce(topic, value="after")
    plain.flush(30)
    assert read(broker.bootstrap, [topic], "read_committed") == ["before"]
    assert sorted(read(broker.bootstrap, [topic], "read_uncommitted", expect=3)) == ["after", "before", "in-transaction"]
    p.commit_transaction(30)
    assert read(broker.bootstrap, [topic], "read_committed", expect=3) == ["before", "in-transaction", "after"]


def test_a_new_instance_fences_the_old_one(broker):
    topic = unique("txfence")
    create(broker.bootstrap, topic, partitions=2)
    tid = unique("tid")
    old = producer(broker.bootstrap, tid)
    old.begin_transaction()
    old.produce(topic, value="zombie")
    old.flush(30)
    # The new instance's init aborts the old one's open transaction.
    new = producer(broker.bootstrap, tid)
    with pytest.raises(KafkaException) as fenced:
        old.produce(topic, value="zombie-2")
        old.commit_transaction(30)
    assert fenced.value.args[0].fatal() or "fenced" in str(fenced.value).lower(), fenced.value
    new.begin_transaction()
    new.produce(topic, value="new")
    new.commit_transaction(30)
    assert read(broker.bootstrap, [topic], "read_committed", expect=1) == ["new"]
    assert read(broker.bootstrap, [topic], "read_committed") == ["new"]


def test_a_transaction_past_its_timeout_is_aborted_by_the_coordinator(broker):
    topic = unique("txtimeout")
    create(broker.bootstrap, topic, partitions=1)
    p = producer(broker.bootstrap, unique("tid"), **{"transaction.timeout.ms": 2000})
    p.begin_transaction()
    p.produce(topic, value="abandoned")
    p.flush(30)
    plain = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all"})
    plain.produce(topic, value="later")
    plain.flush(30)
    # Once the coordinator aborts it, the stable offset moves past it.
    got = read(broker.bootstrap, [topic], "read_committed", expect=1, timeout=30)
    assert got == ["later"]
    with pytest.raises(KafkaException):
        p.commit_transaction(30)


def test_kill9_keeps_committed_transactions_and_aborts_the_open_one(broker):
    topic = unique("txcrash")
    create(broker.bootstrap, topic)
    done = producer(broker.bootstrap, unique("tid"))
    done.begin_transaction()
    for i in range(30):
        done.produce(topic, key=str(i), value=f"committed-{i}")
    done.commit_transaction(30)
    # Its markers are written after the commit is answered: wait for them.
    assert len(read(broker.bootstrap, [topic], "read_committed", expect=30)) == 30
    open_ = producer(broker.bootstrap, unique("tid"), **{"transaction.timeout.ms": 3000})
    open_.begin_transaction()
    for i in range(10):
        open_.produce(topic, key=str(i), value=f"open-{i}")
    open_.flush(30)
    broker.kill9()
    broker.start()
    # The restarted coordinator finds the transaction open and aborts it at
    # its timeout; the committed one is intact.
    got = read(broker.bootstrap, [topic], "read_committed", expect=30, timeout=60)
    assert sorted(got) == sorted(f"committed-{i}" for i in range(30))
    plain = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all"})
    plain.produce(topic, key="0", value="after-restart")
    plain.flush(30)
    got = read(broker.bootstrap, [topic], "read_committed", expect=31, timeout=60)
    assert sorted(got) == sorted([f"committed-{i}" for i in range(30)] + ["after-restart"])


def test_consume_transform_produce_is_exactly_once_when_the_processor_dies(broker):
    """Kafka's exactly-once loop: read with read_committed, write the results
    and the consumed offsets in one transaction. The first processor dies
    with a transaction open (results written, offsets sent, no commit); the
    next one, with the same transactional id, fences it, resumes from the
    committed offsets, and the output holds every input once."""
    src, dst = unique("eos-in"), unique("eos-out")
    create(broker.bootstrap, src, dst, partitions=2)
    inputs = [f"v{i}" for i in range(120)]
    plain = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all"})
    for i, v in enumerate(inputs):
        plain.produce(src, key=str(i % 7), value=v)
    plain.flush(30)
    group, tid = unique("eos-group"), unique("eos-tid")

    def run(batches, die=False):
        c = Consumer(
            {
                "bootstrap.servers": broker.bootstrap,
                "group.id": group,
                "isolation.level": "read_committed",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        c.subscribe([src])
        p = producer(broker.bootstrap, tid)
        done, idle = 0, 0
        while done < batches and idle < 10:
            msgs = [m for m in c.consume(25, timeout=1.0) if not m.error()]
            if not msgs:
                idle += 1
                continue
            idle = 0
            p.begin_transaction()
            for m in msgs:
                p.produce(dst, key=m.key(), value=b"out-" + m.value())
            p.send_offsets_to_transaction(c.position(c.assignment()), c.consumer_group_metadata(), 30)
            if die and done == batches - 1:
                p.flush(30)
                c.close()
                return p  # dies here: the transaction stays open
            p.commit_transaction(30)
            done += 1
        c.close()
        return p

    zombie = run(3, die=True)
    run(1000)
    with pytest.raises(KafkaException):
        zombie.commit_transaction(30)
    got = read(broker.bootstrap, [dst], "read_committed", expect=len(inputs))
    assert sorted(got) == sorted(f"out-{v}" for v in inputs), "every input once"
    assert sorted(read(broker.bootstrap, [dst], "read_committed")) == sorted(f"out-{v}" for v in inputs)


def rows(out, header):
    """The whitespace-split rows of the CLI table whose header starts with `header`."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == [header])
    table = []
    for line in lines[start + 1:]:
        if not line.strip() or line.rstrip().endswith(":"):
            break
        table.append(line.split())
    return table


def listed(broker, *args):
    """{transactional id: (producer id, state)} from `sluice transaction list`."""
    out = broker.cli("transaction", "list", *args).stdout.decode()
    return {r[0]: (int(r[2]), r[3]) for r in rows(out, "TRANSACTIONAL-ID")}


def described(broker, tid):
    """(producer id, epoch, state, partitions) from `sluice transaction describe`."""
    out = broker.cli("transaction", "describe", tid).stdout.decode()
    (row,) = rows(out, "TRANSACTIONAL-ID")
    assert row[0] == tid, out
    return int(row[2]), int(row[3]), row[4], row[8]


def topic_producers(broker, topic):
    """{partition: {producer id: (epoch, last sequence, txn start or None)}} from `sluice topic describe`."""
    out = broker.cli("topic", "describe", topic).stdout.decode()
    if "Producers: none" in out:
        return {}
    found = {}
    for r in rows(out.split("Producers:", 1)[1], "PARTITION"):
        found.setdefault(int(r[0]), {})[int(r[1])] = (int(r[2]), int(r[3]), None if r[5] == "-" else int(r[5]))
    return found


def test_sluice_transaction_and_topic_describe_follow_an_open_transaction(broker):
    """The real binary's `sluice transaction list|describe` and `sluice topic
    describe` while a confluent-kafka transactional producer has a
    transaction open on two of three partitions, and after it commits."""
    topic = unique("txcli")
    create(broker.bootstrap, topic)
    tid = unique("tid")
    p = producer(broker.bootstrap, tid)
    pid, state = listed(broker)[tid]
    assert state == "Empty" and pid >= 0
    assert topic_producers(broker, topic) == {}, "no producer wrote yet"

    p.begin_transaction()
    for i in range(3):
        p.produce(topic, partition=0, value=f"p0-{i}")
    p.produce(topic, partition=2, value="p2")
    p.flush(30)
    assert listed(broker)[tid] == (pid, "Ongoing")
    assert tid in listed(broker, "--state", "Ongoing", "--state", "PrepareCommit")
    assert tid not in listed(broker, "--state", "CompleteCommit")
    assert set(listed(broker, "--producer-id", str(pid))) == {tid}
    assert tid in listed(broker, "--duration-ms", "0")
    assert tid not in listed(broker, "--duration-ms", "3600000")
    # --pattern: the whole id must match the regular expression.
    assert set(listed(broker, "--pattern", re.escape(tid))) == {tid}
    assert tid in listed(broker, "--pattern", "tid.*")
    assert tid not in listed(broker, "--pattern", "tid")
    d_pid, epoch, state, partitions = described(broker, tid)
    assert (d_pid, state, partitions) == (pid, "Ongoing", f"{topic}:0,2")
    producers = topic_producers(broker, topic)
    assert set(producers) == {0, 2}, producers
    assert producers[0] == {pid: (epoch, 2, 0)}, "three records from offset 0, transaction open at 0"
    assert producers[2] == {pid: (epoch, 0, 0)}

    p.commit_transaction(30)
    # The coordinator completes the commit once the markers are written.
    wait_until(lambda: listed(broker)[tid] == (pid, "CompleteCommit"), 30, what="CompleteCommit")
    assert described(broker, tid)[1:3] == (epoch, "CompleteCommit")
    after = wait_until(
        lambda: (lambda ps: ps if all(s[2] is None for part in ps.values() for s in part.values()) else None)(
            topic_producers(broker, topic)
        ),
        30,
        what="no open transaction in the topic",
    )
    assert after == {0: {pid: (epoch, 2, None)}, 2: {pid: (epoch, 0, None)}}

    missing = broker.cli("transaction", "describe", tid, "no-such-tid", check=False)
    assert missing.returncode != 0
    assert 'transactional id "no-such-tid" not found' in missing.stderr.decode(), missing.stderr
    assert tid in missing.stdout.decode(), "the known id is still described"


def test_describe_producers_from_kafka_python(broker):
    """kafka-python's KafkaAdminClient (KIP-664 tooling) against the same
    APIs: DescribeProducers on each partition's leader shows an open
    transaction's first offset, an unknown partition is refused, and in the
    cluster a node that does not lead the partition answers
    NOT_LEADER_OR_FOLLOWER."""
    import kafka.errors as Errors
    from kafka import TopicPartition as KTP
    from kafka.admin import KafkaAdminClient

    topic = unique("txkp")
    create(broker.bootstrap, topic, partitions=2)
    plain = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all"})
    plain.produce(topic, partition=1, value="plain")
    plain.flush(30)
    tid = unique("tid")
    p = producer(broker.bootstrap, tid)
    p.begin_transaction()
    p.produce(topic, partition=1, value="in-transaction")
    p.flush(30)

    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap.split(","))
    try:
        described_ = admin.describe_transactions([tid])[tid]
        assert described_.state.value == "Ongoing"
        assert described_.topic_partitions == {KTP(topic, 1)}
        listings = [t for per_broker in admin.list_transactions().values() for t in per_broker]
        assert [(t.producer_id, t.state.value) for t in listings if t.transactional_id == tid] == [
            (described_.producer_id, "Ongoing")
        ]

        states = admin.describe_producers([KTP(topic, 0), KTP(topic, 1)])
        assert states[KTP(topic, 0)].active_producers == []
        (state,) = states[KTP(topic, 1)].active_producers
        assert (state.producer_id, state.producer_epoch) == (described_.producer_id, described_.producer_epoch)
        assert state.current_transaction_start_offset == 1, "after the plain record at 0"
        assert state.last_sequence == 0 and state.last_timestamp > 0

        metadata = AdminClient({"bootstrap.servers": broker.bootstrap}).list_topics(topic, timeout=10)
        leader = metadata.topics[topic].partitions[1].leader
        with pytest.raises(Errors.UnknownTopicOrPartitionError):
            admin.describe_producers([KTP(topic, 5)], broker_id=leader)
        others = [n for n in metadata.brokers if n != leader]
        assert len(others) == RF - 1
        for other in others:
            with pytest.raises(Errors.NotLeaderForPartitionError):
                admin.describe_producers([KTP(topic, 1)], broker_id=other)
    finally:
        admin.close()
    p.commit_transaction(30)


@pytest.mark.skipif(
    not os.environ.get("SLUICE_INTEROP_CLUSTER"),
    reason="needs the three-node cluster (SLUICE_INTEROP_CLUSTER=1)",
)
def test_transactions_stay_atomic_when_the_coordinator_and_a_leader_are_killed(broker):
    """A transactional producer commits transaction after transaction of ten
    records over three partitions while the node coordinating transactions
    is killed and restarted, and then a node leading a partition. Read
    committed afterwards: every transaction the producer saw committed is
    there whole, every transaction there is whole, and no record twice."""
    topic = unique("txfault")
    create(broker.bootstrap, topic)
    per_txn = 10
    committed, stop = set(), threading.Event()
    errors = []

    def produce():
        tid = unique("tid")
        p = producer(broker.bootstrap, tid, **{"transaction.timeout.ms": 10000})
        t = 0
        while not stop.is_set():
            t += 1
            try:
                p.begin_transaction()
                for i in range(per_txn):
                    p.produce(topic, key=f"{t}-{i}", value=f"t{t}-{i}")
                p.commit_transaction(60)
                committed.add(t)
            except KafkaException as e:
                err = e.args[0]
                errors.append(str(err))
                try:
                    if err.txn_requires_abort():
                        p.abort_transaction(60)
                    elif not err.retriable():
                        p = producer(broker.bootstrap, tid, **{"transaction.timeout.ms": 10000})
                except KafkaException as again:
                    errors.append(str(again))
                    p = producer(broker.bootstrap, tid, **{"transaction.timeout.ms": 10000})
            time.sleep(0.01)

    def leader(topic_name, partition):
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        return admin.list_topics(topic_name, timeout=10).topics[topic_name].partitions[partition].leader

    def kill_and_restart(node_id):
        node = broker.nodes[node_id - 1]
        os.kill(node.proc.pid, signal.SIGKILL)
        node._kill_proc()
        time.sleep(4.0)
        node.start()
        broker.wait_healthy()

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    time.sleep(2.0)
    coordinator = leader("__transaction_state", 0)
    kill_and_restart(coordinator)
    time.sleep(2.0)
    data_leader = leader(topic, 1)
    kill_and_restart(data_leader)
    time.sleep(2.0)
    stop.set()
    thread.join(120)
    assert not thread.is_alive(), "the producer did not stop"
    assert len(committed) > 20, f"too few transactions committed: {len(committed)}; errors {errors[:5]}"

    got = read(broker.bootstrap, [topic], "read_committed", quiet_s=5.0, timeout=120)
    assert len(got) == len(set(got)), "a record twice"
    by_txn = {}
    for v in got:
        t, i = v[1:].split("-")
        by_txn.setdefault(int(t), set()).add(int(i))
    partial = {t: sorted(i) for t, i in by_txn.items() if len(i) != per_txn}
    assert not partial, f"transactions seen in part: {partial}"
    lost = committed - set(by_txn)
    assert not lost, f"committed transactions missing: {sorted(lost)[:10]}"
    print(
        f"[txn-faults] {len(committed)} committed, {len(by_txn)} visible, coordinator {coordinator} "
        f"and leader {data_leader} killed; producer errors {len(errors)}"
    )

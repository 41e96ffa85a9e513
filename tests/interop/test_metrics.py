"""GET /metrics during a produce/consume run, parsed by the Prometheus
project's own Python client (its OpenMetrics parser refuses malformed
exposition): the series exist and move with what the clients did — the
records produced are the partitions' log end offsets, the Kafka request
histograms count the produce requests, a consumer group's lag is what it has
not committed and falls to zero once it caught up, what consumers fetched
is counted per topic, requests are counted by API and error code. Against a
cluster every node is scraped: a partition shows on each of its replicas, a
group's lag on the node that coordinates it, the metadata quorum's Raft
state on every node. `--metrics false` keeps the data path's figures still.
"""

import os

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from kutil import consume_and_commit, metric_samples as samples, scrape_metrics as scrape, unique, wait_until, RF

PARTITIONS = 3
RECORDS = 3000


def http_addresses(broker):
    nodes = getattr(broker, "nodes", None)
    return [n.http for n in nodes] if nodes else [broker.http]


def scrape_all(broker):
    return [scrape(h) for h in http_addresses(broker)]


def produce_requests(nodes):
    return sum(
        s.value for f in nodes
        for s in samples(f, "sluice_kafka_request_duration_seconds",
                         "sluice_kafka_request_duration_seconds_count", api="Produce")
    )


def requests(nodes, api, error):
    return sum(
        s.value for f in nodes
        for s in samples(f, "sluice_kafka_requests", "sluice_kafka_requests_total", api=api, error=error)
    )


def topic_total(nodes, family, topic):
    return sum(s.value for f in nodes for s in samples(f, family, topic=topic))


def end_offsets(nodes, topic):
    """Each partition's log end offset, the most any replica has."""
    ends = {}
    for f in nodes:
        for s in samples(f, "sluice_partition_log_end_offset", topic=topic):
            p = int(s.labels["partition"])
            ends[p] = max(ends.get(p, 0), s.value)
    return ends


def group_lag(nodes, group):
    lags = [s.value for f in nodes for s in samples(f, "sluice_consumer_group_lag", group=group)]
    return lags[0] if lags else None


def test_metrics_follow_a_produce_and_consume_run(broker):
    topic, group = unique("metrics"), unique("metrics-group")
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    for f in admin.create_topics([NewTopic(topic, PARTITIONS, RF)]).values():
        f.result(timeout=30)
    before = scrape_all(broker)
    assert all(f["process_resident_memory_bytes"][0].value > 0 for f in before)
    assert all(f["process_open_fds"][0].value > 0 for f in before)
    assert all(samples(f, "sluice_build") for f in before)
    produced_before = produce_requests(before)
    produce_ok_before = requests(before, "Produce", "NONE")

    producer = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all", "linger.ms": 5})
    for i in range(RECORDS):
        producer.produce(topic, key=str(i % 97), value=f"value-{i}")
        if i % 500 == 0:
            producer.poll(0)
    assert producer.flush(30) == 0

    def all_appended():
        nodes = scrape_all(broker)
        ends = end_offsets(nodes, topic)
        return nodes if len(ends) == PARTITIONS and sum(ends.values()) == RECORDS else None

    nodes = wait_until(all_appended, 30, what=f"{RECORDS} records in the end offsets")
    # Each partition's leader counts what producers appended to it.
    produced = sum(s.value for f in nodes for s in samples(f, "sluice_topic_produced_records", topic=topic))
    assert produced == RECORDS
    assert sum(s.value for f in nodes for s in samples(f, "sluice_topic_produced_bytes", topic=topic)) > RECORDS * 7
    # Durable acks=all produce went through group-commit flush rounds.
    flushes = sum(s.value for f in nodes for s in samples(
        f, "sluice_log_flush_duration_seconds", "sluice_log_flush_duration_seconds_count"))
    assert flushes > 0
    assert produce_requests(nodes) > produced_before, "produce requests were not counted"
    # Each partition of each produce response counted its error code.
    assert requests(nodes, "Produce", "NONE") > produce_ok_before
    for f in nodes:
        # Every histogram's count equals its +Inf bucket.
        for s in samples(f, "sluice_kafka_request_duration_seconds", "sluice_kafka_request_duration_seconds_count"):
            inf = samples(f, "sluice_kafka_request_duration_seconds",
                          "sluice_kafka_request_duration_seconds_bucket", api=s.labels["api"], le="+Inf")
            assert inf and inf[0].value == s.value, s
    hosted = sum(s.value for f in nodes for s in samples(f, "sluice_topic_partitions_hosted", topic=topic))
    assert hosted == PARTITIONS * RF
    assert any(s.value >= 1 for f in nodes for s in samples(f, "sluice_cluster_partitions", state="online"))

    consumer = Consumer({
        "bootstrap.servers": broker.bootstrap,
        "group.id": group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": 100,
    })
    try:
        consumer.subscribe([topic])
        half = RECORDS // 2
        consume_and_commit(consumer, half)
        # The committed offsets cover exactly what was consumed, and the lag
        # is what lies past them in the partitions committed to (a partition
        # never committed has no lag, as in kafka-consumer-groups).
        def committed_half():
            nodes = scrape_all(broker)
            committed = {}
            for f in nodes:
                for s in samples(f, "sluice_consumer_group_committed_offset", group=group):
                    committed[int(s.labels["partition"])] = s.value
            return (nodes, committed) if sum(committed.values()) == half else None

        nodes, committed = wait_until(committed_half, 30, what=f"commits covering {half} records")
        ends = end_offsets(nodes, topic)
        lag = sum(ends[p] - c for p, c in committed.items())
        assert lag > 0
        assert group_lag(nodes, group) == lag
        assert sum(s.value for f in nodes for s in samples(f, "sluice_kafka_connections")) >= 1
        consume_and_commit(consumer, RECORDS - half)
        wait_until(lambda: group_lag(scrape_all(broker), group) == 0, 30, what="lag 0")
        nodes = scrape_all(broker)
        committed = sum(s.value for f in nodes for s in samples(f, "sluice_consumer_group_committed_offset", group=group))
        assert committed == RECORDS
        # The partitions' leaders counted what the consumer's fetches returned
        # (a consumer may fetch ahead of what it took; followers' fetches do
        # not count, so replicas do not multiply it).
        fetched = topic_total(nodes, "sluice_topic_fetched_records", topic)
        assert RECORDS <= fetched < RECORDS * RF * 2, fetched
        fetched_bytes = topic_total(nodes, "sluice_topic_fetched_bytes", topic)
        assert fetched_bytes >= topic_total(nodes, "sluice_topic_produced_bytes", topic)
    finally:
        consumer.close()


def test_lag_covers_partitions_with_no_replica_on_the_coordinator(broker):
    """With one replica per partition, most partitions live on nodes other
    than the group's coordinator: it asks their leaders for the high
    watermark, so the lag still covers every partition."""
    if not getattr(broker, "nodes", None):
        pytest.skip("a cluster: partitions on nodes other than the coordinator")
    topic, group = unique("metrics-rf1"), unique("metrics-rf1-group")
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    for f in admin.create_topics([NewTopic(topic, PARTITIONS, 1)]).values():
        f.result(timeout=30)
    producer = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all"})
    for i in range(30 * PARTITIONS):
        producer.produce(topic, value=b"x", partition=i % PARTITIONS)
    assert producer.flush(30) == 0
    committer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group})
    try:
        committer.commit(offsets=[TopicPartition(topic, p, 10) for p in range(PARTITIONS)],
                         asynchronous=False)
    finally:
        committer.close()

    def coordinator_figures():
        for f in scrape_all(broker):
            lags = {int(s.labels["partition"]): s.value
                    for s in samples(f, "sluice_consumer_group_partition_lag", group=group)}
            if lags:
                return (f, lags) if len(lags) == PARTITIONS else None
        return None

    f, lags = wait_until(coordinator_figures, 30, what="the lag of every partition")
    hosted = samples(f, "sluice_partition_log_end_offset", topic=topic)
    assert len(hosted) < PARTITIONS, "every partition is on the coordinator: nothing was asked of a leader"
    # A node shows only the partitions it replicates (each is on one node).
    nodes = scrape_all(broker)
    assert sum(s.value for n in nodes for s in samples(n, "sluice_topic_partitions_hosted", topic=topic)) == PARTITIONS
    assert len([s for n in nodes for s in samples(n, "sluice_partition_log_end_offset", topic=topic)]) == PARTITIONS
    assert lags == {p: 20 for p in range(PARTITIONS)}
    assert group_lag([f], group) == 20 * PARTITIONS


def test_per_partition_series_can_be_switched_off(broker_factory):
    broker = broker_factory("no-partition-series", extra_args=("--partition-metrics", "false"))
    topic = unique("quiet")
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    for f in admin.create_topics([NewTopic(topic, 4, RF)]).values():
        f.result(timeout=30)
    producer = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all"})
    for i in range(100):
        producer.produce(topic, value=b"x", partition=i % 4)
    assert producer.flush(30) == 0

    def appended():
        nodes = scrape_all(broker)
        ends = [s.value for f in nodes for s in samples(f, "sluice_topic_end_offsets", topic=topic)]
        return nodes if ends and max(ends) == 100 else None

    nodes = wait_until(appended, 30, what="the topic's end offsets")
    for f in nodes:
        assert not any(name.startswith("sluice_partition_") for name in f), sorted(f)


def test_an_error_a_client_provokes_is_counted_by_api_and_code(broker):
    missing = unique("never-created")
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    before = requests(scrape_all(broker), "DeleteTopics", "UNKNOWN_TOPIC_OR_PARTITION")
    with pytest.raises(KafkaException) as refused:
        admin.delete_topics([missing], operation_timeout=10)[missing].result(timeout=30)
    # librdkafka's name for it is UNKNOWN_TOPIC_OR_PART; the number is Kafka's.
    assert refused.value.args[0].code() == KafkaError.UNKNOWN_TOPIC_OR_PART
    wait_until(
        lambda: requests(scrape_all(broker), "DeleteTopics", "UNKNOWN_TOPIC_OR_PARTITION") > before,
        30, what="the DeleteTopics error counted")
    # A label is Kafka's name of the code; every API served shows NONE.
    for f in scrape_all(broker):
        apis = {s.labels["api"] for s in samples(f, "sluice_kafka_requests", error="NONE")}
        assert {"Produce", "Fetch", "Metadata", "DeleteTopics", "JoinGroup"} <= apis, apis


@pytest.mark.skipif(not os.environ.get("SLUICE_INTEROP_CLUSTER"), reason="a single node has no Raft quorum")
def test_every_node_shows_the_metadata_quorum(broker):
    def agreed():
        nodes = scrape_all(broker)
        terms = [samples(f, "sluice_raft_term") for f in nodes]
        leaders = [samples(f, "sluice_raft_is_leader") for f in nodes]
        if not all(terms) or not all(leaders):
            return None
        if len({t[0].value for t in terms}) != 1:
            return None
        if sum(l[0].value for l in leaders) != 1:
            return None
        return nodes

    nodes = wait_until(agreed, 30, what="one Raft leader and one term on every node")
    for f in nodes:
        assert samples(f, "sluice_raft_term")[0].value >= 1
        assert samples(f, "sluice_raft_leader_changes", "sluice_raft_leader_changes_total")[0].value >= 1
        assert samples(f, "sluice_raft_last_applied_index")[0].value >= 1
        assert samples(f, "sluice_raft_last_log_index")[0].value >= samples(f, "sluice_raft_last_applied_index")[0].value


@pytest.mark.skipif(bool(os.environ.get("SLUICE_INTEROP_CLUSTER")), reason="cluster mode shows the quorum")
def test_a_single_node_shows_no_raft_series(broker):
    for f in scrape_all(broker):
        assert not any(name.startswith("sluice_raft_") for name in f), sorted(f)


# What the data path keeps itself, and so stops keeping with --metrics false.
HOT_PATH = (
    "sluice_kafka_request_duration_seconds",
    "sluice_kafka_requests",
    "sluice_topic_produced_records",
    "sluice_topic_produced_bytes",
    "sluice_topic_fetched_records",
    "sluice_topic_fetched_bytes",
    "sluice_log_flush_duration_seconds",
    "sluice_log_flush_records",
)


def hot_path(nodes):
    return [
        sorted((s.name, tuple(sorted(s.labels.items())), s.value) for name in HOT_PATH for s in f.get(name, []))
        for f in nodes
    ]


def test_hot_path_figures_can_be_switched_off(broker_factory):
    broker = broker_factory("no-hot-path-figures", extra_args=("--metrics", "false"))
    topic = unique("unmetered")
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    for f in admin.create_topics([NewTopic(topic, 2, RF)]).values():
        f.result(timeout=30)
    before = hot_path(scrape_all(broker))
    producer = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all"})
    for i in range(200):
        producer.produce(topic, value=b"x" * 100, partition=i % 2)
    assert producer.flush(30) == 0
    consumer = Consumer({
        "bootstrap.servers": broker.bootstrap,
        "group.id": unique("unmetered-group"),
        "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": 100,
    })
    try:
        consumer.subscribe([topic])
        consume_and_commit(consumer, 200)
    finally:
        consumer.close()

    def appended():
        nodes = scrape_all(broker)
        return nodes if topic_total(nodes, "sluice_topic_end_offsets", topic) >= 200 else None

    # What costs nothing is still there and moves.
    nodes = wait_until(appended, 30, what="the topic's end offsets")
    assert all(f["process_resident_memory_bytes"][0].value > 0 for f in nodes)
    assert all(samples(f, "sluice_cluster_partitions", state="online") for f in nodes)
    assert any(samples(f, "sluice_partition_log_end_offset", topic=topic) for f in nodes)
    assert hot_path(nodes) == before

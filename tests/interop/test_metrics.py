"""GET /metrics during a produce/consume run, parsed by the Prometheus
project's own Python client (its OpenMetrics parser refuses malformed
exposition): the series exist and move with what the clients did — the
records produced are the partitions' log end offsets, the Kafka request
histograms count the produce requests, a consumer group's lag is what it has
not committed and falls to zero once it caught up. Against a cluster every
node is scraped: a partition shows on each of its replicas, a group's lag
on the node that coordinates it.
"""

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from kutil import metric_samples as samples, scrape_metrics as scrape, unique, wait_until, RF

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


def consume(consumer, n, timeout=60):
    got = 0

    def more():
        nonlocal got
        for m in consumer.consume(num_messages=min(500, n - got), timeout=0.5):
            assert m.error() is None, m.error()
            got += 1
        return got >= n

    wait_until(more, timeout, interval=0, what=f"{n} records")
    consumer.commit(asynchronous=False)


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
        consume(consumer, half)
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
        consume(consumer, RECORDS - half)
        wait_until(lambda: group_lag(scrape_all(broker), group) == 0, 30, what="lag 0")
        nodes = scrape_all(broker)
        committed = sum(s.value for f in nodes for s in samples(f, "sluice_consumer_group_committed_offset", group=group))
        assert committed == RECORDS
    finally:
        consumer.close()


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

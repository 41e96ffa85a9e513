"""The Grafana dashboard (deploy/grafana/sluice-dashboard.json) against a real
Prometheus server scraping the broker: after a small produce/consume run with
a committed consumer group, a Kafka error and an AMQP queue, every panel's
query is sent to Prometheus's /api/v1/query (Grafana's variables
substituted). Every query must be valid PromQL, name only series the broker
exports, and the key panels (records and bytes in/out per topic, request
rate, p50/p99 latency, errors, flushes, topic sizes, consumer lag, AMQP
queues, process; Raft in cluster mode) must show data. The template
variables' label_values() queries must find the values the run created.

`promtool check metrics` lints one /metrics scrape. promtool (Prometheus 2.42,
Debian bookworm) reads only the Prometheus text format 0.0.4, not
OpenMetrics (it stops at the `info` type of `sluice_build`, and `# UNIT`,
`# EOF` and OpenMetrics's counter naming — family `x`, sample `x_total` —
mean nothing to it), so the scrape is first translated to the text format by
the Prometheus project's Python client (its OpenMetrics parser and its
text encoder, sample for sample) and promtool lints that.

Needs Debian's `prometheus` package (/usr/bin/prometheus and promtool;
scripts/test.sh setup installs it); skips without it. SLUICE_PROMETHEUS
points at another prometheus binary.
"""

import json
import math
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from conftest import _set_pdeathsig, free_port
from kutil import RF, consume_and_commit, unique, wait_until

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "sluice-dashboard.json"
HTTP_METRICS_RS = ROOT / "crates" / "sluice" / "src" / "http_metrics.rs"
PROMETHEUS = os.environ.get("SLUICE_PROMETHEUS", "/usr/bin/prometheus")
PROMTOOL = str(Path(PROMETHEUS).with_name("promtool"))
CLUSTER = bool(os.environ.get("SLUICE_INTEROP_CLUSTER"))

# Grafana's interval variables. Grafana makes $__rate_interval at least four
# scrape intervals (here 1s); a minute keeps the run's produce requests in
# the window of the rates the test reads.
INTERVAL = "1m"
PARTITIONS = 3
RECORDS = 2000
CONSUMED = RECORDS // 2
AMQP_MESSAGES = 10

needs_prometheus = pytest.mark.skipif(
    not os.access(PROMETHEUS, os.X_OK),
    reason=f"no Prometheus server at {PROMETHEUS} (apt-get install prometheus; scripts/test.sh setup does)",
)

# Panels (by title) that must show data after the run, every query of them.
KEY_PANELS = [
    "Nodes by state",
    "Controller",
    "Partitions by state",
    "Under-replicated partitions",
    "Offline partitions",
    "Partitions hosted per node",
    "Records in per topic",
    "Bytes in per topic",
    "Records out per topic",
    "Bytes out per topic",
    "Produce / Fetch request rate",
    "Produce / Fetch latency p50 / p99",
    "Produce p99 latency per node",
    "Requests by API",
    "Request p99 latency by API",
    "Errors by API and code",
    "Kafka connections",
    "Flush duration p50 / p99",
    "Records per flush",
    "Flush rounds",
    "Topic size (all replicas)",
    "Disk used per node",
    "Largest partitions",
    "Records appended per topic (end offsets)",
    "Lag per group",
    "Lag per partition",
    "Committed offset per partition",
    "Messages ready",
    "Messages unacknowledged",
    "Consumers",
    "Publish / deliver / ack rate",
    "Resident memory",
    "CPU",
    "Open file descriptors",
    "Version",
]
# The metadata quorum's Raft figures are shown in cluster mode only.
RAFT_PANELS = ["Raft term", "Raft leader changes", "Metadata quorum leader", "Metadata entries behind"]
if CLUSTER:
    KEY_PANELS += RAFT_PANELS

# Series the run cannot make appear: no stream job runs here, and a single
# node shows no Raft figures. The dashboard may name them if the broker's
# /metrics code registers them (checked against its source).
ABSENT_ALLOWED = ("sluice_stream_",) + (() if CLUSTER else ("sluice_raft_",))


def http_addresses(broker):
    nodes = getattr(broker, "nodes", None)
    return [n.http for n in nodes] if nodes else [broker.http]


def load_dashboard():
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard):
    for p in dashboard["panels"]:
        yield p
        yield from p.get("panels", [])


class Prometheus:
    """A Prometheus server process scraping the broker's nodes every second."""

    def __init__(self, base: Path, targets):
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = base / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: sluice\n    static_configs:\n"
            f"      - targets: {json.dumps(list(targets))}\n"
        )
        self.log_path = base / "prometheus.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={base / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_set_pdeathsig,
        )

    def get(self, path, **params):
        url = f"{self.url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            # A bad query is answered 400/422 with a JSON body saying why.
            return json.loads(e.read())

    def query(self, expr, at=None):
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self.get("/api/v1/query", **params)

    def ready(self):
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def log_tail(self, n=40):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def kill(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, 9)
        self.proc.wait(10)
        self._log.close()


@pytest.fixture(scope="module")
def prometheus(broker, tmp_path_factory):
    if not getattr(broker, "nodes", None) and not getattr(broker, "http", None):
        pytest.skip("needs the broker's HTTP address (SLUICE_EXTERNAL_BOOTSTRAP is set)")
    base = tmp_path_factory.mktemp("prometheus")
    prom = Prometheus(base, http_addresses(broker))
    try:
        wait_until(prom.ready, 30, interval=0.2, what=f"Prometheus ready\n{prom.log_tail()}")
        yield prom
    finally:
        prom.kill()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def run(broker, prometheus):
    """A produce/consume run, a committed group with lag, a Kafka error and an
    AMQP queue with messages ready and unacknowledged; returns the names and
    a time at which Prometheus had scraped all of it."""
    import pika

    topic, group, queue = unique("dash"), unique("dash-group"), unique("dash-queue")
    # Scrapes before the run, so the rates see the counters rise.
    nodes = len(http_addresses(broker))

    def scraping():
        res = prometheus.query("count_over_time(sluice_build_info[1m]) >= 2")
        return len(res.get("data", {}).get("result", [])) == nodes

    wait_until(scraping, 30, interval=0.5, what=f"Prometheus to scrape every node twice\n{prometheus.log_tail()}")
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    for f in admin.create_topics([NewTopic(topic, PARTITIONS, RF)]).values():
        f.result(timeout=30)
    # The topic's counters scraped at zero first: a series that first shows
    # up with the run's records in it has no rate.
    wait_until(lambda: prometheus.query(f'sluice_topic_produced_records_total{{topic="{topic}"}}')["data"]["result"],
               30, interval=0.5, what="Prometheus to scrape the new topic")
    producer = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all", "linger.ms": 5})
    for i in range(RECORDS):
        producer.produce(topic, key=str(i % 31), value=f"value-{i}")
        if i % 500 == 0:
            producer.poll(0)
    assert producer.flush(30) == 0

    consumer = Consumer({
        "bootstrap.servers": broker.bootstrap,
        "group.id": group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": 100,
    })
    try:
        consumer.subscribe([topic])
        consume_and_commit(consumer, CONSUMED)
    finally:
        consumer.close()

    # An error a client provokes: deleting a topic that does not exist.
    missing = unique("dash-missing")
    with pytest.raises(KafkaException):
        admin.delete_topics([missing], operation_timeout=10)[missing].result(timeout=30)

    params = pika.ConnectionParameters("127.0.0.1", broker.amqp_port, "/", pika.PlainCredentials("guest", "guest"))
    connection = pika.BlockingConnection(params)
    try:
        channel = connection.channel()
        channel.queue_declare(queue, durable=True)
        for i in range(AMQP_MESSAGES):
            channel.basic_publish("", queue, f"m{i}".encode())
        # One message delivered and left unacknowledged while the queries run.
        wait_until(lambda: channel.basic_get(queue, auto_ack=False)[0] is not None, 30, what="a delivery")

        def scraped():
            q = lambda e: prometheus.query(e)["data"]["result"]  # noqa: E731
            appended = q(f'sum(sluice_topic_produced_records_total{{topic="{topic}"}})')
            fetched = q(f'sum(sluice_topic_fetched_records_total{{topic="{topic}"}})')
            lag = q(f'sum(sluice_consumer_group_lag{{group="{group}"}})')
            ready = q(f'sum(sluice_amqp_queue_messages_ready{{queue="{queue}"}})')
            errors = q('sum(sluice_kafka_requests_total{api="DeleteTopics",error="UNKNOWN_TOPIC_OR_PARTITION"})')
            return (
                appended and float(appended[0]["value"][1]) == RECORDS
                and fetched and float(fetched[0]["value"][1]) >= CONSUMED
                and lag and float(lag[0]["value"][1]) > 0
                and ready and errors and float(errors[0]["value"][1]) >= 1
            )

        wait_until(scraped, 60, interval=0.5, what=f"Prometheus to scrape the run\n{prometheus.log_tail()}")
        # A few more scrapes, so every rate() has points on both sides.
        time.sleep(3)
        yield {"topic": topic, "group": group, "queue": queue, "at": time.time()}
    finally:
        connection.close()


VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def substitute(expr, values):
    def one(m):
        name = m.group(1) or m.group(2) or m.group(3)
        if name.startswith("__"):
            if name in ("__rate_interval", "__interval", "__range"):
                return INTERVAL
            raise AssertionError(f"unknown Grafana variable ${name} in {expr}")
        assert name in values, f"${name} is not a template variable of the dashboard ({expr})"
        return values[name]

    return VAR.sub(one, expr)


def panel_targets(dashboard):
    """(panel title, expr) of every query of every panel."""
    out = []
    for p in all_panels(dashboard):
        if p.get("type") == "row":
            continue
        for t in p.get("targets", []):
            if t.get("hide"):
                continue
            assert t.get("expr"), f"panel {p.get('title')!r} has a target without expr"
            out.append((p["title"], t["expr"]))
    return out


def variable_values(dashboard, run, all_values):
    names = [v["name"] for v in dashboard["templating"]["list"]]
    values = {n: ".*" for n in names}
    values["job"] = "sluice"
    if not all_values:
        values.update(topic=run["topic"], group=run["group"], queue=run["queue"])
    return values


def exported_names(broker):
    """Sample names the nodes' /metrics show, as Prometheus stores them."""
    names = set()
    for http in http_addresses(broker):
        with urllib.request.urlopen(f"http://{http}/metrics", timeout=10) as r:
            text = r.read().decode()
        for line in text.splitlines():
            if line and not line.startswith("#"):
                names.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    return names


# PromQL functions, keywords and aggregations that look like metric names.
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "topk", "bottomk", "by", "without", "on", "ignoring",
    "group_left", "group_right", "rate", "irate", "increase", "deriv", "delta", "histogram_quantile",
    "scalar", "vector", "and", "or", "unless", "offset", "bool", "label_values", "abs", "clamp_min",
    "count_over_time", "max_over_time", "min_over_time", "avg_over_time", "changes", "resets",
}


def metric_names(expr):
    """The metric names an expression selects: identifiers outside label
    matchers, strings and ranges that are no PromQL word."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    bare = re.sub(r"\{[^}]*\}", "", bare)
    bare = re.sub(r"\[[^\]]*\]", "", bare)
    bare = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", bare)
    words = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", bare))
    return {w for w in words if w not in PROMQL_WORDS and not re.fullmatch(r"e\d*|Inf|NaN", w)}


def test_dashboard_is_well_formed():
    d = load_dashboard()
    assert d["schemaVersion"] >= 36, d["schemaVersion"]
    assert d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in all_panels(d)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    titles = [p["title"] for p in all_panels(d) if p["type"] != "row"]
    assert len(titles) == len(set(titles)), "panel titles repeat"
    for p in all_panels(d):
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"], p["title"]
    for title in KEY_PANELS + RAFT_PANELS:
        assert title in titles, f"key panel {title!r} is not in the dashboard"


@needs_prometheus
def test_every_panel_query_is_valid_and_the_key_panels_show_data(broker, prometheus, run):
    d = load_dashboard()
    targets = panel_targets(d)
    assert len(targets) >= 40, len(targets)
    exported = exported_names(broker)
    source = HTTP_METRICS_RS.read_text() if HTTP_METRICS_RS.exists() else ""
    for title, expr in targets:
        for name in metric_names(substitute(expr, variable_values(d, run, True))):
            if name in exported:
                continue
            assert name.startswith(ABSENT_ALLOWED), (
                f"panel {title!r} queries {name}, which the broker does not export: {expr}")
            base = re.sub(r"_(total|seconds|bytes|bucket|sum|count)$", "", name.removeprefix("sluice_"))
            base = re.sub(r"_(seconds|bytes)$", "", base)
            assert f'"{base}"' in source, f"panel {title!r}: {name} is registered nowhere in {HTTP_METRICS_RS}"

    failures = []
    for all_values in (False, True):
        values = variable_values(d, run, all_values)
        for title, raw in targets:
            expr = substitute(raw, values)
            answer = prometheus.query(expr, at=run["at"])
            if answer.get("status") != "success":
                failures.append(f"{title}: invalid query {expr}: {answer.get('error')}")
                continue
            if title in KEY_PANELS and not answer["data"]["result"]:
                failures.append(f"{title}: no data ({'every value' if all_values else 'the run'}'s variables) for {expr}")
    assert not failures, "\n".join(failures)

    # A few figures the run makes certain, read through the panels' queries.
    values = variable_values(d, run, False)
    queries = dict((t, substitute(e, values)) for t, e in reversed(targets))

    def values_of(title, expr=None):
        res = prometheus.query(expr or queries[title], at=run["at"])["data"]["result"]
        return {json.dumps(r["metric"], sort_keys=True): float(r["value"][1]) for r in res}

    assert list(values_of("Records in per topic").values())[0] > 0
    assert list(values_of("Records out per topic").values())[0] > 0
    # The group committed what it consumed; its lag is what lies past its
    # commits in the partitions it committed to (a partition never committed
    # has no lag), per partition and summed.
    assert sum(values_of("Committed offset per partition").values()) == CONSUMED
    lag = values_of("Lag per group")
    partition_lag = values_of("Lag per partition")
    assert len(lag) == 1 and 0 < list(lag.values())[0] <= RECORDS - CONSUMED, lag
    assert sum(partition_lag.values()) == list(lag.values())[0], partition_lag
    p99 = [e for t, e in targets if t == "Produce / Fetch latency p50 / p99" and "0.99" in e][0]
    produce_p99 = [v for k, v in values_of(None, substitute(p99, values)).items() if '"Produce"' in k]
    assert produce_p99 and math.isfinite(produce_p99[0]) and produce_p99[0] > 0, produce_p99
    errors = values_of("Errors by API and code")
    assert any('"DeleteTopics"' in k and "UNKNOWN_TOPIC_OR_PARTITION" in k for k in errors), errors
    ready = values_of("Messages ready")
    assert list(ready.values()) == [AMQP_MESSAGES - 1], ready
    assert list(values_of("Messages unacknowledged").values()) == [1]
    nodes = values_of("Nodes by state")
    assert nodes == {json.dumps({"state": "alive"}): float(len(http_addresses(broker)))}, nodes
    if CLUSTER:
        leaders = values_of("Metadata quorum leader")
        assert sorted(leaders.values()) == [0.0] * (len(leaders) - 1) + [1.0], leaders


@needs_prometheus
def test_template_variables_find_what_the_run_made(prometheus, run):
    d = load_dashboard()
    want = {"job": "sluice", "topic": run["topic"], "group": run["group"], "queue": run["queue"]}
    for v in d["templating"]["list"]:
        if v["type"] != "query":
            continue
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q)
        assert m, f"variable {v['name']}: {q}"
        selector = substitute(m.group(1), {n["name"]: ".*" for n in d["templating"]["list"]} | {"job": "sluice"})
        answer = prometheus.get("/api/v1/series", **{"match[]": selector})
        assert answer["status"] == "success", (v["name"], answer)
        found = {s.get(m.group(2)) for s in answer["data"]}
        if v["name"] in want:
            assert want[v["name"]] in found, (v["name"], found)
        else:
            assert found and None not in found, (v["name"], found)


@needs_prometheus
def test_promtool_accepts_the_exposition(broker):
    if not getattr(broker, "nodes", None) and not getattr(broker, "http", None):
        pytest.skip("needs the broker's HTTP address (SLUICE_EXTERNAL_BOOTSTRAP is set)")
    promtool = PROMTOOL if os.access(PROMTOOL, os.X_OK) else shutil.which("promtool")
    if not promtool:
        pytest.skip("no promtool next to the prometheus binary")
    from prometheus_client.exposition import generate_latest
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
    from prometheus_client.registry import CollectorRegistry

    with urllib.request.urlopen(f"http://{http_addresses(broker)[0]}/metrics", timeout=10) as r:
        text = r.read().decode()
    families = list(text_string_to_metric_families(text))

    class Scraped:
        def collect(self):
            return families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Scraped())
    classic = generate_latest(registry)
    cp = subprocess.run([promtool, "check", "metrics"], input=classic, capture_output=True, timeout=60)
    assert cp.returncode == 0, (
        f"promtool check metrics exited {cp.returncode}:\n{cp.stdout.decode()}{cp.stderr.decode()}")

"""The web console in real headless Chromium (Debian's chromium and
chromium-driver, driven by Selenium): every page loads without a browser
console error and shows what the test created — the topic, its records
(keys, headers, values as text, JSON and hex), the consumer group with its
lag, the cluster's nodes, the AMQP queue — the live charts draw, and deleting
a topic or resetting a group's offsets asks first and is refused when the
console is read-only. A
screenshot of each page is written to $SLUICE_ARTIFACTS (default
/var/tmp/sluice-artifacts)/console/.
"""

import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pika
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from kutil import RF, consume_and_commit, unique, wait_until

CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("SLUICE_ARTIFACTS", "/var/tmp/sluice-artifacts")) / "console"

PARTITIONS = 3
RECORDS = 90
CONSUMED = 40

pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMEDRIVER) and os.path.exists(CHROMIUM)),
    reason="chromium and chromium-driver are installed by scripts/test.sh setup",
)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--disable-gpu", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def open_page(driver, broker, path, shot=None):
    """Loads `path`; fails on any browser console error; writes a screenshot."""
    driver.get_log("browser")  # drop what earlier pages logged
    driver.get(f"http://{broker.http}{path}")
    wait_until(lambda: driver.execute_script("return document.readyState") == "complete", 30,
               what=f"{path} loaded")
    return check_page(driver, path, shot)


def check_page(driver, path, shot=None):
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, f"{path}: browser console errors: {errors}"
    if shot:
        driver.save_screenshot(str(ARTIFACTS / f"{shot}.png"))
    return driver.find_element("tag name", "body").text


def text_of(driver, css):
    return [e.text for e in driver.find_elements("css selector", css)]


@pytest.fixture(scope="module")
def world(broker):
    """A topic with keyed, headed JSON records, a group that consumed part
    of it, and an AMQP queue with messages."""
    topic, group, queue = unique("console-topic"), unique("console-group"), unique("console-queue")
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    for f in admin.create_topics([NewTopic(topic, PARTITIONS, RF)]).values():
        f.result(timeout=30)
    producer = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all"})
    for i in range(RECORDS):
        producer.produce(topic, key=f"key-{i}", value=json.dumps({"order": i, "item": "widget"}),
                         partition=i % PARTITIONS, headers=[("origin", b"console-test")])
    assert producer.flush(30) == 0

    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group,
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    consume_and_commit(consumer, CONSUMED)
    committed = consumer.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=30)
    consumer.close()  # the group keeps its offsets (and its lag) without members
    # As kafka-consumer-groups: a partition never committed to has no lag.
    lag = sum(RECORDS // PARTITIONS - tp.offset for tp in committed if tp.offset >= 0)

    conn = pika.BlockingConnection(pika.ConnectionParameters(
        "127.0.0.1", broker.amqp_port, "/", pika.PlainCredentials("guest", "guest")))
    ch = conn.channel()
    ch.queue_declare(queue, durable=True)
    ch.confirm_delivery()
    for i in range(3):
        ch.basic_publish("", queue, f"m{i}".encode())
    conn.close()
    return {"topic": topic, "group": group, "queue": queue, "lag": lag}


def test_every_page_shows_what_the_clients_did(broker, browser, world):
    topic, group = world["topic"], world["group"]

    body = open_page(browser, broker, "/", shot="overview")
    assert "Overview" in body and "healthy" in body
    for n in getattr(broker, "nodes", [broker]):
        assert f"127.0.0.1:{n.kafka_port}" in body
    # The throughput chart draws once it has two polls (2 s apart).
    wait_until(lambda: "records/s" in " ".join(text_of(browser, ".chart-now")), 30,
               what="the throughput chart's first point")
    assert browser.find_element("css selector", "svg.live-chart polyline").get_attribute("points")
    check_page(browser, "/", shot="overview")

    body = open_page(browser, broker, "/topics", shot="topics")
    row = [r for r in text_of(browser, "table tr") if r.startswith(topic)]
    assert row, body
    assert f"{PARTITIONS} {RF} {RECORDS}" in row[0], row

    body = open_page(browser, broker, f"/topics/{topic}", shot="topic")
    rows = text_of(browser, "table tr")[1:PARTITIONS + 1]
    assert [r.split()[0] for r in rows] == [str(p) for p in range(PARTITIONS)]
    ends = sum(int(r.split()[-3]) for r in rows)  # Log end column
    assert ends == RECORDS, rows

    body = open_page(browser, broker, f"/topics/{topic}/partitions/0?offset=0&format=json", shot="records")
    offsets = [int(c) for c in text_of(browser, "table.records td.num")]
    assert offsets == list(range(RECORDS // PARTITIONS)), offsets
    assert "key-0" in body and "key-3" in body and "origin: console-test" in body
    assert '"order": 3' in body and '"item": "widget"' in body  # indented JSON

    body = open_page(browser, broker, f"/topics/{topic}/partitions/1?offset=2&format=hex&limit=1")
    assert "6b 65 79 2d 37" in body  # "key-7": the record at offset 2 of partition 1
    assert text_of(browser, "table.records td.num") == ["2"]

    body = open_page(browser, broker, "/groups", shot="groups")
    assert group in body

    body = open_page(browser, broker, f"/groups/{group}", shot="group")
    assert f"Lag\n{world['lag']}" in body, body
    partition_rows = [r for r in text_of(browser, "table tr") if r.startswith(topic)]
    assert len(partition_rows) == PARTITIONS
    assert sum(int(r.split()[4]) for r in partition_rows if r.split()[4] != "-") == world["lag"]
    wait_until(lambda: f"{world['lag']} records behind" in " ".join(text_of(browser, ".chart-now")), 30,
               what="the lag chart's first point")
    check_page(browser, f"/groups/{group}", shot="group")

    body = open_page(browser, broker, "/cluster", shot="cluster")
    for n in getattr(broker, "nodes", [broker]):
        assert f"127.0.0.1:{n.kafka_port}" in body
    assert "Under-replicated partitions" in body

    body = open_page(browser, broker, "/queues", shot="queues")
    row = [r for r in text_of(browser, "table tr") if world["queue"] in r]
    assert row and " 3 0 0 " in f" {row[0]} ", row


def test_deleting_a_topic_asks_first(broker, browser):
    topic = unique("console-doomed")
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    for f in admin.create_topics([NewTopic(topic, 1, RF)]).values():
        f.result(timeout=30)
    wait_until(lambda: topic in admin.list_topics(timeout=10).topics, 30, what="the topic")

    open_page(browser, broker, f"/topics/{topic}")
    browser.find_element("css selector", "button.danger").click()
    alert = browser.switch_to.alert
    assert topic in alert.text
    alert.dismiss()
    assert topic in admin.list_topics(timeout=10).topics, "deleted although the user said no"

    browser.find_element("css selector", "button.danger").click()
    browser.switch_to.alert.accept()
    wait_until(lambda: browser.current_url.endswith("/topics"), 30, what="back on the topics page")
    check_page(browser, "/topics")
    wait_until(lambda: topic not in admin.list_topics(timeout=10).topics, 30, what="the topic gone")


def committed_group(broker, records):
    """A topic of `records` records and a group with no members that
    committed all of them."""
    topic, group = unique("console-reset"), unique("console-reset-group")
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    for f in admin.create_topics([NewTopic(topic, 1, RF)]).values():
        f.result(timeout=30)
    producer = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all"})
    for i in range(records):
        producer.produce(topic, value=f"v{i}")
    assert producer.flush(30) == 0
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group,
                         "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, 0, records)])
    consumer.commit(offsets=[TopicPartition(topic, 0, records)], asynchronous=False)
    consumer.close()
    return topic, group


def committed_offset(broker, group, topic):
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group})
    try:
        return consumer.committed([TopicPartition(topic, 0)], timeout=30)[0].offset
    finally:
        consumer.close()


def test_resetting_a_groups_offsets_asks_first(broker, browser):
    topic, group = committed_group(broker, 12)
    body = open_page(browser, broker, f"/groups/{group}")
    assert "Lag\n0" in body, body
    browser.find_element("css selector", "select[name=to] option[value=earliest]").click()
    browser.find_element("css selector", "form[action$='/reset'] button.danger").click()
    browser.switch_to.alert.dismiss()
    assert committed_offset(broker, group, topic) == 12, "reset although the user said no"

    browser.find_element("css selector", "form[action$='/reset'] button.danger").click()
    browser.switch_to.alert.accept()
    wait_until(lambda: "Lag\n12" in browser.find_element("tag name", "body").text, 30,
               what="the group page after the reset")
    check_page(browser, f"/groups/{group}", shot="group-after-reset")
    assert committed_offset(broker, group, topic) == 0


def test_a_read_only_console_deletes_nothing(broker_factory, browser):
    ro = broker_factory("read-only-console", extra_args=("--console-read-only", "true"))
    topic = unique("console-kept")
    admin = AdminClient({"bootstrap.servers": ro.bootstrap})
    for f in admin.create_topics([NewTopic(topic, 1, RF)]).values():
        f.result(timeout=30)
    wait_until(lambda: topic in admin.list_topics(timeout=10).topics, 30, what="the topic")

    body = open_page(browser, ro, f"/topics/{topic}", shot="topic-read-only")
    assert "read-only" in body
    assert not browser.find_element("css selector", "button.danger").is_enabled()
    req = urllib.request.Request(f"http://{ro.http}/topics/{topic}/delete", method="POST", data=b"")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=10)
    assert refused.value.code == 403
    assert topic in admin.list_topics(timeout=10).topics

    topic, group = committed_group(ro, 5)
    body = open_page(browser, ro, f"/groups/{group}")
    assert "read-only" in body
    assert not browser.find_elements("css selector", "form[action$='/reset']")
    req = urllib.request.Request(f"http://{ro.http}/groups/{group}/reset", method="POST",
                                 data=f"topic={topic}&to=earliest".encode(),
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=10)
    assert refused.value.code == 403
    assert committed_offset(ro, group, topic) == 5

"""Shared helpers for the interop tests: self-checking record values, bounded
waits, and "consume everything" loops for each real client, all returning the
same normalized record shape so one verifier checks every client pair."""

import os
import subprocess
import time
import uuid
import zlib
from dataclasses import dataclass, field

CODECS = ("gzip", "snappy", "lz4", "zstd")


@dataclass(frozen=True)
class Rec:
    topic: str
    partition: int
    offset: int
    key: object  # bytes or None
    value: object  # bytes or None
    headers: tuple  # ((str, bytes|None), ...)
    ts_type: object  # "create" / "append" / None when the client does not say
    ts: int


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# Replication factor of the topics the tests create: 3 when the suite runs
# against a three-node cluster (SLUICE_INTEROP_CLUSTER=1), else 1.
RF = 3 if os.environ.get("SLUICE_INTEROP_CLUSTER") else 1


def wait_until(pred, timeout, interval=0.1, what="condition"):
    """Polls pred() until truthy; returns its value or raises AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = pred()
        except Exception as e:  # a client call failing is "not yet"
            last = e
        if last and not isinstance(last, Exception):
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last={last!r}")
        time.sleep(interval)


def watermarks(consumer, topic, partition, timeout=30.0):
    """(low, high) of a partition. Right after CreateTopics a cluster node may not yet
    lead the new partition (NOT_LEADER_OR_FOLLOWER, LEADER_NOT_AVAILABLE): those are
    retriable, and librdkafka's get_watermark_offsets does not retry them itself."""
    from confluent_kafka import KafkaError, KafkaException, TopicPartition

    retriable = {KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
                 KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._TIMED_OUT}
    deadline = time.monotonic() + timeout
    while True:
        try:
            return consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
        except KafkaException as e:
            if e.args[0].code() not in retriable or time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


# -- self-checking values ------------------------------------------------------


def make_value(tag, i, key, codec, pad=0):
    """`tag|i|key|codec|xxx|crc`: any corruption or mix-up is detected on read."""
    body = f"{tag}|{i}|{key}|{codec}|" + "x" * pad
    return f"{body}|{zlib.crc32(body.encode()):08x}".encode()


class CorruptValue(ValueError):
    pass


def parse_value(value):
    """Returns (tag, i, key, codec) or raises CorruptValue."""
    if value is None:
        raise CorruptValue("null value")
    try:
        text = value.decode()
        body, crc = text.rsplit("|", 1)
        if f"{zlib.crc32(body.encode()):08x}" != crc:
            raise CorruptValue(f"crc mismatch in {value[:80]!r}")
        tag, i, key, codec, _pad = body.split("|")
        return tag, int(i), key, codec
    except (UnicodeDecodeError, ValueError) as e:
        if isinstance(e, CorruptValue):
            raise
        raise CorruptValue(f"undecodable value {value[:80]!r}: {e}") from e


# -- consuming everything --------------------------------------------------------


def confluent_consume_all(bootstrap, topic, partitions, expect, timeout=90.0, extra_conf=None):
    """Reads every partition from the beginning to its end with confluent-kafka (no group)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

    conf = {
        "bootstrap.servers": bootstrap,
        "group.id": unique("reader"),
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "check.crcs": True,
        "fetch.wait.max.ms": 100,
    }
    conf.update(extra_conf or {})
    c = Consumer(conf)
    out = []
    try:
        # High watermarks first, so "done" means "read up to where the log ended".
        ends = {}
        for p in range(partitions):
            lo, hi = watermarks(c, topic, p)
            ends[p] = hi
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        pos = {p: -1 for p in range(partitions)}
        eof = set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = all(pos[p] + 1 >= ends[p] for p in ends) and len(eof) == partitions
            if done and len(out) >= expect:
                break
            msgs = c.consume(num_messages=5000, timeout=0.5)
            for m in msgs:
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        eof.add(m.partition())
                        continue
                    raise AssertionError(f"confluent consumer error on {topic}: {err}")
                eof.discard(m.partition())
                tstype, ts = m.timestamp()
                out.append(
                    Rec(
                        m.topic(),
                        m.partition(),
                        m.offset(),
                        m.key(),
                        m.value(),
                        tuple(m.headers() or ()),
                        {1: "create", 2: "append"}.get(tstype),
                        ts,
                    )
                )
                pos[m.partition()] = m.offset()
        else:
            raise AssertionError(
                f"confluent reader timed out on {topic}: got {len(out)} of {expect}, positions {pos}, ends {ends}"
            )
    finally:
        c.close()
    return out


def kafka_python_consume_all(bootstrap, topic, partitions, expect, timeout=120.0):
    """Reads every partition from the beginning to its end with kafka-python (no group)."""
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        check_crcs=True,
        fetch_max_wait_ms=100,
        max_poll_records=5000,
    )
    out = []
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        c.assign(tps)
        c.seek_to_beginning(*tps)
        ends = c.end_offsets(tps)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(c.position(tp) >= ends[tp] for tp in tps) and len(out) >= expect:
                break
            batch = c.poll(timeout_ms=500)
            for tp, msgs in batch.items():
                for m in msgs:
                    out.append(
                        Rec(
                            m.topic,
                            m.partition,
                            m.offset,
                            m.key,
                            m.value,
                            tuple(m.headers or ()),
                            {0: "create", 1: "append"}.get(m.timestamp_type),
                            m.timestamp,
                        )
                    )
        else:
            raise AssertionError(f"kafka-python reader timed out on {topic}: got {len(out)} of {expect}")
    finally:
        c.close()
    return out


KCAT_FMT = r"%p\t%o\t%T\t%K\t%k\t%S\t%s\t%h\n"


def kcat_consume_all(bootstrap, topic, expect, timeout=120.0):
    """Reads the whole topic with `kcat -C -e` and parses its -f output."""
    cmd = ["kcat", "-C", "-b", bootstrap, "-t", topic, "-o", "beginning", "-e", "-q", "-f", KCAT_FMT,
           "-X", "check.crcs=true"]
    cp = subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if cp.returncode != 0:
        raise AssertionError(f"kcat consume exited {cp.returncode}: {cp.stderr.decode(errors='replace')}")
    out = []
    for line in cp.stdout.split(b"\n"):
        if not line:
            continue
        f = line.split(b"\t")
        if len(f) != 8:
            raise AssertionError(f"kcat: unparsable line {line[:200]!r}")
        p, o, ts, klen, k, vlen, v, h = f
        key = None if int(klen) < 0 else k
        value = None if int(vlen) < 0 else v
        if key is not None and len(key) != int(klen):
            raise AssertionError(f"kcat: key length {klen} but key {key!r}")
        if value is not None and len(value) != int(vlen):
            raise AssertionError(f"kcat: value length {vlen} but value {value[:80]!r}")
        headers = []
        if h:
            for kv in h.decode().split(","):
                name, _, val = kv.partition("=")
                headers.append((name, val.encode()))
        out.append(Rec(topic, int(p), int(o), key, value, tuple(headers), None, int(ts)))
    if len(out) < expect:
        raise AssertionError(f"kcat read {len(out)} records from {topic}, expected {expect}")
    return out


# -- verification ------------------------------------------------------------------


@dataclass
class Expected:
    key: bytes
    headers: tuple
    ts: object = None  # exact create timestamp, or None
    ts_range: object = None  # (lo, hi) when the producer cannot set it (kcat)
    partition: object = None  # known partition (from the delivery report), or None


@dataclass
class Report:
    read: int = 0
    lost: list = field(default_factory=list)
    duplicates: list = field(default_factory=list)
    problems: list = field(default_factory=list)

    def ok(self):
        return not (self.lost or self.duplicates or self.problems)

    def summary(self):
        return (f"read={self.read} lost={len(self.lost)} duplicated={len(self.duplicates)} "
                f"other-anomalies={len(self.problems)}")


def verify(records, tag, expected, check_ts_type=True):
    """Checks a full read of a topic against what was produced.

    expected: {i: Expected}. Returns a Report; the caller asserts rep.ok().
    """
    rep = Report(read=len(records))
    seen = {}
    last_offset = {}
    last_i_per_key = {}
    key_partition = {}
    for r in records:
        if r.partition in last_offset and r.offset <= last_offset[r.partition]:
            rep.problems.append(f"nonmonotonic-offset: p{r.partition} offset {r.offset} after {last_offset[r.partition]}")
        last_offset[r.partition] = r.offset
        try:
            vtag, i, vkey, codec = parse_value(r.value)
        except CorruptValue as e:
            rep.problems.append(f"corrupt: p{r.partition}@{r.offset}: {e}")
            continue
        if vtag != tag:
            rep.problems.append(f"foreign record p{r.partition}@{r.offset}: {r.value[:60]!r}")
            continue
        if i in seen:
            rep.duplicates.append((i, seen[i], (r.partition, r.offset)))
            continue
        seen[i] = (r.partition, r.offset)
        exp = expected.get(i)
        if exp is None:
            rep.problems.append(f"unexpected record i={i} at p{r.partition}@{r.offset}")
            continue
        if r.key != exp.key:
            rep.problems.append(f"key: i={i} got {r.key!r} expected {exp.key!r}")
        if vkey.encode() != exp.key:
            rep.problems.append(f"value/key mix-up: i={i} value says key {vkey!r}, expected {exp.key!r}")
        if tuple(r.headers) != tuple(exp.headers):
            rep.problems.append(f"headers: i={i} got {r.headers!r} expected {exp.headers!r}")
        if exp.ts is not None and r.ts != exp.ts:
            rep.problems.append(f"timestamp: i={i} got {r.ts} expected {exp.ts}")
        if exp.ts_range is not None and not (exp.ts_range[0] <= r.ts <= exp.ts_range[1]):
            rep.problems.append(f"timestamp: i={i} got {r.ts} outside produce window {exp.ts_range}")
        if check_ts_type and r.ts_type is not None and r.ts_type != "create":
            rep.problems.append(f"timestamp type: i={i} got {r.ts_type} expected create")
        if exp.partition is not None and r.partition != exp.partition:
            rep.problems.append(f"partition: i={i} in p{r.partition}, delivery report said p{exp.partition}")
        k = r.key
        if k in key_partition and key_partition[k] != r.partition:
            rep.problems.append(f"key {k!r} in partitions {key_partition[k]} and {r.partition}")
        key_partition.setdefault(k, r.partition)
        if k in last_i_per_key and i <= last_i_per_key[k]:
            rep.problems.append(f"nonmonotonic-poll: key {k!r} i={i} after i={last_i_per_key[k]}")
        last_i_per_key[k] = i
    rep.lost = sorted(set(expected) - set(seen))
    return rep


def assert_report(rep, what):
    print(f"[{what}] {rep.summary()}")
    if not rep.ok():
        msg = [f"{what}: {rep.summary()}"]
        if rep.lost:
            msg.append(f"  lost-write: {len(rep.lost)} e.g. {rep.lost[:10]}")
        if rep.duplicates:
            msg.append(f"  duplicate: {len(rep.duplicates)} e.g. {rep.duplicates[:5]}")
        for p in rep.problems[:20]:
            msg.append("  " + p)
        if len(rep.problems) > 20:
            msg.append(f"  ... {len(rep.problems) - 20} more")
        raise AssertionError("\n".join(msg))


# -- on-disk batches -----------------------------------------------------------------

CODEC_IDS = {0: "none", 1: "gzip", 2: "snappy", 3: "lz4", 4: "zstd"}


def stored_batches(data_dir, topic, leftovers=None):
    """Parses the RecordBatch v2 headers in `<data>/<topic>-<p>/*.log` and returns
    a list of (partition, base_offset, record_count, codec name, magic).

    Sluice keeps batches as the producer sent them (unless the topic's
    `compression.type` names a codec), so the codec a client used must be
    visible in the stored attributes."""
    import struct
    from pathlib import Path

    out = []
    dirs = sorted(Path(data_dir).glob(f"{topic}-*"))
    for d in dirs:
        part = int(d.name.rsplit("-", 1)[1])
        for seg in sorted(d.glob("*.log")):
            buf = seg.read_bytes()
            pos = 0
            # Header: baseOffset i64, batchLength i32, leaderEpoch i32, magic i8, crc u32,
            # attributes i16, lastOffsetDelta i32, ... recordCount i32 at byte 57.
            while pos + 61 <= len(buf):
                base, length = struct.unpack_from(">qi", buf, pos)
                if length <= 0 or pos + 12 + length > len(buf):
                    break
                magic = buf[pos + 16]
                attrs = struct.unpack_from(">h", buf, pos + 21)[0]
                count = struct.unpack_from(">i", buf, pos + 57)[0]
                out.append((part, base, count, CODEC_IDS.get(attrs & 7, f"?{attrs & 7}"), magic))
                pos += 12 + length
            if leftovers is not None and pos != len(buf):
                leftovers.append((str(seg), len(buf) - pos))
    return out


def api_versions(bootstrap, timeout=10.0):
    """{api_key: (min, max)} from a raw ApiVersions v0 request (no client library in between)."""
    import socket
    import struct

    host, port = bootstrap.rsplit(":", 1)
    client_id = b"sluice-interop"
    body = struct.pack(">hhih", 18, 0, 7, len(client_id)) + client_id
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(struct.pack(">i", len(body)) + body)
        buf = b""
        while len(buf) < 4:
            chunk = s.recv(4 - len(buf))
            assert chunk, "connection closed during ApiVersions"
            buf += chunk
        (size,) = struct.unpack(">i", buf)
        data = b""
        while len(data) < size:
            chunk = s.recv(size - len(data))
            assert chunk, "connection closed during ApiVersions"
            data += chunk
    corr, err, n = struct.unpack_from(">ihi", data, 0)
    assert corr == 7 and err == 0, (corr, err)
    out = {}
    for k in range(n):
        key, lo, hi = struct.unpack_from(">hhh", data, 10 + 6 * k)
        out[key] = (lo, hi)
    return out


def kcat_librdkafka_version():
    """(major, minor, patch) of the librdkafka kcat is linked with."""
    import re

    cp = subprocess.run(["kcat", "-V"], capture_output=True, timeout=10)
    m = re.search(rb"librdkafka (\d+)\.(\d+)\.(\d+)", cp.stdout + cp.stderr)
    assert m, cp.stdout
    return tuple(int(x) for x in m.groups())


def confluent_read_to_end(bootstrap, topic, start=0, timeout=60.0):
    """Every message of partition 0 of `topic` from offset `start` up to its
    end (confluent-kafka, no group commits), as Message objects."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("reader"), "enable.auto.commit": False,
                  "enable.partition.eof": True, "check.crcs": True, "fetch.wait.max.ms": 50})
    try:
        c.assign([TopicPartition(topic, 0, start)])
        out = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is None:
                continue
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    return out
                raise AssertionError(m.error())
            out.append(m)
        raise AssertionError(f"no end of {topic}-0 within {timeout} s")
    finally:
        c.close()


def scrape_metrics(http):
    """{family name: [samples]} of one node; the parser raises on any
    malformed line, type, unit or bucket order."""
    import urllib.request

    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{http}/metrics", timeout=10) as r:
        assert r.status == 200
        content_type = r.headers["Content-Type"]
        text = r.read().decode()
    assert content_type.startswith("application/openmetrics-text"), content_type
    assert text.endswith("# EOF\n"), text[-200:]
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def metric_samples(families, family, name=None, **labels):
    """Samples of `family` (sample name `name`, default the family's own)
    whose labels include `labels`."""
    return [
        s for s in families.get(family, [])
        if (name is None or s.name == name) and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def consume_and_commit(consumer, n, timeout=60):
    """Takes exactly `n` records from a subscribed consumer (none with an
    error), then commits its position synchronously."""
    got = 0

    def more():
        nonlocal got
        for m in consumer.consume(num_messages=min(500, n - got), timeout=0.5):
            assert m.error() is None, m.error()
            got += 1
        return got >= n

    wait_until(more, timeout, interval=0, what=f"{n} records")
    consumer.commit(asynchronous=False)

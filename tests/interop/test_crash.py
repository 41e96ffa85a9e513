"""Acceptance 3: kill -9 the broker under an idempotent acks=all producer.

A confluent-kafka producer (enable.idempotence=true, acks=all) sends a
sustained, rate-limited stream of uniquely numbered records to 2 partitions.
While it runs the broker is SIGKILLed and restarted on the same port and data
directory several times at random moments; the producer keeps retrying.
Afterwards the whole topic is read back and checked Jepsen-style:

  lost-write            an acknowledged record is missing
  duplicate             a record is present more than once
  inconsistent-offsets  an acknowledged record is not at its acknowledged offset/partition
  nonmonotonic-poll     records of a partition are not in produce order
  offset-gap            a partition's offsets are not contiguous from its log start
  corrupt               a record does not decode (half-written data visible)
"""

import os
import random
import struct
import time
import zlib
from pathlib import Path

import pytest

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from kutil import confluent_consume_all, stored_batches, unique, RF

PARTITIONS = 2
ROUNDS = int(os.environ.get("SLUICE_CRASH_ROUNDS", "4"))
RATE = 4000  # records per second offered to the producers
CODECS = ("none", "zstd")  # one idempotent producer per codec
SEED = int(os.environ.get("SLUICE_CRASH_SEED", str(int(time.time()))))


def value_of(seq, partition, producer=0):
    body = f"crash|{seq}|{partition}|{producer}|" + "p" * (seq % 97)
    return f"{body}|{zlib.crc32(body.encode()):08x}".encode()


def parse(value):
    """(seq, partition, producer) or None when the value is not exactly what was sent."""
    try:
        text = value.decode()
        body, crc = text.rsplit("|", 1)
        if f"{zlib.crc32(body.encode()):08x}" != crc:
            return None
        tag, seq, part, prod, pad = body.split("|")
        seq, part, prod = int(seq), int(part), int(prod)
        if tag != "crash" or pad != "p" * (seq % 97):
            return None
        return seq, part, prod
    except (AttributeError, UnicodeDecodeError, ValueError):
        return None


def test_kill9_under_idempotent_producer(broker):
    rng = random.Random(SEED)
    print(f"[crash] seed={SEED} rounds={ROUNDS}")
    topic = unique("crash")
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=RF)])[topic].result(30)

    acked = {}  # seq -> (partition, offset)
    failed = {}  # seq -> error
    client_errors = []
    fatal = []

    def on_delivery(err, msg):
        got = parse(msg.value())
        assert got is not None
        seq = got[0]
        if err is not None:
            failed[seq] = err
        else:
            acked[seq] = (msg.partition(), msg.offset())

    def on_error(err):
        client_errors.append(err)
        if err.fatal():
            fatal.append(err)

    # Two idempotent producers (different codecs) write to both partitions at
    # once, so concurrent appends share fsyncs (group commit) when the broker dies.
    producers = [Producer({
        "bootstrap.servers": broker.bootstrap,
        "compression.type": codec,
        "enable.idempotence": True,
        "acks": "all",
        "message.timeout.ms": 120000,
        "linger.ms": 5,
        "reconnect.backoff.ms": 50,
        "reconnect.backoff.max.ms": 500,
        "retry.backoff.ms": 50,
        "retry.backoff.max.ms": 500,
        "socket.connection.setup.timeout.ms": 5000,
        "queue.buffering.max.messages": 200000,
        "error_cb": on_error,
        "log_level": 2,  # connection-refused noise while the broker is down; errors reach error_cb
    }) for codec in CODECS]

    seq = 0
    kills = 0
    down_since = None
    restart_at = None
    next_kill = time.monotonic() + rng.uniform(1.0, 2.5)
    t0 = time.monotonic()
    hard_stop = t0 + 90
    tail_until = None
    downtimes = []
    while time.monotonic() < hard_stop:
        now = time.monotonic()
        # Offer records at RATE per second (kept up even while the broker is down).
        target = int((now - t0) * RATE)
        while seq < target:
            part = seq % PARTITIONS
            prod = (seq // PARTITIONS) % len(producers)
            try:
                producers[prod].produce(topic, value=value_of(seq, part, prod), key=str(seq).encode(),
                                        partition=part, on_delivery=on_delivery)
            except BufferError:
                break
            seq += 1
        for p in producers:
            p.poll(0)
        if restart_at is None and kills < ROUNDS and now >= next_kill:
            broker.kill9()
            kills += 1
            down_since = now
            restart_at = now + rng.uniform(0.05, 1.0)
            print(f"[crash] round {kills}: SIGKILL at t={now - t0:.2f}s, seq={seq}, acked so far {len(acked)}")
        elif restart_at is not None and now >= restart_at:
            broker.start()
            downtimes.append(time.monotonic() - down_since)
            restart_at = None
            next_kill = time.monotonic() + rng.uniform(1.0, 3.0)
            if kills == ROUNDS:
                tail_until = time.monotonic() + 2.0
        if tail_until is not None and now >= tail_until:
            break
        time.sleep(0.002)
    assert kills == ROUNDS, f"only {kills} of {ROUNDS} kill rounds ran within the time budget"
    sent = seq
    left = sum(p.flush(150) for p in producers)
    produce_s = time.monotonic() - t0
    print(f"[crash] offered {sent} records in {produce_s:.1f}s; acked={len(acked)} failed={len(failed)} "
          f"in-flight-after-flush={left} downtimes={[round(d, 2) for d in downtimes]}")
    errs = {}
    for e in failed.values():
        errs[str(e)] = errs.get(str(e), 0) + 1
    if errs:
        print(f"[crash] delivery errors: {errs}")
    if client_errors:
        kinds = {}
        for e in client_errors:
            kinds[e.name()] = kinds.get(e.name(), 0) + 1
        print(f"[crash] client errors by kind: {kinds}")
    assert not fatal, f"idempotent producer hit fatal error(s): {[str(e) for e in fatal]}"
    assert left == 0, f"{left} records still undelivered 150 s after the last restart"

    # Read the whole topic back.
    records = confluent_consume_all(broker.bootstrap, topic, PARTITIONS, len(acked), timeout=120,
                                    extra_conf={"check.crcs": True})
    found = {}
    anomalies = {"lost-write": [], "duplicate": [], "inconsistent-offsets": [], "nonmonotonic-poll": [],
                 "offset-gap": [], "corrupt": []}
    last_seq = {}
    last_off = {}
    for r in records:
        prev_off = last_off.get(r.partition)
        if prev_off is not None and r.offset != prev_off + 1:
            anomalies["offset-gap"].append((r.partition, prev_off, r.offset))
        last_off[r.partition] = r.offset
        got = parse(r.value)
        if got is None or got[1] != r.partition:
            anomalies["corrupt"].append((r.partition, r.offset, (r.value or b"")[:60]))
            continue
        s, _, prod = got
        if s in found:
            anomalies["duplicate"].append((s, found[s], (r.partition, r.offset)))
            continue
        found[s] = (r.partition, r.offset)
        # Each producer's records keep their produce order within a partition.
        if s <= last_seq.get((r.partition, prod), -1):
            anomalies["nonmonotonic-poll"].append((r.partition, r.offset, s, last_seq[(r.partition, prod)]))
        last_seq[(r.partition, prod)] = s
    for s, where in acked.items():
        if s not in found:
            anomalies["lost-write"].append((s, where))
        elif found[s] != where:
            anomalies["inconsistent-offsets"].append((s, "acked", where, "found", found[s]))
    first = {}
    for r in records:
        first.setdefault(r.partition, r.offset)
    unacked_present = len(set(found) - set(acked))
    print(f"[crash] read back {len(records)} records; acknowledged={len(acked)} "
          f"lost={len(anomalies['lost-write'])} duplicated={len(anomalies['duplicate'])} "
          f"unacknowledged-but-present={unacked_present} first offsets={first}")
    # On disk: whole batches only, contiguous offsets, nothing after the last batch.
    if broker.data_dir is not None:
        leftovers = []
        stored = stored_batches(broker.data_dir, topic, leftovers)
        next_off = {}
        for part, base, count, _codec, magic in sorted(stored):
            if magic != 2 or base != next_off.get(part, 0):
                anomalies["corrupt"].append(f"on disk p{part}: batch at {base} (magic {magic}), expected {next_off.get(part, 0)}")
            next_off[part] = base + count
        for seg, n in leftovers:
            anomalies["corrupt"].append(f"{n} bytes after the last whole batch in {seg}")
        truncations = sum(1 for line in broker.log_path.read_text(errors="replace").splitlines()
                          if "truncat" in line.lower())
        print(f"[crash] on disk: {len(stored)} batches, ends {next_off}; broker log lines mentioning truncation: "
              f"{truncations}")
    bad = {k: v for k, v in anomalies.items() if v}
    assert not bad, "anomalies: " + "; ".join(f"{k}: {len(v)} e.g. {v[:5]}" for k, v in bad.items())
    assert all(o == 0 for o in first.values()), f"offset-gap: partitions do not start at 0: {first}"
    assert not failed, f"{len(failed)} records failed delivery despite a 120 s message timeout: {errs}"
    assert len(acked) == sent, f"acknowledged {len(acked)} of {sent}"
    assert len(acked) > RATE, f"too few records acknowledged ({len(acked)}) for a meaningful crash test"


def test_graceful_stop_and_restart_keeps_everything(broker):
    """SIGTERM: the broker exits 0, and after a restart every acknowledged record
    and the idempotent producer's state are still there (a retried sequence is
    not appended twice, the next one continues the partition)."""
    topic = unique("graceful")
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=RF)])[topic].result(30)
    acked = {}

    def on_delivery(err, msg):
        assert err is None, err
        acked[parse(msg.value())[0]] = (msg.partition(), msg.offset())

    p = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True, "acks": "all",
                  "message.timeout.ms": 60000, "reconnect.backoff.max.ms": 500})
    for s in range(2000):
        p.produce(topic, value=value_of(s, s % PARTITIONS), partition=s % PARTITIONS, on_delivery=on_delivery)
    assert p.flush(30) == 0
    rc = broker.stop()
    assert rc == 0, f"sluice serve exited {rc} on SIGTERM"
    broker.start()
    for s in range(2000, 3000):
        p.produce(topic, value=value_of(s, s % PARTITIONS), partition=s % PARTITIONS, on_delivery=on_delivery)
    assert p.flush(60) == 0
    assert len(acked) == 3000
    recs = confluent_consume_all(broker.bootstrap, topic, PARTITIONS, 3000, timeout=60)
    found = {parse(r.value)[0]: (r.partition, r.offset) for r in recs}
    assert len(recs) == 3000, f"duplicate/lost: read {len(recs)} records for 3000 acknowledged"
    assert found == acked, "inconsistent-offsets after a graceful restart"


def test_torn_tail_is_truncated_on_restart(broker):
    """A crash that leaves half a batch at the end of the active segment (a torn
    write) is repaired on start: the fragment is cut off, every acknowledged
    record is served, nothing of the fragment is, and new appends continue at the
    next offset."""
    if broker.data_dir is None:
        pytest.skip("external broker: data directory not visible")
    topic = unique("torn")
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=RF)])[topic].result(30)
    p = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all", "linger.ms": 5, "log_level": 2})
    for s in range(100):
        p.produce(topic, value=value_of(s, 0), partition=0)
    assert p.flush(30) == 0
    broker.kill9()

    segs = sorted((Path(broker.data_dir) / f"{topic}-0").glob("*.log"))
    assert segs, f"no segment files under {broker.data_dir}/{topic}-0"
    seg = segs[-1]
    data = seg.read_bytes()
    # The torn write: a prefix (header + some records) of a copy of the last batch.
    batches = stored_batches(broker.data_dir, topic)
    last_base = batches[-1][1]
    start = None
    pos = 0
    while pos + 12 <= len(data):
        base, length = struct.unpack_from(">qi", data, pos)
        if base == last_base:
            start = pos
            break
        pos += 12 + length
    assert start is not None
    last = data[start:]
    fragment = bytearray(last[: max(70, len(last) // 2)])
    struct.pack_into(">q", fragment, 0, 100)  # as if the next batch, at offset 100, was being written
    with open(seg, "ab") as f:
        f.write(fragment)
    print(f"[torn] appended {len(fragment)} bytes of a {len(last)}-byte batch to {seg.name} ({len(data)} bytes)")

    broker.start()
    recs = confluent_consume_all(broker.bootstrap, topic, 1, 100, timeout=30)
    assert [parse(r.value)[0] for r in recs] == list(range(100)), "records after torn-tail recovery differ"
    p = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all", "log_level": 2})
    offs = []
    for s in range(100, 110):
        p.produce(topic, value=value_of(s, 0), partition=0, on_delivery=lambda e, m: offs.append(m.offset()))
    assert p.flush(30) == 0
    assert offs == list(range(100, 110)), f"appends after recovery got offsets {offs}"
    leftovers = []
    stored = stored_batches(broker.data_dir, topic, leftovers)
    assert not leftovers, f"bytes after the last whole batch after recovery: {leftovers}"
    assert sum(b[2] for b in stored) == 110
    log = broker.log_path.read_text(errors="replace").lower()
    assert "truncat" in log, "recovery did not log the truncation of the torn tail"

"""aiokafka: produce with keys/headers/timestamps (all four codecs), consume with
a group and commit, then a second consumer of the same group sees nothing new
until more is produced."""

import asyncio
import time

from kutil import CODECS, make_value, parse_value, unique, RF

N_PER_CODEC = 500
PARTITIONS = 3


async def _produce(bootstrap, topic, start, n_per_codec, base_ts):
    from aiokafka import AIOKafkaProducer

    sent = {}
    i = start
    for codec in CODECS:
        p = AIOKafkaProducer(bootstrap_servers=bootstrap, compression_type=codec, acks="all",
                             enable_idempotence=True, linger_ms=10)
        await p.start()
        try:
            futs = []
            for _ in range(n_per_codec):
                key = f"k{i % 50}".encode()
                hdrs = [("codec", codec.encode()), ("i", str(i).encode())]
                futs.append((i, await p.send(topic, key=key, value=make_value("aio", i, key.decode(), codec),
                                             headers=hdrs, timestamp_ms=base_ts + i)))
                sent[i] = (key, tuple(hdrs), base_ts + i)
                i += 1
            for j, f in futs:
                md = await asyncio.wait_for(f, 30)
                assert md.offset >= 0, (j, md)
        finally:
            await p.stop()
    return sent


async def _consume_group(bootstrap, topic, group, expect, idle_s):
    from aiokafka import AIOKafkaConsumer

    c = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group, auto_offset_reset="earliest",
                         enable_auto_commit=False, session_timeout_ms=10000, heartbeat_interval_ms=500)
    await c.start()
    out = []
    try:
        deadline = time.monotonic() + 30
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            batch = await c.getmany(timeout_ms=300, max_records=2000)
            got = [m for msgs in batch.values() for m in msgs]
            if got:
                out.extend(got)
                last_new = time.monotonic()
                await c.commit()
            elif len(out) >= expect and time.monotonic() - last_new >= idle_s:
                break
        else:
            raise AssertionError(f"aiokafka group consumer read {len(out)} of {expect} within 30 s")
    finally:
        await c.stop()
    return out


def _check(records, sent):
    seen = {}
    last_off = {}
    for m in records:
        tag, i, key, codec = parse_value(m.value)
        assert tag == "aio"
        assert i not in seen, f"duplicate: record {i} at {seen[i]} and {(m.partition, m.offset)}"
        seen[i] = (m.partition, m.offset)
        assert m.offset > last_off.get(m.partition, -1), f"nonmonotonic-poll: p{m.partition} {m.offset}"
        last_off[m.partition] = m.offset
        key_, hdrs, ts = sent[i]
        assert m.key == key_, (i, m.key)
        assert tuple(m.headers) == hdrs, (i, m.headers, hdrs)
        assert m.timestamp == ts and m.timestamp_type == 0, (i, m.timestamp, m.timestamp_type)
    lost = set(sent) - set(seen)
    assert not lost, f"lost-write: {len(lost)} records, e.g. {sorted(lost)[:10]}"
    return seen


async def _scenario(bootstrap):
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    topic = unique("aio")
    group = unique("aio-g")
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=RF)])
    finally:
        await admin.close()
    base_ts = int(time.time() * 1000) - 60_000
    sent = await _produce(bootstrap, topic, 0, N_PER_CODEC, base_ts)
    recs = await _consume_group(bootstrap, topic, group, len(sent), idle_s=1.0)
    print(f"[aiokafka] consumed {len(recs)} of {len(sent)} with group {group}")
    assert len(recs) == len(sent), f"duplicate: read {len(recs)} records for {len(sent)} produced"
    seen = _check(recs, sent)
    assert len({p for p, _ in seen.values()}) == PARTITIONS

    # The group resumes from its commits: only the new records are read.
    more = await _produce(bootstrap, topic, len(sent), 25, base_ts)
    recs2 = await _consume_group(bootstrap, topic, group, len(more), idle_s=1.0)
    print(f"[aiokafka] resumed group read {len(recs2)} records (expected {len(more)})")
    assert len(recs2) == len(more), f"resumed group read {len(recs2)} records, expected exactly {len(more)}"
    _check(recs2, more)


def test_aiokafka_produce_consume_group(broker):
    asyncio.run(asyncio.wait_for(_scenario(broker.bootstrap), 100))

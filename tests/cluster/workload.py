"""The clients of the fault tests: an idempotent acks=all producer writing unique,
sequential values at a steady rate and recording every outcome; consumers polling
the topic and recording what they read; and the final drain. Everything they
record is turned into checker.Write / checker.Read.

Times are seconds on time.monotonic() relative to the scenario's start (``t0``).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Optional

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from checker import FAIL, OK, UNKNOWN, Commit, Read, Write

PAD = "v" * 64  # a little body, so batches are not trivially small


def client_logger(path) -> logging.Logger:
    """librdkafka's own log (connection refused, timeouts...) goes to a file, not the console."""
    name = f"rdkafka.{path}"
    lg = logging.getLogger(name)
    if not lg.handlers:
        h = logging.FileHandler(path)
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        lg.addHandler(h)
        lg.setLevel(logging.INFO)
        lg.propagate = False
    return lg


class ProducerWorkload(threading.Thread):
    """Offers `rate` records per second, round robin over the partitions. A producer
    that hits a fatal error is closed and replaced by a new instance (new producer id),
    so the history carries on; fatal errors are counted."""

    def __init__(self, bootstrap, topic, partitions, rate, t0, logger, message_timeout_ms=60000, run_id=None):
        super().__init__(daemon=True, name="producer")
        self.bootstrap = bootstrap
        self.topic = topic
        self.partitions = partitions
        self.rate = rate
        self.t0 = t0
        self.logger = logger
        self.message_timeout_ms = message_timeout_ms
        self.run_id = run_id or uuid.uuid4().hex[:6]
        self.stop_event = threading.Event()
        self.flush_timeout = message_timeout_ms / 1000 + 15
        self.records = {}  # value -> dict(partition, producer, seq, t_send, outcome, offset, t_done, error)
        self.ack_times = []  # appended from the delivery callback (producer thread)
        self.fatal = []
        self.client_errors = {}
        self.instances = 0
        self._fatal_handled = 0
        self.sent = 0
        self.left_after_flush = 0
        self.crashed: Optional[BaseException] = None

    def now(self):
        return time.monotonic() - self.t0

    def _new_producer(self):
        self.instances += 1
        self.instance = f"p{self.instances}"
        self.seq = 0
        return Producer(
            {
                "bootstrap.servers": self.bootstrap,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                "message.timeout.ms": self.message_timeout_ms,
                "request.timeout.ms": 10000,
                "retry.backoff.ms": 100,
                "retry.backoff.max.ms": 1000,
                "reconnect.backoff.ms": 100,
                "reconnect.backoff.max.ms": 1000,
                "socket.connection.setup.timeout.ms": 5000,
                "topic.metadata.refresh.interval.ms": 5000,
                "queue.buffering.max.messages": 500000,
                "error_cb": self._on_error,
                "logger": self.logger,
            }
        )

    def _on_error(self, err):
        self.client_errors[err.name()] = self.client_errors.get(err.name(), 0) + 1
        if err.fatal():
            self.fatal.append((self.now(), str(err)))

    def _on_delivery(self, err, msg):
        value = msg.value().decode()
        rec = self.records.get(value)
        if rec is None:
            return
        t = self.now()
        if err is None:
            rec.update(outcome=OK, offset=msg.offset(), t_done=t, partition=msg.partition())
            self.ack_times.append(t)
        else:
            rec.update(outcome=FAIL, t_done=t, error=err.name())

    def run(self):
        try:
            self._run()
        except BaseException as e:  # reported by the scenario
            self.crashed = e

    def _run(self):
        p = self._new_producer()
        start = time.monotonic()
        n = 0
        while not self.stop_event.is_set():
            if len(self.fatal) > self._fatal_handled:
                # The instance is unusable: fail what it still holds, start a new one.
                self._fatal_handled = len(self.fatal)
                p.flush(5)
                p = self._new_producer()
            due = int((time.monotonic() - start) * self.rate)
            while n < due:
                part = n % self.partitions
                value = f"{self.run_id}:{self.instance}:{self.seq}:{PAD}"
                self.records[value] = dict(
                    partition=part, producer=self.instance, seq=self.seq, t_send=self.now(),
                    outcome=UNKNOWN, offset=None, t_done=None, error=None,
                )
                try:
                    p.produce(self.topic, value=value.encode(), key=str(n).encode(), partition=part,
                              on_delivery=self._on_delivery)
                except BufferError:
                    del self.records[value]
                    break
                except KafkaException as e:  # fatal state: reported through error_cb too
                    del self.records[value]
                    self.fatal.append((self.now(), str(e)))
                    break
                self.seq += 1
                n += 1
            p.poll(0.01)
        self.sent = n
        self.left_after_flush = p.flush(self.flush_timeout)

    def stop(self):
        self.stop_event.set()
        self.join(self.flush_timeout + 30)

    def last_ack(self) -> Optional[float]:
        return self.ack_times[-1] if self.ack_times else None

    def acks_after(self, t) -> int:
        return sum(1 for x in list(self.ack_times) if x > t)

    def writes(self) -> list:
        return [
            Write(value=v, partition=r["partition"], producer=r["producer"], seq=r["seq"], t_send=r["t_send"],
                  outcome=r["outcome"], offset=r["offset"], t_done=r["t_done"], error=r["error"])
            for v, r in self.records.items()
        ]


class ConsumerWorkload(threading.Thread):
    """Reads every partition (assign, no group) from the beginning while the faults run.
    An offset-out-of-range is not papered over by a reset: it is recorded and the
    consumer resumes after the last offset it read, as a new reader session."""

    def __init__(self, name, bootstrap, topic, partitions, t0, logger):
        super().__init__(daemon=True, name=name)
        self.reader_name = name
        self.bootstrap = bootstrap
        self.topic = topic
        self.partitions = partitions
        self.t0 = t0
        self.logger = logger
        self.stop_event = threading.Event()
        self.reads = []
        self.errors = {}
        self.sessions = 0
        self.crashed: Optional[BaseException] = None

    def _consumer(self, positions):
        self.sessions += 1
        self.reader = f"{self.reader_name}.{self.sessions}"
        c = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"jepsen-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "auto.offset.reset": "error",
                "check.crcs": True,
                "fetch.wait.max.ms": 200,
                "topic.metadata.refresh.interval.ms": 5000,
                "reconnect.backoff.ms": 100,
                "reconnect.backoff.max.ms": 1000,
                "socket.connection.setup.timeout.ms": 5000,
                "logger": self.logger,
            }
        )
        c.assign([TopicPartition(self.topic, p, positions.get(p, OFFSET_BEGINNING)) for p in range(self.partitions)])
        return c

    def run(self):
        try:
            self._run()
        except BaseException as e:
            self.crashed = e

    def _run(self):
        positions = {}
        c = self._consumer(positions)
        try:
            while not self.stop_event.is_set():
                for m in c.consume(num_messages=1000, timeout=0.2):
                    err = m.error()
                    if err is not None:
                        self.errors[err.name()] = self.errors.get(err.name(), 0) + 1
                        if err.code() == KafkaError._AUTO_OFFSET_RESET:
                            c.close()
                            c = self._consumer(positions)
                            break
                        continue
                    value = (m.value() or b"").decode(errors="replace")
                    self.reads.append(Read(self.reader, m.partition(), m.offset(), value, time.monotonic() - self.t0))
                    positions[m.partition()] = m.offset() + 1
        finally:
            c.close()

    def stop(self):
        self.stop_event.set()
        self.join(30)


class GroupConsumerWorkload(threading.Thread):
    """One member of a consumer group (subscribe, manual commits every
    `commit_every` seconds, synchronous). Records what it reads (a new reader session
    per assignment) and every commit the coordinator acknowledged. The group
    coordinator lives with the leader of __consumer_offsets-0, so the faults move it."""

    def __init__(self, bootstrap, topic, group, t0, logger, commit_every=1.0):
        super().__init__(daemon=True, name="group")
        self.bootstrap = bootstrap
        self.topic = topic
        self.group = group
        self.t0 = t0
        self.logger = logger
        self.commit_every = commit_every
        self.stop_event = threading.Event()
        self.reads = []
        self.commits = []
        self.commit_failures = {}
        self.errors = {}
        self.sessions = 0
        self.assignments = 0
        self.crashed: Optional[BaseException] = None

    def _on_assign(self, consumer, partitions):
        self.assignments += 1
        self.sessions += 1

    def _on_revoke(self, consumer, partitions):
        self.sessions += 1

    def run(self):
        try:
            self._run()
        except BaseException as e:
            self.crashed = e

    def _commit(self, c):
        try:
            tps = c.commit(asynchronous=False)
        except KafkaException as e:
            err = e.args[0] if e.args else e
            if isinstance(err, KafkaError) and err.code() == KafkaError._NO_OFFSET:
                return  # nothing consumed since the last commit
            name = err.name() if isinstance(err, KafkaError) else type(e).__name__
            self.commit_failures[name] = self.commit_failures.get(name, 0) + 1
            return
        t = time.monotonic() - self.t0
        for tp in tps or []:
            if tp.error is None and tp.offset >= 0:
                self.commits.append(Commit(tp.partition, tp.offset, t))
            elif tp.error is not None:
                self.commit_failures[tp.error.name()] = self.commit_failures.get(tp.error.name(), 0) + 1

    def _run(self):
        c = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": self.group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "check.crcs": True,
                "fetch.wait.max.ms": 200,
                "session.timeout.ms": 10000,
                "heartbeat.interval.ms": 1000,
                "topic.metadata.refresh.interval.ms": 5000,
                "reconnect.backoff.ms": 100,
                "reconnect.backoff.max.ms": 1000,
                "socket.connection.setup.timeout.ms": 5000,
                "logger": self.logger,
            }
        )
        c.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        next_commit = time.monotonic() + self.commit_every
        try:
            while not self.stop_event.is_set():
                for m in c.consume(num_messages=1000, timeout=0.2):
                    err = m.error()
                    if err is not None:
                        self.errors[err.name()] = self.errors.get(err.name(), 0) + 1
                        continue
                    value = (m.value() or b"").decode(errors="replace")
                    self.reads.append(
                        Read(f"g.{self.sessions}", m.partition(), m.offset(), value, time.monotonic() - self.t0)
                    )
                if time.monotonic() >= next_commit:
                    self._commit(c)
                    next_commit = time.monotonic() + self.commit_every
            self._commit(c)
        finally:
            c.close()

    def stop(self):
        self.stop_event.set()
        self.join(60)


def committed_offsets(bootstrap, topic, partitions, group, logger, timeout=60.0):
    """The group's committed offsets ({partition: offset}, -1 = none), asked of the
    coordinator by a consumer that does not join the group. None if it never answered."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False, "logger": logger})
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                tps = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
                if all(tp.error is None for tp in tps):
                    return {tp.partition: (tp.offset if tp.offset >= 0 else -1) for tp in tps}
            except KafkaException:
                pass
            if time.monotonic() >= deadline:
                return None
            time.sleep(1)
    finally:
        c.close()


def drain(bootstrap, topic, partitions, logger, timeout=90.0):
    """Reads the whole topic from the beginning up to the high watermarks it finds
    first. Returns (reads, complete, high_watermarks)."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"jepsen-drain-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "check.crcs": True,
            "fetch.wait.max.ms": 100,
            "logger": logger,
        }
    )
    out = []
    deadline = time.monotonic() + timeout
    try:
        ends = {}
        for p in range(partitions):
            while True:
                try:
                    ends[p] = c.get_watermark_offsets(TopicPartition(topic, p), timeout=5)[1]
                    break
                except KafkaException:
                    if time.monotonic() >= deadline:
                        return out, False, ends
                    time.sleep(0.5)
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        pos = {p: -1 for p in range(partitions)}
        while time.monotonic() < deadline:
            if all(pos[p] + 1 >= ends[p] for p in ends):
                return out, True, ends
            for m in c.consume(num_messages=5000, timeout=0.5):
                if m.error() is not None:
                    continue
                out.append(Read("final", m.partition(), m.offset(), (m.value() or b"").decode(errors="replace")))
                pos[m.partition()] = max(pos[m.partition()], m.offset())
        return out, all(pos[p] + 1 >= ends[p] for p in ends), ends
    finally:
        c.close()

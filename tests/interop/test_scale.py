"""Many partitions on one broker under a low descriptor limit, through
confluent-kafka (scale.py does the work; the benchmark suite runs the
100,000-partition variant).

- 25,000 partitions under a limit of 4,096 descriptors: created through the
  admin API, one record produced to each and read back, the broker stopped
  cleanly and started again, then killed and started again, everything
  read after each start. No error anywhere; the log files held open stay
  within the descriptor cache's budget (half the limit); RSS and start-up
  times are printed.
- Descriptors taken by idle connections: opens that fail for lack of
  descriptors close cached files instead of failing requests.
- A budget configured above what the limit allows is lowered to 3/4 of it.

One broker: not run against the three-node cluster.
"""

import socket

import pytest

import scale
from conftest import Broker
from kutil import RF

pytestmark = pytest.mark.skipif(RF != 1, reason="one broker's partitions and descriptors")


def start(tmp_path, name, nofile, config_text=None):
    b = Broker(tmp_path / f"{name}-data", tmp_path / f"{name}.log",
               launcher=["prlimit", f"--nofile={nofile}:{nofile}"],
               env={"SLUICE_LOG": "warn"}, config_text=config_text)
    b.start(timeout=300)
    return b


@pytest.mark.timeout_s(900)
def test_25000_partitions_under_a_limit_of_4096_descriptors(tmp_path):
    nofile = 4096
    budget = nofile // 2
    b = start(tmp_path, "scale", nofile)
    figures = {}

    def report(name, value):
        figures[name] = value
        print(f"[scale] {name} {value}", flush=True)

    try:
        scale.run(b, [f"scale-{i:04}" for i in range(250)], report)
    finally:
        b._kill_proc()
    for phase in ("read", "read_after_clean", "read_after_kill9"):
        assert figures[phase] == 25_000, figures
    for fds in ("fds", "fds_after_clean", "fds_after_kill9"):
        total, data = figures[fds]
        # The cache's budget, plus a directory being synced or a checkpoint
        # being written at the moment of counting.
        assert data <= budget + 8, figures
        assert total < nofile, figures
    # About 240 MiB measured: twice that catches per-partition memory
    # growing (fetch buffers rounded up to 64 KiB per partition once held
    # 1.6 GB for one fetch over every partition).
    assert figures["rss_mib"] < 512, figures
    assert figures["rss_after_kill9_restart_mib"] < 512, figures


@pytest.mark.timeout_s(300)
def test_running_out_of_descriptors_closes_cached_files_instead_of_failing(tmp_path):
    # A limit of 1,024: the cache may keep 512 segment files open, and 520
    # idle client connections take most of the rest, so the cache's opens
    # fail with EMFILE once 3,000 partitions are written and read.
    b = start(tmp_path, "exhausted", 1024)
    topics = [f"over-{i:02}" for i in range(30)]
    idle = []
    try:
        scale.create_topics(b.bootstrap, topics)
        host, port = b.bootstrap.rsplit(":", 1)
        for _ in range(520):
            idle.append(socket.create_connection((host, int(port))))
        assert scale.produce_one_each(b.bootstrap, topics) == 3_000
        assert scale.read_all(b.bootstrap, topics) == 3_000
        log = b.log_path.read_text(errors="replace")
        assert "out of file descriptors: keeping fewer segment files open" in log
        assert "KAFKA_STORAGE_ERROR" not in log and "storage error" not in log.lower()
        total, _ = scale.open_descriptors(b.proc.pid, b.data_dir)
        assert total <= 1024
    finally:
        for s in idle:
            s.close()
        b._kill_proc()


def test_a_budget_above_the_limit_is_lowered(tmp_path):
    b = start(tmp_path, "overbudget", 1024, config_text="[storage]\nmax_open_segment_files = 100000\n")
    try:
        topics = ["wide-0", "wide-1"]
        scale.create_topics(b.bootstrap, topics)
        assert scale.produce_one_each(b.bootstrap, topics) == 200
        assert scale.read_all(b.bootstrap, topics) == 200
        log = b.log_path.read_text(errors="replace")
        assert "more segment files configured than the descriptor limit allows" in log
    finally:
        b._kill_proc()

"""Unit tests of the history checker on synthetic histories (no broker needed):

    /var/tmp/sluice-venv/bin/python -m pytest tests/cluster/test_checker.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from checker import (  # noqa: E402
    FAIL,
    OK,
    UNKNOWN,
    Commit,
    Read,
    Write,
    check,
    duplicates,
    group_gaps,
    lost_commits,
    partition_gaps,
    poll_order,
    reorders,
    unavailability,
    unwritable_partitions,
)


def w(seq, partition=0, outcome=OK, offset=None, t=None, producer="p0", value=None, t_done=None, error=None):
    t = float(seq) if t is None else t
    return Write(
        value=value or f"{producer}-{seq}",
        partition=partition,
        producer=producer,
        seq=seq,
        t_send=t,
        outcome=outcome,
        offset=offset if outcome == OK else None,
        t_done=(t + 0.01 if t_done is None else t_done) if outcome != UNKNOWN else None,
        error=error if outcome == FAIL else None,
    )


def r(partition, offset, value, reader="final", t=0.0):
    return Read(reader, partition, offset, value, t)


def clean_history(n=10, partitions=2):
    writes = [w(i, partition=i % partitions, offset=i // partitions) for i in range(n)]
    final = [r(x.partition, x.offset, x.value) for x in writes]
    reads = [r(x.partition, x.offset, x.value, reader="c1") for x in writes]
    return writes, reads, final


def test_clean_history_passes():
    writes, reads, final = clean_history()
    rep = check(writes, reads, final)
    assert rep.ok, rep.examples
    assert rep.info["acknowledged"] == 10
    assert rep.info["final-records"] == 10
    assert rep.info["polled"] == 10
    assert "lost=0" in rep.summary()


def test_empty_history_passes():
    rep = check([], [], [])
    assert rep.ok
    assert rep.info["unavailable-s"] == 0.0


def test_lost_acknowledged_write():
    writes, reads, final = clean_history()
    final = [x for x in final if x.value != "p0-4"]
    reads = [x for x in reads if x.value != "p0-4"]
    rep = check(writes, reads, final)
    assert rep.counts["lost"] == 1
    assert rep.examples["lost"][0].value == "p0-4"
    assert "lost" in rep.failures
    # The hole it leaves in partition 0 is reported too.
    assert rep.counts["offset-gap"] == 1


def test_failed_or_unknown_writes_may_be_absent_or_present():
    writes = [
        w(0, offset=0),
        w(1, outcome=FAIL, error="_MSG_TIMED_OUT"),
        w(2, outcome=UNKNOWN),
        w(3, outcome=FAIL, error="_MSG_TIMED_OUT"),
        w(4, offset=2),
    ]
    # 1 never landed, 3 landed although the client gave up (indeterminate).
    final = [r(0, 0, "p0-0"), r(0, 1, "p0-3"), r(0, 2, "p0-4")]
    rep = check(writes, [], final)
    assert rep.ok, rep.examples
    assert rep.info["failed"] == 2
    assert rep.info["unknown"] == 1
    assert rep.info["unacked-present"] == 1
    assert rep.info["errors"] == {"_MSG_TIMED_OUT": 2}


def test_duplicate_in_final_log():
    writes, reads, final = clean_history()
    final = final + [r(0, 5, "p0-2")]
    rep = check(writes, reads, final)
    assert rep.counts["duplicate"] == 1
    value, where = rep.examples["duplicate"][0]
    assert value == "p0-2" and where == [(0, 1), (0, 5)]


def test_duplicate_seen_only_by_a_consumer():
    writes, reads, final = clean_history(4, partitions=1)
    reads = reads + [r(0, 4, "p0-1", reader="c2")]
    rep = check(writes, reads, final)
    assert rep.counts["duplicate"] == 1
    # The consumer saw offset 4 which the final log does not hold: also a dirty read? no --
    # the value itself is in the final log, so it is a duplicate, not a dirty read.
    assert rep.counts["dirty-read"] == 0


def test_duplicates_helper_groups_positions():
    got = duplicates([r(0, 1, "a"), r(0, 1, "a", reader="c"), r(1, 0, "a"), r(0, 2, "b")])
    assert got == [("a", [(0, 1), (1, 0)])]


def test_inconsistent_offset_between_two_reads():
    writes, reads, final = clean_history(6, partitions=1)
    # A consumer saw value p0-9 at offset 3 (later overwritten by p0-3): the value is
    # also not in the final log, so it is a dirty read as well.
    extra = Write("p0-9", 0, "p0", 9, 9.0, FAIL, None, 9.5, "_MSG_TIMED_OUT")
    reads = [x for x in reads if x.offset < 3] + [r(0, 3, "p0-9", reader="c1")]
    rep = check(writes + [extra], reads, final)
    assert rep.counts["inconsistent"] == 1
    pos, values = rep.examples["inconsistent"][0]
    assert pos == (0, 3) and values == ["p0-3", "p0-9"]
    assert rep.counts["dirty-read"] == 1


def test_acknowledged_offset_disagrees_with_log():
    writes = [w(0, offset=0), w(1, offset=1)]
    # The log holds both values, but swapped relative to the acknowledgements.
    final = [r(0, 0, "p0-1"), r(0, 1, "p0-0")]
    rep = check(writes, [], final)
    assert rep.counts["inconsistent"] == 2
    assert rep.counts["lost"] == 0


def test_dirty_read_of_vanished_unacknowledged_write():
    writes = [w(0, offset=0), w(1, outcome=FAIL, error="NOT_LEADER"), w(2, offset=1)]
    # The consumer read p0-1 at offset 1 from a deposed leader; after the new leader
    # took over, offset 1 holds p0-2 and p0-1 is gone.
    reads = [r(0, 0, "p0-0", "c1"), r(0, 1, "p0-1", "c1")]
    final = [r(0, 0, "p0-0"), r(0, 1, "p0-2")]
    rep = check(writes, reads, final)
    assert rep.counts["dirty-read"] == 1
    assert rep.counts["inconsistent"] == 1
    assert rep.counts["lost"] == 0


def test_nonmonotonic_poll():
    writes, _, final = clean_history(5, partitions=1)
    reads = [r(0, 0, "p0-0", "c1"), r(0, 1, "p0-1", "c1"), r(0, 2, "p0-2", "c1"), r(0, 1, "p0-1", "c1")]
    rep = check(writes, reads, final)
    assert rep.counts["nonmonotonic"] == 1
    prev, cur = rep.examples["nonmonotonic"][0]
    assert (prev.offset, cur.offset) == (2, 1)
    # Re-reading is not a duplicate: same value at the same position.
    assert rep.counts["duplicate"] == 0


def test_separate_readers_and_partitions_are_independent():
    reads = [
        r(0, 5, "a", "c1"),
        r(1, 0, "b", "c1"),  # other partition: no ordering relation to offset 5 of p0
        r(0, 0, "c", "c2"),  # other reader (a rebuilt consumer starts again)
        r(0, 6, "d", "c1"),
    ]
    nonmono, skips = poll_order(reads, [])
    assert nonmono == [] and skips == []


def test_skip_over_committed_offsets():
    writes, _, final = clean_history(5, partitions=1)
    reads = [r(0, 0, "p0-0", "c1"), r(0, 3, "p0-3", "c1"), r(0, 4, "p0-4", "c1")]
    rep = check(writes, reads, final)
    assert rep.counts["skip"] == 1
    prev, cur, missed = rep.examples["skip"][0]
    assert (prev.offset, cur.offset, missed) == (0, 3, 2)


def test_skip_over_offsets_the_log_does_not_hold_is_not_reported():
    # Offsets 1..2 are not in the final log (e.g. a transaction marker); jumping them is fine.
    _, skips = poll_order([r(0, 0, "a", "c1"), r(0, 3, "b", "c1")], [r(0, 0, "a"), r(0, 3, "b")])
    assert skips == []


def test_reorder_of_acknowledged_writes():
    writes = [w(0, offset=1), w(1, offset=0)]
    final = [r(0, 0, "p0-1"), r(0, 1, "p0-0")]
    rep = check(writes, [], final)
    assert rep.counts["reorder"] == 1
    a, b = rep.examples["reorder"][0]
    assert (a.seq, b.seq) == (0, 1)


def test_reorder_only_within_producer_and_partition():
    writes = [
        w(0, offset=1, producer="a"),
        w(1, offset=0, producer="b"),  # other producer
        w(2, partition=1, offset=0, producer="a"),  # other partition
        w(3, offset=2, producer="a"),
    ]
    assert reorders(writes) == []


def test_offset_gap_and_phantom():
    writes = [w(0, offset=0), w(1, offset=2)]
    final = [r(0, 0, "p0-0"), r(0, 2, "p0-1"), r(0, 3, "garbage")]
    rep = check(writes, [], final)
    assert rep.counts["offset-gap"] == 1
    assert rep.examples["offset-gap"][0] == (0, 0, 2)
    assert rep.counts["phantom"] == 1


def test_drain_incomplete_fails():
    writes, reads, final = clean_history()
    rep = check(writes, reads, final, drain_complete=False)
    assert rep.failures == ["drain-incomplete"]


def test_unavailability_is_longest_gap_between_acks():
    writes = [
        w(0, offset=0, t=0.0, t_done=1.0),
        w(1, offset=1, t=1.0, t_done=2.0),
        w(2, outcome=FAIL, t=2.0, t_done=9.0, error="x"),
        w(3, offset=2, t=3.0, t_done=8.0),
        w(4, offset=3, t=8.5, t_done=8.6),
    ]
    secs, a, b = unavailability(writes, 0.0, 10.0)
    assert (secs, a, b) == (6.0, 2.0, 8.0)
    rep = check(writes, [], [r(0, i, f"p0-{s}") for i, s in enumerate([0, 1, 3, 4])], t_start=0.0, t_end=10.0)
    assert rep.info["unavailable-s"] == 6.0
    assert rep.info["unavailable-window"] == (2.0, 8.0)


def test_unavailability_without_any_ack_is_whole_window():
    writes = [w(0, outcome=FAIL, error="x"), w(1, outcome=UNKNOWN)]
    assert unavailability(writes, 0.0, 30.0) == (30.0, 0.0, 30.0)


def test_unavailability_counts_the_tail():
    writes = [w(0, offset=0, t=0.0, t_done=0.5)]
    assert unavailability(writes, 0.0, 20.0)[0] == 19.5


def test_summary_lists_every_failing_kind():
    writes, reads, final = clean_history()
    text = check(writes, reads, final).summary()
    for kind in ("lost", "duplicate", "inconsistent", "dirty-read", "nonmonotonic", "reorder", "unavailable"):
        assert kind in text


# -- consumer group ---------------------------------------------------------------


def test_group_history_passes_with_rereads_after_reassignment():
    writes, reads, final = clean_history(6, partitions=1)
    # The member read 0..3, committed 2, lost its assignment, got it back at the
    # committed offset and read 2..5 again: at-least-once, no anomaly.
    group = [r(0, o, f"p0-{o}", reader="g.1") for o in range(4)] + [r(0, o, f"p0-{o}", reader="g.1") for o in range(2, 6)]
    commits = [Commit(0, 2, 1.0), Commit(0, 6, 2.0)]
    rep = check(writes, reads, final, group_reads=group, commits=commits, final_committed={0: 6})
    assert rep.ok, rep.examples
    assert rep.info["group-polled"] == 8
    assert rep.info["final-committed"] == {0: 6}


def test_lost_commit():
    commits = [Commit(0, 3), Commit(0, 7), Commit(1, 2)]
    got = lost_commits(commits, {0: 5, 1: 2})
    assert got == [(Commit(0, 7), 5)]
    # Nothing committed at all for a partition that had an acknowledged commit.
    assert lost_commits([Commit(2, 1)], {}) == [(Commit(2, 1), -1)]
    writes, reads, final = clean_history(8, partitions=1)
    group = [r(0, o, f"p0-{o}", reader="g.1") for o in range(8)]
    rep = check(writes, reads, final, group_reads=group, commits=commits[:2], final_committed={0: 5})
    assert rep.failures == ["lost-commit"]


def test_group_gap_below_committed_offset():
    final = [r(0, o, f"p0-{o}") for o in range(5)]
    group = [r(0, o, f"p0-{o}", reader="g.1") for o in (0, 1, 3)]
    assert group_gaps(group, final, {0: 4}) == [(0, 2)]
    # Records at or above the committed offset need not have been read yet.
    assert group_gaps(group, final, {0: 2}) == []


def test_group_reads_are_checked_for_dirty_reads_but_not_poll_order():
    writes, reads, final = clean_history(4, partitions=1)
    group = [r(0, 2, "p0-2", "g.1"), r(0, 0, "p0-0", "g.1"), r(0, 3, "ghost", "g.1")]
    rep = check(writes, reads, final, group_reads=group, commits=[], final_committed={0: 0})
    assert rep.counts["nonmonotonic"] == 0
    assert rep.counts["dirty-read"] == 1
    assert rep.counts["inconsistent"] == 1


def test_commit_checks_skipped_without_final_committed():
    writes, reads, final = clean_history(4, partitions=1)
    rep = check(writes, reads, final, commits=[Commit(0, 9)])
    assert rep.ok


# -- per-partition writability (bridge) ------------------------------------------------


def acks_every(partition, t_from, t_to, step=0.5, seq0=0, producer="p0"):
    """Acknowledged writes to one partition, one every `step` seconds in [t_from, t_to)."""
    out, t, i = [], t_from, 0
    while t < t_to - 1e-9:
        out.append(w(seq0 + i, partition=partition, offset=seq0 + i, t=t - 0.01, t_done=t, producer=producer))
        t += step
        i += 1
    return out


def test_partition_gaps_per_partition():
    # Partition 0 writable throughout; partition 1 stalls from 4.0 to 11.0.
    writes = acks_every(0, 0.0, 20.0, producer="a") + acks_every(1, 0.0, 4.5, producer="b") + \
        acks_every(1, 11.0, 20.0, seq0=100, producer="b")
    gaps = partition_gaps(writes, 2.0, 16.0, partitions=[0, 1])
    secs, a, b, acks = gaps[0]
    assert secs == 0.5 and acks == 29  # 2.0 .. 16.0, the ends included
    secs, a, b, acks = gaps[1]
    assert (secs, a, b) == (7.0, 4.0, 11.0)
    assert acks == 5 + 11  # 2.0 .. 4.0 and 11.0 .. 16.0


def test_partition_gaps_ignores_failures_and_other_windows():
    writes = [
        w(0, partition=0, offset=0, t=0.0, t_done=1.0),
        w(1, partition=0, outcome=FAIL, t=2.0, t_done=5.0, error="x"),  # a failure is no ack
        w(2, partition=0, outcome=UNKNOWN, t=3.0),
        w(3, partition=0, offset=1, t=3.0, t_done=30.0),  # acknowledged after the window
    ]
    gaps = partition_gaps(writes, 2.0, 10.0, partitions=[0])
    assert gaps[0] == (8.0, 2.0, 10.0, 0)


def test_partition_gaps_lists_silent_partitions_and_acked_ones():
    writes = acks_every(1, 0.0, 10.0)
    gaps = partition_gaps(writes, 0.0, 10.0, partitions=[0])
    # Partition 0 was asked for and never acknowledged: the whole window.
    assert gaps[0] == (10.0, 0.0, 10.0, 0)
    # Partition 1 was not asked for but had acknowledgements: listed too.
    assert gaps[1][3] == 20 and abs(gaps[1][0] - 0.5) < 1e-9


def test_partition_gaps_tail_counts():
    writes = [w(0, partition=0, offset=0, t=0.0, t_done=1.0)]
    assert partition_gaps(writes, 0.0, 20.0, [0])[0] == (19.0, 1.0, 20.0, 1)


def test_bridge_all_partitions_writable_after_grace_passes():
    # Fault 10..35, grace 14: both partitions stall for up to 8 s, then write again.
    writes = acks_every(0, 0.0, 12.0, producer="a") + acks_every(0, 18.0, 40.0, seq0=100, producer="a") + \
        acks_every(1, 0.0, 10.0, producer="b") + acks_every(1, 17.0, 40.0, seq0=100, producer="b")
    assert unwritable_partitions(writes, 10.0, 35.0, 14.0, [0, 1]) == []


def test_bridge_partition_stuck_for_the_whole_fault():
    # Partition 1 never takes a write between the cut (10) and the heal (35): ISR
    # [M] below min.insync.replicas for the whole cut.
    writes = acks_every(0, 0.0, 40.0, producer="a") + acks_every(1, 0.0, 10.0, producer="b") + \
        acks_every(1, 36.0, 40.0, seq0=100, producer="b")
    got = unwritable_partitions(writes, 10.0, 35.0, 14.0, [0, 1])
    assert len(got) == 1
    p, reason, detail = got[0]
    assert (p, reason) == (1, "no-ack-after-grace")
    assert detail["gap_s"] == 25.0 and (detail["gap_from"], detail["gap_to"]) == (10.0, 35.0)
    assert detail["acks_during_fault"] == 0 and detail["acks_after_grace"] == 0


def test_bridge_partition_writable_late_only_is_a_gap_over_grace():
    # Partition 0 writes again only 20 s into the fault (> 14 s grace), then keeps writing.
    writes = acks_every(0, 0.0, 10.0, producer="a") + acks_every(0, 30.0, 40.0, seq0=100, producer="a") + \
        acks_every(1, 0.0, 40.0, producer="b")
    got = unwritable_partitions(writes, 10.0, 35.0, 14.0, [0, 1])
    assert [(p, reason) for p, reason, _ in got] == [(0, "gap-over-grace")]
    d = got[0][2]
    assert (d["gap_s"], d["gap_from"], d["gap_to"]) == (20.0, 10.0, 30.0)
    assert d["acks_after_grace"] == 11  # 30.0 .. 35.0, the ends included


def test_bridge_partition_unwritable_at_the_end_of_the_fault():
    # Partition 0 writes early in the grace, then stalls again until the heal:
    # no acknowledgement after the grace.
    writes = acks_every(0, 0.0, 18.0, producer="a") + acks_every(1, 0.0, 40.0, producer="b")
    got = unwritable_partitions(writes, 10.0, 35.0, 14.0, [0, 1])
    assert [(p, reason) for p, reason, _ in got] == [(0, "no-ack-after-grace")]
    assert got[0][2]["gap_s"] == 17.5  # 17.5 .. 35.0


def test_bridge_fault_shorter_than_grace_checks_gaps_only():
    writes = acks_every(0, 0.0, 10.0) + acks_every(0, 15.0, 20.0, seq0=100)
    # Fault 10..18, grace 14: no window after the grace; a 5 s gap is within it.
    assert unwritable_partitions(writes, 10.0, 18.0, 14.0, [0]) == []


# -- the AMQP scenario's check (amqp_faults.check) ------------------------------------

from amqp_faults import ACK_GRACE_S, SETTLE_S, Delivery  # noqa: E402
from amqp_faults import check as amqp_check  # noqa: E402


def d(body, received, acked=None, redelivered=False):
    return Delivery(body, redelivered, received, received if acked is None else acked, 1)


WINDOWS = [(10.0, 20.0)]  # one fault from 10 s to its heal at 20 s


def test_amqp_a_clean_history_passes():
    attempted = {"a", "b", "c"}
    confirmed = {"a": 1.0, "b": 2.0, "c": 30.0}
    rep = amqp_check(attempted, confirmed, [d("a", 1.1), d("b", 2.1), d("c", 30.1)], WINDOWS, 20.0)
    assert rep.failures == []
    assert rep.counts["confirmed"] == 3 and rep.counts["repeats"] == 0


def test_amqp_a_confirmed_message_never_delivered_is_lost_and_a_stranger_is_a_phantom():
    rep = amqp_check({"a", "b"}, {"a": 1.0, "b": 25.0}, [d("b", 25.1), d("zz", 26.0)], WINDOWS, 20.0)
    assert set(rep.failures) == {"lost", "phantom"}
    assert rep.examples["lost"] == ["a"] and rep.examples["phantom"] == ["zz"]


def test_amqp_an_unconfirmed_message_may_be_missing_or_delivered():
    rep = amqp_check({"a", "b", "c"}, {"a": 1.0, "c": 29.0}, [d("a", 1.1), d("c", 29.5)], WINDOWS, 20.0)
    assert rep.failures == []


def test_amqp_an_ack_outside_every_fault_window_must_hold():
    # Acked at 5 s, well before the fault: delivered again at 12 s is a failure.
    rep = amqp_check({"a", "b"}, {"a": 1.0, "b": 30.0},
                     [d("a", 4.9, acked=5.0), d("a", 12.0, redelivered=True), d("b", 30.1)], WINDOWS, 20.0)
    assert rep.failures == ["acked-redelivered"]
    assert "acked at 5.00s" in rep.examples["acked-redelivered"][0]


def test_amqp_an_ack_in_flight_at_a_fault_may_be_lost():
    # Acked within ACK_GRACE_S of the fault, or before the cluster settled after
    # the heal: coming back is at least once, not a failure.
    inside = [10.0 - ACK_GRACE_S / 2, 15.0, 20.0 + SETTLE_S - 0.5]
    for t in inside:
        rep = amqp_check({"a", "b"}, {"a": 1.0, "b": 40.0},
                         [d("a", t, acked=t), d("a", t + 1.0, redelivered=True), d("b", 40.0)], WINDOWS, 20.0)
        assert rep.failures == [], (t, rep.failures)
        assert rep.counts["repeats"] == 1
    # ...but it comes back flagged redelivered.
    rep = amqp_check({"a", "b"}, {"a": 1.0, "b": 40.0},
                     [d("a", 15.0), d("a", 16.0, redelivered=False), d("b", 40.0)], WINDOWS, 20.0)
    assert rep.failures == ["unflagged-redelivery"]


def test_amqp_an_ack_after_the_cluster_settled_must_hold_and_recovery_is_required():
    settled = 20.0 + SETTLE_S + 0.5
    rep = amqp_check({"a"}, {"a": 1.0}, [d("a", settled, acked=settled), d("a", settled + 2, redelivered=True)],
                     WINDOWS, 20.0)
    assert rep.failures == ["acked-redelivered", "no-recovery"]

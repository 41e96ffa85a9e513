"""Jepsen-style checker for a Kafka produce/consume history.

Pure functions over plain records: no clients, no clock, no I/O, so the unit
tests (test_checker.py) drive every rule with synthetic histories.

A history has three parts:

* ``writes``: one :class:`Write` per record offered to a producer, with its final
  outcome: ``ok`` (acknowledged at a partition/offset), ``fail`` (the client gave
  up: an *indeterminate* outcome -- with acks=all and retries the write may still
  have landed) or ``unknown`` (no answer before the producer was closed).
* ``reads``: every record the live consumers polled while the faults ran,
  in poll order per ``reader`` (a reader is one consumer session; a consumer
  that is rebuilt gets a new reader id).
* ``final``: the whole topic drained from the beginning after the cluster healed.

The anomalies (each one fails the run):

  lost              an acknowledged write is not in the final drain
  duplicate         a value stands at more than one (partition, offset)
  inconsistent      one (partition, offset) holds different values in different
                    reads (a consumer, the final drain, or the producer's ack)
  dirty-read        a consumer read a value that is not in the final drain at all:
                    it saw data that was never committed and later vanished
  nonmonotonic      a consumer polled a partition's offsets out of order
                    (an offset not above the previous one of the same reader)
  skip              a consumer jumped over offsets that the final log holds
  reorder           two acknowledged writes of one producer to one partition
                    stand in the log in the opposite order to their sends
  offset-gap        the final log of a partition is not contiguous
  phantom           the final log holds a value that was never offered
  drain-incomplete  the final drain did not reach the high watermark
  lost-commit       a consumer group's offset commit was acknowledged, but the
                    group's committed offset read back at the end is lower
  group-gap         a record below the group's final committed offset was never
                    delivered to the group (at-least-once broken)

Information only (legal outcomes): ``unacked-present`` (a failed or unanswered
write that did land), and the unavailability window: the longest stretch of the
run without a successful acknowledgement.

Per-partition writability (used by scenarios that hold a fault and expect every
partition to be writable again after a grace period, e.g. the bridge):
:func:`partition_gaps` is the longest stretch of a window without an acknowledged
write, per partition; :func:`unwritable_partitions` turns it into violations
(the scenario reports them as ``partition-unwritable``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

OK = "ok"
FAIL = "fail"
UNKNOWN = "unknown"

FAILING = (
    "lost",
    "duplicate",
    "inconsistent",
    "dirty-read",
    "nonmonotonic",
    "skip",
    "reorder",
    "offset-gap",
    "phantom",
    "drain-incomplete",
    "lost-commit",
    "group-gap",
)

# How many examples of each anomaly a report keeps.
EXAMPLES = 8


@dataclass(frozen=True)
class Write:
    value: str
    partition: int
    producer: str  # producer instance (a rebuilt producer gets a new id)
    seq: int  # send order within the producer instance
    t_send: float
    outcome: str = UNKNOWN  # OK | FAIL | UNKNOWN
    offset: Optional[int] = None  # where it was acknowledged (OK only)
    t_done: Optional[float] = None
    error: Optional[str] = None


@dataclass(frozen=True)
class Read:
    reader: str
    partition: int
    offset: int
    value: str
    t: float = 0.0


@dataclass(frozen=True)
class Commit:
    """An offset commit the group coordinator acknowledged: the group has consumed
    the partition up to (not including) ``offset``."""

    partition: int
    offset: int
    t: float = 0.0


@dataclass
class Report:
    counts: dict = field(default_factory=dict)
    examples: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def failures(self) -> list:
        return [k for k in FAILING if self.counts.get(k, 0) > 0]

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        i = self.info
        parts = [
            f"offered={i.get('offered', 0)}",
            f"acknowledged={i.get('acknowledged', 0)}",
            f"failed={i.get('failed', 0)}",
            f"unknown={i.get('unknown', 0)}",
            f"unacked-present={i.get('unacked-present', 0)}",
            f"final-records={i.get('final-records', 0)}",
            f"polled={i.get('polled', 0)}",
            f"unavailable={i.get('unavailable-s', 0.0):.1f}s",
        ]
        parts += [f"{k}={self.counts.get(k, 0)}" for k in FAILING]
        return " ".join(parts)


# -- single rules ---------------------------------------------------------------


def acked(writes: Iterable[Write]) -> list:
    return [w for w in writes if w.outcome == OK]


def lost_writes(writes: Iterable[Write], final: Iterable[Read]) -> list:
    """Acknowledged writes whose value is nowhere in the final drain."""
    present = {r.value for r in final}
    return [w for w in acked(writes) if w.value not in present]


def duplicates(reads: Iterable[Read]) -> list:
    """Values standing at more than one (partition, offset) across the given reads:
    [(value, [(partition, offset), ...])]."""
    where = defaultdict(set)
    for r in reads:
        where[r.value].add((r.partition, r.offset))
    return sorted((v, sorted(ps)) for v, ps in where.items() if len(ps) > 1)


def inconsistent_offsets(writes: Iterable[Write], reads: Iterable[Read]) -> list:
    """(partition, offset) positions that hold more than one value across every
    observation: the producer's acknowledgements and all reads.
    [((partition, offset), [value, ...])]."""
    seen = defaultdict(set)
    for w in acked(writes):
        if w.offset is not None:
            seen[(w.partition, w.offset)].add(w.value)
    for r in reads:
        seen[(r.partition, r.offset)].add(r.value)
    return sorted((pos, sorted(vs)) for pos, vs in seen.items() if len(vs) > 1)


def dirty_reads(reads: Iterable[Read], final: Iterable[Read]) -> list:
    """Consumer reads of values that are absent from the final log."""
    present = {r.value for r in final}
    return [r for r in reads if r.value not in present]


def poll_order(reads: Sequence[Read], final: Iterable[Read]) -> tuple:
    """(nonmonotonic, skips) in each reader's poll stream, per partition.

    nonmonotonic: a read whose offset is not above the reader's previous offset of
    that partition. skip: consecutive reads whose offsets leave out offsets that the
    final log holds (a reader that missed committed records)."""
    final_offsets = defaultdict(set)
    for r in final:
        final_offsets[r.partition].add(r.offset)
    last = {}
    nonmono, skips = [], []
    for r in reads:
        key = (r.reader, r.partition)
        prev = last.get(key)
        if prev is not None:
            if r.offset <= prev.offset:
                nonmono.append((prev, r))
            elif r.offset > prev.offset + 1:
                held = final_offsets[r.partition]
                missed = [o for o in range(prev.offset + 1, r.offset) if o in held]
                if missed:
                    skips.append((prev, r, len(missed)))
        if prev is None or r.offset > prev.offset:
            last[key] = r
    return nonmono, skips


def reorders(writes: Iterable[Write]) -> list:
    """Pairs of acknowledged writes of one producer to one partition whose offsets
    run against their send order: [(earlier_sent, later_sent)]."""
    groups = defaultdict(list)
    for w in acked(writes):
        if w.offset is not None:
            groups[(w.producer, w.partition)].append(w)
    out = []
    for ws in groups.values():
        ws.sort(key=lambda w: w.seq)
        # Each write against the largest offset acknowledged for an earlier send.
        best = None
        for w in ws:
            if best is not None and w.offset < best.offset:
                out.append((best, w))
            if best is None or w.offset > best.offset:
                best = w
    return out


def offset_gaps(final: Iterable[Read]) -> list:
    """Holes in each partition's drained offsets: [(partition, after, next)]."""
    by_part = defaultdict(list)
    for r in final:
        by_part[r.partition].append(r.offset)
    out = []
    for p, offs in sorted(by_part.items()):
        offs = sorted(set(offs))
        for a, b in zip(offs, offs[1:]):
            if b != a + 1:
                out.append((p, a, b))
    return out


def phantoms(writes: Iterable[Write], final: Iterable[Read]) -> list:
    offered = {w.value for w in writes}
    return [r for r in final if r.value not in offered]


def lost_commits(commits: Iterable[Commit], final_committed: dict) -> list:
    """Acknowledged commits above what the group has committed at the end:
    [(commit, final_offset)]. A partition missing from ``final_committed`` counts as
    offset -1 (nothing committed)."""
    out = []
    best = {}
    for c in commits:
        if c.offset > best.get(c.partition, Commit(c.partition, -1)).offset:
            best[c.partition] = c
    for p, c in sorted(best.items()):
        final = final_committed.get(p, -1)
        if final < c.offset:
            out.append((c, final))
    return out


def group_gaps(group_reads: Iterable[Read], final: Iterable[Read], final_committed: dict) -> list:
    """Records of the final log below the group's final committed offset that no
    member of the group ever read: [(partition, offset)]."""
    seen = {(r.partition, r.offset) for r in group_reads}
    return sorted(
        (r.partition, r.offset)
        for r in final
        if r.offset < final_committed.get(r.partition, -1) and (r.partition, r.offset) not in seen
    )


def unavailability(writes: Iterable[Write], t_start: float, t_end: float) -> tuple:
    """The longest stretch of [t_start, t_end] without a successful acknowledgement:
    (seconds, from, to). The ends of the window count as boundaries, so a run with
    no acknowledgement at all is unavailable for the whole window."""
    times = sorted(w.t_done for w in acked(writes) if w.t_done is not None and t_start <= w.t_done <= t_end)
    marks = [t_start, *times, t_end]
    best = (0.0, t_start, t_start)
    for a, b in zip(marks, marks[1:]):
        if b - a > best[0]:
            best = (b - a, a, b)
    return best


def partition_gaps(writes: Iterable[Write], t_a: float, t_b: float, partitions: Iterable[int] = ()) -> dict:
    """Per partition, the longest stretch of [t_a, t_b] without a successful
    acknowledgement of a write to that partition (by acknowledgement time):
    {partition: (seconds, from, to, acks)}, ``acks`` being the number of
    acknowledgements inside the window. As in :func:`unavailability`, the ends of
    the window count as boundaries. Every partition in ``partitions`` is listed even
    without an acknowledgement (then unwritable for the whole window); partitions
    with acknowledgements in the window are listed too."""
    times = defaultdict(list)
    for w in acked(writes):
        if w.t_done is not None and t_a <= w.t_done <= t_b:
            times[w.partition].append(w.t_done)
    out = {}
    for p in sorted(set(partitions) | set(times)):
        ts = sorted(times.get(p, ()))
        marks = [t_a, *ts, t_b]
        best = (0.0, t_a, t_a)
        for a, b in zip(marks, marks[1:]):
            if b - a > best[0]:
                best = (b - a, a, b)
        out[p] = (*best, len(ts))
    return out


def unwritable_partitions(writes: Iterable[Write], t_fault: float, t_heal: float, grace: float,
                          partitions: Iterable[int]) -> list:
    """Partitions that a fault held over [t_fault, t_heal] left unwritable for too
    long. The cluster gets ``grace`` seconds to react (fence, elect, shrink or grow
    ISRs); after that every partition must take writes again until the heal:

    * ``no-ack-after-grace``: no acknowledged write to the partition in
      [t_fault + grace, t_heal] (checked only when that window is not empty);
    * ``gap-over-grace``: the partition's longest stretch without an
      acknowledgement over the whole fault [t_fault, t_heal] exceeds ``grace``.

    Returns [(partition, reason, detail)], ``detail`` a dict with the longest gap
    (``gap_s``, ``gap_from``, ``gap_to``, times as given), the acknowledgements
    during the fault and after the grace, and the window."""
    whole = partition_gaps(writes, t_fault, t_heal, partitions)
    t_grace = t_fault + grace
    after = partition_gaps(writes, t_grace, t_heal, partitions) if t_grace < t_heal else {}
    out = []
    for p, (secs, a, b, acks) in sorted(whole.items()):
        late = after.get(p, (0.0, t_grace, t_grace, 0))[3]
        detail = dict(gap_s=round(secs, 3), gap_from=round(a, 3), gap_to=round(b, 3), acks_during_fault=acks,
                      acks_after_grace=late, window=(round(t_fault, 3), round(t_heal, 3)), grace_s=grace)
        if t_grace < t_heal and late == 0:
            out.append((p, "no-ack-after-grace", detail))
        elif secs > grace:
            out.append((p, "gap-over-grace", detail))
    return out


# -- the whole check -----------------------------------------------------------------


def check(
    writes: Sequence[Write],
    reads: Sequence[Read],
    final: Sequence[Read],
    *,
    t_start: Optional[float] = None,
    t_end: Optional[float] = None,
    drain_complete: bool = True,
    group_reads: Sequence[Read] = (),
    commits: Sequence[Commit] = (),
    final_committed: Optional[dict] = None,
) -> Report:
    """Runs every rule. ``reads`` are the live consumers' polls in order; ``final``
    the post-heal drain (any order). The unavailability window defaults to the
    first send .. last send.

    ``group_reads`` are a consumer group's polls: they count for duplicates,
    inconsistent positions and dirty reads, but not for poll order (a group member
    legitimately goes back to the committed offset when partitions are reassigned).
    ``commits`` are the group's acknowledged commits and ``final_committed`` the
    group's committed offsets read back at the end ({partition: offset}); without
    it the commit checks are skipped."""
    rep = Report()
    all_reads = list(reads) + list(group_reads)

    def put(kind, items):
        rep.counts[kind] = len(items)
        if items:
            rep.examples[kind] = list(items)[:EXAMPLES]

    lost = lost_writes(writes, final)
    put("lost", lost)
    put("duplicate", duplicates(list(final) + all_reads))
    put("inconsistent", inconsistent_offsets(writes, list(final) + all_reads))
    put("dirty-read", dirty_reads(all_reads, final))
    nonmono, skips = poll_order(reads, final)
    put("nonmonotonic", nonmono)
    put("skip", skips)
    put("reorder", reorders(writes))
    put("offset-gap", offset_gaps(final))
    put("phantom", phantoms(writes, final))
    put("drain-incomplete", [] if drain_complete else ["final drain did not reach the high watermark"])
    if final_committed is not None:
        put("lost-commit", lost_commits(commits, final_committed))
        put("group-gap", group_gaps(group_reads, final, final_committed))
    else:
        put("lost-commit", [])
        put("group-gap", [])

    present = {r.value for r in final}
    rep.info["offered"] = len(writes)
    rep.info["acknowledged"] = sum(1 for w in writes if w.outcome == OK)
    rep.info["failed"] = sum(1 for w in writes if w.outcome == FAIL)
    rep.info["unknown"] = sum(1 for w in writes if w.outcome == UNKNOWN)
    rep.info["unacked-present"] = sum(1 for w in writes if w.outcome != OK and w.value in present)
    rep.info["final-records"] = len(final)
    rep.info["polled"] = len(reads)
    rep.info["group-polled"] = len(group_reads)
    rep.info["commits"] = len(commits)
    if final_committed is not None:
        rep.info["final-committed"] = dict(sorted(final_committed.items()))
    errors = defaultdict(int)
    for w in writes:
        if w.outcome == FAIL:
            errors[w.error or "?"] += 1
    rep.info["errors"] = dict(errors)
    if writes:
        t0 = min(w.t_send for w in writes) if t_start is None else t_start
        t1 = max(w.t_send for w in writes) if t_end is None else t_end
        secs, a, b = unavailability(writes, t0, t1)
        rep.info["unavailable-s"] = secs
        rep.info["unavailable-window"] = (a - t0, b - t0)
    else:
        rep.info["unavailable-s"] = 0.0
    return rep

"""A latency index of the application's own statements, from ``pg_stat_statements``: the impact
budget's second signal, where the extension is installed and readable.

Pure: fed snapshots (per statement, its calls and total execution time so far) with their
times, it answers how much slower the statements ran lately than during the runner's idle
windows: each statement's mean time over its baseline mean, weighted by its share of the
baseline's calls (a fixed mix, so that a change of mix is not taken for a change of speed),
over the statements that ran often enough in both. The runner's own statements never get here
(``backfill.gates`` leaves them out).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

Snapshot = dict[int, tuple[int, float]]  # queryid: (calls, total milliseconds)

MIN_CALLS = 5  # calls of a statement, in the baseline and lately, for it to count
MIN_TOTAL = 50  # calls of all counted statements, in each, for an index at all


@dataclass(frozen=True, slots=True)
class Index:
    ratio: float  # the weighted mean of each statement's lately / baseline mean time
    current: float  # the call-weighted mean time lately, seconds
    baseline: float  # and in the idle windows


def _delta(first: Snapshot, last: Snapshot) -> Snapshot:
    out = {}
    for q, (calls, total) in last.items():
        c0, t0 = first.get(q, (0, 0.0))
        if calls > c0 and total >= t0:  # a statement evicted and back starts over: skip it
            out[q] = (calls - c0, total - t0)
    return out


def _add(into: Snapshot, more: Snapshot) -> None:
    for q, (calls, total) in more.items():
        c, t = into.get(q, (0, 0.0))
        into[q] = (c + calls, t + total)


@dataclass
class StatementIndex:
    keep: float = 5.0  # seconds of snapshots kept
    pool: int = 6  # idle windows pooled into the baseline
    _snapshots: deque[tuple[float, Snapshot]] = field(default_factory=deque)
    _windows: deque[Snapshot] = field(default_factory=deque)

    def snapshot(self, at: float, data: Snapshot) -> None:
        self._snapshots.append((at, data))
        while self._snapshots and self._snapshots[0][0] < at - self.keep:
            self._snapshots.popleft()

    def window(self, start: float, end: float) -> None:
        """An idle window of the runner ended: what ran in ``[start, end]`` is baseline."""
        inside = [s for t, s in self._snapshots if start <= t <= end]
        if len(inside) >= 2:
            self._windows.append(_delta(inside[0], inside[-1]))
            while len(self._windows) > self.pool:
                self._windows.popleft()

    def forget(self) -> None:
        """A new load: the baseline of the old one does not apply."""
        self._windows.clear()

    def index(self, since: float) -> Index | None:
        """The index over the snapshots taken since ``since``; None without enough calls."""
        recent = [s for t, s in self._snapshots if t >= since]
        if len(recent) < 2 or not self._windows:
            return None
        base: Snapshot = {}
        for w in self._windows:
            _add(base, w)
        now = _delta(recent[0], recent[-1])
        both = [q for q in base if base[q][0] >= MIN_CALLS and now.get(q, (0, 0.0))[0] >= MIN_CALLS]
        base_calls = sum(base[q][0] for q in both)
        now_calls = sum(now[q][0] for q in both)
        if base_calls < MIN_TOTAL or now_calls < MIN_TOTAL:
            return None
        weights = {q: base[q][0] / base_calls for q in both}
        means = {q: (base[q][1] / base[q][0], now[q][1] / now[q][0]) for q in both}
        ratio = sum(w * means[q][1] / max(means[q][0], 1e-9) for q, w in weights.items())
        current = sum(w * means[q][1] for q, w in weights.items()) / 1000
        baseline = sum(w * means[q][0] for q, w in weights.items()) / 1000
        return Index(ratio, current, baseline)

"""A latency index of the application's own statements, from ``pg_stat_statements``: the impact
budget's second signal, where the extension is installed and readable.

Pure: fed snapshots (per statement: its calls, and the sum and the sum of squares of its
execution times so far) with their times, it answers how much slower the statements ran lately
than during the runner's idle windows, on two statistics (from the differences of the sums:
every call counts, not a sample):

- ``typical``: per statement the mean of its times lately over in the baseline. Robust: a
  window holds thousands of calls. What throughput and most users feel.
- ``tail``: per statement its mean plus two standard deviations (a few slow calls show). A
  proxy for a high percentile: the sums cannot give a percentile itself.

Each index weighs its statements by their share of the baseline's time, so that it is how much
slower the application's usual work ran (a change of mix is not taken for a change of speed,
and a slower COMMIT weighs by the time commits take). Statements must have run often enough in
both. The runner's own statements never get here (the probe connection leaves them out).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

Sums = tuple[int, float, float]  # calls, total ms, total of squared ms
Snapshot = dict[int, Sums]  # by queryid

MIN_CALLS = 5  # calls of a statement, in the baseline and lately, for it to count
MIN_TOTAL = 50  # calls of all counted statements, in each, for an index at all
OUTLIER = 1.25  # an idle window this much slower than the pool of them is left out of it


@dataclass(frozen=True, slots=True)
class Measure:
    ratio: float  # the time-weighted mean of each statement's statistic lately / in the baseline
    current: float  # the time-weighted statistic lately, seconds
    baseline: float  # and in the idle windows


@dataclass(frozen=True, slots=True)
class Index:
    typical: Measure  # each statement's mean
    tail: Measure  # each statement's mean plus two standard deviations


def _delta(first: Snapshot, last: Snapshot) -> Snapshot:
    out = {}
    for q, (calls, total, squares) in last.items():
        c0, t0, s0 = first.get(q, (0, 0.0, 0.0))
        if calls > c0 and total >= t0:  # a statement evicted and back starts over: skip it
            out[q] = (calls - c0, total - t0, squares - s0)
    return out


def _add(into: Snapshot, more: Snapshot) -> None:
    for q, (calls, total, squares) in more.items():
        c, t, s = into.get(q, (0, 0.0, 0.0))
        into[q] = (c + calls, t + total, s + squares)


def _mean(sums: Sums) -> float:
    """The mean, milliseconds."""
    return sums[1] / sums[0]


def _tail(sums: Sums) -> float:
    """Mean plus two standard deviations, milliseconds."""
    calls, total, squares = sums
    mean = total / calls
    return mean + 2 * math.sqrt(max(0.0, squares / calls - mean * mean))


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
        windows = list(self._windows)
        # A window far slower than the others (a stall while it measured) leaves the baseline.
        strays = _strays(windows)
        if strays and max(strays) > OUTLIER:
            del windows[strays.index(max(strays))]
        return _compare(_pool(windows), _delta(recent[0], recent[-1]))


def _pool(windows: list[Snapshot]) -> Snapshot:
    base: Snapshot = {}
    for w in windows:
        _add(base, w)
    return base


def _strays(windows: list[Snapshot]) -> list[float]:
    """Each window's index against the pool of the others (none for a single window)."""
    out = []
    for i, w in enumerate(windows):
        found = _compare(_pool(windows[:i] + windows[i + 1:]), w) if len(windows) > 1 else None
        out.append(1.0 if found is None else found.typical.ratio)
    return out if len(windows) > 1 else []


def _compare(base: Snapshot, now: Snapshot) -> Index | None:
    both = [q for q in base if base[q][0] >= MIN_CALLS and q in now and now[q][0] >= MIN_CALLS]
    if sum(base[q][0] for q in both) < MIN_TOTAL or sum(now[q][0] for q in both) < MIN_TOTAL:
        return None
    time = sum(base[q][1] for q in both)
    if time <= 0:
        return None
    weights = {q: base[q][1] / time for q in both}

    def measure(statistic: Callable[[Sums], float]) -> Measure:
        pairs = {q: (statistic(base[q]), statistic(now[q])) for q in both}
        return Measure(
            ratio=sum(w * pairs[q][1] / max(pairs[q][0], 1e-6) for q, w in weights.items()),
            current=sum(w * pairs[q][1] for q, w in weights.items()) / 1000,
            baseline=sum(w * pairs[q][0] for q, w in weights.items()) / 1000,
        )

    return Index(typical=measure(_mean), tail=measure(_tail))

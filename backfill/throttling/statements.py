"""The application's own statements, from ``pg_stat_statements``: the impact budget's signal
for the typical latency, where the extension is installed and readable.

Pure: fed snapshots (per statement its calls and the sum of its execution times so far) with
their times, it turns each interval between two snapshots into a chunk for
``backfill.throttling.evidence``: the milliseconds the application's statements took, and the
milliseconds they would have taken at the baseline's mean of each (their calls times it). So
the ratio is how much slower the application's usual work ran, every call counted, a change
of mix not taken for a change of speed, each statement weighed by the time it takes. The
baseline is the intervals inside the runner's idle windows, pooled. The runner's own
statements never get here (the probe leaves them out).

Execution times leave out a commit's WAL flush and a client's wait for a CPU: the canary sees
those (docs/throttling.md says what each signal can see).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from backfill.throttling.evidence import Chunk

Sums = tuple[int, float]  # calls, total ms
Snapshot = dict[int, Sums]  # by queryid

MIN_CALLS = 5  # calls of a statement in the baseline for it to count


def delta(first: Snapshot, last: Snapshot) -> Snapshot:
    out = {}
    for q, (calls, total) in last.items():
        c0, t0 = first.get(q, (0, 0.0))
        if calls > c0 and total >= t0:  # a statement evicted and back starts over: skip it
            out[q] = (calls - c0, total - t0)
    return out


@dataclass
class StatementIndex:
    keep: float = 60.0  # seconds of intervals kept
    pool: int = 16  # idle windows pooled into the baseline
    _last: tuple[float, Snapshot] | None = None
    _intervals: deque[tuple[float, float, Snapshot]] = field(default_factory=deque)
    _windows: deque[list[Snapshot]] = field(default_factory=deque)

    def snapshot(self, at: float, data: Snapshot) -> None:
        if self._last is not None:
            self._intervals.append((self._last[0], at, delta(self._last[1], data)))
        self._last = (at, data)
        while self._intervals and self._intervals[0][1] < at - self.keep:
            self._intervals.popleft()

    def window(self, start: float, end: float) -> None:
        """An idle window of the runner ended: what ran in ``[start, end]`` is baseline."""
        inside = [d for t0, t1, d in self._intervals if t0 >= start and t1 <= end]
        if inside:
            self._windows.append(inside)
            while len(self._windows) > self.pool:
                self._windows.popleft()

    def forget(self) -> None:
        """A new load: the baseline of the old one does not apply."""
        self._windows.clear()

    def chunks(self, since: float, skip: list[tuple[float, float]]) -> tuple[list[Chunk],
                                                                             list[Chunk]]:
        """Chunks at the pace (intervals since ``since``, but those in ``skip``, the idle
        windows) and in the baseline, each against the baseline's mean of each statement."""
        means = self._means()
        if not means:
            return [], []
        pace = [_chunk(d, means) for t0, t1, d in self._intervals
                if t0 >= since and not any(a <= t1 and t0 <= b for a, b in skip)]
        base = [_chunk(d, means) for w in self._windows for d in w]
        return [c for c in pace if c[1] > 0], [c for c in base if c[1] > 0]

    def baseline_seconds(self) -> float:
        """The application's mean statement time in the baseline, seconds."""
        pooled = self._pooled()
        calls = sum(c for c, _ in pooled.values())
        return sum(t for _, t in pooled.values()) / calls / 1000 if calls else 0.0

    def _means(self) -> dict[int, float]:
        return {q: t / c for q, (c, t) in self._pooled().items() if c >= MIN_CALLS}

    def _pooled(self) -> dict[int, Sums]:
        pooled: dict[int, Sums] = {}
        for w in self._windows:
            for d in w:
                for q, (calls, ms) in d.items():
                    c, t = pooled.get(q, (0, 0.0))
                    pooled[q] = (c + calls, t + ms)
        return pooled


def _chunk(d: Snapshot, means: dict[int, float]) -> Chunk:
    observed = sum(ms for q, (_, ms) in d.items() if q in means)
    expected = sum(calls * means[q] for q, (calls, _) in d.items() if q in means)
    return observed, expected

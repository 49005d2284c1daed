"""Measurements over time: a percentile over a sliding window, rates from a cumulative counter
sampled now and then, and how long a series takes to come back under a limit."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from benchmarks.stats import percentile

Point = tuple[float, float]  # (epoch seconds, value)


def sliding_percentile(
    points: Sequence[Point], *, t0: float, t1: float, width: float, step: float, q: float,
    min_count: int,
) -> list[tuple[float, float | None]]:
    """For each window end ``t`` from ``t0 + step`` to ``t1`` (every ``step`` seconds): the
    ``q``-th percentile of the values whose time lies in ``(t - width, t]``, or None when
    fewer than ``min_count`` do. ``points`` must be sorted by time."""
    times = [t for t, _ in points]
    out: list[tuple[float, float | None]] = []
    n = 1
    while (end := t0 + n * step) <= t1 + 1e-9:
        lo, hi = bisect.bisect_right(times, end - width), bisect.bisect_right(times, end)
        values = [v for _, v in points[lo:hi]]
        out.append((end, percentile(values, q) if len(values) >= min_count else None))
        n += 1
    return out


def at(samples: Sequence[Point], t: float) -> float | None:
    """A cumulative counter's value at ``t``, interpolated between the samples around it
    (None outside them)."""
    if not samples or t < samples[0][0] or t > samples[-1][0]:
        return None
    i = bisect.bisect_left([s for s, _ in samples], t)
    if samples[i][0] == t or i == 0:
        return samples[i][1]
    (ta, va), (tb, vb) = samples[i - 1], samples[i]
    return va + (vb - va) * (t - ta) / (tb - ta)


def rate(samples: Sequence[Point], t0: float, t1: float) -> float | None:
    """A cumulative counter's mean rate per second over ``[t0, t1]``."""
    a, b = at(samples, t0), at(samples, t1)
    if a is None or b is None or t1 <= t0:
        return None
    return (b - a) / (t1 - t0)


def trailing_rates(samples: Sequence[Point], width: float) -> list[Point]:
    """The counter's rate over the ``width`` seconds before each sample (from the first
    sample that has that much history)."""
    out: list[Point] = []
    for t, _ in samples:
        r = rate(samples, t - width, t)
        if r is not None:
            out.append((t, r))
    return out


def settled(
    series: Sequence[tuple[float, float | None]], *, start: float, end: float, limit: float,
    hold: float,
) -> float | None:
    """Seconds from ``start`` to the first point of ``series`` (times in ``[start, end]``)
    from which every known value stays at or under ``limit`` for ``hold`` seconds (or until
    ``end``); None when that never happens."""
    inside = [(t, v) for t, v in series if start <= t <= end and v is not None]
    for i, (t, _) in enumerate(inside):
        ahead = [v for u, v in inside[i:] if u <= min(t + hold, end)]
        if max(ahead) <= limit:
            return t - start
    return None


def share_within(
    series: Sequence[tuple[float, float | None]], *, start: float, end: float, limit: float
) -> float | None:
    """The share of the known values of ``series`` in ``[start, end]`` at or under ``limit``."""
    known = [v for t, v in series if start <= t <= end and v is not None]
    return sum(v <= limit for v in known) / len(known) if known else None

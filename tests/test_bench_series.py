"""The benchmark's time-series arithmetic (benchmarks/series.py), on series made by hand."""

from __future__ import annotations

import pytest

from benchmarks import series


def test_sliding_percentile_takes_the_values_inside_each_window() -> None:
    # One value every 0.1 s: 1.0 for the first second, then 9.0.
    points = [(i / 10, 1.0 if i < 10 else 9.0) for i in range(1, 31)]
    p99 = dict(series.sliding_percentile(
        points, t0=0.0, t1=3.0, width=1.0, step=0.5, q=99, min_count=3
    ))
    assert list(p99) == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
    assert p99[0.5] == 1.0 and p99[1.0] == 9.0 and p99[3.0] == 9.0  # (0, 1] holds t = 1.0
    fewer = series.sliding_percentile(points, t0=0.0, t1=0.5, width=1.0, step=0.5, q=99,
                                      min_count=6)
    assert fewer == [(0.5, None)]  # five values only


def test_rate_interpolates_a_cumulative_counter() -> None:
    samples = [(0.0, 0.0), (1.0, 100.0), (2.0, 100.0), (4.0, 500.0)]
    assert series.at(samples, 0.5) == 50.0
    assert series.at(samples, 5.0) is None
    assert series.rate(samples, 0.0, 2.0) == 50.0
    assert series.rate(samples, 2.0, 4.0) == 200.0
    assert series.rate(samples, 3.0, 3.0) is None
    assert series.trailing_rates(samples, 2.0) == [(2.0, 50.0), (4.0, 200.0)]


def test_settled_needs_the_whole_hold_within_the_limit() -> None:
    # Over the limit (2.0) until t = 3, a dip at 1.5, within from 3 on.
    values = [(t / 2, 5.0 if t / 2 < 3 and t != 3 else 1.0) for t in range(0, 21)]
    assert series.settled(values, start=0.0, end=10.0, limit=2.0, hold=2.0) == 3.0
    assert series.settled(values, start=0.0, end=10.0, limit=2.0, hold=0.0) == 1.5
    never = [(t / 2, 5.0) for t in range(0, 21)]
    assert series.settled(never, start=0.0, end=10.0, limit=2.0, hold=2.0) is None
    assert series.share_within(values, start=0.0, end=10.0, limit=2.0) == pytest.approx(16 / 21)
    assert series.share_within([(1.0, None)], start=0.0, end=2.0, limit=2.0) is None

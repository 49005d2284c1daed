"""Summaries of repeated measurements: the median and the spread (min .. max), percentiles."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by the nearest-rank method; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summary(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """Median, min, max and the spread as a fraction of the median, over the known values."""
    known = [v for v in values if v is not None]
    if not known:
        return {"median": None, "min": None, "max": None, "spread": None, "n": 0}
    median = statistics.median(known)
    low, high = min(known), max(known)
    spread = (high - low) / median if median else None
    return {"median": median, "min": low, "max": high, "spread": spread, "n": len(known)}


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b

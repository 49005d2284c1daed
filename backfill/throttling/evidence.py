"""The impact budget's statistics: how much slower the application ran at a pace than with the
runner idle, with a confidence interval, and whether that is clearly over, clearly under or
inside the noise of a budget (``Z_OVER``, ``Z_UNDER``). Pure arithmetic on what was measured.

Measurements come in chunks (a quarter of a second of ``pg_stat_statements``, or of canary
beats): each chunk is ``(observed, expected)``, e.g. the seconds the application's statements
took and the seconds they took per call in the baseline times their calls (a change of mix is
not taken for a change of speed), or a canary's summed latency and its count. The typical
statistic is the ratio of sums at the pace over the ratio of sums in the idle windows; its
spread comes from the chunks (the delta method on a ratio estimator), so a dwell of a few
seconds is judged on dozens of chunks, not on a point estimate.

A stall of the whole server (the VM's disk, a checkpoint) lands in a chunk or two and can
double a dwell's mean: a chunk ``STALL`` times the baseline's median is a stall (unless a
quarter of them are: then it is the runner's impact), left out of "over" and of the estimate
the steps go by, kept in "under"; so a stall moves the rate neither way.

The tail (``tail``) is a share: of the time a closed-loop canary spent in commits slower than
``(1 + budget)`` times the baseline's p99, against ``TAIL_SHARE``. A p99 of small transactions
moves once more than about 1% of them are delayed, which a mean does not see. The canary
beats in a closed loop, so its samples thin out exactly when the server is slow;
``open_loop`` weighs each beat by the arrivals an open-loop application would have had while
it ran, as the application sees a stall.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

Chunk = tuple[float, float]  # (observed, expected): e.g. seconds taken, seconds at baseline speed

# How sure a verdict must be, one-sided: "over" at 95% (a cut on noise would random-walk the
# rate down), "under" at 84% (a step up is a probe: if it was wrong, the next dwell says so).
Z_OVER, Z_UNDER = 1.645, 1.0
MIN_CHUNKS = 4  # chunks at the pace and in the baseline for a judgment at all
STALL = 4.0  # a chunk this many times the baseline's median chunk is a stall of the server ...
STALLS = 0.25  # ... unless more than this share of the chunks are: then it is the impact
MIN_TAIL = 100  # beats at the pace for a tail judgment (a 1% share needs a hundred) ...
MIN_TAIL_BASE = 100  # ... and in the baseline (its p99: the second slowest of a hundred)
TAIL_SHARE = 0.01  # the share of time in slow commits a tail budget allows
OVER, UNDER, HOLD = "over", "under", "hold"


@dataclass(frozen=True, slots=True)
class Evidence:
    """One statistic at the pace, against its limit."""

    ratio: float  # the estimate, stalls left out (typical: latency over baseline; tail: share
    # of time in slow commits)
    low: float  # its one-sided confidence bounds
    high: float
    limit: float  # the limit the ratio is held to
    verdict: str  # OVER, UNDER or HOLD
    current: float  # for the log: the latency (or share) now ...
    baseline: float  # ... and with the runner idle

    @property
    def excess(self) -> float:
        """How far over its budget the estimate is: 0 at none, 1 at the budget."""
        return _excess(self.ratio, self.limit)

    @property
    def high_excess(self) -> float:
        return _excess(self.high, self.limit)


def _excess(value: float, limit: float) -> float:
    return (value - 1.0) / max(limit - 1.0, 1e-6) if limit > 1.0 else value / max(limit, 1e-9)


def ratio_of_sums(chunks: Sequence[Chunk]) -> tuple[float, float]:
    """``sum(observed) / sum(expected)`` and the variance of its logarithm (delta method)."""
    o = sum(c[0] for c in chunks)
    e = sum(c[1] for c in chunks)
    k = len(chunks)
    if e <= 0 or o <= 0 or k < 2:
        return (o / e if e > 0 else 1.0), math.inf
    r = o / e
    mean_e = e / k
    residuals = sum(((oi - r * ei) / mean_e) ** 2 for oi, ei in chunks)
    variance = residuals / (k * (k - 1))
    return r, variance / (r * r)


def _without_stalls(chunks: Sequence[Chunk], usual: float) -> list[Chunk]:
    """The chunks but the stalls: those over ``STALL`` times ``usual`` (the baseline's median
    chunk), unless more than ``STALLS`` of them are (then it is no stall but the impact)."""
    calm = [c for c in chunks if c[0] <= STALL * usual * c[1]]
    return calm if len(calm) >= (1 - STALLS) * len(chunks) else list(chunks)


def typical(pace: Sequence[Chunk], base: Sequence[Chunk], limit: float) -> Evidence | None:
    """How much slower the application ran at the pace than in the baseline, stalls left out;
    None with too few chunks of either."""
    if len(pace) < MIN_CHUNKS or len(base) < MIN_CHUNKS:
        return None
    usual = statistics.median(o / e for o, e in base)
    calm_base = _without_stalls(base, usual)
    r_base, v_base = ratio_of_sums(calm_base)
    r_calm, v_calm = ratio_of_sums(_without_stalls(pace, usual))
    r_all, v_all = ratio_of_sums(pace)
    ratio = r_calm / r_base
    # A stall decides nothing: "over" without it, "under" with it (it may hide the impact).
    low = ratio * math.exp(-Z_OVER * math.sqrt(v_calm + v_base))
    high = r_all / r_base * math.exp(Z_UNDER * math.sqrt(v_all + v_base))
    verdict = OVER if low > limit else UNDER if high < limit else HOLD
    return Evidence(ratio=ratio, low=low, high=high, limit=limit, verdict=verdict,
                    current=r_calm, baseline=r_base)


def open_loop(beats: Sequence[float], every: float) -> list[float]:
    """Weights of closed-loop canary beats (their latencies, seconds) as an open-loop
    application sees them: a beat that took ``n`` times the interval ``every`` stands for the
    ``n`` arrivals that would have waited during it."""
    return [max(1.0, latency / every) for latency in beats]


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def tail(pace: Sequence[float], base: Sequence[float], every: float, budget: float
         ) -> Evidence | None:
    """The share of the application's time in slow commits at the pace (canary latencies,
    seconds), against ``TAIL_SHARE``: slow is ``(1 + budget)`` times the baseline's p99."""
    if len(pace) < MIN_TAIL or len(base) < MIN_TAIL_BASE:
        return None
    threshold = (1.0 + budget) * percentile(base, 99)
    # As for the typical statistic, one stall decides nothing: "over" without the longest
    # beat, "under" with it.
    calm = sorted(pace)[:-1]
    share = _share_over(calm, every, threshold)
    low = wilson(share, len(calm), Z_OVER)[0]
    high = wilson(_share_over(pace, every, threshold), len(pace), Z_UNDER)[1]
    verdict = OVER if low > TAIL_SHARE else UNDER if high < TAIL_SHARE else HOLD
    return Evidence(ratio=share, low=low, high=high, limit=TAIL_SHARE, verdict=verdict,
                    current=percentile(pace, 99), baseline=threshold / (1.0 + budget))


def _share_over(beats: Sequence[float], every: float, threshold: float) -> float:
    weights = open_loop(beats, every)
    return sum(w for w, s in zip(weights, beats, strict=True) if s > threshold) / sum(weights)


def wilson(share: float, n: int, z: float) -> tuple[float, float]:
    """The Wilson score interval of a share over ``n`` samples (``z`` each way)."""
    z2 = z * z
    centre = (share + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(share * (1 - share) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)

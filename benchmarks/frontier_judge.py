"""The frontier's judgment, as pure functions of its windows (no server, no clock): each
window against the baseline interpolated in time, the void rule, the per-round figures and
their medians, the fixed-pace frontier and the bars.

A window is a dict with at least ``name``, ``round``, ``window`` ([t0, t1], epoch seconds),
``settle`` ([t0, t1]), ``app`` and ``settle_app`` (``mean_ms``, ``p99_ms``, ``transactions``),
``rows_per_second`` and ``settle_rows_per_second``.
"""

from __future__ import annotations

import itertools
import statistics
from typing import Any

BASELINE = "baseline"
STATS = ("mean", "p99")
# The void rule (written down before any run, in the report too): a round is void when one of
# its baselines is off the line through its neighbouring baselines (the one before and the
# one after it in time, across rounds; at either end of the experiment, the nearest one) by
# more than VOID["mean"] on the mean or VOID["p99"] on the p99, either way, or when it has
# fewer than VOID_MIN_BASELINES measured baselines.
VOID = {"mean": 1.3, "p99": 1.6}
VOID_MIN_BASELINES = 2
VOID_RULE = (
    f"A round is void when one of its baselines is off the line through its neighbouring "
    f"baselines (before and after it in time, across rounds; at an end, the nearest) by more "
    f"than {VOID['mean']}x on the mean or {VOID['p99']}x on the p99 (either way), or when it "
    f"has fewer than {VOID_MIN_BASELINES} measured baselines. Void rounds are shown in "
    f"[brackets] and left out of every median."
)
# A baseline: (the middle of its window, epoch seconds; its mean ms; its p99 ms).
Baseline = tuple[float, float, float]


def middle(span: list[float]) -> float:
    return (span[0] + span[1]) / 2


def interpolate(points: list[tuple[float, float]], t: float) -> float | None:
    """The value at ``t`` on the line through ``points`` ((time, value), any order): linear
    between the two around ``t``, the nearest one's value beyond either end; None without
    points."""
    if not points:
        return None
    ordered = sorted(points)
    if t <= ordered[0][0]:
        return ordered[0][1]
    for (t0, v0), (t1, v1) in itertools.pairwise(ordered):
        if t0 <= t <= t1:
            return v0 if t1 == t0 else v0 + (v1 - v0) * (t - t0) / (t1 - t0)
    return ordered[-1][1]


def baselines(windows: list[dict[str, Any]]) -> list[Baseline]:
    """The measured baseline windows, by time."""
    return sorted(
        (middle(w["window"]), w["app"]["mean_ms"], w["app"]["p99_ms"]) for w in windows
        if w["name"] == BASELINE and w["app"]["transactions"]
        and w["app"]["mean_ms"] and w["app"]["p99_ms"]
    )


def expected(base: list[Baseline], t: float, stat: str) -> float | None:
    """The baseline's ``stat`` ("mean" or "p99") interpolated at ``t``."""
    column = 1 + STATS.index(stat)
    return interpolate([(b[0], b[column]) for b in base], t)


def off_line(base: list[Baseline], i: int) -> dict[str, float | None]:
    """How far baseline ``i`` is off the line through its neighbours (its value over the
    line's, per statistic; None without a neighbour)."""
    others = base[max(0, i - 1):i] + base[i + 1:i + 2]
    return {
        stat: (base[i][1 + n] / line if (line := expected(others, base[i][0], stat)) else None)
        for n, stat in enumerate(STATS)
    }


def void_rounds(windows: list[dict[str, Any]]) -> dict[int, str | None]:
    """Every round's verdict: None when valid, else why it is void (see ``VOID_RULE``)."""
    base = baselines(windows)
    rounds = sorted({w["round"] for w in windows})
    round_at = {middle(w["window"]): w["round"] for w in windows if w["name"] == BASELINE}
    out: dict[int, str | None] = {r: None for r in rounds}
    for r in rounds:
        mine = [i for i, b in enumerate(base) if round_at.get(b[0]) == r]
        if len(mine) < VOID_MIN_BASELINES:
            out[r] = f"{len(mine)} measured baseline(s)"
            continue
        for i in mine:
            for stat, ratio in off_line(base, i).items():
                if ratio is not None and max(ratio, 1 / ratio) > VOID[stat]:
                    out[r] = f"a baseline's {stat} at {ratio:.2f}x its neighbours' line"
                    break
            if out[r]:
                break
    return out


def judge(windows: list[dict[str, Any]]) -> None:
    """Add to every window its ``ratio`` and ``settle_ratio`` (mean and p99 over the baseline
    interpolated at the middle of the window, or of its settle period). A baseline window is
    judged against the others (the line through its neighbours: what the void rule reads),
    which makes the baselines' rows the noise floor."""
    base = baselines(windows)
    for w in windows:
        t = middle(w["window"])
        others = [b for b in base if b[0] != t] if w["name"] == BASELINE else base
        for key, app, span, line in (("ratio", w["app"], w["window"], others),
                                     ("settle_ratio", w["settle_app"], w["settle"], base)):
            w[key] = {stat: over(app[f"{stat}_ms"], expected(line, middle(span), stat))
                      for stat in STATS}


def per_config(windows: list[dict[str, Any]], void: dict[int, str | None]) -> dict[str, Any]:
    """Per configuration: its figures in every round (``void`` marked) and their medians over
    the valid rounds."""
    out: dict[str, Any] = {}
    for name in dict.fromkeys(w["name"] for w in windows):
        rounds = [{
            "round": w["round"], "void": void.get(w["round"]) is not None,
            "rows_per_second": w["rows_per_second"],
            "mean_ratio": w["ratio"]["mean"], "p99_ratio": w["ratio"]["p99"],
            "settle": {"rows_per_second": w["settle_rows_per_second"],
                       "mean_ratio": w["settle_ratio"]["mean"],
                       "p99_ratio": w["settle_ratio"]["p99"]},
        } for w in windows if w["name"] == name]
        valid = [r for r in rounds if not r["void"]]
        out[name] = {
            "windows": len(rounds), "valid_windows": len(valid), "rounds": rounds,
            **{k: median([r[k] for r in valid])
               for k in ("rows_per_second", "mean_ratio", "p99_ratio")},
            "settle": {k: median([r["settle"][k] for r in valid])
                       for k in ("rows_per_second", "mean_ratio", "p99_ratio")},
        }
    return out


def fixed_points(configs: dict[str, Any], stat: str) -> list[tuple[float, float]]:
    """The fixed ceilings' (rows/s, impact on ``stat``), by rows/s."""
    return sorted(
        (c["rows_per_second"], c[f"{stat}_ratio"]) for n, c in configs.items()
        if n.startswith("fixed-") and c["rows_per_second"] and c[f"{stat}_ratio"] is not None
    )


def speed_at(points: list[tuple[float, float]], impact: float) -> float | None:
    """The fastest fixed pace whose (interpolated) impact is at most ``impact``: the frontier
    read the other way. Between two measured paces the impact is taken as linear; a pace past
    the last measured one is not guessed."""
    if not points:
        return None
    best = None
    for (r0, i0), (r1, i1) in itertools.pairwise(points):
        if i0 <= impact:
            best = r0
        if i0 <= impact < i1:
            best = r0 + (r1 - r0) * (impact - i0) / (i1 - i0)
        elif i0 > impact >= i1:
            best = r1
    if points[-1][1] <= impact:
        best = points[-1][0]
    return best


def impact_at(points: list[tuple[float, float]], rows: float) -> float | None:
    """The fixed paces' impact at ``rows`` rows/s, interpolated (None outside them)."""
    for (r0, i0), (r1, i1) in itertools.pairwise(points):
        if r0 <= rows <= r1:
            return i0 + (i1 - i0) * (rows - r0) / (r1 - r0) if r1 > r0 else i0
    return None


def over(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def median(values: list[Any]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None

"""The frontier's tables (``python3 -m benchmarks --only frontier``), for docs/performance.md."""

from __future__ import annotations

from typing import Any


def _x(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}x"


def _n(value: float | None) -> str:
    return "?" if value is None else f"{value:,.0f}"


def markdown(results: dict[str, Any]) -> str:
    f = results.get("frontier", {})
    if "configurations" not in f:
        return f"frontier: {f.get('unavailable', 'not measured')}\n"
    meta = results["meta"]
    base = f["baseline"]
    lines = [
        f"Measured {meta['date'][:16]} on {meta['machine']['cores']} cores, PostgreSQL "
        f"{meta.get('postgresql', '?')} (fsync on); the application at {f['rate']:,.0f} tx/s "
        f"({f['fraction']:.0%} of {f['capacity_tps']:,.0f}), baseline mean "
        f"{base['mean_ms'] or 0:.2f} ms, p99 {base['p99_ms'] or 0:.2f} ms (median of "
        f"{base['windows']} windows, p99 {_n2(base['p99_spread'])}); windows of "
        f"{f['window_seconds']:g} s after {f['settle_seconds']:g} s to settle, medians over "
        f"rounds" + (" (**smoke mode: numbers mean nothing**)" if meta["options"]["smoke"] else "")
        + ".",
        "",
        "| runner | windows | rows/s | app mean / baseline | app p99 / baseline "
        "| settle: rows/s | settle: mean | settle: p99 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, c in f["configurations"].items():
        s = c["settle"]
        lines.append(
            f"| {name} | {c['windows']} | {_n(c['rows_per_second'])} | {_x(c['mean_ratio'])} "
            f"| {_x(c['p99_ratio'])} | {_n(s['rows_per_second'])} | {_x(s['mean_ratio'])} "
            f"| {_x(s['p99_ratio'])} |"
        )
    lines += ["", "| budget | holds | impact | rows/s | fixed pace at that impact | share "
              "| p99 vs a fixed pace as fast |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, b in f["bars"].items():
        share = "?" if b["speed_share"] is None else f"{b['speed_share']:.2f}"
        lines.append(
            f"| {name} | {b['statistic']} <= {1 + b['budget']:.2f} | {_x(b['impact'])} "
            f"({'within' if b['within'] else '**over**'}) | {_n(b['rows_per_second'])} "
            f"| {_n(b['fixed_same_impact'])} | {share} ({'met' if b['fast'] else '**missed**'}) "
            f"| {_x(b['tail_cost'])} ({_met(b['tail_ok'])}) |"
        )
    return "\n".join(lines) + "\n"


def _met(ok: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "n/a"}[ok]


def _n2(pair: list[float | None]) -> str:
    lo, hi = pair
    return "?" if lo is None or hi is None else f"{lo:.2f}..{hi:.2f} ms"

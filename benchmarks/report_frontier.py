"""The frontier's report (``python3 -m benchmarks --only frontier``): the setup, the void
rule, per-configuration figures per round and their medians, the bars, the pace paths."""

from __future__ import annotations

from typing import Any

# Pace lines shown per window in the brief pace paths (the first and the last ones).
PACE_LINES = 6


def _x(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}x"


def _n(value: float | None) -> str:
    return "?" if value is None else f"{value:,.0f}"


def markdown(results: dict[str, Any]) -> str:
    """The whole report as markdown (a line saying why when the frontier was not measured)."""
    f = results.get("frontier", {})
    if "configurations" not in f:
        return f"frontier: {f.get('unavailable', 'not measured')}\n"
    lines = [*_setup(results), "", f"**Void rule** (fixed before the run): {f['void_rule']}", ""]
    void = {r: why for r, why in f["void"].items() if why}
    lines.append("Void rounds: " + ("; ".join(f"round {int(r) + 1} ({why})"
                                              for r, why in void.items()) or "none") + ".")
    lines += ["", *_table(f), "", *_bars(f), "", *_paces(f)]
    return "\n".join(lines) + "\n"


def _setup(results: dict[str, Any]) -> list[str]:
    f, meta = results["frontier"], results["meta"]
    base, wal = f["baseline"], f.get("wal") or {}
    smoke = " (**smoke mode: numbers mean nothing**)" if meta["options"]["smoke"] else ""
    return [
        f"Measured {meta['date'][:16]} on {meta['machine']['cores']} cores, PostgreSQL "
        f"{meta.get('postgresql', '?')} (fsync on){smoke}. The application: pgbench -R "
        f"{f['rate']:,.0f} tx/s with {f['clients']} clients ({f['fraction']:.0%} of a "
        f"closed-loop capacity of {f['capacity_tps']:,.0f} tx/s with {f['capacity_clients']}), "
        f"one run for the whole experiment; baselines mean {base['mean_ms'] or 0:.2f} ms, p99 "
        f"{base['p99_ms'] or 0:.2f} ms (median of {base['windows']} windows, p99 "
        f"{_spread(base['p99_spread'])}). {f['rounds']} rounds, orders shuffled (seed "
        f"{f['seed']}); each configuration {f['settle_seconds']:g} s to settle, then a "
        f"{f['window_seconds']:g} s window; each window's mean and p99 over the baseline "
        f"interpolated in time between the baselines around it. Autovacuum off, VACUUM + "
        f"CHECKPOINT in the gaps; min_wal_size {wal.get('min_wal_size', '?')}, max_wal_size "
        f"{wal.get('max_wal_size', '?')}, {wal.get('prefill_mb', '?')} MB of WAL segments "
        f"prefilled. The -canary configurations run without pg_stat_statements.",
    ]


def _table(f: dict[str, Any]) -> list[str]:
    """config | rows/s median | per round | mean | p99 | settle (void rounds in brackets)."""
    lines = [
        "| config | rows/s (median) | rows/s per round | mean ratio (per round) "
        "| p99 ratio (per round) | settle: rows/s, mean, p99 (medians) |",
        "| --- | ---: | --- | --- | --- | --- |",
    ]
    for name, c in f["configurations"].items():
        s = c["settle"]
        lines.append(
            f"| {name} | {_n(c['rows_per_second'])} "
            f"| {_rounds(c, 'rows_per_second', _n)} "
            f"| {_x(c['mean_ratio'])} ({_rounds(c, 'mean_ratio', _r)}) "
            f"| {_x(c['p99_ratio'])} ({_rounds(c, 'p99_ratio', _r)}) "
            f"| {_n(s['rows_per_second'])}, {_x(s['mean_ratio'])}, {_x(s['p99_ratio'])} |"
        )
    return lines


def _rounds(c: dict[str, Any], key: str, fmt: Any) -> str:
    return " / ".join(f"[{fmt(r[key])}]" if r["void"] else fmt(r[key]) for r in c["rounds"])


def _r(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


def _bars(f: dict[str, Any]) -> list[str]:
    lines = ["| target | measured | bar | met |", "| --- | ---: | --- | --- |"]
    for b in f["bars"]:
        met = {True: "met", False: "**missed**", None: "n/a"}[b["met"]]
        lines.append(f"| {b['target']} | {_r(b['measured'])} | {b['bar']} | {met} |")
    return lines


def _paces(f: dict[str, Any]) -> list[str]:
    """Each budget window's pace path in brief: its log lines' times and messages."""
    lines = ["Pace paths (the runner's own log; t in seconds from the window's start, "
             "negative while settling):", ""]
    for w in f["windows"]:
        if not w.get("paces") and not w.get("canary") and not w.get("error"):
            continue
        paces = w.get("paces") or []
        shown = paces if len(paces) <= PACE_LINES else (
            [*paces[:PACE_LINES // 2], None, *paces[-PACE_LINES // 2:]])
        said = "; ".join("..." if p is None else f"{_t(p['t'])} {p['msg']}" for p in shown)
        failed = f" **exited {w['exit_code']}**" if w.get("error") else ""
        lines.append(f"- round {w['round'] + 1} {w['name']}{failed} "
                     f"({_n(w['rows_per_second'])} rows/s, {len(paces)} lines): "
                     f"{said or 'no pace line'}")
    return lines


def _t(t: float | None) -> str:
    return "t=?" if t is None else f"t={t:+.1f}"


def _spread(pair: list[float | None]) -> str:
    lo, hi = pair
    return "?" if lo is None or hi is None else f"{lo:.2f}..{hi:.2f} ms"

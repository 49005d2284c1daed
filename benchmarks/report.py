"""Targets, and the markdown tables printed at the end and pasted into docs/performance.md."""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks import report_fastpath, report_impact
from benchmarks.bars import bar
from benchmarks.bars import num as _num
from benchmarks.bars import x as _x
from benchmarks.stats import ratio

RSS_LIMIT_MB = 80.0


def _median(results: dict[str, Any], scenario: str, field: str) -> float | None:
    entry = results.get("throughput", {}).get("summary", {}).get(scenario)
    return None if entry is None else entry[field]["median"]


def paired(results: dict[str, Any], a: str, b: str, *, in_run: bool = False) -> float | None:
    """The median over repetitions of a's rows/s over b's in the same repetition (they ran
    one right after the other). ``in_run``: a's rows/s over its run alone (the server's record
    of it), without process start-up and exit."""
    samples = results.get("throughput", {}).get("samples", {})
    ratios = []
    for x, y in zip(samples.get(a, []), samples.get(b, []), strict=False):
        rate = x["rows"] / x["run_seconds"] if in_run and x.get("run_seconds") else None
        r = ratio(rate if in_run else x["rows_per_second"], y["rows_per_second"])
        if r is not None:
            ratios.append(r)
    return statistics.median(ratios) if ratios else None


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(name: str, measured: float | None, limit: float, *, at_most: bool, text: str) -> None:
        out.append(bar(name, measured, limit, at_most=at_most, text=text))

    sizes = results["meta"]["options"]["batch_sizes"]
    for size, limit in zip(sizes, (0.90, 0.95), strict=False):
        r = paired(results, f"runner-{size}", f"procedure-{size}")
        in_run = paired(results, f"runner-{size}", f"procedure-{size}", in_run=True)
        add(f"runner >= {limit:.2f}x procedure rows/s, batch {size}", r, limit, at_most=False,
            text=f"{_x(r)} whole process; {_x(in_run)} without start-up")

    effect = results.get("effect", {})
    name = "runner-target-0.1"
    for kind in ("select-only", "tpcb-like"):
        entry = effect.get(kind, {}).get(name, {})
        base = entry.get("baseline", {}).get("pgbench", {}).get("p99_ms")
        mine = entry.get("pgbench", {}).get("p99_ms")
        r = ratio(mine, base)
        add(f"target_seconds 0.1: pgbench {kind} p99 <= 1.3x baseline", r, 1.3, at_most=True,
            text=f"{_x(r)} ({_num(mine)} vs {_num(base)} ms)")
    waits = [effect.get(k, {}).get(name, {}).get("writer", {}).get("max_ms")
             for k in ("select-only", "tpcb-like")]
    known = [w for w in waits if w is not None]
    worst = max(known) / 1000 if known else None
    add("target_seconds 0.1: writer max wait <= 0.2 s", worst, 0.2, at_most=True,
        text=f"{_num(worst, 3)} s")

    dense = results.get("growth", {}).get("dense", {})
    flat = dense.get("last_over_first")
    add("batch time last 10% / first 10% <= 1.1", flat, 1.1, at_most=True,
        text=f"{_num(flat, 2)} ({_num(dense.get('last_10pct_median_ms'), 2)} vs "
             f"{_num(dense.get('first_10pct_median_ms'), 2)} ms)")

    small, big = _rss(results)
    worst_rss = max((r for r in (small, big) if r is not None), default=None)
    add(f"runner RSS < {RSS_LIMIT_MB:.0f} MB", worst_rss, RSS_LIMIT_MB, at_most=True,
        text=f"{_num(small)} MB at {_rows(results['meta']['options']['rows'])} rows, "
             f"{_num(big)} MB at {_rows(results['meta']['options']['big_rows'])}")
    growth = ratio(big, small)
    add("runner RSS flat (larger table / smaller <= 1.1)", growth, 1.1, at_most=True,
        text=_x(growth))
    return out + report_fastpath.targets(results) + report_impact.targets(results)


def _rss(results: dict[str, Any]) -> tuple[float | None, float | None]:
    sizes = results["meta"]["options"]["batch_sizes"]
    samples = results.get("throughput", {}).get("samples", {}).get(f"runner-{sizes[-1]}", [])
    small = max((s["rss_mb"] for s in samples if s.get("rss_mb")), default=None)
    big = results.get("growth", {}).get("big", {}).get("rss_mb")
    return small, big


def _rows(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 1_000_000 else f"{n:,}"


def _pct(value: float | None) -> str:
    return "" if value is None else f" (±{100 * value / 2:.0f}%)"


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    opts = meta["options"]
    m = meta["machine"]
    load = meta["loadavg"]
    lines = [
        f"Measured {meta['date'][:10]} on {m['cores']} cores ({m['cpu']}), "
        f"{m['memory_gb']} GB, PostgreSQL {meta.get('postgresql', '?')} (fsync on), "
        f"Python {m['python']}; {_rows(opts['rows'])} rows of ~150 bytes, "
        f"{opts['repeat']} repetitions (median, ± half the spread). Load average "
        f"{_load(load.get('start'))} at start, {_load(load.get('end'))} at end"
        + (" (**smoke mode: numbers mean nothing**)" if opts["smoke"] else "")
        + f"; {meta.get('seconds', 0) / 60:.1f} min in all.",
        "",
    ]
    lines += _throughput(results)
    lines += _effect(results)
    lines += _growth(results)
    lines += report_fastpath.markdown(results)
    lines += report_impact.markdown(results)
    lines += ["| target | measured | met |", "| --- | --- | --- |"]
    for t in results.get("targets", []):
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {t['text']} | {met} |")
    return "\n".join(lines) + "\n"


def _load(value: list[float] | None) -> str:
    return "?" if not value else " / ".join(f"{v:.1f}" for v in value)


def _throughput(results: dict[str, Any]) -> list[str]:
    section = results.get("throughput")
    if not section:
        return []
    lines = [
        "| scenario | rows/s | wall s | longest transaction s | vs procedure (paired) | "
        "per batch ms: wall / statement / rest |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, label in section["labels"].items():
        if name in section["unavailable"]:
            lines.append(f"| {label} | not available: {section['unavailable'][name]} | | | | |")
            continue
        s = section["summary"][name]
        rate = s["rows_per_second"]
        size = name.rsplit("-", 1)[-1]
        vs = ""
        if name.startswith("runner-") and size.isdigit():
            vs = _x(paired(results, name, f"procedure-{size}"))
        per_batch = ""
        if s["batch_ms"]["median"] is not None:
            per_batch = (f"{_num(s['batch_ms']['median'], 2)} / "
                         f"{_num(s['statement_ms']['median'], 2)} / "
                         f"{_num(s['overhead_ms']['median'], 2)}")
        lines.append(
            f"| {label} | {_num(rate['median'], 0)}{_pct(rate['spread'])} | "
            f"{_num(s['seconds']['median'], 2)} | {_num(s['longest_tx']['median'], 3)} | {vs} | "
            f"{per_batch} |"
        )
    return [*lines, "", *_overhead(results), ""]


def _overhead(results: dict[str, Any]) -> list[str]:
    """The runner's cost per batch beyond the procedure's, and its process start-up."""
    samples = results["throughput"]["samples"]
    notes = []
    for size in results["meta"]["options"]["batch_sizes"]:
        mine, theirs = f"runner-{size}", f"procedure-{size}"
        if mine not in samples or theirs not in samples:
            continue
        parts = [
            (field, ratio_diff(results, mine, theirs, field))
            for field in ("batch_ms", "statement_ms", "overhead_ms")
        ]
        if parts[0][1] is None:
            continue
        notes.append(
            f"batch {size}: {parts[0][1]:+.2f} ms a batch (statement {_signed(parts[1][1])}, "
            f"commit + round trip + client {_signed(parts[2][1])})"
        )
    startup = sorted(
        s["seconds"] - s["run_seconds"]
        for name, runs in samples.items() if name.startswith("runner-")
        for s in runs if s.get("run_seconds")
    )
    if not notes and not startup:
        return []
    text = "The runner against the procedure, per batch (medians): " + "; ".join(notes) + "."
    if startup:
        text += (f" Its process start-up and exit (Python, imports, connecting, the run's "
                 f"bookkeeping) take {startup[len(startup) // 2]:.2f} s.")
    return [text]


def ratio_diff(results: dict[str, Any], a: str, b: str, field: str) -> float | None:
    x, y = _median(results, a, field), _median(results, b, field)
    return None if x is None or y is None else x - y


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f} ms"


def _effect(results: dict[str, Any]) -> list[str]:
    section = results.get("effect")
    if not section:
        return []
    if "unavailable" in section:
        return [f"Effect on everyone else: not measured ({section['unavailable']}).", ""]
    labels = results.get("labels", {})
    kinds = [k for k in ("select-only", "tpcb-like") if k in section]
    names = ["baseline", *[n for n in section[kinds[0]] if n != "baseline"]]
    lines = [
        f"While each backfill ran (a {section['window_seconds']:g} s window, or until it "
        "ended), pgbench with 4 clients and the single-row writer ran next to it; in "
        f"parentheses, against the same load without a backfill in the {section['idle_seconds']:g}"
        " s just before (the baseline row: all those idle periods together):",
        "",
        "| backfill | " + "".join(f"{k} TPS | p99 ms | " for k in kinds)
        + "writer p99 ms | writer max s |",
        "| --- |" + " ---: |" * (2 * len(kinds) + 2),
    ]
    for name in names:
        cells = []
        writer_p99: list[float] = []
        writer_max: list[float] = []
        for kind in kinds:
            entry = section[kind].get(name)
            base = (entry or {}).get("baseline", section[kind]["baseline"])["pgbench"]
            if entry is None:
                cells += ["", ""]
                continue
            pb = entry["pgbench"]
            tps, p99 = _num(pb["tps"], 0), _num(pb["p99_ms"], 2)
            if name != "baseline":
                tps += f" ({_x(ratio(pb['tps'], base['tps']))})"
                p99 += f" ({_x(ratio(pb['p99_ms'], base['p99_ms']))})"
            cells += [tps, p99]
            if entry["writer"]["p99_ms"] is not None:
                writer_p99.append(entry["writer"]["p99_ms"])
            if entry["writer"]["max_ms"] is not None:
                writer_max.append(entry["writer"]["max_ms"])
        p99 = _num(max(writer_p99), 1) if writer_p99 else "n/a"
        worst = _num(max(writer_max) / 1000, 3) if writer_max else "n/a"
        lines.append(f"| {labels.get(name, name)} | {' | '.join(cells)} | {p99} | {worst} |")
    return [*lines, ""]


def _growth(results: dict[str, Any]) -> list[str]:
    section = results.get("growth")
    if not section:
        return []
    lines = [
        f"Cost as work grows (in-process runs, batch {section['batch_size']}; batch times in ms):",
        "",
        "| table | batches | median | p99 | max | first 10% | last 10% | last / first |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, label in (("dense", "dense keys"), ("sparse", "sparse keys (gaps, a 10^12 jump)"),
                        ("where_1pct", "where matching 1%")):
        p = section.get(name)
        if p is None:
            continue
        lines.append(
            f"| {label} | {p['batches']:,} | {_num(p['median_ms'], 2)} | {_num(p['p99_ms'], 2)} | "
            f"{_num(p['max_ms'], 2)} | {_num(p['first_10pct_median_ms'], 2)} | "
            f"{_num(p['last_10pct_median_ms'], 2)} | {_num(p['last_over_first'], 2)} |"
        )
    small, big = _rss(results)
    opts = results["meta"]["options"]
    rss = f"Runner peak RSS (the CLI process): {_num(small)} MB at {_rows(opts['rows'])} rows"
    if opts["big_rows"]:
        rss += f", {_num(big)} MB at {_rows(opts['big_rows'])} rows"
    return [*lines, "", rss + ".", ""]

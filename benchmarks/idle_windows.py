"""Issue 24: are the impact budget's idle windows idle? What the application does inside the
short windows the budget measures its baseline in, against windows with no runner at all.

The frontier's application (``benchmarks.frontier``: one open-loop pgbench at 40% of its
capacity, fsync on, for the whole experiment) and, in rounds, a no-runner baseline (20 s)
between runs of 45 s: the budget loose (900%) under a fixed ceiling of 5,000, 10,000 or 20,000
rows/s, so that the runner takes the budget's windows (0.8 s every 7 s) at a known pace, and
``max_impact = "20%"`` itself. A window is a gap of at least 0.6 s in the runner's progress
log (the checkpoint's trigger). Per run: the application's mean latency in the windows (after
the budget's 0.3 s settle, and in that settle), and while the runner works (10 s after its
first batch, outside the windows), each over the mean of the baselines before and after it;
and what the budget itself read at work, per signal (the median of its judgments' estimates
from the same time on, from its debug log): each against the windows it pooled, so the
application's truth to hold it against is "at work" over "in the windows".

    python3 -m benchmarks.idle_windows [--rounds N] [--out PATH]
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import logging
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from backfill.throttling import impact
from benchmarks import baselines, db, frontier, load, runner, step
from benchmarks.options import RESULTS, Options

log = logging.getLogger("benchmarks")

RUNS: dict[str, dict[str, Any]] = {
    "loose-5k": {"throttle": {"max_impact": "900%"}, "limits": {"max_rows_per_second": 5_000}},
    "loose-20k": {"throttle": {"max_impact": "900%"}, "limits": {"max_rows_per_second": 20_000}},
    "loose-10k": {"throttle": {"max_impact": "900%"}, "limits": {"max_rows_per_second": 10_000}},
    "budget-20%": {"throttle": {"max_impact": "20%"}},
}
BASELINE_SECONDS, RUN_SECONDS, GAP = 20.0, 45.0, 0.6
Transaction = tuple[float, float, float | None]


async def experiment(rounds: int, rows: int) -> dict[str, Any]:
    opts = Options()
    bench = await db.open_bench([baselines.PROCEDURE])
    try:
        binary = load.pgbench_binary(bench)
        if binary is None:
            return {"unavailable": "pgbench not found"}
        await load.init_pgbench(bench, binary, opts.pgbench_scale)
        script = Path(tempfile.mkdtemp(prefix="bench-idle-")) / "app.sql"
        script.write_text(frontier.SCRIPT)
        await bench.seed(db.Seed("frontier", rows))
        await frontier._prepare_wal(bench, opts.frontier_wal_prefill_mb)
        capacity = await frontier._capacity(bench, binary, script, opts)
        rate = capacity * opts.frontier_fraction
        plan = [*(["baseline", name] for _ in range(rounds) for name in RUNS)]
        runs, transactions = await _run(bench, binary, script, rate, [n for p in plan for n in p])
        return {"capacity_tps": capacity, "rate": rate, "runs": runs,
                "summary": summarise(runs, transactions)}
    finally:
        await db.close_bench(bench)


async def _run(bench: db.Bench, binary: str, script: Path, rate: float, plan: list[str]
               ) -> tuple[list[dict[str, Any]], list[Transaction]]:
    app_db = await bench.connect(load.PGBENCH_DB)
    for table in frontier.APP_TABLES:
        await app_db.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = off)")
    seconds = len(plan) * (RUN_SECONDS + 30) + 60
    app = load.Pgbench(binary, "custom", 8, ("-T", load.whole_seconds(seconds)), rate=rate)
    runs: list[dict[str, Any]] = []
    try:
        command = frontier._command(app, bench, script)
        async with await anyio.open_process(command, stdout=-3, stderr=-3) as process:
            try:
                await anyio.sleep(2)
                for name in [*plan, "baseline"]:
                    runs.append(await _one(bench, app_db, name))
                    log.info(f"idle windows: {name} done")
                await anyio.sleep(2)
            finally:
                await frontier._stop(process)
        return runs, app.transactions()
    finally:
        app.clean()
        await app_db.close()


async def _one(bench: db.Bench, app_db: Any, name: str) -> dict[str, Any]:
    await app_db.execute(f"VACUUM {', '.join(frontier.APP_TABLES)}")
    await bench.reset("frontier")
    await bench.conn.execute("ALTER TABLE public.users SET (autovacuum_enabled = off)")
    await bench.conn.execute(step.PROGRESS)
    await bench.conn.execute("VACUUM public.users")
    await bench.conn.execute("CHECKPOINT")
    t0 = time.time()
    if name == "baseline":
        await anyio.sleep(BASELINE_SECONDS)
        return {"name": name, "t0": t0, "t1": time.time()}
    fields = runner.job_fields(size=1000, target_seconds=0.1, **RUNS[name])
    proc = await runner.cli_process(bench, fields, stop_after=RUN_SECONDS,
                                    options=("--log-level", "debug"))
    progress = [(float(r["at"]), float(r["rows"]))
                for r in await bench.conn.fetch(step.PROGRESS_LOG)]
    return {"name": name, "t0": t0, "t1": time.time(), "progress": progress,
            "judged": _judged(proc.stderr)}


def _judged(log_lines: str) -> list[tuple[float, dict[str, float]]]:
    """The budget's judgments from the runner's JSON log: (epoch seconds, ratio per signal)."""
    found = []
    for line in log_lines.splitlines():
        if '"impact budget judged"' in line:
            entry = json.loads(line)
            at = datetime.fromisoformat(entry["ts"]).timestamp()
            found.append((at, {f"{j['statistic']} {j['signal']}": j["ratio"]
                               for j in entry["judgments"]}))
    return found


def summarise(runs: list[dict[str, Any]], transactions: list[Transaction]) -> list[dict[str, Any]]:
    """Per run: rows/s, windows, and the application's mean in them and at work, over the
    baselines around it."""
    ends = [t[0] for t in transactions]

    def mean(a: float, b: float) -> float | None:
        got = [t[1] for t in transactions[bisect.bisect_left(ends, a):bisect.bisect_right(ends, b)]]
        return statistics.mean(got) if got else None

    base = {k: mean(r["t0"] + 2, r["t1"]) for k, r in enumerate(runs) if r["name"] == "baseline"}
    out = []
    for k, r in enumerate(runs):
        if r["name"] == "baseline":
            continue
        around = [base[max(i for i in base if i < k)], base[min(i for i in base if i > k)]]
        ref = statistics.mean(v for v in around if v is not None)
        progress = r["progress"]
        gaps = [(a[0], b[0]) for a, b in itertools.pairwise(progress)
                if b[0] - a[0] >= GAP]
        first = progress[1][0] if len(progress) > 1 else r["t0"]
        work = _outside(gaps, first + 10, progress[-1][0])

        def ratio(spans: list[tuple[float, float]], ref: float = ref) -> float | None:
            parts = [(m, b - a) for a, b in spans if (m := mean(a, b)) is not None]
            weight = sum(w for _, w in parts)
            return sum(m * w for m, w in parts) / weight / ref if weight else None

        read: dict[str, list[float]] = {}
        for at, ratios in r["judged"]:
            for signal, value in ratios.items():
                if at >= first + 10:
                    read.setdefault(signal, []).append(value)
        out.append({
            "budget_read": {k: statistics.median(v) for k, v in sorted(read.items())},
            "name": r["name"], "baseline_ms": ref, "windows": len(gaps),
            "rows_per_second": _rate(progress),
            "in_windows": ratio([(a + impact.SETTLE, b) for a, b in gaps]),
            "window_settle": ratio([(a, a + impact.SETTLE) for a, b in gaps]),
            "at_work": ratio(work),
        })
    return out


def _outside(gaps: list[tuple[float, float]], start: float, end: float
             ) -> list[tuple[float, float]]:
    spans, at = [], start
    for a, b in gaps:
        if b > at:
            if a > at:
                spans.append((at, a))
            at = b
    return [*spans, (at, end)] if end > at else spans


def _rate(progress: list[tuple[float, float]]) -> float:
    if len(progress) < 3:
        return 0.0
    (t0, r0), (t1, r1) = progress[1], progress[-1]
    return (r1 - r0) / (t1 - t0) if t1 > t0 else 0.0


def markdown(result: dict[str, Any]) -> str:
    meta = result.get("meta", {})
    lines = [
        f"# Idle windows inside a run, {meta.get('date', '')} (issue 24)", "",
        f"`python3 -m benchmarks.idle_windows`: the frontier's application at 40% of a "
        f"capacity of {result.get('capacity_tps', 0):,.0f} tps (`-R "
        f"{result.get('rate', 0):,.0f}`, 8 clients, fsync on), the runs of 45 s between "
        f"no-runner baselines of 20 s; ratios over the mean of the baselines around each run.",
        "The last columns: the application at work over the application in the windows (what "
        "the budget should read), and the median of what the budget read, per signal.",
        "", "| run | rows/s | windows | app in the windows (after the settle) | in their first "
        "0.3 s | app at work | at work / in the windows | budget read: statements | canary |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    summary = result.get("summary", [])
    for s in summary:
        read = s.get("budget_read", {})
        truth = (s["at_work"] / s["in_windows"]) if s["at_work"] and s["in_windows"] else None
        lines.append(f"| {s['name']} | {s['rows_per_second']:,.0f} | {s['windows']} | "
                     f"{_x(s['in_windows'])} | {_x(s['window_settle'])} | {_x(s['at_work'])} | "
                     f"{_x(truth)} | {_x(read.get('typical statements'))} | "
                     f"{_x(read.get('typical canary'))} |")
    for name in RUNS:
        mine = [s | {"truth": s["at_work"] / s["in_windows"],
                     **{k: v for k, v in s.get("budget_read", {}).items()}}
                for s in summary if s["name"] == name and s["at_work"] and s["in_windows"]]
        if mine:
            reads = [_x(_median(mine, k)) if all(k in m for m in mine) else "n/a"
                     for k in ("typical statements", "typical canary")]
            lines.append(f"| **{name}, median** | {_median(mine, 'rows_per_second'):,.0f} | | "
                         f"{_x(_median(mine, 'in_windows'))} | "
                         f"{_x(_median(mine, 'window_settle'))} | "
                         f"{_x(_median(mine, 'at_work'))} | {_x(_median(mine, 'truth'))} | "
                         f"{' | '.join(reads)} |")
    return "\n".join(lines) + "\n"


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs if r[key] is not None))


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def main() -> None:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.idle_windows")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rows", type=int, default=3_500_000)
    now = datetime.now(UTC)
    p.add_argument("--out", type=Path, default=RESULTS / f"idle-windows-{now:%Y%m%dT%H%MZ}.json")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = anyio.run(experiment, a.rounds, a.rows, backend="asyncio")
    result["meta"] = {"date": f"{now:%Y-%m-%d %H:%M} UTC", "rows": a.rows, "rounds": a.rounds,
                      "machine": db.machine()}
    result.pop("runs", None)  # the progress logs: megabytes
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    a.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()

"""Issue 18's frontier: where the impact budget sits among fixed rate ceilings, measured from
outside by one application that never stops.

One open-loop pgbench (its own script: a read, an update and an insert in one transaction;
``-R`` at ``frontier_fraction`` of the capacity a short closed-loop run measured; fsync on)
runs for the whole experiment, with a per-transaction log. Runner configurations come and go
inside it, in rounds: fixed ceilings (``max_rows_per_second`` 2k..40k), the budget on each
statistic (``max_impact``: the typical latency; ``max_tail_impact``: the tail), and
configurations without a runner (the baselines) interleaved. Each configuration gets a
settle period (the runner's arrival and the budget's search: reported apart) and then its
window. Between configurations, outside every window: a fresh copy of the runner's table
(autovacuum off on it), VACUUM and CHECKPOINT (``checkpoint_timeout`` is an hour).

Windows are cut from pgbench's log: the application's mean and p99 latency, over the median
of the baselines; the runner's rows/s from a progress log its checkpoint's trigger writes (no
session polls it: the budget would count that session as an application). Then per
configuration the median over rounds, the fixed-pace frontier (impact against rows/s, for
the mean and the p99), and the budget's points against it (``bars``).
"""

from __future__ import annotations

import itertools
import logging
import signal
import statistics
import tempfile
import time
from pathlib import Path
from subprocess import DEVNULL
from typing import Any

import anyio

from backfill import sql
from benchmarks import load, runner, series, step
from benchmarks.db import Bench, Seed
from benchmarks.options import Options
from benchmarks.stats import percentile

log = logging.getLogger("benchmarks")

# The application: a read, an update and an insert, one transaction (pgbench's own tables).
SCRIPT = """\\set aid random(1, 100000 * :scale)
\\set delta random(-5000, 5000)
BEGIN;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime)
    VALUES (1, 1, :aid, :delta, CURRENT_TIMESTAMP);
END;
"""
CANARY = f"SELECT ratio, budget, duty, current_s, baseline_s, deciding FROM {sql.SCHEMA}.canaries"
APP_TABLES = ("pgbench_accounts", "pgbench_history", "pgbench_branches", "pgbench_tellers")
BASELINE = "baseline"
TYPICAL, TAIL = "budget-typical", "budget-tail"
# The bars (issue 18): the budget's rows/s at least this share of the fixed ceiling's that
# reaches the same impact; its impact at most 1 + budget + NOISE; its p99 ratio at most TAIL_COST
# times a fixed pace's of the same speed.
SPEED, NOISE, TAIL_COST = 0.8, 0.05, 1.15


def configurations(opts: Options) -> dict[str, dict[str, Any] | None]:
    """Every configuration by name: the runner's job fields, None for a baseline."""
    out: dict[str, dict[str, Any] | None] = {BASELINE: None}
    for rate in opts.frontier_rates:
        out[f"fixed-{rate // 1000}k"] = runner.job_fields(
            size=1000, target_seconds=0.1, limits={"max_rows_per_second": rate}
        )
    out[TYPICAL] = runner.job_fields(
        size=1000, target_seconds=0.1, throttle={"max_impact": opts.frontier_typical}
    )
    out[TAIL] = runner.job_fields(
        size=1000, target_seconds=0.1, throttle={"max_tail_impact": opts.frontier_tail}
    )
    return out


def schedule(names: list[str], baselines: int) -> list[str]:
    """One round: the runner configurations with ``baselines`` baselines spread among them
    (the first one first)."""
    runs = [n for n in names if n != BASELINE]
    out: list[str] = []
    every = max(1, round(len(runs) / baselines))
    for i, name in enumerate(runs):
        if i % every == 0 and out.count(BASELINE) < baselines:
            out.append(BASELINE)
        out.append(name)
    return out


async def frontier(bench: Bench, opts: Options) -> dict[str, Any]:
    binary = load.pgbench_binary(bench)
    if binary is None:
        return {"unavailable": "pgbench not found"}
    await load.init_pgbench(bench, binary, opts.pgbench_scale)
    found = configurations(opts)
    unsupported = {n: why for n, f in found.items()
                   if f is not None and (why := runner.supported(f)) is not None}
    names = [n for n in found if n not in unsupported]
    plan = schedule(names, opts.frontier_baselines) * opts.frontier_rounds
    script = Path(tempfile.mkdtemp(prefix="bench-frontier-")) / "app.sql"
    script.write_text(SCRIPT)
    capacity = await _capacity(bench, binary, script, opts)
    rate = max(1.0, capacity * opts.frontier_fraction)
    per = opts.frontier_settle + opts.frontier_window
    log.info(f"frontier: capacity {capacity:,.0f} tps; -R {rate:,.0f}; {len(plan)} windows "
             f"of {per:g} s")
    await bench.seed(Seed("frontier", opts.frontier_rows))
    # The application's tables are vacuumed in the gaps too, never by autovacuum in a window.
    app_db = await bench.connect(load.PGBENCH_DB)
    for table in APP_TABLES:
        await app_db.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = off)")
    # Long enough for every window and its gap (a gap is about as long as the copy takes);
    # stopped once the plan is done.
    app = load.Pgbench(binary, "custom", opts.pgbench_clients,
                       ("-T", load.whole_seconds(opts.warmup + len(plan) * (per + 30) + 60)),
                       rate=rate)
    windows: list[dict[str, Any]] = []
    try:
        command = _command(app, bench, script)
        async with await anyio.open_process(command, stdout=DEVNULL, stderr=DEVNULL) as process:
            try:
                await anyio.sleep(opts.warmup)
                for n, name in enumerate(plan):
                    await app_db.execute(f"VACUUM {', '.join(APP_TABLES)}")
                    windows.append(await _one(bench, opts, name, found[name], n))
                    log.info(_said(windows[-1]))
                await anyio.sleep(2)  # pgbench's buffered log lines of the last window are out
            finally:
                if process.returncode is None:
                    process.send_signal(signal.SIGINT)
                with anyio.move_on_after(10):
                    await process.wait()
                # pgbench behind its -R schedule can outlive SIGINT until its -T ends (minutes);
                # every window's transactions are logged by now.
                if process.returncode is None:
                    process.kill()
        transactions = app.transactions()
    finally:
        app.clean()
        await app_db.close()
        await bench.reset()
        await bench.drop_seed("frontier")
    return summarise(windows, transactions, opts, rate=rate, capacity=capacity,
                     unsupported=unsupported)


async def _capacity(bench: Bench, binary: str, script: Path, opts: Options) -> float:
    """Closed-loop transactions per second of the application alone."""
    alone = load.Pgbench(binary, "custom", opts.pgbench_clients,
                         ("-T", load.whole_seconds(opts.warmup + opts.capacity_seconds)))
    try:
        await anyio.run_process(_command(alone, bench, script), check=True)
        transactions = alone.transactions()
        first = min((end - ms / 1000 for end, ms, _ in transactions), default=0.0)
        last = max((end for end, _, _ in transactions), default=0.0)
        return float(alone.window(first + opts.warmup, last)["tps"])
    finally:
        alone.clean()


def _command(app: load.Pgbench, bench: Bench, script: Path) -> list[str]:
    """pgbench's command with the application's script instead of a built-in one."""
    command = app.command(bench, 0)
    return [*command[:-1], "-f", str(script), command[-1]]


async def _one(
    bench: Bench, opts: Options, name: str, fields: dict[str, Any] | None, n: int
) -> dict[str, Any]:
    """One configuration: the gap (a fresh table, VACUUM, CHECKPOINT), then its settle period
    and window (epoch seconds), and the runner's progress."""
    await bench.reset("frontier")
    await bench.conn.execute("ALTER TABLE public.users SET (autovacuum_enabled = off)")
    await bench.conn.execute(step.PROGRESS)
    await bench.conn.execute("VACUUM public.users")
    await bench.conn.execute("CHECKPOINT")
    settle, window = opts.frontier_settle, opts.frontier_window
    started = time.time()
    t0, t1 = started + settle, started + settle + window
    # No rows before the first batch, and none after the run was stopped (at the window's end).
    progress: list[series.Point] = [(started, 0.0)]
    if fields is None:
        await anyio.sleep(settle + window)
    else:
        await runner.cli_run(bench, fields, name, stop_after=settle + window)
        progress += [(float(r["at"]), float(r["rows"]))
                     for r in await bench.conn.fetch(step.PROGRESS_LOG)]
    progress.append((max(t1, progress[-1][0]), progress[-1][1]))
    # What the budget measured last (its canary row: ratio, duty, which statistic and signal).
    last = await bench.conn.fetchrow(CANARY) if fields and "throttle" in fields else None
    return {
        "name": name, "n": n, "settle": [started, t0], "window": [t0, t1],
        "budget_last": None if last is None else dict(last),
        "rows_per_second": series.rate(progress, t0, t1),
        "settle_rows_per_second": series.rate(progress, started, t0),
    }


def _said(w: dict[str, Any]) -> str:
    return f"frontier {w['n']} {w['name']}: {w['rows_per_second'] or 0:,.0f} rows/s"


def latency(transactions: list[tuple[float, float, float | None]], t0: float, t1: float
            ) -> dict[str, Any]:
    """The application's latency over the transactions that ended inside ``[t0, t1]``."""
    ms = [latency for end, latency, _ in transactions if t0 <= end <= t1]
    return {
        "transactions": len(ms),
        "mean_ms": statistics.fmean(ms) if ms else None,
        "p99_ms": percentile(ms, 99),
    }


def summarise(
    windows: list[dict[str, Any]], transactions: list[tuple[float, float, float | None]],
    opts: Options, *, rate: float, capacity: float, unsupported: dict[str, str],
) -> dict[str, Any]:
    for w in windows:
        w["app"] = latency(transactions, *w["window"])
        w["settle_app"] = latency(transactions, *w["settle"])
    base = [w["app"] for w in windows if w["name"] == BASELINE and w["app"]["transactions"]]
    baseline = {
        "mean_ms": _median([b["mean_ms"] for b in base]),
        "p99_ms": _median([b["p99_ms"] for b in base]),
        "windows": len(base),
        "p99_spread": [min((b["p99_ms"] for b in base), default=None),
                       max((b["p99_ms"] for b in base), default=None)],
    }
    for w in windows:
        for key, app in (("ratio", w["app"]), ("settle_ratio", w["settle_app"])):
            w[key] = {
                stat: _over(app[f"{stat}_ms"], baseline[f"{stat}_ms"]) for stat in ("mean", "p99")
            }
    configs: dict[str, Any] = {}
    for name in dict.fromkeys(w["name"] for w in windows):
        mine = [w for w in windows if w["name"] == name]
        configs[name] = {
            "windows": len(mine),
            "rows_per_second": _median([w["rows_per_second"] for w in mine]),
            "mean_ratio": _median([w["ratio"]["mean"] for w in mine]),
            "p99_ratio": _median([w["ratio"]["p99"] for w in mine]),
            "settle": {
                "rows_per_second": _median([w["settle_rows_per_second"] for w in mine]),
                "mean_ratio": _median([w["settle_ratio"]["mean"] for w in mine]),
                "p99_ratio": _median([w["settle_ratio"]["p99"] for w in mine]),
            },
        }
    out: dict[str, Any] = {
        "capacity_tps": capacity, "rate": rate, "fraction": opts.frontier_fraction,
        "settle_seconds": opts.frontier_settle, "window_seconds": opts.frontier_window,
        "typical": opts.frontier_typical, "tail": opts.frontier_tail,
        "baseline": baseline, "configurations": configs, "windows": windows,
        "unsupported": unsupported,
    }
    out["bars"] = bars(configs, typical=_share(opts.frontier_typical),
                       tail=_share(opts.frontier_tail))
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


def bars(configs: dict[str, Any], *, typical: float, tail: float) -> dict[str, Any]:
    """Each budget against the frontier of the statistic it holds."""
    out: dict[str, Any] = {}
    for name, stat, budget in ((TYPICAL, "mean", typical), (TAIL, "p99", tail)):
        c = configs.get(name)
        if c is None or c[f"{stat}_ratio"] is None or not c["rows_per_second"]:
            continue
        held = c[f"{stat}_ratio"]
        fixed = speed_at(fixed_points(configs, stat), held)
        same_speed_p99 = impact_at(fixed_points(configs, "p99"), c["rows_per_second"])
        out[name] = {
            "statistic": stat, "budget": budget, "impact": held,
            "rows_per_second": c["rows_per_second"], "fixed_same_impact": fixed,
            "speed_share": c["rows_per_second"] / fixed if fixed else None,
            "fast": bool(fixed) and c["rows_per_second"] >= SPEED * fixed,
            "within": held <= 1 + budget + NOISE,
            "fixed_p99_same_speed": same_speed_p99,
            "tail_cost": (c["p99_ratio"] / same_speed_p99
                          if same_speed_p99 and c["p99_ratio"] else None),
        }
        cost = out[name]["tail_cost"]
        out[name]["tail_ok"] = None if cost is None else cost <= TAIL_COST
    return out


def _share(text: str) -> float:
    return float(text.rstrip("%")) / 100 if text.endswith("%") else float(text)


def _over(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def _median(values: list[Any]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None

"""Issue 24's frontier: where the impact budget sits among fixed rate ceilings, measured from
outside by one application that never stops.

One open-loop pgbench (its own script: a read, an update and an insert in one transaction;
``-R`` at ``frontier_fraction`` of the capacity a short closed-loop run of ``pgbench_clients``
measured, with ``frontier_clients`` clients; fsync on) runs for the whole experiment, with a
per-transaction log. Runner configurations (``Config``) come and go inside it, in rounds:
every configuration once per round, in an order shuffled per round (``frontier_seed``), with
``frontier_baselines`` baselines (no runner) spread among them, the first window of a round a
baseline. Each configuration gets a settle period (the runner's arrival and the budget's
search: reported apart) and then its window. Between configurations, outside every window: a
fresh copy of the runner's table, VACUUM and CHECKPOINT; autovacuum is off on the runner's and
the application's tables, ``checkpoint_timeout`` is an hour, and WAL segments are prefilled
once (``min_wal_size`` large) so that windows recycle segments instead of creating them.
The ``-canary`` variants hide pg_stat_statements from the runner (the extension is dropped in
its database before the run and created again after it, outside the window).

Windows are cut from pgbench's log: the application's mean and p99 over the baseline
interpolated in time between the baseline windows around it (the host drifts: no global
median). The void rule (``frontier_judge.VOID_RULE``), fixed before any run: a round is void
when one of its baselines is off the line through its neighbouring baselines by more than
1.3x on the mean or 1.6x on the p99, or when it has fewer than 2 measured baselines; void
rounds are reported in brackets and left out of the medians. The runner's rows/s come from a
progress log its checkpoint's trigger writes (no session polls it: the budget would count that
session as an application); its log lines about its pace (``impact budget ...``, ``full
speed ...``) and its canary row are kept per window. Then per configuration the per-round
figures and their medians over valid rounds, the fixed-pace frontier and the bars (``BARS``).
"""

from __future__ import annotations

import json
import logging
import random
import signal
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from subprocess import DEVNULL
from typing import Any

import anyio
from anyio.abc import Process

from backfill import sql
from backfill.job import parse_share
from benchmarks import app_gauge, load, runner, series, step
from benchmarks import frontier_judge as judge
from benchmarks.app_gauge import AppGauge
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
# The whole row, whatever its columns are this week.
CANARY = f"SELECT to_jsonb(c) AS row FROM {sql.SCHEMA}.canaries c"
APP_TABLES = ("pgbench_accounts", "pgbench_history", "pgbench_branches", "pgbench_tellers")
BASELINE = judge.BASELINE
TYPICAL, TAIL, MEASURING = "budget-typical", "budget-tail", "budget-measuring"
CANARY_SUFFIX = "-canary"
APP_SUFFIX = "-app"  # with [throttle.app_latency] at the same budget over the last baseline
# The runner's log lines about its pace that a window keeps (its message starts so).
PACE_PREFIXES = ("impact budget", "full speed")
# Issue 24's bars ("Done when").
BARS: dict[str, float] = {
    "repeat": 1.5,              # a budget's rows/s per valid round, max / min
    "typical_mean": 1.25,       # max_impact's mean ratio at most
    "typical_speed": 0.8,       # its rows/s over the fixed paces' at a mean of ...
    "typical_at_mean": 1.15,
    "typical_tail_cost": 1.15,  # its p99 over a fixed pace's of the same speed
    "tail_p99": 1.6,            # max_tail_impact's p99 ratio at most
    "tail_speed": 0.7,          # its rows/s over the fixed paces' at a p99 of ...
    "tail_at_p99": 1.5,
    "measuring_mean": 1.03,     # the measurement's own cost on the mean
}


@dataclass(frozen=True, slots=True)
class Config:
    """One configuration of the frontier: a runner's job fields (None: a baseline, no runner),
    whether pg_stat_statements is hidden from the runner (canary-only), and whether the runner
    reads the application's own latency from Prometheus (``benchmarks.app_gauge``)."""

    name: str
    fields: dict[str, Any] | None = None
    hide_statements: bool = False
    app_latency: float | None = None  # [throttle.app_latency] max, this times the baseline's


def configurations(opts: Options) -> list[Config]:
    """Every configuration, the baseline first."""
    def job(**kw: Any) -> dict[str, Any]:
        return runner.job_fields(size=1000, target_seconds=0.1, **kw)

    typical = {"max_impact": opts.frontier_typical}
    tail = {"max_tail_impact": opts.frontier_tail}
    out = [Config(BASELINE)]
    out += [Config(f"fixed-{rate // 1000}k", job(limits={"max_rows_per_second": rate}))
            for rate in opts.frontier_rates]
    for name, throttle in ((TYPICAL, typical), (TAIL, tail)):
        out += [Config(name, job(throttle=throttle)),
                Config(name + CANARY_SUFFIX, job(throttle=throttle), hide_statements=True)]
    out.append(Config(TYPICAL + APP_SUFFIX, job(throttle=typical),
                      app_latency=1.0 + parse_share(opts.frontier_typical)))
    out.append(Config(MEASURING, job(throttle=typical, limits={"max_rows_per_second": 2})))
    chosen = set(opts.frontier_configs)
    return [c for c in out if not chosen or c.name in chosen or c.name == BASELINE]


def schedule(names: list[str], baselines: int, rounds: int, seed: int) -> list[list[str]]:
    """``rounds`` rounds: each every runner configuration once, in an order shuffled per round
    (one ``random.Random(seed)`` for the whole plan), with ``baselines`` baselines spread
    evenly among them, the first window of each round a baseline."""
    rng = random.Random(seed)
    runs = [n for n in names if n != BASELINE]
    count = max(1, baselines)
    before = {round(k * len(runs) / count) for k in range(count)}
    plan = []
    for _ in range(rounds):
        order = rng.sample(runs, len(runs))
        one: list[str] = []
        for i, name in enumerate(order):
            one += [BASELINE] * (i in before) + [name]
        one += [BASELINE] * (count - one.count(BASELINE))  # more baselines than runs
        plan.append(one)
    return plan


async def frontier(bench: Bench, opts: Options) -> dict[str, Any]:
    binary = load.pgbench_binary(bench)
    if binary is None:
        return {"unavailable": "pgbench not found"}
    await load.init_pgbench(bench, binary, opts.pgbench_scale)
    found = {c.name: c for c in configurations(opts)}
    unsupported = {n: why for n, c in found.items()
                   if c.fields is not None and (why := runner.supported(c.fields)) is not None}
    plan = schedule([n for n in found if n not in unsupported], opts.frontier_baselines,
                    opts.frontier_rounds, opts.frontier_seed)
    script = Path(tempfile.mkdtemp(prefix="bench-frontier-")) / "app.sql"
    script.write_text(SCRIPT)
    await bench.seed(Seed("frontier", opts.frontier_rows))
    try:
        wal = await _prepare_wal(bench, opts.frontier_wal_prefill_mb)
        capacity = await _capacity(bench, binary, script, opts)
        rate = max(1.0, capacity * opts.frontier_fraction)
        log.info(f"frontier: capacity {capacity:,.0f} tps; -R {rate:,.0f} with "
                 f"{opts.frontier_clients} clients; {len(plan)} rounds, {sum(map(len, plan))} "
                 f"windows of {opts.frontier_settle:g} + {opts.frontier_window:g} s; WAL {wal}")
        windows, transactions = await _experiment(bench, opts, binary, script, rate, plan, found)
    finally:
        await _forget_wal(bench)
        await bench.reset()
        await bench.drop_seed("frontier")
    return summarise(windows, transactions, opts, rate=rate, capacity=capacity,
                     unsupported=unsupported, wal=wal, plan=plan)


async def _experiment(
    bench: Bench, opts: Options, binary: str, script: Path, rate: float,
    plan: list[list[str]], found: dict[str, Config],
) -> tuple[list[dict[str, Any]], list[tuple[float, float, float | None]]]:
    """The one pgbench of the experiment and every window of ``plan`` inside it; the windows
    and pgbench's transactions."""
    app_db = await bench.connect(load.PGBENCH_DB)
    # The application's tables are vacuumed in the gaps, never by autovacuum in a window.
    for table in APP_TABLES:
        await app_db.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = off)")
    per = opts.frontier_settle + opts.frontier_window
    count = sum(map(len, plan))
    # Long enough for every window and its gap; stopped once the plan is done.
    app = load.Pgbench(binary, "custom", opts.frontier_clients,
                       ("-T", load.whole_seconds(opts.warmup + count * (per + 30) + 60)),
                       rate=rate)
    windows: list[dict[str, Any]] = []
    gauge = AppGauge()
    try:
        command = [*_command(app, bench, script)[:-1], "-P", "1", load.PGBENCH_DB]
        with gauge.served() as prom:
            async with (await anyio.open_process(command, stdout=DEVNULL) as process,
                        anyio.create_task_group() as tg):
                assert process.stderr is not None
                tg.start_soon(gauge.read, process.stderr)
                try:
                    await anyio.sleep(opts.warmup)
                    for r, names in enumerate(plan):
                        for name in names:
                            await app_db.execute(f"VACUUM {', '.join(APP_TABLES)}")
                            config = _with_app_latency(found[name], windows, gauge, prom.url)
                            windows.append(await _one(bench, opts, config, len(windows), r))
                            log.info(_said(windows[-1]))
                    await anyio.sleep(2)  # pgbench's buffered log lines of the last window
                finally:
                    await _stop(process)
        return windows, app.transactions()
    finally:
        app.clean()
        await app_db.close()


def _with_app_latency(config: Config, windows: list[dict[str, Any]], gauge: AppGauge,
                      url: str) -> Config:
    """``config`` with ``[throttle.app_latency]`` at its share over the baselines' mean latency
    so far (pgbench's, as its Prometheus has it; the median of their means, as a team sets its
    max from a long history: one window's mean moves 0.86-1.34 ms within a run), when it asks
    for it."""
    means = [m for w in windows if w["name"] == BASELINE
             if (m := gauge.mean(*w["window"])) is not None]
    reference = statistics.median(means) if means else None
    if config.app_latency is None or config.fields is None or reference is None:
        return config
    app = {"prometheus": url, "query": app_gauge.QUERY, "every": "5s",
           "max": config.app_latency * reference}
    throttle = config.fields.get("throttle", {}) | {"app_latency": app}
    return replace(config, fields=config.fields | {"throttle": throttle})


async def _stop(process: Process) -> None:
    """SIGINT, then SIGKILL: pgbench behind its -R schedule can outlive SIGINT until its -T
    ends (minutes); every window's transactions are logged by then."""
    if process.returncode is None:
        process.send_signal(signal.SIGINT)
    with anyio.move_on_after(10):
        await process.wait()
    if process.returncode is None:
        process.kill()


async def _prepare_wal(bench: Bench, megabytes: int) -> dict[str, Any]:
    """Keep ``min_wal_size`` worth of WAL segments and create about ``megabytes`` of them
    once (switching segments), so that no window pays for creating one; the settings as
    the server reports them."""
    await bench.admin.execute("ALTER SYSTEM SET min_wal_size = '4GB'")
    await bench.admin.execute("ALTER SYSTEM SET max_wal_size = '32GB'")
    await bench.admin.execute("SELECT pg_reload_conf()")
    t0 = time.perf_counter()
    await bench.admin.execute("CREATE TABLE IF NOT EXISTS public.wal_prefill (n int)")
    for _ in range(max(0, megabytes) // 16):  # a segment is 16 MB
        await bench.admin.execute("INSERT INTO public.wal_prefill VALUES (1)")
        await bench.admin.execute("SELECT pg_switch_wal()")
    await bench.admin.execute("DROP TABLE public.wal_prefill")
    await bench.admin.execute("CHECKPOINT")
    return {
        "min_wal_size": await bench.admin.fetchval("SHOW min_wal_size"),
        "max_wal_size": await bench.admin.fetchval("SHOW max_wal_size"),
        "prefill_mb": megabytes, "prefill_seconds": time.perf_counter() - t0,
        "segments_mb": await bench.admin.fetchval(
            "SELECT (sum(size) / 1048576)::int8 FROM pg_ls_waldir()"),
    }


async def _forget_wal(bench: Bench) -> None:
    """The server's WAL sizes as they were before ``_prepare_wal`` (for later sections)."""
    await bench.admin.execute("ALTER SYSTEM RESET min_wal_size")
    await bench.admin.execute("ALTER SYSTEM RESET max_wal_size")
    await bench.admin.execute("SELECT pg_reload_conf()")


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


async def _one(bench: Bench, opts: Options, config: Config, n: int, r: int) -> dict[str, Any]:
    """One configuration: the gap (a fresh table, VACUUM, CHECKPOINT; pg_stat_statements
    dropped if hidden), then its settle period and window (epoch seconds), the runner's
    progress, its pace lines and its canary row, and the gap's end (the extension back)."""
    await bench.reset("frontier")
    await bench.conn.execute("ALTER TABLE public.users SET (autovacuum_enabled = off)")
    await bench.conn.execute(step.PROGRESS)
    if config.hide_statements:
        await bench.conn.execute("DROP EXTENSION IF EXISTS pg_stat_statements")
    await bench.conn.execute("VACUUM public.users")
    await bench.conn.execute("CHECKPOINT")
    settle, window = opts.frontier_settle, opts.frontier_window
    started = time.time()
    t0, t1 = started + settle, started + settle + window
    # No rows before the first batch, and none after the run was stopped (at the window's end).
    progress: list[series.Point] = [(started, 0.0)]
    paces: list[dict[str, Any]] = []
    canary: list[Any] = []
    exit_code, error = None, None
    if config.fields is None:
        await anyio.sleep(settle + window)
    else:
        proc = await runner.cli_process(bench, config.fields, stop_after=settle + window)
        exit_code = proc.exit_code
        # 75: stopped at the window's end; -15: before its signal handlers were installed.
        if exit_code not in (0, 75, -signal.SIGTERM):  # kept, and the experiment goes on
            error = proc.stderr[-2000:]
            log.warning(f"frontier {config.name}: backfill run exited {exit_code}: {error}")
        paces = pace_lines(proc.stderr, t0)
        progress += [(float(r["at"]), float(r["rows"]))
                     for r in await bench.conn.fetch(step.PROGRESS_LOG)]
        canary = [json.loads(row["row"]) for row in await _canary(bench)]
    if config.hide_statements and bench.statements:
        await bench.conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    progress.append((max(t1, progress[-1][0]), progress[-1][1]))
    return {
        "name": config.name, "n": n, "round": r, "hide_statements": config.hide_statements,
        "settle": [started, t0], "window": [t0, t1], "paces": paces, "canary": canary,
        "exit_code": exit_code, "error": error,
        "rows_per_second": series.rate(progress, t0, t1),
        "settle_rows_per_second": series.rate(progress, started, t0),
    }


async def _canary(bench: Bench) -> list[Any]:
    """The canary rows (none when the runner never made its table)."""
    if not await bench.conn.fetchval(f"SELECT to_regclass('{sql.SCHEMA}.canaries') IS NOT NULL"):
        return []
    return list(await bench.conn.fetch(CANARY))


def pace_lines(stderr: str, t0: float) -> list[dict[str, Any]]:
    """The runner's log lines about its pace (JSON lines, or text ones: ``level message``):
    each ``{"t": seconds from the window's start (negative: settling), "msg": ...}`` plus
    its structured fields; ``t`` is None for a text line (it carries no time)."""
    out: list[dict[str, Any]] = []
    for line in stderr.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            entry = {"msg": line.split(None, 1)[-1] if line.strip() else ""}
        if not isinstance(entry, dict):
            continue
        message = str(entry.get("msg", ""))
        if not message.startswith(PACE_PREFIXES):
            continue
        at = entry.get("ts")
        t = datetime.fromisoformat(at).timestamp() - t0 if isinstance(at, str) else None
        fields = {k: v for k, v in entry.items() if k not in ("ts", "msg", "level", "logger")}
        out.append({"t": None if t is None else round(t, 3), "msg": message, **fields})
    return out


def _said(w: dict[str, Any]) -> str:
    return (f"frontier {w['n']} (round {w['round']}) {w['name']}: "
            f"{w['rows_per_second'] or 0:,.0f} rows/s")


def latency(transactions: list[tuple[float, float, float | None]], t0: float, t1: float
            ) -> dict[str, Any]:
    """The application's latency over the transactions that ended inside ``[t0, t1]``."""
    ms = [latency for end, latency, _ in transactions if t0 <= end <= t1]
    return {
        "transactions": len(ms),
        "mean_ms": sum(ms) / len(ms) if ms else None,
        "p99_ms": percentile(ms, 99),
    }


def summarise(
    windows: list[dict[str, Any]], transactions: list[tuple[float, float, float | None]],
    opts: Options, *, rate: float, capacity: float, unsupported: dict[str, str],
    wal: dict[str, Any] | None = None, plan: list[list[str]] | None = None,
) -> dict[str, Any]:
    """The experiment's result: every window judged, the void rounds, per-configuration
    figures, the bars."""
    for w in windows:
        w["app"] = latency(transactions, *w["window"])
        w["settle_app"] = latency(transactions, *w["settle"])
    return analyse(windows, opts) | {
        "capacity_tps": capacity, "rate": rate, "fraction": opts.frontier_fraction,
        "clients": opts.frontier_clients, "capacity_clients": opts.pgbench_clients,
        "settle_seconds": opts.frontier_settle, "window_seconds": opts.frontier_window,
        "rounds": opts.frontier_rounds, "seed": opts.frontier_seed,
        "typical": opts.frontier_typical, "tail": opts.frontier_tail,
        "wal": wal, "plan": plan, "unsupported": unsupported,
    }


def analyse(windows: list[dict[str, Any]], opts: Options) -> dict[str, Any]:
    """Windows with their app figures -> ratios, void rounds, configurations and bars."""
    judge.judge(windows)
    void = judge.void_rounds(windows)
    configs = judge.per_config(windows, void)
    base = judge.baselines(windows)
    return {
        "void_rule": judge.VOID_RULE,
        "void": {str(r): why for r, why in void.items()},
        "baseline": {"windows": len(base),
                     "mean_ms": judge.median([b[1] for b in base]),
                     "p99_ms": judge.median([b[2] for b in base]),
                     "p99_spread": [min((b[2] for b in base), default=None),
                                    max((b[2] for b in base), default=None)]},
        "configurations": configs, "windows": windows,
        "bars": bars(configs, opts),
    }


def bars(configs: dict[str, Any], opts: Options) -> list[dict[str, Any]]:
    """Issue 24's bars, one row each: ``target``, ``measured``, ``bar``, ``met`` (None when
    it cannot be judged: a configuration or a frontier point missing)."""
    out: list[dict[str, Any]] = []
    mean_line = judge.fixed_points(configs, "mean")
    p99_line = judge.fixed_points(configs, "p99")
    for name in (TYPICAL, TYPICAL + CANARY_SUFFIX, TYPICAL + APP_SUFFIX, TAIL,
                 TAIL + CANARY_SUFFIX):
        c = configs.get(name)
        if c is None:
            continue
        out.append(_repeat(name, c))
        rows = c["rows_per_second"]
        if name.startswith(TYPICAL):
            fixed = judge.speed_at(mean_line, BARS["typical_at_mean"])
            same = judge.impact_at(p99_line, rows) if rows else None
            out += [
                _bar(f"{name}: mean ratio", c["mean_ratio"], "<=", BARS["typical_mean"]),
                _bar(f"{name}: rows/s over the fixed paces' at a mean of "
                     f"{BARS['typical_at_mean']}x ({_n(fixed)})",
                     judge.over(rows, fixed), ">=", BARS["typical_speed"]),
                _bar(f"{name}: p99 over a fixed pace's as fast ({_x(same)})",
                     judge.over(c["p99_ratio"], same), "<=", BARS["typical_tail_cost"]),
            ]
        else:
            fixed = judge.speed_at(p99_line, BARS["tail_at_p99"])
            out += [
                _bar(f"{name}: p99 ratio", c["p99_ratio"], "<=", BARS["tail_p99"]),
                _bar(f"{name}: rows/s over the fixed paces' at a p99 of "
                     f"{BARS['tail_at_p99']}x ({_n(fixed)})",
                     judge.over(rows, fixed), ">=", BARS["tail_speed"]),
            ]
    if (c := configs.get(MEASURING)) is not None:
        out.append(_bar(f"{MEASURING}: mean ratio", c["mean_ratio"], "<=",
                        BARS["measuring_mean"]))
    return out


def _repeat(name: str, c: dict[str, Any]) -> dict[str, Any]:
    """Max over min of a configuration's rows/s over its valid rounds (two at least)."""
    paces = [r["rows_per_second"] for r in c["rounds"] if not r["void"] and r["rows_per_second"]]
    spread = max(paces) / min(paces) if len(paces) >= 2 else None
    return _bar(f"{name}: rows/s per valid round, max / min ({len(paces)} rounds)",
                spread, "<=", BARS["repeat"])


def _bar(target: str, measured: float | None, sense: str, bar: float) -> dict[str, Any]:
    met = None if measured is None else (measured <= bar if sense == "<=" else measured >= bar)
    return {"target": target, "measured": measured, "bar": f"{sense} {bar:g}", "met": met}


def _n(value: float | None) -> str:
    return "?" if value is None else f"{value:,.0f} rows/s"


def _x(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}x"

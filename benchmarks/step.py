"""Issue 10's load step: one long run while pgbench (closed loop, tpcb-like) is off, on, off.

Done twice on a fresh copy of a table big enough to outlast the step (``--step-rows``):
unthrottled, and with the impact budget. Before each, pgbench runs alone (its baseline p99).
The step starts when the run's first batch has committed: off ``step_phases[0]`` s, pgbench on
``step_phases[1]`` s, off ``step_phases[2]`` s, then the run is stopped (SIGTERM). Measured:

- progress: the checkpoint's ``rows_updated`` at every batch, logged by a trigger on the
  checkpoint (no session polls it: the budget would count that session as an application at
  work), on a grid of ``step_sample`` s; so rows/s in each phase;
- pgbench's per-transaction log: when the load really came on and went off (its first
  transaction's start, its last one's end) and its p99 over a sliding 1 s window (every
  0.1 s), so how soon after the load comes on that p99 is back within 1.3x of the baseline (and
  stays within for 2 s), and the share of the windows within from then until the load goes off
  (a budget that gets back but does not hold shows there).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import anyio

from backfill import sql
from benchmarks import impact, load, plot, runner, series
from benchmarks.db import Bench, Seed
from benchmarks.options import Options
from benchmarks.stats import ratio

log = logging.getLogger("benchmarks")

KIND = "tpcb-like"
WINDOW, EVERY, MIN_COUNT = 1.0, 0.1, 20  # the sliding p99: width, step, fewest transactions
HOLD = 2.0  # back within: the sliding p99 then stays within for this long
ARRIVAL = 5.0  # seconds after the load comes on reported apart: how the runner met it
FIRST_BATCH_WAIT = 30.0  # a run that has not committed a batch by then starts the step anyway
# The run's progress, logged by the server at every batch: a session polling the checkpoint
# would be "another session at work" to the impact budget, which would then hold back.
FIRST_BATCH = "bench_first_batch"
PROGRESS = f"""
CREATE TABLE public.bench_progress (at float8 NOT NULL, rows int8 NOT NULL);
CREATE FUNCTION public.bench_progress() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.bench_progress
    VALUES (extract(epoch FROM clock_timestamp()), NEW.rows_updated);
    IF OLD.batches = 0 THEN
        PERFORM pg_notify('{FIRST_BATCH}', '');
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER bench_progress AFTER UPDATE ON {sql.SCHEMA}.checkpoints
FOR EACH ROW WHEN (NEW.batches <> OLD.batches) EXECUTE FUNCTION public.bench_progress()"""
PROGRESS_LOG = "SELECT at, rows FROM public.bench_progress ORDER BY at"


async def load_step(bench: Bench, opts: Options) -> dict[str, Any]:
    binary = load.pgbench_binary(bench)
    if binary is None:
        return {"unavailable": "pgbench not found"}
    await load.init_pgbench(bench, binary, opts.pgbench_scale)
    out: dict[str, Any] = {
        "phases": list(opts.step_phases), "rows": opts.step_rows, "kind": KIND,
        "clients": opts.pgbench_clients, "max_impact": opts.max_impact, "runs": {},
    }
    await bench.seed(Seed("step", opts.step_rows))
    try:
        for name, fields in impact.compared(opts.batch_sizes[0], opts.max_impact).items():
            if (why := runner.supported(fields)) is not None:
                out["runs"][name] = {"unavailable": why}
                continue
            await bench.reset("step")
            out["runs"][name] = measured = await _one(bench, binary, opts, fields, name)
            rates = measured["rows_per_second"]
            log.info(
                f"step {name}: off {rates['off'] or 0:,.0f} rows/s, on "
                f"{rates['on'] or 0:,.0f}; p99 on "
                f"{measured['pgbench_on']['p99_ms']} ms (baseline "
                f"{measured['baseline']['p99_ms']}), first {ARRIVAL:g} s "
                f"{measured['p99_ratio_first']}x, after {measured['p99_ratio_rest']}x; back within "
                f"in {measured['recovery_seconds']}"
            )
    finally:
        await bench.reset()  # the run database held a copy of the seed: drop it first
        await bench.drop_seed("step")
    runs = out["runs"]
    off = [runs.get(n, {}).get("rows_per_second", {}).get("off")
           for n in (impact.BUDGET, impact.UNTHROTTLED)]
    out["off_ratio"] = ratio(*off)
    out["plot"] = plot.load_step(out, opts.out.parent / "load-step.png")
    return out


async def _one(
    bench: Bench, binary: str, opts: Options, fields: dict[str, Any], name: str
) -> dict[str, Any]:
    baseline = await load.alone(
        bench, binary, KIND, opts.pgbench_clients, seconds=opts.step_baseline, warmup=opts.warmup
    )
    off_before, on, off_after = opts.step_phases
    pgbench = load.Pgbench(binary, KIND, opts.pgbench_clients, ("-T", load.whole_seconds(on)))
    stop, moving = threading.Event(), anyio.Event()
    done: dict[str, Any] = {}

    async def backfill() -> None:
        try:
            done["sample"] = await runner.cli_run(bench, fields, name, stop=stop)
        finally:
            moving.set()

    def first_batch(*_: object) -> None:
        moving.set()

    await bench.conn.execute(PROGRESS)
    await bench.conn.add_listener(FIRST_BATCH, first_batch)  # LISTEN, before the run starts
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(backfill)
            with anyio.move_on_after(FIRST_BATCH_WAIT):
                await moving.wait()
            started = time.time()
            try:
                await anyio.sleep(off_before)
                await anyio.run_process(pgbench.command(bench, 0), check=True)
                await anyio.sleep(off_after)
            finally:
                stopped = time.time()
                stop.set()
    finally:
        await bench.conn.remove_listener(FIRST_BATCH, first_batch)
    log_ = [(float(r["at"]), float(r["rows"])) for r in await bench.conn.fetch(PROGRESS_LOG)]
    progress = _grid(log_, started, stopped, opts.step_sample)
    transactions = pgbench.transactions()
    t_on = min((end - ms / 1000 for end, ms, _ in transactions), default=stopped)
    t_off = max((end for end, _, _ in transactions), default=stopped)
    loaded = pgbench.window(t_on, t_off)
    # The load's arrival apart (issue 18): the first seconds, and the rest of the load.
    first = pgbench.window(t_on, min(t_off, t_on + ARRIVAL))
    rest = pgbench.window(min(t_off, t_on + ARRIVAL), t_off)
    pgbench.clean()
    points = [(end, ms) for end, ms, _ in transactions]
    measured = _measure(progress, points, baseline, (started, t_on, t_off, stopped))
    return measured | {
        "pgbench_on": loaded,
        "p99_ratio_on": ratio(loaded["p99_ms"], baseline["p99_ms"]),
        "pgbench_first": first,
        "p99_ratio_first": ratio(first["p99_ms"], baseline["p99_ms"]),
        "p99_ratio_rest": ratio(rest["p99_ms"], baseline["p99_ms"]),
        "exhausted": done["sample"].completed,
        "backfill": done["sample"].as_dict(),
    }


def _grid(
    log_: list[series.Point], started: float, stopped: float, every: float
) -> list[series.Point]:
    """The logged progress every ``every`` seconds from ``started`` to ``stopped``; after the
    run's last batch (it was stopped, or the table ran out) the rows stay where they are."""
    if not log_:
        return []
    times = [started + n * every for n in range(int((stopped - started) / every) + 1)]
    grid: list[series.Point] = []
    for t in [*[t for t in times if t < stopped], stopped]:
        value = series.at(log_, t)
        if value is None:  # before the first batch, or after the last
            value = log_[0][1] if t < log_[0][0] else log_[-1][1]
        grid.append((t, value))
    return grid


def _measure(
    progress: list[series.Point], points: list[series.Point], baseline: dict[str, Any],
    times: tuple[float, float, float, float],
) -> dict[str, Any]:
    """Rows/s in each phase, and pgbench's sliding p99 (``points``: end, latency ms) while the
    load is on; ``times``: the step started, the load came on, went off, the run stopped."""
    started, t_on, t_off, stopped = times
    limit = None if baseline["p99_ms"] is None else impact.P99_LIMIT * baseline["p99_ms"]
    p99 = series.sliding_percentile(
        points, t0=t_on, t1=t_off, width=WINDOW, step=EVERY, q=99, min_count=MIN_COUNT
    )
    recovery = None if limit is None else series.settled(
        p99, start=t_on, end=t_off, limit=limit, hold=HOLD
    )
    off_seconds = (t_on - started) + (stopped - t_off)
    before, after = series.rate(progress, started, t_on), series.rate(progress, t_off, stopped)
    off = None
    if before is not None and after is not None and off_seconds > 0:
        off = (before * (t_on - started) + after * (stopped - t_off)) / off_seconds
    return {
        "baseline": baseline,
        "limit_ms": limit,
        "seconds": {"on": t_on - started, "off": t_off - started, "stop": stopped - started},
        "rows_per_second": {
            "off_before": before, "on": series.rate(progress, t_on, t_off), "off_after": after,
            "off": off,
        },
        "recovery_seconds": recovery,
        "within_share": None if limit is None else series.share_within(
            p99, start=t_on, end=t_off, limit=limit
        ),
        "held_share": None if limit is None or recovery is None else series.share_within(
            p99, start=t_on + recovery, end=t_off, limit=limit
        ),
        "series": {
            "rows_per_second": [
                [round(t - started, 3), round(r)] for t, r in series.trailing_rates(progress, 1.0)
            ],
            "p99_ms": [[round(t - started, 3), v] for t, v in p99],
        },
    }


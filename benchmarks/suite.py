"""The whole benchmark, in one run: throughput of every scenario (repeated, interleaved so that a
noisy neighbour slows them all alike), their effect on everyone else, and cost as work grows."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from backfill import __version__
from backfill.checkpoint import BatchResult
from benchmarks import (
    baselines,
    db,
    fastpath,
    frontier,
    impact,
    load,
    openloop,
    plot,
    runner,
    shapes,
    step,
)
from benchmarks.db import Bench, Seed
from benchmarks.options import Options
from benchmarks.sample import Sample
from benchmarks.stats import percentile, summary

log = logging.getLogger("benchmarks")

Run = Callable[[Bench, float | None], Awaitable[Sample]]


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    label: str
    run: Run
    under_load: bool
    unavailable: str | None = None
    throughput: bool = True  # also measured alone, repeatedly (else only under load)


def scenarios(opts: Options) -> list[Scenario]:
    def procedure(size: int) -> Run:
        return lambda bench, window: baselines.procedure(bench, size, window=window)

    def cli(name: str, fields: dict[str, Any]) -> Run:
        return lambda bench, window: runner.cli_run(bench, fields, name, stop_after=window)

    small = opts.batch_sizes[0]
    target = runner.job_fields(size=small, target_seconds=0.1)
    gentle = runner.job_fields(size=small, target_seconds=0.1, sleep_ratio=1.0)
    # "A starting configuration for a busy primary" in docs/throttling.md ([batch] and the rate
    # ceiling).
    starter = runner.job_fields(
        batch={"size": 500, "min_size": 50, "max_size": 20_000},
        target_seconds=0.2, sleep_ratio=0.5,
        limits={"lock_timeout": "500ms", "max_rows_per_second": 5000},
    )
    budget = impact.budget_fields(small, opts.max_impact)
    # Each runner right after the procedure it is compared with: the pair sees the same
    # moment of a noisy machine.
    found: list[Scenario] = [
        Scenario("update", "one UPDATE", lambda b, w: baselines.update_all(b, window=w), True),
        Scenario(
            "do-block", "DO block, 1000 + sleep 0.05", lambda b, w: baselines.do_block(b, window=w),
            True,
        ),
    ]
    for size in opts.batch_sizes:
        found += [
            Scenario(f"procedure-{size}", f"procedure, batch {size}", procedure(size), False),
            Scenario(
                f"runner-{size}", f"runner, batch {size}",
                cli(f"runner-{size}", runner.job_fields(size=size)), True,
            ),
        ]
    found += [
        Scenario(
            "runner-target-0.1", "runner, target_seconds 0.1", cli("runner-target-0.1", target),
            True, unavailable=runner.supported(target),
        ),
        # Issue 20: every batch waiting for its commit's flush, as before (effect only; the
        # fast path compares both modes' throughput).
        Scenario(
            f"runner-{small}-flush", f"runner, batch {small}, wait_for_flush",
            cli(f"runner-{small}-flush",
                runner.job_fields(size=small, batch={"wait_for_flush": True})),
            True, throughput=False,
        ),
        Scenario(
            "runner-sleep-0.05", f"runner, batch {small} + sleep 0.05",
            cli("runner-sleep-0.05", runner.job_fields(size=small, sleep_seconds=0.05)), True,
        ),
        # Not in the list: what "gentle" costs, next to what it buys (effect only).
        Scenario(
            "runner-gentle", "runner, target_seconds 0.1 + sleep_ratio 1",
            cli("runner-gentle", gentle), True, unavailable=runner.supported(gentle),
            throughput=False,
        ),
        Scenario(
            "runner-starter", "runner, busy-primary starting config",
            cli("runner-starter", starter), True, unavailable=runner.supported(starter),
            throughput=False,
        ),
        # Issue 10: the impact budget next to the fixed configurations (effect only).
        Scenario(
            impact.BUDGET, impact.label(opts.max_impact), cli(impact.BUDGET, budget), True,
            unavailable=runner.supported(budget), throughput=False,
        ),
    ]
    if opts.scenarios:
        found = [s for s in found if s.name in opts.scenarios]
    return found


def _say(message: str) -> None:
    log.info(message)


async def throughput(bench: Bench, opts: Options, found: list[Scenario]) -> dict[str, Any]:
    measured = [s for s in found if s.throughput]
    samples: dict[str, list[Sample]] = {s.name: [] for s in measured if s.unavailable is None}
    for rep in range(opts.repeat):
        for scenario in measured:
            if scenario.unavailable is not None:
                continue
            await bench.reset()
            sample = await scenario.run(bench, None)
            samples[scenario.name].append(sample)
            _say(
                f"throughput {rep + 1}/{opts.repeat} {scenario.name}: {sample.rows:,} rows "
                f"in {sample.seconds:.2f}s ({sample.rows_per_second:,.0f} rows/s)"
            )
    fields = ("rows_per_second", "seconds", "longest_tx", "run_seconds", "batch_ms",
              "statement_ms", "overhead_ms", "rss_mb", "batches")
    return {
        "samples": {k: [s.as_dict() for s in v] for k, v in samples.items()},
        "summary": {
            k: {f: summary([s.as_dict()[f] for s in v]) for f in fields}
            for k, v in samples.items()
        },
        "unavailable": {s.name: s.unavailable for s in measured if s.unavailable is not None},
        "labels": {s.name: s.label for s in measured},
    }


async def effect(bench: Bench, opts: Options, found: list[Scenario]) -> dict[str, Any]:
    """Each backfill under each load, for a window; each window opens with its own idle
    baseline (the same load without a backfill), so a noisy neighbour moves both alike."""
    binary = load.pgbench_binary(bench)
    if binary is None:
        return {"unavailable": "pgbench not found"}
    await load.init_pgbench(bench, binary, opts.pgbench_scale)
    out: dict[str, Any] = {"window_seconds": opts.load_seconds, "idle_seconds": opts.idle_seconds}
    loaded = [s for s in found if s.under_load and s.unavailable is None]
    if opts.loaded_scenarios:
        loaded = [s for s in loaded if s.name in opts.loaded_scenarios]
    for kind in opts.load_kinds:
        results: dict[str, Any] = {}
        for scenario in loaded:
            await bench.reset()
            pgbench = load.Pgbench(binary, kind, opts.pgbench_clients, opts.pgbench_segment)
            writer = load.Writer(runner.JOB, opts.writer_pause)
            sample, measured = await load.under_load(
                bench, pgbench, writer, lambda s=scenario: s.run(bench, opts.load_seconds),
                warmup=opts.warmup, idle=opts.idle_seconds,
            )
            measured["backfill"] = sample.as_dict()
            results[scenario.name] = measured
            base, during = measured["baseline"]["pgbench"], measured["pgbench"]
            _say(
                f"effect {kind} {scenario.name}: {during['tps']:,.0f} tps "
                f"(idle {base['tps']:,.0f}), p99 {during['p99_ms']} ms (idle {base['p99_ms']}); "
                f"writer max {measured['writer']['max_ms']} ms"
            )
        results["baseline"] = load.pooled([r["baseline"] for r in results.values()])
        out[kind] = results
    return out


def _profile(batches: list[BatchResult], lo: int, hi: int) -> dict[str, Any]:
    """Batch durations across the key range: the first and last 10%, and the whole run."""
    ms = [b.seconds * 1000 for b in batches]
    width = max(hi - lo, 1)
    position = [(int(b.cursor[0]) - lo) / width if b.cursor else 1.0 for b in batches]
    first = [m for m, p in zip(ms, position, strict=True) if p <= 0.1]
    last = [m for m, p in zip(ms, position, strict=True) if p >= 0.9]
    first_median, last_median = summary(first)["median"], summary(last)["median"]
    return {
        "batches": len(batches),
        "rows": sum(b.rows for b in batches),
        "median_ms": summary(ms)["median"],
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms, default=None),
        "first_10pct_median_ms": first_median,
        "last_10pct_median_ms": last_median,
        "last_over_first": last_median / first_median if first_median and last_median else None,
    }


async def _in_process(bench: Bench, seed: str, size: int) -> dict[str, Any]:
    await bench.reset(seed)
    lo, hi = await bench.conn.fetchrow("SELECT min(id), max(id) FROM public.users")
    batches, seconds = await runner.in_process(bench, runner.job_fields(size=size))
    result = _profile(batches, int(lo), int(hi))
    result["seconds"] = seconds
    result["rows_per_second"] = result["rows"] / seconds if seconds else None
    stats = await bench.statement_stats('%UPDATE "public"."users" SET%')
    if stats is not None and batches:
        client_ms = sum(b.seconds for b in batches) * 1000 / len(batches)
        result["client_statement_ms"] = client_ms
        result["server_statement_ms"] = stats["mean_ms"]
        result["loop_ms"] = seconds * 1000 / len(batches) - client_ms
    return result


async def growth(bench: Bench, opts: Options) -> dict[str, Any]:
    size = opts.batch_sizes[0]
    out: dict[str, Any] = {"batch_size": size, "rows": opts.rows}
    out["dense"] = await _in_process(bench, "users", size)
    _say(f"growth dense: {out['dense']['last_over_first']} last/first 10%")
    for name, seed in (
        ("sparse", Seed("sparse", opts.rows, ids=db.SPARSE)),
        ("where_1pct", Seed("where_1pct", opts.rows, display=db.ONE_PERCENT)),
    ):
        await bench.seed(seed)
        out[name] = await _in_process(bench, seed.name, size)
        await bench.reset()  # the run database held a copy of the seed: drop it first
        await bench.drop_seed(seed.name)
        _say(f"growth {name}: median {out[name]['median_ms']:.1f} ms, max {out[name]['max_ms']}")
    if opts.big_rows:
        big = runner.job_fields(size=opts.batch_sizes[-1])
        await bench.seed(Seed("big", opts.big_rows))
        await bench.reset("big")
        sample = await runner.cli_run(bench, big, f"runner-{opts.batch_sizes[-1]}-big")
        out["big"] = {"rows": opts.big_rows, **sample.as_dict()}
        await bench.reset()
        await bench.drop_seed("big")
        _say(f"growth big: {sample.rows:,} rows, RSS {sample.rss_mb:.1f} MB")
    return out


async def run_suite(opts: Options) -> dict[str, Any]:
    started = time.perf_counter()
    meta: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": db.machine(),
        "backfill_version": __version__,
        "options": {k: v for k, v in asdict(opts).items() if k != "out"},
        "loadavg": {"start": db.loadavg()},
        "server_settings": {**db.SETTINGS, "fsync": "on", "synchronous_commit": "on",
                            "full_page_writes": "on"},
    }
    results: dict[str, Any] = {"meta": meta}
    bench = await db.open_bench([baselines.PROCEDURE])
    try:
        meta["postgresql"] = await bench.version()
        meta["pg_stat_statements"] = bench.statements
        _say(f"PostgreSQL {meta['postgresql']} on 127.0.0.1:{bench.pg.port}; seeding")
        meta["seed_seconds"] = await bench.seed(Seed("users", opts.rows))
        found = scenarios(opts)
        results["labels"] = {s.name: s.label for s in found}
        results["unavailable"] = {s.name: s.unavailable for s in found if s.unavailable}
        if "throughput" in opts.sections:
            meta["loadavg"]["before_throughput"] = db.loadavg()
            results["throughput"] = await throughput(bench, opts, found)
        if "fastpath" in opts.sections:
            meta["loadavg"]["before_fastpath"] = db.loadavg()
            results["fastpath"] = await fastpath.fastpath(bench, opts)
        if "effect" in opts.sections:
            meta["loadavg"]["before_effect"] = db.loadavg()
            results["effect"] = await effect(bench, opts, found)
        if "step" in opts.sections:
            meta["loadavg"]["before_step"] = db.loadavg()
            results["step"] = await step.load_step(bench, opts)
        if "open-loop" in opts.sections:
            meta["loadavg"]["before_open_loop"] = db.loadavg()
            results["open_loop"] = await openloop.open_loop(bench, opts)
        if "frontier" in opts.sections:
            meta["loadavg"]["before_frontier"] = db.loadavg()
            results["frontier"] = await frontier.frontier(bench, opts)
            results["frontier"]["plot"] = plot.frontier(
                results["frontier"], opts.out.with_suffix(".png")
            )
        if "shapes" in opts.sections:
            meta["loadavg"]["before_shapes"] = db.loadavg()
            results["shapes"] = await shapes.shapes(bench, opts)
        if "growth" in opts.sections:
            meta["loadavg"]["before_growth"] = db.loadavg()
            results["growth"] = await growth(bench, opts)
    finally:
        await db.close_bench(bench)
    meta["loadavg"]["end"] = db.loadavg()
    meta["seconds"] = time.perf_counter() - started
    return results

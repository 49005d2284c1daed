"""Issue 10's open loop: the foreground as a production primary sees it, a fixed arrival rate.

First a short closed-loop pgbench run (nothing else running) measures the server's capacity;
then pgbench ``-R`` at ``open_fraction`` of it (same kind, clients and single-row writer as the
effect table) runs next to the runner unthrottled and with the impact budget, each window
opening with its own idle baseline (the same open-loop load without a backfill). With ``-R``
pgbench counts each transaction's latency from its scheduled start, so it includes the
schedule lag: a server that falls behind shows as latency, not as fewer transactions.
"""

from __future__ import annotations

import logging
from typing import Any

from benchmarks import impact, load, runner
from benchmarks.db import Bench
from benchmarks.options import Options

log = logging.getLogger("benchmarks")


async def open_loop(bench: Bench, opts: Options) -> dict[str, Any]:
    binary = load.pgbench_binary(bench)
    if binary is None:
        return {"unavailable": "pgbench not found"}
    await load.init_pgbench(bench, binary, opts.pgbench_scale)
    kind, clients = opts.open_kind, opts.pgbench_clients
    capacity = await load.alone(
        bench, binary, kind, clients, seconds=opts.capacity_seconds, warmup=opts.warmup
    )
    rate = max(1.0, capacity["tps"] * opts.open_fraction)
    log.info(f"open loop: capacity {capacity['tps']:,.0f} tps ({kind}); -R {rate:,.0f}")
    # One pgbench segment spans the whole window: a new one would forget the backlog.
    segment = ("-T", load.whole_seconds(opts.warmup + opts.idle_seconds + opts.load_seconds + 2))
    out: dict[str, Any] = {
        "kind": kind, "clients": clients, "capacity": capacity, "fraction": opts.open_fraction,
        "rate": rate, "window_seconds": opts.load_seconds, "idle_seconds": opts.idle_seconds,
        "max_impact": opts.max_impact, "runs": {},
    }
    for name, fields in impact.compared(opts.batch_sizes[0], opts.max_impact).items():
        if (why := runner.supported(fields)) is not None:
            out["runs"][name] = {"unavailable": why}
            continue
        await bench.reset()
        pgbench = load.Pgbench(binary, kind, clients, segment, rate=rate)
        writer = load.Writer(runner.JOB, opts.writer_pause)
        sample, measured = await load.under_load(
            bench, pgbench, writer,
            lambda f=fields, n=name: runner.cli_run(bench, f, n, stop_after=opts.load_seconds),
            warmup=opts.warmup, idle=opts.idle_seconds,
        )
        out["runs"][name] = measured | {"backfill": sample.as_dict()}
        base, during = measured["baseline"]["pgbench"], measured["pgbench"]
        log.info(
            f"open loop {name}: {sample.rows_per_second:,.0f} rows/s; p99 {during['p99_ms']} ms "
            f"(idle {base['p99_ms']}), lag p99 {during.get('lag_p99_ms')} ms"
        )
    measured_runs = [r for r in out["runs"].values() if "baseline" in r]
    out["baseline"] = load.pooled([r["baseline"] for r in measured_runs]) if measured_runs else None
    return out

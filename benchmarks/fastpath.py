"""Issue 11's fast path: the runner's whole process against the COMMIT-per-batch procedure as
paired, interleaved repetitions, its own CPU per batch, its start-up, and uvloop A/B. The
runner runs in both commit modes (issue 20): batches that do not wait for the WAL flush (the
default) and ``wait_for_flush = true``.

Every repetition runs, one right after the other (so that a pair sees the same moment of a
noisy machine): the procedure and the runner at each batch size, the runner with
``BACKFILL_UVLOOP=1`` (before the batch-1000 pair on odd repetitions, after it on even ones),
and a run on a 1-row table, which has nothing to do but start, do one batch and stop.

- CPU: user + system of the ``backfill run`` process (its rusage, from ``launch.py``), per
  batch; "without start-up" subtracts the median CPU of the 1-row runs and their one batch.
- Start-up: ``python -m backfill --help`` (wall time through ``launch.py``), and, on the 1-row
  runs, the time from the launcher's start of the process to the start of its first batch: a
  trigger on the checkpoint records the server's clock when the first batch saves it, less the
  batch's own duration (which the batch statement records in the session's
  ``backfill.recent``). The server and the launcher read the same clock (one machine). Also
  when the run was recorded (``backfill.runs.started_at``: connected, locked, checked).
- uvloop: only when it is importable and the runner really uses it for ``BACKFILL_UVLOOP=1``
  (and not without): checked once with ``python -X importtime`` on the 1-row table.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import statistics
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from backfill import sql
from benchmarks import baselines, runner
from benchmarks.db import Bench, Seed
from benchmarks.options import Options
from benchmarks.stats import ratio, summary

log = logging.getLogger("benchmarks")

EMPTY = "runner-1-row"
UVLOOP_ENV = {"BACKFILL_UVLOOP": "1"}
# The runner with every batch waiting for its commit's flush (``[batch] wait_for_flush``), as it
# did before issue 20; the plain runner-N arms run with the default (no wait).
FLUSH = "flush"

FIRST_BATCH = f"""
CREATE TABLE public.bench_first_batch (at timestamptz NOT NULL, micros int8);
CREATE FUNCTION public.bench_first_batch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.bench_first_batch VALUES (
        clock_timestamp(),
        split_part(split_part(current_setting('{sql.RECENT}', true), ' ', 1), ',', 2)::int8);
    RETURN NULL;
END $$;
CREATE TRIGGER bench_first_batch AFTER UPDATE ON {sql.SCHEMA}.checkpoints
FOR EACH ROW WHEN (OLD.batches = 0 AND NEW.batches > 0)
EXECUTE FUNCTION public.bench_first_batch()"""
FIRST_BATCH_AT = """
SELECT extract(epoch FROM at)::float8 - coalesce(micros, 0) / 1e6
FROM public.bench_first_batch ORDER BY at LIMIT 1"""
RUN_STARTED_AT = f"""
SELECT extract(epoch FROM started_at)::float8 FROM {sql.SCHEMA}.runs ORDER BY id DESC LIMIT 1"""

Run = Callable[[], Awaitable[dict[str, Any]]]


def _uvloop(size: int) -> str:
    return f"runner-{size}-uvloop"


async def fastpath(bench: Bench, opts: Options) -> dict[str, Any]:
    small = opts.batch_sizes[0]
    await bench.seed(Seed("one", 1))
    try:
        uvloop = await uvloop_unavailable(bench, small)
        samples: dict[str, list[dict[str, Any]]] = {}
        for rep in range(opts.pairs):
            for name, run in _plan(bench, opts, rep, uvloop=uvloop is None):
                sample = await run()
                samples.setdefault(name, []).append(sample)
                log.info(
                    f"fastpath {rep + 1}/{opts.pairs} {name}: {sample['rows']:,} rows in "
                    f"{sample['seconds']:.2f}s, CPU {sample.get('cpu_seconds') or 0:.2f}s"
                )
        helps = [await _help_seconds() for _ in range(opts.help_runs)]
    finally:
        await bench.reset()  # the run database held a copy of the seed: drop it first
        await bench.drop_seed("one")
    log.info(f"fastpath --help: {statistics.median(helps):.3f}s (median of {len(helps)})")
    return {
        "pairs": opts.pairs,
        "samples": samples,
        "paired": {
            str(size): _paired(samples, f"runner-{size}", f"procedure-{size}")
            for size in opts.batch_sizes
        } | {
            f"{size}-{FLUSH}": _paired(samples, f"runner-{size}-{FLUSH}", f"procedure-{size}")
            for size in opts.batch_sizes
        },
        "cpu_ms_per_batch": {
            name: _cpu(runs, samples[EMPTY]) for name, runs in samples.items()
            if name.startswith("runner-") and name != EMPTY
        },
        "startup": _startup(samples[EMPTY], helps),
        "uvloop": (
            {"unavailable": uvloop} if uvloop is not None
            else {"batch_size": small, **_paired(samples, _uvloop(small), f"runner-{small}")}
        ),
    }


def _plan(bench: Bench, opts: Options, rep: int, *, uvloop: bool) -> list[tuple[str, Run]]:
    def procedure(size: int) -> Run:
        async def run() -> dict[str, Any]:
            await bench.reset()
            return (await baselines.procedure(bench, size)).as_dict()
        return run

    def cli(name: str, size: int, env: dict[str, str] | None = None, *,
            flush: bool = False) -> Run:
        async def run() -> dict[str, Any]:
            await bench.reset()
            fields = runner.job_fields(size=size, batch={"wait_for_flush": flush})
            return (await runner.cli_run(bench, fields, name, env=env)).as_dict()
        return run

    plan: list[tuple[str, Run]] = []
    for size in opts.batch_sizes:
        arms = [(f"runner-{size}", cli(f"runner-{size}", size)),
                (f"runner-{size}-{FLUSH}", cli(f"runner-{size}-{FLUSH}", size, flush=True))]
        # The procedure first, then both modes, in turns: neither always follows the other.
        plan += [(f"procedure-{size}", procedure(size)), *(arms if rep % 2 == 0 else arms[::-1])]
    if uvloop:
        small = opts.batch_sizes[0]
        arm = (_uvloop(small), cli(_uvloop(small), small, UVLOOP_ENV))
        plan.insert(3 if rep % 2 == 0 else 0, arm)
    return [*plan, (EMPTY, lambda: _one_row(bench, opts.batch_sizes[0]))]


async def _one_row(bench: Bench, size: int) -> dict[str, Any]:
    """A run with nothing to do but start, one batch, and stop; when its first batch began."""
    await bench.reset("one")
    await bench.conn.execute(FIRST_BATCH)
    sample = (await runner.cli_run(bench, runner.job_fields(size=size), EMPTY)).as_dict()
    first = await bench.conn.fetchval(FIRST_BATCH_AT)
    opened = await bench.conn.fetchval(RUN_STARTED_AT)
    start = sample["started_at"]
    return sample | {
        "first_batch_seconds": None if first is None or start is None else first - start,
        "run_opened_seconds": None if opened is None or start is None else opened - start,
    }


def _paired(samples: dict[str, list[dict[str, Any]]], a: str, b: str) -> dict[str, Any]:
    """a's rows/s over b's, repetition by repetition: whole process, and over their runs alone
    (the server's record of a run, without process start-up and exit)."""
    pairs = list(zip(samples.get(a, []), samples.get(b, []), strict=False))
    whole = [ratio(x["rows_per_second"], y["rows_per_second"]) for x, y in pairs]
    in_run = [ratio(_in_run(x), _in_run(y)) for x, y in pairs]
    return {
        "whole": summary(whole),
        "in_run": summary(in_run),
        "rows_per_second": {
            name: summary([s["rows_per_second"] for s in samples.get(name, [])]) for name in (a, b)
        },
    }


def _in_run(sample: dict[str, Any]) -> float | None:
    """Rows/s over the run alone (the procedure's is its whole call)."""
    seconds = sample.get("run_seconds")
    return sample["rows"] / seconds if seconds else None


def _cpu(runs: list[dict[str, Any]], empty: list[dict[str, Any]]) -> dict[str, Any]:
    """The runner's CPU milliseconds per batch, with its start-up, and without (less the
    median of a 1-row run, which did one batch)."""
    idle = summary([e.get("cpu_seconds") for e in empty])["median"]
    whole, without = [], []
    for s in runs:
        cpu, batches = s.get("cpu_seconds"), s.get("batches")
        if cpu is None or not batches:
            continue
        whole.append(cpu * 1000 / batches)
        if idle is not None and batches > 1:
            without.append((cpu - idle) * 1000 / (batches - 1))
    return {"whole": summary(whole), "without_startup": summary(without)}


def _startup(empty: list[dict[str, Any]], helps: list[float]) -> dict[str, Any]:
    return {
        "help_seconds": summary(helps),
        "first_batch_seconds": summary([e.get("first_batch_seconds") for e in empty]),
        "run_opened_seconds": summary([e.get("run_opened_seconds") for e in empty]),
        "one_row_process_seconds": summary([e.get("seconds") for e in empty]),
        "one_row_cpu_seconds": summary([e.get("cpu_seconds") for e in empty]),
    }


async def _help_seconds() -> float:
    args = [sys.executable, "-m", "backfill", "--help"]
    env = runner.cli_env("postgresql://unused")
    proc = await anyio.to_thread.run_sync(runner.spawn, args, env, None)
    if proc.exit_code != 0:
        raise RuntimeError(f"backfill --help exited {proc.exit_code}: {proc.stderr[-2000:]}")
    return proc.seconds


_IMPORTED = re.compile(r"\|\s+uvloop(\.\w+)*\s*$", re.MULTILINE)


async def uvloop_unavailable(bench: Bench, size: int) -> str | None:
    """None when the runner runs on uvloop with ``BACKFILL_UVLOOP=1`` and without it
    otherwise, else why the A/B cannot be made."""
    if importlib.util.find_spec("uvloop") is None:
        return "uvloop is not installed (pip install -e '.[bench]')"
    imported = {}
    for arm, env in (("with", UVLOOP_ENV), ("without", {})):
        await bench.reset("one")
        proc = await runner.cli_process(
            bench, runner.job_fields(size=size), env=env, python=("-X", "importtime")
        )
        if proc.exit_code != 0:
            return f"the check run exited {proc.exit_code}: {proc.stderr[-500:]}"
        imported[arm] = _IMPORTED.search(proc.stderr) is not None
    if not imported["with"]:
        return "the runner ignores BACKFILL_UVLOOP=1 (it never imports uvloop)"
    if imported["without"]:
        return "the runner imports uvloop without BACKFILL_UVLOOP=1 too: nothing to compare"
    return None

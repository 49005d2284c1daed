"""Issue 17's copy and delete jobs: the runner's whole process against the same statement as one
server-side loop (a procedure, ``COMMIT`` after each batch, walking the same keyset slices) and
as one single statement, on the benchmark's ``users`` table, paired and interleaved.

Every repetition runs, for each shape (copy into an empty table; delete; delete with an
archive) and each batch size, the procedure and the runner one right after the other (their
order alternating between repetitions, so neither always sees a warmer or a noisier moment),
then the one statement. Every run starts from a fresh copy of the seeded database (the target
and archive tables empty, every source row present, the cache warm), made outside the timed
part; its rows are counted afterwards from the tables themselves (the copy in the target, the
deleted rows gone from the source, the archived ones in the archive), the same way for every
arm, and a run that did not do all of its work is reported, never hidden.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from benchmarks import runner
from benchmarks.bars import bar, num, x
from benchmarks.db import WHERE, Bench
from benchmarks.fastpath import _paired
from benchmarks.options import Options
from benchmarks.stats import ratio, summary

log = logging.getLogger("benchmarks")

SOURCE = "public.users"
TARGET = "public.users_copy"
ARCHIVE = "public.users_archive"
COLUMNS = "id, first_name, last_name, email, address, display_name"
GOAL = 0.95  # runner / procedure rows/s at every batch size, whole process (issue 26)
SERVER_GOAL = 1.15  # the batch statement's server time per batch over the bare statement's
# Each arm's statement in pg_stat_statements: the runner's batch statement (its prepared and
# grouped forms alike), and the procedure's own statement, as plpgsql sends it.
RUNNER_STATEMENT = "%backfill_changed%"
BARE = {"copy": f"INSERT INTO {TARGET} %", "delete": f"DELETE FROM {SOURCE} WHERE%",
        "archive": "WITH moved AS (DELETE%"}

# The copy's target and the archive: the source's columns, keyed like it.
TABLES = """
CREATE TABLE {name} (
    id bigint PRIMARY KEY, first_name text NOT NULL, last_name text NOT NULL,
    email text NOT NULL, address text NOT NULL, display_name text
);
ALTER TABLE {name} SET (autovacuum_enabled = off)"""

# Each shape's batch statement as docs/job-file.md describes it, over a slice of the key.
STATEMENTS = {
    "copy": f"""
        INSERT INTO {TARGET} ({COLUMNS})
        SELECT {COLUMNS} FROM {SOURCE} WHERE {{slice}} AND ({WHERE})
        FOR SHARE ON CONFLICT (id) DO NOTHING""",
    "delete": f"DELETE FROM {SOURCE} WHERE {{slice}} AND ({WHERE})",
    "archive": f"""
        WITH moved AS (DELETE FROM {SOURCE} WHERE {{slice}} AND ({WHERE}) RETURNING {COLUMNS})
        INSERT INTO {ARCHIVE} ({COLUMNS}) SELECT {COLUMNS} FROM moved""",
}
SHAPES = tuple(STATEMENTS)
LABELS = {"copy": "copy", "delete": "delete", "archive": "delete + archive"}

# The same (cursor, cursor + size] slices the runner takes on dense keys, COMMIT after each.
PROCEDURE = """
CREATE PROCEDURE public.bench_{shape}(lo bigint, hi bigint, size int)
LANGUAGE plpgsql AS $$
DECLARE
    cur bigint := lo - 1;
BEGIN
    WHILE cur < hi LOOP
        {statement};
        COMMIT;
        cur := cur + size;
    END LOOP;
END $$"""

Run = Callable[[], Awaitable[dict[str, Any]]]


def job_fields(shape: str, size: int) -> dict[str, Any]:
    """The runner's job file for a shape: the same table, key, predicate and batch size."""
    fields = runner.job_fields(size=size)
    del fields["set"]
    kind = {
        "copy": {"copy": {"into": TARGET}},
        "delete": {"delete": {}},
        "archive": {"delete": {"archive": ARCHIVE}},
    }[shape]
    return fields | kind


async def prepare(bench: Bench) -> int:
    """A fresh run database with the target, the archive and the procedures; its rows."""
    await bench.reset()
    for name in (TARGET, ARCHIVE):
        await bench.conn.execute(TABLES.format(name=name))
    for shape, statement in STATEMENTS.items():
        body = statement.format(slice="id > cur AND id <= cur + size")
        await bench.conn.execute(PROCEDURE.format(shape=shape, statement=body.strip()))
    return int(await bench.conn.fetchval(f"SELECT count(*) FROM {SOURCE}"))


async def done(bench: Bench, shape: str, before: int) -> int:
    """Rows the run changed, from the tables: copied, deleted, or deleted and archived (an
    archive that does not hold exactly the deleted rows is an error)."""
    if shape == "copy":
        return int(await bench.conn.fetchval(f"SELECT count(*) FROM {TARGET}"))
    deleted = before - int(await bench.conn.fetchval(f"SELECT count(*) FROM {SOURCE}"))
    if shape == "archive":
        archived = int(await bench.conn.fetchval(f"SELECT count(*) FROM {ARCHIVE}"))
        if archived != deleted:
            raise RuntimeError(f"archive: {deleted:,} rows deleted but {archived:,} archived")
    return deleted


async def _server_side(bench: Bench, shape: str, size: int | None) -> dict[str, Any]:
    """The procedure at ``size``, or (None) the one statement, on its own connection."""
    before = await prepare(bench)
    if size is None:
        command = STATEMENTS[shape].format(slice="true")
    else:
        lo, hi = await bench.conn.fetchrow(f"SELECT min(id), max(id) FROM {SOURCE}")
        command = f"CALL public.bench_{shape}({int(lo)}, {int(hi)}, {int(size)})"
    conn = await bench.connect()
    try:
        t0 = time.perf_counter()
        await conn.execute(command)
        seconds = time.perf_counter() - t0
    finally:
        await conn.close()
    rows = await done(bench, shape, before)
    server = await bench.statement_stats(BARE[shape]) if size is not None else None
    return _sample(rows, before, seconds, run_seconds=seconds,
                   statement_ms=server["mean_ms"] if server else None)


async def _runner(bench: Bench, shape: str, size: int) -> dict[str, Any]:
    before = await prepare(bench)
    sample = await runner.cli_run(bench, job_fields(shape, size), f"runner-{shape}-{size}")
    rows = await done(bench, shape, before)
    server = await bench.statement_stats(RUNNER_STATEMENT)
    return _sample(
        rows, before, sample.seconds, run_seconds=sample.run_seconds, batches=sample.batches,
        reported=sample.rows, cpu_seconds=sample.cpu_seconds, exit_code=sample.exit_code,
        statement_ms=server["mean_ms"] if server else None,
    )


def _sample(rows: int, before: int, seconds: float, **more: Any) -> dict[str, Any]:
    return {
        "rows": rows, "expected": before, "complete": rows == before, "seconds": seconds,
        "rows_per_second": rows / seconds if seconds > 0 else None, **more,
    }


def _plan(bench: Bench, opts: Options, rep: int) -> list[tuple[str, Run]]:
    def procedure(shape: str, size: int) -> Run:
        return lambda: _server_side(bench, shape, size)

    def cli(shape: str, size: int) -> Run:
        return lambda: _runner(bench, shape, size)

    def statement(shape: str) -> Run:
        return lambda: _server_side(bench, shape, None)

    plan: list[tuple[str, Run]] = []
    for shape in SHAPES:
        for size in opts.batch_sizes:
            pair = [(f"procedure-{shape}-{size}", procedure(shape, size))]
            if runner.supported(job_fields(shape, size)) is None:
                pair.append((f"runner-{shape}-{size}", cli(shape, size)))
            plan += pair if rep % 2 == 0 else pair[::-1]
        plan.append((f"statement-{shape}", statement(shape)))
    return plan


async def shapes(bench: Bench, opts: Options) -> dict[str, Any]:
    samples: dict[str, list[dict[str, Any]]] = {}
    for rep in range(opts.pairs):
        for name, run in _plan(bench, opts, rep):
            sample = await run()
            samples.setdefault(name, []).append(sample)
            rate = sample["rows_per_second"] or 0
            log.info(
                f"shapes {rep + 1}/{opts.pairs} {name}: {sample['rows']:,} rows in "
                f"{sample['seconds']:.2f}s ({rate:,.0f} rows/s)"
            )
    size = opts.batch_sizes[0]
    unavailable = runner.supported(job_fields("copy", size))
    section: dict[str, Any] = {
        "pairs": opts.pairs,
        "rows": opts.rows,
        "samples": samples,
        "paired": {
            shape: {
                str(size): {
                    "procedure": _paired(
                        samples, f"runner-{shape}-{size}", f"procedure-{shape}-{size}"
                    ),
                    "statement": _paired(samples, f"runner-{shape}-{size}", f"statement-{shape}"),
                    "procedure_over_statement": _paired(
                        samples, f"procedure-{shape}-{size}", f"statement-{shape}"
                    ),
                    "server_ms": _server(samples, f"runner-{shape}-{size}",
                                         f"procedure-{shape}-{size}"),
                }
                for size in opts.batch_sizes
            }
            for shape in SHAPES
        },
        "incomplete": sorted(
            name for name, runs in samples.items() if not all(s["complete"] for s in runs)
        ),
    }
    if unavailable is not None:
        section["runner_unavailable"] = unavailable
    section["bars"] = targets(section, opts.batch_sizes)
    return section


def _server(samples: dict[str, list[dict[str, Any]]], a: str, b: str) -> dict[str, Any]:
    """The batch statement's server time per batch (pg_stat_statements' mean) against the
    procedure's bare statement, pair by pair."""
    pairs = list(zip(samples.get(a, []), samples.get(b, []), strict=False))
    return {
        "ratio": summary([ratio(x.get("statement_ms"), y.get("statement_ms")) for x, y in pairs]),
        "ms": {name: summary([s.get("statement_ms") for s in samples.get(name, [])])
               for name in (a, b)},
    }


def targets(section: dict[str, Any], sizes: Sequence[int]) -> list[dict[str, Any]]:
    """Issue 26's bars for each shape: the runner at >= 0.95x the procedure's rows/s at every
    batch size, whole process (the median of the pairs' ratios); its batch statement's server
    time per batch <= 1.15x the procedure's bare statement's at the smallest."""
    out = []
    for shape in SHAPES:
        for size in sizes:
            paired = section["paired"][shape][str(size)]
            whole, in_run = paired["procedure"]["whole"], paired["procedure"]["in_run"]
            out.append(bar(
                f"{LABELS[shape]}: runner >= {GOAL:.2f}x procedure rows/s, batch {size}",
                whole["median"], GOAL, at_most=False,
                text=f"{x(whole['median'])} whole process ({x(whole['min'])}.."
                     f"{x(whole['max'])} over {whole['n']}); {x(in_run['median'])} without "
                     "start-up",
            ))
        server = section["paired"][shape][str(sizes[0])]["server_ms"]
        ms = list(server["ms"].values())
        out.append(bar(
            f"{LABELS[shape]}: batch statement's server time <= {SERVER_GOAL:.2f}x the bare "
            f"statement's, batch {sizes[0]}",
            server["ratio"]["median"], SERVER_GOAL, at_most=True,
            text=f"{x(server['ratio']['median'])} ({num(ms[0]['median'], 3)} vs "
                 f"{num(ms[1]['median'], 3)} ms)",
        ))
    return out

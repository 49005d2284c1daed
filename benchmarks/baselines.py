"""What users compare the runner with, all server-side on the same table and the same change:

1. one ``UPDATE`` for the whole table (the database's limit; one transaction);
2. a procedure looping over the same key slices as the runner, ``COMMIT`` after each (no client);
3. the classic blog post's ``DO`` block: slices of 1000 and ``pg_sleep(0.05)`` between them. A
   ``DO`` block cannot commit, so the whole loop is one transaction: every row it touched stays
   locked until the end.
"""

from __future__ import annotations

import time

import asyncpg

from benchmarks.db import SET_, WHERE, Bench
from benchmarks.sample import Sample

UPDATE_ALL = f"UPDATE public.users SET {SET_} WHERE {WHERE}"

# The same (cursor, cursor + size] slices the runner takes on dense keys.
PROCEDURE = f"""
CREATE OR REPLACE PROCEDURE public.bench_batches(lo bigint, hi bigint, size int)
LANGUAGE plpgsql AS $$
DECLARE
    cur bigint := lo - 1;
BEGIN
    WHILE cur < hi LOOP
        UPDATE public.users SET {SET_}
        WHERE id > cur AND id <= cur + size AND {WHERE};
        COMMIT;
        cur := cur + size;
    END LOOP;
END $$"""

DO_BLOCK = f"""
DO $$
DECLARE
    cur bigint;
    hi bigint;
BEGIN
    SELECT min(id) - 1, max(id) INTO cur, hi FROM public.users;
    WHILE cur < hi LOOP
        UPDATE public.users SET {SET_}
        WHERE id > cur AND id <= cur + 1000 AND {WHERE};
        cur := cur + 1000;
        PERFORM pg_sleep(0.05);
    END LOOP;
END $$"""

# pg_stat_statements text of the baselines' UPDATEs (the runner's quotes its identifiers).
STATEMENT = "UPDATE public.users SET display_name%"


async def _timed(
    bench: Bench, statement: str, window: float | None
) -> tuple[float, bool, str | None]:
    """Run one statement on a fresh connection; cancel it after ``window`` seconds."""
    conn = await bench.connect()
    try:
        t0 = time.perf_counter()
        try:
            status = await conn.execute(statement, timeout=window)
            completed = True
        except (TimeoutError, asyncpg.QueryCanceledError):
            status, completed = None, False
        return time.perf_counter() - t0, completed, status
    finally:
        await conn.close()


Stats = tuple[int, int | None, float | None, float | None]


async def _rows(bench: Bench, status: str | None) -> Stats:
    """Rows updated, batches, mean and max statement milliseconds of the last run."""
    stats = await bench.statement_stats(STATEMENT)
    if stats is not None:
        return int(stats["rows"]), int(stats["calls"]), stats["mean_ms"], stats["max_ms"]
    if status is not None and status.startswith("UPDATE"):
        return int(status.split()[-1]), None, None, None
    rows = await bench.conn.fetchval(f"SELECT count(*) FROM public.users WHERE NOT ({WHERE})")
    return int(rows), None, None, None


async def update_all(bench: Bench, *, window: float | None = None) -> Sample:
    seconds, completed, status = await _timed(bench, UPDATE_ALL, window)
    rows, _, _, _ = await _rows(bench, status) if completed else (0, None, None, None)
    return Sample("update", rows, seconds, batches=1, longest_tx=seconds, completed=completed)


async def procedure(bench: Bench, size: int, *, window: float | None = None) -> Sample:
    lo, hi = await bench.conn.fetchrow("SELECT min(id), max(id) FROM public.users")
    call = f"CALL public.bench_batches({int(lo)}, {int(hi)}, {int(size)})"
    seconds, completed, _ = await _timed(bench, call, window)
    rows, batches, mean_ms, max_ms = await _rows(bench, None)
    if batches is None:
        batches = -(-(int(hi) - int(lo) + 1) // size)
    return Sample(
        f"procedure-{size}",
        rows,
        seconds,
        batches=batches,
        longest_tx=None if max_ms is None else max_ms / 1000,
        run_seconds=seconds,
        batch_ms=seconds * 1000 / batches if batches else None,
        statement_ms=mean_ms,
        completed=completed,
    )


async def do_block(bench: Bench, *, window: float | None = None) -> Sample:
    seconds, completed, _ = await _timed(bench, DO_BLOCK, window)
    rows, batches, _, _ = await _rows(bench, None) if completed else (0, None, None, None)
    return Sample(
        "do-block", rows, seconds, batches=batches, longest_tx=seconds, completed=completed
    )

"""``plan`` and ``verify``: look at a job against the database without writing anything."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import asyncpg

from backfill import catalog, ranges, sql
from backfill.checkpoint import Checkpoint, to_checkpoint
from backfill.commands._common import guard
from backfill.connector import open_connection
from backfill.job import Job
from backfill.settings import ConnectParams


@dataclass(frozen=True, slots=True)
class Plan:
    job: str
    table: str
    key: str
    statement: str
    explain: str
    range_lo: tuple[str, ...] | None
    range_hi: tuple[str, ...] | None
    cursor: tuple[str, ...] | None
    rows_in_table: int
    rows_matching: int
    batches: int
    batch_seconds: float
    estimated_seconds: float


async def plan(job: Job, params: ConnectParams) -> Plan:
    """Validate, connect, and show what a run would do. Nothing is written.

    The batch time comes from EXPLAIN ANALYZE of the first batch's UPDATE in a transaction
    that is rolled back.
    """
    conn = await guard(open_connection(params, job))
    try:
        return await guard(_plan(conn, job))
    finally:
        await conn.close()


async def _plan(conn: asyncpg.Connection, job: Job) -> Plan:
    target = await catalog.resolve(conn, job)
    ckpt: Checkpoint | None = None
    if await conn.fetchval(sql.STATE_EXISTS):
        row = await conn.fetchrow(sql.LOAD, job.name, 0)
        ckpt = to_checkpoint(row) if row is not None else None
    if ckpt is not None:
        lo, hi, cursor = ckpt.range_lo, ckpt.range_hi, ckpt.cursor
    else:
        (lo, hi), cursor = await ranges.bounds(conn, target), None
    first = cursor is None
    statement = sql.batch(target, set_=job.set, where=job.where, first=first)
    dry = sql.dry_batch(target, set_=job.set, where=job.where, first=first)
    rows_in_table = await catalog.estimated_rows(conn, job)
    args = [list(cursor or lo or ()), list(hi or ()), job.batch.size, job.name, 0]
    explain_text, batch_seconds, matching = "(empty key range: nothing to do)", 0.0, 0
    if lo is not None:
        tx = conn.transaction()
        await tx.start()
        try:
            t0 = time.perf_counter()
            rows = await conn.fetch(sql.explain(dry, analyze=True), *args)
            batch_seconds = time.perf_counter() - t0
        finally:
            await tx.rollback()
        explain_text = "\n".join(r[0] for r in rows)
        count_plan = await conn.fetchval(
            f"EXPLAIN (FORMAT JSON) SELECT 1 FROM {target.relation} WHERE ({job.where})"
        )
        matching = int(json.loads(count_plan)[0]["Plan"]["Plan Rows"])
    batches = math.ceil(rows_in_table / job.batch.size) if lo is not None else 0
    return Plan(
        job=job.name,
        table=target.relation,
        key=target.columns(),
        statement=statement.strip(),
        explain=explain_text,
        range_lo=lo,
        range_hi=hi,
        cursor=cursor,
        rows_in_table=rows_in_table,
        rows_matching=matching,
        batches=batches,
        batch_seconds=batch_seconds,
        estimated_seconds=batches * (batch_seconds + job.batch.sleep_seconds),
    )


async def verify(job: Job, params: ConnectParams, *, slice_size: int | None = None) -> int:
    """Count rows in the job's key range that still match ``where``, slice by slice (each
    slice a bounded statement). Returns the count; 0 means the backfill is complete."""
    conn = await guard(open_connection(params, job))
    try:
        size = slice_size or min(100_000, job.batch.size * 10)
        return await guard(_verify(conn, job, size))
    finally:
        await conn.close()


async def _verify(conn: asyncpg.Connection, job: Job, size: int) -> int:
    target = await catalog.resolve(conn, job)
    lo, hi = None, None
    if await conn.fetchval(sql.STATE_EXISTS):
        # The whole job's range: from the first shard's start to the last shard's end.
        rows = await conn.fetch(sql.LOAD_ALL, job.name)
        if rows:
            lo, hi = rows[0]["range_lo"], rows[-1]["range_hi"]
    if lo is None:
        lo, hi = await ranges.bounds(conn, target)
    if lo is None:
        return 0
    first_q = sql.count_slice(target, where=job.where, first=True)
    next_q = sql.count_slice(target, where=job.where, first=False)
    total, cursor = 0, None
    while True:
        row = await conn.fetchrow(first_q if cursor is None else next_q, cursor or lo, hi, size)
        assert row is not None
        if row["cursor"] is None:
            return total
        total += row["rows"]
        cursor = row["cursor"]

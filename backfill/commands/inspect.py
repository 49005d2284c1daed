"""``plan`` and ``verify``: look at a job against the database without writing anything."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import asyncpg

from backfill import catalog, ranges, sql
from backfill.checkpoint import to_checkpoint
from backfill.commands._common import guard
from backfill.connector import check_fragments, open_connection
from backfill.conninfo import ConnectParams
from backfill.errors import ConfigError
from backfill.job import Job
from backfill.lifecycle import sync as lifecycle_sync


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
    shape: str = "update"
    warnings: tuple[str, ...] = ()
    sync: str = ""  # the sync trigger a copy with sync = "trigger" installs (its SQL)


async def plan(job: Job, params: ConnectParams) -> Plan:
    """Validate, connect, and show what a run would do. Nothing is written.

    The batch time comes from EXPLAIN ANALYZE of the real batch statement (claim, change,
    checkpoint) in a transaction that is rolled back; the checkpoint row it claims (and the
    state schema, before ``backfill init``) is made to exist in that transaction if need be.
    """
    if job.throttle.app_latency is not None:  # a query that cannot work, as ``run`` says
        from backfill.throttling import prometheus

        await prometheus.preflight(job.throttle.app_latency, job.throttle.check_timeout)
    conn = await guard(open_connection(params, job))
    try:
        return await guard(_plan(conn, job))
    finally:
        await conn.close()


async def _plan(conn: asyncpg.Connection, job: Job) -> Plan:
    target = await catalog.resolve(conn, job)
    change = await catalog.change(conn, job, target)
    await check_fragments(conn, job, target, change)
    sync_sql = ""
    if lifecycle_sync.wanted(job):
        await lifecycle_sync.check(conn, job, target, change)
        sync_sql = lifecycle_sync.install_sql(job, target, change)
    rows_in_table = await catalog.estimated_rows(conn, job)
    explain_text, batch_seconds, matching = "(empty key range: nothing to do)", 0.0, 0
    # All in one transaction, rolled back: the checkpoint row is locked first, so a running
    # job's batches wait for this one instead of moving its cursor meanwhile.
    tx = conn.transaction()
    await tx.start()
    try:
        if not await conn.fetchval(sql.STATE_EXISTS):
            try:
                await conn.execute(sql.INIT)
            except asyncpg.InsufficientPrivilegeError as exc:
                raise ConfigError(
                    "plan runs one batch (rolled back) with its checkpoint: the state schema "
                    "'backfill' does not exist: run `backfill init` first"
                ) from exc
        row = await conn.fetchrow(sql.LOAD_LOCKED, job.name, 0)
        ckpt = to_checkpoint(row) if row is not None else None
        if ckpt is not None:
            lo, hi, cursor = ckpt.range_lo, ckpt.range_hi, ckpt.cursor
        else:
            (lo, hi), cursor = await ranges.bounds(conn, target), None
        statement = sql.batch(
            target, change, first=cursor is None, flush=job.batch.wait_for_flush
        )
        if lo is not None:
            if ckpt is None:
                await conn.execute(
                    sql.CREATE, job.name, 0, 1, job.fingerprint, job.table.display, list(lo),
                    list(hi or ()), None, job.shape,
                )
            version = ckpt.batches if ckpt is not None else 0
            t0 = time.perf_counter()
            rows = await conn.fetch(
                sql.explain(statement, analyze=True), job.batch.size, version, job.name, 0, True
            )
            batch_seconds = time.perf_counter() - t0
    finally:
        await tx.rollback()
    if lo is not None:
        explain_text = "\n".join(r[0] for r in rows)
        count_plan = await conn.fetchval(
            f"EXPLAIN (FORMAT JSON) SELECT 1 FROM {target.relation} WHERE ({job.where})"
        )
        matching = int(json.loads(count_plan)[0]["Plan"]["Plan Rows"])
    batches = math.ceil(rows_in_table / job.batch.size) if lo is not None else 0
    warnings: list[str] = []
    if job.delete is not None:
        warnings = [
            f"{reference} references {job.table.display} without an index: each deleted row "
            "scans it"
            for reference in await catalog.unindexed_references(conn, job)
        ]
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
        shape=job.shape,
        warnings=tuple(warnings),
        sync=sync_sql,
    )


async def verify(job: Job, params: ConnectParams, *, slice_size: int | None = None) -> int:
    """Count the rows of the job's key range still to do, slice by slice (each slice a bounded
    statement): rows that still match ``where`` (update, delete); source rows matching it that
    are missing or different in the target (copy); for an archive, also archived rows whose
    key is still in the source. Returns the count; 0 means the job is complete."""
    conn = await guard(open_connection(params, job))
    try:
        size = slice_size or min(100_000, job.batch.size * 10)
        return await guard(_verify(conn, job, size))
    finally:
        await conn.close()


async def _verify(conn: asyncpg.Connection, job: Job, size: int) -> int:
    target = await catalog.resolve(conn, job)
    change = await catalog.change(conn, job, target)
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
    first_q = sql.count_slice(target, change, first=True)
    next_q = sql.count_slice(target, change, first=False)
    total, cursor = 0, None
    if change.kind == sql.ARCHIVE:
        total = await conn.fetchval(sql.archived_still_in_source(target, change.into), lo, hi)
    while True:
        row = await conn.fetchrow(first_q if cursor is None else next_q, cursor or lo, hi, size)
        assert row is not None
        if row["cursor"] is None:
            return total
        total += row["rows"]
        cursor = row["cursor"]

"""One plain async function per CLI verb; together they are the programmatic API.

Each takes validated values (a ``Job``, ``ConnectParams``) and raises ``BackfillError``
subclasses; the CLI only parses arguments and maps errors to exit codes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO, TypeVar

import anyio
import asyncpg

from backfill import catalog, sql
from backfill.checkpoint import Checkpoint
from backfill.errors import BackfillError, ConfigError, Interrupted
from backfill.job import Job
from backfill.loop import Loop, Policy
from backfill.observers import Fanout, LogLines, Progress, TerminalLine
from backfill.pg import Budget, connect, translate
from backfill.progress import Tracker
from backfill.protocols import Observer, Throttle
from backfill.session import (
    Identity,
    PgConnector,
    open_connection,
    require_state_schema,
    take_lock,
    to_checkpoint,
)
from backfill.settings import ConnectParams
from backfill.shutdown import Stop, stop_after, watch_signals
from backfill.throttle import AllOf, FixedSleep

log = logging.getLogger(__name__)

T = TypeVar("T")
ADMIN_BUDGET = Budget(statement_timeout=30.0, lock_timeout=5.0)


async def _admin(params: ConnectParams, verb: str) -> asyncpg.Connection:
    return await connect(params, budget=ADMIN_BUDGET, application_name=f"backfill:{verb}")


async def _guard(awaitable: Awaitable[T]) -> T:
    """Translate driver errors raised outside the run loop."""
    try:
        return await awaitable
    except BackfillError:
        raise
    except Exception as exc:
        error = translate(exc)
        if isinstance(error, BackfillError):
            raise error from exc
        raise ConfigError(str(error)) from exc


# --- init ---------------------------------------------------------------------------------------


async def init(params: ConnectParams) -> None:
    """Create (or upgrade) the state schema. Needs CREATE on the database; idempotent."""
    conn = await _admin(params, "init")
    try:
        await _guard(conn.execute(sql.INIT))
    finally:
        await conn.close()


# --- run ----------------------------------------------------------------------------------------


def identity() -> Identity:
    return Identity(host=socket.gethostname(), pid=os.getpid())


def policy_for(job: Job) -> Policy:
    return Policy(
        job=job.name,
        size=job.batch.size,
        min_size=job.batch.min_size,
        max_size=job.batch.max_size,
        max_retries=job.limits.max_retries,
        connect_retry_seconds=job.limits.connect_retry_seconds,
        skip_bad_rows=job.on_row_error == "skip",
    )


def default_observers(job: Job, tracker: Tracker, stream: TextIO) -> list[Observer]:
    progress = Progress(tracker)
    shown: Observer = (
        TerminalLine(stream, progress) if stream.isatty() else LogLines(job.name, progress)
    )
    return [progress, shown]


async def run(
    job: Job,
    params: ConnectParams,
    *,
    observers: Sequence[Observer] | None = None,
    throttles: Sequence[Throttle] = (),
    stream: TextIO | None = None,
) -> Checkpoint:
    """Run the job to the end of its key range (or resume it). Returns the final checkpoint.

    SIGTERM/SIGINT stop after the batch in flight (``Interrupted``, exit 75); a second signal
    aborts the batch in flight, which rolls back.
    """
    tracker = Tracker()
    if observers is None:
        observers = default_observers(job, tracker, stream or sys.stderr)
    stop = Stop()
    loop = Loop(
        policy_for(job),
        PgConnector(params, job, identity=identity()),
        throttle=AllOf([FixedSleep(job.batch.sleep_seconds), *throttles]),
        observer=Fanout(observers),
        stop=stop,
    )
    outcome: Checkpoint | BaseException | None = None
    abort = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch_signals, stop, abort)
        if job.limits.max_run_seconds is not None:
            tg.start_soon(stop_after, stop, job.limits.max_run_seconds)
        with abort:
            try:
                outcome = await loop.run()
            except BackfillError as error:
                outcome = error
        tg.cancel_scope.cancel()
    if abort.cancelled_caught:
        raise Interrupted("aborted by a second signal; the batch in flight rolled back")
    if isinstance(outcome, BaseException):
        raise outcome
    assert outcome is not None
    return outcome


# --- plan ---------------------------------------------------------------------------------------


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
    conn = await _guard(open_connection(params, job))
    try:
        return await _guard(_plan(conn, job))
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
        lo_v = await conn.fetchval(sql.lowest(target))
        hi_v = await conn.fetchval(sql.highest(target))
        lo = tuple(lo_v) if lo_v else None
        hi = tuple(hi_v) if hi_v else None
        cursor = None
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


# --- verify -------------------------------------------------------------------------------------


async def verify(job: Job, params: ConnectParams, *, slice_size: int | None = None) -> int:
    """Count rows in the job's key range that still match ``where``, slice by slice (each
    slice a bounded statement). Returns the count; 0 means the backfill is complete."""
    conn = await _guard(open_connection(params, job))
    try:
        size = slice_size or min(100_000, job.batch.size * 10)
        return await _guard(_verify(conn, job, size))
    finally:
        await conn.close()


async def _verify(conn: asyncpg.Connection, job: Job, size: int) -> int:
    target = await catalog.resolve(conn, job)
    lo, hi = None, None
    if await conn.fetchval(sql.STATE_EXISTS):
        row = await conn.fetchrow(sql.LOAD, job.name, 0)
        if row is not None:
            lo, hi = row["range_lo"], row["range_hi"]
    if lo is None:
        lo, hi = await conn.fetchval(sql.lowest(target)), await conn.fetchval(sql.highest(target))
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


# --- status and reset ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Status:
    checkpoints: list[Checkpoint]
    history: list[dict[str, Any]]


async def status(params: ConnectParams, name: str | None = None, *, history: int = 10) -> Status:
    conn = await _guard(_admin(params, "status"))
    try:
        await _guard(require_state_schema(conn))
        rows = await _guard(conn.fetch(sql.LOAD_ALL, name))
        runs = await _guard(conn.fetch(sql.HISTORY, name, history)) if name else []
    finally:
        await conn.close()
    return Status([to_checkpoint(r) for r in rows], [dict(r) for r in runs])


async def reset(params: ConnectParams, name: str) -> int:
    """Forget a job's checkpoint (all shards). Refuses while a runner holds the job."""
    conn = await _guard(_admin(params, "reset"))
    try:
        await _guard(require_state_schema(conn))
        await _guard(take_lock(conn, name, wait=2.0))
        result = await _guard(conn.execute(sql.RESET, name))
    finally:
        await conn.close()
    return int(result.split()[-1])

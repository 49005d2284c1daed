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
from dataclasses import dataclass, field
from typing import Any, TextIO, TypeVar

import anyio
import asyncpg

from backfill import catalog, control, governor, sql
from backfill.checkpoint import FAILED, INTERRUPTED, Checkpoint
from backfill.errors import (
    BackfillError,
    ConfigError,
    DataFailure,
    Interrupted,
    RowError,
    Unavailable,
)
from backfill.estimate import FirstStart, estimate_progress
from backfill.export import Exporter
from backfill.gates import PgProbe
from backfill.job import Job
from backfill.loop import Loop, Policy
from backfill.metrics import RunMetrics
from backfill.observers import Fanout, LogLines, Progress, TerminalLine
from backfill.pg import Budget, connect, translate
from backfill.progress import Tracker, run_rate
from backfill.protocols import Observer, Throttle
from backfill.ranges import CREATING, WHOLE, Shard
from backfill.session import (
    Identity,
    PgConnector,
    open_connection,
    require_state_schema,
    take_lock,
    to_checkpoint,
)
from backfill.settings import ConnectParams, Telemetry
from backfill.shutdown import Stop, stop_after, watch_signals
from backfill.throttle import AllOf

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
        if isinstance(error, DataFailure):
            raise ConfigError(str(error)) from exc
        # Unreachable, timed out, contended: worth retrying later (exit 69), not a bad
        # configuration (78 fails a Kubernetes Job at once, e.g. an init Job started while
        # the database is still coming up).
        raise Unavailable(str(error)) from exc


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


def default_observers(
    job: Job, tracker: Tracker, stream: TextIO, *, log_every: float = 30.0
) -> list[Observer]:
    progress = Progress(tracker)
    shown: Observer = (
        TerminalLine(stream, progress)
        if stream.isatty()
        else LogLines(job.name, progress, every=log_every)
    )
    return [progress, shown]


async def run(
    job: Job,
    params: ConnectParams,
    *,
    observers: Sequence[Observer] | None = None,
    throttles: Sequence[Throttle] = (),
    stream: TextIO | None = None,
    shard: Shard = WHOLE,
    telemetry: Telemetry | None = None,
) -> Checkpoint:
    """Run the job to the end of its key range (or resume it). Returns the final checkpoint.

    SIGTERM/SIGINT stop after the batch in flight (``Interrupted``, exit 75); a second signal
    aborts the batch in flight, which rolls back. With ``telemetry``, the run's Prometheus
    metrics are served and/or pushed (``backfill.export``) for as long as it lasts.
    """
    tracker = Tracker()
    trackers: list[Tracker] = []  # those that show progress, for a text key's sampled estimate
    if observers is None:
        log_every = telemetry.log_every if telemetry is not None else 30.0
        observers = default_observers(job, tracker, stream or sys.stderr, log_every=log_every)
        trackers.append(tracker)
    exporter: Exporter | None = None
    if telemetry is not None:
        metrics = RunMetrics(job=job.name, table=job.table.display, shard=shard.index)
        exporter = Exporter(metrics, telemetry)
        observers = [*observers, metrics]
        trackers.append(metrics.tracker)
    first = FirstStart()
    observers = [first, *observers]
    stop = Stop()
    # Gates and live control while no batch runs use a small second connection, opened lazily.
    probe = PgProbe(params, job, shard=shard.index)
    gov = governor.for_job(job, probe)
    loop = Loop(
        policy_for(job),
        PgConnector(params, job, identity=identity(), shard=shard),
        throttle=AllOf([gov, *throttles]),
        observer=Fanout(observers),
        stop=stop,
        sizer=gov.live.sizer,
        control=gov.live,
    )
    outcome: Checkpoint | BaseException | None = None
    abort = anyio.CancelScope()
    if exporter is not None:
        exporter.start()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_signals, stop, abort)
            if job.limits.max_run_seconds is not None:
                tg.start_soon(stop_after, stop, job.limits.max_run_seconds)
            if trackers:
                tg.start_soon(estimate_progress, params, job, first, trackers)
            if exporter is not None:
                tg.start_soon(exporter.push_periodically)
            with abort:
                try:
                    outcome = await loop.run()
                except BackfillError as error:
                    outcome = error
            tg.cancel_scope.cancel()
    finally:
        await probe.aclose()
        _log_end(job, outcome)
        if exporter is not None:
            await exporter.close(
                _final_state(outcome, aborted=abort.cancelled_caught),
                outcome if isinstance(outcome, BaseException) else None,
            )
    if abort.cancelled_caught:
        raise Interrupted("aborted by a second signal; the batch in flight rolled back")
    if isinstance(outcome, BaseException):
        raise outcome
    assert outcome is not None
    return outcome


def _final_state(outcome: Checkpoint | BaseException | None, *, aborted: bool) -> str:
    if aborted or isinstance(outcome, Interrupted):
        return INTERRUPTED
    if isinstance(outcome, Checkpoint):
        return outcome.state
    return FAILED


def _log_end(job: Job, outcome: Checkpoint | BaseException | None) -> None:
    """One structured line for a run that failed (the CLI prints the same as plain text)."""
    if isinstance(outcome, BackfillError) and not isinstance(outcome, Interrupted):
        extra: dict[str, Any] = {"job": job.name, "error": str(outcome),
                                 "exit_code": int(outcome.exit_code)}
        if isinstance(outcome, RowError):
            extra["keys"] = list(outcome.keys)
        log.error("run failed", extra=extra)


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
        # The whole job's range: from the first shard's start to the last shard's end.
        rows = await conn.fetch(sql.LOAD_ALL, job.name)
        if rows:
            lo, hi = rows[0]["range_lo"], rows[-1]["range_hi"]
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
class Rate:
    """A shard's pace from the database alone (see ``progress.run_rate``)."""

    rows_per_second: float | None  # the latest run's average
    eta_seconds: float | None  # as of the last commit; only while a run is open
    last_commit_age_seconds: float | None  # by the database's clock


@dataclass(frozen=True, slots=True)
class Status:
    checkpoints: list[Checkpoint]
    history: list[dict[str, Any]]
    rates: dict[tuple[str, int], Rate] = field(default_factory=dict)
    # Live overrides of jobs that have not started yet (`pause`/`set` before the first run).
    pending: dict[str, dict[str, Any]] = field(default_factory=dict)


async def status(params: ConnectParams, name: str | None = None, *, history: int = 10) -> Status:
    conn = await _guard(_admin(params, "status"))
    try:
        await _guard(require_state_schema(conn))
        rows = await _guard(conn.fetch(sql.LOAD_ALL, name))
        runs = await _guard(conn.fetch(sql.HISTORY, name, history)) if name else []
        latest = await _guard(conn.fetch(sql.LATEST_RUNS, name))
        now = await _guard(conn.fetchval(sql.NOW))
        pending = await _guard(conn.fetch(sql.PENDING_CONTROLS, name))
    finally:
        await conn.close()
    checkpoints = [to_checkpoint(r) for r in rows]
    by_shard = {(r["job"], r["shard"]): dict(r) for r in latest}
    rates = {}
    for c in checkpoints:
        rate, eta = run_rate(c, by_shard.get((c.job, c.shard)))
        age = (now - c.updated_at).total_seconds() if c.updated_at is not None else None
        rates[(c.job, c.shard)] = Rate(rate, eta, age)
    return Status(
        checkpoints, [dict(r) for r in runs], rates, {r["job"]: r["control"] for r in pending}
    )


async def reset(params: ConnectParams, name: str) -> int:
    """Forget a job's checkpoint (all shards). Refuses while a runner holds the job."""
    conn = await _guard(_admin(params, "reset"))
    try:
        await _guard(require_state_schema(conn))
        shards = await _guard(conn.fetchval(sql.SHARD_COUNT, name)) or 1
        for shard in range(shards):
            await _guard(take_lock(conn, name, shard=shard, wait=2.0))
        result = await _guard(conn.execute(sql.RESET, name))
    finally:
        await conn.close()
    return int(result.split()[-1])


# --- live control: pause, resume, set -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Controlled:
    """A job's live overrides after ``pause``, ``resume`` or ``set``."""

    job: str
    control: dict[str, Any]
    pending: bool  # the job has not started yet: its first run starts with these
    runners: list[str]  # who holds the job's shards now (they pick the change up)


async def pause(params: ConnectParams, name: str) -> Controlled:
    """Pause a job: its runner finishes the batch in flight and waits (a paused job stays
    paused across restarts until ``resume``). Works before the job's first run too."""
    return await _change_control(params, name, {control.PAUSED: True}, verb="pause")


async def resume(params: ConnectParams, name: str) -> Controlled:
    """Undo ``pause``; a waiting runner goes on within ``check_every``."""
    return await _change_control(params, name, {control.PAUSED: control.DEFAULT}, verb="resume")


async def set_live(params: ConnectParams, name: str, assignments: Sequence[str]) -> Controlled:
    """Override live settings (``["batch.size=500", "limits.max_rows_per_second=off"]``;
    ``key=default`` removes an override). Bad keys or values raise ``ConfigError`` and change
    nothing."""
    changes = control.parse_assignments(assignments)
    return await _change_control(params, name, changes, verb="set")


async def _change_control(
    params: ConnectParams, name: str, changes: dict[str, Any], *, verb: str
) -> Controlled:
    control.check_name(name)
    conn = await _guard(_admin(params, verb))
    try:
        await _guard(require_state_schema(conn))
        return await _guard(_apply_changes(conn, name, changes))
    finally:
        await conn.close()


async def _apply_changes(
    conn: asyncpg.Connection, name: str, changes: dict[str, Any]
) -> Controlled:
    async with conn.transaction():
        # The lock a first run holds while it creates the checkpoints: they either exist now,
        # or will be created after this commits, starting from the pending overrides.
        await conn.execute(sql.LOCK_CREATING, name, CREATING)
        rows = await conn.fetch(sql.CONTROL_ROWS, name)
        if rows:
            settings, current = rows[0]["settings"] or {}, rows[0]["control"] or {}
        else:
            settings, current = {}, await conn.fetchval(sql.CONTROL_PENDING, name) or {}
        new = control.merge(settings, current, changes)
        if rows:
            await conn.execute(sql.CONTROL_UPDATE, name, new)
            await conn.execute(sql.CONTROL_FORGET_PENDING, name)
        else:
            await conn.execute(sql.CONTROL_SAVE_PENDING, name, new)
    runners = []
    for row in rows:
        holder = await conn.fetchrow(sql.LOCK_HOLDER, name, row["shard"])
        if holder is not None:
            runners.append(f"shard {row['shard']}: backend pid {holder['pid']}")
    log.debug("live control set", extra={"job": name, "control": new})
    return Controlled(job=name, control=new, pending=not rows, runners=runners)


"""``cutover``, ``rollback`` and ``finish``: the steps of a copy job's table change after the
copy (``backfill.lifecycle``). Each is idempotent: run again after it committed, it says so
and changes nothing."""

from __future__ import annotations

import logging
from functools import partial

import asyncpg

from backfill import catalog, sql
from backfill.commands._common import guard
from backfill.commands.inspect import verify
from backfill.connector import open_connection, require_state_schema
from backfill.conninfo import ConnectParams
from backfill.errors import ConfigError
from backfill.job import Job
from backfill.lifecycle import swap
from backfill.lifecycle import sync as lifecycle_sync
from backfill.lifecycle.swap import Direction, Outcome
from backfill.sql import Change, Target, ident, sync

log = logging.getLogger(__name__)
VALIDATE_BUDGET = "1h"  # validating a re-pointed foreign key reads the referencing table


async def cutover(job: Job, params: ConnectParams) -> Outcome:
    """Swap the names: the copy's target takes the source's, the source becomes the old table,
    kept current by the reverse trigger. Refused unless the copy finished and ``verify``
    finds the target equal; ``GaveUp`` (exit 75, nothing changed) when the tables stay held
    through every attempt."""
    conn = await _connect(job, params, "cutover")
    try:
        if not await _due(conn, job, "cutover", "cut over", ("syncing", "rolled back")):
            return Outcome("cut over", changed=False)
        await _copied(conn, job)
        target = await guard(catalog.resolve(conn, job))
        change = await guard(catalog.change(conn, job, target))
        d = await _forward(conn, job, target, change)
        leaving, entering = await guard(swap.preflight(conn, d))
        left = await verify(job, params)
        if left:
            raise ConfigError(
                f"cutover: {left:,} rows of {job.table.display} are missing or different in "
                f"{d.schema}.{d.entering}: is the sync trigger in place? (backfill verify)"
            )
        return await _swap(conn, job, d, leaving, entering)
    finally:
        await conn.close()


async def rollback(job: Job, params: ConnectParams) -> Outcome:
    """The swap in reverse, while the reverse trigger keeps the old table current: the old
    table takes the name back, the forward trigger goes back on it (ready for another
    cut-over)."""
    conn = await _connect(job, params, "rollback")
    try:
        if not await _due(conn, job, "rollback", "rolled back", ("cut over",)):
            return Outcome("rolled back", changed=False)
        assert job.copy_ is not None
        d = Direction(
            verb="rollback", schema=job.table.schema_, name=job.table.name,
            leaving_to=job.copy_.into.name, entering=lifecycle_sync.old_name(job),
            remove=sync.reverse_name(job.name), add=sync.forward_name(job.name), mirror=None,
            phase_from=("cut over",), phase_to="rolled back",
        )
        leaving, entering = await guard(swap.preflight(conn, d))
        return await _swap(conn, job, d, leaving, entering)
    finally:
        await conn.close()


async def finish(job: Job, params: ConnectParams) -> Outcome:
    """End the reverse sync after a cut-over: drop the triggers and their functions. The old
    table stays, the user's to drop."""
    conn = await _connect(job, params, "finish")
    try:
        if not await _due(conn, job, "finish", "finished", ("cut over",)):
            return Outcome("finished", changed=False)
        rel = await guard(conn.fetchrow(sql.RELATION, job.table.schema_, job.table.name))
        if rel is None:
            raise ConfigError(f"finish: {job.table.display} does not exist")
        step = partial(_finish_once, conn, job)
        outcome, attempts, seconds = await guard(
            swap.with_lock_retries(conn, job, step, verb="finish", table=rel["oid"])
        )
        outcome.attempts, outcome.seconds = attempts, seconds
        return outcome
    finally:
        await conn.close()


async def _finish_once(conn: asyncpg.Connection, job: Job, attempt: int) -> Outcome:
    row = await conn.fetchrow(sync.PHASE_LOCKED, job.name)
    if row is not None and row["phase"] == "finished":
        return Outcome("finished", changed=False)
    schema, table = job.table.schema_, f"{ident(job.table.schema_)}.{ident(job.table.name)}"
    await conn.execute(sync.drop(schema, sync.reverse_name(job.name), table))
    forward = f"{ident(schema)}.{ident(sync.forward_name(job.name))}"
    await conn.execute(f"DROP FUNCTION IF EXISTS {forward}()")
    await conn.execute(sync.SET_PHASE, job.name, "finished", attempt)
    return Outcome("finished", attempts=attempt)


async def _connect(job: Job, params: ConnectParams, verb: str) -> asyncpg.Connection:
    if not lifecycle_sync.wanted(job):
        raise ConfigError(f"{verb}: job {job.name} is not a copy with [copy] sync = \"trigger\"")
    conn = await guard(open_connection(params, job))
    try:
        await guard(require_state_schema(conn))
    except BaseException:
        await conn.close()
        raise
    return conn


async def _due(conn: asyncpg.Connection, job: Job, verb: str, done: str,
               wanted: tuple[str, ...]) -> bool:
    """Whether ``verb`` has work to do: False when the job is ``done`` already (the step
    committed before); ``ConfigError`` unless its phase is one of ``wanted``."""
    row = await guard(conn.fetchrow(sync.PHASE, job.name))
    phase = None if row is None else str(row["phase"])
    if phase == done:
        return False
    if phase in wanted:
        return True
    now = {None: "not started (run it first)", "syncing": "copying"}.get(phase, phase)
    raise ConfigError(f"{verb}: job {job.name} is {now}; {verb} needs it {' or '.join(wanted)}")


async def _copied(conn: asyncpg.Connection, job: Job) -> None:
    rows = await guard(conn.fetch(sql.LOAD_ALL, job.name))
    pending = [r for r in rows if r["state"] != "succeeded"]
    if not rows or pending:
        state = pending[0]["state"] if pending else "not started"
        raise ConfigError(
            f"cutover: job {job.name} has not finished copying ({state}): "
            f"run `backfill run` to the end first"
        )


async def _forward(conn: asyncpg.Connection, job: Job, target: Target, change: Change) -> Direction:
    """The cut-over's direction, with the reverse mirror: the new table's rows back into the
    old one by the source's key, every column copied by name."""
    assert job.copy_ is not None
    into, old = job.copy_.into, lifecycle_sync.old_name(job)
    if into.schema_ != job.table.schema_:
        raise ConfigError(f"cutover: {into.display} is not in the schema of {job.table.display}")
    if await guard(conn.fetchrow(sql.RELATION, job.table.schema_, old)) is not None:
        raise ConfigError(
            f"cutover: {job.table.schema_}.{old} exists already: drop it, or name the old "
            "table with [cutover] old_name"
        )
    for column, expr in change.columns:
        if expr != ident(column):
            raise ConfigError(
                f"cutover: the reverse sync cannot invert copy.values.{column}: the old table "
                "would not stay current (copy it by name, or cut over by hand)"
            )
    names = {c for c, _ in change.columns}
    rel = await guard(conn.fetchrow(sql.RELATION, target.schema, target.table))
    assert rel is not None
    for col in await guard(conn.fetch(sql.ALL_COLUMNS, rel["oid"])):
        if col["needs_value"] and col["name"] not in names:
            raise ConfigError(
                f"cutover: column {col['name']} of {job.table.display} is NOT NULL without "
                "a default and not in the new table: the reverse sync could not insert a row"
            )
    mirror = sync.Mirror(
        into=f"{ident(job.table.schema_)}.{ident(old)}", alias=job.table.name,
        columns=tuple((c, ident(c)) for c, _ in change.columns),
        conflict=tuple(k.name for k in target.key),
    )
    return Direction(
        verb="cutover", schema=job.table.schema_, name=job.table.name, leaving_to=old,
        entering=into.name, remove=sync.forward_name(job.name),
        add=sync.reverse_name(job.name), mirror=mirror,
        phase_from=("syncing", "rolled back"), phase_to="cut over",
    )


async def _swap(
    conn: asyncpg.Connection, job: Job, d: Direction, leaving: int, entering: int
) -> Outcome:
    step = partial(swap.swap_once, conn, d, job.name, leaving, entering)
    outcome, attempts, seconds = await guard(
        swap.with_lock_retries(conn, job, step, verb=d.verb, table=leaving)
    )
    outcome.attempts, outcome.seconds = attempts, seconds
    if outcome.to_validate:
        await guard(conn.execute("SELECT set_config('statement_timeout', $1, false)",
                                 VALIDATE_BUDGET))
        await swap.validate(conn, outcome)
    log.info(f"{d.verb} done", extra={"job": job.name, "attempts": attempts,
                                      "seconds": round(seconds, 3), "changed": outcome.changed})
    return outcome

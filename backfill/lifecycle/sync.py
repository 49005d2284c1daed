"""The forward sync trigger of a copy job: derived from the resolved job (``Change``), checked
before anything is written, installed in the transaction that fixes the job's key range."""

from __future__ import annotations

import logging

import asyncpg

from backfill import sql
from backfill.errors import ConfigError, ConnectionLost, Contention, StatementTimeout
from backfill.job import Job
from backfill.pg import translate
from backfill.sql import Change, Target, ident, sync

log = logging.getLogger(__name__)


def wanted(job: Job) -> bool:
    """Whether the job installs the sync trigger."""
    return job.copy_ is not None and job.copy_.sync == "trigger"


def forward(target: Target, change: Change) -> sync.Mirror:
    """The forward mirror: the source's rows into the copy's target, as the batches copy them,
    by the target's unique key (the conflict target the batches use: the partition key
    included)."""
    return sync.Mirror(
        into=change.into, alias=target.table, columns=change.columns, conflict=change.conflict
    )


def old_name(job: Job) -> str:
    """What the source is renamed to at the cut-over."""
    return job.cutover.old_name or f"{job.table.name}_old"


def install_sql(job: Job, target: Target, change: Change) -> str:
    """The SQL the job installs on its source (``plan`` shows it)."""
    name = sync.forward_name(job.name)
    return (
        sync.function(target.schema, name, forward(target, change)) + ";\n"
        + sync.trigger(target.schema, name, target.relation) + ";"
    )


async def check(conn: asyncpg.Connection, job: Job, target: Target, change: Change) -> None:
    """Refuse, before anything is written, a sync trigger that cannot be installed or applied:
    a missing privilege (TRIGGER on the source, CREATE in its schema), an expression the
    trigger cannot evaluate over a row of the source."""
    rel = await conn.fetchrow(sql.RELATION, target.schema, target.table)
    assert rel is not None
    rights = await conn.fetchrow(sync.SYNC_RIGHTS, rel["oid"])
    assert rights is not None
    table = job.table.display
    if not rights["can_trigger"]:
        raise ConfigError(
            f"copy.sync: permission denied: role {rights['role']} lacks TRIGGER on {table}"
        )
    if not rights["can_create"]:
        raise ConfigError(
            f"copy.sync: permission denied: role {rights['role']} lacks CREATE on schema "
            f"{target.schema} (the sync trigger's function goes there)"
        )
    try:
        await conn.prepare(forward(target, change).check(target.relation))
    except Exception as exc:
        error = translate(exc, closed=conn.is_closed())
        if isinstance(error, ConnectionLost | Contention | StatementTimeout):
            raise error from exc
        raise ConfigError(f"copy.values: the sync trigger cannot apply it: {error}") from exc


async def install(conn: asyncpg.Connection, job: Job, target: Target, change: Change) -> None:
    """Create (or replace) the forward trigger and record the job's phase, in the caller's
    transaction: the one that then reads the key range, so no committed application write
    falls between the range and the trigger (``CREATE TRIGGER`` waits for the writes in
    flight, under the job's lock_timeout)."""
    name = sync.forward_name(job.name)
    await conn.execute(sync.function(target.schema, name, forward(target, change)))
    await conn.execute(sync.trigger(target.schema, name, target.relation))
    assert job.copy_ is not None
    await conn.execute(
        sync.SYNCING, job.name, job.table.display, job.copy_.into.display, old_name(job)
    )
    log.info(
        "sync trigger installed",
        extra={"job": job.name, "trigger": f"{ident(target.schema)}.{ident(name)}",
               "source": job.table.display, "target": job.copy_.into.display},
    )

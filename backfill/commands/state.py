"""The state schema's verbs: ``init``, ``status``, ``reset``, and live control (``pause``,
``resume``, ``set``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from backfill import control, sql
from backfill.checkpoint import Checkpoint, to_checkpoint
from backfill.commands._common import admin, guard
from backfill.connector import require_state_schema, schema_version, take_lock
from backfill.conninfo import ConnectParams
from backfill.progress import run_rate
from backfill.ranges import CREATING
from backfill.sql import sync

log = logging.getLogger(__name__)


async def init(params: ConnectParams) -> list[int]:
    """Create (or upgrade) the state schema: apply the migrations it lacks, in one transaction.
    Needs CREATE on the database; idempotent. Returns the versions applied."""
    conn = await admin(params, "init")
    try:
        return await guard(_migrate(conn))
    finally:
        await conn.close()


async def _migrate(conn: asyncpg.Connection) -> list[int]:
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute(sql.LOCK_MIGRATING)
        await conn.execute(sql.VERSIONED)
        current = await schema_version(conn)
        for migration in sql.MIGRATIONS:
            if migration.version > current:
                await conn.execute(migration.sql)
                await conn.execute(sql.APPLIED, migration.version, migration.description)
                applied.append(migration.version)
    if applied:
        log.info("state schema migrated", extra={"versions": applied})
    return applied


@dataclass(frozen=True, slots=True)
class Rate:
    """A shard's pace from the database alone (see ``progress.run_rate``)."""

    rows_per_second: float | None  # the latest run's average
    eta_seconds: float | None  # as of the last commit; only while a run is open
    last_commit_age_seconds: float | None  # by the database's clock


@dataclass(frozen=True, slots=True)
class Impact:
    """What a shard's impact budget measured last, as its canary row keeps it."""

    ratio: float | None  # the deciding statistic (None: not judged): typical, latency with the
    # run over without; tail, the share of commits over the budget times the baseline's p99
    limit: float  # 1 + the deciding budget (max_impact or max_tail_impact)
    rate: float | None  # rows a second the budget allows (None: no limit)
    current_seconds: float | None
    baseline_seconds: float | None
    deciding: str | None  # which statistic and signal: "typical statements", "tail canary"
    age_seconds: float  # since that beat, by the database's clock


@dataclass(frozen=True, slots=True)
class Status:
    checkpoints: list[Checkpoint]
    history: list[dict[str, Any]]
    rates: dict[tuple[str, int], Rate] = field(default_factory=dict)
    # Live overrides of jobs that have not started yet (`pause`/`set` before the first run).
    pending: dict[str, dict[str, Any]] = field(default_factory=dict)
    impact: dict[tuple[str, int], Impact] = field(default_factory=dict)
    # Each copy job's place in its table change (sync = "trigger"): backfill.lifecycle's phase.
    changes: dict[str, str] = field(default_factory=dict)


async def status(params: ConnectParams, name: str | None = None, *, history: int = 10) -> Status:
    if name is not None:
        control.check_name(name)
    conn = await guard(admin(params, "status"))
    try:
        await guard(require_state_schema(conn))
        rows = await guard(conn.fetch(sql.LOAD_ALL, name))
        runs = await guard(conn.fetch(sql.HISTORY, name, history)) if name else []
        latest = await guard(conn.fetch(sql.LATEST_RUNS, name))
        now = await guard(conn.fetchval(sql.NOW))
        pending = await guard(conn.fetch(sql.PENDING_CONTROLS, name))
        canaries = await guard(conn.fetch(sql.CANARIES, name))
        phases = await guard(conn.fetch(sync.PHASES, name))
    finally:
        await conn.close()
    impact = {
        (r["job"], r["shard"]): Impact(
            r["ratio"], r["budget"], r["rate"], r["current_s"], r["baseline_s"], r["deciding"],
            (now - r["at"]).total_seconds(),
        )
        for r in canaries if r["budget"] is not None
    }
    checkpoints = [to_checkpoint(r) for r in rows]
    by_shard = {(r["job"], r["shard"]): dict(r) for r in latest}
    rates = {}
    for c in checkpoints:
        rate, eta = run_rate(c, by_shard.get((c.job, c.shard)))
        age = (now - c.updated_at).total_seconds() if c.updated_at is not None else None
        rates[(c.job, c.shard)] = Rate(rate, eta, age)
    return Status(
        checkpoints, [dict(r) for r in runs], rates, {r["job"]: r["control"] for r in pending},
        impact, {r["job"]: r["phase"] for r in phases},
    )


async def reset(params: ConnectParams, name: str) -> int:
    """Forget a job's checkpoint (all shards). Refuses while a runner holds the job."""
    control.check_name(name)
    conn = await guard(admin(params, "reset"))
    try:
        await guard(require_state_schema(conn))
        shards = await guard(conn.fetchval(sql.SHARD_COUNT, name)) or 1
        for shard in range(shards):
            await guard(take_lock(conn, name, shard=shard, wait=2.0))
        result = await guard(conn.execute(sql.RESET, name))
    finally:
        await conn.close()
    return int(result.split()[-1])


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
    return await _change_control(params, name, {control.PAUSE_KEY: True}, verb="pause")


async def resume(params: ConnectParams, name: str) -> Controlled:
    """Undo ``pause``; a waiting runner goes on within ``check_every``."""
    return await _change_control(params, name, {control.PAUSE_KEY: control.DEFAULT}, verb="resume")


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
    conn = await guard(admin(params, verb))
    try:
        await guard(require_state_schema(conn))
        return await guard(_apply_changes(conn, name, changes))
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

"""Opening a session for one job (the loop's ``Connector`` seam): connect, check the job
against the catalog, take the job's lock and make sure the session is the runner's own, load or
create the checkpoint, and open (or go on with) the run's row in its history.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import anyio
import asyncpg

from backfill import __version__, catalog, ranges, sql
from backfill.checkpoint import Checkpoint, to_checkpoint
from backfill.conninfo import ConnectParams
from backfill.control import file_settings
from backfill.errors import (
    ConfigError,
    ConnectionLost,
    Contention,
    JobBusy,
    StatementTimeout,
    Vanished,
)
from backfill.job import Job
from backfill.lifecycle import sync as lifecycle_sync
from backfill.pg import POOLER_HINT, Budget, close, connect, translate
from backfill.ranges import WHOLE, Shard
from backfill.session import PgSession
from backfill.sql import Change, Target

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is running: written to the run history and shown to a second runner."""

    host: str
    pid: int

    def __str__(self) -> str:
        return f"{self.host} pid {self.pid}"


def budget_for(job: Job) -> Budget:
    return Budget(
        statement_timeout=job.limits.statement_timeout,
        lock_timeout=job.limits.lock_timeout,
        connect_timeout=job.limits.connect_timeout,
    )


async def open_connection(params: ConnectParams, job: Job) -> asyncpg.Connection:
    """A connection for the job, to a server that accepts writes (never a standby)."""
    return await connect(
        params, budget=budget_for(job), application_name=f"backfill:{job.name}", writable=True
    )


async def schema_version(conn: asyncpg.Connection) -> int:
    """The state schema's highest applied migration (0: none, or from before versions)."""
    if not await conn.fetchval(sql.VERSIONS_EXIST):
        return 0
    return int(await conn.fetchval(sql.SCHEMA_VERSION))


async def require_state_schema(conn: asyncpg.Connection) -> None:
    try:  # one round trip, unless the schema or its version table is missing
        state, version = await conn.fetchrow(sql.STATE_AND_VERSION) or (False, 0)
    except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError):
        state, version = await conn.fetchval(sql.STATE_EXISTS), 0
    if not state:
        raise ConfigError("the state schema 'backfill' does not exist: run `backfill init` first")
    if version < sql.LATEST:
        raise ConfigError(
            "the state schema 'backfill' is from an older version: "
            "run `backfill init` to upgrade it"
        )


async def take_lock(conn: asyncpg.Connection, name: str, *, shard: int = 0, wait: float) -> int:
    """Take the job's session-level advisory lock, which dies with the connection; returns the
    pid of the backend that holds it.

    After ``wait`` seconds of trying, raise ``JobBusy`` naming the holder.
    """
    deadline = anyio.current_time() + wait
    while True:
        locked, pid = await conn.fetchrow(sql.TRY_LOCK, name, shard) or (False, 0)
        if locked:
            return int(pid)
        if anyio.current_time() >= deadline:
            holder = await _holder(conn, name, shard)
            raise JobBusy(f"job {name} is held by another runner: {holder}")
        await anyio.sleep(min(0.25, wait))


async def check_own_backend(
    conn: asyncpg.Connection, params: ConnectParams, job: Job, lock_pid: int
) -> None:
    """Refuse a session that is not the runner's own: behind a pooler in transaction (or
    statement) mode the lock would stay on a server session that other clients then use.

    Straight to PostgreSQL, the connection's cancel key carries its backend's pid, and that is
    all. Behind a pooler (its own cancel keys), a second connection must land on another
    backend, and this one must still be on the lock's: a transaction pooler hands an idle
    client's backend to the next client, so the second connection lands on the lock's.
    """
    if conn.get_server_pid() == lock_pid:
        return
    other = await connect(params, budget=budget_for(job), application_name=f"backfill:{job.name}")
    try:
        other_pid = await other.fetchval(sql.BACKEND_PID)
    finally:
        await close(other)
    if other_pid == lock_pid or await conn.fetchval(sql.BACKEND_PID) != lock_pid:
        raise ConfigError(
            f"job {job.name}: the connection goes through a pooler in transaction mode: "
            f"another client's statements run on the backend holding the job's lock; "
            f"{POOLER_HINT}"
        )


async def _holder(conn: asyncpg.Connection, name: str, shard: int) -> str:
    row = await conn.fetchrow(sql.LOCK_HOLDER, name, shard)
    ckpt = await conn.fetchrow(sql.LOAD, name, shard)
    where = f"{ckpt['holder']}, " if ckpt is not None and ckpt["holder"] else ""
    if row is None:
        return f"{where}(lock released meanwhile; try again)"
    since = row["backend_start"].isoformat(timespec="seconds")
    client = row["client"] or "local socket"
    return f"{where}backend pid {row['pid']} from {client} since {since}"


async def check_fragments(
    conn: asyncpg.Connection, job: Job, target: Target, change: Change
) -> None:
    """Prepare (never run) each of the job's SQL fragments alone (``set``, ``where``, the
    ``[copy.values]``), before anything is written: a fragment the server rejects is a
    ``ConfigError`` naming its field (even a constant ``1/0``: it fails for every row)."""
    values = job.copy_.values if job.copy_ is not None else {}
    checks = sql.fragment_checks(target, change, values)
    for field, statement in checks.items():
        try:
            await conn.prepare(statement)
        except Exception as exc:
            error = translate(exc, closed=conn.is_closed())
            if isinstance(error, ConnectionLost | Contention | StatementTimeout):
                raise error from exc
            raise ConfigError(f"{job.sql_fields}: {error} (in {field})") from exc


class PgConnector:
    """Opens sessions for one job: connect, check, lock, load or create the checkpoint."""

    def __init__(
        self, params: ConnectParams, job: Job, *, identity: Identity, shard: Shard = WHOLE
    ) -> None:
        self.params = params
        self.job = job
        self.identity = identity
        self.shard = shard
        self.run_id: int | None = None  # this process's row in backfill.runs
        self._warned = False  # the warnings about the job's table are logged once a run

    @asynccontextmanager
    async def session(self) -> AsyncIterator[PgSession]:
        conn = await open_connection(self.params, self.job)
        try:
            yield await self._open(conn)
        finally:
            await close(conn)

    async def _open(self, conn: asyncpg.Connection) -> PgSession:
        job, shard = self.job, self.shard.index
        try:
            await require_state_schema(conn)
            target = await catalog.resolve(conn, job)
            change = await catalog.change(conn, job, target)
            await check_fragments(conn, job, target, change)
            if lifecycle_sync.wanted(job):
                await lifecycle_sync.check(conn, job, target, change)
            pid = await take_lock(conn, job.name, shard=shard, wait=job.limits.lock_wait)
            await check_own_backend(conn, self.params, job, pid)
            ckpt = await self._load_or_create(conn, target, change)
            if not self._warned and job.delete is not None:
                self._warned = True
                for reference in await catalog.unindexed_references(conn, job):
                    log.warning(
                        "a foreign key references the table without an index: each deleted "
                        "row scans the referencing table",
                        extra={"job": job.name, "reference": reference},
                    )
            session = PgSession(conn, job, target, ckpt, change=change, pid=pid)
            await session.prepare()
            # The run's bookkeeping in one round trip. After a lost connection this process's
            # run goes on (unless another runner closed it meanwhile): a reconnection is not a
            # killed run.
            row = await conn.fetchrow(
                sql.BEGIN_RUN, job.name, shard, str(self.identity), job.fingerprint,
                __version__, self.run_id, file_settings(job),
            )
            if row is None:
                raise Vanished(job.name)
            self.run_id = session.run_id = row["run_id"]  # only once committed
            session._checkpoint = to_checkpoint(row)
            return session
        except (ConfigError, JobBusy):
            raise
        except Exception as exc:
            raise translate(exc, closed=conn.is_closed()) from exc

    async def _load_or_create(
        self, conn: asyncpg.Connection, target: Target, change: Change
    ) -> Checkpoint:
        job, shard = self.job, self.shard
        if await conn.fetchrow(sql.LOAD, job.name, shard.index) is None:
            install = None
            if lifecycle_sync.wanted(job):
                install = partial(lifecycle_sync.install, job=job, target=target, change=change)
            await ranges.create_checkpoints(
                conn, job, target, shards=shard.count, before_range=install
            )
        ckpt = await _load(conn, job.name, shard.index)
        if ckpt.shards != shard.count:
            raise ranges.mismatch(job.name, ckpt.shards, shard.count)
        if ckpt.fingerprint != job.fingerprint:
            raise ConfigError(
                f"job {job.name} changed since its checkpoint was made (table, key, where or "
                "its shape differ): "
                f"run `backfill reset {job.name} --yes` to start over, or rename the job"
            )
        return ckpt


async def _load(conn: asyncpg.Connection, name: str, shard: int) -> Checkpoint:
    row = await conn.fetchrow(sql.LOAD, name, shard)
    if row is None:
        raise Vanished(name)
    return to_checkpoint(row)


"""The PostgreSQL implementation of the loop's ``Connector`` and ``Session`` seams.

A session is one dedicated connection (never a pool: its SETs and its advisory lock belong to
it). Opening one checks the job against the catalog, prepares the batch statement, takes the
job's lock, and loads or creates the checkpoint. Each batch is one statement that updates the
rows and the checkpoint together, in one round trip.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import anyio
import asyncpg

from backfill import __version__, catalog, ranges, sql
from backfill.checkpoint import BatchResult, Checkpoint, Key
from backfill.control import file_settings
from backfill.errors import ConfigError, ConnectionLost, Contention, JobBusy, StatementTimeout
from backfill.job import Job
from backfill.pg import Budget, connect, translate
from backfill.ranges import WHOLE, Shard
from backfill.settings import ConnectParams
from backfill.sql import Target

log = logging.getLogger(__name__)

# Seconds allowed for closing the connection (and so releasing the lock) on the way out.
CLOSE_BUDGET = 2.0


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
    return await connect(params, budget=budget_for(job), application_name=f"backfill:{job.name}")


async def require_state_schema(conn: asyncpg.Connection) -> None:
    if not await conn.fetchval(sql.STATE_EXISTS):
        raise ConfigError("the state schema 'backfill' does not exist: run `backfill init` first")
    if not await conn.fetchval(sql.STATE_CURRENT):
        raise ConfigError(
            "the state schema 'backfill' is from an older version: "
            "run `backfill init` to upgrade it"
        )


def to_checkpoint(row: asyncpg.Record) -> Checkpoint:
    def key(value: list[str] | None) -> Key | None:
        return tuple(value) if value is not None else None

    return Checkpoint(
        job=row["job"],
        shard=row["shard"],
        shards=row["shards"],
        fingerprint=row["fingerprint"],
        state=row["state"],
        range_lo=key(row["range_lo"]),
        range_hi=key(row["range_hi"]),
        cursor=key(row["cursor"]),
        rows_updated=row["rows_updated"],
        rows_skipped=row["rows_skipped"],
        batches=row["batches"],
        skipped_keys=tuple(tuple(k) for k in row["skipped_keys"]),
        control=row["control"],
        settings=row.get("settings") or {},
        holder=row["holder"],
        error=row["error"],
        started_at=row["started_at"],
        updated_at=row["updated_at"],
        finished_at=row["finished_at"],
    )


async def take_lock(conn: asyncpg.Connection, name: str, *, shard: int = 0, wait: float) -> None:
    """Take the job's session-level advisory lock, which dies with the connection.

    After ``wait`` seconds of trying, raise ``JobBusy`` naming the holder.
    """
    deadline = anyio.current_time() + wait
    while not await conn.fetchval(sql.TRY_LOCK, name, shard):
        if anyio.current_time() >= deadline:
            holder = await _holder(conn, name, shard)
            raise JobBusy(f"job {name} is held by another runner: {holder}")
        await anyio.sleep(min(0.25, wait))


async def _holder(conn: asyncpg.Connection, name: str, shard: int) -> str:
    row = await conn.fetchrow(sql.LOCK_HOLDER, name, shard)
    ckpt = await conn.fetchrow(sql.LOAD, name, shard)
    where = f"{ckpt['holder']}, " if ckpt is not None and ckpt["holder"] else ""
    if row is None:
        return f"{where}(lock released meanwhile; try again)"
    since = row["backend_start"].isoformat(timespec="seconds")
    client = row["client"] or "local socket"
    return f"{where}backend pid {row['pid']} from {client} since {since}"


async def check_fragments(conn: asyncpg.Connection, job: Job, target: Target) -> None:
    """Prepare (never run) ``set`` and ``where`` each alone, before anything is written: a
    fragment the server rejects is a ``ConfigError`` naming its field (even a constant
    ``1/0``: it fails for every row)."""
    checks = sql.fragment_checks(target, set_=job.set, where=job.where)
    for field, statement in checks.items():
        try:
            await conn.prepare(statement)
        except Exception as exc:
            error = translate(exc, closed=conn.is_closed())
            if isinstance(error, ConnectionLost | Contention | StatementTimeout):
                raise error from exc
            raise ConfigError(f"set/where: {error} (in {field})") from exc


class PgSession:
    def __init__(
        self, conn: asyncpg.Connection, job: Job, target: Target, checkpoint: Checkpoint
    ) -> None:
        self.conn = conn
        self.job = job
        self.shard = checkpoint.shard
        self.target = target
        self._checkpoint = checkpoint
        self.run_id: int | None = None
        self._first: asyncpg.prepared_stmt.PreparedStatement | None = None
        self._next: asyncpg.prepared_stmt.PreparedStatement | None = None
        # One integer key: after a dense slice, the next slice's end is computed, not read.
        self._span: asyncpg.prepared_stmt.PreparedStatement | None = None
        self._dense = False

    @property
    def checkpoint(self) -> Checkpoint:
        return self._checkpoint

    async def prepare(self) -> None:
        """Prepare the batch statements: validates ``set`` and ``where`` before any write."""

        def batch(*, first: bool, span: bool = False) -> str:
            return sql.batch(
                self.target, set_=self.job.set, where=self.job.where, first=first, span=span
            )

        try:
            self._first = await self.conn.prepare(batch(first=True))
            self._next = await self.conn.prepare(batch(first=False))
            if sql.spannable(self.target):
                self._span = await self.conn.prepare(batch(first=False, span=True))
        except Exception as exc:
            raise self._translate(exc, "set/where") from exc

    def _translate(self, exc: BaseException, where: str = "") -> Exception:
        error = translate(exc, closed=self.conn.is_closed(), where=where)
        if isinstance(error, ConfigError) and where == "":
            return ConfigError(f"job {self.job.name}: {error}")
        return error

    def _bounds(self, cursor: Key | None) -> tuple[list[str], list[str]]:
        ckpt = self._checkpoint
        assert ckpt.range_lo is not None and ckpt.range_hi is not None
        return list(cursor if cursor is not None else ckpt.range_lo), list(ckpt.range_hi)

    async def run_batch(self, cursor: Key | None, size: int) -> BatchResult:
        span = self._dense and cursor is not None and self._span is not None
        statement = self._first if cursor is None else self._span if span else self._next
        assert statement is not None, "prepare() first"
        after, upto = self._bounds(cursor)
        start = time.perf_counter()
        try:
            row = await statement.fetchrow(after, upto, size, self.job.name, self.shard)
        except Exception as exc:
            raise self._translate(exc) from exc
        seconds = time.perf_counter() - start
        assert row is not None
        new = tuple(row["cursor"]) if row["cursor"] is not None else None
        if new is not None and not row["saved"]:
            raise ConfigError(f"the checkpoint of job {self.job.name} vanished (reset mid-run?)")
        control: dict[str, Any] = row["control"] or {}
        if new is not None:
            self._checkpoint = _advance(self._checkpoint, new, row["rows"], control)
        self._dense = self._span is not None and new is not None and _dense(
            after[0], new[0], size, rows=row["rows"], first=cursor is None, span=span
        )
        return BatchResult(
            cursor=new, rows=row["rows"], size=size, seconds=seconds, control=control
        )

    async def next_key(self, cursor: Key | None) -> Key | None:
        after, upto = self._bounds(cursor)
        query = sql.key_of_next_row(self.target, first=cursor is None)
        try:
            value = await self.conn.fetchval(query, after, upto)
        except Exception as exc:
            raise self._translate(exc) from exc
        return tuple(value) if value is not None else None

    async def skip(self, key: Key) -> None:
        try:
            await self.conn.fetchval(sql.SKIP, self.job.name, self.shard, list(key))
        except Exception as exc:
            raise self._translate(exc) from exc
        self._checkpoint = _advance(self._checkpoint, key, 0, dict(self._checkpoint.control))

    async def finish(self, state: str, *, error: str | None = None) -> None:
        # Translated like a batch: a connection lost here is retried by the loop (the last
        # batch already committed, so the next session finds the range done and finishes).
        try:
            async with self.conn.transaction():
                await self.conn.execute(sql.FINISH, self.job.name, self.shard, state, error)
                if self.run_id is not None:
                    await self.conn.execute(sql.CLOSE_RUN, self.run_id, state, error)
            row = await self.conn.fetchrow(sql.LOAD, self.job.name, self.shard)
        except Exception as exc:
            raise self._translate(exc) from exc
        if row is not None:
            self._checkpoint = to_checkpoint(row)


def _dense(after: str, end: str, size: int, *, rows: int, first: bool, span: bool) -> bool:
    """Whether the slice just done held a key at every integer (so the next computed slice of
    ``size`` values is likely full). A computed slice only tells through its rows; a read one
    through its width, whatever ``where`` matched."""
    if span:
        return rows == size
    return int(end) - int(after) == size - (1 if first else 0)


def _advance(ckpt: Checkpoint, cursor: Key, rows: int, control: dict[str, Any]) -> Checkpoint:
    return replace(
        ckpt,
        cursor=cursor,
        rows_updated=ckpt.rows_updated + rows,
        batches=ckpt.batches + 1,
        control=control,
    )


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

    @asynccontextmanager
    async def session(self) -> AsyncIterator[PgSession]:
        conn = await open_connection(self.params, self.job)
        try:
            yield await self._open(conn)
        finally:
            with anyio.move_on_after(CLOSE_BUDGET, shield=True):
                await _close(conn)

    async def _open(self, conn: asyncpg.Connection) -> PgSession:
        job, shard = self.job, self.shard.index
        try:
            await require_state_schema(conn)
            target = await catalog.resolve(conn, job)
            await check_fragments(conn, job, target)
            await take_lock(conn, job.name, shard=shard, wait=job.limits.lock_wait)
            ckpt = await self._load_or_create(conn, target)
            session = PgSession(conn, job, target, ckpt)
            await session.prepare()
            async with conn.transaction():
                # After a lost connection this process's run goes on (unless another runner
                # closed it meanwhile): a reconnection is not a killed run.
                run_id = self.run_id and await conn.fetchval(sql.RUN_OPEN, self.run_id)
                if not run_id:
                    await conn.execute(sql.CLOSE_ABANDONED, job.name, shard)
                    run_id = await conn.fetchval(
                        sql.OPEN_RUN, job.name, shard, job.fingerprint, __version__,
                        str(self.identity),
                    )
                await conn.execute(sql.START, job.name, shard, str(self.identity))
                await conn.execute(sql.SAVE_SETTINGS, job.name, shard, file_settings(job))
            self.run_id = session.run_id = run_id  # only once committed
            session._checkpoint = await _load(conn, job.name, shard)
            return session
        except (ConfigError, JobBusy):
            raise
        except Exception as exc:
            raise translate(exc, closed=conn.is_closed()) from exc

    async def _load_or_create(self, conn: asyncpg.Connection, target: Target) -> Checkpoint:
        job, shard = self.job, self.shard
        if await conn.fetchrow(sql.LOAD, job.name, shard.index) is None:
            await ranges.create_checkpoints(conn, job, target, shards=shard.count)
        ckpt = await _load(conn, job.name, shard.index)
        if ckpt.shards != shard.count:
            raise ranges.mismatch(job.name, ckpt.shards, shard.count)
        if ckpt.fingerprint != job.fingerprint:
            raise ConfigError(
                f"job {job.name} changed since its checkpoint was made (table, key, set or where "
                f"differ): run `backfill reset {job.name} --yes` to start over, or rename the job"
            )
        return ckpt


async def _load(conn: asyncpg.Connection, name: str, shard: int) -> Checkpoint:
    row = await conn.fetchrow(sql.LOAD, name, shard)
    if row is None:
        raise ConfigError(f"the checkpoint of job {name} vanished (reset mid-run?)")
    return to_checkpoint(row)


async def _close(conn: asyncpg.Connection) -> None:
    try:
        await conn.close(timeout=2)
    except Exception:
        conn.terminate()

"""The PostgreSQL implementation of the loop's ``Connector`` and ``Session`` seams.

A session is one dedicated connection (never a pool: its SETs and its advisory lock belong to
it). Opening one checks the job against the catalog, prepares the batch statement, takes the
job's lock, and loads or creates the checkpoint. Each batch is one statement that updates the
rows and the checkpoint together, in one round trip.
"""

from __future__ import annotations

import contextlib
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
from backfill.errors import (
    BatchFailure,
    ConfigError,
    ConnectionLost,
    Contention,
    JobBusy,
    StatementTimeout,
    Superseded,
)
from backfill.job import Job
from backfill.pg import CLIENT_SLACK, POOLER_HINT, Budget, connect, translate
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
    """A connection for the job, to a server that accepts writes (never a standby)."""
    return await connect(
        params, budget=budget_for(job), application_name=f"backfill:{job.name}", writable=True
    )


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
        with anyio.move_on_after(CLOSE_BUDGET, shield=True):
            await _close(other)
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


# A group of batches in one round trip lasts about this long at most: no decision (a pause, a
# gate, live control, the impact budget) waits longer than this for the runner to ask, and a
# stop waits for at most this plus the batch in flight. GROUP_MAX bounds the string's length.
GROUP_SECONDS = 0.5
GROUP_MAX = 200
# Only batches shorter than this are grouped: the round trip a group saves (and the client's
# turn) is a real share of a short batch; a longer one already amortizes it, and grouping
# it would only make progress and decisions coarser.
GROUP_BELOW = 0.025
# The batch statement as PREPAREd on the session's connection for groups.
GROUPED = "backfill_batch"


class PgSession:
    """One connection that holds the job's lock; runs batches alone or grouped.

    Alone, a batch is one round trip of the driver's prepared statement, and its row tells
    what it did. Grouped (when the loop may go on without a decision for a while), ``count``
    copies of the same statement run in one simple-query string, each its own transaction
    (``sql.group``); the server runs them back to back, and one more query reads where the
    checkpoint stands (``sql.AFTER_GROUP``): the truth, whatever stopped the group.
    """

    def __init__(
        self, conn: asyncpg.Connection, job: Job, target: Target, checkpoint: Checkpoint,
        *, pid: int | None = None,
    ) -> None:
        self.conn = conn
        self.job = job
        self.shard = checkpoint.shard
        self.target = target
        self.pid = pid  # the backend that holds the job's lock: every batch must run there
        self._checkpoint = checkpoint
        self.run_id: int | None = None
        self._statements: dict[str, asyncpg.prepared_stmt.PreparedStatement] = {}
        self._grouped = False  # GROUPED is PREPAREd on this connection
        self._key_seconds: float | None = None  # seconds per key lately (sizes a group)
        self._short = False  # the last group ended early: the next batch runs alone

    @property
    def checkpoint(self) -> Checkpoint:
        return self._checkpoint

    def _batch(self, *, first: bool) -> str:
        return sql.batch(self.target, set_=self.job.set, where=self.job.where, first=first)

    async def prepare(self) -> None:
        """Prepare the batch statements: validates ``set`` and ``where`` before any write."""
        try:
            for name, first in (("first", True), ("next", False)):
                self._statements[name] = await self.conn.prepare(self._batch(first=first))
        except Exception as exc:
            raise self._translate(exc, "set/where") from exc

    def _translate(self, exc: BaseException, where: str = "") -> Exception:
        error = translate(exc, closed=self.conn.is_closed(), where=where)
        if isinstance(error, ConfigError) and where == "":
            return ConfigError(f"job {self.job.name}: {error}")
        return error

    async def run_batches(
        self, cursor: Key | None, size: int, *, within: float = 0.0
    ) -> list[BatchResult]:
        """The next batch of ``size`` keys after ``cursor``, or as many as fit in ``within``
        seconds (at most ``GROUP_SECONDS``) in one round trip. Raises a ``BatchFailure`` when
        one rolled back (with ``committed``: those of its group that committed before it)."""
        count = self._count(cursor, size, within)
        self._short = False
        if count > 1:
            return await self._group(size, count)
        return [await self._one(cursor, size)]

    def _count(self, cursor: Key | None, size: int, within: float) -> int:
        if cursor is None or self._short or self._key_seconds is None:
            return 1
        each = self._key_seconds * size  # what a batch of this size took lately
        if each >= GROUP_BELOW:
            return 1
        limit = min(within, GROUP_SECONDS, self.job.limits.statement_timeout / 2)
        return max(1, min(GROUP_MAX, int(limit / each)))

    async def _one(self, cursor: Key | None, size: int) -> BatchResult:
        statement = self._statements["first" if cursor is None else "next"]
        version = self._checkpoint.batches
        start = time.perf_counter()
        try:
            row = await statement.fetchrow(size, version, self.job.name, self.shard, True)
        except Exception as exc:
            raise await self._moved(self._translate(exc)) from exc
        seconds = time.perf_counter() - start
        assert row is not None
        self._own(row["pid"])
        new = tuple(row["cursor"]) if row["cursor"] is not None else None
        control: dict[str, Any] = row["control"] or {}
        if new is not None:
            self._checkpoint = _advance(self._checkpoint, new, row["rows"], control)
            self._key_seconds = seconds / size
        return BatchResult(
            cursor=new, rows=row["rows"], size=size, seconds=seconds, control=control
        )

    async def _group(self, size: int, count: int) -> list[BatchResult]:
        before = self._checkpoint
        text = sql.group(
            GROUPED, size=size, version=before.batches, count=count, job=self.job.name,
            shard=self.shard,
        )
        start = time.perf_counter()
        failure: BatchFailure | None = None
        try:
            if not self._grouped:
                await self.conn.execute(sql.prepare(GROUPED, self._batch(first=False)))
                self._grouped = True
            # The client's timeout, as for one batch: a group that outlasts it is cancelled on
            # the server (its batch in flight rolls back, the committed ones stay).
            await self.conn.execute(text, timeout=self.job.limits.statement_timeout + CLIENT_SLACK)
        except Exception as exc:
            failure = await self._group_failure(exc, count)
        except BaseException:
            # Cancelled (a second signal): the server rolls back the batch in flight; end its
            # transaction too, so that the way out can still save the run's state.
            with anyio.move_on_after(CLOSE_BUDGET, shield=True):
                with contextlib.suppress(Exception):
                    await self.conn.execute("ROLLBACK")
            raise
        try:
            row = await self.conn.fetchrow(sql.AFTER_GROUP, self.job.name, self.shard)
        except Exception as exc:
            raise self._translate(exc) from exc
        seconds = time.perf_counter() - start
        if row is None:
            raise ConfigError(f"the checkpoint of job {self.job.name} vanished (reset mid-run?)")
        self._own(row["pid"])
        # This session's batches: the last group's entries in ``recent`` that its backend
        # wrote (another runner's, were there one despite the lock, are not its own).
        entries = zip(*[iter(row["recent"] or [])] * 3, strict=True)
        mine = [(rows, micros) for rows, micros, pid in entries if pid == row["pid"]]
        results: list[BatchResult] = []
        if row["batches"] != before.batches:
            cursor = tuple(row["cursor"])
            control: dict[str, Any] = row["control"] or {}
            self._checkpoint = replace(
                before, cursor=cursor, rows_updated=row["rows_updated"], batches=row["batches"],
                control=control,
            )
        if mine and row["batches"] != before.batches:
            self._key_seconds = seconds / (size * len(mine))
            # Each batch's own rows and server-measured time; the group's last cursor (the
            # ones between are not kept).
            results = [
                BatchResult(cursor=self._checkpoint.cursor, rows=rows, size=size,
                            seconds=micros / 1e6, control=self._checkpoint.control)
                for rows, micros in mine
            ]
        if failure is not None:
            failure.committed = results
            raise failure
        if not results:  # none ran: the range is done, or the checkpoint moved; ask alone
            return [await self._one(self._checkpoint.cursor, size)]
        self._short = len(results) < count
        return results

    async def _group_failure(self, exc: Exception, count: int) -> BatchFailure:
        """The failure that stopped a group, once its open transaction is rolled back; errors
        that are not about a batch (or a lost connection) are raised as they are."""
        error: Exception
        if isinstance(exc, TimeoutError) and not self.conn.is_closed():
            error = StatementTimeout(
                f"a group of {count} batches outlasted the statement timeout "
                f"({self.job.limits.statement_timeout:g}s) plus {CLIENT_SLACK:g}s"
            )
        else:
            error = self._translate(exc)
        if self.conn.is_closed():
            raise error from exc  # what committed is found out after reconnecting
        try:
            await self.conn.execute("ROLLBACK")  # the failed batch's BEGIN is still open
        except Exception as again:
            raise self._translate(again) from exc
        if not isinstance(error, BatchFailure):
            raise error from exc
        return error

    def _own(self, pid: int) -> None:
        """Every batch must run on the backend that holds the job's lock: elsewhere the lock
        (and the session's settings) protect nothing."""
        if self.pid is not None and pid != self.pid:
            raise ConfigError(
                f"job {self.job.name}: a batch ran on backend pid {pid}, but the job's lock is "
                f"held by backend pid {self.pid}: the connection goes through a pooler in "
                "transaction mode; connect directly or through session pooling"
            )

    async def _moved(self, error: Exception) -> Exception:
        """A lost swap means another runner moved the checkpoint, unless it is gone."""
        if isinstance(error, Superseded) and not self.conn.is_closed():
            with contextlib.suppress(Exception):
                if await self.conn.fetchrow(sql.LOAD, self.job.name, self.shard) is None:
                    return ConfigError(
                        f"the checkpoint of job {self.job.name} vanished (reset mid-run?)"
                    )
        return error

    async def next_key(self, cursor: Key | None) -> Key | None:
        after, upto = self._bounds(cursor)
        query = sql.key_of_next_row(self.target, first=cursor is None)
        try:
            value = await self.conn.fetchval(query, after, upto)
        except Exception as exc:
            raise self._translate(exc) from exc
        return tuple(value) if value is not None else None

    def _bounds(self, cursor: Key | None) -> tuple[list[str], list[str]]:
        ckpt = self._checkpoint
        assert ckpt.range_lo is not None and ckpt.range_hi is not None
        return list(cursor if cursor is not None else ckpt.range_lo), list(ckpt.range_hi)

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
            pid = await take_lock(conn, job.name, shard=shard, wait=job.limits.lock_wait)
            await check_own_backend(conn, self.params, job, pid)
            ckpt = await self._load_or_create(conn, target)
            session = PgSession(conn, job, target, ckpt, pid=pid)
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

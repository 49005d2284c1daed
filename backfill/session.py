"""The PostgreSQL implementation of the loop's ``Session`` seam: one connection that holds the
job's lock (``backfill.connector`` opens it) and runs batches on it, alone or grouped in one
round trip, each batch one statement that claims the checkpoint, updates the rows and moves
the checkpoint, in one transaction.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import replace
from typing import Any

import anyio
import asyncpg

from backfill import sql
from backfill.checkpoint import BatchResult, Checkpoint, Key, to_checkpoint
from backfill.errors import (
    BatchFailure,
    ConfigError,
    StatementTimeout,
    Superseded,
    Vanished,
)
from backfill.job import Job
from backfill.pg import CLIENT_SLACK, CLOSE_BUDGET, translate
from backfill.sql import Change, Target

log = logging.getLogger(__name__)

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
        *, change: Change, pid: int | None = None,
    ) -> None:
        self.conn = conn
        self.job = job
        self.shard = checkpoint.shard
        self.target = target
        self.change = change
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
        return sql.batch(
            self.target, self.change, first=first, flush=self.job.batch.wait_for_flush
        )

    async def prepare(self) -> None:
        """Prepare the batch statements: validates the job's SQL before any write."""
        try:
            for name, first in (("first", True), ("next", False)):
                self._statements[name] = await self.conn.prepare(self._batch(first=first))
        except Exception as exc:
            raise self._translate(exc, self.job.sql_fields) from exc

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
            raise Vanished(self.job.name)
        self._own(row["pid"])
        # The last group's batches, as each recorded itself in this session (``sql.RECENT``).
        mine = _recent(row["recent"])
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
                    return Vanished(self.job.name)
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


def _recent(text: str | None) -> list[tuple[int, int]]:
    """``sql.RECENT``'s entries: (rows, microseconds) per batch."""
    pairs = (entry.split(",") for entry in (text or "").split())
    return [(int(rows), int(micros)) for rows, micros in pairs]


def _advance(ckpt: Checkpoint, cursor: Key, rows: int, control: dict[str, Any]) -> Checkpoint:
    return replace(
        ckpt,
        cursor=cursor,
        rows_updated=ckpt.rows_updated + rows,
        batches=ckpt.batches + 1,
        control=control,
    )



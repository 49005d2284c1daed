"""The probe connection: the runner's small second connection, on which the health gates,
live control while no batch runs, the shown state and the impact budget's measurements are
taken, each query under a short statement timeout (``[throttle] check_timeout``). It is the
one module of the throttles that imports asyncpg. It connects lazily: a run without gates that
is never paused never opens it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import anyio
import asyncpg

from backfill import sql
from backfill.conninfo import ConnectParams
from backfill.job import Job
from backfill.pg import Budget, close, connect
from backfill.throttling.gates import CheckError


class PgProbe:
    """The ``Probe`` on PostgreSQL: one dedicated connection, opened on first use, reopened
    after it is lost, named like the runner's (``backfill:<job>``) so a DBA sees whose it is."""

    def __init__(self, params: ConnectParams, job: Job, *, shard: int = 0) -> None:
        self.params = params
        self.job = job
        self.shard = shard
        t = job.throttle
        self.budget = Budget(
            statement_timeout=t.check_timeout,
            lock_timeout=min(t.check_timeout, job.limits.lock_timeout),
            connect_timeout=min(job.limits.connect_timeout, 5.0),
        )
        self.application_name = f"backfill:{job.name}"[:63]
        self._conn: asyncpg.Connection | None = None
        # Gates, live control and the impact budget's looks take turns on the connection.
        self._turn = anyio.Lock()
        self._statements: bool | None = None  # pg_stat_statements installed (None: not asked)
        self._own: tuple[float, list[int]] = (-math.inf, [])  # when asked, the runner's ids

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = None
            # Any server and any pooling mode will do: the probe only reads, and
            # ``set_state``/``control`` touch one row, whichever session runs them.
            self._conn = await connect(
                self.params, budget=self.budget, application_name=self.application_name
            )
        return self._conn

    async def _fetchrow(self, query: str, *args: Any, readonly: bool = False) -> asyncpg.Record:
        async with self._turn:
            return await self._fetchrow_now(query, *args, readonly=readonly)

    async def _fetchrow_now(
        self, query: str, *args: Any, readonly: bool = False
    ) -> asyncpg.Record:
        conn = await self._connection()
        with self._guard(conn):
            if readonly:
                async with conn.transaction(readonly=True):
                    row = await conn.fetchrow(query, *args)
            else:
                row = await conn.fetchrow(query, *args)
        if row is None:
            raise CheckError("the query returned no row")
        return row

    @contextmanager
    def _guard(self, conn: asyncpg.Connection) -> Iterator[None]:
        """The server cancels at check_timeout; this catches a dead network, and forgets a
        connection that is gone."""
        try:
            with anyio.fail_after(self.budget.statement_timeout + 2):
                yield
        except TimeoutError:
            self._drop()
            raise
        except Exception:
            if conn.is_closed():
                self._conn = None
            raise

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await close(conn)

    async def control(self) -> Mapping[str, Any]:
        row = await self._fetchrow(sql.CONTROL, self.job.name, self.shard)
        return dict(row[0] or {})

    async def set_state(self, state: str) -> None:
        async with self._turn:
            conn = await self._connection()
            with self._guard(conn):
                await conn.execute(sql.SHOW_STATE, self.job.name, self.shard, state)

    async def statements(self) -> tuple[dict[int, tuple[int, float]], int] | None:
        """``pg_stat_statements``' statements but the runner's own (re-read every 10 s): per
        queryid its calls and the sum of its times (milliseconds), and how
        many rows of other roles it hides; None where it is not installed."""
        if self._statements is None:
            self._statements = bool((await self._fetchrow(sql.STATEMENTS_INSTALLED))[0])
        if not self._statements:
            return None
        async with self._turn:
            conn = await self._connection()
            with self._guard(conn):
                if time.monotonic() - self._own[0] > 10:
                    own = [r[0] for r in await conn.fetch(sql.OWN_STATEMENTS)]
                    self._own = (time.monotonic(), own)
                rows = await conn.fetch(sql.STATEMENTS, self._own[1])
        hidden = int(rows[0]["hidden"]) if rows else 0
        found = {r["queryid"]: (r["calls"], r["ms"])
                 for r in rows if r["queryid"] is not None}
        return found, hidden

    async def others(self, within: float) -> tuple[int, int]:
        row = await self._fetchrow(sql.OTHERS, self.application_name, within)
        return int(row["active"]), int(row["hidden"])

    async def replication_lag(self) -> float:
        row = await self._fetchrow(sql.REPLICATION_LAG)
        if row["hidden"]:
            raise CheckError(_PRIVILEGE.format(what="standbys' replay lag"))
        return float(row["lag"])

    async def slot_lag_bytes(self) -> int:
        return int((await self._fetchrow(sql.SLOT_LAG))[0])

    async def active_sessions(self) -> int:
        row = await self._fetchrow(sql.ACTIVE_SESSIONS, self.application_name)
        if row["hidden"]:
            raise CheckError(_PRIVILEGE.format(what="other sessions' state"))
        return int(row["active"])

    async def healthy(self) -> bool:
        query = self.job.throttle.health_query
        if query is None:
            return True
        value = (await self._fetchrow(query, readonly=True))[0]
        if not isinstance(value, bool):
            raise CheckError(f"health_query returned {value!r}, not a boolean")
        return value


async def timed(conn: asyncpg.Connection, limit: float,
                statements: Sequence[tuple[str, Sequence[object]]]) -> float:
    """Seconds ``statements`` took on ``conn``, in one transaction (the canary's process times
    its beats with it); one that the server cancelled at ``limit`` (its statement timeout)
    took at least that."""
    start = time.perf_counter()
    try:
        with anyio.fail_after(limit + 2):
            async with conn.transaction():
                for query, args in statements:
                    await conn.execute(query, *args)
    except asyncpg.QueryCanceledError:
        return max(time.perf_counter() - start, limit)
    return time.perf_counter() - start


_PRIVILEGE = "the runner's role cannot read {what}: grant it pg_monitor (or pg_read_all_stats)"

"""Faults made by another database session: conflicting locks, deadlocks, terminations.

Each helper takes its own connection (a DSN) so that it really is another session; polling
helpers take an existing admin connection so that polling does not open a connection per poll.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import asyncpg
from anyio.abc import TaskStatus


async def eventually(
    check: Callable[[], Awaitable[Any] | Any], *, within: float, interval: float = 0.01
) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy; fail after
    ``within`` seconds."""
    with anyio.fail_after(within):
        while True:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
            await anyio.sleep(interval)


async def hold_lock(
    dsn: str,
    statement: str,
    *args: Any,
    seconds: float = 3600,
    release: anyio.Event | None = None,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``statement`` (e.g. ``SELECT .. FOR UPDATE`` or ``LOCK TABLE``) in a transaction of
    another session, report its backend pid once the lock is held, keep it ``seconds`` or until
    ``release`` is set, then roll back. Use with ``await task_group.start(hold_lock, ...)``."""
    conn = await asyncpg.connect(dsn)
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute(statement, *args)
        task_status.started(conn.get_server_pid())
        with anyio.move_on_after(seconds):  # the fault itself: a lock held this long
            await (release or anyio.Event()).wait()
        await tx.rollback()
    finally:
        with anyio.CancelScope(shield=True):
            await conn.close(timeout=5)


def row_lock(table: str = "users") -> str:
    return f"SELECT 1 FROM {table} WHERE id = $1 FOR UPDATE"


def table_lock(table: str = "users", mode: str = "SHARE") -> str:
    # SHARE conflicts with the ROW EXCLUSIVE lock an UPDATE needs, and lets readers through.
    return f"LOCK TABLE {table} IN {mode} MODE"


RUNNER = """
SELECT pid, state, wait_event_type, wait_event, query
FROM pg_stat_activity WHERE application_name = $1 AND pid <> pg_backend_pid()
"""


HOLDER = """
SELECT l.pid FROM pg_locks l
WHERE l.locktype = 'advisory' AND l.granted AND l.classid = hashtext('backfill:' || $1)::oid
"""


async def lock_holder(admin: asyncpg.Connection, job: str) -> int | None:
    """The backend holding the job's lock (the runner's batch session), if any."""
    pid = await admin.fetchval(HOLDER, job)
    return int(pid) if pid is not None else None


async def runner_backends(admin: asyncpg.Connection, job: str) -> list[asyncpg.Record]:
    """The runner's backends, found by its ``application_name``."""
    return list(await admin.fetch(RUNNER, f"backfill:{job}"))


async def wait_lock_waiter(admin: asyncpg.Connection, job: str, *, within: float) -> int:
    """Wait until one of the runner's backends waits on a heavyweight lock; its pid."""

    async def waiting() -> int:
        rows = await runner_backends(admin, job)
        return next((r["pid"] for r in rows if r["wait_event_type"] == "Lock"), 0)

    pid: int = await eventually(waiting, within=within)
    return pid


async def provoke_deadlock(
    dsn: str,
    admin: asyncpg.Connection,
    job: str,
    *,
    first: int,
    second: int,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Lock row ``first`` (ahead in the runner's next slice) and report; once the runner's
    batch waits for it, update row ``second`` (which that batch already holds): a cycle.

    This session sets a long deadlock_timeout, so the runner, which has been waiting longer and
    checks sooner, is the one PostgreSQL picks as the victim.
    """
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET deadlock_timeout = '20s'; SET lock_timeout = 0")
        tx = conn.transaction()
        await tx.start()
        await conn.execute("UPDATE users SET last_name = last_name WHERE id = $1", first)
        task_status.started()
        await wait_lock_waiter(admin, job, within=10)
        # Blocks until the runner's batch is chosen as the deadlock victim and rolls back.
        await conn.execute("UPDATE users SET last_name = last_name WHERE id = $1", second)
        await tx.rollback()
    finally:
        await conn.close()


async def terminate(admin: asyncpg.Connection, pid: int) -> bool:
    return bool(await admin.fetchval("SELECT pg_terminate_backend($1)", pid))

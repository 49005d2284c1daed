"""Lock fights with other sessions: row and table locks held longer than lock_timeout, and a
deadlock. Each failed attempt rolls back, backs off, and retries the same slice."""

from __future__ import annotations

from collections import Counter
from functools import partial
from typing import Any

import anyio
import asyncpg
import pytest

from backfill import commands
from backfill.checkpoint import BatchResult
from backfill.job import parse_job
from tests.conftest import Database, seed_users, users_job

from .harness import Hook, Recorder, exactly_once
from .sessions import hold_lock, provoke_deadlock, row_lock, table_lock

pytestmark = pytest.mark.anyio

NAME = "users-display-name"
ROWS = 5000


async def run_with(db: Database, rec: Recorder, hook: Hook, **overrides: Any) -> Any:
    job = parse_job(users_job(where="true", **overrides))
    return await commands.run(job, db.params, observers=[rec], throttles=[hook])


async def test_locks_held_past_lock_timeout_are_retried(
    db: Database, admin: asyncpg.Connection, figures: Counter[str]
) -> None:
    await seed_users(db, f"generate_series(1, {ROWS})")
    rec = Recorder()
    held_at: list[int] = []  # the cursor before each slice another session locked
    async with anyio.create_task_group() as tg:

        async def on_commit(result: BatchResult) -> None:
            assert result.cursor is not None
            cursor = int(result.cursor[0])
            if len(rec.commits) in (3, 9, 15, 21):
                # Lock one row in the middle of the next slice for 4 x lock_timeout.
                held_at.append(cursor)
                await tg.start(partial(hold_lock, db.dsn, row_lock(), cursor + 50, seconds=0.8))
            elif len(rec.commits) == 27:
                held_at.append(cursor)
                await tg.start(partial(hold_lock, db.dsn, table_lock(), seconds=0.8))

        ckpt = await run_with(db, rec, Hook(on_commit), batch={"size": 100},
                              limits={"statement_timeout": "2s", "lock_timeout": "200ms"})
    assert ckpt.state == "succeeded"
    assert len(held_at) == 5
    for cursor in held_at:
        # At least one attempt on that very slice hit lock_timeout; a later one committed it.
        assert ("lock_timeout", (str(cursor),), 100) in rec.failures, (cursor, rec.failures)
    assert set(rec.reasons()) == {"lock_timeout"}
    await exactly_once(admin, 1, ROWS)
    figures["lock_timeouts_retried"] += rec.reasons().count("lock_timeout")


async def test_deadlock_is_retried(db: Database, figures: Counter[str]) -> None:
    await seed_users(db, f"generate_series(1, {ROWS})")
    # The runner checks for deadlocks after 0.5 s of waiting, well before its lock_timeout;
    # the other session waits 20 s before checking, so the runner is the victim.
    await db.execute(f'ALTER DATABASE "{db.name}" SET deadlock_timeout = \'500ms\'')
    rec = Recorder()
    admin = await db.connect()
    provoked: list[int] = []
    try:
        async with anyio.create_task_group() as tg:

            async def on_commit(result: BatchResult) -> None:
                assert result.cursor is not None
                cursor = int(result.cursor[0])
                if len(rec.commits) in (4, 12):
                    provoked.append(cursor)
                    # Row cursor+80 is taken first by the other session; the runner's next
                    # batch takes cursor+1..79, then waits for it; the other session then
                    # wants cursor+10: a cycle.
                    await tg.start(partial(provoke_deadlock, db.dsn, admin, NAME,
                                           first=cursor + 80, second=cursor + 10))

            ckpt = await run_with(db, rec, Hook(on_commit), batch={"size": 100},
                                  limits={"statement_timeout": "5s", "lock_timeout": "3s"})
        assert ckpt.state == "succeeded"
        for cursor in provoked:
            assert ("deadlock", (str(cursor),), 100) in rec.failures, (cursor, rec.failures)
        await exactly_once(admin, 1, ROWS)
    finally:
        await admin.close()
    figures["deadlocks_retried"] += rec.reasons().count("deadlock")


async def test_table_locked_while_the_runner_starts(
    db: Database, admin: asyncpg.Connection, figures: Counter[str]
) -> None:
    """A migration holds ACCESS EXCLUSIVE on the table as the runner starts: opening the
    session (reading the key range, preparing the batch) times out on the lock; it retries."""
    await seed_users(db, f"generate_series(1, {ROWS})")
    rec = Recorder()
    async with anyio.create_task_group() as tg:
        await tg.start(partial(hold_lock, db.dsn, table_lock(mode="ACCESS EXCLUSIVE"),
                               seconds=1.0))
        ckpt = await run_with(db, rec, Hook(_nothing), batch={"size": 1000},
                              limits={"statement_timeout": "2s", "lock_timeout": "200ms"})
    assert ckpt.state == "succeeded"
    assert rec.pauses and rec.pauses[0].reason == "backoff"  # it waited, then went on
    await exactly_once(admin, 1, ROWS)
    figures["lock_timeouts_retried"] += 1


async def _nothing(result: BatchResult) -> None:
    pass

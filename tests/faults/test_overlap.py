"""Exactly-once without the lock: every batch claims the checkpoint row with a compare-and-swap
on its version, so a runner that is not where the checkpoint is writes nothing. Two runners
forced onto one job (its lock bypassed) race for every batch; however they interleave, every
row is updated exactly once."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import anyio
import asyncpg
import pytest

from backfill import commands, connector, sql
from backfill.checkpoint import BatchResult, Checkpoint
from backfill.connector import Identity, PgConnector
from backfill.errors import Superseded
from backfill.job import parse_job
from tests.conftest import Database, seed_users, users_job

from .harness import Hook, Recorder, exactly_once

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

NAME = "users-display-name"


async def no_lock(conn: asyncpg.Connection, name: str, *, shard: int = 0, wait: float) -> int:
    """``take_lock`` bypassed: the runner believes it holds the job."""
    return int(await conn.fetchval("SELECT pg_backend_pid()"))


@dataclass
class Turns:
    """Two runners take turns, whatever the scheduler does: after each batch a runner waits
    until the other has committed one more (or is done). So every turn starts with a lost swap
    (the other moved the checkpoint meanwhile), and both runners commit."""

    commits: list[int] = field(default_factory=lambda: [0, 0])
    done: list[bool] = field(default_factory=lambda: [False, False])
    _changed: anyio.Event = field(default_factory=anyio.Event)

    def _poke(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def hook(self, me: int) -> Hook:
        async def after_commit(result: BatchResult) -> None:
            self.commits[me] += 1
            self._poke()
            other, target = 1 - me, self.commits[1 - me] + 1
            while not (self.done[other] or self.commits[other] >= target):
                await self._changed.wait()

        return Hook(after_commit)

    def finished(self, me: int) -> None:
        self.done[me] = True
        self._poke()


# Taking turns (``Turns``), one batch per round trip. Flat out, batches run in groups, and a
# group stops at the swap it loses.
@pytest.mark.parametrize(("rows", "turns"), [(1_000, True), (20_000, False)],
                         ids=["alone", "grouped"])
async def test_two_runners_without_the_lock_update_every_row_once(
    db: Database, admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch,
    figures: Counter[str], rows: int, turns: bool,
) -> None:
    await seed_users(db, f"generate_series(1, {rows})")
    monkeypatch.setattr(connector, "take_lock", no_lock)
    # where = true: a slice applied twice would leave touched = 2.
    job = parse_job(users_job(where="true", batch={"size": 100},
                              limits={"max_retries": 10_000}))
    recorders = [Recorder(), Recorder()]
    ends: list[Checkpoint] = []
    turnstile = Turns()

    async def runner(me: int) -> None:
        throttles = [turnstile.hook(me)] if turns else []
        try:
            ends.append(await commands.run(job, db.params, observers=[recorders[me]],
                                           throttles=throttles))
        finally:
            turnstile.finished(me)

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            for me in (0, 1):
                tg.start_soon(runner, me)
    assert [c.state for c in ends] == ["succeeded", "succeeded"]
    await exactly_once(admin, 1, rows)
    # They did collide: swaps were lost (and wrote nothing).
    lost = sum(rec.reasons().count("superseded") for rec in recorders)
    assert lost >= 1
    if turns:
        assert all(rec.commits for rec in recorders)  # they took turns
    # What each runner reported is what it did: together, every row once (grouped, each finds
    # its batches in its own session's record, which a lost swap leaves empty).
    reported = sum(r.rows for rec in recorders for r in rec.commits)
    assert reported == rows
    ckpt = await admin.fetchrow("SELECT * FROM backfill.checkpoints WHERE job = $1", NAME)
    assert ckpt["rows_updated"] == rows
    figures["lost_swaps"] += lost


async def test_a_lost_swap_writes_nothing(db: Database, admin: asyncpg.Connection) -> None:
    """The batch statement itself, expecting a version the checkpoint has moved past: it
    fails, and neither the rows nor the checkpoint changed."""
    await seed_users(db, "generate_series(1, 1000)")
    job = parse_job(users_job(where="true"))
    opener = PgConnector(db.params, job, identity=Identity("here", 1))
    async with opener.session() as s:
        await s.run_batches(None, 100)
        before = await admin.fetchrow("SELECT * FROM backfill.checkpoints WHERE job = $1", NAME)
        statement = await s.conn.prepare(s._batch(first=False))
        for version in (0, before["batches"] - 1):  # versions the checkpoint moved past
            with pytest.raises(asyncpg.InvalidTextRepresentationError, match=sql.MOVED):
                await statement.fetchrow(100, version, NAME, 0, True)
        after = await admin.fetchrow("SELECT * FROM backfill.checkpoints WHERE job = $1", NAME)
        assert dict(after) == dict(before)
        assert await admin.fetchval("SELECT count(*) FROM users WHERE touched > 0") == 100
        # The version it is at works.
        row = await statement.fetchrow(100, before["batches"], NAME, 0, True)
        assert row["cursor"] == ["200"] and row["rows"] == 100
    await exactly_once(admin, 1, 200)


async def test_a_group_that_loses_its_swap_reports_nothing(
    db: Database, admin: asyncpg.Connection
) -> None:
    """A group whose first batch finds the checkpoint moved on commits nothing and reports
    nothing: not the batches of the group before it, which its session recorded."""
    await seed_users(db, "generate_series(1, 100000)")
    job = parse_job(users_job(where="true"))
    opener = PgConnector(db.params, job, identity=Identity("here", 1))
    async with opener.session() as s:
        first = await s.run_batches(None, 100)
        done = await s.run_batches(first[0].cursor, 100, within=0.1)
        assert len(done) > 1, "the second call ran no group"
        await admin.execute("UPDATE backfill.checkpoints SET batches = batches + 1")
        with pytest.raises(Superseded) as lost:
            await s.run_batches(done[-1].cursor, 100, within=0.1)
        assert not lost.value.committed
    await exactly_once(admin, 1, 100 * (1 + len(done)))

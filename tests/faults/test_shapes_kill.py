"""The kill loop for the copy and delete shapes: SIGKILL at random moments (any instant, just
after a commit, mid-batch), then a clean finish. A copy batch (insert + checkpoint) and an
archive batch (delete + insert + checkpoint) are one statement: whatever instant the runner dies
at, the target equals the source, and every deleted row is in the archive exactly once.

The copy also runs against a live application: a writer updating, deleting and inserting
source rows through the recommended sync trigger (``sync_trigger.sql``) while the runner is
killed over and over; at the end the target equals the source.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path

import anyio
import asyncpg
import pytest

from backfill import commands
from backfill.job import parse_job
from tests.conftest import Database, write_job
from tests.shapes import (
    SYNC_TRIGGER,
    create_archive,
    create_source,
    create_target,
    moved_exactly_once,
    shape_job,
    target_equals_source,
)

from .harness import Cli, cli
from .sessions import eventually, lock_holder, runner_backends

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROWS = 40_000
KILLS = 9


async def _batches(admin: asyncpg.Connection, name: str) -> int:
    n = await admin.fetchval("SELECT batches FROM backfill.checkpoints WHERE job = $1", name)
    return int(n or 0)


async def _in_batch(admin: asyncpg.Connection, name: str) -> bool:
    # The statement's start: pg_stat_activity keeps only its first track_activity_query_size
    # bytes, and an archive's batch names backfill_changed after them.
    return any(
        r["state"] == "active" and "WITH backfill_from" in r["query"]
        for r in await runner_backends(admin, name)
    )


async def _block(db: Database) -> asyncpg.Connection:
    """A session holding the source ``IN EXCLUSIVE MODE`` until it is closed: reads go on, but
    a batch (a copy's ``FOR SHARE``, a delete) waits inside its statement, sent and not
    committed. Taken at once, unlike row locks on every row, which took longer than the
    batch's lock_timeout and left the runner backing off, idle, instead of waiting."""
    conn = await db.connect()
    await conn.execute("BEGIN; LOCK TABLE src IN EXCLUSIVE MODE")
    return conn


async def _gone(admin: asyncpg.Connection, pid: int) -> bool:
    return not await admin.fetchval("SELECT 1 FROM pg_stat_activity WHERE pid = $1", pid)


async def kill_loop(
    db: Database, admin: asyncpg.Connection, tmp_path: Path, figures: Counter[str],
    job: dict[str, object], *, kills: int = KILLS,
) -> None:
    """Run ``job`` killing it ``kills`` times at random moments, then to the end."""
    name = str(job["name"])
    path = write_job(tmp_path, {**job, "batch": {"size": 100, "sleep_seconds": 0.02},
                                "limits": {"lock_wait": "60s"}})
    final = write_job(tmp_path, {**job, "batch": {"size": 1000}}, filename="final.toml")
    seed = int(os.environ.get("BACKFILL_FAULT_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    spawned: list[Cli] = []

    async def spawn() -> Cli:
        proc = await Cli(tmp_path, "run", path, env=db.env()).start()
        spawned.append(proc)
        return proc

    blocker: asyncpg.Connection | None = None
    try:
        current = await spawn()
        for n in range(kills):
            await eventually(lambda c=current: c.code is not None or lock_holder(admin, name),
                             within=30)
            assert current.code is None, f"exited {current.code}: {current.stderr[-3000:]}"
            before = await _batches(admin, name)
            waiting = await spawn()  # the replacement queues for the lock
            kind = ("any moment", "after a commit", "mid-batch")[n % 3]
            if kind == "any moment":
                await anyio.sleep(rng.uniform(0, 0.3))
            else:
                await eventually(lambda c=current, b=before: c.code is not None
                                 or _batches_past(admin, name, b), within=30)
                if kind == "after a commit":
                    await anyio.sleep(rng.uniform(0, 0.03))
                else:
                    # Mid-batch by construction: the source is locked, so the next batch waits
                    # inside its statement (a batch without a commit to flush takes well under
                    # a millisecond: polling for one raced the run's end).
                    blocker = await _block(db)
                    await eventually(
                        lambda c=current: _in_batch(admin, name) if c.code is None else True,
                        within=30, interval=0.002)
            assert current.code is None, (
                f"a run ended by itself after {n} kills (seed {seed}): {current.stderr[-2000:]}"
            )
            holder = await lock_holder(admin, name)
            current.kill()
            assert await current.wait(within=10) == -9
            if blocker is not None:  # the dead runner's statement goes on, and may commit
                await blocker.close()
                blocker = None
            if holder is not None:
                await eventually(lambda h=holder: _gone(admin, h), within=30)
            current = waiting
            figures["sigkills"] += 1
    finally:
        if blocker is not None:
            await blocker.close()
        for proc in spawned:
            await proc.aclose()
    done = await cli(tmp_path, "run", final, env=db.env(), within=120)
    assert done.code == 0, done.stderr[-2000:]
    runs = await admin.fetch("SELECT outcome, rows_updated FROM backfill.runs ORDER BY id")
    assert runs[-1]["outcome"] == "succeeded"
    ckpt = await admin.fetchrow("SELECT * FROM backfill.checkpoints WHERE job = $1", name)
    assert sum(r["rows_updated"] or 0 for r in runs) == ckpt["rows_updated"]


async def _batches_past(admin: asyncpg.Connection, name: str, before: int) -> bool:
    return await _batches(admin, name) > before


@pytest.mark.parametrize(("shape", "kind"), [
    # (a copy with a bigint key: the live writer's test below)
    ("copy", "composite"), ("copy", "text"), ("delete", "uuid"), ("archive", "composite"),
    ("archive", "integer"),
])
async def test_sigkill_loop_per_shape(
    db: Database, admin: asyncpg.Connection, tmp_path: Path, figures: Counter[str],
    shape: str, kind: str,
) -> None:
    await create_source(admin, kind, ROWS)
    await create_target(admin, kind)
    await create_archive(admin, kind)
    await kill_loop(db, admin, tmp_path, figures, shape_job(kind, shape))
    ckpt = await admin.fetchrow("SELECT * FROM backfill.checkpoints")
    assert ckpt["state"] == "succeeded"
    if shape == "copy":
        await target_equals_source(admin)
        assert ckpt["rows_updated"] == ROWS  # each row inserted (and counted) once
    else:
        deleted = await moved_exactly_once(admin, ROWS, archive=shape == "archive")
        assert ckpt["rows_updated"] == deleted
    figures["rows_checked"] += ROWS


async def test_copy_with_a_live_writer_and_kills_leaves_target_equal_to_source(
    db: Database, admin: asyncpg.Connection, tmp_path: Path, figures: Counter[str],
) -> None:
    await create_source(admin, "bigint", ROWS)
    await create_target(admin, "bigint")
    await admin.execute(SYNC_TRIGGER.read_text())
    writes = Counter[str]()
    stop = anyio.Event()

    async def writer() -> None:
        """The application: single-row updates, deletes and inserts all over the range (and
        beyond it), as fast as one connection goes, while the copy runs."""
        rng = random.Random(7)
        conn = await db.connect()
        try:
            await conn.execute("SET lock_timeout = '10s'")
            while not stop.is_set():
                key = rng.randrange(1, ROWS + 2000)
                op = rng.choice(("update", "update", "delete", "insert"))
                if op == "update":
                    await conn.execute(
                        "UPDATE src SET payload = payload || '+', n = n + 1 WHERE id = $1", key)
                elif op == "delete":
                    await conn.execute("DELETE FROM src WHERE id = $1", key)
                else:
                    await conn.execute(
                        "INSERT INTO src VALUES ($1, 'new', 0, false) ON CONFLICT DO NOTHING", key)
                writes[op] += 1
        finally:
            await conn.close()

    async with anyio.create_task_group() as tg:
        tg.start_soon(writer)
        try:
            await kill_loop(db, admin, tmp_path, figures, shape_job("bigint", "copy"))
        finally:
            stop.set()
    assert writes["update"] and writes["delete"] and writes["insert"], writes
    await target_equals_source(admin)
    job = parse_job(shape_job("bigint", "copy"))
    assert await commands.verify(job, db.params) == 0
    figures["rows_checked"] += ROWS

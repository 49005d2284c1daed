"""The kill loop over every step of a copy job's table change (install + copy, cutover,
rollback, cutover again, finish), with an application writing the table by name throughout:
SIGKILL at random moments, some while a step retries behind a reader's transaction (so the kill
lands inside an attempt), then the step to its end. Afterwards the table under the original
name holds every row the application committed, once, and the old table equals it while the
reverse trigger is in place. No application statement fails."""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path

import anyio
import asyncpg
import pytest

from tests.conftest import Database, write_job
from tests.shapes import create_source, create_target, shape_job

from .harness import Cli, cli
from .test_shapes_kill import kill_loop

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROWS = 20_000
COLUMNS = "id, payload, n, old"


class Application:
    """Single-row inserts (fresh keys), updates and deletes on ``src`` by name, as fast as one
    connection goes; remembers what committed."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.inserted: set[int] = set()
        self.deleted: set[int] = set()
        self.ops = Counter[str]()
        self.stop = anyio.Event()

    async def __call__(self) -> None:
        rng = random.Random(11)
        conn = await self.db.connect()
        try:
            await conn.execute("SET lock_timeout = '20s'")
            key = ROWS + 1
            while not self.stop.is_set():
                op = rng.choice(("insert", "update", "update", "delete"))
                if op == "insert":
                    await conn.execute("INSERT INTO src VALUES ($1, 'app', 0, false)", key)
                    self.inserted.add(key)
                    key += 1
                elif op == "update":
                    await conn.execute("UPDATE src SET n = n + 1, payload = payload || '+' "
                                       "WHERE id = $1", rng.randrange(1, key))
                else:
                    victim = rng.randrange(1, key)
                    if await conn.fetchval("DELETE FROM src WHERE id = $1 RETURNING id", victim):
                        self.deleted.add(victim)
                self.ops[op] += 1
                await anyio.sleep(0.001)
        finally:
            await conn.close()

    def expected(self) -> set[int]:
        return (set(range(1, ROWS + 1)) | self.inserted) - self.deleted


async def differ(conn: asyncpg.Connection, a: str, b: str) -> int:
    return int(await conn.fetchval(
        f"SELECT count(*) FROM ((SELECT {COLUMNS} FROM {a} EXCEPT ALL SELECT {COLUMNS} FROM {b})"
        f" UNION ALL (SELECT {COLUMNS} FROM {b} EXCEPT ALL SELECT {COLUMNS} FROM {a})) d"))


async def kill_step(
    db: Database, tmp_path: Path, path: Path, verb: str, rng: random.Random,
    figures: Counter[str], *, kills: int = 4,
) -> None:
    """Start ``verb``, SIGKILL it at a random moment (every other time while a reader's
    transaction makes it retry), ``kills`` times; then run it to its end."""
    for n in range(kills):
        reader = None
        if n % 2:
            reader = await db.connect()
            await reader.execute("BEGIN; SELECT count(*) FROM src")
        proc = await Cli(tmp_path, verb, path, env=db.env()).start()
        try:
            await anyio.sleep(rng.uniform(0.2, 0.8))
            if proc.code is None:
                proc.kill()
                figures["sigkills"] += 1
            await proc.wait(within=10)
        finally:
            await proc.aclose()
            if reader is not None:
                await reader.close()
    done = await cli(tmp_path, verb, path, env=db.env(), within=60)
    assert done.code == 0, done.stderr[-2000:]


async def test_every_step_killed_with_the_application_writing(
    db: Database, admin: asyncpg.Connection, tmp_path: Path, figures: Counter[str],
) -> None:
    await create_source(admin, "bigint", ROWS)
    await create_target(admin, "bigint")
    job = shape_job("bigint", "copy", name="src-change")
    job["copy"] = {"into": "public.dst", "sync": "trigger"}
    job["cutover"] = {"lock_timeout": "100ms", "retry_for": "2s"}
    path = write_job(tmp_path, {**job, "batch": {"size": 1000}}, filename="change.toml")
    seed = int(os.environ.get("BACKFILL_FAULT_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    app = Application(db)
    async with anyio.create_task_group() as tg:
        tg.start_soon(app)
        try:
            await kill_loop(db, admin, tmp_path, figures, job, kills=3)
            assert await differ(admin, "src", "dst") == 0
            for verb, old in (("cutover", "src_old"), ("rollback", "dst"),
                              ("cutover", "src_old")):
                await kill_step(db, tmp_path, path, verb, rng, figures)
                assert await differ(admin, "src", old) == 0, f"after {verb} (seed {seed})"
            await kill_step(db, tmp_path, path, "finish", rng, figures)
        finally:
            app.stop.set()
    assert app.ops["insert"] and app.ops["update"] and app.ops["delete"], app.ops
    ids = [r[0] for r in await admin.fetch("SELECT id FROM src")]
    assert len(ids) == len(set(ids)) and set(ids) == app.expected(), f"seed {seed}"
    assert await admin.fetchval("SELECT phase FROM backfill.lifecycle") == "finished"
    assert await admin.fetchval("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'backfill%'") \
        == 0
    figures["rows_checked"] += len(ids)

"""The server goes away mid-run and comes back: a clean stop held for 10 s, then a crash
(immediate stop, recovery on start). The runner waits, reconnects, re-takes the job's lock,
reloads the checkpoint and finishes. These run on a server of their own."""

from __future__ import annotations

import time
from collections import Counter
from functools import partial

import anyio
import pytest

from backfill import commands
from backfill.job import parse_job
from backfill.pgtemp import TempPostgres
from tests.conftest import Database, seed_users, users_job

from .harness import Recorder, exactly_once

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

OUTAGE = 10.0


async def test_server_stopped_then_crashed_mid_run(
    own_pg: TempPostgres, own_db: Database, figures: Counter[str]
) -> None:
    rows = 10_000
    await seed_users(own_db, f"generate_series(1, {rows})")
    job = parse_job(users_job(
        set="display_name = first_name, touched = touched + 1 + (SELECT 0 FROM pg_sleep(0.03))",
        where="true", batch={"size": 200}, limits={"connect_retry_seconds": "60s"},
    ))
    rec = Recorder()
    down: list[float] = []

    async def pg_ctl(action: str, mode: str = "fast") -> None:
        await anyio.to_thread.run_sync(partial(own_pg.pg_ctl, action, mode=mode))

    async with anyio.create_task_group() as tg:

        async def fault() -> None:
            await rec.wait_until(lambda: len(rec.commits) >= 5, within=30)
            # A clean stop: the runner's backend is terminated (57P01), then connections are
            # refused, then "the database system is starting up" (57P03) for a moment.
            await pg_ctl("stop")
            stopped = time.monotonic()
            backoffs = len(rec.pauses)
            await anyio.sleep(OUTAGE)  # the outage itself
            assert len(rec.pauses) >= backoffs + 3  # it kept trying all along
            await pg_ctl("start")
            down.append(time.monotonic() - stopped)
            # A crash: every backend killed at once, crash recovery on start.
            seen = len(rec.commits)
            await rec.wait_until(lambda: len(rec.commits) >= seen + 5, within=60)
            await pg_ctl("stop", mode="immediate")
            await pg_ctl("start")

        tg.start_soon(fault)
        ckpt = await commands.run(job, own_db.params, observers=[rec])

    assert ckpt.state == "succeeded"
    assert down and down[0] >= OUTAGE
    assert rec.reasons().count("connection") >= 2
    assert len(rec.starts) >= 3
    admin = await own_db.connect()
    try:
        await exactly_once(admin, 1, rows)
    finally:
        await admin.close()
    figures["server_restarts"] += 1
    figures["server_crashes"] += 1

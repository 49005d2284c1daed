"""Batches grouped in one round trip (short batches, nothing to decide between them): each is
still its own transaction with its own checkpoint, so a kill, a bad row, a timeout or a stop in
the middle of a group loses at most the batch in flight, and every row is updated once."""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import anyio
import asyncpg
import pytest

from backfill import commands
from backfill.job import parse_job
from tests.conftest import Database, seed_users, users_job, write_job

from .harness import Cli, Recorder, checkpoint_is_exact, cli, exactly_once
from .sessions import eventually, lock_holder, runner_backends

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

NAME = "users-display-name"


async def _in_group(admin: asyncpg.Connection) -> bool:
    """A group of batches is executing on the server right now."""
    return any(
        r["state"] == "active" and "EXECUTE backfill_batch" in r["query"]
        for r in await runner_backends(admin, NAME)
    )


async def test_grouped_batches_report_each_batch_truly(db: Database) -> None:
    rows = 20_000
    await seed_users(db, f"generate_series(1, {rows})")
    rec = Recorder()
    ckpt = await commands.run(parse_job(users_job(batch={"size": 100})), db.params,
                              observers=[rec])
    assert ckpt.rows_updated == rows and ckpt.batches == len(rec.commits) == rows // 100
    assert all(c.rows == 100 and 0 < c.seconds < 1 for c in rec.commits)
    # Grouped: the batches of one group report the group's last cursor.
    cursors = [c.cursor for c in rec.commits]
    assert len(set(cursors)) < len(cursors) / 5, "hardly any batches were grouped"


async def test_sigkill_mid_group_loses_only_the_batch_in_flight(
    db: Database, admin: asyncpg.Connection, tmp_path: Path, figures: Counter[str]
) -> None:
    rows, kills = 400_000, 10
    await seed_users(db, f"generate_series(1, {rows})")
    job = write_job(tmp_path, users_job(where="true", batch={"size": 200},
                                        limits={"lock_wait": "60s"}))
    seed = int(os.environ.get("BACKFILL_FAULT_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    mid_group = 0
    for n in range(kills):
        proc = await Cli(tmp_path, "run", job, env=db.env()).start()
        try:
            await eventually(lambda p=proc: p.code is not None or lock_holder(admin, NAME),
                             within=30)
            if n % 2:
                await anyio.sleep(rng.uniform(0.02, 0.2))
            else:
                await eventually(lambda p=proc: p.code is not None or _in_group(admin),
                                 within=30, interval=0.001)
                mid_group += proc.code is None
            assert proc.code is None, f"ended by itself after {n} kills (seed {seed})"
            holder = await lock_holder(admin, NAME)
            proc.kill()
            assert await proc.wait(within=10) == -9
            if holder is not None:  # its backend ends the batch in flight, then the lock frees
                await eventually(lambda h=holder: _gone(admin, h), within=30)
        finally:
            await proc.aclose()
        await checkpoint_is_exact(admin, NAME)
    done = await cli(tmp_path, "run", job, env=db.env(), within=120)
    assert done.code == 0, done.stderr[-2000:]
    await exactly_once(admin, 1, rows)
    runs = await admin.fetch("SELECT outcome, rows_updated FROM backfill.runs ORDER BY id")
    assert runs[-1]["outcome"] == "succeeded"
    assert sum(r["rows_updated"] for r in runs) == rows
    assert mid_group >= kills // 2 - 1, mid_group
    figures["sigkills_mid_group"] += mid_group


async def _gone(admin: asyncpg.Connection, pid: int) -> bool:
    return not await admin.fetchval("SELECT 1 FROM pg_stat_activity WHERE pid = $1", pid)


async def test_a_bad_row_in_a_group_keeps_the_batches_before_it(
    db: Database, admin: asyncpg.Connection
) -> None:
    rows, poison = 20_000, 12_345
    await seed_users(db, f"generate_series(1, {rows})")
    rec = Recorder()
    job = parse_job(users_job(
        set=f"display_name = first_name, touched = touched + 1 + 0 / (id - {poison})",
        where="true", on_row_error="skip", batch={"size": 100},
    ))
    ckpt = await commands.run(job, db.params, observers=[rec])
    assert ckpt.state == "succeeded"
    assert rec.skips == [(str(poison),)]
    assert set(rec.reasons()) == {"data"}
    # The group that met the row committed the batches before it: the first failure was
    # that very slice, not a retry of the slices before.
    first_failure = rec.failures[0]
    assert first_failure[1] == (str(poison - poison % 100),), rec.failures
    await exactly_once(admin, 1, rows, excluding=(poison,))
    assert ckpt.rows_updated == rows - 1 == sum(c.rows for c in rec.commits)


async def test_sigterm_mid_group_stops_within_the_batch_in_flight(
    db: Database, admin: asyncpg.Connection, tmp_path: Path
) -> None:
    rows = 300_000
    await seed_users(db, f"generate_series(1, {rows})")
    job = write_job(tmp_path, users_job(where="true", batch={"size": 200}))
    proc = await Cli(tmp_path, "run", job, env=db.env()).start()
    try:
        await eventually(lambda: proc.code is not None or _in_group(admin), within=30,
                         interval=0.001)
        assert proc.code is None
        sent = time.monotonic()
        proc.signal(signal.SIGTERM)
        code = await proc.wait(within=30)
        took = time.monotonic() - sent
    finally:
        await proc.aclose()
    assert code == 75, proc.stderr
    assert took < 3.0, took  # a group lasts about 0.5 s; start-up and exit add the rest
    ckpt = await checkpoint_is_exact(admin, NAME)
    assert ckpt["state"] == "interrupted" and 0 < ckpt["rows_updated"] < rows
    assert await cli(tmp_path, "run", job, env=db.env(), within=120)
    await exactly_once(admin, 1, rows)

"""SIGTERM/SIGINT: the first stops after the batch in flight (which commits) with the
checkpoint exact and exit 75; a second one aborts that batch (it rolls back) and exits 75 at
once. A rerun finishes the job."""

from __future__ import annotations

import signal
import time
from collections import Counter
from functools import partial
from pathlib import Path

import anyio
import asyncpg
import pytest

from tests.conftest import Database, seed_users, users_job, write_job

from .harness import Cli, checkpoint_is_exact, cli, exactly_once
from .sessions import eventually, hold_lock, row_lock, runner_backends, wait_lock_waiter

pytestmark = pytest.mark.anyio

NAME = "users-display-name"
ROWS = 20_000


def slow_job(tmp_path: Path) -> Path:
    # The uncorrelated subquery is evaluated once per statement, on first use: each of the
    # first 12 batches (keys up to 6000) takes 0.4 s more, the rest are quick.
    return write_job(tmp_path, users_job(
        set="display_name = first_name, touched = touched + 1 + "
            "CASE WHEN id <= 6000 THEN (SELECT 0 FROM pg_sleep(0.4)) ELSE 0 END",
        where="true",
        batch={"size": 500},
        limits={"statement_timeout": "10s"},
    ))


async def _sleeping(admin: asyncpg.Connection) -> bool:
    """A batch is in flight: the runner's backend is inside its pg_sleep."""
    return any(r["wait_event"] == "PgSleep" for r in await runner_backends(admin, NAME))


async def _batches(admin: asyncpg.Connection) -> int:
    n = await admin.fetchval("SELECT batches FROM backfill.checkpoints WHERE job = $1", NAME)
    return int(n or 0)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_first_signal_finishes_the_batch_in_flight_then_exits_75(
    db: Database, admin: asyncpg.Connection, tmp_path: Path, figures: Counter[str],
    signum: signal.Signals,
) -> None:
    await seed_users(db, f"generate_series(1, {ROWS})")
    job = slow_job(tmp_path)
    proc = await Cli(tmp_path, "run", job, env=db.env()).start()
    try:
        # Let a few batches commit, then signal while the next one is in flight.
        await eventually(lambda: _at_least(admin, 3), within=30)
        await eventually(lambda: _sleeping(admin), within=30, interval=0.005)
        committed = await _batches(admin)  # the batch in flight is not among them
        sent = time.monotonic()
        proc.signal(signum)
        code = await proc.wait(within=15)
        took = time.monotonic() - sent
    finally:
        await proc.aclose()
    assert code == 75, proc.stderr
    # Well inside a pod's grace period: the rest of one batch plus the goodbye.
    assert took < 0.4 + 3, took
    assert proc.errors() == [f"backfill: error: stopped ({signum.name}); checkpoint saved"]
    ckpt = await checkpoint_is_exact(admin, NAME)
    # The batch in flight finished and committed; no further batch started.
    assert ckpt["batches"] == committed + 1
    assert ckpt["state"] == "interrupted"
    run = await admin.fetchrow("SELECT * FROM backfill.runs ORDER BY id DESC LIMIT 1")
    assert (run["outcome"], run["rows_updated"]) == ("interrupted", ckpt["rows_updated"])
    # The job's lock was released with the connection.
    assert not await runner_backends(admin, NAME)

    rerun = await cli(tmp_path, "run", job, env=db.env())
    assert rerun.proc is not None and rerun.proc.returncode == 0, rerun.stderr
    await exactly_once(admin, 1, ROWS)
    figures["sigterms"] += 1


async def test_second_signal_aborts_the_batch_in_flight_at_once(
    db: Database, admin: asyncpg.Connection, tmp_path: Path, figures: Counter[str]
) -> None:
    await seed_users(db, f"generate_series(1, {ROWS})")
    job = write_job(tmp_path, users_job(where="true", batch={"size": 500}, limits={
        "statement_timeout": "20s", "lock_timeout": "15s"}))
    release = anyio.Event()
    async with anyio.create_task_group() as tg:
        # Another session holds row 5000: the batch covering it waits up to lock_timeout.
        await tg.start(partial(hold_lock, db.dsn, row_lock(), 5000, release=release))
        proc = await Cli(tmp_path, "run", job, env=db.env()).start()
        try:
            await wait_lock_waiter(admin, NAME, within=30)
            committed = await _batches(admin)
            proc.signal(signal.SIGTERM)
            await eventually(lambda: _logged(proc, "stopping after the batch in flight"),
                             within=10)
            assert proc.proc is not None and proc.proc.returncode is None  # still waiting
            sent = time.monotonic()
            proc.signal(signal.SIGTERM)
            code = await proc.wait(within=15)
            took = time.monotonic() - sent
        finally:
            await proc.aclose()
        assert code == 75, proc.stderr
        assert took < 2.0, took
        figures["abort_seconds_max"] = max(figures["abort_seconds_max"], round(took, 2))
        assert proc.errors() == [
            "backfill: error: aborted by a second signal; the batch in flight rolled back"
        ]
        # The aborted batch's statement was cancelled on the server, not left to finish: its
        # backend is gone while the lock it waited for is still held.
        await eventually(lambda: _no_runner(admin), within=5)
        release.set()
    ckpt = await checkpoint_is_exact(admin, NAME)
    assert ckpt["batches"] == committed
    # status tells the truth: the job is interrupted, not running.
    assert ckpt["state"] == "interrupted", ckpt["state"]
    run = await admin.fetchrow("SELECT * FROM backfill.runs ORDER BY id DESC LIMIT 1")
    assert (run["outcome"], run["rows_updated"]) == ("interrupted", ckpt["rows_updated"])
    assert await admin.fetchval("SELECT max(touched) FROM users WHERE id > 4500") == 0

    rerun = await cli(tmp_path, "run", job, env=db.env())
    assert rerun.proc is not None and rerun.proc.returncode == 0, rerun.stderr
    await exactly_once(admin, 1, ROWS)
    figures["double_signals"] += 1


def _logged(proc: Cli, message: str) -> bool:
    return any(line.get("msg") == message for line in proc.log())


async def _no_runner(admin: asyncpg.Connection) -> bool:
    return not await runner_backends(admin, NAME)


async def _at_least(admin: asyncpg.Connection, n: int) -> bool:
    return await _batches(admin) >= n

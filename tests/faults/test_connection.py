"""Lost connections: the runner's backend terminated, the network cut, slow or dead, the
database unreachable for longer than the retry window."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
from pydantic import SecretStr

from backfill import commands
from backfill.checkpoint import BatchResult
from backfill.conninfo import ConnectParams
from backfill.job import parse_job
from tests.conftest import Database, seed_users, users_job, write_job

from .harness import Cli, Hook, Recorder, checkpoint_is_exact, cli, exactly_once
from .proxy import proxy_to
from .sessions import eventually, lock_holder, runner_backends, terminate

pytestmark = pytest.mark.anyio

NAME = "users-display-name"


def slow_batches(**overrides: Any) -> dict[str, Any]:
    """Every batch takes at least 30 ms on the server, so a fault can land inside one."""
    return users_job(
        set="display_name = first_name, touched = touched + 1 + (SELECT 0 FROM pg_sleep(0.03))",
        where="true", **overrides,
    )


async def _in_batch(admin: asyncpg.Connection) -> int:
    pid = await lock_holder(admin, NAME)
    rows = await runner_backends(admin, NAME)
    return next((r["pid"] for r in rows if r["pid"] == pid and r["state"] == "active"
                 and "backfill_changed" in r["query"]), 0)


async def test_terminated_backend_reconnects_and_finishes(
    db: Database, admin: asyncpg.Connection, figures: Counter[str]
) -> None:
    rows = 15_000
    await seed_users(db, f"generate_series(1, {rows})")
    rec = Recorder()
    job = parse_job(slow_batches(batch={"size": 200}))
    terminated = {"mid-batch": 0, "between batches": 0}
    between = anyio.Event()  # set: terminate at the next pause between batches
    done_between = anyio.Event()

    async def pause(result: BatchResult) -> None:
        # Called by the loop after a commit, before the next batch: the connection is idle.
        nonlocal between, done_between
        if between.is_set():
            pid = await lock_holder(admin, NAME)
            assert pid is not None and await terminate(admin, pid)
            between, event = anyio.Event(), done_between
            done_between = anyio.Event()
            event.set()

    async with anyio.create_task_group() as tg:

        async def fault() -> None:
            for n in range(8):
                seen = len(rec.commits)
                await rec.wait_until(lambda s=seen: len(rec.commits) >= s + 2
                                     or "succeeded" in rec.states, within=30)
                assert "succeeded" not in rec.states, f"finished after {n} terminations"
                if n % 2 == 0:
                    pid = await eventually(lambda: _in_batch(admin), within=30, interval=0.002)
                    assert await terminate(admin, pid)
                    terminated["mid-batch"] += 1
                else:
                    event = done_between
                    between.set()
                    with anyio.fail_after(30):
                        await event.wait()
                    terminated["between batches"] += 1

        tg.start_soon(fault)
        ckpt = await commands.run(job, db.params, observers=[rec], throttles=[Hook(pause)])
    assert ckpt.state == "succeeded"
    assert sum(terminated.values()) == 8
    assert rec.reasons().count("connection") >= 8
    assert len(rec.starts) >= 9  # a session per reconnection, each from the saved checkpoint
    await exactly_once(admin, 1, rows)
    assert ckpt.rows_updated == rows
    # One process, one run in the history, however many connections it needed.
    runs = await admin.fetch("SELECT outcome, rows_updated FROM backfill.runs")
    assert [tuple(r) for r in runs] == [("succeeded", rows)]
    figures["terminations"] += sum(terminated.values())
    figures["terminations_mid_batch"] += terminated["mid-batch"]


async def test_connection_lost_while_saving_the_final_state(
    db: Database, admin: asyncpg.Connection, figures: Counter[str]
) -> None:
    """The connection dies in the very transaction that records success: the run reconnects,
    finds the range done, and records it again."""
    rows = 1000
    await seed_users(db, f"generate_series(1, {rows})")
    # The first time the run is closed as succeeded, its backend terminates itself (a sequence,
    # because it is not rolled back with the transaction).
    await admin.execute("""
        CREATE SEQUENCE cut_once;
        CREATE FUNCTION cut_once() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.outcome = 'succeeded' AND nextval('cut_once') = 1 THEN
                PERFORM pg_terminate_backend(pg_backend_pid());
                PERFORM pg_sleep(5);
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER cut_once BEFORE UPDATE ON backfill.runs
            FOR EACH ROW EXECUTE FUNCTION cut_once();
    """)
    rec = Recorder()
    ckpt = await commands.run(parse_job(users_job(where="true")), db.params, observers=[rec])
    assert ckpt.state == "succeeded"
    assert rec.reasons() == ["connection"]
    runs = await admin.fetch("SELECT outcome, rows_updated FROM backfill.runs")
    assert [tuple(r) for r in runs] == [("succeeded", rows)]
    await exactly_once(admin, 1, rows)
    figures["terminations"] += 1


async def test_network_cuts_and_latency(
    db: Database, admin: asyncpg.Connection, figures: Counter[str]
) -> None:
    rows = 6000
    await seed_users(db, f"generate_series(1, {rows})")
    rec = Recorder()
    job = parse_job(slow_batches(batch={"size": 200}))
    async with proxy_to(db.server.port) as proxy, anyio.create_task_group() as tg:
        proxy.latency = 0.002  # each way, per chunk
        params = ConnectParams(dsn=SecretStr(proxy.dsn(db.name)))

        async def fault() -> None:
            for n in range(5):
                seen = len(rec.commits)
                await rec.wait_until(lambda s=seen: len(rec.commits) >= s + 3
                                     or "succeeded" in rec.states, within=30)
                assert "succeeded" not in rec.states, f"finished after {n} cuts"
                if n < 4:
                    assert proxy.cut() >= 1
                    continue
                # Then an outage shorter than the retry window: cut, refuse new connections
                # until two reconnection attempts failed, listen again.
                proxy.refuse()
                proxy.cut()
                pauses = len(rec.pauses)
                await rec.wait_until(lambda p=pauses: len(rec.pauses) >= p + 3, within=30)
                await proxy.accept()

        tg.start_soon(fault)
        ckpt = await commands.run(job, params, observers=[rec])
    assert ckpt.state == "succeeded"
    assert rec.reasons().count("connection") >= 5
    await exactly_once(admin, 1, rows)
    figures["network_cuts"] += 5


async def test_unreachable_longer_than_the_retry_window_exits_69(
    db: Database, admin: asyncpg.Connection, tmp_path: Path, figures: Counter[str]
) -> None:
    rows = 6000
    await seed_users(db, f"generate_series(1, {rows})")
    job = write_job(tmp_path, slow_batches(batch={"size": 200}, limits={
        "connect_timeout": "1s", "connect_retry_seconds": "2s"}))
    async with proxy_to(db.server.port) as proxy:
        env = db.env(BACKFILL_DATABASE_URL=proxy.dsn(db.name))
        proc = await Cli(tmp_path, "run", job, env=env).start()
        try:
            await eventually(lambda: _batches_at_least(admin, 5), within=30)
            proxy.refuse()
            proxy.cut()
            cut = time.monotonic()
            code = await proc.wait(within=30)
            took = time.monotonic() - cut
        finally:
            await proc.aclose()
    assert code == 69, proc.stderr
    assert 2.0 <= took < 2.0 + 3, took  # it kept trying for connect_retry_seconds, then gave up
    [error] = proc.errors()
    assert error.startswith(
        f"backfill: error: database unavailable: connecting to postgres@127.0.0.1:{proxy.port}/"
    ), error
    assert "refused" in error.lower()
    # Nothing was lost: the checkpoint is exactly what committed, and a rerun finishes.
    await checkpoint_is_exact(admin, NAME)
    rerun = await cli(tmp_path, "run", job, env=db.env())
    assert rerun.proc is not None and rerun.proc.returncode == 0, rerun.stderr
    await exactly_once(admin, 1, rows)
    figures["unreachable_exit_69"] += 1


async def test_black_holed_network_exits_69(db: Database, tmp_path: Path) -> None:
    await seed_users(db, "generate_series(1, 100)")
    job = write_job(tmp_path, slow_batches(limits={
        "connect_timeout": "500ms", "connect_retry_seconds": "1s"}))
    async with proxy_to(db.server.port) as proxy:
        proxy.blackhole()
        proc = await cli(tmp_path, "run", job, env=db.env(BACKFILL_DATABASE_URL=proxy.dsn(db.name)))
    assert proc.proc is not None and proc.proc.returncode == 69, proc.stderr
    [error] = proc.errors()
    assert "database unavailable" in error and "TimeoutError" in error, error
    assert await db.fetchval("SELECT count(*) FROM backfill.checkpoints") == 0


async def _batches_at_least(admin: asyncpg.Connection, n: int) -> bool:
    got = await admin.fetchval("SELECT batches FROM backfill.checkpoints WHERE job = $1", NAME)
    return (got or 0) >= n

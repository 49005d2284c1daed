"""The replication gates against real replication: a dedicated primary (wal_level=logical), a
streaming standby made with pg_basebackup, and a logical slot nobody consumes."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import asyncpg
import pytest

from backfill import commands, sql
from backfill.job import parse_job
from backfill.pgtemp import TempPostgres
from tests.conftest import Database, new_database, seed_users, temp_server, users_job
from tests.throttle_support import Watch, install_log, poll, read_log

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def replicated() -> Iterator[tuple[TempPostgres, TempPostgres]]:
    """A primary and a streaming standby that reports its replay position every second."""
    settings = {"wal_level": "logical", "max_wal_senders": "4", "max_replication_slots": "4"}
    with temp_server(settings=settings) as primary, primary.standby() as standby:
        yield primary, standby


async def fresh_database(server: TempPostgres) -> Database:
    db = await new_database(server, template="template1")
    await db.execute(sql.INIT)
    return db


async def test_replication_lag_holds_the_run_until_replay_resumes(
    replicated: tuple[TempPostgres, TempPostgres],
) -> None:
    primary, standby = replicated
    db = await fresh_database(primary)
    await poll(lambda: db.fetchval(
        "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"), within=30)
    await seed_users(db, "generate_series(1, 8000)")
    await install_log(db)
    job = parse_job(users_job(
        batch={"size": 50, "sleep_seconds": 0.02},
        throttle={"check_every": 0.2, "max_replication_lag": "1s"},
    ))
    watch = Watch()
    replica = await asyncpg.connect(standby.dsn())
    try:
        with anyio.fail_after(90):
            async with anyio.create_task_group() as tg:
                tg.start_soon(_run, job, db, watch)
                await watch.until(lambda: len(watch.commits) >= 5, within=30)
                await replica.execute("SELECT pg_wal_replay_pause()")
                await watch.until(lambda: watch.count("replication_lag") >= 3, within=30)
                lag = await db.fetchval(
                    "SELECT max(extract(epoch FROM replay_lag)) FROM pg_stat_replication"
                )
                assert lag > 1.0
                assert await db.fetchval("SELECT state FROM backfill.checkpoints") == "throttled"
                resumed_replay = await db.fetchval("SELECT clock_timestamp()")
                await replica.execute("SELECT pg_wal_replay_resume()")
    finally:
        await replica.close()
    entries = await read_log(db)
    held = next(e for e in entries if e.state == "throttled")
    resumed = next(e for e in entries if e.state == "running" and e.at > held.at)
    assert resumed.at > resumed_replay
    assert not [e for e in entries if e.batches is not None and held.at < e.at < resumed.at]
    assert await db.fetchval("SELECT count(*) FROM users WHERE touched <> 1") == 0
    assert watch.throttle_seconds["replication_lag"] > 0.5
    assert await db.fetchval("SELECT state FROM backfill.checkpoints") == "succeeded"


async def test_slot_lag_holds_the_run_while_a_slot_retains_too_much_wal(
    replicated: tuple[TempPostgres, TempPostgres],
) -> None:
    primary, _ = replicated
    db = await fresh_database(primary)
    await seed_users(db, "generate_series(1, 4000)")
    await install_log(db)
    await db.execute("SELECT pg_create_logical_replication_slot('backfill_test', 'pgoutput')")
    job = parse_job(users_job(
        batch={"size": 50, "sleep_seconds": 0.01},
        throttle={"check_every": 0.1, "max_slot_lag_bytes": "64kB"},
    ))
    watch = Watch()
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(_run, job, db, watch)
            await watch.until(lambda: watch.count("slot_lag") >= 3, within=30)
            retained = await db.fetchval(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn) "
                "FROM pg_replication_slots WHERE slot_name = 'backfill_test'"
            )
            assert retained > 64 * 1024
            held = len(watch.commits)
            await db.execute("SELECT pg_drop_replication_slot('backfill_test')")
    assert len(watch.commits) > held
    assert await db.fetchval("SELECT count(*) FROM users WHERE touched <> 1") == 0
    assert watch.throttle_seconds["slot_lag"] > 0.2


async def _run(job: object, db: Database, watch: Watch) -> None:
    await commands.run(job, db.params, observers=[watch])  # type: ignore[arg-type]

"""Live control: `backfill pause`, `resume` and `set` from a second process, while a run goes
on, across a restart of the runner, and before a job's first run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from backfill import commands, sql
from backfill.errors import ConfigError
from backfill.job import parse_job
from tests.conftest import REPO, Database, cli, seed_users, users_job, write_job
from tests.throttle_support import Watch, install_log, poll, read_log

pytestmark = pytest.mark.anyio
NAME = "users-display-name"


async def backfill(db: Database, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """The CLI in a second process, as an operator would run it."""
    return await anyio.to_thread.run_sync(lambda: cli(*args, env=db.env(), timeout=60))


async def state(db: Database) -> str:
    return str(await db.fetchval("SELECT state FROM backfill.checkpoints WHERE job = $1", NAME))


async def test_pause_set_resume_while_running(db: Database, tmp_path: Path) -> None:
    await seed_users(db, "generate_series(1, 8000)")
    await install_log(db)
    fields = users_job(batch={"size": 50, "sleep_seconds": 0.05}, throttle={"check_every": 0.2})
    write_job(tmp_path, fields)
    watch = Watch()

    async def run() -> None:
        await commands.run(parse_job(fields), db.params, observers=[watch])

    with anyio.fail_after(80):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await watch.until(lambda: len(watch.commits) >= 3, within=20)

            done = await backfill(
                db, "set", NAME, "batch.size=37", "batch.sleep_seconds=0",
                "limits.max_rows_per_second=800",
            )
            assert done.returncode == 0, done.stderr
            assert "picks this up within one batch" in done.stdout
            said = time.monotonic()
            await watch.until(lambda: watch.commits[-1][1].size == 37, within=20)
            # Within one batch: the one in flight and the next may still have the old size.
            assert len([r for t, r in watch.commits if t > said and r.size != 37]) <= 2

            done = await backfill(db, "pause", NAME)
            assert done.returncode == 0, done.stderr
            await poll(lambda: _is(db, "paused"), within=20)
            await watch.until(lambda: watch.count("paused") >= 3, within=20)

            shown = await backfill(db, "status", NAME, "--json")
            assert shown.returncode == 0, shown.stderr
            entry = json.loads(shown.stdout)["jobs"][0]
            assert entry["state"] == "paused"
            assert entry["control"] == {
                "paused": True, "batch.size": 37, "batch.sleep_seconds": 0.0,
                "limits.max_rows_per_second": 800.0,
            }
            assert entry["settings"]["batch.size"] == 50
            assert entry["settings"]["limits.max_rows_per_second"] is None
            text = await backfill(db, "status", NAME)
            assert "paused by an operator" in text.stdout
            assert "batch.size" in text.stdout and "37  (live; job file: 50)" in text.stdout

            # Changed while paused, in force once resumed: the rest goes at full speed.
            done = await backfill(db, "set", NAME, "limits.max_rows_per_second=default")
            assert done.returncode == 0, done.stderr
            done = await backfill(db, "resume", NAME)
            assert done.returncode == 0, done.stderr
    entries = await read_log(db)
    paused = next(e for e in entries if e.state == "paused")
    resumed = next(e for e in entries if e.state == "running" and e.at > paused.at)
    assert not [e for e in entries if e.batches is not None and paused.at < e.at < resumed.at]
    assert await db.fetchval("SELECT count(*) FROM users WHERE touched <> 1") == 0
    assert watch.throttle_seconds["paused"] > 0.4
    assert watch.throttle_seconds["rate_limit"] > 0
    assert await state(db) == "succeeded"


async def test_a_pause_outlives_a_restart(db: Database, tmp_path: Path) -> None:
    await seed_users(db, "generate_series(1, 3000)")
    await install_log(db)
    job = write_job(tmp_path, users_job(
        batch={"size": 50, "sleep_seconds": 0.05}, throttle={"check_every": 0.2},
    ))
    with anyio.fail_after(80):
        first = await _runner(db, job, tmp_path / "first.log")
        await poll(lambda: db.fetchval("SELECT batches >= 3 FROM backfill.checkpoints"), within=30)
        await commands.pause(db.params, NAME)
        await poll(lambda: _is(db, "paused"), within=20)
        first.send_signal(signal.SIGTERM)
        assert await first.wait() == 75, (tmp_path / "first.log").read_text()
        assert await state(db) == "interrupted"
        stopped = await db.fetchval("SELECT batches FROM backfill.checkpoints")
        idle = await commands.set_live(db.params, NAME, ["batch.sleep_seconds=0.01"])
        assert not idle.pending and not idle.runners  # no runner: the next run starts with it

        second = await _runner(db, job, tmp_path / "second.log")
        # The new runner starts paused: it shows so, and commits nothing.
        await poll(lambda: _is(db, "paused"), within=30)
        assert await db.fetchval("SELECT batches FROM backfill.checkpoints") == stopped
        await commands.resume(db.params, NAME)
        assert await second.wait() == 0, (tmp_path / "second.log").read_text()
    entries = await read_log(db)
    paused = [e for e in entries if e.state == "paused"]
    assert len(paused) == 2  # once per runner
    restarted = paused[1]
    resumed = next(e for e in entries if e.state == "running" and e.at > restarted.at)
    assert not [e for e in entries if e.batches is not None and paused[0].at < e.at < resumed.at]
    assert await db.fetchval("SELECT count(*) FROM users WHERE touched <> 1") == 0
    log = (tmp_path / "second.log").read_text()
    assert "paused by an operator" in log and "resumed" in log


async def test_pause_and_set_before_the_first_run(db: Database) -> None:
    await seed_users(db, "generate_series(1, 500)")
    paused = await commands.pause(db.params, NAME)
    assert paused.pending and paused.control == {"paused": True}
    changed = await commands.set_live(db.params, NAME, ["batch.size=25"])
    assert changed.control == {"paused": True, "batch.size": 25}
    assert (await commands.status(db.params, NAME)).pending == {NAME: changed.control}
    watch = Watch()

    async def run() -> None:
        job = parse_job(users_job(throttle={"check_every": 0.2}))
        await commands.run(job, db.params, observers=[watch])

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await watch.until(lambda: watch.count("paused") >= 2, within=20)
            assert await db.fetchval("SELECT batches FROM backfill.checkpoints") == 0
            assert await state(db) == "paused"
            resumed = await commands.resume(db.params, NAME)
            assert not resumed.pending and resumed.runners
    assert {r.size for _, r in watch.commits} == {25}
    assert (await commands.status(db.params, NAME)).pending == {}
    # `reset` forgets the overrides with the checkpoint.
    await commands.reset(db.params, NAME)
    assert (await commands.status(db.params)).pending == {}


async def test_bad_settings_are_refused_and_change_nothing(db: Database) -> None:
    await commands.set_live(db.params, NAME, ["batch.sleep_seconds=0.5"])
    for args in (["batch.size=0"], ["batch.sise=10"], ["limits.max_rows_per_second=fast"]):
        with pytest.raises(ConfigError):
            await commands.set_live(db.params, NAME, args)
    with pytest.raises(ConfigError, match="not a job name"):
        await commands.pause(db.params, "Bad Name")
    done = await backfill(db, "set", NAME, "batch.size=-1")
    assert done.returncode == 78 and "batch.size: Input should be greater" in done.stderr
    assert (await commands.status(db.params, NAME)).pending == {NAME: {"batch.sleep_seconds": 0.5}}


async def _runner(db: Database, job: Path, log: Path) -> Any:
    with log.open("w") as out:
        return await anyio.open_process(
            [sys.executable, "-m", "backfill", "run", str(job)],
            env=db.env(), stdout=out, stderr=out, cwd=REPO,
        )


async def _is(db: Database, expected: str) -> bool:
    return await state(db) == expected


async def test_init_upgrades_an_older_state_schema(db: Database) -> None:
    # An install from before versions: no version table, and it lacked later additions.
    await db.execute(
        "DROP TABLE backfill.schema_version; ALTER TABLE backfill.checkpoints DROP COLUMN "
        "settings, DROP COLUMN shape; DROP TABLE backfill.controls"
    )
    with pytest.raises(ConfigError, match="older version: run `backfill init`"):
        await commands.pause(db.params, NAME)
    assert await commands.init(db.params) == [m.version for m in sql.MIGRATIONS]
    assert (await commands.pause(db.params, NAME)).pending
    # Up to date: nothing more to apply; each migration has its row.
    assert await commands.init(db.params) == []
    versions = await db.fetch("SELECT version FROM backfill.schema_version ORDER BY 1")
    assert [r["version"] for r in versions] == [m.version for m in sql.MIGRATIONS]


async def test_a_migration_missing_is_reported(db: Database) -> None:
    await db.execute(f"DELETE FROM backfill.schema_version WHERE version = {sql.LATEST}")
    with pytest.raises(ConfigError, match="older version: run `backfill init`"):
        await commands.pause(db.params, NAME)
    assert await commands.init(db.params) == [sql.LATEST]

"""Failover: the primary crashes mid-run and its streaming standby (``pg_basebackup -R``) is
promoted. The runner finds the new primary, re-takes the job's lock, reloads the checkpoint (the
batches lost with the asynchronous tail, which the standby is made to miss, are redone) and
finishes as the same run: every row exactly once on the new primary. It never writes to a
standby: finding one is a reason to reconnect, within connect_retry_seconds, not a configuration
error.

Two ways to find the new primary: a libpq multi-host URL (``target_session_attrs=read-write``),
and one stable address (a proxy here; a cloud endpoint whose DNS flips) that points at the
standby before it is promoted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pydantic import SecretStr

from backfill.connector import Identity, PgConnector
from backfill.conninfo import ConnectParams
from backfill.errors import ConnectionLost
from backfill.job import parse_job
from backfill.pgtemp import TempPostgres
from tests.conftest import (
    Database,
    new_database,
    seed_users,
    serving,
    users_job,
    write_job,
)

from .harness import Cli, cli, exactly_once
from .proxy import proxy_to
from .sessions import eventually

pytestmark = pytest.mark.anyio

ROWS = 20_000
NAME = "users-display-name"
# Slow enough that the crash lands mid-run; where = true: a batch applied twice shows.
JOB = users_job(where="true", batch={"size": 200, "sleep_seconds": 0.01},
                limits={"connect_retry_seconds": "60s", "connect_timeout": "2s"})


@pytest.fixture
def pair() -> Iterator[tuple[TempPostgres, TempPostgres]]:
    """A primary with the state-schema template, and its streaming standby."""
    with serving() as primary, primary.standby() as standby:
        yield primary, standby


@pytest.fixture
async def seeded(pair: tuple[TempPostgres, TempPostgres]) -> AsyncIterator[Database]:
    db = await new_database(pair[0])
    await seed_users(db, f"generate_series(1, {ROWS})")
    yield db


async def _replayed(standby: Database, batches: int) -> bool:
    """The standby has replayed the seeded table and the run's first ``batches`` batches
    (and so its run row)."""
    try:
        conn = await standby.connect()
    except asyncpg.InvalidCatalogNameError:  # not even the database yet
        return False
    try:
        if await conn.fetchval("SELECT count(*) FROM users") != ROWS:
            return False
        done = await conn.fetchval(
            "SELECT batches FROM backfill.checkpoints WHERE job = $1", NAME)
        runs = await conn.fetchval("SELECT count(*) FROM backfill.runs")
    except asyncpg.UndefinedTableError:
        return False
    finally:
        await conn.close()
    return batches == 0 or bool(done and done >= batches and runs == 1)


def _retries(run: Cli, text: str) -> list[dict[str, Any]]:
    return [e for e in run.log() if e["msg"] == "could not open a session; retrying"
            and text in e.get("error", "")]


async def _fail_over(
    run: Cli, primary: TempPostgres, standby: TempPostgres, db: Database, *, refused: str,
    flip: Any = None,
) -> None:
    """Crash the primary once the standby has replayed part of the run and then missed the
    last batches (the asynchronous tail, lost with the primary); ``flip()`` (if any); promote
    the standby once the runner has been refused (``refused`` in its log)."""
    replica = Database(standby, db.name)
    await eventually(lambda: run.code is not None or _replayed(replica, 10), within=60,
                     interval=0.05)
    assert run.code is None, run.output
    # The standby goes down for a moment: what the primary commits meanwhile, it never gets.
    standby.pg_ctl("stop")
    gone = await _batches(db)
    await eventually(lambda: run.code is not None or _ahead(db, gone + 5), within=30)
    assert run.code is None, run.output
    committed = await _batches(db)
    primary.pg_ctl("stop", mode="immediate")  # a crash: no shutdown checkpoint, no goodbye
    if flip is not None:
        flip()
    standby.pg_ctl("start")
    await eventually(lambda: run.code is not None or _retries(run, refused), within=30,
                     interval=0.05)
    assert run.code is None, run.output
    standby.pg_ctl("promote")
    await eventually(lambda: standby_admin(standby, "SELECT NOT pg_is_in_recovery()"), within=30)
    assert await _batches(replica) < committed  # the tail the runner must redo


async def standby_admin(server: TempPostgres, query: str) -> Any:
    conn = await asyncpg.connect(server.dsn())
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


async def _batches(db: Database) -> int:
    n = await db.fetchval("SELECT batches FROM backfill.checkpoints WHERE job = $1", NAME)
    return int(n or 0)


async def _ahead(db: Database, batches: int) -> bool:
    return await _batches(db) >= batches


async def _finished_once(run: Cli, standby: TempPostgres, db: Database, tmp: Path,
                         env: dict[str, str]) -> None:
    assert await run.wait(within=120) == 0, run.output
    new = Database(standby, db.name)
    conn = await new.connect()
    try:
        await exactly_once(conn, 1, ROWS)
        ckpt = await conn.fetchrow("SELECT * FROM backfill.checkpoints WHERE job = $1", NAME)
        assert (ckpt["state"], ckpt["rows_updated"]) == ("succeeded", ROWS)
        # One run from start to finish: the failover is a reconnection, not a new run.
        runs = await conn.fetch("SELECT outcome, rows_updated FROM backfill.runs")
        assert [tuple(r) for r in runs] == [("succeeded", ROWS)]
    finally:
        await conn.close()
    status = await cli(tmp, "status", NAME, env=env)
    assert status.code == 0 and "succeeded" in status.stdout, status.output


async def test_failover_through_a_multi_host_url(
    pair: tuple[TempPostgres, TempPostgres], seeded: Database, tmp_path: Path
) -> None:
    primary, standby = pair
    url = (f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}"
           f"/{seeded.name}?target_session_attrs=read-write")
    env = seeded.env(BACKFILL_DATABASE_URL=url)
    run = await Cli(tmp_path, "run", write_job(tmp_path, JOB), env=env).start()
    try:
        # With the primary down, the only server that answers is the standby, which does not
        # accept writes: the runner waits for one that does.
        await _fail_over(run, primary, standby, seeded, refused="ConnectionRefusedError")
        await _finished_once(run, standby, seeded, tmp_path, env)
    finally:
        await run.aclose()
    assert not _retries(run, "read-only")  # target_session_attrs kept it off the standby


async def test_failover_behind_a_stable_address(
    pair: tuple[TempPostgres, TempPostgres], seeded: Database, tmp_path: Path
) -> None:
    primary, standby = pair
    async with proxy_to(primary.port) as proxy:
        # No target_session_attrs in the URL: the runner asks for read-write by itself.
        env = seeded.env(BACKFILL_DATABASE_URL=proxy.dsn(seeded.name))
        run = await Cli(tmp_path, "run", write_job(tmp_path, JOB), env=env).start()
        try:
            # The address flips to the standby before it is promoted: the runner finds a
            # read-only server there, and keeps trying until it is the primary.
            await _fail_over(run, primary, standby, seeded, refused="no server accepts writes",
                             flip=lambda: proxy.retarget(standby.port))
            await _finished_once(run, standby, seeded, tmp_path, env)
        finally:
            await run.aclose()


async def test_a_standby_is_never_written_to(
    pair: tuple[TempPostgres, TempPostgres], seeded: Database, tmp_path: Path
) -> None:
    standby = pair[1]
    replica = Database(standby, seeded.name)
    await eventually(lambda: _replayed(replica, 0), within=30)
    job = write_job(tmp_path, users_job(limits={"connect_retry_seconds": "1s"}))
    # Straight to the standby: a reason to wait for a primary (69 once the window is over),
    # never a configuration error (78), whatever target_session_attrs says.
    for query in ("", "?target_session_attrs=any"):
        env = replica.env(BACKFILL_DATABASE_URL=replica.dsn + query)
        run = await cli(tmp_path, "run", job, env=env)
        assert run.code == 69, run.output
        [error] = run.errors()
        assert "database unavailable" in error, error
        assert ("read-only" if query else "no server accepts writes") in error, error
    # In process: each attempt is a lost connection (the loop retries those).
    for query in ("", "?target_session_attrs=any"):
        connector = PgConnector(ConnectParams(dsn=SecretStr(replica.dsn + query)),
                                parse_job(users_job()), identity=Identity("test", 1))
        with pytest.raises(ConnectionLost):
            async with connector.session():
                pass
    assert await seeded.fetchval("SELECT count(*) FROM backfill.checkpoints") == 0
    assert await seeded.fetchval("SELECT count(*) FROM backfill.runs") == 0

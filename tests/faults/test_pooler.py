"""Through a real PgBouncer (Debian's, default settings).

* Session pooling works end to end, the kill loop included, and the job's statement_timeout and
  lock_timeout are in force in every batch: the job's own ``set`` records them in each row.
* Transaction pooling is refused (exit 78) before anything is written: the job's lock and the
  session's settings would stay on a server session that other clients then get.
* An error PgBouncer raises at startup (a startup parameter it does not know) is a
  configuration problem: exit 78 at once, not 69 after connect_retry_seconds.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from pydantic import SecretStr

from backfill.connector import Identity, PgConnector
from backfill.conninfo import ConnectParams
from backfill.errors import ConfigError
from backfill.job import parse_job
from backfill.pgtemp import TempPostgres
from tests.conftest import Database, seed_users, users_job, write_job

from .harness import cli, exactly_once
from .pooler import PgBouncer, pgbouncer
from .test_kill import sigkill_loop

pytestmark = pytest.mark.anyio

ROWS = 3000
NAME = "users-display-name"
# Each row records the time limits in force in the batch that updated it.
RECORD_LIMITS = (
    "display_name = first_name, touched = touched + 1, "
    "seen = current_setting('statement_timeout') || ' ' || current_setting('lock_timeout')"
)


@pytest.fixture(scope="module")
def session_pool(pg: TempPostgres) -> Iterator[PgBouncer]:
    with pgbouncer(pg, mode="session") as bouncer:
        yield bouncer


@pytest.fixture(scope="module")
def transaction_pool(pg: TempPostgres) -> Iterator[PgBouncer]:
    with pgbouncer(pg, mode="transaction") as bouncer:
        yield bouncer


async def test_session_pooling_runs_with_the_jobs_limits_in_every_batch(
    db: Database, admin: asyncpg.Connection, session_pool: PgBouncer, tmp_path: Path
) -> None:
    await seed_users(db, f"generate_series(1, {ROWS})")
    await admin.execute("ALTER TABLE users ADD COLUMN seen text")
    job = write_job(tmp_path, users_job(
        set=RECORD_LIMITS, where="true", batch={"size": 100},
        limits={"statement_timeout": "7s", "lock_timeout": "700ms"},
    ))
    env = db.env(BACKFILL_DATABASE_URL=session_pool.dsn(db.name))
    run = await cli(tmp_path, "run", job, env=env)
    assert run.code == 0, run.output
    status = await cli(tmp_path, "status", NAME, env=env)
    assert status.code == 0 and "succeeded" in status.stdout, status.output
    # Every row was updated by a batch that ran under the job's limits (the server's own
    # defaults are 0: no limit), through the pooler.
    assert await admin.fetchval("SHOW statement_timeout") == "0"
    seen = await admin.fetch("SELECT seen, count(*) FROM users GROUP BY seen")
    assert [tuple(r) for r in seen] == [("7s 700ms", ROWS)]
    assert f"login attempt: db={db.name}" in session_pool.log
    await exactly_once(admin, 1, ROWS)
    batches = await admin.fetchval("SELECT batches FROM backfill.checkpoints WHERE job = $1", NAME)
    assert batches == ROWS // 100


async def _settled(admin: asyncpg.Connection, pid: int) -> bool:
    """Through a pooler a killed runner's backend may live on (reset and back in the pool):
    once it runs no statement, it can commit nothing more."""
    state = await admin.fetchval("SELECT state FROM pg_stat_activity WHERE pid = $1", pid)
    return state is None or state == "idle"


@pytest.mark.slow
async def test_kill_loop_through_session_pooling(
    db: Database,
    admin: asyncpg.Connection,
    session_pool: PgBouncer,
    tmp_path: Path,
    figures: Counter[str],
) -> None:
    env = db.env(BACKFILL_DATABASE_URL=session_pool.dsn(db.name))
    await sigkill_loop(db, admin, tmp_path, figures, env=env, gone=_settled)
    assert f"login attempt: db={db.name}" in session_pool.log


async def test_transaction_pooling_is_refused_before_any_write(
    db: Database, admin: asyncpg.Connection, transaction_pool: PgBouncer, tmp_path: Path
) -> None:
    await seed_users(db, f"generate_series(1, {ROWS})")
    job = write_job(tmp_path, users_job(limits={"connect_retry_seconds": "30s"}))
    started = time.monotonic()
    run = await cli(tmp_path, "run", job, env=db.env(
        BACKFILL_DATABASE_URL=transaction_pool.dsn(db.name)))
    assert run.code == 78, run.output
    assert time.monotonic() - started < 15  # at once, not after connect_retry_seconds
    [error] = run.errors()
    assert "transaction mode" in error and "connect directly" in error, error
    assert "session mode" in error, error
    assert "Traceback" not in run.output
    assert await admin.fetchval("SELECT count(*) FROM backfill.checkpoints") == 0
    assert await admin.fetchval("SELECT count(*) FROM backfill.runs") == 0
    assert await admin.fetchval("SELECT count(*) FROM users WHERE touched <> 0") == 0
    # In process, the connector says the same, and its lock died with its session.
    connector = PgConnector(
        ConnectParams(dsn=SecretStr(transaction_pool.dsn(db.name))),
        parse_job(users_job()), identity=Identity("test", 1),
    )
    with pytest.raises(ConfigError, match="transaction mode"):
        async with connector.session():
            pass


async def test_pooler_startup_errors_exit_78_at_once(
    db: Database, session_pool: PgBouncer, tmp_path: Path
) -> None:
    await seed_users(db, "generate_series(1, 10)")
    job = write_job(tmp_path, users_job(limits={"connect_retry_seconds": "30s"}))
    # A URL parameter the driver sends as a startup parameter, which PgBouncer refuses.
    url = session_pool.dsn(db.name) + "?search_path=public"
    for verb in (["run", job], ["status"]):
        started = time.monotonic()
        proc = await cli(tmp_path, *verb, env=db.env(BACKFILL_DATABASE_URL=url))
        assert proc.code == 78, (verb, proc.output)
        assert time.monotonic() - started < 15, verb  # not after connect_retry_seconds
        [error] = proc.errors()
        assert "unsupported startup parameter: search_path" in error, (verb, error)
        assert "Traceback" not in proc.output

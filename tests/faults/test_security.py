"""Least privilege and secrets, on a server of their own (password authentication via pg_hba).

* The runner role needs only SELECT/UPDATE on the table and rights in the state schema, which
  an owner creates once with `init`; a role without UPDATE, or without the state schema, gets
  exit 78 and a message saying what is missing, before any write.
* The password (and the URL holding it) never appears in any output: runs that succeed, runs
  with a wrong password, port or host, status, verify, plan, the metrics endpoint, and URLs
  whose unencoded special characters make them unparsable.
"""

from __future__ import annotations

import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import quote

import anyio
import pytest

from backfill.pgtemp import TempPostgres, free_port
from tests.conftest import Database, users_job, write_job

from .credentials import (
    GRANTS,
    PASSWORD,
    ROWS,
    WRONG,
    assert_no_secret,
    bare_database,
    require_passwords,
    url,
)
from .harness import Cli, cli, exactly_once

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def secured(own_pg: TempPostgres) -> Iterator[TempPostgres]:
    require_passwords(own_pg)
    yield own_pg


@pytest.fixture
async def bare(secured: TempPostgres) -> AsyncIterator[Database]:
    yield await bare_database(secured)


async def test_least_privilege_role_runs_a_whole_job(bare: Database, tmp_path: Path) -> None:
    owner = bare.env()  # the superuser, as a DBA would run it
    init = await cli(tmp_path, "init", env=owner)
    assert init.code == 0, init.output
    await bare.execute(GRANTS.format(role="backfill_runner"))
    job = write_job(tmp_path, users_job(where="true"))
    env = bare.env(BACKFILL_DATABASE_URL=url(bare), BACKFILL_METRICS_PORT=str(free_port()),
                   BACKFILL_METRICS_LINGER_SECONDS="20")

    plan = await cli(tmp_path, "plan", job, env=env)
    assert plan.code == 0, plan.output
    run = await Cli(tmp_path, "--log-level", "debug", "run", job, env=env).start()
    scrapes: list[str] = []
    try:
        # Scrape the metrics endpoint all along; it lingers after the run until one scrape
        # saw the end, then the process exits.
        port = int(env["BACKFILL_METRICS_PORT"])
        with anyio.fail_after(60):
            while run.proc is not None and run.proc.returncode is None:
                if (text := await anyio.to_thread.run_sync(_scrape, port)) is not None:
                    scrapes.append(text)
                await anyio.sleep(0.05)
    finally:
        await run.aclose()
    assert run.code == 0, run.output
    assert scrapes
    for secret in (PASSWORD, quote(PASSWORD, safe=""), "postgresql://"):
        assert not any(secret in text for text in scrapes)
    verify = await cli(tmp_path, "verify", job, env=bare.env(BACKFILL_DATABASE_URL=url(bare)))
    status = await cli(tmp_path, "status", "users-display-name", env=env)
    as_json = await cli(tmp_path, "status", "--json", env=env)
    assert (verify.code, status.code, as_json.code) == (1, 0, 0)  # where = true: all still match
    assert "backfill_runner" in status.stdout or "succeeded" in status.stdout
    assert_no_secret(plan, run, verify, status, as_json)
    conn = await bare.connect()
    try:
        await exactly_once(conn, 1, ROWS)
    finally:
        await conn.close()


async def test_update_on_the_written_columns_is_enough(bare: Database, tmp_path: Path) -> None:
    init = await cli(tmp_path, "init", env=bare.env())
    assert init.code == 0, init.output
    await bare.execute(
        GRANTS.format(role="backfill_columns").replace(
            "GRANT SELECT, UPDATE ON public.users TO backfill_columns",
            "GRANT SELECT ON public.users TO backfill_columns; "
            "GRANT UPDATE (display_name, touched) ON public.users TO backfill_columns",
        )
    )
    job = write_job(tmp_path, users_job(where="true"))
    run = await cli(tmp_path, "run", job, env=bare.env(
        BACKFILL_DATABASE_URL=url(bare, user="backfill_columns")))
    assert run.code == 0, run.output
    assert_no_secret(run)
    conn = await bare.connect()
    try:
        await exactly_once(conn, 1, ROWS)
    finally:
        await conn.close()


async def test_role_without_update_or_state_rights_gets_78_before_any_write(
    bare: Database, tmp_path: Path
) -> None:
    init = await cli(tmp_path, "init", env=bare.env())
    assert init.code == 0, init.output
    await bare.execute(GRANTS.format(role="backfill_reader")
                       .replace("SELECT, UPDATE ON public.users", "SELECT ON public.users"))
    await bare.execute("GRANT USAGE ON SCHEMA public TO backfill_stateless; "
                       "GRANT SELECT, UPDATE ON public.users TO backfill_stateless")
    job = write_job(tmp_path, users_job(where="true"))

    reader = await cli(tmp_path, "run", job, env=bare.env(
        BACKFILL_DATABASE_URL=url(bare, user="backfill_reader")))
    assert reader.code == 78, reader.output
    assert reader.errors() == [
        "backfill: error: permission denied: role backfill_reader lacks UPDATE on public.users"
    ]
    stateless = await cli(tmp_path, "run", job, env=bare.env(
        BACKFILL_DATABASE_URL=url(bare, user="backfill_stateless")))
    assert stateless.code == 78, stateless.output
    [error] = stateless.errors()
    assert "permission denied for schema backfill" in error, error
    assert_no_secret(reader, stateless)
    # Nothing was written: no checkpoint, no run, no row.
    assert await bare.fetchval("SELECT count(*) FROM backfill.checkpoints") == 0
    assert await bare.fetchval("SELECT count(*) FROM backfill.runs") == 0
    assert await bare.fetchval("SELECT max(touched) FROM users") == 0


async def test_password_never_appears_in_any_output(bare: Database, tmp_path: Path) -> None:
    await cli(tmp_path, "init", env=bare.env())
    await bare.execute(GRANTS.format(role="backfill_runner"))
    job = write_job(tmp_path, users_job(limits={"connect_timeout": "1s",
                                                "connect_retry_seconds": "500ms"}))
    dead_port = free_port()
    cases = {
        "wrong password": (url(bare, password=WRONG), 78, "authentication failed"),
        "wrong port": (url(bare, port=dead_port), 69, "refused"),
        "unknown host": (url(bare, host="no-such-host.invalid"), 69, "@no-such-host.invalid:"),
        # A password with unencoded '/', '#', '?' or '@' breaks the URL apart.
        "unencoded password": (
            f"postgresql://backfill_runner:{PASSWORD}@127.0.0.1:{bare.server.port}/{bare.name}",
            78, "backfill_database_url",
        ),
    }
    procs: list[Cli] = []
    for name, (dsn, code, message) in cases.items():
        for verb in (["run", job], ["status"]):
            proc = await cli(tmp_path, *verb, env=bare.env(BACKFILL_DATABASE_URL=dsn))
            procs.append(proc)
            assert proc.code == code, (name, verb, proc.output)
            [error] = proc.errors()
            assert message in error.lower(), (name, error)
    # The libpq variables, with the password in PGPASSWORD.
    libpq = {"PGHOST": "127.0.0.1", "PGPORT": str(bare.server.port), "PGUSER": "backfill_runner",
             "PGDATABASE": bare.name}
    env = {k: v for k, v in bare.env().items() if k != "BACKFILL_DATABASE_URL"}
    good = await cli(tmp_path, "run", job, env={**env, **libpq, "PGPASSWORD": PASSWORD})
    bad = await cli(tmp_path, "status", env={**env, **libpq, "PGPASSWORD": WRONG})
    assert (good.code, bad.code) == (0, 78), (good.output, bad.output)
    assert_no_secret(*procs, good, bad)


def _scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text: str = r.read().decode()
    except OSError:
        return None
    return text if "backfill" in text else None

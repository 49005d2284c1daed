"""Secrets from files, on a server that asks for passwords (scram): the libpq password file
(``PGPASSFILE``, ``~/.pgpass``) and ``BACKFILL_DATABASE_URL_FILE`` (a Kubernetes Secret mounted as
a file), read again at each reconnection so that a rotated password is picked up mid-run. No
output ever shows a password, nor the URL."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from backfill import sql
from backfill.pgtemp import TempPostgres
from tests.conftest import Database, users_job, write_job

from .credentials import (
    GRANTS,
    PASSWORD,
    ROLES,
    ROWS,
    WRONG,
    assert_no_secret,
    bare_database,
    require_passwords,
    url,
)
from .harness import Cli, cli, exactly_once
from .sessions import eventually, runner_backends, terminate

pytestmark = pytest.mark.anyio

ROTATED = "backfill_rotated"  # a role whose password this module changes
NAME = "users-display-name"


@pytest.fixture(scope="module")
def secured(own_pg: TempPostgres) -> Iterator[TempPostgres]:
    require_passwords(own_pg, (*ROLES, ROTATED))
    yield own_pg


@pytest.fixture
async def bare(secured: TempPostgres) -> AsyncIterator[Database]:
    """The state schema made by its owner, and the runner roles granted what README says."""
    db = await bare_database(secured)
    await db.execute(sql.INIT)
    await db.execute(GRANTS.format(role="backfill_runner"))
    await db.execute(GRANTS.format(role=ROTATED))
    yield db


def _private(path: Path, text: str) -> Path:
    """Write a secret file as a Secret volume would hold it: readable by its owner only,
    replaced whole (a reader sees the old content or the new, never half of it)."""
    new = path.with_name(path.name + ".new")
    new.write_text(text)
    new.chmod(0o600)
    os.replace(new, path)
    return path


def _escaped(password: str) -> str:
    return password.replace("\\", "\\\\").replace(":", "\\:")


def _libpq(db: Database, **extra: str) -> dict[str, str]:
    """The PG* variables for the runner role, without a password."""
    env = {k: v for k, v in db.env().items() if k != "BACKFILL_DATABASE_URL"}
    return env | {"PGHOST": "127.0.0.1", "PGPORT": str(db.server.port),
                  "PGUSER": "backfill_runner", "PGDATABASE": db.name} | extra


async def test_password_files(bare: Database, tmp_path: Path) -> None:
    job = write_job(tmp_path, users_job(where="true"))
    line = f"127.0.0.1:{bare.server.port}:{bare.name}:backfill_runner:{_escaped(PASSWORD)}\n"
    passfile = _private(tmp_path / "pgpass", f"# the runner's\n*:1:*:*:{WRONG}\n{line}")
    home = tmp_path / "home"
    home.mkdir()
    _private(home / ".pgpass", line)
    no_password = f"postgresql://backfill_runner@127.0.0.1:{bare.server.port}/{bare.name}"

    procs = [
        await cli(tmp_path, "run", job, env=_libpq(bare, PGPASSFILE=str(passfile))),
        await cli(tmp_path, "status", NAME, env=_libpq(bare, HOME=str(home))),
        await cli(tmp_path, "status", NAME, env=bare.env(
            BACKFILL_DATABASE_URL=no_password, PGPASSFILE=str(passfile))),
    ]
    for proc in procs:
        assert proc.code == 0, (proc.args, proc.output)
    conn = await bare.connect()
    try:
        await exactly_once(conn, 1, ROWS)
    finally:
        await conn.close()
    # A password file others may read is refused, saying so (libpq would ignore it).
    passfile.chmod(0o644)
    loose = await cli(tmp_path, "status", env=_libpq(bare, PGPASSFILE=str(passfile)))
    assert loose.code == 78, loose.output
    assert loose.errors() == [
        f"backfill: error: the password file {passfile} has group or world access: chmod 0600 it"
    ]
    assert_no_secret(*procs, loose)


async def test_url_file_is_read_again_at_each_reconnection(
    bare: Database, tmp_path: Path
) -> None:
    """The password rotates mid-run: the Secret's file changes, the old password stops working,
    and the runner's connection is cut; it reconnects with the file's new URL and finishes."""
    admin = await bare.connect()
    secret = _private(tmp_path / "url", url(bare, user=ROTATED) + "\n")
    env = {k: v for k, v in bare.env().items() if k != "BACKFILL_DATABASE_URL"}
    env["BACKFILL_DATABASE_URL_FILE"] = str(secret)
    job = write_job(tmp_path, users_job(where="true", batch={"size": 50, "sleep_seconds": 0.05}))
    run = await Cli(tmp_path, "run", job, env=env).start()
    try:
        await eventually(lambda: run.code is not None or admin.fetchval(
            "SELECT batches >= 3 FROM backfill.checkpoints WHERE job = $1", NAME), within=30)
        assert run.code is None, run.output
        await admin.execute(f"ALTER ROLE {ROTATED} PASSWORD '{WRONG}'")
        _private(secret, url(bare, user=ROTATED, password=WRONG) + "\n")
        for backend in await runner_backends(admin, NAME):
            await terminate(admin, backend["pid"])
        assert await run.wait(within=60) == 0, run.output
        await exactly_once(admin, 1, ROWS)
        runs = await admin.fetch("SELECT outcome FROM backfill.runs")
        assert [r["outcome"] for r in runs] == ["succeeded"]  # one run, reconnected
    finally:
        await run.aclose()
        await admin.close()
    assert any(e["msg"] == "connection lost; reconnecting" for e in run.log()), run.output
    assert_no_secret(run)


async def test_a_url_file_that_cannot_be_used_exits_78(bare: Database, tmp_path: Path) -> None:
    env = {k: v for k, v in bare.env().items() if k != "BACKFILL_DATABASE_URL"}
    unencoded = (f"postgresql://backfill_runner:{PASSWORD}@127.0.0.1:{bare.server.port}"
                 f"/{bare.name}")
    cases = {
        "missing": (tmp_path / "nowhere", None, "cannot read it: No such file or directory"),
        "empty": (tmp_path / "empty", "\n", "is empty"),
        "unencoded password": (tmp_path / "unencoded", unencoded, "cannot be parsed"),
    }
    procs = []
    for name, (path, text, message) in cases.items():
        if text is not None:
            _private(path, text)
        proc = await cli(tmp_path, "status", env=env | {"BACKFILL_DATABASE_URL_FILE": str(path)})
        procs.append(proc)
        assert proc.code == 78, (name, proc.output)
        [error] = proc.errors()
        assert error.startswith(f"backfill: error: BACKFILL_DATABASE_URL_FILE ({path})"), error
        assert message in error, (name, error)
    both = await cli(tmp_path, "status", env=env | {
        "BACKFILL_DATABASE_URL_FILE": str(tmp_path / "empty"),
        "BACKFILL_DATABASE_URL": url(bare)})
    assert both.code == 78 and "not both" in both.output, both.output
    assert_no_secret(*procs, both)

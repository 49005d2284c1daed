"""Hostile or broken job files are rejected before anything is written: exit 78 and a
one-line message that names the job-file field. The table is left untouched, and no
checkpoint or run is recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from backfill.errors import ConfigError, ExitCode
from backfill.job import load_job
from tests.conftest import Database, seed_users, users_job, write_job

from .harness import Cli, cli

pytestmark = pytest.mark.anyio

# Rejected by validation alone, before anything connects: (field, overrides).
INVALID: list[tuple[str, dict[str, Any]]] = [
    ("table", {"table": 'users"; DROP TABLE users; --'}),
    ("table", {"table": "users;drop"}),
    ("table", {"table": "üsers"}),
    ("table", {"table": "users\n"}),
    ("table", {"table": "public.users.id"}),
    ("table", {"table": ""}),
    ("key", {"key": 'id" FROM x --'}),
    ("key", {"key": "ïd"}),
    ("key", {"key": "id\n"}),
    ("key", {"key": ["id", "id"]}),
    ("key", {"key": []}),
    ("name", {"name": "users'); DROP TABLE users;--"}),
    ("name", {"name": "x" * 64}),
    ("set", {"set": "display_name = 'x'; DROP TABLE users"}),
    ("set", {"set": "   "}),
    ("where", {"where": "true; DELETE FROM users"}),
    ("on_row_error", {"on_row_error": "ignore"}),
    ("batch.size", {"batch": {"size": 10**12}}),
    ("batch.size", {"batch": {"size": 0}}),
    ("batch.sleep_seconds", {"batch": {"sleep_seconds": -1}}),
    ("batch.sise", {"batch": {"sise": 10}}),
    ("batch", {"batch": {"size": 10, "min_size": 100}}),
    ("limits.statement_timeout", {"limits": {"statement_timeout": "-5s"}}),
    ("limits.statement_timeout", {"limits": {"statement_timeout": "1 fortnight"}}),
    ("limits", {"limits": {"statement_timeout": "1s", "lock_timeout": "2s"}}),
    ("limits.max_retries", {"limits": {"max_retries": -1}}),
    ("limits.max_run_seconds", {"limits": {"max_run_seconds": 0}}),
]


@pytest.mark.parametrize(("field", "overrides"), INVALID,
                         ids=[f"{f}-{i}" for i, (f, _) in enumerate(INVALID)])
def test_invalid_job_file_names_the_field(
    tmp_path: Path, field: str, overrides: dict[str, Any]
) -> None:
    path = write_job(tmp_path, users_job(**overrides))
    with pytest.raises(ConfigError) as err:
        load_job(path)
    assert err.value.exit_code == ExitCode.CONFIG
    message = str(err.value)
    assert message.startswith(f"{path}: {field}: "), message
    assert "\n" not in message and "\r" not in message, message


async def test_hostile_jobs_exit_78_before_any_write(db: Database, tmp_path: Path) -> None:
    await seed_users(db, "generate_series(1, 1000)")
    await db.execute(
        "CREATE VIEW users_view AS SELECT * FROM users; "
        "CREATE UNIQUE INDEX users_display_name ON users (display_name); "
        "CREATE MATERIALIZED VIEW users_mv AS SELECT * FROM users"
    )
    cases: list[tuple[str, str, dict[str, Any]]] = [
        # (field, what the message says, overrides)
        ("table", "public.users_view is a view", {"table": "users_view"}),
        ("table", "public.users_mv is a materialized view", {"table": "users_mv"}),
        ("table", "public.nope does not exist", {"table": "nope"}),
        ("table", "public.Users does not exist", {"table": "Users"}),  # exact, case-sensitive
        ("key", "(first_name) is not unique", {"key": "first_name"}),
        ("key", "column display_name of public.users allows NULL", {"key": "display_name"}),
        ("key", "column nope does not exist", {"key": "nope"}),
        ("set", "", {"set": "nope = 1"}),
        ("where", "", {"where": "nope IS NULL"}),
        # Fragments that would comment out or quote away the batch's own key range.
        ("set", "", {"set": "display_name = 'x' /*", "where": "*/ , touched = touched + (1"}),
        ("set", "", {"set": "display_name = 'x", "where": "' , touched = touched + (1"}),
        ("where", "", {"where": "true) OR (true"}),
        # Two from the validation table, end to end.
        ("table", "not a plain identifier", {"table": 'users"--'}),
        ("batch.sleep_seconds", "", {"batch": {"sleep_seconds": -1}}),
    ]
    procs: list[tuple[str, str, Cli]] = []
    limit = anyio.CapacityLimiter(3)

    async def one(n: int, field: str, says: str, overrides: dict[str, Any]) -> None:
        path = write_job(tmp_path, users_job(**{"where": "true", **overrides}),
                         filename=f"job{n}.toml")
        async with limit:
            procs.append((field, says, await cli(tmp_path, "run", path, env=db.env())))

    async with anyio.create_task_group() as tg:
        for n, (field, says, overrides) in enumerate(cases):
            tg.start_soon(one, n, field, says, overrides)

    for field, says, proc in procs:
        assert proc.code == 78, (field, says, proc.output)
        [error] = proc.errors()
        assert len(proc.stderr.splitlines()) <= 2, proc.stderr  # the error, maybe a log line
        # The field: "path: field: ..." from validation, "set/where: ... (in field)" from the
        # server, "field: ..." from the catalog.
        assert f" {field}: " in error or f"(in {field})" in error, error
        assert says in error, (says, error)
    conn: asyncpg.Connection = await db.connect()
    try:
        assert await conn.fetchval("SELECT max(touched) FROM users") == 0
        assert await conn.fetchval("SELECT count(*) FROM users WHERE display_name IS NOT NULL") == 0
        assert await conn.fetchval("SELECT count(*) FROM backfill.checkpoints") == 0
        assert await conn.fetchval("SELECT count(*) FROM backfill.runs") == 0
    finally:
        await conn.close()

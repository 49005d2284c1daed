"""Test harness: one real PostgreSQL per session on a free port, a template database with the
state schema, and a fresh database per test (CREATE DATABASE ... TEMPLATE is fast)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
from pydantic import SecretStr

from backfill import sql
from backfill.conninfo import ConnectParams
from backfill.pgtemp import TempPostgres

REPO = Path(__file__).resolve().parent.parent
_counter = itertools.count()
# The PostgreSQL the suite runs on: the bin directory of its initdb/pg_ctl (.ci/run runs parts
# of the suite on each supported major version); unset, the machine's own.
BINDIR = os.environ.get("BACKFILL_TEST_PG_BINDIR") or None


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"  # asyncpg is asyncio-only


def temp_server(*, fast: bool = True, **options: Any) -> TempPostgres:
    """A test server (not started) on the suite's PostgreSQL (``BACKFILL_TEST_PG_BINDIR``);
    ``fast``: fsync and synchronous_commit off."""
    return TempPostgres(fast=fast, bindir=Path(BINDIR) if BINDIR else None, **options)


@contextmanager
def serving(*, fast: bool = True, **options: Any) -> Iterator[TempPostgres]:
    """A test server of its own (``temp_server``'s options), with the template database, for
    the block."""
    with temp_server(fast=fast, **options) as server:
        create_template(server)
        yield server


@pytest.fixture(scope="session")
def pg() -> Iterator[TempPostgres]:
    with serving() as server:
        yield server


def create_template(server: TempPostgres) -> None:
    """Create ``backfill_template``: an empty database with the state schema."""

    async def go() -> None:
        conn = await asyncpg.connect(server.dsn())
        await conn.execute("CREATE DATABASE backfill_template")
        await conn.close()
        conn = await asyncpg.connect(server.dsn("backfill_template"))
        await conn.execute(sql.INIT)
        await conn.close()

    anyio.run(go, backend="asyncio")


@dataclass(frozen=True)
class Database:
    """A fresh database for one test."""

    server: TempPostgres
    name: str

    @property
    def dsn(self) -> str:
        return self.server.dsn(self.name)

    @property
    def params(self) -> ConnectParams:
        return ConnectParams(dsn=SecretStr(self.dsn))

    async def connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.dsn)

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        conn = await self.connect()
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()

    async def fetchval(self, query: str, *args: Any) -> Any:
        conn = await self.connect()
        try:
            return await conn.fetchval(query, *args)
        finally:
            await conn.close()

    async def execute(self, query: str, *args: Any) -> str:
        conn = await self.connect()
        try:
            return await conn.execute(query, *args)
        finally:
            await conn.close()

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a CLI subprocess pointed at this database."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "BACKFILL_"))}
        env.pop("DATABASE_URL", None)
        env["BACKFILL_DATABASE_URL"] = self.dsn
        # No metrics endpoint on the default port (9477) unless a test asks for one: runs in
        # parallel would race for it, and a test suite should not listen on all interfaces.
        env["BACKFILL_METRICS_PORT"] = "0"
        env.update(extra)
        return env


@pytest.fixture
async def db(pg: TempPostgres) -> AsyncIterator[Database]:
    database = await new_database(pg)
    yield database
    admin = await asyncpg.connect(pg.dsn())
    try:
        await admin.execute(f'DROP DATABASE "{database.name}" WITH (FORCE)')
    finally:
        await admin.close()


async def new_database(server: TempPostgres, *, template: str = "backfill_template") -> Database:
    """A database of its own on ``server``, cloned from ``template``."""
    name = f"t{os.getpid()}_{next(_counter)}"
    admin = await asyncpg.connect(server.dsn())
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await admin.close()
    return Database(server, name)


def write_job(directory: Path, fields: Mapping[str, Any], *, filename: str = "job.toml") -> Path:
    """Write a job file from a dict (nested dicts become TOML tables)."""
    lines: list[str] = []
    tables: list[str] = []
    for key, value in fields.items():
        if isinstance(value, Mapping):
            tables.append(f"\n[{key}]")
            tables += [f"{k} = {_toml(v)}" for k, v in value.items()]
        else:
            lines.append(f"{key} = {_toml(value)}")
    path = directory / filename
    path.write_text("\n".join(lines + tables) + "\n")
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    import json

    return json.dumps(str(value))


def cli(
    *args: str | Path, env: Mapping[str, str], timeout: float = 120, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would (a real process), returning its output and exit code."""
    return subprocess.run(
        [sys.executable, "-m", "backfill", *map(str, args)],
        env=dict(env), capture_output=True, text=True, timeout=timeout, check=check, cwd=REPO,
    )


def popen(*args: str | Path, env: Mapping[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "backfill", *map(str, args)],
        env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )


USERS = """
CREATE TABLE public.users (
    id           bigint PRIMARY KEY,
    first_name   text NOT NULL,
    last_name    text NOT NULL,
    display_name text,
    touched      int NOT NULL DEFAULT 0
);
"""


async def seed_users(db: Database, ids: str = "generate_series(1, 1000)") -> int:
    """Create public.users with the given ids; ``touched`` counts updates per row."""
    await db.execute(USERS)
    status = await db.execute(
        f"INSERT INTO public.users (id, first_name, last_name) "
        f"SELECT g, 'first' || g, 'last' || g FROM {ids} AS s(g)"
    )
    return int(status.split()[-1])


def users_job(**overrides: Any) -> dict[str, Any]:
    """A job over public.users that counts every application in ``touched``."""
    job: dict[str, Any] = {
        "name": "users-display-name",
        "table": "public.users",
        "key": "id",
        "set": "display_name = first_name || ' ' || last_name, touched = touched + 1",
        "where": "display_name IS NULL",
        "batch": {"size": 100},
        "limits": {"statement_timeout": "5s", "lock_timeout": "1s"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(job.get(key), dict):
            job[key] = {**job[key], **value}
        else:
            job[key] = value
    return job


async def eventually(
    probe: Callable[[], Awaitable[Any]], *, within: float = 30.0, interval: float = 0.05
) -> Any:
    """Poll ``probe`` (a condition outside this process, e.g. in the database) until it returns
    something truthy; fail after ``within`` seconds."""
    with anyio.fail_after(within):
        while True:
            value = await probe()
            if value:
                return value
            await anyio.sleep(interval)

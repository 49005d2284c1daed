"""The benchmark's PostgreSQL: a throwaway server with fsync on, users-like tables seeded once
into template databases, a fresh copy of one for every run, and what pg_stat_statements says
about a run."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from backfill import sql
from backfill.pgtemp import TempPostgres, find_bindir, has_module

RUN_DB = "bench"
# Durable like production (fsync, synchronous_commit and full_page_writes stay on); a cache that
# holds the 1M-row table; no checkpoint in the middle of a run (every reset ends with one).
SETTINGS = {
    "shared_buffers": "'1GB'",
    "max_wal_size": "'16GB'",
    "checkpoint_timeout": "'1h'",
    "pg_stat_statements.track": "'all'",
}
STATEMENTS = {"shared_preload_libraries": "'pg_stat_statements'"}

TABLE = """
CREATE TABLE public.users (
    id           bigint NOT NULL,
    first_name   text NOT NULL,
    last_name    text NOT NULL,
    email        text NOT NULL,
    address      text NOT NULL,
    display_name text
)"""
# About 150 bytes a row with the tuple header; display_name adds ~25 when filled.
FILL = """
INSERT INTO public.users (id, first_name, last_name, email, address, display_name)
SELECT {ids}, 'first' || g, 'last' || g, 'user' || g || '@example.com',
       md5(g::text) || md5((g + 1)::text), {display}
FROM generate_series(1, $1::int8) g"""
SET_ = "display_name = first_name || ' ' || last_name"
WHERE = "display_name IS NULL"

# Key layouts: dense ids; sparse ids (gaps of ~1000, and a jump of 10^12 halfway).
DENSE = "g"
SPARSE = "g * 1000 + (g * 7919) % 997 + CASE WHEN g > $1 / 2 THEN 1000000000000 ELSE 0 END"
# Only 1% of the rows still need the change.
ONE_PERCENT = "CASE WHEN g % 100 = 0 THEN NULL ELSE 'done ' || g END"


@dataclass(frozen=True, slots=True)
class Seed:
    name: str
    rows: int
    ids: str = DENSE
    display: str = "NULL"

    @property
    def database(self) -> str:
        return f"seed_{self.name}"


@dataclass
class Bench:
    """The server, an admin connection, and a connection to the current run's database."""

    pg: TempPostgres
    admin: asyncpg.Connection
    statements: bool
    prewarm: bool
    setup: list[str] = field(default_factory=list)
    seeds: dict[str, Seed] = field(default_factory=dict)
    _conn: asyncpg.Connection | None = None

    @property
    def dsn(self) -> str:
        return self.pg.dsn(RUN_DB)

    @property
    def conn(self) -> asyncpg.Connection:
        assert self._conn is not None, "reset() first"
        return self._conn

    async def connect(self, database: str = RUN_DB) -> asyncpg.Connection:
        return await asyncpg.connect(self.pg.dsn(database), command_timeout=3600)

    async def seed(self, seed: Seed) -> float:
        """Create a template database holding a filled, vacuumed ``public.users``."""
        t0 = time.perf_counter()
        await self.admin.execute(f"CREATE DATABASE {seed.database}")
        conn = await self.connect(seed.database)
        try:
            for statement in self.setup:
                await conn.execute(statement)
            await conn.execute(TABLE)
            await conn.execute(FILL.format(ids=seed.ids, display=seed.display), seed.rows)
            await conn.execute("ALTER TABLE public.users ADD PRIMARY KEY (id)")
            await conn.execute("VACUUM (FREEZE, ANALYZE) public.users")
        finally:
            await conn.close()
        self.seeds[seed.name] = seed
        return time.perf_counter() - t0

    async def reset(self, seed: str = "users") -> float:
        """A fresh copy of a seeded database as the run database: the column to fill is NULL,
        the table vacuumed and in the cache, no checkpoint of the runner, no statement
        statistics, and a CHECKPOINT just done (copying a database does one). Returns seconds."""
        t0 = time.perf_counter()
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
        await self.admin.execute(f"DROP DATABASE IF EXISTS {RUN_DB} WITH (FORCE)")
        await self.admin.execute(
            f"CREATE DATABASE {RUN_DB} TEMPLATE {self.seeds[seed].database} STRATEGY FILE_COPY"
        )
        self._conn = await self.connect()
        if self.prewarm:
            await self._conn.execute(
                "SELECT pg_prewarm('public.users'), pg_prewarm('public.users_pkey')"
            )
        await self.forget_statements()
        return time.perf_counter() - t0

    async def drop_seed(self, seed: str) -> None:
        await self.admin.execute(f"DROP DATABASE IF EXISTS {self.seeds.pop(seed).database}")

    async def forget_statements(self) -> None:
        if self.statements:
            try:
                await self.conn.execute("SELECT pg_stat_statements_reset()")
            except asyncpg.UndefinedFunctionError:  # dropped for a canary-only run
                pass

    async def statement_stats(self, pattern: str) -> dict[str, float] | None:
        """Calls, rows, mean/max/total milliseconds of the run database's statements whose text
        matches ``pattern`` (LIKE), summed over entries (top-level and nested); None without
        pg_stat_statements (on the server, or in the run database)."""
        if not self.statements:
            return None
        try:
            row = await self._statements_row(pattern)
        except asyncpg.UndefinedTableError:  # dropped for a canary-only run (the frontier)
            return None
        if row is None or not row["calls"]:
            return None
        return {
            "calls": row["calls"],
            "rows": row["rows"],
            "total_ms": row["total_ms"],
            "mean_ms": row["total_ms"] / row["calls"],
            "max_ms": row["max_ms"],
        }

    async def _statements_row(self, pattern: str) -> asyncpg.Record | None:
        return await self.conn.fetchrow(
            """
            SELECT sum(calls)::int8 AS calls, sum(rows)::int8 AS rows,
                   sum(total_exec_time) AS total_ms, max(max_exec_time) AS max_ms
            FROM pg_stat_statements
            WHERE query LIKE $1
              AND dbid = (SELECT oid FROM pg_database WHERE datname = current_database())""",
            pattern,
        )

    async def checkpoint_row(self, job: str) -> dict[str, Any] | None:
        """The runner's saved counters and its last run's duration (server clock)."""
        row = await self.conn.fetchrow(
            f"""
            SELECT c.rows_updated, c.batches, c.state,
                   extract(epoch FROM r.ended_at - r.started_at)::float8 AS run_seconds
            FROM {sql.SCHEMA}.checkpoints c
            LEFT JOIN LATERAL (
                SELECT * FROM {sql.SCHEMA}.runs r WHERE r.job = c.job ORDER BY id DESC LIMIT 1
            ) r ON true
            WHERE c.job = $1 AND c.shard = 0""",
            job,
        )
        return dict(row) if row is not None else None

    async def version(self) -> str:
        return str(await self.admin.fetchval("SHOW server_version"))


async def open_bench(setup: list[str]) -> Bench:
    """Start the server (pg_stat_statements when the contrib module is installed).

    ``setup`` runs in every seeded database (the state schema, the baselines' procedure).
    """
    bindir = find_bindir()
    statements, prewarm = has_module(bindir, "pg_stat_statements"), has_module(bindir, "pg_prewarm")
    pg = TempPostgres(fast=False, settings=SETTINGS | (STATEMENTS if statements else {}))
    pg.start()
    try:
        admin = await asyncpg.connect(pg.dsn(), command_timeout=3600)
        if statements:
            setup = ["CREATE EXTENSION IF NOT EXISTS pg_stat_statements", *setup]
        if prewarm:
            setup = ["CREATE EXTENSION IF NOT EXISTS pg_prewarm", *setup]
    except BaseException:
        pg.stop()
        raise
    return Bench(
        pg=pg, admin=admin, statements=statements, prewarm=prewarm, setup=[sql.INIT, *setup]
    )


async def close_bench(bench: Bench) -> None:
    try:
        if bench._conn is not None:
            await bench._conn.close(timeout=5)
        await bench.admin.close(timeout=5)
    finally:
        bench.pg.stop()


def machine() -> dict[str, Any]:
    def first(path: str, prefix: str) -> str | None:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return None

    mem = first("/proc/meminfo", "MemTotal")
    return {
        "cpu": first("/proc/cpuinfo", "model name") or platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "memory_gb": round(int(mem.split()[0]) / 1024 / 1024, 1) if mem else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None

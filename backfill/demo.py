"""``backfill demo``: a throwaway PostgreSQL, a seeded table, a real run with live progress."""

from __future__ import annotations

import sys
import time

import anyio
import asyncpg
from pydantic import SecretStr

from backfill import commands
from backfill.errors import Unavailable
from backfill.job import Job, parse_job
from backfill.pgtemp import ServerUnavailable, TempPostgres
from backfill.settings import ConnectParams

TABLE = """
CREATE TABLE public.users (
    id           bigint PRIMARY KEY,
    first_name   text NOT NULL,
    last_name    text NOT NULL,
    email        text NOT NULL,
    display_name text
)"""
ROWS = """
INSERT INTO public.users (id, first_name, last_name, email)
SELECT g, 'first' || g, 'last' || g, 'user' || g || '@example.com'
FROM generate_series(1, $1::int8) g"""


def demo_job(batch_size: int) -> Job:
    return parse_job(
        {
            "name": "users-display-name",
            "table": "public.users",
            "key": "id",
            "set": "display_name = first_name || ' ' || last_name",
            "where": "display_name IS NULL",
            "batch": {"size": batch_size, "max_size": max(batch_size, 100_000)},
        },
        source="demo",
    )


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def _demo(pg: TempPostgres, rows: int, batch_size: int) -> None:
    params = ConnectParams(dsn=SecretStr(pg.dsn()))
    conn = await asyncpg.connect(pg.dsn())
    try:
        say(f"seeding {rows:,} rows into public.users ...")
        t0 = time.perf_counter()
        await conn.execute(TABLE)
        await conn.execute(ROWS, rows)
        await conn.execute("VACUUM ANALYZE public.users")
        say(f"seeded in {time.perf_counter() - t0:.1f}s")
    finally:
        await conn.close()
    job = demo_job(batch_size)
    await commands.init(params)
    say(f"running job {job.name}: SET {job.set} WHERE {job.where}, {batch_size} keys a batch")
    t0 = time.perf_counter()
    ckpt = await commands.run(job, params)
    seconds = time.perf_counter() - t0
    left = await commands.verify(job, params)
    say(
        f"done: {ckpt.rows_updated:,} rows in {ckpt.batches:,} batches, {seconds:.1f}s "
        f"({ckpt.rows_updated / max(seconds, 1e-9):,.0f} rows/s); verify: {left} rows left"
    )


def main(*, rows: int, batch_size: int) -> None:
    try:
        pg = TempPostgres(fast=False).start()
    except ServerUnavailable as exc:
        raise Unavailable(str(exc)) from exc
    say(f"throwaway PostgreSQL on 127.0.0.1:{pg.port} ({pg.bindir})")
    try:
        anyio.run(_demo, pg, rows, batch_size, backend="asyncio")
    finally:
        pg.stop()

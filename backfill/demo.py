"""``backfill demo``: a throwaway PostgreSQL, a seeded table, a real run with live progress and
its metrics served; with ``keep``, the server stays up afterwards (with a second job, not run
yet) for trying every verb against it, until Ctrl-C stops and removes it."""

from __future__ import annotations

import signal
import socket
import sys
import time
from dataclasses import replace

import anyio
import asyncpg
from pydantic import SecretStr

from backfill import commands
from backfill.conninfo import ConnectParams
from backfill.errors import Unavailable
from backfill.job import Job, parse_job
from backfill.pgtemp import ServerUnavailable, TempPostgres, free_port
from backfill.settings import DEFAULT_METRICS_PORT, Telemetry

TABLE = """
CREATE TABLE public.users (
    id           bigint PRIMARY KEY,
    first_name   text NOT NULL,
    last_name    text NOT NULL,
    email        text NOT NULL,
    display_name text,
    email_domain text
)"""
ROWS = """
INSERT INTO public.users (id, first_name, last_name, email)
SELECT g, 'first' || g, 'last' || g, 'user' || g || '@example' || g % 7 || '.com'
FROM generate_series(1, $1::int8) g"""
# The job left to try with `keep`: paced, so that there is time to pause it, `set` it, watch it.
EXPLORE = """\
# A second job on the demo's table, not run yet: `backfill run` this file, and meanwhile try
# `backfill status --watch`, `pause`, `resume` and `set` (see the README's tour).
name  = "users-email-domain"
table = "public.users"
key   = "id"
set   = "email_domain = split_part(email, '@', 2)"
where = "email_domain IS NULL"

[batch]
size          = 1000
sleep_seconds = 0.02
"""


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


def metrics_port(wanted: int) -> int:
    """``wanted``, or (for the default port, when something else has it) a free one."""
    if wanted != DEFAULT_METRICS_PORT:
        return wanted
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", wanted))
        except OSError:
            return free_port()
    return wanted


async def _demo(pg: TempPostgres, rows: int, job: Job, telemetry: Telemetry) -> None:
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
    await commands.init(params)
    say(f"running job {job.name}: SET {job.set} WHERE {job.where}, {job.batch.size} keys a batch")
    if telemetry.metrics_port:
        say(f"metrics while it runs: http://127.0.0.1:{telemetry.metrics_port}/metrics")
    t0 = time.perf_counter()
    ckpt = await commands.run(job, params, telemetry=telemetry)
    seconds = time.perf_counter() - t0
    left = await commands.verify(job, params)
    say(
        f"done: {ckpt.rows_updated:,} rows in {ckpt.batches:,} batches, {seconds:.1f}s "
        f"({ckpt.rows_updated / max(seconds, 1e-9):,.0f} rows/s); verify: {left} rows left"
    )


def _kept(pg: TempPostgres) -> None:
    """Say how to use the server, then hold it until Ctrl-C (or SIGTERM)."""
    assert pg.root is not None
    explore = pg.root / "users_email_domain.toml"
    explore.write_text(EXPLORE)
    say(
        "\nThe throwaway server stays up until Ctrl-C. In another terminal:\n\n"
        f"  export BACKFILL_DATABASE_URL='{pg.dsn()}'\n"
        "  backfill status users-display-name          # the run that just finished\n"
        f"  backfill run {explore}\n"
        "      # another job, paced: meanwhile try\n"
        "  backfill status --watch\n"
        "  backfill pause users-email-domain           # and `backfill resume users-email-domain`\n"
        "  backfill set users-email-domain batch.sleep_seconds=0 batch.size=5000\n"
    )
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            signal.pause()
    except KeyboardInterrupt:
        say("stopping the throwaway server and removing its data")


def main(*, rows: int, batch_size: int, keep: bool, telemetry: Telemetry) -> None:
    job = demo_job(batch_size)  # bad input fails before a server starts
    telemetry = replace(telemetry, metrics_address="127.0.0.1",
                        metrics_port=metrics_port(telemetry.metrics_port))
    try:
        pg = TempPostgres(fast=False).start()
    except ServerUnavailable as exc:
        raise Unavailable(str(exc)) from exc
    say(f"throwaway PostgreSQL on 127.0.0.1:{pg.port} ({pg.bindir}), data in {pg.root}")
    try:
        anyio.run(_demo, pg, rows, job, telemetry, backend="asyncio")
        if keep:
            _kept(pg)
    finally:
        pg.stop()

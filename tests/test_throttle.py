"""Adaptive batch size, the rate ceiling and the health gates, on real PostgreSQL.

Timing is measured from the database side where it can be (a trigger logs every commit and
state change by the server's clock), and asserted with room for a loaded machine.
"""

from __future__ import annotations

import logging
import statistics
from typing import Any

import anyio
import asyncpg
import pytest

from backfill import commands
from backfill.job import parse_job
from tests.conftest import Database, seed_users, users_job
from tests.throttle_support import (
    Watch,
    cheap_then_expensive_set,
    install_log,
    poll,
    read_log,
    running,
)

pytestmark = pytest.mark.anyio
log = logging.getLogger(__name__)


async def test_adaptive_size_keeps_batches_near_the_target(db: Database) -> None:
    cheap, expensive, target = 20_000, 2_000, 0.1
    await seed_users(db, f"generate_series(1, {cheap + expensive})")
    job = parse_job(users_job(
        set=cheap_then_expensive_set(cheap),
        batch={"size": 200, "min_size": 20, "max_size": 5000, "target_seconds": target},
    ))
    watch = Watch()
    with anyio.fail_after(60):
        ckpt = await commands.run(job, db.params, observers=[watch])
    assert ckpt.rows_updated == cheap + expensive
    results = [r for _, r in watch.commits]
    assert all(20 <= r.size <= 5000 for r in results)
    first: list[float] = []
    second: list[float] = []
    previous = 0
    for i, r in enumerate(results):
        assert r.cursor is not None
        last = int(r.cursor[0])
        if i >= 10:  # warm-up
            if last <= cheap:
                first.append(r.seconds)
            elif previous >= cheap:
                second.append(r.seconds)
        previous = last
    medians = statistics.median(first), statistics.median(second)
    sizes = [r.size for r in results]
    log.info(
        "adaptive sizing: medians %.3f s (cheap, %d batches), %.3f s (expensive, %d batches); "
        "sizes %s", medians[0], len(first), medians[1], len(second), sizes,
    )
    assert len(first) >= 5 and len(second) >= 5, (first, second)
    for median in medians:
        assert target * 0.7 <= median <= target * 1.3, (medians, sizes)
    # The sizes follow the cost: expensive rows get much smaller batches.
    assert statistics.median(sizes[-5:]) * 3 < max(sizes)


async def test_rate_ceiling(db: Database) -> None:
    # The issue asks for 100k rows at 5000 rows/s (20 s); 20k rows keep the suite fast and
    # still give 50 batches to check every window of.
    rows, size, ceiling = 20_000, 400, 5000.0
    await seed_users(db, f"generate_series(1, {rows})")
    await install_log(db)
    job = parse_job(users_job(batch={"size": size}, limits={"max_rows_per_second": ceiling}))
    watch = Watch()
    with anyio.fail_after(30):
        await commands.run(job, db.params, observers=[watch])
    commits = [e for e in await read_log(db) if e.batches is not None]
    assert sum(e.rows or 0 for e in commits) == rows
    at = [(e.at - commits[0].at).total_seconds() for e in commits]
    done = [e.rows or 0 for e in commits]
    average = sum(done[1:]) / at[-1]
    log.info("rate ceiling %.0f: measured %.0f rows/s over %d batches", ceiling, average, len(at))
    assert ceiling * 0.9 <= average <= ceiling * 1.01, average
    # Over any window between two commits, at most one batch more than the ceiling allows
    # (plus 2 ms for the two clocks involved).
    for i in range(len(at)):
        for j in range(i + 1, len(at)):
            assert sum(done[i + 1 : j + 1]) <= ceiling * (at[j] - at[i] + 0.002) + size, (i, j)
    assert watch.throttle_seconds["rate_limit"] > 1.0


async def test_health_query_holds_every_batch_while_false(db: Database) -> None:
    await seed_users(db, "generate_series(1, 4000)")
    await db.execute("CREATE TABLE public.health (ok boolean NOT NULL)")
    await db.execute("INSERT INTO public.health VALUES (true)")
    await install_log(db)
    check_every = 0.1
    job = parse_job(users_job(
        batch={"size": 50, "sleep_seconds": 0.02},
        throttle={"check_every": check_every, "health_query": "SELECT ok FROM public.health"},
    ))
    watch = Watch()
    async with running(job, db, watch) as outcome:
        await watch.until(lambda: len(watch.commits) >= 5, within=20)
        flipped = await db.fetchval(
            "UPDATE public.health SET ok = false RETURNING clock_timestamp()"
        )
        # The runner notices at its next check and re-checks every check_every.
        await watch.until(lambda: watch.count("health_query") >= 5, within=20)
        assert await db.fetchval(
            "SELECT state FROM backfill.checkpoints"
        ) == "throttled"
        back = await db.fetchval(
            "UPDATE public.health SET ok = true RETURNING clock_timestamp()"
        )
    assert outcome[0].state == "succeeded" and outcome[0].rows_updated == 4000
    entries = await read_log(db)
    held = next(e for e in entries if e.state == "throttled")
    resumed = next(e for e in entries if e.state == "running" and e.at > held.at)
    commits = [e for e in entries if e.batches is not None]
    # From the database's side: no batch committed while the runner was held ...
    assert not [e for e in commits if held.at < e.at < resumed.at]
    assert flipped < held.at and resumed.at > back
    # ... and it noticed within about one check_every of the flip (a loaded machine may
    # stretch that; the bound only guards against not checking at all).
    late = [e for e in commits if flipped < e.at < held.at]
    log.info("health_query: %d batches committed between the flip and the hold (%.3f s)",
             len(late), (held.at - flipped).total_seconds())
    assert (held.at - flipped).total_seconds() < 2.0
    assert await db.fetchval("SELECT count(*) FROM users WHERE touched <> 1") == 0
    assert watch.throttle_seconds["health_query"] >= 4 * check_every * 0.9


async def test_active_sessions_gate(db: Database) -> None:
    await seed_users(db, "generate_series(1, 2000)")
    await install_log(db)
    job = parse_job(users_job(
        batch={"size": 50, "sleep_seconds": 0.01},
        throttle={"check_every": 0.1, "max_active_sessions": 2},
    ))
    watch = Watch()
    busy: list[asyncpg.Connection] = []

    async def sleeper(conn: asyncpg.Connection) -> None:
        try:
            await conn.execute("SELECT pg_sleep(60)")
        except asyncpg.QueryCanceledError:
            pass

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(_run, job, db, watch)
            await watch.until(lambda: len(watch.commits) >= 3, within=20)
            busy = [await db.connect() for _ in range(3)]
            for conn in busy:
                tg.start_soon(sleeper, conn)
            await watch.until(lambda: watch.count("active_sessions") >= 3, within=20)
            held = len(watch.commits)
            await db.execute(
                "SELECT pg_cancel_backend(pid) FROM pg_stat_activity "
                "WHERE query = 'SELECT pg_sleep(60)'"
            )
            await poll(lambda: _state_is(db, "running"), within=20)
    for conn in busy:
        await conn.close()
    assert len(watch.commits) > held
    assert watch.throttle_seconds["active_sessions"] > 0.2
    assert await db.fetchval("SELECT count(*) FROM users WHERE touched <> 1") == 0


async def _run(job: Any, db: Database, watch: Watch) -> None:
    await commands.run(job, db.params, observers=[watch])


async def _state_is(db: Database, state: str) -> bool:
    return bool(await db.fetchval("SELECT state FROM backfill.checkpoints") in (state, "succeeded"))

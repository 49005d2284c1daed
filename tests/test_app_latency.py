"""``[throttle.app_latency]``: the application's own latency, read from a real Prometheus that
scrapes the application's metrics (here a gauge this test sets), holds the run while it is
over its max, or cuts the impact budget's rate; a query that cannot work is the job's error.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry, Gauge

from backfill import commands
from backfill.errors import ConfigError
from backfill.job import AppLatency, parse_job
from backfill.throttling import impact, prometheus
from tests.conftest import Database, eventually, seed_users, users_job
from tests.observability import Server, scraped
from tests.throttle_support import Watch, running

pytestmark = pytest.mark.anyio


@contextmanager
def application() -> Iterator[tuple[Gauge, Server]]:
    """An application's latency gauge, served on a free port and scraped every second."""
    registry = CollectorRegistry()
    gauge = Gauge("app_db_seconds", "the application's latency", registry=registry)
    with scraped(registry) as prom:
        yield gauge, prom


def _seen(prom: Server, value: float) -> bool:
    found = prom.query("app_db_seconds")
    return bool(found) and math.isclose(float(found[0]["value"][1]), value)


async def _scraped(prom: Server, value: float) -> None:
    """Until Prometheus has scraped ``value`` (on its own clock: polled)."""
    await eventually(lambda: anyio.to_thread.run_sync(_seen, prom, value), within=20,
                     interval=0.2)


def _job(prom: Server, **throttle: Any) -> dict[str, Any]:
    app = {"prometheus": prom.url, "query": "max(app_db_seconds)", "max": "50ms", "every": "1s"}
    return users_job(batch={"size": 50, "sleep_seconds": 0.01},
                     throttle={"check_every": 0.2, "app_latency": app, **throttle})


async def test_holds_while_the_application_is_over_its_latency(db: Database) -> None:
    await seed_users(db, "generate_series(1, 2000)")
    with application() as (gauge, prom):
        gauge.set(0.2)
        await _scraped(prom, 0.2)
        watch = Watch()
        async with running(parse_job(_job(prom)), db, watch) as outcome:
            await watch.until(lambda: watch.count("app_latency") >= 5, within=20)
            assert not watch.commits  # held from before the first batch
            assert await db.fetchval("SELECT state FROM backfill.checkpoints") == "throttled"
            gauge.set(0.01)
    assert outcome[0].state == "succeeded" and outcome[0].rows_updated == 2000
    assert watch.throttle_seconds["app_latency"] >= 1.0


async def test_a_query_that_answers_no_number_stops_run_and_plan(db: Database) -> None:
    await seed_users(db, "generate_series(1, 100)")
    with application() as (gauge, prom):
        gauge.set(0.01)
        await _scraped(prom, 0.01)
        for query, says in [("app_db_secondz", "returned no series"),
                            ("app_db_seconds[", "refused the app_latency query")]:
            job = parse_job(_job(prom) | {"throttle": {"app_latency": {
                "prometheus": prom.url, "query": query, "max": "50ms"}}})
            for command in (commands.run, commands.plan):
                with pytest.raises(ConfigError, match=r"\[throttle.app_latency\] .*" + says):
                    await command(job, db.params)
    # ... and changed nothing.
    assert await db.fetchval("SELECT count(*) FROM users WHERE touched <> 0") == 0
    assert await db.fetchval("SELECT to_regclass('backfill.checkpoints') IS NULL "
                             "OR NOT EXISTS (SELECT FROM backfill.checkpoints)")


async def test_out_of_reach_is_a_check_error_within_its_budget() -> None:
    config = AppLatency(prometheus="http://10.255.255.1:9", query="up", max=0.05)
    start = time.monotonic()
    with pytest.raises(prometheus.Unreadable):
        await prometheus.app_latency(config, 0.3)
    assert time.monotonic() - start < 2.0


def test_a_clear_over_reading_cuts_below_the_pace_it_measured_and_marks_that_bad() -> None:
    budget = impact.Controller(limit=1.2, rate=10_000.0, others=True)
    # A reading whose span began before the runner's first batch judges no pace of its own.
    budget.worked(95.0, 1.0, 8_000)
    assert not budget.app_read(96.0, 2.0, 5.0) and budget.rate == 10_000.0
    for end in range(96, 101):  # 8,000 rows/s over the reading's span
        budget.worked(float(end), 1.0, 8_000)
    assert budget.app_read(100.0, 2.0, 5.0)  # twice its max: the deepest cut
    assert budget.rate == 8_000.0 * impact.DOWN[0] and budget._bad == 8_000.0
    for end in range(101, 111):  # the next spans, at the rate cut to (4,000 rows/s)
        budget.worked(float(end), 1.0, 4_000)
    # A little over once may be the application's own noise: nothing changes ...
    assert not budget.app_read(105.0, 1.05, 5.0) and budget.rate == 4_000.0
    assert budget.app_read(110.0, 1.05, 5.0)  # ... twice in a row: the mildest cut
    assert budget.rate == 4_000.0 * impact.DOWN[1] and budget._bad == 4_000.0

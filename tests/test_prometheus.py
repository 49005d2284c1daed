"""The real thing: Debian's prometheus scrapes a live `backfill run` process, and its
prometheus-pushgateway receives the pushes. Skipped when the binaries are missing (.ci/run
installs them)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import anyio
import pytest
from anyio.abc import Process

from backfill.pgtemp import free_port
from tests.conftest import REPO, Database, cli, seed_users, users_job, write_job
from tests.observability import (
    Server,
    dashboard_queries,
    prometheus,
    pushed,
    pushgateway,
    substitute,
)

pytestmark = pytest.mark.anyio
T = TypeVar("T")
JOB = "users-display-name"

needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="prometheus is not installed (Debian package prometheus; .ci/run installs it)",
)
needs_pushgateway = pytest.mark.skipif(
    shutil.which("prometheus-pushgateway") is None,
    reason="prometheus-pushgateway is not installed (Debian package; .ci/run installs it)",
)


async def start_runner(job: Path, env: dict[str, str], log: BinaryIO, *args: str) -> Process:
    """``backfill run`` as a real process, its stderr (JSON log lines) into ``log``."""
    return await anyio.open_process(
        [sys.executable, "-m", "backfill", "run", str(job), *args],
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log,
    )


async def eventually(check: Callable[[], T | None], *, deadline: float, what: str) -> T:
    """Poll a blocking ``check`` (in a thread) until it returns something; fail at ``deadline``."""
    while True:
        result = await anyio.to_thread.run_sync(check)
        if result:
            return result
        if anyio.current_time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await anyio.sleep(0.2)  # polling Prometheus: its state changes on its own schedule


def final(prom: Server, expr: str) -> float | None:
    """The last sample of ``expr`` in the past minute (a range selector skips the staleness
    marker written once the runner is gone)."""
    result = prom.query(f"last_over_time({expr}[1m])")
    return float(result[0]["value"][1]) if result else None


async def updated(db: Database, times: int) -> int:
    return int(await db.fetchval("SELECT count(*) FROM users WHERE touched = $1", times))


@needs_prometheus
async def test_dashboard_queries_return_data_during_a_live_run(
    db: Database, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "runner.log"
    with ExitStack() as stack:
        out = stack.enter_context(log.open("ab"))
        # First: Prometheus takes ~5 s to scrape anything, so it starts while the rest sets up.
        scraping = prometheus([f"127.0.0.1:{port}"])
        prom = await anyio.to_thread.run_sync(stack.enter_context, scraping)
        rows = await seed_users(db, "generate_series(1, 40000)")
        env = db.env(BACKFILL_METRICS_ADDRESS="127.0.0.1", BACKFILL_METRICS_LINGER_SECONDS="15",
                     BACKFILL_PROGRESS_LOG_SECONDS="1")
        # Slow on purpose (>= 40 s): the test stops it once every panel has shown data.
        # With an impact budget, so that its panels have data too.
        slow = write_job(tmp_path, users_job(batch={"size": 50, "sleep_seconds": 0.05},
                                             throttle={"max_impact": "20%"}))
        runner = await start_runner(slow, env, out, f"--metrics-port={port}")
        try:
            deadline = anyio.current_time() + 40
            queries = {f"{title}: {expr}": substitute(expr, job=JOB, rate="5s")
                       for title, expr in dashboard_queries()}
            waiting = dict(queries)

            def panels_with_data() -> bool:
                for name, q in list(waiting.items()):
                    if prom.query(q):
                        del waiting[name]
                return not waiting

            try:
                await eventually(panels_with_data, deadline=deadline, what="every panel's data")
            except AssertionError:
                raise AssertionError(f"no data for: {list(waiting)}\n{log.read_text()}") from None
            assert runner.returncode is None, "the run ended before the test stopped it"
            health = await anyio.to_thread.run_sync(_health, port)
            assert health["job"] == JOB and health["state"] in ("running", "throttled")
            rate = prom.query(queries[next(k for k in queries if k.startswith("Rows updated"))])
            assert float(rate[0]["value"][1]) > 0
            progress = prom.query(f'backfill_progress_ratio{{job="{JOB}"}}')
            assert 0 < float(progress[0]["value"][1]) < 1
        finally:
            if runner.returncode is None:
                runner.send_signal(signal.SIGTERM)  # stop after the batch in flight
            with anyio.fail_after(30):
                code = await runner.wait()
        assert code == 75, log.read_text()

        # The runner served until one scrape saw its final state: the counter there is exact.
        await eventually(
            lambda: final(prom, f'backfill_state{{job="{JOB}",state="interrupted"}}') == 1,
            deadline=anyio.current_time() + 20, what="the interrupted state in Prometheus",
        )
        first = await updated(db, 1)
        assert 0 < first < rows
        assert final(prom, f'backfill_rows_updated_total{{job="{JOB}"}}') == first
        assert await db.fetchval("SELECT rows_updated FROM backfill.checkpoints") == first

        # Resume with big batches: succeeds; again the scraped counter is what the table saw.
        fast = write_job(tmp_path, users_job(batch={"size": 50000, "max_size": 100000}),
                         filename="fast.toml")
        runner = await start_runner(fast, env, out, f"--metrics-port={port}")
        with anyio.fail_after(60):
            assert await runner.wait() == 0, log.read_text()
        await eventually(
            lambda: final(prom, f'backfill_state{{job="{JOB}",state="succeeded"}}') == 1,
            deadline=anyio.current_time() + 20, what="the succeeded state in Prometheus",
        )
        assert await updated(db, 1) == rows  # every row exactly once over both runs
        assert final(prom, f'backfill_rows_updated_total{{job="{JOB}"}}') == rows - first
        assert final(prom, f'backfill_progress_ratio{{job="{JOB}"}}') == 1.0
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    assert any(x["msg"] == "progress" and x["eta_seconds"] is not None for x in lines)
    assert sum(x["msg"] == "progress" for x in lines) < 100  # never one per batch (800+)


def _health(port: int) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
        return dict(json.loads(response.read()))


@needs_pushgateway
async def test_pushgateway_keeps_the_last_success(db: Database, tmp_path: Path) -> None:
    await seed_users(db, "generate_series(1, 1000)")
    log = tmp_path / "runner.log"
    with ExitStack() as stack:
        out = stack.enter_context(log.open("ab"))
        gw = await anyio.to_thread.run_sync(stack.enter_context, pushgateway())
        env = db.env(BACKFILL_PUSHGATEWAY_URL=gw.url, BACKFILL_PUSH_INTERVAL_SECONDS="0.1",
                     BACKFILL_METRICS_PORT="0")
        ids = (("job", JOB), ("shard", "0"))

        def value(name: str, **labels: str) -> float | None:
            return pushed(gw).get((name, tuple(sorted((*ids, *labels.items())))))

        # A run that succeeds: pushed while it runs, and at the end with the success time.
        job = write_job(tmp_path, users_job(batch={"size": 25, "sleep_seconds": 0.03}))
        runner = await start_runner(job, env, out)
        await eventually(  # between batches it is throttled (its sleep) most of the time
            lambda: 1 in (value("backfill_state", state="running"),
                          value("backfill_state", state="throttled")),
            deadline=anyio.current_time() + 20, what="a push during the run",
        )
        assert value("backfill_last_success_timestamp_seconds") is None
        with anyio.fail_after(60):
            assert await runner.wait() == 0, log.read_text()
        assert value("backfill_rows_updated_total") == await updated(db, 1) == 1000
        assert value("backfill_state", state="succeeded") == 1
        success = value("backfill_last_success_timestamp_seconds")
        assert success is not None and abs(success - time.time()) < 60

        # A run that fails (a row the SET cannot update) pushes its state, not a success time.
        await db.execute("DELETE FROM backfill.checkpoints")  # as `backfill reset` does
        await db.execute("UPDATE users SET display_name = NULL")
        await db.execute("ALTER TABLE users ADD CONSTRAINT no_500 "
                         "CHECK (id <> 500 OR display_name IS NULL)")
        job = write_job(tmp_path, users_job(batch={"size": 20}), filename="again.toml")
        done = await anyio.to_thread.run_sync(lambda: cli("run", job, env=env))
        assert done.returncode == 65, done.stderr
        assert value("backfill_state", state="failed") == 1
        assert value("backfill_state", state="succeeded") == 0
        assert value("backfill_rows_updated_total") == await updated(db, 2) == 499
        assert value("backfill_batches_total", outcome="failed") == 1
        assert value("backfill_last_success_timestamp_seconds") == success

        # A runner that never got the job's lock pushes nothing at all.
        before = pushed(gw)
        holder = await db.connect()
        try:
            await holder.execute(f"SELECT pg_advisory_lock(hashtext('backfill:{JOB}'), 0)")
            job = write_job(tmp_path, users_job(limits={"lock_wait": 0.2}), filename="busy.toml")
            busy = await anyio.to_thread.run_sync(lambda: cli("run", job, env=env))
        finally:
            await holder.close()
        assert busy.returncode == 75, busy.stderr
        assert pushed(gw) == before

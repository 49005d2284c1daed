"""The impact budget on a real PostgreSQL: the canary and the look at other sessions, a run that
slows down while pgbench loads the server and speeds up when it stops, and a canary that cannot
write (``on_check_error``). Margins are generous: a loaded CI machine must not break them."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest

from backfill import commands
from backfill.checkpoint import BatchResult
from backfill.errors import ConfigError
from backfill.job import parse_job
from backfill.pgtemp import TempPostgres, find_bindir, has_module
from backfill.protocols import Pause
from backfill.throttling.canary import Canary
from backfill.throttling.impact import Controller
from backfill.throttling.probe import PgProbe
from tests.conftest import (
    Database,
    create_template,
    eventually,
    new_database,
    seed_users,
    temp_server,
    users_job,
)

pytestmark = pytest.mark.anyio


@dataclass
class Pace:
    """Records when rows committed and what the runner waited for."""

    commits: list[tuple[float, int]] = field(default_factory=list)
    pauses: list[Pause] = field(default_factory=list)

    def committed(self, result: BatchResult) -> None:
        self.commits.append((time.monotonic(), result.rows))

    def throttled(self, pause: Pause) -> None:
        self.pauses.append(pause)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None

    def rate(self, t0: float, t1: float) -> float:
        return sum(r for t, r in self.commits if t0 <= t < t1) / (t1 - t0)

    def waited(self, reason: str) -> float:
        return sum(p.seconds for p in self.pauses if p.reason == reason)


def budget_job(**overrides: Any) -> Any:
    fields: dict[str, Any] = {
        # Some CPU per row, so that a batch competes with the load like a real one.
        "set": "display_name = md5(md5(first_name || last_name)), touched = touched + 1",
        "batch": {"size": 500}, "throttle": {"max_impact": "20%"},
    }
    return parse_job(users_job(**(fields | overrides)))


async def test_the_canary_beats_from_its_own_process_and_ends_with_the_run(
    db: Database,
) -> None:
    job = budget_job()
    probe = PgProbe(db.params, job)
    budget = Controller(limit=1.2)
    budget.rate, budget.others = 1234.0, True
    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(Canary.like(probe).beats, budget, job.name)

                async def beaten() -> bool:
                    return len(budget._beats) >= 5

                await eventually(beaten, within=20)
                tg.cancel_scope.cancel()
        assert all(0 < s < 1 for _, s in budget._beats)
        [row] = await db.fetch("SELECT beats, rate FROM backfill.canaries WHERE job = $1",
                               job.name)
        assert row["beats"] >= 5 and row["rate"] == 1234.0

        async def ended() -> bool:  # its process (and its session) end with the run's
            return await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE "
                                     "application_name = $1", probe.application_name) == 0

        await eventually(ended, within=10)
    finally:
        await probe.aclose()


async def test_the_probe_sees_other_sessions_but_its_own(db: Database) -> None:
    probe = PgProbe(db.params, budget_job())
    other = await db.connect()
    try:
        assert (await probe.others(60.0))[0] >= 1
        await other.execute("SELECT pg_sleep(0.05)")
        assert (await probe.others(0.5))[0] == 1
        await other.close()

        async def alone() -> bool:
            return (await probe.others(0.2))[0] == 0

        await eventually(alone, within=10)
    finally:
        if not other.is_closed():
            await other.close()
        await probe.aclose()


async def test_on_an_idle_database_the_budget_leaves_full_speed(db: Database) -> None:
    await seed_users(db, "generate_series(1, 30000)")
    pace = Pace()
    ckpt = await commands.run(budget_job(), db.params, observers=[pace])
    assert ckpt.state == "succeeded" and ckpt.rows_updated == 30000
    # Nobody else there: at most the first look's window, then no pacing at all.
    assert pace.waited("impact") < 2.0, pace.waited("impact")


async def test_a_job_that_fails_its_checks_leaves_no_beat(db: Database) -> None:
    job = budget_job(name="no-table", table="public.no_such_table")
    with pytest.raises(ConfigError, match=r"table: public\.no_such_table does not exist"):
        await commands.run(job, db.params)
    assert await db.fetchval(
        "SELECT count(*) FROM backfill.canaries WHERE job = 'no-table'"
    ) == 0


@pytest.mark.skipif(shutil.which("pgbench") is None, reason="pgbench is not installed "
                    "(Debian package postgresql-contrib; .ci/run installs it)")
async def test_slows_while_a_load_runs_and_speeds_up_when_it_stops(db: Database) -> None:
    await seed_users(db, "generate_series(1, 1500000)")
    port = db.server.port
    await anyio.run_process(["pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                             "-i", "-q", "-s", "1", db.name], check=True)
    pace = Pace()
    marks: dict[str, float] = {}

    async def load() -> None:
        await anyio.sleep(3)
        marks["on"] = time.monotonic()
        await anyio.run_process(["pgbench", "-h", "127.0.0.1", "-p", str(port), "-U",
                                 "postgres", "-n", "-S", "-c", "4", "-j", "2", "-T", "6",
                                 db.name], check=True)
        marks["off"] = time.monotonic()
        await anyio.sleep(3)
        marks["end"] = time.monotonic()
        tg.cancel_scope.cancel()

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            tg.start_soon(load)
            marks["start"] = time.monotonic()
            await commands.run(budget_job(batch={"size": 500, "max_size": 500}), db.params,
                               observers=[pace])
            pytest.fail("the run ended before the load did: use a bigger table")
    before = pace.rate(marks["start"] + 1, marks["on"])
    during = pace.rate(marks["on"] + 2, marks["off"])
    after = pace.rate(marks["off"] + 1.5, marks["end"])
    assert during < 0.5 * before, (before, during, after)
    assert after > 2 * during, (before, during, after)
    assert pace.waited("impact") > 1.0


async def test_a_canary_that_cannot_write_holds_the_run_unless_ignored(db: Database) -> None:
    await seed_users(db, "generate_series(1, 20000)")
    await db.execute("""
        CREATE FUNCTION deny() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'permission denied for table canaries'
              USING ERRCODE = 'insufficient_privilege'; END $$;
        CREATE TRIGGER deny BEFORE INSERT OR UPDATE ON backfill.canaries
        FOR EACH ROW EXECUTE FUNCTION deny()""")
    # "ignore": it runs, unmeasured, to the end.
    ckpt = await commands.run(budget_job(throttle={"max_impact": 0.2, "on_check_error":
                                                   "ignore"}), db.params)
    assert ckpt.state == "succeeded"
    await db.execute("UPDATE users SET display_name = NULL")
    await db.execute("DELETE FROM backfill.checkpoints")
    # "pause" (the default): held while it cannot measure, on again once it can.
    pace = Pace()
    async with anyio.create_task_group() as tg:

        async def held() -> bool:
            return pace.waited("impact") >= 2.0

        async def allow_later() -> None:
            await eventually(held, within=30)
            assert not pace.commits  # nothing ran unmeasured
            await db.execute("DROP TRIGGER deny ON backfill.canaries")

        tg.start_soon(allow_later)
        with anyio.fail_after(60):
            ckpt = await commands.run(budget_job(), db.params, observers=[pace])
    assert ckpt.state == "succeeded" and ckpt.rows_updated == 20000


@pytest.fixture(scope="module")
def statements_pg() -> Iterator[TempPostgres]:
    """A server with pg_stat_statements loaded (the shared one does without)."""
    server = temp_server(settings={"shared_preload_libraries": "'pg_stat_statements'"})
    if not has_module(server.bindir or find_bindir(), "pg_stat_statements"):
        pytest.skip("pg_stat_statements is not installed (postgresql-contrib)")
    server.start()
    try:
        create_template(server)
        yield server
    finally:
        server.stop()


async def test_the_probe_reads_the_applications_statements_but_its_own(
    statements_pg: TempPostgres,
) -> None:
    db = await new_database(statements_pg)
    await db.execute("CREATE EXTENSION pg_stat_statements")
    job = budget_job()
    probe = PgProbe(db.params, job)
    app = await db.connect()
    try:
        first = await probe.statements()
        assert first is not None
        for _ in range(20):
            await app.fetchval("SELECT count(*) FROM pg_class WHERE relpages > $1", 0)
        found = await probe.statements()
        assert found is not None
        snapshot, hidden = found
        assert hidden == 0  # a superuser sees every role's statements
        before = first[0]
        grown = [q for q, (calls, *_) in snapshot.items() if calls - before.get(q, (0,))[0] >= 20]
        assert len(grown) == 1  # the application's query, not the canary's or the probe's
        own = await db.fetch("SELECT queryid FROM pg_stat_statements WHERE query ~ 'backfill[.]'")
        assert own and not {r["queryid"] for r in own} & set(snapshot)
    finally:
        await app.close()
        await probe.aclose()

"""The server crashes, not the runner: batches commit without waiting for the WAL flush
(``[batch] wait_for_flush = false``, the default), and each carries its checkpoint in its own
transaction, so a crash that loses the last acknowledged batches loses their checkpoint with
them; the run resumes from the checkpoint that survived and redoes exactly those batches.

What these tests can show, honestly. The server runs with fsync on. Killing its processes
(``pg_ctl stop -m immediate``, SIGKILL of the postmaster) does not lose the operating system's
page cache: WAL the server had *written* but not flushed survives, as if flushed. What a
process crash loses is WAL still in the server's own buffers: the WAL writer is made lazy here
(``wal_writer_delay = 10s``), so the last asynchronous commits stay in those buffers, and a
crash right after a batch was acknowledged loses it, visibly (the runner counted it, the
restarted server has not got it). A power loss would also lose written-but-unflushed WAL:
more batches, the same mechanism (the commit record and the checkpoint move are in the same
transaction's WAL, which is replayed in order, up to a point, or not). The tests check what
must hold whatever was lost: every row updated exactly once, the checkpoint exact, the run's
history intact (it is written synchronously), and the rows counter equal to the checkpoint's.
A promoted standby that missed the tail is tests/faults/test_failover.py.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from backfill import commands
from backfill.checkpoint import BatchResult
from backfill.job import parse_job
from backfill.pgtemp import TempPostgres
from tests.conftest import (
    Database,
    seed_users,
    serving,
    users_job,
    write_job,
)
from tests.observability import metrics_of_a_run

from .harness import Cli, Hook, Recorder, checkpoint_is_exact, exactly_once
from .sessions import eventually

pytestmark = pytest.mark.anyio

NAME = "users-display-name"
# Asynchronous commits stay in the server's WAL buffers until the WAL writer's next round (at
# most 10 s here), so that a process crash really loses some (see the module's docstring). No
# other process flushes them first: the background writer and autovacuum write dirty pages, and
# a page's WAL is flushed before the page (on a busy machine, a SIGKILLed postmaster's children
# lived long enough for a round of the background writer, and the crash lost nothing).
LAZY_WAL = {"wal_writer_delay": "10s", "wal_writer_flush_after": "1GB",
            "bgwriter_lru_maxpages": "0", "autovacuum": "off"}


@pytest.fixture(scope="module")
def own_pg() -> Iterator[TempPostgres]:
    """This module's own server (and so ``own_db``'s) is durable: fsync and synchronous_commit
    on (the suite's are off), with a lazy WAL writer."""
    with serving(fast=False, settings=LAZY_WAL) as server:
        yield server


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def crash(server: TempPostgres, how: str) -> None:
    """Crash the server (``immediate``: pg_ctl's immediate stop, every process quits at once
    without writing anything; ``sigkill``: SIGKILL of the postmaster, whose processes then
    notice it is gone and end) and start it again (crash recovery)."""
    if how == "immediate":
        await anyio.to_thread.run_sync(lambda: server.pg_ctl("stop", mode="immediate"))
    else:
        pid = int((server.datadir / "postmaster.pid").read_text().split()[0])
        left = _children(pid)
        os.kill(pid, signal.SIGKILL)
        # The server cannot restart while its old processes still hold the shared memory.
        await eventually(lambda: not any(map(_alive, [pid, *left])), within=30, interval=0.01)
        _unlock_after_zombie(server, pid)
    await anyio.to_thread.run_sync(lambda: server.pg_ctl("start"))


def _unlock_after_zombie(server: TempPostgres, pid: int) -> None:
    """A killed postmaster that is still a zombie (this VM's init reaps orphans late) would be
    taken for a live server by the next one: its lock files go, as an operator would remove
    them after making sure it is dead."""
    if Path(f"/proc/{pid}").exists():
        assert server.root is not None
        (server.datadir / "postmaster.pid").unlink()
        (server.root / f".s.PGSQL.{server.port}.lock").unlink(missing_ok=True)


# Several key types: (table, key, DDL and rows).
TABLES: dict[str, tuple[str, str]] = {
    "text": ("k", """
        CREATE TABLE notes (k text PRIMARY KEY, touched int NOT NULL DEFAULT 0);
        INSERT INTO notes (k) SELECT 'note-' || lpad(g::text, 7, '0')
        FROM generate_series(1, {rows}) g"""),
    "composite": ("[\"a\", \"b\"]", """
        CREATE TABLE events (a int, b uuid, touched int NOT NULL DEFAULT 0, PRIMARY KEY (a, b));
        INSERT INTO events (a, b) SELECT g / 7, md5(g::text)::uuid
        FROM generate_series(1, {rows}) g"""),
}


async def _seed(db: Database, keys: str, rows: int) -> dict[str, Any]:
    """The table for ``keys`` (bigint: users), and a job that counts each update in ``touched``
    (``where = true``: a batch applied twice shows)."""
    if keys == "bigint":
        await seed_users(db, f"generate_series(1, {rows})")
        return users_job(where="true")
    key, ddl = TABLES[keys]
    await db.execute(ddl.format(rows=rows))
    table = "notes" if keys == "text" else "events"
    return {"name": NAME, "table": f"public.{table}",
            "key": key if keys == "text" else ["a", "b"],
            "set": "touched = touched + 1", "where": "true"}


async def _each_row_once(db: Database, keys: str, rows: int, figures: Counter[str]) -> None:
    if keys == "bigint":
        conn = await db.connect()
        try:
            await exactly_once(conn, 1, rows)
            await checkpoint_is_exact(conn, NAME)
        finally:
            await conn.close()
        return
    table = "notes" if keys == "text" else "events"
    row = (await db.fetch(
        f"SELECT count(*) FILTER (WHERE touched = 1) AS once, "
        f"count(*) FILTER (WHERE touched = 0) AS missed, "
        f"count(*) FILTER (WHERE touched > 1) AS twice FROM {table}"))[0]
    figures["rows_checked"] += rows
    figures["rows_lost"] += row["missed"]
    figures["rows_twice"] += row["twice"]
    assert (row["once"], row["missed"], row["twice"]) == (rows, 0, 0), dict(row)
    ckpt = await db.fetchval("SELECT rows_updated FROM backfill.checkpoints WHERE job = $1", NAME)
    assert ckpt == rows


async def _batches(db: Database) -> int:
    return int(await db.fetchval(
        "SELECT coalesce(max(batches), 0) FROM backfill.checkpoints WHERE job = $1", NAME))


@pytest.mark.parametrize(
    ("keys", "grouped"), [("bigint", True), ("bigint", False), ("text", True),
                          ("composite", False)],
)
async def test_server_crashes_mid_run_every_row_once(
    own_pg: TempPostgres, own_db: Database, tmp_path: Path, keys: str, grouped: bool,
    figures: Counter[str],
) -> None:
    """The runner as a process; the server crashes four times (immediate stops and SIGKILLs of
    the postmaster) while batches commit, and restarts; the runner reconnects each time."""
    rows = 60_000
    fields = await _seed(own_db, keys, rows)
    # Each batch's statement takes 3 ms at least, so that the run outlasts four crashes however
    # fast the machine (grouped, a fast one ran the 300 batches before the test saw the 4th).
    await own_db.execute(f"""
        CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_sleep(0.003); RETURN NULL; END $$;
        CREATE TRIGGER slow AFTER UPDATE ON {fields["table"]}
            FOR EACH STATEMENT EXECUTE FUNCTION slow()""")
    # Alone: a sleep between batches (the loop decides after each); grouped: none.
    fields |= {"batch": {"size": 200, "sleep_seconds": 0 if grouped else 0.002},
               "limits": {"connect_retry_seconds": "60s", "connect_timeout": "2s"}}
    job = write_job(tmp_path, fields)
    run = await Cli(tmp_path, "run", job, env=own_db.env()).start()
    try:
        for n, how in enumerate(["immediate", "sigkill", "immediate", "sigkill"]):
            start = await _batches(own_db)
            await eventually(lambda s=start: run.code is not None or _ahead(own_db, s + 8),
                             within=60)
            assert run.code is None, f"ended before crash {n + 1}: {run.output}"
            seen = await _batches(own_db)  # committed and visible to others
            await crash(own_pg, how)
            figures["server_crashes"] += 1
            figures["acknowledged_batches_lost"] += max(0, seen - await _batches(own_db))
        assert await run.wait(within=120) == 0, run.output
    finally:
        await run.aclose()
    await _each_row_once(own_db, keys, rows, figures)
    # The same run all along: its history was written synchronously, so it survived.
    runs = await own_db.fetch("SELECT outcome FROM backfill.runs")
    assert [r["outcome"] for r in runs] == ["succeeded"], run.output


async def _ahead(db: Database, batches: int) -> bool:
    try:
        return await _batches(db) >= batches
    except OSError:  # the server is still restarting
        return False


@pytest.mark.parametrize(("how", "wait_for_flush"),
                         [("immediate", False), ("sigkill", False), ("immediate", True)])
async def test_a_crash_loses_acknowledged_batches_and_the_run_redoes_them_once(
    own_pg: TempPostgres, own_db: Database, how: str, wait_for_flush: bool,
    figures: Counter[str],
) -> None:
    """In the runner's process, so that the crash lands right after a batch was acknowledged,
    with nothing else writing: the restarted server has lost it (and its checkpoint), unless
    batches wait for the flush. The run redoes it, every row once, and the rows counter
    (``backfill_rows_updated_total``) counts the redone rows once: it ends equal to the
    checkpoint's."""
    rows = 10_000
    await seed_users(own_db, f"generate_series(1, {rows})")
    rec = Recorder()
    metrics, counted_by = metrics_of_a_run(job=NAME, table="public.users")
    acknowledged: list[int] = []

    async def on_commit(result: BatchResult) -> None:
        if len(rec.commits) in (10, 30) and len(acknowledged) < 2:
            acknowledged.append(metrics.tracker.batches)  # the checkpoint as the runner knows it
            await crash(own_pg, how)
            figures["server_crashes"] += 1

    job = parse_job(users_job(where="true", batch={"size": 100, "wait_for_flush": wait_for_flush},
                              limits={"connect_retry_seconds": "60s"}))
    with anyio.fail_after(120):
        ckpt = await commands.run(job, own_db.params, observers=[rec, counted_by],
                                  throttles=[Hook(on_commit)])
    assert ckpt.rows_updated == rows
    conn = await own_db.connect()
    try:
        await exactly_once(conn, 1, rows)
    finally:
        await conn.close()
    # Unflushed, each crash lost the batch just acknowledged (at least): restarting, the runner
    # found a checkpoint behind what it had counted, and redid the batches.
    lost = [a - s.batches for a, s in zip(acknowledged, rec.starts[1:], strict=True)]
    figures["acknowledged_batches_lost"] += sum(lost)
    if wait_for_flush:
        assert lost == [0, 0], (lost, rec.starts)
    else:
        assert min(lost) >= 1, (lost, rec.starts)
    assert len(rec.commits) == rows // 100 + sum(lost)
    counted = metrics.rows_updated.labels(NAME, "0")._value.get()
    assert counted == rows


@pytest.mark.parametrize("wait_for_flush", [False, True])
async def test_only_batches_commit_without_waiting_for_the_flush(
    db: Database, wait_for_flush: bool
) -> None:
    """``synchronous_commit`` as each write of a run sees it: off in every batch (grouped or
    alone) unless ``wait_for_flush``; the session's own (on here) for the run's history and
    its finished state, which must be durable at once."""
    await seed_users(db, "generate_series(1, 5000)")
    await db.execute(f'ALTER DATABASE "{db.name}" SET synchronous_commit = on')
    await db.execute("""
        CREATE TABLE modes (what text, mode text);
        CREATE FUNCTION log_mode() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
            INSERT INTO modes VALUES (TG_ARGV[0], current_setting('synchronous_commit'));
            RETURN NULL;
        END $$;
        CREATE TRIGGER m AFTER UPDATE ON users FOR EACH ROW EXECUTE FUNCTION log_mode('batch');
        CREATE TRIGGER m AFTER INSERT OR UPDATE ON backfill.runs
            FOR EACH ROW EXECUTE FUNCTION log_mode('history');
        CREATE TRIGGER f AFTER UPDATE ON backfill.checkpoints FOR EACH ROW
            WHEN (NEW.state = 'succeeded') EXECUTE FUNCTION log_mode('finished');
    """)
    rec = Recorder()
    job = parse_job(users_job(batch={"size": 100, "wait_for_flush": wait_for_flush}))
    await commands.run(job, db.params, observers=[rec])
    modes = {(r["what"], r["mode"]): r["n"] for r in await db.fetch(
        "SELECT what, mode, count(*) AS n FROM modes GROUP BY 1, 2")}
    batch = "on" if wait_for_flush else "off"
    assert modes == {("batch", batch): 5000, ("history", "on"): 2, ("finished", "on"): 1}
    cursors = [c.cursor for c in rec.commits]
    assert len(set(cursors)) < len(cursors), "no batches were grouped"

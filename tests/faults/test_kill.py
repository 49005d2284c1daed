"""SIGKILL at random moments, over and over, then a clean finish: nothing lost, nothing twice.

Each batch commits its rows and its checkpoint in one statement, so whatever instant the
process dies at (importing, connecting, waiting for the job's lock, mid-batch, between batches),
the next run resumes exactly after the last batch that committed.

Like a Kubernetes Job replacing a killed pod, the next runner is started (once the current one
holds the job's lock) before the current one is killed: it queues for the lock and takes over
when the killed runner's connection dies. This also hides Python's start-up time.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import asyncpg
import pytest

from tests.conftest import Database, seed_users, users_job, write_job

from .harness import Cli, cli, exactly_once
from .sessions import eventually, lock_holder, runner_backends

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROWS = 200_000
KILLS = 32
NAME = "users-display-name"


async def _batches(admin: asyncpg.Connection) -> int:
    n = await admin.fetchval("SELECT batches FROM backfill.checkpoints WHERE job = $1", NAME)
    return int(n or 0)


async def _gone(admin: asyncpg.Connection, pid: int) -> bool:
    return not await admin.fetchval("SELECT 1 FROM pg_stat_activity WHERE pid = $1", pid)


async def _in_batch(admin: asyncpg.Connection) -> bool:
    """The runner's batch statement is executing on the server right now."""
    return any(
        r["state"] == "active" and "backfill_changed" in r["query"]
        for r in await runner_backends(admin, NAME)
    )


async def test_sigkill_loop_then_clean_finish(
    db: Database, admin: asyncpg.Connection, tmp_path: Path, figures: Counter[str]
) -> None:
    await sigkill_loop(db, admin, tmp_path, figures, env=db.env(), gone=_gone)


async def sigkill_loop(
    db: Database,
    admin: asyncpg.Connection,
    tmp_path: Path,
    figures: Counter[str],
    *,
    env: dict[str, str],
    gone: Callable[[asyncpg.Connection, int], Awaitable[bool]],
) -> None:
    """The kill loop, the runners connecting with ``env``; ``gone(admin, pid)`` tells when a
    killed runner's backend can no longer commit anything."""
    await seed_users(db, f"generate_series(1, {ROWS})")
    # where = true: a batch applied twice would leave touched = 2. While killing, a short
    # sleep between batches keeps any one life from finishing the job; the clean finish runs
    # flat out (speed settings may change between runs).
    job = write_job(tmp_path, users_job(where="true", batch={"size": 250, "sleep_seconds": 0.02},
                                        limits={"lock_wait": "60s"}))
    final = write_job(tmp_path, users_job(where="true", batch={"size": 1000}),
                      filename="final.toml")
    seed = int(os.environ.get("BACKFILL_FAULT_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    kills = {"start-up": 0, "any moment": 0, "after a commit": 0, "mid-batch": 0}
    outside_added = False
    spawned: list[Cli] = []

    async def spawn() -> Cli:
        proc = await Cli(tmp_path, "run", job, env=env).start()
        spawned.append(proc)
        return proc

    async def kill(proc: Cli, kind: str) -> None:
        assert proc.proc is not None
        assert proc.proc.returncode is None, (
            f"a run ended by itself after {sum(kills.values())} kills (seed {seed}): "
            f"{proc.stderr[-2000:]}"
        )
        holder = await lock_holder(admin, NAME)
        proc.kill()
        assert await proc.wait(within=10) == -9
        kills[kind] += 1
        if holder is not None and kind != "start-up":
            # Its backend finishes (commits or rolls back) the batch in flight and exits,
            # which releases the job's lock; only then is progress the next runner's.
            await eventually(lambda: gone(admin, holder), within=30)

    try:
        current = await spawn()
        n = 0
        while sum(kills.values()) < KILLS:
            n += 1
            # Only the current runner is alive: once the lock has a holder, it is this one.
            await eventually(lambda c=current: c.code is not None or lock_holder(admin, NAME),
                             within=30)
            assert current.code is None, f"exited {current.code}: {current.stderr[-3000:]}"
            before = await _batches(admin)
            waiting = await spawn()  # the replacement starts now and queues for the lock
            if n % 4 == 0:
                # A kill during start-up: importing, connecting or queueing for the lock.
                await anyio.sleep(rng.uniform(0, 0.6))
                await kill(waiting, "start-up")
                waiting = await spawn()
            kind = ("any moment", "after a commit", "mid-batch")[n % 3]
            if kind == "any moment":  # any instant once it holds the lock, opening included
                await anyio.sleep(rng.uniform(0, 0.3))
            elif kind == "after a commit":
                await _progress(admin, before, current)
                await anyio.sleep(rng.uniform(0, 0.03))
            else:
                await _progress(admin, before, current)
                await eventually(lambda c=current: _in_batch(admin) if c.code is None else True,
                                 within=30, interval=0.002)
            await kill(current, kind)
            current = waiting
            if not outside_added and await _batches(admin) > 0:
                # The range is fixed now: rows added outside it must never be touched.
                await admin.execute(
                    "INSERT INTO users (id, first_name, last_name) "
                    f"SELECT g, 'a', 'b' FROM generate_series({ROWS + 1}, {ROWS + 10}) g "
                    "UNION ALL SELECT g, 'a', 'b' FROM generate_series(-9, 0) g"
                )
                outside_added = True
        # The last replacement is queued for the lock or already took it: kill it too.
        await kill(current, "any moment")
    finally:
        for proc in spawned:
            await proc.aclose()
    done = await cli(tmp_path, "run", final, env=env, within=120)
    assert done.code == 0, done.stderr[-2000:]

    assert outside_added
    await exactly_once(admin, 1, ROWS)
    ckpt = await admin.fetchrow("SELECT * FROM backfill.checkpoints WHERE job = $1", NAME)
    assert (ckpt["state"], ckpt["rows_updated"]) == ("succeeded", ROWS)
    # Every killed runner that had opened its run is closed as 'killed' by its successor,
    # with the exact rows the checkpoint says it committed.
    runs = await admin.fetch("SELECT outcome, rows_updated FROM backfill.runs ORDER BY id")
    assert runs[-1]["outcome"] == "succeeded"
    assert {r["outcome"] for r in runs[:-1]} <= {"killed"}
    assert sum(r["rows_updated"] for r in runs) == ROWS
    assert len(runs) > kills["after a commit"] + kills["mid-batch"]
    total = sum(kills.values())
    figures["sigkills"] += total
    figures["sigkills_mid_batch"] += kills["mid-batch"]
    figures["sigkills_start_up"] += kills["start-up"]


async def _progress(admin: asyncpg.Connection, before: int, proc: Cli) -> None:
    """Wait until a batch committed after ``before``, or the process ended (then fail)."""

    async def check() -> bool:
        return proc.code is not None or await _batches(admin) > before

    await eventually(check, within=30)
    assert proc.code is None, f"the runner exited {proc.code}: {proc.stderr[-3000:]}"

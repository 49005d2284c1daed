"""Sharded runs: boundaries from the key distribution, one lock and checkpoint per shard."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from backfill.ranges import split
from tests.conftest import Database, cli, eventually, popen, seed_users, users_job, write_job

pytestmark = pytest.mark.anyio

# 400k keys, heavily skewed: half dense at the bottom, half spread quadratically up to ~4e10.
SKEWED = (
    "(SELECT CASE WHEN x <= 200000 THEN x ELSE 200000 + (x - 200000)::int8 * (x - 200000) END "
    "FROM generate_series(1, 400000) x)"
)


def test_split_at_cuts() -> None:
    spans = split(("1",), ("9000",), [("5",), ("2000",)], 3)
    assert [(s.lo, s.hi, s.cursor) for s in spans] == [
        (("1",), ("5",), None),
        (("5",), ("2000",), ("5",)),
        (("2000",), ("9000",), ("2000",)),
    ]
    assert [s.cursor for s in split(("1",), ("1",), [], 2)] == [None, ("1",)]
    assert [s.hi for s in split(("1",), ("9",), [("5",)], 3)] == [("5",), ("9",), ("9",)]


async def test_four_shards_one_killed(db: Database, tmp_path: Path) -> None:
    await seed_users(db, SKEWED)
    await db.execute("ANALYZE users")
    path = write_job(tmp_path, users_job(where="true", batch={"size": 2000}))
    env = db.env()
    procs = {i: popen("run", path, "--shard", f"{i}/4", env=env) for i in range(4)}
    # Kill shard 2 once it has committed something, then start it again as a Job would.
    await eventually(
        lambda: db.fetchval("SELECT batches > 0 FROM backfill.checkpoints WHERE shard = 2"),
        within=60,
    )
    procs[2].send_signal(signal.SIGKILL)
    procs[2].communicate()
    procs[2] = popen("run", path, env=env | {"BACKFILL_SHARD": "2/4"})
    for i, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (i, err)

    assert await db.fetchval("SELECT count(*) FROM users WHERE touched <> 1") == 0
    rows = [
        r["rows_updated"]
        for r in await db.fetch("SELECT rows_updated FROM backfill.checkpoints ORDER BY shard")
    ]
    assert sum(rows) == 400_000
    assert max(rows) <= 1.25 * min(rows), rows  # balanced by rows, not key width

    status = json.loads(cli("status", "users-display-name", "--json", env=env).stdout)
    assert len(status["jobs"]) == 4
    assert status["totals"]["users-display-name"]["rows_updated"] == 400_000
    outcomes = sorted(r["outcome"] for r in status["runs"])
    assert outcomes == ["killed", "succeeded", "succeeded", "succeeded", "succeeded"]


async def test_changed_shard_count_is_refused(db: Database, tmp_path: Path) -> None:
    await seed_users(db, "generate_series(1, 1000)")
    path = write_job(tmp_path, users_job())
    env = db.env()
    assert cli("run", path, "--shard", "0/2", env=env).returncode == 0
    out = cli("run", path, "--shard", "1/3", env=env)
    assert out.returncode == 78 and "split into 2 shard(s)" in out.stderr
    whole = cli("run", path, env=env)
    assert whole.returncode == 78
    # Only shard 0's rows were touched (its boundary comes from a sample: about half).
    done = await db.fetchval("SELECT rows_updated FROM backfill.checkpoints WHERE shard = 0")
    assert 300 < done < 700
    assert await db.fetchval("SELECT count(*) FROM users WHERE touched > 0") == done
    bad = cli("run", path, "--shard", "4/4", env=env)
    assert bad.returncode == 78 and "--shard" in bad.stderr
    assert os.environ.get("BACKFILL_SHARD") is None

"""Rows the database rejects (a CHECK constraint, a division by zero): the failing slice is
split until the row is found. By default the run stops with exit 65 naming exactly that key;
with on_row_error = "skip" it is recorded, counted, reported by `status`, and the run goes on."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import Database, seed_users, users_job, write_job

from .harness import checkpoint_is_exact, cli, exactly_once

pytestmark = pytest.mark.anyio

NAME = "users-display-name"
ROWS = 3000
# Key 777 violates a CHECK constraint once display_name is set; key 1500 divides by zero.
SET = "display_name = first_name, touched = touched + 1 + 0 / (id - 1500)"


async def test_poison_row_stops_naming_its_key_then_skip_finishes(
    db: Database, admin: asyncpg.Connection, tmp_path: Path, figures: Counter[str]
) -> None:
    await seed_users(db, f"generate_series(1, {ROWS})")
    await admin.execute(
        "ALTER TABLE users ADD CONSTRAINT not_777 CHECK (id <> 777 OR display_name IS NULL)"
    )
    job = write_job(tmp_path, users_job(set=SET, where="true", batch={"size": 500}))

    failed = await cli(tmp_path, "run", job, env=db.env())
    assert failed.proc is not None and failed.proc.returncode == 65, failed.stderr
    [error] = failed.errors()
    assert error.startswith("backfill: error: row with key 777 makes the SET fail: "), error
    assert "not_777" in error  # the database's reason, naming the constraint
    ckpt = await checkpoint_is_exact(admin, NAME)
    # Every good row before it committed (the halves without it), nothing after it.
    assert (ckpt["cursor"], ckpt["state"]) == (["776"], "failed")

    skip = write_job(tmp_path, users_job(set=SET, where="true", batch={"size": 500},
                                         on_row_error="skip"), filename="skip.toml")
    done = await cli(tmp_path, "run", skip, env=db.env())
    assert done.proc is not None and done.proc.returncode == 0, done.stderr
    assert "2 skipped" in done.stderr
    skips = [line["keys"] for line in done.log()
             if line.get("msg") == "skipped a row the SET cannot update"]
    assert skips == [["777"], ["1500"]]
    await exactly_once(admin, 1, ROWS, excluding=(777, 1500))
    poison = "SELECT array_agg(touched ORDER BY id) FROM users WHERE id IN (777, 1500)"
    assert await admin.fetchval(poison) == [0, 0]
    ckpt = await checkpoint_is_exact(admin, NAME)
    assert (ckpt["state"], ckpt["rows_updated"], ckpt["rows_skipped"]) == ("succeeded", ROWS - 2, 2)

    status = await cli(tmp_path, "status", NAME, env=db.env())
    assert status.proc is not None and status.proc.returncode == 0, status.stderr
    assert "skipped 2: 777, 1500" in status.stdout, status.stdout
    as_json = await cli(tmp_path, "status", NAME, "--json", env=db.env())
    [entry] = json.loads(as_json.stdout)["jobs"]
    assert (entry["rows_skipped"], entry["skipped_keys"]) == (2, [["777"], ["1500"]])
    figures["poison_rows_found"] += 3

"""End-to-end runs on real PostgreSQL through the programmatic API."""

from __future__ import annotations

from typing import Any

import pytest

from backfill import commands
from backfill.errors import ConfigError, JobBusy
from backfill.job import parse_job
from tests.conftest import Database, seed_users, users_job

pytestmark = pytest.mark.anyio


async def run(db: Database, **overrides: Any):  # type: ignore[no-untyped-def]
    return await commands.run(parse_job(users_job(**overrides)), db.params, observers=[])


async def test_updates_every_row_once(db: Database) -> None:
    await seed_users(db, "generate_series(1, 1050)")
    ckpt = await run(db)
    assert (ckpt.rows_updated, ckpt.batches, ckpt.state) == (1050, 11, "succeeded")
    counts = await db.fetch("SELECT touched, count(*) FROM users GROUP BY touched")
    assert [tuple(r) for r in counts] == [(1, 1050)]
    assert (
        await db.fetchval(
            "SELECT count(*) FROM users WHERE display_name = first_name || ' ' || last_name"
        )
        == 1050
    )


async def test_rerun_after_success_does_nothing(db: Database) -> None:
    await seed_users(db, "generate_series(1, 300)")
    await run(db)
    again = await run(db)
    assert again.rows_updated == 300
    assert await db.fetchval("SELECT max(touched) FROM users") == 1


async def test_empty_table(db: Database) -> None:
    await seed_users(db, "generate_series(1, 0)")
    ckpt = await run(db)
    assert (ckpt.state, ckpt.rows_updated, ckpt.range_lo) == ("succeeded", 0, None)


async def test_sparse_keys_cost_nothing(db: Database) -> None:
    # 500 rows spread over a range of 5e12: a batch covers keys, not key width.
    await seed_users(db, "(SELECT x * 10000000000 FROM generate_series(1, 500) x)")
    ckpt = await run(db)
    assert (ckpt.rows_updated, ckpt.batches) == (500, 5)


async def test_where_excluding_most_rows(db: Database) -> None:
    await seed_users(db, "generate_series(1, 2000)")
    await db.execute("UPDATE users SET display_name = 'kept' WHERE id % 100 <> 0")
    ckpt = await run(db)
    # Work per batch is bounded by size whatever matches: 20 batches for 2000 keys.
    assert (ckpt.rows_updated, ckpt.batches) == (20, 20)
    assert await db.fetchval("SELECT count(*) FROM users WHERE display_name = 'kept'") == 1980


async def test_rows_above_the_fixed_range_are_left_alone(db: Database) -> None:
    await seed_users(db, "generate_series(1, 500)")
    ckpt = await run(db, batch={"size": 1000})
    await db.execute("INSERT INTO users (id, first_name, last_name) VALUES (501, 'a', 'b')")
    await db.execute("UPDATE backfill.checkpoints SET state = 'running', cursor = ARRAY['400']")
    ckpt = await run(db)
    assert ckpt.range_hi == ("500",)
    assert await db.fetchval("SELECT display_name FROM users WHERE id = 501") is None


async def test_changed_definition_is_refused(db: Database) -> None:
    await seed_users(db, "generate_series(1, 100)")
    await run(db)
    with pytest.raises(ConfigError, match="changed since its checkpoint"):
        await run(db, set="display_name = 'x'")


async def test_second_runner_is_refused(db: Database) -> None:
    await seed_users(db, "generate_series(1, 100)")
    holder = await db.connect()
    try:
        await holder.execute("SET application_name = 'backfill:users-display-name'")
        assert await holder.fetchval(
            "SELECT pg_try_advisory_lock(hashtext('backfill:' || 'users-display-name'), 0)"
        )
        with pytest.raises(JobBusy, match=r"held by another runner: .*backend pid"):
            await run(db, limits={"lock_wait": 0.3})
    finally:
        await holder.close()
    assert await db.fetchval("SELECT max(touched) FROM users") == 0


async def test_history_records_each_run(db: Database) -> None:
    await seed_users(db, "generate_series(1, 100)")
    await run(db)
    st = await commands.status(db.params, "users-display-name")
    assert [(r["outcome"], r["rows_updated"]) for r in st.history] == [("succeeded", 100)]

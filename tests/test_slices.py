"""Computed slices (one integer key): after a dense slice the next one ends ``size`` values after
the cursor instead of after ``size`` keys read from the index. The contract must not change: no
batch covers more than ``size`` keys, every row in the range is updated exactly once, gaps and
huge jumps cost no empty batches, and a resumed run (whose cursor may be no key at all) goes on
exactly where it stopped."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from backfill import commands
from backfill.checkpoint import BatchResult
from backfill.job import parse_job
from tests.conftest import Database, seed_users, users_job

pytestmark = pytest.mark.anyio

# Dense, then every 7th, then dense again, then a few keys after a jump of 10^12.
MIXED = """(SELECT * FROM generate_series(1, 1000)
        UNION ALL SELECT * FROM generate_series(2000, 3000, 7)
        UNION ALL SELECT * FROM generate_series(5000, 5600)
        UNION ALL SELECT x * 1000000000000 FROM generate_series(1, 5) x)"""


@dataclass
class Batches:
    """Records committed batches; ignores every other event."""

    done: list[BatchResult] = field(default_factory=list)

    def committed(self, result: BatchResult) -> None:
        self.done.append(result)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


async def run(db: Database, **overrides: Any) -> tuple[Any, list[BatchResult]]:
    batches = Batches()
    job = parse_job(users_job(**overrides))
    ckpt = await commands.run(job, db.params, observers=[batches])  # type: ignore[list-item]
    return ckpt, batches.done


async def touched(db: Database) -> list[tuple[int, int]]:
    rows = await db.fetch("SELECT touched, count(*) FROM users GROUP BY touched ORDER BY 1")
    return [tuple(r) for r in rows]  # type: ignore[misc]


async def test_mixed_density_every_row_once_never_over_size(db: Database) -> None:
    n = await seed_users(db, MIXED)
    ckpt, batches = await run(db)
    assert ckpt.rows_updated == n
    assert await touched(db) == [(1, n)]
    assert max(b.rows for b in batches) <= 100
    # Dense stretches take full batches; the sparse part and the jump add few batches.
    assert len(batches) <= n // 100 + 6


async def test_where_matching_some_rows(db: Database) -> None:
    await seed_users(db, "generate_series(1, 3000)")
    await db.execute("UPDATE users SET display_name = 'kept' WHERE id % 3 <> 0")
    ckpt, batches = await run(db)
    assert ckpt.rows_updated == 1000
    assert await touched(db) == [(0, 2000), (1, 1000)]
    assert len(batches) == 30  # 100 keys a batch, whatever matches


async def test_resume_from_a_cursor_between_keys(db: Database) -> None:
    await seed_users(db, "(SELECT * FROM generate_series(1, 400) UNION ALL "
                         "SELECT * FROM generate_series(1000, 1400))")
    await run(db)
    # Pretend the last run stopped with a computed cursor that is no key, inside a gap.
    await db.execute("UPDATE users SET display_name = NULL, touched = 0 WHERE id > 777")
    await db.execute("UPDATE backfill.checkpoints SET state = 'running', cursor = ARRAY['777']")
    ckpt, _ = await run(db)
    assert ckpt.state == "succeeded"
    assert await touched(db) == [(1, 801)]


async def test_small_integer_key_at_its_maximum(db: Database) -> None:
    await db.execute(
        "CREATE TABLE public.users (id smallint PRIMARY KEY, first_name text, last_name text, "
        "display_name text, touched int NOT NULL DEFAULT 0)"
    )
    await db.execute(
        "INSERT INTO users (id, first_name, last_name) "
        "SELECT g, 'f', 'l' FROM generate_series(32000, 32767) g"
    )
    ckpt, batches = await run(db)
    assert ckpt.rows_updated == 768 and ckpt.cursor == ("32767",)
    assert await touched(db) == [(1, 768)]
    assert len(batches) == 8

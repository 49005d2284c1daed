"""A slice whose UPDATE exceeds statement_timeout: the attempt rolls back, the batch shrinks
(halving, never below min_size) until slices fit, then grows back gradually."""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import asyncpg
import pytest

from backfill import commands
from backfill.errors import ExitCode, Unavailable
from backfill.job import parse_job
from tests.conftest import Database, seed_users, users_job

from .harness import Recorder, checkpoint_is_exact, exactly_once

pytestmark = pytest.mark.anyio

NAME = "users-display-name"
ROWS = 6000
# Each of these rows takes 0.2 s to update: a slice holding two or more of them takes longer
# than the 0.3 s statement_timeout; a slice holding one fits.
SLOW = (3000, 3025, 3050, 3075)
SET = (
    "display_name = first_name, touched = touched + 1 + "
    f"CASE WHEN id IN {SLOW} THEN length(pg_sleep(0.2)::text) ELSE 0 END"
)


def job(**overrides: Any) -> Any:
    return parse_job(users_job(set=SET, where="true", **overrides))


async def test_statement_timeout_shrinks_the_batch_then_it_grows_back(
    db: Database, admin: asyncpg.Connection, figures: Counter[str]
) -> None:
    await seed_users(db, f"generate_series(1, {ROWS})")
    rec = Recorder()
    ckpt = await commands.run(
        job(batch={"size": 400}, limits={"statement_timeout": "300ms", "lock_timeout": "100ms"}),
        db.params, observers=[rec],
    )
    assert ckpt.state == "succeeded"
    assert set(rec.reasons()) == {"statement_timeout"}
    assert len(rec.failures) >= 3
    sizes = [c.size for c in rec.commits]
    smallest = min(sizes)
    assert smallest < 50, sizes  # shrunk until a slice held a single slow row
    # Retries of one slice (same cursor) halve the size each time.
    for (_, c1, s1), (_, c2, s2) in zip(rec.failures, rec.failures[1:], strict=False):
        if c1 == c2:
            assert s2 == s1 // 2, rec.failures
    # Then it grows back gradually (at most x1.5 a batch), up to the target.
    after = sizes[sizes.index(smallest):]
    steps = list(itertools.pairwise(after))
    assert all(b <= max(a + 1, a * 3 // 2) for a, b in steps if b > a), after
    assert 400 in after, after
    await exactly_once(admin, 1, ROWS)
    figures["statement_timeouts_retried"] += len(rec.failures)


async def test_shrinking_stops_at_min_size_then_gives_up(
    db: Database, admin: asyncpg.Connection
) -> None:
    await seed_users(db, f"generate_series(1, {ROWS})")
    rec = Recorder()
    with pytest.raises(Unavailable, match="giving up after 4 consecutive failed attempts") as err:
        await commands.run(
            job(batch={"size": 1000, "min_size": 400},
                limits={"statement_timeout": "300ms", "lock_timeout": "100ms", "max_retries": 3}),
            db.params, observers=[rec],
        )
    assert err.value.exit_code == ExitCode.UNAVAILABLE
    assert [size for _, _, size in rec.failures] == [1000, 500, 400, 400]
    ckpt = await checkpoint_is_exact(admin, NAME)
    assert ckpt["state"] == "failed"

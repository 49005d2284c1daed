"""Key-range planning: fixing a job's key range when it first starts, and splitting it into
shards that hold about the same number of rows.

Boundaries come from a page sample of the key distribution (not max-min/N), so sparse or skewed
keys still split evenly. They are computed once, by whichever runner of the job comes first,
under a job-wide lock, and stored as the shards' checkpoints: every runner sees the same ones
whatever order they start in.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import asyncpg

from backfill import sql
from backfill.checkpoint import Key, key_param
from backfill.errors import ConfigError
from backfill.job import Job
from backfill.sql import Target

log = logging.getLogger(__name__)

# The sample that places shard boundaries: at least this many rows and pages (a page sample's
# accuracy depends on how many pages it reads), sorted on the server; only the cuts travel.
SAMPLE_ROWS = 200_000
SAMPLE_PAGES = 5_000
_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
CREATING = -1  # the advisory-lock slot held while a job's checkpoints are created


@dataclass(frozen=True, slots=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based); the default is the whole range."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        m = _SHARD.match(text)
        if not m or not 0 <= int(m.group(1)) < int(m.group(2)) <= 1024:
            raise ConfigError(f"--shard: {text!r} is not i/N with 0 <= i < N <= 1024")
        return cls(int(m.group(1)), int(m.group(2)))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


WHOLE = Shard()


@dataclass(frozen=True, slots=True)
class Span:
    """One shard's slice of the range: keys after ``cursor`` (or from ``lo``) up to ``hi``."""

    lo: Key | None
    hi: Key | None
    cursor: Key | None


def split(lo: Key | None, hi: Key | None, cuts: Sequence[Key], count: int) -> list[Span]:
    """Cut ``[lo, hi]`` at ``cuts`` (in key order) into ``count`` contiguous spans.

    Shard i > 0 starts after cut i; missing cuts (a tiny sample) leave the last shards empty.
    """
    if lo is None or hi is None:
        return [Span(None, None, None) for _ in range(count)]
    cuts = [*cuts[: count - 1], *[hi] * (count - 1 - len(cuts))]
    starts: list[Key] = [lo, *cuts]
    ends: list[Key] = [*cuts, hi]
    return [
        Span(lo=start, hi=end, cursor=None if i == 0 else start)
        for i, (start, end) in enumerate(zip(starts, ends, strict=True))
    ]


async def bounds(conn: asyncpg.Connection, target: Target) -> tuple[Key | None, Key | None]:
    """The table's lowest and highest key today (None, None when it is empty)."""
    lo, hi = await conn.fetchrow(sql.key_bounds(target)) or (None, None)
    return (tuple(lo) if lo else None), (tuple(hi) if hi else None)


async def create_checkpoints(
    conn: asyncpg.Connection, job: Job, target: Target, *, shards: int,
    before_range: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
) -> None:
    """Fix the key range and create the job's checkpoint rows, unless a runner already did.
    ``before_range`` runs first in the same transaction (a copy's sync trigger goes in there:
    no write the range misses escapes it)."""
    async with conn.transaction():
        # A transaction-level lock: released at commit, so only one runner ever plans.
        await conn.execute(sql.LOCK_CREATING, job.name, CREATING)
        existing = await conn.fetchval(sql.SHARD_COUNT, job.name)
        if existing:
            if existing != shards:
                raise mismatch(job.name, existing, shards)
            return
        if before_range is not None:
            await before_range(conn)
        lo, hi = await bounds(conn, target)
        cuts: list[Key] = []
        if shards > 1 and lo is not None:
            percent = await _sample_percent(conn, job)
            args = (percent, list(lo), list(hi or ()), shards)
            cuts = [tuple(r[0]) for r in await conn.fetch(sql.quantiles(target), *args)]
        spans = split(lo, hi, cuts, shards)
        await conn.executemany(
            sql.CREATE,
            [
                (job.name, i, shards, job.fingerprint, job.table.display,
                 key_param(s.lo), key_param(s.hi), key_param(s.cursor), job.shape)
                for i, s in enumerate(spans)
            ],
        )
        log.info(
            "new checkpoint; key range fixed",
            extra={"job": job.name, "range_lo": lo, "range_hi": hi, "shards": shards,
                   "boundaries": [s.hi for s in spans[:-1]]},
        )


def mismatch(name: str, existing: int, asked: int) -> ConfigError:
    return ConfigError(
        f"job {name} was split into {existing} shard(s) when it started; this run asks for "
        f"{asked}: use --shard i/{existing}, or `backfill reset {name} --yes` to start over"
    )


async def _sample_percent(conn: asyncpg.Connection, job: Job) -> float:
    """A page-sample percentage that reads at least SAMPLE_ROWS rows and SAMPLE_PAGES pages."""
    row = await conn.fetchrow(sql.TABLE_SIZE, job.table.schema_, job.table.name)
    tuples, pages = (float(row[0]), float(row[1])) if row else (-1.0, 0.0)
    if tuples <= 0:  # never analysed: assume ~50 rows a page
        tuples = pages * 50
    share = max(SAMPLE_ROWS / max(tuples, 1.0), SAMPLE_PAGES / max(pages, 1.0))
    return min(100.0, max(0.01, 100.0 * share))


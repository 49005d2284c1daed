"""A sampled progress estimate for keys whose position in the range cannot be computed (text).

Once per run, right after the run's checkpoint is loaded (so the key range is fixed, whichever
shard this is), a short-lived connection counts the keys of a page sample (``TABLESAMPLE
SYSTEM``, about ``SAMPLE_PAGES`` pages per shard) that lie in the checkpoint's range and at or
below its cursor, scaled by the table's pages over the pages sampled. The comparisons run on the
server in the key's own type and collation, so they agree with the order the batches follow.
From then on, each committed batch adds the keys it covered (exactly its size). The statement has
the job's statement_timeout like every other; when it fails, progress stays unknown and the run
goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import anyio

from backfill import catalog, sql
from backfill.checkpoint import SUCCEEDED, Checkpoint, key_param
from backfill.connector import open_connection
from backfill.conninfo import ConnectParams
from backfill.job import Job
from backfill.observers import Quiet
from backfill.pg import CLIENT_SLACK
from backfill.progress import KeyEstimate, Tracker, fraction

log = logging.getLogger(__name__)

SAMPLE_PAGES = 500  # random pages read, per shard


class FirstStart(Quiet):
    """An observer that remembers the checkpoint the run first started from."""

    def __init__(self) -> None:
        self.checkpoint: Checkpoint | None = None
        self.event = anyio.Event()

    def started(self, checkpoint: Checkpoint) -> None:
        if self.checkpoint is None:
            self.checkpoint = checkpoint
            self.event.set()


def needs_estimate(checkpoint: Checkpoint) -> bool:
    """True when the cursor's position in the range cannot be computed (text keys)."""
    lo = checkpoint.range_lo
    return (
        lo is not None
        and checkpoint.state != SUCCEEDED
        and fraction(lo, checkpoint.range_hi, lo) is None
    )


async def sample(params: ConnectParams, job: Job, checkpoint: Checkpoint) -> KeyEstimate:
    """Count a page sample's keys in the checkpoint's range and at or below its cursor."""
    conn = await open_connection(params, job)
    try:
        target = await catalog.resolve(conn, job)
        rel = await conn.fetchrow(sql.RELATION, job.table.schema_, job.table.name)
        assert rel is not None  # resolve() found it
        pages = int(await conn.fetchval(sql.TABLE_PAGES, rel["oid"]) or 0)
        wanted = SAMPLE_PAGES * max(1, checkpoint.shards)
        percent = 100.0 if pages <= wanted else 100.0 * wanted / pages
        row = await conn.fetchrow(
            sql.sample_counts(target),
            percent,
            key_param(checkpoint.range_lo),
            key_param(checkpoint.range_hi),
            key_param(checkpoint.cursor),
        )
    finally:
        await conn.close(timeout=2)
    assert row is not None  # an aggregate always returns a row
    # Scale by the pages actually sampled (SYSTEM picks each page with probability p, so their
    # number varies by ~sqrt(n)); the rows per page vary much less.
    scale = pages / row["pages"] if row["pages"] and pages else 100.0 / percent
    return KeyEstimate(total=row["in_range"] * scale, done=row["done"] * scale)


async def estimate_progress(
    params: ConnectParams,
    job: Job,
    first: FirstStart,
    tracker: Tracker,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Wait for the run's first checkpoint; when its keys need it, give the run's ``tracker``
    an estimate. Best effort: a failure is logged and progress stays unknown."""
    await first.event.wait()
    checkpoint = first.checkpoint
    if checkpoint is None or not needs_estimate(checkpoint):
        return
    budget = job.limits.connect_timeout + job.limits.statement_timeout * 4 + CLIENT_SLACK
    estimate: KeyEstimate | None = None
    with anyio.move_on_after(budget):
        try:
            estimate = await sample(params, job, checkpoint)
        except Exception as exc:  # best effort: the loop reports real problems itself
            log.warning(
                "progress estimate unavailable: progress and ETA stay unknown",
                extra={"job": job.name, "error": f"{type(exc).__name__}: {exc}"},
            )
            return
    if estimate is None:
        log.warning("progress estimate timed out", extra={"job": job.name})
        return
    log.info(
        "progress estimated from a page sample",
        extra={"job": job.name, "keys": round(estimate.total), "done": round(estimate.done)},
    )
    tracker.use_estimate(estimate, clock())


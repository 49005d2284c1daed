"""Helpers for the throttling and live-control tests: an observer that wakes waiters on every
event, a database-side log of commits and state changes, and polling a condition."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import anyio

from backfill import commands
from backfill.checkpoint import BatchResult, Checkpoint, Key
from backfill.errors import BatchFailure
from backfill.job import Job
from backfill.observers import Progress
from backfill.progress import Tracker
from backfill.protocols import Pause
from tests.conftest import Database


@dataclass
class Watch:
    """Records a run's events (with monotonic times) and wakes ``until`` on each."""

    commits: list[tuple[float, BatchResult]] = field(default_factory=list)
    pauses: list[Pause] = field(default_factory=list)
    states: list[str] = field(default_factory=list)
    progress: Progress = field(default_factory=lambda: Progress(Tracker()))
    _event: anyio.Event = field(default_factory=anyio.Event)

    def _poke(self) -> None:
        self._event.set()
        self._event = anyio.Event()

    def started(self, checkpoint: Checkpoint) -> None:
        self.progress.started(checkpoint)
        self._poke()

    def committed(self, result: BatchResult) -> None:
        self.commits.append((time.monotonic(), result))
        self.progress.committed(result)
        self._poke()

    def failed(self, failure: BatchFailure, *, cursor: Key | None, size: int) -> None:
        self._poke()

    def skipped(self, key: Key) -> None:
        self._poke()

    def throttled(self, pause: Pause) -> None:
        self.pauses.append(pause)
        self.progress.throttled(pause)
        self._poke()

    def state(self, state: str) -> None:
        self.states.append(state)
        self.progress.state(state)
        self._poke()

    def count(self, reason: str) -> int:
        return sum(p.reason == reason for p in self.pauses)

    @property
    def throttle_seconds(self) -> dict[str, float]:
        return self.progress.tracker.throttle_seconds

    async def until(self, condition: Callable[[], bool], *, within: float) -> None:
        """Wait for the run's events to make ``condition`` true."""
        with anyio.fail_after(within):
            while True:
                event = self._event
                if condition():
                    return
                await event.wait()


async def poll(condition: Callable[[], Awaitable[Any]], *, within: float) -> Any:
    """Poll an async condition (e.g. a query) until it returns something truthy."""
    with anyio.fail_after(within):
        while True:
            if value := await condition():
                return value
            await anyio.sleep(0.02)  # the database has no event to wait on


LOG = """
CREATE TABLE public.test_log (
    id bigserial PRIMARY KEY, at timestamptz NOT NULL, batches bigint, rows bigint, state text
);
CREATE FUNCTION public.test_log() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.batches <> OLD.batches THEN
        INSERT INTO public.test_log (at, batches, rows)
        VALUES (clock_timestamp(), NEW.batches, NEW.rows_updated - OLD.rows_updated);
    ELSIF NEW.state <> OLD.state THEN
        INSERT INTO public.test_log (at, state) VALUES (clock_timestamp(), NEW.state);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER test_log AFTER UPDATE ON backfill.checkpoints
    FOR EACH ROW EXECUTE FUNCTION public.test_log();
"""


@dataclass(frozen=True)
class Entry:
    at: datetime
    batches: int | None
    rows: int | None
    state: str | None


async def install_log(db: Database) -> None:
    """Log every committed batch and every change of the checkpoint's state, by the database's
    clock, from inside the transactions that make them."""
    await db.execute(LOG)


async def read_log(db: Database) -> list[Entry]:
    rows = await db.fetch("SELECT at, batches, rows, state FROM public.test_log ORDER BY id")
    return [Entry(*r) for r in rows]


def cheap_then_expensive_set(boundary: int) -> str:
    """A SET whose rows cost ~1/20 of a 1 ms server-side sleep up to ``boundary`` and ~1/2 of
    one after it: sleeping costs wall-clock time but hardly any CPU on a shared machine."""
    return (
        "display_name = first_name || CASE WHEN id % 20 = 0 OR (id > "
        f"{boundary} AND id % 2 = 0) THEN pg_sleep(0.001)::text ELSE '' END, touched = touched + 1"
    )


@asynccontextmanager
async def running(job: Job, db: Database, watch: Watch, *, within: float = 60
                  ) -> AsyncIterator[list[Checkpoint]]:
    """Runs ``job`` while the block runs, and to its end after (within ``within`` seconds);
    yields the list its final checkpoint is appended to."""
    outcome: list[Checkpoint] = []

    async def run() -> None:
        outcome.append(await commands.run(job, db.params, observers=[watch]))

    with anyio.fail_after(within):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            yield outcome

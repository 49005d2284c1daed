"""The seams the run loop talks to. Only their implementations import asyncpg."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from backfill.checkpoint import BatchResult, Checkpoint, Key
from backfill.errors import BatchFailure


class Session(Protocol):
    """A connection that holds the job's lock and its loaded checkpoint."""

    @property
    def checkpoint(self) -> Checkpoint: ...

    async def run_batch(self, cursor: Key | None, size: int) -> BatchResult:
        """Update the next ``size`` keys after ``cursor`` and commit the new cursor with them.

        Raises a ``BatchFailure`` subclass when the attempt rolled back.
        """
        ...

    async def next_key(self, cursor: Key | None) -> Key | None:
        """The first key after ``cursor`` in the range (names a poison row)."""
        ...

    async def skip(self, key: Key) -> None:
        """Record ``key`` as skipped and move the cursor to it, in one transaction."""
        ...

    async def finish(self, state: str, *, error: str | None = None) -> None:
        """Save the run's final state and close its history row."""
        ...


class Connector(Protocol):
    def session(self) -> AbstractAsyncContextManager[Session]:
        """Connect, take the job's lock, load (or create) the checkpoint.

        Raises ``ConnectionLost`` when the database cannot be reached, ``JobBusy`` when another
        runner holds the job, ``ConfigError`` for anything a retry cannot fix.
        """
        ...


@dataclass(frozen=True, slots=True)
class Pause:
    seconds: float
    reason: str  # sleep, rate_limit, replication_lag, ..., paused, backoff


class Throttle(Protocol):
    async def next_pause(self, last: BatchResult | None) -> Pause | None:
        """How long to wait before the next batch, and why; None to go on.

        Called with the batch just committed, then again with None after each pause it
        returned, until it returns None.
        """
        ...


class Observer(Protocol):
    """Receives what really happened; metrics, logs and the progress line implement it."""

    def started(self, checkpoint: Checkpoint) -> None: ...

    def committed(self, result: BatchResult) -> None: ...

    def failed(self, failure: BatchFailure, *, cursor: Key | None, size: int) -> None: ...

    def skipped(self, key: Key) -> None: ...

    def throttled(self, pause: Pause) -> None: ...

    def state(self, state: str) -> None: ...

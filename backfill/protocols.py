"""The seams the run loop talks to. Only their implementations import asyncpg."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from backfill.checkpoint import BatchResult, Checkpoint, Key, State
from backfill.errors import BatchFailure


class Session(Protocol):
    """A connection that holds the job's lock and its loaded checkpoint."""

    @property
    def checkpoint(self) -> Checkpoint: ...

    async def run_batches(
        self, cursor: Key | None, size: int, *, within: float = 0.0
    ) -> Sequence[BatchResult]:
        """Update the next ``size`` keys after ``cursor`` and commit the new cursor with them;
        or, when the loop may go on for ``within`` seconds without a decision, as many such
        batches as fit, each its own transaction. Returns what each committed: one result,
        or several (a last ``cursor`` None: the range is exhausted).

        Raises a ``BatchFailure`` subclass when an attempt rolled back; its ``committed`` holds
        the batches that committed before it.
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


class Reason(StrEnum):
    """Why the runner waits: every second it spends not writing is attributed to exactly one
    of these (the ``reason`` label of ``backfill_throttle_seconds_total``, the log, ``status``)."""

    SLEEP = "sleep"
    RATE_LIMIT = "rate_limit"
    REPLICATION_LAG = "replication_lag"
    SLOT_LAG = "slot_lag"
    ACTIVE_SESSIONS = "active_sessions"
    HEALTH_QUERY = "health_query"
    APP_LATENCY = "app_latency"
    IMPACT = "impact"
    PAUSED = "paused"
    BACKOFF = "backoff"


THROTTLE_REASONS = tuple(Reason)


@dataclass(frozen=True, slots=True)
class Pause:
    seconds: float
    reason: Reason


class Throttle(Protocol):
    """A caller's own throttle (``run(throttles=...)``), asked after the run's governor."""

    async def next_pause(self, last: BatchResult | None) -> Pause | None:
        """How long to wait before the next batch, and why; None to go on.

        Called with the batch (or group) just committed, then again with None after each
        pause it returned, until it returns None. An optional ``runway()`` says as
        ``Governing.runway`` does (a throttle without it is asked after every batch).
        """
        ...


@dataclass(frozen=True, slots=True)
class Decision:
    """What the run's throttles decided before the next batch; the loop applies it."""

    pause: Pause | None  # wait this long first (None: go on)
    ceiling: int | None = None  # the most keys the next batches may take (None: no ceiling)
    state: State = State.RUNNING  # what holds the run shows as (running, throttled, paused)
    holding: Reason | None = None  # what holds the run back now (a gate, the budget...)


class Governing(Protocol):
    """The loop's side of the throttles (``backfill.throttling.governor``)."""

    async def decide(self, last: BatchResult | None) -> Decision:
        """Called with the batch (or group) just committed, then again with None after each
        pause decided, until a decision has no pause."""
        ...

    def runway(self) -> float:
        """Seconds from now the runner may go on, batch after batch, before it must ask
        again; 0 to be asked after every batch."""
        ...


class Observer(Protocol):
    """Receives what really happened; metrics, logs and the progress line implement it."""

    def started(self, checkpoint: Checkpoint) -> None: ...

    def committed(self, result: BatchResult) -> None: ...

    def failed(self, failure: BatchFailure, *, cursor: Key | None, size: int) -> None: ...

    def skipped(self, key: Key) -> None: ...

    def throttled(self, pause: Pause) -> None: ...

    def state(self, state: str) -> None: ...


class Sizing(Protocol):
    """The batch settings in force (``[batch]``, live overrides applied)."""

    @property
    def size(self) -> int: ...

    @property
    def max_size(self) -> int: ...

    @property
    def target_seconds(self) -> float | None: ...


class ControlSink(Protocol):
    def apply(self, overrides: Mapping[str, Any]) -> None:
        """Live overrides as the checkpoint holds them (``control``): the loop passes them on
        when a session opens and after every committed batch."""
        ...

    @property
    def sizing(self) -> Sizing:
        """The batch settings in force now (also after the governor polled ``control``): the
        loop tunes its sizer to them."""
        ...


class Probe(Protocol):
    """A runner's small second connection: health gates, and live control while no batch runs.

    Every method raises when the check cannot be made (the caller decides what that means).
    """

    async def control(self) -> Mapping[str, Any]:
        """The shard's live overrides, read now."""
        ...

    async def set_state(self, state: str) -> None:
        """Show ``state`` (paused, throttled, running) in the checkpoint while a run is on."""
        ...

    async def replication_lag(self) -> float:
        """The largest replay lag of any standby, in seconds (0 without standbys)."""
        ...

    async def slot_lag_bytes(self) -> int:
        """The most WAL any logical replication slot retains, in bytes (0 without slots)."""
        ...

    async def active_sessions(self) -> int:
        """Sessions active on the database now, other than this runner's."""
        ...

    async def healthy(self) -> bool:
        """The job's ``health_query``."""
        ...

    async def statements(self) -> tuple[dict[int, tuple[int, float]], int] | None:
        """The application's statements in ``pg_stat_statements`` (the runner's own left out):
        per queryid its calls and the sum of its times (milliseconds)
        so far, and how many rows of other roles it hides; None where it is not installed."""
        ...

    async def others(self, within: float) -> tuple[int, int]:
        """Client sessions other than the runner's at work now or within ``within`` seconds,
        and those whose state the role may not see."""
        ...

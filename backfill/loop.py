"""The run loop: batch after batch until the key range is done, a stop is requested or an
error decides otherwise. It talks only to the seams in ``backfill.protocols``.

Each batch commits its own checkpoint, so the loop keeps no state that matters after a crash:
on a lost connection it reconnects, reloads the checkpoint and goes on from what really
committed.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio

from backfill.checkpoint import (
    FAILED,
    INTERRUPTED,
    PAUSED,
    RUNNING,
    SUCCEEDED,
    THROTTLED,
    BatchResult,
    Checkpoint,
    Key,
    show_key,
)
from backfill.errors import (
    BackfillError,
    BatchFailure,
    ConnectionLost,
    Contention,
    DataFailure,
    Interrupted,
    RowError,
    StatementTimeout,
    Superseded,
    Unavailable,
)
from backfill.protocols import (
    Connector,
    ControlSink,
    Decision,
    Governing,
    Observer,
    Pause,
    Reason,
    Session,
    Sizing,
)
from backfill.shutdown import Stop
from backfill.sizing import Sizer
from backfill.throttling.pacing import Backoff

log = logging.getLogger(__name__)

# Seconds allowed for saving the final state on the way out (the Job's grace period counts it).
SAVE_BUDGET = 5.0

# Reconnecting waits at most this long between attempts (batch retries may wait up to the
# backoff's cap): an attempt against a database that is down costs one refused connection,
# and a run should resume within seconds of the database coming back, not half a minute.
RECONNECT_CAP = 5.0


@dataclass(frozen=True, slots=True)
class Policy:
    """What the loop needs from the job: plain values, no I/O."""

    job: str
    max_retries: int
    connect_retry_seconds: float
    skip_bad_rows: bool


@dataclass(slots=True)
class _Failures:
    """Consecutive failed attempts; past ``limit`` the run gives up with exit 69."""

    limit: int
    count: int = 0

    def add(self, failure: BatchFailure) -> int:
        self.count += 1
        if self.count > self.limit:
            raise Unavailable(
                f"giving up after {self.count} consecutive failed attempts "
                f"(last: {failure.reason}: {failure})"
            ) from failure
        return self.count


class Loop:
    def __init__(
        self,
        policy: Policy,
        connector: Connector,
        *,
        sizer: Sizer,
        throttle: Governing,
        observer: Observer,
        stop: Stop,
        backoff: Backoff | None = None,
        control: ControlSink | None = None,
    ) -> None:
        self.policy = policy
        self.connector = connector
        # The loop's own: sized by its batches, tuned by live control, capped by the throttles.
        self.sizer = sizer
        self.throttle = throttle
        self.observer = observer
        self.stop = stop
        self.backoff = backoff or Backoff()
        self._sizing: Sizing | None = None  # the batch settings the sizer was last tuned to
        self.control = control
        self.failures = _Failures(policy.max_retries)
        # What the last session knew it had committed (rows, batches), and whether it ended
        # with a lost connection (so the next one may find more than it knew).
        self._counted: tuple[int, int] | None = None
        self._reconnecting = False

    async def run(self) -> Checkpoint:
        """Run to the end of the range. Returns the final checkpoint.

        Raises ``Interrupted`` after a graceful stop, ``RowError``, ``Unavailable`` or
        ``ConfigError`` otherwise; the checkpoint is always what really committed.
        """
        while True:
            try:
                async with self._connect() as session:
                    return await self._work(session)
            except ConnectionLost as lost:
                self._reconnecting = not isinstance(lost, Superseded)
                # Observers first: the attempt that exhausts max_retries counts too.
                self.observer.failed(lost, cursor=None, size=self.sizer.size)
                attempt = self.failures.add(lost)
                log.warning(
                    "connection lost; reconnecting",
                    extra={"job": self.policy.job, "error": str(lost), "attempt": attempt},
                )
                await self._back_off(attempt, at_most=RECONNECT_CAP)
                if self.stop.requested:
                    raise Interrupted(f"stopped ({self.stop.reason}) while reconnecting") from lost

    @asynccontextmanager
    async def _connect(self) -> AsyncIterator[Session]:
        """Open a session, retrying an unreachable database for ``connect_retry_seconds``."""
        deadline = anyio.current_time() + self.policy.connect_retry_seconds
        attempt = 0
        async with AsyncExitStack() as stack:
            while True:
                try:
                    session = await stack.enter_async_context(self.connector.session())
                    break
                except (ConnectionLost, Contention, StatementTimeout) as lost:
                    # Opening a session reads the catalog, the key range and the checkpoint:
                    # a lock held by a migration or a busy server is as passing as a lost
                    # connection, and retried the same way.
                    attempt += 1
                    if self.stop.requested:
                        stopped = f"stopped ({self.stop.reason}) while connecting"
                        raise Interrupted(stopped) from lost
                    if anyio.current_time() >= deadline:
                        what = "database unavailable" if isinstance(lost, ConnectionLost) else (
                            f"could not open a session ({lost.reason})")
                        raise Unavailable(f"{what}: {lost}") from lost
                    log.warning(
                        "could not open a session; retrying",
                        extra={"job": self.policy.job, "reason": lost.reason, "error": str(lost),
                               "attempt": attempt},
                    )
                    # Never sleep past the deadline: the last attempt is made at it.
                    left = deadline - anyio.current_time()
                    await self._back_off(attempt, at_most=min(RECONNECT_CAP, left))
            yield session

    async def _work(self, session: Session) -> Checkpoint:
        try:
            return await self._batches(session)
        finally:
            ckpt = session.checkpoint
            self._counted = (ckpt.rows_updated, ckpt.batches)

    async def _batches(self, session: Session) -> Checkpoint:
        checkpoint = session.checkpoint
        self._catch_up(checkpoint)
        self.observer.started(checkpoint)
        self._apply_control(checkpoint.control)  # e.g. a pause that outlived the last run
        if checkpoint.state == SUCCEEDED or checkpoint.empty:
            await session.finish(SUCCEEDED)
            self.observer.state(SUCCEEDED)
            return session.checkpoint
        self.observer.state(RUNNING)
        cursor = checkpoint.cursor
        last: BatchResult | None = None
        steady = False  # the last attempt committed: the next may be grouped
        try:
            while True:
                await self._pauses(last)
                if self.stop.requested:
                    raise Interrupted(f"stopped ({self.stop.reason}); checkpoint saved")
                size = self.sizer.batch
                # Batches may run grouped while nothing needs deciding between them: not after a
                # failure, nor while the size is being adjusted, nor when a throttle says so.
                grouped = steady and self.sizer.settled
                within = self.throttle.runway() if grouped else 0.0
                try:
                    results = await session.run_batches(cursor, size, within=within)
                except BatchFailure as failure:
                    steady, last = False, None
                    for result in failure.committed:  # its group's batches before it
                        cursor = self._commit(result)
                    if isinstance(failure, ConnectionLost):
                        raise
                    if isinstance(failure, DataFailure):
                        cursor = await self._bisect(session, failure, cursor, size)
                    else:
                        await self._retry(failure, cursor, size)
                    continue
                for last in results:
                    if last.cursor is None:
                        await session.finish(SUCCEEDED)
                        self.observer.state(SUCCEEDED)
                        return session.checkpoint
                    cursor = self._commit(last)
                steady = True
        except Interrupted as stop:
            await _quietly(session.finish(INTERRUPTED, error=str(stop)))
            self.observer.state(INTERRUPTED)
            raise
        except anyio.get_cancelled_exc_class():
            # Aborted (a second signal): the driver cancelled the batch in flight on the
            # server, so it rolled back. Say so in the checkpoint, or `status` would show a
            # stopped job as running (and the next run would log this one as killed).
            aborted = "aborted; the batch in flight rolled back"
            await _quietly(session.finish(INTERRUPTED, error=aborted))
            self.observer.state(INTERRUPTED)
            raise
        except BackfillError as error:
            await _quietly(session.finish(FAILED, error=str(error)))
            self.observer.state(FAILED)
            raise

    def _commit(self, result: BatchResult) -> Key | None:
        """What follows committed batches: sizing, live control, observers."""
        self.failures.count = 0
        self.sizer.succeeded(result.seconds, result.size)
        self._apply_control(result.control)
        self.observer.committed(result)
        return result.cursor

    def _catch_up(self, checkpoint: Checkpoint) -> None:
        """Batches that committed as the connection was lost (a group's, or one whose answer
        never arrived) are counted when the next session finds them in the checkpoint."""
        if self._counted is not None and self._reconnecting:
            rows, batches = self._counted
            for n in range(checkpoint.batches - batches):  # their rows, on the first of them
                self.observer.committed(BatchResult(
                    cursor=checkpoint.cursor, rows=0 if n else checkpoint.rows_updated - rows,
                    size=self.sizer.size, seconds=0.0,
                ))
        self._reconnecting = False

    async def _pauses(self, last: BatchResult | None) -> None:
        decision = self._apply(await self.throttle.decide(last))
        if decision.pause is None:
            return
        # A long wait comes in slices (each reported, so metrics stay fresh); the state goes
        # back to running once, when the wait is over.
        while decision.pause is not None and not self.stop.requested:
            await self._wait(decision.pause)
            decision = self._apply(await self.throttle.decide(None))
        self.observer.state(RUNNING)

    def _apply(self, decision: Decision) -> Decision:
        """The sizer follows the settings in force and the throttles' ceiling."""
        if self.control is not None and self.control.sizing != self._sizing:
            self._sizing = self.control.sizing
            self.sizer.tune(self._sizing)
        self.sizer.limit(decision.ceiling)
        return decision

    async def _wait(self, pause: Pause) -> None:
        self.observer.state(PAUSED if pause.reason == Reason.PAUSED else THROTTLED)
        self.observer.throttled(Pause(await self.stop.sleep(pause.seconds), pause.reason))

    async def _back_off(self, attempt: int, *, at_most: float | None = None) -> None:
        delay = self.backoff.delay(attempt)
        pause = Pause(delay if at_most is None else min(delay, at_most), Reason.BACKOFF)
        await self._wait(pause)
        self.observer.state(RUNNING)

    async def _retry(self, failure: BatchFailure, cursor: Key | None, size: int) -> None:
        self.observer.failed(failure, cursor=cursor, size=size)
        attempt = self.failures.add(failure)
        if isinstance(failure, StatementTimeout):
            self.sizer.timed_out()
        log.warning(
            "batch rolled back; retrying",
            extra={
                "job": self.policy.job,
                "reason": failure.reason,
                "keys_after": cursor,
                "size": size,
                "next_size": self.sizer.batch,
                "attempt": attempt,
            },
        )
        await self._back_off(attempt)

    async def _bisect(
        self, session: Session, failure: DataFailure, cursor: Key | None, size: int
    ) -> Key | None:
        """Narrow a data error down to one row by halving the slice; good halves commit."""
        self.observer.failed(failure, cursor=cursor, size=size)
        if self.sizer.split():
            return cursor
        key = await session.next_key(cursor)
        if key is None:  # the row vanished meanwhile; try again from the same cursor
            return cursor
        if not self.policy.skip_bad_rows:
            raise RowError(
                f"row with key {show_key(key)} makes the SET fail: {failure}", keys=key
            ) from failure
        await session.skip(key)
        self.observer.skipped(key)
        log.error(
            "skipped a row the SET cannot update",
            extra={"job": self.policy.job, "keys": list(key), "error": str(failure)},
        )
        return key

    def _apply_control(self, overrides: Mapping[str, Any]) -> None:
        """Live overrides (``backfill pause``/``set``) go to the control sink, which the
        throttles read (and the sizer at the next decision)."""
        if self.control is not None:
            self.control.apply(overrides)


async def _quietly(awaitable: Awaitable[None]) -> None:
    """Best-effort bookkeeping on the way out: shielded, bounded, never masks the real error."""
    with anyio.move_on_after(SAVE_BUDGET, shield=True):
        try:
            await awaitable
        except Exception as exc:
            log.warning("could not save final state", extra={"error": str(exc)})

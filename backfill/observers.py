"""Observers of a run: the shared progress, and the structured log (the live bar on a terminal
is ``backfill.progressbar``).

They read the same ``Tracker``; none logs a line per batch at the default level.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from backfill.checkpoint import THROTTLED, BatchResult, Checkpoint, Key
from backfill.errors import BatchFailure, DataFailure
from backfill.progress import Tracker
from backfill.protocols import Observer, Pause, Reason

log = logging.getLogger(__name__)


class Quiet:
    """An observer that ignores everything: subclass it and override what you need."""

    def started(self, checkpoint: Checkpoint) -> None:
        pass

    def committed(self, result: BatchResult) -> None:
        pass

    def failed(self, failure: BatchFailure, *, cursor: Key | None, size: int) -> None:
        pass

    def skipped(self, key: Key) -> None:
        pass

    def throttled(self, pause: Pause) -> None:
        pass

    def state(self, state: str) -> None:
        pass


@dataclass
class Fanout:
    """Send every event to each observer in turn."""

    observers: Sequence[Observer]

    def started(self, checkpoint: Checkpoint) -> None:
        for o in self.observers:
            o.started(checkpoint)

    def committed(self, result: BatchResult) -> None:
        for o in self.observers:
            o.committed(result)

    def failed(self, failure: BatchFailure, *, cursor: Key | None, size: int) -> None:
        for o in self.observers:
            o.failed(failure, cursor=cursor, size=size)

    def skipped(self, key: Key) -> None:
        for o in self.observers:
            o.skipped(key)

    def throttled(self, pause: Pause) -> None:
        for o in self.observers:
            o.throttled(pause)

    def state(self, state: str) -> None:
        for o in self.observers:
            o.state(state)


@dataclass
class Progress(Quiet):
    """Keeps the shared ``Tracker`` current; other observers read it."""

    tracker: Tracker
    clock: Callable[[], float] = time.monotonic

    def started(self, checkpoint: Checkpoint) -> None:
        self.tracker.start(checkpoint, self.clock())

    def committed(self, result: BatchResult) -> None:
        self.tracker.commit(result, self.clock())

    def throttled(self, pause: Pause) -> None:
        seconds = self.tracker.throttle_seconds
        seconds[pause.reason] = seconds.get(pause.reason, 0.0) + pause.seconds


def summary(progress: Progress) -> dict[str, object]:
    t = progress.tracker
    done = t.fraction
    return {
        "rows": t.rows,
        "batches": t.batches,
        "percent": None if done is None else round(100 * done, 2),
        "rows_per_second": round(t.rows_per_second(), 1),
        "eta_seconds": None if (eta := t.eta_seconds()) is None else round(eta),
        "batch_size": t.size,
    }


# Pauses that come with every batch (sleep, rate_limit while the ceiling binds, impact while the
# budget paces), follow a logged retry (backoff) or have their own line (paused; impact, which
# the governor logs with what it measured): no line each.
_ROUTINE_PAUSES = frozenset({Reason.SLEEP, Reason.RATE_LIMIT, Reason.BACKOFF, Reason.PAUSED,
                             Reason.IMPACT})


@dataclass
class LogLines(Quiet):
    """JSON-friendly log: a line per state change, per throttle episode, per retried batch
    (the loop logs most; this logs the data errors it narrows down), and a progress line at most
    every ``every`` seconds. Never a line per batch."""

    job: str
    progress: Progress
    every: float = 30.0
    shape: str = "update"  # what the batches do, on the lines that count rows
    clock: Callable[[], float] = time.monotonic
    _last_state: str = ""
    _next_report: float = 0.0
    _throttle: str = ""  # the reason of the throttle episode under way, if any

    def started(self, checkpoint: Checkpoint) -> None:
        self._next_report = self.clock() + self.every
        log.info(
            "run started",
            extra={"job": self.job, "shape": self.shape, "state": checkpoint.state,
                   "cursor": checkpoint.cursor,
                   "rows": checkpoint.rows_updated, "range_lo": checkpoint.range_lo,
                   "range_hi": checkpoint.range_hi},
        )

    def _report(self) -> None:
        if self.clock() >= self._next_report:
            self._next_report = self.clock() + self.every
            log.info("progress", extra={"job": self.job, "shape": self.shape,
                                        **summary(self.progress)})

    def committed(self, result: BatchResult) -> None:
        if self._throttle:
            log.info("throttle ended", extra={"job": self.job, "reason": self._throttle})
            self._throttle = ""
        self._report()

    def failed(self, failure: BatchFailure, *, cursor: Key | None, size: int) -> None:
        # The loop logs retries, lost connections and skipped rows; a data error's slice is
        # narrowed down without a retry, so its attempts are logged here.
        if isinstance(failure, DataFailure):
            log.warning(
                "batch rolled back on a data error; narrowing it down",
                extra={"job": self.job, "reason": failure.reason, "keys_after": cursor,
                       "size": size, "error": str(failure)},
            )

    def throttled(self, pause: Pause) -> None:
        if pause.reason not in _ROUTINE_PAUSES and pause.reason != self._throttle:
            self._throttle = pause.reason
            log.info(
                "throttled",
                extra={"job": self.job, "reason": pause.reason,
                       "seconds": round(pause.seconds, 3)},
            )
        self._report()

    def state(self, state: str) -> None:
        if state != self._last_state and state != THROTTLED:
            self._last_state = state
            log.info("state", extra={"job": self.job, "shape": self.shape, "state": state,
                                     **summary(self.progress)})

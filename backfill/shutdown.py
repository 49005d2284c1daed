"""Graceful stops: signals, a run-time limit, and sleeps that a stop cuts short.

The first SIGTERM/SIGINT asks the loop to stop after the batch in flight; the second cancels the
run (the batch in flight rolls back). Handlers are installed by ``watch_signals`` inside a task
group for the duration of a run, never in a constructor.
"""

from __future__ import annotations

import logging
import signal

import anyio
from anyio import CancelScope

log = logging.getLogger(__name__)


class Stop:
    """A stop request that the loop checks between batches."""

    def __init__(self) -> None:
        self._event = anyio.Event()
        self.reason: str | None = None

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def request(self, reason: str) -> None:
        if not self.requested:
            self.reason = reason
            self._event.set()

    async def sleep(self, seconds: float) -> float:
        """Sleep up to ``seconds``; return early when a stop is requested. Returns time slept."""
        start = anyio.current_time()
        with anyio.move_on_after(seconds):
            await self._event.wait()
        return anyio.current_time() - start


async def watch_signals(stop: Stop, abort: CancelScope) -> None:
    """First signal: request a graceful stop. Second: cancel ``abort`` at once."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if not stop.requested:
                log.warning("stopping after the batch in flight", extra={"signal": name})
                stop.request(name)
            else:
                log.warning("aborting the batch in flight", extra={"signal": name})
                abort.cancel()
                return


async def stop_after(stop: Stop, seconds: float) -> None:
    """Request a stop after ``seconds`` (``max_run_seconds``)."""
    await anyio.sleep(seconds)
    log.info("max_run_seconds reached", extra={"seconds": seconds})
    stop.request("max_run_seconds")

"""Health gates: reasons to hold the next batch while the database is struggling.

``Gates`` decides from measurements (pure; unit-tested through a fake ``Probe``); the probe
connection (``backfill.throttling.probe``) takes them, and the application's Prometheus
(``backfill.throttling.prometheus``) its latency, at most every ``app_latency.every``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from backfill.control import Knobs
from backfill.errors import one_line
from backfill.protocols import Probe, Reason

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Hold:
    """A gate that holds the next batch: its throttle reason and what it saw."""

    reason: Reason
    detail: str


class CheckError(Exception):
    """A gate's check could not be made (its message says why)."""


@dataclass
class Gates:
    probe: Probe
    job: str
    _failing: set[Reason] = field(default_factory=set)  # gates whose check fails (logged once)
    clock: Callable[[], float] = time.monotonic
    app: tuple[float, float] | None = None  # (when, seconds): the application's latency last read
    _app_error: Exception | None = None  # ... or why it could not be read

    @staticmethod
    def enabled(knobs: Knobs) -> bool:
        t = knobs.throttle
        limits = (t.max_replication_lag, t.max_slot_lag_bytes, t.max_active_sessions,
                  t.health_query, t.app_latency)
        return any(limit is not None for limit in limits)

    async def app_latency(self, knobs: Knobs) -> float:
        """The application's latency: read again once ``every`` has passed, else the last
        reading (a failed read fails again until the next: it is not retried sooner)."""
        a = knobs.throttle.app_latency
        assert a is not None
        now = self.clock()
        if self.app is None or now - self.app[0] >= a.every:
            from backfill.throttling import prometheus  # urllib: only for jobs that ask

            self.app, self._app_error = (now, math.nan), None
            try:
                self.app = (now, await prometheus.app_latency(a, knobs.throttle.check_timeout))
            except Exception as exc:  # said by ``check``, as every gate's failure
                self._app_error = exc
        if self._app_error is not None:
            raise self._app_error
        return self.app[1]

    async def check(self, knobs: Knobs) -> Hold | None:
        """The first gate that holds, or None to go on. A check that fails holds too, unless
        ``on_check_error = "ignore"``."""
        t = knobs.throttle
        gates: list[tuple[Reason, Any, Callable[[], Awaitable[Any]]]] = [
            (Reason.REPLICATION_LAG, t.max_replication_lag, self.probe.replication_lag),
            (Reason.SLOT_LAG, t.max_slot_lag_bytes, self.probe.slot_lag_bytes),
            (Reason.ACTIVE_SESSIONS, t.max_active_sessions, self.probe.active_sessions),
            (Reason.HEALTH_QUERY, t.health_query, self.probe.healthy),
            (Reason.APP_LATENCY, t.app_latency and t.app_latency.max,
             lambda: self.app_latency(knobs)),
        ]
        for reason, limit, measure in gates:
            if limit is None:
                continue
            try:
                value = await measure()
            except Exception as exc:
                detail = f"check failed: {one_line(exc)}"
                if reason not in self._failing:
                    self._failing.add(reason)
                    log.warning(
                        "health check failed",
                        extra={"job": self.job, "gate": reason, "error": one_line(exc),
                               "on_check_error": t.on_check_error},
                    )
                if t.on_check_error == "ignore":
                    continue
                return Hold(reason, detail)
            if reason in self._failing:
                self._failing.discard(reason)
                log.info("health check works again", extra={"job": self.job, "gate": reason})
            if reason == Reason.HEALTH_QUERY:
                if value is not True:
                    return Hold(reason, "health_query returned false")
            elif value > limit:
                return Hold(reason, _over(reason, value, limit))
        return None


def _over(reason: Reason, value: float, limit: float) -> str:
    if reason == Reason.REPLICATION_LAG:
        return f"standby replay lag {value:.1f}s > {limit:g}s"
    if reason == Reason.SLOT_LAG:
        return f"a logical slot retains {value / 2**20:.1f} MiB of WAL > {limit / 2**20:.1f} MiB"
    if reason == Reason.APP_LATENCY:
        return f"the application's latency {value * 1000:.3g} ms > {limit * 1000:.3g} ms"
    return f"{value:g} active sessions > {limit:g}"

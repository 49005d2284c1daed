"""The frontier application's own latency in a real Prometheus, for ``[throttle.app_latency]``:
pgbench's progress lines (``-P 1``: each second's mean latency, from the scheduled start under
``-R``, so the schedule lag included) as a gauge, ``frontier_app_latency_seconds``, served on a
free port that a Prometheus (``tests.observability.scraped``, every second) scrapes.
"""

from __future__ import annotations

import re
import statistics
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from anyio.abc import ByteReceiveStream
from prometheus_client import CollectorRegistry, Gauge

from tests.observability import Server, scraped

LATENCY = re.compile(rb"progress: .*? lat ([0-9.]+) ms")
QUERY = "avg_over_time(frontier_app_latency_seconds[5s])"


@dataclass
class AppGauge:
    """What pgbench said, each second: (epoch seconds, mean latency in seconds)."""

    seen: list[tuple[float, float]] = field(default_factory=list)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.gauge = Gauge("frontier_app_latency_seconds", "pgbench's mean latency, last second",
                           registry=self.registry)

    async def read(self, stream: ByteReceiveStream) -> None:
        """pgbench's stderr, to its end: each progress line sets the gauge."""
        pending = b""
        async for chunk in stream:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if found := LATENCY.search(line):
                    seconds = float(found.group(1)) / 1000
                    self.seen.append((time.time(), seconds))
                    self.gauge.set(seconds)

    def mean(self, t0: float, t1: float) -> float | None:
        values = [s for at, s in self.seen if t0 <= at <= t1]
        return statistics.mean(values) if values else None

    def served(self) -> AbstractContextManager[Server]:
        """The gauge on a free port and a Prometheus scraping it, for the block."""
        return scraped(self.registry)

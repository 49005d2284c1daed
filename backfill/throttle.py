"""Decisions to wait: combining throttles, and retry backoff (the sleep and rate limits are the
governor's)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from backfill.checkpoint import BatchResult
from backfill.protocols import Pause, Throttle


@dataclass(slots=True)
class AllOf:
    """Ask every throttle; wait for the longest pause any of them wants."""

    throttles: Sequence[Throttle]

    async def next_pause(self, last: BatchResult | None) -> Pause | None:
        pauses = [p for t in self.throttles if (p := await t.next_pause(last)) is not None]
        return max(pauses, key=lambda p: p.seconds, default=None)

    def runway(self) -> float:
        """The shortest runway of all; a throttle that cannot say wants every batch."""
        return min((runway_of(t) for t in self.throttles), default=0.0)


def runway_of(throttle: Throttle) -> float:
    """``throttle.runway()``, or 0 (decide after every batch) for one that cannot say."""
    runway = getattr(throttle, "runway", None)
    return float(runway()) if callable(runway) else 0.0


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with full jitter: ``uniform(0, min(cap, base * 2**attempt))``.

    A floor of ``base`` keeps retries from hammering a struggling server.
    """

    base: float = 0.1
    cap: float = 30.0
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int) -> float:
        ceiling = min(self.cap, self.base * 2 ** min(attempt, 30))
        return max(self.base, self.rng.uniform(0, ceiling))

"""How long to wait, as arithmetic: a ceiling on the write rate, the batch that paces it
evenly, and retry backoff.

``RateLimit`` is a virtual schedule (GCRA, a token bucket without burst): each batch of ``n``
rows that started at ``s`` moves the earliest start of the next batch to ``max(due, s) + n /
rate``. So for any batches ``a .. b`` the rows of ``a .. b-1`` are at most ``rate x (start of
b - start of a)``: over any window the rows committed exceed ``rate x window`` by at most one
batch, and time a batch spends running counts towards its own allowance (a fast batch waits
out the rest, a slow one not at all). Idle time earns no credit, so a long pause is never
followed by a burst.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(slots=True)
class RateLimit:
    due: float | None = None  # earliest start of the next batch (monotonic seconds)
    rate: float | None = None  # the rate ``due`` was computed with

    def spend(self, rows: int, *, started: float, rate: float | None) -> None:
        """Account for a committed batch of ``rows`` that started at ``started``."""
        if rate is None or rate <= 0:
            self.due, self.rate = None, None
            return
        base = started if self.due is None else max(self.due, started)
        self.due, self.rate = base + rows / rate, rate

    def wait(self, now: float, rate: float | None) -> float:
        """Seconds until the next batch may start; a changed ``rate`` rescales what is left."""
        if rate is None or rate <= 0 or self.due is None or self.rate is None:
            self.due, self.rate = None, None
            return 0.0
        if rate != self.rate and self.due > now:
            self.due = now + (self.due - now) * self.rate / rate
        self.rate = rate
        return max(0.0, self.due - now)


PACE = 0.05  # seconds of the rate's rows in a batch while a rate is held


def batch_ceiling(rate: float | None, rows_per_key: float | None) -> int | None:
    """The most keys a batch may take at ``rate`` rows a second: ``PACE`` seconds' worth, so
    that the rows come evenly (small commits often), not in a burst then a long wait."""
    if rate is None or not rows_per_key:
        return None
    return max(1, int(rate * PACE / rows_per_key))


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

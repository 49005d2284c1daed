"""Truthful progress: where the cursor is in the fixed key range, and a measured ETA.

The fraction done is the cursor's position between the range's lowest and highest key, for keys
whose first column is a number, a timestamp, a date or a uuid (uuids are spread uniformly). For
text keys it is unknown (None) rather than guessed. Rates and the ETA come from the last
``window`` seconds of committed batches, never from batch_size x batches.
"""

from __future__ import annotations

import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal, InvalidOperation

from backfill.checkpoint import BatchResult, Checkpoint, Key


def _position(text: str) -> float | None:
    try:
        return float(Decimal(text))
    except (InvalidOperation, ValueError):
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        pass
    try:
        return float(datetime.combine(date.fromisoformat(text), datetime.min.time()).timestamp())
    except ValueError:
        pass
    try:
        return float(uuid.UUID(text).int)
    except ValueError:
        return None


def fraction(lo: Key | None, hi: Key | None, cursor: Key | None) -> float | None:
    """How far ``cursor`` is through ``[lo, hi]`` (0..1), or None when it cannot be known."""
    if lo is None or hi is None:
        return 1.0
    if cursor is None:
        return 0.0
    a, b, c = (_position(k[0]) for k in (lo, hi, cursor))
    if a is None or b is None or c is None:
        return None
    if b <= a:
        return 1.0 if c >= b else 0.0
    return min(1.0, max(0.0, (c - a) / (b - a)))


@dataclass
class Tracker:
    """Accumulates committed batches; answers rate, fraction and ETA questions."""

    window: float = 60.0
    checkpoint: Checkpoint | None = None
    rows: int = 0
    batches: int = 0
    size: int = 0
    cursor: Key | None = None
    _recent: deque[tuple[float, int, float]] = field(default_factory=deque)

    def start(self, checkpoint: Checkpoint, now: float) -> None:
        self.checkpoint = checkpoint
        self.rows, self.batches, self.cursor = (
            checkpoint.rows_updated, checkpoint.batches, checkpoint.cursor
        )
        self._recent.clear()
        self._recent.append((now, self.rows, self.fraction or 0.0))

    def commit(self, result: BatchResult, now: float) -> None:
        self.rows += result.rows
        self.batches += 1
        self.size = result.size
        if result.cursor is not None:
            self.cursor = result.cursor
        self._recent.append((now, self.rows, self.fraction or 0.0))
        while len(self._recent) > 2 and now - self._recent[1][0] > self.window:
            self._recent.popleft()

    @property
    def fraction(self) -> float | None:
        if self.checkpoint is None:
            return None
        return fraction(self.checkpoint.range_lo, self.checkpoint.range_hi, self.cursor)

    def rows_per_second(self) -> float:
        if len(self._recent) < 2:
            return 0.0
        (t0, r0, _), (t1, r1, _) = self._recent[0], self._recent[-1]
        return (r1 - r0) / (t1 - t0) if t1 > t0 else 0.0

    def eta_seconds(self) -> float | None:
        """Remaining key-space over the key-space covered per second recently."""
        done = self.fraction
        if done is None or len(self._recent) < 2:
            return None
        (t0, _, f0), (t1, _, f1) = self._recent[0], self._recent[-1]
        if t1 <= t0 or f1 <= f0:
            return None
        return (1.0 - done) / ((f1 - f0) / (t1 - t0))

    def rows_remaining(self) -> float | None:
        """Rows still to update, extrapolated from rows updated per unit of key space."""
        done = self.fraction
        if done is None or done <= 0 or self.checkpoint is None:
            return None
        return self.rows / done * (1.0 - done)


def human_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"

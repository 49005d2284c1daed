"""Truthful progress: where the cursor is in the fixed key range, and a measured ETA.

The fraction done is the cursor's position between the range's lowest and highest key, for keys
whose first column is a number, a timestamp, a date or a uuid (uuids are spread uniformly). For
text keys it comes from a ``KeyEstimate``, a page sample counted once at run start on the server
(so the key's collation decides the order), plus the keys each committed batch covered; without
one it is unknown (None) rather than guessed. Rates and the ETA come from the last ``window``
seconds (at least ``min_batches`` batches) of committed batches, never from batch_size x batches.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from backfill.checkpoint import FAILED, SUCCEEDED, BatchResult, Checkpoint, Key
from backfill.protocols import THROTTLE_REASONS


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


@dataclass(frozen=True, slots=True)
class KeyEstimate:
    """Keys in the fixed range (``total``) and at or below the cursor (``done``) when the run
    started, estimated from a page sample. Used only where the cursor's position cannot be
    computed (text keys)."""

    total: float
    done: float


@dataclass
class Tracker:
    """Accumulates committed batches; answers rate, fraction and ETA questions."""

    # 20 s: after a change of pace the ETA is right again within about the window, where a
    # longer one lags behind it (docs/performance.md, "The ETA's window").
    window: float = 20.0
    min_batches: int = 10  # the window holds at least this many batches, however long they take
    checkpoint: Checkpoint | None = None
    rows: int = 0
    batches: int = 0
    size: int = 0
    cursor: Key | None = None
    estimate: KeyEstimate | None = None
    keys: int = 0  # keys the batches committed so far covered (each covers `size` keys)
    # Seconds spent not writing, by reason (every THROTTLE_REASONS key, from zero).
    throttle_seconds: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(THROTTLE_REASONS, 0.0)
    )
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
        self.keys += result.size
        self.size = result.size
        if result.cursor is not None:
            self.cursor = result.cursor
        self._recent.append((now, self.rows, self.fraction or 0.0))
        while len(self._recent) > self.min_batches + 1 and now - self._recent[1][0] > self.window:
            self._recent.popleft()

    def use_estimate(self, estimate: KeyEstimate, now: float) -> None:
        """Adopt a sampled estimate (taken at the cursor of the first ``start``); the rate
        window restarts here, since fractions before it were unknown."""
        self.estimate = estimate
        self._recent.clear()
        self._recent.append((now, self.rows, self.fraction or 0.0))

    @property
    def fraction(self) -> float | None:
        if self.checkpoint is None:
            return None
        exact = fraction(self.checkpoint.range_lo, self.checkpoint.range_hi, self.cursor)
        if exact is None and self.estimate is not None and self.estimate.total > 0:
            return min(1.0, (self.estimate.done + self.keys) / self.estimate.total)
        return exact

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


def run_rate(
    checkpoint: Checkpoint, run: Mapping[str, Any] | None
) -> tuple[float | None, float | None]:
    """Rows per second and ETA in seconds (as of the last commit) of a checkpoint's run, from
    the database alone: what ``status`` can tell about a runner on another machine.

    ``run`` is the run's row in ``backfill.runs``. The rate is the run's average (rows it
    updated over the time from its start to its last commit); the ETA is the key space left over
    the key space the run covered per second, and only for a run still open.
    """
    if run is None or checkpoint.updated_at is None or run.get("started_at") is None:
        return None, None
    end = run.get("ended_at") or checkpoint.updated_at
    elapsed = (end - run["started_at"]).total_seconds()
    if elapsed <= 0:
        return None, None
    rows = run.get("rows_updated")
    if rows is None:
        rows = checkpoint.rows_updated - (run.get("rows_at_start") or 0)
    rate = max(0, rows) / elapsed
    if run.get("outcome") != "running" or checkpoint.state in (SUCCEEDED, FAILED):
        return rate, None
    if "cursor_at_start" not in run:  # a state schema from before `init` added it
        return rate, None
    lo, hi = checkpoint.range_lo, checkpoint.range_hi
    start = run["cursor_at_start"]
    now, then = fraction(lo, hi, checkpoint.cursor), fraction(lo, hi, _key(start))
    if now is None or then is None or now <= then:
        return rate, None
    return rate, (1.0 - now) * elapsed / (now - then)


def _key(value: Any) -> Key | None:
    return tuple(value) if value is not None else None


def human_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"

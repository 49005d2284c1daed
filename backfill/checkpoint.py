"""The values a run produces: the checkpoint (saved resume point) and one batch's result.

Key values are tuples of their text form (see ``backfill.sql``): comparable on the server,
printable in ``status``, and the same for every key type.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

Key = tuple[str, ...]


def show_key(key: Key | None) -> str:
    """A key as messages and ``status`` print it: ``42``, ``(7, 3)``, ``-`` for none."""
    if key is None:
        return "-"
    return key[0] if len(key) == 1 else "(" + ", ".join(key) + ")"

RUNNING = "running"
THROTTLED = "throttled"
PAUSED = "paused"
INTERRUPTED = "interrupted"
SUCCEEDED = "succeeded"
FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A shard's saved state. ``cursor`` is the highest committed key (None: nothing yet)."""

    job: str
    shard: int
    shards: int
    fingerprint: str
    state: str
    range_lo: Key | None
    range_hi: Key | None
    cursor: Key | None
    rows_updated: int = 0
    rows_skipped: int = 0
    batches: int = 0
    skipped_keys: tuple[Key, ...] = ()
    control: Mapping[str, Any] = field(default_factory=dict)  # live overrides (backfill.control)
    settings: Mapping[str, Any] = field(default_factory=dict)  # the job file's, at run start
    holder: str | None = None
    error: str | None = None
    started_at: datetime | None = None
    updated_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def empty(self) -> bool:
        """The key range was empty when the run started."""
        return self.range_lo is None


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What one committed batch did. ``cursor`` None means the range is exhausted."""

    cursor: Key | None
    rows: int
    size: int
    seconds: float
    control: Mapping[str, Any] = field(default_factory=dict)

"""The values a run produces: the checkpoint (saved resume point) and one batch's result.

Key values are tuples of their text form (see ``backfill.sql``): comparable on the server,
printable in ``status``, and the same for every key type.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

Key = tuple[str, ...]


def show_key(key: Key | None) -> str:
    """A key as messages and ``status`` print it: ``42``, ``(7, 3)``, ``-`` for none."""
    if key is None:
        return "-"
    return key[0] if len(key) == 1 else "(" + ", ".join(key) + ")"


def key_param(key: Key | None) -> list[str] | None:
    """A key as the ``text[]`` parameter statements take (None stays NULL)."""
    return list(key) if key is not None else None


class State(StrEnum):
    """A run's state, as the checkpoint, ``status``, the log and the metrics spell it."""

    RUNNING = "running"
    THROTTLED = "throttled"
    PAUSED = "paused"
    INTERRUPTED = "interrupted"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


RUNNING = State.RUNNING
THROTTLED = State.THROTTLED
PAUSED = State.PAUSED
INTERRUPTED = State.INTERRUPTED
SUCCEEDED = State.SUCCEEDED
FAILED = State.FAILED


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
    rows_updated: int = 0  # the rows the batches changed: updated, copied or deleted (``shape``)
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
    shape: str = "update"  # what the job's batches do: update, copy, delete, archive

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


class Row(Protocol):
    """A row of the state schema's ``checkpoints`` (a driver's record, or a dict)."""

    def __getitem__(self, key: str, /) -> Any: ...


def to_checkpoint(row: Row) -> Checkpoint:
    """A checkpoint from its row in the state schema."""
    def key(value: list[str] | None) -> Key | None:
        return tuple(value) if value is not None else None

    return Checkpoint(
        job=row["job"],
        shard=row["shard"],
        shards=row["shards"],
        fingerprint=row["fingerprint"],
        state=row["state"],
        range_lo=key(row["range_lo"]),
        range_hi=key(row["range_hi"]),
        cursor=key(row["cursor"]),
        rows_updated=row["rows_updated"],
        rows_skipped=row["rows_skipped"],
        batches=row["batches"],
        skipped_keys=tuple(tuple(k) for k in row["skipped_keys"]),
        control=row["control"],
        settings=row["settings"] or {},
        holder=row["holder"],
        error=row["error"],
        started_at=row["started_at"],
        updated_at=row["updated_at"],
        finished_at=row["finished_at"],
        shape=row["shape"],
    )

"""The runner's error hierarchy.

Two families:

* ``BackfillError`` subclasses end a command; each carries the documented exit code the
  Kubernetes Job's podFailurePolicy relies on.
* ``BatchFailure`` subclasses are decisions about one failed batch attempt, made in exactly one
  place (``backfill.pg.translate``) from a driver error; the run loop acts on the class.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError

    from backfill.checkpoint import BatchResult


class ExitCode(IntEnum):
    OK = 0
    BUG = 1
    USAGE = 2
    DATA = 65  # a row makes the SET fail permanently
    UNAVAILABLE = 69  # database unavailable or retries exhausted
    TEMPFAIL = 75  # interrupted with the checkpoint saved, or job held by another runner
    CONFIG = 78  # bad configuration, schema mismatch, changed job, permission denied


class BackfillError(Exception):
    """An error that ends a command with a documented exit code and a one-line message."""

    exit_code: ExitCode = ExitCode.BUG


class ConfigError(BackfillError):
    exit_code = ExitCode.CONFIG


class Vanished(ConfigError):
    """A job's checkpoint row is gone under its runner."""

    def __init__(self, job: str) -> None:
        super().__init__(f"the checkpoint of job {job} vanished (reset mid-run?)")


class RowError(BackfillError):
    """A row makes the job's SET fail permanently; ``keys`` names it."""

    exit_code = ExitCode.DATA

    def __init__(self, message: str, *, keys: tuple[str, ...]) -> None:
        super().__init__(message)
        self.keys = keys


class Unavailable(BackfillError):
    exit_code = ExitCode.UNAVAILABLE


class Interrupted(BackfillError):
    """A graceful stop: the checkpoint is saved and a rerun resumes."""

    exit_code = ExitCode.TEMPFAIL


class JobBusy(Interrupted):
    """Another runner holds the job's lock."""


class GaveUp(BackfillError):
    """A cut-over (or its reverse) found its tables held through every attempt: nothing
    changed; run it again later."""

    exit_code = ExitCode.TEMPFAIL


class BatchFailure(Exception):
    """A failed batch attempt; the subclass encodes what the loop does next."""

    reason = "error"
    # Batches of the same group that committed before this one failed (see Session).
    committed: Sequence[BatchResult] = ()


class StatementTimeout(BatchFailure):
    """Roll back, shrink the batch, back off, retry."""

    reason = "statement_timeout"


class Contention(BatchFailure):
    """Lock timeout, deadlock or serialization failure: back off and retry the same slice."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ConnectionLost(BatchFailure):
    """Reconnect with backoff, re-take the lock, reload the checkpoint, continue."""

    reason = "connection"


class Superseded(ConnectionLost):
    """The checkpoint was not where the runner left it (its compare-and-swap matched nothing):
    the batch wrote nothing. Reconnect, re-take the lock, reload the checkpoint, continue."""

    reason = "superseded"


class DataFailure(BatchFailure):
    """A row-level data error in the job's SET: split the slice to find the row."""

    reason = "data"


def one_line(exc: BaseException) -> str:
    """An exception as one line of a message: its class and the first line of its text."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def first_error(exc: ValidationError) -> tuple[tuple[str, ...], str]:
    """The first problem pydantic found: the field's path and the message, without pydantic's
    ``Value error,`` prefix."""
    first = exc.errors()[0]
    return tuple(str(p) for p in first["loc"]), first["msg"].removeprefix("Value error, ")

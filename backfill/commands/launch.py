"""What starting a verb takes, the same on both ways in (``backfill.commands.argv``'s fast
path and ``backfill.cli``): settings from the environment, the job file, the event loop; and
``backfill run``'s plain function. Imports nothing but the standard library until called."""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from backfill.conninfo import ConnectParams
    from backfill.job import Job
    from backfill.settings import Telemetry

T = TypeVar("T")


def from_environment(read: Callable[[], T], what: str) -> T:
    """``read()`` settings from the environment: a value they refuse is a ``ConfigError`` that
    names ``what`` and the variable."""
    from pydantic import ValidationError

    from backfill.errors import ConfigError, first_error

    try:
        return read()
    except ValidationError as exc:
        where, message = first_error(exc)
        raise ConfigError(f"{what}: {where[-1]}: {message}") from exc


def params() -> ConnectParams:
    """The connection, from the environment."""
    from backfill.settings import DatabaseSettings

    return from_environment(lambda: DatabaseSettings().params(), "connection settings")


def telemetry(*, metrics_port: int | None, log_every: float | None) -> Telemetry:
    """Where the metrics and the progress log go: the flags, else the environment."""
    from backfill.settings import TelemetrySettings

    settings = from_environment(TelemetrySettings, "metrics settings")
    return settings.telemetry(metrics_port=metrics_port, log_every=log_every)


def job(path: Path) -> Job:
    from backfill.job import load_job

    return load_job(path)


def run_async(fn: Callable[[], Awaitable[T]]) -> T:
    """``fn()`` on the asyncio event loop (asyncpg's), uvloop's with ``BACKFILL_UVLOOP=1``."""
    import anyio

    return anyio.run(fn, backend="asyncio", backend_options=loop_options())


def loop_options() -> dict[str, Any]:
    """``BACKFILL_UVLOOP=1`` runs the event loop on uvloop (the ``fast`` extra), when it is
    installed; see docs/performance.md for what it measured."""
    if os.environ.get("BACKFILL_UVLOOP") != "1":
        return {}
    try:
        import uvloop  # noqa: F401
    except ImportError:
        from backfill.errors import ConfigError

        raise ConfigError(
            "BACKFILL_UVLOOP=1 but uvloop is not installed: pip install 'backfill[fast]'"
        ) from None
    return {"use_uvloop": True}


def run_job(
    path: Path, *, shard: str | None, metrics_port: int | None, progress_every: float | None
) -> None:
    """``backfill run``: a job, run (or resumed) to its end; says what it did on stderr."""
    from backfill import commands
    from backfill.job import DONE_WORDS
    from backfill.ranges import Shard

    the_job, connect = job(path), params()
    part = Shard.parse(shard) if shard is not None else Shard()
    sent = telemetry(metrics_port=metrics_port, log_every=progress_every)
    ckpt = run_async(lambda: commands.run(the_job, connect, shard=part, telemetry=sent))
    label = f" shard {part}" if part.count > 1 else ""
    print(
        f"job {the_job.name}{label} done: "
        f"{ckpt.rows_updated:,} rows {DONE_WORDS[the_job.shape]} in {ckpt.batches:,} batches"
        + (f", {ckpt.rows_skipped} skipped" if ckpt.rows_skipped else ""),
        file=sys.stderr,
    )

"""What the verbs share: an admin connection, and translating driver errors raised outside
the run loop."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

import asyncpg

from backfill.conninfo import ConnectParams
from backfill.errors import BackfillError, ConfigError, DataFailure, Unavailable
from backfill.pg import Budget, connect, translate

T = TypeVar("T")
ADMIN_BUDGET = Budget(statement_timeout=30.0, lock_timeout=5.0)


async def admin(params: ConnectParams, verb: str) -> asyncpg.Connection:
    """A connection for one verb; unreachable is exit 69 (``guard``), not a traceback."""
    return await guard(
        connect(params, budget=ADMIN_BUDGET, application_name=f"backfill:{verb}")
    )


async def guard(awaitable: Awaitable[T]) -> T:
    """Translate driver errors raised outside the run loop."""
    try:
        return await awaitable
    except BackfillError:
        raise
    except Exception as exc:
        error = translate(exc)
        if isinstance(error, BackfillError):
            raise error from exc
        if isinstance(error, DataFailure):
            raise ConfigError(str(error)) from exc
        # Unreachable, timed out, contended: worth retrying later (exit 69), not a bad
        # configuration (78 fails a Kubernetes Job at once, e.g. an init Job started while
        # the database is still coming up).
        raise Unavailable(str(error)) from exc

"""asyncpg at the edge: connecting with a time budget, and the one place where driver errors
become the runner's decisions (``translate``)."""

from __future__ import annotations

import json
import logging
import ssl
from dataclasses import dataclass
from typing import Any

import asyncpg

from backfill import sql
from backfill.errors import (
    BackfillError,
    BatchFailure,
    ConfigError,
    ConnectionLost,
    Contention,
    DataFailure,
    StatementTimeout,
    Superseded,
)
from backfill.settings import ConnectParams

log = logging.getLogger(__name__)

# Slack for the client-side timeout over the server's statement_timeout: the server should
# always cancel first; the client's timeout only catches a dead or black-holed network.
CLIENT_SLACK = 5.0

_CONTENTION = {"55P03": "lock_timeout", "40P01": "deadlock", "40001": "serialization"}
_GONE = {"57P01", "57P02", "57P03", "53300", "58030"}


@dataclass(frozen=True, slots=True)
class Budget:
    """Time limits for every statement on a connection."""

    statement_timeout: float
    lock_timeout: float
    connect_timeout: float = 10.0

    def server_settings(self, application_name: str) -> dict[str, str]:
        return {
            "application_name": application_name[:63],
            "statement_timeout": str(max(1, round(self.statement_timeout * 1000))),
            "lock_timeout": str(max(1, round(self.lock_timeout * 1000))),
            # Keys travel as text: fix the date format so a cursor saved by one session parses
            # identically in the next, whatever the server's default.
            "DateStyle": "ISO, MDY",
            "idle_in_transaction_session_timeout": str(
                max(1, round((self.statement_timeout + CLIENT_SLACK) * 1000))
            ),
            # A runner on a vanished node must not hold the job's lock until the kernel's
            # two-hour default: the server probes an idle client after 30 s, every 10 s, and
            # ends the backend (releasing the lock) after 3 unanswered probes.
            "tcp_keepalives_idle": "30",
            "tcp_keepalives_interval": "10",
            "tcp_keepalives_count": "3",
        }


async def connect(
    params: ConnectParams, *, budget: Budget, application_name: str
) -> asyncpg.Connection:
    """Connect with the budget applied to the session; errors are already translated."""
    open_: Any = asyncpg.connect  # ConnectParams.kwargs() is checked there, not here
    try:
        conn: asyncpg.Connection = await open_(
            **params.kwargs(),
            timeout=budget.connect_timeout,
            command_timeout=budget.statement_timeout + CLIENT_SLACK,
            server_settings=budget.server_settings(application_name),
        )
        await conn.set_type_codec(
            "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )
        return conn
    except Exception as exc:
        raise translate(exc, where=f"connecting to {params.describe()}") from exc


def translate(
    exc: BaseException, *, closed: bool = False, where: str = ""
) -> BatchFailure | BackfillError:
    """Classify any error from asyncpg or the socket into the action the runner takes."""
    prefix = f"{where}: " if where else ""
    if isinstance(exc, BatchFailure | BackfillError):
        return exc
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        message = _message(exc)
        if state == "57014":
            return StatementTimeout(f"{prefix}statement timeout: {message}")
        if state in _CONTENTION:
            return Contention(f"{prefix}{message}", reason=_CONTENTION[state])
        if state in _GONE or state.startswith("08"):
            return ConnectionLost(f"{prefix}{message}")
        if state == "22P02" and sql.MOVED in message:
            return Superseded(f"{prefix}{message}: another runner on the same job?")
        if state.startswith(("22", "23")) or state == "P0001":
            return DataFailure(f"{prefix}{message}")
        if state.startswith("28"):
            return ConfigError(f"{prefix}authentication failed: {message}")
        if state == "42501":
            return ConfigError(f"{prefix}permission denied: {message}")
        if state.startswith("53"):
            return Contention(f"{prefix}{message}", reason="resources")
        return ConfigError(f"{prefix}{message} (SQLSTATE {state})")
    if closed or isinstance(
        exc,
        OSError | TimeoutError | asyncpg.InterfaceError | asyncpg.InternalClientError,
    ):
        if isinstance(exc, ssl.SSLError):
            return ConfigError(f"{prefix}TLS error: {exc}")
        return ConnectionLost(f"{prefix}{type(exc).__name__}: {exc}".rstrip(": "))
    if isinstance(exc, asyncpg.ClientConfigurationError | ValueError):
        return ConfigError(f"{prefix}bad connection settings: {exc}")
    raise exc


def _message(exc: asyncpg.PostgresError) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    detail = getattr(exc, "detail", None)
    return f"{text} ({detail})" if detail else text

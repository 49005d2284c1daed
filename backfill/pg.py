"""asyncpg at the edge: connecting with a time budget, closing within one (``close``), and
the one place where driver errors become the runner's decisions (``translate``)."""

from __future__ import annotations

import json
import logging
import ssl
from dataclasses import dataclass
from typing import Any

import anyio
import asyncpg

from backfill import sql
from backfill.conninfo import ConnectParams
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

log = logging.getLogger(__name__)

# Slack for the client-side timeout over the server's statement_timeout: the server should
# always cancel first; the client's timeout only catches a dead or black-holed network.
CLIENT_SLACK = 5.0
# Seconds allowed for ending a connection, or its open transaction, on the way out.
CLOSE_BUDGET = 2.0

_CONTENTION = {"55P03": "lock_timeout", "40P01": "deadlock", "40001": "serialization"}
_GONE = {"57P01", "57P02", "57P03", "53300", "58030"}
# PgBouncer reports its own errors as 08P01 (protocol violation), most of them configuration
# ("unsupported startup parameter", "no such database", "login failed"); only these pass.
_POOLER_PASSING = (
    "no more connections allowed", "cannot connect to server", "server login has been failing",
    "query_wait_timeout", "client_login_timeout", "pooler is shutting down",
)
POOLER_HINT = (
    "connect directly to PostgreSQL, or through a pooler in session mode (PgBouncer: "
    "pool_mode = session): the job's lock and session settings must stay on one server session"
)


@dataclass(frozen=True, slots=True)
class Budget:
    """Time limits for every statement on a connection."""

    statement_timeout: float
    lock_timeout: float
    connect_timeout: float = 10.0

    def startup_parameters(self, application_name: str) -> dict[str, str]:
        """Sent in the startup packet: only what PgBouncer accepts there (it refuses any other
        parameter, "unsupported startup parameter"); the rest is ``session_sql``."""
        return {
            "application_name": application_name[:63],
            # Keys travel as text: fix the date format so a cursor saved by one session parses
            # identically in the next, whatever the server's default.
            "DateStyle": "ISO, MDY",
        }

    def session_sql(self) -> str:
        """The session's time limits, SET right after connecting, in one round trip."""
        settings = {
            "statement_timeout": _ms(self.statement_timeout),
            "lock_timeout": _ms(self.lock_timeout),
            "idle_in_transaction_session_timeout": _ms(self.statement_timeout + CLIENT_SLACK),
            # A runner on a vanished node must not hold the job's lock until the kernel's
            # two-hour default: the server probes an idle client after 30 s, every 10 s, and
            # ends the backend (releasing the lock) after 3 unanswered probes.
            "tcp_keepalives_idle": 30,
            "tcp_keepalives_interval": 10,
            "tcp_keepalives_count": 3,
        }
        return "; ".join(f"SET {name} = {value}" for name, value in settings.items())


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


async def connect(
    params: ConnectParams, *, budget: Budget, application_name: str, writable: bool = False
) -> asyncpg.Connection:
    """Connect with the budget applied to the session; errors are already translated. With
    ``writable``, a server that does not accept writes (a standby) is not connected to."""
    open_: Any = asyncpg.connect  # ConnectParams.kwargs() is checked there, not here
    where = f"connecting to {params.describe()}"
    kwargs = params.kwargs(writable=writable)  # reads the URL file now: a rotated password
    try:
        conn: asyncpg.Connection = await open_(
            **kwargs,
            timeout=budget.connect_timeout,
            command_timeout=budget.statement_timeout + CLIENT_SLACK,
            server_settings=budget.startup_parameters(application_name),
        )
    except Exception as exc:
        raise translate(exc, where=where) from exc
    try:
        await conn.execute(budget.session_sql())
        await conn.set_type_codec(
            "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )
        await conn.fetchrow(sql.ARRAY_TYPES)  # one type lookup, not one per statement
    except BaseException as exc:
        conn.terminate()
        if isinstance(exc, Exception):
            raise translate(exc, closed=conn.is_closed(), where=where) from exc
        raise
    return conn


async def close(conn: asyncpg.Connection) -> None:
    """End ``conn`` within ``CLOSE_BUDGET``, also on the way out of a cancelled scope: politely
    (the server ends its session at once), else by dropping it (a dead network would keep a
    polite close waiting)."""
    with anyio.move_on_after(CLOSE_BUDGET, shield=True):
        try:
            await conn.close(timeout=CLOSE_BUDGET)
        except Exception:
            conn.terminate()
    if not conn.is_closed():
        conn.terminate()


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
        if state == "25006":
            # A standby, or a primary demoted under us: the next connection finds the primary.
            return ConnectionLost(f"{prefix}the server is read-only (a standby?): {message}")
        if state == "08P01" and not any(text in message for text in _POOLER_PASSING):
            return ConfigError(f"{prefix}{message}")
        if state in _GONE or state.startswith("08"):
            return ConnectionLost(f"{prefix}{message}")
        if state == "22P02" and sql.MOVED in message:
            return Superseded(f"{prefix}{message}: another runner on the same job?")
        if state in ("26000", "42P05") and "__asyncpg_" in message:
            # The driver's prepared statements vanished between two statements of one session.
            return ConfigError(f"{prefix}{message}: the session is shared: {POOLER_HINT}")
        if state.startswith(("22", "23")) or state == "P0001":
            return DataFailure(f"{prefix}{message}")
        if state.startswith("28"):
            return ConfigError(f"{prefix}authentication failed: {message}")
        if state == "42501":
            return ConfigError(f"{prefix}permission denied: {message}")
        if state.startswith("53"):
            return Contention(f"{prefix}{message}", reason="resources")
        return ConfigError(f"{prefix}{message} (SQLSTATE {state})")
    if isinstance(exc, asyncpg.TargetServerAttributeNotMatched):
        # Every host answered, none as a primary: a failover in progress, or standbys only.
        return ConnectionLost(f"{prefix}no server accepts writes (standbys only?)")
    if isinstance(exc, asyncpg.ClientConfigurationError):
        return ConfigError(f"{prefix}bad connection settings: {exc}")
    if isinstance(exc, ConnectionError) and "rejected SSL upgrade" in str(exc):
        return ConfigError(f"{prefix}TLS error: the server does not accept TLS (see sslmode)")
    if isinstance(exc, ssl.SSLError) and not closed and not isinstance(
        exc, ssl.SSLEOFError | ssl.SSLZeroReturnError
    ):
        # A certificate that does not verify (wrong CA, wrong host name), a bad key: the
        # same on every attempt. A TLS stream cut short is a lost connection (below).
        return ConfigError(f"{prefix}TLS error: {exc}")
    if closed or isinstance(
        exc,
        OSError | TimeoutError | asyncpg.InterfaceError | asyncpg.InternalClientError,
    ):
        return ConnectionLost(f"{prefix}{type(exc).__name__}: {exc}".rstrip(": "))
    if isinstance(exc, ValueError):
        return ConfigError(f"{prefix}bad connection settings: {exc}")
    raise exc


def _message(exc: asyncpg.PostgresError) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    detail = getattr(exc, "detail", None)
    return f"{text} ({detail})" if detail else text

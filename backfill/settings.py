"""Where the database connection comes from, and where a run's metrics go, validated once at
the CLI.

``BACKFILL_DATABASE_URL``, else ``DATABASE_URL``, else the libpq ``PG*`` variables. The result is
a frozen ``ConnectParams``; nothing below the CLI reads the environment, and the password is a
``SecretStr`` that no log line, error or status output ever prints. ``TelemetrySettings`` reads
the ``BACKFILL_METRICS_*``, ``BACKFILL_PUSH*`` and ``BACKFILL_PROGRESS_LOG_SECONDS`` variables
into a frozen ``Telemetry``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from backfill.errors import ConfigError
from backfill.job import Seconds

DEFAULT_METRICS_PORT = 9477


@dataclass(frozen=True, slots=True)
class ConnectParams:
    """What asyncpg needs to connect; ``repr`` and ``describe`` never show the password."""

    dsn: SecretStr | None = None
    host: str | None = None
    port: int | None = None
    user: str | None = None
    password: SecretStr | None = field(default=None, repr=False)
    database: str | None = None
    sslmode: str | None = None

    def describe(self) -> str:
        """``user@host:port/database`` without the password, for messages. Never raises."""
        if self.dsn is not None:
            if url_problem(self.dsn.get_secret_value()):
                return "the database URL"  # its pieces may be pieces of the password
            parts = urlsplit(self.dsn.get_secret_value())
            host = parts.hostname or "localhost"
            port = f":{parts.port}" if parts.port else ""
            user = f"{parts.username}@" if parts.username else ""
            return f"{user}{host}{port}{parts.path or '/'}"
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"{user}{self.host or 'localhost'}{port}/{self.database or ''}"

    def kwargs(self) -> dict[str, object]:
        """Keyword arguments for ``asyncpg.connect``."""
        if self.dsn is not None:
            return {"dsn": self.dsn.get_secret_value()}
        out: dict[str, object] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "database": self.database,
            "ssl": self.sslmode,
        }
        if self.password is not None:
            out["password"] = self.password.get_secret_value()
        return {k: v for k, v in out.items() if v is not None}


def url_problem(url: str) -> str | None:
    """Why a database URL cannot be used as written, in words that quote none of it.

    A password with an unencoded ``/``, ``?``, ``#`` or ``@`` splits the URL in the wrong place:
    the parser's own message would then quote a piece of the password as a port or a host.
    """
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises on a port that is not a number
    except ValueError:
        parts = None
    if parts is None or "@" in parts.path + parts.query + parts.fragment:
        return (
            "cannot be parsed: percent-encode special characters (such as / ? # @ :) in the "
            "user name and password"
        )
    return None


class DatabaseSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", extra="ignore", populate_by_name=True)

    url: SecretStr | None = Field(
        None, validation_alias=AliasChoices("BACKFILL_DATABASE_URL", "DATABASE_URL")
    )
    host: str | None = Field(None, validation_alias="PGHOST")
    port: int | None = Field(None, validation_alias="PGPORT")
    user: str | None = Field(None, validation_alias="PGUSER")
    password: SecretStr | None = Field(None, validation_alias="PGPASSWORD")
    database: str | None = Field(None, validation_alias="PGDATABASE")
    sslmode: str | None = Field(None, validation_alias="PGSSLMODE")

    def params(self) -> ConnectParams:
        if self.url is not None and self.url.get_secret_value():
            if problem := url_problem(self.url.get_secret_value()):
                raise ConfigError(f"BACKFILL_DATABASE_URL (or DATABASE_URL) {problem}")
            return ConnectParams(dsn=self.url)
        return ConnectParams(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            database=self.database,
            sslmode=self.sslmode,
        )


@dataclass(frozen=True, slots=True)
class Telemetry:
    """Where a run's metrics and progress lines go (see ``backfill.export``)."""

    metrics_port: int = DEFAULT_METRICS_PORT  # 0: no HTTP endpoint
    metrics_address: str = "0.0.0.0"
    pushgateway_url: SecretStr | None = None  # may hold credentials: never printed
    push_interval: float = 15.0
    linger: float = 0.0  # after the end, serve until one scrape saw it, at most this long
    log_every: float = 30.0  # seconds between progress log lines (not on a terminal)


class TelemetrySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BACKFILL_", extra="ignore")

    metrics_port: int = Field(DEFAULT_METRICS_PORT, ge=0, le=65535)
    metrics_address: str = "0.0.0.0"
    pushgateway_url: SecretStr | None = None
    push_interval_seconds: Seconds = Field(15.0, gt=0, le=3600)
    metrics_linger_seconds: Seconds = Field(0.0, ge=0, le=3600)
    progress_log_seconds: Seconds = Field(30.0, gt=0, le=86_400)

    def telemetry(
        self, *, metrics_port: int | None = None, log_every: float | None = None
    ) -> Telemetry:
        """The values, with the command line's flags (when given) over the environment's."""
        url = self.pushgateway_url
        return Telemetry(
            metrics_port=self.metrics_port if metrics_port is None else metrics_port,
            metrics_address=self.metrics_address,
            pushgateway_url=url if url is not None and url.get_secret_value() else None,
            push_interval=self.push_interval_seconds,
            linger=self.metrics_linger_seconds,
            log_every=self.progress_log_seconds if log_every is None else log_every,
        )

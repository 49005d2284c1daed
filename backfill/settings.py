"""Settings read from the environment, validated once at the CLI: where the database connection
comes from, and where a run's metrics go.

``DatabaseSettings``: ``BACKFILL_DATABASE_URL``, else the file named by
``BACKFILL_DATABASE_URL_FILE`` (read again at each connection, so a rotated password is picked
up), else ``DATABASE_URL``; the libpq ``PG*`` variables fill in whatever the URL leaves out, or
say everything when there is no URL. A URL may list several hosts
(``postgresql://app@db-a:5432,db-b:5432/app``), as may ``PGHOST`` and ``PGPORT``. The result
is a frozen ``ConnectParams`` (``backfill.conninfo`` resolves it at each connection); nothing
below the CLI reads the environment, and no log line, error or status output ever prints a
password. ``TelemetrySettings`` reads the ``BACKFILL_METRICS_*``, ``BACKFILL_PUSH*`` and
``BACKFILL_PROGRESS_LOG_SECONDS`` variables into a frozen ``Telemetry``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from backfill.conninfo import ConnectParams, valid_port
from backfill.errors import ConfigError
from backfill.job import Seconds

DEFAULT_METRICS_PORT = 9477

SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
SessionAttrs = Literal["any", "read-write", "read-only", "primary", "standby", "prefer-standby"]


class DatabaseSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="", extra="ignore", populate_by_name=True, env_ignore_empty=True
    )

    url: SecretStr | None = Field(None, validation_alias="BACKFILL_DATABASE_URL")
    url_file: Path | None = Field(None, validation_alias="BACKFILL_DATABASE_URL_FILE")
    plain_url: SecretStr | None = Field(None, validation_alias="DATABASE_URL")
    host: str | None = Field(None, validation_alias="PGHOST")
    port: str | None = Field(None, validation_alias="PGPORT", pattern=r"^\s*\d+(\s*,\s*\d+)*\s*$")
    user: str | None = Field(None, validation_alias="PGUSER")
    password: SecretStr | None = Field(None, validation_alias="PGPASSWORD")
    database: str | None = Field(None, validation_alias="PGDATABASE")
    sslmode: SslMode | None = Field(None, validation_alias="PGSSLMODE")
    sslrootcert: str | None = Field(None, validation_alias="PGSSLROOTCERT")
    sslcert: str | None = Field(None, validation_alias="PGSSLCERT")
    sslkey: str | None = Field(None, validation_alias="PGSSLKEY")
    passfile: str | None = Field(None, validation_alias="PGPASSFILE")
    target_session_attrs: SessionAttrs | None = Field(
        None, validation_alias="PGTARGETSESSIONATTRS"
    )

    def params(self) -> ConnectParams:
        """The validated values; the URL (from the file too) is checked now, so a bad one
        fails at once, with a message that quotes none of it."""
        if self.url is not None and self.url_file is not None:
            raise ConfigError(
                "set BACKFILL_DATABASE_URL or BACKFILL_DATABASE_URL_FILE, not both"
            )
        port = ",".join(p.strip() for p in self.port.split(",")) if self.port else None
        if port and not all(valid_port(p) for p in port.split(",")):
            raise ConfigError("connection settings: PGPORT: a port is a number from 1 to 65535")
        hosts = self.host.split(",") if self.host else []
        if port and "," in port and len(port.split(",")) != len(hosts):
            raise ConfigError(
                f"connection settings: PGPORT lists {len(port.split(','))} ports for "
                f"{len(hosts)} host(s) in PGHOST: give one port, or one per host"
            )
        params = ConnectParams(
            dsn=self.url or (self.plain_url if self.url_file is None else None),
            dsn_file=self.url_file,
            host=self.host,
            port=port,
            user=self.user,
            password=self.password,
            database=self.database,
            sslmode=self.sslmode,
            sslrootcert=self.sslrootcert,
            sslcert=self.sslcert,
            sslkey=self.sslkey,
            passfile=self.passfile or _home_passfile(),
            target_session_attrs=self.target_session_attrs,
        )
        params.resolve()  # raises ConfigError for a URL that cannot be used
        return params


def _home_passfile() -> str | None:
    try:
        return str(Path.home() / ".pgpass")
    except RuntimeError:  # no home directory
        return None


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

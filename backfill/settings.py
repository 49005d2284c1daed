"""Where the database connection comes from, validated once at the CLI.

``BACKFILL_DATABASE_URL``, else ``DATABASE_URL``, else the libpq ``PG*`` variables. The result is
a frozen ``ConnectParams``; nothing below the CLI reads the environment, and the password is a
``SecretStr`` that no log line, error or status output ever prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


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
        """``user@host:port/database`` without the password, for messages."""
        if self.dsn is not None:
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
            return ConnectParams(dsn=self.url)
        return ConnectParams(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            database=self.database,
            sslmode=self.sslmode,
        )

"""The job definition: a TOML file validated into frozen values.

A job says which rows to change (``table``, ``key``, ``where``), how (``set``) and how gently
(``[batch]``, ``[limits]``). Its meaning is fingerprinted so a run never resumes a checkpoint that
was made for a different definition.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from backfill.errors import ConfigError
from backfill.sql import fragment_problem

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}\Z")  # \Z: "$" would allow a final "\n"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|sec|min|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object) -> float:
    """Seconds from ``"250ms"``, ``"5s"``, ``"2min"``, ``"1h"`` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '250ms', '5s' or '2min'")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and (m := _DURATION.match(value)):
        return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f"{value!r} is not a duration such as '250ms', '5s' or '2min'")


Seconds = Annotated[float, BeforeValidator(parse_duration)]

_BYTES = re.compile(r"^\s*(\d+)\s*(B|kB|KB|MB|GB|TB)?\s*$")
_BYTE_UNITS = {None: 1, "B": 1, "kB": 1024, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def parse_bytes(value: object) -> int:
    """Bytes from an integer or ``"512MB"``, ``"2GB"`` (binary units)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 1048576, '512MB' or '2GB'")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and (m := _BYTES.match(value)):
        return int(m.group(1)) * _BYTE_UNITS[m.group(2)]
    raise ValueError(f"{value!r} is not a size such as 1048576, '512MB' or '2GB'")


Bytes = Annotated[int, BeforeValidator(parse_bytes)]

_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def parse_share(value: object) -> float:
    """A share from ``"20%"`` or a plain number (``0.2``)."""
    if isinstance(value, bool):
        raise ValueError("expected a share such as '20%' or 0.2")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        if m := _PERCENT.match(value):
            return float(m.group(1)) / 100
        try:
            return float(value)
        except ValueError:
            pass
    raise ValueError(f"{value!r} is not a share such as '20%' or 0.2")


Share = Annotated[float, BeforeValidator(parse_share)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BatchConfig(_Frozen):
    size: int = Field(1000, ge=1, le=1_000_000)
    min_size: int = Field(1, ge=1, le=1_000_000)
    max_size: int = Field(100_000, ge=1, le=1_000_000)
    sleep_seconds: float = Field(0.0, ge=0, le=3600)
    # Adaptive sizing: aim every batch at this duration (None: the size stays fixed).
    target_seconds: Seconds | None = Field(None, ge=0.01, le=600)
    # Pause this multiple of the last batch's duration after it (0.5: busy at most 2/3 of the time).
    sleep_ratio: float = Field(0.0, ge=0, le=100)

    @model_validator(mode="after")
    def _ordered(self) -> BatchConfig:
        if not self.min_size <= self.size <= self.max_size:
            raise ValueError("need min_size <= size <= max_size")
        return self


class Limits(_Frozen):
    statement_timeout: Seconds = Field(5.0, gt=0, le=3600)
    lock_timeout: Seconds = Field(1.0, gt=0, le=3600)
    max_retries: int = Field(10, ge=0, le=10_000)
    connect_timeout: Seconds = Field(10.0, gt=0, le=600)
    connect_retry_seconds: Seconds = Field(60.0, ge=0, le=86_400)
    lock_wait: Seconds = Field(5.0, ge=0, le=3600)
    max_run_seconds: Seconds | None = Field(None, gt=0)
    # A ceiling on the average write rate (rows the UPDATEs report), whatever the batch size.
    max_rows_per_second: float | None = Field(None, gt=0, le=1e9)

    @model_validator(mode="after")
    def _lock_within_statement(self) -> Limits:
        if self.lock_timeout > self.statement_timeout:
            raise ValueError("lock_timeout must not exceed statement_timeout")
        return self


class ThrottleConfig(_Frozen):
    """Health gates: checked before a batch at most every ``check_every``; pause while one fails."""

    check_every: Seconds = Field(1.0, ge=0.05, le=3600)
    check_timeout: Seconds = Field(1.0, ge=0.01, le=60)
    max_replication_lag: Seconds | None = Field(None, gt=0, le=86_400)
    max_slot_lag_bytes: Bytes | None = Field(None, gt=0)
    max_active_sessions: int | None = Field(None, ge=0, le=1_000_000)
    health_query: str | None = Field(None, min_length=1, max_length=100_000)
    on_check_error: Literal["pause", "ignore"] = "pause"
    # The impact budget: the application's queries may get at most this much slower
    # ("20%" or 0.2; up to 1000%) because of the run: their typical latency (the time-weighted
    # mean) with max_impact, their tail (p99-like) with max_tail_impact; both may be set, the
    # stricter holds (see backfill.throttling.impact).
    max_impact: Share | None = Field(None, gt=0, le=10)
    max_tail_impact: Share | None = Field(None, gt=0, le=10)

    @property
    def impact_budget(self) -> bool:
        """Whether the impact budget paces the run (either statistic set)."""
        return self.max_impact is not None or self.max_tail_impact is not None

    def impact_limits(self) -> tuple[float | None, float | None]:
        """``(1 + max_impact, 1 + max_tail_impact)``, None for one not set."""
        return tuple(  # type: ignore[return-value]
            None if v is None else 1.0 + v for v in (self.max_impact, self.max_tail_impact)
        )

    @field_validator("health_query")
    @classmethod
    def _single_statement(cls, value: str | None) -> str | None:
        if value is not None and (";" in value or not value.strip()):
            raise ValueError("must be a single SQL query without ';'")
        return value.strip() if value is not None else None


class Table(_Frozen):
    schema_: str
    name: str

    @property
    def display(self) -> str:
        return f"{self.schema_}.{self.name}"


class Job(_Frozen):
    """A validated job definition."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    table: Table
    key: tuple[str, ...]
    set: str = Field(min_length=1, max_length=100_000)
    where: str = Field(min_length=1, max_length=100_000)
    on_row_error: Literal["fail", "skip"] = "fail"
    batch: BatchConfig = BatchConfig()
    limits: Limits = Limits()
    throttle: ThrottleConfig = ThrottleConfig()

    @field_validator("table", mode="before")
    @classmethod
    def _table(cls, value: object) -> object:
        if isinstance(value, Table):
            return value
        if not isinstance(value, str):
            raise ValueError("expected 'schema.table' or 'table'")
        parts = value.split(".")
        if len(parts) > 2 or not all(_IDENT.match(p) for p in parts):
            raise ValueError(
                f"{value!r} is not a plain identifier or schema.identifier "
                "(letters, digits, underscore)"
            )
        schema, name = parts if len(parts) == 2 else ("public", parts[0])
        return Table(schema_=schema, name=name)

    @field_validator("key", mode="before")
    @classmethod
    def _key(cls, value: object) -> object:
        columns = [value] if isinstance(value, str) else value
        if not isinstance(columns, list | tuple) or not columns:
            raise ValueError("expected a column name or a list of column names")
        for column in columns:
            if not isinstance(column, str) or not _IDENT.match(column):
                raise ValueError(f"{column!r} is not a plain column name")
        if len(set(columns)) != len(columns):
            raise ValueError("a column appears twice")
        return tuple(columns)

    @field_validator("set", "where")
    @classmethod
    def _fragment(cls, value: str) -> str:
        # Fragments are trusted SQL, but a ';' can only mean a second statement smuggled in.
        if ";" in value:
            raise ValueError("must be a single SQL expression without ';'")
        if not value.strip():
            raise ValueError("must not be empty")
        # Nor may it close what it did not open, or leave open a quote or comment: either
        # could swallow the batch's key range and update the whole table.
        if problem := fragment_problem(value):
            raise ValueError(problem)
        return value.strip()

    @property
    def fingerprint(self) -> str:
        """A digest of what the job means (not how fast it runs)."""
        meaning = {
            "table": self.table.display,
            "key": list(self.key),
            "set": " ".join(self.set.split()),
            "where": " ".join(self.where.split()),
        }
        blob = json.dumps(meaning, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def load_job(path: Path | str) -> Job:
    """Read and validate a job file; every problem becomes a one-line ConfigError."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read job file: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_job(data, source=str(path))


def parse_job(data: dict[str, object], *, source: str = "job") -> Job:
    try:
        return Job.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "job"
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{source}: {field}: {message}") from exc

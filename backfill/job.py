"""The job definition: a TOML file validated into frozen values.

A job says which rows to change (``table``, ``key``, ``where``), how (its shape: ``set`` for an
update, ``[copy]`` into another table, ``[delete]`` with an optional archive) and how gently
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
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from backfill.errors import ConfigError, first_error
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


JOB_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"  # also names its checkpoint, its lock and its metrics


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class BatchConfig(_Frozen):
    size: int = Field(1000, ge=1, le=1_000_000)
    min_size: int = Field(1, ge=1, le=1_000_000)
    max_size: int = Field(100_000, ge=1, le=1_000_000)
    sleep_seconds: float = Field(0.0, ge=0, le=3600)
    # Adaptive sizing: aim every batch at this duration (None: the size stays fixed).
    target_seconds: Seconds | None = Field(None, ge=0.01, le=600)
    # Pause this multiple of the last batch's duration after it (0.5: busy at most 2/3 of the time).
    sleep_ratio: float = Field(0.0, ge=0, le=100)
    # Whether each batch's commit waits for its WAL to be flushed (and for synchronous
    # standbys). False: a crash may lose the last batches, each with its checkpoint, and the
    # run redoes them (docs/failure-behaviour.md).
    wait_for_flush: bool = False

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


class AppLatency(_Frozen):
    """The application's own latency, from its Prometheus (``[throttle.app_latency]``): a PromQL
    ``query`` that answers one number, in seconds, which must stay at most ``max``; asked every
    ``every`` seconds (its rate window and a scrape interval: how late it sees a change)."""

    prometheus: str = Field(min_length=1, max_length=2000, pattern=r"^https?://")
    query: str = Field(min_length=1, max_length=10_000)
    max: Seconds = Field(gt=0, le=3600)
    every: Seconds = Field(30.0, ge=1, le=3600)


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
    # Over its max, the application's latency cuts the impact budget's rate (or, without a
    # budget, holds the run) until it is back under (see backfill.throttling.gates).
    app_latency: AppLatency | None = None

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


Shape = Literal["update", "copy", "delete", "archive"]

# What the rows of each shape became, for the log, `status` and the final line.
DONE_WORDS: dict[str, str] = {
    "update": "updated", "copy": "copied", "delete": "deleted", "archive": "archived",
}


class Table(_Frozen):
    schema_: str
    name: str

    @property
    def display(self) -> str:
        return f"{self.schema_}.{self.name}"


def _table_name(value: object) -> object:
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


def _fragment(value: str) -> str:
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


def _column(value: object) -> str:
    if not isinstance(value, str) or not _IDENT.match(value):
        raise ValueError(f"{value!r} is not a plain column name")
    return value


TableName = Annotated[Table, BeforeValidator(_table_name)]
Fragment = Annotated[str, Field(min_length=1, max_length=100_000), AfterValidator(_fragment)]
Column = Annotated[str, BeforeValidator(_column)]


class Copy(_Frozen):
    """The copy shape: insert the slice's rows into another table (``into``)."""

    into: TableName
    # Target columns copied by name from the source (None: every column both tables have).
    columns: tuple[Column, ...] | None = Field(None, min_length=1)
    on_conflict: Literal["nothing", "update"] = "nothing"
    # Target column = SQL expression over the source row.
    values: dict[Column, Fragment] = Field(default_factory=dict)
    # "trigger": the runner installs the sync trigger (backfill.lifecycle) in the transaction
    # that fixes the key range; "none": the application's writes are the user's to mirror.
    sync: Literal["none", "trigger"] = "none"

    @model_validator(mode="after")
    def _distinct(self) -> Copy:
        named = list(self.columns or ()) + list(self.values)
        if len(set(named)) != len(named):
            raise ValueError("a column appears twice in columns and values")
        return self


class Cutover(_Frozen):
    """How ``cutover`` and ``rollback`` swap the names: each attempt waits at most
    ``lock_timeout`` for its locks (the application's statements queue behind it no longer),
    attempts are retried with backoff for ``retry_for``; the source becomes ``old_name``."""

    lock_timeout: Seconds = Field(0.1, gt=0, le=60)
    retry_for: Seconds = Field(30.0, ge=0, le=86_400)
    statement_timeout: Seconds = Field(10.0, gt=0, le=3600)
    old_name: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class Delete(_Frozen):
    """The delete shape: delete the slice's rows, moving them to ``archive`` if set."""

    archive: TableName | None = None


class Job(_Frozen):
    """A validated job definition: its shape is exactly one of ``set`` (update), ``copy`` or
    ``delete``."""

    name: str = Field(pattern=JOB_NAME)
    table: TableName
    key: tuple[str, ...]
    set: Fragment | None = None
    copy_: Copy | None = Field(None, alias="copy")
    delete: Delete | None = None
    where: Fragment
    on_row_error: Literal["fail", "skip"] = "fail"
    batch: BatchConfig = BatchConfig()
    limits: Limits = Limits()
    throttle: ThrottleConfig = ThrottleConfig()
    cutover: Cutover = Cutover()

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

    @model_validator(mode="before")
    @classmethod
    def _copy_where(cls, data: object) -> object:
        # A copy may take every row; an update or a delete must say which rows (as always).
        if isinstance(data, dict) and "copy" in data and "where" not in data:
            return {**data, "where": "true"}
        return data

    @model_validator(mode="after")
    def _one_shape(self) -> Job:
        given = [f for f, v in (("set", self.set), ("[copy]", self.copy_),
                                ("[delete]", self.delete)) if v is not None]
        if len(given) != 1:
            found = " and ".join(given) if given else "none"
            raise ValueError(f"a job needs exactly one of set, [copy], [delete]; it has {found}")
        if self.copy_ is not None and self.copy_.sync == "trigger" and self.where != "true":
            raise ValueError(
                "copy.sync: the sync trigger mirrors every row: a job with it takes no where"
            )
        if "cutover" in self.model_fields_set and self.copy_ is None:
            raise ValueError("[cutover] is for a copy job ([copy] with sync = \"trigger\")")
        return self

    @property
    def shape(self) -> Shape:
        """What a batch does to its rows: ``update``, ``copy``, ``delete`` or ``archive``."""
        if self.copy_ is not None:
            return "copy"
        if self.delete is not None:
            return "archive" if self.delete.archive is not None else "delete"
        return "update"

    @property
    def sql_fields(self) -> str:
        """The job-file fields whose SQL goes into the batch statement (for its errors)."""
        return {"update": "set/where", "copy": "copy.values/where"}.get(self.shape, "where")

    @property
    def fingerprint(self) -> str:
        """A digest of what the job means (not how fast it runs)."""
        meaning: dict[str, object] = {
            "table": self.table.display,
            "key": list(self.key),
            "where": " ".join(self.where.split()),
        }
        if self.set is not None:  # the UPDATE shape keeps the digest it always had
            meaning["set"] = " ".join(self.set.split())
        if self.copy_ is not None:
            meaning["copy"] = {
                "into": self.copy_.into.display,
                "columns": None if self.copy_.columns is None else list(self.copy_.columns),
                "on_conflict": self.copy_.on_conflict,
                "values": {c: " ".join(v.split()) for c, v in self.copy_.values.items()},
            }
            if self.copy_.sync != "none":  # a copy without it keeps the digest it always had
                meaning["copy"]["sync"] = self.copy_.sync  # type: ignore[index]
        if self.delete is not None:
            archive = self.delete.archive
            meaning["delete"] = {"archive": None if archive is None else archive.display}
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
        fields, message = first_error(exc)
        where = f"{source}: {'.'.join(fields)}" if fields else source
        raise ConfigError(f"{where}: {message}") from exc

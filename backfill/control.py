"""Live control: a job's speed settings as its job file sets them, overridden while it runs.

``backfill pause``, ``resume`` and ``set`` write overrides into the checkpoint's ``control``
column (flat keys such as ``"batch.size"``, plus ``"paused"``). A runner gets that column for
free with every batch (the batch statement returns it) and polls it every ``check_every`` while
no batch runs. ``LiveControl`` turns the job file's values plus the overrides into the
``Knobs`` that the loop's sizer and the throttles read, and logs every change.

Only the keys in ``LIVE_KEYS`` can be overridden; each is validated by the same model as the job
file (so bounds and units agree), and the section it belongs to is validated as a whole (so
``batch.size`` cannot leave ``min_size .. max_size``). ``health_query`` is deliberately not
settable: anyone who can write the state table could otherwise run SQL as the runner.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from backfill.errors import ConfigError, first_error
from backfill.job import JOB_NAME, BatchConfig, Job, Limits, ThrottleConfig
from backfill.live import LIVE_KEYS

log = logging.getLogger(__name__)

PAUSE_KEY = "paused"  # the control key that `pause` sets and `resume` removes
SECTIONS: dict[str, type[BaseModel]] = {
    "batch": BatchConfig, "limits": Limits, "throttle": ThrottleConfig,
}
DEFAULT = "default"  # `set key=default` removes the override
OFF = ("off", "none")  # `set key=off` switches an optional limit off
_NAME = re.compile(JOB_NAME)


def file_settings(job: Job) -> dict[str, Any]:
    """The job file's speed settings as flat keys, saved with the checkpoint at run start so
    that ``status`` can show them next to the overrides."""
    out: dict[str, Any] = {}
    for section in SECTIONS:
        for name, value in getattr(job, section).model_dump(mode="json").items():
            out[f"{section}.{name}"] = value
    return out


def _optional(key: str) -> bool:
    section, name = key.split(".")
    return SECTIONS[section].model_fields[name].default is None


@dataclass(frozen=True, slots=True)
class Knobs:
    """The settings in force: the job file's, with the live overrides applied."""

    batch: BatchConfig
    limits: Limits
    throttle: ThrottleConfig
    paused: bool = False

    @classmethod
    def from_job(cls, job: Job) -> Knobs:
        return cls(job.batch, job.limits, job.throttle)

    def value(self, key: str) -> Any:
        if key == PAUSE_KEY:
            return self.paused
        section, name = key.split(".")
        return getattr(getattr(self, section), name)


def _first_error(exc: ValidationError, section: str) -> str:
    where, message = first_error(exc)
    return f"{'.'.join([section, *where])}: {message}"


def resolve(base: Knobs, control: Mapping[str, Any]) -> tuple[Knobs, list[str]]:
    """Apply ``control`` to ``base``. A section whose overrides do not validate keeps its base
    values; the problems come back as messages."""
    problems: list[str] = []
    sections: dict[str, Any] = {}
    for section, model in SECTIONS.items():
        current: BaseModel = getattr(base, section)
        updates = {
            key.split(".")[1]: control[key]
            for key in LIVE_KEYS
            if key.startswith(section + ".") and key in control
        }
        sections[section] = current
        if updates:
            try:
                sections[section] = model.model_validate({**current.model_dump(), **updates})
            except ValidationError as exc:
                problems.append(_first_error(exc, section))
    unknown = sorted(set(control) - set(LIVE_KEYS) - {PAUSE_KEY})
    if unknown:
        problems.append("unknown keys: " + ", ".join(unknown))
    return Knobs(**sections, paused=control.get(PAUSE_KEY) is True), problems


@dataclass
class LiveControl:
    """The runner's view of its settings; ``apply`` takes the latest ``control`` column."""

    base: Knobs
    job: str
    clock: Callable[[], float] = time.monotonic
    knobs: Knobs = field(init=False)
    control: dict[str, Any] = field(init=False, default_factory=dict)
    fresh_at: float = field(init=False, default=-math.inf)  # when control was last read

    def __post_init__(self) -> None:
        self.knobs = self.base

    def apply(self, overrides: Mapping[str, Any]) -> None:
        self.fresh_at = self.clock()
        if overrides == self.control:
            return
        knobs, problems = resolve(self.base, overrides)
        for problem in problems:
            log.warning("ignoring invalid live control", extra={"job": self.job, "error": problem})
        changes = {
            key: [self.knobs.value(key), knobs.value(key)]
            for key in (*LIVE_KEYS, PAUSE_KEY)
            if self.knobs.value(key) != knobs.value(key)
        }
        if changes:
            log.info("live control changed", extra={"job": self.job, "changes": changes})
        self.knobs, self.control = knobs, dict(overrides)

    @property
    def sizing(self) -> BatchConfig:
        return self.knobs.batch


# --- the `set` command's side: validating and merging overrides --------------------------------


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ConfigError(f"{name!r} is not a job name ([a-z0-9][a-z0-9_-]*, at most 63 chars)")
    return name


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """``["batch.size=500", "limits.max_rows_per_second=off"]`` -> changes to the overrides.

    Each value is checked on its own against its job-file field (type, unit, bounds), so bad
    input fails before anything connects; it stays text here, and ``merge`` validates it again
    with the rest of its section (``batch.size`` within ``min_size .. max_size``). ``None``
    switches a limit off and ``DEFAULT`` removes the override. Unknown keys, malformed items
    and bad values raise ``ConfigError``.
    """
    if not items:
        raise ConfigError("nothing to set: give key=value pairs, e.g. batch.size=500")
    changes: dict[str, Any] = {}
    for item in items:
        key, sep, text = (part.strip() for part in item.partition("="))
        if not sep or not key or not text:
            raise ConfigError(f"{item!r}: expected key=value, e.g. batch.size=500")
        if key not in LIVE_KEYS:
            raise ConfigError(f"{key}: not a live setting; one of: {', '.join(LIVE_KEYS)}")
        if text.lower() in OFF:
            if not _optional(key):
                raise ConfigError(f"{key}: cannot be switched off (use a value or 'default')")
            changes[key] = None
        elif text.lower() == DEFAULT:
            changes[key] = DEFAULT
        else:
            _check_value(key, text)
            changes[key] = text
    return changes


def _check_value(key: str, text: str) -> None:
    """``text`` as the job file's field ``key`` would take it, without the other fields."""
    section, name = key.split(".")
    field_info = SECTIONS[section].model_fields[name]
    # The field's type and constraints, built at run time (hence not a type form for mypy).
    field_type: Any = Annotated[field_info.annotation, field_info]
    try:
        TypeAdapter(field_type).validate_python(text)
    except ValidationError as exc:
        raise ConfigError(f"{key}: {first_error(exc)[1]}") from exc


def merge(
    settings: Mapping[str, Any], control: Mapping[str, Any], changes: Mapping[str, Any]
) -> dict[str, Any]:
    """The new ``control`` after ``changes``, every value validated and normalised.

    ``settings`` are the job file's values as the last run saved them (empty before the first
    run: then the defaults stand in, and a runner clamps what they could not check).
    """
    new = {k: v for k, v in control.items() if k not in changes}
    new.update({k: v for k, v in changes.items() if v != DEFAULT})
    for section, model in SECTIONS.items():
        prefix = section + "."
        touched = [k for k in changes if k.startswith(prefix)]
        if not touched:
            continue
        base = {k[len(prefix):]: v for k, v in settings.items() if k.startswith(prefix)}
        overrides = {
            k[len(prefix):]: new[k] for k in LIVE_KEYS if k.startswith(prefix) and k in new
        }
        try:
            valid = model.model_validate({**base, **overrides})
        except ValidationError as exc:
            raise ConfigError(_first_error(exc, section)) from exc
        for key in touched:
            if key in new:
                new[key] = getattr(valid, key[len(prefix):])
    return new


def show(value: Any) -> str:
    """A setting's value as ``status`` and ``set`` print it (``off`` for a limit switched off)."""
    return "off" if value is None else str(value)


def overridden(
    settings: Mapping[str, Any], control: Mapping[str, Any]
) -> list[tuple[str, Any, Any]]:
    """``(key, job-file value, live value)`` for every override in force, for ``status``."""
    return [(k, settings.get(k, "?"), control[k]) for k in LIVE_KEYS if k in control]

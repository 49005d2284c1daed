"""Logging setup: JSON lines when not on a terminal (a pod), readable lines on one.

Structured fields travel in ``extra={...}``; the JSON formatter emits them as top-level keys.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        return f"{record.levelname.lower():7} {record.getMessage()}" + (
            f"  {extra}" if extra else ""
        )


class _Stderr:
    """``sys.stderr`` as it is at each write: a live progress bar redirects it, so that log
    lines are printed above the bar instead of through it."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def setup(
    *, level: str = "INFO", stream: TextIO | None = None, json_lines: bool | None = None
) -> None:
    out: TextIO | _Stderr = stream or _Stderr()
    if json_lines is None:
        json_lines = not out.isatty()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger("backfill")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False

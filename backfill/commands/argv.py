"""The command line's way in: the verbs a process starts to do real work (``run``) parsed and
dispatched without building the typer CLI; everything else, and any argument line the fast
path does not read exactly as typer would, goes to ``backfill.cli``, unchanged.

Building the typer application (its parameter machinery, every verb's options) cost about
0.2 s of a run's start-up, before its first statement. ``FAST`` names, for each fast verb, its
positional arguments, its options (each a flag and a check its value must pass, else typer
decides) and the plain function it calls with them; a new verb is one entry there, with its
function in ``backfill.commands.launch`` (``backfill.cli`` calls the same function, so both
paths do the same thing). Imports nothing but the standard library until a verb runs.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

LEVELS = ("debug", "info", "warning", "error")

# A value typer would take as it is: an integer in a range, a number at least some minimum.
_INT = re.compile(r"[0-9]{1,5}")
_NUMBER = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")


def port(value: str) -> int | None:
    return int(value) if _INT.fullmatch(value) and int(value) <= 65535 else None


def at_least_tenth(value: str) -> float | None:
    return float(value) if _NUMBER.fullmatch(value) and float(value) >= 0.1 else None


def text(value: str) -> str | None:
    return value if value and not value.startswith("-") else None


@dataclass(frozen=True, slots=True)
class Verb:
    """A verb on the fast path: ``call`` (``module:function``) gets its positional arguments
    (``args``, in order, as ``Path``) and ``options`` (``--flag``: keyword and check) by
    keyword; an option left out is None, or its environment variable (``env``) when set."""

    call: str
    args: tuple[str, ...] = ()
    options: dict[str, tuple[str, Callable[[str], Any]]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


FAST = {
    "run": Verb(
        "backfill.commands.launch:run_job", args=("path",),
        options={
            "--shard": ("shard", text),
            "--metrics-port": ("metrics_port", port),
            "--progress-every": ("progress_every", at_least_tenth),
        },
        env={"shard": "BACKFILL_SHARD"},
    ),
}


def parse(argv: Sequence[str]) -> tuple[Verb, str, dict[str, Any]] | None:
    """The verb, the log level and the keywords of a fast argument line; None for any other."""
    level, rest = "info", list(argv)
    if rest[:1] == ["--log-level"] and len(rest) > 1:
        level, rest = rest[1], rest[2:]
    elif rest and rest[0].startswith("--log-level="):
        level, rest = rest[0].split("=", 1)[1], rest[1:]
    verb = FAST.get(rest[0]) if rest else None
    if verb is None or level not in LEVELS:
        return None
    values = _values(verb, rest[1:])
    if values is None:
        return None
    for name, variable in verb.env.items():
        if values.get(name) is None and variable in os.environ:
            values[name] = text(os.environ[variable])
            if values[name] is None:
                return None
    return verb, level, values


def _values(verb: Verb, words: list[str]) -> dict[str, Any] | None:
    """Each option at most once, a value that passes its check, every positional argument."""
    values: dict[str, Any] = {keyword: None for keyword, _ in verb.options.values()}
    given: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        flag, eq, inline = word.partition("=")
        if word.startswith("-"):
            known = verb.options.get(flag)
            raw = inline if eq else (words[i + 1] if i + 1 < len(words) else None)
            if known is None or raw is None or values[known[0]] is not None:
                return None  # --help, an unknown option, a missing or repeated value: typer's
            values[known[0]] = known[1](raw)
            if values[known[0]] is None:
                return None
            i += 1 if eq else 2
            continue
        given.append(word)
        i += 1
    if len(given) != len(verb.args) or any(not a for a in given):
        return None
    return values | {name: Path(a) for name, a in zip(verb.args, given, strict=True)}


def main() -> None:
    """The console script: a fast verb runs here, anything else in ``backfill.cli``; a
    ``BackfillError`` ends as one line on stderr and its documented exit code either way."""
    fast = parse(sys.argv[1:])
    if fast is None:
        from backfill.cli import main as typer_main

        typer_main()
        return
    from backfill import logs
    from backfill.errors import BackfillError

    verb, level, values = fast
    module, name = verb.call.split(":")
    try:
        logs.setup(level=level)
        getattr(importlib.import_module(module), name)(**values)
    except BackfillError as error:
        print(f"backfill: error: {error}", file=sys.stderr)
        _leave(int(error.exit_code))
    except KeyboardInterrupt:
        _leave(130)  # as typer exits on one
    _leave(0)


def _leave(code: int) -> NoReturn:
    """End the process once the verb has closed what it opened, without the interpreter's
    teardown (freeing every imported module's objects: ~50 ms after a run, measured), but
    as an exit would: non-daemon threads joined, logs and stdio flushed."""
    import logging
    import threading

    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

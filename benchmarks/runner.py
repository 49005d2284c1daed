"""Our runner, two ways: the CLI as a user runs it (a real process: whole-process wall time and
peak RSS), and in-process through the programmatic API with an observer that records every
batch (for batch-time profiles across the key range)."""

from __future__ import annotations

import compileall
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from pydantic import SecretStr

from backfill import commands
from backfill.checkpoint import BatchResult
from backfill.conninfo import ConnectParams
from backfill.errors import BackfillError, Interrupted
from backfill.job import Job, parse_job
from backfill.observers import Quiet
from benchmarks.db import SET_, WHERE, Bench
from benchmarks.sample import Sample

REPO = Path(__file__).resolve().parent.parent
JOB = "bench-users"


def job_fields(
    *,
    table: str = "users",
    size: int = 1000,
    sleep_seconds: float = 0.0,
    target_seconds: float | None = None,
    sleep_ratio: float = 0.0,
    batch: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
    throttle: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A job over the benchmark's table; ``batch``, ``limits`` and ``throttle`` add or override
    fields."""
    batch = {"size": size, "max_size": max(size, 100_000), **(batch or {})}
    if sleep_seconds:
        batch["sleep_seconds"] = sleep_seconds
    if sleep_ratio:
        batch["sleep_ratio"] = sleep_ratio
    if target_seconds is not None:
        batch["target_seconds"] = target_seconds
    job = {
        "name": JOB,
        "table": f"public.{table}",
        "key": "id",
        "set": SET_,
        "where": WHERE,
        "batch": batch,
    }
    tables = {"limits": limits, "throttle": throttle}
    return job | {name: table for name, table in tables.items() if table}


def supported(fields: dict[str, Any]) -> str | None:
    """None when this version of the runner accepts the job, else why not."""
    try:
        parse_job(fields, source="benchmark")
    except BackfillError as error:
        return str(error)
    return None


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value)


def write_job(directory: Path, fields: dict[str, Any]) -> Path:
    path = directory / "job.toml"
    path.write_text("\n".join(_lines(fields)) + "\n")
    return path


def _lines(fields: dict[str, Any], prefix: str = "") -> list[str]:
    """TOML: the keys, then each nested dict as a table (``[throttle.app_latency]``)."""
    lines = [f"{k} = {_toml(v)}" for k, v in fields.items() if not isinstance(v, dict)]
    for name, table in fields.items():
        if isinstance(table, dict):
            lines += [f"\n[{prefix}{name}]", *_lines(table, f"{prefix}{name}.")]
    return lines


@dataclass(frozen=True, slots=True)
class Process:
    exit_code: int
    seconds: float
    max_rss_mb: float | None
    stderr: str
    started_at: float | None = None
    """Epoch seconds when the launcher started the command (the server's clock is the same)."""
    cpu_seconds: float | None = None
    """User + system CPU of the command (its rusage)."""


def cli_env(dsn: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "BACKFILL_"))}
    env.pop("DATABASE_URL", None)
    env["BACKFILL_DATABASE_URL"] = dsn
    env["BACKFILL_METRICS_PORT"] = "0"  # no HTTP endpoint: runs must not fight over a port
    return env


LAUNCH = Path(__file__).resolve().with_name("launch.py")


def compiled() -> None:
    """Byte-compile the package (idempotent), so that its processes start as an installed one
    does (pip compiles at install time, in the image too): with ``PYTHONDONTWRITEBYTECODE=1``
    (set on this project's machines) a clone's package is otherwise compiled from source again
    in every process, about a quarter of the runner's start-up."""
    compileall.compile_dir(REPO / "backfill", quiet=1)


def spawn(
    args: list[str], env: dict[str, str], stop_after: float | None,
    stop: threading.Event | None = None,
) -> Process:
    """Run a process to its end through ``launch.py`` (which measures it: wall time from its
    start, peak RSS and CPU of its own); SIGTERM it after ``stop_after`` seconds or when
    ``stop`` is set, whichever comes first (``stop`` is set once it has ended). Blocking."""
    compiled()
    with tempfile.TemporaryFile(mode="w+") as err, tempfile.NamedTemporaryFile("r") as out:
        launcher = [sys.executable, "-S", str(LAUNCH), out.name, *args]
        t0 = time.perf_counter()
        proc = subprocess.Popen(launcher, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        # A pidfd cannot signal a recycled pid, whatever the timer's timing.
        pidfd = os.pidfd_open(proc.pid)
        done = threading.Event()
        wake = stop or threading.Event()
        watcher = None
        if stop_after is not None or stop is not None:
            watcher = threading.Thread(target=_watch, args=(pidfd, wake, done, stop_after))
            watcher.start()
        try:
            proc.wait()
        finally:
            done.set()
            if watcher is not None:
                wake.set()  # the process ended: release the watcher
                watcher.join()
            os.close(pidfd)
        err.seek(0)
        measured = out.read().split()
        if not measured:  # the launcher itself was stopped before it started the command
            return Process(proc.returncode, time.perf_counter() - t0, None, err.read())
        code, seconds, rss_kb, started, cpu = measured
        return Process(
            int(code), float(seconds), int(rss_kb) / 1024, err.read(), float(started), float(cpu)
        )


def _watch(pidfd: int, wake: threading.Event, done: threading.Event, after: float | None) -> None:
    wake.wait(after)
    if not done.is_set():
        _terminate(pidfd)


def _terminate(pidfd: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
    except ProcessLookupError:
        pass


async def cli_process(
    bench: Bench,
    fields: dict[str, Any],
    *,
    stop_after: float | None = None,
    stop: threading.Event | None = None,
    env: dict[str, str] | None = None,
    python: tuple[str, ...] = (),
    options: tuple[str, ...] = (),
) -> Process:
    """``backfill run job.toml`` in a real process, to its end (see ``spawn``); ``env`` adds to
    its environment, ``python`` are interpreter options (e.g. ``-X importtime``), ``options``
    the CLI's before the verb (e.g. ``--log-level debug``)."""
    with tempfile.TemporaryDirectory(prefix="backfill-bench-") as tmp:
        path = write_job(Path(tmp), fields)
        args = [sys.executable, *python, "-m", "backfill", *options, "run", str(path)]
        environ = cli_env(bench.dsn) | (env or {})
        return await anyio.to_thread.run_sync(spawn, args, environ, stop_after, stop)


async def cli_run(
    bench: Bench,
    fields: dict[str, Any],
    scenario: str,
    *,
    stop_after: float | None = None,
    stop: threading.Event | None = None,
    env: dict[str, str] | None = None,
) -> Sample:
    """``backfill run job.toml`` in a real process; rows and batches from its checkpoint."""
    proc = await cli_process(bench, fields, stop_after=stop_after, stop=stop, env=env)
    completed = proc.exit_code == 0
    # 75: stopped gracefully at the end of a window; -15: the window ended before the process
    # had even installed its signal handlers (a tiny window in smoke mode).
    if proc.exit_code not in (0, 75, -signal.SIGTERM):
        raise RuntimeError(f"backfill run exited {proc.exit_code}: {proc.stderr[-2000:]}")
    ckpt = await bench.checkpoint_row(JOB) or {}
    stats = await bench.statement_stats(f'%UPDATE "public"."{fields["table"][7:]}" SET%')
    batches = ckpt.get("batches")
    run_seconds = ckpt.get("run_seconds")
    return Sample(
        scenario,
        int(ckpt.get("rows_updated") or 0),
        proc.seconds,
        batches=batches,
        longest_tx=None if stats is None else stats["max_ms"] / 1000,
        run_seconds=run_seconds,
        batch_ms=run_seconds * 1000 / batches if run_seconds and batches else None,
        statement_ms=None if stats is None else stats["mean_ms"],
        rss_mb=proc.max_rss_mb,
        completed=completed,
        exit_code=proc.exit_code,
        cpu_seconds=proc.cpu_seconds,
        started_at=proc.started_at,
    )


@dataclass
class Recorder(Quiet):
    """An observer that keeps every committed batch (and ignores every other event)."""

    batches: list[BatchResult] = field(default_factory=list)

    def committed(self, result: BatchResult) -> None:
        self.batches.append(result)


async def in_process(bench: Bench, fields: dict[str, Any]) -> tuple[list[BatchResult], float]:
    """Run the job through ``backfill.commands.run``; every batch, and the wall seconds."""
    job: Job = parse_job(fields, source="benchmark")
    recorder = Recorder()
    params = ConnectParams(dsn=SecretStr(bench.dsn))
    t0 = time.perf_counter()
    try:
        await commands.run(job, params, observers=[recorder])
    except Interrupted:
        pass
    return recorder.batches, time.perf_counter() - t0


"""Everyone else: pgbench (select-only or tpcb-like) and a single-row writer, driven while a
backfill runs, measured only over the backfill's own time window.

pgbench runs in back-to-back segments with a per-transaction log (``-l``), so that it stops soon
after the backfill does and every log is complete; a transaction counts when it ended inside the
window. The writer updates the row just after the backfill's committed cursor, again and again:
its wait is how long the backfill blocks an application write. A backfill that commits nothing
until it ends (one UPDATE, a DO block) has no committed cursor, so the writer waits on the first
row of the range, as an application writing a row the backfill already holds.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import asyncpg

from backfill import sql
from benchmarks.db import Bench
from benchmarks.stats import percentile

T = TypeVar("T")
PGBENCH_DB = "pgbench"

WRITE = """
UPDATE public.users SET email = email
WHERE id = (SELECT id FROM public.users WHERE id > $1 ORDER BY id LIMIT 1)"""
HOLD_OFF = 0.2
CURSOR = f"SELECT cursor[1]::int8 FROM {sql.SCHEMA}.checkpoints WHERE job = $1 AND shard = 0"


def pgbench_binary(bench: Bench) -> str | None:
    if bench.pg.bindir is not None and (bench.pg.bindir / "pgbench").exists():
        return str(bench.pg.bindir / "pgbench")
    return shutil.which("pgbench")


async def init_pgbench(bench: Bench, binary: str, scale: int) -> None:
    """pgbench's database and tables, once (every section that loads the server shares them)."""
    if await bench.admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", PGBENCH_DB):
        return
    await bench.admin.execute(f"CREATE DATABASE {PGBENCH_DB}")
    await anyio.run_process(
        [binary, *_conn_args(bench), "-i", "-q", "-s", str(scale), PGBENCH_DB], check=True
    )


def _conn_args(bench: Bench) -> list[str]:
    return ["-h", "127.0.0.1", "-p", str(bench.pg.port), "-U", bench.pg.superuser]


@dataclass
class Pgbench:
    binary: str
    kind: str
    clients: int
    segment: tuple[str, str]
    rate: float | None = None
    """An open loop: a fixed arrival rate (``-R``, transactions per second in all); each
    logged latency then counts from the scheduled start, so it includes the schedule lag."""
    logs: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="bench-pgbench-")))

    def command(self, bench: Bench, n: int) -> list[str]:
        mode = ["-S"] if self.kind == "select-only" else []
        if self.rate is not None:
            mode += ["-R", f"{self.rate:.1f}"]
        return [
            self.binary, *_conn_args(bench), *mode, "-n", "-M", "prepared",
            "-c", str(self.clients), "-j", str(min(self.clients, 2)), *self.segment,
            "-l", "--log-prefix", str(self.logs / f"seg{n}"), PGBENCH_DB,
        ]

    async def drive(self, bench: Bench, stop: anyio.Event) -> None:
        """Back-to-back segments until ``stop``; the segment in flight always completes."""
        n = 0
        while not stop.is_set():
            await anyio.run_process(self.command(bench, n), check=True)
            n += 1

    def transactions(self) -> list[tuple[float, float, float | None]]:
        """Every logged transaction: (end, epoch seconds; latency ms; schedule lag ms, with
        ``rate`` only), in the order of their ends."""
        found: list[tuple[float, float, float | None]] = []
        for path in self.logs.iterdir():
            for line in path.read_text().splitlines():
                f = line.split()
                try:
                    end = int(f[4]) + int(f[5]) / 1e6
                    latency = int(f[2]) / 1000
                    lag = int(f[6]) / 1000 if self.rate is not None else None
                except (IndexError, ValueError):
                    continue  # a failed or skipped transaction
                found.append((end, latency, lag))
        return sorted(found)

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        """TPS and latency of the transactions that ended inside [t0, t1] (epoch seconds)."""
        inside = [t for t in self.transactions() if t0 <= t[0] <= t1]
        latencies = [latency for _, latency, _ in inside]
        seconds = max(t1 - t0, 1e-9)
        measured = {
            "tps": len(latencies) / seconds,
            "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99),
            "transactions": len(latencies),
            "seconds": seconds,
        }
        if self.rate is not None:
            measured["lag_p99_ms"] = percentile([lag or 0.0 for *_, lag in inside], 99)
        return measured

    def clean(self) -> None:
        shutil.rmtree(self.logs, ignore_errors=True)


@dataclass
class Writer:
    """Updates one row at a time, ``pause`` apart.

    Before the backfill starts (the idle baseline) it writes the range's last row. Then it
    writes the row after the committed cursor of ``job`` (before any commit, and for a backfill
    that commits only at its end: the range's first row, one the backfill holds), from
    ``HOLD_OFF`` seconds after the backfill's start: writing that first row any earlier would
    move its live version to the end of the table, where a sequential scan reaches it last.
    """

    job: str
    pause: float
    idle: list[float] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)

    async def drive(
        self, bench: Bench, measure: anyio.Event, start: anyio.Event, stop: anyio.Event
    ) -> None:
        conn = await bench.connect()
        try:
            lo, hi = await conn.fetchrow("SELECT min(id), max(id) FROM public.users")
            await measure.wait()
            while not start.is_set():
                self.idle.append(await self._write(conn, int(hi) - 1))
            await anyio.sleep(HOLD_OFF)
            while not stop.is_set():
                cursor = await conn.fetchval(CURSOR, self.job)
                after = int(lo) - 1 if cursor is None else cursor
                self.waits.append(await self._write(conn, after))
        finally:
            await conn.close()

    async def _write(self, conn: asyncpg.Connection, after: int) -> float:
        t0 = time.perf_counter()
        await conn.execute(WRITE, after)
        seconds = time.perf_counter() - t0
        await anyio.sleep(self.pause)
        return seconds


def _writes(waits: list[float]) -> dict[str, Any]:
    ms = [w * 1000 for w in waits]
    return {
        "writes": len(ms),
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms, default=None),
    }


async def under_load(
    bench: Bench,
    pgbench: Pgbench,
    writer: Writer,
    backfill: Callable[[], Awaitable[T]],
    *,
    warmup: float,
    idle: float,
) -> tuple[T, dict[str, Any]]:
    """Load (pgbench and the writer) for ``warmup`` seconds, then ``idle`` seconds measured as
    this window's own baseline, then ``backfill``, measured over its own time."""
    measure, start, stop_load, stop_writer = (anyio.Event() for _ in range(4))
    async with anyio.create_task_group() as tg:
        tg.start_soon(pgbench.drive, bench, stop_load)
        tg.start_soon(writer.drive, bench, measure, start, stop_writer)
        await anyio.sleep(warmup)
        measure.set()
        tb = time.time()
        await anyio.sleep(idle)
        t0 = time.time()
        start.set()
        try:
            result = await backfill()
        finally:
            t1 = time.time()
            stop_writer.set()
            stop_load.set()
    effect = {
        "baseline": {"pgbench": pgbench.window(tb, t0), "writer": _writes(writer.idle)},
        "pgbench": pgbench.window(t0, t1),
        "writer": _writes(writer.waits),
    }
    pgbench.clean()
    return result, effect


def whole_seconds(value: float) -> str:
    """A duration for pgbench's ``-T``, which takes whole seconds."""
    return str(max(1, round(value)))


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def pooled(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """All idle baselines of one load together: TPS over their total time, latency
    percentiles averaged, the writer's worst."""
    runs = [w["pgbench"] for w in windows]
    seconds = sum(b["seconds"] for b in runs)
    writer = [w["writer"] for w in windows]
    found = {
        "pgbench": {
            "tps": sum(b["transactions"] for b in runs) / seconds if seconds else 0.0,
            "p50_ms": _mean([b["p50_ms"] for b in runs]),
            "p99_ms": _mean([b["p99_ms"] for b in runs]),
            "transactions": sum(b["transactions"] for b in runs),
            "seconds": seconds,
        },
        "writer": {
            "writes": sum(w["writes"] for w in writer),
            "p50_ms": _mean([w["p50_ms"] for w in writer]),
            "p99_ms": _mean([w["p99_ms"] for w in writer]),
            "max_ms": max((w["max_ms"] or 0 for w in writer), default=None),
        },
    }
    if any("lag_p99_ms" in b for b in runs):
        found["pgbench"]["lag_p99_ms"] = _mean([b.get("lag_p99_ms") for b in runs])
    return found


async def alone(
    bench: Bench, binary: str, kind: str, clients: int, *, seconds: float, warmup: float
) -> dict[str, Any]:
    """pgbench (closed loop) with nothing else running, measured after ``warmup`` seconds."""
    pgbench = Pgbench(binary, kind, clients, ("-T", whole_seconds(warmup + seconds)))
    try:
        await anyio.run_process(pgbench.command(bench, 0), check=True)
        transactions = pgbench.transactions()
        first = min((end - ms / 1000 for end, ms, _ in transactions), default=0.0)
        last = max((end for end, _, _ in transactions), default=0.0)
        return pgbench.window(first + warmup, last)
    finally:
        pgbench.clean()

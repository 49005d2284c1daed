"""How wrong is the ETA when the pace changes? A one-off measurement, not a test.

    python3 -m benchmarks.eta_error [--rows 1000000] [--size 1000] [--sleep 0.02] [--slow 0.08]

Seeds ``--rows`` rows in a throwaway PostgreSQL (durable settings), then backfills them with
``--size`` keys per batch. A throttle pauses ``--sleep`` s after each batch in the first half of
the key range and ``--slow`` s in the second half, so throughput drops halfway. The run's own
``Tracker`` (the one behind ``backfill_eta_seconds``, the log and the terminal line) is sampled
after every batch; once the run has ended, each ETA is compared with the time that was really
left. Printed: the error by stretch of the run, and the same for an ETA from the run's average
rate, for comparison.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field

import anyio
import asyncpg
from pydantic import SecretStr

from backfill import commands
from backfill.checkpoint import BatchResult, Checkpoint
from backfill.conninfo import ConnectParams
from backfill.job import parse_job
from backfill.observers import Quiet
from backfill.pgtemp import TempPostgres
from backfill.progress import Tracker
from backfill.protocols import Pause

SEED = """
CREATE TABLE public.users (
    id bigint PRIMARY KEY, first_name text NOT NULL, last_name text NOT NULL, display_name text
);
INSERT INTO public.users (id, first_name, last_name)
SELECT g, 'first' || g, 'last' || g FROM generate_series(1, $1::int8) g;
"""


@dataclass
class Halfway:
    """A throttle: ``first`` s after each batch below ``middle``, ``second`` s after it."""

    middle: int
    first: float
    second: float

    async def next_pause(self, last: BatchResult | None) -> Pause | None:
        if last is None or last.cursor is None:
            return None
        slow = int(last.cursor[0]) >= self.middle
        return Pause(self.second if slow else self.first, "sleep")


@dataclass
class Sampler(Quiet):
    """An observer that records (time, fraction, ETA, average-rate ETA) after each batch."""

    tracker: Tracker
    t0: float = 0.0
    f0: float = 0.0
    points: list[tuple[float, float, float | None, float | None]] = field(default_factory=list)

    def started(self, checkpoint: Checkpoint) -> None:
        self.t0 = time.monotonic()
        self.tracker.start(checkpoint, self.t0)
        self.f0 = self.tracker.fraction or 0.0

    def committed(self, result: BatchResult) -> None:
        now = time.monotonic()
        self.tracker.commit(result, now)
        done = self.tracker.fraction or 0.0
        average = None
        if done > self.f0 and now > self.t0:
            average = (1 - done) / ((done - self.f0) / (now - self.t0))
        self.points.append((now, done, self.tracker.eta_seconds(), average))


def report(sampler: Sampler, end: float, change: float) -> None:
    """Error = ETA - time really left, as a share of the time really left."""
    stretches = [
        (0.05, 0.5, "first half (steady)"),
        (0.5, 0.6, "50-60% (just after the change)"),
        (0.6, 0.75, "60-75%"),
        (0.75, 0.95, "75-95%"),
    ]
    print(f"run: {end - sampler.t0:.1f} s; the pace changed at {change - sampler.t0:.1f} s")
    print(
        f"{'stretch':34} {'window ETA: median |err|':>25} {'max |err|':>10} "
        f"{'average-rate ETA: median |err|':>31}"
    )
    for lo, hi, name in stretches:
        window, average = [], []
        for t, done, eta, avg in sampler.points:
            left = end - t
            if lo <= done < hi and left > 0:
                if eta is not None:
                    window.append(abs(eta - left) / left)
                if avg is not None:
                    average.append(abs(avg - left) / left)
        if window:
            print(
                f"{name:34} {100 * statistics.median(window):>24.1f}% "
                f"{100 * max(window):>9.1f}% {100 * statistics.median(average):>30.1f}%"
            )
    settled = next(
        (
            t
            for t, done, eta, _ in sampler.points
            if t > change and eta is not None and abs(eta - (end - t)) / (end - t) < 0.1
        ),
        None,
    )
    if settled is not None:
        print(f"within 10% again {settled - change:.1f} s after the change")


async def main(rows: int, size: int, sleep: float, slow: float, window: float, least: int) -> None:
    with TempPostgres(fast=False) as pg:
        conn = await asyncpg.connect(pg.dsn())
        try:
            t = time.monotonic()
            await conn.execute(SEED.replace("$1::int8", str(int(rows))))
            await conn.execute("VACUUM ANALYZE public.users")
            print(f"seeded {rows:,} rows in {time.monotonic() - t:.1f} s")
        finally:
            await conn.close()
        params = ConnectParams(dsn=SecretStr(pg.dsn()))
        await commands.init(params)
        job = parse_job(
            {
                "name": "eta",
                "table": "users",
                "key": "id",
                "where": "display_name IS NULL",
                "set": "display_name = first_name || ' ' || last_name",
                "batch": {"size": size, "max_size": max(size, 100_000)},
            }
        )
        sampler = Sampler(Tracker(window=window, min_batches=least))
        print(f"ETA window: {window:g} s, at least {least} batches")
        halfway = Halfway(middle=rows // 2, first=sleep, second=slow)
        ckpt = await commands.run(job, params, observers=[sampler], throttles=[halfway])
        end = time.monotonic()
        change = next(t for t, done, _, _ in sampler.points if done >= 0.5)
        print(f"updated {ckpt.rows_updated:,} rows in {ckpt.batches:,} batches")
        report(sampler, end, change)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--sleep", type=float, default=0.02)
    parser.add_argument("--slow", type=float, default=0.08)
    parser.add_argument("--window", type=float, default=Tracker.window)
    parser.add_argument("--least", type=int, default=Tracker.min_batches)
    a = parser.parse_args()
    anyio.run(main, a.rows, a.size, a.sleep, a.slow, a.window, a.least, backend="asyncio")

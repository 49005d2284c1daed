"""The runner under test, and the checks every fault test ends with.

* ``Recorder``: an ``Observer`` that keeps what the loop reported and lets a test wait for it.
* ``Hook``: a ``Throttle`` that calls the test after each committed batch (never pauses), so a
  test can inject a fault at an exact point between batches.
* ``Cli``: the real ``backfill`` command as a process, output in files (no pipe can fill up).
* ``exactly_once``: the per-row ``touched`` counter proves every row in range was updated
  exactly once and none outside it.
"""

from __future__ import annotations

import json
import signal
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import asyncpg
from anyio.abc import Process

from backfill.checkpoint import BatchResult, Checkpoint, Key
from backfill.errors import BatchFailure
from backfill.protocols import Pause
from tests.conftest import REPO


@dataclass
class Recorder:
    """Records every event of a run; ``wait_until`` blocks until a condition on them holds."""

    commits: list[BatchResult] = field(default_factory=list)
    failures: list[tuple[str, Key | None, int]] = field(default_factory=list)
    skips: list[Key] = field(default_factory=list)
    pauses: list[Pause] = field(default_factory=list)
    states: list[str] = field(default_factory=list)
    starts: list[Checkpoint] = field(default_factory=list)
    _changed: anyio.Event = field(default_factory=anyio.Event)

    def _poke(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_until(self, condition: Callable[[], bool], *, within: float) -> None:
        with anyio.fail_after(within):
            while not condition():
                await self._changed.wait()

    def reasons(self) -> list[str]:
        return [reason for reason, _, _ in self.failures]

    # --- Observer --------------------------------------------------------------------------

    def started(self, checkpoint: Checkpoint) -> None:
        self.starts.append(checkpoint)
        self._poke()

    def committed(self, result: BatchResult) -> None:
        self.commits.append(result)
        self._poke()

    def failed(self, failure: BatchFailure, *, cursor: Key | None, size: int) -> None:
        self.failures.append((failure.reason, cursor, size))
        self._poke()

    def skipped(self, key: Key) -> None:
        self.skips.append(key)
        self._poke()

    def throttled(self, pause: Pause) -> None:
        self.pauses.append(pause)
        self._poke()

    def state(self, state: str) -> None:
        self.states.append(state)
        self._poke()


@dataclass
class Hook:
    """A throttle that never pauses but awaits ``on_commit(result)`` after each batch."""

    on_commit: Callable[[BatchResult], Awaitable[None]]

    async def next_pause(self, last: BatchResult | None) -> Pause | None:
        if last is not None:
            await self.on_commit(last)
        return None


class Cli:
    """``python -m backfill ARGS`` as a real process; stdout and stderr go to files.

    No metrics endpoint unless the environment asks for one: runs in parallel (here and in
    other test sessions on the machine) must not fight over the default port.
    """

    def __init__(self, directory: Path, *args: str | Path, env: dict[str, str]) -> None:
        self.args = [str(a) for a in args]
        self.env = {"BACKFILL_METRICS_PORT": "0", **env}
        n = len(list(directory.glob("cli-*.out")))
        self.out_path = directory / f"cli-{n}.out"
        self.err_path = directory / f"cli-{n}.err"
        self.proc: Process | None = None

    async def start(self) -> Cli:
        with self.out_path.open("w") as out, self.err_path.open("w") as err:
            self.proc = await anyio.open_process(
                [sys.executable, "-m", "backfill", *self.args],
                stdin=None, stdout=out, stderr=err, env=self.env, cwd=REPO,
            )
        return self

    async def wait(self, *, within: float) -> int:
        assert self.proc is not None
        with anyio.fail_after(within):
            return await self.proc.wait()

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()

    async def aclose(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    @property
    def output(self) -> str:
        """Everything it printed."""
        return self.stdout + self.stderr

    @property
    def code(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def errors(self) -> list[str]:
        """The ``backfill: error: ...`` lines on stderr."""
        return [line for line in self.stderr.splitlines() if line.startswith("backfill: error:")]

    def log(self) -> list[dict[str, Any]]:
        """The JSON log lines on stderr."""
        out = []
        for line in self.stderr.splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out


async def cli(
    directory: Path, *args: str | Path, env: dict[str, str], within: float = 60
) -> Cli:
    """Run the CLI to completion."""
    proc = await Cli(directory, *args, env=env).start()
    try:
        await proc.wait(within=within)
    finally:
        await proc.aclose()
    return proc


@dataclass(frozen=True)
class Tally:
    """Rows in range updated once, never, twice or more; rows outside it ever touched."""

    once: int
    missed: int
    twice: int
    outside: int

    @property
    def exact(self) -> bool:
        return self.missed == 0 and self.twice == 0 and self.outside == 0


TALLY = """
SELECT count(*) FILTER (WHERE id BETWEEN $1 AND $2 AND touched = 1) AS once,
       count(*) FILTER (WHERE id BETWEEN $1 AND $2 AND touched = 0) AS missed,
       count(*) FILTER (WHERE id BETWEEN $1 AND $2 AND touched > 1) AS twice,
       count(*) FILTER (WHERE id NOT BETWEEN $1 AND $2 AND touched <> 0) AS outside
FROM users WHERE NOT (id = ANY($3::bigint[]))
"""


async def tally(
    conn: asyncpg.Connection, lo: int, hi: int, *, excluding: tuple[int, ...] = ()
) -> Tally:
    row = await conn.fetchrow(TALLY, lo, hi, list(excluding))
    return Tally(row["once"], row["missed"], row["twice"], row["outside"])


FIGURES: Counter[str] = Counter()  # what the suite survived; see conftest.py


async def exactly_once(
    conn: asyncpg.Connection, lo: int, hi: int, *, excluding: tuple[int, ...] = ()
) -> Tally:
    """Assert that every row in ``lo..hi`` (but ``excluding``) was updated exactly once and no
    row outside it ever was; count the rows checked, lost and doubled for the figures."""
    result = await tally(conn, lo, hi, excluding=excluding)
    FIGURES["rows_checked"] += result.once + result.missed + result.twice
    FIGURES["rows_lost"] += result.missed
    FIGURES["rows_twice"] += result.twice
    FIGURES["rows_outside_touched"] += result.outside
    assert result.exact, result
    return result


async def checkpoint_is_exact(conn: asyncpg.Connection, job: str) -> dict[str, Any]:
    """The checkpoint describes exactly what committed: every row up to the cursor updated
    once, none after it, and ``rows_updated`` equal to the rows really updated."""
    ckpt = await conn.fetchrow("SELECT * FROM backfill.checkpoints WHERE job = $1", job)
    assert ckpt is not None
    cursor = int(ckpt["cursor"][0]) if ckpt["cursor"] is not None else int(ckpt["range_lo"][0]) - 1
    lo, hi = int(ckpt["range_lo"][0]), int(ckpt["range_hi"][0])
    keys = ckpt["skipped_keys"]
    skipped = tuple(int(k[0]) for k in (json.loads(keys) if isinstance(keys, str) else keys))
    done = await tally(conn, lo, cursor, excluding=skipped)
    rest = await tally(conn, cursor + 1, hi)
    assert (done.missed, done.twice) == (0, 0), f"rows up to the cursor {cursor}: {done}"
    assert (rest.once, rest.twice) == (0, 0), f"rows after the cursor {cursor}: {rest}"
    assert ckpt["rows_updated"] == done.once, (ckpt["rows_updated"], done)
    return dict(ckpt)

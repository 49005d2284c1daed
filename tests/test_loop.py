"""The run loop driven through in-memory fakes of its seams: no database, no sleeps."""

from __future__ import annotations

import bisect
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

import anyio
import pytest

from backfill.checkpoint import BatchResult, Checkpoint, Key
from backfill.errors import (
    BatchFailure,
    ConfigError,
    ConnectionLost,
    Contention,
    DataFailure,
    Interrupted,
    RowError,
    StatementTimeout,
    Unavailable,
)
from backfill.loop import Loop, Policy
from backfill.protocols import Decision, Pause, Reason
from backfill.shutdown import Stop
from backfill.sizing import AdaptiveSizer
from backfill.throttling.pacing import Backoff

pytestmark = pytest.mark.anyio


@dataclass(slots=True)
class FixedSleep:
    """Pause ``seconds`` after every committed batch."""

    seconds: float

    async def decide(self, last: BatchResult | None) -> Decision:
        if last is None or self.seconds <= 0:
            return Decision(None)
        return Decision(Pause(self.seconds, Reason.SLEEP))

    def runway(self) -> float:
        return 0.0


@dataclass
class World:
    """A table of integer keys with an update counter, and a saved checkpoint."""

    keys: list[int]
    touched: dict[int, int] = field(default_factory=dict)
    cursor: int | None = None
    rows: int = 0
    batches: int = 0
    state: str = "running"
    skipped: list[int] = field(default_factory=list)
    poison: set[int] = field(default_factory=set)
    # Called before each batch with (cursor, size); may raise a BatchFailure.
    fault: Callable[[int | None, int], None] = lambda cursor, size: None
    sizes: list[int] = field(default_factory=list)
    opens: int = 0

    def checkpoint(self) -> Checkpoint:
        lo = (str(self.keys[0]),) if self.keys else None
        hi = (str(self.keys[-1]),) if self.keys else None
        cursor = (str(self.cursor),) if self.cursor is not None else None
        return Checkpoint(
            job="j",
            shard=0,
            shards=1,
            fingerprint="f",
            state=self.state,
            range_lo=lo,
            range_hi=hi,
            cursor=cursor,
            rows_updated=self.rows,
            batches=self.batches,
        )


class FakeSession:
    def __init__(self, world: World) -> None:
        self.world = world

    @property
    def checkpoint(self) -> Checkpoint:
        return self.world.checkpoint()

    def _slice(self, cursor: Key | None, size: int) -> list[int]:
        keys = self.world.keys
        start = 0 if cursor is None else bisect.bisect_right(keys, int(cursor[0]))
        return keys[start : start + size]

    async def run_batches(
        self, cursor: Key | None, size: int, *, within: float = 0.0
    ) -> list[BatchResult]:
        return [await self.run_batch(cursor, size)]

    async def run_batch(self, cursor: Key | None, size: int) -> BatchResult:
        w = self.world
        w.sizes.append(size)
        w.fault(int(cursor[0]) if cursor else None, size)
        chunk = self._slice(cursor, size)
        if not chunk:
            return BatchResult(cursor=None, rows=0, size=size, seconds=0.001)
        if w.poison & set(chunk):
            raise DataFailure("division by zero")
        for k in chunk:  # "commit": rows and checkpoint together
            w.touched[k] = w.touched.get(k, 0) + 1
        w.cursor, w.rows, w.batches = chunk[-1], w.rows + len(chunk), w.batches + 1
        return BatchResult(cursor=(str(chunk[-1]),), rows=len(chunk), size=size, seconds=0.001)

    async def next_key(self, cursor: Key | None) -> Key | None:
        chunk = self._slice(cursor, 1)
        return (str(chunk[0]),) if chunk else None

    async def skip(self, key: Key) -> None:
        self.world.skipped.append(int(key[0]))
        self.world.cursor = int(key[0])

    async def finish(self, state: str, *, error: str | None = None) -> None:
        self.world.state = state


@dataclass
class FakeConnector:
    world: World
    refuse: int = 0  # refuse this many connection attempts

    @asynccontextmanager
    async def session(self) -> AsyncIterator[FakeSession]:
        self.world.opens += 1
        if self.refuse > 0:
            self.refuse -= 1
            raise ConnectionLost("refused")
        yield FakeSession(self.world)


@dataclass
class Recorder:
    events: list[tuple[str, object]] = field(default_factory=list)

    def started(self, checkpoint: Checkpoint) -> None:
        self.events.append(("started", checkpoint.cursor))

    def committed(self, result: BatchResult) -> None:
        self.events.append(("committed", result.rows))

    def failed(self, failure: BatchFailure, *, cursor: Key | None, size: int) -> None:
        self.events.append(("failed", failure.reason))

    def skipped(self, key: Key) -> None:
        self.events.append(("skipped", key))

    def throttled(self, pause: Pause) -> None:
        self.events.append(("throttled", pause.reason))

    def state(self, state: str) -> None:
        self.events.append(("state", state))


def make_loop(
    world: World,
    *,
    size: int = 10,
    min_size: int = 1,
    retries: int = 5,
    skip: bool = False,
    refuse: int = 0,
    stop: Stop | None = None,
    sleep: float = 0.0,
    recorder: Recorder | None = None,
) -> Loop:
    policy = Policy(
        job="j",
        max_retries=retries,
        connect_retry_seconds=5.0,
        skip_bad_rows=skip,
    )
    return Loop(
        policy,
        FakeConnector(world, refuse=refuse),
        sizer=AdaptiveSizer(size, min_size, 1000),
        throttle=FixedSleep(sleep),
        observer=recorder or Recorder(),
        stop=stop or Stop(),
        backoff=Backoff(base=0.0001, cap=0.001),
    )


async def test_runs_every_key_once() -> None:
    world = World(keys=list(range(1, 96)))
    ckpt = await make_loop(world).run()
    assert ckpt.state == "succeeded"
    assert world.touched == {k: 1 for k in range(1, 96)}
    assert world.batches == 10


async def test_empty_range_succeeds_at_once() -> None:
    world = World(keys=[])
    assert (await make_loop(world).run()).state == "succeeded"
    assert world.sizes == []


async def test_statement_timeout_shrinks_then_grows_back() -> None:
    def fault(cursor: int | None, size: int) -> None:
        if cursor == 40 and size > 2:
            raise StatementTimeout("canceling statement due to statement timeout")

    world = World(keys=list(range(1, 201)), fault=fault)
    await make_loop(world, size=8).run()
    assert world.touched == {k: 1 for k in range(1, 201)}
    assert world.sizes[world.sizes.index(4) :][:3] == [4, 2, 3]  # halved twice, then grows
    assert max(world.sizes[-5:]) == 8


async def test_contention_retries_the_same_slice() -> None:
    failures = iter([True, True, False])

    def fault(cursor: int | None, size: int) -> None:
        if cursor == 20 and next(failures, False):
            raise Contention("lock timeout", reason="lock_timeout")

    world = World(keys=list(range(1, 51)), fault=fault)
    recorder = Recorder()
    await make_loop(world, recorder=recorder).run()
    assert world.touched == {k: 1 for k in range(1, 51)}
    assert ("failed", "lock_timeout") in recorder.events
    assert ("throttled", "backoff") in recorder.events


async def test_retries_are_bounded() -> None:
    def fault(cursor: int | None, size: int) -> None:
        raise Contention("deadlock detected", reason="deadlock")

    world = World(keys=list(range(1, 51)), fault=fault)
    with pytest.raises(Unavailable, match="3 consecutive failed attempts"):
        await make_loop(world, retries=2).run()
    assert world.state == "failed"


async def test_reconnects_after_connection_loss() -> None:
    lost = iter([True])

    def fault(cursor: int | None, size: int) -> None:
        if cursor == 30 and next(lost, False):
            raise ConnectionLost("terminating connection due to administrator command")

    world = World(keys=list(range(1, 101)), fault=fault)
    await make_loop(world).run()
    assert world.touched == {k: 1 for k in range(1, 101)}
    assert world.opens == 2


async def test_unreachable_database_at_start_is_retried() -> None:
    world = World(keys=list(range(1, 11)))
    await make_loop(world, refuse=3).run()
    assert world.opens == 4 and world.state == "succeeded"


async def test_poison_row_is_bisected_and_named() -> None:
    world = World(keys=list(range(1, 101)), poison={37})
    with pytest.raises(RowError, match="key 37") as info:
        await make_loop(world, size=16).run()
    assert info.value.keys == ("37",)
    # Every row before the poison one committed; none after it.
    assert world.touched == {k: 1 for k in range(1, 37)}
    assert world.state == "failed"


async def test_poison_row_skipped_when_configured() -> None:
    world = World(keys=list(range(1, 101)), poison={37, 80})
    recorder = Recorder()
    await make_loop(world, size=16, skip=True, recorder=recorder).run()
    assert world.skipped == [37, 80]
    assert world.touched == {k: 1 for k in range(1, 101) if k not in (37, 80)}
    assert ("skipped", ("37",)) in recorder.events


async def test_stop_request_ends_after_the_batch_in_flight() -> None:
    stop = Stop()

    def fault(cursor: int | None, size: int) -> None:
        if cursor == 50:
            stop.request("SIGTERM")

    world = World(keys=list(range(1, 101)), fault=fault)
    with pytest.raises(Interrupted):
        await make_loop(world, stop=stop).run()
    assert world.cursor == 60 and world.state == "interrupted"
    assert world.touched == {k: 1 for k in range(1, 61)}


async def test_stop_cuts_a_sleep_short() -> None:
    stop = Stop()

    class SignalWhileThrottled(Recorder):
        def state(self, state: str) -> None:
            super().state(state)
            if state == "throttled":
                stop.request("SIGTERM")

    world = World(keys=list(range(1, 101)))
    loop = make_loop(world, stop=stop, sleep=3600, recorder=SignalWhileThrottled())
    with anyio.fail_after(5), pytest.raises(Interrupted):
        await loop.run()
    assert world.batches == 1 and world.state == "interrupted"


async def test_config_error_stops_at_once() -> None:
    def fault(cursor: int | None, size: int) -> None:
        raise ConfigError("permission denied for table users")

    world = World(keys=list(range(1, 11)), fault=fault)
    with pytest.raises(ConfigError):
        await make_loop(world).run()
    assert world.sizes == [10] and world.state == "failed"


async def test_resumes_from_saved_cursor() -> None:
    world = World(keys=list(range(1, 51)), cursor=30, rows=30, batches=3)
    world.touched = {k: 1 for k in range(1, 31)}
    await make_loop(world).run()
    assert world.touched == {k: 1 for k in range(1, 51)}
    assert replace(world.checkpoint()).rows_updated == 50

"""Sizing, rate-limit and governor decisions with fakes: no database, no sleeps, a fake clock."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from backfill.checkpoint import BatchResult
from backfill.control import Knobs, LiveControl, merge, parse_assignments, resolve
from backfill.errors import ConfigError
from backfill.job import parse_job
from backfill.live import LIVE_KEYS
from backfill.protocols import Pause
from backfill.sizing import AdaptiveSizer
from backfill.throttling.evidence import OVER, Evidence
from backfill.throttling.gates import CheckError, Gates
from backfill.throttling.governor import Governor
from backfill.throttling.impact import TYPICAL, Judgment
from backfill.throttling.pacing import RateLimit


def job(**overrides: Any):  # type: ignore[no-untyped-def]
    fields: dict[str, Any] = {
        "name": "j", "table": "t", "key": "id", "set": "x = 1", "where": "x IS NULL",
        **overrides,
    }
    return parse_job(fields)


# --- adaptive sizing ----------------------------------------------------------------------------


def drive(
    sizer: AdaptiveSizer, seconds_per_key: float, batches: int, overhead: float = 0.002
) -> list[tuple[int, float]]:
    out = []
    for _ in range(batches):
        seconds = overhead + sizer.size * seconds_per_key
        out.append((sizer.size, seconds))
        sizer.succeeded(seconds)
    return out


@dataclass(frozen=True)
class Sizing:
    size: int
    max_size: int
    target_seconds: float | None


def test_adaptive_sizer_converges_on_the_target() -> None:
    sizer = AdaptiveSizer(100, 10, 100_000, target_seconds=0.1)
    runs = drive(sizer, 1e-5, 30)  # 100k keys/s: ~10k keys take 0.1 s
    assert all(b <= a * 1.5 + 1 for (a, _), (b, _) in itertools.pairwise(runs))
    assert runs[-1][1] == pytest.approx(0.1, rel=0.05)


def test_adaptive_sizer_shrinks_at_once_after_a_slow_batch() -> None:
    sizer = AdaptiveSizer(100, 10, 100_000, target_seconds=0.1)
    drive(sizer, 1e-5, 30)
    runs = drive(sizer, 2e-4, 3)  # rows get 20x more expensive
    assert runs[0][1] > 1.0  # the first expensive batch is slow ...
    assert runs[1][1] == pytest.approx(0.1, rel=0.1)  # ... the next one is on target already


def test_adaptive_sizer_stays_within_bounds() -> None:
    sizer = AdaptiveSizer(100, 50, 2000, target_seconds=0.1)
    assert max(size for size, _ in drive(sizer, 1e-7, 30)) == 2000
    assert min(size for size, _ in drive(sizer, 1e-1, 5)) == 50


def test_adaptive_sizer_halves_and_forgets_on_timeout() -> None:
    sizer = AdaptiveSizer(1000, 1, 100_000, target_seconds=0.1)
    drive(sizer, 1e-5, 20)
    before = sizer.size
    sizer.timed_out()
    assert sizer.size == before // 2 and sizer.rate is None


def test_without_target_the_size_stays_fixed() -> None:
    sizer = AdaptiveSizer(700, 1, 100_000)
    assert {size for size, _ in drive(sizer, 1e-3, 10)} == {700}


def test_tune_switches_modes_live() -> None:
    sizer = AdaptiveSizer(700, 1, 100_000)
    sizer.tune(Sizing(700, 100_000, 0.1))
    drive(sizer, 1e-5, 30)
    assert sizer.size > 5000
    sizer.tune(Sizing(700, 3000, 0.1))
    assert sizer.size == 3000
    sizer.tune(Sizing(500, 3000, None))
    assert {size for size, _ in drive(sizer, 1e-5, 5)} == {500}


# --- rate limit ---------------------------------------------------------------------------------


def test_rate_limit_allows_at_most_one_batch_above_the_ceiling() -> None:
    limit, now, starts = RateLimit(), 0.0, []
    for _ in range(50):
        starts.append(now)
        now += 0.01  # each batch of 500 rows takes 10 ms
        limit.spend(500, started=now - 0.01, rate=5000)
        now += limit.wait(now, 5000)
    # Rows started in any window exceed rate x window by at most one batch.
    for i in range(len(starts)):
        for j in range(i + 1, len(starts)):
            assert 500 * (j - i) <= 5000 * (starts[j] - starts[i]) + 500 + 1e-6
    assert 500 * 49 / (starts[-1] - starts[0]) == pytest.approx(5000, rel=1e-6)


def test_rate_limit_gives_no_credit_for_idle_time_or_slow_batches() -> None:
    limit = RateLimit()
    limit.spend(500, started=0.0, rate=5000)
    assert limit.wait(0.05, 5000) == pytest.approx(0.05)
    limit.spend(500, started=10.0, rate=5000)  # long idle: no burst afterwards
    assert limit.wait(10.01, 5000) == pytest.approx(0.09)
    limit.spend(500, started=20.0, rate=5000)
    assert limit.wait(20.5, 5000) == 0.0  # a slow batch waits for nothing


def test_rate_limit_follows_a_live_change() -> None:
    limit = RateLimit()
    limit.spend(1000, started=0.0, rate=1000)
    assert limit.wait(0.0, 10_000) == pytest.approx(0.1)
    assert limit.wait(0.0, None) == 0.0


# --- live control -------------------------------------------------------------------------------


def test_parse_and_merge_validate_every_value() -> None:
    changes = parse_assignments(["batch.size=500", "throttle.max_replication_lag=2s",
                                 "limits.max_rows_per_second=off"])
    merged = merge({}, {"paused": True}, changes)
    assert merged == {"paused": True, "batch.size": 500, "throttle.max_replication_lag": 2.0,
                      "limits.max_rows_per_second": None}
    assert merge({}, merged, parse_assignments(["batch.size=default"])) == {
        "paused": True, "throttle.max_replication_lag": 2.0, "limits.max_rows_per_second": None,
    }
    # The tail guard is live-settable and validated like max_impact.
    budgets = parse_assignments(["throttle.max_impact=20%", "throttle.max_tail_impact=50%"])
    assert merge({}, {}, budgets) == {"throttle.max_impact": 0.2, "throttle.max_tail_impact": 0.5}
    with pytest.raises(ConfigError, match=r"throttle\.max_tail_impact"):
        parse_assignments(["throttle.max_tail_impact=2000%"])
    knobs, problems = resolve(Knobs.from_job(job()), {"throttle.max_tail_impact": "50%"})
    assert not problems and knobs.throttle.impact_limits() == (None, 1.5)


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["batch.sise=5"], "batch.sise: not a live setting"),
        (["batch.size"], "expected key=value"),
        (["batch.size=0"], "batch.size: Input should be greater than or equal to 1"),
        (["batch.size=lots"], "batch.size: Input should be a valid integer"),
        (["batch.size=off"], "cannot be switched off"),
        (["throttle.health_query=SELECT true"], "not a live setting"),
        (["throttle.on_check_error=maybe"], "throttle.on_check_error: Input should be"),
        (["batch.size=200000"], "need min_size <= size <= max_size"),
        ([], "nothing to set"),
    ],
)
def test_bad_assignments_are_refused(items: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        merge({}, {}, parse_assignments(items))


def test_the_job_file_values_bound_live_ones() -> None:
    settings = {"batch.size": 100, "batch.min_size": 50, "batch.max_size": 200}
    with pytest.raises(ConfigError, match="need min_size <= size <= max_size"):
        merge(settings, {}, parse_assignments(["batch.size=500"]))
    assert merge(settings, {}, parse_assignments(["batch.size=500", "batch.max_size=500"]))


def test_invalid_control_from_the_table_is_ignored() -> None:
    knobs, problems = resolve(Knobs.from_job(job()), {"batch.size": -1, "bogus": 1,
                                                      "batch.sleep_seconds": 0.5})
    assert knobs.batch.size == 1000 and knobs.batch.sleep_seconds == 0.0  # its section stays
    assert len(problems) == 2
    assert len(LIVE_KEYS) == len(set(LIVE_KEYS))


# --- the governor -------------------------------------------------------------------------------


@dataclass
class FakeProbe:
    overrides: dict[str, Any] = field(default_factory=dict)
    lag: float = 0.0
    healthy_value: bool | Exception = True
    calls: list[str] = field(default_factory=list)
    states: list[str] = field(default_factory=list)

    async def control(self) -> Mapping[str, Any]:
        self.calls.append("control")
        return dict(self.overrides)

    async def set_state(self, state: str) -> None:
        self.states.append(state)

    async def replication_lag(self) -> float:
        self.calls.append("lag")
        return self.lag

    async def slot_lag_bytes(self) -> int:
        return 0

    async def active_sessions(self) -> int:
        return 0

    async def healthy(self) -> bool:
        self.calls.append("health")
        if isinstance(self.healthy_value, Exception):
            raise self.healthy_value
        return self.healthy_value


@dataclass
class Clock:
    now: float = 100.0

    def __call__(self) -> float:
        return self.now


def governor(probe: FakeProbe, clock: Clock, **fields: Any) -> Governor:
    j = job(**fields)
    live = LiveControl(Knobs.from_job(j), job="j", clock=clock)
    return Governor(live, probe=probe, gates=Gates(probe, "j"), clock=clock)


def batch(
    seconds: float = 0.1, rows: int = 100, control: Mapping[str, Any] | None = None
) -> BatchResult:
    return BatchResult(cursor=("1",), rows=rows, size=rows, seconds=seconds, control=control or {})


async def wait_out(gov: Governor, clock: Clock, last: BatchResult | None) -> list[Pause]:
    """Ask the governor like the loop does, serving each pause on the fake clock."""
    pauses = []
    if last is not None:
        gov.live.apply(last.control)
    pause = (await gov.decide(last)).pause
    while pause is not None and len(pauses) < 1000:
        pauses.append(pause)
        clock.now += pause.seconds
        pause = (await gov.decide(None)).pause
    return pauses


@pytest.mark.anyio
async def test_sleep_ratio_and_sleep_seconds_take_the_longer() -> None:
    clock, probe = Clock(), FakeProbe()
    gov = governor(probe, clock, batch={"sleep_ratio": 2.0, "sleep_seconds": 0.1})
    assert [(p.reason, p.seconds) for p in await wait_out(gov, clock, batch(0.2))] == [
        ("sleep", pytest.approx(0.4))
    ]
    assert [(p.reason, p.seconds) for p in await wait_out(gov, clock, batch(0.01))] == [
        ("sleep", pytest.approx(0.1))
    ]
    assert probe.calls == []  # no gates, no pause: the probe is never used


@pytest.mark.anyio
async def test_long_waits_come_in_check_every_slices_and_poll_control() -> None:
    clock, probe = Clock(), FakeProbe()
    gov = governor(probe, clock, batch={"sleep_seconds": 5}, throttle={"check_every": 1})
    gov.live.apply({})
    probe.overrides = {"batch.sleep_seconds": 2.5}  # an operator shortens the sleep meanwhile
    pauses = await wait_out(gov, clock, batch())
    assert [p.seconds for p in pauses] == [pytest.approx(1.0)] * 2 + [pytest.approx(0.5)]
    assert probe.calls == ["control", "control"]


@pytest.mark.anyio
async def test_pause_holds_until_resumed_and_shows_its_state() -> None:
    clock, probe = Clock(), FakeProbe({"paused": True})
    gov = governor(probe, clock, batch={"sleep_seconds": 0.2}, throttle={"check_every": 0.5})
    gov.live.apply({"paused": True})
    pause = (await gov.decide(batch(control={"paused": True}))).pause
    assert pause == Pause(0.5, "paused")
    for _ in range(3):
        clock.now += 0.5
        assert (await gov.decide(None)).pause == Pause(0.5, "paused")
    probe.overrides = {}
    clock.now += 0.5
    assert (await gov.decide(None)).pause is None
    assert probe.states == ["paused", "running"]
    assert probe.calls == ["control"] * 4


@pytest.mark.anyio
async def test_gate_checks_at_most_every_check_every_and_holds_with_its_reason() -> None:
    clock, probe = Clock(), FakeProbe(lag=5.0)
    gov = governor(probe, clock, throttle={"check_every": 1, "max_replication_lag": 2})
    pauses = []
    for _ in range(4):
        pause = (await gov.decide(None)).pause
        assert pause is not None
        pauses.append(pause.reason)
        clock.now += pause.seconds
    assert pauses == ["replication_lag"] * 4 and probe.calls.count("lag") == 4
    probe.lag = 0.5
    assert (await gov.decide(None)).pause is None
    calls = len(probe.calls)
    for _ in range(5):  # batches in quick succession: no check until check_every passed
        clock.now += 0.1
        assert (await gov.decide(batch())).pause is None
    assert probe.calls[calls:] == []
    assert probe.states == ["throttled", "running"]


@pytest.mark.anyio
@pytest.mark.parametrize(("policy", "held"), [("pause", True), ("ignore", False)])
async def test_a_failing_check_pauses_or_is_ignored(policy: str, held: bool) -> None:
    clock, probe = Clock(), FakeProbe(healthy_value=CheckError("statement timeout"))
    gov = governor(probe, clock, throttle={"health_query": "SELECT true", "on_check_error": policy})
    pause = (await gov.decide(None)).pause
    assert (pause is not None and pause.reason == "health_query") is held


@pytest.mark.anyio
async def test_the_applications_latency_cuts_the_budgets_rate_once_per_reading(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the impact budget on, a reading over ``max`` cuts its rate (none holds the run);
    the next waits for the next reading, ``every`` seconds later, and a little over cuts only
    twice in a row (the Prometheus side is tests/test_app_latency.py)."""
    readings = iter([0.2, 0.06, 0.06])

    async def app_latency(config: Any, budget: float) -> float:
        return next(readings)

    monkeypatch.setattr("backfill.throttling.prometheus.app_latency", app_latency)
    clock, probe = Clock(), FakeProbe()
    app = {"prometheus": "http://prometheus:9090", "query": "q", "max": "50ms", "every": "30s"}
    gov = governor(probe, clock, throttle={"max_impact": "20%", "app_latency": app})
    assert gov.gates is not None
    gov.gates.clock = clock
    gov.impact.others, gov.impact.rate = True, 10_000.0
    gov.impact.worked(clock.now - 60.0, 1.0, 100)  # its first batch, long before the readings
    for _ in range(3):  # one reading (4x its max: the deepest cut), acted on once
        pause = (await gov.decide(None)).pause
        assert pause is None or pause.reason != "app_latency"
        clock.now += 1.0
    assert gov.impact.rate == 5_000.0
    clock.now += 30.0
    await gov.decide(None)  # 1.2x its max once: maybe the application's noise, no cut ...
    assert gov.impact.rate == 5_000.0
    clock.now += 30.0
    await gov.decide(None)  # ... twice in a row: cut by 1 / 1.2
    assert gov.impact.rate == pytest.approx(5_000.0 / 1.2)


@pytest.mark.anyio
async def test_rate_limit_through_the_governor() -> None:
    clock, probe = Clock(), FakeProbe()
    gov = governor(probe, clock, limits={"max_rows_per_second": 1000})
    pauses = await wait_out(gov, clock, batch(seconds=0.1, rows=500))
    assert [p.reason for p in pauses] == ["rate_limit"]
    assert sum(p.seconds for p in pauses) == pytest.approx(0.4)


@pytest.mark.anyio
async def test_the_impact_budget_below_full_speed_is_throttled_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock, probe = Clock(), FakeProbe()
    gov = governor(probe, clock, throttle={"max_impact": "20%"})
    budget = gov.impact
    # A load is there, and the budget has cut the rate far below the runner's speed.
    budget.others, budget.rate, budget.speed = True, 2000.0, 50_000.0
    budget._next_window = math.inf  # no idle window in this test
    budget.verdict = Judgment(TYPICAL, "statements", Evidence(
        ratio=1.5, low=1.4, high=1.6, limit=1.2, verdict=OVER, current=0.0021, baseline=0.0014),
        budget=1.2)
    with caplog.at_level(logging.INFO, logger="backfill.throttling.governor"):
        for _ in range(5):  # batch after batch, each paced: one line, one state change
            pauses = await wait_out(gov, clock, batch(0.005, rows=100))
            assert pauses and {p.reason for p in pauses} == {"impact"}
        budget.others = False  # the load has gone: full speed again
        await wait_out(gov, clock, batch(0.005, rows=100))
    assert probe.states == ["throttled", "running"]
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "impact budget 20%: 2,000 rows/s, typical 1.50 > 1.20 (statements)",
        "holding: impact budget 20%: 2,000 rows/s, typical 1.50 > 1.20 (statements)",
        "impact budget: full speed, nobody else at work",
        "resumed",
    ]

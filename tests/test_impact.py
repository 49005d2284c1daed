"""The impact budget's controller alone, on a simulated database: no I/O, a simulated clock.

The model is a queue: the application's latency is ``service / (1 - utilization)``, where the
utilization is the application's own plus the runner's rate over the last 0.3 s as a share of
``heavy`` (the server share the runner takes at ``speed`` rows a second), with log-normal
noise. The canary (a closed loop, as the real one) sees the application's latency; so do the
simulated ``pg_stat_statements`` snapshots, with less noise (thousands of calls). The simulated
runner does what the governor does: an idle window when the budget asks, else a batch paced
at the allowed rate through a token bucket.
"""

from __future__ import annotations

import copy
import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pytest

from backfill.throttling import evidence, impact
from backfill.throttling.impact import Controller
from backfill.throttling.pacing import PACE, RateLimit
from backfill.throttling.statements import StatementIndex

SPEED = 100_000.0  # rows a second the simulated runner writes at full speed
ACTIVITY_EVERY = 0.1  # as backfill.throttling.canary looks


@dataclass
class World:
    """The simulated database and runner; ``load(t)`` is the application's utilization."""

    budget: Controller
    load: object = lambda t: 0.5
    heavy: float = 0.45  # the server share the runner takes at full speed
    service: float = 0.001
    noise: float = 0.25
    seed: int = 1
    statements: bool = False  # feed pg_stat_statements snapshots too
    stalls: tuple[tuple[float, float], ...] = ()  # (start, seconds): the whole server stalls
    slow: tuple[float, float, float] = (0.0, 0.0, 1.0)  # (start, seconds, factor): a slow spell
    now: float = 0.0
    rows: int = 0
    done: deque[tuple[float, int]] = field(default_factory=deque)  # (end, rows) of batches
    trace: list[tuple[float, float | None, int]] = field(default_factory=list)  # (t, rate, rows)
    truth: list[tuple[float, float]] = field(default_factory=list)  # (t, true impact), 10 ms
    _calls: float = 0.0
    _ms: float = 0.0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._next = {"beat": 0.0, "look": 0.0, "truth": 0.0, "snap": 0.0}

    def foreground(self, t: float) -> float:
        return float(self.load(t))  # type: ignore[operator]

    def pace(self, t: float) -> float:
        window = 0.3
        return sum(r for end, r in self.done if end > t - window) / window / SPEED

    def latency(self, t: float, *, noisy: bool = True, noise: float | None = None) -> float:
        u = min(0.95, self.foreground(t) + self.heavy * self.pace(t))
        value = self.service / (1 - u)
        if any(s <= t < s + d for s, d in self.stalls):
            value += 0.15
        start, seconds, factor = self.slow
        if start <= t < start + seconds:
            value *= factor
        sd = self.noise if noise is None else noise
        return value * (math.exp(self.rng.gauss(0, sd)) if noisy else 1.0)

    def ratio(self, t: float) -> float:
        """The true impact now: latency over what it would be with the runner idle."""
        return self.latency(t, noisy=False) / (self.service / (1 - self.foreground(t)))

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while (nxt := min(self._next.values())) <= end:
            self.now = nxt
            kind = min(self._next, key=self._next.__getitem__)
            if kind == "truth":
                self.truth.append((nxt, self.ratio(nxt)))
                self._next[kind] += 0.01
            elif kind == "beat":
                took = self.latency(nxt)
                self.budget.beat(nxt, took)
                self._next[kind] += took + self.budget.beat_every
            elif kind == "snap":
                calls = 0.25 * 2000 * (self.foreground(nxt) > 0)
                self._calls += calls
                self._ms += calls * self.latency(nxt, noise=0.05) * 1000
                if self.statements:
                    self.budget.statements(nxt, {1: (int(self._calls), self._ms)})
                self._next[kind] += 0.25
            else:
                self.budget.activity(nxt, self.foreground(nxt) > 0)
                self._next[kind] += ACTIVITY_EVERY
        self.now = end
        while self.done and self.done[0][0] < self.now - 1:
            self.done.popleft()

    def run(self, until: float) -> None:
        bucket = RateLimit()
        while self.now < until:
            hold = self.budget.hold(self.now)
            if hold is not None:
                self.advance(min(hold, 0.25))
                continue
            rate = self.budget.allowed(self.now)
            if (wait := bucket.wait(self.now, rate)) > 0:
                self.advance(min(wait, 0.1))
                continue
            rows = 1000 if rate is None else max(1, min(1000, int(rate * PACE)))
            start = self.now
            self.advance(rows / SPEED + 0.001)
            self.done.append((self.now, rows))
            self.rows += rows
            self.budget.worked(self.now, self.now - start, rows)
            bucket.spend(rows, started=start, rate=rate)
            self.trace.append((self.now, self.budget.rate, self.rows))

    def rows_per_second(self, t0: float, t1: float) -> float:
        points = [x for x in self.trace if t0 <= x[0] < t1]
        return (points[-1][2] - points[0][2]) / (points[-1][0] - points[0][0]) if points else 0.0

    def mean_ratio(self, t0: float, t1: float) -> float:
        values = [r for t, r in self.truth if t0 <= t < t1]
        return sum(values) / len(values)

    def rates(self, t0: float, t1: float) -> list[float | None]:
        return [r for t, r, _ in self.trace if t0 <= t < t1]


def best_rate(world: World, limit: float, t: float) -> float:
    """The rate at which the model's impact is exactly the limit (a steady state)."""
    u = world.foreground(t)
    return max(0.0, (1 - u - (1 - u) / limit) / world.heavy) * SPEED


@pytest.mark.parametrize("statements", [False, True])
def test_converges_to_the_best_rate_and_reproduces_it(statements: bool) -> None:
    found = []
    for seed in (1, 2, 3):
        world = World(Controller(limit=1.2), seed=seed, statements=statements)
        world.run(60)
        best = best_rate(world, 1.2, 30)
        found.append(world.rows_per_second(30, 60))
        # Near the fastest rate the budget allows, and within the budget (the truth).
        assert 0.6 * best <= found[-1] <= 1.1 * best, (seed, found[-1], best)
        assert world.mean_ratio(30, 60) <= 1.2 * 1.05
    assert max(found) / min(found) <= 1.5, found  # the same load, the same pace (issue 24)


def test_full_speed_when_nobody_else_is_there() -> None:
    world = World(Controller(limit=1.2), load=lambda t: 0.0)
    world.run(5)
    assert world.budget.allowed(world.now) is None
    assert world.rows_per_second(1, 5) > 0.8 * SPEED * 1000 / (1000 + 0.001 * SPEED)


def test_backs_off_at_once_when_a_load_arrives_and_goes_full_speed_when_it_leaves() -> None:
    world = World(Controller(limit=1.2), load=lambda t: 0.5 if 5 <= t < 40 else 0.0)
    world.run(5)
    assert world.budget.rate is None
    world.run(5.3)  # a load arrived at 5: within 0.3 s the runner is held back
    assert world.budget.measuring is not None or world.budget.rate is not None
    world.run(40)
    assert world.mean_ratio(20, 40) <= 1.2 * 1.05
    world.run(42)
    assert world.budget.allowed(world.now) is None


def test_a_stall_of_the_server_does_not_move_the_rate() -> None:
    steady = World(Controller(limit=1.2), seed=4)
    steady.run(39.9)
    stalled = copy.deepcopy(steady)  # the same world and budget, then a 0.3 s stall
    stalled.stalls = ((40.0, 0.3),)
    before = steady.budget.rate
    for world in (steady, stalled):
        world.run(40 + impact.LINGER + 2)
    # The stall lands in a chunk or two: the budget does not take it for its own impact (it
    # may hold the rate a while: its dwell is no longer clearly under).
    assert before is not None and stalled.budget.rate is not None
    assert steady.budget.rate is not None
    assert stalled.budget.rate >= 0.9 * steady.budget.rate


@pytest.mark.parametrize("statements", [False, True])
def test_a_baseline_taken_in_a_slow_spell_is_measured_again(statements: bool) -> None:
    """The first baseline lands in a spell where everything is 1.6x slower: the runner then
    reads as making the application faster, which it cannot; the budget measures again
    instead of racing to a rate far over its budget."""
    for seed in (1, 2, 3):
        world = World(Controller(limit=1.2), seed=seed, statements=statements,
                      slow=(0.0, impact.FIRST_WINDOW + 0.5, 1.6))
        world.run(60)
        assert world.mean_ratio(30, 60) <= 1.2 * 1.05, seed
        assert world.rows_per_second(30, 60) >= 0.6 * best_rate(world, 1.2, 30), seed


END = impact.FIRST_WINDOW + 0.1  # just after the first idle window


def test_a_stall_is_neither_a_cut_nor_a_linger_down() -> None:
    rng = random.Random(7)
    b = Controller(limit=1.2)
    b.activity(0.0, True)
    b.hold(0.0)
    for i in range(120):  # a calm baseline: 2 ms commits
        b.beat(0.3 + 0.01 * i, 0.002 * rng.uniform(0.9, 1.1))
    assert b.hold(END) is None and b.rate == impact.START_RATE
    b._next_window = math.inf  # no more windows in this test
    t = END
    while t < END + impact.LINGER + 3:  # 10% slower, inside the budget; a 0.3 s stall after 4.4 s
        took = 0.2 if END + 4.4 <= t < END + 4.7 else 0.0022 * rng.uniform(0.9, 1.1)
        b.beat(t, took)
        t += took + impact.BEAT
        b.allowed(t)
    assert b.rate == impact.START_RATE and b._bad is None


def test_never_stops_under_saturation() -> None:
    world = World(Controller(limit=1.2), load=lambda t: 0.9)
    world.run(30)
    assert world.budget.rate is not None and world.budget.rate >= impact.FLOOR
    assert world.rows_per_second(10, 30) > 0


def test_grows_only_when_the_rate_was_used() -> None:
    b = Controller(limit=1.2)
    b.activity(0.0, True)
    b.hold(0.0)
    for i in range(300):  # a calm baseline
        b.beat(0.3 + 0.005 * i, 0.001)
    assert b.hold(END) is None
    start = b.rate
    for i in range(400):  # no impact at all, but the runner wrote nothing
        b.beat(END + 0.01 * i, 0.001)
    b.allowed(END + 3.9)
    assert b.rate == start
    b.worked(END + 4.0, 0.01, 10_000)
    b.allowed(END + 4.5)
    assert b.rate is not None and start is not None and b.rate > start


def test_with_the_applications_own_latency_only_its_reading_lets_the_rate_grow() -> None:
    world = World(Controller(limit=1.2, app_gated=True))
    world.run(20)  # the canary reads well under the budget, but the application said nothing
    start = world.budget.rate
    assert start is not None and set(world.rates(5, 20)) == {start}
    # A reading under its max whose span began before the rate was set says nothing of it ...
    world.budget.app_read(world.now, 0.5, world.now - world.budget._changed + 1)
    world.run(25)
    assert world.budget.rate == start
    # ... one whose span came after lets it grow, once.
    world.budget.app_read(world.now, 0.5, 5.0)
    world.run(30)
    assert world.budget.rate is not None and world.budget.rate > start
    assert len(set(world.rates(25, 30))) == 2


def test_a_query_now_and_then_is_not_a_load() -> None:
    b = Controller(limit=1.2)
    for i, seen in enumerate([False] * 5 + [True] + [False] * 5):
        b.activity(i * 0.1, seen)
    assert b.idle and b.allowed(1.0) is None


def test_unknown_others_count_as_there() -> None:
    b = Controller(limit=1.2)
    b.activity(0.0, None)
    assert not b.idle
    assert b.hold(0.0) is not None  # it measures a baseline first


def test_a_live_retune_forgets_what_was_learnt() -> None:
    b = Controller(limit=1.2)
    b._bad, b._good = 1000.0, 500.0
    b.retune(1.5)
    assert (b._bad, b._good, b.limit) == (None, None, 1.5)


def typical_verdict(*args: Any) -> str | None:
    found = evidence.typical(*args)
    return None if found is None else found.verdict


def tail_verdict(*args: Any) -> str | None:
    found = evidence.tail(*args)
    return None if found is None else found.verdict


def test_typical_is_judged_with_its_confidence_not_a_point() -> None:
    rng = random.Random(1)
    base = [(rng.gauss(1.0, 0.1), 1.0) for _ in range(40)]
    clearly_over = [(rng.gauss(1.5, 0.1), 1.0) for _ in range(40)]
    clearly_under = [(rng.gauss(1.05, 0.1), 1.0) for _ in range(40)]
    noisy_near = [(rng.gauss(1.2, 0.6), 1.0) for _ in range(6)]
    assert typical_verdict(clearly_over, base, 1.2) == evidence.OVER
    assert typical_verdict(clearly_under, base, 1.2) == evidence.UNDER
    assert typical_verdict(noisy_near, base, 1.2) == evidence.HOLD
    assert evidence.typical(clearly_over[:2], base, 1.2) is None  # too few to judge


def test_one_stalled_chunk_is_neither_over_nor_under() -> None:
    base = [(1.0, 1.0)] * 20
    calm = [(1.05, 1.0)] * 19
    assert typical_verdict([*calm, (30.0, 1.0)], base, 1.2) != evidence.OVER
    stalled_base = [*base[:-1], (30.0, 1.0)]
    assert typical_verdict([(1.3, 1.0)] * 20, stalled_base, 1.2) != evidence.UNDER


def test_the_tail_is_the_share_of_time_in_slow_commits() -> None:
    base = [0.001] * 990 + [0.002] * 10  # p99 2 ms
    few = [0.001] * 995 + [0.004] * 5  # 0.5% of commits over 1.5 x p99 ...
    many = [0.001] * 960 + [0.004] * 40  # ... 4%
    assert tail_verdict(few, base, 0.01, 0.5) != evidence.OVER
    assert tail_verdict(many, base, 0.01, 0.5) == evidence.OVER
    # A mean hardly moves at 4%; the share does.
    assert sum(many) / len(many) < 1.15 * sum(base) / len(base)
    # One long stall weighs as the arrivals it delayed (20), not as one beat; alone, it
    # decides nothing.
    stall = evidence.tail([0.001] * 999 + [0.2], base, 0.01, 0.5)
    assert stall is not None and stall.high > 0.015 and stall.verdict == evidence.HOLD


def test_the_statement_index_takes_a_change_of_mix_for_no_change_of_speed() -> None:
    index = StatementIndex()
    # Baseline: a 1 ms read and a 10 ms write, as many calls of each.
    calls = {1: 0, 2: 0}
    ms = {1: 0.0, 2: 0.0}
    for i in range(9):
        index.snapshot(i * 0.25, {q: (calls[q], ms[q]) for q in calls})
        for q, per in ((1, 1.0), (2, 10.0)):
            calls[q] += 100
            ms[q] += 100 * per
    index.window(0.0, 2.0)
    # Later: ten times as many reads, each as fast as before.
    for i in range(9, 18):
        index.snapshot(i * 0.25, {q: (calls[q], ms[q]) for q in calls})
        calls[1] += 1000
        ms[1] += 1000 * 1.0
        calls[2] += 100
        ms[2] += 100 * 10.0
    pace, base = index.chunks(2.5, [])
    found = evidence.typical(pace, base, 1.2)
    assert found is not None and found.ratio == pytest.approx(1.0)
    assert found.verdict == evidence.UNDER


def test_the_tail_budget_holds_the_share_of_slow_commits() -> None:
    world = World(Controller(tail_limit=1.5), seed=6)
    world.run(60)
    assert world.budget.verdict is not None and world.budget.verdict.statistic == impact.TAIL
    assert world.rows_per_second(30, 60) > 0.2 * best_rate(world, 1.2, 30)


def test_each_statistic_and_the_stricter_holds() -> None:
    typical = World(Controller(limit=1.2), seed=5)
    both = World(Controller(limit=1.2, tail_limit=1.1), seed=5)
    for world in (typical, both):
        world.run(40)
    assert both.rows_per_second(20, 40) <= typical.rows_per_second(20, 40) * 1.05
    assert both.budget.verdict is not None


def test_the_load_from_the_start_gets_a_baseline_then_a_gentle_start() -> None:
    world = World(Controller(limit=1.2))
    world.run(0.5)
    assert world.budget.measuring is not None and world.rows == 0  # measuring first
    world.run(impact.FIRST_WINDOW + 0.2)
    assert world.budget.rate == impact.START_RATE

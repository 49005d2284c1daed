"""The impact budget's controller alone, on a simulated database: no I/O, a simulated clock.

The model is a queue: the foreground's latency is ``service / (1 - utilization)``, where the
utilization is the foreground's own plus the backfill's share of the last 0.3 s (times how much
of the server a backfill at full speed takes), with log-normal noise. The canary's latency is
the foreground's. The simulated runner does what the governor does: an idle window when the
budget asks for one, else a batch, then the pause the budget asks for.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import deque
from dataclasses import dataclass, field

import pytest

from backfill.throttling import impact
from backfill.throttling.impact import Beat, Controller
from backfill.throttling.statements import StatementIndex

BATCH = 0.005  # seconds a batch takes
ACTIVITY_EVERY = 0.1  # as backfill.throttling.canary looks


@dataclass
class World:
    """The simulated database and runner; ``load(t)`` is the foreground's utilization."""

    budget: Controller
    load: object = lambda t: 0.5
    heavy: float = 0.45  # the server share a backfill at full speed takes
    service: float = 0.001
    noise: float = 0.25
    seed: int = 1
    now: float = 0.0
    rows: int = 0
    busy: deque[tuple[float, float]] = field(default_factory=deque)  # batches (start, end)
    trace: list[tuple[float, float, float, int]] = field(default_factory=list)
    truth: list[tuple[float, float]] = field(default_factory=list)  # (t, true impact), 10 ms
    _next_beat: float = 0.0
    _next_activity: float = 0.0
    _next_truth: float = 0.0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def foreground(self, t: float) -> float:
        return float(self.load(t))  # type: ignore[operator]

    def duty_recent(self, t: float) -> float:
        window = 0.3
        busy = sum(max(0.0, min(e, t) - max(s, t - window)) for s, e in self.busy)
        return busy / window

    def latency(self, t: float, *, noisy: bool = True) -> float:
        u = min(0.95, self.foreground(t) + self.heavy * self.duty_recent(t))
        value = self.service / (1 - u)
        return value * (math.exp(self.rng.gauss(0, self.noise)) if noisy else 1.0)

    def ratio(self, t: float) -> float:
        """The true impact now: latency over what it would be with the runner idle."""
        return self.latency(t, noisy=False) / (self.service / (1 - self.foreground(t)))

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while True:
            nxt = min(self._next_beat, self._next_activity, self._next_truth)
            if nxt > end:
                break
            self.now = nxt
            if nxt == self._next_truth:
                self.truth.append((nxt, self.ratio(nxt)))
                self._next_truth += 0.01
            elif nxt == self._next_beat:
                self.budget.beat(Beat(nxt, self.latency(nxt), self.latency(nxt) * 2))
                self._next_beat += self.budget.beat_every
            else:
                self.budget.activity(nxt, self.foreground(nxt) > 0)
                self._next_activity += ACTIVITY_EVERY
        self.now = end
        while self.busy and self.busy[0][1] < self.now - 1:
            self.busy.popleft()

    def run(self, until: float) -> None:
        while self.now < until:
            hold = self.budget.hold(self.now)
            if hold is not None:
                self.advance(min(hold, 0.25))
                continue
            start = self.now
            self.busy.append((start, start + BATCH))
            self.advance(BATCH)
            self.rows += 1000
            self.budget.worked(self.now, BATCH)
            pause = self.budget.pause(self.now, BATCH)
            self.trace.append((self.now, self.budget.duty, self.ratio(self.now), self.rows))
            if pause:
                self.advance(pause)

    def between(self, t0: float, t1: float) -> list[tuple[float, float, float, int]]:
        return [x for x in self.trace if t0 <= x[0] < t1]

    def mean_ratio(self, t0: float, t1: float) -> float:
        """The true impact averaged over time (sampled every 10 ms)."""
        values = [r for t, r in self.truth if t0 <= t < t1]
        return sum(values) / len(values)

    def rate(self, t0: float, t1: float) -> float:
        points = self.between(t0, t1)
        return (points[-1][3] - points[0][3]) / (points[-1][0] - points[0][0]) if points else 0.0


def decisions(world: World, t0: float, t1: float) -> list[float]:
    """The duty after each change in ``[t0, t1)``."""
    duties = [d for _, d, _, _ in world.between(t0, t1)]
    return [b for a, b in itertools.pairwise(duties) if b != a]


def best_duty(world: World, limit: float, t: float) -> float:
    """The duty at which the model's impact is exactly the limit (a steady state)."""
    u = world.foreground(t)
    return min(1.0, max(0.0, (1 - u - (1 - u) / limit) / world.heavy))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_converges_within_the_budget_under_steady_load(seed: int) -> None:
    world = World(Controller(limit=1.2), seed=seed)
    world.run(40)
    best = best_duty(world, 1.2, 20)
    late = world.between(20, 40)
    mean_duty = sum(d for _, d, _, _ in late) / len(late)
    # Close to the fastest pace the budget allows, not far below it, and within budget.
    # (It errs low: a cut is up to twice as steep as a step up, and the tail pays for overshoot.)
    assert 0.45 * best <= mean_duty <= 1.2 * best, (mean_duty, best)
    assert world.mean_ratio(20, 40) <= 1.2 * 1.05
    # Idle windows cost at most ~10% of the time.
    assert world.rate(20, 40) >= 0.4 * best * 1000 / BATCH


def test_full_speed_when_nobody_else_is_there() -> None:
    world = World(Controller(limit=1.2), load=lambda t: 0.0)
    world.run(10)
    assert world.rate(1, 10) >= 0.95 * 1000 / BATCH
    assert world.budget.idle and not world.budget.holding


def test_backs_off_within_seconds_of_a_load_step_and_recovers_after() -> None:
    world = World(Controller(limit=1.2), load=lambda t: 0.5 if 10 <= t < 25 else 0.0)
    world.run(35)
    full = 1000 / BATCH
    assert world.rate(1, 10) >= 0.95 * full  # off: full speed
    assert world.mean_ratio(13, 25) <= 1.3  # on: back within budget in < 3 s
    assert max(r for _, _, r, _ in world.between(13, 25)) < 2.0
    assert world.rate(27, 35) >= 0.95 * full  # off again: full speed within 2 s
    # During the load it still made progress: never starved.
    assert world.rate(13, 25) > 0


def test_never_starves_under_saturation_and_says_so() -> None:
    # The foreground alone takes 90% of the server: any work shows; the runner crawls.
    world = World(Controller(limit=1.2), load=lambda t: 0.9)
    world.run(30)
    assert world.budget.holding
    assert world.budget.duty <= 5 * impact.FLOOR
    for t in range(5, 30, 5):  # but it crawls on
        assert world.rate(t - 5, t) > 0


def test_a_cut_is_bounded_and_the_bad_pace_remembered() -> None:
    b = Controller(limit=1.2, others=True)
    base = [Beat(0.2 + 0.05 * i, 0.001, 0.002) for i in range(16)]
    for beat in base:
        b.beat(beat)
    b.measuring = (0.0, 1.0)
    assert b.hold(1.0) is None  # the window ends: baseline in, duty starts low
    assert b.duty == impact.START
    b.duty = 0.8
    for i in range(30):  # ten times the baseline: way over budget
        b.beat(Beat(1.2 + 0.05 * i, 0.010, 0.002))
    b._changed = 1.0
    b._decided = -1.0
    b.pause(2.7, BATCH)
    assert b.duty == pytest.approx(0.4)  # halved, not more
    assert b._bad is None  # once could be a passing stall
    for i in range(30):
        b.beat(Beat(3.2 + 0.05 * i, 0.010, 0.002))
    b.pause(4.8, BATCH)
    assert b.duty == pytest.approx(0.2) and b._bad == 0.4  # twice: 0.4 is too much
    assert b.verdict is not None and b.verdict.deciding == "beat"  # read and write: typical
    assert b.verdict.ratio == pytest.approx((0.010 + 0.002) / 0.003)


def test_grows_only_when_the_allowance_was_used() -> None:
    b = Controller(limit=1.2, others=True)
    for i in range(16):
        b.beat(Beat(0.2 + 0.05 * i, 0.001, 0.002))
    b.measuring = (0.0, 1.0)
    b.hold(1.0)
    for i in range(30):
        b.beat(Beat(1.2 + 0.05 * i, 0.001, 0.002))  # no impact at all
    b._decided = -1.0
    b.pause(2.7, BATCH)  # but the runner did not work (held back by something else)
    assert b.duty == impact.START
    for i in range(40):
        b.worked(1.0 + 0.04 * i, 0.04)  # now it works all the time
    b._decided = -1.0
    b.pause(2.7, BATCH)
    assert b.duty == pytest.approx((1 + impact.GROW) * impact.START)  # far below the budget


def test_a_new_load_gets_a_fresh_baseline_at_once() -> None:
    b = Controller(limit=1.2)
    b.activity(0.0, False)
    assert b.hold(0.0) is None and b.runway(0.0) > 0  # idle: grouped, full speed
    for t in (5.0, 5.25, 5.5):
        b.activity(t, True)
    assert b.hold(5.5) == pytest.approx(impact.FIRST_WINDOW)  # measure the new load first
    assert b.runway(5.6) == 0.0
    for t in (6.0 + i * 0.25 for i in range(impact.LOOKS)):
        b.activity(t, False)
    assert b.idle and b.hold(8.0) is None  # gone again: full speed at once


def test_a_query_now_and_then_is_not_a_load() -> None:
    """A monitoring poll every few seconds leaves the runner at full speed."""
    b = Controller(limit=1.2)
    for i in range(80):  # 20 s of looks, one of every 12 sees a statement
        b.activity(i * 0.25, i % 12 == 5)
        assert b.idle, i


def test_unknown_others_count_as_there() -> None:
    b = Controller(limit=1.2)
    b.activity(0.0, False)
    b.activity(0.25, None)
    assert b.others is None and not b.idle


def test_a_live_retune_forgets_what_was_learnt() -> None:
    b = Controller(limit=1.2, others=True)
    b._bad, b._good = 0.5, 0.3
    b.retune(1.1)
    assert (b.limit, b._bad, b._good) == (1.1, None, None)


def sums(*times: float, calls: int = 1) -> tuple[int, float, float]:
    """A statement's counters after ``calls`` calls of each of ``times`` (milliseconds)."""
    return (len(times) * calls, sum(times) * calls, sum(t * t for t in times) * calls)


def test_the_statement_index_weighs_tails_by_the_baselines_time() -> None:
    idx = StatementIndex()
    zero = (0, 0.0, 0.0)
    # Baseline window: q1 takes 1 ms, 90 calls (90 ms); q2 10 ms, 10 calls (100 ms).
    idx.snapshot(0.0, {1: zero, 2: zero})
    idx.snapshot(0.5, {1: sums(1.0, calls=90), 2: sums(10.0, calls=10)})
    idx.window(0.0, 0.6)
    assert idx.index(0.4) is None  # one snapshot since: nothing to compare yet
    # Lately q1 runs at 1.5 ms, q2 as before, and q2 is called much more (the mix moved):
    # the index weighs by the baseline's time, 90/190 and 100/190, not by the new mix.
    idx.snapshot(1.0, {1: sums(1.0, calls=90), 2: sums(10.0, calls=10)})
    late = {1: sums(1.0, calls=90), 2: sums(10.0, calls=10), 3: sums(0.1, calls=500)}
    late[1] = tuple(a + b for a, b in zip(late[1], sums(1.5, calls=60), strict=True))
    late[2] = tuple(a + b for a, b in zip(late[2], sums(10.0, calls=60), strict=True))
    idx.snapshot(2.0, late)  # type: ignore[arg-type]
    found = idx.index(0.9)
    assert found is not None
    assert found.tail.ratio == pytest.approx((90 * 1.5 + 100 * 1.0) / 190)
    assert found.typical.ratio == pytest.approx((90 * 1.5 + 100 * 1.0) / 190)  # no spread
    assert found.tail.baseline == pytest.approx((90 * 1.0 + 100 * 10.0) / 190 / 1000)
    # A few slow calls show: q1 at 1 ms half the time and 3 ms the other half (mean 2, sd 1:
    # its tail, mean + 2 sd, is 4 ms).
    idx.snapshot(3.0, {1: tuple(a + b for a, b in zip(late[1], sums(1.0, 3.0, calls=30),
                                                      strict=True)),
                       2: tuple(a + b for a, b in zip(late[2], sums(10.0, calls=20),
                                                      strict=True))})  # type: ignore[dict-item]
    found = idx.index(1.9)
    assert found is not None
    assert found.tail.ratio == pytest.approx((90 * 4.0 + 100 * 1.0) / 190)
    assert found.typical.ratio == pytest.approx((90 * 2.0 + 100 * 1.0) / 190)  # the mean
    # A statement evicted and back (its counters restarted) is left out.
    idx.snapshot(4.0, {1: sums(1.0, calls=5), 2: sums(10.0, calls=2)})
    assert idx.index(2.9) is None
    idx.forget()
    assert idx.index(0.0) is None


def test_statements_join_the_verdict_and_can_decide() -> None:
    b = Controller(limit=1.2, others=True)
    b.statements(0.35, {1: (0, 0.0, 0.0)})
    for i in range(30):
        b.beat(Beat(0.3 + 0.02 * i, 0.001, 0.002))
    b.statements(0.9, {1: sums(1.0, calls=1000)})
    b.measuring = (0.0, 1.0)
    b.hold(1.0)
    for i in range(40):  # the canary sees nothing, the statements run 3x slower
        b.beat(Beat(1.5 + 0.05 * i, 0.001, 0.002))
    b.statements(1.5, {1: sums(1.0, calls=1000)})
    later = tuple(a + b for a, b in zip(sums(1.0, calls=1000), sums(3.0, calls=1000),
                                        strict=True))
    b.statements(3.4, {1: later})  # type: ignore[dict-item]
    b._decided = -1.0
    b.pause(3.5, BATCH)
    assert b.verdict is not None and b.verdict.deciding == "statements"
    assert b.verdict.ratio == pytest.approx(3.0)
    assert b.duty == pytest.approx(impact.START * 0.5)
    assert b.batch_share() == impact.SHORTEST  # shorter batches too, not too short
    b.duty = 0.5
    assert b.batch_share() == 0.5


def test_a_stalled_window_leaves_the_baseline() -> None:
    idx = StatementIndex(keep=100.0)
    t = 0.0

    def window(ms: float) -> None:
        nonlocal t
        idx.snapshot(t, {1: (0, 0.0, 0.0)})
        idx.snapshot(t + 0.5, {1: sums(ms, calls=100)})
        idx.window(t, t + 0.6)
        t += 10

    window(1.0)
    window(5.0)  # a stall while it measured
    window(1.1)
    idx.snapshot(t, {1: (0, 0.0, 0.0)})
    idx.snapshot(t + 1, {1: sums(1.2, calls=100)})
    found = idx.index(t - 0.1)
    assert found is not None
    # The stalled window is left out: the baseline pools 1.0 and 1.1 ms (mean 1.05, sd 0.05).
    assert found.tail.baseline == pytest.approx(0.00115)
    assert found.tail.ratio == pytest.approx(1.2 / 1.15)
    assert found.typical.ratio == pytest.approx(1.2 / 1.05)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_settles_without_oscillating(seed: int) -> None:
    """Near the budget the steps are small and the pace stays put: no swinging around it."""
    world = World(Controller(limit=1.2), seed=seed)
    world.run(60)
    late = decisions(world, 30, 60)
    steps = [abs(b / a - 1) for a, b in itertools.pairwise(late)]
    assert steps and sorted(steps)[len(steps) // 2] <= 0.1, steps  # the median step
    duties = [d for _, d, _, _ in world.between(30, 60)]
    mean = sum(duties) / len(duties)
    spread = math.sqrt(sum((d - mean) ** 2 for d in duties) / len(duties))
    assert spread <= 0.25 * mean, (spread, mean)
    assert world.mean_ratio(30, 60) <= 1.2 * 1.05


@pytest.mark.parametrize(("limit", "tail", "held"), [
    (1.2, None, "typical"), (None, 1.2, "tail"), (1.5, 1.2, "tail"), (1.2, 3.0, "typical"),
])
def test_each_statistic_and_the_stricter_holds(
    limit: float | None, tail: float | None, held: str
) -> None:
    world = World(Controller(limit=limit, tail_limit=tail))
    world.run(40)
    b = world.budget
    assert b.verdict is not None and b.limiting == held
    assert b.binding == (limit if held == "typical" else tail)
    strict = min(x for x in (limit, tail) if x is not None)
    assert world.mean_ratio(20, 40) <= strict * 1.05
    assert b.report()[-1] == f"{held} {b.verdict.deciding}"


def test_the_canary_tail_weighs_slow_beats_more_than_the_mean() -> None:
    b = Controller(limit=1.2, tail_limit=1.2, others=True)
    for i in range(40):
        b.beat(Beat(0.2 + 0.02 * i, 0.001, 0.002))
    b.measuring = (0.0, 1.0)
    b.hold(1.0)
    for i in range(40):  # most beats as fast as before, a few much slower
        b.beat(Beat(1.5 + 0.05 * i, 0.006 if i % 10 == 0 else 0.001, 0.002))
    b._decided = -1.0
    b.pause(3.5, BATCH)
    assert b.verdict is not None and b.verdict.statistic == "tail"
    assert b.verdict.deciding == "read"


def test_reacts_within_a_second_when_the_load_arrives() -> None:
    """At full speed on an idle server, a load arrives at 10 s: within a second the runner has
    stopped working at full speed (it measures a baseline, then starts low)."""
    world = World(Controller(limit=1.2), load=lambda t: 0.5 if t >= 10 else 0.0)
    world.run(15)
    busy_after = [s for s, _ in world.busy if 10.5 <= s < 12]
    assert not busy_after  # held for its first window
    assert world.mean_ratio(10.5, 15) <= 1.2 * 1.05
    assert world.budget.duty < 1.0

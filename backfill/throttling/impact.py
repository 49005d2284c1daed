"""The impact budget: the fastest pace at which the database's other users get at most
``max_impact`` slower (their typical latency) and, with ``max_tail_impact``, their tail at
most that much slower, because of the run. Both may be set: the stricter holds the pace.

Pure: fed what was measured (canary beats, whether other sessions are at work, the runner's
own batches), each with its time, it answers with the pause after a batch, idle windows that
measure the baseline, and how long the runner may go on without asking. It does no I/O and
reads no clock (``backfill.throttling.canary`` measures; the governor asks).

- Baseline: the measures with the runner idle, never its own steady state. Idle windows of
  ``WINDOW`` seconds (the first ``SETTLE`` discarded, so the runner's last batch has drained)
  at the start, every ``EVERY`` seconds of work after (7% of the run), and at once when other
  sessions appear after a quiet spell. The baseline pools the last ``POOL`` windows younger
  than ``AGE``, so it follows the application's day.
- Impact, on two statistics, over the last ``JUDGE`` seconds (only since ``SETTLE`` after the
  last change of pace) against the idle windows. Where ``pg_stat_statements`` can be read, the
  application's own statements (``backfill.throttling.statements``): the typical statistic is
  each statement's mean (robust: thousands of calls), the tail its mean plus two standard
  deviations (a proxy from the sums of squares), each weighed by the statement's share of the
  baseline's time. Their times are the server's execution alone (a commit's WAL flush, a
  client's wait for a CPU are not in them), so the canary, a client that commits, is judged
  too, and the larger decides: the typical statistic is the mean of its
  beats (a read and a write: a small transaction), the tail the mean of the slower half
  (``slow_half``) of its reads (what waits for a CPU, a lock) and of its writes (what waits
  for a WAL flush), the larger deciding. The canary is the weaker measure: its own
  distribution, not the application's (docs/throttling.md).
- Control law: the allowance is a duty cycle ``d`` in ``[FLOOR, 1]``: after a batch of ``t``
  seconds the runner waits ``t (1 - d) / d``. Every ``DECIDE`` seconds, once enough is
  measured: the excess ``e`` of the limiting statistic (its impact less 1 over its budget: 1 at
  the budget) moves the duty by ``exp(-CUT (e - 1))`` when over (at most halved) and by
  ``exp(GAIN (1 - e))`` when within and the runner used its allowance (at most ``1 + GROW``):
  steps in proportion to the distance from the budget, small near it, so the pace settles
  instead of swinging around it. A duty clearly too much twice in a row (by half the budget
  again: not the estimate's noise, nor a passing stall) is remembered; growth never passes
  the midpoint to it, and the mark fades by 10% every 5 s (CockroachDB's asymmetric steps,
  Vitess's good and bad rates, LEDBAT's proportional gain and periodic re-measuring). Below
  full speed, batches shrink with the duty (``batch_share``): the same work in shorter
  transactions, finely spread: a smoothly paced rate rather than bursts (the application's
  latency is convex in the runner's instantaneous pace).
- Nobody else there (no other session at work in the last ``LOOKS`` looks, a tenth of a
  second apart): the budget has nobody to protect, and the runner goes at full speed. A load
  has arrived when ``ARRIVE`` of the last ``ARRIVE_LOOKS`` looks saw someone at work (within
  two tenths of a second, so that the runner backs off at once); unknown (the role cannot see
  other sessions), there is assumed to be one.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from backfill.throttling.statements import Snapshot, StatementIndex

BEAT = 0.05  # seconds between canary beats (20 a second) ...
BEAT_MEASURING = 0.025  # ... and during an idle window (the baseline wants many)
WINDOW = 0.6  # seconds of an idle window
FIRST_WINDOW = 1.5  # seconds of the window that starts a baseline (at the start, a new load)
SETTLE = 0.3  # seconds after a change (or a window's start) before beats count
EVERY = 8.0  # seconds of work between idle windows (with WINDOW: 7% of the time)
POOL = 6  # windows pooled into the baseline
AGE = 600.0  # seconds after which a window no longer counts
JUDGE = 2.5  # seconds of beats an impact is measured over (CockroachDB: 2.5 s; shorter is noise)
DECIDE = 0.5  # seconds between decisions
MIN_BEATS = 25  # beats since the last change needed for a judgment (a p90 of fewer is noise)
MIN_BASE = 12  # beats needed in the baseline
TYPICAL, TAIL = "typical", "tail"  # the statistics a budget holds
# The duty to start from under load, before anything is known: gently, as the application's
# tail pays for an overshoot at once, and an undershoot costs a few seconds.
START = 0.05
FLOOR = 0.01  # the least duty: the run never stops for good while the budget allows work
USED = 0.8  # the runner grows only when it worked at least this share of its allowance
# The most the duty grows per decision (far below the budget). A decision needs fresh
# measures after each change, so a smaller step takes long to reach full speed
# (docs/performance.md, "The impact budget").
GROW = 0.5
GAIN = math.log(1 + GROW)  # within the budget: the duty grows by exp(GAIN (1 - excess))
# Over the budget the duty shrinks by exp(-CUT (excess - 1)), halved at twice the budget: the
# steeper step, as the application pays for every overshoot.
CUT = math.log(2)
# Within this of the budget (in excess) the step shrinks further, in proportion to the
# distance: a measurement's noise there moves the pace little.
NEAR = 0.5
LOOKS = 10  # looks at other sessions without anyone at work before nobody is there ...
ARRIVE_LOOKS = 4  # ... and of the last this many looks ...
ARRIVE = 2  # ... this many that saw one at work for a load to have arrived
# Seconds the runner may go on unasked at full speed: keep it short, as a group of batches
# sized for an idle server runs several times longer when a load arrives.
RUNWAY = 0.2
FADE = 0.1  # a bad mark rises by this share every FADE_EVERY seconds
FADE_EVERY = 5.0
# Batches shrink with the duty down to this share of their size: below it, the per-batch
# costs (a commit and a round trip) would eat the allowance.
SHORTEST = 0.1


@dataclass(frozen=True, slots=True)
class Beat:
    """One canary probe: when it was sent, and its read's and write's latency (seconds)."""

    at: float
    read: float
    write: float


@dataclass(frozen=True, slots=True)
class Judgment:
    """The latest judgment, for metrics, logs and ``status``: the limiting statistic's."""

    ratio: float  # measured latency over baseline
    deciding: str  # the signal that measured it: "statements", or the canary's "beat" (its
    # read and write together: the typical statistic), "read" or "write" (the tail)
    current: float  # that latency now, seconds
    baseline: float  # and with the runner idle
    statistic: str = TYPICAL  # which statistic limits: TYPICAL or TAIL
    limit: float | None = None  # its limit (1 + its budget)
    excess: float = 0.0  # (ratio - 1) / (limit - 1): 1 at the budget


SIGNALS = {
    (TYPICAL, "statements"): "statements' mean", (TAIL, "statements"): "statements' tail",
    (TYPICAL, "beat"): "canary mean", (TAIL, "read"): "canary read slow half",
    (TAIL, "write"): "canary write slow half",
}


def describe(ratio: float | None, limit: float, duty: float, current: float | None,
             baseline: float | None, deciding: str | None) -> str:
    """``tail impact 1.34 > 1.20, canary write slow half 2.1 ms over baseline 1.4 ms, duty
    45%``: a measurement (``Controller.report``; ``deciding`` is "statistic signal") in words,
    for the log and ``status``. A row from before the statistics had names reads as before."""
    if ratio is None or current is None or baseline is None:
        return f"impact budget {limit:.2f}: measuring, duty {duty:.0%}"
    statistic, _, side = (deciding or "").rpartition(" ")
    signal = SIGNALS.get((statistic, side)) or (
        "statements" if side == "statements" else f"canary {side}")
    return (
        f"{statistic + ' ' if statistic else ''}impact {ratio:.2f} "
        f"{'>' if ratio > limit else '<='} {limit:.2f}, {signal} "
        f"{current * 1000:.1f} ms over baseline {baseline * 1000:.1f} ms, duty {duty:.0%}"
    )


def _near(error: float) -> float:
    """``error`` (the excess less 1), shrunk in proportion to its size within ``NEAR``."""
    return error * min(1.0, abs(error) / NEAR)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def slow_half(values: list[float]) -> float:
    """The mean of the slower half: weighted to the tail like a p90, but half the beats count
    in it rather than one in ten, so that a few dozen make a measurement instead of noise."""
    ordered = sorted(values)
    half = ordered[len(ordered) // 2:]
    return sum(half) / len(half)


@dataclass
class Controller:
    """The controller. ``limit`` is ``1 + max_impact`` and ``tail_limit`` ``1 + max_tail_impact``
    (None: not held; ``retune`` changes them live)."""

    limit: float | None = None
    tail_limit: float | None = None
    duty: float = 1.0
    others: bool | None = None  # other sessions at work lately (None: cannot tell)
    verdict: Judgment | None = None
    broken: str | None = None  # why the canary cannot measure now (None: it can)
    measuring: tuple[float, float] | None = None  # the idle window under way (start, end)
    _looks: deque[bool | None] = field(default_factory=deque)
    _statements: StatementIndex = field(default_factory=StatementIndex)
    _beats: deque[Beat] = field(default_factory=deque)
    _windows: deque[tuple[float, list[Beat]]] = field(default_factory=deque)  # (end, beats)
    _work: deque[tuple[float, float]] = field(default_factory=deque)  # (end, seconds)
    _next_window: float = -math.inf  # the first window is due at once
    _changed: float = -math.inf
    _decided: float = -math.inf
    _bad: float | None = None  # the lowest duty known to exceed the budget
    _bad_at: float = 0.0
    _good: float | None = None  # the highest duty known to keep within it
    _over: bool = False  # the last judgment was clearly over the budget

    # --- what was measured ----------------------------------------------------------------

    def beat(self, beat: Beat) -> None:
        self._beats.append(beat)
        while self._beats and self._beats[0].at < beat.at - max(JUDGE, WINDOW) - 1:
            self._beats.popleft()

    def activity(self, now: float, seen: bool | None) -> None:
        """One look at the other sessions: whether one of them was at work a moment ago (None:
        the runner cannot tell). They count as there once ``ARRIVE`` of the last
        ``ARRIVE_LOOKS`` looks saw one, as gone once none of the last ``LOOKS`` did (a first
        look decides alone): a monitoring query now and then is not an application to
        protect, nor a pause of the application's a departure."""
        self._looks.append(seen)
        while len(self._looks) > LOOKS:
            self._looks.popleft()
        if None in self._looks:
            others: bool | None = None
        elif len(self._looks) == 1 or self.others is None:
            others = bool(seen)
        elif self.others is False:
            others = sum(bool(x) for x in list(self._looks)[-ARRIVE_LOOKS:]) >= ARRIVE
        else:
            others = any(self._looks)
        arrived = others is not False and self.others is False
        self.others = others
        if arrived:  # a new load: its baseline is not the old one; measure it now, then go
            self._windows.clear()  # on from the last pace that kept within the budget
            self._statements.forget()
            self._next_window = now
            self._set(min(self._good, 0.5) if self._good else START, now)

    def statements(self, at: float, snapshot: Snapshot) -> None:
        """A snapshot of the application's statements (``pg_stat_statements``)."""
        self._statements.snapshot(at, snapshot)

    def worked(self, end: float, seconds: float) -> None:
        """A batch (or group) that took ``seconds`` of the runner's time ended at ``end``."""
        self._work.append((end, seconds))
        while self._work and self._work[0][0] < end - JUDGE - 1:
            self._work.popleft()

    def retune(self, limit: float | None, tail_limit: float | None = None) -> None:
        if (limit, tail_limit) != (self.limit, self.tail_limit):
            self.limit, self.tail_limit, self._bad, self._good = limit, tail_limit, None, None

    @property
    def binding(self) -> float:
        """The limit that holds now: the limiting statistic's (before a judgment, the typical
        one's where it is set)."""
        v = self.verdict
        if v is not None and v.limit is not None:
            return v.limit
        return self.limit or self.tail_limit or 1.0

    @property
    def limiting(self) -> str | None:
        """The statistic that limits the pace now (None before a judgment)."""
        return None if self.verdict is None else self.verdict.statistic

    def report(self) -> tuple[float | None, float, float, float | None, float | None, str | None]:
        """What it measured last, as the canary's row keeps it for ``status``: the ratio, the
        limit, the duty, the current and the baseline latency, and which statistic limits and
        which signal measured it ("tail statements")."""
        v = self.verdict
        if v is None:
            return None, self.binding, self.duty, None, None, None
        return (v.ratio, self.binding, self.duty, v.current, v.baseline,
                f"{v.statistic} {v.deciding}")

    # --- what the governor asks -----------------------------------------------------------

    @property
    def beat_every(self) -> float:
        """How often the canary should beat now (faster while an idle window measures)."""
        return BEAT_MEASURING if self.measuring is not None else BEAT

    @property
    def idle(self) -> bool:
        """Nobody else at work: full speed, nothing measured against."""
        return self.others is False

    @property
    def holding(self) -> bool:
        """Whether the budget holds the run back now: it cannot measure, or allows less than
        full speed (an idle window is a pause of its own). The one answer the governor's state,
        the ceiling on batches and the runway go by."""
        return self.broken is not None or (not self.idle and self.duty < 1.0)

    def hold(self, now: float) -> float | None:
        """Seconds to stay idle now for a baseline window, else None. Asked before a batch."""
        if self.idle:
            self.measuring = None
            return None
        if self.measuring is None and now >= self._next_window:
            self.measuring = (now, now + (WINDOW if self._windows else FIRST_WINDOW))
        if self.measuring is None:
            return None
        start, end = self.measuring
        if now < end:
            return end - now
        self.measuring = None
        self._windows.append((end, [b for b in self._beats if start + SETTLE <= b.at <= end]))
        self._statements.window(start + SETTLE, end)
        while len(self._windows) > POOL or self._windows[0][0] < now - AGE:
            self._windows.popleft()
        # The second window comes soon: a baseline of one window cannot tell a stall.
        self._next_window = now + (EVERY if len(self._windows) > 1 else EVERY / 3)
        self._changed = now
        if self.duty == 1.0 and self._good is None:  # nothing known under this load yet
            self._set(START, now)
        return None

    def pause(self, now: float, seconds: float) -> float:
        """Seconds to wait after a batch of ``seconds`` at the allowed duty."""
        self._decide(now)
        if self.idle or self.duty >= 1.0:
            return 0.0
        return seconds * (1.0 - self.duty) / self.duty

    def batch_share(self) -> float | None:
        """A ceiling on the batch while the budget holds the pace back, as a share of its size:
        in proportion to the duty, so that the runner's work comes in short transactions finely
        spread between the application's, not in long ones with long pauses (a batch's commit
        delays the commits that queue behind it: its tail is what the application feels)."""
        if not self.holding:
            return None
        return max(self.duty, SHORTEST)

    def runway(self, now: float) -> float:
        """How long the runner may go on without asking (0: after every batch)."""
        self._decide(now)
        if self.holding or self.measuring is not None:
            return 0.0
        if self.idle:
            return RUNWAY
        return max(0.0, min(RUNWAY, self._next_window - now))

    # --- the control law ------------------------------------------------------------------

    def _decide(self, now: float) -> None:
        if now - self._decided < DECIDE:
            return
        self._decided = now
        self._fade(now)
        if self.idle:
            self.duty = 1.0
            return
        verdict = self._judge(now)
        if verdict is None:
            return
        self.verdict = verdict
        excess = 1.0 + _near(verdict.excess - 1.0)
        if verdict.excess > 1.0:
            # Clearly over (by half the budget again, not by noise), twice in a row (not a
            # passing stall of the disk): this duty is too much.
            clearly = verdict.excess > 1.5
            if clearly and self._over:
                self._bad, self._bad_at = min(self._bad or self.duty, self.duty), now
                if self._good is not None and self._good >= self.duty:
                    self._good = None
            self._over = clearly
            self._set(self.duty * max(0.5, math.exp(-CUT * (excess - 1.0))), now)
            return
        self._over = False
        if self._used(now):
            self._good = max(self._good or 0.0, self.duty)
            grown = self.duty * min(1.0 + GROW, math.exp(GAIN * (1.0 - excess)))
            if self._bad is not None and self.duty < self._bad:
                grown = min(grown, max(self.duty * 1.02, (self.duty + self._bad) / 2))
            self._set(grown, now)

    def _judge(self, now: float) -> Judgment | None:
        since = max(self._changed + SETTLE, now - JUDGE)
        found: dict[str, tuple[float, str, float, float]] = {}  # statistic: (ratio, signal, ..)
        recent = [b for b in self._beats if b.at >= since]
        base = [b for _, beats in self._windows for b in beats]
        if len(recent) >= MIN_BEATS and len(base) >= MIN_BASE:
            # Typical: the mean of a beat's read and write together (one small transaction,
            # one estimate); tail: the slower half of each, the larger.
            now_sums = [b.read + b.write for b in recent]
            base_sums = [b.read + b.write for b in base]
            found[TYPICAL] = (_mean(now_sums) / max(_mean(base_sums), 1e-6), "beat",
                              _mean(now_sums), _mean(base_sums))
            sides = []
            for side in ("read", "write"):
                current = slow_half([getattr(b, side) for b in recent])
                baseline = slow_half([getattr(b, side) for b in base])
                sides.append((current / max(baseline, 1e-6), side, current, baseline))
            found[TAIL] = max(sides)
        if now - since >= JUDGE / 2 and (index := self._statements.index(since)) is not None:
            # The application's own statements, where they can be seen: what the budget
            # protects, every call of it (the canary's latency can hardly move where the
            # application's tail doubles). But their times are the server's execution alone:
            # a commit's WAL flush comes after the statement, and a client waiting for a CPU
            # is not in them. The canary, a client of its own that commits, sees those: the
            # larger of the two decides (docs/throttling.md says what each can see).
            for statistic, m in ((TYPICAL, index.typical), (TAIL, index.tail)):
                mine = (m.ratio, "statements", m.current, m.baseline)
                found[statistic] = max(found.get(statistic, mine), mine)
        if not found:
            return None
        held = [(statistic, limit) for statistic, limit in ((TYPICAL, self.limit),
                                                             (TAIL, self.tail_limit))
                if limit is not None] or [(TYPICAL, 1.0 + 0.2)]
        excess, statistic, limit = max(
            ((found[st][0] - 1.0) / max(lim - 1.0, 1e-6), st, lim) for st, lim in held
        )
        ratio, signal, current, baseline = found[statistic]
        return Judgment(ratio=ratio, deciding=signal, current=current, baseline=baseline,
                        statistic=statistic, limit=limit, excess=excess)

    def _used(self, now: float) -> bool:
        """Whether the runner worked about as much as its duty allowed since the change (it
        may have been held back by something else: a rate ceiling, a gate, sleep)."""
        since = max(self._changed, now - JUDGE)
        busy = sum(min(s, end - since) for end, s in self._work if end > since)
        return busy >= USED * self.duty * (now - since)

    def _set(self, duty: float, now: float) -> None:
        duty = min(1.0, max(FLOOR, duty))
        if duty != self.duty:
            self.duty, self._changed = duty, now

    def _fade(self, now: float) -> None:
        if self._bad is not None and now - self._bad_at >= FADE_EVERY:
            self._bad, self._bad_at = self._bad * (1.0 + FADE), now
            if self._bad >= 1.0:
                self._bad = None

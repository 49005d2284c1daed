"""The impact budget: the fastest pace at which the database's other users get at most
``max_impact`` slower because of the run.

Pure: fed what was measured (canary beats, whether other sessions are at work, the runner's
own batches), each with its time, it answers with the pause after a batch, idle windows that
measure the baseline, and how long the runner may go on without asking. It does no I/O and
reads no clock (``backfill.throttling.canary`` measures; the governor asks).

- Baseline: the canary's latency with the runner idle, never its own steady state. Idle
  windows of ``WINDOW`` seconds (the first ``SETTLE`` discarded, so the runner's last batch has
  drained) at the start, every ``EVERY`` seconds of work after (7% of the run), and at once
  when other sessions appear after a quiet spell. The baseline pools the beats of the last
  ``POOL`` windows younger than ``AGE``, so it follows the application's day.
- Impact: where ``pg_stat_statements`` can be read, the application's own statements over
  the last ``JUDGE`` seconds (only since ``SETTLE`` after the last change of pace) against the
  idle windows: the time-weighted tails of every call (``backfill.throttling.statements``), the very
  thing the budget protects. Elsewhere the canary stands in: for its read (what waits for a
  CPU, a lock) and its write (what waits for a WAL flush), the beats over the same times
  against the baseline's, each the mean of its slower half (``slow_half``); the larger
  decides. The canary is the weaker measure of the two: it sees the middle of the latency
  distribution better than its tail (see docs/throttling.md for what was measured).
- Control law: the allowance is a duty cycle ``d`` in ``[FLOOR, 1]``: after a batch of ``t``
  seconds the runner waits ``t (1 - d) / d``. Every ``DECIDE`` seconds, once enough beats
  are in: over budget, ``d`` is cut in proportion to the excess, at most halved per step, and
  the duty that was clearly too much twice in a row (by half the budget again: not the
  estimate's noise, nor a passing stall) is remembered; within budget, and only if the runner
  used its allowance, ``d`` grows (by up to half when far below the budget, 10% near it),
  never past the midpoint to the lowest duty known to be too much, a mark that fades by 10%
  every 5 s (CockroachDB's asymmetric steps, Vitess's good and bad rates, LEDBAT's
  proportional gain and periodic re-measuring). Below full speed, batches shrink with the duty
  (``batch_cap``): the same work in shorter transactions.
- Nobody else there (no other session at work in the last ``LOOKS`` looks, a quarter of a
  second apart: one second): the budget has nobody to protect, and the runner goes at full
  speed. A load has arrived when ``ARRIVE`` of those looks saw someone at work; unknown (the
  role cannot see other sessions), there is assumed to be one.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from backfill.throttling.statements import Snapshot, StatementIndex

BEAT = 0.05  # seconds between canary beats (20 a second) ...
BEAT_MEASURING = 0.025  # ... and during an idle window (the baseline wants many) ...
BEAT_SPARE = 0.1  # ... and while the application's statements decide instead
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
START = 0.05  # the duty to start from under load, before anything is known (gently: the
# application's tail pays for an overshoot at once, an undershoot costs a few seconds)
FLOOR = 0.01  # the least duty: the run never stops for good while the budget allows work
USED = 0.8  # the runner grows only when it worked at least this share of its allowance
GROW = 0.5  # the most the duty grows per decision (by a tenth of that near the budget): a
# decision needs fresh beats after each change, so a quarter took ~40 s to full speed; a
# cut (up to halving) stays the steeper step: the application's tail pays for every overshoot
LOOKS = 4  # looks at other sessions that decide whether anybody is there ...
ARRIVE = 3  # ... of which this many must see one at work for a load to have arrived
RUNWAY = 0.2  # seconds the runner may go on unasked at full speed: when a load arrives, a
# group of batches sized for an idle server runs several times longer; keep it short
FADE = 0.1  # a bad mark rises by this share every FADE_EVERY seconds
FADE_EVERY = 5.0
SHORTEST = 0.1  # batches shrink with the duty down to this share of their size (below, the
# per-batch costs, a commit and a round trip, would eat the allowance)


@dataclass(frozen=True, slots=True)
class Beat:
    """One canary probe: when it was sent, and its read's and write's latency (seconds)."""

    at: float
    read: float
    write: float


@dataclass(frozen=True, slots=True)
class Judgment:
    """The latest judgment, for metrics, logs and ``status``."""

    ratio: float  # measured latency over baseline (the largest of the signals)
    deciding: str  # which decided: the canary's "read" or "write", or "statements"
    current: float  # that latency now (the mean of its slower half), seconds
    baseline: float  # and with the runner idle


def describe(ratio: float | None, limit: float, duty: float, current: float | None,
             baseline: float | None, deciding: str | None) -> str:
    """``impact 1.34 > 1.20, canary write 2.1 ms over baseline 1.4 ms, duty 45%``: a
    measurement (``Controller.report``) in words, for the log and ``status``."""
    if ratio is None or current is None or baseline is None:
        return f"impact budget {limit:.2f}: measuring, duty {duty:.0%}"
    signal = "statements" if deciding == "statements" else f"canary {deciding}"
    return (
        f"impact {ratio:.2f} {'>' if ratio > limit else '<='} {limit:.2f}, {signal} "
        f"{current * 1000:.1f} ms over baseline {baseline * 1000:.1f} ms, duty {duty:.0%}"
    )


def slow_half(values: list[float]) -> float:
    """The mean of the slower half: weighted to the tail like a p90, but half the beats count
    in it rather than one in ten, so that a few dozen make a measurement instead of noise."""
    ordered = sorted(values)
    half = ordered[len(ordered) // 2:]
    return sum(half) / len(half)


@dataclass
class Controller:
    """The controller. ``limit`` is ``1 + max_impact`` (``retune`` changes it live)."""

    limit: float
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
        the runner cannot tell). They count as there once ``ARRIVE`` of the last ``LOOKS``
        looks saw one, as gone once none did (a first look decides alone): a monitoring query
        now and then is not an application to protect."""
        self._looks.append(seen)
        while len(self._looks) > LOOKS:
            self._looks.popleft()
        if None in self._looks:
            others: bool | None = None
        elif len(self._looks) == 1 or self.others is None:
            others = bool(seen)
        elif self.others is False:
            others = sum(bool(x) for x in self._looks) >= ARRIVE
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

    def retune(self, limit: float) -> None:
        if limit != self.limit:
            self.limit, self._bad, self._good = limit, None, None

    def report(self) -> tuple[float | None, float, float, float | None, float | None, str | None]:
        """What it measured last, as the canary's row keeps it for ``status``: the ratio, the
        limit, the duty, the current and the baseline latency, and which side decided."""
        v = self.verdict
        if v is None:
            return None, self.limit, self.duty, None, None, None
        return v.ratio, self.limit, self.duty, v.current, v.baseline, v.deciding

    # --- what the governor asks -----------------------------------------------------------

    @property
    def beat_every(self) -> float:
        """How often the canary should beat now: less often while the application's own
        statements decide (each beat costs the database two statements and a commit)."""
        if self.verdict is not None and self.verdict.deciding == "statements":
            return BEAT_SPARE
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
        limit = self.limit
        if verdict.ratio > limit:
            # Clearly over (by half the budget again, not by noise), twice in a row (not a
            # passing stall of the disk): this duty is too much.
            clearly = verdict.ratio > limit + (self.limit - 1) / 2
            if clearly and self._over:
                self._bad, self._bad_at = min(self._bad or self.duty, self.duty), now
                if self._good is not None and self._good >= self.duty:
                    self._good = None
            self._over = clearly
            self._set(self.duty * max(0.5, min(0.9, limit / verdict.ratio)), now)
            return
        self._over = False
        if self._used(now):
            self._good = max(self._good or 0.0, self.duty)
            headroom = (limit - verdict.ratio) / (self.limit - 1.0)
            grown = self.duty * (1.0 + GROW * min(1.0, max(0.2, headroom)))
            if self._bad is not None and self.duty < self._bad:
                grown = min(grown, max(self.duty * 1.05, (self.duty + self._bad) / 2))
            self._set(grown, now)

    def _judge(self, now: float) -> Judgment | None:
        since = max(self._changed + SETTLE, now - JUDGE)
        if now - since >= JUDGE / 2 and (index := self._statements.index(since)) is not None:
            # The application's own statements, where they can be seen: what the budget
            # protects, every call of it, and their tails (measured: the canary's latency
            # hardly moves where the application's p99 doubles).
            return Judgment(ratio=index.ratio, deciding="statements", current=index.current,
                           baseline=index.baseline)
        recent = [b for b in self._beats if b.at >= since]
        base = [b for _, beats in self._windows for b in beats]
        if len(recent) < MIN_BEATS or len(base) < MIN_BASE:
            return None
        ratios = []
        for side in ("read", "write"):
            current = slow_half([getattr(b, side) for b in recent])
            baseline = slow_half([getattr(b, side) for b in base])
            ratios.append((current / max(baseline, 1e-6), side, current, baseline))
        ratio, side, current, baseline = max(ratios)
        return Judgment(ratio=ratio, deciding=side, current=current, baseline=baseline)

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

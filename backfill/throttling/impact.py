"""The impact budget: the fastest rate (rows a second) at which the database's other users get
at most ``max_impact`` slower (their typical latency) and, with ``max_tail_impact``, their
tail at most that much slower, because of the run. Both may be set: the stricter holds.

Pure: fed what was measured (canary beats, snapshots of ``pg_stat_statements``, whether other
sessions are at work, the runner's own batches), each with its time, it answers with the rate
the runner may write at (``rate``; None: no limit), idle windows that measure the baseline
(``hold``), and how long the runner may go on without asking. No I/O, no clock.

- Baseline: idle windows of ``WINDOW`` seconds (the first ``SETTLE`` discarded) at the start,
  every ``EVERY`` seconds of work after (about 10% of the time), and at once when a load
  arrives. The last ``POOL`` windows pooled, so that it follows the application's day.
- Probing (BBR's and LEDBAT's way, at the speed of the evidence): the runner dwells at a rate
  for at least ``DWELL`` seconds, then every ``DECIDE`` seconds the impact since the change
  (at most ``KEEP`` seconds of it) is judged against the baseline with a confidence interval
  (``backfill.throttling.evidence``): clearly under the budget (and the rate used), the rate
  grows by up to 2x, less the nearer the estimate is to the budget; clearly over, it shrinks
  in proportion to the excess (by 15% to 50%) and the rate is marked bad: growth then stops at
  the geometric midpoint to it, and the mark fades by 10% every ``FADE_EVERY`` seconds. Inside
  the noise the rate holds, and the evidence keeps accumulating, so the interval narrows;
  after ``LINGER`` seconds without a clear answer the rate moves 10-15% by the estimate.
  The application clearly faster at the pace than in the baseline (``STALE``) means the
  baseline was taken in a slow spell: the rate holds while it is measured again.
- The runner's work is spread evenly at that rate (the token bucket of
  ``max_rows_per_second``, small batches): the application's latency is convex in the
  runner's instantaneous pace, so a smooth rate costs less than bursts at the same mean.
- Nobody else there (no other session at work in the last ``LOOKS`` looks, a tenth of a
  second apart): no limit. A load has arrived when ``ARRIVE`` of the last ``ARRIVE_LOOKS``
  looks saw someone at work: the runner drops at once to a gentle rate and measures a new
  baseline. Unknown (the role cannot see other sessions): assumed there.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from backfill.throttling import evidence
from backfill.throttling.evidence import OVER, UNDER, Chunk, Evidence
from backfill.throttling.statements import Snapshot, StatementIndex

BEAT = 0.02  # seconds between canary beats while someone else is at work, idle windows
# included: a canary that beats faster is faster (its backend stays hot), and a baseline taken
# at another cadence than the pace is biased (~10% at 0.005 s against 0.02 s) ...
BEAT_IDLE = 0.1  # ... and while nobody is (there is nothing to measure for)
WINDOW = 0.8  # seconds of an idle window
FIRST_WINDOW = 3.0  # seconds of the window that starts a baseline (at the start, a new load):
# long enough for the tail's p99 (`evidence.MIN_TAIL_BASE` beats at `BEAT`)
SETTLE = 0.3  # seconds after a change (or a window's start) before measures count
EVERY = 7.0  # seconds of work between idle windows
POOL = 16  # windows pooled into the baseline
AGE = 600.0  # seconds after which a window no longer counts
DWELL = 2.0  # seconds at a rate before it is judged
DECIDE = 0.5  # seconds between judgments while dwelling
KEEP = 30.0  # seconds of a dwell that count at most
LINGER = 10.0  # seconds without a clear answer before the rate moves by the estimate
CHUNK = 0.25  # seconds of canary beats per chunk
START_SHARE = 0.05  # the rate to start from under load: this share of the runner's speed ...
START_RATE = 1000.0  # ... or this many rows a second, before its speed is known
FLOOR = 10.0  # rows a second: the least rate (the run never stops while the budget allows)
UP, DOWN = (1.1, 2.0), (0.5, 0.85)  # the range of a step up and of a step down
STALE = 0.9  # the application clearly this much faster at the pace than in the baseline: the
# baseline is stale (taken in a slow spell), measured again (at most once every ``KEEP`` s)
USED = 0.8  # the rate grows only when the runner wrote at least this share of it
FADE, FADE_EVERY = 0.1, 30.0  # a bad mark rises by this share every so many seconds
APP_SURE = 1.25  # the application's own latency this much over its max cuts at once
LOOKS = 10  # looks at other sessions without anyone at work before nobody is there ...
ARRIVE_LOOKS = 4  # ... and of the last this many looks ...
ARRIVE = 2  # ... this many that saw one at work for a load to have arrived
RUNWAY = 0.2  # seconds the runner may go on unasked at full speed
TYPICAL, TAIL = "typical", "tail"  # the statistics a budget holds


@dataclass(frozen=True, slots=True)
class Judgment:
    """One held statistic's evidence, and the signal that measured it."""

    statistic: str  # TYPICAL or TAIL
    signal: str  # "statements" or "canary"
    evidence: Evidence
    budget: float  # the limit set: 1 + max_impact, or 1 + max_tail_impact


def describe(ratio: float | None, budget: float, rate: float | None, current: float | None,
             baseline: float | None, deciding: str | None) -> str:
    """``impact budget 20%: 6,200 rows/s, typical 1.14 <= 1.20 (statements)``: what the budget
    measured last (``Controller.report``, as the canary row keeps it), in words."""
    head = f"impact budget {budget - 1:.0%}: "
    pace = "full speed" if rate is None else f"{rate:,.0f} rows/s"
    if ratio is None or deciding is None:
        return head + f"{pace}, measuring"
    statistic, _, signal = deciding.partition(" ")
    if statistic == TAIL:
        return head + (f"{pace}, tail {ratio:.1%} {'>' if ratio > evidence.TAIL_SHARE else '<='} "
                       f"{evidence.TAIL_SHARE:.0%} of commits over {budget:.2f}x the baseline's "
                       f"p99 ({(baseline or 0) * 1000:.1f} ms)")
    return head + (f"{pace}, typical {ratio:.2f} {'>' if ratio > budget else '<='} {budget:.2f} "
                   f"({signal})")


@dataclass
class Controller:
    """``limit`` is ``1 + max_impact`` and ``tail_limit`` ``1 + max_tail_impact`` (None: not
    held; ``retune`` changes them live)."""

    limit: float | None = None
    tail_limit: float | None = None
    rate: float | None = None  # rows a second allowed now (None: no limit)
    speed: float | None = None  # rows a second the runner writes while a batch runs (EWMA)
    others: bool | None = None  # other sessions at work lately (None: cannot tell)
    verdict: Judgment | None = None  # the deciding judgment last made
    judged: tuple[Judgment, ...] = ()  # every judgment of the last decision (the debug log)
    broken: str | None = None  # why the canary cannot measure now (None: it can)
    measuring: tuple[float, float] | None = None  # the idle window under way (start, end)
    _looks: deque[bool | None] = field(default_factory=deque)
    _statements: StatementIndex = field(default_factory=StatementIndex)
    _beats: deque[tuple[float, float]] = field(default_factory=deque)  # (at, seconds)
    _windows: deque[tuple[float, float, list[tuple[float, float]]]] = field(
        default_factory=deque)  # (start, end, beats)
    _work: deque[tuple[float, float, int]] = field(default_factory=deque)  # (end, s, rows)
    _next_window: float = -math.inf  # the first window is due at once
    _changed: float = -math.inf
    _decided: float = -math.inf
    _rebased: float = -math.inf
    _bad: float | None = None  # the lowest rate known to exceed the budget
    _bad_at: float = 0.0
    _good: float | None = None  # the highest rate known to keep within it
    _since: float | None = None  # the first batch under the load there now
    app_gated: bool = False  # the application's own latency is read: it alone lets the rate grow
    _app_clear: float = -math.inf  # where the span of its last reading under max began
    _app_overs: int = 0  # its readings over max since the last under it (or the last cut)

    # --- what was measured ----------------------------------------------------------------

    def beat(self, at: float, seconds: float) -> None:
        """A canary commit that started at ``at`` and took ``seconds``."""
        self._beats.append((at, seconds))
        while self._beats and self._beats[0][0] < at - KEEP - 1:
            self._beats.popleft()

    def activity(self, now: float, seen: bool | None) -> None:
        """One look at the other sessions: whether one of them was at work a moment ago (None:
        the runner cannot tell). A monitoring query now and then is not an application to
        protect (``ARRIVE``), nor a pause of the application's a departure (``LOOKS``)."""
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
        if others is False:
            self.rate, self._since = None, None
        if arrived:  # a new load: measure its baseline now, then start gently
            self._windows.clear()
            self._statements.forget()
            self._next_window = now
            self._set(self._good / 2 if self._good else self._start(), now)

    def statements(self, at: float, snapshot: Snapshot) -> None:
        """A snapshot of the application's statements (``pg_stat_statements``)."""
        self._statements.snapshot(at, snapshot)

    def worked(self, end: float, seconds: float, rows: int) -> None:
        """A batch (or group) of ``rows`` that took ``seconds`` ended at ``end``."""
        if self._since is None and not self.idle:
            self._since = end - seconds
        self._work.append((end, seconds, rows))
        while self._work and self._work[0][0] < end - KEEP - 1:
            self._work.popleft()
        if seconds > 0 and rows > 0:
            now = rows / seconds
            self.speed = now if self.speed is None else 0.8 * self.speed + 0.2 * now

    def app_read(self, now: float, ratio: float, span: float) -> bool:
        """The application's own latency read ``ratio`` times its max over the last ``span``
        seconds. At most its max: the rate may grow once more, if the span began after the
        rate last changed (``app_gated``: the inner loop's signals read a pace's cost low, so
        only this reading lets a rate grow). Over it by ``APP_SURE`` or more, or over it twice
        in a row (one reading a little over is as likely the application's own noise): the
        pace the runner wrote at over that span is marked bad and the rate cut below it as by
        a clear "over" (in proportion, by 15% to 50%). A reading whose span began before the
        runner's first batch under this load judges no pace of its own: nothing changes.
        Whether the rate was cut."""
        if ratio <= 1.0:
            self._app_clear, self._app_overs = max(self._app_clear, now - span), 0
            return False
        if self.rate is None or self.idle or self._since is None or now - span < self._since:
            return False
        self._app_overs += 1
        if ratio < APP_SURE and self._app_overs < 2:
            return False
        self._app_overs = 0
        rows = sum(r for end, _, r in self._work if end > now - span)
        paced = min(self.rate, rows / span) if rows else self.rate
        self._bad, self._bad_at = min(self._bad or paced, paced), now
        self._set(min(self.rate, paced * _clamp(1.0 / ratio, *DOWN)), now)
        return True

    def retune(self, limit: float | None, tail_limit: float | None = None) -> None:
        if (limit, tail_limit) != (self.limit, self.tail_limit):
            self.limit, self.tail_limit, self._bad, self._good = limit, tail_limit, None, None

    def report(self) -> tuple[float | None, float, float | None, float | None, float | None,
                              str | None]:
        """What it measured last, as the canary's row keeps it for ``status``: the deciding
        statistic's value, the budget it is held to, the rate, the current and the baseline
        latency, and which statistic and signal decided ("typical statements")."""
        v = self.verdict
        budget = (v.budget if v is not None else self.limit or self.tail_limit or 1.2)
        rate = self.allowed_now
        if v is None:
            return None, budget, rate, None, None, None
        e = v.evidence
        return e.ratio, budget, rate, e.current, e.baseline, f"{v.statistic} {v.signal}"

    # --- what the governor asks -----------------------------------------------------------

    @property
    def allowed_now(self) -> float | None:
        """The rate as last decided (``allowed`` without deciding), for a metric."""
        return None if self.idle else self.rate

    @property
    def beat_every(self) -> float:
        return BEAT_IDLE if self.idle else BEAT

    @property
    def idle(self) -> bool:
        """Nobody else at work: full speed, nothing measured against."""
        return self.others is False

    @property
    def holding(self) -> bool:
        """Whether the budget holds the run back now: it cannot measure, or sets a rate."""
        return self.broken is not None or (not self.idle and self.rate is not None)

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
        self._close_window(start, end, now)
        return None

    def _close_window(self, start: float, end: float, now: float) -> None:
        self.measuring = None
        first = not self._windows
        self._windows.append((start, end, [b for b in self._beats
                                           if start + SETTLE <= b[0] <= end]))
        self._statements.window(start + SETTLE, end)
        while len(self._windows) > POOL or self._windows[0][1] < now - AGE:
            self._windows.popleft()
        # The second window comes soon: a baseline of one window cannot tell a stall.
        self._next_window = now + (EVERY if len(self._windows) > 1 else EVERY / 3)
        if first and self.rate is None:  # nothing known under this load yet
            self._set(self._good / 2 if self._good else self._start(), now)

    def allowed(self, now: float) -> float | None:
        """Rows a second the runner may write now (None: no limit)."""
        self._decide(now)
        return None if self.idle else self.rate

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
        if self.idle or self.measuring is not None or self.rate is None:
            return
        since = max(self._changed + SETTLE, now - KEEP)
        if now - since < DWELL:
            return
        found = self._judge(since, now)
        if not found:
            return
        self.judged = tuple(found)
        self.verdict = max(found, key=lambda j: (j.evidence.verdict == OVER,
                                                 j.evidence.high_excess))
        e = self.verdict.evidence
        steady = max(j.evidence.excess for j in found)
        high = max(j.evidence.high_excess for j in found)
        if any(j.evidence.verdict == OVER for j in found):
            self._bad, self._bad_at = min(self._bad or self.rate, self.rate), now
            self._set(self.rate * _clamp(1.0 / max(steady, 1e-6), *DOWN), now)
        elif _stale(found) and now - self._rebased >= KEEP:
            self._rebase(now)
        elif all(j.evidence.verdict == UNDER for j in found) and self._used(since, now):
            self._good = max(self._good or 0.0, self.rate)
            self._grow(_clamp(2.0 - (steady + high) / 2, *UP), now)
        elif now - self._changed >= LINGER:  # inside the noise for long: go by the estimate
            if steady > 1.0:
                self._set(self.rate * DOWN[1], now)
            elif e.excess < 1.0 and self._used(since, now):
                self._grow(UP[0], now)

    def _rebase(self, now: float) -> None:
        """A baseline the application beats at the pace was taken in a slow spell: the rate
        holds while a new one is measured (a first window: ``FIRST_WINDOW`` seconds)."""
        self._rebased = now
        self._windows.clear()
        self._statements.forget()
        self._next_window = now

    def _grow(self, factor: float, now: float) -> None:
        assert self.rate is not None
        if self.app_gated and self._app_clear < self._changed:
            return  # no reading of the application's own has seen this rate yet
        grown = self.rate * factor
        if self._bad is not None:
            if self.rate >= self._bad:
                self._bad = None
            else:
                grown = min(grown, max(self.rate * 1.02, math.sqrt(self.rate * self._bad)))
        self._set(grown, now)

    def _judge(self, since: float, now: float) -> list[Judgment]:
        spans = [(s, e + SETTLE) for s, e, _ in self._windows]
        if self.measuring is not None:
            spans.append((self.measuring[0], now))
        pace = [b for b in self._beats if b[0] >= since and not _inside(b[0], spans)]
        base = [b for _, _, beats in self._windows for b in beats]
        out = []
        if self.limit is not None:  # each signal that can judge; either may say "over"
            stmt_pace, stmt_base = self._statements.chunks(since, spans)
            found = evidence.typical(stmt_pace, stmt_base, self.limit)
            if found is not None:  # as seconds per call, the baseline's mix
                per_call = self._statements.baseline_seconds()
                found = replace(found, current=found.ratio * per_call, baseline=per_call)
                out.append(Judgment(TYPICAL, "statements", found, self.limit))
            found = evidence.typical(_chunks(pace), _chunks(base), self.limit)
            if found is not None:
                out.append(Judgment(TYPICAL, "canary", found, self.limit))
        if self.tail_limit is not None:
            found = evidence.tail([s for _, s in pace], [s for _, s in base], BEAT,
                                  self.tail_limit - 1.0)
            if found is not None:
                out.append(Judgment(TAIL, "canary", found, self.tail_limit))
        return out

    def _used(self, since: float, now: float) -> bool:
        """Whether the runner wrote about as much as the rate allowed since ``since`` (it may
        have been held back by something else: a rate ceiling, a gate, its own speed)."""
        rows = sum(r for end, _, r in self._work if end > since)
        idle = sum(min(e, now) - max(s, since) for s, e, _ in self._windows if e > since)
        return rows >= USED * (self.rate or 0.0) * max(0.0, now - since - idle)

    def _start(self) -> float:
        return START_SHARE * self.speed if self.speed else START_RATE

    def _set(self, rate: float, now: float) -> None:
        rate = max(FLOOR, rate)
        if rate != self.rate:
            self.rate, self._changed = rate, now

    def _fade(self, now: float) -> None:
        if self._bad is not None and now - self._bad_at >= FADE_EVERY:
            self._bad, self._bad_at = self._bad * (1.0 + FADE), now


def _clamp(value: float, low: float, high: float) -> float:
    return min(high, max(low, value))


def _stale(found: Iterable[Judgment]) -> bool:
    """The application clearly faster at the pace than in the baseline, on a typical signal:
    the runner cannot make it faster, so the baseline is what moved."""
    return any(j.statistic == TYPICAL and j.evidence.high < 1.0 and j.evidence.ratio < STALE
               for j in found)


def _inside(at: float, spans: Iterable[tuple[float, float]]) -> bool:
    return any(s <= at <= e for s, e in spans)


def _chunks(beats: list[tuple[float, float]]) -> list[Chunk]:
    """Canary beats in ``CHUNK``-second chunks, weighed as an open-loop application sees them
    (``evidence.open_loop``): (summed latency of the arrivals, arrivals)."""
    bins: dict[int, tuple[float, float]] = {}
    for (at, seconds), w in zip(beats, evidence.open_loop([s for _, s in beats], BEAT),
                                strict=True):
        o, e = bins.get(int(at // CHUNK), (0.0, 0.0))
        bins[int(at // CHUNK)] = (o + seconds * (w + 1) / 2, e + w)
    return list(bins.values())

"""The runner's throttle: how gentle to be before each batch, from the live settings.

In order of precedence, the next batch waits for

1. ``paused``: an operator's ``backfill pause`` (until ``backfill resume``);
2. the health gates (``replication_lag``, ``slot_lag``, ``active_sessions``, ``health_query``,
   ``app_latency``), checked at most every ``check_every`` and re-checked every
   ``check_every`` while one holds (``app_latency``, with the impact budget on, cuts its rate
   instead of holding);
3. ``impact``, while the impact budget (``max_impact``, ``max_tail_impact``) measures its
   baseline with the runner idle, or cannot measure (and ``on_check_error`` is "pause");
4. pacing: ``sleep`` (``max(sleep_seconds, sleep_ratio x last batch's duration)`` after each
   batch), or the rate: ``max_rows_per_second`` (``rate_limit``) or the rate the impact budget
   allows (``impact``), the lower, through one token bucket, with batches small enough that
   the rows come evenly (``pacing.batch_ceiling``).

Each ``Pause`` has exactly one reason and lasts at most ``check_every``, then the governor is
asked again: every second not spent writing is attributed to one reason, metrics stay fresh
during a long wait, and while it waits the governor re-reads the live control every
``check_every`` (no batch brings it then), so ``resume`` and ``set`` take effect within that.

What holds the runner is logged once per change and shown in the checkpoint's ``state``
(``paused``, or ``throttled`` while a gate or the impact budget holds it back) for ``status``
on any machine. ``runway`` tells the loop how long it may go on without asking (batches then
run grouped): not while anything paces every batch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from backfill.checkpoint import BatchResult, State
from backfill.control import Knobs, LiveControl
from backfill.job import Job
from backfill.protocols import Decision, Pause, Probe, Reason, Throttle
from backfill.throttling.gates import Gates, Hold
from backfill.throttling.impact import Controller, Judgment, describe
from backfill.throttling.pacing import RateLimit, batch_ceiling

log = logging.getLogger(__name__)

HOLDING = (Reason.PAUSED, Reason.REPLICATION_LAG, Reason.SLOT_LAG, Reason.ACTIVE_SESSIONS,
           Reason.HEALTH_QUERY, Reason.APP_LATENCY)
EPSILON = 0.001  # shorter waits are not worth a pause


class Governor:
    def __init__(
        self,
        live: LiveControl,
        *,
        probe: Probe | None = None,
        gates: Gates | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.live = live
        self.probe = probe
        self.gates = gates
        self.clock = clock
        self.rate = RateLimit()
        # The impact budget, fed by the canary while ``[throttle]`` sets a budget.
        self.impact = Controller(*live.knobs.throttle.impact_limits())
        self._batch_end: float | None = None  # when the last committed batch came back
        self._batch_seconds = 0.0
        self._rows_per_key: float | None = None  # of the last batch that found rows
        self._said_rate: float | None = None  # the budget's rate last logged
        self._said_judged: tuple[Judgment, ...] = ()  # ... and its judgments
        self._app_seen: tuple[float, float] | None = None  # the app latency reading acted on
        self._checked_at = -math.inf
        self._hold: Hold | None = None
        self._waiting = False
        self._holding: Reason | None = None  # what holds the runner now (HOLDING, or impact)
        self._holding_since = 0.0
        self._poll_failing = False

    async def decide(self, last: BatchResult | None) -> Decision:
        """What to do before the next batch; ``last`` is the batch (or group) just committed,
        None when asked again after a pause."""
        now = self.clock()
        knobs = self.live.knobs
        if last is not None:
            self._batch_end, self._batch_seconds = now, last.seconds
            if last.rows and last.size:
                self._rows_per_key = last.rows / last.size
            self.rate.spend(last.rows, started=now - last.seconds, rate=self._rate(knobs, now)[0])
            self.impact.worked(now, last.seconds, last.rows)
        elif self._waiting and now - self.live.fresh_at >= knobs.throttle.check_every - EPSILON:
            await self._poll()
            knobs = self.live.knobs
        pause = await self._held(knobs) or self._pace(knobs)
        holding = await self._note(pause, knobs)
        self._waiting = pause is not None
        state = State.PAUSED if holding == Reason.PAUSED else (
            State.THROTTLED if holding else State.RUNNING)
        ceiling = batch_ceiling(self._rate(knobs, now)[0], self._rows_per_key)
        return Decision(pause, ceiling=ceiling, state=state, holding=holding)

    def runway(self) -> float:
        """How long the runner may go on without asking: not at all while something paces
        every batch (sleep, the rate ceiling); else until the next gate check is due, and never
        longer than ``check_every`` (between groups it reads live control)."""
        knobs = self.live.knobs
        b = knobs.batch
        if knobs.paused or b.sleep_seconds or b.sleep_ratio or knobs.limits.max_rows_per_second:
            return 0.0
        every = knobs.throttle.check_every
        if self._impact_paces(knobs):
            every = min(every, self.impact.runway(self.clock()))
        if self.gates is not None and self.gates.enabled(knobs):
            return max(0.0, min(every, self._checked_at + every - self.clock()))
        return every

    def _impact_paces(self, knobs: Knobs) -> bool:
        """Whether the impact budget paces the run: it is set, and measuring (or, when it
        cannot, ``on_check_error`` is "pause", which then holds the run)."""
        t = knobs.throttle
        return t.impact_budget and (
            self.impact.broken is None or t.on_check_error == "pause"
        )

    async def _held(self, knobs: Knobs) -> Pause | None:
        every = knobs.throttle.check_every
        if knobs.paused:
            return Pause(every, Reason.PAUSED)
        if self.gates is None or not self.gates.enabled(knobs):
            self._hold = None
            return self._window(knobs)
        if self.clock() - self._checked_at >= every - EPSILON:
            self._hold = await self.gates.check(knobs)
            self._checked_at = self.clock()
            self._hold = self._app_read(knobs)
        if self._hold is None:
            return self._window(knobs)
        return Pause(max(EPSILON, self._checked_at + every - self.clock()), self._hold.reason)

    def _app_read(self, knobs: Knobs) -> Hold | None:
        """The gates' hold, but for the application's latency when the impact budget paces the
        run: each new reading goes to the budget instead (over its max, the rate is cut; a
        reading lags the rate it measures, so it acts once)."""
        a, reading = knobs.throttle.app_latency, self.gates.app if self.gates else None
        paces = a is not None and self._impact_paces(knobs)
        read = reading is not None and not math.isnan(reading[1])
        # Unread, the rate grows only if failed checks are to be ignored.
        self.impact.app_gated = paces and (read or knobs.throttle.on_check_error == "pause")
        if a is None or reading is None or not read or not paces:
            return self._hold  # a failed read holds (on_check_error) as any gate's
        if reading != self._app_seen:
            self._app_seen = reading
            if self.impact.app_read(self.clock(), reading[1] / a.max, a.every):
                log.info(f"impact budget: {self._hold.detail if self._hold else ''}: cut to "
                         f"{self.impact.rate or 0:,.0f} rows/s",
                         extra={"job": self.live.job, "rows_per_second": self.impact.rate})
        return None if self._hold and self._hold.reason == Reason.APP_LATENCY else self._hold

    def _window(self, knobs: Knobs) -> Pause | None:
        """The impact budget holds the run while it measures its baseline, or while it cannot
        measure and ``on_check_error`` says to pause."""
        if not self._impact_paces(knobs):
            return None
        every = knobs.throttle.check_every
        if self.impact.broken is not None:
            return Pause(every, Reason.IMPACT)
        hold = self.impact.hold(self.clock())
        return Pause(min(hold, every), Reason.IMPACT) if hold else None

    def _pace(self, knobs: Knobs) -> Pause | None:
        now = self.clock()
        sleep = 0.0
        if self._batch_end is not None:
            b = knobs.batch
            want = max(b.sleep_seconds, b.sleep_ratio * self._batch_seconds)
            sleep = self._batch_end + want - now
        limit, why = self._rate(knobs, now)
        seconds, reason = max((sleep, Reason.SLEEP), (self.rate.wait(now, limit), why))
        if seconds < EPSILON:
            return None
        return Pause(min(seconds, knobs.throttle.check_every), reason)

    def _rate(self, knobs: Knobs, now: float) -> tuple[float | None, Reason]:
        """The rate the run may write at now (None: no limit), and which limit sets it."""
        fixed = knobs.limits.max_rows_per_second
        allowed = self.impact.allowed(now) if self._impact_paces(knobs) else None
        if allowed != self._said_rate:
            self._said_rate = allowed
            log.info(describe(*self.impact.report()) if allowed is not None else
                     "impact budget: full speed, nobody else at work" if self.impact.idle
                     else "impact budget: no limit",
                     extra={"job": self.live.job, "rows_per_second": allowed})
        if self.impact.judged is not self._said_judged:
            self._said_judged = self.impact.judged
            log.debug("impact budget judged", extra={
                "job": self.live.job, "rows_per_second": allowed,
                "judgments": [_judgment(j) for j in self._said_judged]})
        if allowed is not None and (fixed is None or allowed < fixed):
            return allowed, Reason.IMPACT
        return fixed, Reason.RATE_LIMIT

    async def _poll(self) -> None:
        if self.probe is None:
            return
        try:
            overrides = await self.probe.control()
        except Exception as exc:
            if not self._poll_failing:
                self._poll_failing = True
                log.warning(
                    "cannot read live control; keeping the last known",
                    extra={"job": self.live.job, "error": f"{type(exc).__name__}: {exc}"},
                )
            return
        self._poll_failing = False
        self.live.apply(overrides)

    async def _note(self, pause: Pause | None, knobs: Knobs) -> Reason | None:
        """What holds the run now (said once per change, and shown in the checkpoint)."""
        holding = pause.reason if pause is not None and pause.reason in HOLDING else None
        if holding is None and self._impact_paces(knobs) and self.impact.holding:
            holding = Reason.IMPACT  # below full speed for the budget: throttled, not each pause
        if holding == self._holding:
            return holding
        now, job = self.clock(), self.live.job
        if holding is None:
            log.info(
                "resumed",
                extra={"job": job, "held_by": self._holding,
                       "seconds": round(now - self._holding_since, 3)},
            )
        elif holding == Reason.IMPACT:
            log.warning(
                "holding: " + (
                    f"the impact budget cannot measure ({self.impact.broken})"
                    if self.impact.broken is not None else describe(*self.impact.report())
                ),
                extra={"job": job, "reason": holding},
            )
        elif holding == Reason.PAUSED:
            log.warning(
                "paused by an operator", extra={"job": job, "resume": f"backfill resume {job}"}
            )
        else:
            detail = self._hold.detail if self._hold is not None else ""
            log.warning(
                "held by a health gate", extra={"job": job, "reason": holding, "detail": detail}
            )
        self._holding, self._holding_since = holding, now
        await self._show(
            State.PAUSED if holding == Reason.PAUSED else
            State.THROTTLED if holding else State.RUNNING
        )
        return holding

    async def _show(self, state: State) -> None:
        if self.probe is None:
            return
        try:
            await self.probe.set_state(state)
        except Exception as exc:  # only a display: never stop or slow the run for it
            log.debug("could not show state", extra={"job": self.live.job, "error": str(exc)})


def _judgment(j: Judgment) -> dict[str, object]:
    e = j.evidence
    return {"statistic": j.statistic, "signal": j.signal, "ratio": round(e.ratio, 4),
            "low": round(e.low, 4), "high": round(e.high, 4), "verdict": e.verdict}


def for_job(job: Job, probe: Probe | None) -> Governor:
    """The governor for a run of ``job``, with its live settings (``governor.live``: they go
    to the loop too, as its control sink)."""
    live = LiveControl(Knobs.from_job(job), job=job.name)
    return Governor(live, probe=probe, gates=Gates(probe, job.name) if probe is not None else None)


@dataclass(slots=True)
class Throttles:
    """The governor, and throttles of the caller's (``run(throttles=...)``) asked after it:
    the longest pause any of them wants, with the governor's ceiling and state."""

    governor: Governor
    others: Sequence[Throttle] = ()

    async def decide(self, last: BatchResult | None) -> Decision:
        decision = await self.governor.decide(last)
        pauses = [p for t in self.others if (p := await t.next_pause(last)) is not None]
        if decision.pause is not None:
            pauses.append(decision.pause)
        return replace(decision, pause=max(pauses, key=lambda p: p.seconds, default=None))

    def runway(self) -> float:
        """The governor's, unless another throttle wants every batch (one that cannot say)."""
        runways = [getattr(t, "runway", None) for t in self.others]
        if not all(callable(r) for r in runways):
            return 0.0
        return min([self.governor.runway(), *(float(r()) for r in runways if callable(r))])

"""Prometheus metrics of a run: an ``Observer`` that keeps its own registries current.

Every series carries the labels ``job`` (the job's name) and ``shard``, plus ``outcome``,
``reason`` or ``state`` where named; never a key value. Label values that are known in advance
are created at zero, so each family is complete from the first scrape (``rate()`` works from the
start, and a Pushgateway push replaces a family instead of leaving an old run's series behind).

Two registries:

* ``registry``: everything a run reports while it works; served on ``/metrics`` and pushed.
* ``success``: ``backfill_last_success_timestamp_seconds`` alone, set and pushed only when a run
  succeeds, so a failed run can never overwrite the time of the last success.

Observer callbacks run on the event loop; the HTTP server reads the registries from its own
thread (prometheus_client's metrics are thread-safe).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from backfill import __version__
from backfill.checkpoint import (
    FAILED,
    INTERRUPTED,
    RUNNING,
    SUCCEEDED,
    BatchResult,
    Checkpoint,
    Key,
    State,
)
from backfill.errors import BatchFailure
from backfill.progress import Tracker
from backfill.protocols import THROTTLE_REASONS, Pause
from backfill.throttling.impact import TAIL, TYPICAL, Controller

STATES = tuple(State)
FINAL_STATES = (INTERRUPTED, SUCCEEDED, FAILED)
OUTCOMES = ("committed", "retried", "failed")
# BatchFailure.reason values (backfill.pg.translate); others appear when first seen.
ERROR_REASONS = (
    "statement_timeout", "lock_timeout", "deadlock", "serialization", "connection", "data",
    "resources", "superseded",
)
# Resolves 10 ms .. 60 s: a batch is meant to take well under the statement timeout (5 s default).
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
NAN = math.nan


class RunMetrics:
    """An ``Observer`` that turns a run's events into Prometheus metrics.

    Progress, remaining rows and ETA come from ``tracker``, the run's one ``Tracker``, which the
    run's ``observers.Progress`` keeps current: it must hear each event before this does.
    ``finish`` records how the run ended (``commands.run`` calls it whatever happened, also
    when the loop failed before it could report a state).
    """

    def __init__(
        self,
        *,
        job: str,
        table: str,
        shard: int = 0,
        shape: str = "update",
        tracker: Tracker,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.job = job
        self.shard = str(shard)
        self.tracker = tracker
        self.clock = clock
        self.opened = False  # a session opened: this run held the job's lock
        self.current_state = ""
        self._pending: BatchFailure | None = None  # a rolled-back attempt not yet resolved
        # The checkpoint's rows when this process's run started, and the rows counted since.
        self._rows_base: int | None = None
        self._rows_counted = 0
        self._budget: tuple[Controller, Callable[[], bool]] | None = None  # see watch()
        self._impact_on = False
        self._states: list[str] = list(STATES)
        labels = ["job", "shard"]
        r = self.registry = CollectorRegistry()
        self.rows_updated = Counter(
            "backfill_rows_updated",
            "Rows the batches reported changed: updated, copied or deleted (see backfill_info's "
            "shape).", labels, registry=r
        )
        self.rows_skipped = Counter(
            "backfill_rows_skipped", "Rows skipped because the SET fails on them.", labels,
            registry=r,
        )
        self.batches = Counter(
            "backfill_batches", "Batch attempts by outcome: committed, retried, failed.",
            [*labels, "outcome"], registry=r,
        )
        self.errors = Counter(
            "backfill_batch_errors", "Rolled-back batch attempts by reason.",
            [*labels, "reason"], registry=r,
        )
        self.duration = Histogram(
            "backfill_batch_duration_seconds", "Time of each committed batch's statement.",
            labels, buckets=DURATION_BUCKETS, registry=r,
        )
        self.batch_size = Gauge(
            "backfill_batch_size", "Keys per batch in the latest attempt.", labels, registry=r
        )
        self.throttle = Counter(
            "backfill_throttle_seconds", "Seconds spent waiting between batches, by reason.",
            [*labels, "reason"], registry=r,
        )
        self.progress = Gauge(
            "backfill_progress_ratio",
            "Fraction of the fixed key range done (0..1); NaN when unknown.", labels, registry=r,
        )
        self.remaining = Gauge(
            "backfill_rows_remaining_estimate",
            "Rows still to update, extrapolated from rows per key space so far; NaN when unknown.",
            labels, registry=r,
        )
        self.eta = Gauge(
            "backfill_eta_seconds",
            "Key space left over key space covered per second recently; NaN when unknown.",
            labels, registry=r,
        )
        self.last_commit = Gauge(
            "backfill_last_commit_timestamp_seconds",
            "Unix time of the last committed batch (of the run's start before the first one).",
            labels, registry=r,
        )
        self.state_gauge = Gauge(
            "backfill_state", "1 for the run's current state, 0 for the others.",
            [*labels, "state"], registry=r,
        )
        self.info = Info(
            "backfill", "The job's table, its shape and the runner's version.", labels, registry=r
        )
        # The impact budget (``[throttle] max_impact``, ``max_tail_impact``); NaN while it is
        # off or has not judged.
        impact = {
            "ratio": "The application's latency with the run over without it, on the statistic "
                     "that limits the pace (backfill_impact_limiting); the budget keeps it at "
                     "or under backfill_impact_limit.",
            "limit": "1 + that statistic's budget (max_impact or max_tail_impact): the most "
                     "the impact ratio may be.",
            "canary_seconds": "The canary's latency now when it decides (typical: its mean; "
                              "tail: its p99); NaN when the application's statements decide.",
            "baseline_seconds": "The deciding latency with the runner idle (its baseline).",
            "allowed_rows_per_second": "The rate the budget allows (NaN: no limit, as while "
                                       "nobody else is at work).",
            "foreground": "1 while other sessions are at work, 0 while nobody else is there "
                          "(full speed), NaN when the runner cannot tell.",
        }
        self.impact = {
            name: Gauge(f"backfill_impact_{name}", text, labels, registry=r)
            for name, text in impact.items()
        }
        self.impact_limiting = Gauge(
            "backfill_impact_limiting",
            "1 for the statistic that limits the pace now (typical: max_impact, the mean; tail: "
            "max_tail_impact), 0 for the other; NaN before a judgment.",
            [*labels, "statistic"], registry=r,
        )
        self.success = CollectorRegistry()
        self.last_success = Gauge(
            "backfill_last_success_timestamp_seconds", "Unix time the job last succeeded.",
            labels, registry=self.success,
        )
        # What the HTTP endpoint serves: both registries.
        self.served = CollectorRegistry()
        self.served.register(self.registry)
        self.served.register(self.success)

        ids = (job, self.shard)
        # The shape is on the info metric, not a label of the counters: every series keeps
        # its name and labels (dashboards, alerts); a panel that wants it joins on job, shard.
        self.info.labels(*ids).info({"table": table, "shape": shape, "version": __version__})
        for outcome in OUTCOMES:
            self.batches.labels(*ids, outcome)
        for reason in ERROR_REASONS:
            self.errors.labels(*ids, reason)
        for reason in THROTTLE_REASONS:
            self.throttle.labels(*ids, reason)
        self.rows_updated.labels(*ids)
        self.rows_skipped.labels(*ids)
        self.duration.labels(*ids)
        self.batch_size.labels(*ids)
        self.last_commit.labels(*ids).set(clock())
        self._set_state(RUNNING)
        self._refresh()

    def watch(self, budget: Controller, active: Callable[[], bool]) -> None:
        """Serve the impact budget's gauges from ``budget``, read at each scrape or push, once
        ``active()`` (the job sets ``max_impact``, perhaps only later through ``set``); a run
        without a budget has no such series."""
        self._budget = (budget, active)
        self._refresh()

    def _watch_impact(self) -> None:
        if self._budget is None or self._impact_on or not self._budget[1]():
            return
        budget, active = self._budget
        self._impact_on = True

        def value(pick: Callable[[Controller], float | None]) -> Callable[[], float]:
            return lambda: _or_nan(pick(budget)) if active() else NAN

        def judged(name: str) -> Callable[[Controller], float | None]:
            return lambda b: None if b.verdict is None else float(getattr(b.verdict.evidence,
                                                                          name))

        picks: dict[str, Callable[[Controller], float | None]] = {
            "ratio": judged("ratio"),
            "limit": lambda b: b.report()[1],
            "canary_seconds": lambda b: (b.verdict.evidence.current if b.verdict is not None
                                         and b.verdict.signal == "canary" else None),
            "baseline_seconds": judged("baseline"),
            "allowed_rows_per_second": lambda b: b.allowed_now,
            "foreground": lambda b: None if b.others is None else float(b.others),
        }
        for name, pick in picks.items():
            self.impact[name].labels(self.job, self.shard).set_function(value(pick))
        def limiting(statistic: str) -> Callable[[Controller], float | None]:
            return lambda b: (None if b.verdict is None
                              else float(b.verdict.statistic == statistic))

        for statistic in (TYPICAL, TAIL):
            gauge = self.impact_limiting.labels(self.job, self.shard, statistic)
            gauge.set_function(value(limiting(statistic)))

    # --- Observer -------------------------------------------------------------------------------

    def started(self, checkpoint: Checkpoint) -> None:
        self.opened = True
        if self._rows_base is None:
            self._rows_base = checkpoint.rows_updated
        self._refresh()

    def committed(self, result: BatchResult) -> None:
        self._resolve("retried")
        ids = (self.job, self.shard)
        self.batches.labels(*ids, "committed").inc()
        if result.seconds > 0:  # 0: a batch found committed after a lost connection
            self.duration.labels(*ids).observe(result.seconds)
        self.batch_size.labels(*ids).set(result.size)
        self.last_commit.labels(*ids).set(self.clock())
        # Rows count once the checkpoint holds more than it ever did: after a server crash lost
        # the last batches it had acknowledged (unflushed commits), the session restarts the
        # tracker from the checkpoint, and the redone batches' rows were counted already.
        ahead = self.tracker.rows - (self._rows_base or 0) - self._rows_counted
        if ahead > 0:
            self.rows_updated.labels(*ids).inc(ahead)
            self._rows_counted += ahead
        self._refresh()

    def failed(self, failure: BatchFailure, *, cursor: Key | None, size: int) -> None:
        self._resolve("retried")  # another attempt followed the previous one
        self.errors.labels(self.job, self.shard, failure.reason).inc()
        self.batch_size.labels(self.job, self.shard).set(size)
        self._pending = failure

    def skipped(self, key: Key) -> None:
        self._resolve("retried")
        self.rows_skipped.labels(self.job, self.shard).inc()

    def throttled(self, pause: Pause) -> None:
        self.throttle.labels(self.job, self.shard, pause.reason).inc(max(0.0, pause.seconds))
        self._refresh()

    def state(self, state: str) -> None:
        if self.current_state in FINAL_STATES:
            return
        self._set_state(state)
        if state == SUCCEEDED:
            self.last_success.labels(self.job, self.shard).set(self.clock())
        self._refresh()

    # --- the end of a run -----------------------------------------------------------------------

    def finish(self, state: str, error: BaseException | None = None) -> None:
        """Record how the run ended: the attempt it gave up on, if any, and the final state."""
        if state == FAILED and self.opened:
            cause = error.__cause__ if error is not None else None
            if isinstance(cause, BatchFailure) and cause is not self._pending:
                # The loop gave up on an attempt it did not report (retries exhausted).
                self._resolve("retried")
                self.errors.labels(self.job, self.shard, cause.reason).inc()
                self.batches.labels(self.job, self.shard, "failed").inc()
            else:
                self._resolve("failed")
        self._resolve("retried")  # interrupted during a backoff: the next run retries it
        self.state(state)

    @property
    def succeeded(self) -> bool:
        return self.current_state == SUCCEEDED

    # --- helpers --------------------------------------------------------------------------------

    def _resolve(self, outcome: str) -> None:
        if self._pending is not None:
            self._pending = None
            self.batches.labels(self.job, self.shard, outcome).inc()

    def _set_state(self, state: str) -> None:
        self.current_state = state
        if state not in self._states:
            self._states.append(state)
        for s in self._states:
            self.state_gauge.labels(self.job, self.shard, s).set(1 if s == state else 0)

    def _refresh(self) -> None:
        """Derived gauges: progress, remaining rows and ETA, from the tracker."""
        self._watch_impact()
        ids = (self.job, self.shard)
        t = self.tracker
        if self.current_state == SUCCEEDED:
            done, remaining, eta = 1.0, 0.0, 0.0
        else:
            done = _or_nan(t.fraction)
            remaining = _or_nan(t.rows_remaining())
            eta = _or_nan(t.eta_seconds())
        self.progress.labels(*ids).set(done)
        self.remaining.labels(*ids).set(remaining)
        self.eta.labels(*ids).set(eta)


def _or_nan(value: float | None) -> float:
    return NAN if value is None else value

"""``backfill run``: wire the loop to PostgreSQL, throttles, observers, signals and metrics."""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, TextIO

import anyio

from backfill.checkpoint import FAILED, INTERRUPTED, Checkpoint
from backfill.connector import Identity, PgConnector
from backfill.conninfo import ConnectParams
from backfill.errors import BackfillError, Interrupted, RowError
from backfill.estimate import FirstStart, estimate_progress
from backfill.job import DONE_WORDS, Job
from backfill.loop import Loop, Policy
from backfill.observers import Fanout, LogLines, Progress
from backfill.progress import Tracker
from backfill.protocols import Observer, Throttle
from backfill.ranges import WHOLE, Shard
from backfill.settings import Telemetry
from backfill.shutdown import Stop, stop_after, watch_signals
from backfill.sizing import AdaptiveSizer
from backfill.throttling import canary, governor
from backfill.throttling.probe import PgProbe

if TYPE_CHECKING:
    from backfill.export import Exporter

log = logging.getLogger(__name__)


def identity() -> Identity:
    return Identity(host=socket.gethostname(), pid=os.getpid())


def policy_for(job: Job) -> Policy:
    return Policy(
        job=job.name,
        max_retries=job.limits.max_retries,
        connect_retry_seconds=job.limits.connect_retry_seconds,
        skip_bad_rows=job.on_row_error == "skip",
    )


def sizer_for(job: Job) -> AdaptiveSizer:
    """The job's ``[batch]`` sizing; live control tunes it as the run goes."""
    batch = job.batch
    return AdaptiveSizer(
        batch.size, batch.min_size, batch.max_size, target_seconds=batch.target_seconds
    )


def default_observers(
    job: Job, progress: Progress, stream: TextIO, *, log_every: float = 30.0,
    shard: Shard = WHOLE,
) -> list[Observer]:
    """Progress for people, read from the run's ``progress``: a live bar on a terminal, else
    JSON log lines."""
    if not stream.isatty():
        return [LogLines(job.name, progress, every=log_every, shape=job.shape)]
    from backfill.progressbar import ProgressBar  # rich, only on a terminal

    label = job.name + (f" [{shard}]" if shard.count > 1 else "")
    done = "" if job.shape == "update" else DONE_WORDS[job.shape]
    return [ProgressBar(stream, progress, label, done=done)]


async def run(
    job: Job,
    params: ConnectParams,
    *,
    observers: Sequence[Observer] | None = None,
    throttles: Sequence[Throttle] = (),
    stream: TextIO | None = None,
    shard: Shard = WHOLE,
    telemetry: Telemetry | None = None,
) -> Checkpoint:
    """Run the job to the end of its key range (or resume it). Returns the final checkpoint.

    SIGTERM/SIGINT stop after the batch in flight (``Interrupted``, exit 75); a second signal
    aborts the batch in flight, which rolls back. With ``telemetry``, the run's Prometheus
    metrics are served and/or pushed (``backfill.export``) for as long as it lasts.
    """
    # The run's progress: one tracker, kept by this observer (ahead of those that read it).
    progress = Progress(Tracker())
    shown = observers is None  # progress for people, unless the caller brings its observers
    if observers is None:
        log_every = telemetry.log_every if telemetry is not None else 30.0
        observers = default_observers(
            job, progress, stream or sys.stderr, log_every=log_every, shard=shard
        )
    exporter: Exporter | None = None
    if telemetry is not None:
        # prometheus-client only with telemetry (an API run without it imports none of it).
        from backfill.export import Exporter
        from backfill.metrics import RunMetrics

        metrics = RunMetrics(job=job.name, table=job.table.display, shard=shard.index,
                             shape=job.shape, tracker=progress.tracker)
        exporter = Exporter(metrics, telemetry)
        observers = [*observers, metrics]
    if job.throttle.app_latency is not None:
        from backfill.throttling import prometheus

        await prometheus.preflight(job.throttle.app_latency, job.throttle.check_timeout)
    first = FirstStart()
    observers = [first, progress, *observers]
    stop = Stop()
    # Gates and live control while no batch runs use a small second connection, opened lazily.
    probe = PgProbe(params, job, shard=shard.index)
    gov = governor.for_job(job, probe)
    if exporter is not None:
        metrics.watch(gov.impact, lambda: gov.live.knobs.throttle.impact_budget)
    loop = Loop(
        policy_for(job),
        PgConnector(params, job, identity=identity(), shard=shard),
        sizer=sizer_for(job),
        throttle=governor.Throttles(gov, throttles),
        observer=Fanout(observers),
        stop=stop,
        control=gov.live,
    )
    outcome: Checkpoint | BaseException | None = None
    abort = anyio.CancelScope()
    if exporter is not None:
        exporter.start()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_signals, stop, abort)
            if job.limits.max_run_seconds is not None:
                tg.start_soon(stop_after, stop, job.limits.max_run_seconds)
            if shown or exporter is not None:  # someone reads the progress
                tg.start_soon(estimate_progress, params, job, first, progress.tracker)
            if exporter is not None:
                tg.start_soon(exporter.push_periodically)
            # The impact budget's canary (it waits while the job sets no max_impact), once the
            # run has started: a job that fails its checks writes nothing, not even a beat.
            tg.start_soon(_after, first.event,
                          partial(canary.measure, probe, canary.Canary.like(probe), gov.live,
                                  gov.impact, clock=gov.clock))
            with abort:
                try:
                    outcome = await loop.run()
                except BackfillError as error:
                    outcome = error
            tg.cancel_scope.cancel()
    finally:
        await probe.aclose()
        _log_end(job, outcome)
        if exporter is not None:
            await exporter.close(
                _final_state(outcome, aborted=abort.cancelled_caught),
                outcome if isinstance(outcome, BaseException) else None,
            )
    if abort.cancelled_caught:
        raise Interrupted("aborted by a second signal; the batch in flight rolled back")
    if isinstance(outcome, BaseException):
        raise outcome
    assert outcome is not None
    return outcome


async def _after(event: anyio.Event, task: Callable[[], Awaitable[None]]) -> None:
    await event.wait()
    await task()


def _final_state(outcome: Checkpoint | BaseException | None, *, aborted: bool) -> str:
    if aborted or isinstance(outcome, Interrupted):
        return INTERRUPTED
    if isinstance(outcome, Checkpoint):
        return outcome.state
    return FAILED


def _log_end(job: Job, outcome: Checkpoint | BaseException | None) -> None:
    """One structured line for a run that failed (the CLI prints the same as plain text)."""
    if isinstance(outcome, BackfillError) and not isinstance(outcome, Interrupted):
        extra: dict[str, Any] = {"job": job.name, "error": str(outcome),
                                 "exit_code": int(outcome.exit_code)}
        if isinstance(outcome, RowError):
            extra["keys"] = list(outcome.keys)
        log.error("run failed", extra=extra)

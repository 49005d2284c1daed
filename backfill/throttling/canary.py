"""The impact budget's measurements, taken for as long as a run lasts on its probe connection
and fed to its ``Controller``: the canary (a tiny read and a tiny committed write, 20 times a
second, 40 during an idle window, also while a batch runs) and whether other sessions are at
work (every ``ACTIVITY_EVERY`` seconds). While the job sets no budget (``max_impact``,
``max_tail_impact``) it only waits for one to be set (``backfill set``).

A canary that cannot be taken (the role may not write ``backfill.canaries``, the connection is
gone) is said once and marks the budget broken: the governor then holds the run or ignores
the budget, as ``on_check_error`` says. Sessions of other roles that the runner's role may not
see (no ``pg_monitor``) are said once too, and assumed to be at work.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import anyio

from backfill.control import LiveControl
from backfill.errors import one_line
from backfill.protocols import Probe
from backfill.throttling.impact import Beat, Controller

log = logging.getLogger(__name__)

ACTIVITY_EVERY = 0.1  # seconds between looks at other sessions (a load that arrives is seen
# within a few of them: the runner backs off within a fraction of a second) ...
RECENT = 0.1  # ... which see a session at work when it ran a statement since the last look
STATEMENTS_EVERY = 0.25  # seconds between reads of pg_stat_statements (a heavier query)


async def measure(
    probe: Probe,
    live: LiveControl,
    budget: Controller,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Run until cancelled."""
    looked = read_at = -RECENT
    hidden_said = statements_said = False
    while True:
        t = live.knobs.throttle
        if not t.impact_budget:
            budget.broken = None
            await anyio.sleep(t.check_every)
            continue
        budget.retune(*t.impact_limits())
        now = clock()
        try:
            read, write = await probe.beat(budget.report())
            budget.beat(Beat(now, read, write))
            if now - looked >= ACTIVITY_EVERY:
                looked = now
                active, hidden = await probe.others(RECENT)
                if hidden and not hidden_said:
                    hidden_said = True
                    log.warning(
                        "the impact budget cannot see other roles' sessions (grant the "
                        "runner's role pg_monitor); it assumes they are at work",
                        extra={"job": live.job, "hidden": hidden},
                    )
                budget.activity(clock(), True if active else None if hidden else False)
            if not statements_said and now - read_at >= STATEMENTS_EVERY:
                read_at = now
                statements_said = await _statements(probe, budget, live.job, clock)
        except Exception as exc:
            if budget.broken is None:
                log.warning(
                    "the impact budget cannot measure",
                    extra={"job": live.job, "error": one_line(exc),
                           "on_check_error": t.on_check_error},
                )
            budget.broken = one_line(exc)
        else:
            if budget.broken is not None:
                log.info("the impact budget measures again", extra={"job": live.job})
                budget.broken = None
        await anyio.sleep(max(0.0, now + budget.beat_every - clock()))


async def _statements(
    probe: Probe, budget: Controller, job: str, clock: Callable[[], float]
) -> bool:
    """Feed a snapshot of ``pg_stat_statements`` to the budget; True once there is something
    to say for good (it is not installed, or hides other roles' statements, or fails): from
    then on the canary goes on alone."""
    try:
        found = await probe.statements()
    except Exception as exc:
        log.warning("the impact budget cannot read pg_stat_statements; the canary decides alone",
                    extra={"job": job, "error": one_line(exc)})
        return True
    if found is None:
        log.info("pg_stat_statements is not installed; the impact budget's canary decides alone",
                 extra={"job": job})
        return True
    snapshot, hidden = found
    if hidden and not snapshot:
        log.warning("pg_stat_statements hides other roles' statements from the runner's role "
                    "(grant it pg_read_all_stats); the impact budget's canary decides alone",
                    extra={"job": job, "hidden": hidden})
        return True
    budget.statements(clock(), snapshot)
    return False
